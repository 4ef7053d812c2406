//! The binaries as an operator meets them: bad config, `ipnctl send`.

use std::process::Command;

use ipn_bridge::ctl;

use crate::support::{PATIENCE, TestBroker, ready_ingress, sample};

#[test]
fn bad_config_stops_each_binary_with_one_line_and_exit_code_64() {
    for binary in [
        env!("CARGO_BIN_EXE_ipn-ingress"),
        env!("CARGO_BIN_EXE_ipnctl"),
    ] {
        let output = Command::new(binary)
            .args(
                ["topology", "declare"]
                    .iter()
                    .take(if binary.ends_with("ipnctl") { 2 } else { 0 }),
            )
            .env("IPN_TOPOLOGY__SHARDS", "0")
            .output()
            .expect("binary runs");
        assert_eq!(output.status.code(), Some(64), "{binary}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(stderr.contains("topology.shards"), "{stderr}");
    }
}

#[test]
fn a_config_file_that_does_not_exist_is_a_config_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_ipn-ingress"))
        .args(["--config", "/nonexistent/ipn.toml"])
        .output()
        .expect("binary runs");
    assert_eq!(output.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/ipn.toml"));
}

#[tokio::test]
async fn ipnctl_send_posts_like_paypal_and_the_ipn_is_queued() {
    let broker = TestBroker::new().await;
    let (topology, ingress) = ready_ingress(broker.config()).await;
    let body = sample("013_subscr_payment.txt");
    let (status, answer) = ctl::send(&ingress.url, body.clone()).await.expect("sent");
    assert_eq!((status, answer.as_str()), (200, ""));
    let queued = broker.drain_shards(&topology).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].1.data, body);
    ingress.stop().await;
}

#[tokio::test]
async fn the_ipnctl_binary_sends_a_file_and_prints_the_status() {
    let broker = TestBroker::new().await;
    let (_, ingress) = ready_ingress(broker.config()).await;
    let file = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/samples/001_web_accept.txt"
    );
    let url = ingress.url.clone();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_ipnctl"))
            .args(["send", file, "--url", &url])
            .output()
            .expect("ipnctl runs")
    })
    .await
    .expect("joined");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "200\n");
    ingress.stop().await;
}

#[tokio::test]
async fn the_ingress_binary_stops_cleanly_on_sigterm() {
    let broker = TestBroker::new().await;
    let (mut child, port) = crate::support::ingress::ingress_binary(&broker, &[]).await;
    let url = format!("http://127.0.0.1:{port}/ipn");
    assert_eq!(
        ctl::send(&url, sample("001_web_accept.txt"))
            .await
            .expect("sent")
            .0,
        200
    );

    let status = crate::support::terminate(&mut child, PATIENCE).await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn the_ipnctl_binary_lists_and_releases_as_an_operator_expects() {
    let broker = TestBroker::new().await;
    let db = crate::support::TestDb::new();
    let mut config = broker.config();
    config.database = db.config();
    ctl::declare_topology(&config).await.expect("declared");
    let ipnctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_ipnctl"))
            .args(args)
            .env(
                "IPN_AMQP__URL",
                broker.url_via(crate::support::broker::BROKER),
            )
            .env("IPN_DATABASE__URL", db.config().url.to_string())
            .env("IPN_TOPOLOGY__SHARDS", config.topology.shards.to_string())
            .output()
            .expect("binary runs")
    };
    let listed = ipnctl(&["parked", "list", "--json"]);
    assert!(listed.status.success(), "{listed:?}");
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    assert_eq!(listed, serde_json::json!({ "version": 1, "items": [] }));
    let table = ipnctl(&["quarantine", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.starts_with("KEY"), "{table}");
    // Read-only commands create nothing: before a worker made the database, they say so.
    let missing = ipnctl(&["key", "list"]);
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(stderr.contains("does not exist"), "{stderr}");
    let store = ipn_bridge::store::Store::connect(&config.database)
        .await
        .expect("the worker's database, created as a worker does");
    store.close().await;
    let keys = ipnctl(&["key", "list"]);
    assert!(String::from_utf8_lossy(&keys.stdout).contains("HELD"));
    // No ingress, no worker: the overview says so, with exit 3.
    let status = ipnctl(&["status"]);
    assert_eq!(status.status.code(), Some(3), "{status:?}");
    let said = String::from_utf8_lossy(&status.stdout);
    assert!(said.contains("ingress     NO ANSWER"), "{said}");
    assert!(
        said.contains("workers     0 live, 0 of 4 shards owned"),
        "{said}"
    );
    let status = ipnctl(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).expect("JSON");
    assert_eq!(status["version"], 1);
    assert_eq!(status["items"][0]["shards"], 4);
    let release = ipnctl(&["key", "release", "profile:I-NOTBLOCKED"]);
    assert_eq!(release.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&release.stdout).contains("is not blocked"));
    // A purge that may take many needs --yes; --dry-run deletes nothing.
    let unsure = ipnctl(&["quarantine", "purge", "--all"]);
    assert_eq!(unsure.status.code(), Some(64), "{unsure:?}");
    assert!(String::from_utf8_lossy(&unsure.stderr).contains("--yes"));
    let dry = ipnctl(&["quarantine", "purge", "--all", "--dry-run"]);
    assert!(String::from_utf8_lossy(&dry.stdout).contains("0 would be purged; nothing was"));
    let nothing = ipnctl(&[
        "quarantine",
        "purge",
        "--key",
        "txn:NOTQUARANTINED",
        "--yes",
    ]);
    assert_eq!(
        nothing.status.code(),
        Some(2),
        "a purge that matched nothing"
    );
    assert!(String::from_utf8_lossy(&nothing.stdout).contains("0 taken"));
    let ambiguous = ipnctl(&["parked", "replay", "--all", "--key", "txn:A"]);
    assert_eq!(
        ambiguous.status.code(),
        Some(2),
        "clap refuses two selections"
    );
}

