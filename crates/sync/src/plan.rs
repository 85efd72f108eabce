//! `plan(desired, actual)`: the minimal list of TeamCity calls that makes TeamCity equal to
//! the desired state, each with its prerequisites (see [`dependencies`]). Pure.
//!
//! Rules:
//! - Only objects carrying our marker are changed. An unmanaged user holding a username we
//!   want is an adoption conflict (no action, reported) unless `adopt = by_username`, which
//!   marks it first ([`Action::AdoptUser`]) and then converges it; an unmanaged user in a
//!   managed group is reported, not removed.
//! - Users are matched by the marker (SCIM id), never by username, so renames are a field
//!   update.
//! - Groups are matched by the marker; a name change is a swap: ONE `CreateGroup` (new key of
//!   the next generation, new name, all roles, all members — those added by hand included)
//!   and then `DeleteGroup` of the old key, which depends on the create. Leftover groups of
//!   older generations (a swap cut short) are deleted.
//! - Inactive users (and, with `deprovision = "strip"`, managed users whose SCIM user is
//!   gone) leave every group but All Users — managed or made by hand — and lose every direct
//!   role; the first time (marker not yet set) their tokens are revoked, their password
//!   randomised, their remember-me data cleared and their sessions ended, and then
//!   [`USER_DEACTIVATED`](crate::model::USER_DEACTIVATED) is set, depending on all of those;
//!   afterwards tokens are revoked again whenever some were read. With
//!   `deprovision = "delete"` such users are deleted.
//! - Steps on managed objects the directory does not know (orphans) are flagged in
//!   [`Plan::orphans`]: nothing asked for them, so the engine holds them for approval.
//!
//! Order: delete orphan groups (frees their names), create or adopt users, update users,
//! create groups, joins, per-user role grants, leaves, group role changes (after leaves, so a
//! capped user is out of a group before it gains a role beyond the cap), per-user role
//! removals, (de)activation steps, delete swapped-out groups, delete users.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::desired::{Desired, DesiredUser, group_key, key_generation};
use crate::model::{
    Action, ActualGroup, ActualState, ActualUser, Field, FieldChange, UserRef, UserTarget,
};

/// What a SCIM DELETE (a managed TeamCity user whose SCIM user is gone) does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deprovision {
    /// Keep the user (build history keeps its author), strip it like `active=false`.
    #[default]
    Strip,
    /// Delete the TeamCity user.
    Delete,
}

/// What happens to a TeamCity user without our marker whose username a SCIM user has
/// (`sync.adopt_existing`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdoptExisting {
    /// Leave it alone: a visible conflict (the SCIM user's work is dead with the reason).
    #[default]
    Never,
    /// Mark it as the SCIM user's and converge it (audited as an adoption).
    ByUsername,
}

/// Options for [`plan`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// What happens to managed users that left the directory.
    pub deprovision: Deprovision,
    /// Whether existing unmanaged users are adopted by username.
    pub adopt: AdoptExisting,
}

/// Something the plan cannot do without a human.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conflict {
    /// The username is held by another TeamCity user (unmanaged, or managed
    /// for another SCIM id). The SCIM user is not created / not renamed.
    UsernameTaken {
        /// SCIM id of the user we wanted to create or rename.
        scim_id: String,
        /// The username.
        username: String,
        /// TeamCity id of the holder.
        holder: u64,
        /// The holder's marker, if managed.
        holder_scim_id: Option<String>,
    },
    /// The group name is held by another TeamCity group (TeamCity requires
    /// unique names). The group is not created / not renamed.
    GroupNameTaken {
        /// Marker (SCIM group id).
        marker: String,
        /// The name.
        name: String,
        /// Key of the holder.
        holder_key: String,
    },
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Conflict::UsernameTaken {
                scim_id,
                username,
                holder,
                holder_scim_id: None,
            } => write!(
                f,
                "user {scim_id}: TeamCity already has user '{username}' (id:{holder}) that teamcity-scim did not create; \
                 set sync.adopt_existing = \"by_username\" to manage it"
            ),
            Conflict::UsernameTaken {
                scim_id,
                username,
                holder,
                holder_scim_id: Some(other),
            } => write!(
                f,
                "user {scim_id}: username {username:?} belongs to TeamCity user id:{holder}, managed for SCIM user {other}"
            ),
            Conflict::GroupNameTaken {
                marker,
                name,
                holder_key,
            } => write!(
                f,
                "group {marker}: name {name:?} is taken by TeamCity group {holder_key}"
            ),
        }
    }
}

