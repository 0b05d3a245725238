//! The execution engine's pure half (api.md §6.2): each change type's list of steps, and the
//! journal that records, durably and before and after every external call, where an
//! execution or a rollback stands.
//!
//! A change type is a list of [`StepDef`]s, each with the name of its undo step. An
//! execution journal starts with every step `pending`; the engine asks [`Journal::next`]
//! what to do, marks a step `running` **before** calling the provider and `succeeded` or
//! `failed` **after**, and stores the journal each time. A worker that resumes a job after a
//! crash finds at most one step `running`: it was interrupted around its provider call, so the
//! engine calls it again with `resumed = true` and the adapter looks at the provider before
//! acting (it never creates a second resource). A `succeeded` step is never run again.
//!
//! A rollback journal lists the undo steps of every execution step that was started
//! (`succeeded`, `failed` or interrupted), in reverse order; undo steps tolerate a change
//! that was only partly made. A retried rollback keeps the undo steps that succeeded.
//!
//! ```
//! use nexplane_domain::execution::{Journal, Next, StepStatus};
//! use nexplane_domain::{JobId, Timestamp};
//! use serde_json::{json, Map};
//!
//! let t = Timestamp::from_secs(1_800_000_000);
//! let mut j = Journal::for_execution(JobId::new(t, 1), "rotate_iam_access_key").unwrap();
//! assert_eq!(j.next(), Next::Precheck);
//! let mut ctx = Map::new();
//! ctx.insert("old_access_key_id".into(), json!("AKIAOLD"));
//! j.precheck_passed(ctx, t);
//! assert_eq!(j.next(), Next::Step { index: 0, resumed: false });
//! j.step_started(0, t);
//! // A crash here: the next worker resumes the step and must look before acting.
//! assert_eq!(j.next(), Next::Step { index: 0, resumed: true });
//! let mut out = Map::new();
//! out.insert("new_access_key_id".into(), json!("AKIANEW"));
//! j.step_succeeded(0, t, "created access key AKIANEW", out, vec!["new_secret_access_key".into()]);
//! j.step_started(1, t);
//! j.step_succeeded(1, t, "set AKIAOLD Inactive", Map::new(), vec![]);
//! assert_eq!(j.next(), Next::Finish { success: true });
//! assert_eq!(j.applied_steps(), 2);
//!
//! let rb = Journal::for_rollback(JobId::new(t, 2), &j, None);
//! let names: Vec<_> = rb.steps.iter().map(|s| s.name.as_str()).collect();
//! assert_eq!(names, ["reactivate_old_access_key", "delete_new_access_key"]);
//! assert_eq!(rb.steps[0].status, StepStatus::Pending);
//! ```

use crate::{JobId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt;

/// One step of a change type: a single external change and the step that undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDef {
    /// Step name, shown in `execution.steps[].name`.
    pub name: &'static str,
    /// The undo step's name, shown in `rollback.steps[].name`; `None` when the step cannot be
    /// undone (the change type has no rollback).
    pub undo: Option<&'static str>,
}

const fn step(name: &'static str, undo: &'static str) -> StepDef {
    StepDef {
        name,
        undo: Some(undo),
    }
}

