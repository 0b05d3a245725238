//! Discovery jobs (api.md §4 discover, §8 jobs): requesting one, and the steps a worker runs.
//!
//! A worker (the server's job loop) drives a discovery through these calls, and makes the
//! provider call between them with no transaction open:
//!
//! 1. [`App::claim_job`]: takes the oldest claimable job under a lease (a queued job, or a
//!    running one whose worker stopped renewing its lease).
//! 2. [`App::begin_discovery`]: loads the connector and opens its credentials; a connector
//!    that is gone or unreadable ends the job at once.
//! 3. `CloudProvider::discover` (async), while [`App::heartbeat_job`] renews the lease and
//!    stores progress.
//! 4. [`App::finish_discovery`]: one transaction merges the result into the assets, updates
//!    the connector, ends the job and audits it.

use crate::connectors::{clean_message, parse_id, SEALED_UNREADABLE};
use crate::{require, Actor, App, AppError, RequestCtx};
use nexplane_domain::asset::{reconcile, Observed};
use nexplane_domain::job::{JobError, Progress};
use nexplane_domain::{
    AssetId, ConnectorId, Job, JobId, JobKind, JobOutcome, Permission, Principal,
};
use nexplane_ports::cloud::{CloudError, CloudFuture, CloudTarget, Discovery, ProgressFn};
use nexplane_ports::{transaction, Repo, StoreError};
use serde_json::{json, Value};
use std::collections::BTreeSet;

/// The `resource_type` of discovery jobs.
pub const CONNECTOR_RESOURCE: &str = "connector";

/// The error of a discovery whose connector was deleted while it ran.
pub const CONNECTOR_DELETED_DURING_RUN: &str =
    "the connector was deleted while its discovery ran; nothing was stored";

/// A discovery a worker is about to run.
#[derive(Debug, Clone)]
pub struct DiscoveryRun {
    /// The job (claimed by this worker).
    pub job: Job,
    /// The connector.
    pub connector_id: ConnectorId,
    /// What the provider needs, credentials open.
    pub target: CloudTarget,
}

/// What [`App::begin_discovery`] decided.
#[derive(Debug, Clone)]
pub enum DiscoveryStart {
    /// Run the provider call, then [`App::finish_discovery`].
    Run(Box<DiscoveryRun>),
    /// Nothing to run: the job ended already (connector gone, credentials unreadable, or the
    /// job is no longer this worker's).
    Done(Option<Box<Job>>),
}

fn job_not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no job {id}"))
}

pub(crate) fn lease_error(e: JobError) -> AppError {
    AppError::Conflict {
        code: "lease_lost",
        detail: e.to_string(),
    }
}

impl App {
    /// `GET /jobs/{id}` (any role).
    pub fn get_job(&self, p: &Principal, id: &str) -> Result<Job, AppError> {
        require(p, Permission::Read)?;
        let jid = JobId::parse(id).map_err(|_| job_not_found(id))?;
        transaction(self.store(), |r: &mut dyn Repo| {
            r.get_job(&jid).map_err(AppError::from)
        })?
        .ok_or_else(|| job_not_found(id))
    }