/// Unmanaged things worth knowing about; never changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// An unmanaged user is a direct member of a managed group.
    UnmanagedMember {
        /// TeamCity user id.
        user: u64,
        /// Username.
        username: String,
        /// Group key.
        group: String,
    },
    /// `ALL_USERS_GROUP` carries roles: every user keeps them, deactivated users too.
    AllUsersRoles {
        /// The roles.
        roles: Vec<crate::model::RoleAt>,
    },
    /// A read of one user failed; that user's work waits.
    ReadFailed {
        /// TeamCity user id.
        user: u64,
        /// What was read.
        what: &'static str,
        /// The error.
        error: String,
    },
    /// Counts of unmanaged users and groups (left alone).
    Unmanaged {
        /// Users without our marker.
        users: usize,
        /// Groups without our marker (`ALL_USERS_GROUP` excluded).
        groups: usize,
    },
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Report::UnmanagedMember {
                user,
                username,
                group,
            } => write!(
                f,
                "unmanaged user {username:?} (id:{user}) is a member of managed group {group}; left as is"
            ),
            Report::AllUsersRoles { roles } => write!(
                f,
                "the All Users group carries {}: every user keeps them, deactivated users too \
                 (keep All Users without roles and grant them through the policy)",
                roles
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Report::ReadFailed { user, what, error } => write!(
                f,
                "could not read the {what} of TeamCity user id:{user} ({error}); its work waits"
            ),
            Report::Unmanaged { users, groups } => write!(
                f,
                "{users} unmanaged user(s) and {groups} unmanaged group(s) left untouched"
            ),
        }
    }
}

/// A managed TeamCity object the directory does not know: removals on it were asked for by
/// no SCIM event seen here (an empty or wrong database, an old backup restored), unless the
/// store recorded a SCIM DELETE of it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Orphan {
    /// `user` or `group` (the outbox's entity types).
    pub entity: &'static str,
    /// Its SCIM id (the marker value).
    pub scim_id: String,
}

/// A plan: the steps, and what it could not or would not do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The calls, in order.
    pub actions: Vec<Action>,
    /// `deps[i]`: the indices of the steps `actions[i]` needs to have succeeded first (see
    /// [`dependencies`]). Always earlier in `actions`.
    pub deps: Vec<Vec<usize>>,
    /// Steps that take access on an object the directory does not know, by index.
    pub orphans: BTreeMap<usize, Orphan>,
    /// Conflicts (no action was planned for them).
    pub conflicts: Vec<Conflict>,
    /// Reports on unmanaged objects.
    pub reports: Vec<Report>,
}

impl Plan {
    /// No actions.
    pub fn is_empty(&self) -> bool {
        self.actions.is_empty()
    }
}

// Phases, in execution order.
const DELETE_ORPHAN_GROUP: u8 = 0;
const CREATE_USER: u8 = 1;
const ADOPT_USER: u8 = 1;
const UPDATE_USER: u8 = 2;
const CREATE_GROUP: u8 = 3;
const JOIN: u8 = 4;
const GRANT_USER_ROLE: u8 = 5;
const LEAVE: u8 = 6;
const GROUP_ROLE: u8 = 7;
const REVOKE_USER_ROLE: u8 = 8;
const ACTIVATION: u8 = 9;
const DELETE_OLD_GROUP: u8 = 10;
const DELETE_USER: u8 = 11;

#[derive(Default)]
struct Out {
    actions: Vec<(u8, Action, Option<Orphan>)>,
    conflicts: Vec<Conflict>,
    /// While planning an orphan's steps: the orphan they concern.
    orphan: Option<Orphan>,
}

impl Out {
    fn push(&mut self, phase: u8, action: Action) {
        self.actions.push((phase, action, self.orphan.clone()));
    }
}

/// Where a desired group ends up in this plan.
struct GroupTarget {
    key: String,
    /// Created in this plan (members and roles come with the create call).
    created: bool,
}

