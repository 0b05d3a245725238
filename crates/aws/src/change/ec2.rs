//! The EC2 change types: stopping and starting an instance, revoking and authorizing one
//! security-group ingress rule. Both are regional: the target's `region`, else the
//! connector's home region (recorded by the precheck, so a rollback acts where the execution
//! did).

use super::{has_code, outcome, provider, provider_message, refused, Env, Fields, Side};
use nexplane_ports::cloud::{ChangeError, StepOutcome};
use rusoto_ec2::{
    AuthorizeSecurityGroupIngressRequest, DescribeInstancesRequest, DescribeSecurityGroupsRequest,
    Ec2, IpPermission, IpRange, RevokeSecurityGroupIngressRequest, StartInstancesRequest,
    StopInstancesRequest,
};
use serde_json::{json, Map, Value};
use std::time::{Duration, Instant};

const INSTANCE_NOT_FOUND: &[&str] = &["InvalidInstanceID.NotFound", "InvalidInstanceID.Malformed"];
const GROUP_NOT_FOUND: &[&str] = &[
    "InvalidGroup.NotFound",
    "InvalidGroupId.NotFound",
    "InvalidGroupId.Malformed",
];
/// First pause between two looks at an instance; it doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const MAX_PAUSE: Duration = Duration::from_secs(5);

/// The region a step acts in: the one the precheck recorded, else the target's, else the
/// connector's home region.
fn region_of(env: &Env<'_>, t: Fields<'_>, c: Fields<'_>) -> String {
    match c.opt_str("region").or_else(|| t.opt_str("region")) {
        Some(region) => region.to_string(),
        None => env.home_region().to_string(),
    }
}

// ---------------------------------------------------------------------------------------------
// Instances

/// The state an instance should reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Want {
    Stopped,
    Running,
}

impl Want {
    fn state(self) -> &'static str {
        match self {
            Want::Stopped => "stopped",
            Want::Running => "running",
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Want::Stopped => "stop",
            Want::Running => "start",
        }
    }

    fn done(self) -> &'static str {
        match self {
            Want::Stopped => "stopped",
            Want::Running => "started",
        }
    }
}

/// What to do about an instance in a given state.
enum Move {
    Done,
    Act,
    Wait,
    Impossible,
}

fn next_move(want: Want, state: &str) -> Move {
    match (want, state) {
        (Want::Stopped, "stopped") | (Want::Running, "running") => Move::Done,
        (Want::Stopped, "running") | (Want::Running, "stopped") => Move::Act,
        (_, "pending" | "stopping") => Move::Wait,
        _ => Move::Impossible,
    }
}

fn instance_not_found(id: &str, region: &str) -> ChangeError {
    refused(format!("instance {id} not found in {region}"))
}

/// The state name of an instance (`running`, `stopped`…); `None` when it does not exist.
async fn instance_state(
    env: &Env<'_>,
    region: &str,
    id: &str,
) -> Result<Option<String>, ChangeError> {
    let ec2 = env.session.ec2(region);
    let request = DescribeInstancesRequest {
        instance_ids: Some(vec![id.to_string()]),
        ..Default::default()
    };
    match env
        .session
        .call("EC2", region, || ec2.describe_instances(request.clone()))
        .await
    {
        Ok(answer) => Ok(answer
            .reservations
            .unwrap_or_default()
            .into_iter()
            .flat_map(|r| r.instances.unwrap_or_default())
            .find(|i| i.instance_id.as_deref() == Some(id))
            .map(|i| {
                i.state
                    .and_then(|s| s.name)
                    .unwrap_or_else(|| "unknown".to_string())
            })),
        Err(e) if has_code(&e, INSTANCE_NOT_FOUND) => Ok(None),
        Err(e) => Err(provider(e, &format!("DescribeInstances {id} in {region}"))),
    }
}

