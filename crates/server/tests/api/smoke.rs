use crate::both;
use crate::harness::*;
use serde_json::json;

both!(login_then_me, |app: TestApp| async move {
    let r = app.get("/auth/me", &app.admin_token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["email"], json!(ADMIN_EMAIL));
    assert_eq!(r.body["role"], json!("admin"));
    assert!(r.header("x-request-id").is_some());
    assert!(r.header("x-ratelimit-limit").is_some());
});