/// What a scoped plan ([`plan_in`]) may change: an outbox pass plans the objects its rows
/// name (and what they affect), nothing else.
///
/// - Every user of the desired state in [`Scope::users`] is planned whole (fields, every
///   membership, direct roles, activation). A TeamCity user whose SCIM id is in
///   [`Scope::users`] but not in the desired state is an orphan (a SCIM DELETE: stripped or
///   deleted, held unless the store recorded the delete). Any other TeamCity user is left
///   alone: neither managed here nor an orphan.
/// - A user of the desired state not in [`Scope::users`] is a *context member*: a member of a
///   group planned whole, read without its other groups. Only its membership of the groups
///   planned whole is planned (joins, leaves); nothing else of it — not its fields, other
///   groups, roles or activation, and it is not created when TeamCity lacks it (its own pass
///   creates it, with every group). A desired state holds context members only where the
///   policy has no caps (a cap depends on every group of the user).
/// - A desired group whose marker is in [`Scope::groups`] is planned whole: created, renamed
///   (a swap, with every member), its roles made right, its leftover generations deleted; a
///   TeamCity group with such a marker that the desired state lacks is an orphan. Any other
///   desired group is *context*: its current TeamCity group is where its members (in the
///   desired state) belong, and nothing is planned on the group itself; a context group that
///   TeamCity does not hold yet is joined by nobody (its own pass creates it with every
///   member).
/// - No reports (the reconcile makes them).
///
/// `actual` may be a part of TeamCity (see `sync::scope`) that holds every object in scope
/// (a group planned whole with every member), every group of the users planned whole, the
/// groups holding the names of the groups in scope, and the users holding the usernames of
/// the users in scope. A context member may be held with only the part's groups: nothing
/// here reads its others.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// SCIM ids of users planned even when the directory no longer has them.
    pub users: BTreeSet<String>,
    /// Markers of the groups planned whole.
    pub groups: BTreeSet<String>,
}

/// Computes the plan. Pure and deterministic.
pub fn plan(desired: &Desired, actual: &ActualState, opts: &PlanOptions) -> Plan {
    plan_in(desired, actual, opts, None)
}

