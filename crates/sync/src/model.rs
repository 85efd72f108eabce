//! The sync engine's vocabulary: roles at scopes, the managed markers, the
//! directory snapshot it takes as input, the TeamCity state it reads, and the
//! actions a plan is made of.
//!
//! Nothing here does I/O. The directory snapshot is plain data so this crate
//! never depends on the store or on SCIM types.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// User property holding the SCIM id of a user we manage. Its presence is the
/// managed marker: users without it are unmanaged and never changed.
pub const USER_MARKER: &str = "teamcity-scim.id";

/// User property set (to `"true"`) on a managed user we deactivated
/// (`active=false`, or a SCIM DELETE with `deprovision = "strip"`).
pub const USER_DEACTIVATED: &str = "teamcity-scim.deactivated";

/// Group property holding the SCIM id of the group a managed TeamCity group
/// mirrors ([`DEFAULTS_MARKER`] for the defaults group). Its presence is the
/// managed marker for groups.
pub const GROUP_MARKER: &str = "teamcity-scim.group";

/// Value of [`GROUP_MARKER`] on the defaults group (not a valid SCIM id form
/// we would ever derive a key from).
pub const DEFAULTS_MARKER: &str = "$defaults";

/// Key of the managed group that carries `[policy.defaults]` roles and holds
/// every active managed user. Never `ALL_USERS_GROUP`, which also holds
/// unmanaged users.
pub const DEFAULTS_GROUP_KEY: &str = "SCIM_DEFAULTS";

/// Name of the defaults group.
pub const DEFAULTS_GROUP_NAME: &str = "SCIM: default roles";

/// Description put on every group we create.
pub const GROUP_DESCRIPTION: &str = "Managed by teamcity-scim; changes are overwritten";

/// TeamCity's built-in group; never a managed group.
pub const ALL_USERS_GROUP: &str = "ALL_USERS_GROUP";

/// Where a role applies.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RoleScope {
    /// Server-wide (`g`).
    Global,
    /// One project and its subprojects, by external id (`p:<ExtId>`).
    Project(String),
}

impl From<&RoleScope> for teamcity::Scope {
    fn from(scope: &RoleScope) -> Self {
        match scope {
            RoleScope::Global => teamcity::Scope::Global,
            RoleScope::Project(id) => teamcity::Scope::Project(id.clone()),
        }
    }
}

impl From<&teamcity::Scope> for RoleScope {
    fn from(scope: &teamcity::Scope) -> Self {
        match scope {
            teamcity::Scope::Global => RoleScope::Global,
            teamcity::Scope::Project(id) => RoleScope::Project(id.clone()),
        }
    }
}

impl fmt::Display for RoleScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RoleScope::Global => f.write_str("g"),
            RoleScope::Project(id) => write!(f, "p:{id}"),
        }
    }
}

/// A role at a scope, written `ROLE@g` or `ROLE@p:ExtId` in the policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RoleAt {
    /// Role id, e.g. `PROJECT_DEVELOPER` (case-sensitive in TeamCity).
    pub role: String,
    /// Scope.
    pub scope: RoleScope,
}

/// Why a role text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid role '{text}': {reason} (expected ROLE@g or ROLE@p:ProjectExtId)")]
pub struct RoleParseError {
    /// The text.
    pub text: String,
    /// What is wrong.
    pub reason: &'static str,
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.len() <= 255 && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl RoleAt {
    /// A role at a scope.
    pub fn new(role: impl Into<String>, scope: RoleScope) -> Self {
        RoleAt {
            role: role.into(),
            scope,
        }
    }

    /// `ROLE@g`.
    pub fn global(role: impl Into<String>) -> Self {
        Self::new(role, RoleScope::Global)
    }

    /// `ROLE@p:project`.
    pub fn project(role: impl Into<String>, project: impl Into<String>) -> Self {
        Self::new(role, RoleScope::Project(project.into()))
    }

    /// From TeamCity's `{roleId, scope}` (`g` / `p:<id>`); `None` if the scope
    /// is not in that form.
    pub fn from_assignment(a: &teamcity::RoleAssignment) -> Option<Self> {
        a.parsed_scope().map(|s| RoleAt {
            role: a.role_id.clone(),
            scope: RoleScope::from(&s),
        })
    }

    /// The TeamCity scope.
    pub fn tc_scope(&self) -> teamcity::Scope {
        teamcity::Scope::from(&self.scope)
    }
}

impl FromStr for RoleAt {
    type Err = RoleParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason| RoleParseError {
            text: text.to_owned(),
            reason,
        };
        let (role, scope) = text.split_once('@').ok_or_else(|| err("no '@'"))?;
        if !is_identifier(role) {
            return Err(err("the role id must be [A-Za-z0-9_]+"));
        }
        let scope = if scope == "g" {
            RoleScope::Global
        } else if let Some(project) = scope.strip_prefix("p:") {
            if !is_identifier(project) {
                return Err(err("the project external id must be [A-Za-z0-9_]+"));
            }
            RoleScope::Project(project.to_owned())
        } else {
            return Err(err("the scope must be 'g' or 'p:<ExtId>'"));
        };
        Ok(RoleAt {
            role: role.to_owned(),
            scope,
        })
    }
}

