//! The audit trail: tamper evidence (`verify_store` names the first broken link), retention
//! behind signed checkpoints, time-range export, email scrubbing, and access review replayed
//! from the trail (also across a prune).

use std::sync::Arc;

use scim::ResourceKind;
use serde_json::json;
use store::access::{AccessState, reconstruct};
use store::audit::{VerifyError, verify_store};
use store::{AuditEntry, FixedClock, WriteCtx};
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

const KEY: &[u8] = b"test checkpoint key, 32 bytes...";

mod common;
use common::{Backend, Raw};

type Db = common::TestDb;

async fn db(backend: Backend) -> Db {
    let clock = Arc::new(FixedClock::new(datetime!(2026-01-01 00:00 UTC)));
    common::open(backend, "audit.db", clock).await
}

impl Db {
    fn now(&self) -> OffsetDateTime {
        use store::Clock;
        self.clock.now()
    }

    fn advance_days(&self, d: i64) {
        self.clock.advance(Duration::days(d));
    }

    /// One SCIM write (one event).
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

    /// One TeamCity action event as the engine writes it.
    async fn tc(&self, op: &str, target: &str, detail: serde_json::Value) -> i64 {
        self.store
            .audit(
                &WriteCtx {
                    actor: "reconciler".into(),
                    request_id: None,
                },
                AuditEntry::success("TeamCity", target, op, detail),
            )
            .await
            .unwrap()
    }

    async fn exec(&self, sql: &str) {
        self.raw.exec(sql).await;
    }

    async fn verify(&self) -> Result<store::audit::VerifyReport, VerifyError> {
        verify_store(self.store.as_ref(), Some(KEY), 2).await
    }
}

fn broken_at(r: Result<store::audit::VerifyReport, VerifyError>) -> i64 {
    match r {
        Err(VerifyError::Broken { seq, .. }) => seq,
        other => panic!("expected a broken chain, got {other:?}"),
    }
}

both!(
    editing_one_row_breaks_verify_at_exactly_that_event,
    editing_one_row_breaks_verify_at_exactly_that_event_on
);
async fn editing_one_row_breaks_verify_at_exactly_that_event_on(first: Db) {
    let backend = first.backend;
    drop(first);
    for (column, seq, sql) in [
        (
            "detail",
            3,
            "UPDATE audit_events SET detail = '{\"members_added\":9}' WHERE seq = 3",
        ),
        (
            "actor",
            5,
            "UPDATE audit_events SET actor = 'token:tok_evil' WHERE seq = 5",
        ),
        (
            "time",
            2,
            "UPDATE audit_events SET time = '2025-01-01T00:00:00.000000Z' WHERE seq = 2",
        ),
        (
            "outcome",
            6,
            "UPDATE audit_events SET outcome = 'failure' WHERE seq = 6",
        ),
    ] {
        let d = db(backend).await;
        for i in 0..7 {
            d.user(&format!("user{i}")).await;
        }
        let ok = d.verify().await.unwrap();
        assert_eq!(
            (ok.events, ok.first_seq, ok.last_seq, ok.checkpoint_seq),
            (7, Some(1), Some(7), None)
        );
        d.exec(sql).await;
        let err = d.verify().await;
        let text = format!("{}", err.as_ref().unwrap_err());
        assert_eq!(broken_at(err), seq, "edited {column}");
        assert!(
            text.starts_with(&format!("audit chain BROKEN at seq {seq}: ")),
            "{text}"
        );
        assert!(text.contains("this event was edited"), "{text}");
    }
}

both!(
    deleting_a_row_breaks_verify_at_the_next_event,
    deleting_a_row_breaks_verify_at_the_next_event_on
);
async fn deleting_a_row_breaks_verify_at_the_next_event_on(d: Db) {
    for i in 0..6 {
        d.user(&format!("user{i}")).await;
    }
    d.exec("DELETE FROM audit_events WHERE seq = 4").await;
    let err = d.verify().await;
    assert!(format!("{}", err.as_ref().unwrap_err()).contains("expected seq 4 next"));
    assert_eq!(broken_at(err), 5);

    // Deleting the first row breaks the link of the second.
    let d = db(d.backend).await;
    for i in 0..3 {
        d.user(&format!("user{i}")).await;
    }
    d.exec("DELETE FROM audit_events WHERE seq = 1").await;
    assert_eq!(broken_at(d.verify().await), 2);
}

