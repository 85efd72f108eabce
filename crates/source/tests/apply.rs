//! Rounds of IdP changes applied to a real store: what lands, round after round. Each step is
//! a row of the table: the round, then the directory it must leave (users with `active`,
//! groups with their members) and what it must have counted.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use source::apply::{Summary, apply_round};
use source::{Change, CheckReport, Round, Source, SourceGroup, SourceResult, SourceUser};
use store::{DynStore, SystemClock, WriteCtx};

/// A source whose `user()` answers from a map (the rounds are given to `apply_round` directly).
#[derive(Debug, Default)]
struct Users(Mutex<HashMap<String, SourceUser>>);

#[async_trait]
impl Source for Users {
    fn kind(&self) -> &'static str {
        "table"
    }
    async fn pull(&self, _: Option<&str>) -> SourceResult<Round> {
        unreachable!("the table gives rounds directly")
    }
    async fn user(&self, id: &str) -> SourceResult<Option<SourceUser>> {
        Ok(self.0.lock().unwrap().get(id).cloned())
    }
    async fn check(&self) -> SourceResult<CheckReport> {
        Ok(CheckReport::default())
    }
}

fn u(id: &str, active: bool) -> SourceUser {
    SourceUser {
        id: id.into(),
        user_name: format!("{id}@example.com"),
        given_name: Some(id.to_uppercase()),
        family_name: None,
        display_name: None,
        email: Some(format!("{id}@example.com")),
        active,
    }
}

fn g(id: &str, name: &str) -> Change {
    Change::Group(SourceGroup {
        id: id.into(),
        display_name: name.into(),
    })
}

fn all(group: &str, members: &[&str]) -> Change {
    Change::AllMembers {
        group: group.into(),
        members: members.iter().map(|s| s.to_string()).collect(),
    }
}

fn round(full: bool, changes: Vec<Change>) -> Round {
    Round {
        changes,
        full,
        cursor: "c".into(),
        resync_reason: None,
        requests: 1,
    }
}

/// The directory as (user → active) and (group name → sorted member userNames).
async fn dump(s: &DynStore) -> (BTreeMap<String, bool>, BTreeMap<String, Vec<String>>) {
    let d = s.directory().await.unwrap();
    let names: HashMap<&str, &str> = d
        .users
        .iter()
        .map(|u| (u.id.as_str(), u.user_name.as_str()))
        .collect();
    let users = d
        .users
        .iter()
        .map(|u| (u.user_name.clone(), u.active))
        .collect();
    let groups = d
        .groups
        .iter()
        .map(|g| {
            let mut m: Vec<String> = g
                .members
                .iter()
                .map(|m| names[m.value.as_str()].to_string())
                .collect();
            m.sort();
            (g.display_name.clone(), m)
        })
        .collect();
    (users, groups)
}

struct Step {
    what: &'static str,
    round: Round,
    users: &'static [(&'static str, bool)],
    groups: &'static [(&'static str, &'static [&'static str])],
    summary: Summary,
}

