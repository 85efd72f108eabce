//! The Okta source against the Okta fake, over real HTTP.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use idp_fake::okta::{FakeUser, OktaFake};
use source::okta::{OktaCredential, OktaOptions, OktaSource};
use source::{Change, Round, SecretFile, Source, SourceError, SourceGroup, SourceUser};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Env {
    fake: OktaFake,
    dir: tempfile::TempDir,
}

impl Env {
    async fn new() -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        Env {
            fake: OktaFake::start().await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A source with the fake's API token.
    fn source(&self, groups: &[&str]) -> OktaSource {
        self.source_with_token(self.fake.api_token(), groups)
    }

    fn source_with_token(&self, token: &str, groups: &[&str]) -> OktaSource {
        let path = self.dir.path().join("okta-token");
        std::fs::write(&path, format!("{token}\n")).unwrap();
        OktaSource::new(OktaOptions {
            org_url: self.fake.url(),
            credential: OktaCredential::ApiToken(SecretFile::new(path)),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        })
    }

    /// A source authenticating as the service app `client_id` with the test key.
    fn app_source(&self, client_id: &str, groups: &[&str]) -> OktaSource {
        OktaSource::new(OktaOptions {
            org_url: self.fake.url(),
            credential: OktaCredential::PrivateKey {
                client_id: client_id.into(),
                key: SecretFile::new(fixture("test-only-rsa-key.pem")),
                key_id: Some("test-key".into()),
            },
            groups: groups.iter().map(|g| g.to_string()).collect(),
        })
    }

    /// Users u1..=u7, `eng` = u1..u5, `ops` = u5..u7 (u5 in both), u8 in no group.
    fn directory(&self) {
        let f = &self.fake;
        for (i, (first, last)) in [
            ("Ada", "Lovelace"),
            ("Alan", "Turing"),
            ("Grace", "Hopper"),
            ("Edsger", "Dijkstra"),
            ("Barbara", "Liskov"),
            ("Ken", "Thompson"),
            ("Dennis", "Ritchie"),
            ("Out", "Sider"),
        ]
        .into_iter()
        .enumerate()
        {
            f.add_user(FakeUser::new(&format!("00u{}", i + 1), first, last));
        }
        f.update_user("00u1", |u| u.display = Some("Countess Ada".into()));
        f.add_group("00geng", "Engineering");
        f.add_group("00gops", "Operations");
        for u in 1..=5 {
            f.add_member("00geng", &format!("00u{u}"));
        }
        for u in 5..=7 {
            f.add_member("00gops", &format!("00u{u}"));
        }
    }
}

fn users(round: &Round) -> HashMap<String, SourceUser> {
    let mut out = HashMap::new();
    for c in &round.changes {
        if let Change::User(u) = c {
            assert!(
                out.insert(u.id.clone(), u.clone()).is_none(),
                "user {} reported twice in one round",
                u.id
            );
        }
    }
    out
}

fn members(round: &Round, group: &str) -> Option<Vec<String>> {
    round.changes.iter().find_map(|c| match c {
        Change::AllMembers { group: g, members } if g == group => {
            let mut m = members.clone();
            m.sort();
            Some(m)
        }
        _ => None,
    })
}

fn groups(round: &Round) -> Vec<SourceGroup> {
    round
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::Group(g) => Some(g.clone()),
            _ => None,
        })
        .collect()
}

fn removed_groups(round: &Round) -> Vec<String> {
    round
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::GroupRemoved { id } => Some(id.clone()),
            _ => None,
        })
        .collect()
}

fn ids(list: &[u32]) -> Vec<String> {
    list.iter().map(|i| format!("00u{i}")).collect()
}

