//! Any bytes as a WeChat Pay notification: four header lines (timestamp, nonce, signature,
//! serial), then the JSON body; after a 0xFF byte in the body, the rest stands for the
//! decrypted resource. Reading the headers, verifying, decrypting, and everything done with a
//! decrypted resource (fields, keys, policy) must never panic, and must hold their rules:
//! - header values taken are bounded and printable; probes are told apart;
//! - verification against a real key refuses (no input is signed by it);
//! - decryption with a real APIv3 key fails (no input carries a valid tag);
//! - the order key is bounded and lands on a shard below the shard count.
#![no_main]

use std::num::NonZeroU16;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

use ipn_bridge::provider::wechatpay::{self, Opened, Refusal, Signed, Verifier, WechatPay};
use libfuzzer_sys::fuzz_target;

/// A platform certificate's serial and public key (wechatpay-go's notify test).
const SERIAL: &str = "D7CE59D1F522D701";
const KEY: &str = "MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA2VCTd91fnUn73Xy9DLvt/V62TVxRTEEstVdeRaZ3B3leO0pldE806mXO4RwdHXagHQ4vGeZN0yqm++rDsGK+U3AH7kejyD2pXshNP9Cq5YwbptiLGtjcquw4HNxJQUOmDeJf2vg6byms9RUipiq4SzbJKqJFlUpbuIPDpSpWz10PYmyCNeDGUUK65E5h2B834uxl1zNLYQCrkdBzb8oUxwYeP5a2DNxmjL5lsJML7DGr5znsevnoqGRwTm9fxCGfy8wus7hwKz6clt3Whmmda7UAdb1c08hEQFVRbF14AR73xbnd8N0obCWJPCbzMCtkaSef4FdEEgEXJiw0VAJT8wIDAQAB";

fn config() -> &'static ipn_bridge::config::Wechatpay {
    static CONFIG: OnceLock<ipn_bridge::config::Wechatpay> = OnceLock::new();
    CONFIG.get_or_init(|| {
        let apiv3_key = ipn_bridge::config::Secret::new("0123456789abcdef0123456789abcdef");
        ipn_bridge::config::Wechatpay {
            mch_ids: vec!["1900000109".to_owned()],
            apiv3_key,
            platform_keys: [(SERIAL.to_owned(), KEY.to_owned())].into(),
            ..Default::default()
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let mut lines = input.splitn(5, |b| *b == b'\n');
    let values: Vec<&[u8]> = (0..4).map(|_| lines.next().unwrap_or_default()).collect();
    let body = lines.next().unwrap_or_default();
    let names = [
        "wechatpay-timestamp",
        "wechatpay-nonce",
        "wechatpay-signature",
        "wechatpay-serial",
    ];
    let header = |name: &str| names.iter().position(|n| *n == name).map(|i| values[i]);
    let verifier = Verifier::new(config());
    match Signed::read(header) {
        Ok(signed) => {
            let message = signed.message(body);
            assert!(message.len() <= body.len() + 2 * wechatpay::MAX_HEADER_BYTES + 3);
            let received = UNIX_EPOCH + Duration::from_secs(1_624_523_846);
            assert_ne!(
                verifier.verify(&signed, body, received),
                Ok(()),
                "a fuzzed input verified"
            );
        }
        Err(Refusal::Probe) => assert!(values[2].starts_with(wechatpay::PROBE_PREFIX.as_bytes())),
        Err(_) => {}
    }
    let wechat = WechatPay::new(config());
    let (envelope, plaintext) = match body.iter().position(|b| *b == 0xFF) {
        Some(at) => (&body[..at], &body[at + 1..]),
        None => (body, &b""[..]),
    };
    assert!(
        wechat.decrypt(envelope).is_err(),
        "a fuzzed resource decrypted"
    );
    let _ = wechatpay::event_type(envelope);
    if let Ok(opened) = Opened::parse(envelope, plaintext) {
        let key = opened.order_key(envelope);
        assert!(
            key.as_str().len() <= ipn_bridge::bounded::MAX_KEY_BYTES,
            "unbounded key"
        );
        assert!(key.shard(NonZeroU16::new(32).expect("non-zero")) < 32);
        assert_eq!(opened.dedup_keys(envelope).body_sha256.len(), 64);
        let _ = opened.fields();
        let _ = opened.status();
        let _ = wechat.policy(&opened);
        let _ = ipn_bridge::policy::ids_processable(opened.id_fields());
    }
});
