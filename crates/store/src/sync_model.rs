//! The types of the sync bookkeeping the store keeps for the outbox worker, the reconciler and
//! the operator CLI: claimed outbox work, retry policy and backoff, dead letters, the SCIM ↔
//! TeamCity mapping, blast-radius holds, policy pins and the directory snapshot.
//!
//! Backend-neutral: nothing here names a database type.

use std::time::Duration;

use scim::ResourceKind;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::{MemberRef, OutboxItem};

/// How transient failures are retried. The worker passes it to
/// [`Outbox::fail_outbox`](crate::Outbox::fail_outbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The delay after the first failure (before jitter).
    pub base: Duration,
    /// No delay is ever longer than this, so recovery after an outage is prompt.
    pub cap: Duration,
    /// After this many failed attempts an item is dead-lettered.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    /// 1 s base, 60 s cap, 1,500 attempts: about a day of TeamCity outage before an item is
    /// dead-lettered (nothing is lost before that, and retries stay a minute apart at most).
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            max_attempts: 1500,
        }
    }
}

/// The delay before retrying after the `attempt`-th failure (1-based; 0 is treated as 1).
///
/// Exponential with "equal jitter": the ceiling is `c = min(cap, base · 2^(attempt-1))` and the
/// delay is `c/2 + jitter · c/2` with `jitter ∈ [0, 1)` derived from `jitter_seed` (a pure hash, so
/// the same inputs give the same delay). Hence:
/// - never above `cap`, never below half the ceiling (jitter is bounded);
/// - non-decreasing in `attempt` for any seeds while `base · 2^attempt <= cap` (attempt `n` lies
///   in `[c/2, c)`, attempt `n+1` in `[c, 2c)`);
/// - once the ceiling is the cap, delays spread over `[cap/2, cap)` so retries after an outage
///   do not arrive in lockstep.
pub fn backoff(attempt: u32, base: Duration, cap: Duration, jitter_seed: u64) -> Duration {
    let shift = attempt.max(1) - 1;
    let base_ns = base.as_nanos();
    let cap_ns = cap.as_nanos();
    let ceiling = if shift >= 64 {
        cap_ns
    } else {
        base_ns.saturating_mul(1u128 << shift).min(cap_ns)
    };
    let half = ceiling / 2;
    // 32 bits of jitter keep the product inside u128 even for `Duration::MAX`.
    let jitter = (half * u128::from(splitmix64(jitter_seed) >> 32)) >> 32;
    let ns = (ceiling - half + jitter).min(cap_ns);
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// SplitMix64: a small, well-mixed pure hash for jitter.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The work for one entity, claimed under one lease by [`Outbox::claim_outbox`](crate::Outbox::claim_outbox).
///
/// Coalescing: the worker applies the entity's *current* desired state, so every pending,
/// unleased row of the entity is claimed together — including rows still waiting out a backoff
/// (the new attempt covers them too). Completing or failing the claim passes [`ids`](Self::ids).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedEntity {
    /// `user` or `group`.
    pub entity_type: String,
    /// The SCIM id of the entity.
    pub entity_id: String,
    /// The claimed rows, oldest first.
    pub items: Vec<OutboxItem>,
}

impl ClaimedEntity {
    /// The claimed row ids, oldest first.
    pub fn ids(&self) -> Vec<i64> {
        self.items.iter().map(|i| i.id).collect()
    }

    /// The distinct operations (`upsert`, `delete`, `members`) in first-seen order.
    pub fn operations(&self) -> Vec<&str> {
        let mut ops: Vec<&str> = Vec::new();
        for i in &self.items {
            if !ops.contains(&i.operation.as_str()) {
                ops.push(&i.operation);
            }
        }
        ops
    }

    /// The entity as a SCIM resource kind (`None` for an unknown entity type).
    pub fn kind(&self) -> Option<ResourceKind> {
        match self.entity_type.as_str() {
            "user" => Some(ResourceKind::User),
            "group" => Some(ResourceKind::Group),
            _ => None,
        }
    }

    /// The highest attempt count among the rows.
    pub fn attempts(&self) -> i64 {
        self.items.iter().map(|i| i.attempts).max().unwrap_or(0)
    }
}

