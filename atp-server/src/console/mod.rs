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
    admin::{self, Admin, Refused},
    audit::Via,
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
                    .is_some_and(|p| platforms(s).iter().any(|q| q.provider() == p)),
                auth_provider: t.spec.auth_provider.clone(),
                auth_type: t.spec.auth_type.clone(),
            })
            .collect(),
    }
}

/// `GET /admin/toolkits`: every registered toolkit, its tools and how it
/// is connected, by name.
pub(crate) async fn toolkits(State(s): State<Arc<crate::State>>, _admin: Admin) -> Response {
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
    _admin: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
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

/// The body of a console request that runs a tool (a call or an app's
/// start): the object itself, its `arguments` (an object; none: empty)
/// and its `auth_token` (a string; none or empty: none).
async fn read_tool_body(
    s: &crate::State,
    body: Body,
) -> Result<(Map<String, Value>, Map<String, Value>, Option<Secret>), ApiError> {
    let mut body = read_object(body, &s.config).await?;
    let arguments = match body.remove("arguments") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "arguments must be a JSON object",
            ));
        }
    };
    let auth_token = match body.get("auth_token") {
        Some(Value::String(t)) if !t.is_empty() => Some(Secret::from(t.as_str())),
        None | Some(Value::Null | Value::String(_)) => None,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_body",
                "auth_token must be a string",
            ));
        }
    };
    Ok((body, arguments, auth_token))
}

