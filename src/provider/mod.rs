//! The seam between the pipeline and a payment provider.
//!
//! Everything provider-specific sits behind [`Provider`]: which requests it accepts, how it is
//! acknowledged, and the order key of a message. PayPal IPN ([`PayPal`]) is the
//! first provider; the worker issue adds verification and dedup keys here, and Alipay or WeChat
//! Pay become a module implementing this trait, not a fork of the pipeline.

pub mod alipay;
pub mod paypal;

pub use paypal::PayPal;

use crate::keys::OrderKey;

/// A payment provider's notification format, as the ingress sees it.
pub trait Provider: Send + Sync + 'static {
    /// Short lower-case name, carried in the `x-ipn-provider` header (`paypal`).
    fn name(&self) -> &'static str;

    /// True when a request with this `Content-Type` value (none: no header) can be one of this
    /// provider's notifications.
    fn accepts_content_type(&self, content_type: Option<&str>) -> bool;

    /// The body of the success answer, sent only once the notification is persisted.
    fn acknowledgement(&self) -> &'static [u8];

    /// The body of every failure answer, when the provider wants a fixed one (Alipay: `fail`);
    /// `None`: a short reason.
    fn failure(&self) -> Option<&'static [u8]> {
        None
    }

    /// What the ingress checks before anything is queued: a signature it can verify with
    /// public keys. `Err` names the reason (a metric label); the request gets a failure answer
    /// so the provider resends.
    fn admit(&self, _body: &[u8]) -> Result<(), &'static str> {
        Ok(())
    }

    /// The key whose messages must stay in order. Any body yields a key.
    fn order_key(&self, body: &[u8]) -> OrderKey;
}

impl Provider for alipay::Alipay {
    fn name(&self) -> &'static str {
        alipay::NAME
    }

    /// Alipay posts a form; it is read as one whatever the header says.
    fn accepts_content_type(&self, _content_type: Option<&str>) -> bool {
        true
    }

    fn acknowledgement(&self) -> &'static [u8] {
        b"success"
    }

    fn failure(&self) -> Option<&'static [u8]> {
        Some(b"fail")
    }

    fn admit(&self, body: &[u8]) -> Result<(), &'static str> {
        self.verify(body).map_err(alipay::Refusal::as_str)
    }

    fn order_key(&self, body: &[u8]) -> OrderKey {
        alipay::order_key(&crate::form::Form::parse(body), body)
    }
}
