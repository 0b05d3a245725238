//! The job worker: a tokio task that claims jobs from the database under a lease and runs
//! them (api.md §8). Several server replicas each run one; the lease (and `FOR UPDATE SKIP
//! LOCKED` on PostgreSQL) makes them share the queue, and a job whose worker died is taken
//! over once its lease runs out.
//!
//! Database work runs on the blocking pool (`spawn_blocking`); the provider call runs on the
//! async runtime with no transaction open, while a ticker renews the lease and stores the
//! latest progress.

use nexplane_app::discovery::{DiscoveryRun, DiscoveryStart};
use nexplane_app::{App, AppError};
use nexplane_domain::job::Progress;
use nexplane_domain::{Job, JobKind};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Semaphore};

/// How the worker paces itself.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Jobs run at once by this process.
    pub concurrency: usize,
    /// Lease taken on a job, in seconds; renewed well before it ends.
    pub lease_secs: i64,
    /// How often the lease is renewed while a job runs.
    pub renew_every: Duration,
    /// How often progress is written (when it changed).
    pub progress_every: Duration,
    /// How long to wait before looking again when the queue is empty.
    pub idle_poll: Duration,
}

impl WorkerOptions {
    /// Options for a lease of `lease_secs` seconds: renewal every quarter of it.
    pub fn new(concurrency: usize, lease_secs: i64) -> Self {
        let lease_secs = lease_secs.max(4);
        Self {
            concurrency: concurrency.max(1),
            lease_secs,
            renew_every: Duration::from_secs(u64::try_from(lease_secs / 4).unwrap_or(15).max(1)),
            progress_every: Duration::from_millis(500),
            idle_poll: Duration::from_millis(250),
        }
    }
}

/// A running worker; dropping the handle does not stop it, [`WorkerHandle::stop`] does.
#[derive(Debug)]
pub struct WorkerHandle {
    stop: watch::Sender<bool>,
    /// The worker loop.
    pub task: tokio::task::JoinHandle<()>,
}

impl WorkerHandle {
    /// Stops claiming new jobs. Jobs in flight keep their lease until it runs out (another
    /// worker, or this server after a restart, then resumes them).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// A worker name unique to this process (and to each worker of it): process id, start time
/// and a counter.
fn worker_name(app: &App) -> String {
    static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("worker-{}-{:x}-{n}", std::process::id(), app.now().millis())
}

/// Starts the worker loop on the current tokio runtime.
pub fn spawn(app: App, options: WorkerOptions) -> WorkerHandle {
    let (stop, stopped) = watch::channel(false);
    let wake = Arc::new(tokio::sync::Notify::new());
    let w = wake.clone();
    app.on_job_queued(Box::new(move || w.notify_one()));
    let task = tokio::spawn(run(app, options, stopped, wake));
    WorkerHandle { stop, task }
}

async fn blocking<T, F>(f: F) -> Result<T, AppError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, AppError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(AppError::Internal(format!("blocking task failed: {e}"))),
    }
}

async fn run(
    app: App,
    options: WorkerOptions,
    mut stopped: watch::Receiver<bool>,
    wake: Arc<tokio::sync::Notify>,
) {
    let name = worker_name(&app);
    tracing::info!(worker = %name, concurrency = options.concurrency, "job worker started");
    let slots = Arc::new(Semaphore::new(options.concurrency));
    let kinds = [JobKind::Discovery];
    loop {
        if *stopped.borrow() {
            break;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (a, n, lease) = (app.clone(), name.clone(), options.lease_secs);
        let claimed = blocking(move || a.claim_job(&n, &kinds, lease)).await;
        let pause = match claimed {
            Ok(Some(job)) => {
                let (a, n, o) = (app.clone(), name.clone(), options.clone());
                tokio::spawn(async move {
                    run_job(a, n, job, o).await;
                    drop(slot);
                });
                // Look for the next one at once.
                continue;
            }
            Ok(None) => options.idle_poll,
            Err(e) => {
                tracing::warn!(worker = %name, error = %e, "cannot claim jobs");
                options.idle_poll.max(Duration::from_secs(2))
            }
        };
        drop(slot);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = wake.notified() => {}
            _ = stopped.changed() => {}
        }
    }
    tracing::info!(worker = %name, "job worker stopped");
}

async fn run_job(app: App, worker: String, job: Job, options: WorkerOptions) {
    match job.kind {
        JobKind::Discovery => run_discovery(app, worker, job, options).await,
        other => {
            // No worker for this kind in this version: leave it for one that has.
            tracing::warn!(job = %job.id, kind = other.as_str(), "no runner for this job kind");
        }
    }
}

async fn run_discovery(app: App, worker: String, job: Job, options: WorkerOptions) {
    let job_id = job.id.clone();
    let (a, w) = (app.clone(), worker.clone());
    let run: DiscoveryRun = match blocking(move || a.begin_discovery(&w, &job)).await {
        Ok(DiscoveryStart::Run(run)) => *run,
        Ok(DiscoveryStart::Done(_)) => return,
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "cannot start the discovery");
            return;
        }
    };
    tracing::info!(job = %job_id, connector = %run.connector_id, "discovery running");

    let latest: Arc<Mutex<Option<Progress>>> = Arc::new(Mutex::new(None));
    let sink = latest.clone();
    let report = move |phase: &str, done: u64, total: Option<u64>| {
        if let Ok(mut slot) = sink.lock() {
            *slot = Some(Progress {
                phase: phase.to_owned(),
                done,
                total,
            });
        }
    };
    let outcome = {
        let provider_call = app.discover_assets(&run, &report);
        tokio::pin!(provider_call);
        let mut ticker = tokio::time::interval(options.progress_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut renewed = Instant::now();
        loop {
            tokio::select! {
                r = &mut provider_call => break Some(r),
                _ = ticker.tick() => {
                    let progress = latest.lock().ok().and_then(|mut p| p.take());
                    if progress.is_none() && renewed.elapsed() < options.renew_every {
                        continue;
                    }
                    let (a, w, id, lease) =
                        (app.clone(), worker.clone(), job_id.clone(), options.lease_secs);
                    match blocking(move || a.heartbeat_job(&w, &id, progress, lease)).await {
                        Ok(true) => renewed = Instant::now(),
                        Ok(false) => {
                            tracing::warn!(job = %job_id, "lost the job (finished elsewhere or taken over); stopping");
                            break None;
                        }
                        Err(e) => tracing::warn!(job = %job_id, error = %e, "cannot renew the lease"),
                    }
                }
            }
        }
    };
    let Some(outcome) = outcome else { return };
    let (a, w) = (app.clone(), worker.clone());
    match blocking(move || a.finish_discovery(&w, &run, outcome)).await {
        Ok(Some(done)) => {
            tracing::info!(job = %done.id, status = done.status.as_str(), "discovery finished")
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(job = %job_id, error = %e,
            "cannot store the discovery; the job is retried when its lease runs out"),
    }
}
