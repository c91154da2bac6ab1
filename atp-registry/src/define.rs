//! Tools from plain Rust functions: what [`#[tool]`](crate::tool) and
//! [`#[toolkit]`](crate::toolkit) build, and the support their generated
//! code calls (`__private`, not a public API).

use std::{fmt, future::Future, sync::Arc};

use serde_json::Value;

use crate::{
    error::RegisterError,
    tool::{BlockingJob, BoxFuture, Handler, Tool, ToolSpec},
};

/// A tool bound to its handler, ready to register: what
/// [`#[tool]`](crate::tool) makes of a function (`hello_world::tool()`)
/// and [`#[toolkit]`](crate::toolkit) of each tool method.
///
/// Register it with [`ToolKitClient::register`](crate::ToolKitClient::register)
/// (or [`register_all`](crate::ToolKitClient::register_all)); the rules
/// are checked there, as for the builder's `register_tool`.
///
/// ```
/// use atp_registry::tool;
///
/// /// Echoes the input text.
/// #[tool]
/// async fn echo(text: String) -> String {
///     text
/// }
///
/// let def = echo::tool();
/// assert_eq!(def.name(), "echo");
/// let spec = def.spec()?;
/// assert_eq!(spec.description, "Echoes the input text.");
/// assert_eq!(spec.required_params, ["text"]);
/// # Ok::<(), atp_registry::RegisterError>(())
/// ```
pub struct ToolDef {
    tool: Tool,
    handler: Handler,
    /// A rule the signature breaks that only shows at run time (a
    /// recursive param type): registration fails with it.
    refused: Option<RegisterError>,
}

impl ToolDef {
    /// The tool's name.
    pub fn name(&self) -> &str {
        self.tool.name()
    }

    /// The tool's description, as the builder would have written it.
    pub fn tool(&self) -> &Tool {
        &self.tool
    }

    /// The tool's description, checked against the registration rules:
    /// what [`RegisteredTool::spec`](crate::RegisteredTool::spec) will be
    /// once it is registered.
    pub fn spec(&self) -> Result<ToolSpec, RegisterError> {
        if let Some(refused) = &self.refused {
            return Err(refused.clone());
        }
        self.tool.spec()
    }

    /// The JSON Schema of the tool's result, when its type has an object
    /// schema (see [`Tool::output_schema`]).
    pub fn output_schema(&self) -> Option<&Value> {
        self.tool.output_schema.as_ref()
    }

    pub(crate) fn into_parts(self) -> Result<(Tool, Handler), RegisterError> {
        match self.refused {
            Some(refused) => Err(refused),
            None => Ok((self.tool, self.handler)),
        }
    }
}

impl fmt::Debug for ToolDef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolDef")
            .field("tool", &self.tool)
            .field("handler", &self.handler)
            .finish()
    }
}

/// A type whose methods are tools sharing its state: what
/// [`#[toolkit]`](crate::toolkit) implements for the type of its `impl`
/// block. Register them with
/// [`ToolKitClient::register_toolkit`](crate::ToolKitClient::register_toolkit).
pub trait Toolkit: Send + Sync + 'static {
    /// The tools, each holding a clone of `self`.
    fn tools(self: Arc<Self>) -> Vec<ToolDef>;
}

/// What [`ToolKitClient::register_toolkit`](crate::ToolKitClient::register_toolkit)
/// takes: a [`Toolkit`]'s state, or an `Arc` of it (to keep a handle on
/// the state).
pub trait ToolkitState<K> {
    /// The state, shared.
    fn into_shared(self) -> Arc<K>;
}

impl<K: Toolkit> ToolkitState<K> for K {
    fn into_shared(self) -> Arc<K> {
        Arc::new(self)
    }
}

impl<K: Toolkit> ToolkitState<K> for Arc<K> {
    fn into_shared(self) -> Arc<K> {
        self
    }
}

/// What the code `#[tool]` and `#[toolkit]` generate calls. Not a public
/// API: it changes with the macros.
#[doc(hidden)]
pub mod __private {
    use std::{convert::Infallible, fmt::Display, marker::PhantomData};

    use schemars::{JsonSchema, SchemaGenerator, generate::SchemaSettings};
    use serde::{Serialize, de::DeserializeOwned};
    use serde_json::{Map, json};

    use super::*;

    pub use crate::{AuthToken, Call, Progress, Tool, ToolDef, tool::is_reserved_param};
    pub use serde_json::Value;

    /// What a handler makes of a call: the result as JSON, or the
    /// message of its error.
    pub type Output = Result<Value, String>;

    /// A tool being described from a function's signature.
    pub struct Def {
        tool: Tool,
        generator: SchemaGenerator,
        params: Vec<String>,
        required: Vec<String>,
        schemas: Map<String, Value>,
        refused: Option<RegisterError>,
    }

