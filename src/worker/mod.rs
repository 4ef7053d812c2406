//! `ipn-worker`: turns raw IPNs from the shard queues into verified, deduplicated business
//! events on `<p>.events`, each exactly once under a stable id.
//!
//! Built so far: [`pipeline`], the per-IPN steps. The consume loop (shard subscriptions, lanes
//! per order key, acks, shutdown) is the next step of the worker issue.

pub mod pipeline;

pub use pipeline::{Inbound, Outcome, Pipeline};
