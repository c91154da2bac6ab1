//! A small raw HTTP/1.1 client for the cases.
//!
//! It sends exactly the method, request target (path and query, byte for
//! byte), headers and body it is given — high-level clients normalise paths
//! like `/atp/%ZZ/` and refuse odd methods — always with
//! `Connection: close`, and reads the answer until it is complete (by its
//! `Content-Length` or chunked framing) or the server closes the
//! connection. Every exchange is bounded by [`REQUEST_TIMEOUT`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), String> {
//! use atp_conformance::client::{Request, send};
//!
//! let response = send("http://127.0.0.1:8000", &Request::get("/atp/")).await?;
//! assert_eq!(response.status, 200);
//! assert_eq!(response.header("content-type"), Some("application/json"));
//! # Ok(())
//! # }
//! ```

use std::{fmt, time::Duration};

use serde_json::Value;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// The longest one exchange (connect, send, read the answer) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// `Content-Length: <body length>` — sent when the body is not empty or
    /// the method is `POST`, `PUT` or `PATCH`.
    Auto,
    /// `Content-Length: N`, whatever the body's real length.
    Declared(u64),
    /// `Transfer-Encoding: chunked`, in chunks of 64 KiB.
    Chunked,
    /// Neither header: the body, if any, is sent as is.
    Unframed,
}

/// An HTTP request to send with [`send`].
#[derive(Clone)]
pub struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    framing: Framing,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method)
            .field("target", &self.target)
            .field("headers", &self.headers)
            .field("body_len", &self.body.len())
            .field("framing", &self.framing)
            .finish()
    }
}

impl fmt::Display for Request {
    /// `METHOD TARGET`, as the request line has it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.target)
    }
}

impl Request {
    /// A request with this method and target (`/path?query`, sent
    /// verbatim after the base URL's own path, if any).
    pub fn new(method: impl Into<String>, target: impl Into<String>) -> Self {
        Self {
            method: method.into(),
            target: target.into(),
            headers: Vec::new(),
            body: Vec::new(),
            framing: Framing::Auto,
        }
    }

    /// `GET target`.
    pub fn get(target: impl Into<String>) -> Self {
        Self::new("GET", target)
    }

    /// `HEAD target`.
    pub fn head(target: impl Into<String>) -> Self {
        Self::new("HEAD", target)
    }

    /// `POST target` with no body (`Content-Length: 0`).
    pub fn post(target: impl Into<String>) -> Self {
        Self::new("POST", target)
    }

    /// `POST target` with `value` as its JSON body and
    /// `Content-Type: application/json`.
    pub fn post_json(target: impl Into<String>, value: &Value) -> Self {
        Self::post(target)
            .header("Content-Type", "application/json")
            .body(value.to_string())
    }

    /// Adds a header (sent as given; several of one name are allowed).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets how the body is framed.
    pub fn framing(mut self, framing: Framing) -> Self {
        self.framing = framing;
        self
    }

    /// The method.
    pub fn method(&self) -> &str {
        &self.method
    }

