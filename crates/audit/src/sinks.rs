//! Streaming sinks: the database is the buffer.
//!
//! Each sink has a name and a stored position (the last `seq` it accepted, in `sync_state` under
//! `audit_sink:<name>`). Its task reads the events after that position in `seq` order, hands a
//! batch to the sink, and moves the position only once the sink accepted the whole batch: a
//! sink that fails or is down is retried with capped backoff and catches up from where it
//! stopped, across restarts. Delivery is at least once — a batch may be sent again after a
//! failure that happened after the receiver got it — and every event carries its `seq` and
//! `hash` so the receiver can drop repeats, see gaps and check the chain. Each sink runs on its
//! own task and only reads the database, so a slow sink delays neither SCIM requests, the sync
//! engine nor the other sinks.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt as _;
use futures::future::BoxFuture;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use store::{AuditEvent, DynStore, SyncState};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;

/// Events handed to a sink at once.
const BATCH: i64 = 500;
/// How often an idle sink looks for new events.
const POLL: Duration = Duration::from_millis(500);
/// First wait after a failure; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
/// Longest wait between retries.
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Longest a delivery may take before it counts as failed.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// The HTTP header carrying the webhook body's HMAC-SHA256, `sha256=<hex>`.
pub const SIGNATURE_HEADER: &str = "X-TeamCity-SCIM-Signature";

/// The structured-data id of the syslog messages (32473 is the private enterprise number RFC
/// 5612 reserves for documentation and examples).
pub const SD_ID: &str = "tcscim@32473";

/// What a sink is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// RFC 5424 syslog over TCP (RFC 6587 octet counting), optionally TLS.
    Syslog,
    /// HTTPS POST of JSON Lines batches with an HMAC-SHA256 signature header.
    Webhook,
    /// JSON Lines appended to a file.
    File,
}

/// `[[audit.sinks]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// `syslog`, `webhook` or `file`.
    pub kind: SinkKind,
    /// Names the sink's stored position; default `<kind>:<target>`. Renaming a sink (or changing
    /// its target without a name) starts it again from the first event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// syslog: `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// syslog: speak TLS (RFC 5425) to `address`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
    /// syslog with TLS, webhook: CA certificate(s), PEM, trusted besides the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// webhook: the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// webhook: a file holding the HMAC key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// file: the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// Why a sink could not be set up or could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The configuration is wrong; the message says what to fix.
    #[error("{0}")]
    Config(String),
    /// Delivery failed (will be retried).
    #[error("{0}")]
    Delivery(String),
}

impl SinkConfig {
    /// The sink's name: `name`, else `<kind>:<target>`.
    pub fn name(&self) -> String {
        if let Some(n) = &self.name {
            return n.clone();
        }
        let target = match self.kind {
            SinkKind::Syslog => self.address.clone().unwrap_or_default(),
            SinkKind::Webhook => self.url.clone().unwrap_or_default(),
            SinkKind::File => self
                .path
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
        };
        format!("{}:{target}", self.kind_name())
    }

