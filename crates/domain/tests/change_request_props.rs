//! Property tests of the change-request state machine: random action sequences by random
//! actors, checked after every step against the table of api.md §6.1 (written out again here,
//! independently of the implementation) and the invariants of §2.2 and §6.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use nexplane_domain::change_request::{
    apply, create, Action, ActionKind, Actor, ChangeRequest, DomainError, Environment, EventType,
    NewChangeRequest, Policy, RequiredApprovals, RiskLevel, State,
};
use nexplane_domain::change_type::find_builtin;
use nexplane_domain::{ChangeRequestId, ConnectorId, Role, Timestamp, UserId};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{json, Value};
use std::collections::HashSet;

// ---------------------------------------------------------------------------------------------
// The specification, restated

/// Every (from, action, to) the table of api.md §6.1 allows.
fn allowed(from: State, kind: ActionKind, to: State) -> bool {
    use ActionKind as A;
    use State::*;
    matches!(
        (from, kind, to),
        (Draft, A::Edit, Draft)
            | (Draft, A::Submit, Submitted)
            | (Submitted, A::Approve, Submitted | Approved)
            | (Submitted, A::Reject, Rejected)
            | (Draft | Submitted | Approved, A::Cancel, Cancelled)
            | (Approved, A::Execute, Executing)
            | (Executing, A::ExecutionFinished, Complete | Failed)
            | (Complete | Failed | RollbackFailed, A::Rollback, RollingBack)
            | (
                RollingBack,
                A::RollbackFinished,
                Rolledback | RollbackFailed
            )
    )
}

fn starts_from(kind: ActionKind, from: State) -> bool {
    State::ALL.into_iter().any(|to| allowed(from, kind, to))
}

fn level_of(score: u8) -> RiskLevel {
    match score {
        1..=3 => RiskLevel::Low,
        4..=6 => RiskLevel::Medium,
        7..=9 => RiskLevel::High,
        _ => RiskLevel::Critical,
    }
}

fn event_for(kind: ActionKind, to: State) -> EventType {
    match (kind, to) {
        (ActionKind::Edit, _) => EventType::Updated,
        (ActionKind::Submit, _) => EventType::Submitted,
        (ActionKind::Approve, _) => EventType::Approved,
        (ActionKind::Reject, _) => EventType::Rejected,
        (ActionKind::Cancel, _) => EventType::Cancelled,
        (ActionKind::Execute, _) => EventType::ExecutionStarted,
        (ActionKind::ExecutionFinished, State::Complete) => EventType::Completed,
        (ActionKind::ExecutionFinished, _) => EventType::Failed,
        (ActionKind::Rollback, _) => EventType::RollbackStarted,
        (ActionKind::RollbackFinished, State::Rolledback) => EventType::Rolledback,
        (ActionKind::RollbackFinished, _) => EventType::RollbackFailed,
        (ActionKind::Create, _) => EventType::Created,
    }
}

/// What the rules say should happen, as an error kind (`None` = success).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Ok,
    InvalidTransition,
    Forbidden,
    SelfApproval,
    AlreadyApproved,
    RollbackUnsupported,
    Validation,
}

fn outcome_of(
    r: &Result<(ChangeRequest, Vec<nexplane_domain::DomainEvent>), DomainError>,
) -> Outcome {
    match r {
        Ok(_) => Outcome::Ok,
        Err(DomainError::InvalidTransition { .. }) => Outcome::InvalidTransition,
        Err(DomainError::Forbidden { .. }) => Outcome::Forbidden,
        Err(DomainError::SelfApproval) => Outcome::SelfApproval,
        Err(DomainError::AlreadyApproved) => Outcome::AlreadyApproved,
        Err(DomainError::RollbackUnsupported { .. }) => Outcome::RollbackUnsupported,
        Err(DomainError::Validation(_)) => Outcome::Validation,
    }
}

