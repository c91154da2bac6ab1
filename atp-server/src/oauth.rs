//! OAuth2 (authorization code with PKCE): starting a user's connection to a
//! platform, the callback that exchanges the code, the tokens endpoint,
//! refreshes, and the token a tool call gets.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU16, Ordering},
    },
    time::{Duration, Instant},
};

use atp_registry::{
    Secret,
    net::{HttpClient, NetError},
    wire::{OAuthAuthorization, OAuthConfirmation, OAuthConnected, OAuthTokens, WebhookEvent},
};
use axum::{
    body::Body,
    extract::{Path, RawQuery, State, rejection::PathRejection},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use oauth2::{
    AccessToken, AsyncHttpClient, AuthType, AuthUrl, AuthorizationCode, ClientId, ClientSecret,
    CsrfToken, EndpointNotSet, EndpointSet, HttpRequest, HttpResponse, PkceCodeChallenge,
    PkceCodeVerifier, RedirectUrl, RefreshToken, RequestTokenError, Scope, StandardRevocableToken,
    TokenUrl,
    basic::{
        BasicErrorResponse, BasicErrorResponseType, BasicRevocationErrorResponse,
        BasicTokenIntrospectionResponse,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

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
    // The state and the PKCE verifier come from the OS's randomness
    // (an error if it has none, rather than a panic); the challenge,
    // the URL and its parameters are the oauth2 crate's.
    let state = random_token(32).map_err(no_rng)?;
    let verifier = PkceCodeVerifier::new(random_token(32).map_err(no_rng)?);
    let challenge = PkceCodeChallenge::from_code_verifier_sha256(&verifier);
    let redirect_uri = format!("{}{CALLBACK_PATH}", s.public_url().trim_end_matches('/'));
    let client = provider_client(platform, &redirect_uri).map_err(|e| {
        tracing::error!(platform = %platform.id, "cannot start an OAuth flow: {e}");
        ApiError::internal(format!("The OAuth platform is misconfigured: {e}"))
    })?;
    let mut request = client
        .authorize_url(|| CsrfToken::new(state.clone()))
        .set_pkce_challenge(challenge)
        .add_scopes(platform.scopes.iter().cloned().map(Scope::new));
    for (k, v) in &platform.extra_authorize_params {
        request = request.add_extra_param(k.clone(), v.clone());
    }
    let (authorization_url, _) = request.url();
    let authorization_url = String::from(authorization_url);
    let flow = PendingFlow {
        platform_id: platform.id.clone(),
        external_user_id: user.clone(),
        llm_key_hash,
        code_verifier: Secret::new(verifier.into_secret()),
        redirect_url,
        created_at: now_secs(),
    };
    s.store
        .insert_flow(&state, &flow, flow_lifetime(s))
        .await
        .map_err(|e| {
            tracing::error!("could not store an OAuth flow: {e}");
            ApiError::internal("The OAuth flow could not be stored")
        })?;
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
        expires_in: flow_lifetime(s),
        powered_by: "atp-server".into(),
    })
}

/// How long a started flow may take, in seconds (at least one).
fn flow_lifetime(s: &crate::State) -> i64 {
    i64::try_from(s.config.oauth_flow_lifetime.as_secs())
        .unwrap_or(i64::MAX)
        .max(1)
}

/// The oauth2 crate's client for one platform: its authorization and
/// token endpoints, its client credentials (sent in the token request's
/// body, as `client_id` and `client_secret`) and the server's callback.
type ProviderClient = oauth2::Client<
    BasicErrorResponse,
    ProviderTokens,
    BasicTokenIntrospectionResponse,
    StandardRevocableToken,
    BasicRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointSet,
>;

fn provider_client(
    platform: &OAuthPlatform,
    redirect_uri: &str,
) -> Result<ProviderClient, TokenError> {
    let auth_url = AuthUrl::new(platform.authorize_url.clone())
        .map_err(|_| TokenError::BadUrl("authorize_url"))?;
    let token_url =
        TokenUrl::new(platform.token_url.clone()).map_err(|_| TokenError::BadUrl("token_url"))?;
    let redirect_url =
        RedirectUrl::new(redirect_uri.to_owned()).map_err(|_| TokenError::BadUrl("public URL"))?;
    Ok(
        oauth2::Client::new(ClientId::new(platform.client_id.clone()))
            .set_client_secret(ClientSecret::new(
                platform.client_secret.expose().to_owned(),
            ))
            .set_auth_type(AuthType::RequestBody)
            .set_auth_uri(auth_url)
            .set_token_uri(token_url)
            .set_redirect_uri(redirect_url),
    )
}

