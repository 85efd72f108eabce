//! The worker's cached TeamCity state and the part of it an outbox pass works on.
//!
//! An outbox pass plans only what its rows touch ([`crate::plan::Scope`]). To cost O(change)
//! it must not even look at the rest of the cache: between passes [`Cached`] holds the state
//! as a [`Compact`] (one small record per user, lookups by id, SCIM id and username, members
//! by group), built once per cache load; [`Cached::extract`] copies out the objects a scoped
//! plan needs, the pass plans and applies against that small [`ActualState`] (recording each
//! accepted step in it), and [`Cached::write_back`] puts it back.
//!
//! The reconcile and a whole pass work on the whole [`ActualState`] ([`Cached::whole`]); the
//! worker compacts it again when idle ([`Cached::warm`]).

use std::collections::BTreeSet;

use crate::compact::Compact;
use crate::desired::Desired;
use crate::model::{ActualGroup, ActualState, ActualUser};
use crate::plan::Scope;

/// The cached TeamCity state: whole after a read or a whole pass, compact between passes.
#[derive(Debug, Clone)]
pub struct Cached {
    repr: Repr,
}

#[derive(Debug, Clone)]
enum Repr {
    Whole(ActualState),
    Compact(Box<Compact>),
}

impl Default for Cached {
    fn default() -> Self {
        ActualState::default().into()
    }
}

