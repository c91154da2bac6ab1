//! The server's call events: one for each finished tool call, sent to
//! whoever listens (the console's live list; the audit log), as they
//! happen. A listener that falls behind misses events; it never slows a
//! call down.

use std::sync::Arc;

use serde::Serialize;
use tokio::sync::broadcast;

use crate::metrics::Transport;

/// How many events a slow listener may fall behind before it misses some.
const BUFFER: usize = 1024;

/// A finished tool call. It never holds arguments, results, tokens or
/// keys.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct CallEvent {
    /// When the call finished, in milliseconds since the Unix epoch.
    pub at_ms: i64,
    /// The toolkit's name.
    pub toolkit: String,
    /// The tool's name.
    pub tool: String,
    /// How the call reached its toolkit.
    pub transport: Transport,
    /// `ok`, or the ATP error code.
    pub outcome: String,
    /// How long the call took, in milliseconds.
    pub duration_ms: f64,
}

/// Where call events are sent.
#[derive(Debug)]
pub(crate) struct CallEvents(broadcast::Sender<Arc<CallEvent>>);

impl Default for CallEvents {
    fn default() -> Self {
        Self(broadcast::channel(BUFFER).0)
    }
}

impl CallEvents {
    /// Sends `event` to the current listeners (none: it is dropped).
    pub fn send(&self, event: CallEvent) {
        let _ = self.0.send(Arc::new(event));
    }

    /// A new listener, which sees the events sent from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<CallEvent>> {
        self.0.subscribe()
    }
}
