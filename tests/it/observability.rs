//! What Prometheus and Grafana see: both binaries' `/metrics` pass `promtool check metrics`, the
//! series an operator needs exist (and move), every metric the shipped rules and dashboard name
//! is one the binaries export, and the rules pass their own unit tests (`promtool test rules`).
//! promtool comes from `scripts/tools` (the README's test command runs it first).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::pipeline_e2e::{RunningWorker, Stack};
use crate::support::{post_form, ready_ingress, sample};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn promtool() -> PathBuf {
    let tool = repo().join("target/tools/bin/promtool");
    assert!(
        tool.exists(),
        "{} is missing: run scripts/tools (scripts/test does)",
        tool.display()
    );
    tool
}

/// `promtool check metrics` of an exposition: its output, and whether it passed.
fn check_metrics(text: &str) -> (bool, String) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("written");
    let output = child.wait_with_output().expect("promtool ends");
    let said = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.success(), said)
}

/// Every metric name (`ipn_…`, `process_…`) in `text`.
fn names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    for prefix in ["ipn_", "process_"] {
        let mut from = 0;
        while let Some(at) = text[from..].find(prefix) {
            let start = from + at;
            let word_start = start == 0
                || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
            let end = text[start..]
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
                .map_or(text.len(), |n| start + n);
            if word_start {
                names.insert(text[start..end].to_owned());
            }
            from = end;
        }
    }
    names
}

/// Whether `name` is a metric of `exposition` (a histogram's `_bucket`, `_count` and `_sum`
/// count as its family's).
fn exported(exposition: &str, name: &str) -> bool {
    let typed = |family: &str| exposition.contains(&format!("# TYPE {family} "));
    typed(name)
        || ["_bucket", "_count", "_sum"].iter().any(|suffix| {
            name.strip_suffix(suffix)
                .is_some_and(|family| exposition.contains(&format!("# TYPE {family} histogram")))
        })
}

async fn metrics_text(url: &str) -> String {
    let response = crate::support::http_get(url).await.expect("metrics answer");
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    response.text().await.expect("text")
}

#[tokio::test]
async fn both_binaries_export_what_promtool_accepts_and_every_metric_the_rules_and_dashboard_use() {
    let mut stack = Stack::new().await;
    stack.config.worker.downstream_check = Duration::from_millis(100);
    // Alipay on too, so the ingress has refusal reasons to count (PayPal refuses nothing at
    // the door).
    stack.config.alipay.enabled = true;
    stack.config.alipay.app_id = "2021000000000000".to_owned();
    stack.config.alipay.public_keys =
        vec![ipn_bridge::fake_providers::SigningKey::generate().public_pem()];
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let (status, _) = post_form(&ingress.url, sample("013_subscr_payment.txt")).await;
    assert_eq!(status, 200);
    stack.events(1).await;
    worker
        .wait_metric("ipn_worker_events_published_total", 1.0)
        .await;
    // The watching worker (the only one) counts the bridge's queues.
    worker
        .wait_metric("ipn_worker_queue_messages{queue=\"parked\"}", 0.0)
        .await;
    worker
        .wait_metric("ipn_worker_queue_messages{queue=\"inbound\"}", 0.0)
        .await;

    // The ack is the chain's last step, after the event counter moved.
    worker
        .wait_metric("ipn_worker_step_seconds_count{step=\"ack\"}", 1.0)
        .await;

    let worker_text = metrics_text(&format!("http://{}/metrics", worker.address)).await;
    let ingress_text = metrics_text(&ingress.path("/metrics")).await;
    for (binary, text) in [("ipn-worker", &worker_text), ("ipn-ingress", &ingress_text)] {
        let (passed, said) = check_metrics(text);
        assert!(passed, "promtool check metrics on {binary}: {said}\n{text}");
        assert!(
            text.contains(&format!(
                "ipn_build_info{{binary=\"{binary}\",version=\"{}\"}} 1\n",
                env!("CARGO_PKG_VERSION")
            )),
            "{text}"
        );
        for standard in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(exported(text, standard), "{binary} exports {standard}");
        }
    }
    // The series that move: one IPN went through.
    let value = |name: &str| {
        worker_text
            .lines()
            .find_map(|line| {
                line.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or_else(|| panic!("{name} in {worker_text}"))
    };
    assert_eq!(value("ipn_worker_receive_to_publish_seconds_count"), 1.0);
    assert_eq!(value("ipn_worker_in_flight"), 0.0);
    // Each step of its chain observed once; each of its three statements one batch of one.
    for step in ["gate", "claim", "publish", "mark_done", "ack"] {
        let count = format!("ipn_worker_step_seconds_count{{step=\"{step}\"}}");
        assert_eq!(value(&count), 1.0, "{count}");
        let sum = format!("ipn_worker_step_seconds_sum{{step=\"{step}\"}}");
        assert!(value(&sum) > 0.0, "{sum}");
    }
    for statement in ["key_state", "claim", "mark_done"] {
        let batches = format!("ipn_worker_database_batch_size_count{{statement=\"{statement}\"}}");
        assert_eq!(value(&batches), 1.0, "{batches}");
        let requests = format!("ipn_worker_database_batch_size_sum{{statement=\"{statement}\"}}");
        assert_eq!(value(&requests), 1.0, "{requests}");
        let seconds = format!("ipn_worker_database_batch_seconds_sum{{statement=\"{statement}\"}}");
        assert!(value(&seconds) > 0.0, "{seconds}");
    }
    assert_eq!(value("ipn_worker_connected{connection=\"consume\"}"), 1.0);
    assert_eq!(value("ipn_worker_connected{connection=\"publish\"}"), 1.0);
    assert_eq!(value("ipn_worker_connected{connection=\"database\"}"), 1.0);
    assert_eq!(value("ipn_worker_shards"), 4.0);
    assert_eq!(value("ipn_worker_owned_shards"), 4.0);
    assert!(value("process_resident_memory_bytes") > 0.0);
    assert_eq!(ingress.metric("ipn_ingress_ready").await, Some(1.0));

    // Every metric the shipped rules and dashboard name exists.
    let rules = std::fs::read_to_string(repo().join("deploy/prometheus/rules.yml")).expect("rules");
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/ipn-bridge.json")).expect("dashboard"),
    )
    .expect("dashboard JSON");
    let expressions: Vec<String> = dashboard["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .map(|target| target["expr"].as_str().expect("expr").to_owned())
        .collect();
    assert!(expressions.len() >= 20, "{expressions:?}");
    let both = format!("{worker_text}{ingress_text}");
    let mut named = names_in(&rules);
    named.extend(expressions.iter().flat_map(|e| names_in(e)));
    assert!(named.len() >= 25, "{named:?}");
    let missing: Vec<&String> = named.iter().filter(|name| !exported(&both, name)).collect();
    assert!(missing.is_empty(), "named but not exported: {missing:?}");
    worker.stop().await;
    ingress.stop().await;
}

#[test]
fn the_shipped_alerting_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo().join("deploy/prometheus");
    for args in [
        ["check", "rules", "rules.yml"],
        ["test", "rules", "rules.test.yml"],
    ] {
        let output = Command::new(promtool())
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            output.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    // promtool passes a rule no test names: each alert has a case in which it fires.
    let rules = std::fs::read_to_string(dir.join("rules.yml")).expect("rules");
    let tests = std::fs::read_to_string(dir.join("rules.test.yml")).expect("rule tests");
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 15, "{alerts:?}");
    let lines: Vec<&str> = tests.lines().map(str::trim).collect();
    let fires = |alert: &str| {
        lines.windows(2).any(|pair| {
            pair[0].strip_prefix("alertname: ") == Some(alert) && pair[1] == "exp_alerts:"
        })
    };
    let untested: Vec<&&str> = alerts.iter().filter(|alert| !fires(alert)).collect();
    assert!(
        untested.is_empty(),
        "alerts no test sees firing: {untested:?}"
    );
}

