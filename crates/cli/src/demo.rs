//! `teamcity-scim demo`: an emulated TeamCity, the bridge on a temporary database with a demo
//! policy, and an Okta-style provisioning replayed over the SCIM API (`--source graph`: the same
//! story pulled from a Microsoft Graph fake) — then both keep running for `curl` until Ctrl-C.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use rand::RngCore;
use serde_json::{Value, json};
use store::{DynStore, OutboxState, SystemClock, WriteCtx};
use sync::{Engine, EngineConfig};
use teamcity_emulator::{EmulatorOptions, TokenRec};

const POLICY: &str = r#"
[[groups]]
name = "engineering"
match = { externalId = "00g-engineering" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]

[[groups]]
name = "operations"
match = { externalId = "00g-operations" }
roles = ["PROJECT_ADMIN@p:Backend"]

[[groups]]
name = "mobile"
match = { displayName = "Mobile" }
roles = ["PROJECT_DEVELOPER@p:Mobile"]

[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]

[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT_VIEWER"]
"#;

struct Scim {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl Scim {
    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .header("User-Agent", "Okta SCIM Client 1.0.0");
        if let Some(b) = body {
            req = req
                .header("Content-Type", "application/scim+json")
                .body(b.to_string());
        }
        let resp = req.send().await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{method} {path} answered {status}: {text}");
        }
        Ok(if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)?
        })
    }

    async fn create_user(
        &self,
        user: &str,
        given: &str,
        family: &str,
        user_type: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut body = json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
            "userName": format!("{user}@example.com"),
            "externalId": format!("00u-{user}"),
            "name": {"givenName": given, "familyName": family},
            "emails": [{"primary": true, "value": format!("{user}@example.com"), "type": "work"}],
            "displayName": format!("{given} {family}"),
            "locale": "en-US",
            "active": true,
            "password": "okta-sends-a-random-one",
            "groups": [],
        });
        if let Some(t) = user_type {
            body["userType"] = json!(t);
        }
        let r = self
            .send(reqwest::Method::POST, "/Users", Some(body))
            .await?;
        Ok(r["id"]
            .as_str()
            .context("no id in the SCIM response")?
            .to_owned())
    }

    async fn push_group(
        &self,
        name: &str,
        external_id: &str,
        members: &[&str],
    ) -> anyhow::Result<String> {
        let g = self
            .send(
                reqwest::Method::POST,
                "/Groups",
                Some(json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": name, "externalId": external_id, "members": []})),
            )
            .await?;
        let id = g["id"].as_str().context("no id")?.to_owned();
        let value: Vec<Value> = members.iter().map(|m| json!({"value": m})).collect();
        self.patch_group(
            &id,
            name,
            json!([{"op": "add", "path": "members", "value": value}]),
        )
        .await?;
        Ok(id)
    }

    /// Okta sends every membership change with a path-less replace of `{id, displayName}`.
    async fn patch_group(&self, id: &str, name: &str, mut ops: Value) -> anyhow::Result<()> {
        if let Some(list) = ops.as_array_mut() {
            list.insert(
                0,
                json!({"op": "replace", "value": {"id": id, "displayName": name}}),
            );
        }
        self.send(
            reqwest::Method::PATCH,
            &format!("/Groups/{id}"),
            Some(json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": ops})),
        )
        .await?;
        Ok(())
    }
}

async fn wait_synced(store: &DynStore) -> anyhow::Result<()> {
    for _ in 0..300 {
        if store
            .list_outbox(Some(OutboxState::Pending), 1)
            .await?
            .is_empty()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the sync worker did not drain the outbox within 30 s")
}

fn print_teamcity(emu: &teamcity_emulator::Emulator) {
    let s = emu.snapshot();
    println!("\nTeamCity now holds:");
    println!("  groups:");
    for g in s.groups.values() {
        let members = s
            .users
            .values()
            .filter(|u| u.groups.contains(&g.key))
            .count();
        let roles: Vec<String> = g.roles.iter().map(|(r, sc)| format!("{r}@{sc}")).collect();
        println!(
            "    {:<26} key {:<24} {members} members  roles: {}",
            g.name,
            g.key,
            roles.join(", ")
        );
    }
    println!("  users:");
    for u in s.users.values() {
        let managed = if u.properties.contains_key(sync::USER_MARKER) {
            "managed"
        } else {
            "local"
        };
        let deactivated = if u.properties.contains_key(sync::USER_DEACTIVATED) {
            ", deactivated"
        } else {
            ""
        };
        let groups: Vec<&str> = u
            .groups
            .iter()
            .map(|k| {
                s.groups
                    .get(k)
                    .map(|g| g.name.as_str())
                    .unwrap_or(k.as_str())
            })
            .collect();
        let roles: Vec<String> = u.roles.iter().map(|(r, sc)| format!("{r}@{sc}")).collect();
        println!(
            "    {:<22} ({managed}{deactivated}) groups: [{}] direct roles: [{}] tokens: {}",
            u.username,
            groups.join(", "),
            roles.join(", "),
            u.tokens.len()
        );
    }
}

/// Where the demo's directory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum DemoSource {
    /// An Okta-style provisioning pushed over SCIM.
    Scim,
    /// Pull mode: the directory read from a Microsoft Graph fake.
    Graph,
}

/// Runs the demo until Ctrl-C.
pub(crate) async fn run(source: DemoSource) -> anyhow::Result<()> {
    let emulator_token = "demo-teamcity-token";
    let (tc_url, emu) = teamcity_emulator::spawn(EmulatorOptions {
        token: emulator_token.into(),
        projects: ["Backend", "Frontend", "Mobile"].map(String::from).to_vec(),
        users: vec![],
        ..EmulatorOptions::default()
    })
    .await?;
    let dir = tempfile::tempdir()?;
    let db = format!("sqlite://{}/demo.db", dir.path().display());
    let store = store::open(&db, Arc::new(SystemClock)).await?;
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    let token = server::generate_token(random);
    store
        .create_token(&WriteCtx::cli(), "demo", server::hash_token(&token), None)
        .await?;

    let client = teamcity::Client::new(teamcity::ClientConfig::new(
        tc_url.clone(),
        teamcity::Token::new(emulator_token),
    ))?;
    let policy = sync::Policy::from_toml(POLICY)?;
    let engine = Arc::new(Engine::new(
        store.clone(),
        client.clone(),
        policy.clone(),
        EngineConfig {
            poll: Duration::from_millis(50),
            reconcile_interval: Duration::from_secs(600),
            ..EngineConfig::default()
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(engine.clone().run(stop_rx));

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let scim_url = format!("http://{}{}", listener.local_addr()?, server::BASE_PATH);
    let mut stop_server = stop_tx.subscribe();
    let mut app = server::AppState::new(store.clone());
    if source == DemoSource::Graph {
        app.read_only = Some(Arc::from(
            "the demo reads its directory from a Microsoft Graph fake: SCIM writes are refused",
        ));
    }
    let server_task = tokio::spawn(server::serve(listener, app, async move {
        let _ = stop_server.changed().await;
    }));

    // The read-only dashboard, behind its own admin token.
    rand::rng().fill_bytes(&mut random);
    let admin_token = server::generate_token(random);
    store
        .create_scoped_token(
            &WriteCtx::cli(),
            store::TokenScope::Admin,
            "demo-admin",
            server::hash_token(&admin_token),
            None,
        )
        .await?;
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let dashboard_url = format!("http://{}/", admin_listener.local_addr()?);
    let health = engine.health();
    let admin_state = server::admin::AdminState {
        store: store.clone(),
        tokens: server::auth::TokenCache::for_scope(store.clone(), store::TokenScope::Admin),
        source: Arc::new({
            let d = crate::dashboard::Dashboard::new(
                store.clone(),
                policy,
                tc_url.clone(),
                Some(engine.clone()),
                Some(client),
            );
            if source == DemoSource::Graph {
                d.with_source("graph", "5s")
            } else {
                d
            }
        }),
        readiness: Some(server::Readiness(Arc::new(move || health.not_ready()))),
        secure_cookie: false,
    };
    let mut stop_admin = stop_tx.subscribe();
    let admin_task = tokio::spawn(server::serve_admin(
        admin_listener,
        admin_state,
        server::ServeOptions::default(),
        async move {
            let _ = stop_admin.changed().await;
        },
    ));

    let (summary, puller) = match source {
        DemoSource::Scim => (scim_scenario(&store, &emu, &scim_url, &token).await?, None),
        DemoSource::Graph => {
            let (summary, puller) = graph_scenario(&store, &emu, dir.path(), &stop_tx).await?;
            (summary, Some(puller))
        }
    };
    println!("{summary}");
    print_teamcity(&emu);
    let audit = store.audit_events(0, 100_000).await?.len();
    println!("\nAudit trail: {audit} hash-chained events (SCIM writes and every TeamCity action).");
    println!("\nBoth keep running. Try:");
    println!(
        "  SCIM:      curl -H 'Authorization: Bearer {token}' '{scim_url}/Users?filter=userName%20sw%20%22a%22'"
    );
    println!(
        "  TeamCity:  curl -H 'Authorization: Bearer {emulator_token}' -H 'Accept: application/json' {tc_url}/app/rest/userGroups"
    );
    println!("  Dashboard: {dashboard_url} (sign in with the admin token {admin_token})");
    println!(
        "  Audit:     TEAMCITY_SCIM_DATABASE__URL={db} teamcity-scim audit evidence --from 2020-01-01T00:00:00Z --output demo-evidence"
    );
    println!("Press Ctrl-C to stop.");
    crate::shutdown_signal().await;
    let _ = stop_tx.send(true);
    let _ = worker.await;
    if let Some(p) = puller {
        let _ = p.await;
    }
    let _ = server_task.await;
    let _ = admin_task.await;
    drop(dir);
    println!("Demo stopped.");
    Ok(())
}

/// The SCIM demo: an Okta-style provisioning replayed over the SCIM API.
async fn scim_scenario(
    store: &DynStore,
    emu: &teamcity_emulator::Emulator,
    scim_url: &str,
    token: &str,
) -> anyhow::Result<String> {
    let scim = Scim {
        http: reqwest::Client::new(),
        base: scim_url.to_owned(),
        token: token.to_owned(),
    };
    let steps = 8u64;
    let pb = indicatif::ProgressBar::new(steps);
    pb.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let say = |pb: &indicatif::ProgressBar, msg: &str| {
        pb.inc(1);
        if pb.is_hidden() {
            println!("[{}/{steps}] {msg}", pb.position());
        } else {
            pb.set_message(msg.to_owned());
        }
    };

    say(
        &pb,
        "Okta assigns 5 users (POST /Users, one of them an AI agent)",
    );
    let alice = scim.create_user("alice", "Alice", "Archer", None).await?;
    let bob = scim.create_user("bob", "Bob", "Baker", None).await?;
    let carol = scim.create_user("carol", "Carol", "Chen", None).await?;
    let dave = scim.create_user("dave", "Dave", "Diaz", None).await?;
    let bot = scim
        .create_user("build-bot", "Build", "Bot", Some("Agent"))
        .await?;

    say(
        &pb,
        "Okta pushes groups Engineering, Operations and Mobile with members",
    );
    let eng = scim
        .push_group("Engineering", "00g-engineering", &[&alice, &bob, &bot])
        .await?;
    scim.push_group("Operations", "00g-operations", &[&carol])
        .await?;
    let mobile = scim
        .push_group("Mobile", "00g-mobile", &[&dave, &alice])
        .await?;
    wait_synced(store).await?;

    say(
        &pb,
        "Okta re-sends an unchanged group push (costs TeamCity nothing)",
    );
    let before = emu.total_calls();
    scim.patch_group(&eng, "Engineering", json!([])).await?;
    wait_synced(store).await?;
    let noop_calls = emu.total_calls() - before;

    say(&pb, "Bob creates two TeamCity access tokens");
    give_tokens(emu, "bob@example.com");

    say(
        &pb,
        "Okta deactivates Bob (PATCH active=false): groups, roles and tokens go",
    );
    scim.send(
        reqwest::Method::PATCH,
        &format!("/Users/{bob}"),
        Some(json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "replace", "value": {"active": false}}]})),
    )
    .await?;

    say(
        &pb,
        "Engineering is renamed Platform Engineering (a two-call swap in TeamCity)",
    );
    scim.patch_group(&eng, "Platform Engineering", json!([]))
        .await?;

    say(
        &pb,
        "Mobile (a rule matched by name) is renamed: an alert, nobody loses access",
    );
    scim.patch_group(&mobile, "Mobile Apps", json!([])).await?;

    say(&pb, "waiting for the sync worker");
    wait_synced(store).await?;
    pb.finish_and_clear();

    Ok(format!(
        "Replayed an Okta-style provisioning over SCIM: 5 users, 3 groups, a no-op push ({noop_calls} TeamCity calls), a deactivation, two renames."
    ))
}

