//! A small OAuth2 provider over real HTTP on a loopback port, for the
//! OAuth tests (`oauth`, `postgres`): `GET /authorize` (state and PKCE
//! checked) redirects with a code; `POST /token` exchanges it (client
//! `cid`/`csecret`) for an access token expired at once, so that its first
//! use refreshes it, and answers refreshes.
//!
//! Knobs ([`Options`]): refresh tokens that rotate (a refresh token works
//! once, as with many providers), refreshes held until
//! [`Provider::release_refreshes`], and code exchanges answered with an
//! OAuth error; [`Provider::revoke_refresh_tokens`] makes every refresh
//! token invalid (expired or revoked).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use atp_server::OAuthPlatform;
use axum::{
    Router,
    extract::{RawQuery, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::{
    sync::{Notify, futures::Notified, watch},
    task::JoinHandle,
};

use crate::common::WAIT;

/// How the provider behaves.
#[derive(Clone, Copy, Default)]
pub(crate) struct Options {
    /// The scopes it expects (and grants), also the platform's.
    pub scopes: &'static [&'static str],
    /// Each refresh answers a new refresh token (`refresh-N`) and the one
    /// spent is refused from then on; else `refresh-1` works for ever and
    /// a refresh answers no new one.
    pub rotate_refresh_tokens: bool,
    /// Each refresh waits (at most [`WAIT`]) until
    /// [`Provider::release_refreshes`] before it answers.
    pub hold_refreshes: bool,
    /// A prefix of every token it issues and of its client secret
    /// (`{tag}access-1`, `{tag}csecret`): values distinct enough to grep
    /// a database file for.
    pub tag: &'static str,
    /// Every code exchange is refused with this OAuth `error` (and an
    /// `error_description`), with HTTP 400 — or 200, as GitHub does, when
    /// [`errors_with_200`](Self::errors_with_200).
    pub code_error: Option<&'static str>,
    /// See [`code_error`](Self::code_error).
    pub errors_with_200: bool,
    /// Every refresh is answered 503 `temporarily_unavailable`.
    pub refresh_unavailable: bool,
}

#[derive(Default)]
struct Grants {
    /// code → (PKCE challenge, redirect_uri)
    codes: HashMap<String, (String, String)>,
    issued: usize,
    /// The refresh token that works now.
    refresh_token: Option<String>,
    refreshes: usize,
    /// The PKCE verifiers of the codes exchanged.
    verifiers: Vec<String>,
    /// How many code exchanges were asked for (granted or not).
    code_requests: usize,
}

struct Shared {
    options: Options,
    grants: Mutex<Grants>,
    /// Notified when a refresh request arrives.
    refresh_started: Notify,
    /// Whether refreshes may answer.
    released: watch::Sender<bool>,
}

/// The provider, serving until dropped.
pub(crate) struct Provider {
    /// `http://127.0.0.1:PORT`
    pub base: String,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Provider {
    pub async fn start(options: Options) -> Self {
        let shared = Arc::new(Shared {
            options,
            grants: Mutex::default(),
            refresh_started: Notify::new(),
            released: watch::Sender::new(!options.hold_refreshes),
        });
        let app = Router::new()
            .route("/authorize", get(authorize))
            .route("/token", post(token))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { base, shared, task }
    }

    /// The platform `local-app` on this provider.
    pub fn platform(&self) -> OAuthPlatform {
        OAuthPlatform {
            client_secret: self.client_secret().into(),
            ..platform(&self.base, self.shared.options.scopes)
        }
    }

    /// Its client secret.
    pub fn client_secret(&self) -> String {
        format!("{}csecret", self.shared.options.tag)
    }

    /// The PKCE verifiers of the codes it exchanged.
    pub fn verifiers(&self) -> Vec<String> {
        self.shared.grants.lock().expect("lock").verifiers.clone()
    }

    /// How many code exchanges it was asked for (granted or not).
    pub fn code_requests(&self) -> usize {
        self.shared.grants.lock().expect("lock").code_requests
    }

    /// Makes the refresh token issued so far invalid (as if it expired or
    /// the user revoked the grant): refreshes with it get `invalid_grant`.
    /// A new code exchange issues a valid one again.
    pub fn revoke_refresh_tokens(&self) {
        self.shared.grants.lock().expect("lock").refresh_token = None;
    }

    /// How many refreshes it has granted.
    pub fn refreshes(&self) -> usize {
        self.shared.grants.lock().expect("lock").refreshes
    }

    /// Completes when a refresh request arrives (or has arrived since the
    /// last one was awaited).
    pub fn refresh_started(&self) -> Notified<'_> {
        self.shared.refresh_started.notified()
    }

    /// Lets the held refreshes answer, and those to come at once.
    pub fn release_refreshes(&self) {
        self.shared.released.send_replace(true);
    }
}

impl Drop for Provider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The platform `local-app` (provider `localprov`, client `cid`) on a
/// provider at `base` (which need not run).
pub(crate) fn platform(base: &str, scopes: &[&str]) -> OAuthPlatform {
    OAuthPlatform {
        id: "local-app".into(),
        provider: Some("localprov".into()),
        name: Some("Local Provider".into()),
        authorize_url: format!("{base}/authorize"),
        token_url: format!("{base}/token"),
        client_id: "cid".into(),
        client_secret: "csecret".into(),
        scopes: scopes.iter().map(|s| (*s).into()).collect(),
        extra_authorize_params: Vec::new(),
    }
}

/// A query string or a form body's pairs.
pub(crate) fn query(q: &str) -> HashMap<String, String> {
    form_urlencoded::parse(q.as_bytes()).into_owned().collect()
}

/// A redirect's `Location`.
pub(crate) fn location(headers: &hyper::HeaderMap) -> String {
    headers
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("a Location header")
        .to_owned()
}

fn json_answer(status: StatusCode, v: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

async fn authorize(State(p): State<Arc<Shared>>, RawQuery(q): RawQuery) -> Response {
    let q = query(&q.unwrap_or_default());
    let scope = p.options.scopes.join(" ");
    let ok = q.get("client_id").map(String::as_str) == Some("cid")
        && q.get("response_type").map(String::as_str) == Some("code")
        && q.get("code_challenge_method").map(String::as_str) == Some("S256")
        && q.get("scope") == Some(&scope)
        && q.get("state").is_some_and(|s| s.len() >= 32);
    let (Some(redirect), Some(challenge), Some(state), true) = (
        q.get("redirect_uri"),
        q.get("code_challenge"),
        q.get("state"),
        ok,
    ) else {
        return json_answer(StatusCode::BAD_REQUEST, json!({"error": "invalid_request"}));
    };
    let code = {
        let mut g = p.grants.lock().expect("lock");
        g.issued += 1;
        let code = format!("code-{}", g.issued);
        g.codes
            .insert(code.clone(), (challenge.clone(), redirect.clone()));
        code
    };
    let location = format!(
        "{redirect}?{}",
        form_urlencoded::Serializer::new(String::new())
            .append_pair("code", &code)
            .append_pair("state", state)
            .finish()
    );
    (StatusCode::FOUND, [(header::LOCATION, location)]).into_response()
}

async fn token(State(p): State<Arc<Shared>>, body: String) -> Response {
    let f = query(&body);
    let tag = p.options.tag;
    if f.get("client_id").map(String::as_str) != Some("cid")
        || f.get("client_secret") != Some(&format!("{tag}csecret"))
    {
        return json_answer(StatusCode::UNAUTHORIZED, json!({"error": "invalid_client"}));
    }
    match f.get("grant_type").map(String::as_str) {
        Some("authorization_code") => {
            let mut g = p.grants.lock().expect("lock");
            g.code_requests += 1;
            if let Some(error) = p.options.code_error {
                let status = if p.options.errors_with_200 {
                    StatusCode::OK
                } else {
                    StatusCode::BAD_REQUEST
                };
                return json_answer(
                    status,
                    json!({"error": error, "error_description": "the provider says no"}),
                );
            }
            let Some((challenge, redirect)) = f.get("code").and_then(|c| g.codes.remove(c)) else {
                return json_answer(StatusCode::BAD_REQUEST, json!({"error": "invalid_grant"}));
            };
            let verifier = f.get("code_verifier").cloned().unwrap_or_default();
            let computed =
                data_encoding::BASE64URL_NOPAD.encode(&Sha256::digest(verifier.as_bytes()));
            if computed != challenge || f.get("redirect_uri") != Some(&redirect) {
                return json_answer(
                    StatusCode::BAD_REQUEST,
                    json!({"error": "invalid_grant", "error_description": "PKCE or redirect_uri mismatch"}),
                );
            }
            g.verifiers.push(verifier);
            g.refresh_token = Some(format!("{tag}refresh-1"));
            // Expired at once, so that the first use refreshes it.
            json_answer(
                StatusCode::OK,
                json!({"access_token": format!("{tag}access-1"), "refresh_token": format!("{tag}refresh-1"),
                       "expires_in": 0, "token_type": "Bearer", "scope": p.options.scopes.join(" ")}),
            )
        }
        Some("refresh_token") => refresh(&p, f.get("refresh_token")).await,
        _ => json_answer(
            StatusCode::BAD_REQUEST,
            json!({"error": "unsupported_grant_type"}),
        ),
    }
}

async fn refresh(p: &Shared, presented: Option<&String>) -> Response {
    if p.options.refresh_unavailable {
        return json_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "temporarily_unavailable"}),
        );
    }
    let (access, rotated) = {
        let mut g = p.grants.lock().expect("lock");
        if presented.is_none() || presented != g.refresh_token.as_ref() {
            return json_answer(
                StatusCode::BAD_REQUEST,
                json!({"error": "invalid_grant", "error_description": "refresh token not valid (already used?)"}),
            );
        }
        g.refreshes += 1;
        let n = g.refreshes + 1;
        let tag = p.options.tag;
        let rotated = p
            .options
            .rotate_refresh_tokens
            .then(|| format!("{tag}refresh-{n}"));
        if let Some(r) = &rotated {
            g.refresh_token = Some(r.clone());
        }
        (format!("{tag}access-{n}"), rotated)
    };
    p.refresh_started.notify_one();
    let mut released = p.released.subscribe();
    let Ok(Ok(_)) = tokio::time::timeout(WAIT, released.wait_for(|r| *r)).await else {
        return json_answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "temporarily_unavailable"}),
        );
    };
    let mut answer = json!({"access_token": access, "expires_in": 3600, "token_type": "Bearer"});
    if let Some(r) = rotated {
        answer["refresh_token"] = r.into();
    }
    json_answer(StatusCode::OK, answer)
}
