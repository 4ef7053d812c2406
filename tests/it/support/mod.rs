//! Shared test fixtures: a vhost per test, a cuttable TCP proxy, an in-process ingress.

pub mod broker;
pub mod ingress;
pub mod proxy;

pub use broker::{DiskAlarm, TestBroker};
pub use ingress::{post_form, spawn_ingress};
pub use proxy::Proxy;

use std::path::PathBuf;
use std::time::Duration;

/// The generous bound every wait in these tests uses.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// Every sample IPN body, sorted by file name.
pub fn samples() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/samples");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/samples exists")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "txt"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(&path).expect("readable sample"))
        })
        .collect()
}

/// One sample's body.
pub fn sample(name: &str) -> Vec<u8> {
    samples()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, body)| body)
        .expect("sample exists")
}
