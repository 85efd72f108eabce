//! `db copy`: a deployment moved between backends (every pair of SQLite and PostgreSQL) is the
//! same deployment — resources with their ids and versions, tokens, mappings, the outbox, held
//! batches, the audit chain — and the copy keeps working: the next write continues the chain.

use std::sync::Arc;

use scim::ResourceKind;
use serde_json::json;
use store::copy::{COPY_TABLES, copy_all};
use store::{
    DynStore, FixedClock, HeldState, MembershipChange, NewMember, ReadOpts, StoreError, WriteCtx,
};
use time::macros::datetime;

mod common;

async fn fill(s: &DynStore) -> (String, String) {
    let ctx = WriteCtx::cli();
    let mut ids = Vec::new();
    for i in 0..1200 {
        let u = s
            .create(
                &ctx,
                ResourceKind::User,
                json!({"userName": format!("u{i}@example.com"), "active": true}),
                None,
            )
            .await
            .unwrap();
        ids.push(u.id);
    }
    let g = s
        .create(
            &ctx,
            ResourceKind::Group,
            json!({"displayName": "Devs"}),
            None,
        )
        .await
        .unwrap();
    s.update_members(
        &ctx,
        &g.id,
        &[MembershipChange::Add(
            ids[..3]
                .iter()
                .map(|id| NewMember {
                    value: id.clone(),
                    ty: None,
                    display: None,
                })
                .collect(),
        )],
    )
    .await
    .unwrap();
    s.create_token(&ctx, "okta", [9; 32], None).await.unwrap();
    s.upsert_mapping(&ctx, ResourceKind::User, &ids[0], "7", "u0")
        .await
        .unwrap();
    s.create_held(
        &WriteCtx::sync(),
        "reconcile",
        &[],
        "remove 1 user",
        1,
        &json!([]),
    )
    .await
    .unwrap();
    s.sync_state_set("last_pass_report", "{}").await.unwrap();
    (ids[0].clone(), g.id)
}

#[tokio::test]
async fn a_deployment_copied_between_backends_is_the_same_and_keeps_working() {
    let backends = common::backends().await;
    for from in &backends {
        for to in &backends {
            let clock = Arc::new(FixedClock::new(datetime!(2026-01-01 00:00 UTC)));
            let src = common::open(*from, "from.db", clock.clone()).await;
            let dst = common::open(*to, "to.db", clock.clone()).await;
            let (user, group) = fill(&src.store).await;
            let mut calls = 0;
            let counts = copy_all(&src.store, &dst.store, |_, done, total| {
                calls += 1;
                assert!(done <= total);
            })
            .await
            .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            assert!(calls >= 3, "progress reported per chunk");
            let n = |t: &str| counts.iter().find(|(name, _)| *name == t).unwrap().1;
            assert_eq!(n("users"), 1200, "{from} -> {to}");
            assert!(n("audit_events") > 1200);
            for t in COPY_TABLES {
                assert_eq!(
                    dst.store.copy_count(t).await.unwrap(),
                    src.store.copy_count(t).await.unwrap(),
                    "{from} -> {to}: {}",
                    t.name
                );
            }
            // Same resources, ids and versions; members; tokens; mappings; held batch.
            let a = src
                .store
                .get(
                    ResourceKind::Group,
                    &group,
                    ReadOpts {
                        members: true,
                        groups: false,
                    },
                )
                .await
                .unwrap()
                .unwrap();
            let b = dst
                .store
                .get(
                    ResourceKind::Group,
                    &group,
                    ReadOpts {
                        members: true,
                        groups: false,
                    },
                )
                .await
                .unwrap()
                .unwrap();
            assert_eq!(a, b, "{from} -> {to}");
            assert_eq!(dst.store.valid_token_hashes().await.unwrap().len(), 1);
            assert_eq!(
                dst.store
                    .mapping(ResourceKind::User, &user)
                    .await
                    .unwrap()
                    .map(|m| m.teamcity_id),
                Some("7".into())
            );
            assert_eq!(
                dst.store
                    .list_held(Some(HeldState::Held))
                    .await
                    .unwrap()
                    .len(),
                1
            );
            // The chain verifies, and the next write continues it (seq and hash).
            store::audit::verify_store(dst.store.as_ref(), None, 1000)
                .await
                .unwrap_or_else(|e| panic!("{from} -> {to}: {e}"));
            let before = dst.store.audit_recent(None, 1).await.unwrap()[0].clone();
            dst.store
                .create(
                    &WriteCtx::cli(),
                    ResourceKind::User,
                    json!({"userName": "after-copy"}),
                    None,
                )
                .await
                .unwrap();
            let next = dst.store.audit_recent(None, 1).await.unwrap()[0].clone();
            assert_eq!(next.seq, before.seq + 1, "{from} -> {to}");
            assert_eq!(next.prev_hash, before.hash, "{from} -> {to}");
            store::audit::verify_store(dst.store.as_ref(), None, 1000)
                .await
                .unwrap();
            // A second copy into a database that now has rows is refused, changing nothing.
            let again = copy_all(&src.store, &dst.store, |_, _, _| {}).await;
            assert!(
                matches!(&again, Err(StoreError::Invalid(m)) if m.contains("not empty")),
                "{again:?}"
            );
        }
    }
}
