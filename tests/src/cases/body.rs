//! `POST` bodies: media types, forms, JSON parsing and the body limit.

use serde_json::{Value, json};

use super::{
    check_names, ensure, expect_error, expect_error_message, expect_json, expect_result, path,
};
use crate::{
    client::{Framing, Request},
    fixture::BODY_LIMIT,
};

fn echo_path() -> String {
    path("conformance/echo/")
}

/// A POST to `echo` with `body` as `content_type` (none when `None`).
fn post(target: &str, content_type: Option<&str>, body: impl Into<Vec<u8>>) -> Request {
    let request = Request::post(target).body(body);
    match content_type {
        Some(ct) => request.header("Content-Type", ct),
        None => request,
    }
}

async fn invalid_body(base: &str, request: &Request) -> Result<(), String> {
    expect_error(base, request, 400, "invalid_body")
        .await
        .map(drop)
}

/// `POST /atp/conformance/echo/` with a JSON object → 200
/// `{"result": {"echo": ...}}`.
pub async fn post_echo(base: &str) -> Result<(), String> {
    let request = Request::post_json(echo_path(), &json!({"text": "hi"}));
    expect_result(base, &request, json!({"echo": "hi"})).await
}

/// `POST /atp/conformance/hello_world/` → `{"message": "Hello, NAME!"}`.
pub async fn post_hello_world(base: &str) -> Result<(), String> {
    let request = Request::post_json(path("conformance/hello_world/"), &json!({"name": "Ada"}));
    expect_result(base, &request, json!({"message": "Hello, Ada!"})).await
}

/// `POST /atp/conformance/echo` (no trailing slash) answers the same,
/// without a redirect.
pub async fn post_without_trailing_slash(base: &str) -> Result<(), String> {
    let request = Request::post_json(path("conformance/echo"), &json!({"text": "hi"}));
    expect_result(base, &request, json!({"echo": "hi"})).await
}