/// `POST /admin/toolkits/{toolkit}/tools/{tool}/call`: runs a tool the way
/// an LLM client's call runs ([`call_tool`]: it shows in the metrics and
/// the live calls). The body: `{"arguments": {…}, "auth_token": "…"}`
/// (the token optional). The answer, 200 whatever the tool did:
/// `{"ok": true, "result": …, "duration_ms": …}` or `{"ok": false,
/// "error": {"code", "message"}, "duration_ms": …}`.
pub(crate) async fn call(
    State(s): State<Arc<crate::State>>,
    _admin: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Response {
    let (kit, i) = match find_tool(&s, path) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let (body, params, auth_token) = match read_tool_body(&s, body).await {
        Ok(read) => read,
        Err(e) => return e.into_response(),
    };
    // A user's stored connection (any LLM key's: the admin may use them
    // all) gives the token, as the server would give it to the tool.
    let auth_token = match (auth_token, body.get("connection")) {
        (Some(t), _) => Some(t),
        (None, None | Some(Value::Null)) => None,
        (None, Some(Value::String(id))) => match connection_token(&s, &kit.tools[i].spec, id).await
        {
            Ok(t) => Some(t),
            Err(e) => return e.into_response(),
        },
        (None, Some(_)) => {
            return ApiError::bad_request("invalid_body", "connection must be a string")
                .into_response();
        }
    };
    let call = ToolCall {
        function: &kit.tools[i].spec.name,
        params,
        auth_token,
        user: None,
        logs: false,
        admitted: None,
        trace: None,
        via: Via::AdminApi,
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

/// An app session's answer, as the LLM side gets it: `{"payload":
/// {"session_id", "ui_content", "terminated"}}` or `{"payload": {"error",
/// "code"}}`.
fn app_answer(a: &atp_registry::wire::AppResponse) -> Response {
    crate::error::json_text_response(StatusCode::OK, atp_registry::wire::to_json(a))
}

/// `POST /admin/toolkits/{toolkit}/tools/{tool}/app` with `{"arguments",
/// "auth_token"?}`: starts a session of the tool as an app (the server
/// does not know which tools are apps: the toolkit says), owned by the
/// console. 200 with the app's answer.
pub(crate) async fn app_start(
    State(s): State<Arc<crate::State>>,
    _admin: Admin,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Body,
) -> Response {
    let (kit, i) = match find_tool(&s, path) {
        Ok(found) => found,
        Err(e) => return e.into_response(),
    };
    let (_, parameters, auth_token) = match read_tool_body(&s, body).await {
        Ok(read) => read,
        Err(e) => return e.into_response(),
    };
    let payload = atp_registry::wire::AppStart {
        app: kit.tools[i].spec.name.clone(),
        parameters,
        auth_token,
    };
    let done = crate::llm::start_audited(
        &s,
        CONSOLE_CALLER,
        Via::AdminApi,
        &kit.app_name,
        Some(&kit),
        payload,
        None,
    )
    .await;
    app_answer(&crate::llm::app_started(None, done))
}

/// `POST /admin/apps/{session_id}/action` with `{"action_data"}`: a user's
/// action in a session the console started. 200 with the app's answer.
pub(crate) async fn app_action(
    State(s): State<Arc<crate::State>>,
    _admin: Admin,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    let Ok(Path(session_id)) = id else {
        return ApiError::not_found("not_found", "Not found").into_response();
    };
    let mut body = match read_object(body, &s.config).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let req = atp_registry::wire::AppActionRequest {
        request_id: None,
        payload: atp_registry::wire::SessionAction {
            session_id,
            action_data: body.remove("action_data").unwrap_or(Value::Null),
        },
        traceparent: None,
        tracestate: None,
    };
    let (done, _) = crate::llm::app_action(&s, CONSOLE_CALLER, Via::AdminApi, req).await;
    app_answer(&done)
}

/// `DELETE /admin/apps/{session_id}`: ends a session the console started.
/// 200 with the app's answer.
pub(crate) async fn app_end(
    State(s): State<Arc<crate::State>>,
    _admin: Admin,
    id: Result<Path<String>, PathRejection>,
) -> Response {
    let Ok(Path(session_id)) = id else {
        return ApiError::not_found("not_found", "Not found").into_response();
    };
    let req = atp_registry::wire::AppTerminateRequest {
        request_id: None,
        payload: atp_registry::wire::SessionRef { session_id },
    };
    app_answer(&crate::llm::app_terminate(&s, CONSOLE_CALLER, req).await)
}

/// The OAuth platforms, by id.
fn platforms(s: &crate::State) -> Vec<crate::OAuthPlatform> {
    let mut all: Vec<crate::OAuthPlatform> = s
        .platforms
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .cloned()
        .collect();
    all.sort_by(|a, b| a.id.cmp(&b.id));
    all
}

/// The access token of the stored connection `integration_id` for a
/// tool (refreshed if needed).
async fn connection_token(
    s: &crate::State,
    spec: &atp_registry::ToolSpec,
    integration_id: &str,
) -> Result<Secret, ApiError> {
    let Some(provider) = spec.auth_provider.as_deref() else {
        return Err(ApiError::bad_request(
            "invalid_body",
            "This tool takes no auth token",
        ));
    };
    let conn = s
        .store
        .list_connections()
        .await
        .map_err(|e| {
            tracing::error!("could not read the OAuth connections: {e}");
            ApiError::internal("The connections could not be read")
        })?
        .into_iter()
        .find(|c| c.integration_id == integration_id)
        .ok_or_else(|| ApiError::not_found("not_connected", "No such connection"))?;
    crate::oauth::token_for(s, &conn.llm_key_hash, provider, &conn.external_user_id)
        .await
        .map_err(|f| ApiError::new(StatusCode::BAD_GATEWAY, "oauth_refresh_failed", f.message))?
        .ok_or_else(|| {
            ApiError::bad_request(
                "not_connected",
                format!("This connection is not to a platform of {provider}"),
            )
        })
}

/// `GET /admin/oauth`: the OAuth platforms (no client secret) and every
/// user's connection (no token), the newest first.
pub(crate) async fn oauth(State(s): State<Arc<crate::State>>, _admin: Admin) -> Response {
    let platforms = platforms(&s);
    let connections = match s.store.list_connections().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("could not read the OAuth connections: {e}");
            return ApiError::internal("The connections could not be read").into_response();
        }
    };
    let connections: Vec<Value> = connections
        .into_iter()
        .map(|c| {
            let owner = if c.llm_key_hash == CONSOLE_CALLER {
                Some("the console")
            } else {
                s.catalog.developer_of(&c.llm_key_hash)
            };
            json!({
                "id": c.integration_id,
                "platform_id": c.platform_id,
                "provider": platforms.iter().find(|p| p.id == c.platform_id).map(|p| p.provider()),
                "external_user_id": c.external_user_id,
                "owner": owner,
                "expires_at_ms": c.expires_at.map(|t| t.saturating_mul(1000)),
                "created_at_ms": c.created_at.saturating_mul(1000),
                "updated_at_ms": c.updated_at.saturating_mul(1000),
            })
        })
        .collect();
    let platforms: Vec<Value> = platforms
        .iter()
        .map(|p| {
            json!({
                "id": p.id,
                "provider": p.provider(),
                "name": p.name.as_deref().unwrap_or(p.provider()),
                "scopes": p.scopes,
            })
        })
        .collect();
    json_response(
        StatusCode::OK,
        &json!({"platforms": platforms, "connections": connections}),
    )
}

/// `POST /admin/oauth/platforms/{platform_id}/connect` with
/// `{"external_user_id"}`: starts a flow for a test user, owned by the
/// console; the user comes back to the console. Answers
/// `{"authorization_url"}`.
pub(crate) async fn oauth_connect(
    State(s): State<Arc<crate::State>>,
    _admin: Admin,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(platform) = id.ok().and_then(|Path(id)| s.platform(&id)) else {
        return ApiError::not_found("platform_not_found", "OAuth platform not found")
            .into_response();
    };
    let body = match read_object(body, &s.config).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    let user = match crate::str_field(&body, "external_user_id") {
        Some(u) if u.len() <= 256 => u.to_owned(),
        _ => {
            return ApiError::bad_request(
                "invalid_body",
                "external_user_id must be a string of 1-256 bytes",
            )
            .into_response();
        }
    };
    let back = format!(
        "{}/console?view=oauth",
        s.public_url().trim_end_matches('/')
    );
    let answer =
        match crate::oauth::start_flow(&s, CONSOLE_CALLER.to_owned(), &platform, user, Some(back))
            .await
        {
            Ok(a) => json_response(
                StatusCode::OK,
                &json!({"authorization_url": a.authorization_url}),
            ),
            Err(e) => e.into_response(),
        };
    audited(&s, &headers, "oauth.connect", &platform.id, answer)
}

/// `DELETE /admin/oauth/connections/{id}`: forgets a stored connection
/// (its tokens are deleted here; the provider is not told). 204, or 404.
pub(crate) async fn oauth_revoke(
    State(s): State<Arc<crate::State>>,
    _admin: Admin,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Path(id)) = id else {
        return ApiError::not_found("not_found", "Not found").into_response();
    };
    let answer = match s.store.delete_connection(&id).await {
        Ok(true) => {
            tracing::info!("an OAuth connection was revoked from the console");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => ApiError::not_found("not_found", "No such connection").into_response(),
        Err(e) => {
            tracing::error!("could not delete an OAuth connection: {e}");
            ApiError::internal("The connection could not be deleted").into_response()
        }
    };
    audited(&s, &headers, "oauth.revoke", &id, answer)
}

/// Records the admin action `action` on `target` in the audit log, with
/// the error its `answer` gives (none for a success), and returns it.
fn audited(
    s: &crate::State,
    headers: &HeaderMap,
    action: &str,
    target: &str,
    answer: Response,
) -> Response {
    let code = match answer.status() {
        c if c.is_success() || c.is_redirection() => None,
        StatusCode::NOT_FOUND => Some("not_found"),
        c if c.is_client_error() => Some("bad_request"),
        _ => Some("internal_error"),
    };
    crate::audit::admin_action(s, headers, action, Some(target), code);
    answer
}

/// A URL without its query, fragment or credentials (a receiver's URL
/// may carry a token).
fn url_shown(url: &str) -> String {
    let base = url.split(['?', '#']).next().unwrap_or_default();
    match base.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let host = authority.rsplit('@').next().unwrap_or_default();
            format!("{scheme}://{host}{path}")
        }
        None => base.to_owned(),
    }
}