    /// The request target.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// The request as bytes, for `host` under `base_path` (public for the
    /// conformance suite's own tests only).
    #[doc(hidden)]
    pub fn to_bytes(&self, host: &str, base_path: &str) -> Vec<u8> {
        let mut head = format!(
            "{} {}{} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n",
            self.method, base_path, self.target
        );
        for (name, value) in &self.headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        match self.framing {
            Framing::Auto => {
                if !self.body.is_empty() || matches!(self.method.as_str(), "POST" | "PUT" | "PATCH")
                {
                    head.push_str(&format!("Content-Length: {}\r\n", self.body.len()));
                }
            }
            Framing::Declared(n) => head.push_str(&format!("Content-Length: {n}\r\n")),
            Framing::Chunked => head.push_str("Transfer-Encoding: chunked\r\n"),
            Framing::Unframed => {}
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if self.framing == Framing::Chunked {
            for chunk in self.body.chunks(64 * 1024) {
                bytes.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                bytes.extend_from_slice(chunk);
                bytes.extend_from_slice(b"\r\n");
            }
            bytes.extend_from_slice(b"0\r\n\r\n");
        } else {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

/// An HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The headers, in the order received (names as sent).
    pub headers: Vec<(String, String)>,
    /// The body, with its framing removed. For a `HEAD` request: every
    /// byte the server sent after the header section (there should be
    /// none).
    pub body: Vec<u8>,
}

impl Response {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of a header, by case-insensitive name.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body as text (invalid UTF-8 replaced), for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<Value, String> {
        serde_json::from_slice(&self.body)
            .map_err(|e| format!("the body is not JSON ({e}): {}", preview(&self.text())))
    }
}

/// At most the first 300 characters of `text`, for messages.
pub fn preview(text: &str) -> String {
    const MAX: usize = 300;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let cut: String = text.chars().take(MAX).collect();
        format!("{cut}… ({} bytes in all)", text.len())
    }
}

/// `http://HOST:PORT[/PATH]`, split (public for the conformance suite's
/// own tests only).
#[doc(hidden)]
pub struct BaseUrl {
    /// `HOST:PORT` (port 80 when the URL has none).
    pub authority: String,
    /// The path without its trailing `/` (empty for none).
    pub path: String,
}

impl BaseUrl {
    /// Splits `base`; an error for anything but `http://`.
    pub fn parse(base: &str) -> Result<Self, String> {
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("unsupported base URL {base:?}: expected http://HOST:PORT"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if authority.is_empty() {
            return Err(format!("base URL {base:?} has no host"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Self {
            authority,
            path: path.to_owned(),
        })
    }
}

/// Sends `request` to the server at `base` (`http://HOST:PORT`, maybe with
/// a path that is put before every target) and reads its answer, within
/// [`REQUEST_TIMEOUT`].
pub async fn send(base: &str, request: &Request) -> Result<Response, String> {
    let url = BaseUrl::parse(base)?;
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&url, request)).await {
        Ok(Ok(response)) => Ok(response),
        Ok(Err(e)) => Err(format!("{request}: {e}")),
        Err(_) => Err(format!(
            "{request}: no complete answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        )),
    }
}

async fn exchange(url: &BaseUrl, request: &Request) -> Result<Response, String> {
    let stream = TcpStream::connect(&url.authority)
        .await
        .map_err(|e| format!("can not connect to {}: {e}", url.authority))?;
    let (mut reader, mut writer) = stream.into_split();
    let bytes = request.to_bytes(&url.authority, &url.path);
    // Written from another task while the answer is read: a server may
    // answer (413) before it has read the whole body, and must not have to
    // wait for a client that is blocked writing.
    let write = tokio::spawn(async move {
        writer.write_all(&bytes).await?;
        writer.flush().await?;
        // Keep the write half open (no half-close) until the answer is in:
        // some servers drop a request whose client half-closed.
        Ok::<_, std::io::Error>(writer)
    });
    let is_head = request.method.eq_ignore_ascii_case("HEAD");
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    let outcome = loop {
        match reader.read(&mut chunk).await {
            Ok(0) => break parse(&buf, is_head, true),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                match parse(&buf, is_head, false) {
                    Ok(None) => continue,
                    done => break done,
                }
            }
            // A reset after the answer was sent (the server closed with
            // unread body bytes): use what arrived.
            Err(e) if !buf.is_empty() => match parse(&buf, is_head, true) {
                Ok(Some(r)) => break Ok(Some(r)),
                _ => break Err(format!("reading the answer failed: {e}")),
            },
            Err(e) => {
                let written = match write.await {
                    Ok(Err(we)) => format!(" (writing the request failed too: {we})"),
                    _ => String::new(),
                };
                return Err(format!("reading the answer failed: {e}{written}"));
            }
        }
    };
    write.abort();
    match outcome {
        Ok(Some(response)) => Ok(response),
        Ok(None) => Err(format!(
            "the connection closed before a complete answer: {}",
            preview(&String::from_utf8_lossy(&buf))
        )),
        Err(e) => Err(e),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses an answer: `Ok(None)` while it is incomplete, `Ok(Some(_))` once
/// complete. `eof` says whether the server closed the connection. (Public
/// for the conformance suite's own tests only.)
#[doc(hidden)]
pub fn parse(buf: &[u8], is_head: bool, eof: bool) -> Result<Option<Response>, String> {
    let mut rest = buf;
    loop {
        let Some(end) = find(rest, b"\r\n\r\n") else {
            return if eof {
                Err(format!(
                    "the answer has no complete header section: {}",
                    preview(&String::from_utf8_lossy(buf))
                ))
            } else {
                Ok(None)
            };
        };
        let head = std::str::from_utf8(&rest[..end])
            .map_err(|_| "the header section is not UTF-8".to_owned())?;
        let body = &rest[end + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        if !version.starts_with("HTTP/1.") {
            return Err(format!("not an HTTP/1 status line: {status_line:?}"));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line: {status_line:?}"))?;
        let mut headers = Vec::new();
        for line in lines {
            let (name, value) = line
                .split_once(':')
                .ok_or_else(|| format!("bad header line: {line:?}"))?;
            headers.push((name.trim().to_owned(), value.trim().to_owned()));
        }
        if (100..200).contains(&status) {
            // An interim answer (`100 Continue`): the real one follows.
            rest = body;
            continue;
        }
        let response = |body: Vec<u8>| Response {
            status,
            headers: headers.clone(),
            body,
        };
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        if is_head {
            return Ok(eof.then(|| response(body.to_vec())));
        }
        if status == 204 || status == 304 {
            return Ok(Some(response(Vec::new())));
        }
        if header("transfer-encoding").is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            return match dechunk(body)? {
                Some(decoded) => Ok(Some(response(decoded))),
                None if eof => Err("the chunked body ends early".to_owned()),
                None => Ok(None),
            };
        }
        if let Some(length) = header("content-length") {
            let length: usize = length
                .parse()
                .map_err(|_| format!("bad Content-Length {length:?}"))?;
            return if body.len() >= length {
                Ok(Some(response(body[..length].to_vec())))
            } else if eof {
                Err(format!(
                    "the body ends after {} of its {length} bytes",
                    body.len()
                ))
            } else {
                Ok(None)
            };
        }
        return Ok(eof.then(|| response(body.to_vec())));
    }
}

/// Decodes a chunked body: `Ok(None)` while incomplete.
fn dechunk(mut body: &[u8]) -> Result<Option<Vec<u8>>, String> {
    let mut out = Vec::new();
    loop {
        let Some(line_end) = find(body, b"\r\n") else {
            return Ok(None);
        };
        let line =
            std::str::from_utf8(&body[..line_end]).map_err(|_| "bad chunk size line".to_owned())?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size =
            usize::from_str_radix(size, 16).map_err(|_| format!("bad chunk size {size:?}"))?;
        body = &body[line_end + 2..];
        if size == 0 {
            // Trailers, then an empty line.
            return Ok(find(body, b"\r\n").map(|_| out));
        }
        if body.len() < size + 2 {
            return Ok(None);
        }
        out.extend_from_slice(&body[..size]);
        body = &body[size + 2..];
    }
}
