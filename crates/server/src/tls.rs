//! HTTPS termination with rustls (ring provider) and certificates reloaded when their files
//! change.
//!
//! [`ReloadingCert`] is a [`ResolvesServerCert`]: every TLS handshake takes the current
//! [`CertifiedKey`] from an `RwLock<Arc<_>>`. [`ReloadingCert::watch`] re-reads the certificate
//! and key files every `interval`; when their *contents* differ from what was last tried (so
//! an `mv`/symlink swap, a Kubernetes secret update or an in-place write all count, whatever
//! the file times say), it parses them, checks that the key matches the certificate and swaps
//! the new pair in. A pair that does not load — a half-written file, a key for another
//! certificate — is logged and the old certificate stays in service; the next change is tried
//! again. Connections already open keep the certificate they were set up with.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

/// Where the certificate and key are, and how often to look for changes.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// PEM certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// How often the files are re-read.
    pub reload_interval: Duration,
}

/// A certificate that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

/// The current certificate, reloaded from its files.
#[derive(Debug)]
pub struct ReloadingCert {
    files: TlsFiles,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
    /// The file contents last tried (loaded or rejected).
    last_seen: std::sync::Mutex<(Vec<u8>, Vec<u8>)>,
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| {
        TlsError(format!(
            "cannot read the TLS {what} {}: {e}",
            path.display()
        ))
    })
}

fn parse(
    files: &TlsFiles,
    provider: &CryptoProvider,
    cert: &[u8],
    key: &[u8],
) -> Result<CertifiedKey, TlsError> {
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            TlsError(format!(
                "{}: not a PEM certificate chain: {e}",
                files.cert_file.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(TlsError(format!(
            "{}: no certificate in the file",
            files.cert_file.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| {
        TlsError(format!(
            "{}: not a PEM private key: {e}",
            files.key_file.display()
        ))
    })?;
    CertifiedKey::from_der(chain, key, provider).map_err(|e| {
        TlsError(format!(
            "{} and {} do not make a usable pair: {e}",
            files.cert_file.display(),
            files.key_file.display()
        ))
    })
}

impl ReloadingCert {
    /// Loads the certificate and key now; an error if they do not load.
    pub fn load(files: TlsFiles) -> Result<Arc<ReloadingCert>, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cert = read("certificate file", &files.cert_file)?;
        let key = read("key file", &files.key_file)?;
        let certified = parse(&files, &provider, &cert, &key)?;
        Ok(Arc::new(ReloadingCert {
            files,
            provider,
            current: RwLock::new(Arc::new(certified)),
            last_seen: std::sync::Mutex::new((cert, key)),
        }))
    }

    /// The rustls server configuration over this resolver (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn server_config(self: &Arc<Self>) -> Result<rustls::ServerConfig, TlsError> {
        let mut config = rustls::ServerConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(e.to_string()))?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }

    /// Re-reads the files once; swaps in a changed pair that loads. Returns whether the
    /// certificate in service changed.
    pub fn reload_if_changed(&self) -> bool {
        let (cert, key) = match (
            read("certificate file", &self.files.cert_file),
            read("key file", &self.files.key_file),
        ) {
            (Ok(c), Ok(k)) => (c, k),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "TLS certificate reload: keeping the current certificate");
                return false;
            }
        };
        {
            let mut seen = self.last_seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.0 == cert && seen.1 == key {
                return false;
            }
            *seen = (cert.clone(), key.clone());
        }
        match parse(&self.files, &self.provider, &cert, &key) {
            Ok(certified) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(certified);
                tracing::info!(cert = %self.files.cert_file.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "TLS certificate reload failed; keeping the current certificate");
                false
            }
        }
    }

    /// Re-reads the files every `reload_interval` until `stop` resolves.
    pub async fn watch(self: Arc<Self>, stop: impl Future<Output = ()>) {
        let mut tick = tokio::time::interval(self.files.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut stop = std::pin::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = tick.tick() => {
                    let this = self.clone();
                    let _ = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
                }
            }
        }
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}
