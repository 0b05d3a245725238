use super::*;
use crate::testutil::TempDir;
use hmac::{Hmac, Mac};
use std::sync::OnceLock;

const ISSUER: &str = "https://nexplane.test";

fn now() -> Timestamp {
    Timestamp::from_secs(1_796_398_882)
}

fn claims_at(t: Timestamp) -> AccessClaims {
    AccessClaims {
        iss: ISSUER.to_owned(),
        aud: TOKEN_AUDIENCE.to_owned(),
        sub: "01JUSER".to_owned(),
        sid: "01JSESSION".to_owned(),
        role: "viewer".to_owned(),
        iat: t.secs(),
        exp: t.secs() + ACCESS_TOKEN_TTL_SECS,
        jti: "01JTOKEN".to_owned(),
        typ: ACCESS_TOKEN_TYPE.to_owned(),
    }
}

/// One shared in-memory signer (key generation is the slow part of these tests).
fn signer() -> &'static RsaTokenSigner {
    static SIGNER: OnceLock<RsaTokenSigner> = OnceLock::new();
    SIGNER.get_or_init(|| RsaTokenSigner::generate(ISSUER.to_owned()).unwrap())
}

/// A second, unrelated signer with the same issuer.
fn stranger() -> &'static RsaTokenSigner {
    static SIGNER: OnceLock<RsaTokenSigner> = OnceLock::new();
    SIGNER.get_or_init(|| RsaTokenSigner::generate(ISSUER.to_owned()).unwrap())
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Builds `header.payload.signature` by hand.
fn raw_token(header: &serde_json::Value, payload: &serde_json::Value, sig: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        b64(header.to_string().as_bytes()),
        b64(payload.to_string().as_bytes()),
        b64(sig)
    )
}

fn assert_reason(r: Result<AccessClaims, TokenError>, reason: &str) {
    assert_eq!(r, Err(TokenError::Invalid(reason.to_owned())));
}

fn assert_invalid(r: Result<AccessClaims, TokenError>) {
    match r {
        Err(TokenError::Invalid(_)) => {}
        other => panic!("expected Invalid, got {other:?}"),
    }
}

#[test]
fn round_trip() {
    let s = signer();
    let claims = claims_at(now());
    let token = s.sign(&claims).unwrap();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.kid.as_deref(), Some(s.current_kid().as_str()));
    assert_eq!(s.verify(&token, now()).unwrap(), claims);
    assert_eq!(s.verify(&token, now().plus_secs(3599)).unwrap(), claims);
    assert_eq!(s.issuer(), ISSUER);
}

#[test]
fn expired_is_reported_against_the_given_now() {
    let s = signer();
    let claims = claims_at(now());
    let token = s.sign(&claims).unwrap();
    let exp = Timestamp::from_secs(claims.exp);
    assert!(s.verify(&token, exp.plus_millis(-1)).is_ok());
    assert_eq!(s.verify(&token, exp), Err(TokenError::Expired));
    assert_eq!(
        s.verify(&token, exp.plus_secs(86_400)),
        Err(TokenError::Expired)
    );
    // A token that expired long ago by the system clock is fine at an earlier `now`.
    let old = claims_at(Timestamp::from_secs(1_000_000_000));
    let token = s.sign(&old).unwrap();
    assert!(s
        .verify(&token, Timestamp::from_secs(1_000_000_010))
        .is_ok());
}

