//! Pull mode wiring: the configured [`source::Source`], `source check`, `source pull`, and the
//! loop `serve` runs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use source::graph::{GraphCredential, GraphOptions, GraphSource};
use source::okta::{OktaCredential, OktaOptions, OktaSource};
use source::{SecretFile, Source};

use crate::config::{Config, SourceConfig};

/// The configured source; `None` in push mode (`source.kind = "scim"`).
pub(crate) fn build(cfg: &SourceConfig) -> anyhow::Result<Option<Arc<dyn Source>>> {
    cfg.validate()?;
    Ok(match cfg.kind.as_str() {
        "graph" => {
            let credential = match (&cfg.client_secret_file, &cfg.client_certificate_file) {
                (Some(secret), _) => GraphCredential::Secret(SecretFile::new(secret)),
                (None, Some(cert)) => GraphCredential::Certificate {
                    certificate: cert.clone(),
                    key: SecretFile::new(
                        cfg.client_key_file
                            .clone()
                            .context("source.client_key_file is required with a certificate")?,
                    ),
                },
                (None, None) => unreachable!("validated: one credential"),
            };
            Some(Arc::new(GraphSource::new(GraphOptions {
                tenant_id: cfg.tenant_id.clone(),
                client_id: cfg.client_id.clone(),
                credential,
                graph_url: cfg.graph_url.trim_end_matches('/').to_owned(),
                authority_url: cfg.authority_url.trim_end_matches('/').to_owned(),
                groups: cfg.groups.clone(),
                user_name_attribute: cfg.user_name_attribute.clone(),
            })))
        }
        "okta" => {
            let credential = match (&cfg.token_file, &cfg.private_key_file) {
                (Some(token), _) => OktaCredential::ApiToken(SecretFile::new(token)),
                (None, Some(key)) => OktaCredential::PrivateKey {
                    client_id: cfg.client_id.clone(),
                    key: SecretFile::new(key),
                    key_id: cfg.key_id.clone(),
                },
                (None, None) => unreachable!("validated: one credential"),
            };
            Some(Arc::new(OktaSource::new(OktaOptions {
                org_url: cfg.org_url.trim_end_matches('/').to_owned(),
                credential,
                groups: cfg.groups.clone(),
            })))
        }
        _ => None,
    })
}

/// The message SCIM writes get in pull mode.
pub(crate) fn read_only_reason(cfg: &SourceConfig) -> String {
    let idp = match cfg.kind.as_str() {
        "graph" => "Microsoft Graph",
        "okta" => "Okta",
        other => other,
    };
    format!(
        "this bridge reads its directory from {idp} (source.kind = \"{}\"): SCIM writes are \
         refused; change users and groups in the identity provider",
        cfg.kind
    )
}

/// The pull interval.
pub(crate) fn interval(cfg: &SourceConfig) -> anyhow::Result<Duration> {
    Ok(crate::ttl::parse(&cfg.interval)
        .context("`source.interval`")?
        .unsigned_abs())
}

/// `teamcity-scim source check`: credentials, permissions, the groups in scope. Fails (exit 1)
/// when something must be fixed.
pub(crate) async fn check(cfg: &Config, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let Some(src) = build(&cfg.source)? else {
        writeln!(
            out,
            "source.kind = \"scim\": the directory is pushed by the IdP over SCIM; nothing to check \
             here (set source.kind = \"graph\" or \"okta\" for pull mode)"
        )?;
        return Ok(());
    };
    let report = src
        .check()
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", src.kind()))?;
    writeln!(out, "source:      {} ({})", src.kind(), report.identity)?;
    let mut missing = vec![];
    for (perm, granted) in &report.permissions {
        writeln!(
            out,
            "permission:  {perm}: {}",
            if *granted { "granted" } else { "MISSING" }
        )?;
        if !granted {
            missing.push(perm.clone());
        }
    }
    let mut unreadable = vec![];
    let mut total = 0;
    for (id, name, members) in &report.groups {
        match name {
            Ok(name) => {
                total += members;
                writeln!(
                    out,
                    "group:       {id} {name:?}: {members} user members in scope"
                )?;
            }
            Err(e) => {
                writeln!(out, "group:       {id}: CANNOT READ: {e}")?;
                unreadable.push(id.clone());
            }
        }
    }
    writeln!(
        out,
        "in scope:    {total} memberships in {} groups",
        report.groups.len()
    )?;
    anyhow::ensure!(
        missing.is_empty(),
        "grant the missing permission(s) {} to the application, with admin consent",
        missing.join(", ")
    );
    anyhow::ensure!(
        unreadable.is_empty(),
        "source.groups names groups that cannot be read: {}",
        unreadable.join(", ")
    );
    Ok(())
}

/// `teamcity-scim source pull`: one round now, applied as `serve` applies it.
pub(crate) async fn pull(
    cfg: &Config,
    store: &store::DynStore,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let Some(src) = build(&cfg.source)? else {
        anyhow::bail!(
            "source.kind = \"scim\": the directory is pushed over SCIM; `source pull` needs \
             source.kind = \"graph\" or \"okta\""
        );
    };
    // A running `serve` pulls every source.interval itself; two pullers would plan against
    // the same directory at once.
    let _lock = crate::lock_database(cfg).context(
        "`source pull` needs the database to itself: a running `serve` already pulls every \
         source.interval (see `teamcity-scim status`)",
    )?;
    let r = source::pull::pull_once(store, src.as_ref(), &cfg.source.groups, &store::SystemClock)
        .await
        .map_err(|e| anyhow::anyhow!("{}: {e}", src.kind()))?;
    writeln!(
        out,
        "pulled from {} ({}{} requests): {}",
        src.kind(),
        if r.full { "full, " } else { "" },
        r.requests,
        r.summary.line()
    )?;
    if let Some(why) = &r.resync_reason {
        writeln!(out, "full resync: {why}")?;
    }
    for c in &r.summary.conflicts {
        writeln!(out, "conflict: {c}")?;
    }
    Ok(())
}
