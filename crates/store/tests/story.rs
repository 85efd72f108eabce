//! The store story: what every backend must do, run against SQLite and PostgreSQL (see
//! `common/mod.rs`). Writes carry their audit event and outbox row in the same transaction;
//! failures leave nothing behind; SQL filtering agrees with the in-memory evaluator.

use std::sync::Arc;

use scim::filter;
use scim::{AttrPath, ResourceKind};
use serde_json::{Value, json};
use store::audit::{GENESIS_HASH, verify_chain};
use store::{
    DynStore, FixedClock, ListQuery, MemberType, MembershipChange, NewMember, OutboxState,
    ReadOpts, StoreError, WriteCtx,
};
use time::macros::datetime;

mod common;
use common::Backend;

type Db = common::TestDb;

async fn db(backend: Backend) -> Db {
    let clock = Arc::new(FixedClock::new(datetime!(2026-01-01 00:00 UTC)));
    common::open(backend, "story.db", clock).await
}

fn ctx() -> WriteCtx {
    WriteCtx {
        actor: "token:test".into(),
        request_id: Some("req-1".into()),
    }
}

fn user(name: &str) -> Value {
    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": name, "active": true})
}

fn group(name: &str) -> Value {
    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": name})
}

fn member(id: &str) -> NewMember {
    NewMember {
        value: id.to_owned(),
        ty: None,
        display: None,
    }
}

async fn counts(s: &DynStore) -> (usize, usize) {
    (
        s.audit_events(0, 100_000).await.unwrap().len(),
        s.outbox_items(0, 100_000).await.unwrap().len(),
    )
}

both!(
    every_write_records_one_audit_event_and_one_outbox_row,
    every_write_records_one_audit_event_and_one_outbox_row_on
);
async fn every_write_records_one_audit_event_and_one_outbox_row_on(d: Db) {
    let s = &d.store;
    let u = s
        .create(&ctx(), ResourceKind::User, user("alice"), None)
        .await
        .unwrap();
    let g = s
        .create(
            &ctx(),
            ResourceKind::Group,
            group("Ops"),
            Some(vec![member(&u.id)]),
        )
        .await
        .unwrap();
    s.update(
        &ctx(),
        ResourceKind::Group,
        &g.id,
        g.version,
        None,
        &[MembershipChange::RemoveAll],
    )
    .await
    .unwrap();
    s.replace(
        &ctx(),
        ResourceKind::User,
        &u.id,
        None,
        user("alice2"),
        None,
    )
    .await
    .unwrap();
    s.delete(&ctx(), ResourceKind::User, &u.id, None)
        .await
        .unwrap();
    let events = s.audit_events(0, 100).await.unwrap();
    let outbox = s.outbox_items(0, 100).await.unwrap();
    let ops: Vec<(&str, &str)> = events
        .iter()
        .map(|e| (e.resource_type.as_str(), e.operation.as_str()))
        .collect();
    assert_eq!(
        ops,
        [
            ("User", "create"),
            ("Group", "create"),
            ("Group", "patch"),
            ("User", "replace"),
            ("User", "delete")
        ]
    );
    let rows: Vec<(&str, &str, &str)> = outbox
        .iter()
        .map(|o| {
            (
                o.entity_type.as_str(),
                o.entity_id.as_str(),
                o.operation.as_str(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("user", u.id.as_str(), "upsert"),
            ("group", g.id.as_str(), "upsert"),
            ("group", g.id.as_str(), "members"),
            ("user", u.id.as_str(), "upsert"),
            ("user", u.id.as_str(), "delete"),
        ]
    );
    // Each outbox row points at the audit event written with it.
    for (o, e) in outbox.iter().zip(&events) {
        assert_eq!(o.audit_seq, e.seq);
        assert_eq!(o.state, OutboxState::Pending);
    }
    assert!(
        events
            .iter()
            .all(|e| e.actor == "token:test" && e.request_id.as_deref() == Some("req-1"))
    );
    // Audit details never carry the user's data.
    assert!(events.iter().all(|e| !e.detail.contains("alice")));
}

both!(
    failed_writes_leave_nothing_behind,
    failed_writes_leave_nothing_behind_on
);
async fn failed_writes_leave_nothing_behind_on(d: Db) {
    let s = &d.store;
    let u = s
        .create(&ctx(), ResourceKind::User, user("bob"), None)
        .await
        .unwrap();
    let g = s
        .create(&ctx(), ResourceKind::Group, group("Dev"), None)
        .await
        .unwrap();
    let before = counts(s).await;

    // Uniqueness is case-insensitive.
    let e = s
        .create(&ctx(), ResourceKind::User, user("BOB"), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");
    let e = s
        .create(&ctx(), ResourceKind::Group, group("dev"), None)
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)), "{e:?}");

    // A membership change naming a missing member rolls back the attribute change with it.
    let e = s
        .update(
            &ctx(),
            ResourceKind::Group,
            &g.id,
            g.version,
            Some(group("Renamed")),
            &[MembershipChange::Add(vec![member(&u.id), member("nope")])],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Invalid(ref m) if m.contains("nope")),
        "{e:?}"
    );
    let after = s
        .get(
            ResourceKind::Group,
            &g.id,
            ReadOpts {
                members: true,
                groups: false,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.attrs["displayName"], "Dev");
    assert_eq!(after.version, g.version);
    assert_eq!(after.members.unwrap(), vec![]);

    // A stale version is refused.
    let e = s
        .update(
            &ctx(),
            ResourceKind::User,
            &u.id,
            u.version + 7,
            Some(user("bob")),
            &[],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::PreconditionFailed));
    assert_eq!(
        counts(s).await,
        before,
        "failed writes wrote audit or outbox rows"
    );

    // A no-op update changes nothing and records nothing.
    let same = s
        .update(
            &ctx(),
            ResourceKind::Group,
            &g.id,
            g.version,
            None,
            &[MembershipChange::Remove(vec![u.id.clone()])],
        )
        .await
        .unwrap();
    assert_eq!(same.version, g.version);
    assert_eq!(counts(s).await, before);
}

