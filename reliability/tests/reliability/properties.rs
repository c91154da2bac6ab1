//! Property tests: parameter validation (random tools, random params — the
//! engine's answer is exactly what docs/PROTOCOL.md §3 predicts) and the provider
//! round trips (random tool calls → each provider's API shape →
//! `parse_tool_calls` → `result_messages`: ids, order and shapes kept).

use std::collections::BTreeSet;

use atp_registry::{
    Call, Engine, Provider, Registry, Tool, ToolKitClient,
    http::RequestHead,
    llm::{CallFormat, CallOutcome, parse_tool_calls, result_messages},
    schemars,
};
use atp_reliability::fuzz::block_on;
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const POOL: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
const STRANGERS: [&str; 3] = ["x", "zz", "auth"];

fn small_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        "[a-z ]{0,8}".prop_map(Value::from),
        any::<bool>().prop_map(Value::from),
        Just(json!([1, "two", null])),
        Just(json!({"k": {"n": 1}})),
    ]
}

/// A tool spec: params, the required ones, and whether it needs a token.
#[derive(Debug, Clone)]
struct Spec {
    params: Vec<&'static str>,
    required: Vec<&'static str>,
    auth: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        proptest::sample::subsequence(POOL.to_vec(), 0..=POOL.len()),
        any::<bool>(),
    )
        .prop_flat_map(|(params, auth)| {
            let n = params.len();
            (
                Just(params.clone()),
                proptest::sample::subsequence(params, 0..=n),
                Just(auth),
            )
        })
        .prop_map(|(params, required, auth)| Spec {
            params,
            required,
            auth,
        })
}

