//! Secret-bearing values whose `Debug` and `Display` never show the value.

use std::fmt;

/// A secret string (password, token, credential value). `Debug` prints `[redacted]`;
/// the value is reachable only through [`SecretString::expose`].
///
/// ```
/// use nexplane_domain::SecretString;
/// let s = SecretString::new("hunter2hunter2".into());
/// assert_eq!(format!("{s:?}"), "[redacted]");
/// assert_eq!(s.expose(), "hunter2hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret value.
    pub fn new(value: String) -> Self {
        Self(value)
    }
    /// The secret value. Call only where the value must really be used.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Length in characters (not bytes).
    pub fn char_len(&self) -> usize {
        self.0.chars().count()
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
impl From<String> for SecretString {
    fn from(v: String) -> Self {
        Self(v)
    }
}
impl<'de> serde::Deserialize<'de> for SecretString {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Self)
    }
}

/// A stored password hash (PHC string). Not secret in the way a password is, but never
/// shown: `Debug` is redacted too.
#[derive(Clone, PartialEq, Eq)]
pub struct PasswordHash(String);

impl PasswordHash {
    /// Wraps a PHC hash string.
    pub fn new(phc: String) -> Self {
        Self(phc)
    }
    /// The PHC string, for storage and verification.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}
impl fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}