both!(
    the_resource_generation_moves_with_every_committed_resource_write,
    the_resource_generation_moves_with_every_committed_resource_write_on
);
async fn the_resource_generation_moves_with_every_committed_resource_write_on(d: Db) {
    let s = &d.store;
    let at = || async {
        s.resource_generation()
            .await
            .unwrap()
            .expect("both backends count")
    };
    let g0 = at().await;
    let a = s
        .create(&ctx(), ResourceKind::User, user("gen-a"), None)
        .await
        .unwrap();
    let g1 = at().await;
    assert!(g1 > g0, "a create moves it: {g0} → {g1}");
    // A write that fails (the name is taken) leaves nothing, the generation included.
    assert!(
        s.create(&ctx(), ResourceKind::User, user("gen-a"), None)
            .await
            .is_err()
    );
    assert_eq!(at().await, g1);
    let g = s
        .create(&ctx(), ResourceKind::Group, group("gen-g"), None)
        .await
        .unwrap();
    s.update_members(&ctx(), &g.id, &[MembershipChange::Add(vec![member(&a.id)])])
        .await
        .unwrap();
    let g2 = at().await;
    assert!(g2 >= g1 + 2, "a group create and a membership: {g1} → {g2}");
    s.delete(&ctx(), ResourceKind::User, &a.id, None)
        .await
        .unwrap();
    assert!(at().await > g2, "a delete moves it");
}

