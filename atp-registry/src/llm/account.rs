//! The LLM key's account endpoints (docs/PROTOCOL.md §9): webhooks, the
//! toolkit store, developers. HTTP only, under
//! `/api/v1/atp/llm-client/`, with `Authorization: ApiKey KEY`.

use bytes::Bytes;
use hyper::Method;
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::{LlmClient, LlmError, body_message, error_text, segment};
use crate::wire::{
    DeveloperProfile, Page, StoreToolkit, StoreToolkitDetails, Webhook, WebhookEvent,
    WebhookRegistration,
};

impl LlmClient {
    /// Registers a webhook: `events` are delivered to `url` as signed
    /// `POST`s (see `atp_registry::webhook`, feature `webhook`, to check
    /// them). No events means the Python client's default,
    /// `connection_success`. The answer alone carries the signing
    /// `secret`: keep it.
    ///
    /// ```no_run
    /// # async fn demo(atp: atp_registry::llm::LlmClient) -> Result<(), atp_registry::llm::LlmError> {
    /// use atp_registry::wire::WebhookEvent;
    ///
    /// let hook = atp
    ///     .register_webhook("https://example.com/atp-events", &[WebhookEvent::ConnectionSuccess, WebhookEvent::ToolkitDisconnected])
    ///     .await?;
    /// if let Some(secret) = hook.secret {
    ///     // … keep it, to check the deliveries' signatures.
    /// #   let _ = secret;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn register_webhook(
        &self,
        url: &str,
        events: &[WebhookEvent],
    ) -> Result<Webhook, LlmError> {
        let events = if events.is_empty() {
            &[WebhookEvent::ConnectionSuccess][..]
        } else {
            events
        };
        let body = WebhookRegistration {
            url: url.to_owned(),
            events: events.iter().map(|e| e.as_str().to_owned()).collect(),
        };
        let body = serde_json::to_value(body).unwrap_or(Value::Null);
        let answer = self
            .account(Method::POST, "webhooks/register/", Some(&body))
            .await?;
        typed(answer, "the webhook registration")
    }

    /// The webhooks this key registered (without their secrets).
    pub async fn list_webhooks(&self) -> Result<Vec<Webhook>, LlmError> {
        let answer = self.account(Method::GET, "webhooks/", None).await?;
        // A bare list, or a list in an object (`results`, `webhooks`).
        let list = match answer {
            Value::Object(mut m) => ["results", "webhooks"]
                .iter()
                .find_map(|k| m.remove(*k))
                .unwrap_or(Value::Object(m)),
            other => other,
        };
        typed(list, "the webhook list")
    }

    /// Deletes a webhook of this key (`DELETE webhooks/{id}/delete/`); an
    /// unknown one is [`LlmError::Server`] with status 404.
    pub async fn delete_webhook(&self, webhook_id: &str) -> Result<(), LlmError> {
        let path = format!("webhooks/{}/delete/", segment(webhook_id));
        self.account(Method::DELETE, &path, None).await.map(|_| ())
    }

    /// One page (from 1) of the store's public toolkits.
    pub async fn list_store_toolkits(
        &self,
        page: u64,
        page_size: u64,
    ) -> Result<Page<StoreToolkit>, LlmError> {
        let path = format!("store/toolkits/list/?page={page}&page_size={page_size}");
        typed(
            self.account(Method::GET, &path, None).await?,
            "the store's page",
        )
    }

    /// One page (from 1) of the toolkits of this key's developer, public
    /// or not.
    pub async fn list_my_toolkits(
        &self,
        page: u64,
        page_size: u64,
    ) -> Result<Page<StoreToolkit>, LlmError> {
        let path = format!("developers/toolkits/?page={page}&page_size={page_size}");
        typed(
            self.account(Method::GET, &path, None).await?,
            "the developer's toolkits",
        )
    }

    /// A toolkit of the store, with its tools: a public one, or one of
    /// this key's developer (else [`LlmError::Server`] with status 404).
    pub async fn get_toolkit_details(
        &self,
        toolkit_id: &str,
    ) -> Result<StoreToolkitDetails, LlmError> {
        let path = format!("store/toolkits/{}/", segment(toolkit_id));
        typed(
            self.account(Method::GET, &path, None).await?,
            "the toolkit's details",
        )
    }

    /// A developer's profile and public toolkits, by display name.
    pub async fn get_developer_profile(
        &self,
        display_name: &str,
    ) -> Result<DeveloperProfile, LlmError> {
        let path = format!("store/developers/{}/", segment(display_name));
        typed(
            self.account(Method::GET, &path, None).await?,
            "the developer's profile",
        )
    }

    /// A call to `/api/v1/atp/llm-client/{path}` (`path` already
    /// percent-encoded): a 2xx answer's JSON (`null` when empty), else a
    /// typed error.
    async fn account(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, LlmError> {
        let url = format!("{}/api/v1/atp/llm-client/{path}", self.http_base()?);
        let auth = format!("ApiKey {}", self.inner.api_key.expose());
        let body = body.map(|v| ("application/json", Bytes::from(v.to_string())));
        let (status, bytes) = self
            .inner
            .http
            .send(
                method,
                &url,
                &[
                    ("authorization", auth.as_str()),
                    ("accept", "application/json"),
                ],
                body,
                self.inner.timeout,
            )
            .await?;
        match status {
            200..=299 if bytes.iter().all(u8::is_ascii_whitespace) => Ok(Value::Null),
            200..=299 => serde_json::from_slice(&bytes)
                .map_err(|_| LlmError::InvalidResponse(format!("HTTP {status}, not JSON"))),
            401 | 403 => Err(LlmError::AuthRefused(
                serde_json::from_slice::<Value>(&bytes)
                    .map(|v| error_text(&v))
                    .unwrap_or_else(|_| format!("HTTP {status}")),
            )),
            _ => Err(LlmError::Server {
                status: Some(status),
                message: body_message(&bytes),
            }),
        }
    }
}

/// Reads a JSON answer as `T`.
fn typed<T: DeserializeOwned>(answer: Value, what: &str) -> Result<T, LlmError> {
    serde_json::from_value(answer).map_err(|e| LlmError::InvalidResponse(format!("{what}: {e}")))
}
