//! RS256 access tokens, their keys and the JWKS document (api.md §2.1).
//!
//! Key files in a key directory (the data dir):
//! - [`SIGNING_KEY_FILE`]: the current RSA private key, PKCS#8 PEM, mode 0600. Generated on
//!   first start, reused afterwards.
//! - `jwt-previous-<retire unix seconds>-<kid>.pem`: a rotated-out public key, kept for
//!   verification (and in the JWKS) until the tokens it signed have expired. A
//!   `jwt-previous-<anything>.pem` whose name does not start with a number of seconds is kept
//!   until the file is removed.

use crate::util::{self, err};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair, KeySize, PublicKey, PublicKeyComponents};
use aws_lc_rs::signature::KeyPair as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use nexplane_domain::auth::{ACCESS_TOKEN_TTL_SECS, ACCESS_TOKEN_TYPE, TOKEN_AUDIENCE};
use nexplane_domain::{AccessClaims, Timestamp};
use nexplane_ports::{CryptoError, TokenError, TokenSigner};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use zeroize::Zeroizing;

/// File name of the current signing key inside a key directory.
pub const SIGNING_KEY_FILE: &str = "jwt-signing-key.pem";
/// File-name prefix of rotated-out (verification-only) public keys inside a key directory.
pub const PREVIOUS_KEY_PREFIX: &str = "jwt-previous-";
/// How long after a rotation the old key stays valid beyond the access-token lifetime
/// (clock skew between replicas).
pub const ROTATION_GRACE_SECS: i64 = 60;

/// Size of generated keys.
const GENERATED_KEY_SIZE: KeySize = KeySize::Rsa2048;
/// Smallest RSA modulus accepted, in bits.
const MIN_KEY_BITS: usize = 2048;
/// Largest RSA modulus accepted, in bits (the RS256 verifier's upper bound).
const MAX_KEY_BITS: usize = 8192;
/// Longer tokens are refused before any parsing (ours are well under 1 KiB).
const MAX_TOKEN_LEN: usize = 8 * 1024;

/// A public key that verifies tokens.
#[derive(Clone)]
struct VerifyKey {
    kid: String,
    /// Modulus, big-endian without leading zeros.
    n: Vec<u8>,
    /// Public exponent, big-endian without leading zeros.
    e: Vec<u8>,
    /// Prebuilt once so that verification does no key decoding.
    decoding: DecodingKey,
    /// The JWK published in the JWKS.
    jwk: serde_json::Value,
    /// Verification-only keys stop being accepted (and published) at this time.
    retire_at: Option<Timestamp>,
}

impl VerifyKey {
    fn from_components(n: &[u8], e: &[u8]) -> Result<Self, CryptoError> {
        let bits = modulus_bits(n);
        if !(MIN_KEY_BITS..=MAX_KEY_BITS).contains(&bits) {
            return Err(err(format!(
                "RSA key of {bits} bits refused: RS256 keys must have {MIN_KEY_BITS} to {MAX_KEY_BITS} bits"
            )));
        }
        let n_b64 = URL_SAFE_NO_PAD.encode(n);
        let e_b64 = URL_SAFE_NO_PAD.encode(e);
        let kid = jwk_thumbprint(&n_b64, &e_b64);
        let jwk = serde_json::json!({
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": kid,
            "n": n_b64,
            "e": e_b64,
        });
        Ok(Self {
            kid,
            n: n.to_vec(),
            e: e.to_vec(),
            decoding: DecodingKey::from_rsa_raw_components(n, e),
            jwk,
            retire_at: None,
        })
    }

    fn from_public_key(public: &PublicKey) -> Result<Self, CryptoError> {
        Self::from_components(
            public.modulus().big_endian_without_leading_zero(),
            public.exponent().big_endian_without_leading_zero(),
        )
    }

    fn active_at(&self, now: Timestamp) -> bool {
        self.retire_at.is_none_or(|t| now < t)
    }

    /// SubjectPublicKeyInfo PEM of this key.
    fn public_pem(&self) -> Result<String, CryptoError> {
        let components = PublicKeyComponents {
            n: self.n.as_slice(),
            e: self.e.as_slice(),
        };
        let der = components
            .as_der()
            .map_err(|_| err("cannot encode RSA public key"))?;
        Ok(util::pem_encode("PUBLIC KEY", der.as_ref()).to_string())
    }
}

/// The current private key.
struct SigningKey {
    encoding: EncodingKey,
    public: VerifyKey,
}

