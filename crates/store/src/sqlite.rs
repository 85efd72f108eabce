//! The SQLite backend: WAL, one writer connection (plus `BEGIN IMMEDIATE`, so other processes
//! such as `teamcity-scim token create` serialise with a running server), a small read pool.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scim::schema::ResourceKind;
use serde_json::{Value, json};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{AssertSqlSafe, Row, Sqlite, SqlitePool, Transaction};
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::common::{
    self, NewEvent, Record, TokenRow, chain_event, entity, indexed, read_back, table, token_row,
};
use crate::sql_filter::{Bind, Dialect};
use crate::{
    BatchOp, Clock, ListPage, ListQuery, MemberRef, MemberType, MembershipChange, NewMember,
    OutboxItem, ReadOpts, Resource, StoreError, StoreResult, TokenRecord, TokenScope, WriteCtx,
    timefmt,
};

mod audit_log;
mod copy;
mod directory;
mod group_commit;
mod held;
mod lease;
mod mappings;
mod outbox;
mod resources;
mod sync;
mod sync_state;
mod tokens;

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    write: SqlitePool,
    clock: Arc<dyn Clock>,
    /// Bumped after every committed resource write (see [`Store::resource_generation`]). Only
    /// this process writes SCIM resources to its SQLite file (the CLI's commands touch tokens,
    /// the outbox and the audit trail), which is what makes a process-local counter enough.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// Set on a [`Store::fenced`] view: every write transaction checks them first.
    fences: Vec<Arc<crate::Fence>>,
    /// The group-commit writer of SCIM resource commands (see `group_commit`); `None` on a
    /// fenced view and inside the writer itself (they write directly).
    writer: Option<tokio::sync::mpsc::Sender<group_commit::Job>>,
}

type Tx = Transaction<'static, Sqlite>;

const USER_COLS: &str = "t.id, t.created, t.last_modified, t.version, t.data";
const GROUPS_OF_USER: &str = "(SELECT json_group_array(json_object('value', g.id, 'display', g.display_name)) \
     FROM group_members m JOIN groups g ON g.id = m.group_id WHERE m.member_id = t.id)";

impl SqliteStore {
    /// [`Store::update`] with the version check optional (`None`: membership changes only,
    /// which commute).
    async fn update_at(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: Option<Value>,
        members: &[MembershipChange],
    ) -> StoreResult<Resource> {
        let op = group_commit::Op::Update {
            kind,
            id: id.to_owned(),
            expected: expected_version,
            attrs: attrs.clone(),
            members: members.to_vec(),
        };
        if let Some(r) = self.submit(ctx, op).await {
            return r?.ok_or(StoreError::NotFound);
        }
        let mut tx = self.begin().await?;
        let changed = Self::update_in(
            &mut tx,
            ctx,
            self.now(),
            kind,
            id,
            expected_version,
            attrs.as_ref(),
            members,
        )
        .await?;
        let r = self.read_one_tx(&mut tx, kind, id, read_back(kind)).await?;
        tx.commit().await?;
        if changed {
            self.written();
        }
        Ok(r)
    }

    /// The update inside `tx`. Returns whether anything changed (nothing: no version bump, no
    /// audit noise, nothing for TeamCity).
    #[allow(clippy::too_many_arguments)]
    async fn update_in(
        tx: &mut Tx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: Option<&Value>,
        members: &[MembershipChange],
    ) -> StoreResult<bool> {
        let ts = timefmt::format(now);
        let version = Self::current_version(tx, kind, id).await?;
        if expected_version.is_some_and(|v| v != version) {
            return Err(StoreError::PreconditionFailed);
        }
        let (mut added, mut removed) = (vec![], vec![]);
        if kind == ResourceKind::Group {
            for change in members {
                apply_members(tx, id, change, &mut added, &mut removed).await?;
            }
        }
        let attrs_changed = attrs.is_some();
        let members_changed = !added.is_empty() || !removed.is_empty();
        if !attrs_changed && !members_changed {
            return Ok(false);
        }
        match attrs {
            Some(a) => Self::write_attrs(tx, kind, id, a, &ts, version + 1).await?,
            None => Self::touch(tx, kind, id, &ts, version + 1).await?,
        }
        let op = if attrs_changed { "upsert" } else { "members" };
        record(
            tx,
            ctx,
            now,
            Record {
                resource_type: kind.name(),
                resource_id: id,
                operation: "patch",
                status: 200,
                detail: json!({
                    "attributes_changed": attrs_changed,
                    "members_added": added.len(),
                    "members_removed": removed.len(),
                }),
                outbox: Some((
                    entity(kind),
                    op,
                    json!({"added": added, "removed": removed}),
                )),
            },
        )
        .await?;
        Ok(true)
    }

