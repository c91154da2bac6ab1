//! Tool definitions: metadata, handlers and the arguments a handler gets.

use std::{fmt, future::Future, pin::Pin, sync::Arc};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::{error::RegisterError, secret::AuthToken};

/// The name of the body key that carries a call's auth token; no tool may
/// declare it as a param.
pub const AUTH_TOKEN_PARAM: &str = "auth_token";

/// The longest tool name providers accept.
pub const MAX_TOOL_NAME_LEN: usize = 64;
/// The longest toolkit name.
pub const MAX_TOOLKIT_NAME_LEN: usize = 128;

/// Whether `name` is a valid tool name: 1–64 characters from
/// `A-Z a-z 0-9 _ -` (the rule OpenAI, Anthropic and Mistral share).
///
/// It is a `const fn`: `#[tool]` checks a name with it at compile time,
/// so the macro and the builder share this one rule.
///
/// ```
/// const OK: bool = atp_registry::is_valid_tool_name("hello_world");
/// assert!(OK);
/// assert!(!atp_registry::is_valid_tool_name("hello world"));
/// ```
pub const fn is_valid_tool_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() > MAX_TOOL_NAME_LEN {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if !(b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether `name` is reserved and can not name a param: it is
/// [`AUTH_TOKEN_PARAM`]. A `const fn`, for `#[tool]`'s compile-time check.
pub const fn is_reserved_param(name: &str) -> bool {
    let (a, b) = (name.as_bytes(), AUTH_TOKEN_PARAM.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// Whether `name` is a valid toolkit name: 1–128 characters from
/// `A-Z a-z 0-9 _ - .`.
pub fn is_valid_toolkit_name(name: &str) -> bool {
    (1..=MAX_TOOLKIT_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
}

/// The description of a tool, built the way the Python SDK's `register_tool`
/// takes its arguments.
///
/// ```
/// use atp_registry::Tool;
///
/// let tool = Tool::new("create_company")
///     .description("Creates a company in HubSpot.")
///     .params(["name", "domain"])
///     .required_params(["name"])
///     .auth_provider("hubspot")
///     .auth_type("OAuth2")
///     .auth_with("access_token");
/// assert_eq!(tool.name(), "create_company");
/// ```
#[derive(Debug, Clone, Default)]
pub struct Tool {
    pub(crate) name: String,
    pub(crate) description: String,
    pub(crate) params: Vec<String>,
    pub(crate) required_params: Vec<String>,
    pub(crate) auth_provider: Option<String>,
    pub(crate) auth_type: Option<String>,
    pub(crate) auth_with: Option<String>,
    pub(crate) param_schemas: Vec<(String, Value)>,
    pub(crate) schema: Option<Value>,
    pub(crate) output_schema: Option<Value>,
}

impl Tool {
    /// A tool called `function_name` (the Python SDK's argument name), with no
    /// params and no auth.
    pub fn new(function_name: impl Into<String>) -> Self {
        Self {
            name: function_name.into(),
            ..Self::default()
        }
    }

    /// The human-readable description given to the model.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = description.into();
        self
    }

    /// All parameter names, in order.
    pub fn params<I, S>(mut self, params: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.params = params.into_iter().map(Into::into).collect();
        self
    }

    /// The required parameter names (a subset of [`Tool::params`]).
    pub fn required_params<I, S>(mut self, required: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.required_params = required.into_iter().map(Into::into).collect();
        self
    }

    /// The OAuth2 / API key provider (e.g. `"hubspot"`). A tool with a
    /// provider or an auth type refuses calls without an auth token.
    pub fn auth_provider(mut self, provider: impl Into<String>) -> Self {
        self.auth_provider = Some(provider.into());
        self
    }

    /// The auth type (e.g. `"OAuth2"`, `"apiKey"`).
    pub fn auth_type(mut self, auth_type: impl Into<String>) -> Self {
        self.auth_type = Some(auth_type.into());
        self
    }

    /// The name of the token parameter (e.g. `"access_token"`).
    pub fn auth_with(mut self, auth_with: impl Into<String>) -> Self {
        self.auth_with = Some(auth_with.into());
        self
    }

    /// The JSON Schema of one untyped param, instead of the default
    /// `{"type": "string"}`.
    pub fn param_schema(mut self, param: impl Into<String>, schema: Value) -> Self {
        self.param_schemas.push((param.into(), schema));
        self
    }

    /// The whole input schema, as it is (JSON Schema 2020-12, `$defs`
    /// and all), instead of one built from the params: the params become
    /// its `properties`' names and the required params its `required`.
    ///
    /// ```
    /// use atp_registry::Tool;
    /// use serde_json::json;
    ///
    /// let tool = Tool::new("ship").schema(json!({
    ///     "type": "object",
    ///     "$defs": {"address": {"type": "object", "properties": {"city": {"type": "string"}}}},
    ///     "properties": {"to": {"$ref": "#/$defs/address"}},
    ///     "required": ["to"],
    ///     "additionalProperties": false
    /// }));
    /// assert_eq!(tool.input_schema()["required"], json!(["to"]));
    /// ```
    pub fn schema(mut self, schema: Value) -> Self {
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            self.params = props.keys().cloned().collect();
        } else {
            self.params.clear();
        }
        self.required_params = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        self.schema = Some(schema);
        self
    }

    /// The JSON Schema of the tool's result, when it is an object: the
    /// MCP face advertises it as the tool's `outputSchema` and answers
    /// its calls with `structuredContent`. ATP itself has no output
    /// schema: the tool's context and provider schemas do not change.
    /// `#[tool]` sets it from the result type when that type has an
    /// object schema.
    ///
    /// ```
    /// use atp_registry::Tool;
    /// use serde_json::json;
    ///
    /// let tool = Tool::new("greet").output_schema(json!({
    ///     "type": "object",
    ///     "properties": {"message": {"type": "string"}},
    ///     "required": ["message"]
    /// }));
    /// assert!(tool.validate().is_ok());
    /// assert!(Tool::new("n").output_schema(json!({"type": "integer"})).validate().is_err());
    /// ```
    pub fn output_schema(mut self, schema: Value) -> Self {
        self.output_schema = Some(schema);
        self
    }

    /// The tool's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks every registration rule that concerns the tool alone (its
    /// name, its params, its param schemas, its output schema).
    pub fn validate(&self) -> Result<(), RegisterError> {
        check_rules(&self.name, &self.params, &self.required_params)?;
        if let Some(schema) = &self.schema
            && !(schema.is_object() && schema.get("type").is_none_or(|t| t == "object"))
        {
            return Err(RegisterError::InvalidInputSchema);
        }
        if let Some(schema) = &self.output_schema
            && !is_object_schema(schema)
        {
            return Err(RegisterError::InvalidOutputSchema);
        }
        for (p, schema) in &self.param_schemas {
            if !self.params.contains(p) {
                return Err(RegisterError::SchemaForUnknownParam(p.clone()));
            }
            if !schema.is_object() {
                return Err(RegisterError::InvalidParamSchema(p.clone()));
            }
        }
        Ok(())
    }

    /// Whether calls must carry an auth token: the tool has an auth
    /// provider or an auth type.
    pub fn requires_auth(&self) -> bool {
        requires_auth(self.auth_provider.as_deref(), self.auth_type.as_deref())
    }

    /// The input schema this tool describes: every param
    /// `{"type": "string"}` unless [`param_schema`](Self::param_schema)
    /// said otherwise.
    pub fn input_schema(&self) -> Value {
        crate::schema::untyped_schema(self)
    }

    /// The tool's description, checked against the registration rules.
    pub fn spec(&self) -> Result<ToolSpec, RegisterError> {
        self.validate()?;
        Ok(self.spec_with(self.input_schema()))
    }

    pub(crate) fn spec_with(&self, input_schema: Value) -> ToolSpec {
        ToolSpec {
            name: self.name.clone(),
            description: self.description.clone(),
            params: self.params.clone(),
            required_params: self.required_params.clone(),
            auth_provider: self.auth_provider.clone(),
            auth_type: self.auth_type.clone(),
            auth_with: self.auth_with.clone(),
            input_schema,
        }
    }
}

/// Whether `schema` is a JSON Schema of type `object` (`"type": "object"`).
pub(crate) fn is_object_schema(schema: &Value) -> bool {
    schema.as_object().is_some_and(is_object_schema_map)
}

/// [`is_object_schema`] of a schema that is a JSON object.
pub(crate) fn is_object_schema_map(schema: &Map<String, Value>) -> bool {
    schema.get("type").and_then(Value::as_str) == Some("object")
}

fn requires_auth(provider: Option<&str>, auth_type: Option<&str>) -> bool {
    provider.is_some() || auth_type.is_some()
}

/// The registration rules of a tool's name and params.
fn check_rules(name: &str, params: &[String], required: &[String]) -> Result<(), RegisterError> {
    if !is_valid_tool_name(name) {
        return Err(RegisterError::InvalidToolName(name.to_owned()));
    }
    let mut seen = std::collections::HashSet::new();
    for p in params {
        if is_reserved_param(p) {
            return Err(RegisterError::ReservedParam(p.clone()));
        }
        if p.is_empty() {
            return Err(RegisterError::EmptyParamName);
        }
        if !seen.insert(p.as_str()) {
            return Err(RegisterError::DuplicateParam(p.clone()));
        }
    }
    let mut seen_required = std::collections::HashSet::new();
    for r in required {
        if !seen.contains(r.as_str()) {
            return Err(RegisterError::RequiredNotInParams(r.clone()));
        }
        if !seen_required.insert(r.as_str()) {
            return Err(RegisterError::DuplicateRequired(r.clone()));
        }
    }
    Ok(())
}

/// A tool's description without its handler: its name, params, auth
/// metadata and input schema. It is what a toolkit announces to an ATP
/// server and what the server keeps and checks calls against; a
/// [`RegisteredTool`](crate::RegisteredTool) holds one.
///
/// ```
/// use atp_registry::{ToolSpec, wire::ToolMetadata};
///
/// let meta = ToolMetadata {
///     params: vec!["name".into()],
///     required_params: vec!["name".into()],
///     ..Default::default()
/// };
/// let spec = ToolSpec::from_metadata("hello_world", meta)?;
/// assert_eq!(spec.input_schema()["properties"]["name"], serde_json::json!({"type": "string"}));
/// assert!(ToolSpec::from_metadata("bad name", Default::default()).is_err());
/// # Ok::<(), atp_registry::RegisterError>(())
/// ```
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ToolSpec {
    /// The tool's name.
    pub name: String,
    /// Its description.
    pub description: String,
    /// All param names, in order.
    pub params: Vec<String>,
    /// The required ones.
    pub required_params: Vec<String>,
    /// The auth provider, if any.
    pub auth_provider: Option<String>,
    /// The auth type, if any.
    pub auth_type: Option<String>,
    /// The token's param name, if any.
    pub auth_with: Option<String>,
    /// The JSON Schema of the tool's input.
    pub input_schema: Value,
}

impl ToolSpec {
    /// A tool as a toolkit announced it: the name and params checked
    /// against the registration rules; the input schema as given (it must
    /// be an object schema), else every param described as a string.
    pub fn from_metadata(
        name: &str,
        meta: crate::wire::ToolMetadata,
    ) -> Result<Self, RegisterError> {
        let mut tool = Tool::new(name)
            .description(meta.description.unwrap_or_default())
            .params(meta.params)
            .required_params(meta.required_params);
        tool.auth_provider = meta.auth_provider;
        tool.auth_type = meta.auth_type;
        tool.auth_with = meta.auth_with;
        tool.validate()?;
        let input_schema = match meta.input_schema {
            None | Some(Value::Null) => tool.input_schema(),
            Some(schema) => schema,
        };
        let spec = tool.spec_with(input_schema);
        spec.validate()?;
        Ok(spec)
    }

    /// Checks the registration rules: the name, the params, and an input
    /// schema of type `object`.
    pub fn validate(&self) -> Result<(), RegisterError> {
        check_rules(&self.name, &self.params, &self.required_params)?;
        match &self.input_schema {
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("object") => Ok(()),
            _ => Err(RegisterError::InvalidInputSchema),
        }
    }

    /// The JSON Schema of the tool's input.
    pub fn input_schema(&self) -> &Value {
        &self.input_schema
    }

    /// Whether calls must carry an auth token.
    pub fn requires_auth(&self) -> bool {
        requires_auth(self.auth_provider.as_deref(), self.auth_type.as_deref())
    }

    /// What a toolkit announces of the tool (`register_tool`'s `metadata`).
    pub fn metadata(&self) -> crate::wire::ToolMetadata {
        crate::wire::ToolMetadata {
            params: self.params.clone(),
            required_params: self.required_params.clone(),
            description: Some(self.description.clone()),
            auth_provider: self.auth_provider.clone(),
            auth_type: self.auth_type.clone(),
            auth_with: self.auth_with.clone(),
            input_schema: Some(self.input_schema.clone()),
            sample_response: Value::String(String::new()),
            source_code: Value::String(String::new()),
            endpoint_url: None,
        }
    }

    /// The tool's context, as `GET /atp/{toolkit}/{tool}/` answers it.
    pub fn context(&self) -> crate::wire::ToolContext {
        crate::wire::ToolContext {
            function: self.name.clone(),
            params: self.params.clone(),
            required_params: self.required_params.clone(),
            description: self.description.clone(),
            auth_provider: self.auth_provider.clone(),
            auth_type: self.auth_type.clone(),
            auth_with: self.auth_with.clone(),
            input_schema: self.input_schema.clone(),
        }
    }

    /// The tool in `provider`'s format.
    pub fn provider_schema(&self, provider: crate::Provider, strict: bool) -> Value {
        provider.tool_schema(&self.name, &self.description, &self.input_schema, strict)
    }

    /// Checks a call's auth token and params: a token when the tool needs
    /// one (`auth_required`), then the params (`missing_params`,
    /// `unknown_params`).
    pub fn check(
        &self,
        params: &Map<String, Value>,
        auth_token: Option<&AuthToken>,
    ) -> Result<(), crate::CallError> {
        if self.requires_auth() && auth_token.is_none_or(crate::Secret::is_empty) {
            return Err(crate::CallError::AuthRequired);
        }
        crate::check_params(&self.params, &self.required_params, params)
    }
}

/// What a handler gets: the call's params, its auth token and a way to
/// report progress.
#[derive(Debug, Default)]
pub struct Call {
    params: Map<String, Value>,
    auth_token: Option<AuthToken>,
    progress: Progress,
}

impl Call {
    /// A call with these params and token (and no progress reporting).
    pub fn new(params: Map<String, Value>, auth_token: Option<AuthToken>) -> Self {
        Self {
            params,
            auth_token,
            progress: Progress::default(),
        }
    }

    /// The same call, reporting its progress to `progress`.
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// All params of the call (a JSON object).
    pub fn params(&self) -> &Map<String, Value> {
        &self.params
    }

    /// One param, if the call has it.
    pub fn param(&self, name: &str) -> Option<&Value> {
        self.params.get(name)
    }

    /// One param as a string, if the call has it and it is a string.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.params.get(name).and_then(Value::as_str)
    }

    /// The call's auth token (the Python SDK's `kwargs['auth_token']`).
    pub fn auth_token(&self) -> Option<&AuthToken> {
        self.auth_token.as_ref()
    }

    /// Reports how far the tool is: `progress` out of `total` (when known),
    /// with a line for people. See [`Progress::report`]: it never waits,
    /// and it does nothing where nobody listens.
    ///
    /// ```
    /// use atp_registry::{Call, ToolError};
    ///
    /// async fn import(call: Call) -> Result<u32, ToolError> {
    ///     for done in 1..=3 {
    ///         // ... one step of the work ...
    ///         call.progress(done as f64, Some(3.0), Some("importing"));
    ///     }
    ///     Ok(3)
    /// }
    /// ```
    pub fn progress(&self, progress: f64, total: Option<f64>, message: Option<&str>) -> bool {
        self.progress.report(progress, total, message)
    }

    /// Logs a message at `level`: an MCP client calling the tool gets it
    /// as a `notifications/message`; ATP callers get nothing (ATP has no
    /// log message). Like [`progress`](Self::progress) it never waits.
    ///
    /// ```
    /// use atp_registry::{Call, LogLevel, ToolError};
    ///
    /// async fn sync(call: Call) -> Result<&'static str, ToolError> {
    ///     call.log(LogLevel::Info, "sync started");
    ///     Ok("done")
    /// }
    /// ```
    pub fn log(&self, level: LogLevel, data: impl Into<Value>) -> bool {
        self.progress.log(level, data)
    }

    /// The call's progress handle, to report from another task or thread.
    pub fn progress_handle(&self) -> Progress {
        self.progress.clone()
    }

    /// Deserializes the params into `T`.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ToolError> {
        T::deserialize(Value::Object(self.params.clone())).map_err(ToolError::new)
    }

    /// Takes the params and the token apart.
    pub fn into_parts(self) -> (Map<String, Value>, Option<AuthToken>) {
        (self.params, self.auth_token)
    }
}

/// Where a tool's progress goes: a cheap handle, cloned from
/// [`Call::progress_handle`].
///
/// Over the WebSocket runtime each report is a `tool_progress` message to
/// the ATP server (which streams it to the caller as `task_progress`). A
/// report never waits: when the connection's outbox is full it is dropped.
/// Over the HTTP inbox, the HTTP endpoints and
/// [`call_tool_by_name`](crate::ToolKitClient::call_tool_by_name) nobody
/// listens and a report does nothing.
#[derive(Clone, Default)]
pub struct Progress {
    sink: Option<Arc<ProgressSink>>,
}

struct ProgressSink {
    target: Target,
    done: std::sync::atomic::AtomicBool,
}

/// Where reports go.
enum Target {
    /// `tool_progress` (and, when the request asked, `tool_log`) frames
    /// of one request, for the WebSocket runtime.
    Frames {
        request_id: crate::wire::RequestId,
        tx: tokio::sync::mpsc::Sender<String>,
        logs: bool,
    },
    /// Reports as they are, for the MCP endpoints.
    Events(tokio::sync::mpsc::Sender<ToolEvent>),
}

/// A report of a running tool: what [`Call::progress`] and [`Call::log`]
/// send.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolEvent {
    /// How far the tool is.
    Progress {
        /// How far along (in units of `total`, when given).
        progress: f64,
        /// The whole, when known.
        total: Option<f64>,
        /// A line for people.
        message: Option<String>,
    },
    /// A log message of the tool.
    Log {
        /// Its level.
        level: LogLevel,
        /// What it says: a string or any JSON value.
        data: Value,
    },
}

