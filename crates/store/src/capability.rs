//! The store's capabilities: one trait per concern, each implemented by both backends (in
//! `sqlite/<capability>.rs` and `postgres/<capability>.rs`). [`Store`](crate::Store) is all of
//! them together; a caller that needs only some names those.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use scim::ResourceKind;
use serde_json::Value;
use time::OffsetDateTime;

use crate::copy;
use crate::{
    AuditEntry, AuditEvent, BatchOp, Checkpoint, ClaimedEntity, DirectorySnapshot, DynStore,
    FailedItem, Fence, HeldBatch, HeldState, Lease, ListPage, ListQuery, Mapping, MappingLink,
    MembershipChange, NewMember, OutboxEntry, OutboxItem, OutboxState, OutboxSummary, ReadOpts,
    Resource, RetryPolicy, StoreResult, TokenRecord, TokenScope, WriteCtx,
};

/// The SCIM resources: every write is one transaction with its audit event and outbox row.
#[async_trait]
pub trait Resources: Send + Sync + fmt::Debug {
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
}

/// Bearer tokens (hashes only); each create and revoke is audited.
#[async_trait]
pub trait Tokens: Send + Sync + fmt::Debug {
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
}

/// The transactional outbox as the sync worker and the operator see it.
///
/// Every mutating method is one transaction with its audit event; none writes an outbox row
/// (these are not SCIM changes).
#[async_trait]
pub trait Outbox: Send + Sync + fmt::Debug {
    /// Wakes `wake` whenever a transaction that inserted an outbox row commits, in any process
    /// (PostgreSQL: `LISTEN` on a connection of its own, reconnecting when it drops). Returns
    /// `false` when this backend has no such signal (SQLite: the writer is this process); the
    /// worker's polling is the fallback either way.
    fn watch_outbox(&self, wake: Arc<tokio::sync::Notify>) -> bool {
        let _ = wake;
        false
    }

    /// Outbox rows with `id > after`, oldest first, at most `limit`.
    async fn outbox_items(&self, after: i64, limit: i64) -> StoreResult<Vec<OutboxItem>>;

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

    /// [`Outbox::claim_outbox`], the most recently written entities first (by their newest due
    /// row): the worker takes a share of each pass this way, so a push made during a long
    /// backlog (a first load) is not applied after all of it.
    async fn claim_outbox_newest(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: std::time::Duration,
        limit: usize,
    ) -> StoreResult<Vec<ClaimedEntity>>;

    /// [`Outbox::claim_outbox`] for rows written while TeamCity had their entity (a user or
    /// group with a stored link), oldest first: a change to existing access — a deactivation,
    /// a membership — is not queued behind the creations of a first load.
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
    async fn list_outbox(
        &self,
        state: Option<OutboxState>,
        limit: i64,
    ) -> StoreResult<Vec<OutboxEntry>>;

    /// Moves a `dead` row back to `pending`, due now, attempts reset. `NotFound` if there is no
    /// such row; `Invalid` naming its state if it is not dead.
    async fn retry_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<OutboxEntry>;

    /// Moves a `pending`, `dead` or `held` row to `dropped`: it will never be applied.
    /// `NotFound` if there is no such row; `Invalid` naming its state otherwise.
    async fn drop_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<OutboxEntry>;
}

/// Links between SCIM resources and their TeamCity objects; each change is audited.
#[async_trait]
pub trait Mappings: Send + Sync + fmt::Debug {
    /// Links a SCIM resource to its TeamCity object. Returns `false` (and writes nothing) when
    /// the link was already exactly this.
    async fn upsert_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
        teamcity_id: &str,
        teamcity_name: &str,
    ) -> StoreResult<bool> {
        let items = [(
            scim_id.to_owned(),
            teamcity_id.to_owned(),
            teamcity_name.to_owned(),
        )];
        Ok(self.upsert_mappings(ctx, kind, &items).await? > 0)
    }

    /// Upserts many links in one transaction; returns how many changed. Each change is audited
    /// like [`Mappings::upsert_mapping`].
    async fn upsert_mappings(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        items: &[(String, String, String)],
    ) -> StoreResult<usize>;

    /// Appends `entries` to the audit trail and upserts `links` (each change audited like
    /// [`Mappings::upsert_mapping`]), all in one transaction: the sync engine's group commit of
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
    async fn mapping(&self, kind: ResourceKind, scim_id: &str) -> StoreResult<Option<Mapping>> {
        Ok(self.mappings_of(kind, &[scim_id.to_owned()]).await?.pop())
    }

    /// The links of these SCIM ids (those that have one), ordered by SCIM id: one indexed
    /// query, whatever the number of links stored.
    async fn mappings_of(
        &self,
        kind: ResourceKind,
        scim_ids: &[String],
    ) -> StoreResult<Vec<Mapping>>;
}

