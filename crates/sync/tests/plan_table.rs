//! Table-driven tests of `plan`: each case is a directory, a policy and a
//! TeamCity state, and the exact actions expected.
//!
//! Most cases start from a converged state (the directory below applied to a
//! TeamCity holding one unmanaged admin and one unmanaged group), built with
//! an in-memory simulation of the actions, then change one thing.

use std::collections::{BTreeMap, BTreeSet};

use sync::desired::{DesiredOptions, desired, group_key};
use sync::guard;
use sync::model::{
    Action, ActualGroup, ActualState, ActualUser, DEFAULTS_GROUP_KEY, DEFAULTS_MARKER, DirGroup,
    DirUser, Directory, Field, FieldChange, RoleAt, UserRef,
};
use sync::plan::{Conflict, Deprovision, Plan, PlanOptions, Report, plan};
use sync::policy::{Pins, Policy};

// ---- builders ---------------------------------------------------------------

fn user(id: &str, user_name: &str, email: &str) -> DirUser {
    DirUser {
        id: id.into(),
        user_name: user_name.into(),
        display_name: Some(format!("{user_name} Person")),
        email: Some(email.into()),
        active: true,
        ..DirUser::default()
    }
}

fn group(id: &str, name: &str, ext: Option<&str>, members: &[&str]) -> DirGroup {
    DirGroup {
        id: id.into(),
        display_name: name.into(),
        external_id: ext.map(Into::into),
        members: members.iter().map(|m| (*m).to_owned()).collect(),
    }
}