    /// [`Store::create`] inside `tx`, with the id chosen by the caller.
    async fn create_in(
        tx: &mut Tx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        attrs: &Value,
        members: Option<&[NewMember]>,
    ) -> StoreResult<()> {
        let ts = timefmt::format(now);
        let ix = indexed(kind, attrs)?;
        // Uniqueness of the name is the `*_ci` unique index's (one statement fewer per write).
        let data = attrs.to_string();
        let insert = match kind {
            ResourceKind::User => sqlx::query(
                "INSERT INTO users (id, user_name, user_name_ci, external_id, active, created, last_modified, version, data) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
            )
            .bind(id)
            .bind(&ix.name)
            .bind(&ix.name_ci)
            .bind(&ix.external_id)
            .bind(ix.active),
            ResourceKind::Group => sqlx::query(
                "INSERT INTO groups (id, display_name, display_name_ci, external_id, created, last_modified, version, data) \
                 VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
            )
            .bind(id)
            .bind(&ix.name)
            .bind(&ix.name_ci)
            .bind(&ix.external_id),
        };
        insert
            .bind(&ts)
            .bind(&ts)
            .bind(&data)
            .execute(&mut **tx)
            .await
            .map_err(|e| common::name_taken(kind, e))?;
        let (mut added, mut removed) = (vec![], vec![]);
        if let (ResourceKind::Group, Some(list)) = (kind, members) {
            apply_members(
                tx,
                id,
                &MembershipChange::Add(list.to_vec()),
                &mut added,
                &mut removed,
            )
            .await?;
        }
        record(
            tx,
            ctx,
            now,
            Record {
                resource_type: kind.name(),
                resource_id: id,
                operation: "create",
                status: 201,
                detail: json!({"members_added": added.len()}),
                outbox: Some((entity(kind), "upsert", json!({"added": added}))),
            },
        )
        .await?;
        Ok(())
    }

    /// [`Store::replace`] inside `tx`.
    #[allow(clippy::too_many_arguments)]
    async fn replace_in(
        tx: &mut Tx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: &Value,
        members: Option<&[NewMember]>,
    ) -> StoreResult<()> {
        let ts = timefmt::format(now);
        let version = Self::current_version(tx, kind, id).await?;
        if expected_version.is_some_and(|v| v != version) {
            return Err(StoreError::PreconditionFailed);
        }
        Self::write_attrs(tx, kind, id, attrs, &ts, version + 1).await?;
        let (mut added, mut removed) = (vec![], vec![]);
        if let (ResourceKind::Group, Some(list)) = (kind, members) {
            apply_members(
                tx,
                id,
                &MembershipChange::ReplaceAll(list.to_vec()),
                &mut added,
                &mut removed,
            )
            .await?;
        }
        record(
            tx,
            ctx,
            now,
            Record {
                resource_type: kind.name(),
                resource_id: id,
                operation: "replace",
                status: 200,
                detail: json!({"members_added": added.len(), "members_removed": removed.len()}),
                outbox: Some((
                    entity(kind),
                    "upsert",
                    json!({"added": added, "removed": removed}),
                )),
            },
        )
        .await?;
        Ok(())
    }

