//! (2) Plan: an Okta push re-sending an unchanged `{id, displayName}` costs zero TeamCity calls.
//! (`plan` output and `--exit-code` are tested on the binary in `crates/cli/tests/cli`.)

use serde_json::json;

use crate::support::World;

#[tokio::test]
async fn okta_push_resending_unchanged_group_costs_zero_teamcity_calls() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    let dev = w.create_group("Developers", Some("00g-dev"), &[]).await;
    w.okta_patch_group(
        &dev,
        "Developers",
        vec![json!({"op": "add", "path": "members", "value": [{"value": ann}, {"value": bob}]})],
    )
    .await;
    w.drain().await;
    w.emu.reset_counters();

    for _ in 0..3 {
        w.okta_patch_group(&dev, "Developers", vec![]).await;
    }
    // Whether or not the no-op push queued a row, the pass plans nothing.
    let r = w.drain().await;
    assert_eq!(r.planned, 0, "{r:?}");
    assert_eq!(r.applied, 0, "{r:?}");
    assert_eq!(w.emu.total_calls(), 0, "{:?}", w.emu.counters());
    assert_eq!(w.pending().await, 0);
}

#[tokio::test]
async fn engine_plan_is_empty_after_sync_and_shows_pending_changes() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    w.create_group("Developers", Some("00g-dev"), &[&ann]).await;
    let (p, _, _) = w.engine.plan_full().await.expect("plan");
    assert!(!p.is_empty());
    let text = sync::render(&p, &w.engine.read_actual().await.expect("read").0);
    assert!(text.contains('+'), "{text}");
    w.drain().await;
    let (p, _, _) = w.engine.plan_full().await.expect("plan");
    assert!(p.is_empty(), "{p:?}");
}
