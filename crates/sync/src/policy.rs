//! The `[policy]` section: which roles an IdP group's TeamCity group carries,
//! default roles for every active managed user, and caps by `userType`.
//!
//! ```toml
//! [[policy.groups]]
//! match = { externalId = "00g1abc" }   # or { id = "..." } or { displayName = "..." }
//! roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]
//! [policy.defaults]
//! roles = ["PROJECT_VIEWER@p:_Root"]
//! [[policy.caps]]
//! user_type = "Agent"
//! allowed_roles = ["PROJECT_VIEWER"]
//! ```
//!
//! Role texts are checked for syntax when the policy is parsed; [`check`]
//! checks role ids and project scopes against what TeamCity defines.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::model::{RoleAt, RoleScope};

/// Pins of `displayName` rules: [`GroupRule::pin_key`] → SCIM group id. The
/// caller persists it between runs.
pub type Pins = BTreeMap<String, String>;

/// The whole `[policy]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Group rules.
    #[serde(default)]
    pub groups: Vec<GroupRule>,
    /// Roles for every active managed user.
    #[serde(default)]
    pub defaults: Defaults,
    /// Caps by `userType`.
    #[serde(default)]
    pub caps: Vec<Cap>,
}

/// How a rule finds its IdP group: exactly one of the three.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Match {
    /// The IdP's immutable object id (preferred).
    ExternalId(String),
    /// The SCIM id we assigned.
    Id(String),
    /// The group's name; pinned to the group's id at first match.
    DisplayName(String),
}

impl fmt::Display for Match {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Match::ExternalId(v) => write!(f, "externalId = {v:?}"),
            Match::Id(v) => write!(f, "id = {v:?}"),
            Match::DisplayName(v) => write!(f, "displayName = {v:?}"),
        }
    }
}

/// `[[policy.groups]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupRule {
    /// Optional name, used in messages and as the pin key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Which IdP group.
    #[serde(rename = "match")]
    pub matcher: Match,
    /// Roles the group's TeamCity group carries.
    #[serde(default)]
    pub roles: Vec<RoleAt>,
}

impl GroupRule {
    /// Key of this rule in [`Pins`]: its `name`, else `displayName:<value>`
    /// (stable when rules are reordered). `None` for rules that need no pin.
    pub fn pin_key(&self) -> Option<String> {
        match &self.matcher {
            Match::DisplayName(v) => Some(
                self.name
                    .clone()
                    .unwrap_or_else(|| format!("displayName:{v}")),
            ),
            _ => None,
        }
    }
}

/// `[policy.defaults]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Roles.
    #[serde(default)]
    pub roles: Vec<RoleAt>,
}

/// `[[policy.caps]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cap {
    /// SCIM `userType` this cap applies to (compared ASCII-case-insensitively).
    pub user_type: String,
    /// Allowed roles: a role id (`PROJECT_VIEWER`, any scope) or a role at a
    /// scope (`PROJECT_VIEWER@p:Backend`).
    pub allowed_roles: Vec<String>,
}

/// One entry of [`Cap::allowed_roles`], parsed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Allowed {
    /// A role id at any scope.
    Any(String),
    /// Exactly this role at this scope.
    At(RoleAt),
}

impl Allowed {
    /// Parses `ROLE` or `ROLE@scope`.
    pub fn parse(text: &str) -> Result<Allowed, String> {
        if text.contains('@') {
            text.parse().map(Allowed::At).map_err(|e| e.to_string())
        } else if !text.is_empty() && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            Ok(Allowed::Any(text.to_owned()))
        } else {
            Err(format!("invalid role id '{text}'"))
        }
    }

    /// Whether this entry allows `role`.
    pub fn allows(&self, role: &RoleAt) -> bool {
        match self {
            Allowed::Any(id) => *id == role.role,
            Allowed::At(r) => r == role,
        }
    }

    fn role_id(&self) -> &str {
        match self {
            Allowed::Any(id) => id,
            Allowed::At(r) => &r.role,
        }
    }
}

/// Errors loading a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// TOML syntax or shape (role syntax errors land here too, with position).
    #[error("policy: {0}")]
    Toml(#[from] toml::de::Error),
    /// Valid TOML, invalid policy.
    #[error("policy: {0}")]
    Invalid(String),
}