impl TryFrom<String> for RoleAt {
    type Error = RoleParseError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        value.parse()
    }
}

impl From<RoleAt> for String {
    fn from(value: RoleAt) -> Self {
        value.to_string()
    }
}

impl fmt::Display for RoleAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.role, self.scope)
    }
}

// ---- input: the directory -------------------------------------------------

/// One SCIM user, as the store's directory snapshot gives it.
pub use store::DirUser;

/// The TeamCity display name of a user: `displayName`, else `givenName familyName`.
pub fn tc_name(u: &DirUser) -> Option<String> {
    if let Some(d) = u.display_name.as_deref().map(str::trim)
        && !d.is_empty()
    {
        return Some(d.to_owned());
    }
    let parts: Vec<&str> = [u.given_name.as_deref(), u.family_name.as_deref()]
        .into_iter()
        .flatten()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// One SCIM group with its member user ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirGroup {
    /// SCIM id (the TeamCity key derives from it).
    pub id: String,
    /// `displayName` (the TeamCity group name).
    pub display_name: String,
    /// `externalId` (the IdP's object id), what policy rules should match.
    pub external_id: Option<String>,
    /// Member SCIM user ids (members that are not users are ignored).
    pub members: Vec<String>,
}

/// A snapshot of the directory: the input of [`crate::desired::desired`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Directory {
    /// Users.
    pub users: Vec<DirUser>,
    /// Groups.
    pub groups: Vec<DirGroup>,
}

// ---- TeamCity as read -----------------------------------------------------

/// The keys of a user's direct groups, sorted, no duplicates. A user is in a handful of groups:
/// a sorted list of boxed strings costs a third of the tree of strings it replaces, and those
/// sets were the largest part of the cached TeamCity state (100,000 users).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GroupKeys(Vec<Box<str>>);

impl GroupKeys {
    /// Whether `key` is one of them.
    pub fn contains(&self, key: &str) -> bool {
        self.at(key).is_ok()
    }

    /// Adds `key`; `false` when it was there already.
    pub fn insert(&mut self, key: impl AsRef<str>) -> bool {
        let key = key.as_ref();
        match self.at(key) {
            Ok(_) => false,
            Err(i) => {
                self.0.insert(i, key.into());
                true
            }
        }
    }

    /// Removes `key`; `false` when it was not there.
    pub fn remove(&mut self, key: &str) -> bool {
        match self.at(key) {
            Ok(i) => {
                self.0.remove(i);
                true
            }
            Err(_) => false,
        }
    }

    /// Keeps the keys `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.0.retain(|k| keep(k));
    }

    /// The keys in order.
    pub fn iter(&self) -> impl DoubleEndedIterator<Item = &str> + ExactSizeIterator + '_ {
        self.0.iter().map(|k| &**k)
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// None.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn at(&self, key: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|k| (**k).cmp(key))
    }
}

impl<S: AsRef<str>> FromIterator<S> for GroupKeys {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        let mut keys: Vec<Box<str>> = iter.into_iter().map(|k| k.as_ref().into()).collect();
        keys.sort_unstable();
        keys.dedup();
        GroupKeys(keys)
    }
}

impl<S: AsRef<str>> Extend<S> for GroupKeys {
    fn extend<I: IntoIterator<Item = S>>(&mut self, iter: I) {
        for k in iter {
            self.insert(k);
        }
    }
}

impl<S: AsRef<str>, const N: usize> From<[S; N]> for GroupKeys {
    fn from(keys: [S; N]) -> Self {
        keys.into_iter().collect()
    }
}

