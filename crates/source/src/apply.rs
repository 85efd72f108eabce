//! A round of IdP changes → the store writes a SCIM push would make.
//!
//! The planning is pure ([`plan`]): the stored directory, the configured scope and a [`Round`]
//! give the [`BatchOp`]s, which [`apply_round`] writes in one transaction with the round's
//! cursor. The rules, which keep "access is taken away only when the directory says so":
//!
//! - a user is in scope while it is a direct member of a configured group; users are found by
//!   `externalId` (the IdP's object id), never by name;
//! - a user leaving the scope (removed from every configured group) or soft-deleted in the IdP
//!   is deactivated (`active = false`: the engine strips its access, the record stays); only a
//!   permanent deletion in the IdP deletes it;
//! - a full round never removes anyone it still lists; it changes only what differs;
//! - stored users and groups without an `externalId`, and groups outside the configured list,
//!   are not the source's and are left alone;
//! - a stored user without an `externalId` whose userName the IdP user has is linked (its
//!   `externalId` set), as a SCIM push of the same person would; a userName or group name held
//!   by another IdP object is a conflict: reported, never overwritten.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use scim::ResourceKind;
use serde_json::{Value, json};
use store::{BatchOp, DirectorySnapshot, DynStore, MembershipChange, NewMember, WriteCtx};

use crate::{Change, Round, Source, SourceError, SourceUser};

/// What a round changed in the store, for the audit event, the log and the status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Summary {
    /// Users created.
    pub users_created: usize,
    /// Users whose attributes changed (a reactivation included).
    pub users_updated: usize,
    /// Users deactivated (out of scope, disabled or soft-deleted in the IdP).
    pub users_deactivated: usize,
    /// Users deleted (deleted permanently in the IdP).
    pub users_deleted: usize,
    /// Groups created.
    pub groups_created: usize,
    /// Groups renamed.
    pub groups_updated: usize,
    /// Groups deleted (deleted in the IdP).
    pub groups_deleted: usize,
    /// Memberships added.
    pub members_added: usize,
    /// Memberships removed.
    pub members_removed: usize,
    /// What could not be applied, one line each (a name held by another IdP object).
    pub conflicts: Vec<String>,
}

impl Summary {
    /// One line for people: `users +3 ~1 deactivated 0 deleted 0; groups +1 ~0 deleted 0;
    /// memberships +4 -0`.
    pub fn line(&self) -> String {
        format!(
            "users +{} ~{} deactivated {} deleted {}; groups +{} ~{} deleted {}; memberships +{} -{}",
            self.users_created,
            self.users_updated,
            self.users_deactivated,
            self.users_deleted,
            self.groups_created,
            self.groups_updated,
            self.groups_deleted,
            self.members_added,
            self.members_removed
        )
    }

    /// Whether the round changed nothing.
    pub fn is_empty(&self) -> bool {
        self.users_created
            + self.users_updated
            + self.users_deactivated
            + self.users_deleted
            + self.groups_created
            + self.groups_updated
            + self.groups_deleted
            + self.members_added
            + self.members_removed
            == 0
    }
}

/// The directory as the round leaves it, before it is compared with the store.
#[derive(Debug, Default)]
struct After {
    /// Configured group → (display name if known, direct user members).
    groups: BTreeMap<String, (Option<String>, BTreeSet<String>)>,
    /// Groups the IdP deleted.
    groups_removed: BTreeSet<String>,
    /// Users the round described.
    users: HashMap<String, SourceUser>,
    /// Users the IdP deleted: id → permanently.
    users_removed: HashMap<String, bool>,
}

/// Stored state indexed by the IdP's ids.
struct Stored<'a> {
    /// externalId → user.
    users: HashMap<&'a str, &'a store::DirUser>,
    /// lower-cased userName → user (for links and conflicts).
    by_name: HashMap<String, &'a store::DirUser>,
    /// SCIM id → externalId.
    ext_of: HashMap<&'a str, &'a str>,
    /// externalId → group.
    groups: HashMap<&'a str, &'a store::DirGroup>,
    /// lower-cased displayName → group.
    group_names: HashMap<String, &'a store::DirGroup>,
}

fn index(dir: &DirectorySnapshot) -> Stored<'_> {
    let mut s = Stored {
        users: HashMap::new(),
        by_name: HashMap::new(),
        ext_of: HashMap::new(),
        groups: HashMap::new(),
        group_names: HashMap::new(),
    };
    for u in &dir.users {
        if let Some(ext) = u.external_id.as_deref() {
            s.users.insert(ext, u);
            s.ext_of.insert(&u.id, ext);
        }
        s.by_name.insert(u.user_name.to_lowercase(), u);
    }
    for g in &dir.groups {
        if let Some(ext) = g.external_id.as_deref() {
            s.groups.insert(ext, g);
        }
        s.group_names.insert(g.display_name.to_lowercase(), g);
    }
    s
}

