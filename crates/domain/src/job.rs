//! Background jobs (api.md §8): discovery, execution and rollback, claimed by workers under a
//! lease.
//!
//! The functions here are the pure half of the job queue: they decide whether a worker may
//! claim, renew or finish a job at `now` and what the job looks like afterwards. The store
//! persists the result with a compare-and-set on the previous `status`, `lease_owner` and
//! `lease_until` (or `FOR UPDATE SKIP LOCKED`), so two workers never both win.
//!
//! A worker holds a job while it is `running` with `lease_owner` set to the worker's name.
//! Once `lease_until` has passed, any worker may claim the job again (the previous worker
//! crashed or stalled); the new claim changes the owner, and the old worker's renew or finish
//! is then refused.
//!
//! ```
//! use nexplane_domain::job::{Job, JobKind, JobOutcome, JobStatus, DEFAULT_LEASE_SECS};
//! use nexplane_domain::{JobId, Timestamp};
//!
//! let t0 = Timestamp::from_secs(1_800_000_000);
//! let job = Job::new(JobId::new(t0, 1), JobKind::Discovery, "connector", "conn_x", t0);
//! let a = job.claim("worker-a", t0, DEFAULT_LEASE_SECS).unwrap();
//! assert_eq!(a.status, JobStatus::Running);
//!
//! // Worker A goes silent; after the lease another worker takes over.
//! let later = t0.plus_secs(DEFAULT_LEASE_SECS + 1);
//! assert!(a.claim("worker-b", t0.plus_secs(10), DEFAULT_LEASE_SECS).is_err());
//! let b = a.claim("worker-b", later, DEFAULT_LEASE_SECS).unwrap();
//! assert_eq!(b.attempts, 2);
//! assert!(b.finish("worker-a", later, JobOutcome::succeeded(serde_json::json!({}))).is_err());
//! let done = b.finish("worker-b", later, JobOutcome::succeeded(serde_json::json!({}))).unwrap();
//! assert_eq!(done.status, JobStatus::Succeeded);
//! ```

use crate::{JobId, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// The default lease a worker holds on a job, in seconds (api.md §6.2).
pub const DEFAULT_LEASE_SECS: i64 = 60;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Discover a connector's assets.
    Discovery,
    /// Execute a change request.
    Execution,
    /// Roll back a change request.
    Rollback,
}

impl JobKind {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Discovery => "discovery",
            JobKind::Execution => "execution",
            JobKind::Rollback => "rollback",
        }
    }

    /// Parses a kind name.
    pub fn parse(s: &str) -> Option<JobKind> {
        [JobKind::Discovery, JobKind::Execution, JobKind::Rollback]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker.
    Queued,
    /// Claimed by a worker (whose lease may have expired).
    Running,
    /// Finished successfully.
    Succeeded,
    /// Finished with an error.
    Failed,
}

impl JobStatus {
    /// The name used in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
        }
    }

    /// Parses a status name.
    pub fn parse(s: &str) -> Option<JobStatus> {
        [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// Whether the job has ended.
    pub fn is_finished(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed)
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How far a job has got.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// What it is doing, e.g. `iam_user` or `create_access_key`.
    pub phase: String,
    /// Units done.
    pub done: u64,
    /// Units in total, when known.
    pub total: Option<u64>,
}

/// A background job (api.md §8). The lease fields are internal: the API does not show them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Id.
    pub id: JobId,
    /// What it does.
    pub kind: JobKind,
    /// Where it stands.
    pub status: JobStatus,
    /// The kind of resource it works on: `connector` or `change_request`.
    pub resource_type: String,
    /// That resource's id.
    pub resource_id: String,
    /// Progress.
    pub progress: Progress,
    /// Result (e.g. discovery counts); `null` until there is one.
    pub result: Value,
    /// Why it failed (no secrets).
    pub error: Option<String>,
    /// Created.
    pub created_at: Timestamp,
    /// First claimed.
    pub started_at: Option<Timestamp>,
    /// Finished.
    pub finished_at: Option<Timestamp>,
    /// The worker holding (or that last held) the lease.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lease_owner: Option<String>,
    /// The lease ends at this time.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub lease_until: Option<Timestamp>,
    /// How many times the job was claimed (a number above 1 means it was resumed).
    #[serde(default)]
    pub attempts: u32,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobOutcome {
    /// It succeeded with this result.
    Succeeded {
        /// The job's result.
        result: Value,
    },
    /// It failed.
    Failed {
        /// Why (no secrets).
        error: String,
        /// Whatever partial result there is (`null` for none).
        result: Value,
    },
}

impl JobOutcome {
    /// Success with `result`.
    pub fn succeeded(result: Value) -> JobOutcome {
        JobOutcome::Succeeded { result }
    }

    /// Failure with an error message and no result.
    pub fn failed(error: impl Into<String>) -> JobOutcome {
        JobOutcome::Failed {
            error: error.into(),
            result: Value::Null,
        }
    }
}

/// Why a job operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The job has already finished.
    #[error("job already {status}")]
    Finished {
        /// Its final status.
        status: JobStatus,
    },
    /// Another worker holds a lease that has not expired.
    #[error("job is leased by {owner} until {until}")]
    Leased {
        /// The holder.
        owner: String,
        /// When the lease ends.
        until: Timestamp,
    },
    /// The worker does not hold the job (it was never claimed by it, or taken over).
    #[error("worker {worker} does not hold this job")]
    NotHeld {
        /// The worker that asked.
        worker: String,
    },
    /// A worker name must not be empty, and a lease must last at least a second.
    #[error("invalid lease request")]
    InvalidLease,
}

