//! The cached TeamCity state, held compactly between passes.
//!
//! At 100,000 users the state as [`ActualState`] (a struct of strings, sets and boxed keys per
//! user) and its index (maps keyed by owned strings) took about 140 MB: most of `serve`'s
//! memory. [`Compact`] holds the same facts in about a fifth of that:
//!
//! - a user is one [`Slim`]: its strings in one allocation, its SCIM id as 16 bytes when it is a
//!   UUID (ours always are), its groups as numbers into one table of group keys, the rare
//!   (direct roles, a token count) boxed apart;
//! - the lookups (by TeamCity id, SCIM id, username) are hash tables of slot numbers that hash
//!   and compare through the user they point at, so no key is stored twice;
//! - the members of each group are a sorted list of slot numbers.
//!
//! A slot never moves while its user is there (a removed user leaves a free slot the next
//! insertion takes), so nothing else needs fixing when users come and go. The state is given
//! out as [`ActualUser`]s one at a time ([`Compact::user`]) or whole ([`Compact::into_state`]).

use std::collections::{BTreeSet, HashMap};
use std::hash::{BuildHasher, RandomState};

use hashbrown::HashTable;
use uuid::Uuid;

use crate::model::{ActualGroup, ActualState, ActualUser, ReadFailure, RoleAt};

const HAS_NAME: u8 = 1;
const HAS_EMAIL: u8 = 2;
/// The SCIM id is the text after the email (not a UUID in its canonical form).
const SCIM_TEXT: u8 = 4;
const DEACTIVATED: u8 = 8;

/// What few users have: direct roles, a token count.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Rare {
    roles: BTreeSet<RoleAt>,
    token_count: Option<u64>,
}

/// One cached TeamCity user.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slim {
    id: u64,
    /// Username, name, email and a SCIM id that is not a UUID, one after the other.
    text: Box<str>,
    /// Where the username, the name and the email end in `text`.
    ends: [u32; 3],
    uuid: Option<Uuid>,
    flags: u8,
    /// Key numbers ([`Keys`]) of the direct groups.
    groups: Box<[u32]>,
    rare: Option<Box<Rare>>,
}

/// Fits a SCIM id in 16 bytes when it reads back the same.
fn as_uuid(scim: &str) -> Option<Uuid> {
    let u = Uuid::try_parse(scim).ok()?;
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    (u.hyphenated().encode_lower(&mut buf) == scim).then_some(u)
}

impl Slim {
    fn new(u: ActualUser, keys: &mut Keys, hasher: &RandomState) -> Slim {
        let uuid = u.scim_id.as_deref().and_then(as_uuid);
        let mut flags = 0;
        let mut text = String::with_capacity(
            u.username.len()
                + u.name.as_ref().map_or(0, String::len)
                + u.email.as_ref().map_or(0, String::len)
                + if uuid.is_none() {
                    u.scim_id.as_ref().map_or(0, String::len)
                } else {
                    0
                },
        );
        text.push_str(&u.username);
        let end_username = text.len();
        if let Some(name) = &u.name {
            flags |= HAS_NAME;
            text.push_str(name);
        }
        let end_name = text.len();
        if let Some(email) = &u.email {
            flags |= HAS_EMAIL;
            text.push_str(email);
        }
        let end_email = text.len();
        if let (Some(scim), None) = (&u.scim_id, uuid) {
            flags |= SCIM_TEXT;
            text.push_str(scim);
        }
        if u.deactivated {
            flags |= DEACTIVATED;
        }
        let mut groups: Vec<u32> = u.groups.iter().map(|k| keys.intern(k, hasher)).collect();
        groups.sort_unstable();
        let rare = (!u.roles.is_empty() || u.token_count.is_some()).then(|| {
            Box::new(Rare {
                roles: u.roles,
                token_count: u.token_count,
            })
        });
        let end = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Slim {
            id: u.id,
            text: text.into_boxed_str(),
            ends: [end(end_username), end(end_name), end(end_email)],
            uuid,
            flags,
            groups: groups.into_boxed_slice(),
            rare,
        }
    }

