//! The pull loop: every `interval`, pull a round from the IdP and apply it to the store.
//!
//! A round is applied whole or not at all, with its cursor, so a crash or an error anywhere
//! leaves the store and the cursor as they were and the next round re-reads the same changes.
//! An IdP that cannot be reached changes nothing (nobody loses access because the IdP was
//! silent); the failure is kept under `source:<kind>:last` for `status`, the dashboard and
//! readiness, counted in metrics, and logged once per state change.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use store::{Clock, DynStore, WriteCtx};

use crate::apply::{ApplyError, Summary, apply_round};
use crate::{Source, SourceError};

/// The sync-state key of a source's cursor.
pub fn cursor_key(kind: &str) -> String {
    format!("source:{kind}:cursor")
}

/// The sync-state key of a source's last outcome ([`LastPull`] as JSON).
pub fn last_key(kind: &str) -> String {
    format!("source:{kind}:last")
}

/// The outcome of the last pull, as stored for `status` and the dashboard.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastPull {
    /// When it ended (RFC 3339).
    pub at: String,
    /// When the last successful pull ended (RFC 3339), if any.
    pub last_success: Option<String>,
    /// The error, if it failed; `config` says the operator must fix something.
    pub error: Option<String>,
    /// The failure was a configuration problem (credentials, permissions, URL).
    pub config_error: bool,
    /// What the last successful round changed.
    pub summary: Option<Summary>,
    /// Whether the last successful round was a full enumeration.
    pub full: bool,
    /// HTTP requests to the IdP of the last round.
    pub requests: u64,
}

/// Whether the last pull succeeded, for readiness: `None` when it did (or none ran yet).
#[derive(Debug, Clone, Default)]
pub struct PullHealth(Arc<std::sync::Mutex<Option<String>>>);

impl PullHealth {
    /// Why the bridge is not ready because of its source, if it is not.
    pub fn not_ready(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, reason: Option<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }
}

/// What one pull did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullReport {
    /// The store changes.
    pub summary: Summary,
    /// A full enumeration.
    pub full: bool,
    /// Why it was full although a cursor was stored.
    pub resync_reason: Option<String>,
    /// Requests to the IdP (the round's plus the user reads).
    pub requests: u64,
}

/// One pull: read the cursor, pull a round, apply it with its cursor, audit it, and record the
/// outcome under [`last_key`].
pub async fn pull_once(
    store: &DynStore,
    source: &dyn Source,
    scope: &[String],
    clock: &dyn Clock,
) -> Result<PullReport, ApplyError> {
    let kind = source.kind();
    let result = pull_inner(store, source, scope).await;
    let now = store::timefmt::format(clock.now());
    let mut last: LastPull = store
        .sync_state_get(&last_key(kind))
        .await
        .ok()
        .flatten()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    last.at = now.clone();
    match &result {
        Ok(r) => {
            last.last_success = Some(now);
            last.error = None;
            last.config_error = false;
            last.summary = Some(r.summary.clone());
            last.full = r.full;
            last.requests = r.requests;
            metrics::counter!("teamcity_scim_source_pulls_total", "source" => kind, "outcome" => "success").increment(1);
            metrics::gauge!("teamcity_scim_source_last_success_timestamp_seconds", "source" => kind)
                .set(clock.now().unix_timestamp() as f64);
        }
        Err(e) => {
            last.error = Some(e.to_string());
            last.config_error = matches!(e, ApplyError::Source(SourceError::Config(_)));
            metrics::counter!("teamcity_scim_source_pulls_total", "source" => kind, "outcome" => "failure").increment(1);
        }
    }
    if let Ok(s) = serde_json::to_string(&last) {
        let _ = store.sync_state_set(&last_key(kind), &s).await;
    }
    result
}

async fn pull_inner(
    store: &DynStore,
    source: &dyn Source,
    scope: &[String],
) -> Result<PullReport, ApplyError> {
    let kind = source.kind();
    let key = cursor_key(kind);
    let cursor = store.sync_state_get(&key).await?;
    let round = source.pull(cursor.as_deref()).await?;
    let ctx = WriteCtx {
        actor: format!("source:{kind}"),
        request_id: None,
    };
    let (summary, reads) = apply_round(store, source, scope, &round, &key, &ctx).await?;
    let requests = round.requests + reads;
    if !summary.conflicts.is_empty() {
        tracing::warn!(
            source = kind,
            conflicts = summary.conflicts.len(),
            first = %summary.conflicts[0],
            "source: some IdP objects could not be applied (see `status`)"
        );
    }
    Ok(PullReport {
        summary,
        full: round.full,
        resync_reason: round.resync_reason,
        requests,
    })
}

/// The lease a replica holds while it pulls: with several replicas on one PostgreSQL database,
/// one pulls at a time and every write of its round is fenced (a replica that lost the lease
/// writes nothing).
pub const SOURCE_LEASE: &str = "source";

/// How long a pull's lease lasts: a whole round (with its throttling waits) fits in it.
fn lease_ttl(interval: Duration) -> Duration {
    interval * 2 + crate::THROTTLE_BUDGET
}

/// Pulls every `interval` until `shutdown` resolves. The first pull starts at once. Each round
/// runs under [`SOURCE_LEASE`]; a replica that does not hold it skips the round.
pub async fn run(
    store: DynStore,
    source: Arc<dyn Source>,
    scope: Vec<String>,
    interval: Duration,
    clock: Arc<dyn Clock>,
    health: PullHealth,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let kind = source.kind();
    let holder = format!(
        "puller-{}-{}",
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    );
    let mut failing: Option<String> = None;
    let mut held: Option<store::Fence> = None;
    loop {
        let lease = match store
            .acquire_lease(SOURCE_LEASE, &holder, lease_ttl(interval))
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(source = kind, error = %e, "source: the pull lease could not be read; retrying");
                None
            }
        };
        let Some(lease) = lease else {
            if held.take().is_some() {
                tracing::info!(source = kind, "source: another replica pulls now");
            }
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(interval) => {}
            }
            continue;
        };
        held = Some(lease.fence.clone());
        let fenced = store.fenced(lease.fence);
        match pull_once(&fenced, source.as_ref(), &scope, clock.as_ref()).await {
            Ok(r) => {
                health.set(None);
                if failing.take().is_some() {
                    tracing::info!(source = kind, "source: reachable again");
                }
                if !r.summary.is_empty() || r.full {
                    tracing::info!(
                        source = kind,
                        full = r.full,
                        resync_reason = r.resync_reason.as_deref().unwrap_or(""),
                        requests = r.requests,
                        users_created = r.summary.users_created,
                        users_updated = r.summary.users_updated,
                        users_deactivated = r.summary.users_deactivated,
                        users_deleted = r.summary.users_deleted,
                        groups_created = r.summary.groups_created,
                        members_added = r.summary.members_added,
                        members_removed = r.summary.members_removed,
                        "source: pulled"
                    );
                }
            }
            Err(e) => {
                let msg = e.to_string();
                health.set(Some(format!(
                    "the identity provider ({kind}) could not be read, so nothing is changed until \
                     it can: {msg}"
                )));
                if failing.as_deref() != Some(&msg) {
                    tracing::warn!(source = kind, error = %msg, "source: pull failed; nothing changed, retrying every interval");
                }
                failing = Some(msg);
            }
        }
        tokio::select! {
            _ = &mut shutdown => {
                if let Some(f) = held.take() {
                    let _ = store.release_lease(&f).await;
                }
                return;
            }
            _ = tokio::time::sleep(interval) => {}
        }
    }
}
