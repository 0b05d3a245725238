//! Changes (api.md §6.2, §6.3): the prechecks, steps and undo steps of the eleven AWS change
//! types, behind [`nexplane_ports::cloud::ChangeProvider`].
//!
//! Every function here looks at the provider before it acts, so that a step run again after an
//! interruption (`resumed`) never makes its change twice, and an undo step finds out by itself
//! how much of its step was made. The step names come from
//! [`nexplane_domain::execution::plan`]; the crate documentation lists what each one does.

mod ec2;
mod iam;

use crate::error::CallError;
use crate::session::Session;
use crate::AwsProvider;
use nexplane_domain::execution::plan;
use nexplane_ports::cloud::{
    ChangeError, ChangeProvider, CloudError, CloudFuture, CloudTarget, Prechecked, StepCall,
    StepOutcome,
};
use serde_json::{Map, Value};
use std::time::Duration;

pub use iam::{LOCK_POLICY_DOCUMENT, LOCK_POLICY_NAME};

/// The change types of api.md §6.3, in its order.
pub(crate) static CHANGE_TYPES: [&str; 11] = [
    ROTATE_KEY,
    DEACTIVATE_KEY,
    DELETE_KEY,
    LOCK_USER,
    UNLOCK_USER,
    ATTACH_POLICY,
    DETACH_POLICY,
    STOP_INSTANCE,
    START_INSTANCE,
    REVOKE_INGRESS,
    AUTHORIZE_INGRESS,
];

const ROTATE_KEY: &str = "rotate_iam_access_key";
const DEACTIVATE_KEY: &str = "deactivate_iam_access_key";
const DELETE_KEY: &str = "delete_iam_access_key";
const LOCK_USER: &str = "lock_iam_user";
const UNLOCK_USER: &str = "unlock_iam_user";
const ATTACH_POLICY: &str = "attach_iam_user_policy";
const DETACH_POLICY: &str = "detach_iam_user_policy";
const STOP_INSTANCE: &str = "stop_ec2_instance";
const START_INSTANCE: &str = "start_ec2_instance";
const REVOKE_INGRESS: &str = "revoke_security_group_ingress";
const AUTHORIZE_INGRESS: &str = "authorize_security_group_ingress";

/// Whether a step is run forward (execution) or backward (rollback).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Apply,
    Undo,
}

/// What a change runs with: the connector's session and how long to wait for an instance.
struct Env<'a> {
    session: &'a Session,
    state_wait: Duration,
}

impl Env<'_> {
    /// The connector's home region (IAM calls are signed for it).
    fn home_region(&self) -> &str {
        &self.session.settings.region
    }
}

/// Read access to a JSON object: a change target or a step context.
#[derive(Debug, Clone, Copy)]
struct Fields<'a> {
    map: Option<&'a Map<String, Value>>,
    /// `target` or `context`, for messages.
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn target(value: &'a Value) -> Result<Self, ChangeError> {
        match value {
            Value::Object(map) => Ok(Self {
                map: Some(map),
                what: "target",
            }),
            _ => Err(ChangeError::Refused(
                "invalid target: a JSON object is expected".into(),
            )),
        }
    }

    fn context(value: &'a Value) -> Self {
        Self {
            map: value.as_object(),
            what: "context",
        }
    }

    fn empty(what: &'static str) -> Self {
        Self { map: None, what }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.and_then(|m| m.get(key))
    }

    fn missing(&self, key: &str) -> ChangeError {
        match self.what {
            "target" => ChangeError::Refused(format!("invalid target: `{key}` is missing")),
            what => ChangeError::Refused(format!(
                "the execution {what} has no `{key}` (it is recorded by the precheck)"
            )),
        }
    }

    fn opt_str(&self, key: &str) -> Option<&'a str> {
        self.get(key)
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }

    fn str(&self, key: &str) -> Result<&'a str, ChangeError> {
        self.opt_str(key).ok_or_else(|| self.missing(key))
    }

    fn int(&self, key: &str) -> Result<i64, ChangeError> {
        self.get(key)
            .and_then(Value::as_i64)
            .ok_or_else(|| self.missing(key))
    }

    fn opt_strings(&self, key: &str) -> Option<Vec<String>> {
        self.get(key).and_then(Value::as_array).map(|items| {
            items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect()
        })
    }

    fn strings(&self, key: &str) -> Result<Vec<String>, ChangeError> {
        self.opt_strings(key).ok_or_else(|| self.missing(key))
    }
}

fn refused(message: impl Into<String>) -> ChangeError {
    ChangeError::Refused(message.into())
}

/// A failed provider call, with what was being done.
fn provider(err: CallError, what: &str) -> ChangeError {
    ChangeError::Provider(err.context(what).into_cloud())
}

