//! The IAM change types: access keys (rotate, deactivate, delete), the `NexplaneLock` inline
//! policy (lock, unlock) and managed policy attachments.

use super::{has_code, outcome, provider, provider_message, refused, Env, Fields, Side};
use crate::discover::{access_keys, next_page};
use crate::error::FailureKind;
use nexplane_domain::SecretString;
use nexplane_ports::cloud::{ChangeError, StepOutcome};
use rusoto_iam::{
    AttachUserPolicyRequest, CreateAccessKeyRequest, DeleteAccessKeyRequest,
    DeleteUserPolicyRequest, DetachUserPolicyRequest, GetPolicyRequest, GetUserPolicyRequest,
    GetUserRequest, Iam, ListAttachedUserPoliciesRequest, PutUserPolicyRequest,
    UpdateAccessKeyRequest,
};
use serde_json::{json, Map, Value};

/// The name of the inline policy `lock_iam_user` puts on a user.
pub const LOCK_POLICY_NAME: &str = "NexplaneLock";
/// The document of [`LOCK_POLICY_NAME`]: deny everything.
pub const LOCK_POLICY_DOCUMENT: &str =
    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Deny","Action":"*","Resource":"*"}]}"#;

/// Access key statuses.
pub(super) const ACTIVE: &str = "Active";
pub(super) const INACTIVE: &str = "Inactive";
/// Access keys AWS allows per user.
const MAX_KEYS: usize = 2;
const NO_SUCH_ENTITY: &[&str] = &["NoSuchEntity"];

/// One access key of a user.
#[derive(Debug, Clone)]
struct Key {
    id: String,
    status: String,
}

fn no_user(user: &str) -> ChangeError {
    refused(format!("IAM user {user} does not exist"))
}

fn list(ids: &[String]) -> String {
    if ids.is_empty() {
        "none".to_string()
    } else {
        ids.join(", ")
    }
}

fn ids(keys: &[Key]) -> Vec<String> {
    keys.iter().map(|k| k.id.clone()).collect()
}

// ---------------------------------------------------------------------------------------------
// Reading and writing IAM (every call through the session's `call`)

/// The user's access keys; `None` when the user does not exist.
async fn keys_of(env: &Env<'_>, user: &str) -> Result<Option<Vec<Key>>, ChangeError> {
    let iam = env.session.iam();
    let keys = access_keys(env.session, &iam, user)
        .await
        .map_err(|e| provider(e, &format!("ListAccessKeys for IAM user {user}")))?;
    Ok(keys.map(|keys| {
        keys.into_iter()
            .filter_map(|k| {
                Some(Key {
                    id: k.access_key_id?,
                    status: k.status.unwrap_or_default(),
                })
            })
            .collect()
    }))
}

/// The user's access keys; refused when the user does not exist.
async fn user_keys(env: &Env<'_>, user: &str) -> Result<Vec<Key>, ChangeError> {
    keys_of(env, user).await?.ok_or_else(|| no_user(user))
}

async fn require_user(env: &Env<'_>, user: &str) -> Result<(), ChangeError> {
    let iam = env.session.iam();
    let request = GetUserRequest {
        user_name: Some(user.to_string()),
    };
    match env
        .session
        .call("IAM", env.home_region(), || iam.get_user(request.clone()))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Err(no_user(user)),
        Err(e) => Err(provider(e, &format!("GetUser {user}"))),
    }
}

/// Sets a key's status; `false` when the key (or its user) does not exist.
async fn update_key(
    env: &Env<'_>,
    user: &str,
    key: &str,
    status: &str,
) -> Result<bool, ChangeError> {
    let iam = env.session.iam();
    let request = UpdateAccessKeyRequest {
        access_key_id: key.to_string(),
        status: status.to_string(),
        user_name: Some(user.to_string()),
    };
    match env
        .session
        .call("IAM", env.home_region(), || {
            iam.update_access_key(request.clone())
        })
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Ok(false),
        Err(e) => Err(provider(
            e,
            &format!("UpdateAccessKey {key} of IAM user {user} to {status}"),
        )),
    }
}

