//! Configuration: defaults < TOML file (`--config FILE`) < environment
//! (`TEAMCITY_SCIM_<SECTION>__<KEY>`) < `*_file` keys for secrets.
//!
//! Errors name the bad key and where its value came from (figment keeps provenance). Unknown
//! keys are errors, so a typo never silently falls back to a default.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// The environment variable prefix.
pub const ENV_PREFIX: &str = "TEAMCITY_SCIM_";

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[server]`
    pub server: ServerConfig,
    /// `[database]`
    pub database: DatabaseConfig,
    /// `[log]`
    pub log: LogConfig,
    /// `[teamcity]`
    pub teamcity: TeamCityConfig,
    /// `[sync]`
    pub sync: SyncConfig,
    /// `[audit]`
    pub audit: AuditConfig,
    /// `[admin]`: the read-only dashboard.
    pub admin: AdminConfig,
    /// `[source]`: where the directory comes from (SCIM pushes, or pulled from Graph or Okta).
    pub source: SourceConfig,
    /// `[policy]`: IdP groups → TeamCity roles, defaults, caps.
    pub policy: sync::Policy,
}

impl Config {
    /// The SQLite database file `database.url` names, if it names one.
    pub(crate) fn database_file(&self) -> Option<PathBuf> {
        let url = &self.database.url;
        url.strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .map(|p| p.split('?').next().unwrap_or(p))
            .filter(|p| !p.is_empty() && !p.contains(":memory:"))
            .map(PathBuf::from)
    }

    /// The database as an operator should read it in a message: the SQLite file's absolute
    /// path (the default is relative to the working directory), else the URL without its
    /// password.
    pub(crate) fn database_description(&self) -> String {
        match self.database_file() {
            Some(p) => std::path::absolute(&p).unwrap_or(p).display().to_string(),
            None => store::postgres::redact_url(&self.database.url),
        }
    }
}

/// `[teamcity]`: the TeamCity server the bridge keeps equal to the directory.
#[derive(Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TeamCityConfig {
    /// Base URL, with the context path if TeamCity has one (`https://ci.example.com/tc`).
    pub url: String,
    /// Access token of the bridge's TeamCity account (prefer `token_file` or the environment).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<Secret>,
    /// A file holding the token (re-read at start); wins over `token`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Per-request timeout, e.g. `30s`.
    pub request_timeout: String,
    /// Most requests in flight at once.
    pub max_concurrency: usize,
    /// Requests per second, 0 for no limit.
    pub requests_per_second: u32,
    /// PEM file of extra CA certificates to trust for TeamCity (a private CA), in addition to
    /// the system's. Certificates are always verified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

impl TeamCityConfig {
    /// The contents of `ca_file`, checked to hold at least one PEM certificate.
    pub fn read_ca(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(path) = &self.ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .with_context(|| format!("teamcity.ca_file: cannot read {}", path.display()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            anyhow::anyhow!(
                "teamcity.ca_file: {} is not PEM certificates: {e}",
                path.display()
            )
        })?;
        anyhow::ensure!(
            !certs.is_empty(),
            "teamcity.ca_file: {} holds no PEM certificate",
            path.display()
        );
        Ok(Some(pem))
    }
}

impl std::fmt::Debug for TeamCityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TeamCityConfig")
            .field("url", &self.url)
            .field("token", &self.token)
            .field("token_file", &self.token_file)
            .field("request_timeout", &self.request_timeout)
            .field("max_concurrency", &self.max_concurrency)
            .field("requests_per_second", &self.requests_per_second)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

impl Default for TeamCityConfig {
    fn default() -> Self {
        TeamCityConfig {
            url: "http://127.0.0.1:8111".into(),
            token: None,
            token_file: None,
            request_timeout: "30s".into(),
            max_concurrency: 8,
            requests_per_second: 0,
            ca_file: None,
        }
    }
}

