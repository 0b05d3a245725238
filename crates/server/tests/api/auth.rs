//! api.md §2.1 over HTTP: login, the RS256 access token and the JWKS, bearer checks
//! (forged, tampered, expired tokens), refresh rotation and reuse detection, logout, disabled
//! users, role changes, the soft-lock ladder, the per-IP login limit, and that no password or
//! refresh token ever leaks into a response or the audit log.

use crate::both;
use crate::harness::*;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use nexplane_crypto::{RsaTokenSigner, SIGNING_KEY_FILE};
use nexplane_domain::AccessClaims;
use nexplane_ports::{Clock, TokenSigner};
use reqwest::Method;
use serde_json::{json, Value};
use sha2::Sha256;

// ---------------------------------------------------------------- helpers

fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn json_segment(v: &Value) -> String {
    b64url(v.to_string().as_bytes())
}

fn decode_segment(seg: &str) -> Value {
    let bytes = URL_SAFE_NO_PAD
        .decode(seg)
        .expect("JWT segment is base64url");
    serde_json::from_slice(&bytes).expect("JWT segment is JSON")
}

/// The three segments of a compact JWT.
fn segments(token: &str) -> [&str; 3] {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a compact JWS: {token}");
    [parts[0], parts[1], parts[2]]
}

fn jwt_header(token: &str) -> Value {
    decode_segment(segments(token)[0])
}

fn jwt_claims(token: &str) -> Value {
    decode_segment(segments(token)[1])
}

fn s(v: &Value) -> String {
    v.as_str()
        .unwrap_or_else(|| panic!("expected a string, got {v}"))
        .to_owned()
}

/// Access and refresh token of a login or refresh answer.
fn pair(body: &Value) -> (String, String) {
    (s(&body["access_token"]), s(&body["refresh_token"]))
}

async fn me(app: &TestApp, token: &str) -> Resp {
    app.get("/auth/me", token).await
}

/// `POST /auth/refresh` with `{"refresh_token": …}` and no bearer token.
async fn refresh(app: &TestApp, refresh_token: &str) -> Resp {
    app.req(
        Method::POST,
        "/auth/refresh",
        None,
        Some(json!({ "refresh_token": refresh_token })),
    )
    .await
}

/// `POST /auth/refresh` with no body and a bearer access token.
async fn refresh_by_access(app: &TestApp, access: &str) -> Resp {
    app.req(Method::POST, "/auth/refresh", Some(access), None)
        .await
}

async fn logout(app: &TestApp, access: &str) -> Resp {
    app.req(Method::POST, "/auth/logout", Some(access), None)
        .await
}

/// A 401 problem+json that tells the client to use a bearer token.
#[track_caller]
fn assert_unauthorized(r: &Resp) {
    let code = r.assert_problem(401);
    assert_eq!(code, "unauthorized", "{}", r.text);
    let www = r.header("www-authenticate").unwrap_or_default();
    assert!(
        www.starts_with("Bearer"),
        "401 without WWW-Authenticate: Bearer (got {www:?}): {}",
        r.text
    );
}

/// A 429 problem+json; returns its `Retry-After` in seconds.
#[track_caller]
fn assert_limited(r: &Resp) -> u64 {
    r.assert_problem(429);
    let ra = r
        .header("retry-after")
        .unwrap_or_else(|| panic!("429 without Retry-After: {}", r.text));
    let secs: u64 = ra
        .parse()
        .unwrap_or_else(|_| panic!("bad Retry-After {ra:?}"));
    assert!(secs >= 1, "Retry-After must be at least 1 s, got {secs}");
    secs
}

/// A problem body without the fields that depend on the request.
fn without_request_fields(body: &Value) -> Value {
    let mut b = body.clone();
    if let Value::Object(m) = &mut b {
        m.remove("request_id");
        m.remove("instance");
    }
    b
}

/// Creates a user with `role` and logs them in: (user id, email, login answer).
async fn new_user(app: &TestApp, role: &str) -> (String, String, Value) {
    let (user, _) = app.user(role).await;
    let email = s(&user["email"]);
    let body = app.login_ok(&email, USER_PASSWORD).await;
    (s(&user["id"]), email, body)
}

/// A fresh admin access token (the harness's one dies when a test moves the clock by hours).
async fn admin_token(app: &TestApp) -> String {
    s(&app.login_ok(ADMIN_EMAIL, ADMIN_PASSWORD).await["access_token"])
}

/// Audit events of a type, newest first, read with `admin`.
async fn audit_events(app: &TestApp, admin: &str, event_type: &str) -> Vec<Value> {
    let r = app
        .get(&format!("/audit?event_type={event_type}&limit=500"), admin)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body.as_array().expect("audit list is an array").clone()
}

/// The server's own signing key, read from its data dir.
fn server_signer(app: &TestApp) -> RsaTokenSigner {
    RsaTokenSigner::from_pem_file(
        &app.data_dir.path().join(SIGNING_KEY_FILE),
        nexplane::TOKEN_ISSUER.into(),
    )
    .expect("the server's signing key")
}

fn claims_of(token: &str) -> AccessClaims {
    serde_json::from_value(jwt_claims(token)).expect("access-token claims")
}

fn hs256(secret: &[u8], signing_input: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(signing_input.as_bytes());
    b64url(&mac.finalize().into_bytes())
}

// DER, just enough to write an RSA public key the way an attacker would from the JWKS.

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let len = content.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let first = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len() - 1);
        out.push(0x80 | (bytes.len() - first) as u8);
        out.extend_from_slice(&bytes[first..]);
    }
    out.extend_from_slice(content);
    out
}

fn der_uint(big_endian: &[u8]) -> Vec<u8> {
    let mut c = Vec::with_capacity(big_endian.len() + 1);
    if big_endian.first().is_some_and(|b| b & 0x80 != 0) {
        c.push(0);
    }
    c.extend_from_slice(big_endian);
    der(0x02, &c)
}

/// PKCS#1 `RSAPublicKey` DER.
fn rsa_pkcs1(n: &[u8], e: &[u8]) -> Vec<u8> {
    der(0x30, &[der_uint(n), der_uint(e)].concat())
}

