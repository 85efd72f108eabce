//! PostgreSQL only: what its backend must hold with several processes on one database (two
//! stores = two connection pools, as two processes would have), and its connection errors.
//! SQLite has one writer per file, so these questions do not arise there.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use scim::ResourceKind;
use serde_json::json;
use store::audit::{GENESIS_HASH, verify_chain};
use store::{AuditEntry, DynStore, FixedClock, MembershipChange, NewMember, StoreError, WriteCtx};
use time::macros::datetime;

mod common;
use common::Backend;

/// A PostgreSQL database and a second store on it; `None` when PostgreSQL is skipped.
async fn two_handles() -> Option<(common::TestDb, DynStore)> {
    if !common::backends().await.contains(&Backend::Postgres) {
        return None;
    }
    let clock = Arc::new(FixedClock::new(datetime!(2026-01-01 00:00 UTC)));
    let d = common::open(Backend::Postgres, "unused.db", clock.clone()).await;
    let other = store::open(&d.url, clock).await.unwrap();
    Some((d, other))
}

fn user(name: &str) -> serde_json::Value {
    json!({"userName": name, "active": true})
}

#[tokio::test]
async fn concurrent_writers_keep_one_gap_free_chain() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = if i % 2 == 0 {
            d.store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            if i % 4 == 3 {
                s.audit(
                    &WriteCtx::sync(),
                    AuditEntry::success("TeamCity", "x", "tc.test", json!({"i": i})),
                )
                .await
                .map(drop)
            } else {
                s.create(
                    &WriteCtx::cli(),
                    ResourceKind::User,
                    user(&format!("u{i}")),
                    None,
                )
                .await
                .map(drop)
            }
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let events = d.store.audit_events(0, 1000).await.unwrap();
    assert_eq!(events.len(), 40);
    let seqs: Vec<i64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<_>>());
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
    // One outbox row per SCIM write, each pointing at its own event.
    let outbox = other.outbox_items(0, 1000).await.unwrap();
    assert_eq!(outbox.len(), 30);
    let audit_seqs: HashSet<i64> = outbox.iter().map(|o| o.audit_seq).collect();
    assert_eq!(audit_seqs.len(), 30);
}

#[tokio::test]
async fn concurrent_membership_patches_lose_no_member() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(
            d.store
                .create(
                    &WriteCtx::cli(),
                    ResourceKind::User,
                    user(&format!("m{i}")),
                    None,
                )
                .await
                .unwrap()
                .id,
        );
    }
    let g = d
        .store
        .create(
            &WriteCtx::cli(),
            ResourceKind::Group,
            json!({"displayName": "crowd"}),
            None,
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let s = if i % 2 == 0 {
            d.store.clone()
        } else {
            other.clone()
        };
        let (gid, id) = (g.id.clone(), id.clone());
        tasks.push(tokio::spawn(async move {
            let add = MembershipChange::Add(vec![NewMember {
                value: id,
                ty: None,
                display: None,
            }]);
            s.update_members(&WriteCtx::cli(), &gid, &[add]).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(d.store.member_count(&g.id).await.unwrap(), 30);
    let after = other
        .get(ResourceKind::Group, &g.id, Default::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.version, g.version + 30);
    let events = d.store.audit_events(0, 1000).await.unwrap();
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
}

#[tokio::test]
async fn a_member_added_while_it_is_deleted_never_outlives_it() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    let ctx = WriteCtx::cli();
    let g = d
        .store
        .create(&ctx, ResourceKind::Group, json!({"displayName": "G"}), None)
        .await
        .unwrap();
    // Each round: one process adds a user to the group while the other deletes that user.
    for round in 0..30 {
        let u = d
            .store
            .create(
                &ctx,
                ResourceKind::User,
                user(&format!("racer{round}")),
                None,
            )
            .await
            .unwrap();
        let (a, b) = (d.store.clone(), other.clone());
        let (gid, uid) = (g.id.clone(), u.id.clone());
        let add = tokio::spawn(async move {
            a.update_members(
                &WriteCtx::cli(),
                &gid,
                &[MembershipChange::Add(vec![NewMember {
                    value: uid,
                    ty: None,
                    display: None,
                }])],
            )
            .await
        });
        let uid = u.id.clone();
        let del = tokio::spawn(async move {
            b.delete(&WriteCtx::cli(), ResourceKind::User, &uid, None)
                .await
        });
        let added = add.await.unwrap();
        del.await.unwrap().unwrap();
        // The add either happened first (and the delete removed the membership) or found the
        // user gone: no membership of a deleted user either way.
        if let Err(e) = &added {
            assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
        }
    }
    let members = d
        .store
        .get(
            ResourceKind::Group,
            &g.id,
            store::ReadOpts {
                members: true,
                groups: false,
            },
        )
        .await
        .unwrap()
        .unwrap()
        .members
        .unwrap_or_default();
    assert!(
        members.is_empty(),
        "memberships of deleted users: {members:?}"
    );
    let events = d.store.audit_events(0, 100_000).await.unwrap();
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
}

#[tokio::test]
async fn concurrent_creates_of_one_name_conflict_but_one() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    let mut tasks = Vec::new();
    for i in 0..10 {
        let s = if i % 2 == 0 {
            d.store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            s.create(
                &WriteCtx::cli(),
                ResourceKind::User,
                user(if i % 2 == 0 { "Same" } else { "same" }),
                None,
            )
            .await
        }));
    }
    let (mut ok, mut conflicts) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Conflict(m)) => {
                assert!(m.contains("userName"), "{m}");
                conflicts += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!((ok, conflicts), (1, 9));
    assert_eq!(d.store.audit_events(0, 100).await.unwrap().len(), 1);
}

