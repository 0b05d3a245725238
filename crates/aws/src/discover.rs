//! Discovery: IAM users and roles, EC2 instances and security groups per region, S3 buckets.

use crate::error::CallError;
use crate::session::Session;
use futures_util::stream::{self, StreamExt};
use nexplane_ports::cloud::{CloudError, DiscoveredAsset, Discovery, PartialFailure, ProgressFn};
use rusoto_ec2::{
    DescribeInstancesRequest, DescribeSecurityGroupsRequest, Ec2, Instance, IpPermission,
    SecurityGroup,
};
use rusoto_iam::{
    AccessKeyMetadata, GetAccountAuthorizationDetailsRequest, Iam, IamClient,
    ListAccessKeysRequest, ListUsersRequest, RoleDetail, UserDetail,
};
use rusoto_s3::S3;
use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, HashMap};

/// Asset type names (api.md §5).
pub(crate) const IAM_USER: &str = "iam_user";
pub(crate) const IAM_ROLE: &str = "iam_role";
pub(crate) const EC2_INSTANCE: &str = "ec2_instance";
pub(crate) const EC2_SECURITY_GROUP: &str = "ec2_security_group";
pub(crate) const S3_BUCKET: &str = "s3_bucket";

/// Largest page IAM and EC2 accept.
const PAGE_SIZE: i64 = 1000;
/// A guard against an endpoint that keeps answering "there is more".
const MAX_PAGES: usize = 100_000;
/// Regions discovered at once.
const REGIONS_IN_FLIGHT: usize = 4;

/// The marker of the next page, or `None` at the end. Fails when the endpoint keeps handing
/// back the same marker (which would loop for ever).
pub(crate) fn next_page(
    more: bool,
    marker: Option<String>,
    previous: &Option<String>,
    pages: usize,
    what: &str,
) -> Result<Option<String>, CallError> {
    let marker = marker.filter(|m| more && !m.is_empty());
    if marker.is_some() && (marker == *previous || pages >= MAX_PAGES) {
        return Err(CallError {
            kind: crate::error::FailureKind::Other,
            code: None,
            message: format!("{what}: the paging marker does not advance"),
        });
    }
    Ok(marker)
}

fn partial(asset_type: &str, region: Option<&str>, message: impl Into<String>) -> PartialFailure {
    PartialFailure {
        asset_type: asset_type.to_string(),
        region: region.map(str::to_string),
        message: message.into(),
    }
}

/// The whole discovery of one connector.
pub(crate) async fn run(
    session: &Session,
    progress: ProgressFn<'_>,
    max_in_flight: usize,
) -> Result<Discovery, CloudError> {
    let mut discovery = Discovery::default();

    // IAM first: it is global, and its first call tells whether the credentials work at all.
    progress("iam", 0, None);
    match iam(session, progress, max_in_flight).await {
        Ok((assets, errors)) => {
            discovery.assets.extend(assets);
            discovery.errors.extend(errors);
        }
        Err(err) if err.is_fatal() => return Err(err.into_cloud()),
        Err(err) => {
            for asset_type in [IAM_USER, IAM_ROLE] {
                discovery
                    .errors
                    .push(partial(asset_type, None, err.message.clone()));
            }
        }
    }

    let regions = session.settings.regions.clone();
    let mut regional: Vec<(Vec<DiscoveredAsset>, Vec<PartialFailure>)> = stream::iter(regions)
        .map(|region| async move { ec2_region(session, &region, progress).await })
        .buffer_unordered(REGIONS_IN_FLIGHT)
        .collect()
        .await;
    for (assets, errors) in regional.drain(..) {
        discovery.assets.extend(assets);
        discovery.errors.extend(errors);
    }

    progress("s3", 0, None);
    match s3_buckets(session).await {
        Ok(buckets) => {
            let n = buckets.len() as u64;
            discovery.assets.extend(buckets);
            progress("s3", n, Some(n));
        }
        Err(err) => {
            discovery
                .errors
                .push(partial(S3_BUCKET, None, err.context("ListBuckets").message))
        }
    }

    discovery.assets.sort_by(|a, b| {
        (&a.asset_type, &a.region, &a.external_id).cmp(&(&b.asset_type, &b.region, &b.external_id))
    });
    Ok(discovery)
}

// ---------------------------------------------------------------------------------------------
// IAM

struct AuthorizationDetails {
    users: Vec<UserDetail>,
    roles: Vec<RoleDetail>,
}

