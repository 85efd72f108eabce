//! Persistence for teamcity-scim behind one backend-neutral [`Store`] trait.
//!
//! The store owns the SCIM resources (canonical JSON plus indexed columns), group membership as
//! rows, SCIM bearer tokens (hashes only), the hash-chained audit trail and the transactional
//! outbox. **Every mutating command writes its change, its audit event and its outbox row in one
//! database transaction**; nothing else audits or enqueues. Nothing above this trait knows which
//! database is in use; the implementations live in [`sqlite`] and [`postgres`], the logic they
//! share (everything that is not SQL) in `common`.
//!
//! This crate does no HTTP and never talks to TeamCity.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use scim::filter::Filter;
use scim::{AttrPath, ResourceKind};
use serde_json::Value;
use time::OffsetDateTime;

pub mod access;
pub mod audit;
mod clock;
mod common;
pub mod copy;
mod group_commit;
pub mod postgres;
pub use postgres::redact_url;
mod sql_filter;
pub mod sqlite;
pub mod sync_model;
pub mod timefmt;

pub use clock::{Clock, FixedClock, SystemClock};
pub use sync_model::{
    AuditEntry, ClaimedEntity, DirGroup, DirUser, DirectorySnapshot, FailedItem, HeldBatch,
    Mapping, MappingLink, OutboxEntry, OutboxSummary, RetryPolicy, backoff,
};

/// Errors a store command reports. Callers branch on these variants only.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The resource does not exist (404).
    #[error("not found")]
    NotFound,
    /// A uniqueness constraint was violated (409 `uniqueness`); the text names the attribute.
    #[error("{0}")]
    Conflict(String),
    /// The expected version did not match (412).
    #[error("version mismatch")]
    PreconditionFailed,
    /// The request named something that cannot be stored, e.g. a member that does not exist
    /// (400 `invalidValue`).
    #[error("{0}")]
    Invalid(String),
    /// A write made under a [`Fence`] whose lease is no longer held (another holder took it
    /// over, or it ran out): nothing was written. The text names the lease.
    #[error("{0}")]
    Fenced(String),
    /// The database cannot be reached (connection refused or lost, pool timed out): nothing was
    /// written; try again (503).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Anything else: corrupt row, bug. Logged, answered as 500.
    #[error(transparent)]
    Other(#[from] anyhow_like::Error),
}

/// A tiny boxed error so the crate needs no `anyhow` dependency.
pub mod anyhow_like {
    /// A boxed error with a message.
    pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // The server is away (refused, reset, closed; or a proxy / load balancer in front
            // of it accepts and drops the connection mid-handshake) or every connection is busy.
            sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed => StoreError::Unavailable(e.to_string()),
            // PostgreSQL shutting down or refusing connections: class 57P (operator
            // intervention), 08 (connection exception), 53300 (too many connections).
            sqlx::Error::Database(ref d)
                if d.code().is_some_and(|c| {
                    c.starts_with("57P") || c.starts_with("08") || c == "53300"
                }) =>
            {
                StoreError::Unavailable(e.to_string())
            }
            e => StoreError::Other(Box::new(e)),
        }
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Other(Box::new(e))
    }
}

/// Result alias for store commands.
pub type StoreResult<T> = Result<T, StoreError>;

/// Who is writing, for the audit trail.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    /// `token:<id>`, `cli`, `reconciler`.
    pub actor: String,
    /// The request id of the HTTP request, if any.
    pub request_id: Option<String>,
}

impl WriteCtx {
    /// A context for a CLI command.
    pub fn cli() -> Self {
        WriteCtx {
            actor: "cli".into(),
            request_id: None,
        }
    }
}

