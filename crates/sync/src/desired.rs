//! Desired state: what TeamCity should hold, computed from a directory
//! snapshot, the policy and the pins. Pure.
//!
//! - Every SCIM group becomes a managed TeamCity group named after its
//!   `displayName`, keyed by [`group_key`] (derived from the SCIM id only),
//!   carrying the roles of every rule that matches it.
//! - `[policy.defaults]` roles go on one managed group ([`DEFAULTS_GROUP_KEY`])
//!   that holds every active managed user; never on `ALL_USERS_GROUP`.
//! - Inactive users belong to nothing and hold no roles.
//!
//! # Caps
//!
//! TeamCity cannot cap a group's role per member, so a capped user (its SCIM
//! `userType` matches a `[[policy.caps]]` entry) joins a group only when every
//! role of that group is inside the cap's `allowed_roles`. For a group whose
//! roles exceed the cap, the user does not join it and instead gets per-user
//! (direct) roles equal to that group's roles ∩ `allowed_roles`. The defaults
//! group is treated the same way. So a capped user's effective roles, direct
//! and through groups, always stay inside `allowed_roles`, and it still gets
//! every allowed role its groups would give it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::model::{DEFAULTS_GROUP_KEY, DEFAULTS_GROUP_NAME, DEFAULTS_MARKER, Directory, RoleAt};
use crate::policy::{Match, Pins, Policy};

/// Options for [`desired`].
#[derive(Debug, Clone)]
pub struct DesiredOptions {
    /// Name of the defaults group.
    pub defaults_group_name: String,
    /// `Some(groups)`: the directory is a part of it (an outbox pass's read), and `groups` are
    /// the SCIM ids of the groups the pass plans whole. A pin whose group the part lacks is
    /// reported missing only when that group is one of them (a SCIM DELETE in scope; any other
    /// group is merely not read); a `displayName` rule not pinned yet matches nothing and pins
    /// nothing (the engine runs a whole pass when one could match).
    pub partial: Option<BTreeSet<String>>,
}

impl Default for DesiredOptions {
    fn default() -> Self {
        DesiredOptions {
            defaults_group_name: DEFAULTS_GROUP_NAME.to_owned(),
            partial: None,
        }
    }
}

/// A user as TeamCity should hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredUser {
    /// SCIM id.
    pub scim_id: String,
    /// Username, lower-cased as TeamCity stores it.
    pub username: String,
    /// Display name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// SCIM `active`.
    pub active: bool,
    /// Direct (per-user) roles: only from caps.
    pub roles: BTreeSet<RoleAt>,
}

/// A managed group as TeamCity should hold it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredGroup {
    /// Marker value: the SCIM group id, or [`DEFAULTS_MARKER`].
    pub marker: String,
    /// Name (SCIM `displayName`).
    pub name: String,
    /// Roles.
    pub roles: BTreeSet<RoleAt>,
    /// The policy rules that match it (indexes into [`Policy::groups`]), for explanations.
    pub rules: Vec<usize>,
    /// Member SCIM user ids (active users only; capped users kept out where needed).
    pub members: BTreeSet<String>,
    /// A fixed key (the defaults group); otherwise the key is [`group_key`] of
    /// the marker at the current generation.
    pub fixed_key: Option<String>,
}

/// Something an operator must look at; nobody loses access over it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Alert {
    /// A group pinned by a `displayName` rule was renamed in the IdP; the rule
    /// keeps applying to it (by id).
    PinnedGroupRenamed {
        /// Pin key of the rule.
        rule: String,
        /// SCIM group id.
        group_id: String,
        /// The name in the rule.
        rule_name: String,
        /// The group's name now.
        new_name: String,
    },
    /// The group a `displayName` rule is pinned to no longer exists; the rule
    /// applies to nothing (a new group with the same name is NOT picked up).
    PinnedGroupMissing {
        /// Pin key.
        rule: String,
        /// SCIM group id.
        group_id: String,
    },
    /// Several groups have the name a not-yet-pinned `displayName` rule
    /// matches; the rule applies to none of them.
    AmbiguousDisplayName {
        /// Pin key.
        rule: String,
        /// The name.
        name: String,
        /// The groups.
        group_ids: Vec<String>,
    },
}

