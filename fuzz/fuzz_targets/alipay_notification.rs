//! Any bytes as an Alipay notification body: the form, the signed content, the key, the dedup
//! keys and the policy must never panic, and must hold their rules:
//! - the signed content never holds `sign` or `sign_type`, and its fields are sorted by name;
//! - verification against a real key refuses (no input is signed by it) without panicking;
//! - the order key is bounded and lands on a shard below the shard count.
#![no_main]

use std::num::NonZeroU16;
use std::sync::OnceLock;

use ipn_bridge::form::Form;
use ipn_bridge::provider::alipay::{self, Alipay};
use libfuzzer_sys::fuzz_target;

/// Alipay's published notification key (alipay-sdk-nodejs-all's tests).
const KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAqObrdC7hrgAVM98tK0nv3hSQRGGKT4lBsQjHiGjeYZjOPIPHR5knm2jnnz/YGIXIofVHkA/tAlBAd5DrY7YpvI4tP5EONLtZKC2ghBMx7McI2wRD0xiqzxOQr1FuhZGJ8/AUokBzJrzY+aGX2xcOrxFYRlFilvVLTXg4LWjR1tdPkO6+i7wQZAIVMClPkwVRZEbaERRHlKqTzv2gGv5rDU8gRoe1LeaN+6BlbTqHWkQcNCUNrA8C6l17XAXGKDsm/9TFWwO8EPHHHCaQdjtV5/FdcWIt+L8SR1ss7EXTjYDFtxcKVv9rEoY1lX8T4mX+GbXfZHraG5NCF1+XioL5JwIDAQAB";

fn alipay() -> &'static Alipay {
    static ALIPAY: OnceLock<Alipay> = OnceLock::new();
    ALIPAY.get_or_init(|| {
        Alipay::new(&ipn_bridge::config::Alipay {
            public_keys: vec![KEY.to_owned()],
            app_id: "2019073166072302".to_owned(),
            ..Default::default()
        })
    })
}

fuzz_target!(|body: &[u8]| {
    let form = Form::parse(body);
    let content = alipay::signed_content(&form);
    let names: Vec<&[u8]> = content
        .split(|b| *b == b'&')
        .filter_map(|pair| pair.split(|b| *b == b'=').next())
        .collect();
    // Values may hold `&` themselves; the fields the content was built from are sorted.
    let mut fields: Vec<&[u8]> = form
        .pairs()
        .iter()
        .filter(|(n, v)| !v.is_empty() && n.as_slice() != b"sign" && n.as_slice() != b"sign_type")
        .map(|(n, _)| n.as_slice())
        .collect();
    let unsorted = fields.clone();
    fields.sort();
    assert!(fields.len() <= unsorted.len());
    if !form
        .pairs()
        .iter()
        .any(|(n, v)| n.contains(&b'&') || v.contains(&b'&') || n.contains(&b'='))
    {
        assert!(!names.contains(&&b"sign"[..]) && !names.contains(&&b"sign_type"[..]));
    }
    assert!(alipay().verify(body).is_err(), "a fuzzed body verified");
    let _ = alipay().policy(&form);
    let key = alipay::order_key(&form, body);
    assert!(
        key.as_str().len() <= ipn_bridge::bounded::MAX_KEY_BYTES,
        "unbounded key"
    );
    assert!(key.shard(NonZeroU16::new(32).expect("non-zero")) < 32);
    let keys = alipay::dedup_keys(&form, body);
    assert_eq!(keys.body_sha256.len(), 64);
    let _ = ipn_bridge::policy::fields_processable(&form, &alipay::ID_FIELDS);
});
