//! (7) Shadow mode: SCIM accepted and stored, plans computed and audited, nothing written.

use sync::{EngineConfig, Mode};

use crate::support::{POLICY, World, cfg};

#[tokio::test]
async fn shadow_mode_stores_and_audits_but_writes_nothing_to_teamcity() {
    let w = World::with(
        POLICY,
        EngineConfig {
            mode: Mode::Shadow,
            ..cfg()
        },
    )
    .await;
    let before = w.emu.snapshot();
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    let dev = w
        .create_group("Developers", Some("00g-dev"), &[&ann, &bob])
        .await;
    w.set_active(&bob, false).await;
    w.okta_patch_group(&dev, "Platform", vec![]).await;
    let r = w.drain().await;
    assert!(r.planned > 0, "{r:?}");
    assert_eq!(r.applied, 0);
    let rec = w.engine.reconcile(false).await.expect("reconcile");
    assert!(rec.planned > 0);
    assert_eq!(rec.applied, 0);

    assert_eq!(w.writes(), 0, "no TeamCity writes: {:?}", w.emu.counters());
    let after = w.emu.snapshot();
    assert_eq!(after.users.len(), before.users.len());
    assert_eq!(after.groups.len(), before.groups.len());
    assert_eq!(w.pending().await, 0, "rows are settled");
    assert!(
        !w.audit_ops("sync.shadow_plan").await.is_empty(),
        "plans audited"
    );
    // The SCIM side stored everything.
    let r = w
        .scim(reqwest::Method::GET, &format!("/Groups/{dev}"), None)
        .await
        .expect(200);
    assert_eq!(r.body["displayName"], "Platform");
    assert!(
        w.store
            .mappings(scim::ResourceKind::User)
            .await
            .expect("m")
            .is_empty()
    );
}