#[tokio::test]
async fn rounds_land_as_the_idp_says_and_silence_removes_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/apply.db", dir.path().display());
    let store = store::open(&url, Arc::new(SystemClock)).await.unwrap();
    let scope = vec!["G1".to_string(), "G2".to_string()];
    let src = Users::default();
    src.0.lock().unwrap().insert("dora".into(), u("dora", true));
    let ctx = WriteCtx {
        actor: "source:table".into(),
        request_id: None,
    };
    let steps = vec![
        Step {
            what: "first sync: users in scope created (eve is in no configured group), groups with members",
            round: round(
                true,
                vec![
                    Change::User(u("ann", true)),
                    Change::User(u("bob", true)),
                    Change::User(u("cid", true)),
                    Change::User(u("eve", true)),
                    g("G1", "Dev"),
                    all("G1", &["ann", "bob"]),
                    g("G2", "Ops"),
                    all("G2", &["bob", "cid"]),
                    g("G9", "Not configured"),
                    all("G9", &["eve"]),
                ],
            ),
            users: &[
                ("ann@example.com", true),
                ("bob@example.com", true),
                ("cid@example.com", true),
            ],
            groups: &[
                ("Dev", &["ann@example.com", "bob@example.com"]),
                ("Ops", &["bob@example.com", "cid@example.com"]),
            ],
            summary: Summary {
                users_created: 3,
                groups_created: 2,
                members_added: 4,
                ..Summary::default()
            },
        },
        Step {
            what: "the same full round again changes nothing",
            round: round(
                true,
                vec![
                    Change::User(u("ann", true)),
                    Change::User(u("bob", true)),
                    Change::User(u("cid", true)),
                    g("G1", "Dev"),
                    all("G1", &["ann", "bob"]),
                    g("G2", "Ops"),
                    all("G2", &["bob", "cid"]),
                ],
            ),
            users: &[
                ("ann@example.com", true),
                ("bob@example.com", true),
                ("cid@example.com", true),
            ],
            groups: &[
                ("Dev", &["ann@example.com", "bob@example.com"]),
                ("Ops", &["bob@example.com", "cid@example.com"]),
            ],
            summary: Summary::default(),
        },
        Step {
            what: "a user joins without changing: read from the IdP and created; bob leaves Dev but stays in Ops",
            round: round(
                false,
                vec![Change::Members {
                    group: "G1".into(),
                    added: vec!["dora".into()],
                    removed: vec!["bob".into()],
                }],
            ),
            users: &[
                ("ann@example.com", true),
                ("bob@example.com", true),
                ("cid@example.com", true),
                ("dora@example.com", true),
            ],
            groups: &[
                ("Dev", &["ann@example.com", "dora@example.com"]),
                ("Ops", &["bob@example.com", "cid@example.com"]),
            ],
            summary: Summary {
                users_created: 1,
                members_added: 1,
                members_removed: 1,
                ..Summary::default()
            },
        },
        Step {
            what: "a full round that does not list Ops (unknown, not removed) keeps its members",
            round: round(
                true,
                vec![
                    Change::User(u("ann", true)),
                    Change::User(u("dora", true)),
                    g("G1", "Dev"),
                    all("G1", &["ann", "dora"]),
                ],
            ),
            users: &[
                ("ann@example.com", true),
                ("bob@example.com", true),
                ("cid@example.com", true),
                ("dora@example.com", true),
            ],
            groups: &[
                ("Dev", &["ann@example.com", "dora@example.com"]),
                ("Ops", &["bob@example.com", "cid@example.com"]),
            ],
            summary: Summary::default(),
        },
        Step {
            what: "disabled in the IdP → inactive; a rename of the group; cid removed from its only group → inactive",
            round: round(
                false,
                vec![
                    Change::User(u("ann", false)),
                    g("G2", "Operations"),
                    Change::Members {
                        group: "G2".into(),
                        added: vec![],
                        removed: vec!["cid".into()],
                    },
                ],
            ),
            users: &[
                ("ann@example.com", false),
                ("bob@example.com", true),
                ("cid@example.com", false),
                ("dora@example.com", true),
            ],
            groups: &[
                ("Dev", &["ann@example.com", "dora@example.com"]),
                ("Operations", &["bob@example.com"]),
            ],
            summary: Summary {
                users_deactivated: 2,
                groups_updated: 1,
                members_removed: 1,
                ..Summary::default()
            },
        },
        Step {
            what: "soft delete → inactive (and out of its groups); hard delete → deleted; reactivation",
            round: round(
                false,
                vec![
                    Change::UserRemoved {
                        id: "dora".into(),
                        hard: false,
                    },
                    Change::UserRemoved {
                        id: "bob".into(),
                        hard: true,
                    },
                    Change::User(u("ann", true)),
                ],
            ),
            users: &[
                ("ann@example.com", true),
                ("cid@example.com", false),
                ("dora@example.com", false),
            ],
            groups: &[("Dev", &["ann@example.com"]), ("Operations", &[])],
            summary: Summary {
                users_updated: 1,
                users_deactivated: 1,
                users_deleted: 1,
                // dora out of Dev, bob out of Operations (his deletion would drop it anyway)
                members_removed: 2,
                ..Summary::default()
            },
        },
        Step {
            what: "a group deleted in the IdP is deleted; its only members leave the scope",
            round: round(false, vec![Change::GroupRemoved { id: "G1".into() }]),
            users: &[
                ("ann@example.com", false),
                ("cid@example.com", false),
                ("dora@example.com", false),
            ],
            groups: &[("Operations", &[])],
            summary: Summary {
                users_deactivated: 1,
                groups_deleted: 1,
                ..Summary::default()
            },
        },
    ];
    for step in steps {
        let (summary, _) = apply_round(
            &store,
            &src,
            &scope,
            &step.round,
            "source:table:cursor",
            &ctx,
        )
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", step.what));
        let (users, groups) = dump(&store).await;
        let want_users: BTreeMap<String, bool> = step
            .users
            .iter()
            .map(|(n, a)| (n.to_string(), *a))
            .collect();
        let want_groups: BTreeMap<String, Vec<String>> = step
            .groups
            .iter()
            .map(|(n, m)| (n.to_string(), m.iter().map(|s| s.to_string()).collect()))
            .collect();
        assert_eq!(users, want_users, "{}: users", step.what);
        assert_eq!(groups, want_groups, "{}: groups", step.what);
        assert_eq!(summary, step.summary, "{}: summary", step.what);
        assert_eq!(
            store
                .sync_state_get("source:table:cursor")
                .await
                .unwrap()
                .as_deref(),
            Some("c"),
            "{}: the cursor is stored with the changes",
            step.what
        );
    }
}

#[tokio::test]
async fn a_taken_username_is_a_conflict_and_a_pushed_user_is_linked() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/apply.db", dir.path().display());
    let store = store::open(&url, Arc::new(SystemClock)).await.unwrap();
    let ctx = WriteCtx::cli();
    // Pushed before pull mode: no externalId.
    store
        .create(
            &ctx,
            scim::ResourceKind::User,
            serde_json::json!({"schemas": [scim::schema::USER_SCHEMA], "userName": "ann@example.com"}),
            None,
        )
        .await
        .unwrap();
    let scope = vec!["G1".to_string()];
    let src = Users::default();
    let mut other = u("zed", true);
    other.user_name = "ann@example.com".into();
    // ann links to the pushed record; a second IdP object with the same userName conflicts.
    let r = round(
        true,
        vec![
            Change::User(u("ann", true)),
            g("G1", "Dev"),
            all("G1", &["ann"]),
        ],
    );
    let (s, _) = apply_round(&store, &src, &scope, &r, "k", &ctx)
        .await
        .unwrap();
    assert_eq!(s.users_updated, 1, "linked: {s:?}");
    assert_eq!(s.users_created, 0);
    let r = round(
        false,
        vec![
            Change::User(other),
            Change::Members {
                group: "G1".into(),
                added: vec!["zed".into()],
                removed: vec![],
            },
        ],
    );
    let (s, _) = apply_round(&store, &src, &scope, &r, "k", &ctx)
        .await
        .unwrap();
    assert_eq!(s.conflicts.len(), 1, "{s:?}");
    assert!(s.conflicts[0].contains("ann@example.com"), "{s:?}");
    let (users, groups) = dump(&store).await;
    assert_eq!(users.len(), 1);
    assert_eq!(groups["Dev"], vec!["ann@example.com".to_string()]);
}
