//! Reads the sample IPN bodies in tests/samples/. Shared, by `#[path]`, by the unit tests in
//! src/provider/paypal, the integration tests and the benchmark, so there is one way to load them.

use std::path::PathBuf;

/// Every sample IPN body with its file name, sorted by file name.
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
#[allow(dead_code)] // not every includer needs it
pub fn sample(name: &str) -> Vec<u8> {
    samples()
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, body)| body)
        .expect("sample exists")
}