/// A provider-side failure we found ourselves (e.g. a state not reached in time).
fn provider_message(message: impl Into<String>) -> ChangeError {
    ChangeError::Provider(CloudError {
        message: message.into(),
    })
}

fn has_code(err: &CallError, codes: &[&str]) -> bool {
    err.code.as_deref().is_some_and(|c| codes.contains(&c))
}

fn outcome(detail: impl Into<String>) -> StepOutcome {
    StepOutcome {
        detail: detail.into(),
        ..StepOutcome::default()
    }
}

fn unsupported_type(change_type: &str) -> ChangeError {
    ChangeError::Unsupported(format!(
        "change type `{change_type}` is not an AWS change type"
    ))
}

/// The read-only precheck of `change_type` for the change target `target`.
async fn precheck(
    env: &Env<'_>,
    change_type: &str,
    target: &Value,
) -> Result<Prechecked, ChangeError> {
    let t = Fields::target(target)?;
    let context = match change_type {
        ROTATE_KEY => iam::precheck_rotate(env, t).await?,
        DEACTIVATE_KEY => iam::precheck_deactivate(env, t).await?,
        DELETE_KEY => iam::precheck_delete(env, t).await?,
        LOCK_USER => iam::precheck_lock(env, t).await?,
        UNLOCK_USER => iam::precheck_unlock(env, t).await?,
        ATTACH_POLICY => iam::precheck_attach(env, t).await?,
        DETACH_POLICY => iam::precheck_detach(env, t).await?,
        STOP_INSTANCE => ec2::precheck_instance(env, t, ec2::Want::Stopped).await?,
        START_INSTANCE => ec2::precheck_instance(env, t, ec2::Want::Running).await?,
        REVOKE_INGRESS => ec2::precheck_rule(env, t, false).await?,
        AUTHORIZE_INGRESS => ec2::precheck_rule(env, t, true).await?,
        other => return Err(unsupported_type(other)),
    };
    Ok(Prechecked { context })
}

/// Whether `step` is a step (or, for [`Side::Undo`], an undo step) of the change type.
fn check_step(change_type: &str, step: &str, side: Side) -> Result<(), ChangeError> {
    if !CHANGE_TYPES.contains(&change_type) {
        return Err(unsupported_type(change_type));
    }
    let known = plan(change_type).is_some_and(|steps| {
        steps.iter().any(|d| match side {
            Side::Apply => d.name == step,
            Side::Undo => d.undo == Some(step),
        })
    });
    if known {
        Ok(())
    } else {
        let kind = match side {
            Side::Apply => "step",
            Side::Undo => "undo step",
        };
        Err(ChangeError::Unsupported(format!(
            "`{change_type}` has no {kind} `{step}`"
        )))
    }
}

/// Runs one step or undo step.
async fn run_step(
    env: &Env<'_>,
    call: &StepCall<'_>,
    side: Side,
) -> Result<StepOutcome, ChangeError> {
    let t = Fields::target(call.target)?;
    let c = Fields::context(call.context);
    let resumed = call.resumed;
    use Side::{Apply, Undo};
    match (call.change_type, side, call.step) {
        (ROTATE_KEY, Apply, "create_access_key") => iam::create_new_key(env, t, c, resumed).await,
        (ROTATE_KEY, Apply, "deactivate_old_access_key") => {
            iam::deactivate_old_key(env, t, c).await
        }
        (ROTATE_KEY, Undo, "reactivate_old_access_key") => iam::reactivate_old_key(env, t, c).await,
        (ROTATE_KEY, Undo, "delete_new_access_key") => iam::delete_new_key(env, t, c).await,
        (DEACTIVATE_KEY, Apply, "deactivate_access_key") => {
            iam::set_target_key(env, t, iam::INACTIVE).await
        }
        (DEACTIVATE_KEY, Undo, "reactivate_access_key") => {
            iam::set_target_key(env, t, iam::ACTIVE).await
        }
        (DELETE_KEY, Apply, "delete_access_key") => iam::delete_target_key(env, t).await,
        (LOCK_USER, Apply, "attach_lock_policy") => iam::attach_lock(env, t).await,
        (LOCK_USER, Apply, "deactivate_active_keys") => iam::deactivate_keys(env, t, c).await,
        (LOCK_USER, Undo, "reactivate_deactivated_keys") => iam::reactivate_keys(env, t, c).await,
        (LOCK_USER, Undo, "remove_lock_policy") => iam::remove_lock(env, t, Undo).await,
        (UNLOCK_USER, Apply, "remove_lock_policy") => iam::remove_lock(env, t, Apply).await,
        (UNLOCK_USER, Undo, "restore_lock_policy") => iam::restore_lock(env, t, c).await,
        (ATTACH_POLICY, Apply, "attach_user_policy") => {
            iam::set_attached(env, t, true, Apply).await
        }
        (ATTACH_POLICY, Undo, "detach_user_policy") => iam::set_attached(env, t, false, Undo).await,
        (DETACH_POLICY, Apply, "detach_user_policy") => {
            iam::set_attached(env, t, false, Apply).await
        }
        (DETACH_POLICY, Undo, "reattach_user_policy") => {
            iam::set_attached(env, t, true, Undo).await
        }
        (STOP_INSTANCE, Apply, "stop_instance") | (START_INSTANCE, Undo, "stop_instance") => {
            ec2::set_instance_state(env, t, c, ec2::Want::Stopped, side).await
        }
        (START_INSTANCE, Apply, "start_instance") | (STOP_INSTANCE, Undo, "start_instance") => {
            ec2::set_instance_state(env, t, c, ec2::Want::Running, side).await
        }
        (REVOKE_INGRESS, Apply, "revoke_ingress") | (AUTHORIZE_INGRESS, Undo, "remove_ingress") => {
            ec2::set_rule(env, t, c, false, side).await
        }
        (AUTHORIZE_INGRESS, Apply, "authorize_ingress")
        | (REVOKE_INGRESS, Undo, "restore_ingress") => ec2::set_rule(env, t, c, true, side).await,
        (change_type, _, step) => Err(ChangeError::Unsupported(format!(
            "`{change_type}` step `{step}` is not implemented by the aws adapter"
        ))),
    }
}

