//! [`ToolKitClient`]: a toolkit, its settings and its tools.

use std::{
    any::Any,
    collections::HashMap,
    fmt,
    future::Future,
    panic::{AssertUnwindSafe, catch_unwind},
    pin::Pin,
    sync::{Arc, PoisonError, RwLock},
    task::{Context, Poll},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value};

use crate::ToolSpec;

use crate::{
    app::{self, AppCall, AppReply},
    define::{ToolDef, Toolkit, ToolkitState},
    error::{CallError, RegisterError},
    schema::{Provider, typed_schema, untyped_schema},
    secret::{AuthToken, Secret},
    tool::{BlockingJob, BoxFuture, Call, Handler, HandlerOutput, Progress, Tool},
};

/// The ATP server the Python SDK's client talks to by default.
pub const DEFAULT_BASE_URL: &str = "https://api.chat-atp.com";

/// The default body limit of the HTTP endpoints: 1 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 1024 * 1024;

/// A toolkit: its API key, app name, ATP server URL, settings and tools —
/// the Python SDK's `ToolKitClient`.
///
/// It is a cheap handle: clones share the same tools, so a client can be
/// registered with [`register_client`](crate::register_client) and still
/// get new tools afterwards, while it is being served. Settings
/// (`with_*`) belong to the handle they are called on: set them before
/// sharing the client.
///
/// ```
/// use atp_registry::{Call, Tool, ToolError, ToolKitClient};
/// use serde_json::{Value, json};
///
/// async fn hello_world(call: Call) -> Result<Value, ToolError> {
///     let name = call.str("name").unwrap_or("World");
///     Ok(json!({"message": format!("Hello, {name}!")}))
/// }
///
/// let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "my_app");
/// client
///     .register_tool(
///         Tool::new("hello_world")
///             .description("Returns a greeting.")
///             .params(["name"])
///             .required_params(["name"]),
///         hello_world,
///     )
///     .unwrap();
/// assert_eq!(client.tool_names(), ["hello_world"]);
/// ```
#[derive(Clone)]
pub struct ToolKitClient {
    pub(crate) config: Arc<Config>,
    tools: Arc<RwLock<Tools>>,
    #[cfg(feature = "runtime")]
    pub(crate) control: Arc<crate::runtime::Control>,
}

#[derive(Clone)]
pub(crate) struct Config {
    api_key: Secret,
    app_name: String,
    base_url: String,
    timeout: Option<Duration>,
    body_limit: usize,
    endpoint_key: Option<Secret>,
    #[cfg(feature = "runtime")]
    pub(crate) runtime: crate::runtime::RuntimeOptions,
}

#[derive(Default)]
struct Tools {
    list: Vec<Arc<RegisteredTool>>,
    by_name: HashMap<String, usize>,
}

impl ToolKitClient {
    /// A toolkit with the Python SDK's defaults: base URL
    /// [`DEFAULT_BASE_URL`], no timeout, a 1 MiB body limit, no endpoint key.
    pub fn new(api_key: impl Into<Secret>, app_name: impl Into<String>) -> Self {
        Self {
            config: Arc::new(Config {
                api_key: api_key.into(),
                app_name: app_name.into(),
                base_url: DEFAULT_BASE_URL.to_owned(),
                timeout: None,
                body_limit: DEFAULT_BODY_LIMIT,
                endpoint_key: None,
                #[cfg(feature = "runtime")]
                runtime: Default::default(),
            }),
            tools: Arc::default(),
            #[cfg(feature = "runtime")]
            control: Arc::default(),
        }
    }

    /// Sets the ATP server URL (the Python SDK's `base_url`).
    pub fn with_base_url(mut self, base_url: impl Into<String>) -> Self {
        let config = Arc::make_mut(&mut self.config);
        config.base_url = base_url.into();
        // One URL replaces a list given before (the last call wins).
        #[cfg(feature = "runtime")]
        config.runtime.forget_base_urls();
        self
    }