#[tokio::test]
async fn claims_from_two_processes_never_share_an_entity() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    for i in 0..30 {
        d.store
            .create(
                &WriteCtx::cli(),
                ResourceKind::User,
                user(&format!("c{i}")),
                None,
            )
            .await
            .unwrap();
    }
    use store::Clock;
    let now = d.clock.now();
    let lease = Duration::from_secs(60);
    let mut tasks = Vec::new();
    for w in 0..6 {
        let s = if w % 2 == 0 {
            d.store.clone()
        } else {
            other.clone()
        };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let c = s
                    .claim_outbox(&format!("w{w}"), now, lease, 3)
                    .await
                    .unwrap();
                if c.is_empty() {
                    break;
                }
                mine.extend(c.into_iter().map(|e| e.entity_id));
            }
            mine
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 30, "every entity claimed exactly once");
    assert_eq!(distinct.len(), 30);
}

#[tokio::test]
async fn connection_errors_name_the_url_without_its_password() {
    let clock = Arc::new(FixedClock::new(datetime!(2026-01-01 00:00 UTC)));
    let err = store::open("postgres://bridge:s3cret@127.0.0.1:1/scim", clock)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("postgres://bridge:<redacted>@127.0.0.1:1/scim"),
        "{err}"
    );
    assert!(!err.contains("s3cret"), "{err}");
}

/// A write on one replica wakes the other's worker through LISTEN/NOTIFY at once, and still
/// does after the listening connection was cut (it listens again on a new one; the worker
/// polls meanwhile).
#[tokio::test]
async fn a_write_wakes_another_replica_and_still_does_after_its_listen_connection_is_cut() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    let wake = Arc::new(tokio::sync::Notify::new());
    assert!(other.watch_outbox(wake.clone()), "PostgreSQL listens");
    // Connected: it wakes once (rows may have been written while nobody listened).
    tokio::time::timeout(Duration::from_secs(10), wake.notified())
        .await
        .expect("the listener connects");

    let mut latencies = Vec::new();
    for i in 0..5 {
        let t0 = std::time::Instant::now();
        d.store
            .create(
                &WriteCtx::cli(),
                ResourceKind::User,
                user(&format!("n{i}")),
                None,
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(2), wake.notified())
            .await
            .expect("the other replica is woken by the write");
        latencies.push(t0.elapsed());
    }
    eprintln!("write → wake-up on the other replica: {latencies:?}");

    // Cut the LISTEN connection from the server side.
    let mut admin = {
        use sqlx::Connection;
        sqlx::PgConnection::connect(&d.url).await.unwrap()
    };
    let cut: Vec<(bool,)> = sqlx::query_as(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND query LIKE 'LISTEN%'",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(!cut.is_empty(), "a LISTEN connection was there to cut");
    // It listens again (and wakes once for what it may have missed).
    tokio::time::timeout(Duration::from_secs(10), wake.notified())
        .await
        .expect("the listener connects again");
    d.store
        .create(&WriteCtx::cli(), ResourceKind::User, user("after"), None)
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(2), wake.notified())
        .await
        .expect("woken by a write after the reconnect");
}

