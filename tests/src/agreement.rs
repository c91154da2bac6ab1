//! Agreement between servers: the same requests sent to several servers
//! that serve the fixture must get the same answers — status,
//! `Content-Type`, `Allow`, and bodies equal as JSON (docs/PROTOCOL.md §3: "every
//! message in every answer comes from the core, so the adapters' bodies are
//! equal as JSON, not just their codes").
//!
//! The cases check what the spec fixes; this also catches two adapters
//! that differ where the spec leaves the wording to the core (messages of
//! `invalid_body`, `unsupported_media_type`, `method_not_allowed`, ...).

use serde_json::{Value, json};

use crate::{
    client::{Framing, Request, Response, preview, send},
    fixture::ENDPOINT_KEY,
};

/// The requests whose answers are compared: at least one for every row
/// of docs/PROTOCOL.md §3, successes and errors.
pub fn probes() -> Vec<Request> {
    let echo = "/atp/conformance/echo/";
    let json_post = |target: &str, body: &str| {
        Request::post(target)
            .header("Content-Type", "application/json")
            .body(body)
    };
    let form_post = |target: &str, body: &str| {
        Request::post(target)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(body)
    };
    let call = |tool: &str, params: Value| {
        Request::post_json(format!("/atp/conformance/{tool}/"), &params)
    };
    vec![
        Request::get("/atp/"),
        Request::get("/atp"),
        Request::get("/atp/conformance/"),
        Request::get("/atp/conformance/?provider=openai&strict=true"),
        Request::get("/atp/conformance/?provider=openai_chat"),
        Request::get("/atp/conformance/?provider=anthropic"),
        Request::get("/atp/conformance/?provider=mistralai"),
        Request::get("/atp/conformance/?provider=gemini"),
        Request::get("/atp/conformance/add/"),
        Request::get("/atp/conformance/secure"),
        Request::head("/atp/conformance/echo/"),
        Request::head("/atp/nope/"),
        Request::get("/atp/nope/"),
        Request::get("/atp/%ZZ/echo/"),
        Request::get("/atp/conformance/nope/"),
        Request::get("/atp/conformance/ec%2Fho/"),
        Request::get("/atp/conformance/echo/extra/"),
        Request::get("/atp/conformance//echo/"),
        Request::new("POST", "/atp/"),
        Request::new("POST", "/atp/conformance/"),
        Request::new("OPTIONS", "/atp/conformance/echo/"),
        Request::new("DELETE", "/atp/conformance/echo"),
        Request::get("/atp/locked/"),
        Request::get("/atp/locked/").header("X-ATP-Key", "wrong"),
        Request::get("/atp/locked/").header("X-ATP-Key", ENDPOINT_KEY),
        Request::get("/atp/locked/nope/"),
        call("echo", json!({"text": "hi"})),
        json_post(echo, r#"{"text": "#),
        json_post(echo, "[1]"),
        json_post(echo, r#"{"text": "a", "text": "b"}"#),
        json_post(
            echo,
            &format!(r#"{{"text": {}{}}}"#, "[".repeat(199), "]".repeat(199)),
        ),
        Request::post(echo)
            .header("Content-Type", "application/json")
            .body(vec![b'{', b'"', 0xFF, b'"', b'}']),
        Request::post(echo)
            .header("Content-Type", "text/plain")
            .body("hi"),
        Request::post(echo)
            .header("Content-Type", "application/json; charset=latin1")
            .body("{}"),
        Request::post(echo)
            .header("Content-Type", "application/json")
            .body(vec![b' '; crate::fixture::BODY_LIMIT + 1]),
        Request::post(echo)
            .header("Content-Type", "application/json")
            .body(vec![b' '; 1024])
            .framing(Framing::Declared(1 << 30)),
        form_post(echo, "text=a&text=b"),
        form_post(echo, "text=%FF"),
        form_post("/atp/conformance/add/", "a=1&b=2"),
        call("echo", json!({})),
        call("echo", json!({"zz_extra": 1})),
        call("optional", json!({"a": 1, "zz_one": 1, "zz_two": 2})),
        call("add", json!({"a": 1, "b": "x"})),
        json_post(
            "/atp/conformance/add/",
            r#"{"a": 9223372036854775808, "b": 1}"#,
        ),
        call("secure", json!({})),
        call("secure", json!({"auth_token": 5})),
        call("secure", json!({})).header("Authorization", "bearer abc"),
        call("fail", json!({})),
        call("panic", json!({})),
        call("slow", json!({"ms": "x"})),
        call("slow", json!({"ms": 3000})),
    ]
}

/// What is compared of an answer.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    content_type: Option<String>,
    allow: Option<String>,
    /// `Content-Length` of a `HEAD` answer (elsewhere the bodies are
    /// compared).
    head_length: Option<String>,
    body: Result<Value, String>,
}

impl Seen {
    fn of(request: &Request, response: &Response) -> Self {
        let is_head = request.method() == "HEAD";
        Self {
            status: response.status,
            content_type: response.header("content-type").map(str::to_owned),
            allow: response.header("allow").map(str::to_owned),
            head_length: is_head
                .then(|| response.header("content-length").map(str::to_owned))
                .flatten(),
            body: if response.body.is_empty() {
                Ok(Value::Null)
            } else {
                serde_json::from_slice(&response.body).map_err(|_| preview(&response.text()))
            },
        }
    }

    fn describe(&self) -> String {
        let body = match &self.body {
            Ok(v) => preview(&v.to_string()),
            Err(text) => format!("(not JSON) {text}"),
        };
        format!(
            "{} content-type={:?} allow={:?}{} {body}",
            self.status,
            self.content_type,
            self.allow,
            self.head_length
                .as_ref()
                .map(|l| format!(" content-length={l}"))
                .unwrap_or_default()
        )
    }
}

/// Sends every one of [`probes`] to every server (`(label, base URL)`) and
/// reports every request whose answers differ — all of them, not just the
/// first.
pub async fn compare(servers: &[(String, String)]) -> Result<(), String> {
    let mut disagreements = Vec::new();
    for request in probes() {
        let mut answers = Vec::new();
        for (label, base) in servers {
            let seen = match send(base, &request).await {
                Ok(response) => Seen::of(&request, &response),
                Err(e) => Seen {
                    status: 0,
                    content_type: None,
                    allow: None,
                    head_length: None,
                    body: Err(e),
                },
            };
            answers.push((label, seen));
        }
        if answers.windows(2).any(|w| w[0].1 != w[1].1) {
            let lines: Vec<String> = answers
                .iter()
                .map(|(label, seen)| format!("  {label}: {}", seen.describe()))
                .collect();
            disagreements.push(format!("{request}:\n{}", lines.join("\n")));
        }
    }
    if disagreements.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} requests got different answers:\n{}",
            disagreements.len(),
            disagreements.join("\n")
        ))
    }
}