/// A token endpoint's answer (RFC 6749 §5.1), read a little more
/// leniently than the oauth2 crate's `StandardTokenResponse`, as the
/// server always has: `token_type` may be missing and keeps the
/// provider's spelling (it is handed on as it came), and `expires_in` may
/// be a number or a string of digits.
#[derive(Debug, Deserialize, Serialize)]
struct ProviderTokens {
    access_token: AccessToken,
    #[serde(default)]
    token_type: ProviderTokenType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_in: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refresh_token: Option<RefreshToken>,
    #[serde(
        rename = "scope",
        default,
        deserialize_with = "oauth2::helpers::deserialize_space_delimited_vec",
        serialize_with = "oauth2::helpers::serialize_space_delimited_vec",
        skip_serializing_if = "Option::is_none"
    )]
    scopes: Option<Vec<Scope>>,
}

/// A token's type as the provider spelled it, if it said.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(transparent)]
struct ProviderTokenType(Option<String>);

impl oauth2::TokenType for ProviderTokenType {}

impl ProviderTokens {
    /// `expires_in` in seconds, if it is a whole number (negative: 0).
    fn expires_in_secs(&self) -> Option<i64> {
        match &self.expires_in {
            Some(Value::Number(n)) => n.as_i64(),
            Some(Value::String(t)) => t.trim().parse().ok(),
            _ => None,
        }
        .map(|n: i64| n.max(0))
    }

    /// The scopes granted, as the space-separated string stored.
    fn scope(&self) -> Option<String> {
        self.scopes
            .as_ref()
            .map(|v| v.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(" "))
    }
}

impl oauth2::TokenResponse for ProviderTokens {
    type TokenType = ProviderTokenType;

    fn access_token(&self) -> &AccessToken {
        &self.access_token
    }

    fn token_type(&self) -> &ProviderTokenType {
        &self.token_type
    }

    fn expires_in(&self) -> Option<Duration> {
        self.expires_in_secs()
            .and_then(|n| u64::try_from(n).ok())
            .map(Duration::from_secs)
    }

    fn refresh_token(&self) -> Option<&RefreshToken> {
        self.refresh_token.as_ref()
    }

    fn scopes(&self) -> Option<&Vec<Scope>> {
        self.scopes.as_ref()
    }
}

/// What a token endpoint answered, the tokens as the server keeps them.
struct TokenSet {
    access_token: Secret,
    refresh_token: Option<Secret>,
    token_type: Option<String>,
    scope: Option<String>,
    expires_in: Option<i64>,
}

/// Why a call to a token endpoint failed. The messages name what the
/// provider said (its `error` code and description), never a token, a
/// code, a verifier or the client secret, nor the answer's body.
#[derive(Debug, thiserror::Error)]
enum TokenError {
    /// A URL of the platform (or the server's public URL) does not parse.
    #[error("the platform's {0} is not a valid URL")]
    BadUrl(&'static str),
    /// No answer: the connection failed, broke or timed out.
    #[error("the token endpoint could not be reached: {0}")]
    Unreachable(NetError),
    /// An OAuth error answer (RFC 6749 §5.2), with an error status or,
    /// as some providers do, with 200.
    #[error("the token endpoint refused (HTTP {status}): {reason}")]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The `error` code.
        error: BasicErrorResponseType,
        /// The `error` code and its description.
        reason: String,
    },
    /// An answer that is neither tokens nor an OAuth error.
    #[error("the token endpoint answered HTTP {status} with {what}")]
    Unreadable {
        /// The HTTP status.
        status: u16,
        /// What was wrong with it.
        what: String,
    },
}

impl TokenError {
    /// Whether the provider said the grant (the code, or the refresh
    /// token) is invalid, expired or revoked: only a new authorization
    /// helps.
    fn grant_refused(&self) -> bool {
        matches!(
            self,
            TokenError::Refused {
                error: BasicErrorResponseType::InvalidGrant,
                ..
            }
        )
    }