/// [`plan`] limited to a [`Scope`] (`None`: everything, as [`plan`]). Pure and deterministic.
pub fn plan_in(
    desired: &Desired,
    actual: &ActualState,
    opts: &PlanOptions,
    scope: Option<&Scope>,
) -> Plan {
    let user_in_scope =
        |s: &str| scope.is_none_or(|sc| sc.users.contains(s)) || desired.users.contains_key(s);
    let context_member = |s: &str| scope.is_some_and(|sc| !sc.users.contains(s));
    let group_in_scope = |m: &str| scope.is_none_or(|sc| sc.groups.contains(m));
    let mut out = Out::default();

    // ---- index actual ----
    let mut managed_users: BTreeMap<&str, &ActualUser> = BTreeMap::new();
    let mut orphans: Vec<&ActualUser> = Vec::new();
    let mut sorted_users: Vec<&ActualUser> = actual.users.iter().collect();
    sorted_users.sort_by_key(|u| u.id);
    for u in &sorted_users {
        if let Some(s) = u.scim_id.as_deref() {
            if desired.users.contains_key(s) && !managed_users.contains_key(s) {
                managed_users.insert(s, u);
            } else if user_in_scope(s) {
                orphans.push(u);
            }
        }
    }
    let by_username: BTreeMap<&str, &ActualUser> = sorted_users
        .iter()
        .map(|u| (u.username.as_str(), *u))
        .collect();
    let managed_group_keys: BTreeSet<&str> = actual
        .groups
        .iter()
        .filter(|g| g.marker.is_some())
        .map(|g| g.key.as_str())
        .collect();
    let mut groups_by_marker: BTreeMap<&str, Vec<&ActualGroup>> = BTreeMap::new();
    for g in &actual.groups {
        if let Some(m) = g.marker.as_deref() {
            groups_by_marker.entry(m).or_default().push(g);
        }
    }
    let members = actual.members();

    // ---- users: who exists, who is created, who conflicts ----
    let mut refs: BTreeMap<&str, UserRef> = BTreeMap::new();
    let mut claimed_usernames: BTreeSet<&str> = BTreeSet::new();
    // Unmanaged users taken over by username, as they will be once marked.
    let mut adopted: BTreeMap<&str, ActualUser> = BTreeMap::new();
    for d in desired.users.values() {
        if let Some(a) = managed_users.get(d.scim_id.as_str()) {
            refs.insert(&d.scim_id, UserRef::Id(a.id));
            claimed_usernames.insert(&a.username);
        }
    }
    for d in desired.users.values() {
        if refs.contains_key(d.scim_id.as_str()) || !d.active || context_member(&d.scim_id) {
            continue;
        }
        if let Some(h) = by_username.get(d.username.as_str()) {
            if opts.adopt == AdoptExisting::ByUsername
                && !h.is_managed()
                && claimed_usernames.insert(&h.username)
            {
                out.push(
                    ADOPT_USER,
                    Action::AdoptUser {
                        user: h.id,
                        scim_id: d.scim_id.clone(),
                    },
                );
                adopted.insert(&d.scim_id, (*h).clone());
                refs.insert(&d.scim_id, UserRef::Id(h.id));
                continue;
            }
            out.conflicts.push(Conflict::UsernameTaken {
                scim_id: d.scim_id.clone(),
                username: d.username.clone(),
                holder: h.id,
                holder_scim_id: h.scim_id.clone(),
            });
            continue;
        }
        if !claimed_usernames.insert(&d.username) {
            continue; // two SCIM users fold to one TeamCity username; the first wins
        }
        out.push(
            CREATE_USER,
            Action::CreateUser {
                scim_id: d.scim_id.clone(),
                username: d.username.clone(),
                name: d.name.clone(),
                email: d.email.clone(),
                groups: Vec::new(),
            },
        );
        refs.insert(&d.scim_id, UserRef::New(d.scim_id.clone()));
    }
    for (scim_id, a) in &mut adopted {
        a.scim_id = Some((*scim_id).to_owned());
    }
    let managed_users: BTreeMap<&str, &ActualUser> = managed_users
        .into_iter()
        .chain(adopted.iter().map(|(s, a)| (*s, a)))
        .collect();
    for d in desired.users.values() {
        if let Some(a) = managed_users.get(d.scim_id.as_str())
            && !context_member(&d.scim_id)
        {
            update_fields(&mut out, d, a, &by_username);
        }
    }

    // ---- groups ----
    let orphan_groups: BTreeSet<&str> = actual
        .groups
        .iter()
        .filter(|g| {
            g.marker
                .as_deref()
                .is_some_and(|m| !desired.groups.contains_key(m) && group_in_scope(m))
        })
        .map(|g| g.key.as_str())
        .collect();
    for key in &orphan_groups {
        out.orphan = actual
            .group(key)
            .and_then(|g| g.marker.clone())
            .map(|m| Orphan {
                entity: "group",
                scim_id: m,
            });
        out.push(
            DELETE_ORPHAN_GROUP,
            Action::DeleteGroup {
                key: (*key).to_owned(),
            },
        );
    }
    out.orphan = None;
    // Names held by groups that survive the orphan deletes.
    let name_holders: BTreeMap<&str, &ActualGroup> = actual
        .groups
        .iter()
        .filter(|g| !orphan_groups.contains(g.key.as_str()))
        .map(|g| (g.name.as_str(), g))
        .collect();
    let mut targets: BTreeMap<&str, GroupTarget> = BTreeMap::new();
    // Names claimed by desired groups handled so far → their key.
    let mut claimed: BTreeMap<&str, String> = BTreeMap::new();
    let mut going: BTreeSet<String> = orphan_groups.iter().map(|k| (*k).to_owned()).collect();
    for g in desired.groups.values() {
        let mut candidates: Vec<&ActualGroup> = groups_by_marker
            .get(g.marker.as_str())
            .cloned()
            .unwrap_or_default();
        let generation = |a: &ActualGroup| key_generation(&g.marker, &a.key);
        // The group we keep: the fixed key; else one already named right (newest
        // generation first); else the newest generation.
        candidates.sort_by_key(|a| std::cmp::Reverse(generation(a)));
        let current = match &g.fixed_key {
            Some(k) => candidates.iter().find(|a| a.key == *k).copied(),
            None => candidates
                .iter()
                .find(|a| a.name == g.name)
                .or_else(|| candidates.first())
                .copied(),
        };
        if !group_in_scope(&g.marker) {
            // Context: its members join it where it is; nothing is planned on it.
            if let Some(c) = current {
                targets.insert(
                    &g.marker,
                    GroupTarget {
                        key: c.key.clone(),
                        created: false,
                    },
                );
            }
            continue;
        }
        for extra in candidates
            .iter()
            .filter(|a| current.is_none_or(|c| c.key != a.key))
        {
            going.insert(extra.key.clone());
            out.push(
                DELETE_OLD_GROUP,
                Action::DeleteGroup {
                    key: extra.key.clone(),
                },
            );
        }
        let ours = |a: &ActualGroup| a.marker.as_deref() == Some(g.marker.as_str());
        let name_taken: Option<String> = claimed.get(g.name.as_str()).cloned().or_else(|| {
            name_holders
                .get(g.name.as_str())
                .filter(|h| !ours(h))
                .map(|h| h.key.clone())
        });
        let new_key = || match &g.fixed_key {
            Some(k) => k.clone(),
            None => group_key(
                &g.marker,
                candidates
                    .iter()
                    .filter_map(|a| generation(a))
                    .max()
                    .map_or(0, |m| m + 1),
            ),
        };
        match current {
            Some(c) if c.name == g.name || g.fixed_key.is_some() => {
                in_place(&mut out, g, c);
                targets.insert(
                    &g.marker,
                    GroupTarget {
                        key: c.key.clone(),
                        created: false,
                    },
                );
            }
            Some(c) => {
                if let Some(h) = name_taken {
                    out.conflicts.push(Conflict::GroupNameTaken {
                        marker: g.marker.clone(),
                        name: g.name.clone(),
                        holder_key: h,
                    });
                    in_place(&mut out, g, c);
                    targets.insert(
                        &g.marker,
                        GroupTarget {
                            key: c.key.clone(),
                            created: false,
                        },
                    );
                    continue;
                }
                // Rename swap: new group with everything in one call — members an
                // administrator added by hand included — then drop the old.
                let key = new_key();
                let mut create = create_group(g, &key, &refs);
                if let Action::CreateGroup {
                    members: m,
                    replaces,
                    ..
                } = &mut create
                {
                    *replaces = Some(c.key.clone());
                    m.extend(
                        members
                            .get(c.key.as_str())
                            .into_iter()
                            .flatten()
                            .filter(|id| actual.user(**id).is_some_and(|u| !u.is_managed()))
                            .map(|id| UserRef::Id(*id)),
                    );
                }
                out.push(CREATE_GROUP, create);
                going.insert(c.key.clone());
                out.push(DELETE_OLD_GROUP, Action::DeleteGroup { key: c.key.clone() });
                targets.insert(&g.marker, GroupTarget { key, created: true });
            }
            None => {
                if let Some(h) = name_taken {
                    out.conflicts.push(Conflict::GroupNameTaken {
                        marker: g.marker.clone(),
                        name: g.name.clone(),
                        holder_key: h,
                    });
                    continue;
                }
                let key = new_key();
                out.push(CREATE_GROUP, create_group(g, &key, &refs));
                targets.insert(&g.marker, GroupTarget { key, created: true });
            }
        }
        let key = &targets[g.marker.as_str()].key;
        claimed.insert(&g.name, key.clone());
    }

    // Desired keys per user.
    let mut wanted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for g in desired.groups.values() {
        if let Some(t) = targets.get(g.marker.as_str()) {
            for m in &g.members {
                wanted.entry(m.as_str()).or_default().insert(&t.key);
            }
        }
    }
    let created_keys: BTreeSet<&str> = targets
        .values()
        .filter(|t| t.created)
        .map(|t| t.key.as_str())
        .collect();

    // The TeamCity groups (every generation) of the groups planned whole: all a context
    // member may join or leave.
    let scoped_keys: BTreeSet<&str> = actual
        .groups
        .iter()
        .filter(|g| g.marker.as_deref().is_some_and(group_in_scope))
        .map(|g| g.key.as_str())
        .chain(
            targets
                .iter()
                .filter(|(m, _)| group_in_scope(m))
                .map(|(_, t)| t.key.as_str()),
        )
        .collect();

    // ---- memberships, direct roles, (de)activation ----
    for d in desired.users.values() {
        let Some(r) = refs.get(d.scim_id.as_str()) else {
            continue;
        };
        if context_member(&d.scim_id) {
            if let UserRef::Id(_) = r {
                let keys: BTreeSet<&str> = if d.active {
                    wanted
                        .get(d.scim_id.as_str())
                        .into_iter()
                        .flatten()
                        .copied()
                        .filter(|k| scoped_keys.contains(k))
                        .collect()
                } else {
                    BTreeSet::new()
                };
                let a = managed_users[d.scim_id.as_str()];
                sync_user(
                    &mut out,
                    a,
                    &keys,
                    &a.roles,
                    &created_keys,
                    &going,
                    Leave::Managed(&scoped_keys),
                );
            }
            continue;
        }
        let keys = if d.active {
            wanted.get(d.scim_id.as_str()).cloned().unwrap_or_default()
        } else {
            BTreeSet::new()
        };
        let roles = if d.active {
            d.roles.clone()
        } else {
            BTreeSet::new()
        };
        match r {
            UserRef::New(_) => {
                for k in keys.iter().filter(|k| !created_keys.contains(*k)) {
                    out.push(
                        JOIN,
                        Action::AddToGroup {
                            user: r.clone(),
                            group: (*k).to_owned(),
                        },
                    );
                }
                for role in roles {
                    out.push(
                        GRANT_USER_ROLE,
                        Action::AddUserRole {
                            user: r.clone(),
                            role,
                        },
                    );
                }
            }
            UserRef::Id(_) => {
                let a = managed_users[d.scim_id.as_str()];
                sync_user(
                    &mut out,
                    a,
                    &keys,
                    &roles,
                    &created_keys,
                    &going,
                    if d.active {
                        Leave::Managed(&managed_group_keys)
                    } else {
                        Leave::All
                    },
                );
                activation(&mut out, a, d.active);
            }
        }
    }
    for a in &orphans {
        out.orphan = a.scim_id.clone().map(|scim_id| Orphan {
            entity: "user",
            scim_id,
        });
        match opts.deprovision {
            Deprovision::Delete => out.push(DELETE_USER, Action::DeleteUser { user: a.id }),
            Deprovision::Strip => {
                sync_user(
                    &mut out,
                    a,
                    &BTreeSet::new(),
                    &BTreeSet::new(),
                    &created_keys,
                    &going,
                    Leave::All,
                );
                activation(&mut out, a, false);
            }
        }
    }
    out.orphan = None;

    // ---- reports (the whole plan only) ----
    let mut reports = Vec::new();
    for (key, ids) in members.iter().filter(|_| scope.is_none()) {
        if !managed_group_keys.contains(key) {
            continue;
        }
        for id in ids {
            if let Some(u) = actual.user(*id).filter(|u| !u.is_managed()) {
                reports.push(Report::UnmanagedMember {
                    user: u.id,
                    username: u.username.clone(),
                    group: (*key).to_owned(),
                });
            }
        }
    }
    if scope.is_none() && !actual.all_users_roles.is_empty() {
        reports.push(Report::AllUsersRoles {
            roles: actual.all_users_roles.iter().cloned().collect(),
        });
    }
    for f in actual.read_failures.iter().filter(|_| scope.is_none()) {
        reports.push(Report::ReadFailed {
            user: f.user,
            what: f.what,
            error: f.error.clone(),
        });
    }
    let unmanaged_users = actual.users.iter().filter(|u| !u.is_managed()).count();
    let unmanaged_groups = actual.groups.iter().filter(|g| g.marker.is_none()).count();
    if scope.is_none() && unmanaged_users + unmanaged_groups > 0 {
        reports.push(Report::Unmanaged {
            users: unmanaged_users,
            groups: unmanaged_groups,
        });
    }

    fold_joins_into_creates(&mut out.actions, actual);
    out.actions.sort_by_key(|(phase, _, _)| *phase);
    let mut orphans_at = BTreeMap::new();
    let mut actions = Vec::with_capacity(out.actions.len());
    for (i, (_, a, orphan)) in out.actions.into_iter().enumerate() {
        if let Some(o) = orphan {
            orphans_at.insert(i, o);
        }
        actions.push(a);
    }
    let deps = dependencies(&actions, actual);
    Plan {
        actions,
        deps,
        orphans: orphans_at,
        conflicts: out.conflicts,
        reports,
    }
}