    /// [`Store::delete`] inside `tx`.
    async fn delete_in(
        tx: &mut Tx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()> {
        let version = Self::current_version(tx, kind, id).await?;
        if expected_version.is_some_and(|v| v != version) {
            return Err(StoreError::PreconditionFailed);
        }
        let affected: Vec<(String,)> =
            sqlx::query_as("SELECT group_id FROM group_members WHERE member_id = ?")
                .bind(id)
                .fetch_all(&mut **tx)
                .await?;
        sqlx::query("DELETE FROM group_members WHERE member_id = ? OR group_id = ?")
            .bind(id)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let sql = format!("DELETE FROM {} WHERE id = ?", table(kind));
        sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let groups: Vec<String> = affected.into_iter().map(|(g,)| g).collect();
        // The groups it left changed too: their ETags must move.
        let ts = timefmt::format(now);
        for g in &groups {
            sqlx::query("UPDATE groups SET version = version + 1, last_modified = ? WHERE id = ?")
                .bind(&ts)
                .bind(g)
                .execute(&mut **tx)
                .await?;
        }
        record(
            tx,
            ctx,
            now,
            Record {
                resource_type: kind.name(),
                resource_id: id,
                operation: "delete",
                status: 204,
                detail: json!({"left_groups": groups.len()}),
                outbox: Some((entity(kind), "delete", json!({"groups": groups}))),
            },
        )
        .await?;
        Ok(())
    }

    /// Opens (creating if missing) and migrates the database at `url`.
    pub async fn open(url: &str, clock: Arc<dyn Clock>) -> StoreResult<Self> {
        let memory = url.contains(":memory:") || url.contains("mode=memory");
        let opts = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .journal_mode(if memory {
                SqliteJournalMode::Memory
            } else {
                SqliteJournalMode::Wal
            })
            // Every commit is flushed before the write is answered: an acknowledged SCIM change
            // (a deactivation, say) survives a power loss. Group commit pays for the flushes.
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .pragma("cache_size", "-4000")
            .pragma("temp_store", "memory");
        let write = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .connect_with(opts.clone())
            .await?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&write)
            .await
            .map_err(|e| StoreError::Other(Box::new(e)))?;
        // An in-memory database exists once per connection: share the writer.
        let read = if memory {
            write.clone()
        } else {
            SqlitePoolOptions::new()
                .max_connections(4)
                .min_connections(1)
                // A local file connection does not go stale; sqlx's ping before every acquire
                // is a round trip to the connection's worker thread, per query.
                .test_before_acquire(false)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect_with(opts.read_only(true))
                .await?
        };
        let mut store = SqliteStore {
            read,
            write,
            clock,
            generation: Arc::default(),
            fences: Vec::new(),
            writer: None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4 * group_commit::MAX_BATCH);
        tokio::spawn(group_commit::run(store.clone(), rx));
        store.writer = Some(tx);
        Ok(store)
    }

    /// Runs a resource command through the group-commit writer, or directly when there is none.
    async fn submit(
        &self,
        ctx: &WriteCtx,
        op: group_commit::Op,
    ) -> Option<StoreResult<Option<Resource>>> {
        let writer = self.writer.as_ref()?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let job = group_commit::Job {
            ctx: ctx.clone(),
            op,
            reply,
        };
        if writer.send(job).await.is_err() {
            return Some(Err(StoreError::Unavailable(
                "the SQLite writer has stopped".into(),
            )));
        }
        Some(answer.await.unwrap_or_else(|_| {
            Err(StoreError::Unavailable(
                "the SQLite writer has stopped".into(),
            ))
        }))
    }

    async fn begin(&self) -> StoreResult<Tx> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        for f in &self.fences {
            lease::check(&mut tx, f, &timefmt::format(self.now())).await?;
        }
        Ok(tx)
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }
}

/// The chain head inside `tx`: the last event, else the newest checkpoint (everything was
/// pruned), else genesis.
async fn chain_head(tx: &mut Tx) -> StoreResult<(i64, String)> {
    let last: Option<(i64, String)> =
        sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
    if let Some(l) = last {
        return Ok(l);
    }
    let cp: Option<(i64, String)> = sqlx::query_as(
        "SELECT last_seq, last_hash FROM audit_checkpoints ORDER BY id DESC LIMIT 1",
    )
    .fetch_optional(&mut **tx)
    .await?;
    Ok(common::empty_head(cp))
}

