//! Abuse resistance and TLS over real connections: per-token rate limits, the failed-auth
//! limit per peer, request and header-read timeouts, filter and page-size limits, and HTTPS
//! with a certificate reloaded from its files.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};
use server::tls::{ReloadingCert, TlsFiles};
use server::{AppState, Limits, RateLimitConfig, RateLimiter, ServeOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::support::{BULK_REQUEST, Resp, Server, enc, random_bytes, user};

/// A server with custom state and serve options; the first token is returned.
struct Custom {
    addr: SocketAddr,
    store: store::DynStore,
    token: String,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl Custom {
    async fn start(configure: impl FnOnce(&mut AppState), options: ServeOptions) -> Custom {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let store = store::open(&url, Arc::new(store::SystemClock))
            .await
            .expect("open store");
        let token = server::generate_token(random_bytes());
        store
            .create_token(
                &store::WriteCtx::cli(),
                "t1",
                server::hash_token(&token),
                None,
            )
            .await
            .expect("token");
        let mut state = AppState::new(store.clone());
        configure(&mut state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(server::serve_with(listener, state, options, async move {
            let _ = rx.await;
        }));
        Custom {
            addr,
            store,
            token,
            _stop: tx,
            _dir: dir,
        }
    }

    async fn new_token(&self) -> String {
        let secret = server::generate_token(random_bytes());
        self.store
            .create_token(
                &store::WriteCtx::cli(),
                "t2",
                server::hash_token(&secret),
                None,
            )
            .await
            .expect("token");
        secret
    }

    async fn get(&self, path: &str, token: Option<&str>) -> Resp {
        let mut rb = reqwest::Client::new()
            .request(Method::GET, format!("http://{}/scim/v2{path}", self.addr));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        read(rb.send().await.expect("request")).await
    }
}

async fn read(r: reqwest::Response) -> Resp {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Resp {
        status,
        headers,
        text,
        body,
    }
}

fn limits(config: RateLimitConfig) -> impl FnOnce(&mut AppState) {
    move |s: &mut AppState| s.rate_limiter = RateLimiter::new(config)
}

#[tokio::test]
async fn per_token_rate_limit_is_429_with_retry_after() {
    let s = Custom::start(
        limits(RateLimitConfig {
            per_second: 1,
            burst: 3,
            ..RateLimitConfig::OFF
        }),
        ServeOptions::default(),
    )
    .await;
    for _ in 0..3 {
        s.get("/Users", Some(&s.token)).await.expect(200);
    }
    let r = s.get("/Users", Some(&s.token)).await;
    r.expect_error(429, None);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("Retry-After is whole seconds");
    assert!((1..=2).contains(&retry), "Retry-After {retry}");
    assert!(r.detail().contains("retry after"), "{}", r.text);
    // Another token has its own budget.
    let other = s.new_token().await;
    for _ in 0..3 {
        s.get("/Users", Some(&other)).await.expect(200);
    }
    // Unauthenticated requests are not charged to any token: still 401, not 429.
    s.get("/Users", None).await.expect_error(401, None);
    // The budget comes back at the sustained rate.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    s.get("/Users", Some(&s.token)).await.expect(200);
}

#[tokio::test]
async fn rate_limit_zero_is_off() {
    let s = Custom::start(
        limits(RateLimitConfig {
            per_second: 0,
            burst: 0,
            auth_failures_per_minute: 0,
            trust_forwarded_for: false,
        }),
        ServeOptions::default(),
    )
    .await;
    for _ in 0..60 {
        s.get("/ServiceProviderConfig", Some(&s.token))
            .await
            .expect(200);
    }
    for _ in 0..20 {
        s.get("/Users", Some("tcscim_wrong"))
            .await
            .expect_error(401, None);
    }
}

#[tokio::test]
async fn failed_authentication_blocks_the_peer() {
    let s = Custom::start(
        limits(RateLimitConfig {
            auth_failures_per_minute: 3,
            ..RateLimitConfig::OFF
        }),
        ServeOptions::default(),
    )
    .await;
    s.get("/Users", Some(&s.token)).await.expect(200);
    for _ in 0..3 {
        s.get("/Users", Some("tcscim_guess"))
            .await
            .expect_error(401, None);
    }
    let r = s.get("/Users", Some("tcscim_guess")).await;
    r.expect_error(429, None);
    let retry: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .expect("secs");
    assert!((1..=20).contains(&retry), "Retry-After {retry}");
    // While blocked, even a correct token from this address is not looked at, so a guess
    // that happens to be right is not revealed by its status.
    s.get("/Users", Some(&s.token))
        .await
        .expect_error(429, None);
    // Health endpoints are outside the SCIM base and stay reachable.
    let h = reqwest::get(format!("http://{}/healthz", s.addr))
        .await
        .expect("healthz");
    assert_eq!(h.status(), 200);
}

#[tokio::test]
async fn forwarded_for_is_trusted_only_when_configured() {
    // Trusted: each forwarded client address has its own failure budget.
    let s = Custom::start(
        limits(RateLimitConfig {
            auth_failures_per_minute: 1,
            trust_forwarded_for: true,
            ..RateLimitConfig::OFF
        }),
        ServeOptions::default(),
    )
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://{}/scim/v2/Users", s.addr);
    let send = |xff: &'static str| {
        client
            .get(&url)
            .bearer_auth("tcscim_guess")
            .header("x-forwarded-for", xff)
            .send()
    };
    assert_eq!(send("203.0.113.1").await.expect("send").status(), 401);
    assert_eq!(send("203.0.113.1").await.expect("send").status(), 429);
    assert_eq!(send("203.0.113.2").await.expect("send").status(), 401);
    // Only the last entry (appended by our proxy) counts; a client-chosen first entry does not.
    assert_eq!(
        send("198.51.100.7, 203.0.113.1")
            .await
            .expect("send")
            .status(),
        429
    );

    // Not trusted: the header is ignored, the socket peer is the key.
    let s = Custom::start(
        limits(RateLimitConfig {
            auth_failures_per_minute: 1,
            ..RateLimitConfig::OFF
        }),
        ServeOptions::default(),
    )
    .await;
    let url = format!("http://{}/scim/v2/Users", s.addr);
    let send = |xff: &'static str| {
        client
            .get(&url)
            .bearer_auth("tcscim_guess")
            .header("x-forwarded-for", xff)
            .send()
    };
    assert_eq!(send("203.0.113.1").await.expect("send").status(), 401);
    assert_eq!(send("203.0.113.2").await.expect("send").status(), 429);
}

/// Reads until EOF or `limit`; returns what was read and whether EOF came.
async fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (String::from_utf8_lossy(&out).into_owned(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into_owned(), false),
        }
    }
}

