//! `ipn-worker`: turns raw IPNs from the shard queues into verified, deduplicated business
//! events on `<p>.events`, each exactly once under a stable id, in order per key.
//!
//! - [`service`]: the worker assembled: its parts, the loops beside the session, shutdown.
//! - `session`: the consume connection: a consumer per owned shard, reconnects, bounded RPCs.
//! - `lanes`: one shard's deliveries in lanes per order key; in-place retries; acks.
//! - [`pipeline`]: the steps of one IPN (verify, policy, claim, publish, confirm, mark done).
//! - [`gate`]: order while a key waits: delay tiers, parking, blocked keys and held IPNs.
//! - [`intake`]: the intake lane's re-routes (WeChat Pay's), several at once, each key's in order.
//! - [`ownership`]: which worker processes which shard (rendezvous hashing over live workers, each share at most ⌈S/K⌉).
//! - `health`: `/healthz`, `/readyz`, `/metrics` on `worker.listen`.
//! - `housekeeping`: purging old dedup records, refreshing the blocked-key gauges.
//! - `watch`: the business services' queues: depth, consumers, dead-lettered; alerts.
//! - [`metrics`]: the worker's Prometheus metrics.

pub mod gate;
mod health;
mod housekeeping;
pub mod intake;
mod lanes;
pub mod metrics;
pub mod ownership;
pub mod pipeline;
pub mod service;
mod session;
mod watch;

pub use gate::Settled;
pub use pipeline::{Inbound, Outcome, Pipeline};
pub use service::{Error, id, run};
pub use session::host;