both!(membership_is_rows, membership_is_rows_on);
async fn membership_is_rows_on(d: Db) {
    let s = &d.store;
    let mut ids = vec![];
    for i in 0..5 {
        ids.push(
            s.create(&ctx(), ResourceKind::User, user(&format!("u{i}")), None)
                .await
                .unwrap()
                .id,
        );
    }
    let sub = s
        .create(&ctx(), ResourceKind::Group, group("Sub"), None)
        .await
        .unwrap();
    let g = s
        .create(
            &ctx(),
            ResourceKind::Group,
            group("All"),
            Some(ids[..3].iter().map(|i| member(i)).collect()),
        )
        .await
        .unwrap();
    let g2 = s
        .update(
            &ctx(),
            ResourceKind::Group,
            &g.id,
            g.version,
            None,
            &[
                MembershipChange::Add(vec![
                    member(&ids[3]),
                    member(&ids[0]),
                    NewMember {
                        value: sub.id.clone(),
                        ty: Some(MemberType::Group),
                        display: Some("Sub".into()),
                    },
                ]),
                MembershipChange::Remove(vec![ids[1].clone(), "absent".into()]),
            ],
        )
        .await
        .unwrap();
    assert_eq!(g2.version, g.version + 1);
    let outbox = s.outbox_items(0, 100).await.unwrap();
    let last: Value = serde_json::from_str(&outbox.last().unwrap().detail).unwrap();
    // Exactly the rows that changed: u3 and Sub added (u0 was already there), u1 removed.
    assert_eq!(
        last,
        json!({"added": [ids[3], sub.id], "removed": [ids[1]]})
    );
    let g3 = s
        .get(
            ResourceKind::Group,
            &g.id,
            ReadOpts {
                members: true,
                groups: false,
            },
        )
        .await
        .unwrap()
        .unwrap();
    let mut got: Vec<(String, MemberType)> = g3
        .members
        .unwrap()
        .into_iter()
        .map(|m| (m.value, m.ty))
        .collect();
    got.sort();
    let mut want = vec![
        (ids[0].clone(), MemberType::User),
        (ids[2].clone(), MemberType::User),
        (ids[3].clone(), MemberType::User),
        (sub.id.clone(), MemberType::Group),
    ];
    want.sort();
    assert_eq!(got, want);
    // A user's groups are derived from the rows.
    let u0 = s
        .get(
            ResourceKind::User,
            &ids[0],
            ReadOpts {
                members: false,
                groups: true,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        u0.groups
            .unwrap()
            .iter()
            .map(|g| g.display.as_str())
            .collect::<Vec<_>>(),
        ["All"]
    );
    // Deleting a user removes its rows.
    s.delete(&ctx(), ResourceKind::User, &ids[0], None)
        .await
        .unwrap();
    assert_eq!(s.member_count(&g.id).await.unwrap(), 3);
    // A group cannot contain itself.
    let e = s
        .update(
            &ctx(),
            ResourceKind::Group,
            &g.id,
            g2.version + 1,
            None,
            &[MembershipChange::Add(vec![NewMember {
                value: g.id.clone(),
                ty: Some(MemberType::Group),
                display: None,
            }])],
        )
        .await
        .unwrap_err();
    assert!(matches!(e, StoreError::Invalid(_)), "{e:?}");
}

both!(
    audit_chain_detects_an_edited_row,
    audit_chain_detects_an_edited_row_on
);
async fn audit_chain_detects_an_edited_row_on(d: Db) {
    let s = &d.store;
    for i in 0..6 {
        s.create(&ctx(), ResourceKind::User, user(&format!("a{i}")), None)
            .await
            .unwrap();
        d.clock.advance(time::Duration::seconds(1));
    }
    let events = s.audit_events(0, 100).await.unwrap();
    assert_eq!(events.len(), 6);
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
    // Tamper with event 4 directly in the database.
    d.raw
        .exec("UPDATE audit_events SET actor = 'someone-else' WHERE seq = 4")
        .await;
    let events = s.audit_events(0, 100).await.unwrap();
    assert_eq!(verify_chain(GENESIS_HASH, &events), Err(4));
}

both!(
    sql_filtering_agrees_with_the_evaluator,
    sql_filtering_agrees_with_the_evaluator_on
);
async fn sql_filtering_agrees_with_the_evaluator_on(d: Db) {
    let s = &d.store;
    let mut all = vec![];
    for (i, (name, ext, active)) in [
        ("Alice@Example.com", Some("A1"), true),
        ("bob", Some("b2"), false),
        ("Carol", None, true),
        ("dave@example.org", Some("a1"), true),
        ("Émile", Some("E"), false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut u = user(name);
        u["active"] = json!(active);
        u["title"] = json!(if i % 2 == 0 { "Engineer" } else { "Manager" });
        if let Some(e) = ext {
            u["externalId"] = json!(e);
        }
        all.push(s.create(&ctx(), ResourceKind::User, u, None).await.unwrap());
        d.clock.advance(time::Duration::hours(1));
    }
    let filters = [
        r#"userName eq "alice@example.com""#,
        r#"userName eq "ALICE@EXAMPLE.COM""#,
        r#"userName ne "bob""#,
        r#"userName co "EXAMPLE""#,
        r#"userName sw "d""#,
        r#"userName ew ".org""#,
        r#"userName gt "c""#,
        r#"userName le "bob""#,
        r#"externalId eq "a1""#,
        r#"externalId ne "a1""#,
        r#"externalId pr"#,
        r#"not (externalId pr)"#,
        r#"active eq false"#,
        r#"active eq "True""#,
        r#"meta.created gt "2026-01-01T01:30:00Z""#,
        r#"meta.created le "2026-01-01T02:00:00+00:00""#,
        r#"meta.lastModified lt "2026-01-01T01:00:00Z""#,
        r#"title eq "Engineer" and active eq true"#,
        r#"title eq "Manager" or userName sw "c""#,
        r#"not (userName eq "bob") and externalId pr"#,
        r#"userName eq "émile""#,
        r#"id eq "no-such-id""#,
    ];
    for text in filters {
        let f = filter::parse(text).unwrap();
        filter::validate(&f, ResourceKind::User).unwrap();
        let q = ListQuery {
            filter: Some(f.clone()),
            count: 100,
            ..Default::default()
        };
        let page = s.list(ResourceKind::User, &q).await.unwrap();
        let got: Vec<&str> = page.resources.iter().map(|r| r.id.as_str()).collect();
        // The reference: evaluate in memory over every stored user.
        let want: Vec<&str> = all
            .iter()
            .filter(|r| {
                let mut v = r.attrs.clone();
                v["id"] = json!(r.id);
                v["meta"] = json!({
                    "created": store::timefmt::format(r.created),
                    "lastModified": store::timefmt::format(r.last_modified),
                });
                filter::matches(&f, ResourceKind::User, &v)
            })
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(got, want, "{text}");
        assert_eq!(page.total, want.len(), "{text}");
    }
}

both!(
    paging_and_sorting_are_stable,
    paging_and_sorting_are_stable_on
);
async fn paging_and_sorting_are_stable_on(d: Db) {
    let s = &d.store;
    for name in ["m", "b", "Z", "a", "k", "c", "y"] {
        s.create(&ctx(), ResourceKind::User, user(name), None)
            .await
            .unwrap();
    }
    let page = |offset, count, sort: Option<&str>, descending| {
        let q = ListQuery {
            sort_by: sort.map(|p| AttrPath::parse(p).unwrap()),
            descending,
            offset,
            count,
            ..Default::default()
        };
        async move {
            let p = s.list(ResourceKind::User, &q).await.unwrap();
            (
                p.total,
                p.resources
                    .iter()
                    .map(|r| r.attrs["userName"].as_str().unwrap().to_owned())
                    .collect::<Vec<_>>(),
            )
        }
    };
    assert_eq!(
        page(0, 3, None, false).await,
        (7, vec!["m".into(), "b".into(), "Z".into()])
    );
    assert_eq!(page(3, 3, None, false).await.1, ["a", "k", "c"]);
    assert_eq!(page(6, 3, None, false).await.1, ["y"]);
    assert_eq!(page(0, 0, None, false).await, (7, vec![]));
    // userName sorts case-insensitively (caseExact=false).
    assert_eq!(
        page(0, 7, Some("userName"), false).await.1,
        ["a", "b", "c", "k", "m", "y", "Z"]
    );
    assert_eq!(page(0, 2, Some("username"), true).await.1, ["Z", "y"]);
    // A sort without a column runs in memory with the same result shape.
    assert_eq!(page(0, 7, Some("title"), false).await.0, 7);
}

both!(
    tokens_hash_only_expire_and_revoke,
    tokens_hash_only_expire_and_revoke_on
);
async fn tokens_hash_only_expire_and_revoke_on(d: Db) {
    let s = &d.store;
    let a = s
        .create_token(&WriteCtx::cli(), "okta", [1; 32], None)
        .await
        .unwrap();
    let b = s
        .create_token(
            &WriteCtx::cli(),
            "short",
            [2; 32],
            Some(datetime!(2026-01-01 00:10 UTC)),
        )
        .await
        .unwrap();
    let valid: Vec<String> = s
        .valid_token_hashes()
        .await
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.id)
        .collect();
    assert_eq!(valid.len(), 2);
    d.clock.advance(time::Duration::minutes(11));
    let valid: Vec<String> = s
        .valid_token_hashes()
        .await
        .unwrap()
        .into_iter()
        .map(|(_, t)| t.id)
        .collect();
    assert_eq!(
        valid,
        std::slice::from_ref(&a.id),
        "expired token still valid"
    );
    s.revoke_token(&WriteCtx::cli(), &a.id).await.unwrap();
    assert!(s.valid_token_hashes().await.unwrap().is_empty());
    assert!(matches!(
        s.revoke_token(&WriteCtx::cli(), &a.id).await,
        Err(StoreError::NotFound)
    ));
    assert_eq!(s.list_tokens().await.unwrap().len(), 2);
    let ops: Vec<String> = s
        .audit_events(0, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.operation)
        .collect();
    assert_eq!(ops, ["token.create", "token.create", "token.revoke"]);
    let _ = b;
}

both!(
    token_scopes_are_stored_and_kept_apart,
    token_scopes_are_stored_and_kept_apart_on
);
async fn token_scopes_are_stored_and_kept_apart_on(d: Db) {
    let s = &d.store;
    let scim = s
        .create_token(&WriteCtx::cli(), "okta", [1; 32], None)
        .await
        .unwrap();
    let admin = s
        .create_scoped_token(
            &WriteCtx::cli(),
            store::TokenScope::Admin,
            "ops",
            [2; 32],
            None,
        )
        .await
        .unwrap();
    assert_eq!(scim.scope, store::TokenScope::Scim);
    assert_eq!(admin.scope, store::TokenScope::Admin);
    let valid: Vec<([u8; 32], String, store::TokenScope)> = s
        .valid_token_hashes()
        .await
        .unwrap()
        .into_iter()
        .map(|(h, t)| (h, t.id, t.scope))
        .collect();
    assert!(valid.contains(&([1; 32], scim.id.clone(), store::TokenScope::Scim)));
    assert!(valid.contains(&([2; 32], admin.id.clone(), store::TokenScope::Admin)));
    let listed: Vec<store::TokenScope> = s
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.scope)
        .collect();
    assert_eq!(listed.len(), 2);
    assert!(listed.contains(&store::TokenScope::Admin));
    // The creation is audited with its scope.
    let events = s.audit_recent(None, 1).await.unwrap();
    assert_eq!(events[0].operation, "token.create");
    assert!(
        events[0].detail.contains("\"scope\":\"admin\""),
        "{}",
        events[0].detail
    );
}

