//! `/mcp/{toolkit}`: every toolkit the server routes, as an MCP server
//! (Streamable HTTP, sessionless; docs/PROTOCOL.md §11).
//!
//! The protocol is the core's ([`atp_registry::mcp`]); this is its
//! backend: the tools a toolkit registered here, run exactly as an LLM
//! client's `task_request` runs them ([`crate::llm::call_tool`]) —
//! whether the toolkit is connected by WebSocket, HTTP inbox or endpoint
//! URL, to this server or (over NATS) to another.
//!
//! The caller is an LLM client: its key in `Authorization: Bearer KEY`
//! (or `ApiKey KEY`). A tool that needs an auth token gets the call's
//! `auth_token` argument, else the stored OAuth token of the user named
//! by `X-ATP-User`.

use std::sync::Arc;

use atp_registry::{
    AuthToken, Progress, ToolSpec,
    mcp::{self, McpAnswer, McpBackend, McpCallError, McpHead},
};
use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

use crate::{
    audit::{Entry, Outcome, Via},
    hub::{PROGRESS_BUFFER, Report},
    keys::{self, Role},
    llm::{ToolCall, call_tool},
    store::ToolkitRecord,
};

/// The header naming the end user whose stored OAuth tokens a tool gets.
const USER_HEADER: &str = "x-atp-user";

/// Who a keyless MCP request is in dev mode (as the hash of this "key":
/// any key is the one developer's in dev mode).
const DEV_CALLER: &str = "dev-mode-keyless-mcp-client";

/// A generic JSON-RPC error code for the HTTP refusals.
const SERVER_ERROR: i32 = -32000;

/// `POST /mcp/{toolkit}`: one JSON-RPC message.
pub(crate) async fn post(
    State(s): State<Arc<crate::State>>,
    toolkit: Result<Path<String>, axum::extract::rejection::PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    // A name that is not UTF-8 names no toolkit (after the checks that
    // come first, like any unknown toolkit).
    let toolkit = toolkit.map(|Path(t)| t).unwrap_or_default();
    if let Some(r) = host_refusal(&s, &headers) {
        return r;
    }
    let Some(llm_key_hash) = caller(&s, &headers) else {
        s.audit.record(
            Entry::call(Via::Mcp, Outcome::Unauthorized, Some("unauthorized"))
                .tool(Some(&toolkit), None),
        );
        let mut r = refuse(
            401,
            "Unauthorized: send an LLM API key as Authorization: Bearer KEY",
            "unauthorized",
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    };
    if !is_json(&headers) {
        return refuse(
            415,
            "Unsupported media type: send application/json",
            "unsupported_media_type",
        );
    }
    let Some(kit) = s.visible_toolkit(&llm_key_hash, &toolkit) else {
        return refuse(404, "Toolkit not found", "toolkit_not_found");
    };
    let body = match read_body(&s, body).await {
        Ok(b) => b,
        Err(a) => return answer(a),
    };
    let user = headers
        .get(USER_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned);
    let head = McpHead {
        accept: headers.get(header::ACCEPT).map(HeaderValue::as_bytes),
        protocol_version: headers
            .get("mcp-protocol-version")
            .map(HeaderValue::as_bytes),
        // The bearer token is the caller's LLM key: never a tool's token.
        bearer: None,
    };
    let backend = Backend {
        s: &s,
        llm_key_hash: &llm_key_hash,
        kit: &kit,
        user: user.as_deref(),
        // Log messages reach only a client that reads an event stream:
        // only then is the toolkit asked for them.
        logs: head.accepts_event_stream(),
        trace: crate::llm::trace_of(&headers),
    };
    answer(mcp::handle(&backend, &head, &body).await)
}

/// `GET` and `DELETE /mcp/{toolkit}`: 405 (no stream to listen to, no
/// session to end). The host is checked first, as for a POST.
pub(crate) async fn not_allowed(
    State(s): State<Arc<crate::State>>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = host_refusal(&s, &headers) {
        return r;
    }
    let mut r = refuse(
        405,
        "Method not allowed: this MCP endpoint is sessionless and takes POST only",
        "method_not_allowed",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    r
}

/// The toolkit `kit` as the LLM key `llm_key_hash` sees it.
struct Backend<'a> {
    s: &'a crate::State,
    llm_key_hash: &'a str,
    kit: &'a ToolkitRecord,
    user: Option<&'a str>,
    /// Whether the client reads notifications (the toolkit's logs).
    logs: bool,
    /// The client's trace context (the `traceparent` header).
    trace: Option<atp_registry::trace::TraceContext>,
}

impl McpBackend for Backend<'_> {
    fn name(&self) -> &str {
        &self.kit.app_name
    }

    fn tools(&self) -> Vec<ToolSpec> {
        // The server does not know which registered tools are apps (a
        // registration does not say): all of them are listed, as in
        // `get_toolkit_context`.
        self.kit.tools.iter().map(|t| t.spec.clone()).collect()
    }

    async fn call(
        &self,
        name: &str,
        params: Map<String, Value>,
        auth_token: Option<AuthToken>,
        events: Progress,
    ) -> Result<Value, McpCallError> {
        // An unknown tool is refused by `call_tool` (and audited there).
        let call = ToolCall {
            function: name,
            params,
            auth_token,
            user: self.user,
            logs: self.logs,
            via: Via::Mcp,
            admitted: None,
            trace: self.trace.clone(),
        };
        let (tx, mut rx) = mpsc::channel(PROGRESS_BUFFER);
        let work = call_tool(self.s, self.llm_key_hash, self.kit, call, Some(tx));
        tokio::pin!(work);
        let outcome = loop {
            tokio::select! {
                biased;
                Some(r) = rx.recv() => pass_on(&events, r),
                outcome = &mut work => break outcome,
            }
        };
        // The reports that came before the answer.
        while let Ok(r) = rx.try_recv() {
            pass_on(&events, r);
        }
        outcome.map_err(|f| {
            if f.code == "tool_not_found" {
                McpCallError::UnknownTool
            } else {
                McpCallError::Failed {
                    code: f.code,
                    message: f.message,
                }
            }
        })
    }
}

