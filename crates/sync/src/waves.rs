//! Splits an ordered action list (a [`plan`](crate::plan::plan), or a held subset of one) into
//! *waves* that may be applied concurrently without changing what the order guarantees.
//!
//! The plan sorts its actions by phase (orphan group deletes, user creates, user updates, group
//! creates, joins, user role grants, leaves, group role changes, user role removals,
//! (de)activation steps, swapped-out group deletes, user deletes), and every ordering it relies
//! on is *between* phases: a [`UserRef::New`](crate::model::UserRef::New) is resolved by a `CreateUser` of an earlier phase,
//! a rename swap creates the new group (phase 3) before it deletes the old one (phase 10), a
//! capped user leaves a group (phase 6) before that group gains a role (phase 7), an orphan group
//! is deleted (phase 0) before a group takes its name (phase 3).
//!
//! So a wave is a maximal run of *consecutive* actions of the same phase, and waves run one
//! after the other: every cross-phase order is kept. Inside a phase, actions on different
//! objects are independent (the plan gives each created user a distinct username and each
//! created group a distinct key and name; joins, leaves and role changes touch distinct
//! (user, group) or (group, role) pairs). Actions on the *same* object keep their plan order
//! anyway: a wave is split into *lanes* by object, a lane runs sequentially and lanes run
//! concurrently. That keeps, e.g., `RevokeTokens` → `ResetPassword` → `SetDeactivated` of one
//! user in order, so the deactivated marker — which tells later plans the first two are done —
//! is only set after they succeeded.
//!
//! A list that is not phase-sorted is still safe: only *adjacent* actions of one phase share a
//! wave, so such a list just gets more, smaller waves.
//!
//! Waves keep the *order*; whether a step may run at all is the engine's decision, from the
//! plan's prerequisites ([`crate::plan::dependencies`]): every prerequisite is in an earlier
//! phase or earlier in the same lane, so it has finished before its dependent starts, and a
//! dependent of a failed step is not attempted.

use std::collections::BTreeMap;

use crate::model::{Action, UserTarget};

/// The plan phase of an action (see [`crate::plan`]): actions of different phases never share a
/// wave. Both kinds of `DeleteGroup` (orphans, first; swapped-out groups, near the end) map to
/// one class: they only share a wave when nothing else stands between them, and deleting two
/// different groups is independent.
fn phase(a: &Action) -> u8 {
    match a {
        Action::CreateUser { .. } | Action::AdoptUser { .. } => 1,
        Action::UpdateUser { .. } => 2,
        Action::CreateGroup { .. } => 3,
        Action::AddToGroup { .. } => 4,
        Action::AddUserRole { .. } => 5,
        Action::RemoveFromGroup { .. } => 6,
        Action::AddGroupRole { .. } | Action::RemoveGroupRole { .. } => 7,
        Action::RemoveUserRole { .. } => 8,
        Action::RevokeTokens { .. }
        | Action::ResetPassword { .. }
        | Action::EndSessions { .. }
        | Action::ClearRememberMe { .. }
        | Action::SetDeactivated { .. }
        | Action::ClearDeactivated { .. } => 9,
        Action::DeleteGroup { .. } => 10,
        Action::DeleteUser { .. } => 11,
    }
}

/// The object an action changes: actions on the same object run in plan order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Lane<'a> {
    User(u64),
    NewUser(&'a str),
    Group(&'a str),
}

fn lane(a: &Action) -> Lane<'_> {
    match (a.user_target(), a.group_target()) {
        (Some(UserTarget::Id(id)), _) => Lane::User(id),
        (Some(UserTarget::New(s)), _) => Lane::NewUser(s),
        // Every other step addresses a group.
        (None, key) => Lane::Group(key.unwrap_or_default()),
    }
}

