//! The runtime of the sync engine: the outbox worker and the reconciler, over the store and
//! the TeamCity client.
//!
//! The worker plans against a *cached* TeamCity state: read in full at start and at every
//! reconcile, then kept equal to TeamCity by recording the effect of every action TeamCity
//! accepted. A SCIM change therefore costs exactly the TeamCity writes it needs — no reads —
//! and a re-sent, unchanged push costs nothing. The reconciler re-reads TeamCity (pages,
//! `fields=` limited) to find drift made by hand and repairs it.
//!
//! Each pass: claim due outbox rows (lease, coalesced per entity) → directory snapshot →
//! desired → plan against the cache → blast-radius guard (removals above the limits are held
//! for `approve`; the rest applies) → apply action by action, auditing each → complete the
//! rows, or retry them with backoff (transient failure), or dead-letter them (permanent).
//! In shadow mode the plan is computed, logged and audited, and nothing is written.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::{Value, json};
use store::{AuditEntry, ClaimedEntity, DynStore, RetryPolicy, StoreError, WriteCtx};
use teamcity::{Client, TeamCityError};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::apply::{apply, kind};
use crate::model::{Action, ActualState, DEFAULTS_MARKER, DirGroup, Directory, UserRef};
use crate::plan::{Deprovision, Plan, PlanOptions, plan};
use crate::policy::Policy;
use crate::{Desired, DesiredOptions, GuardLimits, ReadOptions, desired, read_actual_with};

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
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            mode: Mode::Apply,
            deprovision: Deprovision::Strip,
            limits: GuardLimits {
                max_removals: Some(10),
                max_removals_percent: Some(20),
            },
            retry: RetryPolicy::default(),
            reconcile_interval: Duration::from_secs(600),
            poll: Duration::from_millis(200),
            lease: Duration::from_secs(60),
            page_size: 500,
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

/// What one pass or reconcile did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    /// Outbox rows handled (completed, failed or held).
    pub outbox_rows: usize,
    /// Actions planned.
    pub planned: usize,
    /// Actions TeamCity accepted.
    pub applied: usize,
    /// Actions that failed permanently.
    pub failed: usize,
    /// Actions held by the blast-radius guard.
    pub held: usize,
    /// Stopped at a transient failure (TeamCity down): the rows will be retried.
    pub transient_stop: bool,
    /// TeamCity reads made (reconcile only).
    pub reads: usize,
}

