//! Any bytes as what one client sends on one connection to the ingress: hyper's HTTP/1 parsing,
//! our routing, the method, content-type, length and body checks, and the message we build, exactly
//! as `ipn-ingress` serves a connection (`ingress::serve_connection`), with a recording sink in
//! place of the broker. The first input byte says whether the sink accepts (confirms) or refuses.
//! Checked, besides never panicking:
//! - an IPN acknowledgement (200 with an empty body) is written at most once per message the sink
//!   accepted, and never when it refuses;
//! - every message handed to the sink has a non-empty body within the size limit, an accepted
//!   form content type, the order key header equal to the provider's key of that body, and the
//!   routing key of that key's shard;
//! - whatever the body, what we build stays bounded: the order key is a short printable-ASCII
//!   token (no NUL, which PostgreSQL `text` refuses; far below its btree row limit), and the
//!   message's content-header frame stays under a fixed size, so it always fits the broker's
//!   `frame_max` with room for the headers the broker adds.
#![no_main]

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipn_bridge::amqp::{BROKER_HEADROOM, Outgoing, PublishError, State, header_frame_size};
use ipn_bridge::bounded;
use ipn_bridge::config::Config;
use ipn_bridge::contract::header_text;
use ipn_bridge::ingress::{self, Sink};
use ipn_bridge::provider::PayPal;
use ipn_bridge::provider::Provider;
use ipn_bridge::topology::Topology;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MAX_BODY: usize = 512;

/// What the sink was given: routing key, body, content type, order key header, and the size of
/// the content-header frame its properties make.
type Recorded = (String, Vec<u8>, Option<String>, Option<String>, usize);

/// Bound on the content-header frame of an inbound message: content type (at most 255 bytes),
/// message id, timestamp, app id and our four headers with a bounded key.
const MAX_HEADER_FRAME: usize = 1024;

#[derive(Clone)]
struct Recording {
    accept: bool,
    published: Arc<Mutex<Vec<Recorded>>>,
}

impl Sink for Recording {
    async fn publish(&self, message: Outgoing<'_>, _limit: Duration) -> Result<(), PublishError> {
        let key = header_text(&message.properties, "x-ipn-order-key");
        let content_type = message
            .properties
            .content_type()
            .as_ref()
            .map(|c| c.to_string());
        let frame = header_frame_size(&message.properties);
        self.published.lock().unwrap().push((
            message.routing_key.to_owned(),
            message.body.to_vec(),
            content_type,
            key,
            frame,
        ));
        if self.accept {
            Ok(())
        } else {
            Err(PublishError::Nacked)
        }
    }

    fn state(&self) -> State {
        State::Ready
    }
}

/// IPN acknowledgements in the raw response stream: `200` responses with `content-length: 0`.
fn acknowledgements(output: &[u8]) -> usize {
    let text = String::from_utf8_lossy(output);
    text.split("HTTP/1.1 ")
        .filter(|response| response.starts_with("200"))
        .filter(|response| {
            let head = response.split("\r\n\r\n").next().unwrap_or_default();
            head.to_ascii_lowercase().contains("\r\ncontent-length: 0")
        })
        .count()
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, input)) = data.split_first() else {
        return;
    };
    let mut config = Config::default();
    config.ingress.max_body_bytes = NonZeroUsize::new(MAX_BODY).unwrap();
    let sink = Recording {
        accept: first & 1 == 1,
        published: Arc::default(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let output = runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let serve = ingress::serve_connection(&config, sink.clone(), server);
        let talk = async move {
            // The server may close early (a bad request): a failed write is a possible outcome.
            let _ = client.write_all(input).await;
            let _ = client.shutdown().await;
            let mut output = Vec::new();
            let _ = client.read_to_end(&mut output).await;
            output
        };
        let ((), output) = tokio::join!(serve, talk);
        output
    });
    let published = sink.published.lock().unwrap();
    let acks = acknowledgements(&output);
    if sink.accept {
        assert!(
            acks <= published.len(),
            "{acks} acks for {} messages",
            published.len()
        );
    } else {
        assert_eq!(acks, 0, "200 without a confirmed message");
    }
    let topology = Topology::of(&config);
    for (routing_key, body, content_type, key, frame) in published.iter() {
        assert!(
            *frame <= MAX_HEADER_FRAME,
            "a header frame of {frame} bytes"
        );
        assert!(*frame <= 131_072 - BROKER_HEADROOM);
        let key_text = key.as_deref().unwrap_or_default();
        assert!(bounded::is_token(key_text), "unbounded key {key_text:?}");
        assert!(
            !body.is_empty() && body.len() <= MAX_BODY,
            "body of {} bytes",
            body.len()
        );
        let content_type = content_type.as_deref().expect("content type");
        assert!(
            PayPal.accepts_content_type(Some(content_type)),
            "{content_type}"
        );
        let expected = PayPal.order_key(body);
        assert_eq!(key.as_deref(), Some(expected.as_str()));
        let shard = expected.shard(topology.shards());
        assert_eq!(routing_key, &Topology::shard_routing_key(shard));
    }
});
