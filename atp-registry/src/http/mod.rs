//! The framework-neutral ATP HTTP engine (docs/PROTOCOL.md §3).
//!
//! An adapter turns its framework's request into a [`RequestHead`] and its
//! body into a [`BodySource`], calls [`Engine::serve`], and turns the
//! [`Response`] into its framework's response. The engine decides every
//! status, header and body — and when to read the body, how much of it, and
//! when to stop; the adapter decides nothing about ATP.

use std::{borrow::Cow, fmt, future::Future, sync::Arc};

use bytes::{Bytes, BytesMut};
use percent_encoding::percent_decode;
use serde::{
    Deserialize, Deserializer, Serialize,
    de::{MapAccess, Visitor},
};
use serde_json::{Map, Value};

use crate::wire::{ErrorBody, ToolResult, ToolkitList, ToolkitSummary, ToolkitTools};
use crate::{
    client::{RegisteredTool, ToolKitClient},
    error::ErrorCode,
    registry::Registry,
    schema::Provider,
    secret::{AuthToken, Secret},
    tool::AUTH_TOKEN_PARAM,
};

/// Defines an adapter's handle: a type wrapping an [`Engine`], with the
/// names every adapter shares — `new()` (the global registry under
/// `/atp`), `Default`, `From<Engine>` and `engine()`. The adapter then
/// implements its framework's mounting traits for it.
///
/// ```
/// atp_registry::define_adapter! {
///     /// The ATP endpoints for my framework.
///     pub struct Atp;
/// }
/// let atp = Atp::from(atp_registry::Engine::new().prefix("/tools"));
/// assert_eq!(atp.engine().get_prefix(), "/tools");
/// assert_eq!(Atp::new().engine().get_prefix(), "/atp");
/// ```
#[macro_export]
macro_rules! define_adapter {
    ($(#[$meta:meta])* $vis:vis struct $name:ident;) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Default)]
        $vis struct $name($crate::Engine);

        impl $name {
            /// The endpoints over the global registry, under `/atp`.
            pub fn new() -> Self {
                Self($crate::Engine::new())
            }

            /// The engine served: its registry and prefix.
            pub fn engine(&self) -> &$crate::Engine {
                &self.0
            }
        }

        impl ::core::convert::From<$crate::Engine> for $name {
            fn from(engine: $crate::Engine) -> Self {
                Self(engine)
            }
        }
    };
}

/// The default mount point of the endpoints.
pub const DEFAULT_PREFIX: &str = "/atp";

/// The header that carries a toolkit's endpoint key.
pub const ENDPOINT_KEY_HEADER: &str = "x-atp-key";

/// The `Allow` header of a tool path.
pub const ALLOW_TOOL: &str = "GET, HEAD, POST";
/// The `Allow` header of `/` and of a toolkit path.
pub const ALLOW_READ: &str = "GET, HEAD";

/// The header names an adapter must pass to [`RequestHead::new`], in
/// lowercase ([`RequestHead::from_headers`] picks them out of all the
/// request's headers).
pub const HEADERS: [&str; 10] = [
    "content-type",
    "content-length",
    "authorization",
    ENDPOINT_KEY_HEADER,
    "host",
    "origin",
    "accept",
    "mcp-protocol-version",
    crate::trace::TRACEPARENT,
    crate::trace::TRACESTATE,
];

/// The default mount point of the MCP endpoints (`/mcp/{toolkit}`).
pub const DEFAULT_MCP_PATH: &str = "/mcp";

/// The `Allow` header of an MCP endpoint.
pub const ALLOW_MCP: &str = "POST";

/// The ATP endpoints over a [`Registry`], under a prefix.
///
/// Cheap to clone. Adapters wrap it; `atp_axum::Atp::from(engine)` and its
/// actix-web and Rocket twins take one configured here.
///
/// ```
/// use atp_registry::{Engine, Registry};
///
/// let engine = Engine::with_registry(Registry::new()).prefix("/tools/");
/// assert_eq!(engine.get_prefix(), "/tools");
/// assert_eq!(Engine::new().get_prefix(), "/atp");
/// ```
#[derive(Clone)]
pub struct Engine {
    registry: Registry,
    prefix: Arc<str>,
    /// Where the MCP endpoints are, and which hosts they answer.
    #[cfg(feature = "mcp")]
    mcp: Option<Arc<McpSettings>>,
}

/// The MCP endpoints' settings.
#[cfg(feature = "mcp")]
#[derive(Debug)]
struct McpSettings {
    path: Arc<str>,
    allowed_hosts: Vec<Arc<str>>,
}

impl Default for Engine {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("prefix", &self.prefix)
            .field("registry", &self.registry)
            .finish()
    }
}