impl SigningKey {
    /// From a parsed key pair and its PKCS#1 `RSAPrivateKey` DER (what jsonwebtoken signs with).
    fn new(pair: &KeyPair, pkcs1: &[u8]) -> Result<Self, CryptoError> {
        Ok(Self {
            encoding: EncodingKey::from_rsa_der(pkcs1),
            public: VerifyKey::from_public_key(pair.public_key())?,
        })
    }

    /// Parses an RSA private key PEM (PKCS#8 `PRIVATE KEY` or PKCS#1 `RSA PRIVATE KEY`).
    fn from_pem(pem: &str) -> Result<Self, CryptoError> {
        let block = util::pem_decode(pem)?;
        match block.label.as_str() {
            "PRIVATE KEY" => {
                let pair = KeyPair::from_pkcs8(&block.der)
                    .map_err(|e| err(format!("not an RSA PKCS#8 private key: {e}")))?;
                let pkcs1 = util::pkcs8_private_key(&block.der)
                    .ok_or_else(|| err("malformed PKCS#8 private key"))?;
                Self::new(&pair, pkcs1)
            }
            "RSA PRIVATE KEY" => {
                let pair = KeyPair::from_der(&block.der)
                    .map_err(|e| err(format!("not an RSA PKCS#1 private key: {e}")))?;
                Self::new(&pair, &block.der)
            }
            "ENCRYPTED PRIVATE KEY" => Err(err(
                "encrypted private keys are not supported: give an unencrypted PEM file with mode 0600",
            )),
            other => Err(err(format!(
                "expected an RSA private key PEM (PRIVATE KEY or RSA PRIVATE KEY), found {other}"
            ))),
        }
    }

    /// Generates a fresh key; also returns its PKCS#8 PEM for storage.
    fn generate() -> Result<(Self, Zeroizing<String>), CryptoError> {
        let pair =
            KeyPair::generate(GENERATED_KEY_SIZE).map_err(|_| err("RSA key generation failed"))?;
        let pkcs8 = pair
            .as_der()
            .map_err(|_| err("cannot encode the RSA private key"))?;
        let pkcs1 = util::pkcs8_private_key(pkcs8.as_ref())
            .ok_or_else(|| err("malformed generated PKCS#8 key"))?;
        let key = Self::new(&pair, pkcs1)?;
        Ok((key, util::pem_encode("PRIVATE KEY", pkcs8.as_ref())))
    }
}

/// Parses any RSA key PEM (public or private) into its public half.
fn public_key_from_pem(pem: &str) -> Result<VerifyKey, CryptoError> {
    let block = util::pem_decode(pem)?;
    match block.label.as_str() {
        "PUBLIC KEY" | "RSA PUBLIC KEY" => {
            let public = PublicKey::from_der(&block.der)
                .map_err(|e| err(format!("not an RSA public key: {e}")))?;
            VerifyKey::from_public_key(&public)
        }
        _ => SigningKey::from_pem(pem).map(|k| k.public),
    }
}

/// The keys in use at one moment. Replaced as a whole on rotation.
struct KeyRing {
    current: SigningKey,
    /// Verification-only keys, newest first.
    previous: Vec<VerifyKey>,
}

impl KeyRing {
    fn find(&self, kid: &str, now: Timestamp) -> Option<&VerifyKey> {
        if self.current.public.kid == kid {
            return Some(&self.current.public);
        }
        self.previous
            .iter()
            .find(|k| k.kid == kid && k.active_at(now))
    }

    fn knows(&self, kid: &str) -> bool {
        self.current.public.kid == kid || self.previous.iter().any(|k| k.kid == kid)
    }
}

/// Where the signing key came from, which decides what [`RsaTokenSigner::rotate`] may do.
#[derive(Debug, Clone)]
enum KeySource {
    /// Generated in memory, never stored.
    Ephemeral,
    /// A key directory that this signer manages.
    Dir(PathBuf),
    /// A PEM file the operator configured.
    File(PathBuf),
}

