//! Change requests (api.md §6) up to the decision: create, list, read, edit, submit, approve,
//! reject and cancel. Execution and rollback are in [`crate::execution`].
//!
//! Every rule of the state machine lives in [`nexplane_domain::change_request`]; this module
//! resolves what the domain cannot see (the connector and its environment, the policy from
//! [`crate::Settings`], the caller), then runs each transition in one transaction: it re-reads
//! and locks the change request, applies the action, stores the new state and appends the
//! audit events the domain returned. Two approvals racing on the same change request are
//! therefore counted one after the other, never both against the same old value.

use crate::execution::ChangeRequestView;
use crate::{require, App, AppError, RequestCtx};
use nexplane_domain::change_request::{self as domain, Action, DomainError, NewChangeRequest};
use nexplane_domain::change_type::{builtin_catalog, find_builtin, ChangeType, ConnectorType};
use nexplane_domain::{
    Actor, ChangeRequest, ChangeRequestId, ConnectorId, Environment, FieldError, Permission,
    Policy, Principal, State, UserId,
};
use nexplane_ports::{transaction, ChangeRequestFilter, Page, Repo};
use serde_json::{json, Value};

/// `POST /change-requests` input.
#[derive(Debug, Clone)]
pub struct CreateChangeRequest {
    /// Title (1–200 characters).
    pub title: String,
    /// Description (may be absent).
    pub description: Option<String>,
    /// The connector (required for `aws` change types), as sent.
    pub connector_id: Option<String>,
    /// Name of a change type of `GET /change-types`.
    pub change_type: String,
    /// The target; absent means `{}` (and the schema names what is missing).
    pub target: Option<Value>,
}

/// `PUT /change-requests/{id}` input: each present field replaces the stored one.
#[derive(Debug, Clone, Default)]
pub struct EditChangeRequest {
    /// New title.
    pub title: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New target (validated against the change type's schema).
    pub target: Option<Value>,
}

/// Filters of `GET /change-requests`, as sent (checked here: a bad value is a 422).
#[derive(Debug, Clone, Default)]
pub struct ChangeRequestQuery {
    /// A state name, e.g. `submitted`.
    pub state: Option<String>,
    /// A connector id.
    pub connector_id: Option<String>,
    /// A change type name.
    pub change_type: Option<String>,
    /// A user id.
    pub requested_by: Option<String>,
}

/// The actions of `POST /change-requests/{id}/{action}` this module serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// `submit`.
    Submit,
    /// `approve` with an optional comment.
    Approve {
        /// Comment.
        comment: Option<String>,
    },
    /// `reject` with a reason (required).
    Reject {
        /// Reason.
        reason: Option<String>,
    },
    /// `cancel`.
    Cancel,
}

pub(crate) fn not_found(id: &str) -> AppError {
    AppError::NotFound(format!("no change request {id}"))
}

pub(crate) fn parse_id(id: &str) -> Result<ChangeRequestId, AppError> {
    ChangeRequestId::parse(id).map_err(|_| not_found(id))
}

/// The one mapping of a refused domain action to the use-case error.
pub(crate) fn domain_error(e: DomainError) -> AppError {
    match e {
        DomainError::InvalidTransition { .. }
        | DomainError::AlreadyApproved
        | DomainError::RollbackUnsupported { .. } => AppError::Conflict {
            code: e.code(),
            detail: e.to_string(),
        },
        DomainError::Forbidden { .. } | DomainError::SelfApproval => {
            AppError::Forbidden(e.to_string())
        }
        DomainError::Validation(errors) => AppError::Validation(errors),
    }
}

/// Reports on `connector_id` when a connector of `connector_type` cannot carry a change of
/// type `ct` (agent change types take no connector; the domain reports that one).
fn check_connector_type(ct: &ChangeType, connector_type: &str, errors: &mut Vec<FieldError>) {
    if ct.connector_type == ConnectorType::Agent || ct.connector_type.as_str() == connector_type {
        return;
    }
    errors.push(FieldError::new(
        "connector_id",
        format!(
            "is a {connector_type} connector; change type {} needs a {} connector",
            ct.name,
            ct.connector_type.as_str()
        ),
    ));
}

impl App {
    /// The rules of the state machine, from the settings.
    pub(crate) fn policy(&self) -> Policy {
        Policy {
            allow_self_approval: self.settings.allow_self_approval,
            required_approvals: self.settings.required_approvals,
        }
    }

    /// Appends the domain's events inside the caller's transaction.
    pub(crate) fn append_events(
        &self,
        r: &mut dyn Repo,
        ctx: &RequestCtx,
        events: &[nexplane_domain::DomainEvent],
    ) -> Result<(), AppError> {
        for ev in events {
            let id = self.new_event_id(ev.at);
            r.append_audit(ev.to_audit_event(id, ctx.request_id.clone()))?;
        }
        Ok(())
    }

