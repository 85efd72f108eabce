//! (8) Blast-radius guard: a batch removing access from more than max_removals users is held,
//! audited, listed, and applied only after approval.

use serde_json::json;
use store::{HeldState, WriteCtx};
use sync::{EngineConfig, GuardLimits, group_key};

use crate::support::{POLICY, World, cfg};

#[tokio::test]
async fn big_removal_is_held_until_approved() {
    let w = World::with(
        POLICY,
        EngineConfig {
            limits: GuardLimits {
                max_removals: Some(3),
                max_removals_percent: None,
            },
            ..cfg()
        },
    )
    .await;
    let mut ids = vec![];
    for n in 0..6 {
        ids.push(w.create_user(&format!("u{n}"), None).await);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let dev = w.create_group("Developers", Some("00g-dev"), &refs).await;
    let extra = w.create_user("newcomer", None).await;
    w.drain().await;
    let key = group_key(&dev, 0);

    // The IdP empties the group (5 users lose access) and adds a newcomer.
    w.okta_patch_group(
        &dev,
        "Developers",
        vec![
            json!({"op": "remove", "path": "members"}),
            json!({"op": "add", "path": "members", "value": [{"value": ids[0]}, {"value": extra}]}),
        ],
    )
    .await;
    w.emu.reset_counters();
    let r = w.drain().await;
    assert_eq!(r.held, 5, "{r:?}");
    assert!(
        w.tc_user("newcomer").expect("n").groups.contains(&key),
        "additions go through"
    );
    for n in 1..6 {
        assert!(
            w.tc_user(&format!("u{n}"))
                .expect("u")
                .groups
                .contains(&key),
            "u{n} kept until approval"
        );
    }
    let held = w
        .store
        .list_held(Some(HeldState::Held))
        .await
        .expect("held");
    assert_eq!(held.len(), 1, "{held:?}");
    assert_eq!(held[0].removals, 5);
    assert!(
        held[0].summary.contains("max_removals = 3"),
        "{}",
        held[0].summary
    );
    assert!(!w.audit_ops("sync.held").await.is_empty(), "audited");
    assert_eq!(w.pending().await, 0);

    // Held again by the next reconcile? No: the same batch is not held twice.
    w.engine.reconcile(false).await.expect("reconcile");
    assert_eq!(
        w.store
            .list_held(Some(HeldState::Held))
            .await
            .expect("h")
            .len(),
        1
    );

    w.store
        .approve_held(&WriteCtx::cli(), held[0].id)
        .await
        .expect("approve");
    assert!(!w.audit_ops("sync.approve").await.is_empty());
    w.drain().await;
    for n in 1..6 {
        assert!(
            !w.tc_user(&format!("u{n}"))
                .expect("u")
                .groups
                .contains(&key),
            "u{n} removed after approval"
        );
    }
    assert!(w.tc_user("u0").expect("u0").groups.contains(&key));
    let all = w.store.list_held(None).await.expect("held");
    assert_eq!(all[0].state, HeldState::Applied);
    let (p, _, _) = w.engine.plan_full().await.expect("plan");
    assert!(p.is_empty(), "{p:?}");
}