/// Media types and their parameters are case-insensitive, and a UTF-8
/// charset is JSON: `APPLICATION/JSON; Charset=UTF-8` and others.
pub async fn json_with_charset_and_any_case(base: &str) -> Result<(), String> {
    for ct in [
        "APPLICATION/JSON; Charset=UTF-8",
        "application/json; charset=utf-8",
        "application/json;charset=UTF-8",
        "Application/Json",
        "application/json; charset=\"utf-8\"",
    ] {
        let request = post(&echo_path(), Some(ct), r#"{"text": "hi"}"#);
        expect_result(base, &request, json!({"echo": "hi"})).await?;
    }
    Ok(())
}

/// A charset other than UTF-8 → 415 `unsupported_media_type`, for JSON
/// and forms.
pub async fn other_charset_is_unsupported(base: &str) -> Result<(), String> {
    for ct in [
        "application/json; charset=latin1",
        "application/json; charset=utf-16",
        "APPLICATION/JSON; CHARSET=ISO-8859-1",
        "application/x-www-form-urlencoded; charset=latin1",
    ] {
        let request = post(&echo_path(), Some(ct), r#"{"text": "hi"}"#);
        expect_error(base, &request, 415, "unsupported_media_type").await?;
    }
    Ok(())
}

/// Any other media type with a body → 415 `unsupported_media_type`.
pub async fn other_content_type_is_unsupported(base: &str) -> Result<(), String> {
    for ct in [
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/jsonx",
        "text/json",
    ] {
        let request = post(&echo_path(), Some(ct), r#"{"text": "hi"}"#);
        expect_error(base, &request, 415, "unsupported_media_type").await?;
    }
    Ok(())
}

/// A form-encoded body is read as params (`+` and `%20` are spaces,
/// percent-escapes decoded), also with a UTF-8 charset.
pub async fn form_encoded(base: &str) -> Result<(), String> {
    let form = "application/x-www-form-urlencoded";
    let request = post(&path("conformance/hello_world/"), Some(form), "name=Ada");
    expect_result(base, &request, json!({"message": "Hello, Ada!"})).await?;
    let request = post(&echo_path(), Some(form), "text=a+b%20c%21%C3%A9");
    expect_result(base, &request, json!({"echo": "a b c!é"})).await?;
    let request = post(
        &echo_path(),
        Some("Application/X-WWW-Form-Urlencoded; charset=UTF-8"),
        "text=x",
    );
    expect_result(base, &request, json!({"echo": "x"})).await?;
    // Form values are strings.
    let request = post(&path("conformance/optional/"), Some(form), "a=1&b=");
    expect_result(base, &request, json!({"a": "1", "b": ""})).await
}

/// A form field repeated → 400 `invalid_body`.
pub async fn form_repeated_field(base: &str) -> Result<(), String> {
    let form = "application/x-www-form-urlencoded";
    invalid_body(base, &post(&echo_path(), Some(form), "text=a&text=b")).await?;
    invalid_body(base, &post(&echo_path(), Some(form), "text=a&te%78t=b")).await
}

/// A form field that decodes to invalid UTF-8 → 400 `invalid_body`.
pub async fn form_invalid_utf8(base: &str) -> Result<(), String> {
    let form = "application/x-www-form-urlencoded";
    invalid_body(base, &post(&echo_path(), Some(form), "text=%FF")).await?;
    invalid_body(base, &post(&echo_path(), Some(form), "te%C3xt=a")).await
}

/// Form values are strings, so a form to the typed `add` (integer
/// fields) → 400 `invalid_params`.
pub async fn form_to_typed_tool(base: &str) -> Result<(), String> {
    let request = post(
        &path("conformance/add/"),
        Some("application/x-www-form-urlencoded"),
        "a=1&b=2",
    );
    expect_error(base, &request, 400, "invalid_params")
        .await
        .map(drop)
}

/// A non-empty body without `Content-Type` is read as JSON.
pub async fn no_content_type_is_json(base: &str) -> Result<(), String> {
    let request = post(&echo_path(), None, r#"{"text": "hi"}"#);
    expect_result(base, &request, json!({"echo": "hi"})).await?;
    let request = post(&echo_path(), None, "text=hi");
    invalid_body(base, &request).await
}

/// An empty body, with any or no content type (even an unsupported one),
/// is `{}`.
pub async fn empty_body_is_empty_object(base: &str) -> Result<(), String> {
    let fail = path("conformance/fail/");
    for ct in [
        None,
        Some("application/json"),
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
        Some("application/json; charset=latin1"),
    ] {
        let request = post(&fail, ct, "");
        expect_error_message(base, &request, 400, "tool_error", "boom").await?;
    }
    let request = post(&echo_path(), Some("application/json"), "");
    let message = expect_error(base, &request, 400, "missing_params").await?;
    check_names(&request, &message, &["text"])
}

/// A POST with neither `Content-Length` nor `Transfer-Encoding` has an
/// empty body: `{}`.
pub async fn post_without_content_length(base: &str) -> Result<(), String> {
    let request = Request::post(path("conformance/fail/")).framing(Framing::Unframed);
    expect_error_message(base, &request, 400, "tool_error", "boom").await
}

/// A body that is not JSON → 400 `invalid_body`.
pub async fn body_not_json(base: &str) -> Result<(), String> {
    for body in [
        r#"{"text": "#,
        "not json",
        r#"{'text': 'hi'}"#,
        r#"{"text": "hi"} trailing"#,
        r#"{"text": "hi"}{}"#,
    ] {
        invalid_body(base, &post(&echo_path(), Some("application/json"), body)).await?;
    }
    Ok(())
}

/// A JSON body that is not an object (array, string, number, `null`,
/// `true`) → 400 `invalid_body`.
pub async fn body_not_object(base: &str) -> Result<(), String> {
    for body in [r#"["text"]"#, r#""text""#, "1", "null", "true"] {
        invalid_body(base, &post(&echo_path(), Some("application/json"), body)).await?;
    }
    Ok(())
}

/// A body that is not UTF-8 → 400 `invalid_body`.
pub async fn body_not_utf8(base: &str) -> Result<(), String> {
    let mut body = br#"{"text": ""#.to_vec();
    body.extend_from_slice(&[0xFF, 0xFE, 0x80]);
    body.extend_from_slice(br#""}"#);
    invalid_body(base, &post(&echo_path(), Some("application/json"), body)).await
}

/// A key repeated at the top of the params object → 400 `invalid_body`
/// (two parsers must never disagree on which value a tool got).
pub async fn duplicate_top_level_key(base: &str) -> Result<(), String> {
    let json = Some("application/json");
    invalid_body(
        base,
        &post(&echo_path(), json, r#"{"text": "a", "text": "b"}"#),
    )
    .await?;
    invalid_body(
        base,
        &post(&echo_path(), json, r#"{"text": "a", "te\u0078t": "b"}"#),
    )
    .await?;
    let secure = path("conformance/secure/");
    invalid_body(
        base,
        &post(&secure, json, r#"{"auth_token": "a", "auth_token": "b"}"#),
    )
    .await
}

fn nested(depth: usize) -> String {
    // `{"text": [[...]]}`: the object is one level, each array one more.
    format!(
        r#"{{"text": {}{}}}"#,
        "[".repeat(depth - 1),
        "]".repeat(depth - 1)
    )
}

/// JSON nested 200 deep (and 10,000 deep) → 400 `invalid_body`, and the
/// server goes on answering.
pub async fn deep_nesting_rejected(base: &str) -> Result<(), String> {
    for depth in [200, 10_000] {
        invalid_body(
            base,
            &post(&echo_path(), Some("application/json"), nested(depth)),
        )
        .await?;
    }
    post_echo(base).await
}

/// JSON nested 100 deep (below the limit of 128) is accepted.
pub async fn moderate_nesting_accepted(base: &str) -> Result<(), String> {
    let body = nested(100);
    let request = post(&echo_path(), Some("application/json"), body.clone());
    let expected: Value =
        serde_json::from_str(&body).map_err(|e| format!("the case's own JSON: {e}"))?;
    expect_result(base, &request, json!({"echo": expected["text"]})).await
}

/// An echo body of exactly `size` bytes: `{"text": "xxx…"}`.
fn padded_echo(size: usize) -> (Vec<u8>, usize) {
    let overhead = br#"{"text":""}"#.len();
    let padding = size - overhead;
    let body = format!(r#"{{"text":"{}"}}"#, "x".repeat(padding));
    (body.into_bytes(), padding)
}

async fn expect_padded_echo(base: &str, request: &Request, padding: usize) -> Result<(), String> {
    let body = expect_json(base, request, 200).await?;
    let echoed = body["result"]["echo"].as_str().map(str::len);
    ensure!(
        echoed == Some(padding),
        "{request}: expected the {padding} bytes of text echoed, got {echoed:?}"
    );
    Ok(())
}

/// A valid JSON body of exactly the limit (1,048,576 bytes) is accepted.
pub async fn body_at_limit_accepted(base: &str) -> Result<(), String> {
    let (body, padding) = padded_echo(BODY_LIMIT);
    let request = post(&echo_path(), Some("application/json"), body);
    expect_padded_echo(base, &request, padding).await
}

/// A body one byte over the limit (1,048,577 bytes) → 413
/// `payload_too_large`.
pub async fn body_over_limit_rejected(base: &str) -> Result<(), String> {
    let (body, _) = padded_echo(BODY_LIMIT + 1);
    let request = post(&echo_path(), Some("application/json"), body);
    expect_error(base, &request, 413, "payload_too_large").await?;
    post_echo(base).await
}

/// A chunked body (no `Content-Length`) is read like any other: accepted
/// at exactly the limit.
pub async fn chunked_body_at_limit_accepted(base: &str) -> Result<(), String> {
    let request =
        post(&echo_path(), Some("application/json"), r#"{"text": "hi"}"#).framing(Framing::Chunked);
    expect_result(base, &request, json!({"echo": "hi"})).await?;
    let (body, padding) = padded_echo(BODY_LIMIT);
    let request = post(&echo_path(), Some("application/json"), body).framing(Framing::Chunked);
    expect_padded_echo(base, &request, padding).await
}

/// A chunked body one byte over the limit → 413 `payload_too_large`.
pub async fn chunked_body_over_limit_rejected(base: &str) -> Result<(), String> {
    let (body, _) = padded_echo(BODY_LIMIT + 1);
    let request = post(&echo_path(), Some("application/json"), body).framing(Framing::Chunked);
    expect_error(base, &request, 413, "payload_too_large")
        .await
        .map(drop)
}

/// The first KiB of a body whose `Content-Length` says more.
///
/// (Not less: Rocket reads up to 14 bytes of every body before routing,
/// to look for a `_method=` override, and waits for them.)
fn partial_body() -> Vec<u8> {
    let mut body = b"{\"text\": \"".to_vec();
    body.resize(1024, b'x');
    body
}

/// A `Content-Length` over the limit → 413 at once, without waiting for
/// the rest of a body that never comes.
pub async fn declared_length_over_limit(base: &str) -> Result<(), String> {
    for declared in [BODY_LIMIT as u64 + 1, 1 << 40] {
        let request = post(&echo_path(), Some("application/json"), partial_body())
            .framing(Framing::Declared(declared));
        expect_error(base, &request, 413, "payload_too_large").await?;
    }
    Ok(())
}

/// Check 6 before 7: an unsupported media type over the limit → 415, not
/// 413 (declared or streamed).
pub async fn order_content_type_before_size(base: &str) -> Result<(), String> {
    let request = post(&echo_path(), Some("text/plain"), partial_body())
        .framing(Framing::Declared(BODY_LIMIT as u64 + 1));
    expect_error(base, &request, 415, "unsupported_media_type").await?;
    let request = post(&echo_path(), Some("text/plain"), vec![b'x'; BODY_LIMIT + 1]);
    expect_error(base, &request, 415, "unsupported_media_type").await?;
    let request = post(&echo_path(), Some("text/plain"), vec![b'x'; BODY_LIMIT + 1])
        .framing(Framing::Chunked);
    expect_error(base, &request, 415, "unsupported_media_type")
        .await
        .map(drop)
}

/// Check 7 before 8: invalid JSON over the limit → 413, not 400.
pub async fn order_size_before_body(base: &str) -> Result<(), String> {
    let request = post(
        &echo_path(),
        Some("application/json"),
        vec![b'x'; BODY_LIMIT + 1],
    );
    expect_error(base, &request, 413, "payload_too_large")
        .await
        .map(drop)
}

/// Check 8 before 9: a bad body to a tool that needs a token → 400
/// `invalid_body`, not 401.
pub async fn order_body_before_auth(base: &str) -> Result<(), String> {
    let secure = path("conformance/secure/");
    invalid_body(base, &post(&secure, Some("application/json"), "{")).await?;
    invalid_body(base, &post(&secure, Some("application/json"), "[]")).await
}