/// The hash-chained audit trail: appending, reading, retention (prune with a signed
/// checkpoint).
#[async_trait]
pub trait AuditLog: Send + Sync + fmt::Debug {
    /// Audit events with `seq > after`, oldest first, at most `limit`.
    async fn audit_events(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEvent>>;

    /// Appends one audit event on its own (no outbox row). Returns its sequence number.
    async fn audit(&self, ctx: &WriteCtx, entry: AuditEntry) -> StoreResult<i64>;

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
}

/// Batches the sync engine held back for an operator's decision.
#[async_trait]
pub trait HeldBatches: Send + Sync + fmt::Debug {
    /// Records a held batch (`source`: `outbox` or `reconcile`; audited as `sync.held`) and, in
    /// the same transaction, parks `outbox_ids` in it as [`Outbox::hold_outbox`] does. Returns
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
    async fn list_held(&self, state: Option<HeldState>) -> StoreResult<Vec<HeldBatch>>;

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
}

/// Leases and fencing (one reconciler among replicas).
#[async_trait]
pub trait Leases: Send + Sync + fmt::Debug {
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
    /// takeover). A write whose fence no longer holds fails with [`StoreError::Fenced`](crate::StoreError::Fenced) and
    /// writes nothing. Reads are not checked. Fencing a fenced view adds a fence: every one is
    /// checked.
    fn fenced(&self, fence: Fence) -> DynStore;
}

/// The sync engine's small persistent state: policy pins and key/value sync state.
///
/// `sync_state_set` alone is not audited: it is housekeeping (e.g. the last reconcile time),
/// not a decision.
#[async_trait]
pub trait SyncState: Send + Sync + fmt::Debug {
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

    /// The time on the store's clock. The engine reads time only here, so the times it
    /// compares with what the store wrote (rows due, leases, retries) are on the same clock.
    fn now(&self) -> time::OffsetDateTime;
}

/// Consistent reads of the whole directory, or the part of it a sync pass touches.
#[async_trait]
pub trait Directory: Send + Sync + fmt::Debug {
    /// Every user and group with direct members, in one consistent read (three queries).
    async fn directory(&self) -> StoreResult<DirectorySnapshot>;

    /// The part of the directory a sync pass touches, in one consistent read of indexed
    /// lookups only (four queries, whatever the size of the directory):
    /// - the users `users` and the user members of the groups `groups`;
    /// - the groups `groups`, each with all its direct members;
    /// - every other group those users are in, with its attributes and its memberships among
    ///   those users only (not its other members).
    ///
    /// With `context` (`Some`), the user members of `groups` not in `users`, and the users
    /// `context`, are loaded as users only: no other group of theirs, none of their other
    /// memberships (a pass that plans a group whole needs its members, not everything each
    /// member is in).
    ///
    /// Ids that name nothing (deleted resources) are left out. Users and groups come in
    /// creation order, members ordered by id, as in [`Directory::directory`].
    async fn directory_of(
        &self,
        users: &[String],
        groups: &[String],
        context: Option<&[String]>,
    ) -> StoreResult<DirectorySnapshot>;
}

/// Copying a deployment table by table (`db copy`).
#[async_trait]
pub trait TableCopy: Send + Sync + fmt::Debug {
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

    /// After the last [`TableCopy::copy_in`]: moves id sequences and the audit chain's head past
    /// the copied rows, so the next write continues them.
    async fn copy_finish(&self) -> StoreResult<()>;
}