#[test]
fn alg_none_is_refused() {
    let s = signer();
    let payload = serde_json::to_value(claims_at(now())).unwrap();
    for alg in ["none", "None", "NONE"] {
        let header = serde_json::json!({"alg": alg, "typ": "JWT", "kid": s.current_kid()});
        assert_reason(
            s.verify(&raw_token(&header, &payload, b""), now()),
            "malformed token or unsupported algorithm",
        );
        let unsigned = format!(
            "{}.{}.",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        assert_invalid(s.verify(&unsigned, now()));
    }
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let s = signer();
    let ring = s.ring();
    let spki_pem = ring.current.public.public_pem().unwrap();
    let pkcs1_pem = {
        let components = PublicKeyComponents {
            n: ring.current.public.n.as_slice(),
            e: ring.current.public.e.as_slice(),
        };
        let spki = components.as_der().unwrap();
        let public = PublicKey::from_der(spki.as_ref()).unwrap();
        util::pem_encode("RSA PUBLIC KEY", public.as_ref()).to_string()
    };
    let payload = serde_json::to_value(claims_at(now())).unwrap();
    let header = serde_json::json!({"alg": "HS256", "typ": "JWT", "kid": s.current_kid()});
    for secret in [spki_pem.as_bytes(), pkcs1_pem.as_bytes()] {
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).unwrap();
        mac.update(signing_input.as_bytes());
        let token = format!("{signing_input}.{}", b64(&mac.finalize().into_bytes()));
        assert_reason(s.verify(&token, now()), "algorithm not allowed");
    }
}

#[test]
fn other_rsa_algorithms_are_refused() {
    // Even PS256/RS512 made with the right key: RS256 only.
    let s = signer();
    let ring = s.ring();
    for alg in [Algorithm::RS512, Algorithm::PS256] {
        let mut header = Header::new(alg);
        header.kid = Some(s.current_kid());
        let token =
            jsonwebtoken::encode(&header, &claims_at(now()), &ring.current.encoding).unwrap();
        assert_reason(s.verify(&token, now()), "algorithm not allowed");
    }
}

#[test]
fn wrong_aud_typ_iss_are_refused() {
    let s = signer();
    let mut c = claims_at(now());
    c.aud = "someone-else".to_owned();
    assert_reason(s.verify(&s.sign(&c).unwrap(), now()), "wrong audience");

    let mut c = claims_at(now());
    c.typ = "refresh".to_owned();
    assert_reason(s.verify(&s.sign(&c).unwrap(), now()), "wrong typ");

    let mut c = claims_at(now());
    c.iss = "https://evil.test".to_owned();
    assert_reason(s.verify(&s.sign(&c).unwrap(), now()), "wrong issuer");

    // aud as an array containing "nexplane" is not our token shape either.
    let mut payload = serde_json::to_value(claims_at(now())).unwrap();
    payload["aud"] = serde_json::json!(["nexplane"]);
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(s.current_kid());
    let token = jsonwebtoken::encode(&header, &payload, &s.ring().current.encoding).unwrap();
    assert_invalid(s.verify(&token, now()));

    // Missing exp.
    let mut payload = serde_json::to_value(claims_at(now())).unwrap();
    payload.as_object_mut().unwrap().remove("exp");
    let token = jsonwebtoken::encode(&header, &payload, &s.ring().current.encoding).unwrap();
    assert_invalid(s.verify(&token, now()));
}

#[test]
fn unknown_or_missing_kid_is_refused() {
    let s = signer();
    // A token from an unrelated key: its kid is unknown here.
    let foreign = stranger().sign(&claims_at(now())).unwrap();
    assert_reason(s.verify(&foreign, now()), "unknown kid");

    // Signed by the unrelated key but claiming our kid: bad signature.
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(s.current_kid());
    let forged = jsonwebtoken::encode(
        &header,
        &claims_at(now()),
        &stranger().ring().current.encoding,
    )
    .unwrap();
    assert_eq!(
        s.verify(&forged, now()),
        Err(TokenError::Invalid("bad signature".to_owned()))
    );

    // No kid at all.
    let header = Header::new(Algorithm::RS256);
    let token =
        jsonwebtoken::encode(&header, &claims_at(now()), &s.ring().current.encoding).unwrap();
    assert_reason(s.verify(&token, now()), "missing kid");
}

#[test]
fn tampered_tokens_are_refused() {
    let s = signer();
    let token = s.sign(&claims_at(now())).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);

    let mut payload: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    payload["role"] = serde_json::json!("admin");
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        b64(payload.to_string().as_bytes()),
        parts[2]
    );
    assert_reason(s.verify(&tampered, now()), "bad signature");

    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let bad_sig = format!("{}.{}.{}", parts[0], parts[1], b64(&sig));
    assert_reason(s.verify(&bad_sig, now()), "bad signature");

    for garbage in [
        "",
        "a.b",
        "a.b.c",
        "....",
        &format!("{token}.x"),
        &"A".repeat(9000),
    ] {
        assert_invalid(s.verify(garbage, now()));
    }
}

