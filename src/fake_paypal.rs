//! A fake of PayPal's IPN postback endpoint, for tests and local demos without PayPal.
//!
//! It speaks the real protocol: a postback must be a POST with a form content type, a
//! User-Agent, and a body of `cmd=_notify-validate&` followed by the IPN's bytes; anything else
//! gets `INVALID`, as PayPal answers. It can be told, per IPN or by default, to answer
//! `VERIFIED`, `INVALID`, HTTP 500, garbage, slowly, or not at all; it records every postback so
//! a test can check the bytes it was sent.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, USER_AGENT};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::provider::paypal::verify::POSTBACK_PREFIX;

/// How the fake answers one postback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// HTTP 200 `VERIFIED`.
    Verified,
    /// HTTP 200 `INVALID`.
    Invalid,
    /// HTTP 500.
    ServerError,
    /// HTTP 200 with an HTML error page, as PayPal's "Fatal Failure".
    Garbage,
    /// `VERIFIED`, after this long.
    Slow(Duration),
    /// Reads the request and never answers.
    Silent,
}

/// As `--answer` spells it (`verified`, `slow:200ms`), so what is printed can be given back.
impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answer::Verified => f.write_str("verified"),
            Answer::Invalid => f.write_str("invalid"),
            Answer::ServerError => f.write_str("500"),
            Answer::Garbage => f.write_str("garbage"),
            Answer::Silent => f.write_str("silent"),
            Answer::Slow(delay) => write!(f, "slow:{}", humantime::format_duration(*delay)),
        }
    }
}

impl FromStr for Answer {
    type Err = String;
    /// `verified`, `invalid`, `500`, `garbage`, `silent`, or `slow:<duration>` (e.g. `slow:15s`).
    fn from_str(text: &str) -> Result<Answer, String> {
        match text {
            "verified" => Ok(Answer::Verified),
            "invalid" => Ok(Answer::Invalid),
            "500" => Ok(Answer::ServerError),
            "garbage" => Ok(Answer::Garbage),
            "silent" => Ok(Answer::Silent),
            _ => match text.strip_prefix("slow:").map(humantime::parse_duration) {
                Some(Ok(delay)) => Ok(Answer::Slow(delay)),
                _ => Err(format!(
                    "`{text}`: expected verified, invalid, 500, garbage, silent or slow:<duration>"
                )),
            },
        }
    }
}

/// One postback as the fake received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Postback {
    /// The bytes after `cmd=_notify-validate&` (the whole body when the prefix was missing).
    pub ipn: Vec<u8>,
    /// Method, content type, User-Agent and prefix were all as PayPal requires.
    pub well_formed: bool,
}

#[derive(Debug, Default)]
struct Script {
    default: Option<Answer>,
    per_ipn: HashMap<Vec<u8>, VecDeque<Answer>>,
    received: Vec<Postback>,
}

/// A running fake; stops when [`FakePaypal::stop`] is called or it is dropped.
#[derive(Debug)]
pub struct FakePaypal {
    address: SocketAddr,
    script: Arc<Mutex<Script>>,
    stop: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl FakePaypal {
    /// Serves on `listener`, answering `default` unless told otherwise per IPN.
    pub fn start(listener: TcpListener, default: Answer) -> std::io::Result<FakePaypal> {
        let address = listener.local_addr()?;
        let script = Arc::new(Mutex::new(Script {
            default: Some(default),
            ..Script::default()
        }));
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(listener, Arc::clone(&script), stop.clone()));
        Ok(FakePaypal {
            address,
            script,
            stop,
            task: Some(task),
        })
    }

    /// The postback URL to configure as `paypal.verify_url`.
    pub fn url(&self) -> url::Url {
        let text = format!("http://{}/cgi-bin/webscr", self.address);
        url::Url::parse(&text).unwrap_or_else(|_| unreachable!("an address makes a valid URL"))
    }

    /// The next postbacks of `ipn` get these answers, in order; after them, the default.
    pub fn script(&self, ipn: &[u8], answers: impl IntoIterator<Item = Answer>) {
        let mut script = self.lock();
        script
            .per_ipn
            .entry(ipn.to_vec())
            .or_default()
            .extend(answers);
    }