/// `[sync]`: how directory changes reach TeamCity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// `apply` writes to TeamCity; `shadow` computes, logs and audits plans but writes nothing.
    pub mode: SyncMode,
    /// How often a full reconcile runs in `serve`, e.g. `10m`.
    pub reconcile_interval: String,
    /// What SCIM DELETE does to the TeamCity user: `strip` (keep it, remove all access) or `delete`.
    pub deprovision: Deprovision,
    /// Hold a batch that would remove access from more than this many users.
    pub max_removals: usize,
    /// ... or from more than this share of managed users.
    pub max_removals_percent: u32,
    /// Longest wait between retries of a failing TeamCity change, e.g. `60s`.
    pub max_backoff: String,
    /// How long a worker owns the outbox rows it claimed; rows of a worker that died are
    /// picked up again after this, e.g. `120s`.
    pub lease: String,
    /// A SCIM user whose username a TeamCity user not created by the bridge already has:
    /// `never` (a visible conflict) or `by_username` (mark it and manage it).
    pub adopt_existing: AdoptExisting,
}

/// `sync.adopt_existing`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AdoptExisting {
    /// Leave such users alone and report the conflict.
    Never,
    /// Take them over by username (audited as adoptions).
    ByUsername,
}

/// Sync mode.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncMode {
    /// Apply plans to TeamCity.
    Apply,
    /// Compute and record plans; write nothing to TeamCity.
    Shadow,
}

/// What SCIM DELETE does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Deprovision {
    /// Keep the TeamCity user (its build history), remove groups, roles and tokens.
    Strip,
    /// Delete the TeamCity user.
    Delete,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            mode: SyncMode::Apply,
            reconcile_interval: "10m".into(),
            deprovision: Deprovision::Strip,
            max_removals: 10,
            max_removals_percent: 20,
            max_backoff: "60s".into(),
            lease: "60s".into(),
            adopt_existing: AdoptExisting::Never,
        }
    }
}

/// A secret from the configuration: never printed, never serialised in clear.
#[derive(Clone)]
pub struct Secret(secrecy::SecretString);

impl Secret {
    /// Wraps a value.
    pub fn new(value: String) -> Self {
        Secret(secrecy::SecretString::from(value))
    }