#[tokio::test]
async fn slow_headers_are_disconnected() {
    let s = Custom::start(
        |_| {},
        ServeOptions {
            header_read_timeout: Duration::from_millis(400),
            ..ServeOptions::default()
        },
    )
    .await;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    let start = Instant::now();
    stream
        .write_all(b"GET /scim/v2/Users HT")
        .await
        .expect("write");
    let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    let took = start.elapsed();
    assert!(closed, "the server kept a half-sent request open: {text:?}");
    assert!(
        took >= Duration::from_millis(300),
        "closed before the header timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(4), "closed only after {took:?}");
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "unexpected answer: {text:?}"
    );
    // A client that connects and sends nothing, or stalls inside the HTTP/2 preface (before
    // hyper's own header timer runs), is cut off the same way.
    for sent in [&b""[..], &b"PRI * HTTP/2.0\r\n"[..]] {
        let mut stream = TcpStream::connect(s.addr).await.expect("connect");
        let start = Instant::now();
        stream.write_all(sent).await.expect("write");
        let (text, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
        let took = start.elapsed();
        assert!(
            closed,
            "an idle connection was kept open ({sent:?}): {text:?}"
        );
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
    }
    // A prompt client on a fresh connection is served.
    s.get("/Users", Some(&s.token)).await.expect(200);
}

#[tokio::test]
async fn slow_body_hits_the_request_timeout() {
    let s = Custom::start(
        |st| {
            st.limits = Limits {
                request_timeout: Some(Duration::from_millis(500)),
                ..Limits::default()
            }
        },
        ServeOptions::default(),
    )
    .await;
    let mut stream = TcpStream::connect(s.addr).await.expect("connect");
    let head = format!(
        "POST /scim/v2/Users HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/scim+json\r\nContent-Length: 500\r\n\r\n{{\"userName\":",
        s.addr, s.token
    );
    let start = Instant::now();
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 8192];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("an answer before 5 s")
        .expect("read");
    let took = start.elapsed();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    assert!(
        text.to_ascii_lowercase()
            .contains("content-type: application/scim+json"),
        "{text}"
    );
    assert!(
        text.contains("urn:ietf:params:scim:api:messages:2.0:Error"),
        "{text}"
    );
    assert!(text.contains("request_timeout"), "{text}");
    assert!(took >= Duration::from_millis(450), "{took:?}");
    // Nothing was created.
    let r = s.get("/Users", Some(&s.token)).await;
    assert_eq!(r.body["totalResults"], json!(0));
}

