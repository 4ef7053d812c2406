//! A pool of confirm-mode channels on one connection, kept alive by a background task.
//!
//! Requests spread over the channels round-robin and pipeline their confirms: nothing is locked
//! across a publish, and no channel is opened per message. When the connection or a channel
//! fails, the pool is dropped, publishes fail at once with [`PublishError::Unavailable`], and the
//! task reconnects with exponential backoff and declares the topology again before the pool is
//! offered anew.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Channel, Confirmation, Connection, Event};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::backoff::Backoff;
use crate::config;
use crate::topology::Topology;

/// Why a message was not confirmed. Every variant means "not persisted, as far as we know".
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// No connection to the broker right now; one is being re-established.
    #[error("broker unavailable")]
    Unavailable,
    /// The broker blocks publishing (memory or disk alarm).
    #[error("broker blocked publishing (resource alarm)")]
    Blocked,
    /// The broker nacked the message (e.g. a full queue with `reject-publish`).
    #[error("broker refused the message")]
    Nacked,
    /// The broker returned the message: no queue is bound for its routing key.
    #[error("message unroutable")]
    Unroutable,
    /// No confirm arrived in time; the message may or may not be stored.
    #[error("no broker confirm within {0:?}")]
    Timeout(Duration),
    /// The channel failed while publishing; the pool is being rebuilt.
    #[error("broker channel failed")]
    Channel(#[source] lapin::Error),
    /// The message's properties (headers included) would not fit one content-header frame of
    /// this connection, with [`BROKER_HEADROOM`] to spare: the broker would close the
    /// connection (FRAME_ERROR), or lapin the consumer's. Never sent.
    #[error(
        "message properties of {size} bytes do not fit the broker's frame size of {frame_max} with room for its own headers"
    )]
    TooLarge {
        /// Encoded content-header frame size.
        size: usize,
        /// The negotiated `frame_max`.
        frame_max: usize,
    },
    /// The exchange name or the routing key is longer than an AMQP short string (255 bytes).
    /// Never sent.
    #[error("{what} of {bytes} bytes is longer than AMQP's 255")]
    NameTooLong {
        /// `exchange name` or `routing key`.
        what: &'static str,
        /// Its length.
        bytes: usize,
    },
}

impl PublishError {
    /// True when publishing the same message again cannot succeed.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            PublishError::TooLarge { .. } | PublishError::NameTooLong { .. }
        )
    }
}

/// `name` as the short string a publish needs, or [`PublishError::NameTooLong`].
fn short(name: &str, what: &'static str) -> Result<ShortString, PublishError> {
    ShortString::try_new(name).map_err(|_| PublishError::NameTooLong {
        what,
        bytes: name.len(),
    })
}

/// Bytes of a content-header frame around its properties: frame header (7), class id and
/// weight (4), body size (8), frame end (1).
const HEADER_FRAME_OVERHEAD: usize = 20;

/// Room left in the content-header frame for what the broker adds to a message on its way:
/// `x-delivery-count` on a quorum queue's redelivery, an `x-death` entry per queue it was
/// dead-lettered from, `x-first-death-*`. A message that fits the frame on publish but not on
/// delivery would make lapin close the consuming connection (FACTS.md).
pub const BROKER_HEADROOM: usize = 8192;

/// The size of the content-header frame `properties` make, exactly as lapin will encode it.
pub fn header_frame_size(properties: &BasicProperties) -> usize {
    let encoded = cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    );
    // Encoding into a Vec cannot run out of room; count a failure as too large.
    encoded.map_or(usize::MAX, |bytes| bytes.len() + HEADER_FRAME_OVERHEAD)
}

/// What the publisher can do right now, for readiness checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connected, topology declared, not blocked.
    Ready,
    /// Connected, but the broker blocks publishing.
    Blocked,
    /// Not connected.
    Down,
}

/// One message to publish; it is always sent persistent and mandatory.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Exchange name.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body bytes, sent unchanged.
    pub body: &'a [u8],
    /// Properties; `delivery_mode` is forced to persistent.
    pub properties: BasicProperties,
}

/// A self-healing pool of confirm-mode channels. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Publisher {
    current: watch::Receiver<Option<Arc<Pool>>>,
    stop: CancellationToken,
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

#[derive(Debug)]
struct Pool {
    connection: Connection,
    node: super::Node,
    channels: Vec<Channel>,
    next: AtomicUsize,
    failed: CancellationToken,
    /// Confirm timeouts in a row; at `timeouts_before_reconnect` the pool is taken for dead.
    timeouts: AtomicU32,
    timeouts_before_reconnect: u32,
}

impl Publisher {
    /// Starts connecting in the background; publishes fail with `Unavailable` until connected.
    /// `name` shows in the broker's connection list.
    pub fn start(config: &config::Amqp, topology: Topology, name: &str) -> Publisher {
        Publisher::spawn(config, Some(topology), name)
    }

