//! Connectors (api.md §4): create, read, replace and delete them, with their credentials
//! sealed at rest, and test them against the provider.
//!
//! A connector test crosses the network, so it comes in three steps that the caller runs in
//! order, the middle one with no transaction open: [`App::prepare_connector_test`] (blocking:
//! checks, loads and opens the credentials), [`App::probe_connector`] (async: the provider
//! call) and [`App::record_connector_test`] (blocking: stores the outcome with its audit
//! event in one transaction).

use crate::{require, Actor, App, AppError, RequestCtx};
use nexplane_domain::connector::{redact_secrets, validate, ConnectorInput, ValidConnector};
use nexplane_domain::{
    Connector, ConnectorId, ConnectorStatus, Permission, Principal, SecretString, State,
};
use nexplane_ports::cloud::{CloudCredentials, CloudIdentity, CloudTarget};
use nexplane_ports::{transaction, Page, Repo, SealedCredentials, StoreError};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// `POST /connectors` input. `settings` and `credentials` are raw JSON: the rules of
/// [`nexplane_domain::connector::validate`] check them field by field.
#[derive(Debug, Clone)]
pub struct NewConnector {
    /// Unique name.
    pub name: String,
    /// Type, e.g. `aws`.
    pub connector_type: String,
    /// `production` (default), `staging` or `development`.
    pub environment: Option<String>,
    /// Settings object.
    pub settings: Option<Value>,
    /// Credentials object of strings (required).
    pub credentials: Option<Value>,
}

/// `PUT /connectors/{id}` input: `name`, `environment` and `settings` replace the stored
/// ones (an absent `environment` is `production`, absent `settings` are the defaults);
/// `credentials`, when present, replace the whole stored set, and when absent the stored set
/// stays. `type` cannot change: when given it must be the stored one.
#[derive(Debug, Clone)]
pub struct ConnectorReplacement {
    /// Name.
    pub name: String,
    /// Type, if the client sends it.
    pub connector_type: Option<String>,
    /// Environment.
    pub environment: Option<String>,
    /// Settings object.
    pub settings: Option<Value>,
    /// Credentials object of strings.
    pub credentials: Option<Value>,
}

/// A connector ready to be tested: its credentials are open, in memory only.
#[derive(Debug, Clone)]
pub struct ConnectorProbe {
    /// The connector as it was read.
    pub connector: Connector,
    /// What the provider needs. `None` when the stored credentials do not open.
    pub target: Option<CloudTarget>,
}

/// What a provider call returned, and how long it took.
#[derive(Debug, Clone)]
pub struct ProbeResult {
    /// The identity, or the provider's message (already cleaned of credential values).
    pub outcome: Result<CloudIdentity, String>,
    /// Wall time of the call in milliseconds.
    pub latency_ms: u64,
}

/// The answer of `POST /connectors/{id}/test`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestReport {
    /// Whether the credentials work.
    pub ok: bool,
    /// Wall time of the provider call (when ok).
    pub latency_ms: Option<u64>,
    /// Who the credentials are (when ok).
    pub identity: Option<CloudIdentity>,
    /// The provider's message (when not ok), never with a credential value.
    pub error: Option<String>,
}

/// Message of a connector whose stored credentials do not open with the configured keys.
pub(crate) const SEALED_UNREADABLE: &str =
    "the stored credentials cannot be decrypted with the configured master key; \
     re-enter them with PUT /connectors/{id}";

pub(crate) fn not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no connector {id}"))
}

pub(crate) fn parse_id(id: &str) -> Result<ConnectorId, AppError> {
    ConnectorId::parse(id).map_err(|_| not_found(id))
}

fn duplicate_name(name: &str) -> AppError {
    AppError::Conflict {
        code: "duplicate",
        detail: format!("a connector named {name:?} already exists"),
    }
}

/// The audit view of a connector: everything but credential values.
fn audit_view(c: &Connector) -> Value {
    json!({
        "name": c.name,
        "type": c.connector_type,
        "environment": c.environment.as_str(),
        "settings": c.settings,
        "credential_keys": c.credential_keys,
    })
}

impl App {
    /// `GET /connectors` (any role), newest first.
    pub fn list_connectors(&self, p: &Principal, page: &Page) -> Result<Vec<Connector>, AppError> {
        require(p, Permission::Read)?;
        transaction(self.store(), |r: &mut dyn Repo| {
            r.list_connectors(page).map_err(AppError::from)
        })
    }

