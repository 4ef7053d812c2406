//! `ipn-ingress`: accepts PayPal IPNs over HTTP and answers 200 once RabbitMQ confirmed them.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ipn_bridge::config::Config;
use ipn_bridge::{ingress, shutdown, telemetry};

/// Accepts PayPal IPNs over HTTP and persists them in RabbitMQ before answering 200.
// mimalloc: the request path allocates small buffers on every request; glibc malloc cost a
// tenth of the ingress's CPU under load (docs/PERFORMANCE.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    let config = match Config::for_binary("ipn-ingress", args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    telemetry::init("ipn-ingress", config.telemetry.format);
    let shutdown = shutdown::signal();
    ipn_bridge::server::raise_open_file_limit();
    let listener = match bind(config.ingress.listen, "ingress.listen").await {
        Ok(listener) => listener,
        Err(code) => return code,
    };
    let admin = match config.ingress.admin_listen {
        Some(address) => match bind(address, "ingress.admin_listen").await {
            Ok(listener) => Some(listener),
            Err(code) => return code,
        },
        None => None,
    };
    ingress::run(config, listener, admin, shutdown).await;
    ExitCode::SUCCESS
}

/// Listens on `address`, or says why not: a port in use or not ours to bind is a configuration
/// problem (EX_CONFIG).
async fn bind(address: SocketAddr, key: &str) -> Result<tokio::net::TcpListener, ExitCode> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|error| {
            eprintln!("ipn-ingress: cannot listen on {address} ({key}): {error}");
            ExitCode::from(64)
        })
}
