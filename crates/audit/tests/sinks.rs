//! Streaming sinks against real receivers started here: a TCP syslog listener, a TLS one, an HTTP
//! webhook receiver and files rotated by logrotate's two modes. Every event arrives in `seq`
//! order with no gap; a receiver that is down (with the bridge restarted meanwhile) gets
//! everything once it is back; a stalled sink slows neither writes nor the other sinks.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit::{SinkConfig, SinkKind};
use serde_json::{Value, json};
use store::{DynStore, WriteCtx};
use tokio::io::AsyncReadExt as _;
use tokio::net::TcpListener;

struct Db {
    store: DynStore,
    _dir: tempfile::TempDir,
}

async fn db() -> Db {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}/a.db", dir.path().display());
    let store = store::open(&url, Arc::new(store::SystemClock))
        .await
        .expect("store");
    Db { store, _dir: dir }
}

/// `n` SCIM writes (one audit event each).
async fn writes(store: &DynStore, from: usize, n: usize) {
    for i in from..from + n {
        store
            .create(
                &WriteCtx::cli(),
                scim::ResourceKind::User,
                json!({"userName": format!("user{i}"), "active": true}),
                None,
            )
            .await
            .expect("write");
    }
}

async fn head(store: &DynStore) -> i64 {
    store.audit_recent(None, 1).await.expect("head")[0].seq
}

fn sink(kind: SinkKind) -> SinkConfig {
    SinkConfig {
        kind,
        name: None,
        address: None,
        tls: false,
        ca_file: None,
        url: None,
        secret_file: None,
        path: None,
    }
}

/// What a receiver got, in arrival order.
type Got = Arc<Mutex<Vec<Value>>>;

/// Every seq from 1 to `n` arrived, in order, each event linked to the one before it (the
/// receiver can check the chain itself); repeats (at-least-once) are allowed only as whole
/// runs sent again. Returns how many events arrived more than once.
fn check_complete(got: &[Value], n: i64) -> usize {
    let mut by_seq: BTreeMap<i64, usize> = BTreeMap::new();
    for v in got {
        *by_seq.entry(v["seq"].as_i64().expect("seq")).or_default() += 1;
    }
    let seqs: Vec<i64> = by_seq.keys().copied().collect();
    assert_eq!(seqs, (1..=n).collect::<Vec<_>>(), "every event, no gap");
    let mut prev: Option<&Value> = None;
    for v in got {
        if let Some(p) = prev {
            let (a, b) = (p["seq"].as_i64().unwrap(), v["seq"].as_i64().unwrap());
            assert!(b == a + 1 || b <= a, "out of order: {a} then {b}");
            if b == a + 1 {
                assert_eq!(v["prev_hash"], p["hash"], "the chain links {a} → {b}");
            }
        }
        prev = Some(v);
    }
    by_seq.values().filter(|c| **c > 1).count()
}

async fn eventually(what: &str, secs: u64, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Parses octet-counted RFC 5424 frames from `r` into `got` until the stream ends.
async fn read_frames(mut r: impl tokio::io::AsyncRead + Unpin, got: Got) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let n = match r.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        while let Some(sp) = buf.iter().position(|b| *b == b' ') {
            let len: usize = std::str::from_utf8(&buf[..sp])
                .expect("len")
                .parse()
                .expect("len");
            if buf.len() < sp + 1 + len {
                break;
            }
            let msg = String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).expect("utf-8");
            assert!(
                msg.starts_with("<109>1 ") || msg.starts_with("<108>1 "),
                "{msg}"
            );
            let json = msg.split_once('\u{feff}').expect("BOM").1;
            let v: Value = serde_json::from_str(json).expect("json");
            let sd = format!(
                "seq=\"{}\" hash=\"{}\"",
                v["seq"],
                v["hash"].as_str().unwrap()
            );
            assert!(
                msg.contains(&sd),
                "structured data carries seq and hash: {msg}"
            );
            got.lock().unwrap().push(v);
            buf.drain(..sp + 1 + len);
        }
    }
}

