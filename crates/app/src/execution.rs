//! Executing and rolling back change requests (api.md §6, §6.2, §8): the endpoints that queue
//! the jobs, the steps a worker runs, and the one-time reveal of secret outputs.
//!
//! `POST /change-requests/{id}/execute` (and `/rollback`) moves the change request to
//! `executing` (`rolling_back`), creates its job and its journal (every step `pending`) and
//! audits it, all in one transaction. A worker then drives the job with these calls, making
//! each provider call with no transaction open:
//!
//! 1. [`App::begin_change`]: loads the change request, its journal and the connector's
//!    credentials. A job interrupted too often, or whose connector cannot be used, ends here.
//! 2. Per [`ChangeRun::next`]: the precheck ([`App::change_precheck`], then
//!    [`App::record_precheck`]), or one step: [`App::start_step`] journals it `running`,
//!    [`App::call_step`] calls the provider, [`App::finish_step`] journals the result (and
//!    seals secret outputs) — so a crash between two of them leaves a journal that says
//!    exactly which step may have been made, and the next worker reconciles that step with
//!    the provider before acting again.
//! 3. [`App::finish_change`]: the change request becomes `complete`/`failed`
//!    (`rolledback`/`rollback_failed`), the job ends, the event is audited.
//!
//! Every journal write first checks, under the job's row lock, that the worker still holds
//! the job (and renews its lease): a worker whose lease was taken over can never write again.

use crate::change_requests::{domain_error, not_found, parse_id};
use crate::connectors::{clean_message, SEALED_UNREADABLE};
use crate::discovery::lease_error;
use crate::{require, App, AppError, RequestCtx};
use nexplane_domain::change_request::{self as domain, Action};
use nexplane_domain::execution::{Journal, JournalKind, Next};
use nexplane_domain::job::JobOutcome;
use nexplane_domain::{
    Actor, ChangeRequest, ChangeRequestId, Job, JobId, JobKind, Permission, Principal, Role,
    SecretString, State,
};
use nexplane_ports::cloud::{
    ChangeError, CloudFuture, CloudTarget, Prechecked, StepCall, StepOutcome,
};
use nexplane_ports::{transaction, Repo};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The `resource_type` of execution and rollback jobs.
pub const CHANGE_REQUEST_RESOURCE: &str = "change_request";

/// How many times a job may be started before the engine gives up on it (a job whose worker
/// keeps dying mid-step must not loop for ever).
pub const MAX_JOB_ATTEMPTS: u32 = 5;

/// A change request with its execution and rollback journals (`GET /change-requests/{id}`).
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeRequestView {
    /// The change request.
    pub change_request: ChangeRequest,
    /// The execution journal, once executed.
    pub execution: Option<Journal>,
    /// The rollback journal, once rolled back.
    pub rollback: Option<Journal>,
}

impl ChangeRequestView {
    /// A change request that has never run.
    pub fn new(change_request: ChangeRequest) -> Self {
        Self {
            change_request,
            execution: None,
            rollback: None,
        }
    }
}

/// An execution or rollback a worker is running.
#[derive(Debug, Clone)]
pub struct ChangeRun {
    /// The job (claimed by this worker).
    pub job: Job,
    /// The change request.
    pub change_request_id: ChangeRequestId,
    /// Its change type.
    pub change_type: String,
    /// Its target.
    pub target: Value,
    /// The journal as last stored.
    pub journal: Journal,
    /// What the provider needs, credentials open (empty for agent change types).
    pub cloud: CloudTarget,
    /// Whether the change runs on a host agent (api.md §7.3) rather than a cloud provider.
    pub on_agent: bool,
}

impl ChangeRun {
    /// What to do next, from the journal.
    pub fn next(&self) -> Next {
        self.journal.next()
    }

    /// The name of step `index`.
    pub fn step_name(&self, index: usize) -> &str {
        self.journal
            .steps
            .get(index)
            .map_or("", |s| s.name.as_str())
    }
}