/// Appends one audit event inside `tx`, chained to the head; email addresses in the detail
/// are scrubbed first. Returns its seq.
async fn append_event(
    tx: &mut Tx,
    ctx: &WriteCtx,
    now: OffsetDateTime,
    n: NewEvent<'_>,
) -> StoreResult<AuditEvent> {
    let prev = chain_head(tx).await?;
    let ev = chain_event(ctx, now, n, prev);
    insert_events(tx, std::slice::from_ref(&ev)).await?;
    Ok(ev)
}

/// Inserts chained events; more than one in a single statement (bound as one JSON array and
/// expanded with `json_each`), so a batch costs one round trip to the connection's thread.
async fn insert_events(tx: &mut Tx, events: &[AuditEvent]) -> StoreResult<()> {
    if let [ev] = events {
        sqlx::query(
            "INSERT INTO audit_events (seq, time, actor, request_id, resource_type, resource_id, operation, \
             outcome, status, detail, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(ev.seq)
        .bind(&ev.time)
        .bind(&ev.actor)
        .bind(&ev.request_id)
        .bind(&ev.resource_type)
        .bind(&ev.resource_id)
        .bind(&ev.operation)
        .bind(&ev.outcome)
        .bind(ev.status)
        .bind(&ev.detail)
        .bind(&ev.prev_hash)
        .bind(&ev.hash)
        .execute(&mut **tx)
        .await?;
        return Ok(());
    }
    if events.is_empty() {
        return Ok(());
    }
    let rows: Vec<Value> = events
        .iter()
        .map(|ev| {
            serde_json::json!([
                ev.seq,
                ev.time,
                ev.actor,
                ev.request_id,
                ev.resource_type,
                ev.resource_id,
                ev.operation,
                ev.outcome,
                ev.status,
                ev.detail,
                ev.prev_hash,
                ev.hash
            ])
        })
        .collect();
    sqlx::query(
        "INSERT INTO audit_events (seq, time, actor, request_id, resource_type, resource_id, operation, \
         outcome, status, detail, prev_hash, hash) \
         SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>6, \
         value->>7, value->>8, value->>9, value->>10, value->>11 FROM json_each(?) ORDER BY key",
    )
    .bind(Value::Array(rows).to_string())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Appends the audit event (and the outbox row) inside `tx`.
async fn record(
    tx: &mut Tx,
    ctx: &WriteCtx,
    now: OffsetDateTime,
    r: Record<'_>,
) -> StoreResult<i64> {
    let ev = append_event(tx, ctx, now, r.event()).await?;
    if let Some((entity_type, op, detail)) = r.outbox {
        sqlx::query(
            "INSERT INTO outbox (entity_type, entity_id, operation, detail, audit_seq, created, next_attempt_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(entity_type)
        .bind(r.resource_id)
        .bind(op)
        .bind(detail.to_string())
        .bind(ev.seq)
        .bind(&ev.time)
        .bind(&ev.time)
        .execute(&mut **tx)
        .await?;
    }
    Ok(ev.seq)
}

/// Resolves a member's type, checking that it exists.
async fn resolve_member(tx: &mut Tx, group_id: &str, m: &NewMember) -> StoreResult<MemberType> {
    for t in common::member_candidates(m.ty) {
        if t == MemberType::Group && m.value == group_id {
            return Err(common::self_member_error());
        }
        let sql = match t {
            MemberType::User => "SELECT 1 FROM users WHERE id = ?",
            MemberType::Group => "SELECT 1 FROM groups WHERE id = ?",
        };
        if sqlx::query(sql)
            .bind(&m.value)
            .fetch_optional(&mut **tx)
            .await?
            .is_some()
        {
            return Ok(t);
        }
    }
    Err(common::missing_member_error(&m.value))
}

/// Applies one membership change; returns the ids added and removed.
async fn apply_members(
    tx: &mut Tx,
    group_id: &str,
    change: &MembershipChange,
    added: &mut Vec<String>,
    removed: &mut Vec<String>,
) -> StoreResult<()> {
    match change {
        MembershipChange::Add(list) => add_members(tx, group_id, list, added).await?,
        MembershipChange::Remove(ids) => {
            for id in ids {
                let r =
                    sqlx::query("DELETE FROM group_members WHERE group_id = ? AND member_id = ?")
                        .bind(group_id)
                        .bind(id)
                        .execute(&mut **tx)
                        .await?;
                if r.rows_affected() > 0 {
                    removed.push(id.clone());
                }
            }
        }
        MembershipChange::RemoveAll | MembershipChange::ReplaceAll(_) => {
            let keep: Vec<&str> = match change {
                MembershipChange::ReplaceAll(list) => {
                    list.iter().map(|m| m.value.as_str()).collect()
                }
                _ => vec![],
            };
            let current: Vec<(String,)> =
                sqlx::query_as("SELECT member_id FROM group_members WHERE group_id = ?")
                    .bind(group_id)
                    .fetch_all(&mut **tx)
                    .await?;
            for (id,) in current {
                if !keep.contains(&id.as_str()) {
                    sqlx::query("DELETE FROM group_members WHERE group_id = ? AND member_id = ?")
                        .bind(group_id)
                        .bind(&id)
                        .execute(&mut **tx)
                        .await?;
                    removed.push(id);
                }
            }
            if let MembershipChange::ReplaceAll(list) = change {
                add_members(tx, group_id, list, added).await?;
            }
        }
    }
    Ok(())
}

async fn add_members(
    tx: &mut Tx,
    group_id: &str,
    list: &[NewMember],
    added: &mut Vec<String>,
) -> StoreResult<()> {
    for m in list {
        let ty = resolve_member(tx, group_id, m).await?;
        let r = sqlx::query(
            "INSERT OR IGNORE INTO group_members (group_id, member_id, member_type, display) VALUES (?, ?, ?, ?)",
        )
        .bind(group_id)
        .bind(&m.value)
        .bind(ty.as_str())
        .bind(&m.display)
            .execute(&mut **tx)
            .await?;
        if r.rows_affected() > 0 {
            added.push(m.value.clone());
        }
    }
    Ok(())
}

fn row_to_resource(
    kind: ResourceKind,
    row: &sqlx::sqlite::SqliteRow,
    with_groups: bool,
) -> StoreResult<Resource> {
    let groups = if with_groups {
        Some(common::groups_from_json(row.try_get("groups_json")?)?)
    } else {
        None
    };
    common::resource(
        kind,
        row.try_get("id")?,
        row.try_get("data")?,
        row.try_get("created")?,
        row.try_get("last_modified")?,
        row.try_get("version")?,
        groups,
    )
}

async fn load_members<'e, E>(exec: E, group_id: &str) -> StoreResult<Vec<MemberRef>>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT m.member_id, m.member_type, m.display FROM group_members m \
         WHERE m.group_id = ? ORDER BY m.member_id",
    )
    .bind(group_id)
    .fetch_all(exec)
    .await?;
    Ok(common::member_refs(rows))
}

fn select_sql(kind: ResourceKind, read: ReadOpts) -> String {
    let groups = if kind == ResourceKind::User && read.groups {
        format!(", {GROUPS_OF_USER} AS groups_json")
    } else {
        String::new()
    };
    format!("SELECT {USER_COLS}{groups} FROM {} t", table(kind))
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments> {
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s.as_str()),
            Bind::Int(i) => q.bind(*i),
        };
    }
    q
}