/// Users and roles with their groups and attached policies, every page.
async fn authorization_details(
    session: &Session,
    iam: &IamClient,
) -> Result<AuthorizationDetails, CallError> {
    let region = session.settings.region.clone();
    let mut details = AuthorizationDetails {
        users: Vec::new(),
        roles: Vec::new(),
    };
    let mut marker = None;
    for pages in 1.. {
        let request = GetAccountAuthorizationDetailsRequest {
            filter: Some(vec!["User".into(), "Role".into()]),
            marker: marker.clone(),
            max_items: Some(PAGE_SIZE),
        };
        let page = session
            .call("IAM", &region, || {
                iam.get_account_authorization_details(request.clone())
            })
            .await?;
        details
            .users
            .extend(page.user_detail_list.unwrap_or_default());
        details
            .roles
            .extend(page.role_detail_list.unwrap_or_default());
        marker = next_page(
            page.is_truncated.unwrap_or(false),
            page.marker,
            &marker,
            pages,
            "GetAccountAuthorizationDetails",
        )?;
        if marker.is_none() {
            break;
        }
    }
    Ok(details)
}

/// `password_last_used` by user name (ListUsers is the only listing that has it).
async fn password_last_used(
    session: &Session,
    iam: &IamClient,
) -> Result<HashMap<String, Option<String>>, CallError> {
    let region = session.settings.region.clone();
    let mut out = HashMap::new();
    let mut marker = None;
    for pages in 1.. {
        let request = ListUsersRequest {
            marker: marker.clone(),
            max_items: Some(PAGE_SIZE),
            path_prefix: None,
        };
        let page = session
            .call("IAM", &region, || iam.list_users(request.clone()))
            .await?;
        for user in page.users {
            out.insert(user.user_name, user.password_last_used);
        }
        marker = next_page(
            page.is_truncated.unwrap_or(false),
            page.marker,
            &marker,
            pages,
            "ListUsers",
        )?;
        if marker.is_none() {
            break;
        }
    }
    Ok(out)
}

/// Every access key of one user; `None` when the user no longer exists.
pub(crate) async fn access_keys(
    session: &Session,
    iam: &IamClient,
    user_name: &str,
) -> Result<Option<Vec<AccessKeyMetadata>>, CallError> {
    let region = session.settings.region.clone();
    let mut keys = Vec::new();
    let mut marker = None;
    for pages in 1.. {
        let request = ListAccessKeysRequest {
            marker: marker.clone(),
            max_items: None,
            user_name: Some(user_name.to_string()),
        };
        let page = match session
            .call("IAM", &region, || iam.list_access_keys(request.clone()))
            .await
        {
            Ok(page) => page,
            Err(err) if err.code.as_deref() == Some("NoSuchEntity") => return Ok(None),
            Err(err) => return Err(err),
        };
        keys.extend(page.access_key_metadata);
        // Some endpoints (moto) leave IsTruncated out: no flag means no further page.
        marker = next_page(
            page.is_truncated.unwrap_or(false),
            page.marker,
            &marker,
            pages,
            "ListAccessKeys",
        )?;
        if marker.is_none() {
            break;
        }
    }
    Ok(Some(keys))
}

fn iam_tags(tags: Option<Vec<rusoto_iam::Tag>>) -> Value {
    let map: BTreeMap<String, String> = tags
        .unwrap_or_default()
        .into_iter()
        .map(|t| (t.key, t.value))
        .collect();
    json!(map)
}

fn sorted(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items.dedup();
    items
}

fn policy_arns(policies: Option<Vec<rusoto_iam::AttachedPolicy>>) -> Vec<String> {
    sorted(
        policies
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.policy_arn)
            .collect(),
    )
}

fn inline_names(policies: Option<Vec<rusoto_iam::PolicyDetail>>) -> Vec<String> {
    sorted(
        policies
            .unwrap_or_default()
            .into_iter()
            .filter_map(|p| p.policy_name)
            .collect(),
    )
}