impl<'a> IntoIterator for &'a GroupKeys {
    type Item = &'a str;
    type IntoIter = std::iter::Map<std::slice::Iter<'a, Box<str>>, fn(&'a Box<str>) -> &'a str>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|k| &**k)
    }
}

/// A TeamCity user as read by [`crate::actual::read_actual`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualUser {
    /// Numeric id.
    pub id: u64,
    /// Username (lower-cased by TeamCity).
    pub username: String,
    /// Display name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Value of [`USER_MARKER`]; `None` = unmanaged.
    pub scim_id: Option<String>,
    /// [`USER_DEACTIVATED`] is set.
    pub deactivated: bool,
    /// Keys of direct groups, without `ALL_USERS_GROUP`.
    pub groups: GroupKeys,
    /// Direct roles (not those through groups).
    pub roles: BTreeSet<RoleAt>,
    /// Number of access tokens, when read (only for deactivated managed users).
    pub token_count: Option<u64>,
}

/// A read of one object that failed while the rest of TeamCity was read: the object's own
/// work waits (and is reported), everyone else's goes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFailure {
    /// The TeamCity user id.
    pub user: u64,
    /// What was read (`tokens`).
    pub what: &'static str,
    /// The error, for the operator.
    pub error: String,
}

impl ActualUser {
    /// Carries our marker.
    pub fn is_managed(&self) -> bool {
        self.scim_id.is_some()
    }
}

/// A TeamCity group as read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualGroup {
    /// Key.
    pub key: String,
    /// Name.
    pub name: String,
    /// Value of [`GROUP_MARKER`]; `None` = unmanaged.
    pub marker: Option<String>,
    /// Roles of the group.
    pub roles: BTreeSet<RoleAt>,
}

/// What TeamCity holds now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ActualState {
    /// All users.
    pub users: Vec<ActualUser>,
    /// All groups (without `ALL_USERS_GROUP`).
    pub groups: Vec<ActualGroup>,
    /// Roles of `ALL_USERS_GROUP`: every user keeps them, deactivated ones too.
    pub all_users_roles: BTreeSet<RoleAt>,
    /// Per-object reads that failed (the rest was read).
    pub read_failures: Vec<ReadFailure>,
}

impl ActualState {
    /// Direct members (user ids) of each group key.
    pub fn members(&self) -> BTreeMap<&str, BTreeSet<u64>> {
        let mut m: BTreeMap<&str, BTreeSet<u64>> = BTreeMap::new();
        for u in &self.users {
            for g in &u.groups {
                m.entry(g).or_default().insert(u.id);
            }
        }
        m
    }

    /// The user with this id.
    pub fn user(&self, id: u64) -> Option<&ActualUser> {
        self.users.iter().find(|u| u.id == id)
    }

    /// The group with this key.
    pub fn group(&self, key: &str) -> Option<&ActualGroup> {
        self.groups.iter().find(|g| g.key == key)
    }

    /// Number of managed users.
    pub fn managed_users(&self) -> usize {
        self.users.iter().filter(|u| u.is_managed()).count()
    }

    /// Records the effect of an action that TeamCity accepted, so a cached state stays equal
    /// to TeamCity without reading it again. `created` maps SCIM ids of users created by
    /// [`crate::apply`] to their TeamCity ids.
    pub fn record(&mut self, action: &Action, created: &BTreeMap<String, u64>) {
        self.record_all([action], created);
    }