impl Policy {
    /// Parses the *contents* of the `[policy]` table (`groups`, `defaults`,
    /// `caps` at top level), and validates it offline.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let policy: Policy = toml::from_str(text)?;
        policy.validate()?;
        Ok(policy)
    }

    /// Offline validation: cap entries parse, no empty match values.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let problems = check_offline(self);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PolicyError::Invalid(
                problems
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            ))
        }
    }

    /// The cap for this `userType`, parsed (the first matching cap wins).
    pub fn cap_for(&self, user_type: Option<&str>) -> Option<Vec<Allowed>> {
        let user_type = user_type?;
        self.caps
            .iter()
            .find(|c| c.user_type.eq_ignore_ascii_case(user_type))
            .map(|c| {
                c.allowed_roles
                    .iter()
                    .filter_map(|a| Allowed::parse(a).ok())
                    .collect()
            })
    }
}

/// One problem found by [`check`], with the rule it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The rule, e.g. `groups[0] (externalId = "00g1")`, `defaults`, `caps[1] (userType = "Agent")`.
    pub rule: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.rule, self.message)
    }
}

fn rule_label(i: usize, rule: &GroupRule) -> String {
    match &rule.name {
        Some(n) => format!("groups[{i}] {n:?} ({})", rule.matcher),
        None => format!("groups[{i}] ({})", rule.matcher),
    }
}

fn check_offline(policy: &Policy) -> Vec<Problem> {
    let mut out = Vec::new();
    let mut pin_keys = BTreeSet::new();
    for (i, rule) in policy.groups.iter().enumerate() {
        let value = match &rule.matcher {
            Match::ExternalId(v) | Match::Id(v) | Match::DisplayName(v) => v,
        };
        if value.trim().is_empty() {
            out.push(Problem {
                rule: rule_label(i, rule),
                message: "match value is empty".into(),
            });
        }
        if let Some(k) = rule.pin_key()
            && !pin_keys.insert(k.clone())
        {
            out.push(Problem {
                rule: rule_label(i, rule),
                message: format!("pin key {k:?} is used by another rule; give the rule a `name`"),
            });
        }
    }
    let mut types = BTreeSet::new();
    for (i, cap) in policy.caps.iter().enumerate() {
        let label = format!("caps[{i}] (userType = {:?})", cap.user_type);
        if !types.insert(cap.user_type.to_ascii_lowercase()) {
            out.push(Problem {
                rule: label.clone(),
                message: "another cap has the same userType (only the first applies)".into(),
            });
        }
        for a in &cap.allowed_roles {
            if let Err(e) = Allowed::parse(a) {
                out.push(Problem {
                    rule: label.clone(),
                    message: e,
                });
            }
        }
    }
    out
}

/// Validates the policy against what TeamCity defines: every role id must be
/// in `available_roles` (from `GET /app/rest/roles`) and every `p:` scope in
/// `project_ids` (external ids). Returns every problem, each with its rule.
pub fn check(
    policy: &Policy,
    available_roles: &BTreeSet<String>,
    project_ids: &BTreeSet<String>,
) -> Vec<Problem> {
    let mut out = check_offline(policy);
    let check_role = |out: &mut Vec<Problem>, label: &str, role: &RoleAt| {
        if !available_roles.contains(&role.role) {
            out.push(Problem {
                rule: label.to_owned(),
                message: format!("{role}: TeamCity has no role '{}'", role.role),
            });
        }
        if let RoleScope::Project(p) = &role.scope
            && !project_ids.contains(p)
        {
            out.push(Problem {
                rule: label.to_owned(),
                message: format!("{role}: TeamCity has no project with external id '{p}'"),
            });
        }
    };
    for (i, rule) in policy.groups.iter().enumerate() {
        let label = rule_label(i, rule);
        if rule.roles.is_empty() {
            out.push(Problem {
                rule: label.clone(),
                message: "no roles (the group is synced anyway; the rule has no effect)".into(),
            });
        }
        for role in &rule.roles {
            check_role(&mut out, &label, role);
        }
    }
    for role in &policy.defaults.roles {
        check_role(&mut out, "defaults", role);
    }
    for (i, cap) in policy.caps.iter().enumerate() {
        let label = format!("caps[{i}] (userType = {:?})", cap.user_type);
        for a in cap
            .allowed_roles
            .iter()
            .filter_map(|a| Allowed::parse(a).ok())
        {
            match &a {
                Allowed::At(r) => check_role(&mut out, &label, r),
                Allowed::Any(id) if !available_roles.contains(id) => out.push(Problem {
                    rule: label.clone(),
                    message: format!("TeamCity has no role '{}'", a.role_id()),
                }),
                Allowed::Any(_) => {}
            }
        }
    }
    out
}

