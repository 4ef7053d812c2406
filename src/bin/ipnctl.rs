//! `ipnctl`: the operator's tool for ipn-bridge.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ipn_bridge::config::Config;
use ipn_bridge::ctl;

/// Operate ipn-bridge: declare its topology, send a sample IPN.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML config file (see config/example.toml); IPN_* variables override it.
    #[arg(long, env = "IPN_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Exchanges and queues.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
    /// POST a raw IPN body from FILE the way PayPal does, and print the answer.
    Send {
        /// File holding the raw form body, sent byte for byte.
        file: PathBuf,
        /// Ingress URL; default http://<ingress.listen><ingress.path> from the config.
        #[arg(long)]
        url: Option<String>,
    },
    /// Run a fake PayPal postback endpoint (for local demos and tests) until Ctrl-C.
    FakePaypal {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9090")]
        listen: std::net::SocketAddr,
        /// verified, invalid, 500, garbage, silent or slow:<duration>.
        #[arg(long, default_value = "verified")]
        answer: ipn_bridge::fake_paypal::Answer,
    },
}

#[derive(Subcommand)]
enum TopologyAction {
    /// Declare every exchange and queue (safe to repeat).
    Declare,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let config = match Config::for_binary("ipnctl", args.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match run(args.command, &config).await {
        Ok(code) => code,
        Err(error) => {
            eprintln!("ipnctl: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, config: &Config) -> anyhow::Result<ExitCode> {
    match command {
        Command::Topology {
            action: TopologyAction::Declare,
        } => {
            println!("{}", ctl::declare_topology(config).await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::FakePaypal { listen, answer } => {
            ctl::fake_paypal(listen, answer).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Send { file, url } => {
            let body =
                std::fs::read(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let url = url.unwrap_or_else(|| ctl::default_ingress_url(config));
            let (status, answer) = ctl::send(&url, body).await?;
            println!("{}", format!("{status} {}", answer.trim()).trim_end());
            Ok(if (200..300).contains(&status) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}