#[test]
fn a_non_utf8_variable_or_a_port_in_use_stops_each_binary_with_exit_code_64() {
    use std::os::unix::ffi::OsStrExt;
    let not_utf8 = std::ffi::OsStr::from_bytes(b"/ipn\xff");
    let output = Command::new(env!("CARGO_BIN_EXE_ipn-ingress"))
        .env("IPN_INGRESS__PATH", not_utf8)
        .output()
        .expect("binary runs");
    assert_eq!(output.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("IPN_INGRESS__PATH") && stderr.contains("UTF-8"),
        "{stderr}"
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = taken.local_addr().expect("address").to_string();
    for (binary, key) in [
        (env!("CARGO_BIN_EXE_ipn-ingress"), "IPN_INGRESS__LISTEN"),
        (
            env!("CARGO_BIN_EXE_ipn-ingress"),
            "IPN_INGRESS__ADMIN_LISTEN",
        ),
        (env!("CARGO_BIN_EXE_ipn-worker"), "IPN_WORKER__LISTEN"),
    ] {
        let output = Command::new(binary)
            // Its own listeners on free ports, but for the one taken.
            .env("IPN_INGRESS__LISTEN", "127.0.0.1:0")
            .env("IPN_WORKER__LISTEN", "127.0.0.1:0")
            .env(key, &address)
            .output()
            .expect("binary runs");
        assert_eq!(output.status.code(), Some(64), "{binary}: {output:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        let key = key
            .trim_start_matches("IPN_")
            .replace("__", ".")
            .to_lowercase();
        assert!(
            stderr.contains("cannot listen on") && stderr.contains(&format!("({key})")),
            "{stderr}"
        );
    }
}

/// `ipnctl health URL` as a container healthcheck runs it.
fn ipnctl_health(url: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_ipnctl"))
        .args(["health", url, "--timeout", "2s"])
        .output()
        .expect("ipnctl runs")
}

#[tokio::test]
async fn ipnctl_health_exits_0_on_a_ready_binary_and_1_with_the_reason_otherwise() {
    let broker = TestBroker::new().await;
    let (_, ingress) = ready_ingress(broker.config()).await;
    let ready = ingress.path("/readyz");
    let output = tokio::task::spawn_blocking(move || ipnctl_health(&ready))
        .await
        .expect("joined");
    assert!(output.status.success(), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(": 200"));
    // Not 200: a path the ingress does not serve.
    let missing = ingress.path("/nothing-here");
    let output = tokio::task::spawn_blocking(move || ipnctl_health(&missing))
        .await
        .expect("joined");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(String::from_utf8_lossy(&output.stdout).contains(": 404"));
    let gone = ingress.path("/readyz");
    ingress.stop().await;
    // Nothing listening any more.
    let output = tokio::task::spawn_blocking(move || ipnctl_health(&gone))
        .await
        .expect("joined");
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    assert!(
        String::from_utf8_lossy(&output.stdout).contains("no answer"),
        "{output:?}"
    );
}