/// X.509 `SubjectPublicKeyInfo` DER of an RSA key.
fn rsa_spki(n: &[u8], e: &[u8]) -> Vec<u8> {
    const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    let algorithm = der(0x30, &[der(0x06, RSA_ENCRYPTION), der(0x05, &[])].concat());
    let key = der(0x03, &[&[0u8][..], &rsa_pkcs1(n, e)].concat());
    der(0x30, &[algorithm, key].concat())
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The JWKS entry with this `kid`.
async fn jwk(app: &TestApp, kid: &str) -> Value {
    let r = app
        .req(Method::GET, "/.well-known/jwks.json", None, None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == json!(kid))
        .unwrap_or_else(|| panic!("kid {kid} not in the JWKS: {}", r.text))
        .clone()
}

// ---------------------------------------------------------------- login and the JWKS

both!(
    login_answers_an_rs256_token_listed_in_the_jwks,
    |app: TestApp| async move {
        let r = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert!(r
            .header("content-type")
            .unwrap_or_default()
            .starts_with("application/json"));
        let b = &r.body;
        assert_eq!(b["token_type"], json!("bearer"));
        assert_eq!(b["expires_in"], json!(3600));
        assert_eq!(b["refresh_expires_in"], json!(12 * 3600));
        let (access, refresh_token) = pair(b);
        assert!(
            refresh_token.len() >= 32,
            "refresh token too short: {refresh_token}"
        );
        assert_ne!(access, refresh_token);
        // A second login is a second session with different tokens.
        let again = app.login_ok(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        assert_ne!(again["access_token"], b["access_token"]);
        assert_ne!(again["refresh_token"], b["refresh_token"]);

        let header = jwt_header(&access);
        assert_eq!(header["alg"], json!("RS256"), "{header}");
        let kid = s(&header["kid"]);
        assert!(!kid.is_empty());

        let claims = jwt_claims(&access);
        let me_r = me(&app, &access).await;
        assert_eq!(me_r.status, 200, "{}", me_r.text);
        assert_eq!(claims["iss"], json!(nexplane::TOKEN_ISSUER));
        assert_eq!(claims["aud"], json!("nexplane"));
        assert_eq!(claims["sub"], me_r.body["id"]);
        assert!(s(&claims["sid"]).starts_with("ses_"), "{claims}");
        assert_eq!(claims["role"], json!("admin"));
        assert_eq!(claims["typ"], json!("access"));
        assert!(!s(&claims["jti"]).is_empty());
        let iat = claims["iat"].as_i64().unwrap();
        assert_eq!(claims["exp"].as_i64().unwrap() - iat, 3600);
        assert!((iat - app.clock.now().secs()).abs() <= 1);
        assert_ne!(claims["jti"], jwt_claims(&s(&again["access_token"]))["jti"]);

        // The JWKS is public, publishes the token's key, and holds no private member.
        let r = app
            .req(Method::GET, "/.well-known/jwks.json", None, None)
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let keys = r.body["keys"].as_array().expect("keys array");
        assert!(!keys.is_empty());
        for k in keys {
            assert_eq!(k["kty"], json!("RSA"), "{k}");
            assert_eq!(k["alg"], json!("RS256"), "{k}");
            for private in ["d", "p", "q", "dp", "dq", "qi"] {
                assert!(
                    k.get(private).is_none(),
                    "JWKS leaks private member {private}: {k}"
                );
            }
        }
        let key = jwk(&app, &kid).await;

        // That published key really verifies the token: rebuild the public key from `n` and `e`
        // and check the signature with it (the kid is the RFC 7638 thumbprint, so it must match).
        let n = URL_SAFE_NO_PAD.decode(s(&key["n"])).unwrap();
        let e = URL_SAFE_NO_PAD.decode(s(&key["e"])).unwrap();
        assert!(n.len() * 8 >= 2048, "RSA key too small");
        let checker = RsaTokenSigner::generate(nexplane::TOKEN_ISSUER.into()).unwrap();
        let added = checker
            .add_previous_key_pem(&pem("PUBLIC KEY", &rsa_spki(&n, &e)), None)
            .unwrap();
        assert_eq!(added, kid);
        let verified = checker
            .verify(&access, app.clock.now())
            .expect("JWKS key verifies the token");
        assert_eq!(serde_json::to_value(&verified).unwrap(), claims);

        // And it is the key the server keeps in its data dir.
        assert_eq!(server_signer(&app).current_kid(), kid);
    }
);

both!(
    wrong_password_and_unknown_email_get_the_same_401,
    |app: TestApp| async move {
        let (_, email, _) = new_user(&app, "viewer").await;
        let wrong = app.login(&email, "not-the-password-1").await;
        assert_unauthorized(&wrong);
        let unknown = app.login("nobody@example.com", "not-the-password-1").await;
        assert_unauthorized(&unknown);
        assert_eq!(
            without_request_fields(&wrong.body),
            without_request_fields(&unknown.body),
            "a wrong password and an unknown email must be indistinguishable"
        );
        assert_eq!(
            wrong.header("www-authenticate"),
            unknown.header("www-authenticate")
        );
        assert_eq!(wrong.header("content-type"), unknown.header("content-type"));
        // The email is matched case-insensitively and trimmed (here: locked by the failure above).
        let shouted = app
            .login(&format!("  {}  ", email.to_uppercase()), USER_PASSWORD)
            .await;
        assert_eq!(
            shouted.status, 429,
            "the failure above locked this account: {}",
            shouted.text
        );
        app.clock.advance_secs(1);
        let ok = app
            .login(&format!("  {}  ", email.to_uppercase()), USER_PASSWORD)
            .await;
        assert_eq!(ok.status, 200, "emails are case-insensitive: {}", ok.text);

        // Similar timing: an unknown email still pays a password verification. The fastest of a
        // few tries of each must be within a broad factor (skipping the hash would be ~10x off).
        let mut known_ms = Vec::new();
        let mut unknown_ms = Vec::new();
        for _ in 0..3 {
            app.clock.advance_secs(11); // past any lock from the previous failure
            let t = std::time::Instant::now();
            assert_unauthorized(&app.login(&email, "not-the-password-2").await);
            known_ms.push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            assert_unauthorized(&app.login("ghost@example.com", "not-the-password-2").await);
            unknown_ms.push(t.elapsed().as_secs_f64());
        }
        let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
        assert!(
        min(&unknown_ms) >= 0.3 * min(&known_ms),
        "unknown email answered much faster than a wrong password: {unknown_ms:?} vs {known_ms:?}"
    );
    }
);

both!(
    login_rejects_missing_and_malformed_bodies,
    |app: TestApp| async move {
        let post = |ct: &'static str, body: &'static str| {
            let app = &app;
            async move {
                app.raw(
                    Method::POST,
                    "/auth/login",
                    None,
                    ct,
                    body.as_bytes().to_vec(),
                )
                .await
            }
        };
        // Syntax → 400.
        for body in [
            "",
            "{",
            "{\"email\": \"admin@example.com\", \"password\": ",
            "not json",
        ] {
            let r = post("application/json", body).await;
            r.assert_problem(400);
        }
        // Well-formed but not a login → 422.
        for body in [
        "{}",
        "[]",
        "null",
        "{\"email\": \"admin@example.com\"}",
        "{\"password\": \"correct horse battery staple\"}",
        "{\"email\": 5, \"password\": \"correct horse battery staple\"}",
        "{\"email\": \"admin@example.com\", \"password\": [\"x\"]}",
        "{\"email\": \"admin@example.com\", \"password\": \"correct horse battery staple\", \"remember\": true}",
    ] {
        let r = post("application/json", body).await;
        assert_eq!(r.assert_problem(422), "validation_failed", "{body}: {}", r.text);
        assert!(
            !r.text.contains(ADMIN_PASSWORD),
            "an error echoes the password: {}",
            r.text
        );
    }
        // No body at all and no content type: refused as a client error, never a login.
        let r = TestApp::finish(
            app.client
                .post(app.url("/auth/login"))
                .send()
                .await
                .unwrap(),
        )
        .await;
        let status = r.status.as_u16();
        assert!(status == 400 || status == 415, "{status}: {}", r.text);
        r.assert_problem(status);
        // None of those counted as a failed login of the admin.
        assert_eq!(app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await.status, 200);
    }
);

/// Key files that tests gave the server through `NEXPLANE_JWT_KEY_FILE`.
static CONFIGURED_KEYS: std::sync::Mutex<Vec<std::path::PathBuf>> =
    std::sync::Mutex::new(Vec::new());

/// Generates an RSA key into a directory of its own and returns the env that configures it.
fn configured_key_env() -> Env {
    let dir = tempfile::tempdir().unwrap().keep();
    RsaTokenSigner::load_or_generate(&dir, nexplane::TOKEN_ISSUER.into()).unwrap();
    let path = dir.join(SIGNING_KEY_FILE);
    CONFIGURED_KEYS.lock().unwrap().push(path.clone());
    vec![("NEXPLANE_JWT_KEY_FILE", path.display().to_string())]
}

both!(
    a_configured_key_file_signs_the_tokens,
    configured_key_env(),
    |app: TestApp| async move {
        let token = admin_token(&app).await;
        let kid = s(&jwt_header(&token)["kid"]);
        let configured: Vec<String> = CONFIGURED_KEYS
            .lock()
            .unwrap()
            .iter()
            .map(|p| {
                RsaTokenSigner::from_pem_file(p, nexplane::TOKEN_ISSUER.into())
                    .unwrap()
                    .current_kid()
            })
            .collect();
        assert!(
            configured.contains(&kid),
            "token not signed by the configured key"
        );
        // No key was generated into the data dir, and the JWKS publishes the configured one.
        assert!(!app.data_dir.path().join(SIGNING_KEY_FILE).exists());
        jwk(&app, &kid).await;
        assert_eq!(me(&app, &token).await.status, 200);
    }
);

// ---------------------------------------------------------------- bearer checks

both!(
    missing_and_garbage_bearer_tokens_get_401,
    |app: TestApp| async move {
        let r = app.req(Method::GET, "/auth/me", None, None).await;
        assert_unauthorized(&r);
        for header in [
            "Bearer",
            "Bearer ",
            "Basic YWRtaW46cGFzc3dvcmQ=",
            "Token abc",
            "Bearer not-a-jwt",
            "Bearer a.b.c",
            "Bearer ...",
            "Bearer eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2ln",
        ] {
            let r = TestApp::finish(
                app.client
                    .get(app.url("/auth/me"))
                    .header("authorization", header)
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            assert_unauthorized(&r);
        }
        // An oversized token is refused before any parsing.
        let big = "a".repeat(7_000);
        assert_unauthorized(&me(&app, &format!("{big}.{big}.{big}")).await);
        // The admin token works on the same endpoint (so the refusals above are about the token).
        assert_eq!(me(&app, &app.admin_token).await.status, 200);
    }
);

both!(
    alg_none_and_hs256_with_the_public_key_are_refused,
    |app: TestApp| async move {
        let token = admin_token(&app).await;
        assert_eq!(me(&app, &token).await.status, 200);
        let [_, payload_seg, signature_seg] = segments(&token);
        let kid = s(&jwt_header(&token)["kid"]);

        // Unsigned tokens carrying the valid claims of a live session.
        for header in [
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "none", "typ": "JWT", "kid": kid}),
            json!({"alg": "None", "kid": kid}),
            json!({"alg": "NONE", "kid": kid}),
            json!({"alg": "nOnE", "kid": kid}),
        ] {
            let h = json_segment(&header);
            for forged in [
                format!("{h}.{payload_seg}."),
                format!("{h}.{payload_seg}.{signature_seg}"),
            ] {
                assert_unauthorized(&me(&app, &forged).await);
            }
        }

        // HS256 "signed" with the public key, in every form an attacker might get it.
        let key = jwk(&app, &kid).await;
        let n = URL_SAFE_NO_PAD.decode(s(&key["n"])).unwrap();
        let e = URL_SAFE_NO_PAD.decode(s(&key["e"])).unwrap();
        let spki_pem = pem("PUBLIC KEY", &rsa_spki(&n, &e));
        // Sanity: this is the server's real public key (same thumbprint).
        let checker = RsaTokenSigner::generate(nexplane::TOKEN_ISSUER.into()).unwrap();
        assert_eq!(checker.add_previous_key_pem(&spki_pem, None).unwrap(), kid);
        let secrets: Vec<Vec<u8>> = vec![
            spki_pem.clone().into_bytes(),
            spki_pem.trim_end().as_bytes().to_vec(),
            pem("RSA PUBLIC KEY", &rsa_pkcs1(&n, &e)).into_bytes(),
            rsa_spki(&n, &e),
            rsa_pkcs1(&n, &e),
            n.clone(),
            key.to_string().into_bytes(),
        ];
        for header in [
            json!({"alg": "HS256", "typ": "JWT", "kid": kid}),
            json!({"alg": "HS256", "typ": "JWT"}),
            json!({"alg": "HS512", "typ": "JWT", "kid": kid}),
        ] {
            let h = json_segment(&header);
            let input = format!("{h}.{payload_seg}");
            for secret in &secrets {
                let forged = format!("{input}.{}", hs256(secret, &input));
                assert_unauthorized(&me(&app, &forged).await);
            }
        }

        // RS256 with the real header but a changed payload or a broken signature.
        let mut claims = jwt_claims(&token);
        claims["jti"] = json!("tampered");
        let h = segments(&token)[0];
        assert_unauthorized(
            &me(
                &app,
                &format!("{h}.{}.{signature_seg}", json_segment(&claims)),
            )
            .await,
        );
        let mut sig = URL_SAFE_NO_PAD.decode(signature_seg).unwrap();
        sig[0] ^= 1;
        assert_unauthorized(&me(&app, &format!("{h}.{payload_seg}.{}", b64url(&sig))).await);
        // The same header with an unknown kid.
        let mut hdr = jwt_header(&token);
        hdr["kid"] = json!("not-a-known-kid");
        assert_unauthorized(
            &me(
                &app,
                &format!("{}.{payload_seg}.{signature_seg}", json_segment(&hdr)),
            )
            .await,
        );

        // The untouched token still works: the refusals were about the forgery.
        assert_eq!(me(&app, &token).await.status, 200);
    }
);

both!(
    tokens_signed_with_the_real_key_but_wrong_claims_get_401,
    |app: TestApp| async move {
        let token = admin_token(&app).await;
        let base = claims_of(&token);
        let signer = server_signer(&app);
        let now = app.clock.now().secs();

        // Control: a hand-made token with correct claims is accepted, so the refusals below
        // are about the one claim each changes.
        let good = signer
            .sign(&AccessClaims {
                jti: "hand-made".into(),
                ..base.clone()
            })
            .unwrap();
        let r = me(&app, &good).await;
        assert_eq!(r.status, 200, "{}", r.text);

        let cases: Vec<(&str, AccessClaims)> = vec![
            (
                "aud",
                AccessClaims {
                    aud: "someone-else".into(),
                    ..base.clone()
                },
            ),
            (
                "aud empty",
                AccessClaims {
                    aud: String::new(),
                    ..base.clone()
                },
            ),
            (
                "typ refresh",
                AccessClaims {
                    typ: "refresh".into(),
                    ..base.clone()
                },
            ),
            (
                "typ empty",
                AccessClaims {
                    typ: String::new(),
                    ..base.clone()
                },
            ),
            (
                "iss",
                AccessClaims {
                    iss: "https://evil.example".into(),
                    ..base.clone()
                },
            ),
            (
                "expired",
                AccessClaims {
                    iat: now - 3700,
                    exp: now - 100,
                    ..base.clone()
                },
            ),
            (
                "expires now",
                AccessClaims {
                    iat: now - 3600,
                    exp: now,
                    ..base.clone()
                },
            ),
            (
                "unknown session",
                AccessClaims {
                    sid: "ses_01aaaaaaaaaaaaaaaaaaaaaaaa".into(),
                    ..base.clone()
                },
            ),
            (
                "malformed session",
                AccessClaims {
                    sid: "nope".into(),
                    ..base.clone()
                },
            ),
            (
                "unknown user",
                AccessClaims {
                    sub: "usr_01aaaaaaaaaaaaaaaaaaaaaaaa".into(),
                    ..base.clone()
                },
            ),
        ];
        for (what, claims) in cases {
            let t = signer.sign(&claims).unwrap();
            let r = me(&app, &t).await;
            assert_eq!(r.status, 401, "{what}: {}", r.text);
            assert_unauthorized(&r);
        }

        // A token for another user's session (sub and sid from different users) is refused.
        let (_, _, viewer_login) = new_user(&app, "viewer").await;
        let viewer = claims_of(&s(&viewer_login["access_token"]));
        let mixed = signer
            .sign(&AccessClaims {
                sid: viewer.sid.clone(),
                ..base.clone()
            })
            .unwrap();
        assert_unauthorized(&me(&app, &mixed).await);

        // A well-formed token from a key the server does not know.
        let stranger = RsaTokenSigner::generate(nexplane::TOKEN_ISSUER.into()).unwrap();
        assert_unauthorized(&me(&app, &stranger.sign(&base).unwrap()).await);

        // The role in the token is not trusted: a viewer's token claiming `admin` stays a viewer.
        let raised = signer
            .sign(&AccessClaims {
                role: "admin".into(),
                jti: "raised".into(),
                ..viewer.clone()
            })
            .unwrap();
        let r = me(&app, &raised).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["role"], json!("viewer"));
        let r = app
        .post(
            "/users",
            &raised,
            json!({"email": "sneaky@example.com", "name": "x", "role": "admin", "password": USER_PASSWORD}),
        )
        .await;
        assert_eq!(r.assert_problem(403), "forbidden");
    }
);