fn user_asset(
    user: UserDetail,
    password_last_used: Option<String>,
    keys: Option<Vec<AccessKeyMetadata>>,
) -> Option<DiscoveredAsset> {
    let arn = user.arn?;
    let user_name = user.user_name.unwrap_or_default();
    let access_keys = keys.map(|mut keys| {
        keys.sort_by(|a, b| {
            (&a.create_date, &a.access_key_id).cmp(&(&b.create_date, &b.access_key_id))
        });
        keys.into_iter()
            .map(|k| {
                json!({
                    "access_key_id": k.access_key_id,
                    "status": k.status,
                    "created_at": k.create_date,
                })
            })
            .collect::<Vec<_>>()
    });
    let attributes = json!({
        "user_name": user_name,
        "user_id": user.user_id,
        "arn": arn,
        "path": user.path,
        "created_at": user.create_date,
        "password_last_used": password_last_used,
        "access_keys": access_keys,
        "attached_policies": policy_arns(user.attached_managed_policies),
        "groups": sorted(user.group_list.unwrap_or_default()),
        "inline_policies": inline_names(user.user_policy_list),
        "permissions_boundary": user.permissions_boundary.and_then(|b| b.permissions_boundary_arn),
        "tags": iam_tags(user.tags),
    });
    Some(DiscoveredAsset {
        asset_type: IAM_USER.into(),
        external_id: arn,
        name: user_name,
        region: None,
        attributes,
    })
}

fn role_asset(role: RoleDetail) -> Option<DiscoveredAsset> {
    let arn = role.arn?;
    let role_name = role.role_name.unwrap_or_default();
    let attributes = json!({
        "role_name": role_name,
        "role_id": role.role_id,
        "arn": arn,
        "path": role.path,
        "created_at": role.create_date,
        "attached_policies": policy_arns(role.attached_managed_policies),
        "inline_policies": inline_names(role.role_policy_list),
        "last_used_at": role.role_last_used.and_then(|u| u.last_used_date),
        "tags": iam_tags(role.tags),
    });
    Some(DiscoveredAsset {
        asset_type: IAM_ROLE.into(),
        external_id: arn,
        name: role_name,
        region: None,
        attributes,
    })
}

/// IAM users (with access keys) and roles. `Err` when the account-wide listing fails; the
/// per-user failures are partial.
async fn iam(
    session: &Session,
    progress: ProgressFn<'_>,
    max_in_flight: usize,
) -> Result<(Vec<DiscoveredAsset>, Vec<PartialFailure>), CallError> {
    let client = session.iam();
    let (details, last_used) = futures_util::future::join(
        authorization_details(session, &client),
        password_last_used(session, &client),
    )
    .await;
    let details = details.map_err(|e| e.context("GetAccountAuthorizationDetails"))?;
    let mut errors = Vec::new();
    let last_used = match last_used {
        Ok(map) => map,
        Err(err) => {
            errors.push(partial(
                IAM_USER,
                None,
                err.context("ListUsers (password_last_used is unknown)")
                    .message,
            ));
            HashMap::new()
        }
    };

    let total = details.users.len() as u64;
    let step = (total / 100).max(1);
    progress("iam", 0, Some(total));
    let client = &client;
    let mut done = 0u64;
    let mut failed: Vec<CallError> = Vec::new();
    let mut keys_by_user: HashMap<String, Option<Vec<AccessKeyMetadata>>> = HashMap::new();
    let names: Vec<String> = details
        .users
        .iter()
        .filter_map(|u| u.user_name.clone())
        .collect();
    let mut results = stream::iter(names)
        .map(|name| async move {
            let keys = access_keys(session, client, &name).await;
            (name, keys)
        })
        .buffer_unordered(max_in_flight);
    while let Some((name, keys)) = results.next().await {
        match keys {
            Ok(Some(keys)) => {
                keys_by_user.insert(name, Some(keys));
            }
            Ok(None) => {} // deleted meanwhile: left out below
            Err(err) => {
                failed.push(err.context(&format!("ListAccessKeys {name}")));
                keys_by_user.insert(name, None);
            }
        }
        done += 1;
        if done % step == 0 || done == total {
            progress("iam", done, Some(total));
        }
    }
    drop(results);
    if let Some(first) = failed.first() {
        errors.push(partial(
            IAM_USER,
            None,
            format!(
                "access keys unknown for {} of {total} users; first failure: {}",
                failed.len(),
                first.message
            ),
        ));
    }

    let mut assets = Vec::with_capacity(details.users.len() + details.roles.len());
    for user in details.users {
        let Some(name) = user.user_name.clone() else {
            continue;
        };
        let Some(keys) = keys_by_user.remove(&name) else {
            continue; // NoSuchEntity: the user was deleted during discovery
        };
        let last = last_used.get(&name).cloned().flatten();
        assets.extend(user_asset(user, last, keys));
    }
    assets.extend(details.roles.into_iter().filter_map(role_asset));
    Ok((assets, errors))
}

