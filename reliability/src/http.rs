//! A raw HTTP/1.1 client over one kept-alive connection: it sends the bytes
//! it is given and reads one answer at a time (by `Content-Length`, chunked
//! framing, or until the server closes). The soak sends a million requests
//! through a few of these; the wire tests send what no real client would.

use std::{io, net::SocketAddr, time::Duration};

use tokio::{
    io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader},
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
};

/// The largest response head read.
const MAX_HEAD: usize = 64 * 1024;

/// An answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// The status.
    pub status: u16,
    /// The headers, names in lowercase.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
    /// Whether the server will close the connection after it.
    pub close: bool,
}

impl RawResponse {
    /// A header's value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The `code` of a JSON error body.
    pub fn code(&self) -> Option<String> {
        self.json()?.get("code")?.as_str().map(str::to_owned)
    }
}

/// Builds a request: the request line, `Host`, the headers given,
/// `Content-Length` when there is a body or the method is `POST`, and the
/// body.
pub fn request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n").into_bytes();
    for (k, v) in headers {
        out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
    }
    if !body.is_empty() || method == "POST" {
        out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out
}

/// One connection (or its read half, after [`Conn::split`]).
#[derive(Debug)]
pub struct Conn<S = TcpStream> {
    stream: BufReader<S>,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.into())
}

impl Conn<TcpStream> {
    /// Connects.
    pub async fn connect(addr: SocketAddr) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
        })
    }

    /// The socket.
    pub fn stream_mut(&mut self) -> &mut TcpStream {
        self.stream.get_mut()
    }

    /// The read half (answers are read from it) and the write half.
    pub fn split(self) -> (Conn<OwnedReadHalf>, OwnedWriteHalf) {
        let (r, w) = self.stream.into_inner().into_split();
        (
            Conn {
                stream: BufReader::new(r),
            },
            w,
        )
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Writes raw bytes.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.get_mut().write_all(bytes).await
    }

    /// Sends `bytes` in pieces of `piece` bytes, `pause` apart.
    pub async fn send_slowly(
        &mut self,
        bytes: &[u8],
        piece: usize,
        pause: Duration,
    ) -> io::Result<()> {
        for chunk in bytes.chunks(piece.max(1)) {
            self.send(chunk).await?;
            tokio::time::sleep(pause).await;
        }
        Ok(())
    }

    /// Sends a request and reads its answer.
    pub async fn exchange(&mut self, bytes: &[u8], head: bool) -> io::Result<RawResponse> {
        self.send(bytes).await?;
        self.read_response(head).await
    }
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Reads one answer (to a `HEAD` when `head` is true: no body).
    pub async fn read_response(&mut self, head: bool) -> io::Result<RawResponse> {
        loop {
            let r = self.read_one(head).await?;
            if r.status >= 200 {
                return Ok(r);
            }
        }
    }

    async fn read_line(&mut self, budget: &mut usize) -> io::Result<String> {
        let mut line = Vec::new();
        let n = (&mut self.stream)
            .take(*budget as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            ));
        }
        if n > *budget {
            return Err(bad("response head too large"));
        }
        *budget -= n;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        String::from_utf8(line).map_err(|_| bad("response head is not UTF-8"))
    }

    async fn read_one(&mut self, head: bool) -> io::Result<RawResponse> {
        let mut budget = MAX_HEAD;
        let status_line = self.read_line(&mut budget).await?;
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let line = self.read_line(&mut budget).await?;
            if line.is_empty() {
                break;
            }
            let (k, v) = line
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {line:?}")))?;
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v): &(String, String)| v.to_ascii_lowercase())
        };
        let mut close = find("connection").is_some_and(|v| v.contains("close"))
            || (version == "HTTP/1.0"
                && !find("connection").is_some_and(|v| v.contains("keep-alive")));
        let mut body = Vec::new();
        let no_body = head || status < 200 || status == 204 || status == 304;
        if no_body {
        } else if find("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            loop {
                let mut budget = MAX_HEAD;
                let size_line = self.read_line(&mut budget).await?;
                let size =
                    usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                        .map_err(|_| bad(format!("bad chunk size {size_line:?}")))?;
                if size == 0 {
                    loop {
                        let mut budget = MAX_HEAD;
                        if self.read_line(&mut budget).await?.is_empty() {
                            break;
                        }
                    }
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.stream.read_exact(&mut body[start..]).await?;
                let mut crlf = [0u8; 2];
                self.stream.read_exact(&mut crlf).await?;
            }
        } else if let Some(len) = find("content-length") {
            let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
            body.resize(len, 0);
            self.stream.read_exact(&mut body).await?;
        } else {
            self.stream.read_to_end(&mut body).await?;
            close = true;
        }
        Ok(RawResponse {
            status,
            headers,
            body,
            close,
        })
    }

    /// Whether the server has closed the connection: reads until EOF or an
    /// error, for at most `limit`; `false` when it is still open then.
    pub async fn closed_within(&mut self, limit: Duration) -> bool {
        let mut sink = [0u8; 4096];
        tokio::time::timeout(limit, async {
            loop {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

/// One request on a fresh connection, bounded by `limit`.
pub async fn once(
    addr: SocketAddr,
    bytes: &[u8],
    head: bool,
    limit: Duration,
) -> io::Result<RawResponse> {
    tokio::time::timeout(limit, async {
        let mut c = Conn::connect(addr).await?;
        c.exchange(bytes, head).await
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))?
}
