//! Why a person has the access they have: every role the desired state gives a user, with the
//! group, the policy rule, the defaults or the cap it comes from, and what a cap took away.
//! Pure: computed from the directory, the policy and the desired state, for the dashboard.

use std::collections::BTreeSet;
use std::fmt;

use crate::desired::Desired;
use crate::model::{DEFAULTS_MARKER, Directory, RoleAt};
use crate::policy::Policy;

/// Where a role comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Via {
    /// Membership of a managed group whose policy rules carry the role.
    Group {
        /// SCIM id of the group.
        scim_id: String,
        /// Its name.
        name: String,
        /// The rules that give the role, as [`rule_label`] writes them.
        rules: Vec<String>,
    },
    /// `[policy.defaults]`: every active managed user has it.
    Defaults,
    /// A direct role: a cap kept the user out of a group that carries roles the cap does not
    /// allow, and gave them directly the roles of that group it does allow.
    Cap {
        /// The user's `userType` the cap matched.
        user_type: String,
        /// SCIM id of the group.
        scim_id: String,
        /// Its name.
        name: String,
    },
}

impl fmt::Display for Via {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Via::Group { name, rules, .. } => {
                write!(f, "member of group {name:?}, policy {}", rules.join(", "))
            }
            Via::Defaults => f.write_str("policy defaults (every active managed user)"),
            Via::Cap {
                user_type, name, ..
            } => write!(
                f,
                "direct role: the cap for userType {user_type:?} kept the user out of group \
                 {name:?} and allows this role of it"
            ),
        }
    }
}

/// One role a user should hold in TeamCity, and why.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Grant {
    /// The role at its scope.
    pub role: RoleAt,
    /// Why.
    pub via: Via,
}

/// A cap that took something away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapRemoval {
    /// The user's `userType`.
    pub user_type: String,
    /// The group the user was kept out of.
    pub group: String,
    /// Its roles the cap does not allow (the user does not get them).
    pub denied: Vec<RoleAt>,
}

/// Everything the desired state gives one user, explained.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Access {
    /// Whether the user is active (an inactive user has no access at all).
    pub active: bool,
    /// Every role with its reason (a role reached two ways is listed twice).
    pub grants: Vec<Grant>,
    /// What caps removed.
    pub capped: Vec<CapRemoval>,
    /// The user's IdP groups that carry no role (no policy rule matches them).
    pub groups_without_roles: Vec<String>,
}

/// How a rule is named in explanations: `rule "name" (externalId = "…")` or the match alone.
pub fn rule_label(policy: &Policy, index: usize) -> String {
    match policy.groups.get(index) {
        Some(rule) => match &rule.name {
            Some(name) => format!("rule {name:?} ({})", rule.matcher),
            None => format!("rule {}", rule.matcher),
        },
        None => format!("rule #{index}"),
    }
}

