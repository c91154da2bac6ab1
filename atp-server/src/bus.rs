//! Servers sharing one PostgreSQL database route work to each other over
//! NATS (docs/DEPLOY.md, docs/PROTOCOL.md §10).

use std::{sync::Arc, time::Duration};

use crate::{State, config::Config, config::NatsUrl, error::ServerError};

/// This server's connection to the other servers.
pub(crate) struct Bus {
    client: async_nats::Client,
}

impl Bus {
    /// Connects to NATS (retrying in the background if it is down later).
    pub async fn connect(url: &NatsUrl, _config: &Config) -> Result<Self, ServerError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(url.0.as_str())
            .await
            .map_err(|e| ServerError::Bus(e.to_string()))?;
        Ok(Self { client })
    }

    /// Starts listening for the other servers.
    pub fn start(&self, _s: &Arc<State>) {}

    /// Whether the bus is connected now.
    pub async fn ready(&self, bound: Duration) -> Result<(), String> {
        match tokio::time::timeout(bound, self.client.flush()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("NATS: {e}")),
            Err(_) => Err(format!("NATS did not answer within {} s", bound.as_secs())),
        }
    }
}
