//! The server's own HTTP calls: OAuth token exchanges and tool calls to a
//! toolkit's `endpoint_url` (hyper-util's pooled client, with rustls).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};

/// The largest answer read.
const MAX_RESPONSE: usize = 16 * 1024 * 1024;

/// Why an outgoing call failed. Messages never contain the URL's query or
/// any header.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum OutboundError {
    #[error("invalid URL")]
    InvalidUrl,
    #[error("connection failed: {0}")]
    Connect(String),
    #[error("no answer within {} ms", .0.as_millis())]
    Timeout(Duration),
}

/// An answer: status, content type and body.
pub(crate) struct Answer {
    pub status: u16,
    pub body: Bytes,
}

#[derive(Clone)]
pub(crate) struct Outbound {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl Outbound {
    pub fn new() -> Self {
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        Self {
            client: Client::builder(TokioExecutor::new()).build(https),
        }
    }

    /// Sends a request. `headers` may hold secrets: never log them.
    pub async fn send(
        &self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, Bytes)>,
        timeout: Duration,
    ) -> Result<Answer, OutboundError> {
        let uri: hyper::Uri = url.parse().map_err(|_| OutboundError::InvalidUrl)?;
        let mut req = Request::builder().method(method).uri(uri);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let payload = match body {
            Some((content_type, bytes)) => {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|_| OutboundError::InvalidUrl)?;
        let call = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| OutboundError::Connect(error_chain(&e)))?;
            let status = resp.status().as_u16();
            let body = Limited::new(resp.into_body(), MAX_RESPONSE)
                .collect()
                .await
                .map_err(|e| OutboundError::Connect(e.to_string()))?
                .to_bytes();
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, call)
            .await
            .unwrap_or(Err(OutboundError::Timeout(timeout)))
    }
}

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
