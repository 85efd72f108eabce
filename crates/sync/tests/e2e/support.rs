//! The end-to-end harness: an emulated TeamCity, a SCIM server over a fresh SQLite file (real
//! HTTP on port 0), and the sync engine over both. Tests send SCIM requests, drain the outbox
//! and assert on the emulator's state and call counters.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};
use store::{DynStore, OutboxState, RetryPolicy};
use sync::{Engine, EngineConfig, GuardLimits, Policy};
use teamcity_emulator::{Emulator, EmulatorOptions, Fault, FaultAction, GroupRec, UserRec};
use tokio::sync::oneshot;

pub(crate) const TC_TOKEN: &str = "e2e-teamcity-token";
pub(crate) const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub(crate) const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub(crate) const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// The policy most tests use.
pub(crate) const POLICY: &str = r#"
[[groups]]
match = { externalId = "00g-dev" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]

[[groups]]
match = { externalId = "00g-ops" }
roles = ["PROJECT_ADMIN@p:Backend"]

[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]

[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT_VIEWER"]
"#;

/// Engine settings for deterministic tests: fast poll, tiny backoff, generous guard.
pub(crate) fn cfg() -> EngineConfig {
    EngineConfig {
        poll: Duration::from_millis(20),
        retry: RetryPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
            max_attempts: 100_000,
        },
        limits: GuardLimits {
            max_removals: Some(1_000),
            max_removals_percent: None,
        },
        ..EngineConfig::default()
    }
}

fn random_bytes() -> [u8; 32] {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    server::hash_token(&format!("{n}-{now}-{:?}", Instant::now()))
}

/// A response, fully read.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) body: Value,
    pub(crate) text: String,
}

impl Resp {
    #[track_caller]
    pub(crate) fn expect(self, status: u16) -> Self {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }
}

/// Emulator + SCIM server + store + engine.
pub(crate) struct World {
    pub(crate) emu: Emulator,
    pub(crate) tc_url: String,
    pub(crate) store: DynStore,
    pub(crate) engine: Engine,
    pub(crate) base: String,
    token: String,
    http: reqwest::Client,
    _shutdown: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl World {
    /// A world with [`POLICY`] and [`cfg`].
    pub(crate) async fn start() -> World {
        World::with(POLICY, cfg()).await
    }

    /// A world with this policy and engine settings. The emulator has projects Backend,
    /// Frontend, Mobile, the local `admin` (SYSTEM_ADMIN) and an unmanaged group `LOCAL`.
    pub(crate) async fn with(policy: &str, cfg: EngineConfig) -> World {
        teamcity::install_crypto_provider();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tc_url, emu) = teamcity_emulator::spawn(EmulatorOptions {
            token: TC_TOKEN.into(),
            projects: ["Backend", "Frontend", "Mobile"].map(String::from).to_vec(),
            groups: vec!["LOCAL".into()],
            ..EmulatorOptions::default()
        })
        .await
        .expect("spawn emulator");
        emu.with_state(|s| {
            if let Some(g) = s.groups.get_mut("LOCAL") {
                g.roles.insert(("PROJECT_ADMIN".into(), "p:Mobile".into()));
            }
            let admin = s.admin_id;
            if let Some(u) = s.users.get_mut(&admin) {
                u.groups.insert("LOCAL".into());
            }
        });
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/e2e.db", dir.path().display());
        let store = store::open(&url, Arc::new(store::SystemClock))
            .await
            .expect("open store");
        let token = server::generate_token(random_bytes());
        store
            .create_token(
                &store::WriteCtx::cli(),
                "e2e",
                server::hash_token(&token),
                None,
            )
            .await
            .expect("token");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let state = server::AppState::new(store.clone());
        tokio::spawn(async move {
            let _ = server::serve(listener, state, async move {
                let _ = rx.await;
            })
            .await;
        });
        let engine = Engine::new(
            store.clone(),
            client(&tc_url),
            Policy::from_toml(policy).expect("policy"),
            cfg,
        );
        World {
            emu,
            tc_url,
            store,
            engine,
            base: format!("http://{addr}/scim/v2"),
            token,
            http: reqwest::Client::new(),
            _shutdown: tx,
            _dir: dir,
        }
    }

