//! `teamcity-scim`: the SCIM 2.0 bridge for JetBrains TeamCity.
//!
//! This binary loads configuration, chooses the store backend, wires the server and runs the
//! subcommands. It holds no business logic of its own.

#![allow(
    unreachable_pub,
    reason = "a binary crate has no public API; `pub` marks module interfaces"
)]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use rand::RngCore;
use store::{DynStore, HeldState, SystemClock, WriteCtx};
use time::OffsetDateTime;

mod audit_cmd;
mod config;
mod dashboard;
mod db_cmd;
mod demo;
mod evidence;
mod ops;
mod source_cmd;
mod status;
mod sync_cmd;
mod telemetry;
mod ttl;

use config::Config;

/// mimalloc rather than the system allocator: a request allocates and frees hundreds of small
/// objects, and glibc's malloc was a fifth of the server's CPU time under load
/// (docs/BENCHMARKS.md). Its `override` feature makes it `malloc` for the whole process, so
/// SQLite's memory is in the same arenas, not in a glibc arena per connection thread that kept
/// what a load had freed (`.cargo/config.toml` builds it to commit arenas on demand).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "teamcity-scim",
    version,
    about = "SCIM 2.0 provisioning for JetBrains TeamCity"
)]
struct Cli {
    /// Configuration file (TOML). Without it, embedded defaults and the environment apply.
    #[arg(long, global = true, env = "TEAMCITY_SCIM_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the SCIM server.
    Serve,
    /// Manage SCIM bearer tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Run a standalone TeamCity REST emulator (for trials, demos and tests).
    Emulator(teamcity_emulator::cli::EmulatorArgs),
    /// Run a self-contained demonstration: an emulated TeamCity, the bridge, and an Okta-style
    /// provisioning replayed over SCIM (or, with `--source graph`, the directory pulled from a
    /// Microsoft Graph fake). Ctrl-C stops it.
    Demo {
        /// `scim`: an Okta-style provisioning pushed over SCIM; `graph`: pull mode, the
        /// directory read from a Microsoft Graph fake.
        #[arg(long, value_enum, default_value = "scim")]
        source: demo::DemoSource,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Inspect the sync outbox; retry dead items or drop items.
    Outbox {
        #[command(subcommand)]
        command: ops::OutboxCommand,
    },
    /// Show what a full reconcile would change in TeamCity, like `terraform plan`.
    Plan {
        /// Exit with status 2 when changes are pending (0 when none).
        #[arg(long)]
        exit_code: bool,
    },
    /// Compare TeamCity with the directory now; with --apply, repair the drift.
    Reconcile {
        /// Apply the plan (otherwise only print it).
        #[arg(long)]
        apply: bool,
    },
    /// Policy helpers.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The bridge at a glance: TeamCity and the bridge's account, the last pass and reconcile,
    /// the outbox, held batches; exits 1 when it is not ready.
    Status,
    /// List batches the blast-radius guard held back, with the users they affect.
    Held {
        /// Also list applied and dropped batches.
        #[arg(long)]
        all: bool,
        #[command(subcommand)]
        command: Option<HeldCommand>,
    },
    /// Approve a held batch; the sync worker in `serve` then applies it.
    Approve {
        /// The batch id from `held`.
        id: i64,
    },
    /// Pull mode (`source.kind = "graph"` or `"okta"`): check the IdP credentials, or pull once.
    Source {
        #[command(subcommand)]
        command: SourceCommand,
    },
    /// The database: copy a deployment between backends.
    Db {
        #[command(subcommand)]
        command: DbCommand,
    },
    /// The tamper-evident audit trail: verify, export, tail, prune, keygen, evidence.
    Audit {
        #[command(subcommand)]
        command: audit_cmd::AuditCommand,
    },
    /// Who had which TeamCity role at which scope, directly or through which group, at a time,
    /// reconstructed from the audit trail.
    AccessReview {
        /// The time (RFC 3339, or `now`).
        #[arg(long, default_value = "now")]
        at: String,
        /// Output format.
        #[arg(long, value_enum, default_value = "csv")]
        format: audit_cmd::ReviewFormat,
    },
}

#[derive(Debug, Subcommand)]
enum DbCommand {
    /// Copy every table (resources, tokens, mappings, outbox, held batches, the audit trail)
    /// from one database to a new, empty one, e.g. SQLite to PostgreSQL. Stop `serve` first.
    Copy {
        /// The source database URL (`sqlite://…` or `postgres://…`).
        #[arg(long)]
        from: String,
        /// The target database URL; it must be empty.
        #[arg(long)]
        to: String,
    },
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create a token; the secret is printed once, as the last line of stdout.
    Create {
        /// A name that says who uses it (e.g. "okta-prod").
        #[arg(long)]
        name: String,
        /// Lifetime, e.g. 30d, 12h, 90m; forever when omitted.
        #[arg(long)]
        ttl: Option<String>,
        /// A token for the read-only dashboard (`[admin] listen`) instead of the SCIM API;
        /// neither kind is accepted by the other.
        #[arg(long)]
        admin: bool,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke {
        /// The token id from `token list`.
        id: String,
    },
}

/// `source` subcommands.
#[derive(Debug, Subcommand)]
enum SourceCommand {
    /// Verify the credentials and permissions and print the groups in scope; exits 1 when
    /// something must be fixed.
    Check,
    /// Pull once now and apply it to the directory (as `serve` does every `source.interval`).
    /// Stop `serve` first or let it pull: both are safe, each round is one transaction.
    Pull,
}

/// `held` subcommands.
#[derive(Subcommand, Debug)]
enum HeldCommand {
    /// Give up a held or approved batch (e.g. one this version cannot read); what the
    /// directory still asks for is planned again.
    Drop {
        /// The batch id from `held`.
        id: i64,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate role ids and project scopes against the live TeamCity.
    Check,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the effective configuration (after all layers).
    Show,
    /// Check the configuration and exit.
    Check,
}

/// mimalloc's setting for how long it keeps memory it freed before returning it to the OS.
const PURGE_DELAY: &str = "MIMALLOC_PURGE_DELAY";

/// What a long-running command sets it to, in milliseconds.
const PURGE_DELAY_MS: &str = "100";

/// A long-running command returns freed memory to the OS within 0.1 s. mimalloc keeps it for
/// 1 s by default, and under a steady load that was most of `serve`'s memory: a 30,000-user
/// first load peaked at 157–209 MB with the default and 108–114 MB with 0.1 s, as fast
/// (0 made the push half as fast: the memory went back and forth); docs/BENCHMARKS.md.
/// mimalloc reads the setting from the environment when the process starts, so the process
/// replaces itself with the same command and the setting (same PID, same arguments). An
/// operator's own `MIMALLOC_PURGE_DELAY` is kept; if the replacement fails, the command runs
/// with mimalloc's default.
#[cfg(unix)]
fn purge_freed_memory_promptly() {
    use std::os::unix::process::CommandExt;
    if std::env::var_os(PURGE_DELAY).is_some() {
        return;
    }
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut args = std::env::args_os();
    let mut cmd = std::process::Command::new(exe);
    if let Some(arg0) = args.next() {
        cmd.arg0(arg0);
    }
    let error = cmd.args(args).env(PURGE_DELAY, PURGE_DELAY_MS).exec();
    eprintln!(
        "note: could not restart with {PURGE_DELAY}={PURGE_DELAY_MS} ({error}); freed memory goes back to the OS after 1 s"
    );
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    #[cfg(unix)]
    if matches!(cli.command, Command::Serve | Command::Demo { .. }) {
        purge_freed_memory_promptly();
    }
    let cfg = match config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return std::process::ExitCode::from(78);
        }
    };
    telemetry::init(&cfg.log);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli.command, cfg)) {
        Ok(code) => std::process::ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

pub(crate) async fn open_store(cfg: &Config) -> anyhow::Result<DynStore> {
    store::open(&cfg.database.url, Arc::new(SystemClock))
        .await
        .with_context(|| format!("cannot open the database at {}", cfg.database.url))
}

/// Runs a command; the result is the process exit code.
async fn run(cmd: Command, cfg: Config) -> anyhow::Result<u8> {
    let out = &mut std::io::stdout();
    match cmd {
        Command::Serve => serve(cfg).await?,
        Command::Emulator(args) => teamcity_emulator::cli::run(args).await?,
        Command::Token { command } => token(command, &cfg).await?,
        Command::Outbox { command } => ops::outbox(command, &open_store(&cfg).await?, out).await?,
        Command::Held {
            command: Some(HeldCommand::Drop { id }),
            ..
        } => ops::held_drop(&open_store(&cfg).await?, id, out).await?,
        Command::Held { all, command: None } => {
            ops::held(&open_store(&cfg).await?, all, out).await?
        }
        Command::Source {
            command: SourceCommand::Check,
        } => source_cmd::check(&cfg, out).await?,
        Command::Source {
            command: SourceCommand::Pull,
        } => source_cmd::pull(&cfg, &open_store(&cfg).await?, out).await?,
        Command::Approve { id } => ops::approve(&open_store(&cfg).await?, id, out).await?,
        Command::Db {
            command: DbCommand::Copy { from, to },
        } => db_cmd::copy(&cfg, &from, &to, out).await?,
        // Writing a key pair needs no database.
        Command::Audit {
            command: audit_cmd::AuditCommand::Keygen { output },
        } => audit_cmd::keygen(&output, out)?,
        Command::Audit { command } => {
            return audit_cmd::run(command, &cfg, &open_store(&cfg).await?).await;
        }
        Command::AccessReview { at, format } => {
            let at = audit_cmd::parse_time(&at)?;
            audit_cmd::access_review(&cfg, &open_store(&cfg).await?, at, format, out).await?
        }
        Command::Status => {
            return Ok(if status::status(&cfg, out).await? {
                0
            } else {
                1
            });
        }
        Command::Plan { exit_code } => {
            let pending = sync_cmd::plan(&cfg, open_store(&cfg).await?).await?;
            return Ok(if exit_code && pending { 2 } else { 0 });
        }
        Command::Reconcile { apply } => {
            sync_cmd::reconcile(&cfg, open_store(&cfg).await?, apply).await?
        }
        Command::Policy {
            command: PolicyCommand::Check,
        } => {
            return Ok(if sync_cmd::policy_check(&cfg).await? {
                0
            } else {
                1
            });
        }
        Command::Demo { source } => demo::run(source).await?,
        Command::Config {
            command: ConfigCommand::Show,
        } => {
            // Secrets serialise as `<redacted>`.
            print!("{}", toml::to_string_pretty(&cfg)?);
        }
        Command::Config {
            command: ConfigCommand::Check,
        } => {
            if !sync_cmd::config_check(&cfg).await? {
                return Ok(1);
            }
        }
    }
    Ok(0)
}

/// Creates a token, returning (record, secret).
async fn new_token(
    store: &DynStore,
    scope: store::TokenScope,
    name: &str,
    expires: Option<OffsetDateTime>,
) -> anyhow::Result<(store::TokenRecord, String)> {
    let mut random = [0u8; 32];
    rand::rng().fill_bytes(&mut random);
    let secret = server::generate_token(random);
    let rec = store
        .create_scoped_token(
            &WriteCtx::cli(),
            scope,
            name,
            server::hash_token(&secret),
            expires,
        )
        .await?;
    Ok((rec, secret))
}

async fn token(cmd: TokenCommand, cfg: &Config) -> anyhow::Result<()> {
    let store = open_store(cfg).await?;
    match cmd {
        TokenCommand::Create { name, ttl, admin } => {
            let expires = match ttl {
                Some(t) => Some(OffsetDateTime::now_utc() + ttl::parse(&t)?),
                None => None,
            };
            let scope = if admin {
                store::TokenScope::Admin
            } else {
                store::TokenScope::Scim
            };
            let (rec, secret) = new_token(&store, scope, &name, expires).await?;
            println!(
                "Created {} token {} ({name}){}.",
                if admin { "dashboard (admin)" } else { "SCIM" },
                rec.id,
                match rec.expires {
                    Some(e) => format!(", expires {}", store::timefmt::format(e)),
                    None => String::new(),
                }
            );
            println!(
                "Store it now: it is shown only once. Send it as `Authorization: Bearer <token>`."
            );
            println!("{secret}");
        }
        TokenCommand::List => {
            let now = OffsetDateTime::now_utc();
            println!(
                "{:<18} {:<6} {:<24} {:<28} {:<28} STATUS",
                "ID", "SCOPE", "NAME", "CREATED", "EXPIRES"
            );
            for t in store.list_tokens().await? {
                let status = if t.revoked.is_some() {
                    "revoked"
                } else if t.is_valid_at(now) {
                    "valid"
                } else {
                    "expired"
                };
                println!(
                    "{:<18} {:<6} {:<24} {:<28} {:<28} {status}",
                    t.id,
                    t.scope.as_str(),
                    t.name,
                    store::timefmt::format(t.created),
                    t.expires
                        .map(store::timefmt::format)
                        .unwrap_or_else(|| "never".into()),
                );
            }
        }
        TokenCommand::Revoke { id } => match store.revoke_token(&WriteCtx::cli(), &id).await {
            Ok(()) => {
                println!("Revoked token {id}. Running servers stop accepting it within 2 seconds.")
            }
            Err(store::StoreError::NotFound) => {
                anyhow::bail!("no valid token with id `{id}` (see `teamcity-scim token list`)")
            }
            Err(e) => return Err(e.into()),
        },
    }
    Ok(())
}

/// Holds `<database file>.lock` for as long as `serve` runs: SQLite serves one process, whose
/// lookup cache and write counters live in its memory, so a second `serve` on the same file
/// (a rolling deploy on a shared volume, a copy started by hand) must not run beside it. The
/// operating system releases the lock when the process ends, however it ends. The CLI's other
/// commands (`token`, `approve`, `outbox`, `plan`, `audit`) do not take it and keep working.
pub(crate) fn lock_database(cfg: &Config) -> anyhow::Result<Option<std::fs::File>> {
    let Some(db) = cfg.database_file() else {
        return Ok(None);
    };
    let db = std::path::absolute(&db).unwrap_or(db);
    let mut path = db.clone().into_os_string();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "another `teamcity-scim serve` is already using the SQLite database {} (it holds {}). \
             SQLite serves one process: stop the other one first. Commands such as `token`, \
             `plan`, `approve`, `outbox` and `audit` work beside it.",
            db.display(),
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(e).with_context(|| format!("cannot lock {}", path.display()))
        }
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let _lock = lock_database(&cfg)?;
    let store = open_store(&cfg).await?;
    let audit_store = store.clone();
    let wake_store = store.clone();
    let scim_tokens = store
        .valid_token_hashes()
        .await?
        .into_iter()
        .filter(|(_, t)| t.scope == store::TokenScope::Scim)
        .count();
    // In pull mode no IdP pushes: a SCIM token is made only when someone asks for one.
    if cfg.server.token_file.is_none() && scim_tokens == 0 && !cfg.source.is_pull() {
        let (rec, secret) = new_token(&store, store::TokenScope::Scim, "initial", None).await?;
        println!(
            "No SCIM token existed, so one was created (id {}). It is shown only this once:",
            rec.id
        );
        println!();
        println!("    {secret}");
        println!();
        println!(
            "Give it to your identity provider as the bearer token for {scheme}://{}/scim/v2 \
             (try: curl -H 'Authorization: Bearer <token>' {scheme}://{}/scim/v2/ServiceProviderConfig).",
            cfg.server.listen,
            cfg.server.listen,
            scheme = if cfg.server.tls_cert_file.is_some() {
                "https"
            } else {
                "http"
            },
        );
    }
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    // Histogram samples queue in the recorder until upkeep folds them in; without it they
    // would grow with every request until the next scrape (or forever, if none comes).
    tokio::spawn({
        let handle = metrics.clone();
        async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                handle.run_upkeep();
            }
        }
    });
    let engine = sync_cmd::engine(&cfg, store.clone())?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let pull_source = source_cmd::build(&cfg.source)?;
    let pull_health = source::pull::PullHealth::default();
    let dashboard = match cfg.admin.address()? {
        None => None,
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!(
                    "cannot listen on {addr} (admin.listen, the dashboard); choose another address \
                     or set admin.listen = \"\" to turn the dashboard off"
                )
            })?;
            let mut tokens =
                server::auth::TokenCache::for_scope(store.clone(), store::TokenScope::Admin);
            if let Some(path) = &cfg.admin.token_file {
                let grace = ttl::parse(&cfg.server.token_file_grace)?.unsigned_abs();
                tokens = tokens.with_token_file(path.clone(), grace);
            }
            let mut source = dashboard::Dashboard::new(
                store.clone(),
                cfg.policy.clone(),
                cfg.teamcity.url.clone(),
                engine.clone(),
                sync_cmd::client(&cfg)?,
            );
            if cfg.source.is_pull() {
                source = source.with_source(&cfg.source.kind, &cfg.source.interval);
            }
            Some((
                listener,
                server::admin::AdminState {
                    store: store.clone(),
                    tokens,
                    source: Arc::new(source),
                    readiness: None,
                    secure_cookie: cfg.server.tls_cert_file.is_some(),
                },
            ))
        }
    };
    let store_for_gauges = store.clone();
    let store_for_pull = store.clone();
    let mut state = server::AppState::new(store.clone());
    if let Some(path) = &cfg.server.token_file {
        let grace = ttl::parse(&cfg.server.token_file_grace)?.unsigned_abs();
        state.tokens = server::auth::TokenCache::new(store).with_token_file(path.clone(), grace);
    }
    state.metrics = Some(metrics);
    // Without a TeamCity token the bridge is a SCIM store that queues every change (a supported
    // mode, logged at start): ready when its database is.
    state.readiness = match (engine.as_ref().map(|e| e.health()), &pull_source) {
        (None, None) => None,
        (engine_health, _) => {
            let pulled = pull_source.is_some().then(|| pull_health.clone());
            Some(server::Readiness(Arc::new(move || {
                engine_health
                    .as_ref()
                    .and_then(|h| h.not_ready())
                    .or_else(|| pulled.as_ref().and_then(|p| p.not_ready()))
            })))
        }
    };
    if pull_source.is_some() {
        state.read_only = Some(Arc::from(source_cmd::read_only_reason(&cfg.source)));
    }
    tokio::spawn(refresh_gauges(store_for_gauges, state.readiness.clone()));
    let options = harden(&cfg, &mut state)?;
    let admin = dashboard.map(|(listener, mut admin)| {
        admin.readiness = state.readiness.clone();
        let addr = listener.local_addr().ok();
        let mut stop = stop_rx.clone();
        tracing::info!(
            listen = ?addr,
            "dashboard serving (read-only; sign in with a token from `teamcity-scim token create --admin`)"
        );
        tokio::spawn(server::serve_admin(
            listener,
            admin,
            options.clone(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        ))
    });
    let listener = tokio::net::TcpListener::bind(cfg.server.listen)
        .await
        .with_context(|| format!("cannot listen on {} (server.listen)", cfg.server.listen))?;
    let retention = audit_cmd::spawn_retention(&cfg, audit_store.clone(), stop_rx.clone())?;
    // Signed heads every audit.head_interval and at shutdown; the sinks stop after the last head
    // so it is streamed too.
    let heads = match &cfg.audit.signing_key_file {
        Some(path) => {
            let key = audit::heads::load_signing_key(path)?;
            let interval = ttl::parse(&cfg.audit.head_interval)?.unsigned_abs();
            tracing::info!(
                key_id = %audit::heads::key_id(&key.verifying_key()),
                ?interval,
                "audit heads are signed"
            );
            let signer = audit::HeadSigner::new(audit_store.clone(), key);
            Some(tokio::spawn(signer.run(interval, stop_rx.clone())))
        }
        None => None,
    };
    let (sinks_stop_tx, sinks_stop_rx) = tokio::sync::watch::channel(false);
    let sinks = audit::sinks::spawn(audit_store, &cfg.audit.sinks, sinks_stop_rx)?;
    for s in &cfg.audit.sinks {
        tracing::info!(sink = %s.name(), "audit events are streamed");
    }
    let puller = match pull_source {
        Some(src) => {
            let interval = source_cmd::interval(&cfg.source)?;
            tracing::info!(
                source = src.kind(),
                groups = cfg.source.groups.len(),
                ?interval,
                "pull mode: the directory is read from the identity provider; SCIM writes are refused"
            );
            let mut stop = stop_rx.clone();
            Some(tokio::spawn(source::pull::run(
                store_for_pull.clone(),
                src,
                cfg.source.groups.clone(),
                interval,
                Arc::new(SystemClock),
                pull_health,
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )))
        }
        None => None,
    };
    let worker = match engine {
        Some(engine) => {
            tracing::info!(
                teamcity = %cfg.teamcity.url,
                mode = ?cfg.sync.mode,
                "sync worker started: SCIM changes are applied to TeamCity"
            );
            // PostgreSQL: a replica's worker wakes as soon as any replica commits an outbox
            // row (LISTEN/NOTIFY); polling stays as the fallback.
            if wake_store.watch_outbox(engine.waker()) {
                tracing::info!(
                    "woken by LISTEN/NOTIFY on new outbox rows; polling as the fallback"
                );
            }
            Some(tokio::spawn(engine.run(stop_rx)))
        }
        None => {
            tracing::warn!(
                "no TeamCity token configured ([teamcity] token_file or TEAMCITY_SCIM_TEAMCITY__TOKEN): \
                 SCIM changes are stored and queued in the outbox, and applied once TeamCity is configured"
            );
            None
        }
    };
    tracing::info!(
        listen = %cfg.server.listen,
        base_path = server::BASE_PATH,
        tls = options.tls.is_some(),
        "teamcity-scim serving SCIM"
    );
    server::serve_with(listener, state, options, async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    })
    .await?;
    if let Some(w) = worker {
        let _ = w.await;
    }
    if let Some(p) = puller {
        let _ = p.await;
    }
    if let Some(r) = retention {
        let _ = r.await;
    }
    if let Some(a) = admin {
        let _ = a.await;
    }
    if let Some(h) = heads {
        let _ = h.await;
    }
    let _ = sinks_stop_tx.send(true);
    for s in sinks {
        let _ = s.await;
    }
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Keeps the gauges that describe the bridge's state current (every
/// [`METRICS_UPKEEP_INTERVAL`]): outbox rows by state, the age of the oldest pending one, held
/// batches waiting for approval, readiness.
async fn refresh_gauges(store: DynStore, readiness: Option<server::Readiness>) {
    let mut every = tokio::time::interval(METRICS_UPKEEP_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let ready = readiness.as_ref().is_none_or(|r| (r.0)().is_none());
        metrics::gauge!("teamcity_scim_ready").set(if ready { 1.0 } else { 0.0 });
        match store.outbox_summary().await {
            Ok(summary) => {
                for state in store::OutboxState::ALL {
                    let n = summary.by_state.get(state).copied().unwrap_or(0);
                    metrics::gauge!("teamcity_scim_outbox_items", "state" => state.as_str())
                        .set(n as f64);
                }
                let age = summary.oldest_pending.map_or(0.0, |t| {
                    (OffsetDateTime::now_utc() - t).as_seconds_f64().max(0.0)
                });
                metrics::gauge!("teamcity_scim_outbox_oldest_pending_age_seconds").set(age);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the outbox for metrics"),
        }
        match store.list_held(Some(HeldState::Held)).await {
            Ok(held) => {
                metrics::gauge!("teamcity_scim_held_batches_waiting").set(held.len() as f64);
            }
            Err(e) => tracing::warn!(error = %e, "cannot read held batches for metrics"),
        }
    }
}

/// How often `serve` folds queued histogram samples into the metrics recorder.
const METRICS_UPKEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// How often `serve` re-reads the TLS certificate and key files.
const TLS_RELOAD_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// `[server]` abuse limits and TLS: sets the request timeout and rate limits on `state` and
/// returns the connection options.
fn harden(cfg: &Config, state: &mut server::AppState) -> anyhow::Result<server::ServeOptions> {
    let s = &cfg.server;
    state.limits.request_timeout = Some(ttl::parse(&s.request_timeout)?.unsigned_abs());
    state.lookups = Arc::new(server::lookup_cache::ResponseCache::with_capacity(
        s.lookup_cache_mb as usize * 1024 * 1024,
    ));
    state.rate_limiter = server::RateLimiter::new(server::RateLimitConfig {
        per_second: s.rate_limit_per_second,
        burst: s.rate_limit_burst,
        auth_failures_per_minute: s.auth_failures_per_minute,
        trust_forwarded_for: s.trust_forwarded_for,
    });
    let tls = match (&s.tls_cert_file, &s.tls_key_file) {
        (Some(cert), Some(key)) => Some(
            server::tls::ReloadingCert::load(server::tls::TlsFiles {
                cert_file: cert.clone(),
                key_file: key.clone(),
                reload_interval: TLS_RELOAD_INTERVAL,
            })
            .context("cannot start HTTPS (server.tls_cert_file, server.tls_key_file)")?,
        ),
        _ => None,
    };
    Ok(server::ServeOptions {
        header_read_timeout: ttl::parse(&s.header_read_timeout)?.unsigned_abs(),
        tls,
        ..server::ServeOptions::default()
    })
}

/// Resolves on Ctrl-C or SIGTERM.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; finishing in-flight requests");
}