    fn kind_name(&self) -> &'static str {
        match self.kind {
            SinkKind::Syslog => "syslog",
            SinkKind::Webhook => "webhook",
            SinkKind::File => "file",
        }
    }

    /// Checks that the keys fit the kind; the error names the key to fix.
    pub fn validate(&self) -> Result<(), SinkError> {
        let kind = self.kind_name();
        let err = |m: String| Err(SinkError::Config(format!("audit sink ({kind}): {m}")));
        let stray =
            |key: &str, set: bool| set.then(|| format!("`{key}` does not apply to a {kind} sink"));
        let problems: Vec<String> = match self.kind {
            SinkKind::Syslog => [
                stray("url", self.url.is_some()),
                stray("secret_file", self.secret_file.is_some()),
                stray("path", self.path.is_some()),
                stray("ca_file", self.ca_file.is_some() && !self.tls),
            ]
            .into_iter()
            .flatten()
            .collect(),
            SinkKind::Webhook => [
                stray("address", self.address.is_some()),
                stray("tls", self.tls),
                stray("path", self.path.is_some()),
            ]
            .into_iter()
            .flatten()
            .collect(),
            SinkKind::File => [
                stray("address", self.address.is_some()),
                stray("tls", self.tls),
                stray("ca_file", self.ca_file.is_some()),
                stray("url", self.url.is_some()),
                stray("secret_file", self.secret_file.is_some()),
            ]
            .into_iter()
            .flatten()
            .collect(),
        };
        if let Some(p) = problems.first() {
            return err(p.clone());
        }
        match self.kind {
            SinkKind::Syslog => match &self.address {
                Some(a)
                    if a.rsplit_once(':')
                        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
                {
                    Ok(())
                }
                Some(a) => err(format!("`address` {a:?} is not host:port")),
                None => err("`address = \"host:port\"` is required".into()),
            },
            SinkKind::Webhook => {
                match &self.url {
                    Some(u) if u.starts_with("https://") => {}
                    // Plain HTTP would carry the trail in clear: only to this machine.
                    Some(u) if u.starts_with("http://") => {
                        let host = u["http://".len()..]
                            .split(['/', '?'])
                            .next()
                            .unwrap_or_default();
                        let host = host.rsplit_once(':').map_or(host, |(h, _)| h);
                        if !matches!(host, "localhost" | "127.0.0.1" | "[::1]") {
                            return err(format!(
                                "`url` {u:?} is plain HTTP to another machine: use https://"
                            ));
                        }
                    }
                    Some(u) => return err(format!("`url` {u:?} is not an https URL")),
                    None => return err("`url` is required".into()),
                }
                if self.secret_file.is_none() {
                    return err(
                        "`secret_file` (the HMAC key the receiver checks) is required".into(),
                    );
                }
                Ok(())
            }
            SinkKind::File => match &self.path {
                Some(_) => Ok(()),
                None => err("`path` is required".into()),
            },
        }
    }
}

/// Something that accepts batches of events in `seq` order.
pub trait Sink: Send {
    /// Delivers the whole batch, or fails (then it is offered again, whole).
    fn deliver<'a>(&'a mut self, events: &'a [AuditEvent]) -> BoxFuture<'a, Result<(), SinkError>>;
}

fn read_file(path: &PathBuf, what: &str) -> Result<Vec<u8>, SinkError> {
    std::fs::read(path).map_err(|e| {
        SinkError::Config(format!(
            "audit sink: cannot read {what} {}: {e}",
            path.display()
        ))
    })
}

/// Builds the sink `cfg` describes (reading its key and CA files).
pub fn build(cfg: &SinkConfig) -> Result<Box<dyn Sink>, SinkError> {
    cfg.validate()?;
    let ca = match &cfg.ca_file {
        Some(p) => Some(read_file(p, "ca_file")?),
        None => None,
    };
    Ok(match cfg.kind {
        SinkKind::Syslog => {
            let address = cfg.address.clone().unwrap_or_default();
            let tls = if cfg.tls {
                Some(tls_connector(ca.as_deref())?)
            } else {
                None
            };
            Box::new(SyslogSink {
                address,
                tls,
                conn: None,
                hostname: hostname(),
                pid: std::process::id(),
            })
        }
        SinkKind::Webhook => {
            let key = read_file(cfg.secret_file.as_ref().expect("validated"), "secret_file")?;
            let key = String::from_utf8_lossy(&key).trim().as_bytes().to_vec();
            if key.is_empty() {
                return Err(SinkError::Config(
                    "audit sink (webhook): `secret_file` is empty".into(),
                ));
            }
            let mut builder = reqwest::Client::builder()
                .timeout(DELIVERY_TIMEOUT)
                .user_agent(concat!("teamcity-scim/", env!("CARGO_PKG_VERSION")));
            if let Some(pem) = &ca {
                for cert in reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| SinkError::Config(format!("audit sink (webhook): ca_file: {e}")))?
                {
                    builder = builder.add_root_certificate(cert);
                }
            }
            Box::new(WebhookSink {
                url: cfg.url.clone().unwrap_or_default(),
                key,
                http: builder
                    .build()
                    .map_err(|e| SinkError::Config(format!("audit sink (webhook): {e}")))?,
            })
        }
        SinkKind::File => Box::new(FileSink {
            path: cfg.path.clone().expect("validated"),
        }),
    })
}

// ---- syslog ------------------------------------------------------------------------------

/// This machine's name for the syslog HOSTNAME field (`-` when unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| printable(h.trim(), 255))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "-".into())
}

