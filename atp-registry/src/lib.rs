#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The macros' generated code names this crate `::atp_registry`, also
// in this crate's own tests.
#[cfg(test)]
extern crate self as atp_registry;

mod app;
mod client;
mod define;
mod error;
pub mod http;
#[cfg(feature = "llm")]
#[cfg_attr(docsrs, doc(cfg(feature = "llm")))]
pub mod llm;
#[cfg(feature = "mcp")]
#[cfg_attr(docsrs, doc(cfg(feature = "mcp")))]
pub mod mcp;
#[cfg(feature = "_http")]
#[doc(hidden)]
pub mod net;
mod registry;
#[cfg(feature = "runtime")]
#[cfg_attr(docsrs, doc(cfg(feature = "runtime")))]
pub mod runtime;
mod schema;
mod secret;
mod tool;
#[cfg(feature = "webhook")]
#[cfg_attr(docsrs, doc(cfg(feature = "webhook")))]
pub mod webhook;
pub mod wire;

pub use app::{AppCall, AppReply};
pub use atp_macros::{tool, toolkit};
pub use client::{
    DEFAULT_BASE_URL, DEFAULT_BODY_LIMIT, RegisteredTool, ToolKitClient, check_params,
};
#[doc(hidden)]
pub use define::__private;
pub use define::{ToolDef, Toolkit, ToolkitState};
pub use error::{CallError, ErrorCode, RegisterError, RegistryError};
pub use http::Engine;
pub use registry::{Registry, get_client, list_clients, register_client};
pub use schema::{Provider, UnknownProvider, strict_schema};
pub use secret::{AuthToken, Secret};
pub use tool::{
    AUTH_TOKEN_PARAM, Call, LogLevel, Progress, Tool, ToolError, ToolEvent, ToolSpec,
    is_valid_tool_name, is_valid_toolkit_name,
};

// Re-exported so that typed tools can derive `JsonSchema` without naming
// another dependency.
pub use schemars;
pub use serde_json;

/// The docs of `atp-macros` (`#[tool]`, `#[toolkit]`, which this crate
/// re-exports): their snippets run as this crate's doc tests, since a
/// proc-macro crate's own doc tests would need a build of this crate just
/// for them.
#[cfg(doctest)]
#[doc = include_str!("../../atp-macros/README.md")]
#[doc = include_str!("../../atp-macros/doc/tool.md")]
#[doc = include_str!("../../atp-macros/doc/toolkit.md")]
pub struct AtpMacrosDocs;