// ---------------------------------------------------------------------------------------------
// EC2

fn ec2_tags(tags: &Option<Vec<rusoto_ec2::Tag>>) -> BTreeMap<String, String> {
    tags.iter()
        .flatten()
        .filter_map(|t| Some((t.key.clone()?, t.value.clone().unwrap_or_default())))
        .collect()
}

fn instance_asset(instance: Instance, region: &str) -> Option<DiscoveredAsset> {
    let instance_id = instance.instance_id?;
    let tags = ec2_tags(&instance.tags);
    let name = tags
        .get("Name")
        .filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| instance_id.clone());
    let security_groups: Vec<Value> = instance
        .security_groups
        .unwrap_or_default()
        .into_iter()
        .map(|g| json!({"group_id": g.group_id, "group_name": g.group_name}))
        .collect();
    let attributes = json!({
        "instance_id": instance_id,
        "instance_type": instance.instance_type,
        "state": instance.state.and_then(|s| s.name),
        "image_id": instance.image_id,
        "private_ip": instance.private_ip_address,
        "public_ip": instance.public_ip_address,
        "vpc_id": instance.vpc_id,
        "subnet_id": instance.subnet_id,
        "security_groups": security_groups,
        "tags": tags,
        "launch_time": instance.launch_time,
        "availability_zone": instance.placement.and_then(|p| p.availability_zone),
        "key_name": instance.key_name,
    });
    Some(DiscoveredAsset {
        asset_type: EC2_INSTANCE.into(),
        external_id: instance_id,
        name,
        region: Some(region.to_string()),
        attributes,
    })
}

fn rule(permission: IpPermission) -> Value {
    let mut out = Map::new();
    out.insert("protocol".into(), json!(permission.ip_protocol));
    out.insert("from_port".into(), json!(permission.from_port));
    out.insert("to_port".into(), json!(permission.to_port));
    let cidrs: Vec<String> = permission
        .ip_ranges
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.cidr_ip)
        .collect();
    out.insert("cidr_blocks".into(), json!(cidrs));
    let cidrs6: Vec<String> = permission
        .ipv_6_ranges
        .unwrap_or_default()
        .into_iter()
        .filter_map(|r| r.cidr_ipv_6)
        .collect();
    out.insert("ipv6_cidr_blocks".into(), json!(cidrs6));
    let groups: Vec<String> = permission
        .user_id_group_pairs
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.group_id.or(p.group_name))
        .collect();
    out.insert("source_security_groups".into(), json!(groups));
    let prefixes: Vec<String> = permission
        .prefix_list_ids
        .unwrap_or_default()
        .into_iter()
        .filter_map(|p| p.prefix_list_id)
        .collect();
    out.insert("prefix_list_ids".into(), json!(prefixes));
    Value::Object(out)
}

fn security_group_asset(group: SecurityGroup, region: &str) -> Option<DiscoveredAsset> {
    let group_id = group.group_id?;
    let group_name = group.group_name.unwrap_or_else(|| group_id.clone());
    let attributes = json!({
        "group_id": group_id,
        "group_name": group_name,
        "description": group.description,
        "vpc_id": group.vpc_id,
        "owner_id": group.owner_id,
        "ingress": group.ip_permissions.unwrap_or_default().into_iter().map(rule).collect::<Vec<_>>(),
        "egress": group.ip_permissions_egress.unwrap_or_default().into_iter().map(rule).collect::<Vec<_>>(),
        "tags": ec2_tags(&group.tags),
    });
    Some(DiscoveredAsset {
        asset_type: EC2_SECURITY_GROUP.into(),
        external_id: group_id,
        name: group_name,
        region: Some(region.to_string()),
        attributes,
    })
}

async fn instances(
    session: &Session,
    ec2: &rusoto_ec2::Ec2Client,
    region: &str,
) -> Result<Vec<DiscoveredAsset>, CallError> {
    let mut out = Vec::new();
    let mut token = None;
    for pages in 1.. {
        let request = DescribeInstancesRequest {
            max_results: Some(PAGE_SIZE),
            next_token: token.clone(),
            ..Default::default()
        };
        let page = session
            .call("EC2", region, || ec2.describe_instances(request.clone()))
            .await?;
        for reservation in page.reservations.unwrap_or_default() {
            for instance in reservation.instances.unwrap_or_default() {
                out.extend(instance_asset(instance, region));
            }
        }
        token = next_page(true, page.next_token, &token, pages, "DescribeInstances")?;
        if token.is_none() {
            break;
        }
    }
    Ok(out)
}

