//! Who may use the admin API (`/admin/...`) and the console: a request
//! with `Authorization: Bearer KEY` for one of `admin_api_keys`. With no
//! admin key configured both are off (404), so that a server does not
//! expose them by default; in dev mode (loopback only) they are open.

use axum::{
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::{
    error::ApiError,
    keys::{self, Role},
};

/// Why an admin request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// No admin key is configured (outside dev mode): 404.
    Off,
    /// A missing or wrong key: 401 with `WWW-Authenticate: Bearer`.
    Unauthorized,
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        match self {
            Self::Off => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "The admin API is off: set admin_api_keys to use it",
            )
            .into_response(),
            Self::Unauthorized => {
                let mut r = ApiError::unauthorized_with("unauthorized", "Invalid admin key")
                    .into_response();
                r.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
        }
    }
}

/// An admin request, let through by [`require`]. As a handler's argument
/// it answers a refused request itself (404 or 401) before the handler
/// runs or reads the body.
pub(crate) struct Admin;

impl axum::extract::FromRequestParts<std::sync::Arc<crate::State>> for Admin {
    type Rejection = Refused;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        s: &std::sync::Arc<crate::State>,
    ) -> Result<Self, Refused> {
        require(s, &parts.headers).map(|()| Admin)
    }
}

/// Lets an admin request through, or says why not.
pub(crate) fn require(s: &crate::State, headers: &HeaderMap) -> Result<(), Refused> {
    if s.config.dev {
        return Ok(());
    }
    if s.config.admin_api_keys.is_empty() {
        return Err(Refused::Off);
    }
    match keys::bearer_header(headers) {
        Some(k) if s.keys.check(Role::Admin, k) => Ok(()),
        _ => Err(Refused::Unauthorized),
    }
}

/// How often an idle live stream sends a comment, so that proxies keep it.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// `GET /admin/calls/live`: the tool calls as they finish, as server-sent
/// events (`event: call`, `data:` a [`CallEvent`](crate::events::CallEvent)
/// as JSON). A reader that falls behind gets `event: lagged` with how many
/// it missed. The stream ends when the server shuts down.
pub(crate) async fn live_calls(
    axum::extract::State(s): axum::extract::State<std::sync::Arc<crate::State>>,
    _admin: Admin,
) -> Response {
    use tokio::sync::broadcast::error::RecvError;
    let calls = s.calls.subscribe();
    let shutdown = s.shutdown.subscribe();
    let events = futures_util::stream::unfold(
        (calls, shutdown),
        |(mut calls, mut shutdown)| async move {
            let text = tokio::select! {
                got = tokio::time::timeout(KEEPALIVE, calls.recv()) => match got {
                    Err(_) => ": keepalive\n\n".to_owned(),
                    Ok(Ok(event)) => format!("event: call\ndata: {}\n\n", atp_registry::wire::to_json(&*event)),
                    Ok(Err(RecvError::Lagged(n))) => format!("event: lagged\ndata: {n}\n\n"),
                    Ok(Err(RecvError::Closed)) => return None,
                },
                _ = shutdown.wait_for(|down| *down) => return None,
            };
            Some((
                Ok::<_, std::convert::Infallible>(bytes::Bytes::from(text)),
                (calls, shutdown),
            ))
        },
    );
    crate::llm::sse_response(StatusCode::OK, axum::body::Body::from_stream(events))
}
