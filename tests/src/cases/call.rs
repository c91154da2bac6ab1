//! Tool calls: params, typed tools, auth tokens, and what handlers do
//! (errors, panics, slowness, blocking, timeouts).

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::{check_names, ensure, expect_error, expect_error_message, expect_result, path};
use crate::client::Request;

fn call(tool: &str, params: Value) -> Request {
    Request::post_json(path(&format!("conformance/{tool}/")), &params)
}

async fn missing(base: &str, request: &Request, names: &[&str]) -> Result<(), String> {
    let message = expect_error(base, request, 400, "missing_params").await?;
    check_names(request, &message, names)
}

async fn unknown(base: &str, request: &Request, names: &[&str]) -> Result<(), String> {
    let message = expect_error(base, request, 400, "unknown_params").await?;
    check_names(request, &message, names)
}

async fn invalid_params(base: &str, request: &Request) -> Result<(), String> {
    expect_error(base, request, 400, "invalid_params")
        .await
        .map(drop)
}

async fn auth_required(base: &str, request: &Request) -> Result<(), String> {
    expect_error(base, request, 401, "auth_required")
        .await
        .map(drop)
}

async fn token_length(base: &str, request: &Request, length: usize) -> Result<(), String> {
    expect_result(base, request, json!({"token_length": length})).await
}

/// A required param absent → 400 `missing_params`, the message naming
/// every missing one.
pub async fn missing_params_named(base: &str) -> Result<(), String> {
    missing(base, &call("echo", json!({})), &["text"]).await?;
    missing(base, &call("add", json!({})), &["a", "b"]).await?;
    missing(base, &call("optional", json!({"b": 1})), &["a"]).await
}

/// A required param that is `null` counts as absent → `missing_params`.
pub async fn null_required_param_is_missing(base: &str) -> Result<(), String> {
    missing(base, &call("echo", json!({"text": null})), &["text"]).await?;
    missing(base, &call("hello_world", json!({"name": null})), &["name"]).await
}

/// An optional param may be absent or `null`.
pub async fn optional_param_absent_or_null(base: &str) -> Result<(), String> {
    let expected = json!({"a": 1, "b": null});
    expect_result(base, &call("optional", json!({"a": 1})), expected.clone()).await?;
    expect_result(
        base,
        &call("optional", json!({"a": 1, "b": null})),
        expected,
    )
    .await?;
    let request = call("optional", json!({"a": "x", "b": [1]}));
    expect_result(base, &request, json!({"a": "x", "b": [1]})).await
}

/// A param the tool does not declare → 400 `unknown_params`, the message
/// naming every unknown one (also for a tool with no params).
pub async fn unknown_params_named(base: &str) -> Result<(), String> {
    let request = call("optional", json!({"a": 1, "zz_one": 1, "zz_two": 2}));
    unknown(base, &request, &["zz_one", "zz_two"]).await?;
    unknown(base, &call("fail", json!({"zz_one": 1})), &["zz_one"]).await
}

/// Check 10: missing params win over unknown ones (`missing_params`), and
/// the message names both sets.
pub async fn order_missing_before_unknown(base: &str) -> Result<(), String> {
    missing(
        base,
        &call("echo", json!({"zz_extra": 1})),
        &["text", "zz_extra"],
    )
    .await?;
    missing(
        base,
        &call("add", json!({"a": 1, "zz_extra": 1})),
        &["b", "zz_extra"],
    )
    .await
}

/// Untyped params take any JSON value; the tool decides.
pub async fn untyped_params_take_any_json(base: &str) -> Result<(), String> {
    for value in [
        json!({"k": [1, true, null]}),
        json!(5),
        json!(true),
        json!(""),
        json!([]),
    ] {
        let request = call("echo", json!({ "text": value }));
        expect_result(base, &request, json!({ "echo": value })).await?;
    }
    Ok(())
}

