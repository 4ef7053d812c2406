//! The one accept loop every HTTP server of ours runs (the ingress, the worker's health server,
//! the fake PayPal), and the open-file limit they need.
//!
//! Keeps three bounds: at most `max` connections are served at once; when all are taken, the
//! oldest is asked to close (at once when it waits for a request, as idle and slow-header
//! clients do; after its answer when a request is in progress), so a flood of idle connections
//! can neither starve the requests already accepted nor keep new clients waiting for long; and
//! an accept error (out of file descriptors, above all) pauses the loop instead of spinning.
//! [`http1_settings`], the HTTP settings of the ingress and the worker's health server, add a
//! fourth: the longest request head read ([`MAX_HEAD_BYTES`]) and the time it may take.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::service::Service;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The most a connection's read buffer holds, and so the longest request head (request line
/// and headers) taken: a longer one is answered `431` and the connection closed. With hyper's
/// default (~400 KiB) each connection could pin that much with a head that never ends (200 of
/// them grew the ingress by 114 MiB: docs/reliability.md, "Hostile input"); the longest headers
/// a provider sends, WeChat Pay's four signature headers, are taken up to 1 KiB each
/// (`wechatpay::MAX_HEADER_BYTES`), and 16 KiB is what Node.js allows.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;

/// The HTTP/1 settings every server of ours serves with: a request head must arrive within
/// `header_read_timeout` and be at most [`MAX_HEAD_BYTES`].
pub fn http1_settings(header_read_timeout: Duration) -> http1::Builder {
    let mut http = http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES);
    http
}

/// How long the loop pauses after an accept error: EMFILE/ENFILE clear only when some
/// connection closes, so trying again at once would spin a core.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(100);

/// How long a full server waits for the connection it asked to close before asking the next.
const EVICTION_STEP: Duration = Duration::from_millis(50);

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
            let permit = tokio::select! {
                () = &mut shutdown => return,
                permit = self.slot() => permit,
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

    /// A free slot; while there is none, asks the oldest connection to close, and the next
    /// oldest after each [`EVICTION_STEP`] that freed nothing (the oldest may be finishing a
    /// request).
    async fn slot(&self) -> OwnedSemaphorePermit {
        loop {
            if let Ok(permit) = Arc::clone(&self.slots).try_acquire_owned() {
                return permit;
            }
            self.close_oldest();
            let acquire = Arc::clone(&self.slots).acquire_owned();
            if let Ok(Ok(permit)) = tokio::time::timeout(EVICTION_STEP, acquire).await {
                return permit;
            }
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
    /// the client closes or the server asks it to close: at once when no request is in the
    /// service (idle, or still sending its request head), else after that request's answer.
    pub fn serve<S, B>(self, http: &http1::Builder, service: S)
    where
        S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let busy = Arc::new(AtomicUsize::new(0));
        let service = Tracked {
            inner: service,
            busy: Arc::clone(&busy),
        };
        let connection = http.serve_connection(TokioIo::new(self.stream), service);
        let (peer, permit, close, alive) = (self.peer, self.permit, self.close, self.alive);
        self.tracker.spawn(async move {
            // Held until the connection ends: its slot, and its place in the arrival list.
            let _held = (permit, alive);
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = close.cancelled() => {
                    if busy.load(Ordering::Acquire) == 0 {
                        debug!(%peer, "closing a connection with no request in progress");
                        return;
                    }
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

/// A service that counts the requests it is handling, so a connection knows whether closing it
/// would cut a request short.
struct Tracked<S> {
    inner: S,
    busy: Arc<AtomicUsize>,
}

/// Counts one request for as long as its handler runs (dropped with it, if it is cancelled).
struct Busy(Arc<AtomicUsize>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<S: Service<Request<Incoming>>> Service<Request<Incoming>> for Tracked<S>
where
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.busy.fetch_add(1, Ordering::AcqRel);
        let busy = Busy(Arc::clone(&self.busy));
        let handling = self.inner.call(request);
        Box::pin(async move {
            let answer = handling.await;
            drop(busy);
            answer
        })
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
