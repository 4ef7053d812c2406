//! The benchmark harness: every figure beside its ceiling, measured in the same run, and the
//! resident memory of each long-running binary at rest and under load.
//!
//! ```sh
//! cargo bench --bench bridge                # all: ingress, e2e at 0 and 200 ms, providers
//! cargo bench --bench bridge -- ingress --concurrency 256 --seconds 30
//! cargo bench --bench bridge -- e2e --paypal-delay 200ms
//! cargo bench --bench bridge -- providers   # PayPal, Alipay, WeChat Pay side by side
//! ```
//! `ingress` (benches/ingress.rs): the real `ipn-ingress` under HTTP load vs a raw lapin publisher
//! with confirms. `e2e` (benches/e2e.rs): ingress → real `ipn-worker` → downstream vs a raw relay
//! (consume → republish → ack). `providers` (benches/providers.rs): each provider's
//! notifications through the ingress and the worker, beside PayPal's. All check every `200`
//! against what arrived, and fail if one is missing. Needs RabbitMQ and PostgreSQL on 127.0.0.1 (`scripts/services`). docs/PERFORMANCE.md
//! has the results.

use clap::{Parser, Subcommand};

mod e2e;
mod ingress;
mod providers;
#[path = "../tests/samples.rs"]
mod samples_dir;
mod support;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Ignored: cargo bench passes it.
    #[arg(long, hide = true, global = true)]
    bench: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Ingress vs the raw publisher; the ingress's memory.
    Ingress(ingress::Args),
    /// Ingress → worker → downstream vs the raw relay; the worker's memory.
    E2e(e2e::Args),
    /// PayPal, Alipay and WeChat Pay through the ingress and the worker, side by side.
    Providers(providers::Args),
    /// All with their defaults, e2e with PayPal answering at once and after 200 ms (the default
    /// when no command is given; about 10 minutes).
    All,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let summary = match cli.command.unwrap_or(Command::All) {
        Command::Ingress(args) => ingress::bench(&args)?,
        Command::E2e(args) => e2e::bench(&args)?,
        Command::Providers(args) => providers::bench(&args)?,
        Command::All => {
            let mut summary = ingress::bench(&parse::<ingress::Args>(&[]))?;
            for delay in ["0ms", "200ms"] {
                let args = parse::<e2e::Args>(&["--paypal-delay", delay]);
                summary.extend(e2e::bench(&args)?);
            }
            summary.extend(providers::bench(&parse::<providers::Args>(&[]))?);
            summary
        }
    };
    println!("\n## Summary (machine: {} cores)", support::cores());
    summary.print();
    Ok(())
}

/// A command's arguments from `args` and its defaults.
fn parse<A: clap::Args>(args: &[&str]) -> A {
    #[derive(Parser)]
    struct Wrapper<A: clap::Args> {
        #[command(flatten)]
        args: A,
    }
    let argv = std::iter::once("bench").chain(args.iter().copied());
    Wrapper::<A>::parse_from(argv).args
}