both!(
    a_rehashed_edit_still_breaks_the_next_link,
    a_rehashed_edit_still_breaks_the_next_link_on
);
async fn a_rehashed_edit_still_breaks_the_next_link_on(d: Db) {
    // Editing a row and fixing its own hash moves the break to the following event.
    for i in 0..4 {
        d.user(&format!("user{i}")).await;
    }
    let mut e = d.store.audit_events(1, 1).await.unwrap().remove(0);
    e.actor = "token:tok_evil".into();
    let h = e.compute_hash();
    d.exec(&format!(
        "UPDATE audit_events SET actor = 'token:tok_evil', hash = '{h}' WHERE seq = 2"
    ))
    .await;
    assert_eq!(broken_at(d.verify().await), 3);
}

both!(
    prune_leaves_a_signed_checkpoint_and_verify_still_passes,
    prune_leaves_a_signed_checkpoint_and_verify_still_passes_on
);
async fn prune_leaves_a_signed_checkpoint_and_verify_still_passes_on(d: Db) {
    for i in 0..5 {
        d.user(&format!("old{i}")).await; // seq 1..=5 on day 0
    }
    d.advance_days(10);
    for i in 0..3 {
        d.user(&format!("new{i}")).await; // seq 6..=8 on day 10
    }
    let cutoff = d.now() - Duration::days(5);
    let cp = d
        .store
        .prune_audit(&WriteCtx::cli(), cutoff, KEY)
        .await
        .unwrap()
        .expect("five events were old enough");
    assert_eq!((cp.last_seq, cp.pruned, cp.total_pruned), (5, 5, 5));
    assert!(cp.signature_valid(KEY));
    assert!(!cp.signature_valid(b"another key"));

    let events = d.store.audit_events(0, 100).await.unwrap();
    assert_eq!(events.first().unwrap().seq, 6);
    let prune_event = events.last().unwrap();
    assert_eq!(
        (
            prune_event.seq,
            prune_event.operation.as_str(),
            prune_event.actor.as_str()
        ),
        (9, "audit.prune", "cli")
    );
    let ok = d.verify().await.unwrap();
    assert_eq!(
        (ok.events, ok.first_seq, ok.last_seq, ok.checkpoint_seq),
        (4, Some(6), Some(9), Some(5))
    );

    // Nothing older: no second checkpoint, nothing written.
    assert!(
        d.store
            .prune_audit(&WriteCtx::cli(), cutoff, KEY)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(d.store.audit_events(0, 100).await.unwrap().len(), 4);

    // A second prune of everything chains from the first checkpoint; new events continue.
    d.advance_days(1);
    let cp2 = d
        .store
        .prune_audit(&WriteCtx::cli(), d.now(), KEY)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((cp2.last_seq, cp2.pruned, cp2.total_pruned), (9, 4, 9));
    d.user("after").await;
    let ok = d.verify().await.unwrap();
    assert_eq!(
        (ok.first_seq, ok.last_seq, ok.checkpoint_seq),
        (Some(10), Some(11), Some(9))
    );

    // Tampering after a prune is still found at the exact event.
    d.exec("UPDATE audit_events SET detail = '{}' WHERE seq = 11")
        .await;
    assert_eq!(broken_at(d.verify().await), 11);
}

both!(
    forged_or_unkeyed_checkpoints_are_detected,
    forged_or_unkeyed_checkpoints_are_detected_on
);
async fn forged_or_unkeyed_checkpoints_are_detected_on(d: Db) {
    for i in 0..4 {
        d.user(&format!("u{i}")).await;
    }
    d.advance_days(2);
    d.user("kept").await;
    d.store
        .prune_audit(&WriteCtx::cli(), d.now() - Duration::days(1), KEY)
        .await
        .unwrap()
        .unwrap();
    assert!(d.verify().await.is_ok());

    // A different key, or none, cannot vouch for the checkpoint.
    let other = verify_store(d.store.as_ref(), Some(b"wrong".as_slice()), 100).await;
    assert!(
        matches!(other, Err(VerifyError::Checkpoint { .. })),
        "{other:?}"
    );
    let none = verify_store(d.store.as_ref(), None, 100).await;
    assert!(
        matches!(none, Err(VerifyError::Checkpoint { .. })),
        "{none:?}"
    );

    // Forging the checkpoint (e.g. to hide the snapshot or move the chain start) breaks its
    // signature; verify and prune both refuse.
    for forge in [
        "UPDATE audit_checkpoints SET snapshot = '{\"users\":{},\"groups\":{}}'",
        "UPDATE audit_checkpoints SET last_seq = last_seq - 1",
        // Two hex digits changed whatever they were (a signature that began with `ab` was
        // left as it was: a forge that forged nothing, and a failure 1 run in 256).
        "UPDATE audit_checkpoints SET signature = \
         CASE WHEN substr(signature, 1, 2) = 'ab' THEN 'cd' ELSE 'ab' END || substr(signature, 3)",
    ] {
        let sql = "SELECT snapshot, last_seq, signature FROM audit_checkpoints";
        let before: (String, i64, String) = match &d.raw {
            Raw::Sqlite(p) => sqlx::query_as(sql).fetch_one(p).await.unwrap(),
            Raw::Postgres(p) => sqlx::query_as(sql).fetch_one(p).await.unwrap(),
        };
        d.exec(forge).await;
        let r = d.verify().await;
        let text = format!("{}", r.as_ref().unwrap_err());
        assert!(matches!(r, Err(VerifyError::Checkpoint { .. })), "{forge}");
        assert!(text.contains("signature mismatch"), "{text}");
        let p = d
            .store
            .prune_audit(&WriteCtx::cli(), d.now() + Duration::days(1), KEY)
            .await;
        assert!(matches!(p, Err(store::StoreError::Invalid(_))), "{forge}");
        match &d.raw {
            Raw::Sqlite(p) => {
                sqlx::query(
                    "UPDATE audit_checkpoints SET snapshot = ?, last_seq = ?, signature = ?",
                )
                .bind(before.0)
                .bind(before.1)
                .bind(before.2)
                .execute(p)
                .await
                .unwrap();
            }
            Raw::Postgres(p) => {
                sqlx::query(
                    "UPDATE audit_checkpoints SET snapshot = $1, last_seq = $2, signature = $3",
                )
                .bind(before.0)
                .bind(before.1)
                .bind(before.2)
                .execute(p)
                .await
                .unwrap();
            }
        }
        assert!(d.verify().await.is_ok());
    }

    // Deleting the checkpoint makes the kept chain start mid-air.
    d.exec("DELETE FROM audit_checkpoints").await;
    assert_eq!(broken_at(d.verify().await), 5);
}

both!(
    prune_refuses_a_broken_chain,
    prune_refuses_a_broken_chain_on
);
async fn prune_refuses_a_broken_chain_on(d: Db) {
    for i in 0..3 {
        d.user(&format!("u{i}")).await;
    }
    d.exec("UPDATE audit_events SET actor = 'x' WHERE seq = 2")
        .await;
    d.advance_days(1);
    let r = d.store.prune_audit(&WriteCtx::cli(), d.now(), KEY).await;
    match r {
        Err(store::StoreError::Invalid(m)) => assert!(m.contains("seq 2"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.store.audit_events(0, 100).await.unwrap().len(), 3);
}

both!(
    range_filters_by_time_inclusively_and_pages_by_seq,
    range_filters_by_time_inclusively_and_pages_by_seq_on
);
async fn range_filters_by_time_inclusively_and_pages_by_seq_on(d: Db) {
    let t0 = d.now();
    d.user("a").await; // 1 @ day 0
    d.advance_days(1);
    d.user("b").await; // 2 @ day 1
    d.user("c").await; // 3 @ day 1
    d.advance_days(1);
    d.user("d").await; // 4 @ day 2
    let seqs = |v: Vec<store::AuditEvent>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
    let day1 = t0 + Duration::days(1);
    let s = &d.store;
    assert_eq!(
        seqs(s.audit_range(Some(day1), Some(day1), 0, 100).await.unwrap()),
        [2, 3]
    );
    assert_eq!(
        seqs(s.audit_range(Some(day1), None, 0, 100).await.unwrap()),
        [2, 3, 4]
    );
    assert_eq!(
        seqs(s.audit_range(None, Some(day1), 0, 100).await.unwrap()),
        [1, 2, 3]
    );
    assert_eq!(seqs(s.audit_range(None, None, 2, 1).await.unwrap()), [3]);
    assert!(
        s.audit_range(Some(t0 + Duration::days(3)), None, 0, 100)
            .await
            .unwrap()
            .is_empty()
    );
}

both!(
    no_email_reaches_an_audit_detail,
    no_email_reaches_an_audit_detail_on
);
async fn no_email_reaches_an_audit_detail_on(d: Db) {
    d.store
        .audit(
            &WriteCtx::sync(),
            AuditEntry::failure(
                "TeamCity",
                "user:new:abc",
                "create_user",
                json!({"error": "user 'ada.lovelace@example.com' exists", "role": "PROJECT_VIEWER@p:Backend",
                       "nested": ["bob@corp.example.org", "ROLE@g"]}),
            ),
        )
        .await
        .unwrap();
    d.store
        .upsert_mapping(
            &WriteCtx::sync(),
            ResourceKind::User,
            "abc",
            "7",
            "ada@example.com",
        )
        .await
        .unwrap();
    let events = d.store.audit_events(0, 10).await.unwrap();
    let all: String = events.iter().map(|e| e.detail.clone()).collect();
    assert!(
        !all.contains("@example.com") && !all.contains("@corp.example.org"),
        "{all}"
    );
    assert!(
        all.contains("PROJECT_VIEWER@p:Backend") && all.contains("ROLE@g"),
        "{all}"
    );
    assert!(all.contains("user '[email]' exists"), "{all}");
    assert!(d.verify().await.is_ok());
}

both!(
    access_review_replays_to_a_time_and_survives_a_prune,
    access_review_replays_to_a_time_and_survives_a_prune_on
);
/// Access at T from the trail, and the same after the events before T were pruned.
async fn access_review_replays_to_a_time_and_survives_a_prune_on(d: Db) {
    d.tc(
        "create_group",
        "group:SCIM_DEV",
        json!({"key": "SCIM_DEV", "name": "developers", "marker": "g1", "roles": ["PROJECT_DEVELOPER@p:Backend"],
               "member_ids": ["new:s1"]}),
    )
    .await;
    d.tc("create_user", "user:new:s1", json!({"scim_id": "s1"}))
        .await;
    d.store
        .upsert_mapping(&WriteCtx::sync(), ResourceKind::User, "s1", "11", "ada")
        .await
        .unwrap();
    d.tc(
        "add_user_role",
        "user:11",
        json!({"role": "SYSTEM_ADMIN@g"}),
    )
    .await;
    let t1 = d.now();
    d.advance_days(3);
    d.tc(
        "remove_user_role",
        "user:11",
        json!({"role": "SYSTEM_ADMIN@g"}),
    )
    .await;
    let t2 = d.now();

    let at1 = reconstruct(d.store.as_ref(), t1).await.unwrap().rows();
    let roles = |rows: &[store::access::AccessRow]| {
        rows.iter()
            .map(|r| {
                format!(
                    "{:?}/{:?} {}@{} via {}",
                    r.teamcity_user_id, r.scim_id, r.role, r.scope, r.via
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        roles(&at1),
        [
            "Some(\"11\")/Some(\"s1\") PROJECT_DEVELOPER@p:Backend via SCIM_DEV",
            "Some(\"11\")/Some(\"s1\") SYSTEM_ADMIN@g via direct",
        ]
    );
    let at2 = reconstruct(d.store.as_ref(), t2).await.unwrap();
    assert_eq!(roles(&at2.rows()), [roles(&at1)[0].clone()]);
    assert_eq!(at2.rows()[0].group_name.as_deref(), Some("developers"));

    // Prune up to t1: the checkpoint's snapshot carries the state, so later reviews agree.
    d.store
        .prune_audit(&WriteCtx::cli(), t1 + Duration::days(1), KEY)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        reconstruct(d.store.as_ref(), t2).await.unwrap().rows(),
        at2.rows()
    );
    let too_early = reconstruct(d.store.as_ref(), t1 - Duration::days(1)).await;
    assert!(matches!(too_early, Err(store::StoreError::Invalid(m)) if m.contains("were pruned")));
    let snap = d.store.audit_checkpoint().await.unwrap().unwrap().snapshot;
    let replayed = AccessState::from_snapshot(&snap).unwrap();
    assert_eq!(replayed.rows(), at1);
    assert!(d.verify().await.is_ok());
}
