//! `audit evidence --from T --to T --output DIR`: a folder an auditor can take away.
//!
//! | file | what |
//! |---|---|
//! | `access-review-from.csv`, `access-review-to.csv` | who had which role at which scope, and through which group, at both ends (replayed from the trail) |
//! | `access-changes.csv` | every TeamCity access change in the period: who, what, and why (the directory change that caused it) |
//! | `events.jsonl` | every audit event of the period, as exported (the receiver can check the chain) |
//! | `held-batches.csv` | batches the blast-radius guard held, approved or dropped in the period, and who decided |
//! | `policy.toml`, `config.toml` | the policy and the configuration in force (secrets redacted) |
//! | `verification.txt` | `audit verify` (the chain, and the signed heads with the public key) and the heads signed in the period |
//! | `SUMMARY.txt` | the period, counts, and the SHA-256 of the policy and configuration |
//! | `MANIFEST.sha256` | SHA-256 of every other file (`sha256sum -c MANIFEST.sha256`) |

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;
use sha2::{Digest, Sha256};
use store::{AuditEvent, DynStore, timefmt};
use time::OffsetDateTime;

use crate::audit_cmd::{self, ReviewFormat};
use crate::config::Config;

/// TeamCity operations that give or take access.
const ACCESS_OPERATIONS: &[&str] = &[
    "create_user",
    "delete_user",
    "adopt_user",
    "add_to_group",
    "remove_from_group",
    "add_user_role",
    "remove_user_role",
    "create_group",
    "delete_group",
    "add_group_role",
    "remove_group_role",
    "revoke_tokens",
    "reset_password",
    "end_sessions",
    "clear_remember_me",
    "set_deactivated",
    "clear_deactivated",
];

