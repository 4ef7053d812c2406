//! The PostgreSQL store against a real server: migrations, claims, sequences, purge.

use std::collections::HashMap;
use std::time::Duration;

use ipn_bridge::keys::DedupKeys;
use ipn_bridge::keys::body_hash;
use ipn_bridge::store::{Claim, EventFilter, Published, Store};

use crate::support::TestDb;

fn keys(body: &str, semantic: Option<&str>) -> DedupKeys {
    DedupKeys {
        body_sha256: body_hash(body.as_bytes()),
        semantic: semantic.map(str::to_owned),
    }
}

#[tokio::test]
async fn connecting_creates_the_database_and_migrating_again_is_harmless() {
    let db = TestDb::new();
    let first = Store::connect(&db.config())
        .await
        .expect("creates and migrates");
    first.close().await;
    let second = Store::connect(&db.config())
        .await
        .expect("connects and migrates again");
    second.close().await;
}

/// Sets `default_transaction_read_only` of the test's database, as a standby would be.
async fn read_only(db: &TestDb, on: bool) {
    let value = if on { "on" } else { "off" };
    set_database_default(db, &format!("default_transaction_read_only = {value}")).await;
}

/// `ALTER DATABASE <the test's database> SET <setting>`: a default its new sessions start with.
async fn set_database_default(db: &TestDb, setting: &str) {
    use sqlx::{ConnectOptions, Connection};
    let options: sqlx::postgres::PgConnectOptions = db.config().url.options().database("postgres");
    let mut admin = options.connect().await.expect("admin connection");
    let name = db
        .config()
        .url
        .options()
        .get_database()
        .expect("name")
        .to_owned();
    let statement = format!("ALTER DATABASE \"{name}\" SET {setting}");
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(&mut admin)
        .await
        .expect("alter database");
    admin.close().await.expect("close");
}

#[tokio::test]
async fn a_read_only_server_is_refused_as_a_standby_and_the_primary_taken_once_it_answers() {
    let db = TestDb::new();
    Store::connect(&db.config())
        .await
        .expect("created")
        .close()
        .await;
    read_only(&db, true).await;
    let Err(refused) = Store::connect(&db.config()).await else {
        panic!("a read-only server is refused");
    };
    let shown = ipn_bridge::bounded::error_chain(&refused);
    assert!(shown.contains("read-only (a standby?)"), "{shown}");
    // The address now leads to a server that takes writes (the promoted primary).
    read_only(&db, false).await;
    let store = Store::connect(&db.config())
        .await
        .expect("the primary is taken");
    let claimed = store
        .claim(&keys("primary", None), "key:p")
        .await
        .expect("writes");
    assert!(matches!(claimed, Claim::New(_)), "{claimed:?}");
    store.close().await;
}

/// Prepared statements cached with generic plans made while the tables were empty scanned the
/// whole of `ipn_event` per batch for the rest of a drain (docs/PERFORMANCE.md): every
/// connection of the store plans each execution for the tables as they are, whatever the
/// server's or the database's default.
#[tokio::test]
async fn every_connection_plans_each_statement_for_the_tables_as_they_are() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("connects");
    store.close().await;
    // A database whose default says otherwise is overridden per connection.
    set_database_default(&db, "plan_cache_mode = force_generic_plan").await;
    let store = Store::connect(&db.config()).await.expect("connects again");
    // Several at once, so more than one pooled connection answers.
    let settings =
        futures_util::future::join_all((0..4).map(|_| store.setting("plan_cache_mode"))).await;
    for setting in settings {
        assert_eq!(setting.expect("setting"), "force_custom_plan");
    }
    store.close().await;
}

