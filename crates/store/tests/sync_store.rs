//! The sync bookkeeping story: outbox claims by lease with coalescing, retries with backoff,
//! dead letters, operator retry/drop, held batches, mappings, pins, sync state, the directory
//! snapshot — and that every decision lands in the audit chain in the same transaction.

use std::sync::Arc;
use std::time::Duration;

use scim::ResourceKind;
use serde_json::{Value, json};
use store::audit::{GENESIS_HASH, verify_chain};
use store::{
    AuditEntry, FixedClock, HeldState, MemberType, NewMember, OutboxState, RetryPolicy, StoreError,
    WriteCtx,
};
use time::OffsetDateTime;
use time::macros::datetime;

mod common;
use common::Backend;

type Db = common::TestDb;

async fn db(backend: Backend) -> Db {
    let clock = Arc::new(FixedClock::new(datetime!(2026-01-01 00:00 UTC)));
    common::open(backend, "sync.db", clock).await
}

impl Db {
    fn now(&self) -> OffsetDateTime {
        use store::Clock;
        self.clock.now()
    }

    fn advance(&self, d: Duration) {
        self.clock.advance(time::Duration::try_from(d).unwrap());
    }

    async fn user(&self, name: &str) -> String {
        self.store
            .create(
                &WriteCtx::cli(),
                ResourceKind::User,
                json!({"userName": name, "active": true}),
                None,
            )
            .await
            .unwrap()
            .id
    }

    async fn group(&self, name: &str, members: &[&str]) -> String {
        let members = members
            .iter()
            .map(|m| NewMember {
                value: (*m).to_owned(),
                ty: None,
                display: None,
            })
            .collect();
        self.store
            .create(
                &WriteCtx::cli(),
                ResourceKind::Group,
                json!({"displayName": name}),
                Some(members),
            )
            .await
            .unwrap()
            .id
    }

    async fn patch_user(&self, id: &str, name: &str) {
        let r = self
            .store
            .get(ResourceKind::User, id, Default::default())
            .await
            .unwrap()
            .unwrap();
        self.store
            .update(
                &WriteCtx::cli(),
                ResourceKind::User,
                id,
                r.version,
                Some(json!({"userName": name, "active": true})),
                &[],
            )
            .await
            .unwrap();
    }

    /// Audit events after `seq`, as (operation, actor, outcome).
    async fn audit_after(&self, seq: i64) -> Vec<(String, String, String)> {
        self.store
            .audit_events(seq, 10_000)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.operation, e.actor, e.outcome))
            .collect()
    }

    async fn last_seq(&self) -> i64 {
        self.store
            .audit_events(0, 100_000)
            .await
            .unwrap()
            .last()
            .map_or(0, |e| e.seq)
    }

    async fn outbox_count(&self) -> usize {
        self.store.outbox_items(0, 100_000).await.unwrap().len()
    }

    async fn state_of(&self, id: i64) -> store::OutboxEntry {
        self.store
            .list_outbox(None, 10_000)
            .await
            .unwrap()
            .into_iter()
            .find(|e| e.item.id == id)
            .unwrap()
    }
}

const LEASE: Duration = Duration::from_secs(30);

