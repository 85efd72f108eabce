//! `audit verify|export|tail|prune` and `access-review`: the tamper-evident trail and the
//! access state reconstructed from it. See docs/AUDIT.md.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Subcommand, ValueEnum};
use rand::RngCore;
use serde_json::Value;
use store::access::{AccessRow, reconstruct};
use store::audit::{VerifyError, looks_like_email, verify_store};
use store::{AuditEvent, DynStore, WriteCtx, timefmt};
use time::OffsetDateTime;

use crate::config::Config;

/// `audit` subcommands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain (from the last checkpoint) and name the first broken link; with
    /// `--public-key`, also check every signed head (detects a rewrite of the whole trail).
    Verify {
        /// The Ed25519 public key (PEM) whose signed heads to check (`audit keygen` wrote it).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Write a folder of evidence for an audit period: access at both ends, every access change
    /// with its cause, held batches, the policy and configuration, the verification result and
    /// a SHA-256 manifest.
    Evidence {
        /// Start of the period (RFC 3339).
        #[arg(long)]
        from: String,
        /// End of the period (RFC 3339, or `now`).
        #[arg(long, default_value = "now")]
        to: String,
        /// A new (or empty) folder to write.
        #[arg(long)]
        output: PathBuf,
        /// The public key whose signed heads to check (default: the public half of
        /// `[audit] signing_key_file`).
        #[arg(long)]
        public_key: Option<PathBuf>,
    },
    /// Write a new Ed25519 key pair for signed heads: FILE (private, mode 0600) and FILE.pub.
    Keygen {
        /// Where to write the private key; the public key goes to FILE.pub.
        #[arg(long)]
        output: PathBuf,
    },
    /// Write events as JSON Lines (one event per line, RFC 3339 times).
    Export {
        /// Only events at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only events at or before this time (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// Write to this file instead of stdout.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Print events as they are written (polling); Ctrl-C stops.
    Tail {
        /// Start after this sequence number (default: the newest event, i.e. only new ones).
        #[arg(long)]
        from_seq: Option<i64>,
    },
    /// Delete old events behind a signed checkpoint.
    Prune {
        /// Delete events older than this time (RFC 3339); default: now minus `[audit] retention`.
        #[arg(long)]
        before: Option<String>,
    },
}

/// Output format of `access-review`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReviewFormat {
    /// Comma-separated, with a header line.
    Csv,
    /// A JSON array of rows.
    Json,
}

/// Parses `now` or an RFC 3339 time.
pub(crate) fn parse_time(s: &str) -> anyhow::Result<OffsetDateTime> {
    if s == "now" {
        return Ok(OffsetDateTime::now_utc());
    }
    timefmt::parse(s).with_context(|| {
        format!("invalid time `{s}`: expected RFC 3339, e.g. 2026-03-01T12:00:00Z, or `now`")
    })
}

/// `[audit] retention`, or `None` for keep forever (`0` or empty).
pub(crate) fn retention(cfg: &Config) -> anyhow::Result<Option<time::Duration>> {
    let r = cfg.audit.retention.trim();
    if r.is_empty() || r == "0" {
        return Ok(None);
    }
    Ok(Some(crate::ttl::parse(r).context("`audit.retention`")?))
}

/// Where the checkpoint key lives: `[audit] checkpoint_key_file`, else `<database file>.audit-key`.
pub(crate) fn key_path(cfg: &Config) -> anyhow::Result<PathBuf> {
    if let Some(p) = &cfg.audit.checkpoint_key_file {
        return Ok(p.clone());
    }
    let path = cfg.database_file();
    match path {
        Some(p) => Ok(PathBuf::from(format!("{}.audit-key", p.display()))),
        None => bail!(
            "set `[audit] checkpoint_key_file`: there is no database file to keep the key next to"
        ),
    }
}

