//! The emulator's in-memory TeamCity: users, groups, projects, roles, tokens,
//! the finders that resolve locators against them, and JSON rendering.
//!
//! Lookups follow `UserFinder`, `UserGroupFinder` and `ProjectFinder` from the
//! REST plugin; rendering follows the models' default field sets. This module
//! holds no HTTP concerns (status codes come from [`TcError`] constructors)
//! and must never render a password or a token value except where TeamCity does.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json, json};

use crate::errors::TcError;
use crate::fields::Fields;
use crate::locator::{Parsed, Value};

/// Key of the built-in group every user belongs to.
pub const ALL_USERS_GROUP: &str = "ALL_USERS_GROUP";

/// A user as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRec {
    /// Numeric id.
    pub id: u64,
    /// Username, lower-cased.
    pub username: String,
    /// Display name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Whether a password is set (the password itself is never kept in a dump).
    #[serde(default)]
    pub has_password: bool,
    /// How many times a password was set (create or `PUT …/password`), so tests
    /// can see a reset without the emulator ever keeping the password itself.
    #[serde(default)]
    pub password_changes: u64,
    /// Properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Direct role assignments as `(roleId, scope)`.
    #[serde(default)]
    pub roles: BTreeSet<(String, String)>,
    /// Keys of direct groups (never contains `ALL_USERS_GROUP`, which is implicit).
    #[serde(default)]
    pub groups: BTreeSet<String>,
    /// Access tokens (values are never kept; see [`TokenRec::value_sha256`]).
    #[serde(default)]
    pub tokens: Vec<TokenRec>,
    /// How many times `POST /users/{u}/logout` ended the user's sessions.
    #[serde(default)]
    pub logouts: u32,
    /// How many times `DELETE /users/{u}/debug/rememberMe` dropped the user's
    /// "remember me" logins.
    #[serde(default)]
    pub remember_me_cleared: u32,
}

/// An access token as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRec {
    /// Name, unique per user.
    pub name: String,
    /// Creation time in TeamCity's format.
    pub creation_time: String,
    /// Expiry, if any.
    pub expiration_time: Option<String>,
    /// Lower-case hex SHA-256 of the token value, set for tokens issued over REST: a request
    /// with `Authorization: Bearer <value>` authenticates as the token's user while the
    /// token exists (and has not expired). The value itself is never kept. `None` (a token
    /// inserted directly into the state) never authenticates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_sha256: Option<String>,
}

/// A user group as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRec {
    /// Key (case-sensitive).
    pub key: String,
    /// Name (unique).
    pub name: String,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// Properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Role assignments as `(roleId, scope)`.
    #[serde(default)]
    pub roles: BTreeSet<(String, String)>,
}

/// A project.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectRec {
    /// External id.
    pub id: String,
    /// Internal id (`project<N>`).
    pub internal_id: String,
    /// Name.
    pub name: String,
    /// Parent external id (`None` for `_Root`).
    pub parent: Option<String>,
}

/// A role definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleRec {
    /// Id, e.g. `PROJECT_ADMIN`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Directly included role ids.
    pub included: Vec<String>,
}

/// The whole emulated server state; also the shape of the state dump
/// (`GET /__emulator/state`), which `PUT /__emulator/state` and [`crate::Emulator::restore`]
/// take back unchanged. Equality compares everything but the username index.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct State {
    /// Users by id.
    pub users: BTreeMap<u64, UserRec>,
    /// Groups by key.
    pub groups: BTreeMap<String, GroupRec>,
    /// Projects, `_Root` first.
    pub projects: Vec<ProjectRec>,
    /// Role definitions.
    pub roles: Vec<RoleRec>,
    /// Next user id.
    pub next_user_id: u64,
    /// Id of the user the bearer token belongs to.
    pub admin_id: u64,
    /// Lower-cased username → user id, kept by [`State::insert_user`],
    /// [`State::set_username`] and [`State::remove_user`] (TeamCity looks usernames up in
    /// an index too; a scan per create made bulk loads quadratic). Rebuilt on demand when
    /// `users` was changed behind its back (a state loaded from a dump, a test inserting
    /// directly): see [`State::user_by_username`].
    #[serde(skip)]
    by_username: HashMap<String, u64>,
    /// Indexes derived from `users` and `groups` (members of each group, the owner of each
    /// token digest, the key of each group name), so that every operation costs O(log n)
    /// in the size of the directory and of a group: TeamCity looks these up in indexes too,
    /// and a benchmark at 100,000 users must measure the bridge, not the emulator. Kept by
    /// the mutators below; built by [`State::reindex`] (which [`crate::Emulator::with_state`]
    /// and [`crate::Emulator::restore`] call after changes made behind their back). A state
    /// just deserialized has none and answers from scans until reindexed.
    #[serde(skip)]
    derived: Derived,
}

/// See [`State::derived`](State).
#[derive(Debug, Clone, Default)]
struct Derived {
    /// Whether the maps below agree with `users` and `groups`.
    ready: bool,
    /// Group key → ids of its direct members (`ALL_USERS_GROUP` is implicit, never here).
    members: HashMap<String, BTreeSet<u64>>,
    /// Token value digest → id of the user holding the token.
    tokens: HashMap<String, u64>,
    /// Group name → key.
    group_names: HashMap<String, String>,
}

impl PartialEq for State {
    fn eq(&self, other: &State) -> bool {
        // The username index is derived from `users`; two states with the same users are equal.
        self.users == other.users
            && self.groups == other.groups
            && self.projects == other.projects
            && self.roles == other.roles
            && self.next_user_id == other.next_user_id
            && self.admin_id == other.admin_id
    }
}

impl Eq for State {}

