//! Concurrent (wave) apply in the engine: ends in the same TeamCity state as a sequential
//! `apply` of the same plans, and keeps the orders the plan relies on (a rename swap creates
//! before it deletes, so a failed create leaves the old group and everyone's access in place).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use scim::ResourceKind;
use serde_json::json;
use store::{DynStore, NewMember, SystemClock, WriteCtx};
use sync::desired::{DesiredOptions, desired, group_key};
use sync::plan::{PlanOptions, plan};
use sync::policy::{Pins, Policy};
use sync::{Engine, EngineConfig, GuardLimits, apply, read_actual};
use teamcity::{Client, ClientConfig, Token};
use teamcity_emulator::{Emulator, EmulatorOptions, Fault, FaultAction, State};

const TOKEN: &str = "waves-test-token";
const POLICY: &str = r#"
[[groups]]
match = { externalId = "00g-0" }
roles = ["PROJECT_DEVELOPER@p:Backend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

async fn emulator() -> (Client, Emulator) {
    teamcity::install_crypto_provider();
    let (base, emu) = teamcity_emulator::spawn(EmulatorOptions {
        token: TOKEN.into(),
        projects: vec!["Backend".into()],
        latency: Duration::from_millis(1),
        ..EmulatorOptions::default()
    })
    .await
    .expect("emulator");
    let mut cfg = ClientConfig::new(base, Token::new(TOKEN));
    cfg.max_concurrency = 4;
    (Client::new(cfg).expect("client"), emu)
}

fn user_attrs(i: usize, active: bool) -> serde_json::Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": format!("user{i}@example.com"),
        "displayName": format!("User {i}"),
        "emails": [{"value": format!("user{i}@example.com"), "primary": true}],
        "active": active,
    })
}

fn group_attrs(g: usize, name: &str) -> serde_json::Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": name,
        "externalId": format!("00g-{g}"),
    })
}

fn member(id: &str) -> NewMember {
    NewMember {
        value: id.to_owned(),
        ty: Some(store::MemberType::User),
        display: None,
    }
}

/// 30 users; group g holds the users i with i % 4 == g or i % 7 == g.
async fn seed(store: &DynStore) -> (Vec<String>, Vec<String>) {
    let ctx = WriteCtx::cli();
    let mut users = vec![];
    for i in 0..30 {
        let r = store
            .create(&ctx, ResourceKind::User, user_attrs(i, true), None)
            .await
            .expect("user");
        users.push(r.id);
    }
    let mut groups = vec![];
    for g in 0..4 {
        let members = (0..30)
            .filter(|i| i % 4 == g || i % 7 == g)
            .map(|i| member(&users[i]))
            .collect();
        let r = store
            .create(
                &ctx,
                ResourceKind::Group,
                group_attrs(g, &format!("Group {g}")),
                Some(members),
            )
            .await
            .expect("group");
        groups.push(r.id);
    }
    (users, groups)
}

/// TeamCity state without ids (creation order differs between sequential and concurrent
/// apply): users by username, groups by key.
type UserView = (
    Option<String>,
    BTreeMap<String, String>,
    BTreeSet<String>,
    BTreeSet<(String, String)>,
);
type GroupView = (String, BTreeMap<String, String>, BTreeSet<(String, String)>);

fn view(s: &State) -> (BTreeMap<String, UserView>, BTreeMap<String, GroupView>) {
    let users = s
        .users
        .values()
        .map(|u| {
            (
                u.username.clone(),
                (
                    u.name.clone(),
                    u.properties.clone(),
                    u.groups.clone(),
                    u.roles.clone(),
                ),
            )
        })
        .collect();
    let groups = s
        .groups
        .values()
        .map(|g| {
            (
                g.key.clone(),
                (g.name.clone(), g.properties.clone(), g.roles.clone()),
            )
        })
        .collect();
    (users, groups)
}

/// The plan for the store's directory against `client`'s TeamCity, applied one by one.
async fn sequential(engine: &Engine, client: &Client) {
    let dir = engine.directory().await.expect("directory");
    let policy = Policy::from_toml(POLICY).expect("policy");
    let d = desired(&dir, &policy, &Pins::new(), &DesiredOptions::default());
    let (actual, _) = read_actual(client, 7).await.expect("read");
    let p = plan(&d, &actual, &PlanOptions::default());
    // `apply` runs the actions one after the other, in plan order.
    apply(client, &p.actions, &actual, &mut BTreeMap::new())
        .await
        .expect("sequential apply");
}

fn engine(store: &DynStore, client: Client) -> Engine {
    Engine::new(
        store.clone(),
        client,
        Policy::from_toml(POLICY).expect("policy"),
        EngineConfig {
            limits: GuardLimits {
                max_removals: None,
                max_removals_percent: None,
            },
            ..EngineConfig::default()
        },
    )
}