/// A new user's joins of groups that already exist in TeamCity (and are neither deleted nor
/// created by this plan) go into its create: one call instead of one per group, which halves
/// the calls of a first load pushed users first (every user joins the defaults group). Joins
/// of groups this plan creates stay separate steps after that create.
fn fold_joins_into_creates(actions: &mut Vec<(u8, Action, Option<Orphan>)>, actual: &ActualState) {
    let existing: BTreeSet<&str> = actual.groups.iter().map(|g| g.key.as_str()).collect();
    let touched: BTreeSet<String> = actions
        .iter()
        .filter_map(|(_, a, _)| match a {
            Action::CreateGroup { key, .. } | Action::DeleteGroup { key } => Some(key.clone()),
            _ => None,
        })
        .collect();
    let creates: BTreeSet<String> = actions
        .iter()
        .filter_map(|(_, a, _)| match a {
            Action::CreateUser { scim_id, .. } => Some(scim_id.clone()),
            _ => None,
        })
        .collect();
    let mut joins: BTreeMap<String, Vec<String>> = BTreeMap::new();
    actions.retain(|(_, a, _)| match a {
        Action::AddToGroup {
            user: UserRef::New(s),
            group,
        } if creates.contains(s)
            && existing.contains(group.as_str())
            && !touched.contains(group) =>
        {
            joins.entry(s.clone()).or_default().push(group.clone());
            false
        }
        _ => true,
    });
    for (_, a, _) in actions.iter_mut() {
        if let Action::CreateUser {
            scim_id, groups, ..
        } = a
            && let Some(keys) = joins.remove(scim_id.as_str())
        {
            groups.extend(keys);
            groups.sort();
            groups.dedup();
        }
    }
}