/// `auth_token` in the body is the call's token, not a param: a tool
/// without auth takes it without `unknown_params`.
pub async fn auth_token_is_not_a_param(base: &str) -> Result<(), String> {
    let request = call("echo", json!({"text": "a", "auth_token": "tok-0d9a"}));
    expect_result(base, &request, json!({"echo": "a"})).await?;
    let request = call("fail", json!({"auth_token": "tok-0d9a"}));
    expect_error_message(base, &request, 400, "tool_error", "boom").await
}

/// The typed `add`: `{"a": 2, "b": 3}` → `{"sum": 5}`, at the ends of the
/// `i64` range too.
pub async fn typed_add(base: &str) -> Result<(), String> {
    expect_result(
        base,
        &call("add", json!({"a": 2, "b": 3})),
        json!({"sum": 5}),
    )
    .await?;
    expect_result(
        base,
        &call("add", json!({"a": -7, "b": 7})),
        json!({"sum": 0}),
    )
    .await?;
    let request = call("add", json!({"a": i64::MAX, "b": -1}));
    expect_result(base, &request, json!({"sum": i64::MAX - 1})).await?;
    let request = call("add", json!({"a": i64::MIN, "b": 0}));
    expect_result(base, &request, json!({"sum": i64::MIN})).await
}

/// A field of the typed tool absent or `null` → `missing_params`.
pub async fn typed_missing_field(base: &str) -> Result<(), String> {
    missing(base, &call("add", json!({"a": 1})), &["b"]).await?;
    missing(base, &call("add", json!({"a": 1, "b": null})), &["b"]).await
}

/// A field the typed tool's type does not have → `unknown_params`.
pub async fn typed_unknown_field(base: &str) -> Result<(), String> {
    unknown(base, &call("add", json!({"a": 1, "b": 2, "c": 3})), &["c"]).await
}

/// An `i64` overflow → 400 `invalid_params`.
pub async fn typed_i64_overflow(base: &str) -> Result<(), String> {
    for body in [
        r#"{"a": 9223372036854775808, "b": 1}"#,
        r#"{"a": 1, "b": -9223372036854775809}"#,
        r#"{"a": 18446744073709551616, "b": 1}"#,
        r#"{"a": 1e30, "b": 1}"#,
    ] {
        let request = Request::post(path("conformance/add/"))
            .header("Content-Type", "application/json")
            .body(body);
        invalid_params(base, &request).await?;
    }
    Ok(())
}

/// A value of the wrong type for the typed tool → 400 `invalid_params`.
pub async fn typed_wrong_type(base: &str) -> Result<(), String> {
    for a in [json!("1"), json!(1.5), json!(true), json!([1]), json!({})] {
        invalid_params(base, &call("add", json!({"a": a, "b": 1}))).await?;
    }
    Ok(())
}

/// Check 10: unknown params win over invalid ones (`unknown_params`).
pub async fn order_unknown_before_invalid(base: &str) -> Result<(), String> {
    let request = call("add", json!({"a": "x", "b": 1, "zz_extra": 1}));
    unknown(base, &request, &["zz_extra"]).await
}

/// A tool with `auth_provider` / `auth_type` and no token → 401
/// `auth_required`.
pub async fn auth_required_without_token(base: &str) -> Result<(), String> {
    auth_required(base, &call("secure", json!({}))).await?;
    auth_required(base, &Request::post(path("conformance/secure/"))).await
}

/// Check 9 before 10: no token and unknown params → 401, not 400.
pub async fn order_auth_before_params(base: &str) -> Result<(), String> {
    auth_required(base, &call("secure", json!({"zz_extra": 1}))).await
}

