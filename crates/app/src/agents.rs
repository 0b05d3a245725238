//! Host agents (api.md §7): enrollment tokens and agents (admin side), registration and the
//! signed agent protocol (agent side), and the commands the execution engine sends to agents
//! for the agent change types (§7.3).
//!
//! Secrets: an enrollment token is shown once and stored as its SHA-256; an agent secret is
//! shown once (to the registering agent) and stored sealed under the master key, bound to the
//! agent id, because the server must compute HMACs with it. A command's snapshot (the previous
//! content of a file) is stored sealed too.

use crate::change_requests::parse_id as parse_change_request_id;
use crate::execution::ChangeRun;
use crate::{require, Actor, App, AppError, RequestCtx};
use nexplane_domain::agent::{
    self, timestamp_acceptable, Agent, AgentCommand, AgentStatus, CommandStatus, EnrollmentToken,
    DEFAULT_TOKEN_TTL_SECS, MAX_SKEW_SECS, MAX_TOKEN_TTL_SECS, TOKEN_BITS,
};
use nexplane_domain::auth::refresh_token_hash;
use nexplane_domain::execution::JournalKind;
use nexplane_domain::{
    AgentId, CommandId, EnrollmentTokenId, FieldError, Permission, Principal, SecretString,
    Timestamp,
};
use nexplane_ports::cloud::{ChangeError, CloudError, Prechecked, StepOutcome};
use nexplane_ports::{transaction, Page, Repo, StoreError};
use serde_json::{json, Map, Value};

/// Longest `name` of an enrollment token, and of the agent fields it reports.
pub const NAME_MAX_CHARS: usize = 255;
/// Most registrations one enrollment token may allow.
pub const MAX_USES_LIMIT: u32 = 10_000;

/// `POST /agents/enrollment-tokens` input.
#[derive(Debug, Clone, Default)]
pub struct NewEnrollmentToken {
    /// Label.
    pub name: Option<String>,
    /// Lifetime (default 1800, at most 604800).
    pub ttl_seconds: Option<i64>,
    /// Registrations allowed (default 1).
    pub max_uses: Option<u32>,
}

/// `POST /agent/register` input.
#[derive(Debug, Clone)]
pub struct Registration {
    /// The enrollment token.
    pub enrollment_token: SecretString,
    /// Host name.
    pub hostname: String,
    /// Operating system.
    pub os: String,
    /// CPU architecture.
    pub arch: String,
    /// Agent version.
    pub version: String,
    /// Labels, `{key: string}`.
    pub labels: Option<Value>,
}

/// The signature headers of an agent request, as received.
#[derive(Debug, Clone)]
pub struct AgentCredentials {
    /// `X-Nexplane-Agent`.
    pub agent_id: String,
    /// `X-Nexplane-Timestamp`.
    pub timestamp: String,
    /// `X-Nexplane-Signature`.
    pub signature: String,
}

/// The result an agent reports for a command.
#[derive(Debug, Clone)]
pub struct CommandResult {
    /// `succeeded` or `failed`.
    pub status: String,
    /// What the agent reports (JSON).
    pub output: Value,
    /// The snapshot of the previous state (sealed when stored).
    pub snapshot: Option<Value>,
}

/// What dispatching an agent step did.
#[derive(Debug, Clone)]
pub enum AgentDispatch {
    /// The command to wait for.
    Command(CommandId),
    /// Nothing to send: the step is done already.
    Nothing(StepOutcome),
}

fn agent_not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no agent {id}"))
}

fn token_not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no enrollment token {id}"))
}

fn unauthorized(why: &str) -> AppError {
    AppError::Unauthorized(format!("agent request refused: {why}"))
}

fn agent_actor(id: &AgentId) -> String {
    format!("agent:{id}")
}