const POLICY: &str = r#"
[[groups]]
match = { externalId = "00gDEV" }
roles = ["PROJECT_DEVELOPER@p:Backend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

fn base_dir() -> Directory {
    Directory {
        users: vec![user("u1", "Ann", "ann@x"), user("u2", "Bob", "bob@x")],
        groups: vec![
            group("g1", "Devs", Some("00gDEV"), &["u1", "u2"]),
            group("g2", "Ops", None, &["u1"]),
        ],
    }
}

fn admin_world() -> ActualState {
    ActualState {
        users: vec![ActualUser {
            id: 1,
            username: "admin".into(),
            roles: [RoleAt::global("SYSTEM_ADMIN")].into(),
            groups: ["LOCAL".to_owned()].into(),
            ..ActualUser::default()
        }],
        groups: vec![ActualGroup {
            key: "LOCAL".into(),
            name: "Local admins".into(),
            marker: None,
            roles: [RoleAt::global("SYSTEM_ADMIN")].into(),
        }],
        ..ActualState::default()
    }
}

fn pol(text: &str) -> Policy {
    Policy::from_toml(text).expect("policy")
}

fn strip() -> PlanOptions {
    PlanOptions::default()
}

fn delete() -> PlanOptions {
    PlanOptions {
        deprovision: Deprovision::Delete,
        ..PlanOptions::default()
    }
}

fn k(id: &str) -> String {
    group_key(id, 0)
}

fn id(n: u64) -> UserRef {
    UserRef::Id(n)
}

fn new(s: &str) -> UserRef {
    UserRef::New(s.into())
}

fn dev() -> RoleAt {
    RoleAt::project("PROJECT_DEVELOPER", "Backend")
}

fn viewer(p: &str) -> RoleAt {
    RoleAt::project("PROJECT_VIEWER", p)
}

fn join(u: UserRef, g: &str) -> Action {
    Action::AddToGroup {
        user: u,
        group: g.into(),
    }
}

fn leave(u: u64, g: &str) -> Action {
    Action::RemoveFromGroup {
        user: u,
        group: g.into(),
    }
}

fn deactivate(u: u64) -> [Action; 5] {
    [
        Action::RevokeTokens { user: u },
        Action::ResetPassword { user: u },
        Action::ClearRememberMe { user: u },
        Action::EndSessions { user: u },
        Action::SetDeactivated { user: u },
    ]
}

fn change(field: Field, from: &str, to: &str) -> FieldChange {
    FieldChange {
        field,
        from: Some(from.into()),
        to: Some(to.into()),
    }
}

// ---- an in-memory TeamCity, to build converged states --------------------------

fn simulate(actual: &ActualState, actions: &[Action]) -> ActualState {
    let mut s = actual.clone();
    let mut created: BTreeMap<String, u64> = BTreeMap::new();
    let resolve = |r: &UserRef, created: &BTreeMap<String, u64>| match r {
        UserRef::Id(i) => *i,
        UserRef::New(x) => created[x],
    };
    for a in actions {
        match a {
            Action::CreateUser {
                scim_id,
                username,
                name,
                email,
                groups,
            } => {
                let next = s.users.iter().map(|u| u.id).max().unwrap_or(0) + 1;
                created.insert(scim_id.clone(), next);
                s.users.push(ActualUser {
                    id: next,
                    username: username.clone(),
                    name: name.clone(),
                    email: email.clone(),
                    scim_id: Some(scim_id.clone()),
                    groups: groups.iter().cloned().collect(),
                    ..ActualUser::default()
                });
            }
            Action::UpdateUser { user, changes } => {
                let u = s.users.iter_mut().find(|u| u.id == *user).expect("user");
                for c in changes {
                    match c.field {
                        Field::Username => u.username = c.to.clone().expect("username"),
                        Field::Name => u.name = c.to.clone(),
                        Field::Email => u.email = c.to.clone(),
                    }
                }
            }
            Action::DeleteUser { user } => s.users.retain(|u| u.id != *user),
            Action::AddToGroup { user, group } => {
                let i = resolve(user, &created);
                let u = s.users.iter_mut().find(|u| u.id == i).expect("user");
                u.groups.insert(group.clone());
            }
            Action::RemoveFromGroup { user, group } => {
                let u = s.users.iter_mut().find(|u| u.id == *user).expect("user");
                u.groups.remove(group);
            }
            Action::AddUserRole { user, role } => {
                let i = resolve(user, &created);
                let u = s.users.iter_mut().find(|u| u.id == i).expect("user");
                u.roles.insert(role.clone());
            }
            Action::RemoveUserRole { user, role } => {
                let u = s.users.iter_mut().find(|u| u.id == *user).expect("user");
                u.roles.remove(role);
            }
            Action::RevokeTokens { user } => {
                let u = s.users.iter_mut().find(|u| u.id == *user).expect("user");
                u.token_count = u.token_count.map(|_| 0);
            }
            Action::ResetPassword { .. }
            | Action::EndSessions { .. }
            | Action::ClearRememberMe { .. } => {}
            Action::AdoptUser { user, scim_id } => {
                let u = s.users.iter_mut().find(|u| u.id == *user).expect("user");
                u.scim_id = Some(scim_id.clone());
            }
            Action::SetDeactivated { user } | Action::ClearDeactivated { user } => {
                let set = matches!(a, Action::SetDeactivated { .. });
                let u = s.users.iter_mut().find(|u| u.id == *user).expect("user");
                u.deactivated = set;
            }
            Action::CreateGroup {
                key,
                name,
                marker,
                roles,
                members,
                ..
            } => {
                s.groups.push(ActualGroup {
                    key: key.clone(),
                    name: name.clone(),
                    marker: Some(marker.clone()),
                    roles: roles.iter().cloned().collect(),
                });
                for m in members {
                    let i = resolve(m, &created);
                    let u = s.users.iter_mut().find(|u| u.id == i).expect("user");
                    u.groups.insert(key.clone());
                }
            }
            Action::DeleteGroup { key } => {
                s.groups.retain(|g| g.key != *key);
                for u in &mut s.users {
                    u.groups.remove(key);
                }
            }
            Action::AddGroupRole { group, role } | Action::RemoveGroupRole { group, role } => {
                let add = matches!(a, Action::AddGroupRole { .. });
                let g = s
                    .groups
                    .iter_mut()
                    .find(|g| g.key == *group)
                    .expect("group");
                if add {
                    g.roles.insert(role.clone());
                } else {
                    g.roles.remove(role);
                }
            }
        }
    }
    s
}

fn plan_of(dir: &Directory, policy: &Policy, actual: &ActualState, opts: PlanOptions) -> Plan {
    let d = desired(dir, policy, &Pins::new(), &DesiredOptions::default());
    plan(&d, actual, &opts)
}

/// The base directory applied to the admin world. Ann = id 2, Bob = id 3.
fn converged() -> ActualState {
    converge(&base_dir(), &pol(POLICY), &admin_world())
}

fn converge(dir: &Directory, policy: &Policy, from: &ActualState) -> ActualState {
    let p = plan_of(dir, policy, from, strip());
    let after = simulate(from, &p.actions);
    let again = plan_of(dir, policy, &after, strip());
    assert_eq!(again.actions, vec![], "converges in one plan");
    after
}

/// Plans `dir` + `policy` against `actual` and compares with `expected`;
/// also checks that applying the plan converges (a second plan is empty).
#[track_caller]
fn check(
    case: &str,
    dir: &Directory,
    policy: &Policy,
    actual: &ActualState,
    opts: PlanOptions,
    expected: &[Action],
) -> Plan {
    let p = plan_of(dir, policy, actual, opts);
    assert_eq!(p.actions, expected, "case: {case}");
    let after = simulate(actual, &p.actions);
    let again = plan_of(dir, policy, &after, opts);
    assert_eq!(again.actions, vec![], "case {case}: second plan is empty");
    p
}

fn with(mut dir: Directory, f: impl FnOnce(&mut Directory)) -> Directory {
    f(&mut dir);
    dir
}

// Within one phase, group keys come in key order; the test keys sort as
// k("g1") = SCIM_7114…, k("g2") = SCIM_4D2F… < SCIM_DEFAULTS.

// ---- the table ----------------------------------------------------------------

#[test]
fn initial_sync_creates_users_then_groups_with_members() {
    let policy = pol(POLICY);
    let p = check(
        "create all",
        &base_dir(),
        &policy,
        &admin_world(),
        strip(),
        &[
            Action::CreateUser {
                scim_id: "u1".into(),
                username: "ann".into(),
                name: Some("Ann Person".into()),
                email: Some("ann@x".into()),
                groups: vec![],
            },
            Action::CreateUser {
                scim_id: "u2".into(),
                username: "bob".into(),
                name: Some("Bob Person".into()),
                email: Some("bob@x".into()),
                groups: vec![],
            },
            Action::CreateGroup {
                key: DEFAULTS_GROUP_KEY.into(),
                name: "SCIM: default roles".into(),
                marker: DEFAULTS_MARKER.into(),
                roles: vec![viewer("_Root")],
                members: vec![new("u1"), new("u2")],
                replaces: None,
            },
            Action::CreateGroup {
                key: k("g1"),
                name: "Devs".into(),
                marker: "g1".into(),
                roles: vec![dev()],
                members: vec![new("u1"), new("u2")],
                replaces: None,
            },
            Action::CreateGroup {
                key: k("g2"),
                name: "Ops".into(),
                marker: "g2".into(),
                roles: vec![],
                members: vec![new("u1")],
                replaces: None,
            },
        ],
    );
    assert!(p.conflicts.is_empty());
    let s = converged();
    assert_eq!(s.user(2).map(|u| u.username.as_str()), Some("ann"));
    assert_eq!(s.user(3).map(|u| u.username.as_str()), Some("bob"));
}

#[test]
fn user_changes() {
    let policy = pol(POLICY);
    let base = converged();
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Directory, Vec<Action>)> = vec![
        (
            "create",
            with(base_dir(), |d| {
                d.users.push(user("u3", "Cara", "cara@x"));
                d.groups[0].members.push("u3".into());
            }),
            vec![
                // The groups exist: joined in the create call itself.
                Action::CreateUser {
                    scim_id: "u3".into(),
                    username: "cara".into(),
                    name: Some("Cara Person".into()),
                    email: Some("cara@x".into()),
                    groups: vec![k("g1"), DEFAULTS_GROUP_KEY.into()],
                },
            ],
        ),
        (
            "user rename (case folded)",
            with(base_dir(), |d| d.users[0].user_name = "Ann.Smith".into()),
            vec![Action::UpdateUser {
                user: 2,
                changes: vec![change(Field::Username, "ann", "ann.smith")],
            }],
        ),
        (
            "username case change only is no change",
            with(base_dir(), |d| d.users[0].user_name = "ANN".into()),
            vec![],
        ),
        (
            "email change",
            with(base_dir(), |d| d.users[1].email = Some("robert@x".into())),
            vec![Action::UpdateUser {
                user: 3,
                changes: vec![change(Field::Email, "bob@x", "robert@x")],
            }],
        ),
        (
            "name cleared",
            with(base_dir(), |d| d.users[1].display_name = None),
            vec![Action::UpdateUser {
                user: 3,
                changes: vec![FieldChange {
                    field: Field::Name,
                    from: Some("Bob Person".into()),
                    to: None,
                }],
            }],
        ),
        (
            "join",
            with(base_dir(), |d| d.groups[1].members.push("u2".into())),
            vec![join(id(3), &k("g2"))],
        ),
        (
            "leave",
            with(base_dir(), |d| d.groups[1].members.clear()),
            vec![leave(2, &k("g2"))],
        ),
        (
            "deactivate",
            with(base_dir(), |d| d.users[1].active = false),
            [
                vec![leave(3, &k("g1")), leave(3, DEFAULTS_GROUP_KEY)],
                deactivate(3).to_vec(),
            ]
            .concat(),
        ),
        (
            "okta re-push of an unchanged group is a no-op",
            base_dir(),
            vec![],
        ),
    ];
    for (case, dir, expected) in cases {
        check(case, &dir, &policy, &base, strip(), &expected);
    }
}