/// What [`App::begin_change`] decided.
#[derive(Debug, Clone)]
pub enum ChangeStart {
    /// Drive the run.
    Run(Box<ChangeRun>),
    /// Nothing to run (the job ended, or is no longer this worker's).
    Done,
}

fn kind_of(job: &Job) -> Option<JournalKind> {
    match job.kind {
        JobKind::Execution => Some(JournalKind::Execution),
        JobKind::Rollback => Some(JournalKind::Rollback),
        JobKind::Discovery => None,
    }
}

fn job_kind(kind: JournalKind) -> JobKind {
    match kind {
        JournalKind::Execution => JobKind::Execution,
        JournalKind::Rollback => JobKind::Rollback,
    }
}

fn change_error_message(e: &ChangeError, cloud: &CloudTarget) -> String {
    clean_message(&e.to_string(), cloud)
}

/// The associated data a secret output is sealed with: it can only be opened as that output
/// of that change request.
fn secret_aad(id: &ChangeRequestId, name: &str) -> String {
    format!("{id}/secret/{name}")
}

impl App {
    /// Loads the journals of `cr`.
    pub(crate) fn view(
        &self,
        r: &mut dyn Repo,
        cr: ChangeRequest,
    ) -> Result<ChangeRequestView, AppError> {
        let (execution, rollback) = if cr.executed_at.is_some() {
            (
                r.get_journal(&cr.id, JournalKind::Execution)?,
                r.get_journal(&cr.id, JournalKind::Rollback)?,
            )
        } else {
            (None, None)
        };
        Ok(ChangeRequestView {
            change_request: cr,
            execution,
            rollback,
        })
    }

