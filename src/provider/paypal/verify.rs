//! The PayPal postback: asks PayPal whether an IPN is genuine.
//!
//! Keeps the second promise's first half: the postback is `cmd=_notify-validate&` followed by
//! the exact bytes received, never a re-encoding, so PayPal judges what we were sent. Outcomes are
//! not errors: `Ok(Verified | Invalid)` is PayPal's answer; `Err` means we could not find out
//! (timeout, connection refused, 5xx, 403, an HTML "Fatal Failure" page) and is transient.
//! <https://developer.paypal.com/api/nvp-soap/ipn/IPNImplementation/>

use std::time::Duration;

use bytes::Bytes;
use reqwest::header::CONTENT_TYPE;

use crate::config;

/// What every postback starts with.
pub const POSTBACK_PREFIX: &[u8] = b"cmd=_notify-validate&";

/// Sent on every postback (reqwest sends no User-Agent by default, and PayPal rejects some
/// requests without one).
pub const USER_AGENT: &str = concat!("ipn-bridge/", env!("CARGO_PKG_VERSION"));

/// PayPal's answers are a single word; anything much longer is an error page.
const MAX_ANSWER_BYTES: usize = 4096;

/// PayPal's verdict on an IPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// PayPal sent this IPN.
    Verified,
    /// PayPal did not send this IPN (or it was altered): a possible forgery.
    Invalid,
}

/// PayPal could not be asked or gave no verdict; try again later.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// PayPal did not answer the postback within `paypal.verify_timeout`.
    #[error("PayPal did not answer the postback within {0:?} (timeout)")]
    Timeout(Duration),
    /// No HTTP answer: refused or broken connection, TLS failure.
    #[error("postback to PayPal failed")]
    Http(#[source] reqwest::Error),
    /// An HTTP answer other than 200.
    #[error("PayPal answered HTTP {0}")]
    Status(u16),
    /// HTTP 200 without `VERIFIED` or `INVALID`.
    #[error("PayPal answered neither VERIFIED nor INVALID")]
    Garbage,
}

/// A postback client for one PayPal endpoint.
#[derive(Debug, Clone)]
pub struct Verifier {
    client: reqwest::Client,
    url: url::Url,
    timeout: Duration,
}

impl Verifier {
    /// A client for the configured environment (or override): HTTP/1.1, certificates verified,
    /// an explicit User-Agent, and `verify_timeout` on each postback.
    pub fn new(config: &config::Paypal) -> Result<Verifier, Error> {
        let client = reqwest::Client::builder()
            .http1_only()
            .user_agent(USER_AGENT)
            .timeout(config.verify_timeout)
            .connect_timeout(config.verify_timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(Error::Http)?;
        Ok(Verifier {
            client,
            url: config.postback_url(),
            timeout: config.verify_timeout,
        })
    }

    /// Asks PayPal about `body`, the IPN exactly as received.
    pub async fn verify(&self, body: &[u8]) -> Result<Verdict, Error> {
        let mut postback = Vec::with_capacity(POSTBACK_PREFIX.len() + body.len());
        postback.extend_from_slice(POSTBACK_PREFIX);
        postback.extend_from_slice(body);
        let response = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(postback)
            .send()
            .await
            .map_err(|e| self.failed(e))?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(Error::Status(response.status().as_u16()));
        }
        let answer = read_answer(response).await.map_err(|e| match e {
            Error::Http(e) => self.failed(e),
            other => other,
        })?;
        verdict(&answer)
    }

    /// A transport error, with a timeout named as one.
    fn failed(&self, error: reqwest::Error) -> Error {
        if error.is_timeout() {
            Error::Timeout(self.timeout)
        } else {
            Error::Http(error)
        }
    }
}

/// Reads at most [`MAX_ANSWER_BYTES`] of the answer.
async fn read_answer(mut response: reqwest::Response) -> Result<Bytes, Error> {
    let mut answer = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Error::Http)? {
        answer.extend_from_slice(&chunk);
        if answer.len() > MAX_ANSWER_BYTES {
            return Err(Error::Garbage);
        }
    }
    Ok(Bytes::from(answer))
}

/// `VERIFIED` or `INVALID`, surrounding whitespace allowed; anything else is no verdict.
fn verdict(answer: &[u8]) -> Result<Verdict, Error> {
    match answer.trim_ascii() {
        b"VERIFIED" => Ok(Verdict::Verified),
        b"INVALID" => Ok(Verdict::Invalid),
        _ => Err(Error::Garbage),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_two_words_are_verdicts() {
        assert_eq!(verdict(b"VERIFIED").ok(), Some(Verdict::Verified));
        assert_eq!(verdict(b"INVALID\r\n").ok(), Some(Verdict::Invalid));
        for garbage in [
            &b"verified"[..],
            b"",
            b"VERIFIED INVALID",
            b"<html>Fatal Failure</html>",
        ] {
            assert!(matches!(verdict(garbage), Err(Error::Garbage)));
        }
    }
}