/// The level of a tool's log message ([`Call::log`]): the syslog levels
/// MCP uses, least severe first.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogLevel {
    /// Detailed debugging information.
    Debug,
    /// Normal operation.
    Info,
    /// Normal but significant.
    Notice,
    /// A warning.
    Warning,
    /// An error.
    Error,
    /// A critical condition.
    Critical,
    /// Action must be taken at once.
    Alert,
    /// The system is unusable.
    Emergency,
}

impl LogLevel {
    /// The level's name on the wire (`"debug"`, `"info"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Notice => "notice",
            LogLevel::Warning => "warning",
            LogLevel::Error => "error",
            LogLevel::Critical => "critical",
            LogLevel::Alert => "alert",
            LogLevel::Emergency => "emergency",
        }
    }

    /// The level of a wire name.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "debug" => LogLevel::Debug,
            "info" => LogLevel::Info,
            "notice" => LogLevel::Notice,
            "warning" => LogLevel::Warning,
            "error" => LogLevel::Error,
            "critical" => LogLevel::Critical,
            "alert" => LogLevel::Alert,
            "emergency" => LogLevel::Emergency,
            _ => return None,
        })
    }
}

impl fmt::Debug for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Progress")
            .field("listened", &self.is_listened())
            .finish()
    }
}