/// An outbox row with its scheduling columns, for `outbox list` and the dashboard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// The row as the worker sees it (state: `pending`, `done`, `dead`, `held`, `dropped`).
    pub item: OutboxItem,
    /// When the SCIM change was written.
    pub created: OffsetDateTime,
    /// When it is due (next retry for a failed item).
    pub next_attempt_at: OffsetDateTime,
    /// Until when a worker holds it, if leased.
    pub lease_until: Option<OffsetDateTime>,
    /// The worker that claimed it last.
    pub leased_by: Option<String>,
    /// The last failure's message.
    pub last_error: Option<String>,
    /// Why it is dead (permanent failure or retries exhausted).
    pub dead_reason: Option<String>,
    /// The held batch it waits in.
    pub held_batch_id: Option<i64>,
    /// When it became `done`, `dead` or `dropped`.
    pub finished: Option<OffsetDateTime>,
}

/// What [`Outbox::fail_outbox`](crate::Outbox::fail_outbox) did to one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedItem {
    /// Row id.
    pub id: i64,
    /// Attempts after this failure.
    pub attempts: i64,
    /// `Some(when)` if it will be retried, `None` if it is now dead.
    pub next_attempt_at: Option<OffsetDateTime>,
    /// The dead-letter reason, if it is now dead.
    pub dead_reason: Option<String>,
}

/// A SCIM ↔ TeamCity link to store (see [`crate::Mappings::record_applied`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingLink {
    /// User or group.
    pub kind: ResourceKind,
    /// The SCIM id.
    pub scim_id: String,
    /// TeamCity user id or group key.
    pub teamcity_id: String,
    /// TeamCity username or group name.
    pub teamcity_name: String,
}

/// An audit event a sync component appends (TeamCity actions, alerts, outcomes).
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// e.g. `User`, `Group`, `TeamCityUser`, `HeldBatch`.
    pub resource_type: String,
    /// The resource's id.
    pub resource_id: Option<String>,
    /// e.g. `teamcity.user.create`, `policy.rename_alert`.
    pub operation: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// HTTP status or equivalent.
    pub status: Option<i64>,
    /// JSON detail; never tokens, passwords or email addresses.
    pub detail: Value,
}

impl AuditEntry {
    /// A successful event.
    pub fn success(
        resource_type: impl Into<String>,
        resource_id: impl Into<String>,
        operation: impl Into<String>,
        detail: Value,
    ) -> Self {
        AuditEntry {
            resource_type: resource_type.into(),
            resource_id: Some(resource_id.into()),
            operation: operation.into(),
            outcome: "success".into(),
            status: Some(200),
            detail,
        }
    }

    /// A failed event.
    pub fn failure(
        resource_type: impl Into<String>,
        resource_id: impl Into<String>,
        operation: impl Into<String>,
        detail: Value,
    ) -> Self {
        AuditEntry {
            outcome: "failure".into(),
            status: None,
            ..AuditEntry::success(resource_type, resource_id, operation, detail)
        }
    }
}

/// A SCIM resource ↔ TeamCity object link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// User or Group.
    pub kind: ResourceKind,
    /// The SCIM id.
    pub scim_id: String,
    /// The TeamCity user id (users) or group key (groups).
    pub teamcity_id: String,
    /// The TeamCity username (users) or group name (groups).
    pub teamcity_name: String,
    /// When the link last changed.
    pub updated: OffsetDateTime,
}

/// A batch the blast-radius guard held back.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldBatch {
    /// Batch id (`teamcity-scim approve ID`).
    pub id: i64,
    /// When it was held.
    pub created: OffsetDateTime,
    /// `outbox` or `reconcile`.
    pub source: String,
    /// The outbox rows it holds (empty for a reconcile).
    pub outbox_ids: Vec<i64>,
    /// What it would do, for people.
    pub summary: String,
    /// How many users would lose access.
    pub removals: i64,
    /// The held plan as the sync engine serialised it.
    pub plan: Value,
    /// `held`, `approved`, `applied` or `dropped`.
    pub state: crate::HeldState,
    /// When it was approved or dropped.
    pub decided_at: Option<OffsetDateTime>,
    /// Who approved or dropped it.
    pub decided_by: Option<String>,
}