    fn username(&self) -> &str {
        &self.text[..self.ends[0] as usize]
    }

    fn name(&self) -> Option<&str> {
        (self.flags & HAS_NAME != 0)
            .then(|| &self.text[self.ends[0] as usize..self.ends[1] as usize])
    }

    fn email(&self) -> Option<&str> {
        (self.flags & HAS_EMAIL != 0)
            .then(|| &self.text[self.ends[1] as usize..self.ends[2] as usize])
    }

    /// Calls `f` with the SCIM id (a UUID is written out on the stack).
    fn with_scim<R>(&self, f: impl FnOnce(Option<&str>) -> R) -> R {
        if let Some(u) = self.uuid {
            let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
            f(Some(u.hyphenated().encode_lower(&mut buf)))
        } else if self.flags & SCIM_TEXT != 0 {
            f(Some(&self.text[self.ends[2] as usize..]))
        } else {
            f(None)
        }
    }

    fn deactivated(&self) -> bool {
        self.flags & DEACTIVATED != 0
    }

    /// The hash under which `by_id` holds this user.
    fn id_hash(&self, hasher: &RandomState) -> u64 {
        hasher.hash_one(self.id)
    }

    /// The hash under which `by_username` holds this user.
    fn username_hash(&self, hasher: &RandomState) -> u64 {
        hasher.hash_one(self.username())
    }

    /// The hash under which `by_scim` holds this user; `None` when unmanaged (not there).
    fn scim_hash(&self, hasher: &RandomState) -> Option<u64> {
        self.with_scim(|id| id.map(|id| hasher.hash_one(id)))
    }

    fn to_actual(&self, keys: &Keys) -> ActualUser {
        ActualUser {
            id: self.id,
            username: self.username().to_owned(),
            name: self.name().map(str::to_owned),
            email: self.email().map(str::to_owned),
            scim_id: self.with_scim(|s| s.map(str::to_owned)),
            deactivated: self.deactivated(),
            groups: self.groups.iter().map(|&k| keys.key(k)).collect(),
            roles: self
                .rare
                .as_ref()
                .map(|r| r.roles.clone())
                .unwrap_or_default(),
            token_count: self.rare.as_ref().and_then(|r| r.token_count),
        }
    }
}

/// Group keys by number: a user's groups are four bytes each. Numbers are never reused while
/// the state is held (keys of deleted groups stay: a few per deletion).
#[derive(Debug, Clone, Default)]
struct Keys {
    names: Vec<Box<str>>,
    numbers: HashTable<u32>,
}

impl Keys {
    fn intern(&mut self, key: &str, hasher: &RandomState) -> u32 {
        let Keys { names, numbers } = self;
        let hash = hasher.hash_one(key);
        if let Some(&n) = numbers.find(hash, |&n| &*names[n as usize] == key) {
            return n;
        }
        let n = u32::try_from(names.len()).expect("fewer than 2^32 group keys");
        names.push(key.into());
        numbers.insert_unique(hash, n, |&n| hasher.hash_one(&*names[n as usize]));
        n
    }

    fn number(&self, key: &str, hasher: &RandomState) -> Option<u32> {
        self.numbers
            .find(hasher.hash_one(key), |&n| &*self.names[n as usize] == key)
            .copied()
    }

    fn key(&self, n: u32) -> &str {
        &self.names[n as usize]
    }
}

/// The cached TeamCity state with its lookups (see the module documentation).
#[derive(Debug, Clone, Default)]
pub(crate) struct Compact {
    users: Vec<Option<Slim>>,
    free: Vec<u32>,
    /// Groups as read (a tenth of the users at most).
    pub(crate) groups: Vec<ActualGroup>,
    group_at: HashMap<String, usize>,
    keys: Keys,
    /// Roles of `ALL_USERS_GROUP`.
    pub(crate) all_users_roles: BTreeSet<RoleAt>,
    /// Per-object reads that failed.
    pub(crate) read_failures: Vec<ReadFailure>,
    by_id: HashTable<u32>,
    by_scim: HashTable<u32>,
    by_username: HashTable<u32>,
    /// Key number → slots of the direct members, sorted (a sorted list is a third of a hash
    /// set's size; a change costs a binary search and a move of at most the group).
    members: HashMap<u32, Vec<u32>>,
    managed_users: usize,
    hasher: RandomState,
}

