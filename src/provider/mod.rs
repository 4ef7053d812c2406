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

/// A payment provider's notification format.
pub trait Provider: Send + Sync + 'static {
    /// Short lower-case name, carried in the `x-ipn-provider` header (`paypal`).
    fn name(&self) -> &'static str;

    /// True when a request with this `Content-Type` value can be one of this provider's
    /// notifications.
    fn accepts_content_type(&self, content_type: &str) -> bool;

    /// The body of the success answer, sent only once the notification is persisted.
    fn acknowledgement(&self) -> &'static [u8];

    /// The key whose messages must stay in order. Any body yields a key.
    fn order_key(&self, body: &[u8]) -> OrderKey;
}