/// The user dimensions the emulator's user finder consumes.
const USER_DIMS: &[&str] = &[
    "id",
    "username",
    "group",
    "affectedGroup",
    "email",
    "name",
    "property",
    "role",
    "count",
    "start",
    "lookupLimit",
];

fn role(id: &str, name: &str, included: &[&str]) -> RoleRec {
    RoleRec {
        id: id.into(),
        name: name.into(),
        included: included.iter().map(|s| s.to_string()).collect(),
    }
}

impl State {
    /// A fresh server: `_Root` plus `projects`, the five built-in roles, the
    /// All Users group and an `admin` user (id 1, `SYSTEM_ADMIN` globally).
    pub fn new(projects: &[String]) -> State {
        let mut state = State {
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            projects: vec![ProjectRec {
                id: "_Root".into(),
                internal_id: "_Root".into(),
                name: "<Root project>".into(),
                parent: None,
            }],
            roles: vec![
                role("SYSTEM_ADMIN", "System administrator", &[]),
                role(
                    "PROJECT_ADMIN",
                    "Project administrator",
                    &["PROJECT_DEVELOPER"],
                ),
                role(
                    "PROJECT_DEVELOPER",
                    "Project developer",
                    &["PROJECT_VIEWER"],
                ),
                role("PROJECT_VIEWER", "Project viewer", &[]),
                role("AGENT_MANAGER", "Agent manager", &[]),
            ],
            next_user_id: 1,
            admin_id: 1,
            by_username: HashMap::new(),
            derived: Derived::default(),
        };
        state.reindex();
        for p in projects {
            state.add_project(p, "_Root");
        }
        state.insert_group(GroupRec {
            key: ALL_USERS_GROUP.into(),
            name: "All Users".into(),
            description: Some("Contains all TeamCity users".into()),
            properties: BTreeMap::new(),
            roles: BTreeSet::new(),
        });
        let admin = state.insert_user("admin", Some("Administrator"), None);
        state.admin_id = admin;
        if let Some(u) = state.users.get_mut(&admin) {
            u.roles.insert(("SYSTEM_ADMIN".into(), "g".into()));
        }
        state
    }

    /// Adds a project under `parent` unless one with that id exists.
    pub fn add_project(&mut self, id: &str, parent: &str) {
        if id == "_Root" || self.projects.iter().any(|p| p.id == id) {
            return;
        }
        let n = self.projects.len();
        self.projects.push(ProjectRec {
            id: id.into(),
            internal_id: format!("project{n}"),
            name: id.into(),
            parent: Some(parent.into()),
        });
    }

    /// Inserts a user directly (no validation beyond lower-casing); returns its id.
    pub fn insert_user(&mut self, username: &str, name: Option<&str>, email: Option<&str>) -> u64 {
        let id = self.next_user_id;
        self.next_user_id += 1;
        let username = username.to_lowercase();
        self.by_username.insert(username.clone(), id);
        self.users.insert(
            id,
            UserRec {
                id,
                username,
                name: name.map(str::to_owned),
                email: email.map(str::to_owned),
                has_password: true,
                password_changes: 1,
                properties: BTreeMap::new(),
                roles: BTreeSet::new(),
                groups: BTreeSet::new(),
                tokens: Vec::new(),
                logouts: 0,
                remember_me_cleared: 0,
            },
        );
        id
    }

    /// Renames user `id` (stored lower-cased); no uniqueness check.
    pub fn set_username(&mut self, id: u64, username: &str) {
        if let Some(user) = self.users.get_mut(&id) {
            let lower = username.to_lowercase();
            self.by_username.remove(&user.username);
            self.by_username.insert(lower.clone(), id);
            user.username = lower;
        }
    }

    /// Removes user `id`.
    pub fn remove_user(&mut self, id: u64) -> Option<UserRec> {
        let user = self.users.remove(&id)?;
        self.by_username.remove(&user.username);
        if self.derived.ready {
            for key in &user.groups {
                if let Some(m) = self.derived.members.get_mut(key) {
                    m.remove(&id);
                }
            }
            for t in &user.tokens {
                if let Some(d) = &t.value_sha256 {
                    self.derived.tokens.remove(d);
                }
            }
        }
        Some(user)
    }

    /// The user with this username (case-insensitive), from the username index. The index is
    /// trusted only while it agrees with `users` (same size, and a hit names a user with that
    /// username); otherwise the answer comes from a scan.
    pub fn user_by_username(&self, username: &str) -> Option<&UserRec> {
        let lower = username.to_lowercase();
        if self.by_username.len() == self.users.len() {
            match self
                .by_username
                .get(&lower)
                .and_then(|id| self.users.get(id))
            {
                Some(u) if u.username == lower => return Some(u),
                None if !self.by_username.contains_key(&lower) => return None,
                _ => {}
            }
        }
        self.users.values().find(|u| u.username == lower)
    }

    /// Checks what a restored state must hold for the emulator to keep working: map keys
    /// equal to the ids and keys inside, ids below `next_user_id`, unique lower-cased
    /// usernames, the admin present, `_Root` and `ALL_USERS_GROUP` present.
    pub fn validate(&self) -> Result<(), String> {
        let mut names = BTreeSet::new();
        for (id, u) in &self.users {
            if *id != u.id {
                return Err(format!("user under key {id} has id {}", u.id));
            }
            if u.id >= self.next_user_id {
                return Err(format!(
                    "user id {} is not below next_user_id {}",
                    u.id, self.next_user_id
                ));
            }
            if u.username != u.username.to_lowercase() {
                return Err(format!("username '{}' is not lower-cased", u.username));
            }
            if !names.insert(u.username.as_str()) {
                return Err(format!("username '{}' is used twice", u.username));
            }
        }
        for (key, g) in &self.groups {
            if *key != g.key {
                return Err(format!("group under key '{key}' has key '{}'", g.key));
            }
        }
        if !self.users.contains_key(&self.admin_id) {
            return Err(format!("admin_id {} is not a user", self.admin_id));
        }
        if !self.groups.contains_key(ALL_USERS_GROUP) {
            return Err(format!("{ALL_USERS_GROUP} is missing"));
        }
        if self.projects.first().is_none_or(|p| p.id != "_Root") {
            return Err("the first project must be _Root".into());
        }
        Ok(())
    }