    /// Sets the longest a tool call may run; past it the call fails with
    /// [`CallError::Timeout`]. Off by default. A blocking handler past the
    /// timeout keeps running on its thread until it returns (a thread can
    /// not be killed), but the caller gets its answer at the timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        Arc::make_mut(&mut self.config).timeout = Some(timeout);
        self
    }

    /// Sets the largest request body the HTTP endpoints accept (1 MiB by
    /// default).
    pub fn with_body_limit(mut self, bytes: usize) -> Self {
        Arc::make_mut(&mut self.config).body_limit = bytes;
        self
    }

    /// Requires every HTTP request to this toolkit to carry
    /// `X-ATP-Key: KEY` (compared in constant time). A locked toolkit is
    /// left out of the `GET /atp/` listing.
    pub fn with_endpoint_key(mut self, key: impl Into<Secret>) -> Self {
        Arc::make_mut(&mut self.config).endpoint_key = Some(key.into());
        self
    }

    /// The toolkit's API key.
    pub fn api_key(&self) -> &Secret {
        &self.config.api_key
    }

    /// The app name.
    pub fn app_name(&self) -> &str {
        &self.config.app_name
    }

    /// The ATP server URL.
    pub fn base_url(&self) -> &str {
        &self.config.base_url
    }

    /// The tool timeout, if any.
    pub fn timeout(&self) -> Option<Duration> {
        self.config.timeout
    }

    /// The HTTP body limit in bytes.
    pub fn body_limit(&self) -> usize {
        self.config.body_limit
    }

    /// The endpoint key, if the toolkit requires one.
    pub fn endpoint_key(&self) -> Option<&Secret> {
        self.config.endpoint_key.as_ref()
    }

    /// Registers a tool with an async handler. The handler gets the
    /// call's params and auth token and returns any owned `Serialize`
    /// value (a `serde_json::Value` is sent as it is), or an error whose
    /// `Display` text is the message callers see.
    pub fn register_tool<F, Fut, T, E>(&self, tool: Tool, handler: F) -> Result<(), RegisterError>
    where
        F: Fn(Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        let schema = untyped_schema(&tool);
        self.insert(tool, schema, Handler::from_async(handler))
    }

    /// Registers a tool whose handler blocks (file or network I/O with a
    /// blocking library, heavy computation). It runs on tokio's blocking
    /// pool, never on the async executor.
    pub fn register_blocking_tool<F, T, E>(
        &self,
        tool: Tool,
        handler: F,
    ) -> Result<(), RegisterError>
    where
        F: Fn(Call) -> Result<T, E> + Send + Sync + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        let schema = untyped_schema(&tool);
        self.insert(tool, schema, Handler::from_blocking(handler))
    }

    /// Registers a tool whose handler takes a typed struct. Its `params`,
    /// `required_params` and input schema are derived from `A` (whatever
    /// the `tool` said of them is replaced), so they can not drift from
    /// the code. The handler also gets the call's auth token.
    ///
    /// ```
    /// use atp_registry::{Tool, ToolError, ToolKitClient};
    ///
    /// #[derive(serde::Deserialize, schemars::JsonSchema)]
    /// struct Add { a: i64, b: i64 }
    ///
    /// let client = ToolKitClient::new("key", "math");
    /// client
    ///     .register_typed_tool(Tool::new("add").description("Adds."), |args: Add, _token| async move {
    ///         Ok::<_, ToolError>(serde_json::json!({"sum": args.a + args.b}))
    ///     })
    ///     .unwrap();
    /// assert_eq!(client.tool("add").unwrap().required_params(), ["a", "b"]);
    /// ```
    pub fn register_typed_tool<A, F, Fut, T, E>(
        &self,
        mut tool: Tool,
        handler: F,
    ) -> Result<(), RegisterError>
    where
        A: DeserializeOwned + schemars::JsonSchema,
        F: Fn(A, Option<AuthToken>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        let schema = typed_tool::<A>(&mut tool)?;
        self.insert(tool, schema, Handler::from_typed::<A, _, _, _, _>(handler))
    }

    /// [`register_typed_tool`](Self::register_typed_tool) whose handler
    /// also gets the whole [`Call`]: the auth token, the raw params and the
    /// call's progress handle.
    ///
    /// ```
    /// use atp_registry::{Call, Tool, ToolError, ToolKitClient};
    ///
    /// #[derive(serde::Deserialize, schemars::JsonSchema)]
    /// struct Import { rows: u32 }
    ///
    /// let client = ToolKitClient::new("key", "etl");
    /// client
    ///     .register_typed_tool_with_call(Tool::new("import"), |args: Import, call: Call| async move {
    ///         for done in 1..=args.rows {
    ///             call.progress(done.into(), Some(args.rows.into()), None);
    ///         }
    ///         Ok::<_, ToolError>(args.rows)
    ///     })
    ///     .unwrap();
    /// ```
    pub fn register_typed_tool_with_call<A, F, Fut, T, E>(
        &self,
        mut tool: Tool,
        handler: F,
    ) -> Result<(), RegisterError>
    where
        A: DeserializeOwned + schemars::JsonSchema,
        F: Fn(A, Call) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
        T: Serialize + 'static,
        E: fmt::Display,
    {
        let schema = typed_tool::<A>(&mut tool)?;
        self.insert(
            tool,
            schema,
            Handler::from_typed_with_call::<A, _, _, _, _>(handler),
        )
    }

    /// Registers an interactive app (the Python SDK's app function). It is
    /// announced and described like a tool (`app` gives its name,
    /// description and start params), and the toolkit runtime serves its
    /// sessions: an `atp_app_request` starts one (the handler gets
    /// [`AppCall::Start`]), each `atp_app_action` continues it
    /// ([`AppCall::Action`], with the state the app returned last) and the
    /// server's `atp_app_terminate`, a reply with
    /// [`terminate`](AppReply::terminate) or the end of the connection ends
    /// it. Every answer is an `app_response` with the reply's `ui_content`,
    /// or `{"error": MESSAGE}` (the handler's error, a panic, the
    /// toolkit's timeout, an unknown session).
    ///
    /// An app can not be called as a tool: `call_tool_by_name` and the
    /// runtime's tool requests answer `tool_error`, the HTTP endpoints
    /// `405 method_not_allowed`.
    ///
    /// ```
    /// use atp_registry::{AppCall, AppReply, Tool, ToolError, ToolKitClient};
    /// use serde_json::json;
    ///
    /// let client = ToolKitClient::new("key", "games");
    /// client
    ///     .register_app(
    ///         Tool::new("counter").description("A counter with a button.").params(["start"]),
    ///         |call: AppCall| async move {
    ///             let n = match call {
    ///                 AppCall::Start { params, .. } => params.get("start").and_then(|v| v.as_i64()).unwrap_or(0),
    ///                 AppCall::Action { state, .. } => state["n"].as_i64().unwrap_or(0) + 1,
    ///             };
    ///             Ok::<_, ToolError>(
    ///                 AppReply::new(json!({"text": format!("count: {n}"), "buttons": ["+1"]}))
    ///                     .state(json!({"n": n}))
    ///             )
    ///         },
    ///     )
    ///     .unwrap();
    /// assert!(client.tool("counter").unwrap().is_app());
    /// ```
    pub fn register_app<F, Fut, E>(&self, app: Tool, handler: F) -> Result<(), RegisterError>
    where
        F: Fn(AppCall) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<AppReply, E>> + Send + 'static,
        E: fmt::Display,
    {
        let schema = untyped_schema(&app);
        self.insert(app, schema, Handler::App(app::handler(handler)))
    }

    /// [`register_app`](Self::register_app) with the session's state as
    /// your own type: it is serialized between actions, so it must be
    /// `Serialize + DeserializeOwned`. Set it at the start
    /// ([`AppReply::state`]): an action on a session without a state is
    /// answered with an error.
    ///
    /// ```
    /// use atp_registry::{AppCall, AppReply, Tool, ToolError, ToolKitClient};
    /// use serde_json::json;
    ///
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Counter { n: i64 }
    ///
    /// let client = ToolKitClient::new("key", "games");
    /// client
    ///     .register_typed_app(Tool::new("counter"), |call: AppCall<Counter>| async move {
    ///         let n = match call {
    ///             AppCall::Start { .. } => 0,
    ///             AppCall::Action { state, .. } => state.n + 1,
    ///         };
    ///         Ok::<_, ToolError>(AppReply::new(json!({"text": n})).state(Counter { n }))
    ///     })
    ///     .unwrap();
    /// ```
    pub fn register_typed_app<S, F, Fut, E>(
        &self,
        app: Tool,
        handler: F,
    ) -> Result<(), RegisterError>
    where
        S: Serialize + DeserializeOwned + Send + 'static,
        F: Fn(AppCall<S>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<AppReply<S>, E>> + Send + 'static,
        E: fmt::Display,
    {
        let schema = untyped_schema(&app);
        self.insert(app, schema, Handler::App(app::typed_handler(handler)))
    }

    /// Registers a tool made by [`#[tool]`](crate::tool): the function's
    /// `tool()` (`hello_world::tool()`), with the same checks as the
    /// builder's `register_tool`.
    ///
    /// ```
    /// use atp_registry::{ToolKitClient, tool};
    ///
    /// /// Returns a greeting.
    /// #[tool]
    /// async fn hello_world(name: String) -> String {
    ///     format!("Hello, {name}!")
    /// }
    ///
    /// let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "my_app");
    /// client.register(hello_world::tool())?;
    /// assert_eq!(client.tool("hello_world").unwrap().description(), "Returns a greeting.");
    /// # Ok::<(), atp_registry::RegisterError>(())
    /// ```
    pub fn register(&self, tool: ToolDef) -> Result<(), RegisterError> {
        self.register_all([tool])
    }

    /// Registers several tools made by [`#[tool]`](crate::tool) at once:
    /// all of them, or (when one breaks a rule or a name is taken) none.
    ///
    /// ```
    /// use atp_registry::{ToolKitClient, tool};
    ///
    /// /// Echoes the input text.
    /// #[tool]
    /// async fn echo(text: String) -> String { text }
    ///
    /// /// Returns a greeting.
    /// #[tool]
    /// async fn hello_world(name: String) -> String { format!("Hello, {name}!") }
    ///
    /// let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "my_app");
    /// client.register_all([hello_world::tool(), echo::tool()])?;
    /// assert!(client.register_all([echo::tool()]).is_err());
    /// assert_eq!(client.tool_names(), ["hello_world", "echo"]);
    /// # Ok::<(), atp_registry::RegisterError>(())
    /// ```
    pub fn register_all(
        &self,
        tools: impl IntoIterator<Item = ToolDef>,
    ) -> Result<(), RegisterError> {
        let entries = tools
            .into_iter()
            .map(|def| {
                let (tool, handler) = def.into_parts()?;
                let schema = untyped_schema(&tool);
                Ok((tool, schema, handler))
            })
            .collect::<Result<_, RegisterError>>()?;
        self.insert_all(entries)
    }

    /// Registers every tool of a [`#[toolkit]`](crate::toolkit) `impl`
    /// block, sharing `state` (the value, or an `Arc` of it) between
    /// their calls; all of them or none, as
    /// [`register_all`](Self::register_all).
    ///
    /// ```
    /// use std::sync::atomic::{AtomicU64, Ordering};
    ///
    /// use atp_registry::{ToolKitClient, toolkit};
    ///
    /// #[derive(Default)]
    /// struct Counter {
    ///     hits: AtomicU64,
    /// }
    ///
    /// #[toolkit]
    /// impl Counter {
    ///     /// Counts a hit and returns the count.
    ///     #[tool]
    ///     async fn hit(&self) -> u64 {
    ///         self.hits.fetch_add(1, Ordering::Relaxed) + 1
    ///     }
    /// }
    ///
    /// let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "my_app");
    /// client.register_toolkit(Counter::default())?;
    /// assert_eq!(client.tool_names(), ["hit"]);
    /// # Ok::<(), atp_registry::RegisterError>(())
    /// ```
    pub fn register_toolkit<K: Toolkit>(
        &self,
        state: impl ToolkitState<K>,
    ) -> Result<(), RegisterError> {
        self.register_all(K::tools(state.into_shared()))
    }

    fn insert(
        &self,
        tool: Tool,
        input_schema: Value,
        handler: Handler,
    ) -> Result<(), RegisterError> {
        self.insert_all(vec![(tool, input_schema, handler)])
    }

    /// Registers all of `entries` or, when one breaks a rule or its name
    /// is taken, none.
    fn insert_all(&self, entries: Vec<(Tool, Value, Handler)>) -> Result<(), RegisterError> {
        for (tool, _, _) in &entries {
            tool.validate()?;
        }
        let mut tools = self.tools.write().unwrap_or_else(PoisonError::into_inner);
        for (i, (tool, _, _)) in entries.iter().enumerate() {
            if tools.by_name.contains_key(&tool.name)
                || entries[..i].iter().any(|(t, _, _)| t.name == tool.name)
            {
                return Err(RegisterError::DuplicateTool(tool.name.clone()));
            }
        }
        for (mut tool, input_schema, handler) in entries {
            let index = tools.list.len();
            tools.by_name.insert(tool.name.clone(), index);
            let output_schema = tool.output_schema.take();
            tools.list.push(Arc::new(RegisteredTool {
                spec: tool.spec_with(input_schema),
                output_schema,
                handler,
            }));
        }
        drop(tools);
        // A running toolkit announces the new tools to its server.
        #[cfg(feature = "runtime")]
        self.control.tool_added();
        Ok(())
    }

    /// A registered tool by name.
    pub fn tool(&self, name: &str) -> Option<Arc<RegisteredTool>> {
        let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
        tools.by_name.get(name).map(|&i| tools.list[i].clone())
    }

    /// All registered tools, in registration order (the Python SDK's
    /// `registered_tools`).
    pub fn registered_tools(&self) -> Vec<Arc<RegisteredTool>> {
        self.tools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .list
            .clone()
    }

    /// The names of the registered tools, in registration order.
    pub fn tool_names(&self) -> Vec<String> {
        let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
        tools.list.iter().map(|t| t.spec.name.clone()).collect()
    }

    /// How many tools are registered.
    pub fn tool_count(&self) -> usize {
        self.tools
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .list
            .len()
    }

    /// Every tool described in `provider`'s format (docs/PROTOCOL.md §4), in
    /// registration order.
    pub fn tool_schemas(&self, provider: Provider, strict: bool) -> Vec<Value> {
        let tools = self.tools.read().unwrap_or_else(PoisonError::into_inner);
        tools
            .list
            .iter()
            .map(|t| t.provider_schema(provider, strict))
            .collect()
    }

    /// Runs a tool without HTTP, with every check of docs/PROTOCOL.md §3: the tool
    /// exists, the auth token if the tool needs one, missing, unknown and
    /// (for typed tools) invalid params, then the handler, isolated from
    /// panics and bounded by the toolkit's timeout.
    ///
    /// `params` must be a JSON object (`null` counts as `{}`). An empty
    /// auth token counts as none.
    ///
    /// ```
    /// # tokio::runtime::Runtime::new().unwrap().block_on(async {
    /// use atp_registry::{Call, CallError, Tool, ToolError, ToolKitClient};
    /// use serde_json::json;
    ///
    /// let client = ToolKitClient::new("key", "demo");
    /// client
    ///     .register_tool(Tool::new("echo").params(["text"]).required_params(["text"]), |call: Call| async move {
    ///         Ok::<_, ToolError>(json!({"echo": call.param("text")}))
    ///     })
    ///     .unwrap();
    /// let out = client.call_tool_by_name("echo", json!({"text": "hi"}), None).await;
    /// assert_eq!(out, Ok(json!({"echo": "hi"})));
    /// let err = client.call_tool_by_name("echo", json!({}), None).await;
    /// assert!(matches!(err, Err(CallError::MissingParams { .. })));
    /// # });
    /// ```
    pub async fn call_tool_by_name(
        &self,
        name: &str,
        params: Value,
        auth_token: Option<AuthToken>,
    ) -> Result<Value, CallError> {
        let params = match params {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => {
                if self.tool(name).is_none() {
                    return Err(CallError::ToolNotFound);
                }
                return Err(CallError::InvalidParams(
                    "params must be a JSON object".into(),
                ));
            }
        };
        self.call_tool_by_name_map(name, params, auth_token).await
    }

    /// [`call_tool_by_name`](Self::call_tool_by_name) with the params
    /// already an object.
    pub(crate) async fn call_tool_by_name_map(
        &self,
        name: &str,
        params: Map<String, Value>,
        auth_token: Option<AuthToken>,
    ) -> Result<Value, CallError> {
        let tool = self.tool(name).ok_or(CallError::ToolNotFound)?;
        tool.call(self, params, auth_token, Progress::default())
            .await
    }
}