both!(
    audit_recent_pages_newest_first,
    audit_recent_pages_newest_first_on
);
async fn audit_recent_pages_newest_first_on(d: Db) {
    let s = &d.store;
    for n in 0..5 {
        s.create(&ctx(), ResourceKind::User, user(&format!("u{n}")), None)
            .await
            .unwrap();
    }
    let all = s.audit_recent(None, 100).await.unwrap();
    let seqs: Vec<i64> = all.iter().map(|e| e.seq).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable_by(|a, b| b.cmp(a));
    assert_eq!(seqs, sorted, "newest first");
    assert_eq!(seqs.len(), 5);
    let page = s.audit_recent(Some(seqs[1]), 2).await.unwrap();
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        seqs[2..4].to_vec(),
        "before is exclusive and the limit holds"
    );
    assert!(s.audit_recent(Some(seqs[4]), 10).await.unwrap().is_empty());
}

both!(
    membership_updates_apply_at_any_version,
    membership_updates_apply_at_any_version_on
);
async fn membership_updates_apply_at_any_version_on(d: Db) {
    let s = &d.store;
    let a = s
        .create(&ctx(), ResourceKind::User, user("ma"), None)
        .await
        .unwrap();
    let b = s
        .create(&ctx(), ResourceKind::User, user("mb"), None)
        .await
        .unwrap();
    let g = s
        .create(&ctx(), ResourceKind::Group, group("mg"), None)
        .await
        .unwrap();
    // Someone renames the group meanwhile: a membership change still applies, keeps the rename.
    let renamed = s
        .update(
            &ctx(),
            ResourceKind::Group,
            &g.id,
            g.version,
            Some(group("mg2")),
            &[],
        )
        .await
        .unwrap();
    let r = s
        .update_members(
            &ctx(),
            &g.id,
            &[MembershipChange::Add(vec![member(&a.id), member(&b.id)])],
        )
        .await
        .unwrap();
    assert_eq!(r.version, renamed.version + 1, "one bump for the change");
    assert_eq!(r.attrs["displayName"], "mg2", "the rename is kept");
    let (audit_before, outbox_before) = counts(s).await;
    // Adding members already there changes nothing: no bump, no audit event, no outbox row.
    let same = s
        .update_members(&ctx(), &g.id, &[MembershipChange::Add(vec![member(&a.id)])])
        .await
        .unwrap();
    assert_eq!(same.version, r.version);
    assert_eq!(counts(s).await, (audit_before, outbox_before));
    let r = s
        .update_members(
            &ctx(),
            &g.id,
            &[MembershipChange::Remove(vec![a.id.clone()])],
        )
        .await
        .unwrap();
    assert_eq!(r.version, same.version + 1);
    assert!(matches!(
        s.update_members(&ctx(), "no-such-group", &[MembershipChange::RemoveAll])
            .await,
        Err(StoreError::NotFound)
    ));
}