    /// Like [`Publisher::start`], but declares nothing: for tools that only move messages
    /// between queues that must exist already (`ipnctl`'s reviews).
    pub fn start_undeclared(config: &config::Amqp, name: &str) -> Publisher {
        Publisher::spawn(config, None, name)
    }

    fn spawn(config: &config::Amqp, topology: Option<Topology>, name: &str) -> Publisher {
        let (sender, current) = watch::channel(None);
        let stop = CancellationToken::new();
        let keeper = Keeper {
            config: config.clone(),
            topology,
            name: name.to_owned(),
            sender,
            stop: stop.clone(),
        };
        let task = tokio::spawn(keeper.run());
        Publisher {
            current,
            stop,
            task: std::sync::Mutex::new(Some(task)),
        }
    }

    /// Whether a publish can succeed now.
    pub fn state(&self) -> State {
        match self.current.borrow().as_ref() {
            None => State::Down,
            Some(pool) if pool.connection.status().blocked() => State::Blocked,
            Some(_) => State::Ready,
        }
    }

    /// The node (`host:port`) the publisher is connected to now, if any.
    pub fn node(&self) -> Option<String> {
        (self.current.borrow().as_ref()).map(|pool| pool.node.name.clone())
    }

    /// Waits until the publisher is connected, or `limit` passes. True when connected.
    pub async fn wait_connected(&self, limit: Duration) -> bool {
        let mut current = self.current.clone();
        tokio::time::timeout(limit, current.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Publishes persistent + mandatory and waits for the broker's confirm, at most `limit`.
    /// `Ok` means the broker acked a routed message, so it is stored in a queue.
    pub async fn publish(
        &self,
        message: Outgoing<'_>,
        limit: Duration,
    ) -> Result<(), PublishError> {
        let pool = self
            .current
            .borrow()
            .clone()
            .ok_or(PublishError::Unavailable)?;
        if pool.connection.status().blocked() {
            return Err(PublishError::Blocked);
        }
        if !pool.connection.status().connected() || pool.failed.is_cancelled() {
            pool.failed.cancel();
            return Err(PublishError::Unavailable);
        }
        let frame_max =
            usize::try_from(pool.connection.configuration().frame_max()).unwrap_or(usize::MAX);
        let size = header_frame_size(&message.properties);
        if size > frame_max.saturating_sub(BROKER_HEADROOM) {
            return Err(PublishError::TooLarge { size, frame_max });
        }
        let exchange = short(message.exchange, "exchange name")?;
        let routing_key = short(message.routing_key, "routing key")?;
        let sent = pool.confirm(exchange, routing_key, message.body, message.properties);
        match tokio::time::timeout(limit, sent).await {
            Err(_) => {
                pool.timed_out();
                Err(PublishError::Timeout(limit))
            }
            Ok(Err(error)) => {
                pool.failed.cancel();
                Err(PublishError::Channel(error))
            }
            Ok(Ok(confirmation)) => {
                pool.timeouts.store(0, Ordering::Relaxed);
                check(confirmation)
            }
        }
    }

    /// Stops reconnecting and closes the connection. In-flight publishes should be finished
    /// first: their confirms are lost with the connection.
    pub async fn close(&self) {
        self.stop.cancel();
        let task = self.task.lock().ok().and_then(|mut task| task.take());
        if let Some(task) = task {
            // The keeper closes the connection itself; a panic there is already logged.
            let _ = task.await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn check(confirmation: Confirmation) -> Result<(), PublishError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(_)) => Err(PublishError::Unroutable),
        Confirmation::Nack(_) | Confirmation::NotRequested => Err(PublishError::Nacked),
    }
}

impl Pool {
    async fn open(
        config: &config::Amqp,
        topology: Option<&Topology>,
        name: &str,
    ) -> Result<Pool, super::Error> {
        let super::Connected { connection, node } = super::connect(config, name).await?;
        let channels = match Pool::prepare(config, topology, &connection).await {
            Ok(channels) => channels,
            Err(error) => {
                // Whatever state the connection is in, it is not used again.
                let close = connection.close(200, "not ready in time".into());
                let _ = tokio::time::timeout(config.connect_timeout, close).await;
                return Err(error);
            }
        };
        Ok(Pool {
            connection,
            node,
            channels,
            next: AtomicUsize::new(0),
            failed: CancellationToken::new(),
            timeouts: AtomicU32::new(0),
            timeouts_before_reconnect: config.timeouts_before_reconnect.get(),
        })
    }

    /// Declares the topology and opens the confirm channels on a new connection, each broker
    /// operation bounded (the declaration by [`super::DECLARE_RPCS`] × `amqp.connect_timeout`):
    /// a node that stops answering mid-declaration costs a retry, not the publisher (unbounded,
    /// a node that reset the connection mid-declaration most likely left one worker's
    /// publisher waiting for good in a cluster-test run: docs/reliability.md, the bounds).
    async fn prepare(
        config: &config::Amqp,
        topology: Option<&Topology>,
        connection: &Connection,
    ) -> Result<Vec<Channel>, super::Error> {
        let limit = config.connect_timeout;
        if let Some(topology) = topology {
            let declare = topology.declare(connection);
            super::bounded("declare the topology", limit * super::DECLARE_RPCS, declare).await?;
        }
        let mut channels = Vec::with_capacity(config.publisher_channels.get());
        for _ in 0..config.publisher_channels.get() {
            let channel =
                super::bounded("open a publish channel", limit, connection.create_channel())
                    .await?;
            let confirms = channel.confirm_select(ConfirmSelectOptions::default());
            super::bounded("select publisher confirms", limit, confirms).await?;
            channels.push(channel);
        }
        Ok(channels)
    }

    /// Counts a confirm timeout; a run of them means a silent broker (black-holed network,
    /// stuck node): the pool is failed so that publishes answer at once and it reconnects.
    fn timed_out(&self) {
        let run = self.timeouts.fetch_add(1, Ordering::Relaxed) + 1;
        if run >= self.timeouts_before_reconnect && !self.failed.is_cancelled() {
            warn!(
                timeouts = run,
                "broker confirms stopped arriving; reconnecting"
            );
            self.failed.cancel();
        }
    }

    async fn confirm(
        &self,
        exchange: ShortString,
        routing_key: ShortString,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirmation, lapin::Error> {
        let index = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let properties = properties.with_delivery_mode(2);
        let confirm = self.channels[index]
            .basic_publish(exchange, routing_key, options, body, properties)
            .await?;
        confirm.await
    }

    async fn close(&self) {
        let close = self.connection.close(200, "shutting down".into());
        // Closing a connection that already broke fails; nothing is left to do then.
        let _ = tokio::time::timeout(Duration::from_secs(2), close).await;
    }
}

/// The background task that keeps one pool alive.
struct Keeper {
    config: config::Amqp,
    topology: Option<Topology>,
    name: String,
    sender: watch::Sender<Option<Arc<Pool>>>,
    stop: CancellationToken,
}

impl Keeper {
    async fn run(self) {
        let mut backoff = Backoff::new(self.config.reconnect_min, self.config.reconnect_max);
        loop {
            let opened = tokio::select! {
                () = self.stop.cancelled() => return,
                opened = Pool::open(&self.config, self.topology.as_ref(), &self.name) => opened,
            };
            match opened {
                Ok(pool) => {
                    backoff.reset();
                    if self.serve(Arc::new(pool)).await {
                        return;
                    }
                }
                Err(error) => {
                    let error = crate::bounded::error_chain(&error);
                    warn!(error, "cannot connect to the broker");
                }
            }
            tokio::select! {
                () = self.stop.cancelled() => return,
                () = backoff.sleep() => {}
            }
        }
    }

    /// Offers the pool until it fails (false) or the publisher stops (true).
    async fn serve(&self, pool: Arc<Pool>) -> bool {
        info!(
            channels = pool.channels.len(),
            node = pool.node.name,
            "publisher ready"
        );
        let events = pool.connection.events_listener();
        self.sender.send_replace(Some(Arc::clone(&pool)));
        let stopped = watch_events(events, &pool.failed, &self.stop).await;
        self.sender.send_replace(None);
        if !stopped {
            pool.node.lost();
        }
        pool.close().await;
        stopped
    }
}

/// Logs connection events until the connection fails (false) or `stop` fires (true).
async fn watch_events(
    events: impl Stream<Item = Event>,
    failed: &CancellationToken,
    stop: &CancellationToken,
) -> bool {
    let mut events = std::pin::pin!(events);
    loop {
        let event = tokio::select! {
            () = stop.cancelled() => return true,
            () = failed.cancelled() => {
                warn!("broker channel failed; reconnecting");
                return false;
            }
            event = events.next() => event,
        };
        match event {
            Some(Event::ConnectionBlocked(reason)) => warn!(%reason, "broker blocked publishing"),
            Some(Event::ConnectionUnblocked) => info!("broker unblocked publishing"),
            Some(Event::Error(error)) => {
                let error = crate::bounded::error_chain(&error);
                warn!(error, "broker connection failed; reconnecting");
                return false;
            }
            Some(_) => {}
            None => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_ack_without_a_returned_message_is_success() {
        assert!(check(Confirmation::Ack(None)).is_ok());
        assert!(matches!(
            check(Confirmation::Nack(None)),
            Err(PublishError::Nacked)
        ));
        assert!(matches!(
            check(Confirmation::NotRequested),
            Err(PublishError::Nacked)
        ));
    }
}
