//! `ipn-worker`: turns raw IPNs from the shard queues into verified, deduplicated business
//! events on `<p>.events`, each exactly once under a stable id, in order per key.
//!
//! - [`pipeline`]: the steps of one IPN (verify, policy, claim, publish, confirm, mark done).
//! - [`gate`]: order while a key waits: delay tiers, parking, blocked keys and held IPNs.
//! - [`consume`]: subscriptions to every shard queue, lanes per order key, acks, shutdown, and
//!   `/healthz`, `/readyz`, `/metrics` on `worker.listen`.
//! - [`ownership`]: which worker processes which shard (rendezvous hashing over live workers).
//! - [`metrics`]: the worker's Prometheus metrics.

pub mod consume;
pub mod gate;
pub mod metrics;
pub mod ownership;
pub mod pipeline;

pub use consume::run;
pub use gate::Settled;
pub use pipeline::{Inbound, Outcome, Pipeline};
