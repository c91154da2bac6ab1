//! OAuth2 (authorization code with PKCE): starting a user's connection to a
//! platform, the callback that exchanges the code, the tokens endpoint,
//! refreshes, and the token a tool call gets.

use std::{sync::Arc, time::Duration};

use atp_registry::Secret;
use atp_registry::wire::{
    OAuthAuthorization, OAuthConfirmation, OAuthConnected, OAuthTokens, WebhookEvent,
};
use axum::{
    body::Body,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use hyper::Method;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use crate::{
    config::OAuthPlatform,
    error::{ApiError, json_response},
    keys::{api_key_header, now_secs, random_token, rfc3339, uuid4},
    llm::Failure,
    read_object,
    store::{OAuthConnection, PendingFlow, StoreError},
    str_field,
    webhooks::{self, Audience},
};

type AppState = State<Arc<crate::State>>;

/// How long a started flow may take.
const FLOW_LIFETIME: i64 = 3600;
/// A token this close to its expiry is refreshed first.
const EXPIRY_MARGIN: i64 = 30;
/// The longest wait for the provider's token endpoint.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait for another server's refresh of the same connection
/// (which may wait for the provider for `PROVIDER_TIMEOUT`).
const REFRESH_LOCK_WAIT: Duration = Duration::from_secs(45);
const CALLBACK_PATH: &str = "/api/v1/atp/llm-client/oauth/callback/";

fn platform(s: &crate::State, id: Result<String, ()>) -> Result<OAuthPlatform, ApiError> {
    id.ok()
        .and_then(|id| s.platform(&id))
        .ok_or_else(|| ApiError::not_found("platform_not_found", "OAuth platform not found"))
}

fn with_query(base: &str, pairs: &[(&str, &str)]) -> String {
    let mut q = form_urlencoded::Serializer::new(String::new());
    for (k, v) in pairs {
        q.append_pair(k, v);
    }
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}{}", q.finish())
}

