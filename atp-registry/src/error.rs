//! Error types: registration, registry and call errors, and the stable
//! error codes of the ATP HTTP contract.

use std::time::Duration;

/// The stable error codes of docs/PROTOCOL.md §3, with their HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// 404: no toolkit of that name.
    ToolkitNotFound,
    /// 404: no tool of that name in the toolkit.
    ToolNotFound,
    /// 404: any other path under the prefix.
    NotFound,
    /// 405: a method the path does not take.
    MethodNotAllowed,
    /// 400: the body is not JSON, not an object, a bad form, or not UTF-8.
    InvalidBody,
    /// 415: a content type other than JSON or form-encoded.
    UnsupportedMediaType,
    /// 413: the body is over the limit.
    PayloadTooLarge,
    /// 400: a required param is absent or null.
    MissingParams,
    /// 400: a param the tool does not declare.
    UnknownParams,
    /// 400: params a typed tool can not deserialize.
    InvalidParams,
    /// 400: a `provider` that is not known.
    UnknownProvider,
    /// 401: the tool needs an auth token and the call has none.
    AuthRequired,
    /// 401: the toolkit's endpoint key is missing or wrong.
    Unauthorized,
    /// 400: the handler returned an error.
    ToolError,
    /// 500: the handler panicked.
    ToolPanicked,
    /// 504: the handler ran past the toolkit's timeout.
    ToolTimeout,
    /// 429: a rate limit of the server refused the call (over the calls a
    /// second, or too many calls in flight); try again after
    /// `Retry-After`.
    RateLimited,
}

impl ErrorCode {
    /// The code as sent in `{"code": ...}`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::ToolkitNotFound => "toolkit_not_found",
            ErrorCode::ToolNotFound => "tool_not_found",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::InvalidBody => "invalid_body",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::MissingParams => "missing_params",
            ErrorCode::UnknownParams => "unknown_params",
            ErrorCode::InvalidParams => "invalid_params",
            ErrorCode::UnknownProvider => "unknown_provider",
            ErrorCode::AuthRequired => "auth_required",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::ToolError => "tool_error",
            ErrorCode::ToolPanicked => "tool_panicked",
            ErrorCode::ToolTimeout => "tool_timeout",
            ErrorCode::RateLimited => "rate_limited",
        }
    }

    /// The HTTP status that goes with the code.
    pub const fn status(self) -> u16 {
        match self {
            ErrorCode::ToolkitNotFound | ErrorCode::ToolNotFound | ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::AuthRequired | ErrorCode::Unauthorized => 401,
            ErrorCode::ToolPanicked => 500,
            ErrorCode::ToolTimeout => 504,
            ErrorCode::RateLimited => 429,
            ErrorCode::InvalidBody
            | ErrorCode::MissingParams
            | ErrorCode::UnknownParams
            | ErrorCode::InvalidParams
            | ErrorCode::UnknownProvider
            | ErrorCode::ToolError => 400,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A tool registration that breaks a rule of docs/PROTOCOL.md §2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegisterError {
    /// The name is not 1–64 characters from `A-Z a-z 0-9 _ -`.
    #[error("invalid tool name {0:?}: use 1-64 characters from A-Z a-z 0-9 _ -")]
    InvalidToolName(String),
    /// The toolkit already has a tool of that name.
    #[error("a tool named {0:?} is already registered in this toolkit")]
    DuplicateTool(String),
    /// A param is listed twice.
    #[error("param {0:?} is listed twice")]
    DuplicateParam(String),
    /// A param name is empty.
    #[error("a param name is empty")]
    EmptyParamName,
    /// A required param is listed twice.
    #[error("required param {0:?} is listed twice")]
    DuplicateRequired(String),
    /// A required param is not in `params`.
    #[error("required param {0:?} is not in params")]
    RequiredNotInParams(String),
    /// A param is called `auth_token`, which is reserved for the call's token.
    #[error("param name {0:?} is reserved for the call's auth token")]
    ReservedParam(String),
    /// A param schema names a param the tool does not declare.
    #[error("a schema is given for {0:?}, which is not in params")]
    SchemaForUnknownParam(String),
    /// A param schema is not a JSON object.
    #[error("the schema of param {0:?} is not a JSON object")]
    InvalidParamSchema(String),
    /// An announced input schema is not a JSON Schema of type `object`.
    #[error("input_schema must be a JSON Schema of type object")]
    InvalidInputSchema,
    /// An output schema is not a JSON Schema of type `object` (MCP's
    /// `structuredContent` is an object).
    #[error("output_schema must be a JSON Schema of type object")]
    InvalidOutputSchema,
    /// A `#[tool]` function's param has a type whose schema needs
    /// definitions (a recursive type): input schemas are inline.
    #[error(
        "the type of param {0:?} is recursive, and input schemas are inline: take a \
         serde_json::Value and describe it with Tool::param_schema"
    )]
    RecursiveParam(String),
    /// A typed tool's argument type is not a struct with named fields.
    #[error("the argument type of a typed tool must be a struct with named fields: {0}")]
    TypedArgsNotObject(String),
}