impl SqliteStore {
    /// Moves the resource generation on; called after every committed resource write.
    fn written(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    async fn list_uncached(&self, kind: ResourceKind, q: &ListQuery) -> StoreResult<ListPage> {
        let plan = common::list_plan(kind, q, Dialect::Sqlite);
        let (where_sql, binds, read) = (&plan.where_sql, &plan.binds[..], plan.read);
        if let Some(col) = plan.sql_sort {
            // One connection for the page and the count: each pool checkout costs a round
            // trip to the connection's worker thread (sqlx pings it on release).
            let mut conn = self.read.acquire().await?;
            let mut resources = Vec::new();
            let mut total = None;
            if q.count > 0 {
                let dir = if q.descending { "DESC" } else { "ASC" };
                // LIMIT and OFFSET are literals, not parameters: SQLite (3.4x+) re-prepares a
                // statement whenever a parameter its LIMIT reads is bound again — a full parse
                // and plan on every execution. (Integers we computed: nothing to inject.)
                let sql = format!(
                    "{}{where_sql} ORDER BY {col} {dir}, t.seq {dir} LIMIT {} OFFSET {}",
                    select_sql(kind, read),
                    q.count,
                    q.offset
                );
                let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
                    .fetch_all(&mut *conn)
                    .await?;
                // A short page that is not past the end is the end: it gives the total (the
                // `userName eq` lookup every IdP sends then costs one query, not two).
                total = common::total_from_page(q, rows.len());
                for row in &rows {
                    let mut r = row_to_resource(kind, row, read.groups)?;
                    if read.members {
                        r.members = Some(load_members(&mut *conn, &r.id).await?);
                    }
                    resources.push(r);
                }
            }
            let total = match total {
                Some(t) => t,
                None => {
                    let count_sql = format!("SELECT COUNT(*) FROM {} t{where_sql}", table(kind));
                    let n: i64 = bind_all(sqlx::query(AssertSqlSafe(count_sql)), binds)
                        .fetch_one(&mut *conn)
                        .await?
                        .try_get(0)?;
                    n as usize
                }
            };
            return Ok(ListPage {
                total,
                resources: resources.into(),
            });
        }
        // Inexact filter or a sort without a column: complete in memory over the candidates.
        let sql = format!("{}{where_sql} ORDER BY t.seq", select_sql(kind, read));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
            .fetch_all(&self.read)
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = row_to_resource(kind, row, read.groups)?;
            if read.members {
                r.members = Some(load_members(&self.read, &r.id).await?);
            }
            candidates.push(r);
        }
        Ok(common::complete_in_memory(kind, q, candidates))
    }

