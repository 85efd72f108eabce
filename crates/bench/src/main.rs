//! `scim-bench`: measures the SCIM server against its performance targets.
//!
//! * `filter`: 10,000 users stored; `GET /scim/v2/Users?filter=userName eq "…"` for random
//!   existing users at concurrency 32 over loopback — ≥ 15,000 requests/s and p99 < 5 ms, with
//!   the load generator on the same machine.
//! * `members`: adding one member to a group of 1,000 and of 50,000 members with
//!   `PATCH /Groups/{id}` — p50 < 5 ms for both (sequential requests).
//! * `memory`: resident memory of the `teamcity-scim serve` process with 100,000 users
//!   stored — ≤ 64 MB idle.
//! * `all`: the three in turn.
//!
//! Data is seeded through the `Store` API before the server starts (seeding is not measured).
//! By default the server under test is the real `teamcity-scim serve` process, found next to
//! this executable (build both with `cargo build --release -p bench -p teamcity-scim`); the load
//! generator is this process, on the same machine and cores. `--server in-process` serves from a
//! task in this process instead (`memory` always spawns the real binary).
//!
//! Without `--check` the exit status is 0 whatever the figures; with it, a missed target exits 1.

#![allow(
    unreachable_pub,
    reason = "a binary crate has no public API; `pub` marks module interfaces"
)]

use std::fmt::Write as _;
use std::net::TcpListener as StdListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, Subcommand, ValueEnum};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use scim::ResourceKind;
use serde_json::{Value, json};
use store::{DynStore, MembershipChange, NewMember, ReadOpts, SystemClock, WriteCtx};

#[derive(Debug, Parser)]
#[command(
    name = "scim-bench",
    about = "Benchmarks the SCIM server against its performance targets"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    /// Exit with status 1 when a target is missed.
    #[arg(long, global = true)]
    check: bool,
    /// Where the server under test runs (the load generator is always this process).
    #[arg(long, global = true, value_enum, default_value_t = ServerMode::Process)]
    server: ServerMode,
    /// Measured duration of the filter load, in seconds.
    #[arg(long, global = true, default_value_t = 10)]
    duration: u64,
    /// Warm-up before the filter load is measured, in seconds.
    #[arg(long, global = true, default_value_t = 2)]
    warmup: u64,
    /// Concurrent requests of the filter load.
    #[arg(long, global = true, default_value_t = 32)]
    concurrency: usize,
    /// Measured PATCH requests per group size.
    #[arg(long, global = true, default_value_t = 200)]
    patches: usize,
    /// Keep seeded databases here and reuse them on later runs (default: a temporary directory).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    /// The `teamcity-scim` binary (default: next to this executable).
    #[arg(long, global = true)]
    server_bin: Option<PathBuf>,
    /// HTTP client of the filter load: `raw` is a minimal keep-alive HTTP/1.1 client (one
    /// connection per concurrent worker, like wrk), `reqwest` a pooled reqwest client.
    #[arg(long, global = true, value_enum, default_value_t = ClientKind::Raw)]
    client: ClientKind,
    /// Worker threads of this process's runtime (load generator and in-process server).
    #[arg(long, global = true, default_value_t = 2)]
    threads: usize,
}

#[derive(Debug, Subcommand, Clone, Copy, PartialEq, Eq)]
enum Cmd {
    /// All three benchmarks.
    All,
    /// (a) userName filter throughput and latency, 10,000 users.
    Filter,
    /// (b) PATCH add-member latency on groups of 1,000 and 50,000 members.
    Members,
    /// (c) resident memory of `teamcity-scim serve`, 100,000 users.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ClientKind {
    /// Minimal HTTP/1.1 keep-alive client over one TCP connection per worker.
    Raw,
    /// reqwest with a connection pool.
    Reqwest,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ServerMode {
    /// Spawn `teamcity-scim serve` (the production binary and wiring).
    Process,
    /// Run `server::serve` on a task in this process.
    InProcess,
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
            "{:<w$}  {:>mw$}  {:<14}  RESULT",
            "MEASUREMENT", "MEASURED", "TARGET"
        );
        println!("{}", "-".repeat(w + mw + 26));
        for r in &self.rows {
            let result = match r.pass {
                Some(true) => "PASS",
                Some(false) => "FAIL",
                None => "",
            };
            println!(
                "{:<w$}  {:>mw$}  {:<14}  {result}",
                r.name, r.measured, r.goal
            );
        }
    }

    fn all_pass(&self) -> bool {
        self.rows.iter().all(|r| r.pass != Some(false))
    }
}

