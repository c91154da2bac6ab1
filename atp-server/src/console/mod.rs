//! The console at `/console`: a page to see the toolkits, try their tools
//! from their schemas and follow the calls as they happen.
//!
//! The page is a static shell (HTML, one hand-written script, one style
//! sheet, all in the binary): it holds no data and no secret, and is
//! served to anyone while the admin API is on (404 when it is off). All
//! data comes from the JSON endpoints under `/admin/...`, each behind
//! [`admin::require`]; the script sends the admin key that the user typed
//! (kept in the tab's `sessionStorage`) as `Authorization: Bearer`. In
//! dev mode the page asks for no key.

use std::sync::Arc;

use atp_registry::{Provider, Secret};
use axum::{
    body::Body,
    extract::{Path, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::{
    admin::{self, Refused},
    error::{ApiError, json_response},
    hub::Route,
    llm::{ToolCall, call_tool},
    read_object,
    store::ToolkitRecord,
};

/// The page.
const INDEX_HTML: &str = include_str!("index.html");
/// Its script.
const CONSOLE_JS: &str = include_str!("console.js");
/// Its style sheet.
const CONSOLE_CSS: &str = include_str!("console.css");

/// Who the server takes a call from the console to be, as an LLM key
/// hash: no LLM key's (a user's stored OAuth token goes with a chosen
/// connection, under its own LLM key).
const CONSOLE_CALLER: &str = "atp-server/console";

/// What the page may load and where it may connect: itself only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

/// A static file of the page, with its type and the page's policy.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    let mut r = Response::new(Body::from(body));
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// Whether the console is on: the admin API is (a key may still be
/// needed for its data).
fn console_on(s: &crate::State, headers: &HeaderMap) -> bool {
    !matches!(admin::require(s, headers), Err(Refused::Off))
}

/// `GET /console`: the page (404 when the admin API is off). In dev mode
/// it is told not to ask for a key.
pub(crate) async fn page(State(s): State<Arc<crate::State>>, headers: HeaderMap) -> Response {
    if !console_on(&s, &headers) {
        return Refused::Off.into_response();
    }
    let mode = if s.config.dev { "dev" } else { "keyed" };
    let html = INDEX_HTML.replacen("data-mode=\"keyed\"", &format!("data-mode=\"{mode}\""), 1);
    let mut r = asset("text/html; charset=utf-8", "");
    *r.body_mut() = Body::from(html);
    r
}

/// `GET /console/console.js`.
pub(crate) async fn script(State(s): State<Arc<crate::State>>, headers: HeaderMap) -> Response {
    if !console_on(&s, &headers) {
        return Refused::Off.into_response();
    }
    asset("text/javascript; charset=utf-8", CONSOLE_JS)
}

/// `GET /console/console.css`.
pub(crate) async fn style(State(s): State<Arc<crate::State>>, headers: HeaderMap) -> Response {
    if !console_on(&s, &headers) {
        return Refused::Off.into_response();
    }
    asset("text/css; charset=utf-8", CONSOLE_CSS)
}

/// A toolkit as the console shows it.
#[derive(Serialize)]
struct ToolkitView {
    name: String,
    language: String,
    public: bool,
    /// Reachable now: connected here or to another server, or with an
    /// endpoint URL.
    connected: bool,
    /// `websocket`, `inbox`, `endpoint` or `remote` (another server).
    transport: Option<&'static str>,
    /// `this`, or the id of the other server that serves it.
    instance: Option<String>,
    /// Since when it is connected here (ms since the Unix epoch).
    since_ms: Option<i64>,
    /// The origin of its endpoint URL (no path, query or credentials).
    endpoint: Option<String>,
    tools: Vec<ToolView>,
}

/// A tool as the console shows it.
#[derive(Serialize)]
struct ToolView {
    name: String,
    description: String,
    input_schema: Value,
    /// The OAuth platform (or other provider) whose token it needs.
    auth_provider: Option<String>,
    auth_type: Option<String>,
    /// Whether `auth_provider` is an OAuth platform of this server: then
    /// a user's stored connection can give the token.
    oauth_platform: bool,
}

/// Only the scheme, host and port of a URL.
fn origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit('@').next().unwrap_or_default();
    if scheme.is_empty() {
        host.to_owned()
    } else {
        format!("{scheme}://{host}")
    }
}

fn view(s: &crate::State, kit: &ToolkitRecord) -> ToolkitView {
    // As a call would go (`call_tool`): its WebSocket, its endpoint, its
    // inbox, another server.
    let since = s.hub.presence(&kit.key_hash).map(|(_, since)| since);
    let (transport, instance, since_ms) =
        match s.hub.route(&kit.key_hash, kit.endpoint_url.is_some()) {
            Some(Route::Socket) => (Some("websocket"), Some("this".to_owned()), since),
            Some(Route::Inbox) => (Some("inbox"), Some("this".to_owned()), since),
            Some(Route::Endpoint) => (Some("endpoint"), None, None),
            None => match s.bus.as_ref().and_then(|b| b.serving_peer(&kit.key_hash)) {
                Some(peer) => (Some("remote"), Some(peer), None),
                None => (None, None, None),
            },
        };
    ToolkitView {
        name: kit.app_name.clone(),
        language: kit.language.clone(),
        public: s.catalog.is_public(&kit.key_hash, &kit.app_name),
        connected: transport.is_some(),
        transport,
        instance,
        since_ms,
        endpoint: kit.endpoint_url.as_deref().map(origin),
        tools: kit
            .tools
            .iter()
            .map(|t| ToolView {
                name: t.spec.name.clone(),
                description: t.spec.description.clone(),
                input_schema: t.spec.input_schema.clone(),
                oauth_platform: t
                    .spec
                    .auth_provider
                    .as_deref()
                    .is_some_and(|p| s.platform(p).is_some()),
                auth_provider: t.spec.auth_provider.clone(),
                auth_type: t.spec.auth_type.clone(),
            })
            .collect(),
    }
}

/// `GET /admin/toolkits`: every registered toolkit, its tools and how it
/// is connected, by name.
pub(crate) async fn toolkits(State(s): State<Arc<crate::State>>, headers: HeaderMap) -> Response {
    if let Err(refused) = admin::require(&s, &headers) {
        return refused.into_response();
    }
    let kits: Vec<Arc<ToolkitRecord>> = s
        .toolkits
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    let mut views: Vec<ToolkitView> = kits.iter().map(|k| view(&s, k)).collect();
    views.sort_by(|a, b| a.name.cmp(&b.name));
    json_response(
        StatusCode::OK,
        &json!({
            "dev": s.config.dev,
            "instance": s.bus.as_ref().map(|b| b.id().to_owned()),
            "toolkits": views,
        }),
    )
}

/// The toolkit and tool named in a path, or a 404.
fn find_tool(
    s: &crate::State,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<(Arc<ToolkitRecord>, usize), ApiError> {
    let Ok(Path((toolkit, tool))) = path else {
        return Err(ApiError::not_found("not_found", "Not found"));
    };
    let kit = s
        .toolkit(&toolkit)
        .ok_or_else(|| ApiError::not_found("toolkit_not_found", "Toolkit not found"))?;
    let i = kit
        .tools
        .iter()
        .position(|t| t.spec.name == tool)
        .ok_or_else(|| ApiError::not_found("tool_not_found", "Tool not found"))?;
    Ok((kit, i))
}

/// `GET /admin/toolkits/{toolkit}/tools/{tool}/formats`: the tool as each
/// provider wants it (`openai`, `openai_chat`, `anthropic`, `mistral`) and
/// as an entry of MCP's `tools/list`.
pub(crate) async fn formats(
    State(s): State<Arc<crate::State>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = admin::require(&s, &headers) {
        return refused.into_response();
    }
    let (kit, i) = match find_tool(&s, path) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let spec = &kit.tools[i].spec;
    let mut out = Map::new();
    for (name, provider) in [
        ("openai", Provider::OpenAi),
        ("openai_chat", Provider::OpenAiChat),
        ("anthropic", Provider::Anthropic),
        ("mistral", Provider::Mistral),
    ] {
        out.insert(name.into(), spec.provider_schema(provider, false));
    }
    let mcp = serde_json::to_value(atp_registry::mcp::tool_description(spec)).unwrap_or_default();
    out.insert("mcp".into(), mcp);
    json_response(StatusCode::OK, &out)
}

/// `POST /admin/toolkits/{toolkit}/tools/{tool}/call`: runs a tool the way
/// an LLM client's call runs ([`call_tool`]: it shows in the metrics and
/// the live calls). The body: `{"arguments": {…}, "auth_token": "…"}`
/// (the token optional). The answer, 200 whatever the tool did:
/// `{"ok": true, "result": …, "duration_ms": …}` or `{"ok": false,
/// "error": {"code", "message"}, "duration_ms": …}`.
pub(crate) async fn call(
    State(s): State<Arc<crate::State>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(refused) = admin::require(&s, &headers) {
        return refused.into_response();
    }
    let (kit, i) = match find_tool(&s, path) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let mut body = match read_object(body, &s.config).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let params = match body.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return ApiError::bad_request("invalid_body", "arguments must be a JSON object")
                .into_response();
        }
    };
    let auth_token = match body.get("auth_token") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if t.is_empty() => None,
        Some(Value::String(t)) => Some(Secret::from(t.as_str())),
        Some(_) => {
            return ApiError::bad_request("invalid_body", "auth_token must be a string")
                .into_response();
        }
    };
    let call = ToolCall {
        function: &kit.tools[i].spec.name,
        params,
        auth_token,
        user: None,
        logs: false,
    };
    let started = std::time::Instant::now();
    let outcome = call_tool(&s, CONSOLE_CALLER, &kit, call, None).await;
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let answer = match outcome {
        Ok(result) => json!({"ok": true, "result": result, "duration_ms": duration_ms}),
        Err(f) => json!({
            "ok": false,
            "error": {"code": f.code, "message": f.message},
            "duration_ms": duration_ms,
        }),
    };
    json_response(StatusCode::OK, &answer)
}

#[cfg(test)]
mod tests {
    use super::origin;

    #[test]
    fn an_endpoint_shows_only_its_origin() {
        assert_eq!(
            origin("https://user:pw@example.com:8443/x/y?key=secret#f"),
            "https://example.com:8443"
        );
        assert_eq!(origin("http://127.0.0.1:9/atp"), "http://127.0.0.1:9");
        assert_eq!(origin("no-scheme/path"), "no-scheme");
        assert_eq!(origin(""), "");
    }
}
