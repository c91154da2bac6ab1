//! Developers, the toolkit store and execution reports (docs/PROTOCOL.md
//! §9).
//!
//! SKELETON: filled in by the store work.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{Path, RawQuery, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};

use crate::{config::Config, error::ApiError};

/// The tables of exchange tokens and the execution log.
pub(crate) const SCHEMA: &str = "";

/// Who owns which keys; which toolkits are public.
pub(crate) struct Catalog {}

impl Catalog {
    pub fn new(_config: &Config) -> Self {
        Self {}
    }

    /// Whether the LLM key `llm_key_hash` may see the toolkit `app_name`
    /// (registered with the toolkit key `toolkit_key_hash`): it is public,
    /// or both keys belong to the same developer.
    #[allow(dead_code)]
    pub fn can_see(&self, _llm_key_hash: &str, _toolkit_key_hash: &str, _app_name: &str) -> bool {
        true
    }
}

/// Issues the exchange token `register_tool` answers with, for reports of
/// this tool's executions.
pub(crate) async fn issue_exchange_token(
    _s: &crate::State,
    _app_name: &str,
    _function_id: &str,
    _key_hash: &str,
) -> Result<String, ApiError> {
    crate::keys::random_token(24).map_err(|_| ApiError::internal("no randomness available"))
}

fn todo() -> Response {
    ApiError::new(StatusCode::NOT_IMPLEMENTED, "not_implemented", "Not yet").into_response()
}

/// `GET …/llm-client/store/toolkits/list/?page=&page_size=`.
pub(crate) async fn store_toolkits(
    State(_s): State<Arc<crate::State>>,
    _h: HeaderMap,
    RawQuery(_q): RawQuery,
) -> Response {
    todo()
}

/// `GET …/llm-client/store/toolkits/{toolkit_id}/`.
pub(crate) async fn toolkit_details(
    State(_s): State<Arc<crate::State>>,
    _h: HeaderMap,
    Path(_id): Path<String>,
) -> Response {
    todo()
}

/// `GET …/llm-client/developers/toolkits/`.
pub(crate) async fn my_toolkits(
    State(_s): State<Arc<crate::State>>,
    _h: HeaderMap,
    RawQuery(_q): RawQuery,
) -> Response {
    todo()
}

/// `GET …/llm-client/store/developers/{display_name}/`.
pub(crate) async fn developer_profile(
    State(_s): State<Arc<crate::State>>,
    _h: HeaderMap,
    Path(_name): Path<String>,
) -> Response {
    todo()
}

/// `POST /api/v1/execute_function`.
pub(crate) async fn execute_function(State(_s): State<Arc<crate::State>>, _b: Body) -> Response {
    todo()
}
