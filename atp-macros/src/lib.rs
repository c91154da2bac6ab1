#![doc = include_str!("../README.md")]

use proc_macro::TokenStream;

mod args;
mod expand;
mod signature;

/// Makes an ATP tool of a function: its name is the function's, its
/// description the doc comment, its params the arguments (their doc
/// comments describe them), their JSON Schema the argument types'.
///
/// The function stays a plain Rust function. Next to it, `#[tool]` adds
/// `NAME::tool()`, which returns the [`ToolDef`] to register:
///
/// ```
/// use atp_registry::{AuthToken, ToolError, ToolKitClient, tool};
/// use serde_json::{Value, json};
///
/// /// Returns a greeting.
/// #[tool]
/// async fn hello_world(
///     /// Who to greet.
///     name: String,
/// ) -> Value {
///     json!({"message": format!("Hello, {name}!")})
/// }
///
/// /// Fetches contacts from HubSpot.
/// #[tool(auth_provider = "hubspot", auth_type = "OAuth2", auth_with = "access_token")]
/// async fn get_contacts(token: AuthToken) -> Result<Value, ToolError> {
///     Ok(json!({"contacts": [], "token_length": token.expose().len()}))
/// }
///
/// let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "my_app");
/// client.register(hello_world::tool())?;
/// client.register(get_contacts::tool())?;
/// # Ok::<(), atp_registry::RegisterError>(())
/// ```
///
/// - **Async or blocking.** An `async fn` runs on the async executor; a
///   plain `fn` runs on tokio's blocking pool (as
///   `register_blocking_tool`).
/// - **Arguments.** Each argument `name: T` is a param named `name`; `T`
///   must be `serde::Deserialize` and `schemars::JsonSchema` (owned: a
///   `String`, not a `&str`). `Option<T>` makes it optional; the others
///   are required. Patterns, generics and `impl Trait` are refused.
/// - **The token.** An argument of type `AuthToken` gets the call's auth
///   token; it needs `auth_provider` or `auth_type`, so that a call
///   without one is refused before the tool runs. `Option<AuthToken>`
///   runs without. It is not a param. An argument of type `Progress`
///   gets the call's progress handle.
/// - **The result.** `Result<T, E>` with `T: Serialize` and `E: Display`
///   (its text is the error callers see), or any `T: Serialize`. When
///   `T` has an object JSON Schema, it is the tool's output schema, which
///   the MCP face advertises (ATP's tool context does not change).
///
/// Attribute arguments, all optional:
///
/// | argument | meaning |
/// |---|---|
/// | `name = "..."` | the tool's name, instead of the function's |
/// | `description = "..."` | the description, instead of the doc comment |
/// | `auth_provider = "..."`, `auth_type = "..."`, `auth_with = "..."` | the auth metadata, as in the Python SDK (`"hubspot"`, `"OAuth2"`, `"access_token"`) |
/// | `crate = "path"` | where `atp_registry` is, when it is not a dependency by that name (e.g. `crate = "atp_axum::atp_registry"`) |
///
/// Refused at compile time, with the span of what is wrong: an invalid
/// tool name (the rule of [`is_valid_tool_name`]), a param named
/// `auth_token`, an argument type without a JSON Schema, a `self`
/// receiver (methods are tools under [`#[toolkit]`](macro@toolkit)).
///
/// [`ToolDef`]: https://docs.rs/atp-registry/latest/atp_registry/struct.ToolDef.html
/// [`is_valid_tool_name`]: https://docs.rs/atp-registry/latest/atp_registry/fn.is_valid_tool_name.html
#[proc_macro_attribute]
pub fn tool(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::tool(attr.into(), item.into()).into()
}

/// Makes every `#[tool]` method of an `impl` block a tool sharing the
/// value it is called on (the toolkit's state), and implements
/// [`Toolkit`] for the type: register them all with
/// `client.register_toolkit(state)`.
///
/// ```
/// use std::collections::HashMap;
///
/// use atp_registry::{ToolError, ToolKitClient, toolkit};
///
/// struct Directory {
///     emails: HashMap<String, String>,
/// }
///
/// #[toolkit]
/// impl Directory {
///     /// Finds a person's email address.
///     #[tool]
///     async fn find_email(
///         &self,
///         /// The person's name.
///         name: String,
///     ) -> Result<String, ToolError> {
///         self.emails.get(&name).cloned().ok_or_else(|| ToolError::new("nobody by that name"))
///     }
///
///     /// How many people there are.
///     #[tool]
///     fn count(&self) -> usize {
///         self.emails.len()
///     }
///
///     /// Not a tool: no `#[tool]`.
///     fn helper(&self) {}
/// }
///
/// let directory = Directory { emails: HashMap::from([("Ada".into(), "ada@example.com".into())]) };
/// let client = ToolKitClient::new("YOUR_ATP_TOOLKIT_API_KEY", "directory");
/// client.register_toolkit(directory)?;
/// assert_eq!(client.tool_names(), ["find_email", "count"]);
/// # Ok::<(), atp_registry::RegisterError>(())
/// ```
///
/// Tool methods take `&self` (or no receiver); the rules of
/// [`#[tool]`](macro@tool) apply to each, and two of them can not have
/// the same name. `#[toolkit(crate = "path")]` says where
/// `atp_registry` is.
///
/// [`Toolkit`]: https://docs.rs/atp-registry/latest/atp_registry/trait.Toolkit.html
#[proc_macro_attribute]
pub fn toolkit(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand::toolkit(attr.into(), item.into()).into()
}
