//! Webhook signatures: how an ATP server signs a delivery, and how a
//! receiver checks it (docs/PROTOCOL.md §9).
//!
//! A delivery is a `POST` whose body is a [`WebhookDelivery`] and whose
//! `X-ATP-Signature` header is `sha256=` followed by the lowercase hex
//! HMAC-SHA256 of the body under the webhook's secret (the `secret` the
//! registration answered with). Check the signature on the raw body
//! before parsing it; [`verify`] compares in constant time.
//!
//! It is framework-neutral: give it the header and the body bytes from an
//! axum, actix-web or Rocket handler.
//!
//! ```
//! use atp_registry::webhook::{self, SIGNATURE_HEADER};
//!
//! let secret = "whsec_test";
//! let body = br#"{"event":"connection_success","webhook_id":"w1","delivery_id":"d1","created_at":"2026-12-01T00:00:00Z","data":{}}"#;
//! let header = webhook::sign(secret.as_bytes(), body);
//! assert!(header.starts_with("sha256="));
//!
//! // In the receiver, with the header and the raw body:
//! let delivery = webhook::verify_delivery(secret.as_bytes(), Some(&header), body)?;
//! assert_eq!(delivery.event, "connection_success");
//! assert!(webhook::verify(b"another secret", Some(&header), body).is_err());
//! assert_eq!(SIGNATURE_HEADER, "x-atp-signature");
//! # Ok::<(), atp_registry::webhook::SignatureError>(())
//! ```
//!
//! ## In a web framework
//!
//! Take the body as raw bytes (never as already-parsed JSON: the signature
//! is over the exact bytes) and the header as text, and answer: 2xx to a
//! good delivery (anything else is retried with backoff), 401 to a bad or
//! missing signature, 400 to a body that is not a delivery. A delivery may
//! come more than once: drop a `delivery_id` already seen.
//!
//! ```
//! use atp_registry::webhook::{self, SignatureError};
//!
//! /// The status to answer a delivery with: the same in every framework.
//! fn on_delivery(secret: &[u8], signature: Option<&str>, body: &[u8]) -> u16 {
//!     match webhook::verify_delivery(secret, signature, body) {
//!         Ok(delivery) => {
//!             println!("{} {}", delivery.event, delivery.data);
//!             200
//!         }
//!         Err(SignatureError::Body(_)) => 400,
//!         Err(_) => 401,
//!     }
//! }
//! # let body = br#"{"event":"toolkit_connected","webhook_id":"w","delivery_id":"d","created_at":"2026-01-01T00:00:00Z","data":{}}"#;
//! # assert_eq!(on_delivery(b"s", Some(&webhook::sign(b"s", body)), body), 200);
//! # assert_eq!(on_delivery(b"s", None, body), 401);
//! ```
//!
//! - **axum**: a handler taking `HeaderMap` and `Bytes`:
//!   `async fn receive(State(secret): State<Arc<str>>, headers: HeaderMap, body: Bytes) -> StatusCode`,
//!   the signature being `headers.get(SIGNATURE_HEADER).and_then(|v| v.to_str().ok())`.
//! - **actix-web**: a handler taking `HttpRequest` and `web::Bytes`:
//!   `async fn receive(secret: web::Data<Secret>, req: HttpRequest, body: web::Bytes) -> HttpResponse`,
//!   the signature being `req.headers().get(SIGNATURE_HEADER)`.
//! - **Rocket**: a `FromData` data guard that reads the body with
//!   `data.open(1.mebibytes()).into_bytes()` and the signature with
//!   `req.headers().get_one(SIGNATURE_HEADER)`, and fails with 401 unless
//!   it verifies: the route's handler then only ever sees signed
//!   deliveries.
//!
//! The three, complete and compiled with the workspace, are in atp-rs's
//! `examples/webhook_receivers.rs`:
//! `cargo run --example webhook_receivers -- axum|actix|rocket` serves one
//! (`--check` sends it a signed and a forged delivery and exits).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::wire::WebhookDelivery;

/// The header that carries the signature (lowercase, as HTTP/2 and the
/// `http` crate spell it; header names are case-insensitive).
pub const SIGNATURE_HEADER: &str = "x-atp-signature";

/// Why a delivery was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// No `X-ATP-Signature` header.
    #[error("the delivery has no X-ATP-Signature header")]
    Missing,
    /// The header is not `sha256=` and 64 hex digits.
    #[error("the X-ATP-Signature header is not sha256=HEX")]
    Malformed,
    /// The signature does not match the body under this secret.
    #[error("the signature does not match the body")]
    Mismatch,
    /// The signature matches, but the body is not a delivery.
    #[error("the body is not a webhook delivery: {0}")]
    Body(String),
}

fn mac(secret: &[u8], body: &[u8]) -> Hmac<Sha256> {
    // HMAC takes a key of any length: `new_from_slice` cannot fail for it.
    let mut mac = match <Hmac<Sha256> as KeyInit>::new_from_slice(secret) {
        Ok(m) => m,
        Err(_) => unreachable_key(),
    };
    mac.update(body);
    mac
}

#[cold]
fn unreachable_key() -> ! {
    unreachable!("HMAC accepts keys of every length")
}

/// The `X-ATP-Signature` value of `body` under `secret`: `sha256=HEX`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let tag = mac(secret, body).finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn unhex(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'a'..=b'f' => Some(digit - b'a' + 10),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Checks the `X-ATP-Signature` header of a delivery against its raw body,
/// in constant time.
pub fn verify(secret: &[u8], header: Option<&str>, body: &[u8]) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?.trim();
    let hex = header
        .strip_prefix("sha256=")
        .ok_or(SignatureError::Malformed)?
        .as_bytes();
    if hex.len() != 64 {
        return Err(SignatureError::Malformed);
    }
    let mut tag = [0u8; 32];
    for (i, pair) in hex.chunks_exact(2).enumerate() {
        let (Some(hi), Some(lo)) = (unhex(pair[0]), unhex(pair[1])) else {
            return Err(SignatureError::Malformed);
        };
        tag[i] = hi << 4 | lo;
    }
    mac(secret, body)
        .verify_slice(&tag)
        .map_err(|_| SignatureError::Mismatch)
}

/// [`verify`], then reads the body as a [`WebhookDelivery`].
pub fn verify_delivery(
    secret: &[u8],
    header: Option<&str>,
    body: &[u8],
) -> Result<WebhookDelivery, SignatureError> {
    verify(secret, header, body)?;
    serde_json::from_slice(body).map_err(|e| SignatureError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn tampering_is_refused() {
        let sig = sign(b"s", b"body");
        assert_eq!(verify(b"s", Some(&sig), b"body"), Ok(()));
        assert_eq!(
            verify(
                b"s",
                Some(&sig.to_uppercase().replacen("SHA256", "sha256", 1)),
                b"body"
            ),
            Ok(())
        );
        assert_eq!(
            verify(b"s", Some(&sig), b"bodY"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(b"t", Some(&sig), b"body"),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(verify(b"s", None, b"body"), Err(SignatureError::Missing));
        assert_eq!(
            verify(b"s", Some("sha1=ab"), b"body"),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify(b"s", Some(&sig[..70]), b"body"),
            Err(SignatureError::Malformed)
        );
        let bad = format!("sha256={}", "zz".repeat(32));
        assert_eq!(
            verify(b"s", Some(&bad), b"body"),
            Err(SignatureError::Malformed)
        );
    }
}
