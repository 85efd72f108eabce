//! (6) Reconcile: no drift costs only page reads; drift made by hand is repaired; unmanaged
//! objects are only reported.

use sync::{EngineConfig, group_key};

use crate::support::{World, cfg, roles};

#[tokio::test]
async fn no_drift_means_zero_writes_and_reads_equal_pages() {
    let w = World::with(
        crate::support::POLICY,
        EngineConfig {
            page_size: 3,
            ..cfg()
        },
    )
    .await;
    let mut ids = vec![];
    for n in 0..8 {
        ids.push(w.create_user(&format!("u{n}"), None).await);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    w.create_group("Developers", Some("00g-dev"), &refs[..5])
        .await;
    w.create_group("Ops", Some("00g-ops"), &refs[3..]).await;
    w.drain().await;
    w.emu.reset_counters();

    let r = w.engine.reconcile(false).await.expect("reconcile");
    assert_eq!(r.planned, 0, "{r:?}");
    assert_eq!(w.writes(), 0, "{:?}", w.emu.counters());
    assert_eq!(
        r.reads as u64,
        w.emu.total_calls(),
        "{:?}",
        w.emu.counters()
    );
    assert!(r.reads >= 3, "9 users in pages of 3, plus groups: {r:?}");
}

#[tokio::test]
async fn drift_made_by_hand_is_repaired_and_unmanaged_objects_only_reported() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    let dev = w
        .create_group("Developers", Some("00g-dev"), &[&ann, &bob])
        .await;
    w.drain().await;
    let key = group_key(&dev, 0);
    let ann_id = w.tc_user("ann").expect("ann").id;
    let bob_id = w.tc_user("bob").expect("bob").id;
    let admin = w.emu.snapshot().admin_id;
    w.emu.with_state(|s| {
        // A role added by hand to a managed group.
        s.groups
            .get_mut(&key)
            .expect("group")
            .roles
            .insert(("SYSTEM_ADMIN".into(), "g".into()));
        // A member removed by hand.
        s.users.get_mut(&ann_id).expect("ann").groups.remove(&key);
        // A managed user deleted by hand.
        s.users.remove(&bob_id);
        // An unmanaged user added to a managed group, and an unmanaged group.
        s.users
            .get_mut(&admin)
            .expect("admin")
            .groups
            .insert(key.clone());
    });

    let r = w.engine.reconcile(false).await.expect("reconcile");
    assert!(r.applied >= 3, "{r:?}");
    let s = w.emu.snapshot();
    assert_eq!(
        s.groups[&key].roles,
        roles(&["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]),
        "the hand-added role is removed"
    );
    assert!(s.users[&ann_id].groups.contains(&key), "member re-added");
    let bob_new = w.tc_user("bob").expect("bob re-created");
    assert!(bob_new.groups.contains(&key));
    assert_eq!(bob_new.properties.get(sync::USER_MARKER), Some(&bob));
    assert!(
        s.users[&admin].groups.contains(&key),
        "unmanaged member left alone"
    );
    assert!(s.groups.contains_key("LOCAL"), "unmanaged group left alone");

    // Only reported: a plan shows it and changes nothing.
    let (p, _, _) = w.engine.plan_full().await.expect("plan");
    assert!(p.is_empty(), "{p:?}");
    assert!(
        p.reports
            .iter()
            .any(|r| matches!(r, sync::Report::UnmanagedMember { user, .. } if *user == admin)),
        "{:?}",
        p.reports
    );
    assert!(
        p.reports
            .iter()
            .any(|r| matches!(r, sync::Report::Unmanaged { groups, .. } if *groups >= 1))
    );
}
