//! `sync-bench`: measures the sync engine against its targets, in one process, over real HTTP,
//! against the TeamCity emulator.
//!
//! * `calls`: an Okta-style replay over the SCIM API (users created, groups pushed as a POST and
//!   PATCHes adding members — each PATCH carrying Okta's path-less replace of the unchanged
//!   `{id, displayName}` — unchanged re-pushes, deactivations, a rename). The outbox is drained
//!   after *every* SCIM write, so nothing coalesces (the worst case for calls). Target: TeamCity
//!   calls / effective changes ≤ 1.05, where an effective change is one fact of TeamCity state a
//!   SCIM write changes, counted by this program from the replay itself (not from the plan): a
//!   user created, a group created, a membership added or removed, a token deleted, a password
//!   randomised, the deactivated marker set, a group renamed. The plan-minimal call count (a
//!   deactivation also lists the user's tokens; a rename is a create + delete swap) is shown
//!   next to it.
//! * `reconcile`: a reconcile with no drift over 20,000 users and 2,000 groups (60,000
//!   memberships, plus the defaults group), the emulator answering after 5 ms. Targets: reads =
//!   pages (user pages + the one group list), 0 writes, < 10 s.
//! * `initial-load`: 10,000 users, 1,000 groups and 50,000 memberships stored, TeamCity empty,
//!   one reconcile; the emulator answering after 5 ms, the client at concurrency 8. Target: wall
//!   time ≤ 1.2 × calls × latency / concurrency.
//! * `all`: the three in turn.
//!
//! Seeding (store and TeamCity) is not measured. Without `--check` the exit status is 0 whatever
//! the figures; with it, a missed target exits 1.

#![allow(
    unreachable_pub,
    reason = "a binary crate has no public API; `pub` marks module interfaces"
)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand};
use rand::RngCore;
use scim::ResourceKind;
use serde_json::{Value, json};
use sqlx::Connection as _;
use store::{DynStore, NewMember, SystemClock, WriteCtx};
use sync::{Engine, EngineConfig, PassReport, Policy};

/// The allocator the `teamcity-scim` binary ships with, so the engine is measured as it runs.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use teamcity_emulator::{Emulator, EmulatorOptions, TokenRec};

const TC_TOKEN: &str = "sync-bench-token";

/// Rules for the first three pushed groups (by externalId) and default roles: every active user
/// is also in the defaults group.
const POLICY: &str = r#"
[[groups]]
match = { externalId = "00g-0000" }
roles = ["PROJECT_DEVELOPER@p:Backend"]

[[groups]]
match = { externalId = "00g-0001" }
roles = ["PROJECT_ADMIN@p:Backend"]

[[groups]]
match = { externalId = "00g-0002" }
roles = ["PROJECT_VIEWER@p:Frontend"]

[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

#[derive(Debug, Parser)]
#[command(
    name = "sync-bench",
    about = "Benchmarks the sync engine against its targets (TeamCity emulator, in process)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Exit with status 1 when a target is missed.
    #[arg(long, global = true)]
    check: bool,
    /// Latency the emulator adds to every TeamCity call (reconcile, initial-load), ms.
    #[arg(long, global = true, default_value_t = 5)]
    latency_ms: u64,
    /// TeamCity client concurrency.
    #[arg(long, global = true, default_value_t = 8)]
    concurrency: usize,
    /// Worker threads of this process's runtime (engine, emulator, SCIM server and store).
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
    /// `calls`: users in the replay.
    #[arg(long, global = true, default_value_t = 200)]
    replay_users: usize,
    /// `calls`: groups in the replay.
    #[arg(long, global = true, default_value_t = 12)]
    replay_groups: usize,
    /// `reconcile`: users.
    #[arg(long, global = true, default_value_t = 20_000)]
    reconcile_users: usize,
    /// `reconcile`: groups (each user is in 3).
    #[arg(long, global = true, default_value_t = 2_000)]
    reconcile_groups: usize,
    /// `initial-load`: users.
    #[arg(long, global = true, default_value_t = 10_000)]
    load_users: usize,
    /// `initial-load`: groups.
    #[arg(long, global = true, default_value_t = 1_000)]
    load_groups: usize,
    /// `initial-load`: memberships (spread evenly over the users).
    #[arg(long, global = true, default_value_t = 50_000)]
    load_memberships: usize,
    /// `one-change`: directory sizes (users; groups are a tenth), comma-separated.
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "1000,10000,100000"
    )]
    sizes: Vec<usize>,
    /// `one-change`: single changes timed per size (half add-a-member, half deactivations).
    #[arg(long, global = true, default_value_t = 40)]
    changes: usize,
    /// `push-during-load`: users of the first load (groups are a tenth, 5 per user).
    #[arg(long, global = true, default_value_t = 100_000)]
    push_load_users: usize,
    /// `push-during-load`: seconds into the load when the probe push is made.
    #[arg(long, global = true, default_value_t = 3)]
    push_after_s: u64,
    /// A PostgreSQL server (`postgres://user@host:port`): each benchmark's store is a new
    /// database there, dropped at the end. Default: a SQLite file in a temporary directory.
    #[arg(long, global = true)]
    pg: Option<String>,
}

#[derive(Debug, Subcommand, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// The benchmarks A to D.
    All,
    /// (A) TeamCity calls per effective SCIM change, Okta-style replay.
    Calls,
    /// (B) no-drift reconcile, 20,000 users and 2,000 groups.
    Reconcile,
    /// (C) initial load, 10,000 users, 1,000 groups, 50,000 memberships.
    InitialLoad,
    /// (D) pull mode: the same directory read from the Microsoft Graph fake (first sync, then
    /// one change), into TeamCity.
    Pull,
    /// (E) one SCIM change (add a member, deactivate a user) with N users stored and in sync,
    /// from the store write to the emulator's state, for each of `--sizes`. Not part of `all`.
    OneChange,
    /// (F) a push made during a first load (`--push-load-users` pushed as fast as the store
    /// takes them): how long until it reaches TeamCity. Not part of `all`.
    PushDuringLoad,
}

