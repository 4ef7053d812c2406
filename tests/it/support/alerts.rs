//! Fake alert receivers: a webhook that records JSON bodies (and can fail the first requests),
//! and a minimal SMTP server that records each message's data.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A webhook endpoint on 127.0.0.1; answers 500 to its first `failures` requests, then 200.
pub struct FakeWebhook {
    /// The URL to configure as `alert.webhook_url`.
    pub url: String,
    received: Arc<Mutex<Vec<serde_json::Value>>>,
    /// Requests answered so far, failed ones included.
    pub requests: Arc<AtomicUsize>,
}

impl FakeWebhook {
    pub async fn start(failures: usize) -> FakeWebhook {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().expect("address"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let requests = Arc::new(AtomicUsize::new(0));
        let (kept, count) = (Arc::clone(&received), Arc::clone(&requests));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (kept, count) = (Arc::clone(&kept), Arc::clone(&count));
                let service = service_fn(move |request: Request<Incoming>| {
                    let (kept, count) = (Arc::clone(&kept), Arc::clone(&count));
                    async move {
                        let body = request.into_body().collect().await.map(|b| b.to_bytes());
                        let n = count.fetch_add(1, Ordering::SeqCst);
                        let status = if n < failures {
                            StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            if let Ok(json) = serde_json::from_slice(&body.unwrap_or_default()) {
                                kept.lock().expect("lock").push(json);
                            }
                            StatusCode::OK
                        };
                        let mut response = Response::new(Full::new(Bytes::new()));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        FakeWebhook {
            url,
            received,
            requests,
        }
    }

    /// The alerts accepted so far.
    pub fn received(&self) -> Vec<serde_json::Value> {
        self.received.lock().expect("lock").clone()
    }

    /// Waits until `n` alerts were accepted, then returns them.
    pub async fn wait_for(&self, n: usize) -> Vec<serde_json::Value> {
        let enough = async {
            while self.received().len() < n {
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        };
        tokio::time::timeout(super::PATIENCE, enough)
            .await
            .unwrap_or_else(|_| panic!("{n} alerts in time, got {:?}", self.received()));
        self.received()
    }
}

/// An SMTP server on 127.0.0.1 speaking just enough of RFC 5321 (no TLS, no auth) to take mail.
pub struct FakeSmtp {
    /// The URL to configure as `alert.smtp_url`.
    pub url: String,
    messages: Arc<Mutex<Vec<String>>>,
}

impl FakeSmtp {
    pub async fn start() -> FakeSmtp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("smtp://{}", listener.local_addr().expect("address"));
        let messages = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&messages);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(session(stream, Arc::clone(&kept)));
            }
        });
        FakeSmtp { url, messages }
    }

    /// Waits until `n` messages arrived, then returns their data (headers and body).
    pub async fn wait_for(&self, n: usize) -> Vec<String> {
        let enough = async {
            while self.messages.lock().expect("lock").len() < n {
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
        };
        tokio::time::timeout(super::PATIENCE, enough)
            .await
            .expect("mail in time");
        self.messages.lock().expect("lock").clone()
    }
}

async fn session(stream: tokio::net::TcpStream, kept: Arc<Mutex<Vec<String>>>) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let _ = write.write_all(b"220 fake ESMTP\r\n").await;
    let mut data: Option<String> = None;
    while let Ok(Some(line)) = lines.next_line().await {
        if let Some(message) = data.as_mut() {
            if line == "." {
                kept.lock().expect("lock").push(std::mem::take(message));
                data = None;
                let _ = write.write_all(b"250 queued\r\n").await;
            } else {
                message.push_str(&line);
                message.push('\n');
            }
            continue;
        }
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 fake\r\n",
            "DATA" => {
                data = Some(String::new());
                b"354 go on\r\n"
            }
            "QUIT" => {
                let _ = write.write_all(b"221 bye\r\n").await;
                return;
            }
            _ => b"250 ok\r\n",
        };
        let _ = write.write_all(reply).await;
    }
}
