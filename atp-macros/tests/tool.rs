//! `#[tool]` and `#[toolkit]`: what they register, and how the tools
//! behave when called.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use atp_registry::{
    AuthToken, CallError, Progress, ToolError, ToolKitClient, schemars, tool, toolkit,
};
use serde_json::{Value, json};

/// Returns a greeting.
#[tool]
async fn hello_world(
    /// Who to greet.
    name: String,
) -> Value {
    json!({"message": format!("Hello, {name}!")})
}

/// Adds two integers.
///
/// Fails when the sum overflows.
#[tool(name = "add")]
fn add_numbers(a: i64, b: Option<i64>) -> Result<i64, ToolError> {
    a.checked_add(b.unwrap_or(0))
        .ok_or_else(|| ToolError::new("the sum overflows"))
}

#[derive(serde::Serialize, schemars::JsonSchema)]
struct Greeting {
    message: String,
}

#[tool(
    description = "Greets, typed.",
    auth_provider = "hubspot",
    auth_type = "OAuth2",
    auth_with = "access_token"
)]
async fn greet(r#type: String, token: AuthToken, progress: Progress) -> Greeting {
    progress.report(1.0, None, None);
    Greeting {
        message: format!("{type} with a token of {}", token.expose().len()),
    }
}

/// Whether the call had a token.
#[tool]
fn maybe_token(auth_token: Option<AuthToken>) -> bool {
    auth_token.is_some()
}

