//! No token, password or email address in any log line or audit detail: a full scenario runs
//! at trace level (every crate, dependencies included), then the captured logs and the audit
//! trail are searched for every secret and email it used.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use store::WriteCtx;
use sync::{Engine, EngineConfig};
use teamcity_emulator::EmulatorOptions;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

const POLICY: &str = r#"
[[groups]]
match = { externalId = "00g-eng" }
roles = ["PROJECT_DEVELOPER@p:Backend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Value {
    let mut req = http.request(method, url).bearer_auth(token);
    if let Some(b) = body {
        req = req
            .header("Content-Type", "application/scim+json")
            .body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    let text = resp.text().await.unwrap();
    serde_json::from_str(&text).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_or_email_reaches_logs_or_audit() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_env_filter("trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let _ = rustls::crypto::ring::default_provider().install_default();

    let tc_token = "tc-secret-Zq8Wv3";
    let (tc_url, _emu) = teamcity_emulator::spawn(EmulatorOptions {
        token: tc_token.into(),
        projects: vec!["Backend".into()],
        ..EmulatorOptions::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = store::open(
        &format!("sqlite://{}/s.db", dir.path().display()),
        Arc::new(store::SystemClock),
    )
    .await
    .unwrap();
    let scim_token = server::generate_token([7; 32]);
    store
        .create_token(
            &WriteCtx::cli(),
            "idp",
            server::hash_token(&scim_token),
            None,
        )
        .await
        .unwrap();
    let client = teamcity::Client::new(teamcity::ClientConfig::new(
        tc_url,
        teamcity::Token::new(tc_token),
    ))
    .unwrap();
    let engine = Engine::new(
        store.clone(),
        client,
        sync::Policy::from_toml(POLICY).unwrap(),
        EngineConfig {
            poll: Duration::from_millis(20),
            ..EngineConfig::default()
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}/scim/v2", listener.local_addr().unwrap());
    tokio::spawn(server::serve(
        listener,
        server::AppState::new(store.clone()),
        std::future::pending(),
    ));
    let http = reqwest::Client::new();

    let emails = [
        "grace.hopper@navy.example",
        "ada@lovelace.example",
        "alan.turing@bletchley.example",
    ];
    let passwords = ["Pa55-word-Okta-1", "Pa55-word-Okta-2", "Pa55-word-Okta-3"];
    let mut ids = vec![];
    for (email, password) in emails.iter().zip(passwords) {
        let u = call(
            &http,
            reqwest::Method::POST,
            format!("{base}/Users"),
            &scim_token,
            Some(json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                "userName": email,
                "password": password,
                "name": {"givenName": "G", "familyName": "H"},
                "emails": [{"value": email, "primary": true, "type": "work"}],
                "active": true,
            })),
        )
        .await;
        ids.push(u["id"].as_str().expect("user created").to_owned());
    }
    // Lookups by email, the way Entra and Okta do them, and a wrong token.
    for email in &emails {
        let q = format!("{base}/Users?filter=userName%20eq%20%22{email}%22");
        let r = call(&http, reqwest::Method::GET, q, &scim_token, None).await;
        assert_eq!(r["totalResults"], 1);
    }
    let wrong = "tcscim_wrong-token-Xy7Qp";
    call(
        &http,
        reqwest::Method::GET,
        format!("{base}/Users"),
        wrong,
        None,
    )
    .await;
    let g = call(
        &http,
        reqwest::Method::POST,
        format!("{base}/Groups"),
        &scim_token,
        Some(json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Eng", "externalId": "00g-eng",
                    "members": ids.iter().map(|i| json!({"value": i})).collect::<Vec<_>>()})),
    )
    .await;
    let gid = g["id"].as_str().unwrap().to_owned();
    let patch = |ops: Value| json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops});
    call(
        &http,
        reqwest::Method::PATCH,
        format!("{base}/Users/{}", ids[0]),
        &scim_token,
        Some(patch(json!([{"op": "replace", "path": "emails[type eq \"work\"].value", "value": "grace.new@navy.example"}]))),
    )
    .await;
    call(
        &http,
        reqwest::Method::PATCH,
        format!("{base}/Users/{}", ids[1]),
        &scim_token,
        Some(patch(
            json!([{"op": "replace", "value": {"active": false}}]),
        )),
    )
    .await;
    call(
        &http,
        reqwest::Method::PATCH,
        format!("{base}/Groups/{gid}"),
        &scim_token,
        Some(patch(
            json!([{"op": "replace", "path": "displayName", "value": "Engineering"}]),
        )),
    )
    .await;
    engine.reconcile(false).await.unwrap();
    engine.drain().await.unwrap();
    engine.reconcile(false).await.unwrap();

    // Pull mode: the IdP credentials and the pulled people's addresses stay out too.
    let pstore = store::open(
        &format!("sqlite://{}/pull.db", dir.path().display()),
        Arc::new(store::SystemClock),
    )
    .await
    .unwrap();
    let graph = idp_fake::graph::GraphFake::start().await;
    graph.add_user(idp_fake::graph::FakeUser::new("g-1", "pulled.person"));
    graph.add_group("00g-eng", "Eng");
    graph.add_member("00g-eng", "g-1");
    let graph_secret = dir.path().join("graph-secret");
    std::fs::write(&graph_secret, graph.client_secret()).unwrap();
    let gsrc = source::graph::GraphSource::new(source::graph::GraphOptions {
        tenant_id: graph.tenant_id().into(),
        client_id: graph.client_id().into(),
        credential: source::graph::GraphCredential::Secret(source::SecretFile::new(&graph_secret)),
        graph_url: graph.url(),
        authority_url: graph.url(),
        groups: vec!["00g-eng".into()],
        user_name_attribute: "userPrincipalName".into(),
    });
    let okta = idp_fake::okta::OktaFake::start().await;
    okta.add_user(idp_fake::okta::FakeUser::new("o-1", "okta", "person"));
    okta.add_group("00g-ops", "Ops");
    okta.add_member("00g-ops", "o-1");
    let okta_token = dir.path().join("okta-token");
    std::fs::write(&okta_token, okta.api_token()).unwrap();
    let osrc = source::okta::OktaSource::new(source::okta::OktaOptions {
        org_url: okta.url(),
        credential: source::okta::OktaCredential::ApiToken(source::SecretFile::new(&okta_token)),
        groups: vec!["00g-ops".into()],
    });
    for (src, scope) in [
        (&gsrc as &dyn source::Source, "00g-eng"),
        (&osrc as &dyn source::Source, "00g-ops"),
    ] {
        let r = source::pull::pull_once(&pstore, src, &[scope.to_owned()], &store::SystemClock)
            .await
            .unwrap();
        assert_eq!(r.summary.users_created, 1, "{}", src.kind());
    }
    // A failing pull (a wrong secret) logs and stores its error without the secret.
    std::fs::write(&graph_secret, "wrong-graph-secret-Qm4").unwrap();
    let gsrc_bad = source::graph::GraphSource::new(source::graph::GraphOptions {
        tenant_id: graph.tenant_id().into(),
        client_id: graph.client_id().into(),
        credential: source::graph::GraphCredential::Secret(source::SecretFile::new(&graph_secret)),
        graph_url: graph.url(),
        authority_url: graph.url(),
        groups: vec!["00g-eng".into()],
        user_name_attribute: "userPrincipalName".into(),
    });
    let err = source::pull::pull_once(&pstore, &gsrc_bad, &["00g-eng".into()], &store::SystemClock)
        .await
        .unwrap_err()
        .to_string();
    tracing::warn!(error = %err, "pull failed");
    let last = pstore
        .sync_state_get(&source::pull::last_key("graph"))
        .await
        .unwrap()
        .unwrap_or_default();
    let pulled_audit: String = pstore
        .audit_events(0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {:?} {}\n",
                e.actor, e.operation, e.resource_id, e.detail
            )
        })
        .collect();
    for s in [
        graph.client_secret(),
        "wrong-graph-secret-Qm4",
        okta.api_token(),
        "pulled.person@contoso.example",
        "okta.person@example.com",
    ] {
        assert!(!err.contains(s), "the pull error contains `{s}`");
        assert!(!last.contains(s), "the stored last pull contains `{s}`");
        assert!(!pulled_audit.contains(s), "the pull audit contains `{s}`");
    }
    assert!(
        pulled_audit.contains("source.sync"),
        "the pulls were audited: {pulled_audit}"
    );

    let audit: String = store
        .audit_events(0, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{} {} {} {} {:?} {}\n",
                e.actor, e.resource_type, e.operation, e.outcome, e.resource_id, e.detail
            )
        })
        .collect();
    let logs = String::from_utf8_lossy(&capture.0.lock().unwrap()).into_owned();
    assert!(
        logs.contains("TRACE") && logs.len() > 10_000,
        "the capture saw the trace-level logs"
    );
    assert!(
        audit.lines().count() >= 15,
        "the scenario was audited: {audit}"
    );
    let mut secrets: Vec<&str> = vec![
        tc_token,
        &scim_token,
        wrong,
        "grace.new@navy.example",
        graph.client_secret(),
        "wrong-graph-secret-Qm4",
        okta.api_token(),
        "pulled.person@contoso.example",
        "okta.person@example.com",
    ];
    secrets.extend(emails);
    secrets.extend(passwords);
    for s in secrets {
        assert!(!logs.contains(s), "a log line contains `{s}`");
        assert!(!audit.contains(s), "the audit trail contains `{s}`");
    }
    // Nor their URL-encoded forms in request lines.
    assert!(
        !logs.contains("grace.hopper%40"),
        "an encoded email reached the logs"
    );
}
