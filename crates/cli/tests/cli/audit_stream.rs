//! `serve` with a file sink and a signing key: every event streamed, a head signed at clean
//! shutdown and streamed too, and `audit verify --public-key` checks it.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Env, KillOnDrop, POLICY, free_port, serve, signal, text, wait_up};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_streams_every_event_and_signs_the_head_at_shutdown() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let key = env.dir.path().join("audit-signing.pem");
    let out = env
        .run(&["audit", "keygen", "--output", key.to_str().expect("path")])
        .await;
    assert!(out.status.success(), "{:?}", text(&out));
    let stream = env.dir.path().join("audit.jsonl");
    std::fs::write(
        &env.config,
        format!(
            "[audit]\nsigning_key_file = {key:?}\nhead_interval = \"1h\"\n\
             [[audit.sinks]]\nkind = \"file\"\npath = {stream:?}\n{POLICY}"
        ),
    )
    .expect("config");
    let ann = env.user("ann").await;
    env.group("Developers", "00g-dev", &[&ann]).await;

    let port = free_port();
    let child = KillOnDrop(serve(&env, port));
    let http = reqwest::Client::new();
    wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;
    // Wait until the sync engine created ann in TeamCity and the file holds that event.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let text = std::fs::read_to_string(&stream).unwrap_or_default();
        if text.contains("\"create_user\"") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the file sink got no TeamCity event: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut child = child;
    signal(child.0.id(), "TERM");
    let status = child.0.wait().expect("wait");
    assert!(status.success(), "{status:?}");

    let lines: Vec<Value> = std::fs::read_to_string(&stream)
        .expect("stream")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let seqs: Vec<i64> = lines
        .iter()
        .map(|v| v["seq"].as_i64().expect("seq"))
        .collect();
    let all = env.store.audit_events(0, 100_000).await.expect("events");
    assert_eq!(
        seqs,
        all.iter().map(|e| e.seq).collect::<Vec<_>>(),
        "every event, in order, the shutdown head included"
    );
    let last = lines.last().expect("events");
    assert_eq!(last["operation"], "audit.head", "{last}");
    assert_eq!(last["detail"]["seq"].as_i64(), Some(seqs[seqs.len() - 2]));

    let public = format!("{}.pub", key.display());
    let out = env.run(&["audit", "verify", "--public-key", &public]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("signed heads OK: 1 verified"), "{stdout}");
}
