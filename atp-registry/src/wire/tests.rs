use proptest::prelude::*;
use serde_json::{Value, json};

use super::*;
use crate::Secret;

/// Frames as the published Python SDK (`AgentToolProtocol` 0.2.5) writes
/// them, byte for byte (`json.dumps` separators).
mod python {
    pub const TOOL_RESPONSE: &str =
        r#"{"type": "tool_response", "request_id": "9f1c", "result": {"message": "Hello, Ada!"}}"#;
    pub const TOOL_ERROR: &str =
        r#"{"type": "tool_response", "request_id": "9f1c", "result": {"error": "boom"}}"#;
    pub const APP_RESPONSE: &str =
        r#"{"type": "app_response", "request_id": "s1", "result": {"type": "form", "fields": []}}"#;
    pub const INBOX_REPLY: &str = r#"{"request_id": "9f1c", "response": {"sum": 3}}"#;
    pub const AUTH: &str = r#"{"type": "auth", "api_key": "llm-key"}"#;
    pub const CONTEXT: &str = r#"{"type": "get_toolkit_context", "toolkit_id": "demo", "request_id": "ctx-1", "provider": "openai", "user_prompt": "hi"}"#;
    pub const TASK: &str = r#"{"type": "task_request", "toolkit_id": "demo", "request_id": "t-1", "payload": {"function": "add", "parameters": "{\"a\": 1, \"b\": 2}", "auth_token": null, "tool_call_id": "call_1"}, "provider": "openai", "user_prompt": "add"}"#;
    pub const REGISTER: &str = r#"{"function_id": "hello_world", "api_key": "tk", "app_name": "demo", "programming_language": "Python", "code_hash": "abc", "toolkit_hash": "def", "metadata": {"params": ["name"], "required_params": ["name"], "description": "Greets.", "auth_provider": null, "auth_type": null, "auth_with": null, "sample_response": {"message": "sample_value"}, "source_code": "def hello_world(name): ..."}}"#;
    pub const EXECUTE: &str =
        r#"{"exchange_token": "xt", "result": {"message": "Hello"}, "function_id": "hello_world"}"#;
}

#[test]
fn python_toolkit_frames() {
    let ToolkitToServer::ToolResponse(r) = ToolkitToServer::parse(python::TOOL_RESPONSE).unwrap()
    else {
        panic!()
    };
    assert_eq!(r.is_error, None);
    assert_eq!(r.clone().outcome(), Ok(json!({"message": "Hello, Ada!"})));
    let ToolkitToServer::ToolResponse(r) = ToolkitToServer::parse(python::TOOL_ERROR).unwrap()
    else {
        panic!()
    };
    assert_eq!(r.outcome(), Err((None, "boom".into())));
    let ToolkitToServer::AppResponse(a) = ToolkitToServer::parse(python::APP_RESPONSE).unwrap()
    else {
        panic!()
    };
    assert_eq!(a.request_id, RequestId::from("s1"));
    let reply: InboxReply = serde_json::from_str(python::INBOX_REPLY).unwrap();
    assert_eq!(reply.outcome(), Ok(json!({"sum": 3})));
}

#[test]
fn python_llm_frames() {
    assert_eq!(
        LlmToServer::parse(python::AUTH).unwrap(),
        LlmToServer::Auth {
            api_key: Some(Secret::new("llm-key"))
        }
    );
    let LlmToServer::GetToolkitContext(c) = LlmToServer::parse(python::CONTEXT).unwrap() else {
        panic!()
    };
    assert_eq!((c.toolkit_id.as_str(), c.strict), ("demo", false));
    let LlmToServer::TaskRequest(t) = LlmToServer::parse(python::TASK).unwrap() else {
        panic!()
    };
    assert_eq!(t.payload.arguments().unwrap()["b"], json!(2));
    assert!(t.auth_token().is_none());
}

#[test]
fn python_http_bodies() {
    let r: RegisterTool = serde_json::from_str(python::REGISTER).unwrap();
    assert_eq!(r.function_id.as_deref(), Some("hello_world"));
    assert_eq!(r.metadata.required_params, ["name"]);
    assert_eq!(r.metadata.input_schema, None);
    assert_eq!(r.endpoint_url, None);
    let e: ExecutionReport = serde_json::from_str(python::EXECUTE).unwrap();
    assert_eq!(e.exchange_token, Some(Secret::new("xt")));
}

