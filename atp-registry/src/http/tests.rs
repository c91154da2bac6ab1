//! One test per rule of docs/PROTOCOL.md §3, through the engine without sockets.

use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::{Call, Tool, ToolError};

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AddArgs {
    a: i64,
    b: i64,
}

fn registry() -> Registry {
    let r = Registry::new();
    let c = ToolKitClient::new("key", "Demo").with_timeout(Duration::from_millis(200));
    c.register_tool(
        Tool::new("echo").params(["text"]).required_params(["text"]),
        |call: Call| async move { Ok::<_, ToolError>(json!({"echo": call.param("text")})) },
    )
    .unwrap();
    c.register_tool(
        Tool::new("optional")
            .params(["a", "b"])
            .required_params(["a"]),
        |call: Call| async move {
            Ok::<_, ToolError>(json!({"a": call.param("a"), "b": call.param("b")}))
        },
    )
    .unwrap();
    c.register_typed_tool(Tool::new("add"), |args: AddArgs, _| async move {
        Ok::<_, ToolError>(json!({"sum": args.a + args.b}))
    })
    .unwrap();
    c.register_tool(Tool::new("fail"), |_call: Call| async {
        Err::<Value, _>("boom")
    })
    .unwrap();
    c.register_tool(Tool::new("panic"), |_call: Call| async {
        if true {
            panic!("secret panic detail");
        }
        Ok::<Value, String>(Value::Null)
    })
    .unwrap();
    c.register_tool(Tool::new("slow"), |_call: Call| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<_, String>(json!("late"))
    })
    .unwrap();
    c.register_blocking_tool(Tool::new("blocking_slow"), |_call: Call| {
        std::thread::sleep(Duration::from_secs(2));
        Ok::<_, String>(json!("late"))
    })
    .unwrap();
    c.register_tool(
        Tool::new("secure")
            .auth_provider("demo")
            .auth_type("OAuth2")
            .auth_with("access_token"),
        |call: Call| async move {
            Ok::<_, String>(json!({"token_length": call.auth_token().map(|t| t.expose().len())}))
        },
    )
    .unwrap();
    r.register_client("demo", c).unwrap();
    let locked = ToolKitClient::new("key", "Locked")
        .with_endpoint_key("sesame")
        .with_body_limit(16);
    locked
        .register_tool(
            Tool::new("echo").params(["text"]),
            |call: Call| async move { Ok::<_, ToolError>(json!({"echo": call.param("text")})) },
        )
        .unwrap();
    r.register_client("locked", locked).unwrap();
    r
}

struct Req<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    headers: Vec<(&'static str, &'a str)>,
    body: &'a [u8],
}

fn req<'a>(method: &'a str, path: &'a str) -> Req<'a> {
    Req {
        method,
        path,
        query: None,
        headers: vec![],
        body: b"",
    }
}

impl<'a> Req<'a> {
    fn h(mut self, name: &'static str, value: &'a str) -> Self {
        self.headers.push((name, value));
        self
    }
    fn q(mut self, query: &'a str) -> Self {
        self.query = Some(query);
        self
    }
    fn body(mut self, body: &'a [u8]) -> Self {
        self.body = body;
        self
    }
    async fn send(self) -> (u16, Option<&'static str>, Value) {
        send_with(&Engine::with_registry(registry()), self).await
    }
}

async fn send_with(engine: &Engine, r: Req<'_>) -> (u16, Option<&'static str>, Value) {
    let headers = r.headers.clone();
    let head = RequestHead::new(r.method, r.path, r.query, |name| {
        headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_bytes())
    });
    let resp = engine.handle(&head, r.body).await;
    let mut hs = resp.headers();
    assert_eq!(hs.next(), Some(("content-type", "application/json")));
    let allow = hs.next().map(|(_, v)| v);
    let body: Value = serde_json::from_slice(resp.body()).expect("every answer is JSON");
    if resp.status() != 200 {
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
        assert_eq!(body.as_object().map(|o| o.len()), Some(2), "{body}");
    }
    (resp.status(), allow, body)
}

