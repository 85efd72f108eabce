//! The worker's cached TeamCity state and the part of it an outbox pass works on.
//!
//! An outbox pass plans only what its rows touch ([`crate::plan::Scope`]). To cost O(change)
//! it must not even look at the rest of the cache: [`Cached`] keeps, beside the state, an
//! index (users by id, SCIM id and username, groups by key, members by group key) built once
//! per cache load; [`Cached::extract`] copies out the objects a scoped plan needs, the pass
//! plans and applies against that small [`ActualState`] (recording each accepted step in it),
//! and [`Cached::write_back`] puts it back, keeping the index right.
//!
//! Every other use of the cache goes through `DerefMut` to the whole [`ActualState`] (the
//! reconcile, a whole pass): that drops the index, so it can never disagree with the state; the
//! next scoped pass builds it again.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ops::{Deref, DerefMut};

use crate::desired::Desired;
use crate::model::{ActualGroup, ActualState, ActualUser};
use crate::plan::Scope;

/// The cached TeamCity state with its index.
#[derive(Debug, Clone, Default)]
pub struct Cached {
    state: ActualState,
    index: Option<Index>,
}

#[derive(Debug, Clone, Default)]
struct Index {
    user_at: HashMap<u64, usize>,
    by_scim: HashMap<Box<str>, Ids>,
    by_username: HashMap<Box<str>, Ids>,
    group_at: HashMap<String, usize>,
    members: HashMap<String, HashSet<u64>>,
    managed_users: usize,
}

impl Index {
    fn build(state: &ActualState) -> Index {
        let mut ix = Index::default();
        for (i, u) in state.users.iter().enumerate() {
            ix.add_user(i, u);
        }
        for (i, g) in state.groups.iter().enumerate() {
            ix.group_at.insert(g.key.clone(), i);
        }
        ix
    }

    fn add_user(&mut self, at: usize, u: &ActualUser) {
        self.user_at.insert(u.id, at);
        if let Some(s) = &u.scim_id {
            insert_into(&mut self.by_scim, s, u.id);
            self.managed_users += 1;
        }
        insert_into(&mut self.by_username, &u.username, u.id);
        for g in &u.groups {
            self.members.entry(g.to_owned()).or_default().insert(u.id);
        }
    }

    fn remove_user(&mut self, u: &ActualUser) {
        self.user_at.remove(&u.id);
        if let Some(s) = &u.scim_id {
            remove_from(&mut self.by_scim, s, u.id);
            self.managed_users -= 1;
        }
        remove_from(&mut self.by_username, &u.username, u.id);
        for g in &u.groups {
            if let Some(m) = self.members.get_mut(g) {
                m.remove(&u.id);
                if m.is_empty() {
                    self.members.remove(g);
                }
            }
        }
    }
}

/// The users under one key of an index (a SCIM id, a username): almost always one, kept
/// inline — a set per key cost a tree node per user (about a fifth of the index at 100,000
/// users).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ids {
    One(u64),
    Many(BTreeSet<u64>),
}

impl Ids {
    fn len(&self) -> usize {
        match self {
            Ids::One(_) => 1,
            Ids::Many(set) => set.len(),
        }
    }

    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let (one, many) = match self {
            Ids::One(id) => (Some(*id), None),
            Ids::Many(set) => (None, Some(set.iter().copied())),
        };
        one.into_iter().chain(many.into_iter().flatten())
    }
}

fn insert_into(map: &mut HashMap<Box<str>, Ids>, key: &str, id: u64) {
    match map.get_mut(key) {
        None => {
            map.insert(key.into(), Ids::One(id));
        }
        Some(Ids::One(other)) if *other == id => {}
        Some(ids @ Ids::One(_)) => {
            let Ids::One(other) = *ids else { return };
            *ids = Ids::Many([other, id].into());
        }
        Some(Ids::Many(set)) => {
            set.insert(id);
        }
    }
}