/// A toolkit's report, to the MCP client (which gets it if it listens).
fn pass_on(events: &Progress, report: Report) {
    match report {
        Report::Progress(p) => {
            events.report(p.progress, p.total, p.message.as_deref());
        }
        Report::Log { level, data } => {
            events.log(level, data);
        }
    }
}

/// The hosts an MCP request may name (`Host`, `Origin`): loopback, and
/// the host of `public_url` (not in dev mode).
fn allowed_hosts(s: &crate::State) -> Vec<Arc<str>> {
    let mut hosts = mcp::loopback_hosts();
    if !s.config.dev
        && let Some(host) = s.config.public_url.as_deref().and_then(url_host)
    {
        hosts.push(Arc::from(host));
    }
    hosts
}

/// The host name of a URL (no scheme, port, path or brackets).
fn url_host(url: &str) -> Option<&str> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split_once(']').map(|(h, _)| h)?
    } else {
        authority
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(authority, |(h, _)| h)
    };
    (!host.is_empty()).then_some(host)
}

/// The DNS-rebinding check: a 403 unless `Host` and `Origin` (when sent)
/// are allowed.
fn host_refusal(s: &crate::State, headers: &HeaderMap) -> Option<Response> {
    let allowed = allowed_hosts(s);
    let host_ok = headers
        .get(header::HOST)
        .is_none_or(|h| mcp::host_allowed(h.as_bytes(), &allowed));
    let origin_ok = headers
        .get(header::ORIGIN)
        .is_none_or(|o| o.as_bytes() == b"null" || mcp::host_allowed(o.as_bytes(), &allowed));
    (!(host_ok && origin_ok)).then(|| {
        refuse(
            403,
            "Forbidden: this host or origin is not allowed",
            "forbidden_host",
        )
    })
}

/// The calling LLM client's key, checked, as its hash: `Authorization:
/// Bearer KEY` or `Authorization: ApiKey KEY`. In dev mode (loopback
/// only, one developer) a request without `Authorization` is let in too,
/// as the developer's keyless client: desktop agents and the MCP
/// Inspector then need no key to try a toolkit.
fn caller(s: &crate::State, headers: &HeaderMap) -> Option<String> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        return s.config.dev.then(|| keys::key_hash(DEV_CALLER));
    };
    let value = value.to_str().ok()?;
    let (scheme, key) = value.trim().split_once(' ')?;
    let key = key.trim();
    let known = scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("apikey");
    (known && s.keys.check(Role::Llm, key)).then(|| keys::key_hash(key))
}

/// Whether the body is declared JSON.
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim().to_ascii_lowercase();
            m == "application/json" || (m.starts_with("application/") && m.ends_with("+json"))
        })
}

/// Reads the body within the message size limit (413) and the header
/// read timeout (408).
async fn read_body(s: &crate::State, body: Body) -> Result<bytes::Bytes, McpAnswer> {
    let limit = s.config.max_message_size;
    let read = tokio::time::timeout(
        s.config.header_read_timeout,
        Limited::new(body, limit).collect(),
    );
    match read.await {
        Err(_) => Err(refusal(
            408,
            "Request timeout: the body did not arrive in time",
            "request_timeout",
        )),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(refusal(
            413,
            &format!("Request body is larger than the limit of {limit} bytes"),
            "payload_too_large",
        )),
        Ok(Err(_)) => Err(refusal(400, "The body could not be read", "invalid_body")),
    }
}

/// An HTTP refusal with a JSON-RPC error body.
fn refuse(status: u16, message: &str, atp_code: &str) -> Response {
    answer(refusal(status, message, atp_code))
}

fn refusal(status: u16, message: &str, atp_code: &str) -> McpAnswer {
    McpAnswer::http_error(status, SERVER_ERROR, message, atp_code)
}

fn answer(a: McpAnswer) -> Response {
    let mut r = Response::new(Body::from(a.body));
    *r.status_mut() = StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(ct) = a.content_type {
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
        if ct == "text/event-stream" {
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        }
    }
    r.into_response()
}

#[cfg(test)]
mod tests {
    use super::url_host;

    #[test]
    fn hosts_of_urls() {
        assert_eq!(url_host("https://atp.example.com"), Some("atp.example.com"));
        assert_eq!(
            url_host("https://atp.example.com:8443/base/"),
            Some("atp.example.com")
        );
        assert_eq!(url_host("http://[::1]:80/"), Some("::1"));
        assert_eq!(url_host("http://user@host.example"), Some("host.example"));
        assert_eq!(url_host("http:///path"), None);
    }
}