/// Concurrent reads of the resource generation share round trips, but none answers with a value
/// read before it was asked: while eight readers keep reads in flight on one process, a write
/// committed by another process is seen by every read asked after the write's commit.
#[tokio::test]
async fn a_generation_read_asked_after_a_write_sees_it_while_other_reads_are_in_flight() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..8 {
        let (s, stop) = (d.store.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut reads = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                s.resource_generation().await.unwrap();
                reads += 1;
            }
            reads
        }));
    }
    for i in 0..50 {
        let before = d.store.resource_generation().await.unwrap().unwrap();
        other
            .create(
                &WriteCtx::cli(),
                ResourceKind::User,
                user(&format!("g{i}")),
                None,
            )
            .await
            .unwrap();
        let after = d.store.resource_generation().await.unwrap().unwrap();
        assert!(
            after > before,
            "write {i}: read {after} after its commit, {before} before it"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut reads = 0;
    for r in readers {
        reads += r.await.unwrap();
    }
    assert!(reads > 0, "the readers kept reads in flight");
}

/// Concurrent exact lookups share statements on PostgreSQL (`postgres::lookups`): each still
/// gets exactly its own answer — names that exist and names that do not, in any case, another
/// filter shape (`externalId`) in the same burst, and several rows for one value in their
/// page's order (creation order, or `sortBy` descending) — and a lookup asked after a write on
/// another replica sees it while other lookups are in flight.
#[tokio::test]
async fn concurrent_lookups_each_get_their_own_answer() {
    let Some((d, other)) = two_handles().await else {
        return;
    };
    let mut ids = Vec::new();
    for i in 0..20 {
        let r = d
            .store
            .create(
                &WriteCtx::cli(),
                ResourceKind::User,
                json!({"userName": format!("u{i}"), "externalId": format!("e{i}"), "active": true}),
                None,
            )
            .await
            .unwrap();
        ids.push(r.id);
    }
    // Three users share each of three external ids ("s0".."s2"), created in this order.
    let mut shared: Vec<Vec<String>> = vec![Vec::new(); 3];
    for i in 0..9 {
        let r = d
            .store
            .create(
                &WriteCtx::cli(),
                ResourceKind::User,
                json!({"userName": format!("z{}", 9 - i), "externalId": format!("s{}", i % 3), "active": true}),
                None,
            )
            .await
            .unwrap();
        shared[i % 3].push(r.id);
    }
    let ids = Arc::new(ids);
    let shared = Arc::new(shared);
    let lookup = |s: DynStore, text: String| async move {
        let (text, sort) = match text.split_once(" sortBy ") {
            Some((t, by)) => (t.to_owned(), Some(by.to_owned())),
            None => (text, None),
        };
        let q = store::ListQuery {
            filter: Some(scim::filter::parse(&text).unwrap()),
            count: 10,
            sort_by: sort.map(|p| scim::path::AttrPath::simple(&p)),
            descending: true,
            ..store::ListQuery::default()
        };
        let page = s.list(ResourceKind::User, &q).await.unwrap();
        assert_eq!(page.total, page.resources.len(), "{text}");
        page.resources
            .iter()
            .map(|r| r.id.clone())
            .collect::<Vec<_>>()
    };
    for round in 0..5 {
        let mut tasks = Vec::new();
        for i in 0..90 {
            let n = (i * 7 + round) % 30;
            let text = match i % 3 {
                0 => format!("userName eq \"u{n}\""),
                1 => format!("userName eq \"U{n}\""),
                _ => format!("externalId eq \"e{n}\""),
            };
            let (s, ids) = (d.store.clone(), ids.clone());
            tasks.push(tokio::spawn(async move {
                let got = lookup(s, text.clone()).await;
                let want: Vec<String> = ids.get(n).cloned().into_iter().collect();
                assert_eq!(got, want, "{text}");
            }));
        }
        for i in 0..30 {
            let k = (i + round) % 3;
            let (text, want) = if i % 2 == 0 {
                // Creation order, descending.
                let mut w = shared[k].clone();
                w.reverse();
                (format!("externalId eq \"s{k}\""), w)
            } else {
                // userName descending: z9, z8, … — creation order.
                (
                    format!("externalId eq \"s{k}\" sortBy userName"),
                    shared[k].clone(),
                )
            };
            let s = d.store.clone();
            tasks.push(tokio::spawn(async move {
                assert_eq!(lookup(s, text.clone()).await, want, "{text}");
            }));
        }
        // Meanwhile a name is written on the other replica: looked up after, it is there.
        let name = format!("late{round}");
        let created = other
            .create(&WriteCtx::cli(), ResourceKind::User, user(&name), None)
            .await
            .unwrap();
        let got = lookup(d.store.clone(), format!("userName eq \"{name}\"")).await;
        assert_eq!(got, vec![created.id], "round {round}");
        for t in tasks {
            t.await.unwrap();
        }
    }
}
