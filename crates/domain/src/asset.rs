//! Discovered assets (api.md §5) and how a discovery run is merged into the inventory.
//!
//! An asset is identified by (connector, type, external id). [`reconcile`] compares what a
//! discovery found with what is stored and decides, without any IO, what to insert, update,
//! touch (seen again, unchanged) and mark removed:
//!
//! ```
//! use nexplane_domain::asset::{reconcile, Observed};
//! use nexplane_domain::{AssetId, ConnectorId, Environment, Timestamp};
//! use serde_json::json;
//! use std::collections::BTreeSet;
//!
//! let t0 = Timestamp::from_secs(1_800_000_000);
//! let conn = ConnectorId::new(t0, 1);
//! let mut n = 0u128;
//! let mut ids = || { n += 1; AssetId::new(t0, n) };
//! let user = |name: &str| Observed {
//!     asset_type: "iam_user".into(),
//!     external_id: format!("arn:aws:iam::123456789012:user/{name}"),
//!     name: name.into(),
//!     region: None,
//!     attributes: json!({"user_name": name}),
//! };
//!
//! let first = reconcile(&conn, Environment::Production, vec![],
//!     vec![user("alice"), user("bob")], &BTreeSet::new(), t0, &mut ids);
//! assert_eq!(first.summary.assets_created, 2);
//!
//! // Bob is gone in the next complete run: he is marked removed, not deleted.
//! let t1 = t0.plus_secs(60);
//! let second = reconcile(&conn, Environment::Production, first.inserts,
//!     vec![user("alice")], &BTreeSet::new(), t1, &mut ids);
//! assert_eq!((second.touched.len(), second.removed.len()), (1, 1));
//! assert_eq!(second.summary.assets_removed, 1);
//! ```

use crate::{AssetId, ConnectorId, Environment, Timestamp};
use serde::Serialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// A discovered resource of a connector.
#[derive(Debug, Clone, PartialEq)]
pub struct Asset {
    /// Id.
    pub id: AssetId,
    /// The connector that found it.
    pub connector_id: ConnectorId,
    /// Type, e.g. `iam_user`, `ec2_instance`.
    pub asset_type: String,
    /// The provider's stable id (ARN, instance id).
    pub external_id: String,
    /// Display name.
    pub name: String,
    /// Region, for regional resources.
    pub region: Option<String>,
    /// The connector's environment.
    pub environment: Environment,
    /// Type-specific attributes.
    pub attributes: Value,
    /// First discovered.
    pub first_seen_at: Timestamp,
    /// Last discovered.
    pub last_seen_at: Timestamp,
    /// When a complete discovery no longer found it; `None` while it exists.
    pub removed_at: Option<Timestamp>,
}

/// One resource as a discovery reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    /// Type.
    pub asset_type: String,
    /// The provider's stable id.
    pub external_id: String,
    /// Display name.
    pub name: String,
    /// Region, for regional resources.
    pub region: Option<String>,
    /// Attributes.
    pub attributes: Value,
}

/// The counts a discovery job reports as its result (api.md §8).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct DiscoverySummary {
    /// Assets seen for the first time.
    pub assets_created: u64,
    /// Assets whose name, region or attributes changed, or that reappeared.
    pub assets_updated: u64,
    /// Assets marked removed by this run.
    pub assets_removed: u64,
    /// Assets found by this run, by type.
    pub by_type: BTreeMap<String, u64>,
}

/// What to write after a discovery run.
#[derive(Debug, Clone, Default)]
pub struct Reconciliation {
    /// New assets.
    pub inserts: Vec<Asset>,
    /// Stored assets with new content (or reappearing): write them whole.
    pub updates: Vec<Asset>,
    /// Stored assets found again unchanged: only `last_seen_at` moves to `now`.
    pub touched: Vec<AssetId>,
    /// Stored, present assets the run no longer found: set `removed_at` to `now`.
    pub removed: Vec<AssetId>,
    /// The counts.
    pub summary: DiscoverySummary,
}

