//! The ingress against the real broker: 200 only after a confirm, 503 otherwise, bad input
//! refused without publishing, and a shutdown that answers every request in flight.

use std::time::{Duration, Instant};

use ipn_bridge::provider::PayPal;
use ipn_bridge::provider::Provider;
use lapin::options::QueueDeleteOptions;
use lapin::types::AMQPValue;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{
    DiskAlarm, PATIENCE, Proxy, TestBroker, post_form, ready_ingress, sample, samples,
    spawn_ingress,
};

fn header<'a>(delivery: &'a lapin::message::Delivery, name: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(name)
}

fn header_text(delivery: &lapin::message::Delivery, name: &str) -> String {
    ipn_bridge::contract::header_text(&delivery.properties, name).unwrap_or_else(|| {
        let other = header(delivery, name);
        panic!("header {name} is not a string: {other:?}")
    })
}

#[tokio::test]
async fn every_sample_arrives_in_its_shard_queue_byte_for_byte_with_its_headers() {
    let broker = TestBroker::new().await;
    let (topology, ingress) = ready_ingress(broker.config()).await;

    let samples = samples();
    assert_eq!(samples.len(), 26);
    for (name, body) in &samples {
        let (status, text) = post_form(&ingress.url, body.clone()).await;
        assert_eq!((status, text.as_str()), (200, ""), "{name}");
    }

    let delivered = broker.drain_shards(&topology).await;
    assert_eq!(delivered.len(), samples.len());
    for (name, body) in &samples {
        let matching: Vec<_> = delivered.iter().filter(|(_, d)| d.data == *body).collect();
        assert_eq!(
            matching.len(),
            1,
            "{name} arrived exactly once, byte for byte"
        );
        let (shard, delivery) = matching[0];
        let key = PayPal.order_key(body);
        assert_eq!(*shard, key.shard(topology.shards()), "{name} in its shard");
        assert_eq!(delivery.routing_key.as_str(), shard.to_string());
        assert_eq!(header_text(delivery, "x-ipn-order-key"), key.as_str());
        assert_eq!(header_text(delivery, "x-ipn-provider"), "paypal");
        let received = header_text(delivery, "x-ipn-received-at");
        assert!(humantime::parse_rfc3339(&received).is_ok(), "{received}");
        assert!(matches!(
            header(delivery, "x-ipn-attempt"),
            Some(AMQPValue::LongLongInt(0))
        ));
        let properties = &delivery.properties;
        assert_eq!(properties.delivery_mode(), &Some(2), "persistent");
        assert_eq!(
            properties.content_type().as_ref().map(|c| c.as_str()),
            Some("application/x-www-form-urlencoded")
        );
        let id = properties.message_id().as_ref().expect("message id");
        assert_eq!(
            uuid::Uuid::parse_str(id.as_str())
                .expect("uuid")
                .get_version_num(),
            7
        );
    }
    // Sequential posts of one shard stay in posting order in its queue.
    for shard in 0..topology.shards().get() {
        let queued: Vec<&Vec<u8>> = delivered
            .iter()
            .filter(|(s, _)| *s == shard)
            .map(|(_, d)| &d.data)
            .collect();
        let posted: Vec<&Vec<u8>> = samples
            .iter()
            .map(|(_, body)| body)
            .filter(|body| PayPal.order_key(body).shard(topology.shards()) == shard)
            .collect();
        assert_eq!(queued, posted, "shard {shard} order");
    }
    // /metrics: Prometheus text, its counters typed as counters under their `_total` name, for
    // curl and promtool; OpenMetrics for a scraper that asks for it. Fixed label sets exist from
    // the start, at 0.
    assert_eq!(
        ingress
            .metric("ipn_ingress_requests_total{status=\"503\"}")
            .await,
        Some(0.0)
    );
    assert_eq!(
        ingress
            .metric("ipn_ingress_alerts_failed_total{channel=\"webhook\"}")
            .await,
        Some(0.0)
    );
    let plain = crate::support::http_get(ingress.path("/metrics"))
        .await
        .expect("metrics");
    assert_eq!(
        plain.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = plain.text().await.expect("text");
    assert!(
        text.contains("# TYPE ipn_ingress_requests_total counter\n") && !text.contains("# EOF"),
        "{text}"
    );
    let open = crate::support::http()
        .get(ingress.path("/metrics"))
        .header("accept", "application/openmetrics-text; version=1.0.0")
        .send()
        .await
        .expect("metrics");
    let open = open.text().await.expect("text");
    assert!(
        open.contains("# TYPE ipn_ingress_requests counter\n") && open.ends_with("# EOF\n"),
        "{open}"
    );
    ingress.stop().await;
}

#[tokio::test]
async fn ingress_answers_503_within_the_confirm_timeout_while_the_broker_is_cut_off_and_recovers() {
    let broker = TestBroker::new().await;
    let proxy = Proxy::start().await;
    let config = broker.config_via(proxy.address());
    let confirm_timeout = config.ingress.confirm_timeout;
    let (topology, ingress) = ready_ingress(config).await;
    let body = sample("001_web_accept.txt");
    assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);

    proxy.cut();
    let started = Instant::now();
    let (status, reason) = post_form(&ingress.url, sample("003_cart.txt")).await;
    assert_eq!(status, 503, "{reason}");
    assert!(
        started.elapsed() <= confirm_timeout + Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    let readiness = crate::support::http_get(ingress.path("/readyz"))
        .await
        .expect("readyz answers");
    assert_eq!(readiness.status(), 503);

    proxy.restore();
    ingress.wait_ready().await;
    let later = sample("042_send_money.txt");
    assert_eq!(post_form(&ingress.url, later.clone()).await.0, 200);

    let queued = broker.queued_bodies(&topology).await;
    assert!(
        queued.contains(&body) && queued.contains(&later),
        "both 200s are queued"
    );
    ingress.stop().await;
}

#[tokio::test]
async fn a_node_that_stops_answering_while_the_publisher_declares_costs_a_retry_not_the_publisher()
{
    let broker = TestBroker::new().await;
    let proxy = Proxy::start().await;
    let mut config = broker.config_via(proxy.address());
    // The declaration is bounded by 12 × this; heartbeats far away, so they cannot end the
    // frozen connection within the test.
    config.amqp.connect_timeout = Duration::from_millis(300);
    config.amqp.heartbeat = Duration::from_secs(60);
    proxy.freeze_after_open();
    let ingress = spawn_ingress(config).await;
    // Connected, handshake done, and then no answer to the declaration.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let readiness = crate::support::http_get(ingress.path("/readyz"))
        .await
        .expect("readyz answers");
    assert_eq!(readiness.status(), 503, "not ready while declaring");
    proxy.restore();
    // The frozen connection stays frozen: only a new one can make the ingress ready.
    ingress.wait_ready().await;
    let body = sample("001_web_accept.txt");
    assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    let topology = ipn_bridge::topology::Topology::new(&broker.config().topology);
    assert!(broker.queued_bodies(&topology).await.contains(&body));
    ingress.stop().await;
}

#[tokio::test]
async fn ingress_answers_503_at_once_when_no_broker_listens() {
    let broker = TestBroker::new().await;
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").to_string()
    };
    let ingress = spawn_ingress(broker.config_via(&closed)).await;
    let (status, reason) = post_form(&ingress.url, sample("001_web_accept.txt")).await;
    assert_eq!((status, reason.trim()), (503, "broker unavailable"));
    let readiness = crate::support::http_get(ingress.path("/readyz"))
        .await
        .expect("readyz answers");
    assert_eq!(readiness.status(), 503);
    assert_eq!(
        readiness.text().await.expect("text").trim(),
        "broker unavailable"
    );
    let health = crate::support::http_get(ingress.path("/healthz"))
        .await
        .expect("healthz answers");
    assert_eq!(health.status(), 200, "alive even without a broker");
    ingress.stop().await;
}