both!(
    access_token_expires_after_one_hour_of_clock_time,
    |app: TestApp| async move {
        let (_, _, login) = new_user(&app, "viewer").await;
        let (access, _) = pair(&login);
        assert_eq!(me(&app, &access).await.status, 200);
        app.clock.advance_secs(3599);
        let r = me(&app, &access).await;
        assert_eq!(
            r.status, 200,
            "still valid one second before expiry: {}",
            r.text
        );
        app.clock.advance_secs(1);
        assert_unauthorized(&me(&app, &access).await);
        app.clock.advance_secs(3600);
        assert_unauthorized(&me(&app, &access).await);
        // An expired token cannot refresh either.
        assert_unauthorized(&refresh_by_access(&app, &access).await);
    }
);

// ---------------------------------------------------------------- refresh

both!(
    refresh_rotates_and_reuse_revokes_the_session,
    |app: TestApp| async move {
        let (_, email, login) = new_user(&app, "operator").await;
        let (a1, r1) = pair(&login);
        let sid = claims_of(&a1).sid;

        app.clock.advance_secs(60);
        let r = refresh(&app, &r1).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["token_type"], json!("bearer"));
        assert_eq!(r.body["expires_in"], json!(3600));
        assert_eq!(r.body["refresh_expires_in"], json!(12 * 3600 - 60));
        let (a2, r2) = pair(&r.body);
        assert_ne!(a2, a1);
        assert_ne!(r2, r1);
        let c2 = claims_of(&a2);
        assert_eq!(c2.sid, sid, "a refresh stays in the same session");
        assert_eq!(jwt_header(&a2)["alg"], json!("RS256"));
        let m = me(&app, &a2).await;
        assert_eq!(m.status, 200, "{}", m.text);
        assert_eq!(m.body["email"], json!(email));

        // Another session of the same user, which the reuse must not touch.
        let other = app.login_ok(&email, USER_PASSWORD).await;
        let (other_access, other_refresh) = pair(&other);

        // Reuse of the spent r1: refused, and the whole session dies at once.
        let reuse = refresh(&app, &r1).await;
        assert_unauthorized(&reuse);
        assert_unauthorized(&me(&app, &a2).await);
        assert_unauthorized(&me(&app, &a1).await);
        assert_unauthorized(&refresh(&app, &r2).await);
        assert_unauthorized(&refresh_by_access(&app, &a2).await);
        assert_eq!(me(&app, &other_access).await.status, 200);

        let events = audit_events(&app, &app.admin_token, "auth.refresh_reuse_detected").await;
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0]["resource_type"], json!("session"));
        assert_eq!(events[0]["resource_id"], json!(sid));
        assert_eq!(events[0]["actor"], json!(email));
        let text = events[0].to_string();
        for secret in [&r1, &r2, &a1, &a2] {
            assert!(
                !text.contains(secret.as_str()),
                "audit holds a token: {text}"
            );
        }

        // The other session still refreshes normally.
        let r = refresh(&app, &other_refresh).await;
        assert_eq!(r.status, 200, "{}", r.text);

        // Garbage and malformed refresh requests.
        assert_unauthorized(&refresh(&app, "not-a-refresh-token").await);
        assert_unauthorized(&refresh(&app, "").await);
        for (body, status) in [
            ("{", 400),
            ("{}", 422),
            ("{\"refresh_token\": 5}", 422),
            ("{\"refresh_token\": \"x\", \"extra\": 1}", 422),
        ] {
            let r = app
                .raw(
                    Method::POST,
                    "/auth/refresh",
                    None,
                    "application/json",
                    body.into(),
                )
                .await;
            r.assert_problem(status);
        }
    }
);