impl Job {
    /// A new queued job for `resource_type`/`resource_id`.
    pub fn new(
        id: JobId,
        kind: JobKind,
        resource_type: impl Into<String>,
        resource_id: impl Into<String>,
        now: Timestamp,
    ) -> Job {
        Job {
            id,
            kind,
            status: JobStatus::Queued,
            resource_type: resource_type.into(),
            resource_id: resource_id.into(),
            progress: Progress::default(),
            result: Value::Null,
            error: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            lease_owner: None,
            lease_until: None,
            attempts: 0,
        }
    }

    /// Whether the lease has run out at `now` (false when there is no lease).
    pub fn lease_expired(&self, now: Timestamp) -> bool {
        self.lease_until.is_some_and(|until| now >= until)
    }

    /// Whether a worker may claim the job at `now`: it is queued, or running with an expired
    /// (or missing) lease.
    pub fn is_claimable(&self, now: Timestamp) -> bool {
        match self.status {
            JobStatus::Queued => true,
            JobStatus::Running => self.lease_until.is_none() || self.lease_expired(now),
            JobStatus::Succeeded | JobStatus::Failed => false,
        }
    }

    /// Whether `worker` holds the job: it is running and `worker` is the lease owner. (An
    /// expired lease is still held until another worker claims the job.)
    pub fn is_held_by(&self, worker: &str) -> bool {
        self.status == JobStatus::Running && self.lease_owner.as_deref() == Some(worker)
    }

    /// `worker` claims the job at `now` for `lease_secs` seconds: a queued job starts, a
    /// running job whose lease expired is taken over (its progress is kept, so the worker
    /// resumes). `attempts` counts claims.
    pub fn claim(&self, worker: &str, now: Timestamp, lease_secs: i64) -> Result<Job, JobError> {
        if worker.is_empty() || lease_secs < 1 {
            return Err(JobError::InvalidLease);
        }
        if self.status.is_finished() {
            return Err(JobError::Finished {
                status: self.status,
            });
        }
        if !self.is_claimable(now) {
            return Err(JobError::Leased {
                owner: self.lease_owner.clone().unwrap_or_default(),
                until: self.lease_until.unwrap_or(now),
            });
        }
        let mut next = self.clone();
        next.status = JobStatus::Running;
        next.started_at = Some(self.started_at.unwrap_or(now));
        next.lease_owner = Some(worker.to_owned());
        next.lease_until = Some(now.plus_secs(lease_secs));
        next.attempts = self.attempts.saturating_add(1);
        Ok(next)
    }

    /// `worker` extends its lease to `now + lease_secs`.
    pub fn renew(&self, worker: &str, now: Timestamp, lease_secs: i64) -> Result<Job, JobError> {
        if lease_secs < 1 {
            return Err(JobError::InvalidLease);
        }
        self.check_held(worker)?;
        let mut next = self.clone();
        next.lease_until = Some(now.plus_secs(lease_secs));
        Ok(next)
    }

    /// `worker` records progress (the lease is not extended).
    pub fn report_progress(&self, worker: &str, progress: Progress) -> Result<Job, JobError> {
        self.check_held(worker)?;
        let mut next = self.clone();
        next.progress = progress;
        Ok(next)
    }

    /// `worker` ends the job at `now` with `outcome`; the lease is released.
    pub fn finish(
        &self,
        worker: &str,
        now: Timestamp,
        outcome: JobOutcome,
    ) -> Result<Job, JobError> {
        self.check_held(worker)?;
        let mut next = self.clone();
        match outcome {
            JobOutcome::Succeeded { result } => {
                next.status = JobStatus::Succeeded;
                next.result = result;
                next.error = None;
            }
            JobOutcome::Failed { error, result } => {
                next.status = JobStatus::Failed;
                next.result = result;
                next.error = Some(error);
            }
        }
        next.finished_at = Some(now);
        next.lease_until = None;
        Ok(next)
    }