    /// The settings of every schema `#[tool]` generates: JSON Schema
    /// 2020-12, subschemas inlined, no `$schema` (as typed tools).
    fn settings() -> SchemaSettings {
        SchemaSettings::draft2020_12().with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
    }

    impl Def {
        /// Starts from the tool as the builder describes it (name,
        /// description, auth metadata).
        pub fn new(tool: Tool) -> Self {
            Self {
                tool,
                generator: settings().into_generator(),
                params: Vec::new(),
                required: Vec::new(),
                schemas: Map::new(),
                refused: None,
            }
        }

        /// Adds a param: its name, doc comment, whether it may be left out,
        /// and its type's schema (from [`schema_fn`]).
        pub fn param(
            mut self,
            name: &str,
            doc: &str,
            optional: bool,
            schema: fn(&mut SchemaGenerator) -> Value,
        ) -> Self {
            // A param's schema is an object (as the builder's
            // `param_schema`): `true` (any value, e.g. a `Value`) is `{}`.
            let mut schema = match schema(&mut self.generator) {
                Value::Bool(true) => json!({}),
                Value::Bool(false) => json!({"not": {}}),
                schema => schema,
            };
            // Input schemas are inline (docs/PROTOCOL.md §2): a type
            // that needs definitions (a recursive one) is refused, as a
            // typed tool's is.
            if !self.generator.definitions().is_empty() {
                self.generator.definitions_mut().clear();
                self.refused
                    .get_or_insert_with(|| RegisterError::RecursiveParam(name.to_owned()));
            }
            let doc = doc.trim();
            if !doc.is_empty()
                && let Some(o) = schema.as_object_mut()
            {
                o.insert("description".into(), doc.into());
            }
            self.params.push(name.to_owned());
            if !optional {
                self.required.push(name.to_owned());
            }
            self.schemas.insert(name.to_owned(), schema);
            self
        }

        /// Sets the output schema (from the result type; `None` when it
        /// has no object schema).
        pub fn output(mut self, schema: Option<Value>) -> Self {
            if let Some(schema) = schema {
                self.tool = self.tool.output_schema(schema);
            }
            self
        }

        /// The tool, its params described as the builder would, each
        /// with its schema ([`Tool::param_schema`]); and what it breaks.
        fn finish(self) -> (Tool, Option<RegisterError>) {
            let mut tool = self.tool.params(self.params).required_params(self.required);
            for (name, schema) in self.schemas {
                tool = tool.param_schema(name, schema);
            }
            (tool, self.refused)
        }

        /// Finishes with an async handler: `f` reads the params (an
        /// `invalid_params` message when it can not) and returns the
        /// call's future.
        pub fn asynchronous<F, Fut>(self, f: F) -> ToolDef
        where
            F: Fn(Call) -> Result<Fut, String> + Send + Sync + 'static,
            Fut: Future<Output = Output> + Send + 'static,
        {
            let (tool, refused) = self.finish();
            ToolDef {
                tool,
                handler: Handler::Typed(Arc::new(move |call| {
                    f(call).map(|fut| Box::pin(fut) as BoxFuture<Output>)
                })),
                refused,
            }
        }

        /// Finishes with a blocking handler: `f` reads the params, and the
        /// job it returns runs on tokio's blocking pool.
        pub fn blocking<F, J>(self, f: F) -> ToolDef
        where
            F: Fn(Call) -> Result<J, String> + Send + Sync + 'static,
            J: FnOnce() -> Output + Send + 'static,
        {
            let (tool, refused) = self.finish();
            ToolDef {
                tool,
                handler: Handler::TypedBlocking(Arc::new(move |call| {
                    f(call).map(|job| Box::new(job) as BlockingJob)
                })),
                refused,
            }
        }
    }

    /// The schema of a param's type. The one place `#[tool]` requires
    /// `JsonSchema`, called with the argument type's span so that a type
    /// without a schema is pointed at.
    pub fn schema_fn<T: ArgSchema + ?Sized>() -> fn(&mut SchemaGenerator) -> Value {
        |generator| generator.subschema_for::<T>().to_value()
    }