    /// The journals of a page of change requests, loaded together (no query per row).
    pub(crate) fn views(
        &self,
        r: &mut dyn Repo,
        crs: Vec<ChangeRequest>,
    ) -> Result<Vec<ChangeRequestView>, AppError> {
        let ran: Vec<ChangeRequestId> = crs
            .iter()
            .filter(|c| c.executed_at.is_some())
            .map(|c| c.id.clone())
            .collect();
        let mut journals: BTreeMap<(String, &'static str), Journal> = BTreeMap::new();
        if !ran.is_empty() {
            for (id, j) in r.get_journals(&ran)? {
                journals.insert((id.as_str().to_owned(), j.kind.as_str()), j);
            }
        }
        Ok(crs
            .into_iter()
            .map(|cr| {
                let key = |k: JournalKind| (cr.id.as_str().to_owned(), k.as_str());
                let execution = journals.remove(&key(JournalKind::Execution));
                let rollback = journals.remove(&key(JournalKind::Rollback));
                ChangeRequestView {
                    change_request: cr,
                    execution,
                    rollback,
                }
            })
            .collect())
    }

    /// `POST /change-requests/{id}/execute` (operator, admin) and `/rollback`: queues the job,
    /// or returns the one already running (the second value tells whether it is new).
    pub fn run_change_request(
        &self,
        p: &Principal,
        id: &str,
        kind: JournalKind,
        ctx: &RequestCtx,
    ) -> Result<(Job, bool), AppError> {
        require(p, Permission::ChangeRequestExecute)?;
        let crid = parse_id(id)?;
        let actor = Actor::from(p);
        let policy = self.policy();
        let now = self.now();
        let job_id = JobId::new(now, self.deps.random.u128());
        let running_state = match kind {
            JournalKind::Execution => State::Executing,
            JournalKind::Rollback => State::RollingBack,
        };
        let out = transaction(self.store(), |r: &mut dyn Repo| {
            let current = r.lock_change_request(&crid)?.ok_or_else(|| not_found(id))?;
            if current.state == running_state {
                // Repeated while its job runs: the same job.
                let journal = r.get_journal(&crid, kind)?.ok_or_else(|| {
                    AppError::Internal(format!("{id} is {running_state} without a journal"))
                })?;
                let job = r.get_job(&journal.job_id)?.ok_or_else(|| {
                    AppError::Internal(format!("{id} is {running_state} without its job"))
                })?;
                return Ok::<_, AppError>((job, false));
            }
            let action = match kind {
                JournalKind::Execution => Action::Execute,
                JournalKind::Rollback => Action::Rollback,
            };
            let (next, mut events) =
                domain::apply(&current, action, &actor, &policy, now).map_err(domain_error)?;
            let journal = match kind {
                JournalKind::Execution => Journal::for_execution(job_id.clone(), &next.change_type)
                    .ok_or_else(|| {
                        AppError::Internal(format!("no plan for {}", next.change_type))
                    })?,
                JournalKind::Rollback => {
                    let execution =
                        r.get_journal(&crid, JournalKind::Execution)?
                            .ok_or_else(|| {
                                AppError::Internal(format!("{id} has no execution journal"))
                            })?;
                    let previous = r.get_journal(&crid, JournalKind::Rollback)?;
                    Journal::for_rollback(job_id.clone(), &execution, previous.as_ref())
                }
            };
            let job = Job::new(
                job_id.clone(),
                job_kind(kind),
                CHANGE_REQUEST_RESOURCE,
                crid.as_str(),
                now,
            );
            r.insert_job(&job)?;
            r.put_journal(&crid, &journal, now)?;
            r.update_change_request(&next)?;
            for e in &mut events {
                e.payload["job_id"] = json!(job.id.as_str());
            }
            self.append_events(r, ctx, &events)?;
            Ok((job, true))
        })?;
        if out.1 {
            self.job_queued();
        }
        Ok(out)
    }

    /// `POST /change-requests/{id}/reveal-secrets` (the requester or an admin): the secret
    /// outputs, once. They are destroyed in the same transaction; a second call is a 410.
    /// Audited as `change_request.secrets_revealed` with the names only.
    pub fn reveal_secrets(
        &self,
        p: &Principal,
        id: &str,
        ctx: &RequestCtx,
    ) -> Result<BTreeMap<String, SecretString>, AppError> {
        require(p, Permission::Read)?;
        let crid = parse_id(id)?;
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let cr = r.lock_change_request(&crid)?.ok_or_else(|| not_found(id))?;
            if p.role != Role::Admin && p.user_id != cr.requested_by {
                return Err(AppError::Forbidden(
                    "only the requester or an admin may reveal secret outputs".into(),
                ));
            }
            let journal = r.get_journal(&crid, JournalKind::Execution)?;
            let Some(mut journal) = journal.filter(|j| !j.secret_outputs.is_empty()) else {
                return Err(AppError::Conflict {
                    code: "no_secret_outputs",
                    detail: format!(
                        "change request {id} (state {}) has produced no secret outputs",
                        cr.state
                    ),
                });
            };
            let sealed = r.get_secrets(&crid)?;
            if journal.secrets_revealed_at.is_some() || sealed.is_empty() {
                return Err(AppError::Gone(format!(
                    "the secret outputs of change request {id} are gone: they are revealed \
                     once, and destroyed when the change is rolled back"
                )));
            }
            let mut values = BTreeMap::new();
            for (name, v) in &sealed {
                let value = self
                    .deps
                    .sealer
                    .open(v, &secret_aad(&crid, name))
                    .map_err(|e| {
                        AppError::Internal(format!(
                            "secret output {name} of {id} does not open: {e}"
                        ))
                    })?;
                values.insert(name.clone(), value);
            }
            r.delete_secrets(&crid)?;
            journal.secrets_revealed_at = Some(now);
            r.put_journal(&crid, &journal, now)?;
            let names: Vec<&String> = values.keys().collect();
            let event = domain::DomainEvent {
                event_type: domain::EventType::SecretsRevealed,
                change_request_id: crid.clone(),
                actor: p.email.clone(),
                actor_id: Some(p.user_id.clone()),
                at: now,
                payload: json!({"names": names, "state": cr.state}),
            };
            self.append_events(r, ctx, &[event])?;
            Ok(values)
        })
    }

    /// Prepares a claimed execution or rollback job.
    pub fn begin_change(&self, worker: &str, job: &Job) -> Result<ChangeStart, AppError> {
        let Some(kind) = kind_of(job) else {
            return Err(AppError::Internal(format!(
                "job {} is not a change job",
                job.id
            )));
        };
        let crid = ChangeRequestId::parse(&job.resource_id)
            .map_err(|_| AppError::Internal(format!("job {} names no change request", job.id)))?;
        let loaded = transaction(self.store(), |r: &mut dyn Repo| {
            let cr = r.get_change_request(&crid)?;
            let journal = r.get_journal(&crid, kind)?;
            let connector = match cr.as_ref().and_then(|c| c.connector_id.clone()) {
                Some(cid) => match r.get_connector(&cid)? {
                    Some(c) => {
                        let sealed = r.get_credentials(&cid)?;
                        Some((c, sealed))
                    }
                    None => None,
                },
                None => None,
            };
            Ok::<_, AppError>((cr, journal, connector))
        })?;
        let (cr, journal, connector) = loaded;
        let (Some(cr), Some(journal)) = (cr, journal) else {
            self.end_orphan_job(worker, job, "the change request or its journal is gone")?;
            return Ok(ChangeStart::Done);
        };
        if journal.job_id != job.id {
            self.end_orphan_job(
                worker,
                job,
                "superseded by a newer job of the change request",
            )?;
            return Ok(ChangeStart::Done);
        }
        let mut run = ChangeRun {
            job: job.clone(),
            change_request_id: crid,
            change_type: cr.change_type.clone(),
            target: cr.target.clone(),
            journal,
            on_agent: cr.connector_id.is_none(),
            cloud: CloudTarget {
                connector_type: String::new(),
                settings: Value::Null,
                credentials: nexplane_ports::cloud::CloudCredentials {
                    values: BTreeMap::new(),
                },
            },
        };
        let cloud = match connector {
            Some((connector, sealed)) => self
                .open_target(&connector, &sealed)
                .ok_or(SEALED_UNREADABLE),
            None if run.on_agent => Ok(run.cloud.clone()),
            None => Err("the connector of this change request no longer exists"),
        };
        let give_up = match cloud {
            Ok(c) => {
                run.cloud = c;
                (job.attempts > MAX_JOB_ATTEMPTS).then(|| {
                    format!(
                        "the job was interrupted {} times; gave up (the provider may hold a \
                         partly made step: check it before rolling back)",
                        job.attempts - 1
                    )
                })
            }
            Err(reason) => Some(reason.to_owned()),
        };
        if let Some(reason) = give_up {
            if !run.journal.is_finished() {
                let now = self.now();
                run.journal.give_up(now, reason);
                match self.store_journal(worker, &run)? {
                    Some(()) => {}
                    None => return Ok(ChangeStart::Done),
                }
            }
        }
        if job.attempts > 1 {
            tracing::info!(job = %run.job.id, change_request = %run.change_request_id,
                "resuming an interrupted change job from its journal");
        }
        Ok(ChangeStart::Run(Box::new(run)))
    }

    /// The precheck's provider call (no database access).
    pub fn change_precheck<'a>(
        &'a self,
        run: &'a ChangeRun,
    ) -> CloudFuture<'a, Result<Prechecked, ChangeError>> {
        self.deps
            .changes
            .precheck(&run.cloud, &run.change_type, &run.target)
    }

    /// Journals the precheck's result. `None` when the worker lost the job.
    pub fn record_precheck(
        &self,
        worker: &str,
        mut run: ChangeRun,
        result: Result<Prechecked, ChangeError>,
    ) -> Result<Option<ChangeRun>, AppError> {
        let now = self.now();
        match result {
            Ok(p) => run.journal.precheck_passed(p.context, now),
            Err(e) => run
                .journal
                .precheck_failed(change_error_message(&e, &run.cloud), now),
        }
        Ok(self.store_journal(worker, &run)?.map(|()| run))
    }

    /// Journals step `index` as started, before its provider call.
    pub fn start_step(
        &self,
        worker: &str,
        mut run: ChangeRun,
        index: usize,
    ) -> Result<Option<ChangeRun>, AppError> {
        run.journal.step_started(index, self.now());
        Ok(self.store_journal(worker, &run)?.map(|()| run))
    }

    /// The provider call of step `index` (apply during an execution, undo during a
    /// rollback). `resumed`: the step was started before an interruption.
    pub fn call_step<'a>(
        &'a self,
        run: &'a ChangeRun,
        index: usize,
        resumed: bool,
        context: &'a Value,
    ) -> CloudFuture<'a, Result<StepOutcome, ChangeError>> {
        let call = StepCall {
            change_type: &run.change_type,
            step: run.step_name(index),
            target: &run.target,
            context,
            resumed,
        };
        match run.journal.kind {
            JournalKind::Execution => self.deps.changes.apply_step(&run.cloud, call),
            JournalKind::Rollback => self.deps.changes.undo_step(&run.cloud, call),
        }
    }

    /// Journals the result of step `index`; secret outputs are sealed and stored in the same
    /// transaction.
    pub fn finish_step(
        &self,
        worker: &str,
        mut run: ChangeRun,
        index: usize,
        result: Result<StepOutcome, ChangeError>,
    ) -> Result<Option<ChangeRun>, AppError> {
        let now = self.now();
        let mut sealed = Vec::new();
        match result {
            Ok(outcome) => {
                for (name, value) in &outcome.secrets {
                    let aad = secret_aad(&run.change_request_id, name);
                    sealed.push((name.clone(), self.deps.sealer.seal(value, &aad)?));
                }
                let detail = clean_message(&outcome.detail, &run.cloud);
                let detail = redact_values(&detail, outcome.secrets.values());
                run.journal.step_succeeded(
                    index,
                    now,
                    detail,
                    outcome.outputs,
                    outcome.secrets.keys().cloned().collect(),
                );
            }
            Err(e) => {
                let message = change_error_message(&e, &run.cloud);
                run.journal.step_failed(index, now, message);
            }
        }
        let stored = self.with_job(worker, &run.job.id, |r| {
            for (name, value) in &sealed {
                r.put_secret(&run.change_request_id, name, value, now)?;
            }
            r.put_journal(&run.change_request_id, &run.journal, now)?;
            Ok(())
        })?;
        Ok(stored.map(|()| run))
    }

    /// Ends the run: the change request's final state, the job's end and the audit event, in
    /// one transaction. `None` when the worker lost the job.
    pub fn finish_change(&self, worker: &str, run: &ChangeRun) -> Result<Option<Job>, AppError> {
        let Next::Finish { success } = run.journal.next() else {
            return Err(AppError::Internal(format!(
                "job {} is not finished: {:?}",
                run.job.id,
                run.journal.next()
            )));
        };
        let now = self.now();
        let policy = self.policy();
        let journal = &run.journal;
        let action = match journal.kind {
            JournalKind::Execution => Action::ExecutionFinished {
                success,
                applied_steps: journal.applied_steps(),
            },
            JournalKind::Rollback => Action::RollbackFinished { success },
        };
        self.with_job(worker, &run.job.id, |r| {
            let job = r
                .lock_job(&run.job.id)?
                .ok_or_else(|| AppError::Internal("job vanished".into()))?;
            let cr = r
                .lock_change_request(&run.change_request_id)?
                .ok_or_else(|| AppError::Internal("change request vanished".into()))?;
            let (next, mut events) =
                domain::apply(&cr, action.clone(), &domain::Actor::System, &policy, now)
                    .map_err(domain_error)?;
            let result = json!({
                "change_request_id": cr.id.as_str(),
                "outputs": journal.outputs,
                "applied_steps": journal.applied_steps(),
                "secret_outputs": journal.secret_outputs,
            });
            let outcome = if success {
                JobOutcome::succeeded(result)
            } else {
                JobOutcome::Failed {
                    error: journal.error.clone().unwrap_or_else(|| "failed".into()),
                    result,
                }
            };
            let done = job.finish(worker, now, outcome).map_err(lease_error)?;
            r.update_job(&done)?;
            r.update_change_request(&next)?;
            // A change rolled back leaves nothing its secrets could open (e.g. the new access
            // key is deleted): secrets never revealed are destroyed with it.
            if journal.kind == JournalKind::Rollback && success {
                r.delete_secrets(&run.change_request_id)?;
            }
            for e in &mut events {
                e.payload["job_id"] = json!(run.job.id.as_str());
                e.payload["outputs"] = Value::Object(journal.outputs.clone());
                e.payload["steps"] = json!(journal
                    .steps
                    .iter()
                    .map(|s| json!({"name": s.name, "status": s.status}))
                    .collect::<Vec<_>>());
                if let Some(err) = &journal.error {
                    e.payload["error"] = json!(err);
                }
                if !journal.secret_outputs.is_empty() {
                    e.payload["secret_outputs"] = json!(journal.secret_outputs);
                }
            }
            self.append_events(r, &RequestCtx::default(), &events)?;
            Ok(done)
        })
    }

    /// Stores the run's journal if the worker still holds the job (renewing its lease).
    fn store_journal(&self, worker: &str, run: &ChangeRun) -> Result<Option<()>, AppError> {
        let now = self.now();
        self.with_job(worker, &run.job.id, |r| {
            r.put_journal(&run.change_request_id, &run.journal, now)?;
            Ok(())
        })
    }

    /// Runs `f` in a transaction in which `worker` still holds the job (its lease renewed);
    /// `None`, with nothing written, when it does not.
    fn with_job<T>(
        &self,
        worker: &str,
        job_id: &JobId,
        f: impl FnOnce(&mut dyn Repo) -> Result<T, AppError>,
    ) -> Result<Option<T>, AppError> {
        let now = self.now();
        let lease = self.settings.job_lease_secs;
        let out = transaction(self.store(), |r: &mut dyn Repo| {
            let Some(job) = r.lock_job(job_id)? else {
                return Ok(None);
            };
            let Ok(renewed) = job.renew(worker, now, lease) else {
                return Ok(None);
            };
            r.update_job(&renewed)?;
            f(r).map(Some)
        })?;
        if out.is_none() {
            tracing::warn!(job = %job_id, worker, "lost the job (finished elsewhere or taken over); stopping");
        }
        Ok(out)
    }

    /// Ends a change job that has nothing to run (its change request or journal is gone, or
    /// a newer job replaced it).
    fn end_orphan_job(&self, worker: &str, job: &Job, reason: &str) -> Result<(), AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let Some(current) = r.lock_job(&job.id)? else {
                return Ok(());
            };
            if let Ok(done) = current.finish(worker, now, JobOutcome::failed(reason)) {
                r.update_job(&done)?;
            }
            Ok::<_, AppError>(())
        })
    }

    /// Re-seals every stored secret output under the sealer's current key (part of
    /// `nexplane keys rotate-master`). Returns how many were re-sealed.
    pub(crate) fn reseal_secret_outputs(&self, r: &mut dyn Repo) -> Result<usize, AppError> {
        let all = r.all_secrets()?;
        let now = self.now();
        for (id, name, sealed) in &all {
            let aad = secret_aad(id, name);
            let value = self.deps.sealer.open(sealed, &aad).map_err(|e| {
                AppError::Internal(format!(
                    "secret output {name} of {id} does not open with any known master key: {e}"
                ))
            })?;
            r.put_secret(id, name, &self.deps.sealer.seal(&value, &aad)?, now)?;
        }
        Ok(all.len())
    }
}

/// `text` with every secret value replaced by `[redacted]` (a provider could echo one).
fn redact_values<'a>(text: &str, secrets: impl Iterator<Item = &'a SecretString>) -> String {
    let mut out = text.to_owned();
    for s in secrets {
        let v = s.expose();
        if !v.is_empty() {
            out = out.replace(v, "[redacted]");
        }
    }
    out
}
