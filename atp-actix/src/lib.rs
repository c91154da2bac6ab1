#![doc = include_str!("../README.md")]

use actix_web::{
    HttpRequest, HttpResponse,
    dev::{AppService, HttpServiceFactory},
    http::{StatusCode, header},
    web,
};
use atp_registry::http::{BodySource, RequestHead, Response as AtpResponse};
use futures_util::StreamExt;

// `#[tool]` and `#[toolkit]` too: with `crate = "atp_actix::atp_registry"`
// (this crate's name), no other dependency is needed.
pub use atp_registry::{self, Engine, Registry, tool, toolkit};

atp_registry::define_adapter! {
    /// The ATP endpoints as an actix-web service: `App::new().service(Atp::new())`.
    ///
    /// Serves the global registry under `/atp` by default; build it from an
    /// [`Engine`] for another registry or prefix.
    pub struct Atp;
}

impl HttpServiceFactory for Atp {
    fn register(self, config: &mut AppService) {
        let prefix = self.0.get_prefix().to_owned();
        // The MCP endpoints, `{mcp}/{toolkit}` (under the root prefix, the
        // ATP scope takes them too).
        if let Some(mcp) = self.0.get_mcp_path().filter(|_| !prefix.is_empty()) {
            web::scope(mcp)
                .app_data(web::Data::new(self.0.clone()))
                .default_service(web::to(handle))
                .register(config);
        }
        web::scope(&prefix)
            .app_data(web::Data::new(self.0))
            .default_service(web::to(handle))
            .register(config);
    }
}

async fn handle(
    request: HttpRequest,
    payload: web::Payload,
    engine: web::Data<Engine>,
) -> HttpResponse {
    let uri = request.uri();
    let head = RequestHead::from_headers(
        request.method().as_str(),
        uri.path(),
        uri.query(),
        request
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes())),
    );
    convert(engine.serve(&head, Source(payload)).await)
}

struct Source(web::Payload);

impl BodySource for Source {
    type Chunk = web::Bytes;

    async fn next_chunk(&mut self, _allowed: usize) -> Option<Result<web::Bytes, ()>> {
        self.0.next().await.map(|chunk| chunk.map_err(drop))
    }
}

fn convert(r: AtpResponse) -> HttpResponse {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    for (name, value) in r.headers() {
        response.insert_header((
            header::HeaderName::from_static(name),
            header::HeaderValue::from_static(value),
        ));
    }
    response.body(r.into_body())
}
