//! The Microsoft Graph source against the Graph fake, over real HTTP.

use std::time::{Duration, Instant};

use idp_fake::graph::{FakeUser, GraphFake};
use source::graph::{GraphCredential, GraphOptions, GraphSource};
use source::{Change, Round, SecretFile, Source, SourceError, SourceGroup, SourceUser};

struct Env {
    fake: GraphFake,
    dir: tempfile::TempDir,
}

async fn env() -> Env {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let fake = GraphFake::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(
        dir.path().join("secret"),
        format!("{}\n", fake.client_secret()),
    )
    .expect("write secret");
    Env { fake, dir }
}

impl Env {
    fn options(&self, groups: &[&str]) -> GraphOptions {
        GraphOptions {
            tenant_id: self.fake.tenant_id().to_string(),
            client_id: self.fake.client_id().to_string(),
            credential: GraphCredential::Secret(SecretFile::new(self.dir.path().join("secret"))),
            graph_url: self.fake.url(),
            authority_url: self.fake.url(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            user_name_attribute: "userPrincipalName".to_string(),
        }
    }

    fn source(&self, groups: &[&str]) -> GraphSource {
        GraphSource::new(self.options(groups))
    }

    /// Users u1..u5 (alice, bob, carol, dave, erin); g1 "Engineering" = all five, g2 "Ops" =
    /// u1, g3 "Elsewhere" (not configured) = u2.
    fn directory(&self) {
        for (id, name) in [
            ("u1", "alice"),
            ("u2", "bob"),
            ("u3", "carol"),
            ("u4", "dave"),
            ("u5", "erin"),
        ] {
            self.fake.add_user(FakeUser::new(id, name));
        }
        self.fake.add_group("g1", "Engineering");
        self.fake.add_group("g2", "Ops");
        self.fake.add_group("g3", "Elsewhere");
        for u in ["u1", "u2", "u3", "u4", "u5"] {
            self.fake.add_member("g1", u);
        }
        self.fake.add_member("g2", "u1");
        self.fake.add_member("g3", "u2");
    }
}

fn user(id: &str, name: &str) -> SourceUser {
    SourceUser {
        id: id.to_string(),
        user_name: format!("{name}@contoso.example"),
        given_name: Some(name.to_string()),
        family_name: Some("Example".to_string()),
        display_name: Some(format!("{name} Example")),
        email: Some(format!("{name}@contoso.example")),
        active: true,
    }
}

fn group(id: &str, name: &str) -> Change {
    Change::Group(SourceGroup {
        id: id.to_string(),
        display_name: name.to_string(),
    })
}

fn all_members(group: &str, members: &[&str]) -> Change {
    Change::AllMembers {
        group: group.to_string(),
        members: members.iter().map(|m| m.to_string()).collect(),
    }
}

fn members(group: &str, added: &[&str], removed: &[&str]) -> Change {
    Change::Members {
        group: group.to_string(),
        added: added.iter().map(|m| m.to_string()).collect(),
        removed: removed.iter().map(|m| m.to_string()).collect(),
    }
}

/// The first sync, then the cursor to continue from.
async fn first(src: &GraphSource) -> Round {
    let round = src.pull(None).await.expect("first pull");
    assert!(round.full);
    round
}

#[tokio::test]
async fn first_sync_is_a_full_round_with_users_groups_and_members_across_pages() {
    let env = env().await;
    env.directory();
    env.fake.set_page_size(2);
    let src = env.source(&["g2", "g1"]);
    let round = src.pull(None).await.expect("pull");
    assert!(round.full);
    assert_eq!(round.resync_reason, None);
    let expected = vec![
        Change::User(user("u1", "alice")),
        Change::User(user("u2", "bob")),
        Change::User(user("u3", "carol")),
        Change::User(user("u4", "dave")),
        Change::User(user("u5", "erin")),
        group("g1", "Engineering"),
        all_members("g1", &["u1", "u2", "u3", "u4", "u5"]),
        group("g2", "Ops"),
        all_members("g2", &["u1"]),
    ];
    assert_eq!(round.changes, expected);
    // 5 users in pages of 2: 3 pages; g1's 5 members in 3 entries + g2: 2 pages; 1 token.
    assert_eq!(env.fake.requests_to("users/delta"), 3);
    assert_eq!(env.fake.requests_to("groups/delta"), 2);
    assert_eq!(env.fake.requests_to("token"), 1);
    assert_eq!(round.requests, 6);
    assert_eq!(round.requests, env.fake.requests());

    // Nothing changed since: an empty incremental round.
    let next = src.pull(Some(&round.cursor)).await.expect("incremental");
    assert!(!next.full);
    assert_eq!(next.changes, vec![]);
    assert_eq!(next.requests, 2);
}

#[tokio::test]
async fn new_hire_joining_a_group_comes_complete_without_a_user_read() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1", "g2"]);
    let round = first(&src).await;
    env.fake.add_user(FakeUser::new("u9", "zoe"));
    env.fake.add_member("g1", "u9");
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert!(!next.full);
    assert_eq!(
        next.changes,
        vec![Change::User(user("u9", "zoe")), members("g1", &["u9"], &[])]
    );
    assert_eq!(env.fake.requests_to("users/{id}"), 0);
}