/// The waves of `actions`, in order; each wave is a list of lanes, each lane the indices (into
/// `actions`, ascending) of the actions it runs one after the other. Every index appears once.
pub fn waves(actions: &[Action]) -> Vec<Vec<Vec<usize>>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < actions.len() {
        let p = phase(&actions[start]);
        let end = actions[start..]
            .iter()
            .position(|a| phase(a) != p)
            .map_or(actions.len(), |n| start + n);
        let mut lanes: BTreeMap<Lane<'_>, Vec<usize>> = BTreeMap::new();
        let mut order: Vec<Lane<'_>> = Vec::new();
        for (i, a) in actions.iter().enumerate().take(end).skip(start) {
            let l = lane(a);
            lanes
                .entry(l)
                .or_insert_with(|| {
                    order.push(l);
                    Vec::new()
                })
                .push(i);
        }
        // Lanes in order of their first action, so a wave starts where the plan does.
        out.push(order.into_iter().filter_map(|l| lanes.remove(&l)).collect());
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::{DesiredOptions, desired};
    use crate::model::{
        ActualGroup, ActualState, ActualUser, DirGroup, DirUser, Directory, UserRef,
    };
    use crate::plan::{PlanOptions, plan};
    use crate::policy::{Pins, Policy};

    /// The wave each action runs in.
    fn wave_of(w: &[Vec<Vec<usize>>], n: usize) -> Vec<usize> {
        let mut at = vec![usize::MAX; n];
        for (k, wave) in w.iter().enumerate() {
            for lane in wave {
                for &i in lane {
                    assert_eq!(at[i], usize::MAX, "action {i} twice");
                    at[i] = k;
                }
            }
        }
        assert!(
            at.iter().all(|&k| k != usize::MAX),
            "every action is in a wave"
        );
        at
    }

    fn user(id: &str, name: &str, active: bool) -> DirUser {
        DirUser {
            id: id.into(),
            user_name: name.into(),
            email: Some(format!("{name}@example.com")),
            active,
            ..DirUser::default()
        }
    }

    #[test]
    fn waves_keep_every_order_the_plan_relies_on() {
        let policy = Policy::from_toml(
            r#"
[[groups]]
match = { externalId = "dev" }
roles = ["PROJECT_DEVELOPER@p:Backend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#,
        )
        .expect("policy");
        // TeamCity: u1 (managed, in the old "Devs" group and "Ops"), u2 (managed, about to be
        // deactivated), an orphan group named "Stale" whose name a new group takes.
        let g_dev0 = crate::desired::group_key("g-dev", 0);
        let g_ops0 = crate::desired::group_key("g-ops", 0);
        let g_old0 = crate::desired::group_key("g-gone", 0);
        let managed = |id: u64, scim: &str, groups: &[&str]| ActualUser {
            id,
            username: format!("{scim}@example.com"),
            email: Some(format!("{scim}@example.com")),
            scim_id: Some(scim.into()),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            ..ActualUser::default()
        };
        let group = |key: &str, name: &str, marker: &str| ActualGroup {
            key: key.into(),
            name: name.into(),
            marker: Some(marker.into()),
            ..ActualGroup::default()
        };
        let actual = ActualState {
            users: vec![
                ActualUser {
                    name: Some("u1".into()),
                    ..managed(11, "u1", &[&g_dev0, &g_ops0])
                },
                managed(12, "u2", &[&g_dev0]),
            ],
            groups: vec![
                group(&g_dev0, "Devs", "g-dev"),
                group(&g_ops0, "Ops", "g-ops"),
                group(&g_old0, "Stale", "g-gone"),
            ],
            ..ActualState::default()
        };
        let dir = Directory {
            users: vec![
                user("u1", "u1", true),
                user("u2", "u2", false),
                user("u3", "u3", true),
                user("u4", "u4", true),
            ],
            groups: vec![
                // Renamed: a swap (create the next generation, then delete the old key).
                DirGroup {
                    id: "g-dev".into(),
                    display_name: "Developers".into(),
                    external_id: Some("dev".into()),
                    members: vec!["u1".into(), "u3".into()],
                },
                DirGroup {
                    id: "g-ops".into(),
                    display_name: "Ops".into(),
                    external_id: None,
                    members: vec!["u1".into(), "u4".into()],
                },
                // Takes the name of the orphan.
                DirGroup {
                    id: "g-new".into(),
                    display_name: "Stale".into(),
                    external_id: None,
                    members: vec!["u3".into()],
                },
            ],
        };
        let d = desired(&dir, &policy, &Pins::new(), &DesiredOptions::default());
        let p = plan(&d, &actual, &PlanOptions::default());
        assert!(p.conflicts.is_empty(), "{:?}", p.conflicts);
        let a = &p.actions;
        let w = waves(a);
        let at = wave_of(&w, a.len());
        let find = |f: &dyn Fn(&Action) -> bool| -> Vec<usize> {
            a.iter()
                .enumerate()
                .filter(|(_, x)| f(x))
                .map(|(i, _)| i)
                .collect()
        };

        // Rename swap: the new generation is created in an earlier wave than the old key is
        // deleted.
        let create_dev =
            find(&|x| matches!(x, Action::CreateGroup { marker, .. } if marker == "g-dev"));
        let delete_dev = find(&|x| matches!(x, Action::DeleteGroup { key } if *key == g_dev0));
        assert_eq!((create_dev.len(), delete_dev.len()), (1, 1), "{a:#?}");
        assert!(at[create_dev[0]] < at[delete_dev[0]]);
        // The orphan is deleted before the group that takes its name is created.
        let delete_orphan = find(&|x| matches!(x, Action::DeleteGroup { key } if *key == g_old0));
        let create_new =
            find(&|x| matches!(x, Action::CreateGroup { marker, .. } if marker == "g-new"));
        assert!(at[delete_orphan[0]] < at[create_new[0]]);
        // Users are created before anything refers to them, joins included.
        for (i, x) in a.iter().enumerate() {
            let refs: Vec<&UserRef> = match x {
                Action::AddToGroup { user, .. } | Action::AddUserRole { user, .. } => vec![user],
                Action::CreateGroup { members, .. } => members.iter().collect(),
                _ => vec![],
            };
            for r in refs {
                if let UserRef::New(s) = r {
                    let c =
                        find(&|y| matches!(y, Action::CreateUser { scim_id, .. } if scim_id == s));
                    assert!(at[c[0]] < at[i], "create of {s} before action {i}");
                }
            }
        }
        // u4 joins the existing Ops group in its create call.
        let create_u4 = find(
            &|x| matches!(x, Action::CreateUser { scim_id, groups, .. } if scim_id == "u4" && groups.contains(&g_ops0)),
        );
        assert_eq!(
            create_u4.len(),
            1,
            "u4 joins the existing Ops group: {a:#?}"
        );
        // The deactivation steps of u2 stay in one lane, in plan order.
        let deact: Vec<usize> = find(&|x| {
            matches!(
                x,
                Action::RevokeTokens { user: 12 }
                    | Action::ResetPassword { user: 12 }
                    | Action::ClearRememberMe { user: 12 }
                    | Action::EndSessions { user: 12 }
                    | Action::SetDeactivated { user: 12 }
            )
        });
        assert_eq!(deact.len(), 5);
        let lane = w
            .iter()
            .flatten()
            .find(|l| l.contains(&deact[0]))
            .expect("lane");
        assert_eq!(lane, &deact, "one lane, in order");
        // Waves follow the plan's phases: after the orphan deletes (if any), strictly ascending.
        let phases: Vec<u8> = w.iter().map(|wave| phase(&a[wave[0][0]])).collect();
        let rest = if phases.first() == Some(&10) {
            &phases[1..]
        } else {
            &phases[..]
        };
        assert!(rest.windows(2).all(|p| p[0] < p[1]), "{phases:?}");
        for (wave, ph) in w.iter().zip(&phases) {
            for lane in wave {
                assert!(lane.windows(2).all(|p| p[0] < p[1]));
                assert!(lane.iter().all(|&i| phase(&a[i]) == *ph));
            }
        }
    }

    #[test]
    fn only_adjacent_actions_of_one_phase_share_a_wave() {
        let del = |k: &str| Action::DeleteGroup { key: k.into() };
        let join = |u: u64, g: &str| Action::AddToGroup {
            user: UserRef::Id(u),
            group: g.into(),
        };
        let actions = vec![del("A"), join(1, "B"), join(2, "B"), join(1, "C"), del("D")];
        let w = waves(&actions);
        assert_eq!(
            w,
            vec![vec![vec![0]], vec![vec![1, 3], vec![2]], vec![vec![4]],]
        );
        assert!(waves(&[]).is_empty());
    }
}
