//! Secret strings: auth tokens, API keys and endpoint keys.

use std::fmt;

use subtle::ConstantTimeEq;

/// A secret string (an auth token, an API key, an endpoint key).
///
/// Its `Debug` output is `Secret("***")` and it has no `Display`, so it can
/// not end up in a log line or an error message by accident. Read it with
/// [`Secret::expose`]. Equality is compared in constant time.
///
/// ```
/// use atp_registry::Secret;
///
/// let token = Secret::new("hunter2");
/// assert_eq!(format!("{token:?}"), r#"Secret("***")"#);
/// assert_eq!(token.expose(), "hunter2");
/// ```
#[derive(Clone, Default)]
pub struct Secret(Box<str>);

/// The auth token of a tool call (an OAuth access token, an API key...).
pub type AuthToken = Secret;

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into().into_boxed_str())
    }

    /// The secret value. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Compares with `other` in constant time (for equal lengths).
    pub fn matches(&self, other: &[u8]) -> bool {
        self.0.as_bytes().ct_eq(other).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(\"***\")")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.matches(other.0.as_bytes())
    }
}

impl Eq for Secret {}

/// A secret is written to the wire as its plain value (an ATP message
/// carries the auth token); only serialize it into a message.
impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self::new(value)
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Self::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("top-secret-value");
        let dbg = format!("{s:?} {:?}", Some(&s));
        assert!(!dbg.contains("top-secret-value"), "{dbg}");
    }

    #[test]
    fn compares_by_value() {
        assert!(Secret::new("abc").matches(b"abc"));
        assert!(!Secret::new("abc").matches(b"abd"));
        assert!(!Secret::new("abc").matches(b"abcd"));
        assert!(!Secret::new("abc").matches(b""));
        assert_eq!(Secret::new("x"), Secret::from("x"));
        assert_ne!(Secret::new("x"), Secret::from("y"));
    }
}