#[tokio::test]
async fn a_partial_delta_entry_is_completed_by_reading_the_user() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1"]);
    let round = first(&src).await;
    env.fake
        .update_user("u1", |u| u.display = Some("Alice Renamed".into()));
    env.fake.update_user("u2", |u| u.enabled = false);
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    let mut alice = user("u1", "alice");
    alice.display_name = Some("Alice Renamed".into());
    let mut bob = user("u2", "bob");
    bob.active = false;
    assert_eq!(next.changes, vec![Change::User(alice), Change::User(bob)]);
    // The delta carried {id, displayName} and {id, accountEnabled}: one read each.
    assert_eq!(env.fake.requests_to("users/{id}"), 2);
    assert_eq!(next.requests, 1 + 1 + 2);
}

#[tokio::test]
async fn members_added_and_removed_incrementally() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1", "g2"]);
    let round = first(&src).await;
    env.fake.add_member("g2", "u2");
    env.fake.remove_member("g1", "u3");
    env.fake.add_member("g3", "u4"); // not configured
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert_eq!(
        next.changes,
        vec![members("g1", &[], &["u3"]), members("g2", &["u2"], &[])]
    );
}

#[tokio::test]
async fn soft_and_hard_deletes() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1"]);
    let round = first(&src).await;
    env.fake.delete_user("u4", false);
    env.fake.delete_user("u5", true);
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert_eq!(
        next.changes,
        vec![
            Change::UserRemoved {
                id: "u4".into(),
                hard: false
            },
            Change::UserRemoved {
                id: "u5".into(),
                hard: true
            },
        ]
    );
}

#[tokio::test]
async fn group_renamed_and_group_deleted() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1", "g2"]);
    let round = first(&src).await;
    env.fake.rename_group("g1", "Platform");
    env.fake.delete_group("g2");
    env.fake.rename_group("g3", "Not configured");
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert_eq!(
        next.changes,
        vec![
            group("g1", "Platform"),
            Change::GroupRemoved { id: "g2".into() }
        ]
    );
}

#[tokio::test]
async fn an_expired_delta_link_starts_over_with_a_full_round() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1"]);
    let round = first(&src).await;
    env.fake.delete_user("u5", true);
    env.fake.expire_delta_links();
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert!(next.full);
    assert_eq!(
        next.resync_reason.as_deref(),
        Some("the delta link expired (syncStateNotFound)")
    );
    assert_eq!(
        next.changes,
        vec![
            Change::User(user("u1", "alice")),
            Change::User(user("u2", "bob")),
            Change::User(user("u3", "carol")),
            Change::User(user("u4", "dave")),
            group("g1", "Engineering"),
            all_members("g1", &["u1", "u2", "u3", "u4"]),
        ]
    );
    // The refused request is counted: refused + users + groups (the token is cached).
    assert_eq!(next.requests, 3);

    // The new cursor works; a 400 syncStateNotFound (as documented for identity resources) is
    // a refusal too.
    env.fake.add_member("g1", "u5");
    let after = src.pull(Some(&next.cursor)).await.expect("pull");
    assert!(!after.full);
    env.fake.expire_delta_links_as_bad_request();
    let again = src.pull(Some(&after.cursor)).await.expect("pull");
    assert!(again.full);
    assert_eq!(
        again.resync_reason.as_deref(),
        Some("the delta link expired (syncStateNotFound)")
    );
}