#[tokio::test]
async fn a_claim_reserves_once_and_a_redelivery_gets_the_same_id_and_number() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("store");
    let first = keys(
        "txn_id=A&payment_status=Pending",
        Some("t1|web_accept|A|Pending"),
    );

    let Claim::New(reserved) = store.claim(&first, "txn:A").await.expect("claim") else {
        panic!("a first claim is new");
    };
    assert_eq!(reserved.sequence, 1);
    assert_eq!(reserved.event_id, first.event_id());
    // Crash before mark_done: the redelivery republishes under the same id and number.
    assert_eq!(
        store.claim(&first, "txn:A").await.expect("claim"),
        Claim::Pending(reserved)
    );
    store
        .mark_done(reserved.event_id, &published("txn:A"))
        .await
        .expect("done");
    store
        .mark_done(reserved.event_id, &published("txn:A"))
        .await
        .expect("done twice is harmless");
    // PayPal's identical resend, and a manual resend with other bytes: duplicates.
    assert_eq!(
        store.claim(&first, "txn:A").await.expect("claim"),
        Claim::Done(reserved)
    );
    let manual = keys(
        "txn_id=A&payment_status=Pending&resend=true",
        Some("t1|web_accept|A|Pending"),
    );
    assert_eq!(
        store.claim(&manual, "txn:A").await.expect("claim"),
        Claim::Done(reserved)
    );

    // The next message of the key gets 2; another key starts at 1.
    let completed = keys(
        "txn_id=A&payment_status=Completed",
        Some("t2|web_accept|A|Completed"),
    );
    let Claim::New(second) = store.claim(&completed, "txn:A").await.expect("claim") else {
        panic!("Completed after Pending is not a duplicate");
    };
    assert_eq!(second.sequence, 2);
    let other = keys("txn_id=B", None);
    let Claim::New(other) = store.claim(&other, "txn:B").await.expect("claim") else {
        panic!("new key");
    };
    assert_eq!(other.sequence, 1);
    store.close().await;
}

#[tokio::test]
async fn concurrent_claims_number_each_key_without_gaps() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("store");
    let mut tasks = Vec::new();
    for i in 0..60 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("profile:P{}", i % 4);
            let claim = store
                .claim(&keys(&format!("body {i}"), None), &key)
                .await
                .expect("claim");
            (key, claim)
        }));
    }
    let mut numbers: HashMap<String, Vec<i64>> = HashMap::new();
    for task in tasks {
        let (key, claim) = task.await.expect("task");
        let Claim::New(reserved) = claim else {
            panic!("all distinct bodies are new")
        };
        numbers.entry(key).or_default().push(reserved.sequence);
    }
    assert_eq!(numbers.len(), 4);
    for (key, mut sequence) in numbers {
        sequence.sort_unstable();
        assert_eq!(sequence, (1..=15).collect::<Vec<i64>>(), "{key}");
    }
    store.close().await;
}

/// Many lanes at once (the worker's case): their claims, look-ups and mark-dones share
/// statements (group commit), each still gets its own answer, and a value the database refuses
/// fails only the IPN that carried it, as a permanent error.
#[tokio::test]
async fn lanes_claiming_and_finishing_together_each_get_their_own_answer() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("store");
    let block = ipn_bridge::store::Block {
        order_key: "profile:P7",
        blocker_id: "blocker",
        parked: false,
        shard: 0,
        attempts: 1,
        last_error: "PayPal down",
        txn_type: None,
        txn_id: None,
    };
    store.block(&block).await.expect("block");
    let claim_of = |i: usize| {
        let store = store.clone();
        tokio::spawn(async move {
            // Key 13 carries a NUL: PostgreSQL refuses it (22021) wherever it is batched.
            let key = match i {
                13 => "profile:P\0".to_owned(),
                i => format!("profile:P{i}"),
            };
            let paid = format!("PAID{i}");
            let claimed = store
                .claim_paid(&keys(&format!("body {i}"), None), &key, Some(&paid))
                .await;
            (i, key, claimed)
        })
    };
    let tasks: Vec<_> = (0..64).map(claim_of).collect();
    let mut reserved = HashMap::new();
    for task in tasks {
        let (i, key, claimed) = task.await.expect("task");
        match claimed {
            Err(error) if i == 13 => assert!(error.is_permanent(), "{error:?}"),
            Ok(Claim::New(reservation)) if i != 13 => {
                assert_eq!(reservation.sequence, 1, "{key}");
                reserved.insert(i, reservation);
            }
            other => panic!("IPN {i}: {other:?}"),
        }
    }
    assert_eq!(reserved.len(), 63);
    let states: Vec<_> = (0..64)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = format!("profile:P{i}");
                let txn = format!("PAID{}", (i + 1) % 64);
                (
                    i,
                    store.key_state(&key, Some(&txn)).await.expect("key state"),
                )
            })
        })
        .collect();
    for task in states {
        let (i, state) = task.await.expect("task");
        assert_eq!(state.blocked.is_some(), i == 7, "key {i}");
        let paid_under = (i + 1) % 64;
        let expected = (paid_under != 13).then(|| format!("profile:P{paid_under}"));
        assert_eq!(state.profile, expected, "key {i}");
    }
    let done: Vec<_> = reserved
        .iter()
        .map(|(&i, reservation)| {
            let (store, event_id) = (store.clone(), reservation.event_id);
            tokio::spawn(async move {
                let txn = format!("PAID{i}");
                store
                    .mark_done(event_id, &published(&txn))
                    .await
                    .expect("mark done");
            })
        })
        .collect();
    for task in done {
        task.await.expect("task");
    }
    for (i, reservation) in &reserved {
        let again = store
            .claim(&keys(&format!("body {i}"), None), &format!("profile:P{i}"))
            .await
            .expect("claim");
        assert_eq!(again, Claim::Done(*reservation), "IPN {i}");
    }
    store.close().await;
}