/// Derives a typed tool's params, required params and input schema from
/// `A`.
fn typed_tool<A: schemars::JsonSchema>(tool: &mut Tool) -> Result<Value, RegisterError> {
    let typed = typed_schema::<A>()?;
    tool.params = typed.params;
    tool.required_params = typed.required;
    tool.param_schemas.clear();
    if tool.description.is_empty()
        && let Some(d) = typed.schema.get("description").and_then(Value::as_str)
    {
        tool.description = d.to_owned();
    }
    Ok(typed.schema)
}

impl fmt::Debug for ToolKitClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolKitClient")
            .field("api_key", &self.config.api_key)
            .field("app_name", &self.config.app_name)
            .field("base_url", &self.config.base_url)
            .field("timeout", &self.config.timeout)
            .field("body_limit", &self.config.body_limit)
            .field("endpoint_key", &self.config.endpoint_key)
            .field("tools", &self.tool_names())
            .finish()
    }
}

/// A tool as registered: its description and handler.
#[derive(Debug)]
pub struct RegisteredTool {
    spec: ToolSpec,
    output_schema: Option<Value>,
    handler: Handler,
}

impl RegisteredTool {
    /// The tool's description (name, params, auth metadata, input schema).
    pub fn spec(&self) -> &ToolSpec {
        &self.spec
    }