#[test]
fn reactivation_recomputes_from_current_groups() {
    let policy = pol(POLICY);
    let off = with(base_dir(), |d| d.users[1].active = false);
    let deactivated = converge(&off, &policy, &converged());
    let bob = deactivated.user(3).expect("bob stays in TeamCity");
    assert!(bob.deactivated && bob.groups.is_empty() && bob.roles.is_empty());

    // While inactive, the IdP moved Bob from Devs to Ops.
    let back = with(base_dir(), |d| {
        d.groups[0].members.retain(|m| m != "u2");
        d.groups[1].members.push("u2".into());
    });
    check(
        "reactivate",
        &back,
        &policy,
        &deactivated,
        strip(),
        &[
            join(id(3), &k("g2")),
            join(id(3), DEFAULTS_GROUP_KEY),
            Action::ClearDeactivated { user: 3 },
        ],
    );

    // Still inactive, no tokens: nothing. Tokens appeared: revoke only.
    check("still inactive", &off, &policy, &deactivated, strip(), &[]);
    let mut with_tokens = deactivated.clone();
    with_tokens.users[2].token_count = Some(2);
    check(
        "token created after deactivation",
        &off,
        &policy,
        &with_tokens,
        strip(),
        &[Action::RevokeTokens { user: 3 }],
    );
}

#[test]
fn scim_delete_per_deprovision_mode() {
    let policy = pol(POLICY);
    let gone = with(base_dir(), |d| {
        d.users.retain(|u| u.id != "u2");
        d.groups[0].members.retain(|m| m != "u2");
    });
    check(
        "delete",
        &gone,
        &policy,
        &converged(),
        delete(),
        &[Action::DeleteUser { user: 3 }],
    );
    check(
        "strip",
        &gone,
        &policy,
        &converged(),
        strip(),
        &[
            [leave(3, &k("g1")), leave(3, DEFAULTS_GROUP_KEY)].to_vec(),
            deactivate(3).to_vec(),
        ]
        .concat(),
    );
    // A managed user deleted by hand in TeamCity is recreated and rejoins.
    let mut hand_deleted = converged();
    hand_deleted.users.retain(|u| u.id != 3);
    check(
        "managed user deleted by hand",
        &base_dir(),
        &policy,
        &hand_deleted,
        strip(),
        &[Action::CreateUser {
            scim_id: "u2".into(),
            username: "bob".into(),
            name: Some("Bob Person".into()),
            email: Some("bob@x".into()),
            groups: vec![k("g1"), DEFAULTS_GROUP_KEY.into()],
        }],
    );
}

#[test]
fn group_changes() {
    let policy = pol(POLICY);
    let base = converged();
    let p = check(
        "group rename: one create with roles and members, then one delete",
        &with(base_dir(), |d| {
            d.groups[0].display_name = "Developers".into()
        }),
        &policy,
        &base,
        strip(),
        &[
            Action::CreateGroup {
                key: group_key("g1", 1),
                name: "Developers".into(),
                marker: "g1".into(),
                roles: vec![dev()],
                members: vec![id(2), id(3)],
                replaces: Some(k("g1")),
            },
            Action::DeleteGroup { key: k("g1") },
        ],
    );
    assert!(
        guard::removals(&p.actions, &base).is_empty(),
        "a rename swap is not a removal"
    );
    // Renamed twice: generation 2, from generation 1.
    let renamed = simulate(&base, &p.actions);
    check(
        "second rename",
        &with(base_dir(), |d| {
            d.groups[0].display_name = "Engineering".into()
        }),
        &policy,
        &renamed,
        strip(),
        &[
            Action::CreateGroup {
                key: group_key("g1", 2),
                name: "Engineering".into(),
                marker: "g1".into(),
                roles: vec![dev()],
                members: vec![id(2), id(3)],
                replaces: Some(group_key("g1", 1)),
            },
            Action::DeleteGroup {
                key: group_key("g1", 1),
            },
        ],
    );
    // A swap cut short (create done, delete not): the leftover goes.
    let mut half = base.clone();
    half = simulate(&half, &p.actions[..1]);
    check(
        "interrupted swap finishes",
        &with(base_dir(), |d| {
            d.groups[0].display_name = "Developers".into()
        }),
        &policy,
        &half,
        strip(),
        &[Action::DeleteGroup { key: k("g1") }],
    );

    check(
        "group delete",
        &with(base_dir(), |d| {
            d.groups.remove(1);
        }),
        &policy,
        &base,
        strip(),
        &[Action::DeleteGroup { key: k("g2") }],
    );
    check(
        "policy change: role added and removed on a rule",
        &base_dir(),
        &pol(&POLICY.replace(
            "[\"PROJECT_DEVELOPER@p:Backend\"]",
            "[\"PROJECT_VIEWER@p:Frontend\"]",
        )),
        &base,
        strip(),
        &[
            Action::AddGroupRole {
                group: k("g1"),
                role: viewer("Frontend"),
            },
            Action::RemoveGroupRole {
                group: k("g1"),
                role: dev(),
            },
        ],
    );
    check(
        "defaults removed from policy: the defaults group goes",
        &base_dir(),
        &pol(&POLICY.replace("roles = [\"PROJECT_VIEWER@p:_Root\"]", "roles = []")),
        &base,
        strip(),
        &[Action::DeleteGroup {
            key: DEFAULTS_GROUP_KEY.into(),
        }],
    );
}

