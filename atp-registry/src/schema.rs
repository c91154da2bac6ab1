//! JSON Schemas of tool inputs, and tool descriptions in each LLM
//! provider's format (docs/PROTOCOL.md §4).

use std::{fmt, str::FromStr};

use serde_json::{Map, Value, json};

use crate::wire::{FunctionDef, ProviderTool};

use crate::{error::RegisterError, tool::Tool};

/// The LLM providers whose tool formats ATP speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// OpenAI Responses API: `{"type": "function", "name", "description", "parameters", "strict"}`.
    OpenAi,
    /// OpenAI Chat Completions: `{"type": "function", "function": {...}}`.
    OpenAiChat,
    /// Anthropic Messages: `{"name", "description", "input_schema"}`.
    Anthropic,
    /// Mistral chat (also spelled `mistralai`): `{"type": "function", "function": {...}}`.
    Mistral,
}

/// A provider name that is not one of `openai`, `openai_chat`,
/// `anthropic`, `mistral`, `mistralai`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Unknown provider {0:?}: use openai, openai_chat, anthropic, mistral or mistralai")]
pub struct UnknownProvider(pub String);

impl FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" => Ok(Provider::OpenAi),
            "openai_chat" => Ok(Provider::OpenAiChat),
            "anthropic" => Ok(Provider::Anthropic),
            "mistral" | "mistralai" => Ok(Provider::Mistral),
            other => Err(UnknownProvider(other.to_owned())),
        }
    }
}