/// Replays the round over the stored membership of the configured groups.
fn after(dir: &DirectorySnapshot, scope: &[String], round: &Round) -> After {
    let stored = index(dir);
    let configured: BTreeSet<&str> = scope.iter().map(String::as_str).collect();
    let mut a = After::default();
    for id in scope {
        // Even in a full round: a configured group the IdP did not list (neither with its members
        // nor as removed) keeps its stored members — silence never takes access away.
        let known = stored.groups.get(id.as_str());
        let members = known
            .map(|g| {
                g.members
                    .iter()
                    .filter_map(|m| stored.ext_of.get(m.value.as_str()))
                    .map(|e| (*e).to_owned())
                    .collect()
            })
            .unwrap_or_default();
        a.groups
            .insert(id.clone(), (known.map(|g| g.display_name.clone()), members));
    }
    for change in &round.changes {
        match change {
            Change::User(u) => {
                a.users_removed.remove(&u.id);
                a.users.insert(u.id.clone(), u.clone());
            }
            Change::UserRemoved { id, hard } => {
                a.users.remove(id);
                a.users_removed.insert(id.clone(), *hard);
            }
            Change::Group(g) if configured.contains(g.id.as_str()) => {
                a.groups_removed.remove(&g.id);
                if let Some(entry) = a.groups.get_mut(&g.id) {
                    entry.0 = Some(g.display_name.clone());
                }
            }
            Change::GroupRemoved { id } if configured.contains(id.as_str()) => {
                a.groups_removed.insert(id.clone());
                if let Some(entry) = a.groups.get_mut(id) {
                    entry.1.clear();
                }
            }
            Change::Members {
                group,
                added,
                removed,
            } => {
                if let Some(entry) = a.groups.get_mut(group) {
                    entry.1.extend(added.iter().cloned());
                    for r in removed {
                        entry.1.remove(r);
                    }
                }
            }
            Change::AllMembers { group, members } => {
                if let Some(entry) = a.groups.get_mut(group) {
                    entry.1 = members.iter().cloned().collect();
                }
            }
            Change::Group(_) | Change::GroupRemoved { .. } => {}
        }
    }
    a
}

/// The users in scope after `round` that neither the store nor the round describes: the
/// source must read them ([`Source::user`]) before [`plan`].
pub fn to_fetch(dir: &DirectorySnapshot, scope: &[String], round: &Round) -> Vec<String> {
    let stored = index(dir);
    let a = after(dir, scope, round);
    let mut out: BTreeSet<String> = BTreeSet::new();
    for (id, (_, members)) in &a.groups {
        if a.groups_removed.contains(id) {
            continue;
        }
        for m in members {
            if !a.users.contains_key(m)
                && !a.users_removed.contains_key(m)
                && !stored.users.contains_key(m.as_str())
            {
                out.insert(m.clone());
            }
        }
    }
    out.into_iter().collect()
}

/// The SCIM user document for `u` (what an IdP's push carries).
pub fn user_doc(u: &SourceUser) -> Value {
    let mut doc = json!({
        "schemas": [scim::schema::USER_SCHEMA],
        "userName": u.user_name,
        "externalId": u.id,
        "active": u.active,
    });
    let mut name = serde_json::Map::new();
    if let Some(g) = &u.given_name {
        name.insert("givenName".into(), json!(g));
    }
    if let Some(f) = &u.family_name {
        name.insert("familyName".into(), json!(f));
    }
    if !name.is_empty() {
        doc["name"] = Value::Object(name);
    }
    if let Some(d) = &u.display_name {
        doc["displayName"] = json!(d);
    }
    if let Some(e) = &u.email {
        doc["emails"] = json!([{"value": e, "type": "work", "primary": true}]);
    }
    doc
}

fn group_doc(id: &str, name: &str) -> Value {
    json!({
        "schemas": [scim::schema::GROUP_SCHEMA],
        "displayName": name,
        "externalId": id,
    })
}

/// Whether the stored user already reads as `u`.
fn same(stored: &store::DirUser, u: &SourceUser) -> bool {
    stored.user_name == u.user_name
        && stored.given_name == u.given_name
        && stored.family_name == u.family_name
        && stored.display_name == u.display_name
        && stored.email == u.email
        && stored.active == u.active
}

