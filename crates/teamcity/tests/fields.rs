//! Writes ask TeamCity for a small answer: without `fields=`, the answer to adding a user to a
//! group lists every member of the group (TeamCity's `Group` includes `users` in its default
//! long form), so each membership change in a 20,000-member group would cost the server a
//! user search and a 20,000-user document.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use teamcity::{Client, ClientConfig, Locator, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers every request with `body` and records each request line.
async fn recorder(body: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).into_owned();
                log.lock()
                    .unwrap()
                    .push(head.lines().next().unwrap_or_default().to_owned());
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    (format!("http://127.0.0.1:{port}"), seen)
}

#[tokio::test]
async fn membership_writes_ask_for_the_group_key_only() {
    teamcity::install_crypto_provider();
    let (base, seen) = recorder(r#"{"key":"DEVS","group":[{"key":"DEVS"}]}"#).await;
    let mut config = ClientConfig::new(&base, Token::new("t"));
    config.request_timeout = Duration::from_secs(2);
    let client = Client::new(config).expect("client");
    let user = Locator::user_pinned(7, "ann");
    client.add_user_to_group(&user, "DEVS").await.expect("add");
    client.set_user_groups(&user, &["DEVS"]).await.expect("set");
    let lines = seen.lock().unwrap().clone();
    assert_eq!(lines.len(), 2, "{lines:?}");
    for line in &lines {
        let target = line.split(' ').nth(1).expect("request target");
        let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
        assert!(
            query.split('&').any(|p| p.starts_with("fields=")),
            "no fields= on {line}: TeamCity would list every member of the group"
        );
    }
}