/// A user in the directory snapshot: the attributes the sync engine reads (the rest of the
/// stored document is skipped while parsing, so a snapshot of a large directory stays cheap).
/// The sync engine takes it as it is (`sync::DirUser`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirUser {
    /// SCIM id.
    pub id: String,
    /// `userName` (empty if missing; any case, TeamCity stores it lower-cased).
    pub user_name: String,
    /// `displayName`, if not empty.
    pub display_name: Option<String>,
    /// `name.givenName`, if not empty.
    pub given_name: Option<String>,
    /// `name.familyName`, if not empty.
    pub family_name: Option<String>,
    /// The `value` of the primary email, else of the first one, if not empty.
    pub email: Option<String>,
    /// `active` (true when missing).
    pub active: bool,
    /// `userType`, if not empty (what `[[policy.caps]]` match).
    pub user_type: Option<String>,
    /// `externalId`, if not empty (the IdP's object id; pull mode finds users by it).
    pub external_id: Option<String>,
}

/// A group in the directory snapshot: the attributes the sync engine reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirGroup {
    /// SCIM id.
    pub id: String,
    /// `displayName` (empty if missing).
    pub display_name: String,
    /// `externalId`, if not empty.
    pub external_id: Option<String>,
    /// Direct members (users and nested groups), ordered by id.
    pub members: Vec<MemberRef>,
}

/// A non-empty string at `v`.
fn text(v: Option<&Value>) -> Option<String> {
    v.and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The fields of a stored user document the snapshot keeps. Each is read as a JSON value (and
/// interpreted afterwards) so an odd type in one document never fails the whole snapshot.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct UserDoc {
    user_name: Option<Value>,
    display_name: Option<Value>,
    name: Option<Value>,
    emails: Option<Value>,
    active: Option<Value>,
    user_type: Option<Value>,
    external_id: Option<Value>,
}

impl UserDoc {
    pub(crate) fn into_user(self, id: String) -> DirUser {
        let emails = self.emails.as_ref().and_then(Value::as_array);
        let email = emails.and_then(|list| {
            let chosen = list
                .iter()
                .find(|e| e.get("primary").and_then(Value::as_bool) == Some(true))
                .or_else(|| list.first())?;
            text(chosen.get("value"))
        });
        let name = self.name.as_ref();
        DirUser {
            id,
            user_name: text(self.user_name.as_ref()).unwrap_or_default(),
            display_name: text(self.display_name.as_ref()),
            given_name: text(name.and_then(|n| n.get("givenName"))),
            family_name: text(name.and_then(|n| n.get("familyName"))),
            email,
            active: self
                .active
                .as_ref()
                .and_then(Value::as_bool)
                .unwrap_or(true),
            user_type: text(self.user_type.as_ref()),
            external_id: text(self.external_id.as_ref()),
        }
    }
}

/// The fields of a stored group document the snapshot keeps.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub(crate) struct GroupDoc {
    display_name: Option<Value>,
    external_id: Option<Value>,
}

impl GroupDoc {
    pub(crate) fn into_group(self, id: String, members: Vec<MemberRef>) -> DirGroup {
        DirGroup {
            id,
            display_name: text(self.display_name.as_ref()).unwrap_or_default(),
            external_id: text(self.external_id.as_ref()),
            members,
        }
    }
}

