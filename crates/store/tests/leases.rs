//! Leases and fenced writes: one holder at a time, and a holder that lost its lease writes
//! nothing. Every story runs on SQLite and PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use scim::ResourceKind;
use serde_json::json;
use store::{AuditEntry, FixedClock, StoreError, WriteCtx};
use time::macros::datetime;

mod common;
use common::{Backend, TestDb};

async fn db(backend: Backend) -> TestDb {
    let clock = Arc::new(FixedClock::new(datetime!(2026-01-01 00:00 UTC)));
    common::open(backend, "leases.db", clock).await
}

const TTL: Duration = Duration::from_secs(30);

async fn racing(d: TestDb) {
    // A second handle on the same database, as a second replica would have.
    let other = store::open(&d.url, d.clock.clone()).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..12 {
        let s = if i % 2 == 0 {
            d.store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            s.acquire_lease("reconcile", &format!("replica-{i}"), TTL)
                .await
                .unwrap()
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        if let Some(l) = t.await.unwrap() {
            winners.push(l);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one holder: {winners:?}");
    assert_eq!(winners[0].fence.epoch, 1);
    // The holder asking again renews at the same epoch; anyone else is still refused.
    let w = &winners[0].fence;
    let again = d
        .store
        .acquire_lease("reconcile", &w.holder, TTL)
        .await
        .unwrap()
        .expect("the holder keeps its lease");
    assert_eq!(again.fence, *w);
    assert!(
        other
            .acquire_lease("reconcile", "someone-else", TTL)
            .await
            .unwrap()
            .is_none()
    );
    // Another lease name is independent.
    assert!(
        other
            .acquire_lease("other", "someone-else", TTL)
            .await
            .unwrap()
            .is_some()
    );
}
both!(two_holders_racing_get_one_lease, racing);

async fn takeover(d: TestDb) {
    let a = d
        .store
        .acquire_lease("reconcile", "a", TTL)
        .await
        .unwrap()
        .unwrap();
    let fenced_a = d.store.fenced(a.fence.clone());
    // While A holds the lease its writes go through (audited, mapping, sync state).
    fenced_a
        .upsert_mapping(&WriteCtx::sync(), ResourceKind::User, "u1", "1", "alice")
        .await
        .unwrap();
    fenced_a.sync_state_set("k", "a").await.unwrap();
    // A heartbeat keeps it past its first expiry.
    d.clock.advance(time::Duration::seconds(20));
    let renewed = d.store.renew_lease(&a.fence, TTL).await.unwrap();
    assert_eq!(renewed.fence.epoch, a.fence.epoch);
    d.clock.advance(time::Duration::seconds(20));
    assert!(
        d.store
            .acquire_lease("reconcile", "b", TTL)
            .await
            .unwrap()
            .is_none(),
        "renewed: not yet expired"
    );
    fenced_a.sync_state_set("k", "a2").await.unwrap();
    // A stops renewing (paused, partitioned); once it runs out B takes over at the next epoch.
    d.clock.advance(time::Duration::seconds(31));
    let expired = fenced_a.sync_state_set("k", "expired").await;
    assert!(
        matches!(expired, Err(StoreError::Fenced(_))),
        "an expired lease fences even before a takeover: {expired:?}"
    );
    let b = d
        .store
        .acquire_lease("reconcile", "b", TTL)
        .await
        .unwrap()
        .expect("expired: taken over");
    assert_eq!(b.fence.epoch, a.fence.epoch + 1);
    let audit_before = d.store.audit_events(0, 10_000).await.unwrap().len();
    // Every kind of write A still tries fails with the typed error and leaves nothing.
    let e = fenced_a
        .upsert_mapping(&WriteCtx::sync(), ResourceKind::User, "u2", "2", "bob")
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Fenced(_)), "{e:?}");
    assert!(e.to_string().contains("`reconcile` lease"), "{e}");
    let e = fenced_a
        .audit(
            &WriteCtx::sync(),
            AuditEntry::success("TeamCity", "x", "tc.test", json!({})),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Fenced(_)), "{e:?}");
    let e = fenced_a.sync_state_set("k", "stale").await.unwrap_err();
    assert!(matches!(e, StoreError::Fenced(_)), "{e:?}");
    let e = fenced_a
        .create(
            &WriteCtx::sync(),
            ResourceKind::User,
            json!({"userName": "x"}),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Fenced(_)), "{e:?}");
    assert!(matches!(
        d.store.renew_lease(&a.fence, TTL).await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(
        d.store.audit_events(0, 10_000).await.unwrap().len(),
        audit_before
    );
    assert!(
        d.store
            .mapping(ResourceKind::User, "u2")
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        d.store.sync_state_get("k").await.unwrap().as_deref(),
        Some("a2")
    );
    // B's writes go through; A's release of a lease it lost changes nothing.
    d.store.release_lease(&a.fence).await.unwrap();
    d.store
        .fenced(b.fence.clone())
        .sync_state_set("k", "b")
        .await
        .unwrap();
    // B releases: the next taker moves the epoch on again, and B's old fence is dead.
    d.store.release_lease(&b.fence).await.unwrap();
    let c = d
        .store
        .acquire_lease("reconcile", "a", TTL)
        .await
        .unwrap()
        .expect("released: free");
    assert_eq!(c.fence.epoch, b.fence.epoch + 1);
    assert!(matches!(
        d.store.fenced(b.fence).sync_state_set("k", "b2").await,
        Err(StoreError::Fenced(_))
    ));
    assert_eq!(
        d.store.sync_state_get("k").await.unwrap().as_deref(),
        Some("b")
    );
}
both!(
    an_expired_holders_write_is_rejected_after_takeover,
    takeover
);
