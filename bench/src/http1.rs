//! A minimal HTTP/1.1 client connection for the load generator: requests
//! are encoded once, answers are parsed only as far as needed (status,
//! `Content-Length` or chunked framing, `Connection: close`), so the load
//! generator spends as little CPU as possible per request and the server
//! under test is what saturates. Readiness probes use hyper instead, which
//! checks the answers fully.

use std::{io, net::SocketAddr};

use bytes::{Buf, BytesMut};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// A keep-alive connection.
pub struct Conn {
    stream: TcpStream,
    buf: BytesMut,
}

/// An answer's status and whether the server closes the connection after
/// it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: u16,
    /// `Connection: close` (or the body ran to the end of the stream).
    pub close: bool,
}

/// How the body of an answer is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Head {
    len: usize,
    status: u16,
    framing: Framing,
    close: bool,
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_owned())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses a response head if `buf` holds a whole one.
fn parse_head(buf: &[u8]) -> io::Result<Option<Head>> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| bad("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let mut framing = Framing::UntilClose;
    let mut close = status_line.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") && framing != Framing::Chunked {
            framing = Framing::Length(value.parse().map_err(|_| bad("bad content-length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding")
            && value.to_ascii_lowercase().ends_with("chunked")
        {
            framing = Framing::Chunked;
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    if status == 204 || status == 304 || (100..200).contains(&status) {
        framing = Framing::Length(0);
    }
    Ok(Some(Head {
        len: end + 4,
        status,
        framing,
        close,
    }))
}

/// The length of a complete chunked body at the start of `buf`, if it is
/// all there (trailers are not expected and not supported).
fn chunked_len(buf: &[u8]) -> io::Result<Option<usize>> {
    let mut at = 0;
    loop {
        let Some(eol) = find(&buf[at..], b"\r\n") else {
            return Ok(None);
        };
        let size_text = std::str::from_utf8(&buf[at..at + eol]).map_err(|_| bad("chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| bad("chunk size"))?;
        at += eol + 2;
        if size == 0 {
            // The empty trailer section.
            return Ok((buf.len() >= at + 2).then_some(at + 2));
        }
        if buf.len() < at + size + 2 {
            return Ok(None);
        }
        at += size + 2;
    }
}

impl Conn {
    /// Connects (with `TCP_NODELAY`).
    pub async fn connect(addr: SocketAddr) -> io::Result<Conn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
        })
    }

    async fn fill(&mut self) -> io::Result<usize> {
        if self.buf.capacity() - self.buf.len() < 4096 {
            self.buf.reserve(16 * 1024);
        }
        self.stream.read_buf(&mut self.buf).await
    }

    /// Sends an encoded request and reads its answer (the body is read
    /// and dropped).
    pub async fn send(&mut self, request: &[u8]) -> io::Result<Answer> {
        self.stream.write_all(request).await?;
        let head = loop {
            if let Some(head) = parse_head(&self.buf)? {
                break head;
            }
            if self.fill().await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        };
        self.buf.advance(head.len);
        let mut close = head.close;
        match head.framing {
            Framing::Length(n) => {
                while self.buf.len() < n {
                    if self.fill().await? == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                }
                self.buf.advance(n);
            }
            Framing::Chunked => loop {
                if let Some(n) = chunked_len(&self.buf)? {
                    self.buf.advance(n);
                    break;
                }
                if self.fill().await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            },
            Framing::UntilClose => {
                while self.fill().await? > 0 {}
                self.buf.clear();
                close = true;
            }
        }
        Ok(Answer {
            status: head.status,
            close,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads() {
        let h = parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            .expect("valid")
            .expect("complete");
        assert_eq!(
            h,
            Head {
                len: 38,
                status: 200,
                framing: Framing::Length(5),
                close: false
            }
        );
        let h = parse_head(
            b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .expect("valid")
        .expect("complete");
        assert_eq!(
            (h.status, h.framing, h.close),
            (404, Framing::Chunked, true)
        );
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\n").expect("valid"), None);
        assert!(parse_head(b"garbage\r\n\r\n").is_err());
    }

    #[test]
    fn chunks() {
        let body = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT";
        assert_eq!(chunked_len(body).expect("valid"), Some(body.len() - 4));
        assert_eq!(chunked_len(&body[..10]).expect("valid"), None);
        assert_eq!(chunked_len(b"0\r\n").expect("valid"), None);
        assert!(chunked_len(b"zz\r\n").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn round_trip_on_loopback() {
        use tokio::net::TcpListener;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut buf = [0u8; 1024];
            let mut seen = 0;
            while seen < 2 {
                let n = s.read(&mut buf).await.expect("read");
                seen += buf[..n].windows(4).filter(|w| *w == b"\r\n\r\n").count();
            }
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .expect("write");
            s.write_all(
                b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            )
            .await
            .expect("write");
        });
        let mut conn = Conn::connect(addr).await.expect("connect");
        let req = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
        // Both requests go out before either answer is read: the server
        // answers once it has seen both heads.
        conn.stream.write_all(req).await.expect("write");
        let first = conn.send(req).await.expect("first");
        assert_eq!(first.status, 200);
        server.await.expect("server");
        let second = conn.send(b"").await.expect("second");
        assert_eq!(
            second,
            Answer {
                status: 201,
                close: false
            }
        );
    }
}