fn code(body: &Value) -> &str {
    body["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn root_lists_unlocked_toolkits() {
    for path in ["/atp", "/atp/"] {
        let (s, _, b) = req("GET", path).send().await;
        assert_eq!(s, 200);
        assert_eq!(
            b,
            json!({"toolkits": [{"toolkit": "demo", "app_name": "Demo", "tools": 8}]})
        );
    }
}

#[tokio::test]
async fn toolkit_context_in_registration_order() {
    let (s, _, b) = req("GET", "/atp/demo").send().await;
    assert_eq!(s, 200);
    assert_eq!(b["toolkit"], "demo");
    assert_eq!(b["app_name"], "Demo");
    let names: Vec<&str> = b["tools"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["function"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "echo",
            "optional",
            "add",
            "fail",
            "panic",
            "slow",
            "blocking_slow",
            "secure"
        ]
    );
}

#[tokio::test]
async fn tool_context_shape() {
    let (s, _, b) = req("GET", "/atp/demo/echo/").send().await;
    assert_eq!(s, 200);
    assert_eq!(
        b,
        json!({"function": "echo", "params": ["text"], "required_params": ["text"], "description": "",
               "auth_provider": null, "auth_type": null, "auth_with": null,
               "input_schema": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}})
    );
}

#[tokio::test]
async fn provider_formats_echo_the_name_sent() {
    for (p, canonical) in [
        ("openai", "openai"),
        ("openai_chat", "openai_chat"),
        ("anthropic", "anthropic"),
        ("mistral", "mistral"),
        ("mistralai", "mistral"),
    ] {
        let q = format!("provider={p}");
        let (s, _, b) = req("GET", "/atp/demo/").q(&q).send().await;
        assert_eq!(s, 200, "{p}");
        assert_eq!(b["provider"], p);
        let expected = Provider::from_str_canonical(canonical).tool_schema("echo", "", &json!({"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}), false);
        assert_eq!(b["tools"][0], expected, "{p}");
    }
    let (_, _, b) = req("GET", "/atp/demo/")
        .q("provider=openai&strict=true")
        .send()
        .await;
    assert_eq!(b["tools"][0]["strict"], true);
    assert_eq!(b["tools"][0]["parameters"]["additionalProperties"], false);
    let (_, _, b) = req("GET", "/atp/demo/")
        .q("provider=openai&strict=yes")
        .send()
        .await;
    assert_eq!(b["tools"][0]["strict"], false);
    let (s, _, b) = req("GET", "/atp/demo/").q("provider=cohere").send().await;
    assert_eq!((s, code(&b)), (400, "unknown_provider"));
}

impl Provider {
    fn from_str_canonical(s: &str) -> Provider {
        s.parse().unwrap()
    }
}

#[tokio::test]
async fn unknown_toolkit_tool_and_path() {
    let (s, _, b) = req("GET", "/atp/nope/").send().await;
    assert_eq!(
        (s, code(&b), b["error"].as_str()),
        (404, "toolkit_not_found", Some("Toolkit not found"))
    );
    let (s, _, b) = req("POST", "/atp/demo/nope").send().await;
    assert_eq!(
        (s, code(&b), b["error"].as_str()),
        (404, "tool_not_found", Some("Tool not found"))
    );
    for path in [
        "/atp/demo/echo/x",
        "/atp//",
        "/atp//demo",
        "/atp/demo//",
        "/atp/a/b/c/d/",
        "/atpx",
        "/other",
    ] {
        let (s, _, b) = req("GET", path).send().await;
        assert_eq!((s, code(&b)), (404, "not_found"), "{path}");
    }
}

#[tokio::test]
async fn percent_decoding_of_segments() {
    let (s, _, b) = req("GET", "/atp/%64emo/%65cho/").send().await;
    assert_eq!((s, b["function"].as_str()), (200, Some("echo")));
    for (path, c) in [
        ("/atp/demo/ec%2Fho/", "tool_not_found"),
        ("/atp/demo/%ZZ/", "tool_not_found"),
        ("/atp/demo/%FF/", "tool_not_found"),
        ("/atp/%ZZ/", "toolkit_not_found"),
        ("/atp/%FF/echo/", "toolkit_not_found"),
    ] {
        let (s, _, b) = req("GET", path).send().await;
        assert_eq!((s, code(&b)), (404, c), "{path}");
    }
    let long = format!("/atp/demo/{}/", "a".repeat(65));
    assert_eq!(code(&req("GET", &long).send().await.2), "tool_not_found");
}

#[tokio::test]
async fn methods_and_allow() {
    for (m, p, allow) in [
        ("POST", "/atp/", ALLOW_READ),
        ("DELETE", "/atp/demo/", ALLOW_READ),
        ("POST", "/atp/demo/", ALLOW_READ),
        ("OPTIONS", "/atp/demo/echo/", ALLOW_TOOL),
        ("PUT", "/atp/demo/echo", ALLOW_TOOL),
        ("FOO", "/atp/demo/echo", ALLOW_TOOL),
    ] {
        let (s, a, b) = req(m, p).send().await;
        assert_eq!(
            (s, a, code(&b)),
            (405, Some(allow), "method_not_allowed"),
            "{m} {p}"
        );
    }
    // The path's shape and the lookups come before the method.
    assert_eq!(
        code(&req("DELETE", "/atp/nope/").send().await.2),
        "toolkit_not_found"
    );
    assert_eq!(
        code(&req("DELETE", "/atp/demo/nope/").send().await.2),
        "tool_not_found"
    );
    assert_eq!(
        code(&req("DELETE", "/atp/x/y/z/").send().await.2),
        "not_found"
    );
}

#[tokio::test]
async fn head_answers_as_get() {
    let engine = Engine::with_registry(registry());
    for path in ["/atp/", "/atp/demo/", "/atp/demo/echo/", "/atp/nope/"] {
        let get = send_with(&engine, req("GET", path)).await;
        let head = send_with(&engine, req("HEAD", path)).await;
        assert_eq!(get, head, "{path}");
    }
}

#[tokio::test]
async fn post_json_form_and_empty_bodies() {
    for ct in [
        None,
        Some("application/json"),
        Some("APPLICATION/JSON; Charset=UTF-8"),
        Some("application/json;charset=\"utf-8\""),
    ] {
        let mut r = req("POST", "/atp/demo/echo").body(br#"{"text": "hi"}"#);
        if let Some(ct) = ct {
            r = r.h("content-type", ct);
        }
        let (s, _, b) = r.send().await;
        assert_eq!((s, &b), (200, &json!({"result": {"echo": "hi"}})), "{ct:?}");
    }
    let (s, _, b) = req("POST", "/atp/demo/echo/")
        .h("content-type", "application/x-www-form-urlencoded")
        .body(b"text=a+b%21%C3%A9")
        .send()
        .await;
    assert_eq!((s, b), (200, json!({"result": {"echo": "a b!é"}})));
    // An empty body is {} whatever its content type.
    let (s, _, b) = req("POST", "/atp/demo/fail/")
        .h("content-type", "text/plain")
        .send()
        .await;
    assert_eq!((s, code(&b)), (400, "tool_error"));
}

#[tokio::test]
async fn unsupported_media_types() {
    for ct in [
        "text/plain",
        "application/json; charset=latin-1",
        "application/xml",
        "multipart/form-data",
    ] {
        let (s, _, b) = req("POST", "/atp/demo/echo/")
            .h("content-type", ct)
            .body(b"{}")
            .send()
            .await;
        assert_eq!((s, code(&b)), (415, "unsupported_media_type"), "{ct}");
    }
}

#[tokio::test]
async fn invalid_bodies() {
    let deep = format!("{{\"text\": {}{}}}", "[".repeat(200), "]".repeat(200));
    for body in [
        &b"not json"[..],
        b"[1, 2]",
        b"\"text\"",
        b"{\"text\": \"a\"} trailing",
        b"{\"text\": \"a\", \"text\": \"b\"}",
        b"{\"text\": \"\xff\"}",
        deep.as_bytes(),
        b"{\"text\": \"hi\", \"auth_token\": 5}",
    ] {
        let (s, _, b) = req("POST", "/atp/demo/echo/").body(body).send().await;
        assert_eq!(
            (s, code(&b)),
            (400, "invalid_body"),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
    for body in [&b"text=a&text=b"[..], b"text=%FF", b"%FF=x"] {
        let (s, _, b) = req("POST", "/atp/demo/echo/")
            .h("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await;
        assert_eq!(
            (s, code(&b)),
            (400, "invalid_body"),
            "{}",
            String::from_utf8_lossy(body)
        );
    }
}

#[tokio::test]
async fn duplicate_keys_are_only_checked_at_the_top() {
    let (s, _, b) = req("POST", "/atp/demo/echo/")
        .body(br#"{"text": {"k": 1, "k": 2}}"#)
        .send()
        .await;
    assert_eq!(s, 200, "{b}");
}

#[tokio::test]
async fn body_limit_boundary() {
    let engine = Engine::with_registry(registry());
    // `locked` has a 16-byte limit.
    let exact = br#"{"text":"123456"}"#; // 17 bytes
    assert_eq!(exact.len(), 17);
    let ok = br#"{"text":"12345"}"#; // 16 bytes
    let r = |b: &'static [u8]| {
        req("POST", "/atp/locked/echo/")
            .h(ENDPOINT_KEY_HEADER, "sesame")
            .body(b)
    };
    assert_eq!(send_with(&engine, r(ok)).await.0, 200);
    let (s, _, b) = send_with(&engine, r(exact)).await;
    assert_eq!((s, code(&b)), (413, "payload_too_large"));
    // A declared length over the limit is refused before reading; a bad
    // content type still wins (415 before 413).
    let (s, _, b) = send_with(&engine, r(b"").h("content-length", "17")).await;
    assert_eq!((s, code(&b)), (413, "payload_too_large"));
    let (s, _, b) = send_with(&engine, r(exact).h("content-type", "text/plain")).await;
    assert_eq!((s, code(&b)), (415, "unsupported_media_type"));
}

#[tokio::test]
async fn body_buffer_refuses_past_the_limit() {
    let engine = Engine::with_registry(registry());
    let head = RequestHead::new("POST", "/atp/locked/echo/", None, |n| {
        (n == ENDPOINT_KEY_HEADER).then_some(&b"sesame"[..])
    });
    let Step::ReadBody(pending) = engine.begin(&head) else {
        panic!("expected a body read")
    };
    let mut buf = pending.body_buffer();
    assert_eq!(buf.push(&[b' '; 10]), Ok(()));
    assert_eq!(buf.push(&[b' '; 6]), Ok(()));
    assert_eq!(buf.push(b" "), Err(TooLarge));
    assert_eq!(pending.too_large().status(), 413);
}

#[tokio::test]
async fn endpoint_key() {
    for key in [
        None,
        Some("wrong"),
        Some("sesam"),
        Some("sesame2"),
        Some(""),
    ] {
        let mut r = req("GET", "/atp/locked/nope/");
        if let Some(k) = key {
            r = r.h(ENDPOINT_KEY_HEADER, k);
        }
        let (s, _, b) = r.send().await;
        assert_eq!((s, code(&b)), (401, "unauthorized"), "{key:?}");
        assert!(!b["error"].as_str().unwrap().contains("sesame"));
    }
    let (s, _, b) = req("GET", "/atp/locked/nope/")
        .h(ENDPOINT_KEY_HEADER, "sesame")
        .send()
        .await;
    assert_eq!((s, code(&b)), (404, "tool_not_found"));
    let (s, _, b) = req("POST", "/atp/locked/")
        .h(ENDPOINT_KEY_HEADER, "sesame")
        .send()
        .await;
    assert_eq!((s, code(&b)), (405, "method_not_allowed"));
    let (s, _, _) = req("GET", "/atp/locked/")
        .h(ENDPOINT_KEY_HEADER, "sesame")
        .send()
        .await;
    assert_eq!(s, 200);
}

#[tokio::test]
async fn auth_tokens() {
    let secure = || req("POST", "/atp/demo/secure/");
    let (s, _, b) = secure().send().await;
    assert_eq!((s, code(&b)), (401, "auth_required"));
    for (body, header, len) in [
        (&br#"{"auth_token": "abcd"}"#[..], None, Some(4)),
        (b"", Some("Bearer abc"), Some(3)),
        (b"", Some("bEaReR abc"), Some(3)),
        (br#"{"auth_token": "abcd"}"#, Some("Bearer abc"), Some(4)),
        (br#"{"auth_token": ""}"#, Some("Bearer abc"), Some(3)),
        (br#"{"auth_token": null}"#, Some("Bearer abc"), Some(3)),
        (b"", Some("Basic abc"), None),
        (br#"{"auth_token": ""}"#, None, None),
        (b"", Some("Bearer "), None),
    ] {
        let mut r = secure().body(body);
        if let Some(h) = header {
            r = r.h("authorization", h);
        }
        let (s, _, b) = r.send().await;
        match len {
            Some(n) => assert_eq!(
                (s, &b),
                (200, &json!({"result": {"token_length": n}})),
                "{header:?}"
            ),
            None => assert_eq!((s, code(&b)), (401, "auth_required"), "{header:?}"),
        }
    }
    // A token for a tool without auth is not a param.
    let (s, _, b) = req("POST", "/atp/demo/echo/")
        .body(br#"{"text": "x", "auth_token": "t"}"#)
        .send()
        .await;
    assert_eq!((s, b), (200, json!({"result": {"echo": "x"}})));
    // Auth comes before params.
    let (s, _, b) = req("POST", "/atp/demo/secure/")
        .body(br#"{"bogus": 1}"#)
        .send()
        .await;
    assert_eq!((s, code(&b)), (401, "auth_required"));
}

#[tokio::test]
async fn params_missing_unknown_invalid() {
    let post = |body: &'static [u8], tool: &'static str| async move {
        let path = format!("/atp/demo/{tool}/");
        req("POST", &path).body(body).send().await
    };
    let (s, _, b) = post(b"{}", "echo").await;
    assert_eq!((s, code(&b)), (400, "missing_params"));
    assert!(b["error"].as_str().unwrap().contains("text"));
    let (s, _, b) = post(br#"{"text": null}"#, "echo").await;
    assert_eq!((s, code(&b)), (400, "missing_params"));
    let (s, _, b) = post(br#"{"zz": 1, "yy": 2}"#, "echo").await;
    assert_eq!((s, code(&b)), (400, "missing_params"));
    let msg = b["error"].as_str().unwrap();
    assert!(
        msg.contains("text") && msg.contains("zz") && msg.contains("yy"),
        "{msg}"
    );
    let (s, _, b) = post(br#"{"text": "a", "zz": 1, "yy": 2}"#, "echo").await;
    assert_eq!((s, code(&b)), (400, "unknown_params"));
    assert!(b["error"].as_str().unwrap().contains("zz, yy"));
    let (s, _, b) = post(br#"{"a": 1, "b": null}"#, "optional").await;
    assert_eq!((s, b), (200, json!({"result": {"a": 1, "b": null}})));
    let (s, _, b) = post(br#"{"a": 1}"#, "optional").await;
    assert_eq!((s, b), (200, json!({"result": {"a": 1, "b": null}})));
    // Typed tools.
    let (s, _, b) = post(br#"{"a": 2, "b": 3}"#, "add").await;
    assert_eq!((s, b), (200, json!({"result": {"sum": 5}})));
    let (s, _, b) = post(br#"{"a": 2}"#, "add").await;
    assert_eq!((s, code(&b)), (400, "missing_params"));
    let (s, _, b) = post(br#"{"a": 2, "b": 3, "c": 4}"#, "add").await;
    assert_eq!((s, code(&b)), (400, "unknown_params"));
    let (s, _, b) = post(br#"{"a": "2", "b": 3}"#, "add").await;
    assert_eq!((s, code(&b)), (400, "invalid_params"));
    let (s, _, b) = post(br#"{"a": 9223372036854775808, "b": 3}"#, "add").await;
    assert_eq!((s, code(&b)), (400, "invalid_params"));
    let (s, _, b) = req("POST", "/atp/demo/add/")
        .h("content-type", "application/x-www-form-urlencoded")
        .body(b"a=1&b=2")
        .send()
        .await;
    assert_eq!((s, code(&b)), (400, "invalid_params"));
}

#[tokio::test]
async fn handler_errors_panics_and_timeouts() {
    let (s, _, b) = req("POST", "/atp/demo/fail/").send().await;
    assert_eq!(
        (s, b),
        (400, json!({"error": "boom", "code": "tool_error"}))
    );
    let (s, _, b) = req("POST", "/atp/demo/panic/").send().await;
    assert_eq!((s, code(&b)), (500, "tool_panicked"));
    assert!(!b.to_string().contains("secret panic detail"));
    let (s, _, b) = req("POST", "/atp/demo/slow/").send().await;
    assert_eq!((s, code(&b)), (504, "tool_timeout"));
    let started = std::time::Instant::now();
    let (s, _, b) = req("POST", "/atp/demo/blocking_slow/").send().await;
    assert_eq!((s, code(&b)), (504, "tool_timeout"));
    // The thread ends after 2 s; the bound leaves room for a loaded machine.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "answered at the timeout, not when the thread ended: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn prefixes() {
    let root = Engine::with_registry(registry()).prefix("/");
    assert_eq!(root.get_prefix(), "");
    let (s, _, b) = send_with(&root, req("GET", "/demo/echo")).await;
    assert_eq!((s, b["function"].as_str()), (200, Some("echo")));
    assert_eq!(send_with(&root, req("GET", "/")).await.0, 200);
    let nested = Engine::with_registry(registry()).prefix("api/tools/");
    assert_eq!(nested.get_prefix(), "/api/tools");
    assert_eq!(send_with(&nested, req("GET", "/api/tools")).await.0, 200);
    assert_eq!(
        code(&send_with(&nested, req("GET", "/atp/")).await.2),
        "not_found"
    );
    assert!(nested.is_under_prefix("/api/tools/x") && !nested.is_under_prefix("/api/toolsx"));
}

#[test]
fn media_types() {
    assert_eq!(media(None), Media::Json);
    assert_eq!(media(Some(b"")), Media::Json);
    assert_eq!(
        media(Some(b"Application/X-WWW-Form-Urlencoded; charset=UTF8")),
        Media::Form
    );
    assert_eq!(media(Some(b"application/json; boundary=x")), Media::Json);
    assert_eq!(
        media(Some(b"application/json; charset=utf-16")),
        Media::Unsupported
    );
    assert_eq!(media(Some(b"\xff")), Media::Unsupported);
}

#[test]
fn bearer_parsing() {
    assert_eq!(
        bearer_token(Some(b"Bearer  tok ")).map(|t| t.expose().to_owned()),
        Some("tok".into())
    );
    assert!(bearer_token(Some(b"Bearertok")).is_none());
    assert!(bearer_token(Some(b"Token tok")).is_none());
    assert!(bearer_token(None).is_none());
}

#[test]
fn debug_output_hides_tokens() {
    let engine = Engine::with_registry(registry());
    let head = RequestHead::new("POST", "/atp/demo/secure/", None, |n| {
        (n == "authorization").then_some(&b"Bearer hunter2"[..])
    });
    let Step::ReadBody(pending) = engine.begin(&head) else {
        panic!("expected a body read")
    };
    let dbg = format!("{pending:?} {:?}", registry().get_client("locked"));
    assert!(!dbg.contains("hunter2") && !dbg.contains("sesame"), "{dbg}");
}

#[test]
fn from_headers_reads_like_a_lookup_per_name() {
    let headers: [(&str, &[u8]); 6] = [
        ("X-ATP-Key", b"k1"),
        ("authorization", b"Bearer \xFF"),
        ("Authorization", b"Bearer ok"),
        ("CONTENT-LENGTH", b" 42 "),
        ("content-type", b"application/json"),
        ("x-atp-key", b"k2"),
    ];
    let first = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    };
    let scanned = RequestHead::from_headers("POST", "/atp/k/t/", Some("a=1"), headers);
    let looked_up = RequestHead::new("POST", "/atp/k/t/", Some("a=1"), first);
    for h in [scanned, looked_up] {
        assert_eq!(h.endpoint_key, Some(&b"k1"[..]));
        // The first value is not UTF-8: absent, as with `new`.
        assert_eq!(h.authorization, None);
        assert_eq!(h.content_length, Some(42));
        assert_eq!(h.content_type, Some(&b"application/json"[..]));
        assert_eq!(h.query, Some("a=1"));
    }
}

#[tokio::test]
async fn an_app_is_described_but_not_called() {
    let r = Registry::new();
    let c = ToolKitClient::new("key", "Apps");
    c.register_app(
        Tool::new("counter").params(["start"]),
        |_call: crate::AppCall| async { Ok::<_, ToolError>(crate::AppReply::new(json!({}))) },
    )
    .unwrap();
    r.register_client("apps", c).unwrap();
    let engine = Engine::with_registry(r);
    let (s, _, b) = send_with(&engine, req("GET", "/atp/apps/counter/")).await;
    assert_eq!((s, b["function"].as_str()), (200, Some("counter")));
    let (s, _, b) = send_with(&engine, req("GET", "/atp/apps/")).await;
    assert_eq!(
        (s, b["tools"][0]["function"].as_str()),
        (200, Some("counter"))
    );
    for method in ["POST", "PUT", "DELETE"] {
        let (s, allow, b) = send_with(
            &engine,
            req(method, "/atp/apps/counter/")
                .h("content-type", "application/json")
                .body(br#"{"start": 1}"#),
        )
        .await;
        assert_eq!(
            (s, allow, code(&b)),
            (405, Some(ALLOW_READ), "method_not_allowed"),
            "{method}"
        );
        assert!(
            b["error"]
                .as_str()
                .unwrap_or("")
                .contains("interactive app"),
            "{b}"
        );
    }
}
