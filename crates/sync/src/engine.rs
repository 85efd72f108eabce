//! The runtime of the sync engine: the outbox worker and the reconciler, over the store and
//! the TeamCity client.
//!
//! The worker plans against a *cached* TeamCity state: read in full at start and at every
//! reconcile, then kept equal to TeamCity by recording the effect of every step TeamCity
//! accepted. A SCIM change therefore costs exactly the TeamCity writes it needs — no reads —
//! and a re-sent, unchanged push costs nothing. The reconciler re-reads TeamCity (pages,
//! `fields=` limited) to find drift made by hand and repairs it. The cache is dropped and
//! read again whenever it may be wrong: a 404 or an unexpected conflict on any write, or a
//! write to TeamCity by another process (a `reconcile --apply` from the CLI) — every writer
//! moves a counter in the store (`teamcity_writes`) and each pass compares it with its own.
//!
//! Each pass: claim due outbox rows (lease, coalesced per entity) → TeamCity readable and the
//! policy valid against it, else the rows wait (never dead-lettered for it) and readiness says
//! why → the part of the directory the rows touch → its desired state → plan against that
//! part of the cache (steps with prerequisites; see [`Engine::run_once`] for when a pass
//! plans the whole directory instead) →
//! blast-radius guard (see [`Engine::guard`]) → apply the steps wave by wave, a step only
//! after its prerequisites succeeded, auditing each → settle the rows: done; dead with the
//! failing step and the reason (a permanent failure of the entity's own work); waiting again
//! (TeamCity changed underneath: re-read first); held (in a held batch); or retried with
//! backoff (TeamCity unavailable). In shadow mode the plan is computed, logged and audited,
//! and nothing is written.
//!
//! **Replicas.** Several `serve` processes may share one PostgreSQL database; all of them take
//! SCIM writes, one of them applies. [`Engine::run`] applies only while it holds the
//! [`SYNC_LEASE`] (taken when free or expired, renewed at a third of its time), and each
//! reconcile also takes the [`store::RECONCILE_LEASE`] (so a `reconcile --apply` from the CLI
//! never runs beside it). Every store write of a pass or a reconcile goes through
//! [`store::Leases::fenced`]: it checks the leases inside its own transaction, so a replica that
//! lost its lease (paused, partitioned, expired) writes nothing more and its pass stops; a
//! heartbeat renews the leases (and the claimed outbox rows' leases) during long passes. A
//! replica that gains the lease reads TeamCity again before applying anything.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use store::{
    AuditEntry, ClaimedEntity, DynStore, HeldBatch, HeldState, RetryPolicy, StoreError, WriteCtx,
};
use teamcity::{Client, TeamCityError};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::apply::{Applied, apply_step, kind, usernames};

/// The lease the applying replica holds while it runs outbox passes and reconciles.
pub const SYNC_LEASE: &str = "sync";

/// How often a standby replica tries to take the sync lease (at most a third of its time).
const STANDBY_RETRY: Duration = Duration::from_secs(1);

tokio::task_local! {
    /// The store a pass or a reconcile writes through: fenced by the leases it runs under.
    static FENCED: DynStore;
}
use crate::model::{
    Action, ActualState, DEFAULTS_MARKER, DirGroup, Directory, UserRef, UserTarget,
};
use crate::plan::{AdoptExisting, Conflict, Deprovision, Plan, PlanOptions, Scope, plan, plan_in};
use crate::policy::Policy;
use crate::scope::Cached;
use crate::{Desired, DesiredOptions, GuardLimits, ReadOptions, desired, read_actual_with};

/// How often a paused engine checks whether what blocked it is fixed.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// How often a ready engine checks that TeamCity still answers and accepts its token.
const READY_PROBE_INTERVAL: Duration = Duration::from_secs(10);

/// `sync_state` key of the last reconcile's [`PassReport`] (JSON).
pub const LAST_RECONCILE_KEY: &str = "last_reconcile_report";

/// `sync_state` key of the last worker pass's [`PassReport`] (JSON), for passes with rows.
pub const LAST_PASS_KEY: &str = "last_pass_report";

/// Why rows wait when the cache must be read again first.
const REREAD: &str = "TeamCity changed under the bridge; it is read again first";

/// The store counter every writer to TeamCity moves (see the module docs).
const WRITES_KEY: &str = "teamcity_writes";

/// Whether plans are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Apply plans to TeamCity.
    Apply,
    /// Compute, log and audit plans; write nothing to TeamCity.
    Shadow,
}

/// Engine settings (from `[sync]`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Apply or shadow.
    pub mode: Mode,
    /// What SCIM DELETE does.
    pub deprovision: Deprovision,
    /// Whether existing unmanaged TeamCity users are adopted by username.
    pub adopt: AdoptExisting,
    /// Blast-radius limits.
    pub limits: GuardLimits,
    /// Retry schedule of failing outbox rows.
    pub retry: RetryPolicy,
    /// Period of the full reconcile in `run`.
    pub reconcile_interval: Duration,
    /// How long the worker sleeps when there is nothing to do.
    pub poll: Duration,
    /// Lease on claimed outbox rows.
    pub lease: Duration,
    /// Users per page when reading TeamCity.
    pub page_size: u64,
    /// SCIM entities (their outbox rows coalesced) a worker pass takes when work starts, and
    /// the fewest a pass asks for: passes stay short, so a push never waits long behind a
    /// large backlog (a first load).
    pub batch: usize,
    /// Most entities a pass takes. While a backlog keeps passes full, each pass is sized from
    /// the last one's time to take about [`EngineConfig::pass_target`] ([`next_pass_size`]):
    /// its fixed costs (claims, bookkeeping, the start and end of its waves) are spread over
    /// more work when passes are quick, and a push never waits long for the pass in progress.
    pub max_batch: usize,
    /// How long a full pass should take (see [`EngineConfig::max_batch`]).
    pub pass_target: Duration,
    /// The database, as operators should read it (a resolved path), for messages.
    pub database: String,
}

/// Entities the pass after one of `size` asks for. A pass that found fewer than it asked for
/// (the backlog is gone, or there never was one) leaves the next at `min`. After a full pass
/// that `took` this long, the next is sized to take about `target` at the same rate — at most
/// twice this one, within `min..=max`. `took` is `None` before the pass ran (only its claim is
/// known).
pub(crate) fn next_pass_size(
    size: usize,
    claimed: usize,
    took: Option<Duration>,
    target: Duration,
    min: usize,
    max: usize,
) -> usize {
    let (min, max) = (min.max(1), max.max(min.max(1)));
    if claimed < size {
        return min;
    }
    let Some(took) = took else {
        return size.clamp(min, max);
    };
    let took = took.as_secs_f64().max(1e-6);
    let at_rate = (size as f64 * target.as_secs_f64() / took).floor();
    let next = if at_rate >= (2 * size) as f64 {
        2 * size
    } else {
        at_rate as usize
    };
    next.clamp(min, max)
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: Mode::Apply,
            deprovision: Deprovision::Strip,
            adopt: AdoptExisting::Never,
            limits: GuardLimits {
                max_removals: Some(10),
                max_removals_percent: Some(20),
            },
            retry: RetryPolicy::default(),
            reconcile_interval: Duration::from_secs(600),
            poll: Duration::from_millis(200),
            lease: Duration::from_secs(60),
            page_size: 500,
            batch: 256,
            max_batch: 1024,
            pass_target: Duration::from_millis(500),
            database: "the database".into(),
        }
    }
}

/// Errors of a pass.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// TeamCity failed.
    #[error("TeamCity: {0}")]
    TeamCity(#[from] TeamCityError),
}

/// How many lines of a reconcile's drift are kept for `status` and the dashboard.
const DRIFT_LINES: usize = 200;

/// The first `max` lines of `text`, and a line saying how many were left out.
fn truncate_lines(text: &str, max: usize) -> String {
    let total = text.lines().count();
    if total <= max {
        return text.to_owned();
    }
    let mut out: String = text.lines().take(max).flat_map(|l| [l, "\n"]).collect();
    out.push_str(&format!(
        "… {} more lines (`teamcity-scim plan` shows all)\n",
        total - max
    ));
    out
}

/// What one pass or reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Outbox rows handled (completed, failed, held or deferred).
    pub outbox_rows: usize,
    /// Steps planned.
    pub planned: usize,
    /// Steps TeamCity accepted.
    pub applied: usize,
    /// Steps that failed permanently.
    pub failed: usize,
    /// Steps not attempted because a prerequisite failed.
    pub cancelled: usize,
    /// Steps waiting in (or behind) a batch held by the blast-radius guard.
    pub held: usize,
    /// Stopped early (TeamCity unavailable, the bridge misconfigured, or its view of TeamCity
    /// out of date): the rows will be retried.
    pub transient_stop: bool,
    /// TeamCity reads made (reconcile only).
    pub reads: usize,
    /// The drift a reconcile found, rendered as `plan` renders it (reconcile only; empty when
    /// TeamCity already matched).
    pub drift: String,
    /// Outbox passes that planned the whole directory because a scoped plan could not cover
    /// what their rows touch (see `scoped_desired`); a first load should have none.
    pub whole_passes: usize,
}

impl PassReport {
    fn add(&mut self, r: &PassReport) {
        self.outbox_rows += r.outbox_rows;
        self.planned += r.planned;
        self.applied += r.applied;
        self.failed += r.failed;
        self.cancelled += r.cancelled;
        self.held += r.held;
        self.transient_stop |= r.transient_stop;
        self.reads += r.reads;
        self.drift.push_str(&r.drift);
        self.whole_passes += r.whole_passes;
    }
}

/// Whether the engine can do its work, for readiness probes: `None` when it can, else the
/// reason (TeamCity unreachable, the bridge's token refused, a policy that does not match
/// TeamCity), which is also logged once when it changes.
#[derive(Debug, Default)]
pub struct Health {
    reason: std::sync::RwLock<Option<String>>,
}