/// The parts of an HTTP request the engine reads (everything but the body).
///
/// Its `Debug` output shows whether `Authorization` and `X-ATP-Key` are
/// there, never their values.
#[derive(Clone, Copy, Default)]
pub struct RequestHead<'a> {
    /// The method, e.g. `"GET"`.
    pub method: &'a str,
    /// The full path as received (still percent-encoded), prefix included.
    pub path: &'a str,
    /// The query string, without `?`.
    pub query: Option<&'a str>,
    /// The `Content-Type` header.
    pub content_type: Option<&'a [u8]>,
    /// The `Content-Length` header, if it is a number.
    pub content_length: Option<u64>,
    /// The `Authorization` header.
    pub authorization: Option<&'a [u8]>,
    /// The `X-ATP-Key` header.
    pub endpoint_key: Option<&'a [u8]>,
    /// The `Host` header (the MCP endpoints' DNS-rebinding check).
    pub host: Option<&'a [u8]>,
    /// The `Origin` header (the same check).
    pub origin: Option<&'a [u8]>,
    /// The `Accept` header.
    pub accept: Option<&'a [u8]>,
    /// The `MCP-Protocol-Version` header.
    pub mcp_protocol_version: Option<&'a [u8]>,
    /// The W3C `traceparent` header: a tool call's `atp.tool` span joins
    /// its trace (a malformed one is ignored).
    pub traceparent: Option<&'a [u8]>,
    /// The W3C `tracestate` header.
    pub tracestate: Option<&'a [u8]>,
}

impl fmt::Debug for RequestHead<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hidden = |v: Option<&[u8]>| v.map(|_| "***");
        f.debug_struct("RequestHead")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &self.query)
            .field(
                "content_type",
                &self.content_type.map(String::from_utf8_lossy),
            )
            .field("content_length", &self.content_length)
            .field("authorization", &hidden(self.authorization))
            .field("endpoint_key", &hidden(self.endpoint_key))
            .field("host", &self.host.map(String::from_utf8_lossy))
            .field("origin", &self.origin.map(String::from_utf8_lossy))
            .field("accept", &self.accept.map(String::from_utf8_lossy))
            .field(
                "mcp_protocol_version",
                &self.mcp_protocol_version.map(String::from_utf8_lossy),
            )
            .field(
                "traceparent",
                &self.traceparent.map(String::from_utf8_lossy),
            )
            .field("tracestate", &self.tracestate.map(String::from_utf8_lossy))
            .finish()
    }
}