    async fn read_one_tx(
        &self,
        tx: &mut Tx,
        kind: ResourceKind,
        id: &str,
        read: ReadOpts,
    ) -> StoreResult<Resource> {
        let sql = format!("{} WHERE t.id = ?", select_sql(kind, read));
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        let row = row.ok_or(StoreError::NotFound)?;
        let mut r = row_to_resource(kind, &row, kind == ResourceKind::User && read.groups)?;
        if kind == ResourceKind::Group && read.members {
            r.members = Some(load_members(&mut **tx, id).await?);
        }
        Ok(r)
    }

    async fn current_version(tx: &mut Tx, kind: ResourceKind, id: &str) -> StoreResult<i64> {
        let sql = format!("SELECT version FROM {} WHERE id = ?", table(kind));
        let v: Option<(i64,)> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        v.map(|(v,)| v).ok_or(StoreError::NotFound)
    }

    async fn write_attrs(
        tx: &mut Tx,
        kind: ResourceKind,
        id: &str,
        attrs: &Value,
        now: &str,
        version: i64,
    ) -> StoreResult<()> {
        let ix = indexed(kind, attrs)?;
        let data = attrs.to_string();
        match kind {
            ResourceKind::User => {
                sqlx::query(
                    "UPDATE users SET user_name = ?, user_name_ci = ?, external_id = ?, active = ?, \
                     last_modified = ?, version = ?, data = ? WHERE id = ?",
                )
                .bind(&ix.name)
                .bind(&ix.name_ci)
                .bind(&ix.external_id)
                .bind(ix.active)
                .bind(now)
                .bind(version)
                .bind(&data)
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(|e| common::name_taken(kind, e))?;
            }
            ResourceKind::Group => {
                sqlx::query(
                    "UPDATE groups SET display_name = ?, display_name_ci = ?, external_id = ?, \
                     last_modified = ?, version = ?, data = ? WHERE id = ?",
                )
                .bind(&ix.name)
                .bind(&ix.name_ci)
                .bind(&ix.external_id)
                .bind(now)
                .bind(version)
                .bind(&data)
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(|e| common::name_taken(kind, e))?;
            }
        }
        Ok(())
    }

    async fn touch(
        tx: &mut Tx,
        kind: ResourceKind,
        id: &str,
        now: &str,
        version: i64,
    ) -> StoreResult<()> {
        let sql = format!(
            "UPDATE {} SET last_modified = ?, version = ? WHERE id = ?",
            table(kind)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(version)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