    /// The tool's name (the Python SDK's `function_name`).
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The description.
    pub fn description(&self) -> &str {
        &self.spec.description
    }

    /// All param names, in order.
    pub fn params(&self) -> &[String] {
        &self.spec.params
    }

    /// The required param names.
    pub fn required_params(&self) -> &[String] {
        &self.spec.required_params
    }

    /// The auth provider, if any.
    pub fn auth_provider(&self) -> Option<&str> {
        self.spec.auth_provider.as_deref()
    }

    /// The auth type, if any.
    pub fn auth_type(&self) -> Option<&str> {
        self.spec.auth_type.as_deref()
    }

    /// The name of the token parameter, if any.
    pub fn auth_with(&self) -> Option<&str> {
        self.spec.auth_with.as_deref()
    }

    /// Whether calls must carry an auth token.
    pub fn requires_auth(&self) -> bool {
        self.spec.requires_auth()
    }

    /// The JSON Schema of the tool's input.
    pub fn input_schema(&self) -> &Value {
        &self.spec.input_schema
    }

    /// The JSON Schema of the tool's result, if it has one
    /// ([`Tool::output_schema`]; `#[tool]` sets it from an object result
    /// type). Only the MCP face shows it.
    pub fn output_schema(&self) -> Option<&Value> {
        self.output_schema.as_ref()
    }