impl Compact {
    /// Holds `state` compactly (its users are consumed one at a time).
    pub(crate) fn from_state(state: ActualState) -> Compact {
        let ActualState {
            users,
            groups,
            all_users_roles,
            read_failures,
        } = state;
        let mut c = Compact {
            users: Vec::with_capacity(users.len()),
            all_users_roles,
            read_failures,
            ..Compact::default()
        };
        for g in groups {
            c.put_group(g);
        }
        for u in users {
            c.insert_user(u);
        }
        c
    }

    /// The state as [`ActualState`] again.
    pub(crate) fn into_state(self) -> ActualState {
        let users = self
            .users
            .iter()
            .flatten()
            .map(|s| s.to_actual(&self.keys))
            .collect();
        ActualState {
            users,
            groups: self.groups,
            all_users_roles: self.all_users_roles,
            read_failures: self.read_failures,
        }
    }

    /// Managed users.
    pub(crate) fn managed_users(&self) -> usize {
        self.managed_users
    }

    /// The group with this key.
    pub(crate) fn group(&self, key: &str) -> Option<&ActualGroup> {
        self.group_at.get(key).map(|&at| &self.groups[at])
    }

    /// The user in `slot`.
    pub(crate) fn user(&self, slot: u32) -> Option<ActualUser> {
        self.slim(slot).map(|s| s.to_actual(&self.keys))
    }

    /// The TeamCity id of the user in `slot`.
    pub(crate) fn id(&self, slot: u32) -> Option<u64> {
        self.slim(slot).map(|s| s.id)
    }

    /// The SCIM id of the user in `slot`.
    pub(crate) fn scim_id(&self, slot: u32) -> Option<String> {
        self.slim(slot)
            .and_then(|s| s.with_scim(|id| id.map(str::to_owned)))
    }

    /// Whether the user in `slot` is marked deactivated.
    pub(crate) fn deactivated(&self, slot: u32) -> bool {
        self.slim(slot).is_some_and(Slim::deactivated)
    }

    fn slim(&self, slot: u32) -> Option<&Slim> {
        self.users.get(slot as usize).and_then(Option::as_ref)
    }

    /// The slot of the user with this TeamCity id.
    pub(crate) fn slot_of(&self, id: u64) -> Option<u32> {
        self.by_id
            .find(self.hasher.hash_one(id), |&s| self.id(s) == Some(id))
            .copied()
    }

    /// The slots of the users whose SCIM id is `scim`.
    pub(crate) fn slots_by_scim<'a>(&'a self, scim: &'a str) -> impl Iterator<Item = u32> + 'a {
        self.by_scim
            .iter_hash(self.hasher.hash_one(scim))
            .copied()
            .filter(move |&s| {
                self.slim(s)
                    .is_some_and(|u| u.with_scim(|id| id == Some(scim)))
            })
    }

