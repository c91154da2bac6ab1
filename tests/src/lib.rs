#![doc = include_str!("../README.md")]

pub mod agreement;
pub mod cases;
pub mod client;
pub mod fixture;
pub mod infra;
pub mod mcp_fixture;
pub mod mcp_official;
pub mod process;
pub mod seed;
pub mod server;

use std::{future::Future, net::SocketAddr, pin::Pin};

pub use fixture::fixture;

/// What a case returns: `Err` says what was expected and what came back.
pub type CaseResult = Result<(), String>;

/// The future of a case run through [`CaseFn`].
pub type CaseFuture = Pin<Box<dyn Future<Output = CaseResult> + Send + 'static>>;

/// A case, callable by the runner: takes the server's base URL
/// (`http://HOST:PORT`).
pub type CaseFn = fn(String) -> CaseFuture;

/// The one list of cases. Calls `$crate::__expand_cases!` with the mode
/// given and every case name; [`all_cases`] and [`conformance_tests!`]
/// are built from it, so a case added here is run everywhere.
#[doc(hidden)]
#[macro_export]
macro_rules! __for_each_case {
    ($($mode:tt)*) => {
        $crate::__expand_cases! { [$($mode)*]
            // The MCP face.
            mcp_initialize,
            mcp_tools_list,
            mcp_tools_call,
            mcp_tool_error_is_a_result,
            mcp_bearer_token,
            mcp_protocol_errors,
            mcp_notification_accepted,
            mcp_get_and_delete_not_allowed,
            mcp_foreign_origin_refused,
            mcp_toolkit_rules,
            mcp_progress_as_events,
            // GET and HEAD.
            root_lists_toolkits,
            root_without_trailing_slash,
            locked_toolkit_not_listed,
            toolkit_context,
            toolkit_context_without_trailing_slash,
            tool_context,
            tool_context_without_trailing_slash,
            every_tool_context,
            input_schemas_are_plain,
            provider_openai,
            provider_openai_strict,
            provider_openai_chat,
            provider_openai_chat_strict,
            provider_anthropic,
            provider_mistral,
            provider_mistralai_echoed_as_sent,
            strict_only_changes_openai_formats,
            strict_other_values_are_off,
            provider_without_trailing_slash,
            unknown_provider,
            head_root,
            head_toolkit,
            head_tool,
            head_errors,
            // Paths, methods, the endpoint key, the order of the checks.
            unknown_toolkit,
            unknown_toolkit_on_tool_path,
            unknown_tool,
            names_are_case_sensitive,
            extra_path_segments_not_found,
            empty_path_segments_not_found,
            percent_encoded_names,
            encoded_slash_matches_nothing,
            undecodable_segments_match_nothing,
            overlong_names_match_nothing,
            method_not_allowed_on_root,
            method_not_allowed_on_toolkit,
            method_not_allowed_on_tool,
            options_preflight_is_405,
            order_path_shape_before_method,
            order_toolkit_before_method,
            order_tool_before_method,
            order_method_before_content_type,
            locked_without_key,
            locked_wrong_key,
            locked_with_key,
            order_key_before_tool,
            order_key_before_method,
            toolkits_are_separate,
            // Bodies.
            post_echo,
            post_hello_world,
            post_without_trailing_slash,
            json_with_charset_and_any_case,
            other_charset_is_unsupported,
            other_content_type_is_unsupported,
            form_encoded,
            form_repeated_field,
            form_invalid_utf8,
            form_to_typed_tool,
            no_content_type_is_json,
            empty_body_is_empty_object,
            post_without_content_length,
            body_not_json,
            body_not_object,
            body_not_utf8,
            duplicate_top_level_key,
            deep_nesting_rejected,
            moderate_nesting_accepted,
            body_at_limit_accepted,
            body_over_limit_rejected,
            chunked_body_at_limit_accepted,
            chunked_body_over_limit_rejected,
            declared_length_over_limit,
            order_content_type_before_size,
            order_size_before_body,
            order_body_before_auth,
            // Calls.
            missing_params_named,
            null_required_param_is_missing,
            optional_param_absent_or_null,
            unknown_params_named,
            order_missing_before_unknown,
            untyped_params_take_any_json,
            auth_token_is_not_a_param,
            typed_add,
            typed_missing_field,
            typed_unknown_field,
            typed_i64_overflow,
            typed_wrong_type,
            order_unknown_before_invalid,
            auth_required_without_token,
            order_auth_before_params,
            auth_token_in_body,
            auth_bearer_header,
            auth_bearer_any_case,
            auth_other_scheme_is_no_token,
            auth_empty_token_is_no_token,
            auth_empty_body_token_falls_back_to_header,
            auth_body_token_wins_over_header,
            auth_token_not_string_is_invalid_body,
            auth_token_never_echoed,
            tool_error_message,
            tool_panic_hides_detail,
            server_survives_panics,
            slow_tool_answers,
            blocking_tool_answers,
            tool_timeout,
            blocking_tool_timeout,
            slow_tools_run_concurrently,
            blocking_tool_does_not_stall_server,
        }
    };
}