    /// The user and token name a token value authenticates: the token must exist with
    /// this value's digest and must not have expired.
    pub(crate) fn token_owner(&self, value_sha256: &str, now: time::OffsetDateTime) -> Option<u64> {
        let valid = |u: &UserRec| {
            u.tokens
                .iter()
                .find(|t| t.value_sha256.as_deref() == Some(value_sha256))
                .is_some_and(|t| {
                    t.expiration_time
                        .as_deref()
                        .is_none_or(|exp| parse_teamcity_time(exp).is_none_or(|exp| exp > now))
                })
        };
        if self.derived.ready {
            let id = self.derived.tokens.get(value_sha256)?;
            return self.users.get(id).filter(|u| valid(u)).map(|u| u.id);
        }
        self.users.values().find(|u| valid(u)).map(|u| u.id)
    }

    /// Adds a token to user `id` (the caller checked its name is free).
    pub(crate) fn push_token(&mut self, id: u64, rec: TokenRec) {
        if let Some(d) = rec.value_sha256.clone().filter(|_| self.derived.ready) {
            self.derived.tokens.insert(d, id);
        }
        if let Some(u) = self.users.get_mut(&id) {
            u.tokens.push(rec);
        }
    }

    /// Removes user `id`'s token `name`; false when it has none by that name.
    pub(crate) fn remove_token(&mut self, id: u64, name: &str) -> bool {
        let Some(u) = self.users.get_mut(&id) else {
            return false;
        };
        let Some(at) = u.tokens.iter().position(|t| t.name == name) else {
            return false;
        };
        let t = u.tokens.remove(at);
        if let Some(d) = t.value_sha256.filter(|_| self.derived.ready) {
            self.derived.tokens.remove(&d);
        }
        true
    }

    /// Adds user `id` to group `key` (`ALL_USERS_GROUP` is implicit: nothing to do); false
    /// when it was a member already or does not exist.
    pub(crate) fn add_member(&mut self, id: u64, key: &str) -> bool {
        if key == ALL_USERS_GROUP {
            return false;
        }
        let Some(u) = self.users.get_mut(&id) else {
            return false;
        };
        let added = u.groups.insert(key.to_owned());
        if added && self.derived.ready {
            self.derived
                .members
                .entry(key.to_owned())
                .or_default()
                .insert(id);
        }
        added
    }

    /// Removes user `id` from group `key`; false when it was not a (direct) member.
    pub(crate) fn remove_member(&mut self, id: u64, key: &str) -> bool {
        let removed = self
            .users
            .get_mut(&id)
            .is_some_and(|u| u.groups.remove(key));
        if removed
            && self.derived.ready
            && let Some(m) = self.derived.members.get_mut(key)
        {
            m.remove(&id);
        }
        removed
    }

    /// Makes `keys` (without `ALL_USERS_GROUP`) user `id`'s direct groups.
    pub(crate) fn set_user_groups(&mut self, id: u64, keys: impl IntoIterator<Item = String>) {
        let old = self
            .users
            .get(&id)
            .map(|u| u.groups.clone())
            .unwrap_or_default();
        for key in &old {
            self.remove_member(id, key);
        }
        for key in keys {
            self.add_member(id, &key);
        }
    }

    /// Adds a group (the caller checked its key and name are free).
    pub(crate) fn insert_group(&mut self, g: GroupRec) {
        if self.derived.ready {
            self.derived
                .group_names
                .insert(g.name.clone(), g.key.clone());
        }
        self.groups.insert(g.key.clone(), g);
    }

    /// Removes group `key` and every membership in it.
    pub(crate) fn remove_group(&mut self, key: &str) {
        let Some(g) = self.groups.remove(key) else {
            return;
        };
        if self.derived.ready {
            self.derived.group_names.remove(&g.name);
            for id in self.derived.members.remove(key).unwrap_or_default() {
                if let Some(u) = self.users.get_mut(&id) {
                    u.groups.remove(key);
                }
            }
        } else {
            for u in self.users.values_mut() {
                u.groups.remove(key);
            }
        }
    }

    /// The key of the group named `name`.
    pub(crate) fn group_key_by_name(&self, name: &str) -> Option<&str> {
        if self.derived.ready {
            return self.derived.group_names.get(name).map(String::as_str);
        }
        self.groups
            .values()
            .find(|g| g.name == name)
            .map(|g| g.key.as_str())
    }

    /// Whether the user holds `SYSTEM_ADMIN` globally, directly or through a group.
    pub(crate) fn is_system_admin(&self, user: u64) -> bool {
        self.users.get(&user).is_some_and(|u| {
            let global = |roles: &BTreeSet<(String, String)>| {
                roles.iter().any(|(r, sc)| r == "SYSTEM_ADMIN" && sc == "g")
            };
            global(&u.roles) || self.groups_of(u).any(|g| global(&g.roles))
        })
    }

    /// Rebuilds the username index from `users` (after `users` was changed directly).
    pub fn reindex(&mut self) {
        self.by_username = self
            .users
            .values()
            .map(|u| (u.username.clone(), u.id))
            .collect();
        let mut d = Derived {
            ready: true,
            ..Derived::default()
        };
        for u in self.users.values() {
            for key in &u.groups {
                d.members.entry(key.clone()).or_default().insert(u.id);
            }
            for t in &u.tokens {
                if let Some(v) = &t.value_sha256 {
                    d.tokens.insert(v.clone(), u.id);
                }
            }
        }
        d.group_names = self
            .groups
            .values()
            .map(|g| (g.name.clone(), g.key.clone()))
            .collect();
        self.derived = d;
    }