    /// The tool's context, as `GET /atp/{toolkit}/{tool}/` answers it.
    pub fn context(&self) -> crate::wire::ToolContext {
        self.spec.context()
    }

    /// The tool in `provider`'s format.
    pub fn provider_schema(&self, provider: Provider, strict: bool) -> Value {
        self.spec.provider_schema(provider, strict)
    }

    /// Checks the auth token and the params (steps 9 and 10 of the HTTP
    /// check order).
    pub fn check(
        &self,
        params: &Map<String, Value>,
        auth_token: Option<&AuthToken>,
    ) -> Result<(), CallError> {
        self.spec.check(params, auth_token)
    }

    /// Whether this is an interactive app
    /// ([`register_app`](ToolKitClient::register_app)) rather than a tool.
    pub fn is_app(&self) -> bool {
        matches!(self.handler, Handler::App(_))
    }

    /// Checks, then runs the handler with `toolkit`'s timeout.
    pub(crate) async fn call(
        &self,
        toolkit: &ToolKitClient,
        params: Map<String, Value>,
        auth_token: Option<AuthToken>,
        progress: Progress,
    ) -> Result<Value, CallError> {
        if self.is_app() {
            return Err(CallError::Tool(not_a_tool(self.name())));
        }
        let auth_token = auth_token.filter(|t| !t.is_empty());
        self.check(&params, auth_token.as_ref())?;
        let call = Call::new(params, auth_token).with_progress(progress);
        let run = self.run(toolkit.app_name(), call);
        match toolkit.timeout() {
            None => run.await,
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(out) => out,
                Err(_) => {
                    tracing::warn!(
                        app = toolkit.app_name(),
                        tool = self.name(),
                        ?limit,
                        "tool timed out"
                    );
                    Err(CallError::Timeout(limit))
                }
            },
        }
    }

    /// Runs an app's handler, isolated from panics and bounded by
    /// `toolkit`'s timeout: its reply, or the message of the error to
    /// answer.
    #[cfg_attr(not(feature = "runtime"), allow(dead_code))]
    pub(crate) async fn run_app(
        &self,
        toolkit: &ToolKitClient,
        call: AppCall,
    ) -> Result<AppReply, String> {
        let Handler::App(f) = &self.handler else {
            return Err(format!("{} is a tool, not an app", self.name()));
        };
        let run = async {
            match catch_unwind(AssertUnwindSafe(|| f(call))) {
                Ok(fut) => CatchUnwind(fut).await,
                Err(panic) => Err(panic),
            }
        };
        let outcome = match toolkit.timeout() {
            None => run.await,
            Some(limit) => match tokio::time::timeout(limit, run).await {
                Ok(out) => out,
                Err(_) => {
                    tracing::warn!(
                        app = toolkit.app_name(),
                        tool = self.name(),
                        ?limit,
                        "app timed out"
                    );
                    return Err(format!("The app timed out after {} ms", limit.as_millis()));
                }
            },
        };
        outcome.unwrap_or_else(|panic| {
            tracing::error!(
                app = toolkit.app_name(),
                tool = self.name(),
                panic = panic_message(&*panic),
                "app panicked"
            );
            Err("The app panicked".to_owned())
        })
    }

    async fn run(&self, app: &str, call: Call) -> Result<Value, CallError> {
        let outcome = match &self.handler {
            Handler::App(_) => return Err(CallError::Tool(not_a_tool(self.name()))),
            Handler::Async(f) => match catch_unwind(AssertUnwindSafe(|| f(call))) {
                Ok(fut) => CatchUnwind(fut).await,
                Err(panic) => Err(panic),
            },
            Handler::Typed(f) => match catch_unwind(AssertUnwindSafe(|| f(call))) {
                Ok(Ok(fut)) => CatchUnwind(fut).await,
                Ok(Err(message)) => return Err(CallError::InvalidParams(message)),
                Err(panic) => Err(panic),
            },
            Handler::Blocking(f) => {
                let f = f.clone();
                run_blocking(Box::new(move || f(call))).await
            }
            Handler::TypedBlocking(f) => match catch_unwind(AssertUnwindSafe(|| f(call))) {
                Ok(Ok(job)) => run_blocking(job).await,
                Ok(Err(message)) => return Err(CallError::InvalidParams(message)),
                Err(panic) => Err(panic),
            },
        };
        match outcome {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(message)) => Err(CallError::Tool(message)),
            Err(panic) => {
                tracing::error!(
                    app,
                    tool = self.name(),
                    panic = panic_message(&*panic),
                    "tool panicked"
                );
                Err(CallError::Panicked)
            }
        }
    }
}

