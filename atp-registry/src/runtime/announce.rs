//! Announcing a toolkit's tools to its ATP server (docs/PROTOCOL.md §5):
//! `verify_hash`, then `verify_tool_hash` and `register_tool` per tool.

use std::time::Duration;

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::{
    client::{RegisteredTool, ToolKitClient},
    net::{HttpClient, NetError},
    wire::{self, RegisterTool, UpToDate, VerifyHash, VerifyToolHash},
};

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

/// SHA-256 of a tool's name and metadata (as announced), in hex.
pub(crate) fn tool_hash(tool: &RegisteredTool) -> String {
    let mut h = Sha256::new();
    h.update(tool.name().as_bytes());
    h.update([0]);
    h.update(wire::to_json(&tool.spec().metadata()).as_bytes());
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

/// POSTs a JSON body and reads the status and, when the status is 200,
/// the typed answer (`None` if it is not one).
async fn post<B: Serialize, A: DeserializeOwned>(
    http: &HttpClient,
    url: &str,
    body: &B,
    timeout: Duration,
) -> Result<(u16, Option<A>), NetError> {
    let (status, answer) = http.post_json(url, body, timeout).await?;
    let answer = (status == 200)
        .then(|| serde_json::from_slice(&answer).ok())
        .flatten();
    Ok((status, answer))
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
    let api_key = Some(client.api_key().clone());
    let hashes: Vec<(String, String)> = tools
        .iter()
        .map(|t| (t.name().to_owned(), tool_hash(t)))
        .collect();
    let all = toolkit_hash(&hashes);
    let body = VerifyHash {
        api_key: api_key.clone(),
        app_name: Some(client.app_name().to_owned()),
        toolkit_hash: Some(all.clone()),
    };
    let url = format!("{base}/api/v1/toolkit/verify_hash");
    match post::<_, UpToDate>(http, &url, &body, timeout).await? {
        (status @ (401 | 403), _) => return Err(AnnounceError::Unauthorized(status)),
        (_, Some(UpToDate { up_to_date: true })) => {
            tracing::info!(
                app = client.app_name(),
                "toolkit is up to date on the server"
            );
            return Ok(());
        }
        _ => {}
    }
    for (tool, (name, hash)) in tools.iter().zip(&hashes) {
        let body = VerifyToolHash {
            api_key: api_key.clone(),
            tool_hash: Some(hash.clone()),
            tool_name: Some(name.clone()),
            app_name: Some(client.app_name().to_owned()),
        };
        let url = format!("{base}/api/v1/toolkit/verify_tool_hash");
        if let (_, Some(UpToDate { up_to_date: true })) =
            post::<_, UpToDate>(http, &url, &body, timeout).await?
        {
            continue;
        }
        let body = RegisterTool {
            function_id: Some(name.clone()),
            api_key: api_key.clone(),
            app_name: Some(client.app_name().to_owned()),
            programming_language: Some("Rust".into()),
            code_hash: Some(hash.clone()),
            toolkit_hash: Some(all.clone()),
            metadata: tool.spec().metadata(),
            endpoint_url: None,
            endpoint_key: None,
        };
        let url = format!("{base}/api/v1/register_tool");
        match post::<_, Value>(http, &url, &body, timeout).await? {
            (200..=299, _) => {
                tracing::info!(app = client.app_name(), tool = %name, "tool registered")
            }
            (status @ (401 | 403), _) => return Err(AnnounceError::Unauthorized(status)),
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
