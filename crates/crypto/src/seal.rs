//! Credential sealing: AES-256-GCM under a master key, with key ids for rotation (api.md §4).
//!
//! A sealed value is self-describing text: `v1.<key id>.<nonce>.<ciphertext>`, nonce and
//! ciphertext (with its 16-byte tag) in base64url without padding. The associated data
//! authenticated with it is `v1.<key id>.<caller's aad>`, so a value only opens under the
//! key id it names and for the record (e.g. the connector id) it was sealed for.

use crate::util::{self, err};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use nexplane_domain::SecretString;
use nexplane_ports::CryptoError;
use rand::RngCore;
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::Path;
use zeroize::{Zeroize, Zeroizing};

/// File name of the generated master key inside the data dir.
pub const MASTER_KEY_FILE: &str = "master.key";
/// Suffix of a retired master key kept next to the key file after a rotation:
/// `<key file>.previous-<key id>`. It still opens values until the operator deletes it.
pub const PREVIOUS_KEY_SUFFIX: &str = ".previous-";
/// Suffix of the key a rotation is moving to, until the rotation completes: `<key file>.next`.
pub const NEXT_KEY_SUFFIX: &str = ".next";
/// Format version prefix of sealed values.
const VERSION: &str = "v1";
/// AES-GCM nonce length (96 bits).
const NONCE_LEN: usize = 12;
/// Longest accepted key id.
const MAX_KEY_ID_LEN: usize = 64;