/// The params rule of docs/PROTOCOL.md §3 step 10, for any tool described by its
/// `params` and `required_params` (also one a remote toolkit announced):
/// a required param absent or `null` is `missing_params` (naming the
/// unknown ones too, if any), then a param not declared is
/// `unknown_params`.
///
/// ```
/// use atp_registry::{CallError, check_params};
/// use serde_json::json;
///
/// let params = ["a".to_owned(), "b".to_owned()];
/// let required = ["a".to_owned()];
/// let given = |v: serde_json::Value| v.as_object().cloned().unwrap();
/// assert_eq!(check_params(&params, &required, &given(json!({"a": 1}))), Ok(()));
/// assert!(matches!(check_params(&params, &required, &given(json!({"a": null}))), Err(CallError::MissingParams { .. })));
/// assert_eq!(
///     check_params(&params, &required, &given(json!({"a": 1, "c": 2}))),
///     Err(CallError::UnknownParams(vec!["c".into()]))
/// );
/// ```
pub fn check_params(
    params: &[String],
    required_params: &[String],
    given: &Map<String, Value>,
) -> Result<(), CallError> {
    let missing: Vec<String> = required_params
        .iter()
        .filter(|r| given.get(r.as_str()).is_none_or(Value::is_null))
        .cloned()
        .collect();
    let unknown: Vec<String> = given
        .keys()
        .filter(|k| !params.iter().any(|p| p == *k))
        .cloned()
        .collect();
    if !missing.is_empty() {
        return Err(CallError::MissingParams { missing, unknown });
    }
    if !unknown.is_empty() {
        return Err(CallError::UnknownParams(unknown));
    }
    Ok(())
}

/// Runs `job` on tokio's blocking pool, turning a panic into an `Err`.
async fn run_blocking(job: BlockingJob) -> Result<HandlerOutput, Box<dyn Any + Send>> {
    // The handler's own events belong to the span it is called in (the
    // runtime's `atp.tool`), on the blocking pool too.
    let span = tracing::Span::current();
    match tokio::task::spawn_blocking(move || span.in_scope(|| catch_unwind(AssertUnwindSafe(job))))
        .await
    {
        Ok(outcome) => outcome,
        Err(join) if join.is_panic() => Err(join.into_panic()),
        Err(_) => Err(Box::new("the blocking task was cancelled") as Box<dyn Any + Send>),
    }
}

/// The error of a tool call to an app.
fn not_a_tool(name: &str) -> String {
    format!(
        "{name} is an interactive app: start it with an app request; it can not be called as a tool"
    )
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic payload that is not a string)")
}

/// Polls a handler's future, turning a panic into an `Err`.
struct CatchUnwind<T = HandlerOutput>(BoxFuture<T>);

impl<T> Future for CatchUnwind<T> {
    type Output = Result<T, Box<dyn Any + Send>>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let fut = &mut self.0;
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => Poll::Ready(Ok(out)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Instant,
    };

    use super::*;
    use crate::ToolError;

    fn echo_tool() -> Tool {
        Tool::new("echo").params(["text"]).required_params(["text"])
    }

    async fn echo(call: Call) -> Result<Value, ToolError> {
        Ok(json!({"echo": call.param("text")}))
    }

    #[test]
    fn registration_rules() {
        let c = ToolKitClient::new("k", "a");
        c.register_tool(echo_tool(), echo).expect("valid");
        assert_eq!(
            c.register_tool(echo_tool(), echo),
            Err(RegisterError::DuplicateTool("echo".into()))
        );
        assert!(matches!(
            c.register_tool(Tool::new("x y"), echo),
            Err(RegisterError::InvalidToolName(_))
        ));
        #[derive(serde::Deserialize, schemars::JsonSchema)]
        #[allow(dead_code)]
        struct Reserved {
            auth_token: String,
        }
        assert!(matches!(
            c.register_typed_tool(Tool::new("typed"), |_: Reserved, _| async {
                Ok::<_, String>(1)
            }),
            Err(RegisterError::ReservedParam(_))
        ));
        assert_eq!(c.tool_names(), ["echo"]);
    }

    #[test]
    fn debug_redacts_keys() {
        let c = ToolKitClient::new("api-key-123", "a").with_endpoint_key("endpoint-key-456");
        let dbg = format!("{c:?}");
        assert!(
            !dbg.contains("api-key-123") && !dbg.contains("endpoint-key-456"),
            "{dbg}"
        );
        assert_eq!(c.api_key().expose(), "api-key-123");
    }

    #[test]
    fn defaults_and_settings() {
        let c = ToolKitClient::new("k", "a");
        assert_eq!(c.base_url(), DEFAULT_BASE_URL);
        assert_eq!(c.body_limit(), 1_048_576);
        assert_eq!(c.timeout(), None);
        let c = c
            .with_base_url("http://127.0.0.1:9000")
            .with_timeout(Duration::from_secs(1))
            .with_body_limit(10);
        assert_eq!(
            (c.base_url(), c.timeout(), c.body_limit()),
            ("http://127.0.0.1:9000", Some(Duration::from_secs(1)), 10)
        );
    }

    #[tokio::test]
    async fn call_checks() {
        let c = ToolKitClient::new("k", "a");
        c.register_tool(echo_tool(), echo).expect("valid");
        c.register_tool(
            Tool::new("secure").auth_type("apiKey"),
            |call: Call| async move {
                Ok::<_, String>(json!(call.auth_token().map(|t| t.expose().len())))
            },
        )
        .expect("valid");
        assert_eq!(
            c.call_tool_by_name("echo", json!({"text": 1}), None).await,
            Ok(json!({"echo": 1}))
        );
        assert_eq!(
            c.call_tool_by_name("nope", json!({}), None).await,
            Err(CallError::ToolNotFound)
        );
        assert!(matches!(
            c.call_tool_by_name("echo", json!([1]), None).await,
            Err(CallError::InvalidParams(_))
        ));
        assert!(matches!(
            c.call_tool_by_name("echo", Value::Null, None).await,
            Err(CallError::MissingParams { .. })
        ));
        assert_eq!(
            c.call_tool_by_name("secure", json!({}), None).await,
            Err(CallError::AuthRequired)
        );
        assert_eq!(
            c.call_tool_by_name("secure", json!({}), Some(Secret::new("")))
                .await,
            Err(CallError::AuthRequired)
        );
        assert_eq!(
            c.call_tool_by_name("secure", json!({}), Some("tok".into()))
                .await,
            Ok(json!(3))
        );
    }

