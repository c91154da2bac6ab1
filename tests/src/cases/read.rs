//! `GET` and `HEAD`: the listing, toolkit and tool contexts, provider
//! formats.

use serde_json::Value;

use super::{
    check_equal, check_json_content_type, check_status, describe, ensure, expect_error,
    expect_json,
    expected::{self, check_plain_schema, mask_typed_schemas},
    path, send,
};
use crate::client::Request;

/// Sends `request`, expects 200, and compares the body with `expected`,
/// the typed tool's schema checked by rules (it is masked in both).
async fn expect_context(
    base: &str,
    request: &Request,
    mut expected: Value,
    strict: bool,
) -> Result<(), String> {
    let mut body = expect_json(base, request, 200).await?;
    mask_typed_schemas(&mut body, strict, true).map_err(|e| format!("{request}: {e}"))?;
    mask_typed_schemas(&mut expected, strict, false)?;
    check_equal(request, &body, &expected)
}

/// `GET /atp/` lists the open toolkit: `{"toolkits": [{"toolkit",
/// "app_name", "tools": COUNT}]}`.
pub async fn root_lists_toolkits(base: &str) -> Result<(), String> {
    super::expect_body(base, &Request::get(path("")), 200, &expected::listing()).await
}

/// `GET /atp` (no trailing slash) answers as `GET /atp/`, without a
/// redirect.
pub async fn root_without_trailing_slash(base: &str) -> Result<(), String> {
    super::expect_body(base, &Request::get("/atp"), 200, &expected::listing()).await
}

/// A toolkit that requires an endpoint key is left out of `GET /atp/`,
/// with or without the key.
pub async fn locked_toolkit_not_listed(base: &str) -> Result<(), String> {
    for request in [
        Request::get(path("")),
        Request::get(path("")).header("X-ATP-Key", crate::fixture::ENDPOINT_KEY),
    ] {
        let body = expect_json(base, &request, 200).await?;
        let listed = body["toolkits"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["toolkit"] == "locked"));
        ensure!(!listed, "{request}: the locked toolkit is listed: {body}");
    }
    Ok(())
}

/// `GET /atp/conformance/`: every tool's context, in registration order.
pub async fn toolkit_context(base: &str) -> Result<(), String> {
    let request = Request::get(path("conformance/"));
    expect_context(base, &request, expected::toolkit_context(), false).await
}

/// `GET /atp/conformance` (no trailing slash) answers the same.
pub async fn toolkit_context_without_trailing_slash(base: &str) -> Result<(), String> {
    let request = Request::get(path("conformance"));
    expect_context(base, &request, expected::toolkit_context(), false).await
}

/// `GET /atp/conformance/hello_world/`: TOOL_CONTEXT.
pub async fn tool_context(base: &str) -> Result<(), String> {
    let request = Request::get(path("conformance/hello_world/"));
    expect_context(base, &request, expected::tool_context("hello_world"), false).await
}

/// `GET /atp/conformance/hello_world` (no trailing slash) answers the same.
pub async fn tool_context_without_trailing_slash(base: &str) -> Result<(), String> {
    let request = Request::get(path("conformance/hello_world"));
    expect_context(base, &request, expected::tool_context("hello_world"), false).await
}

/// Every tool's context, one by one, including the auth metadata of
/// `secure` and the derived schema of the typed `add`.
pub async fn every_tool_context(base: &str) -> Result<(), String> {
    for name in expected::tool_names() {
        let request = Request::get(path(&format!("conformance/{name}/")));
        expect_context(base, &request, expected::tool_context(name), false).await?;
    }
    Ok(())
}