fn body() -> impl Strategy<Value = Map<String, Value>> {
    let keys: Vec<&'static str> = POOL.iter().chain(STRANGERS.iter()).copied().collect();
    proptest::collection::btree_map(proptest::sample::select(keys), small_value(), 0..8)
        .prop_map(|m| m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
}

#[derive(Debug, Clone)]
enum Token {
    None,
    Header(String),
    Body(String),
    Empty,
}

fn token() -> impl Strategy<Value = Token> {
    prop_oneof![
        Just(Token::None),
        "[A-Za-z0-9]{1,12}".prop_map(Token::Header),
        "[A-Za-z0-9]{1,12}".prop_map(Token::Body),
        Just(Token::Empty),
    ]
}

fn engine_for(spec: &Spec) -> Engine {
    let client = ToolKitClient::new("k", "App");
    let mut tool = Tool::new("t")
        .params(spec.params.clone())
        .required_params(spec.required.clone());
    if spec.auth {
        tool = tool.auth_provider("p").auth_type("OAuth2");
    }
    client
        .register_tool(tool, |call: Call| async move {
            Ok::<_, String>(Value::Object(call.params().clone()))
        })
        .expect("a valid tool");
    let registry = Registry::new();
    registry
        .register_client("kit", client)
        .expect("a valid toolkit");
    Engine::with_registry(registry)
}

fn post(
    engine: &Engine,
    content_type: &str,
    body: &[u8],
    authorization: Option<&str>,
) -> (u16, Value) {
    let head = RequestHead::new("POST", "/atp/kit/t/", None, |name| match name {
        "content-type" => Some(content_type.as_bytes()),
        "authorization" => authorization.map(str::as_bytes),
        _ => None,
    });
    let r = block_on(engine.handle(&head, body));
    (
        r.status(),
        serde_json::from_slice(r.body()).expect("a JSON body"),
    )
}

/// What §3 predicts: the auth check, then missing (absent or null), then
/// unknown params; else the tool runs and echoes its params.
fn predict(
    spec: &Spec,
    params: &Map<String, Value>,
    has_token: bool,
) -> (u16, Option<&'static str>, Vec<String>) {
    if spec.auth && !has_token {
        return (401, Some("auth_required"), vec![]);
    }
    let missing: Vec<String> = spec
        .required
        .iter()
        .filter(|r| params.get(**r).is_none_or(Value::is_null))
        .map(|r| r.to_string())
        .collect();
    let unknown: Vec<String> = params
        .keys()
        .filter(|k| !spec.params.contains(&k.as_str()))
        .cloned()
        .collect();
    if !missing.is_empty() {
        let mut named = missing;
        named.extend(unknown);
        return (400, Some("missing_params"), named);
    }
    if !unknown.is_empty() {
        return (400, Some("unknown_params"), unknown);
    }
    (200, None, vec![])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn json_params_answer_as_the_rules_predict(spec in spec(), params in body(), token in token()) {
        let engine = engine_for(&spec);
        let mut sent = params.clone();
        let mut authorization = None;
        let has_token = match &token {
            Token::None => false,
            Token::Header(t) => { authorization = Some(format!("Bearer {t}")); true }
            Token::Body(t) => { sent.insert("auth_token".into(), json!(t)); true }
            Token::Empty => { sent.insert("auth_token".into(), json!("")); false }
        };
        let (status, body) = post(&engine, "application/json", Value::Object(sent).to_string().as_bytes(), authorization.as_deref());
        let (want, code, named) = predict(&spec, &params, has_token);
        prop_assert_eq!(status, want, "{}", body);
        match code {
            Some(code) => {
                prop_assert_eq!(body["code"].as_str(), Some(code), "{}", body);
                let message = body["error"].as_str().unwrap_or_default();
                for name in &named {
                    prop_assert!(message.contains(name.as_str()), "{} is not named in {}", name, message);
                }
            }
            None => prop_assert_eq!(&body["result"], &Value::Object(params.clone())),
        }
    }

    #[test]
    fn form_params_answer_as_the_rules_predict(
        spec in spec(),
        params in proptest::collection::btree_map(proptest::sample::select(POOL.iter().chain(STRANGERS.iter()).copied().collect::<Vec<_>>()), "[a-z0-9 ]{0,6}", 0..8),
    ) {
        let spec = Spec { auth: false, ..spec };
        let engine = engine_for(&spec);
        let form: String = params
            .iter()
            .map(|(k, v)| format!("{k}={}", v.replace(' ', "+")))
            .collect::<Vec<_>>()
            .join("&");
        let as_json: Map<String, Value> = params.iter().map(|(k, v)| (k.to_string(), json!(v))).collect();
        let (status, body) = post(&engine, "application/x-www-form-urlencoded", form.as_bytes(), None);
        let (want, code, _) = predict(&spec, &as_json, false);
        prop_assert_eq!(status, want, "{}", body);
        prop_assert_eq!(body["code"].as_str(), code, "{}", body);
        if code.is_none() {
            prop_assert_eq!(&body["result"], &Value::Object(as_json));
        }
    }

    #[test]
    fn typed_params_answer_as_the_rules_predict(
        a in typed_value(), b in typed_value(), extra in proptest::option::of(small_value()),
    ) {
        let mut params = Map::new();
        if let Some(a) = &a { params.insert("a".into(), a.clone()); }
        if let Some(b) = &b { params.insert("b".into(), b.clone()); }
        if let Some(x) = &extra { params.insert("x".into(), x.clone()); }
        let (status, body) = post(typed_engine(), "application/json", Value::Object(params).to_string().as_bytes(), None);
        let present = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        let as_i64 = |v: &Option<Value>| v.as_ref().and_then(Value::as_i64);
        let (want, code) = if !present(&a) || !present(&b) {
            (400, Some("missing_params"))
        } else if extra.is_some() {
            (400, Some("unknown_params"))
        } else {
            match (as_i64(&a), as_i64(&b)) {
                (Some(x), Some(y)) => match x.checked_add(y) {
                    Some(_) => (200, None),
                    None => (400, Some("tool_error")),
                },
                _ => (400, Some("invalid_params")),
            }
        };
        prop_assert_eq!(status, want, "{}", body);
        prop_assert_eq!(body["code"].as_str(), code, "{}", body);
        if want == 200 {
            let sum = as_i64(&a).unwrap_or_default() + as_i64(&b).unwrap_or_default();
            prop_assert_eq!(&body["result"], &json!({"sum": sum}));
        }
    }
}

fn typed_value() -> impl Strategy<Value = Option<Value>> {
    proptest::option::weighted(
        0.9,
        prop_oneof![
            4 => any::<i64>().prop_map(Value::from),
            1 => any::<u64>().prop_map(Value::from),
            1 => Just(json!(1e30)),
            1 => Just(json!(1.5)),
            1 => Just(json!("12")),
            1 => Just(Value::Null),
            1 => Just(json!([1])),
        ],
    )
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
#[allow(dead_code)]
struct AddArgs {
    a: i64,
    b: i64,
}

fn typed_engine() -> &'static Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| {
        let client = ToolKitClient::new("k", "App");
        client
            .register_typed_tool(Tool::new("t"), |args: AddArgs, _token| async move {
                args.a
                    .checked_add(args.b)
                    .map(|sum| json!({"sum": sum}))
                    .ok_or_else(|| "overflow".to_owned())
            })
            .expect("a valid tool");
        let registry = Registry::new();
        registry
            .register_client("kit", client)
            .expect("a valid toolkit");
        Engine::with_registry(registry)
    })
}