#[tokio::test]
async fn racing_claims_of_one_ipn_reserve_it_once_and_the_losers_number_is_not_lost() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("store");
    let ipn = keys(
        "txn_id=R&payment_status=Completed",
        Some("t9|web_accept|R|Completed"),
    );
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (store, ipn) = (store.clone(), ipn.clone());
        tasks.push(tokio::spawn(
            async move { store.claim(&ipn, "txn:R").await },
        ));
    }
    let mut new = Vec::new();
    for task in tasks {
        // A loser of the race may fail on the unique constraint (the worker retries it) or
        // find the winner's row; it never reserves a second number.
        match task.await.expect("task") {
            Ok(Claim::New(reserved)) => new.push(reserved),
            Ok(Claim::Pending(reserved)) => assert_eq!(reserved.sequence, 1),
            Ok(Claim::Done(_)) => panic!("nothing was marked done"),
            Err(_) => {}
        }
    }
    assert_eq!(new.len(), 1, "exactly one claim reserves the IPN");
    assert_eq!(new[0].sequence, 1);
    let next = keys("txn_id=R&payment_status=Refunded", None);
    let Claim::New(after) = store.claim(&next, "txn:R").await.expect("claim") else {
        panic!("a new IPN is new");
    };
    assert_eq!(after.sequence, 2, "a rolled-back loser leaves no gap");
    store.close().await;
}
#[tokio::test]
async fn purging_removes_only_old_done_records_and_numbering_continues() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("store");
    let done = keys("done", None);
    let pending = keys("pending", None);
    let Claim::New(reserved) = store.claim(&done, "txn:K").await.expect("claim") else {
        panic!("new")
    };
    store
        .mark_done(reserved.event_id, &published("txn:K"))
        .await
        .expect("done");
    store.claim(&pending, "txn:K").await.expect("claim");

    assert_eq!(
        store
            .purge_older_than(Duration::from_secs(3600))
            .await
            .expect("purge"),
        0
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store
            .purge_older_than(Duration::from_millis(1))
            .await
            .expect("purge"),
        1
    );
    assert!(matches!(
        store.claim(&pending, "txn:K").await.expect("claim"),
        Claim::Pending(_)
    ));
    // A purged message is forgotten; its key keeps counting.
    let Claim::New(again) = store.claim(&done, "txn:K").await.expect("claim") else {
        panic!("new")
    };
    assert_eq!(again.sequence, 3);
    store.close().await;
}

#[tokio::test]
async fn values_postgresql_refuses_are_permanent_errors_and_a_silent_server_is_a_named_timeout() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("store");
    // A NUL in text (22021) and a key past the btree row limit (54000): never storable.
    let nul = store
        .claim(&keys("a", None), "txn:A\0B")
        .await
        .expect_err("NUL");
    assert!(nul.is_permanent(), "{nul:?}");
    // Incompressible (PostgreSQL compresses index entries): hashes, 12 800 hex digits.
    let huge: String = (0..200)
        .map(|i| body_hash(format!("{i}").as_bytes()))
        .collect();
    let too_large = store
        .claim(&keys("b", None), &format!("txn:{huge}"))
        .await
        .expect_err("index row too large");
    assert!(too_large.is_permanent(), "{too_large:?}");
    // A semantic key with a NUL or of 3 KB is stored as its digest: the claim works.
    let odd = keys(
        "c",
        Some(&format!("t|web_accept|{}\0|Completed", "A".repeat(3000))),
    );
    assert!(matches!(
        store.claim(&odd, "txn:C").await,
        Ok(Claim::New(_))
    ));
    assert!(matches!(
        store.claim(&odd, "txn:C").await,
        Ok(Claim::Pending(_))
    ));
    store.close().await;

    let proxy = crate::support::Proxy::to(crate::support::db::POSTGRES).await;
    let mut config = db.config();
    config.url = db.url_via(proxy.address()).parse().expect("url");
    config.query_timeout = Duration::from_millis(500);
    let store = Store::connect(&config).await.expect("through the proxy");
    proxy.hold_replies();
    let silent = store.blocked("txn:A").await.expect_err("no answer");
    assert!(!silent.is_permanent());
    assert_eq!(
        silent.to_string(),
        "PostgreSQL did not answer `key_state` within 500ms"
    );
    proxy.restore();
}