/// One line of the report.
#[derive(Debug)]
struct Row {
    name: String,
    measured: String,
    goal: String,
    /// `None` for informational lines.
    pass: Option<bool>,
}

#[derive(Debug, Default)]
struct Report {
    rows: Vec<Row>,
}

impl Report {
    fn target(&mut self, name: &str, measured: String, goal: &str, pass: bool) {
        self.rows.push(Row {
            name: name.into(),
            measured,
            goal: goal.into(),
            pass: Some(pass),
        });
    }

    fn info(&mut self, name: &str, measured: String) {
        self.rows.push(Row {
            name: name.into(),
            measured,
            goal: String::new(),
            pass: None,
        });
    }

    fn print(&self) {
        let w = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(10);
        let mw = self
            .rows
            .iter()
            .map(|r| r.measured.len())
            .max()
            .unwrap_or(10);
        println!();
        println!(
            "{:<w$}  {:<mw$}  {:<26}  result",
            "benchmark", "measured", "target"
        );
        println!("{}", "-".repeat(w + mw + 40));
        for r in &self.rows {
            let verdict = match r.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "",
            };
            println!(
                "{:<w$}  {:<mw$}  {:<26}  {verdict}",
                r.name, r.measured, r.goal
            );
        }
    }

    fn all_pass(&self) -> bool {
        self.rows.iter().all(|r| r.pass != Some(false))
    }
}

// ---- wiring ------------------------------------------------------------------------------

async fn emulator(latency: Duration) -> anyhow::Result<(String, Emulator)> {
    Ok(teamcity_emulator::spawn(EmulatorOptions {
        token: TC_TOKEN.into(),
        projects: ["Backend", "Frontend", "Mobile"].map(String::from).to_vec(),
        latency,
        ..EmulatorOptions::default()
    })
    .await?)
}

fn tc_client(url: &str, concurrency: usize) -> anyhow::Result<teamcity::Client> {
    let mut cfg = teamcity::ClientConfig::new(url, teamcity::Token::new(TC_TOKEN));
    cfg.max_concurrency = concurrency;
    cfg.request_timeout = Duration::from_secs(120);
    Ok(teamcity::Client::new(cfg)?)
}

async fn open_store(dir: &tempfile::TempDir, cli: &Cli) -> anyhow::Result<DynStore> {
    static DATABASES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let url = match &cli.pg {
        None => format!("sqlite://{}", dir.path().join("sync-bench.db").display()),
        Some(server) => {
            let n = DATABASES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("{}{n}", pg_prefix());
            let mut admin =
                sqlx::postgres::PgConnection::connect(&format!("{server}/postgres")).await?;
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut admin)
                .await?;
            format!("{server}/{name}")
        }
    };
    Ok(store::open(&url, Arc::new(SystemClock)).await?)
}

/// The names of the databases this process creates with `--pg`.
fn pg_prefix() -> String {
    format!("sync_bench_{}_", std::process::id())
}

/// Drops the databases this process created with `--pg` (their pools may still be open).
async fn drop_databases(server: &str) -> anyhow::Result<()> {
    let mut admin = sqlx::postgres::PgConnection::connect(&format!("{server}/postgres")).await?;
    let names: Vec<(String,)> =
        sqlx::query_as("SELECT datname FROM pg_database WHERE starts_with(datname, $1)")
            .bind(pg_prefix())
            .fetch_all(&mut admin)
            .await?;
    for (name,) in names {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
        )))
        .execute(&mut admin)
        .await?;
    }
    Ok(())
}

fn engine(store: &DynStore, client: teamcity::Client) -> anyhow::Result<Engine> {
    Ok(Engine::new(
        store.clone(),
        client,
        Policy::from_toml(POLICY)?,
        EngineConfig {
            poll: Duration::from_millis(20),
            ..EngineConfig::default()
        },
    ))
}

fn user_body(i: usize) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": format!("user{i:05}@example.com"),
        "externalId": format!("00u-{i:05}"),
        "name": {"givenName": "User", "familyName": format!("N{i:05}")},
        "displayName": format!("User N{i:05}"),
        "emails": [{"primary": true, "value": format!("user{i:05}@example.com"), "type": "work"}],
        "active": true,
    })
}

fn group_body(g: usize) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": format!("Group {g:04}"),
        "externalId": format!("00g-{g:04}"),
        "members": [],
    })
}

/// Stores `users` users and `groups` groups, user `i` in the groups `member_of(i)`, through
/// the store API (as the SCIM server would). Returns the SCIM ids of the users.
async fn seed_store(
    store: &DynStore,
    users: usize,
    groups: usize,
    member_of: impl Fn(usize) -> Vec<usize>,
) -> anyhow::Result<Vec<String>> {
    let started = Instant::now();
    let ctx = WriteCtx::cli();
    let mut ids = Vec::with_capacity(users);
    for i in 0..users {
        let n = scim::resource::normalize(ResourceKind::User, &user_body(i))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let r = store
            .create(&ctx, ResourceKind::User, n.attrs, None)
            .await?;
        ids.push(r.id);
    }
    let mut members: Vec<Vec<NewMember>> = vec![Vec::new(); groups];
    for (i, id) in ids.iter().enumerate() {
        for g in member_of(i) {
            members[g].push(NewMember {
                value: id.clone(),
                ty: Some(store::MemberType::User),
                display: None,
            });
        }
    }
    for (g, m) in members.into_iter().enumerate() {
        let n = scim::resource::normalize(ResourceKind::Group, &group_body(g))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        store
            .create(&ctx, ResourceKind::Group, n.attrs, Some(m))
            .await?;
    }
    eprintln!(
        "[seed] store: {users} users, {groups} groups in {:.1?}",
        started.elapsed()
    );
    Ok(ids)
}

fn check_pass(r: &PassReport, what: &str) -> anyhow::Result<()> {
    ensure!(
        r.failed == 0 && !r.transient_stop && r.held == 0,
        "{what}: {r:?}"
    );
    Ok(())
}

