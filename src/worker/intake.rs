//! The intake lane's re-routes, several at once.
//!
//! Every WeChat Pay notification arrives under one intake key
//! ([`crate::provider::wechatpay::intake_key`]), so one lane of one shard takes them all, in
//! arrival order, and re-routes each to the key inside it. One at a time, that lane drains at one
//! confirm's round trip per notification (~300–360 a second measured, docs/PERFORMANCE.md
//! "Per provider"). Here the lane takes every delivery waiting in it at once (up to
//! [`MAX_BATCH`]): one look-up of the intake key's block for all of them, then each one's copy is
//! published to its own key's shard, the copies of different keys concurrently and those of one
//! key one after the other, each only after the confirm of the one before. So a key's copies
//! reach its shard in arrival order even when one of them fails: the ones after a failure are
//! not sent. Each delivery is acked as soon as its copy is confirmed, so the broker refills the
//! shard's prefetch while the batch's slowest chain still runs.
//!
//! What this does not take goes the one-at-a-time way ([`Pipeline::settle`]), in order, before
//! anything that waits behind it: every delivery from the first one that is not a plain re-route
//! (a control message, a notification that does not open and will be quarantined, one already
//! re-routed); all of them while the intake key is blocked (they are held behind its blocker, as
//! one at a time); and a key's copies from its first failure on (retried in place). The lane is
//! still the only writer of the intake key's block: the batch runs in it.

use futures_util::future::join_all;
use tracing::{Instrument, warn};

use super::pipeline::{self, Inbound, Pipeline};
use crate::bounded;
use crate::keys::OrderKey;

/// The most deliveries of the intake lane re-routed together (also bounded by
/// `worker.concurrency`: each holds a permit).
pub const MAX_BATCH: usize = 64;

impl Pipeline {
    /// Re-routes the leading plain re-routes of `batch` (deliveries of one intake lane, in
    /// arrival order) to their own keys, calling `confirmed(i)` (the ack) as soon as delivery
    /// `i`'s copy is confirmed, before its key's next copy goes; says for each delivery whether
    /// it was (acked) or was left alone (settle it the one-at-a-time way, in order).
    ///
    /// Acking each as it confirms, not all at the batch's end, lets the broker send the next
    /// deliveries (the shard's prefetch is the batch's bound) while the batch's slowest chain
    /// still runs, so the next batch is waiting when this one ends.
    pub async fn reroute_intake<Ack>(
        &self,
        batch: &[Inbound],
        confirmed: impl Fn(usize) -> Ack + Sync,
    ) -> Vec<bool>
    where
        Ack: std::future::Future<Output = ()>,
    {
        let mut done = vec![false; batch.len()];
        let Some(first) = batch.first() else {
            return done;
        };
        let intake = first.key();
        if batch.iter().any(|inbound| inbound.key() != intake) {
            // Not one lane's: nothing is taken together.
            return done;
        }
        match self.store.key_state(intake.as_str(), None).await {
            Ok(state) if state.blocked.is_none() => {}
            // Blocked (or not known): each is held or settled the one-at-a-time way.
            _ => return done,
        }
        let chains = chains(batch, |inbound| {
            inbound
                .control
                .is_none()
                .then(|| self.own_key(inbound))
                .flatten()
        });
        let taken: usize = chains.iter().map(|(_, items)| items.len()).sum();
        if taken > 0 {
            self.metrics.intake_batch.observe(taken as f64);
        }
        let confirmed = &confirmed;
        let runs = chains.iter().map(|(own, items)| async move {
            let mut acked = Vec::with_capacity(items.len());
            for &i in items {
                let inbound = &batch[i];
                let span = pipeline::span(&inbound.message_id, intake.as_str(), inbound.attempt);
                // In the IPN's span, the warning too: every line about it carries its message id.
                let sent = async {
                    match self.reroute(inbound, intake, own.as_str()).await {
                        Ok(_) => true,
                        Err(error) => {
                            let error = bounded::error_chain(&error);
                            warn!(error, ipn.order_key = %intake, to = %own, "re-route not confirmed; it and the key's later ones are settled one at a time");
                            false
                        }
                    }
                };
                if !sent.instrument(span).await {
                    break;
                }
                confirmed(i).await;
                acked.push(i);
            }
            acked
        });
        for i in join_all(runs).await.into_iter().flatten() {
            done[i] = true;
        }
        done
    }
}

/// The leading deliveries that `own_key` re-routes, as chains by own key: each key once, in the
/// order of its first delivery, with the indices of its deliveries in arrival order. Stops at
/// the first delivery without an own key.
fn chains<T>(
    batch: &[T],
    mut own_key: impl FnMut(&T) -> Option<OrderKey>,
) -> Vec<(OrderKey, Vec<usize>)> {
    let mut chains: Vec<(OrderKey, Vec<usize>)> = Vec::new();
    let mut index = std::collections::HashMap::new();
    for (i, item) in batch.iter().enumerate() {
        let Some(own) = own_key(item) else {
            break;
        };
        let chain = *index.entry(own.clone()).or_insert_with(|| {
            chains.push((own, Vec::new()));
            chains.len() - 1
        });
        chains[chain].1.push(i);
    }
    chains
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> Option<OrderKey> {
        (!name.is_empty()).then(|| OrderKey::new("wechatpay", name))
    }

    #[test]
    fn chains_keep_each_keys_order_and_stop_at_the_first_without_a_key() {
        let batch = ["a", "b", "a", "c", "b", "", "a", "d"];
        let chains = chains(&batch, |name| key(name));
        let got: Vec<(String, Vec<usize>)> = chains
            .into_iter()
            .map(|(key, items)| (key.to_string(), items))
            .collect();
        assert_eq!(
            got,
            [
                ("wechatpay:a".to_owned(), vec![0, 2]),
                ("wechatpay:b".to_owned(), vec![1, 4]),
                ("wechatpay:c".to_owned(), vec![3]),
            ]
        );
    }

    #[test]
    fn a_batch_led_by_one_without_a_key_has_no_chains() {
        assert!(chains(&["", "a"], |name| key(name)).is_empty());
        assert!(chains::<&str>(&[], |name| key(name)).is_empty());
    }
}
