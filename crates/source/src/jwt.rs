//! Signed client assertions (RFC 7523 `private_key_jwt`) for private-key / certificate
//! credentials: an RS256 JWT the IdP's token endpoint verifies with the public key (or
//! certificate) registered for the client.
//!
//! Used by the Okta source (OAuth service app) and the Graph source (certificate credential).
//! Signing is ring's RSASSA-PKCS1-v1_5 with SHA-256 (`RS256`, RFC 7518 §3.3); the key is a PEM
//! RSA private key, PKCS#8 (`BEGIN PRIVATE KEY`) or PKCS#1 (`BEGIN RSA PRIVATE KEY`). Error
//! messages name the problem, never the key.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::SystemRandom;
use ring::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::{SourceError, SourceResult};

/// How long an assertion is valid: five minutes (Okta accepts at most one hour, Microsoft
/// recommends a short lifetime).
pub const ASSERTION_LIFETIME_SECS: u64 = 300;

/// RFC 7523 client assertion: RS256 JWT with iss = sub = client_id, aud = audience, jti random,
/// iat/nbf = now, exp = now + 5 min; header `x5t` when given (Microsoft wants it for
/// certificates).
pub fn client_assertion(
    client_id: &str,
    audience: &str,
    key_pem: &str,
    x5t: Option<&str>,
    now_unix: u64,
) -> SourceResult<String> {
    sign_assertion(client_id, audience, key_pem, x5t, None, now_unix)
}

/// base64url (no padding) SHA-1 thumbprint of the certificate's DER (the `x5t` header).
pub fn x5t_of_certificate(cert_pem: &str) -> SourceResult<String> {
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| {
        SourceError::Config(
            "the certificate is not a PEM certificate (expected -----BEGIN CERTIFICATE-----)"
                .into(),
        )
    })?;
    let digest = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der.as_ref());
    Ok(URL_SAFE_NO_PAD.encode(digest.as_ref()))
}

/// [`client_assertion`] with a `kid` header too (Okta picks the registered public key by it
/// when the service app has several).
pub(crate) fn sign_assertion(
    client_id: &str,
    audience: &str,
    key_pem: &str,
    x5t: Option<&str>,
    kid: Option<&str>,
    now_unix: u64,
) -> SourceResult<String> {
    let key = rsa_key(key_pem)?;
    let mut header = serde_json::json!({ "alg": "RS256", "typ": "JWT" });
    if let Some(x5t) = x5t {
        header["x5t"] = x5t.into();
    }
    if let Some(kid) = kid {
        header["kid"] = kid.into();
    }
    let jti: [u8; 16] = rand::random();
    let claims = serde_json::json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": URL_SAFE_NO_PAD.encode(jti),
        "iat": now_unix,
        "nbf": now_unix,
        "exp": now_unix + ASSERTION_LIFETIME_SECS,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut signature = vec![0u8; key.public().modulus_len()];
    key.sign(
        &RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        signing_input.as_bytes(),
        &mut signature,
    )
    .map_err(|_| SourceError::Config("signing the client assertion failed".into()))?;
    Ok(format!(
        "{signing_input}.{}",
        URL_SAFE_NO_PAD.encode(signature)
    ))
}