    /// The value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        use secrecy::ExposeSecret;
        self.0.expose_secret()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl PartialEq for Secret {
    fn eq(&self, other: &Self) -> bool {
        self.expose() == other.expose()
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on; the SCIM base path is `/scim/v2`.
    pub listen: SocketAddr,
    /// A file of SCIM bearer tokens (one per line), re-read when it changes; a token replaced
    /// in the file stays valid for `token_file_grace` so rotation never locks the IdP out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// How long a token removed from `token_file` keeps working, e.g. `10m`.
    pub token_file_grace: String,
    /// Longest a request may take, reading its body included, e.g. `30s`; then a SCIM 503.
    pub request_timeout: String,
    /// Longest wait for a request's headers (and a TLS handshake) before the connection is
    /// closed, e.g. `10s`: slow clients cannot hold connections.
    pub header_read_timeout: String,
    /// Sustained SCIM requests per second per token; 0 turns the per-token limit off.
    pub rate_limit_per_second: u32,
    /// Requests a token may send at once above the sustained rate.
    pub rate_limit_burst: u32,
    /// Memory for cached lookup answers (small list responses, kept until the next write),
    /// in MB; 0 turns the cache off.
    pub lookup_cache_mb: u32,
    /// Failed authentications per minute per client address before that address is refused
    /// with 429 for a while; 0 turns this off.
    pub auth_failures_per_minute: u32,
    /// Take the client address from the last `X-Forwarded-For` entry (set by your reverse
    /// proxy) instead of the TCP peer. Only behind a proxy that sets it.
    pub trust_forwarded_for: bool,
    /// PEM certificate chain; with `tls_key_file`, `serve` speaks HTTPS. Reloaded on change.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key for `tls_cert_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

/// `[source]`: where the directory comes from. `kind = "scim"` (the default) takes SCIM
/// pushes; `"graph"` and `"okta"` pull it from the IdP's API every `interval` (pull mode: SCIM
/// writes answer 405). Secrets are only read from files, re-read when they change.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `scim`, `graph` or `okta`.
    pub kind: String,
    /// How often to pull, e.g. `60s`.
    pub interval: String,
    /// The IdP groups (object ids) whose members are in scope; their members are provisioned,
    /// and the groups become SCIM groups with the object id as `externalId`.
    pub groups: Vec<String>,
    /// Graph: the tenant (directory) id.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tenant_id: String,
    /// Graph: the application (client) id; Okta: the service app's client id (with
    /// `private_key_file`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub client_id: String,
    /// Graph: a file holding the client secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
    /// Graph: the certificate (PEM) registered with the app, with `client_key_file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_certificate_file: Option<PathBuf>,
    /// Graph: the certificate's private key (PEM).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_key_file: Option<PathBuf>,
    /// Graph: the Graph endpoint (sovereign clouds: e.g. `https://graph.microsoft.us`).
    pub graph_url: String,
    /// Graph: the Entra ID authority (sovereign clouds: e.g. `https://login.microsoftonline.us`).
    pub authority_url: String,
    /// Graph: the attribute that becomes the userName: `userPrincipalName` or `mail`.
    pub user_name_attribute: String,
    /// Okta: the org URL, e.g. `https://example.okta.com`.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub org_url: String,
    /// Okta: a file holding an API token (read-only admin).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// Okta: the service app's private key (PEM), instead of an API token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub private_key_file: Option<PathBuf>,
    /// Okta: the `kid` of that key, if the app has several.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: "scim".into(),
            interval: "60s".into(),
            groups: vec![],
            tenant_id: String::new(),
            client_id: String::new(),
            client_secret_file: None,
            client_certificate_file: None,
            client_key_file: None,
            graph_url: source::graph::DEFAULT_GRAPH_URL.into(),
            authority_url: source::graph::DEFAULT_AUTHORITY_URL.into(),
            user_name_attribute: "userPrincipalName".into(),
            org_url: String::new(),
            token_file: None,
            private_key_file: None,
            key_id: None,
        }
    }
}

impl SourceConfig {
    /// Whether the directory is pulled (not pushed over SCIM).
    pub fn is_pull(&self) -> bool {
        self.kind != "scim"
    }