/// The token in the body (`auth_token`, JSON or form) reaches the tool.
pub async fn auth_token_in_body(base: &str) -> Result<(), String> {
    token_length(base, &call("secure", json!({"auth_token": "abc123"})), 6).await?;
    let request = Request::post(path("conformance/secure/"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("auth_token=abc");
    token_length(base, &request, 3).await
}

/// `Authorization: Bearer TOKEN` supplies the token.
pub async fn auth_bearer_header(base: &str) -> Result<(), String> {
    let request = call("secure", json!({})).header("Authorization", "Bearer abcd");
    token_length(base, &request, 4).await?;
    let request = Request::post(path("conformance/secure/")).header("Authorization", "Bearer abcd");
    token_length(base, &request, 4).await
}

/// The `Bearer` scheme is matched in any case (`bearer`, `BEARER`).
pub async fn auth_bearer_any_case(base: &str) -> Result<(), String> {
    for scheme in ["bearer", "BEARER", "BeArEr"] {
        let request = call("secure", json!({})).header("Authorization", format!("{scheme} abcd"));
        token_length(base, &request, 4).await?;
    }
    Ok(())
}

/// Any other scheme (`Basic …`), a bare value, or `Bearer` without a token
/// is no token → 401.
pub async fn auth_other_scheme_is_no_token(base: &str) -> Result<(), String> {
    for value in [
        "Basic dXNlcjpwYXNz",
        "Token abcd",
        "abcd",
        "Bearer",
        "Bearer ",
    ] {
        let request = call("secure", json!({})).header("Authorization", value);
        auth_required(base, &request).await?;
    }
    Ok(())
}

/// An empty or `null` body token, without a header, is no token → 401.
pub async fn auth_empty_token_is_no_token(base: &str) -> Result<(), String> {
    auth_required(base, &call("secure", json!({"auth_token": ""}))).await?;
    auth_required(base, &call("secure", json!({"auth_token": null}))).await
}

/// An empty or `null` body token falls back to the `Authorization` header.
pub async fn auth_empty_body_token_falls_back_to_header(base: &str) -> Result<(), String> {
    for token in [json!(""), Value::Null] {
        let request =
            call("secure", json!({ "auth_token": token })).header("Authorization", "Bearer abcd");
        token_length(base, &request, 4).await?;
    }
    Ok(())
}

/// A non-empty body token wins over the header.
pub async fn auth_body_token_wins_over_header(base: &str) -> Result<(), String> {
    let request =
        call("secure", json!({"auth_token": "xy"})).header("Authorization", "Bearer abcdef");
    token_length(base, &request, 2).await
}

/// `auth_token` that is not a string → 400 `invalid_body`, for tools with
/// and without auth.
pub async fn auth_token_not_string_is_invalid_body(base: &str) -> Result<(), String> {
    for token in [json!(123), json!(true), json!({"t": "x"}), json!(["x"])] {
        let request = call("secure", json!({ "auth_token": token }));
        expect_error(base, &request, 400, "invalid_body").await?;
        let request = call("echo", json!({ "text": "a", "auth_token": token }));
        expect_error(base, &request, 400, "invalid_body").await?;
    }
    Ok(())
}

/// A token never appears in an answer: not in a result, an error about
/// the params, a tool error, or a bad body's message.
pub async fn auth_token_never_echoed(base: &str) -> Result<(), String> {
    const TOKEN: &str = "tok-SECRET-5f1c2a";
    let bearer = format!("Bearer {TOKEN}");
    let requests = [
        call("secure", json!({"auth_token": TOKEN})),
        call("secure", json!({})).header("Authorization", bearer.as_str()),
        call("secure", json!({"auth_token": TOKEN, "zz_extra": 1})),
        call("secure", json!({"zz_extra": 1})).header("Authorization", bearer.as_str()),
        call("echo", json!({"auth_token": TOKEN})),
        call("fail", json!({"auth_token": TOKEN})),
        call("add", json!({"a": "x", "b": 1})).header("Authorization", bearer.as_str()),
        Request::post(path("conformance/secure/"))
            .header("Content-Type", "application/json")
            .body(format!(r#"{{"auth_token": "{TOKEN}", }}"#)),
        Request::post(path("conformance/secure/"))
            .header("Content-Type", "application/json")
            .body(format!(
                r#"{{"auth_token": "{TOKEN}", "auth_token": "{TOKEN}"}}"#
            )),
    ];
    for request in requests {
        let response = super::send(base, &request).await?;
        super::check_json_content_type(&request, &response)?;
        ensure!(
            !response.text().contains(TOKEN) && !response.text().contains("SECRET"),
            "{request}: the answer contains the token: {}",
            super::describe(&response)
        );
    }
    Ok(())
}

/// A handler's error → 400 `tool_error` with the handler's message
/// (`boom`).
pub async fn tool_error_message(base: &str) -> Result<(), String> {
    expect_error_message(base, &call("fail", json!({})), 400, "tool_error", "boom").await
}

/// A handler's panic → 500 `tool_panicked`; the panic text is not sent.
pub async fn tool_panic_hides_detail(base: &str) -> Result<(), String> {
    let request = call("panic", json!({}));
    let response = super::send(base, &request).await?;
    ensure!(
        !response.text().contains("secret"),
        "{request}: the answer shows the panic text: {}",
        super::describe(&response)
    );
    super::check_status(&request, &response, 500)?;
    super::check_json_content_type(&request, &response)?;
    let body = response.json().map_err(|e| format!("{request}: {e}"))?;
    super::check_error_body(&request, &body, "tool_panicked").map(drop)
}

/// After panics (one after another and alongside other calls), the
/// server answers normally.
pub async fn server_survives_panics(base: &str) -> Result<(), String> {
    for _ in 0..3 {
        expect_error(base, &call("panic", json!({})), 500, "tool_panicked").await?;
    }
    let echo = call("echo", json!({"text": "after"}));
    expect_result(base, &echo, json!({"echo": "after"})).await?;
    let mut set = JoinSet::new();
    for i in 0..6 {
        let base = base.to_owned();
        set.spawn(async move {
            if i % 2 == 0 {
                expect_error(&base, &call("panic", json!({})), 500, "tool_panicked")
                    .await
                    .map(drop)
            } else {
                let request = call("echo", json!({ "text": i }));
                expect_result(&base, &request, json!({ "echo": i })).await
            }
        });
    }
    join_all(set).await?;
    expect_result(base, &echo, json!({"echo": "after"})).await
}

/// Awaits every task of `set`; the first error wins.
async fn join_all<T: 'static>(mut set: JoinSet<Result<T, String>>) -> Result<Vec<T>, String> {
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        out.push(joined.map_err(|e| format!("a request task failed: {e}"))??);
    }
    Ok(out)
}

/// `slow` (an async handler) answers; `ms` as a number or a numeric
/// string.
pub async fn slow_tool_answers(base: &str) -> Result<(), String> {
    expect_result(base, &call("slow", json!({"ms": 20})), json!({"slept": 20})).await?;
    expect_result(
        base,
        &call("slow", json!({"ms": "20"})),
        json!({"slept": 20}),
    )
    .await
}

/// `blocking` (a blocking handler) answers.
pub async fn blocking_tool_answers(base: &str) -> Result<(), String> {
    expect_result(
        base,
        &call("blocking", json!({"ms": 20})),
        json!({"slept": 20}),
    )
    .await?;
    expect_result(
        base,
        &call("blocking", json!({"ms": "20"})),
        json!({"slept": 20}),
    )
    .await
}

/// Sends `request` and expects `504 tool_timeout` at the toolkit's
/// timeout (1 s), before the handler would finish (3 s; the bound allows
/// for a loaded machine).
async fn expect_timeout(base: &str, request: &Request) -> Result<(), String> {
    let started = Instant::now();
    expect_error(base, request, 504, "tool_timeout").await?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_millis(900),
        "{request}: the timeout of 1000 ms answered after only {elapsed:?}"
    );
    ensure!(
        elapsed < Duration::from_millis(3000),
        "{request}: the timeout of 1000 ms answered only after {elapsed:?} (the tool takes 3000 ms)"
    );
    Ok(())
}

/// An async handler past the toolkit's timeout → 504 `tool_timeout`, at
/// the timeout.
pub async fn tool_timeout(base: &str) -> Result<(), String> {
    expect_timeout(base, &call("slow", json!({"ms": 3000}))).await
}

/// A blocking handler past the timeout → 504 `tool_timeout` at the
/// timeout too (its thread finishes in the background), and the server
/// goes on answering.
pub async fn blocking_tool_timeout(base: &str) -> Result<(), String> {
    expect_timeout(base, &call("blocking", json!({"ms": 3000}))).await?;
    let request = call("echo", json!({"text": "after"}));
    expect_result(base, &request, json!({"echo": "after"})).await
}

/// A slow tool does not hold up other calls: 8 parallel calls of `slow`
/// (400 ms each) finish together, far sooner than one after another
/// (3.2 s).
pub async fn slow_tools_run_concurrently(base: &str) -> Result<(), String> {
    const CALLS: u32 = 8;
    const MS: u64 = 400;
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..CALLS {
        let base = base.to_owned();
        set.spawn(async move {
            let request = call("slow", json!({ "ms": MS }));
            expect_result(&base, &request, json!({ "slept": MS })).await
        });
    }
    join_all(set).await?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_millis(MS),
        "{CALLS} calls of slow {MS} ms finished after only {elapsed:?}"
    );
    ensure!(
        elapsed < Duration::from_millis(2800),
        "{CALLS} parallel calls of slow {MS} ms took {elapsed:?}: they ran one after another ({} ms)",
        MS * u64::from(CALLS)
    );
    Ok(())
}

