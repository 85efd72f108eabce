//! (3) The outbox worker: coalescing, retries with backoff, dead letters, retry/drop, the
//! mapping, and unmanaged TeamCity objects left alone.

use std::time::Duration;

use serde_json::json;
use store::{OutboxState, WriteCtx};
use sync::{DEFAULTS_GROUP_KEY, Deprovision, EngineConfig, group_key};
use teamcity_emulator::{Fault, FaultAction};

use crate::support::{POLICY, World, cfg};

#[tokio::test]
async fn coalesces_every_pending_row_of_an_entity_into_one_pass() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    for n in 1..=5 {
        w.patch(
            &format!("/Users/{ann}"),
            json!([{"op": "replace", "path": "displayName", "value": format!("Ann v{n}")}]),
        )
        .await;
    }
    assert_eq!(w.pending().await, 6);
    let r = w.engine.run_once().await.expect("pass");
    assert_eq!(r.outbox_rows, 6, "all six rows in one claim: {r:?}");
    assert_eq!(w.pending().await, 0);
    assert_eq!(w.rows(OutboxState::Done).await.len(), 6);
    let c = w.emu.counters();
    assert_eq!(c.get("POST /app/rest/users"), Some(&1), "{c:?}");
    assert!(
        !c.keys().any(|k| k.starts_with("PUT /app/rest/users")),
        "created with the final name, never updated: {c:?}"
    );
    assert_eq!(
        w.tc_user("ann").expect("ann").name.as_deref(),
        Some("Ann v5")
    );
}

#[tokio::test]
async fn transient_failure_is_retried_with_backoff() {
    let w = World::with(
        POLICY,
        EngineConfig {
            retry: store::RetryPolicy {
                base: Duration::from_millis(400),
                cap: Duration::from_millis(400),
                max_attempts: 100,
            },
            ..cfg()
        },
    )
    .await;
    w.engine.read_actual().await.expect("warm");
    w.engine.drain().await.expect("fill the cache");
    w.emu.inject_fault(Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: 2,
        action: FaultAction::Status {
            status: 503,
            retry_after_secs: None,
        },
    });
    w.create_user("ann", None).await;
    let r = w.engine.run_once().await.expect("pass");
    assert!(r.transient_stop, "{r:?}");
    let rows = w.rows(OutboxState::Pending).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].item.attempts, 1);
    assert!(
        rows[0]
            .last_error
            .as_deref()
            .unwrap_or("")
            .contains("create_user"),
        "{rows:?}"
    );
    assert!(
        rows[0].next_attempt_at > rows[0].created,
        "backoff scheduled"
    );
    // Not due yet: an immediate pass claims nothing.
    let r = w.engine.run_once().await.expect("pass");
    assert_eq!(r.outbox_rows, 0, "the row waits out its backoff: {r:?}");

    w.drain_until_idle(&w.engine, Duration::from_secs(10)).await;
    assert_eq!(w.rows(OutboxState::Done).await.len(), 1);
    assert_eq!(w.rows(OutboxState::Dead).await.len(), 0);
    assert_eq!(
        w.emu.counters().get("POST /app/rest/users"),
        Some(&3),
        "two refused, one accepted"
    );
    let s = w.emu.snapshot();
    assert_eq!(
        s.users
            .values()
            .filter(|u| u.username == "ann@example.com")
            .count(),
        1
    );
}