/// Writes the evidence folder; returns the files written (the manifest last).
pub(crate) async fn evidence(
    cfg: &Config,
    store: &DynStore,
    from: OffsetDateTime,
    to: OffsetDateTime,
    output: &Path,
    public_key: Option<&Path>,
) -> anyhow::Result<Vec<PathBuf>> {
    if from > to {
        bail!(
            "--from {} is after --to {}",
            timefmt::format(from),
            timefmt::format(to)
        );
    }
    if output.exists() && std::fs::read_dir(output)?.next().is_some() {
        bail!(
            "{} exists and is not empty: evidence goes to a new folder",
            output.display()
        );
    }
    std::fs::create_dir_all(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    let mut put = |name: &str, data: &[u8]| -> anyhow::Result<()> {
        let p = output.join(name);
        std::fs::write(&p, data).with_context(|| format!("cannot write {}", p.display()))?;
        files.push(p);
        Ok(())
    };

    // Access at both ends.
    for (name, at) in [
        ("access-review-from.csv", from),
        ("access-review-to.csv", to),
    ] {
        let rows = audit_cmd::review_rows(store, at).await?;
        let mut buf = Vec::new();
        audit_cmd::write_review(&rows, ReviewFormat::Csv, &mut buf)?;
        put(name, &buf)?;
    }

    // The period's events.
    let mut events: Vec<AuditEvent> = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_range(Some(from), Some(to), after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        events.extend(page);
    }
    let mut jsonl = String::new();
    for e in &events {
        let _ = writeln!(jsonl, "{}", e.to_json());
    }
    put("events.jsonl", jsonl.as_bytes())?;

    // Access changes with their cause.
    let changes = access_changes(store, from, &events).await?;
    put("access-changes.csv", changes.as_bytes())?;

    // Held batches.
    let held = held_batches(store, from, to).await?;
    put("held-batches.csv", held.as_bytes())?;

    // Policy and configuration.
    let policy = toml::to_string_pretty(&cfg.policy)?;
    put("policy.toml", policy.as_bytes())?;
    let config = redacted_config(cfg)?;
    put("config.toml", config.as_bytes())?;

    // Verification.
    let mut verification = Vec::new();
    let key = match (public_key, &cfg.audit.signing_key_file) {
        (Some(p), _) => Some(audit::heads::load_verifying_key(p)?),
        // The public half of the configured signing key.
        (None, Some(private)) => Some(audit::heads::load_signing_key(private)?.verifying_key()),
        (None, None) => None,
    };
    let code = audit_cmd::verify(cfg, store, key.as_ref(), &mut verification).await?;
    writeln!(verification)?;
    writeln!(verification, "signed heads in the period:")?;
    let mut heads = 0;
    for e in events
        .iter()
        .filter(|e| e.operation == audit::heads::HEAD_OPERATION)
    {
        let d: Value = serde_json::from_str(&e.detail).unwrap_or_default();
        writeln!(
            verification,
            "  event {}: covers seq {} (hash {}), signed {} with key {}",
            e.seq,
            d["seq"],
            d["hash"].as_str().unwrap_or("?"),
            d["time"].as_str().unwrap_or("?"),
            d["key_id"].as_str().unwrap_or("?")
        )?;
        heads += 1;
    }
    if heads == 0 {
        writeln!(
            verification,
            "  none (set [audit] signing_key_file to sign heads)"
        )?;
    }
    writeln!(
        verification,
        "\nresult: {}",
        if code == 0 {
            "OK"
        } else {
            "FAILED (see above)"
        }
    )?;
    put("verification.txt", &verification)?;

    let summary = format!(
        "teamcity-scim audit evidence\n\
         period: {} to {}\n\
         generated: {}\n\
         events in the period: {}\n\
         access changes: {}\n\
         verification: {}\n\
         policy.toml sha256: {}\n\
         config.toml sha256: {}\n\
         Check the files with: sha256sum -c MANIFEST.sha256\n",
        timefmt::format(from),
        timefmt::format(to),
        timefmt::format(OffsetDateTime::now_utc()),
        events.len(),
        changes.lines().count().saturating_sub(1),
        if code == 0 { "OK" } else { "FAILED" },
        hex::encode(Sha256::digest(policy.as_bytes())),
        hex::encode(Sha256::digest(config.as_bytes())),
    );
    put("SUMMARY.txt", summary.as_bytes())?;

    let mut manifest = String::new();
    for f in &files {
        let data = std::fs::read(f)?;
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let _ = writeln!(manifest, "{}  {name}", hex::encode(Sha256::digest(&data)));
    }
    let manifest_path = output.join("MANIFEST.sha256");
    let mut m = std::fs::File::create(&manifest_path)?;
    m.write_all(manifest.as_bytes())?;
    files.push(manifest_path);
    Ok(files)
}

fn csv(fields: &[&str]) -> String {
    fields
        .iter()
        .map(|s| audit_cmd::csv_field(s))
        .collect::<Vec<_>>()
        .join(",")
}

/// Who a TeamCity event is about: a SCIM user id and/or a SCIM group id.
#[derive(Debug, Default)]
struct Subject {
    user: Option<String>,
    group: Option<String>,
}

/// The access changes of the period, each with the directory change that caused it: the newest
/// SCIM write (any actor but the sync engine) to the same user or group before it.
async fn access_changes(
    store: &DynStore,
    from: OffsetDateTime,
    events: &[AuditEvent],
) -> anyhow::Result<String> {
    let user_of_tc: BTreeMap<String, (String, String)> = store
        .mappings(scim::ResourceKind::User)
        .await?
        .into_iter()
        .map(|m| (m.teamcity_id, (m.scim_id, m.teamcity_name)))
        .collect();
    let group_of_key: BTreeMap<String, (String, String)> = store
        .mappings(scim::ResourceKind::Group)
        .await?
        .into_iter()
        .map(|m| (m.teamcity_id, (m.scim_id, m.teamcity_name)))
        .collect();
    // Directory changes before the period count as causes too.
    let mut before: Vec<AuditEvent> = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_range(None, Some(from), after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        before.extend(page.into_iter().filter(is_directory_change));
    }
    let mut last_change: BTreeMap<String, AuditEvent> = BTreeMap::new();
    for e in before {
        if let Some(id) = e.resource_id.clone() {
            last_change.insert(id, e);
        }
    }
    let mut out = csv(&[
        "seq",
        "time",
        "actor",
        "operation",
        "outcome",
        "user",
        "group",
        "detail",
        "cause_seq",
        "cause",
    ]);
    out.push('\n');
    for e in events {
        if is_directory_change(e) {
            if let Some(id) = e.resource_id.clone() {
                last_change.insert(id, e.clone());
            }
            continue;
        }
        if e.resource_type != "TeamCity" || !ACCESS_OPERATIONS.contains(&e.operation.as_str()) {
            continue;
        }
        let detail: Value = serde_json::from_str(&e.detail).unwrap_or_default();
        let target = e.resource_id.clone().unwrap_or_default();
        let mut subject = Subject::default();
        let mut user_label = String::new();
        let mut group_label = String::new();
        if let Some(rest) = target.strip_prefix("user:") {
            if let Some(scim) = rest.strip_prefix("new:") {
                subject.user = Some(scim.to_owned());
                user_label = format!("scim:{scim}");
            } else if let Some((scim, name)) = user_of_tc.get(rest) {
                subject.user = Some(scim.clone());
                user_label = display_user(name, rest);
            } else {
                user_label = format!("id:{rest}");
            }
        }
        let key = target
            .strip_prefix("group:")
            .map(str::to_owned)
            .or_else(|| detail["group"].as_str().map(str::to_owned));
        if let Some(key) = key {
            match group_of_key.get(&key) {
                Some((scim, name)) => {
                    subject.group = Some(scim.clone());
                    group_label = format!("{name} ({key})");
                }
                None => {
                    subject.group = detail["marker"].as_str().map(str::to_owned);
                    group_label = match detail["name"].as_str() {
                        Some(name) => format!("{name} ({key})"),
                        None => key,
                    };
                }
            }
        }
        if subject.user.is_none()
            && let Some(scim) = detail["scim_id"].as_str()
        {
            subject.user = Some(scim.to_owned());
        }
        let cause = [subject.user.as_ref(), subject.group.as_ref()]
            .into_iter()
            .flatten()
            .filter_map(|id| last_change.get(id))
            .max_by_key(|c| c.seq);
        let defaults = detail["marker"].as_str() == Some(sync::model::DEFAULTS_MARKER)
            || detail["group"].as_str() == Some(sync::model::DEFAULTS_GROUP_KEY);
        let (cause_seq, cause_text) = match (cause, e.actor.as_str()) {
            _ if defaults && subject.user.is_none() => (
                String::new(),
                "[policy.defaults]: the group every active managed user is in".into(),
            ),
            (Some(c), actor) => (
                c.seq.to_string(),
                format!(
                    "{}{} {} of {} {} by {} at {}",
                    if actor == "reconciler" {
                        "reconcile enforcing the directory as last changed by: "
                    } else {
                        ""
                    },
                    // Pull mode writes as `source:<kind>`: the change was read from the IdP.
                    match c.actor.strip_prefix("source:") {
                        Some(kind) => format!("pulled from {kind}:"),
                        None => "SCIM".to_owned(),
                    },
                    c.operation,
                    c.resource_type,
                    c.resource_id.as_deref().unwrap_or(""),
                    c.actor,
                    c.time
                ),
            ),
            (None, "reconciler") => (
                String::new(),
                "reconcile: TeamCity differed from the directory (drift repaired)".into(),
            ),
            (None, _) => (String::new(), "no directory change found for it".into()),
        };
        let _ = writeln!(
            out,
            "{}",
            csv(&[
                &e.seq.to_string(),
                &e.time,
                &e.actor,
                &e.operation,
                &e.outcome,
                &user_label,
                &group_label,
                &e.detail,
                &cause_seq,
                &cause_text,
            ])
        );
    }
    Ok(out)
}

/// A TeamCity username for the evidence: the name unless it looks like an email.
fn display_user(name: &str, id: &str) -> String {
    if store::audit::looks_like_email(name) {
        format!("id:{id}")
    } else {
        format!("{name} (id:{id})")
    }
}

/// A SCIM write to a user or group by anyone but the bridge's own engine.
fn is_directory_change(e: &AuditEvent) -> bool {
    matches!(e.resource_type.as_str(), "User" | "Group")
        && matches!(
            e.operation.as_str(),
            "create" | "replace" | "patch" | "delete"
        )
        && !matches!(e.actor.as_str(), "sync" | "reconciler")
}

/// Held batches held, approved, applied or dropped in the period.
async fn held_batches(
    store: &DynStore,
    from: OffsetDateTime,
    to: OffsetDateTime,
) -> anyhow::Result<String> {
    let mut out = csv(&[
        "id",
        "held_at",
        "source",
        "state",
        "removals",
        "summary",
        "decided_at",
        "decided_by",
    ]);
    out.push('\n');
    for b in store.list_held(None).await? {
        let touched = (from..=to).contains(&b.created)
            || b.decided_at.is_some_and(|t| (from..=to).contains(&t));
        if !touched {
            continue;
        }
        let _ = writeln!(
            out,
            "{}",
            csv(&[
                &b.id.to_string(),
                &timefmt::format(b.created),
                &b.source,
                b.state.as_str(),
                &b.removals.to_string(),
                &b.summary,
                &b.decided_at.map(timefmt::format).unwrap_or_default(),
                b.decided_by.as_deref().unwrap_or(""),
            ])
        );
    }
    Ok(out)
}

/// The configuration in force as TOML, secrets redacted (tokens serialise as `<redacted>`; a
/// password in the database URL is replaced).
fn redacted_config(cfg: &Config) -> anyhow::Result<String> {
    let mut cfg = cfg.clone();
    cfg.database.url = store::redact_url(&cfg.database.url);
    Ok(toml::to_string_pretty(&cfg)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_fields_are_quoted_when_needed() {
        assert_eq!(
            csv(&["a", "b,c", "say \"hi\""]),
            "a,\"b,c\",\"say \"\"hi\"\"\""
        );
    }
}