    /// Checks that the keys the kind needs are there (files readable) and the others unused.
    pub fn validate(&self) -> anyhow::Result<()> {
        let need_file = |key: &str, p: &Option<PathBuf>| -> anyhow::Result<()> {
            let Some(p) = p else {
                anyhow::bail!(
                    "source.{key} is required with source.kind = \"{}\"",
                    self.kind
                )
            };
            std::fs::metadata(p)
                .with_context(|| format!("source.{key}: cannot read {}", p.display()))?;
            Ok(())
        };
        let need = |key: &str, v: &str| -> anyhow::Result<()> {
            anyhow::ensure!(
                !v.trim().is_empty(),
                "source.{key} is required with source.kind = \"{}\"",
                self.kind
            );
            Ok(())
        };
        let graph_keys = [
            ("tenant_id", !self.tenant_id.is_empty()),
            ("client_secret_file", self.client_secret_file.is_some()),
            (
                "client_certificate_file",
                self.client_certificate_file.is_some(),
            ),
            ("client_key_file", self.client_key_file.is_some()),
        ];
        let okta_keys = [
            ("org_url", !self.org_url.is_empty()),
            ("token_file", self.token_file.is_some()),
            ("private_key_file", self.private_key_file.is_some()),
            ("key_id", self.key_id.is_some()),
        ];
        let foreign: Vec<&str> = match self.kind.as_str() {
            "graph" => okta_keys.iter(),
            "okta" => graph_keys.iter(),
            _ => [].iter(),
        }
        .filter(|(_, set)| *set)
        .map(|(k, _)| *k)
        .collect();
        anyhow::ensure!(
            foreign.is_empty(),
            "source.{} do(es) not apply to source.kind = \"{}\": remove it, or change the kind",
            foreign.join(", source."),
            self.kind
        );
        crate::ttl::parse(&self.interval).context("`source.interval`")?;
        match self.kind.as_str() {
            "scim" => return Ok(()),
            "graph" => {
                need("tenant_id", &self.tenant_id)?;
                need("client_id", &self.client_id)?;
                match (&self.client_secret_file, &self.client_certificate_file) {
                    (Some(_), None) => need_file("client_secret_file", &self.client_secret_file)?,
                    (None, Some(_)) => {
                        need_file("client_certificate_file", &self.client_certificate_file)?;
                        need_file("client_key_file", &self.client_key_file)?;
                    }
                    _ => anyhow::bail!(
                        "source.kind = \"graph\" needs exactly one credential: \
                         source.client_secret_file, or source.client_certificate_file with \
                         source.client_key_file"
                    ),
                }
                anyhow::ensure!(
                    matches!(
                        self.user_name_attribute.as_str(),
                        "userPrincipalName" | "mail"
                    ),
                    "source.user_name_attribute: {:?} is not userPrincipalName or mail",
                    self.user_name_attribute
                );
                for (key, url) in [
                    ("graph_url", &self.graph_url),
                    ("authority_url", &self.authority_url),
                ] {
                    reqwest::Url::parse(url)
                        .with_context(|| format!("source.{key}: {url:?} is not a URL"))?;
                }
            }
            "okta" => {
                need("org_url", &self.org_url)?;
                reqwest::Url::parse(&self.org_url)
                    .with_context(|| format!("source.org_url: {:?} is not a URL", self.org_url))?;
                match (&self.token_file, &self.private_key_file) {
                    (Some(_), None) => need_file("token_file", &self.token_file)?,
                    (None, Some(_)) => {
                        need("client_id", &self.client_id)?;
                        need_file("private_key_file", &self.private_key_file)?;
                    }
                    _ => anyhow::bail!(
                        "source.kind = \"okta\" needs exactly one credential: source.token_file \
                         (an API token), or source.private_key_file with source.client_id (an \
                         OAuth service app)"
                    ),
                }
            }
            other => anyhow::bail!(
                "source.kind: {other:?} is not one of \"scim\" (SCIM pushes), \"graph\" \
                 (Microsoft Graph) or \"okta\""
            ),
        }
        anyhow::ensure!(
            !self.groups.is_empty(),
            "source.groups is empty: list the IdP groups (object ids) whose members are in scope"
        );
        Ok(())
    }
}

/// `[admin]`: the read-only dashboard.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the dashboard, e.g. `127.0.0.1:8081`; empty turns it off. It shows who has
    /// which access: keep it on a private address.
    pub listen: String,
    /// A file of admin tokens (one per line, `#` comments), re-read when it changes, besides
    /// those made with `token create --admin`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:8081".into(),
            token_file: None,
        }
    }
}

impl AdminConfig {
    /// The dashboard's address; `None` when it is off.
    pub(crate) fn address(&self) -> anyhow::Result<Option<SocketAddr>> {
        let text = self.listen.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|_| {
            anyhow::anyhow!(
                "admin.listen: {text:?} is not an address like 127.0.0.1:8081 (empty turns the dashboard off)"
            )
        })
    }
}

