//! Alerts through the real worker: what they say, how they are rate-limited, and that a failing
//! channel neither loses them nor holds up processing.

use std::time::Duration;

use ipn_bridge::fake_paypal::Answer;
use ipn_bridge::form::Form;
use ipn_bridge::provider::PayPal;

use crate::pipeline_e2e::{RunningWorker, Stack, raw};
use crate::support::{FakeSmtp, FakeWebhook, post_form, ready_ingress, sample};

async fn stack_with(webhook: &FakeWebhook, interval: Duration) -> Stack {
    let mut stack = Stack::new().await;
    stack.config.alert.webhook_url = Some(webhook.url.parse().expect("url"));
    stack.config.alert.min_interval = interval;
    stack
}

#[tokio::test]
async fn an_invalid_ipn_is_quarantined_and_an_alert_by_webhook_and_email_names_it() {
    let webhook = FakeWebhook::start(0).await;
    let smtp = FakeSmtp::start().await;
    let mut stack = stack_with(&webhook, Duration::from_secs(600)).await;
    stack.config.alert.smtp_url = Some(smtp.url.parse().expect("url"));
    stack.config.alert.email_to = vec!["ops@example.com".to_owned()];
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let forged = sample("001_web_accept.txt");
    stack.paypal.script(&forged, [Answer::Invalid]);
    assert_eq!(post_form(&ingress.url, forged.clone()).await.0, 200);

    stack.wait_for("ipn.quarantine", 1).await;
    let form = Form::parse(&forged);
    let key = PayPal::order_key_of(&form, &forged).to_string();
    let txn_id = form.text("txn_id").expect("txn_id");
    let alert = &webhook.wait_for(1).await[0];
    assert_eq!(alert["kind"], "quarantined");
    assert_eq!(alert["order_key"], key.as_str());
    assert_eq!(alert["txn_id"], txn_id.as_str());
    assert_eq!(alert["reason"], "invalid");
    assert!(
        alert["fix"]
            .as_str()
            .expect("fix")
            .contains("ipnctl quarantine replay --id"),
        "{alert}"
    );
    assert!(alert["text"].as_str().expect("text").contains(&key));
    let text = alert.to_string();
    for personal in ["payer_email", "first_name", "last_name"] {
        let value = form.text(personal).expect("the sample has it");
        assert!(
            !text.contains(&value),
            "{personal} leaked into the alert: {text}"
        );
    }
    let mail = &smtp.wait_for(1).await[0];
    assert!(mail.contains("Subject: [ipn-bridge] quarantined"), "{mail}");
    assert!(mail.contains(&txn_id), "{mail}");
    let channel = stack.broker.channel().await;
    assert_eq!(
        stack.broker.count(&channel, "downstream").await,
        0,
        "never delivered"
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn alerts_of_one_cause_are_summarized_instead_of_repeated() {
    let webhook = FakeWebhook::start(0).await;
    let stack = stack_with(&webhook, Duration::from_secs(1)).await;
    stack.paypal.set_default(Answer::Invalid);
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    for n in 0..5 {
        let mut forged = sample("001_web_accept.txt");
        forged.extend_from_slice(format!("&txn_id=FORGED{n}").as_bytes());
        assert_eq!(post_form(&ingress.url, forged).await.0, 200);
    }
    stack.wait_for("ipn.quarantine", 5).await;
    let alerts = webhook.wait_for(2).await;
    assert_eq!(alerts[0]["count"], 1, "the first goes out at once");
    assert_eq!(
        alerts[1]["count"], 4,
        "the rest in one summary: {}",
        alerts[1]
    );
    assert_eq!(alerts[1]["keys"].as_array().expect("keys").len(), 4);
    assert!(
        alerts[1]["text"]
            .as_str()
            .expect("text")
            .contains("4 more quarantined")
    );
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn a_failing_alert_channel_holds_up_nothing_and_the_alert_is_retried() {
    let webhook = FakeWebhook::start(2).await;
    let stack = stack_with(&webhook, Duration::from_secs(600)).await;
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let forged = sample("001_web_accept.txt");
    let genuine = sample("013_subscr_payment.txt");
    stack.paypal.script(&forged, [Answer::Invalid]);
    assert_eq!(post_form(&ingress.url, forged).await.0, 200);
    assert_eq!(post_form(&ingress.url, genuine.clone()).await.0, 200);

    let events = stack.events(1).await;
    assert_eq!(raw(&events[0]), genuine);
    assert!(
        webhook.received().is_empty(),
        "the event did not wait for the alert, whose retries take seconds"
    );
    let alerts = webhook.wait_for(1).await;
    assert_eq!(alerts[0]["kind"], "quarantined");
    assert_eq!(
        webhook.requests.load(std::sync::atomic::Ordering::SeqCst),
        3
    );
    let sent = worker
        .metric("ipn_worker_alerts_sent_total{channel=\"webhook\"}")
        .await;
    assert_eq!(sent, Some(1.0));
    worker.stop().await;
    ingress.stop().await;
}

#[tokio::test]
async fn an_event_no_queue_is_bound_for_raises_an_unroutable_alert() {
    let webhook = FakeWebhook::start(0).await;
    let mut stack = stack_with(&webhook, Duration::from_secs(600)).await;
    stack.config.downstream.clear();
    let (_, ingress) = ready_ingress(stack.config.clone()).await;
    let worker = RunningWorker::spawn(stack.config.clone()).await;
    let payment = sample("013_subscr_payment.txt");
    assert_eq!(post_form(&ingress.url, payment).await.0, 200);

    let alert = &webhook.wait_for(1).await[0];
    assert_eq!(alert["kind"], "unroutable");
    assert_eq!(
        alert["reason"],
        "no queue bound for paypal.subscription.subscr_payment.completed"
    );
    assert!(
        alert["fix"]
            .as_str()
            .expect("fix")
            .contains("[[downstream]]")
    );
    worker.stop().await;
    ingress.stop().await;
}
