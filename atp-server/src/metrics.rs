//! `GET /metrics`: the server's metrics in the Prometheus (OpenMetrics)
//! text format, through the official Prometheus client crate.
//!
//! What is counted: tool calls by toolkit, tool, the toolkit's transport
//! and outcome (`ok` or the ATP error code), with their latency; the
//! toolkit and LLM WebSockets open now; the inbox entries waiting; the
//! webhook delivery attempts by outcome; the calls refused by a rate
//! limit, by limit and toolkit; the audit rows written and lost. Labels carry names and codes
//! only: never a key, a token, an argument or a result.
//!
//! Who may read them: with `metrics_token` set, a request with
//! `Authorization: Bearer TOKEN`; in dev mode (loopback only), anyone;
//! otherwise the endpoint is off (404), so that a server does not publish
//! its toolkits' names by default.

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use axum::{
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use subtle::ConstantTimeEq;

/// How a call reached its toolkit.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue, serde::Serialize)]
#[allow(non_camel_case_types)]
pub(crate) enum Transport {
    /// The toolkit's WebSocket on this server.
    websocket,
    /// The toolkit's HTTP inbox on this server.
    inbox,
    /// The toolkit's `endpoint_url`.
    endpoint,
    /// Another server, over NATS.
    remote,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    toolkit: String,
    tool: String,
    transport: Transport,
    /// `ok`, or the ATP error code.
    outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    toolkit: String,
    tool: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    /// `delivered`, `retry` or `failed`.
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuditDropLabels {
    /// `queue_full` or `write_failed`.
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitedLabels {
    /// Which limit: `key_rate`, `toolkit_rate`, `key_concurrency`,
    /// `toolkit_concurrency` or `request_size`.
    limit: &'static str,
    toolkit: String,
}

type LatencyFamily = Family<LatencyLabels, Histogram, fn() -> Histogram>;

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Mutex<Registry>,
    calls: Family<CallLabels, Counter>,
    latency: LatencyFamily,
    deliveries: Family<DeliveryLabels, Counter>,
    audit_written: Counter,
    audit_dropped: Family<AuditDropLabels, Counter>,
    limited: Family<LimitedLabels, Counter>,
    toolkit_sockets: Gauge,
    llm_sockets: Gauge,
    inbox_depth: Gauge,
}

fn latency_histogram() -> Histogram {
    // 1 ms to ~65 s, doubling.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

impl Default for Metrics {
    fn default() -> Self {
        let calls = Family::<CallLabels, Counter>::default();
        let latency: LatencyFamily = Family::new_with_constructor(latency_histogram);
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        let audit_written = Counter::default();
        let audit_dropped = Family::<AuditDropLabels, Counter>::default();
        let limited = Family::<LimitedLabels, Counter>::default();
        let (toolkit_sockets, llm_sockets, inbox_depth) =
            (Gauge::default(), Gauge::default(), Gauge::default());
        let mut registry = Registry::with_prefix("atp");
        registry.register(
            "tool_calls",
            "Tool calls, by toolkit, tool, the toolkit's transport and outcome (ok or the error code)",
            calls.clone(),
        );
        registry.register(
            "tool_call_duration_seconds",
            "How long tool calls took, from the call to its answer",
            latency.clone(),
        );
        registry.register(
            "webhook_delivery_attempts",
            "Webhook delivery attempts, by outcome (delivered, retry, failed)",
            deliveries.clone(),
        );
        registry.register(
            "audit_rows_written",
            "Rows written to the audit log",
            audit_written.clone(),
        );
        registry.register(
            "audit_rows_dropped",
            "Audit rows lost, by reason (queue_full: the writer was behind; write_failed: the database refused them)",
            audit_dropped.clone(),
        );
        registry.register(
            "rate_limited",
            "Tool calls refused by a rate limit, by limit (key_rate, toolkit_rate, key_concurrency, toolkit_concurrency, request_size) and toolkit",
            limited.clone(),
        );
        registry.register(
            "toolkit_websockets",
            "Toolkit WebSockets open on this server",
            toolkit_sockets.clone(),
        );
        registry.register(
            "llm_websockets",
            "LLM-client WebSockets open on this server",
            llm_sockets.clone(),
        );
        registry.register(
            "inbox_depth",
            "Requests waiting in toolkits' HTTP inboxes on this server",
            inbox_depth.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            calls,
            latency,
            deliveries,
            audit_written,
            audit_dropped,
            limited,
            toolkit_sockets,
            llm_sockets,
            inbox_depth,
        }
    }
}

impl Metrics {
    /// Counts a call a rate limit refused.
    pub fn rate_limited(&self, limit: crate::rate_limit::LimitKind, toolkit: &str) {
        self.limited
            .get_or_create(&LimitedLabels {
                limit: limit.as_str(),
                toolkit: toolkit.to_owned(),
            })
            .inc();
    }

    /// Counts a finished tool call.
    pub fn call(
        &self,
        toolkit: &str,
        tool: &str,
        transport: Transport,
        outcome: Result<(), &str>,
        took: Duration,
    ) {
        let outcome = match outcome {
            Ok(()) => "ok".to_owned(),
            Err(code) => code.to_owned(),
        };
        self.calls
            .get_or_create(&CallLabels {
                toolkit: toolkit.to_owned(),
                tool: tool.to_owned(),
                transport,
                outcome,
            })
            .inc();
        self.latency
            .get_or_create(&LatencyLabels {
                toolkit: toolkit.to_owned(),
                tool: tool.to_owned(),
            })
            .observe(took.as_secs_f64());
    }

    /// Counts a webhook delivery attempt (`delivered`, `retry`, `failed`).
    pub fn delivery(&self, outcome: &'static str) {
        self.deliveries
            .get_or_create(&DeliveryLabels { outcome })
            .inc();
    }

    /// Counts `n` audit rows written.
    pub fn audit_written(&self, n: u64) {
        self.audit_written.inc_by(n);
    }

    /// Counts `n` audit rows lost (`queue_full`, `write_failed`).
    pub fn audit_dropped(&self, reason: &'static str, n: u64) {
        self.audit_dropped
            .get_or_create(&AuditDropLabels { reason })
            .inc_by(n);
    }

    /// A guard that counts an LLM WebSocket while it lives.
    pub fn llm_socket(self: &Arc<Self>) -> SocketGuard {
        self.llm_sockets.inc();
        SocketGuard(self.llm_sockets.clone())
    }

    /// The text of `GET /metrics`, the gauges read from the hub now.
    fn render(&self, hub: &crate::hub::Hub) -> Result<String, std::fmt::Error> {
        let (sockets, depth) = hub.load();
        self.toolkit_sockets
            .set(i64::try_from(sockets).unwrap_or(i64::MAX));
        self.inbox_depth
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

/// Counts an open WebSocket until dropped.
pub(crate) struct SocketGuard(Gauge);

impl Drop for SocketGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// `GET /metrics`.
pub(crate) async fn get(State(s): State<Arc<crate::State>>, headers: HeaderMap) -> Response {
    let allowed = match &s.config.metrics_token {
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .is_some_and(|(scheme, given)| {
                scheme.eq_ignore_ascii_case("bearer")
                    && bool::from(given.trim().as_bytes().ct_eq(token.expose().as_bytes()))
            }),
        None if s.config.dev => true,
        None => {
            return crate::error::ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "Metrics are off: set metrics_token to serve them",
            )
            .into_response();
        }
    };
    if !allowed {
        let mut r = crate::error::ApiError::unauthorized().into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    match s.metrics.render(&s.hub) {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => crate::error::ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Metrics could not be written",
        )
        .into_response(),
    }
}
