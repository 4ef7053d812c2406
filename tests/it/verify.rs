//! The PayPal postback client against the fake PayPal, over real HTTP on loopback.

use std::time::Duration;

use ipn_bridge::config;
use ipn_bridge::fake_paypal::{Answer, FakePaypal};
use ipn_bridge::provider::paypal::verify::{self, Verdict, Verifier};
use tokio::net::TcpListener;

use crate::support::{sample, samples};

async fn fake(default: Answer) -> FakePaypal {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    FakePaypal::start(listener, default).expect("fake starts")
}

fn verifier(fake: &FakePaypal, timeout: Duration) -> Verifier {
    let config = config::Paypal {
        verify_url: Some(fake.url()),
        verify_timeout: timeout,
        ..config::Paypal::default()
    };
    Verifier::new(&config).expect("client builds")
}

#[tokio::test]
async fn every_sample_is_posted_back_byte_for_byte_and_verified() {
    let paypal = fake(Answer::Verified).await;
    let verifier = verifier(&paypal, Duration::from_secs(5));
    let samples = samples();
    for (name, body) in &samples {
        let verdict = verifier.verify(body).await.expect("an answer");
        assert_eq!(verdict, Verdict::Verified, "{name}");
    }
    let postbacks = paypal.postbacks();
    assert_eq!(postbacks.len(), samples.len());
    for ((name, body), postback) in samples.iter().zip(&postbacks) {
        assert!(
            postback.well_formed,
            "{name}: method, content type, User-Agent and prefix"
        );
        assert_eq!(
            &postback.ipn, body,
            "{name}: the exact bytes follow the prefix"
        );
    }
    paypal.stop().await;
}

#[tokio::test]
async fn invalid_is_a_verdict_and_failures_are_transient_errors() {
    let paypal = fake(Answer::Verified).await;
    let verifier = verifier(&paypal, Duration::from_millis(500));
    let body = sample("006_express_checkout.txt");
    paypal.script(
        &body,
        [
            Answer::Invalid,
            Answer::ServerError,
            Answer::Garbage,
            Answer::Slow(Duration::from_secs(3)),
            Answer::Silent,
        ],
    );
    assert_eq!(verifier.verify(&body).await.ok(), Some(Verdict::Invalid));
    assert!(matches!(
        verifier.verify(&body).await,
        Err(verify::Error::Status(500))
    ));
    assert!(matches!(
        verifier.verify(&body).await,
        Err(verify::Error::Garbage)
    ));
    // A timeout is named as one, with the limit, in the text operators read.
    for answer in ["slow", "silent"] {
        let timed_out = verifier.verify(&body).await;
        assert!(
            matches!(&timed_out, Err(verify::Error::Timeout(_))),
            "{answer}: {timed_out:?}"
        );
        let text = ipn_bridge::bounded::error_chain(&timed_out.expect_err("timeout"));
        assert!(
            text.contains("timeout") && text.contains("within"),
            "{text}"
        );
    }
    // The script is used up: back to the default answer.
    assert_eq!(verifier.verify(&body).await.ok(), Some(Verdict::Verified));
    paypal.stop().await;
}

#[tokio::test]
async fn the_fake_answers_invalid_to_a_postback_that_breaks_the_protocol() {
    let paypal = fake(Answer::Verified).await;
    let body = sample("001_web_accept.txt");
    let client = crate::support::http();
    // No `cmd=_notify-validate&` prefix, and no User-Agent.
    let answer = client
        .post(paypal.url())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body.clone())
        .send()
        .await
        .expect("answer")
        .text()
        .await
        .expect("text");
    assert_eq!(answer, "INVALID");
    assert!(!paypal.postbacks()[0].well_formed);
    paypal.stop().await;
}

#[tokio::test]
async fn an_unreachable_paypal_is_a_transient_error() {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr")
    };
    let config = config::Paypal {
        verify_url: Some(url::Url::parse(&format!("http://{closed}/cgi-bin/webscr")).expect("url")),
        ..config::Paypal::default()
    };
    let verifier = Verifier::new(&config).expect("client builds");
    let result = verifier.verify(&sample("001_web_accept.txt")).await;
    assert!(
        matches!(&result, Err(verify::Error::Http(e)) if e.is_connect()),
        "{result:?}"
    );
}