    /// [`ActualState::record`] for many actions, in order, with one user index for all of
    /// them (an initial load records tens of thousands of actions on as many users).
    pub fn record_all<'a>(
        &mut self,
        actions: impl IntoIterator<Item = &'a Action>,
        created: &BTreeMap<String, u64>,
    ) {
        let mut index = self.user_index();
        for action in actions {
            self.record_one(action, created, &mut index);
        }
    }

    fn user_index(&self) -> HashMap<u64, usize> {
        self.users
            .iter()
            .enumerate()
            .map(|(i, u)| (u.id, i))
            .collect()
    }

    fn record_one(
        &mut self,
        action: &Action,
        created: &BTreeMap<String, u64>,
        index: &mut HashMap<u64, usize>,
    ) {
        let resolve = |r: &UserRef| match r {
            UserRef::Id(i) => Some(*i),
            UserRef::New(x) => created.get(x).copied(),
        };
        let user = |index: &HashMap<u64, usize>, id: Option<u64>| -> Option<usize> {
            id.and_then(|i| index.get(&i).copied())
        };
        match action {
            Action::CreateUser {
                scim_id,
                username,
                name,
                email,
                groups,
            } => {
                if let Some(&id) = created.get(scim_id)
                    && !index.contains_key(&id)
                {
                    index.insert(id, self.users.len());
                    self.users.push(ActualUser {
                        id,
                        username: username.clone(),
                        name: name.clone(),
                        email: email.clone(),
                        scim_id: Some(scim_id.clone()),
                        groups: groups.iter().cloned().collect(),
                        ..ActualUser::default()
                    });
                }
            }
            Action::UpdateUser { user: id, changes } => {
                if let Some(i) = user(index, Some(*id)) {
                    let u = &mut self.users[i];
                    for c in changes {
                        match c.field {
                            Field::Username => {
                                if let Some(v) = &c.to {
                                    u.username = v.clone();
                                }
                            }
                            Field::Name => u.name = c.to.clone(),
                            Field::Email => u.email = c.to.clone(),
                        }
                    }
                }
            }
            Action::DeleteUser { user: id } => {
                if index.contains_key(id) {
                    self.users.retain(|u| u.id != *id);
                    *index = self.user_index();
                }
            }
            Action::AddToGroup { user: r, group } => {
                if let Some(i) = user(index, resolve(r)) {
                    self.users[i].groups.insert(group.clone());
                }
            }
            Action::RemoveFromGroup { user: id, group } => {
                if let Some(i) = user(index, Some(*id)) {
                    self.users[i].groups.remove(group);
                }
            }
            Action::AddUserRole { user: r, role } => {
                if let Some(i) = user(index, resolve(r)) {
                    self.users[i].roles.insert(role.clone());
                }
            }
            Action::RemoveUserRole { user: id, role } => {
                if let Some(i) = user(index, Some(*id)) {
                    self.users[i].roles.remove(role);
                }
            }
            Action::RevokeTokens { user: id } => {
                if let Some(i) = user(index, Some(*id)) {
                    self.users[i].token_count = Some(0);
                }
            }
            Action::ResetPassword { .. }
            | Action::EndSessions { .. }
            | Action::ClearRememberMe { .. } => {}
            Action::AdoptUser { user: id, scim_id } => {
                if let Some(i) = user(index, Some(*id)) {
                    self.users[i].scim_id = Some(scim_id.clone());
                }
            }
            Action::SetDeactivated { user: id } | Action::ClearDeactivated { user: id } => {
                if let Some(i) = user(index, Some(*id)) {
                    self.users[i].deactivated = matches!(action, Action::SetDeactivated { .. });
                }
            }
            Action::CreateGroup {
                key,
                name,
                marker,
                roles,
                members,
                ..
            } => {
                self.groups.retain(|g| g.key != *key);
                self.groups.push(ActualGroup {
                    key: key.clone(),
                    name: name.clone(),
                    marker: Some(marker.clone()),
                    roles: roles.iter().cloned().collect(),
                });
                for m in members {
                    if let Some(i) = user(index, resolve(m)) {
                        self.users[i].groups.insert(key.clone());
                    }
                }
            }
            Action::DeleteGroup { key } => {
                self.groups.retain(|g| g.key != *key);
                for u in &mut self.users {
                    u.groups.remove(key);
                }
            }
            Action::AddGroupRole { group, role } | Action::RemoveGroupRole { group, role } => {
                if let Some(g) = self.groups.iter_mut().find(|g| g.key == *group) {
                    if matches!(action, Action::AddGroupRole { .. }) {
                        g.roles.insert(role.clone());
                    } else {
                        g.roles.remove(role);
                    }
                }
            }
        }
    }
}

// ---- output: actions ------------------------------------------------------

/// A user an action applies to: an existing TeamCity id, or one created
/// earlier in the same plan (by SCIM id), resolved at apply time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UserRef {
    /// An existing user.
    Id(u64),
    /// The user a [`Action::CreateUser`] with this SCIM id creates.
    New(String),
}

/// A user field an update changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Field {
    /// Username.
    Username,
    /// Display name.
    Name,
    /// Email.
    Email,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Field::Username => "username",
            Field::Name => "name",
            Field::Email => "email",
        })
    }
}

/// One field change: `to = None` clears the field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldChange {
    /// The field.
    pub field: Field,
    /// Its current value (for the plan output).
    pub from: Option<String>,
    /// Its new value.
    pub to: Option<String>,
}