    fn from_oauth2(e: RequestTokenError<NetError, BasicErrorResponse>, status: u16) -> Self {
        let refused = |r: BasicErrorResponse| TokenError::Refused {
            status,
            error: r.error().clone(),
            reason: r.to_string(),
        };
        match e {
            RequestTokenError::ServerResponse(r) => refused(r),
            RequestTokenError::Request(e) => TokenError::Unreachable(e),
            // An error answer with a success status (GitHub does this) is
            // not a token answer: read it as an error answer. Otherwise
            // say where the answer went wrong, never what it held.
            RequestTokenError::Parse(e, body) => {
                match serde_json::from_slice::<BasicErrorResponse>(&body) {
                    Ok(r) => refused(r),
                    Err(_) => {
                        let path = e.path().to_string();
                        // serde's "missing field `x`" names a field, never
                        // a value; its other messages may quote one.
                        let inner = e.inner().to_string();
                        TokenError::Unreadable {
                            status,
                            what: if path != "." {
                                format!("a token answer whose `{path}` is not valid")
                            } else if inner.starts_with("missing field") {
                                format!("a token answer with a {inner}")
                            } else {
                                "an answer that is not a JSON token answer".into()
                            },
                        }
                    }
                }
            }
            // The crate's own words: an empty body, or a content type that
            // is not JSON (no secret in either).
            RequestTokenError::Other(what) => TokenError::Unreadable {
                status,
                what: format!("an unexpected answer ({what})"),
            },
        }
    }
}

/// The oauth2 crate's HTTP hook over the server's own client: the same
/// connection pool, TLS roots, [`PROVIDER_TIMEOUT`] for the whole call
/// and bound on the answer's size as every outgoing call. Remembers the
/// answer's status for the error messages.
struct ProviderHttp<'a> {
    client: &'a HttpClient,
    status: AtomicU16,
}

impl<'a> ProviderHttp<'a> {
    fn new(client: &'a HttpClient) -> Self {
        Self {
            client,
            status: AtomicU16::new(0),
        }
    }

    fn status(&self) -> u16 {
        self.status.load(Ordering::Relaxed)
    }
}

impl<'c> AsyncHttpClient<'c> for ProviderHttp<'_> {
    type Error = NetError;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, NetError>> + Send + 'c>>;

    fn call(&'c self, request: HttpRequest) -> Self::Future {
        Box::pin(async move {
            let deadline = Instant::now() + PROVIDER_TIMEOUT;
            let (parts, body) = request.into_parts();
            let url = parts.uri.to_string();
            let mut content_type = None;
            let mut headers = Vec::new();
            for (name, value) in &parts.headers {
                // oauth2 sets only ASCII headers (accept, content-type).
                let Ok(value) = value.to_str() else { continue };
                if name == header::CONTENT_TYPE {
                    content_type = Some(value);
                } else {
                    headers.push((name.as_str(), value));
                }
            }
            let body = content_type.map(|t| (t, Bytes::from(body)));
            let answer = self
                .client
                .send_streaming(parts.method, &url, &headers, body, PROVIDER_TIMEOUT)
                .await?;
            self.status.store(answer.status, Ordering::Relaxed);
            let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = HttpResponse::new(Vec::new());
            *response.status_mut() = status;
            if let Some(t) = answer
                .content_type
                .as_deref()
                .and_then(|t| HeaderValue::from_str(t).ok())
            {
                response.headers_mut().insert(header::CONTENT_TYPE, t);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            *response.body_mut() = answer.read_all(left).await?.to_vec();
            Ok(response)
        })
    }
}

/// Exchanges a code (with its PKCE verifier) for tokens.
async fn exchange_code(
    s: &crate::State,
    platform: &OAuthPlatform,
    code: &str,
    verifier: &Secret,
) -> Result<TokenSet, TokenError> {
    let redirect_uri = format!("{}{CALLBACK_PATH}", s.public_url().trim_end_matches('/'));
    let client = provider_client(platform, &redirect_uri)?;
    let http = ProviderHttp::new(&s.outbound);
    let answer = client
        .exchange_code(AuthorizationCode::new(code.to_owned()))
        .set_pkce_verifier(PkceCodeVerifier::new(verifier.expose().to_owned()))
        .request_async(&http)
        .await;
    token_set(
        answer.map_err(|e| TokenError::from_oauth2(e, http.status()))?,
        &http,
    )
}

