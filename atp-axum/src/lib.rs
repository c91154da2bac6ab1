#![doc = include_str!("../README.md")]

use atp_registry::http::{BodySource, RequestHead, Response as AtpResponse};
use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Request, State},
    http::{HeaderName, HeaderValue, StatusCode},
    response::Response,
    routing::any,
};
use http_body_util::BodyExt;

// `#[tool]` and `#[toolkit]` too: with `crate = "atp_axum::atp_registry"`
// (this crate's name), no other dependency is needed.
pub use atp_registry::{self, Engine, Registry, tool, toolkit};

atp_registry::define_adapter! {
    /// The ATP endpoints as an axum service: `Router::new().merge(Atp::new())`.
    ///
    /// Serves the global registry under `/atp` by default; build it from an
    /// [`Engine`] for another registry or prefix.
    pub struct Atp;
}

impl Atp {
    /// A `Router` with the endpoints, to `merge` into an app.
    pub fn router<S: Clone + Send + Sync + 'static>(self) -> Router<S> {
        let prefix = self.0.get_prefix().to_owned();
        let mcp = self.0.get_mcp_path().map(str::to_owned);
        let handler = any(handle).with_state(self.0);
        let router = Router::new().route(&format!("{prefix}/"), handler.clone());
        let router = if prefix.is_empty() {
            router
        } else {
            router.route(&prefix, handler.clone())
        };
        let router = router.route(&format!("{prefix}/{{*rest}}"), handler.clone());
        match mcp {
            // The MCP endpoints, `{mcp}/{toolkit}`.
            Some(mcp) if !prefix.is_empty() => router.route(&format!("{mcp}/{{*rest}}"), handler),
            _ => router,
        }
    }
}

impl<S: Clone + Send + Sync + 'static> From<Atp> for Router<S> {
    fn from(atp: Atp) -> Self {
        atp.router()
    }
}

async fn handle(State(engine): State<Engine>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let head = RequestHead::from_headers(
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query(),
        parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    convert(engine.serve(&head, Source(body)).await)
}

struct Source(Body);

impl BodySource for Source {
    type Chunk = Bytes;

    async fn next_chunk(&mut self, _allowed: usize) -> Option<Result<Bytes, ()>> {
        loop {
            match self.0.frame().await? {
                Err(_) => return Some(Err(())),
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
            }
        }
    }
}

fn convert(r: AtpResponse) -> Response {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let headers = r.headers();
    let mut response = Response::new(Body::from(r.into_body()));
    *response.status_mut() = status;
    let map = response.headers_mut();
    for (name, value) in headers {
        map.insert(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    response
}
