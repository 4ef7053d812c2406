//! The broker side: connections, and a confirm-mode publisher that reconnects by itself.
//!
//! Keeps the rule that a publish is a success only when the broker acked a *routed* message:
//! with `mandatory`, lapin reports an unroutable message as `Ack(Some(returned))`, which is a
//! failure here.

mod publisher;

pub use publisher::{BROKER_HEADROOM, Outgoing, PublishError, Publisher, State, header_frame_size};

use std::time::Duration;

use lapin::{Connection, ConnectionProperties};

use crate::config;

/// The broker could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection within `amqp.connect_timeout`.
    #[error("connecting to the broker timed out after {0:?}")]
    ConnectTimeout(Duration),
    /// The broker or the network said no.
    #[error("broker error")]
    Broker(#[from] lapin::Error),
}

/// Opens one connection, named so operators can tell our connections apart in the broker, with
/// `amqp.heartbeat` unless the URL names its own.
pub async fn connect(config: &config::Amqp, name: &str) -> Result<Connection, Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let mut uri = config.url.uri();
    if uri.query.heartbeat.is_none() {
        // Validated at load to fit a u16.
        uri.query.heartbeat = Some(u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX));
    }
    let connect = Connection::connect_uri(uri, properties);
    match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::ConnectTimeout(config.connect_timeout)),
    }
}
