//! Password hashing: argon2id (api.md §2.1).

use crate::util::err;
use argon2::{Config, ThreadMode, Variant, Version};
use nexplane_domain::{PasswordHash, SecretString};
use nexplane_ports::{CryptoError, PasswordHasher};
use rand::RngCore;

/// Memory cost in KiB (OWASP minimum for argon2id).
pub const ARGON2_MEMORY_KIB: u32 = 19_456;
/// Number of passes.
pub const ARGON2_ITERATIONS: u32 = 2;
/// Degree of parallelism (lanes).
pub const ARGON2_PARALLELISM: u32 = 1;
/// Salt length in bytes.
const SALT_LEN: usize = 16;
/// Hash output length in bytes.
const HASH_LEN: u32 = 32;

/// Upper bounds for the parameters of a stored hash: a corrupted or hostile hash string
/// must not make verification allocate gigabytes or spin for minutes.
const MAX_MEMORY_KIB: u32 = 1024 * 1024;
const MAX_ITERATIONS: u32 = 64;
const MAX_PARALLELISM: u32 = 16;

/// argon2id password hasher (m = 19456 KiB, t = 2, p = 1, 16-byte random salt), producing
/// PHC strings like `$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`.
///
/// Hashing takes tens of milliseconds and ~19 MiB: call it on a blocking thread pool.
#[derive(Debug, Clone, Copy, Default)]
pub struct Argon2Hasher;

impl Argon2Hasher {
    /// A hasher with the parameters above.
    pub fn new() -> Self {
        Self
    }

    fn config() -> Config<'static> {
        Config {
            ad: &[],
            hash_length: HASH_LEN,
            lanes: ARGON2_PARALLELISM,
            mem_cost: ARGON2_MEMORY_KIB,
            secret: &[],
            thread_mode: ThreadMode::Sequential,
            time_cost: ARGON2_ITERATIONS,
            variant: Variant::Argon2id,
            version: Version::Version13,
        }
    }
}

/// Threads that run argon2 for the whole process.
///
/// Each hash allocates ~19 MiB; the C allocator keeps such a block in the arena of the thread
/// that freed it. Hashing on whatever blocking thread served the request would leave up to
/// one block per thread of the (large) blocking pool resident for ever; on two dedicated
/// threads at most two stay. Two also bounds the CPU that logins can take.
pub const HASH_THREADS: usize = 2;

type Job = Box<dyn FnOnce() + Send>;

type Pool = std::sync::Mutex<std::sync::mpsc::Sender<Job>>;

/// The process-wide hashing threads (started on first use); `None` when no thread could be
/// started (the work then runs on the caller's thread).
fn pool() -> Option<&'static Pool> {
    static POOL: std::sync::OnceLock<Option<Pool>> = std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let started = (0..HASH_THREADS)
            .filter(|i| {
                let rx = rx.clone();
                std::thread::Builder::new()
                    .name(format!("argon2-{i}"))
                    .spawn(move || loop {
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    })
                    .is_ok()
            })
            .count();
        (started > 0).then(|| std::sync::Mutex::new(tx))
    })
    .as_ref()
}

/// Runs `f` on a hashing thread and waits for its result.
fn on_hash_thread<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, CryptoError> + Send + 'static,
) -> Result<T, CryptoError> {
    let Some(pool) = pool() else {
        return f();
    };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let job: Job = Box::new(move || {
        let _ = tx.send(f());
    });
    pool.lock()
        .map_err(|_| err("the argon2 threads are gone"))?
        .send(job)
        .map_err(|_| err("the argon2 threads are gone"))?;
    rx.recv().map_err(|_| err("an argon2 thread failed"))?
}

impl PasswordHasher for Argon2Hasher {
    fn hash(&self, password: &SecretString) -> Result<PasswordHash, CryptoError> {
        let mut salt = [0u8; SALT_LEN];
        rand::rngs::OsRng
            .try_fill_bytes(&mut salt)
            .map_err(|_| err("the OS random number generator failed"))?;
        let password = password.clone();
        on_hash_thread(move || {
            argon2::hash_encoded(password.expose().as_bytes(), &salt, &Self::config())
                .map(PasswordHash::new)
                .map_err(|e| err(format!("argon2 hashing failed: {e}")))
        })
    }