/// `POST …/llm-client/oauth/confirmation/{platform_id}/` with
/// `{"external_user_id", "developer_redirect_url"?}`: starts a flow and
/// answers the `authorization_url` to send the user to.
pub(crate) async fn confirmation(
    State(s): AppState,
    headers: HeaderMap,
    id: Result<Path<String>, PathRejection>,
    body: Body,
) -> Response {
    let result = async {
        if api_key_header(&headers).is_some() {
            s.llm_caller(&headers, None)?;
        }
        let m = read_object(body, &s.config).await?;
        let llm_key_hash = s.llm_caller(&headers, Some(&m))?;
        let platform = platform(&s, id.map(|Path(p)| p).map_err(|_| ()))?;
        let bad_user = || {
            ApiError::bad_request(
                "invalid_body",
                "external_user_id must be a string of 1-256 bytes",
            )
        };
        if str_field(&m, "external_user_id").is_none() {
            return Err(bad_user());
        }
        let OAuthConfirmation {
            external_user_id: user,
            developer_redirect_url: redirect_url,
        } = serde_json::from_value(Value::Object(m)).map_err(|_| {
            ApiError::bad_request(
                "invalid_body",
                "developer_redirect_url must be an http:// or https:// URL",
            )
        })?;
        if user.len() > 256 {
            return Err(bad_user());
        }
        if redirect_url
            .as_ref()
            .is_some_and(|u| !u.starts_with("http://") && !u.starts_with("https://"))
        {
            return Err(ApiError::bad_request(
                "invalid_body",
                "developer_redirect_url must be an http:// or https:// URL",
            ));
        }
        start_flow(&s, llm_key_hash, &platform, user, redirect_url).await
    }
    .await;
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// Starts an OAuth flow for `user` of the LLM key `llm_key_hash` on
/// `platform` (its state and PKCE verifier stored): the authorization URL
/// to send the user to. The user comes back to `redirect_url`, if given.
pub(crate) async fn start_flow(
    s: &crate::State,
    llm_key_hash: String,
    platform: &OAuthPlatform,
    user: String,
    redirect_url: Option<String>,
) -> Result<OAuthAuthorization, ApiError> {
    let no_rng = |_| ApiError::internal("no randomness available");
    let state = random_token(32).map_err(no_rng)?;
    let verifier = random_token(32).map_err(no_rng)?;
    let challenge = data_encoding::BASE64URL_NOPAD.encode(&Sha256::digest(verifier.as_bytes()));
    let flow = PendingFlow {
        platform_id: platform.id.clone(),
        external_user_id: user.clone(),
        llm_key_hash,
        code_verifier: Secret::new(verifier),
        redirect_url,
        created_at: now_secs(),
    };
    s.store.insert_flow(&state, &flow).await.map_err(|e| {
        tracing::error!("could not store an OAuth flow: {e}");
        ApiError::internal("The OAuth flow could not be stored")
    })?;
    let redirect_uri = format!("{}{CALLBACK_PATH}", s.public_url().trim_end_matches('/'));
    let scope = platform.scopes.join(" ");
    let mut pairs: Vec<(&str, &str)> = vec![
        ("response_type", "code"),
        ("client_id", &platform.client_id),
        ("redirect_uri", &redirect_uri),
        ("state", &state),
        ("code_challenge", &challenge),
        ("code_challenge_method", "S256"),
    ];
    if !scope.is_empty() {
        pairs.push(("scope", &scope));
    }
    for (k, v) in &platform.extra_authorize_params {
        pairs.push((k, v));
    }
    let authorization_url = with_query(&platform.authorize_url, &pairs);
    tracing::info!(platform = %platform.id, "OAuth flow started");
    Ok(OAuthAuthorization {
        confirmation_url: authorization_url.clone(),
        authorization_url,
        platform_id: platform.id.clone(),
        provider: platform.provider().to_owned(),
        provider_name: platform
            .name
            .clone()
            .unwrap_or_else(|| platform.provider().to_owned()),
        provider_logo: None,
        developer_app_name: None,
        scopes: platform.scopes.clone(),
        auth_mode: "OAuth2".into(),
        external_user_id: user,
        redirect_uri,
        expires_in: FLOW_LIFETIME,
        powered_by: "atp-server".into(),
    })
}

/// What a token endpoint answered.
struct TokenSet {
    access_token: Secret,
    refresh_token: Option<Secret>,
    token_type: Option<String>,
    scope: Option<String>,
    expires_in: Option<i64>,
}

/// Calls the platform's token endpoint with `form` (plus the client
/// credentials). Errors name what the provider said, never a secret.
async fn token_request(
    s: &crate::State,
    platform: &OAuthPlatform,
    form: &[(&str, &str)],
) -> Result<TokenSet, String> {
    let body = {
        let mut body = form_urlencoded::Serializer::new(String::new());
        for (k, v) in form {
            body.append_pair(k, v);
        }
        body.append_pair("client_id", &platform.client_id);
        body.append_pair("client_secret", platform.client_secret.expose());
        body.finish()
    };
    let (status, body) = s
        .outbound
        .send(
            Method::POST,
            &platform.token_url,
            &[("accept", "application/json")],
            Some(("application/x-www-form-urlencoded", Bytes::from(body))),
            PROVIDER_TIMEOUT,
        )
        .await
        .map_err(|e| format!("the token endpoint could not be reached: {e}"))?;
    let fields: Map<String, Value> = match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(m)) => m,
        _ => form_urlencoded::parse(&body)
            .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
            .collect(),
    };
    let text = |k: &str| fields.get(k).and_then(Value::as_str).map(str::to_owned);
    if !(200..300).contains(&status) || fields.contains_key("error") {
        let what = text("error_description")
            .or_else(|| text("error"))
            .unwrap_or_else(|| "no reason given".into());
        return Err(format!(
            "the token endpoint refused (HTTP {status}): {what}"
        ));
    }
    let access_token = text("access_token")
        .filter(|t| !t.is_empty())
        .ok_or("the token endpoint answered without an access_token")?;
    let expires_in = match fields.get("expires_in") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(t)) => t.parse().ok(),
        _ => None,
    };
    Ok(TokenSet {
        access_token: Secret::new(access_token),
        refresh_token: text("refresh_token")
            .filter(|t| !t.is_empty())
            .map(Secret::new),
        token_type: text("token_type"),
        scope: text("scope"),
        expires_in,
    })
}

