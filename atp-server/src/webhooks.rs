//! Webhooks (docs/PROTOCOL.md §9): registered by LLM keys, signed
//! deliveries from a queue in the database, retried with backoff.
//!
//! SKELETON: filled in by the webhooks work.

use std::sync::Arc;

use atp_registry::wire::WebhookEvent;
use axum::{
    body::Body,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde_json::Value;

use crate::{config::Config, error::ApiError, store::Store};

/// The tables of webhooks and their deliveries.
pub(crate) const SCHEMA: &str = "";

/// The webhooks' state: wakes the delivery task when there is work.
pub(crate) struct Webhooks {}

impl Webhooks {
    pub fn open(_store: &Store, _config: &Config) -> Result<Self, rusqlite::Error> {
        Ok(Self {})
    }
}

/// Who an event is for.
#[allow(dead_code)]
pub(crate) enum Audience<'a> {
    /// The webhooks of one LLM key (an OAuth flow it started).
    LlmKey(&'a str),
    /// The webhooks of the LLM keys that may see a toolkit (its owner's, or
    /// every key's when it is public).
    Toolkit(&'a str),
}

/// Queues `event` for every webhook of `audience` that subscribed to it.
#[allow(dead_code)]
pub(crate) fn emit(_s: &Arc<crate::State>, _event: WebhookEvent, _audience: Audience<'_>, _data: Value) {}

/// Delivers queued events until the server stops.
pub(crate) async fn deliver(_s: Arc<crate::State>) {}

fn todo() -> Response {
    ApiError::new(StatusCode::NOT_IMPLEMENTED, "not_implemented", "Not yet").into_response()
}

/// `POST …/llm-client/webhooks/register/`.
pub(crate) async fn register(State(_s): State<Arc<crate::State>>, _h: HeaderMap, _b: Body) -> Response {
    todo()
}

/// `GET …/llm-client/webhooks/`.
pub(crate) async fn list(State(_s): State<Arc<crate::State>>, _h: HeaderMap) -> Response {
    todo()
}

/// `DELETE …/llm-client/webhooks/{webhook_id}/delete/`.
pub(crate) async fn delete(
    State(_s): State<Arc<crate::State>>,
    _h: HeaderMap,
    Path(_id): Path<String>,
) -> Response {
    todo()
}