both!(
    membership_changes_of_many_members_keep_their_order_and_first_mentions,
    membership_changes_of_many_members_keep_their_order_and_first_mentions_on
);
/// Membership changes name many members at once (an IdP's group create, a PATCH with a list):
/// what is added and removed is reported in the order the change names it, each id once, a
/// member mentioned twice keeps its first mention, and a failing member fails the whole change
/// with the first failure in the list.
async fn membership_changes_of_many_members_keep_their_order_and_first_mentions_on(d: Db) {
    let s = &d.store;
    let mut ids = vec![];
    for i in 0..300 {
        ids.push(
            s.create(
                &ctx(),
                ResourceKind::User,
                user(&format!("many{i:03}")),
                None,
            )
            .await
            .unwrap()
            .id,
        );
    }
    let sub = s
        .create(&ctx(), ResourceKind::Group, group("many-sub"), None)
        .await
        .unwrap();
    let last_detail = || async {
        let outbox = s.outbox_items(0, 100_000).await.unwrap();
        serde_json::from_str::<Value>(&outbox.last().unwrap().detail).unwrap()
    };
    let with_display = |id: &str, display: &str| NewMember {
        value: id.to_owned(),
        ty: None,
        display: Some(display.to_owned()),
    };
    // Created with its members in reverse order, one of them twice, and an untyped group.
    let mut list: Vec<NewMember> = ids.iter().rev().map(|i| member(i)).collect();
    list[0] = with_display(&ids[299], "first");
    list.push(with_display(&ids[299], "second"));
    list.push(member(&sub.id));
    let g = s
        .create(&ctx(), ResourceKind::Group, group("many"), Some(list))
        .await
        .unwrap();
    let mut want_added: Vec<String> = ids.iter().rev().cloned().collect();
    want_added.push(sub.id.clone());
    let created = last_detail().await;
    let added: Vec<String> = created["added"]
        .as_array()
        .map(|a| a.iter().map(|v| v.as_str().unwrap().to_owned()).collect())
        .unwrap_or_else(|| panic!("a create names what it added: {created}"));
    assert_eq!(added, want_added, "in the order given, each once");
    let read = s
        .get(
            ResourceKind::Group,
            &g.id,
            ReadOpts {
                members: true,
                groups: false,
            },
        )
        .await
        .unwrap()
        .unwrap();
    let members = read.members.unwrap();
    assert_eq!(members.len(), 301);
    let m299 = members.iter().find(|m| m.value == ids[299]).unwrap();
    assert_eq!(
        m299.display.as_deref(),
        Some("first"),
        "the first mention is kept"
    );
    let msub = members.iter().find(|m| m.value == sub.id).unwrap();
    assert_eq!(msub.ty, MemberType::Group, "an untyped id that is a group");

    // The first failing member of the list is the one named; nothing of the change lands.
    let (audit_before, outbox_before) = counts(s).await;
    let typed_user_that_is_a_group = NewMember {
        value: sub.id.clone(),
        ty: Some(MemberType::User),
        display: None,
    };
    for (change, named) in [
        (vec![member("missing-1"), member("missing-2")], "missing-1"),
        (
            vec![
                member(&ids[0]),
                typed_user_that_is_a_group,
                member("missing-3"),
            ],
            sub.id.as_str(),
        ),
    ] {
        let e = s
            .update_members(
                &ctx(),
                &g.id,
                &[
                    MembershipChange::Remove(vec![ids[5].clone()]),
                    MembershipChange::Add(change),
                ],
            )
            .await
            .unwrap_err();
        assert!(
            matches!(e, StoreError::Invalid(ref m) if m.contains(named)),
            "{named}: {e:?}"
        );
    }
    let e = s
        .update_members(
            &ctx(),
            &g.id,
            &[MembershipChange::Add(vec![
                member(&ids[1]),
                NewMember {
                    value: g.id.clone(),
                    ty: None,
                    display: None,
                },
                member("missing-4"),
            ])],
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, StoreError::Invalid(ref m) if m.contains("itself")),
        "{e:?}"
    );
    assert_eq!(counts(s).await, (audit_before, outbox_before));
    assert_eq!(s.member_count(&g.id).await.unwrap(), 301);

    // Removals in the order named, each once; ids not there are not reported.
    s.update_members(
        &ctx(),
        &g.id,
        &[MembershipChange::Remove(vec![
            ids[7].clone(),
            "absent".into(),
            ids[3].clone(),
            ids[7].clone(),
            ids[250].clone(),
        ])],
    )
    .await
    .unwrap();
    assert_eq!(
        last_detail().await,
        json!({"added": [], "removed": [ids[7], ids[3], ids[250]]})
    );
    // A replacement removes the rest in id order and adds the new in the order given.
    s.update_members(
        &ctx(),
        &g.id,
        &[MembershipChange::ReplaceAll(vec![
            member(&ids[9]),
            member(&ids[7]),
            member(&ids[3]),
        ])],
    )
    .await
    .unwrap();
    let mut want_removed: Vec<String> = ids
        .iter()
        .filter(|i| ![&ids[9], &ids[7], &ids[3], &ids[250]].contains(i))
        .cloned()
        .chain([sub.id.clone()])
        .collect();
    want_removed.sort();
    assert_eq!(
        last_detail().await,
        json!({"added": [ids[7], ids[3]], "removed": want_removed})
    );
    assert_eq!(s.member_count(&g.id).await.unwrap(), 3);
}

