//! The one accept loop every HTTP server of ours runs (the ingress, the worker's health server,
//! the fake PayPal), and the open-file limit they need.
//!
//! Keeps three bounds: at most `max` connections are served at once; when all are taken, the
//! oldest is asked to close (at once when it waits for a request, as idle and slow-header
//! clients do; after its answer when a request is in progress), so a flood of idle connections
//! can neither starve the requests already accepted nor keep new clients waiting for long; and
//! an accept error (out of file descriptors, above all) pauses the loop instead of spinning.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long the loop pauses after an accept error: EMFILE/ENFILE clear only when some
/// connection closes, so trying again at once would spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// The connections of one server: a cap, their order of arrival, and a drain.
#[derive(Debug)]
pub struct Connections {
    slots: Arc<Semaphore>,
    max: usize,
    /// Each live connection's close request, oldest first; `Weak` ends with the connection.
    arrivals: Mutex<VecDeque<(CancellationToken, Weak<()>)>>,
    closing: CancellationToken,
    tracker: TaskTracker,
}

/// An accepted connection, ready to be served with [`Accepted::serve`].
pub struct Accepted {
    /// The client's socket, with `TCP_NODELAY` set.
    pub stream: TcpStream,
    /// The client's address.
    pub peer: SocketAddr,
    permit: OwnedSemaphorePermit,
    close: CancellationToken,
    alive: Arc<()>,
    tracker: TaskTracker,
}

impl Connections {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Arc<Connections> {
        let max = max.max(1);
        Arc::new(Connections {
            slots: Arc::new(Semaphore::new(max)),
            max,
            arrivals: Mutex::new(VecDeque::new()),
            closing: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })
    }

    /// Accepts connections on `listener` until `shutdown` resolves, handing each to `serve`.
    pub async fn accept_until(
        &self,
        listener: &TcpListener,
        shutdown: impl Future<Output = ()>,
        mut serve: impl FnMut(Accepted),
    ) {
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            if self.slots.available_permits() == 0 {
                self.close_oldest();
            }
            let permit = tokio::select! {
                () = &mut shutdown => return,
                permit = Arc::clone(&self.slots).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return, // never closed
                },
            };
            let accepted = tokio::select! {
                () = &mut shutdown => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, pause = ?ACCEPT_ERROR_PAUSE, "cannot accept a connection");
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            };
            // Answers are small single writes: don't let Nagle hold them behind a delayed ACK.
            if let Err(error) = stream.set_nodelay(true) {
                debug!(%peer, %error, "cannot set TCP_NODELAY");
            }
            serve(self.register(stream, peer, permit));
        }
    }

    fn register(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        permit: OwnedSemaphorePermit,
    ) -> Accepted {
        let close = self.closing.child_token();
        let alive = Arc::new(());
        if let Ok(mut arrivals) = self.arrivals.lock() {
            // Forget the connections that ended, so the list stays within about 2 × max.
            if arrivals.len() >= 2 * self.max {
                arrivals.retain(|(_, alive)| alive.strong_count() > 0);
            }
            arrivals.push_back((close.clone(), Arc::downgrade(&alive)));
        }
        Accepted {
            stream,
            peer,
            permit,
            close,
            alive,
            tracker: self.tracker.clone(),
        }
    }

    /// Asks the oldest live connection to close.
    fn close_oldest(&self) {
        let Ok(mut arrivals) = self.arrivals.lock() else {
            return;
        };
        while let Some((close, alive)) = arrivals.pop_front() {
            if alive.strong_count() > 0 && !close.is_cancelled() {
                debug!("connection limit reached; closing the oldest connection");
                close.cancel();
                return;
            }
        }
    }

    /// Asks every connection to close after the request in progress, and waits at most `grace`
    /// for them; true when all ended in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.closing.cancel();
        self.tracker.close();
        tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok()
    }
}

impl Accepted {
    /// Serves HTTP/1 on this connection with `http` and `service`, in a task of its own, until
    /// the client closes or the server asks it to (then after the request in progress).
    pub fn serve<S, B>(self, http: &http1::Builder, service: S)
    where
        S: HttpService<Incoming, ResBody = B> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let connection = http.serve_connection(TokioIo::new(self.stream), service);
        let (peer, permit, close, alive) = (self.peer, self.permit, self.close, self.alive);
        self.tracker.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = close.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                debug!(%peer, %error, "connection ended with an error");
            }
            drop((permit, alive));
        });
    }
}

/// Raises the soft open-file limit to the hard limit (each connection takes a descriptor; the
/// common soft default of 1024 is easily reached), and logs what it got.
pub fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => info!(limit, "open-file limit"),
        Err(error) => warn!(%error, "cannot raise the open-file limit"),
    }
}