    /// A type with a JSON Schema, as a tool's argument needs.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` has no JSON Schema, so it can not be a tool's argument",
        label = "this argument's type does not implement `schemars::JsonSchema`",
        note = "derive it: `#[derive(serde::Deserialize, schemars::JsonSchema)]`"
    )]
    pub trait ArgSchema: JsonSchema {}
    impl<T: JsonSchema + ?Sized> ArgSchema for T {}

    /// A param's value, as a typed tool reads it.
    pub fn arg<T: DeserializeOwned>(value: Value) -> Result<T, String> {
        T::deserialize(value).map_err(|e| e.to_string())
    }

    /// A param the call did not give: `None` for an `Option`, else the
    /// message a typed tool gives (the checks before the handler refuse
    /// a call without a required param, so that one is not seen).
    pub fn absent<T: DeserializeOwned>(name: &str) -> Result<T, String> {
        T::deserialize(Value::Null).map_err(|_| format!("missing field `{name}`"))
    }

    /// The call's token, for an `AuthToken` argument (the tool requires
    /// one, so the checks before the handler make sure it is there).
    pub fn token(token: Option<AuthToken>) -> Result<AuthToken, String> {
        token.ok_or_else(|| "This tool needs an auth token".to_owned())
    }

    /// The schema of a result type, when it is an object schema: what
    /// the result serializes to, without its title and description.
    pub fn output_schema<T: JsonSchema + ?Sized>() -> Option<Value> {
        let mut schema = settings()
            .for_serialize()
            .into_generator()
            .into_root_schema_for::<T>()
            .to_value();
        if !crate::tool::is_object_schema(&schema) {
            return None;
        }
        if let Some(o) = schema.as_object_mut() {
            o.remove("title");
            o.remove("description");
        }
        Some(schema)
    }

    /// A type, to choose a method by what it is (autoref
    /// specialization: the type is concrete where the macros use it).
    pub struct Probe<T: ?Sized>(PhantomData<fn(&T)>);

    /// The probe of `T`.
    pub const fn probe<T: ?Sized>() -> Probe<T> {
        Probe(PhantomData)
    }

    /// The probe of a value's type.
    pub fn probe_of<T>(_: &T) -> Probe<T> {
        Probe(PhantomData)
    }

    /// `(&&probe::<T>()).atp_optional()`: whether a param of type `T`
    /// may be left out (it is an `Option`).
    pub trait OptionalParam {
        /// Yes.
        fn atp_optional(&self) -> bool {
            true
        }
    }
    impl<T> OptionalParam for &Probe<Option<T>> {}

    /// See [`OptionalParam`].
    pub trait RequiredParam {
        /// No.
        fn atp_optional(&self) -> bool {
            false
        }
    }
    impl<T: ?Sized> RequiredParam for Probe<T> {}

    /// `(&&&probe::<R>()).atp_output_schema()`: the output schema of a
    /// function returning `R` — `T`'s for a `Result<T, E>`, `R`'s for
    /// any other type, when there is a schema.
    pub trait ResultOutputSchema {
        /// `T`'s.
        fn atp_output_schema(&self) -> Option<Value>;
    }
    impl<T: JsonSchema, E> ResultOutputSchema for &&Probe<Result<T, E>> {
        fn atp_output_schema(&self) -> Option<Value> {
            output_schema::<T>()
        }
    }

    /// See [`ResultOutputSchema`].
    pub trait PlainOutputSchema {
        /// `R`'s.
        fn atp_output_schema(&self) -> Option<Value>;
    }
    impl<T: JsonSchema + ?Sized> PlainOutputSchema for &Probe<T> {
        fn atp_output_schema(&self) -> Option<Value> {
            output_schema::<T>()
        }
    }

    /// See [`ResultOutputSchema`].
    pub trait NoOutputSchema {
        /// None.
        fn atp_output_schema(&self) -> Option<Value> {
            None
        }
    }
    impl<T: ?Sized> NoOutputSchema for Probe<T> {}

    /// `(&&probe_of(&out)).atp_output_kind().output(out)`: a function's
    /// return value as a handler's output — a `Result<T, E>` as it is,
    /// any other value as its success.
    pub trait ResultOutput {
        /// A `Result`.
        fn atp_output_kind(&self) -> ResultKind {
            ResultKind
        }
    }
    impl<T, E> ResultOutput for &Probe<Result<T, E>> {}

    /// See [`ResultOutput`].
    pub trait PlainOutput {
        /// Any other value.
        fn atp_output_kind(&self) -> PlainKind {
            PlainKind
        }
    }
    impl<T: ?Sized> PlainOutput for Probe<T> {}

    /// A return value that is a `Result`.
    pub struct ResultKind;

    impl ResultKind {
        /// The output: the value, or the error's text.
        pub fn output<T: Serialize + 'static, E: Display>(self, out: Result<T, E>) -> Output {
            crate::tool::into_output(out)
        }
    }

    /// A return value that is not a `Result`.
    pub struct PlainKind;

    impl PlainKind {
        /// The output: the value.
        pub fn output<T: Serialize + 'static>(self, out: T) -> Output {
            crate::tool::into_output(Ok::<T, Infallible>(out))
        }
    }
}

#[cfg(test)]
// The borrows choose the method (autoref specialization).
#[allow(clippy::needless_borrow)]
mod tests {
    use serde_json::json;