/// The store writes that make the directory what the IdP says after `round`. `fetched`: the
/// users [`to_fetch`] named, as the source read them (absent: the IdP has no such user).
/// `new_id` makes SCIM ids for created resources.
pub fn plan(
    dir: &DirectorySnapshot,
    scope: &[String],
    round: &Round,
    fetched: &HashMap<String, SourceUser>,
    mut new_id: impl FnMut() -> String,
) -> (Vec<BatchOp>, Summary) {
    let stored = index(dir);
    let a = after(dir, scope, round);
    let mut ops = Vec::new();
    let mut sum = Summary::default();

    // Who is in scope, and the IdP's word on each.
    let in_scope: BTreeSet<&str> = a
        .groups
        .iter()
        .filter(|(id, _)| !a.groups_removed.contains(*id))
        .flat_map(|(_, (_, m))| m.iter().map(String::as_str))
        .filter(|m| !a.users_removed.contains_key(*m))
        .collect();
    // SCIM id of every in-scope user after this batch (for memberships).
    let mut scim_id: HashMap<&str, String> = HashMap::new();
    let deactivate = |u: &store::DirUser, ops: &mut Vec<BatchOp>, sum: &mut Summary| {
        if !u.active {
            return;
        }
        let mut su = SourceUser {
            id: u.external_id.clone().unwrap_or_default(),
            user_name: u.user_name.clone(),
            given_name: u.given_name.clone(),
            family_name: u.family_name.clone(),
            display_name: u.display_name.clone(),
            email: u.email.clone(),
            active: false,
        };
        // The IdP's latest attributes where the round carried them.
        if let Some(latest) = a.users.get(&su.id) {
            su = SourceUser {
                active: false,
                ..latest.clone()
            };
        }
        ops.push(BatchOp::Replace {
            kind: ResourceKind::User,
            id: u.id.clone(),
            attrs: user_doc(&su),
        });
        sum.users_deactivated += 1;
    };

    // Users in scope: create, update, link.
    for ext in &in_scope {
        let described = a.users.get(*ext).or_else(|| fetched.get(*ext));
        match (stored.users.get(ext), described) {
            (Some(u), Some(src)) => {
                scim_id.insert(ext, u.id.clone());
                if !same(u, src) {
                    ops.push(BatchOp::Replace {
                        kind: ResourceKind::User,
                        id: u.id.clone(),
                        attrs: user_doc(src),
                    });
                    if u.active && !src.active {
                        sum.users_deactivated += 1;
                    } else {
                        sum.users_updated += 1;
                    }
                }
            }
            (Some(u), None) => {
                scim_id.insert(ext, u.id.clone());
            }
            (None, Some(src)) => match stored.by_name.get(&src.user_name.to_lowercase()) {
                Some(holder) if holder.external_id.is_none() => {
                    // The same person pushed before pull mode: link, as a push would.
                    scim_id.insert(ext, holder.id.clone());
                    ops.push(BatchOp::Replace {
                        kind: ResourceKind::User,
                        id: holder.id.clone(),
                        attrs: user_doc(src),
                    });
                    sum.users_updated += 1;
                }
                Some(holder) => sum.conflicts.push(format!(
                    "user {ext}: userName '{}' belongs to the user with externalId {}",
                    src.user_name,
                    holder.external_id.as_deref().unwrap_or_default()
                )),
                None => {
                    let id = new_id();
                    scim_id.insert(ext, id.clone());
                    ops.push(BatchOp::Create {
                        kind: ResourceKind::User,
                        id,
                        attrs: user_doc(src),
                        members: None,
                    });
                    sum.users_created += 1;
                }
            },
            // In a group but unknown to the IdP (deleted between two reads): nothing to do.
            (None, None) => {}
        }
    }

    // Stored users of the source that left the scope or were deleted.
    for (ext, u) in &stored.users {
        if in_scope.contains(ext) {
            continue;
        }
        match a.users_removed.get(*ext) {
            Some(true) => {
                ops.push(BatchOp::Delete {
                    kind: ResourceKind::User,
                    id: u.id.clone(),
                });
                sum.users_deleted += 1;
            }
            _ => deactivate(u, &mut ops, &mut sum),
        }
    }

    // Configured groups: create, rename, delete, membership.
    for (ext, (name, members)) in &a.groups {
        let want: BTreeSet<String> = members
            .iter()
            .filter_map(|m| scim_id.get(m.as_str()).cloned())
            .collect();
        match stored.groups.get(ext.as_str()) {
            Some(g) if a.groups_removed.contains(ext) => {
                ops.push(BatchOp::Delete {
                    kind: ResourceKind::Group,
                    id: g.id.clone(),
                });
                sum.groups_deleted += 1;
            }
            Some(g) => {
                if let Some(n) = name
                    && *n != g.display_name
                {
                    if let Some(holder) = stored.group_names.get(&n.to_lowercase())
                        && holder.id != g.id
                    {
                        sum.conflicts.push(format!(
                            "group {ext}: displayName '{n}' belongs to another group"
                        ));
                    } else {
                        ops.push(BatchOp::Replace {
                            kind: ResourceKind::Group,
                            id: g.id.clone(),
                            attrs: group_doc(ext, n),
                        });
                        sum.groups_updated += 1;
                    }
                }
                let have: BTreeSet<String> = g
                    .members
                    .iter()
                    .filter(|m| stored.ext_of.contains_key(m.value.as_str()))
                    .map(|m| m.value.clone())
                    .collect();
                let add: Vec<NewMember> = want
                    .difference(&have)
                    .map(|id| NewMember {
                        value: id.clone(),
                        ty: Some(store::MemberType::User),
                        display: None,
                    })
                    .collect();
                let remove: Vec<String> = have.difference(&want).cloned().collect();
                sum.members_added += add.len();
                sum.members_removed += remove.len();
                let mut changes = vec![];
                if !add.is_empty() {
                    changes.push(MembershipChange::Add(add));
                }
                if !remove.is_empty() {
                    changes.push(MembershipChange::Remove(remove));
                }
                if !changes.is_empty() {
                    ops.push(BatchOp::Members {
                        id: g.id.clone(),
                        changes,
                    });
                }
            }
            None if a.groups_removed.contains(ext) => {}
            None => {
                let Some(n) = name else {
                    // Never read (the IdP did not list it): nothing to create yet.
                    continue;
                };
                if stored.group_names.contains_key(&n.to_lowercase()) {
                    sum.conflicts.push(format!(
                        "group {ext}: displayName '{n}' belongs to another group"
                    ));
                    continue;
                }
                sum.members_added += want.len();
                ops.push(BatchOp::Create {
                    kind: ResourceKind::Group,
                    id: new_id(),
                    attrs: group_doc(ext, n),
                    members: Some(
                        want.into_iter()
                            .map(|id| NewMember {
                                value: id,
                                ty: Some(store::MemberType::User),
                                display: None,
                            })
                            .collect(),
                    ),
                });
                sum.groups_created += 1;
            }
        }
    }
    (ops, sum)
}