/// One write of a batch ([`Store::write_batch`]); each is audited and enqueued exactly as the
/// single-resource command it mirrors.
#[derive(Debug, Clone)]
pub enum BatchOp {
    /// [`Store::create`], with the id chosen by the caller (so later ops can name it).
    Create {
        /// Users or groups.
        kind: ResourceKind,
        /// The new resource's id.
        id: String,
        /// Its attributes.
        attrs: Value,
        /// A group's first members.
        members: Option<Vec<NewMember>>,
    },
    /// [`Store::replace`] of the attributes at any version; a group's members are kept.
    Replace {
        /// Users or groups.
        kind: ResourceKind,
        /// The resource.
        id: String,
        /// Its new attributes.
        attrs: Value,
    },
    /// [`Store::update_members`].
    Members {
        /// The group.
        id: String,
        /// The changes, in order.
        changes: Vec<MembershipChange>,
    },
    /// An audit event of its own ([`Store::audit`]), e.g. what a whole batch did.
    Audit(AuditEntry),
    /// [`Store::delete`] at any version.
    Delete {
        /// Users or groups.
        kind: ResourceKind,
        /// The resource.
        id: String,
    },
}

/// The type of a group member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberType {
    /// A user.
    User,
    /// A nested group.
    Group,
}

impl MemberType {
    /// `User` or `Group`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberType::User => "User",
            MemberType::Group => "Group",
        }
    }

    /// Parses `User`/`Group` case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("user") {
            Some(MemberType::User)
        } else if s.eq_ignore_ascii_case("group") {
            Some(MemberType::Group)
        } else {
            None
        }
    }
}

/// A member to add: its id and, if the client said, its type. A missing type is resolved by
/// looking the id up (users first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMember {
    /// The member's SCIM id.
    pub value: String,
    /// The member's type, if given.
    pub ty: Option<MemberType>,
    /// The display name the client sent, if any (echoed back, never derived).
    pub display: Option<String>,
}

/// A change to a group's membership, applied row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add these members (already present ones are kept).
    Add(Vec<NewMember>),
    /// Remove these member ids (absent ones are ignored).
    Remove(Vec<String>),
    /// Remove every member.
    RemoveAll,
    /// Make the membership exactly this list.
    ReplaceAll(Vec<NewMember>),
}

/// A member as read back, with its current display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRef {
    /// The member's SCIM id.
    pub value: String,
    /// The member's type.
    pub ty: MemberType,
    /// The display name the client sent with the member, if any.
    pub display: Option<String>,
}

/// A group a user belongs to, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef {
    /// The group's SCIM id.
    pub value: String,
    /// The group's `displayName`.
    pub display: String,
}

/// A stored SCIM resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// User or Group.
    pub kind: ResourceKind,
    /// The SCIM id (server-assigned, never reused).
    pub id: String,
    /// Canonical attributes, without `id`, `meta` and members.
    pub attrs: Value,
    /// Creation time.
    pub created: OffsetDateTime,
    /// Last modification time.
    pub last_modified: OffsetDateTime,
    /// Version counter; the ETag is derived from it.
    pub version: i64,
    /// Group members, when they were asked for.
    pub members: Option<Vec<MemberRef>>,
    /// A user's groups, when they were asked for.
    pub groups: Option<Vec<GroupRef>>,
}

/// What to load besides the attributes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOpts {
    /// Load a group's members.
    pub members: bool,
    /// Load a user's groups.
    pub groups: bool,
}

/// A list query. `filter` is evaluated in SQL where the attributes are indexed and in memory for
/// the rest (after an SQL pre-filter).
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// The filter, already validated against the resource type.
    pub filter: Option<Filter>,
    /// The sort attribute; `None` is the stable creation order.
    pub sort_by: Option<AttrPath>,
    /// Descending order.
    pub descending: bool,
    /// Zero-based offset of the first result.
    pub offset: usize,
    /// Page size (0 returns only the total).
    pub count: usize,
    /// Load members / groups for the returned resources.
    pub read: ReadOpts,
}

/// One page of a list. Cloning it is cheap (the resources are shared): the store keeps small
/// pages in its lookup cache and hands out clones.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// Number of resources matching the filter.
    pub total: usize,
    /// The requested page.
    pub resources: std::sync::Arc<[Resource]>,
}

/// What a token may be used for. A token of one scope is never accepted by the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TokenScope {
    /// The SCIM API (identity providers).
    #[default]
    Scim,
    /// The read-only dashboard.
    Admin,
}