/// Deletes a key; `false` when it (or its user) does not exist.
async fn delete_key(env: &Env<'_>, user: &str, key: &str) -> Result<bool, ChangeError> {
    let iam = env.session.iam();
    let request = DeleteAccessKeyRequest {
        access_key_id: key.to_string(),
        user_name: Some(user.to_string()),
    };
    match env
        .session
        .call("IAM", env.home_region(), || {
            iam.delete_access_key(request.clone())
        })
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Ok(false),
        Err(e) => Err(provider(
            e,
            &format!("DeleteAccessKey {key} of IAM user {user}"),
        )),
    }
}

/// What setting a key's status came to.
enum StatusChange {
    Changed,
    Already,
    Missing,
}

/// Looks at the key first and sets its status only when it differs.
async fn ensure_status(
    env: &Env<'_>,
    user: &str,
    key: &str,
    status: &str,
) -> Result<StatusChange, ChangeError> {
    let keys = user_keys(env, user).await?;
    match keys.iter().find(|k| k.id == key) {
        None => Ok(StatusChange::Missing),
        Some(k) if k.status == status => Ok(StatusChange::Already),
        Some(_) => Ok(if update_key(env, user, key, status).await? {
            StatusChange::Changed
        } else {
            StatusChange::Missing
        }),
    }
}

/// AWS hands policy documents back URL-encoded (RFC 3986); some emulators do not.
fn decode_policy_document(document: &str) -> String {
    if serde_json::from_str::<Value>(document).is_ok() {
        return document.to_string();
    }
    let bytes = document.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
        {
            let hex = &document[i + 1..i + 3];
            if let Ok(byte) = u8::from_str_radix(hex, 16) {
                out.push(byte);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether two policy documents say the same (as JSON, whatever the spacing).
fn same_document(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<Value>(a),
        serde_json::from_str::<Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a.trim() == b.trim(),
    }
}

/// The `NexplaneLock` document of a user, decoded; `None` when the user has no such policy
/// (or does not exist).
async fn lock_policy(env: &Env<'_>, user: &str) -> Result<Option<String>, ChangeError> {
    let iam = env.session.iam();
    let request = GetUserPolicyRequest {
        policy_name: LOCK_POLICY_NAME.to_string(),
        user_name: user.to_string(),
    };
    match env
        .session
        .call("IAM", env.home_region(), || {
            iam.get_user_policy(request.clone())
        })
        .await
    {
        Ok(answer) => Ok(Some(decode_policy_document(&answer.policy_document))),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Ok(None),
        Err(e) => Err(provider(
            e,
            &format!("GetUserPolicy {LOCK_POLICY_NAME} of IAM user {user}"),
        )),
    }
}

async fn put_lock_policy(env: &Env<'_>, user: &str, document: &str) -> Result<(), ChangeError> {
    let iam = env.session.iam();
    let request = PutUserPolicyRequest {
        policy_document: document.to_string(),
        policy_name: LOCK_POLICY_NAME.to_string(),
        user_name: user.to_string(),
    };
    match env
        .session
        .call("IAM", env.home_region(), || {
            iam.put_user_policy(request.clone())
        })
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Err(no_user(user)),
        Err(e) => Err(provider(
            e,
            &format!("PutUserPolicy {LOCK_POLICY_NAME} on IAM user {user}"),
        )),
    }
}

/// Deletes `NexplaneLock`; `false` when it was not there.
async fn delete_lock_policy(env: &Env<'_>, user: &str) -> Result<bool, ChangeError> {
    let iam = env.session.iam();
    let request = DeleteUserPolicyRequest {
        policy_name: LOCK_POLICY_NAME.to_string(),
        user_name: user.to_string(),
    };
    match env
        .session
        .call("IAM", env.home_region(), || {
            iam.delete_user_policy(request.clone())
        })
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Ok(false),
        Err(e) => Err(provider(
            e,
            &format!("DeleteUserPolicy {LOCK_POLICY_NAME} of IAM user {user}"),
        )),
    }
}