/// One TeamCity call (or, for [`Action::RevokeTokens`], one list plus one
/// delete per token).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// `POST /users` with the marker property, a random password and the groups it joins.
    CreateUser {
        /// SCIM id (the marker value; resolves [`UserRef::New`]).
        scim_id: String,
        /// Username, lower-cased.
        username: String,
        /// Display name.
        name: Option<String>,
        /// Email.
        email: Option<String>,
        /// Keys of groups that already exist in TeamCity which the user joins in the same call
        /// (TeamCity applies them right after creating the user).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        groups: Vec<String>,
    },
    /// `PUT /users/id:N` (or `DELETE /users/id:N/{field}` to clear).
    UpdateUser {
        /// TeamCity user id.
        user: u64,
        /// The changes, in field order.
        changes: Vec<FieldChange>,
    },
    /// `DELETE /users/id:N`.
    DeleteUser {
        /// TeamCity user id.
        user: u64,
    },
    /// `POST /users/{u}/groups {"key"}`.
    AddToGroup {
        /// The user.
        user: UserRef,
        /// Group key.
        group: String,
    },
    /// `DELETE /users/id:N/groups/key:K`.
    RemoveFromGroup {
        /// TeamCity user id.
        user: u64,
        /// Group key.
        group: String,
    },
    /// `PUT /users/{u}/roles/{role}/{scope}`.
    AddUserRole {
        /// The user.
        user: UserRef,
        /// The role.
        role: RoleAt,
    },
    /// `DELETE /users/id:N/roles/{role}/{scope}`.
    RemoveUserRole {
        /// TeamCity user id.
        user: u64,
        /// The role.
        role: RoleAt,
    },
    /// List the user's tokens and delete each.
    RevokeTokens {
        /// TeamCity user id.
        user: u64,
    },
    /// `PUT /users/id:N/password` with a fresh random value (made at apply time).
    ResetPassword {
        /// TeamCity user id.
        user: u64,
    },
    /// `POST /users/{u}/logout`: ends every session of the user (older servers answer 404:
    /// then this TeamCity cannot end sessions, which is noted, not a failure).
    EndSessions {
        /// TeamCity user id.
        user: u64,
    },
    /// `DELETE /users/{u}/debug/rememberMe`: a "remember me" cookie cannot log the user in.
    ClearRememberMe {
        /// TeamCity user id.
        user: u64,
    },
    /// `PUT /users/{u}/properties/teamcity-scim.id`: takes over an existing TeamCity user
    /// with the username of a SCIM user (`sync.adopt_existing = "by_username"`).
    AdoptUser {
        /// TeamCity user id.
        user: u64,
        /// The SCIM id (the marker value).
        scim_id: String,
    },
    /// `PUT /users/id:N/properties/teamcity-scim.deactivated` = `true`.
    SetDeactivated {
        /// TeamCity user id.
        user: u64,
    },
    /// `DELETE /users/id:N/properties/teamcity-scim.deactivated`.
    ClearDeactivated {
        /// TeamCity user id.
        user: u64,
    },
    /// `POST /userGroups` with key, name, marker, roles and members in ONE call.
    CreateGroup {
        /// Key.
        key: String,
        /// Name.
        name: String,
        /// Marker value (SCIM group id, or [`DEFAULTS_MARKER`]).
        marker: String,
        /// Roles.
        roles: Vec<RoleAt>,
        /// Members.
        members: Vec<UserRef>,
        /// The group this one replaces (a rename swap): its members at apply time that the
        /// bridge does not manage — added by hand — are carried over too.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        replaces: Option<String>,
    },
    /// `DELETE /userGroups/key:K`.
    DeleteGroup {
        /// Key.
        key: String,
    },
    /// `POST /userGroups/key:K/roles/{role}/{scope}`.
    AddGroupRole {
        /// Key.
        group: String,
        /// The role.
        role: RoleAt,
    },
    /// `DELETE /userGroups/key:K/roles/{role}/{scope}`.
    RemoveGroupRole {
        /// Key.
        group: String,
        /// The role.
        role: RoleAt,
    },
}

/// The user a step addresses: an existing TeamCity user, or one the plan creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum UserTarget<'a> {
    /// An existing TeamCity user id.
    Id(u64),
    /// The user a `CreateUser` with this SCIM id creates.
    New(&'a str),
}