/// `GET …/llm-client/oauth/callback/?code&state`: where the provider sends
/// the user back; exchanges the code and stores the connection.
pub(crate) async fn callback(State(s): AppState, RawQuery(query): RawQuery) -> Response {
    let q: Map<String, Value> = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    let Some(state) = str_field(&q, "state").map(str::to_owned) else {
        return ApiError::bad_request("invalid_state", "The callback has no state").into_response();
    };
    let flow = match s.store.take_flow(&state).await {
        Ok(Some(f)) if f.created_at >= now_secs() - FLOW_LIFETIME => f,
        Ok(_) => {
            return ApiError::bad_request(
                "invalid_state",
                "Unknown, expired or already used OAuth state; start the flow again",
            )
            .into_response();
        }
        Err(e) => {
            tracing::error!("could not read an OAuth flow: {e}");
            return ApiError::internal("The OAuth flow could not be read").into_response();
        }
    };
    let finish = |outcome: Result<String, (StatusCode, &'static str, String)>| -> Response {
        // Never a token in an event: ids, and the error's text (which
        // names what the provider said, not a secret).
        let (event, data) = match &outcome {
            Ok(integration_id) => (
                WebhookEvent::ConnectionSuccess,
                json!({
                    "platform_id": flow.platform_id,
                    "external_user_id": flow.external_user_id,
                    "integration_id": integration_id,
                }),
            ),
            Err((_, code, message)) => (
                WebhookEvent::ConnectionFailed,
                json!({
                    "platform_id": flow.platform_id,
                    "external_user_id": flow.external_user_id,
                    "error": message,
                    "code": code,
                }),
            ),
        };
        webhooks::emit(&s, event, Audience::LlmKey(&flow.llm_key_hash), data);
        match (&flow.redirect_url, outcome) {
            (Some(url), Ok(integration_id)) => redirect(&with_query(
                url,
                &[
                    ("status", "success"),
                    ("platform_id", &flow.platform_id),
                    ("external_user_id", &flow.external_user_id),
                    ("integration_id", &integration_id),
                ],
            )),
            (Some(url), Err((_, code, message))) => redirect(&with_query(
                url,
                &[
                    ("status", "error"),
                    ("platform_id", &flow.platform_id),
                    ("external_user_id", &flow.external_user_id),
                    ("error", code),
                    ("error_description", &message),
                ],
            )),
            (None, Ok(integration_id)) => json_response(
                StatusCode::OK,
                &OAuthConnected {
                    status: "connected".into(),
                    platform_id: flow.platform_id.clone(),
                    external_user_id: flow.external_user_id.clone(),
                    integration_id,
                    message: "Connected. You can close this window.".into(),
                },
            ),
            (None, Err((status, code, message))) => {
                ApiError::new(status, code, message).into_response()
            }
        }
    };
    let Some(platform) = s.platform(&flow.platform_id) else {
        return finish(Err((
            StatusCode::NOT_FOUND,
            "platform_not_found",
            "OAuth platform not found".into(),
        )));
    };
    if let Some(error) = str_field(&q, "error") {
        let what = str_field(&q, "error_description").unwrap_or(error);
        return finish(Err((
            StatusCode::BAD_REQUEST,
            "oauth_denied",
            format!("The provider did not authorize the connection: {what}"),
        )));
    }
    let Some(code) = str_field(&q, "code") else {
        return finish(Err((
            StatusCode::BAD_REQUEST,
            "invalid_callback",
            "The callback has no code".into(),
        )));
    };
    let redirect_uri = format!("{}{CALLBACK_PATH}", s.public_url().trim_end_matches('/'));
    let tokens = match token_request(
        &s,
        &platform,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", &redirect_uri),
            ("code_verifier", flow.code_verifier.expose()),
        ],
    )
    .await
    {
        Ok(t) => t,
        Err(why) => {
            tracing::warn!(platform = %platform.id, "OAuth code exchange failed: {why}");
            return finish(Err((StatusCode::BAD_GATEWAY, "oauth_exchange_failed", why)));
        }
    };
    let existing = s
        .store
        .get_connection(
            &flow.llm_key_hash,
            &flow.platform_id,
            &flow.external_user_id,
        )
        .await;
    let integration_id = match existing {
        Ok(Some(c)) => c.integration_id,
        _ => uuid4(),
    };
    let conn = OAuthConnection {
        llm_key_hash: flow.llm_key_hash.clone(),
        platform_id: flow.platform_id.clone(),
        external_user_id: flow.external_user_id.clone(),
        integration_id: integration_id.clone(),
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token,
        token_type: tokens.token_type,
        scope: tokens.scope.or_else(|| Some(platform.scopes.join(" "))),
        expires_at: tokens.expires_in.map(|e| now_secs().saturating_add(e)),
    };
    if let Err(e) = s.store.save_connection(&conn).await {
        tracing::error!("could not store an OAuth connection: {e}");
        return finish(Err((
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "The connection could not be stored".into(),
        )));
    }
    tracing::info!(platform = %platform.id, "OAuth connection made");
    finish(Ok(integration_id))
}

