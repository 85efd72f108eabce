//! Safety of a running `serve`: a policy that does not match TeamCity applies nothing and
//! readiness says why; TeamCity restored from a backup under a running `serve` never gets a
//! write meant for someone else; a `reconcile --apply` from the CLI leaves no running `serve`
//! with a stale view of TeamCity.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use store::{HeldState, OutboxState, WriteCtx};

use crate::support::{Env, KillOnDrop, POLICY, TC_TOKEN, free_port, serve, signal, text, wait_up};

const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";

/// Sends a SCIM request as an IdP does; returns the status and the JSON body.
async fn scim(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Value,
) -> (u16, Value) {
    let r = http
        .request(method, url)
        .bearer_auth(token)
        .header("Content-Type", "application/scim+json")
        .body(body.to_string())
        .send()
        .await
        .expect("SCIM request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// A PATCH body replacing `value`.
fn replace(value: Value) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "replace", "value": value}],
    })
}

async fn scim_token(env: &Env) -> String {
    let token = server::generate_token(*b"safety-test-token-0123456789abcd");
    env.store
        .create_token(&WriteCtx::cli(), "safety", server::hash_token(&token), None)
        .await
        .expect("token");
    token
}

async fn ready(http: &reqwest::Client, port: u16) -> (u16, Value) {
    let r = http
        .get(format!("http://127.0.0.1:{port}/healthz/ready"))
        .send()
        .await
        .expect("ready");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Polls `f` until it returns true, at most `secs` seconds.
async fn eventually(secs: u64, what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops `serve` the way an orchestrator does (SIGTERM), and waits for it.
fn stop(mut child: KillOnDrop) {
    signal(child.0.id(), "TERM");
    let _ = child.0.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_with_a_policy_that_does_not_match_teamcity_applies_nothing_and_says_why() {
    let typo = POLICY.replace("PROJECT_DEVELOPER@p:Backend", "PROJECT_ADMINN@p:Frontendd");
    let env = Env::new(&typo, Duration::ZERO).await;

    // `config check` reaches TeamCity and says what is wrong.
    let o = env.run(&["config", "check"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("PROJECT_ADMINN"), "{out}");
    assert!(out.contains("Frontendd"), "{out}");

    let ann = env.user("ann").await;
    env.group("Developers", "00g-dev", &[&ann]).await;
    let port = free_port();
    let http = reqwest::Client::new();
    let child = KillOnDrop(serve(&env, port));
    wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;
    eventually(10, "readiness names the policy problem", async || {
        let (status, body) = ready(&http, port).await;
        status == 503
            && body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("PROJECT_ADMINN"))
    })
    .await;
    // Nothing was written, and the work waits: pending, never dead.
    let writes: u64 = env
        .emu
        .counters()
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(_, v)| *v)
        .sum();
    assert_eq!(writes, 0, "{:?}", env.emu.counters());
    eventually(10, "the rows wait with the reason", async || {
        let rows = env.store.list_outbox(None, 100).await.expect("outbox");
        rows.len() == 2
            && rows.iter().all(|r| {
                r.lease_until.is_none()
                    && r.last_error
                        .as_deref()
                        .is_some_and(|e| e.contains("policy"))
            })
    })
    .await;
    let rows = env.store.list_outbox(None, 100).await.expect("outbox");
    assert!(
        rows.iter().all(|r| r.item.state == OutboxState::Pending),
        "never dead: {rows:?}"
    );
    assert!(
        rows.iter().all(|r| r.item.attempts == 0),
        "not counted as attempts: {rows:?}"
    );
    stop(child);

    // Fixed policy: ready, and the work lands.
    std::fs::write(&env.config, POLICY).expect("config");
    let o = env.run(&["config", "check"]).await;
    assert_eq!(o.status.code(), Some(0), "{:?}", text(&o));
    let child = KillOnDrop(serve(&env, port));
    wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;
    eventually(10, "ready", async || ready(&http, port).await.0 == 200).await;
    eventually(10, "ann created", async || {
        env.emu
            .snapshot()
            .users
            .values()
            .any(|u| u.username == "ann@example.com")
    })
    .await;
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_teamcity_restored_under_a_running_serve_never_gets_a_write_meant_for_someone_else() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let token = scim_token(&env).await;
    // The backup: TeamCity before carol existed.
    let backup = env.emu.snapshot();
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/scim/v2");
    let http = reqwest::Client::new();
    let child = KillOnDrop(serve(&env, port));
    wait_up(&http, &base).await;
    let (status, carol) = scim(
        &http,
        reqwest::Method::POST,
        format!("{base}/Users"),
        &token,
        json!({"schemas": [USER_SCHEMA], "userName": "carol@example.com", "displayName": "Carol", "active": true}),
    )
    .await;
    assert_eq!(status, 201);
    let carol_id = carol["id"].as_str().expect("id").to_owned();
    let tc_id = |name: &str| {
        env.emu
            .snapshot()
            .users
            .values()
            .find(|u| u.username == name)
            .map(|u| u.id)
    };
    eventually(10, "carol created", async || {
        tc_id("carol@example.com").is_some()
    })
    .await;
    let carol_tc = tc_id("carol@example.com").expect("carol");

    // TeamCity is restored from the backup, and alice is then created by hand: she gets
    // carol's old id.
    env.emu.restore(backup).expect("restore");
    let client = teamcity::Client::new(teamcity::ClientConfig::new(
        env.tc_url.clone(),
        teamcity::Token::new(TC_TOKEN),
    ))
    .expect("client");
    let alice = client
        .create_user(&teamcity::NewUser {
            username: "alice".into(),
            name: Some("Alice".into()),
            email: None,
            properties: vec![],
            groups: vec![],
        })
        .await
        .expect("alice");
    assert_eq!(alice.id, Some(carol_tc), "alice has carol's old id");
    let alice_before = env.emu.snapshot().users[&carol_tc].clone();

    // The IdP renames carol: the running serve still believes carol is that id.
    let (status, _) = scim(
        &http,
        reqwest::Method::PATCH,
        format!("{base}/Users/{carol_id}"),
        &token,
        replace(json!({"userName": "carol.new@example.com", "displayName": "Carol New"})),
    )
    .await;
    assert_eq!(status, 200);
    eventually(15, "carol re-created under her new name", async || {
        tc_id("carol.new@example.com").is_some()
    })
    .await;
    let s = env.emu.snapshot();
    assert_eq!(s.users[&carol_tc], alice_before, "alice was not touched");
    let carol_now = s
        .users
        .values()
        .find(|u| u.username == "carol.new@example.com")
        .expect("carol");
    assert_ne!(carol_now.id, carol_tc);
    assert_eq!(
        carol_now.properties.get("teamcity-scim.id"),
        Some(&carol_id)
    );
    // The link is written with the create's audit event, just after TeamCity answered.
    let new_id = carol_now.id.to_string();
    eventually(10, "the link follows carol", async || {
        env.store
            .mapping(scim::ResourceKind::User, &carol_id)
            .await
            .expect("mapping")
            .is_some_and(|l| l.teamcity_id == new_id)
    })
    .await;
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconcile_from_the_cli_leaves_no_running_serve_with_a_stale_view() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let token = scim_token(&env).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/scim/v2");
    let http = reqwest::Client::new();
    let child = KillOnDrop(serve(&env, port));
    wait_up(&http, &base).await;
    let (status, dan) = scim(
        &http,
        reqwest::Method::POST,
        format!("{base}/Users"),
        &token,
        json!({"schemas": [USER_SCHEMA], "userName": "dan@example.com", "active": true}),
    )
    .await;
    assert_eq!(status, 201);
    let dan_id = dan["id"].as_str().expect("id").to_owned();
    let find = |name: &str| {
        env.emu
            .snapshot()
            .users
            .values()
            .find(|u| u.username == name)
            .cloned()
    };
    eventually(10, "dan created", async || {
        find("dan@example.com").is_some()
    })
    .await;
    let old = find("dan@example.com").expect("dan");

    // Someone deletes dan by hand; the CLI's reconcile re-creates him (a new id).
    env.emu.with_state(|s| {
        s.users.remove(&old.id);
    });
    let o = env.run(&["reconcile", "--apply"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let new = find("dan@example.com").expect("re-created");
    assert_ne!(new.id, old.id);
    let failures_before = env
        .store
        .audit_events(0, 1_000_000)
        .await
        .expect("audit")
        .iter()
        .filter(|e| e.outcome == "failure")
        .count();

    // A change for dan through the running serve lands on the new dan at once: serve noticed
    // the CLI's writes and read TeamCity again, instead of trying the old id first.
    let (status, _) = scim(
        &http,
        reqwest::Method::PATCH,
        format!("{base}/Users/{dan_id}"),
        &token,
        replace(json!({"displayName": "Dan Renamed"})),
    )
    .await;
    assert_eq!(status, 200);
    eventually(10, "dan renamed", async || {
        find("dan@example.com").and_then(|u| u.name) == Some("Dan Renamed".into())
    })
    .await;
    let failures: Vec<store::AuditEvent> = env
        .store
        .audit_events(0, 1_000_000)
        .await
        .expect("audit")
        .into_iter()
        .filter(|e| e.outcome == "failure")
        .collect();
    assert_eq!(
        failures.len(),
        failures_before,
        "no write went to the old id: {:?}",
        &failures[failures_before..]
    );
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_on_an_empty_database_says_so_naming_the_file_and_removes_nothing() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let ann = env.user("ann").await;
    env.group("Developers", "00g-dev", &[&ann]).await;
    let o = env.run(&["reconcile", "--apply"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let before = env.emu.snapshot();

    // `serve` started with a relative database path that holds nothing (another working
    // directory, a lost volume).
    let port = free_port();
    let mut child = KillOnDrop(
        env.cmd(&["serve"])
            .env("TEAMCITY_SCIM_SERVER__LISTEN", format!("127.0.0.1:{port}"))
            .env("TEAMCITY_SCIM_DATABASE__URL", "sqlite://elsewhere.db")
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("serve"),
    );
    let stderr = child.0.stderr.take().expect("stderr");
    let expected = std::path::absolute(env.dir.path().join("elsewhere.db"))
        .expect("absolute")
        .display()
        .to_string();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("knows none of"))
    });
    let line = tokio::time::timeout(Duration::from_secs(15), line)
        .await
        .expect("the line within 15 s")
        .expect("join")
        .expect("serve said it");
    assert!(
        line.contains(&expected),
        "names the resolved path {expected}: {line}"
    );
    assert!(line.contains("teamcity-scim approve"), "{line}");
    // Give the first reconcile time to finish, then check nothing was taken away.
    let other = store::open(
        &format!("sqlite://{expected}"),
        std::sync::Arc::new(store::SystemClock),
    )
    .await
    .expect("the other database");
    eventually(10, "the orphan removals are held", async || {
        !other
            .list_held(Some(HeldState::Held))
            .await
            .expect("held")
            .is_empty()
    })
    .await;
    let after = env.emu.snapshot();
    for (id, u) in &before.users {
        let a = &after.users[id];
        assert_eq!(
            (&a.groups, &a.roles, a.password_changes, &a.properties),
            (&u.groups, &u.roles, u.password_changes, &u.properties),
            "{} untouched",
            u.username
        );
    }
    assert_eq!(after.groups, before.groups);
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_teamcity_down_and_back() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let port = free_port();
    let http = reqwest::Client::new();
    let child = KillOnDrop(serve(&env, port));
    wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;
    eventually(15, "ready", async || ready(&http, port).await.0 == 200).await;

    // TeamCity goes away (every connection dropped): readiness says so, with the reason.
    env.emu.inject_fault(teamcity_emulator::Fault::always(
        teamcity_emulator::FaultAction::Drop,
    ));
    eventually(20, "not ready, TeamCity unreachable", async || {
        let (status, body) = ready(&http, port).await;
        status == 503
            && body["reason"]
                .as_str()
                .is_some_and(|r| r.contains("TeamCity is unreachable"))
    })
    .await;
    // The liveness probe is not affected.
    let live = http
        .get(format!("http://127.0.0.1:{port}/healthz/live"))
        .send()
        .await
        .expect("live");
    assert_eq!(live.status(), 200);

    env.emu.clear_faults();
    eventually(20, "ready again", async || {
        ready(&http, port).await.0 == 200
    })
    .await;
    stop(child);
}

/// Metric names a Prometheus expression text refers to (ours start with `teamcity_scim_` or
/// `scim_`), without the `_count` / `_sum` / `_bucket` series suffixes.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let word_start = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &text[i..];
        if word_start && (rest.starts_with("teamcity_scim_") || rest.starts_with("scim_")) {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..end];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_metric_the_alerts_and_the_dashboard_use_is_exported() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/monitoring");
    let rules = std::fs::read_to_string(root.join("alerts.yml")).expect("alerts.yml");
    let dashboard =
        std::fs::read_to_string(root.join("grafana-dashboard.json")).expect("dashboard");
    let mut wanted = metric_names(&rules);
    wanted.extend(metric_names(&dashboard));
    assert!(wanted.len() >= 10, "{wanted:?}");

    let env = Env::new(POLICY, Duration::ZERO).await;
    // A sink, so its lag gauges are exported too; pull mode from a Graph fake, so the source's
    // metrics are too (the rest are the same in both modes).
    let graph = idp_fake::graph::GraphFake::start().await;
    graph.add_user(idp_fake::graph::FakeUser::new("u-1", "frank"));
    graph.add_group("00g-dev", "Developers");
    graph.add_member("00g-dev", "u-1");
    // The first request is throttled, so the throttling counter exists.
    graph.throttle(1, 1);
    let secret = env.dir.path().join("graph-secret");
    std::fs::write(&secret, graph.client_secret()).expect("secret");
    let sink = env.dir.path().join("audit.jsonl");
    std::fs::write(
        &env.config,
        format!(
            "[source]\nkind = \"graph\"\ninterval = \"1s\"\ngroups = [\"00g-dev\"]\n\
             tenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = {secret:?}\n\
             graph_url = \"{}\"\nauthority_url = \"{}\"\n\
             [[audit.sinks]]\nkind = \"file\"\npath = {sink:?}\n{POLICY}",
            graph.tenant_id(),
            graph.client_id(),
            graph.url(),
            graph.url()
        ),
    )
    .expect("config");
    let token = scim_token(&env).await;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/scim/v2");
    let http = reqwest::Client::builder()
        .user_agent("Okta SCIM Client 1.0.0")
        .build()
        .expect("client");
    let child = KillOnDrop(serve(&env, port));
    wait_up(&http, &base).await;
    let (status, _) = scim(
        &http,
        reqwest::Method::POST,
        format!("{base}/Users"),
        &token,
        json!({"schemas": [USER_SCHEMA], "userName": "erin@example.com", "active": true}),
    )
    .await;
    assert_eq!(status, 405, "pull mode refuses SCIM writes");
    let scrape = async || {
        http.get(format!("http://127.0.0.1:{port}/metrics"))
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    };
    let mut missing = wanted.clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut text = String::new();
    while !missing.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        text = scrape().await;
        let exported = metric_names(
            &text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .collect::<Vec<_>>()
                .join("\n"),
        );
        missing.retain(|m| !exported.contains(m));
    }
    assert!(missing.is_empty(), "not exported: {missing:?}\n{text}");
    // The client family label comes from the User-Agent.
    assert!(
        text.lines()
            .any(|l| l.starts_with("scim_requests_total{") && l.contains("client=\"okta\"")),
        "{text}"
    );
    stop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_serve_on_the_same_sqlite_database_refuses_to_start_and_says_why() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let http = reqwest::Client::new();
    let port = free_port();
    let first = KillOnDrop(serve(&env, port));
    wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;

    // A rolling deploy on a shared volume: the second process stops at once, with the reason.
    let second = env
        .cmd(&["serve"])
        .env(
            "TEAMCITY_SCIM_SERVER__LISTEN",
            format!("127.0.0.1:{}", free_port()),
        )
        .output()
        .expect("second serve");
    let (_, stderr) = text(&second);
    assert!(!second.status.success(), "the second serve must not run");
    assert!(
        stderr.contains("another `teamcity-scim serve` is already using the SQLite database")
            && stderr.contains("cli.db"),
        "{stderr}"
    );
    // The operator's commands keep working beside the running serve.
    let out = env.run(&["token", "create", "--name", "beside"]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let out = env.run(&["outbox", "list"]).await;
    assert!(out.status.success(), "{:?}", text(&out));

    // Once the first is gone (killed, no clean shutdown), a new one starts.
    drop(first);
    let port = free_port();
    let _again = KillOnDrop(serve(&env, port));
    wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;
}
