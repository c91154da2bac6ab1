//! The bodies of the HTTP endpoints: the ATP endpoints every adapter
//! serves (`/atp/…`), and the OAuth endpoints of an ATP server's LLM side.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::secret::Secret;

/// `GET /atp/`: the toolkits (those without an endpoint key), by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolkitList {
    /// One entry per toolkit.
    pub toolkits: Vec<ToolkitSummary>,
}

/// One toolkit of a [`ToolkitList`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolkitSummary {
    /// The name it is registered under.
    pub toolkit: String,
    /// Its `app_name`.
    pub app_name: String,
    /// How many tools it has.
    pub tools: usize,
}

/// `GET /atp/{toolkit}/[?provider=P]`: a toolkit's tools, as
/// [`ToolContext`]s or in the provider's format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolkitTools<T = Value> {
    /// The toolkit's name.
    pub toolkit: String,
    /// Its `app_name`.
    pub app_name: String,
    /// The provider, echoed as sent (only when one was asked for).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The tools, in registration order ([`ToolContext`]s, or provider
    /// schemas).
    pub tools: Vec<T>,
}

/// `GET /atp/{toolkit}/{tool}/`: a tool's context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolContext {
    /// The tool's name.
    pub function: String,
    /// All param names.
    pub params: Vec<String>,
    /// The required ones.
    pub required_params: Vec<String>,
    /// The description.
    pub description: String,
    /// The auth provider.
    pub auth_provider: Option<String>,
    /// The auth type.
    pub auth_type: Option<String>,
    /// The token's param name.
    pub auth_with: Option<String>,
    /// The JSON Schema of the input.
    pub input_schema: Value,
}

/// `POST /atp/{toolkit}/{tool}/`: the tool's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolResult<T = Value> {
    /// What the tool returned.
    pub result: T,
}

/// Every error answer: `{"error": MESSAGE, "code": CODE}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody<S = String> {
    /// For people.
    pub error: S,
    /// For programs.
    pub code: S,
}

/// A bare acknowledgement: `{"status": "ok"}` (an inbox answer taken,
/// `GET /health`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `ok`.
    pub status: String,
}

impl Status {
    /// `{"status": "ok"}`.
    pub fn ok() -> Self {
        Self {
            status: "ok".into(),
        }
    }
}

/// `POST …/llm-client/oauth/confirmation/{platform_id}/`: start an OAuth
/// connection for a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthConfirmation {
    /// The user, in the caller's own terms.
    pub external_user_id: String,
    /// Where to send the user's browser when the flow is done.
    #[serde(
        default,
        deserialize_with = "super::opt_string",
        skip_serializing_if = "Option::is_none"
    )]
    pub developer_redirect_url: Option<String>,
}

/// The answer to [`OAuthConfirmation`]: where to send the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthAuthorization {
    /// The provider's authorization page, with state and PKCE.
    pub authorization_url: String,
    /// The same URL (the Python SDK's name for it).
    pub confirmation_url: String,
    /// The platform.
    pub platform_id: String,
    /// Its provider (`hubspot`, …).
    pub provider: String,
    /// Its display name.
    pub provider_name: String,
    /// Its logo (atp-server has none).
    pub provider_logo: Option<String>,
    /// The developer's app (atp-server has none).
    pub developer_app_name: Option<String>,
    /// The scopes asked for.
    pub scopes: Vec<String>,
    /// `OAuth2`.
    pub auth_mode: String,
    /// The user.
    pub external_user_id: String,
    /// The callback the provider redirects to.
    pub redirect_uri: String,
    /// How long the flow stays open, in seconds.
    pub expires_in: i64,
    /// The server.
    pub powered_by: String,
}

/// The callback's answer when no redirect was asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthConnected {
    /// `connected`.
    pub status: String,
    /// The platform.
    pub platform_id: String,
    /// The user.
    pub external_user_id: String,
    /// The connection's id.
    pub integration_id: String,
    /// For people.
    pub message: String,
}

/// `GET …/llm-client/oauth/tokens/{platform_id}/{external_user_id}/`: a
/// connected user's tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthTokens {
    /// `connected`.
    pub status: String,
    /// The connection's id.
    pub integration_id: String,
    /// The platform.
    pub platform_id: String,
    /// Its provider.
    pub provider: String,
    /// The user.
    pub external_user_id: String,
    /// The user's email (atp-server does not know it).
    pub external_user_email: Option<String>,
    /// The access token.
    pub access_token: Secret,
    /// The refresh token, if any.
    pub refresh_token: Option<Secret>,
    /// Its type (`Bearer`).
    pub token_type: Option<String>,
    /// When it expires (RFC 3339).
    pub expires_at: Option<String>,
    /// In how many seconds it expires.
    pub expires_in: Option<i64>,
    /// The scopes granted.
    pub scope: Option<String>,
}
