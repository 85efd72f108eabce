//! (9) Safety: what the engine must never do — take access away because a step failed, because
//! it read nothing, or because a batch could not be read — and what it must always do: finish a
//! deactivation it started, make conflicts visible, keep going when one object cannot be read.
//!
//! Each test is named after the defect it reproduces.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};
use store::{HeldState, OutboxEntry, OutboxState, WriteCtx};
use sync::{Action, EngineConfig, GuardLimits, USER_DEACTIVATED, group_key};
use teamcity_emulator::{Fault, FaultAction, State, UserRec};

use crate::support::{POLICY, World, cfg, fail_matching, fresh_store, give_tokens, roles};

/// The TeamCity ids of the direct members of group `key`.
fn members(s: &State, key: &str) -> BTreeSet<u64> {
    s.users
        .values()
        .filter(|u| u.groups.contains(key))
        .map(|u| u.id)
        .collect()
}

/// Outbox rows (any state) of one entity.
async fn rows_of(w: &World, entity_type: &str, entity_id: &str) -> Vec<OutboxEntry> {
    w.store
        .list_outbox(None, 1_000_000)
        .await
        .expect("outbox")
        .into_iter()
        .filter(|r| r.item.entity_type == entity_type && r.item.entity_id == entity_id)
        .collect()
}

/// The highest outbox row id so far (0 when empty).
async fn last_outbox_id(w: &World) -> i64 {
    w.store
        .list_outbox(None, 1_000_000)
        .await
        .expect("outbox")
        .iter()
        .map(|r| r.item.id)
        .max()
        .unwrap_or(0)
}

fn guard(max_removals: Option<usize>, max_removals_percent: Option<u32>) -> EngineConfig {
    EngineConfig {
        limits: GuardLimits {
            max_removals,
            max_removals_percent,
        },
        ..cfg()
    }
}

fn deactivated(u: &UserRec) -> Option<&str> {
    u.properties.get(USER_DEACTIVATED).map(String::as_str)
}

// ---- 1 ------------------------------------------------------------------------------------