impl Progress {
    /// A handle whose reports go to `tx` as `tool_progress` frames of
    /// `request_id`, and its log messages as `tool_log` frames when `logs`.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn channel(
        request_id: crate::wire::RequestId,
        tx: tokio::sync::mpsc::Sender<String>,
        logs: bool,
    ) -> Self {
        Self {
            sink: Some(Arc::new(ProgressSink {
                target: Target::Frames {
                    request_id,
                    tx,
                    logs,
                },
                done: Default::default(),
            })),
        }
    }

    /// A handle whose reports (progress and logs) go to `tx` as they are.
    pub fn events(tx: tokio::sync::mpsc::Sender<ToolEvent>) -> Self {
        Self {
            sink: Some(Arc::new(ProgressSink {
                target: Target::Events(tx),
                done: Default::default(),
            })),
        }
    }

    /// Stops the reports: the call has been answered.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) fn finish(&self) {
        if let Some(sink) = &self.sink {
            sink.done.store(true, std::sync::atomic::Ordering::Release);
        }
    }

    /// Whether reports go anywhere (a WebSocket runtime's call that has not
    /// been answered yet).
    pub fn is_listened(&self) -> bool {
        self.sink.as_ref().is_some_and(|s| {
            !s.done.load(std::sync::atomic::Ordering::Acquire)
                && match &s.target {
                    Target::Frames { tx, .. } => !tx.is_closed(),
                    Target::Events(tx) => !tx.is_closed(),
                }
        })
    }

    /// Reports `progress` (out of `total`, when known) with an optional
    /// message. Returns whether the report was queued: `false` when nobody
    /// listens, the call is answered already, the outbox is full, or a
    /// number is not finite.
    pub fn report(&self, progress: f64, total: Option<f64>, message: Option<&str>) -> bool {
        let Some(sink) = &self.sink else {
            return false;
        };
        if !progress.is_finite()
            || total.is_some_and(|t| !t.is_finite())
            || sink.done.load(std::sync::atomic::Ordering::Acquire)
        {
            return false;
        }
        match &sink.target {
            Target::Frames { request_id, tx, .. } => {
                let frame = crate::wire::ToolkitToServer::ToolProgress(crate::wire::ToolProgress {
                    request_id: request_id.clone(),
                    progress,
                    total,
                    message: message.map(str::to_owned),
                });
                tx.try_send(frame.to_json()).is_ok()
            }
            Target::Events(tx) => tx
                .try_send(ToolEvent::Progress {
                    progress,
                    total,
                    message: message.map(str::to_owned),
                })
                .is_ok(),
        }
    }

    /// Sends a log message at `level`. Returns whether it was queued:
    /// `false` when nobody listens for logs (MCP clients do, directly or
    /// through atp-server, which asks a WebSocket toolkit for `tool_log`
    /// frames; ATP callers have no log message), the call is answered
    /// already, or the queue is full.
    pub fn log(&self, level: LogLevel, data: impl Into<Value>) -> bool {
        let Some(sink) = &self.sink else {
            return false;
        };
        if sink.done.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        match &sink.target {
            Target::Frames {
                request_id,
                tx,
                logs: true,
            } => {
                let frame = crate::wire::ToolkitToServer::ToolLog(crate::wire::ToolLog {
                    request_id: request_id.clone(),
                    level,
                    data: data.into(),
                });
                tx.try_send(frame.to_json()).is_ok()
            }
            Target::Frames { logs: false, .. } => false,
            Target::Events(tx) => tx
                .try_send(ToolEvent::Log {
                    level,
                    data: data.into(),
                })
                .is_ok(),
        }
    }
}

