//! Logs that follow one IPN: the real binaries, JSON lines, one IPN from intake to publish.

use std::time::Duration;

use crate::pipeline_e2e::Stack;
use crate::support::ingress::{ingress_binary_logging, post_form};
use crate::support::{PATIENCE, WorkerProcess, sample};

/// The JSON lines of a log, parsed; anything else (a start-up error on stderr) is skipped.
fn lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[tokio::test]
async fn every_line_about_one_ipn_from_intake_to_publish_carries_its_message_id() {
    let stack = Stack::new().await;
    let unique = uuid::Uuid::now_v7().simple();
    let ingress_log = std::env::temp_dir().join(format!("ipn-it-{unique}-ingress.log"));
    let file = std::fs::File::create(&ingress_log).expect("ingress log");
    let verbose = [
        ("IPN_TELEMETRY__FORMAT", "json"),
        ("RUST_LOG", "info,ipn_bridge=debug"),
    ];
    let (mut ingress, port) = ingress_binary_logging(&stack.broker, &verbose, file.into()).await;
    let mut env = stack.worker_env();
    env.extend(verbose.map(|(k, v)| (k.to_owned(), v.to_owned())));
    let mut worker = WorkerProcess::start("w-logs", &env).await;

    let url = format!("http://127.0.0.1:{port}/ipn");
    let body = sample("013_subscr_payment.txt");
    assert_eq!(post_form(&url, body.clone()).await.0, 200);
    // A resend: the same IPN again, dropped as a duplicate, its own lines under its own id.
    assert_eq!(post_form(&url, body).await.0, 200);
    // A refusal: one info line with status and reason.
    assert_eq!(post_form(&url, Vec::new()).await.0, 400);
    let published = async {
        loop {
            let log = worker.log();
            if log.contains("event published") && log.contains("duplicate of a published ipn") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    if tokio::time::timeout(PATIENCE, published).await.is_err() {
        panic!("the worker's log:\n{}", worker.log());
    }
    worker.stop().await;
    let _ = ingress.kill().await;
    let ingress_lines = lines(&std::fs::read_to_string(&ingress_log).expect("read log"));
    let _ = std::fs::remove_file(&ingress_log);
    let worker_lines = lines(&worker.log());

    // The ingress: one debug line per accepted IPN, naming its message id and key.
    let accepted: Vec<&serde_json::Value> = ingress_lines
        .iter()
        .filter(|l| l["message"] == "ipn accepted")
        .collect();
    assert_eq!(accepted.len(), 2, "{ingress_lines:#?}");
    let ids: Vec<&str> = accepted
        .iter()
        .map(|l| l["span"]["message_id"].as_str().expect("message id"))
        .collect();
    assert_ne!(ids[0], ids[1]);
    for line in &accepted {
        assert_eq!(line["service"], "ipn-ingress");
        assert_eq!(line["span"]["ipn.order_key"], "profile:I-7PX4WQ2N9KD3");
        assert_eq!(line["status"], 200);
    }
    let refused: Vec<&serde_json::Value> = ingress_lines
        .iter()
        .filter(|l| l["message"] == "ipn refused")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["level"], "INFO");
    assert_eq!(
        (refused[0]["status"].clone(), refused[0]["reason"].clone()),
        (400.into(), "empty body".into())
    );

    // The worker: every line in an IPN's span carries its message id; the first IPN's lines end
    // with its event published, the resend's with the duplicate; each names the process.
    let of = |id: &str| -> Vec<&serde_json::Value> {
        worker_lines
            .iter()
            .filter(|l| l["span"]["message_id"] == id)
            .collect()
    };
    for line in &worker_lines {
        assert_eq!(line["service"], "ipn-worker", "{line}");
        assert_eq!(line["worker"], "w-logs", "{line}");
    }
    let first = of(ids[0]);
    let published = first
        .iter()
        .find(|l| l["message"] == "event published")
        .unwrap_or_else(|| panic!("published under its id: {worker_lines:#?}"));
    assert_eq!(published["span"]["ipn.txn_id"], "1GK360366M840293X");
    assert_eq!(published["span"]["ipn.order_key"], "profile:I-7PX4WQ2N9KD3");
    assert_eq!(published["sequence"], 1);
    let event_id = published["span"]["event_id"].as_str().expect("event id");
    assert_eq!(event_id.len(), 36);
    let resend = of(ids[1]);
    let duplicate = resend
        .iter()
        .find(|l| l["message"] == "duplicate of a published ipn; dropped")
        .unwrap_or_else(|| panic!("duplicate under its id: {worker_lines:#?}"));
    assert_eq!(
        duplicate["span"]["event_id"], event_id,
        "the event it duplicates"
    );
    // No line about the IPN outside its span, and never a payer's data.
    let log = worker.log();
    assert!(!log.contains("sigga"), "payer data in the log");
    for line in &worker_lines {
        let text = line.to_string();
        if text.contains("1GK360366M840293X") || text.contains(event_id) {
            assert!(
                line["span"]["message_id"].is_string(),
                "outside a span: {line}"
            );
        }
    }
}