#[tokio::test]
async fn permanent_failure_is_dead_with_reason_then_retry_and_drop() {
    let w = World::start().await;
    w.engine.drain().await.expect("fill the cache");
    w.emu.inject_fault(Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: 1,
        action: FaultAction::Status {
            status: 403,
            retry_after_secs: None,
        },
    });
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    let r = w.drain().await;
    assert!(r.failed >= 1, "{r:?}");
    let dead = w.rows(OutboxState::Dead).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    // Both creates run in the same wave, concurrently: the refused one is whichever reached
    // TeamCity first.
    let (failed, other) = if dead[0].item.entity_id == ann {
        ("ann", "bob")
    } else {
        assert_eq!(dead[0].item.entity_id, bob);
        ("bob", "ann")
    };
    let reason = dead[0].dead_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("create_user") && reason.contains("Forbidden")
            || reason.contains("create_user"),
        "{reason}"
    );
    assert!(w.tc_user(failed).is_none());
    assert!(w.tc_user(other).is_some(), "other entities are not held up");
    let failures = w.audit_ops("create_user").await;
    assert!(
        failures
            .iter()
            .any(|e| e.outcome == "failure" && e.status == Some(403))
    );

    // outbox retry: back to pending, applied on the next pass.
    let again = w
        .store
        .retry_outbox(&WriteCtx::cli(), dead[0].item.id)
        .await
        .expect("retry");
    assert_eq!(again.item.state, OutboxState::Pending);
    w.drain().await;
    assert!(w.tc_user(failed).is_some());
    assert!(w.rows(OutboxState::Dead).await.is_empty());

    // outbox drop: a dropped row is never applied.
    w.emu.inject_fault(Fault {
        method: Some("PUT".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: 1,
        action: FaultAction::Status {
            status: 400,
            retry_after_secs: None,
        },
    });
    w.patch(
        &format!("/Users/{bob}"),
        json!([{"op": "replace", "path": "displayName", "value": "Robert"}]),
    )
    .await;
    w.drain().await;
    let dead = w.rows(OutboxState::Dead).await;
    assert_eq!(dead.len(), 1, "{dead:?}");
    let dropped = w
        .store
        .drop_outbox(&WriteCtx::cli(), dead[0].item.id)
        .await
        .expect("drop");
    assert_eq!(dropped.item.state, OutboxState::Dropped);
    assert!(w.rows(OutboxState::Dead).await.is_empty());
    assert_eq!(w.rows(OutboxState::Dropped).await.len(), 1);
}

#[tokio::test]
async fn mapping_links_scim_ids_to_teamcity_objects() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let dev = w.create_group("Developers", Some("00g-dev"), &[&ann]).await;
    w.drain().await;
    let users = w
        .store
        .mappings(scim::ResourceKind::User)
        .await
        .expect("mappings");
    let tc = w.tc_user("ann").expect("ann");
    assert_eq!(users.len(), 1, "{users:?}");
    assert_eq!(users[0].scim_id, ann);
    assert_eq!(users[0].teamcity_id, tc.id.to_string());
    assert_eq!(users[0].teamcity_name, "ann@example.com");
    let groups = w
        .store
        .mappings(scim::ResourceKind::Group)
        .await
        .expect("mappings");
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert_eq!(groups[0].teamcity_id, group_key(&dev, 0));
    assert_eq!(groups[0].teamcity_name, "Developers");

    // A rename moves the link to the new key; a delete removes it.
    w.okta_patch_group(&dev, "Platform", vec![]).await;
    w.drain().await;
    let groups = w
        .store
        .mappings(scim::ResourceKind::Group)
        .await
        .expect("mappings");
    assert_eq!(groups[0].teamcity_id, group_key(&dev, 1));
    assert_eq!(groups[0].teamcity_name, "Platform");
    w.delete(&format!("/Groups/{dev}")).await;
    w.drain().await;
    assert!(
        w.store
            .mappings(scim::ResourceKind::Group)
            .await
            .expect("m")
            .is_empty()
    );
}

#[tokio::test]
async fn unmanaged_users_and_groups_survive_every_sync() {
    let w = World::with(
        POLICY,
        EngineConfig {
            deprovision: Deprovision::Delete,
            ..cfg()
        },
    )
    .await;
    let before = w.emu.snapshot();
    let admin_before = before.users[&before.admin_id].clone();
    let local_before = before.groups["LOCAL"].clone();

    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    let dev = w
        .create_group("Developers", Some("00g-dev"), &[&ann, &bob])
        .await;
    w.drain().await;
    // The local admin is put into a managed group by hand: reported, never removed.
    let key = group_key(&dev, 0);
    let admin_id = before.admin_id;
    w.emu.with_state(|s| {
        s.users
            .get_mut(&admin_id)
            .expect("admin")
            .groups
            .insert(key.clone());
    });
    w.set_active(&ann, false).await;
    w.okta_patch_group(&dev, "Platform", vec![]).await;
    w.delete(&format!("/Users/{bob}")).await;
    w.drain().await;
    w.engine.reconcile(false).await.expect("reconcile");
    w.delete(&format!("/Groups/{dev}")).await;
    w.drain().await;
    w.engine.reconcile(false).await.expect("reconcile");

    let after = w.emu.snapshot();
    let admin = &after.users[&admin_id];
    assert_eq!(admin.username, admin_before.username);
    assert_eq!(admin.roles, admin_before.roles, "SYSTEM_ADMIN kept");
    assert!(admin.groups.contains("LOCAL"));
    assert_eq!(admin.properties, admin_before.properties);
    assert_eq!(admin.password_changes, admin_before.password_changes);
    assert!(!admin.groups.contains(DEFAULTS_GROUP_KEY));
    let local = &after.groups["LOCAL"];
    assert_eq!(local.roles, local_before.roles);
    assert_eq!(local.name, local_before.name);
    assert!(local.properties.is_empty());
}

