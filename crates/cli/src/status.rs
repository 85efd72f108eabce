//! `teamcity-scim status`: the bridge at a glance — TeamCity and the bridge's account, the last
//! worker pass and reconcile, the outbox, held batches — and exit 1 when it is not ready.

use std::io::Write;

use store::{DynStore, OutboxState};

use crate::config::Config;
use crate::ops;
use crate::sync_cmd;

/// Lines of a reconcile's drift `status` prints.
const STATUS_DRIFT_LINES: usize = 20;

/// A `sync_state` pass report as `status` prints it.
fn report_line(json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    format!(
        "{} ({:.1} s): {} planned, {} applied, {} failed, {} not attempted, {} held{}",
        v["time"].as_str().unwrap_or("?"),
        v["seconds"].as_f64().unwrap_or(0.0),
        n("planned"),
        n("applied"),
        n("failed"),
        n("cancelled"),
        n("held"),
        if v["stopped_early"].as_bool() == Some(true) {
            ", stopped early (will retry)"
        } else {
            ""
        }
    )
}

/// Prints the summary; `Ok(false)` when the bridge is not ready (each reason is printed).
pub(crate) async fn status(cfg: &Config, out: &mut dyn Write) -> anyhow::Result<bool> {
    let mut problems: Vec<String> = Vec::new();
    let db = cfg.database_description();
    let store: Option<DynStore> = match crate::open_store(cfg).await {
        Ok(s) => {
            writeln!(out, "database:   {db} (reachable, migrations applied)")?;
            Some(s)
        }
        Err(e) => {
            problems.push(format!("the database {db} cannot be opened: {e:#}"));
            None
        }
    };

    match sync_cmd::client(cfg)? {
        None => writeln!(
            out,
            "TeamCity:   no token configured ([teamcity] token_file or TEAMCITY_SCIM_TEAMCITY__TOKEN): \
             SCIM changes are stored and queued, nothing is applied"
        )?,
        Some(client) => match client.server_info().await {
            Err(e) => problems.push(format!(
                "TeamCity at {} cannot be used: {e}",
                cfg.teamcity.url
            )),
            Ok(info) => {
                writeln!(
                    out,
                    "TeamCity:   {} (version {}), the bridge's token is accepted",
                    cfg.teamcity.url,
                    info.version.as_deref().unwrap_or("unknown")
                )?;
                let users = client
                    .list_users(&teamcity::Locator::new().count(1), Some("count"))
                    .await;
                if let Err(e) = users {
                    problems.push(format!(
                        "the bridge's TeamCity account cannot read users ({e}); see docs/teamcity-compat.md for the permissions it needs"
                    ));
                }
                match sync::policy::check_live(&client, &cfg.policy).await {
                    Ok(p) if p.is_empty() => writeln!(out, "policy:     matches TeamCity")?,
                    Ok(p) => problems.push(format!(
                        "the policy does not match TeamCity: {}",
                        p.iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    )),
                    Err(e) => problems.push(format!("the policy could not be checked: {e}")),
                }
            }
        },
    }

    if let Some(store) = &store {
        for (label, key) in [
            ("last pass: ", sync::LAST_PASS_KEY),
            ("reconcile: ", sync::LAST_RECONCILE_KEY),
        ] {
            match store.sync_state_get(key).await? {
                Some(r) => {
                    writeln!(out, "{label} {}", report_line(&r))?;
                    let v: serde_json::Value = serde_json::from_str(&r).unwrap_or_default();
                    let drift = v["drift"].as_str().unwrap_or_default();
                    if !drift.is_empty() {
                        writeln!(out, "            drift it found and repaired:")?;
                        for line in drift.lines().take(STATUS_DRIFT_LINES) {
                            writeln!(out, "            {line}")?;
                        }
                        if drift.lines().count() > STATUS_DRIFT_LINES {
                            writeln!(out, "            … (the dashboard's Overview shows more)")?;
                        }
                    }
                }
                None => writeln!(out, "{label} never")?,
            }
        }
        if cfg.source.is_pull() {
            let kind = cfg.source.kind.as_str();
            let last = store
                .sync_state_get(&source::pull::last_key(kind))
                .await?
                .and_then(|s| serde_json::from_str::<source::pull::LastPull>(&s).ok());
            match last {
                None => writeln!(
                    out,
                    "source:     {kind} (pull every {}): never pulled yet",
                    cfg.source.interval
                )?,
                Some(l) => {
                    let ok = l
                        .last_success
                        .as_deref()
                        .map_or("never".to_owned(), |t| format!("last success {t}"));
                    writeln!(
                        out,
                        "source:     {kind} (pull every {}): last pull {}, {ok}",
                        cfg.source.interval, l.at
                    )?;
                    if let Some(s) = &l.summary {
                        writeln!(
                            out,
                            "            {}{} ({} requests)",
                            if l.full { "full round: " } else { "" },
                            s.line(),
                            l.requests
                        )?;
                        for c in &s.conflicts {
                            writeln!(out, "            conflict: {c}")?;
                        }
                    }
                    if let Some(e) = &l.error {
                        problems.push(format!(
                            "the identity provider ({kind}) could not be read at {}, so nothing \
                             is changed until it can: {e}",
                            l.at
                        ));
                    }
                }
            }
        }
        let count = |state: OutboxState| {
            let store = store.clone();
            async move { anyhow::Ok(store.list_outbox(Some(state), i64::MAX).await?) }
        };
        let pending = count(OutboxState::Pending).await?;
        let retrying = pending.iter().filter(|e| e.last_error.is_some()).count();
        let dead = count(OutboxState::Dead).await?;
        let held = count(OutboxState::Held).await?;
        writeln!(
            out,
            "outbox:     {} pending ({retrying} waiting to be retried), {} dead, {} held",
            pending.len(),
            dead.len(),
            held.len()
        )?;
        if let Some(e) = pending.iter().find_map(|e| e.last_error.as_deref()) {
            writeln!(out, "            last error: {e}")?;
        }
        for e in dead.iter().take(5) {
            writeln!(
                out,
                "            dead {} ({} {}): {}",
                e.item.id,
                e.item.entity_type,
                e.item.entity_id,
                e.dead_reason.as_deref().unwrap_or("-")
            )?;
        }
        if dead.len() > 5 {
            writeln!(
                out,
                "            … `teamcity-scim outbox list --state dead` lists all"
            )?;
        }
        writeln!(out)?;
        ops::held(store, false, out).await?;
    }

    writeln!(out)?;
    if problems.is_empty() {
        writeln!(out, "ready")?;
        Ok(true)
    } else {
        for p in &problems {
            writeln!(out, "NOT READY: {p}")?;
        }
        Ok(false)
    }
}
