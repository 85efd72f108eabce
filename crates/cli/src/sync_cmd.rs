//! Wiring of the sync engine: the TeamCity client from `[teamcity]`, the engine from `[sync]`
//! and `[policy]`, and the `plan`, `reconcile` and `policy check` commands.

use std::num::NonZeroU32;
use std::sync::Arc;

use anyhow::Context;
use store::{DynStore, HeldState, OutboxState, RetryPolicy};
use sync::{Engine, EngineConfig, GuardLimits, Mode};

use crate::config::{AdoptExisting, Config, Deprovision, SyncMode};
use crate::ttl;

/// The TeamCity client `[teamcity]` describes, or `None` when no token is configured.
pub(crate) fn client(cfg: &Config) -> anyhow::Result<Option<teamcity::Client>> {
    let Some(token) = cfg
        .teamcity
        .token
        .as_ref()
        .filter(|t| !t.expose().is_empty())
    else {
        return Ok(None);
    };
    let mut c = teamcity::ClientConfig::new(
        cfg.teamcity.url.clone(),
        teamcity::Token::new(token.expose()),
    );
    c.request_timeout = ttl::parse(&cfg.teamcity.request_timeout)?.unsigned_abs();
    c.max_concurrency = cfg.teamcity.max_concurrency;
    c.requests_per_second = NonZeroU32::new(cfg.teamcity.requests_per_second);
    c.ca_pem = cfg.teamcity.read_ca()?;
    Ok(Some(teamcity::Client::new(c).context(
        "cannot build the TeamCity client ([teamcity])",
    )?))
}

/// The client, or an error that says how to configure it.
pub(crate) fn require_client(cfg: &Config) -> anyhow::Result<teamcity::Client> {
    client(cfg)?.ok_or_else(|| {
        anyhow::anyhow!(
            "no TeamCity token configured: set teamcity.token_file (or TEAMCITY_SCIM_TEAMCITY__TOKEN) \
             to the bridge account's access token"
        )
    })
}

/// Engine settings from `[sync]`.
pub(crate) fn engine_config(cfg: &Config) -> anyhow::Result<EngineConfig> {
    Ok(EngineConfig {
        mode: match cfg.sync.mode {
            SyncMode::Apply => Mode::Apply,
            SyncMode::Shadow => Mode::Shadow,
        },
        deprovision: match cfg.sync.deprovision {
            Deprovision::Strip => sync::Deprovision::Strip,
            Deprovision::Delete => sync::Deprovision::Delete,
        },
        limits: GuardLimits {
            max_removals: Some(cfg.sync.max_removals),
            max_removals_percent: Some(cfg.sync.max_removals_percent),
        },
        retry: RetryPolicy {
            cap: ttl::parse(&cfg.sync.max_backoff)?.unsigned_abs(),
            ..RetryPolicy::default()
        },
        reconcile_interval: ttl::parse(&cfg.sync.reconcile_interval)?.unsigned_abs(),
        lease: ttl::parse(&cfg.sync.lease)?.unsigned_abs(),
        adopt: match cfg.sync.adopt_existing {
            AdoptExisting::Never => sync::AdoptExisting::Never,
            AdoptExisting::ByUsername => sync::AdoptExisting::ByUsername,
        },
        database: cfg.database_description(),
        ..EngineConfig::default()
    })
}

/// The engine, when TeamCity is configured.
pub(crate) fn engine(cfg: &Config, store: DynStore) -> anyhow::Result<Option<Arc<Engine>>> {
    let Some(client) = client(cfg)? else {
        return Ok(None);
    };
    Ok(Some(Arc::new(Engine::new(
        store,
        client,
        cfg.policy.clone(),
        engine_config(cfg)?,
    ))))
}

/// Progress of the steps a command applies: a bar (done / total, rate, time left) when stderr
/// is a terminal, else a plain line every few seconds and one at the end.
fn with_progress(engine: Engine) -> (Engine, Option<indicatif::ProgressBar>) {
    use std::io::IsTerminal as _;
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} steps  {per_sec}  {eta} left",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let b = bar.clone();
        let engine = engine.with_progress(Arc::new(move |done, total| {
            b.set_length(total as u64);
            b.set_position(done as u64);
        }));
        return (engine, Some(bar));
    }
    let engine = engine.with_progress(sync::periodic_progress(
        std::time::Duration::from_secs(5),
        0,
        |done, total, rate, left| {
            eprintln!("applied {done}/{total} steps ({rate:.0}/s, {left:.0} s left)");
        },
    ));
    (engine, None)
}

fn spinner(msg: &'static str) -> indicatif::ProgressBar {
    // indicatif draws only when stderr is a terminal.
    let pb = indicatif::ProgressBar::new_spinner();
    pb.set_message(msg);
    pb.enable_steady_tick(std::time::Duration::from_millis(100));
    pb
}

/// `plan [--exit-code]`: what a full reconcile would change. Returns true when changes are
/// pending.
pub(crate) async fn plan(cfg: &Config, store: DynStore) -> anyhow::Result<bool> {
    let client = require_client(cfg)?;
    let engine = Engine::new(
        store.clone(),
        client,
        cfg.policy.clone(),
        engine_config(cfg)?,
    );
    let pb = spinner("reading TeamCity users and groups…");
    let (p, actual, reads) = engine.plan_full().await?;
    pb.finish_and_clear();
    print!("{}", sync::render(&p, &actual));
    print!("{}", waiting_work(&store).await?);
    eprintln!("({reads} TeamCity reads)");
    Ok(!p.actions.is_empty())
}

