//! Serde types mirroring TeamCity's JSON, field for field.
//!
//! These are wire types: every field is optional because `fields=` can leave
//! any of them out, and lists default to empty because TeamCity omits empty
//! nested collections in some forms. They carry no behaviour beyond parsing
//! and rendering role scopes, and must not grow SCIM concepts.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `GET /app/rest/server`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerInfo {
    /// Full version text, e.g. `2025.03 (build 186049)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Major version, e.g. 2025.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_major: Option<u32>,
    /// Minor version, e.g. 3.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version_minor: Option<u32>,
    /// Build number as text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub build_number: Option<String>,
    /// Server start time (TeamCity date format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// Server time now (TeamCity date format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_time: Option<String>,
    /// Node role, `main_node` on a single-node server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Server root URL.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub web_url: Option<String>,
}

/// One user property (`{name, value}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Property {
    /// Property name.
    pub name: String,
    /// Property value.
    #[serde(default)]
    pub value: String,
}

/// A `properties` collection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Properties {
    /// Number of properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The properties.
    #[serde(default)]
    pub property: Vec<Property>,
}

impl Properties {
    /// The value of property `name`, if present.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.property
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_str())
    }
}

/// A role scope: global (`g`) or one project (`p:<externalId>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Server-wide.
    Global,
    /// One project (and its subprojects), by external id.
    Project(String),
}

impl Scope {
    /// Parses the scope form TeamCity renders (`g` or `p:<id>`).
    pub fn parse(text: &str) -> Option<Scope> {
        if text.eq_ignore_ascii_case("g") {
            return Some(Scope::Global);
        }
        text.strip_prefix("p:")
            .filter(|id| !id.is_empty())
            .map(|id| Scope::Project(id.to_owned()))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Global => f.write_str("g"),
            Scope::Project(id) => write!(f, "p:{id}"),
        }
    }
}

/// A role granted at a scope (`{roleId, scope, href}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleAssignment {
    /// Role id, e.g. `PROJECT_DEVELOPER`.
    pub role_id: String,
    /// Scope text, `g` or `p:<externalId>`.
    pub scope: String,
    /// Link to the assignment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
}

impl RoleAssignment {
    /// An assignment to send.
    pub fn new(role_id: impl Into<String>, scope: &Scope) -> Self {
        Self {
            role_id: role_id.into(),
            scope: scope.to_string(),
            href: None,
        }
    }

    /// The scope, parsed.
    pub fn parsed_scope(&self) -> Option<Scope> {
        Scope::parse(&self.scope)
    }
}

/// A `roles` collection of assignments.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleAssignments {
    /// The assignments.
    #[serde(default)]
    pub role: Vec<RoleAssignment>,
}

/// A role definition from `GET /app/rest/roles`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleDefinition {
    /// Role id.
    pub id: String,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
}

/// `GET /app/rest/roles`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleDefinitions {
    /// Number of roles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The roles.
    #[serde(default)]
    pub role: Vec<RoleDefinition>,
}

/// A TeamCity user as returned (any field may be cut by `fields=`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    /// Numeric id, stable across renames.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// Username (TeamCity stores it lower-cased).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Email (not unique in TeamCity).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Last login time (TeamCity date format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_login: Option<String>,
    /// Link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
    /// User properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
    /// Direct role assignments (not those inherited from groups).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<RoleAssignments>,
    /// Direct groups, always including `ALL_USERS_GROUP`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Groups>,
}

/// A page of users.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Users {
    /// Number of users in this response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The users.
    #[serde(default)]
    pub user: Vec<User>,
}

/// A TeamCity user group as returned.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Group key (immutable; TeamCity has no rename).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Display name (unique).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Description, omitted when empty.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
    /// Direct members.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub users: Option<Users>,
    /// Role assignments of the group.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<RoleAssignments>,
    /// Group properties.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub properties: Option<Properties>,
}

/// A list of groups.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Groups {
    /// Number of groups.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The groups.
    #[serde(default)]
    pub group: Vec<Group>,
}

/// A personal access token's metadata (the value is never listed).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    /// Token name, unique per user.
    pub name: String,
    /// Creation time (TeamCity date format).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creation_time: Option<String>,
    /// Expiry, absent for never-expiring tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiration_time: Option<String>,
}

/// A user's tokens.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    /// Number of tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The tokens.
    #[serde(default)]
    pub token: Vec<TokenInfo>,
}

/// A project (short form).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Project {
    /// External id (`_Root` for the root project).
    pub id: String,
    /// Display name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Parent's external id, absent for `_Root`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_project_id: Option<String>,
    /// Link.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub href: Option<String>,
}

/// A list of projects.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Projects {
    /// Number of projects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The projects.
    #[serde(default)]
    pub project: Vec<Project>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_render() {
        let cases = [
            ("g", Some(Scope::Global), "g"),
            ("G", Some(Scope::Global), "g"),
            (
                "p:Backend",
                Some(Scope::Project("Backend".into())),
                "p:Backend",
            ),
            ("P:Backend", None, ""),
            ("p:", None, ""),
            ("global", None, ""),
        ];
        for (text, want, rendered) in cases {
            let got = Scope::parse(text);
            assert_eq!(got, want, "{text}");
            if let Some(scope) = got {
                assert_eq!(scope.to_string(), rendered);
            }
        }
    }

    #[test]
    fn user_parses_teamcity_shape() {
        let json = r#"{"username":"jdoe","name":"John Doe","id":7,"email":"j@x","href":"/app/rest/users/id:7",
          "properties":{"count":1,"href":"/p","property":[{"name":"scim.id","value":"00u1"}]},
          "roles":{"role":[{"roleId":"PROJECT_DEVELOPER","scope":"p:Backend","href":"/r"}]},
          "groups":{"count":1,"group":[{"key":"ALL_USERS_GROUP","name":"All Users","href":"/g"}]},
          "unknownField":1}"#;
        let user: User = serde_json::from_str(json).expect("parses");
        assert_eq!(user.id, Some(7));
        assert_eq!(
            user.properties.as_ref().and_then(|p| p.get("scim.id")),
            Some("00u1")
        );
        let role = &user.roles.as_ref().expect("roles").role[0];
        assert_eq!(role.parsed_scope(), Some(Scope::Project("Backend".into())));
        assert_eq!(
            user.groups.expect("groups").group[0].key.as_deref(),
            Some("ALL_USERS_GROUP")
        );
    }
}