/// The steps of each change type, in execution order (api.md §6.3, §7.3).
const PLANS: &[(&str, &[StepDef])] = &[
    (
        "rotate_iam_access_key",
        &[
            step("create_access_key", "delete_new_access_key"),
            step("deactivate_old_access_key", "reactivate_old_access_key"),
        ],
    ),
    (
        "deactivate_iam_access_key",
        &[step("deactivate_access_key", "reactivate_access_key")],
    ),
    (
        "delete_iam_access_key",
        &[StepDef {
            name: "delete_access_key",
            undo: None,
        }],
    ),
    (
        "lock_iam_user",
        &[
            step("attach_lock_policy", "remove_lock_policy"),
            step("deactivate_active_keys", "reactivate_deactivated_keys"),
        ],
    ),
    (
        "unlock_iam_user",
        &[step("remove_lock_policy", "restore_lock_policy")],
    ),
    (
        "attach_iam_user_policy",
        &[step("attach_user_policy", "detach_user_policy")],
    ),
    (
        "detach_iam_user_policy",
        &[step("detach_user_policy", "reattach_user_policy")],
    ),
    (
        "stop_ec2_instance",
        &[step("stop_instance", "start_instance")],
    ),
    (
        "start_ec2_instance",
        &[step("start_instance", "stop_instance")],
    ),
    (
        "revoke_security_group_ingress",
        &[step("revoke_ingress", "restore_ingress")],
    ),
    (
        "authorize_security_group_ingress",
        &[step("authorize_ingress", "remove_ingress")],
    ),
    ("agent_write_file", &[step("write_file", "restore_file")]),
    (
        "agent_set_file_mode",
        &[step("set_file_mode", "restore_file_mode")],
    ),
];

/// The steps of `change_type`, or `None` for an unknown type.
pub fn plan(change_type: &str) -> Option<&'static [StepDef]> {
    PLANS
        .iter()
        .find(|(name, _)| *name == change_type)
        .map(|(_, steps)| *steps)
}

/// Execution or rollback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalKind {
    /// Executing the change.
    Execution,
    /// Undoing it.
    Rollback,
}

impl JournalKind {
    /// `execution` or `rollback`.
    pub fn as_str(self) -> &'static str {
        match self {
            JournalKind::Execution => "execution",
            JournalKind::Rollback => "rollback",
        }
    }
}

impl fmt::Display for JournalKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a step stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Not started.
    Pending,
    /// Started: its provider call may or may not have happened.
    Running,
    /// Done.
    Succeeded,
    /// The provider refused it or it could not be completed (it may have been partly made).
    Failed,
    /// Not run because the precheck or an earlier step failed.
    Skipped,
}

impl StepStatus {
    /// Whether the step may have changed something at the provider.
    pub fn was_started(self) -> bool {
        matches!(
            self,
            StepStatus::Running | StepStatus::Succeeded | StepStatus::Failed
        )
    }
}

/// One step as journaled (api.md §6 `steps[]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// Step name.
    pub name: String,
    /// Status.
    pub status: StepStatus,
    /// When it was (last) started.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub finished_at: Option<Timestamp>,
    /// What it did, or why it failed. Never holds a secret.
    pub detail: Option<String>,
    /// How many times it was started (more than one after a crash).
    #[serde(default)]
    pub attempts: u32,
}

impl StepRecord {
    fn pending(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            status: StepStatus::Pending,
            started_at: None,
            finished_at: None,
            detail: None,
            attempts: 0,
        }
    }
}

/// What the engine does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Run the change type's precheck against the live provider (read-only).
    Precheck,
    /// Run step `index`. `resumed` is true when the step was started before an interruption:
    /// the adapter must look at the provider before acting again.
    Step {
        /// Index in [`Journal::steps`].
        index: usize,
        /// The step was already started once.
        resumed: bool,
    },
    /// Every step is done (`success`) or one failed: end the job.
    Finish {
        /// Whether every step succeeded.
        success: bool,
    },
}

/// The journal of one execution or rollback (api.md §6 `execution` / `rollback`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Journal {
    /// Execution or rollback.
    pub kind: JournalKind,
    /// The job running it.
    pub job_id: JobId,
    /// Whether the precheck passed (always true for a rollback, which has none).
    pub prechecked: bool,
    /// The steps, in order.
    pub steps: Vec<StepRecord>,
    /// Non-secret results (e.g. `new_access_key_id`, `old_access_key_id`).
    pub outputs: Map<String, Value>,
    /// What the precheck found (and, for a rollback, the execution's context and outputs):
    /// the state the steps and their undo act on. Never holds a secret.
    pub context: Map<String, Value>,
    /// Names of the secret outputs produced (values are sealed elsewhere).
    pub secret_outputs: Vec<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// When the secret outputs were revealed (and destroyed).
    #[serde(default)]
    pub secrets_revealed_at: Option<Timestamp>,
}