/// The prerequisites of each step: `deps[i]` lists the indices of the steps that must have
/// succeeded before `actions[i]` may run; a step whose prerequisite failed (or did not run) is
/// not attempted. Always earlier indices, in a phase-sorted list (so they run in an earlier
/// wave, or earlier in the same lane). Pure.
///
/// - a join or role grant of a user created in the plan needs that create;
/// - every step on an adopted user needs the adoption (the marker);
/// - a join or role change of a group created in the plan needs that create;
/// - creating a group needs the delete of the orphan group holding its name;
/// - **a rename swap's delete of the old group needs the replacement to exist with every
///   role and every member** (its create, and any join or role added to it);
/// - **the deactivated marker needs every strip step of that user** (leaves, role removals,
///   tokens, password, sessions, remember-me);
/// - a role added to a group needs every leave of that group first (a capped or departing
///   member is out before the group gains a role beyond what it may have).
///
/// A created group's members who were to be created in the same plan are resolved at apply
/// time (a user whose create failed is left out and joins later), so that create does not
/// wait for them.
pub fn dependencies(actions: &[Action], actual: &ActualState) -> Vec<Vec<usize>> {
    use std::collections::HashMap;
    let mut create_user: HashMap<&str, usize> = HashMap::new();
    let mut adopt: HashMap<u64, usize> = HashMap::new();
    let mut create_group_key: HashMap<&str, usize> = HashMap::new();
    let mut create_group_marker: HashMap<&str, usize> = HashMap::new();
    let mut delete_group: HashMap<&str, usize> = HashMap::new();
    let mut group_additions: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut leaves_of_group: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut strip_steps: HashMap<u64, Vec<usize>> = HashMap::new();
    for (i, a) in actions.iter().enumerate() {
        match a {
            Action::CreateUser {
                scim_id, groups, ..
            } => {
                create_user.insert(scim_id, i);
                // Joins made by the create count as additions to those groups.
                for g in groups {
                    group_additions.entry(g).or_default().push(i);
                }
            }
            Action::AdoptUser { user, .. } => {
                adopt.insert(*user, i);
            }
            Action::CreateGroup { key, marker, .. } => {
                create_group_key.insert(key, i);
                create_group_marker.insert(marker, i);
            }
            Action::DeleteGroup { key } => {
                delete_group.insert(key, i);
            }
            Action::AddToGroup { group, .. } | Action::AddGroupRole { group, .. } => {
                group_additions.entry(group).or_default().push(i);
            }
            _ => {}
        }
        match a {
            Action::RemoveFromGroup { user, group } => {
                leaves_of_group.entry(group).or_default().push(i);
                strip_steps.entry(*user).or_default().push(i);
            }
            Action::RemoveUserRole { user, .. }
            | Action::RevokeTokens { user }
            | Action::ResetPassword { user }
            | Action::EndSessions { user }
            | Action::ClearRememberMe { user } => strip_steps.entry(*user).or_default().push(i),
            _ => {}
        }
    }
    let group_by_key: HashMap<&str, &ActualGroup> =
        actual.groups.iter().map(|g| (g.key.as_str(), g)).collect();
    let name_holder: HashMap<&str, &str> = actual
        .groups
        .iter()
        .map(|g| (g.name.as_str(), g.key.as_str()))
        .collect();
    let mut deps: Vec<Vec<usize>> = Vec::with_capacity(actions.len());
    for (i, a) in actions.iter().enumerate() {
        let mut d: Vec<usize> = Vec::new();
        if let Some(UserTarget::Id(u)) = a.user_target()
            && let Some(&j) = adopt.get(&u)
        {
            d.push(j);
        }
        match a {
            Action::AddToGroup {
                user: UserRef::New(s),
                ..
            }
            | Action::AddUserRole {
                user: UserRef::New(s),
                ..
            } => d.extend(create_user.get(s.as_str())),
            _ => {}
        }
        match a {
            Action::AddToGroup { group, .. }
            | Action::AddGroupRole { group, .. }
            | Action::RemoveGroupRole { group, .. } => {
                d.extend(create_group_key.get(group.as_str()));
            }
            _ => {}
        }
        match a {
            Action::CreateGroup { name, .. } => {
                if let Some(holder) = name_holder.get(name.as_str()) {
                    d.extend(delete_group.get(holder));
                }
            }
            Action::DeleteGroup { key } => {
                let replacement = group_by_key
                    .get(key.as_str())
                    .and_then(|g| g.marker.as_deref())
                    .and_then(|m| create_group_marker.get(m));
                if let Some(&c) = replacement
                    && let Action::CreateGroup { key: new_key, .. } = &actions[c]
                {
                    d.push(c);
                    d.extend(group_additions.get(new_key.as_str()).into_iter().flatten());
                }
            }
            Action::SetDeactivated { user } => {
                d.extend(strip_steps.get(user).into_iter().flatten());
            }
            Action::AddGroupRole { group, .. } => {
                d.extend(leaves_of_group.get(group.as_str()).into_iter().flatten());
            }
            _ => {}
        }
        d.retain(|&j| j < i);
        d.sort_unstable();
        d.dedup();
        deps.push(d);
    }
    deps
}

