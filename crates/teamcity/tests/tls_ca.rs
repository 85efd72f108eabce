//! The client verifies TeamCity's certificate: a server whose certificate is signed by a
//! private CA is refused by default and accepted once that CA is configured (`ca_pem`).

use std::sync::Arc;

use teamcity::{Client, ClientConfig, Token};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTPS server for `localhost` with a certificate from a fresh CA; answers every request
/// with a fixed `/app/rest/server` body. Returns the port and the CA's PEM.
async fn private_ca_server() -> (u16, String) {
    let ca_key = rcgen::KeyPair::generate().expect("ca key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test private CA");
    let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
    let ca = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("leaf params")
        .signed_by(&leaf_key, &ca)
        .expect("leaf cert");

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(leaf_key.serialize_der()).expect("key"),
        )
        .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(stream).await else {
                    return;
                };
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let body = r#"{"version":"2025.03 (build 1)","versionMajor":2025}"#;
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
                     Connection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (port, ca_cert.pem())
}

#[tokio::test]
async fn private_ca_is_refused_by_default_and_trusted_when_configured() {
    teamcity::install_crypto_provider();
    let (port, ca_pem) = private_ca_server().await;
    let base = format!("https://localhost:{port}");

    let default = Client::new(ClientConfig::new(&base, Token::new("t"))).expect("client");
    let err = default
        .server_info()
        .await
        .expect_err("an unknown CA must not be trusted");
    // An untrusted certificate is the bridge's setup, not a passing network fault.
    assert!(
        matches!(err, teamcity::TeamCityError::Transport { what: "tls", .. }),
        "{err:?}"
    );
    assert!(!err.is_transient(), "{err}");
    assert!(err.is_misconfiguration(), "{err}");

    let mut config = ClientConfig::new(&base, Token::new("t"));
    config.ca_pem = Some(ca_pem.into_bytes());
    let trusting = Client::new(config).expect("client with CA");
    let info = trusting
        .server_info()
        .await
        .expect("trusted through the CA file");
    assert_eq!(info.version_major, Some(2025));
}

#[test]
fn ca_that_is_not_pem_is_a_config_error() {
    teamcity::install_crypto_provider();
    let mut config = ClientConfig::new("https://localhost:1", Token::new("t"));
    config.ca_pem = Some(b"this is not a certificate".to_vec());
    let err = Client::new(config).expect_err("no certificate");
    assert!(
        matches!(err, teamcity::TeamCityError::Config(ref m) if m.contains("CA file")),
        "{err:?}"
    );
}
