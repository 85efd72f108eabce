//! Bearer-token authentication: every failure is a 401 with a SCIM error body and a
//! `WWW-Authenticate` challenge.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::json;
use time::OffsetDateTime;

use crate::support::{Resp, Server, user};

#[track_caller]
fn assert_401(r: &Resp) {
    r.expect_error(401, None);
    let challenge = r.header("www-authenticate").unwrap_or("");
    assert!(
        challenge.starts_with("Bearer"),
        "WWW-Authenticate: `{challenge}`"
    );
}

/// GET /Users with `token`: a token created a moment ago works at once (an unknown token
/// makes the server re-read the valid tokens).
async fn get_until_ok(s: &Server, token: &str) -> Resp {
    s.send(s.raw(Method::GET, "/Users").bearer_auth(token))
        .await
}

#[tokio::test]
async fn missing_token() {
    let s = Server::start().await;
    for path in [
        "/Users",
        "/Groups",
        "/ServiceProviderConfig",
        "/Schemas",
        "/Nope",
    ] {
        let r = s.send(s.raw(Method::GET, path)).await;
        assert_401(&r);
    }
    let r = s
        .send(
            s.raw(Method::POST, "/Users")
                .header("content-type", "application/scim+json")
                .body(user("noauth@x.example").to_string()),
        )
        .await;
    assert_401(&r);
    assert!(r.detail().contains("Bearer"), "{}", r.text);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(0));
}

#[tokio::test]
async fn wrong_scheme_or_malformed_header() {
    let s = Server::start().await;
    let cases = [
        format!("Basic {}", s.token),
        format!("Token {}", s.token),
        s.token.clone(),
        "Bearer".to_owned(),
        "Bearer ".to_owned(),
    ];
    for h in cases {
        let r = s
            .send(s.raw(Method::GET, "/Users").header("authorization", &h))
            .await;
        assert_401(&r);
    }
    // The scheme is case-insensitive.
    let r = s
        .send(
            s.raw(Method::GET, "/Users")
                .header("authorization", format!("bearer {}", s.token)),
        )
        .await;
    r.expect(200);
}

#[tokio::test]
async fn wrong_token() {
    let s = Server::start().await;
    let mut almost = s.token.clone();
    let last = almost.pop().unwrap();
    almost.push(if last == 'a' { 'b' } else { 'a' });
    for t in [almost.as_str(), "tcscim_", "x", &format!("{} ", s.token)] {
        let r = s.send(s.raw(Method::GET, "/Users").bearer_auth(t)).await;
        if t.trim() == s.token {
            // Surrounding whitespace is trimmed.
            r.expect(200);
        } else {
            assert_401(&r);
        }
    }
}

#[tokio::test]
async fn expired_token() {
    let s = Server::start().await;
    let (expired, _) = s
        .new_token(Some(OffsetDateTime::now_utc() - time::Duration::hours(1)))
        .await;
    let r = s
        .send(s.raw(Method::GET, "/Users").bearer_auth(&expired))
        .await;
    assert_401(&r);
    // A token that expires in the future works at once.
    let (later, _) = s
        .new_token(Some(OffsetDateTime::now_utc() + time::Duration::hours(1)))
        .await;
    let r = get_until_ok(&s, &later).await;
    r.expect(200);
    // The expired one still fails after the reload.
    let r = s
        .send(s.raw(Method::GET, "/Users").bearer_auth(&expired))
        .await;
    assert_401(&r);
}

#[tokio::test]
async fn token_about_to_expire_stops_working() {
    let s = Server::start().await;
    let (short, _) = s
        .new_token(Some(
            OffsetDateTime::now_utc() + time::Duration::milliseconds(1500),
        ))
        .await;
    let r = s
        .send(s.raw(Method::GET, "/Users").bearer_auth(&short))
        .await;
    r.expect(200);
    tokio::time::sleep(Duration::from_millis(1600)).await;
    // Expiry is checked on every request, not only at snapshot refresh.
    let r = s
        .send(s.raw(Method::GET, "/Users").bearer_auth(&short))
        .await;
    assert_401(&r);
}

#[tokio::test]
async fn revoked_token_stops_working_within_the_refresh_interval() {
    let s = Server::start().await;
    let (secret, id) = s.new_token(None).await;
    let r = s
        .send(s.raw(Method::GET, "/Users").bearer_auth(&secret))
        .await;
    r.expect(200);
    s.store
        .revoke_token(&store::WriteCtx::cli(), &id)
        .await
        .expect("revoke");
    // The server caches valid tokens for up to `auth::REFRESH` (2 s): wait at most 3 s.
    assert!(server::auth::REFRESH <= Duration::from_secs(3));
    let start = Instant::now();
    loop {
        let r = s
            .send(s.raw(Method::GET, "/Users").bearer_auth(&secret))
            .await;
        if r.status == 401 {
            assert_401(&r);
            break;
        }
        r.expect(200);
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "revoked token still accepted after {:?}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The other token is unaffected.
    s.get("/Users").await.expect(200);
    // A revoked token cannot write.
    let r = s
        .send(
            s.raw(Method::POST, "/Users")
                .bearer_auth(&secret)
                .header("content-type", "application/scim+json")
                .body(user("revoked@x.example").to_string()),
        )
        .await;
    assert_401(&r);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(0));
}

#[tokio::test]
async fn several_tokens_valid_at_once_and_new_tokens_work_immediately() {
    let s = Server::start().await;
    s.get("/Users").await.expect(200);
    let (a, a_id) = s.new_token(None).await;
    let (b, b_id) = s.new_token(None).await;
    // Created after the snapshot was loaded: picked up on the miss refresh.
    for t in [&a, &b, &s.token] {
        get_until_ok(&s, t).await.expect(200);
    }
    // Each write is attributed to the token that made it.
    for (t, id) in [(&a, &a_id), (&b, &b_id)] {
        let r = s
            .send(
                s.raw(Method::POST, "/Users")
                    .bearer_auth(t)
                    .header("content-type", "application/scim+json")
                    .body(user(&format!("{id}@x.example")).to_string()),
            )
            .await;
        r.expect(201);
    }
    let events = s.store.audit_events(0, 1000).await.unwrap();
    for id in [&a_id, &b_id] {
        assert!(
            events
                .iter()
                .any(|e| e.actor == format!("token:{id}") && e.operation == "create"),
            "a create by token {id}"
        );
    }
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(2));
}

#[tokio::test]
async fn health_endpoints_need_no_token() {
    let s = Server::start().await;
    let r = s
        .send(s.raw(Method::GET, &format!("{}/healthz", s.origin())))
        .await;
    r.expect(200);
    let r = s
        .send(s.raw(Method::GET, &format!("{}/readyz", s.origin())))
        .await;
    r.expect(200);
}