    /// Another engine over the same store and TeamCity (another policy or settings).
    pub(crate) fn engine_with(&self, policy: &str, cfg: EngineConfig) -> Engine {
        Engine::new(
            self.store.clone(),
            client(&self.tc_url),
            Policy::from_toml(policy).expect("policy"),
            cfg,
        )
    }

    /// Sends a SCIM request.
    pub(crate) async fn scim(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Resp {
        let mut rb = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.token);
        if let Some(b) = body {
            rb = rb
                .header("Content-Type", "application/scim+json")
                .body(b.to_string());
        }
        let r = rb.send().await.expect("SCIM request");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        Resp {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
            text,
        }
    }

    /// POST /Users; returns the SCIM id.
    pub(crate) async fn create_user(&self, name: &str, user_type: Option<&str>) -> String {
        let mut body = json!({
            "schemas": [USER_SCHEMA],
            "userName": format!("{name}@example.com"),
            "name": {"givenName": name, "familyName": "Tester"},
            "emails": [{"value": format!("{name}@example.com"), "primary": true}],
            "active": true,
        });
        if let Some(t) = user_type {
            body["userType"] = json!(t);
        }
        let r = self
            .scim(reqwest::Method::POST, "/Users", Some(body))
            .await
            .expect(201);
        r.body["id"].as_str().expect("id").to_owned()
    }

    /// POST /Groups with members; returns the SCIM id.
    pub(crate) async fn create_group(
        &self,
        name: &str,
        external_id: Option<&str>,
        members: &[&str],
    ) -> String {
        let members: Vec<Value> = members.iter().map(|m| json!({"value": m})).collect();
        let mut body = json!({"schemas": [GROUP_SCHEMA], "displayName": name, "members": members});
        if let Some(e) = external_id {
            body["externalId"] = json!(e);
        }
        let r = self
            .scim(reqwest::Method::POST, "/Groups", Some(body))
            .await
            .expect(201);
        r.body["id"].as_str().expect("id").to_owned()
    }

    /// PATCH with these operations.
    pub(crate) async fn patch(&self, path: &str, ops: Value) {
        self.scim(
            reqwest::Method::PATCH,
            path,
            Some(json!({"schemas": [PATCH_OP], "Operations": ops})),
        )
        .await
        .expect(200);
    }

    /// PATCH active.
    pub(crate) async fn set_active(&self, user: &str, active: bool) {
        self.patch(
            &format!("/Users/{user}"),
            json!([{"op": "replace", "value": {"active": active}}]),
        )
        .await;
    }

    /// Okta-style group PATCH: a path-less replace of `{id, displayName}` first, then `ops`.
    pub(crate) async fn okta_patch_group(&self, id: &str, name: &str, ops: Vec<Value>) {
        let mut all = vec![json!({"op": "replace", "value": {"id": id, "displayName": name}})];
        all.extend(ops);
        self.patch(&format!("/Groups/{id}"), Value::Array(all))
            .await;
    }

    /// DELETE.
    pub(crate) async fn delete(&self, path: &str) {
        self.scim(reqwest::Method::DELETE, path, None)
            .await
            .expect(204);
    }

    /// Drains the outbox with the default engine.
    pub(crate) async fn drain(&self) -> sync::PassReport {
        self.engine.drain().await.expect("drain")
    }

