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

use std::time::{Duration, Instant};

use ipn_bridge::config::Downstream;

use crate::pipeline_e2e::RunningWorker;
use crate::support::ingress::spawn_ingress;
use crate::support::load::{self, Posters, Workers};
use crate::support::{PATIENCE, Proxy, Services, post_form};

/// Subscriptions posted to at once, each by its own PayPal-like poster.
const KEYS: usize = 16;

/// The primary and standby `scripts/pg-failover-test` started (host:port each).
struct Pair {
    primary: String,
    standby: String,
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
        }
    }

    /// Runs `scripts/pg-failover ACTION` (it finds the pair by the inherited IPN_PG_* vars).
    async fn run(&self, action: &str) {
        load::script("pg-failover", &[action]).await;
    }
}

#[tokio::test]
#[ignore = "needs the primary and standby of scripts/pg-failover-test"]
async fn the_database_failing_over_under_load_loses_duplicates_and_reorders_nothing() {
    let pair = Pair::from_env();
    let phase = load::phase("IPN_TEST_PG_PHASE");
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
    let workers = Workers::spawn(&config, &["failover-w1", "failover-w2"]).await;
    // A worker that cannot reach the database at start-up exits (its supervisor restarts it):
    // the load starts once both are consuming.
    for worker in &workers.running {
        worker.wait_ready(2 * PATIENCE).await;
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
    load::assert_nothing_lost(&ledger, &events, &config, &workers.logs).await;

    // The dedup records survived: a resend of the first IPN (accepted before the crash) is
    // dropped as a duplicate by whichever worker owns its shard.
    let before = duplicates(&workers.running).await;
    assert_eq!(
        post_form(&ingress.url, load::ipn(&prefix, 0, 0)).await.0,
        200
    );
    let dropped = async {
        while duplicates(&workers.running).await <= before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, dropped)
        .await
        .expect("the resend is a duplicate after the failover");
    workers.stop().await;
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