    use super::__private::*;

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Inner {
        /// Some text.
        text: String,
        n: Option<u8>,
    }

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[allow(dead_code)]
    enum Color {
        Red,
        Green,
    }

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Args {
        /// The first.
        a: i64,
        b: Option<Inner>,
        /// Colors.
        c: Vec<Color>,
        d: Option<String>,
        e: serde_json::Value,
        /// Anything, described.
        f: serde_json::Value,
    }

    /// A tool described param by param gets the schema of the typed
    /// tool whose struct has the same fields: the same bytes (but for a
    /// schema `true`, which a param's schema spells `{}`).
    #[test]
    fn params_one_by_one_make_the_typed_schema() {
        let def = Def::new(Tool::new("t"))
            .param("a", "The first.", false, schema_fn::<i64>())
            .param("b", "", true, schema_fn::<Option<Inner>>())
            .param("c", "Colors.", false, schema_fn::<Vec<Color>>())
            .param("d", "", true, schema_fn::<Option<String>>())
            .param("e", "", false, schema_fn::<serde_json::Value>())
            .param(
                "f",
                "Anything, described.",
                false,
                schema_fn::<serde_json::Value>(),
            )
            .asynchronous(|_call| Ok(async { Ok(json!(null)) }));
        let spec = def.spec().expect("valid");
        let mut typed = crate::schema::typed_schema::<Args>().expect("typed");
        assert_eq!(typed.schema["properties"]["e"], json!(true));
        typed.schema["properties"]["e"] = json!({});
        assert_eq!(
            serde_json::to_string(&spec.input_schema).expect("json"),
            serde_json::to_string(&typed.schema).expect("json")
        );
        assert_eq!(spec.params, typed.params);
        assert_eq!(spec.required_params, typed.required);
    }

    #[derive(schemars::JsonSchema)]
    #[allow(dead_code)]
    struct Node {
        value: i32,
        next: Option<Box<Node>>,
    }

    #[test]
    fn recursive_params_are_refused() {
        let def = Def::new(Tool::new("t"))
            .param("n", "", false, schema_fn::<u8>())
            .param("head", "", false, schema_fn::<Node>())
            .asynchronous(|_call| Ok(async { Ok(json!(null)) }));
        let refused = Err(crate::RegisterError::RecursiveParam("head".into()));
        assert_eq!(def.spec(), refused);
        let client = crate::ToolKitClient::new("k", "a");
        assert_eq!(client.register(def), refused.map(|_| ()));
        assert_eq!(client.tool_count(), 0);
    }

    #[derive(serde::Serialize, schemars::JsonSchema)]
    struct Greeting {
        message: String,
    }

    #[test]
    fn probes_choose_by_type() {
        assert!((&&probe::<Option<u8>>()).atp_optional());
        assert!(!(&&probe::<u8>()).atp_optional());
        assert!(!(&&probe::<Vec<Option<u8>>>()).atp_optional());

        let object = json!({"type": "object", "properties": {"message": {"type": "string"}}, "required": ["message"]});
        assert_eq!(
            (&&&probe::<Greeting>()).atp_output_schema(),
            Some(object.clone())
        );
        assert_eq!(
            (&&&probe::<Result<Greeting, String>>()).atp_output_schema(),
            Some(object)
        );
        // Not objects, or no schema at all.
        assert_eq!((&&&probe::<serde_json::Value>()).atp_output_schema(), None);
        assert_eq!((&&&probe::<Result<u8, String>>()).atp_output_schema(), None);
        assert_eq!((&&&probe::<Option<Greeting>>()).atp_output_schema(), None);
        assert_eq!(
            (&&&probe::<Result<crate::ToolError, String>>()).atp_output_schema(),
            None
        );

        let ok: Result<u8, &str> = Ok(1);
        assert_eq!((&&probe_of(&ok)).atp_output_kind().output(ok), Ok(json!(1)));
        let err: Result<u8, &str> = Err("no");
        assert_eq!(
            (&&probe_of(&err)).atp_output_kind().output(err),
            Err("no".into())
        );
        let plain = Greeting {
            message: "hi".into(),
        };
        assert_eq!(
            (&&probe_of(&plain)).atp_output_kind().output(plain),
            Ok(json!({"message": "hi"}))
        );
    }

    #[test]
    fn args_read_as_a_typed_tool_reads_them() {
        assert_eq!(arg::<i64>(json!(3)), Ok(3));
        assert_eq!(
            arg::<i64>(json!("x")),
            Err("invalid type: string \"x\", expected i64".into())
        );
        assert_eq!(absent::<Option<i64>>("a"), Ok(None));
        assert_eq!(absent::<i64>("a"), Err("missing field `a`".into()));
        assert!(token(None).is_err());
    }
}