async fn security_groups(
    session: &Session,
    ec2: &rusoto_ec2::Ec2Client,
    region: &str,
) -> Result<Vec<DiscoveredAsset>, CallError> {
    let mut out = Vec::new();
    let mut token = None;
    for pages in 1.. {
        let request = DescribeSecurityGroupsRequest {
            max_results: Some(PAGE_SIZE),
            next_token: token.clone(),
            ..Default::default()
        };
        let page = session
            .call("EC2", region, || {
                ec2.describe_security_groups(request.clone())
            })
            .await?;
        for group in page.security_groups.unwrap_or_default() {
            out.extend(security_group_asset(group, region));
        }
        token = next_page(
            true,
            page.next_token,
            &token,
            pages,
            "DescribeSecurityGroups",
        )?;
        if token.is_none() {
            break;
        }
    }
    Ok(out)
}

/// Instances and security groups of one region; a failure of either is partial.
async fn ec2_region(
    session: &Session,
    region: &str,
    progress: ProgressFn<'_>,
) -> (Vec<DiscoveredAsset>, Vec<PartialFailure>) {
    let phase = format!("ec2:{region}");
    progress(&phase, 0, None);
    let ec2 = session.ec2(region);
    let (found_instances, found_groups) = futures_util::future::join(
        instances(session, &ec2, region),
        security_groups(session, &ec2, region),
    )
    .await;
    let mut assets = Vec::new();
    let mut errors = Vec::new();
    match found_instances {
        Ok(found) => assets.extend(found),
        Err(err) => errors.push(partial(
            EC2_INSTANCE,
            Some(region),
            err.context("DescribeInstances").message,
        )),
    }
    match found_groups {
        Ok(found) => assets.extend(found),
        Err(err) => errors.push(partial(
            EC2_SECURITY_GROUP,
            Some(region),
            err.context("DescribeSecurityGroups").message,
        )),
    }
    let n = assets.len() as u64;
    progress(&phase, n, Some(n));
    (assets, errors)
}

// ---------------------------------------------------------------------------------------------
// S3

async fn s3_buckets(session: &Session) -> Result<Vec<DiscoveredAsset>, CallError> {
    let s3 = session.s3();
    let region = session.settings.region.clone();
    let answer = session.call("S3", &region, || s3.list_buckets()).await?;
    Ok(answer
        .buckets
        .unwrap_or_default()
        .into_iter()
        .filter_map(|bucket| {
            let name = bucket.name?;
            Some(DiscoveredAsset {
                asset_type: S3_BUCKET.into(),
                external_id: name.clone(),
                name: name.clone(),
                region: None,
                attributes: json!({"bucket_name": name, "created_at": bucket.creation_date}),
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;

    #[test]
    fn paging_stops_and_refuses_loops() {
        assert_eq!(
            next_page(false, Some("m".into()), &None, 1, "x").unwrap(),
            None
        );
        assert_eq!(next_page(true, None, &None, 1, "x").unwrap(), None);
        assert_eq!(
            next_page(true, Some(String::new()), &None, 1, "x").unwrap(),
            None
        );
        assert_eq!(
            next_page(true, Some("m2".into()), &Some("m1".into()), 2, "x").unwrap(),
            Some("m2".into())
        );
        assert!(next_page(true, Some("m".into()), &Some("m".into()), 2, "x").is_err());
    }

    #[test]
    fn security_group_rules() {
        let permission = IpPermission {
            from_port: Some(22),
            to_port: Some(22),
            ip_protocol: Some("tcp".into()),
            ip_ranges: Some(vec![rusoto_ec2::IpRange {
                cidr_ip: Some("10.0.0.0/8".into()),
                description: None,
            }]),
            ..Default::default()
        };
        assert_eq!(
            rule(permission),
            json!({"protocol": "tcp", "from_port": 22, "to_port": 22,
                   "cidr_blocks": ["10.0.0.0/8"], "ipv6_cidr_blocks": [],
                   "source_security_groups": [], "prefix_list_ids": []})
        );
    }
}
