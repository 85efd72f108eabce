//! Replicas: one reconciler at a time through the fenced `reconcile` lease, and one applying
//! replica (the `sync` lease holder) while the others stand by. On SQLite the same code path
//! runs as on PostgreSQL (one process, so it always gets the leases unless a test holds them).

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::World;

#[tokio::test]
async fn a_reconcile_while_another_replica_holds_the_lease_does_nothing() {
    let w = World::start().await;
    w.create_user("ann", None).await;
    let other = w
        .store
        .acquire_lease(store::RECONCILE_LEASE, "replica-a", Duration::from_secs(60))
        .await
        .expect("lease")
        .expect("free");
    let audit_before = w.store.audit_events(0, 100_000).await.expect("audit").len();
    w.emu.reset_counters();
    let r = w.engine.reconcile_leased(None).await.expect("reconcile");
    assert!(r.is_none(), "another replica reconciles: skipped, {r:?}");
    assert_eq!(w.emu.total_calls(), 0, "{:?}", w.emu.counters());
    assert!(w.tc_user("ann").is_none());
    assert_eq!(
        w.store.audit_events(0, 100_000).await.expect("audit").len(),
        audit_before,
        "nothing recorded"
    );
    // Once the other replica is done, this one reconciles (and applies the drift).
    w.store.release_lease(&other.fence).await.expect("release");
    let r = w.engine.reconcile_leased(None).await.expect("reconcile");
    assert!(r.expect("ran").applied > 0);
    assert!(w.tc_user("ann").is_some());
}

#[tokio::test]
async fn a_standby_replica_applies_nothing_until_the_holder_lets_go() {
    let w = World::start().await;
    let holder = w
        .store
        .acquire_lease(sync::SYNC_LEASE, "replica-a", Duration::from_secs(60))
        .await
        .expect("lease")
        .expect("free");
    let engine = Arc::new(w.engine_with(crate::support::POLICY, crate::support::cfg()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(engine.clone().run(stop_rx));
    w.create_user("ann", None).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        w.tc_user("ann").is_none(),
        "standing by: nothing applied while replica-a holds the sync lease"
    );
    assert_eq!(w.pending().await, 1);
    // The holder goes away (a release; an expiry works the same): this replica takes over
    // within its standby retry and applies.
    w.store.release_lease(&holder.fence).await.expect("release");
    let released = Instant::now();
    while w.tc_user("ann").is_none() {
        assert!(
            released.elapsed() < Duration::from_secs(5),
            "not taken over within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!(
        "taken over and applied {:?} after the release",
        released.elapsed()
    );
    // The previous holder's fence is dead now.
    assert!(matches!(
        w.store
            .fenced(holder.fence.clone())
            .sync_state_set("x", "y")
            .await,
        Err(store::StoreError::Fenced(_))
    ));
    stop_tx.send(true).expect("stop");
    worker.await.expect("worker");
    // On shutdown the lease is given up, so another replica takes it at once.
    assert!(
        w.store
            .acquire_lease(sync::SYNC_LEASE, "replica-c", Duration::from_secs(60))
            .await
            .expect("lease")
            .is_some()
    );
}