fn remove_from(map: &mut HashMap<Box<str>, Ids>, key: &str, id: u64) {
    let Some(ids) = map.get_mut(key) else { return };
    match ids {
        Ids::One(other) => {
            if *other == id {
                map.remove(key);
            }
        }
        Ids::Many(set) => {
            set.remove(&id);
            match set.len() {
                0 => {
                    map.remove(key);
                }
                1 => {
                    let last = set.iter().copied().next().unwrap_or(id);
                    *ids = Ids::One(last);
                }
                _ => {}
            }
        }
    }
}

impl Deref for Cached {
    type Target = ActualState;
    fn deref(&self) -> &ActualState {
        &self.state
    }
}

impl DerefMut for Cached {
    /// Whole-state access may change anything: the index is dropped (built again when a scoped
    /// pass needs it).
    fn deref_mut(&mut self) -> &mut ActualState {
        self.index = None;
        &mut self.state
    }
}

impl From<ActualState> for Cached {
    fn from(state: ActualState) -> Self {
        Cached { state, index: None }
    }
}

/// The part of the cache a scoped pass took out (see [`Cached::extract`]).
#[derive(Debug)]
pub struct Part {
    /// The objects, as a state of their own: plan and apply against it.
    pub actual: ActualState,
    /// Managed users in the whole cache (the guard's percentage is of all of them).
    pub managed_users: usize,
    users: BTreeSet<u64>,
    groups: BTreeSet<String>,
}

impl Cached {
    /// Copies out what a plan of `desired` limited to `scope` needs: the TeamCity users of the
    /// users in scope (by SCIM id) and those holding their usernames; every member of the
    /// groups in scope (members added by hand carried by a rename swap; whoever a delete or a
    /// role removal costs access, for the guard); every group of those users; every group
    /// (all generations) of the desired groups; the groups holding the names of the groups in
    /// scope. Costs what it copies (after the index is built once per cache load).
    pub fn extract(&mut self, desired: &Desired, scope: &Scope) -> Part {
        let Cached { state, index } = self;
        let state: &ActualState = state;
        let ix: &Index = index.get_or_insert_with(|| Index::build(state));
        let mut users: BTreeSet<u64> = BTreeSet::new();
        for s in scope.users.iter().chain(desired.users.keys()) {
            users.extend(ix.by_scim.get(s.as_str()).into_iter().flat_map(Ids::iter));
        }
        for d in desired.users.values() {
            users.extend(
                ix.by_username
                    .get(d.username.as_str())
                    .into_iter()
                    .flat_map(Ids::iter),
            );
        }
        let mut markers: BTreeSet<&str> = scope.groups.iter().map(String::as_str).collect();
        markers.extend(desired.groups.keys().map(String::as_str));
        let names: BTreeSet<&str> = desired
            .groups
            .values()
            .filter(|g| scope.groups.contains(&g.marker))
            .map(|g| g.name.as_str())
            .collect();
        // Groups are a tenth of the users at most: one look at each is cheap.
        let mut groups: BTreeSet<String> = BTreeSet::new();
        for g in &state.groups {
            let marker = g.marker.as_deref();
            if marker.is_some_and(|m| markers.contains(m)) || names.contains(g.name.as_str()) {
                groups.insert(g.key.clone());
            }
        }
        for g in &state.groups {
            if g.marker
                .as_deref()
                .is_some_and(|m| scope.groups.contains(m))
            {
                users.extend(ix.members.get(&g.key).into_iter().flatten());
            }
        }
        let mut part_users = Vec::with_capacity(users.len());
        for id in &users {
            if let Some(&at) = ix.user_at.get(id) {
                let u = &state.users[at];
                groups.extend(u.groups.iter().map(str::to_owned));
                part_users.push(u.clone());
            }
        }
        let part_groups: Vec<ActualGroup> = groups
            .iter()
            .filter_map(|k| ix.group_at.get(k).map(|&at| state.groups[at].clone()))
            .collect();
        let groups: BTreeSet<String> = part_groups.iter().map(|g| g.key.clone()).collect();
        Part {
            actual: ActualState {
                users: part_users,
                groups: part_groups,
                all_users_roles: state.all_users_roles.clone(),
                read_failures: state
                    .read_failures
                    .iter()
                    .filter(|f| users.contains(&f.user))
                    .cloned()
                    .collect(),
            },
            managed_users: ix.managed_users,
            users,
            groups,
        }
    }