fn writes(emu: &Emulator) -> u64 {
    emu.counters()
        .iter()
        .filter(|(k, _)| !k.starts_with("GET "))
        .map(|(_, v)| v)
        .sum()
}

fn count(emu: &Emulator, key: &str) -> u64 {
    emu.counters().get(key).copied().unwrap_or(0)
}

// ---- (A) calls per effective change ----------------------------------------------------

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

    /// Okta's group PATCH: a path-less replace of the unchanged `{id, displayName}` first.
    async fn patch_group(&self, id: &str, name: &str, ops: Vec<Value>) -> anyhow::Result<()> {
        let mut all = vec![json!({"op": "replace", "value": {"id": id, "displayName": name}})];
        all.extend(ops);
        self.send(
            reqwest::Method::PATCH,
            &format!("/Groups/{id}"),
            Some(json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": all})),
        )
        .await?;
        Ok(())
    }
}

/// What the replay expects TeamCity to do, counted from the replay itself.
#[derive(Debug, Default)]
struct Expect {
    /// Facts of TeamCity state changed.
    effective: u64,
    /// Calls the plan semantics need for them.
    minimal: u64,
    /// SCIM writes sent.
    scim_writes: u64,
}

impl Expect {
    fn change(&mut self, facts: u64, calls: u64) {
        self.effective += facts;
        self.minimal += calls;
    }
}

