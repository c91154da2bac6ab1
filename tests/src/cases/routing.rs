//! Paths, methods, the endpoint key, and the order of the checks.

use serde_json::json;

use super::{
    ensure, expect_body, expect_error, expect_error_message, expect_method_not_allowed,
    expect_result, expected, path, send,
};
use crate::{client::Request, fixture::ENDPOINT_KEY};

const ALLOW_READ: &[&str] = &["GET", "HEAD"];
const ALLOW_TOOL: &[&str] = &["GET", "HEAD", "POST"];

async fn toolkit_not_found(base: &str, request: &Request) -> Result<(), String> {
    expect_error_message(base, request, 404, "toolkit_not_found", "Toolkit not found").await
}

async fn tool_not_found(base: &str, request: &Request) -> Result<(), String> {
    expect_error_message(base, request, 404, "tool_not_found", "Tool not found").await
}

fn echo_call(target: impl Into<String>) -> Request {
    Request::post_json(target, &json!({"text": "hi"}))
}

/// An unknown toolkit → 404 `toolkit_not_found`, `Toolkit not found`,
/// with and without the trailing slash.
pub async fn unknown_toolkit(base: &str) -> Result<(), String> {
    toolkit_not_found(base, &Request::get(path("nope/"))).await?;
    toolkit_not_found(base, &Request::get(path("nope"))).await
}

/// An unknown toolkit on a tool path → 404 `toolkit_not_found`, for GET
/// and POST (even when the tool name exists elsewhere).
pub async fn unknown_toolkit_on_tool_path(base: &str) -> Result<(), String> {
    toolkit_not_found(base, &Request::get(path("nope/echo/"))).await?;
    toolkit_not_found(base, &echo_call(path("nope/echo/"))).await?;
    toolkit_not_found(base, &echo_call(path("nope/echo"))).await
}

/// An unknown tool → 404 `tool_not_found`, `Tool not found`, for GET and
/// POST, with and without the trailing slash.
pub async fn unknown_tool(base: &str) -> Result<(), String> {
    tool_not_found(base, &Request::get(path("conformance/nope/"))).await?;
    tool_not_found(base, &Request::get(path("conformance/nope"))).await?;
    tool_not_found(base, &echo_call(path("conformance/nope/"))).await?;
    tool_not_found(base, &echo_call(path("conformance/nope"))).await
}

/// Tool and toolkit names are case-sensitive: `ECHO` and `Conformance`
/// match nothing.
pub async fn names_are_case_sensitive(base: &str) -> Result<(), String> {
    tool_not_found(base, &Request::get(path("conformance/ECHO/"))).await?;
    toolkit_not_found(base, &Request::get(path("Conformance/"))).await
}

/// A path with more segments than `/{toolkit}/{tool}/` → 404 `not_found`,
/// whatever the method.
pub async fn extra_path_segments_not_found(base: &str) -> Result<(), String> {
    for target in [
        path("conformance/echo/extra/"),
        path("conformance/echo/extra"),
        path("nope/echo/extra/"),
        path("a/b/c/d/"),
    ] {
        expect_error(base, &Request::get(&target), 404, "not_found").await?;
        expect_error(base, &echo_call(&target), 404, "not_found").await?;
    }
    Ok(())
}

/// A path with an empty segment (`//`) → 404 `not_found`.
pub async fn empty_path_segments_not_found(base: &str) -> Result<(), String> {
    for target in [
        "/atp//".to_owned(),
        path("/conformance/"),
        path("conformance//"),
        path("conformance//echo/"),
        path("conformance/echo//"),
    ] {
        expect_error(base, &Request::get(&target), 404, "not_found").await?;
    }
    expect_error(
        base,
        &echo_call(path("conformance//echo/")),
        404,
        "not_found",
    )
    .await?;
    Ok(())
}

/// Path segments are percent-decoded before lookup: `%65cho` is `echo`,
/// `%63onformance` is `conformance`.
pub async fn percent_encoded_names(base: &str) -> Result<(), String> {
    let request = Request::get(path("%63onformance/%65cho/"));
    expect_body(base, &request, 200, &expected::tool_context("echo")).await?;
    let request = echo_call(path("conformance/%65cho/"));
    expect_result(base, &request, json!({"echo": "hi"})).await?;
    let request = Request::get(path("%63onformance/"));
    let body = super::expect_json(base, &request, 200).await?;
    ensure!(
        body["toolkit"] == "conformance",
        "{request}: expected the decoded name \"conformance\" in \"toolkit\", got {}",
        body["toolkit"]
    );
    Ok(())
}