fn check_text(field: &str, value: &str, required: bool, errors: &mut Vec<FieldError>) {
    let n = value.chars().count();
    if required && value.trim().is_empty() {
        errors.push(FieldError::new(field, "is required"));
    } else if n > NAME_MAX_CHARS {
        errors.push(FieldError::new(
            field,
            format!("must be at most {NAME_MAX_CHARS} characters"),
        ));
    } else if value.chars().any(char::is_control) {
        errors.push(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
}

impl App {
    fn audit_agent_event(
        &self,
        r: &mut dyn Repo,
        ctx: &RequestCtx,
        actor: Actor<'_>,
        event_type: &str,
        resource_id: &str,
        payload: Value,
    ) -> Result<(), StoreError> {
        self.audit(
            r,
            ctx,
            actor,
            event_type,
            agent::RESOURCE_TYPE,
            Some(resource_id),
            payload,
        )
    }

    /// `POST /agents/enrollment-tokens` (admin): a token shown only in this answer.
    pub fn create_enrollment_token(
        &self,
        p: &Principal,
        input: NewEnrollmentToken,
        ctx: &RequestCtx,
    ) -> Result<(EnrollmentToken, SecretString), AppError> {
        require(p, Permission::AgentAdmin)?;
        let mut errors = Vec::new();
        if let Some(n) = &input.name {
            check_text("name", n, true, &mut errors);
        }
        let ttl = input.ttl_seconds.unwrap_or(DEFAULT_TOKEN_TTL_SECS);
        if !(1..=MAX_TOKEN_TTL_SECS).contains(&ttl) {
            errors.push(FieldError::new(
                "ttl_seconds",
                format!("must be between 1 and {MAX_TOKEN_TTL_SECS}"),
            ));
        }
        let max_uses = input.max_uses.unwrap_or(1);
        if !(1..=MAX_USES_LIMIT).contains(&max_uses) {
            errors.push(FieldError::new(
                "max_uses",
                format!("must be between 1 and {MAX_USES_LIMIT}"),
            ));
        }
        if !errors.is_empty() {
            return Err(AppError::Validation(errors));
        }
        let now = self.now();
        let secret = self.deps.random.token(TOKEN_BITS);
        let token = EnrollmentToken {
            id: EnrollmentTokenId::new(now, self.deps.random.u128()),
            name: input.name.map(|n| n.trim().to_owned()),
            token_hash: refresh_token_hash(secret.expose()),
            expires_at: now.plus_secs(ttl),
            max_uses,
            uses: 0,
            created_by: p.user_id.clone(),
            created_at: now,
            revoked_at: None,
        };
        transaction(self.store(), |r: &mut dyn Repo| {
            r.insert_enrollment_token(&token)?;
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "agent.enrollment_token_created",
                "enrollment_token",
                Some(token.id.as_str()),
                json!({"name": token.name, "expires_at": token.expires_at.to_rfc3339(),
                       "max_uses": token.max_uses}),
            )?;
            Ok::<_, AppError>(())
        })?;
        Ok((token, secret))
    }

    /// `GET /agents/enrollment-tokens` (admin), without the tokens.
    pub fn list_enrollment_tokens(
        &self,
        p: &Principal,
        page: &Page,
    ) -> Result<Vec<EnrollmentToken>, AppError> {
        require(p, Permission::AgentAdmin)?;
        transaction(self.store(), |r: &mut dyn Repo| {
            r.list_enrollment_tokens(page).map_err(AppError::from)
        })
    }

    /// `DELETE /agents/enrollment-tokens/{id}` (admin): no registration may use it any more.
    pub fn revoke_enrollment_token(
        &self,
        p: &Principal,
        id: &str,
        ctx: &RequestCtx,
    ) -> Result<(), AppError> {
        require(p, Permission::AgentAdmin)?;
        let tid = EnrollmentTokenId::parse(id).map_err(|_| token_not_found(id))?;
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let token = r
                .get_enrollment_token(&tid)?
                .ok_or_else(|| token_not_found(id))?;
            if token.revoked_at.is_none() {
                r.revoke_enrollment_token(&tid, now)?;
                self.audit(
                    r,
                    ctx,
                    Actor::User(p),
                    "agent.enrollment_token_revoked",
                    "enrollment_token",
                    Some(id),
                    json!({"name": token.name, "uses": token.uses}),
                )?;
            }
            Ok(())
        })
    }

    /// `GET /agents` (any role), newest first, with each agent's status.
    pub fn list_agents(
        &self,
        p: &Principal,
        page: &Page,
    ) -> Result<Vec<(Agent, AgentStatus)>, AppError> {
        require(p, Permission::Read)?;
        let now = self.now();
        let agents = transaction(self.store(), |r: &mut dyn Repo| {
            r.list_agents(page).map_err(AppError::from)
        })?;
        Ok(agents
            .into_iter()
            .map(|a| {
                let s = a.status(now);
                (a, s)
            })
            .collect())
    }

    /// `GET /agents/{id}` (any role).
    pub fn get_agent(&self, p: &Principal, id: &str) -> Result<(Agent, AgentStatus), AppError> {
        require(p, Permission::Read)?;
        let aid = AgentId::parse(id).map_err(|_| agent_not_found(id))?;
        let agent = transaction(self.store(), |r: &mut dyn Repo| {
            r.get_agent(&aid).map_err(AppError::from)
        })?
        .ok_or_else(|| agent_not_found(id))?;
        let s = agent.status(self.now());
        Ok((agent, s))
    }

    /// `DELETE /agents/{id}` (admin): revokes at once; the agent's queued and dispatched
    /// commands are cancelled (the jobs waiting for them fail their change requests).
    pub fn revoke_agent(&self, p: &Principal, id: &str, ctx: &RequestCtx) -> Result<(), AppError> {
        require(p, Permission::AgentAdmin)?;
        let aid = AgentId::parse(id).map_err(|_| agent_not_found(id))?;
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let mut agent = r.get_agent(&aid)?.ok_or_else(|| agent_not_found(id))?;
            if agent.revoked_at.is_some() {
                return Ok::<_, AppError>(());
            }
            agent.revoked_at = Some(now);
            r.update_agent(&agent)?;
            let open =
                r.agent_commands(&aid, &[CommandStatus::Queued, CommandStatus::Dispatched])?;
            for mut c in open.clone() {
                c.status = CommandStatus::Cancelled;
                c.error = Some(format!("the agent {id} was revoked"));
                c.finished_at = Some(now);
                r.update_command(&c)?;
            }
            self.audit_agent_event(
                r,
                ctx,
                Actor::User(p),
                "agent.revoked",
                id,
                json!({"name": agent.name, "hostname": agent.hostname,
                       "cancelled_commands": open.iter().map(|c| c.id.as_str()).collect::<Vec<_>>()}),
            )?;
            Ok(())
        })?;
        // Wake the agent's waiting poll (if on this process) so it learns at once.
        self.command_queued(&aid);
        Ok(())
    }

    /// `POST /agent/register`: consumes one use of the enrollment token (atomically) and
    /// returns the new agent with its secret (shown only here).
    pub fn register_agent(
        &self,
        input: Registration,
        ctx: &RequestCtx,
    ) -> Result<(Agent, SecretString), AppError> {
        let mut errors = Vec::new();
        check_text("hostname", &input.hostname, true, &mut errors);
        check_text("os", &input.os, true, &mut errors);
        check_text("arch", &input.arch, true, &mut errors);
        check_text("version", &input.version, true, &mut errors);
        let labels = input.labels.unwrap_or_else(|| json!({}));
        match labels.as_object() {
            Some(m) if m.len() <= 64 => {
                for (k, v) in m {
                    check_text(&format!("labels.{k}"), k, true, &mut errors);
                    match v.as_str() {
                        Some(s) => check_text(&format!("labels.{k}"), s, false, &mut errors),
                        None => {
                            errors.push(FieldError::new(format!("labels.{k}"), "must be a string"))
                        }
                    }
                }
            }
            Some(_) => errors.push(FieldError::new("labels", "must have at most 64 entries")),
            None => errors.push(FieldError::new("labels", "must be an object of strings")),
        }
        if !errors.is_empty() {
            return Err(AppError::Validation(errors));
        }
        let now = self.now();
        let hash = refresh_token_hash(input.enrollment_token.expose());
        let id = AgentId::new(now, self.deps.random.u128());
        let secret = self.deps.random.token(TOKEN_BITS);
        let sealed_secret = self.deps.sealer.seal(&secret, id.as_str())?;
        let agent = transaction(self.store(), |r: &mut dyn Repo| {
            let Some(token) = r.consume_enrollment_token(&hash, now)? else {
                return Err(AppError::Unauthorized(
                    "the enrollment token is unknown, expired, revoked or used up".into(),
                ));
            };
            let agent = Agent {
                id: id.clone(),
                name: token
                    .name
                    .clone()
                    .unwrap_or_else(|| input.hostname.trim().to_owned()),
                hostname: input.hostname.trim().to_owned(),
                os: input.os.trim().to_owned(),
                arch: input.arch.trim().to_owned(),
                version: input.version.trim().to_owned(),
                labels: labels.clone(),
                sealed_secret: sealed_secret.clone(),
                enrollment_token_id: token.id.clone(),
                registered_at: now,
                last_heartbeat_at: Some(now),
                revoked_at: None,
            };
            r.insert_agent(&agent)?;
            let actor = agent_actor(&id);
            self.audit_agent_event(
                r,
                ctx,
                Actor::Named {
                    email: &actor,
                    id: None,
                },
                "agent.registered",
                id.as_str(),
                json!({"hostname": agent.hostname, "os": agent.os, "arch": agent.arch,
                       "version": agent.version, "enrollment_token_id": token.id.as_str(),
                       "token_uses": token.uses, "token_max_uses": token.max_uses}),
            )?;
            Ok(agent)
        })?;
        Ok((agent, secret))
    }

    /// Checks a signed agent request (api.md §7.2): a known, unrevoked agent, a timestamp
    /// within 300 s, a valid signature over this exact request, and a signature not seen
    /// before (a replay is refused, on every replica). Any failure is a 401.
    pub fn authenticate_agent(
        &self,
        creds: &AgentCredentials,
        method: &str,
        path_with_query: &str,
        body: &[u8],
    ) -> Result<Agent, AppError> {
        let aid =
            AgentId::parse(creds.agent_id.trim()).map_err(|_| unauthorized("unknown agent"))?;
        let ts: i64 = creds
            .timestamp
            .trim()
            .parse()
            .map_err(|_| unauthorized("X-Nexplane-Timestamp is not Unix seconds"))?;
        let now = self.now();
        if !timestamp_acceptable(ts, now) {
            return Err(unauthorized(
                "the timestamp is more than 300 s away from the server's clock",
            ));
        }
        let signature = creds.signature.trim().to_ascii_lowercase();
        if signature.len() != 64 || !signature.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(unauthorized("malformed signature"));
        }
        transaction(self.store(), |r: &mut dyn Repo| {
            let Some(agent) = r.get_agent(&aid)? else {
                return Err(unauthorized("unknown agent"));
            };
            if agent.revoked_at.is_some() {
                return Err(unauthorized("the agent was revoked"));
            }
            let secret = self
                .deps
                .sealer
                .open(&agent.sealed_secret, aid.as_str())
                .map_err(|e| {
                    AppError::Internal(format!("agent secret of {aid} does not open: {e}"))
                })?;
            let ok = self.deps.agent_signer.verify(
                secret.expose().as_bytes(),
                method,
                path_with_query,
                ts,
                body,
                &signature,
            );
            if !ok {
                return Err(unauthorized("bad signature"));
            }
            let keep_until = Timestamp::from_millis((ts + MAX_SKEW_SECS + 1) * 1000);
            if !r.remember_signature(&aid, &signature, keep_until)? {
                return Err(unauthorized("replayed request"));
            }
            Ok(agent)
        })
    }

    /// `POST /agent/heartbeat`: records the heartbeat (and the reported version and host
    /// name). Returns the server time.
    pub fn agent_heartbeat(
        &self,
        agent: &Agent,
        version: Option<String>,
        hostname: Option<String>,
    ) -> Result<Timestamp, AppError> {
        let mut errors = Vec::new();
        if let Some(v) = &version {
            check_text("version", v, true, &mut errors);
        }
        if let Some(h) = &hostname {
            check_text("hostname", h, true, &mut errors);
        }
        if !errors.is_empty() {
            return Err(AppError::Validation(errors));
        }
        let now = self.now();
        let id = agent.id.clone();
        transaction(self.store(), |r: &mut dyn Repo| {
            let Some(mut a) = r.get_agent(&id)? else {
                return Err(unauthorized("unknown agent"));
            };
            a.last_heartbeat_at = Some(now);
            if let Some(v) = &version {
                a.version = v.trim().to_owned();
            }
            if let Some(h) = &hostname {
                a.hostname = h.trim().to_owned();
            }
            r.update_agent(&a)?;
            Ok(now)
        })
    }

    /// Hands the agent its oldest queued command (marked `dispatched`), if any. (Polls do not
    /// count as heartbeats: an idle poll must not write to the database.)
    pub fn claim_agent_command(&self, agent: &Agent) -> Result<Option<AgentCommand>, AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            // A poll that was waiting when its agent was revoked is woken and ends here.
            if r.get_agent(&agent.id)?
                .is_none_or(|a| a.revoked_at.is_some())
            {
                return Err(unauthorized("the agent was revoked"));
            }
            let Some(mut c) = r.next_queued_command(&agent.id)? else {
                return Ok(None);
            };
            c.status = CommandStatus::Dispatched;
            c.dispatched_at = Some(now);
            r.update_command(&c)?;
            Ok::<_, AppError>(Some(c))
        })
    }

    /// `POST /agent/commands/{id}/result`: one result per command (a second → 409; a
    /// cancelled command → 409); the snapshot is stored sealed. Audited as
    /// `agent.command_completed`.
    pub fn record_command_result(
        &self,
        agent: &Agent,
        id: &str,
        result: CommandResult,
        ctx: &RequestCtx,
    ) -> Result<(), AppError> {
        let not_found = || AppError::NotFound(format!("no command {id} for this agent"));
        let cid = CommandId::parse(id).map_err(|_| not_found())?;
        let status = match result.status.as_str() {
            "succeeded" => CommandStatus::Succeeded,
            "failed" => CommandStatus::Failed,
            _ => return Err(AppError::field("status", "must be succeeded or failed")),
        };
        let sealed_snapshot = match &result.snapshot {
            Some(s) if !s.is_null() => Some(self.deps.sealer.seal(
                &SecretString::new(s.to_string()),
                &format!("{cid}/snapshot"),
            )?),
            _ => None,
        };
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let mut c = r
                .lock_command(&cid)?
                .filter(|c| c.agent_id == agent.id)
                .ok_or_else(not_found)?;
            if c.status.is_final() {
                return Err(AppError::Conflict {
                    code: "result_already_recorded",
                    detail: format!("command {id} is already {}", c.status.as_str()),
                });
            }
            c.status = status;
            c.output = Some(result.output.clone());
            c.sealed_snapshot = sealed_snapshot.clone();
            c.error = (status == CommandStatus::Failed).then(|| {
                result.output["error"]
                    .as_str()
                    .map_or_else(|| "the agent reported a failure".to_owned(), str::to_owned)
            });
            c.finished_at = Some(now);
            r.update_command(&c)?;
            let actor = agent_actor(&agent.id);
            self.audit(
                r,
                ctx,
                Actor::Named {
                    email: &actor,
                    id: None,
                },
                "agent.command_completed",
                "agent_command",
                Some(id),
                json!({"agent_id": agent.id.as_str(), "command_type": c.command_type,
                       "status": status.as_str(), "error": c.error,
                       "change_request_id": c.change_request_id.as_ref().map(|x| x.as_str())}),
            )?;
            Ok(())
        })
    }

    /// The agents with queued commands (for waking their long polls on every replica).
    pub fn agents_with_queued_commands(&self) -> Result<Vec<AgentId>, AppError> {
        transaction(self.store(), |r: &mut dyn Repo| {
            r.agents_with_queued_commands().map_err(AppError::from)
        })
    }

    /// Re-seals every agent secret and command snapshot under the sealer's current key (part
    /// of `nexplane keys rotate-master`, inside its transaction). Returns how many values.
    pub(crate) fn reseal_agent_secrets(&self, r: &mut dyn Repo) -> Result<usize, AppError> {
        let mut n = 0;
        let mut after = None;
        loop {
            let page = r.list_agents(&Page {
                limit: 500,
                after: after.clone(),
            })?;
            let Some(last) = page.last() else { break };
            after = Some(last.id.as_str().to_owned());
            for mut a in page {
                let secret = self.deps.sealer.open(&a.sealed_secret, a.id.as_str())?;
                a.sealed_secret = self.deps.sealer.seal(&secret, a.id.as_str())?;
                r.update_agent(&a)?;
                n += 1;
            }
        }
        for (id, sealed) in r.all_command_snapshots()? {
            let aad = format!("{id}/snapshot");
            let value = self.deps.sealer.open(&sealed, &aad)?;
            r.set_command_snapshot(&id, &self.deps.sealer.seal(&value, &aad)?)?;
            n += 1;
        }
        Ok(n)
    }

    /// Forgets the signatures of requests older than the skew window.
    pub fn forget_agent_signatures(&self) -> Result<u64, AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            r.forget_signatures(now).map_err(AppError::from)
        })
    }

    // -----------------------------------------------------------------------------------------
    // The execution engine's side (agent change types)

    /// The precheck of an agent change type: the target's agent exists, is not revoked and
    /// is online.
    pub fn agent_precheck(
        &self,
        run: &ChangeRun,
    ) -> Result<Result<Prechecked, ChangeError>, AppError> {
        let Some(aid) = run.target["agent_id"].as_str() else {
            return Ok(Err(ChangeError::Refused(
                "the target names no agent_id".into(),
            )));
        };
        let Ok(aid) = AgentId::parse(aid) else {
            return Ok(Err(ChangeError::Refused(format!(
                "agent {aid} does not exist"
            ))));
        };
        let agent = transaction(self.store(), |r: &mut dyn Repo| {
            r.get_agent(&aid).map_err(AppError::from)
        })?;
        let Some(agent) = agent else {
            return Ok(Err(ChangeError::Refused(format!(
                "agent {aid} does not exist"
            ))));
        };
        match agent.status(self.now()) {
            AgentStatus::Online => {}
            s => {
                return Ok(Err(ChangeError::Refused(format!(
                    "agent {aid} ({}) is {}",
                    agent.name,
                    s.as_str()
                ))))
            }
        }
        let mut context = Map::new();
        context.insert("agent_id".into(), json!(aid.as_str()));
        context.insert("agent_name".into(), json!(agent.name));
        Ok(Ok(Prechecked { context }))
    }

    /// Queues the command of step `index` for the target's agent, or returns the one this
    /// job already queued for that step (after a crash). An undo step whose execution step
    /// changed nothing (the agent refused it, or never ran it) needs no command.
    pub fn dispatch_agent_step(
        &self,
        run: &ChangeRun,
        index: usize,
    ) -> Result<Result<AgentDispatch, ChangeError>, AppError> {
        let step = run.step_name(index).to_owned();
        let Some(aid) = run.target["agent_id"]
            .as_str()
            .and_then(|a| AgentId::parse(a).ok())
        else {
            return Ok(Err(ChangeError::Refused(
                "the target names no agent".into(),
            )));
        };
        let path = run.target["path"].as_str().unwrap_or_default().to_owned();
        let context = run.journal.step_context();
        let now = self.now();
        let crid = parse_change_request_id(run.change_request_id.as_str())?;
        transaction(self.store(), |r: &mut dyn Repo| {
            if let Some(existing) = r.find_job_command(&run.job.id, &step)? {
                return Ok(Ok(AgentDispatch::Command(existing.id)));
            }
            let (command_type, params) = match step.as_str() {
                "write_file" => {
                    let mut p = json!({"path": path, "content": run.target["content"]});
                    if let Some(m) = run.target.get("mode").filter(|m| !m.is_null()) {
                        p["mode"] = m.clone();
                    }
                    ("write_file", p)
                }
                "set_file_mode" => (
                    "set_file_mode",
                    json!({"path": path, "mode": run.target["mode"]}),
                ),
                "restore_file" | "restore_file_mode" => {
                    let snapshot = match self.execution_snapshot(r, &context)? {
                        Some(s) => s,
                        None => {
                            return Ok(Ok(AgentDispatch::Nothing(StepOutcome {
                                detail: "the execution changed nothing on the host: nothing to \
                                         undo"
                                    .into(),
                                ..StepOutcome::default()
                            })))
                        }
                    };
                    if step == "restore_file" {
                        ("restore_file", json!({"path": path, "snapshot": snapshot}))
                    } else {
                        (
                            "restore_file_mode",
                            json!({"path": path, "mode": snapshot["mode"]}),
                        )
                    }
                }
                other => return Ok(Err(ChangeError::Unsupported(format!("agent step {other}")))),
            };
            let command = AgentCommand {
                id: CommandId::new(now, self.deps.random.u128()),
                agent_id: aid.clone(),
                change_request_id: Some(crid.clone()),
                job_id: Some(run.job.id.clone()),
                step: step.clone(),
                command_type: command_type.to_owned(),
                params,
                status: CommandStatus::Queued,
                output: None,
                sealed_snapshot: None,
                error: None,
                created_at: now,
                dispatched_at: None,
                finished_at: None,
            };
            r.insert_command(&command)?;
            self.audit(
                r,
                &RequestCtx::default(),
                Actor::System,
                "agent.command_dispatched",
                "agent_command",
                Some(command.id.as_str()),
                json!({"agent_id": aid.as_str(), "command_type": command_type,
                       "path": path, "change_request_id": crid.as_str(),
                       "job_id": run.job.id.as_str(), "step": step}),
            )?;
            Ok(Ok(AgentDispatch::Command(command.id)))
        })
        .inspect(|r| {
            if matches!(r, Ok(AgentDispatch::Command(_))) {
                self.command_queued(&aid);
            }
        })
    }

    /// The snapshot the agent took during the execution (sealed in its command); `None` when
    /// the execution's command did not succeed (it changed nothing).
    fn execution_snapshot(
        &self,
        r: &mut dyn Repo,
        context: &Value,
    ) -> Result<Option<Value>, AppError> {
        let Some(cid) = context["command_id"]
            .as_str()
            .and_then(|c| CommandId::parse(c).ok())
        else {
            return Ok(None);
        };
        let Some(c) = r.get_command(&cid)? else {
            return Ok(None);
        };
        let Some(sealed) = c
            .sealed_snapshot
            .filter(|_| c.status == CommandStatus::Succeeded)
        else {
            return Ok(None);
        };
        let text = self.deps.sealer.open(&sealed, &format!("{cid}/snapshot"))?;
        let v = serde_json::from_str(text.expose())
            .map_err(|e| AppError::Internal(format!("snapshot of {cid}: {e}")))?;
        Ok(Some(v))
    }

    /// The outcome of a dispatched command: `None` while the agent has not answered.
    pub fn agent_step_result(
        &self,
        run: &ChangeRun,
        command: &CommandId,
    ) -> Result<Option<Result<StepOutcome, ChangeError>>, AppError> {
        let c = transaction(self.store(), |r: &mut dyn Repo| {
            r.get_command(command).map_err(AppError::from)
        })?
        .ok_or_else(|| AppError::Internal(format!("command {command} vanished")))?;
        let agent = c.agent_id.as_str();
        Ok(match c.status {
            CommandStatus::Queued | CommandStatus::Dispatched => None,
            CommandStatus::Succeeded => {
                let mut outputs = Map::new();
                if run.journal.kind == JournalKind::Execution {
                    outputs.insert("command_id".into(), json!(c.id.as_str()));
                }
                Some(Ok(StepOutcome {
                    detail: format!(
                        "agent {agent} ran {} on {}",
                        c.command_type,
                        c.params["path"].as_str().unwrap_or("?")
                    ),
                    outputs,
                    secrets: Default::default(),
                }))
            }
            CommandStatus::Failed | CommandStatus::Cancelled => {
                Some(Err(ChangeError::Provider(CloudError {
                    message: format!(
                        "agent {agent}: {} ({})",
                        c.error.unwrap_or_else(|| "failed".into()),
                        c.status.as_str()
                    ),
                })))
            }
        })
    }

    /// Cancels a command nobody answered (a late result is then refused with 409).
    pub fn cancel_agent_command(&self, command: &CommandId, reason: &str) -> Result<(), AppError> {
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            if let Some(mut c) = r.lock_command(command)? {
                if !c.status.is_final() {
                    c.status = CommandStatus::Cancelled;
                    c.error = Some(reason.to_owned());
                    c.finished_at = Some(now);
                    r.update_command(&c)?;
                }
            }
            Ok(())
        })
    }
}