/// A tool call as a model makes it.
#[derive(Debug, Clone)]
struct ModelCall {
    id: String,
    name: String,
    args: Map<String, Value>,
}

fn model_calls(id: &'static str) -> impl Strategy<Value = Vec<ModelCall>> {
    proptest::collection::vec(
        (
            id,
            "[A-Za-z0-9_-]{1,64}",
            proptest::collection::btree_map("[a-z_]{1,8}", small_value(), 0..4),
        )
            .prop_map(|(id, name, args)| ModelCall {
                id,
                name,
                args: args.into_iter().collect(),
            }),
        1..6,
    )
    .prop_filter("distinct ids", |calls| {
        calls.iter().map(|c| &c.id).collect::<BTreeSet<_>>().len() == calls.len()
    })
}

fn calls_and_results(
    id: &'static str,
) -> impl Strategy<Value = (Vec<ModelCall>, Vec<Result<Value, String>>)> {
    model_calls(id).prop_flat_map(|calls| {
        let n = calls.len();
        (Just(calls), outcomes(n))
    })
}

fn outcomes(n: usize) -> impl Strategy<Value = Vec<Result<Value, String>>> {
    proptest::collection::vec(
        prop_oneof![small_value().prop_map(Ok), "[a-z ]{1,20}".prop_map(Err)],
        n,
    )
}