#[test]
fn drift_on_managed_objects_is_repaired() {
    let policy = pol(POLICY);
    let mut drift = converged();
    let g1 = k("g1");
    // a role added by hand to a managed group, a member removed by hand,
    // a direct role granted by hand to a managed user, a membership added by hand.
    drift
        .groups
        .iter_mut()
        .find(|g| g.key == g1)
        .expect("g1")
        .roles
        .insert(RoleAt::global("SYSTEM_ADMIN"));
    drift.users[1].groups.remove(&g1);
    drift.users[2].roles.insert(RoleAt::global("AGENT_MANAGER"));
    drift.users[2].groups.insert(k("g2"));
    check(
        "drift",
        &base_dir(),
        &policy,
        &drift,
        strip(),
        &[
            join(id(2), &g1),
            leave(3, &k("g2")),
            Action::RemoveGroupRole {
                group: g1.clone(),
                role: RoleAt::global("SYSTEM_ADMIN"),
            },
            Action::RemoveUserRole {
                user: 3,
                role: RoleAt::global("AGENT_MANAGER"),
            },
        ],
    );
}

#[test]
fn caps_keep_capped_users_inside_allowed_roles() {
    const CAPPED: &str = r#"
[[groups]]
match = { externalId = "00gDEV" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT_VIEWER"]
"#;
    let policy = pol(CAPPED);
    let base = converge(&base_dir(), &pol(POLICY), &admin_world());
    let agent = with(base_dir(), |d| d.users[1].user_type = Some("Agent".into()));
    // Bob becomes an agent while Devs gains a viewer role: he gets the allowed
    // part directly, leaves Devs, and only then Devs gains the role.
    let p = check(
        "cap",
        &agent,
        &policy,
        &base,
        strip(),
        &[
            Action::AddUserRole {
                user: id(3),
                role: viewer("Frontend"),
            },
            leave(3, &k("g1")),
            Action::AddGroupRole {
                group: k("g1"),
                role: viewer("Frontend"),
            },
        ],
    );
    let after = simulate(&base, &p.actions);
    let bob = after.user(3).expect("bob");
    let effective: BTreeSet<RoleAt> = bob
        .roles
        .iter()
        .cloned()
        .chain(
            bob.groups
                .iter()
                .flat_map(|k| after.group(k).expect("group").roles.clone()),
        )
        .collect();
    assert_eq!(effective, [viewer("Frontend"), viewer("_Root")].into());

    // A new capped user never joins the over-privileged group.
    let new_agent = with(agent, |d| {
        let mut cara = user("u3", "Cara", "cara@x");
        cara.user_type = Some("agent".into());
        d.users.push(cara);
        d.groups[0].members.push("u3".into());
    });
    let converged_capped = simulate(&base, &p.actions);
    check(
        "new capped user",
        &new_agent,
        &policy,
        &converged_capped,
        strip(),
        &[
            Action::CreateUser {
                scim_id: "u3".into(),
                username: "cara".into(),
                name: Some("Cara Person".into()),
                email: Some("cara@x".into()),
                groups: vec![DEFAULTS_GROUP_KEY.into()],
            },
            Action::AddUserRole {
                user: new("u3"),
                role: viewer("Frontend"),
            },
        ],
    );
}

#[test]
fn unmanaged_objects_are_never_changed() {
    let policy = pol(POLICY);
    // Adoption conflict: an unmanaged "cara" already exists.
    let mut world = converged();
    world.users.push(ActualUser {
        id: 50,
        username: "cara".into(),
        ..ActualUser::default()
    });
    let dir = with(base_dir(), |d| {
        d.users.push(user("u3", "Cara", "cara@x"));
        d.groups[0].members.push("u3".into());
    });
    let p = check("adoption conflict", &dir, &policy, &world, strip(), &[]);
    assert_eq!(
        p.conflicts,
        vec![Conflict::UsernameTaken {
            scim_id: "u3".into(),
            username: "cara".into(),
            holder: 50,
            holder_scim_id: None,
        }]
    );

    // A rename onto an unmanaged username: the rename waits, nothing else changes.
    let p = check(
        "rename onto unmanaged username",
        &with(base_dir(), |d| d.users[0].user_name = "admin".into()),
        &policy,
        &converged(),
        strip(),
        &[],
    );
    assert_eq!(p.conflicts.len(), 1);

    // The admin is in a managed group by hand, and has a role on an unmanaged
    // group: reported, not touched; the unmanaged group is never deleted.
    let mut world = converged();
    world.users[0].groups.insert(k("g1"));
    let p = check(
        "unmanaged untouched",
        &base_dir(),
        &policy,
        &world,
        delete(),
        &[],
    );
    assert!(p.reports.contains(&Report::UnmanagedMember {
        user: 1,
        username: "admin".into(),
        group: k("g1"),
    }));
    assert!(p.reports.contains(&Report::Unmanaged {
        users: 1,
        groups: 1
    }));

    // A SCIM group named like an unmanaged group: conflict, not created.
    let p = check(
        "group name taken",
        &with(base_dir(), |d| {
            d.groups.push(group("g3", "Local admins", None, &["u1"]))
        }),
        &policy,
        &converged(),
        strip(),
        &[],
    );
    assert_eq!(
        p.conflicts,
        vec![Conflict::GroupNameTaken {
            marker: "g3".into(),
            name: "Local admins".into(),
            holder_key: "LOCAL".into(),
        }]
    );
}

#[test]
fn defaults_group_holds_every_active_managed_user_only() {
    let policy = pol(POLICY);
    let s = converged();
    let defaults_members: BTreeSet<u64> = s
        .users
        .iter()
        .filter(|u| u.groups.contains(DEFAULTS_GROUP_KEY))
        .map(|u| u.id)
        .collect();
    assert_eq!(defaults_members, [2, 3].into(), "not the unmanaged admin");
    // A user in no SCIM group still gets the defaults.
    check(
        "groupless user joins defaults",
        &with(base_dir(), |d| {
            d.users.push(user("u3", "Cara", "cara@x"));
        }),
        &policy,
        &s,
        strip(),
        &[Action::CreateUser {
            scim_id: "u3".into(),
            username: "cara".into(),
            name: Some("Cara Person".into()),
            email: Some("cara@x".into()),
            groups: vec![DEFAULTS_GROUP_KEY.into()],
        }],
    );
    // An inactive SCIM user that never reached TeamCity is not created.
    let mut ghost = user("u4", "Dan", "dan@x");
    ghost.active = false;
    check(
        "inactive new user",
        &with(base_dir(), |d| d.users.push(ghost)),
        &policy,
        &s,
        strip(),
        &[],
    );
}

#[test]
fn guard_holds_a_large_group_delete() {
    let policy = pol(POLICY);
    let mut dir = base_dir();
    for i in 0..12 {
        dir.users
            .push(user(&format!("m{i:02}"), &format!("m{i:02}"), "m@x"));
        dir.groups[1].members.push(format!("m{i:02}"));
    }
    let world = converge(&dir, &policy, &admin_world());
    let without_ops = with(dir, |d| {
        d.groups.remove(1);
    });
    let p = plan_of(&without_ops, &policy, &world, strip());
    assert_eq!(p.actions, vec![Action::DeleteGroup { key: k("g2") }]);
    let removed = guard::removals(&p.actions, &world);
    assert_eq!(removed.len(), 13, "12 members + Ann");
    let held =
        guard::check(removed.len(), world.managed_users(), Some(10), None).expect_err("held");
    assert_eq!(held.count, 13);
    assert!(guard::check(removed.len(), world.managed_users(), Some(20), Some(100)).is_ok());

    // A role removed from a group counts its members; a leave counts one.
    let p = plan_of(
        &base_dir(),
        &pol(&POLICY.replace("roles = [\"PROJECT_DEVELOPER@p:Backend\"]", "roles = []")),
        &converged(),
        strip(),
    );
    assert_eq!(guard::removals(&p.actions, &converged()), [2, 3].into());
    let p = plan_of(
        &with(base_dir(), |d| d.groups[1].members.clear()),
        &policy,
        &converged(),
        strip(),
    );
    assert_eq!(guard::removals(&p.actions, &converged()), [2].into());
    // A rename that also drops a member counts only that member.
    let p = plan_of(
        &with(base_dir(), |d| {
            d.groups[0].display_name = "Developers".into();
            d.groups[0].members.retain(|m| m != "u2");
        }),
        &policy,
        &converged(),
        strip(),
    );
    assert_eq!(p.actions.len(), 2);
    assert_eq!(guard::removals(&p.actions, &converged()), [3].into());
}

#[test]
fn render_reads_like_terraform() {
    let policy = pol(POLICY);
    let base = converged();
    let dir = with(base_dir(), |d| {
        d.users.push(user("u3", "Cara", "cara@x"));
        d.users[0].email = Some("ann@new".into());
        d.users[1].active = false;
        d.groups[0].display_name = "Developers".into();
        d.groups.remove(1);
    });
    let p = plan_of(&dir, &policy, &base, strip());
    let text = sync::render(&p, &base);
    let g1 = k("g1");
    let g1b = group_key("g1", 1);
    let g2 = k("g2");
    let want = format!(
        r#"  + user "cara" (scim u3)
      + name:  "Cara Person"
      + email: "cara@x"
      + group "SCIM: default roles"

  ~ user "ann" (id:2)
      ~ email: "ann@x" -> "ann@new"

  ~ user "bob" (id:3)
      - group "SCIM: default roles"
      - all access tokens
      ~ password: (random)
      - remember-me data
      - sessions
      ~ deactivated: false -> true   (after: leaves of group "SCIM: default roles", revoke tokens, reset password and 2 more)

  - group "Ops" [{g2}]
      - group   [awaits approval: the directory does not know group g2]

  + group "Developers" [{g1b}]
      + role PROJECT_DEVELOPER@p:Backend
      + member "ann"

  - group "Devs" [{g1}]
      - group   (after: create group "Developers")

  # 1 unmanaged user(s) and 1 unmanaged group(s) left untouched

Plan: 2 to add, 2 to change, 2 to destroy.
"#
    );
    assert_eq!(text, want);
    assert_eq!(
        sync::render(&plan_of(&base_dir(), &policy, &base, strip()), &base),
        "  # 1 unmanaged user(s) and 1 unmanaged group(s) left untouched\n\nNo changes. TeamCity matches the directory.\n"
    );
}

// ---- prerequisites ------------------------------------------------------------------

/// Each step's prerequisites, as readable `kind(target) <- [kind(target), …]` lines, for the
/// steps that have any.
fn deps_of(p: &Plan) -> Vec<String> {
    let name = |a: &Action| -> String {
        let (target, _) = sync::engine::describe(a);
        format!("{}({target})", sync::apply::kind(a))
    };
    p.actions
        .iter()
        .zip(&p.deps)
        .filter(|(_, d)| !d.is_empty())
        .map(|(a, d)| {
            let mut needs: Vec<String> = d.iter().map(|j| name(&p.actions[*j])).collect();
            needs.sort();
            format!("{} <- [{}]", name(a), needs.join(", "))
        })
        .collect()
}

#[test]
fn steps_carry_their_prerequisites() {
    let policy = pol(POLICY);
    let base = converged();
    let g1 = k("g1");
    let g1b = group_key("g1", 1);
    // (case, directory change, expected prerequisites)
    let cases: Vec<(&str, Directory, Vec<String>)> = vec![
        (
            // Joins of existing groups ride on the create itself: nothing waits for it.
            "a new user's joins are part of its create",
            with(base_dir(), |d| {
                d.users.push(user("u3", "Cara", "cara@x"));
                d.groups[0].members.push("u3".into());
            }),
            vec![],
        ),
        (
            "a rename's delete needs the replacement",
            with(base_dir(), |d| {
                d.groups[0].display_name = "Developers".into()
            }),
            vec![format!(
                "delete_group(group:{g1}) <- [create_group(group:{g1b})]"
            )],
        ),
        (
            "the deactivated marker needs every strip step",
            with(base_dir(), |d| d.users[1].active = false),
            vec![
                "set_deactivated(user:3) <- [clear_remember_me(user:3), end_sessions(user:3), \
                 remove_from_group(user:3), remove_from_group(user:3), reset_password(user:3), \
                 revoke_tokens(user:3)]"
                    .to_owned(),
            ],
        ),
        ("no change, no steps", base_dir(), vec![]),
    ];
    for (case, dir, want) in cases {
        let p = plan_of(&dir, &policy, &base, strip());
        assert_eq!(p.deps.len(), p.actions.len(), "{case}");
        assert_eq!(deps_of(&p), want, "{case}: {:#?}", p.actions);
        // Prerequisites come first, in an earlier wave or earlier in the same lane.
        let waves = sync::waves::waves(&p.actions);
        let mut at = vec![(0, 0); p.actions.len()];
        for (w, wave) in waves.iter().enumerate() {
            for (l, lane) in wave.iter().enumerate() {
                for &i in lane {
                    at[i] = (w, l);
                }
            }
        }
        for (i, d) in p.deps.iter().enumerate() {
            for &j in d {
                assert!(j < i, "{case}");
                assert!(
                    at[j].0 < at[i].0 || (at[j] == at[i]),
                    "{case}: step {j} runs before step {i}"
                );
            }
        }
    }
}

#[test]
fn a_group_role_waits_for_the_leaves_of_that_group() {
    // Bob is capped to PROJECT_VIEWER; Devs gains PROJECT_DEVELOPER (beyond the cap), so Bob
    // leaves Devs first, and the role is added only after that leave.
    let capped = r#"
[[groups]]
match = { externalId = "00gDEV" }
roles = ["PROJECT_VIEWER@p:Backend"]
[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT_VIEWER"]
"#;
    let dir = with(base_dir(), |d| d.users[1].user_type = Some("Agent".into()));
    let base = converge(&dir, &pol(capped), &admin_world());
    let wider = capped.replace(
        r#"roles = ["PROJECT_VIEWER@p:Backend"]"#,
        r#"roles = ["PROJECT_VIEWER@p:Backend", "PROJECT_DEVELOPER@p:Backend"]"#,
    );
    let p = plan_of(&dir, &pol(&wider), &base, strip());
    let g1 = k("g1");
    let deps = deps_of(&p);
    assert!(
        deps.contains(&format!(
            "add_group_role(group:{g1}) <- [remove_from_group(user:3)]"
        )),
        "{deps:#?} {:#?}",
        p.actions
    );
}

// ---- scoped plans (an outbox pass) ----------------------------------------------

/// What `Store::directory_of(users, groups, context)` returns from `dir`: the users named and
/// the user members of the groups named (with `context`, those beyond `users` and the users
/// `context` read as users only); the groups named with all their members; every other group
/// of the users read whole with its memberships among them only.
fn part_of(
    dir: &Directory,
    users: &BTreeSet<String>,
    groups: &BTreeSet<String>,
    context: Option<&BTreeSet<String>>,
) -> Directory {
    let mut whole: BTreeSet<&str> = users.iter().map(String::as_str).collect();
    let mut load = whole.clone();
    for g in dir.groups.iter().filter(|g| groups.contains(&g.id)) {
        load.extend(g.members.iter().map(String::as_str));
    }
    match context {
        None => whole = load.clone(),
        Some(c) => load.extend(c.iter().map(String::as_str)),
    }
    let users: Vec<_> = dir
        .users
        .iter()
        .filter(|u| load.contains(u.id.as_str()))
        .cloned()
        .collect();
    let groups = dir
        .groups
        .iter()
        .filter_map(|g| {
            if groups.contains(&g.id) {
                return Some(g.clone());
            }
            let members: Vec<String> = g
                .members
                .iter()
                .filter(|m| whole.contains(m.as_str()))
                .cloned()
                .collect();
            (!members.is_empty()).then(|| DirGroup {
                members,
                ..g.clone()
            })
        })
        .collect();
    Directory { users, groups }
}

/// The scoped plan an outbox pass makes for rows naming `users` and `groups` planned whole,
/// against the part of `actual` it takes out of the cache, as the engine builds it: with
/// `context`, the groups' members are context members where they can be (the engine's way),
/// else every member is planned whole.
fn scoped_plan(
    dir: &Directory,
    policy: &Policy,
    actual: &ActualState,
    opts: PlanOptions,
    users: &[&str],
    groups: &[&str],
    context: bool,
) -> (Plan, ActualState) {
    let groups: BTreeSet<String> = groups.iter().map(|g| (*g).to_owned()).collect();
    let mut named: BTreeSet<String> = users.iter().map(|u| (*u).to_owned()).collect();
    let mut cached = sync::scope::Cached::from(actual.clone());
    // The members an upsert row lists (the directory's), and those TeamCity has.
    let mut members: BTreeSet<String> = dir
        .groups
        .iter()
        .filter(|g| groups.contains(&g.id))
        .flat_map(|g| g.members.iter().cloned())
        .collect();
    members.extend(cached.member_scim_ids(&groups));
    let (part_dir, scope) = if context {
        let ctx = cached.split_members(&mut named, members, !policy.caps.is_empty());
        let part_dir = part_of(dir, &named, &groups, Some(&ctx));
        let scope = sync::scope::scope_for(named, groups.clone(), &part_dir, &ctx);
        (part_dir, scope)
    } else {
        named.extend(members);
        let part_dir = part_of(dir, &named, &groups, None);
        let mut scope = sync::plan::Scope {
            users: named,
            groups: groups.clone(),
        };
        scope
            .users
            .extend(part_dir.users.iter().map(|u| u.id.clone()));
        (part_dir, scope)
    };
    let d = desired(
        &part_dir,
        policy,
        &Pins::new(),
        &DesiredOptions {
            partial: Some(groups),
            ..DesiredOptions::default()
        },
    );
    let part = cached.extract(&d, &scope);
    let p = sync::plan::plan_in(&d, &part.actual, &opts, Some(&scope));
    (p, part.actual)
}

/// With everything else in sync, a pass that plans only what its rows touch plans exactly
/// what the whole plan does — the same steps, prerequisites and orphans, and the guard counts
/// the same losses on the part as on the whole.
#[test]
fn scoped_plans_equal_the_whole_plan_when_the_rest_is_in_sync() {
    let capped = r#"
[[groups]]
match = { externalId = "00gDEV" }
roles = ["PROJECT_DEVELOPER@p:Backend"]
[[groups]]
match = { externalId = "00gOPS" }
roles = ["PROJECT_ADMIN@p:Backend", "PROJECT_DEVELOPER@p:Backend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT_VIEWER@p:_Root", "PROJECT_DEVELOPER@p:Backend"]
"#;
    type Change = fn(&mut Directory);
    /// Case, policy, change, users named by rows, groups planned whole, options.
    type Case<'a> = (
        &'a str,
        &'a str,
        Change,
        &'a [&'a str],
        &'a [&'a str],
        PlanOptions,
    );
    let cases: Vec<Case<'_>> = vec![
        (
            "add a member",
            POLICY,
            |d| d.groups[1].members.push("u2".into()),
            &["u2"],
            &[],
            strip(),
        ),
        (
            "remove a member",
            POLICY,
            |d| d.groups[0].members.retain(|m| m != "u2"),
            &["u2"],
            &[],
            strip(),
        ),
        (
            "deactivate",
            POLICY,
            |d| d.users[0].active = false,
            &["u1"],
            &[],
            strip(),
        ),
        (
            "user fields",
            POLICY,
            |d| d.users[1].email = Some("robert@x".into()),
            &["u2"],
            &[],
            strip(),
        ),
        (
            "rename a user to a taken name",
            POLICY,
            |d| d.users[1].user_name = "admin".into(),
            &["u2"],
            &[],
            strip(),
        ),
        (
            "new user in a group",
            POLICY,
            |d| {
                d.users.push(user("u3", "Cat", "cat@x"));
                d.groups[1].members.push("u3".into());
            },
            &["u3"],
            &["g2"],
            strip(),
        ),
        (
            "new group with members",
            POLICY,
            |d| d.groups.push(group("g3", "QA", None, &["u1", "u2"])),
            &[],
            &["g3"],
            strip(),
        ),
        (
            "group renamed (a swap)",
            POLICY,
            |d| d.groups[0].display_name = "Developers".into(),
            &[],
            &["g1"],
            strip(),
        ),
        (
            "group renamed to a taken name",
            POLICY,
            |d| d.groups[1].display_name = "Local admins".into(),
            &[],
            &["g2"],
            strip(),
        ),
        (
            "group gains a rule",
            POLICY,
            |d| d.groups[1].external_id = Some("00gDEV".into()),
            &[],
            &["g2"],
            strip(),
        ),
        (
            "group replaced without a member",
            POLICY,
            |d| d.groups[0].members = vec!["u1".into()],
            &["u2"],
            &["g1"],
            strip(),
        ),
        (
            "group deleted",
            POLICY,
            |d| {
                d.groups.remove(1);
            },
            &[],
            &["g2"],
            strip(),
        ),
        (
            "user deleted, strip",
            POLICY,
            |d| {
                d.users.remove(1);
                for g in &mut d.groups {
                    g.members.retain(|m| m != "u2");
                }
            },
            &["u2"],
            &[],
            strip(),
        ),
        (
            "user deleted, delete",
            POLICY,
            |d| {
                d.users.remove(1);
                for g in &mut d.groups {
                    g.members.retain(|m| m != "u2");
                }
            },
            &["u2"],
            &[],
            delete(),
        ),
        (
            "capped user's group gains a role beyond the cap",
            capped,
            |d| d.groups[1].external_id = Some("00gOPS".into()),
            &[],
            &["g2"],
            strip(),
        ),
        (
            "capped user added to a group beyond the cap",
            capped,
            |d| d.groups[2].members.push("u3".into()),
            &["u3"],
            &[],
            strip(),
        ),
        (
            "capped user deactivated",
            capped,
            |d| d.users[2].active = false,
            &["u3"],
            &[],
            strip(),
        ),
    ];
    for (case, policy, change, users, groups, opts) in cases {
        let policy = pol(policy);
        let mut before = base_dir();
        if case.starts_with("capped") {
            // Cat is capped, in Ops; Admins' roles go beyond the cap.
            let mut agent = user("u3", "Cat", "cat@x");
            agent.user_type = Some("Agent".into());
            before.users.push(agent);
            before.groups[1].members.push("u3".into());
            before
                .groups
                .push(group("g3", "Admins", Some("00gOPS"), &["u1"]));
        }
        let actual = converge(&before, &policy, &admin_world());
        let after = with(before, change);
        let d = desired(&after, &policy, &Pins::new(), &DesiredOptions::default());
        let whole = plan(&d, &actual, &opts);
        assert!(
            !whole.actions.is_empty() || !whole.conflicts.is_empty(),
            "case {case}: a change"
        );
        for context in [false, true] {
            let case = format!("{case} (context members: {context})");
            let (scoped, part) =
                scoped_plan(&after, &policy, &actual, opts, users, groups, context);
            assert_eq!(scoped.actions, whole.actions, "case {case}: steps");
            assert_eq!(scoped.deps, whole.deps, "case {case}: prerequisites");
            assert_eq!(scoped.orphans, whole.orphans, "case {case}: orphans");
            assert_eq!(scoped.conflicts, whole.conflicts, "case {case}: conflicts");
            assert_eq!(
                guard::losses(&scoped.actions, &part),
                guard::losses(&whole.actions, &actual),
                "case {case}: the guard counts the same losses"
            );
            // The part is a state of its own: every group of its users is in it.
            for u in &part.users {
                for g in &u.groups {
                    assert!(part.group(g).is_some(), "case {case}: {g} of {} held", u.id);
                }
            }
            assert!(
                part.users.len() < actual.users.len() || users.len() + groups.len() > 1,
                "case {case}: the part is smaller than the whole ({} of {} users)",
                part.users.len(),
                actual.users.len()
            );
        }
    }
}