#[tokio::test]
async fn rename_with_permanent_create_failure_keeps_the_old_group() {
    let w = World::start().await;
    let mut ids = vec![];
    for n in 0..3 {
        ids.push(w.create_user(&format!("u{n}"), None).await);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let dev = w.create_group("Developers", Some("00g-dev"), &refs).await;
    w.drain().await;
    let old_key = group_key(&dev, 0);
    let new_key = group_key(&dev, 1);
    let dev_roles = roles(&["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]);
    let member_ids: BTreeSet<u64> = (0..3)
        .map(|n| w.tc_user(&format!("u{n}")).expect("user").id)
        .collect();
    assert_eq!(members(&w.emu.snapshot(), &old_key), member_ids, "setup");

    // TeamCity refuses every group creation, for good.
    w.emu.inject_fault(Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/userGroups".into()),
        path_contains: None,
        times: u32::MAX,
        action: FaultAction::Status {
            status: 400,
            retry_after_secs: None,
        },
    });
    w.okta_patch_group(&dev, "Platform", vec![]).await;
    w.drain().await;

    let s = w.emu.snapshot();
    let old = s.groups.get(&old_key).expect(
        "the old group is deleted although its replacement was never created: its members lost \
         the group's roles",
    );
    assert_eq!(old.name, "Developers");
    assert_eq!(old.roles, dev_roles, "the old group keeps its roles");
    assert_eq!(
        members(&s, &old_key),
        member_ids,
        "the old group keeps its members"
    );
    assert!(
        !s.groups.contains_key(&new_key),
        "the refused create made no group"
    );

    let dead: Vec<OutboxEntry> = rows_of(&w, "group", &dev)
        .await
        .into_iter()
        .filter(|r| r.item.state == OutboxState::Dead)
        .collect();
    assert_eq!(dead.len(), 1, "the group's row is dead: {dead:?}");
    let reason = dead[0].dead_reason.clone().unwrap_or_default();
    assert!(reason.contains("create_group"), "{reason}");
    // The cancelled step is on record.
    let deletes = w.audit_ops("delete_group").await;
    assert!(
        deletes
            .iter()
            .any(|e| e.outcome == "failure" && e.detail.contains("not attempted")),
        "the delete skipped because its create failed is audited as not attempted: {deletes:?}"
    );

    // `plan` still shows the rename, with the delete waiting for the create.
    let (p, actual, _) = w.engine.plan_full().await.expect("plan");
    let text = sync::render(&p, &actual);
    assert!(
        text.contains("(after: create group \"Platform\")"),
        "`plan` shows the dependency: {text}"
    );

    // Once TeamCity accepts creates again, the retried row completes the rename.
    w.emu.clear_faults();
    w.store
        .retry_outbox(&WriteCtx::cli(), dead[0].item.id)
        .await
        .expect("retry");
    w.drain().await;
    let s = w.emu.snapshot();
    assert!(!s.groups.contains_key(&old_key), "the old group is gone");
    let g = s.groups.get(&new_key).expect("the new generation exists");
    assert_eq!(g.name, "Platform");
    assert_eq!(g.roles, dev_roles);
    assert_eq!(members(&s, &new_key), member_ids);
    assert!(w.rows(OutboxState::Dead).await.is_empty());
}

// ---- 2 ------------------------------------------------------------------------------------

#[tokio::test]
async fn deactivation_with_a_permanent_failure_is_retried_until_complete() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    w.create_group("Developers", Some("00g-dev"), &[&ann]).await;
    w.drain().await;
    give_tokens(&w, "ann", 2);
    let before = w.tc_user("ann").expect("ann");
    assert_eq!(before.groups.len(), 2, "setup: Developers and defaults");

    // Every password change of ann is refused, for good.
    fail_matching(&w, "PUT", "/password", 403);
    w.set_active(&ann, false).await;
    w.drain().await;

    let u = w.tc_user("ann").expect("ann");
    assert_eq!(
        u.password_changes, before.password_changes,
        "setup: the fault refused the password reset"
    );
    assert_eq!(
        deactivated(&u),
        None,
        "the deactivated marker is set although the password reset failed: no later pass would \
         ever reset it"
    );
    assert!(u.tokens.is_empty(), "independent steps still ran: tokens");
    assert!(
        u.groups.is_empty(),
        "independent steps still ran: groups {:?}",
        u.groups
    );
    let rows = rows_of(&w, "user", &ann).await;
    let dead: Vec<&OutboxEntry> = rows
        .iter()
        .filter(|r| r.item.state == OutboxState::Dead)
        .collect();
    assert_eq!(dead.len(), 1, "ann's row is dead: {rows:?}");
    let reason = dead[0].dead_reason.clone().unwrap_or_default();
    assert!(reason.contains("reset_password"), "{reason}");

    w.emu.clear_faults();
    w.store
        .retry_outbox(&WriteCtx::cli(), dead[0].item.id)
        .await
        .expect("retry");
    w.drain().await;
    let u = w.tc_user("ann").expect("ann");
    assert_eq!(u.password_changes, before.password_changes + 1);
    assert_eq!(deactivated(&u), Some("true"));
    assert!(u.tokens.is_empty() && u.groups.is_empty());
    assert!(w.rows(OutboxState::Dead).await.is_empty());
}

// ---- 3 ------------------------------------------------------------------------------------

#[tokio::test]
async fn an_empty_database_never_strips_anyone() {
    let w = World::start().await;
    let mut ids = vec![];
    for n in 0..3 {
        ids.push(w.create_user(&format!("u{n}"), None).await);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let dev = w.create_group("Developers", Some("00g-dev"), &refs).await;
    w.drain().await;
    for n in 0..3 {
        give_tokens(&w, &format!("u{n}"), 2);
    }
    let before = w.emu.snapshot();
    let managed: BTreeSet<u64> = (0..3)
        .map(|n| w.tc_user(&format!("u{n}")).expect("user").id)
        .collect();
    assert_eq!(members(&before, &group_key(&dev, 0)), managed, "setup");

    // The guard limit does not matter: removals of objects the directory does not know are
    // never applied automatically.
    for max_removals in [1_000, 1_000_000] {
        // A second engine over a new, empty database (lost, or pointed at the wrong file).
        let (fresh, _dir) = fresh_store().await;
        let engine = w.engine_over(fresh.clone(), POLICY, guard(Some(max_removals), None));
        engine.reconcile(false).await.expect("reconcile");

        let after = w.emu.snapshot();
        for id in &managed {
            let (b, a) = (&before.users[id], &after.users[id]);
            assert_eq!(
                a.tokens.len(),
                b.tokens.len(),
                "max_removals {max_removals}: {} lost tokens",
                b.username
            );
            assert_eq!(
                a.password_changes, b.password_changes,
                "max_removals {max_removals}: {}'s password changed",
                b.username
            );
            assert!(
                a.groups.is_superset(&b.groups),
                "max_removals {max_removals}: {} left groups: {:?} -> {:?}",
                b.username,
                b.groups,
                a.groups
            );
            assert!(
                a.roles.is_superset(&b.roles),
                "max_removals {max_removals}: {} lost roles",
                b.username
            );
            assert_eq!(
                deactivated(a),
                None,
                "max_removals {max_removals}: {} marked deactivated",
                b.username
            );
        }
        for (key, g) in &before.groups {
            let a = after
                .groups
                .get(key)
                .unwrap_or_else(|| panic!("max_removals {max_removals}: group {key} deleted"));
            assert!(
                a.roles.is_superset(&g.roles),
                "max_removals {max_removals}: group {key} lost roles"
            );
        }
        assert_eq!(
            after.users.len(),
            before.users.len(),
            "max_removals {max_removals}: users deleted"
        );

        // The removals are not hidden: the plan lists them, and they wait for `approve`.
        let (p, actual, _) = engine.plan_full().await.expect("plan");
        assert_eq!(
            sync::guard::removals(&p.actions, &actual),
            managed,
            "max_removals {max_removals}: the plan still lists every removal: {:?}",
            p.actions
        );
        for id in &managed {
            assert!(
                p.actions
                    .iter()
                    .any(|a| matches!(a, Action::RevokeTokens { user } if user == id)),
                "max_removals {max_removals}: token revocation of id:{id} planned: {:?}",
                p.actions
            );
        }
        let text = sync::render(&p, &actual);
        assert!(
            text.contains("[awaits approval: the directory does not know user"),
            "`plan` shows the orphan removals awaiting approval: {text}"
        );
        let held = fresh.list_held(Some(HeldState::Held)).await.expect("held");
        assert!(
            !held.is_empty(),
            "max_removals {max_removals}: the removals wait in a held batch"
        );
        assert!(
            w.store.list_held(None).await.expect("held").is_empty(),
            "the first world's store is not involved"
        );
    }
}

// ---- 4 ------------------------------------------------------------------------------------

#[tokio::test]
async fn mass_deactivation_is_held_with_tokens_and_passwords() {
    let w = World::with(POLICY, guard(Some(3), None)).await;
    let mut ids = vec![];
    for n in 0..6 {
        ids.push(w.create_user(&format!("u{n}"), None).await);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let dev = w.create_group("Developers", Some("00g-dev"), &refs).await;
    w.drain().await;
    let key = group_key(&dev, 0);
    for n in 0..6 {
        give_tokens(&w, &format!("u{n}"), 2);
    }
    let before: Vec<UserRec> = (0..6)
        .map(|n| w.tc_user(&format!("u{n}")).expect("user"))
        .collect();
    let untouched = |w: &World, when: &str| {
        for (n, b) in before.iter().enumerate().skip(1) {
            let u = w.tc_user(&format!("u{n}")).expect("user");
            assert_eq!(u.tokens.len(), 2, "{when}: u{n} lost tokens");
            assert_eq!(
                u.password_changes, b.password_changes,
                "{when}: u{n}'s password changed"
            );
            assert_eq!(u.groups, b.groups, "{when}: u{n} left groups");
            assert_eq!(deactivated(&u), None, "{when}: u{n} marked deactivated");
        }
    };
    let mark = last_outbox_id(&w).await;

    // The IdP deactivates five of six users: more than max_removals = 3.
    for id in &ids[1..] {
        w.set_active(id, false).await;
    }
    w.drain().await;
    untouched(&w, "held");
    let held = w
        .store
        .list_held(Some(HeldState::Held))
        .await
        .expect("held");
    assert_eq!(held.len(), 1, "{held:?}");
    for (n, id) in ids.iter().enumerate().skip(1) {
        let rows: Vec<OutboxEntry> = rows_of(&w, "user", id)
            .await
            .into_iter()
            .filter(|r| r.item.id > mark)
            .collect();
        assert!(!rows.is_empty(), "u{n} has a row for its deactivation");
        for r in &rows {
            assert_eq!(
                r.item.state,
                OutboxState::Held,
                "u{n}'s deactivation row waits with the batch: {r:?}"
            );
            assert_eq!(r.held_batch_id, Some(held[0].id), "{r:?}");
        }
    }

    // A held batch never blocks the others.
    w.create_user("newhire", None).await;
    w.drain().await;
    assert!(
        w.tc_user("newhire").is_some(),
        "a new hire is created while the batch waits"
    );
    // The same deactivations again (re-sent by the IdP, then a reconcile): still one batch.
    for id in &ids[1..] {
        w.set_active(id, false).await;
    }
    w.drain().await;
    w.engine.reconcile(false).await.expect("reconcile");
    untouched(&w, "re-sent");
    let all = w.store.list_held(None).await.expect("held");
    assert_eq!(all.len(), 1, "no second batch: {all:?}");
    assert_eq!(all[0].state, HeldState::Held);

    w.store
        .approve_held(&WriteCtx::cli(), held[0].id)
        .await
        .expect("approve");
    w.drain().await;
    for (n, b) in before.iter().enumerate().skip(1) {
        let u = w.tc_user(&format!("u{n}")).expect("user");
        assert!(u.tokens.is_empty(), "u{n}: tokens revoked after approval");
        assert_eq!(u.password_changes, b.password_changes + 1, "u{n}");
        assert!(u.groups.is_empty(), "u{n} left every group: {:?}", u.groups);
        assert_eq!(deactivated(&u), Some("true"), "u{n}");
    }
    let u0 = w.tc_user("u0").expect("u0");
    assert_eq!(u0.tokens.len(), 2);
    assert!(u0.groups.contains(&key));
    assert_eq!(deactivated(&u0), None);
    assert_eq!(
        w.store.list_held(None).await.expect("held")[0].state,
        HeldState::Applied
    );
}

// ---- 5 ------------------------------------------------------------------------------------

/// `total` users in Developers with a token each; the first `leaving` are deactivated at once
/// under the default guard (max_removals 10, max_removals_percent 20).
async fn offboard_under_the_default_guard(total: usize, leaving: usize) {
    let w = World::with(POLICY, guard(Some(10), Some(20))).await;
    let mut ids = vec![];
    for n in 0..total {
        ids.push(w.create_user(&format!("u{n}"), None).await);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let dev = w.create_group("Developers", Some("00g-dev"), &refs).await;
    w.drain().await;
    let key = group_key(&dev, 0);
    for n in 0..total {
        give_tokens(&w, &format!("u{n}"), 1);
    }
    for id in &ids[..leaving] {
        w.set_active(id, false).await;
    }
    w.drain().await;

    let held = w.store.list_held(None).await.expect("held");
    assert!(
        held.is_empty(),
        "{leaving} of {total} offboarded: nothing is held: {held:?}"
    );
    for n in 0..leaving {
        let u = w.tc_user(&format!("u{n}")).expect("user");
        assert!(
            u.groups.is_empty(),
            "u{n} left every group at once: {:?}",
            u.groups
        );
        assert!(u.tokens.is_empty(), "u{n}: tokens revoked");
        assert_eq!(deactivated(&u), Some("true"), "u{n}");
    }
    for n in leaving..total {
        let u = w.tc_user(&format!("u{n}")).expect("user");
        assert!(u.groups.contains(&key), "u{n} stays");
        assert_eq!(u.tokens.len(), 1, "u{n} keeps its token");
    }
}

#[tokio::test]
async fn a_single_offboarding_in_a_small_directory_is_not_held() {
    offboard_under_the_default_guard(2, 1).await;
}

#[tokio::test]
async fn three_offboardings_are_never_held_by_the_percent_rule() {
    offboard_under_the_default_guard(4, 3).await;
}

// ---- 6 ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_rename_keeps_members_added_by_hand() {
    let w = World::start().await;
    let u0 = w.create_user("u0", None).await;
    let u1 = w.create_user("u1", None).await;
    let dev = w
        .create_group("Developers", Some("00g-dev"), &[&u0, &u1])
        .await;
    w.drain().await;
    let old_key = group_key(&dev, 0);
    // An administrator puts the local admin into the managed group by hand.
    let admin = w.emu.with_state(|s| {
        let admin = s.admin_id;
        s.users
            .get_mut(&admin)
            .expect("admin")
            .groups
            .insert(old_key.clone());
        admin
    });

    w.okta_patch_group(&dev, "Platform", vec![]).await;
    w.drain().await;
    let s = w.emu.snapshot();
    let new_key = group_key(&dev, 1);
    assert_eq!(
        s.groups.get(&new_key).map(|g| g.name.as_str()),
        Some("Platform")
    );
    assert!(!s.groups.contains_key(&old_key));
    let want: BTreeSet<u64> = [
        admin,
        w.tc_user("u0").expect("u0").id,
        w.tc_user("u1").expect("u1").id,
    ]
    .into_iter()
    .collect();
    assert_eq!(
        members(&s, &new_key),
        want,
        "the renamed group keeps the member added by hand (admin id:{admin})"
    );
    assert!(s.users[&admin].groups.contains("LOCAL"));
}

// ---- 7 ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_failing_read_of_one_user_does_not_stop_the_others() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    w.drain().await;
    w.set_active(&ann, false).await;
    w.drain().await;
    assert_eq!(
        deactivated(&w.tc_user("ann").expect("ann")),
        Some("true"),
        "setup"
    );

    // Ann's tokens can no longer be read (only deactivated users' tokens are read).
    fail_matching(&w, "GET", "/tokens", 403);
    w.emu.reset_counters();
    let r = w.engine.reconcile(false).await;
    assert!(
        r.is_ok(),
        "one unreadable user fails the whole reconcile: {r:?}"
    );
    assert!(
        w.emu
            .counters()
            .get("GET /app/rest/users/{u}/tokens")
            .is_some_and(|n| *n >= 1),
        "setup: the reconcile tried to read ann's tokens: {:?}",
        w.emu.counters()
    );

    w.create_user("newhire", None).await;
    w.drain().await;
    assert!(w.tc_user("newhire").is_some(), "the new hire is created");
}

// ---- 8 ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_startup_read_error_dead_letters_nothing() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    w.create_group("Developers", Some("00g-dev"), &[&ann, &bob])
        .await;
    assert_eq!(w.pending().await, 3, "setup");

    // TeamCity cannot be read: every user read is refused.
    w.emu.inject_fault(Fault {
        method: Some("GET".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: u32::MAX,
        action: FaultAction::Status {
            status: 403,
            retry_after_secs: None,
        },
    });
    let engine = w.engine_with(POLICY, cfg());
    // Whether the pass reports an error or not, nothing may be dead-lettered.
    if let Err(e) = engine.drain().await {
        eprintln!("drain while TeamCity cannot be read: {e}");
    }
    let dead = w.rows(OutboxState::Dead).await;
    assert!(
        dead.is_empty(),
        "a read error before any action dead-letters the rows: {dead:?}"
    );
    assert_eq!(w.pending().await, 3, "the rows stay pending");

    w.emu.clear_faults();
    w.drain_until_idle(&engine, Duration::from_secs(10)).await;
    assert!(w.tc_user("ann").is_some() && w.tc_user("bob").is_some());
    assert!(w.tc_group("Developers").is_some());
    assert!(w.rows(OutboxState::Dead).await.is_empty());
}

// ---- 9 ------------------------------------------------------------------------------------

#[tokio::test]
async fn a_username_taken_by_an_unmanaged_user_is_a_visible_conflict() {
    let w = World::start().await;
    let local = w.emu.with_state(|s| {
        s.insert_user(
            "carol@example.com",
            Some("Carol (local)"),
            Some("carol@example.com"),
        )
    });
    let carol = w.create_user("carol", None).await;
    w.drain().await;

    let rows = rows_of(&w, "user", &carol).await;
    let dead: Vec<&OutboxEntry> = rows
        .iter()
        .filter(|r| r.item.state == OutboxState::Dead)
        .collect();
    assert_eq!(
        dead.len(),
        1,
        "the conflict dead-letters carol's row: {rows:?}"
    );
    let reason = dead[0].dead_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("already has user") && reason.contains("adopt_existing"),
        "{reason}"
    );
    let events = w.store.audit_events(0, 1_000_000).await.expect("audit");
    assert!(
        events
            .iter()
            .any(|e| e.outcome == "failure" && e.resource_id.as_deref() == Some(carol.as_str())),
        "the conflict is audited against carol's SCIM id"
    );
    // The local user is left alone.
    let s = w.emu.snapshot();
    let holders: Vec<&UserRec> = s
        .users
        .values()
        .filter(|u| u.username == "carol@example.com")
        .collect();
    assert_eq!(holders.len(), 1);
    assert_eq!(holders[0].id, local);
    assert!(holders[0].properties.is_empty(), "{:?}", holders[0]);
}

// ---- 10 -----------------------------------------------------------------------------------

#[tokio::test]
async fn an_unreadable_held_batch_is_never_approved_as_empty() {
    let w = World::start().await;
    let ctx = WriteCtx::cli();
    let id = w
        .store
        .create_held(&ctx, "outbox", &[], "summary", 2, &json!({"not": "a plan"}))
        .await
        .expect("held");
    w.store.approve_held(&ctx, id).await.expect("approve");
    let seen = w
        .store
        .audit_events(0, 1_000_000)
        .await
        .expect("audit")
        .len();

    let r = w.engine.drain().await;
    assert!(
        r.is_ok(),
        "an unreadable batch must not stop the worker: {r:?}"
    );
    let batch = w
        .store
        .held_batch(id)
        .await
        .expect("batch")
        .expect("exists");
    assert_ne!(
        batch.state,
        store::HeldState::Applied,
        "a batch whose plan cannot be read is marked applied without applying anything"
    );
    let events = w.store.audit_events(0, 1_000_000).await.expect("audit");
    let names_batch = |e: &store::AuditEvent| {
        let detail: Value = serde_json::from_str(&e.detail).unwrap_or(Value::Null);
        e.resource_id.as_deref() == Some(id.to_string().as_str())
            || detail.get("batch") == Some(&json!(id))
            || detail.get("batch_id") == Some(&json!(id))
    };
    assert!(
        events[seen..]
            .iter()
            .any(|e| e.outcome == "failure" && names_batch(e)),
        "the unreadable batch {id} is audited as a failure: {:?}",
        &events[seen..]
    );
}

// ---- the bridge's own account refused everywhere -----------------------------------------

#[tokio::test]
async fn a_403_on_every_write_dead_letters_nothing_and_readiness_says_why() {
    let w = World::start().await;
    w.create_user("first", None).await;
    w.drain().await; // TeamCity read, one user created
    // The bridge's account loses its permissions: every write is refused.
    w.fail_writes(FaultAction::Status {
        status: 403,
        retry_after_secs: None,
    });
    w.create_user("ann", None).await;
    w.create_user("bob", None).await;
    w.drain().await;
    assert!(
        w.rows(OutboxState::Dead).await.is_empty(),
        "{:?}",
        w.rows(OutboxState::Dead).await
    );
    assert_eq!(w.pending().await, 2, "the rows wait");
    let reason = w.engine.health().not_ready().expect("not ready");
    assert!(reason.contains("403"), "{reason}");

    w.emu.clear_faults();
    w.drain_until_idle(&w.engine, Duration::from_secs(10)).await;
    assert!(w.tc_user("ann").is_some() && w.tc_user("bob").is_some());
    assert_eq!(w.engine.health().not_ready(), None, "ready again");
}
