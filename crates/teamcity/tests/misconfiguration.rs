//! A login page or a proxy answering in TeamCity's place is a misconfiguration, not a
//! success and not a passing fault: a tiny local HTTP server plays the proxy.

use std::time::Duration;

use teamcity::{Client, ClientConfig, ErrorKind, Locator, TeamCityError, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serves `status`, `content_type` and `body` to every request; returns the base URL.
async fn fixed_server(
    status: &'static str,
    content_type: &'static str,
    body: &'static str,
) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(resp.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    format!("http://127.0.0.1:{port}")
}

fn client(base: &str) -> Client {
    teamcity::install_crypto_provider();
    let mut config = ClientConfig::new(base, Token::new("t"));
    config.request_timeout = Duration::from_secs(2);
    Client::new(config).expect("client")
}

const LOGIN_PAGE: &str =
    "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>SSO</body></html>";

fn assert_not_json(err: &TeamCityError, want_type: &str) {
    assert!(
        matches!(err, TeamCityError::NotJson { content_type } if content_type == want_type),
        "{err:?}"
    );
    assert!(err.is_misconfiguration(), "{err}");
    assert!(!err.is_transient(), "{err}");
    assert_eq!(err.kind(), ErrorKind::Permanent);
    assert!(err.to_string().contains("login page or a proxy"), "{err}");
}

#[tokio::test]
async fn an_html_page_with_200_is_a_misconfiguration_for_every_kind_of_call() {
    let base = fixed_server("200 OK", "text/html;charset=UTF-8", LOGIN_PAGE).await;
    let client = client(&base);
    // A JSON read.
    let err = client.server_info().await.expect_err("HTML is not JSON");
    assert_not_json(&err, "text/html;charset=UTF-8");
    // A write whose body the client ignores must not pass as done either.
    let err = client
        .delete_user(&Locator::by_id(5))
        .await
        .expect_err("HTML is no deletion");
    assert_not_json(&err, "text/html;charset=UTF-8");
    // A text endpoint.
    let err = client
        .set_user_property(&Locator::by_id(5), "p", "v")
        .await
        .expect_err("HTML is no property write");
    assert_not_json(&err, "text/html;charset=UTF-8");
    let err = client
        .logout_user(&Locator::by_id(5))
        .await
        .expect_err("HTML is no logout");
    assert_not_json(&err, "text/html;charset=UTF-8");
}

#[tokio::test]
async fn an_html_body_under_a_json_content_type_is_caught_too() {
    let base = fixed_server("200 OK", "application/json", LOGIN_PAGE).await;
    let err = client(&base)
        .get_user(&Locator::by_id(1), None)
        .await
        .expect_err("HTML body");
    assert_not_json(&err, "application/json");
}

#[tokio::test]
async fn a_401_is_a_misconfiguration_and_a_403_is_not() {
    let base = fixed_server(
        "401 Unauthorized",
        "text/plain;charset=UTF-8",
        "Authentication required\nTo login manually go to \"/login.html\" page",
    )
    .await;
    let err = client(&base).server_info().await.expect_err("401");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(err.is_misconfiguration());

    let base = fixed_server(
        "403 Forbidden",
        "text/plain;charset=UTF-8",
        "Responding with error, status code: 403 (Forbidden).\n\
         Details: jetbrains.buildServer.server.rest.errors.AuthorizationFailedException: no\n\
         Access denied. Check the user has enough permissions to perform the operation.\n",
    )
    .await;
    let err = client(&base)
        .delete_user(&Locator::by_id(5))
        .await
        .expect_err("403");
    assert_eq!(err.kind(), ErrorKind::Forbidden);
    assert!(!err.is_misconfiguration());
}

#[tokio::test]
async fn a_refused_connection_is_transient_not_a_misconfiguration() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let err = client(&format!("http://127.0.0.1:{port}"))
        .server_info()
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            TeamCityError::Transport {
                what: "connect",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_transient());
    assert!(!err.is_misconfiguration());
}