    /// The groups user `u` is in: `ALL_USERS_GROUP` and its direct groups.
    fn groups_of<'a>(&'a self, u: &'a UserRec) -> impl Iterator<Item = &'a GroupRec> + 'a {
        std::iter::once(ALL_USERS_GROUP)
            .chain(u.groups.iter().map(String::as_str))
            .filter_map(|k| self.groups.get(k))
    }

    // ---- finders --------------------------------------------------------

    /// `UserFinder` for `GET /users?locator=` (no masking).
    pub(crate) fn find_users(&self, text: Option<&str>) -> Result<Vec<u64>, TcError> {
        let Some(text) = text else {
            return Ok(self.users.keys().copied().collect());
        };
        let mut loc = Parsed::parse(text, &[])?;
        if let Some(single) = loc.single.clone() {
            if single == "current" {
                return Ok(vec![crate::caller().unwrap_or(self.admin_id)]);
            }
            return match self.user_by_username(&single) {
                Some(u) => Ok(vec![u.id]),
                None => Err(TcError::not_found(format!(
                    "No user can be found by username '{single}'."
                ))),
            };
        }
        // Prefilter by the first of id, username; the other still filters.
        let id = loc.number("id")?;
        let username = loc.text("username")?;
        let mut ids: Vec<u64> = if let Some(id) = id {
            if !self.users.contains_key(&id) {
                return Err(TcError::not_found("User not found"));
            }
            vec![id]
        } else if let Some(name) = &username {
            match self.user_by_username(name) {
                Some(u) => vec![u.id],
                None => return Err(TcError::not_found("User not found")),
            }
        } else if let Some(g) = loc.text("group")?.or(loc.text("affectedGroup")?) {
            // Without roles-by-group inheritance, both dimensions name direct members here.
            self.members(&self.find_group(&g)?)
        } else {
            self.users.keys().copied().collect()
        };
        if let Some(name) = &username {
            let lower = name.to_lowercase();
            ids.retain(|id| self.users[id].username == lower);
        }
        for dim in ["group", "affectedGroup"] {
            if let Some(g) = loc.text(dim)? {
                let key = self.find_group(&g)?;
                ids.retain(|id| self.is_member(*id, &key));
            }
        }
        if let Some(v) = loc.one("email")? {
            let cond = ValueCondition::parse(&v)?;
            ids.retain(|id| cond.matches(self.users[id].email.as_deref()));
        }
        if let Some(v) = loc.one("name")? {
            let cond = ValueCondition::parse(&v)?;
            ids.retain(|id| cond.matches(self.users[id].name.as_deref()));
        }
        for v in loc.all("property") {
            let cond = PropertyCondition::parse(v.text())?;
            ids.retain(|id| cond.matches(&self.users[id].properties));
        }
        if let Some(v) = loc.one("role")? {
            let reqs = self.parse_role_filter(v.text())?;
            ids.retain(|id| reqs.iter().all(|r| self.has_role_effectively(*id, r)));
        }
        let _ = loc.number("lookupLimit")?;
        let start = loc.number("start")?.unwrap_or(0) as usize;
        let count = loc.number("count")?;
        loc.check_used(USER_DIMS)?;
        let mut ids: Vec<u64> = ids.into_iter().skip(start).collect();
        if let Some(c) = count {
            ids.truncate(c as usize);
        }
        Ok(ids)
    }

    /// `UserFinder.getItem` with the view-permission check in `finally`: every
    /// failure becomes 404 `User not found`.
    pub(crate) fn find_user_item(&self, text: &str) -> Result<u64, TcError> {
        self.find_users(Some(text))
            .ok()
            .and_then(|ids| ids.first().copied())
            .ok_or_else(|| TcError::not_found("User not found"))
    }

    /// `UserGroupFinder`: a group key from a group locator.
    pub(crate) fn find_group(&self, text: &str) -> Result<String, TcError> {
        if text.is_empty() {
            return Err(TcError::bad_request(
                "Empty group locator is not supported.",
            ));
        }
        let mut loc = Parsed::parse(text, &[])?;
        if loc.single.is_some() {
            // The raw text is the key: `(KEY)` is not unwrapped here.
            return self
                .groups
                .contains_key(text)
                .then(|| text.to_owned())
                .ok_or_else(|| {
                    TcError::not_found(format!("No group can be found by key '{text}'."))
                });
        }
        if let Some(key) = loc.text("key")? {
            return self
                .groups
                .contains_key(&key)
                .then_some(key.clone())
                .ok_or_else(|| {
                    TcError::not_found(format!("No group can be found by key '{key}'."))
                });
        }
        if let Some(name) = loc.text("name")? {
            return self
                .group_key_by_name(&name)
                .map(str::to_owned)
                .ok_or_else(|| {
                    TcError::not_found(format!("No group can be found by name '{name}'."))
                });
        }
        Err(TcError::not_found(format!(
            "Group locator '{text}' is not supported."
        )))
    }

    /// A project by a single-value project locator: external id, then name, then internal id.
    pub(crate) fn find_project_single(&self, text: &str) -> Option<&ProjectRec> {
        self.projects
            .iter()
            .find(|p| p.id == text)
            .or_else(|| self.projects.iter().find(|p| p.name == text))
            .or_else(|| self.projects.iter().find(|p| p.internal_id == text))
    }

    /// `ProjectFinder.getItem`.
    pub(crate) fn find_project(&self, text: &str) -> Result<&ProjectRec, TcError> {
        let mut loc = Parsed::parse(text, &[])?;
        if let Some(single) = &loc.single {
            return self.find_project_single(single).ok_or_else(|| {
                TcError::not_found(format!(
                    "No project found by name or internal/external id '{single}'."
                ))
            });
        }
        if let Some(id) = loc.text("id")? {
            loc.check_used(&["id", "internalId", "name"])?;
            return self.projects.iter().find(|p| p.id == id).ok_or_else(|| {
                TcError::not_found(format!(
                    "No project found by locator '{text}'. Project cannot be found by external id '{id}'."
                ))
            });
        }
        if let Some(id) = loc.text("internalId")? {
            loc.check_used(&["id", "internalId", "name"])?;
            return self
                .projects
                .iter()
                .find(|p| p.internal_id == id)
                .ok_or_else(|| {
                    TcError::not_found(format!("No project found by locator '{text}'."))
                });
        }
        if let Some(name) = loc.text("name")? {
            loc.check_used(&["id", "internalId", "name"])?;
            return self
                .projects
                .iter()
                .find(|p| p.name == name)
                .ok_or_else(|| {
                    TcError::not_found(format!("No project found by locator '{text}'."))
                });
        }
        loc.check_used(&["id", "internalId", "name"])?;
        Err(TcError::locator(format!(
            "Unsupported project locator '{text}'."
        )))
    }

    /// `RoleAssignment.getScope`: `g` (any case) or `p:<project>`; canonical text back.
    pub(crate) fn parse_scope(&self, text: &str) -> Result<String, TcError> {
        if text.eq_ignore_ascii_case("g") {
            return Ok("g".into());
        }
        if let Some(p) = text.strip_prefix("p:") {
            return self
                .find_project_single(p)
                .map(|proj| format!("p:{}", proj.id))
                .ok_or_else(|| {
                    TcError::not_found(format!(
                        "No project found by name or internal/external id '{p}'."
                    ))
                });
        }
        Err(TcError::not_found(format!(
            "Cannot find scope by '{text}' Valid formats are: 'g' or 'p:<projectId>'."
        )))
    }

    /// `RolesManager.findRoleById`, case-sensitive (unconfirmed; kept strict).
    pub(crate) fn check_role(&self, id: &str) -> Result<(), TcError> {
        if id.is_empty() {
            return Err(TcError::bad_request("Cannot file role by empty id."));
        }
        if self.roles.iter().any(|r| r.id == id) {
            Ok(())
        } else {
            Err(TcError::not_found(format!(
                "Cannot find role by id '{id}'."
            )))
        }
    }

    /// Whether the user is a direct member of the group (everyone is in All Users).
    pub(crate) fn is_member(&self, user: u64, key: &str) -> bool {
        key == ALL_USERS_GROUP
            || self
                .users
                .get(&user)
                .is_some_and(|u| u.groups.contains(key))
    }

    /// Member ids of a group.
    pub(crate) fn members(&self, key: &str) -> Vec<u64> {
        if key == ALL_USERS_GROUP {
            return self.users.keys().copied().collect();
        }
        if self.derived.ready {
            return self
                .derived
                .members
                .get(key)
                .map(|m| m.iter().copied().collect())
                .unwrap_or_default();
        }
        self.users
            .values()
            .filter(|u| self.is_member(u.id, key))
            .map(|u| u.id)
            .collect()
    }

    fn parse_role_filter(&self, text: &str) -> Result<Vec<RoleReq>, TcError> {
        let mut outer = Parsed::parse(text, &[])?;
        let items: Vec<String> = if outer.single.is_some() {
            vec![text.to_owned()]
        } else {
            let items: Vec<String> = outer
                .all("item")
                .iter()
                .map(|v| v.text().to_owned())
                .collect();
            if let Some(method) = outer.text("method")?
                && method != "effective"
            {
                return Err(TcError::bad_request(format!(
                    "Unknown 'method' role dimension value '{method}'. Supported are: effective (emulator)"
                )));
            }
            if items.is_empty() {
                vec![text.to_owned()]
            } else {
                items
            }
        };
        let mut reqs = Vec::new();
        for item in items {
            let mut loc = Parsed::parse(&item, &[])?;
            let scope = loc.text("scope")?;
            let role = loc.text("role")?;
            let _ = loc.text("method")?;
            let _ = loc.all("item");
            if scope.is_none() && role.is_none() {
                return Err(TcError::locator(format!(
                    "Invalid role locator '{text}: either 'scope' or 'role' dimension should be present"
                )));
            }
            loc.check_used(&["scope", "role"])?;
            let scope = match scope {
                None => None,
                Some(s) => Some(self.parse_filter_scope(&s)?),
            };
            let role = match role {
                None => None,
                Some(r) => {
                    let mut rl = Parsed::parse(&r, &[])?;
                    let id = match rl.single.clone() {
                        Some(s) => s,
                        None => {
                            let id = rl.text("id")?.unwrap_or_default();
                            rl.check_used(&["id"])?;
                            id
                        }
                    };
                    self.check_role(&id)?;
                    Some(id)
                }
            };
            reqs.push(RoleReq { role, scope });
        }
        Ok(reqs)
    }

    fn parse_filter_scope(&self, text: &str) -> Result<String, TcError> {
        if text == "global" || text == "g" {
            return Ok("g".into());
        }
        let mut loc = Parsed::parse(text, &[])?;
        let project = match (loc.text("project")?, loc.text("p")?) {
            (Some(p), _) | (None, Some(p)) => p,
            _ => return Err(TcError::locator(format!("Invalid scope locator '{text}'"))),
        };
        loc.check_used(&["project", "p"])?;
        Ok(format!("p:{}", self.find_project(&project)?.id))
    }

    fn is_within(&self, project: &str, ancestor: &str) -> bool {
        let mut current = Some(project.to_owned());
        while let Some(p) = current {
            if p == ancestor {
                return true;
            }
            current = self
                .projects
                .iter()
                .find(|x| x.id == p)
                .and_then(|x| x.parent.clone());
        }
        false
    }

    fn has_role_effectively(&self, user: u64, req: &RoleReq) -> bool {
        let Some(u) = self.users.get(&user) else {
            return false;
        };
        let mut holders: Vec<&BTreeSet<(String, String)>> = vec![&u.roles];
        holders.extend(self.groups_of(u).map(|g| &g.roles));
        holders.iter().flat_map(|h| h.iter()).any(|(role, scope)| {
            let role_ok = match &req.role {
                None => true,
                Some(want) => {
                    role == want
                        || self
                            .roles
                            .iter()
                            .any(|r| &r.id == role && r.included.contains(want))
                }
            };
            let scope_ok = match &req.scope {
                None => true,
                Some(want) => {
                    scope == "g"
                        || scope == want
                        || match (scope.strip_prefix("p:"), want.strip_prefix("p:")) {
                            (Some(have), Some(want)) => self.is_within(want, have),
                            _ => false,
                        }
                }
            };
            role_ok && scope_ok
        })
    }

    // ---- rendering ------------------------------------------------------

    /// A user in TeamCity's JSON shape.
    pub(crate) fn render_user(&self, u: &UserRec, f: &Fields) -> Json {
        let mut m = Map::new();
        if f.has("username", true, true) {
            m.insert("username".into(), json!(u.username));
        }
        if let Some(name) = &u.name
            && f.has("name", true, true)
        {
            m.insert("name".into(), json!(name));
        }
        if f.has("id", true, true) {
            m.insert("id".into(), json!(u.id));
        }
        if let Some(email) = &u.email
            && f.has("email", false, true)
        {
            m.insert("email".into(), json!(email));
        }
        let href = format!("/app/rest/users/id:{}", u.id);
        if f.has("href", true, true) {
            m.insert("href".into(), json!(href));
        }
        if f.has("properties", false, true) {
            m.insert(
                "properties".into(),
                render_properties(
                    &u.properties,
                    &format!("{href}/properties"),
                    &f.nested("properties"),
                ),
            );
        }
        if f.has("roles", false, true) {
            m.insert(
                "roles".into(),
                render_roles(&u.roles, &href, &f.nested("roles")),
            );
        }
        if f.has("groups", false, true) {
            let mut keys = vec![ALL_USERS_GROUP.to_owned()];
            keys.extend(u.groups.iter().cloned());
            m.insert(
                "groups".into(),
                self.render_groups(&keys, &f.nested("groups")),
            );
        }
        if f.has("hasPassword", false, false) {
            m.insert("hasPassword".into(), json!(u.has_password));
        }
        Json::Object(m)
    }

    /// A `users` collection.
    pub(crate) fn render_users(&self, ids: &[u64], f: &Fields) -> Json {
        let mut m = Map::new();
        if f.has("count", true, true) {
            m.insert("count".into(), json!(ids.len()));
        }
        if f.has("user", true, true) {
            let nested = f.items("user");
            let users: Vec<Json> = ids
                .iter()
                .filter_map(|id| self.users.get(id))
                .map(|u| self.render_user(u, &nested))
                .collect();
            m.insert("user".into(), Json::Array(users));
        }
        Json::Object(m)
    }

    /// A group in TeamCity's JSON shape.
    pub(crate) fn render_group(&self, g: &GroupRec, f: &Fields) -> Json {
        let mut m = Map::new();
        if f.has("key", true, true) {
            m.insert("key".into(), json!(g.key));
        }
        if f.has("name", true, true) {
            m.insert("name".into(), json!(g.name));
        }
        let href = format!("/app/rest/userGroups/key:{}", g.key);
        if f.has("href", true, true) {
            m.insert("href".into(), json!(href));
        }
        if let Some(d) = g.description.as_ref().filter(|d| !d.is_empty())
            && f.has("description", true, true)
        {
            m.insert("description".into(), json!(d));
        }
        if f.has("parent-groups", false, true) {
            m.insert(
                "parent-groups".into(),
                self.render_groups(&[], &f.nested("parent-groups")),
            );
        }
        if f.has("child-groups", false, true) {
            m.insert(
                "child-groups".into(),
                self.render_groups(&[], &f.nested("child-groups")),
            );
        }
        if f.has("users", false, true) {
            m.insert(
                "users".into(),
                self.render_users(&self.members(&g.key), &f.nested("users")),
            );
        }
        if f.has("roles", false, true) {
            m.insert(
                "roles".into(),
                render_roles(&g.roles, &href, &f.nested("roles")),
            );
        }
        if f.has("properties", false, true) {
            m.insert(
                "properties".into(),
                render_properties(
                    &g.properties,
                    &format!("{href}/properties"),
                    &f.nested("properties"),
                ),
            );
        }
        Json::Object(m)
    }

    /// A `groups` collection.
    pub(crate) fn render_groups(&self, keys: &[String], f: &Fields) -> Json {
        let mut m = Map::new();
        if f.has("count", true, true) {
            m.insert("count".into(), json!(keys.len()));
        }
        if f.has("group", true, true) {
            let nested = f.items("group");
            let groups: Vec<Json> = keys
                .iter()
                .filter_map(|k| self.groups.get(k))
                .map(|g| self.render_group(g, &nested))
                .collect();
            m.insert("group".into(), Json::Array(groups));
        }
        Json::Object(m)
    }
}