impl From<ActualState> for Cached {
    fn from(state: ActualState) -> Self {
        Cached {
            repr: Repr::Whole(state),
        }
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
    /// The whole state, to plan or change as a whole (a compact state is expanded first).
    pub fn whole(&mut self) -> &mut ActualState {
        if let Repr::Compact(c) = &mut self.repr {
            let state = std::mem::take(&mut **c).into_state();
            self.repr = Repr::Whole(state);
        }
        match &mut self.repr {
            Repr::Whole(state) => state,
            Repr::Compact(_) => unreachable!("expanded above"),
        }
    }

    fn compact(&mut self) -> &mut Compact {
        if let Repr::Whole(state) = &mut self.repr {
            let mut c = Compact::from_state(std::mem::take(state));
            c.shrink();
            self.repr = Repr::Compact(Box::new(c));
        }
        match &mut self.repr {
            Repr::Compact(c) => c,
            Repr::Whole(_) => unreachable!("compacted above"),
        }
    }

    /// Compacts the state if it is whole (once per cache load or whole pass; the worker does
    /// it while idle).
    pub fn warm(&mut self) {
        self.compact();
    }

    /// Whether the state is held compactly.
    pub fn is_compact(&self) -> bool {
        matches!(self.repr, Repr::Compact(_))
    }

    /// The group with this key.
    pub fn group(&self, key: &str) -> Option<&ActualGroup> {
        match &self.repr {
            Repr::Whole(state) => state.group(key),
            Repr::Compact(c) => c.group(key),
        }
    }

    /// Managed users.
    pub fn managed_users(&self) -> usize {
        match &self.repr {
            Repr::Whole(state) => state.managed_users(),
            Repr::Compact(c) => c.managed_users(),
        }
    }

    fn groups(&self) -> &[ActualGroup] {
        match &self.repr {
            Repr::Whole(state) => &state.groups,
            Repr::Compact(c) => &c.groups,
        }
    }

    /// Copies out what a plan of `desired` limited to `scope` needs: the TeamCity users of the
    /// users in scope (by SCIM id) and those holding their usernames; every member of the
    /// groups in scope (members added by hand carried by a rename swap; whoever a delete or a
    /// role removal costs access, for the guard); every group (all generations) of the
    /// desired groups; the groups holding the names of the groups in scope; every group of
    /// the users planned whole. A user the plan reads only in the groups planned whole (a
    /// context member, a member the pass leaves alone) comes with the part's groups only:
    /// its other groups, and their records, stay in the cache. Costs what it copies (after
    /// the state is compacted once per cache load).
    pub fn extract(&mut self, desired: &Desired, scope: &Scope) -> Part {
        let c: &Compact = self.compact();
        let mut slots: BTreeSet<u32> = BTreeSet::new();
        for s in scope.users.iter().chain(desired.users.keys()) {
            slots.extend(c.slots_by_scim(s));
        }
        for d in desired.users.values() {
            slots.extend(c.slots_by_username(&d.username));
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
        for g in &c.groups {
            let marker = g.marker.as_deref();
            if marker.is_some_and(|m| markers.contains(m)) || names.contains(g.name.as_str()) {
                groups.insert(g.key.clone());
            }
            if marker.is_some_and(|m| scope.groups.contains(m)) {
                slots.extend(c.members_of(&g.key));
            }
        }
        let mut part_users: Vec<_> = slots.iter().filter_map(|&s| c.user(s)).collect();
        part_users.sort_by_key(|u| u.id);
        // Who the plan reads only in the groups planned whole (`plan::Scope`): a context
        // member (in the desired state, active, held once, not in scope) and a TeamCity user
        // the pass leaves alone (a managed one the desired state lacks, an unmanaged one no
        // user in scope could adopt). Anyone else is planned whole, with every group.
        let adoptable: BTreeSet<&str> = desired
            .users
            .values()
            .filter(|d| scope.users.contains(&d.scim_id))
            .map(|d| d.username.as_str())
            .collect();
        let only_in_scope = |u: &ActualUser| match u.scim_id.as_deref() {
            Some(s) => {
                !scope.users.contains(s)
                    && desired
                        .users
                        .get(s)
                        .is_none_or(|d| d.active && c.slots_by_scim(s).nth(1).is_none())
            }
            None => !adoptable.contains(u.username.as_str()),
        };
        let read_whole: Vec<bool> = part_users.iter().map(|u| !only_in_scope(u)).collect();
        for (u, _) in part_users.iter().zip(&read_whole).filter(|(_, w)| **w) {
            groups.extend(u.groups.iter().map(str::to_owned));
        }
        let users: BTreeSet<u64> = part_users.iter().map(|u| u.id).collect();
        let part_groups: Vec<ActualGroup> =
            groups.iter().filter_map(|k| c.group(k).cloned()).collect();
        let groups: BTreeSet<String> = part_groups.iter().map(|g| g.key.clone()).collect();
        // The others come with the part's groups only; `write_back` gives the rest back.
        for (u, _) in part_users.iter_mut().zip(&read_whole).filter(|(_, w)| !**w) {
            u.groups.retain(|k| groups.contains(k));
        }
        Part {
            actual: ActualState {
                users: part_users,
                groups: part_groups,
                all_users_roles: c.all_users_roles.clone(),
                read_failures: c
                    .read_failures
                    .iter()
                    .filter(|f| users.contains(&f.user))
                    .cloned()
                    .collect(),
            },
            managed_users: c.managed_users(),
            users,
            groups,
        }
    }

    /// The markers among `markers` that TeamCity holds a group for.
    pub fn markers_held(&self, markers: &BTreeSet<String>) -> BTreeSet<String> {
        if markers.is_empty() {
            return BTreeSet::new();
        }
        self.groups()
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
        let c: &Compact = self.compact();
        c.groups
            .iter()
            .filter(|g| g.marker.as_ref().is_some_and(|m| markers.contains(m)))
            .flat_map(|g| c.members_of(&g.key))
            .filter_map(|s| c.scim_id(s))
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
        let c: &Compact = self.compact();
        let (context, whole): (BTreeSet<String>, BTreeSet<String>) = members
            .into_iter()
            .filter(|m| !users.contains(m))
            .partition(|m| {
                if capped {
                    return false;
                }
                let mut found = c.slots_by_scim(m);
                match (found.next(), found.next()) {
                    (Some(slot), None) => !c.deactivated(slot),
                    _ => false,
                }
            });
        users.extend(whole);
        context
    }

    /// Puts a part back after its pass: its users and groups replace theirs in the cache
    /// (users and groups the pass created are added, those it deleted removed, a deleted
    /// group's key taken off every member). A user keeps the groups the part did not hold.
    pub fn write_back(&mut self, part: Part) {
        let c = self.compact();
        let after_users: BTreeSet<u64> = part.actual.users.iter().map(|u| u.id).collect();
        let after_groups: BTreeSet<String> =
            part.actual.groups.iter().map(|g| g.key.clone()).collect();
        for id in part.users.difference(&after_users) {
            if let Some(slot) = c.slot_of(*id) {
                c.remove_user(slot);
            }
        }
        for key in part.groups.difference(&after_groups) {
            c.remove_group(key);
        }
        for g in part.actual.groups {
            c.put_group(g);
        }
        for u in part.actual.users {
            c.put_back(u, |k| part.groups.contains(k));
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
pub(crate) mod tests {
    use super::*;
    use crate::model::{Action, ActualUser, UserRef};

    /// A TeamCity user with these fields, the rest default.
    pub(crate) fn user(id: u64, scim: Option<&str>, name: &str, groups: &[&str]) -> ActualUser {
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

    /// Whatever a pass does to its part, the cache after write-back equals the whole state
    /// with the same steps recorded on it, and its lookups agree with a fresh load.
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
            // Bob renamed: his lookups move.
            Action::UpdateUser {
                user: 2,
                changes: vec![crate::model::FieldChange {
                    field: crate::model::Field::Username,
                    from: Some("bob".into()),
                    to: Some("robert".into()),
                }],
            },
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
        // The lookups of the compact state after write-back find what a fresh load finds.
        let mut fresh = Cached::from(whole.clone());
        let again = cached.extract(&desired, &scope);
        let from_fresh = fresh.extract(&desired, &scope);
        assert_eq!(sort(&again.actual), sort(&from_fresh.actual));
        assert_eq!(again.managed_users, from_fresh.managed_users);
        assert_eq!(sort(cached.whole()), sort(&whole));
    }

    /// A pass planning group g2 reads its members as context members: with only the groups
    /// the part holds (not g1), and their other groups survive the write-back.
    #[test]
    fn context_members_come_without_their_other_groups_and_keep_them_after_the_pass() {
        let mut desired = Desired::default();
        desired.users.insert("b".into(), desired_user("b", "bob"));
        desired.users.insert("c".into(), desired_user("c", "cat"));
        desired.groups.insert(
            "g2".into(),
            crate::desired::DesiredGroup {
                marker: "g2".into(),
                name: "Two".into(),
                roles: BTreeSet::new(),
                rules: vec![],
                members: BTreeSet::from(["b".to_owned()]),
                fixed_key: None,
            },
        );
        let scope = Scope {
            users: BTreeSet::new(),
            groups: BTreeSet::from(["g2".to_owned()]),
        };
        let mut cached = Cached::from(state());
        let mut part = cached.extract(&desired, &scope);
        let keys: BTreeSet<&str> = part.actual.groups.iter().map(|g| g.key.as_str()).collect();
        assert_eq!(keys, BTreeSet::from(["K_G2"]));
        let bob = part.actual.users.iter().find(|u| u.id == 2).expect("bob");
        assert_eq!(bob.groups.iter().collect::<Vec<_>>(), ["K_G2"]);

        let steps = vec![
            Action::RemoveFromGroup {
                user: 4,
                group: "K_G2".into(),
            },
            Action::RemoveFromGroup {
                user: 2,
                group: "K_G2".into(),
            },
        ];
        let none = std::collections::BTreeMap::new();
        part.actual.record_all(&steps, &none);
        cached.write_back(part);
        let mut whole = state();
        whole.record_all(&steps, &none);
        let mut got = cached.whole().clone();
        got.users.sort_by_key(|u| u.id);
        got.groups.sort_by(|a, b| a.key.cmp(&b.key));
        whole.groups.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(got, whole, "bob keeps K_G1");
    }

    #[test]
    fn whole_access_expands_the_state_and_warm_compacts_it_again() {
        let mut cached = Cached::from(state());
        assert!(!cached.is_compact());
        let _ = cached.extract(&Desired::default(), &Scope::default());
        assert!(cached.is_compact(), "a scoped pass compacts it");
        assert_eq!(cached.group("K_G2").map(|g| g.name.as_str()), Some("Two"));
        assert_eq!(cached.managed_users(), 3);
        let whole: &mut ActualState = cached.whole();
        whole.users.retain(|u| u.id != 2);
        assert!(!cached.is_compact());
        assert_eq!(cached.managed_users(), 2);
        cached.warm();
        assert!(cached.is_compact());
        let mut expected = state();
        expected.users.retain(|u| u.id != 2);
        let sort = |s: &mut ActualState| s.users.sort_by_key(|u| u.id);
        let mut got = cached.whole().clone();
        sort(&mut got);
        sort(&mut expected);
        assert_eq!(got, expected);
    }
}
