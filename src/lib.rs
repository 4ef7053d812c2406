//! ipn-bridge: PayPal IPN callbacks made reliable with RabbitMQ in the middle.
//!
//! - [`backoff`]: the one retry policy (doubling, capped, jittered) of every retry loop.
//! - [`bounded`]: bounds on every value derived from a request (keys, stored and logged text).
//! - [`config`]: defaults, TOML file, `IPN_*` environment; pure loading.
//! - [`form`], [`keys`]: the IPN body read byte-exactly, charset-aware fields, order keys and
//!   shards.
//! - [`policy`]: what a VERIFIED IPN must also be (environment, receiver), else quarantine.
//! - [`provider`]: the seam that keeps PayPal specifics out of the pipeline.
//! - [`topology`]: every exchange and queue name, and their declaration.
//! - [`amqp`]: connections and the self-healing confirm-mode publisher.
//! - [`ingress`]: the HTTP server that answers 200 only after the broker confirmed.
//! - [`event`]: the JSON event a verified IPN becomes, and its routing key.
//! - [`store`]: PostgreSQL: dedup records and per-key sequences, claimed before publishing.
//! - [`provider::paypal::verify`]: PayPal's postback, `cmd=_notify-validate&` + the exact bytes.
//! - [`fake_paypal`]: a fake postback endpoint for tests and local demos.
//! - [`worker`]: from raw IPN to confirmed event, in order per key; delay tiers, parking,
//!   blocked keys and held IPNs.
//! - [`alert`]: email and webhook alerts, rate-limited per cause, never blocking the worker.
//! - [`ctl`]: what `ipnctl` does.
//! - [`server`]: the accept loop of every HTTP server (connection cap, accept-error pause).
//! - [`telemetry`], [`shutdown`]: logs and signals for the binaries.
#![forbid(unsafe_code)]

pub mod alert;
pub mod amqp;
pub mod backoff;
pub mod bounded;
pub mod config;
pub mod contract;
pub mod ctl;
pub mod downstream;
pub mod event;
pub mod fake_paypal;
pub mod fake_providers;
pub mod form;
pub mod ingress;
pub mod keys;
pub mod policy;
pub mod provider;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod worker;