#[test]
fn the_error_flag_wins_over_the_legacy_rule() {
    // A Rust toolkit may return {"error": …} as data.
    let data = ToolResponse::ok(Some("r".into()), json!({"error": "not a failure"}));
    let parsed = match ToolkitToServer::parse(&ToolkitToServer::ToolResponse(data).to_json()) {
        Ok(ToolkitToServer::ToolResponse(r)) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(parsed.outcome(), Ok(json!({"error": "not a failure"})));
    let failure = ToolResponse::error(Some("r".into()), "missing_params", "Missing: a");
    assert_eq!(
        failure.outcome(),
        Err((Some("missing_params".into()), "Missing: a".into()))
    );
}

#[test]
fn task_responses_are_read_in_every_shape() {
    let ok = TaskResponse::ok(
        Some("t".into()),
        Some("f".into()),
        json!("c"),
        json!({"error": "data"}),
    );
    assert_eq!(ok.outcome(), TaskOutcome::Ok(json!({"error": "data"})));
    let v: Value = serde_json::to_value(&ok).unwrap();
    assert_eq!(v["result"]["tool"]["result"], json!({"error": "data"}));
    let failed = TaskResponse::failed(None, None, Value::Null, "tool_error", "boom");
    assert_eq!(
        failed.outcome(),
        TaskOutcome::Failed {
            code: Some("tool_error".into()),
            message: "boom".into()
        }
    );
    // The Python server's shapes.
    for (text, want) in [
        (
            r#"{"type": "task_response", "request_id": "x", "result": {"tool": {"name": "f", "result": 3}}}"#,
            TaskOutcome::Ok(json!(3)),
        ),
        (
            r#"{"type": "task_response", "request_id": "x", "status": "error", "message": "nope"}"#,
            TaskOutcome::Failed {
                code: None,
                message: "nope".into(),
            },
        ),
        (
            r#"{"type": "task_response", "request_id": "x", "payload": {"result": {"error": "legacy"}}}"#,
            TaskOutcome::Failed {
                code: None,
                message: "legacy".into(),
            },
        ),
    ] {
        let ServerToLlm::TaskResponse(t) = ServerToLlm::parse(text).unwrap() else {
            panic!("{text}")
        };
        assert_eq!(t.outcome(), want, "{text}");
    }
}

#[test]
fn malformed_requests_keep_their_id() {
    for (text, id) in [
        (
            r#"{"message_type": "atp_tool_request", "payload": {"request_id": "r", "params": {}}}"#,
            Some(RequestId::from("r")),
        ),
        (
            r#"{"message_type": "atp_tool_request", "payload": {"request_id": 7, "tool_name": "t", "params": [1]}}"#,
            Some(RequestId::Num(7.into())),
        ),
        (
            r#"{"message_type": "atp_tool_request", "payload": {"request_id": "r", "tool_name": "t", "auth_token": 5}}"#,
            Some(RequestId::from("r")),
        ),
        (
            r#"{"message_type": "atp_tool_request", "payload": {"tool_name": "t"}}"#,
            None,
        ),
        (
            r#"{"message_type": "atp_tool_request", "payload": 3}"#,
            None,
        ),
    ] {
        let err = ServerToToolkit::parse(text).unwrap_err();
        assert_eq!(err.kind(), Some("atp_tool_request"), "{text}");
        assert_eq!(err.request_id(), id.as_ref(), "{text}");
    }
    assert_eq!(ServerToToolkit::parse("[1]"), Err(WireError::NotAnObject));
    assert_eq!(ServerToToolkit::parse("{}"), Err(WireError::NoType));
    assert_eq!(
        ServerToToolkit::parse(r#"{"message_type": "nope"}"#),
        Err(WireError::UnknownType {
            kind: "nope".into(),
            request_id: None
        })
    );
}

#[test]
fn inbox_entries_are_bare_requests() {
    let ServerToToolkit::ToolRequest(r) = ServerToToolkit::parse(
        r#"{"request_id": "r", "tool_name": "echo", "params": null, "auth_token": "", "extra": 1}"#,
    )
    .unwrap() else {
        panic!()
    };
    assert!(r.params.is_empty() && r.auth_token.is_none());
}

#[test]
fn debug_hides_tokens() {
    let r =
        ServerToToolkit::parse(r#"{"request_id": "r", "tool_name": "t", "auth_token": "hunter2"}"#)
            .unwrap();
    assert!(!format!("{r:?}").contains("hunter2"));
    let a = LlmToServer::parse(r#"{"type": "auth", "api_key": "hunter2"}"#).unwrap();
    assert!(!format!("{a:?}").contains("hunter2"));
}

fn id() -> impl Strategy<Value = RequestId> {
    prop_oneof![
        "[a-zA-Z0-9_-]{1,12}".prop_map(RequestId::Str),
        any::<i64>().prop_map(|n| RequestId::Num(n.into())),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i32>().prop_map(|n| json!(n)),
        ".{0,8}".prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z]{1,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn params() -> impl Strategy<Value = serde_json::Map<String, Value>> {
    prop::collection::btree_map("[a-z_]{1,8}", json_value(), 0..4)
        .prop_map(|m| m.into_iter().collect())
}

fn token() -> impl Strategy<Value = Option<Secret>> {
    prop::option::of("[a-zA-Z0-9]{1,10}".prop_map(Secret::new))
}

/// An optional trace context: a `traceparent` and maybe a `tracestate`.
fn trace() -> impl Strategy<Value = (Option<String>, Option<String>)> {
    prop::option::of((
        "00-[0-9a-f]{32}-[0-9a-f]{16}-0[01]",
        prop::option::of("[a-z]{1,4}=[a-z0-9]{1,8}"),
    ))
    .prop_map(|t| match t {
        Some((parent, state)) => (Some(parent), state),
        None => (None, None),
    })
}

fn tool_request() -> impl Strategy<Value = ToolRequest> {
    (
        id(),
        "[a-z_]{1,10}",
        params(),
        token(),
        any::<bool>(),
        trace(),
    )
        .prop_map(
            |(request_id, tool_name, params, auth_token, logs, (traceparent, tracestate))| {
                ToolRequest {
                    request_id,
                    tool_name,
                    params,
                    auth_token,
                    logs,
                    traceparent,
                    tracestate,
                }
            },
        )
}

fn server_to_toolkit() -> impl Strategy<Value = ServerToToolkit> {
    prop_oneof![
        ".{0,10}".prop_map(|message| ServerToToolkit::Connected { message }),
        tool_request().prop_map(ServerToToolkit::ToolRequest),
        tool_request().prop_map(ServerToToolkit::AppRequest),
        (id(), json_value(), trace()).prop_map(
            |(request_id, action_data, (traceparent, tracestate))| {
                ServerToToolkit::AppAction(AppAction {
                    request_id,
                    action_data,
                    traceparent,
                    tracestate,
                })
            }
        ),
        id().prop_map(|request_id| ServerToToolkit::AppTerminate { request_id }),
        ".{0,10}".prop_map(|message| ServerToToolkit::Error { message }),
        Just(ServerToToolkit::Pong),
    ]
}

fn toolkit_to_server() -> impl Strategy<Value = ToolkitToServer> {
    prop_oneof![
        (
            prop::option::of(id()),
            json_value(),
            any::<bool>(),
            "[a-z_]{1,10}"
        )
            .prop_map(
                |(request_id, result, failed, code)| ToolkitToServer::ToolResponse(if failed {
                    ToolResponse::error(request_id, &code, "m")
                } else {
                    ToolResponse::ok(request_id, result)
                })
            ),
        (
            id(),
            0u32..1000,
            prop::option::of(1u32..1000),
            prop::option::of(".{0,6}")
        )
            .prop_map(
                |(request_id, p, total, message)| ToolkitToServer::ToolProgress(ToolProgress {
                    request_id,
                    progress: p.into(),
                    total: total.map(Into::into),
                    message,
                })
            ),
        (id(), 0usize..8, json_value()).prop_map(|(request_id, level, data)| {
            let levels = [
                crate::LogLevel::Debug,
                crate::LogLevel::Info,
                crate::LogLevel::Notice,
                crate::LogLevel::Warning,
                crate::LogLevel::Error,
                crate::LogLevel::Critical,
                crate::LogLevel::Alert,
                crate::LogLevel::Emergency,
            ];
            ToolkitToServer::ToolLog(ToolLog {
                request_id,
                level: levels[level],
                data,
            })
        }),
        (id(), json_value()).prop_map(|(request_id, result)| ToolkitToServer::AppResponse(
            ToolkitAppResponse {
                request_id,
                result,
                is_error: Some(false),
                terminated: None
            }
        )),
        Just(ToolkitToServer::Ping),
    ]
}

fn llm_to_server() -> impl Strategy<Value = LlmToServer> {
    prop_oneof![
        token().prop_map(|api_key| LlmToServer::Auth { api_key }),
        (
            "[a-z.]{1,8}",
            prop::option::of(id()),
            prop::option::of("[a-z_]{1,8}"),
            any::<bool>()
        )
            .prop_map(|(toolkit_id, request_id, provider, strict)| {
                LlmToServer::GetToolkitContext(ContextRequest {
                    toolkit_id,
                    request_id,
                    provider,
                    user_prompt: Value::Null,
                    strict,
                })
            }),
        (
            "[a-z.]{1,8}",
            prop::option::of(id()),
            "[a-z_]{1,8}",
            params(),
            token(),
            prop::option::of("[a-z]{1,5}"),
            any::<bool>(),
            trace()
        )
            .prop_map(
                |(
                    toolkit_id,
                    request_id,
                    function,
                    p,
                    auth_token,
                    user,
                    stream,
                    (traceparent, tracestate),
                )| {
                    LlmToServer::TaskRequest(TaskRequest {
                        toolkit_id,
                        request_id,
                        payload: TaskPayload {
                            function,
                            parameters: Value::Object(p),
                            auth_token,
                            tool_call_id: json!("c"),
                            external_user_id: None,
                        },
                        provider: None,
                        user_prompt: json!("u"),
                        external_user_id: user,
                        auth_token: None,
                        stream,
                        traceparent,
                        tracestate,
                    })
                }
            ),
        prop::option::of(id()).prop_map(|request_id| LlmToServer::Ping { request_id }),
    ]
}

fn server_to_llm() -> impl Strategy<Value = ServerToLlm> {
    prop_oneof![
        (any::<bool>(), prop::option::of(".{0,6}"))
            .prop_map(|(success, error)| ServerToLlm::AuthResponse { success, error }),
        (
            prop::option::of(id()),
            prop::collection::vec(json_value(), 0..3)
        )
            .prop_map(|(request_id, tools)| ServerToLlm::ToolkitContext(
                ContextResponse::ok(
                    request_id,
                    ContextPayload {
                        toolkit_id: "k".into(),
                        tools,
                        ..Default::default()
                    }
                )
            )),
        (prop::option::of(id()), json_value(), any::<bool>()).prop_map(
            |(request_id, r, failed)| {
                ServerToLlm::TaskResponse(if failed {
                    TaskResponse::failed(
                        request_id,
                        Some("f".into()),
                        json!("c"),
                        "tool_error",
                        "m",
                    )
                } else {
                    TaskResponse::ok(request_id, None, Value::Null, r)
                })
            }
        ),
        (prop::option::of(id()), "[a-z_]{1,8}", ".{0,8}").prop_map(|(request_id, code, m)| {
            ServerToLlm::Error(ErrorFrame::new(request_id, &code, &m))
        }),
        prop::option::of(id()).prop_map(|request_id| ServerToLlm::Pong { request_id }),
    ]
}

proptest! {
    #[test]
    fn server_to_toolkit_round_trips(m in server_to_toolkit()) {
        prop_assert_eq!(ServerToToolkit::parse(&m.to_json()), Ok(m));
    }

    #[test]
    fn toolkit_to_server_round_trips(m in toolkit_to_server()) {
        prop_assert_eq!(ToolkitToServer::parse(&m.to_json()), Ok(m));
    }

    #[test]
    fn llm_to_server_round_trips(m in llm_to_server()) {
        prop_assert_eq!(LlmToServer::parse(&m.to_json()), Ok(m));
    }

    #[test]
    fn server_to_llm_round_trips(m in server_to_llm()) {
        prop_assert_eq!(ServerToLlm::parse(&m.to_json()), Ok(m));
    }

    #[test]
    fn unknown_fields_are_tolerated(m in server_to_toolkit(), extra in json_value()) {
        let mut v: Value = serde_json::from_str(&m.to_json()).unwrap();
        v["zz_unknown"] = extra.clone();
        if let Some(p) = v.get_mut("payload").and_then(Value::as_object_mut) {
            p.insert("zz_unknown".into(), extra);
        }
        prop_assert_eq!(ServerToToolkit::parse(&v.to_string()), Ok(m));
    }

    #[test]
    fn any_text_is_an_answer_not_a_panic(text in ".{0,64}") {
        let _ = ServerToToolkit::parse(&text);
        let _ = ToolkitToServer::parse(&text);
        let _ = LlmToServer::parse(&text);
        let _ = ServerToLlm::parse(&text);
    }
}

#[test]
fn provider_formats_round_trip() {
    let schema =
        json!({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]});
    for provider in [
        crate::Provider::OpenAi,
        crate::Provider::OpenAiChat,
        crate::Provider::Anthropic,
        crate::Provider::Mistral,
    ] {
        for strict in [false, true] {
            let v = provider.tool_schema("t", "d", &schema, strict);
            let typed: ProviderTool = serde_json::from_value(v.clone()).unwrap();
            assert_eq!(serde_json::to_value(&typed).unwrap(), v, "{provider:?}");
        }
    }
    for v in [
        json!({"type": "function_call_output", "call_id": "c", "output": "1"}),
        json!({"role": "tool", "tool_call_id": "c", "content": "1"}),
        json!({"role": "tool", "name": "t", "content": "1", "tool_call_id": "c"}),
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": "u", "content": "x", "is_error": true}]}),
    ] {
        let typed: ResultMessage = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&typed).unwrap(), v);
    }
}

#[test]
fn tool_log_frames_are_typed() {
    let m = ToolkitToServer::parse(
        r#"{"type":"tool_log","request_id":"r1","level":"warning","data":{"n":1}}"#,
    );
    assert_eq!(
        m.ok(),
        Some(ToolkitToServer::ToolLog(ToolLog {
            request_id: "r1".into(),
            level: crate::LogLevel::Warning,
            data: json!({"n": 1}),
        }))
    );
    // An unknown level is an error, not a message at some level.
    assert!(
        ToolkitToServer::parse(
            r#"{"type":"tool_log","request_id":"r1","level":"loud","data":"x"}"#
        )
        .is_err()
    );
    // A request asks for logs only when it says so; `false` is not written.
    let req: ToolRequest =
        serde_json::from_str(r#"{"request_id":"r","tool_name":"t","params":{}}"#).unwrap();
    assert!(!req.logs);
    assert!(!to_json(&req).contains("logs"));
}

#[test]
fn trace_context_fields_are_optional_and_forgiving() {
    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // Absent: nothing is written, and a Python frame reads as before.
    let LlmToServer::TaskRequest(task) = LlmToServer::parse(python::TASK).expect("reads") else {
        panic!("a task_request");
    };
    assert_eq!((task.traceparent.as_deref(), task.trace()), (None, None));
    assert!(!LlmToServer::TaskRequest(task).to_json().contains("trace"));
    // Present: read, and checked where it is used.
    let with = format!(
        r#"{{"message_type":"atp_tool_request","payload":{{"request_id":"r","tool_name":"t","traceparent":"{TP}","tracestate":"k=v"}}}}"#
    );
    let ServerToToolkit::ToolRequest(req) = ServerToToolkit::parse(&with).expect("reads") else {
        panic!("a tool request");
    };
    let trace = req.trace().expect("a valid context");
    assert_eq!(trace.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(trace.tracestate(), Some("k=v"));
    // Malformed (a number, an object, a bad string): the call still reads,
    // without a trace.
    for bad in ["42", "{}", "\"00-zz-yy-01\"", "null"] {
        let text = format!(
            r#"{{"type":"task_request","toolkit_id":"k","payload":{{"function":"f"}},"traceparent":{bad},"tracestate":{bad}}}"#
        );
        let LlmToServer::TaskRequest(task) = LlmToServer::parse(&text).expect("reads") else {
            panic!("a task_request");
        };
        assert_eq!(task.trace(), None, "{bad}");
    }
}