/// A 256-bit master key. `Debug` prints `[redacted]`; the bytes are wiped on drop.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Drop for MasterKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl MasterKey {
    /// A fresh random key from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut key = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .map_err(|_| err("the OS random number generator failed"))?;
        Ok(Self(key))
    }

    /// Wraps raw key bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Parses base64 (standard alphabet, padding optional, surrounding whitespace ignored)
    /// of exactly 32 bytes, as in `NEXPLANE_MASTER_KEY`.
    pub fn from_base64(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let decoded = Zeroizing::new(
            STANDARD
                .decode(text)
                .or_else(|_| STANDARD_NO_PAD.decode(text))
                .map_err(|_| err("master key is not valid base64"))?,
        );
        let bytes: [u8; 32] = decoded
            .as_slice()
            .try_into()
            .map_err(|_| err("master key must be 32 bytes (base64 of 32 random bytes)"))?;
        Ok(Self(bytes))
    }

    /// Reads a key file holding the base64 key (`NEXPLANE_MASTER_KEY_FILE`).
    pub fn from_file(path: &Path) -> Result<Self, CryptoError> {
        let text = util::read_text(path)?;
        Self::from_base64(&text).map_err(|e| err(format!("{}: {}", path.display(), e.0)))
    }

    /// Loads `dir/master.key`, generating it (base64, mode 0600) on first start. Creates
    /// `dir` (mode 0700) if missing. Two processes starting together agree on one key.
    pub fn load_or_generate(dir: &Path) -> Result<Self, CryptoError> {
        util::ensure_dir(dir)?;
        let path = dir.join(MASTER_KEY_FILE);
        if !path.exists() {
            let key = Self::generate()?;
            let mut contents = Zeroizing::new(STANDARD.encode(key.0));
            contents.push('\n');
            // If another process created the file meanwhile, its key wins and is read below.
            util::create_private_file(&path, contents.as_bytes())?;
        }
        Self::from_file(&path)
    }

    /// Writes the key to `path` as base64 with mode 0600, atomically replacing any file there.
    pub fn write_file(&self, path: &Path) -> Result<(), CryptoError> {
        let mut contents = Zeroizing::new(STANDARD.encode(self.0));
        contents.push('\n');
        util::replace_private_file(path, contents.as_bytes())
    }

    /// The keys kept next to `key_file` by a master-key rotation, which still open sealed
    /// values: every `<key file>.previous-*` and a `<key file>.next` left by an interrupted
    /// rotation. Missing files are simply not there; an unreadable one is an error.
    pub fn load_retained(key_file: &Path) -> Result<Vec<MasterKey>, CryptoError> {
        let Some(name) = key_file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
        else {
            return Ok(Vec::new());
        };
        let dir = match key_file.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => std::path::PathBuf::from("."),
        };
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err(format!("cannot list {}: {e}", dir.display()))),
        };
        let previous = format!("{name}{PREVIOUS_KEY_SUFFIX}");
        let next = format!("{name}{NEXT_KEY_SUFFIX}");
        let mut paths: Vec<std::path::PathBuf> = entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .map(|n| n.to_string_lossy())
                    .is_some_and(|n| n.starts_with(&previous) || *n == next)
            })
            .collect();
        paths.sort();
        paths.iter().map(|p| Self::from_file(p)).collect()
    }

    /// First half of a rotation from `self` to `new` for the key kept in `key_file`: keeps
    /// this key as `<key file>.previous-<id>` and writes `new` as `<key file>.next` (both
    /// 0600). Returns the path of the kept old key. Until [`MasterKey::finish_rotation`],
    /// both files are picked up by [`MasterKey::load_retained`], so values sealed under
    /// either key open whatever happens in between.
    pub fn begin_rotation(
        &self,
        key_file: &Path,
        new: &MasterKey,
    ) -> Result<std::path::PathBuf, CryptoError> {
        let kept = sibling(key_file, &format!("{PREVIOUS_KEY_SUFFIX}{}", self.id()));
        let mut contents = Zeroizing::new(STANDARD.encode(self.0));
        contents.push('\n');
        util::create_private_file(&kept, contents.as_bytes())?;
        if Self::from_file(&kept)?.id() != self.id() {
            return Err(err(format!(
                "{} exists and holds another key",
                kept.display()
            )));
        }
        new.write_file(&sibling(key_file, NEXT_KEY_SUFFIX))?;
        Ok(kept)
    }

    /// Second half of a rotation: moves `<key file>.next` over the key file.
    pub fn finish_rotation(key_file: &Path) -> Result<(), CryptoError> {
        let next = sibling(key_file, NEXT_KEY_SUFFIX);
        std::fs::rename(&next, key_file).map_err(|e| {
            err(format!(
                "cannot move {} to {}: {e}",
                next.display(),
                key_file.display()
            ))
        })
    }

    /// The key as standard base64 (for `nexplane` tooling that prints a new key).
    pub fn to_base64(&self) -> SecretString {
        SecretString::new(STANDARD.encode(self.0))
    }

    /// A short public identifier of this key: the first 8 hex digits of
    /// SHA-256(`"nexplane master key id\0"` ‖ key). Stable for a given key, so sealed values
    /// name the key that opens them without anyone assigning ids.
    pub fn id(&self) -> String {
        let mut h = Sha256::new();
        h.update(b"nexplane master key id\0");
        h.update(self.0);
        hex::encode(&h.finalize()[..4])
    }

    /// The raw key bytes. Use only to build a [`Sealer`].
    pub fn expose_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// `path` with `suffix` appended to its file name.
fn sibling(path: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(suffix);
    path.with_file_name(name)
}

/// Seals and opens secret values with AES-256-GCM. Holds every known key by id; seals with
/// the current one, opens with whichever the sealed value names.
///
/// ```
/// use nexplane_crypto::{MasterKey, Sealer};
/// use nexplane_domain::SecretString;
/// # fn main() -> Result<(), nexplane_ports::CryptoError> {
/// let old = MasterKey::generate()?;
/// let sealed = Sealer::from_master_keys(&old, &[])?
///     .seal(&SecretString::new("wJalrXUtnFEMI".into()), "connector-01J")?;
/// assert!(sealed.starts_with(&format!("v1.{}.", old.id())));
///
/// // After a master-key rotation the old key still opens what it sealed.
/// let new = MasterKey::generate()?;
/// let sealer = Sealer::from_master_keys(&new, std::slice::from_ref(&old))?;
/// assert_eq!(sealer.open(&sealed, "connector-01J")?.expose(), "wJalrXUtnFEMI");
/// assert!(sealer.open(&sealed, "connector-other").is_err());
/// # Ok(()) }
/// ```
pub struct Sealer {
    keys: Vec<(String, Aes256Gcm)>,
    current: usize,
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sealer")
            .field("current_key_id", &self.current_key_id())
            .field("keys", &"[redacted]")
            .finish()
    }
}