#[test]
fn names_are_found_in_expressions_and_histogram_series_belong_to_their_family() {
    let names = names_in(
        "sum(rate(ipn_worker_events_published_total[5m])) / on() xipn_no max(process_open_fds)",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["ipn_worker_events_published_total", "process_open_fds"]
    );
    let exposition = "# TYPE ipn_x_seconds histogram\n# TYPE ipn_y gauge\n";
    assert!(exported(exposition, "ipn_x_seconds_bucket"));
    assert!(exported(exposition, "ipn_y"));
    assert!(!exported(exposition, "ipn_z"));
    assert!(!exported(exposition, "ipn_y_bucket"));
}

#[tokio::test]
async fn ipnctl_status_says_all_is_well_and_then_what_needs_attention() {
    let mut stack = Stack::new().await;
    // One business queue with a consumer of its own, as a service would have.
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    stack.config.ingress.listen = ingress.address;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    // Ready: consuming its shards, with its topology (the business queue too) declared.
    worker.wait_ready(crate::support::PATIENCE).await;
    let channel = stack.broker.channel().await;
    let _service = channel
        .basic_consume(
            "downstream".into(),
            "service".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("a consumer");
    let status = ipn_bridge::ctl::status::status(&stack.config)
        .await
        .expect("status");
    assert_eq!(status.ingress_status, Some(200));
    assert_eq!(
        (status.workers, status.shards_owned, status.shards),
        (1, 4, 4)
    );
    assert_eq!((status.parked, status.dead, status.blocked_keys), (0, 0, 0));
    assert!(status.healthy(), "{status:?}");
    let text = ipn_bridge::ctl::status::status_text(std::slice::from_ref(&status));
    assert!(
        text.starts_with("ingress     ready") && text.ends_with("all well"),
        "{text}"
    );
    // The ingress gone: not well, and the lines say where.
    ingress.stop().await;
    let status = ipn_bridge::ctl::status::status(&stack.config)
        .await
        .expect("status");
    assert_eq!(status.ingress_status, None);
    assert!(!status.healthy());
    let text = ipn_bridge::ctl::status::status_text(&[status]);
    assert!(text.contains("ingress     NO ANSWER"), "{text}");
    assert!(text.ends_with("needs attention (exit 3)"), "{text}");
    worker.stop().await;
}