impl AwsProvider {
    async fn change_session(&self, target: &CloudTarget) -> Result<Session, ChangeError> {
        Ok(Session::open(target, &self.dispatcher, self.options.request_timeout).await?)
    }

    async fn step(
        &self,
        target: &CloudTarget,
        call: StepCall<'_>,
        side: Side,
    ) -> Result<StepOutcome, ChangeError> {
        check_step(call.change_type, call.step, side)?;
        let session = self.change_session(target).await?;
        let env = Env {
            session: &session,
            state_wait: self.options.state_wait,
        };
        run_step(&env, &call, side).await
    }
}

impl ChangeProvider for AwsProvider {
    fn change_types(&self) -> &'static [&'static str] {
        &CHANGE_TYPES
    }

    fn precheck<'a>(
        &'a self,
        target: &'a CloudTarget,
        change_type: &'a str,
        change_target: &'a Value,
    ) -> CloudFuture<'a, Result<Prechecked, ChangeError>> {
        Box::pin(async move {
            if !CHANGE_TYPES.contains(&change_type) {
                return Err(unsupported_type(change_type));
            }
            let session = self.change_session(target).await?;
            let env = Env {
                session: &session,
                state_wait: self.options.state_wait,
            };
            precheck(&env, change_type, change_target).await
        })
    }

    fn apply_step<'a>(
        &'a self,
        target: &'a CloudTarget,
        call: StepCall<'a>,
    ) -> CloudFuture<'a, Result<StepOutcome, ChangeError>> {
        Box::pin(self.step(target, call, Side::Apply))
    }

    fn undo_step<'a>(
        &'a self,
        target: &'a CloudTarget,
        call: StepCall<'a>,
    ) -> CloudFuture<'a, Result<StepOutcome, ChangeError>> {
        Box::pin(self.step(target, call, Side::Undo))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn every_change_type_has_a_plan_and_every_step_is_dispatched() {
        for change_type in CHANGE_TYPES {
            let steps = plan(change_type).unwrap();
            for def in steps {
                assert!(check_step(change_type, def.name, Side::Apply).is_ok());
                if let Some(undo) = def.undo {
                    assert!(check_step(change_type, undo, Side::Undo).is_ok());
                }
            }
        }
        assert!(matches!(
            check_step("agent_write_file", "write_file", Side::Apply),
            Err(ChangeError::Unsupported(_))
        ));
        assert!(matches!(
            check_step(ROTATE_KEY, "delete_everything", Side::Apply),
            Err(ChangeError::Unsupported(_))
        ));
    }

    #[test]
    fn fields_report_what_is_missing() {
        let target = serde_json::json!({"iam_user": "alice", "from_port": 22});
        let t = Fields::target(&target).unwrap();
        assert_eq!(t.str("iam_user").unwrap(), "alice");
        assert_eq!(t.int("from_port").unwrap(), 22);
        assert_eq!(
            t.str("policy_arn").unwrap_err(),
            ChangeError::Refused("invalid target: `policy_arn` is missing".into())
        );
        let c = Fields::context(&Value::Null);
        assert!(c.strings("keys_before").is_err());
        assert!(Fields::target(&Value::Null).is_err());
        assert!(Fields::empty("context").opt_str("x").is_none());
    }
}
