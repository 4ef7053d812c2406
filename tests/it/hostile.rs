//! Attacks on the public ingress URL, end to end: bodies that inflate header values, ids PayPal
//! never sends (NUL, 3 KB), bodies dribbled a byte at a time, floods of idle connections under a
//! low open-file limit, a broker or database that stops answering, clients that hang up, and a
//! failing alert webhook. Each must be refused or absorbed with nothing lost, and every other
//! IPN must keep flowing.

use std::num::NonZeroU16;
use std::time::{Duration, Instant};

use lapin::types::AMQPValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::pipeline_e2e::{RunningWorker, Stack, live_samples};
use crate::support::ingress::ingress_binary;
use crate::support::{
    PATIENCE, Proxy, post_form, ready_ingress, sample, spawn_ingress, with_fields,
};

/// `count` copies of `%80`: each byte is € in windows-1252, three bytes of UTF-8 once decoded.
fn inflating(count: usize) -> String {
    "%80".repeat(count)
}

/// A header of a delivery as text.
fn header(delivery: &lapin::message::Delivery, name: &str) -> Option<String> {
    match delivery.properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(text) => Some(String::from_utf8_lossy(text.as_bytes()).into_owned()),
        _ => None,
    }
}

/// A stack with one shard, so that every IPN shares the shard the attack lands on.
async fn one_shard_stack() -> Stack {
    let mut stack = Stack::new().await;
    stack.config.topology.shards = NonZeroU16::MIN;
    stack.config.worker.prefetch = NonZeroU16::new(4).expect("non-zero");
    stack
}