    /// The slots of the users with this username.
    pub(crate) fn slots_by_username<'a>(
        &'a self,
        username: &'a str,
    ) -> impl Iterator<Item = u32> + 'a {
        self.by_username
            .iter_hash(self.hasher.hash_one(username))
            .copied()
            .filter(move |&s| self.slim(s).is_some_and(|u| u.username() == username))
    }

    /// The slots of the direct members of the group with this key.
    pub(crate) fn members_of<'a>(&'a self, key: &str) -> impl Iterator<Item = u32> + 'a {
        self.keys
            .number(key, &self.hasher)
            .and_then(|n| self.members.get(&n))
            .into_iter()
            .flatten()
            .copied()
    }

    /// Adds a user (a new TeamCity id) and returns its slot.
    pub(crate) fn insert_user(&mut self, u: ActualUser) -> u32 {
        let slim = Slim::new(u, &mut self.keys, &self.hasher);
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None => {
                self.users.push(None);
                u32::try_from(self.users.len() - 1).expect("fewer than 2^32 users")
            }
        };
        let Compact {
            users,
            by_id,
            by_scim,
            by_username,
            members,
            managed_users,
            hasher,
            ..
        } = self;
        by_id.insert_unique(slim.id_hash(hasher), slot, |&s| {
            slim_at(users, s).id_hash(hasher)
        });
        by_username.insert_unique(slim.username_hash(hasher), slot, |&s| {
            slim_at(users, s).username_hash(hasher)
        });
        if let Some(hash) = slim.scim_hash(hasher) {
            by_scim.insert_unique(hash, slot, |&s| {
                slim_at(users, s).scim_hash(hasher).unwrap_or_default()
            });
            *managed_users += 1;
        }
        for &k in &slim.groups {
            join(members, k, slot);
        }
        self.users[slot as usize] = Some(slim);
        slot
    }

    /// Puts back a user a pass took out of the state, or adds it when it is new. Its groups
    /// become `u`'s plus those it had here that `held` says the pass did not hold (a member
    /// taken out without its other groups keeps them). Only the memberships that changed are
    /// touched: a member list may hold every user (the defaults group).
    pub(crate) fn put_back(&mut self, mut u: ActualUser, held: impl Fn(&str) -> bool) {
        let Some(slot) = self.slot_of(u.id) else {
            self.insert_user(u);
            return;
        };
        let old = slim_at(&self.users, slot);
        u.groups.extend(
            old.groups
                .iter()
                .map(|&k| self.keys.key(k))
                .filter(|k| !held(k)),
        );
        let same_lookups =
            old.username() == u.username && old.with_scim(|s| s == u.scim_id.as_deref());
        if !same_lookups {
            self.remove_user(slot);
            self.insert_user(u);
            return;
        }
        let before = old.groups.clone();
        let slim = Slim::new(u, &mut self.keys, &self.hasher);
        for &k in before
            .iter()
            .filter(|k| slim.groups.binary_search(k).is_err())
        {
            leave(&mut self.members, k, slot);
        }
        for &k in slim
            .groups
            .iter()
            .filter(|k| before.binary_search(k).is_err())
        {
            join(&mut self.members, k, slot);
        }
        self.users[slot as usize] = Some(slim);
    }

    /// Takes the user in `slot` out (its slot is free for the next one).
    pub(crate) fn remove_user(&mut self, slot: u32) {
        let Some(slim) = self.users.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        let hasher = &self.hasher;
        let drop_slot = |table: &mut HashTable<u32>, hash: u64| {
            if let Ok(entry) = table.find_entry(hash, |&s| s == slot) {
                entry.remove();
            }
        };
        drop_slot(&mut self.by_id, slim.id_hash(hasher));
        drop_slot(&mut self.by_username, slim.username_hash(hasher));
        if let Some(hash) = slim.scim_hash(hasher) {
            drop_slot(&mut self.by_scim, hash);
            self.managed_users -= 1;
        }
        for &k in &slim.groups {
            leave(&mut self.members, k, slot);
        }
        self.free.push(slot);
    }

    /// Puts a group in (replacing the one with its key).
    pub(crate) fn put_group(&mut self, g: ActualGroup) {
        match self.group_at.get(&g.key) {
            Some(&at) => self.groups[at] = g,
            None => {
                self.group_at.insert(g.key.clone(), self.groups.len());
                self.groups.push(g);
            }
        }
    }

    /// Deletes the group with this key: off every member, then out.
    pub(crate) fn remove_group(&mut self, key: &str) {
        if let Some(n) = self.keys.number(key, &self.hasher) {
            for slot in self.members.remove(&n).unwrap_or_default() {
                if let Some(Some(u)) = self.users.get_mut(slot as usize) {
                    u.groups = u.groups.iter().copied().filter(|&k| k != n).collect();
                }
            }
        }
        if let Some(at) = self.group_at.remove(key) {
            self.groups.swap_remove(at);
            if let Some(moved) = self.groups.get(at) {
                self.group_at.insert(moved.key.clone(), at);
            }
        }
    }

    /// Gives back what the tables hold beyond their contents (after a load).
    pub(crate) fn shrink(&mut self) {
        let Compact {
            users,
            by_id,
            by_scim,
            by_username,
            hasher,
            ..
        } = self;
        users.shrink_to_fit();
        by_id.shrink_to_fit(|&s| slim_at(users, s).id_hash(hasher));
        by_username.shrink_to_fit(|&s| slim_at(users, s).username_hash(hasher));
        by_scim.shrink_to_fit(|&s| slim_at(users, s).scim_hash(hasher).unwrap_or_default());
        self.free.shrink_to_fit();
        for m in self.members.values_mut() {
            m.shrink_to_fit();
        }
    }
}

