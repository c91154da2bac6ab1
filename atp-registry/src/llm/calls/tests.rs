use serde_json::json;

use super::*;

fn sample(name: &str) -> Value {
    let text = match name {
        "openai_responses" => include_str!("../samples/openai_responses_response.json"),
        "openai_chat" => include_str!("../samples/openai_chat_completion_response.json"),
        "anthropic" => include_str!("../samples/anthropic_message_response.json"),
        _ => include_str!("../samples/mistral_chat_completion_response.json"),
    };
    serde_json::from_str(text).expect("a sample is JSON")
}

fn names_and_args(calls: &[ToolCall]) -> Vec<(String, Value)> {
    calls
        .iter()
        .map(|c| {
            (
                c.name.clone(),
                Value::Object(c.arguments.clone().expect("valid arguments")),
            )
        })
        .collect()
}

fn expected() -> Vec<(String, Value)> {
    vec![
        ("hello_world".into(), json!({"name": "Ada Lovelace"})),
        ("get_weather".into(), json!({"city": "Paris"})),
    ]
}

#[test]
fn every_sample_parses_from_the_whole_response_and_from_the_calls() {
    let cases = [
        (
            "openai_responses",
            Provider::OpenAi,
            CallFormat::OpenAiResponses,
            "/output",
        ),
        (
            "openai_chat",
            Provider::OpenAi,
            CallFormat::OpenAiChat,
            "/choices/0/message/tool_calls",
        ),
        (
            "openai_chat",
            Provider::OpenAiChat,
            CallFormat::OpenAiChat,
            "/choices/0/message",
        ),
        (
            "anthropic",
            Provider::Anthropic,
            CallFormat::Anthropic,
            "/content",
        ),
        (
            "mistral",
            Provider::Mistral,
            CallFormat::Mistral,
            "/choices/0/message/tool_calls",
        ),
    ];
    for (name, provider, format, pointer) in cases {
        let whole = sample(name);
        for input in [&whole, whole.pointer(pointer).expect("pointer")] {
            let calls = parse_tool_calls(provider, input);
            assert_eq!(names_and_args(&calls), expected(), "{name} {pointer}");
            assert!(calls.iter().all(|c| c.format == format), "{name}");
        }
    }
    let one = sample("anthropic")
        .pointer("/content/1")
        .cloned()
        .expect("a block");
    assert_eq!(parse_tool_calls(Provider::Anthropic, &one).len(), 1);
}

#[test]
fn ids_are_kept() {
    let calls = parse_tool_calls(Provider::OpenAi, &sample("openai_responses"));
    assert_eq!(calls[0].id, "call_mJ8WqZ3tH9cK2vN5bR7xLp1D");
    let calls = parse_tool_calls(Provider::Mistral, &sample("mistral"));
    assert_eq!(
        [calls[0].id.as_str(), calls[1].id.as_str()],
        ["D681PevKs", "kT3vQ9xZa"]
    );
}

#[test]
fn bad_arguments_are_an_error_not_a_panic() {
    let calls = parse_tool_calls(
        Provider::OpenAi,
        &json!([
            {"type": "function_call", "call_id": "a", "name": "t", "arguments": "{not json"},
            {"type": "function_call", "call_id": "b", "name": "t", "arguments": "[1]"},
            {"type": "function_call", "call_id": "c", "name": "t", "arguments": ""},
            {"type": "function_call", "call_id": "d", "name": "t", "arguments": 5},
        ]),
    );
    assert_eq!(calls.len(), 4);
    assert!(
        calls[0].arguments.is_err() && calls[1].arguments.is_err() && calls[3].arguments.is_err()
    );
    assert_eq!(calls[2].arguments, Ok(Map::new()));
}

#[test]
fn invented_mistral_ids_follow_mistral_rules() {
    let calls = parse_tool_calls(
        Provider::Mistral,
        &json!([{"type": "function", "function": {"name": "t", "arguments": "{}"}}]),
    );
    assert_eq!(calls[0].id.len(), 9);
    assert!(
        calls[0].id.bytes().all(|b| b.is_ascii_alphanumeric()),
        "{}",
        calls[0].id
    );
}

#[test]
fn result_shapes_per_provider() {
    let outcomes = [
        CallOutcome::ok(&json!({"message": "Hello, Ada Lovelace!"})),
        CallOutcome::error("no weather"),
    ];
    let calls = parse_tool_calls(Provider::OpenAi, &sample("openai_responses"));
    assert_eq!(
        result_messages(&calls, &outcomes),
        [
            json!({"type": "function_call_output", "call_id": "call_mJ8WqZ3tH9cK2vN5bR7xLp1D", "output": "{\"message\":\"Hello, Ada Lovelace!\"}"}),
            json!({"type": "function_call_output", "call_id": "call_Q4nV7yXe2LsD9gTk1RwB6hMz", "output": "no weather"}),
        ]
    );
    let calls = parse_tool_calls(Provider::OpenAi, &sample("openai_chat"));
    assert_eq!(
        result_messages(&calls, &outcomes),
        [
            json!({"role": "tool", "tool_call_id": "call_h7Tq2XcV9mLb4NsR1yZe8KdF", "content": "{\"message\":\"Hello, Ada Lovelace!\"}"}),
            json!({"role": "tool", "tool_call_id": "call_W3pJ6uYa0DgE5kQo2HxC9vBn", "content": "no weather"}),
        ]
    );
    let calls = parse_tool_calls(Provider::Anthropic, &sample("anthropic"));
    assert_eq!(
        result_messages(&calls, &outcomes),
        [json!({"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9B", "content": "{\"message\":\"Hello, Ada Lovelace!\"}"},
            {"type": "tool_result", "tool_use_id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "content": "no weather", "is_error": true},
        ]})]
    );
    let calls = parse_tool_calls(Provider::Mistral, &sample("mistral"));
    assert_eq!(
        result_messages(&calls, &outcomes),
        [
            json!({"role": "tool", "name": "hello_world", "content": "{\"message\":\"Hello, Ada Lovelace!\"}", "tool_call_id": "D681PevKs"}),
            json!({"role": "tool", "name": "get_weather", "content": "no weather", "tool_call_id": "kT3vQ9xZa"}),
        ]
    );
}

fn task_outcome(v: &Value) -> CallOutcome {
    super::task_outcome(&crate::wire::ServerToLlm::parse(&v.to_string()).expect("a message"))
}

#[test]
fn task_responses_in_every_shape() {
    assert_eq!(
        task_outcome(&json!({"type": "task_response", "payload": {"result": {"a": 1}}})),
        CallOutcome::ok(&json!({"a": 1}))
    );
    assert_eq!(
        task_outcome(&json!({"result": {"tool": {"name": "t", "result": [1]}}})),
        CallOutcome::ok(&json!([1]))
    );
    assert_eq!(
        task_outcome(&json!({"status": "error", "message": "nope"})),
        CallOutcome::error("nope")
    );
    assert_eq!(
        task_outcome(&json!({"payload": {"result": {"error": "boom"}}})),
        CallOutcome::error("boom")
    );
    assert_eq!(
        task_outcome(&json!({"payload": {"result": "text"}})),
        CallOutcome::ok(&json!("text"))
    );
}