/// `[database]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (created if missing) or
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?max_connections=N]` (the database must
    /// exist; the schema is created and migrated).
    pub url: String,
    /// A file holding the URL (for URLs with credentials); wins over `url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_file: Option<PathBuf>,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `info,server=debug`; `RUST_LOG` overrides it.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[audit]`: retention of the audit trail.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Keep events this long, e.g. `400d`; `0` keeps them forever. `serve` prunes daily.
    pub retention: String,
    /// The HMAC key that signs prune checkpoints; default `<database file>.audit-key`,
    /// created on the first prune.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checkpoint_key_file: Option<PathBuf>,
    /// The Ed25519 private key (PKCS#8 PEM) that signs the chain's head; `audit keygen` writes
    /// one. Unset: no signed heads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key_file: Option<PathBuf>,
    /// How often `serve` signs the head (and once at clean shutdown), e.g. `5m`.
    pub head_interval: String,
    /// `[[audit.sinks]]`: where every event is streamed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sinks: Vec<audit::SinkConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            retention: "0".into(),
            checkpoint_key_file: None,
            signing_key_file: None,
            head_interval: "5m".into(),
            sinks: Vec::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token_file: None,
            token_file_grace: "10m".into(),
            request_timeout: "30s".into(),
            header_read_timeout: "10s".into(),
            rate_limit_per_second: 500,
            rate_limit_burst: 1000,
            lookup_cache_mb: 16,
            auth_failures_per_minute: 30,
            trust_forwarded_for: false,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        DatabaseConfig {
            url: "sqlite://teamcity-scim.db".into(),
            url_file: None,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// The layered sources, without reading secret files yet.
pub fn figment(file: Option<&Path>) -> Figment {
    let mut f = Figment::from(Serialized::defaults(Config::default()));
    if let Some(path) = file {
        f = f.merge(Toml::file_exact(path));
    }
    f.merge(Env::prefixed(ENV_PREFIX).split("__"))
}

/// Loads and validates the configuration.
pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
    if let Some(path) = file {
        anyhow::ensure!(
            path.exists(),
            "config file {} does not exist",
            path.display()
        );
    }
    let mut cfg: Config = figment(file).extract().map_err(describe)?;
    if let Some(path) = &cfg.database.url_file {
        let url = std::fs::read_to_string(path)
            .with_context(|| format!("database.url_file: cannot read {}", path.display()))?;
        cfg.database.url = url.trim().to_owned();
    }
    if let Some(path) = &cfg.teamcity.token_file {
        let token = std::fs::read_to_string(path)
            .with_context(|| format!("teamcity.token_file: cannot read {}", path.display()))?;
        cfg.teamcity.token = Some(Secret::new(token.trim().to_owned()));
    }
    for (key, value) in [
        ("teamcity.request_timeout", &cfg.teamcity.request_timeout),
        ("sync.reconcile_interval", &cfg.sync.reconcile_interval),
        ("sync.max_backoff", &cfg.sync.max_backoff),
        ("server.request_timeout", &cfg.server.request_timeout),
        (
            "server.header_read_timeout",
            &cfg.server.header_read_timeout,
        ),
        ("server.token_file_grace", &cfg.server.token_file_grace),
        ("sync.lease", &cfg.sync.lease),
        ("audit.head_interval", &cfg.audit.head_interval),
    ] {
        crate::ttl::parse(value).with_context(|| format!("`{key}`"))?;
    }
    if !matches!(cfg.audit.retention.trim(), "" | "0") {
        crate::ttl::parse(&cfg.audit.retention).context("`audit.retention`")?;
    }
    for sink in &cfg.audit.sinks {
        sink.validate()?;
    }
    cfg.source.validate()?;
    let admin = cfg.admin.address()?;
    if admin.is_some() && admin == Some(cfg.server.listen) {
        anyhow::bail!(
            "`admin.listen` and `server.listen` are both {}: the dashboard needs its own address \
             (or set admin.listen = \"\" to turn it off)",
            cfg.server.listen
        );
    }
    match (&cfg.server.tls_cert_file, &cfg.server.tls_key_file) {
        (Some(_), Some(_)) | (None, None) => {}
        _ => anyhow::bail!(
            "`server.tls_cert_file` and `server.tls_key_file` go together: set both for HTTPS, \
             or neither for plain HTTP behind a reverse proxy"
        ),
    }
    for (key, path) in [
        ("server.tls_cert_file", &cfg.server.tls_cert_file),
        ("server.tls_key_file", &cfg.server.tls_key_file),
    ] {
        if let Some(path) = path {
            std::fs::metadata(path)
                .with_context(|| format!("{key}: cannot read {}", path.display()))?;
        }
    }
    cfg.teamcity.read_ca()?;
    anyhow::ensure!(
        cfg.teamcity.max_concurrency > 0,
        "`teamcity.max_concurrency` must be at least 1"
    );
    anyhow::ensure!(
        cfg.sync.max_removals_percent <= 100,
        "`sync.max_removals_percent` is a share of managed users: 0..=100"
    );
    anyhow::ensure!(
        ["sqlite:", "postgres://", "postgresql://"]
            .iter()
            .any(|p| cfg.database.url.starts_with(p)),
        "database.url: `{}` is not supported; use sqlite://PATH or postgres://USER@HOST/DB",
        cfg.database.url.split(':').next().unwrap_or_default()
    );
    Ok(cfg)
}

/// One line per problem, each naming the key and the source its value came from.
fn describe(e: figment::Error) -> anyhow::Error {
    let lines: Vec<String> = e
        .into_iter()
        .map(|e| {
            let key: Vec<String> = e
                .path
                .iter()
                .map(|p| p.to_lowercase())
                .skip_while(|p| p == "default")
                .collect();
            let source = match (&e.metadata, key.is_empty()) {
                (Some(m), _) => match &m.source {
                    Some(figment::Source::File(f)) => format!(" in {}", f.display()),
                    _ if m.name.contains("environment") => format!(
                        " in environment variable {ENV_PREFIX}{}",
                        key.iter()
                            .map(|k| k.to_uppercase())
                            .collect::<Vec<_>>()
                            .join("__")
                    ),
                    _ => format!(" in {}", m.name),
                },
                (None, _) => String::new(),
            };
            format!("`{}`: {}{source}", key.join("."), e.kind)
        })
        .collect();
    anyhow::anyhow!("invalid configuration: {}", lines.join("; "))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    const EXAMPLE: &str = include_str!("../../../config.example.toml");

    fn keys(v: &toml::Value, prefix: &str, out: &mut BTreeSet<String>) {
        if let toml::Value::Table(t) = v {
            for (k, v) in t {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // `match` is one value with alternative shapes, not a section.
                if v.is_table() && k != "match" {
                    keys(v, &key, out);
                } else if let Some(first) = v
                    .as_array()
                    .and_then(|a| a.first())
                    .filter(|f| f.is_table())
                {
                    keys(first, &key, out);
                } else {
                    out.insert(key);
                }
            }
        }
    }

    /// Every key the code knows is in the example (set or shown commented out), and every key
    /// the example sets is one the code accepts, with the code's default value.
    #[test]
    fn the_source_is_validated_per_kind() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let graph = SourceConfig {
            kind: "graph".into(),
            groups: vec!["g".into()],
            tenant_id: "t".into(),
            client_id: "c".into(),
            client_secret_file: Some(secret.clone()),
            ..SourceConfig::default()
        };
        graph.validate().expect("a complete graph source");
        let err = |c: SourceConfig| format!("{:#}", c.validate().unwrap_err());
        for (c, want) in [
            (
                SourceConfig {
                    tenant_id: String::new(),
                    ..graph.clone()
                },
                "source.tenant_id is required",
            ),
            (
                SourceConfig {
                    client_secret_file: None,
                    ..graph.clone()
                },
                "needs exactly one credential",
            ),
            (
                SourceConfig {
                    client_secret_file: Some(dir.path().join("missing")),
                    ..graph.clone()
                },
                "source.client_secret_file: cannot read",
            ),
            (
                SourceConfig {
                    token_file: Some(secret.clone()),
                    ..graph.clone()
                },
                "source.token_file do(es) not apply to source.kind = \"graph\"",
            ),
            (
                SourceConfig {
                    interval: "0s".into(),
                    ..graph.clone()
                },
                "invalid duration `0s`",
            ),
            (
                SourceConfig {
                    groups: vec![],
                    ..graph.clone()
                },
                "source.groups is empty",
            ),
            (
                SourceConfig {
                    kind: "ldap".into(),
                    tenant_id: String::new(),
                    client_secret_file: None,
                    ..graph.clone()
                },
                "is not one of",
            ),
            (
                SourceConfig {
                    kind: "okta".into(),
                    groups: vec!["g".into()],
                    org_url: "https://example.okta.com".into(),
                    ..SourceConfig::default()
                },
                "needs exactly one credential",
            ),
        ] {
            let e = err(c);
            assert!(e.contains(want), "{e:?} should say {want:?}");
        }
        let okta = SourceConfig {
            kind: "okta".into(),
            groups: vec!["g".into()],
            org_url: "https://example.okta.com".into(),
            token_file: Some(secret),
            ..SourceConfig::default()
        };
        okta.validate().expect("a complete okta source");
        SourceConfig::default()
            .validate()
            .expect("push mode needs nothing");
    }

    #[test]
    fn example_is_in_step_with_the_code() {
        let mut full = Config::default();
        full.database.url_file = Some("/run/secrets/database-url".into());
        full.teamcity.token = Some(Secret::new("x".into()));
        full.server.token_file = Some("/run/secrets/scim-tokens".into());
        full.teamcity.token_file = Some("/run/secrets/teamcity-token".into());
        full.audit.checkpoint_key_file = Some("/run/secrets/audit-checkpoint-key".into());
        full.teamcity.ca_file = Some("/etc/teamcity-scim/teamcity-ca.pem".into());
        full.server.tls_cert_file = Some("/etc/teamcity-scim/tls.crt".into());
        full.server.tls_key_file = Some("/etc/teamcity-scim/tls.key".into());
        full.admin.token_file = Some("/run/secrets/admin-tokens".into());
        full.audit.signing_key_file = Some("/etc/teamcity-scim/audit-signing.pem".into());
        full.audit.sinks = vec![audit::SinkConfig {
            kind: audit::SinkKind::Syslog,
            name: Some("siem".into()),
            address: Some("siem.example.com:6514".into()),
            tls: true,
            ca_file: Some("/etc/teamcity-scim/siem-ca.pem".into()),
            url: Some("https://audit.example.com/ingest".into()),
            secret_file: Some("/run/secrets/audit-webhook-key".into()),
            path: Some("/var/log/teamcity-scim/audit.jsonl".into()),
        }];
        full.source.tenant_id = "00000000-0000-0000-0000-000000000000".into();
        full.source.client_id = "11111111-1111-1111-1111-111111111111".into();
        full.source.client_secret_file = Some("/run/secrets/graph-client-secret".into());
        full.source.client_certificate_file = Some("/etc/teamcity-scim/graph-app.crt".into());
        full.source.client_key_file = Some("/run/secrets/graph-app.key".into());
        full.source.org_url = "https://example.okta.com".into();
        full.source.token_file = Some("/run/secrets/okta-api-token".into());
        full.source.private_key_file = Some("/run/secrets/okta-app.pem".into());
        full.source.key_id = Some("kid-1".into());
        full.policy = sync::Policy::from_toml(
            "[[groups]]\nname = \"x\"\nmatch = { externalId = \"x\" }\nroles = []\n\
             [defaults]\nroles = []\n[[caps]]\nuser_type = \"Agent\"\nallowed_roles = []\n",
        )
        .unwrap();
        let mut code_keys = BTreeSet::new();
        keys(&toml::Value::try_from(&full).unwrap(), "", &mut code_keys);

        // Uncommenting every `# key = value` line must give a file the code accepts.
        let mut section = String::new();
        let mut example_keys = BTreeSet::new();
        let mut uncommented = String::new();
        for line in EXAMPLE.lines() {
            let l = line.trim_start_matches('#').trim();
            if l.starts_with('[') {
                section = l.trim_matches(|c| c == '[' || c == ']').to_owned();
                uncommented.push_str(l);
            } else if let Some((k, _)) = l.split_once(" = ") {
                example_keys.insert(format!("{section}.{}", k.trim()));
                uncommented.push_str(l);
            }
            uncommented.push('\n');
        }
        assert_eq!(
            code_keys, example_keys,
            "config.example.toml and Config disagree on keys"
        );
        let parsed: Config =
            toml::from_str(&uncommented).expect("example parses with every key set");
        assert_eq!(parsed.server, full.server);

        // What the example sets uncommented are the defaults.
        let set_only: Config = toml::from_str(EXAMPLE).unwrap();
        assert_eq!(set_only, Config::default());
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail API returns figment::Error"
    )]
    fn layers_and_errors_name_key_and_source() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                "[server]\nlisten = \"127.0.0.1:9000\"\n[database]\nurl = \"sqlite://a.db\"\n",
            )?;
            let c = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.server.listen.port(), 9000);
            jail.set_env("TEAMCITY_SCIM_SERVER__LISTEN", "127.0.0.1:9100");
            let c = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(c.server.listen.port(), 9100, "env beats the file");
            jail.create_file("url", "sqlite://from-file.db\n")?;
            jail.set_env("TEAMCITY_SCIM_DATABASE__URL_FILE", "url");
            let c = load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(
                c.database.url, "sqlite://from-file.db",
                "*_file beats everything"
            );

            jail.set_env("TEAMCITY_SCIM_SERVER__LISTEN", "not-an-address");
            let e = load(Some(Path::new("c.toml"))).unwrap_err().to_string();
            assert!(
                e.contains("server.listen") && e.to_lowercase().contains("environment"),
                "{e}"
            );

            jail.clear_env();
            jail.create_file("bad.toml", "[server]\nlisen = \"127.0.0.1:1\"\n")?;
            let e = load(Some(Path::new("bad.toml"))).unwrap_err().to_string();
            assert!(e.contains("lisen") && e.contains("bad.toml"), "{e}");
            Ok(())
        });
    }

    #[test]
    #[expect(
        clippy::result_large_err,
        reason = "figment's Jail API returns figment::Error"
    )]
    fn tls_and_ca_files_are_checked_at_load() {
        figment::Jail::expect_with(|jail| {
            let c = load(None).unwrap();
            assert_eq!(c.server.rate_limit_per_second, 500);
            assert_eq!(c.server.rate_limit_burst, 1000);
            assert_eq!(c.server.request_timeout, "30s");
            assert_eq!(c.server.header_read_timeout, "10s");

            jail.set_env("TEAMCITY_SCIM_TEAMCITY__CA_FILE", "/nonexistent/ca.pem");
            let e = format!("{:#}", load(None).unwrap_err());
            assert!(
                e.contains("teamcity.ca_file") && e.contains("/nonexistent/ca.pem"),
                "{e}"
            );
            jail.create_file("ca.pem", "not a certificate\n")?;
            jail.set_env("TEAMCITY_SCIM_TEAMCITY__CA_FILE", "ca.pem");
            let e = format!("{:#}", load(None).unwrap_err());
            assert!(
                e.contains("teamcity.ca_file") && e.contains("ca.pem"),
                "{e}"
            );
            jail.clear_env();

            jail.create_file("tls.crt", "x")?;
            jail.set_env("TEAMCITY_SCIM_SERVER__TLS_CERT_FILE", "tls.crt");
            let e = format!("{:#}", load(None).unwrap_err());
            assert!(e.contains("tls_key_file"), "{e}");
            jail.set_env("TEAMCITY_SCIM_SERVER__TLS_KEY_FILE", "missing.key");
            let e = format!("{:#}", load(None).unwrap_err());
            assert!(
                e.contains("server.tls_key_file") && e.contains("missing.key"),
                "{e}"
            );
            jail.create_file("tls.key", "x")?;
            jail.set_env("TEAMCITY_SCIM_SERVER__TLS_KEY_FILE", "tls.key");
            assert!(load(None).is_ok());

            jail.set_env("TEAMCITY_SCIM_SERVER__HEADER_READ_TIMEOUT", "soon");
            let e = format!("{:#}", load(None).unwrap_err());
            assert!(e.contains("server.header_read_timeout"), "{e}");
            Ok(())
        });
    }
}