#[test]
fn the_signature_is_the_description() {
    let spec = hello_world::tool().spec().expect("valid");
    assert_eq!(spec.name, "hello_world");
    assert_eq!(spec.description, "Returns a greeting.");
    assert_eq!(spec.params, ["name"]);
    assert_eq!(spec.required_params, ["name"]);
    assert_eq!(
        serde_json::to_string(&spec.input_schema).expect("json"),
        r#"{"type":"object","properties":{"name":{"type":"string","description":"Who to greet."}},"required":["name"]}"#
    );
    assert!(hello_world::tool().output_schema().is_none());

    let add = add_numbers::tool().spec().expect("valid");
    assert_eq!(add.name, "add");
    assert_eq!(
        add.description,
        "Adds two integers.\n\nFails when the sum overflows."
    );
    assert_eq!(add.params, ["a", "b"]);
    assert_eq!(add.required_params, ["a"]);
    assert_eq!(
        add.input_schema["properties"]["b"],
        json!({"type": ["integer", "null"], "format": "int64"})
    );

    let greet = greet::tool();
    let spec = greet.spec().expect("valid");
    assert_eq!(spec.params, ["type"]);
    assert_eq!(spec.description, "Greets, typed.");
    assert_eq!(
        (
            spec.auth_provider.as_deref(),
            spec.auth_type.as_deref(),
            spec.auth_with.as_deref()
        ),
        (Some("hubspot"), Some("OAuth2"), Some("access_token"))
    );
    assert_eq!(
        greet.output_schema(),
        Some(
            &json!({"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]})
        )
    );
    let maybe = maybe_token::tool().spec().expect("valid");
    assert!(maybe.params.is_empty());
    assert!(!maybe.requires_auth());
}

#[tokio::test]
async fn calls_read_their_arguments() {
    let client = ToolKitClient::new("key", "app");
    client
        .register_all([
            hello_world::tool(),
            add_numbers::tool(),
            greet::tool(),
            maybe_token::tool(),
        ])
        .expect("valid");
    assert_eq!(
        client.tool("greet").expect("registered").output_schema(),
        greet::tool().output_schema()
    );
    let call = |name: &'static str, params: Value, token: Option<&'static str>| {
        let client = client.clone();
        async move {
            client
                .call_tool_by_name(name, params, token.map(AuthToken::new))
                .await
        }
    };
    assert_eq!(
        call("hello_world", json!({"name": "Ada"}), None).await,
        Ok(json!({"message": "Hello, Ada!"}))
    );
    assert_eq!(
        call("add", json!({"a": 2, "b": 3}), None).await,
        Ok(json!(5))
    );
    assert_eq!(
        call("add", json!({"a": 2, "b": null}), None).await,
        Ok(json!(2))
    );
    assert_eq!(
        call("add", json!({"a": i64::MAX, "b": 1}), None).await,
        Err(CallError::Tool("the sum overflows".into()))
    );
    assert_eq!(
        call("add", json!({"a": "two"}), None).await,
        Err(CallError::InvalidParams(
            "invalid type: string \"two\", expected i64".into()
        ))
    );
    assert!(matches!(
        call("add", json!({}), None).await,
        Err(CallError::MissingParams { .. })
    ));
    assert_eq!(
        call("add", json!({"a": 1, "c": 1}), None).await,
        Err(CallError::UnknownParams(vec!["c".into()]))
    );
    assert_eq!(
        call("greet", json!({"type": "hi"}), None).await,
        Err(CallError::AuthRequired)
    );
    assert_eq!(
        call("greet", json!({"type": "hi"}), Some("abc")).await,
        Ok(json!({"message": "hi with a token of 3"}))
    );
    assert_eq!(call("maybe_token", json!({}), None).await, Ok(json!(false)));
    assert_eq!(
        call("maybe_token", json!({}), Some("t")).await,
        Ok(json!(true))
    );
}

/// The function stays a plain function.
#[tokio::test]
async fn the_function_is_still_callable() {
    assert_eq!(hello_world("Ada".into()).await["message"], "Hello, Ada!");
    assert_eq!(add_numbers(1, None), Ok(1));
}

#[derive(Default)]
struct Counter {
    hits: AtomicU64,
}

#[toolkit]
impl Counter {
    /// Counts a hit.
    #[tool]
    async fn hit(
        &self,
        /// How many hits.
        by: Option<u64>,
    ) -> u64 {
        self.hits.fetch_add(by.unwrap_or(1), Ordering::Relaxed) + by.unwrap_or(1)
    }

    /// The count, from the blocking pool.
    #[atp_registry::tool(name = "count")]
    fn current(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// No state needed.
    #[tool]
    fn version() -> &'static str {
        "1"
    }

    /// Not a tool.
    #[allow(dead_code)]
    fn helper(&self) {}
}

#[tokio::test]
async fn toolkits_share_their_state() {
    let counter = Arc::new(Counter::default());
    let client = ToolKitClient::new("key", "app");
    client.register_toolkit(counter.clone()).expect("valid");
    assert_eq!(client.tool_names(), ["hit", "count", "version"]);
    let hit = client.tool("hit").expect("registered");
    assert_eq!(hit.description(), "Counts a hit.");
    assert_eq!(
        hit.input_schema()["properties"]["by"]["description"],
        "How many hits."
    );
    assert_eq!(
        client
            .call_tool_by_name("hit", json!({"by": 2}), None)
            .await,
        Ok(json!(2))
    );
    assert_eq!(
        client.call_tool_by_name("hit", json!({}), None).await,
        Ok(json!(3))
    );
    assert_eq!(
        client.call_tool_by_name("count", json!({}), None).await,
        Ok(json!(3))
    );
    assert_eq!(counter.hits.load(Ordering::Relaxed), 3);
    assert_eq!(
        client.call_tool_by_name("version", json!({}), None).await,
        Ok(json!("1"))
    );
    // All or nothing: a second registration collides on every name.
    assert!(client.register_toolkit(Counter::default()).is_err());
    assert_eq!(client.tool_count(), 3);
}

mod renamed {
    // The crate under another path, as an adapter re-exports it.
    pub use atp_registry as registry;
}

/// Through another path.
#[tool(crate = "renamed::registry")]
async fn elsewhere() -> u8 {
    7
}

#[test]
fn the_crate_path_can_be_given() {
    assert_eq!(elsewhere::tool().name(), "elsewhere");
}