    /// `GET /connectors/{id}` (any role; an unknown or malformed id is a 404).
    pub fn get_connector(&self, p: &Principal, id: &str) -> Result<Connector, AppError> {
        require(p, Permission::Read)?;
        let cid = parse_id(id)?;
        transaction(self.store(), |r: &mut dyn Repo| {
            r.get_connector(&cid).map_err(AppError::from)
        })?
        .ok_or_else(|| not_found(id))
    }

    /// `POST /connectors` (admin).
    pub fn create_connector(
        &self,
        p: &Principal,
        input: NewConnector,
        ctx: &RequestCtx,
    ) -> Result<Connector, AppError> {
        require(p, Permission::ConnectorAdmin)?;
        let valid = validate(
            ConnectorInput {
                name: input.name,
                connector_type: input.connector_type,
                environment: input.environment,
                settings: input.settings,
                credentials: input.credentials,
            },
            true,
        )
        .map_err(AppError::Validation)?;
        let now = self.now();
        let id = ConnectorId::new(now, self.deps.random.u128());
        let sealed = self.seal_all(&id, valid.credentials.as_ref())?;
        let connector = Connector {
            id,
            name: valid.name,
            connector_type: valid.connector_type,
            environment: valid.environment,
            settings: valid.settings,
            credential_keys: sealed.keys().cloned().collect(),
            status: ConnectorStatus::Untested,
            last_tested_at: None,
            last_test_error: None,
            last_discovered_at: None,
            created_at: now,
            updated_at: now,
        };
        transaction(self.store(), |r: &mut dyn Repo| {
            r.insert_connector(&connector, &sealed)
                .map_err(|e| match e {
                    StoreError::Conflict(_) => duplicate_name(&connector.name),
                    other => other.into(),
                })?;
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "connector.created",
                "connector",
                Some(connector.id.as_str()),
                audit_view(&connector),
            )?;
            Ok(connector.clone())
        })
    }

    /// `PUT /connectors/{id}` (admin). See [`ConnectorReplacement`] for what is replaced.
    /// New credentials or settings reset the status to `untested`.
    pub fn replace_connector(
        &self,
        p: &Principal,
        id: &str,
        input: ConnectorReplacement,
        ctx: &RequestCtx,
    ) -> Result<Connector, AppError> {
        require(p, Permission::ConnectorAdmin)?;
        let cid = parse_id(id)?;
        let stored = transaction(self.store(), |r: &mut dyn Repo| {
            r.get_connector(&cid).map_err(AppError::from)
        })?
        .ok_or_else(|| not_found(id))?;
        let mut type_error = None;
        if let Some(t) = &input.connector_type {
            if *t != stored.connector_type {
                type_error = Some(nexplane_domain::FieldError::new(
                    "type",
                    format!(
                        "the type of a connector cannot change (it is {})",
                        stored.connector_type
                    ),
                ));
            }
        }
        let valid = validate(
            ConnectorInput {
                name: input.name,
                connector_type: stored.connector_type.clone(),
                environment: input.environment,
                settings: input.settings,
                credentials: input.credentials,
            },
            false,
        );
        let valid: ValidConnector = match (valid, type_error) {
            (Ok(v), None) => v,
            (Ok(_), Some(e)) => return Err(AppError::Validation(vec![e])),
            (Err(mut errors), e) => {
                errors.extend(e);
                return Err(AppError::Validation(errors));
            }
        };
        let sealed = match &valid.credentials {
            Some(c) => Some(self.seal_all(&cid, Some(c))?),
            None => None,
        };
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let mut c = r.lock_connector(&cid)?.ok_or_else(|| not_found(id))?;
            let mut changed = Vec::new();
            if c.name != valid.name {
                changed.push("name");
                c.name = valid.name.clone();
            }
            if c.environment != valid.environment {
                changed.push("environment");
                c.environment = valid.environment;
                r.set_assets_environment(&cid, c.environment)?;
            }
            if c.settings != valid.settings {
                changed.push("settings");
                c.settings = valid.settings.clone();
            }
            if let Some(sealed) = &sealed {
                changed.push("credentials");
                r.replace_credentials(&cid, sealed)?;
                c.credential_keys = sealed.keys().cloned().collect();
            }
            if changed.is_empty() {
                return Ok(c);
            }
            if changed.contains(&"settings") || changed.contains(&"credentials") {
                // What was tested is not what is stored any more.
                c.status = ConnectorStatus::Untested;
                c.last_test_error = None;
            }
            c.updated_at = now;
            r.update_connector(&c).map_err(|e| match e {
                StoreError::Conflict(_) => duplicate_name(&c.name),
                other => other.into(),
            })?;
            let mut payload = audit_view(&c);
            payload["changed"] = json!(changed);
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "connector.updated",
                "connector",
                Some(c.id.as_str()),
                payload,
            )?;
            Ok(c)
        })
    }

    /// `DELETE /connectors/{id}` (admin): the connector, its credentials and its assets go;
    /// its audit history and its jobs stay.
    pub fn delete_connector(
        &self,
        p: &Principal,
        id: &str,
        ctx: &RequestCtx,
    ) -> Result<(), AppError> {
        require(p, Permission::ConnectorAdmin)?;
        let cid = parse_id(id)?;
        transaction(self.store(), |r: &mut dyn Repo| {
            let c = r.lock_connector(&cid)?.ok_or_else(|| not_found(id))?;
            refuse_while_change_requests_open(r, &c)?;
            let assets = r.count_connector_assets(&cid)?;
            if !r.delete_connector(&cid)? {
                return Err(not_found(id));
            }
            let mut payload = audit_view(&c);
            payload["assets_deleted"] = json!(assets);
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "connector.deleted",
                "connector",
                Some(c.id.as_str()),
                payload,
            )?;
            Ok(())
        })
    }

    /// Step 1 of `POST /connectors/{id}/test` (operator, admin): loads the connector and
    /// opens its credentials.
    pub fn prepare_connector_test(
        &self,
        p: &Principal,
        id: &str,
    ) -> Result<ConnectorProbe, AppError> {
        require(p, Permission::ConnectorOperate)?;
        let cid = parse_id(id)?;
        let (connector, sealed) = transaction(self.store(), |r: &mut dyn Repo| {
            let Some(c) = r.get_connector(&cid)? else {
                return Err(not_found(id));
            };
            let sealed = r.get_credentials(&cid)?;
            Ok((c, sealed))
        })?;
        let target = self.open_target(&connector, &sealed);
        Ok(ConnectorProbe { connector, target })
    }

    /// Step 2 of `POST /connectors/{id}/test`: asks the provider who the credentials are.
    /// Makes no database call; never fails (a failure is the outcome).
    pub async fn probe_connector(&self, probe: &ConnectorProbe) -> ProbeResult {
        let Some(target) = &probe.target else {
            return ProbeResult {
                outcome: Err(SEALED_UNREADABLE.to_owned()),
                latency_ms: 0,
            };
        };
        let started = std::time::Instant::now();
        let outcome = self.deps.cloud.test(target).await;
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        ProbeResult {
            outcome: outcome.map_err(|e| clean_message(&e.message, target)),
            latency_ms,
        }
    }

    /// Step 3 of `POST /connectors/{id}/test`: records `status`, `last_tested_at` and
    /// `last_test_error` with a `connector.tested` audit event. A connector deleted meanwhile
    /// is a 404.
    pub fn record_connector_test(
        &self,
        p: &Principal,
        probe: &ConnectorProbe,
        result: ProbeResult,
        ctx: &RequestCtx,
    ) -> Result<TestReport, AppError> {
        require(p, Permission::ConnectorOperate)?;
        let cid = probe.connector.id.clone();
        let now = self.now();
        let report = match result.outcome {
            Ok(identity) => TestReport {
                ok: true,
                latency_ms: Some(result.latency_ms),
                identity: Some(identity),
                error: None,
            },
            Err(message) => TestReport {
                ok: false,
                latency_ms: None,
                identity: None,
                error: Some(message),
            },
        };
        transaction(self.store(), |r: &mut dyn Repo| {
            let mut c = r
                .lock_connector(&cid)?
                .ok_or_else(|| not_found(cid.as_str()))?;
            c.status = if report.ok {
                ConnectorStatus::Ok
            } else {
                ConnectorStatus::Error
            };
            c.last_tested_at = Some(now);
            c.last_test_error = report.error.clone();
            r.update_connector(&c)?;
            let payload = match (&report.identity, &report.error) {
                (Some(i), _) => json!({
                    "ok": true,
                    "latency_ms": report.latency_ms,
                    "account_id": i.account_id,
                    "arn": i.arn,
                }),
                (None, error) => json!({"ok": false, "error": error}),
            };
            self.audit(
                r,
                ctx,
                Actor::User(p),
                "connector.tested",
                "connector",
                Some(c.id.as_str()),
                payload,
            )?;
            Ok(report.clone())
        })
    }

    /// Seals every credential value of connector `id` (its id is the associated data).
    fn seal_all(
        &self,
        id: &ConnectorId,
        credentials: Option<&BTreeMap<String, SecretString>>,
    ) -> Result<SealedCredentials, AppError> {
        let mut out = SealedCredentials::new();
        for (name, value) in credentials.into_iter().flatten() {
            out.insert(name.clone(), self.deps.sealer.seal(value, id.as_str())?);
        }
        Ok(out)
    }

    /// The provider's view of a connector, with its credentials opened; `None` when a
    /// stored value does not open (wrong master key, tampering).
    pub(crate) fn open_target(
        &self,
        connector: &Connector,
        sealed: &SealedCredentials,
    ) -> Option<CloudTarget> {
        let mut values = BTreeMap::new();
        for (name, v) in sealed {
            match self.deps.sealer.open(v, connector.id.as_str()) {
                Ok(secret) => {
                    values.insert(name.clone(), secret);
                }
                Err(e) => {
                    tracing::warn!(connector = %connector.id, credential = %name, error = %e,
                        "a stored credential does not open");
                    return None;
                }
            }
        }
        Some(CloudTarget {
            connector_type: connector.connector_type.clone(),
            settings: connector.settings.clone(),
            credentials: CloudCredentials { values },
        })
    }

    /// Re-seals every stored credential under the sealer's current key, in one transaction
    /// (`nexplane keys rotate-master`). Returns how many values were re-sealed. Audited as
    /// `keys.master_rotated` by `system`, with counts only.
    pub fn reseal_credentials(&self, new_key_id: &str) -> Result<usize, AppError> {
        transaction(self.store(), |r: &mut dyn Repo| {
            let all = r.all_credentials()?;
            let mut connectors = std::collections::BTreeSet::new();
            for (id, name, sealed) in &all {
                let value = self.deps.sealer.open(sealed, id.as_str()).map_err(|e| {
                    AppError::Internal(format!(
                        "credential {name} of connector {id} does not open with any known \
                         master key: {e}"
                    ))
                })?;
                let resealed = self.deps.sealer.seal(&value, id.as_str())?;
                r.update_credential(id, name, &resealed)?;
                connectors.insert(id.clone());
            }
            let secrets = self.reseal_secret_outputs(r)?;
            let agents = self.reseal_agent_secrets(r)?;
            self.audit(
                r,
                &RequestCtx::default(),
                Actor::System,
                "keys.master_rotated",
                "master_key",
                Some(new_key_id),
                json!({"credentials_resealed": all.len(), "connectors": connectors.len(),
                    "secret_outputs_resealed": secrets, "agent_values_resealed": agents,
                    "via": "cli"}),
            )?;
            Ok(all.len())
        })
    }
}