impl Health {
    /// Why the engine is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<String> {
        self.reason
            .read()
            .map(|r| r.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn set(&self, reason: Option<String>) {
        let mut current = match self.reason.write() {
            Ok(g) => g,
            Err(e) => e.into_inner(),
        };
        if *current == reason {
            return;
        }
        match &reason {
            Some(r) => {
                warn!(reason = %r, "sync paused: nothing is applied to TeamCity until this is fixed; SCIM changes keep waiting in the outbox")
            }
            None => info!("sync ready: TeamCity is reachable and the policy matches it"),
        }
        *current = reason;
    }
}

/// Told how far a run of steps is: `(steps finished, steps to run)`, from the lanes as they
/// finish (so cheap and thread-safe). See [`Engine::with_progress`].
pub type Progress = Arc<dyn Fn(usize, usize) + Send + Sync>;

/// A [`Progress`] that calls `emit(done, total, steps per second, seconds left)` at most once
/// per `every` while a run of at least `min_steps` steps goes on, and once at its end. The
/// engine logs long runs with it; the CLI prints plain lines with it off a terminal.
pub fn periodic_progress(
    every: Duration,
    min_steps: usize,
    emit: impl Fn(usize, usize, f64, f64) + Send + Sync + 'static,
) -> Progress {
    let started = std::time::Instant::now();
    let last = std::sync::Mutex::new(started);
    Arc::new(move |done, total| {
        let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
        if total < min_steps || (done < total && last.elapsed() < every) {
            return;
        }
        *last = std::time::Instant::now();
        let rate = done as f64 / started.elapsed().as_secs_f64().max(0.001);
        let left = if rate > 0.0 {
            (total - done) as f64 / rate
        } else {
            0.0
        };
        emit(done, total, rate, left);
    })
}

/// Progress of long runs in the log: a line every [`PROGRESS_LOG_INTERVAL`] while a run of at
/// least [`PROGRESS_LOG_MIN_STEPS`] steps (a first load) goes on, with rate and time left.
fn log_progress() -> Progress {
    periodic_progress(
        PROGRESS_LOG_INTERVAL,
        PROGRESS_LOG_MIN_STEPS,
        |done, total, rate, left| {
            info!(
                done,
                total,
                rate = format!("{rate:.0}/s"),
                left = format!("{left:.0} s"),
                "applying to TeamCity"
            );
        },
    )
}

/// How often [`log_progress`] logs.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Runs shorter than this are not logged by [`log_progress`].
const PROGRESS_LOG_MIN_STEPS: usize = 1000;

/// The sync engine.
pub struct Engine {
    store: DynStore,
    client: Client,
    policy: Policy,
    cfg: EngineConfig,
    worker_id: String,
    cache: Mutex<Option<Cached>>,
    health: Arc<Health>,
    /// The value of the store's TeamCity write counter that the cache reflects.
    seen_writes: std::sync::Mutex<Option<i64>>,
    /// The policy was checked against TeamCity and matches it.
    policy_ok: AtomicBool,
    /// "This TeamCity cannot end sessions" was logged.
    sessions_noted: AtomicBool,
    /// "This TeamCity cannot clear remember-me data" was logged.
    remember_me_noted: AtomicBool,
    /// The database was compared with TeamCity's managed objects once.
    database_checked: AtomicBool,
    /// Approved batches this engine has tried to apply at least once.
    approved_tried: std::sync::Mutex<BTreeSet<i64>>,
    /// Entities the next pass asks for ([`next_pass_size`]).
    pass_size: std::sync::atomic::AtomicUsize,
    /// Users read again since the cache was loaded (before their offboarding).
    fresh_users: std::sync::Mutex<HashSet<u64>>,
    /// Why the last run's writes were all refused (the bridge misconfigured), until a write
    /// is accepted again: readiness keeps saying so between attempts.
    writes_refused: std::sync::Mutex<Option<String>>,
    /// Notified when a new outbox row was committed (LISTEN/NOTIFY on PostgreSQL).
    wake: Arc<tokio::sync::Notify>,
    /// Told how far each run of steps is (default: a log line now and then for long runs).
    progress: Option<Progress>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("cfg", &self.cfg)
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

fn entry(
    resource_type: &str,
    resource_id: Option<String>,
    operation: &str,
    ok: bool,
    status: Option<i64>,
    detail: Value,
) -> AuditEntry {
    AuditEntry {
        resource_type: resource_type.to_owned(),
        resource_id,
        operation: operation.to_owned(),
        outcome: if ok { "success" } else { "failure" }.to_owned(),
        status,
        detail,
    }
}

/// The directory as the sync engine sees it: one consistent read of the store.
pub async fn read_directory<S: store::Directory + ?Sized>(
    store: &S,
) -> Result<Directory, StoreError> {
    let snap = store.directory().await?;
    Ok(Directory {
        users: snap.users,
        groups: snap.groups.into_iter().map(dir_group).collect(),
    })
}

/// The directory and the desired state as they would be computed now, writing nothing (no
/// pins persisted, no alerts audited): for read-only views.
pub async fn desired_unrecorded<S: store::Directory + store::SyncState + ?Sized>(
    store: &S,
    policy: &Policy,
) -> Result<(Directory, Desired), StoreError> {
    let dir = read_directory(store).await?;
    let pins = store.pins().await?;
    let d = desired(&dir, policy, &pins, &DesiredOptions::default());
    Ok((dir, d))
}

/// The sync engine's view of a stored SCIM group: its user members only.
fn dir_group(g: store::DirGroup) -> DirGroup {
    DirGroup {
        id: g.id,
        display_name: g.display_name,
        external_id: g.external_id,
        members: g
            .members
            .into_iter()
            .filter(|m| m.ty == store::MemberType::User)
            .map(|m| m.value)
            .collect(),
    }
}

/// An audit-safe description of an action: ids, keys and role names, never emails or personal
/// names. The detail carries what `access-review` replays (see `store::access`): the SCIM id of
/// a created user, group keys, `ROLE@scope` roles, a created group's marker, roles and member
/// ids (`<TeamCity id>` or `new:<SCIM id>`), and its name unless that looks like an email.
pub fn describe(a: &Action) -> (String, Value) {
    let user = |r: &UserRef| match r {
        UserRef::Id(i) => format!("user:{i}"),
        UserRef::New(s) => format!("user:new:{s}"),
    };
    let member = |r: &UserRef| match r {
        UserRef::Id(i) => i.to_string(),
        UserRef::New(s) => format!("new:{s}"),
    };
    match a {
        Action::CreateUser {
            scim_id, groups, ..
        } => {
            let mut d = json!({"scim_id": scim_id});
            if !groups.is_empty() {
                d["groups"] = json!(groups);
            }
            (format!("user:new:{scim_id}"), d)
        }
        Action::UpdateUser { user: u, changes } => (
            format!("user:{u}"),
            json!({"fields": changes.iter().map(|c| c.field.to_string()).collect::<Vec<_>>()}),
        ),
        Action::DeleteUser { user: u }
        | Action::RevokeTokens { user: u }
        | Action::ResetPassword { user: u }
        | Action::EndSessions { user: u }
        | Action::ClearRememberMe { user: u }
        | Action::SetDeactivated { user: u }
        | Action::ClearDeactivated { user: u } => (format!("user:{u}"), json!({})),
        Action::AdoptUser { user: u, scim_id } => (
            format!("user:{u}"),
            json!({"scim_id": scim_id, "adopted": true}),
        ),
        Action::AddToGroup { user: u, group } => (user(u), json!({"group": group})),
        Action::RemoveFromGroup { user: u, group } => {
            (format!("user:{u}"), json!({"group": group}))
        }
        Action::AddUserRole { user: u, role } => (user(u), json!({"role": role.to_string()})),
        Action::RemoveUserRole { user: u, role } => {
            (format!("user:{u}"), json!({"role": role.to_string()}))
        }
        Action::CreateGroup {
            key,
            name,
            marker,
            roles,
            members,
            ..
        } => {
            let mut d = json!({
                "key": key,
                "marker": marker,
                "roles": roles.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "members": members.len(),
                "member_ids": members.iter().map(member).collect::<Vec<_>>(),
            });
            if !store::audit::looks_like_email(name) {
                d["name"] = json!(name);
            }
            (format!("group:{key}"), d)
        }
        Action::DeleteGroup { key } => (format!("group:{key}"), json!({"key": key})),
        Action::AddGroupRole { group, role } | Action::RemoveGroupRole { group, role } => (
            format!("group:{group}"),
            json!({"group": group, "role": role.to_string()}),
        ),
    }
}

fn kinds_summary(actions: &[Action]) -> String {
    let counts: BTreeMap<&str, usize> = actions.iter().fold(BTreeMap::new(), |mut m, a| {
        *m.entry(kind(a)).or_default() += 1;
        m
    });
    counts
        .iter()
        .map(|(k, n)| format!("{n} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The SCIM ↔ TeamCity link an applied create establishes (stored with its audit event).
fn created_link(a: &Action, created: &BTreeMap<String, u64>) -> Option<store::MappingLink> {
    match a {
        Action::CreateUser {
            scim_id, username, ..
        } => Some(store::MappingLink {
            kind: scim::ResourceKind::User,
            scim_id: scim_id.clone(),
            teamcity_id: created.get(scim_id)?.to_string(),
            teamcity_name: username.clone(),
        }),
        Action::CreateGroup {
            key, name, marker, ..
        } if marker != DEFAULTS_MARKER => Some(store::MappingLink {
            kind: scim::ResourceKind::Group,
            scim_id: marker.clone(),
            teamcity_id: key.clone(),
            teamcity_name: name.clone(),
        }),
        _ => None,
    }
}

/// A readable reference to a step, for reasons: `create_group on group:SCIM_…_1`.
fn label(a: &Action) -> String {
    format!("{} on {}", kind(a), describe(a).0)
}

/// Identity of a step, to recognise it in held batches across passes.
fn fingerprint(a: &Action) -> String {
    serde_json::to_string(a).unwrap_or_default()
}

/// A TeamCity object a step addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Obj {
    User(u64),
    Group(String),
}

impl std::fmt::Display for Obj {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Obj::User(id) => write!(f, "user id:{id}"),
            Obj::Group(key) => write!(f, "group {key}"),
        }
    }
}

/// The TeamCity objects a step addresses, for "changed underneath" (a group it creates does
/// not exist yet).
fn objects(a: &Action) -> Vec<Obj> {
    let user = match a.user_target() {
        Some(UserTarget::Id(id)) => Some(Obj::User(id)),
        _ => None,
    };
    let group = match a {
        Action::CreateGroup { .. } => None,
        _ => a.group_target().map(|k| Obj::Group(k.to_owned())),
    };
    user.into_iter().chain(group).collect()
}

/// Records the outcome of step `i`.
fn set(outcomes: &std::sync::Mutex<Vec<Outcome>>, i: usize, outcome: Outcome) {
    outcomes.lock().unwrap_or_else(|e| e.into_inner())[i] = outcome;
}

/// The SCIM entities (outbox `entity_type`, SCIM id) a step concerns: its user and its group.
/// A failure, a hold or a re-read of the step settles the outbox rows of all of them.
fn entities_of(a: &Action, actual: &ActualState) -> Vec<(String, String)> {
    let user = match a {
        // An adopted user has no marker yet: its SCIM id is in the step.
        Action::AdoptUser { scim_id, .. } => Some(scim_id.clone()),
        _ => match a.user_target() {
            Some(UserTarget::Id(id)) => actual.user(id).and_then(|u| u.scim_id.clone()),
            Some(UserTarget::New(s)) => Some(s.to_owned()),
            None => None,
        },
    };
    let group = match a {
        // A group being created is not in `actual` yet: its marker is in the step.
        Action::CreateGroup { marker, .. } => Some(marker.clone()),
        _ => a
            .group_target()
            .and_then(|k| actual.group(k))
            .and_then(|g| g.marker.clone()),
    }
    .filter(|m| m != DEFAULTS_MARKER);
    user.map(|s| ("user".to_owned(), s))
        .into_iter()
        .chain(group.map(|m| ("group".to_owned(), m)))
        .collect()
}

/// What became of one step in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Not reached (the run stopped, or it was not scheduled).
    NotStarted,
    /// TeamCity accepted it.
    Applied,
    /// TeamCity refused it for good: the reason.
    Failed(String),
    /// Not attempted because a prerequisite failed: "not attempted: <step> failed: <why>".
    Cancelled(String),
    /// Not done because TeamCity changed under the bridge (a 404, an unexpected conflict, or
    /// a prerequisite that met one): re-read, then retried.
    Stale(String),
    /// Waits in (or behind) a held batch.
    Waiting,
}

/// Why a run stopped before its end.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    /// TeamCity unavailable (connection, timeout, 5xx, 429): retried with backoff.
    Transient(String),
    /// The bridge itself is misconfigured (token refused, TLS, not JSON): nothing is
    /// dead-lettered, readiness says why.
    Misconfigured(String),
}

/// What [`Engine::apply_steps`] did.
#[derive(Debug)]
struct Run {
    outcomes: Vec<Outcome>,
    stop: Option<Stop>,
    /// Some object turned out different from the cache: drop the cache.
    changed: bool,
    /// Any call was made (so the write counter moves).
    attempted: bool,
    /// Steps that failed with a 403, and their targets.
    forbidden: BTreeMap<usize, String>,
}

/// The least number of distinct objects that must all have been refused with a 403 (and nothing
/// accepted) before a pass calls it the bridge's own lack of permissions, not the objects'.
const FORBIDDEN_EVERYWHERE: usize = 2;

/// What a user's offboarding removed in this pass, for its `set_deactivated` audit event.
#[derive(Debug, Default)]
struct Offboarding {
    groups: Vec<String>,
    roles: Vec<String>,
    tokens: Vec<String>,
    sessions: Option<&'static str>,
    remember_me: Option<&'static str>,
}

/// The fingerprints of a held batch's steps, or why its stored plan cannot be read.
fn read_batch(b: &HeldBatch) -> Result<Vec<String>, String> {
    serde_json::from_value::<Vec<Action>>(b.plan.clone())
        .map(|actions| actions.iter().map(fingerprint).collect())
        .map_err(|e| format!("its stored plan cannot be read by this version: {e}"))
}

/// What [`Engine::execute`] leaves to settle, per SCIM entity.
#[derive(Debug, Default)]
struct Exec {
    /// Dead: a permanent failure of the entity's work (or a step it needed), with the reason.
    failed: BTreeMap<(String, String), String>,
    /// TeamCity changed under the bridge: retried once the cache is read again.
    stale: BTreeMap<(String, String), String>,
    /// Waiting in this held batch.
    held: BTreeMap<(String, String), i64>,
    /// The run stopped early.
    stop: Option<Stop>,
    /// The cache must be read again.
    changed: bool,
    /// A TeamCity call was made.
    attempted: bool,
}