/// Every `input_schema` is a plain object schema: `type`, `properties`,
/// `required`, nothing else at its top but `additionalProperties`,
/// `title` and `description`, no `$schema`, `$ref` or `$defs`.
pub async fn input_schemas_are_plain(base: &str) -> Result<(), String> {
    let request = Request::get(path("conformance/"));
    let body = expect_json(base, &request, 200).await?;
    let tools = body["tools"].as_array().cloned().unwrap_or_default();
    ensure!(
        tools.len() == expected::TOOL_COUNT,
        "{request}: expected {} tools, got {}",
        expected::TOOL_COUNT,
        tools.len()
    );
    for tool in &tools {
        let what = format!("{request}: tool {}", tool["function"]);
        check_plain_schema(&what, &tool["input_schema"])?;
    }
    Ok(())
}

async fn provider(
    base: &str,
    query: &str,
    sent: &str,
    format: &str,
    strict: bool,
) -> Result<(), String> {
    let request = Request::get(path(&format!("conformance/?{query}")));
    let expected = expected::provider_context(sent, format, strict);
    // Only the OpenAI formats have a strict form.
    let strict = strict && matches!(format, "openai" | "openai_chat");
    expect_context(base, &request, expected, strict).await
}

/// `?provider=openai`: the Responses format, `"strict": false` present.
pub async fn provider_openai(base: &str) -> Result<(), String> {
    provider(base, "provider=openai", "openai", "openai", false).await
}

/// `?provider=openai&strict=true`: `"strict": true` and strict schemas
/// (`additionalProperties: false`, every property required, optional ones
/// nullable).
pub async fn provider_openai_strict(base: &str) -> Result<(), String> {
    provider(
        base,
        "provider=openai&strict=true",
        "openai",
        "openai",
        true,
    )
    .await?;
    provider(
        base,
        "strict=true&provider=openai",
        "openai",
        "openai",
        true,
    )
    .await
}

/// `?provider=openai_chat`: the Chat Completions format, no `strict`.
pub async fn provider_openai_chat(base: &str) -> Result<(), String> {
    provider(
        base,
        "provider=openai_chat",
        "openai_chat",
        "openai_chat",
        false,
    )
    .await
}

/// `?provider=openai_chat&strict=true`: `"strict": true` inside
/// `function`, strict schemas.
pub async fn provider_openai_chat_strict(base: &str) -> Result<(), String> {
    provider(
        base,
        "provider=openai_chat&strict=true",
        "openai_chat",
        "openai_chat",
        true,
    )
    .await
}

/// `?provider=anthropic`: `{"name", "description", "input_schema"}`.
pub async fn provider_anthropic(base: &str) -> Result<(), String> {
    provider(base, "provider=anthropic", "anthropic", "anthropic", false).await
}

/// `?provider=mistral`: `{"type": "function", "function": {...}}`.
pub async fn provider_mistral(base: &str) -> Result<(), String> {
    provider(base, "provider=mistral", "mistral", "mistral", false).await
}

/// `?provider=mistralai` is Mistral's format, and `provider` is echoed as
/// sent (`mistralai`).
pub async fn provider_mistralai_echoed_as_sent(base: &str) -> Result<(), String> {
    provider(base, "provider=mistralai", "mistralai", "mistral", false).await
}

/// `strict=true` changes nothing for `anthropic`, `mistral` and
/// `mistralai`.
pub async fn strict_only_changes_openai_formats(base: &str) -> Result<(), String> {
    provider(
        base,
        "provider=anthropic&strict=true",
        "anthropic",
        "anthropic",
        true,
    )
    .await?;
    provider(
        base,
        "provider=mistral&strict=true",
        "mistral",
        "mistral",
        true,
    )
    .await?;
    provider(
        base,
        "provider=mistralai&strict=true",
        "mistralai",
        "mistral",
        true,
    )
    .await
}

/// `strict` with any value but `true` (`1`, `TRUE`, `yes`, empty, `false`)
/// is off.
pub async fn strict_other_values_are_off(base: &str) -> Result<(), String> {
    for value in ["1", "TRUE", "yes", "", "false"] {
        let query = format!("provider=openai&strict={value}");
        provider(base, &query, "openai", "openai", false).await?;
        let query = format!("provider=openai_chat&strict={value}");
        provider(base, &query, "openai_chat", "openai_chat", false).await?;
    }
    Ok(())
}