/// A provider message, trimmed, bounded and cleaned of any credential value it might echo.
pub(crate) fn clean_message(message: &str, target: &CloudTarget) -> String {
    const MAX: usize = 2000;
    let cleaned = redact_secrets(message.trim(), target.credentials.values.values());
    let cleaned = if cleaned.is_empty() {
        "the provider gave no message".to_owned()
    } else {
        cleaned
    };
    if cleaned.chars().count() > MAX {
        let mut s: String = cleaned.chars().take(MAX).collect();
        s.push('…');
        s
    } else {
        cleaned
    }
}

/// api.md §4: a connector cannot be deleted while a change request on it is `submitted`,
/// `approved`, `executing` or `rolling_back` (409 `connector_in_use`). The caller holds the
/// connector's lock, and submitting a change request takes the same lock, so the answer stays
/// true until the delete commits.
fn refuse_while_change_requests_open(r: &mut dyn Repo, c: &Connector) -> Result<(), AppError> {
    let blocking: Vec<State> = State::ALL
        .into_iter()
        .filter(|s| s.blocks_connector_delete())
        .collect();
    let open = r.count_connector_change_requests(&c.id, &blocking)?;
    if open > 0 {
        return Err(AppError::Conflict {
            code: "connector_in_use",
            detail: format!(
                "connector {} has {open} change request(s) that are submitted, approved, \
                 executing or rolling back; cancel or finish them first",
                c.id
            ),
        });
    }
    Ok(())
}
