//! The job worker: a tokio task that claims jobs from the database under a lease and runs
//! them (api.md §8). Several server replicas each run one; the lease (and `FOR UPDATE SKIP
//! LOCKED` on PostgreSQL) makes them share the queue, and a job whose worker died is taken
//! over once its lease runs out.
//!
//! Database work runs on the blocking pool (`spawn_blocking`); the provider call runs on the
//! async runtime with no transaction open, while a ticker renews the lease and stores the
//! latest progress.

use nexplane_app::agents::AgentDispatch;
use nexplane_app::discovery::{DiscoveryRun, DiscoveryStart};
use nexplane_app::execution::{ChangeRun, ChangeStart};
use nexplane_app::{App, AppError};
use nexplane_domain::execution::Next;
use nexplane_domain::job::Progress;
use nexplane_domain::{Job, JobId, JobKind};
use nexplane_ports::cloud::{ChangeError, CloudError, StepOutcome};
use std::path::PathBuf;
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
    /// How long an agent step waits for the agent's result.
    pub agent_command_timeout: Duration,
    /// Tests only (`NEXPLANE_TEST_PAUSE_AT`): the point of an execution or rollback where
    /// the worker stops for good, and the file it writes the point's name to first.
    pub test_pause: Option<(String, PathBuf)>,
}

/// The file (in the data directory) a paused worker writes its pause point to.
pub const PAUSE_MARKER: &str = "paused-at";

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
            test_pause: None,
            agent_command_timeout: Duration::from_secs(300),
        }
    }

    /// Sets how long an agent step waits for the agent's result.
    pub fn with_agent_command_timeout(mut self, timeout: Duration) -> Self {
        self.agent_command_timeout = timeout;
        self
    }

    /// Sets the test pause point (see [`WorkerOptions::test_pause`]).
    pub fn with_test_pause(mut self, point: Option<String>, marker: PathBuf) -> Self {
        self.test_pause = point.map(|p| (p, marker));
        self
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
    let kinds = [JobKind::Discovery, JobKind::Execution, JobKind::Rollback];
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
        JobKind::Execution | JobKind::Rollback => run_change(app, worker, job, options).await,
    }
}

/// Renews the lease of a job every `renew_every` until dropped (a provider call may take
/// longer than a lease; journal writes renew it too).
struct LeaseKeeper(tokio::task::JoinHandle<()>);

impl LeaseKeeper {
    fn start(app: App, worker: String, job_id: JobId, options: &WorkerOptions) -> Self {
        let (every, lease) = (options.renew_every, options.lease_secs);
        Self(tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.tick().await;
            loop {
                ticker.tick().await;
                let (a, w, id) = (app.clone(), worker.clone(), job_id.clone());
                match blocking(move || a.heartbeat_job(&w, &id, None, lease)).await {
                    Ok(true) => {}
                    Ok(false) => break,
                    Err(e) => tracing::warn!(job = %job_id, error = %e, "cannot renew the lease"),
                }
            }
        }))
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Tests only: stops this job for good at `point` (the process is then killed by the test).
async fn pause_point(options: &WorkerOptions, point: &str) {
    let Some((at, marker)) = &options.test_pause else {
        return;
    };
    if at != point {
        return;
    }
    tracing::warn!(point, "NEXPLANE_TEST_PAUSE_AT reached: this job stops here");
    if let Err(e) = std::fs::write(marker, point) {
        tracing::warn!(error = %e, "cannot write the pause marker");
    }
    std::future::pending::<()>().await;
}