/// Adds `slot` to the members of group number `k`.
fn join(members: &mut HashMap<u32, Vec<u32>>, k: u32, slot: u32) {
    let m = members.entry(k).or_default();
    if let Err(at) = m.binary_search(&slot) {
        m.insert(at, slot);
    }
}

/// Takes `slot` off the members of group number `k`.
fn leave(members: &mut HashMap<u32, Vec<u32>>, k: u32, slot: u32) {
    if let Some(m) = members.get_mut(&k) {
        if let Ok(at) = m.binary_search(&slot) {
            m.remove(at);
        }
        if m.is_empty() {
            members.remove(&k);
        }
    }
}

/// The user a table entry points at (entries point only at occupied slots).
fn slim_at(users: &[Option<Slim>], slot: u32) -> &Slim {
    users[slot as usize]
        .as_ref()
        .expect("a lookup entry points at an occupied slot")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::tests::user;

    /// Every field of a user comes back as it went in, whatever the form of its SCIM id, with
    /// empty and absent strings told apart.
    #[test]
    fn a_user_reads_back_as_it_was_stored() {
        let uuid = "0b7c1f0e-5d6a-4c1b-9f3e-2a1d4c5b6e7f";
        let cases = [
            user(1, Some(uuid), "ann", &["K_B", "K_A"]),
            // Upper case, braces: not the canonical form, kept as text.
            user(2, Some("0B7C1F0E-5D6A-4C1B-9F3E-2A1D4C5B6E7F"), "bob", &[]),
            user(3, Some("ext-7"), "", &["K_A"]),
            user(4, None, "hand", &[]),
            ActualUser {
                name: Some(String::new()),
                email: Some("é@example.com".into()),
                deactivated: true,
                roles: [RoleAt::global("SYSTEM_ADMIN")].into(),
                token_count: Some(0),
                ..user(5, Some(uuid), "dup", &["K_C"])
            },
            ActualUser {
                name: Some("Ünïcode Name".into()),
                email: None,
                ..user(6, Some(""), "empty-scim", &[])
            },
        ];
        let mut c = Compact::default();
        let slots: Vec<u32> = cases.iter().map(|u| c.insert_user(u.clone())).collect();
        for (slot, u) in slots.iter().zip(&cases) {
            assert_eq!(c.user(*slot).as_ref(), Some(u));
        }
        assert!(
            c.slim(slots[0]).unwrap().uuid.is_some(),
            "a canonical UUID is 16 bytes"
        );
        assert!(c.slim(slots[1]).unwrap().uuid.is_none());
        assert_eq!(c.managed_users(), 5);
        assert_eq!(
            c.slots_by_scim(uuid).collect::<BTreeSet<_>>(),
            [slots[0], slots[4]].into()
        );
        assert_eq!(c.slots_by_scim("ext-7").collect::<Vec<_>>(), [slots[2]]);
        assert_eq!(c.slots_by_scim("").collect::<Vec<_>>(), [slots[5]]);
        assert_eq!(c.slots_by_scim("nobody").count(), 0);
        assert_eq!(c.slots_by_username("hand").collect::<Vec<_>>(), [slots[3]]);
        assert_eq!(c.slot_of(5), Some(slots[4]));
        assert_eq!(c.slot_of(99), None);
        assert_eq!(
            c.members_of("K_A").collect::<BTreeSet<_>>(),
            [slots[0], slots[2]].into()
        );
    }

    /// Users and groups come and go; whatever the order, the lookups and member sets equal
    /// those of a fresh load of the same state, and a freed slot is taken again.
    #[test]
    fn removals_and_insertions_keep_every_lookup_equal_to_a_fresh_load() {
        let mut c = Compact::from_state(ActualState {
            users: (0..50)
                .map(|i| {
                    user(
                        i,
                        (i % 3 != 0).then(|| format!("s{}", i % 40)).as_deref(),
                        &format!("u{}", i % 45),
                        &[&format!("K{}", i % 7), &format!("K{}", i % 5)],
                    )
                })
                .collect(),
            groups: (0..7)
                .map(|i| ActualGroup {
                    key: format!("K{i}"),
                    name: format!("G{i}"),
                    ..ActualGroup::default()
                })
                .collect(),
            ..ActualState::default()
        });
        for id in (0..50).step_by(4) {
            let slot = c.slot_of(id).unwrap();
            c.remove_user(slot);
        }
        c.remove_group("K3");
        let reused = c.insert_user(user(100, Some("s1"), "u1", &["K1", "K3"]));
        assert!(reused < 50, "a freed slot is reused");
        let slot = c.slot_of(9).unwrap();
        let mut nine = c.user(slot).unwrap();
        nine.groups.insert("K0");
        nine.deactivated = true;
        c.remove_user(slot);
        c.insert_user(nine);
        c.shrink();

        let fresh = Compact::from_state(c.clone().into_state());
        let by = |c: &Compact, f: &dyn Fn(&Compact, &ActualUser) -> Vec<u64>| {
            let mut all: Vec<(u64, Vec<u64>)> = c
                .users
                .iter()
                .flatten()
                .map(|s| {
                    let u = s.to_actual(&c.keys);
                    (u.id, f(c, &u))
                })
                .collect();
            all.sort();
            all
        };
        let ids = |c: &Compact, slots: Vec<u32>| -> Vec<u64> {
            let mut v: Vec<u64> = slots.into_iter().filter_map(|s| c.id(s)).collect();
            v.sort();
            v
        };
        let scim = |c: &Compact, u: &ActualUser| {
            ids(
                c,
                u.scim_id
                    .as_deref()
                    .map_or(vec![], |s| c.slots_by_scim(s).collect()),
            )
        };
        let username =
            |c: &Compact, u: &ActualUser| ids(c, c.slots_by_username(&u.username).collect());
        let at = |c: &Compact, u: &ActualUser| vec![c.slot_of(u.id).and_then(|s| c.id(s)).unwrap()];
        assert_eq!(by(&c, &scim), by(&fresh, &scim));
        assert_eq!(by(&c, &username), by(&fresh, &username));
        assert_eq!(by(&c, &at), by(&fresh, &at));
        for k in ["K0", "K1", "K2", "K3", "K4", "K5", "K6"] {
            assert_eq!(
                ids(&c, c.members_of(k).collect()),
                ids(&fresh, fresh.members_of(k).collect()),
                "{k}"
            );
        }
        assert_eq!(
            c.members_of("K3")
                .filter_map(|s| c.id(s))
                .collect::<Vec<_>>(),
            [100]
        );
        assert!(c.group("K3").is_none());
        assert_eq!(c.managed_users(), fresh.managed_users());
        assert!(c.user(c.slot_of(9).unwrap()).unwrap().deactivated);
    }
}