impl Journal {
    /// A new execution journal for `change_type`, every step pending; `None` for an unknown
    /// change type.
    pub fn for_execution(job_id: JobId, change_type: &str) -> Option<Journal> {
        let steps = plan(change_type)?;
        Some(Journal {
            kind: JournalKind::Execution,
            job_id,
            prechecked: false,
            steps: steps.iter().map(|s| StepRecord::pending(s.name)).collect(),
            outputs: Map::new(),
            context: Map::new(),
            secret_outputs: Vec::new(),
            error: None,
            secrets_revealed_at: None,
        })
    }

    /// A rollback journal undoing, in reverse order, every step `execution` started. When
    /// `previous` (an earlier rollback that failed) is given, its succeeded undo steps are
    /// kept as they are and the others run again.
    pub fn for_rollback(job_id: JobId, execution: &Journal, previous: Option<&Journal>) -> Journal {
        let mut context = execution.context.clone();
        for (k, v) in &execution.outputs {
            context.insert(k.clone(), v.clone());
        }
        let defs = plan_of(execution);
        let mut steps = Vec::new();
        for (i, s) in execution.steps.iter().enumerate().rev() {
            if !s.status.was_started() {
                continue;
            }
            let Some(undo) = defs.get(i).and_then(|d| d.undo) else {
                continue;
            };
            let kept = previous
                .and_then(|p| p.steps.iter().find(|r| r.name == undo))
                .filter(|r| r.status == StepStatus::Succeeded)
                .cloned();
            steps.push(kept.unwrap_or_else(|| StepRecord::pending(undo)));
        }
        let outputs = previous.map(|p| p.outputs.clone()).unwrap_or_default();
        Journal {
            kind: JournalKind::Rollback,
            job_id,
            prechecked: true,
            steps,
            outputs,
            context,
            secret_outputs: Vec::new(),
            error: None,
            secrets_revealed_at: None,
        }
    }

    /// What to do next.
    pub fn next(&self) -> Next {
        if !self.prechecked {
            return if self.error.is_some() {
                Next::Finish { success: false }
            } else {
                Next::Precheck
            };
        }
        if let Some(index) = self
            .steps
            .iter()
            .position(|s| s.status == StepStatus::Running)
        {
            return Next::Step {
                index,
                resumed: true,
            };
        }
        if self.steps.iter().any(|s| s.status == StepStatus::Failed) || self.error.is_some() {
            return Next::Finish { success: false };
        }
        match self
            .steps
            .iter()
            .position(|s| s.status == StepStatus::Pending)
        {
            Some(index) => Next::Step {
                index,
                resumed: false,
            },
            None => Next::Finish { success: true },
        }
    }

    /// What the steps act on: the precheck's context with every output so far.
    pub fn step_context(&self) -> Value {
        let mut all = self.context.clone();
        for (k, v) in &self.outputs {
            all.insert(k.clone(), v.clone());
        }
        Value::Object(all)
    }

    /// Records a passed precheck and what it found.
    pub fn precheck_passed(&mut self, context: Map<String, Value>, _now: Timestamp) {
        self.prechecked = true;
        self.context = context;
    }

    /// Records a failed precheck: nothing was applied, every step is skipped.
    pub fn precheck_failed(&mut self, error: impl Into<String>, now: Timestamp) {
        self.error = Some(format!("precheck failed: {}", error.into()));
        self.skip_pending(now);
    }

    /// Marks step `index` as started (before its provider call).
    pub fn step_started(&mut self, index: usize, now: Timestamp) {
        if let Some(s) = self.steps.get_mut(index) {
            s.status = StepStatus::Running;
            s.started_at = Some(now);
            s.finished_at = None;
            s.attempts = s.attempts.saturating_add(1);
        }
    }