#[tokio::test]
async fn changed_group_scope_starts_over_with_a_full_round() {
    let env = env().await;
    env.directory();
    let round = first(&env.source(&["g1"])).await;
    let wider = env.source(&["g1", "g2"]);
    let next = wider.pull(Some(&round.cursor)).await.expect("pull");
    assert!(next.full);
    assert_eq!(
        next.resync_reason.as_deref(),
        Some("the configured groups changed")
    );
    assert!(next.changes.contains(&all_members("g2", &["u1"])));
    let garbage = wider.pull(Some("not a cursor")).await.expect("pull");
    assert!(garbage.full);
    assert!(garbage.resync_reason.is_some());
}

#[tokio::test]
async fn throttling_waits_for_retry_after_then_succeeds() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1"]);
    env.fake.throttle(1, 1);
    let started = Instant::now();
    let round = src.pull(None).await.expect("pull");
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(round.full);
    // token + 429 + users + groups
    assert_eq!(round.requests, 4);
    assert_eq!(round.requests, env.fake.requests());
}

#[tokio::test]
async fn a_wrong_secret_is_a_config_error_that_does_not_show_the_secret() {
    let env = env().await;
    env.directory();
    let wrong = "Wr0ng~Secret~Value~0123456789";
    std::fs::write(env.dir.path().join("secret"), wrong).expect("write");
    let src = env.source(&["g1"]);
    let err = src.pull(None).await.expect_err("refused");
    let SourceError::Config(msg) = &err else {
        panic!("not a config error: {err:?}");
    };
    assert!(!msg.contains(wrong), "{msg}");
    assert!(msg.contains("invalid_client"), "{msg}");
    assert!(msg.contains("secret"), "{msg}");
    assert!(msg.contains(env.fake.client_id()), "{msg}");
    assert!(matches!(src.check().await, Err(SourceError::Config(_))));

    // An unknown tenant names the tenant to fix.
    let mut opts = env.options(&["g1"]);
    opts.tenant_id = "00000000-0000-0000-0000-000000000000".into();
    let err = GraphSource::new(opts)
        .pull(None)
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, SourceError::Config(m) if m.contains("tenant_id")),
        "{err:?}"
    );
}

#[tokio::test]
async fn check_reports_identity_permissions_and_groups() {
    let env = env().await;
    env.directory();
    env.fake.add_group("g4", "Nested");
    env.fake.add_member("g1", "g4");
    let src = env.source(&["g1", "missing"]);
    let report = src.check().await.expect("check");
    assert!(
        report.identity.contains(env.fake.client_id()),
        "{}",
        report.identity
    );
    assert!(
        report.identity.contains(env.fake.tenant_id()),
        "{}",
        report.identity
    );
    assert_eq!(
        report.permissions,
        vec![
            ("User.Read.All".to_string(), true),
            ("GroupMember.Read.All".to_string(), true)
        ]
    );
    assert_eq!(report.groups.len(), 2);
    assert_eq!(report.groups[0].0, "g1");
    assert_eq!(report.groups[0].1, Ok("Engineering".to_string()));
    assert_eq!(
        report.groups[0].2, 5,
        "the nested group is not a user member"
    );
    assert_eq!(report.groups[1].0, "missing");
    assert!(report.groups[1].1.is_err());
}