/// A pass planning one user never touches anyone else, even when the rest of TeamCity has
/// drifted: drift and objects the directory does not know wait for the reconcile.
#[test]
fn a_scoped_plan_leaves_drift_and_unknown_objects_to_the_reconcile() {
    let policy = pol(POLICY);
    let mut actual = converged();
    // Drift on Bob (removed from Devs by hand), an orphan managed user and an orphan group.
    actual.users[2].groups.remove(&k("g1"));
    actual.users.push(ActualUser {
        id: 40,
        username: "ghost".into(),
        scim_id: Some("ghost".into()),
        groups: [k("g1")].into(),
        ..ActualUser::default()
    });
    actual.groups.push(ActualGroup {
        key: k("gone"),
        name: "Gone".into(),
        marker: Some("gone".into()),
        roles: BTreeSet::new(),
    });
    let dir = with(base_dir(), |d| {
        d.users[0].display_name = Some("Annie".into())
    });
    let (p, _) = scoped_plan(&dir, &policy, &actual, strip(), &["u1"], &[], true);
    assert_eq!(p.actions.len(), 1, "{:?}", p.actions);
    assert!(matches!(&p.actions[0], Action::UpdateUser { user: 2, .. }));
    assert!(p.orphans.is_empty() && p.reports.is_empty());
    // The whole plan repairs all of it.
    let whole = plan_of(&dir, &policy, &actual, strip());
    assert!(
        whole.actions.len() > 3 && whole.orphans.len() >= 2,
        "{:?}",
        whole.actions
    );
}

