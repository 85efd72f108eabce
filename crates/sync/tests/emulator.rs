//! read_actual + plan + apply against the TeamCity emulator over real HTTP.

use std::collections::BTreeMap;
use std::time::Duration;

use sync::desired::{DesiredOptions, desired, group_key};
use sync::model::{
    Action, ActualState, DEFAULTS_GROUP_KEY, DirGroup, DirUser, Directory, GROUP_MARKER,
    USER_DEACTIVATED, USER_MARKER,
};
use sync::plan::{Plan, PlanOptions, plan};
use sync::policy::{Pins, Policy};
use sync::{apply, read_actual, render};
use teamcity::{Client, ClientConfig, Token};
use teamcity_emulator::{Emulator, EmulatorOptions, TokenRec};

const TOKEN: &str = "sync-test-token";

const POLICY: &str = r#"
[[groups]]
match = { externalId = "00gDEV" }
roles = ["PROJECT_DEVELOPER@p:Backend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

async fn start() -> (Client, Emulator) {
    teamcity::install_crypto_provider();
    let (base, emu) = teamcity_emulator::spawn(EmulatorOptions {
        token: TOKEN.into(),
        projects: vec!["Backend".into(), "Frontend".into()],
        groups: vec!["LOCAL".into()],
        ..EmulatorOptions::default()
    })
    .await
    .expect("spawn emulator");
    let mut config = ClientConfig::new(base, Token::new(TOKEN));
    config.request_timeout = Duration::from_secs(5);
    (Client::new(config).expect("client"), emu)
}

fn user(id: &str, name: &str) -> DirUser {
    DirUser {
        id: id.into(),
        user_name: name.into(),
        given_name: Some(name.into()),
        family_name: Some("Tester".into()),
        email: Some(format!("{}@example.com", name.to_lowercase())),
        active: true,
        ..DirUser::default()
    }
}

fn directory() -> Directory {
    Directory {
        users: vec![user("u1", "Ann"), user("u2", "Bob"), user("u3", "Cara")],
        groups: vec![
            DirGroup {
                id: "g1".into(),
                display_name: "Devs".into(),
                external_id: Some("00gDEV".into()),
                members: vec!["u1".into(), "u2".into(), "u3".into()],
            },
            DirGroup {
                id: "g2".into(),
                display_name: "Ops".into(),
                external_id: None,
                members: vec!["u1".into()],
            },
        ],
    }
}

async fn plan_now(client: &Client, dir: &Directory) -> (Plan, ActualState) {
    let policy = Policy::from_toml(POLICY).expect("policy");
    let d = desired(dir, &policy, &Pins::new(), &DesiredOptions::default());
    let (actual, _) = read_actual(client, 2).await.expect("read");
    (plan(&d, &actual, &PlanOptions::default()), actual)
}

async fn reconcile(client: &Client, dir: &Directory) -> Plan {
    let (p, actual) = plan_now(client, dir).await;
    apply(client, &p.actions, &actual, &mut BTreeMap::new())
        .await
        .expect("apply");
    p
}

fn user_id(emu: &Emulator, username: &str) -> u64 {
    emu.snapshot()
        .users
        .values()
        .find(|u| u.username == username)
        .map(|u| u.id)
        .expect("user exists")
}

#[tokio::test]
async fn converges_and_a_no_drift_reconcile_only_reads_pages() {
    let (client, emu) = start().await;
    let first = reconcile(&client, &directory()).await;
    assert_eq!(
        first
            .actions
            .iter()
            .filter(|a| matches!(a, Action::CreateGroup { .. }))
            .count(),
        3
    );

    let s = emu.snapshot();
    let ann = &s.users[&user_id(&emu, "ann")];
    assert_eq!(
        ann.properties.get(USER_MARKER).map(String::as_str),
        Some("u1")
    );
    assert_eq!(ann.name.as_deref(), Some("Ann Tester"));
    let g1 = &s.groups[&group_key("g1", 0)];
    assert_eq!(g1.name, "Devs");
    assert_eq!(
        g1.properties.get(GROUP_MARKER).map(String::as_str),
        Some("g1")
    );
    assert!(
        g1.roles
            .contains(&("PROJECT_DEVELOPER".to_owned(), "p:Backend".to_owned()))
    );
    assert!(ann.groups.contains(DEFAULTS_GROUP_KEY) && ann.groups.contains(&g1.key));
    // The unmanaged admin and group are untouched.
    let admin = &s.users[&1];
    assert!(admin.groups.is_empty() && admin.properties.is_empty());
    assert!(s.groups.contains_key("LOCAL"));

    // No drift: zero writes, one call per page (4 users / 2 = 2 full pages +
    // 1 empty) plus one group list.
    emu.reset_counters();
    let (again, actual) = plan_now(&client, &directory()).await;
    assert!(again.is_empty(), "{:?}", again.actions);
    let counters = emu.counters();
    assert!(
        counters.keys().all(|k| k.starts_with("GET ")),
        "{counters:?}"
    );
    assert_eq!(counters.get("GET /app/rest/users"), Some(&3));
    assert_eq!(counters.get("GET /app/rest/userGroups"), Some(&1));
    assert_eq!(emu.total_calls(), 4);
    assert_eq!(
        render(&again, &actual),
        "  # 1 unmanaged user(s) and 1 unmanaged group(s) left untouched\n\nNo changes. TeamCity matches the directory.\n"
    );

    // Applying the same first plan again is harmless: creates adopt, adds are no-ops.
    let mut created = BTreeMap::new();
    let report = apply(&client, &first.actions, &actual, &mut created)
        .await
        .expect("idempotent");
    assert_eq!(report.applied, first.actions.len());
    assert_eq!(report.adopted.len(), 6, "{:?}", report.adopted);
    assert!(plan_now(&client, &directory()).await.0.is_empty());
}

#[tokio::test]
async fn group_rename_swap_never_leaves_a_member_without_roles() {
    let (client, emu) = start().await;
    reconcile(&client, &directory()).await;
    let mut renamed = directory();
    renamed.groups[0].display_name = "Developers".into();
    let (p, actual) = plan_now(&client, &renamed).await;
    assert_eq!(p.actions.len(), 2, "{:?}", p.actions);
    assert!(sync::guard::removals(&p.actions, &actual).is_empty());
    let text = render(&p, &actual);
    assert!(
        text.ends_with("Plan: 1 to add, 0 to change, 1 to destroy.\n"),
        "{text}"
    );

    let (old, new) = (group_key("g1", 0), group_key("g1", 1));
    let mut created = BTreeMap::new();
    emu.reset_counters();
    apply(&client, &p.actions[..1], &actual, &mut created)
        .await
        .expect("create");
    // Between the two calls every member is in both groups, and both carry the role.
    let s = emu.snapshot();
    let role = ("PROJECT_DEVELOPER".to_owned(), "p:Backend".to_owned());
    assert!(s.groups[&old].roles.contains(&role) && s.groups[&new].roles.contains(&role));
    assert_eq!(s.groups[&new].name, "Developers");
    for name in ["ann", "bob", "cara"] {
        let u = &s.users[&user_id(&emu, name)];
        assert!(u.groups.contains(&old) && u.groups.contains(&new), "{name}");
    }
    apply(&client, &p.actions[1..], &actual, &mut created)
        .await
        .expect("delete");
    let s = emu.snapshot();
    assert!(!s.groups.contains_key(&old));
    for name in ["ann", "bob", "cara"] {
        assert!(
            s.users[&user_id(&emu, name)].groups.contains(&new),
            "{name}"
        );
    }
    let counters = emu.counters();
    assert_eq!(counters.get("POST /app/rest/userGroups"), Some(&1));
    assert_eq!(counters.get("DELETE /app/rest/userGroups/{g}"), Some(&1));
    // One read of the old group's members (so members added by hand are carried over), then
    // the two writes: a constant number of calls, not O(members).
    assert_eq!(counters.get("GET /app/rest/userGroups/{g}"), Some(&1));
    assert_eq!(emu.total_calls(), 3, "three calls, not O(members)");
    assert!(plan_now(&client, &renamed).await.0.is_empty());
}

#[tokio::test]
async fn deactivation_revokes_tokens_and_randomises_the_password() {
    let (client, emu) = start().await;
    reconcile(&client, &directory()).await;
    let bob = user_id(&emu, "bob");
    let token = |name: &str| TokenRec {
        name: name.into(),
        creation_time: "20250101T000000+0000".into(),
        expiration_time: None,
        value_sha256: None,
    };
    emu.with_state(|s| {
        let u = s.users.get_mut(&bob).expect("bob");
        u.tokens = vec![token("ci"), token("laptop")];
    });
    let password_before = emu.snapshot().users[&bob].password_changes;

    let mut off = directory();
    off.users[1].active = false;
    let p = reconcile(&client, &off).await;
    assert!(p.actions.contains(&Action::RevokeTokens { user: bob }));
    let s = emu.snapshot();
    let u = &s.users[&bob];
    assert!(u.tokens.is_empty());
    assert!(u.password_changes > password_before);
    assert!(u.groups.is_empty() && u.roles.is_empty());
    assert_eq!(
        u.properties.get(USER_DEACTIVATED).map(String::as_str),
        Some("true")
    );
    assert_eq!(
        u.properties.get(USER_MARKER).map(String::as_str),
        Some("u2")
    );

    // A token created while deactivated is revoked by the next reconcile (and
    // only that: no second password reset).
    emu.with_state(|s| s.users.get_mut(&bob).expect("bob").tokens = vec![token("sneaky")]);
    let p = reconcile(&client, &off).await;
    assert_eq!(p.actions, vec![Action::RevokeTokens { user: bob }]);
    assert!(emu.snapshot().users[&bob].tokens.is_empty());
    assert!(plan_now(&client, &off).await.0.is_empty());

    // Reactivation restores the groups from the directory and clears the marker.
    reconcile(&client, &directory()).await;
    let u = &emu.snapshot().users[&bob];
    assert!(u.groups.contains(&group_key("g1", 0)) && u.groups.contains(DEFAULTS_GROUP_KEY));
    assert!(!u.properties.contains_key(USER_DEACTIVATED));
}

#[tokio::test]
async fn apply_reports_the_failing_action() {
    let (client, emu) = start().await;
    let (p, actual) = plan_now(&client, &directory()).await;
    emu.inject_fault(teamcity_emulator::Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/userGroups".into()),
        path_contains: None,
        times: 1,
        action: teamcity_emulator::FaultAction::Status {
            status: 503,
            retry_after_secs: None,
        },
    });
    let mut created = BTreeMap::new();
    let err = apply(&client, &p.actions, &actual, &mut created)
        .await
        .expect_err("fault");
    assert_eq!(err.index, 3, "three users first, then the first group");
    assert!(err.error.is_transient());
    assert_eq!(created.len(), 3);
    // Retry the rest with the same created map: no duplicate users.
    apply(&client, &p.actions[err.index..], &actual, &mut created)
        .await
        .expect("retry");
    assert!(plan_now(&client, &directory()).await.0.is_empty());
}
