//! Shared test fixtures: a vhost per test, a cuttable TCP proxy, an in-process ingress.

pub mod alerts;
pub mod broker;
pub mod db;
pub mod ingress;
pub mod proxy;
pub mod services;

pub use alerts::{FakeSmtp, FakeWebhook};
pub use broker::{DiskAlarm, TestBroker};
pub use db::TestDb;
pub use ingress::{post_form, ready_ingress, spawn_ingress};
pub use proxy::Proxy;
pub use services::Services;

#[path = "../../samples.rs"]
mod samples_dir;

pub use samples_dir::{sample, samples};

use std::time::Duration;

/// The generous bound every wait in these tests uses.
pub const PATIENCE: Duration = Duration::from_secs(10);