impl TokenScope {
    /// The stored form: `scim` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Scim => "scim",
            TokenScope::Admin => "admin",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<TokenScope> {
        match s {
            "scim" => Some(TokenScope::Scim),
            "admin" => Some(TokenScope::Admin),
            _ => None,
        }
    }
}

/// A stored bearer token (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id, shown in `token list` and in the audit trail.
    pub id: String,
    /// What it may be used for.
    pub scope: TokenScope,
    /// Human-readable name.
    pub name: String,
    /// When it was created.
    pub created: OffsetDateTime,
    /// When it stops working, if ever.
    pub expires: Option<OffsetDateTime>,
    /// When it was revoked, if it was.
    pub revoked: Option<OffsetDateTime>,
}

impl TokenRecord {
    /// Whether the token may authenticate at `now`.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.revoked.is_none() && self.expires.is_none_or(|e| now < e)
    }
}

/// An outbox row, as the sync engine will consume it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Row id.
    pub id: i64,
    /// `user` or `group`.
    pub entity_type: String,
    /// The SCIM id of the changed entity.
    pub entity_id: String,
    /// `upsert`, `delete` or `members`.
    pub operation: String,
    /// JSON detail (e.g. the member ids a membership change touched).
    pub detail: String,
    /// The audit event written in the same transaction.
    pub audit_seq: i64,
    /// `pending`, `done` or `dead`.
    pub state: String,
    /// Attempts so far.
    pub attempts: i64,
}

pub use audit::{AuditEvent, Checkpoint};

/// The proof that a writer holds a lease ([`Store::acquire_lease`]): every write made through
/// [`Store::fenced`] checks, inside its own transaction, that the lease `name` is still held by
/// `holder` at `epoch` and has not run out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The lease, e.g. [`RECONCILE_LEASE`].
    pub name: String,
    /// Who holds it (a replica's id).
    pub holder: String,
    /// Moves on every time the lease changes hands.
    pub epoch: i64,
}

/// A lease as held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// What writes under it must present.
    pub fence: Fence,
    /// When it runs out unless renewed.
    pub expires: OffsetDateTime,
}

/// The lease the periodic reconcile runs under: one replica reconciles at a time.
pub const RECONCILE_LEASE: &str = "reconcile";

impl WriteCtx {
    /// The context of the outbox worker and the reconciler.
    pub fn sync() -> Self {
        WriteCtx {
            actor: "sync".into(),
            request_id: None,
        }
    }
}