/// Explains the access of the user with SCIM id `user` (`None` if the directory has no such
/// user). `desired` must be computed from `directory` and `policy`.
pub fn access(
    directory: &Directory,
    policy: &Policy,
    desired: &Desired,
    user: &str,
) -> Option<Access> {
    let u = directory.users.iter().find(|u| u.id == user)?;
    let mut out = Access {
        active: u.active,
        ..Access::default()
    };
    if !u.active {
        return Some(out);
    }
    for g in desired.groups.values().filter(|g| g.members.contains(user)) {
        for role in &g.roles {
            let via = if g.marker == DEFAULTS_MARKER {
                Via::Defaults
            } else {
                Via::Group {
                    scim_id: g.marker.clone(),
                    name: g.name.clone(),
                    rules: g
                        .rules
                        .iter()
                        .filter(|i| policy.groups[**i].roles.contains(role))
                        .map(|i| rule_label(policy, *i))
                        .collect(),
                }
            };
            out.grants.push(Grant {
                role: role.clone(),
                via,
            });
        }
    }
    let direct: &BTreeSet<RoleAt> = match desired.users.get(user) {
        Some(d) => &d.roles,
        None => return Some(out),
    };
    let user_type = u.user_type.clone().unwrap_or_default();
    for dg in directory
        .groups
        .iter()
        .filter(|g| g.members.contains(&u.id))
    {
        let Some(g) = desired.groups.get(&dg.id) else {
            continue;
        };
        if g.roles.is_empty() {
            out.groups_without_roles.push(g.name.clone());
            continue;
        }
        if g.members.contains(user) {
            continue;
        }
        // Kept out of the group by a cap: the allowed roles came as direct roles.
        let (kept, denied): (Vec<&RoleAt>, Vec<&RoleAt>) =
            g.roles.iter().partition(|r| direct.contains(*r));
        for role in kept {
            out.grants.push(Grant {
                role: role.clone(),
                via: Via::Cap {
                    user_type: user_type.clone(),
                    scim_id: g.marker.clone(),
                    name: g.name.clone(),
                },
            });
        }
        if !denied.is_empty() {
            out.capped.push(CapRemoval {
                user_type: user_type.clone(),
                group: g.name.clone(),
                denied: denied.into_iter().cloned().collect(),
            });
        }
    }
    out.grants.sort();
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{DesiredOptions, desired};
    use crate::model::{DirGroup, DirUser};
    use crate::policy::Pins;

    const POLICY: &str = r#"
[[groups]]
name = "backend"
match = { externalId = "ext-backend" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]

[[groups]]
match = { displayName = "Admins" }
roles = ["SYSTEM_ADMIN@g"]

[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]

[[caps]]
user_type = "Contractor"
allowed_roles = ["PROJECT_VIEWER"]
"#;

    fn user(id: &str, active: bool, user_type: Option<&str>) -> DirUser {
        DirUser {
            id: id.into(),
            user_name: id.into(),
            active,
            user_type: user_type.map(str::to_owned),
            ..DirUser::default()
        }
    }

    fn group(id: &str, name: &str, ext: Option<&str>, members: &[&str]) -> DirGroup {
        DirGroup {
            id: id.into(),
            display_name: name.into(),
            external_id: ext.map(str::to_owned),
            members: members.iter().map(|m| (*m).to_owned()).collect(),
        }
    }

    fn lines(a: &Access) -> Vec<String> {
        a.grants
            .iter()
            .map(|g| format!("{} <- {}", g.role, g.via))
            .collect()
    }

    /// One row: the user, the expected grants as "ROLE@scope <- reason", the expected cap
    /// denials (group, roles) and the expected role-less groups.
    type Row = (
        &'static str,
        Vec<&'static str>,
        Vec<(&'static str, Vec<&'static str>)>,
        Vec<&'static str>,
    );

    #[test]
    fn every_role_is_explained_by_its_group_rule_defaults_or_cap() {
        let policy = Policy::from_toml(POLICY).expect("policy");
        let directory = Directory {
            users: vec![
                user("ann", true, None),
                user("carl", true, Some("contractor")),
                user("gone", false, None),
            ],
            groups: vec![
                group(
                    "g1",
                    "Backend Devs",
                    Some("ext-backend"),
                    &["ann", "carl", "gone"],
                ),
                group("g2", "Admins", None, &["ann"]),
                group("g3", "Book club", None, &["ann"]),
            ],
        };
        let d = desired(
            &directory,
            &policy,
            &Pins::new(),
            &DesiredOptions::default(),
        );
        let table: Vec<Row> = vec![
            (
                "ann",
                vec![
                    "PROJECT_DEVELOPER@p:Backend <- member of group \"Backend Devs\", policy rule \"backend\" (externalId = \"ext-backend\")",
                    "PROJECT_VIEWER@p:Frontend <- member of group \"Backend Devs\", policy rule \"backend\" (externalId = \"ext-backend\")",
                    "SYSTEM_ADMIN@g <- member of group \"Admins\", policy rule displayName = \"Admins\"",
                    "PROJECT_VIEWER@p:_Root <- policy defaults (every active managed user)",
                ],
                vec![],
                vec!["Book club"],
            ),
            (
                "carl",
                vec![
                    "PROJECT_VIEWER@p:_Root <- policy defaults (every active managed user)",
                    "PROJECT_VIEWER@p:Frontend <- direct role: the cap for userType \"contractor\" kept the user out of group \"Backend Devs\" and allows this role of it",
                ],
                vec![("Backend Devs", vec!["PROJECT_DEVELOPER@p:Backend"])],
                vec![],
            ),
            ("gone", vec![], vec![], vec![]),
        ];
        for (id, grants, capped, roleless) in table {
            let a = access(&directory, &policy, &d, id).expect("user exists");
            let mut want: Vec<String> = grants.iter().map(|s| (*s).to_owned()).collect();
            let mut got = lines(&a);
            want.sort();
            got.sort();
            assert_eq!(got, want, "grants of {id}");
            let got_caps: Vec<(String, Vec<String>)> = a
                .capped
                .iter()
                .map(|c| {
                    (
                        c.group.clone(),
                        c.denied.iter().map(ToString::to_string).collect(),
                    )
                })
                .collect();
            let want_caps: Vec<(String, Vec<String>)> = capped
                .iter()
                .map(|(g, r)| ((*g).to_owned(), r.iter().map(|s| (*s).to_owned()).collect()))
                .collect();
            assert_eq!(got_caps, want_caps, "cap removals of {id}");
            assert_eq!(a.groups_without_roles, roleless, "role-less groups of {id}");
            assert_eq!(a.active, id != "gone");
        }
        assert_eq!(access(&directory, &policy, &d, "nobody"), None);
    }
}