/// Reads the checkpoint key (hex, or raw bytes). With `create`, a missing key file is created
/// once with 32 random bytes (mode 0600).
/// Without `create`, no place for a key (a PostgreSQL database and no
/// `checkpoint_key_file`) reads as no key, like a key file that does not exist.
pub(crate) fn load_key(cfg: &Config, create: bool) -> anyhow::Result<Option<Vec<u8>>> {
    let path = match key_path(cfg) {
        Ok(p) => p,
        Err(_) if !create => return Ok(None),
        Err(e) => return Err(e),
    };
    match std::fs::read(&path) {
        Ok(raw) => {
            let text = String::from_utf8_lossy(&raw);
            let t = text.trim();
            let key = hex::decode(t).unwrap_or_else(|_| t.as_bytes().to_vec());
            if key.len() < 16 {
                bail!(
                    "checkpoint key in {} is too short (use 32 random bytes)",
                    path.display()
                );
            }
            Ok(Some(key))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
            let mut key = [0u8; 32];
            rand::rng().fill_bytes(&mut key);
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create_new(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                opts.mode(0o600);
            }
            let mut f = opts
                .open(&path)
                .with_context(|| format!("cannot create the checkpoint key {}", path.display()))?;
            f.write_all(hex::encode(key).as_bytes())?;
            tracing::info!(path = %path.display(), "created the audit checkpoint key");
            Ok(Some(key.to_vec()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// An export line back as an event (for checking an export on its own).
#[cfg(test)]
pub(crate) fn event_from_json(v: &Value) -> anyhow::Result<AuditEvent> {
    let s = |k: &str| -> anyhow::Result<String> {
        v.get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("missing `{k}`"))
    };
    let o = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    Ok(AuditEvent {
        seq: v["seq"].as_i64().context("missing `seq`")?,
        time: s("time")?,
        actor: s("actor")?,
        request_id: o("request_id"),
        resource_type: s("resource_type")?,
        resource_id: o("resource_id"),
        operation: s("operation")?,
        outcome: s("outcome")?,
        status: v["status"].as_i64(),
        detail: v["detail"].to_string(),
        prev_hash: s("prev_hash")?,
        hash: s("hash")?,
    })
}

/// `audit verify [--public-key FILE]`: 0 when the chain (and every signed head) is intact, 1
/// when not.
pub(crate) async fn verify(
    cfg: &Config,
    store: &DynStore,
    public_key: Option<&ed25519_dalek::VerifyingKey>,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let chain = verify_chain_only(cfg, store, out).await?;
    let Some(key) = public_key else {
        // Heads are signed: say how to check them.
        if chain == 0 && cfg.audit.signing_key_file.is_some() {
            writeln!(
                out,
                "(the chain alone does not detect a rewrite by someone who can write the database: \
                 pass --public-key to check the signed heads)"
            )?;
        }
        return Ok(chain);
    };
    let r = audit::heads::verify(&**store, key).await?;
    match &r.problem {
        None => {
            let (seq, time) = r.newest.clone().unwrap_or_default();
            writeln!(
                out,
                "signed heads OK: {} verified with key {} (newest covers seq {seq}, signed {time}); \
                 {} events after it are not covered yet{}{}",
                r.verified,
                audit::heads::key_id(key),
                r.uncovered,
                if r.other_keys > 0 {
                    format!(
                        "; {} heads signed by other keys were not checked",
                        r.other_keys
                    )
                } else {
                    String::new()
                },
                if r.pruned > 0 {
                    format!("; {} heads cover pruned events", r.pruned)
                } else {
                    String::new()
                },
            )?;
            Ok(chain)
        }
        Some(p) => {
            writeln!(out, "SIGNED HEADS FAILED: {p}")?;
            Ok(1)
        }
    }
}

/// Writes a key pair for signed heads.
pub(crate) fn keygen(output: &std::path::Path, out: &mut dyn Write) -> anyhow::Result<()> {
    let mut public = output.as_os_str().to_owned();
    public.push(".pub");
    let public = PathBuf::from(public);
    let id = audit::heads::keygen(output, &public)?;
    writeln!(
        out,
        "wrote {} (private: keep it where the database's writers cannot read it) and {} (public: \
         publish it and keep a copy off this machine); key id {id}. Set `[audit] signing_key_file` \
         to the private key.",
        output.display(),
        public.display()
    )?;
    Ok(())
}

/// The hash chain part of `audit verify`.
async fn verify_chain_only(
    cfg: &Config,
    store: &DynStore,
    out: &mut dyn Write,
) -> anyhow::Result<u8> {
    let key = load_key(cfg, false)?;
    match verify_store(store.as_ref(), key.as_deref(), 1000).await {
        Ok(r) => {
            let cp = r
                .checkpoint_seq
                .map(|s| format!(" (checkpoint at {s})"))
                .unwrap_or_else(|| " (no checkpoint, from genesis)".into());
            match (r.first_seq, r.last_seq) {
                (Some(a), Some(b)) => writeln!(
                    out,
                    "audit chain OK: {} events from seq {a} to {b}{cp}",
                    r.events
                )?,
                _ => writeln!(out, "audit chain OK: 0 events{cp}")?,
            }
            Ok(0)
        }
        Err(VerifyError::Store(e)) => Err(e.into()),
        Err(e) => {
            writeln!(out, "{e}")?;
            Ok(1)
        }
    }
}

/// `audit export`: JSON Lines. Returns the number of events written.
pub(crate) async fn export(
    store: &DynStore,
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    out: &mut dyn Write,
) -> anyhow::Result<u64> {
    let mut after = 0;
    let mut n = 0;
    loop {
        let page = store.audit_range(since, until, after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for e in &page {
            writeln!(out, "{}", e.to_json())?;
            n += 1;
        }
    }
    out.flush()?;
    Ok(n)
}

/// A one-line human rendering for `audit tail`.
fn tail_line(e: &AuditEvent) -> String {
    format!(
        "{:>7} {} {:<14} {:<26} {:<10} {} {} {}",
        e.seq,
        e.time,
        e.actor,
        e.operation,
        e.resource_type,
        e.resource_id.as_deref().unwrap_or("-"),
        match e.status {
            Some(s) => format!("{} {s}", e.outcome),
            None => e.outcome.clone(),
        },
        e.detail
    )
}

/// `audit tail`: prints new events every second until Ctrl-C.
pub(crate) async fn tail(
    store: &DynStore,
    from_seq: Option<i64>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut after = match from_seq {
        Some(s) => s,
        None => {
            // The newest seq: page forward from the checkpoint.
            let mut last = store.audit_checkpoint().await?.map_or(0, |c| c.last_seq);
            loop {
                let page = store.audit_events(last, 10_000).await?;
                match page.last() {
                    Some(e) => last = e.seq,
                    None => break last,
                }
            }
        }
    };
    let stop = crate::shutdown_signal();
    tokio::pin!(stop);
    loop {
        let page = store.audit_events(after, 1000).await?;
        for e in &page {
            writeln!(out, "{}", tail_line(e))?;
            after = e.seq;
        }
        out.flush()?;
        if page.len() == 1000 {
            continue;
        }
        tokio::select! {
            () = &mut stop => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// `audit prune`, and the daily retention run of `serve`.
pub(crate) async fn prune(
    cfg: &Config,
    store: &DynStore,
    ctx: &WriteCtx,
    before: Option<OffsetDateTime>,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<()> {
    let before = match (before, retention(cfg)?) {
        (Some(b), _) => b,
        (None, Some(r)) => OffsetDateTime::now_utc() - r,
        (None, None) => {
            bail!("`[audit] retention` is 0 (keep forever): pass --before TIME to prune anyway")
        }
    };
    let before = clamp_to_sinks(cfg, store, before, out).await?;
    let key = load_key(cfg, true)?.context("no checkpoint key")?;
    match store.prune_audit(ctx, before, &key).await? {
        Some(cp) => writeln!(
            out,
            "pruned {} events before {} (seq up to {}); checkpoint {} signed; {} pruned in all",
            cp.pruned,
            timefmt::format(before),
            cp.last_seq,
            cp.id,
            cp.total_pruned
        )?,
        None => writeln!(out, "nothing to prune before {}", timefmt::format(before))?,
    }
    Ok(())
}

/// Never prunes what a configured sink has not received: `before` is moved back to the time of
/// the oldest event some sink still waits for.
async fn clamp_to_sinks(
    cfg: &Config,
    store: &DynStore,
    before: OffsetDateTime,
    out: &mut (dyn Write + Send),
) -> anyhow::Result<OffsetDateTime> {
    let mut clamped = before;
    for sink in &cfg.audit.sinks {
        let name = sink.name();
        let pos = audit::sinks::position(&**store, &name).await?;
        if let Some(next) = store.audit_events(pos, 1).await?.first()
            && let Some(t) = timefmt::parse(&next.time)
            && t < clamped
        {
            writeln!(
                out,
                "audit sink {name:?} has not received events from seq {} on: pruning only before {}",
                next.seq,
                timefmt::format(t)
            )?;
            clamped = t;
        }
    }
    Ok(clamped)
}

/// `serve`'s retention: prunes once at start and then daily while `[audit] retention` is set.
pub(crate) fn spawn_retention(
    cfg: &Config,
    store: DynStore,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    if retention(cfg)?.is_none() {
        return Ok(None);
    }
    // Fail at start, not a day later, when there is nowhere to keep the key.
    key_path(cfg)?;
    let cfg = cfg.clone();
    Ok(Some(tokio::spawn(async move {
        let ctx = WriteCtx {
            actor: "retention".into(),
            request_id: None,
        };
        loop {
            let mut msg = Vec::new();
            match prune(&cfg, &store, &ctx, None, &mut msg).await {
                Ok(()) => tracing::info!(
                    result = %String::from_utf8_lossy(&msg).trim(),
                    "audit retention"
                ),
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "audit retention failed"),
            }
            tokio::select! {
                _ = stop.changed() => return,
                () = tokio::time::sleep(Duration::from_secs(24 * 3600)) => {}
            }
        }
    })))
}

/// Review rows with `user` set: the TeamCity username (from the mapping, else the SCIM
/// userName) unless it looks like an email, else the SCIM id.
pub(crate) async fn review_rows(
    store: &DynStore,
    at: OffsetDateTime,
) -> anyhow::Result<Vec<AccessRow>> {
    let state = reconstruct(store.as_ref(), at).await?;
    let names: std::collections::BTreeMap<String, String> = store
        .mappings(scim::ResourceKind::User)
        .await?
        .into_iter()
        .map(|m| (m.scim_id, m.teamcity_name))
        .collect();
    let mut rows = state.rows();
    for r in &mut rows {
        let Some(scim) = r.scim_id.clone() else {
            continue;
        };
        let name = match names.get(&scim) {
            Some(n) => Some(n.clone()),
            None => store
                .get(scim::ResourceKind::User, &scim, store::ReadOpts::default())
                .await?
                .and_then(|u| {
                    u.attrs
                        .get("userName")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                }),
        };
        r.user = name.filter(|n| !looks_like_email(n)).unwrap_or(scim);
    }
    Ok(rows)
}

pub(crate) fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// Writes review rows.
pub(crate) fn write_review(
    rows: &[AccessRow],
    format: ReviewFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    match format {
        ReviewFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, rows)?;
            writeln!(out)?;
        }
        ReviewFormat::Csv => {
            writeln!(
                out,
                "teamcity_user_id,scim_id,user,role,scope,via,group_name,deactivated"
            )?;
            for r in rows {
                let f = [
                    r.teamcity_user_id.as_deref().unwrap_or(""),
                    r.scim_id.as_deref().unwrap_or(""),
                    &r.user,
                    &r.role,
                    &r.scope,
                    &r.via,
                    r.group_name.as_deref().unwrap_or(""),
                    if r.deactivated { "true" } else { "false" },
                ];
                let line: Vec<String> = f.iter().map(|s| csv_field(s)).collect();
                writeln!(out, "{}", line.join(","))?;
            }
        }
    }
    Ok(())
}

/// `access-review`: checks the checkpoint it starts from, then replays to `at`.
pub(crate) async fn access_review(
    cfg: &Config,
    store: &DynStore,
    at: OffsetDateTime,
    format: ReviewFormat,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if let Some(cp) = store.audit_checkpoint().await? {
        let key = load_key(cfg, false)?
            .context("events were pruned but there is no checkpoint key to check the checkpoint")?;
        if !cp.signature_valid(&key) {
            bail!(
                "audit checkpoint {} has an invalid signature: the replay cannot start from it \
                 (run `teamcity-scim audit verify`)",
                cp.id
            );
        }
    }
    let rows = review_rows(store, at).await?;
    write_review(&rows, format, out)
}

/// Dispatches `audit ...`; the result is the exit code.
pub(crate) async fn run(cmd: AuditCommand, cfg: &Config, store: &DynStore) -> anyhow::Result<u8> {
    let stdout = &mut std::io::stdout();
    match cmd {
        AuditCommand::Verify { public_key } => {
            let key = public_key
                .as_deref()
                .map(audit::heads::load_verifying_key)
                .transpose()?;
            return verify(cfg, store, key.as_ref(), stdout).await;
        }
        AuditCommand::Evidence {
            from,
            to,
            output,
            public_key,
        } => {
            let from = parse_time(&from)?;
            let to = parse_time(&to)?;
            let files =
                crate::evidence::evidence(cfg, store, from, to, &output, public_key.as_deref())
                    .await?;
            writeln!(
                stdout,
                "wrote {} files to {}:",
                files.len(),
                output.display()
            )?;
            for f in &files {
                writeln!(
                    stdout,
                    "  {}",
                    f.file_name().and_then(|n| n.to_str()).unwrap_or_default()
                )?;
            }
        }
        AuditCommand::Keygen { output } => keygen(&output, stdout)?,
        AuditCommand::Export {
            since,
            until,
            output,
        } => {
            let since = since.as_deref().map(parse_time).transpose()?;
            let until = until.as_deref().map(parse_time).transpose()?;
            match output {
                Some(path) => {
                    let f = std::fs::File::create(&path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut w = std::io::BufWriter::new(f);
                    let n = export(store, since, until, &mut w).await?;
                    eprintln!("exported {n} events to {}", path.display());
                }
                None => {
                    let mut w = std::io::BufWriter::new(stdout.lock());
                    export(store, since, until, &mut w).await?;
                }
            }
        }
        AuditCommand::Tail { from_seq } => tail(store, from_seq, stdout).await?,
        AuditCommand::Prune { before } => {
            let before = before.as_deref().map(parse_time).transpose()?;
            prune(cfg, store, &WriteCtx::cli(), before, stdout).await?;
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use scim::ResourceKind;
    use store::{ReadOpts, SystemClock};
    use sync::{Engine, EngineConfig};
    use teamcity_emulator::EmulatorOptions;

    use serde_json::json;

    use super::*;

    const POLICY: &str = r#"
[[groups]]
name = "engineering"
match = { externalId = "00g-engineering" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]

[[groups]]
name = "operations"
match = { externalId = "00g-operations" }
roles = ["PROJECT_ADMIN@p:Backend"]

[[groups]]
name = "mobile"
match = { displayName = "Mobile" }
roles = ["PROJECT_DEVELOPER@p:Mobile"]

[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]

[[caps]]
user_type = "Agent"
allowed_roles = ["PROJECT_VIEWER"]
"#;

    fn cfg_for(dir: &std::path::Path) -> Config {
        let mut cfg = Config::default();
        cfg.database.url = format!("sqlite://{}/t.db", dir.display());
        cfg
    }

    async fn open(cfg: &Config) -> DynStore {
        store::open(&cfg.database.url, Arc::new(SystemClock))
            .await
            .unwrap()
    }

    async fn text<F, Fut>(f: F) -> (u8, String)
    where
        F: FnOnce(Vec<u8>) -> Fut,
        Fut: std::future::Future<Output = (u8, Vec<u8>)>,
    {
        let (code, out) = f(Vec::new()).await;
        (code, String::from_utf8(out).unwrap())
    }

    #[tokio::test]
    async fn verify_prune_export_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_for(dir.path());
        let store = open(&cfg).await;
        for i in 0..5 {
            store
                .create(
                    &WriteCtx::cli(),
                    ResourceKind::User,
                    json!({"userName": format!("u{i}@example.com"), "active": true}),
                    None,
                )
                .await
                .unwrap();
        }
        let (code, out) = text(|mut o| async {
            let c = verify(&cfg, &store, None, &mut o).await.unwrap();
            (c, o)
        })
        .await;
        assert_eq!(
            (code, out.as_str()),
            (
                0,
                "audit chain OK: 5 events from seq 1 to 5 (no checkpoint, from genesis)\n"
            )
        );

        // Export, then check the export on its own: same events, same chain.
        let mut buf = Vec::new();
        assert_eq!(export(&store, None, None, &mut buf).await.unwrap(), 5);
        let lines: Vec<AuditEvent> = String::from_utf8(buf)
            .unwrap()
            .lines()
            .map(|l| event_from_json(&serde_json::from_str(l).unwrap()).unwrap())
            .collect();
        assert_eq!(lines, store.audit_events(0, 100).await.unwrap());
        assert!(store::audit::verify_chain(store::audit::GENESIS_HASH, &lines).is_ok());
        assert!(lines.iter().all(|e| timefmt::parse(&e.time).is_some()));
        let future = OffsetDateTime::now_utc() + time::Duration::days(1);
        let mut none = Vec::new();
        assert_eq!(
            export(&store, Some(future), None, &mut none).await.unwrap(),
            0
        );

        // Prune everything (the key file is created next to the database), verify still passes.
        let mut o = Vec::new();
        prune(&cfg, &store, &WriteCtx::cli(), Some(future), &mut o)
            .await
            .unwrap();
        assert!(
            String::from_utf8(o)
                .unwrap()
                .starts_with("pruned 5 events before ")
        );
        assert!(key_path(&cfg).unwrap().exists());
        let (code, out) = text(|mut o| async {
            let c = verify(&cfg, &store, None, &mut o).await.unwrap();
            (c, o)
        })
        .await;
        assert_eq!(
            (code, out.as_str()),
            (
                0,
                "audit chain OK: 1 events from seq 6 to 6 (checkpoint at 5)\n"
            )
        );

        // The prune event is tampered with: verify names it and exits 1.
        let raw = sqlx::SqlitePool::connect(&cfg.database.url).await.unwrap();
        sqlx::query("UPDATE audit_events SET actor = 'someone' WHERE seq = 6")
            .execute(&raw)
            .await
            .unwrap();
        let (code, out) = text(|mut o| async {
            let c = verify(&cfg, &store, None, &mut o).await.unwrap();
            (c, o)
        })
        .await;
        assert_eq!(code, 1);
        assert!(out.starts_with("audit chain BROKEN at seq 6: "), "{out}");

        // Keep-forever retention refuses a prune without --before.
        let mut o = Vec::new();
        let err = prune(&cfg, &store, &WriteCtx::cli(), None, &mut o).await;
        assert!(format!("{:#}", err.unwrap_err()).contains("keep forever"));
    }

    #[test]
    fn key_path_and_times() {
        let mut cfg = Config::default();
        cfg.database.url = "sqlite://var/lib/x.db?mode=rwc".into();
        assert_eq!(
            key_path(&cfg).unwrap(),
            PathBuf::from("var/lib/x.db.audit-key")
        );
        cfg.database.url = "sqlite::memory:".into();
        assert!(key_path(&cfg).is_err());
        cfg.audit.checkpoint_key_file = Some("/k".into());
        assert_eq!(key_path(&cfg).unwrap(), PathBuf::from("/k"));
        assert!(parse_time("2026-03-01T12:00:00Z").is_ok());
        assert!(parse_time("yesterday").is_err());
        cfg.audit.retention = "400d".into();
        assert_eq!(retention(&cfg).unwrap(), Some(time::Duration::days(400)));
        cfg.audit.retention = "0".into();
        assert_eq!(retention(&cfg).unwrap(), None);
    }

    /// (TeamCity id, SCIM id, role, scope, via, deactivated) of every managed user in the
    /// emulator, the way access-review reports them.
    fn emulator_access(
        s: &teamcity_emulator::State,
    ) -> BTreeSet<(String, String, String, String, String, bool)> {
        let mut out = BTreeSet::new();
        for u in s.users.values() {
            let Some(scim) = u.properties.get(sync::USER_MARKER) else {
                continue;
            };
            let deact = u.properties.contains_key(sync::USER_DEACTIVATED);
            let mut add = |role: &str, scope: &str, via: &str| {
                out.insert((
                    u.id.to_string(),
                    scim.clone(),
                    role.to_owned(),
                    scope.to_owned(),
                    via.to_owned(),
                    deact,
                ));
            };
            for (r, sc) in &u.roles {
                add(r, sc, "direct");
            }
            for k in &u.groups {
                if let Some(g) = s.groups.get(k) {
                    for (r, sc) in &g.roles {
                        add(r, sc, k);
                    }
                }
            }
        }
        out
    }

    fn review_set(rows: &[AccessRow]) -> BTreeSet<(String, String, String, String, String, bool)> {
        rows.iter()
            .map(|r| {
                (
                    r.teamcity_user_id.clone().unwrap_or_default(),
                    r.scim_id.clone().unwrap_or_default(),
                    r.role.clone(),
                    r.scope.clone(),
                    r.via.clone(),
                    r.deactivated,
                )
            })
            .collect()
    }

    /// The demo's provisioning (5 users with email usernames, 3 groups, a deactivation, a
    /// rename swap, a pinned-rule rename) through the store and the engine against the
    /// emulator: at each point, the access reconstructed from the trail equals TeamCity's.
    #[tokio::test]
    async fn access_review_of_the_demo_flow_equals_teamcity() {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tc_url, emu) = teamcity_emulator::spawn(EmulatorOptions {
            token: "t".into(),
            projects: ["Backend", "Frontend", "Mobile"].map(String::from).to_vec(),
            users: vec![],
            ..EmulatorOptions::default()
        })
        .await
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cfg = cfg_for(dir.path());
        let store = open(&cfg).await;
        let t0 = OffsetDateTime::now_utc();
        let client = teamcity::Client::new(teamcity::ClientConfig::new(
            tc_url,
            teamcity::Token::new("t"),
        ))
        .unwrap();
        let engine = Engine::new(
            store.clone(),
            client,
            sync::Policy::from_toml(POLICY).unwrap(),
            EngineConfig::default(),
        );
        let okta = WriteCtx {
            actor: "token:tok_okta".into(),
            request_id: Some("req-1".into()),
        };
        let mut ids = std::collections::BTreeMap::new();
        for (name, given, ty) in [
            ("alice", "Alice", None),
            ("bob", "Bob", None),
            ("carol", "Carol", None),
            ("dave", "Dave", None),
            ("build-bot", "Build", Some("Agent")),
        ] {
            let mut attrs = json!({
                "userName": format!("{name}@example.com"),
                "name": {"givenName": given, "familyName": "Example"},
                "emails": [{"value": format!("{name}@example.com"), "primary": true}],
                "active": true,
            });
            if let Some(t) = ty {
                attrs["userType"] = json!(t);
            }
            let u = store
                .create(&okta, ResourceKind::User, attrs, None)
                .await
                .unwrap();
            ids.insert(name, u.id);
        }
        let members = |names: &[&str]| {
            Some(
                names
                    .iter()
                    .map(|n| store::NewMember {
                        value: ids[n].clone(),
                        ty: None,
                        display: Some(format!("{n}@example.com")),
                    })
                    .collect::<Vec<_>>(),
            )
        };
        let mut groups = std::collections::BTreeMap::new();
        for (name, ext, m) in [
            (
                "Engineering",
                "00g-engineering",
                vec!["alice", "bob", "build-bot"],
            ),
            ("Operations", "00g-operations", vec!["carol"]),
            ("Mobile", "00g-mobile", vec!["dave", "alice"]),
        ] {
            let g = store
                .create(
                    &okta,
                    ResourceKind::Group,
                    json!({"displayName": name, "externalId": ext}),
                    members(&m),
                )
                .await
                .unwrap();
            groups.insert(name, g.id);
        }
        engine.drain().await.unwrap();
        let t1 = OffsetDateTime::now_utc();
        let at_t1 = emulator_access(&emu.snapshot());
        assert!(!at_t1.is_empty());
        assert_eq!(review_set(&review_rows(&store, t1).await.unwrap()), at_t1);

        // Bob is deactivated; Engineering and Mobile are renamed.
        let patch = |kind, id: String, attrs: Value| {
            let store = store.clone();
            let okta = okta.clone();
            async move {
                let r = store
                    .get(kind, &id, ReadOpts::default())
                    .await
                    .unwrap()
                    .unwrap();
                let mut a = r.attrs.clone();
                for (k, v) in attrs.as_object().unwrap() {
                    a[k] = v.clone();
                }
                store
                    .update(&okta, kind, &id, r.version, Some(a), &[])
                    .await
                    .unwrap();
            }
        };
        patch(
            ResourceKind::User,
            ids["bob"].clone(),
            json!({"active": false}),
        )
        .await;
        engine.drain().await.unwrap();
        patch(
            ResourceKind::Group,
            groups["Engineering"].clone(),
            json!({"displayName": "Platform Engineering"}),
        )
        .await;
        patch(
            ResourceKind::Group,
            groups["Mobile"].clone(),
            json!({"displayName": "Mobile Apps"}),
        )
        .await;
        engine.drain().await.unwrap();
        engine.reconcile(false).await.unwrap();
        let t2 = OffsetDateTime::now_utc();
        let rows = review_rows(&store, t2).await.unwrap();
        assert_eq!(review_set(&rows), emulator_access(&emu.snapshot()));
        // The earlier time is still answered from the trail.
        assert_eq!(review_set(&review_rows(&store, t1).await.unwrap()), at_t1);

        // Emails are the usernames, so the review names users by SCIM id; no detail has one.
        assert!(rows.iter().all(|r| Some(&r.user) == r.scim_id.as_ref()));
        let events = store.audit_events(0, 100_000).await.unwrap();
        for e in &events {
            assert!(
                !e.detail.contains("@example.com"),
                "seq {}: {}",
                e.seq,
                e.detail
            );
        }
        for op in [
            "create_user",
            "create_group",
            "delete_group",
            "set_deactivated",
            "policy.alert",
        ] {
            assert!(events.iter().any(|e| e.operation == op), "no {op} event");
        }

        // The evidence folder of the whole flow, with a signed head and secrets in the config.
        let mut signed = cfg.clone();
        let key = dir.path().join("audit-signing.pem");
        audit::heads::keygen(&key, &dir.path().join("audit-signing.pem.pub")).unwrap();
        signed.audit.signing_key_file = Some(key.clone());
        signed.teamcity.token = Some(crate::config::Secret::new("tc-super-secret".into()));
        signed.policy = sync::Policy::from_toml(POLICY).unwrap();
        audit::HeadSigner::new(store.clone(), audit::heads::load_signing_key(&key).unwrap())
            .sign("audit")
            .await
            .unwrap();
        let folder = dir.path().join("evidence");
        let t3 = OffsetDateTime::now_utc();
        let files = crate::evidence::evidence(&signed, &store, t0, t3, &folder, None)
            .await
            .unwrap();
        let names: BTreeSet<String> = files
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "MANIFEST.sha256",
                "SUMMARY.txt",
                "access-changes.csv",
                "access-review-from.csv",
                "access-review-to.csv",
                "config.toml",
                "events.jsonl",
                "held-batches.csv",
                "policy.toml",
                "verification.txt",
            ]
            .map(String::from)
            .into_iter()
            .collect()
        );
        let read = |n: &str| std::fs::read_to_string(folder.join(n)).unwrap();
        let manifest = read("MANIFEST.sha256");
        assert_eq!(manifest.lines().count(), names.len() - 1);
        for line in manifest.lines() {
            let (sum, name) = line.split_once("  ").unwrap();
            let data = std::fs::read(folder.join(name)).unwrap();
            use sha2::Digest as _;
            assert_eq!(sum, hex::encode(sha2::Sha256::digest(&data)), "{name}");
        }
        assert_eq!(
            read("access-review-from.csv").lines().count(),
            1,
            "nobody had access at t0"
        );
        assert_eq!(
            read("access-review-to.csv").lines().count(),
            review_rows(&store, t3).await.unwrap().len() + 1
        );
        let changes = read("access-changes.csv");
        let bob_off = changes
            .lines()
            .find(|l| l.contains(",set_deactivated,"))
            .expect("bob's deactivation");
        assert!(
            bob_off.contains(&format!(
                "SCIM patch of User {} by token:tok_okta",
                ids["bob"]
            )),
            "the cause is the IdP's PATCH: {bob_off}"
        );
        let created = changes
            .lines()
            .find(|l| l.contains(",create_group,") && l.contains("Operations"))
            .expect("Operations created");
        assert!(
            created.contains(&format!("SCIM create of Group {}", groups["Operations"])),
            "{created}"
        );
        let verification = read("verification.txt");
        assert!(verification.contains("audit chain OK"), "{verification}");
        assert!(
            verification.contains("signed heads OK: 1 verified"),
            "{verification}"
        );
        assert!(verification.contains("result: OK"), "{verification}");
        let config = read("config.toml");
        assert!(
            !config.contains("tc-super-secret") && config.contains("<redacted>"),
            "{config}"
        );
        assert!(read("policy.toml").contains("00g-engineering"));
        assert_eq!(
            read("events.jsonl").lines().count(),
            store.audit_events(0, 100_000).await.unwrap().len()
        );
        println!("{}\n{changes}", read("SUMMARY.txt"));
        assert!(
            crate::evidence::evidence(&signed, &store, t0, t3, &folder, None)
                .await
                .unwrap_err()
                .to_string()
                .contains("not empty"),
            "never overwrites earlier evidence"
        );

        // Prune up to t1, and the review at t2 is unchanged (replayed from the checkpoint).
        let mut o = Vec::new();
        prune(&cfg, &store, &WriteCtx::cli(), Some(t1), &mut o)
            .await
            .unwrap();
        assert_eq!(review_rows(&store, t2).await.unwrap(), rows);
        let (code, _) = text(|mut o| async {
            let c = verify(&cfg, &store, None, &mut o).await.unwrap();
            (c, o)
        })
        .await;
        assert_eq!(code, 0);

        let mut csv = Vec::new();
        access_review(&cfg, &store, t2, ReviewFormat::Csv, &mut csv)
            .await
            .unwrap();
        let csv = String::from_utf8(csv).unwrap();
        assert_eq!(csv.lines().count(), rows.len() + 1);
        println!("{csv}");
        let mut js = Vec::new();
        access_review(&cfg, &store, t2, ReviewFormat::Json, &mut js)
            .await
            .unwrap();
        let parsed: Vec<AccessRow> = serde_json::from_slice(&js).unwrap();
        assert_eq!(parsed, rows);
    }
}
