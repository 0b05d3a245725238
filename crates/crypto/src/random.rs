//! Randomness from the operating system.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use nexplane_domain::SecretString;
use nexplane_ports::Random;
use rand::RngCore;
use zeroize::Zeroizing;

/// Fewest random bytes in a token, whatever `bits` asks for.
const MIN_TOKEN_BYTES: usize = 16;

/// The operating system's CSPRNG (`getrandom`).
///
/// The [`Random`] trait cannot report failure; like `rand`'s `OsRng`, this panics if the
/// operating system cannot supply random bytes, which is unrecoverable (and on Linux only
/// happens when the `getrandom` syscall itself is missing).
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandom;

impl OsRandom {
    /// The OS random source.
    pub fn new() -> Self {
        Self
    }
}

impl Random for OsRandom {
    fn u128(&self) -> u128 {
        let mut bytes = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        u128::from_be_bytes(bytes)
    }

    /// base64url (no padding) of `ceil(bits / 8)` random bytes, and never fewer than 16.
    fn token(&self, bits: usize) -> SecretString {
        let len = bits.div_ceil(8).max(MIN_TOKEN_BYTES);
        let mut bytes = Zeroizing::new(vec![0u8; len]);
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        SecretString::new(URL_SAFE_NO_PAD.encode(bytes.as_slice()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_the_requested_entropy_and_are_url_safe() {
        let r = OsRandom::new();
        for (bits, chars) in [(0, 22), (128, 22), (129, 23), (256, 43), (512, 86)] {
            let t = r.token(bits);
            assert_eq!(t.expose().len(), chars, "bits={bits}");
            assert!(t
                .expose()
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            let decoded = URL_SAFE_NO_PAD.decode(t.expose()).unwrap();
            assert!(decoded.len() * 8 >= bits);
        }
        assert_ne!(r.token(128), r.token(128));
        assert_eq!(format!("{:?}", r.token(128)), "[redacted]");
    }

    #[test]
    fn u128_values_differ() {
        let r = OsRandom::new();
        let values: std::collections::HashSet<u128> = (0..64).map(|_| r.u128()).collect();
        assert_eq!(values.len(), 64);
    }
}
