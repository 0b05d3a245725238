//! Small private helpers: PEM armour, a minimal DER reader, private-file writes, the clock.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use nexplane_domain::Timestamp;
use nexplane_ports::CryptoError;
use rand::RngCore;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Shorthand for a [`CryptoError`] with a message.
pub(crate) fn err(msg: impl Into<String>) -> CryptoError {
    CryptoError(msg.into())
}

/// Now, from the system clock (only where a trait method gets no `now`).
pub(crate) fn system_now() -> Timestamp {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    Timestamp::from_millis(ms)
}

/// One decoded PEM block.
pub(crate) struct PemBlock {
    /// The label between `-----BEGIN ` and `-----`, e.g. `PRIVATE KEY`.
    pub label: String,
    /// The decoded contents.
    pub der: Zeroizing<Vec<u8>>,
}

/// Decodes the first PEM block of `text` (RFC 7468). Explanatory text around the block is
/// ignored; RFC 1421 headers (as in legacy encrypted keys) are refused.
pub(crate) fn pem_decode(text: &str) -> Result<PemBlock, CryptoError> {
    let (_, rest) = text
        .split_once("-----BEGIN ")
        .ok_or_else(|| err("not a PEM file (no BEGIN line)"))?;
    let (label, rest) = rest
        .split_once("-----")
        .ok_or_else(|| err("malformed PEM BEGIN line"))?;
    let end_line = format!("-----END {label}-----");
    let (body, _) = rest
        .split_once(end_line.as_str())
        .ok_or_else(|| err(format!("PEM block {label} has no END line")))?;
    if body.contains(':') {
        return Err(err(
            "PEM headers (e.g. a legacy encrypted key) are not supported",
        ));
    }
    let compact: Zeroizing<String> =
        Zeroizing::new(body.chars().filter(|c| !c.is_ascii_whitespace()).collect());
    let der = STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| err(format!("PEM block {label} is not valid base64")))?;
    Ok(PemBlock {
        label: label.to_owned(),
        der: Zeroizing::new(der),
    })
}

/// Encodes `der` as a PEM block with 64-character lines.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> Zeroizing<String> {
    let mut out = Zeroizing::new(String::with_capacity(der.len() * 4 / 3 + 100));
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    // 48 bytes encode to exactly 64 base64 characters.
    for chunk in der.chunks(48) {
        STANDARD.encode_string(chunk, &mut out);
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

/// Reads one DER element: `(tag, contents, rest)`. Low-tag-number form and definite lengths
/// up to 4 length bytes only, which covers every key structure we read.
fn der_element(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    if tag & 0x1f == 0x1f {
        return None;
    }
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let (len_bytes, rest) = rest.split_at(n);
        let len = len_bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, rest)
    };
    if rest.len() < len {
        return None;
    }
    let (contents, rest) = rest.split_at(len);
    Some((tag, contents, rest))
}

/// The `privateKey` OCTET STRING of a PKCS#8 `PrivateKeyInfo` (for RSA: the PKCS#1
/// `RSAPrivateKey`). The caller has already checked that the structure is an RSA key.
pub(crate) fn pkcs8_private_key(pkcs8: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const INTEGER: u8 = 0x02;
    const OCTET_STRING: u8 = 0x04;
    let (tag, info, _) = der_element(pkcs8)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, _version, rest) = der_element(info)?;
    if tag != INTEGER {
        return None;
    }
    let (tag, _algorithm, rest) = der_element(rest)?;
    if tag != SEQUENCE {
        return None;
    }
    let (tag, key, _) = der_element(rest)?;
    if tag != OCTET_STRING {
        return None;
    }
    Some(key)
}

/// Creates `dir` (and parents) if missing, mode 0700 on Unix for what we create.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CryptoError> {
    if dir.is_dir() {
        return Ok(());
    }
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder
        .create(dir)
        .map_err(|e| err(format!("cannot create directory {}: {e}", dir.display())))
}

/// A temporary sibling of `path` that no other writer uses.
fn temp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tag = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut tag);
    path.with_file_name(format!(".{name}.tmp-{}", hex::encode(tag)))
}