/// Expands the case list in a mode: `[list]` (a `Vec` for
/// [`all_cases`]) or `[tests (START)]` (one `#[tokio::test]` per case).
#[doc(hidden)]
#[macro_export]
macro_rules! __expand_cases {
    ([list] $($case:ident),* $(,)?) => {{
        $(
            fn $case(base: ::std::string::String) -> $crate::CaseFuture {
                ::std::boxed::Box::pin(async move { $crate::cases::$case(&base).await })
            }
        )*
        ::std::vec![$((::std::stringify!($case), $case as $crate::CaseFn)),*]
    }};
    ([tests ($start:expr)] $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test]
            async fn $case() {
                let base: ::std::string::String = $start;
                if let ::std::result::Result::Err(e) = $crate::cases::$case(&base).await {
                    ::std::panic!(
                        "conformance case `{}` failed against {}:\n{}",
                        ::std::stringify!($case),
                        base,
                        e
                    );
                }
            }
        )*
    };
}

/// Generates one `#[tokio::test] async fn CASE()` per conformance case,
/// each running [`cases::CASE`](cases) against the server whose base URL
/// (`http://HOST:PORT`, a `String`) `$start` evaluates to. `$start` is
/// evaluated once per test: make it start a shared server once (a
/// `OnceLock`) and return its URL.
///
/// The crate that calls it needs `tokio` (features `macros` and `rt`) as a
/// dependency: the tests are `#[tokio::test]`.
///
/// ```
/// use std::sync::OnceLock;
///
/// use atp_conformance::{serve_fixture, server::Framework};
///
/// fn base_url() -> String {
///     static URL: OnceLock<String> = OnceLock::new();
///     URL.get_or_init(|| serve_fixture(Framework::Axum).expect("the server starts"))
///         .clone()
/// }
///
/// atp_conformance::conformance_tests!(base_url());
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($start:expr) => {
        $crate::__for_each_case!(tests($start));
    };
}

/// Every case, by name, in the suite's order.
///
/// ```
/// let cases = atp_conformance::all_cases();
/// assert!(cases.iter().any(|(name, _)| *name == "root_lists_toolkits"));
/// ```
pub fn all_cases() -> Vec<(&'static str, CaseFn)> {
    crate::__for_each_case!(list)
}

/// Serves the [`fixture()`] with `framework` on `127.0.0.1`, on a free port,
/// from a background thread (see [`server::spawn`]), and returns its base
/// URL once it accepts connections.
pub fn serve_fixture(framework: server::Framework) -> std::io::Result<String> {
    serve_fixture_on(framework, SocketAddr::from(([127, 0, 0, 1], 0)))
}

/// Serves the [`fixture()`] with `framework` on `addr` (port 0 for a free
/// one) and returns its base URL once it accepts connections.
pub fn serve_fixture_on(framework: server::Framework, addr: SocketAddr) -> std::io::Result<String> {
    let engine = atp_registry::Engine::with_registry(fixture());
    let bound = server::spawn(framework, engine, addr)?;
    Ok(format!("http://{bound}"))
}
