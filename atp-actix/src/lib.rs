#![doc = include_str!("../README.md")]

use actix_web::{
    HttpRequest, HttpResponse,
    dev::{AppService, HttpServiceFactory},
    http::StatusCode,
    web,
};
use atp_registry::http::{RequestHead, Response as AtpResponse, Step};
use futures_util::StreamExt;

pub use atp_registry::{self, Engine, Registry};

/// The ATP endpoints as an actix-web service: `App::new().service(Atp::new())`.
///
/// Serves the global registry under `/atp` by default; build it from an
/// [`Engine`] for another registry or prefix.
#[derive(Debug, Clone, Default)]
pub struct Atp(Engine);

impl Atp {
    /// The endpoints over the global registry, under `/atp`.
    pub fn new() -> Self {
        Self(Engine::new())
    }

    /// The engine served.
    pub fn engine(&self) -> &Engine {
        &self.0
    }
}

impl From<Engine> for Atp {
    fn from(engine: Engine) -> Self {
        Self(engine)
    }
}

impl HttpServiceFactory for Atp {
    fn register(self, config: &mut AppService) {
        let prefix = self.0.get_prefix().to_owned();
        web::scope(&prefix)
            .app_data(web::Data::new(self.0))
            .default_service(web::to(handle))
            .register(config);
    }
}

async fn handle(
    request: HttpRequest,
    mut payload: web::Payload,
    engine: web::Data<Engine>,
) -> HttpResponse {
    let uri = request.uri();
    let head = RequestHead::new(request.method().as_str(), uri.path(), uri.query(), |name| {
        request.headers().get(name).map(|v| v.as_bytes())
    });
    let pending = match engine.begin(&head) {
        Step::Respond(r) => return convert(r),
        Step::ReadBody(pending) => pending,
    };
    let mut buf = pending.body_buffer();
    while let Some(chunk) = payload.next().await {
        let Ok(chunk) = chunk else {
            return convert(pending.read_failed());
        };
        if buf.push(&chunk).is_err() {
            return convert(pending.too_large());
        }
    }
    convert(pending.run(&buf.finish()).await)
}

fn convert(r: AtpResponse) -> HttpResponse {
    let status = StatusCode::from_u16(r.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    for header in r.headers() {
        response.insert_header(header);
    }
    response.body(r.into_body())
}