/// Asks EC2 to stop or start the instance; `false` when its state changed meanwhile so that
/// the request no longer applies (the caller looks again).
async fn request_state(
    env: &Env<'_>,
    region: &str,
    id: &str,
    want: Want,
) -> Result<bool, ChangeError> {
    let ec2 = env.session.ec2(region);
    let result = match want {
        Want::Stopped => {
            let request = StopInstancesRequest {
                instance_ids: vec![id.to_string()],
                ..Default::default()
            };
            env.session
                .call("EC2", region, || ec2.stop_instances(request.clone()))
                .await
                .map(|_| ())
        }
        Want::Running => {
            let request = StartInstancesRequest {
                instance_ids: vec![id.to_string()],
                ..Default::default()
            };
            env.session
                .call("EC2", region, || ec2.start_instances(request.clone()))
                .await
                .map(|_| ())
        }
    };
    match result {
        Ok(()) => Ok(true),
        Err(e) if has_code(&e, &["IncorrectInstanceState"]) => Ok(false),
        Err(e) if has_code(&e, INSTANCE_NOT_FOUND) => Err(instance_not_found(id, region)),
        Err(e) => {
            let action = match want {
                Want::Stopped => "StopInstances",
                Want::Running => "StartInstances",
            };
            Err(provider(e, &format!("{action} {id} in {region}")))
        }
    }
}

/// stop_ec2_instance (running or pending) and start_ec2_instance (stopped): the instance
/// exists in the region and can make the move.
pub(super) async fn precheck_instance(
    env: &Env<'_>,
    t: Fields<'_>,
    want: Want,
) -> Result<Map<String, Value>, ChangeError> {
    let id = t.str("instance_id")?;
    let region = region_of(env, t, Fields::empty("context"));
    let state = instance_state(env, &region, id)
        .await?
        .ok_or_else(|| instance_not_found(id, &region))?;
    let allowed = match want {
        Want::Stopped => matches!(state.as_str(), "running" | "pending"),
        Want::Running => state == "stopped",
    };
    if !allowed {
        let which = match want {
            Want::Stopped => "a running or pending",
            Want::Running => "a stopped",
        };
        return Err(refused(format!(
            "instance {id} in {region} is {state}: only {which} instance can be {}",
            want.done()
        )));
    }
    let mut context = Map::new();
    context.insert("region".into(), json!(region));
    context.insert("previous_state".into(), json!(state));
    Ok(context)
}