/// The conflicts of a plan that concern the claimed entities.
fn relevant_conflicts(p: &Plan, claimed: &BTreeSet<(String, String)>) -> Vec<Conflict> {
    p.conflicts
        .iter()
        .filter(|c| {
            let e = match c {
                Conflict::UsernameTaken { scim_id, .. } => ("user".to_owned(), scim_id.clone()),
                Conflict::GroupNameTaken { marker, .. } => ("group".to_owned(), marker.clone()),
            };
            claimed.contains(&e)
        })
        .cloned()
        .collect()
}

/// The SCIM ids of the claimed entities a pass wrote to successfully (their links are kept).
fn touched(claimed: &BTreeSet<(String, String)>, exec: &Exec) -> BTreeSet<String> {
    claimed
        .iter()
        .filter(|e| !exec.failed.contains_key(*e) && !exec.stale.contains_key(*e))
        .map(|(_, id)| id.clone())
        .collect()
}

/// The member ids a group's outbox row names (`added` and `removed`), or `None` when its
/// detail does not list them.
fn member_lists(detail: &str) -> Option<Vec<String>> {
    let v: Value = serde_json::from_str(detail).ok()?;
    let mut ids = Vec::new();
    for key in ["added", "removed"] {
        match v.get(key) {
            Some(Value::Array(list)) => ids.extend(
                list.iter()
                    .filter_map(|x| x.as_str().or_else(|| x.get("value")?.as_str()))
                    .map(str::to_owned),
            ),
            Some(_) => return None,
            None if key == "removed" => {}
            None => return None,
        }
    }
    Some(ids)
}

