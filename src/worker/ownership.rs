//! Which worker processes which shard: rendezvous (highest random weight) hashing over the live
//! workers, so K workers share S shards about evenly, every worker computes the same answer from
//! the same live set, and a worker joining or leaving moves only the shards it takes or gives.
//!
//! Single active consumer stays on every shard queue as the safety net: while two workers
//! disagree for a moment (one has not seen a heartbeat yet), both may subscribe to a shard, and
//! the broker still lets only one of them consume it.

use std::hash::Hasher;

/// The weight of `worker` for `shard`: FNV-1a 64 over `<worker>/<shard>`, then a 64-bit mixer
/// (FNV alone spreads the last bytes poorly across the high bits).
fn weight(worker: &str, shard: u16) -> u64 {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(worker.as_bytes());
    hasher.write(b"/");
    hasher.write(&shard.to_be_bytes());
    mix(hasher.finish())
}

/// splitmix64's finalizer.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The owner of `shard` among `workers` (none when there are no workers). Ties, which need equal
/// 64-bit weights, go to the smaller id, so every worker still agrees.
pub fn owner(shard: u16, workers: &[String]) -> Option<&str> {
    workers
        .iter()
        .max_by(|a, b| {
            let by_weight = weight(a, shard).cmp(&weight(b, shard));
            by_weight.then_with(|| b.cmp(a))
        })
        .map(String::as_str)
}

/// The shards out of `shards` that `me` owns among `workers`.
pub fn owned_by(me: &str, workers: &[String], shards: u16) -> Vec<u16> {
    (0..shards)
        .filter(|&shard| owner(shard, workers) == Some(me))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}")).collect()
    }

    #[test]
    fn every_shard_has_exactly_one_owner_and_the_shares_are_about_even() {
        let live = workers(3);
        let shares: Vec<usize> = live.iter().map(|w| owned_by(w, &live, 32).len()).collect();
        assert_eq!(shares.iter().sum::<usize>(), 32);
        for share in &shares {
            assert!((6..=16).contains(share), "{shares:?}");
        }
        let spread: Vec<usize> = {
            let many = workers(8);
            many.iter()
                .map(|w| owned_by(w, &many, 1024).len())
                .collect()
        };
        for share in &spread {
            assert!(
                (96..=160).contains(share),
                "1024 shards over 8 workers: {spread:?}"
            );
        }
    }

    #[test]
    fn a_worker_leaving_moves_only_its_own_shards() {
        let before = workers(4);
        let after: Vec<String> = before
            .iter()
            .filter(|w| *w != "worker-2")
            .cloned()
            .collect();
        for shard in 0..256 {
            let was = owner(shard, &before).expect("an owner");
            let is = owner(shard, &after).expect("an owner");
            if was != "worker-2" {
                assert_eq!(was, is, "shard {shard} moved although its owner stayed");
            }
        }
    }

    #[test]
    fn the_owner_does_not_depend_on_the_order_of_the_list() {
        let mut live = workers(5);
        let first: Vec<Option<String>> = (0..64)
            .map(|s| owner(s, &live).map(str::to_owned))
            .collect();
        live.reverse();
        let second: Vec<Option<String>> = (0..64)
            .map(|s| owner(s, &live).map(str::to_owned))
            .collect();
        assert_eq!(first, second);
        assert_eq!(owner(0, &[]), None);
    }
}