/// An error a handler returns; its message is what the caller sees.
///
/// Handlers may return any error type that implements `Display`; this one
/// is for when a message is all there is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ToolError(String);

impl ToolError {
    /// An error with this message.
    pub fn new(message: impl fmt::Display) -> Self {
        Self(message.to_string())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What the type-erased handler produces: the result as JSON, or the
/// handler's error message.
pub(crate) type HandlerOutput = Result<Value, String>;

/// The work of a blocking handler whose params are read already.
pub(crate) type BlockingJob = Box<dyn FnOnce() -> HandlerOutput + Send>;

/// A handler, with its kind.
#[derive(Clone)]
pub(crate) enum Handler {
    /// Runs on the async executor.
    Async(Arc<dyn Fn(Call) -> BoxFuture<HandlerOutput> + Send + Sync>),
    /// Runs on tokio's blocking pool.
    Blocking(Arc<dyn Fn(Call) -> HandlerOutput + Send + Sync>),
    /// Deserializes the params first; the error is an `invalid_params`
    /// message.
    Typed(Arc<dyn Fn(Call) -> Result<BoxFuture<HandlerOutput>, String> + Send + Sync>),
    /// Deserializes the params first (an `invalid_params` message), then
    /// runs the job on tokio's blocking pool: a plain `fn` under `#[tool]`.
    TypedBlocking(Arc<dyn Fn(Call) -> Result<BlockingJob, String> + Send + Sync>),
    /// An interactive app: not callable as a tool.
    App(crate::app::AppHandler),
}

pub(crate) fn into_output<T: Serialize + 'static, E: fmt::Display>(
    r: Result<T, E>,
) -> HandlerOutput {
    let value = r.map_err(|e| e.to_string())?;
    // A handler that already returns JSON (`json!`, a `Value`) hands it
    // over as it is: `to_value` would rebuild it node by node.
    let mut slot = Some(value);
    if let Some(json) = (&mut slot as &mut dyn std::any::Any).downcast_mut::<Option<Value>>()
        && let Some(json) = json.take()
    {
        return Ok(json);
    }
    serde_json::to_value(slot)
        .map_err(|e| format!("the tool's result could not be serialized: {e}"))
}

impl Handler {
    pub(crate) fn from_async<F, Fut, T, E>(f: F) -> Self
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        Handler::Async(Arc::new(move |call| {
            let fut = f(call);
            Box::pin(async move { into_output(fut.await) })
        }))
    }