    /// Marks step `index` as done, with what it did, its outputs and the names of its secret
    /// outputs.
    pub fn step_succeeded(
        &mut self,
        index: usize,
        now: Timestamp,
        detail: impl Into<String>,
        outputs: Map<String, Value>,
        secret_names: Vec<String>,
    ) {
        if let Some(s) = self.steps.get_mut(index) {
            s.status = StepStatus::Succeeded;
            s.finished_at = Some(now);
            s.detail = Some(detail.into());
        }
        self.outputs.extend(outputs);
        for name in secret_names {
            if !self.secret_outputs.contains(&name) {
                self.secret_outputs.push(name);
            }
        }
    }

    /// Marks step `index` as failed with `error`; the steps after it are skipped.
    pub fn step_failed(&mut self, index: usize, now: Timestamp, error: impl Into<String>) {
        let error = error.into();
        let Some(s) = self.steps.get_mut(index) else {
            return;
        };
        s.status = StepStatus::Failed;
        s.finished_at = Some(now);
        s.detail = Some(error.clone());
        self.error = Some(format!("step {} failed: {error}", s.name));
        self.skip_pending(now);
    }

    /// Ends the journal without running the rest: a running step is failed with `reason`
    /// (it may have been partly made), pending steps are skipped.
    pub fn give_up(&mut self, now: Timestamp, reason: impl Into<String>) {
        let reason = reason.into();
        match self
            .steps
            .iter()
            .position(|s| s.status == StepStatus::Running)
        {
            Some(i) => self.step_failed(i, now, reason),
            None => {
                self.error = Some(reason);
                self.skip_pending(now);
            }
        }
    }

    fn skip_pending(&mut self, _now: Timestamp) {
        for s in &mut self.steps {
            if s.status == StepStatus::Pending {
                s.status = StepStatus::Skipped;
            }
        }
    }