#[tokio::test]
async fn filter_length_and_depth_limits_are_400() {
    let s = Server::start().await;
    let long = format!(
        "userName eq \"{}\"",
        "a".repeat(scim::filter::MAX_FILTER_LEN)
    );
    let r = s.get(&format!("/Users?filter={}", enc(&long))).await;
    r.expect_error(400, Some("invalidFilter"));
    let r = s.post("/Users/.search", &json!({"filter": long})).await;
    r.expect_error(400, Some("invalidFilter"));

    let depth = scim::filter::MAX_FILTER_DEPTH + 1;
    let deep = format!(
        "{}userName eq \"a\"{}",
        "(".repeat(depth),
        ")".repeat(depth)
    );
    let r = s.get(&format!("/Users?filter={}", enc(&deep))).await;
    r.expect_error(400, Some("invalidFilter"));
    let nots = format!(
        "{}(userName eq \"a\"){}",
        "not (".repeat(depth),
        ")".repeat(depth)
    );
    s.get(&format!("/Users?filter={}", enc(&nots)))
        .await
        .expect_error(400, Some("invalidFilter"));
    // Just inside the limits is fine.
    let ok_depth = scim::filter::MAX_FILTER_DEPTH - 1;
    let ok = format!(
        "{}userName eq \"a\"{}",
        "(".repeat(ok_depth),
        ")".repeat(ok_depth)
    );
    s.get(&format!("/Users?filter={}", enc(&ok)))
        .await
        .expect(200);
}

#[tokio::test]
async fn count_is_capped_at_the_advertised_max_results() {
    let s = Server::start().await;
    let max = s.get("/ServiceProviderConfig").await.body["filter"]["maxResults"]
        .as_u64()
        .expect("maxResults") as usize;
    assert_eq!(max, scim::list::MAX_PAGE_SIZE);
    // Seed max + 2 users through Bulk, in batches within bulk.maxOperations.
    let total = max + 2;
    let mut created = 0;
    while created < total {
        let n = (total - created).min(500);
        let ops: Vec<Value> = (created..created + n)
            .map(|i| {
                json!({"method": "POST", "path": "/Users", "bulkId": format!("u{i}"),
                       "data": user(&format!("cap{i}@x.example"))})
            })
            .collect();
        let r = s
            .post(
                "/Bulk",
                &json!({"schemas": [BULK_REQUEST], "Operations": ops}),
            )
            .await;
        r.expect(200);
        created += n;
    }
    let r = s.get("/Users?count=100000&attributes=userName").await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(total));
    assert_eq!(r.body["itemsPerPage"], json!(max));
    assert_eq!(r.resources().len(), max);
    let r = s
        .post(
            "/Users/.search",
            &json!({"count": 100000, "attributes": ["userName"]}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.resources().len(), max);
    // The rest is on the next page.
    let r = s
        .get(&format!(
            "/Users?startIndex={}&count=100000&attributes=userName",
            max + 1
        ))
        .await;
    assert_eq!(r.resources().len(), 2);
}