    /// Changes the answer for IPNs without a script of their own.
    pub fn set_default(&self, answer: Answer) {
        self.lock().default = Some(answer);
    }

    /// Every postback received so far, in order.
    pub fn postbacks(&self) -> Vec<Postback> {
        self.lock().received.clone()
    }

    /// Stops serving; requests held by `Silent` or `Slow` end without an answer.
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            // The server task only ends by this cancellation; a panic in it is already reported.
            let _ = task.await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for FakePaypal {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(listener: TcpListener, script: Arc<Mutex<Script>>, stop: CancellationToken) {
    let stopped = stop.clone().cancelled_owned();
    let http = http1::Builder::new();
    let connections = crate::server::Connections::new(MAX_CONNECTIONS);
    connections
        .accept_until(&listener, stopped, |accepted| {
            let (script, stop) = (Arc::clone(&script), stop.clone());
            let service = service_fn(move |request| {
                let (script, stop) = (Arc::clone(&script), stop.clone());
                async move { Ok::<_, Infallible>(answer(request, &script, &stop).await) }
            });
            accepted.serve(&http, service);
        })
        .await;
}

/// Connections the fake serves at once (the worker's postback client keeps a few per host).
const MAX_CONNECTIONS: usize = 1024;

async fn answer(
    request: Request<Incoming>,
    script: &Mutex<Script>,
    stop: &CancellationToken,
) -> Response<Full<Bytes>> {
    let (postback, chosen) = record(request, script).await;
    let answer = if postback.well_formed {
        chosen
    } else {
        Answer::Invalid
    };
    match answer {
        Answer::Verified => reply(StatusCode::OK, "VERIFIED"),
        Answer::Invalid => reply(StatusCode::OK, "INVALID"),
        Answer::ServerError => reply(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error"),
        Answer::Garbage => reply(StatusCode::OK, "<html><body>Fatal Failure</body></html>"),
        Answer::Slow(delay) => {
            tokio::select! {
                () = stop.cancelled() => reply(StatusCode::SERVICE_UNAVAILABLE, ""),
                () = tokio::time::sleep(delay) => reply(StatusCode::OK, "VERIFIED"),
            }
        }
        Answer::Silent => {
            stop.cancelled().await;
            reply(StatusCode::SERVICE_UNAVAILABLE, "")
        }
    }
}

/// Reads and records the postback; returns it and the answer its script chose.
async fn record(request: Request<Incoming>, script: &Mutex<Script>) -> (Postback, Answer) {
    let header = |name| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let form =
        header(CONTENT_TYPE).is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let has_agent = header(USER_AGENT).is_some_and(|v| !v.is_empty());
    let is_post = request.method() == Method::POST;
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes().to_vec(),
        Err(_) => Vec::new(),
    };
    let (ipn, prefixed) = match body.strip_prefix(POSTBACK_PREFIX) {
        Some(ipn) => (ipn.to_vec(), true),
        None => (body, false),
    };
    let postback = Postback {
        ipn,
        well_formed: form && has_agent && is_post && prefixed,
    };
    let mut script = script.lock().unwrap_or_else(PoisonError::into_inner);
    let scripted = script
        .per_ipn
        .get_mut(&postback.ipn)
        .and_then(VecDeque::pop_front);
    let chosen = scripted.or(script.default).unwrap_or(Answer::Invalid);
    script.received.push(postback.clone());
    (postback, chosen)
}

fn reply(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_parse_from_their_command_line_names() {
        assert_eq!("verified".parse(), Ok(Answer::Verified));
        assert_eq!("500".parse(), Ok(Answer::ServerError));
        assert_eq!("slow:2s".parse(), Ok(Answer::Slow(Duration::from_secs(2))));
        assert!("slow:soon".parse::<Answer>().is_err());
        assert!("maybe".parse::<Answer>().is_err());
    }

    #[test]
    fn answers_print_as_they_are_given() {
        for text in ["verified", "invalid", "500", "garbage", "silent", "slow:2s"] {
            let answer: Answer = text.parse().expect("parses");
            assert_eq!(answer.to_string(), text);
        }
    }
}