/// Signs and verifies RS256 access tokens and publishes the JWKS.
///
/// Verification is meant to be called on every request: the keys are decoded once, the
/// validation rules are built once, and a call takes a short read lock, one header parse,
/// one RSA signature check and one claims parse. No file or clock access happens in
/// [`TokenSigner::verify`].
///
/// ```
/// use nexplane_crypto::RsaTokenSigner;
/// use nexplane_domain::{AccessClaims, Timestamp};
/// use nexplane_ports::{TokenError, TokenSigner};
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let signer = RsaTokenSigner::generate("https://nexplane.example".into())?;
/// let now = Timestamp::from_secs(1_796_398_882);
/// let claims = AccessClaims {
///     iss: signer.issuer().into(), aud: "nexplane".into(), sub: "user".into(),
///     sid: "session".into(), role: "viewer".into(), iat: now.secs(),
///     exp: now.secs() + 3600, jti: "token".into(), typ: "access".into(),
/// };
/// let token = signer.sign(&claims)?;
/// assert_eq!(signer.verify(&token, now)?, claims);
/// assert_eq!(signer.verify(&token, now.plus_secs(3600)), Err(TokenError::Expired));
/// assert_eq!(signer.jwks_at(now)["keys"][0]["kid"], signer.current_kid().as_str());
/// # Ok(()) }
/// ```
pub struct RsaTokenSigner {
    issuer: String,
    source: KeySource,
    ring: RwLock<Arc<KeyRing>>,
    /// Serializes rotations (file writes and ring replacement).
    rotation: Mutex<()>,
    validation: Validation,
}

impl fmt::Debug for RsaTokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaTokenSigner")
            .field("issuer", &self.issuer)
            .field("keys", &"[redacted]")
            .finish()
    }
}

impl RsaTokenSigner {
    fn with_ring(issuer: String, source: KeySource, ring: KeyRing) -> Self {
        let mut validation = Validation::new(Algorithm::RS256);
        // `exp` is checked against the caller's `now`, not the system clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "aud", "iss"]);
        validation.set_audience(&[TOKEN_AUDIENCE]);
        validation.set_issuer(&[issuer.as_str()]);
        Self {
            issuer,
            source,
            ring: RwLock::new(Arc::new(ring)),
            rotation: Mutex::new(()),
            validation,
        }
    }

    /// A signer with a freshly generated key that is never written anywhere (tests,
    /// throwaway instances). Tokens die with the process.
    pub fn generate(issuer: String) -> Result<Self, CryptoError> {
        let (current, _) = SigningKey::generate()?;
        Ok(Self::with_ring(
            issuer,
            KeySource::Ephemeral,
            KeyRing {
                current,
                previous: Vec::new(),
            },
        ))
    }

    /// A signer whose key is the given PEM text (PKCS#1 or PKCS#8, unencrypted, ≥ 2048 bits).
    pub fn from_pem(pem: &str, issuer: String) -> Result<Self, CryptoError> {
        let current = SigningKey::from_pem(pem)?;
        Ok(Self::with_ring(
            issuer,
            KeySource::Ephemeral,
            KeyRing {
                current,
                previous: Vec::new(),
            },
        ))
    }

    /// A signer whose key is the configured PEM file `path` (`NEXPLANE_JWT_KEY_FILE`), PKCS#1
    /// or PKCS#8. Such a key is rotated by the operator (replace the file; to keep old tokens
    /// valid, put the old key in a key directory as `jwt-previous-<retire secs>-….pem` and
    /// call [`RsaTokenSigner::load_previous_keys`]).
    pub fn from_pem_file(path: &Path, issuer: String) -> Result<Self, CryptoError> {
        let pem = util::read_text(path)?;
        let current =
            SigningKey::from_pem(&pem).map_err(|e| err(format!("{}: {}", path.display(), e.0)))?;
        Ok(Self::with_ring(
            issuer,
            KeySource::File(path.to_owned()),
            KeyRing {
                current,
                previous: Vec::new(),
            },
        ))
    }

    /// A signer backed by the key directory `dir`: loads [`SIGNING_KEY_FILE`], generating it
    /// (RSA 2048, PKCS#8 PEM, mode 0600) on first start, plus the still-valid rotated-out
    /// keys (`jwt-previous-*.pem`). Creates `dir` (mode 0700) if missing.
    pub fn load_or_generate(dir: &Path, issuer: String) -> Result<Self, CryptoError> {
        Self::load_or_generate_at(dir, issuer, util::system_now())
    }

    /// [`RsaTokenSigner::load_or_generate`] with an explicit `now`, which decides which
    /// rotated-out keys are still valid.
    pub fn load_or_generate_at(
        dir: &Path,
        issuer: String,
        now: Timestamp,
    ) -> Result<Self, CryptoError> {
        util::ensure_dir(dir)?;
        let path = dir.join(SIGNING_KEY_FILE);
        if !path.exists() {
            let (_, pem) = SigningKey::generate()?;
            // If another process created the file meanwhile, its key wins and is read below.
            util::create_private_file(&path, pem.as_bytes())?;
        }
        let pem = util::read_text(&path)?;
        let current =
            SigningKey::from_pem(&pem).map_err(|e| err(format!("{}: {}", path.display(), e.0)))?;
        let signer = Self::with_ring(
            issuer,
            KeySource::Dir(dir.to_owned()),
            KeyRing {
                current,
                previous: Vec::new(),
            },
        );
        signer.load_previous_keys(dir, now)?;
        Ok(signer)
    }