impl Engine {
    /// An engine over a store and a TeamCity client.
    pub fn new(store: DynStore, client: Client, policy: Policy, cfg: EngineConfig) -> Self {
        // Unique among replicas (two containers both run as pid 1).
        let worker_id = format!(
            "worker-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let first_pass = cfg.batch.max(1);
        Engine {
            store,
            client,
            policy,
            cfg,
            worker_id,
            cache: Mutex::new(None),
            health: Arc::new(Health {
                reason: std::sync::RwLock::new(Some(
                    "starting: TeamCity has not been read yet".into(),
                )),
            }),
            seen_writes: std::sync::Mutex::new(None),
            policy_ok: AtomicBool::new(false),
            sessions_noted: AtomicBool::new(false),
            remember_me_noted: AtomicBool::new(false),
            database_checked: AtomicBool::new(false),
            approved_tried: std::sync::Mutex::new(BTreeSet::new()),
            pass_size: std::sync::atomic::AtomicUsize::new(first_pass),
            fresh_users: std::sync::Mutex::new(HashSet::new()),
            writes_refused: std::sync::Mutex::new(None),
            wake: Arc::new(tokio::sync::Notify::new()),
            progress: None,
        }
    }

    /// Reports the progress of every run of steps to `progress` instead of the log (the CLI
    /// draws a progress bar with it).
    pub fn with_progress(mut self, progress: Progress) -> Self {
        self.progress = Some(progress);
        self
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    /// The engine's readiness, shared (readiness probes read it).
    pub fn health(&self) -> Arc<Health> {
        self.health.clone()
    }

    /// The store to use: inside a leased pass or reconcile, the view fenced by its leases.
    fn store(&self) -> DynStore {
        FENCED
            .try_with(Clone::clone)
            .unwrap_or_else(|_| self.store.clone())
    }

    /// This engine's id as a lease holder and outbox worker.
    pub fn worker_id(&self) -> &str {
        &self.worker_id
    }

    /// Runs `work` with every store write fenced by `fences` (checked inside each write's
    /// transaction), renewing the leases — and the outbox rows this worker claimed — every
    /// third of their time. When a lease is lost, `work` is stopped at once (dropped between
    /// two awaits) and `Fenced` returned.
    async fn under_leases<T>(
        &self,
        fences: &[store::Fence],
        ttl: Duration,
        work: impl std::future::Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let mut fenced = self.store.clone();
        for f in fences {
            fenced = fenced.fenced(f.clone());
        }
        let heartbeat = async {
            loop {
                tokio::time::sleep(ttl / 3).await;
                for f in fences {
                    match self.store.renew_lease(f, ttl).await {
                        Ok(_) => {}
                        Err(e @ StoreError::Fenced(_)) => return e,
                        Err(e) => {
                            warn!(error = %e, lease = %f.name, "could not renew the lease; trying again")
                        }
                    }
                }
                let now = self.store.now();
                if let Err(e) = self
                    .store
                    .renew_outbox_leases(&self.worker_id, now, self.cfg.lease)
                    .await
                {
                    warn!(error = %e, "could not renew the outbox row leases; trying again");
                }
            }
        };
        tokio::select! {
            r = FENCED.scope(fenced, work) => r,
            e = heartbeat => {
                warn!(error = %e, "lease lost: stopping this pass; another replica goes on");
                Err(e.into())
            }
        }
    }

    /// A reconcile under the [`store::RECONCILE_LEASE`] (taken for it and released after),
    /// fenced also by `outer` (the [`SYNC_LEASE`] of `serve`). `None`: another process is
    /// reconciling now, nothing was done.
    pub async fn reconcile_leased(
        &self,
        outer: Option<&store::Fence>,
    ) -> Result<Option<PassReport>, EngineError> {
        let ttl = self.cfg.lease;
        let Some(lease) = self
            .store
            .acquire_lease(store::RECONCILE_LEASE, &self.worker_id, ttl)
            .await?
        else {
            return Ok(None);
        };
        let mut fences: Vec<store::Fence> = outer.into_iter().cloned().collect();
        fences.push(lease.fence.clone());
        let r = self.under_leases(&fences, ttl, self.reconcile(false)).await;
        if let Err(e) = self.store.release_lease(&lease.fence).await {
            warn!(error = %e, "could not release the reconcile lease; it runs out by itself");
        }
        r.map(Some)
    }

    fn ctx(&self, actor: &str) -> WriteCtx {
        WriteCtx {
            actor: actor.to_owned(),
            request_id: None,
        }
    }

    fn plan_options(&self) -> PlanOptions {
        PlanOptions {
            deprovision: self.cfg.deprovision,
            adopt: self.cfg.adopt,
        }
    }

    /// The directory as the sync engine sees it.
    pub async fn directory(&self) -> Result<Directory, EngineError> {
        Ok(read_directory(&*self.store()).await?)
    }

    /// [`Engine::plan_full`] for read-only views: writes nothing to the store.
    pub async fn preview(&self) -> Result<(Plan, ActualState, usize), EngineError> {
        let (actual, reads) = self.read_actual().await?;
        let (_, d) = desired_unrecorded(&*self.store(), &self.policy).await?;
        let mut p = plan(&d, &actual, &self.plan_options());
        self.settle_orphans(&mut p).await?;
        Ok((p, actual, reads))
    }

    /// Desired state; persists new pins and audits new alerts.
    pub async fn desired(&self) -> Result<Desired, EngineError> {
        let started = std::time::Instant::now();
        let dir = self.directory().await?;
        debug!(users = dir.users.len(), groups = dir.groups.len(), elapsed = ?started.elapsed(), "directory read");
        let pins = self.store().pins().await?;
        let d = desired(&dir, &self.policy, &pins, &DesiredOptions::default());
        self.record_desired(&d, &pins).await?;
        Ok(d)
    }

    /// Persists the new pins of `d` and audits its new alerts (each once).
    async fn record_desired(
        &self,
        d: &Desired,
        pins: &crate::policy::Pins,
    ) -> Result<(), EngineError> {
        for (rule, group) in &d.pins {
            if pins.get(rule) != Some(group) {
                self.store().set_pin(&self.ctx("sync"), rule, group).await?;
            }
        }
        for alert in &d.alerts {
            let key = format!("alert:{alert:?}");
            if self.store().sync_state_get(&key).await?.is_none() {
                alert.emit();
                self.store()
                    .audit(
                        &self.ctx("sync"),
                        entry(
                            "Policy",
                            None,
                            "policy.alert",
                            false,
                            None,
                            json!({"alert": format!("{alert:?}")}),
                        ),
                    )
                    .await?;
                self.store().sync_state_set(&key, "raised").await?;
            }
        }
        Ok(())
    }

    /// Reads TeamCity in full (pages, `fields=` limited).
    pub async fn read_actual(&self) -> Result<(ActualState, usize), EngineError> {
        let (actual, stats) = read_actual_with(
            &self.client,
            ReadOptions {
                page_size: self.cfg.page_size,
                ..ReadOptions::default()
            },
        )
        .await?;
        Ok((actual, stats.calls as usize))
    }

    /// Drops the TeamCity steps of objects nobody asked to remove from `p.orphans` when the
    /// directory did ask: a SCIM DELETE of that user or group is recorded.
    async fn settle_orphans(&self, p: &mut Plan) -> Result<(), EngineError> {
        if p.orphans.is_empty() {
            return Ok(());
        }
        let deleted: HashSet<(String, String)> =
            self.store().deleted_entities().await?.into_iter().collect();
        p.orphans
            .retain(|_, o| !deleted.contains(&(o.entity.to_owned(), o.scim_id.clone())));
        Ok(())
    }

    /// The plan of a full reconcile, without applying it (the `plan` command). Steps on
    /// objects the directory does not know, that wait for approval, are in `orphans`.
    pub async fn plan_full(&self) -> Result<(Plan, ActualState, usize), EngineError> {
        let (actual, reads) = self.read_actual().await?;
        let d = self.desired().await?;
        let mut p = plan(&d, &actual, &self.plan_options());
        self.settle_orphans(&mut p).await?;
        Ok((p, actual, reads))
    }

    /// Problems of the policy against the live TeamCity (unknown roles or projects).
    pub async fn check_policy(&self) -> Result<Vec<crate::policy::Problem>, EngineError> {
        Ok(crate::policy::check_live(&self.client, &self.policy).await?)
    }

    /// The store's TeamCity write counter.
    async fn writes_counter(&self) -> Result<i64, EngineError> {
        Ok(self
            .store
            .sync_state_get(WRITES_KEY)
            .await?
            .and_then(|v| v.parse().ok())
            .unwrap_or(0))
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Option<i64>> {
        self.seen_writes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops the cache when another process wrote to TeamCity since it was read.
    async fn notice_foreign_writes(&self) -> Result<(), EngineError> {
        let now = self.writes_counter().await?;
        let stale = *self.seen() != Some(now);
        if stale {
            let mut cache = self.cache.lock().await;
            if cache.take().is_some() {
                info!("TeamCity was changed by another teamcity-scim process; reading it again");
            }
        }
        Ok(())
    }

    /// Moves the write counter after a pass that called TeamCity; if someone else moved it
    /// meanwhile, the cache may miss their writes and is dropped.
    async fn after_writes(&self, attempted: bool) -> Result<(), EngineError> {
        if !attempted || self.cfg.mode == Mode::Shadow {
            return Ok(());
        }
        let v = self.store().sync_state_increment(WRITES_KEY).await?;
        let ours = {
            let mut seen = self.seen();
            let ours = *seen == Some(v - 1);
            *seen = ours.then_some(v);
            ours
        };
        if !ours {
            *self.cache.lock().await = None;
        }
        Ok(())
    }

    async fn ensure_cache(&self) -> Result<(), EngineError> {
        let mut cache = self.cache.lock().await;
        if cache.is_none() {
            let counter = self.writes_counter().await?;
            let (actual, _) = self.read_actual().await?;
            *self.seen() = Some(counter);
            self.fresh().clear();
            *cache = Some(actual.into());
        }
        Ok(())
    }

    /// Whether work can be applied now: TeamCity read (cache loaded) and the policy valid
    /// against it. `Ok(Some(reason))` when not — readiness says why, and nothing is applied.
    async fn blocked(&self) -> Result<Option<String>, EngineError> {
        let why = |e: &TeamCityError| {
            if e.is_misconfiguration() {
                format!(
                    "the bridge cannot use TeamCity ({e}); check [teamcity] url, token and ca_file"
                )
            } else if e.is_transient() {
                format!("TeamCity is unreachable ({e})")
            } else {
                format!("TeamCity could not be read ({e}); check the bridge account's permissions")
            }
        };
        match self.ensure_cache().await {
            Ok(()) => {}
            Err(EngineError::TeamCity(e)) => {
                let reason = why(&e);
                self.health.set(Some(reason.clone()));
                return Ok(Some(reason));
            }
            Err(e) => return Err(e),
        }
        if !self.policy_ok.load(Ordering::Relaxed) {
            match self.check_policy().await {
                Ok(problems) if problems.is_empty() => {
                    self.policy_ok.store(true, Ordering::Relaxed);
                }
                Ok(problems) => {
                    let reason = format!(
                        "the policy does not match TeamCity: {}; fix [policy] (see `teamcity-scim policy check`)",
                        problems
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join("; ")
                    );
                    self.health.set(Some(reason.clone()));
                    return Ok(Some(reason));
                }
                Err(EngineError::TeamCity(e)) => {
                    let reason = why(&e);
                    self.health.set(Some(reason.clone()));
                    return Ok(Some(reason));
                }
                Err(e) => return Err(e),
            }
        }
        // Reads work; whether writes do is only known by writing: a refusal seen by the last
        // run stays the reason until a write is accepted.
        self.health.set(self.refused().clone());
        Ok(None)
    }

    fn refused(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.writes_refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn fresh(&self) -> std::sync::MutexGuard<'_, HashSet<u64>> {
        self.fresh_users.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reads again, once per cache load, every managed user about to be offboarded (inactive
    /// in the directory, or deleted from it, and not yet marked deactivated): groups and
    /// roles given by hand since the last full read are stripped too. `false` when one of
    /// them is no longer the user the cache says (the cache must be read again).
    async fn refresh_offboarded(
        &self,
        d: &Desired,
        actual: &mut ActualState,
        scope: Option<&Scope>,
    ) -> Result<bool, EngineError> {
        // A scoped pass offboards only users in its scope.
        let in_scope = |s: &str| scope.is_none_or(|sc| sc.users.contains(s));
        // SCIM-deleted users are looked up only when a managed user left the directory.
        let gone = actual.users.iter().any(|u| {
            !u.deactivated
                && u.scim_id
                    .as_deref()
                    .is_some_and(|s| !d.users.contains_key(s) && in_scope(s))
        });
        let deleted: HashSet<String> = if gone {
            self.store()
                .deleted_entities()
                .await?
                .into_iter()
                .filter(|(t, _)| t == "user")
                .map(|(_, id)| id)
                .collect()
        } else {
            HashSet::new()
        };
        let due: Vec<(u64, String)> = {
            let fresh = self.fresh();
            actual
                .users
                .iter()
                .filter(|u| !u.deactivated && !fresh.contains(&u.id))
                .filter(|u| match u.scim_id.as_deref() {
                    Some(s) => match d.users.get(s) {
                        Some(du) => !du.active,
                        None => deleted.contains(s) && in_scope(s),
                    },
                    None => false,
                })
                .map(|u| (u.id, u.username.clone()))
                .collect()
        };
        for (id, username) in due {
            match crate::actual::read_user(&self.client, id, &username).await {
                Ok(Some(mut now)) => {
                    if let Some(u) = actual.users.iter_mut().find(|u| u.id == id) {
                        now.token_count = u.token_count;
                        *u = now;
                    }
                    self.fresh().insert(id);
                }
                Ok(None) => return Ok(false),
                // TeamCity down or the bridge misconfigured: read everything again first.
                Err(e) if e.is_transient() || e.is_misconfiguration() => return Ok(false),
                // This one user cannot be read: strip what the cache knows; the next
                // reconcile reads it again.
                Err(e) => {
                    warn!(user = id, error = %e, "could not read a user before offboarding it; stripping what was last read");
                    self.fresh().insert(id);
                }
            }
        }
        Ok(true)
    }

    /// Says once, in one line, when the database knows none of the objects the bridge
    /// manages in TeamCity (a wrong `database.url`, a lost volume, another working directory).
    fn notice_unknown_database(&self, d: &Desired, actual: &ActualState) {
        if self.database_checked.swap(true, Ordering::Relaxed) {
            return;
        }
        let users: Vec<&str> = actual
            .users
            .iter()
            .filter_map(|u| u.scim_id.as_deref())
            .collect();
        let groups: Vec<&str> = actual
            .groups
            .iter()
            .filter_map(|g| g.marker.as_deref())
            .filter(|m| *m != DEFAULTS_MARKER)
            .collect();
        let known = users.iter().any(|s| d.users.contains_key(*s))
            || groups.iter().any(|m| d.groups.contains_key(*m));
        if users.len() + groups.len() > 0 && !known {
            warn!(
                database = %self.cfg.database,
                users = users.len(),
                groups = groups.len(),
                "the database {} knows none of the {} users and {} groups teamcity-scim manages in TeamCity \
                 (a wrong database.url, a lost volume, or serve started from another directory?); \
                 nothing is removed from them without `teamcity-scim approve`",
                self.cfg.database,
                users.len(),
                groups.len()
            );
        }
    }

    /// Conflicts of a plan by entity, each audited (`sync.conflict`); with `once`, each
    /// distinct conflict is audited and logged only the first time it is seen.
    async fn conflicts(
        &self,
        conflicts: &[Conflict],
        once: bool,
    ) -> Result<BTreeMap<(String, String), String>, EngineError> {
        let mut out = BTreeMap::new();
        for c in conflicts {
            let entity = match c {
                Conflict::UsernameTaken { scim_id, .. } => ("user", scim_id),
                Conflict::GroupNameTaken { marker, .. } => ("group", marker),
            };
            let reason = c.to_string();
            let key = format!("conflict:{}:{}", entity.1, reason);
            if once {
                if self.store().sync_state_get(&key).await?.is_some() {
                    continue;
                }
                self.store().sync_state_set(&key, "reported").await?;
            }
            // Usernames are often email addresses: the log names the SCIM entity only; the
            // reason is in the outbox row, the audit trail and `plan`.
            warn!(
                entity = entity.0,
                id = %entity.1,
                "sync conflict left alone; `teamcity-scim plan` and `outbox list` say why"
            );
            self.store()
                .audit(
                    &self.ctx("sync"),
                    entry(
                        if entity.0 == "user" { "User" } else { "Group" },
                        Some(entity.1.clone()),
                        "sync.conflict",
                        false,
                        None,
                        json!({"conflict": reason}),
                    ),
                )
                .await?;
            out.insert((entity.0.to_owned(), entity.1.clone()), reason);
        }
        Ok(out)
    }

    /// A full reconcile: re-read TeamCity, plan, guard, apply (unless `dry_run` or shadow).
    pub async fn reconcile(&self, dry_run: bool) -> Result<PassReport, EngineError> {
        let started = std::time::Instant::now();
        let mut cache = self.cache.lock().await;
        let counter = self.writes_counter().await?;
        // TeamCity and the directory are read at the same time: one waits on the network,
        // the other is local work.
        let (read, d) = tokio::join!(self.read_actual(), self.desired());
        let d = d?;
        let (actual, reads) = match read {
            Ok(r) => r,
            Err(EngineError::TeamCity(e)) => {
                self.health
                    .set(Some(format!("TeamCity could not be read ({e})")));
                return Err(e.into());
            }
            Err(e) => return Err(e),
        };
        debug!(reads, elapsed = ?started.elapsed(), "reconcile: TeamCity read, desired state computed");
        *self.seen() = Some(counter);
        self.fresh().clear();
        let actual = cache.insert(actual.into()).whole();
        self.notice_unknown_database(&d, actual);
        let mut report = PassReport {
            reads,
            ..PassReport::default()
        };
        let mut p = plan(&d, actual, &self.plan_options());
        self.settle_orphans(&mut p).await?;
        debug!(actions = p.actions.len(), elapsed = ?started.elapsed(), "reconcile: planned");
        for r in &p.reports {
            match r {
                // Usernames are often email addresses: logged by id only.
                crate::plan::Report::UnmanagedMember { user, group, .. } => {
                    info!(user, %group, "reconcile: an unmanaged user is a member of a managed group; left as is");
                }
                other => info!(report = %other, "reconcile: reported"),
            }
        }
        report.planned = p.actions.len();
        if !p.actions.is_empty() {
            report.drift = crate::render::render(&p, actual);
        }
        if dry_run {
            return Ok(report);
        }
        self.conflicts(&p.conflicts, true).await?;
        drop(cache);
        // The checks that guard applying (the policy against TeamCity) run when there is
        // something to apply; `run` checks them at start anyway.
        if !p.actions.is_empty()
            && let Some(reason) = self.blocked().await?
        {
            warn!(%reason, "reconcile: nothing applied");
            report.transient_stop = true;
            return Ok(report);
        }
        let mut cache = self.cache.lock().await;
        let Some(actual) = cache.as_mut().map(Cached::whole) else {
            report.transient_stop = true;
            return Ok(report);
        };
        let managed = actual.managed_users();
        let exec = self
            .execute(&p, actual, managed, true, "reconcile", &mut report)
            .await?;
        debug!(elapsed = ?started.elapsed(), "reconcile: applied");
        if exec.changed {
            *cache = None;
        } else if let Some(actual) = cache.as_mut().map(Cached::whole) {
            self.record_mappings(actual, None).await?;
        }
        drop(cache);
        self.after_writes(exec.attempted).await?;
        self.note_stop(exec.stop.as_ref()).await;
        if exec.stop.is_some() {
            report.transient_stop = true;
        }
        debug!(elapsed = ?started.elapsed(), "reconcile: mappings recorded");
        self.store()
            .sync_state_set("last_reconcile", &store::timefmt::format(self.store.now()))
            .await?;
        self.record_report(LAST_RECONCILE_KEY, &report, started.elapsed())
            .await?;
        metrics::counter!("sync_reconciles_total").increment(1);
        metrics::gauge!("teamcity_scim_reconcile_drift_steps").set(report.planned as f64);
        if !report.transient_stop {
            metrics::gauge!("teamcity_scim_last_reconcile_success_timestamp_seconds")
                .set(self.store.now().unix_timestamp() as f64);
        }
        Ok(report)
    }

    /// Keeps what the last pass or reconcile did (`teamcity-scim status` shows it).
    async fn record_report(
        &self,
        key: &str,
        r: &PassReport,
        took: Duration,
    ) -> Result<(), EngineError> {
        let summary = json!({
            "time": store::timefmt::format(self.store.now()),
            "seconds": took.as_secs_f64(),
            "outbox_rows": r.outbox_rows,
            "reads": r.reads,
            "planned": r.planned,
            "applied": r.applied,
            "failed": r.failed,
            "cancelled": r.cancelled,
            "held": r.held,
            "stopped_early": r.transient_stop,
            "drift": truncate_lines(&r.drift, DRIFT_LINES),
        });
        self.store()
            .sync_state_set(key, &summary.to_string())
            .await?;
        Ok(())
    }

    /// Approved batches this engine has not tried yet (a pass runs for them even without rows).
    fn untried_approvals(&self, approved: &[HeldBatch]) -> bool {
        let tried = self
            .approved_tried
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        approved.iter().any(|b| !tried.contains(&b.id))
    }

    /// One worker pass over due outbox rows (at most [`EngineConfig::batch`] entities).
    /// Returns what it did; `outbox_rows == 0` means idle.
    ///
    /// A pass plans what its rows touch (see [`Engine::scoped_desired`]) against the cached
    /// TeamCity state and costs O(change) whatever the size of the directory. It plans the
    /// whole directory instead (as a reconcile does, without reading TeamCity) when approved
    /// held batches wait for their first try, and in the cases `scoped_desired` names.
    pub async fn run_once(&self) -> Result<PassReport, EngineError> {
        let started = std::time::Instant::now();
        let mut report = PassReport::default();
        self.notice_foreign_writes().await?;
        let now = self.store.now();
        // Three lanes share a pass. A quarter goes to entities TeamCity already has: a change
        // to existing access (a deactivation, a membership) is never queued behind the
        // creations of a first load. A quarter goes to the most recent pushes, the rest to the
        // oldest rows: a new push is applied within a pass or two once the IdP stops pushing,
        // and the backlog still drains oldest first.
        let batch = self.pass_size.load(Ordering::Relaxed).max(1);
        let lane = batch.div_ceil(4);
        let mut claimed = self
            .store
            .claim_outbox_linked(&self.worker_id, now, self.cfg.lease, lane)
            .await?;
        let recent = lane.min(batch - claimed.len());
        if recent > 0 {
            let newest = self
                .store
                .claim_outbox_newest(&self.worker_id, now, self.cfg.lease, recent)
                .await?;
            // Fewer than asked: nothing else is due.
            let more = newest.len() == recent;
            claimed.extend(newest);
            if more && batch > claimed.len() {
                let rest = batch - claimed.len();
                claimed.extend(
                    self.store
                        .claim_outbox(&self.worker_id, now, self.cfg.lease, rest)
                        .await?,
                );
            }
        }
        let approved = self.store().list_held(Some(HeldState::Approved)).await?;
        let untried = self.untried_approvals(&approved);
        self.pass_size.store(
            next_pass_size(
                batch,
                claimed.len(),
                None,
                self.cfg.pass_target,
                self.cfg.batch,
                self.cfg.max_batch,
            ),
            Ordering::Relaxed,
        );
        if claimed.is_empty() && !untried {
            // Idle: compact the cache now (after a reconcile or a whole pass), not when the
            // next push is waiting.
            if let Some(cached) = self.cache.lock().await.as_mut() {
                cached.warm();
            }
            return Ok(report);
        }
        report.outbox_rows = claimed.iter().map(|c| c.items.len()).sum();
        debug!(
            entities = claimed.len(),
            rows = report.outbox_rows,
            elapsed = ?started.elapsed(),
            "pass: rows claimed"
        );
        let all_ids: Vec<i64> = claimed.iter().flat_map(ClaimedEntity::ids).collect();
        if let Some(reason) = self.blocked().await? {
            // Not the rows' fault: they wait, and are never dead-lettered for it.
            self.defer(&all_ids, &reason, now + self.cfg.retry.cap)
                .await?;
            report.transient_stop = true;
            return Ok(report);
        }
        let scoped = if untried {
            None
        } else {
            self.scoped_desired(&claimed).await?
        };
        debug!(elapsed = ?started.elapsed(), "pass: desired state of what the rows touch");
        let claimed_entities: BTreeSet<(String, String)> = claimed
            .iter()
            .map(|c| (c.entity_type.clone(), c.entity_id.clone()))
            .collect();
        let mut cache = self.cache.lock().await;
        let (exec, conflicts) = match scoped {
            Some((d, scope)) => {
                let Some(cached) = cache.as_mut() else {
                    drop(cache);
                    self.defer(&all_ids, REREAD, now).await?;
                    report.transient_stop = true;
                    return Ok(report);
                };
                let mut part = cached.extract(&d, &scope);
                debug!(
                    users = part.actual.users.len(),
                    groups = part.actual.groups.len(),
                    elapsed = ?started.elapsed(),
                    "scoped pass: part of the cache taken"
                );
                if !self
                    .refresh_offboarded(&d, &mut part.actual, Some(&scope))
                    .await?
                {
                    // A user turned out different: read everything first.
                    *cache = None;
                    drop(cache);
                    self.defer(&all_ids, REREAD, now).await?;
                    report.transient_stop = true;
                    return Ok(report);
                }
                let mut p = plan_in(&d, &part.actual, &self.plan_options(), Some(&scope));
                self.settle_orphans(&mut p).await?;
                report.planned = p.actions.len();
                let conflicts = self
                    .conflicts(&relevant_conflicts(&p, &claimed_entities), false)
                    .await?;
                let managed = part.managed_users;
                let exec = self
                    .execute(&p, &mut part.actual, managed, false, "outbox", &mut report)
                    .await?;
                if exec.changed {
                    *cache = None;
                } else {
                    self.record_mappings(&part.actual, Some(&touched(&claimed_entities, &exec)))
                        .await?;
                    if let Some(cached) = cache.as_mut() {
                        cached.write_back(part);
                        debug!(elapsed = ?started.elapsed(), "scoped pass: part written back");
                    }
                }
                drop(cache);
                (exec, conflicts)
            }
            None => {
                drop(cache);
                report.whole_passes = 1;
                let d = self.desired().await?;
                let mut cache = self.cache.lock().await;
                let fresh = match cache.as_mut().map(Cached::whole) {
                    Some(actual) => {
                        self.notice_unknown_database(&d, actual);
                        self.refresh_offboarded(&d, actual, None).await?
                    }
                    None => false,
                };
                if !fresh {
                    // The cache was dropped meanwhile, or a user turned out different: read
                    // first.
                    *cache = None;
                    drop(cache);
                    self.defer(&all_ids, REREAD, now).await?;
                    report.transient_stop = true;
                    return Ok(report);
                }
                let Some(actual) = cache.as_mut().map(Cached::whole) else {
                    return Ok(report);
                };
                let mut p = plan(&d, actual, &self.plan_options());
                self.settle_orphans(&mut p).await?;
                report.planned = p.actions.len();
                let conflicts = self
                    .conflicts(&relevant_conflicts(&p, &claimed_entities), false)
                    .await?;
                let managed = actual.managed_users();
                let exec = self
                    .execute(&p, actual, managed, true, "outbox", &mut report)
                    .await?;
                if exec.changed {
                    *cache = None;
                } else if let Some(actual) = cache.as_mut().map(Cached::whole) {
                    // Links of the objects this pass wrote to successfully (created ones are
                    // linked with their audit event already).
                    self.record_mappings(actual, Some(&touched(&claimed_entities, &exec)))
                        .await?;
                }
                (exec, conflicts)
            }
        };
        self.after_writes(exec.attempted).await?;
        self.note_stop(exec.stop.as_ref()).await;
        let mut exec = exec;
        for (e, reason) in conflicts {
            exec.failed.entry(e).or_insert(reason);
        }
        self.settle(&claimed, &exec, now).await?;
        if exec.stop.is_some() || !exec.stale.is_empty() {
            report.transient_stop = true;
        }
        self.pass_size.store(
            next_pass_size(
                batch,
                claimed.len(),
                Some(started.elapsed()),
                self.cfg.pass_target,
                self.cfg.batch,
                self.cfg.max_batch,
            ),
            Ordering::Relaxed,
        );
        self.record_report(LAST_PASS_KEY, &report, started.elapsed())
            .await?;
        Ok(report)
    }

    /// The desired state of what the claimed rows touch, and the scope a pass plans, reading
    /// only that part of the directory ([`store::Directory::directory_of`]); `None` when the pass
    /// must plan the whole directory. Persists new pins and audits new alerts.
    ///
    /// - A user row: that user (all its groups, as context: its memberships and roles).
    /// - A group row that only changed members (`members`): the users added and removed; the
    ///   group is context (unless TeamCity has no group for it yet: then it is planned whole).
    /// - Any other group row (created, attributes or members replaced, deleted): the group
    ///   whole, every member in the directory and in TeamCity (a rename swap carries them
    ///   all; a role change or a delete costs each of them access; a capped member is kept
    ///   out or given direct roles), and the users a replace removed.
    ///
    /// The whole directory is planned instead when a group is deleted and the policy has caps
    /// (a capped user kept out of the group holds direct roles from it, and nothing short of
    /// the whole directory says who), when a `displayName` rule not pinned yet could match a
    /// group read (is the name unique?), when the defaults group does not exist in TeamCity
    /// yet (it is created with every active user), and for rows of an unknown entity type or
    /// without their member lists.
    async fn scoped_desired(
        &self,
        claimed: &[ClaimedEntity],
    ) -> Result<Option<(Desired, Scope)>, EngineError> {
        let mut users: BTreeSet<String> = BTreeSet::new();
        // Members of groups planned whole: context members where they can be.
        let mut members: BTreeSet<String> = BTreeSet::new();
        let mut whole: BTreeSet<String> = BTreeSet::new();
        let mut members_only: BTreeSet<String> = BTreeSet::new();
        let mut group_deleted = false;
        for c in claimed {
            match c.entity_type.as_str() {
                "user" => {
                    users.insert(c.entity_id.clone());
                }
                "group" => {
                    let mut only_members = true;
                    for item in &c.items {
                        let lists = member_lists(&item.detail);
                        match (item.operation.as_str(), lists) {
                            ("members", Some(ids)) => users.extend(ids),
                            ("upsert", Some(ids)) => {
                                members.extend(ids);
                                only_members = false;
                            }
                            ("delete", _) => {
                                group_deleted = true;
                                only_members = false;
                            }
                            _ => {
                                debug!(op = %item.operation, "an outbox row without its member lists: a whole pass");
                                return Ok(None);
                            }
                        }
                    }
                    if only_members {
                        members_only.insert(c.entity_id.clone());
                    } else {
                        whole.insert(c.entity_id.clone());
                    }
                }
                _ => return Ok(None),
            }
        }
        if group_deleted && !self.policy.caps.is_empty() {
            return Ok(None);
        }
        {
            let mut cache = self.cache.lock().await;
            let Some(cached) = cache.as_mut() else {
                return Ok(None);
            };
            if !self.policy.defaults.roles.is_empty()
                && cached.group(crate::model::DEFAULTS_GROUP_KEY).is_none()
            {
                return Ok(None);
            }
            // A group TeamCity does not hold yet is created whole, with every member.
            let held = cached.markers_held(&members_only);
            whole.extend(members_only.difference(&held).cloned());
            // Every member TeamCity has of a group planned whole is planned too (it may be
            // leaving the group, or lose access with it).
            members.extend(cached.member_scim_ids(&whole));
            // Without caps, a member TeamCity holds (once, not deactivated) is planned as a
            // context member: only its membership of the groups planned whole, so neither its
            // other groups nor their members are read. Others are planned whole.
            members = cached.split_members(&mut users, members, !self.policy.caps.is_empty());
        }
        let context: Vec<String> = members.iter().cloned().collect();
        let ids: Vec<String> = users.iter().cloned().collect();
        let groups: Vec<String> = whole.iter().cloned().collect();
        let started = std::time::Instant::now();
        let snap = self
            .store()
            .directory_of(&ids, &groups, Some(&context))
            .await?;
        debug!(
            users = snap.users.len(),
            groups = snap.groups.len(),
            elapsed = ?started.elapsed(),
            "pass: directory read"
        );
        let dir = Directory {
            users: snap.users,
            groups: snap.groups.into_iter().map(dir_group).collect(),
        };
        let stored = self.store().pins().await?;
        let mut pins = stored.clone();
        self.pin_first_matches(&dir, &mut pins).await?;
        if crate::desired::unpinned_match(&dir, &self.policy, &pins) {
            return Ok(None);
        }
        let scope = crate::scope::scope_for(users, whole, &dir, &members);
        let d = desired(
            &dir,
            &self.policy,
            &pins,
            &DesiredOptions {
                partial: Some(scope.groups.clone()),
                ..DesiredOptions::default()
            },
        );
        self.record_desired(&d, &stored).await?;
        Ok(Some((d, scope)))
    }

    /// Pins (in `pins`, persisted with the pass's desired state) the `displayName` rules not
    /// pinned yet whose name a group of the partial directory `dir` has, when that group is the
    /// only one in the whole directory with the name — an indexed lookup
    /// (`displayName eq`, at most two rows) instead of planning the whole directory to find out.
    /// A rule whose name more than one group has stays unpinned (the whole pass that follows
    /// raises the ambiguity alert).
    async fn pin_first_matches(
        &self,
        dir: &Directory,
        pins: &mut crate::policy::Pins,
    ) -> Result<(), EngineError> {
        for rule in &self.policy.groups {
            let crate::policy::Match::DisplayName(name) = &rule.matcher else {
                continue;
            };
            let key = rule.pin_key().unwrap_or_default();
            if pins.contains_key(&key) {
                continue;
            }
            let Some(group) = dir.groups.iter().find(|g| g.display_name == *name) else {
                continue;
            };
            let query = store::ListQuery {
                filter: Some(scim::filter::Filter::Compare {
                    path: scim::AttrPath::simple("displayName"),
                    op: scim::filter::CompareOp::Eq,
                    value: Value::String(name.clone()),
                }),
                count: 2,
                ..store::ListQuery::default()
            };
            // `eq` on displayName ignores case: keep the exact matches, as the rule does.
            let page = self.store().list(scim::ResourceKind::Group, &query).await?;
            let exact: Vec<&str> = page
                .resources
                .iter()
                .filter(|r| r.attrs.get("displayName").and_then(Value::as_str) == Some(name))
                .map(|r| r.id.as_str())
                .collect();
            if page.total <= 2 && exact == [group.id.as_str()] {
                pins.insert(key, group.id.clone());
            }
        }
        Ok(())
    }

    /// Readiness after a run that stopped early: TeamCity unavailable, or the bridge
    /// misconfigured (then the cache is dropped, so the next pass verifies TeamCity first).
    async fn note_stop(&self, stop: Option<&Stop>) {
        match stop {
            Some(Stop::Transient(r)) => {
                self.health
                    .set(Some(format!("TeamCity is unavailable: {r}")));
            }
            Some(Stop::Misconfigured(r)) => {
                *self.refused() = Some(r.clone());
                self.health.set(Some(r.clone()));
                *self.cache.lock().await = None;
            }
            None => {}
        }
    }

    /// Releases rows without counting an attempt, due again at `until` (see
    /// [`store::Outbox::defer_outbox`]).
    async fn defer(
        &self,
        ids: &[i64],
        reason: &str,
        until: time::OffsetDateTime,
    ) -> Result<(), EngineError> {
        if !ids.is_empty() {
            self.store()
                .defer_outbox(&self.ctx("sync"), ids, reason, until)
                .await?;
        }
        Ok(())
    }

    /// Settles the claimed rows after a pass (see the module docs).
    async fn settle(
        &self,
        claimed: &[ClaimedEntity],
        exec: &Exec,
        now: time::OffsetDateTime,
    ) -> Result<(), EngineError> {
        let ctx = self.ctx("sync");
        let all_ids: Vec<i64> = claimed.iter().flat_map(ClaimedEntity::ids).collect();
        match &exec.stop {
            Some(Stop::Transient(reason)) => {
                self.store()
                    .fail_outbox(&ctx, &all_ids, reason, true, now, &self.cfg.retry)
                    .await?;
                return Ok(());
            }
            Some(Stop::Misconfigured(reason)) => {
                self.defer(&all_ids, reason, now + self.cfg.retry.cap)
                    .await?;
                return Ok(());
            }
            None => {}
        }
        let mut ok = vec![];
        let mut held: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for c in claimed {
            let key = (c.entity_type.clone(), c.entity_id.clone());
            if let Some(reason) = exec.failed.get(&key) {
                self.store()
                    .fail_outbox(&ctx, &c.ids(), reason, false, now, &self.cfg.retry)
                    .await?;
            } else if let Some(reason) = exec.stale.get(&key) {
                self.defer(&c.ids(), reason, now).await?;
            } else if let Some(batch) = exec.held.get(&key) {
                held.entry(*batch).or_default().extend(c.ids());
            } else {
                ok.extend(c.ids());
            }
        }
        for (batch, ids) in held {
            self.store().hold_outbox(&ctx, &ids, batch).await?;
        }
        if !ok.is_empty() {
            self.store().complete_outbox(&ctx, &ok, vec![]).await?;
        }
        Ok(())
    }

    /// The blast-radius guard over a plan: which steps wait, and in which held batch.
    ///
    /// - steps of approved batches go;
    /// - steps already in a held batch keep waiting there (a re-sent push holds nothing twice);
    /// - steps on objects the directory does not know (and no SCIM DELETE asked about) are
    ///   never applied automatically, whatever their number: they go to a batch of their own;
    /// - the other steps that take access away are counted by distinct user; above the limits
    ///   ([`crate::guard::check`]) they are held as one batch;
    /// - every step that depends on a waiting step waits too (the deactivated marker behind
    ///   held strip steps, say), and nothing else does: a new hire goes on.
    ///
    /// Returns, per waiting step, its batch.
    async fn guard(
        &self,
        p: &Plan,
        actual: &ActualState,
        managed_users: usize,
        source: &str,
    ) -> Result<BTreeMap<usize, i64>, EngineError> {
        let mut waiting: BTreeMap<usize, i64> = BTreeMap::new();
        let losses = crate::guard::losses(&p.actions, actual);
        if losses.iter().all(BTreeSet::is_empty) && p.orphans.is_empty() {
            return Ok(waiting);
        }
        let mut approved: HashMap<String, i64> = HashMap::new();
        for b in self.store().list_held(Some(HeldState::Approved)).await? {
            match read_batch(&b) {
                Ok(steps) => approved.extend(steps.into_iter().map(|s| (s, b.id))),
                Err(reason) => self.unreadable(&b, &reason).await?,
            }
        }
        let mut held: HashMap<String, i64> = HashMap::new();
        for b in self.store().list_held(Some(HeldState::Held)).await? {
            if let Ok(steps) = read_batch(&b) {
                held.extend(steps.into_iter().map(|s| (s, b.id)));
            }
        }
        let mut orphans: Vec<usize> = Vec::new();
        let mut fresh: Vec<usize> = Vec::new();
        for (i, a) in p.actions.iter().enumerate() {
            let is_orphan = p.orphans.contains_key(&i);
            if losses[i].is_empty() && !is_orphan {
                continue;
            }
            let fp = fingerprint(a);
            if approved.contains_key(&fp) {
                continue;
            }
            if let Some(b) = held.get(&fp) {
                waiting.insert(i, *b);
            } else if is_orphan {
                orphans.push(i);
            } else {
                fresh.push(i);
            }
        }
        if !orphans.is_empty() {
            let objects: BTreeSet<&crate::plan::Orphan> =
                orphans.iter().filter_map(|i| p.orphans.get(i)).collect();
            let users: BTreeSet<u64> = orphans.iter().flat_map(|i| losses[*i].clone()).collect();
            let reason = format!(
                "{} managed TeamCity object(s) the directory does not know (no SCIM event asked to remove them: \
                 a wrong or empty database, or an old backup?)",
                objects.len()
            );
            let id = self.hold(p, &orphans, users.len(), &reason, source).await?;
            waiting.extend(orphans.iter().map(|i| (*i, id)));
        }
        if !fresh.is_empty() {
            let users: BTreeSet<u64> = fresh.iter().flat_map(|i| losses[*i].clone()).collect();
            if let Err(h) = crate::guard::check(
                users.len(),
                managed_users,
                self.cfg.limits.max_removals,
                self.cfg.limits.max_removals_percent,
            ) {
                let id = self.hold(p, &fresh, h.count, &h.reason, source).await?;
                waiting.extend(fresh.iter().map(|i| (*i, id)));
            }
        }
        // Dependents wait with what they depend on (prerequisites come first in the plan).
        for i in 0..p.actions.len() {
            if waiting.contains_key(&i) {
                continue;
            }
            if let Some(b) = p.deps[i].iter().find_map(|d| waiting.get(d).copied()) {
                waiting.insert(i, b);
            }
        }
        Ok(waiting)
    }

    /// Reports a held batch whose stored plan cannot be read (once): it is never applied as
    /// empty; `held` shows it and `held drop` removes it.
    async fn unreadable(&self, b: &HeldBatch, reason: &str) -> Result<(), EngineError> {
        let key = format!("held_unreadable:{}", b.id);
        if self.store().sync_state_get(&key).await?.is_some() {
            return Ok(());
        }
        warn!(
            batch = b.id,
            %reason,
            "an approved held batch cannot be read and is not applied; drop it with `teamcity-scim held drop {}` \
             (the next reconcile plans what is still needed)",
            b.id
        );
        self.store()
            .audit(
                &self.ctx("sync"),
                entry(
                    "HeldBatch",
                    Some(b.id.to_string()),
                    "sync.held_unreadable",
                    false,
                    None,
                    json!({"batch": b.id, "reason": reason}),
                ),
            )
            .await?;
        self.store().sync_state_set(&key, "reported").await?;
        Ok(())
    }

    /// Records a held batch of `steps` of `p`, naming the users it affects.
    async fn hold(
        &self,
        p: &Plan,
        steps: &[usize],
        users: usize,
        reason: &str,
        source: &str,
    ) -> Result<i64, EngineError> {
        let actions: Vec<&Action> = steps.iter().map(|i| &p.actions[*i]).collect();
        let plan_json = serde_json::to_value(&actions).unwrap_or(Value::Null);
        let owned: Vec<Action> = actions.into_iter().cloned().collect();
        let summary = format!(
            "{reason} ({} steps held: {})",
            owned.len(),
            kinds_summary(&owned)
        );
        let actor = if source == "reconcile" {
            "reconciler"
        } else {
            "sync"
        };
        let id = self
            .store
            .create_held(
                &self.ctx(actor),
                source,
                &[],
                &summary,
                users as i64,
                &plan_json,
            )
            .await?;
        metrics::counter!("teamcity_scim_guard_holds_total").increment(1);
        warn!(
            batch = id,
            users,
            reason = %reason,
            "blast-radius guard held a batch; review it with `teamcity-scim held`, apply it with `teamcity-scim approve {id}`"
        );
        Ok(id)
    }

    /// Guards, then applies a plan's steps (see [`Engine::apply_steps`]), recording each
    /// effect in `actual` and each outcome in the audit trail; marks approved batches applied
    /// once none of their steps is left to do — only after a whole plan (`whole`): a scoped
    /// plan does not hold the steps of objects out of its scope. `managed_users`: all of
    /// them, for the guard's percentage (`actual` may be a part of TeamCity).
    async fn execute(
        &self,
        p: &Plan,
        actual: &mut ActualState,
        managed_users: usize,
        whole: bool,
        source: &str,
        report: &mut PassReport,
    ) -> Result<Exec, EngineError> {
        let mut exec = Exec::default();
        let actor = if source == "reconcile" {
            "reconciler"
        } else {
            "sync"
        };
        if self.cfg.mode == Mode::Shadow {
            if !p.actions.is_empty() {
                let kinds: BTreeMap<&str, usize> =
                    p.actions.iter().fold(BTreeMap::new(), |mut m, a| {
                        *m.entry(kind(a)).or_default() += 1;
                        m
                    });
                info!(
                    source,
                    actions = p.actions.len(),
                    ?kinds,
                    "shadow mode: plan computed, nothing written to TeamCity"
                );
                self.store()
                    .audit(
                        &self.ctx(actor),
                        entry(
                            "TeamCity",
                            None,
                            "sync.shadow_plan",
                            true,
                            None,
                            json!({"source": source, "actions": kinds}),
                        ),
                    )
                    .await?;
            }
            return Ok(exec);
        }
        let waiting = self.guard(p, actual, managed_users, source).await?;
        let entities: Vec<Vec<(String, String)>> =
            p.actions.iter().map(|a| entities_of(a, actual)).collect();
        let mut run = self
            .apply_steps(&p.actions, &p.deps, &waiting, actual, actor)
            .await?;
        // A 403 on every step tried, across several objects, with nothing accepted: the
        // bridge's account lacks permissions. That is not the objects' fault: nothing is
        // dead-lettered, the rows wait and readiness says what to fix.
        if run.stop.is_none() && !run.forbidden.is_empty() {
            let failed: Vec<usize> = run
                .outcomes
                .iter()
                .enumerate()
                .filter(|(_, o)| matches!(o, Outcome::Failed(_)))
                .map(|(i, _)| i)
                .collect();
            let applied = run.outcomes.contains(&Outcome::Applied);
            let objects: BTreeSet<&String> = run.forbidden.values().collect();
            if !applied
                && failed.iter().all(|i| run.forbidden.contains_key(i))
                && objects.len() >= FORBIDDEN_EVERYWHERE
            {
                run.stop = Some(Stop::Misconfigured(format!(
                    "TeamCity refused every change with 403 ({} objects): the bridge's TeamCity account \
                     lacks the permissions it needs (see docs/teamcity-compat.md)",
                    objects.len()
                )));
            }
        }
        if run.outcomes.contains(&Outcome::Applied) && self.refused().take().is_some() {
            self.health.set(None);
        }
        exec.changed = run.changed;
        exec.attempted = run.attempted;
        exec.stop = run.stop.clone();
        for (i, outcome) in run.outcomes.iter().enumerate() {
            match outcome {
                Outcome::Applied => report.applied += 1,
                Outcome::Failed(reason) | Outcome::Cancelled(reason) => {
                    if matches!(outcome, Outcome::Failed(_)) {
                        report.failed += 1;
                    } else {
                        report.cancelled += 1;
                    }
                    let text = match outcome {
                        Outcome::Failed(_) => format!("{} failed: {reason}", label(&p.actions[i])),
                        _ => format!("{}: {reason}", label(&p.actions[i])),
                    };
                    for e in &entities[i] {
                        exec.failed
                            .entry(e.clone())
                            .and_modify(|r| {
                                if !r.contains(&text) && r.len() < 2000 {
                                    r.push_str("; ");
                                    r.push_str(&text);
                                }
                            })
                            .or_insert_with(|| text.clone());
                    }
                }
                Outcome::Stale(reason) => {
                    for e in &entities[i] {
                        exec.stale
                            .entry(e.clone())
                            .or_insert_with(|| reason.clone());
                    }
                }
                Outcome::Waiting => {
                    report.held += 1;
                    if let Some(b) = waiting.get(&i) {
                        for e in &entities[i] {
                            exec.held.entry(e.clone()).or_insert(*b);
                        }
                    }
                }
                Outcome::NotStarted => {}
            }
        }
        if run.stop.is_none() && whole {
            self.finish_approved(p, &run.outcomes).await?;
        }
        Ok(exec)
    }

    /// Marks approved batches applied once none of their steps is left: each one was applied
    /// now, or the plan no longer wants it. A batch with a step that failed stays approved
    /// (retried with the next pass or reconcile).
    async fn finish_approved(&self, p: &Plan, outcomes: &[Outcome]) -> Result<(), EngineError> {
        let approved = self.store().list_held(Some(HeldState::Approved)).await?;
        if approved.is_empty() {
            return Ok(());
        }
        let left: HashSet<String> = p
            .actions
            .iter()
            .zip(outcomes)
            .filter(|(_, o)| **o != Outcome::Applied)
            .map(|(a, _)| fingerprint(a))
            .collect();
        for b in &approved {
            self.approved_tried
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(b.id);
            let steps = match read_batch(b) {
                Ok(steps) => steps,
                Err(reason) => {
                    // Never applied as empty: reported, and left for `held drop`.
                    self.unreadable(b, &reason).await?;
                    continue;
                }
            };
            if steps.iter().any(|s| left.contains(s)) {
                continue;
            }
            self.store()
                .mark_held_applied(&self.ctx("sync"), b.id)
                .await?;
            info!(batch = b.id, steps = steps.len(), "approved batch applied");
        }
        Ok(())
    }

    /// Applies `actions` (a phase-sorted plan) wave by wave: the steps of a wave are
    /// independent of each other (see [`crate::waves`]), so they run concurrently — lanes in
    /// flight bounded by the client's concurrency — while waves run one after the other.
    ///
    /// A step runs only after every step in `deps[i]` was applied: a prerequisite that failed
    /// cancels it ("not attempted: …", audited), one that waits (held) makes it wait, one that
    /// met a changed TeamCity makes it wait for the re-read. A step on an object that turned
    /// out different from the cache earlier in the run (a 404, an unexpected conflict) is not
    /// attempted either. Steps in `waiting` are held and not attempted.
    ///
    /// A transient failure stops the run (no further step starts; those in flight finish), and
    /// so does a failure that says the bridge is misconfigured. A permanent failure fails its
    /// step and cancels its dependents, nothing else. Each success is recorded in `actual` at
    /// the end of its wave, in plan order.
    async fn apply_steps(
        &self,
        actions: &[Action],
        deps: &[Vec<usize>],
        waiting: &BTreeMap<usize, i64>,
        actual: &mut ActualState,
        actor: &str,
    ) -> Result<Run, EngineError> {
        let outcomes = std::sync::Mutex::new(vec![Outcome::NotStarted; actions.len()]);
        let mut run = Run {
            outcomes: Vec::new(),
            stop: None,
            changed: false,
            attempted: false,
            forbidden: BTreeMap::new(),
        };
        let forbidden: std::sync::Mutex<BTreeMap<usize, String>> =
            std::sync::Mutex::new(BTreeMap::new());
        let stop_flag = AtomicBool::new(false);
        let stop: std::sync::Mutex<Option<Stop>> = std::sync::Mutex::new(None);
        let changed: std::sync::Mutex<HashSet<String>> = std::sync::Mutex::new(HashSet::new());
        let attempted = AtomicBool::new(false);
        let offboarding: std::sync::Mutex<HashMap<u64, Offboarding>> =
            std::sync::Mutex::new(HashMap::new());
        let group_names: HashMap<String, String> = actual
            .groups
            .iter()
            .map(|g| (g.key.clone(), g.name.clone()))
            .collect();
        let mut created: BTreeMap<String, u64> = BTreeMap::new();
        let total = actions.len() - waiting.len();
        let progress = self.progress.clone().unwrap_or_else(log_progress);
        let finished_steps = std::sync::atomic::AtomicUsize::new(0);
        let tick = || {
            let done = finished_steps.fetch_add(1, Ordering::Relaxed) + 1;
            progress(done, total);
        };
        let tick = &tick;
        // Lanes await their audit write between calls (up to the journal's gathering window
        // and a commit): keep more lanes in flight than the client has permits, so no permit
        // idles meanwhile. The client's semaphore bounds the calls in flight. Eight per permit:
        // a PostgreSQL commit (a WAL flush) takes longer than a 5 ms call, and with three per
        // permit an initial load ran at 1.62–1.69 × its ideal there (1.24–1.33 × with eight;
        // SQLite 1.12–1.14 × either way; docs/BENCHMARKS.md).
        let width = self.client.max_concurrency().saturating_mul(8).max(1);
        let ctx = self.ctx(actor);
        let journal = crate::journal::Journal::start(self.store(), ctx.clone());
        let journal = &journal;
        let mut store_error: Option<EngineError> = None;
        for wave in crate::waves::waves(actions) {
            if stop_flag.load(Ordering::Relaxed) {
                break;
            }
            let wave_started = std::time::Instant::now();
            let lanes_in_wave = wave.len();
            let mut finished: Vec<(usize, Option<(String, u64)>)> = Vec::new();
            {
                let names = usernames(actual);
                let names = &names;
                let shared = &created;
                let (stop_flag, stop, changed, attempted, outcomes, offboarding, group_names) = (
                    &stop_flag,
                    &stop,
                    &changed,
                    &attempted,
                    &outcomes,
                    &offboarding,
                    &group_names,
                );
                let forbidden = &forbidden;
                let mut lanes = futures::stream::iter(wave)
                    .map(|lane| async move {
                        let mut done = Vec::with_capacity(lane.len());
                        for i in lane {
                            if stop_flag.load(Ordering::Relaxed) {
                                break;
                            }
                            let a = &actions[i];
                            if waiting.contains_key(&i) {
                                set(outcomes, i, Outcome::Waiting);
                                continue;
                            }
                            // Prerequisites.
                            let blocked = {
                                let o = outcomes.lock().unwrap_or_else(|e| e.into_inner());
                                deps[i].iter().find_map(|&d| match &o[d] {
                                    Outcome::Applied => None,
                                    Outcome::Failed(r) => Some(Outcome::Cancelled(format!(
                                        "not attempted: {} failed: {r}",
                                        label(&actions[d])
                                    ))),
                                    Outcome::Cancelled(r) => Some(Outcome::Cancelled(r.clone())),
                                    Outcome::Stale(r) => Some(Outcome::Stale(r.clone())),
                                    Outcome::Waiting => Some(Outcome::Waiting),
                                    Outcome::NotStarted => Some(Outcome::NotStarted),
                                })
                            };
                            let blocked = blocked.or_else(|| {
                                let seen = changed.lock().unwrap_or_else(|e| e.into_inner());
                                objects(a)
                                    .into_iter()
                                    .find(|o| {
                                        seen.contains(&o.to_string())
                                            || matches!(o, Obj::User(id) if !names.contains_key(id))
                                    })
                                    .map(|o| {
                                        Outcome::Stale(format!(
                                            "TeamCity {o} is not what the bridge expected; it is read again first"
                                        ))
                                    })
                            });
                            if let Some(outcome) = blocked {
                                if let Outcome::Cancelled(reason) | Outcome::Stale(reason) =
                                    &outcome
                                {
                                    let (target, mut detail) = describe(a);
                                    detail["error"] = json!(reason);
                                    let audit =
                                        entry("TeamCity", Some(target), kind(a), false, None, detail);
                                    if let Err(e) = journal.write(audit, None, journal.busy()).await
                                    {
                                        set(outcomes, i, outcome);
                                        stop_flag.store(true, Ordering::Relaxed);
                                        return (done, Some(EngineError::from(e)));
                                    }
                                }
                                set(outcomes, i, outcome);
                                tick();
                                continue;
                            }
                            let in_call = journal.busy();
                            attempted.store(true, Ordering::Relaxed);
                            let result = apply_step(&self.client, a, shared, names).await;
                            let (target, mut detail) = describe(a);
                            let (outcome, audit) = match &result {
                                Ok(applied) => {
                                    metrics::counter!("sync_actions_total", "kind" => kind(a), "outcome" => "applied").increment(1);
                                    if applied.missing {
                                        let mut seen =
                                            changed.lock().unwrap_or_else(|e| e.into_inner());
                                        seen.extend(objects(a).iter().map(ToString::to_string));
                                    }
                                    self.note_offboarding(
                                        a,
                                        applied,
                                        offboarding,
                                        group_names,
                                        &mut detail,
                                    );
                                    (
                                        Outcome::Applied,
                                        entry("TeamCity", Some(target), kind(a), true, None, detail),
                                    )
                                }
                                Err(e) => {
                                    metrics::counter!("sync_actions_total", "kind" => kind(a), "outcome" => "failed").increment(1);
                                    detail["error"] = json!(format!("{:?}", e.kind()));
                                    let status = e.status().map(i64::from);
                                    let outcome = if e.is_transient() {
                                        stop_flag.store(true, Ordering::Relaxed);
                                        let mut s = stop.lock().unwrap_or_else(|e| e.into_inner());
                                        s.get_or_insert(Stop::Transient(format!(
                                            "{} failed: {e}",
                                            label(a)
                                        )));
                                        Outcome::NotStarted
                                    } else if e.is_misconfiguration() {
                                        stop_flag.store(true, Ordering::Relaxed);
                                        let mut s = stop.lock().unwrap_or_else(|e| e.into_inner());
                                        s.get_or_insert(Stop::Misconfigured(format!(
                                            "the bridge cannot use TeamCity ({e}); check [teamcity] url, token and ca_file"
                                        )));
                                        Outcome::NotStarted
                                    } else if e.is_not_found() || e.is_conflict() {
                                        let mut seen =
                                            changed.lock().unwrap_or_else(|e| e.into_inner());
                                        seen.extend(objects(a).iter().map(ToString::to_string));
                                        Outcome::Stale(format!(
                                            "{} met a TeamCity that changed under the bridge ({e}); it is read again first",
                                            label(a)
                                        ))
                                    } else {
                                        if e.status() == Some(403) {
                                            forbidden
                                                .lock()
                                                .unwrap_or_else(|e| e.into_inner())
                                                .insert(i, describe(a).0);
                                        }
                                        Outcome::Failed(e.to_string())
                                    };
                                    (
                                        outcome,
                                        entry("TeamCity", Some(target), kind(a), false, status, detail),
                                    )
                                }
                            };
                            let link = match &result {
                                Ok(applied) => {
                                    let mut local = BTreeMap::new();
                                    if let Some((s, id)) = &applied.created {
                                        local.insert(s.clone(), *id);
                                    }
                                    created_link(a, &local).or_else(|| created_link(a, shared))
                                }
                                Err(_) => None,
                            };
                            let audited = journal.write(audit, link, in_call).await;
                            let made = result.ok().and_then(|applied| applied.created);
                            let applied = outcome == Outcome::Applied;
                            set(outcomes, i, outcome);
                            tick();
                            if applied {
                                done.push((i, made));
                            }
                            if let Err(e) = audited {
                                stop_flag.store(true, Ordering::Relaxed);
                                return (done, Some(EngineError::from(e)));
                            }
                        }
                        (done, None)
                    })
                    .buffer_unordered(width);
                while let Some((done, err)) = lanes.next().await {
                    finished.extend(done);
                    if let (Some(e), None) = (err, &store_error) {
                        store_error = Some(e);
                    }
                }
            }
            debug!(lanes = lanes_in_wave, actions = finished.len(), elapsed = ?wave_started.elapsed(), "wave applied");
            finished.sort_by_key(|(i, _)| *i);
            for (_, made) in &finished {
                created.extend(made.clone());
            }
            actual.record_all(finished.iter().map(|(i, _)| &actions[*i]), &created);
        }
        run.outcomes = outcomes.into_inner().unwrap_or_else(|e| e.into_inner());
        run.stop = stop.into_inner().unwrap_or_else(|e| e.into_inner());
        run.changed = !changed
            .into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty();
        run.attempted = attempted.load(Ordering::Relaxed);
        run.forbidden = forbidden.into_inner().unwrap_or_else(|e| e.into_inner());
        match store_error {
            Some(e) => Err(e),
            None => Ok(run),
        }
    }

    /// Keeps what an offboarding removed, and puts it in the `set_deactivated` event: group
    /// names, roles, token names (never values), and whether sessions could be ended.
    fn note_offboarding(
        &self,
        a: &Action,
        applied: &Applied,
        offboarding: &std::sync::Mutex<HashMap<u64, Offboarding>>,
        group_names: &HashMap<String, String>,
        detail: &mut Value,
    ) {
        let mut all = offboarding.lock().unwrap_or_else(|e| e.into_inner());
        match a {
            Action::RemoveFromGroup { user, group } => {
                let name = group_names
                    .get(group)
                    .cloned()
                    .unwrap_or_else(|| group.clone());
                if !store::audit::looks_like_email(&name) {
                    detail["name"] = json!(name);
                }
                all.entry(*user).or_default().groups.push(name);
            }
            Action::RemoveUserRole { user, role } => {
                all.entry(*user).or_default().roles.push(role.to_string());
            }
            Action::RevokeTokens { user } => {
                detail["tokens"] = json!(applied.tokens);
                all.entry(*user)
                    .or_default()
                    .tokens
                    .extend(applied.tokens.iter().cloned());
            }
            Action::ClearRememberMe { user } => {
                let note = if applied.remember_me_unsupported {
                    if !self.remember_me_noted.swap(true, Ordering::Relaxed) {
                        warn!(
                            "this TeamCity cannot clear remember-me data (no DELETE /users/{{u}}/debug/rememberMe); the password reset is what signs deactivated users out there"
                        );
                    }
                    "this TeamCity cannot clear remember-me data"
                } else {
                    "cleared"
                };
                detail["remember_me"] = json!(note);
                all.entry(*user).or_default().remember_me = Some(note);
            }
            Action::EndSessions { user } => {
                let note = if applied.sessions_unsupported {
                    if !self.sessions_noted.swap(true, Ordering::Relaxed) {
                        warn!(
                            "this TeamCity cannot end sessions (no POST /users/{{u}}/logout; TeamCity 2024.07 or later has it): deactivated users' sessions run until they expire"
                        );
                    }
                    "this TeamCity cannot end sessions"
                } else {
                    "ended"
                };
                detail["sessions"] = json!(note);
                all.entry(*user).or_default().sessions = Some(note);
            }
            Action::SetDeactivated { user } => {
                let o = all.remove(user).unwrap_or_default();
                detail["removed"] = json!({
                    "groups": o.groups,
                    "roles": o.roles,
                    "tokens": o.tokens,
                });
                if let Some(s) = o.sessions {
                    detail["sessions"] = json!(s);
                }
                if let Some(r) = o.remember_me {
                    detail["remember_me"] = json!(r);
                }
            }
            _ => {}
        }
    }

    /// Keeps the SCIM ↔ TeamCity mapping equal to the managed objects of `actual` (the cache
    /// after a pass): user SCIM id → TeamCity id and username, group SCIM id → key and name.
    /// Writes only the links that changed. With `only`, just the links of those SCIM ids
    /// (what a pass wrote to successfully): links come only from state confirmed in the
    /// same pass — a full read, or a write TeamCity accepted through a pinned locator.
    async fn record_mappings(
        &self,
        actual: &ActualState,
        only: Option<&BTreeSet<String>>,
    ) -> Result<(), EngineError> {
        if only.is_some_and(BTreeSet::is_empty) {
            return Ok(());
        }
        if self.cfg.mode == Mode::Shadow {
            return Ok(());
        }
        let users: BTreeMap<String, (String, String)> = actual
            .users
            .iter()
            .filter_map(|u| {
                let scim = u.scim_id.clone()?;
                Some((scim, (u.id.to_string(), u.username.clone())))
            })
            .filter(|(s, _)| only.is_none_or(|o| o.contains(s)))
            .collect();
        let mut groups: BTreeMap<String, (u32, String, String)> = BTreeMap::new();
        for g in &actual.groups {
            let Some(m) = g
                .marker
                .as_deref()
                .filter(|m| *m != DEFAULTS_MARKER && only.is_none_or(|o| o.contains(*m)))
            else {
                continue;
            };
            // Mid-swap, two keys share a marker: the newest generation is the group.
            let generation = crate::desired::key_generation(m, &g.key).unwrap_or(0);
            if groups.get(m).is_none_or(|(gen_, _, _)| generation >= *gen_) {
                groups.insert(m.to_owned(), (generation, g.key.clone(), g.name.clone()));
            }
        }
        let groups: BTreeMap<String, (String, String)> = groups
            .into_iter()
            .map(|(m, (_, k, n))| (m, (k, n)))
            .collect();
        let ctx = self.ctx("sync");
        for (kind, want) in [
            (scim::ResourceKind::User, users),
            (scim::ResourceKind::Group, groups),
        ] {
            // A pass reads the links of the entities it touched (one indexed query), not every
            // link of the directory.
            let have = match only {
                Some(ids) => {
                    let ids: Vec<String> = ids.iter().cloned().collect();
                    self.store().mappings_of(kind, &ids).await?
                }
                None => self.store().mappings(kind).await?,
            };
            let known: std::collections::HashMap<&str, (&str, &str)> = have
                .iter()
                .map(|m| {
                    (
                        m.scim_id.as_str(),
                        (m.teamcity_id.as_str(), m.teamcity_name.as_str()),
                    )
                })
                .collect();
            for m in &have {
                if only.is_none_or(|o| o.contains(&m.scim_id)) && !want.contains_key(&m.scim_id) {
                    self.store().delete_mapping(&ctx, kind, &m.scim_id).await?;
                }
            }
            // New and changed links in one transaction (an initial load links thousands).
            let changed: Vec<(String, String, String)> = want
                .iter()
                .filter(|(scim_id, (id, name))| {
                    known.get(scim_id.as_str()) != Some(&(id.as_str(), name.as_str()))
                })
                .map(|(scim_id, (id, name))| (scim_id.clone(), id.clone(), name.clone()))
                .collect();
            if !changed.is_empty() {
                self.store().upsert_mappings(&ctx, kind, &changed).await?;
            }
        }
        Ok(())
    }

    /// Runs passes until no outbox row is due (tests and the demo use it).
    pub async fn drain(&self) -> Result<PassReport, EngineError> {
        let mut total = PassReport::default();
        for _ in 0..10_000 {
            let r = self.run_once().await?;
            total.add(&r);
            if r.outbox_rows == 0 || r.transient_stop {
                break;
            }
        }
        Ok(total)
    }

    /// Keeps (renews at a third of its time) or takes the [`SYNC_LEASE`]; the fence to apply
    /// under, or `None` while another replica holds it.
    async fn hold_sync_lease(
        &self,
        held: &mut Option<(store::Lease, tokio::time::Instant)>,
    ) -> Option<store::Fence> {
        let ttl = self.cfg.lease;
        if let Some((lease, renewed)) = held.as_mut()
            && renewed.elapsed() >= ttl / 3
        {
            match self.store.renew_lease(&lease.fence, ttl).await {
                Ok(l) => *held = Some((l, tokio::time::Instant::now())),
                Err(e @ StoreError::Fenced(_)) => {
                    warn!(error = %e, "this replica lost the sync lease; standing by");
                    *held = None;
                }
                // The database is away: keep trying; the lease runs out if it stays away.
                Err(e) => warn!(error = %e, "could not renew the sync lease; trying again"),
            }
        }
        if held.is_none() {
            match self
                .store
                .acquire_lease(SYNC_LEASE, &self.worker_id, ttl)
                .await
            {
                Ok(Some(l)) => {
                    info!(
                        holder = %l.fence.holder,
                        epoch = l.fence.epoch,
                        "this replica now applies changes to TeamCity (sync lease taken)"
                    );
                    // Another replica may have written to TeamCity meanwhile: read it again.
                    *self.cache.lock().await = None;
                    *held = Some((l, tokio::time::Instant::now()));
                }
                Ok(None) => {}
                Err(e) => warn!(error = %e, "could not take the sync lease; trying again"),
            }
        }
        held.as_ref().map(|(l, _)| l.fence.clone())
    }

    /// Wakes the worker at once (a new outbox row was committed somewhere).
    pub fn waker(&self) -> Arc<tokio::sync::Notify> {
        self.wake.clone()
    }

    /// The worker and the periodic reconcile, until `shutdown` flips to true.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        // Exported from the start (0), so alerts and dashboards see them before the first hold.
        metrics::counter!("teamcity_scim_guard_holds_total").increment(0);
        let mut next_reconcile = tokio::time::Instant::now();
        let mut next_probe = tokio::time::Instant::now();
        let ttl = self.cfg.lease;
        let mut held: Option<(store::Lease, tokio::time::Instant)> = None;
        loop {
            if *shutdown.borrow() {
                break;
            }
            // Readiness follows TeamCity even when no work arrives: while not ready, look again
            // every few seconds, so it turns green as soon as what blocked the sync is fixed;
            // while ready, check now and then that TeamCity still answers and takes the token.
            if tokio::time::Instant::now() >= next_probe {
                let paused = self.health.not_ready().is_some();
                let answer = self.client.server_info().await;
                let up = !matches!(&answer, Err(e) if e.is_transient() || e.is_misconfiguration());
                metrics::gauge!("teamcity_scim_teamcity_up").set(if up { 1.0 } else { 0.0 });
                match answer {
                    Err(e) if e.is_transient() || e.is_misconfiguration() => {
                        self.health.set(Some(if e.is_misconfiguration() {
                            format!("the bridge cannot use TeamCity ({e}); check [teamcity] url, token and ca_file")
                        } else {
                            format!("TeamCity is unreachable ({e})")
                        }));
                    }
                    _ if paused => {
                        if let Err(e) = self.blocked().await {
                            warn!(error = %e, "readiness probe failed");
                        }
                    }
                    _ => {}
                }
                next_probe = tokio::time::Instant::now()
                    + if self.health.not_ready().is_some() {
                        PROBE_INTERVAL
                    } else {
                        READY_PROBE_INTERVAL
                    };
            }
            // One replica applies: the holder of the sync lease. The others serve SCIM and
            // stand by, trying again now and then, so one takes over once the holder's lease
            // runs out (it died, or cannot reach the database).
            let Some(fence) = self.hold_sync_lease(&mut held).await else {
                tokio::select! {
                    _ = tokio::time::sleep(STANDBY_RETRY.min(ttl / 3)) => {}
                    _ = shutdown.changed() => {}
                }
                continue;
            };
            if tokio::time::Instant::now() >= next_reconcile {
                match self.reconcile_leased(Some(&fence)).await {
                    Ok(Some(r)) => info!(
                        reads = r.reads,
                        planned = r.planned,
                        applied = r.applied,
                        held = r.held,
                        "reconcile done"
                    ),
                    Ok(None) => info!("reconcile skipped: another process is reconciling now"),
                    Err(e) => warn!(error = %e, "reconcile failed; will try again"),
                }
                next_reconcile = tokio::time::Instant::now() + self.cfg.reconcile_interval;
            }
            let pass = self.under_leases(std::slice::from_ref(&fence), ttl, self.run_once());
            let idle = match pass.await {
                Ok(r) => r.outbox_rows == 0 || r.transient_stop,
                Err(e) => {
                    warn!(error = %e, "sync pass failed; will try again");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.poll) => {}
                    _ = self.wake.notified() => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        if let Some((lease, _)) = held
            && let Err(e) = self.store.release_lease(&lease.fence).await
        {
            warn!(error = %e, "could not release the sync lease; it runs out by itself");
        }
        info!("sync worker stopped");
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::next_pass_size;

    #[test]
    fn a_backlog_sizes_passes_to_the_target_time_and_a_short_pass_shrinks_them() {
        let target = Duration::from_millis(500);
        let ms = |n| Some(Duration::from_millis(n));
        // (size asked, entities claimed, time taken) → next size, with min 256 and max 1,024.
        let table: &[(usize, usize, Option<Duration>, usize, &str)] = &[
            (256, 256, ms(250), 512, "full, half the target: twice"),
            (
                256,
                256,
                ms(320),
                400,
                "full, under the target: sized to it",
            ),
            (256, 256, ms(50), 512, "very quick: at most twice"),
            (512, 512, ms(200), 1024, "never above the most"),
            (1024, 1024, ms(1000), 512, "full and slow: sized down"),
            (1024, 1024, ms(500), 1024, "on target: kept"),
            (256, 256, ms(3000), 256, "never below the least"),
            (
                1024,
                700,
                ms(300),
                256,
                "the backlog is gone: back to the least",
            ),
            (1024, 0, None, 256, "idle: back to the least"),
            (512, 512, None, 512, "claimed in full, not run yet: kept"),
            (512, 512, ms(0), 1024, "no time at all: twice"),
        ];
        for &(size, claimed, took, want, why) in table {
            assert_eq!(
                next_pass_size(size, claimed, took, target, 256, 1024),
                want,
                "{why}: {size} asked, {claimed} claimed, {took:?}"
            );
        }
        // A configuration whose most is below its least takes the least.
        assert_eq!(next_pass_size(4, 4, ms(1), target, 4, 1), 4);
    }
}
