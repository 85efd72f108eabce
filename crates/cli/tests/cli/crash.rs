//! CRASH: `teamcity-scim serve` killed with SIGKILL mid-sync, restarted, converges.

use std::time::{Duration, Instant};

use serde_json::json;
use store::{OutboxState, WriteCtx};

use crate::support::{Env, POLICY, free_port, serve, signal, text, wait_up};

/// POSTs a SCIM body, waiting out 429s as an IdP does.
async fn post(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    body: serde_json::Value,
) -> serde_json::Value {
    loop {
        let r = http
            .post(url)
            .bearer_auth(token)
            .header("Content-Type", "application/scim+json")
            .body(body.to_string())
            .send()
            .await
            .expect("post");
        if r.status() == 429 {
            let wait = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1);
            tokio::time::sleep(Duration::from_millis(wait.max(1) * 200)).await;
            continue;
        }
        assert_eq!(r.status(), 201);
        return r.json().await.expect("json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_sync_then_restart_converges() {
    let config = format!(
        "[sync]\nmax_removals = 100000\nmax_removals_percent = 100\nlease = \"1s\"\nmax_backoff = \"1s\"\n{POLICY}"
    );
    // Every TeamCity call takes 5 ms, so the sync is still busy when the process dies.
    // Enough latency that the kill lands mid-pass even with concurrent apply.
    let env = Env::new(&config, Duration::from_millis(40)).await;
    let token = server::generate_token(*b"crash-test-token-0123456789abcde");
    env.store
        .create_token(&WriteCtx::cli(), "crash", server::hash_token(&token), None)
        .await
        .expect("token");
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}/scim/v2");
    let http = reqwest::Client::new();
    let mut child = serve(&env, port);
    wait_up(&http, &base).await;

    // TeamCity refuses user creation (503) while the IdP pushes, so the whole push is still
    // pending when writes start, however fast this machine is.
    env.emu.inject_fault(teamcity_emulator::Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: teamcity_emulator::Fault::UNLIMITED,
        action: teamcity_emulator::FaultAction::Status {
            status: 503,
            retry_after_secs: None,
        },
    });
    let mut ids = vec![];
    for n in 0..150 {
        let v = post(
            &http,
            &format!("{base}/Users"),
            &token,
            json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"], "userName": format!("u{n}@example.com"), "active": true}),
        )
        .await;
        ids.push(v["id"].as_str().expect("id").to_owned());
    }
    let members: Vec<_> = ids.iter().map(|i| json!({"value": i})).collect();
    post(
        &http,
        &format!("{base}/Groups"),
        &token,
        json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"], "displayName": "Developers", "externalId": "00g-dev", "members": members}),
    )
    .await;

    // Kill it once TeamCity has seen some writes but the outbox still has many pending rows.
    env.emu.clear_faults();
    env.emu.reset_counters();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let writes: u64 = env
            .emu
            .counters()
            .iter()
            .filter(|(k, _)| !k.starts_with("GET "))
            .map(|(_, v)| *v)
            .sum();
        if writes >= 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the worker never started writing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let pending = env
        .store
        .list_outbox(Some(OutboxState::Pending), 100_000)
        .await
        .expect("outbox")
        .len();
    assert!(pending > 50, "killed mid-sync with {pending} pending rows");
    let users_at_kill = env.emu.snapshot().users.len();
    assert!(
        users_at_kill < 151,
        "sync was cut short ({users_at_kill} users)"
    );

    let mut child = serve(&env, port);
    wait_up(&http, &base).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = env
            .store
            .list_outbox(Some(OutboxState::Pending), 1)
            .await
            .expect("outbox");
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "did not converge after restart: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    signal(child.id(), "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join");
    assert!(status.success(), "{status:?}");

    let all = env.store.list_outbox(None, 100_000).await.expect("outbox");
    assert!(
        all.iter().all(|e| e.item.state == OutboxState::Done),
        "{:?}",
        all.iter().find(|e| e.item.state != OutboxState::Done)
    );
    let o = env.run(&["plan", "--exit-code"]).await;
    let (out, err) = text(&o);
    assert_eq!(
        o.status.code(),
        Some(0),
        "plan not empty after restart:\n{out}{err}"
    );
    let s = env.emu.snapshot();
    let managed = s
        .users
        .values()
        .filter(|u| u.properties.contains_key("teamcity-scim.id"))
        .count();
    assert_eq!(managed, 150, "no duplicate users");
    assert_eq!(s.users.len(), 151);
}