/// What a seeded database holds.
#[derive(Debug, Clone)]
struct Seeded {
    db: PathBuf,
    token: String,
    /// `(id, userName)` in creation order.
    users: Vec<(String, String)>,
    /// `(size, group id)` of the groups made for the membership benchmark.
    groups: Vec<(usize, String)>,
}

impl Seeded {
    fn url(&self) -> String {
        format!("sqlite://{}", self.db.display())
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let v = json!({
            "token": self.token,
            "users": self.users.iter().map(|(i, n)| json!([i, n])).collect::<Vec<_>>(),
            "groups": self.groups.iter().map(|(s, i)| json!([s, i])).collect::<Vec<_>>(),
        });
        std::fs::write(path, serde_json::to_vec(&v)?)?;
        Ok(())
    }

    fn load(db: &Path, path: &Path) -> anyhow::Result<Self> {
        let v: Value = serde_json::from_slice(&std::fs::read(path)?)?;
        let pair = |x: &Value, i: usize| x.get(i).cloned().unwrap_or(Value::Null);
        let s = |x: Value| x.as_str().unwrap_or_default().to_owned();
        Ok(Seeded {
            db: db.to_owned(),
            token: s(v["token"].clone()),
            users: v["users"]
                .as_array()
                .context("seed metadata: users")?
                .iter()
                .map(|u| (s(pair(u, 0)), s(pair(u, 1))))
                .collect(),
            groups: v["groups"]
                .as_array()
                .context("seed metadata: groups")?
                .iter()
                .map(|g| (pair(g, 0).as_u64().unwrap_or(0) as usize, s(pair(g, 1))))
                .collect(),
        })
    }
}

async fn open_store(db: &Path) -> anyhow::Result<DynStore> {
    store::open(&format!("sqlite://{}", db.display()), Arc::new(SystemClock))
        .await
        .with_context(|| format!("cannot open {}", db.display()))
}

fn user_body(i: usize) -> Value {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": format!("user{i:06}@example.com"),
        "externalId": format!("ext-{i:06}"),
        "name": {"givenName": format!("Given{i}"), "familyName": format!("Family{i}")},
        "displayName": format!("Given{i} Family{i}"),
        "emails": [{"value": format!("user{i:06}@example.com"), "type": "work", "primary": true}],
        "active": true,
    })
}

/// Seeds `users` users and the groups `(size, members taken from the first users)`, or reuses
/// a database seeded earlier with the same name.
async fn seed(
    dir: &Path,
    name: &str,
    users: usize,
    groups: &[usize],
    group_of_each_user: usize,
) -> anyhow::Result<Seeded> {
    let db = dir.join(format!("{name}.db"));
    let meta = dir.join(format!("{name}.json"));
    if db.exists() && meta.exists() {
        let s = Seeded::load(&db, &meta)?;
        if s.users.len() == users && s.groups.len() == groups.len() {
            eprintln!("[seed] reusing {}", db.display());
            return Ok(s);
        }
    }
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.join(format!("{name}.db{suffix}")));
    }
    let started = Instant::now();
    let store = open_store(&db).await?;
    let ctx = WriteCtx::cli();
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    let token = server::generate_token(random);
    store
        .create_token(&ctx, "scim-bench", server::hash_token(&token), None)
        .await?;
    let mut list = Vec::with_capacity(users);
    for i in 0..users {
        let n = scim::resource::normalize(ResourceKind::User, &user_body(i))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let r = store
            .create(&ctx, ResourceKind::User, n.attrs, None)
            .await?;
        list.push((r.id, format!("user{i:06}@example.com")));
        if (i + 1) % 20_000 == 0 {
            eprintln!("[seed] {name}: {} users ({:.1?})", i + 1, started.elapsed());
        }
    }
    let member = |id: &str| NewMember {
        value: id.to_owned(),
        ty: Some(store::MemberType::User),
        display: None,
    };
    // Background membership: user i is in group i % group_of_each_user.
    for g in 0..group_of_each_user {
        let members: Vec<NewMember> = list
            .iter()
            .skip(g)
            .step_by(group_of_each_user)
            .map(|(id, _)| member(id))
            .collect();
        let attrs = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": format!("team-{g:03}")});
        store
            .create(&ctx, ResourceKind::Group, attrs, Some(members))
            .await?;
    }
    let mut made = vec![];
    for &size in groups {
        ensure!(size <= users, "a group of {size} needs as many users");
        let members: Vec<NewMember> = list[..size].iter().map(|(id, _)| member(id)).collect();
        let attrs = json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": format!("bench-{size}")});
        let g = store
            .create(&ctx, ResourceKind::Group, attrs, Some(members))
            .await?;
        made.push((size, g.id));
    }
    drop(store);
    eprintln!(
        "[seed] {name}: {users} users, groups {groups:?} in {:.1?}",
        started.elapsed()
    );
    let s = Seeded {
        db,
        token,
        users: list,
        groups: made,
    };
    s.save(&meta)?;
    Ok(s)
}