impl Sealer {
    /// A sealer knowing `keys` (id, 32-byte key) that seals with the key whose id is
    /// `current`. Ids are 1–64 characters of `[A-Za-z0-9_-]` and unique; `current` must be
    /// one of them. The key arrays are wiped once the ciphers are built.
    pub fn new(mut keys: Vec<(String, [u8; 32])>, current: &str) -> Result<Self, CryptoError> {
        let built = Self::build(&keys, current);
        for (_, key) in &mut keys {
            key.zeroize();
        }
        built
    }

    fn build(keys: &[(String, [u8; 32])], current: &str) -> Result<Self, CryptoError> {
        let mut ciphers: Vec<(String, Aes256Gcm)> = Vec::with_capacity(keys.len());
        for (id, key) in keys {
            if !valid_key_id(id) {
                return Err(err(format!(
                    "invalid sealing key id {id:?}: use 1-{MAX_KEY_ID_LEN} characters of A-Z a-z 0-9 _ -"
                )));
            }
            if ciphers.iter().any(|(known, _)| known == id) {
                return Err(err(format!("duplicate sealing key id {id}")));
            }
            ciphers.push((id.clone(), Aes256Gcm::new(key.into())));
        }
        let current = ciphers
            .iter()
            .position(|(id, _)| id == current)
            .ok_or_else(|| {
                err(format!(
                    "current sealing key id {current} is not among the keys"
                ))
            })?;
        Ok(Self {
            keys: ciphers,
            current,
        })
    }

    /// A sealer that seals with `current` and still opens values sealed with any of
    /// `previous`; ids are [`MasterKey::id`].
    pub fn from_master_keys(
        current: &MasterKey,
        previous: &[MasterKey],
    ) -> Result<Self, CryptoError> {
        let keys = std::iter::once(current)
            .chain(previous)
            .map(|k| (k.id(), *k.expose_bytes()))
            .collect();
        Self::new(keys, &current.id())
    }

    /// Id of the key new values are sealed with.
    pub fn current_key_id(&self) -> &str {
        self.keys
            .get(self.current)
            .map(|(id, _)| id.as_str())
            .unwrap_or_default()
    }

    /// The key id a sealed value names, without opening it (to find values to re-seal after
    /// a master-key rotation). `None` if the text is not a sealed value.
    pub fn key_id_of(sealed: &str) -> Option<&str> {
        let mut parts = sealed.split('.');
        match (parts.next(), parts.next()) {
            (Some(VERSION), Some(id)) if valid_key_id(id) => Some(id),
            _ => None,
        }
    }

