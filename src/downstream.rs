//! The business services' queues after `<p>.events` (`[[downstream]]`): what the bridge sees of
//! each (depth, consumers, dead-lettered events), shared by the worker's watch and by
//! `ipnctl downstream`, and the rules that tell a service in trouble.
//!
//! Each queue is looked at with passive declares (no management API needed): the queue's own
//! message and consumer counts, and the message count of its `<queue>.dead`.

use std::time::{Duration, Instant};

use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::alert::{Alert, Kind};
use crate::config::{self, Downstream};

/// One look at a downstream queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Seen {
    /// Events waiting in the queue (ready; unacked ones are not counted by the broker).
    pub depth: u32,
    /// Consumers subscribed to it.
    pub consumers: u32,
    /// Events in its `<queue>.dead`.
    pub dead: u32,
}

/// Looks at `queue` and its dead-letter queue on a channel of its own (a missing queue closes
/// the channel it was asked on).
pub async fn look(connection: &Connection, queue: &str) -> Result<Seen, lapin::Error> {
    let channel = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let own = channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await?;
    let dead_queue = config::dead_letter_queue(queue);
    let dead = channel
        .queue_declare(dead_queue.as_str().into(), passive, FieldTable::default())
        .await?;
    // Only looking; a failing close changes nothing.
    let _ = channel.close(200, "looked".into()).await;
    Ok(Seen {
        depth: own.message_count(),
        consumers: own.consumer_count(),
        dead: dead.message_count(),
    })
}

/// Something wrong with a downstream queue, worth telling a human.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Events arrived in `<queue>.dead` since the last look.
    DeadLettered {
        /// Events now in the dead-letter queue.
        total: u32,
        /// How many of them arrived since the last look.
        new: u32,
    },
    /// No consumer for at least `no_consumer_after`.
    NoConsumer {
        /// How long the queue has been without one (as far as the watch saw).
        silent_for: Duration,
        /// Events waiting meanwhile.
        depth: u32,
    },
    /// More than `max_depth` events wait, and more than at the last look.
    Backlog {
        /// Events waiting.
        depth: u32,
        /// Consumers subscribed.
        consumers: u32,
    },
}

/// What the watch remembers of one queue between looks. Each trouble is told once when it
/// starts (a service without consumer is told once, not at every look), and again only after
/// it ended; the alerter rate-limits on top.
#[derive(Debug, Clone)]
pub struct Watch {
    queue: Downstream,
    dead: u32,
    depth: u32,
    no_consumer_since: Option<Instant>,
    told_no_consumer: bool,
    told_backlog: bool,
}

impl Watch {
    /// A watch on `queue` that has seen nothing yet (dead-lettered events found at the first look
    /// are told).
    pub fn new(queue: Downstream) -> Watch {
        Watch {
            queue,
            dead: 0,
            depth: 0,
            no_consumer_since: None,
            told_no_consumer: false,
            told_backlog: false,
        }
    }

    /// The queue watched.
    pub fn queue(&self) -> &Downstream {
        &self.queue
    }

    /// Takes in one look made at `now`; returns the troubles that started with it.
    pub fn observe(&mut self, now: Instant, seen: Seen) -> Vec<Trouble> {
        let mut troubles = Vec::new();
        if seen.dead > self.dead {
            troubles.push(Trouble::DeadLettered {
                total: seen.dead,
                new: seen.dead - self.dead,
            });
        }
        self.dead = seen.dead;
        if seen.consumers == 0 {
            let since = *self.no_consumer_since.get_or_insert(now);
            let silent_for = now.duration_since(since);
            if silent_for >= self.queue.no_consumer_after && !self.told_no_consumer {
                self.told_no_consumer = true;
                troubles.push(Trouble::NoConsumer {
                    silent_for,
                    depth: seen.depth,
                });
            }
        } else {
            self.no_consumer_since = None;
            self.told_no_consumer = false;
        }
        if seen.depth <= self.queue.max_depth {
            self.told_backlog = false;
        } else if seen.depth > self.depth && !self.told_backlog {
            self.told_backlog = true;
            troubles.push(Trouble::Backlog {
                depth: seen.depth,
                consumers: seen.consumers,
            });
        }
        self.depth = seen.depth;
        troubles
    }

