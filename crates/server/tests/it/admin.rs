//! The dashboard's HTTP surface with a stub sync engine: only admin tokens, strict headers,
//! the Overview's held batches with their exact commands, dead rows with their reasons, and
//! markup from the directory escaped.

use std::sync::Arc;

use futures::future::BoxFuture;
use serde_json::json;
use server::admin::{AdminSource, AdminState, GroupView, PersonView, PlanView};
use store::{HeldBatch, TokenScope, WriteCtx};

#[derive(Debug)]
struct Stub;

impl AdminSource for Stub {
    fn teamcity(&self) -> Result<String, String> {
        Err("TeamCity is unreachable (connection refused)".into())
    }
    fn held_affects<'a>(&'a self, b: &'a HeldBatch) -> BoxFuture<'a, String> {
        Box::pin(async move { format!("users of batch {}", b.id) })
    }
    fn person<'a>(&'a self, _: &'a str) -> BoxFuture<'a, Result<PersonView, String>> {
        Box::pin(async { Err("not in this test".into()) })
    }
    fn groups(&self) -> BoxFuture<'_, Result<Vec<GroupView>, String>> {
        Box::pin(async { Ok(vec![]) })
    }
    fn plan(&self) -> BoxFuture<'_, Result<PlanView, String>> {
        Box::pin(async { Err("not in this test".into()) })
    }
}

#[tokio::test]
async fn the_overview_shows_held_batches_dead_rows_and_why_not_ready_to_admins_only() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/t.db", dir.path().display());
    let store = store::open(&url, Arc::new(store::SystemClock))
        .await
        .expect("store");
    let admin = server::generate_token([3; 32]);
    store
        .create_scoped_token(
            &WriteCtx::cli(),
            TokenScope::Admin,
            "ops",
            server::hash_token(&admin),
            None,
        )
        .await
        .expect("admin token");
    let scim = server::generate_token([4; 32]);
    store
        .create_token(&WriteCtx::cli(), "okta", server::hash_token(&scim), None)
        .await
        .expect("scim token");
    // A user whose name is markup, a held batch, and a dead outbox row.
    store
        .create(
            &WriteCtx::cli(),
            scim::ResourceKind::User,
            json!({"userName": "<script>alert(1)</script>", "active": true}),
            None,
        )
        .await
        .expect("user");
    let held = store
        .create_held(
            &WriteCtx::sync(),
            "reconcile",
            &[],
            "remove 12 users from <b>Devs</b>",
            12,
            &json!([]),
        )
        .await
        .expect("held");
    let claimed = store
        .claim_outbox(
            "w",
            time::OffsetDateTime::now_utc(),
            std::time::Duration::from_secs(60),
            10,
        )
        .await
        .expect("claim");
    let rows = claimed.first().expect("the user's outbox row").ids();
    // A permanent failure: dead at once.
    store
        .fail_outbox(
            &WriteCtx::sync(),
            &rows,
            "TeamCity refused: 403 Forbidden",
            false,
            time::OffsetDateTime::now_utc(),
            &store::RetryPolicy::default(),
        )
        .await
        .expect("dead");

    let state = AdminState {
        store: store.clone(),
        tokens: server::auth::TokenCache::for_scope(store.clone(), TokenScope::Admin),
        source: Arc::new(Stub),
        readiness: Some(server::Readiness(Arc::new(|| {
            Some("TeamCity is unreachable (connection refused)".into())
        }))),
        secure_cookie: false,
    };
    // Without a TeamCity token the bridge is ready (it stores and queues), and says that
    // nothing is applied.
    let queued = AdminState {
        readiness: None,
        ..state.clone()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let queued_addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve_admin(
        listener,
        queued,
        server::ServeOptions::default(),
        std::future::pending(),
    ));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(server::serve_admin(
        listener,
        state,
        server::ServeOptions::default(),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");

    for token in [None, Some(scim.as_str())] {
        let mut req = http.get(format!("{base}/"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("get");
        assert_eq!(r.status(), 401, "token {token:?}");
    }
    let r = http
        .get(format!("{base}/"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let csp = r.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );
    assert_eq!(r.headers()["cache-control"], "no-store");
    let html = r.text().await.expect("html");
    for want in [
        "Not ready: TeamCity is unreachable (connection refused)",
        &format!("teamcity-scim approve {held}"),
        &format!("teamcity-scim held drop {held}"),
        &format!("users of batch {held}"),
        "remove 12 users from &#60;b&#62;Devs&#60;/b&#62;",
        "TeamCity refused: 403 Forbidden",
    ] {
        assert!(html.contains(want), "overview lacks {want:?}:\n{html}");
    }
    assert!(!html.contains("<b>Devs</b>"), "markup from data is escaped");

    let page = http
        .get(format!("http://{queued_addr}/"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("get")
        .text()
        .await
        .expect("html");
    assert!(
        page.contains("stored and queued, not applied") && !page.contains("applied to TeamCity."),
        "{page}"
    );

    let people = http
        .get(format!("{base}/people"))
        .bearer_auth(&admin)
        .send()
        .await
        .expect("people")
        .text()
        .await
        .expect("html");
    assert!(
        people.contains("&#60;script&#62;alert(1)&#60;/script&#62;"),
        "{people}"
    );
    assert!(!people.contains("<script>alert"), "{people}");
}