impl Action {
    /// The user this step writes to, if any.
    pub fn user_target(&self) -> Option<UserTarget<'_>> {
        fn r(u: &UserRef) -> UserTarget<'_> {
            match u {
                UserRef::Id(i) => UserTarget::Id(*i),
                UserRef::New(s) => UserTarget::New(s),
            }
        }
        match self {
            Action::CreateUser { scim_id, .. } => Some(UserTarget::New(scim_id)),
            Action::AddToGroup { user, .. } | Action::AddUserRole { user, .. } => Some(r(user)),
            Action::UpdateUser { user, .. }
            | Action::DeleteUser { user }
            | Action::RemoveFromGroup { user, .. }
            | Action::RemoveUserRole { user, .. }
            | Action::RevokeTokens { user }
            | Action::ResetPassword { user }
            | Action::EndSessions { user }
            | Action::ClearRememberMe { user }
            | Action::AdoptUser { user, .. }
            | Action::SetDeactivated { user }
            | Action::ClearDeactivated { user } => Some(UserTarget::Id(*user)),
            Action::CreateGroup { .. }
            | Action::DeleteGroup { .. }
            | Action::AddGroupRole { .. }
            | Action::RemoveGroupRole { .. } => None,
        }
    }

    /// The group (key) this step writes to or changes the membership of, if any.
    pub fn group_target(&self) -> Option<&str> {
        match self {
            Action::AddToGroup { group, .. }
            | Action::RemoveFromGroup { group, .. }
            | Action::AddGroupRole { group, .. }
            | Action::RemoveGroupRole { group, .. }
            | Action::CreateGroup { key: group, .. }
            | Action::DeleteGroup { key: group } => Some(group),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_stay_sorted_without_duplicates() {
        let mut keys: GroupKeys = ["K_B", "K_A", "K_B"].into();
        assert_eq!(keys.iter().collect::<Vec<_>>(), ["K_A", "K_B"]);
        assert!(keys.insert("K_C"));
        assert!(!keys.insert("K_A"), "there already");
        assert!(keys.contains("K_C") && !keys.contains("K_D"));
        assert!(keys.remove("K_A"));
        assert!(!keys.remove("K_A"), "gone already");
        keys.extend(["K_0", "K_C"]);
        assert_eq!(
            (&keys).into_iter().collect::<Vec<_>>(),
            ["K_0", "K_B", "K_C"]
        );
        assert_eq!(keys.len(), 3);
        assert_eq!(
            keys,
            ["K_C", "K_0", "K_B"].into(),
            "equal whatever the order given"
        );
        assert!(GroupKeys::default().is_empty());
    }

    #[test]
    fn roles_parse_and_render() {
        let cases: [(&str, Option<RoleAt>); 8] = [
            ("PROJECT_VIEWER@g", Some(RoleAt::global("PROJECT_VIEWER"))),
            (
                "PROJECT_DEVELOPER@p:Backend",
                Some(RoleAt::project("PROJECT_DEVELOPER", "Backend")),
            ),
            (
                "PROJECT_VIEWER@p:_Root",
                Some(RoleAt::project("PROJECT_VIEWER", "_Root")),
            ),
            ("PROJECT_VIEWER", None),
            ("PROJECT_VIEWER@", None),
            ("PROJECT_VIEWER@p:", None),
            ("PROJECT VIEWER@g", None),
            ("PROJECT_VIEWER@P:Backend", None),
        ];
        for (text, want) in cases {
            let got = text.parse::<RoleAt>().ok();
            assert_eq!(got, want, "{text}");
            if let Some(r) = got {
                assert_eq!(r.to_string(), text);
            }
        }
        let r = RoleAt::project("PROJECT_VIEWER", "Backend");
        assert_eq!(r.tc_scope(), teamcity::Scope::Project("Backend".into()));
        let a = teamcity::RoleAssignment::new("PROJECT_VIEWER", &teamcity::Scope::Global);
        assert_eq!(
            RoleAt::from_assignment(&a),
            Some(RoleAt::global("PROJECT_VIEWER"))
        );
    }

    #[test]
    fn tc_name_prefers_display_name() {
        let mut u = DirUser {
            given_name: Some("Ada".into()),
            family_name: Some("Lovelace".into()),
            ..DirUser::default()
        };
        assert_eq!(tc_name(&u).as_deref(), Some("Ada Lovelace"));
        u.display_name = Some("Countess".into());
        assert_eq!(tc_name(&u).as_deref(), Some("Countess"));
        assert_eq!(tc_name(&DirUser::default()), None);
    }
}