/// The ARNs of the managed policies attached to a user (every page).
async fn attached_policies(env: &Env<'_>, user: &str) -> Result<Vec<String>, ChangeError> {
    let iam = env.session.iam();
    let what = format!("ListAttachedUserPolicies for IAM user {user}");
    let mut arns = Vec::new();
    let mut marker = None;
    for pages in 1.. {
        let request = ListAttachedUserPoliciesRequest {
            marker: marker.clone(),
            max_items: Some(1000),
            path_prefix: None,
            user_name: user.to_string(),
        };
        let page = match env
            .session
            .call("IAM", env.home_region(), || {
                iam.list_attached_user_policies(request.clone())
            })
            .await
        {
            Ok(page) => page,
            Err(e) if has_code(&e, NO_SUCH_ENTITY) => return Err(no_user(user)),
            Err(e) => return Err(provider(e, &what)),
        };
        arns.extend(
            page.attached_policies
                .unwrap_or_default()
                .into_iter()
                .filter_map(|p| p.policy_arn),
        );
        marker = next_page(
            page.is_truncated.unwrap_or(false),
            page.marker,
            &marker,
            pages,
            "ListAttachedUserPolicies",
        )
        .map_err(|e| provider(e, &what))?;
        if marker.is_none() {
            break;
        }
    }
    Ok(arns)
}

async fn require_policy(env: &Env<'_>, arn: &str) -> Result<(), ChangeError> {
    let iam = env.session.iam();
    let request = GetPolicyRequest {
        policy_arn: arn.to_string(),
    };
    match env
        .session
        .call("IAM", env.home_region(), || iam.get_policy(request.clone()))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => {
            Err(refused(format!("IAM policy {arn} does not exist")))
        }
        Err(e) => Err(provider(e, &format!("GetPolicy {arn}"))),
    }
}

async fn attach_policy(env: &Env<'_>, user: &str, arn: &str) -> Result<(), ChangeError> {
    let iam = env.session.iam();
    let request = AttachUserPolicyRequest {
        policy_arn: arn.to_string(),
        user_name: user.to_string(),
    };
    match env
        .session
        .call("IAM", env.home_region(), || {
            iam.attach_user_policy(request.clone())
        })
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Err(refused(format!(
            "cannot attach policy {arn} to IAM user {user}: {}",
            e.message
        ))),
        Err(e) => Err(provider(
            e,
            &format!("AttachUserPolicy {arn} to IAM user {user}"),
        )),
    }
}

