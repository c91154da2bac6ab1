//! The answers the fixture must give, written out by hand (not computed by
//! the core under test).

use serde_json::{Value, json};

use super::ensure;

/// The name of the typed tool, whose derived schema is checked by rules
/// rather than byte for byte (see [`mask_typed_schemas`]).
pub(crate) const TYPED_TOOL: &str = "add";

/// Stands in for the typed tool's schema in whole-body comparisons.
const MASK: &str = "<the typed tool's schema, checked separately>";

/// One tool of the fixture.
pub(crate) struct ToolSpec {
    pub(crate) name: &'static str,
    description: &'static str,
    params: &'static [&'static str],
    required: &'static [&'static str],
    auth: Option<(&'static str, &'static str, &'static str)>,
}

pub(crate) const TOOLS: &[ToolSpec] = &[
    ToolSpec {
        name: "echo",
        description: "Echoes the text back.",
        params: &["text"],
        required: &["text"],
        auth: None,
    },
    ToolSpec {
        name: "hello_world",
        description: "Returns a greeting.",
        params: &["name"],
        required: &["name"],
        auth: None,
    },
    ToolSpec {
        name: "add",
        description: "Adds two integers.",
        params: &["a", "b"],
        required: &["a", "b"],
        auth: None,
    },
    ToolSpec {
        name: "optional",
        description: "Echoes a required and an optional param.",
        params: &["a", "b"],
        required: &["a"],
        auth: None,
    },
    ToolSpec {
        name: "fail",
        description: "Always fails with the error boom.",
        params: &[],
        required: &[],
        auth: None,
    },
    ToolSpec {
        name: "panic",
        description: "Always panics.",
        params: &[],
        required: &[],
        auth: None,
    },
    ToolSpec {
        name: "slow",
        description: "Sleeps ms milliseconds without blocking, then answers.",
        params: &["ms"],
        required: &["ms"],
        auth: None,
    },
    ToolSpec {
        name: "blocking",
        description: "Blocks its thread for ms milliseconds, then answers.",
        params: &["ms"],
        required: &["ms"],
        auth: None,
    },
    ToolSpec {
        name: "secure",
        description: "Needs an auth token; answers its length.",
        params: &[],
        required: &[],
        auth: Some(("demo", "OAuth2", "access_token")),
    },
];

/// How many tools the `conformance` toolkit has.
pub(crate) const TOOL_COUNT: usize = 9;

/// The tools in registration order.
pub(crate) fn tool_names() -> Vec<&'static str> {
    TOOLS.iter().map(|t| t.name).collect()
}

fn spec(name: &str) -> &'static ToolSpec {
    TOOLS.iter().find(|t| t.name == name).unwrap_or(&TOOLS[0])
}

/// The input schema of an untyped tool: every param a string.
fn input_schema(tool: &ToolSpec) -> Value {
    if tool.name == TYPED_TOOL {
        return json!({
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        });
    }
    let properties: serde_json::Map<String, Value> = tool
        .params
        .iter()
        .map(|p| ((*p).to_owned(), json!({"type": "string"})))
        .collect();
    json!({"type": "object", "properties": properties, "required": tool.required})
}

/// The OpenAI-strict form of an untyped tool's schema.
fn strict_schema(tool: &ToolSpec) -> Value {
    let properties: serde_json::Map<String, Value> = tool
        .params
        .iter()
        .map(|p| {
            let ty = if tool.required.contains(p) {
                json!("string")
            } else {
                json!(["string", "null"])
            };
            ((*p).to_owned(), json!({ "type": ty }))
        })
        .collect();
    json!({
        "type": "object",
        "properties": properties,
        "required": tool.params,
        "additionalProperties": false,
    })
}

/// TOOL_CONTEXT of one tool.
pub(crate) fn tool_context(name: &str) -> Value {
    let t = spec(name);
    let (provider, kind, with) = match t.auth {
        Some((p, k, w)) => (json!(p), json!(k), json!(w)),
        None => (Value::Null, Value::Null, Value::Null),
    };
    json!({
        "function": t.name,
        "params": t.params,
        "required_params": t.required,
        "description": t.description,
        "auth_provider": provider,
        "auth_type": kind,
        "auth_with": with,
        "input_schema": input_schema(t),
    })
}

/// `GET /atp/`.
pub(crate) fn listing() -> Value {
    json!({"toolkits": [
        {"toolkit": "conformance", "app_name": "Conformance", "tools": TOOL_COUNT},
        {"toolkit": "mcp_conformance", "app_name": "MCP Conformance", "tools": crate::mcp_fixture::TOOL_COUNT}
    ]})
}

/// `GET /atp/conformance/`.
pub(crate) fn toolkit_context() -> Value {
    let tools: Vec<Value> = TOOLS.iter().map(|t| tool_context(t.name)).collect();
    json!({"toolkit": "conformance", "app_name": "Conformance", "tools": tools})
}

/// `GET /atp/locked/` (with the key).
pub(crate) fn locked_toolkit_context() -> Value {
    json!({"toolkit": "locked", "app_name": "Locked", "tools": [tool_context("echo")]})
}