/// The server under test.
#[derive(Debug)]
enum Server {
    Process {
        child: Child,
        base: String,
    },
    InProcess {
        base: String,
        shutdown: tokio::sync::oneshot::Sender<()>,
        task: tokio::task::JoinHandle<std::io::Result<()>>,
    },
}

impl Server {
    fn base(&self) -> &str {
        match self {
            Server::Process { base, .. } | Server::InProcess { base, .. } => base,
        }
    }

    fn pid(&self) -> Option<u32> {
        match self {
            Server::Process { child, .. } => Some(child.id()),
            Server::InProcess { .. } => None,
        }
    }

    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Server::Process { mut child, .. } => {
                // SIGTERM for a graceful stop; fall back to kill.
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                for _ in 0..100 {
                    if child.try_wait()?.is_some() {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                child.kill()?;
                child.wait()?;
            }
            Server::InProcess { shutdown, task, .. } => {
                let _ = shutdown.send(());
                task.await??;
            }
        }
        Ok(())
    }
}

fn server_bin(cli: &Cli) -> anyhow::Result<PathBuf> {
    let bin = match &cli.server_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("the executable has no directory")?
            .join("teamcity-scim"),
    };
    ensure!(
        bin.exists(),
        "{} not found: build it next to scim-bench (`cargo build --release -p bench -p teamcity-scim` \
         with the same CARGO_TARGET_DIR) or pass --server-bin",
        bin.display()
    );
    Ok(bin)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(StdListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn wait_healthy(
    client: &reqwest::Client,
    base: &str,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("teamcity-scim exited during startup: {status}");
        }
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "teamcity-scim did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn start_process(
    bin: &Path,
    seeded: &Seeded,
    client: &reqwest::Client,
    log: &Path,
) -> anyhow::Result<Server> {
    let port = free_port()?;
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(bin)
        .arg("serve")
        .env_remove("TEAMCITY_SCIM_CONFIG")
        .env_remove("RUST_LOG")
        .env("TEAMCITY_SCIM_SERVER__LISTEN", &listen)
        .env("TEAMCITY_SCIM_ADMIN__LISTEN", "")
        .env("TEAMCITY_SCIM_DATABASE__URL", seeded.url())
        // One token drives the whole load: the per-token rate limit would measure itself.
        .env("TEAMCITY_SCIM_SERVER__RATE_LIMIT_PER_SECOND", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::fs::File::create(log)?))
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(log)?,
        ))
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))?;
    let base = format!("http://{listen}");
    if let Err(e) = wait_healthy(client, &base, &mut child).await {
        let _ = child.kill();
        let out = std::fs::read_to_string(log).unwrap_or_default();
        bail!("{e}\n--- server log ---\n{out}");
    }
    Ok(Server::Process { child, base })
}

async fn start_in_process(seeded: &Seeded) -> anyhow::Result<Server> {
    let store = open_store(&seeded.db).await?;
    let state = server::AppState::new(store);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server::serve(listener, state, async {
        let _ = rx.await;
    }));
    Ok(Server::InProcess {
        base,
        shutdown: tx,
        task,
    })
}

async fn start(
    cli: &Cli,
    seeded: &Seeded,
    client: &reqwest::Client,
    dir: &Path,
) -> anyhow::Result<Server> {
    match cli.server {
        ServerMode::Process => {
            start_process(&server_bin(cli)?, seeded, client, &dir.join("server.log")).await
        }
        ServerMode::InProcess => start_in_process(seeded).await,
    }
}

fn client(pool: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(pool)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()?)
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A minimal HTTP/1.1 keep-alive client for the load loop: writes a prepared request, reads
/// the status line, headers and a `Content-Length` body. Anything else is an error.
#[derive(Debug)]
struct RawConn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
}

