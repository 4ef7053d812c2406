//! `ipnctl`, the operator's tool: each subcommand is a function here, the binary only parses.

pub mod review;

use std::time::Duration;

use anyhow::Context;

use crate::config::Config;
use crate::topology::Topology;

/// PayPal's own User-Agent on IPN posts. It proves nothing; `send` uses it to look the same.
pub const PAYPAL_USER_AGENT: &str = "PayPal IPN ( https://www.paypal.com/ipn )";

/// Declares the whole topology (idempotent) and describes what now exists.
pub async fn declare_topology(config: &Config) -> anyhow::Result<String> {
    let topology = Topology::of(config);
    let connection = crate::amqp::connect(&config.amqp, "ipnctl")
        .await
        .with_context(|| format!("cannot connect to {}", config.amqp.url))?;
    let channel = connection
        .create_channel()
        .await
        .context("cannot open a channel")?;
    topology
        .declare(&channel)
        .await
        .context("cannot declare the topology")?;
    // The declaration is done; a failing close changes nothing about it.
    let _ = connection.close(200, "done".into()).await;
    Ok(format!(
        "declared exchange {} and queues {}",
        topology.inbound_exchange(),
        topology.queues().join(", ")
    ))
}

/// The URL `send` posts to when none is given: the configured ingress address and path.
pub fn default_ingress_url(config: &Config) -> String {
    format!("http://{}{}", config.ingress.listen, config.ingress.path)
}

/// POSTs `body` unchanged the way PayPal does; returns the status and the answer's body.
pub async fn send(url: &str, body: Vec<u8>) -> anyhow::Result<(u16, String)> {
    let client = reqwest::Client::builder()
        .user_agent(PAYPAL_USER_AGENT)
        .timeout(Duration::from_secs(30))
        .build()
        .context("cannot build an HTTP client")?;
    let response = client
        .post(url)
        .header(
            reqwest::header::CONTENT_TYPE,
            "application/x-www-form-urlencoded",
        )
        .body(body)
        .send()
        .await
        .with_context(|| format!("cannot POST to {url}"))?;
    let status = response.status().as_u16();
    let text = response.text().await.unwrap_or_default();
    Ok((status, text))
}

/// Runs a fake PayPal postback endpoint on `listen` until SIGINT/SIGTERM.
pub async fn fake_paypal(
    listen: std::net::SocketAddr,
    answer: crate::fake_paypal::Answer,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let fake = crate::fake_paypal::FakePaypal::start(listener, answer)?;
    println!("fake PayPal answering {answer:?} at {}", fake.url());
    println!(
        "point the worker at it: IPN_PAYPAL__VERIFY_URL={}",
        fake.url()
    );
    crate::shutdown::signal().await;
    fake.stop().await;
    Ok(())
}