impl<'a> RequestHead<'a> {
    /// Builds a head from the method, raw path and query, and a function
    /// that returns a header's value by its lowercase name (one of
    /// [`HEADERS`]).
    ///
    /// A header whose value is not UTF-8 is taken as absent: Rocket drops
    /// such headers before any handler runs, so every adapter must, or they
    /// would disagree (a `Content-Type` of `application/\xFF` would be 415
    /// in one and read as JSON in another).
    ///
    /// ```
    /// use atp_registry::http::RequestHead;
    ///
    /// let head = RequestHead::new("POST", "/atp/kit/tool/", None, |name| match name {
    ///     "content-type" => Some(&b"application/\xFF"[..]),
    ///     "authorization" => Some(&b"Bearer t"[..]),
    ///     _ => None,
    /// });
    /// assert_eq!(head.content_type, None);
    /// assert_eq!(head.authorization, Some(&b"Bearer t"[..]));
    /// // `Debug` hides the values of `Authorization` and `X-ATP-Key`.
    /// assert!(format!("{head:?}").contains(r#"authorization: Some("***")"#));
    /// ```
    pub fn new(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        header: impl Fn(&'static str) -> Option<&'a [u8]>,
    ) -> Self {
        Self::from_found(method, path, query, HEADERS.map(header))
    }

    /// Builds a head from the method, raw path and query, and the request's
    /// headers as (name, value) pairs in the order received: one pass over
    /// them instead of a lookup per name. Names are compared ignoring ASCII
    /// case, the first value of a name is the one read (as a header map's
    /// `get` does), and the rules of [`RequestHead::new`] apply.
    ///
    /// ```
    /// use atp_registry::http::RequestHead;
    ///
    /// let headers = [
    ///     ("Host", &b"localhost"[..]),
    ///     ("Content-Type", b"application/json"),
    ///     ("content-length", b"17"),
    ///     ("content-type", b"text/plain"),
    /// ];
    /// let head = RequestHead::from_headers("POST", "/atp/kit/tool/", None, headers);
    /// assert_eq!(head.content_type, Some(&b"application/json"[..]));
    /// assert_eq!(head.content_length, Some(17));
    /// assert_eq!(head.authorization, None);
    /// ```
    pub fn from_headers(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Self {
        let mut found: [Option<&'a [u8]>; HEADERS.len()] = [None; HEADERS.len()];
        for (name, value) in headers {
            if let Some(i) = HEADERS.iter().position(|h| h.eq_ignore_ascii_case(name)) {
                found[i].get_or_insert(value);
            }
        }
        Self::from_found(method, path, query, found)
    }

    /// The head from the values of [`HEADERS`], in that order: a value that
    /// is not UTF-8 counts as absent.
    fn from_found(
        method: &'a str,
        path: &'a str,
        query: Option<&'a str>,
        found: [Option<&'a [u8]>; HEADERS.len()],
    ) -> Self {
        let [
            content_type,
            content_length,
            authorization,
            endpoint_key,
            host,
            origin,
            accept,
            mcp_protocol_version,
            traceparent,
            tracestate,
        ] = found.map(|v| v.filter(|v| std::str::from_utf8(v).is_ok()));
        Self {
            method,
            path,
            query,
            content_type,
            content_length: content_length
                .and_then(|v| std::str::from_utf8(v).ok())
                .and_then(|v| v.trim().parse().ok()),
            authorization,
            endpoint_key,
            host,
            origin,
            accept,
            mcp_protocol_version,
            traceparent,
            tracestate,
        }
    }

    /// The trace context of the `traceparent` and `tracestate` headers,
    /// if valid.
    pub fn trace(&self) -> Option<crate::trace::TraceContext> {
        let text = |v: Option<&'a [u8]>| v.and_then(|v| std::str::from_utf8(v).ok());
        crate::trace::TraceContext::from_fields(text(self.traceparent), text(self.tracestate))
    }
}

/// A request body, read chunk by chunk: what an adapter gives
/// [`Engine::serve`]. It need not be `Send` (actix-web's payload is not);
/// the future of `serve` is `Send` when the source's is.
pub trait BodySource {
    /// A chunk of the body.
    type Chunk: AsRef<[u8]>;

    /// The next chunk, `None` at the end, or `Err(())` when the body can not
    /// be read (the connection broke, a bad chunked encoding). `allowed` is
    /// how many more bytes the engine will take: a source may read up to one
    /// byte past it (so that an oversized body is noticed) and no further.
    fn next_chunk(
        &mut self,
        allowed: usize,
    ) -> impl Future<Output = Option<Result<Self::Chunk, ()>>>;
}

/// What the engine answers to a request head.
#[derive(Debug)]
pub enum Step {
    /// Send this response; do not read the body.
    Respond(Response),
    /// Read the body into [`PendingCall::body_buffer`], then
    /// [`PendingCall::run`] (or [`PendingCall::too_large`] when the buffer
    /// refuses a chunk).
    ReadBody(PendingCall),
}

/// An HTTP response: status, headers and a JSON body.
#[derive(Clone, PartialEq, Eq)]
pub struct Response {
    status: u16,
    allow: Option<&'static str>,
    /// `None`: no body (a 202).
    content_type: Option<&'static str>,
    body: Bytes,
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("allow", &self.allow)
            .field("body", &String::from_utf8_lossy(&self.body))
            .finish()
    }
}

impl Response {
    /// The content type of the answers (all of them but an MCP answer
    /// with notifications, and an MCP 202).
    pub const CONTENT_TYPE: &'static str = "application/json";

    fn json(status: u16, body: &impl Serialize) -> Self {
        // Serializing a `Value` or one of our structs can not fail.
        let body = serde_json::to_vec(body)
            .map(Bytes::from)
            .unwrap_or_default();
        Self {
            status,
            allow: None,
            content_type: Some(Self::CONTENT_TYPE),
            body,
        }
    }

    /// The error answer `{"error": message, "code": code}`.
    pub fn error(code: ErrorCode, message: &str) -> Self {
        Self::json(
            code.status(),
            &ErrorBody {
                error: message,
                code: code.as_str(),
            },
        )
    }

    fn method_not_allowed(allow: &'static str) -> Self {
        let mut r = Self::error(ErrorCode::MethodNotAllowed, "Method not allowed");
        r.allow = Some(allow);
        r
    }

    /// The HTTP status.
    pub fn status(&self) -> u16 {
        self.status
    }

    /// The headers to send (`Content-Type` — JSON, or server-sent events
    /// for an MCP answer with notifications; none on a 202 —, and `Allow`
    /// on a 405).
    pub fn headers(&self) -> impl Iterator<Item = (&'static str, &'static str)> + use<> {
        self.content_type
            .map(|c| ("content-type", c))
            .into_iter()
            .chain(self.allow.map(|a| ("allow", a)))
    }

    /// The JSON body (also for `HEAD`: frameworks drop it and keep its
    /// length).
    pub fn body(&self) -> &Bytes {
        &self.body
    }

    /// Takes the body.
    pub fn into_body(self) -> Bytes {
        self.body
    }
}

/// A `POST` to a tool that has passed every check that does not need the
/// body; read the body and [`run`](PendingCall::run) it.
pub struct PendingCall {
    client: ToolKitClient,
    kind: Pending,
    media: Media,
    header_token: Option<AuthToken>,
    limit: usize,
    size_hint: usize,
    /// The caller's trace context (the `traceparent` header).
    trace: Option<crate::trace::TraceContext>,
}

/// What a body is for.
enum Pending {
    /// A tool's ATP endpoint.
    Tool(Arc<RegisteredTool>),
    /// The toolkit's MCP endpoint: its `Accept` and `MCP-Protocol-Version`.
    #[cfg(feature = "mcp")]
    Mcp {
        accept: Option<Vec<u8>>,
        protocol_version: Option<Vec<u8>>,
    },
}

impl fmt::Debug for PendingCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tool = match &self.kind {
            Pending::Tool(t) => t.name(),
            #[cfg(feature = "mcp")]
            Pending::Mcp { .. } => "(MCP)",
        };
        f.debug_struct("PendingCall")
            .field("tool", &tool)
            .field("media", &self.media)
            .field("header_token", &self.header_token)
            .field("limit", &self.limit)
            .finish()
    }
}

/// A body buffer that refuses to grow past the toolkit's body limit.
#[derive(Debug)]
pub struct BodyBuffer {
    buf: BytesMut,
    limit: usize,
}

/// The body went over the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the request body is over the limit")]
pub struct TooLarge;

impl BodyBuffer {
    /// Appends a chunk, or refuses it when the body would go over the
    /// limit (then stop reading and answer [`PendingCall::too_large`]).
    pub fn push(&mut self, chunk: &[u8]) -> Result<(), TooLarge> {
        if chunk.len() > self.limit - self.buf.len() {
            return Err(TooLarge);
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    /// The body read so far.
    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

impl PendingCall {
    /// The body limit in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// A buffer for the body, bounded by the limit.
    pub fn body_buffer(&self) -> BodyBuffer {
        BodyBuffer {
            buf: BytesMut::with_capacity(self.size_hint.min(self.limit).min(64 * 1024)),
            limit: self.limit,
        }
    }

    /// The answer when the body is over the limit.
    pub fn too_large(self) -> Response {
        #[cfg(feature = "mcp")]
        if let Pending::Mcp { .. } = self.kind {
            return mcp_too_large(self.limit);
        }
        too_large(self.media, self.limit)
    }

    /// The answer when the body could not be read (the connection broke,
    /// a chunked encoding was malformed).
    pub fn read_failed(self) -> Response {
        Response::error(ErrorCode::InvalidBody, "Request body could not be read")
    }

    /// Parses the body and runs the tool (docs/PROTOCOL.md §3 steps 6 to 11).
    pub async fn run(self, body: &[u8]) -> Response {
        if body.len() > self.limit {
            return self.too_large();
        }
        // Without `mcp`, a tool is all there is to run.
        #[cfg_attr(not(feature = "mcp"), allow(clippy::infallible_destructuring_match))]
        let tool = match self.kind {
            Pending::Tool(tool) => tool,
            #[cfg(feature = "mcp")]
            Pending::Mcp {
                accept,
                protocol_version,
            } => {
                let head = crate::mcp::McpHead {
                    accept: accept.as_deref(),
                    protocol_version: protocol_version.as_deref(),
                    bearer: self.header_token.as_ref(),
                };
                return Response::from_mcp(
                    crate::mcp::handle(&crate::mcp::ToolkitMcp(&self.client), &head, body).await,
                );
            }
        };
        let mut params = if body.is_empty() {
            Map::new()
        } else {
            let parsed = match self.media {
                Media::Unsupported => return unsupported_media_type(),
                Media::Json => parse_json_object(body),
                Media::Form => parse_form(body),
            };
            match parsed {
                Ok(p) => p,
                Err(message) => return Response::error(ErrorCode::InvalidBody, &message),
            }
        };
        // A scan of the keys is cheaper than hashing for the few params a
        // call has, and most calls have no `auth_token`.
        let has_token = params.keys().any(|k| k == AUTH_TOKEN_PARAM);
        let token = match has_token
            .then(|| params.shift_remove(AUTH_TOKEN_PARAM))
            .flatten()
        {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(Secret::new(s)),
            Some(_) => {
                return Response::error(ErrorCode::InvalidBody, "auth_token must be a string");
            }
        };
        let token = token.or(self.header_token);
        // The same span as the WebSocket runtime's, in the caller's trace.
        let span = tracing::info_span!(
            "atp.tool",
            toolkit = self.client.app_name(),
            tool = tool.name(),
            trace_id = tracing::field::Empty,
        );
        crate::trace::link(&span, self.trace.as_ref());
        match tracing::Instrument::instrument(
            tool.call(&self.client, params, token, Default::default()),
            span,
        )
        .await
        {
            Ok(result) => Response::json(200, &ToolResult { result: &result }),
            Err(e) => Response::error(e.code(), &e.to_string()),
        }
    }
}

/// How the body is encoded, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Media {
    Json,
    Form,
    Unsupported,
}

fn media(content_type: Option<&[u8]>) -> Media {
    let Some(raw) = content_type else {
        return Media::Json;
    };
    // The common case, without parsing.
    if raw.eq_ignore_ascii_case(b"application/json") {
        return Media::Json;
    }
    let Ok(raw) = std::str::from_utf8(raw) else {
        return Media::Unsupported;
    };
    if raw.trim().is_empty() {
        return Media::Json;
    }
    let mut parts = raw.split(';');
    let essence = parts.next().unwrap_or("").trim();
    let media = if essence.eq_ignore_ascii_case("application/json") {
        Media::Json
    } else if essence.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        Media::Form
    } else {
        return Media::Unsupported;
    };
    for param in parts {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if name.trim().eq_ignore_ascii_case("charset") {
            let value = value.trim().trim_matches('"');
            if !(value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")) {
                return Media::Unsupported;
            }
        }
    }
    media
}

/// The rest of `path` when it is `base` or under it.
#[cfg(feature = "mcp")]
fn under<'p>(path: &'p str, base: &str) -> Option<&'p str> {
    path.strip_prefix(base)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
}