/// Trades a refresh token for new tokens.
async fn exchange_refresh_token(
    s: &crate::State,
    platform: &OAuthPlatform,
    refresh_token: &Secret,
) -> Result<TokenSet, TokenError> {
    let redirect_uri = format!("{}{CALLBACK_PATH}", s.public_url().trim_end_matches('/'));
    let client = provider_client(platform, &redirect_uri)?;
    let http = ProviderHttp::new(&s.outbound);
    let refresh_token = RefreshToken::new(refresh_token.expose().to_owned());
    let answer = client
        .exchange_refresh_token(&refresh_token)
        .request_async(&http)
        .await;
    token_set(
        answer.map_err(|e| TokenError::from_oauth2(e, http.status()))?,
        &http,
    )
}

fn token_set(t: ProviderTokens, http: &ProviderHttp<'_>) -> Result<TokenSet, TokenError> {
    if t.access_token.secret().is_empty() {
        return Err(TokenError::Unreadable {
            status: http.status(),
            what: "an empty access_token".into(),
        });
    }
    Ok(TokenSet {
        expires_in: t.expires_in_secs(),
        scope: t.scope(),
        token_type: t.token_type.0.clone(),
        refresh_token: t
            .refresh_token
            .as_ref()
            .map(|r| r.secret())
            .filter(|r| !r.is_empty())
            .map(Secret::new),
        access_token: Secret::new(t.access_token.secret()),
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
        Ok(Some(f)) if f.created_at >= now_secs() - flow_lifetime(&s) => f,
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
    let tokens = match exchange_code(&s, &platform, code, &flow.code_verifier).await {
        Ok(t) => t,
        Err(why) => {
            tracing::warn!(platform = %platform.id, "OAuth code exchange failed: {why}");
            return finish(Err((
                StatusCode::BAD_GATEWAY,
                "oauth_exchange_failed",
                why.to_string(),
            )));
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
) -> Result<OAuthConnection, RefreshError> {
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
        .map_err(|e| RefreshError::Store(e.to_string()))?;
    let result = refresh_locked(s, platform, conn).await;
    lock.release().await;
    result
}

/// Why a connection's token could not be refreshed.
#[derive(Debug, thiserror::Error)]
enum RefreshError {
    /// The database failed.
    #[error("{0}")]
    Store(String),
    /// The provider could not be reached or failed; the connection stays
    /// and the next use tries again.
    #[error("{0}")]
    Provider(TokenError),
    /// The provider refused the refresh token (`invalid_grant`: expired,
    /// revoked or already used): the connection was removed, and the user
    /// must connect again.
    #[error("{0}; the user must connect again (the connection was removed)")]
    Revoked(TokenError),
}

/// [`fresh`]'s work under the connection's lock: reads the connection
/// again, and refreshes it unless another server just did.
async fn refresh_locked(
    s: &crate::State,
    platform: &OAuthPlatform,
    seen: OAuthConnection,
) -> Result<OAuthConnection, RefreshError> {
    let current = s
        .store
        .get_connection(
            &seen.llm_key_hash,
            &seen.platform_id,
            &seen.external_user_id,
        )
        .await
        .map_err(|e| RefreshError::Store(e.to_string()))?
        .unwrap_or_else(|| seen.clone());
    // Refreshed (or connected again) by another server or request since
    // it was read: theirs is the token to use.
    if current.access_token != seen.access_token || !expired(&current) {
        return Ok(current);
    }
    let Some(refresh_token) = current.refresh_token.clone() else {
        return Ok(current);
    };
    let tokens = match exchange_refresh_token(s, platform, &refresh_token).await {
        Ok(t) => t,
        Err(e) if e.grant_refused() => {
            // Only a new authorization helps: forget the tokens (unless the
            // user connected again meanwhile), so that the connection reads
            // as not connected (404 `not_connected`, and a tool call says
            // how to connect) rather than failing on every use.
            match s
                .store
                .forget_connection(
                    &current.llm_key_hash,
                    &current.platform_id,
                    &current.external_user_id,
                    &refresh_token,
                )
                .await
            {
                Ok(_) => tracing::warn!(
                    platform = %platform.id,
                    "OAuth refresh token refused ({e}); the connection was removed"
                ),
                Err(se) => tracing::error!(
                    platform = %platform.id,
                    "OAuth refresh token refused ({e}); the connection could not be removed: {se}"
                ),
            }
            return Err(RefreshError::Revoked(e));
        }
        Err(e) => {
            tracing::warn!(platform = %platform.id, "OAuth refresh failed: {e}");
            return Err(RefreshError::Provider(e));
        }
    };
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
        .map_err(|e| RefreshError::Store(e.to_string()))?;
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