/// An independent model of the rules: state, then who, then the action's own rules.
fn expected(cr: &ChangeRequest, action: &Action, actor: &Actor, policy: &Policy) -> Outcome {
    let kind = action.kind();
    if !starts_from(kind, cr.state) {
        return Outcome::InvalidTransition;
    }
    if kind == ActionKind::Rollback
        && matches!(cr.state, State::Complete | State::Failed)
        && cr.applied_steps == 0
    {
        return Outcome::InvalidTransition;
    }
    let (uid, role) = match actor {
        Actor::System => {
            return if matches!(
                kind,
                ActionKind::ExecutionFinished | ActionKind::RollbackFinished
            ) {
                Outcome::Ok
            } else {
                Outcome::Forbidden
            };
        }
        Actor::User { user_id, role, .. } => (user_id, *role),
    };
    let is_requester = *uid == cr.requested_by;
    match action {
        Action::Edit { title, target, .. } => {
            let owner_ok = role == Role::Admin || (role == Role::Operator && is_requester);
            if !owner_ok {
                return Outcome::Forbidden;
            }
            let title_bad = title.as_deref().is_some_and(|t| t.trim().is_empty());
            let target_bad = target.as_ref().is_some_and(|t| t.get("bogus").is_some());
            if title_bad || target_bad {
                Outcome::Validation
            } else {
                Outcome::Ok
            }
        }
        Action::Submit | Action::Cancel => {
            if role == Role::Admin || (role == Role::Operator && is_requester) {
                Outcome::Ok
            } else {
                Outcome::Forbidden
            }
        }
        Action::Approve { .. } => {
            if !matches!(role, Role::Admin | Role::Approver) {
                Outcome::Forbidden
            } else if is_requester && !policy.allow_self_approval {
                Outcome::SelfApproval
            } else if cr.approvals.iter().any(|a| &a.user_id == uid) {
                Outcome::AlreadyApproved
            } else {
                Outcome::Ok
            }
        }
        Action::Reject { reason } => {
            if !matches!(role, Role::Admin | Role::Approver) {
                Outcome::Forbidden
            } else if reason.trim().is_empty() {
                Outcome::Validation
            } else {
                Outcome::Ok
            }
        }
        Action::Execute => {
            if matches!(role, Role::Admin | Role::Operator) {
                Outcome::Ok
            } else {
                Outcome::Forbidden
            }
        }
        Action::Rollback => {
            if !matches!(role, Role::Admin | Role::Operator) {
                Outcome::Forbidden
            } else if cr.change_type == "delete_iam_access_key" {
                Outcome::RollbackUnsupported
            } else {
                Outcome::Ok
            }
        }
        Action::ExecutionFinished { .. } | Action::RollbackFinished { .. } => Outcome::Forbidden,
    }
}

/// Invariants that hold for every change request the machine produces.
fn check_invariants(cr: &ChangeRequest, policy: &Policy) -> Result<(), TestCaseError> {
    prop_assert!((1..=10).contains(&cr.risk.score), "score {}", cr.risk.score);
    prop_assert_eq!(cr.risk.level, level_of(cr.risk.score));
    prop_assert!(cr.required_approvals >= 1);

    let mut seen = HashSet::new();
    for a in &cr.approvals {
        prop_assert!(
            seen.insert(a.user_id.clone()),
            "{} approved twice",
            a.user_id
        );
        let by_requester = a.user_id == cr.requested_by;
        prop_assert_eq!(a.self_approved, by_requester);
        if by_requester {
            prop_assert!(
                policy.allow_self_approval,
                "self-approval while not allowed"
            );
        }
    }
    let n = cr.approvals.len();
    match cr.state {
        State::Draft => prop_assert_eq!(n, 0),
        State::Submitted => prop_assert!(n < cr.required_approvals as usize),
        State::Approved => {
            prop_assert!(n >= cr.required_approvals as usize);
            prop_assert!(cr.decided_at.is_some());
        }
        _ => {}
    }
    if cr.state == State::Rejected {
        let Some(r) = &cr.rejection else {
            return Err(TestCaseError::fail("rejected without a rejection"));
        };
        prop_assert!(!r.reason.trim().is_empty());
    } else {
        prop_assert!(cr.rejection.is_none());
    }
    if matches!(cr.state, State::Executing | State::Complete | State::Failed)
        || matches!(
            cr.state,
            State::RollingBack | State::Rolledback | State::RollbackFailed
        )
    {
        // Executed changes went through approval.
        prop_assert!(n >= cr.required_approvals as usize);
        prop_assert!(cr.executed_at.is_some());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Generators

const REQUESTER: u128 = 1;

#[derive(Debug, Clone)]
enum Who {
    Requester(Role),
    Other(u128, Role),
    System,
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Admin),
        Just(Role::Operator),
        Just(Role::Approver),
        Just(Role::Viewer)
    ]
}