/// A user created after its groups exist joins them in the create call itself: one TeamCity
/// call per user for a first load pushed users first. When a group it joins was deleted by
/// hand under the engine's cached view, TeamCity creates the user (marker included) and
/// answers 404: the user is not created twice, nobody is left in conflict, and the next passes
/// restore the group with every member.
#[tokio::test]
async fn new_users_join_existing_groups_in_their_create_and_survive_a_group_deleted_by_hand() {
    let w = World::start().await;
    w.create_user("ann", None).await;
    w.drain().await;
    assert!(
        w.tc_user("ann")
            .expect("ann")
            .groups
            .contains(DEFAULTS_GROUP_KEY),
        "the defaults group exists now"
    );

    // A users-first load: each new user costs exactly one TeamCity write.
    w.emu.reset_counters();
    for name in ["bob", "cid", "dee", "eve"] {
        w.create_user(name, None).await;
    }
    w.drain().await;
    assert_eq!(w.writes(), 4, "{:?}", w.emu.counters());
    for name in ["bob", "cid", "dee", "eve"] {
        let u = w.tc_user(name).expect("created");
        assert!(
            u.groups.contains(DEFAULTS_GROUP_KEY),
            "{name} joined in its create"
        );
    }
    let creates = w.audit_ops("create_user").await;
    assert!(
        creates
            .iter()
            .rev()
            .take(4)
            .all(|e| e.detail.contains(DEFAULTS_GROUP_KEY)),
        "the audit trail records the joins made by the create"
    );

    // The defaults group is deleted by hand; the engine's cached view still has it.
    w.emu.with_state(|s| {
        s.groups.remove(DEFAULTS_GROUP_KEY);
        for u in s.users.values_mut() {
            u.groups.remove(DEFAULTS_GROUP_KEY);
        }
    });
    w.create_user("fay", None).await;
    w.drain_until_idle(&w.engine, Duration::from_secs(20)).await;
    w.engine.reconcile(false).await.expect("reconcile");
    w.drain_until_idle(&w.engine, Duration::from_secs(20)).await;

    let failed: Vec<_> = w
        .audit_ops("create_user")
        .await
        .into_iter()
        .filter(|e| e.outcome == "failure")
        .collect();
    assert_eq!(
        failed.len(),
        1,
        "fay's create met the missing group (404) once: {failed:?}"
    );
    let s = w.emu.snapshot();
    let fays: Vec<_> = s
        .users
        .values()
        .filter(|u| u.username == "fay@example.com")
        .collect();
    assert_eq!(fays.len(), 1, "created once");
    assert!(fays[0].properties.contains_key(sync::USER_MARKER));
    for name in ["ann", "bob", "cid", "dee", "eve", "fay"] {
        let u = w.tc_user(name).expect("user");
        assert!(
            u.groups.contains(DEFAULTS_GROUP_KEY),
            "{name} is back in the restored defaults group"
        );
    }
    let (p, _, _) = w.engine.plan_full().await.expect("plan");
    assert!(p.actions.is_empty(), "converged: {:?}", p.actions);
    assert!(p.conflicts.is_empty(), "no conflict: {:?}", p.conflicts);
}

