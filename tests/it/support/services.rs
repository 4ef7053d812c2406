//! Everything a worker needs, private to one test: a vhost, a database and a fake PayPal, with a
//! config pointing at all three (fast retries, so failures are retried within the test's time).

use std::time::Duration;

use ipn_bridge::config::Config;
use ipn_bridge::fake_paypal::{Answer, FakePaypal};
use tokio::net::TcpListener;

use super::{TestBroker, TestDb};

/// A test's own broker vhost, database and fake PayPal (answering VERIFIED by default).
pub struct Services {
    /// The vhost.
    pub broker: TestBroker,
    /// The database (dropped with this value).
    pub db: TestDb,
    /// The fake PayPal.
    pub paypal: FakePaypal,
    /// A config for all three.
    pub config: Config,
}

impl Services {
    /// Starts the fake PayPal and makes the vhost; the database is created on first connect.
    pub async fn start() -> Services {
        let broker = TestBroker::new().await;
        let db = TestDb::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let paypal = FakePaypal::start(listener, Answer::Verified).expect("fake paypal");
        let mut config = broker.config();
        config.database = db.config();
        config.paypal.verify_url = Some(paypal.url());
        config.worker.verify_backoff = Duration::from_millis(10);
        config.worker.retry_min = Duration::from_millis(20);
        // Delay tiers short enough for a test to watch an IPN walk them all.
        config.retry.tiers = [50, 100, 200].map(Duration::from_millis).to_vec();
        Services {
            broker,
            db,
            paypal,
            config,
        }
    }
}
