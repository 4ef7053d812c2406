//! The database failing over under load: a primary with a synchronous standby
//! (`scripts/pg-failover`), the workers' `database.url` on a stable address (a proxy, as a
//! virtual IP or DNS name would be) in front of the primary. While PayPal-like posters keep
//! sending, the primary is crashed (`pg_ctl stop -m immediate`), the standby promoted and the
//! address moved to it. At the end every accepted IPN has exactly one event id and each key's
//! sequences are 1..n in posting order (the dedup records and the per-key counters survived the
//! failover), a resend of an IPN accepted before the crash is still a duplicate, and nothing is
//! in `<p>.dead`. The ledger is printed (docs/reliability.md keeps it).
//!
//! Needs the primary and standby, so `cargo test` skips it (ignored); `scripts/pg-failover-test`
//! starts them, runs it with `IPN_TEST_PG_PRIMARY` and `IPN_TEST_PG_STANDBY` set and stops
//! them. `IPN_TEST_PG_PHASE` (seconds, default 5) sets each phase.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ipn_bridge::config::Downstream;

use crate::pipeline_e2e::RunningWorker;
use crate::support::ingress::spawn_ingress;
use crate::support::load::{self, Posters};
use crate::support::{PATIENCE, Proxy, Services, post_form};

/// Subscriptions posted to at once, each by its own PayPal-like poster.
const KEYS: usize = 16;

/// The primary and standby `scripts/pg-failover-test` started.
struct Pair {
    primary: String,
    standby: String,
    script: PathBuf,
}

impl Pair {
    fn from_env() -> Pair {
        let var = |name: &str| {
            std::env::var(name).unwrap_or_else(|_| {
                panic!("{name}: run this test through scripts/pg-failover-test")
            })
        };
        Pair {
            primary: var("IPN_TEST_PG_PRIMARY"),
            standby: var("IPN_TEST_PG_STANDBY"),
            script: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/pg-failover"),
        }
    }

    /// Runs `scripts/pg-failover ACTION` (it finds the pair by the inherited IPN_PG_* vars).
    async fn run(&self, action: &str) {
        let output = tokio::process::Command::new(&self.script)
            .arg(action)
            .output()
            .await
            .expect("scripts/pg-failover runs");
        assert!(
            output.status.success(),
            "scripts/pg-failover {action}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

#[tokio::test]
#[ignore = "needs the primary and standby of scripts/pg-failover-test"]
async fn the_database_failing_over_under_load_loses_duplicates_and_reorders_nothing() {
    let pair = Pair::from_env();
    let phase = Duration::from_secs(
        std::env::var("IPN_TEST_PG_PHASE")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5),
    );
    let services = Services::start().await;
    let address = Proxy::to(&pair.primary).await;
    let mut config = services.config.clone();
    // The pair is this test's own: one database on it, created by the first worker.
    config.database.url = (format!("postgres://postgres@{}/ipn_failover", address.address()))
        .parse()
        .expect("url");
    config.topology.shards = std::num::NonZeroU16::new(8).expect("non-zero");
    config.downstream = vec![Downstream::new("downstream", &["#"])];
    config.worker.heartbeat = Duration::from_millis(200);
    config.worker.takeover = Duration::from_secs(2);
    let prefix = config.topology.prefix.clone();

    let ingress = spawn_ingress(config.clone()).await;
    ingress.wait_ready().await;
    let mut workers = Vec::new();
    let mut logs = Vec::new();
    for id in ["failover-w1", "failover-w2"] {
        let mut own = config.clone();
        own.worker.id = Some(id.to_owned());
        let unique = uuid::Uuid::now_v7().simple();
        let log = std::env::temp_dir().join(format!("ipn-it-{unique}-{id}.log"));
        workers.push(RunningWorker::spawn_logged(own, log.clone()).await);
        logs.push((id, log));
    }
    // A worker that cannot reach the database at start-up exits (its supervisor restarts it):
    // the load starts once both are consuming.
    for worker in &workers {
        let ready = async {
            while worker.readiness().await != 200 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        };
        tokio::time::timeout(2 * PATIENCE, ready)
            .await
            .expect("the workers are ready");
    }
    let posters = Posters::start(&ingress.url, &prefix, KEYS);

    tokio::time::sleep(phase).await;
    pair.run("crash").await;
    let crashed_at = Instant::now();
    tokio::time::sleep(phase).await;
    pair.run("promote").await;
    address.retarget(&pair.standby);
    let promoted_after = crashed_at.elapsed();
    // Time to drain the backlog of the outage while the posters go on.
    tokio::time::sleep(2 * phase).await;
    let ledger = posters.stop().await;

    let accepted = ledger.accepted();
    let total: usize = accepted.values().map(Vec::len).sum();
    let events = load::collect_events(&config, "downstream", total).await;
    let drained_after = crashed_at.elapsed();
    eprintln!(
        "database failover ledger: phase {phase:?}; {}; IPNs accepted {total} over {KEYS} keys, \
         events delivered {} ({} redelivered duplicates); primary crashed, standby promoted and \
         the address moved {promoted_after:?} later; every event delivered {drained_after:?} \
         after the crash; longest time without any 200: {:?}",
        ledger.counts(),
        events.deliveries,
        events.deliveries - total,
        ledger.longest_without_200(),
    );
    load::assert_exactly_once_in_order(&accepted, &events, &config, &logs).await;
    assert_eq!(
        load::dead_letters(&config).await,
        0,
        "nothing dead-lettered"
    );
    assert_eq!(ledger.other.load(Ordering::Relaxed), 0, "only 200 and 503");

    // The dedup records survived: a resend of the first IPN (accepted before the crash) is
    // dropped as a duplicate by whichever worker owns its shard.
    let before = duplicates(&workers).await;
    assert_eq!(
        post_form(&ingress.url, load::ipn(&prefix, 0, 0)).await.0,
        200
    );
    let dropped = async {
        while duplicates(&workers).await <= before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, dropped)
        .await
        .expect("the resend is a duplicate after the failover");
    for worker in workers {
        worker.stop().await;
    }
    for (_, log) in &logs {
        let _ = std::fs::remove_file(log);
    }
    ingress.stop().await;
}

/// Duplicates the workers dropped, together.
async fn duplicates(workers: &[RunningWorker]) -> f64 {
    let mut total = 0.0;
    for worker in workers {
        total += (worker.metric("ipn_worker_duplicates_total").await).unwrap_or(0.0);
    }
    total
}