    /// `POST /connectors/{id}/discover` (operator, admin): queues a discovery, or returns
    /// the one already queued or running for this connector. The second value tells whether
    /// the job is new. A new job is audited as `discovery.started`.
    pub fn request_discovery(
        &self,
        p: &Principal,
        id: &str,
        ctx: &RequestCtx,
    ) -> Result<(Job, bool), AppError> {
        require(p, Permission::ConnectorOperate)?;
        let cid = parse_id(id)?;
        let now = self.now();
        let job = Job::new(
            JobId::new(now, self.deps.random.u128()),
            JobKind::Discovery,
            CONNECTOR_RESOURCE,
            cid.as_str(),
            now,
        );
        let queued = transaction(self.store(), |r: &mut dyn Repo| {
            let Some(c) = r.get_connector(&cid)? else {
                return Err(crate::connectors::not_found(id));
            };
            let active =
                |r: &mut dyn Repo| r.find_active_job(JobKind::Discovery, CONNECTOR_RESOURCE, id);
            if let Some(existing) = active(r)? {
                return Ok((existing, false));
            }
            match r.insert_job(&job) {
                Ok(()) => {}
                // A concurrent request queued one first (unique index): answer with it.
                Err(StoreError::Conflict(_)) => {
                    return active(r)?.map(|j| (j, false)).ok_or_else(|| {
                        AppError::Internal("discovery conflict without an active job".into())
                    });
                }
                Err(e) => return Err(e.into()),
            }
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "discovery.started",
                CONNECTOR_RESOURCE,
                Some(c.id.as_str()),
                json!({"job_id": job.id.as_str(), "connector_name": c.name}),
            )?;
            Ok((job.clone(), true))
        })?;
        if queued.1 {
            self.job_queued();
        }
        Ok(queued)
    }

    /// Claims the oldest claimable job of `kinds` for `worker`, with a lease of
    /// `lease_secs` seconds. `None` when there is nothing to do.
    pub fn claim_job(
        &self,
        worker: &str,
        kinds: &[JobKind],
        lease_secs: i64,
    ) -> Result<Option<Job>, AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let Some(job) = r.next_claimable_job(kinds, now)? else {
                return Ok(None);
            };
            let claimed = job.claim(worker, now, lease_secs).map_err(lease_error)?;
            r.update_job(&claimed)?;
            if claimed.attempts > 1 {
                tracing::info!(job = %claimed.id, worker, attempts = claimed.attempts,
                    "resuming a job whose lease expired");
            }
            Ok(Some(claimed))
        })
    }

    /// Renews `worker`'s lease on a job and stores `progress` when given. Returns `false`
    /// when the worker no longer holds the job (it finished, or another worker took it over
    /// after the lease ran out): the worker must then drop its work.
    pub fn heartbeat_job(
        &self,
        worker: &str,
        job_id: &JobId,
        progress: Option<Progress>,
        lease_secs: i64,
    ) -> Result<bool, AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let Some(job) = r.lock_job(job_id)? else {
                return Ok(false);
            };
            let Ok(mut next) = job.renew(worker, now, lease_secs) else {
                return Ok(false);
            };
            if let Some(p) = progress.clone() {
                next = next.report_progress(worker, p).map_err(lease_error)?;
            }
            r.update_job(&next)?;
            Ok(true)
        })
    }

    /// Prepares a claimed discovery job: loads the connector and opens its credentials.
    /// A connector deleted in the meantime, or credentials that do not open, fail the job
    /// right here (audited as `discovery.failed`).
    pub fn begin_discovery(&self, worker: &str, job: &Job) -> Result<DiscoveryStart, AppError> {
        let cid = match ConnectorId::parse(&job.resource_id) {
            Ok(c) => c,
            Err(_) => {
                let done = self.fail_job(worker, &job.id, None, "not a connector id", None)?;
                return Ok(DiscoveryStart::Done(done.map(Box::new)));
            }
        };
        let loaded = transaction(self.store(), |r: &mut dyn Repo| {
            match r.get_connector(&cid)? {
                Some(c) => {
                    let sealed = r.get_credentials(&cid)?;
                    Ok::<_, AppError>(Some((c, sealed)))
                }
                None => Ok(None),
            }
        })?;
        let Some((connector, sealed)) = loaded else {
            let done = self.fail_job(
                worker,
                &job.id,
                Some(&cid),
                "the connector was deleted before its discovery ran",
                None,
            )?;
            return Ok(DiscoveryStart::Done(done.map(Box::new)));
        };
        let Some(target) = self.open_target(&connector, &sealed) else {
            let done = self.fail_job(worker, &job.id, Some(&cid), SEALED_UNREADABLE, None)?;
            return Ok(DiscoveryStart::Done(done.map(Box::new)));
        };
        Ok(DiscoveryStart::Run(Box::new(DiscoveryRun {
            job: job.clone(),
            connector_id: cid,
            target,
        })))
    }

    /// The provider call of a discovery (no database access; run it with no transaction
    /// open). `progress` receives (phase, done, total) as the provider goes.
    pub fn discover_assets<'a>(
        &'a self,
        run: &'a DiscoveryRun,
        progress: ProgressFn<'a>,
    ) -> CloudFuture<'a, Result<Discovery, CloudError>> {
        self.deps.cloud.discover(&run.target, progress)
    }

    /// Ends a discovery with what the provider returned, in one transaction: the assets are
    /// merged (upsert by connector, type and external id; assets a complete discovery no
    /// longer finds get `removed_at`, reappearing ones lose it), the connector's
    /// `last_discovered_at` moves, the job ends with its counts and any partial failures,
    /// and `discovery.succeeded` or `discovery.failed` is audited.
    ///
    /// Returns `None` when the job is no longer this worker's (its result is dropped). A
    /// connector deleted while its discovery ran fails the job cleanly.
    pub fn finish_discovery(
        &self,
        worker: &str,
        run: &DiscoveryRun,
        outcome: Result<Discovery, CloudError>,
    ) -> Result<Option<Job>, AppError> {
        let discovery = match outcome {
            Ok(d) => d,
            Err(e) => {
                let cid = run.connector_id.clone();
                let exists = transaction(self.store(), |r: &mut dyn Repo| {
                    r.get_connector(&cid).map(|c| c.is_some())
                })?;
                let error = if exists {
                    format!(
                        "discovery failed: {}",
                        clean_message(&e.message, &run.target)
                    )
                } else {
                    CONNECTOR_DELETED_DURING_RUN.to_owned()
                };
                return self.fail_job(worker, &run.job.id, Some(&cid), &error, None);
            }
        };
        let now = self.now();
        let partial: Vec<Value> = discovery
            .errors
            .iter()
            .map(|f| {
                json!({
                    "asset_type": f.asset_type,
                    "region": f.region,
                    "message": clean_message(&f.message, &run.target),
                })
            })
            .collect();
        let incomplete: BTreeSet<String> = discovery
            .errors
            .iter()
            .map(|f| f.asset_type.clone())
            .collect();
        let observed: Vec<Observed> = discovery
            .assets
            .into_iter()
            .map(|a| Observed {
                asset_type: a.asset_type,
                external_id: a.external_id,
                name: a.name,
                region: a.region,
                attributes: a.attributes,
            })
            .collect();
        let job_id = run.job.id.clone();
        let cid = run.connector_id.clone();
        let out = transaction(self.store(), |r: &mut dyn Repo| {
            let Some(job) = r.lock_job(&job_id)? else {
                return Ok(Err(()));
            };
            if !job.is_held_by(worker) {
                return Ok(Err(()));
            }
            let Some(mut connector) = r.lock_connector(&cid)? else {
                return Ok(Ok(None));
            };
            let existing = r.connector_assets(&cid)?;
            let random = &self.deps.random;
            let mut new_id = || AssetId::new(now, random.u128());
            let plan = reconcile(
                &cid,
                connector.environment,
                existing,
                observed,
                &incomplete,
                now,
                &mut new_id,
            );
            r.insert_assets(&plan.inserts)?;
            for a in &plan.updates {
                r.update_asset(a)?;
            }
            r.touch_assets(&plan.touched, now)?;
            r.mark_assets_removed(&plan.removed, now)?;
            connector.last_discovered_at = Some(now);
            r.update_connector(&connector)?;

            let mut result = serde_json::to_value(&plan.summary)
                .map_err(|e| AppError::Internal(format!("discovery summary: {e}")))?;
            result["partial_errors"] = Value::Array(partial.clone());
            let found: u64 = plan.summary.by_type.values().sum();
            let finished = Progress {
                phase: "done".into(),
                done: found,
                total: Some(found),
            };
            let mut done = job
                .report_progress(worker, finished)
                .and_then(|j| j.finish(worker, now, JobOutcome::succeeded(result.clone())))
                .map_err(lease_error)?;
            if !partial.is_empty() {
                // Succeeded with what could be listed; the error says what could not.
                done.error = Some(partial_summary(&partial));
            }
            r.update_job(&done)?;
            let mut payload = json!({
                "job_id": done.id.as_str(),
                "connector_name": connector.name,
                "assets_created": plan.summary.assets_created,
                "assets_updated": plan.summary.assets_updated,
                "assets_removed": plan.summary.assets_removed,
                "by_type": plan.summary.by_type,
            });
            if !partial.is_empty() {
                payload["partial_errors"] = Value::Array(partial.clone());
            }
            self.audit(
                r,
                &RequestCtx::default(),
                Actor::System,
                "discovery.succeeded",
                CONNECTOR_RESOURCE,
                Some(cid.as_str()),
                payload,
            )?;
            Ok::<_, AppError>(Ok(Some(done)))
        })?;
        match out {
            Ok(Some(done)) => Ok(Some(done)),
            // The connector is gone: nothing of this run is kept.
            Ok(None) => self.fail_job(
                worker,
                &job_id,
                Some(&cid),
                CONNECTOR_DELETED_DURING_RUN,
                None,
            ),
            Err(()) => {
                tracing::warn!(job = %job_id, worker, "lost the job's lease; result dropped");
                Ok(None)
            }
        }
    }

    /// Ends a job as failed (when `worker` still holds it), auditing `discovery.failed`.
    /// Returns the ended job, or `None` when the worker no longer holds it.
    pub fn fail_job(
        &self,
        worker: &str,
        job_id: &JobId,
        connector_id: Option<&ConnectorId>,
        error: &str,
        result: Option<Value>,
    ) -> Result<Option<Job>, AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let Some(job) = r.lock_job(job_id)? else {
                return Ok(None);
            };
            if !job.is_held_by(worker) {
                return Ok(None);
            }
            let outcome = JobOutcome::Failed {
                error: error.to_owned(),
                result: result.clone().unwrap_or(Value::Null),
            };
            let done = job.finish(worker, now, outcome).map_err(lease_error)?;
            r.update_job(&done)?;
            if done.kind == JobKind::Discovery {
                self.audit(
                    r,
                    &RequestCtx::default(),
                    Actor::System,
                    "discovery.failed",
                    CONNECTOR_RESOURCE,
                    Some(connector_id.map_or(done.resource_id.as_str(), ConnectorId::as_str)),
                    json!({"job_id": done.id.as_str(), "error": error}),
                )?;
            }
            Ok(Some(done))
        })
    }
}

/// One line naming what a partial discovery could not list.
fn partial_summary(partial: &[Value]) -> String {
    let parts: Vec<String> = partial
        .iter()
        .map(|p| {
            let what = p["asset_type"].as_str().unwrap_or("?");
            let msg = p["message"].as_str().unwrap_or("");
            match p["region"].as_str() {
                Some(region) => format!("{what} in {region}: {msg}"),
                None => format!("{what}: {msg}"),
            }
        })
        .collect();
    format!(
        "partial discovery: {} part(s) failed and kept their previous assets: {}",
        parts.len(),
        parts.join("; ")
    )
}