/// `s` limited to printable US-ASCII without spaces (RFC 5424 header fields), at most `max`.
fn printable(s: &str, max: usize) -> String {
    s.chars()
        .filter(|c| ('!'..='~').contains(c))
        .take(max)
        .collect()
}

/// An SD-PARAM value with `"`, `\` and `]` escaped (RFC 5424 §6.3.3).
fn sd_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// One event as an RFC 5424 message, framed by octet counting (RFC 6587 §3.4.1):
/// `<109>1 TIME HOST teamcity-scim PID OPERATION [tcscim@32473 seq="…" hash="…" outcome="…"] BOM{json}`,
/// facility 13 (log audit), severity 5 (notice) or 4 (warning) for a failure.
pub fn syslog_frame(e: &AuditEvent, hostname: &str, pid: u32) -> Vec<u8> {
    let severity = if e.outcome == "success" { 5 } else { 4 };
    let pri = 13 * 8 + severity;
    let time = if e.time.ends_with('Z') && e.time.len() <= 32 {
        e.time.as_str()
    } else {
        "-"
    };
    let msgid = match printable(&e.operation, 32) {
        m if m.is_empty() => "-".to_owned(),
        m => m,
    };
    let mut msg = format!(
        "<{pri}>1 {time} {hostname} teamcity-scim {pid} {msgid} [{SD_ID} seq=\"{}\" hash=\"{}\" outcome=\"{}\"] ",
        e.seq,
        sd_escape(&e.hash),
        sd_escape(&e.outcome)
    )
    .into_bytes();
    msg.extend_from_slice("\u{feff}".as_bytes());
    msg.extend_from_slice(e.to_json().to_string().as_bytes());
    let mut framed = format!("{} ", msg.len()).into_bytes();
    framed.extend_from_slice(&msg);
    framed
}

fn tls_connector(ca: Option<&[u8]>) -> Result<tokio_rustls::TlsConnector, SinkError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    if let Some(pem) = ca {
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| SinkError::Config(format!("audit sink (syslog): ca_file: {e}")))?;
            roots
                .add(cert)
                .map_err(|e| SinkError::Config(format!("audit sink (syslog): ca_file: {e}")))?;
            n += 1;
        }
        if n == 0 {
            return Err(SinkError::Config(
                "audit sink (syslog): ca_file holds no PEM certificate".into(),
            ));
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| SinkError::Config(format!("audit sink (syslog): TLS: {e}")))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Conn {
    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(s) => s.get_ref().0,
        }
    }

    /// Whether the receiver has closed the connection. A syslog receiver never sends, so a
    /// readable end of stream (or an error) means it is gone: then the batch must not be
    /// written into a dead socket's buffer, where it would be lost.
    fn closed(&self) -> bool {
        let mut buf = [0u8; 1];
        match self.tcp().peek(&mut buf).now_or_never() {
            None => false,
            Some(Ok(0)) | Some(Err(_)) => true,
            // TLS session tickets and the like: still open.
            Some(Ok(_)) => false,
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
        }
    }
}

struct SyslogSink {
    address: String,
    tls: Option<tokio_rustls::TlsConnector>,
    conn: Option<Conn>,
    hostname: String,
    pid: u32,
}

impl SyslogSink {
    async fn connect(&self) -> Result<Conn, SinkError> {
        let tcp = TcpStream::connect(&self.address)
            .await
            .map_err(|e| SinkError::Delivery(format!("cannot connect to {}: {e}", self.address)))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Conn::Plain(tcp)),
            Some(connector) => {
                let host = self
                    .address
                    .rsplit_once(':')
                    .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
                    .unwrap_or_default()
                    .to_owned();
                let name = rustls::pki_types::ServerName::try_from(host)
                    .map_err(|e| SinkError::Config(format!("audit sink (syslog): {e}")))?;
                let tls = connector
                    .connect(name, tcp)
                    .await
                    .map_err(|e| SinkError::Delivery(format!("TLS with {}: {e}", self.address)))?;
                Ok(Conn::Tls(Box::new(tls)))
            }
        }
    }
}