/// A registry operation that was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The toolkit name is not 1–128 characters from `A-Z a-z 0-9 _ - .`.
    #[error("invalid toolkit name {0:?}: use 1-128 characters from A-Z a-z 0-9 _ - .")]
    InvalidToolkitName(String),
    /// A toolkit of that name is already registered.
    #[error("a toolkit named {0:?} is already registered")]
    DuplicateToolkit(String),
}

/// Why a tool call failed.
///
/// The `Display` text is the message sent to callers; it never contains an
/// auth token, and a panic's text is logged, not shown.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallError {
    /// No tool of that name.
    #[error("Tool not found")]
    ToolNotFound,
    /// Required params absent or null (and maybe some unknown ones too).
    #[error("{}", missing_message(.missing, .unknown))]
    MissingParams {
        /// The required params that are absent or null.
        missing: Vec<String>,
        /// The params the tool does not declare.
        unknown: Vec<String>,
    },
    /// Params the tool does not declare.
    #[error("Unknown parameters: {}", .0.join(", "))]
    UnknownParams(Vec<String>),
    /// Params that a typed tool can not deserialize (or params that are not
    /// a JSON object).
    #[error("Invalid parameters: {0}")]
    InvalidParams(String),
    /// The tool needs an auth token and the call has none.
    #[error("This tool requires an auth token")]
    AuthRequired,
    /// The handler returned an error; this is its message.
    #[error("{0}")]
    Tool(String),
    /// The handler panicked (the panic text is logged, not shown).
    #[error("The tool panicked")]
    Panicked,
    /// The handler ran past the toolkit's timeout.
    #[error("The tool timed out after {} ms", .0.as_millis())]
    Timeout(Duration),
}

fn missing_message(missing: &[String], unknown: &[String]) -> String {
    let mut msg = format!("Missing required parameters: {}", missing.join(", "));
    if !unknown.is_empty() {
        msg.push_str("; unknown parameters: ");
        msg.push_str(&unknown.join(", "));
    }
    msg
}

impl CallError {
    /// The stable code of docs/PROTOCOL.md §3.
    pub fn code(&self) -> ErrorCode {
        match self {
            CallError::ToolNotFound => ErrorCode::ToolNotFound,
            CallError::MissingParams { .. } => ErrorCode::MissingParams,
            CallError::UnknownParams(_) => ErrorCode::UnknownParams,
            CallError::InvalidParams(_) => ErrorCode::InvalidParams,
            CallError::AuthRequired => ErrorCode::AuthRequired,
            CallError::Tool(_) => ErrorCode::ToolError,
            CallError::Panicked => ErrorCode::ToolPanicked,
            CallError::Timeout(_) => ErrorCode::ToolTimeout,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_statuses() {
        assert_eq!(ErrorCode::PayloadTooLarge.status(), 413);
        assert_eq!(
            ErrorCode::UnsupportedMediaType.as_str(),
            "unsupported_media_type"
        );
        assert_eq!(
            CallError::Timeout(Duration::from_millis(5)).code().status(),
            504
        );
        assert_eq!(CallError::Panicked.code().status(), 500);
        assert_eq!(CallError::AuthRequired.code().status(), 401);
        assert_eq!(ErrorCode::RateLimited.as_str(), "rate_limited");
        assert_eq!(ErrorCode::RateLimited.status(), 429);
    }

    #[test]
    fn missing_names_both_sets() {
        let e = CallError::MissingParams {
            missing: vec!["a".into(), "b".into()],
            unknown: vec!["x".into()],
        };
        assert_eq!(
            e.to_string(),
            "Missing required parameters: a, b; unknown parameters: x"
        );
        assert_eq!(
            CallError::UnknownParams(vec!["x".into(), "y".into()]).to_string(),
            "Unknown parameters: x, y"
        );
    }
}