/// The RSA key pair of a PEM private key; `Config` errors say what is wrong with it.
fn rsa_key(key_pem: &str) -> SourceResult<RsaKeyPair> {
    let der = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| {
        SourceError::Config(
            "the private key is not a PEM private key (expected -----BEGIN PRIVATE KEY----- \
             or -----BEGIN RSA PRIVATE KEY-----)"
                .into(),
        )
    })?;
    let parsed = match &der {
        PrivateKeyDer::Pkcs8(k) => RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()),
        PrivateKeyDer::Pkcs1(k) => RsaKeyPair::from_der(k.secret_pkcs1_der()),
        PrivateKeyDer::Sec1(_) => {
            return Err(SourceError::Config(
                "the private key is an EC key; RS256 client assertions need an RSA key".into(),
            ));
        }
        _ => {
            return Err(SourceError::Config(
                "the private key is of an unsupported kind; an RSA key is needed".into(),
            ));
        }
    };
    parsed.map_err(|e| {
        SourceError::Config(format!(
            "the private key is not a usable RSA key (2048 to 8192 bits): {e}"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = include_str!("../tests/fixtures/test-only-rsa-key.pem");
    const KEY_PKCS1: &str = include_str!("../tests/fixtures/test-only-rsa-key.pkcs1.pem");
    const CERT: &str = include_str!("../tests/fixtures/test-only-rsa-cert.pem");

    fn parts(jwt: &str) -> (serde_json::Value, serde_json::Value, Vec<u8>, String) {
        let mut it = jwt.split('.');
        let h = it.next().unwrap();
        let c = it.next().unwrap();
        let s = it.next().unwrap();
        assert!(it.next().is_none());
        let dec = |p: &str| URL_SAFE_NO_PAD.decode(p).unwrap();
        (
            serde_json::from_slice(&dec(h)).unwrap(),
            serde_json::from_slice(&dec(c)).unwrap(),
            dec(s),
            format!("{h}.{c}"),
        )
    }

    fn verify(key_pem: &str, jwt: &str) -> bool {
        let (_, _, sig, input) = parts(jwt);
        let key = rsa_key(key_pem).unwrap();
        let public = ring::signature::UnparsedPublicKey::new(
            &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            key.public().as_ref().to_vec(),
        );
        public.verify(input.as_bytes(), &sig).is_ok()
    }

    #[test]
    fn assertion_claims_and_header() {
        let jwt = client_assertion(
            "client-1",
            "https://login.example/token",
            KEY,
            Some("thumb"),
            1_700_000_000,
        )
        .unwrap();
        let (header, claims, _, _) = parts(&jwt);
        assert_eq!(header["alg"], "RS256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["x5t"], "thumb");
        assert!(header.get("kid").is_none());
        assert_eq!(claims["iss"], "client-1");
        assert_eq!(claims["sub"], "client-1");
        assert_eq!(claims["aud"], "https://login.example/token");
        assert_eq!(claims["iat"], 1_700_000_000u64);
        assert_eq!(claims["nbf"], 1_700_000_000u64);
        assert_eq!(claims["exp"], 1_700_000_300u64);
        assert!(claims["jti"].as_str().unwrap().len() >= 16);
        // A fresh jti each time.
        let again = client_assertion("client-1", "aud", KEY, None, 1).unwrap();
        let (h2, c2, _, _) = parts(&again);
        assert!(h2.get("x5t").is_none());
        assert_ne!(c2["jti"], claims["jti"]);
    }

    #[test]
    fn signature_verifies_with_the_public_key() {
        let jwt = client_assertion("c", "a", KEY, None, 10).unwrap();
        assert!(verify(KEY, &jwt));
        // PKCS#1 PEM of the same key signs the same way.
        let jwt1 = client_assertion("c", "a", KEY_PKCS1, None, 10).unwrap();
        assert!(verify(KEY, &jwt1));
        // A tampered token does not verify.
        let (_, _, _, input) = parts(&jwt);
        let sig = jwt.rsplit('.').next().unwrap();
        let forged_claims = URL_SAFE_NO_PAD.encode(r#"{"iss":"evil"}"#);
        let head = input.split('.').next().unwrap();
        assert!(!verify(KEY, &format!("{head}.{forged_claims}.{sig}")));
    }

    #[test]
    fn kid_header() {
        let jwt = sign_assertion("c", "a", KEY, None, Some("key-7"), 10).unwrap();
        assert_eq!(parts(&jwt).0["kid"], "key-7");
    }

    #[test]
    fn bad_keys_are_config_errors_without_the_key() {
        for bad in [
            "",
            "not a key",
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            CERT,
        ] {
            match client_assertion("c", "a", bad, None, 1) {
                Err(SourceError::Config(msg)) => {
                    assert!(msg.contains("private key"), "{msg}");
                    assert!(!msg.contains("AAAA"), "{msg}");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn x5t_is_the_sha1_thumbprint() {
        // `openssl x509 -outform der | openssl dgst -sha1 -binary | base64url`
        assert_eq!(
            x5t_of_certificate(CERT).unwrap(),
            "7RPrsaaz13pwl6NRICQ-4r7dwEM"
        );
        assert!(matches!(
            x5t_of_certificate("nope"),
            Err(SourceError::Config(_))
        ));
    }
}