    /// Drains until nothing is pending (retries included), at most `timeout`.
    pub(crate) async fn drain_until_idle(&self, engine: &Engine, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            engine.drain().await.expect("drain");
            if self.pending().await == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "outbox did not drain in {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pending outbox rows.
    pub(crate) async fn pending(&self) -> usize {
        self.store
            .list_outbox(Some(OutboxState::Pending), 1_000_000)
            .await
            .expect("outbox")
            .len()
    }

    /// Rows in a state.
    pub(crate) async fn rows(&self, state: OutboxState) -> Vec<store::OutboxEntry> {
        self.store
            .list_outbox(Some(state), 1_000_000)
            .await
            .expect("outbox")
    }

    /// The TeamCity user with this SCIM user name (`name@example.com`).
    pub(crate) fn tc_user(&self, name: &str) -> Option<UserRec> {
        let username = format!("{name}@example.com");
        self.emu
            .snapshot()
            .users
            .into_values()
            .find(|u| u.username == username)
    }

    /// The TeamCity group with this name.
    pub(crate) fn tc_group(&self, name: &str) -> Option<GroupRec> {
        self.emu
            .snapshot()
            .groups
            .into_values()
            .find(|g| g.name == name)
    }

    /// Writes (POST/PUT/DELETE) TeamCity received since the last counter reset.
    pub(crate) fn writes(&self) -> u64 {
        write_calls(&self.emu)
    }

    /// Every write answers with this fault until [`Emulator::clear_faults`].
    pub(crate) fn fail_writes(&self, action: FaultAction) {
        for m in ["POST", "PUT", "DELETE"] {
            self.emu.inject_fault(Fault {
                method: Some(m.into()),
                path_prefix: Some("/app/rest".into()),
                path_contains: None,
                times: u32::MAX,
                action: action.clone(),
            });
        }
    }

    /// Audit events with this operation.
    pub(crate) async fn audit_ops(&self, operation: &str) -> Vec<store::AuditEvent> {
        self.store
            .audit_events(0, 1_000_000)
            .await
            .expect("audit")
            .into_iter()
            .filter(|e| e.operation == operation)
            .collect()
    }
}

/// A TeamCity client for the emulator.
pub(crate) fn client(url: &str) -> teamcity::Client {
    let mut c = teamcity::ClientConfig::new(url.to_owned(), teamcity::Token::new(TC_TOKEN));
    c.request_timeout = Duration::from_secs(5);
    teamcity::Client::new(c).expect("client")
}

/// Non-GET calls counted by the emulator.
pub(crate) fn write_calls(emu: &Emulator) -> u64 {
    emu.counters()
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(_, v)| *v)
        .sum()
}

/// `(role, scope)` pairs from `ROLE@scope` texts.
pub(crate) fn roles(texts: &[&str]) -> std::collections::BTreeSet<(String, String)> {
    texts
        .iter()
        .map(|t| {
            let (r, s) = t.split_once('@').expect("ROLE@scope");
            (r.to_owned(), s.to_owned())
        })
        .collect()
}

/// Gives the TeamCity user `name@example.com` `n` access tokens (named `t0`, `t1`, …).
pub(crate) fn give_tokens(w: &World, name: &str, n: usize) {
    let id = w.tc_user(name).expect("user").id;
    w.emu.with_state(|s| {
        let u = s.users.get_mut(&id).expect("user");
        for i in 0..n {
            u.tokens.push(teamcity_emulator::TokenRec {
                name: format!("t{i}"),
                creation_time: "20260101T000000+0000".into(),
                expiration_time: None,
                value_sha256: None,
            });
        }
    });
}

/// A new, empty store (a fresh SQLite file); keep the directory alive as long as the store.
pub(crate) async fn fresh_store() -> (DynStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/fresh.db", dir.path().display());
    let store = store::open(&url, Arc::new(store::SystemClock))
        .await
        .expect("open store");
    (store, dir)
}

impl World {
    /// An engine over another store and this world's TeamCity.
    pub(crate) fn engine_over(&self, store: DynStore, policy: &str, cfg: EngineConfig) -> Engine {
        Engine::new(
            store,
            client(&self.tc_url),
            Policy::from_toml(policy).expect("policy"),
            cfg,
        )
    }
}

/// Every `method` request whose path contains `substring` answers `status` (no `Retry-After`),
/// until [`Emulator::clear_faults`].
pub(crate) fn fail_matching(w: &World, method: &str, substring: &str, status: u16) {
    w.emu.inject_fault(Fault {
        method: Some(method.to_owned()),
        path_prefix: Some("/app/rest".into()),
        path_contains: Some(substring.to_owned()),
        times: u32::MAX,
        action: FaultAction::Status {
            status,
            retry_after_secs: None,
        },
    });
}
