//! Access review: who had which TeamCity role at which scope, directly or through which group,
//! reconstructed by replaying the audit trail.
//!
//! The sync engine audits every TeamCity action it applied (`resource_type = "TeamCity"`,
//! `operation` = the action kind, `resource_id` = `user:<id>`, `user:new:<scim id>` or
//! `group:<key>`, and a detail with the group keys, roles and member ids the action changed).
//! The worker links each created user to its TeamCity id with a `mapping.upsert` event, in the
//! same transaction as the user's creation event (or, for links it finds later, after a pass);
//! later events of the pass that still say `new:<scim id>` resolve through that link. Replaying the successful ones in order gives the state of the managed part of
//! TeamCity at any time. A prune stores the replayed state in its checkpoint, so replay
//! continues from there.
//!
//! What the trail cannot show: changes made in TeamCity by hand (until the reconciler repairs
//! them, which is audited), and unmanaged users and groups.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::{Store, StoreError, StoreResult, timefmt};

/// A managed TeamCity user as the trail knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct UserAccess {
    /// The SCIM id (the user's marker), once known.
    pub scim_id: Option<String>,
    /// Marked deactivated by the bridge.
    pub deactivated: bool,
    /// Keys of the groups the user is a direct member of.
    pub groups: BTreeSet<String>,
    /// Direct roles, `ROLE@scope`.
    pub roles: BTreeSet<String>,
}

/// A managed TeamCity group as the trail knows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct GroupAccess {
    /// The group name (absent if it looked like an email).
    pub name: Option<String>,
    /// The group's marker (SCIM group id or `$defaults`).
    pub marker: Option<String>,
    /// Roles of the group, `ROLE@scope`.
    pub roles: BTreeSet<String>,
}

/// The replayed state. Users are keyed by TeamCity id, or by `new:<scim id>` while the id of a
/// user created in the current pass is not yet linked.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AccessState {
    /// Users by TeamCity id (`new:<scim id>` until linked).
    pub users: BTreeMap<String, UserAccess>,
    /// Groups by key.
    pub groups: BTreeMap<String, GroupAccess>,
    /// The last event applied.
    pub last_seq: i64,
    /// SCIM id → TeamCity id of users linked so far: a pass's later events that still name a
    /// user created in it as `new:<scim id>` (its group creates, say) reach the linked user,
    /// however early in the pass the link was recorded.
    pub linked: BTreeMap<String, String>,
}

/// One line of an access review.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AccessRow {
    /// The TeamCity user id (`None` for a user whose creation was not linked yet).
    pub teamcity_user_id: Option<String>,
    /// The SCIM user id.
    pub scim_id: Option<String>,
    /// A display name for the user: the username unless it is an email, else the SCIM id
    /// (filled by the caller; the trail carries no names).
    pub user: String,
    /// Role id.
    pub role: String,
    /// `g` or `p:<project external id>`.
    pub scope: String,
    /// `direct`, or the key of the group the role comes through.
    pub via: String,
    /// The name of that group (absent if direct, or if it looked like an email).
    pub group_name: Option<String>,
    /// The user carried the bridge's deactivated mark.
    pub deactivated: bool,
}

fn detail_str<'a>(d: &'a Value, k: &str) -> Option<&'a str> {
    d.get(k).and_then(Value::as_str)
}

fn user_key(target: &str) -> Option<String> {
    let rest = target.strip_prefix("user:")?;
    Some(match rest.strip_prefix("new:") {
        Some(scim) => format!("new:{scim}"),
        None => rest.to_owned(),
    })
}

/// `ROLE@scope` → (`ROLE`, `scope`).
pub fn split_role(r: &str) -> (&str, &str) {
    r.split_once('@').unwrap_or((r, ""))
}

impl AccessState {
    /// Reads a checkpoint snapshot (an empty state for `null`).
    pub fn from_snapshot(v: &Value) -> StoreResult<Self> {
        if v.is_null() {
            return Ok(AccessState::default());
        }
        Ok(serde_json::from_value(v.clone())?)
    }