both!(
    a_batch_is_all_or_nothing_with_its_cursor,
    a_batch_is_all_or_nothing_with_its_cursor_on
);
async fn a_batch_is_all_or_nothing_with_its_cursor_on(d: Db) {
    use store::BatchOp;
    let s = &d.store;
    let old = s
        .create(&ctx(), ResourceKind::User, user("old"), None)
        .await
        .unwrap();
    let before = counts(s).await;
    // A batch whose last write breaks uniqueness: nothing of it stays, the cursor is not moved.
    let bad = [
        BatchOp::Create {
            kind: ResourceKind::User,
            id: "u-new".into(),
            attrs: user("new"),
            members: None,
        },
        BatchOp::Replace {
            kind: ResourceKind::User,
            id: old.id.clone(),
            attrs: user("renamed"),
        },
        BatchOp::Create {
            kind: ResourceKind::User,
            id: "u-dup".into(),
            attrs: user("NEW"),
            members: None,
        },
    ];
    let err = s
        .write_batch(&ctx(), &bad, Some(("source:cursor", "c1")))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(counts(s).await, before);
    assert!(s.sync_state_get("source:cursor").await.unwrap().is_none());
    let kept = s
        .get(ResourceKind::User, &old.id, ReadOpts::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept.attrs["userName"], "old");

    // A good batch: a user and a group naming it, a rename, a member removed, a delete — each
    // audited and enqueued as its single command would be, and the cursor with them.
    let good = [
        BatchOp::Create {
            kind: ResourceKind::User,
            id: "u-new".into(),
            attrs: user("new"),
            members: None,
        },
        BatchOp::Create {
            kind: ResourceKind::Group,
            id: "g-1".into(),
            attrs: group("Team"),
            members: Some(vec![member("u-new"), member(&old.id)]),
        },
        BatchOp::Replace {
            kind: ResourceKind::Group,
            id: "g-1".into(),
            attrs: group("Team renamed"),
        },
        BatchOp::Members {
            id: "g-1".into(),
            changes: vec![MembershipChange::Remove(vec![old.id.clone()])],
        },
        BatchOp::Delete {
            kind: ResourceKind::User,
            id: old.id.clone(),
        },
    ];
    s.write_batch(&ctx(), &good, Some(("source:cursor", "c2")))
        .await
        .unwrap();
    assert_eq!(counts(s).await, (before.0 + 5, before.1 + 5));
    assert_eq!(
        s.sync_state_get("source:cursor").await.unwrap().as_deref(),
        Some("c2")
    );
    let g = s
        .get(
            ResourceKind::Group,
            "g-1",
            ReadOpts {
                members: true,
                groups: false,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.attrs["displayName"], "Team renamed");
    let members: Vec<String> = g
        .members
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.value)
        .collect();
    assert_eq!(members, vec!["u-new".to_string()]);
    assert!(
        s.get(ResourceKind::User, &old.id, ReadOpts::default())
            .await
            .unwrap()
            .is_none()
    );
    let events = s.audit_events(0, 100_000).await.unwrap();
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
}