#[tokio::test]
async fn first_sync_reads_groups_users_and_members_across_pages() {
    let env = Env::new().await;
    env.directory();
    env.fake.set_page_size(2);
    let source = env.source(&["00geng", "00gops"]);
    assert_eq!(source.kind(), "okta");

    let round = source.pull(None).await.unwrap();
    assert!(round.full);
    assert_eq!(round.resync_reason, None);
    assert_eq!(
        groups(&round),
        vec![
            SourceGroup {
                id: "00geng".into(),
                display_name: "Engineering".into()
            },
            SourceGroup {
                id: "00gops".into(),
                display_name: "Operations".into()
            },
        ]
    );
    assert_eq!(members(&round, "00geng"), Some(ids(&[1, 2, 3, 4, 5])));
    assert_eq!(members(&round, "00gops"), Some(ids(&[5, 6, 7])));
    let users = users(&round);
    let mut seen: Vec<_> = users.keys().cloned().collect();
    seen.sort();
    assert_eq!(
        seen,
        ids(&[1, 2, 3, 4, 5, 6, 7]),
        "u8 is in no configured group"
    );
    assert_eq!(
        users["00u1"],
        SourceUser {
            id: "00u1".into(),
            user_name: "ada.lovelace@example.com".into(),
            given_name: Some("Ada".into()),
            family_name: Some("Lovelace".into()),
            display_name: Some("Countess Ada".into()),
            email: Some("ada.lovelace@example.com".into()),
            active: true,
        }
    );
    assert_eq!(users["00u2"].display_name.as_deref(), Some("Alan Turing"));
    // 2 group reads + 3 pages of eng members + 2 pages of ops members.
    assert_eq!(round.requests, 7);
    assert_eq!(env.fake.requests(), 7);
    // Each user appears before the AllMembers that names them.
    let pos = |pred: &dyn Fn(&Change) -> bool| round.changes.iter().position(pred).unwrap();
    assert!(
        pos(&|c| matches!(c, Change::User(u) if u.id == "00u5"))
            < pos(&|c| matches!(c, Change::AllMembers { group, .. } if group == "00geng"))
    );
}

#[tokio::test]
async fn incremental_rounds_follow_the_directory() {
    let env = Env::new().await;
    env.directory();
    env.fake.set_page_size(2);
    let source = env.source(&["00geng", "00gops"]);
    // The next `since` never reaches after the round's start less a second (Okta's `Date` is
    // to the second): let the setup fall before that, so the quiet round below is quiet.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let first = source.pull(None).await.unwrap();

    // A quiet round reads the changed users and each group, not the members.
    let quiet = source.pull(Some(&first.cursor)).await.unwrap();
    assert!(!quiet.full);
    assert!(groups(&quiet).is_empty());
    assert_eq!(members(&quiet, "00geng"), None);
    assert_eq!(quiet.requests, 1 + 2, "one search page, two group reads");

    let f = &env.fake;
    f.add_user(FakeUser::new("00u9", "New", "Hire"));
    f.add_member("00geng", "00u9");
    f.update_user("00u6", |u| u.last = "Thompson-Pike".into());
    f.rename_group("00gops", "Operations & SRE");
    f.remove_member("00geng", "00u2");
    f.set_status("00u3", "DEPROVISIONED");
    f.set_status("00u4", "SUSPENDED");

    let round = source.pull(Some(&quiet.cursor)).await.unwrap();
    assert!(!round.full);
    let changed = users(&round);
    assert!(changed["00u9"].active);
    assert_eq!(changed["00u9"].user_name, "new.hire@example.com");
    assert_eq!(
        changed["00u6"].family_name.as_deref(),
        Some("Thompson-Pike")
    );
    assert!(!changed["00u3"].active, "DEPROVISIONED is inactive");
    assert!(!changed["00u4"].active, "SUSPENDED is inactive");
    assert_eq!(members(&round, "00geng"), Some(ids(&[1, 3, 4, 5, 9])));
    assert_eq!(
        members(&round, "00gops"),
        None,
        "ops membership did not move"
    );
    assert_eq!(
        groups(&round),
        vec![SourceGroup {
            id: "00gops".into(),
            display_name: "Operations & SRE".into()
        }]
    );

    // A user deleted leaves their groups; a group deleted is reported once.
    f.delete_user("00u5");
    f.delete_group("00gops");
    let round = source.pull(Some(&round.cursor)).await.unwrap();
    assert_eq!(members(&round, "00geng"), Some(ids(&[1, 3, 4, 9])));
    assert_eq!(removed_groups(&round), vec!["00gops".to_string()]);
    assert!(!users_of(&round).contains(&"00u5".to_string()));

    let round = source.pull(Some(&round.cursor)).await.unwrap();
    assert!(removed_groups(&round).is_empty());
    assert!(!round.full);

    // Reactivated: back to active.
    f.set_status("00u3", "ACTIVE");
    let round = source.pull(Some(&round.cursor)).await.unwrap();
    assert!(users(&round)["00u3"].active);
}

fn users_of(round: &Round) -> Vec<String> {
    users(round).into_keys().collect()
}