    /// Adds the rotated-out keys found in `dir` (`jwt-previous-*.pem`, public or private
    /// PEM) as verification-only keys, skipping those already retired at `now` and those
    /// already known. Returns how many were added.
    pub fn load_previous_keys(&self, dir: &Path, now: Timestamp) -> Result<usize, CryptoError> {
        let entries = std::fs::read_dir(dir)
            .map_err(|e| err(format!("cannot list {}: {e}", dir.display())))?;
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| err(format!("cannot list {}: {e}", dir.display())))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(retire_at) = previous_key_retire_at(&name) else {
                continue;
            };
            if retire_at.is_some_and(|t| now >= t) {
                continue;
            }
            let path = entry.path();
            let pem = util::read_text(&path)?;
            let mut key = public_key_from_pem(&pem)
                .map_err(|e| err(format!("{}: {}", path.display(), e.0)))?;
            key.retire_at = retire_at;
            found.push(key);
        }
        // Newest retirement first; keys without an end last.
        found.sort_by_key(|k| std::cmp::Reverse(k.retire_at.unwrap_or(Timestamp::from_millis(0))));
        self.add_previous(found)
    }

    /// Adds one verification-only key from PEM text (public or private), accepted until
    /// `retire_at` (forever when `None`). Returns its `kid`.
    pub fn add_previous_key_pem(
        &self,
        pem: &str,
        retire_at: Option<Timestamp>,
    ) -> Result<String, CryptoError> {
        let mut key = public_key_from_pem(pem)?;
        key.retire_at = retire_at;
        let kid = key.kid.clone();
        self.add_previous(vec![key])?;
        Ok(kid)
    }

    fn add_previous(&self, keys: Vec<VerifyKey>) -> Result<usize, CryptoError> {
        let _guard = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
        let ring = self.ring();
        let mut previous = ring.previous.clone();
        let mut added = 0;
        for key in keys {
            if ring.knows(&key.kid) || previous.iter().any(|k| k.kid == key.kid) {
                continue;
            }
            previous.push(key);
            added += 1;
        }
        if added > 0 {
            let next = KeyRing {
                current: SigningKey {
                    encoding: ring.current.encoding.clone(),
                    public: ring.current.public.clone(),
                },
                previous,
            };
            self.replace_ring(next);
        }
        Ok(added)
    }

    /// Replaces the signing key with a freshly generated one. The old key stays a
    /// verification key (and in the JWKS) until `now` + the access-token lifetime +
    /// [`ROTATION_GRACE_SECS`], so every token it signed keeps working until it expires.
    /// Rotated-out keys already retired at `now` are dropped.
    ///
    /// For a directory-backed signer the change is persisted: the new private key replaces
    /// [`SIGNING_KEY_FILE`] (the old private key is gone), the old public key is written as
    /// `jwt-previous-<retire secs>-<kid>.pem`, retired `jwt-previous-*` files are removed.
    /// A signer whose key is a configured file refuses: replace the file instead.
    ///
    /// Returns the new `kid`.
    pub fn rotate(&self, now: Timestamp) -> Result<String, CryptoError> {
        if let KeySource::File(path) = &self.source {
            return Err(err(format!(
                "the signing key is the configured file {}: rotate it by replacing the file",
                path.display()
            )));
        }
        let _guard = self.rotation.lock().unwrap_or_else(|p| p.into_inner());
        let (current, pem) = SigningKey::generate()?;
        let old = self.ring();
        let retire_at = now.plus_secs(ACCESS_TOKEN_TTL_SECS + ROTATION_GRACE_SECS);
        let mut retiring = old.current.public.clone();
        retiring.retire_at = Some(retire_at);

        if let KeySource::Dir(dir) = &self.source {
            let previous_path = dir.join(format!(
                "{PREVIOUS_KEY_PREFIX}{}-{}.pem",
                retire_at.secs(),
                retiring.kid
            ));
            util::replace_private_file(&previous_path, retiring.public_pem()?.as_bytes())?;
            util::replace_private_file(&dir.join(SIGNING_KEY_FILE), pem.as_bytes())?;
            prune_retired_files(dir, now);
        }

        let mut previous = vec![retiring];
        previous.extend(old.previous.iter().filter(|k| k.active_at(now)).cloned());
        let kid = current.public.kid.clone();
        self.replace_ring(KeyRing { current, previous });
        Ok(kid)
    }

    /// The `kid` of the current signing key.
    pub fn current_kid(&self) -> String {
        self.ring().current.public.kid.clone()
    }

    /// The JWKS document as of `now`: the current key first, then the rotated-out keys not
    /// yet retired.
    pub fn jwks_at(&self, now: Timestamp) -> serde_json::Value {
        let ring = self.ring();
        let keys: Vec<serde_json::Value> = std::iter::once(&ring.current.public)
            .chain(ring.previous.iter().filter(|k| k.active_at(now)))
            .map(|k| k.jwk.clone())
            .collect();
        serde_json::json!({ "keys": keys })
    }

    fn ring(&self) -> Arc<KeyRing> {
        match self.ring.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn replace_ring(&self, next: KeyRing) {
        let mut guard = self.ring.write().unwrap_or_else(|p| p.into_inner());
        *guard = Arc::new(next);
    }
}

