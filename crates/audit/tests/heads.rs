//! Signed heads against someone who can write the whole database: an event rewritten together
//! with every later hash passes the plain chain check (the documented limit) and fails the
//! signed-head check, which names the first bad seq.

use std::sync::Arc;

use audit::HeadSigner;
use audit::heads::{self, HeadProblem};
use serde_json::json;
use sqlx::Row as _;
use store::{AuditEvent, DynStore, WriteCtx};

struct Db {
    store: DynStore,
    url: String,
    dir: tempfile::TempDir,
}

async fn db() -> Db {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/a.db", dir.path().display());
    let store = store::open(&url, Arc::new(store::SystemClock))
        .await
        .expect("store");
    Db { store, url, dir }
}

async fn writes(store: &DynStore, from: usize, n: usize) {
    for i in from..from + n {
        store
            .create(
                &WriteCtx::cli(),
                scim::ResourceKind::User,
                json!({"userName": format!("user{i}"), "active": true}),
                None,
            )
            .await
            .expect("write");
    }
}

fn keys(d: &Db, name: &str) -> (ed25519_dalek::SigningKey, ed25519_dalek::VerifyingKey) {
    let private = d.dir.path().join(name);
    let public = d.dir.path().join(format!("{name}.pub"));
    heads::keygen(&private, &public).expect("keygen");
    assert!(
        heads::keygen(&private, &public).is_err(),
        "keygen never overwrites a key"
    );
    (
        heads::load_signing_key(&private).expect("private"),
        heads::load_verifying_key(&public).expect("public"),
    )
}

/// Rewrites event `seq`'s detail and recomputes its hash and every later one, straight in the
/// database, as someone with write access but without the signing key can.
async fn rewrite_from(d: &Db, seq: i64) {
    let mut events: Vec<AuditEvent> = d.store.audit_events(0, 10_000).await.expect("events");
    let pool = sqlx::SqlitePool::connect(&d.url).await.expect("pool");
    let mut prev = String::new();
    for e in events.iter_mut().filter(|e| e.seq >= seq) {
        if e.seq == seq {
            e.detail = json!({"members_added": 99}).to_string();
        } else {
            e.prev_hash = prev.clone();
        }
        e.hash = e.compute_hash();
        prev = e.hash.clone();
        sqlx::query("UPDATE audit_events SET detail = ?, prev_hash = ?, hash = ? WHERE seq = ?")
            .bind(&e.detail)
            .bind(&e.prev_hash)
            .bind(&e.hash)
            .bind(e.seq)
            .execute(&pool)
            .await
            .expect("update");
    }
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM audit_events WHERE detail = ?")
        .bind(json!({"members_added": 99}).to_string())
        .fetch_one(&pool)
        .await
        .expect("count")
        .get("n");
    assert_eq!(n, 1, "the edit landed");
    pool.close().await;
}

#[tokio::test]
async fn a_rewritten_trail_passes_the_chain_check_and_fails_the_signed_heads() {
    let d = db().await;
    let (private, public) = keys(&d, "audit-signing.pem");
    let signer = HeadSigner::new(d.store.clone(), private);
    writes(&d.store, 0, 5).await;
    assert_eq!(signer.sign("audit").await.expect("sign"), Some(5));
    assert_eq!(
        signer.sign("audit").await.expect("sign again"),
        None,
        "nothing new to cover: no second head"
    );
    writes(&d.store, 5, 4).await; // seqs 7..=10
    assert_eq!(signer.sign("audit").await.expect("sign"), Some(10));
    writes(&d.store, 9, 2).await; // 12, 13

    let r = heads::verify(&*d.store, &public).await.expect("verify");
    assert_eq!(r.problem, None, "{r:?}");
    assert_eq!(r.verified, 2);
    assert_eq!(r.newest.as_ref().map(|n| n.0), Some(10));
    assert_eq!(r.uncovered, 3, "events 11 (the head itself), 12 and 13");

    rewrite_from(&d, 8).await;
    // The documented limit: the chain alone still checks out.
    let chain = store::audit::verify_store(d.store.as_ref(), None, 1000).await;
    assert!(
        chain.is_ok(),
        "a consistent rewrite passes the chain check: {chain:?}"
    );
    let r = heads::verify(&*d.store, &public).await.expect("verify");
    match r.problem {
        Some(HeadProblem::Rewritten {
            signed_seq,
            first_bad_seq,
            ..
        }) => {
            assert_eq!(
                signed_seq, 10,
                "the first signed head that no longer matches"
            );
            assert_eq!(
                first_bad_seq, 7,
                "after the last matching head (5) and its own event (6)"
            );
        }
        other => panic!("rewrite not detected: {other:?}"),
    }

    // Right after a signed head, the first bad seq is exact.
    let d = db().await;
    let (private, public) = keys(&d, "k2.pem");
    let signer = HeadSigner::new(d.store.clone(), private);
    writes(&d.store, 0, 3).await;
    signer.sign("audit").await.expect("sign"); // covers 3, event 4
    writes(&d.store, 3, 1).await; // 5
    signer.sign("audit").await.expect("sign"); // covers 5, event 6
    rewrite_from(&d, 5).await;
    let r = heads::verify(&*d.store, &public).await.expect("verify");
    assert!(
        matches!(
            r.problem,
            Some(HeadProblem::Rewritten {
                signed_seq: 5,
                first_bad_seq: 5,
                ..
            })
        ),
        "{r:?}"
    );
    let text = r.problem.expect("problem").to_string();
    assert!(text.contains("first bad seq: 5"), "{text}");
}

#[tokio::test]
async fn forged_heads_and_foreign_keys_are_reported() {
    let d = db().await;
    let (private, public) = keys(&d, "a.pem");
    let (_, other_public) = keys(&d, "b.pem");
    writes(&d.store, 0, 2).await;
    HeadSigner::new(d.store.clone(), private.clone())
        .sign("audit")
        .await
        .expect("sign");

    let r = heads::verify(&*d.store, &other_public)
        .await
        .expect("verify");
    assert_eq!(r.problem, Some(HeadProblem::NoSignedHead { other_keys: 1 }));

    // A head "signed" by someone without the key: the right key id, a made-up signature.
    let forged = json!({
        "seq": 2,
        "hash": "0".repeat(64),
        "time": "2026-12-07T00:00:00.000000Z",
        "key_id": heads::key_id(&public),
        "signature": base64_of(&[7u8; 64]),
    });
    d.store
        .audit(
            &WriteCtx::cli(),
            store::AuditEntry {
                resource_type: "Audit".into(),
                resource_id: None,
                operation: heads::HEAD_OPERATION.into(),
                outcome: "success".into(),
                status: None,
                detail: forged,
            },
        )
        .await
        .expect("append");
    let r = heads::verify(&*d.store, &public).await.expect("verify");
    assert_eq!(r.problem, Some(HeadProblem::BadSignature { head_event: 4 }));
}

fn base64_of(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}