#[tokio::test]
async fn a_missing_permission_is_reported_by_check_and_refuses_a_pull() {
    let env = env().await;
    env.directory();
    env.fake.set_roles(vec!["User.Read.All"]);
    let src = env.source(&["g1"]);
    let report = src.check().await.expect("check");
    assert_eq!(
        report.permissions,
        vec![
            ("User.Read.All".to_string(), true),
            ("GroupMember.Read.All".to_string(), false)
        ]
    );
    assert!(report.groups[0].1.is_err());
    let err = src.pull(None).await.expect_err("403");
    assert!(
        matches!(&err, SourceError::Config(m) if m.contains("GroupMember.Read.All") && m.contains("admin consent")),
        "{err:?}"
    );

    // Directory.Read.All covers both.
    let env = self::env().await;
    env.fake.set_roles(vec!["Directory.Read.All"]);
    let report = env.source(&[]).check().await.expect("check");
    assert!(report.permissions.iter().all(|(_, granted)| *granted));
}

#[tokio::test]
async fn the_token_is_cached_across_pulls_and_fetched_again_after_expiry() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1"]);
    let round = first(&src).await;
    let mut cursor = round.cursor;
    for _ in 0..3 {
        cursor = src.pull(Some(&cursor)).await.expect("pull").cursor;
    }
    src.user("u1").await.expect("user");
    assert_eq!(env.fake.requests_to("token"), 1);

    env.fake.set_token_lifetime(1);
    let short = env.source(&["g1"]);
    let round = first(&short).await;
    let round = short.pull(Some(&round.cursor)).await.expect("pull");
    assert_eq!(env.fake.requests_to("token"), 2);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    short.pull(Some(&round.cursor)).await.expect("pull");
    assert_eq!(env.fake.requests_to("token"), 3);
}

#[tokio::test]
async fn a_revoked_token_is_dropped_and_the_request_retried_once() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1"]);
    let round = first(&src).await;
    env.fake.revoke_tokens();
    env.fake.add_member("g2", "u3");
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert!(!next.full);
    assert_eq!(env.fake.requests_to("token"), 2);
    // 401 + token + users delta + groups delta
    assert_eq!(next.requests, 4);
}

#[tokio::test]
async fn user_reads_one_user_and_none_for_an_unknown_id() {
    let env = env().await;
    env.directory();
    let src = env.source(&[]);
    assert_eq!(src.user("nobody").await.expect("read"), None);
    assert_eq!(
        src.user("u3").await.expect("read"),
        Some(user("u3", "carol"))
    );
    assert_eq!(src.kind(), "graph");
}

#[tokio::test]
async fn incremental_paging_is_followed_to_the_delta_link() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1", "g2"]);
    let round = first(&src).await;
    env.fake.set_page_size(1);
    for (id, name) in [("u6", "frank"), ("u7", "grace"), ("u8", "heidi")] {
        env.fake.add_user(FakeUser::new(id, name));
        env.fake.add_member("g2", id);
    }
    env.fake.add_member("g1", "u6");
    let before = env.fake.requests_to("users/delta");
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert_eq!(env.fake.requests_to("users/delta") - before, 3);
    assert_eq!(
        next.changes,
        vec![
            Change::User(user("u6", "frank")),
            Change::User(user("u7", "grace")),
            Change::User(user("u8", "heidi")),
            members("g1", &["u6"], &[]),
            members("g2", &["u6", "u7", "u8"], &[]),
        ]
    );
    // And the delta link at the end of the pages is the next cursor.
    let after = src.pull(Some(&next.cursor)).await.expect("pull");
    assert_eq!(after.changes, vec![]);
}

#[tokio::test]
async fn nested_groups_are_not_expanded() {
    let env = env().await;
    env.directory();
    env.fake.add_group("g4", "Nested");
    env.fake.add_member("g4", "u3");
    env.fake.add_member("g2", "g4");
    let src = env.source(&["g2"]);
    let round = first(&src).await;
    assert!(round.changes.contains(&all_members("g2", &["u1"])));
    env.fake.remove_member("g2", "g4");
    let next = src.pull(Some(&round.cursor)).await.expect("pull");
    assert_eq!(next.changes, vec![]);
}