#[tokio::test]
async fn wave_apply_ends_where_sequential_apply_does() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::open(
        &format!("sqlite://{}", dir.path().join("w.db").display()),
        Arc::new(SystemClock),
    )
    .await
    .expect("store");
    let (users, groups) = seed(&store).await;
    let (seq_client, seq_emu) = emulator().await;
    let (con_client, con_emu) = emulator().await;
    let seq_engine = engine(&store, seq_client.clone());
    let con_engine = engine(&store, con_client);

    // Initial load: users, groups with members, the defaults group.
    sequential(&seq_engine, &seq_client).await;
    let r = con_engine.reconcile(false).await.expect("reconcile");
    assert!(
        r.applied > 30 && r.failed == 0 && !r.transient_stop,
        "{r:?}"
    );
    assert_eq!(view(&seq_emu.snapshot()), view(&con_emu.snapshot()));

    // Changes of every phase: a rename swap, a deactivation, a new user joining, a leave.
    let ctx = WriteCtx::cli();
    let keep: Vec<NewMember> = (0..30)
        .filter(|i| (i % 4 == 1 || i % 7 == 1) && *i != 5)
        .map(|i| member(&users[i]))
        .collect();
    store
        .replace(
            &ctx,
            ResourceKind::Group,
            &groups[1],
            None,
            group_attrs(1, "Group 1 renamed"),
            Some(keep),
        )
        .await
        .expect("rename");
    store
        .replace(
            &ctx,
            ResourceKind::User,
            &users[2],
            None,
            user_attrs(2, false),
            None,
        )
        .await
        .expect("deactivate");
    let new = store
        .create(&ctx, ResourceKind::User, user_attrs(99, true), None)
        .await
        .expect("new user");
    let mut g0: Vec<NewMember> = (0..30)
        .filter(|i| i % 4 == 0 || i % 7 == 0)
        .map(|i| member(&users[i]))
        .collect();
    g0.push(member(&new.id));
    store
        .replace(
            &ctx,
            ResourceKind::Group,
            &groups[0],
            None,
            group_attrs(0, "Group 0"),
            Some(g0),
        )
        .await
        .expect("join");
    sequential(&seq_engine, &seq_client).await;
    let r = con_engine.reconcile(false).await.expect("reconcile");
    assert!(r.failed == 0 && !r.transient_stop, "{r:?}");
    let (seq_view, con_view) = (view(&seq_emu.snapshot()), view(&con_emu.snapshot()));
    assert_eq!(seq_view, con_view);
    // The swap happened: the new generation exists, the old key is gone.
    assert!(con_view.1.contains_key(&group_key(&groups[1], 1)));
    assert!(!con_view.1.contains_key(&group_key(&groups[1], 0)));
    // Nothing left to do.
    let (p, _, _) = con_engine.plan_full().await.expect("plan");
    assert!(p.actions.is_empty(), "{:?}", p.actions);
}

#[tokio::test]
async fn a_failed_swap_create_leaves_the_old_group_and_a_failed_create_user_its_joins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = store::open(
        &format!("sqlite://{}", dir.path().join("w.db").display()),
        Arc::new(SystemClock),
    )
    .await
    .expect("store");
    let (users, groups) = seed(&store).await;
    let (client, emu) = emulator().await;
    let engine = engine(&store, client);
    engine.reconcile(false).await.expect("initial load");
    let old_key = group_key(&groups[3], 0);
    let members_of = |emu: &Emulator, key: &str| {
        emu.snapshot()
            .users
            .values()
            .filter(|u| u.groups.contains(key))
            .count()
    };
    let before = members_of(&emu, &old_key);
    assert!(before > 0);

    // Rename group 3 and add a new user to group 0; TeamCity fails every group create.
    let ctx = WriteCtx::cli();
    let members: Vec<NewMember> = (0..30)
        .filter(|i| i % 4 == 3 || i % 7 == 3)
        .map(|i| member(&users[i]))
        .collect();
    store
        .replace(
            &ctx,
            ResourceKind::Group,
            &groups[3],
            None,
            group_attrs(3, "Group 3 renamed"),
            Some(members),
        )
        .await
        .expect("rename");
    emu.inject_fault(Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/userGroups".into()),
        path_contains: None,
        times: 100,
        action: FaultAction::Status {
            status: 503,
            retry_after_secs: None,
        },
    });
    let r = engine.reconcile(false).await.expect("reconcile");
    assert!(r.transient_stop, "{r:?}");
    // The create came first and failed: the old group was not deleted, nobody lost access.
    let s = emu.snapshot();
    assert!(s.groups.contains_key(&old_key));
    assert!(!s.groups.contains_key(&group_key(&groups[3], 1)));
    assert_eq!(members_of(&emu, &old_key), before);

    // TeamCity recovers: the swap completes.
    emu.clear_faults();
    let r = engine.reconcile(false).await.expect("reconcile");
    assert!(!r.transient_stop && r.failed == 0, "{r:?}");
    let s = emu.snapshot();
    assert!(!s.groups.contains_key(&old_key));
    assert_eq!(members_of(&emu, &group_key(&groups[3], 1)), before);

    // A user whose create fails transiently is not joined to anything (its join is in a
    // later wave, which does not run).
    let new = store
        .create(&ctx, ResourceKind::User, user_attrs(77, true), None)
        .await
        .expect("user");
    emu.reset_counters();
    emu.inject_fault(Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: 1,
        action: FaultAction::Status {
            status: 503,
            retry_after_secs: None,
        },
    });
    let r = engine.reconcile(false).await.expect("reconcile");
    assert!(r.transient_stop, "{r:?}");
    let joins = emu
        .counters()
        .get("POST /app/rest/users/{u}/groups")
        .copied()
        .unwrap_or(0);
    assert_eq!(joins, 0, "no join ran after the failed create");
    let r = engine.reconcile(false).await.expect("reconcile");
    assert!(!r.transient_stop && r.failed == 0, "{r:?}");
    let s = emu.snapshot();
    let u = s
        .users
        .values()
        .find(|u| u.properties.get(sync::USER_MARKER) == Some(&new.id))
        .expect("created");
    assert!(u.groups.contains(sync::DEFAULTS_GROUP_KEY));
}