/// A pass creating a group plans its members as context members: each joins the new group
/// (in its create call) and nothing else of theirs is planned or read — drift in their other
/// groups waits for the reconcile — while a member planned whole (context off) is repaired
/// everywhere, and a member the directory deactivated is planned whole (offboarded).
#[test]
fn a_new_groups_members_are_planned_only_in_that_group() {
    let policy = pol(POLICY);
    let mut actual = converged();
    // Drift: Bob (id 3) was taken out of Devs by hand.
    let bob = actual.users.iter_mut().find(|u| u.id == 3).expect("bob");
    assert!(bob.groups.remove(&k("g1")));
    let dir = with(base_dir(), |d| {
        d.groups.push(group("g3", "QA", None, &["u1", "u2"]))
    });

    let (p, part) = scoped_plan(&dir, &policy, &actual, strip(), &[], &["g3"], true);
    assert_eq!(p.actions.len(), 1, "{:#?}", p.actions);
    match &p.actions[0] {
        Action::CreateGroup { key, members, .. } => {
            assert_eq!(key, &k("g3"));
            assert_eq!(members, &vec![id(2), id(3)]);
        }
        other => panic!("{other:?}"),
    }
    assert!(part.users.iter().any(|u| u.id == 3));
    // Nor are their other groups copied out of the cache: Devs and Ops are neither planned
    // nor joined here, and a context member is read with only the groups the pass holds.
    let keys: BTreeSet<&str> = part.groups.iter().map(|g| g.key.as_str()).collect();
    assert!(
        !keys.contains(k("g1").as_str()) && !keys.contains(k("g2").as_str()),
        "{keys:?}"
    );
    for u in &part.users {
        assert!(u.groups.iter().all(|g| keys.contains(g)), "{u:?} {keys:?}");
    }

    // Members planned whole: Bob's drift in Devs is repaired by the same pass.
    let (p, _) = scoped_plan(&dir, &policy, &actual, strip(), &[], &["g3"], false);
    assert!(
        p.actions.iter().any(|a| matches!(
            a,
            Action::AddToGroup { user: UserRef::Id(3), group } if *group == k("g1")
        )),
        "{:#?}",
        p.actions
    );

    // A member the directory deactivated is offboarded whole, not left in its other groups.
    let dir = with(dir, |d| d.users[0].active = false);
    let (p, _) = scoped_plan(&dir, &policy, &actual, strip(), &[], &["g3"], true);
    assert!(
        p.actions
            .iter()
            .any(|a| matches!(a, Action::SetDeactivated { user: 2 })),
        "{:#?}",
        p.actions
    );
    assert!(
        p.actions.iter().any(|a| matches!(
            a,
            Action::RemoveFromGroup { user: 2, group } if *group == k("g1")
        )),
        "{:#?}",
        p.actions
    );
}