/// Merges a discovery run into the stored assets of a connector.
///
/// * `existing`: every stored asset of the connector, removed ones included.
/// * `observed`: what the run found (a repeated (type, external id) counts once, the last
///   report wins).
/// * `incomplete_types`: asset types the run could not list completely (a region or a call
///   failed); their missing assets are not marked removed.
/// * `new_id`: makes the ids of new assets.
pub fn reconcile(
    connector_id: &ConnectorId,
    environment: Environment,
    existing: Vec<Asset>,
    observed: Vec<Observed>,
    incomplete_types: &BTreeSet<String>,
    now: Timestamp,
    new_id: &mut dyn FnMut() -> AssetId,
) -> Reconciliation {
    let mut found: BTreeMap<(String, String), Observed> = BTreeMap::new();
    for o in observed {
        found.insert((o.asset_type.clone(), o.external_id.clone()), o);
    }
    let mut by_key: HashMap<(String, String), Asset> = existing
        .into_iter()
        .map(|a| ((a.asset_type.clone(), a.external_id.clone()), a))
        .collect();

    let mut out = Reconciliation::default();
    for (key, o) in found {
        *out.summary.by_type.entry(o.asset_type.clone()).or_insert(0) += 1;
        match by_key.remove(&key) {
            None => {
                out.summary.assets_created += 1;
                out.inserts.push(Asset {
                    id: new_id(),
                    connector_id: connector_id.clone(),
                    asset_type: o.asset_type,
                    external_id: o.external_id,
                    name: o.name,
                    region: o.region,
                    environment,
                    attributes: o.attributes,
                    first_seen_at: now,
                    last_seen_at: now,
                    removed_at: None,
                });
            }
            Some(mut a) => {
                let changed = a.name != o.name
                    || a.region != o.region
                    || a.attributes != o.attributes
                    || a.removed_at.is_some();
                let env_changed = a.environment != environment;
                if changed || env_changed {
                    if changed {
                        out.summary.assets_updated += 1;
                    }
                    a.name = o.name;
                    a.region = o.region;
                    a.attributes = o.attributes;
                    a.environment = environment;
                    a.removed_at = None;
                    a.last_seen_at = now;
                    out.updates.push(a);
                } else {
                    out.touched.push(a.id);
                }
            }
        }
    }
    // What is left was not found by this run.
    let mut missing: Vec<Asset> = by_key
        .into_values()
        .filter(|a| a.removed_at.is_none() && !incomplete_types.contains(&a.asset_type))
        .collect();
    missing.sort_by(|a, b| a.id.cmp(&b.id));
    out.summary.assets_removed = missing.len() as u64;
    out.removed = missing.into_iter().map(|a| a.id).collect();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use serde_json::json;

    fn t(s: i64) -> Timestamp {
        Timestamp::from_secs(1_800_000_000 + s)
    }

    fn obs(ty: &str, id: &str, attrs: Value) -> Observed {
        Observed {
            asset_type: ty.into(),
            external_id: id.into(),
            name: id.into(),
            region: Some("us-east-1".into()),
            attributes: attrs,
        }
    }

    struct Ids(u128);
    impl Ids {
        fn next(&mut self) -> AssetId {
            self.0 += 1;
            AssetId::new(t(0), self.0)
        }
    }

    fn run(
        existing: Vec<Asset>,
        observed: Vec<Observed>,
        incomplete: &[&str],
        now: Timestamp,
        ids: &mut Ids,
    ) -> Reconciliation {
        let conn = ConnectorId::new(t(0), 1);
        let incomplete = incomplete.iter().map(|s| (*s).to_owned()).collect();
        reconcile(
            &conn,
            Environment::Staging,
            existing,
            observed,
            &incomplete,
            now,
            &mut || ids.next(),
        )
    }

    #[test]
    fn create_update_touch_remove_and_reappear() {
        let mut ids = Ids(0);
        let r1 = run(
            vec![],
            vec![
                obs("iam_user", "u1", json!({"k": 1})),
                obs("iam_user", "u2", json!({})),
                obs("s3_bucket", "b1", json!({})),
                obs("s3_bucket", "b1", json!({"dup": true})),
            ],
            &[],
            t(1),
            &mut ids,
        );
        assert_eq!(r1.summary.assets_created, 3);
        assert_eq!(r1.summary.by_type["iam_user"], 2);
        assert_eq!(r1.summary.by_type["s3_bucket"], 1);
        let b1 = r1.inserts.iter().find(|a| a.external_id == "b1").unwrap();
        assert_eq!(b1.attributes, json!({"dup": true}), "the last report wins");
        assert_eq!(b1.environment, Environment::Staging);
        assert_eq!((b1.first_seen_at, b1.last_seen_at), (t(1), t(1)));

        // u1 changes, u2 is unchanged, b1 disappears.
        let r2 = run(
            r1.inserts.clone(),
            vec![
                obs("iam_user", "u1", json!({"k": 2})),
                obs("iam_user", "u2", json!({})),
            ],
            &[],
            t(2),
            &mut ids,
        );
        assert_eq!(r2.summary.assets_created, 0);
        assert_eq!(r2.summary.assets_updated, 1);
        assert_eq!(r2.summary.assets_removed, 1);
        assert_eq!(r2.updates[0].attributes, json!({"k": 2}));
        assert_eq!(r2.updates[0].first_seen_at, t(1));
        assert_eq!(r2.updates[0].last_seen_at, t(2));
        assert_eq!(r2.touched.len(), 1);
        assert_eq!(r2.removed, vec![b1.id.clone()]);
        assert!(!r2.summary.by_type.contains_key("s3_bucket"));

        // b1 comes back: removed_at is cleared, it counts as updated.
        let mut stored = r1.inserts.clone();
        for a in &mut stored {
            if a.id == b1.id {
                a.removed_at = Some(t(2));
            }
        }
        let r3 = run(
            stored.clone(),
            vec![
                obs("iam_user", "u1", json!({"k": 1})),
                obs("iam_user", "u2", json!({})),
                obs("s3_bucket", "b1", json!({"dup": true})),
            ],
            &[],
            t(3),
            &mut ids,
        );
        assert_eq!(r3.summary.assets_updated, 1);
        assert_eq!(r3.updates[0].id, b1.id);
        assert_eq!(r3.updates[0].removed_at, None);
        assert_eq!(r3.summary.assets_removed, 0);

        // An already removed asset that is still missing is not removed twice.
        let r4 = run(
            stored,
            vec![
                obs("iam_user", "u1", json!({"k": 1})),
                obs("iam_user", "u2", json!({})),
            ],
            &[],
            t(4),
            &mut ids,
        );
        assert_eq!(r4.summary.assets_removed, 0);
    }

    #[test]
    fn incomplete_types_keep_their_assets() {
        let mut ids = Ids(0);
        let r1 = run(
            vec![],
            vec![
                obs("ec2_instance", "i-1", json!({})),
                obs("iam_user", "u1", json!({})),
            ],
            &[],
            t(1),
            &mut ids,
        );
        let r2 = run(r1.inserts, vec![], &["ec2_instance"], t(2), &mut ids);
        assert_eq!(r2.summary.assets_removed, 1);
        assert_eq!(r2.removed.len(), 1);
    }
}