/// An encoded slash is not a separator: `ec%2Fho` → `tool_not_found`,
/// `conformance%2Fecho` → `toolkit_not_found`.
pub async fn encoded_slash_matches_nothing(base: &str) -> Result<(), String> {
    tool_not_found(base, &Request::get(path("conformance/ec%2Fho/"))).await?;
    tool_not_found(base, &echo_call(path("conformance/ec%2Fho/"))).await?;
    toolkit_not_found(base, &Request::get(path("conformance%2Fecho/"))).await
}

/// A segment that does not decode to a valid name (`%ZZ`, `%FF`, a lone
/// `%`) → `toolkit_not_found` / `tool_not_found`.
pub async fn undecodable_segments_match_nothing(base: &str) -> Result<(), String> {
    for segment in ["%ZZ", "%FF", "ec%FFho", "%"] {
        toolkit_not_found(base, &Request::get(path(&format!("{segment}/")))).await?;
        toolkit_not_found(base, &Request::get(path(&format!("{segment}/echo/")))).await?;
        tool_not_found(
            base,
            &Request::get(path(&format!("conformance/{segment}/"))),
        )
        .await?;
        tool_not_found(base, &echo_call(path(&format!("conformance/{segment}/")))).await?;
    }
    Ok(())
}

/// Names longer than allowed (a 65-character tool, a 129-character
/// toolkit) match nothing.
pub async fn overlong_names_match_nothing(base: &str) -> Result<(), String> {
    let tool = "e".repeat(65);
    tool_not_found(base, &Request::get(path(&format!("conformance/{tool}/")))).await?;
    let toolkit = "c".repeat(129);
    toolkit_not_found(base, &Request::get(path(&format!("{toolkit}/")))).await
}

/// `/atp/` takes GET and HEAD only: POST, PUT, DELETE, PATCH, OPTIONS →
/// 405 with `Allow: GET, HEAD`, with and without the trailing slash.
pub async fn method_not_allowed_on_root(base: &str) -> Result<(), String> {
    for target in ["/atp/", "/atp"] {
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let request = Request::new(method, target);
            expect_method_not_allowed(base, &request, ALLOW_READ).await?;
        }
    }
    Ok(())
}

/// A toolkit path takes GET and HEAD only: `POST /atp/conformance/` and
/// the rest → 405 with `Allow: GET, HEAD`.
pub async fn method_not_allowed_on_toolkit(base: &str) -> Result<(), String> {
    for target in [path("conformance/"), path("conformance")] {
        for method in ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"] {
            let request = Request::new(method, &target);
            expect_method_not_allowed(base, &request, ALLOW_READ).await?;
        }
    }
    // With a JSON body too.
    let request = echo_call(path("conformance/"));
    expect_method_not_allowed(base, &request, ALLOW_READ).await
}

/// A tool path takes GET, HEAD and POST: PUT, DELETE, PATCH, OPTIONS →
/// 405 with `Allow: GET, HEAD, POST`.
pub async fn method_not_allowed_on_tool(base: &str) -> Result<(), String> {
    for target in [path("conformance/echo/"), path("conformance/echo")] {
        for method in ["PUT", "DELETE", "PATCH", "OPTIONS"] {
            let request = Request::new(method, &target);
            expect_method_not_allowed(base, &request, ALLOW_TOOL).await?;
        }
    }
    Ok(())
}

/// CORS preflight is not ATP's job: `OPTIONS` with `Origin` and
/// `Access-Control-Request-Method` → 405 like any `OPTIONS`.
pub async fn options_preflight_is_405(base: &str) -> Result<(), String> {
    let request = Request::new("OPTIONS", path("conformance/echo/"))
        .header("Origin", "http://example.test")
        .header("Access-Control-Request-Method", "POST");
    expect_method_not_allowed(base, &request, ALLOW_TOOL).await
}

/// Check 1 before all: a bad path shape → `not_found` whatever the method.
pub async fn order_path_shape_before_method(base: &str) -> Result<(), String> {
    for method in ["DELETE", "OPTIONS", "PUT"] {
        let request = Request::new(method, path("a/b/c/"));
        expect_error(base, &request, 404, "not_found").await?;
    }
    Ok(())
}

/// Check 2 before 5: an unknown toolkit → `toolkit_not_found` whatever the
/// method.
pub async fn order_toolkit_before_method(base: &str) -> Result<(), String> {
    toolkit_not_found(base, &Request::new("DELETE", path("nope/"))).await?;
    toolkit_not_found(base, &Request::new("POST", path("nope/"))).await?;
    toolkit_not_found(base, &Request::new("OPTIONS", path("nope/echo/"))).await
}

