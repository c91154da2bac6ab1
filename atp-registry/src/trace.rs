//! W3C Trace Context (`traceparent`, `tracestate`): one tool call is one
//! trace, from the LLM-side client through the ATP server to the toolkit.
//!
//! The context travels as the `traceparent` (and `tracestate`) field of
//! the frames that carry a call (`task_request`, `atp_tool_request`, an
//! inbox entry) and as the `traceparent` / `tracestate` HTTP headers; see
//! docs/PROTOCOL.md. Each side records the trace id as the `trace_id`
//! field of its span (`atp.llm.call`, `atp.server.call`, `atp.tool`).
//! With the `otel` feature the spans are also linked to the remote parent
//! in OpenTelemetry (through `tracing-opentelemetry`), so that an OTLP
//! backend shows one trace.
//!
//! Reading is forgiving: a malformed `traceparent` is ignored (the call
//! then starts a trace of its own), never an error.
//!
//! ```
//! use atp_registry::trace::TraceContext;
//!
//! let parent = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None)
//!     .expect("a valid traceparent");
//! assert_eq!(parent.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
//! let child = parent.child();
//! assert_eq!(child.trace_id(), parent.trace_id());
//! assert_ne!(child.span_id(), parent.span_id());
//! assert!(TraceContext::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None).is_none());
//! ```

use std::{
    fmt,
    hash::{BuildHasher, Hasher},
    sync::atomic::{AtomicU64, Ordering},
};

/// The HTTP header (and wire field) that carries the trace context.
pub const TRACEPARENT: &str = "traceparent";
/// The HTTP header (and wire field) that carries vendors' trace state.
pub const TRACESTATE: &str = "tracestate";

/// The longest `tracestate` kept (W3C: 32 members of at most 256 bytes;
/// propagators may cut it at 512). A longer one is dropped.
const MAX_TRACESTATE: usize = 512;

/// A W3C trace context: a valid `traceparent`, and the `tracestate` that
/// came with it.
#[derive(Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// `00-{trace id}-{span id}-{flags}`, lowercase, validated.
    traceparent: String,
    tracestate: Option<String>,
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TraceContext")
            .field("traceparent", &self.traceparent)
            .field("tracestate", &self.tracestate)
            .finish()
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl TraceContext {
    /// Reads a `traceparent` (and its `tracestate`), or `None` when the
    /// `traceparent` is not valid: wrong length or characters, version
    /// `ff`, or an all-zero trace or span id. A `tracestate` that is too
    /// long or not printable ASCII is dropped (the `traceparent` is kept).
    /// A later version's `traceparent` is read by its first four fields,
    /// as the W3C recommendation says.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let t = traceparent.trim();
        if t.len() < 55 || !t.is_ascii() {
            return None;
        }
        let (head, rest) = t.split_at(55);
        let version = &head[0..2];
        if !is_lower_hex(version) || version == "ff" {
            return None;
        }
        // Version 00 is exactly 55 characters; a later one may have more,
        // after a dash.
        if (version == "00" && !rest.is_empty()) || (!rest.is_empty() && !rest.starts_with('-')) {
            return None;
        }
        let b = head.as_bytes();
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let (trace_id, span_id, flags) = (&head[3..35], &head[36..52], &head[53..55]);
        if !is_lower_hex(trace_id) || !is_lower_hex(span_id) || !is_lower_hex(flags) {
            return None;
        }
        if trace_id.bytes().all(|c| c == b'0') || span_id.bytes().all(|c| c == b'0') {
            return None;
        }
        let tracestate = tracestate
            .map(str::trim)
            .filter(|s| !s.is_empty() && s.len() <= MAX_TRACESTATE)
            .filter(|s| s.bytes().all(|c| (0x20..0x7f).contains(&c)))
            .map(str::to_owned);
        Some(Self {
            traceparent: format!("00-{trace_id}-{span_id}-{flags}"),
            tracestate,
        })
    }

    /// A new trace (random trace and span ids), sampled.
    pub fn new_root() -> Self {
        let trace_id = format!("{:016x}{:016x}", nonzero_random(), nonzero_random());
        Self::from_parts(&trace_id, nonzero_random(), true, None)
    }

    /// A context from its parts: a 32-digit trace id (checked by
    /// [`parse`](Self::parse)), a span id, the sampled flag.
    pub(crate) fn from_parts(
        trace_id: &str,
        span_id: u64,
        sampled: bool,
        tracestate: Option<String>,
    ) -> Self {
        Self {
            traceparent: format!("00-{trace_id}-{span_id:016x}-{:02x}", u8::from(sampled)),
            tracestate,
        }
    }

    /// The context to pass on from a span of this trace: the same trace
    /// id, flags and `tracestate`, a new span id.
    pub fn child(&self) -> Self {
        let mut traceparent = self.traceparent.clone();
        traceparent.replace_range(36..52, &format!("{:016x}", nonzero_random()));
        Self {
            traceparent,
            tracestate: self.tracestate.clone(),
        }
    }

    /// The trace id: 32 lowercase hex digits.
    pub fn trace_id(&self) -> &str {
        &self.traceparent[3..35]
    }

    /// The parent span id: 16 lowercase hex digits.
    pub fn span_id(&self) -> &str {
        &self.traceparent[36..52]
    }

    /// Whether the caller sampled the trace (flag `01`).
    pub fn sampled(&self) -> bool {
        u8::from_str_radix(&self.traceparent[53..55], 16).is_ok_and(|f| f & 1 == 1)
    }

    /// The `traceparent` value.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// The `tracestate` value, if one came.
    pub fn tracestate(&self) -> Option<&str> {
        self.tracestate.as_deref()
    }

    /// Reads the context of a message's `traceparent` and `tracestate`
    /// fields (malformed: `None`).
    pub fn from_fields(traceparent: Option<&str>, tracestate: Option<&str>) -> Option<Self> {
        traceparent.and_then(|t| Self::parse(t, tracestate))
    }

    /// The context as the two optional wire fields.
    pub fn into_fields(this: Option<Self>) -> (Option<String>, Option<String>) {
        match this {
            Some(c) => (Some(c.traceparent), c.tracestate),
            None => (None, None),
        }
    }
}

