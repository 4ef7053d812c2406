//! `ipn-worker`: verifies raw IPNs with PayPal and publishes each as one event, in order per key.
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ipn_bridge::config::Config;
use ipn_bridge::{shutdown, telemetry, worker};

// mimalloc, as in the ingress: every IPN allocates its form, event JSON and frames; glibc malloc
// took about a seventh of the worker's CPU in the end-to-end bench (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Verifies IPNs from the shard queues and publishes them as events on <prefix>.events.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML config file (see config/example.toml); IPN_* variables override it.
    #[arg(long, env = "IPN_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut config = match Config::for_binary("ipn-worker", args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    telemetry::init("ipn-worker", config.telemetry.format);
    // Known before the first line, so every line names this worker.
    let id = worker::id(&config);
    telemetry::set_instance(&id);
    config.worker.id = Some(id);
    let shutdown = shutdown::signal();
    ipn_bridge::server::raise_open_file_limit();
    let address = config.worker.listen;
    let health = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(error) => {
            // A port in use or not ours to bind is a configuration problem: EX_CONFIG.
            eprintln!("ipn-worker: cannot listen on {address} (worker.listen): {error}");
            return ExitCode::from(64);
        }
    };
    match worker::run(config, health, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ipn-worker: {}", ipn_bridge::bounded::error_chain(&error));
            ExitCode::FAILURE
        }
    }
}