/// `GET /admin/webhooks`: every webhook (its URL without query or
/// credentials, never its secret) with its owner and its latest
/// deliveries (never their bodies).
pub(crate) async fn webhooks(State(s): State<Arc<crate::State>>, _admin: Admin) -> Response {
    let (hooks, deliveries) = match s.store.admin_webhooks().await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!("could not read the webhooks: {e}");
            return ApiError::internal("The webhooks could not be read").into_response();
        }
    };
    let hooks: Vec<Value> = hooks
        .into_iter()
        .map(|h| {
            let recent: Vec<Value> = deliveries
                .iter()
                .filter(|d| d.webhook_id == h.id)
                .take(crate::webhooks::RECENT_DELIVERIES)
                .map(|d| {
                    json!({
                        "id": d.id,
                        "event": d.event,
                        "status": d.status,
                        "attempts": d.attempts,
                        "last_status": d.last_status,
                        "last_error": d.last_error,
                        "created_at_ms": d.created_at.saturating_mul(1000),
                        "delivered_at_ms": d.delivered_at.map(|t| t.saturating_mul(1000)),
                    })
                })
                .collect();
            json!({
                "id": h.id,
                "url": url_shown(&h.url),
                "events": h.events,
                "owner": s.catalog.developer_of(&h.llm_key_hash),
                "created_at_ms": h.created_at.saturating_mul(1000),
                "deliveries": recent,
            })
        })
        .collect();
    json_response(StatusCode::OK, &json!({"webhooks": hooks}))
}

/// `POST /admin/webhooks/deliveries/{id}/resend`: queues a delivery again,
/// due now (the same `delivery_id` and body). 202, or 404.
pub(crate) async fn resend(
    State(s): State<Arc<crate::State>>,
    _admin: Admin,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let Ok(Path(id)) = id else {
        return ApiError::not_found("not_found", "Not found").into_response();
    };
    let answer = match crate::webhooks::resend(&s, &id).await {
        Ok(true) => json_response(StatusCode::ACCEPTED, &json!({"status": "queued"})),
        Ok(false) => ApiError::not_found("not_found", "No such delivery").into_response(),
        Err(e) => {
            tracing::error!("could not queue a delivery again: {e}");
            ApiError::internal("The delivery could not be queued").into_response()
        }
    };
    audited(&s, &headers, "webhook.resend", &id, answer)
}

#[cfg(test)]
mod tests {
    use super::{origin, url_shown};

    #[test]
    fn a_webhook_url_shows_without_query_or_credentials() {
        assert_eq!(
            url_shown("https://u:p@hooks.example.com/in/x?token=secret#f"),
            "https://hooks.example.com/in/x"
        );
        assert_eq!(url_shown("http://127.0.0.1:9"), "http://127.0.0.1:9");
        assert_eq!(url_shown("garbage?x"), "garbage");
    }

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