/// Runs one step of an agent change type: queues the command (or finds the one queued before
/// a crash) and waits for the agent's result, at most `agent_command_timeout`; a command
/// nobody answered is cancelled (a late result is refused) and the step fails.
async fn agent_step(
    app: &App,
    run: &ChangeRun,
    index: usize,
    options: &WorkerOptions,
) -> Result<Result<StepOutcome, ChangeError>, AppError> {
    let (a, r) = (app.clone(), run.clone());
    let command = match blocking(move || a.dispatch_agent_step(&r, index)).await? {
        Ok(AgentDispatch::Command(c)) => c,
        Ok(AgentDispatch::Nothing(outcome)) => return Ok(Ok(outcome)),
        Err(e) => return Ok(Err(e)),
    };
    let deadline = Instant::now() + options.agent_command_timeout;
    loop {
        let (a, r, c) = (app.clone(), run.clone(), command.clone());
        if let Some(result) = blocking(move || a.agent_step_result(&r, &c)).await? {
            return Ok(result);
        }
        if Instant::now() >= deadline {
            let secs = options.agent_command_timeout.as_secs();
            let reason = format!("the agent did not answer within {secs} s");
            let (a, c, why) = (app.clone(), command.clone(), reason.clone());
            blocking(move || a.cancel_agent_command(&c, &why)).await?;
            // A result may have landed just before the cancel: it wins.
            let (a, r, c) = (app.clone(), run.clone(), command.clone());
            if let Some(result) = blocking(move || a.agent_step_result(&r, &c)).await? {
                return Ok(result);
            }
            return Ok(Err(ChangeError::Provider(CloudError { message: reason })));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drives an execution or rollback from its journal: the precheck, then each step journaled
/// before and after its provider call, then the end. Any database failure stops the run;
/// the job is resumed from its journal once its lease runs out.
async fn run_change(app: App, worker: String, job: Job, options: WorkerOptions) {
    let job_id = job.id.clone();
    let (a, w) = (app.clone(), worker.clone());
    let mut run: ChangeRun = match blocking(move || a.begin_change(&w, &job)).await {
        Ok(ChangeStart::Run(run)) => *run,
        Ok(ChangeStart::Done) => return,
        Err(e) => {
            tracing::warn!(job = %job_id, error = %e, "cannot start the change job");
            return;
        }
    };
    let kind = run.journal.kind;
    tracing::info!(job = %job_id, change_request = %run.change_request_id, %kind, "change job running");
    let _lease = LeaseKeeper::start(app.clone(), worker.clone(), job_id.clone(), &options);
    loop {
        let next = run.next();
        let stored = match next {
            Next::Precheck => {
                let result = if run.on_agent {
                    let (a, r) = (app.clone(), run.clone());
                    match blocking(move || a.agent_precheck(&r)).await {
                        Ok(result) => result,
                        Err(e) => {
                            tracing::warn!(job = %job_id, error = %e, "cannot run the precheck; resumed after the lease");
                            return;
                        }
                    }
                } else {
                    app.change_precheck(&run).await
                };
                let (a, w) = (app.clone(), worker.clone());
                blocking(move || a.record_precheck(&w, run, result)).await
            }
            Next::Step { index, resumed } => {
                let step = run.step_name(index).to_owned();
                let (a, w) = (app.clone(), worker.clone());
                run = match blocking(move || a.start_step(&w, run, index)).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(e) => {
                        tracing::warn!(job = %job_id, error = %e, "cannot journal the step; resumed after the lease");
                        return;
                    }
                };
                pause_point(&options, &format!("{kind}:{step}:started")).await;
                if resumed {
                    tracing::info!(job = %job_id, step, "reconciling a step interrupted before");
                }
                let result = if run.on_agent {
                    match agent_step(&app, &run, index, &options).await {
                        Ok(r) => r,
                        Err(e) => {
                            tracing::warn!(job = %job_id, error = %e, "cannot run the agent step; resumed after the lease");
                            return;
                        }
                    }
                } else {
                    let context = run.journal.step_context();
                    app.call_step(&run, index, resumed, &context).await
                };
                pause_point(&options, &format!("{kind}:{step}:called")).await;
                let (a, w) = (app.clone(), worker.clone());
                let stored = blocking(move || a.finish_step(&w, run, index, result)).await;
                if matches!(stored, Ok(Some(_))) {
                    pause_point(&options, &format!("{kind}:{step}:journaled")).await;
                }
                stored
            }
            Next::Finish { .. } => {
                let (a, w) = (app.clone(), worker.clone());
                let r = run.clone();
                match blocking(move || a.finish_change(&w, &r)).await {
                    Ok(Some(done)) => tracing::info!(job = %done.id, status = done.status.as_str(),
                        change_request = %run.change_request_id, "change job finished"),
                    Ok(None) => {}
                    Err(e) => tracing::warn!(job = %job_id, error = %e,
                        "cannot end the change job; it is resumed when its lease runs out"),
                }
                return;
            }
        };
        run = match stored {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(job = %job_id, error = %e,
                    "cannot journal the change job; it is resumed when its lease runs out");
                return;
            }
        };
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

/// Every second: wakes the long polls (on this process) of agents that have queued commands,
/// whichever replica queued them — one query for all agents. Every minute: forgets the
/// signatures of agent requests older than the skew window.
pub fn spawn_agent_watcher(
    app: App,
    wakeups: Arc<nexplane_api::agents::AgentWakeups>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            ticker.tick().await;
            n += 1;
            let a = app.clone();
            match blocking(move || a.agents_with_queued_commands()).await {
                Ok(agents) => agents.iter().for_each(|id| wakeups.wake(id)),
                Err(e) => tracing::debug!(error = %e, "cannot list agents with queued commands"),
            }
            if n % 60 == 0 {
                let a = app.clone();
                if let Err(e) = blocking(move || a.forget_agent_signatures()).await {
                    tracing::debug!(error = %e, "cannot forget old agent signatures");
                }
            }
        }
    })
}