both!(
    what_a_create_returns_is_what_a_read_gives,
    what_a_create_returns_is_what_a_read_gives_on
);
async fn what_a_create_returns_is_what_a_read_gives_on(d: Db) {
    let s = &d.store;
    let created = s
        .create(
            &ctx(),
            ResourceKind::User,
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": "Read.Back",
                   "name": {"givenName": "R", "familyName": "B"}, "emails": [{"value": "r@b.example", "primary": true}],
                   "active": true, "x": 1.5}),
            None,
        )
        .await
        .unwrap();
    let read = s
        .get(
            ResourceKind::User,
            &created.id,
            ReadOpts {
                members: false,
                groups: true,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(created.attrs, read.attrs);
    assert_eq!(
        (created.created, created.last_modified, created.version),
        (read.created, read.last_modified, read.version)
    );
    assert_eq!(created.groups.as_deref(), Some(&[][..]));
    assert_eq!(read.groups.as_deref(), Some(&[][..]));
    // The same name in another case is the SCIM conflict, from the unique index.
    let err = s
        .create(&ctx(), ResourceKind::User, user("read.back"), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let g = s
        .create(
            &ctx(),
            ResourceKind::Group,
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Team",
                   "externalId": "ext-1", "x": 2.25}),
            Some(vec![member(&created.id)]),
        )
        .await
        .unwrap();
    let read = s
        .get(
            ResourceKind::Group,
            &g.id,
            ReadOpts {
                members: false,
                groups: false,
            },
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(g.attrs, read.attrs);
    assert_eq!(
        (g.created, g.last_modified, g.version, g.members, g.groups),
        (read.created, read.last_modified, read.version, None, None)
    );
    s.create(&ctx(), ResourceKind::Group, group("Other"), None)
        .await
        .unwrap();
    let err = s
        .replace(
            &ctx(),
            ResourceKind::Group,
            &g.id,
            None,
            group("OTHER"),
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
}

both!(
    concurrent_writes_each_get_their_own_answer,
    concurrent_writes_each_get_their_own_answer_on
);
/// Many writes at once (on SQLite they share transactions through group commit): each is
/// answered with its own outcome — a name conflict fails alone, the others land — and what
/// was acknowledged is exactly what is stored, audited and enqueued.
async fn concurrent_writes_each_get_their_own_answer_on(d: Db) {
    let s = &d.store;
    let before = counts(s).await;
    let mut tasks = Vec::new();
    for i in 0..96 {
        let s = s.clone();
        // Every fourth name is taken by its predecessor (the same name in another case).
        let name = if i % 4 == 3 {
            format!("U{}", i - 1)
        } else {
            format!("u{i}")
        };
        tasks.push(tokio::spawn(async move {
            s.create(&ctx(), ResourceKind::User, user(&name), None)
                .await
        }));
    }
    let mut ok = 0;
    let mut conflicts = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(r) => {
                ok += 1;
                let read = s
                    .get(ResourceKind::User, &r.id, ReadOpts::default())
                    .await
                    .unwrap()
                    .expect("an acknowledged create is stored");
                assert_eq!(read.attrs, r.attrs);
            }
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(e) => panic!("unexpected: {e:?}"),
        }
    }
    // Each taken name conflicts once, whichever of the pair came first.
    assert_eq!((ok, conflicts), (72, 24));
    assert_eq!(counts(s).await, (before.0 + 72, before.1 + 72));
    let events = s.audit_events(0, 100_000).await.unwrap();
    assert!(verify_chain(GENESIS_HASH, &events).is_ok());
}