/// `GET /atp/conformance?provider=openai` (no trailing slash) answers the
/// same as with it.
pub async fn provider_without_trailing_slash(base: &str) -> Result<(), String> {
    let request = Request::get(path("conformance?provider=openai"));
    let expected = expected::provider_context("openai", "openai", false);
    expect_context(base, &request, expected, false).await
}

/// An unknown `provider` → 400 `unknown_provider` (also for an empty one
/// and a case variant).
pub async fn unknown_provider(base: &str) -> Result<(), String> {
    for query in [
        "provider=gemini",
        "provider=",
        "provider=OpenAI",
        "provider=gemini&strict=true",
    ] {
        let request = Request::get(path(&format!("conformance/?{query}")));
        expect_error(base, &request, 400, "unknown_provider").await?;
    }
    Ok(())
}

/// Sends `GET target` and `HEAD target` and checks that HEAD has the same
/// status, `Content-Type`, `Allow` and `Content-Length` (when GET's answer
/// has one), and no body.
async fn head_matches_get(base: &str, target: &str, extra: &[(&str, &str)]) -> Result<(), String> {
    let mut get = Request::get(target);
    let mut head = Request::head(target);
    for (name, value) in extra {
        get = get.header(*name, *value);
        head = head.header(*name, *value);
    }
    let got = send(base, &get).await?;
    let headed = send(base, &head).await?;
    check_json_content_type(&get, &got)?;
    check_status(&head, &headed, got.status)?;
    for name in ["content-type", "allow"] {
        ensure!(
            headed.header(name) == got.header(name),
            "{head}: {name} is {:?}, but GET answers {:?}",
            headed.header(name),
            got.header(name)
        );
    }
    if let Some(length) = got.header("content-length") {
        ensure!(
            headed.header("content-length") == Some(length),
            "{head}: Content-Length is {:?}, but GET answers {length:?}",
            headed.header("content-length")
        );
    }
    ensure!(
        headed.body.is_empty(),
        "{head}: expected no body, got {} bytes: {}",
        headed.body.len(),
        describe(&headed)
    );
    Ok(())
}

/// `HEAD /atp/` and `HEAD /atp`: as GET, without a body.
pub async fn head_root(base: &str) -> Result<(), String> {
    head_matches_get(base, "/atp/", &[]).await?;
    head_matches_get(base, "/atp", &[]).await
}

/// `HEAD` of a toolkit (also with `?provider=`): as GET, without a body.
pub async fn head_toolkit(base: &str) -> Result<(), String> {
    head_matches_get(base, &path("conformance/"), &[]).await?;
    head_matches_get(base, &path("conformance"), &[]).await?;
    head_matches_get(base, &path("conformance/?provider=anthropic"), &[]).await
}

/// `HEAD` of a tool: as GET, without a body.
pub async fn head_tool(base: &str) -> Result<(), String> {
    head_matches_get(base, &path("conformance/echo/"), &[]).await?;
    head_matches_get(base, &path("conformance/echo"), &[]).await
}

/// `HEAD` where GET answers an error (unknown toolkit or tool, bad path,
/// unknown provider, locked toolkit): the same status and headers, no body.
pub async fn head_errors(base: &str) -> Result<(), String> {
    for target in [
        path("nope/"),
        path("conformance/nope/"),
        path("conformance/echo/extra/"),
        path("conformance/?provider=gemini"),
        path("locked/"),
    ] {
        head_matches_get(base, &target, &[]).await?;
    }
    head_matches_get(
        base,
        &path("locked/echo/"),
        &[("X-ATP-Key", crate::fixture::ENDPOINT_KEY)],
    )
    .await
}