/// A random non-zero u64: std's randomly keyed SipHash over a counter and
/// the clock. Trace and span ids need to be unique, not secret.
fn nonzero_random() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    loop {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        if let Ok(d) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            h.write_u128(d.as_nanos());
        }
        let v = h.finish();
        if v != 0 {
            return v;
        }
    }
}

/// Starts tracing one hop of a call in `span`: links it to the caller's
/// context `incoming` (or starts a trace), records the trace id as the
/// span's `trace_id` field, and returns the context to pass on to the next
/// hop (whose parent is this span).
///
/// With the `otel` feature and an OpenTelemetry layer in the subscriber,
/// the span's parent becomes the remote `incoming` span and the context
/// passed on is the span's own (its OpenTelemetry span id); without, the
/// context passed on is `incoming`'s trace with a new span id. `span` must
/// not have been entered yet (OpenTelemetry fixes a span's parent when it
/// starts). The span should declare `trace_id = tracing::field::Empty`.
pub fn link(span: &tracing::Span, incoming: Option<&TraceContext>) -> TraceContext {
    #[cfg(feature = "otel")]
    if let Some(out) = otel::link(span, incoming) {
        span.record("trace_id", out.trace_id());
        return out;
    }
    let out = incoming.map_or_else(TraceContext::new_root, TraceContext::child);
    span.record("trace_id", out.trace_id());
    out
}

