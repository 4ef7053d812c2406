//! The ingress, run in-process exactly as the binary runs it, on a port of its own.

use std::net::SocketAddr;

use ipn_bridge::config::Config;
use ipn_bridge::topology::Topology;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use super::PATIENCE;

/// A running ingress; [`RunningIngress::stop`] shuts it down like SIGTERM does.
pub struct RunningIngress {
    /// Where it listens.
    pub address: SocketAddr,
    /// `http://<address><path>`.
    pub url: String,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

/// Starts `ipn_bridge::ingress::run` on 127.0.0.1:0, without an admin listener (whatever
/// `ingress.admin_listen` says: the binary's tests cover that one, through [`ingress_binary`]).
pub async fn spawn_ingress(config: Config) -> RunningIngress {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ingress");
    let address = listener.local_addr().expect("local addr");
    let url = format!("http://{address}{}", config.ingress.path);
    let (shutdown, signal) = oneshot::channel::<()>();
    let task = tokio::spawn(ipn_bridge::ingress::run(config, listener, None, async {
        // Either a send or a dropped sender means "stop".
        let _ = signal.await;
    }));
    RunningIngress {
        address,
        url,
        shutdown: Some(shutdown),
        task,
    }
}

/// Starts the ingress and waits until it is ready; also returns the topology it publishes to.
pub async fn ready_ingress(config: Config) -> (Topology, RunningIngress) {
    let topology = Topology::new(&config.topology);
    let ingress = spawn_ingress(config).await;
    ingress.wait_ready().await;
    (topology, ingress)
}

impl RunningIngress {
    /// `http://<address><path>` for another path on the same server.
    pub fn path(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }

    /// Polls `/readyz` until it answers 200; panics after [`PATIENCE`].
    pub async fn wait_ready(&self) {
        let client = super::http();
        let url = self.path("/readyz");
        let ready = async {
            loop {
                if let Ok(response) = client.get(&url).send().await
                    && response.status() == 200
                {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(PATIENCE, ready)
            .await
            .expect("ingress became ready");
    }

    /// Reads one metric's value from `/metrics` (the first line starting with `name`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        super::metric(&self.path("/metrics"), name).await
    }

    /// Triggers shutdown without waiting for it to finish.
    pub fn begin_shutdown(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
    }

    /// Shuts down and waits until `run` returned; panics after [`PATIENCE`].
    pub async fn stop(mut self) {
        self.begin_shutdown();
        tokio::time::timeout(PATIENCE, &mut self.task)
            .await
            .expect("ingress stopped in time")
            .expect("ingress task did not panic");
    }
}

/// POSTs `body` as a form, the way PayPal does; returns status and text.
pub async fn post_form(url: &str, body: Vec<u8>) -> (u16, String) {
    let response = super::http()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .expect("ingress answers");
    let status = response.status().as_u16();
    (status, response.text().await.expect("body"))
}

/// The real `ipn-ingress` binary on a free port of 127.0.0.1, for `broker`'s vhost with 4 shards
/// and `extra` variables; ready when returned. Killed when the child is dropped.
pub async fn ingress_binary(
    broker: &super::TestBroker,
    extra: &[(&str, &str)],
) -> (tokio::process::Child, u16) {
    ingress_binary_logging(broker, extra, std::process::Stdio::inherit()).await
}

/// [`ingress_binary`], its log lines (stdout) going to `log`.
pub async fn ingress_binary_logging(
    broker: &super::TestBroker,
    extra: &[(&str, &str)],
    log: std::process::Stdio,
) -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ipn-ingress"))
        .env("IPN_AMQP__URL", broker.url_via(super::broker::BROKER))
        .env("IPN_TOPOLOGY__SHARDS", "4")
        .env("IPN_INGRESS__LISTEN", format!("127.0.0.1:{port}"))
        .envs(extra.iter().copied())
        .stdout(log)
        .kill_on_drop(true)
        .spawn()
        .expect("ipn-ingress starts");
    let ready = async {
        loop {
            let readiness = super::http()
                .get(format!("http://127.0.0.1:{port}/readyz"))
                .send()
                .await;
            if readiness.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(super::PATIENCE, ready)
        .await
        .expect("binary became ready");
    (child, port)
}
