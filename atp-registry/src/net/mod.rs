//! A small HTTP client (hyper-util's pooled client with rustls), for the
//! calls a toolkit and an `LlmClient` make to their ATP server, and the
//! calls `atp-server` makes (OAuth token endpoints, toolkit endpoint URLs);
//! and the WebSocket settings of the runtime and the `LlmClient`. Not a
//! public API: shared within atp-rs only.

pub mod session;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, header};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// The largest answer read from a server.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Why an HTTP call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// The URL could not be parsed.
    #[error("invalid URL: {0}")]
    InvalidUrl(String),
    /// The connection could not be made.
    #[error("connection failed: {0}")]
    Connect(String),
    /// The connection broke after the request was on its way, before the
    /// whole answer came.
    #[error("the connection broke before the answer came: {0}")]
    Lost(String),
    /// No answer in time.
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// The answer was not JSON.
    #[error("HTTP {status}: the answer is not JSON")]
    NotJson {
        /// The HTTP status.
        status: u16,
    },
}

/// A pooled HTTP/1.1 client for `http://` and `https://` URLs.
#[derive(Clone)]
pub struct HttpClient {
    inner: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client with its own connection pool and the webpki root
    /// certificates.
    pub fn new() -> Self {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            inner: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    /// Sends a request with an optional body (its content type and bytes)
    /// and reads the whole answer (at most 16 MiB): its status and body.
    /// `headers` are sent as given and may hold secrets: never log them;
    /// no error message contains them or the URL's query.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Bytes)>,
        timeout: Duration,
    ) -> Result<(u16, Bytes), NetError> {
        let req = request(method, url, headers, body)?;
        let call = async {
            let resp = self.head(req).await?;
            let status = resp.status().as_u16();
            let bytes = read_body(resp.into_body()).await?;
            Ok((status, bytes))
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(NetError::Timeout(timeout)))
    }

    /// Sends a request and returns as soon as the answer's head has come
    /// (within `timeout`): its status and content type, and its body to
    /// read chunk by chunk as it arrives (server-sent events). Reading
    /// the body has no bound of its own: the caller bounds each wait.
    /// `headers` are sent as given: never log them.
    pub async fn send_streaming(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Bytes)>,
        timeout: Duration,
    ) -> Result<StreamingResponse, NetError> {
        let req = request(method, url, headers, body)?;
        let resp = tokio::time::timeout(timeout, self.head(req))
            .await
            .unwrap_or(Err(NetError::Timeout(timeout)))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(StreamingResponse {
            status,
            content_type,
            body: resp.into_body(),
        })
    }

    async fn head(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, NetError> {
        self.inner.request(req).await.map_err(|e| {
            if e.is_connect() {
                NetError::Connect(error_chain(&e))
            } else {
                NetError::Lost(error_chain(&e))
            }
        })
    }

    /// POSTs a wire body as JSON and reads the status and the answer's
    /// bytes.
    #[cfg(feature = "runtime")]
    pub(crate) async fn post_json(
        &self,
        url: &str,
        body: &impl serde::Serialize,
        timeout: Duration,
    ) -> Result<(u16, Bytes), NetError> {
        let body = Bytes::from(crate::wire::to_json(body));
        self.send(
            Method::POST,
            url,
            &[],
            Some(("application/json", body)),
            timeout,
        )
        .await
    }

    /// Sends `body` (if any) as JSON and reads a JSON answer (`null` for an
    /// empty one). `headers` are sent as given: never log them.
    #[cfg(feature = "llm")]
    pub(crate) async fn json(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&serde_json::Value>,
        timeout: Duration,
    ) -> Result<(u16, serde_json::Value), NetError> {
        let body = body.map(|v| {
            (
                "application/json",
                Bytes::from(serde_json::to_vec(v).unwrap_or_default()),
            )
        });
        let (status, bytes) = self.send(method, url, headers, body, timeout).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok((status, serde_json::Value::Null));
        }
        let value = serde_json::from_slice(&bytes).map_err(|_| NetError::NotJson { status })?;
        Ok((status, value))
    }
}