/// A plain TCP syslog receiver on `listener`: one connection at a time.
fn syslog_receiver(listener: TcpListener, got: Got) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            read_frames(s, got.clone()).await;
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syslog_gets_every_event_in_order_and_catches_up_after_an_outage_and_a_restart() {
    let d = db().await;
    writes(&d.store, 0, 5).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let got: Got = Arc::default();
    let receiver = syslog_receiver(listener, got.clone());
    let cfg = SinkConfig {
        address: Some(addr.to_string()),
        ..sink(SinkKind::Syslog)
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let tasks =
        audit::sinks::spawn(d.store.clone(), std::slice::from_ref(&cfg), rx).expect("spawn");
    eventually("the first 5 events", 10, || got.lock().unwrap().len() >= 5).await;

    // The receiver goes away; writes go on; the bridge is restarted while it is away.
    receiver.abort();
    let _ = receiver.await;
    writes(&d.store, 5, 5).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.send(true).expect("stop");
    for t in tasks {
        t.await.expect("sink task");
    }
    writes(&d.store, 10, 3).await;
    let n = head(&d.store).await;
    assert_eq!(n, 13);
    assert!(
        audit::sinks::position(&*d.store, &cfg.name())
            .await
            .expect("pos")
            < n,
        "the outage kept events pending"
    );

    // Back on the same address; a new process picks up from the stored position.
    let listener = TcpListener::bind(addr).await.expect("rebind");
    let receiver = syslog_receiver(listener, got.clone());
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let tasks =
        audit::sinks::spawn(d.store.clone(), std::slice::from_ref(&cfg), rx).expect("spawn");
    eventually("all 13 events", 20, || {
        got.lock().unwrap().iter().any(|v| v["seq"] == 13)
    })
    .await;
    let repeats = check_complete(&got.lock().unwrap(), n);
    assert_eq!(repeats, 0, "nothing was written into the closed connection");
    assert_eq!(
        audit::sinks::position(&*d.store, &cfg.name())
            .await
            .expect("pos"),
        n
    );
    receiver.abort();
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn syslog_over_tls_checks_the_receiver_certificate() {
    let d = db().await;
    writes(&d.store, 0, 4).await;
    let dir = tempfile::tempdir().expect("dir");
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ck.cert.pem()).expect("ca");
    let server = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(
            vec![ck.cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into()),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let got: Got = Arc::default();
    let g = got.clone();
    let receiver = tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            if let Ok(tls) = acceptor.accept(s).await {
                read_frames(tls, g.clone()).await;
            }
        }
    });
    // Without the CA the certificate is refused: nothing is delivered.
    let untrusted = SinkConfig {
        name: Some("untrusted".into()),
        address: Some(format!("localhost:{port}")),
        tls: true,
        ..sink(SinkKind::Syslog)
    };
    let trusted = SinkConfig {
        name: Some("trusted".into()),
        ca_file: Some(ca),
        ..untrusted.clone()
    };
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let tasks = audit::sinks::spawn(d.store.clone(), &[untrusted, trusted], rx).expect("spawn");
    eventually("4 events over TLS", 10, || got.lock().unwrap().len() >= 4).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(check_complete(&got.lock().unwrap(), 4), 0);
    assert_eq!(
        audit::sinks::position(&*d.store, "trusted").await.unwrap(),
        4
    );
    assert_eq!(
        audit::sinks::position(&*d.store, "untrusted")
            .await
            .unwrap(),
        0,
        "a receiver whose certificate is not trusted gets nothing"
    );
    receiver.abort();
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_answering_500_gets_each_batch_again_signed_and_nothing_lost() {
    use axum::body::Bytes;
    use axum::http::{HeaderMap, StatusCode};

    let d = db().await;
    writes(&d.store, 0, 6).await;
    let dir = tempfile::tempdir().expect("dir");
    let secret = dir.path().join("key");
    std::fs::write(&secret, "webhook-secret\n").expect("key");
    let got: Got = Arc::default();
    let calls = Arc::new(Mutex::new(0u32));
    let (g, c) = (got.clone(), calls.clone());
    let app = axum::Router::new().route(
        "/ingest",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (g, c) = (g.clone(), c.clone());
            async move {
                let sig = headers[audit::sinks::SIGNATURE_HEADER]
                    .to_str()
                    .unwrap()
                    .to_owned();
                assert_eq!(
                    sig,
                    audit::sinks::signature(b"webhook-secret", &body),
                    "signed body"
                );
                let n = {
                    let mut c = c.lock().unwrap();
                    *c += 1;
                    *c
                };
                let lines: Vec<Value> = std::str::from_utf8(&body)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).expect("json line"))
                    .collect();
                assert_eq!(
                    headers["X-TeamCity-SCIM-First-Seq"].to_str().unwrap(),
                    lines[0]["seq"].to_string()
                );
                match n {
                    // Stored, then failed to acknowledge: the batch comes again (at least once).
                    1 => {
                        g.lock().unwrap().extend(lines);
                        StatusCode::INTERNAL_SERVER_ERROR
                    }
                    2 => StatusCode::INTERNAL_SERVER_ERROR,
                    _ => {
                        g.lock().unwrap().extend(lines);
                        StatusCode::OK
                    }
                }
            }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let cfg = SinkConfig {
        url: Some(format!("http://{addr}/ingest")),
        secret_file: Some(secret),
        ..sink(SinkKind::Webhook)
    };
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let tasks = audit::sinks::spawn(d.store.clone(), &[cfg], rx).expect("spawn");
    eventually("6 events acknowledged", 15, || {
        got.lock().unwrap().iter().filter(|v| v["seq"] == 6).count() == 2
    })
    .await;
    writes(&d.store, 6, 2).await;
    eventually("2 more", 10, || {
        got.lock().unwrap().iter().any(|v| v["seq"] == 8)
    })
    .await;
    let repeats = check_complete(&got.lock().unwrap(), 8);
    assert_eq!(
        repeats, 6,
        "exactly the batch answered 500 after it was stored came twice"
    );
    server.abort();
    for t in tasks {
        t.abort();
    }
}