    /// How many steps may have changed something at the provider (started ones).
    pub fn applied_steps(&self) -> u32 {
        let n = self.steps.iter().filter(|s| s.status.was_started()).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Whether the journal is finished (nothing left to run).
    pub fn is_finished(&self) -> bool {
        matches!(self.next(), Next::Finish { .. })
    }
}

/// The step definitions an execution journal was built from (matched by name, so a journal
/// stays readable if a plan grows).
fn plan_of(execution: &Journal) -> Vec<StepDef> {
    let all: Vec<StepDef> = PLANS
        .iter()
        .flat_map(|(_, steps)| steps.iter().copied())
        .collect();
    execution
        .steps
        .iter()
        .map(|s| {
            all.iter()
                .find(|d| d.name == s.name)
                .copied()
                .unwrap_or(StepDef {
                    name: "",
                    undo: None,
                })
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::change_type::builtin_catalog;
    use serde_json::json;

    fn t() -> Timestamp {
        Timestamp::from_secs(1_800_000_000)
    }

    #[test]
    fn every_catalog_type_has_a_plan_and_undo_matches_rollback_kind() {
        for ct in builtin_catalog() {
            let steps = plan(&ct.name).unwrap_or_else(|| panic!("no plan for {}", ct.name));
            assert!(!steps.is_empty(), "{}", ct.name);
            let all_undo = steps.iter().all(|s| s.undo.is_some());
            assert_eq!(all_undo, ct.has_rollback(), "{}", ct.name);
        }
        assert!(plan("no_such_type").is_none());
    }

    #[test]
    fn a_failed_precheck_applies_nothing() {
        let mut j = Journal::for_execution(JobId::new(t(), 1), "lock_iam_user").unwrap();
        j.precheck_failed("user prod-deploy does not exist", t());
        assert_eq!(j.next(), Next::Finish { success: false });
        assert_eq!(j.applied_steps(), 0);
        assert!(j.steps.iter().all(|s| s.status == StepStatus::Skipped));
        assert_eq!(
            j.error.as_deref(),
            Some("precheck failed: user prod-deploy does not exist")
        );
    }

    #[test]
    fn a_failed_step_skips_the_rest_and_is_undone_by_rollback() {
        let mut j = Journal::for_execution(JobId::new(t(), 1), "lock_iam_user").unwrap();
        j.precheck_passed(Map::new(), t());
        j.step_started(0, t());
        j.step_failed(0, t(), "AccessDenied");
        assert_eq!(j.steps[1].status, StepStatus::Skipped);
        assert_eq!(j.next(), Next::Finish { success: false });
        assert_eq!(j.applied_steps(), 1);
        let rb = Journal::for_rollback(JobId::new(t(), 2), &j, None);
        assert_eq!(rb.steps.len(), 1);
        assert_eq!(rb.steps[0].name, "remove_lock_policy");
    }

    #[test]
    fn a_completed_step_is_never_run_again() {
        let mut j = Journal::for_execution(JobId::new(t(), 1), "rotate_iam_access_key").unwrap();
        j.precheck_passed(Map::new(), t());
        j.step_started(0, t());
        j.step_succeeded(0, t(), "created", Map::new(), vec![]);
        // Reloaded after a crash between the steps.
        let reloaded: Journal = serde_json::from_value(serde_json::to_value(&j).unwrap()).unwrap();
        assert_eq!(
            reloaded.next(),
            Next::Step {
                index: 1,
                resumed: false
            }
        );
    }

    #[test]
    fn a_retried_rollback_keeps_its_succeeded_undo_steps() {
        let mut j = Journal::for_execution(JobId::new(t(), 1), "rotate_iam_access_key").unwrap();
        j.precheck_passed(Map::new(), t());
        for i in 0..2 {
            j.step_started(i, t());
            j.step_succeeded(i, t(), "ok", Map::new(), vec![]);
        }
        let mut rb = Journal::for_rollback(JobId::new(t(), 2), &j, None);
        rb.step_started(0, t());
        rb.step_succeeded(0, t(), "reactivated", Map::new(), vec![]);
        rb.step_started(1, t());
        rb.step_failed(1, t(), "throttled");
        assert_eq!(rb.next(), Next::Finish { success: false });
        let retry = Journal::for_rollback(JobId::new(t(), 3), &j, Some(&rb));
        assert_eq!(retry.steps[0].status, StepStatus::Succeeded);
        assert_eq!(retry.steps[1].status, StepStatus::Pending);
        assert_eq!(
            retry.next(),
            Next::Step {
                index: 1,
                resumed: false
            }
        );
    }

    #[test]
    fn give_up_fails_the_running_step() {
        let mut j = Journal::for_execution(JobId::new(t(), 1), "rotate_iam_access_key").unwrap();
        j.precheck_passed(Map::new(), t());
        j.step_started(0, t());
        j.give_up(t(), "interrupted 5 times");
        assert_eq!(j.steps[0].status, StepStatus::Failed);
        assert_eq!(j.steps[1].status, StepStatus::Skipped);
        assert_eq!(j.next(), Next::Finish { success: false });
    }

    #[test]
    fn the_step_context_merges_outputs_over_the_precheck() {
        let mut j = Journal::for_execution(JobId::new(t(), 1), "rotate_iam_access_key").unwrap();
        let mut ctx = Map::new();
        ctx.insert("old_access_key_id".into(), json!("AKIAOLD"));
        j.precheck_passed(ctx, t());
        let mut out = Map::new();
        out.insert("new_access_key_id".into(), json!("AKIANEW"));
        j.step_succeeded(0, t(), "created", out, vec!["new_secret_access_key".into()]);
        assert_eq!(
            j.step_context(),
            json!({"old_access_key_id": "AKIAOLD", "new_access_key_id": "AKIANEW"})
        );
        assert_eq!(j.secret_outputs, ["new_secret_access_key"]);
    }
}