    pub(crate) fn from_blocking<F, T, E>(f: F) -> Self
    where
        F: Fn(Call) -> Result<T, E> + Send + Sync + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        Handler::Blocking(Arc::new(move |call| into_output(f(call))))
    }

    pub(crate) fn from_typed<A, F, Fut, T, E>(f: F) -> Self
    where
        A: DeserializeOwned,
        F: Fn(A, Option<AuthToken>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        Handler::Typed(Arc::new(move |call| {
            let (params, token) = call.into_parts();
            let args = A::deserialize(Value::Object(params)).map_err(|e| e.to_string())?;
            let fut = f(args, token);
            Ok(Box::pin(async move { into_output(fut.await) }) as BoxFuture<_>)
        }))
    }

    pub(crate) fn from_typed_with_call<A, F, Fut, T, E>(f: F) -> Self
    where
        A: DeserializeOwned,
        F: Fn(A, Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        Handler::Typed(Arc::new(move |mut call| {
            let params = Value::Object(std::mem::take(&mut call.params));
            let args = A::deserialize(&params).map_err(|e| e.to_string())?;
            if let Value::Object(params) = params {
                call.params = params;
            }
            let fut = f(args, call);
            Ok(Box::pin(async move { into_output(fut.await) }) as BoxFuture<_>)
        }))
    }

    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Handler::Async(_) => "async",
            Handler::Blocking(_) => "blocking",
            Handler::Typed(_) => "typed",
            Handler::TypedBlocking(_) => "typed blocking",
            Handler::App(_) => "app",
        }
    }
}