/// Parses TeamCity's `yyyyMMdd'T'HHmmssZ` time (`20260101T000000+0000`).
pub(crate) fn parse_teamcity_time(text: &str) -> Option<time::OffsetDateTime> {
    let f = time::macros::format_description!(
        "[year][month][day]T[hour][minute][second][offset_hour sign:mandatory][offset_minute]"
    );
    time::OffsetDateTime::parse(text, &f).ok()
}

/// A `properties` collection.
pub(crate) fn render_properties(props: &BTreeMap<String, String>, href: &str, f: &Fields) -> Json {
    let mut m = Map::new();
    if f.has("count", true, true) {
        m.insert("count".into(), json!(props.len()));
    }
    if f.has("href", true, true) {
        m.insert("href".into(), json!(href));
    }
    if f.has("property", true, true) {
        let pf = f.items("property");
        let items: Vec<Json> = props
            .iter()
            .map(|(n, v)| {
                let mut p = Map::new();
                if pf.has("name", true, true) {
                    p.insert("name".into(), json!(n));
                }
                if pf.has("value", true, true) {
                    p.insert("value".into(), json!(v));
                }
                Json::Object(p)
            })
            .collect();
        m.insert("property".into(), Json::Array(items));
    }
    Json::Object(m)
}

/// One role assignment.
pub(crate) fn render_role(role: &str, scope: &str, owner_href: &str, f: &Fields) -> Json {
    let mut m = Map::new();
    if f.has("roleId", true, true) {
        m.insert("roleId".into(), json!(role));
    }
    if f.has("scope", true, true) {
        m.insert("scope".into(), json!(scope));
    }
    if f.has("href", true, true) {
        m.insert(
            "href".into(),
            json!(format!("{owner_href}/roles/{role}/{scope}")),
        );
    }
    Json::Object(m)
}

