//! A private vhost on the real broker for one test, deleted on drop.

use std::num::NonZeroU16;
use std::time::Duration;

use futures_util::StreamExt;
use ipn_bridge::config::Config;
use ipn_bridge::topology::Topology;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties};

use super::PATIENCE;

const MANAGEMENT: &str = "http://127.0.0.1:15672/api";
pub const BROKER: &str = "127.0.0.1:5672";

/// Tests share one broker; a test that changes it for everyone (a resource alarm) takes this
/// exclusively, all others share it.
static BROKER_WIDE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Why this test may use the broker now.
#[allow(dead_code)] // held for its Drop only
enum Turn {
    Shared(tokio::sync::RwLockReadGuard<'static, ()>),
    Exclusive(tokio::sync::RwLockWriteGuard<'static, ()>),
    /// Under the turn of another `TestBroker` of the same test ([`TestBroker::another`]).
    Along,
}

/// A vhost of our own on the local RabbitMQ.
pub struct TestBroker {
    vhost: String,
    turn: Turn,
}

impl TestBroker {
    /// Creates a fresh vhost with full permissions for guest.
    pub async fn new() -> TestBroker {
        Self::create(Turn::Shared(BROKER_WIDE.read().await)).await
    }

    /// Like [`TestBroker::new`], but no other test uses the broker until this one is dropped:
    /// for tests that change broker-wide state.
    pub async fn exclusive() -> TestBroker {
        Self::create(Turn::Exclusive(BROKER_WIDE.write().await)).await
    }

    /// A second vhost for a test that needs two, under this one's turn. Taking a second turn
    /// instead could wait forever: the lock queues it behind a test waiting for an exclusive
    /// turn, which waits for this test's first turn to end.
    pub async fn another(&self) -> TestBroker {
        Self::create(Turn::Along).await
    }

    async fn create(turn: Turn) -> TestBroker {
        let vhost = format!("it-{}", uuid::Uuid::now_v7().simple());
        let client = super::http();
        let put = |path: String, body: &'static str| {
            client
                .put(format!("{MANAGEMENT}{path}"))
                .basic_auth("guest", Some("guest"))
                .header("content-type", "application/json")
                .body(body)
                .send()
        };
        let created = put(format!("/vhosts/{vhost}"), "{}")
            .await
            .expect("management API reachable");
        assert!(
            created.status().is_success(),
            "create vhost: {}",
            created.status()
        );
        let granted = put(
            format!("/permissions/{vhost}/guest"),
            r#"{"configure":".*","write":".*","read":".*"}"#,
        )
        .await
        .expect("management API reachable");
        assert!(
            granted.status().is_success(),
            "permissions: {}",
            granted.status()
        );
        TestBroker { vhost, turn }
    }

    /// Restarts the RabbitMQ application (`rabbitmqctl stop_app`, `down`, `start_app`): every
    /// client connection drops; durable queues and persistent messages come back. Only for an
    /// [`TestBroker::exclusive`] broker. If the test panics meanwhile, the node is started again.
    pub async fn restart_node(&self, down: Duration) {
        assert!(
            matches!(self.turn, Turn::Exclusive(_)),
            "restarting the broker needs TestBroker::exclusive"
        );
        let mut stopped = StartOnDrop(true);
        rabbitmqctl_async(&["stop_app"]).await;
        tokio::time::sleep(down).await;
        rabbitmqctl_async(&["start_app"]).await;
        stopped.0 = false;
        rabbitmqctl_async(&["await_startup"]).await;
        let management = async {
            while !super::http()
                .get(format!("{MANAGEMENT}/overview"))
                .basic_auth("guest", Some("guest"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(PATIENCE * 3, management)
            .await
            .expect("management API back after start_app");
    }

    /// Applies a policy to the queues of this vhost whose names match `pattern`.
    pub async fn set_queue_policy(&self, name: &str, pattern: &str, definition: serde_json::Value) {
        let url = format!("{MANAGEMENT}/policies/{}/{name}", self.vhost);
        let body = serde_json::json!({ "pattern": pattern, "definition": definition, "apply-to": "queues" });
        let response = super::http()
            .put(url)
            .basic_auth("guest", Some("guest"))
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .expect("management API reachable");
        assert!(
            response.status().is_success(),
            "policy {name}: {}",
            response.status()
        );
    }

    /// The routing keys binding `queue` to `exchange` in this vhost.
    pub async fn binding_keys(&self, queue: &str, exchange: &str) -> Vec<String> {
        let bindings = self
            .management_get(&format!("bindings/{}/e/{exchange}/q/{queue}", self.vhost))
            .await;
        let list = bindings.as_array().expect("a list");
        list.iter()
            .filter_map(|b| b["routing_key"].as_str().map(str::to_owned))
            .collect()
    }

    /// The management API's description of `queue` in this vhost (type, arguments, ...).
    pub async fn queue_info(&self, queue: &str) -> serde_json::Value {
        self.management_get(&format!("queues/{}/{queue}", self.vhost))
            .await
    }

    async fn management_get(&self, path: &str) -> serde_json::Value {
        let response = super::http()
            .get(format!("{MANAGEMENT}/{path}"))
            .basic_auth("guest", Some("guest"))
            .send()
            .await
            .expect("management API reachable");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        serde_json::from_str(&response.text().await.expect("body")).expect("JSON")
    }

    /// The AMQP URL of this vhost through `address` (the broker itself, or a proxy).
    pub fn url_via(&self, address: &str) -> String {
        format!("amqp://guest:guest@{address}/{}", self.vhost)
    }

    /// A config for this vhost: 4 shards, short timeouts and fast reconnects.
    pub fn config(&self) -> Config {
        self.config_via(BROKER)
    }

    /// Like [`TestBroker::config`], but connecting through `address`.
    pub fn config_via(&self, address: &str) -> Config {
        let mut config = Config::default();
        config.amqp.url = self.url_via(address).parse().expect("valid amqp url");
        config.amqp.reconnect_min = Duration::from_millis(50);
        config.amqp.reconnect_max = Duration::from_millis(500);
        config.amqp.connect_timeout = Duration::from_secs(2);
        config.topology.shards = NonZeroU16::new(4).expect("non-zero");
        config.ingress.confirm_timeout = Duration::from_secs(2);
        config.ingress.listen = "127.0.0.1:0".parse().expect("address");
        config
    }

    /// A direct channel into this vhost, for inspecting queues.
    pub async fn channel(&self) -> Channel {
        let connection =
            Connection::connect(&self.url_via(BROKER), ConnectionProperties::default())
                .await
                .expect("broker reachable");
        connection.create_channel().await.expect("channel")
    }

    /// Takes every message from `queue`, in order. (Quorum queues with single active consumer
    /// refuse basic.get, so this consumes as many messages as the queue reports, with that many
    /// as the prefetch: a message arriving meanwhile stays in the queue for the next call, where
    /// an auto-ack consumer would take it and lose it with the consumer.)
    pub async fn drain(&self, channel: &Channel, queue: &str) -> Vec<Delivery> {
        let count = self.count(channel, queue).await;
        if count == 0 {
            return Vec::new();
        }
        let prefetch = u16::try_from(count).expect("a drain of at most 65535 messages");
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .expect("basic.qos");
        let mut consumer = channel
            .basic_consume(
                queue.into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("basic.consume");
        let mut messages: Vec<Delivery> = Vec::new();
        while messages.len() < count as usize {
            let next = tokio::time::timeout(PATIENCE, consumer.next()).await;
            let delivery = next
                .expect("message in time")
                .expect("consumer open")
                .expect("delivery");
            messages.push(delivery);
        }
        let tag = consumer.tag();
        channel
            .basic_cancel(tag, BasicCancelOptions::default())
            .await
            .expect("basic.cancel");
        if let Some(last) = messages.last() {
            last.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("basic.ack");
        }
        messages
    }

    /// Takes every message from every shard queue, with its shard number.
    pub async fn drain_shards(&self, topology: &Topology) -> Vec<(u16, Delivery)> {
        let channel = self.channel().await;
        let mut all = Vec::new();
        for shard in 0..topology.shards().get() {
            for delivery in self.drain(&channel, &topology.shard_queue(shard)).await {
                all.push((shard, delivery));
            }
        }
        all
    }

    /// Takes every message from every shard queue; returns their bodies.
    pub async fn queued_bodies(&self, topology: &Topology) -> Vec<Vec<u8>> {
        let drained = self.drain_shards(topology).await;
        drained
            .into_iter()
            .map(|(_, delivery)| delivery.data)
            .collect()
    }

    /// Waits until `queue` exists and holds at least `n` messages (panics after [`PATIENCE`]).
    /// The worker declares the business services' queues when it starts consuming, so a test
    /// may ask before the queue is there.
    pub async fn wait_for(&self, queue: &str, n: u32) {
        let connection =
            Connection::connect(&self.url_via(BROKER), ConnectionProperties::default())
                .await
                .expect("broker reachable");
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let filled = async {
            let mut channel = connection.create_channel().await.expect("channel");
            loop {
                let declared = channel
                    .queue_declare(queue.into(), passive, FieldTable::default())
                    .await;
                match declared {
                    Ok(declared) if declared.message_count() >= n => return,
                    Ok(_) => {}
                    // Not declared yet: that closed the channel.
                    Err(_) => channel = connection.create_channel().await.expect("channel"),
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        };
        tokio::time::timeout(PATIENCE, filled)
            .await
            .unwrap_or_else(|_| panic!("{n} messages in {queue} in time"));
        let _ = connection.close(200, "done".into()).await;
    }

    /// Messages ready in `queue` (the queue must exist).
    pub async fn count(&self, channel: &Channel, queue: &str) -> u32 {
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .expect("queue exists");
        queue.message_count()
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        let url = format!("{MANAGEMENT}/vhosts/{}", self.vhost);
        // Drop cannot await, and the test's runtime may be single-threaded: delete from a thread
        // with a runtime of its own, and wait for it so the next test starts clean.
        let deleted = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                super::http()
                    .delete(url)
                    .basic_auth("guest", Some("guest"))
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(std::io::Error::other)
            })
        })
        .join();
        if !matches!(deleted, Ok(Ok(()))) {
            eprintln!("could not delete test vhost {}", self.vhost);
        }
    }
}

/// A disk alarm on the whole broker, cleared (to the previous limit) when dropped, even if the
/// test panics. RabbitMQ then blocks every publishing connection.
pub struct DiskAlarm {
    previous_limit: String,
}

impl DiskAlarm {
    /// Raises the disk free limit far above the free space.
    pub fn raise() -> DiskAlarm {
        let previous_limit = rabbitmqctl(&["eval", "rabbit_disk_monitor:get_disk_free_limit()."]);
        rabbitmqctl(&["set_disk_free_limit", "1000000GB"]);
        DiskAlarm {
            previous_limit: previous_limit.trim().to_owned(),
        }
    }
}

impl Drop for DiskAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&["set_disk_free_limit", &self.previous_limit]);
    }
}

/// Starts the RabbitMQ application when dropped while armed (a test panicked with it stopped).
struct StartOnDrop(bool);

impl Drop for StartOnDrop {
    fn drop(&mut self) {
        if self.0 {
            rabbitmqctl(&["start_app"]);
        }
    }
}

/// Runs `rabbitmqctl args`, killed if it has not finished in two minutes (a broker that never
/// comes back fails the test instead of hanging it).
async fn rabbitmqctl_async(args: &[&str]) {
    let run = tokio::process::Command::new("rabbitmqctl")
        .args(args)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(PATIENCE * 12, run)
        .await
        .unwrap_or_else(|_| panic!("rabbitmqctl {args:?} did not finish in {:?}", PATIENCE * 12))
        .expect("rabbitmqctl runs");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
}

fn rabbitmqctl(args: &[&str]) -> String {
    let output = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}