impl RawConn {
    async fn connect(addr: &str) -> anyhow::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Sends `req` and returns the status code (the body is read and discarded).
    async fn request(&mut self, req: &[u8]) -> anyhow::Result<u16> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(req).await?;
        self.buf.clear();
        let mut chunk = [0u8; 16 * 1024];
        let head_end = loop {
            let n = self.stream.read(&mut chunk).await?;
            ensure!(n > 0, "connection closed by the server");
            self.buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = std::str::from_utf8(&self.buf[..head_end])?;
        let status: u16 = head
            .get(9..12)
            .and_then(|s| s.parse().ok())
            .context("bad status line")?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .context("response without Content-Length")?;
        while self.buf.len() < head_end + len {
            let n = self.stream.read(&mut chunk).await?;
            ensure!(n > 0, "connection closed by the server");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        ensure!(
            self.buf.len() == head_end + len,
            "unexpected bytes after the body"
        );
        Ok(status)
    }
}

/// Latency statistics over recorded durations.
#[derive(Debug, Clone, Copy)]
struct Stats {
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
}

fn stats(mut d: Vec<Duration>) -> Stats {
    d.sort_unstable();
    let q = |p: f64| {
        if d.is_empty() {
            Duration::ZERO
        } else {
            // Nearest-rank percentile.
            let rank = ((p * d.len() as f64).ceil() as usize).clamp(1, d.len());
            d[rank - 1]
        }
    };
    Stats {
        n: d.len(),
        p50: q(0.50),
        p90: q(0.90),
        p99: q(0.99),
        max: d.last().copied().unwrap_or_default(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

/// User + system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the `(comm)`: state is field 3; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// (a) filter load.
async fn bench_filter(cli: &Cli, dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("[filter] seeding 10,000 users");
    let seeded = seed(dir, "filter-10k", 10_000, &[], 10).await?;
    let client = client(cli.concurrency * 2)?;
    let server = start(cli, &seeded, &client, dir).await?;
    let base = server.base().to_owned();
    let urls: Arc<Vec<String>> = Arc::new(
        seeded
            .users
            .iter()
            .map(|(_, name)| {
                format!(
                    "{base}/scim/v2/Users?filter={}",
                    encode(&format!("userName eq \"{name}\""))
                )
            })
            .collect(),
    );
    let auth = Arc::new(format!("Bearer {}", seeded.token));
    let host = base.trim_start_matches("http://").to_owned();
    let raw_requests: Arc<Vec<Vec<u8>>> = Arc::new(
        urls.iter()
            .map(|u| {
                format!(
                    "GET {} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\nAccept: application/scim+json\r\n\r\n",
                    &u[base.len()..]
                )
                .into_bytes()
            })
            .collect(),
    );

    // Correctness probe: the filter finds exactly the user asked for.
    let (id, name) = &seeded.users[1234];
    let v: Value = client
        .get(&urls[1234])
        .header("authorization", auth.as_str())
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    ensure!(
        v["totalResults"] == 1 && v["Resources"][0]["id"] == id.as_str(),
        "filter for {name} answered {v}"
    );

    eprintln!(
        "[filter] {} concurrent {:?} clients, {} s warm-up, {} s measured ({} server)",
        cli.concurrency,
        cli.client,
        cli.warmup,
        cli.duration,
        match cli.server {
            ServerMode::Process => "separate process",
            ServerMode::InProcess => "in-process",
        }
    );
    let t0 = Instant::now();
    let measure_from = t0 + Duration::from_secs(cli.warmup);
    let end = measure_from + Duration::from_secs(cli.duration);
    let mut tasks = vec![];
    for w in 0..cli.concurrency {
        let (client, urls, auth) = (client.clone(), urls.clone(), auth.clone());
        let (raw_requests, host, kind) = (raw_requests.clone(), host.clone(), cli.client);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(w as u64 + 1);
            let mut lat = Vec::with_capacity(200_000);
            let mut errors = 0usize;
            let mut conn = None;
            loop {
                let started = Instant::now();
                if started >= end {
                    break;
                }
                let i = rng.random_range(0..urls.len());
                let ok = match kind {
                    ClientKind::Raw => {
                        if conn.is_none() {
                            conn = RawConn::connect(&host).await.ok();
                        }
                        match conn.as_mut() {
                            Some(c) => match c.request(&raw_requests[i]).await {
                                Ok(status) => status == 200,
                                Err(_) => {
                                    conn = None;
                                    false
                                }
                            },
                            None => false,
                        }
                    }
                    ClientKind::Reqwest => match client
                        .get(&urls[i])
                        .header("authorization", auth.as_str())
                        .send()
                        .await
                    {
                        Ok(r) => {
                            let ok = r.status() == reqwest::StatusCode::OK;
                            ok && r.bytes().await.is_ok()
                        }
                        Err(_) => false,
                    },
                };
                let done = Instant::now();
                if started >= measure_from && done <= end {
                    if ok {
                        lat.push(done - started);
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        }));
    }
    // CPU accounting over the measured window.
    tokio::time::sleep_until(measure_from.into()).await;
    let me = std::process::id();
    let cpu_start = (server.pid().and_then(cpu_seconds), cpu_seconds(me));
    tokio::time::sleep_until(end.into()).await;
    let cpu_end = (server.pid().and_then(cpu_seconds), cpu_seconds(me));
    let mut all = vec![];
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    server.stop().await?;
    let secs = cli.duration as f64;
    let n = all.len();
    let rps = n as f64 / secs;
    let s = stats(all);
    report.target(
        "(a) filter userName eq, 10k users, c=32: throughput",
        format!("{rps:.0} req/s"),
        ">= 15000 req/s",
        rps >= 15_000.0 && errors == 0,
    );
    report.target(
        "(a) filter latency p99",
        ms(s.p99),
        "< 5 ms",
        s.p99 < Duration::from_millis(5),
    );
    report.info(
        "(a) filter latency p50 / p90 / max",
        format!("{} / {} / {}", ms(s.p50), ms(s.p90), ms(s.max)),
    );
    report.info(
        "(a) filter requests measured / errors",
        format!("{} / {errors}", s.n),
    );
    match (cpu_start, cpu_end) {
        ((Some(a), Some(b)), (Some(c), Some(d))) => report.info(
            "(a) CPU cores used: server / load generator",
            format!("{:.2} / {:.2}", (c - a) / secs, (d - b) / secs),
        ),
        ((None, Some(b)), (None, Some(d))) => report.info(
            "(a) CPU cores used: server + load generator (one process)",
            format!("{:.2}", (d - b) / secs),
        ),
        _ => {}
    }
    Ok(())
}

fn patch_body(user_id: &str) -> String {
    json!({
        "schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
        "Operations": [{"op": "add", "path": "members", "value": [{"value": user_id}]}],
    })
    .to_string()
}

const LARGE_USERS: usize = 100_000;

async fn seed_large(dir: &Path) -> anyhow::Result<Seeded> {
    seed(dir, "large-100k", LARGE_USERS, &[1_000, 50_000], 0).await
}

/// (b) PATCH add-member latency.
async fn bench_members(cli: &Cli, dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("[members] seeding 100,000 users and groups of 1,000 and 50,000 members");
    let seeded = seed_large(dir).await?;
    let client = client(4)?;
    let server = start(cli, &seeded, &client, dir).await?;
    let base = server.base().to_owned();
    let auth = format!("Bearer {}", seeded.token);
    let warm = 20;
    ensure!(
        50_000 + 2 * (warm + cli.patches) < LARGE_USERS,
        "--patches is too large for 100,000 users"
    );
    let mut added: Vec<(String, Vec<String>)> = vec![];
    let mut results = vec![];
    for (k, (size, gid)) in seeded.groups.iter().enumerate() {
        // Users beyond the largest group are in neither; each group gets its own range.
        let from = 50_000 + k * (warm + cli.patches);
        let candidates = &seeded.users[from..from + warm + cli.patches];
        let url = format!("{base}/scim/v2/Groups/{gid}");
        let mut lat = Vec::with_capacity(cli.patches);
        let mut ids = vec![];
        for (j, (uid, _)) in candidates.iter().enumerate() {
            let started = Instant::now();
            let r = client
                .patch(&url)
                .header("authorization", &auth)
                .header("content-type", "application/scim+json")
                .body(patch_body(uid))
                .send()
                .await?;
            let status = r.status();
            let body = r.bytes().await?;
            let took = started.elapsed();
            ensure!(
                status == reqwest::StatusCode::OK,
                "PATCH {url} answered {status}: {}",
                String::from_utf8_lossy(&body)
            );
            ids.push(uid.clone());
            if j >= warm {
                lat.push(took);
            }
        }
        added.push((gid.clone(), ids));
        let s = stats(lat);
        eprintln!(
            "[members] group of {size}: p50 {} p90 {} p99 {}",
            ms(s.p50),
            ms(s.p90),
            ms(s.p99)
        );
        results.push((*size, s));
    }
    server.stop().await?;
    // Check the adds took effect, then put the groups back as seeded (for --data-dir reuse).
    let store = open_store(&seeded.db).await?;
    for ((size, gid), (_, ids)) in seeded.groups.iter().zip(&added) {
        let n = store.member_count(gid).await?;
        ensure!(
            n == size + ids.len(),
            "group of {size} has {n} members after {} adds",
            ids.len()
        );
        let g = store
            .get(ResourceKind::Group, gid, ReadOpts::default())
            .await?
            .context("group vanished")?;
        store
            .update(
                &WriteCtx::cli(),
                ResourceKind::Group,
                gid,
                g.version,
                None,
                &[MembershipChange::Remove(ids.clone())],
            )
            .await?;
    }
    for (size, s) in results {
        report.target(
            &format!("(b) PATCH add member, group of {size}: p50"),
            ms(s.p50),
            "< 5 ms",
            s.p50 < Duration::from_millis(5),
        );
        report.info(
            &format!("(b) group of {size}: p90 / p99 / max (n={})", s.n),
            format!("{} / {} / {}", ms(s.p90), ms(s.p99), ms(s.max)),
        );
    }
    Ok(())
}

/// (c) resident memory of the real server process.
async fn bench_memory(cli: &Cli, dir: &Path, report: &mut Report) -> anyhow::Result<()> {
    eprintln!("[memory] seeding 100,000 users");
    let seeded = seed_large(dir).await?;
    let client = client(4)?;
    let server = start_process(
        &server_bin(cli)?,
        &seeded,
        &client,
        &dir.join("server-memory.log"),
    )
    .await?;
    let pid = server.pid().context("no pid")?;
    let after_start = proc_status_kb(pid, "VmRSS:").unwrap_or(0);
    let base = server.base().to_owned();
    let auth = format!("Bearer {}", seeded.token);
    // A few requests of each common kind.
    let mut rng = StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let (_, name) = &seeded.users[rng.random_range(0..seeded.users.len())];
        let url = format!(
            "{base}/scim/v2/Users?filter={}",
            encode(&format!("userName eq \"{name}\""))
        );
        client
            .get(url)
            .header("authorization", &auth)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
    }
    for path in [
        "/scim/v2/Users?count=100",
        "/scim/v2/Groups?excludedAttributes=members",
        "/scim/v2/ServiceProviderConfig",
    ] {
        client
            .get(format!("{base}{path}"))
            .header("authorization", &auth)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
    }
    let (uid, _) = &seeded.users[0];
    client
        .get(format!("{base}/scim/v2/Users/{uid}"))
        .header("authorization", &auth)
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss = proc_status_kb(pid, "VmRSS:").context("cannot read VmRSS")?;
    let hwm = proc_status_kb(pid, "VmHWM:").unwrap_or(0);
    server.stop().await?;
    let mb = |kb: u64| kb as f64 / 1024.0;
    report.target(
        "(c) teamcity-scim serve RSS, 100k users, idle",
        format!("{:.1} MB", mb(rss)),
        "<= 64 MB",
        rss <= 64 * 1024,
    );
    report.info(
        "(c) RSS after startup / peak (VmHWM)",
        format!("{:.1} MB / {:.1} MB", mb(after_start), mb(hwm)),
    );
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<bool> {
    let tmp;
    let dir = match &cli.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let mut report = Report::default();
    let cmds: &[Cmd] = match cli.command {
        Cmd::All => &[Cmd::Filter, Cmd::Members, Cmd::Memory],
        ref c => std::slice::from_ref(c),
    };
    for c in cmds {
        let r = match c {
            Cmd::Filter => bench_filter(&cli, &dir, &mut report).await,
            Cmd::Members => bench_members(&cli, &dir, &mut report).await,
            Cmd::Memory => bench_memory(&cli, &dir, &mut report).await,
            Cmd::All => unreachable!(),
        };
        r.with_context(|| format!("{c:?} benchmark"))?;
    }
    println!(
        "scim-bench: {} logical CPUs, server {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        match cli.server {
            ServerMode::Process => "= `teamcity-scim serve` process (load generator: this process)",
            ServerMode::InProcess => "= in this process (same runtime as the load generator)",
        }
    );
    report.print();
    Ok(report.all_pass())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.threads.max(1))
        .enable_all()
        .build()
        .expect("tokio runtime");
    let check = cli.check;
    match rt.block_on(run(cli)) {
        Ok(pass) if pass || !check => std::process::ExitCode::SUCCESS,
        Ok(_) => {
            eprintln!("scim-bench: a target was missed");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}