    /// Builds the index if the cache has none (once per cache load; the worker does it while
    /// idle).
    pub fn warm(&mut self) {
        if self.index.is_none() {
            self.index = Some(Index::build(&self.state));
        }
    }

    /// The markers among `markers` that TeamCity holds a group for.
    pub fn markers_held(&self, markers: &BTreeSet<String>) -> BTreeSet<String> {
        if markers.is_empty() {
            return BTreeSet::new();
        }
        self.state
            .groups
            .iter()
            .filter_map(|g| g.marker.as_ref())
            .filter(|m| markers.contains(*m))
            .cloned()
            .collect()
    }

    /// The SCIM ids of the managed TeamCity members of the groups with these markers (every
    /// generation).
    pub fn member_scim_ids(&mut self, markers: &BTreeSet<String>) -> BTreeSet<String> {
        if markers.is_empty() {
            return BTreeSet::new();
        }
        let Cached { state, index } = self;
        let ix: &Index = index.get_or_insert_with(|| Index::build(state));
        state
            .groups
            .iter()
            .filter(|g| g.marker.as_ref().is_some_and(|m| markers.contains(m)))
            .flat_map(|g| ix.members.get(&g.key).into_iter().flatten())
            .filter_map(|id| ix.user_at.get(id))
            .filter_map(|&at| state.users[at].scim_id.clone())
            .collect()
    }

    /// Splits `members` (SCIM ids of members of groups planned whole, in the directory or in
    /// TeamCity) into those planned whole, added to `users`, and the *context members* it
    /// returns ([`crate::plan::Scope`]): without caps (`capped` false), a member TeamCity holds
    /// exactly once, not marked deactivated, is planned only in the groups planned whole, so
    /// neither its other groups nor their members need reading. The others are planned whole
    /// (created, reactivated, their duplicates settled, their caps applied), which needs all
    /// their groups.
    pub fn split_members(
        &mut self,
        users: &mut BTreeSet<String>,
        members: BTreeSet<String>,
        capped: bool,
    ) -> BTreeSet<String> {
        let Cached { state, index } = self;
        let ix: &Index = index.get_or_insert_with(|| Index::build(state));
        let (context, whole): (BTreeSet<String>, BTreeSet<String>) = members
            .into_iter()
            .filter(|m| !users.contains(m))
            .partition(|m| {
                !capped
                    && ix.by_scim.get(m.as_str()).is_some_and(|found| {
                        found.len() == 1
                            && found
                                .iter()
                                .filter_map(|id| ix.user_at.get(&id))
                                .all(|&at| !state.users[at].deactivated)
                    })
            });
        users.extend(whole);
        context
    }