/// A request with an optional body (its content type and bytes).
fn request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<(&str, Bytes)>,
) -> Result<Request<Full<Bytes>>, NetError> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| NetError::InvalidUrl(redact_url(url)))?;
    let mut req = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    let payload = match body {
        Some((content_type, bytes)) => {
            req = req.header(header::CONTENT_TYPE, content_type);
            bytes
        }
        None => Bytes::new(),
    };
    req.body(Full::new(payload))
        .map_err(|e| NetError::InvalidUrl(e.to_string()))
}

/// A whole body, at most [`MAX_RESPONSE`] bytes.
async fn read_body(body: hyper::body::Incoming) -> Result<Bytes, NetError> {
    Ok(Limited::new(body, MAX_RESPONSE)
        .collect()
        .await
        .map_err(|e| NetError::Lost(e.to_string()))?
        .to_bytes())
}

/// An answer whose body is read as it arrives: what
/// [`HttpClient::send_streaming`] returns.
#[derive(Debug)]
pub struct StreamingResponse {
    /// The HTTP status.
    pub status: u16,
    /// The `Content-Type` header, when there is one.
    pub content_type: Option<String>,
    body: hyper::body::Incoming,
}

impl StreamingResponse {
    /// Whether the answer is `text/event-stream`.
    pub fn is_event_stream(&self) -> bool {
        self.content_type.as_deref().is_some_and(|t| {
            t.split(';')
                .next()
                .is_some_and(|m| m.trim().eq_ignore_ascii_case("text/event-stream"))
        })
    }

    /// The next chunk of the body as it came off the wire; `None` at its
    /// end. Unbounded in time: bound the wait.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, NetError>> {
        loop {
            let frame = match self.body.frame().await? {
                Ok(frame) => frame,
                Err(e) => return Some(Err(NetError::Lost(error_chain(&e)))),
            };
            if let Ok(data) = frame.into_data()
                && !data.is_empty()
            {
                return Some(Ok(data));
            }
        }
    }

    /// The rest of the body (at most 16 MiB), within `timeout`.
    pub async fn read_all(self, timeout: Duration) -> Result<Bytes, NetError> {
        tokio::time::timeout(timeout, read_body(self.body))
            .await
            .unwrap_or(Err(NetError::Timeout(timeout)))
    }
}

/// An error and its causes, `: `-separated (hyper's own text alone says
/// only "client error (Connect)").
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A URL fit for a log line: the path segment after `toolkit-client/`,
/// `llm-client/` or `toolkit/` (an API key) is replaced by `***`.
pub(crate) fn redact_url(url: &str) -> String {
    let mut out = String::with_capacity(url.len());
    let mut hide_next = false;
    for (i, seg) in url.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        if hide_next && !seg.is_empty() && !seg.starts_with("verify_") {
            out.push_str("***");
        } else {
            out.push_str(seg);
        }
        hide_next = matches!(seg, "toolkit-client" | "llm-client" | "toolkit");
    }
    out
}

/// The read buffer of each WebSocket, in `atp-server`, the toolkit runtime
/// and the `LlmClient`. tungstenite's default (128 KiB) is allocated per
/// connection and zero-filled before every read; ATP messages are small,
/// and a larger frame still grows the buffer to its length.
pub const WS_READ_BUFFER: usize = 8 * 1024;

/// The WebSocket configuration of the toolkit runtime and the `LlmClient`.
#[cfg(feature = "_net")]
pub(crate) fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(WS_READ_BUFFER)
}

/// Connects a WebSocket (`TCP_NODELAY`: ATP is request / answer, and every
/// batch is flushed whole).
#[cfg(feature = "_net")]
pub(crate) async fn ws_connect(
    url: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    tokio_tungstenite::connect_async_with_config(url, Some(ws_config()), true)
        .await
        .map(|(ws, _)| ws)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("ws://h:1/ws/v1/atp/toolkit-client/SECRET/"),
            "ws://h:1/ws/v1/atp/toolkit-client/***/"
        );
        assert_eq!(
            redact_url("http://h/api/v1/toolkit/SECRET/inbox"),
            "http://h/api/v1/toolkit/***/inbox"
        );
        assert_eq!(
            redact_url("http://h/api/v1/toolkit/verify_hash"),
            "http://h/api/v1/toolkit/verify_hash"
        );
    }
}