/// A `roles` collection of assignments.
pub(crate) fn render_roles(
    roles: &BTreeSet<(String, String)>,
    owner_href: &str,
    f: &Fields,
) -> Json {
    let mut m = Map::new();
    if f.has("role", true, true) {
        let rf = f.items("role");
        let items: Vec<Json> = roles
            .iter()
            .map(|(r, s)| render_role(r, s, owner_href, &rf))
            .collect();
        m.insert("role".into(), Json::Array(items));
    }
    Json::Object(m)
}

/// A required role in a `role:` user filter.
#[derive(Debug)]
struct RoleReq {
    role: Option<String>,
    scope: Option<String>,
}

/// `ValueCondition`: `value`, `matchType` (default `equals`), `ignoreCase`.
#[derive(Debug)]
struct ValueCondition {
    value: Option<String>,
    match_type: String,
    ignore_case: bool,
}

impl ValueCondition {
    fn parse(v: &Value) -> Result<ValueCondition, TcError> {
        let text = match v {
            Value::Any => {
                return Ok(ValueCondition {
                    value: None,
                    match_type: "any".into(),
                    ignore_case: false,
                });
            }
            Value::Text(t) => t,
        };
        Self::parse_text(text)
    }

    fn parse_text(text: &str) -> Result<ValueCondition, TcError> {
        let mut loc = Parsed::parse(text, &[])?;
        if let Some(single) = loc.single.clone() {
            return Ok(ValueCondition {
                value: Some(single),
                match_type: "equals".into(),
                ignore_case: false,
            });
        }
        let value = loc.text("value")?;
        let match_type = loc.text("matchType")?.unwrap_or_else(|| "equals".into());
        let ignore_case = match loc.text("ignoreCase")?.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(TcError::locator(format!("Invalid boolean value '{other}'")));
            }
        };
        loc.check_used(&["value", "matchType", "ignoreCase"])?;
        const KNOWN: &[&str] = &[
            "equals",
            "does-not-equal",
            "starts-with",
            "ends-with",
            "contains",
            "does-not-contain",
            "exists",
            "not-exists",
            "any",
        ];
        if !KNOWN.contains(&match_type.as_str()) {
            return Err(TcError::bad_request(format!(
                "Unsupported matchType '{match_type}' (emulator supports: {})",
                KNOWN.join(", ")
            )));
        }
        Ok(ValueCondition {
            value,
            match_type,
            ignore_case,
        })
    }

    fn matches(&self, actual: Option<&str>) -> bool {
        match self.match_type.as_str() {
            "any" => return true,
            "exists" => return actual.is_some(),
            "not-exists" => return actual.is_none(),
            _ => {}
        }
        let Some(actual) = actual else { return false };
        let want = self.value.clone().unwrap_or_default();
        let (a, w) = if self.ignore_case {
            (actual.to_lowercase(), want.to_lowercase())
        } else {
            (actual.to_owned(), want)
        };
        match self.match_type.as_str() {
            "equals" => a == w,
            "does-not-equal" => a != w,
            "starts-with" => a.starts_with(&w),
            "ends-with" => a.ends_with(&w),
            "contains" => a.contains(&w),
            "does-not-contain" => !a.contains(&w),
            _ => false,
        }
    }
}