/// Opens `path` with `options`, forces mode 0600 (Unix), writes `contents` and syncs.
fn fill_private(options: &OpenOptions, path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = options.open(path)?;
    #[cfg(unix)]
    {
        // The mode given to open() is subject to the umask; make it exact.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
    }
    file.write_all(contents)?;
    file.sync_all()
}

/// Writes `contents` to a fresh temporary file with mode 0600 (Unix) and syncs it.
fn write_temp_private(path: &Path, contents: &[u8]) -> io::Result<PathBuf> {
    let tmp = temp_sibling(path);
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let result = fill_private(&options, &tmp, contents);
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Creates `path` with `contents` and mode 0600 unless it already exists. Returns `false`
/// when the file already existed (e.g. another process created it first); the existing file
/// is left untouched. The file appears complete or not at all.
pub(crate) fn create_private_file(path: &Path, contents: &[u8]) -> Result<bool, CryptoError> {
    let fail = |e: io::Error| err(format!("cannot write {}: {e}", path.display()));
    let tmp = write_temp_private(path, contents).map_err(fail)?;
    // A hard link never replaces an existing file, so two processes starting together
    // agree on one key.
    let linked = match fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(false),
        Err(_) if !path.exists() => fs::rename(&tmp, path).map(|()| true),
        Err(e) => Err(e),
    };
    let _ = fs::remove_file(&tmp);
    linked.map_err(fail)
}

/// Writes `path` atomically (temporary file + rename), mode 0600, replacing any old file.
pub(crate) fn replace_private_file(path: &Path, contents: &[u8]) -> Result<(), CryptoError> {
    let fail = |e: io::Error| err(format!("cannot write {}: {e}", path.display()));
    let tmp = write_temp_private(path, contents).map_err(fail)?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        fail(e)
    })
}

/// Reads a text file (a key), naming the file in the error.
pub(crate) fn read_text(path: &Path) -> Result<Zeroizing<String>, CryptoError> {
    fs::read_to_string(path)
        .map(Zeroizing::new)
        .map_err(|e| err(format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_and_line_length() {
        let der: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        let pem = pem_encode("TEST DATA", &der);
        assert!(pem.starts_with("-----BEGIN TEST DATA-----\n"));
        assert!(pem.ends_with("-----END TEST DATA-----\n"));
        assert!(pem.lines().all(|l| l.len() <= 64));
        let framed = format!("explanatory text\n{}trailing", pem.as_str());
        let block = pem_decode(&framed).unwrap();
        assert_eq!(block.label, "TEST DATA");
        assert_eq!(block.der.as_slice(), der.as_slice());
    }

    #[test]
    fn pem_rejects_garbage() {
        assert!(pem_decode("hello").is_err());
        assert!(pem_decode("-----BEGIN X-----\nAAAA\n").is_err());
        assert!(pem_decode("-----BEGIN X-----\n!!!!\n-----END X-----\n").is_err());
        let legacy = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert!(pem_decode(legacy).is_err());
    }

    #[test]
    fn der_reader_handles_long_lengths_and_truncation() {
        // SEQUENCE { INTEGER 0, SEQUENCE {}, OCTET STRING (300 bytes) }
        let mut octets = vec![0x04, 0x82, 0x01, 0x2c];
        octets.extend(std::iter::repeat_n(7u8, 300));
        let mut inner = vec![0x02, 0x01, 0x00, 0x30, 0x00];
        inner.extend(&octets);
        let mut outer = vec![0x30, 0x82];
        outer.extend(u16::try_from(inner.len()).unwrap().to_be_bytes());
        outer.extend(&inner);
        assert_eq!(pkcs8_private_key(&outer).unwrap(), &[7u8; 300][..]);
        assert!(pkcs8_private_key(&outer[..outer.len() - 1]).is_none());
        assert!(pkcs8_private_key(&[0x30, 0x80]).is_none());
        assert!(pkcs8_private_key(&[]).is_none());
        assert!(pkcs8_private_key(&[0x1f, 0x01, 0x00]).is_none());
    }
}