/// What the bridge could not do, for `plan`: failed or cancelled work (dead outbox rows with
/// their failing step and reason) and batches waiting for approval.
async fn waiting_work(store: &DynStore) -> anyhow::Result<String> {
    use std::fmt::Write as _;
    let mut out = String::new();
    let dead = store.list_outbox(Some(OutboxState::Dead), 100).await?;
    if !dead.is_empty() {
        let _ = writeln!(
            out,
            "\nFailed or not attempted at the last try (`teamcity-scim outbox retry ID` re-runs one; reconcile retries them):"
        );
        for e in &dead {
            let _ = writeln!(
                out,
                "  ! outbox {} ({} {}): {}",
                e.item.id,
                e.item.entity_type,
                e.item.entity_id,
                e.dead_reason
                    .as_deref()
                    .or(e.last_error.as_deref())
                    .unwrap_or("-")
            );
        }
    }
    let held = store.list_held(Some(HeldState::Held)).await?;
    if !held.is_empty() {
        let _ = writeln!(
            out,
            "\nWaiting for approval (`teamcity-scim held` shows who they affect):"
        );
        for b in &held {
            let _ = writeln!(
                out,
                "  ? batch {}: {} — teamcity-scim approve {}",
                b.id, b.summary, b.id
            );
        }
    }
    Ok(out)
}

/// `reconcile [--apply]`.
pub(crate) async fn reconcile(cfg: &Config, store: DynStore, apply: bool) -> anyhow::Result<()> {
    let client = require_client(cfg)?;
    let engine = Engine::new(store, client, cfg.policy.clone(), engine_config(cfg)?);
    if !apply {
        let pb = spinner("reading TeamCity users and groups…");
        let (p, actual, reads) = engine.plan_full().await?;
        pb.finish_and_clear();
        print!("{}", sync::render(&p, &actual));
        println!("({reads} TeamCity reads; nothing applied — run with --apply to apply)");
        return Ok(());
    }
    let (engine, bar) = with_progress(engine);
    let r = engine.reconcile_leased(None).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let Some(r) = r else {
        anyhow::bail!(
            "another process is reconciling this database now (it holds the `reconcile` lease); \
             nothing was applied — try again when it has finished (`teamcity-scim status` shows \
             the last reconcile)"
        );
    };
    println!(
        "Reconcile: {} TeamCity reads, {} actions planned, {} applied, {} failed, {} held{}.",
        r.reads,
        r.planned,
        r.applied,
        r.failed,
        r.held,
        if engine.config().mode == Mode::Shadow {
            " (shadow mode: nothing written)"
        } else {
            ""
        }
    );
    if r.held > 0 {
        println!(
            "Held removals wait for review: `teamcity-scim held`, then `teamcity-scim approve ID`."
        );
    }
    anyhow::ensure!(
        !r.transient_stop,
        "TeamCity became unavailable during the reconcile; run it again later"
    );
    Ok(())
}

/// `policy check`: role ids and project scopes against the live TeamCity.
pub(crate) async fn policy_check(cfg: &Config) -> anyhow::Result<bool> {
    let client = require_client(cfg)?;
    let problems = sync::policy::check_live(&client, &cfg.policy).await?;
    warn_all_users_roles(&client).await?;
    if problems.is_empty() {
        println!(
            "Policy OK: {} group rules, {} default roles, {} caps; every role and project exists in TeamCity.",
            cfg.policy.groups.len(),
            cfg.policy.defaults.roles.len(),
            cfg.policy.caps.len()
        );
        return Ok(true);
    }
    for p in &problems {
        println!("{p}");
    }
    println!("{} problem(s) found.", problems.len());
    Ok(false)
}

/// Warns when TeamCity's All Users group carries roles: every user keeps them, deactivated
/// users too, and no offboarding can take them away.
async fn warn_all_users_roles(client: &teamcity::Client) -> anyhow::Result<()> {
    let roles = client
        .group_roles(&teamcity::Locator::by_key(sync::model::ALL_USERS_GROUP))
        .await?;
    if !roles.is_empty() {
        let list: Vec<String> = roles
            .iter()
            .map(|r| format!("{}@{}", r.role_id, r.scope))
            .collect();
        println!(
            "warning: TeamCity's All Users group carries {}: every user keeps these roles, deactivated \
             users too. Move them to the policy (e.g. [defaults] roles) and remove them from All Users.",
            list.join(", ")
        );
    }
    Ok(())
}

/// `config check`: the configuration is valid; when TeamCity is configured and reachable, the
/// policy is checked against it too. Returns false when something is wrong.
pub(crate) async fn config_check(cfg: &Config) -> anyhow::Result<bool> {
    let Some(client) = client(cfg)? else {
        println!(
            "configuration is valid (no TeamCity token configured: the policy was not checked against TeamCity)"
        );
        return Ok(true);
    };
    match sync::policy::check_live(&client, &cfg.policy).await {
        Ok(problems) if problems.is_empty() => {
            warn_all_users_roles(&client).await?;
            println!(
                "configuration is valid; the policy matches TeamCity at {}",
                cfg.teamcity.url
            );
            Ok(true)
        }
        Ok(problems) => {
            for p in &problems {
                println!("{p}");
            }
            println!(
                "configuration is invalid: the policy does not match TeamCity at {} ({} problem(s)); \
                 `serve` would apply nothing until it is fixed",
                cfg.teamcity.url,
                problems.len()
            );
            Ok(false)
        }
        Err(e) => {
            println!(
                "configuration is valid; TeamCity at {} could not be reached ({e}), so the policy \
                 was not checked against it (`serve` checks it before applying anything)",
                cfg.teamcity.url
            );
            Ok(true)
        }
    }
}
