//! The LLM side's account endpoints: webhooks, the toolkit store and
//! developer profiles (docs/PROTOCOL.md §9).

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ToolContext;
use crate::secret::Secret;

/// An event a webhook can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WebhookEvent {
    /// A user finished an OAuth flow: their tokens are stored.
    ConnectionSuccess,
    /// An OAuth flow failed (the provider refused, or the code exchange
    /// failed).
    ConnectionFailed,
    /// A toolkit came online (its first WebSocket, or its first inbox poll).
    ToolkitConnected,
    /// A toolkit went offline (its last WebSocket closed).
    ToolkitDisconnected,
}

impl WebhookEvent {
    /// Every event.
    pub const ALL: [WebhookEvent; 4] = [
        WebhookEvent::ConnectionSuccess,
        WebhookEvent::ConnectionFailed,
        WebhookEvent::ToolkitConnected,
        WebhookEvent::ToolkitDisconnected,
    ];

    /// The event's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::ConnectionSuccess => "connection_success",
            WebhookEvent::ConnectionFailed => "connection_failed",
            WebhookEvent::ToolkitConnected => "toolkit_connected",
            WebhookEvent::ToolkitDisconnected => "toolkit_disconnected",
        }
    }
}

impl fmt::Display for WebhookEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not a [`WebhookEvent`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown webhook event {0:?}: use connection_success, connection_failed, toolkit_connected or toolkit_disconnected"
)]
pub struct UnknownEvent(pub String);

impl FromStr for WebhookEvent {
    type Err = UnknownEvent;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| UnknownEvent(s.to_owned()))
    }
}

/// `POST …/llm-client/webhooks/register/`: `{"url", "events"}` (events
/// default to `["connection_success"]`, as the Python client's do).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookRegistration {
    /// Where deliveries are POSTed (`http://` or `https://`).
    pub url: String,
    /// The events to deliver.
    #[serde(default = "default_events")]
    pub events: Vec<String>,
}

fn default_events() -> Vec<String> {
    vec![WebhookEvent::ConnectionSuccess.as_str().to_owned()]
}

/// A registered webhook: one row of `GET …/webhooks/`, and the answer to
/// its registration (which alone carries the `secret`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    /// Its id (for `…/webhooks/{webhook_id}/delete/`).
    pub webhook_id: String,
    /// Where deliveries go.
    pub url: String,
    /// The events it gets.
    pub events: Vec<String>,
    /// When it was registered (RFC 3339, UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<String>,
    /// The signing secret: only in the answer to the registration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<Secret>,
}

/// What a webhook receives: the body of a delivery, signed in its
/// `X-ATP-Signature` header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookDelivery {
    /// The event (`connection_success`, …).
    pub event: String,
    /// The webhook it was delivered to.
    pub webhook_id: String,
    /// Unique per delivery: the same on every retry of it, so a receiver
    /// can drop a repeat.
    pub delivery_id: String,
    /// When the event happened (RFC 3339, UTC).
    pub created_at: String,
    /// What happened: the platform and user of an OAuth event, the
    /// toolkit of a toolkit event. Never a token.
    #[serde(default)]
    pub data: Value,
}

/// One page of a list: `{"count", "page", "page_size", "results"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page<T> {
    /// How many there are in all.
    pub count: u64,
    /// This page (from 1).
    pub page: u64,
    /// At most this many per page.
    pub page_size: u64,
    /// This page's rows.
    pub results: Vec<T>,
}

/// A toolkit as the store lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreToolkit {
    /// Its id (its `app_name`: what `get_toolkit_context` takes).
    pub toolkit_id: String,
    /// Its name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: String,
    /// Its developer's display name, when it has one.
    #[serde(default)]
    pub developer: Option<String>,
    /// Whether every key sees it.
    #[serde(default)]
    pub public: bool,
    /// How many tools it has.
    #[serde(default)]
    pub tools_count: usize,
    /// Whether it can be called now.
    #[serde(default)]
    pub connected: bool,
    /// The language it is written in (`Rust`, `Python`, …).
    #[serde(default)]
    pub programming_language: String,
}

/// `GET …/store/toolkits/{toolkit_id}/`: a toolkit and its tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoreToolkitDetails {
    /// The toolkit.
    #[serde(flatten)]
    pub toolkit: StoreToolkit,
    /// Its tools.
    pub tools: Vec<ToolContext>,
}

/// `GET …/store/developers/{display_name}/`: a developer and their public
/// toolkits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeveloperProfile {
    /// The name in URLs.
    pub display_name: String,
    /// Their full name.
    #[serde(default)]
    pub name: String,
    /// A line about them.
    #[serde(default)]
    pub bio: String,
    /// Their public toolkits.
    pub toolkits: Vec<StoreToolkit>,
}