    /// Runs `work` beside a task that ticks every 10 ms: its output, and
    /// how many times the ticker ran meanwhile (on a single-threaded
    /// runtime, only while `work` is off the executor).
    async fn ticking<T>(work: impl std::future::Future<Output = T>) -> (T, usize) {
        let ticks = Arc::new(AtomicUsize::new(0));
        let ticker = {
            let ticks = ticks.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    ticks.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let out = work.await;
        ticker.abort();
        (out, ticks.load(Ordering::Relaxed))
    }

    #[tokio::test(flavor = "current_thread")]
    async fn blocking_handlers_do_not_block_the_executor() {
        let c = ToolKitClient::new("k", "a");
        c.register_blocking_tool(Tool::new("sleepy"), |_call| {
            std::thread::sleep(Duration::from_millis(300));
            Ok::<_, String>("done")
        })
        .expect("valid");
        let (answer, ticks) = ticking(c.call_tool_by_name("sleepy", json!({}), None)).await;
        assert_eq!(answer, Ok(json!("done")));
        // On a single-threaded runtime the ticker only ran if the handler
        // was off the executor.
        assert!(ticks >= 5, "ticks: {ticks}");
    }

    #[tokio::test]
    async fn panics_are_isolated_and_nothing_is_poisoned() {
        let c = ToolKitClient::new("k", "a");
        c.register_tool(Tool::new("boom"), |_call: Call| async {
            if true {
                panic!("secret panic detail");
            }
            Ok::<_, String>(0)
        })
        .expect("valid");
        c.register_blocking_tool(Tool::new("boom_blocking"), |_call| -> Result<i32, String> {
            panic!("blocking secret")
        })
        .expect("valid");
        c.register_tool(
            Tool::new("boom_sync"),
            |_call: Call| -> std::future::Ready<Result<i32, String>> {
                panic!("panics before the future exists")
            },
        )
        .expect("valid");
        for name in ["boom", "boom_blocking", "boom_sync"] {
            assert_eq!(
                c.call_tool_by_name(name, json!({}), None).await,
                Err(CallError::Panicked),
                "{name}"
            );
        }
        // Registration and calls still work afterwards.
        c.register_tool(echo_tool(), echo).expect("valid");
        assert!(
            c.call_tool_by_name("echo", json!({"text": "x"}), None)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn timeout_applies_to_async_and_blocking() {
        let c = ToolKitClient::new("k", "a").with_timeout(Duration::from_millis(100));
        c.register_tool(Tool::new("slow"), |_call: Call| async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            Ok::<_, String>(0)
        })
        .expect("valid");
        c.register_blocking_tool(Tool::new("slow_blocking"), |_call| {
            std::thread::sleep(Duration::from_secs(2));
            Ok::<_, String>(0)
        })
        .expect("valid");
        for name in ["slow", "slow_blocking"] {
            let t = Instant::now();
            assert_eq!(
                c.call_tool_by_name(name, json!({}), None).await,
                Err(CallError::Timeout(Duration::from_millis(100)))
            );
            // Well before the blocking handler ends (2 s), with room for a
            // loaded machine.
            assert!(
                t.elapsed() < Duration::from_millis(1500),
                "{name}: {:?}",
                t.elapsed()
            );
        }
    }

    #[tokio::test]
    async fn results_of_any_serialize_type_and_errors_of_any_display_type() {
        #[derive(Serialize)]
        struct Out {
            n: u8,
        }
        let c = ToolKitClient::new("k", "a");
        c.register_tool(Tool::new("typed_out"), |_call: Call| async {
            Ok::<_, std::io::Error>(Out { n: 7 })
        })
        .expect("valid");
        c.register_tool(Tool::new("io_err"), |_call: Call| async {
            Err::<Out, _>(std::io::Error::other("disk on fire"))
        })
        .expect("valid");
        c.register_tool(Tool::new("bad_out"), |_call: Call| async {
            let mut m = HashMap::new();
            m.insert((1, 2), 3);
            Ok::<_, String>(m)
        })
        .expect("valid");
        assert_eq!(
            c.call_tool_by_name("typed_out", json!({}), None).await,
            Ok(json!({"n": 7}))
        );
        assert_eq!(
            c.call_tool_by_name("io_err", json!({}), None).await,
            Err(CallError::Tool("disk on fire".into()))
        );
        assert!(matches!(
            c.call_tool_by_name("bad_out", json!({}), None).await,
            Err(CallError::Tool(_))
        ));
    }

    #[tokio::test]
    async fn registering_while_serving() {
        let c = ToolKitClient::new("k", "a");
        c.register_tool(echo_tool(), echo).expect("valid");
        let caller = {
            let c = c.clone();
            tokio::spawn(async move {
                for _ in 0..500 {
                    assert!(
                        c.call_tool_by_name("echo", json!({"text": 1}), None)
                            .await
                            .is_ok()
                    );
                    tokio::task::yield_now().await;
                }
            })
        };
        for i in 0..500 {
            c.register_tool(Tool::new(format!("t{i}")), echo)
                .expect("valid");
        }
        caller.await.expect("no panic");
        assert_eq!(c.tool_count(), 501);
    }

    #[tokio::test]
    async fn typed_tools_with_the_call_get_token_params_and_progress() {
        #[derive(serde::Deserialize, schemars::JsonSchema)]
        struct Steps {
            n: u32,
        }
        let c = ToolKitClient::new("k", "a");
        c.register_typed_tool_with_call(Tool::new("steps"), |args: Steps, call: Call| async move {
            let sent = call.progress(1.0, Some(args.n.into()), Some("one"));
            Ok::<_, ToolError>(json!({
                "n": args.n,
                "raw": call.param("n"),
                "token": call.auth_token().map(|t| t.expose().to_owned()),
                "sent": sent,
            }))
        })
        .expect("valid");
        assert_eq!(
            c.tool("steps").expect("registered").required_params(),
            ["n"]
        );
        assert_eq!(
            c.call_tool_by_name("steps", json!({"n": 3}), Some("tok".into()))
                .await,
            Ok(json!({"n": 3, "raw": 3, "token": "tok", "sent": false}))
        );
        assert!(matches!(
            c.call_tool_by_name("steps", json!({"n": "x"}), None).await,
            Err(CallError::InvalidParams(_))
        ));
    }

    /// Sleeps its thread, then answers.
    #[crate::tool]
    fn sleepy(ms: u64) -> &'static str {
        std::thread::sleep(Duration::from_millis(ms));
        "done"
    }

    /// Panics.
    #[crate::tool]
    fn boom_fn() -> u8 {
        panic!("blocking secret")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn plain_fns_under_tool_run_on_the_blocking_pool() {
        let c = ToolKitClient::new("k", "a");
        c.register_all([sleepy::tool(), boom_fn::tool()])
            .expect("valid");
        let (answer, ticks) =
            ticking(c.call_tool_by_name("sleepy", json!({"ms": 300}), None)).await;
        assert_eq!(answer, Ok(json!("done")));
        assert!(ticks >= 5);
        // Params are read before the pool is asked for a thread.
        assert!(matches!(
            c.call_tool_by_name("sleepy", json!({"ms": "x"}), None)
                .await,
            Err(CallError::InvalidParams(_))
        ));
        assert_eq!(
            c.call_tool_by_name("boom_fn", json!({}), None).await,
            Err(CallError::Panicked)
        );
    }

    #[test]
    fn register_all_is_all_or_nothing() {
        let c = ToolKitClient::new("k", "a");
        c.register(sleepy::tool()).expect("valid");
        // One name taken: none registered.
        assert_eq!(
            c.register_all([boom_fn::tool(), sleepy::tool()]),
            Err(RegisterError::DuplicateTool("sleepy".into()))
        );
        // The same name twice in one call.
        assert_eq!(
            c.register_all([boom_fn::tool(), boom_fn::tool()]),
            Err(RegisterError::DuplicateTool("boom_fn".into()))
        );
        assert_eq!(c.tool_names(), ["sleepy"]);
        // A builder tool and a macro tool share the names.
        assert!(matches!(
            c.register_tool(Tool::new("sleepy"), echo),
            Err(RegisterError::DuplicateTool(_))
        ));
        assert_eq!(
            c.register_tool(
                Tool::new("o").output_schema(json!({"type": "string"})),
                echo
            ),
            Err(RegisterError::InvalidOutputSchema)
        );
    }

    #[tokio::test]
    async fn an_app_is_not_a_tool() {
        let c = ToolKitClient::new("k", "a");
        c.register_app(Tool::new("game"), |_call: AppCall| async {
            Ok::<_, ToolError>(AppReply::new(json!({})))
        })
        .expect("valid");
        assert!(c.tool("game").expect("registered").is_app());
        let err = c.call_tool_by_name("game", json!({}), None).await;
        assert!(
            matches!(&err, Err(CallError::Tool(m)) if m.contains("interactive app")),
            "{err:?}"
        );
        assert_eq!(
            c.register_app(Tool::new("game"), |_call: AppCall| async {
                Ok::<_, ToolError>(AppReply::new(json!({})))
            }),
            Err(RegisterError::DuplicateTool("game".into()))
        );
    }

    #[tokio::test]
    async fn typed_app_state_round_trips() {
        #[derive(Serialize, serde::Deserialize)]
        struct Count {
            n: i64,
        }
        let c = ToolKitClient::new("k", "a").with_timeout(Duration::from_millis(100));
        c.register_typed_app(Tool::new("count"), |call: AppCall<Count>| async move {
            let n = match call {
                AppCall::Start { .. } => 0,
                AppCall::Action { state, .. } if state.n >= 1 => {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    state.n
                }
                AppCall::Action { state, .. } => state.n + 1,
            };
            Ok::<_, ToolError>(AppReply::new(json!({"n": n})).state(Count { n }))
        })
        .expect("valid");
        let app = c.tool("count").expect("registered");
        let start = AppCall::Start {
            session_id: "s".into(),
            params: Map::new(),
            auth_token: None,
        };
        let reply = app.run_app(&c, start).await.expect("started");
        assert_eq!(reply.app_state, Some(json!({"n": 0})));
        let action = |state: Value| AppCall::Action {
            session_id: "s".into(),
            action_data: Value::Null,
            state,
            auth_token: None,
        };
        let reply = app
            .run_app(&c, action(json!({"n": 0})))
            .await
            .expect("acted");
        assert_eq!(reply.ui_content, json!({"n": 1}));
        // A state the type can't read, and the toolkit's timeout, are errors.
        let err = app
            .run_app(&c, action(Value::Null))
            .await
            .expect_err("no state");
        assert!(err.contains("state"), "{err}");
        let err = app
            .run_app(&c, action(json!({"n": 1})))
            .await
            .expect_err("timeout");
        assert!(err.contains("timed out"), "{err}");
    }
}