impl Sink for SyslogSink {
    fn deliver<'a>(&'a mut self, events: &'a [AuditEvent]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut data = Vec::new();
            for e in events {
                data.extend_from_slice(&syslog_frame(e, &self.hostname, self.pid));
            }
            if self.conn.as_ref().is_some_and(Conn::closed) {
                self.conn = None;
            }
            let mut conn = match self.conn.take() {
                Some(c) => c,
                None => self.connect().await?,
            };
            match conn.write_all(&data).await {
                Ok(()) => {
                    self.conn = Some(conn);
                    Ok(())
                }
                Err(e) => Err(SinkError::Delivery(format!(
                    "writing to {}: {e}",
                    self.address
                ))),
            }
        })
    }
}

// ---- webhook -----------------------------------------------------------------------------

/// The webhook signature of `body`: `sha256=` and the hex HMAC-SHA256 under `key`.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

struct WebhookSink {
    url: String,
    key: Vec<u8>,
    http: reqwest::Client,
}

impl Sink for WebhookSink {
    fn deliver<'a>(&'a mut self, events: &'a [AuditEvent]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut body = Vec::new();
            for e in events {
                body.extend_from_slice(e.to_json().to_string().as_bytes());
                body.push(b'\n');
            }
            let first = events.first().map_or(0, |e| e.seq);
            let last = events.last().map_or(0, |e| e.seq);
            let r = self
                .http
                .post(&self.url)
                .header("Content-Type", "application/x-ndjson")
                .header(SIGNATURE_HEADER, signature(&self.key, &body))
                .header("X-TeamCity-SCIM-First-Seq", first.to_string())
                .header("X-TeamCity-SCIM-Last-Seq", last.to_string())
                .body(body)
                .send()
                .await
                .map_err(|e| SinkError::Delivery(format!("POST {}: {e}", self.url)))?;
            if r.status().is_success() {
                Ok(())
            } else {
                Err(SinkError::Delivery(format!(
                    "POST {} answered {}",
                    self.url,
                    r.status()
                )))
            }
        })
    }
}

// ---- file --------------------------------------------------------------------------------

struct FileSink {
    path: PathBuf,
}

impl Sink for FileSink {
    fn deliver<'a>(&'a mut self, events: &'a [AuditEvent]) -> BoxFuture<'a, Result<(), SinkError>> {
        Box::pin(async move {
            let mut data = Vec::new();
            for e in events {
                data.extend_from_slice(e.to_json().to_string().as_bytes());
                data.push(b'\n');
            }
            let path = self.path.clone();
            // Opened for every batch in append mode: logrotate's `create` (rename, new file) and
            // `copytruncate` (truncate in place) both just work — the next batch goes to the
            // file now at `path`, at its end.
            tokio::task::spawn_blocking(move || {
                use std::io::Write as _;
                let mut opts = std::fs::OpenOptions::new();
                opts.create(true).append(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt as _;
                    opts.mode(0o600);
                }
                let mut f = opts.open(&path)?;
                f.write_all(&data)?;
                f.sync_data()
            })
            .await
            .map_err(|e| SinkError::Delivery(format!("file sink task: {e}")))?
            .map_err(|e| SinkError::Delivery(format!("appending to {}: {e}", self.path.display())))
        })
    }
}

// ---- the delivery loop -------------------------------------------------------------------

/// The `sync_state` key holding a sink's position.
pub fn position_key(name: &str) -> String {
    format!("audit_sink:{name}")
}

/// A sink's position: the last `seq` it accepted (0 before the first).
pub async fn position(store: &dyn SyncState, name: &str) -> Result<i64, store::StoreError> {
    Ok(store
        .sync_state_get(&position_key(name))
        .await?
        .and_then(|v| v.parse().ok())
        .unwrap_or(0))
}

/// Starts one delivery task per sink. Each stops when `stop` turns true (after one last
/// attempt to deliver what is pending, bounded by a few seconds).
pub fn spawn(
    store: DynStore,
    sinks: &[SinkConfig],
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<Vec<tokio::task::JoinHandle<()>>, SinkError> {
    let mut names = std::collections::BTreeSet::new();
    let mut built = Vec::new();
    for cfg in sinks {
        let name = cfg.name();
        if !names.insert(name.clone()) {
            return Err(SinkError::Config(format!(
                "two audit sinks are named {name:?}: give each a distinct `name`"
            )));
        }
        built.push((name, build(cfg)?));
    }
    Ok(built
        .into_iter()
        .map(|(name, sink)| tokio::spawn(run(store.clone(), name, sink, stop.clone())))
        .collect())
}

async fn sleep_or_stop(d: Duration, stop: &mut tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        _ = stop.wait_for(|s| *s) => {}
    }
}

