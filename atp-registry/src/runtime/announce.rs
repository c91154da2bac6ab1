//! Announcing a toolkit's tools to its ATP server (docs/PROTOCOL.md §5):
//! `verify_hash`, then `verify_tool_hash` and `register_tool` per tool —
//! at each connection, and for each tool registered while it runs.

use std::{
    collections::HashSet,
    convert::Infallible,
    sync::{Arc, PoisonError},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::Shared;
use crate::{
    client::RegisteredTool,
    net::{HttpClient, NetError},
    secret::Secret,
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

/// Announces `all` (the toolkit's tools) to the server: the whole toolkit
/// (`verify_hash` first, unless execution reports are on), or, with
/// `known`, only the tools not in it (registered since). Keeps the
/// exchange token of each registration.
pub(crate) async fn announce(
    shared: &Shared,
    all: &[Arc<RegisteredTool>],
    known: Option<&HashSet<String>>,
) -> Result<(), AnnounceError> {
    if all.is_empty() {
        return Ok(());
    }
    let (client, http, base) = (&shared.client, &shared.http, shared.base());
    let timeout = shared.opts.request_timeout;
    // Only a registration issues an exchange token: with reports on, every
    // tool is registered.
    let shortcuts = !shared.opts.report_executions;
    let api_key = Some(client.api_key().clone());
    let hashes: Vec<(String, String)> = all
        .iter()
        .map(|t| (t.name().to_owned(), tool_hash(t)))
        .collect();
    let whole = toolkit_hash(&hashes);
    if shortcuts && known.is_none() {
        let body = VerifyHash {
            api_key: api_key.clone(),
            app_name: Some(client.app_name().to_owned()),
            toolkit_hash: Some(whole.clone()),
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
    }
    for (tool, (name, hash)) in all.iter().zip(&hashes) {
        if known.is_some_and(|k| k.contains(name)) {
            continue;
        }
        if shortcuts {
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
        }
        let body = RegisterTool {
            function_id: Some(name.clone()),
            api_key: api_key.clone(),
            app_name: Some(client.app_name().to_owned()),
            programming_language: Some("Rust".into()),
            code_hash: Some(hash.clone()),
            toolkit_hash: Some(whole.clone()),
            metadata: tool.spec().metadata(),
            endpoint_url: None,
            endpoint_key: None,
        };
        let url = format!("{base}/api/v1/register_tool");
        match post::<_, Value>(http, &url, &body, timeout).await? {
            (200..=299, answer) => {
                let token = answer
                    .as_ref()
                    .and_then(|a| a.get("exchange_token"))
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty());
                let mut tokens = shared.tokens.lock().unwrap_or_else(PoisonError::into_inner);
                match token {
                    Some(t) => tokens.insert(name.clone(), Secret::new(t)),
                    None => tokens.remove(name),
                };
                drop(tokens);
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

/// Announces each tool registered while the toolkit runs, as soon as it
/// is (`known`: the tools announced already), retrying with backoff when
/// the server can not be reached. Runs until dropped.
pub(crate) async fn announce_live(
    shared: &Shared,
    mut changes: watch::Receiver<u64>,
    mut known: HashSet<String>,
) -> Infallible {
    let mut retry = shared.opts.backoff_initial;
    loop {
        changes.borrow_and_update();
        let all = shared.client.registered_tools();
        if all.iter().all(|t| known.contains(t.name())) {
            if changes.changed().await.is_err() {
                // The client is gone; nothing will change any more.
                return std::future::pending().await;
            }
            continue;
        }
        match announce(shared, &all, Some(&known)).await {
            Ok(()) => {
                known.extend(all.iter().map(|t| t.name().to_owned()));
                retry = shared.opts.backoff_initial;
            }
            Err(e) => {
                tracing::warn!(
                    app = shared.client.app_name(),
                    ?retry,
                    "could not announce a new tool ({e}); retrying"
                );
                tokio::select! {
                    _ = tokio::time::sleep(retry) => {}
                    _ = changes.changed() => {}
                }
                retry = (retry * 2).min(shared.opts.backoff_max);
            }
        }
    }
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