#[cfg(feature = "mcp")]
fn mcp_too_large(limit: usize) -> Response {
    Response::from_mcp(crate::mcp::McpAnswer::http_error(
        413,
        -32000,
        &format!("Request body is larger than the limit of {limit} bytes"),
        "payload_too_large",
    ))
}

#[cfg(feature = "mcp")]
impl Response {
    fn from_mcp(a: crate::mcp::McpAnswer) -> Self {
        Self {
            status: a.status,
            allow: None,
            content_type: a.content_type,
            body: a.body,
        }
    }
}

fn unsupported_media_type() -> Response {
    Response::error(
        ErrorCode::UnsupportedMediaType,
        "Unsupported media type: send application/json (UTF-8) or application/x-www-form-urlencoded",
    )
}

fn too_large(media: Media, limit: usize) -> Response {
    if media == Media::Unsupported {
        return unsupported_media_type();
    }
    Response::error(
        ErrorCode::PayloadTooLarge,
        &format!("Request body is larger than the limit of {limit} bytes"),
    )
}

/// A JSON object whose top-level keys are all distinct.
struct UniqueObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = UniqueObject;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<UniqueObject, A::Error> {
                let mut map = Map::new();
                while let Some(key) = access.next_key::<String>()? {
                    match map.entry(key) {
                        serde_json::map::Entry::Occupied(taken) => {
                            return Err(serde::de::Error::custom(format_args!(
                                "duplicate key {:?}",
                                taken.key()
                            )));
                        }
                        serde_json::map::Entry::Vacant(slot) => {
                            slot.insert(access.next_value::<Value>()?);
                        }
                    }
                }
                Ok(UniqueObject(map))
            }
        }
        d.deserialize_map(V)
    }
}