/// What a worker records with a confirmed event, as a test writes it.
fn published(txn_id: &str) -> Published<'_> {
    Published {
        routing_key: "web_accept.completed",
        txn_id: Some(txn_id),
        json: "{}",
    }
}

#[tokio::test]
async fn the_history_finds_done_events_by_txn_key_id_and_time_and_pages_them_in_key_order() {
    let db = TestDb::new();
    let store = Store::connect(&db.config()).await.expect("store");
    // Three events on two keys, published alternately; one more claimed but never confirmed.
    let mut ids = HashMap::new();
    for (body, key, txn) in [
        ("b1", "profile:B", "T1"),
        ("a1", "profile:A", "T2"),
        ("b2", "profile:B", "T3"),
        ("pending", "profile:A", "T4"),
    ] {
        let Claim::New(reserved) = store.claim(&keys(body, None), key).await.expect("claim") else {
            panic!("new")
        };
        if body != "pending" {
            store
                .mark_done(reserved.event_id, &published(txn))
                .await
                .expect("done");
        }
        ids.insert(txn, (reserved.event_id, key, reserved.sequence));
    }
    let found = |filter| {
        let store = store.clone();
        async move { store.find_events(&filter, 100).await.expect("find") }
    };
    let by_txn = found(EventFilter::Txn("T3".to_owned())).await;
    assert_eq!(by_txn.len(), 1);
    assert_eq!(by_txn[0].event_id, ids["T3"].0);
    assert_eq!(
        (by_txn[0].order_key.as_str(), by_txn[0].sequence),
        ("profile:B", 2)
    );
    assert_eq!(by_txn[0].json.as_deref(), Some("{}"));
    let by_key = found(EventFilter::Key("profile:B".to_owned())).await;
    assert_eq!(
        by_key.iter().map(|e| e.sequence).collect::<Vec<_>>(),
        [1, 2]
    );
    // The pending one is not history: it was never confirmed.
    assert!(found(EventFilter::Txn("T4".to_owned())).await.is_empty());
    assert_eq!(found(EventFilter::Id(ids["T2"].0)).await.len(), 1);
    let hour = Duration::from_secs(3600);
    let recent = EventFilter::Between {
        since: std::time::SystemTime::now() - hour,
        until: None,
    };
    assert_eq!(store.count_events(&recent).await.expect("count"), 3);
    let future = EventFilter::Between {
        since: std::time::SystemTime::now() + hour,
        until: None,
    };
    assert!(found(future).await.is_empty());
    let past = EventFilter::Between {
        since: std::time::SystemTime::now() - 2 * hour,
        until: Some(std::time::SystemTime::now() - hour),
    };
    assert!(found(past).await.is_empty());

    // Pages of one: every event once, each key's in sequence order, keys one after another.
    let mut after: Option<(String, i64)> = None;
    let mut paged = Vec::new();
    loop {
        let page = store
            .events_after(&recent, after.as_ref().map(|(k, s)| (k.as_str(), *s)), 1)
            .await
            .expect("page");
        let Some(last) = page.last() else { break };
        after = Some((last.order_key.clone(), last.sequence));
        paged.extend(page.into_iter().map(|e| (e.order_key, e.sequence)));
    }
    assert_eq!(
        paged,
        [
            ("profile:A".to_owned(), 1),
            ("profile:B".to_owned(), 1),
            ("profile:B".to_owned(), 2)
        ]
    );

    // Purged with the dedup records.
    assert_eq!(
        store.purge_older_than(Duration::ZERO).await.expect("purge"),
        3
    );
    assert_eq!(store.count_events(&recent).await.expect("count"), 0);
}
