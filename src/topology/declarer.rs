//! Declaring queues on a channel that a refusal does not end the declaration on: a queue that
//! exists with other *placement* arguments (created before they were set, or with another
//! `topology.quorum_group_size`) keeps its own, since they only shape a queue when it is
//! created. Every other argument must still match: a queue with another delivery limit, TTL or
//! dead-letter target stops the declaration with the broker's reason.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ErrorKind, ExchangeKind};
use tracing::info;

/// The quorum group's size when the queue is created (RabbitMQ caps it at the cluster's size).
pub(super) const GROUP_SIZE: &str = "x-quorum-initial-group-size";
/// Where the queue's leader goes when it is created: `balanced` spreads them over the nodes.
pub(super) const LEADER_LOCATOR: &str = "x-queue-leader-locator";

/// A declaring channel on `connection`, reopened after the broker closed it over a placement
/// argument.
pub(super) struct Declarer<'a> {
    connection: &'a Connection,
    channel: Channel,
}

impl<'a> Declarer<'a> {
    pub(super) async fn open(connection: &'a Connection) -> Result<Declarer<'a>, lapin::Error> {
        let channel = connection.create_channel().await?;
        Ok(Declarer {
            connection,
            channel,
        })
    }

    /// Binds `queue` to `exchange` by `routing_key` and the binding's `args`.
    pub(super) async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        args: FieldTable,
    ) -> Result<(), lapin::Error> {
        self.channel
            .queue_bind(
                queue.into(),
                exchange.into(),
                routing_key.into(),
                QueueBindOptions::default(),
                args,
            )
            .await
    }

    /// Declares a durable exchange of `kind`, without arguments.
    pub(super) async fn exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
    ) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        self.channel
            .exchange_declare(name.into(), kind, durable, FieldTable::default())
            .await
    }

    /// Declares a durable queue with `args`; where an existing queue differs only in its
    /// placement arguments, adopts the queue's own and declares again (at most once per
    /// placement argument).
    pub(super) async fn queue(&mut self, name: &str, args: FieldTable) -> Result<(), lapin::Error> {
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        let mut args = args;
        let mut adopted = 0;
        loop {
            let declared = self
                .channel
                .queue_declare(name.into(), durable, args.clone());
            let error = match declared.await {
                Ok(_) => return Ok(()),
                Err(error) => error,
            };
            let existing = match refusal(&error) {
                Some(message) if adopted < 2 => adopt(&args, message),
                _ => None,
            };
            let Some((key, existing)) = existing else {
                return Err(error);
            };
            info!(
                queue = name,
                argument = key,
                "queue exists with other placement; keeping its own (placement only applies at creation)"
            );
            adopted += 1;
            args = existing;
            // The refusal closed the channel.
            self.channel = self.connection.create_channel().await?;
        }
    }

    /// Closes the channel; a failing close changes nothing about what was declared.
    pub(super) async fn close(self) -> Result<(), lapin::Error> {
        self.channel.close(200, "topology declared".into()).await
    }
}

/// The message of a PRECONDITION_FAILED refusal.
fn refusal(error: &lapin::Error) -> Option<&str> {
    match error.kind() {
        ErrorKind::ProtocolError(amqp) => {
            let message = amqp.get_message().as_str();
            message
                .starts_with("PRECONDITION_FAILED")
                .then_some(message)
        }
        _ => None,
    }
}

/// `args` changed to what the existing queue has, when the broker's refusal (RabbitMQ's
/// `inequivalent arg '<key>' for queue … received … but current is none` or `… but current is
/// the value '<v>' of type '<t>'`) is about a placement argument; with that argument's name.
fn adopt(args: &FieldTable, message: &str) -> Option<(&'static str, FieldTable)> {
    let key = between(message, "inequivalent arg '", "'")?;
    let key = [GROUP_SIZE, LEADER_LOCATOR]
        .into_iter()
        .find(|k| *k == key)?;
    let mut adopted = FieldTable::default();
    for (name, value) in args {
        if name.as_str() != key {
            adopted.insert(name.clone(), value.clone());
        }
    }
    if message.ends_with("but current is none") {
        return Some((key, adopted));
    }
    let current = between(message, "but current is the value '", "'")?;
    let value = if key == GROUP_SIZE {
        AMQPValue::LongLongInt(current.parse().ok()?)
    } else {
        AMQPValue::LongString(LongString::from(current))
    };
    adopted.insert(ShortString::from(key), value);
    Some((key, adopted))
}

/// The text of `text` between the first `start` and the next `end`.
fn between<'t>(text: &'t str, start: &str, end: &str) -> Option<&'t str> {
    let from = text.find(start)? + start.len();
    let rest = &text[from..];
    Some(&rest[..rest.find(end)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed() -> FieldTable {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        args.insert(GROUP_SIZE.into(), AMQPValue::LongLongInt(3));
        args.insert(
            LEADER_LOCATOR.into(),
            AMQPValue::LongString("balanced".into()),
        );
        args
    }

    // The messages are RabbitMQ 3.10.8's, as the real broker sent them (tests/it/topology.rs
    // runs the same upgrade against it).
    #[test]
    fn a_placement_argument_the_queue_lacks_or_has_otherwise_is_adopted_from_the_queue() {
        let none = "PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue 'q' in vhost 'v': received the value '3' of type 'long' but current is none";
        let (key, args) = adopt(&placed(), none).expect("adopted");
        assert_eq!(key, GROUP_SIZE);
        assert!(!args.contains_key(GROUP_SIZE) && args.contains_key(LEADER_LOCATOR));

        let five = "PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue 'q' in vhost 'v': received the value '3' of type 'long' but current is the value '5' of type 'signedint'";
        let (_, args) = adopt(&placed(), five).expect("adopted");
        assert_eq!(
            args.inner().get(GROUP_SIZE),
            Some(&AMQPValue::LongLongInt(5))
        );

        let local = "PRECONDITION_FAILED - inequivalent arg 'x-queue-leader-locator' for queue 'q' in vhost 'v': received the value 'balanced' of type 'longstr' but current is the value 'client-local' of type 'longstr'";
        let (key, args) = adopt(&placed(), local).expect("adopted");
        assert_eq!(key, LEADER_LOCATOR);
        assert_eq!(
            args.inner().get(LEADER_LOCATOR),
            Some(&AMQPValue::LongString("client-local".into()))
        );
    }

    #[test]
    fn any_other_difference_is_not_adopted() {
        let limit = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q' in vhost 'v': received the value '20' of type 'long' but current is the value '5' of type 'long'";
        assert!(adopt(&placed(), limit).is_none());
        assert!(adopt(&placed(), "PRECONDITION_FAILED - something else").is_none());
        let garbled = "PRECONDITION_FAILED - inequivalent arg 'x-quorum-initial-group-size' for queue 'q': but current is the value 'many' of type 'long'";
        assert!(adopt(&placed(), garbled).is_none());
    }
}