#[tokio::test]
async fn a_cursor_for_other_groups_or_garbage_starts_over() {
    let env = Env::new().await;
    env.directory();
    let first = env.source(&["00geng"]).pull(None).await.unwrap();

    let both = env.source(&["00geng", "00gops"]);
    let round = both.pull(Some(&first.cursor)).await.unwrap();
    assert!(round.full);
    assert!(
        round
            .resync_reason
            .as_deref()
            .unwrap()
            .contains("groups changed")
    );
    assert_eq!(members(&round, "00gops"), Some(ids(&[5, 6, 7])));

    let round = both.pull(Some("{\"deltaLink\":\"x\"}")).await.unwrap();
    assert!(round.full);
    assert!(round.resync_reason.is_some());

    // A configured group that does not exist is reported removed in a full round.
    let round = env.source(&["00gnope"]).pull(None).await.unwrap();
    assert_eq!(removed_groups(&round), vec!["00gnope".to_string()]);
}

#[tokio::test]
async fn rate_limit_is_respected_before_a_429() {
    let env = Env::new().await;
    let f = &env.fake;
    f.add_group("00gbig", "Big");
    for i in 0..20 {
        f.add_user(FakeUser::new(
            &format!("00u{i:03}"),
            "User",
            &format!("N{i}"),
        ));
        f.add_member("00gbig", &format!("00u{i:03}"));
    }
    f.set_page_size(2);
    // 5 requests a second per endpoint; the members need 10.
    f.set_rate_limit(5, 1);
    let source = env.source(&["00gbig"]);

    let started = Instant::now();
    let round = source.pull(None).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(members(&round, "00gbig").unwrap().len(), 20);
    assert_eq!(env.fake.throttled(), 0, "the client never reached a 429");
    assert_eq!(round.requests, 11);
    assert!(
        elapsed >= Duration::from_millis(1500),
        "waited for the resets: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
}

#[tokio::test]
async fn a_429_anyway_is_retried_after_the_reset() {
    let env = Env::new().await;
    env.directory();
    let source = env.source(&["00geng"]);
    env.fake.throttle_next(2);
    let round = source.pull(None).await.unwrap();
    assert_eq!(env.fake.throttled(), 2);
    assert_eq!(members(&round, "00geng"), Some(ids(&[1, 2, 3, 4, 5])));
    assert_eq!(round.requests, 2 + 2, "two reads, two retries");
}

#[tokio::test]
async fn an_outage_is_transient() {
    let env = Env::new().await;
    env.directory();
    let source = env.source(&["00geng"]);
    env.fake.set_down(true);
    assert!(matches!(
        source.pull(None).await,
        Err(SourceError::Transient(_))
    ));
    env.fake.set_down(false);
    assert!(source.pull(None).await.is_ok());
}

#[tokio::test]
async fn a_wrong_api_token_is_a_config_error_without_the_token() {
    let env = Env::new().await;
    env.directory();
    let secret = "00wrong-secret-token-value";
    let source = env.source_with_token(secret, &["00geng"]);
    for result in [
        source.pull(None).await.map(|_| ()),
        source.check().await.map(|_| ()),
        source.user("00u1").await.map(|_| ()),
    ] {
        match result {
            Err(SourceError::Config(msg)) => {
                assert!(msg.contains("API token is invalid or revoked"), "{msg}");
                assert!(!msg.contains(secret), "{msg}");
                assert!(!msg.contains(env.fake.api_token()), "{msg}");
            }
            other => panic!("{other:?}"),
        }
    }
    assert!(!format!("{source:?}").contains(secret));
}

#[tokio::test]
async fn a_service_app_with_a_private_key_end_to_end() {
    let env = Env::new().await;
    env.directory();
    let public = std::fs::read_to_string(fixture("test-only-rsa-key.pub.pem")).unwrap();
    env.fake.register_client("0oaservice", &public);
    let source = env.app_source("0oaservice", &["00geng", "00gops"]);

    let first = source.pull(None).await.unwrap();
    assert_eq!(members(&first, "00gops"), Some(ids(&[5, 6, 7])));
    env.fake.update_user("00u1", |u| u.first = "Augusta".into());
    let second = source.pull(Some(&first.cursor)).await.unwrap();
    assert_eq!(
        users(&second)["00u1"].given_name.as_deref(),
        Some("Augusta")
    );
    assert_eq!(
        env.fake.token_requests(),
        1,
        "the token is cached across pulls"
    );
    assert_eq!(first.requests, 1 + 4, "token + 2 groups + 2 member pages");

    // A token revoked early: dropped and renewed once.
    env.fake.expire_tokens();
    let third = source.pull(Some(&second.cursor)).await.unwrap();
    assert!(!third.full);
    assert_eq!(env.fake.token_requests(), 2);

    let report = source.check().await.unwrap();
    assert_eq!(report.identity, "OAuth service app 0oaservice");
    assert_eq!(
        report.permissions,
        vec![
            ("okta.users.read".to_string(), true),
            ("okta.groups.read".to_string(), true)
        ]
    );
    assert_eq!(
        report.groups,
        vec![
            ("00geng".to_string(), Ok("Engineering".to_string()), 5),
            ("00gops".to_string(), Ok("Operations".to_string()), 3),
        ]
    );
    assert!(
        !format!("{source:?}").contains("fake."),
        "no token in Debug"
    );
}

#[tokio::test]
async fn a_service_app_without_the_scopes_or_unknown_is_a_config_error() {
    let env = Env::new().await;
    env.directory();
    let public = std::fs::read_to_string(fixture("test-only-rsa-key.pub.pem")).unwrap();
    env.fake.register_client("0oaservice", &public);
    env.fake.set_scopes("0oaservice", &["okta.groups.read"]);
    match env.app_source("0oaservice", &["00geng"]).pull(None).await {
        Err(SourceError::Config(msg)) => {
            assert!(
                msg.contains("okta.users.read and okta.groups.read"),
                "{msg}"
            )
        }
        other => panic!("{other:?}"),
    }
    match env.app_source("0oaunknown", &["00geng"]).pull(None).await {
        Err(SourceError::Config(msg)) => {
            assert!(msg.contains("invalid_client"), "{msg}");
            assert!(msg.contains("0oaunknown"), "{msg}");
            assert!(!msg.contains("PRIVATE KEY"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_bad_private_key_is_a_config_error_naming_the_file() {
    let env = Env::new().await;
    let key = env.dir.path().join("okta-key.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nc2VjcmV0\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let source = OktaSource::new(OktaOptions {
        org_url: env.fake.url(),
        credential: OktaCredential::PrivateKey {
            client_id: "0oa".into(),
            key: SecretFile::new(&key),
            key_id: None,
        },
        groups: vec!["00geng".into()],
    });
    match source.pull(None).await {
        Err(SourceError::Config(msg)) => {
            assert!(msg.contains("okta-key.pem"), "{msg}");
            assert!(!msg.contains("c2VjcmV0"), "{msg}");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn user_reads_one_user_and_unknown_is_none() {
    let env = Env::new().await;
    env.directory();
    env.fake.set_status("00u8", "DEPROVISIONED");
    let source = env.source(&["00geng"]);
    let u = source.user("00u2").await.unwrap().unwrap();
    assert_eq!(u.user_name, "alan.turing@example.com");
    assert!(u.active);
    assert!(!source.user("00u8").await.unwrap().unwrap().active);
    assert_eq!(source.user("00unknown").await.unwrap(), None);
}

#[tokio::test]
async fn check_reports_identity_permissions_and_groups() {
    let env = Env::new().await;
    env.directory();
    let report = env.source(&["00geng", "00gmissing"]).check().await.unwrap();
    assert_eq!(report.identity, "API token of admin@fake-okta.test");
    assert!(report.permissions.iter().all(|(_, ok)| *ok));
    assert_eq!(
        report.groups,
        vec![
            ("00geng".to_string(), Ok("Engineering".to_string()), 5),
            ("00gmissing".to_string(), Err("not found".to_string()), 0),
        ]
    );
}

#[tokio::test]
async fn ten_thousand_users_in_fifty_pages() {
    let env = Env::new().await;
    env.fake.add_group("00gall", "Everyone");
    for i in 0..10_000 {
        let id = format!("00u{i:05}");
        env.fake
            .add_user(FakeUser::new(&id, "User", &format!("Number{i}")));
        env.fake.add_member("00gall", &id);
    }
    let source = env.source(&["00gall"]);
    let started = Instant::now();
    let round = source.pull(None).await.unwrap();
    assert_eq!(users(&round).len(), 10_000);
    assert_eq!(members(&round, "00gall").unwrap().len(), 10_000);
    assert_eq!(round.requests, 1 + 50);
    assert!(started.elapsed() < Duration::from_secs(30));
}
