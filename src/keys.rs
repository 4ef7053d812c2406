//! Order keys and the shard each key belongs to.
//!
//! The shard function is fixed forever for a deployment: FNV-1a 64 over the key's UTF-8 bytes,
//! modulo the number of shards. A unit test pins the mapping, because a silent change would send
//! one key's events to two shards and break their order. (We shard in our own code rather than
//! with the consistent-hash exchange, which moved 747 of 1000 keys after a broker restart.)

use std::fmt;
use std::hash::Hasher;
use std::num::NonZeroU16;

use sha2::{Digest, Sha256};

use crate::bounded;

/// The key whose messages must be processed in the order the bridge received them,
/// e.g. `profile:I-7PX4WQ2N9KD3`, `txn:8FX91612UX4519215`, `msg:<sha256>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OrderKey(String);

impl OrderKey {
    /// A key of a kind (`profile`, `txn`, ...) and an id. An id that is too long or not
    /// printable ASCII is replaced by its digest ([`bounded::id`]): the key stays short and
    /// safe in a header, a log line and the database, and the same id still gives the same key.
    pub fn new(kind: &str, id: &str) -> OrderKey {
        OrderKey(format!("{kind}:{}", bounded::id(id)))
    }

    /// The key of a message that orders with nothing else: the SHA-256 of its body.
    pub fn of_body(body: &[u8]) -> OrderKey {
        OrderKey::new("msg", &body_hash(body))
    }

    /// A key as the ingress wrote it in `x-ipn-order-key`. A header no ingress could have
    /// written (too long, or not printable ASCII) becomes `key:sha256:<hex>` of it.
    pub fn from_header(text: &str) -> OrderKey {
        if bounded::is_token(text) {
            OrderKey(text.to_owned())
        } else {
            OrderKey::new("key", text)
        }
    }

    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The shard this key's messages go to, out of `shards`.
    pub fn shard(&self, shards: NonZeroU16) -> u16 {
        let mut hasher = fnv::FnvHasher::default();
        hasher.write(self.0.as_bytes());
        // The remainder is below `shards`, which is a u16, so the cast cannot truncate.
        (hasher.finish() % u64::from(shards.get())) as u16
    }
}

impl fmt::Display for OrderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What identifies an IPN for deduplication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupKeys {
    /// Lower-case hex SHA-256 of the raw body.
    pub body_sha256: String,
    /// `ipn_track_id|txn_type|txn_id|payment_status`, when the IPN has an `ipn_track_id`.
    pub semantic: Option<String>,
}

impl DedupKeys {
    /// The semantic key as the database stores it: itself, or its digest when it is too long
    /// or holds a NUL ([`bounded::dedup_key`]), so it can always be stored and indexed.
    pub fn stored_semantic(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.semantic.as_deref().map(bounded::dedup_key)
    }

    /// The stable event id: a UUIDv5 of the semantic key when there is one (so a manual resend,
    /// whose bytes differ, gets the same id), else of the body hash.
    pub fn event_id(&self) -> uuid::Uuid {
        let name = match &self.semantic {
            Some(semantic) => format!("semantic:{semantic}"),
            None => format!("body:{}", self.body_sha256),
        };
        uuid::Uuid::new_v5(&EVENT_NAMESPACE, name.as_bytes())
    }
}

/// Namespace of event ids (a fixed random UUID: changing it would change every event id).
const EVENT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6c1f_7d8e_2b3a_4f55_9a61_0e4d_c2b7_a913);

/// Lower-case hex SHA-256 of a body: its identity as a transport duplicate.
pub fn body_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shards(n: u16) -> NonZeroU16 {
        NonZeroU16::new(n).expect("non-zero")
    }

    #[test]
    fn the_hash_is_fnv1a_64() {
        // Published FNV-1a 64 test vectors (http://www.isthe.com/chongo/tech/comp/fnv/).
        let fnv1a = |s: &str| {
            let mut h = fnv::FnvHasher::default();
            h.write(s.as_bytes());
            h.finish()
        };
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a("a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a("foobar"), 0x8594_4171_f739_67e8);
    }

    #[test]
    fn the_key_to_shard_mapping_never_changes() {
        // If this test fails, existing deployments would split keys across shards: don't "fix"
        // the numbers, fix the code.
        // Values computed with an independent FNV-1a implementation (Python), not by this code.
        let pinned = [
            ("profile:I-7PX4WQ2N9KD3", 32, 12),
            ("profile:I-3NH8V1TQ6ZRB", 32, 21),
            ("txn:8FX91612UX4519215", 32, 0),
            ("txn:51403485VH153354B", 32, 10),
            ("ba:B-5HC23496J3545304S", 32, 22),
            ("profile:I-7PX4WQ2N9KD3", 7, 2),
        ];
        for (key, n, expected) in pinned {
            let key = OrderKey(key.to_owned());
            assert_eq!(key.shard(shards(n)), expected, "{key} of {n}");
        }
    }

    #[test]
    fn shards_are_used_evenly_enough() {
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            let key = OrderKey::new("txn", &format!("{i:017X}"));
            counts[usize::from(key.shard(shards(8)))] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }

    #[test]
    fn event_ids_are_stable_and_follow_the_semantic_key() {
        let semantic = DedupKeys {
            body_sha256: body_hash(b"a"),
            semantic: Some("t|web_accept|X|Completed".to_owned()),
        };
        let resend = DedupKeys {
            body_sha256: body_hash(b"a&resend=true"),
            ..semantic.clone()
        };
        assert_eq!(
            semantic.event_id(),
            resend.event_id(),
            "a manual resend keeps the id"
        );
        let bytes_only = DedupKeys {
            body_sha256: body_hash(b"a"),
            semantic: None,
        };
        assert_ne!(semantic.event_id(), bytes_only.event_id());
        // Pinned: event ids must never change for the same IPN.
        assert_eq!(
            bytes_only.event_id().to_string(),
            uuid::Uuid::new_v5(
                &EVENT_NAMESPACE,
                format!("body:{}", body_hash(b"a")).as_bytes()
            )
            .to_string()
        );
        assert_eq!(bytes_only.event_id().get_version_num(), 5);
    }

    #[test]
    fn keys_stay_short_whatever_the_id() {
        // 0x80-0xFF bytes decode to 2-3 UTF-8 bytes each: 40 KB of them must not make a key.
        let inflated = "\u{20ac}".repeat(40_000);
        let key = OrderKey::new("txn", &inflated);
        assert!(
            key.as_str().len() <= bounded::MAX_KEY_BYTES,
            "{}",
            key.as_str().len()
        );
        assert_eq!(
            key,
            OrderKey::new("txn", &inflated),
            "the same id, the same key"
        );
        assert!(
            OrderKey::new("txn", "AB\0CD")
                .as_str()
                .starts_with("txn:sha256:")
        );
        assert_eq!(OrderKey::from_header("txn:ABC").as_str(), "txn:ABC");
        let hostile = OrderKey::from_header(&"x".repeat(1000));
        assert!(hostile.as_str().starts_with("key:sha256:"));
    }

    #[test]
    fn a_body_key_is_its_sha256() {
        assert_eq!(
            OrderKey::of_body(b"abc").as_str(),
            "msg:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