#[test]
fn rotated_out_key_verifies_until_retired() {
    let dir = TempDir::new("rotate");
    let s = RsaTokenSigner::load_or_generate_at(dir.path(), ISSUER.to_owned(), now()).unwrap();
    let old_kid = s.current_kid();
    let old_token = s.sign(&claims_at(now())).unwrap();
    // A long-lived token from the old key shows that retirement, not `exp`, ends it.
    let mut long = claims_at(now());
    long.exp = now().secs() + 10 * 86_400;
    let long_token = s.sign(&long).unwrap();

    let t = now().plus_secs(60);
    let new_kid = s.rotate(t).unwrap();
    assert_ne!(new_kid, old_kid);
    assert_eq!(s.current_kid(), new_kid);
    let new_token = s.sign(&claims_at(t)).unwrap();
    assert_eq!(
        jsonwebtoken::decode_header(&new_token)
            .unwrap()
            .kid
            .as_deref(),
        Some(new_kid.as_str())
    );

    // Both keys verify and are published while the old one is listed.
    assert!(s.verify(&old_token, t).is_ok());
    assert!(s.verify(&new_token, t).is_ok());
    let kids = |v: serde_json::Value| -> Vec<String> {
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(kids(s.jwks_at(t)), vec![new_kid.clone(), old_kid.clone()]);

    let retire = t.plus_secs(ACCESS_TOKEN_TTL_SECS + ROTATION_GRACE_SECS);
    assert!(s.verify(&long_token, retire.plus_millis(-1)).is_ok());
    assert_eq!(kids(s.jwks_at(retire.plus_millis(-1))).len(), 2);
    assert_reason(s.verify(&long_token, retire), "unknown kid");
    assert_eq!(kids(s.jwks_at(retire)), vec![new_kid.clone()]);

    // A token from a key that was never ours is still refused.
    assert_reason(
        s.verify(&stranger().sign(&claims_at(t)).unwrap(), t),
        "unknown kid",
    );

    // Persisted: the key file now holds the new key, the old public key sits next to it.
    let reloaded = RsaTokenSigner::load_or_generate_at(dir.path(), ISSUER.to_owned(), t).unwrap();
    assert_eq!(reloaded.current_kid(), new_kid);
    assert!(reloaded.verify(&old_token, t).is_ok());
    assert!(reloaded.verify(&new_token, t).is_ok());
    let previous_file = dir.path().join(format!(
        "{PREVIOUS_KEY_PREFIX}{}-{old_kid}.pem",
        retire.secs()
    ));
    let pem = std::fs::read_to_string(&previous_file).unwrap();
    assert!(
        pem.contains("BEGIN PUBLIC KEY"),
        "only the public half is kept"
    );

    // Loaded after retirement: the old key is gone.
    let late = RsaTokenSigner::load_or_generate_at(dir.path(), ISSUER.to_owned(), retire).unwrap();
    assert_invalid(late.verify(&long_token, retire));
    assert_eq!(kids(late.jwks_at(retire)), vec![new_kid.clone()]);

    // A second rotation after retirement prunes the retired file.
    late.rotate(retire.plus_secs(1)).unwrap();
    assert!(!previous_file.exists());
}

#[test]
fn previous_keys_from_dir_and_pem() {
    let dir = TempDir::new("previous");
    let s = RsaTokenSigner::generate(ISSUER.to_owned()).unwrap();
    let token = stranger().sign(&claims_at(now())).unwrap();
    assert_invalid(s.verify(&token, now()));

    // A private key PEM without a time in its name: kept until removed.
    let ring = stranger().ring();
    let pem = ring.current.public.public_pem().unwrap();
    std::fs::write(dir.path().join("jwt-previous-manual.pem"), &pem).unwrap();
    std::fs::write(dir.path().join("unrelated.pem"), "not a key").unwrap();
    assert_eq!(s.load_previous_keys(dir.path(), now()).unwrap(), 1);
    assert!(s.verify(&token, now()).is_ok());
    assert_eq!(s.jwks_at(now())["keys"].as_array().unwrap().len(), 2);
    // Loading again adds nothing.
    assert_eq!(s.load_previous_keys(dir.path(), now()).unwrap(), 0);

    // add_previous_key_pem with a retirement time.
    let t = RsaTokenSigner::generate(ISSUER.to_owned()).unwrap();
    let kid = t
        .add_previous_key_pem(&pem, Some(now().plus_secs(10)))
        .unwrap();
    assert_eq!(kid, stranger().current_kid());
    assert!(t.verify(&token, now()).is_ok());
    assert_invalid(t.verify(&token, now().plus_secs(10)));

    // A corrupt previous-key file stops loading with a message naming it.
    std::fs::write(dir.path().join("jwt-previous-broken.pem"), "garbage").unwrap();
    let e = s.load_previous_keys(dir.path(), now()).unwrap_err();
    assert!(e.0.contains("jwt-previous-broken.pem"), "{e}");
}

#[cfg(unix)]
#[test]
fn generated_key_file_is_private_and_reused() {
    let dir = TempDir::new("keyfile");
    let keys = dir.path().join("nested").join("keys");
    let a = RsaTokenSigner::load_or_generate(&keys, ISSUER.to_owned()).unwrap();
    let path = keys.join(SIGNING_KEY_FILE);
    assert_eq!(crate::testutil::mode(&path), 0o600);
    assert_eq!(crate::testutil::mode(&keys), 0o700);
    let pem = std::fs::read_to_string(&path).unwrap();
    assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    let b = RsaTokenSigner::load_or_generate(&keys, ISSUER.to_owned()).unwrap();
    assert_eq!(a.current_kid(), b.current_kid());
    assert_eq!(std::fs::read_to_string(&path).unwrap(), pem);
    let token = a.sign(&claims_at(now())).unwrap();
    assert!(b.verify(&token, now()).is_ok());
    // No temporary files left behind.
    let names: Vec<String> = std::fs::read_dir(&keys)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec![SIGNING_KEY_FILE.to_owned()]);

    // Rotation keeps the mode.
    a.rotate(now()).unwrap();
    assert_eq!(crate::testutil::mode(&path), 0o600);
}

