//! Which worker processes which shard: rendezvous (highest random weight) hashing over the live
//! workers with a bound on each worker's share, so every worker computes the same answer from the
//! same live set, K workers share S shards as evenly as whole shards allow (none more than
//! ⌈S/K⌉), and a worker joining or leaving moves few shards besides the ones it takes or gives.
//!
//! Why the bound: plain rendezvous hashing spreads 32 shards unevenly over a few workers (over
//! 50 random id sets of 2 to 4 workers, the busiest worker held on average 1.29× its even share,
//! at worst 1.88×: e.g. 20 and 12 for the bench's two workers). The busiest worker then sets the
//! rate of all of them, so two workers drained at 1.58× one. With the bound, each shard goes to
//! the first worker in its rendezvous order that has fewer than ⌈S/K⌉ shards yet (shards taken in
//! index order); on a join about 10 of 32 shards move instead of the 8.4 plain rendezvous moves
//! (the same sets). Each move is a hand-over, which the session makes safe; an uneven share costs
//! throughput for as long as that set of workers lives.
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

/// The owner of each shard in `0..shards` among `workers` (all `None` when there are no
/// workers): in the shard's rendezvous order (weight, then the smaller id on a tie) the first
/// worker that owns fewer than ⌈shards / K⌉ so far, the shards taken in index order. The order
/// of `workers` does not matter; a repeated id counts once.
pub fn assignment(workers: &[String], shards: u16) -> Vec<Option<&str>> {
    let mut live: Vec<&str> = workers.iter().map(String::as_str).collect();
    live.sort_unstable();
    live.dedup();
    if live.is_empty() {
        return vec![None; usize::from(shards)];
    }
    let cap = usize::from(shards).div_ceil(live.len());
    let mut owned = vec![0usize; live.len()];
    (0..shards)
        .map(|shard| {
            let mut order: Vec<(u64, usize)> = live
                .iter()
                .enumerate()
                .map(|(i, id)| (weight(id, shard), i))
                .collect();
            // Highest weight first; on equal weights the smaller id (live is sorted).
            order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            // K workers of at most ⌈S/K⌉ each hold all S shards, so one always has room.
            let (_, chosen) = order
                .into_iter()
                .find(|&(_, i)| owned[i] < cap)
                .expect("a worker below the cap");
            owned[chosen] += 1;
            Some(live[chosen])
        })
        .collect()
}

/// The owner of `shard` out of `shards` among `workers` (none when there are no workers).
pub fn owner(shard: u16, workers: &[String], shards: u16) -> Option<&str> {
    assignment(workers, shards)
        .get(usize::from(shard))
        .copied()
        .flatten()
}

/// The shards out of `shards` that `me` owns among `workers`.
pub fn owned_by(me: &str, workers: &[String], shards: u16) -> Vec<u16> {
    (0..shards)
        .zip(assignment(workers, shards))
        .filter(|(_, owner)| *owner == Some(me))
        .map(|(shard, _)| shard)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workers(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}")).collect()
    }

    fn shares(live: &[String], shards: u16) -> Vec<usize> {
        live.iter()
            .map(|w| owned_by(w, live, shards).len())
            .collect()
    }

    #[test]
    fn every_shard_has_exactly_one_owner_and_no_worker_more_than_its_even_share_rounded_up() {
        for k in 1..=9 {
            let live = workers(k);
            for shards in [1u16, 4, 7, 32, 1024] {
                let shares = shares(&live, shards);
                assert_eq!(shares.iter().sum::<usize>(), usize::from(shards));
                let cap = usize::from(shards).div_ceil(k);
                assert!(
                    shares.iter().all(|&share| share <= cap),
                    "{k} workers, {shards} shards: {shares:?}"
                );
                assert!(assignment(&live, shards).iter().all(Option::is_some));
            }
        }
    }

    #[test]
    fn the_bench_s_two_workers_get_sixteen_shards_each_where_plain_rendezvous_gave_twenty_and_twelve()
     {
        let two = ["bench-worker-0".to_owned(), "bench-worker-1".to_owned()];
        let plain = |me: &str| {
            (0..32u16)
                .filter(|&shard| {
                    let other = two.iter().find(|w| *w != me).expect("two");
                    weight(me, shard) > weight(other, shard)
                })
                .count()
        };
        assert_eq!((plain(&two[0]), plain(&two[1])), (20, 12));
        assert_eq!(shares(&two, 32), vec![16, 16]);
    }

    /// Shards that changed owner between `was` and `is` without `mover` on either side.
    fn moved_between_others(was: &[Option<&str>], is: &[Option<&str>], mover: &str) -> usize {
        was.iter()
            .zip(is)
            .filter(|(was, is)| was != is && **was != Some(mover) && **is != Some(mover))
            .count()
    }

    #[test]
    fn a_worker_joining_or_leaving_moves_few_shards_besides_its_own() {
        const SHARDS: u16 = 32;
        for k in 2..=6 {
            let before = workers(k);
            let was = assignment(&before, SHARDS);
            let mut joined = before.clone();
            joined.push("worker-new".to_owned());
            let moved = moved_between_others(&was, &assignment(&joined, SHARDS), "worker-new");
            assert!(
                moved * (k + 1) * 2 <= usize::from(SHARDS),
                "{k} workers, one joining: {moved} shards moved between the others"
            );
            let moved = moved_between_others(&was, &assignment(&before[1..], SHARDS), "worker-0");
            assert!(
                moved * k * 2 <= usize::from(SHARDS),
                "{k} workers, one leaving: {moved} shards moved between the others"
            );
        }
    }

    #[test]
    fn the_owner_does_not_depend_on_the_order_of_the_list_or_repeats_in_it() {
        let mut live = workers(5);
        let first: Vec<Option<String>> = (0..64)
            .map(|s| owner(s, &live, 64).map(str::to_owned))
            .collect();
        live.reverse();
        live.push("worker-2".to_owned());
        let second: Vec<Option<String>> = (0..64)
            .map(|s| owner(s, &live, 64).map(str::to_owned))
            .collect();
        assert_eq!(first, second);
        assert_eq!(owner(0, &[], 64), None);
        assert_eq!(owner(64, &live, 64), None, "past the last shard");
    }
}
