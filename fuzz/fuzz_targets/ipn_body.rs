//! Any bytes as an IPN body: the form splitter, charset decoding, order key and dedup keys must
//! never panic, and must agree with each other:
//! - the ingress's order key (one pass over six fields) equals the worker's (the whole form);
//! - the shard is below the shard count;
//! - decoding every field with the form's charset (or the windows-1252 fallback) yields one
//!   UTF-8 pair per field.
#![no_main]

use std::num::NonZeroU16;

use ipn_bridge::form::Form;
use ipn_bridge::provider::PayPal;
use ipn_bridge::provider::Provider;
use libfuzzer_sys::fuzz_target;

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
});