#[test]
fn pem_files_pkcs8_and_pkcs1() {
    let dir = TempDir::new("pem");
    let generated = RsaTokenSigner::load_or_generate(dir.path(), ISSUER.to_owned()).unwrap();
    let pkcs8_path = dir.path().join(SIGNING_KEY_FILE);
    let from_pkcs8 = RsaTokenSigner::from_pem_file(&pkcs8_path, ISSUER.to_owned()).unwrap();
    assert_eq!(from_pkcs8.current_kid(), generated.current_kid());

    // Convert to PKCS#1 and check aws-lc-rs agrees that it is the same key.
    let block = util::pem_decode(&std::fs::read_to_string(&pkcs8_path).unwrap()).unwrap();
    let pkcs1 = util::pkcs8_private_key(&block.der).unwrap();
    let pair = KeyPair::from_der(pkcs1).unwrap();
    let pair8 = KeyPair::from_pkcs8(&block.der).unwrap();
    assert_eq!(pair.public_key().as_ref(), pair8.public_key().as_ref());
    let pkcs1_path = dir.path().join("configured.pem");
    std::fs::write(
        &pkcs1_path,
        util::pem_encode("RSA PRIVATE KEY", pkcs1).as_bytes(),
    )
    .unwrap();
    let from_pkcs1 = RsaTokenSigner::from_pem_file(&pkcs1_path, ISSUER.to_owned()).unwrap();
    assert_eq!(from_pkcs1.current_kid(), generated.current_kid());
    let token = from_pkcs1.sign(&claims_at(now())).unwrap();
    assert!(generated.verify(&token, now()).is_ok());

    // A configured key is not rotated in place.
    assert!(from_pkcs1.rotate(now()).is_err());

    // Bad inputs are errors that name the file.
    let bad = dir.path().join("bad.pem");
    std::fs::write(
        &bad,
        "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
    )
    .unwrap();
    let e = RsaTokenSigner::from_pem_file(&bad, ISSUER.to_owned()).unwrap_err();
    assert!(e.0.contains("bad.pem"), "{e}");
    std::fs::write(
        &bad,
        "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
    )
    .unwrap();
    assert!(RsaTokenSigner::from_pem_file(&bad, ISSUER.to_owned()).is_err());
    std::fs::write(
        &bad,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    assert!(RsaTokenSigner::from_pem_file(&bad, ISSUER.to_owned()).is_err());
    assert!(
        RsaTokenSigner::from_pem_file(&dir.path().join("missing.pem"), ISSUER.to_owned()).is_err()
    );
    assert!(RsaTokenSigner::from_pem("garbage", ISSUER.to_owned()).is_err());
}

#[test]
fn jwks_components_verify_a_token() {
    let s = signer();
    let token = s.sign(&claims_at(now())).unwrap();
    let jwks = s.jwks_at(now());
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let k = &keys[0];
    assert_eq!(k["kty"], "RSA");
    assert_eq!(k["use"], "sig");
    assert_eq!(k["alg"], "RS256");
    assert_eq!(k["e"], "AQAB");
    assert_eq!(k["kid"].as_str().unwrap(), s.current_kid());
    assert_eq!(
        k.as_object().unwrap().keys().cloned().collect::<Vec<_>>(),
        ["alg", "e", "kid", "kty", "n", "use"]
    );

    // Rebuild a key from the published n/e only and verify with plain jsonwebtoken.
    let key = DecodingKey::from_rsa_components(k["n"].as_str().unwrap(), k["e"].as_str().unwrap())
        .unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_exp = false;
    validation.set_audience(&["nexplane"]);
    let data = jsonwebtoken::decode::<AccessClaims>(&token, &key, &validation).unwrap();
    assert_eq!(data.claims, claims_at(now()));
    // ... and the same key refuses a stranger's token.
    let foreign = stranger().sign(&claims_at(now())).unwrap();
    assert!(jsonwebtoken::decode::<AccessClaims>(&foreign, &key, &validation).is_err());

    // The kid agrees with jsonwebtoken's own RFC 7638 thumbprint.
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(k.clone()).unwrap();
    assert_eq!(
        jwk.thumbprint(jsonwebtoken::jwk::ThumbprintHash::SHA256)
            .unwrap(),
        s.current_kid()
    );
    // The trait method gives the same document (system clock).
    assert_eq!(s.jwks(), jwks);
}

#[test]
fn thumbprint_matches_rfc7638_example() {
    // RFC 7638 §3.1.
    let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
    assert_eq!(
        jwk_thumbprint(n, "AQAB"),
        "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    );
    assert_eq!(modulus_bits(&URL_SAFE_NO_PAD.decode(n).unwrap()), 2048);
    assert_eq!(modulus_bits(&[0x01, 0x00]), 9);
    assert_eq!(modulus_bits(&[]), 0);
}

#[test]
fn previous_key_file_names() {
    assert_eq!(
        previous_key_retire_at("jwt-previous-1796402542-abc-def.pem"),
        Some(Some(Timestamp::from_secs(1_796_402_542)))
    );
    assert_eq!(previous_key_retire_at("jwt-previous-old.pem"), Some(None));
    assert_eq!(previous_key_retire_at("jwt-signing-key.pem"), None);
    assert_eq!(previous_key_retire_at("jwt-previous-1.pem.bak"), None);
}

#[test]
fn debug_is_redacted() {
    let text = format!("{:?}", signer());
    assert!(text.contains("[redacted]"));
    assert!(!text.contains("BEGIN"));
}

#[test]
fn verify_is_cheap_enough_to_call_per_request() {
    let s = signer();
    let token = s.sign(&claims_at(now())).unwrap();
    let start = std::time::Instant::now();
    for _ in 0..200 {
        s.verify(&token, now()).unwrap();
    }
    // Generous bound (debug build, shared CI machine): well under 5 ms per call.
    assert!(
        start.elapsed() < std::time::Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
}