/// The context of the current span in OpenTelemetry (feature `otel`, with
/// an OpenTelemetry layer in the subscriber), if it has a valid one: what
/// `LlmClient` sends when no context is given to it.
pub fn current() -> Option<TraceContext> {
    #[cfg(feature = "otel")]
    {
        otel::of_span(&tracing::Span::current(), None)
    }
    #[cfg(not(feature = "otel"))]
    {
        None
    }
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::{
        Context,
        trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceContext;

    /// The remote span context of `incoming`.
    fn remote(incoming: &TraceContext) -> Option<SpanContext> {
        let trace_id = TraceId::from_hex(incoming.trace_id()).ok()?;
        let span_id = SpanId::from_hex(incoming.span_id()).ok()?;
        let flags = if incoming.sampled() {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let state = incoming
            .tracestate()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default();
        Some(SpanContext::new(trace_id, span_id, flags, true, state))
    }

    /// The OpenTelemetry context of `span` as a [`TraceContext`], if
    /// valid (an OpenTelemetry layer is installed and sees the span).
    pub(super) fn of_span(span: &tracing::Span, tracestate: Option<&str>) -> Option<TraceContext> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if !sc.is_valid() {
            return None;
        }
        let state = sc.trace_state().header();
        let tracestate = if state.is_empty() {
            tracestate.map(str::to_owned)
        } else {
            Some(state)
        };
        let span_id = u64::from_be_bytes(sc.span_id().to_bytes());
        Some(TraceContext::from_parts(
            &format!("{}", sc.trace_id()),
            span_id,
            sc.is_sampled(),
            tracestate,
        ))
    }

    /// Links `span` to `incoming` in OpenTelemetry; the span's own
    /// context, or `None` without an OpenTelemetry layer.
    pub(super) fn link(
        span: &tracing::Span,
        incoming: Option<&TraceContext>,
    ) -> Option<TraceContext> {
        if let Some(sc) = incoming.and_then(remote) {
            // Fails without a layer (then `of_span` says `None` too) or
            // once the span started: it then keeps the parent it has.
            let _ = span.set_parent(Context::new().with_remote_span_context(sc));
        }
        of_span(span, incoming.and_then(TraceContext::tracestate))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_read() {
        let c = TraceContext::parse(VALID, Some("congo=t61rcWkgMzE")).expect("valid");
        assert_eq!(c.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(c.span_id(), "00f067aa0ba902b7");
        assert!(c.sampled());
        assert_eq!(c.traceparent(), VALID);
        assert_eq!(c.tracestate(), Some("congo=t61rcWkgMzE"));
        let unsampled = VALID.replace("-01", "-00");
        assert!(
            !TraceContext::parse(&unsampled, None)
                .expect("valid")
                .sampled()
        );
    }

    #[test]
    fn malformed_traceparents_are_ignored() {
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736_00f067aa0ba902b7_01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0é",
            "é0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
        ] {
            assert_eq!(TraceContext::parse(bad, None), None, "{bad:?}");
        }
    }

    #[test]
    fn a_later_version_is_read_by_its_first_fields() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-whatever";
        let c = TraceContext::parse(later, None).expect("a later version");
        assert_eq!(c.traceparent(), VALID);
    }

    #[test]
    fn a_bad_tracestate_is_dropped_not_the_traceparent() {
        let long = "a=".to_owned() + &"b".repeat(600);
        for bad in [long.as_str(), "k=v\u{1}", "  "] {
            let c = TraceContext::parse(VALID, Some(bad)).expect("valid traceparent");
            assert_eq!(c.tracestate(), None);
        }
    }

    #[test]
    fn children_and_roots_are_valid_and_distinct() {
        let root = TraceContext::new_root();
        assert_eq!(
            TraceContext::parse(root.traceparent(), None),
            Some(root.clone())
        );
        let other = TraceContext::new_root();
        assert_ne!(root.trace_id(), other.trace_id());
        let child = root.child();
        assert_eq!(child.trace_id(), root.trace_id());
        assert_ne!(child.span_id(), root.span_id());
        assert_eq!(TraceContext::parse(child.traceparent(), None), Some(child));
    }

    #[test]
    fn link_records_the_trace_id_and_passes_on_a_child() {
        let parent = TraceContext::parse(VALID, None).expect("valid");
        let span = tracing::info_span!("test", trace_id = tracing::field::Empty);
        let out = link(&span, Some(&parent));
        assert_eq!(out.trace_id(), parent.trace_id());
        assert_ne!(out.span_id(), parent.span_id());
        assert_ne!(link(&span, None).trace_id(), parent.trace_id());
    }
}