#[tokio::test]
async fn a_message_that_cannot_be_routed_gets_503_not_200() {
    let broker = TestBroker::new().await;
    let (topology, ingress) = ready_ingress(broker.config()).await;
    let body = sample("012_subscr_signup.txt");
    let shard = PayPal.order_key(&body).shard(topology.shards());
    let channel = broker.channel().await;
    channel
        .queue_delete(
            topology.shard_queue(shard).into(),
            QueueDeleteOptions::default(),
        )
        .await
        .expect("queue deleted");

    let (status, reason) = post_form(&ingress.url, body).await;
    assert_eq!((status, reason.trim()), (503, "message unroutable"));
    // Other shards are unaffected.
    let other = samples()
        .into_iter()
        .map(|(_, body)| body)
        .find(|body| PayPal.order_key(body).shard(topology.shards()) != shard)
        .expect("a sample of another shard");
    assert_eq!(post_form(&ingress.url, other).await.0, 200);
    ingress.stop().await;
}

#[tokio::test]
async fn a_message_the_broker_nacks_gets_503_not_200() {
    let broker = TestBroker::new().await;
    let (topology, ingress) = ready_ingress(broker.config()).await;
    // A full queue with `x-overflow=reject-publish` makes the broker nack every publish.
    let full = serde_json::json!({ "max-length": 0 });
    broker
        .set_queue_policy("full", "^ipn\\.inbound\\.", full)
        .await;
    let mut stored = 0;
    let refused = async {
        loop {
            let (status, reason) = post_form(&ingress.url, sample("001_web_accept.txt")).await;
            if status != 200 {
                return (status, reason);
            }
            stored += 1;
            // The policy takes a moment to reach the queues; until then the IPN is stored.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let (status, reason) = tokio::time::timeout(PATIENCE, refused)
        .await
        .expect("policy applied");
    assert_eq!((status, reason.trim()), (503, "broker refused the message"));
    let channel = broker.channel().await;
    let shard = PayPal
        .order_key(&sample("001_web_accept.txt"))
        .shard(topology.shards());
    let queued = broker.count(&channel, &topology.shard_queue(shard)).await;
    assert_eq!(queued, stored, "only the IPNs answered 200 are stored");
    ingress.stop().await;
}

/// Sends raw bytes and returns what the server answered before closing (or the first
/// response, whichever comes first).
async fn raw_exchange(address: std::net::SocketAddr, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    // The server may answer and close before reading everything; that is not an error here.
    let _ = stream.write_all(request).await;
    read_answer(&mut stream).await
}

async fn read_answer(stream: &mut TcpStream) -> String {
    let mut answer = Vec::new();
    let mut buffer = [0u8; 4096];
    let read = async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            }
            if answer.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
    };
    tokio::time::timeout(PATIENCE, read)
        .await
        .expect("server answered or closed");
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn bad_input_gets_its_status_and_publishes_nothing() {
    let broker = TestBroker::new().await;
    let mut config = broker.config();
    config.ingress.max_body_bytes = std::num::NonZeroUsize::new(1024).expect("non-zero");
    config.ingress.body_read_timeout = Duration::from_millis(500);
    config.ingress.header_read_timeout = Duration::from_millis(500);
    let (topology, ingress) = ready_ingress(config).await;
    let client = crate::support::http();
    let form = "application/x-www-form-urlencoded";
    let body = sample("001_web_accept.txt");

    let get = client.get(&ingress.url).send().await.expect("answer");
    assert_eq!(get.status(), 405);
    assert_eq!(
        get.headers().get("allow").map(|v| v.as_bytes()),
        Some(&b"POST"[..])
    );
    let put = client
        .put(&ingress.url)
        .header("content-type", form)
        .body(body.clone())
        .send()
        .await;
    assert_eq!(put.expect("answer").status(), 405);
    let json = client
        .post(&ingress.url)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await;
    assert_eq!(json.expect("answer").status(), 415);
    let untyped = client.post(&ingress.url).body(body.clone()).send().await;
    assert_eq!(untyped.expect("answer").status(), 415);
    let long_type = format!("{form}; x={}", "a".repeat(300));
    let long = client
        .post(&ingress.url)
        .header("content-type", long_type)
        .body(body.clone())
        .send()
        .await;
    assert_eq!(
        long.expect("answer").status(),
        415,
        "an over-long content type is refused, not a panic"
    );
    let empty = client
        .post(&ingress.url)
        .header("content-type", form)
        .body("")
        .send()
        .await;
    assert_eq!(empty.expect("answer").status(), 400);
    let large = client
        .post(&ingress.url)
        .header("content-type", form)
        .body(vec![b'a'; 1025])
        .send()
        .await;
    assert_eq!(large.expect("answer").status(), 413);
    let elsewhere = client
        .post(ingress.path("/other"))
        .header("content-type", form)
        .body(body.clone())
        .send()
        .await;
    assert_eq!(elsewhere.expect("answer").status(), 404);

    // A chunked body that never ends is cut at the limit, not read forever.
    let mut chunked = format!(
        "POST /ipn HTTP/1.1\r\nhost: x\r\ncontent-type: {form}\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    for _ in 0..64 {
        chunked.extend_from_slice(b"100\r\n");
        chunked.extend_from_slice(&[b'a'; 256]);
        chunked.extend_from_slice(b"\r\n");
    }
    let answer = raw_exchange(ingress.address, &chunked).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // A body slower than body_read_timeout gets 408.
    let mut slow = TcpStream::connect(ingress.address).await.expect("connect");
    let head = format!(
        "POST /ipn HTTP/1.1\r\nhost: x\r\ncontent-type: {form}\r\ncontent-length: 100\r\n\r\nab"
    );
    slow.write_all(head.as_bytes()).await.expect("write");
    let answer = read_answer(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");

    // Headers slower than header_read_timeout: the connection is closed without an answer.
    let mut slowloris = TcpStream::connect(ingress.address).await.expect("connect");
    slowloris
        .write_all(b"POST /ipn HTTP/1.1\r\nhost: x\r\n")
        .await
        .expect("write");
    let answer = read_answer(&mut slowloris).await;
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");

    // Nothing was published, and the ingress still takes a real IPN.
    assert!(
        broker.drain_shards(&topology).await.is_empty(),
        "bad input published nothing"
    );
    assert_eq!(post_form(&ingress.url, body.clone()).await.0, 200);
    let queued = broker.drain_shards(&topology).await;
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].1.data, body);
    ingress.stop().await;
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish_with_their_confirms() {
    let broker = TestBroker::new().await;
    let proxy = Proxy::start().await;
    let mut config = broker.config_via(proxy.address());
    config.ingress.confirm_timeout = Duration::from_secs(8);
    let (topology, mut ingress) = ready_ingress(config).await;

    // Hold the broker's confirms so every request is provably in flight when shutdown begins.
    proxy.hold_replies();
    let bodies: Vec<Vec<u8>> = samples()
        .into_iter()
        .map(|(_, body)| body)
        .take(10)
        .collect();
    let requests: Vec<_> = bodies
        .iter()
        .map(|body| tokio::spawn(post_form_owned(ingress.url.clone(), body.clone())))
        .collect();
    let in_flight = async {
        while ingress.metric("ipn_ingress_in_flight").await != Some(10.0) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(PATIENCE, in_flight)
        .await
        .expect("10 requests in flight");
    assert!(
        requests.iter().all(|r| !r.is_finished()),
        "no answer while the broker is silent"
    );

    ingress.begin_shutdown();
    proxy.restore();
    let mut answered = Vec::new();
    for request in requests {
        answered.push(request.await.expect("request task"));
    }
    ingress.stop().await;

    let queued = broker.queued_bodies(&topology).await;
    for (body, status) in bodies.iter().zip(&answered) {
        assert!(*status == 200 || *status == 503, "{status}");
        if *status == 200 {
            assert!(queued.contains(body), "every 200 is in its queue");
        }
    }
    assert!(
        answered.iter().all(|s| *s == 200),
        "confirms arrived within the grace: {answered:?}"
    );
}

async fn post_form_owned(url: String, body: Vec<u8>) -> u16 {
    post_form(&url, body).await.0
}

#[tokio::test]
async fn health_and_metrics_describe_the_server() {
    let broker = TestBroker::new().await;
    let (_, ingress) = ready_ingress(broker.config()).await;
    assert_eq!(
        post_form(&ingress.url, sample("001_web_accept.txt"))
            .await
            .0,
        200
    );
    assert_eq!(post_form(&ingress.url, Vec::new()).await.0, 400);

    let health = crate::support::http_get(ingress.path("/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    assert_eq!(
        ingress
            .metric("ipn_ingress_requests_total{status=\"200\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        ingress
            .metric("ipn_ingress_requests_total{status=\"400\"}")
            .await,
        Some(1.0)
    );
    assert_eq!(
        ingress
            .metric("ipn_ingress_publish_confirm_seconds_count")
            .await,
        Some(1.0)
    );
    assert_eq!(ingress.metric("ipn_ingress_in_flight").await, Some(0.0));
    ingress.stop().await;
}

#[tokio::test]
async fn ingress_answers_503_at_once_while_a_resource_alarm_blocks_publishing() {
    let broker = TestBroker::exclusive().await;
    let config = broker.config();
    let confirm_timeout = config.ingress.confirm_timeout;
    let (_, ingress) = ready_ingress(config).await;
    assert_eq!(
        post_form(&ingress.url, sample("001_web_accept.txt"))
            .await
            .0,
        200
    );

    let alarm = DiskAlarm::raise();
    // RabbitMQ blocks (and tells) a connection when it next publishes during the alarm, so the
    // first IPN can only find out by its confirm timing out: 503 either way, never 200.
    let (status, _) = post_form(&ingress.url, sample("003_cart.txt")).await;
    assert_eq!(status, 503);
    let blocked = async {
        loop {
            let readiness = crate::support::http_get(ingress.path("/readyz"))
                .await
                .expect("readyz answers");
            if readiness.text().await.expect("text").trim() == "broker blocked publishing" {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(PATIENCE, blocked)
        .await
        .expect("readyz reports the block");
    // From then on, every IPN is refused at once instead of waiting for the timeout.
    let started = Instant::now();
    let (status, reason) = post_form(&ingress.url, sample("004_reversed.txt")).await;
    assert_eq!(
        (status, reason.trim()),
        (503, "broker blocked publishing (resource alarm)")
    );
    assert!(
        started.elapsed() < confirm_timeout,
        "answered without waiting for a confirm"
    );

    drop(alarm);
    ingress.wait_ready().await;
    assert_eq!(
        post_form(&ingress.url, sample("042_send_money.txt"))
            .await
            .0,
        200
    );
    ingress.stop().await;
}