both!(
    a_claimed_entity_is_not_claimed_again_until_its_lease_expires,
    a_claimed_entity_is_not_claimed_again_until_its_lease_expires_on
);
async fn a_claimed_entity_is_not_claimed_again_until_its_lease_expires_on(d: Db) {
    let alice = d.user("alice").await;
    let s = &d.store;

    let first = s.claim_outbox("w1", d.now(), LEASE, 10).await.unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].entity_id, alice);
    assert_eq!(first[0].operations(), ["upsert"]);
    assert_eq!(first[0].kind(), Some(ResourceKind::User));

    // Another worker (or the same one) gets nothing while the lease runs.
    assert!(
        s.claim_outbox("w2", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    d.advance(Duration::from_secs(29));
    assert!(
        s.claim_outbox("w2", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // A new change to the same entity while it is leased waits for the lease holder.
    d.patch_user(&alice, "alice2").await;
    assert!(
        s.claim_outbox("w2", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // The lease expires (worker crashed): the entity is claimable again, both rows together.
    d.advance(Duration::from_secs(1));
    let again = s.claim_outbox("w2", d.now(), LEASE, 10).await.unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].items.len(), 2);
    let row = d.state_of(again[0].items[0].id).await;
    assert_eq!(row.leased_by.as_deref(), Some("w2"));
    assert_eq!(row.lease_until, Some(d.now() + LEASE));

    // Completing releases it for good.
    s.complete_outbox(&WriteCtx::sync(), &again[0].ids(), vec![])
        .await
        .unwrap();
    d.advance(Duration::from_secs(60));
    assert!(
        s.claim_outbox("w1", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

both!(
    claims_coalesce_rows_of_one_entity_and_respect_the_limit,
    claims_coalesce_rows_of_one_entity_and_respect_the_limit_on
);
async fn claims_coalesce_rows_of_one_entity_and_respect_the_limit_on(d: Db) {
    let a = d.user("a").await;
    let b = d.user("b").await;
    d.patch_user(&a, "a2").await;
    let g = d.group("G", &[&a, &b]).await;
    d.patch_user(&a, "a3").await;
    let s = &d.store;

    let claimed = s.claim_outbox("w", d.now(), LEASE, 2).await.unwrap();
    // Oldest due entity first; all three rows of `a` come as one unit.
    assert_eq!(claimed.len(), 2);
    assert_eq!(claimed[0].entity_id, a);
    assert_eq!(claimed[0].items.len(), 3);
    assert!(claimed[0].items.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(claimed[1].entity_id, b);

    let rest = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    assert_eq!(rest.len(), 1);
    assert_eq!(rest[0].entity_id, g);
    assert_eq!(rest[0].entity_type, "group");
    assert_eq!(rest[0].ids().len(), 1);
}

both!(
    claims_take_the_newest_or_only_linked_entities_when_asked,
    claims_take_the_newest_or_only_linked_entities_when_asked_on
);
async fn claims_take_the_newest_or_only_linked_entities_when_asked_on(d: Db) {
    let a = d.user("a").await;
    let b = d.user("b").await;
    let c = d.user("c").await;
    let s = &d.store;
    // TeamCity has `b` (its link is stored) when `b` changes again; `a` and `c` are still to
    // be created when the group is written.
    let ctx = WriteCtx::sync();
    s.upsert_mapping(&ctx, ResourceKind::User, &b, "7", "b")
        .await
        .unwrap();
    d.patch_user(&b, "b2").await;
    let g = d.group("G", &[&a]).await;

    // Rows written while their entity was linked, oldest first; every due row of the entity
    // comes with them (its create, written before the link, too).
    let linked = s
        .claim_outbox_linked("w", d.now(), LEASE, 10)
        .await
        .unwrap();
    let ids: Vec<&str> = linked.iter().map(|e| e.entity_id.as_str()).collect();
    assert_eq!(ids, vec![b.as_str()]);
    assert_eq!(linked[0].items.len(), 2);

    let newest = s.claim_outbox_newest("w", d.now(), LEASE, 1).await.unwrap();
    assert_eq!(newest.len(), 1);
    assert_eq!(newest[0].entity_id, g, "the group was written last");

    let rest = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    let ids: Vec<&str> = rest.iter().map(|e| e.entity_id.as_str()).collect();
    assert_eq!(ids, vec![a.as_str(), c.as_str()]);
    assert!(
        s.claim_outbox_linked("w", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

both!(
    transient_failures_back_off_then_dead_letter_after_max_attempts,
    transient_failures_back_off_then_dead_letter_after_max_attempts_on
);
async fn transient_failures_back_off_then_dead_letter_after_max_attempts_on(d: Db) {
    let u = d.user("u").await;
    let s = &d.store;
    let policy = RetryPolicy {
        base: Duration::from_secs(1),
        cap: Duration::from_secs(8),
        max_attempts: 6,
    };
    let before = d.last_seq().await;
    let mut delays = Vec::new();
    for attempt in 1..=6i64 {
        let c = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
        assert_eq!(c.len(), 1, "attempt {attempt}: due again after its backoff");
        assert_eq!(c[0].entity_id, u);
        let failed = s
            .fail_outbox(
                &WriteCtx::sync(),
                &c[0].ids(),
                "HTTP 503 from TeamCity",
                true,
                d.now(),
                &policy,
            )
            .await
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].attempts, attempt);
        let row = d.state_of(failed[0].id).await;
        assert_eq!(row.last_error.as_deref(), Some("HTTP 503 from TeamCity"));
        assert_eq!(row.lease_until, None, "a failure releases the lease");
        if attempt < 6 {
            let next = failed[0].next_attempt_at.unwrap();
            let delay = Duration::try_from(next - d.now()).unwrap();
            assert!(delay <= policy.cap, "{delay:?}");
            delays.push(delay);
            assert_eq!(row.item.state, OutboxState::Pending);
            assert_eq!(row.next_attempt_at, next);
            // Not due a moment before its time.
            if delay > Duration::from_millis(1) {
                d.advance(delay - Duration::from_millis(1));
                assert!(
                    s.claim_outbox("w", d.now(), LEASE, 10)
                        .await
                        .unwrap()
                        .is_empty()
                );
                d.advance(Duration::from_millis(1));
            } else {
                d.advance(delay);
            }
        } else {
            assert_eq!(failed[0].next_attempt_at, None);
            assert_eq!(row.item.state, OutboxState::Dead);
            assert_eq!(
                row.dead_reason.as_deref(),
                Some("gave up after 6 attempts: HTTP 503 from TeamCity")
            );
            assert_eq!(row.finished, Some(d.now()));
        }
    }
    // Exponential while under the cap (1, 2, 4 s ceilings), never above it.
    assert!(
        delays.windows(2).take(3).all(|w| w[0] <= w[1]),
        "{delays:?}"
    );
    assert!(delays[3] >= Duration::from_secs(4));
    // Dead items are never claimed.
    d.advance(Duration::from_secs(3600));
    assert!(
        s.claim_outbox("w", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Each failure was audited as a failure by the worker.
    let ev = d.audit_after(before).await;
    assert_eq!(ev.len(), 6);
    assert!(
        ev[..5]
            .iter()
            .all(|(op, actor, outcome)| op == "outbox.retry_later"
                && actor == "sync"
                && outcome == "failure")
    );
    assert_eq!(ev[5].0, "outbox.dead");
    assert_eq!(
        s.list_outbox(Some(OutboxState::Dead), 10)
            .await
            .unwrap()
            .len(),
        1,
        "listed by state"
    );
}

both!(
    a_permanent_failure_is_dead_at_once_with_its_reason,
    a_permanent_failure_is_dead_at_once_with_its_reason_on
);
async fn a_permanent_failure_is_dead_at_once_with_its_reason_on(d: Db) {
    d.user("u").await;
    let s = &d.store;
    let c = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    let failed = s
        .fail_outbox(
            &WriteCtx::sync(),
            &c[0].ids(),
            "HTTP 400: invalid username",
            false,
            d.now(),
            &RetryPolicy::default(),
        )
        .await
        .unwrap();
    assert_eq!(failed[0].attempts, 1);
    assert_eq!(
        failed[0].dead_reason.as_deref(),
        Some("permanent failure: HTTP 400: invalid username")
    );
    let row = d.state_of(failed[0].id).await;
    assert_eq!(row.item.state, OutboxState::Dead);
    assert_eq!(row.dead_reason, failed[0].dead_reason);
    let ev = s.audit_events(d.last_seq().await - 1, 10).await.unwrap();
    assert_eq!(ev[0].operation, "outbox.dead");
    assert_eq!(ev[0].outcome, "failure");
    let detail: Value = serde_json::from_str(&ev[0].detail).unwrap();
    assert_eq!(detail["transient"], json!(false));
}

both!(
    operators_retry_dead_items_and_drop_items,
    operators_retry_dead_items_and_drop_items_on
);
async fn operators_retry_dead_items_and_drop_items_on(d: Db) {
    d.user("u").await;
    d.user("v").await;
    let s = &d.store;
    let c = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    let (u_id, v_id) = (c[0].items[0].id, c[1].items[0].id);
    s.fail_outbox(
        &WriteCtx::sync(),
        &[u_id],
        "boom",
        false,
        d.now(),
        &RetryPolicy::default(),
    )
    .await
    .unwrap();

    // Retrying a pending item or a missing one says what it is.
    match s.retry_outbox(&WriteCtx::cli(), v_id).await {
        Err(StoreError::Invalid(m)) => assert!(m.contains("is pending, not dead"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.retry_outbox(&WriteCtx::cli(), 999).await,
        Err(StoreError::NotFound)
    ));

    let before = d.last_seq().await;
    d.advance(Duration::from_secs(5));
    let retried = s.retry_outbox(&WriteCtx::cli(), u_id).await.unwrap();
    assert_eq!(retried.item.state, OutboxState::Pending);
    assert_eq!(retried.item.attempts, 0);
    assert_eq!(retried.next_attempt_at, d.now());
    assert_eq!(retried.dead_reason, None);
    assert_eq!(
        retried.last_error.as_deref(),
        Some("boom"),
        "history is kept"
    );

    // v is still leased by `w`; after its lease, both are claimable again.
    d.advance(LEASE);
    let c = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    assert_eq!(c.len(), 2);

    let dropped = s.drop_outbox(&WriteCtx::cli(), v_id).await.unwrap();
    assert_eq!(dropped.item.state, OutboxState::Dropped);
    assert_eq!(dropped.finished, Some(d.now()));
    match s.drop_outbox(&WriteCtx::cli(), v_id).await {
        Err(StoreError::Invalid(m)) => assert!(m.contains("is dropped"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A worker completing a claim that was dropped meanwhile does not resurrect it.
    s.complete_outbox(&WriteCtx::sync(), &[u_id, v_id], vec![])
        .await
        .unwrap();
    assert_eq!(d.state_of(v_id).await.item.state, OutboxState::Dropped);
    assert_eq!(d.state_of(u_id).await.item.state, OutboxState::Done);

    let ev = d.audit_after(before).await;
    let ops: Vec<&str> = ev.iter().map(|(op, _, _)| op.as_str()).collect();
    assert_eq!(ops, ["outbox.retry", "outbox.drop", "outbox.complete"]);
    assert_eq!(ev[0].1, "cli");
    assert_eq!(ev[2].1, "sync");

    // An unknown state cannot be asked for: it does not parse (as the CLI's `--state` does).
    let unknown = "nonsense".parse::<OutboxState>().unwrap_err();
    assert!(
        unknown
            .to_string()
            .contains("pending, done, dead, held, dropped"),
        "{unknown}"
    );
    assert!(matches!(StoreError::from(unknown), StoreError::Invalid(_)));
}

both!(
    complete_records_the_worker_events_and_no_outbox_rows,
    complete_records_the_worker_events_and_no_outbox_rows_on
);
async fn complete_records_the_worker_events_and_no_outbox_rows_on(d: Db) {
    let u = d.user("u").await;
    let s = &d.store;
    let c = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    let before_seq = d.last_seq().await;
    let before_outbox = d.outbox_count().await;
    s.complete_outbox(
        &WriteCtx::sync(),
        &c[0].ids(),
        vec![
            AuditEntry::success(
                "TeamCityUser",
                "17",
                "teamcity.user.create",
                json!({"username": "u"}),
            ),
            AuditEntry::failure("Group", "g1", "policy.rename_alert", json!({})),
        ],
    )
    .await
    .unwrap();
    let ev = s.audit_events(before_seq, 10).await.unwrap();
    let got: Vec<(&str, &str, Option<&str>)> = ev
        .iter()
        .map(|e| {
            (
                e.operation.as_str(),
                e.outcome.as_str(),
                e.resource_id.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("teamcity.user.create", "success", Some("17")),
            ("policy.rename_alert", "failure", Some("g1")),
            ("outbox.complete", "success", Some(u.as_str())),
        ]
    );
    assert_eq!(ev[2].resource_type, "User");
    assert_eq!(d.outbox_count().await, before_outbox);
    assert_eq!(
        d.state_of(c[0].items[0].id).await.item.state,
        OutboxState::Done
    );
}

both!(
    held_batches_round_trip_through_approval,
    held_batches_round_trip_through_approval_on
);
async fn held_batches_round_trip_through_approval_on(d: Db) {
    let a = d.user("a").await;
    let s = &d.store;
    let c = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    let ids = c[0].ids();
    let before = d.last_seq().await;
    let plan = json!({"actions": [{"remove_member": {"user": a, "group": "DEVS"}}]});
    let id = s
        .create_held(
            &WriteCtx::sync(),
            "outbox",
            &ids,
            "would remove 1 user from DEVS",
            1,
            &plan,
        )
        .await
        .unwrap();
    let row = d.state_of(ids[0]).await;
    assert_eq!(row.item.state, OutboxState::Held);
    assert_eq!(row.held_batch_id, Some(id));
    assert_eq!(row.lease_until, None);
    // Held rows are not claimed.
    d.advance(Duration::from_secs(600));
    assert!(
        s.claim_outbox("w", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        s.list_outbox(Some(OutboxState::Held), 10)
            .await
            .unwrap()
            .len(),
        1
    );

    let held = s.list_held(Some(HeldState::Held)).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].id, id);
    assert_eq!(held[0].outbox_ids, ids);
    assert_eq!(held[0].plan, plan);
    assert_eq!(held[0].removals, 1);
    assert_eq!(held[0].source, "outbox");
    assert_eq!(held[0].state, HeldState::Held);

    // Not approved yet: cannot be marked applied.
    assert!(matches!(
        s.mark_held_applied(&WriteCtx::sync(), id).await,
        Err(StoreError::Invalid(_))
    ));
    let ops = WriteCtx {
        actor: "cli:alice".into(),
        request_id: None,
    };
    let approved = s.approve_held(&ops, id).await.unwrap();
    assert_eq!(approved.state, HeldState::Approved);
    assert_eq!(approved.decided_by.as_deref(), Some("cli:alice"));
    assert_eq!(approved.decided_at, Some(d.now()));
    match s.approve_held(&ops, id).await {
        Err(StoreError::Invalid(m)) => assert!(m.contains("is approved, not held"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        s.approve_held(&ops, 999).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        s.list_held(Some(HeldState::Approved)).await.unwrap().len(),
        1
    );

    s.mark_held_applied(&WriteCtx::sync(), id).await.unwrap();
    let b = s.held_batch(id).await.unwrap().unwrap();
    assert_eq!(b.state, HeldState::Applied);
    assert_eq!(b.decided_by.as_deref(), Some("cli:alice"));
    assert_eq!(d.state_of(ids[0]).await.item.state, OutboxState::Done);

    // A reconcile batch holds no outbox rows; it can be dropped.
    let r = s
        .create_held(&WriteCtx::sync(), "reconcile", &[], "drift", 40, &json!([]))
        .await
        .unwrap();
    assert_eq!(
        s.drop_held(&WriteCtx::cli(), r).await.unwrap().state,
        HeldState::Dropped
    );
    assert!(matches!(
        s.create_held(&WriteCtx::sync(), "magic", &[], "", 0, &json!(null))
            .await,
        Err(StoreError::Invalid(_))
    ));

    let ev = d.audit_after(before).await;
    let ops: Vec<&str> = ev.iter().map(|(op, _, _)| op.as_str()).collect();
    assert_eq!(
        ops,
        [
            "sync.held",
            "sync.approve",
            "sync.applied",
            "sync.held",
            "sync.drop"
        ]
    );
    assert_eq!(ev[1].1, "cli:alice");
}

both!(
    hold_outbox_parks_pending_rows_in_an_existing_batch,
    hold_outbox_parks_pending_rows_in_an_existing_batch_on
);
async fn hold_outbox_parks_pending_rows_in_an_existing_batch_on(d: Db) {
    d.user("a").await;
    d.user("b").await;
    let s = &d.store;
    let c = s.claim_outbox("w", d.now(), LEASE, 10).await.unwrap();
    let id = s
        .create_held(&WriteCtx::sync(), "outbox", &c[0].ids(), "x", 3, &json!({}))
        .await
        .unwrap();
    s.hold_outbox(&WriteCtx::sync(), &c[1].ids(), id)
        .await
        .unwrap();
    assert_eq!(d.state_of(c[1].items[0].id).await.held_batch_id, Some(id));
    assert!(matches!(
        s.hold_outbox(&WriteCtx::sync(), &[1], 999).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(
        d.audit_after(d.last_seq().await - 1).await[0].0,
        "outbox.hold"
    );
    // Dropping the batch drops its rows.
    s.drop_held(&WriteCtx::cli(), id).await.unwrap();
    assert_eq!(
        s.list_outbox(Some(OutboxState::Dropped), 10)
            .await
            .unwrap()
            .len(),
        2
    );
}

both!(
    mappings_upsert_read_and_delete_with_audit,
    mappings_upsert_read_and_delete_with_audit_on
);
async fn mappings_upsert_read_and_delete_with_audit_on(d: Db) {
    let s = &d.store;
    let before = d.last_seq().await;
    let ctx = WriteCtx::sync();
    assert!(
        s.upsert_mapping(&ctx, ResourceKind::User, "u1", "17", "alice")
            .await
            .unwrap()
    );
    assert!(
        !s.upsert_mapping(&ctx, ResourceKind::User, "u1", "17", "alice")
            .await
            .unwrap(),
        "unchanged: no write"
    );
    assert!(
        s.upsert_mapping(&ctx, ResourceKind::User, "u1", "17", "alice.b")
            .await
            .unwrap()
    );
    s.upsert_mapping(&ctx, ResourceKind::Group, "u1", "SCIM_u1", "Ops")
        .await
        .unwrap();
    s.upsert_mapping(&ctx, ResourceKind::User, "u0", "3", "zed")
        .await
        .unwrap();

    let m = s.mapping(ResourceKind::User, "u1").await.unwrap().unwrap();
    assert_eq!(
        (m.teamcity_id.as_str(), m.teamcity_name.as_str()),
        ("17", "alice.b")
    );
    assert_eq!(m.kind, ResourceKind::User);
    assert_eq!(m.updated, d.now());
    let users = s.mappings(ResourceKind::User).await.unwrap();
    assert_eq!(
        users.iter().map(|m| m.scim_id.as_str()).collect::<Vec<_>>(),
        ["u0", "u1"]
    );
    let groups = s.mappings(ResourceKind::Group).await.unwrap();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].teamcity_id, "SCIM_u1");
    // The links of some ids: of that kind only, ordered, ids without a link left out.
    let some = s
        .mappings_of(
            ResourceKind::User,
            &["u1".into(), "nobody".into(), "u0".into()],
        )
        .await
        .unwrap();
    assert_eq!(
        some.iter()
            .map(|m| (m.scim_id.as_str(), m.teamcity_id.as_str()))
            .collect::<Vec<_>>(),
        [("u0", "3"), ("u1", "17")]
    );
    assert!(
        s.mappings_of(ResourceKind::User, &[])
            .await
            .unwrap()
            .is_empty()
    );

    assert!(
        s.delete_mapping(&ctx, ResourceKind::User, "u1")
            .await
            .unwrap()
    );
    assert!(
        !s.delete_mapping(&ctx, ResourceKind::User, "u1")
            .await
            .unwrap()
    );
    assert_eq!(s.mapping(ResourceKind::User, "u1").await.unwrap(), None);
    assert!(
        s.mapping(ResourceKind::Group, "u1")
            .await
            .unwrap()
            .is_some()
    );

    let ops: Vec<String> = d
        .audit_after(before)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        ops,
        [
            "mapping.upsert",
            "mapping.upsert",
            "mapping.upsert",
            "mapping.upsert",
            "mapping.delete"
        ]
    );
    assert_eq!(
        d.outbox_count().await,
        0,
        "bookkeeping writes no outbox rows"
    );
}

both!(pins_and_sync_state, pins_and_sync_state_on);
async fn pins_and_sync_state_on(d: Db) {
    let s = &d.store;
    assert!(s.pins().await.unwrap().is_empty());
    let before = d.last_seq().await;
    s.set_pin(&WriteCtx::sync(), "developers", "g-1")
        .await
        .unwrap();
    s.set_pin(&WriteCtx::sync(), "developers", "g-1")
        .await
        .unwrap();
    s.set_pin(&WriteCtx::sync(), "admins", "g-2").await.unwrap();
    let pins = s.pins().await.unwrap();
    assert_eq!(pins.get("developers").map(String::as_str), Some("g-1"));
    assert_eq!(pins.len(), 2);
    let ev = s.audit_events(before, 10).await.unwrap();
    assert_eq!(ev.len(), 2, "re-pinning to the same id writes nothing");
    assert_eq!(ev[0].operation, "policy.pin");
    assert_eq!(ev[0].resource_id.as_deref(), Some("developers"));

    assert_eq!(s.sync_state_get("last_reconcile").await.unwrap(), None);
    s.sync_state_set("last_reconcile", "2026-01-01T00:00:00Z")
        .await
        .unwrap();
    s.sync_state_set("last_reconcile", "2026-01-01T01:00:00Z")
        .await
        .unwrap();
    assert_eq!(
        s.sync_state_get("last_reconcile").await.unwrap().as_deref(),
        Some("2026-01-01T01:00:00Z")
    );
}

both!(
    directory_snapshot_of_an_empty_store_is_empty,
    directory_snapshot_of_an_empty_store_is_empty_on
);
async fn directory_snapshot_of_an_empty_store_is_empty_on(d: Db) {
    let snap = d.store.directory().await.unwrap();
    assert!(snap.users.is_empty() && snap.groups.is_empty());
    assert!(
        d.store
            .mappings(ResourceKind::User)
            .await
            .unwrap()
            .is_empty()
    );
}

both!(
    directory_snapshot_has_every_user_group_and_member,
    directory_snapshot_has_every_user_group_and_member_on
);
async fn directory_snapshot_has_every_user_group_and_member_on(d: Db) {
    let a = d.user("a").await;
    let b = d.user("b").await;
    let inner = d.group("Inner", &[&b]).await;
    let outer = d.group("Outer", &[&a, &inner]).await;
    let empty = d.group("Empty", &[]).await;
    let snap = d.store.directory().await.unwrap();
    assert_eq!(
        snap.users.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(),
        [a.as_str(), b.as_str()]
    );
    assert_eq!(snap.users[0].user_name, "a");
    assert!(snap.users[0].active);
    let ids: Vec<&str> = snap.groups.iter().map(|g| g.id.as_str()).collect();
    assert_eq!(ids, [inner.as_str(), outer.as_str(), empty.as_str()]);
    assert_eq!(snap.groups[1].display_name, "Outer");
    let outer_members: Vec<(&str, MemberType)> = snap.groups[1]
        .members
        .iter()
        .map(|m| (m.value.as_str(), m.ty))
        .collect();
    let mut expected = vec![
        (a.as_str(), MemberType::User),
        (inner.as_str(), MemberType::Group),
    ];
    expected.sort();
    assert_eq!(outer_members, expected);
    assert_eq!(snap.groups[0].members.len(), 1);
    assert!(snap.groups[2].members.is_empty());
}

both!(
    scoped_directory_read_has_the_named_users_their_groups_and_the_named_groups_members,
    scoped_directory_read_has_the_named_users_their_groups_and_the_named_groups_members_on
);
async fn scoped_directory_read_has_the_named_users_their_groups_and_the_named_groups_members_on(
    d: Db,
) {
    let a = d.user("a").await;
    let b = d.user("b").await;
    let c = d.user("c").await;
    let e = d.user("e").await;
    let inner = d.group("Inner", &[&b]).await;
    let devs = d.group("Devs", &[&a, &b, &c, &inner]).await;
    let ops = d.group("Ops", &[&a, &e]).await;
    let other = d.group("Other", &[&c, &e]).await;
    let ids = |v: &[&String]| v.iter().map(|s| (*s).clone()).collect::<Vec<String>>();
    let members = |snap: &store::DirectorySnapshot, g: &str| -> Vec<String> {
        snap.groups
            .iter()
            .find(|x| x.id == g)
            .map(|x| x.members.iter().map(|m| m.value.clone()).collect())
            .unwrap_or_default()
    };
    let sorted = |mut v: Vec<&String>| {
        v.sort();
        v.into_iter().cloned().collect::<Vec<String>>()
    };

    // One user: that user, and each of its groups with its attributes but only that user as
    // member (not Devs' other members, not Ops' other member).
    let snap = d.store.directory_of(&ids(&[&a]), &[], None).await.unwrap();
    assert_eq!(snap.users.iter().map(|u| &u.id).collect::<Vec<_>>(), [&a]);
    assert_eq!(snap.users[0].user_name, "a");
    assert_eq!(
        snap.groups.iter().map(|g| &g.id).collect::<Vec<_>>(),
        [&devs, &ops],
        "its groups, in creation order"
    );
    assert_eq!(snap.groups[0].display_name, "Devs");
    assert_eq!(members(&snap, &devs), [a.as_str()]);
    assert_eq!(members(&snap, &ops), [a.as_str()]);

    // One group: all its members (the nested group too), its user members as users, and the
    // other groups of those users with their memberships among them.
    let snap = d
        .store
        .directory_of(&[], &ids(&[&devs]), None)
        .await
        .unwrap();
    assert_eq!(
        snap.users.iter().map(|u| &u.id).collect::<Vec<_>>(),
        [&a, &b, &c]
    );
    assert_eq!(members(&snap, &devs), sorted(vec![&a, &b, &c, &inner]));
    assert_eq!(members(&snap, &ops), [a.as_str()], "e is not loaded");
    assert_eq!(members(&snap, &other), [c.as_str()]);
    assert_eq!(members(&snap, &inner), [b.as_str()]);
    assert_eq!(snap.groups.len(), 4);

    // The same group with its members as context: the members are loaded as users, none of
    // their other groups; users asked whole (c) and context ids (e, not a member) too.
    let snap = d
        .store
        .directory_of(&ids(&[&c]), &ids(&[&devs]), Some(&ids(&[&e])))
        .await
        .unwrap();
    assert_eq!(
        snap.users.iter().map(|u| &u.id).collect::<Vec<_>>(),
        [&a, &b, &c, &e]
    );
    assert_eq!(members(&snap, &devs), sorted(vec![&a, &b, &c, &inner]));
    assert_eq!(
        snap.groups.iter().map(|g| &g.id).collect::<Vec<_>>(),
        [&devs, &other],
        "only c's other group; not a's Ops, b's Inner or e's Ops"
    );
    assert_eq!(members(&snap, &other), [c.as_str()]);

    // Users and groups together; ids that name nothing (deleted) are left out.
    d.store
        .delete(&WriteCtx::cli(), ResourceKind::User, &c, None)
        .await
        .unwrap();
    let snap = d
        .store
        .directory_of(
            &[e.clone(), c.clone(), "nobody".into()],
            &[ops.clone(), "no-group".into()],
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        snap.users.iter().map(|u| &u.id).collect::<Vec<_>>(),
        [&a, &e]
    );
    assert_eq!(members(&snap, &ops), sorted(vec![&a, &e]));
    assert_eq!(members(&snap, &other), [e.as_str()], "c is gone");
    assert_eq!(members(&snap, &devs), [a.as_str()]);

    // Nothing asked: nothing read.
    let snap = d.store.directory_of(&[], &[], None).await.unwrap();
    assert!(snap.users.is_empty() && snap.groups.is_empty());

    // The same users and groups as the full snapshot says.
    let full = d.store.directory().await.unwrap();
    let scoped = d
        .store
        .directory_of(
            &ids(&[&a, &b, &e]),
            &ids(&[&inner, &devs, &ops, &other]),
            None,
        )
        .await
        .unwrap();
    assert_eq!(scoped, full);
}

both!(
    standalone_audit_keeps_the_chain_intact_across_processes,
    standalone_audit_keeps_the_chain_intact_across_processes_on
);
async fn standalone_audit_keeps_the_chain_intact_across_processes_on(d: Db) {
    d.user("a").await;
    let s = &d.store;
    let seq = s
        .audit(
            &WriteCtx::sync(),
            AuditEntry {
                resource_type: "TeamCity".into(),
                resource_id: None,
                operation: "sync.alert".into(),
                outcome: "failure".into(),
                status: None,
                detail: json!({"why": "unreachable"}),
            },
        )
        .await
        .unwrap();
    assert_eq!(seq, d.last_seq().await);
    // A second handle on the same file (the CLI while `serve` runs) writes into the same chain.
    let other = store::open(&d.url, d.clock.clone()).await.unwrap();
    other.set_pin(&WriteCtx::cli(), "r", "g").await.unwrap();
    let c = other
        .claim_outbox("cli-worker", d.now(), LEASE, 10)
        .await
        .unwrap();
    assert_eq!(c.len(), 1);
    assert!(
        s.claim_outbox("w", d.now(), LEASE, 10)
            .await
            .unwrap()
            .is_empty()
    );
    s.fail_outbox(
        &WriteCtx::sync(),
        &c[0].ids(),
        "x",
        true,
        d.now(),
        &RetryPolicy::default(),
    )
    .await
    .unwrap();
    let events = s.audit_events(0, 1000).await.unwrap();
    assert_eq!(events.len(), 4);
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
    assert_eq!(events[1].outcome, "failure");
    assert_eq!(events[1].resource_id, None);
}

fn link(kind: ResourceKind, scim: &str, id: &str, name: &str) -> store::MappingLink {
    store::MappingLink {
        kind,
        scim_id: scim.into(),
        teamcity_id: id.into(),
        teamcity_name: name.into(),
    }
}

both!(
    record_applied_appends_a_batch_in_one_chain_with_its_links,
    record_applied_appends_a_batch_in_one_chain_with_its_links_on
);
async fn record_applied_appends_a_batch_in_one_chain_with_its_links_on(d: Db) {
    let s = &d.store;
    let ctx = WriteCtx::sync();
    s.upsert_mapping(&ctx, ResourceKind::User, "u-old", "5", "old")
        .await
        .unwrap();
    let before = d.last_seq().await;
    let entry = |op: &str, detail: Value| AuditEntry {
        resource_type: "TeamCity".into(),
        resource_id: Some("users".into()),
        operation: op.into(),
        outcome: "success".into(),
        status: Some(200),
        detail,
    };
    s.record_applied(
        &ctx,
        &[
            entry("create_user", json!({"n": 1})),
            entry("create_user", json!({"n": 2, "who": "ann@example.com"})),
            entry("create_group", json!({"n": 3})),
        ],
        &[
            link(ResourceKind::User, "u1", "11", "ann"),
            link(ResourceKind::User, "u-old", "5", "old"),
            link(ResourceKind::User, "u2", "12", "bob"),
            link(ResourceKind::User, "u2", "12", "bob.b"),
            link(ResourceKind::Group, "g1", "SCIM_G1_0", "Ops"),
        ],
    )
    .await
    .unwrap();
    let after = d.audit_after(before).await;
    let ops: Vec<&str> = after.iter().map(|e| e.0.as_str()).collect();
    // The events in order, then one `mapping.upsert` per changed link: the unchanged link is
    // not rewritten, and a link given twice is written twice (the second change records the
    // first as its previous value).
    assert_eq!(
        ops,
        [
            "create_user",
            "create_user",
            "create_group",
            "mapping.upsert",
            "mapping.upsert",
            "mapping.upsert",
            "mapping.upsert"
        ]
    );
    let events = s.audit_events(0, 1000).await.unwrap();
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
    let batch: Vec<_> = events.iter().filter(|e| e.seq > before).collect();
    assert!(
        batch.windows(2).all(|w| w[1].seq == w[0].seq + 1),
        "consecutive seqs"
    );
    assert!(
        !batch[1].detail.contains("ann@example.com"),
        "emails are scrubbed in batches too: {}",
        batch[1].detail
    );
    let second_bob: Value = serde_json::from_str(&batch[5].detail).unwrap();
    assert_eq!(second_bob["previous"]["teamcity_name"], "bob");
    let m = s.mapping(ResourceKind::User, "u2").await.unwrap().unwrap();
    assert_eq!(m.teamcity_name, "bob.b");
    assert_eq!(
        s.mapping(ResourceKind::Group, "g1")
            .await
            .unwrap()
            .unwrap()
            .teamcity_id,
        "SCIM_G1_0"
    );
    // Nothing at all: no transaction, no event.
    s.record_applied(&ctx, &[], &[]).await.unwrap();
    assert_eq!(d.last_seq().await, batch.last().unwrap().seq);
}

both!(
    a_row_in_an_unknown_state_is_reported_not_guessed,
    a_row_in_an_unknown_state_is_reported_not_guessed_on
);
async fn a_row_in_an_unknown_state_is_reported_not_guessed_on(d: Db) {
    d.user("alice").await;
    d.raw.exec("UPDATE outbox SET state = 'limbo'").await;
    for r in [
        d.store.list_outbox(None, 10).await.map(drop),
        d.store.outbox_items(0, 10).await.map(drop),
        d.store.outbox_summary().await.map(drop),
    ] {
        match r {
            Err(StoreError::Other(e)) => {
                let e = e.to_string();
                assert!(e.contains("unknown outbox state `limbo`"), "{e}");
            }
            other => panic!("expected a corrupt-row error, got {other:?}"),
        }
    }
}