/// [`check`] against a live TeamCity (`GET /roles`, `GET /projects`).
pub async fn check_live(
    client: &teamcity::Client,
    policy: &Policy,
) -> Result<Vec<Problem>, teamcity::TeamCityError> {
    let roles = client
        .list_roles()
        .await?
        .into_iter()
        .map(|r| r.id)
        .collect();
    let projects = client
        .list_projects()
        .await?
        .into_iter()
        .map(|p| p.id)
        .collect();
    Ok(check(policy, &roles, &projects))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[[groups]]
match = { externalId = "00g1abc" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]

[[groups]]
name = "admins"
match = { displayName = "TC Admins" }
roles = ["SYSTEM_ADMIN@g"]

[[groups]]
match = { id = "g-3" }
roles = ["PROJECT_ADMIN@p:Nope", "NO_SUCH_ROLE@g"]

[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]

[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT_VIEWER", "PROJECT_DEVELOPER@p:Backend"]
"#;

    fn set(items: &[&str]) -> BTreeSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn parses_the_documented_shape() {
        let p = Policy::from_toml(EXAMPLE).expect("parses");
        assert_eq!(p.groups.len(), 3);
        assert_eq!(p.groups[0].matcher, Match::ExternalId("00g1abc".into()));
        assert_eq!(
            p.groups[0].roles,
            vec![
                RoleAt::project("PROJECT_DEVELOPER", "Backend"),
                RoleAt::project("PROJECT_VIEWER", "Frontend")
            ]
        );
        assert_eq!(p.groups[1].pin_key().as_deref(), Some("admins"));
        assert_eq!(p.groups[0].pin_key(), None);
        assert_eq!(
            p.defaults.roles,
            vec![RoleAt::project("PROJECT_VIEWER", "_Root")]
        );
        let cap = p.cap_for(Some("agent")).expect("case-insensitive");
        assert!(
            cap.iter()
                .any(|a| a.allows(&RoleAt::project("PROJECT_VIEWER", "X")))
        );
        assert!(
            cap.iter()
                .any(|a| a.allows(&RoleAt::project("PROJECT_DEVELOPER", "Backend")))
        );
        assert!(
            !cap.iter()
                .any(|a| a.allows(&RoleAt::project("PROJECT_DEVELOPER", "X")))
        );
        assert_eq!(p.cap_for(Some("Employee")), None);
        assert_eq!(p.cap_for(None), None);
    }

    #[test]
    fn rejects_bad_shapes() {
        let cases = [
            // two matchers in one rule
            r#"[[groups]]
match = { externalId = "a", id = "b" }
roles = []"#,
            // unknown matcher
            r#"[[groups]]
match = { name = "a" }
roles = []"#,
            // bad role syntax
            r#"[[groups]]
match = { id = "a" }
roles = ["PROJECT_VIEWER"]"#,
            r#"[defaults]
roles = ["PROJECT_VIEWER@project:X"]"#,
            // unknown key
            r#"[[caps]]
user_type = "Agent"
allowed = ["PROJECT_VIEWER"]"#,
            // bad cap entry
            r#"[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT VIEWER"]"#,
            // empty match value
            r#"[[groups]]
match = { displayName = " " }
roles = ["PROJECT_VIEWER@g"]"#,
        ];
        for text in cases {
            assert!(Policy::from_toml(text).is_err(), "{text}");
        }
        assert_eq!(Policy::from_toml("").expect("empty"), Policy::default());
    }

    #[test]
    fn check_reports_each_problem_with_its_rule() {
        let p = Policy::from_toml(EXAMPLE).expect("parses");
        let roles = set(&[
            "SYSTEM_ADMIN",
            "PROJECT_ADMIN",
            "PROJECT_DEVELOPER",
            "PROJECT_VIEWER",
        ]);
        let projects = set(&["_Root", "Backend", "Frontend"]);
        let problems = check(&p, &roles, &projects);
        let got: Vec<String> = problems.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            vec![
                "groups[2] (id = \"g-3\"): PROJECT_ADMIN@p:Nope: TeamCity has no project with external id 'Nope'".to_owned(),
                "groups[2] (id = \"g-3\"): NO_SUCH_ROLE@g: TeamCity has no role 'NO_SUCH_ROLE'".to_owned(),
            ]
        );
        let problems = check(&p, &set(&["PROJECT_DEVELOPER"]), &projects);
        assert!(problems.iter().any(|p| p.rule == "defaults"));
        assert!(problems.iter().any(|p| p.rule.starts_with("caps[0]")
            && p.message == "TeamCity has no role 'PROJECT_VIEWER'"));
        assert!(
            problems
                .iter()
                .any(|p| p.rule == "groups[1] \"admins\" (displayName = \"TC Admins\")")
        );
    }
}