both!(
    concurrent_refreshes_with_one_token_issue_at_most_one_pair,
    |app: TestApp| async move {
        let (_, _, login) = new_user(&app, "viewer").await;
        let (_, r1) = pair(&login);
        let app = std::sync::Arc::new(app);
        let tasks: Vec<_> = (0..5)
            .map(|_| {
                let app = app.clone();
                let r1 = r1.clone();
                tokio::spawn(async move { refresh(&app, &r1).await })
            })
            .collect();
        let mut issued = Vec::new();
        for t in tasks {
            let r = t.await.unwrap();
            match r.status.as_u16() {
                200 => issued.push(r.body),
                401 => assert_unauthorized(&r),
                other => panic!("unexpected {other}: {}", r.text),
            }
        }
        assert_eq!(
            issued.len(),
            1,
            "one refresh token must be spent exactly once"
        );
        // The others were reuse: the session is revoked, including the pair that was issued.
        let (a, r) = pair(&issued[0]);
        assert_unauthorized(&me(&app, &a).await);
        assert_unauthorized(&refresh(&app, &r).await);
    }
);

both!(
    refresh_without_body_uses_the_bearer_access_token,
    |app: TestApp| async move {
        let (_, _, login) = new_user(&app, "approver").await;
        let (a1, r1) = pair(&login);
        app.clock.advance_secs(600);
        let r = refresh_by_access(&app, &a1).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["token_type"], json!("bearer"));
        assert_eq!(r.body["expires_in"], json!(3600));
        assert_eq!(r.body["refresh_expires_in"], json!(12 * 3600 - 600));
        let (a2, r2) = pair(&r.body);
        assert_ne!(a2, a1);
        assert_eq!(claims_of(&a2).sid, claims_of(&a1).sid);
        assert_eq!(claims_of(&a2).exp, app.clock.now().secs() + 3600);
        assert_eq!(me(&app, &a2).await.status, 200);
        // The refresh token it issued works (once).
        let r = refresh(&app, &r2).await;
        assert_eq!(r.status, 200, "{}", r.text);
        // The original refresh token was not spent by the bearer refresh.
        let r = refresh(&app, &r1).await;
        assert_eq!(r.status, 200, "{}", r.text);

        // No body and no bearer token, or a bad one: 401.
        assert_unauthorized(&app.req(Method::POST, "/auth/refresh", None, None).await);
        assert_unauthorized(&refresh_by_access(&app, "garbage").await);
    }
);