fn parse_json_object(body: &[u8]) -> Result<Map<String, Value>, String> {
    match serde_json::from_slice::<UniqueObject>(body) {
        Ok(UniqueObject(map)) => Ok(map),
        Err(e) => Err(match e.classify() {
            serde_json::error::Category::Data => {
                let text = e.to_string();
                if text.starts_with("duplicate key") {
                    format!(
                        "Request body repeats a key: {}",
                        text.split(" at line").next().unwrap_or(&text)
                    )
                } else {
                    "Request body must be a JSON object".to_owned()
                }
            }
            _ => format!(
                "Request body is not valid JSON (line {}, column {})",
                e.line(),
                e.column()
            ),
        }),
    }
}

fn form_decode(raw: &[u8]) -> Result<String, String> {
    let plus_as_space: Cow<'_, [u8]> = if raw.contains(&b'+') {
        Cow::Owned(
            raw.iter()
                .map(|&b| if b == b'+' { b' ' } else { b })
                .collect(),
        )
    } else {
        Cow::Borrowed(raw)
    };
    let decoded: Cow<'_, [u8]> = percent_decode(&plus_as_space).into();
    String::from_utf8(decoded.into_owned()).map_err(|_| "Form field is not valid UTF-8".to_owned())
}

fn parse_form(body: &[u8]) -> Result<Map<String, Value>, String> {
    let mut map = Map::new();
    for pair in body.split(|&b| b == b'&').filter(|p| !p.is_empty()) {
        let (k, v) = match pair.iter().position(|&b| b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &[][..]),
        };
        let key = form_decode(k)?;
        let value = form_decode(v)?;
        if map.contains_key(&key) {
            return Err(format!("Form field {key:?} is repeated"));
        }
        map.insert(key, Value::String(value));
    }
    Ok(map)
}

/// The shape of a path below the prefix.
enum Route<'p> {
    Root,
    Toolkit(&'p str),
    Tool(&'p str, &'p str),
    NotFound,
}