    /// Puts a part back after its pass: its users and groups replace theirs in the cache
    /// (users and groups the pass created are added, those it deleted removed, a deleted
    /// group's key taken off every member). The index follows.
    pub fn write_back(&mut self, part: Part) {
        let Cached { state, index } = self;
        let ix = index.get_or_insert_with(|| Index::build(state));
        let after_users: BTreeSet<u64> = part.actual.users.iter().map(|u| u.id).collect();
        let after_groups: BTreeSet<String> =
            part.actual.groups.iter().map(|g| g.key.clone()).collect();
        // Deleted users.
        for id in part.users.difference(&after_users) {
            if let Some(at) = ix.user_at.get(id).copied() {
                let gone = state.users.swap_remove(at);
                ix.remove_user(&gone);
                if let Some(moved) = state.users.get(at) {
                    ix.user_at.insert(moved.id, at);
                }
            }
        }
        // Deleted groups: off every member, then out.
        for key in part.groups.difference(&after_groups) {
            for id in ix.members.remove(key).unwrap_or_default() {
                if let Some(&at) = ix.user_at.get(&id) {
                    state.users[at].groups.remove(key);
                }
            }
            if let Some(at) = ix.group_at.remove(key) {
                state.groups.swap_remove(at);
                if let Some(moved) = state.groups.get(at) {
                    ix.group_at.insert(moved.key.clone(), at);
                }
            }
        }
        for g in part.actual.groups {
            match ix.group_at.get(&g.key) {
                Some(&at) => state.groups[at] = g,
                None => {
                    ix.group_at.insert(g.key.clone(), state.groups.len());
                    state.groups.push(g);
                }
            }
        }
        for u in part.actual.users {
            match ix.user_at.get(&u.id).copied() {
                Some(at) => {
                    let old = std::mem::replace(&mut state.users[at], u);
                    ix.remove_user(&old);
                    ix.add_user(at, &state.users[at]);
                }
                None => {
                    let at = state.users.len();
                    ix.add_user(at, &u);
                    state.users.push(u);
                }
            }
        }
    }
}