/// A blocking tool does not stall the server: while 4 calls of `blocking`
/// (800 ms each, more than the server has executor threads) run, other
/// calls are answered quickly (each under 700 ms: a call stalled behind
/// the blocking ones would wait for one to end, close to 800 ms).
pub async fn blocking_tool_does_not_stall_server(base: &str) -> Result<(), String> {
    const CALLS: usize = 4;
    const MS: u64 = 800;
    // Not dropped for `answered_meanwhile` alone: quick calls answered
    // before the blocking ones reach the server count there too.
    const QUICK: Duration = Duration::from_millis(700);
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..CALLS {
        let base = base.to_owned();
        let done = done.clone();
        set.spawn(async move {
            let request = call("blocking", json!({ "ms": MS }));
            let outcome = expect_result(&base, &request, json!({ "slept": MS })).await;
            done.fetch_add(1, Ordering::SeqCst);
            outcome
        });
    }
    // Quick calls, one after another, for as long as every blocking call
    // is in flight.
    let mut answered_meanwhile = 0;
    let mut slowest = Duration::ZERO;
    while done.load(Ordering::SeqCst) == 0 && started.elapsed() < Duration::from_secs(10) {
        let sent = Instant::now();
        let request = call("echo", json!({"text": "quick"}));
        expect_result(base, &request, json!({"echo": "quick"})).await?;
        let took = sent.elapsed();
        slowest = slowest.max(took);
        if done.load(Ordering::SeqCst) == 0 {
            answered_meanwhile += 1;
        }
    }
    join_all(set).await?;
    let elapsed = started.elapsed();
    ensure!(
        elapsed >= Duration::from_millis(MS),
        "{CALLS} calls of blocking {MS} ms finished after only {elapsed:?}"
    );
    ensure!(
        slowest < QUICK,
        "while {CALLS} blocking calls of {MS} ms ran, a quick call took {slowest:?} (limit {QUICK:?}): blocking handlers stall the server"
    );
    ensure!(
        answered_meanwhile >= 2,
        "only {answered_meanwhile} quick calls were answered while the blocking calls ran"
    );
    Ok(())
}