fn decode_segment(seg: &str) -> Option<Cow<'_, str>> {
    // Without a `%` there is nothing to decode (and `seg` is UTF-8 already).
    if !seg.as_bytes().contains(&b'%') {
        return Some(Cow::Borrowed(seg));
    }
    percent_decode(seg.as_bytes()).decode_utf8().ok()
}

fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<Cow<'q, str>> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = form_decode(k.as_bytes()).ok()?;
        if key == name {
            Some(
                form_decode(v.as_bytes())
                    .map(Cow::Owned)
                    .unwrap_or(Cow::Borrowed("\u{fffd}")),
            )
        } else {
            None
        }
    })
}

fn bearer_token(authorization: Option<&[u8]>) -> Option<AuthToken> {
    let value = std::str::from_utf8(authorization?).ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    (!token.is_empty()).then(|| Secret::new(token))
}

impl Engine {
    /// The endpoints over the global registry, under `/atp`.
    pub fn new() -> Self {
        Self::with_registry(Registry::global().clone())
    }

    /// The endpoints over `registry`, under `/atp`.
    pub fn with_registry(registry: Registry) -> Self {
        Self {
            registry,
            prefix: Arc::from(DEFAULT_PREFIX),
            #[cfg(feature = "mcp")]
            mcp: Some(Arc::new(McpSettings {
                path: Arc::from(DEFAULT_MCP_PATH),
                allowed_hosts: crate::mcp::loopback_hosts(),
            })),
        }
    }

    /// Mounts the endpoints under `prefix` instead of `/atp` (a leading
    /// `/` is added and a trailing one dropped; `""` or `"/"` is the root).
    pub fn prefix(mut self, prefix: impl AsRef<str>) -> Self {
        let p = prefix.as_ref().trim_matches('/');
        self.prefix = if p.is_empty() {
            Arc::from("")
        } else {
            Arc::from(format!("/{p}"))
        };
        self
    }

    /// Mounts the MCP endpoints at `{path}/{toolkit}` instead of
    /// `/mcp/{toolkit}` (a leading `/` is added and a trailing one
    /// dropped; it may not be the root).
    #[cfg(feature = "mcp")]
    pub fn mcp_path(mut self, path: impl AsRef<str>) -> Self {
        let p = path.as_ref().trim_matches('/');
        let p = if p.is_empty() { "mcp" } else { p };
        let hosts = self.mcp_hosts();
        self.mcp = Some(Arc::new(McpSettings {
            path: Arc::from(format!("/{p}")),
            allowed_hosts: hosts,
        }));
        self
    }

    /// Serves no MCP endpoints.
    #[cfg(feature = "mcp")]
    pub fn without_mcp(mut self) -> Self {
        self.mcp = None;
        self
    }

    /// The host names the MCP endpoints answer (their `Host` header, and
    /// the `Origin` header's host when there is one): loopback only
    /// (`localhost`, `127.0.0.1`, `::1`) by default, so that a web page
    /// can not make a browser talk to a local MCP server (DNS rebinding).
    /// Give the names a public server is reached by; `"*"` allows any.
    #[cfg(feature = "mcp")]
    pub fn mcp_allowed_hosts<S: AsRef<str>>(mut self, hosts: impl IntoIterator<Item = S>) -> Self {
        let path = self
            .mcp
            .as_ref()
            .map_or_else(|| Arc::from(DEFAULT_MCP_PATH), |m| m.path.clone());
        self.mcp = Some(Arc::new(McpSettings {
            path,
            allowed_hosts: hosts.into_iter().map(|h| Arc::from(h.as_ref())).collect(),
        }));
        self
    }

    #[cfg(feature = "mcp")]
    fn mcp_hosts(&self) -> Vec<Arc<str>> {
        self.mcp
            .as_ref()
            .map_or_else(crate::mcp::loopback_hosts, |m| m.allowed_hosts.clone())
    }

    /// Where the MCP endpoints are (`/mcp` by default), or `None` when
    /// they are switched off.
    pub fn get_mcp_path(&self) -> Option<&str> {
        #[cfg(feature = "mcp")]
        return self.mcp.as_ref().map(|m| &*m.path);
        #[cfg(not(feature = "mcp"))]
        None
    }

    /// The prefix, without a trailing slash (`""` for the root).
    pub fn get_prefix(&self) -> &str {
        &self.prefix
    }

    /// The registry served.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Whether `path` is under the prefix (the prefix itself included).
    pub fn is_under_prefix(&self, path: &str) -> bool {
        path.strip_prefix(&*self.prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    }

    fn route<'p>(&self, path: &'p str) -> Route<'p> {
        let Some(rest) = path.strip_prefix(&*self.prefix) else {
            return Route::NotFound;
        };
        if rest.is_empty() || rest == "/" {
            return Route::Root;
        }
        let Some(rest) = rest.strip_prefix('/') else {
            return Route::NotFound;
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        match rest.split_once('/') {
            None if !rest.is_empty() => Route::Toolkit(rest),
            Some((k, t)) if !k.is_empty() && !t.is_empty() && !t.contains('/') => Route::Tool(k, t),
            _ => Route::NotFound,
        }
    }