/// `stop_instance` / `start_instance` (steps and undo steps): looks at the instance, asks for
/// the move only when needed and only once, then waits (bounded by
/// [`crate::AwsOptions::state_wait`]) until the instance is there.
pub(super) async fn set_instance_state(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
    want: Want,
    side: Side,
) -> Result<StepOutcome, ChangeError> {
    let id = t.str("instance_id")?;
    let region = region_of(env, t, c);
    let started = Instant::now();
    let deadline = started + env.state_wait;
    let mut pause = FIRST_PAUSE;
    let mut requested = false;
    loop {
        let state = instance_state(env, &region, id)
            .await?
            .ok_or_else(|| instance_not_found(id, &region))?;
        match next_move(want, &state) {
            Move::Done => {
                let detail = match (requested, side) {
                    (true, _) => format!("{} instance {id} in {region}", want.done()),
                    (false, Side::Apply) => {
                        format!("instance {id} in {region} was already {state}")
                    }
                    (false, Side::Undo) => {
                        format!("instance {id} in {region} is {state}: nothing to undo")
                    }
                };
                let mut result = outcome(detail);
                result.outputs.insert("instance_state".into(), json!(state));
                return Ok(result);
            }
            Move::Act if !requested => {
                if request_state(env, &region, id, want).await? {
                    requested = true;
                    continue;
                }
            }
            Move::Act | Move::Wait => {}
            Move::Impossible => {
                return Err(refused(format!(
                    "instance {id} in {region} is {state}: it cannot be {}",
                    want.done()
                )))
            }
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(provider_message(format!(
                "instance {id} in {region} is still {state}, not {}, after {} s{}",
                want.state(),
                started.elapsed().as_secs(),
                if requested {
                    format!(" (the {} was requested)", want.verb())
                } else {
                    format!(" (waiting to {} it)", want.verb())
                }
            )));
        }
        tokio::time::sleep(pause.min(deadline - now)).await;
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

// ---------------------------------------------------------------------------------------------
// Security-group ingress rules

/// One ingress rule: a protocol, a port range and one IPv4 range.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    protocol: String,
    from: i64,
    to: i64,
    cidr: String,
}

/// AWS accepts protocol numbers and names; it answers with names for the common ones.
fn normalize_protocol(protocol: &str) -> String {
    match protocol.trim().to_ascii_lowercase().as_str() {
        "6" => "tcp".to_string(),
        "17" => "udp".to_string(),
        "1" => "icmp".to_string(),
        "all" | "-1" => "-1".to_string(),
        other => other.to_string(),
    }
}

impl Rule {
    fn of(t: Fields<'_>) -> Result<Self, ChangeError> {
        Ok(Rule {
            protocol: normalize_protocol(t.str("protocol")?),
            from: t.int("from_port")?,
            to: t.int("to_port")?,
            cidr: t.str("cidr")?.to_string(),
        })
    }

    fn describe(&self) -> String {
        let Rule {
            protocol,
            from,
            to,
            cidr,
        } = self;
        match protocol.as_str() {
            "-1" => format!("all traffic from {cidr}"),
            "icmp" => format!("icmp type {from} code {to} from {cidr}"),
            p if from == to => format!("{p} port {from} from {cidr}"),
            p => format!("{p} ports {from}-{to} from {cidr}"),
        }
    }

    /// The rule as EC2 takes it: exactly one permission with one IP range.
    fn permission(&self) -> IpPermission {
        IpPermission {
            ip_protocol: Some(self.protocol.clone()),
            from_port: Some(self.from),
            to_port: Some(self.to),
            ip_ranges: Some(vec![IpRange {
                cidr_ip: Some(self.cidr.clone()),
                description: None,
            }]),
            ..Default::default()
        }
    }

    /// Whether the group permission `p` includes this rule (ports do not count for "all
    /// protocols", which has none).
    fn matches(&self, p: &IpPermission) -> bool {
        let protocol = p
            .ip_protocol
            .as_deref()
            .map(normalize_protocol)
            .unwrap_or_default();
        if protocol != self.protocol {
            return false;
        }
        if self.protocol != "-1"
            && (p.from_port.unwrap_or(-1) != self.from || p.to_port.unwrap_or(-1) != self.to)
        {
            return false;
        }
        p.ip_ranges
            .iter()
            .flatten()
            .any(|r| r.cidr_ip.as_deref() == Some(self.cidr.as_str()))
    }

    fn to_json(&self) -> Value {
        json!({
            "protocol": self.protocol,
            "from_port": self.from,
            "to_port": self.to,
            "cidr": self.cidr,
        })
    }
}

fn group_not_found(group: &str, region: &str) -> ChangeError {
    refused(format!("security group {group} not found in {region}"))
}

/// The ingress permissions of a group; `None` when it does not exist in the region.
async fn ingress_of(
    env: &Env<'_>,
    region: &str,
    group: &str,
) -> Result<Option<Vec<IpPermission>>, ChangeError> {
    let ec2 = env.session.ec2(region);
    let request = DescribeSecurityGroupsRequest {
        group_ids: Some(vec![group.to_string()]),
        ..Default::default()
    };
    match env
        .session
        .call("EC2", region, || {
            ec2.describe_security_groups(request.clone())
        })
        .await
    {
        Ok(answer) => Ok(answer
            .security_groups
            .unwrap_or_default()
            .into_iter()
            .find(|g| g.group_id.as_deref() == Some(group))
            .map(|g| g.ip_permissions.unwrap_or_default())),
        Err(e) if has_code(&e, GROUP_NOT_FOUND) => Ok(None),
        Err(e) => Err(provider(
            e,
            &format!("DescribeSecurityGroups {group} in {region}"),
        )),
    }
}

/// Whether the group has the rule; refused when the group does not exist.
async fn has_rule(
    env: &Env<'_>,
    region: &str,
    group: &str,
    rule: &Rule,
) -> Result<bool, ChangeError> {
    let ingress = ingress_of(env, region, group)
        .await?
        .ok_or_else(|| group_not_found(group, region))?;
    Ok(ingress.iter().any(|p| rule.matches(p)))
}

/// revoke_security_group_ingress (the rule exists) and authorize_security_group_ingress
/// (`authorize`: it does not exist yet); the group exists in the region either way.
pub(super) async fn precheck_rule(
    env: &Env<'_>,
    t: Fields<'_>,
    authorize: bool,
) -> Result<Map<String, Value>, ChangeError> {
    let group = t.str("group_id")?;
    let rule = Rule::of(t)?;
    let region = region_of(env, t, Fields::empty("context"));
    let present = has_rule(env, &region, group, &rule).await?;
    if authorize && present {
        return Err(refused(format!(
            "security group {group} in {region} already allows {}",
            rule.describe()
        )));
    }
    if !authorize && !present {
        return Err(refused(format!(
            "security group {group} in {region} has no ingress rule for {}",
            rule.describe()
        )));
    }
    let mut context = Map::new();
    context.insert("region".into(), json!(region));
    context.insert("rule".into(), rule.to_json());
    Ok(context)
}

/// Adds the rule; `false` when it was there already.
async fn authorize(
    env: &Env<'_>,
    region: &str,
    group: &str,
    rule: &Rule,
) -> Result<bool, ChangeError> {
    let ec2 = env.session.ec2(region);
    let request = AuthorizeSecurityGroupIngressRequest {
        group_id: Some(group.to_string()),
        ip_permissions: Some(vec![rule.permission()]),
        ..Default::default()
    };
    match env
        .session
        .call("EC2", region, || {
            ec2.authorize_security_group_ingress(request.clone())
        })
        .await
    {
        Ok(()) => Ok(true),
        Err(e) if has_code(&e, &["InvalidPermission.Duplicate"]) => Ok(false),
        Err(e) if has_code(&e, GROUP_NOT_FOUND) => Err(group_not_found(group, region)),
        Err(e) => Err(provider(
            e,
            &format!("AuthorizeSecurityGroupIngress {group} in {region}"),
        )),
    }
}

/// Removes the rule; `false` when it was not there.
async fn revoke(
    env: &Env<'_>,
    region: &str,
    group: &str,
    rule: &Rule,
) -> Result<bool, ChangeError> {
    let ec2 = env.session.ec2(region);
    let request = RevokeSecurityGroupIngressRequest {
        group_id: Some(group.to_string()),
        ip_permissions: Some(vec![rule.permission()]),
        ..Default::default()
    };
    match env
        .session
        .call("EC2", region, || {
            ec2.revoke_security_group_ingress(request.clone())
        })
        .await
    {
        // AWS answers success, listing the rule as unknown, when a VPC group lacks it.
        Ok(answer) => Ok(answer.unknown_ip_permissions.unwrap_or_default().is_empty()),
        Err(e) if has_code(&e, &["InvalidPermission.NotFound"]) => Ok(false),
        Err(e) if has_code(&e, GROUP_NOT_FOUND) => Err(group_not_found(group, region)),
        Err(e) => Err(provider(
            e,
            &format!("RevokeSecurityGroupIngress {group} in {region}"),
        )),
    }
}

/// `authorize_ingress` / `restore_ingress` (`present`) and `revoke_ingress` /
/// `remove_ingress`: looks at the group, then adds or removes exactly the target's rule.
pub(super) async fn set_rule(
    env: &Env<'_>,
    t: Fields<'_>,
    c: Fields<'_>,
    present: bool,
    side: Side,
) -> Result<StepOutcome, ChangeError> {
    let group = t.str("group_id")?;
    let rule = Rule::of(t)?;
    let region = region_of(env, t, c);
    let what = rule.describe();
    let already = match (present, side) {
        (true, Side::Apply) => format!("security group {group} in {region} already allowed {what}"),
        (false, Side::Apply) => {
            format!("security group {group} in {region} already had no ingress rule for {what}")
        }
        (true, Side::Undo) => {
            format!("security group {group} in {region} allows {what}: nothing to undo")
        }
        (false, Side::Undo) => format!(
            "security group {group} in {region} has no ingress rule for {what}: nothing to undo"
        ),
    };
    if has_rule(env, &region, group, &rule).await? == present {
        return Ok(outcome(already));
    }
    let changed = if present {
        authorize(env, &region, group, &rule).await?
    } else {
        revoke(env, &region, group, &rule).await?
    };
    Ok(outcome(match (changed, present) {
        (false, _) => already,
        (true, true) => format!("authorized ingress {what} on security group {group} in {region}"),
        (true, false) => format!("revoked ingress {what} from security group {group} in {region}"),
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    fn rule(protocol: &str, from: i64, to: i64, cidr: &str) -> Rule {
        Rule {
            protocol: normalize_protocol(protocol),
            from,
            to,
            cidr: cidr.into(),
        }
    }

    fn permission(protocol: &str, ports: Option<(i64, i64)>, cidrs: &[&str]) -> IpPermission {
        IpPermission {
            ip_protocol: Some(protocol.into()),
            from_port: ports.map(|p| p.0),
            to_port: ports.map(|p| p.1),
            ip_ranges: Some(
                cidrs
                    .iter()
                    .map(|c| IpRange {
                        cidr_ip: Some((*c).into()),
                        description: None,
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn rules_match_exactly() {
        let ssh = rule("tcp", 22, 22, "10.0.0.0/8");
        assert!(ssh.matches(&permission(
            "tcp",
            Some((22, 22)),
            &["1.2.3.4/32", "10.0.0.0/8"]
        )));
        assert!(ssh.matches(&permission("6", Some((22, 22)), &["10.0.0.0/8"])));
        assert!(!ssh.matches(&permission("tcp", Some((22, 23)), &["10.0.0.0/8"])));
        assert!(!ssh.matches(&permission("udp", Some((22, 22)), &["10.0.0.0/8"])));
        assert!(!ssh.matches(&permission("tcp", Some((22, 22)), &["10.0.0.0/16"])));
        let all = rule("-1", -1, -1, "0.0.0.0/0");
        assert!(all.matches(&permission("-1", None, &["0.0.0.0/0"])));
        assert_eq!(ssh.describe(), "tcp port 22 from 10.0.0.0/8");
        assert_eq!(
            rule("udp", 1000, 2000, "0.0.0.0/0").describe(),
            "udp ports 1000-2000 from 0.0.0.0/0"
        );
        assert_eq!(all.describe(), "all traffic from 0.0.0.0/0");
    }

    #[test]
    fn instance_moves() {
        assert!(matches!(next_move(Want::Stopped, "stopped"), Move::Done));
        assert!(matches!(next_move(Want::Stopped, "running"), Move::Act));
        assert!(matches!(next_move(Want::Stopped, "pending"), Move::Wait));
        assert!(matches!(next_move(Want::Running, "stopping"), Move::Wait));
        assert!(matches!(next_move(Want::Running, "stopped"), Move::Act));
        assert!(matches!(
            next_move(Want::Running, "terminated"),
            Move::Impossible
        ));
        assert_eq!(Want::Running.state(), "running");
    }
}
