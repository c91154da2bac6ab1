//! Announcing a toolkit's tools to its ATP server (ATP-SPEC §4):
//! `verify_hash`, then `verify_tool_hash` and `register_tool` per tool.

use std::time::Duration;

use hyper::Method;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client::{RegisteredTool, ToolKitClient};
use crate::net::{HttpClient, NetError};

#[derive(Debug, thiserror::Error)]
pub(crate) enum AnnounceError {
    #[error("the server refused the API key (HTTP {0})")]
    Unauthorized(u16),
    #[error("could not announce the tools: {0}")]
    Net(#[from] NetError),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The metadata a server stores for a tool (also what its hash covers).
pub(crate) fn metadata(tool: &RegisteredTool) -> Value {
    json!({
        "params": tool.params(),
        "required_params": tool.required_params(),
        "description": tool.description(),
        "auth_provider": tool.auth_provider(),
        "auth_type": tool.auth_type(),
        "auth_with": tool.auth_with(),
        "input_schema": tool.input_schema(),
        "sample_response": "",
        "source_code": "",
    })
}

/// SHA-256 of a tool's name and metadata, in hex.
pub(crate) fn tool_hash(tool: &RegisteredTool) -> String {
    let mut h = Sha256::new();
    h.update(tool.name().as_bytes());
    h.update([0]);
    h.update(metadata(tool).to_string().as_bytes());
    hex(&h.finalize())
}

/// SHA-256 over every tool's hash, in name order.
pub(crate) fn toolkit_hash(hashes: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = hashes.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for (name, hash) in sorted {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(hash.as_bytes());
    }
    hex(&h.finalize())
}

fn up_to_date(answer: &Value) -> bool {
    answer.get("up_to_date").and_then(Value::as_bool) == Some(true)
}

pub(crate) async fn announce(
    client: &ToolKitClient,
    http: &HttpClient,
    base: &str,
    timeout: Duration,
) -> Result<(), AnnounceError> {
    let tools = client.registered_tools();
    if tools.is_empty() {
        return Ok(());
    }
    let api_key = client.api_key().expose();
    let hashes: Vec<(String, String)> = tools
        .iter()
        .map(|t| (t.name().to_owned(), tool_hash(t)))
        .collect();
    let all = toolkit_hash(&hashes);
    let body = json!({"api_key": api_key, "app_name": client.app_name(), "toolkit_hash": all});
    let url = format!("{base}/api/v1/toolkit/verify_hash");
    match http
        .json(Method::POST, &url, &[], Some(&body), timeout)
        .await?
    {
        (401 | 403, _) => return Err(AnnounceError::Unauthorized(401)),
        (200, answer) if up_to_date(&answer) => {
            tracing::info!(
                app = client.app_name(),
                "toolkit is up to date on the server"
            );
            return Ok(());
        }
        _ => {}
    }
    for (tool, (name, hash)) in tools.iter().zip(&hashes) {
        let body = json!({"api_key": api_key, "tool_hash": hash, "tool_name": name});
        let url = format!("{base}/api/v1/toolkit/verify_tool_hash");
        if let (200, answer) = http
            .json(Method::POST, &url, &[], Some(&body), timeout)
            .await?
            && up_to_date(&answer)
        {
            continue;
        }
        let body = json!({
            "function_id": name,
            "api_key": api_key,
            "app_name": client.app_name(),
            "programming_language": "Rust",
            "code_hash": hash,
            "toolkit_hash": all,
            "metadata": metadata(tool),
        });
        let url = format!("{base}/api/v1/register_tool");
        match http
            .json(Method::POST, &url, &[], Some(&body), timeout)
            .await?
        {
            (200..=299, _) => {
                tracing::info!(app = client.app_name(), tool = %name, "tool registered")
            }
            (401 | 403, _) => return Err(AnnounceError::Unauthorized(401)),
            (status, _) => {
                tracing::warn!(app = client.app_name(), tool = %name, status, "the server refused the tool")
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_stable_and_order_free() {
        let a = vec![
            ("a".to_owned(), "1".to_owned()),
            ("b".to_owned(), "2".to_owned()),
        ];
        let b = vec![
            ("b".to_owned(), "2".to_owned()),
            ("a".to_owned(), "1".to_owned()),
        ];
        assert_eq!(toolkit_hash(&a), toolkit_hash(&b));
        assert_eq!(toolkit_hash(&a).len(), 64);
        assert_ne!(toolkit_hash(&a), toolkit_hash(&a[..1]));
    }
}