/// `ParameterCondition`: `name` (exact), then a value condition on its value.
#[derive(Debug)]
struct PropertyCondition {
    name: String,
    value: ValueCondition,
}

impl PropertyCondition {
    fn parse(text: &str) -> Result<PropertyCondition, TcError> {
        let mut loc = Parsed::parse(text, &[])?;
        if let Some(single) = loc.single.clone() {
            return Ok(PropertyCondition {
                name: single,
                value: ValueCondition {
                    value: None,
                    match_type: "exists".into(),
                    ignore_case: false,
                },
            });
        }
        let name = loc
            .text("name")?
            .ok_or_else(|| TcError::locator("Property condition requires 'name' dimension"))?;
        let value = loc.text("value")?;
        let default_match = if value.is_some() { "equals" } else { "exists" };
        let match_type = loc
            .text("matchType")?
            .unwrap_or_else(|| default_match.into());
        let ignore_case = loc.text("ignoreCase")?.as_deref() == Some("true");
        loc.check_used(&["name", "value", "matchType", "ignoreCase"])?;
        Ok(PropertyCondition {
            name,
            value: ValueCondition {
                value,
                match_type,
                ignore_case,
            },
        })
    }

    fn matches(&self, props: &BTreeMap<String, String>) -> bool {
        self.value
            .matches(props.get(&self.name).map(String::as_str))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_index_follows_inserts_renames_removals_and_direct_edits() {
        let mut s = State::new(&[]);
        let a = s.insert_user("Ann", None, None);
        let b = s.insert_user("bob", None, None);
        assert_eq!(s.user_by_username("ANN").map(|u| u.id), Some(a));
        s.set_username(a, "Anna");
        assert!(s.user_by_username("ann").is_none(), "old name is free");
        assert_eq!(s.user_by_username("anna").map(|u| u.id), Some(a));
        assert_eq!(s.remove_user(b).map(|u| u.id), Some(b));
        assert!(s.user_by_username("bob").is_none());
        // Edits behind the index's back are still answered correctly.
        s.users.get_mut(&a).expect("a").username = "annie".into();
        assert!(s.user_by_username("anna").is_none());
        let c = s.next_user_id;
        s.users.insert(
            c,
            UserRec {
                id: c,
                username: "carl".into(),
                ..s.users[&a].clone()
            },
        );
        assert_eq!(s.user_by_username("carl").map(|u| u.id), Some(c));
        s.reindex();
        assert_eq!(s.user_by_username("annie").map(|u| u.id), Some(a));
        // A state from a dump has no index: lookups still work.
        let json = serde_json::to_string(&s).expect("dump");
        let loaded: State = serde_json::from_str(&json).expect("load");
        assert_eq!(loaded.user_by_username("carl").map(|u| u.id), Some(c));
    }
}

#[cfg(test)]
mod index_tests {
    use super::*;

