#![doc = include_str!("../README.md")]

use std::io::Cursor;

use atp_registry::http::{BodySource, RequestHead, Response as AtpResponse};
use rocket::{
    Data, Request, Route,
    data::ToByteUnit,
    http::{Header, Method, Status},
    route::{Handler, Outcome},
};

// `#[tool]` and `#[toolkit]` too: with `crate = "atp_rocket::atp_registry"`
// (this crate's name), no other dependency is needed.
pub use atp_registry::{self, Engine, Registry, tool, toolkit};

atp_registry::define_adapter! {
    /// The ATP endpoints as Rocket routes: `rocket::build().mount("/", Atp::new())`.
    ///
    /// Serves the global registry under `/atp` by default; build it from an
    /// [`Engine`] for another registry or prefix. Mount it at `/`: the prefix
    /// is the engine's.
    pub struct Atp;
}

impl Atp {
    /// The routes, to `mount` at `/`.
    pub fn routes(self) -> Vec<Route> {
        let prefix = self.0.get_prefix().to_owned();
        let handler = AtpHandler(self.0.clone());
        let methods = [
            Method::Get,
            Method::Head,
            Method::Post,
            Method::Put,
            Method::Delete,
            Method::Patch,
            Method::Options,
            Method::Trace,
            Method::Connect,
        ];
        let mut paths = vec![(100, format!("{prefix}/<_..>"))];
        // The MCP endpoints, `{mcp}/{toolkit}` (under the root prefix, the
        // ATP routes take them too).
        if let Some(mcp) = self.0.get_mcp_path().filter(|_| !prefix.is_empty()) {
            paths.push((99, format!("{mcp}/<_..>")));
        }
        // `<_..>` also matches no segment at all: the prefix itself.
        paths
            .iter()
            .flat_map(|(rank, path)| {
                methods
                    .iter()
                    .map(|method| Route::ranked(*rank, *method, path, handler.clone()))
            })
            .collect()
    }
}

impl From<Atp> for Vec<Route> {
    fn from(atp: Atp) -> Self {
        atp.routes()
    }
}

#[derive(Clone)]
struct AtpHandler(Engine);

#[rocket::async_trait]
impl Handler for AtpHandler {
    async fn handle<'r>(&self, request: &'r Request<'_>, data: Data<'r>) -> Outcome<'r> {
        let uri = request.uri();
        let head = RequestHead::new(
            request.method().as_str(),
            uri.path().as_str(),
            uri.query().map(|q| q.as_str()),
            |name| request.headers().get_one(name).map(str::as_bytes),
        );
        convert(self.0.serve(&head, Source(Some(data))).await)
    }
}

/// Rocket reads a body through a cap set when it is opened: the whole body
/// comes as one chunk of at most `allowed + 1` bytes.
struct Source<'r>(Option<Data<'r>>);

impl BodySource for Source<'_> {
    type Chunk = Vec<u8>;

    async fn next_chunk(&mut self, allowed: usize) -> Option<Result<Vec<u8>, ()>> {
        let data = self.0.take()?;
        let cap = (allowed as u64).saturating_add(1);
        Some(
            data.open(cap.bytes())
                .into_bytes()
                .await
                .map(|b| b.into_inner())
                .map_err(drop),
        )
    }
}

fn convert<'r>(r: AtpResponse) -> Outcome<'r> {
    let mut response = rocket::Response::build();
    response.status(Status::new(r.status()));
    for (name, value) in r.headers() {
        response.header(Header::new(name, value));
    }
    let body = r.into_body();
    response.sized_body(body.len(), Cursor::new(body));
    Outcome::Success(response.finalize())
}
