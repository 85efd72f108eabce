//! Two `serve` replicas on one PostgreSQL database: the lookup cache never answers older than a
//! write committed on the other replica, a token revoked anywhere stops working everywhere
//! within 2 s, concurrent SCIM writes on both lose nothing and reach TeamCity exactly once, the
//! audit trail stays one chain, and a SIGKILLed applying replica's work is finished by the other
//! within the lease.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use store::WriteCtx;

use crate::db_copy::PgDb;
use crate::support::{Env, KillOnDrop, POLICY, free_port, serve, signal, text, wait_up};

struct Replica {
    base: String,
    child: KillOnDrop,
}

async fn get(http: &reqwest::Client, token: &str, url: &str) -> (u16, Value) {
    let r = http.get(url).bearer_auth(token).send().await.expect("GET");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn send(
    http: &reqwest::Client,
    token: &str,
    method: reqwest::Method,
    url: &str,
    body: Value,
) -> (u16, Value) {
    let r = http
        .request(method, url)
        .bearer_auth(token)
        .header("content-type", "application/scim+json")
        .body(body.to_string())
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn filter_url(base: &str, user_name: &str) -> String {
    format!(
        "{base}/Users?filter={}",
        urlencode(&format!("userName eq \"{user_name}\""))
    )
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_on_one_postgresql() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let config = format!(
        "[sync]\nmax_removals = 100000\nmax_removals_percent = 100\nlease = \"3s\"\nmax_backoff = \"1s\"\n{POLICY}"
    );
    // TeamCity calls take a little time, so a pass is still running when a replica dies.
    let mut env = Env::new(&config, Duration::from_millis(30)).await;
    env.db_url = pg.url.clone();
    env.store = store::open(&pg.url, std::sync::Arc::new(store::SystemClock))
        .await
        .expect("store on PostgreSQL");
    let token = server::generate_token(*b"replicas-test-token-0123456789ab");
    let rec = env
        .store
        .create_token(&WriteCtx::cli(), "idp", server::hash_token(&token), None)
        .await
        .expect("token");
    let http = reqwest::Client::new();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let port = free_port();
        let base = format!("http://127.0.0.1:{port}/scim/v2");
        let child = KillOnDrop(serve(&env, port));
        wait_up(&http, &base).await;
        replicas.push(Replica { base, child });
    }
    let (a, b) = (&replicas[0].base, &replicas[1].base);

    // --- The lookup cache across processes: A answers (and caches), B writes, A sees it.
    let url_a = filter_url(a, "cache@example.com");
    let (s, body) = get(&http, &token, &url_a).await;
    assert_eq!((s, body["totalResults"].as_u64()), (200, Some(0)));
    let (s, body) = get(&http, &token, &url_a).await;
    assert_eq!((s, body["totalResults"].as_u64()), (200, Some(0)), "cached");
    let (s, created) = send(
        &http,
        &token,
        reqwest::Method::POST,
        &format!("{b}/Users"),
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
               "userName": "cache@example.com", "displayName": "Before", "active": true}),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let (_, body) = get(&http, &token, &url_a).await;
    assert_eq!(
        body["totalResults"].as_u64(),
        Some(1),
        "A's next lookup sees B's write: {body}"
    );
    // And a change, not only an insert.
    let id = created["id"].as_str().expect("id").to_owned();
    let (s, _) = send(
        &http,
        &token,
        reqwest::Method::PATCH,
        &format!("{b}/Users/{id}"),
        json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
               "Operations": [{"op": "replace", "path": "displayName", "value": "After"}]}),
    )
    .await;
    assert_eq!(s, 200);
    let (_, body) = get(&http, &token, &url_a).await;
    assert_eq!(body["Resources"][0]["displayName"], "After", "{body}");

    // --- Concurrent SCIM writes on both replicas: users, and PATCHes of one group.
    let (s, group) = send(
        &http,
        &token,
        reqwest::Method::POST,
        &format!("{a}/Groups"),
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
               "displayName": "Developers", "externalId": "00g-dev"}),
    )
    .await;
    assert_eq!(s, 201, "{group}");
    let gid = group["id"].as_str().expect("group id").to_owned();
    let n = 24;
    let mut tasks = Vec::new();
    for i in 0..n {
        let base = replicas[i % 2].base.clone();
        let other = replicas[(i + 1) % 2].base.clone();
        let (http, token, gid) = (http.clone(), token.clone(), gid.clone());
        tasks.push(tokio::spawn(async move {
            let (s, u) = send(
                &http,
                &token,
                reqwest::Method::POST,
                &format!("{base}/Users"),
                json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                       "userName": format!("u{i}@example.com"), "active": true}),
            )
            .await;
            assert_eq!(s, 201, "{u}");
            let uid = u["id"].as_str().expect("id").to_owned();
            // The membership PATCH goes to the other replica.
            let (s, body) = send(
                &http,
                &token,
                reqwest::Method::PATCH,
                &format!("{other}/Groups/{gid}"),
                json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                       "Operations": [{"op": "add", "path": "members", "value": [{"value": uid}]}]}),
            )
            .await;
            assert!(s == 200 || s == 204, "{s} {body}");
            uid
        }));
    }
    let mut acknowledged = BTreeSet::new();
    for t in tasks {
        acknowledged.insert(t.await.expect("task"));
    }
    let (_, g) = get(
        &http,
        &token,
        &format!("{b}/Groups/{gid}?attributes=members"),
    )
    .await;
    let members: BTreeSet<String> = g["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| m["value"].as_str().expect("value").to_owned())
        .collect();
    assert_eq!(members, acknowledged, "no member lost");
    for id in &acknowledged {
        let (s, _) = get(&http, &token, &format!("{a}/Users/{id}")).await;
        assert_eq!(s, 200, "every acknowledged user is there");
    }

    // --- TeamCity gets every change, each user created exactly once.
    let expected_users = n + 1;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let snap = env.emu.snapshot();
        let managed = snap
            .users
            .values()
            .filter(|u| u.properties.contains_key(sync::USER_MARKER))
            .count();
        let in_group = snap
            .groups
            .values()
            .find(|g| g.name == "Developers")
            .map_or(0, |g| {
                snap.users
                    .values()
                    .filter(|u| u.groups.contains(&g.key))
                    .count()
            });
        if managed == expected_users && in_group == n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "TeamCity did not converge: {managed} users, {in_group} members; {:?}",
            env.emu.counters()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let counters = env.emu.counters();
    assert_eq!(
        counters.get("POST /app/rest/users").copied().unwrap_or(0),
        expected_users as u64,
        "each user created exactly once: {counters:?}"
    );

    // --- A token revoked on one side stops working on the other within 2 s.
    let out = env.run(&["token", "revoke", &rec.id]).await;
    assert!(out.status.success(), "{:?}", text(&out));
    let revoked = Instant::now();
    loop {
        let (s, _) = get(&http, &token, &format!("{a}/Users?count=1")).await;
        let (t, _) = get(&http, &token, &format!("{b}/Users?count=1")).await;
        if s == 401 && t == 401 {
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(2),
            "still accepted {:?} after the revoke ({s}, {t})",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    eprintln!(
        "revoked token refused by both replicas after {:?}",
        revoked.elapsed()
    );
    let token2 = server::generate_token(*b"replicas-test-token-second-01234");
    env.store
        .create_token(&WriteCtx::cli(), "idp2", server::hash_token(&token2), None)
        .await
        .expect("token");
    let token = token2;

    // --- One audit chain.
    let out = env.run(&["audit", "verify"]).await;
    assert!(out.status.success(), "audit verify: {:?}", text(&out));

    // --- SIGKILL the applying replica mid-pass: the other takes its rows over within the
    // lease and applies each change exactly once.
    let holder: Option<(String,)> = {
        use sqlx::Connection as _;
        let mut c = sqlx::PgConnection::connect(&pg.url).await.expect("connect");
        sqlx::query_as("SELECT holder FROM leases WHERE name = 'sync'")
            .fetch_optional(&mut c)
            .await
            .expect("lease row")
    };
    let holder = holder.expect("someone applies").0;
    let pids: Vec<u32> = replicas.iter().map(|r| r.child.0.id()).collect();
    let victim = pids
        .iter()
        .position(|p| holder.starts_with(&format!("worker-{p}-")))
        .expect("the holder is one of the replicas");
    let survivor = &replicas[1 - victim].base;
    env.emu.reset_counters();
    let m = 12;
    for i in 0..m {
        let (s, body) = send(
            &http,
            &token,
            reqwest::Method::POST,
            &format!("{survivor}/Users"),
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                   "userName": format!("late{i}@example.com"), "active": true}),
        )
        .await;
        assert_eq!(s, 201, "{body}");
    }
    // Kill it once it is applying them.
    let deadline = Instant::now() + Duration::from_secs(20);
    while env
        .emu
        .counters()
        .get("POST /app/rest/users")
        .copied()
        .unwrap_or(0)
        == 0
    {
        assert!(Instant::now() < deadline, "the holder never started");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    signal(pids[victim], "KILL");
    let killed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let snap = env.emu.snapshot();
        let late = snap
            .users
            .values()
            .filter(|u| u.username.starts_with("late"))
            .count();
        if late == m {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the survivor did not finish: {late} of {m}; {:?}",
            env.emu.counters()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "failover: the survivor finished the killed replica's work {:?} after the SIGKILL (lease 3 s)",
        killed.elapsed()
    );
    let counters = env.emu.counters();
    assert_eq!(
        counters.get("POST /app/rest/users").copied().unwrap_or(0),
        m as u64,
        "nothing applied twice: {counters:?}"
    );
    let out = env.run(&["audit", "verify"]).await;
    assert!(out.status.success(), "audit verify: {:?}", text(&out));
    drop(replicas);
}

/// A TCP proxy in front of PostgreSQL that a test can cut (every connection dropped, new ones
/// refused) and restore, so the shared server itself is never restarted.
struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: &'static str) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (c, k) = (cut.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if c.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused
                }
                k.lock().expect("lock").push(tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                }));
            }
        });
        Proxy { port, cut, conns }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for h in self.conns.lock().expect("lock").drain(..) {
            h.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_unreachable_under_load_answers_503_and_loses_nothing_acknowledged() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let proxy = Proxy::start("127.0.0.1:5432").await;
    let proxied = pg
        .url
        .replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", proxy.port), 1);
    assert_ne!(proxied, pg.url, "the test database is on 127.0.0.1:5432");
    let mut env = Env::new(POLICY, Duration::ZERO).await;
    env.store = store::open(&pg.url, std::sync::Arc::new(store::SystemClock))
        .await
        .expect("store on PostgreSQL");
    env.db_url = proxied;
    let token = server::generate_token(*b"outage-test-token-0123456789abcd");
    env.store
        .create_token(&WriteCtx::cli(), "idp", server::hash_token(&token), None)
        .await
        .expect("token");
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/scim/v2");
    let _serve = KillOnDrop(serve(&env, port));
    wait_up(&http, &base).await;

    // Load from four clients; every 201 is remembered.
    let acknowledged = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let statuses = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (http, token, base) = (http.clone(), token.clone(), base.clone());
        let (ack, st, stop) = (acknowledged.clone(), statuses.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let name = format!("c{c}-{i}@example.com");
                i += 1;
                let (s, body) = send(
                    &http,
                    &token,
                    reqwest::Method::POST,
                    &format!("{base}/Users"),
                    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
                           "userName": name, "active": true}),
                )
                .await;
                match s {
                    201 => {
                        ack.lock().expect("lock").insert(name);
                    }
                    503 => {
                        assert_eq!(
                            body["schemas"][0], "urn:ietf:params:scim:api:messages:2.0:Error",
                            "a SCIM error body: {body}"
                        );
                        assert_eq!(body["status"], "503", "{body}");
                    }
                    other => panic!("neither 201 nor 503 but {other}: {body}"),
                }
                st.lock().expect("lock").push(s);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(12)).await;
    proxy.restore();
    let restored = Instant::now();
    // Writes are accepted again.
    loop {
        let after = acknowledged.lock().expect("lock").len();
        tokio::time::sleep(Duration::from_millis(300)).await;
        if acknowledged.lock().expect("lock").len() > after {
            break;
        }
        assert!(
            restored.elapsed() < Duration::from_secs(30),
            "writes did not come back after the database did"
        );
    }
    eprintln!(
        "writes accepted again {:?} after the database came back",
        restored.elapsed()
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for c in clients {
        c.await.expect("client");
    }
    let statuses = statuses.lock().expect("lock").clone();
    let unavailable = statuses.iter().filter(|s| **s == 503).count();
    assert!(unavailable > 0, "the outage was seen: {statuses:?}");
    // Everything acknowledged is stored.
    let page = env
        .store
        .list(
            scim::ResourceKind::User,
            &store::ListQuery {
                count: 100_000,
                ..store::ListQuery::default()
            },
        )
        .await
        .expect("list");
    let stored: BTreeSet<String> = page
        .resources
        .iter()
        .map(|r| r.attrs["userName"].as_str().expect("userName").to_owned())
        .collect();
    let acknowledged = acknowledged.lock().expect("lock").clone();
    assert!(
        acknowledged.is_subset(&stored),
        "acknowledged but missing: {:?}",
        acknowledged.difference(&stored).collect::<Vec<_>>()
    );
    eprintln!(
        "{} acknowledged, {unavailable} answered 503 during the outage, all acknowledged stored",
        acknowledged.len()
    );
    let out = env.run(&["audit", "verify"]).await;
    assert!(out.status.success(), "audit verify: {:?}", text(&out));
}