    /// The alert for a trouble of this queue: names the queue, the count and the `ipnctl`
    /// command that helps. The reason is fixed per queue and kind, so the alerter rate-limits
    /// them together.
    pub fn alert(&self, trouble: Trouble) -> Alert {
        let queue = &self.queue.queue;
        let dead = config::dead_letter_queue(queue);
        let (kind, reason, fix) = match trouble {
            Trouble::DeadLettered { total, new } => (
                Kind::DownstreamDeadLettered,
                format!("events dead-lettered to {dead}"),
                format!(
                    "{new} new, {total} in {dead}: the service rejected them (or requeued them more than {} times, or left them past message_ttl); see why with `ipnctl downstream dead list {queue}`, fix the service, then `ipnctl downstream dead replay {queue} --all`",
                    self.queue.delivery_limit
                ),
            ),
            Trouble::NoConsumer { silent_for, depth } => (
                Kind::DownstreamNoConsumer,
                format!("no consumer on {queue}"),
                format!(
                    "no consumer for {}, {depth} events waiting: start the service that reads {queue}; `ipnctl downstream list` shows its state",
                    humantime::format_duration(Duration::from_secs(silent_for.as_secs()))
                ),
            ),
            Trouble::Backlog { depth, consumers } => (
                Kind::DownstreamBacklog,
                format!("backlog on {queue}"),
                format!(
                    "{depth} events waiting (more than max_depth {}) and growing, {consumers} consumers: the service is slower than the events or stuck; `ipnctl downstream list` shows its state",
                    self.queue.max_depth
                ),
            ),
        };
        Alert {
            kind,
            order_key: queue.clone(),
            txn_id: None,
            reason,
            fix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn watch() -> Watch {
        let mut queue = Downstream::new("billing", &["#"]);
        queue.no_consumer_after = Duration::from_secs(60);
        queue.max_depth = 100;
        Watch::new(queue)
    }

    fn seen(depth: u32, consumers: u32, dead: u32) -> Seen {
        Seen {
            depth,
            consumers,
            dead,
        }
    }

    #[test]
    fn dead_lettered_events_are_told_when_more_arrive_not_at_every_look() {
        let mut watch = watch();
        let start = Instant::now();
        assert_eq!(
            watch.observe(start, seen(0, 1, 2)),
            [Trouble::DeadLettered { total: 2, new: 2 }]
        );
        assert!(watch.observe(start, seen(0, 1, 2)).is_empty());
        assert_eq!(
            watch.observe(start, seen(0, 1, 5)),
            [Trouble::DeadLettered { total: 5, new: 3 }]
        );
        // Replayed or purged, then one more.
        assert!(watch.observe(start, seen(0, 1, 0)).is_empty());
        assert_eq!(
            watch.observe(start, seen(0, 1, 1)),
            [Trouble::DeadLettered { total: 1, new: 1 }]
        );
        let alert = watch.alert(Trouble::DeadLettered { total: 1, new: 1 });
        assert_eq!(alert.kind, Kind::DownstreamDeadLettered);
        assert_eq!(alert.order_key, "billing");
        assert!(
            alert
                .fix
                .contains("ipnctl downstream dead replay billing --all"),
            "{}",
            alert.fix
        );
    }

    #[test]
    fn a_queue_without_consumer_is_told_once_after_the_threshold_and_again_after_it_came_back() {
        let mut watch = watch();
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        assert!(watch.observe(at(0), seen(3, 0, 0)).is_empty());
        assert!(watch.observe(at(59), seen(3, 0, 0)).is_empty());
        assert_eq!(
            watch.observe(at(60), seen(4, 0, 0)),
            [Trouble::NoConsumer {
                silent_for: Duration::from_secs(60),
                depth: 4
            }]
        );
        assert!(watch.observe(at(120), seen(4, 0, 0)).is_empty(), "once");
        assert!(watch.observe(at(121), seen(0, 1, 0)).is_empty());
        assert!(watch.observe(at(130), seen(0, 0, 0)).is_empty());
        assert_eq!(watch.observe(at(190), seen(0, 0, 0)).len(), 1, "again");
    }

    #[test]
    fn a_backlog_is_told_when_past_max_depth_and_growing() {
        let mut watch = watch();
        let now = Instant::now();
        assert!(
            watch.observe(now, seen(100, 1, 0)).is_empty(),
            "at the limit"
        );
        assert_eq!(
            watch.observe(now, seen(150, 1, 0)),
            [Trouble::Backlog {
                depth: 150,
                consumers: 1
            }]
        );
        assert!(watch.observe(now, seen(200, 1, 0)).is_empty(), "once");
        assert!(watch.observe(now, seen(50, 1, 0)).is_empty());
        assert!(
            watch.observe(now, seen(120, 1, 0)).len() == 1,
            "again after it drained"
        );
    }
}