impl Alert {
    /// A short kind, for metrics labels and audit events.
    pub fn kind(&self) -> &'static str {
        match self {
            Alert::PinnedGroupRenamed { .. } => "pinned_group_renamed",
            Alert::PinnedGroupMissing { .. } => "pinned_group_missing",
            Alert::AmbiguousDisplayName { .. } => "ambiguous_display_name",
        }
    }

    /// Logs the alert (warn) and counts it in
    /// `teamcity_scim_policy_alerts_total{kind}`. The caller writes the audit event.
    pub fn emit(&self) {
        tracing::warn!(kind = self.kind(), alert = %self, "policy alert");
        metrics::counter!("teamcity_scim_policy_alerts_total", "kind" => self.kind()).increment(1);
    }
}

impl fmt::Display for Alert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Alert::PinnedGroupRenamed {
                rule,
                group_id,
                rule_name,
                new_name,
            } => write!(
                f,
                "rule {rule:?} matches displayName {rule_name:?} and is pinned to group {group_id}, \
                 which is now named {new_name:?}; the rule still applies to it (update the rule)"
            ),
            Alert::PinnedGroupMissing { rule, group_id } => write!(
                f,
                "rule {rule:?} is pinned to group {group_id}, which no longer exists; the rule applies to nothing"
            ),
            Alert::AmbiguousDisplayName {
                rule,
                name,
                group_ids,
            } => write!(
                f,
                "rule {rule:?}: {} groups are named {name:?} ({}); the rule applies to none of them",
                group_ids.len(),
                group_ids.join(", ")
            ),
        }
    }
}

/// The desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Users by SCIM id.
    pub users: BTreeMap<String, DesiredUser>,
    /// Managed groups by marker.
    pub groups: BTreeMap<String, DesiredGroup>,
    /// Alerts raised while computing it.
    pub alerts: Vec<Alert>,
    /// The pins after this run (input pins plus new first matches); persist them.
    pub pins: Pins,
}

/// The TeamCity key of a SCIM group at a generation: `SCIM_` + the first 12
/// upper-case hex digits of SHA-256(id) + `_` + generation. The generation
/// bumps on each rename swap. Needs TeamCity 2021.1+ (keys longer than 16).
pub fn group_key(scim_id: &str, generation: u32) -> String {
    let digest = hex::encode_upper(Sha256::digest(scim_id.as_bytes()));
    format!("SCIM_{}_{generation}", &digest[..12])
}

/// The generation of `key` if it is a key of `scim_id`.
pub fn key_generation(scim_id: &str, key: &str) -> Option<u32> {
    let base = group_key(scim_id, 0);
    let prefix = &base[..base.len() - 1];
    key.strip_prefix(prefix)?.parse().ok()
}

/// Whether a `displayName` rule not pinned yet matches a group of `directory`: a partial
/// directory cannot tell whether such a match is unique, so the engine plans that pass whole.
pub fn unpinned_match(directory: &Directory, policy: &Policy, pins: &Pins) -> bool {
    policy.groups.iter().any(|rule| match &rule.matcher {
        Match::DisplayName(name) => {
            let key = rule.pin_key().unwrap_or_default();
            !pins.contains_key(&key) && directory.groups.iter().any(|g| g.display_name == *name)
        }
        _ => false,
    })
}