#[tokio::test]
async fn a_key_inflating_body_is_quarantined_under_a_bounded_key_while_ordinary_ipns_get_their_events()
 {
    let stack = one_shard_stack().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    // 43.6 KB of body; decoded, a 130 KB txn_id: today's frame_max is 131 072.
    let hostile = with_fields(
        &sample("001_web_accept.txt"),
        &[("txn_id", &inflating(14_500))],
    );
    assert!(hostile.len() > 43_000 && hostile.len() < 65_536);
    assert_eq!(post_form(&ingress.url, hostile).await.0, 200);
    let ordinary = live_samples();
    for body in &ordinary {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    let events = stack.events(ordinary.len() as u32).await;
    assert_eq!(events.len(), ordinary.len());
    stack.wait_for("ipn.quarantine", 1).await;
    let channel = stack.broker.channel().await;
    let quarantined = stack.broker.drain(&channel, "ipn.quarantine").await;
    assert_eq!(quarantined.len(), 1);
    let message = &quarantined[0];
    assert_eq!(
        header(message, "x-ipn-reason").as_deref(),
        Some("unprocessable")
    );
    let cause = header(message, "x-ipn-cause").expect("a cause");
    assert!(cause.contains("txn_id"), "{cause}");
    let key = header(message, "x-ipn-order-key").expect("a key");
    assert!(key.starts_with("txn:sha256:") && key.len() < 100, "{key}");
    assert_eq!(worker.readiness().await, 200, "ready while consuming");
    // Stops within PATIENCE (asserted by stop) with nothing left unacked.
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn repeated_key_inflating_posts_beside_valid_traffic_leave_every_valid_ipn_answered_200() {
    let stack = Stack::new().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let valid = sample("001_web_accept.txt");
    // Just under the 64 KiB body limit: a 196 KB key once decoded.
    let hostile = format!("txn_id={}", inflating(21_800)).into_bytes();
    assert!(hostile.len() < 65_536);
    for _ in 0..20 {
        let attack = tokio::spawn(post_form_owned(ingress.url.clone(), hostile.clone()));
        let mut posts = Vec::new();
        for _ in 0..5 {
            posts.push(tokio::spawn(post_form_owned(
                ingress.url.clone(),
                valid.clone(),
            )));
        }
        for post in posts {
            assert_eq!(
                post.await.expect("post").0,
                200,
                "a valid IPN beside the attack"
            );
        }
        assert_eq!(
            attack.await.expect("post").0,
            200,
            "persisted under a bounded key"
        );
    }
    assert_eq!(
        ingress
            .metric("ipn_ingress_requests_total{status=\"503\"}")
            .await,
        Some(0.0),
        "no 503 at all: the broker connection never dropped (the series exists from the start)"
    );
    ingress.stop().await;
}

async fn post_form_owned(url: String, body: Vec<u8>) -> (u16, String) {
    post_form(&url, body).await
}

#[tokio::test]
async fn nul_and_3_kb_ids_are_quarantined_as_unprocessable_and_the_shard_keeps_flowing() {
    let stack = one_shard_stack().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let base = sample("001_web_accept.txt");
    // More poison than the shard's prefetch window (4): retried forever, it would stall it.
    for i in 0..6 {
        let nul = with_fields(&base, &[("txn_id", &format!("AB%00CD{i}"))]);
        assert_eq!(post_form(&ingress.url, nul).await.0, 200);
        let long = with_fields(&base, &[("txn_id", &format!("{i}{}", "A".repeat(3000)))]);
        assert_eq!(post_form(&ingress.url, long).await.0, 200);
    }
    let ordinary = live_samples();
    for body in &ordinary {
        assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    }
    let events = stack.events(ordinary.len() as u32).await;
    assert_eq!(events.len(), ordinary.len());
    stack.wait_for("ipn.quarantine", 12).await;
    let channel = stack.broker.channel().await;
    let quarantined = stack.broker.drain(&channel, "ipn.quarantine").await;
    assert_eq!(quarantined.len(), 12);
    for message in &quarantined {
        assert_eq!(
            header(message, "x-ipn-reason").as_deref(),
            Some("unprocessable")
        );
        assert!(header(message, "x-ipn-cause").is_some_and(|c| c.contains("txn_id")));
    }
    worker.stop().await;
    ingress.stop().await;
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// POSTs `body` a byte per TCP segment (a pause after each), then reads the status code.
async fn dribble(port: u16, body: Vec<u8>) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let head = format!(
        "POST /ipn HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.ok()?;
    for byte in body {
        stream.write_all(&[byte]).await.ok()?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut answer))
        .await
        .ok()?
        .ok()?;
    String::from_utf8_lossy(&answer[..n])
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test]
async fn bodies_dribbled_a_byte_per_segment_on_several_connections_keep_the_ingress_memory_bounded()
{
    let stack = Stack::new().await;
    let (child, port) =
        ingress_binary(&stack.broker, &[("IPN_INGRESS__BODY_READ_TIMEOUT", "120s")]).await;
    let pid = child.id().expect("running");
    let before = rss_kib(pid);
    let mut body = sample("001_web_accept.txt");
    body.extend_from_slice(b"&custom=");
    body.resize(6_000, b'a');
    let dribbles: Vec<_> = (0..8)
        .map(|_| tokio::spawn(dribble(port, body.clone())))
        .collect();
    let mut peak = before;
    while !dribbles.iter().all(|d| d.is_finished()) {
        peak = peak.max(rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for dribbled in dribbles {
        assert_eq!(dribbled.await.expect("task"), Some(200));
    }
    // Keeping every 1-byte frame pinned ~7 KiB each: 8 x 6 000 bytes would be ~330 MiB.
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("dribbled 8 x 6000 bytes: RSS {before} -> peak {peak} KiB");
    assert!(
        grown_mib < 32,
        "RSS grew {grown_mib} MiB ({before} -> {peak} KiB)"
    );
}

/// Connects and sends the head of a POST that never ends: `lines` header lines of `bytes`
/// bytes each, and no blank line. The write may fail: a server that stops reading and closes
/// resets it.
async fn endless_head(port: u16, lines: usize, bytes: usize) -> Option<TcpStream> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let mut head = b"POST /ipn HTTP/1.1\r\nhost: x\r\n".to_vec();
    for line in 0..lines {
        head.extend_from_slice(format!("x-pad-{line}: ").as_bytes());
        head.resize(head.len() + bytes, b'a');
        head.extend_from_slice(b"\r\n");
    }
    let _ = tokio::time::timeout(PATIENCE, stream.write_all(&head)).await;
    Some(stream)
}

/// Whether the server ends the connection (an answer and a close, or a reset) within `limit`.
async fn ended_within(mut stream: TcpStream, limit: Duration) -> bool {
    let mut buffer = vec![0u8; 4096];
    let ending = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, ending).await.is_ok()
}

#[tokio::test]
async fn request_heads_that_never_end_on_many_connections_keep_the_ingress_memory_bounded() {
    let stack = Stack::new().await;
    let (child, port) = ingress_binary(&stack.broker, &[]).await;
    let pid = child.id().expect("running");
    let before = rss_kib(pid);
    // 200 connections, each a head of 90 lines of 4 KiB (~360 KiB, under hyper's default
    // buffer of ~400 KiB, so it would wait for the rest until the 10 s header timeout).
    let mut heads = Vec::new();
    let mut peak = before;
    for _ in 0..200 {
        if let Some(stream) = endless_head(port, 90, 4096).await {
            heads.push(stream);
        }
        peak = peak.max(rss_kib(pid));
    }
    assert_eq!(heads.len(), 200, "every connection accepted");
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(rss_kib(pid));
    }
    let url = format!("http://127.0.0.1:{port}/ipn");
    let (status, _) = post_form(&url, sample("001_web_accept.txt")).await;
    assert_eq!(status, 200, "a valid IPN beside them");
    // Answered 431 and closed as soon as a head passes the limit, not held to the 10 s timeout.
    let endings: Vec<_> = heads
        .into_iter()
        .map(|stream| tokio::spawn(ended_within(stream, Duration::from_secs(3))))
        .collect();
    let mut held = 0;
    for ending in endings {
        if !ending.await.expect("task") {
            held += 1;
        }
    }
    let grown_mib = peak.saturating_sub(before) / 1024;
    eprintln!("200 endless heads of ~360 KiB: RSS {before} -> peak {peak} KiB; {held} held 3 s");
    assert_eq!(held, 0, "connections still open after 3 s");
    assert!(
        grown_mib < 32,
        "RSS grew {grown_mib} MiB ({before} -> {peak} KiB)"
    );
}

#[tokio::test]
async fn a_request_head_over_the_limit_is_answered_431() {
    let stack = Stack::new().await;
    let (_child, port) = ingress_binary(&stack.broker, &[]).await;
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    // A head as long as the limit and not yet ended: the server reads every byte of it (so
    // its close is a clean one, not a reset) and can tell it is too long.
    let mut head = b"POST /ipn HTTP/1.1\r\nhost: x\r\nx-pad: ".to_vec();
    head.resize(ipn_bridge::server::MAX_HEAD_BYTES, b'a');
    stream.write_all(&head).await.expect("write");
    let mut answer = vec![0u8; 256];
    let n = tokio::time::timeout(PATIENCE, stream.read(&mut answer))
        .await
        .expect("answered in time")
        .expect("read");
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A head as long as PayPal's or WeChat Pay's, and then some, is taken.
    let url = format!("http://127.0.0.1:{port}/ipn");
    let answer = crate::support::http()
        .post(&url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("x-forwarded-for", "203.0.113.7, ".repeat(300))
        .body(sample("001_web_accept.txt"))
        .send()
        .await
        .expect("posted");
    assert_eq!(answer.status(), 200);
}

#[tokio::test]
async fn with_an_admin_address_the_public_listener_answers_no_metrics_and_the_admin_one_takes_no_ipn()
 {
    let stack = Stack::new().await;
    let admin = format!("127.0.0.1:{}", free_port());
    let (mut child, port) =
        ingress_binary(&stack.broker, &[("IPN_INGRESS__ADMIN_LISTEN", &admin)]).await;
    let public = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let private = |path: &str| format!("http://{admin}{path}");
    let status = |url: String| async move {
        let response = crate::support::http_get(url).await.expect("answered");
        response.status().as_u16()
    };
    assert_eq!(
        post_form(&public("/ipn"), sample("001_web_accept.txt"))
            .await
            .0,
        200
    );
    assert_eq!(
        status(public("/metrics")).await,
        404,
        "no metrics in public"
    );
    for path in ["/healthz", "/readyz"] {
        assert_eq!(status(public(path)).await, 200, "public {path}");
        assert_eq!(status(private(path)).await, 200, "admin {path}");
    }
    let accepted = r#"ipn_ingress_requests_total{status="200"}"#;
    let counted = crate::support::metric(&private("/metrics"), accepted).await;
    assert_eq!(counted, Some(1.0), "the admin listener has the metrics");
    // No notification through the admin door: not taken, not counted.
    let (status, text) = post_form(&private("/ipn"), sample("001_web_accept.txt")).await;
    assert_eq!((status, text.trim()), (404, "not found"));
    let counted = crate::support::metric(&private("/metrics"), accepted).await;
    assert_eq!(counted, Some(1.0));
    let text = crate::support::http_get(private("/metrics"))
        .await
        .expect("metrics");
    let text = text.text().await.expect("text");
    assert!(!text.contains(r#"status="404""#), "{text}");
    // SIGTERM: the public listener drains, then the admin one closes, and the process ends.
    let status = crate::support::terminate(&mut child, PATIENCE).await;
    assert!(status.success(), "{status}");
    assert!(
        TcpStream::connect(admin.as_str()).await.is_err(),
        "admin closed"
    );
}

#[tokio::test]
async fn an_ingress_on_a_public_address_without_an_admin_one_warns_that_it_serves_its_metrics_there()
 {
    let stack = Stack::new().await;
    let url = stack.broker.url_via(crate::support::broker::BROKER);
    for admin in [None, Some(format!("127.0.0.1:{}", free_port()))] {
        let port = free_port();
        let mut env = vec![
            ("IPN_AMQP__URL", url.clone()),
            ("IPN_TOPOLOGY__SHARDS", "4".to_owned()),
            ("IPN_TELEMETRY__FORMAT", "json".to_owned()),
            ("IPN_INGRESS__LISTEN", format!("0.0.0.0:{port}")),
        ];
        if let Some(admin) = &admin {
            env.push(("IPN_INGRESS__ADMIN_LISTEN", admin.clone()));
        }
        let mut child = binary(env!("CARGO_BIN_EXE_ipn-ingress"), &[], &env)
            .env("RUST_LOG", "info")
            .spawn()
            .expect("ipn-ingress starts");
        wait_ready(port).await;
        let _ = child.start_kill();
        let output = child.wait_with_output().await.expect("output");
        let log = String::from_utf8_lossy(&output.stdout);
        let warned = log.lines().any(|line| {
            line.contains(r#""level":"WARN""#) && line.contains("set ingress.admin_listen")
        });
        assert_eq!(warned, admin.is_none(), "admin {admin:?}:\n{log}");
        if let Some(admin) = &admin {
            assert!(
                log.contains(admin.as_str()),
                "names where the metrics are: {log}"
            );
        }
    }
}

#[tokio::test]
async fn idle_connections_beyond_the_cap_under_a_low_open_file_limit_leave_valid_ipns_answered() {
    let stack = Stack::new().await;
    let port = free_port();
    // Soft 128, hard 256: the binary raises the soft limit to 256 and serves 64 at once.
    let mut child = tokio::process::Command::new("prlimit")
        .arg("--nofile=128:256")
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_ipn-ingress"))
        .env(
            "IPN_AMQP__URL",
            stack.broker.url_via(crate::support::broker::BROKER),
        )
        .env("IPN_TOPOLOGY__SHARDS", "4")
        .env("IPN_INGRESS__LISTEN", format!("127.0.0.1:{port}"))
        .env("IPN_INGRESS__MAX_CONNECTIONS", "64")
        .kill_on_drop(true)
        .spawn()
        .expect("ipn-ingress starts under prlimit");
    wait_ready(port).await;
    let pid = child.id().expect("running");
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("line");
    assert_eq!(
        open_files.split_whitespace().nth(3),
        Some("256"),
        "soft limit raised to the hard one: {open_files}"
    );
    // Twice the open-file limit in idle connections, half of them with a started request.
    let mut idle = Vec::new();
    for i in 0..512 {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)).await else {
            continue;
        };
        if i % 2 == 0 {
            let _ = stream.write_all(b"POST /ipn HTTP/1.1\r\nhost: x\r\n").await;
        }
        idle.push(stream);
    }
    let url = format!("http://127.0.0.1:{port}/ipn");
    let mut slowest = Duration::ZERO;
    for _ in 0..10 {
        let started = Instant::now();
        let posted = tokio::time::timeout(PATIENCE, post_form(&url, sample("001_web_accept.txt")));
        let (status, _) = posted.await.expect("answered despite the flood");
        assert_eq!(status, 200);
        // Far below the 10 s header timeout that would otherwise have to free a slot.
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
        slowest = slowest.max(started.elapsed());
    }
    eprintln!(
        "{} idle connections held: slowest of 10 valid IPNs {slowest:?}",
        idle.len()
    );
    assert!(child.try_wait().expect("status").is_none(), "still running");
    drop(idle);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn wait_ready(port: u16) {
    let ready = async {
        loop {
            let readiness =
                crate::support::http_get(format!("http://127.0.0.1:{port}/readyz")).await;
            if readiness.is_ok_and(|r| r.status() == 200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, ready).await.expect("ready");
}

#[tokio::test]
async fn a_black_holed_broker_makes_the_ingress_unready_within_the_heartbeat_window_then_answers_503_at_once()
 {
    let stack = Stack::new().await;
    let proxy = Proxy::start().await;
    let mut config = stack.broker.config_via(proxy.address());
    config.amqp.heartbeat = Duration::from_secs(2);
    config.ingress.confirm_timeout = Duration::from_secs(3);
    let ingress = spawn_ingress(config).await;
    ingress.wait_ready().await;
    let valid = sample("001_web_accept.txt");
    assert_eq!(post_form(&ingress.url, valid.clone()).await.0, 200);
    // The broker keeps the sockets but sends nothing: no confirm, no heartbeat.
    proxy.hold_replies();
    let silenced = Instant::now();
    let posts: Vec<_> = (0..3)
        .map(|_| tokio::spawn(post_form_owned(ingress.url.clone(), valid.clone())))
        .collect();
    for post in posts {
        assert_eq!(post.await.expect("post").0, 503);
    }
    let readyz = ingress.path("/readyz");
    let unready = async {
        while crate::support::http_get(&readyz)
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(PATIENCE, unready)
        .await
        .expect("readyz 503");
    eprintln!(
        "broker silenced: /readyz 503 after {:?}",
        silenced.elapsed()
    );
    let started = Instant::now();
    assert_eq!(post_form(&ingress.url, valid.clone()).await.0, 503);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "answered without waiting for a confirm: {:?}",
        started.elapsed()
    );
    eprintln!("then 503 in {:?}", started.elapsed());
    proxy.restore();
    ingress.wait_ready().await;
    assert_eq!(post_form(&ingress.url, valid).await.0, 200);
    ingress.stop().await;
}

#[tokio::test]
async fn a_client_hanging_up_while_its_ipn_waits_for_a_confirm_leaves_the_gauge_at_zero() {
    let stack = Stack::new().await;
    let proxy = Proxy::start().await;
    let mut config = stack.broker.config_via(proxy.address());
    config.ingress.confirm_timeout = Duration::from_secs(60);
    let ingress = spawn_ingress(config).await;
    ingress.wait_ready().await;
    proxy.hold_replies();
    let body = sample("001_web_accept.txt");
    let mut stream = TcpStream::connect(ingress.address).await.expect("connect");
    let head = format!(
        "POST /ipn HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-www-form-urlencoded\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.expect("head");
    stream.write_all(&body).await.expect("body");
    let gauge = |want: f64| {
        let ingress = &ingress;
        async move {
            let reached = async {
                while ingress.metric("ipn_ingress_in_flight").await != Some(want) {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            };
            tokio::time::timeout(PATIENCE, reached).await.is_ok()
        }
    };
    assert!(gauge(1.0).await, "the IPN waits for its confirm");
    drop(stream);
    assert!(gauge(0.0).await, "the gauge follows the hang-up");
    let dropped = ingress
        .metric("ipn_ingress_requests_total{status=\"dropped\"}")
        .await;
    assert_eq!(dropped, Some(1.0));
    proxy.restore();
    ingress.stop().await;
}

/// Runs a binary with `env` (no inherited `IPN_*`), killed on drop.
fn binary(path: &str, args: &[&str], env: &[(&str, String)]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(path);
    for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("IPN_")) {
        command.env_remove(name);
    }
    command
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

/// A vhost, and a database behind a proxy that accepts connections and never answers.
struct SilentDatabase {
    stack: Stack,
    proxy: Proxy,
    db: crate::support::TestDb,
}

impl SilentDatabase {
    async fn start() -> SilentDatabase {
        let stack = Stack::new().await;
        let proxy = Proxy::to(crate::support::db::POSTGRES).await;
        proxy.hold_replies();
        let db = crate::support::TestDb::new();
        SilentDatabase { stack, proxy, db }
    }

    /// The binaries' settings for it, with `connect_timeout` for PostgreSQL.
    fn env(&self, connect_timeout: &str) -> [(&'static str, String); 4] {
        [
            (
                "IPN_AMQP__URL",
                self.stack.broker.url_via(crate::support::broker::BROKER),
            ),
            ("IPN_DATABASE__URL", self.db.url_via(self.proxy.address())),
            ("IPN_DATABASE__CONNECT_TIMEOUT", connect_timeout.to_owned()),
            ("IPN_WORKER__LISTEN", format!("127.0.0.1:{}", free_port())),
        ]
    }
}

#[tokio::test]
async fn a_black_holed_database_ends_worker_start_up_and_ipnctl_with_a_clear_error_in_time() {
    let silent = SilentDatabase::start().await;
    let env = silent.env("2s");
    let worker = binary(env!("CARGO_BIN_EXE_ipn-worker"), &[], &env).output();
    let output = tokio::time::timeout(PATIENCE, worker)
        .await
        .expect("ended in time")
        .expect("ran");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("PostgreSQL did not answer `create database` within 2s"),
        "{stderr}"
    );
    for args in [["key", "list"], ["workers", "--json"]] {
        let ctl = binary(env!("CARGO_BIN_EXE_ipnctl"), &args, &env).output();
        let output = tokio::time::timeout(PATIENCE, ctl)
            .await
            .expect("ended in time")
            .expect("ran");
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("PostgreSQL did not answer `connect` within 2s"),
            "{args:?}: {stderr}"
        );
    }
}

#[tokio::test]
async fn sigterm_during_a_start_up_that_waits_for_the_database_ends_the_worker_at_once() {
    let silent = SilentDatabase::start().await;
    let env = silent.env("120s");
    let mut worker = binary(env!("CARGO_BIN_EXE_ipn-worker"), &[], &env)
        .spawn()
        .expect("starts");
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Long before the 120 s connect timeout.
    let status = crate::support::terminate(&mut worker, PATIENCE).await;
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn a_failing_alert_webhook_never_puts_its_url_or_token_in_the_logs() {
    let stack = Stack::new().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    // Nothing listens on port 1: every delivery fails with a connection error, whose text
    // (reqwest's) would carry the URL.
    let token = "s3cr3t-T0KEN-in-the-path";
    let mut env = stack.worker_env();
    env.extend([
        (
            "IPN_ALERT__WEBHOOK_URL".to_owned(),
            format!("http://127.0.0.1:1/hooks/{token}?key={token}"),
        ),
        ("IPN_ALERT__ATTEMPTS".to_owned(), "2".to_owned()),
    ]);
    let mut worker = crate::support::WorkerProcess::start("w-webhook", &env).await;
    let poison = with_fields(&sample("001_web_accept.txt"), &[("txn_id", "AB%00CD")]);
    assert_eq!(post_form(&ingress.url, poison).await.0, 200);
    let log = worker.keep_log();
    let failed = async {
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains("alert given up on this channel") {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let Ok(text) = tokio::time::timeout(PATIENCE, failed).await else {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        panic!("both attempts should have failed by now; the log:\n{text}");
    };
    let _ = std::fs::remove_file(&log);
    assert!(text.contains("alert not delivered"), "{text}");
    assert!(!text.contains(token), "the token leaked:\n{text}");
    assert!(!text.contains("/hooks/"), "the URL leaked:\n{text}");
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn the_worker_is_ready_only_while_consuming_and_stops_in_time_with_a_silent_broker() {
    let stack = one_shard_stack().await;
    let proxy = Proxy::start().await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let mut config = stack.config.clone();
    config.amqp.url = stack.broker.url_via(proxy.address()).parse().expect("url");
    config.amqp.heartbeat = Duration::from_secs(2);
    config.worker.shutdown_grace = Duration::from_secs(2);
    let worker = RunningWorker::spawn(config).await;
    let readiness_becomes = |want: u16| {
        let worker = &worker;
        async move {
            let reached = async {
                while worker.readiness().await != want {
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
            };
            tokio::time::timeout(PATIENCE, reached).await.is_ok()
        }
    };
    assert!(readiness_becomes(200).await, "ready once consuming");
    proxy.cut();
    assert!(
        readiness_becomes(503).await,
        "not ready while not consuming"
    );
    proxy.restore();
    assert!(
        readiness_becomes(200).await,
        "ready again after reconnecting"
    );
    let body = sample("001_web_accept.txt");
    assert_eq!(post_form(&ingress.url, body).await.0, 200);
    assert_eq!(stack.events(1).await.len(), 1, "consuming again");
    // A broker that accepts bytes and answers none: the stop is still honoured in time.
    proxy.hold_replies();
    worker.stop().await;
    ingress.stop().await;
}