fn who() -> impl Strategy<Value = Who> {
    prop_oneof![
        3 => role().prop_map(Who::Requester),
        6 => (2u128..=5, role()).prop_map(|(n, r)| Who::Other(n, r)),
        2 => Just(Who::System),
    ]
}

fn actor_of(who: &Who) -> Actor {
    let id = |n: u128| UserId::new(Timestamp::from_millis(1), n);
    match who {
        Who::Requester(r) => Actor::user(id(REQUESTER), "req@example.com", *r),
        Who::Other(n, r) => Actor::user(id(*n), format!("u{n}@example.com"), *r),
        Who::System => Actor::System,
    }
}

/// A target for the scenario's change type, or (when `bad`) one with an unknown field.
fn target_for(change_type: &str, variant: u8, bad: bool) -> Value {
    let mut t = match change_type {
        "rotate_iam_access_key" => json!({"iam_user": format!("user-{variant}")}),
        "delete_iam_access_key" => {
            json!({"iam_user": format!("user-{variant}"), "access_key_id": "AKIAIOSFODNN7EXAMPLE"})
        }
        _ => json!({"instance_id": format!("i-0123456{variant}")}),
    };
    if bad {
        t["bogus"] = json!(true);
    }
    t
}

#[derive(Debug, Clone)]
enum Act {
    Edit {
        title: Option<&'static str>,
        target: Option<(u8, bool)>,
        env: Option<Environment>,
    },
    Submit,
    Approve(Option<&'static str>),
    Reject(&'static str),
    Cancel,
    Execute,
    ExecFinished(bool, u32),
    Rollback,
    RollbackFinished(bool),
}

fn environment() -> impl Strategy<Value = Environment> {
    prop_oneof![
        Just(Environment::Production),
        Just(Environment::Staging),
        Just(Environment::Development)
    ]
}

fn act() -> impl Strategy<Value = Act> {
    prop_oneof![
        2 => (
            proptest::option::of(prop_oneof![Just(""), Just("  "), Just("Renamed"), Just("Other title")]),
            proptest::option::of((0u8..=9, proptest::bool::weighted(0.3))),
            proptest::option::of(environment()),
        )
            .prop_map(|(title, target, env)| Act::Edit { title, target, env }),
        3 => Just(Act::Submit),
        8 => proptest::option::of(Just("lgtm")).prop_map(Act::Approve),
        2 => prop_oneof![Just(""), Just(" \t"), Just("too risky")].prop_map(Act::Reject),
        1 => Just(Act::Cancel),
        3 => Just(Act::Execute),
        3 => (proptest::bool::ANY, 0u32..=3).prop_map(|(s, n)| Act::ExecFinished(s, n)),
        3 => Just(Act::Rollback),
        3 => proptest::bool::ANY.prop_map(Act::RollbackFinished),
    ]
}

fn to_action(a: &Act, change_type: &str) -> Action {
    match a {
        Act::Edit { title, target, env } => Action::Edit {
            title: title.map(str::to_owned),
            description: None,
            target: target.map(|(v, bad)| target_for(change_type, v, bad)),
            environment: *env,
        },
        Act::Submit => Action::Submit,
        Act::Approve(c) => Action::Approve {
            comment: c.map(str::to_owned),
        },
        Act::Reject(r) => Action::Reject {
            reason: (*r).to_owned(),
        },
        Act::Cancel => Action::Cancel,
        Act::Execute => Action::Execute,
        Act::ExecFinished(success, applied_steps) => Action::ExecutionFinished {
            success: *success,
            applied_steps: *applied_steps,
        },
        Act::Rollback => Action::Rollback,
        Act::RollbackFinished(success) => Action::RollbackFinished { success: *success },
    }
}

/// The actor who would normally perform `act` (so random sequences get deep often enough).
fn plausible(act: &Act, n: u128) -> Who {
    match act {
        Act::Edit { .. } | Act::Submit | Act::Cancel => Who::Requester(Role::Operator),
        Act::Approve(_) | Act::Reject(_) => Who::Other(n, Role::Approver),
        Act::Execute | Act::Rollback => Who::Other(n, Role::Operator),
        Act::ExecFinished(..) | Act::RollbackFinished(_) => Who::System,
    }
}

/// One step: half the time a random actor, half the time a plausible one.
fn step() -> impl Strategy<Value = (Who, Act)> {
    (act(), who(), proptest::bool::ANY, 2u128..=5).prop_map(|(act, who, guided, n)| {
        let who = if guided { plausible(&act, n) } else { who };
        (who, act)
    })
}

#[derive(Debug, Clone)]
struct Scenario {
    change_type: &'static str,
    environment: Environment,
    requester_role: Role,
    policy: Policy,
    steps: Vec<(Who, Act)>,
}

fn scenario(max_steps: usize) -> impl Strategy<Value = Scenario> {
    let change_type = prop_oneof![
        Just("rotate_iam_access_key"),
        Just("delete_iam_access_key"),
        Just("stop_ec2_instance"),
        Just("start_ec2_instance"),
    ];
    let policy = (
        proptest::bool::ANY,
        [1u32..=3, 1u32..=3, 1u32..=3, 1u32..=3],
    )
        .prop_map(
            |(allow_self_approval, [low, medium, high, critical])| Policy {
                allow_self_approval,
                required_approvals: RequiredApprovals {
                    low,
                    medium,
                    high,
                    critical,
                },
            },
        );
    (
        change_type,
        environment(),
        prop_oneof![Just(Role::Operator), Just(Role::Admin)],
        policy,
        proptest::collection::vec(step(), 1..max_steps),
    )
        .prop_map(
            |(change_type, environment, requester_role, policy, steps)| Scenario {
                change_type,
                environment,
                requester_role,
                policy,
                steps,
            },
        )
}

fn start(s: &Scenario) -> ChangeRequest {
    let t0 = Timestamp::from_secs(1_800_000_000);
    let new = NewChangeRequest {
        id: ChangeRequestId::new(t0, 1),
        title: "A change".into(),
        description: String::new(),
        connector_id: Some(ConnectorId::new(t0, 2)),
        change_type: s.change_type.into(),
        target: target_for(s.change_type, 0, false),
        environment: s.environment,
    };
    let requester = actor_of(&Who::Requester(s.requester_role));
    match create(new, &requester, &s.policy, t0) {
        Ok((cr, _)) => cr,
        Err(e) => unreachable!("a valid create failed: {e}"),
    }
}

/// Runs a scenario, checking everything after each step; returns the states visited.
fn run(s: &Scenario) -> Result<Vec<State>, TestCaseError> {
    let mut cr = start(s);
    check_invariants(&cr, &s.policy)?;
    let mut visited = vec![cr.state];
    for (i, (who, act)) in s.steps.iter().enumerate() {
        let now = Timestamp::from_secs(1_800_000_000 + 60 * (i as i64 + 1));
        let action = to_action(act, s.change_type);
        let actor = actor_of(who);
        let want = expected(&cr, &action, &actor, &s.policy);
        let before = cr.clone();
        let result = apply(&cr, action.clone(), &actor, &s.policy, now);
        // apply is pure: the caller's value is untouched whatever happens.
        prop_assert_eq!(&cr, &before);
        prop_assert_eq!(
            outcome_of(&result),
            want,
            "step {}: {:?} by {:?} in {}",
            i,
            action,
            who,
            cr.state
        );
        match result {
            Ok((next, events)) => {
                let kind = action.kind();
                prop_assert!(
                    allowed(cr.state, kind, next.state),
                    "{} --{}--> {} is not in the table",
                    cr.state,
                    kind,
                    next.state
                );
                prop_assert_eq!(events.len(), 1);
                let ev = &events[0];
                prop_assert_eq!(ev.event_type, event_for(kind, next.state));
                prop_assert_eq!(&ev.change_request_id, &cr.id);
                prop_assert_eq!(ev.at, now);
                prop_assert_eq!(ev.actor.as_str(), actor.audit_name());
                prop_assert_eq!(&ev.payload["from_state"], &json!(cr.state.as_str()));
                prop_assert_eq!(&ev.payload["to_state"], &json!(next.state.as_str()));
                prop_assert_eq!(next.updated_at, now);
                prop_assert_eq!(&next.id, &cr.id);
                prop_assert_eq!(&next.requested_by, &cr.requested_by);
                if kind == ActionKind::Approve {
                    prop_assert_eq!(next.approvals.len(), cr.approvals.len() + 1);
                } else {
                    prop_assert_eq!(&next.approvals, &cr.approvals);
                }
                check_invariants(&next, &s.policy)?;
                cr = next;
                visited.push(cr.state);
            }
            Err(e) => {
                if cr.state.is_final() {
                    prop_assert_eq!(
                        e,
                        DomainError::InvalidTransition {
                            state: cr.state,
                            action: action.kind()
                        }
                    );
                }
            }
        }
        if cr.state.is_final() {
            // A final state accepts nothing, from anyone.
            for probe in [
                Act::Submit,
                Act::Approve(None),
                Act::Reject("r"),
                Act::Cancel,
                Act::Execute,
                Act::Rollback,
                Act::ExecFinished(true, 1),
                Act::RollbackFinished(true),
            ] {
                for w in [
                    Who::Requester(Role::Admin),
                    Who::Other(9, Role::Admin),
                    Who::System,
                ] {
                    let a = to_action(&probe, s.change_type);
                    let kind = a.kind();
                    let r = apply(&cr, a, &actor_of(&w), &s.policy, now);
                    prop_assert_eq!(
                        r.err(),
                        Some(DomainError::InvalidTransition {
                            state: cr.state,
                            action: kind
                        })
                    );
                }
            }
        }
    }
    Ok(visited)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_follow_the_rules(s in scenario(60)) {
        run(&s)?;
    }

    #[test]
    fn risk_is_always_in_range(
        base in 0u8..=12,
        env in environment(),
        rollback in proptest::bool::ANY,
    ) {
        let r = nexplane_domain::Risk::compute("x", base, env, rollback);
        prop_assert!((1..=10).contains(&r.score));
        prop_assert_eq!(r.level, level_of(r.score));
        let raw = i32::from(base)
            + match env { Environment::Production => 2, Environment::Staging => 1, Environment::Development => 0 }
            + if rollback { 0 } else { 2 };
        prop_assert_eq!(i32::from(r.score), raw.clamp(1, 10));
    }
}

/// The generator is strong enough to reach every state (otherwise the property above would
/// pass vacuously for the later states).
#[test]
fn sequences_reach_every_state() {
    let mut runner = TestRunner::deterministic();
    let strategy = scenario(80);
    let mut reached: HashSet<State> = HashSet::new();
    for _ in 0..3000 {
        if reached.len() == State::ALL.len() {
            break;
        }
        let Ok(tree) = strategy.new_tree(&mut runner) else {
            continue;
        };
        if let Ok(states) = run(&tree.current()) {
            reached.extend(states);
        }
    }
    let missing: Vec<State> = State::ALL
        .into_iter()
        .filter(|s| !reached.contains(s))
        .collect();
    assert!(missing.is_empty(), "never reached: {missing:?}");
}

/// Catalog sanity used by the scenarios above.
#[test]
fn scenario_change_types_exist() {
    for name in [
        "rotate_iam_access_key",
        "delete_iam_access_key",
        "stop_ec2_instance",
        "start_ec2_instance",
    ] {
        let ct = find_builtin(name);
        assert!(ct.is_some(), "{name}");
        assert_eq!(
            ct.is_some_and(|c| !c.has_rollback()),
            name == "delete_iam_access_key"
        );
    }
}