impl Provider {
    /// The canonical name (`mistral` for both spellings).
    pub const fn as_str(self) -> &'static str {
        match self {
            Provider::OpenAi => "openai",
            Provider::OpenAiChat => "openai_chat",
            Provider::Anthropic => "anthropic",
            Provider::Mistral => "mistral",
        }
    }

    /// Describes one tool in this provider's format. `strict` only changes
    /// the OpenAI formats.
    pub fn tool_schema(
        self,
        name: &str,
        description: &str,
        input_schema: &Value,
        strict: bool,
    ) -> Value {
        let strict = strict && matches!(self, Provider::OpenAi | Provider::OpenAiChat);
        let parameters = if strict {
            strict_schema(input_schema)
        } else {
            input_schema.clone()
        };
        let (name, description) = (name.to_owned(), description.to_owned());
        let tool = match self {
            Provider::OpenAi => ProviderTool::OpenAi {
                kind: "function".into(),
                name,
                description,
                parameters,
                strict,
            },
            Provider::OpenAiChat | Provider::Mistral => ProviderTool::Function {
                kind: "function".into(),
                function: FunctionDef {
                    name,
                    description,
                    parameters,
                    strict: strict.then_some(true),
                },
            },
            Provider::Anthropic => ProviderTool::Anthropic {
                name,
                description,
                input_schema: parameters,
            },
        };
        serde_json::to_value(tool).unwrap_or(Value::Null)
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The input schema of an untyped tool: every param `{"type": "string"}`
/// unless the tool gave a schema for it.
pub(crate) fn untyped_schema(tool: &Tool) -> Value {
    if let Some(schema) = &tool.schema {
        return schema.clone();
    }
    let mut properties = Map::new();
    for p in &tool.params {
        let schema = tool
            .param_schemas
            .iter()
            .rev()
            .find(|(name, _)| name == p)
            .map(|(_, s)| s.clone())
            .unwrap_or_else(|| json!({"type": "string"}));
        properties.insert(p.clone(), schema);
    }
    json!({
        "type": "object",
        "properties": properties,
        "required": tool.required_params,
    })
}

/// What a typed tool's argument type says: its params, the required ones,
/// and the input schema.
pub(crate) struct TypedSchema {
    pub params: Vec<String>,
    pub required: Vec<String>,
    pub schema: Value,
}

/// Derives params, required params and an inlined input schema from `A`.
pub(crate) fn typed_schema<A: schemars::JsonSchema>() -> Result<TypedSchema, RegisterError> {
    let generator = schemars::generate::SchemaSettings::draft2020_12()
        .with(|s| {
            s.inline_subschemas = true;
            s.meta_schema = None;
        })
        .into_generator();
    let root: Value = generator.into_root_schema_for::<A>().into();
    let Value::Object(mut root) = root else {
        return Err(RegisterError::TypedArgsNotObject(
            A::schema_name().into_owned(),
        ));
    };
    if root.contains_key("$defs") || root.contains_key("definitions") {
        return Err(RegisterError::TypedArgsNotObject(format!(
            "{} is recursive; use an untyped tool with a param schema",
            A::schema_name()
        )));
    }
    if root.get("type").and_then(Value::as_str) != Some("object") {
        return Err(RegisterError::TypedArgsNotObject(
            A::schema_name().into_owned(),
        ));
    }
    let properties = match root.remove("properties") {
        Some(Value::Object(p)) => p,
        None => Map::new(),
        Some(_) => {
            return Err(RegisterError::TypedArgsNotObject(
                A::schema_name().into_owned(),
            ));
        }
    };
    let required: Vec<String> = match root.remove("required") {
        Some(Value::Array(r)) => r
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        _ => Vec::new(),
    };
    let params: Vec<String> = properties.keys().cloned().collect();
    let mut schema = Map::new();
    schema.insert("type".into(), "object".into());
    schema.insert("properties".into(), Value::Object(properties));
    schema.insert("required".into(), json!(required));
    if let Some(d) = root.remove("description") {
        schema.insert("description".into(), d);
    }
    Ok(TypedSchema {
        params,
        required,
        schema: Value::Object(schema),
    })
}

/// Formats OpenAI's strict mode accepts; any other `format` is dropped.
const STRICT_FORMATS: &[&str] = &[
    "date-time",
    "time",
    "date",
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uuid",
];

/// Makes a schema OpenAI-strict-compatible: `additionalProperties: false`
/// on every object, every property required, optional ones nullable.
pub fn strict_schema(schema: &Value) -> Value {
    let mut s = schema.clone();
    make_strict(&mut s);
    s
}

fn make_strict(v: &mut Value) {
    let Value::Object(m) = v else { return };
    if let Some(Value::String(f)) = m.get("format")
        && !STRICT_FORMATS.contains(&f.as_str())
    {
        m.remove("format");
    }
    let is_object =
        m.get("type").and_then(Value::as_str) == Some("object") || m.contains_key("properties");
    if is_object {
        let required: Vec<String> = m
            .get("required")
            .and_then(Value::as_array)
            .map(|r| {
                r.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        let mut all = Vec::new();
        if let Some(Value::Object(props)) = m.get_mut("properties") {
            for (name, prop) in props.iter_mut() {
                make_strict(prop);
                if !required.contains(name) {
                    make_nullable(prop);
                }
                all.push(Value::String(name.clone()));
            }
        } else {
            m.insert("properties".into(), Value::Object(Map::new()));
        }
        m.insert("required".into(), Value::Array(all));
        m.insert("additionalProperties".into(), Value::Bool(false));
    }
    for key in ["items", "not"] {
        if let Some(sub) = m.get_mut(key) {
            make_strict(sub);
        }
    }
    for key in ["anyOf", "oneOf", "allOf", "prefixItems"] {
        if let Some(Value::Array(subs)) = m.get_mut(key) {
            subs.iter_mut().for_each(make_strict);
        }
    }
}

fn make_nullable(v: &mut Value) {
    let Value::Object(m) = v else { return };
    match m.get_mut("type") {
        Some(Value::String(t)) if t != "null" => {
            let t = std::mem::take(t);
            m.insert("type".into(), json!([t, "null"]));
        }
        Some(Value::Array(ts)) => {
            if !ts.iter().any(|t| t == "null") {
                ts.push("null".into());
            }
        }
        Some(_) => {}
        None => {
            if let Some(Value::Array(any)) = m.get_mut("anyOf") {
                if !any
                    .iter()
                    .any(|s| s.get("type").and_then(Value::as_str) == Some("null"))
                {
                    any.push(json!({"type": "null"}));
                }
            } else {
                let inner = std::mem::take(m);
                m.insert(
                    "anyOf".into(),
                    json!([Value::Object(inner), {"type": "null"}]),
                );
                return;
            }
        }
    }
    if let Some(Value::Array(values)) = m.get_mut("enum")
        && !values.iter().any(Value::is_null)
    {
        values.push(Value::Null);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_parse() {
        assert_eq!("openai".parse(), Ok(Provider::OpenAi));
        assert_eq!("openai_chat".parse(), Ok(Provider::OpenAiChat));
        assert_eq!("anthropic".parse(), Ok(Provider::Anthropic));
        assert_eq!("mistral".parse(), Ok(Provider::Mistral));
        assert_eq!("mistralai".parse(), Ok(Provider::Mistral));
        assert!("OpenAI".parse::<Provider>().is_err());
        assert!("".parse::<Provider>().is_err());
    }

    fn schema() -> Value {
        json!({"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"}}, "required": ["name"]})
    }

    #[test]
    fn provider_shapes() {
        let s = schema();
        assert_eq!(
            Provider::OpenAi.tool_schema("t", "d", &s, false),
            json!({"type": "function", "name": "t", "description": "d", "parameters": s, "strict": false})
        );
        assert_eq!(
            Provider::OpenAiChat.tool_schema("t", "d", &s, false),
            json!({"type": "function", "function": {"name": "t", "description": "d", "parameters": s}})
        );
        assert_eq!(
            Provider::Anthropic.tool_schema("t", "d", &s, true),
            json!({"name": "t", "description": "d", "input_schema": s})
        );
        assert_eq!(
            Provider::Mistral.tool_schema("t", "d", &s, true),
            json!({"type": "function", "function": {"name": "t", "description": "d", "parameters": s}})
        );
    }

    #[test]
    fn strict_openai() {
        let s = schema();
        let strict = json!({"type": "object",
            "properties": {"name": {"type": "string"}, "n": {"type": ["integer", "null"]}},
            "required": ["name", "n"], "additionalProperties": false});
        assert_eq!(
            Provider::OpenAi.tool_schema("t", "d", &s, true),
            json!({"type": "function", "name": "t", "description": "d", "parameters": strict, "strict": true})
        );
        assert_eq!(
            Provider::OpenAiChat.tool_schema("t", "d", &s, true),
            json!({"type": "function", "function": {"name": "t", "description": "d", "parameters": strict, "strict": true}})
        );
    }

    #[test]
    fn strict_nested_and_untyped() {
        let s = json!({"type": "object", "properties": {
            "inner": {"type": "object", "properties": {"x": {"type": "integer", "format": "int64"}}},
            "any": {"description": "anything"},
            "list": {"type": "array", "items": {"type": "object", "properties": {"y": {"type": "string", "format": "email"}}, "required": ["y"]}}
        }, "required": []});
        let out = strict_schema(&s);
        assert_eq!(out["additionalProperties"], json!(false));
        assert_eq!(out["required"], json!(["inner", "any", "list"]));
        assert_eq!(
            out["properties"]["inner"]["type"],
            json!(["object", "null"])
        );
        assert_eq!(
            out["properties"]["inner"]["additionalProperties"],
            json!(false)
        );
        assert_eq!(
            out["properties"]["inner"]["properties"]["x"],
            json!({"type": ["integer", "null"]})
        );
        assert_eq!(
            out["properties"]["any"],
            json!({"anyOf": [{"description": "anything"}, {"type": "null"}]})
        );
        let item = &out["properties"]["list"]["items"];
        assert_eq!(item["additionalProperties"], json!(false));
        assert_eq!(
            item["properties"]["y"],
            json!({"type": "string", "format": "email"})
        );
    }

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[allow(dead_code)]
    /// Adds two numbers.
    pub(super) struct AddPub {
        a: i64,
        b: i64,
        note: Option<Inner>,
    }

    #[derive(serde::Deserialize, schemars::JsonSchema)]
    #[allow(dead_code)]
    pub(super) struct Inner {
        text: String,
    }

    #[test]
    fn typed_schema_is_inlined_and_flat() {
        let t = typed_schema::<AddPub>().expect("schema");
        assert_eq!(t.params, ["a", "b", "note"]);
        assert_eq!(t.required, ["a", "b"]);
        let s = t.schema.as_object().expect("object");
        assert_eq!(s["type"], "object");
        assert!(!s.contains_key("$schema") && !s.contains_key("$defs") && !s.contains_key("title"));
        assert_eq!(s["description"], "Adds two numbers.");
        let text = serde_json::to_string(&t.schema).expect("json");
        assert!(!text.contains("$ref"), "{text}");
        assert_eq!(s["properties"]["note"]["type"], json!(["object", "null"]));
        assert_eq!(
            s["properties"]["note"]["properties"]["text"]["type"],
            "string"
        );
    }

    #[test]
    fn typed_schema_refuses_non_objects() {
        assert!(matches!(
            typed_schema::<i64>(),
            Err(RegisterError::TypedArgsNotObject(_))
        ));
        assert!(matches!(
            typed_schema::<Vec<String>>(),
            Err(RegisterError::TypedArgsNotObject(_))
        ));
    }

    #[test]
    fn untyped_schema_defaults_to_strings() {
        let t = Tool::new("t")
            .params(["a", "b"])
            .required_params(["a"])
            .param_schema("b", json!({"type": "integer"}));
        assert_eq!(
            untyped_schema(&t),
            json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]})
        );
    }
}