both!(
    refresh_stops_at_the_absolute_session_lifetime,
    |app: TestApp| async move {
        let (_, _, login) = new_user(&app, "viewer").await;
        let (_, mut rt) = pair(&login);
        // Keep the session alive by refreshing every 50 minutes (access tokens die after 1 h).
        let mut elapsed = 0;
        while elapsed + 3000 < 12 * 3600 - 60 {
            app.clock.advance_secs(3000);
            elapsed += 3000;
            let r = refresh(&app, &rt).await;
            assert_eq!(r.status, 200, "at {elapsed} s: {}", r.text);
            assert_eq!(r.body["refresh_expires_in"], json!(12 * 3600 - elapsed));
            rt = s(&r.body["refresh_token"]);
        }
        // One minute before the end: a refresh still works but cannot outlive the session.
        app.clock.advance_secs(12 * 3600 - 60 - elapsed);
        let r = refresh(&app, &rt).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["refresh_expires_in"], json!(60));
        let expires_in = r.body["expires_in"].as_i64().unwrap();
        assert!(
            expires_in <= 60,
            "access token outlives its session: {expires_in}"
        );
        let (last_access, last_refresh) = pair(&r.body);
        assert_eq!(me(&app, &last_access).await.status, 200);

        app.clock.advance_secs(60);
        assert_unauthorized(&refresh(&app, &last_refresh).await);
        assert_unauthorized(&me(&app, &last_access).await);
        assert_unauthorized(&refresh_by_access(&app, &last_access).await);
    }
);