#[tokio::test]
async fn mail_as_user_name_falls_back_to_the_upn() {
    let env = env().await;
    env.fake.add_user(FakeUser {
        id: "u1".into(),
        upn: "alice@contoso.onmicrosoft.com".into(),
        mail: Some("alice@contoso.example".into()),
        given: None,
        surname: None,
        display: None,
        enabled: true,
    });
    env.fake.add_user(FakeUser {
        mail: None,
        ..FakeUser::new("u2", "bob")
    });
    let mut opts = env.options(&[]);
    opts.user_name_attribute = "mail".into();
    let round = GraphSource::new(opts).pull(None).await.expect("pull");
    let names: Vec<(&str, Option<&str>)> = round
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::User(u) => Some((u.user_name.as_str(), u.given_name.as_deref())),
            _ => None,
        })
        .collect();
    assert_eq!(
        names,
        vec![
            ("alice@contoso.example", None),
            ("bob@contoso.example", Some("bob"))
        ]
    );
    let mut opts = env.options(&[]);
    opts.user_name_attribute = "employeeId".into();
    assert!(matches!(
        GraphSource::new(opts).pull(None).await,
        Err(SourceError::Config(_))
    ));
}

#[tokio::test]
async fn a_down_graph_fails_the_pull_as_transient() {
    let env = env().await;
    env.directory();
    let src = env.source(&["g1"]);
    let round = first(&src).await;
    env.fake.set_down(true);
    let started = Instant::now();
    let err = src.pull(Some(&round.cursor)).await.expect_err("down");
    assert!(matches!(err, SourceError::Transient(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    env.fake.set_down(false);
    assert!(!src.pull(Some(&round.cursor)).await.expect("up").full);
}

#[tokio::test]
async fn ten_thousand_users_and_a_thousand_groups_first_sync() {
    let env = env().await;
    env.fake.set_page_size(200);
    for i in 0..10_000 {
        env.fake
            .add_user(FakeUser::new(&format!("u{i:05}"), &format!("user{i}")));
    }
    let mut groups = Vec::new();
    for g in 0..1_000 {
        let id = format!("g{g:04}");
        env.fake.add_group(&id, &format!("Group {g}"));
        for k in 0..10 {
            env.fake
                .add_member(&id, &format!("u{:05}", (g * 10 + k) % 10_000));
        }
        groups.push(id);
    }
    let ids: Vec<&str> = groups.iter().map(String::as_str).collect();
    let src = env.source(&ids);
    let started = Instant::now();
    let round = src.pull(None).await.expect("pull");
    let users = round
        .changes
        .iter()
        .filter(|c| matches!(c, Change::User(_)))
        .count();
    let memberships: usize = round
        .changes
        .iter()
        .map(|c| match c {
            Change::AllMembers { members, .. } => members.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(users, 10_000);
    assert_eq!(memberships, 10_000);
    // 1,000 groups in $filter chunks of 50.
    assert_eq!(env.fake.requests_to("groups/delta"), 20);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
}

/// A throwaway RSA key and self-signed certificate (made for these tests with `openssl req
/// -x509 -newkey rsa:2048`), and the certificate's `x5t`.
const TEST_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQDAmD1iqUtnbvjb\nCOOjGMrDr67fMEmspf0Togppcz/FZH6GER9PCPyu2xnzhFFfdoOopJC5vRSEFrHs\nkh832UpjGNUo9ZaXURxY0pXXPsA5/CKMLtKOAvMoh5oKk9ltPcK1Pu2wCPJkXyMY\nD41eIwrNLDbe1KNBz1tRTg3uVnubGJf8PI63chQikRF/mz0Mycn8sOayjoN/m+Ji\ndPh6PCBjUnxjyW6FNI5hcl1khfYB8pRHtU4n4suVwKhPfkUIRBbK66l1cEN/rWmq\nd+yJ/PVUxz6koUBRSfv1vnunO2hY85t88qfhsNYt3R49XTAuR6qFcMlyjnHpe0zu\nXYNYcw5HAgMBAAECggEAMYZUbqzy/2eJZaWtB7El3tkr4iekIlnSsLw/6irhMKyt\nXmNDxkqc04fy7exOEnrC01hyANkuz+KYISnYDj/5gW8OzUgNz95jKDIKpv1zZ9W+\nuoaFzU/T4E2yXlrzk8RIb9v9OgGq9wWB3DuPki/3pJfkijtquc8M/+TO70Vc5p4j\nsG3cK7aH2CGl9fBSWO0YIQuGG8xBqiO+gGCKGp+FdtzgHf0DYt5SguEbxtWpWiBj\nlSnDAk8CWAav3Ud24vlH6bjj1yZFJ7apxIFelTp0iXQigTwJHTocOnw2xIyW47B4\nZkwwiCFQaz7IhpCi/tOeR4wBEU/O4FmbNhtQiNNY0QKBgQDekJfbM1LxxQ1tgaUo\n4HIVu+E167BdBBGDzzQCUJRZqaAx2oK64glfAjFTU5L2pM3dNYUtsL4ASXuvRl46\nmDYMmIAM/J4hwO2O72BqKTOj+ifDtH41oIL6DpV1taZklbJit9667OKiT0TovZTH\nMimw/dMqnOvVP6UX1UK7/j2PtwKBgQDdhw3ZZoEivCjWVRsGkPVlq4IGsKsxpjZc\n9pHGps0qqo+5pm6/AHN+hwGQG/DI0UmKpyJqJ3Aww179CALhPd686iOF7bAvCYNK\nKLpjsQfBO/0MKZJv2TgQeCXlz79EsspO5gRw/QLA+17BASqhut8jGKyconmeAWFt\ntdVe4HFV8QKBgQDSULzPbN6SjO01b++MgxwLobEd7QyJuVB7yA+TqGWnnP0+Xwhu\nZS8J0t6dqToVTIMk6HBjTsMdLlNsvAhLQo7AtFM88nLT3qYeDeKEL08XQ0rUSvmA\n358lgSaHRxJntnYNh0c4SKWZT2MEtDGlUqfHEvS7LfJFX5E4xlP7pjKyXQKBgBwN\nXSCZjWLDpvw1PL3hH2InjMiiGJup65psEtuwBa0QejDNNZr0SKvOFtGT6DLV5dUs\nAvykT92s79tk51B0kD8l+yebiML8FmcOr0OuiEfc+9dNcGC/hgz32fy3CQZ/CYVi\nNU/FilK7wiz4o9hlHJqKJlmTbYknrZnB++oOy+tRAoGAWvBySXqgHYzQGphr0qH0\n9wk9awCQY39rdontAzLq98z+7l7HfezZhlcNLWeMrBQwoja9gTxTQ/yIv4o+XHZ8\nVk/ZDOfmUKMVgxzZZ1/OvEZZaqNPQ/7Gh4RZgDP614vERadH8ytZCtsHKq/lFiJh\n2E2vxSuSxqnLdjDC7eN9Bok=\n-----END PRIVATE KEY-----\n";
const TEST_CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIDKTCCAhGgAwIBAgIUa+/dHkwNyKBRDlGd/sTfL6tQ10gwDQYJKoZIhvcNAQEL\nBQAwIzEhMB8GA1UEAwwYdGVhbWNpdHktc2NpbSBncmFwaCB0ZXN0MCAXDTI2MTIw\nNzA1MzQ0OFoYDzIxMjYxMTEzMDUzNDQ4WjAjMSEwHwYDVQQDDBh0ZWFtY2l0eS1z\nY2ltIGdyYXBoIHRlc3QwggEiMA0GCSqGSIb3DQEBAQUAA4IBDwAwggEKAoIBAQDA\nmD1iqUtnbvjbCOOjGMrDr67fMEmspf0Togppcz/FZH6GER9PCPyu2xnzhFFfdoOo\npJC5vRSEFrHskh832UpjGNUo9ZaXURxY0pXXPsA5/CKMLtKOAvMoh5oKk9ltPcK1\nPu2wCPJkXyMYD41eIwrNLDbe1KNBz1tRTg3uVnubGJf8PI63chQikRF/mz0Mycn8\nsOayjoN/m+JidPh6PCBjUnxjyW6FNI5hcl1khfYB8pRHtU4n4suVwKhPfkUIRBbK\n66l1cEN/rWmqd+yJ/PVUxz6koUBRSfv1vnunO2hY85t88qfhsNYt3R49XTAuR6qF\ncMlyjnHpe0zuXYNYcw5HAgMBAAGjUzBRMB0GA1UdDgQWBBTA/LYoM08RPlDlv1V6\n+ZYn8mYpfzAfBgNVHSMEGDAWgBTA/LYoM08RPlDlv1V6+ZYn8mYpfzAPBgNVHRMB\nAf8EBTADAQH/MA0GCSqGSIb3DQEBCwUAA4IBAQAbzsVUe7Vn3bzT2sQPS+J+zzwk\nb9eYz9Cx2t6msbN/iJB6t01UXqhrTgUR3PFoxkBhJj8DS9/20Qt4Sny7FCGbTh+5\nCmhLgseowFCuIwy0lDCyX3QYT8KyqexrCoU7t1aHGxAFa6wSUkqePpl/1SrbP6Az\nO78FT7drtNzvVbN+U6046IBVFKtCgJRndPYQX8oeYUzozwzqmMehHVGlGy/wgoOv\naM1jAJyEGSgXmMDVSMtok4NqDC8W6Os1NJxiQdO88Y3Wv29SPKaMeVjKKos3hWqs\nPTA+wnR0Ja9SwFXMcudME19HDGTw/wL4x3Nu1jYA6YJ0c8tWYulKR3plmM9s\n-----END CERTIFICATE-----\n";
const TEST_CERT_X5T: &str = "r-zbJydrYk1Fxxy2T3bxVtojgbM";

#[tokio::test]
async fn a_certificate_credential_signs_a_client_assertion() {
    let env = env().await;
    env.directory();
    env.fake.set_certificate_thumbprint(TEST_CERT_X5T);
    std::fs::write(env.dir.path().join("key.pem"), TEST_KEY).expect("write key");
    std::fs::write(env.dir.path().join("cert.pem"), TEST_CERT).expect("write cert");
    let mut opts = env.options(&["g1"]);
    opts.credential = GraphCredential::Certificate {
        certificate: env.dir.path().join("cert.pem"),
        key: SecretFile::new(env.dir.path().join("key.pem")),
    };
    let round = GraphSource::new(opts).pull(None).await.expect("pull");
    assert!(
        round
            .changes
            .contains(&all_members("g1", &["u1", "u2", "u3", "u4", "u5"]))
    );
}

/// The fake's side of the certificate credential (until the client's is wired): it takes a
/// client assertion naming the registered certificate, and refuses one naming another.
#[tokio::test]
async fn the_fake_checks_client_assertions() {
    use base64::Engine;
    let env = env().await;
    env.fake.set_certificate_thumbprint(TEST_CERT_X5T);
    let token_url = format!(
        "{}/{}/oauth2/v2.0/token",
        env.fake.url(),
        env.fake.tenant_id()
    );
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let assertion = |x5t: &str| {
        format!(
            "{}.{}.c2ln",
            b64(serde_json::json!({"alg": "RS256", "typ": "JWT", "x5t": x5t})),
            b64(serde_json::json!({
                "aud": token_url, "iss": env.fake.client_id(), "sub": env.fake.client_id(),
                "jti": "1", "nbf": now, "exp": now + 600,
            }))
        )
    };
    let client = reqwest::Client::new();
    for (x5t, expected) in [(TEST_CERT_X5T, 200), ("c29tZXRoaW5nIGVsc2U", 401)] {
        let body = format!(
            "grant_type=client_credentials&client_id={}&scope={}%2F.default&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={}",
            env.fake.client_id(),
            env.fake.url().replace(':', "%3A").replace('/', "%2F"),
            assertion(x5t)
        );
        let resp = client
            .post(&token_url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .expect("token request");
        assert_eq!(resp.status().as_u16(), expected, "{x5t}");
    }
}