    /// Encrypts `plaintext` with the current key and a fresh random 96-bit nonce, binding
    /// `aad` (e.g. the connector id). Returns `v1.<key id>.<nonce>.<ciphertext>`.
    pub fn seal(&self, plaintext: &SecretString, aad: &str) -> Result<String, CryptoError> {
        let (id, cipher) = self
            .keys
            .get(self.current)
            .ok_or_else(|| err("no current sealing key"))?;
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|_| err("the OS random number generator failed"))?;
        let bound = associated_data(id, aad);
        let ciphertext = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext.expose().as_bytes(),
                    aad: bound.as_bytes(),
                },
            )
            .map_err(|_| err("sealing failed"))?;
        Ok(format!(
            "{VERSION}.{id}.{}.{}",
            URL_SAFE_NO_PAD.encode(nonce),
            URL_SAFE_NO_PAD.encode(ciphertext)
        ))
    }

    /// Decrypts a value made by [`Sealer::seal`] with the same `aad`. Fails on a malformed
    /// value, an unknown key id, a wrong `aad` or any tampering.
    pub fn open(&self, sealed: &str, aad: &str) -> Result<SecretString, CryptoError> {
        let malformed = || err("malformed sealed value");
        let mut parts = sealed.split('.');
        let (Some(version), Some(id), Some(nonce), Some(ciphertext), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(malformed());
        };
        if version != VERSION {
            return Err(err(format!("unsupported sealed value version {version:?}")));
        }
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(known, _)| known == id)
            .ok_or_else(|| err(format!("unknown sealing key id {id:?}")))?;
        let nonce = URL_SAFE_NO_PAD.decode(nonce).map_err(|_| malformed())?;
        if nonce.len() != NONCE_LEN {
            return Err(malformed());
        }
        let ciphertext = URL_SAFE_NO_PAD
            .decode(ciphertext)
            .map_err(|_| malformed())?;
        let bound = associated_data(id, aad);
        let plaintext = cipher
            .decrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: &ciphertext,
                    aad: bound.as_bytes(),
                },
            )
            .map_err(|_| err("sealed value does not open: wrong key, wrong context or tampered"))?;
        String::from_utf8(plaintext)
            .map(SecretString::new)
            .map_err(|e| {
                let mut bytes = e.into_bytes();
                bytes.zeroize();
                err("sealed value is not UTF-8")
            })
    }
}

impl nexplane_ports::CredentialSealer for Sealer {
    fn seal(
        &self,
        value: &SecretString,
        aad: &str,
    ) -> Result<nexplane_domain::SealedValue, CryptoError> {
        Sealer::seal(self, value, aad).map(nexplane_domain::SealedValue::new)
    }

    fn open(
        &self,
        sealed: &nexplane_domain::SealedValue,
        aad: &str,
    ) -> Result<SecretString, CryptoError> {
        Sealer::open(self, sealed.as_str(), aad)
    }
}

/// The associated data actually authenticated: version, key id and the caller's context.
fn associated_data(key_id: &str, aad: &str) -> String {
    format!("{VERSION}.{key_id}.{aad}")
}

fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_KEY_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::testutil::TempDir;

    fn secret(s: &str) -> SecretString {
        SecretString::new(s.to_owned())
    }

    fn sealer() -> Sealer {
        Sealer::new(vec![("k1".to_owned(), [7u8; 32])], "k1").unwrap()
    }

    #[test]
    fn round_trip_and_format() {
        let s = sealer();
        let sealed = s
            .seal(&secret("AKIA-secret/value+=="), "connector-1")
            .unwrap();
        let parts: Vec<&str> = sealed.split('.').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(parts[0], "v1");
        assert_eq!(parts[1], "k1");
        assert_eq!(URL_SAFE_NO_PAD.decode(parts[2]).unwrap().len(), 12);
        assert_eq!(
            URL_SAFE_NO_PAD.decode(parts[3]).unwrap().len(),
            "AKIA-secret/value+==".len() + 16
        );
        assert!(!sealed.contains("AKIA"));
        assert_eq!(
            s.open(&sealed, "connector-1").unwrap().expose(),
            "AKIA-secret/value+=="
        );
        assert_eq!(Sealer::key_id_of(&sealed), Some("k1"));
        // Empty and non-ASCII values too.
        for v in ["", "pässwörd ✓"] {
            assert_eq!(
                s.open(&s.seal(&secret(v), "").unwrap(), "")
                    .unwrap()
                    .expose(),
                v
            );
        }
    }

    #[test]
    fn nonce_is_fresh_per_value() {
        let s = sealer();
        let a = s.seal(&secret("same"), "c").unwrap();
        let b = s.seal(&secret("same"), "c").unwrap();
        assert_ne!(a, b);
        assert_ne!(a.split('.').nth(2), b.split('.').nth(2));
    }

    #[test]
    fn wrong_aad_is_refused() {
        let s = sealer();
        let sealed = s.seal(&secret("value"), "connector-1").unwrap();
        assert!(s.open(&sealed, "connector-2").is_err());
        assert!(s.open(&sealed, "").is_err());
    }

    #[test]
    fn tampering_is_refused() {
        let s = sealer();
        let sealed = s.seal(&secret("value"), "c").unwrap();
        let parts: Vec<&str> = sealed.split('.').collect();
        let flip = |b64: &str, i: usize| {
            let mut bytes = URL_SAFE_NO_PAD.decode(b64).unwrap();
            bytes[i] ^= 0x01;
            URL_SAFE_NO_PAD.encode(bytes)
        };
        let ct = format!("v1.k1.{}.{}", parts[2], flip(parts[3], 0));
        assert!(s.open(&ct, "c").is_err());
        let tag = format!("v1.k1.{}.{}", parts[2], flip(parts[3], 20));
        assert!(s.open(&tag, "c").is_err());
        let nonce = format!("v1.k1.{}.{}", flip(parts[2], 3), parts[3]);
        assert!(s.open(&nonce, "c").is_err());
        let truncated = format!("v1.k1.{}.{}", parts[2], &parts[3][..parts[3].len() - 4]);
        assert!(s.open(&truncated, "c").is_err());
        for garbage in [
            "",
            "v1",
            "v1.k1",
            "v1.k1.AAAA",
            "v2.k1.AAAAAAAAAAAAAAAA.AAAA",
            "v1.k1.!!!.AAAA",
            "v1.k1.AAAA.AAAA",
            &format!("{sealed}.extra"),
        ] {
            assert!(s.open(garbage, "c").is_err(), "{garbage}");
        }
    }

    #[test]
    fn unknown_key_id_is_refused_and_ids_are_bound() {
        let a = Sealer::new(vec![("a".to_owned(), [1u8; 32])], "a").unwrap();
        let b = Sealer::new(vec![("b".to_owned(), [1u8; 32])], "b").unwrap();
        let sealed = a.seal(&secret("value"), "c").unwrap();
        assert!(b.open(&sealed, "c").unwrap_err().0.contains("unknown"));
        // Same key bytes under another id: the id is authenticated, so relabelling fails.
        let relabelled = sealed.replacen("v1.a.", "v1.b.", 1);
        assert!(b.open(&relabelled, "c").is_err());
    }

    #[test]
    fn rotation_opens_old_values_and_seals_with_the_new_key() {
        let old = MasterKey::from_bytes([1u8; 32]);
        let new = MasterKey::from_bytes([2u8; 32]);
        let before = Sealer::from_master_keys(&old, &[]).unwrap();
        let sealed_old = before.seal(&secret("v"), "c").unwrap();
        let after = Sealer::from_master_keys(&new, std::slice::from_ref(&old)).unwrap();
        assert_eq!(after.current_key_id(), new.id());
        assert_eq!(after.open(&sealed_old, "c").unwrap().expose(), "v");
        let sealed_new = after.seal(&secret("v"), "c").unwrap();
        assert_eq!(Sealer::key_id_of(&sealed_new), Some(new.id().as_str()));
        assert_eq!(Sealer::key_id_of(&sealed_old), Some(old.id().as_str()));
        assert!(before.open(&sealed_new, "c").is_err());
        assert_eq!(Sealer::key_id_of("plain text"), None);
    }

    #[test]
    fn constructor_checks_ids() {
        let k = [0u8; 32];
        assert!(Sealer::new(vec![("a".to_owned(), k)], "b").is_err());
        assert!(Sealer::new(vec![("a".to_owned(), k), ("a".to_owned(), k)], "a").is_err());
        assert!(Sealer::new(vec![("a.b".to_owned(), k)], "a.b").is_err());
        assert!(Sealer::new(vec![(String::new(), k)], "").is_err());
        assert!(Sealer::new(vec![("x".repeat(65), k)], &"x".repeat(65)).is_err());
        assert!(Sealer::new(vec![], "a").is_err());
        assert!(Sealer::new(vec![("a".to_owned(), k), ("b-2_C".to_owned(), k)], "b-2_C").is_ok());
    }

    #[test]
    fn master_key_ids_are_stable_and_distinct() {
        let a = MasterKey::from_bytes([1u8; 32]);
        assert_eq!(a.id(), MasterKey::from_bytes([1u8; 32]).id());
        assert_ne!(a.id(), MasterKey::from_bytes([2u8; 32]).id());
        assert_eq!(a.id().len(), 8);
        assert!(valid_key_id(&a.id()));
    }

    #[test]
    fn master_key_from_base64() {
        let text = STANDARD.encode([9u8; 32]);
        let k = MasterKey::from_base64(&format!("  {text}\n")).unwrap();
        assert_eq!(k.expose_bytes(), &[9u8; 32]);
        assert_eq!(k.to_base64().expose(), text);
        let k = MasterKey::from_base64(text.trim_end_matches('=')).unwrap();
        assert_eq!(k.expose_bytes(), &[9u8; 32]);
        assert!(MasterKey::from_base64(&STANDARD.encode([9u8; 31])).is_err());
        assert!(MasterKey::from_base64(&STANDARD.encode([9u8; 33])).is_err());
        assert!(MasterKey::from_base64("not base64!").is_err());
        assert!(MasterKey::from_base64("").is_err());
    }

    #[test]
    fn debug_is_redacted() {
        let k = MasterKey::from_bytes([0x41; 32]);
        assert_eq!(format!("{k:?}"), "[redacted]");
        let s = Sealer::from_master_keys(&k, &[]).unwrap();
        let text = format!("{s:?}");
        assert!(text.contains("[redacted]"));
        assert!(!text.contains("65, 65"), "{text}");
    }

    #[cfg(unix)]
    #[test]
    fn rotation_files_keep_the_old_key_until_removed() {
        let dir = TempDir::new("rotate");
        let data = dir.path().join("data");
        let old = MasterKey::load_or_generate(&data).unwrap();
        let file = data.join(MASTER_KEY_FILE);
        assert!(MasterKey::load_retained(&file).unwrap().is_empty());
        let new = MasterKey::generate().unwrap();
        let kept = old.begin_rotation(&file, &new).unwrap();
        assert_eq!(crate::testutil::mode(&kept), 0o600);
        let mut ids: Vec<String> = MasterKey::load_retained(&file)
            .unwrap()
            .iter()
            .map(MasterKey::id)
            .collect();
        ids.sort();
        let mut want = vec![old.id(), new.id()];
        want.sort();
        assert_eq!(ids, want, "an interrupted rotation still knows both keys");
        MasterKey::finish_rotation(&file).unwrap();
        assert_eq!(MasterKey::from_file(&file).unwrap().id(), new.id());
        assert_eq!(crate::testutil::mode(&file), 0o600);
        let retained = MasterKey::load_retained(&file).unwrap();
        assert_eq!(retained.len(), 1);
        assert_eq!(retained[0].id(), old.id());
        std::fs::remove_file(&kept).unwrap();
        assert!(MasterKey::load_retained(&file).unwrap().is_empty());
    }

    #[cfg(unix)]
    #[test]
    fn master_key_file_is_generated_private_and_reused() {
        let dir = TempDir::new("master");
        let data = dir.path().join("data");
        let a = MasterKey::load_or_generate(&data).unwrap();
        let path = data.join(MASTER_KEY_FILE);
        assert_eq!(crate::testutil::mode(&path), 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(STANDARD.decode(text.trim()).unwrap().len(), 32);
        let b = MasterKey::load_or_generate(&data).unwrap();
        assert_eq!(a.expose_bytes(), b.expose_bytes());
        assert_eq!(MasterKey::from_file(&path).unwrap().id(), a.id());
        // A value sealed before a restart opens after it.
        let sealed = Sealer::from_master_keys(&a, &[])
            .unwrap()
            .seal(&secret("x"), "c")
            .unwrap();
        let reopened = Sealer::from_master_keys(&b, &[]).unwrap();
        assert_eq!(reopened.open(&sealed, "c").unwrap().expose(), "x");
        // A corrupt file is an error naming it.
        std::fs::write(&path, "short").unwrap();
        let e = MasterKey::load_or_generate(&data).unwrap_err();
        assert!(e.0.contains("master.key"), "{e}");
    }
}