both!(
    session_lifetime_is_absolute_even_for_a_fresh_refresh_token,
    |app: TestApp| async move {
        // The limit reached in one step by a never-used refresh token. Two sessions, one
        // second apart: at the end of the first, the second still refreshes.
        let (_, email, login) = new_user(&app, "viewer").await;
        let (_, first) = pair(&login);
        app.clock.advance_secs(1);
        let (_, second) = pair(&app.login_ok(&email, USER_PASSWORD).await);
        app.clock.advance_secs(12 * 3600 - 1);
        assert_unauthorized(&refresh(&app, &first).await);
        let r = refresh(&app, &second).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body["refresh_expires_in"], json!(1));
    }
);

// ---------------------------------------------------------------- logout

both!(
    logout_revokes_the_session_at_once,
    |app: TestApp| async move {
        let (user_id, email, login) = new_user(&app, "operator").await;
        let (access, rt) = pair(&login);
        let sid = claims_of(&access).sid;
        let second = app.login_ok(&email, USER_PASSWORD).await;
        let (second_access, second_refresh) = pair(&second);

        // Used many times first, so the verified token sits in the cache.
        for _ in 0..20 {
            let r = me(&app, &access).await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
        let r = logout(&app, &access).await;
        assert_eq!(r.status, 204, "{}", r.text);
        assert!(r.text.is_empty(), "204 with a body: {}", r.text);

        assert_unauthorized(&me(&app, &access).await);
        assert_unauthorized(&logout(&app, &access).await);
        assert_unauthorized(&refresh(&app, &rt).await);
        assert_unauthorized(&refresh_by_access(&app, &access).await);
        assert_unauthorized(&app.get("/users", &access).await);

        // Only that session ended.
        assert_eq!(me(&app, &second_access).await.status, 200);
        let r = refresh(&app, &second_refresh).await;
        assert_eq!(r.status, 200, "{}", r.text);

        let events = audit_events(&app, &app.admin_token, "auth.logout").await;
        let ours: Vec<_> = events
            .iter()
            .filter(|e| e["resource_id"] == json!(sid))
            .collect();
        assert_eq!(ours.len(), 1, "{events:?}");
        assert_eq!(ours[0]["actor"], json!(email));
        assert_eq!(ours[0]["actor_id"], json!(user_id));
        assert_eq!(ours[0]["resource_type"], json!("session"));
        let text = ours[0].to_string();
        assert!(!text.contains(&access) && !text.contains(&rt), "{text}");

        // Logging out needs a token.
        assert_unauthorized(&app.req(Method::POST, "/auth/logout", None, None).await);
    }
);

both!(
    cached_token_is_still_revoked_at_once_by_a_spent_refresh_reuse,
    |app: TestApp| async move {
        let (_, _, login) = new_user(&app, "viewer").await;
        let (access, rt) = pair(&login);
        let r = refresh(&app, &rt).await;
        assert_eq!(r.status, 200, "{}", r.text);
        for _ in 0..20 {
            assert_eq!(me(&app, &access).await.status, 200);
        }
        assert_unauthorized(&refresh(&app, &rt).await);
        assert_unauthorized(&me(&app, &access).await);
    }
);

// ---------------------------------------------------------------- users: disable, role

both!(
    a_disabled_users_tokens_stop_at_once,
    |app: TestApp| async move {
        // Disabled with PUT.
        let (id, email, login) = new_user(&app, "operator").await;
        let (access, rt) = pair(&login);
        for _ in 0..10 {
            assert_eq!(me(&app, &access).await.status, 200);
        }
        let r = app
            .put(
                &format!("/users/{id}"),
                &app.admin_token,
                json!({"disabled": true}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_unauthorized(&me(&app, &access).await);
        assert_unauthorized(&refresh_by_access(&app, &access).await);
        assert_unauthorized(&refresh(&app, &rt).await);
        // Logging in again is refused, with the same answer as a wrong password.
        let r = app.login(&email, USER_PASSWORD).await;
        assert_unauthorized(&r);
        let unknown = app.login("nobody-at-all@example.com", USER_PASSWORD).await;
        assert_eq!(
            without_request_fields(&r.body),
            without_request_fields(&unknown.body)
        );

        // Disabled with DELETE.
        let (id, _, login) = new_user(&app, "viewer").await;
        let (access, rt) = pair(&login);
        for _ in 0..10 {
            assert_eq!(me(&app, &access).await.status, 200);
        }
        let r = app.delete(&format!("/users/{id}"), &app.admin_token).await;
        assert_eq!(r.status, 204, "{}", r.text);
        assert_unauthorized(&me(&app, &access).await);
        assert_unauthorized(&refresh(&app, &rt).await);
    }
);

both!(
    a_role_change_applies_to_existing_tokens_at_once,
    |app: TestApp| async move {
        let (id, _, login) = new_user(&app, "viewer").await;
        let (access, _) = pair(&login);
        let new_user_body = |n: u32| json!({"email": format!("made{n}@example.com"), "name": "made", "role": "viewer", "password": USER_PASSWORD});
        let r = app.post("/users", &access, new_user_body(1)).await;
        assert_eq!(r.assert_problem(403), "forbidden");

        let r = app
            .put(
                &format!("/users/{id}"),
                &app.admin_token,
                json!({"role": "admin"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        // The same token (role `viewer` in its claims) now acts as an admin.
        let r = me(&app, &access).await;
        assert_eq!(r.body["role"], json!("admin"), "{}", r.text);
        let r = app.post("/users", &access, new_user_body(2)).await;
        assert_eq!(r.status, 201, "{}", r.text);

        let r = app
            .put(
                &format!("/users/{id}"),
                &app.admin_token,
                json!({"role": "viewer"}),
            )
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let r = app.post("/users", &access, new_user_body(3)).await;
        assert_eq!(r.assert_problem(403), "forbidden");
        assert_eq!(me(&app, &access).await.body["role"], json!("viewer"));
    }
);

// ---------------------------------------------------------------- brute force

both!(
    a_failed_login_locks_the_account_for_a_second,
    |app: TestApp| async move {
        let (_, email, _) = new_user(&app, "viewer").await;
        assert_unauthorized(&app.login(&email, "wrong-password-one").await);
        // Even the right password is refused while locked, and so is a wrong one.
        let r = app.login(&email, USER_PASSWORD).await;
        assert_eq!(assert_limited(&r), 1);
        assert_eq!(r.body["code"], json!("rate_limited"));
        assert!(!r.text.contains("access_token"));
        assert_limited(&app.login(&email, "wrong-password-two").await);
        // Other accounts are not affected.
        assert_eq!(app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await.status, 200);
        app.clock.advance_millis(999);
        assert_limited(&app.login(&email, USER_PASSWORD).await);
        app.clock.advance_millis(1);
        let r = app.login(&email, USER_PASSWORD).await;
        assert_eq!(r.status, 200, "{}", r.text);

        // The failures were audited, without the password.
        let events = audit_events(&app, &app.admin_token, "auth.login_failed").await;
        let ours: Vec<_> = events
            .iter()
            .filter(|e| e["payload"]["email"] == json!(email))
            .collect();
        assert_eq!(
            ours.len(),
            1,
            "only the attempt that reached the check: {events:?}"
        );
        let e = ours[0];
        assert_eq!(e["payload"]["reason"], json!("wrong_password"));
        assert!(e["payload"].get("password").is_none(), "{e}");
        let text = serde_json::to_string(&events).unwrap();
        for secret in ["wrong-password-one", "wrong-password-two", USER_PASSWORD] {
            assert!(!text.contains(secret), "audit holds a password: {text}");
        }
        // An unknown email is audited too.
        assert_unauthorized(&app.login("who@example.com", "guess-password-3").await);
        let events = audit_events(&app, &app.admin_token, "auth.login_failed").await;
        let unknown: Vec<_> = events
            .iter()
            .filter(|e| e["payload"]["email"] == json!("who@example.com"))
            .collect();
        assert_eq!(unknown.len(), 1);
        assert!(!unknown[0].to_string().contains("guess-password-3"));
    }
);

both!(
    the_lock_ladder_is_1_3_5_10_seconds_and_success_resets_it,
    |app: TestApp| async move {
        let (_, email, _) = new_user(&app, "viewer").await;
        for (i, lock) in [1i64, 3, 5, 10, 10].into_iter().enumerate() {
            let wrong = format!("wrong-password-{i}");
            assert_unauthorized(&app.login(&email, &wrong).await);
            let r = app.login(&email, USER_PASSWORD).await;
            assert_eq!(
                assert_limited(&r),
                lock as u64,
                "failure {}: {}",
                i + 1,
                r.text
            );
            // Still locked one millisecond before the end.
            app.clock.advance_millis(lock * 1000 - 1);
            let r = app.login(&email, USER_PASSWORD).await;
            assert_eq!(assert_limited(&r), 1, "failure {}", i + 1);
            app.clock.advance_millis(1);
        }
        // Unlocked: the right password works and resets the ladder.
        let r = app.login(&email, USER_PASSWORD).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_unauthorized(&app.login(&email, "wrong-again").await);
        assert_eq!(assert_limited(&app.login(&email, USER_PASSWORD).await), 1);
        app.clock.advance_secs(1);
        assert_eq!(app.login(&email, USER_PASSWORD).await.status, 200);
    }
);

both!(
    login_is_limited_per_client_ip,
    vec![("NEXPLANE_LOGIN_RATE_LIMIT_PER_MINUTE", "3".to_owned())],
    |app: TestApp| async move {
        // The harness logged the admin in once already. Each attempt comes on a new
        // connection, as separate clients would (whichever worker takes it).
        let attempt = |password: &'static str| {
            let app = &app;
            async move {
                let client = reqwest::Client::new();
                let r = client
                    .post(app.url("/auth/login"))
                    // A different unknown email each time, so only the IP limit can refuse.
                    .json(
                        &json!({"email": format!("{password}@example.com"), "password": password}),
                    )
                    .send()
                    .await
                    .unwrap();
                TestApp::finish(r).await
            }
        };
        assert_unauthorized(&attempt("guess-1").await);
        assert_unauthorized(&attempt("guess-2").await);
        let r = attempt("guess-3").await;
        assert_eq!(
            r.status, 429,
            "the 4th login from one IP within the minute must be limited (limit 3, counted \
             once for the whole server, whichever worker serves the connection): {}",
            r.text
        );
        assert_limited(&r);
        assert_eq!(r.body["code"], json!("rate_limited"));
        // A correct password is limited as well.
        let r = app.login(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        assert_limited(&r);
        for _ in 0..5 {
            assert_limited(&attempt("guess-4").await);
        }
        // Only logins are limited: authenticated requests go on.
        assert_eq!(me(&app, &app.admin_token).await.status, 200);
    }
);

// ---------------------------------------------------------------- no secret leaks

/// Collects every response text of a test.
#[derive(Default)]
struct Seen(Vec<String>);

impl Seen {
    fn keep(&mut self, r: Resp) -> Resp {
        self.0.push(r.text.clone());
        r
    }
}

both!(
    no_response_or_audit_event_holds_a_password_or_refresh_token,
    |app: TestApp| async move {
        let mut seen = Seen::default();
        let (id, email, _) = new_user(&app, "operator").await;
        let new_password = "brand-new-password-42";
        let wrong_passwords = ["wrong-password-alpha", "wrong-password-beta"];
        // Refresh tokens and the index of the one response that issued each.
        let mut refresh_tokens: Vec<(String, usize)> = Vec::new();

        let issue = |seen: &mut Seen, refresh_tokens: &mut Vec<(String, usize)>, r: Resp| {
            assert_eq!(r.status, 200, "{}", r.text);
            refresh_tokens.push((s(&r.body["refresh_token"]), seen.0.len()));
            seen.keep(r)
        };

        let login = issue(
            &mut seen,
            &mut refresh_tokens,
            app.login(&email, USER_PASSWORD).await,
        );
        let (access, rt1) = pair(&login.body);
        seen.keep(app.login(&email, wrong_passwords[0]).await);
        seen.keep(app.login(&email, wrong_passwords[1]).await); // locked
        seen.keep(app.login("nobody@example.com", wrong_passwords[0]).await);
        seen.keep(
            app.raw(
                Method::POST,
                "/auth/login",
                None,
                "application/json",
                json!({"email": email, "password": USER_PASSWORD, "oops": 1})
                    .to_string()
                    .into_bytes(),
            )
            .await,
        );
        app.clock.advance_secs(1);
        let r2 = issue(&mut seen, &mut refresh_tokens, refresh(&app, &rt1).await);
        let (access2, rt2) = pair(&r2.body);
        let r3 = issue(
            &mut seen,
            &mut refresh_tokens,
            refresh_by_access(&app, &access2).await,
        );
        let (access3, rt3) = pair(&r3.body);
        seen.keep(refresh(&app, &rt1).await); // reuse: revokes the session
        seen.keep(refresh(&app, &rt3).await);
        seen.keep(
            app.raw(
                Method::POST,
                "/auth/refresh",
                None,
                "application/json",
                format!("{{\"refresh_token\": \"{rt2}\", \"oops\": 1}}").into_bytes(),
            )
            .await,
        );
        seen.keep(me(&app, &access).await);
        seen.keep(me(&app, &access3).await);

        let login = issue(
            &mut seen,
            &mut refresh_tokens,
            app.login(&email, USER_PASSWORD).await,
        );
        let (access4, _) = pair(&login.body);
        let r = seen.keep(
            app.post(
                &format!("/users/{id}/password"),
                &access4,
                json!({"current_password": USER_PASSWORD, "new_password": new_password}),
            )
            .await,
        );
        assert_eq!(r.status, 204, "{}", r.text);
        seen.keep(
            app.post(
                &format!("/users/{id}/password"),
                &access4,
                json!({"current_password": wrong_passwords[0], "new_password": "short"}),
            )
            .await,
        );
        let login = issue(
            &mut seen,
            &mut refresh_tokens,
            app.login(&email, new_password).await,
        );
        let (access5, _) = pair(&login.body);
        seen.keep(logout(&app, &access5).await);
        seen.keep(me(&app, &app.admin_token).await);
        seen.keep(app.get("/users?limit=500", &app.admin_token).await);
        seen.keep(app.get(&format!("/users/{id}"), &app.admin_token).await);
        let audit = seen.keep(app.get("/audit?limit=500", &app.admin_token).await);
        assert_eq!(audit.status, 200, "{}", audit.text);
        let types: Vec<&str> = audit
            .body
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|e| e["event_type"].as_str())
            .collect();
        for t in [
            "auth.login",
            "auth.login_failed",
            "auth.refresh_reuse_detected",
            "auth.logout",
        ] {
            assert!(types.contains(&t), "no {t} in the audit log: {types:?}");
        }

        let passwords = [
            USER_PASSWORD,
            ADMIN_PASSWORD,
            new_password,
            wrong_passwords[0],
            wrong_passwords[1],
        ];
        for (i, text) in seen.0.iter().enumerate() {
            for p in passwords {
                assert!(!text.contains(p), "response {i} holds a password: {text}");
            }
            for (token, issued_by) in &refresh_tokens {
                assert!(
                    i == *issued_by || !text.contains(token.as_str()),
                    "response {i} holds a refresh token issued by response {issued_by}: {text}"
                );
            }
        }
        for token in [&access, &access2, &access3, &access4, &access5] {
            assert!(
                !audit.text.contains(token.as_str()),
                "the audit log holds an access token"
            );
        }
        // Nor did any log line of the servers in this test run carry one.
        let logs = captured_logs();
        assert!(
            logs.contains("auth.") || logs.contains("request"),
            "no logs captured"
        );
        for p in passwords {
            assert!(!logs.contains(p), "a password reached the log");
        }
        for t in refresh_tokens
            .iter()
            .map(|(t, _)| t.as_str())
            .chain([&access, &access2, &access3, &access4, &access5].map(|t| t.as_str()))
        {
            assert!(!logs.contains(t), "a token reached the log");
        }
    }
);

both!(
    an_unknown_email_is_locked_like_an_account_so_429_reveals_nothing,
    |app: TestApp| async move {
        let (_, email, _) = new_user(&app, "viewer").await;
        let ghost = "nobody-here@example.com";
        for who in [email.as_str(), ghost] {
            assert_unauthorized(&app.login(who, "wrong-password-one").await);
        }
        // Both are now locked for one second, with the same answer.
        let real = app.login(&email, "wrong-password-two").await;
        let fake = app.login(ghost, "wrong-password-two").await;
        assert_eq!(assert_limited(&real), 1);
        assert_eq!(assert_limited(&fake), 1);
        assert_eq!(real.body["detail"], fake.body["detail"]);
        // And both climb the same ladder once the lock has passed.
        app.clock.advance_secs(1);
        for who in [email.as_str(), ghost] {
            assert_unauthorized(&app.login(who, "wrong-password-three").await);
        }
        app.clock.advance_secs(2);
        assert_limited(&app.login(&email, USER_PASSWORD).await);
        assert_limited(&app.login(ghost, "wrong-password-four").await);
        app.clock.advance_secs(1);
        assert_eq!(app.login(&email, USER_PASSWORD).await.status, 200);
        assert_unauthorized(&app.login(ghost, "wrong-password-five").await);
    }
);

both!(
    a_rotated_out_signing_key_keeps_verifying_until_its_tokens_expire,
    |mut app: TestApp| async move {
        use nexplane_ports::Clock;
        let old_token = app.admin_token.clone();
        let old_kid = s(&jwt_header(&old_token)["kid"]);
        let (was, new_kid) = nexplane::rotate_jwt_key(&app.config(), app.clock.now()).unwrap();
        assert_eq!(was, old_kid);
        assert_ne!(new_kid, old_kid);
        app.restart().await;

        // New tokens are signed with the new key; the old token still works.
        assert_eq!(s(&jwt_header(&app.admin_token)["kid"]), new_kid);
        assert_eq!(me(&app, &old_token).await.status, 200);
        let jwks = app
            .req(reqwest::Method::GET, "/.well-known/jwks.json", None, None)
            .await;
        let kids: Vec<String> = jwks.body["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| s(&k["kid"]))
            .collect();
        assert!(
            kids.contains(&old_kid) && kids.contains(&new_kid),
            "{kids:?}"
        );

        // Once every token of the old key has expired, the key is gone from verification.
        app.clock.advance_secs(3600 + 61);
        assert_eq!(me(&app, &old_token).await.status, 401);
        let fresh = app.login_ok(ADMIN_EMAIL, ADMIN_PASSWORD).await;
        assert_eq!(
            me(&app, fresh["access_token"].as_str().unwrap())
                .await
                .status,
            200
        );
    }
);