    /// The snapshot a checkpoint stores.
    pub fn snapshot(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    fn user(&mut self, key: String) -> &mut UserAccess {
        let key = match key.strip_prefix("new:").and_then(|s| self.linked.get(s)) {
            Some(tcid) => tcid.clone(),
            None => key,
        };
        let u = self.users.entry(key.clone()).or_default();
        if u.scim_id.is_none()
            && let Some(s) = key.strip_prefix("new:")
        {
            u.scim_id = Some(s.to_owned());
        }
        u
    }

    /// Links a user created in a pass (`new:<scim>`) to its TeamCity id.
    fn link(&mut self, scim: &str, tcid: &str) {
        self.linked.insert(scim.to_owned(), tcid.to_owned());
        let pending = self.users.remove(&format!("new:{scim}"));
        let u = self.users.entry(tcid.to_owned()).or_default();
        u.scim_id = Some(scim.to_owned());
        if let Some(p) = pending {
            u.deactivated |= p.deactivated;
            u.groups.extend(p.groups);
            u.roles.extend(p.roles);
        }
    }

    /// Applies one event (anything but a successful TeamCity action or user link is ignored).
    pub fn apply(&mut self, e: &AuditEvent) {
        self.last_seq = self.last_seq.max(e.seq);
        if e.outcome != "success" {
            return;
        }
        let Some(target) = e.resource_id.as_deref() else {
            return;
        };
        let d: Value = serde_json::from_str(&e.detail).unwrap_or(Value::Null);
        if e.resource_type == "Mapping" {
            if e.operation == "mapping.upsert"
                && let Some(scim) = target.strip_prefix("user:")
                && let Some(tcid) = detail_str(&d, "teamcity_id")
            {
                self.link(scim, tcid);
            }
            return;
        }
        if e.resource_type != "TeamCity" {
            return;
        }
        let group_key = target.strip_prefix("group:").map(str::to_owned);
        let role = detail_str(&d, "role").map(str::to_owned);
        let group = detail_str(&d, "group").map(str::to_owned);
        match (e.operation.as_str(), user_key(target), group_key) {
            ("create_user", Some(k), _) => {
                // A new creation: pending until its own link, whatever an earlier one said.
                if let Some(s) = k.strip_prefix("new:") {
                    self.linked.remove(s);
                }
                let scim = detail_str(&d, "scim_id").map(str::to_owned);
                let u = self.user(k);
                if scim.is_some() {
                    u.scim_id = scim;
                }
                // Groups joined in the create call itself.
                for g in d["groups"].as_array().into_iter().flatten() {
                    if let Some(g) = g.as_str() {
                        u.groups.insert(g.to_owned());
                    }
                }
            }
            ("delete_user", Some(k), _) => {
                self.users.remove(&k);
            }
            // An existing TeamCity user taken over by username: from now on it is the SCIM
            // user's (its earlier access was not the bridge's doing and is not replayed).
            ("adopt_user", Some(k), _) => {
                if let Some(scim) = detail_str(&d, "scim_id").map(str::to_owned) {
                    self.user(k).scim_id = Some(scim);
                }
            }
            ("add_to_group", Some(k), _) => {
                if let Some(g) = group {
                    self.user(k).groups.insert(g);
                }
            }
            ("remove_from_group", Some(k), _) => {
                if let Some(g) = group {
                    self.user(k).groups.remove(&g);
                }
            }
            ("add_user_role", Some(k), _) => {
                if let Some(r) = role {
                    self.user(k).roles.insert(r);
                }
            }
            ("remove_user_role", Some(k), _) => {
                if let Some(r) = role {
                    self.user(k).roles.remove(&r);
                }
            }
            ("set_deactivated", Some(k), _) => self.user(k).deactivated = true,
            ("clear_deactivated", Some(k), _) => self.user(k).deactivated = false,
            ("create_group", _, Some(key)) => {
                let strings = |field: &str| -> Vec<String> {
                    d.get(field)
                        .and_then(Value::as_array)
                        .map(|a| {
                            a.iter()
                                .filter_map(Value::as_str)
                                .map(str::to_owned)
                                .collect()
                        })
                        .unwrap_or_default()
                };
                self.groups.insert(
                    key.clone(),
                    GroupAccess {
                        name: detail_str(&d, "name").map(str::to_owned),
                        marker: detail_str(&d, "marker").map(str::to_owned),
                        roles: strings("roles").into_iter().collect(),
                    },
                );
                for m in strings("member_ids") {
                    self.user(m).groups.insert(key.clone());
                }
            }
            ("delete_group", _, Some(key)) => {
                self.groups.remove(&key);
                for u in self.users.values_mut() {
                    u.groups.remove(&key);
                }
            }
            ("add_group_role", _, Some(key)) => {
                if let Some(r) = role {
                    self.groups.entry(key).or_default().roles.insert(r);
                }
            }
            ("remove_group_role", _, Some(key)) => {
                if let Some(r) = role
                    && let Some(g) = self.groups.get_mut(&key)
                {
                    g.roles.remove(&r);
                }
            }
            _ => {}
        }
    }

    /// The review rows, sorted by user, role, scope and via. `user` is the SCIM id (callers
    /// may replace it with a username that is not an email).
    pub fn rows(&self) -> Vec<AccessRow> {
        let mut rows = Vec::new();
        for (key, u) in &self.users {
            let tcid = (!key.starts_with("new:")).then(|| key.clone());
            let row = |role: &str, via: &str, group_name: Option<String>| {
                let (r, s) = split_role(role);
                AccessRow {
                    teamcity_user_id: tcid.clone(),
                    scim_id: u.scim_id.clone(),
                    user: u.scim_id.clone().unwrap_or_else(|| key.clone()),
                    role: r.to_owned(),
                    scope: s.to_owned(),
                    via: via.to_owned(),
                    group_name,
                    deactivated: u.deactivated,
                }
            };
            for r in &u.roles {
                rows.push(row(r, "direct", None));
            }
            for gk in &u.groups {
                if let Some(g) = self.groups.get(gk) {
                    for r in &g.roles {
                        rows.push(row(r, gk, g.name.clone()));
                    }
                }
            }
        }
        rows.sort();
        rows
    }
}

/// Replays the trail up to and including `at`, from the newest checkpoint (whose signature the
/// caller checks, e.g. with [`crate::audit::verify_store`]). Fails if `at` lies before the
/// last pruned event: that history is gone.
pub async fn reconstruct(store: &dyn Store, at: OffsetDateTime) -> StoreResult<AccessState> {
    let cp = store.audit_checkpoint().await?;
    let mut state = match &cp {
        Some(c) => {
            let t = timefmt::parse(&c.last_time).ok_or_else(|| {
                StoreError::Invalid(format!("checkpoint {}: bad time {}", c.id, c.last_time))
            })?;
            if at < t {
                return Err(StoreError::Invalid(format!(
                    "events up to {} (seq {}) were pruned: access before then cannot be \
                     reconstructed",
                    c.last_time, c.last_seq
                )));
            }
            let mut s = AccessState::from_snapshot(&c.snapshot)?;
            s.last_seq = c.last_seq;
            s
        }
        None => AccessState::default(),
    };
    let mut after = state.last_seq;
    loop {
        let page = store.audit_range(None, Some(at), after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            state.apply(e);
        }
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn ev(seq: i64, op: &str, target: &str, detail: Value) -> AuditEvent {
        AuditEvent {
            seq,
            time: String::new(),
            actor: "sync".into(),
            request_id: None,
            resource_type: if op.starts_with("mapping.") {
                "Mapping"
            } else {
                "TeamCity"
            }
            .into(),
            resource_id: Some(target.into()),
            operation: op.into(),
            outcome: "success".into(),
            status: None,
            detail: detail.to_string(),
            prev_hash: String::new(),
            hash: String::new(),
        }
    }

    /// `tcid scim ROLE@scope via [name] [deactivated]` per row.
    fn render(s: &AccessState) -> Vec<String> {
        s.rows()
            .iter()
            .map(|r| {
                format!(
                    "{} {} {}@{} {}{}{}",
                    r.teamcity_user_id.as_deref().unwrap_or("-"),
                    r.scim_id.as_deref().unwrap_or("-"),
                    r.role,
                    r.scope,
                    r.via,
                    r.group_name
                        .as_deref()
                        .map(|n| format!(" ({n})"))
                        .unwrap_or_default(),
                    if r.deactivated { " deactivated" } else { "" }
                )
            })
            .collect()
    }

    /// A user `s1` created in a pass (linked to TeamCity id 11) and a group `DEV` with a role.
    fn base() -> Vec<(&'static str, &'static str, Value)> {
        vec![
            ("create_user", "user:new:s1", json!({"scim_id": "s1"})),
            (
                "create_group",
                "group:DEV",
                json!({"key": "DEV", "name": "developers", "marker": "g1",
                       "roles": ["PROJECT_DEVELOPER@p:Backend"], "member_ids": []}),
            ),
            ("mapping.upsert", "user:s1", json!({"teamcity_id": "11"})),
        ]
    }

    #[test]
    fn replay_table() {
        type Step = (&'static str, &'static str, Value);
        let cases: Vec<(&str, Vec<Step>, Vec<&str>)> = vec![
            ("nothing yet", base(), vec![]),
            (
                "join",
                vec![("add_to_group", "user:11", json!({"group": "DEV"}))],
                vec!["11 s1 PROJECT_DEVELOPER@p:Backend DEV (developers)"],
            ),
            (
                "join before the link resolves at the link",
                vec![
                    ("create_user", "user:new:s2", json!({"scim_id": "s2"})),
                    ("add_to_group", "user:new:s2", json!({"group": "DEV"})),
                    (
                        "add_user_role",
                        "user:new:s2",
                        json!({"role": "PROJECT_VIEWER@g"}),
                    ),
                    ("mapping.upsert", "user:s2", json!({"teamcity_id": "12"})),
                ],
                vec![
                    "12 s2 PROJECT_DEVELOPER@p:Backend DEV (developers)",
                    "12 s2 PROJECT_VIEWER@g direct",
                ],
            ),
            (
                "groups joined in the create call itself",
                vec![
                    (
                        "create_user",
                        "user:new:s5",
                        json!({"scim_id": "s5", "groups": ["DEV"]}),
                    ),
                    ("mapping.upsert", "user:s5", json!({"teamcity_id": "16"})),
                ],
                vec!["16 s5 PROJECT_DEVELOPER@p:Backend DEV (developers)"],
            ),
            (
                "events after an early link reach the linked user",
                vec![
                    ("create_user", "user:new:s3", json!({"scim_id": "s3"})),
                    ("mapping.upsert", "user:s3", json!({"teamcity_id": "13"})),
                    (
                        "create_group",
                        "group:OPS",
                        json!({"key": "OPS", "name": "ops", "marker": "g2",
                               "roles": ["PROJECT_ADMIN@p:Backend"], "member_ids": ["new:s3"]}),
                    ),
                    ("add_to_group", "user:new:s3", json!({"group": "DEV"})),
                ],
                vec![
                    "13 s3 PROJECT_ADMIN@p:Backend OPS (ops)",
                    "13 s3 PROJECT_DEVELOPER@p:Backend DEV (developers)",
                ],
            ),
            (
                "a re-creation is pending until its own link",
                vec![
                    ("create_user", "user:new:s4", json!({"scim_id": "s4"})),
                    ("mapping.upsert", "user:s4", json!({"teamcity_id": "14"})),
                    ("delete_user", "user:14", json!({})),
                    ("create_user", "user:new:s4", json!({"scim_id": "s4"})),
                    ("add_to_group", "user:new:s4", json!({"group": "DEV"})),
                    ("mapping.upsert", "user:s4", json!({"teamcity_id": "15"})),
                ],
                vec!["15 s4 PROJECT_DEVELOPER@p:Backend DEV (developers)"],
            ),
            (
                "an adopted user is the SCIM user's from its adoption on",
                vec![
                    (
                        "adopt_user",
                        "user:21",
                        json!({"scim_id": "s9", "adopted": true}),
                    ),
                    ("add_to_group", "user:21", json!({"group": "DEV"})),
                ],
                vec!["21 s9 PROJECT_DEVELOPER@p:Backend DEV (developers)"],
            ),
            (
                "unlinked new user shows its SCIM id only",
                vec![(
                    "add_user_role",
                    "user:new:s3",
                    json!({"role": "PROJECT_VIEWER@g"}),
                )],
                vec!["- s3 PROJECT_VIEWER@g direct"],
            ),
            (
                "leave",
                vec![
                    ("add_to_group", "user:11", json!({"group": "DEV"})),
                    ("remove_from_group", "user:11", json!({"group": "DEV"})),
                ],
                vec![],
            ),
            (
                "group role added then removed, another kept",
                vec![
                    ("add_to_group", "user:11", json!({"group": "DEV"})),
                    (
                        "add_group_role",
                        "group:DEV",
                        json!({"role": "PROJECT_ADMIN@p:Backend"}),
                    ),
                    (
                        "add_group_role",
                        "group:DEV",
                        json!({"role": "AGENT_MANAGER@g"}),
                    ),
                    (
                        "remove_group_role",
                        "group:DEV",
                        json!({"role": "PROJECT_ADMIN@p:Backend"}),
                    ),
                ],
                vec![
                    "11 s1 AGENT_MANAGER@g DEV (developers)",
                    "11 s1 PROJECT_DEVELOPER@p:Backend DEV (developers)",
                ],
            ),
            (
                "group deleted",
                vec![
                    ("add_to_group", "user:11", json!({"group": "DEV"})),
                    (
                        "add_user_role",
                        "user:11",
                        json!({"role": "PROJECT_VIEWER@g"}),
                    ),
                    ("delete_group", "group:DEV", json!({"key": "DEV"})),
                ],
                vec!["11 s1 PROJECT_VIEWER@g direct"],
            ),
            (
                "rename swap: new key created with the members, old key deleted",
                vec![
                    ("add_to_group", "user:11", json!({"group": "DEV"})),
                    (
                        "create_group",
                        "group:DEV_2",
                        json!({"key": "DEV_2", "name": "engineering", "marker": "g1",
                               "roles": ["PROJECT_DEVELOPER@p:Backend"], "member_ids": ["11"]}),
                    ),
                    ("delete_group", "group:DEV", json!({"key": "DEV"})),
                ],
                vec!["11 s1 PROJECT_DEVELOPER@p:Backend DEV_2 (engineering)"],
            ),
            (
                "deactivation strips and marks",
                vec![
                    ("add_to_group", "user:11", json!({"group": "DEV"})),
                    (
                        "add_user_role",
                        "user:11",
                        json!({"role": "PROJECT_VIEWER@g"}),
                    ),
                    ("set_deactivated", "user:11", json!({})),
                    ("remove_from_group", "user:11", json!({"group": "DEV"})),
                ],
                vec!["11 s1 PROJECT_VIEWER@g direct deactivated"],
            ),
            (
                "reactivation clears the mark",
                vec![
                    (
                        "add_user_role",
                        "user:11",
                        json!({"role": "PROJECT_VIEWER@g"}),
                    ),
                    ("set_deactivated", "user:11", json!({})),
                    ("clear_deactivated", "user:11", json!({})),
                ],
                vec!["11 s1 PROJECT_VIEWER@g direct"],
            ),
            (
                "deleted user",
                vec![
                    ("add_to_group", "user:11", json!({"group": "DEV"})),
                    ("delete_user", "user:11", json!({})),
                ],
                vec![],
            ),
        ];
        for (name, steps, want) in cases {
            let mut s = AccessState::default();
            let all: Vec<Step> = if name == "nothing yet" {
                steps
            } else {
                base().into_iter().chain(steps).collect()
            };
            for (i, (op, target, d)) in all.into_iter().enumerate() {
                s.apply(&ev(i as i64 + 1, op, target, d));
            }
            assert_eq!(render(&s), want, "{name}");
            // The snapshot round-trips (what a checkpoint stores).
            assert_eq!(
                AccessState::from_snapshot(&s.snapshot()).unwrap(),
                s,
                "{name}"
            );
        }
    }

    #[test]
    fn failures_and_other_events_are_ignored() {
        let mut s = AccessState::default();
        let mut failed = ev(
            1,
            "add_user_role",
            "user:5",
            json!({"role": "SYSTEM_ADMIN@g"}),
        );
        failed.outcome = "failure".into();
        s.apply(&failed);
        let mut scim = ev(2, "create", "abc", json!({}));
        scim.resource_type = "User".into();
        s.apply(&scim);
        assert!(s.rows().is_empty());
        assert_eq!(s.last_seq, 2);
    }
}