fn write_cert(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, String) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let pem = ck.cert.pem();
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    std::fs::write(&cert, &pem).expect("write cert");
    std::fs::write(&key, ck.signing_key.serialize_pem()).expect("write key");
    (cert, key, pem)
}

/// A client that trusts only `pem`, with `localhost` resolving to `addr`.
fn trusting(pem: &str, addr: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(pem.as_bytes()).expect("pem")])
        .resolve("localhost", addr)
        .build()
        .expect("client")
}

#[tokio::test]
async fn https_serves_and_reloads_the_certificate() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = tempfile::tempdir().expect("tempdir");
    let (cert_a, key_a, pem_a) = write_cert(certs.path(), "a");
    let files = TlsFiles {
        cert_file: certs.path().join("tls.crt"),
        key_file: certs.path().join("tls.key"),
        reload_interval: Duration::from_millis(100),
    };
    std::fs::copy(&cert_a, &files.cert_file).expect("copy");
    std::fs::copy(&key_a, &files.key_file).expect("copy");
    let cert = ReloadingCert::load(files.clone()).expect("load");
    let s = Custom::start(
        |_| {},
        ServeOptions {
            tls: Some(cert),
            ..ServeOptions::default()
        },
    )
    .await;
    let url = format!("https://localhost:{}/scim/v2/Users", s.addr.port());
    let a = trusting(&pem_a, s.addr);
    let r = read(
        a.get(&url)
            .bearer_auth(&s.token)
            .send()
            .await
            .expect("https"),
    )
    .await;
    r.expect(200);
    // Plain HTTP on the TLS port gets nowhere.
    assert!(
        reqwest::get(format!("http://{}/healthz", s.addr))
            .await
            .is_err()
    );

    // A broken file is not taken: the old certificate stays in service.
    std::fs::write(
        &files.cert_file,
        b"-----BEGIN CERTIFICATE-----\nnot base64\n",
    )
    .expect("write");
    tokio::time::sleep(Duration::from_millis(400)).await;
    read(
        a.get(&url)
            .bearer_auth(&s.token)
            .send()
            .await
            .expect("old cert still served"),
    )
    .await
    .expect(200);

    // Rotate to B (cert then key, as a careless operator would): B is served after reload.
    let (cert_b, key_b, pem_b) = write_cert(certs.path(), "b");
    std::fs::copy(&cert_b, &files.cert_file).expect("copy");
    std::fs::copy(&key_b, &files.key_file).expect("copy");
    let b = trusting(&pem_b, s.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // A fresh client each time: no pooled connection from before the swap.
        let fresh = trusting(&pem_b, s.addr);
        if let Ok(r) = fresh.get(&url).bearer_auth(&s.token).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    read(b.get(&url).bearer_auth(&s.token).send().await.expect("B"))
        .await
        .expect(200);
    // A new connection trusting only A is refused now.
    let a_fresh = trusting(&pem_a, s.addr);
    let err = a_fresh
        .get(&url)
        .bearer_auth(&s.token)
        .send()
        .await
        .expect_err("A is no longer served");
    assert!(err.is_connect() || err.is_request(), "{err:?}");
}

