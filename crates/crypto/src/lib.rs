//! # nexplane-crypto
//!
//! The crypto adapter of Nexplane; the only crate that knows key formats.
//!
//! - [`RsaTokenSigner`]: RS256 access tokens with a `kid` (RFC 7638 thumbprint), the JWKS,
//!   key generation and rotation ([`nexplane_ports::TokenSigner`]).
//! - [`Argon2Hasher`]: argon2id password hashes ([`nexplane_ports::PasswordHasher`]).
//! - [`OsRandom`]: the OS CSPRNG ([`nexplane_ports::Random`]).
//! - [`Sealer`] and [`MasterKey`]: AES-256-GCM sealing of stored credentials.
//! - [`agent_signature`] / [`verify_agent_signature`]: the agent request HMAC.
//!
//! Every type holding key material prints `[redacted]` in place of it.
#![deny(missing_docs)]

mod agent;
mod jwt;
mod password;
mod random;
mod seal;
mod util;

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod testutil;

pub use agent::{agent_signature, verify_agent_signature, HmacAgentSigner};
pub use jwt::{RsaTokenSigner, PREVIOUS_KEY_PREFIX, ROTATION_GRACE_SECS, SIGNING_KEY_FILE};
pub use password::{Argon2Hasher, ARGON2_ITERATIONS, ARGON2_MEMORY_KIB, ARGON2_PARALLELISM};
pub use random::OsRandom;
pub use seal::{MasterKey, Sealer, MASTER_KEY_FILE, NEXT_KEY_SUFFIX, PREVIOUS_KEY_SUFFIX};