    /// Answers a request head: at once (every check of docs/PROTOCOL.md §3 that
    /// needs no body, in the spec's order), or with a [`PendingCall`] that
    /// wants the body.
    pub fn begin(&self, req: &RequestHead<'_>) -> Step {
        #[cfg(feature = "mcp")]
        if let Some(mcp) = &self.mcp
            && let Some(rest) = under(req.path, &mcp.path)
        {
            return self.begin_mcp(mcp, rest, req);
        }
        Step::Respond(match self.route(req.path) {
            Route::NotFound => Response::error(ErrorCode::NotFound, "Not found"),
            Route::Root => match req.method {
                "GET" | "HEAD" => self.list_toolkits(),
                _ => Response::method_not_allowed(ALLOW_READ),
            },
            Route::Toolkit(raw) => {
                let client = match self.toolkit(raw, req) {
                    Ok(c) => c,
                    Err(r) => return Step::Respond(r),
                };
                match req.method {
                    "GET" | "HEAD" => toolkit_context(raw, &client, req.query),
                    _ => Response::method_not_allowed(ALLOW_READ),
                }
            }
            Route::Tool(raw_kit, raw_tool) => {
                let client = match self.toolkit(raw_kit, req) {
                    Ok(c) => c,
                    Err(r) => return Step::Respond(r),
                };
                let Some(tool) = decode_segment(raw_tool).and_then(|n| client.tool(&n)) else {
                    return Step::Respond(Response::error(
                        ErrorCode::ToolNotFound,
                        "Tool not found",
                    ));
                };
                match req.method {
                    "GET" | "HEAD" => Response::json(200, &tool.context()),
                    // An interactive app keeps a session through the ATP
                    // server; it is described here but not called.
                    _ if tool.is_app() => {
                        let mut r = Response::error(
                            ErrorCode::MethodNotAllowed,
                            &format!(
                                "{} is an interactive app: start it with an app request through the ATP server; it can not be called as a tool",
                                tool.name()
                            ),
                        );
                        r.allow = Some(ALLOW_READ);
                        r
                    }
                    "POST" => {
                        let media = media(req.content_type);
                        let limit = client.body_limit();
                        let declared = req.content_length.unwrap_or(0);
                        if declared > limit as u64 {
                            too_large(media, limit)
                        } else {
                            return Step::ReadBody(PendingCall {
                                header_token: bearer_token(req.authorization),
                                trace: req.trace(),
                                limit,
                                size_hint: declared as usize,
                                client,
                                kind: Pending::Tool(tool),
                                media,
                            });
                        }
                    }
                    _ => Response::method_not_allowed(ALLOW_TOOL),
                }
            }
        })
    }

    /// Answers a request: the head at once when it decides the answer
    /// (the body is then never read), else the body read from `body` up to
    /// the toolkit's limit — reading stops as soon as the limit is passed —
    /// and the tool's answer.
    pub async fn serve<B: BodySource>(&self, req: &RequestHead<'_>, mut body: B) -> Response {
        let pending = match self.begin(req) {
            Step::Respond(r) => return r,
            Step::ReadBody(pending) => pending,
        };
        let mut buf = pending.body_buffer();
        loop {
            let allowed = buf.limit - buf.buf.len();
            match body.next_chunk(allowed).await {
                None => break,
                Some(Err(())) => return pending.read_failed(),
                Some(Ok(chunk)) => {
                    if buf.push(chunk.as_ref()).is_err() {
                        return pending.too_large();
                    }
                }
            }
        }
        pending.run(&buf.finish()).await
    }

    /// Answers a whole request whose body is already in memory: [`begin`]
    /// then [`PendingCall::run`]. Adapters stream the body instead; this is
    /// for tests, fuzzing and servers that buffer anyway.
    ///
    /// [`begin`]: Engine::begin
    pub async fn handle(&self, req: &RequestHead<'_>, body: &[u8]) -> Response {
        match self.begin(req) {
            Step::Respond(r) => r,
            Step::ReadBody(pending) => {
                let mut buf = pending.body_buffer();
                match buf.push(body) {
                    Ok(()) => pending.run(&buf.finish()).await,
                    Err(TooLarge) => pending.too_large(),
                }
            }
        }
    }