/// `GET /atp/conformance/?provider=sent[&strict=true]`; `format` is the
/// canonical provider name.
pub(crate) fn provider_context(sent: &str, format: &str, strict: bool) -> Value {
    let strict = strict && matches!(format, "openai" | "openai_chat");
    let tools: Vec<Value> = TOOLS
        .iter()
        .map(|t| {
            let schema = if strict {
                strict_schema(t)
            } else {
                input_schema(t)
            };
            let (name, description) = (t.name, t.description);
            match format {
                "openai" => json!({
                    "type": "function", "name": name, "description": description,
                    "parameters": schema, "strict": strict,
                }),
                "openai_chat" => {
                    let mut function =
                        json!({"name": name, "description": description, "parameters": schema});
                    if strict {
                        function["strict"] = json!(true);
                    }
                    json!({"type": "function", "function": function})
                }
                "anthropic" => {
                    json!({"name": name, "description": description, "input_schema": schema})
                }
                _ => json!({
                    "type": "function",
                    "function": {"name": name, "description": description, "parameters": schema},
                }),
            }
        })
        .collect();
    json!({"toolkit": "conformance", "app_name": "Conformance", "provider": sent, "tools": tools})
}

/// The keys an `input_schema` may have at its top.
const SCHEMA_TOP_KEYS: &[&str] = &[
    "type",
    "properties",
    "required",
    "additionalProperties",
    "title",
    "description",
];

/// Checks the rules every input schema follows (docs/PROTOCOL.md §3 and §4):
/// `type: "object"`, `properties`, `required` (a subset of the
/// properties), nothing else at the top but `additionalProperties`,
/// `title` and `description`, no `$schema`, `$ref` or `$defs` anywhere.
pub(crate) fn check_plain_schema(what: &str, schema: &Value) -> Result<(), String> {
    let Some(top) = schema.as_object() else {
        return Err(format!("{what}: the schema is not an object: {schema}"));
    };
    ensure!(
        top.get("type") == Some(&json!("object")),
        "{what}: the schema's type is not \"object\": {schema}"
    );
    let props = top.get("properties").and_then(Value::as_object);
    ensure!(
        props.is_some(),
        "{what}: the schema has no properties object: {schema}"
    );
    let required = top.get("required").and_then(Value::as_array);
    ensure!(
        required.is_some(),
        "{what}: the schema has no required array: {schema}"
    );
    for r in required.into_iter().flatten() {
        ensure!(
            r.as_str()
                .is_some_and(|r| props.is_some_and(|p| p.contains_key(r))),
            "{what}: required {r} is not a property: {schema}"
        );
    }
    for key in top.keys() {
        ensure!(
            SCHEMA_TOP_KEYS.contains(&key.as_str()),
            "{what}: the schema has {key:?} at its top: {schema}"
        );
    }
    let text = schema.to_string();
    for banned in ["\"$schema\"", "\"$ref\"", "\"$defs\"", "\"definitions\""] {
        ensure!(
            !text.contains(banned),
            "{what}: the schema contains {banned}: {schema}"
        );
    }
    Ok(())
}

/// Checks the typed `add` tool's derived schema: plain, properties exactly
/// `a` and `b`, both integers and required; in strict form also
/// `additionalProperties: false`.
fn check_typed_schema(what: &str, schema: &Value, strict: bool) -> Result<(), String> {
    check_plain_schema(what, schema)?;
    let props = &schema["properties"];
    let keys: Vec<&String> = props
        .as_object()
        .map(|p| p.keys().collect())
        .unwrap_or_default();
    ensure!(
        keys == ["a", "b"],
        "{what}: expected the properties a and b, got {keys:?}"
    );
    for p in ["a", "b"] {
        ensure!(
            props[p]["type"] == "integer",
            "{what}: expected {p} to be {{\"type\": \"integer\", ...}}, got {}",
            props[p]
        );
    }
    let mut required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    required.sort_unstable();
    ensure!(
        required == ["a", "b"],
        "{what}: expected a and b required, got {}",
        schema["required"]
    );
    if strict {
        ensure!(
            schema["additionalProperties"] == false,
            "{what}: a strict schema needs additionalProperties: false, got {schema}"
        );
    }
    Ok(())
}

/// The typed tool's schema slot in one tool description of any shape
/// (TOOL_CONTEXT or a provider format), if this description is of the
/// typed tool.
fn typed_slot(tool: &mut Value) -> Option<&mut Value> {
    let name = tool
        .get("function")
        .and_then(|f| f.as_str().or_else(|| f.get("name").and_then(Value::as_str)))
        .or_else(|| tool.get("name").and_then(Value::as_str))?;
    if name != TYPED_TOOL {
        return None;
    }
    if tool.get("function").is_some_and(Value::is_object) {
        return tool.get_mut("function")?.get_mut("parameters");
    }
    if tool.get("input_schema").is_some() {
        return tool.get_mut("input_schema");
    }
    tool.get_mut("parameters")
}

/// Checks the typed tool's schema wherever it appears in `body` (a tool
/// context, or a toolkit answer with `tools`), when `check` is set, and
/// replaces it with a mask so that the rest compares byte for byte. The
/// derived schema's details (`format: "int64"`, ...) belong to the
/// schema generator, not to the contract.
pub(crate) fn mask_typed_schemas(
    body: &mut Value,
    strict: bool,
    check: bool,
) -> Result<(), String> {
    let mut mask = |tool: &mut Value| -> Result<(), String> {
        if let Some(slot) = typed_slot(tool) {
            if check {
                check_typed_schema("the typed tool add", slot, strict)?;
            }
            *slot = json!(MASK);
        }
        Ok(())
    };
    if let Some(tools) = body.get_mut("tools").and_then(Value::as_array_mut) {
        tools.iter_mut().try_for_each(&mut mask)
    } else {
        mask(body)
    }
}