/// The scope of a pass that read `dir` for `users` (planned whole), the groups `groups`
/// (planned whole) and the `context` members ([`Cached::split_members`]; the store also reads
/// the groups' members beyond `users` as context). A context member the directory no longer
/// has, or has inactive, is planned whole: it loses every access whatever its groups are.
pub fn scope_for(
    users: BTreeSet<String>,
    groups: BTreeSet<String>,
    dir: &crate::model::Directory,
    context: &BTreeSet<String>,
) -> Scope {
    let mut scope = Scope { users, groups };
    scope
        .users
        .extend(dir.users.iter().filter(|u| !u.active).map(|u| u.id.clone()));
    let read: BTreeSet<&str> = dir.users.iter().map(|u| u.id.as_str()).collect();
    scope.users.extend(
        context
            .iter()
            .filter(|c| !read.contains(c.as_str()))
            .cloned(),
    );
    scope
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Action, UserRef};

    fn user(id: u64, scim: Option<&str>, name: &str, groups: &[&str]) -> ActualUser {
        ActualUser {
            id,
            username: name.into(),
            scim_id: scim.map(str::to_owned),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..ActualUser::default()
        }
    }

    fn group(key: &str, marker: Option<&str>, name: &str) -> ActualGroup {
        ActualGroup {
            key: key.into(),
            name: name.into(),
            marker: marker.map(str::to_owned),
            ..ActualGroup::default()
        }
    }

    fn state() -> ActualState {
        ActualState {
            users: vec![
                user(1, Some("a"), "ann", &["K_G1"]),
                user(2, Some("b"), "bob", &["K_G1", "K_G2"]),
                user(3, None, "hand", &["K_G1"]),
                user(4, Some("c"), "cat", &["K_G2"]),
                user(5, None, "dan", &[]),
            ],
            groups: vec![
                group("K_G1", Some("g1"), "One"),
                group("K_G2", Some("g2"), "Two"),
                group("HAND", None, "Made by hand"),
            ],
            ..ActualState::default()
        }
    }

    fn desired_user(scim: &str, username: &str) -> crate::desired::DesiredUser {
        crate::desired::DesiredUser {
            scim_id: scim.into(),
            username: username.into(),
            name: None,
            email: None,
            active: true,
            roles: BTreeSet::new(),
        }
    }

    /// A key's ids stay inline while there is one, become a set with a second (two TeamCity
    /// users folded to one username, say) and go back inline, then away, as they leave.
    #[test]
    fn index_keys_hold_one_id_inline_and_more_in_a_set() {
        let mut map = HashMap::new();
        insert_into(&mut map, "ann", 7);
        insert_into(&mut map, "ann", 7);
        assert_eq!(map.get("ann"), Some(&Ids::One(7)));
        insert_into(&mut map, "ann", 9);
        assert_eq!(map.get("ann"), Some(&Ids::Many([7, 9].into())));
        assert_eq!(map["ann"].iter().collect::<Vec<_>>(), [7, 9]);
        remove_from(&mut map, "ann", 7);
        assert_eq!(map.get("ann"), Some(&Ids::One(9)));
        remove_from(&mut map, "ann", 7);
        assert_eq!(
            map.get("ann"),
            Some(&Ids::One(9)),
            "another id: nothing removed"
        );
        remove_from(&mut map, "ann", 9);
        assert!(map.is_empty());
    }

    /// Whatever a pass does to its part, the cache after write-back equals the whole state
    /// with the same steps recorded on it, and the index agrees with a fresh one.
    #[test]
    fn a_part_written_back_equals_the_steps_recorded_on_the_whole() {
        let mut desired = Desired::default();
        desired.users.insert("b".into(), desired_user("b", "bob"));
        desired.users.insert("n".into(), desired_user("n", "dan"));
        let scope = Scope {
            users: BTreeSet::from(["b".to_owned(), "n".to_owned(), "gone".to_owned()]),
            groups: BTreeSet::from(["g1".to_owned()]),
        };
        let mut cached = Cached::from(state());
        let part = cached.extract(&desired, &scope);
        let ids: BTreeSet<u64> = part.actual.users.iter().map(|u| u.id).collect();
        // b by SCIM id, dan by username, every member of g1 (ann, bob, hand by hand); not cat.
        assert_eq!(ids, BTreeSet::from([1, 2, 3, 5]));
        let keys: BTreeSet<&str> = part.actual.groups.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(keys, BTreeSet::from(["K_G1", "K_G2"]));
        assert_eq!(part.managed_users, 3);

        let steps = vec![
            Action::DeleteGroup { key: "K_G1".into() },
            Action::CreateGroup {
                key: "K_G1_1".into(),
                name: "Uno".into(),
                marker: "g1".into(),
                roles: vec![],
                members: vec![UserRef::Id(1), UserRef::Id(3)],
                replaces: Some("K_G1".into()),
            },
            Action::RemoveFromGroup {
                user: 2,
                group: "K_G2".into(),
            },
            Action::CreateUser {
                scim_id: "new".into(),
                username: "neo".into(),
                name: None,
                email: None,
                groups: vec!["K_G2".into()],
            },
            Action::DeleteUser { user: 5 },
        ];
        let created = std::collections::BTreeMap::from([("new".to_owned(), 9)]);
        let mut part = part;
        part.actual.record_all(&steps, &created);
        cached.write_back(part);

        let mut whole = state();
        whole.record_all(&steps, &created);
        let sort = |s: &ActualState| {
            let mut s = s.clone();
            s.users.sort_by_key(|u| u.id);
            s.groups.sort_by(|a, b| a.key.cmp(&b.key));
            s
        };
        assert_eq!(sort(&cached), sort(&whole));
        let fresh = Index::build(&cached.state);
        let ix = cached.index.as_ref().expect("index kept");
        assert_eq!(ix.user_at, fresh.user_at);
        assert_eq!(ix.by_scim, fresh.by_scim);
        assert_eq!(ix.by_username, fresh.by_username);
        assert_eq!(ix.group_at, fresh.group_at);
        assert_eq!(ix.members, fresh.members);
        assert_eq!(ix.managed_users, fresh.managed_users);
    }

    #[test]
    fn whole_state_access_drops_the_index() {
        let mut cached = Cached::from(state());
        let _ = cached.extract(&Desired::default(), &Scope::default());
        assert!(cached.index.is_some());
        let _: &ActualState = &cached;
        assert!(cached.index.is_some(), "reading keeps it");
        let whole: &mut ActualState = &mut cached;
        whole.users.clear();
        assert!(cached.index.is_none(), "a whole-state change drops it");
    }
}
