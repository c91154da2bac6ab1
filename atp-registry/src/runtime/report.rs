//! Execution reports (opt-in, [`RuntimeOptions::report_executions`]):
//! after a tool call, `POST {base_url}/api/v1/execute_function` with
//! `{"exchange_token", "result", "function_id"}`, as the Python client's
//! `_report_execution` does. In the background, bounded, never delaying
//! the answer; the token is never logged.
//!
//! [`RuntimeOptions::report_executions`]: super::RuntimeOptions::report_executions

use std::sync::{Arc, PoisonError};

use serde_json::Value;

use super::Shared;
use crate::wire::ExecutionReport;

/// How many reports may be in flight at once; more are dropped.
pub(crate) const MAX_IN_FLIGHT: usize = 16;

/// Sends the report of a call of `function_id`, if the tool has an
/// exchange token and fewer than [`MAX_IN_FLIGHT`] reports are on their
/// way.
pub(crate) fn report(shared: &Arc<Shared>, function_id: &str, result: &Value) {
    let token = shared
        .tokens
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .get(function_id)
        .cloned();
    let Some(token) = token else {
        tracing::debug!(
            tool = function_id,
            "no exchange token: execution not reported"
        );
        return;
    };
    let Ok(permit) = shared.reports.clone().try_acquire_owned() else {
        tracing::debug!(
            tool = function_id,
            "too many reports in flight: execution not reported"
        );
        return;
    };
    let body = ExecutionReport {
        exchange_token: Some(token.clone()),
        result: result.clone(),
        function_id: Some(function_id.to_owned()),
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let url = format!("{}/api/v1/execute_function", shared.base());
        let timeout = shared.opts.request_timeout;
        let sent = shared.http.post_json(&url, &body, timeout).await;
        drop(permit);
        let app = shared.client.app_name();
        let tool = body.function_id.as_deref().unwrap_or_default();
        match sent {
            Ok((200..=299, _)) => tracing::debug!(app, tool, "execution reported"),
            Ok((status @ (400..=499), _)) => {
                // The token is spent or unknown: forget it (a new
                // registration issues another).
                let mut tokens = shared.tokens.lock().unwrap_or_else(PoisonError::into_inner);
                if tokens.get(tool) == Some(&token) {
                    tokens.remove(tool);
                }
                drop(tokens);
                tracing::info!(
                    app,
                    tool,
                    status,
                    "the server refused the execution report; not reporting this tool until it is registered again"
                );
            }
            Ok((status, _)) => tracing::warn!(app, tool, status, "execution report failed"),
            Err(e) => tracing::warn!(app, tool, "could not report an execution: {e}"),
        }
    });
}