    fn token(name: &str, digest: &str) -> TokenRec {
        TokenRec {
            name: name.into(),
            creation_time: "20260101T000000+0000".into(),
            expiration_time: None,
            value_sha256: Some(digest.into()),
        }
    }

    fn group(key: &str, name: &str) -> GroupRec {
        GroupRec {
            key: key.into(),
            name: name.into(),
            description: None,
            properties: BTreeMap::new(),
            roles: BTreeSet::new(),
        }
    }

    /// The indexed answers of `s` against the same questions answered by scans (a copy of
    /// the state as loaded from a dump has no index).
    fn assert_index_agrees(s: &State) {
        let scan: State = serde_json::from_str(&serde_json::to_string(s).unwrap()).unwrap();
        assert!(s.derived.ready && !scan.derived.ready);
        let now = time::OffsetDateTime::now_utc();
        for key in s.groups.keys() {
            assert_eq!(s.members(key), scan.members(key), "members of {key}");
            let name = &s.groups[key].name;
            assert_eq!(s.group_key_by_name(name), scan.group_key_by_name(name));
        }
        for d in ["d1", "d2", "d3", "gone"] {
            assert_eq!(s.token_owner(d, now), scan.token_owner(d, now), "token {d}");
        }
        assert_eq!(s.group_key_by_name("nobody"), None);
        let mut rebuilt = s.clone();
        rebuilt.reindex();
        let non_empty = |d: &Derived| {
            let mut m: Vec<_> = d.members.iter().filter(|(_, v)| !v.is_empty()).collect();
            m.sort();
            m.into_iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(non_empty(&rebuilt.derived), non_empty(&s.derived));
        assert_eq!(rebuilt.derived.tokens, s.derived.tokens);
        assert_eq!(rebuilt.derived.group_names, s.derived.group_names);
    }

    #[test]
    fn indexes_follow_every_change_and_agree_with_scans() {
        let mut s = State::new(&[]);
        let a = s.insert_user("ann", None, None);
        let b = s.insert_user("bob", None, None);
        s.insert_group(group("G1", "one"));
        s.insert_group(group("G2", "two"));
        assert!(s.add_member(a, "G1"));
        assert!(!s.add_member(a, "G1"), "already a member");
        assert!(!s.add_member(a, ALL_USERS_GROUP), "implicit");
        s.add_member(b, "G1");
        s.add_member(b, "G2");
        s.push_token(a, token("t1", "d1"));
        s.push_token(b, token("t2", "d2"));
        assert_eq!(s.members("G1"), vec![a, b]);
        assert_eq!(
            s.token_owner("d2", time::OffsetDateTime::now_utc()),
            Some(b)
        );
        assert_index_agrees(&s);

        s.set_user_groups(a, ["G2".to_string(), ALL_USERS_GROUP.to_string()]);
        assert_eq!(s.members("G1"), vec![b]);
        assert_eq!(s.members("G2"), vec![a, b]);
        assert!(s.remove_member(b, "G2"));
        assert!(!s.remove_member(b, "G2"));
        assert!(s.remove_token(a, "t1"));
        assert!(!s.remove_token(a, "t1"));
        assert_eq!(s.token_owner("d1", time::OffsetDateTime::now_utc()), None);
        s.push_token(a, token("t3", "d3"));
        assert_index_agrees(&s);

        s.remove_group("G2");
        assert!(
            s.users[&a].groups.is_empty(),
            "membership gone with the group"
        );
        assert_eq!(s.group_key_by_name("two"), None);
        s.remove_user(b);
        assert_eq!(s.members("G1"), Vec::<u64>::new());
        assert_eq!(s.token_owner("d2", time::OffsetDateTime::now_utc()), None);
        assert_eq!(s.members(ALL_USERS_GROUP), vec![s.admin_id, a]);
        assert_index_agrees(&s);
    }
}