/// The backend-neutral store. Implementations must make every mutating method one transaction
/// that also appends its audit event and outbox row.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// Creates a resource. Groups may be created with members.
    async fn create(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource>;

    /// Replaces a resource's attributes (PUT). `members: Some` replaces a group's membership.
    async fn replace(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource>;

    /// Applies a computed update (PATCH): new attributes if they changed, then membership
    /// changes in order. Fails with `PreconditionFailed` if the version moved.
    async fn update(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: i64,
        attrs: Option<Value>,
        members: &[MembershipChange],
    ) -> StoreResult<Resource>;

    /// Applies membership changes to a group in order, in one transaction, at whatever version
    /// it has: adding and removing members commute, so concurrent PATCHes of one group need no
    /// optimistic retry and none is lost. Bumps the version (and writes the audit event and the
    /// outbox row) only when a member was added or removed.
    async fn update_members(
        &self,
        ctx: &WriteCtx,
        id: &str,
        members: &[MembershipChange],
    ) -> StoreResult<Resource>;

    /// Deletes a resource and its membership rows.
    async fn delete(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()>;

    /// Applies `ops` in order and sets the sync state `state` (key, value) in one transaction:
    /// all of it or none. Pull mode stores the IdP's cursor with the changes it carried.
    async fn write_batch(
        &self,
        ctx: &WriteCtx,
        ops: &[BatchOp],
        state: Option<(&str, &str)>,
    ) -> StoreResult<()>;

    /// Reads one resource.
    async fn get(
        &self,
        kind: ResourceKind,
        id: &str,
        read: ReadOpts,
    ) -> StoreResult<Option<Resource>>;

    /// Number of members of a group.
    async fn member_count(&self, group_id: &str) -> StoreResult<usize>;

    /// Whether a group has more than `n` members. Backends override this to stop counting at
    /// `n + 1` (a PATCH on a 50,000-member group asks it on every request).
    async fn member_count_exceeds(&self, group_id: &str, n: usize) -> StoreResult<bool> {
        Ok(self.member_count(group_id).await? > n)
    }

    /// Lists resources matching a query.
    async fn list(&self, kind: ResourceKind, query: &ListQuery) -> StoreResult<ListPage>;

    /// A counter that moves on after every committed resource write to the database, by any
    /// process, for caches of read results: what was read while the counter said `g` is current
    /// as long as it still says `g` (read the counter *before* reading the data, and again
    /// before serving a cached answer). SQLite (one writing process) keeps it in memory;
    /// PostgreSQL keeps it in the chain-head row every resource write already locks, so reading
    /// it is one primary-key lookup. `None`: nothing may be cached.
    async fn resource_generation(&self) -> StoreResult<Option<u64>> {
        Ok(None)
    }

    /// Wakes `wake` whenever a transaction that inserted an outbox row commits, in any process
    /// (PostgreSQL: `LISTEN` on a connection of its own, reconnecting when it drops). Returns
    /// `false` when this backend has no such signal (SQLite: the writer is this process); the
    /// worker's polling is the fallback either way.
    fn watch_outbox(&self, wake: Arc<tokio::sync::Notify>) -> bool {
        let _ = wake;
        false
    }

    // ----- Leases (one reconciler among replicas) -----

    /// Takes the lease `name` for `holder` until `now + ttl` when it is free, expired, or
    /// already `holder`'s (then it is renewed at the same epoch). Taking it from someone else
    /// (or after a release) moves the epoch on, which fences off every write the previous
    /// holder still tries. `None` when another holder has it.
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<Option<Lease>>;

    /// Extends a held lease to `now + ttl` (the heartbeat of a long reconcile). `Fenced` when
    /// the lease changed hands since `fence` was issued.
    async fn renew_lease(&self, fence: &Fence, ttl: std::time::Duration) -> StoreResult<Lease>;

    /// Gives the lease up (it expires now; the next taker moves the epoch on). Does nothing
    /// when it already changed hands.
    async fn release_lease(&self, fence: &Fence) -> StoreResult<()>;

    /// This store, with every write transaction checking first — in the same transaction —
    /// that `fence` still holds (holder, epoch, not expired; on PostgreSQL the lease row is
    /// share-locked until commit, so a takeover waits for the write or the write sees the
    /// takeover). A write whose fence no longer holds fails with [`StoreError::Fenced`] and
    /// writes nothing. Reads are not checked. Fencing a fenced view adds a fence: every one is
    /// checked.
    fn fenced(&self, fence: Fence) -> DynStore;

    /// Stores a new SCIM token hash (the caller generated and shows the secret).
    async fn create_token(
        &self,
        ctx: &WriteCtx,
        name: &str,
        hash: [u8; 32],
        expires: Option<OffsetDateTime>,
    ) -> StoreResult<TokenRecord> {
        self.create_scoped_token(ctx, TokenScope::Scim, name, hash, expires)
            .await
    }

    /// Stores a new token hash of `scope` (the caller generated and shows the secret).
    async fn create_scoped_token(
        &self,
        ctx: &WriteCtx,
        scope: TokenScope,
        name: &str,
        hash: [u8; 32],
        expires: Option<OffsetDateTime>,
    ) -> StoreResult<TokenRecord>;

    /// Lists tokens, newest first.
    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>>;

    /// Revokes a token; `NotFound` if there is none with that id.
    async fn revoke_token(&self, ctx: &WriteCtx, id: &str) -> StoreResult<()>;

    /// Every token (of any scope) that is neither revoked nor expired, with its SHA-256 hash,
    /// for the server's authentication snapshots.
    async fn valid_token_hashes(&self) -> StoreResult<Vec<([u8; 32], TokenRecord)>>;

    /// Audit events with `seq > after`, oldest first, at most `limit`.
    async fn audit_events(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEvent>>;

    /// Outbox rows with `id > after`, oldest first, at most `limit`.
    async fn outbox_items(&self, after: i64, limit: i64) -> StoreResult<Vec<OutboxItem>>;

    // ----- Sync bookkeeping (outbox worker, reconciler, operator CLI) -----
    //
    // Every mutating method below is one transaction with its audit event; none writes an
    // outbox row (these are not SCIM changes). `sync_state_set` alone is not audited: it is
    // housekeeping (e.g. the last reconcile time), not a decision.

    /// Claims due work for `worker` until `now + lease`, at most `limit` entities.
    ///
    /// An entity is due when it has a `pending` row with `next_attempt_at <= now` whose lease
    /// is absent or expired, and no row of it is leased by anyone else. For each due entity
    /// (oldest due row first) every pending unleased row is claimed together — see
    /// [`ClaimedEntity`]. Atomic across processes (one write transaction).
    async fn claim_outbox(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: std::time::Duration,
        limit: usize,
    ) -> StoreResult<Vec<ClaimedEntity>>;

    /// The heartbeat of a long pass: extends to `now + lease` the lease of every `pending` row
    /// `worker` still holds (its lease not run out at `now`). Returns how many rows it kept.
    /// A row whose lease ran out is not taken back: another worker may have it now.
    async fn renew_outbox_leases(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: std::time::Duration,
    ) -> StoreResult<usize>;

    /// [`Store::claim_outbox`], the most recently written entities first (by their newest due
    /// row): the worker takes a share of each pass this way, so a push made during a long
    /// backlog (a first load) is not applied after all of it.
    async fn claim_outbox_newest(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: std::time::Duration,
        limit: usize,
    ) -> StoreResult<Vec<ClaimedEntity>>;

    /// [`Store::claim_outbox`] for entities TeamCity already has (a user or group with a
    /// stored link), oldest due row first: a change to existing access — a deactivation, a
    /// membership — is not queued behind the creations of a first load.
    async fn claim_outbox_linked(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: std::time::Duration,
        limit: usize,
    ) -> StoreResult<Vec<ClaimedEntity>>;

    /// Marks claimed rows `done` and records `events` (e.g. the TeamCity calls made) plus one
    /// `outbox.complete` event per entity. Rows no longer `pending` (dropped meanwhile) are
    /// left alone.
    async fn complete_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        events: Vec<AuditEntry>,
    ) -> StoreResult<()>;

    /// Records a failure of claimed rows and releases their lease. Transient: `attempts + 1`
    /// and `next_attempt_at = now + backoff(attempts, policy)`, or `dead` once `attempts`
    /// reaches `policy.max_attempts`. Permanent: `dead` at once. The reason is kept
    /// (`last_error`, `dead_reason`) and audited (outcome `failure`).
    async fn fail_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        error: &str,
        transient: bool,
        now: OffsetDateTime,
        policy: &RetryPolicy,
    ) -> StoreResult<Vec<FailedItem>>;

    /// Releases claimed `pending` rows without counting an attempt: they are due again at
    /// `until`, with `reason` as their last error (one `outbox.deferred` audit event). For
    /// failures that are not the rows' fault — the bridge cannot reach or read TeamCity, or is
    /// misconfigured — so such a failure never dead-letters anything. Returns the rows moved.
    async fn defer_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        reason: &str,
        until: OffsetDateTime,
    ) -> StoreResult<usize>;

    /// `(entity_type, entity_id)` of every entity a SCIM DELETE removed (its outbox row says
    /// `delete`): the directory explicitly asked for their removal.
    async fn deleted_entities(&self) -> StoreResult<Vec<(String, String)>>;

    /// Parks pending rows in held batch `batch_id` (state `held`, lease released).
    async fn hold_outbox(&self, ctx: &WriteCtx, ids: &[i64], batch_id: i64) -> StoreResult<()>;

    /// How many outbox rows are in each state, and when the oldest pending one was written
    /// (for metrics and `status`; one cheap query each).
    async fn outbox_summary(&self) -> StoreResult<OutboxSummary>;

    /// Outbox rows in `state` (any state when `None`), oldest first, at most `limit`.
    async fn list_outbox(&self, state: Option<&str>, limit: i64) -> StoreResult<Vec<OutboxEntry>>;

    /// Moves a `dead` row back to `pending`, due now, attempts reset. `NotFound` if there is no
    /// such row; `Invalid` naming its state if it is not dead.
    async fn retry_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<OutboxEntry>;

    /// Moves a `pending`, `dead` or `held` row to `dropped`: it will never be applied.
    /// `NotFound` if there is no such row; `Invalid` naming its state otherwise.
    async fn drop_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<OutboxEntry>;

    /// Links a SCIM resource to its TeamCity object. Returns `false` (and writes nothing) when
    /// the link was already exactly this.
    async fn upsert_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
        teamcity_id: &str,
        teamcity_name: &str,
    ) -> StoreResult<bool>;

    /// Upserts many links in one transaction; returns how many changed. Each change is audited
    /// like [`Store::upsert_mapping`].
    async fn upsert_mappings(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        items: &[(String, String, String)],
    ) -> StoreResult<usize>;

    /// Appends `entries` to the audit trail and upserts `links` (each change audited like
    /// [`Store::upsert_mapping`]), all in one transaction: the sync engine's group commit of
    /// the actions it applied concurrently.
    async fn record_applied(
        &self,
        ctx: &WriteCtx,
        entries: &[AuditEntry],
        links: &[MappingLink],
    ) -> StoreResult<()>;

    /// Removes a link; `false` if there was none.
    async fn delete_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
    ) -> StoreResult<bool>;

    /// Every link of a kind, ordered by SCIM id.
    async fn mappings(&self, kind: ResourceKind) -> StoreResult<Vec<Mapping>>;

    /// One link.
    async fn mapping(&self, kind: ResourceKind, scim_id: &str) -> StoreResult<Option<Mapping>>;

    /// Records a held batch (`source`: `outbox` or `reconcile`; audited as `sync.held`) and, in
    /// the same transaction, parks `outbox_ids` in it as [`Store::hold_outbox`] does. Returns
    /// the batch id.
    async fn create_held(
        &self,
        ctx: &WriteCtx,
        source: &str,
        outbox_ids: &[i64],
        summary: &str,
        removals: i64,
        plan: &Value,
    ) -> StoreResult<i64>;

    /// Held batches in `state` (all when `None`), oldest first.
    async fn list_held(&self, state: Option<&str>) -> StoreResult<Vec<HeldBatch>>;

    /// One held batch.
    async fn held_batch(&self, id: i64) -> StoreResult<Option<HeldBatch>>;

    /// Approves a `held` batch (audited as `sync.approve`; `decided_by` is the actor). The
    /// worker applies approved batches. `NotFound`, or `Invalid` naming its state.
    async fn approve_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<HeldBatch>;

    /// Marks an `approved` batch `applied` and its held outbox rows `done` (audited as
    /// `sync.applied`). `NotFound`, or `Invalid` naming its state.
    async fn mark_held_applied(&self, ctx: &WriteCtx, id: i64) -> StoreResult<()>;

    /// Drops a `held` or `approved` batch and its held outbox rows (audited as `sync.drop`).
    async fn drop_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<HeldBatch>;

    /// Policy rules pinned to a group id: rule → SCIM group id.
    async fn pins(&self) -> StoreResult<std::collections::BTreeMap<String, String>>;

    /// Pins `rule` to `group_id` (replacing an earlier pin; audited as `policy.pin`).
    async fn set_pin(&self, ctx: &WriteCtx, rule: &str, group_id: &str) -> StoreResult<()>;

    /// A sync state value.
    async fn sync_state_get(&self, key: &str) -> StoreResult<Option<String>>;

    /// Sets a sync state value (not audited).
    async fn sync_state_set(&self, key: &str, value: &str) -> StoreResult<()>;

    /// Adds one to the integer at `key` (0 when absent) in one transaction and returns the
    /// new value: a counter every writer to TeamCity moves, so another process's writes are
    /// noticed.
    async fn sync_state_increment(&self, key: &str) -> StoreResult<i64>;

    /// Every user and group with direct members, in one consistent read (three queries).
    async fn directory(&self) -> StoreResult<DirectorySnapshot>;

    /// The part of the directory a sync pass touches, in one consistent read of indexed
    /// lookups only (four queries, whatever the size of the directory):
    /// - the users `users` and the user members of the groups `groups`;
    /// - the groups `groups`, each with all its direct members;
    /// - every other group those users are in, with its attributes and its memberships among
    ///   those users only (not its other members).
    ///
    /// Ids that name nothing (deleted resources) are left out. Users and groups come in
    /// creation order, members ordered by id, as in [`Store::directory`].
    async fn directory_of(
        &self,
        users: &[String],
        groups: &[String],
    ) -> StoreResult<DirectorySnapshot>;

    /// Appends one audit event on its own (no outbox row). Returns its sequence number.
    async fn audit(&self, ctx: &WriteCtx, entry: AuditEntry) -> StoreResult<i64>;

    // ----- Audit retention and export -----

    /// The newest audit events with `seq < before` (all when `None`), newest first, at most
    /// `limit`: the dashboard's view of the trail.
    async fn audit_recent(&self, before: Option<i64>, limit: i64) -> StoreResult<Vec<AuditEvent>>;

    /// Audit events with `seq > after` and `since <= time <= until` (either bound optional),
    /// oldest first, at most `limit`.
    async fn audit_range(
        &self,
        since: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEvent>>;

    /// The newest prune checkpoint: where the chain now starts. `None` if nothing was pruned.
    async fn audit_checkpoint(&self) -> StoreResult<Option<Checkpoint>>;

    /// Deletes the events older than `before` in one transaction, after checking their links
    /// and the previous checkpoint's signature, and stores a checkpoint signed with `key`
    /// (HMAC-SHA256) holding the last pruned seq, its hash and time, the counts and the access
    /// state replayed up to it. The prune is then audited (`audit.prune`), chained after the
    /// checkpoint. Returns `None` (and writes nothing) when no event is older than `before`.
    /// `Invalid` if the previous checkpoint's signature or a link is wrong.
    async fn prune_audit(
        &self,
        ctx: &WriteCtx,
        before: OffsetDateTime,
        key: &[u8],
    ) -> StoreResult<Option<Checkpoint>>;

    // ----- Copying a deployment (`db copy`) -----

    /// How many rows `table` (one of [`copy::COPY_TABLES`]) holds.
    async fn copy_count(&self, table: &copy::CopyTable) -> StoreResult<i64>;

    /// At most `limit` rows of `table` after the first `offset`, in its primary-key order,
    /// every column as stored.
    async fn copy_out(
        &self,
        table: &copy::CopyTable,
        offset: i64,
        limit: i64,
    ) -> StoreResult<copy::Rows>;

    /// Inserts `rows` into `table` as they are (ids, sequence numbers, hashes kept), in one
    /// transaction, without audit events: the copied trail is the record.
    async fn copy_in(&self, table: &copy::CopyTable, rows: &copy::Rows) -> StoreResult<()>;

    /// After the last [`Store::copy_in`]: moves id sequences and the audit chain's head past
    /// the copied rows, so the next write continues them.
    async fn copy_finish(&self) -> StoreResult<()>;
}

/// A shared store handle.
pub type DynStore = Arc<dyn Store>;

/// Opens the store a database URL names (`sqlite://PATH`, `sqlite::memory:`,
/// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?max_connections=N]`), creating (SQLite) and
/// migrating it as needed.
pub async fn open(url: &str, clock: Arc<dyn Clock>) -> StoreResult<DynStore> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(url, clock).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::open(url, clock).await?))
    } else {
        Err(StoreError::Invalid(format!(
            "unsupported database URL scheme in `{}`: expected sqlite://PATH or postgres://…",
            url.split(':').next().unwrap_or(url)
        )))
    }
}
