//! The broker side: connections to the nodes of `amqp.urls` with failover, and a confirm-mode
//! publisher that reconnects by itself.
//!
//! Keeps the rule that a publish is a success only when the broker acked a *routed* message:
//! with `mandatory`, lapin reports an unroutable message as `Ack(Some(returned))`, which is a
//! failure here.

mod publisher;

pub use publisher::{BROKER_HEADROOM, Outgoing, PublishError, Publisher, State, header_frame_size};

use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lapin::{Connection, ConnectionProperties};
use tracing::{debug, info};

use crate::config;

/// The broker could not be reached or refused us.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No connection to `node` within `amqp.connect_timeout`.
    #[error("connecting to broker node {node} timed out after {after:?}")]
    ConnectTimeout {
        /// `host:port`.
        node: String,
        /// The limit that passed.
        after: Duration,
    },
    /// The node refused us, or the network failed while connecting.
    #[error("connecting to broker node {node}")]
    Connect {
        /// `host:port`.
        node: String,
        /// What lapin said.
        #[source]
        source: lapin::Error,
    },
    /// Every node of `amqp.urls` failed; the cause is the last one tried.
    #[error("no broker node answered ({count} tried)")]
    NoNode {
        /// Nodes tried.
        count: usize,
        /// The last node's failure.
        #[source]
        last: Box<Error>,
    },
    /// The broker or the network said no, after connecting.
    #[error("broker error")]
    Broker(#[from] lapin::Error),
    /// A broker operation after connecting got no answer in time.
    #[error("RabbitMQ did not answer `{what}` within {after:?}")]
    Timeout {
        /// The operation.
        what: &'static str,
        /// The limit that passed.
        after: Duration,
    },
}

/// Declaring the whole topology is many RPCs (every shard, tier and downstream queue): it gets
/// this many times `amqp.connect_timeout`.
pub const DECLARE_RPCS: u32 = 12;

/// `operation` (a broker call after connecting), bounded by `limit`: a broker that stops
/// answering becomes [`Error::Timeout`] instead of a wait without end.
pub async fn bounded<T>(
    what: &'static str,
    limit: Duration,
    operation: impl std::future::Future<Output = Result<T, lapin::Error>>,
) -> Result<T, Error> {
    match tokio::time::timeout(limit, operation).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::Timeout { what, after: limit }),
    }
}

/// An open connection and the node it goes to.
#[derive(Debug)]
pub struct Connected {
    /// The connection.
    pub connection: Connection,
    /// Its node.
    pub node: Node,
}

/// A broker node a connection went to.
#[derive(Debug, Clone)]
pub struct Node {
    /// `host:port`, for logs and metrics.
    pub name: String,
    /// Where the node is in this process's order, for [`Node::lost`].
    position: usize,
}

impl Node {
    /// Says the connection to this node was lost: the next [`connect`] of this process starts
    /// at the node after it, so a node that went away silently (no refusal, only timeouts)
    /// does not cost a `connect_timeout` on every reconnect.
    pub fn lost(&self) {
        let _ = NEXT.compare_exchange(
            self.position,
            self.position.wrapping_add(1),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
}

/// The position in [`order`] the next connection attempt starts at: where the last connection
/// succeeded, or after the node that last failed.
static NEXT: AtomicUsize = AtomicUsize::new(0);

/// The process's order of `count` nodes: a permutation drawn once per process, so the
/// processes of a deployment spread their connections over the nodes while one process walks
/// them in a stable order (its connections land on the same node while that node is up).
fn order(count: usize) -> Vec<usize> {
    static SEED: OnceLock<u64> = OnceLock::new();
    let seed = *SEED.get_or_init(|| fastrand::u64(..));
    let mut order: Vec<usize> = (0..count).collect();
    fastrand::Rng::with_seed(seed).shuffle(&mut order);
    order
}

/// Opens one connection to the first node of `amqp.urls` (or `amqp.url`) that answers, walking
/// them in this process's order from where the last connection went, each attempt bounded by
/// `amqp.connect_timeout`. Named so operators can tell our connections apart in the broker, with
/// `amqp.heartbeat` unless the URL names its own.
pub async fn connect(config: &config::Amqp, name: &str) -> Result<Connected, Error> {
    let nodes = config.nodes();
    let order = order(nodes.len());
    let start = NEXT.load(Ordering::Relaxed);
    let mut last = None;
    for step in 0..nodes.len() {
        let position = start.wrapping_add(step) % nodes.len();
        let url = &nodes[order[position]];
        match connect_one(config, url, name).await {
            Ok(connection) => {
                NEXT.store(position, Ordering::Relaxed);
                let node = Node {
                    name: url.node(),
                    position,
                };
                info!(
                    connection = name,
                    node = node.name,
                    "connected to the broker"
                );
                return Ok(Connected { connection, node });
            }
            Err(error) => {
                debug!(connection = name, node = url.node(), error = %error, "broker node did not answer");
                NEXT.store(position.wrapping_add(1), Ordering::Relaxed);
                last = Some(error);
            }
        }
    }
    let last = last.unwrap_or_else(|| unreachable!("amqp.nodes() is never empty"));
    if nodes.len() == 1 {
        return Err(last);
    }
    Err(Error::NoNode {
        count: nodes.len(),
        last: Box::new(last),
    })
}

async fn connect_one(
    config: &config::Amqp,
    url: &config::AmqpUrl,
    name: &str,
) -> Result<Connection, Error> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let mut uri = url.uri();
    if uri.query.heartbeat.is_none() {
        // Validated at load to fit a u16.
        uri.query.heartbeat = Some(u16::try_from(config.heartbeat.as_secs()).unwrap_or(u16::MAX));
    }
    let connect = Connection::connect_uri(uri, properties);
    match tokio::time::timeout(config.connect_timeout, connect).await {
        Ok(Ok(connection)) => Ok(connection),
        Ok(Err(source)) => Err(Error::Connect {
            node: url.node(),
            source,
        }),
        Err(_) => Err(Error::ConnectTimeout {
            node: url.node(),
            after: config.connect_timeout,
        }),
    }
}

/// Label of the broker-node gauge.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct NodeLabel {
    /// Which of the process's connections: `publish`, `consume`.
    pub connection: &'static str,
    /// `host:port` of the node, from `amqp.urls` (so the series are bounded by the config).
    pub node: String,
}

/// 1 for the node each connection of the process goes to now, 0 for the nodes it went to
/// before: which node a process uses, as a metric.
#[derive(Debug, Clone, Default)]
pub struct NodeGauge {
    family: prometheus_client::metrics::family::Family<
        NodeLabel,
        prometheus_client::metrics::gauge::Gauge,
    >,
    current: std::sync::Arc<std::sync::Mutex<Vec<NodeLabel>>>,
}

impl NodeGauge {
    /// Registers the gauge as `broker_node` in `registry`.
    pub fn register(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "broker_node",
            "1 for the broker node (host:port) each connection goes to now, 0 for earlier ones",
            self.family.clone(),
        );
    }

    /// Records that `connection` now goes to `node` (`None`: not connected).
    pub fn set(&self, connection: &'static str, node: Option<&str>) {
        let Ok(mut current) = self.current.lock() else {
            return;
        };
        if let Some(at) = current.iter().position(|l| l.connection == connection) {
            let before = current.swap_remove(at);
            if Some(before.node.as_str()) == node {
                current.push(before);
                return;
            }
            self.family.get_or_create(&before).set(0);
        }
        if let Some(node) = node {
            let label = NodeLabel {
                connection,
                node: node.to_owned(),
            };
            self.family.get_or_create(&label).set(1);
            current.push(label);
        }
    }
}