async fn bench_calls(cli: &Cli, report: &mut Report) -> anyhow::Result<()> {
    let n_users = cli.replay_users.max(10);
    let n_groups = cli.replay_groups.max(3);
    eprintln!("[calls] Okta-style replay: {n_users} users, {n_groups} groups");
    // Latency does not change the number of calls; keep the replay quick.
    let (tc_url, emu) = emulator(Duration::ZERO).await?;
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir, cli).await?;
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    let token = server::generate_token(random);
    store
        .create_token(
            &WriteCtx::cli(),
            "sync-bench",
            server::hash_token(&token),
            None,
        )
        .await?;
    let engine = engine(&store, tc_client(&tc_url, cli.concurrency)?)?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}{}", listener.local_addr()?, server::BASE_PATH);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server::serve(
        listener,
        server::AppState::new(store.clone()),
        async move {
            let _ = stop_rx.await;
        },
    ));
    let scim = Scim {
        http: reqwest::Client::new(),
        base,
        token,
    };
    // The worker's cache is loaded once at start (a read of TeamCity); not a per-change cost.
    engine.reconcile(false).await?;
    emu.reset_counters();

    let mut x = Expect::default();
    let mut drained = PassReport::default();
    let mut drain = async |x: &mut Expect| -> anyhow::Result<()> {
        x.scim_writes += 1;
        let r = engine.drain().await?;
        check_pass(&r, "drain")?;
        drained.applied += r.applied;
        Ok(())
    };

    // 1. Users (POST /Users). Each: created, and joins the defaults group (created with the
    //    first user).
    let mut ids = Vec::with_capacity(n_users);
    for i in 0..n_users {
        let r = scim
            .send(reqwest::Method::POST, "/Users", Some(user_body(i)))
            .await?;
        ids.push(r["id"].as_str().context("user id")?.to_owned());
        if i == 0 {
            x.change(3, 2); // user, defaults group, membership: create user + create group
        } else {
            x.change(2, 2); // user, membership: create user + join
        }
        drain(&mut x).await?;
    }
    // Membership: user i is in groups i % G, (i * 7) % G and (i * 13) % G.
    let members_of_group = |g: usize| -> Vec<usize> {
        (0..n_users)
            .filter(|i| i % n_groups == g || (i * 7) % n_groups == g || (i * 13) % n_groups == g)
            .collect()
    };
    let mut user_groups: Vec<BTreeSet<usize>> = vec![BTreeSet::new(); n_users];

    // 2. Group pushes: POST /Groups (no members), then PATCH add members in batches of 25.
    let mut gids = Vec::with_capacity(n_groups);
    for g in 0..n_groups {
        let r = scim
            .send(reqwest::Method::POST, "/Groups", Some(group_body(g)))
            .await?;
        let gid = r["id"].as_str().context("group id")?.to_owned();
        x.change(1, 1);
        drain(&mut x).await?;
        for chunk in members_of_group(g).chunks(25) {
            let value: Vec<Value> = chunk.iter().map(|&i| json!({"value": ids[i]})).collect();
            scim.patch_group(
                &gid,
                &format!("Group {g:04}"),
                vec![json!({"op": "add", "path": "members", "value": value})],
            )
            .await?;
            for &i in chunk {
                user_groups[i].insert(g);
            }
            let n = chunk.len() as u64;
            x.change(n, n);
            drain(&mut x).await?;
        }
        gids.push(gid);
    }

    // 3. Unchanged re-pushes: the replace alone, and the replace with members already there.
    let before = emu.total_calls();
    let mut noops = 0;
    for (g, gid) in gids.iter().enumerate().take(6) {
        let name = format!("Group {g:04}");
        let ops = if g % 2 == 0 {
            vec![]
        } else {
            let value: Vec<Value> = members_of_group(g)
                .iter()
                .take(10)
                .map(|&i| json!({"value": ids[i]}))
                .collect();
            vec![json!({"op": "add", "path": "members", "value": value})]
        };
        scim.patch_group(gid, &name, ops).await?;
        noops += 1;
        drain(&mut x).await?;
    }
    let noop_calls = emu.total_calls() - before;

    // 4. Deactivations (PATCH active=false); the first holds two access tokens.
    let deactivate = [1usize, 2, 3];
    let tc_id = |emu: &Emulator, i: usize| {
        let name = format!("user{i:05}@example.com");
        emu.with_state(|s| s.users.values().find(|u| u.username == name).map(|u| u.id))
    };
    let first = tc_id(&emu, deactivate[0]).context("user in TeamCity")?;
    emu.with_state(|s| {
        if let Some(u) = s.users.get_mut(&first) {
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
    for (k, &i) in deactivate.iter().enumerate() {
        scim.send(
            reqwest::Method::PATCH,
            &format!("/Users/{}", ids[i]),
            Some(json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"], "Operations": [{"op": "replace", "value": {"active": false}}]})),
        )
        .await?;
        let tokens = if k == 0 { 2 } else { 0 };
        // Leaves every group (its pushed groups and the defaults group), tokens deleted,
        // password randomised, marker set; the plan also lists the tokens (one read).
        let facts = user_groups[i].len() as u64 + 1 + tokens + 2;
        x.change(facts, facts + 1);
        drain(&mut x).await?;
    }

    // 5. A rename: one fact; the plan swaps (create the new group with everything, delete the
    //    old one).
    scim.patch_group(&gids[1], "Group 0001 renamed", vec![])
        .await?;
    x.change(1, 2);
    drain(&mut x).await?;

    let calls = emu.total_calls();
    let by_endpoint = emu.counters();
    // Converged: a full plan now finds nothing to do.
    let (p, _, _) = engine.plan_full().await?;
    ensure!(
        p.actions.is_empty(),
        "not converged after the replay: {:?}",
        &p.actions[..p.actions.len().min(5)]
    );
    let _ = stop_tx.send(());
    let _ = server_task.await;

    let ratio = calls as f64 / x.effective as f64;
    report.info(
        "A  replay",
        format!(
            "{} SCIM writes ({n_users} users, {n_groups} groups, {noops} no-op re-pushes, {} deactivations, 1 rename)",
            x.scim_writes,
            deactivate.len()
        ),
    );
    report.info(
        "A  TeamCity calls",
        format!(
            "{calls} (plan-minimal {}; {} actions applied)",
            x.minimal, drained.applied
        ),
    );
    report.info("A  effective changes", format!("{}", x.effective));
    report.target(
        "A  calls / effective change",
        format!("{ratio:.3}"),
        "<= 1.05",
        ratio <= 1.05,
    );
    report.target(
        "A  calls of no-op re-pushes",
        format!("{noop_calls} for {noops} pushes"),
        "0",
        noop_calls == 0,
    );
    eprintln!("[calls] by endpoint: {by_endpoint:?}");
    Ok(())
}

// ---- (B) no-drift reconcile --------------------------------------------------------------

async fn bench_reconcile(cli: &Cli, report: &mut Report) -> anyhow::Result<()> {
    let users = cli.reconcile_users;
    let groups = cli.reconcile_groups.max(1);
    eprintln!("[reconcile] seeding {users} users, {groups} groups (3 per user) and TeamCity");
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir, cli).await?;
    seed_store(&store, users, groups, |i| {
        let a = i % groups;
        let b = (i + groups / 3 + 1) % groups;
        let c = (i + 2 * groups / 3 + 2) % groups;
        [a, b, c]
            .into_iter()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    })
    .await?;
    // TeamCity: what the engine makes of that store, on a zero-latency emulator, then copied
    // into the measured one — consistent by construction.
    let started = Instant::now();
    let (url0, emu0) = emulator(Duration::ZERO).await?;
    let seeding = engine(&store, tc_client(&url0, cli.concurrency)?)?;
    let r = seeding.reconcile(false).await?;
    check_pass(&r, "seeding reconcile")?;
    let state = emu0.snapshot();
    let (url, emu) = emulator(Duration::from_millis(cli.latency_ms)).await?;
    emu.with_state(|s| *s = state);
    eprintln!(
        "[reconcile] TeamCity seeded ({} calls) in {:.1?}",
        emu0.total_calls(),
        started.elapsed()
    );

    let engine = engine(&store, tc_client(&url, cli.concurrency)?)?;
    emu.reset_counters();
    let started = Instant::now();
    let r = engine.reconcile(false).await?;
    let took = started.elapsed();
    check_pass(&r, "reconcile")?;
    let page_size = engine.config().page_size;
    let tc_users = emu.with_state(|s| s.users.len()) as u64;
    let user_pages = tc_users / page_size + 1;
    let pages = user_pages + 1; // + the group list (not paged)
    let reads = r.reads as u64;
    let gets = count(&emu, "GET /app/rest/users") + count(&emu, "GET /app/rest/userGroups");
    let total = emu.total_calls();
    let w = writes(&emu);
    report.info(
        "B  data",
        format!(
            "{users} users, {groups} groups, {} TeamCity users, latency {} ms",
            tc_users, cli.latency_ms
        ),
    );
    report.target(
        "B  reads = pages",
        format!("{reads} reads, {total} calls; {user_pages} user pages + 1 group list"),
        &format!("{pages}"),
        reads == pages && total == pages && gets == pages,
    );
    report.target(
        "B  writes",
        format!("{w} (planned {})", r.planned),
        "0",
        w == 0 && r.planned == 0,
    );
    report.target(
        "B  reconcile wall time",
        format!("{:.2} s", took.as_secs_f64()),
        "< 10 s",
        took < Duration::from_secs(10),
    );
    Ok(())
}

// ---- (C) initial load ----------------------------------------------------------------------

async fn bench_initial_load(cli: &Cli, report: &mut Report) -> anyhow::Result<()> {
    let users = cli.load_users.max(1);
    let groups = cli.load_groups.max(1);
    let per_user = cli.load_memberships.div_ceil(users).min(groups);
    eprintln!(
        "[initial-load] seeding {users} users, {groups} groups, {} memberships",
        users * per_user
    );
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir, cli).await?;
    // User i is in per_user groups spread over all groups.
    let stride = (groups / per_user.max(1)).max(1);
    seed_store(&store, users, groups, |i| {
        (0..per_user)
            .map(|k| (i + k * stride) % groups)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    })
    .await?;
    let latency = Duration::from_millis(cli.latency_ms);
    let (url, emu) = emulator(latency).await?;
    // Calibration: the same stack (client, loopback HTTP, emulator) on this machine, 2,000
    // cheap calls at the same concurrency, no engine.
    let raw = {
        let client = tc_client(&url, cli.concurrency)?;
        let n = 2_000usize;
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..cli.concurrency {
            let c = client.clone();
            let per = n / cli.concurrency;
            tasks.spawn(async move {
                for _ in 0..per {
                    c.server_info().await?;
                }
                anyhow::Ok(())
            });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        let took = started.elapsed().as_secs_f64();
        let ideal = latency.as_secs_f64() * n as f64 / cli.concurrency as f64;
        (took, took / ideal.max(f64::EPSILON))
    };
    emu.reset_counters();
    let engine = Arc::new(engine(&store, tc_client(&url, cli.concurrency)?)?);
    eprintln!("[initial-load] reconciling into an empty TeamCity");
    let started = Instant::now();
    // On a runtime worker, as in `serve` (not on the thread that drives `block_on`).
    let r = tokio::spawn({
        let engine = engine.clone();
        async move { engine.reconcile(false).await }
    })
    .await??;
    let took = started.elapsed();
    check_pass(&r, "initial load")?;
    let calls = emu.total_calls();
    let ideal = latency.as_secs_f64() * calls as f64 / cli.concurrency as f64;
    let ratio = took.as_secs_f64() / ideal;
    let (tc_users, tc_memberships) = emu.with_state(|s| {
        (
            s.users.len(),
            s.users.values().map(|u| u.groups.len()).sum::<usize>(),
        )
    });
    // Converged: a fresh engine plans nothing.
    let check = self::engine(&store, tc_client(&url, cli.concurrency)?)?;
    let (p, _, _) = check.plan_full().await?;
    ensure!(
        p.actions.is_empty(),
        "initial load did not converge: {} actions left",
        p.actions.len()
    );
    report.info(
        "C  data",
        format!(
            "{users} users, {groups} groups, {} memberships (+{users} in the defaults group); latency {} ms, concurrency {}",
            users * per_user,
            cli.latency_ms,
            cli.concurrency
        ),
    );
    report.info(
        "C  TeamCity calls",
        format!(
            "{calls} ({} actions applied; TeamCity now {tc_users} users, {tc_memberships} memberships)",
            r.applied
        ),
    );
    report.info(
        "C  calibration (no engine)",
        format!(
            "2000 GET /server calls at concurrency {}: {:.2} s = {:.2} × calls × latency / concurrency",
            cli.concurrency, raw.0, raw.1
        ),
    );
    report.info(
        "C  sequential would take",
        format!(
            "{:.1} s (calls × latency)",
            latency.as_secs_f64() * calls as f64
        ),
    );
    report.target(
        "C  initial load wall time",
        format!(
            "{:.2} s = {ratio:.2} × {:.2} s (calls × latency / concurrency)",
            took.as_secs_f64(),
            ideal
        ),
        "<= 1.2 ×",
        ratio <= 1.2,
    );
    Ok(())
}

async fn bench_pull(cli: &Cli, report: &mut Report) -> anyhow::Result<()> {
    use idp_fake::graph::{FakeUser, GraphFake};
    use source::graph::{GraphCredential, GraphOptions, GraphSource};
    let users = cli.load_users.max(1);
    let groups = cli.load_groups.max(1);
    let per_user = cli.load_memberships.div_ceil(users).min(groups);
    let stride = (groups / per_user.max(1)).max(1);
    eprintln!("[pull] the Graph fake holds {users} users, {groups} groups");
    let fake = GraphFake::start().await;
    for i in 0..users {
        fake.add_user(FakeUser::new(
            &format!("00u-{i:05}"),
            &format!("user{i:05}"),
        ));
    }
    for g in 0..groups {
        fake.add_group(&format!("00g-{g:04}"), &format!("Group {g:04}"));
    }
    let mut memberships = 0usize;
    for i in 0..users {
        let mine: BTreeSet<usize> = (0..per_user).map(|k| (i + k * stride) % groups).collect();
        for g in mine {
            fake.add_member(&format!("00g-{g:04}"), &format!("00u-{i:05}"));
            memberships += 1;
        }
    }
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir, cli).await?;
    let secret = dir.path().join("graph-secret");
    std::fs::write(&secret, fake.client_secret())?;
    let scope: Vec<String> = (0..groups).map(|g| format!("00g-{g:04}")).collect();
    let src = GraphSource::new(GraphOptions {
        tenant_id: fake.tenant_id().into(),
        client_id: fake.client_id().into(),
        credential: GraphCredential::Secret(source::SecretFile::new(&secret)),
        graph_url: fake.url(),
        authority_url: fake.url(),
        groups: scope.clone(),
        user_name_attribute: "userPrincipalName".into(),
    });

    let before = fake.requests();
    let started = Instant::now();
    let first = source::pull::pull_once(&store, &src, &scope, &SystemClock).await?;
    let pulled = started.elapsed();
    let graph_requests = fake.requests() - before;
    ensure!(
        first.summary.users_created == users && first.summary.groups_created == groups,
        "first pull: {:?}",
        first.summary
    );
    let latency = Duration::from_millis(cli.latency_ms);
    let (url, emu) = emulator(latency).await?;
    let engine = Arc::new(engine(&store, tc_client(&url, cli.concurrency)?)?);
    // The outbox rows the pull wrote, applied as `serve`'s worker applies them.
    let started = Instant::now();
    let r = tokio::spawn({
        let engine = engine.clone();
        async move { engine.drain().await }
    })
    .await??;
    check_pass(&r, "pull: first load")?;
    let loaded = started.elapsed();

    // One change in the IdP: a new hire in one group, pulled and applied.
    fake.add_user(FakeUser::new("00u-new", "newhire"));
    fake.add_member("00g-0000", "00u-new");
    let before = fake.requests();
    let started = Instant::now();
    let one = source::pull::pull_once(&store, &src, &scope, &SystemClock).await?;
    let pulled_one = started.elapsed();
    let one_requests = fake.requests() - before;
    let drained = tokio::spawn({
        let engine = engine.clone();
        async move { engine.drain().await }
    })
    .await??;
    let one_total = started.elapsed();
    ensure!(
        one.summary.users_created == 1 && drained.failed == 0,
        "one change: {:?} {drained:?}",
        one.summary
    );
    ensure!(
        emu.with_state(|s| s
            .users
            .values()
            .any(|u| u.username == "newhire@contoso.example")),
        "the new hire did not reach TeamCity"
    );
    report.info(
        "D  data",
        format!(
            "Graph fake: {users} users, {groups} groups, {memberships} memberships; page size 100"
        ),
    );
    report.info(
        "D  first sync: Graph requests",
        format!("{graph_requests} (token, users/delta and groups/delta pages)"),
    );
    report.info(
        "D  first sync: pulled and stored",
        format!(
            "{:.2} s (one transaction: {} users, {} groups, {} memberships)",
            pulled.as_secs_f64(),
            first.summary.users_created,
            first.summary.groups_created,
            first.summary.members_added
        ),
    );
    report.info(
        "D  first sync: into TeamCity",
        format!(
            "{:.2} s ({} actions, latency {} ms, concurrency {})",
            loaded.as_secs_f64(),
            r.applied,
            cli.latency_ms,
            cli.concurrency
        ),
    );
    report.target(
        "D  one change: IdP to TeamCity",
        format!(
            "{:.3} s ({one_requests} Graph requests, pull + store {:.3} s) + the wait for the next interval",
            one_total.as_secs_f64(),
            pulled_one.as_secs_f64()
        ),
        "< 5 s after the pull starts",
        one_total < Duration::from_secs(5),
    );
    Ok(())
}

// ---- (E) one change in a large directory --------------------------------------------------

/// Writes `users` users (ids `u-…`) and `groups` groups (ids `g-…`, user `i` in the groups
/// `member_of(i)`) through [`store::Resources::write_batch`], 1,000 resources per transaction (as
/// pull mode would; seeding is not measured). Returns the user and group ids.
async fn seed_store_batched(
    store: &DynStore,
    users: usize,
    groups: usize,
    member_of: impl Fn(usize) -> Vec<usize>,
) -> anyhow::Result<(Vec<String>, Vec<String>)> {
    let started = Instant::now();
    let ctx = WriteCtx::cli();
    let uids: Vec<String> = (0..users).map(|i| format!("u-{i:07}")).collect();
    let gids: Vec<String> = (0..groups).map(|g| format!("g-{g:06}")).collect();
    for chunk in (0..users).collect::<Vec<_>>().chunks(1000) {
        let mut ops = Vec::with_capacity(chunk.len());
        for &i in chunk {
            let n = scim::resource::normalize(ResourceKind::User, &user_body(i))
                .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            ops.push(store::BatchOp::Create {
                kind: ResourceKind::User,
                id: uids[i].clone(),
                attrs: n.attrs,
                members: None,
            });
        }
        store.write_batch(&ctx, &ops, None).await?;
    }
    let mut members: Vec<Vec<NewMember>> = vec![Vec::new(); groups];
    for (i, id) in uids.iter().enumerate() {
        for g in member_of(i) {
            members[g].push(NewMember {
                value: id.clone(),
                ty: Some(store::MemberType::User),
                display: None,
            });
        }
    }
    let mut ops = Vec::new();
    for (g, m) in members.into_iter().enumerate() {
        let n = scim::resource::normalize(ResourceKind::Group, &group_body(g))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        ops.push(store::BatchOp::Create {
            kind: ResourceKind::Group,
            id: gids[g].clone(),
            attrs: n.attrs,
            members: Some(m),
        });
        if ops.len() == 1000 {
            store.write_batch(&ctx, &ops, None).await?;
            ops.clear();
        }
    }
    if !ops.is_empty() {
        store.write_batch(&ctx, &ops, None).await?;
    }
    eprintln!(
        "[seed] store: {users} users, {groups} groups in {:.1?}",
        started.elapsed()
    );
    Ok((uids, gids))
}

/// Marks every pending outbox row done (the seeded directory is brought into TeamCity by a
/// reconcile instead).
async fn complete_all(store: &DynStore) -> anyhow::Result<()> {
    loop {
        let claimed = store
            .claim_outbox(
                "sync-bench",
                time::OffsetDateTime::now_utc(),
                Duration::from_secs(3600),
                20_000,
            )
            .await?;
        if claimed.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = claimed.iter().flat_map(store::ClaimedEntity::ids).collect();
        store
            .complete_outbox(&WriteCtx::cli(), &ids, vec![])
            .await?;
    }
}

/// p50 and p99 (nearest rank) of `samples`, in ms.
fn percentiles(samples: &mut [Duration]) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| {
        let i = ((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1000.0
    };
    if samples.is_empty() {
        (0.0, 0.0)
    } else {
        (at(0.50), at(0.99))
    }
}

/// Starts `engine.run` (the worker and its first reconcile) and waits for that reconcile.
async fn start_worker(
    engine: Arc<Engine>,
    store: &DynStore,
) -> anyhow::Result<(
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
)> {
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(engine.run(stop_rx));
    let started = Instant::now();
    while store.sync_state_get("last_reconcile").await?.is_none() {
        ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "the first reconcile did not finish"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((stop, task))
}

/// An engine for the latency benchmarks: the worker polls every 10 ms; no periodic reconcile
/// during the measurement.
fn worker_engine(store: &DynStore, client: teamcity::Client) -> anyhow::Result<Engine> {
    Ok(Engine::new(
        store.clone(),
        client,
        Policy::from_toml(POLICY)?,
        EngineConfig {
            poll: Duration::from_millis(10),
            reconcile_interval: Duration::from_secs(24 * 3600),
            ..EngineConfig::default()
        },
    ))
}

async fn bench_one_change(cli: &Cli, report: &mut Report) -> anyhow::Result<()> {
    let mut all: Vec<Duration> = Vec::new();
    let mut medians: Vec<f64> = Vec::new();
    for &users in &cli.sizes {
        let users = users.max(10);
        let groups = (users / 10).max(3);
        // User i is in two groups (about 20 members each) and the defaults group.
        let member_of = |i: usize| -> Vec<usize> {
            [i % groups, (i * 7 + 1) % groups]
                .into_iter()
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        eprintln!("[one-change] {users} users, {groups} groups");
        let dir = tempfile::tempdir()?;
        let store = open_store(&dir, cli).await?;
        let (uids, gids) = seed_store_batched(&store, users, groups, member_of).await?;
        complete_all(&store).await?;
        let (url, emu) = emulator(Duration::ZERO).await?;
        let engine = Arc::new(worker_engine(&store, tc_client(&url, cli.concurrency)?)?);
        let started = Instant::now();
        let (stop, task) = start_worker(engine.clone(), &store).await?;
        let tc_users = emu.read_state(|s| s.users.len());
        ensure!(tc_users > users, "TeamCity not seeded: {tc_users} users");
        // Steady state: the worker indexes its cache on its first idle poll after a reconcile.
        tokio::time::sleep(Duration::from_secs(1)).await;
        eprintln!(
            "[one-change] TeamCity in sync ({tc_users} users) after {:.1?}",
            started.elapsed()
        );
        let ctx = WriteCtx::cli();
        let mut used = BTreeSet::new();
        let mut pick = |k: usize| {
            let mut u = (k * 7919 + 13) % users;
            while !used.insert(u) {
                u = (u + 1) % users;
            }
            u
        };
        let (mut adds, mut deacts) = (Vec::new(), Vec::new());
        for k in 0..cli.changes {
            let u = pick(k);
            let tc_id: u64 = store
                .mapping(ResourceKind::User, &uids[u])
                .await?
                .context("user mapped")?
                .teamcity_id
                .parse()?;
            let took = if k % 2 == 0 {
                let mine = member_of(u);
                let mut g = (u + groups / 2) % groups;
                while mine.contains(&g) {
                    g = (g + 1) % groups;
                }
                let key = sync::group_key(&gids[g], 0);
                let t0 = Instant::now();
                store
                    .update_members(
                        &ctx,
                        &gids[g],
                        &[store::MembershipChange::Add(vec![NewMember {
                            value: uids[u].clone(),
                            ty: Some(store::MemberType::User),
                            display: None,
                        }])],
                    )
                    .await?;
                wait_for(&emu, t0, |s| {
                    s.users.get(&tc_id).is_some_and(|x| x.groups.contains(&key))
                })
                .await?
            } else {
                let r = store
                    .get(ResourceKind::User, &uids[u], store::ReadOpts::default())
                    .await?
                    .context("user stored")?;
                let mut attrs = r.attrs.clone();
                attrs["active"] = json!(false);
                let t0 = Instant::now();
                store
                    .update(
                        &ctx,
                        ResourceKind::User,
                        &uids[u],
                        r.version,
                        Some(attrs),
                        &[],
                    )
                    .await?;
                wait_for(&emu, t0, |s| {
                    s.users
                        .get(&tc_id)
                        .is_some_and(|x| x.properties.contains_key(sync::USER_DEACTIVATED))
                })
                .await?
            };
            if k % 2 == 0 {
                adds.push(took);
            } else {
                deacts.push(took);
            }
            // Let the pass settle its rows, so the next change is a pass of its own.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let _ = stop.send(true);
        let _ = task.await;
        all.extend(adds.iter().chain(&deacts));
        let (a50, a99) = percentiles(&mut adds);
        let (d50, d99) = percentiles(&mut deacts);
        let mut both: Vec<Duration> = adds.iter().chain(&deacts).copied().collect();
        let (b50, b99) = percentiles(&mut both);
        medians.push(b50);
        report.info(
            &format!("E  {users} users / {groups} groups"),
            format!(
                "add member p50 {a50:.0} ms p99 {a99:.0} ms; deactivate p50 {d50:.0} ms p99 {d99:.0} ms ({} changes)",
                both.len()
            ),
        );
        report.target(
            &format!("E  {users} users: one change p50 / p99"),
            format!("{b50:.0} ms / {b99:.0} ms"),
            "< 100 ms / < 300 ms",
            b50 < 100.0 && b99 < 300.0,
        );
    }
    if medians.len() > 1 {
        let (lo, hi) = medians
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), m| (lo.min(*m), hi.max(*m)));
        report.target(
            "E  flat: largest p50 / smallest p50",
            format!("{:.2}", hi / lo.max(0.001)),
            "<= 2",
            hi / lo.max(0.001) <= 2.0,
        );
    }
    Ok(())
}

/// Waits until `done` holds for the emulator's state; the time since `t0`.
async fn wait_for(
    emu: &Emulator,
    t0: Instant,
    done: impl Fn(&teamcity_emulator::State) -> bool,
) -> anyhow::Result<Duration> {
    loop {
        if emu.read_state(&done) {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(300),
            "the change did not reach TeamCity within 300 s"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---- (F) a push during a first load ------------------------------------------------------

async fn bench_push_during_load(cli: &Cli, report: &mut Report) -> anyhow::Result<()> {
    let users = cli.push_load_users.max(10);
    let groups = (users / 10).max(5);
    let dir = tempfile::tempdir()?;
    let store = open_store(&dir, cli).await?;
    let latency = Duration::from_millis(cli.latency_ms);
    let (url, emu) = emulator(latency).await?;
    let ctx = WriteCtx::cli();
    // Before the load: ten people and one group TeamCity already has.
    let mut existing = Vec::new();
    for i in 0..10 {
        let n = scim::resource::normalize(
            ResourceKind::User,
            &json!({"userName": format!("existing{i}@example.com"), "active": true}),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        existing.push(
            store
                .create(&ctx, ResourceKind::User, n.attrs, None)
                .await?,
        );
    }
    let n = scim::resource::normalize(
        ResourceKind::Group,
        &json!({"displayName": "Existing", "members": [{"value": existing[0].id}]}),
    )
    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let group = store
        .create(
            &ctx,
            ResourceKind::Group,
            n.attrs,
            n.members.map(|m| {
                m.into_iter()
                    .map(|m| NewMember {
                        value: m.value,
                        ty: None,
                        display: None,
                    })
                    .collect()
            }),
        )
        .await?;
    let engine = Arc::new(worker_engine(&store, tc_client(&url, cli.concurrency)?)?);
    let (stop, task) = start_worker(engine.clone(), &store).await?;
    let tc_id = |m: Option<store::Mapping>| m.map(|m| m.teamcity_id);
    let started = Instant::now();
    let (leaver, joiner, key) = loop {
        let l = tc_id(store.mapping(ResourceKind::User, &existing[1].id).await?);
        let j = tc_id(store.mapping(ResourceKind::User, &existing[2].id).await?);
        let g = tc_id(store.mapping(ResourceKind::Group, &group.id).await?);
        if let (Some(l), Some(j), Some(g)) = (l, j, g) {
            break (l.parse::<u64>()?, j.parse::<u64>()?, g);
        }
        ensure!(
            started.elapsed() < Duration::from_secs(60),
            "the existing users did not reach TeamCity"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!(
        "[push-during-load] pushing {users} users then {groups} groups (5 per user) while the worker runs"
    );
    let load_started = Instant::now();
    let load = tokio::spawn({
        let store = store.clone();
        async move {
            seed_store_batched(&store, users, groups, |i| {
                (0..5)
                    .map(|k| (i * 5 + k * 7) % groups)
                    .collect::<BTreeSet<_>>()
                    .into_iter()
                    .collect()
            })
            .await
        }
    });
    tokio::time::sleep(Duration::from_secs(cli.push_after_s)).await;
    let pending_before = store
        .outbox_summary()
        .await?
        .by_state
        .get(&store::OutboxState::Pending)
        .copied()
        .unwrap_or(0);
    let t0 = Instant::now();
    // Three pushes at once: a new user, a deactivation, a membership.
    let create = async {
        let n = scim::resource::normalize(
            ResourceKind::User,
            &json!({"userName": "probe@example.com", "active": true}),
        )
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let probe = store
            .create(&ctx, ResourceKind::User, n.attrs, None)
            .await?;
        loop {
            if store
                .mapping(ResourceKind::User, &probe.id)
                .await?
                .is_some()
            {
                return anyhow::Ok(t0.elapsed());
            }
            ensure!(
                t0.elapsed() < Duration::from_secs(900),
                "the new user did not reach TeamCity within 900 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let deactivate = async {
        let u = &existing[1];
        let mut attrs = u.attrs.clone();
        attrs["active"] = json!(false);
        store
            .update(&ctx, ResourceKind::User, &u.id, u.version, Some(attrs), &[])
            .await?;
        wait_for(&emu, t0, |s| {
            s.users
                .get(&leaver)
                .is_some_and(|x| x.properties.contains_key(sync::USER_DEACTIVATED))
        })
        .await
    };
    let join = async {
        store
            .update_members(
                &ctx,
                &group.id,
                &[store::MembershipChange::Add(vec![NewMember {
                    value: existing[2].id.clone(),
                    ty: Some(store::MemberType::User),
                    display: None,
                }])],
            )
            .await?;
        wait_for(&emu, t0, |s| {
            s.users
                .get(&joiner)
                .is_some_and(|x| x.groups.contains(&key))
        })
        .await
    };
    let say = |what: &'static str| {
        move |r: anyhow::Result<Duration>| {
            if let Ok(d) = &r {
                eprintln!("[push-during-load] {what} reached TeamCity after {d:.2?}");
            }
            r
        }
    };
    let (deactivated, joined, created) = tokio::join!(
        async { say("the deactivation")(deactivate.await) },
        async { say("the membership")(join.await) },
        async { say("the new user")(create.await) }
    );
    let (deactivated, joined, created) = (deactivated?, joined?, created?);
    let tc_users = emu.read_state(|s| s.users.len());
    let _ = stop.send(true);
    let _ = task.await;
    load.abort();
    report.info(
        "F  load",
        format!(
            "{users} users / {groups} groups pushed from t=0; pushes at t={:.1} s with {pending_before} rows pending; \
             TeamCity had {tc_users} users when the new user arrived (latency {} ms, concurrency {})",
            (t0 - load_started).as_secs_f64(),
            cli.latency_ms,
            cli.concurrency
        ),
    );
    report.target(
        "F  a deactivation pushed during a first load reaches TeamCity",
        format!("{:.2} s", deactivated.as_secs_f64()),
        "< 5 s",
        deactivated < Duration::from_secs(5),
    );
    report.target(
        "F  a membership of existing people pushed during a first load reaches TeamCity",
        format!("{:.2} s", joined.as_secs_f64()),
        "< 5 s",
        joined < Duration::from_secs(5),
    );
    report.target(
        "F  a new user pushed during a first load reaches TeamCity",
        format!("{:.2} s", created.as_secs_f64()),
        "< 5 s",
        created < Duration::from_secs(5),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()?;
    let mut report = Report::default();
    rt.block_on(async {
        if matches!(cli.command, Cmd::All | Cmd::Calls) {
            bench_calls(&cli, &mut report).await?;
        }
        if matches!(cli.command, Cmd::All | Cmd::Reconcile) {
            bench_reconcile(&cli, &mut report).await?;
        }
        if matches!(cli.command, Cmd::All | Cmd::InitialLoad) {
            bench_initial_load(&cli, &mut report).await?;
        }
        if matches!(cli.command, Cmd::All | Cmd::Pull) {
            bench_pull(&cli, &mut report).await?;
        }
        if cli.command == Cmd::OneChange {
            bench_one_change(&cli, &mut report).await?;
        }
        if cli.command == Cmd::PushDuringLoad {
            bench_push_during_load(&cli, &mut report).await?;
        }
        if let Some(server) = &cli.pg {
            drop_databases(server).await?;
        }
        anyhow::Ok(())
    })?;
    report.print();
    println!(
        "\n(one process: engine, emulator, SCIM server and the store's client share {} runtime threads and this machine's cores; store: {})",
        cli.threads,
        if cli.pg.is_some() {
            "PostgreSQL on this machine"
        } else {
            "SQLite"
        }
    );
    if cli.check && !report.all_pass() {
        std::process::exit(1);
    }
    Ok(())
}