fn file_seqs(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_file_sink_survives_logrotate_create_and_copytruncate() {
    let d = db().await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("audit.jsonl");
    let cfg = SinkConfig {
        path: Some(path.clone()),
        ..sink(SinkKind::File)
    };
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let tasks = audit::sinks::spawn(d.store.clone(), &[cfg], rx).expect("spawn");
    writes(&d.store, 0, 3).await;
    eventually("3 lines", 10, || file_seqs(&path).len() == 3).await;
    // create mode: the file is renamed, the next batch creates a new one.
    std::fs::rename(&path, dir.path().join("audit.jsonl.1")).expect("rename");
    writes(&d.store, 3, 3).await;
    eventually("3 lines in the new file", 10, || {
        file_seqs(&path).len() == 3
    })
    .await;
    // copytruncate mode: copied, then truncated in place.
    std::fs::copy(&path, dir.path().join("audit.jsonl.2")).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open")
        .set_len(0)
        .expect("truncate");
    writes(&d.store, 6, 2).await;
    eventually("2 lines after the truncation", 10, || {
        file_seqs(&path).len() == 2
    })
    .await;
    let mut all = file_seqs(&dir.path().join("audit.jsonl.1"));
    all.extend(file_seqs(&dir.path().join("audit.jsonl.2")));
    all.extend(file_seqs(&path));
    assert_eq!(check_complete(&all, 8), 0);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the trail is not world-readable");
    }
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_sink_slows_neither_writes_nor_the_other_sinks() {
    const N: usize = 200;
    // Baseline: N writes with no sink.
    let base = db().await;
    let t = Instant::now();
    writes(&base.store, 0, N).await;
    let baseline = t.elapsed();

    // A webhook that accepts connections and never answers, beside a file sink.
    let d = db().await;
    let stalled = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = stalled.local_addr().expect("addr");
    let hold = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((s, _)) = stalled.accept().await {
            open.push(s);
        }
    });
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(dir.path().join("key"), "k").expect("key");
    let path = dir.path().join("audit.jsonl");
    let sinks = [
        SinkConfig {
            url: Some(format!("http://{addr}/never")),
            secret_file: Some(dir.path().join("key")),
            ..sink(SinkKind::Webhook)
        },
        SinkConfig {
            path: Some(path.clone()),
            ..sink(SinkKind::File)
        },
    ];
    let (_stop, rx) = tokio::sync::watch::channel(false);
    let tasks = audit::sinks::spawn(d.store.clone(), &sinks, rx).expect("spawn");
    writes(&d.store, 0, 1).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let t = Instant::now();
    writes(&d.store, 1, N).await;
    let with_stalled = t.elapsed();
    eventually("the file sink got everything", 10, || {
        file_seqs(&path).len() == N + 1
    })
    .await;
    assert_eq!(
        audit::sinks::position(&*d.store, &sinks[0].name())
            .await
            .unwrap(),
        0,
        "the webhook is stalled, its position has not moved"
    );
    println!(
        "{N} SCIM writes: {:?} without sinks, {:?} with a stalled webhook and a file sink (ratio {:.2})",
        baseline,
        with_stalled,
        with_stalled.as_secs_f64() / baseline.as_secs_f64()
    );
    assert!(
        with_stalled < baseline * 2 + Duration::from_millis(300),
        "a stalled sink slowed writes: {baseline:?} → {with_stalled:?}"
    );
    hold.abort();
    for t in tasks {
        t.abort();
    }
}