/// Everything the directory says, read in one consistent snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DirectorySnapshot {
    /// Every user, in creation order.
    pub users: Vec<DirUser>,
    /// Every group, in creation order.
    pub groups: Vec<DirGroup>,
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Duration = Duration::from_secs(1);
    const CAP: Duration = Duration::from_secs(60);

    #[test]
    fn backoff_grows_monotonically_until_the_cap_for_any_seeds() {
        for seed_a in 0..200u64 {
            let seed_b = seed_a.wrapping_mul(7919) ^ 0xdead_beef;
            // base · 2^attempt <= cap holds for attempts 1..=5 (32 s <= 60 s).
            for attempt in 1..=5u32 {
                let now = backoff(attempt, B, CAP, seed_a);
                let next = backoff(attempt + 1, B, CAP, seed_b);
                assert!(now <= next, "attempt {attempt}: {now:?} > {next:?}");
            }
        }
    }

    #[test]
    fn backoff_never_exceeds_the_cap_and_jitter_is_bounded() {
        for seed in 0..500u64 {
            for attempt in 0..200u32 {
                let d = backoff(attempt, B, CAP, seed);
                assert!(d <= CAP, "{d:?}");
                let shift = attempt.max(1) - 1;
                let ceiling = if shift >= 6 {
                    CAP
                } else {
                    (B * (1 << shift)).min(CAP)
                };
                assert!(d >= ceiling / 2 && d <= ceiling, "{attempt}: {d:?}");
            }
        }
        // Extreme inputs saturate instead of overflowing.
        assert!(backoff(u32::MAX, Duration::MAX, CAP, 1) <= CAP);
        assert_eq!(backoff(3, B, Duration::ZERO, 1), Duration::ZERO);
    }

    #[test]
    fn backoff_is_pure_and_jitter_spreads() {
        assert_eq!(backoff(4, B, CAP, 42), backoff(4, B, CAP, 42));
        let at_cap: std::collections::BTreeSet<Duration> =
            (0..50).map(|s| backoff(30, B, CAP, s)).collect();
        assert!(at_cap.len() > 40, "jitter should spread delays at the cap");
        assert!(at_cap.iter().all(|d| *d >= CAP / 2));
    }

    #[test]
    fn default_schedule() {
        let p = RetryPolicy::default();
        assert_eq!((p.base, p.cap, p.max_attempts), (B, CAP, 1500));
        let d1 = backoff(1, p.base, p.cap, 9);
        assert!(d1 >= Duration::from_millis(500) && d1 < B);
    }

    #[test]
    fn snapshot_documents_keep_what_the_engine_reads() {
        let user = |doc: &str| {
            serde_json::from_str::<UserDoc>(doc)
                .expect(doc)
                .into_user("u".into())
        };
        // Everything present; the primary email wins over an earlier one; the rest is skipped.
        let u = user(
            r#"{"schemas":["x"],"userName":"Ann","displayName":"Ann A","name":{"givenName":"Ann",
            "familyName":"A","formatted":"x"},"emails":[{"value":"a@x"},{"value":"b@x",
            "primary":true}],"active":false,"userType":"Agent","externalId":"00u1","meta":{"version":"W/1"},
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User":{"department":"d"}}"#,
        );
        assert_eq!(
            u,
            DirUser {
                id: "u".into(),
                user_name: "Ann".into(),
                display_name: Some("Ann A".into()),
                given_name: Some("Ann".into()),
                family_name: Some("A".into()),
                email: Some("b@x".into()),
                active: false,
                user_type: Some("Agent".into()),
                external_id: Some("00u1".into()),
            }
        );
        // No primary: the first email. Missing `active`: active. Empty strings: absent.
        let u =
            user(r#"{"userName":"b","displayName":"","emails":[{"value":"1@x"},{"value":"2@x"}]}"#);
        assert_eq!(
            (u.email.as_deref(), u.active, u.display_name),
            (Some("1@x"), true, None)
        );
        // Odd types never fail the snapshot: they read as absent.
        let u = user(r#"{"userName":7,"active":"false","emails":{"value":"x"},"name":"n"}"#);
        assert_eq!(
            u,
            DirUser {
                id: "u".into(),
                active: true,
                ..DirUser::default()
            }
        );
        let g = serde_json::from_str::<GroupDoc>(
            r#"{"displayName":"Devs","externalId":"00g1","members":[{"value":"u"}]}"#,
        )
        .expect("group")
        .into_group("g".into(), Vec::new());
        assert_eq!(
            (g.display_name.as_str(), g.external_id.as_deref()),
            ("Devs", Some("00g1"))
        );
    }
}

/// Outbox rows by state (see [`crate::Outbox::outbox_summary`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OutboxSummary {
    /// State → number of rows (states without rows are absent).
    pub by_state: std::collections::BTreeMap<crate::OutboxState, i64>,
    /// When the oldest `pending` row was written.
    pub oldest_pending: Option<OffsetDateTime>,
}