/// Errors of applying a round.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// Reading a user from the IdP failed.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The store refused the batch (nothing of it was written).
    #[error("the store refused the round: {0}")]
    Store(#[from] store::StoreError),
}

/// Plans `round` against the store, reads the users it needs from `source`, and writes the
/// changes, the `source.sync` audit event that sums them up (when anything changed, the round
/// was full, or something conflicted) and the round's cursor under `cursor_key` in one
/// transaction. Returns the summary and the user reads it made.
pub async fn apply_round(
    store: &DynStore,
    source: &dyn Source,
    scope: &[String],
    round: &Round,
    cursor_key: &str,
    ctx: &WriteCtx,
) -> Result<(Summary, u64), ApplyError> {
    let dir = store.directory().await?;
    let mut fetched = HashMap::new();
    let missing = to_fetch(&dir, scope, round);
    let reads = missing.len() as u64;
    for id in missing {
        if let Some(u) = source.user(&id).await? {
            fetched.insert(id, u);
        }
    }
    let (mut ops, summary) = plan(&dir, scope, round, &fetched, || {
        uuid::Uuid::new_v4().to_string()
    });
    if !summary.is_empty() || round.full || !summary.conflicts.is_empty() {
        ops.push(BatchOp::Audit(sync_event(
            source.kind(),
            round,
            &summary,
            reads,
        )));
    }
    store
        .write_batch(ctx, &ops, Some((cursor_key, &round.cursor)))
        .await?;
    Ok((summary, reads))
}

/// The `source.sync` audit event of a round: the source, whether it was full and why, the
/// requests, what changed, and a digest of the position (the cursor itself can carry the IdP's
/// paging tokens).
fn sync_event(kind: &str, round: &Round, summary: &Summary, reads: u64) -> store::AuditEntry {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(round.cursor.as_bytes());
    let position: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    store::AuditEntry::success(
        "Source",
        kind,
        "source.sync",
        json!({
            "source": kind,
            "full": round.full,
            "resync_reason": round.resync_reason,
            "requests": round.requests + reads,
            "changes": round.changes.len(),
            "position": position,
            "summary": summary,
        }),
    )
}