/// The provider's API response holding `calls`, with other items around
/// them, and where in it the parser may be pointed.
fn provider_response(format: CallFormat, calls: &[ModelCall]) -> Vec<Value> {
    let args_text = |c: &ModelCall| Value::Object(c.args.clone()).to_string();
    match format {
        CallFormat::OpenAiResponses => {
            let mut output = vec![json!({"type": "reasoning", "id": "rs_1", "summary": []})];
            for c in calls {
                output.push(json!({"type": "function_call", "id": format!("fc_{}", c.id), "call_id": c.id,
                                   "name": c.name, "arguments": args_text(c), "status": "completed"}));
            }
            output.push(json!({"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}));
            let whole = json!({"id": "resp_1", "object": "response", "output": output});
            vec![whole.clone(), whole["output"].clone()]
        }
        CallFormat::OpenAiChat | CallFormat::Mistral => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": args_text(c)}}))
                .collect();
            let message = json!({"role": "assistant", "content": null, "tool_calls": tool_calls});
            let whole = json!({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls"}]});
            vec![whole, message, Value::Array(tool_calls)]
        }
        CallFormat::Anthropic => {
            let mut content = vec![json!({"type": "text", "text": "Let me look."})];
            for c in calls {
                content
                    .push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.args}));
            }
            let whole = json!({"id": "msg_1", "type": "message", "role": "assistant", "content": content, "stop_reason": "tool_use"});
            vec![whole.clone(), whole["content"].clone()]
        }
    }
}

fn round_trip(
    provider: Provider,
    format: CallFormat,
    calls: &[ModelCall],
    results: &[Result<Value, String>],
) -> Result<(), TestCaseError> {
    for raw in provider_response(format, calls) {
        let parsed = parse_tool_calls(provider, &raw);
        prop_assert_eq!(parsed.len(), calls.len(), "{}", raw);
        for (p, c) in parsed.iter().zip(calls) {
            prop_assert_eq!(&p.id, &c.id);
            prop_assert_eq!(&p.name, &c.name);
            prop_assert_eq!(p.arguments.as_ref().ok(), Some(&c.args));
            prop_assert_eq!(p.format, format);
        }
        let outs: Vec<CallOutcome> = results
            .iter()
            .map(|r| match r {
                Ok(v) => CallOutcome::ok(v),
                Err(e) => CallOutcome::error(e.clone()),
            })
            .collect();
        let messages = result_messages(&parsed, &outs);
        let text = |r: &Result<Value, String>| match r {
            Ok(v) => v.to_string(),
            Err(e) => e.clone(),
        };
        if format == CallFormat::Anthropic {
            prop_assert_eq!(messages.len(), 1);
            let m = messages[0].as_object().expect("an object");
            prop_assert_eq!(m.len(), 2);
            prop_assert_eq!(&m["role"], "user");
            let blocks = m["content"].as_array().expect("blocks");
            prop_assert_eq!(blocks.len(), calls.len());
            for ((b, c), r) in blocks.iter().zip(calls).zip(results) {
                let mut want =
                    json!({"type": "tool_result", "tool_use_id": c.id, "content": text(r)});
                if r.is_err() {
                    want["is_error"] = json!(true);
                }
                prop_assert_eq!(b, &want);
            }
        } else {
            prop_assert_eq!(messages.len(), calls.len());
            for ((m, c), r) in messages.iter().zip(calls).zip(results) {
                let want = match format {
                    CallFormat::OpenAiResponses => {
                        json!({"type": "function_call_output", "call_id": c.id, "output": text(r)})
                    }
                    CallFormat::OpenAiChat => {
                        json!({"role": "tool", "tool_call_id": c.id, "content": text(r)})
                    }
                    _ => {
                        json!({"role": "tool", "name": c.name, "content": text(r), "tool_call_id": c.id})
                    }
                };
                prop_assert_eq!(m, &want);
            }
        }
        // An ok output is the result as JSON text.
        for (o, r) in outs.iter().zip(results) {
            if let Ok(v) = r {
                prop_assert_eq!(
                    &serde_json::from_str::<Value>(&o.content).expect("JSON text"),
                    v
                );
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn openai_responses_round_trip((calls, results) in calls_and_results("call_[A-Za-z0-9]{1,20}")) {
        round_trip(Provider::OpenAi, CallFormat::OpenAiResponses, &calls, &results)?;
    }

    #[test]
    fn openai_chat_round_trip((calls, results) in calls_and_results("call_[A-Za-z0-9]{1,20}")) {
        round_trip(Provider::OpenAiChat, CallFormat::OpenAiChat, &calls, &results)?;
    }

    #[test]
    fn anthropic_round_trip((calls, results) in calls_and_results("toolu_[A-Za-z0-9]{1,20}")) {
        round_trip(Provider::Anthropic, CallFormat::Anthropic, &calls, &results)?;
    }

    #[test]
    fn mistral_round_trip((calls, results) in calls_and_results("[A-Za-z0-9]{9}")) {
        round_trip(Provider::Mistral, CallFormat::Mistral, &calls, &results)?;
    }

    /// Calls without ids get invented ones: Mistral's are 9 characters of
    /// `[A-Za-z0-9]`, all distinct within a turn.
    #[test]
    fn invented_ids_follow_the_rules(n in 1usize..8) {
        let calls: Vec<Value> = (0..n).map(|i| json!({"type": "function", "function": {"name": format!("t{i}"), "arguments": "{}"}})).collect();
        for provider in [Provider::Mistral, Provider::OpenAiChat] {
            let parsed = parse_tool_calls(provider, &Value::Array(calls.clone()));
            prop_assert_eq!(parsed.len(), n);
            let ids: BTreeSet<&str> = parsed.iter().map(|c| c.id.as_str()).collect();
            prop_assert_eq!(ids.len(), n, "{:?}", parsed);
            for c in &parsed {
                let core = if provider == Provider::Mistral { c.id.as_str() } else { c.id.strip_prefix("call_").unwrap_or("") };
                prop_assert!(core.len() == 9 && core.bytes().all(|b| b.is_ascii_alphanumeric()), "{}", c.id);
            }
        }
    }

    /// `task_outcome` reads a result from each shape a server answers in.
    #[test]
    fn task_outcomes_read_every_shape(v in small_value(), message in "[a-z ]{1,20}") {
        let task_outcome = |answer: &Value| {
            let answer = atp_registry::wire::ServerToLlm::parse(&answer.to_string()).expect("a message");
            atp_registry::llm::task_outcome(&answer)
        };
        let error_object = v.as_object().is_some_and(|o| o.len() == 1 && o.get("error").is_some_and(Value::is_string));
        prop_assume!(!error_object);
        for answer in [
            json!({"type": "task_response", "request_id": "r", "payload": {"result": v}}),
            json!({"type": "task_response", "request_id": "r", "result": {"tool": {"result": v}}}),
            json!({"type": "task_response", "request_id": "r", "result": v}),
        ] {
            // A bare `result` that itself has a `tool.result` is read there.
            if answer.get("payload").is_none() && v.get("tool").is_some() { continue; }
            prop_assert_eq!(task_outcome(&answer), CallOutcome::ok(&v));
        }
        prop_assert_eq!(task_outcome(&json!({"status": "error", "message": message})), CallOutcome::error(message.clone()));
        prop_assert_eq!(task_outcome(&json!({"type": "task_response", "payload": {"result": {"error": message}}})), CallOutcome::error(message.clone()));
    }

    /// Provider schemas of random tools: an object schema, `required` a
    /// subset of `properties`; strict mode requires every property and
    /// closes every object.
    #[test]
    fn provider_schemas_are_well_formed(spec in spec(), strict in any::<bool>()) {
        let engine = engine_for(&spec);
        let client = engine.registry().get_client("kit").expect("the toolkit");
        for provider in [Provider::OpenAi, Provider::OpenAiChat, Provider::Anthropic, Provider::Mistral] {
            let tools = client.tool_schemas(provider, strict);
            prop_assert_eq!(tools.len(), 1);
            let t = &tools[0];
            let schema = match provider {
                Provider::OpenAi => &t["parameters"],
                Provider::Anthropic => &t["input_schema"],
                _ => &t["function"]["parameters"],
            };
            prop_assert_eq!(&schema["type"], "object", "{}", t);
            let props = schema["properties"].as_object().expect("properties");
            let required: Vec<&str> = schema["required"].as_array().expect("required").iter().filter_map(Value::as_str).collect();
            prop_assert_eq!(props.keys().map(String::as_str).collect::<Vec<_>>(), spec.params.clone());
            prop_assert!(required.iter().all(|r| props.contains_key(*r)));
            prop_assert!(schema.get("$schema").is_none() && schema.get("anyOf").is_none());
            let strict_format = strict && matches!(provider, Provider::OpenAi | Provider::OpenAiChat);
            if strict_format {
                prop_assert_eq!(required.len(), props.len(), "{}", t);
                prop_assert_eq!(&schema["additionalProperties"], &json!(false));
            } else {
                prop_assert_eq!(required, spec.required.clone(), "{}", t);
            }
            if provider == Provider::OpenAi {
                prop_assert_eq!(&t["strict"], &json!(strict));
            }
        }
    }
}

const KITS: [&str; 3] = ["alpha", "beta.v2", "Gamma-3"];

/// Three toolkits, each with `who` (answers its own app name) and a tool
/// only it has.
fn kits_engine() -> &'static Engine {
    static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
    ENGINE.get_or_init(|| {
        let registry = Registry::new();
        for kit in KITS {
            let app = format!("app of {kit}");
            let client = ToolKitClient::new("k", app.clone());
            let only = format!("only_{}", kit.replace(['.', '-'], "_"));
            for tool in ["who".to_owned(), only] {
                let app = app.clone();
                client
                    .register_tool(Tool::new(tool), move |_call: Call| {
                        let app = app.clone();
                        async move { Ok::<_, String>(json!(app)) }
                    })
                    .expect("a valid tool");
            }
            registry
                .register_client(kit, client)
                .expect("a valid toolkit");
        }
        Engine::with_registry(registry)
    })
}

/// Percent-encodes the byte at `at` (if any) of a path segment.
fn encode_one(segment: &str, at: Option<usize>) -> String {
    match at {
        Some(i) if i < segment.len() => {
            let (a, b) = segment.split_at(i);
            let mut chars = b.chars();
            let c = chars.next().expect("a char");
            format!("{a}%{:02X}{}", c as u32, chars.as_str())
        }
        _ => segment.to_owned(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// docs/PROTOCOL.md §1: one toolkit's request never reaches another toolkit's
    /// tool, however its path is spelled.
    #[test]
    fn a_request_reaches_only_its_own_toolkit(
        kit in 0..KITS.len(),
        tool in proptest::sample::select(vec!["who", "only_alpha", "only_beta_v2", "only_Gamma_3"]),
        kit_pct in proptest::option::of(0usize..8),
        tool_pct in proptest::option::of(0usize..12),
        slash in any::<bool>(),
        post in any::<bool>(),
    ) {
        let name = KITS[kit];
        let path = format!(
            "/atp/{}/{}{}",
            encode_one(name, kit_pct),
            encode_one(tool, tool_pct),
            if slash { "/" } else { "" }
        );
        let head = RequestHead::new(if post { "POST" } else { "GET" }, &path, None, |_| None);
        let r = block_on(kits_engine().handle(&head, b""));
        let body: Value = serde_json::from_slice(r.body()).expect("JSON");
        let own = tool == "who" || tool == format!("only_{}", name.replace(['.', '-'], "_"));
        if !own {
            prop_assert_eq!((r.status(), body["code"].as_str()), (404, Some("tool_not_found")), "{}", path);
        } else if post {
            prop_assert_eq!(r.status(), 200, "{}: {}", path, body);
            prop_assert_eq!(&body["result"], &json!(format!("app of {name}")), "{}", path);
        } else {
            prop_assert_eq!(r.status(), 200, "{}: {}", path, body);
            prop_assert_eq!(&body["function"], &json!(tool), "{}", path);
        }
        for other in KITS.iter().filter(|k| **k != name) {
            prop_assert!(!body.to_string().contains(&format!("app of {other}")), "{}: {}", path, body);
        }
    }
}

fn name_like() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "[A-Za-z0-9_-]{1,64}",
        1 => "[A-Za-z0-9_-]{65,70}",
        1 => "[A-Za-z0-9_. /%é-]{0,10}",
        1 => Just(String::new()),
    ]
}

fn valid_tool_name(n: &str) -> bool {
    (1..=64).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// docs/PROTOCOL.md §2: a registration is accepted exactly when its name, params
    /// and required params follow the rules — never a panic — and an
    /// accepted tool is served as registered; the same name twice is refused.
    #[test]
    fn registration_follows_the_rules(
        name in name_like(),
        params in proptest::collection::vec(prop_oneof![4 => "[a-z]{1,3}", 1 => Just("auth_token".to_owned()), 1 => Just(String::new())], 0..5),
        required in proptest::collection::vec("[a-z]{1,3}", 0..4),
    ) {
        let client = ToolKitClient::new("k", "App");
        let tool = Tool::new(name.clone()).params(params.clone()).required_params(required.clone());
        let outcome = client.register_tool(tool, |call: Call| async move {
            Ok::<_, String>(Value::Object(call.params().clone()))
        });
        let unique = |v: &[String]| v.iter().collect::<BTreeSet<_>>().len() == v.len();
        let valid = valid_tool_name(&name)
            && !params.iter().any(|p| p.is_empty() || p == "auth_token")
            && unique(&params)
            && unique(&required)
            && required.iter().all(|r| params.contains(r));
        prop_assert_eq!(outcome.is_ok(), valid, "{:?}", outcome);
        if valid {
            let again = client.register_tool(Tool::new(name.clone()), |_call: Call| async { Ok::<_, String>(json!(1)) });
            prop_assert!(matches!(again, Err(atp_registry::RegisterError::DuplicateTool(_))));
            let registry = Registry::new();
            registry.register_client("kit", client).expect("a valid toolkit");
            let engine = Engine::with_registry(registry);
            let path = format!("/atp/kit/{name}/");
            let head = RequestHead::new("GET", &path, None, |_| None);
            let r = block_on(engine.handle(&head, b""));
            let context: Value = serde_json::from_slice(r.body()).expect("JSON");
            prop_assert_eq!(r.status(), 200);
            prop_assert_eq!(&context["params"], &json!(params));
            prop_assert_eq!(&context["required_params"], &json!(required));
            let args: Map<String, Value> = required.iter().map(|r| (r.clone(), json!("v"))).collect();
            let (status, body) = {
                let head = RequestHead::new("POST", &path, None, |n| (n == "content-type").then_some(&b"application/json"[..]));
                let r = block_on(engine.handle(&head, Value::Object(args.clone()).to_string().as_bytes()));
                (r.status(), serde_json::from_slice::<Value>(r.body()).expect("JSON"))
            };
            prop_assert_eq!(status, 200, "{}", body);
            prop_assert_eq!(&body["result"], &Value::Object(args));
        }
    }

    /// Toolkit names: accepted exactly when 1–128 characters of
    /// `A-Z a-z 0-9 _ - .`, and then found under their (percent-encoded)
    /// name.
    #[test]
    fn toolkit_names_follow_the_rules(name in prop_oneof![3 => "[A-Za-z0-9_.-]{1,128}", 1 => "[A-Za-z0-9_.-]{129,131}", 1 => "[A-Za-z0-9 /%é]{0,8}"]) {
        let registry = Registry::new();
        let outcome = registry.register_client(&name, ToolKitClient::new("k", "App"));
        let valid = (1..=128).contains(&name.len())
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        prop_assert_eq!(outcome.is_ok(), valid, "{:?}", outcome);
        if valid {
            let encoded: String = name.bytes().map(|b| format!("%{b:02X}")).collect();
            for segment in [name.clone(), encoded] {
                let path = format!("/atp/{segment}/");
                let head = RequestHead::new("GET", &path, None, |_| None);
                let r = block_on(Engine::with_registry(registry.clone()).handle(&head, b""));
                prop_assert_eq!(r.status(), 200, "{}", path);
            }
        }
    }
}