    fn check_held(&self, worker: &str) -> Result<(), JobError> {
        if self.status.is_finished() {
            return Err(JobError::Finished {
                status: self.status,
            });
        }
        if !self.is_held_by(worker) {
            return Err(JobError::NotHeld {
                worker: worker.to_owned(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_secs(1_800_000_000 + s)
    }

    fn job() -> Job {
        Job::new(
            JobId::new(t(0), 9),
            JobKind::Execution,
            "change_request",
            "cr_x",
            t(0),
        )
    }

    #[test]
    fn new_job_is_queued_and_claimable() {
        let j = job();
        assert_eq!(j.status, JobStatus::Queued);
        assert!(j.is_claimable(t(0)));
        assert_eq!(j.result, Value::Null);
        assert!(!j.is_held_by("w"));
    }

    #[test]
    fn claim_sets_lease_and_blocks_others_until_it_expires() {
        let j = job().claim("w1", t(5), 60).unwrap();
        assert_eq!(j.status, JobStatus::Running);
        assert_eq!(j.started_at, Some(t(5)));
        assert_eq!(j.lease_until, Some(t(65)));
        assert_eq!(j.attempts, 1);
        assert!(j.is_held_by("w1"));
        assert_eq!(
            j.claim("w2", t(64), 60),
            Err(JobError::Leased {
                owner: "w1".into(),
                until: t(65)
            })
        );
        let k = j.claim("w2", t(65), 60).unwrap();
        assert_eq!(k.lease_owner.as_deref(), Some("w2"));
        assert_eq!(k.started_at, Some(t(5)), "a takeover keeps the first start");
        assert_eq!(k.attempts, 2);
        // The old worker lost it.
        assert_eq!(
            k.renew("w1", t(66), 60),
            Err(JobError::NotHeld {
                worker: "w1".into()
            })
        );
        assert!(k.report_progress("w1", Progress::default()).is_err());
    }

    #[test]
    fn renew_and_progress() {
        let j = job().claim("w1", t(0), 60).unwrap();
        let j = j.renew("w1", t(50), 60).unwrap();
        assert_eq!(j.lease_until, Some(t(110)));
        assert!(!j.is_claimable(t(100)));
        // An expired lease nobody took over can still be renewed by its holder.
        let j = j.renew("w1", t(200), 60).unwrap();
        assert_eq!(j.lease_until, Some(t(260)));
        let p = Progress {
            phase: "iam_user".into(),
            done: 3,
            total: Some(10),
        };
        let j = j.report_progress("w1", p.clone()).unwrap();
        assert_eq!(j.progress, p);
        assert_eq!(
            job().renew("w1", t(0), 60),
            Err(JobError::NotHeld {
                worker: "w1".into()
            })
        );
    }

    #[test]
    fn finish_succeeded_and_failed() {
        let j = job().claim("w1", t(0), 60).unwrap();
        let ok = j
            .finish(
                "w1",
                t(9),
                JobOutcome::succeeded(json!({"assets_created": 2})),
            )
            .unwrap();
        assert_eq!(ok.status, JobStatus::Succeeded);
        assert_eq!(ok.finished_at, Some(t(9)));
        assert_eq!(ok.result["assets_created"], 2);
        assert_eq!(ok.lease_until, None);
        assert!(!ok.is_claimable(t(1000)));
        assert_eq!(
            ok.claim("w2", t(1000), 60),
            Err(JobError::Finished {
                status: JobStatus::Succeeded
            })
        );
        assert!(ok.finish("w1", t(10), JobOutcome::failed("late")).is_err());

        let bad = j
            .finish(
                "w1",
                t(9),
                JobOutcome::failed("precheck failed: no such user"),
            )
            .unwrap();
        assert_eq!(bad.status, JobStatus::Failed);
        assert_eq!(bad.error.as_deref(), Some("precheck failed: no such user"));
        assert!(j.finish("w2", t(9), JobOutcome::failed("x")).is_err());
    }

    #[test]
    fn invalid_lease_requests() {
        assert_eq!(job().claim("", t(0), 60), Err(JobError::InvalidLease));
        assert_eq!(job().claim("w", t(0), 0), Err(JobError::InvalidLease));
        let j = job().claim("w", t(0), 60).unwrap();
        assert_eq!(j.renew("w", t(1), 0), Err(JobError::InvalidLease));
    }

    #[test]
    fn serializes_for_the_api() {
        let v = serde_json::to_value(job()).unwrap();
        assert_eq!(v["kind"], "execution");
        assert_eq!(v["status"], "queued");
        assert_eq!(
            v["progress"],
            json!({"phase": "", "done": 0, "total": null})
        );
        assert!(v.get("lease_owner").is_none());
        for k in [JobKind::Discovery, JobKind::Execution, JobKind::Rollback] {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
        for s in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
        }
    }
}