/// Detaches a policy; `false` when it was not attached.
async fn detach_policy(env: &Env<'_>, user: &str, arn: &str) -> Result<bool, ChangeError> {
    let iam = env.session.iam();
    let request = DetachUserPolicyRequest {
        policy_arn: arn.to_string(),
        user_name: user.to_string(),
    };
    match env
        .session
        .call("IAM", env.home_region(), || {
            iam.detach_user_policy(request.clone())
        })
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => Ok(false),
        Err(e) => Err(provider(
            e,
            &format!("DetachUserPolicy {arn} from IAM user {user}"),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Prechecks

/// rotate_iam_access_key: the user exists, the key to replace is one of its keys (the only
/// one when none is named) and a slot is free for the new key.
pub(super) async fn precheck_rotate(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<Map<String, Value>, ChangeError> {
    let user = t.str("iam_user")?;
    let keys = user_keys(env, user).await?;
    let all = ids(&keys);
    let old = match t.opt_str("access_key_id") {
        Some(id) => keys.iter().find(|k| k.id == id).ok_or_else(|| {
            refused(format!(
                "access key {id} is not a key of IAM user {user} (its keys: {})",
                list(&all)
            ))
        })?,
        None => match keys.as_slice() {
            [] => {
                return Err(refused(format!(
                    "IAM user {user} has no access key to rotate"
                )))
            }
            [only] => only,
            _ => {
                return Err(refused(format!(
                    "IAM user {user} has {} access keys ({}): set access_key_id to the key to \
                     replace (and delete the other one first: AWS allows {MAX_KEYS} keys per \
                     user, so no slot is free for a new key)",
                    keys.len(),
                    list(&all)
                )))
            }
        },
    };
    if keys.len() >= MAX_KEYS {
        let others: Vec<String> = all.iter().filter(|id| **id != old.id).cloned().collect();
        return Err(refused(format!(
            "IAM user {user} already has {} access keys, the most AWS allows: no slot is free \
             for the new key (delete {} first)",
            keys.len(),
            list(&others)
        )));
    }
    let mut context = Map::new();
    context.insert("old_access_key_id".into(), json!(old.id));
    context.insert("old_key_status".into(), json!(old.status));
    context.insert("keys_before".into(), json!(all));
    Ok(context)
}

/// The named key of the named user, refused when either does not exist.
async fn target_key(env: &Env<'_>, t: Fields<'_>) -> Result<Key, ChangeError> {
    let user = t.str("iam_user")?;
    let key = t.str("access_key_id")?;
    let keys = user_keys(env, user).await?;
    keys.into_iter().find(|k| k.id == key).ok_or_else(|| {
        refused(format!(
            "access key {key} does not exist for IAM user {user}"
        ))
    })
}

/// deactivate_iam_access_key: the key exists for the user and is Active.
pub(super) async fn precheck_deactivate(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<Map<String, Value>, ChangeError> {
    let key = target_key(env, t).await?;
    if key.status != ACTIVE {
        return Err(refused(format!(
            "access key {} of IAM user {} is already {}",
            key.id,
            t.str("iam_user")?,
            key.status
        )));
    }
    let mut context = Map::new();
    context.insert("access_key_id".into(), json!(key.id));
    context.insert("previous_status".into(), json!(key.status));
    Ok(context)
}

/// delete_iam_access_key: the key exists for the user and is already Inactive.
pub(super) async fn precheck_delete(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<Map<String, Value>, ChangeError> {
    let key = target_key(env, t).await?;
    if key.status != INACTIVE {
        return Err(refused(format!(
            "access key {} of IAM user {} is still {}; deactivate it first",
            key.id,
            t.str("iam_user")?,
            key.status
        )));
    }
    let mut context = Map::new();
    context.insert("access_key_id".into(), json!(key.id));
    context.insert("previous_status".into(), json!(key.status));
    Ok(context)
}

/// lock_iam_user: the user exists and is not locked yet; records its Active keys.
pub(super) async fn precheck_lock(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<Map<String, Value>, ChangeError> {
    let user = t.str("iam_user")?;
    let keys = user_keys(env, user).await?;
    if lock_policy(env, user).await?.is_some() {
        return Err(refused(format!(
            "IAM user {user} is already locked: it has the inline policy {LOCK_POLICY_NAME}"
        )));
    }
    let active: Vec<String> = keys
        .iter()
        .filter(|k| k.status == ACTIVE)
        .map(|k| k.id.clone())
        .collect();
    let mut context = Map::new();
    context.insert("keys_to_deactivate".into(), json!(active));
    Ok(context)
}

/// unlock_iam_user: the user has `NexplaneLock`; keeps its document for the rollback.
pub(super) async fn precheck_unlock(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<Map<String, Value>, ChangeError> {
    let user = t.str("iam_user")?;
    require_user(env, user).await?;
    let document = lock_policy(env, user).await?.ok_or_else(|| {
        refused(format!(
            "IAM user {user} is not locked: it has no inline policy {LOCK_POLICY_NAME}"
        ))
    })?;
    let mut context = Map::new();
    context.insert("lock_policy_document".into(), json!(document));
    Ok(context)
}

/// attach_iam_user_policy: the user and the policy exist, and it is not attached yet.
pub(super) async fn precheck_attach(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<Map<String, Value>, ChangeError> {
    let user = t.str("iam_user")?;
    let arn = t.str("policy_arn")?;
    require_user(env, user).await?;
    require_policy(env, arn).await?;
    if attached_policies(env, user).await?.iter().any(|a| a == arn) {
        return Err(refused(format!(
            "policy {arn} is already attached to IAM user {user}"
        )));
    }
    let mut context = Map::new();
    context.insert("policy_arn".into(), json!(arn));
    Ok(context)
}

/// detach_iam_user_policy: the user exists and the policy is attached to it.
pub(super) async fn precheck_detach(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<Map<String, Value>, ChangeError> {
    let user = t.str("iam_user")?;
    let arn = t.str("policy_arn")?;
    require_user(env, user).await?;
    if !attached_policies(env, user).await?.iter().any(|a| a == arn) {
        return Err(refused(format!(
            "policy {arn} is not attached to IAM user {user}"
        )));
    }
    let mut context = Map::new();
    context.insert("policy_arn".into(), json!(arn));
    Ok(context)
}

// ---------------------------------------------------------------------------------------------
// rotate_iam_access_key

/// Deletes the user's keys that are neither the old key nor among `before`: keys created by
/// an attempt whose answer (and so whose secret) was lost. Returns their ids.
async fn discard_unknown_keys(
    env: &Env<'_>,
    user: &str,
    old: &str,
    before: &[String],
) -> Result<Vec<String>, ChangeError> {
    let mut discarded = Vec::new();
    for key in user_keys(env, user).await? {
        if key.id != old && !before.contains(&key.id) && delete_key(env, user, &key.id).await? {
            discarded.push(key.id);
        }
    }
    Ok(discarded)
}

/// `create_access_key`: creates the new key. Resumed, it first deletes a key left by the
/// interrupted attempt (its secret is lost), so the user never holds an extra key.
pub(super) async fn create_new_key(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
    resumed: bool,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let old = c.str("old_access_key_id")?;
    let before = c.strings("keys_before")?;
    let discarded = if resumed {
        discard_unknown_keys(env, user, old, &before).await?
    } else {
        Vec::new()
    };
    let iam = env.session.iam();
    let request = CreateAccessKeyRequest {
        user_name: Some(user.to_string()),
    };
    let created = match env
        .session
        .call("IAM", env.home_region(), || {
            iam.create_access_key(request.clone())
        })
        .await
    {
        Ok(answer) => answer.access_key,
        Err(e) if has_code(&e, &["LimitExceeded"]) => {
            return Err(refused(format!(
                "IAM user {user} already has {MAX_KEYS} access keys, the most AWS allows: no \
                 slot is free for the new key"
            )))
        }
        Err(e) if has_code(&e, NO_SUCH_ENTITY) => return Err(no_user(user)),
        Err(e) if e.kind == FailureKind::Unreachable => {
            // The request may have been carried out without us hearing the answer: a key
            // whose secret nobody has must not stay behind.
            let message = format!("CreateAccessKey for IAM user {user}: {}", e.message);
            return Err(provider_message(
                match discard_unknown_keys(env, user, old, &before).await {
                    Ok(ids) if ids.is_empty() => message,
                    Ok(ids) => format!(
                        "{message}; deleted access key {} that the unanswered call created",
                        list(&ids)
                    ),
                    Err(_) => format!(
                        "{message}; the call may have created a key nobody knows the secret \
                         of: a rollback deletes it"
                    ),
                },
            ));
        }
        Err(e) => return Err(provider(e, &format!("CreateAccessKey for IAM user {user}"))),
    };
    let new_id = created.access_key_id;
    let mut result = outcome(format!("created access key {new_id} for IAM user {user}"));
    if !discarded.is_empty() {
        result.detail.push_str(&format!(
            " (first deleted access key {} created by the interrupted attempt, whose secret \
             was lost)",
            list(&discarded)
        ));
        result
            .outputs
            .insert("discarded_access_key_ids".into(), json!(discarded));
    }
    result
        .outputs
        .insert("new_access_key_id".into(), json!(new_id));
    result
        .outputs
        .insert("old_access_key_id".into(), json!(old));
    result.secrets.insert(
        "new_secret_access_key".into(),
        SecretString::new(created.secret_access_key),
    );
    Ok(result)
}

/// `deactivate_old_access_key`: sets the replaced key Inactive.
pub(super) async fn deactivate_old_key(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let old = c.str("old_access_key_id")?;
    match ensure_status(env, user, old, INACTIVE).await? {
        StatusChange::Changed => Ok(outcome(format!(
            "set access key {old} of IAM user {user} Inactive"
        ))),
        StatusChange::Already => Ok(outcome(format!(
            "access key {old} of IAM user {user} was already Inactive"
        ))),
        StatusChange::Missing => Err(refused(format!(
            "access key {old} of IAM user {user} no longer exists"
        ))),
    }
}

/// Undo `reactivate_old_access_key`: sets the replaced key Active again, if it was Active.
pub(super) async fn reactivate_old_key(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let old = c.str("old_access_key_id")?;
    let before = c.str("old_key_status")?;
    if before != ACTIVE {
        return Ok(outcome(format!(
            "access key {old} of IAM user {user} was {before} before the rotation: nothing to \
             undo"
        )));
    }
    match ensure_status(env, user, old, ACTIVE).await? {
        StatusChange::Changed => Ok(outcome(format!(
            "set access key {old} of IAM user {user} Active again"
        ))),
        StatusChange::Already => Ok(outcome(format!(
            "access key {old} of IAM user {user} is Active: nothing to undo"
        ))),
        StatusChange::Missing => Err(refused(format!(
            "access key {old} of IAM user {user} no longer exists: it cannot be reactivated"
        ))),
    }
}

/// Undo `delete_new_access_key`: deletes the key the rotation created (found by the recorded
/// id or, when the creation was interrupted, as the key that was not there before).
pub(super) async fn delete_new_key(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let Some(keys) = keys_of(env, user).await? else {
        return Ok(outcome(format!(
            "IAM user {user} no longer exists: no new access key to delete"
        )));
    };
    let old = c.str("old_access_key_id")?;
    let before = c.strings("keys_before")?;
    let new = c.opt_str("new_access_key_id");
    let doomed: Vec<String> = match new {
        Some(new) if new == old || before.iter().any(|b| b == new) => {
            return Err(refused(format!(
                "access key {new} of IAM user {user} existed before the rotation: it is not \
                 deleted"
            )))
        }
        Some(new) => keys
            .iter()
            .filter(|k| k.id == new)
            .map(|k| k.id.clone())
            .collect(),
        None => keys
            .iter()
            .filter(|k| k.id != old && !before.contains(&k.id))
            .map(|k| k.id.clone())
            .collect(),
    };
    let mut deleted = Vec::new();
    for id in doomed {
        if delete_key(env, user, &id).await? {
            deleted.push(id);
        }
    }
    if deleted.is_empty() {
        return Ok(outcome(match new {
            Some(new) => {
                format!("access key {new} of IAM user {user} does not exist: nothing to undo")
            }
            None => {
                format!("IAM user {user} has no access key created by this change: nothing to undo")
            }
        }));
    }
    Ok(outcome(format!(
        "deleted access key {} of IAM user {user}",
        list(&deleted)
    )))
}

// ---------------------------------------------------------------------------------------------
// deactivate_iam_access_key, delete_iam_access_key

/// `deactivate_access_key` (Inactive) and its undo `reactivate_access_key` (Active).
pub(super) async fn set_target_key(
    env: &Env<'_>,
    t: Fields<'_>,
    status: &str,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let key = t.str("access_key_id")?;
    match ensure_status(env, user, key, status).await? {
        StatusChange::Changed => Ok(outcome(format!(
            "set access key {key} of IAM user {user} {status}"
        ))),
        StatusChange::Already if status == ACTIVE => Ok(outcome(format!(
            "access key {key} of IAM user {user} is Active: nothing to undo"
        ))),
        StatusChange::Already => Ok(outcome(format!(
            "access key {key} of IAM user {user} was already {status}"
        ))),
        StatusChange::Missing => Err(refused(format!(
            "access key {key} does not exist for IAM user {user}"
        ))),
    }
}

/// `delete_access_key`: deletes the key, still Inactive (no undo).
pub(super) async fn delete_target_key(
    env: &Env<'_>,
    t: Fields<'_>,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let key = t.str("access_key_id")?;
    let keys = user_keys(env, user).await?;
    let mut result = match keys.iter().find(|k| k.id == key) {
        None => outcome(format!(
            "access key {key} of IAM user {user} was already deleted"
        )),
        Some(k) if k.status != INACTIVE => {
            return Err(refused(format!(
                "access key {key} of IAM user {user} is {} again; deactivate it first",
                k.status
            )))
        }
        Some(_) => {
            delete_key(env, user, key).await?;
            outcome(format!("deleted access key {key} of IAM user {user}"))
        }
    };
    result
        .outputs
        .insert("deleted_access_key_id".into(), json!(key));
    Ok(result)
}

// ---------------------------------------------------------------------------------------------
// lock_iam_user, unlock_iam_user

/// `attach_lock_policy`: puts the deny-all `NexplaneLock` on the user.
pub(super) async fn attach_lock(env: &Env<'_>, t: Fields<'_>) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    match lock_policy(env, user).await? {
        Some(document) if same_document(&document, LOCK_POLICY_DOCUMENT) => Ok(outcome(format!(
            "IAM user {user} already had the deny-all inline policy {LOCK_POLICY_NAME}"
        ))),
        Some(_) => Err(refused(format!(
            "IAM user {user} has an inline policy {LOCK_POLICY_NAME} that this change did not \
             put there; it is left as it is"
        ))),
        None => {
            put_lock_policy(env, user, LOCK_POLICY_DOCUMENT).await?;
            Ok(outcome(format!(
                "attached the deny-all inline policy {LOCK_POLICY_NAME} to IAM user {user}"
            )))
        }
    }
}

/// `deactivate_active_keys`: sets the keys that were Active at the precheck Inactive.
pub(super) async fn deactivate_keys(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let wanted = c.strings("keys_to_deactivate")?;
    let (deactivated, already, gone) = set_keys_status(env, user, wanted, INACTIVE).await?;
    let mut detail = if deactivated.is_empty() {
        format!("no access key of IAM user {user} needed deactivating")
    } else {
        format!(
            "deactivated access key {} of IAM user {user}",
            list(&deactivated)
        )
    };
    if !already.is_empty() {
        detail.push_str(&format!("; {} already Inactive", list(&already)));
    }
    if !gone.is_empty() {
        detail.push_str(&format!("; not found (deleted since): {}", list(&gone)));
    }
    // Keys found Inactive were Active at the precheck: this change (an interrupted attempt)
    // deactivated them, and its rollback reactivates them.
    let mut all = deactivated;
    all.extend(already);
    let mut result = outcome(detail);
    result.outputs.insert("deactivated_keys".into(), json!(all));
    Ok(result)
}

/// Sets each of `wanted` (access keys of `user`) to `status`. Returns the keys changed, the
/// keys that already had that status, and the keys that no longer exist.
async fn set_keys_status(
    env: &Env<'_>,
    user: &str,
    wanted: Vec<String>,
    status: &str,
) -> Result<(Vec<String>, Vec<String>, Vec<String>), ChangeError> {
    let (mut changed, mut already, mut gone) = (Vec::new(), Vec::new(), Vec::new());
    if wanted.is_empty() {
        return Ok((changed, already, gone));
    }
    let keys = user_keys(env, user).await?;
    for id in wanted {
        match keys.iter().find(|k| k.id == id) {
            None => gone.push(id),
            Some(k) if k.status == status => already.push(id),
            Some(_) => {
                if update_key(env, user, &id, status).await? {
                    changed.push(id);
                } else {
                    gone.push(id);
                }
            }
        }
    }
    Ok((changed, already, gone))
}

/// Undo `reactivate_deactivated_keys`: sets the keys the lock deactivated Active again
/// (every key recorded at the precheck when the step did not finish).
pub(super) async fn reactivate_keys(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let wanted = match c.opt_strings("deactivated_keys") {
        Some(keys) => keys,
        None => c.strings("keys_to_deactivate")?,
    };
    if wanted.is_empty() {
        return Ok(outcome(format!(
            "no access key of IAM user {user} was deactivated: nothing to undo"
        )));
    }
    let (reactivated, active, gone) = set_keys_status(env, user, wanted, ACTIVE).await?;
    let mut detail = if reactivated.is_empty() {
        format!("no access key of IAM user {user} needed reactivating: nothing to undo")
    } else {
        format!(
            "reactivated access key {} of IAM user {user}",
            list(&reactivated)
        )
    };
    if !active.is_empty() {
        detail.push_str(&format!("; {} already Active", list(&active)));
    }
    if !gone.is_empty() {
        detail.push_str(&format!("; not found (deleted since): {}", list(&gone)));
    }
    Ok(outcome(detail))
}

/// `remove_lock_policy` (unlock) and the lock's undo of the same name.
pub(super) async fn remove_lock(
    env: &Env<'_>,
    t: Fields<'_>,
    side: Side,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    if delete_lock_policy(env, user).await? {
        return Ok(outcome(format!(
            "removed the inline policy {LOCK_POLICY_NAME} from IAM user {user}"
        )));
    }
    Ok(outcome(match side {
        Side::Apply => {
            format!("IAM user {user} had no inline policy {LOCK_POLICY_NAME} (already removed)")
        }
        Side::Undo => {
            format!("IAM user {user} has no inline policy {LOCK_POLICY_NAME}: nothing to undo")
        }
    }))
}

/// Undo `restore_lock_policy`: puts the `NexplaneLock` document recorded by the precheck back.
pub(super) async fn restore_lock(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let document = c.str("lock_policy_document")?;
    if lock_policy(env, user).await?.is_some() {
        return Ok(outcome(format!(
            "IAM user {user} has the inline policy {LOCK_POLICY_NAME}: nothing to undo"
        )));
    }
    put_lock_policy(env, user, document).await?;
    Ok(outcome(format!(
        "put the inline policy {LOCK_POLICY_NAME} back on IAM user {user}"
    )))
}

// ---------------------------------------------------------------------------------------------
// attach_iam_user_policy, detach_iam_user_policy

/// Attaches (`attach`) or detaches the target's policy, looking first.
pub(super) async fn set_attached(
    env: &Env<'_>,
    t: Fields<'_>,
    attach: bool,
    side: Side,
) -> Result<StepOutcome, ChangeError> {
    let user = t.str("iam_user")?;
    let arn = t.str("policy_arn")?;
    let attached = attached_policies(env, user).await?.iter().any(|a| a == arn);
    let already = match (attach, side) {
        (true, Side::Apply) => format!("policy {arn} was already attached to IAM user {user}"),
        (false, Side::Apply) => format!("policy {arn} was already detached from IAM user {user}"),
        (true, Side::Undo) => {
            format!("policy {arn} is attached to IAM user {user}: nothing to undo")
        }
        (false, Side::Undo) => {
            format!("policy {arn} is not attached to IAM user {user}: nothing to undo")
        }
    };
    if attached == attach {
        return Ok(outcome(already));
    }
    if attach {
        attach_policy(env, user, arn).await?;
        Ok(outcome(format!("attached policy {arn} to IAM user {user}")))
    } else if detach_policy(env, user, arn).await? {
        Ok(outcome(format!(
            "detached policy {arn} from IAM user {user}"
        )))
    } else {
        Ok(outcome(already))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn policy_documents_are_url_decoded_when_needed() {
        let encoded = "%7B%22Version%22%3A%222012-10-17%22%2C%22Statement%22%3A%5B%7B%22Effect\
                       %22%3A%22Deny%22%2C%22Action%22%3A%22%2A%22%2C%22Resource%22%3A%22%2A%22\
                       %7D%5D%7D";
        assert_eq!(decode_policy_document(encoded), LOCK_POLICY_DOCUMENT);
        assert_eq!(
            decode_policy_document(LOCK_POLICY_DOCUMENT),
            LOCK_POLICY_DOCUMENT
        );
        assert_eq!(decode_policy_document("100%"), "100%");
        assert!(same_document(
            LOCK_POLICY_DOCUMENT,
            "{ \"Statement\": [{\"Resource\": \"*\", \"Action\": \"*\", \"Effect\": \"Deny\"}], \
             \"Version\": \"2012-10-17\" }"
        ));
        assert!(!same_document(LOCK_POLICY_DOCUMENT, "{}"));
    }
}
