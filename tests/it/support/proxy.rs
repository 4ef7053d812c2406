//! A TCP proxy in front of the broker (or any TCP service) that a test can cut, pause and
//! restore, to simulate an outage for real (the client sees its sockets closed or its confirms
//! held back).

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Forward both ways.
    Open,
    /// Close every connection and refuse new ones (accepted, then closed at once).
    Cut,
    /// Keep connections, but hold everything the broker sends (confirms included).
    HoldReplies,
    /// Forward; but a connection accepted now gets nothing more from the broker once its AMQP
    /// handshake is done (`connection.open-ok`), for as long as it lives, whatever the mode
    /// becomes: a node that accepted a client and then stopped answering it.
    FreezeAfterOpen,
}

/// A proxy to the local broker (or another service) on a port of its own.
pub struct Proxy {
    address: String,
    mode: watch::Sender<Mode>,
    target: watch::Sender<String>,
    task: JoinHandle<()>,
}

impl Proxy {
    /// Starts forwarding 127.0.0.1:<port> to the broker.
    pub async fn start() -> Proxy {
        Self::to(super::broker::BROKER).await
    }

    /// Starts forwarding 127.0.0.1:<port> to `target` (host:port).
    pub async fn to(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let address = listener.local_addr().expect("local addr").to_string();
        let (mode, _) = watch::channel(Mode::Open);
        let (target, _) = watch::channel(target.to_owned());
        let task = tokio::spawn(accept(listener, target.subscribe(), mode.clone()));
        Proxy {
            address,
            mode,
            target,
            task,
        }
    }

    /// Sends new connections to `target` from now on (a stable address moved to another
    /// server, as a virtual IP or a DNS name is after a failover); open ones stay where they are.
    pub fn retarget(&self, target: &str) {
        self.target.send_replace(target.to_owned());
    }

    /// host:port to connect to instead of the broker.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// Closes every proxied connection and refuses new ones until [`Proxy::restore`].
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Holds back everything the broker sends until [`Proxy::restore`].
    pub fn hold_replies(&self) {
        self.mode.send_replace(Mode::HoldReplies);
    }

    /// Freezes the connections accepted from now on after their handshake (until
    /// [`Proxy::restore`]; those frozen stay frozen).
    pub fn freeze_after_open(&self) {
        self.mode.send_replace(Mode::FreezeAfterOpen);
    }

    /// Forwards normally again.
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Open);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.mode.send_replace(Mode::Cut);
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, target: watch::Receiver<String>, mode: watch::Sender<Mode>) {
    while let Ok((client, _)) = listener.accept().await {
        if *mode.borrow() == Mode::Cut {
            continue; // dropping `client` closes it
        }
        let target = target.borrow().clone();
        let Ok(broker) = TcpStream::connect(target.as_str()).await else {
            continue;
        };
        let (client_read, client_write) = client.into_split();
        let (broker_read, broker_write) = broker.into_split();
        let freeze = *mode.borrow() == Mode::FreezeAfterOpen;
        tokio::spawn(pipe(client_read, broker_write, mode.subscribe(), false));
        if freeze {
            tokio::spawn(freeze_after_open(
                broker_read,
                client_write,
                mode.subscribe(),
            ));
        } else {
            tokio::spawn(pipe(broker_read, client_write, mode.subscribe(), true));
        }
    }
}

/// Forwards what the broker sends up to and including `connection.open-ok` (a method frame of
/// class 10, method 41), then nothing, until the proxy is cut.
async fn freeze_after_open(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut unparsed = Vec::new();
    let mut opened = false;
    while !opened {
        let Some(n) = read_or_cut(&mut from, &mut buffer, &mut mode).await else {
            return;
        };
        unparsed.extend_from_slice(&buffer[..n]);
        // Frames: type (1), channel (2), size (4), payload, end byte; the protocol header the
        // broker may send first is not a frame, but the client sends that, not the broker.
        while unparsed.len() >= 7 {
            let size = u32::from_be_bytes([unparsed[3], unparsed[4], unparsed[5], unparsed[6]]);
            let length = 7 + size as usize + 1;
            if unparsed.len() < length {
                break;
            }
            opened |= unparsed[0] == 1 && unparsed[7..11] == [0, 10, 0, 41];
            unparsed.drain(..length);
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
    // Frozen: the connection stays open, and whatever the broker answers is dropped.
    let _ = mode.wait_for(|m| *m == Mode::Cut).await;
}

/// The next read of `from` into `buffer`: its length, or `None` once the peer closed, the read
/// failed or the proxy was cut.
async fn read_or_cut(
    from: &mut OwnedReadHalf,
    buffer: &mut [u8],
    mode: &mut watch::Receiver<Mode>,
) -> Option<usize> {
    let read = tokio::select! {
        read = from.read(buffer) => read,
        _ = mode.wait_for(|m| *m == Mode::Cut) => return None,
    };
    match read {
        Ok(0) | Err(_) => None,
        Ok(n) => Some(n),
    }
}

/// Copies `from` to `to` until either closes or the proxy is cut. `replies` marks the broker to
/// client direction, the one `HoldReplies` holds.
async fn pipe(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    mut mode: watch::Receiver<Mode>,
    replies: bool,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let Some(n) = read_or_cut(&mut from, &mut buffer, &mut mode).await else {
            return;
        };
        if replies {
            let released = mode.wait_for(|m| *m != Mode::HoldReplies).await.map(|m| *m);
            if !matches!(released, Ok(Mode::Open | Mode::FreezeAfterOpen)) {
                return;
            }
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            return;
        }
    }
}