    /// `GET /change-types` (any role): the catalog.
    pub fn list_change_types(&self, p: &Principal) -> Result<&'static [ChangeType], AppError> {
        require(p, Permission::Read)?;
        Ok(builtin_catalog())
    }

    /// `GET /change-requests` (any role), newest first, with filters.
    pub fn list_change_requests(
        &self,
        p: &Principal,
        query: &ChangeRequestQuery,
        page: &Page,
    ) -> Result<Vec<ChangeRequestView>, AppError> {
        require(p, Permission::Read)?;
        let mut errors = Vec::new();
        let state = query.state.as_deref().and_then(|s| {
            let parsed = State::parse(s);
            if parsed.is_none() {
                errors.push(FieldError::new("state", "is not a change-request state"));
            }
            parsed
        });
        let connector_id = query.connector_id.as_deref().and_then(|c| {
            ConnectorId::parse(c)
                .map_err(|_| errors.push(FieldError::new("connector_id", "is not a connector id")))
                .ok()
        });
        let requested_by = query.requested_by.as_deref().and_then(|u| {
            UserId::parse(u)
                .map_err(|_| errors.push(FieldError::new("requested_by", "is not a user id")))
                .ok()
        });
        if let Some(t) = &query.change_type {
            if find_builtin(t).is_none() {
                errors.push(FieldError::new("change_type", "is not a known change type"));
            }
        }
        if !errors.is_empty() {
            return Err(AppError::Validation(errors));
        }
        let filter = ChangeRequestFilter {
            state,
            connector_id,
            change_type: query.change_type.clone(),
            requested_by,
        };
        transaction(self.store(), |r: &mut dyn Repo| {
            let found = r.list_change_requests(&filter, page)?;
            self.views(r, found)
        })
    }

    /// `GET /change-requests/{id}` (any role; an unknown or malformed id is a 404).
    pub fn get_change_request(
        &self,
        p: &Principal,
        id: &str,
    ) -> Result<ChangeRequestView, AppError> {
        require(p, Permission::Read)?;
        let crid = parse_id(id)?;
        transaction(self.store(), |r: &mut dyn Repo| {
            let cr = r.get_change_request(&crid)?.ok_or_else(|| not_found(id))?;
            self.view(r, cr)
        })
    }

    /// `POST /change-requests` (operator, admin): a new `draft`. The change type must exist,
    /// the connector must exist and be of the change type's connector type, and the target
    /// must match the change type's schema (422 with field paths such as `target.iam_user`).
    /// The risk is computed from the connector's environment.
    pub fn create_change_request(
        &self,
        p: &Principal,
        input: CreateChangeRequest,
        ctx: &RequestCtx,
    ) -> Result<ChangeRequest, AppError> {
        require(p, Permission::ChangeRequestWrite)?;
        let now = self.now();
        let id = ChangeRequestId::new(now, self.deps.random.u128());
        let actor = Actor::from(p);
        let policy = self.policy();
        let change_type = find_builtin(&input.change_type);
        let mut errors = Vec::new();
        let connector_id = match input.connector_id.as_deref() {
            None => None,
            Some(c) => match ConnectorId::parse(c) {
                Ok(cid) => Some(cid),
                Err(_) => {
                    errors.push(FieldError::new("connector_id", "is not a connector id"));
                    None
                }
            },
        };
        transaction(self.store(), |r: &mut dyn Repo| {
            let mut errors = errors;
            let mut environment = Environment::default();
            if let Some(cid) = &connector_id {
                match r.get_connector(cid)? {
                    None => errors.push(FieldError::new("connector_id", "no such connector")),
                    Some(c) => {
                        environment = c.environment;
                        if let Some(ct) = change_type {
                            check_connector_type(ct, &c.connector_type, &mut errors);
                        }
                    }
                }
            }
            // An agent change type names its agent: it must exist and not be revoked.
            let on_agent = change_type.is_some_and(|ct| ct.connector_type == ConnectorType::Agent);
            let named = input.target.as_ref().and_then(|t| t["agent_id"].as_str());
            if let Some(agent) = named.filter(|_| on_agent) {
                let known = match nexplane_domain::AgentId::parse(agent) {
                    Ok(aid) => r.get_agent(&aid)?,
                    Err(_) => None,
                };
                match known {
                    None => errors.push(FieldError::new("target.agent_id", "no such agent")),
                    Some(a) if a.revoked_at.is_some() => {
                        errors.push(FieldError::new("target.agent_id", "the agent is revoked"))
                    }
                    Some(_) => {}
                }
            }
            let new = NewChangeRequest {
                id: id.clone(),
                title: input.title.clone(),
                description: input.description.clone().unwrap_or_default(),
                connector_id: connector_id.clone(),
                change_type: input.change_type.clone(),
                target: input.target.clone().unwrap_or_else(|| json!({})),
                environment,
            };
            let (cr, events) = match domain::create(new, &actor, &policy, now) {
                Ok(v) if errors.is_empty() => v,
                Ok(_) => return Err(AppError::Validation(errors)),
                Err(DomainError::Validation(more)) => {
                    // A connector already reported (malformed, unknown, wrong type) is not
                    // also "required".
                    let reported = errors.iter().any(|e| e.field == "connector_id");
                    errors.extend(
                        more.into_iter()
                            .filter(|e| !(reported && e.field == "connector_id")),
                    );
                    return Err(AppError::Validation(errors));
                }
                Err(e) => return Err(domain_error(e)),
            };
            r.insert_change_request(&cr)?;
            self.append_events(r, ctx, &events)?;
            Ok(cr)
        })
    }

    /// `PUT /change-requests/{id}` (the requester or an admin, `draft` only): replaces the
    /// title, description and target that are present; the risk is recomputed with the
    /// connector's current environment.
    pub fn edit_change_request(
        &self,
        p: &Principal,
        id: &str,
        input: EditChangeRequest,
        ctx: &RequestCtx,
    ) -> Result<ChangeRequest, AppError> {
        require(p, Permission::ChangeRequestWrite)?;
        let crid = parse_id(id)?;
        let actor = Actor::from(p);
        let policy = self.policy();
        let now = self.now();
        transaction(self.store(), |r: &mut dyn Repo| {
            let current = r.lock_change_request(&crid)?.ok_or_else(|| not_found(id))?;
            let environment = match &current.connector_id {
                Some(cid) => r.get_connector(cid)?.map(|c| c.environment),
                None => None,
            };
            let action = Action::Edit {
                title: input.title.clone(),
                description: input.description.clone(),
                target: input.target.clone(),
                environment,
            };
            let (next, events) =
                domain::apply(&current, action, &actor, &policy, now).map_err(domain_error)?;
            r.update_change_request(&next)?;
            self.append_events(r, ctx, &events)?;
            Ok(next)
        })
    }

    /// `POST /change-requests/{id}/submit|approve|reject|cancel`. Submit and cancel: the
    /// requester or an admin; approve and reject: approvers and admins (never the requester
    /// unless self-approval is allowed; once per person). Anything the state does not allow
    /// is a 409 naming the state and the action.
    pub fn decide_change_request(
        &self,
        p: &Principal,
        id: &str,
        decision: Decision,
        ctx: &RequestCtx,
    ) -> Result<ChangeRequest, AppError> {
        let (permission, action) = match decision {
            Decision::Submit => (Permission::ChangeRequestWrite, Action::Submit),
            Decision::Cancel => (Permission::ChangeRequestWrite, Action::Cancel),
            Decision::Approve { comment } => {
                (Permission::ChangeRequestDecide, Action::Approve { comment })
            }
            Decision::Reject { reason } => (
                Permission::ChangeRequestDecide,
                Action::Reject {
                    reason: reason.unwrap_or_default(),
                },
            ),
        };
        require(p, permission)?;
        let crid = parse_id(id)?;
        let actor = Actor::from(p);
        let policy = self.policy();
        let now = self.now();
        let submitting = action == Action::Submit;
        transaction(self.store(), |r: &mut dyn Repo| {
            // A submitted change request holds its connector (api.md §4). Lock the connector
            // before the change request, as DELETE /connectors/{id} does, so a delete and a
            // submit on the same connector never both succeed.
            let mut connector_gone = None;
            if submitting {
                let seen = r.get_change_request(&crid)?.ok_or_else(|| not_found(id))?;
                if let Some(cid) = seen.connector_id {
                    if r.lock_connector(&cid)?.is_none() {
                        connector_gone = Some(cid);
                    }
                }
            }
            let current = r.lock_change_request(&crid)?.ok_or_else(|| not_found(id))?;
            let (next, events) =
                domain::apply(&current, action, &actor, &policy, now).map_err(domain_error)?;
            if let Some(cid) = connector_gone {
                return Err(AppError::Conflict {
                    code: "connector_deleted",
                    detail: format!("the connector {cid} of this change request no longer exists"),
                });
            }
            r.update_change_request(&next)?;
            self.append_events(r, ctx, &events)?;
            Ok(next)
        })
    }
}