/// What a caller is told when a stored connection can not be read
/// (`otherwise` unless its tokens do not open): the server log has the
/// details (the column and the key id).
fn read_failure(e: &StoreError, otherwise: &'static str) -> &'static str {
    match e {
        StoreError::Sealed(_) => {
            "The user's stored tokens could not be opened with the server's secrets key (see the server log)"
        }
        _ => otherwise,
    }
}

fn redirect(url: &str) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(url) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

/// Whether a connection's token has expired, or is about to.
fn expired(c: &OAuthConnection) -> bool {
    c.expires_at
        .is_some_and(|t| t <= now_secs() + EXPIRY_MARGIN)
}

/// The connection, refreshed first if its token has expired (or is about
/// to) and it has a refresh token.
///
/// One refresh per expiry, even with several servers sharing the
/// database — which matters to providers that rotate refresh tokens (a
/// refresh token used twice is refused, and some then revoke the grant):
///
/// - within a server, `refresh_lock` lets one refresh run at a time;
/// - across the servers sharing a PostgreSQL database, the connection's
///   lock ([`crate::store::Store::lock_refresh`]) is held from before the
///   connection is read again until the new tokens are saved. The server
///   that waited for it reads what the other one saved — a different
///   access token, or one that has not expired — and answers with that,
///   without calling the provider.
///
/// Not guaranteed: if the lock's own database connection breaks during a
/// refresh (PostgreSQL restarts, the network drops), the lock ends with it
/// and another server may refresh the same connection meanwhile; the save
/// that comes last wins and each caller gets a token the provider issued.
/// A lock not granted within [`REFRESH_LOCK_WAIT`] is an error (never a
/// refresh without the lock). SQLite databases have one server each; two
/// servers on one SQLite file are not covered.
async fn fresh(
    s: &crate::State,
    platform: &OAuthPlatform,
    conn: OAuthConnection,
) -> Result<OAuthConnection, String> {
    if !expired(&conn) || conn.refresh_token.is_none() {
        return Ok(conn);
    }
    let _one_refresh_at_a_time = s.refresh_lock.lock().await;
    let lock = s
        .store
        .lock_refresh(
            &conn.llm_key_hash,
            &conn.platform_id,
            &conn.external_user_id,
            REFRESH_LOCK_WAIT,
        )
        .await
        .map_err(|e| e.to_string())?;
    let result = refresh_locked(s, platform, conn).await;
    lock.release().await;
    result
}

/// [`fresh`]'s work under the connection's lock: reads the connection
/// again, and refreshes it unless another server just did.
async fn refresh_locked(
    s: &crate::State,
    platform: &OAuthPlatform,
    seen: OAuthConnection,
) -> Result<OAuthConnection, String> {
    let current = s
        .store
        .get_connection(
            &seen.llm_key_hash,
            &seen.platform_id,
            &seen.external_user_id,
        )
        .await
        .map_err(|e| e.to_string())?
        .unwrap_or_else(|| seen.clone());
    // Refreshed (or connected again) by another server or request since
    // it was read: theirs is the token to use.
    if current.access_token != seen.access_token || !expired(&current) {
        return Ok(current);
    }
    let Some(refresh_token) = current.refresh_token.clone() else {
        return Ok(current);
    };
    let tokens = token_request(
        s,
        platform,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token.expose()),
        ],
    )
    .await?;
    let updated = OAuthConnection {
        access_token: tokens.access_token,
        refresh_token: tokens.refresh_token.or(Some(refresh_token)),
        token_type: tokens.token_type.or(current.token_type.clone()),
        scope: tokens.scope.or(current.scope.clone()),
        expires_at: tokens.expires_in.map(|e| now_secs().saturating_add(e)),
        ..current
    };
    s.store
        .save_connection(&updated)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(platform = %platform.id, "OAuth token refreshed");
    Ok(updated)
}