impl TokenSigner for RsaTokenSigner {
    fn sign(&self, claims: &AccessClaims) -> Result<String, CryptoError> {
        let ring = self.ring();
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(ring.current.public.kid.clone());
        jsonwebtoken::encode(&header, claims, &ring.current.encoding)
            .map_err(|e| err(format!("cannot sign token: {e}")))
    }

    fn verify(&self, token: &str, now: Timestamp) -> Result<AccessClaims, TokenError> {
        let invalid = |why: &str| TokenError::Invalid(why.to_owned());
        if token.len() > MAX_TOKEN_LEN {
            return Err(invalid("token too long"));
        }
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| invalid("malformed token or unsupported algorithm"))?;
        if header.alg != Algorithm::RS256 {
            return Err(invalid("algorithm not allowed"));
        }
        let kid = header.kid.ok_or_else(|| invalid("missing kid"))?;
        let ring = self.ring();
        let key = ring.find(&kid, now).ok_or_else(|| invalid("unknown kid"))?;
        let data = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &self.validation)
            .map_err(|e| TokenError::Invalid(describe_jwt_error(&e)))?;
        let claims = data.claims;
        if claims.typ != ACCESS_TOKEN_TYPE {
            return Err(invalid("wrong typ"));
        }
        if claims.aud != TOKEN_AUDIENCE {
            return Err(invalid("wrong audience"));
        }
        if claims.iss != self.issuer {
            return Err(invalid("wrong issuer"));
        }
        if now.millis() >= claims.exp.saturating_mul(1000) {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    fn jwks(&self) -> serde_json::Value {
        self.jwks_at(util::system_now())
    }

    fn issuer(&self) -> &str {
        &self.issuer
    }
}

/// A short reason for a jsonwebtoken failure (no token contents).
fn describe_jwt_error(e: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match e.kind() {
        ErrorKind::InvalidSignature => "bad signature".to_owned(),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed".to_owned(),
        ErrorKind::InvalidAudience => "wrong audience".to_owned(),
        ErrorKind::InvalidIssuer => "wrong issuer".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing claim {c}"),
        ErrorKind::InvalidClaimFormat(c) => format!("malformed claim {c}"),
        ErrorKind::Json(_) => "malformed claims".to_owned(),
        ErrorKind::Base64(_) | ErrorKind::Utf8(_) | ErrorKind::InvalidToken => {
            "malformed token".to_owned()
        }
        _ => "invalid token".to_owned(),
    }
}

/// RFC 7638 JWK thumbprint (base64url SHA-256) of an RSA public key given as base64url
/// `n` and `e`.
fn jwk_thumbprint(n_b64: &str, e_b64: &str) -> String {
    // Required members only, in lexicographic order, no whitespace.
    let canonical = format!(r#"{{"e":"{e_b64}","kty":"RSA","n":"{n_b64}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Bit length of a big-endian modulus without leading zero bytes.
fn modulus_bits(n: &[u8]) -> usize {
    match n.first() {
        None => 0,
        Some(&top) => (n.len() - 1) * 8 + (8 - top.leading_zeros() as usize),
    }
}

/// For a `jwt-previous-*.pem` file name: `Some(retire time)` (None inside when the name
/// carries none); `None` for any other file.
fn previous_key_retire_at(name: &str) -> Option<Option<Timestamp>> {
    let middle = name
        .strip_prefix(PREVIOUS_KEY_PREFIX)?
        .strip_suffix(".pem")?;
    let secs = middle.split('-').next().unwrap_or_default();
    Some(secs.parse::<i64>().ok().map(Timestamp::from_secs))
}

/// Removes `jwt-previous-*` files retired at `now` (best effort).
fn prune_retired_files(dir: &Path, now: Timestamp) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(Some(retire_at)) = previous_key_retire_at(&name) {
            if now >= retire_at {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests;
