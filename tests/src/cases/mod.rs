//! The cases: one function per behaviour of docs/PROTOCOL.md §3, each
//! `pub async fn name(base: &str) -> Result<(), String>`, run against a
//! server that serves the [fixture](crate::fixture()) at `base`
//! (`http://HOST:PORT`, the prefix `/atp` below it).
//!
//! A case returns `Err` with what was expected and what came back. Every
//! answer a case reads is also checked to be `Content-Type:
//! application/json`, and every error answer to be exactly
//! `{"error": MESSAGE, "code": CODE}` with a non-empty message.
//!
//! The list of all cases is [`all_cases`](crate::all_cases).

mod body;
mod call;
mod expected;
mod mcp;
mod read;
mod routing;

use serde_json::Value;

pub use self::{body::*, call::*, mcp::*, read::*, routing::*};
use crate::client::{self, Request, Response, preview};

/// The prefix the fixture is served under.
pub(crate) const PREFIX: &str = "/atp";

/// `/atp/{rest}`.
pub(crate) fn path(rest: &str) -> String {
    format!("{PREFIX}/{rest}")
}

/// Returns `Err(format!(...))` from the case unless `cond` holds.
macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}
pub(crate) use ensure;

/// Sends `request`.
pub(crate) async fn send(base: &str, request: &Request) -> Result<Response, String> {
    client::send(base, request).await
}

/// `status BODY-PREVIEW`, for messages.
pub(crate) fn describe(response: &Response) -> String {
    format!("{} {}", response.status, preview(&response.text()))
}

/// Checks `Content-Type: application/json` (its essence, in any case;
/// parameters such as `charset=utf-8` are allowed).
pub(crate) fn check_json_content_type(
    request: &Request,
    response: &Response,
) -> Result<(), String> {
    let content_type = response.header("content-type");
    let essence = content_type
        .and_then(|ct| ct.split(';').next())
        .map(str::trim);
    ensure!(
        essence.is_some_and(|e| e.eq_ignore_ascii_case("application/json")),
        "{request}: expected Content-Type: application/json, got {content_type:?} ({})",
        describe(response)
    );
    Ok(())
}

/// Sends `request`, checks the status and the content type, and returns
/// the JSON body.
pub(crate) async fn expect_json(
    base: &str,
    request: &Request,
    status: u16,
) -> Result<Value, String> {
    let response = send(base, request).await?;
    check_status(request, &response, status)?;
    check_json_content_type(request, &response)?;
    response.json().map_err(|e| format!("{request}: {e}"))
}

/// Checks the status.
pub(crate) fn check_status(
    request: &Request,
    response: &Response,
    status: u16,
) -> Result<(), String> {
    ensure!(
        response.status == status,
        "{request}: expected status {status}, got {}",
        describe(response)
    );
    Ok(())
}

/// Sends `request` and checks for exactly `status` and `expected` (as JSON).
pub(crate) async fn expect_body(
    base: &str,
    request: &Request,
    status: u16,
    expected: &Value,
) -> Result<(), String> {
    let body = expect_json(base, request, status).await?;
    check_equal(request, &body, expected)
}

/// Checks that two JSON values are equal.
pub(crate) fn check_equal(request: &Request, got: &Value, expected: &Value) -> Result<(), String> {
    ensure!(
        got == expected,
        "{request}: expected the body\n  {}\ngot\n  {}",
        preview(&expected.to_string()),
        preview(&got.to_string())
    );
    Ok(())
}

/// Sends `request` and checks for `200 {"result": expected}`.
pub(crate) async fn expect_result(
    base: &str,
    request: &Request,
    expected: Value,
) -> Result<(), String> {
    expect_body(
        base,
        request,
        200,
        &serde_json::json!({ "result": expected }),
    )
    .await
}

/// Checks that `body` is exactly `{"error": MESSAGE, "code": code}` with a
/// non-empty message, and returns the message.
pub(crate) fn check_error_body(
    request: &Request,
    body: &Value,
    code: &str,
) -> Result<String, String> {
    let shape_ok = body.as_object().is_some_and(|o| {
        o.len() == 2 && o.get("error").is_some_and(Value::is_string) && o.contains_key("code")
    });
    ensure!(
        shape_ok,
        "{request}: expected an error body {{\"error\": MESSAGE, \"code\": {code:?}}}, got {}",
        preview(&body.to_string())
    );
    ensure!(
        body["code"] == code,
        "{request}: expected code {code:?}, got {} (body {})",
        body["code"],
        preview(&body.to_string())
    );
    let message = body["error"].as_str().unwrap_or_default().to_owned();
    ensure!(
        !message.trim().is_empty(),
        "{request}: the error message is empty"
    );
    Ok(message)
}

/// Sends `request` and checks for the error `status` / `code`; returns the
/// message.
pub(crate) async fn expect_error(
    base: &str,
    request: &Request,
    status: u16,
    code: &str,
) -> Result<String, String> {
    let body = expect_json(base, request, status).await?;
    check_error_body(request, &body, code)
}

/// Sends `request` and checks for the error `status` / `code` with exactly
/// `message`.
pub(crate) async fn expect_error_message(
    base: &str,
    request: &Request,
    status: u16,
    code: &str,
    message: &str,
) -> Result<(), String> {
    let got = expect_error(base, request, status, code).await?;
    ensure!(
        got == message,
        "{request}: expected the message {message:?}, got {got:?}"
    );
    Ok(())
}

/// Whether `message` names `name` as a whole word (names are made of
/// `A-Z a-z 0-9 _ -`). (Public for the conformance suite's own tests only.)
#[doc(hidden)]
pub fn names(message: &str, name: &str) -> bool {
    message
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))
        .any(|word| word == name)
}

/// Checks that `message` names every one of `expected`.
pub(crate) fn check_names(
    request: &Request,
    message: &str,
    expected: &[&str],
) -> Result<(), String> {
    let absent: Vec<&str> = expected
        .iter()
        .copied()
        .filter(|n| !names(message, n))
        .collect();
    ensure!(
        absent.is_empty(),
        "{request}: expected the message to name {expected:?}, but {absent:?} are absent from {message:?}"
    );
    Ok(())
}

/// Sends `request` and checks for `405 method_not_allowed` with an `Allow`
/// header listing exactly `allow` (in any order).
pub(crate) async fn expect_method_not_allowed(
    base: &str,
    request: &Request,
    allow: &[&str],
) -> Result<(), String> {
    let response = send(base, request).await?;
    check_status(request, &response, 405)?;
    check_json_content_type(request, &response)?;
    let body = response.json().map_err(|e| format!("{request}: {e}"))?;
    check_error_body(request, &body, "method_not_allowed")?;
    check_allow(request, &response, allow)
}

/// Checks the `Allow` header: exactly the methods in `allow`, in any order.
pub(crate) fn check_allow(
    request: &Request,
    response: &Response,
    allow: &[&str],
) -> Result<(), String> {
    let header = response.header_all("allow").join(",");
    let mut got: Vec<&str> = header
        .split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .collect();
    got.sort_unstable();
    let mut want = allow.to_vec();
    want.sort_unstable();
    ensure!(
        got == want,
        "{request}: expected Allow: {}, got {:?}",
        allow.join(", "),
        response.header("allow")
    );
    Ok(())
}