both!(
    a_write_given_up_before_it_ran_is_not_written,
    a_write_given_up_before_it_ran_is_not_written_on
);
/// A request that gives up (its timeout, a client gone) before its write ran leaves nothing
/// behind — on SQLite its job waits in the group-commit queue and is skipped there.
async fn a_write_given_up_before_it_ran_is_not_written_on(d: Db) {
    let s = &d.store;
    let before = counts(s).await;
    let c = ctx();
    {
        // Polled once and dropped at once, before anything else runs: a request given up.
        let mut fut = std::pin::pin!(s.create(&c, ResourceKind::User, user("impatient"), None));
        let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
        assert!(
            first.is_pending(),
            "the write had not finished at its first poll"
        );
    }
    // The next write goes through the same queue after it: once it is answered, the one given
    // up was skipped (or never sent).
    s.create(&ctx(), ResourceKind::User, user("patient"), None)
        .await
        .unwrap();
    let q = ListQuery {
        filter: Some(filter::parse("userName eq \"impatient\"").unwrap()),
        count: 10,
        ..ListQuery::default()
    };
    assert!(
        s.list(ResourceKind::User, &q)
            .await
            .unwrap()
            .resources
            .is_empty()
    );
    assert_eq!(counts(s).await, (before.0 + 1, before.1 + 1));
}