/// The sync engine.
#[derive(Debug)]
pub struct Engine {
    store: DynStore,
    client: Client,
    policy: Policy,
    cfg: EngineConfig,
    worker_id: String,
    cache: Mutex<Option<ActualState>>,
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

/// Actions that take a membership or a role away (what the guard may hold). The delete of a
/// group replaced in the same plan (a rename swap) is not one.
fn is_removal(a: &Action, actions: &[Action], actual: &ActualState) -> bool {
    match a {
        Action::RemoveFromGroup { .. }
        | Action::RemoveUserRole { .. }
        | Action::RemoveGroupRole { .. }
        | Action::DeleteUser { .. } => true,
        Action::DeleteGroup { key } => {
            let marker = actual
                .groups
                .iter()
                .find(|g| &g.key == key)
                .and_then(|g| g.marker.clone());
            !actions.iter().any(|b| matches!(b, Action::CreateGroup { marker: m, .. } if Some(m) == marker.as_ref()))
        }
        _ => false,
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
        Action::CreateUser { scim_id, .. } => {
            (format!("user:new:{scim_id}"), json!({"scim_id": scim_id}))
        }
        Action::UpdateUser { user: u, changes } => (
            format!("user:{u}"),
            json!({"fields": changes.iter().map(|c| c.field.to_string()).collect::<Vec<_>>()}),
        ),
        Action::DeleteUser { user: u }
        | Action::RevokeTokens { user: u }
        | Action::ResetPassword { user: u }
        | Action::SetDeactivated { user: u }
        | Action::ClearDeactivated { user: u } => (format!("user:{u}"), json!({})),
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

/// The SCIM entity an action concerns, for dead-lettering the rows of a failed entity.
fn entity_of(a: &Action, actual: &ActualState) -> Option<(&'static str, String)> {
    let by_user = |id: u64| {
        actual
            .users
            .iter()
            .find(|u| u.id == id)
            .and_then(|u| u.scim_id.clone())
    };
    let by_group = |key: &str| {
        actual
            .groups
            .iter()
            .find(|g| g.key == key)
            .and_then(|g| g.marker.clone())
    };
    match a {
        Action::CreateUser { scim_id, .. } => Some(("user", scim_id.clone())),
        Action::AddToGroup {
            user: UserRef::New(s),
            ..
        }
        | Action::AddUserRole {
            user: UserRef::New(s),
            ..
        } => Some(("user", s.clone())),
        Action::AddToGroup {
            user: UserRef::Id(i),
            ..
        }
        | Action::AddUserRole {
            user: UserRef::Id(i),
            ..
        } => by_user(*i).map(|s| ("user", s)),
        Action::UpdateUser { user, .. }
        | Action::DeleteUser { user }
        | Action::RemoveFromGroup { user, .. }
        | Action::RemoveUserRole { user, .. }
        | Action::RevokeTokens { user }
        | Action::ResetPassword { user }
        | Action::SetDeactivated { user }
        | Action::ClearDeactivated { user } => by_user(*user).map(|s| ("user", s)),
        Action::CreateGroup { marker, .. } => Some(("group", marker.clone())),
        Action::DeleteGroup { key }
        | Action::AddGroupRole { group: key, .. }
        | Action::RemoveGroupRole { group: key, .. } => by_group(key).map(|s| ("group", s)),
    }
}

/// One action applied within a wave.
struct Done {
    index: usize,
    /// SCIM id → TeamCity id of the user it created (or resolved), if any: only a
    /// `CreateUser`'s own user (the references it was given are known already).
    created: Option<(String, u64)>,
    result: Result<(), TeamCityError>,
}

/// What [`Engine::apply_in_waves`] did.
#[derive(Debug, Default)]
struct WaveRun {
    /// Actions TeamCity accepted.
    applied: usize,
    /// Actions that failed permanently (index, error), in plan order.
    permanent: Vec<(usize, TeamCityError)>,
    /// The first transient failure: the run stopped there.
    transient: Option<(usize, TeamCityError)>,
    /// Actions not started because the run stopped.
    not_started: usize,
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

/// The SCIM ids of the users created earlier in the plan that `a` refers to.
fn user_refs(a: &Action) -> Vec<&str> {
    fn new(r: &UserRef) -> Option<&str> {
        match r {
            UserRef::New(s) => Some(s.as_str()),
            UserRef::Id(_) => None,
        }
    }
    match a {
        Action::CreateUser { scim_id, .. } => vec![scim_id.as_str()],
        Action::AddToGroup { user, .. } | Action::AddUserRole { user, .. } => {
            new(user).into_iter().collect()
        }
        Action::CreateGroup { members, .. } => members.iter().filter_map(new).collect(),
        _ => Vec::new(),
    }
}

impl Engine {
    /// An engine over a store and a TeamCity client.
    pub fn new(store: DynStore, client: Client, policy: Policy, cfg: EngineConfig) -> Self {
        let worker_id = format!("worker-{}", std::process::id());
        Engine {
            store,
            client,
            policy,
            cfg,
            worker_id,
            cache: Mutex::new(None),
        }
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.cfg
    }

    fn ctx(&self, actor: &str) -> WriteCtx {
        WriteCtx {
            actor: actor.to_owned(),
            request_id: None,
        }
    }

    /// The directory as the sync engine sees it.
    pub async fn directory(&self) -> Result<Directory, EngineError> {
        let snap = self.store.directory().await?;
        Ok(Directory {
            users: snap.users,
            groups: snap.groups.into_iter().map(dir_group).collect(),
        })
    }

    /// Desired state; persists new pins and audits new alerts.
    pub async fn desired(&self) -> Result<Desired, EngineError> {
        let started = std::time::Instant::now();
        let dir = self.directory().await?;
        debug!(users = dir.users.len(), groups = dir.groups.len(), elapsed = ?started.elapsed(), "directory read");
        let pins = self.store.pins().await?;
        let d = desired(&dir, &self.policy, &pins, &DesiredOptions::default());
        for (rule, group) in &d.pins {
            if pins.get(rule) != Some(group) {
                self.store.set_pin(&self.ctx("sync"), rule, group).await?;
            }
        }
        for alert in &d.alerts {
            let key = format!("alert:{alert:?}");
            if self.store.sync_state_get(&key).await?.is_none() {
                alert.emit();
                self.store
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
                self.store.sync_state_set(&key, "raised").await?;
            }
        }
        Ok(d)
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

    /// The plan of a full reconcile, without applying it (the `plan` command).
    pub async fn plan_full(&self) -> Result<(Plan, ActualState, usize), EngineError> {
        let (actual, reads) = self.read_actual().await?;
        let d = self.desired().await?;
        let p = plan(
            &d,
            &actual,
            &PlanOptions {
                deprovision: self.cfg.deprovision,
            },
        );
        Ok((p, actual, reads))
    }

    /// A full reconcile: re-read TeamCity, plan, guard, apply (unless `dry_run` or shadow).
    pub async fn reconcile(&self, dry_run: bool) -> Result<PassReport, EngineError> {
        let started = std::time::Instant::now();
        // TeamCity and the directory are read at the same time: one waits on the network,
        // the other is local work.
        let mut cache = self.cache.lock().await;
        let (read, d) = tokio::join!(self.read_actual(), self.desired());
        let ((actual, reads), d) = (read?, d?);
        debug!(reads, elapsed = ?started.elapsed(), "reconcile: TeamCity read, desired state computed");
        *cache = Some(actual);
        let mut report = PassReport {
            reads,
            ..PassReport::default()
        };
        let actual = cache.as_mut().expect("just set");
        let p = plan(
            &d,
            actual,
            &PlanOptions {
                deprovision: self.cfg.deprovision,
            },
        );
        debug!(actions = p.actions.len(), elapsed = ?started.elapsed(), "reconcile: planned");
        for c in &p.conflicts {
            warn!(conflict = ?c, "reconcile: conflict left alone");
        }
        for r in &p.reports {
            info!(report = ?r, "reconcile: unmanaged object reported");
        }
        report.planned = p.actions.len();
        if dry_run {
            return Ok(report);
        }
        self.execute(p.actions, actual, "reconcile", &mut report)
            .await?;
        debug!(elapsed = ?started.elapsed(), "reconcile: applied");
        self.record_mappings(actual).await?;
        debug!(elapsed = ?started.elapsed(), "reconcile: mappings recorded");
        self.store
            .sync_state_set(
                "last_reconcile",
                &store::timefmt::format(time::OffsetDateTime::now_utc()),
            )
            .await?;
        metrics::counter!("sync_reconciles_total").increment(1);
        Ok(report)
    }

    async fn ensure_cache(&self) -> Result<(), EngineError> {
        let mut cache = self.cache.lock().await;
        if cache.is_none() {
            let (actual, _) = self.read_actual().await?;
            *cache = Some(actual);
        }
        Ok(())
    }

    /// One worker pass over due outbox rows. Returns what it did; `outbox_rows == 0` means idle.
    pub async fn run_once(&self) -> Result<PassReport, EngineError> {
        let mut report = PassReport::default();
        self.apply_approved(&mut report).await?;
        let now = time::OffsetDateTime::now_utc();
        let claimed = self
            .store
            .claim_outbox(&self.worker_id, now, self.cfg.lease, 1000)
            .await?;
        if claimed.is_empty() {
            return Ok(report);
        }
        report.outbox_rows = claimed.iter().map(|c| c.items.len()).sum();
        if let Err(e) = self.ensure_cache().await {
            // TeamCity is unreachable: nothing is lost, the rows wait with backoff.
            let ids: Vec<i64> = claimed.iter().flat_map(ClaimedEntity::ids).collect();
            let transient = matches!(&e, EngineError::TeamCity(t) if t.is_transient());
            self.store
                .fail_outbox(
                    &self.ctx("sync"),
                    &ids,
                    &e.to_string(),
                    transient,
                    now,
                    &self.cfg.retry,
                )
                .await?;
            report.transient_stop = true;
            return Ok(report);
        }
        let d = self.desired().await?;
        let mut cache = self.cache.lock().await;
        let actual = cache.as_mut().expect("cache loaded");
        let p = plan(
            &d,
            actual,
            &PlanOptions {
                deprovision: self.cfg.deprovision,
            },
        );
        report.planned = p.actions.len();
        let failed = self
            .execute(p.actions, actual, "outbox", &mut report)
            .await?;
        self.record_mappings(actual).await?;
        // Settle the rows.
        let all_ids: Vec<i64> = claimed.iter().flat_map(ClaimedEntity::ids).collect();
        if report.transient_stop {
            let reason = failed
                .values()
                .next()
                .cloned()
                .unwrap_or_else(|| "TeamCity unavailable".into());
            self.store
                .fail_outbox(
                    &self.ctx("sync"),
                    &all_ids,
                    &reason,
                    true,
                    now,
                    &self.cfg.retry,
                )
                .await?;
            return Ok(report);
        }
        let mut ok = vec![];
        for c in &claimed {
            match failed.get(&(c.entity_type.clone(), c.entity_id.clone())) {
                Some(reason) => {
                    self.store
                        .fail_outbox(
                            &self.ctx("sync"),
                            &c.ids(),
                            reason,
                            false,
                            now,
                            &self.cfg.retry,
                        )
                        .await?;
                }
                None => ok.extend(c.ids()),
            }
        }
        if !ok.is_empty() {
            self.store
                .complete_outbox(&self.ctx("sync"), &ok, vec![])
                .await?;
        }
        Ok(report)
    }

    /// Guards, then applies `actions` against TeamCity in waves of independent actions (see
    /// [`Engine::apply_in_waves`]), recording each effect in `actual` and each outcome in the
    /// audit trail. Returns the permanent failures by entity.
    async fn execute(
        &self,
        actions: Vec<Action>,
        actual: &mut ActualState,
        source: &str,
        report: &mut PassReport,
    ) -> Result<BTreeMap<(String, String), String>, EngineError> {
        let mut failed = BTreeMap::new();
        if actions.is_empty() {
            return Ok(failed);
        }
        let actor = if source == "reconcile" {
            "reconciler"
        } else {
            "sync"
        };
        if self.cfg.mode == Mode::Shadow {
            let kinds: BTreeMap<&str, usize> = actions.iter().fold(BTreeMap::new(), |mut m, a| {
                *m.entry(kind(a)).or_default() += 1;
                m
            });
            info!(
                source,
                actions = actions.len(),
                ?kinds,
                "shadow mode: plan computed, nothing written to TeamCity"
            );
            self.store
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
            report.held = 0;
            return Ok(failed);
        }
        let (to_apply, to_hold) = match self.cfg.limits.check_plan(&actions, actual) {
            Ok(()) => (actions, vec![]),
            Err(held) => {
                let (hold, go): (Vec<Action>, Vec<Action>) = actions
                    .iter()
                    .cloned()
                    .partition(|a| is_removal(a, &actions, actual));
                self.hold(&hold, &held, source).await?;
                (go, hold)
            }
        };
        report.held += to_hold.len();
        let run = self.apply_in_waves(&to_apply, actual, actor).await?;
        report.applied += run.applied;
        if let Some((i, e)) = &run.transient {
            let a = &to_apply[*i];
            let (target, _) = describe(a);
            warn!(action = kind(a), %target, not_started = run.not_started, "TeamCity is unavailable; will retry");
            report.transient_stop = true;
            failed.insert(
                ("*".into(), "*".into()),
                format!("{} on {target} failed: {:?}", kind(a), e.kind()),
            );
            return Ok(failed);
        }
        for (i, e) in &run.permanent {
            let a = &to_apply[*i];
            let (target, _) = describe(a);
            warn!(action = kind(a), %target, error = ?e.kind(), "action failed permanently");
            report.failed += 1;
            if let Some((t, id)) = entity_of(a, actual) {
                failed
                    .entry((t.to_owned(), id))
                    .or_insert_with(|| format!("{} on {target} failed: {:?}", kind(a), e.kind()));
            }
        }
        Ok(failed)
    }

    /// Keeps the SCIM ↔ TeamCity mapping equal to the managed objects of `actual` (the cache
    /// after a pass): user SCIM id → TeamCity id and username, group SCIM id → key and name.
    /// Writes only the links that changed.
    async fn record_mappings(&self, actual: &ActualState) -> Result<(), EngineError> {
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
            .collect();
        let mut groups: BTreeMap<String, (u32, String, String)> = BTreeMap::new();
        for g in &actual.groups {
            let Some(m) = g.marker.as_deref().filter(|m| *m != DEFAULTS_MARKER) else {
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
            let have = self.store.mappings(kind).await?;
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
                if !want.contains_key(&m.scim_id) {
                    self.store.delete_mapping(&ctx, kind, &m.scim_id).await?;
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
                self.store.upsert_mappings(&ctx, kind, &changed).await?;
            }
        }
        Ok(())
    }

    /// Applies `actions` (in plan order) wave by wave: the actions of a wave are independent of
    /// each other (see [`crate::waves`]), so they run concurrently — lanes in flight bounded by
    /// the client's concurrency — while waves run one after the other, keeping every order the
    /// plan relies on. Each outcome is audited as it happens; each success is recorded in
    /// `actual` at the end of its wave, in plan order (users created in a wave are known to the
    /// later waves that refer to them).
    ///
    /// A transient failure stops the run: no further action starts (those in flight finish and
    /// are recorded), and no later wave runs. A permanent failure only fails its action. A
    /// store failure stops the run too, after recording what TeamCity accepted.
    async fn apply_in_waves(
        &self,
        actions: &[Action],
        actual: &mut ActualState,
        actor: &str,
    ) -> Result<WaveRun, EngineError> {
        let mut run = WaveRun::default();
        let mut created: BTreeMap<String, u64> = BTreeMap::new();
        let stop = AtomicBool::new(false);
        // Lanes await their audit write between calls (up to the journal's gathering window and
        // a commit): keep more lanes in flight than the client has permits, so no permit idles
        // meanwhile. The client's semaphore bounds the calls in flight.
        let width = self.client.max_concurrency().saturating_mul(3).max(1);
        let ctx = self.ctx(actor);
        let journal = crate::journal::Journal::start(self.store.clone(), ctx.clone());
        let journal = &journal;
        let mut store_error: Option<EngineError> = None;
        for wave in crate::waves::waves(actions) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let wave_started = std::time::Instant::now();
            let lanes_in_wave = wave.len();
            let shared = &created;
            let stop = &stop;
            let mut lanes = futures::stream::iter(wave)
                .map(|lane| async move {
                    let mut done = Vec::with_capacity(lane.len());
                    for i in lane {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let a = &actions[i];
                        // The users this action refers to, from earlier waves.
                        let mut local: BTreeMap<String, u64> = BTreeMap::new();
                        for r in user_refs(a) {
                            if let Some(id) = shared.get(r) {
                                local.insert(r.to_owned(), *id);
                            }
                        }
                        let in_call = journal.busy();
                        let result = apply(&self.client, std::slice::from_ref(a), &mut local)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.error);
                        let (target, mut detail) = describe(a);
                        let audit = match &result {
                            Ok(()) => {
                                metrics::counter!("sync_actions_total", "kind" => kind(a), "outcome" => "applied").increment(1);
                                entry("TeamCity", Some(target), kind(a), true, None, detail)
                            }
                            Err(e) => {
                                metrics::counter!("sync_actions_total", "kind" => kind(a), "outcome" => "failed").increment(1);
                                detail["error"] = json!(format!("{:?}", e.kind()));
                                let status = e.status().map(i64::from);
                                entry("TeamCity", Some(target), kind(a), false, status, detail)
                            }
                        };
                        let transient = result.as_ref().is_err_and(TeamCityError::is_transient);
                        if transient {
                            stop.store(true, Ordering::Relaxed);
                        }
                        let link = result.as_ref().ok().and_then(|()| created_link(a, &local));
                        let audited = journal.write(audit, link, in_call).await;
                        let made = match a {
                            Action::CreateUser { scim_id, .. } => {
                                local.get(scim_id).map(|id| (scim_id.clone(), *id))
                            }
                            _ => None,
                        };
                        done.push(Done {
                            index: i,
                            created: made,
                            result,
                        });
                        if let Err(e) = audited {
                            stop.store(true, Ordering::Relaxed);
                            return (done, Some(EngineError::from(e)));
                        }
                        if transient {
                            break;
                        }
                    }
                    (done, None)
                })
                .buffer_unordered(width);
            let mut finished: Vec<Done> = Vec::new();
            while let Some((done, err)) = lanes.next().await {
                finished.extend(done);
                if let (Some(e), None) = (err, &store_error) {
                    store_error = Some(e);
                }
            }
            drop(lanes);
            debug!(lanes = lanes_in_wave, actions = finished.len(), elapsed = ?wave_started.elapsed(), "wave applied");
            finished.sort_by_key(|d| d.index);
            for d in &finished {
                if d.result.is_ok() {
                    created.extend(d.created.clone());
                }
            }
            actual.record_all(
                finished
                    .iter()
                    .filter(|d| d.result.is_ok())
                    .map(|d| &actions[d.index]),
                &created,
            );
            for d in finished {
                match d.result {
                    Ok(()) => run.applied += 1,
                    Err(e) if e.is_transient() => {
                        if run.transient.is_none() {
                            run.transient = Some((d.index, e));
                        }
                    }
                    Err(e) => run.permanent.push((d.index, e)),
                }
            }
        }
        run.not_started = actions.len()
            - run.applied
            - run.permanent.len()
            - usize::from(run.transient.is_some());
        match store_error {
            Some(e) => Err(e),
            None => Ok(run),
        }
    }

    async fn hold(
        &self,
        hold: &[Action],
        held: &crate::Held,
        source: &str,
    ) -> Result<(), EngineError> {
        let plan_json = serde_json::to_value(hold).unwrap_or(Value::Null);
        // The same removals stay held until approved: do not hold them twice.
        let existing = self.store.list_held(Some("held")).await?;
        if existing.iter().any(|b| b.plan == plan_json) {
            return Ok(());
        }
        // The rows that triggered the batch complete with the rest of it; the held removals
        // wait in the batch itself, so no row is parked.
        let summary = format!(
            "{} ({} actions held: {})",
            held.reason,
            hold.len(),
            kinds_summary(hold)
        );
        let id = self
            .store
            .create_held(
                &self.ctx(if source == "reconcile" {
                    "reconciler"
                } else {
                    "sync"
                }),
                source,
                &[],
                &summary,
                held.count as i64,
                &plan_json,
            )
            .await?;
        metrics::counter!("sync_held_batches_total").increment(1);
        warn!(
            batch = id,
            users = held.count,
            reason = %held.reason,
            "blast-radius guard held a batch; review it with `teamcity-scim held`, apply it with `teamcity-scim approve {id}`"
        );
        Ok(())
    }

    /// Applies approved held batches: the held actions that the current plan still wants.
    async fn apply_approved(&self, report: &mut PassReport) -> Result<(), EngineError> {
        let approved = self.store.list_held(Some("approved")).await?;
        if approved.is_empty() {
            return Ok(());
        }
        self.ensure_cache().await?;
        let d = self.desired().await?;
        let mut cache = self.cache.lock().await;
        let actual = cache.as_mut().expect("cache loaded");
        for batch in approved {
            let held: Vec<Action> = serde_json::from_value(batch.plan.clone()).unwrap_or_default();
            let current = plan(
                &d,
                actual,
                &PlanOptions {
                    deprovision: self.cfg.deprovision,
                },
            );
            let wanted: BTreeSet<String> = current
                .actions
                .iter()
                .map(|a| serde_json::to_string(a).unwrap_or_default())
                .collect();
            let still: Vec<Action> = held
                .into_iter()
                .filter(|a| wanted.contains(&serde_json::to_string(a).unwrap_or_default()))
                .collect();
            let run = self.apply_in_waves(&still, actual, "sync").await?;
            report.applied += run.applied;
            if let Some((_, e)) = run.transient {
                return Err(e.into());
            }
            for (i, e) in &run.permanent {
                let (target, _) = describe(&still[*i]);
                report.failed += 1;
                warn!(action = kind(&still[*i]), %target, error = ?e.kind(), "approved action failed");
            }
            self.store
                .mark_held_applied(&self.ctx("sync"), batch.id)
                .await?;
            info!(
                batch = batch.id,
                actions = still.len(),
                "approved batch applied"
            );
        }
        Ok(())
    }

    /// Runs passes until no outbox row is due (tests and the demo use it).
    pub async fn drain(&self) -> Result<PassReport, EngineError> {
        let mut total = PassReport::default();
        for _ in 0..10_000 {
            let r = self.run_once().await?;
            total.outbox_rows += r.outbox_rows;
            total.planned += r.planned;
            total.applied += r.applied;
            total.failed += r.failed;
            total.held += r.held;
            total.transient_stop |= r.transient_stop;
            if r.outbox_rows == 0 || r.transient_stop {
                break;
            }
        }
        Ok(total)
    }

    /// The worker and the periodic reconcile, until `shutdown` flips to true.
    pub async fn run(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut next_reconcile = tokio::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                break;
            }
            if tokio::time::Instant::now() >= next_reconcile {
                match self.reconcile(false).await {
                    Ok(r) => info!(
                        reads = r.reads,
                        planned = r.planned,
                        applied = r.applied,
                        held = r.held,
                        "reconcile done"
                    ),
                    Err(e) => warn!(error = %e, "reconcile failed; will try again"),
                }
                next_reconcile = tokio::time::Instant::now() + self.cfg.reconcile_interval;
            }
            let idle = match self.run_once().await {
                Ok(r) => r.outbox_rows == 0 || r.transient_stop,
                Err(e) => {
                    warn!(error = %e, "sync pass failed; will try again");
                    true
                }
            };
            if idle {
                tokio::select! {
                    _ = tokio::time::sleep(self.cfg.poll) => {}
                    _ = shutdown.changed() => {}
                }
            }
        }
        info!("sync worker stopped");
    }
}