fn create_group(
    g: &crate::desired::DesiredGroup,
    key: &str,
    refs: &BTreeMap<&str, UserRef>,
) -> Action {
    Action::CreateGroup {
        key: key.to_owned(),
        name: g.name.clone(),
        marker: g.marker.clone(),
        roles: g.roles.iter().cloned().collect(),
        members: g
            .members
            .iter()
            .filter_map(|m| refs.get(m.as_str()).cloned())
            .collect(),
        replaces: None,
    }
}

fn in_place(out: &mut Out, g: &crate::desired::DesiredGroup, c: &ActualGroup) {
    for role in g.roles.difference(&c.roles) {
        out.push(
            GROUP_ROLE,
            Action::AddGroupRole {
                group: c.key.clone(),
                role: role.clone(),
            },
        );
    }
    for role in c.roles.difference(&g.roles) {
        out.push(
            GROUP_ROLE,
            Action::RemoveGroupRole {
                group: c.key.clone(),
                role: role.clone(),
            },
        );
    }
}

fn update_fields(
    out: &mut Out,
    d: &DesiredUser,
    a: &ActualUser,
    by_username: &BTreeMap<&str, &ActualUser>,
) {
    let mut changes = Vec::new();
    if d.username != a.username {
        match by_username.get(d.username.as_str()) {
            Some(h) if h.id != a.id => out.conflicts.push(Conflict::UsernameTaken {
                scim_id: d.scim_id.clone(),
                username: d.username.clone(),
                holder: h.id,
                holder_scim_id: h.scim_id.clone(),
            }),
            _ => changes.push(FieldChange {
                field: Field::Username,
                from: Some(a.username.clone()),
                to: Some(d.username.clone()),
            }),
        }
    }
    if d.name != a.name {
        changes.push(FieldChange {
            field: Field::Name,
            from: a.name.clone(),
            to: d.name.clone(),
        });
    }
    if d.email != a.email {
        changes.push(FieldChange {
            field: Field::Email,
            from: a.email.clone(),
            to: d.email.clone(),
        });
    }
    if !changes.is_empty() {
        out.push(
            UPDATE_USER,
            Action::UpdateUser {
                user: a.id,
                changes,
            },
        );
    }
}