/// `GET …/llm-client/oauth/tokens/{platform_id}/{external_user_id}/`: 404
/// until the user has connected, then the tokens (refreshed if needed).
pub(crate) async fn tokens(
    State(s): AppState,
    headers: HeaderMap,
    ids: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let result = async {
        let llm_key_hash = s.llm_caller(&headers, None)?;
        let (platform_id, user) = match ids {
            Ok(Path(ids)) => ids,
            Err(_) => return Err(ApiError::not_found("not_found", "Not found")),
        };
        let platform = platform(&s, Ok(platform_id.clone()))?;
        let conn = s
            .store
            .get_connection(&llm_key_hash, &platform_id, &user)
            .await
            .map_err(|e| {
                tracing::error!(platform = %platform_id, "could not read an OAuth connection: {e}");
                ApiError::internal(read_failure(&e, "The connection could not be read"))
            })?
            .ok_or_else(|| {
                ApiError::not_found(
                    "not_connected",
                    format!("User {user} has not connected {platform_id} yet"),
                )
            })?;
        let conn = fresh(&s, &platform, conn).await.map_err(|why| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "oauth_refresh_failed",
                format!("The token has expired and could not be refreshed: {why}"),
            )
        })?;
        Ok(OAuthTokens {
            status: "connected".into(),
            integration_id: conn.integration_id,
            platform_id: conn.platform_id,
            provider: platform.provider().to_owned(),
            external_user_id: conn.external_user_id,
            external_user_email: None,
            access_token: conn.access_token,
            refresh_token: conn.refresh_token,
            token_type: conn.token_type,
            expires_at: conn.expires_at.map(rfc3339),
            expires_in: conn.expires_at.map(|t| (t - now_secs()).max(0)),
            scope: conn.scope,
        })
    }
    .await;
    match result {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => e.into_response(),
    }
}

/// The access token of `user`'s connection to a platform serving
/// `provider` (refreshed if needed), if the user has connected one.
pub(crate) async fn token_for(
    s: &crate::State,
    llm_key_hash: &str,
    provider: &str,
    user: &str,
) -> Result<Option<Secret>, Failure> {
    let platforms: Vec<OAuthPlatform> = s
        .platforms
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .filter(|p| p.provider() == provider)
        .cloned()
        .collect();
    for platform in platforms {
        let conn = s
            .store
            .get_connection(llm_key_hash, &platform.id, user)
            .await
            .map_err(|e| {
                tracing::error!(platform = %platform.id, "could not read an OAuth connection: {e}");
                Failure::new(
                    "internal_error",
                    read_failure(&e, "The user's connection could not be read"),
                )
            })?;
        if let Some(conn) = conn {
            let conn = fresh(s, &platform, conn).await.map_err(|why| {
                Failure::new(
                    "oauth_refresh_failed",
                    format!("The user's token has expired and could not be refreshed: {why}"),
                )
            })?;
            return Ok(Some(conn.access_token));
        }
    }
    Ok(None)
}