/// A deactivation of someone TeamCity has is not queued behind a first load's creations: the
/// next pass takes it first, however many new users wait before it.
#[tokio::test]
async fn a_change_to_someone_teamcity_has_is_applied_before_a_backlog_of_creations() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    w.drain().await;
    assert!(w.tc_user("ann").is_some());
    // A first load arrives (20 new users), then ann leaves.
    for n in 0..20 {
        w.create_user(&format!("new{n}"), None).await;
    }
    w.set_active(&ann, false).await;
    // Passes of 4 entities: one for people TeamCity has, one for the newest, two for the oldest.
    let engine = w.engine_with(POLICY, EngineConfig { batch: 4, ..cfg() });
    let r = engine.run_once().await.expect("pass");
    assert_eq!(r.outbox_rows, 4, "{r:?}");
    let gone = w.tc_user("ann").expect("ann stays, deactivated");
    assert!(
        gone.properties.contains_key(sync::USER_DEACTIVATED),
        "ann was offboarded in the first pass: {gone:?}"
    );
    let created = (0..20)
        .filter(|n| w.tc_user(&format!("new{n}")).is_some())
        .count();
    assert_eq!(
        created, 3,
        "the rest of the pass: the newest and the two oldest"
    );
    assert!(w.tc_user("new0").is_some() && w.tc_user("new1").is_some());
    assert!(w.tc_user("new19").is_some(), "the newest creation");
}

/// A backlog grows passes: a full pass far quicker than the target asks for twice as many
/// entities next time, up to the most; once the backlog is gone the next pass asks for the
/// least again.
#[tokio::test]
async fn a_backlog_grows_passes_up_to_the_most_and_they_shrink_when_it_is_gone() {
    let w = World::start().await;
    for n in 0..40 {
        w.create_user(&format!("u{n}"), None).await;
    }
    let engine = w.engine_with(
        POLICY,
        EngineConfig {
            batch: 4,
            max_batch: 16,
            pass_target: std::time::Duration::from_secs(60),
            ..cfg()
        },
    );
    let mut rows = vec![];
    for _ in 0..5 {
        rows.push(engine.run_once().await.expect("pass").outbox_rows);
    }
    // 4 + 8 + 16 + 12 (what was left) = 40, then nothing.
    assert_eq!(rows, [4, 8, 16, 12, 0]);
    for n in 0..40 {
        assert!(
            w.tc_user(&format!("u{n}")).is_some(),
            "u{n} reached TeamCity"
        );
    }
    // A new push after the backlog: a pass of the least again (4 of 6).
    for n in 40..46 {
        w.create_user(&format!("u{n}"), None).await;
    }
    assert_eq!(engine.run_once().await.expect("pass").outbox_rows, 4);
}

/// The engine reads time through its store's clock: rows the store wrote at its time are due
/// at that time, and the engine's claims, leases and retry times agree with it. A store whose
/// clock is a day ahead of the machine's (a `FixedClock` in tests; in production both are the
/// system clock) still has its rows applied.
#[tokio::test]
async fn the_engine_reads_time_through_the_stores_clock() {
    teamcity::install_crypto_provider();
    let (tc_url, emu) = teamcity_emulator::spawn(teamcity_emulator::EmulatorOptions {
        token: crate::support::TC_TOKEN.into(),
        projects: ["Backend", "Frontend", "Mobile"].map(String::from).to_vec(),
        ..teamcity_emulator::EmulatorOptions::default()
    })
    .await
    .expect("emulator");
    let ahead = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    let store = store::open(
        "sqlite::memory:",
        std::sync::Arc::new(store::FixedClock::new(ahead)),
    )
    .await
    .expect("store");
    store
        .create(
            &WriteCtx::cli(),
            scim::ResourceKind::User,
            json!({"userName": "ann@example.com", "displayName": "Ann", "active": true}),
            None,
        )
        .await
        .expect("user");
    let engine = sync::Engine::new(
        store.clone(),
        crate::support::client(&tc_url),
        sync::Policy::from_toml(POLICY).expect("policy"),
        cfg(),
    );
    engine.drain().await.expect("drain");
    assert!(
        emu.with_state(|s| s.users.values().any(|u| u.username == "ann@example.com")),
        "the row written at the store's time is applied"
    );
    let stats = store.outbox_summary().await.expect("summary");
    assert_eq!(stats.by_state.get(&OutboxState::Pending), None, "{stats:?}");
    assert_eq!(
        stats.by_state.get(&OutboxState::Done),
        Some(&1),
        "{stats:?}"
    );
}