/// Computes the desired state. Pure; see the module docs for the rules.
pub fn desired(
    directory: &Directory,
    policy: &Policy,
    pins: &Pins,
    opts: &DesiredOptions,
) -> Desired {
    let mut out = Desired {
        pins: pins.clone(),
        ..Desired::default()
    };

    // Users.
    for u in &directory.users {
        out.users.insert(
            u.id.clone(),
            DesiredUser {
                scim_id: u.id.clone(),
                username: u.user_name.to_lowercase(),
                name: crate::model::tc_name(u),
                email: u.email.clone().filter(|e| !e.is_empty()),
                active: u.active,
                roles: BTreeSet::new(),
            },
        );
    }
    let active: BTreeSet<&str> = directory
        .users
        .iter()
        .filter(|u| u.active)
        .map(|u| u.id.as_str())
        .collect();

    // Rules → roles per SCIM group id.
    let mut roles_of: BTreeMap<&str, BTreeSet<RoleAt>> = BTreeMap::new();
    let mut rules_of: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, rule) in policy.groups.iter().enumerate() {
        let targets: Vec<&str> = match &rule.matcher {
            Match::ExternalId(v) => directory
                .groups
                .iter()
                .filter(|g| g.external_id.as_deref() == Some(v.as_str()))
                .map(|g| g.id.as_str())
                .collect(),
            Match::Id(v) => directory
                .groups
                .iter()
                .filter(|g| g.id == *v)
                .map(|g| g.id.as_str())
                .collect(),
            Match::DisplayName(name) => {
                let key = rule.pin_key().unwrap_or_default();
                match out.pins.get(&key) {
                    Some(pinned) => match directory.groups.iter().find(|g| g.id == *pinned) {
                        Some(g) => {
                            if g.display_name != *name {
                                out.alerts.push(Alert::PinnedGroupRenamed {
                                    rule: key.clone(),
                                    group_id: g.id.clone(),
                                    rule_name: name.clone(),
                                    new_name: g.display_name.clone(),
                                });
                            }
                            vec![g.id.as_str()]
                        }
                        None if opts
                            .partial
                            .as_ref()
                            .is_some_and(|groups| !groups.contains(pinned)) =>
                        {
                            Vec::new()
                        }
                        None => {
                            out.alerts.push(Alert::PinnedGroupMissing {
                                rule: key.clone(),
                                group_id: pinned.clone(),
                            });
                            Vec::new()
                        }
                    },
                    None if opts.partial.is_some() => Vec::new(),
                    None => {
                        let found: Vec<&str> = directory
                            .groups
                            .iter()
                            .filter(|g| g.display_name == *name)
                            .map(|g| g.id.as_str())
                            .collect();
                        if found.len() > 1 {
                            out.alerts.push(Alert::AmbiguousDisplayName {
                                rule: key.clone(),
                                name: name.clone(),
                                group_ids: found.iter().map(|s| (*s).to_owned()).collect(),
                            });
                            Vec::new()
                        } else {
                            if let Some(id) = found.first() {
                                out.pins.insert(key.clone(), (*id).to_owned());
                            }
                            found
                        }
                    }
                }
            }
        };
        for t in targets {
            rules_of.entry(t).or_default().push(index);
            roles_of
                .entry(t)
                .or_default()
                .extend(rule.roles.iter().cloned());
        }
    }

    // Groups, with caps applied to membership.
    let mut groups: Vec<DesiredGroup> = Vec::new();
    for g in &directory.groups {
        let members = g
            .members
            .iter()
            .filter(|m| active.contains(m.as_str()))
            .cloned()
            .collect();
        groups.push(DesiredGroup {
            marker: g.id.clone(),
            name: g.display_name.clone(),
            roles: roles_of.remove(g.id.as_str()).unwrap_or_default(),
            rules: rules_of.remove(g.id.as_str()).unwrap_or_default(),
            members,
            fixed_key: None,
        });
    }
    if !policy.defaults.roles.is_empty() {
        groups.push(DesiredGroup {
            marker: DEFAULTS_MARKER.to_owned(),
            name: opts.defaults_group_name.clone(),
            roles: policy.defaults.roles.iter().cloned().collect(),
            rules: Vec::new(),
            members: active.iter().map(|s| (*s).to_owned()).collect(),
            fixed_key: Some(DEFAULTS_GROUP_KEY.to_owned()),
        });
    }
    for u in directory.users.iter().filter(|u| u.active) {
        let Some(cap) = policy.cap_for(u.user_type.as_deref()) else {
            continue;
        };
        let allowed = |r: &RoleAt| cap.iter().any(|a| a.allows(r));
        let mut direct = BTreeSet::new();
        for g in groups.iter_mut().filter(|g| g.members.contains(&u.id)) {
            if !g.roles.iter().all(allowed) {
                g.members.remove(&u.id);
                direct.extend(g.roles.iter().filter(|r| allowed(r)).cloned());
            }
        }
        if let Some(d) = out.users.get_mut(&u.id) {
            d.roles = direct;
        }
    }
    out.groups = groups.into_iter().map(|g| (g.marker.clone(), g)).collect();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DirGroup, DirUser};

    #[test]
    fn group_keys_derive_from_the_id_only() {
        let k = group_key("a1b2", 0);
        assert!(k.starts_with("SCIM_") && k.ends_with("_0"), "{k}");
        assert_eq!(k.len(), "SCIM_".len() + 12 + 2);
        assert!(
            k.chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        );
        assert_eq!(k, group_key("a1b2", 0));
        assert_ne!(k, group_key("a1b3", 0));
        assert_eq!(key_generation("a1b2", &group_key("a1b2", 17)), Some(17));
        assert_eq!(key_generation("a1b3", &group_key("a1b2", 1)), None);
        assert_eq!(key_generation("a1b2", "DEVS"), None);
    }

    fn dir() -> Directory {
        Directory {
            users: vec![DirUser {
                id: "u1".into(),
                user_name: "Ann".into(),
                active: true,
                ..DirUser::default()
            }],
            groups: vec![DirGroup {
                id: "g1".into(),
                display_name: "Admins".into(),
                external_id: None,
                members: vec!["u1".into(), "ghost".into()],
            }],
        }
    }

    #[test]
    fn display_name_rules_pin_and_alert_on_rename() {
        let policy = Policy::from_toml(
            r#"[[groups]]
match = { displayName = "Admins" }
roles = ["SYSTEM_ADMIN@g"]"#,
        )
        .expect("policy");
        let d = desired(&dir(), &policy, &Pins::new(), &DesiredOptions::default());
        assert_eq!(
            d.pins.get("displayName:Admins").map(String::as_str),
            Some("g1")
        );
        assert!(d.alerts.is_empty());
        assert_eq!(d.groups["g1"].roles.len(), 1);
        assert_eq!(d.users["u1"].username, "ann");
        assert_eq!(d.groups["g1"].members.len(), 1, "unknown members dropped");

        // Renamed in the IdP; another group takes the old name: the pin holds.
        let mut renamed = dir();
        renamed.groups[0].display_name = "Platform Admins".into();
        renamed.groups.push(DirGroup {
            id: "g2".into(),
            display_name: "Admins".into(),
            ..DirGroup::default()
        });
        let d2 = desired(&renamed, &policy, &d.pins, &DesiredOptions::default());
        assert_eq!(d2.groups["g1"].roles.len(), 1, "nobody loses access");
        assert!(
            d2.groups["g2"].roles.is_empty(),
            "the impostor gets nothing"
        );
        assert_eq!(d2.alerts.len(), 1);
        assert_eq!(d2.alerts[0].kind(), "pinned_group_renamed");

        // Group gone: alert, no re-pin.
        let mut gone = renamed.clone();
        gone.groups.remove(0);
        let d3 = desired(&gone, &policy, &d.pins, &DesiredOptions::default());
        assert_eq!(d3.alerts[0].kind(), "pinned_group_missing");
        assert!(d3.groups["g2"].roles.is_empty());

        // Not yet pinned and ambiguous: nobody gets the roles.
        let d4 = desired(
            &renamed_ambiguous(),
            &policy,
            &Pins::new(),
            &DesiredOptions::default(),
        );
        assert_eq!(d4.alerts[0].kind(), "ambiguous_display_name");
        assert!(d4.groups.values().all(|g| g.roles.is_empty()));
        assert!(d4.pins.is_empty());
    }

    fn renamed_ambiguous() -> Directory {
        let mut d = dir();
        d.groups.push(DirGroup {
            id: "g2".into(),
            display_name: "Admins".into(),
            ..DirGroup::default()
        });
        d
    }
}
