//! Errors: the server's own ([`ServerError`]) and the JSON error answers of
//! its endpoints.

use std::net::SocketAddr;

use atp_registry::wire::ErrorBody;
use axum::{
    body::Body,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

/// Why the server could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The settings are invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The database could not be opened, migrated or read.
    #[error("database error: {0}")]
    Db(String),
    /// The message bus (NATS) could not be reached.
    #[error("message bus error: {0}")]
    Bus(String),
    /// Dev mode accepts any key, so it only listens on loopback.
    #[error(
        "dev mode accepts any API key, so it only binds to a loopback address; {0} is not one (configure API keys to listen there)"
    )]
    DevModeNotLoopback(SocketAddr),
    /// Listening or serving failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The secrets key is missing or invalid, or a stored secret could not
    /// be sealed or opened (docs/OPERATIONS.md, "Secrets at rest").
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
}

impl From<rusqlite::Error> for ServerError {
    fn from(e: rusqlite::Error) -> Self {
        ServerError::Db(e.to_string())
    }
}

impl From<crate::store::StoreError> for ServerError {
    fn from(e: crate::store::StoreError) -> Self {
        match e {
            crate::store::StoreError::Sealed(e) => ServerError::Secrets(e),
            e => ServerError::Db(e.to_string()),
        }
    }
}

/// An error answer: `{"error": MESSAGE, "code": CODE}` with a status.
#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", "Invalid API key")
    }

    pub fn unauthorized_with(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal_error", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        json_response(
            self.status,
            &ErrorBody {
                error: self.message.as_str(),
                code: self.code,
            },
        )
    }
}

/// A JSON answer with this status.
pub(crate) fn json_response(status: StatusCode, body: &impl serde::Serialize) -> Response {
    json_text_response(status, atp_registry::wire::to_json(body))
}

/// A JSON answer whose text is already written (a wire message).
pub(crate) fn json_text_response(status: StatusCode, body: String) -> Response {
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