impl fmt::Debug for Handler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Handler").field(&self.kind()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tool_names() {
        assert!(is_valid_tool_name("hello_world"));
        assert!(is_valid_tool_name("a-B_9"));
        assert!(is_valid_tool_name(&"a".repeat(64)));
        assert!(!is_valid_tool_name(&"a".repeat(65)));
        assert!(!is_valid_tool_name(""));
        assert!(!is_valid_tool_name("has space"));
        assert!(!is_valid_tool_name("dot.ted"));
        assert!(!is_valid_tool_name("ünï"));
        assert!(!is_valid_tool_name("a/b"));
    }

    #[test]
    fn toolkit_names() {
        assert!(is_valid_toolkit_name("my.app-1_x"));
        assert!(is_valid_toolkit_name(&"a".repeat(128)));
        assert!(!is_valid_toolkit_name(&"a".repeat(129)));
        assert!(!is_valid_toolkit_name(""));
        assert!(!is_valid_toolkit_name("a b"));
        assert!(!is_valid_toolkit_name("a/b"));
        assert!(!is_valid_toolkit_name("a%b"));
    }

    #[test]
    fn validation_rules() {
        let ok = Tool::new("t").params(["a", "b"]).required_params(["a"]);
        assert!(ok.validate().is_ok());
        assert!(matches!(
            Tool::new("bad name").validate(),
            Err(RegisterError::InvalidToolName(_))
        ));
        assert!(matches!(
            Tool::new("t").params(["a"]).required_params(["b"]).validate(),
            Err(RegisterError::RequiredNotInParams(p)) if p == "b"
        ));
        assert!(matches!(
            Tool::new("t")
                .params(["a"])
                .required_params(["a", "a"])
                .validate(),
            Err(RegisterError::DuplicateRequired(_))
        ));
        assert!(matches!(
            Tool::new("t").params(["a", "a"]).validate(),
            Err(RegisterError::DuplicateParam(_))
        ));
        assert!(matches!(
            Tool::new("t").params(["auth_token"]).validate(),
            Err(RegisterError::ReservedParam(_))
        ));
        assert!(matches!(
            Tool::new("t").params([""]).validate(),
            Err(RegisterError::EmptyParamName)
        ));
        assert!(matches!(
            Tool::new("t")
                .param_schema("x", serde_json::json!({}))
                .validate(),
            Err(RegisterError::SchemaForUnknownParam(_))
        ));
        assert!(matches!(
            Tool::new("t")
                .params(["x"])
                .param_schema("x", serde_json::json!(1))
                .validate(),
            Err(RegisterError::InvalidParamSchema(_))
        ));
    }

    #[test]
    fn requires_auth_on_provider_or_type() {
        assert!(!Tool::new("t").requires_auth());
        assert!(Tool::new("t").auth_provider("x").requires_auth());
        assert!(Tool::new("t").auth_type("OAuth2").requires_auth());
        assert!(!Tool::new("t").auth_with("access_token").requires_auth());
    }

    #[tokio::test]
    async fn progress_goes_out_until_the_call_is_answered_and_never_waits() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(2);
        let progress = Progress::channel("r1".into(), tx, false);
        let call = Call::new(Map::new(), None).with_progress(progress.clone());
        assert!(call.progress_handle().is_listened());
        assert!(call.progress(1.0, Some(4.0), Some("one")));
        assert!(call.progress(2.0, None, None));
        // The outbox is full: dropped, not waited for.
        assert!(!call.progress(3.0, None, None));
        assert!(!call.progress(f64::NAN, None, None));
        let first: Value = serde_json::from_str(&rx.recv().await.expect("sent")).expect("JSON");
        assert_eq!(
            first,
            serde_json::json!({"type": "tool_progress", "request_id": "r1", "progress": 1.0, "total": 4.0, "message": "one"})
        );
        let second: Value = serde_json::from_str(&rx.recv().await.expect("sent")).expect("JSON");
        assert_eq!(
            second,
            serde_json::json!({"type": "tool_progress", "request_id": "r1", "progress": 2.0})
        );
        progress.finish();
        assert!(!call.progress(4.0, None, None));
        assert!(!call.progress_handle().is_listened());
        // Nobody listens: a no-op.
        assert!(!Call::default().progress(1.0, None, None));
    }
}