    fn verify(&self, hash: &PasswordHash, password: &SecretString) -> Result<bool, CryptoError> {
        check_stored_params(hash.as_str())?;
        let (hash, password) = (hash.clone(), password.clone());
        on_hash_thread(move || {
            argon2::verify_encoded(hash.as_str(), password.expose().as_bytes())
                .map_err(|e| err(format!("unusable password hash: {e}")))
        })
    }
}

/// Refuses stored hashes that are not argon2id or whose cost parameters are out of bounds.
fn check_stored_params(phc: &str) -> Result<(), CryptoError> {
    let bad = || err("unusable password hash: not an argon2id PHC string");
    let mut parts = phc.split('$');
    if parts.next() != Some("") || parts.next() != Some("argon2id") {
        return Err(bad());
    }
    let mut params = parts.next().ok_or_else(bad)?;
    if params.starts_with("v=") {
        params = parts.next().ok_or_else(bad)?;
    }
    let (mut m, mut t, mut p) = (None, None, None);
    for item in params.split(',') {
        let (key, value) = item.split_once('=').ok_or_else(bad)?;
        let value: u32 = value.parse().map_err(|_| bad())?;
        match key {
            "m" => m = Some(value),
            "t" => t = Some(value),
            "p" => p = Some(value),
            _ => return Err(bad()),
        }
    }
    match (m, t, p) {
        (Some(m), Some(t), Some(p))
            if m <= MAX_MEMORY_KIB && t <= MAX_ITERATIONS && p <= MAX_PARALLELISM =>
        {
            Ok(())
        }
        _ => Err(err("unusable password hash: parameters out of bounds")),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD_NO_PAD;
    use base64::Engine;

    fn secret(s: &str) -> SecretString {
        SecretString::new(s.to_owned())
    }

    #[test]
    fn verifies_right_and_refuses_wrong_password() {
        let h = Argon2Hasher::new();
        let hash = h.hash(&secret("correct horse battery")).unwrap();
        assert!(h.verify(&hash, &secret("correct horse battery")).unwrap());
        assert!(!h.verify(&hash, &secret("correct horse battery ")).unwrap());
        assert!(!h.verify(&hash, &secret("")).unwrap());
    }

    #[test]
    fn phc_string_has_the_owasp_parameters_and_a_random_salt() {
        let h = Argon2Hasher::new();
        let a = h.hash(&secret("same password")).unwrap();
        let b = h.hash(&secret("same password")).unwrap();
        assert!(
            a.as_str().starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            a.as_str()
        );
        assert_ne!(a, b, "fresh salt per hash");
        let parts: Vec<&str> = a.as_str().split('$').collect();
        assert_eq!(parts.len(), 6);
        assert_eq!(STANDARD_NO_PAD.decode(parts[4]).unwrap().len(), 16);
        assert_eq!(STANDARD_NO_PAD.decode(parts[5]).unwrap().len(), 32);
        // rust-argon2's default is the same argon2id configuration.
        assert_eq!(Config::default(), Argon2Hasher::config());
        assert_eq!(format!("{a:?}"), "[redacted]");
    }

    #[test]
    fn garbage_hashes_are_errors_not_panics() {
        let h = Argon2Hasher::new();
        let pw = secret("whatever password");
        for garbage in [
            "",
            "$",
            "plaintext",
            "$argon2id$",
            "$argon2id$v=19$m=19456,t=2,p=1$",
            "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$",
            "$argon2id$v=19$m=19456,t=2,p=1$!!!$!!!",
            "$argon2id$v=19$m=x,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=8,t=0,p=0$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=4294967295,t=2,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2id$v=19$m=19456,t=4000000000,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
            "$argon2i$v=19$m=4096,t=3,p=1$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXWiCX4K6pW6Ue1Bnzz07Z8A",
            "$2b$12$abcdefghijklmnopqrstuu5eX9qgNdTHvkzXkWxCr1cFnCvq7QW6e",
        ] {
            assert!(
                h.verify(&PasswordHash::new(garbage.to_owned()), &pw)
                    .is_err(),
                "{garbage}"
            );
        }
    }
}