/// Which of a user's current groups it may be taken out of.
enum Leave<'a> {
    /// Managed groups it should not be in (an active user: groups made by hand stay).
    Managed(&'a BTreeSet<&'a str>),
    /// Every group but All Users (offboarding: hand-made groups and their roles too).
    All,
}

fn sync_user(
    out: &mut Out,
    a: &ActualUser,
    keys: &BTreeSet<&str>,
    roles: &BTreeSet<crate::model::RoleAt>,
    created_keys: &BTreeSet<&str>,
    going: &BTreeSet<String>,
    leave: Leave<'_>,
) {
    let user = UserRef::Id(a.id);
    for k in keys {
        if !created_keys.contains(k) && !a.groups.contains(k) {
            out.push(
                JOIN,
                Action::AddToGroup {
                    user: user.clone(),
                    group: (*k).to_owned(),
                },
            );
        }
    }
    for role in roles.difference(&a.roles) {
        out.push(
            GRANT_USER_ROLE,
            Action::AddUserRole {
                user: user.clone(),
                role: role.clone(),
            },
        );
    }
    for k in &a.groups {
        let may_leave = match &leave {
            Leave::Managed(managed) => managed.contains(k),
            Leave::All => true,
        };
        if may_leave && !keys.contains(k) && !going.contains(k) {
            out.push(
                LEAVE,
                Action::RemoveFromGroup {
                    user: a.id,
                    group: k.to_owned(),
                },
            );
        }
    }
    for role in a.roles.difference(roles) {
        out.push(
            REVOKE_USER_ROLE,
            Action::RemoveUserRole {
                user: a.id,
                role: role.clone(),
            },
        );
    }
}

fn activation(out: &mut Out, a: &ActualUser, active: bool) {
    if active {
        if a.deactivated {
            out.push(ACTIVATION, Action::ClearDeactivated { user: a.id });
        }
    } else if !a.deactivated {
        out.push(ACTIVATION, Action::RevokeTokens { user: a.id });
        out.push(ACTIVATION, Action::ResetPassword { user: a.id });
        out.push(ACTIVATION, Action::ClearRememberMe { user: a.id });
        out.push(ACTIVATION, Action::EndSessions { user: a.id });
        out.push(ACTIVATION, Action::SetDeactivated { user: a.id });
    } else if a.token_count.is_some_and(|n| n > 0) {
        out.push(ACTIVATION, Action::RevokeTokens { user: a.id });
    }
}