#[test]
fn tls_load_errors_name_the_file() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, _key, _) = write_cert(dir.path(), "a");
    let (_, other_key, _) = write_cert(dir.path(), "b");
    let missing = TlsFiles {
        cert_file: dir.path().join("nope.crt"),
        key_file: dir.path().join("nope.key"),
        reload_interval: Duration::from_secs(5),
    };
    let e = ReloadingCert::load(missing)
        .expect_err("missing")
        .to_string();
    assert!(e.contains("nope.crt"), "{e}");
    let mismatched = TlsFiles {
        cert_file: cert,
        key_file: other_key,
        reload_interval: Duration::from_secs(5),
    };
    let e = ReloadingCert::load(mismatched)
        .expect_err("mismatch")
        .to_string();
    assert!(e.contains("a.crt") && e.contains("b.key"), "{e}");
}

#[tokio::test]
async fn pull_mode_refuses_scim_writes_with_405_and_keeps_reads() {
    let s = Custom::start(
        |st: &mut AppState| {
            st.read_only = Some(Arc::from(
                "the directory is pulled from Microsoft Graph (source.kind = \"graph\")",
            ))
        },
        ServeOptions::default(),
    )
    .await;
    let ctx = store::WriteCtx::cli();
    let stored = s
        .store
        .create(&ctx, scim::ResourceKind::User, user("ann"), None)
        .await
        .expect("stored by the puller");
    let http = reqwest::Client::new();
    let url = |p: &str| format!("http://{}/scim/v2{p}", s.addr);
    let id = stored.id.as_str();
    let writes: Vec<(Method, String, Value)> = vec![
        (Method::POST, url("/Users"), user("bob")),
        (Method::PUT, url(&format!("/Users/{id}")), user("ann")),
        (
            Method::PATCH,
            url(&format!("/Users/{id}")),
            json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                   "Operations": [{"op": "replace", "path": "active", "value": false}]}),
        ),
        (Method::DELETE, url(&format!("/Users/{id}")), Value::Null),
        (
            Method::POST,
            url("/Groups"),
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "G"}),
        ),
        (
            Method::POST,
            url("/Bulk"),
            json!({"schemas": [BULK_REQUEST], "Operations": [
                {"method": "POST", "path": "/Users", "bulkId": "b1", "data": user("carl")}]}),
        ),
    ];
    for (method, u, body) in writes {
        let mut rb = http.request(method.clone(), &u).bearer_auth(&s.token);
        if !body.is_null() {
            rb = rb
                .header("content-type", "application/scim+json")
                .body(body.to_string());
        }
        let r = read(rb.send().await.expect("request")).await;
        assert_eq!(r.status, 405, "{method} {u}: {}", r.text);
        assert_eq!(r.body["status"], "405", "{method} {u}: a SCIM error body");
        assert!(
            r.body["detail"]
                .as_str()
                .unwrap_or("")
                .contains("Microsoft Graph"),
            "{method} {u}: says where the directory comes from: {}",
            r.text
        );
        assert_eq!(r.headers["allow"], "GET");
    }
    // Nothing changed; reads and searches work; without a token it is still 401.
    s.get(&format!("/Users/{id}"), Some(&s.token))
        .await
        .expect(200);
    let r = read(
        http.post(url("/Users/.search"))
            .bearer_auth(&s.token)
            .header("content-type", "application/scim+json")
            .body(json!({"schemas": ["urn:ietf:params:scim:api:messages:2.0:SearchRequest"], "filter": "userName eq \"ann\""}).to_string())
            .send()
            .await
            .expect("search"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["totalResults"], 1);
    let r = read(
        http.post(url("/Users"))
            .body("{}")
            .send()
            .await
            .expect("anon"),
    )
    .await;
    assert_eq!(r.status, 401);
    let dir = s.store.directory().await.expect("directory");
    assert_eq!(dir.users.len(), 1, "no write reached the store");
    assert!(dir.users[0].active);
    assert!(dir.groups.is_empty());
}