/// One sink's loop.
pub async fn run(
    store: DynStore,
    name: String,
    mut sink: Box<dyn Sink>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let key = position_key(&name);
    let labels = [("sink", name.clone())];
    let mut backoff = FIRST_BACKOFF;
    let mut final_round = false;
    loop {
        if *stop.borrow() {
            if final_round {
                return;
            }
            final_round = true;
        }
        let pos = match position(&*store, &name).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(sink = %name, error = %e, "audit sink: cannot read its position");
                sleep_or_stop(backoff, &mut stop).await;
                continue;
            }
        };
        let events = match store.audit_events(pos, BATCH).await {
            Ok(ev) => ev,
            Err(e) => {
                tracing::warn!(sink = %name, error = %e, "audit sink: cannot read the audit trail");
                sleep_or_stop(backoff, &mut stop).await;
                continue;
            }
        };
        record_lag(&store, &labels, events.first()).await;
        let Some(last) = events.last() else {
            if final_round {
                return;
            }
            sleep_or_stop(POLL, &mut stop).await;
            continue;
        };
        if let Some(first) = events.first()
            && first.seq > pos + 1
        {
            tracing::warn!(
                sink = %name,
                from = pos + 1,
                to = first.seq - 1,
                "audit sink: these events were pruned before this sink received them"
            );
        }
        let timeout = if final_round {
            Duration::from_secs(5)
        } else {
            DELIVERY_TIMEOUT
        };
        let result = match tokio::time::timeout(timeout, sink.deliver(&events)).await {
            Ok(r) => r,
            Err(_) => Err(SinkError::Delivery(format!(
                "no answer within {} s",
                timeout.as_secs()
            ))),
        };
        match result {
            Ok(()) => {
                backoff = FIRST_BACKOFF;
                metrics::counter!("teamcity_scim_audit_sink_delivered_events_total", &labels)
                    .increment(events.len() as u64);
                if let Err(e) = store.sync_state_set(&key, &last.seq.to_string()).await {
                    tracing::warn!(sink = %name, error = %e, "audit sink: cannot store its position; events may be sent again");
                }
            }
            Err(e) => {
                metrics::counter!("teamcity_scim_audit_sink_failures_total", &labels).increment(1);
                tracing::warn!(
                    sink = %name,
                    error = %e,
                    retry_in = ?backoff,
                    "audit sink: delivery failed; it resumes from seq {} when the receiver answers",
                    pos + 1
                );
                if final_round {
                    return;
                }
                sleep_or_stop(backoff, &mut stop).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Updates the lag gauges: events not yet delivered, and the age of the oldest of them.
async fn record_lag(
    store: &DynStore,
    labels: &[(&'static str, String); 1],
    oldest: Option<&AuditEvent>,
) {
    let head = match store.audit_recent(None, 1).await {
        Ok(v) => v.first().map_or(0, |e| e.seq),
        Err(_) => return,
    };
    let lag_events = oldest.map_or(0, |e| head - e.seq + 1);
    metrics::gauge!("teamcity_scim_audit_sink_lag_events", labels).set(lag_events as f64);
    let lag_seconds = oldest
        .and_then(|e| store::timefmt::parse(&e.time))
        .map_or(0.0, |t| {
            (time::OffsetDateTime::now_utc() - t)
                .as_seconds_f64()
                .max(0.0)
        });
    metrics::gauge!("teamcity_scim_audit_sink_lag_seconds", labels).set(lag_seconds);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: i64, outcome: &str) -> AuditEvent {
        AuditEvent {
            seq,
            time: "2026-12-07T10:00:00.123456Z".into(),
            actor: "token:t1".into(),
            request_id: None,
            resource_type: "User".into(),
            resource_id: Some("u1".into()),
            operation: "patch".into(),
            outcome: outcome.into(),
            status: Some(200),
            detail: "{\"a\":\"x]\\\"\"}".into(),
            prev_hash: "p".into(),
            hash: "h\"]".into(),
        }
    }

    #[test]
    fn syslog_frames_are_octet_counted_rfc5424_with_seq_and_hash() {
        let f = syslog_frame(&event(7, "success"), "host-1", 42);
        let text = String::from_utf8(f).expect("utf-8");
        let (len, msg) = text.split_once(' ').expect("length prefix");
        assert_eq!(len.parse::<usize>().expect("number"), msg.len());
        assert!(
            msg.starts_with(
                "<109>1 2026-12-07T10:00:00.123456Z host-1 teamcity-scim 42 patch [tcscim@32473 seq=\"7\" hash=\"h\\\"\\]\" outcome=\"success\"] \u{feff}{"
            ),
            "{msg}"
        );
        let json: serde_json::Value =
            serde_json::from_str(msg.rsplit_once('\u{feff}').expect("BOM").1).expect("json");
        assert_eq!(json["seq"], 7);
        assert_eq!(json["detail"]["a"], "x]\"");
        let failure = String::from_utf8(syslog_frame(&event(8, "failure"), "h", 1)).expect("utf-8");
        assert!(
            failure
                .split_once(' ')
                .expect("len")
                .1
                .starts_with("<108>1 "),
            "{failure}"
        );
    }

    #[test]
    fn webhook_signatures_are_hmac_sha256_of_the_body() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn configs_name_the_key_to_fix() {
        let base = |kind| SinkConfig {
            kind,
            name: None,
            address: None,
            tls: false,
            ca_file: None,
            url: None,
            secret_file: None,
            path: None,
        };
        let cases: Vec<(SinkConfig, Option<&str>)> = vec![
            (
                base(SinkKind::Syslog),
                Some("`address = \"host:port\"` is required"),
            ),
            (
                SinkConfig {
                    address: Some("siem:6514".into()),
                    ..base(SinkKind::Syslog)
                },
                None,
            ),
            (
                SinkConfig {
                    address: Some("siem".into()),
                    ..base(SinkKind::Syslog)
                },
                Some("is not host:port"),
            ),
            (
                SinkConfig {
                    address: Some("siem:1".into()),
                    url: Some("https://x".into()),
                    ..base(SinkKind::Syslog)
                },
                Some("`url` does not apply to a syslog sink"),
            ),
            (
                SinkConfig {
                    address: Some("siem:1".into()),
                    ca_file: Some("ca.pem".into()),
                    ..base(SinkKind::Syslog)
                },
                Some("`ca_file` does not apply"),
            ),
            (
                SinkConfig {
                    url: Some("https://x/y".into()),
                    ..base(SinkKind::Webhook)
                },
                Some("`secret_file`"),
            ),
            (
                SinkConfig {
                    url: Some("ftp://x".into()),
                    secret_file: Some("k".into()),
                    ..base(SinkKind::Webhook)
                },
                Some("not an https URL"),
            ),
            (
                SinkConfig {
                    url: Some("http://siem.example.com/in".into()),
                    secret_file: Some("k".into()),
                    ..base(SinkKind::Webhook)
                },
                Some("plain HTTP to another machine"),
            ),
            (
                SinkConfig {
                    url: Some("http://127.0.0.1:9000/in".into()),
                    secret_file: Some("k".into()),
                    ..base(SinkKind::Webhook)
                },
                None,
            ),
            (
                SinkConfig {
                    url: Some("https://x".into()),
                    secret_file: Some("k".into()),
                    ..base(SinkKind::Webhook)
                },
                None,
            ),
            (base(SinkKind::File), Some("`path` is required")),
            (
                SinkConfig {
                    path: Some("/var/log/a.jsonl".into()),
                    tls: true,
                    ..base(SinkKind::File)
                },
                Some("`tls` does not apply"),
            ),
        ];
        for (cfg, want) in cases {
            match (cfg.validate(), want) {
                (Ok(()), None) => {}
                (Err(e), Some(w)) => assert!(e.to_string().contains(w), "{cfg:?}: {e}"),
                (got, want) => panic!("{cfg:?}: got {got:?}, want {want:?}"),
            }
        }
        assert_eq!(
            SinkConfig {
                path: Some("/a".into()),
                ..base(SinkKind::File)
            }
            .name(),
            "file:/a"
        );
    }
}
