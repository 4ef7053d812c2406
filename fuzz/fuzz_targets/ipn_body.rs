//! Any bytes as an IPN body: the form splitter, charset decoding, order key and dedup keys must
//! never panic, and must agree with each other:
//! - the ingress's order key (one pass over six fields) equals the worker's (the whole form);
//! - the shard is below the shard count;
//! - decoding every field with the form's charset (or the windows-1252 fallback) yields one
//!   UTF-8 pair per field;
//! - a body that passes the checks before the postback, taken as if PayPal answered VERIFIED,
//!   becomes an event whose routing key fits AMQP (255 bytes) and whose stored `txn_id` is
//!   short printable ASCII (what the history's btree index can hold).
#![no_main]

use std::num::NonZeroU16;
use std::time::UNIX_EPOCH;

use ipn_bridge::config::{Environment, Paypal};
use ipn_bridge::event::{Context, Event};
use ipn_bridge::form::Form;
use ipn_bridge::keys::OrderKey;
use ipn_bridge::provider::{Checked, PayPal, Provider, Queued, paypal};
use ipn_bridge::store::Reservation;
use libfuzzer_sys::fuzz_target;

/// The event the worker would publish for `body` once PayPal said VERIFIED, if it gets that far.
fn event_if_verified(form: &Form, body: &[u8], key: &OrderKey) -> Option<Event> {
    let Checked::Postback(pending) = paypal::check(body) else {
        return None;
    };
    let sandbox = form.text("test_ipn").as_deref() == Some("1");
    let config = Paypal {
        environment: if sandbox {
            Environment::Sandbox
        } else {
            Environment::Live
        },
        ..Paypal::default()
    };
    let header = |_: &str| None;
    let queued = Queued {
        provider: "paypal",
        body,
        key,
        received_at: Some(UNIX_EPOCH),
        header: &header,
    };
    let Checked::Passed(verified) = pending.after_postback(&config, &queued, UNIX_EPOCH) else {
        return None;
    };
    let reservation = Reservation {
        event_id: verified.dedup.event_id(),
        sequence: 1,
    };
    let context = Context {
        order_key: key,
        reservation,
        received_at: UNIX_EPOCH,
        provider: "paypal",
    };
    Some(Event::new(*verified, body, &context))
}

fuzz_target!(|body: &[u8]| {
    let form = Form::parse(body);
    let worker_key = PayPal::order_key_of(&form, body);
    let ingress_key = PayPal.order_key(body);
    assert_eq!(
        worker_key, ingress_key,
        "ingress and worker disagree on the key"
    );
    for shards in [1u16, 7, 32, 1024] {
        let shards = NonZeroU16::new(shards).expect("non-zero");
        assert!(worker_key.shard(shards) < shards.get());
    }
    let keys = PayPal::dedup_keys(&form, body);
    assert_eq!(keys.body_sha256.len(), 64);
    let pairs = body.split(|b| *b == b'&').filter(|s| !s.is_empty()).count();
    assert!(form.decoded().len() <= pairs);
    let _ = form.charset();
    let _ = ipn_bridge::policy::readable(body);
    if let Some(event) = event_if_verified(&form, body, &worker_key) {
        let routing_key = event.routing_key();
        assert!(routing_key.len() <= 255, "routing key {routing_key:?}");
        assert_eq!(routing_key.split('.').count(), 4, "{routing_key:?}");
        if let Some(txn_id) = event.stored_txn_id() {
            assert!(
                txn_id.len() <= 64 && txn_id.bytes().all(|b| b.is_ascii_graphic()),
                "stored txn_id {txn_id:?}"
            );
        }
    }
});