/// Check 4 before 5: an unknown tool → `tool_not_found` whatever the
/// method.
pub async fn order_tool_before_method(base: &str) -> Result<(), String> {
    tool_not_found(base, &Request::new("DELETE", path("conformance/nope/"))).await?;
    tool_not_found(base, &Request::new("PUT", path("conformance/nope/"))).await
}

/// Check 5 before 6: a wrong method with an unsupported body → 405, not
/// 415.
pub async fn order_method_before_content_type(base: &str) -> Result<(), String> {
    let request = Request::new("PUT", path("conformance/echo/"))
        .header("Content-Type", "text/plain")
        .body("hello");
    expect_method_not_allowed(base, &request, ALLOW_TOOL).await
}

/// Without the endpoint key, every route of a locked toolkit → 401
/// `unauthorized`: its context, a tool's context, a call, HEAD.
pub async fn locked_without_key(base: &str) -> Result<(), String> {
    for request in [
        Request::get(path("locked/")),
        Request::get(path("locked")),
        Request::get(path("locked/?provider=openai")),
        Request::get(path("locked/echo/")),
        echo_call(path("locked/echo/")),
        echo_call(path("locked/echo")),
    ] {
        expect_error(base, &request, 401, "unauthorized").await?;
    }
    let request = Request::head(path("locked/"));
    let response = send(base, &request).await?;
    super::check_status(&request, &response, 401)
}

/// With a wrong endpoint key (also an empty one, a prefix of the right
/// one, the right one in another case) → 401 `unauthorized`, and the key
/// sent is not echoed.
pub async fn locked_wrong_key(base: &str) -> Result<(), String> {
    for key in [
        "wrong-key-7d1e",
        "",
        "conformance-ke",
        "conformance-key-and-more",
        "CONFORMANCE-KEY",
    ] {
        for request in [
            Request::get(path("locked/")),
            echo_call(path("locked/echo/")),
        ] {
            let request = request.header("X-ATP-Key", key);
            let message = expect_error(base, &request, 401, "unauthorized").await?;
            ensure!(
                key.len() < 4 || !message.contains(key),
                "{request}: the message echoes the key sent: {message:?}"
            );
        }
    }
    Ok(())
}

/// With the right endpoint key (header name in any case) the locked
/// toolkit answers: its context, its tool's context, a call.
pub async fn locked_with_key(base: &str) -> Result<(), String> {
    let request = Request::get(path("locked/")).header("X-ATP-Key", ENDPOINT_KEY);
    expect_body(base, &request, 200, &expected::locked_toolkit_context()).await?;
    let request = Request::get(path("locked/echo/")).header("x-atp-key", ENDPOINT_KEY);
    expect_body(base, &request, 200, &expected::tool_context("echo")).await?;
    let request = echo_call(path("locked/echo/")).header("X-Atp-Key", ENDPOINT_KEY);
    expect_result(base, &request, json!({"echo": "hi"})).await
}

/// Check 3 before 4: on a locked toolkit, an unknown tool without the key
/// → 401 (nothing is revealed); with the key → `tool_not_found`.
pub async fn order_key_before_tool(base: &str) -> Result<(), String> {
    expect_error(
        base,
        &Request::get(path("locked/nope/")),
        401,
        "unauthorized",
    )
    .await?;
    expect_error(base, &echo_call(path("locked/nope/")), 401, "unauthorized").await?;
    let request = Request::get(path("locked/nope/")).header("X-ATP-Key", ENDPOINT_KEY);
    tool_not_found(base, &request).await
}

/// Check 3 before 5: on a locked toolkit, a wrong method without the key
/// → 401; with the key → 405.
pub async fn order_key_before_method(base: &str) -> Result<(), String> {
    expect_error(
        base,
        &Request::new("DELETE", path("locked/echo/")),
        401,
        "unauthorized",
    )
    .await?;
    expect_error(
        base,
        &Request::new("POST", path("locked/")),
        401,
        "unauthorized",
    )
    .await?;
    let request = Request::new("DELETE", path("locked/echo/")).header("X-ATP-Key", ENDPOINT_KEY);
    expect_method_not_allowed(base, &request, ALLOW_TOOL).await
}

/// The endpoint key belongs to its toolkit: sending it to the open
/// toolkit changes nothing, and one toolkit's route never reaches
/// another's tool.
pub async fn toolkits_are_separate(base: &str) -> Result<(), String> {
    let request = echo_call(path("conformance/echo/")).header("X-ATP-Key", ENDPOINT_KEY);
    expect_result(base, &request, json!({"echo": "hi"})).await?;
    let request = Request::get(path("locked/hello_world/")).header("X-ATP-Key", ENDPOINT_KEY);
    tool_not_found(base, &request).await
}