/// Two TeamCity access tokens for `username`, made by hand in TeamCity.
fn give_tokens(emu: &teamcity_emulator::Emulator, username: &str) {
    emu.with_state(|s| {
        if let Some(u) = s.users.values_mut().find(|u| u.username == username) {
            for name in ["ci-script", "laptop"] {
                u.tokens.push(TokenRec {
                    name: name.into(),
                    creation_time: "20261129T100000+0000".into(),
                    expiration_time: None,
                    value_sha256: None,
                });
            }
        }
    });
}

/// The pull-mode demo: the directory read from a Microsoft Graph fake.
async fn graph_scenario(
    store: &DynStore,
    emu: &teamcity_emulator::Emulator,
    dir: &std::path::Path,
    stop_tx: &tokio::sync::watch::Sender<bool>,
) -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    use idp_fake::graph::{FakeUser, GraphFake};
    use source::graph::{GraphCredential, GraphOptions, GraphSource};

    let fake = Arc::new(GraphFake::start().await);
    // Entra users are name@contoso.example in the fake.
    for name in ["alice", "bob", "carol", "dave", "build-bot"] {
        fake.add_user(FakeUser::new(&format!("00u-{name}"), name));
    }
    for (id, name, members) in [
        (
            "00g-engineering",
            "Engineering",
            &["alice", "bob", "build-bot"][..],
        ),
        ("00g-operations", "Operations", &["carol"][..]),
        ("00g-mobile", "Mobile", &["dave", "alice"][..]),
    ] {
        fake.add_group(id, name);
        for m in members {
            fake.add_member(id, &format!("00u-{m}"));
        }
    }
    let secret = dir.join("graph-client-secret");
    std::fs::write(&secret, fake.client_secret())?;
    let scope: Vec<String> = ["00g-engineering", "00g-operations", "00g-mobile"]
        .map(String::from)
        .to_vec();
    let src: Arc<dyn source::Source> = Arc::new(GraphSource::new(GraphOptions {
        tenant_id: fake.tenant_id().into(),
        client_id: fake.client_id().into(),
        credential: GraphCredential::Secret(source::SecretFile::new(&secret)),
        graph_url: fake.url(),
        authority_url: fake.url(),
        groups: scope.clone(),
        user_name_attribute: "userPrincipalName".into(),
    }));
    let pull = async || -> anyhow::Result<()> {
        source::pull::pull_once(store, src.as_ref(), &scope, &SystemClock)
            .await
            .map_err(|e| anyhow::anyhow!("pull from the Graph fake: {e}"))?;
        wait_synced(store).await
    };
    let step = |n: u32, msg: &str| println!("[{n}/5] {msg}");

    step(
        1,
        "first sync: the members of Engineering, Operations and Mobile are read from Graph (users/delta, groups/delta)",
    );
    pull().await?;
    step(
        2,
        "a pull with nothing new (the delta link answers no change) costs TeamCity nothing",
    );
    let before = emu.total_calls();
    pull().await?;
    let noop_calls = emu.total_calls() - before;
    give_tokens(emu, "bob@contoso.example");
    step(
        3,
        "Bob is disabled in Entra ID (accountEnabled = false): groups, roles and tokens go",
    );
    fake.update_user("00u-bob", |u| u.enabled = false);
    pull().await?;
    step(
        4,
        "Engineering is renamed Platform Engineering in Entra ID (a two-call swap in TeamCity)",
    );
    fake.rename_group("00g-engineering", "Platform Engineering");
    pull().await?;
    step(
        5,
        "Mobile is renamed Mobile Apps (a rule matched by name): an alert, nobody loses access",
    );
    fake.rename_group("00g-mobile", "Mobile Apps");
    pull().await?;

    // From here on the bridge pulls every 5 s, as `serve` does in pull mode.
    let mut stop = stop_tx.subscribe();
    let fake_alive = fake.clone();
    let store_bg = store.clone();
    let requests = fake.requests();
    let puller = tokio::spawn(async move {
        source::pull::run(
            store_bg,
            src,
            scope,
            Duration::from_secs(5),
            Arc::new(SystemClock),
            source::pull::PullHealth::default(),
            async move {
                let _ = stop.changed().await;
            },
        )
        .await;
        drop(fake_alive);
    });
    Ok((
        format!(
            "Pulled the directory from a Microsoft Graph fake at {} ({requests} Graph requests): 5 users, 3 groups, a pull with no change ({noop_calls} TeamCity calls), a deactivation, two renames.",
            fake.url()
        ),
        puller,
    ))
}