    /// An MCP endpoint's request (`rest`: the path after the MCP path).
    #[cfg(feature = "mcp")]
    fn begin_mcp(&self, mcp: &McpSettings, rest: &str, req: &RequestHead<'_>) -> Step {
        use crate::mcp::{McpAnswer, host_allowed};
        let refuse = |status: u16, code: i32, message: &str, atp: &str| {
            Step::Respond(Response::from_mcp(McpAnswer::http_error(
                status, code, message, atp,
            )))
        };
        // DNS rebinding: a page elsewhere must not reach a local server.
        let host_ok = req.host.is_none_or(|h| host_allowed(h, &mcp.allowed_hosts));
        let origin_ok = req
            .origin
            .is_none_or(|o| o == b"null" || host_allowed(o, &mcp.allowed_hosts));
        if !host_ok || !origin_ok {
            return refuse(
                403,
                -32000,
                "Forbidden: this host or origin is not allowed",
                "forbidden_host",
            );
        }
        let raw = rest.trim_matches('/');
        if raw.is_empty() || raw.contains('/') {
            return refuse(
                404,
                -32000,
                "Not found: the MCP endpoints are at /mcp/{toolkit}",
                "not_found",
            );
        }
        let client = match self.toolkit(raw, req) {
            Ok(c) => c,
            Err(r) => {
                let status = r.status();
                let (code, message) = match status {
                    401 => (
                        "unauthorized",
                        "This toolkit requires a valid X-ATP-Key header",
                    ),
                    _ => ("toolkit_not_found", "Toolkit not found"),
                };
                return refuse(status, -32000, message, code);
            }
        };
        if req.method != "POST" {
            let mut r = Response::from_mcp(McpAnswer::http_error(
                405,
                -32000,
                "Method not allowed: this MCP endpoint is sessionless and takes POST only",
                "method_not_allowed",
            ));
            r.allow = Some(ALLOW_MCP);
            return Step::Respond(r);
        }
        let media = media(req.content_type);
        if media != Media::Json || req.content_type.is_none() {
            return refuse(
                415,
                -32000,
                "Unsupported media type: send application/json",
                "unsupported_media_type",
            );
        }
        let limit = client.body_limit();
        let declared = req.content_length.unwrap_or(0);
        if declared > limit as u64 {
            return Step::Respond(mcp_too_large(limit));
        }
        Step::ReadBody(PendingCall {
            header_token: bearer_token(req.authorization),
            trace: None,
            limit,
            size_hint: declared as usize,
            client,
            kind: Pending::Mcp {
                accept: req.accept.map(<[u8]>::to_vec),
                protocol_version: req.mcp_protocol_version.map(<[u8]>::to_vec),
            },
            media,
        })
    }

    /// The toolkit of a raw path segment, after its endpoint key check.
    fn toolkit(&self, raw: &str, req: &RequestHead<'_>) -> Result<ToolKitClient, Response> {
        let client = decode_segment(raw)
            .and_then(|name| self.registry.get_client(&name))
            .ok_or_else(|| Response::error(ErrorCode::ToolkitNotFound, "Toolkit not found"))?;
        if let Some(key) = client.endpoint_key()
            && !req.endpoint_key.is_some_and(|given| key.matches(given))
        {
            return Err(Response::error(
                ErrorCode::Unauthorized,
                "This toolkit requires a valid X-ATP-Key header",
            ));
        }
        Ok(client)
    }

    fn list_toolkits(&self) -> Response {
        let toolkits = self
            .registry
            .list_clients()
            .into_iter()
            .filter(|(_, c)| c.endpoint_key().is_none())
            .map(|(name, c)| ToolkitSummary {
                app_name: c.app_name().to_owned(),
                tools: c.tool_count(),
                toolkit: name,
            })
            .collect();
        Response::json(200, &ToolkitList { toolkits })
    }
}

fn toolkit_context(raw_name: &str, client: &ToolKitClient, query: Option<&str>) -> Response {
    let name = decode_segment(raw_name).unwrap_or(Cow::Borrowed(raw_name));
    match query_param(query, "provider") {
        None => {
            let tools: Vec<_> = client
                .registered_tools()
                .iter()
                .map(|t| t.context())
                .collect();
            Response::json(
                200,
                &ToolkitTools {
                    toolkit: name.into_owned(),
                    app_name: client.app_name().to_owned(),
                    provider: None,
                    tools,
                },
            )
        }
        Some(sent) => match sent.parse::<Provider>() {
            Err(e) => Response::error(ErrorCode::UnknownProvider, &e.to_string()),
            Ok(provider) => {
                let strict = query_param(query, "strict").is_some_and(|s| s == "true");
                json_toolkit_for(&name, client, &sent, provider, strict)
            }
        },
    }
}

fn json_toolkit_for(
    name: &str,
    client: &ToolKitClient,
    sent: &str,
    provider: Provider,
    strict: bool,
) -> Response {
    Response::json(
        200,
        &ToolkitTools {
            toolkit: name.to_owned(),
            app_name: client.app_name().to_owned(),
            provider: Some(sent.to_owned()),
            tools: client.tool_schemas(provider, strict),
        },
    )
}

#[cfg(test)]
mod tests;
