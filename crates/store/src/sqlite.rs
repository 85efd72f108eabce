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
    self, NewEvent, Record, TokenRow, chain_event, entity, indexed, table, token_row,
};
use crate::sql_filter::{Bind, Dialect};
use crate::{
    BatchOp, Clock, ListPage, ListQuery, MemberRef, MemberType, MembershipChange, NewMember,
    OutboxItem, ReadOpts, Resource, Store, StoreError, StoreResult, TokenRecord, TokenScope,
    WriteCtx, timefmt,
};

mod audit_log;
mod copy;
mod group_commit;
use crate::group_commit as gc;
mod lease;
mod sync;

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
    writer: Option<tokio::sync::mpsc::Sender<gc::Job>>,
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
        let op = gc::Op::Update {
            kind,
            id: id.to_owned(),
            expected: expected_version,
            attrs,
            members: members.to_vec(),
        };
        gc::write(self, self.writer.as_ref(), ctx, op)
            .await?
            .ok_or(StoreError::NotFound)
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
        store.writer = Some(gc::spawn(store.clone()));
        Ok(store)
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
            "INSERT INTO outbox (entity_type, entity_id, operation, detail, audit_seq, created, next_attempt_at, \
             linked) VALUES ($1, $2, $3, $4, $5, $6, $7, \
             CASE WHEN EXISTS (SELECT 1 FROM mappings WHERE kind = $1 AND scim_id = $2) THEN 1 ELSE 0 END)",
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

#[async_trait]
impl Store for SqliteStore {
    async fn create(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource> {
        let op = gc::Op::Create {
            kind,
            id: uuid::Uuid::new_v4().to_string(),
            attrs,
            members,
        };
        gc::write(self, self.writer.as_ref(), ctx, op)
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn replace(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource> {
        let op = gc::Op::Replace {
            kind,
            id: id.to_owned(),
            expected: expected_version,
            attrs,
            members,
        };
        gc::write(self, self.writer.as_ref(), ctx, op)
            .await?
            .ok_or(StoreError::NotFound)
    }

    async fn update(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: i64,
        attrs: Option<Value>,
        members: &[MembershipChange],
    ) -> StoreResult<Resource> {
        self.update_at(ctx, kind, id, Some(expected_version), attrs, members)
            .await
    }

    async fn update_members(
        &self,
        ctx: &WriteCtx,
        id: &str,
        members: &[MembershipChange],
    ) -> StoreResult<Resource> {
        self.update_at(ctx, ResourceKind::Group, id, None, None, members)
            .await
    }

    async fn delete(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()> {
        let op = gc::Op::Delete {
            kind,
            id: id.to_owned(),
            expected: expected_version,
        };
        gc::write(self, self.writer.as_ref(), ctx, op)
            .await
            .map(|_| ())
    }

    async fn write_batch(
        &self,
        ctx: &WriteCtx,
        ops: &[BatchOp],
        state: Option<(&str, &str)>,
    ) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        for op in ops {
            match op {
                BatchOp::Create {
                    kind,
                    id,
                    attrs,
                    members,
                } => {
                    Self::create_in(&mut tx, ctx, now, *kind, id, attrs, members.as_deref()).await?
                }
                BatchOp::Replace { kind, id, attrs } => {
                    Self::replace_in(&mut tx, ctx, now, *kind, id, None, attrs, None).await?
                }
                BatchOp::Members { id, changes } => Self::update_in(
                    &mut tx,
                    ctx,
                    now,
                    ResourceKind::Group,
                    id,
                    None,
                    None,
                    changes,
                )
                .await
                .map(|_| ())?,
                BatchOp::Delete { kind, id } => {
                    Self::delete_in(&mut tx, ctx, now, *kind, id, None).await?
                }
                BatchOp::Audit(entry) => sync::append_audit(&mut tx, ctx, now, entry)
                    .await
                    .map(|_| ())?,
            }
        }
        if let Some((key, value)) = state {
            sqlx::query(
                "INSERT INTO sync_state (key, value) VALUES (?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.written();
        Ok(())
    }

    async fn get(
        &self,
        kind: ResourceKind,
        id: &str,
        read: ReadOpts,
    ) -> StoreResult<Option<Resource>> {
        let sql = format!("{} WHERE t.id = ?", select_sql(kind, read));
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.read)
            .await?
        else {
            return Ok(None);
        };
        let mut r = row_to_resource(kind, &row, kind == ResourceKind::User && read.groups)?;
        if kind == ResourceKind::Group && read.members {
            r.members = Some(load_members(&self.read, id).await?);
        }
        Ok(Some(r))
    }

    async fn member_count(&self, group_id: &str) -> StoreResult<usize> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM group_members WHERE group_id = ?")
            .bind(group_id)
            .fetch_one(&self.read)
            .await?;
        Ok(n as usize)
    }

    async fn member_count_exceeds(&self, group_id: &str, n: usize) -> StoreResult<bool> {
        // Counts at most n + 1 rows (a literal LIMIT: see `list`).
        let sql = format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM group_members WHERE group_id = ? LIMIT {})",
            n.saturating_add(1)
        );
        let (c,): (i64,) = sqlx::query_as(AssertSqlSafe(sql))
            .bind(group_id)
            .fetch_one(&self.read)
            .await?;
        Ok(c as usize > n)
    }

    async fn list(&self, kind: ResourceKind, q: &ListQuery) -> StoreResult<ListPage> {
        self.list_uncached(kind, q).await
    }

    async fn resource_generation(&self) -> StoreResult<Option<u64>> {
        Ok(Some(
            self.generation.load(std::sync::atomic::Ordering::Acquire),
        ))
    }

    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<Option<crate::Lease>> {
        self.lease_acquire(name, holder, ttl).await
    }

    async fn renew_lease(
        &self,
        fence: &crate::Fence,
        ttl: std::time::Duration,
    ) -> StoreResult<crate::Lease> {
        self.lease_renew(fence, ttl).await
    }

    async fn release_lease(&self, fence: &crate::Fence) -> StoreResult<()> {
        self.lease_release(fence).await
    }

    fn fenced(&self, fence: crate::Fence) -> crate::DynStore {
        self.with_fence(fence)
    }

    async fn create_scoped_token(
        &self,
        ctx: &WriteCtx,
        scope: TokenScope,
        name: &str,
        hash: [u8; 32],
        expires: Option<OffsetDateTime>,
    ) -> StoreResult<TokenRecord> {
        let now = self.now();
        let id = common::new_token_id();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, hash, created, expires, scope) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(name)
        .bind(&hash[..])
        .bind(timefmt::format(now))
        .bind(expires.map(timefmt::format))
        .bind(scope.as_str())
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            ctx,
            now,
            Record {
                resource_type: "Token",
                resource_id: &id,
                operation: "token.create",
                status: 201,
                detail: json!({"name": name, "scope": scope.as_str(), "expires": expires.map(timefmt::format)}),
                outbox: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(TokenRecord {
            id,
            scope,
            name: name.to_owned(),
            created: now,
            expires,
            revoked: None,
        })
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> = sqlx::query_as(
            "SELECT id, name, created, expires, revoked, scope FROM api_tokens ORDER BY created DESC, id",
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(token_row).collect()
    }

    async fn revoke_token(&self, ctx: &WriteCtx, id: &str) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let r = sqlx::query("UPDATE api_tokens SET revoked = ? WHERE id = ? AND revoked IS NULL")
            .bind(timefmt::format(now))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        record(
            &mut tx,
            ctx,
            now,
            Record {
                resource_type: "Token",
                resource_id: id,
                operation: "token.revoke",
                status: 200,
                detail: json!({}),
                outbox: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn valid_token_hashes(&self) -> StoreResult<Vec<([u8; 32], TokenRecord)>> {
        let rows: Vec<(Vec<u8>, String, String, String, Option<String>, Option<String>, String)> =
            sqlx::query_as(
                "SELECT hash, id, name, created, expires, revoked, scope FROM api_tokens WHERE revoked IS NULL",
            )
            .fetch_all(&self.read)
            .await?;
        let now = self.now();
        let mut out = Vec::new();
        for (hash, id, name, created, expires, revoked, scope) in rows {
            let rec = token_row((id, name, created, expires, revoked, scope))?;
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            if rec.is_valid_at(now) {
                out.push((hash, rec));
            }
        }
        Ok(out)
    }

    async fn audit_events(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEvent>> {
        self.audit_range(None, None, after, limit).await
    }

    async fn audit_recent(&self, before: Option<i64>, limit: i64) -> StoreResult<Vec<AuditEvent>> {
        self.audit_log_recent(before, limit).await
    }

    async fn audit_range(
        &self,
        since: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEvent>> {
        self.audit_log_range(since, until, after, limit).await
    }

    async fn audit_checkpoint(&self) -> StoreResult<Option<crate::Checkpoint>> {
        self.audit_log_checkpoint().await
    }

    async fn prune_audit(
        &self,
        ctx: &WriteCtx,
        before: OffsetDateTime,
        key: &[u8],
    ) -> StoreResult<Option<crate::Checkpoint>> {
        self.audit_log_prune(ctx, before, key).await
    }

    async fn copy_count(&self, table: &crate::copy::CopyTable) -> StoreResult<i64> {
        self.copy_count_rows(table).await
    }

    async fn copy_out(
        &self,
        table: &crate::copy::CopyTable,
        offset: i64,
        limit: i64,
    ) -> StoreResult<crate::copy::Rows> {
        self.copy_rows_out(table, offset, limit).await
    }

    async fn copy_in(
        &self,
        table: &crate::copy::CopyTable,
        rows: &crate::copy::Rows,
    ) -> StoreResult<()> {
        self.copy_rows_in(table, rows).await
    }

    async fn copy_finish(&self) -> StoreResult<()> {
        // AUTOINCREMENT keeps its counters in sqlite_sequence, which explicit ids move on; the
        // next audit seq is read from the trail itself.
        self.written();
        Ok(())
    }

    async fn outbox_items(&self, after: i64, limit: i64) -> StoreResult<Vec<OutboxItem>> {
        let rows = sqlx::query(
            "SELECT id, entity_type, entity_id, operation, detail, audit_seq, state, attempts \
             FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxItem {
                    id: r.try_get("id")?,
                    entity_type: r.try_get("entity_type")?,
                    entity_id: r.try_get("entity_id")?,
                    operation: r.try_get("operation")?,
                    detail: r.try_get("detail")?,
                    audit_seq: r.try_get("audit_seq")?,
                    state: r.try_get("state")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect()
    }

    // ----- Sync bookkeeping: implemented in `sqlite/sync.rs`. -----

    async fn claim_outbox(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.sync_claim_outbox(worker, now, lease, limit, common::ClaimOrder::Oldest)
            .await
    }

    async fn claim_outbox_linked(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.sync_claim_outbox(worker, now, lease, limit, common::ClaimOrder::Linked)
            .await
    }

    async fn claim_outbox_newest(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.sync_claim_outbox(worker, now, lease, limit, common::ClaimOrder::Newest)
            .await
    }

    async fn renew_outbox_leases(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
    ) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE outbox SET lease_until = $1 \
             WHERE state = 'pending' AND leased_by = $2 AND lease_until > $3",
        )
        .bind(timefmt::format(now + lease))
        .bind(worker)
        .bind(timefmt::format(now))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        tx.commit().await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn complete_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        events: Vec<crate::AuditEntry>,
    ) -> StoreResult<()> {
        self.sync_complete_outbox(ctx, ids, events).await
    }

    async fn fail_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        error: &str,
        transient: bool,
        now: OffsetDateTime,
        policy: &crate::RetryPolicy,
    ) -> StoreResult<Vec<crate::FailedItem>> {
        self.sync_fail_outbox(ctx, ids, error, transient, now, policy)
            .await
    }

    async fn defer_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        reason: &str,
        until: OffsetDateTime,
    ) -> StoreResult<usize> {
        self.sync_defer_outbox(ctx, ids, reason, until).await
    }

    async fn outbox_summary(&self) -> StoreResult<crate::OutboxSummary> {
        self.sync_outbox_summary().await
    }

    async fn deleted_entities(&self) -> StoreResult<Vec<(String, String)>> {
        self.sync_deleted_entities().await
    }

    async fn hold_outbox(&self, ctx: &WriteCtx, ids: &[i64], batch_id: i64) -> StoreResult<()> {
        self.sync_hold_outbox(ctx, ids, batch_id).await
    }

    async fn list_outbox(
        &self,
        state: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<crate::OutboxEntry>> {
        self.sync_list_outbox(state, limit).await
    }

    async fn retry_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::OutboxEntry> {
        self.sync_retry_outbox(ctx, id).await
    }

    async fn drop_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::OutboxEntry> {
        self.sync_drop_outbox(ctx, id).await
    }

    async fn upsert_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
        teamcity_id: &str,
        teamcity_name: &str,
    ) -> StoreResult<bool> {
        self.sync_upsert_mapping(ctx, kind, scim_id, teamcity_id, teamcity_name)
            .await
    }

    async fn upsert_mappings(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        items: &[(String, String, String)],
    ) -> StoreResult<usize> {
        self.sync_upsert_mappings(ctx, kind, items).await
    }

    async fn delete_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
    ) -> StoreResult<bool> {
        self.sync_delete_mapping(ctx, kind, scim_id).await
    }

    async fn record_applied(
        &self,
        ctx: &WriteCtx,
        entries: &[crate::AuditEntry],
        links: &[crate::MappingLink],
    ) -> StoreResult<()> {
        self.sync_record_applied(ctx, entries, links).await
    }

    async fn mappings(&self, kind: ResourceKind) -> StoreResult<Vec<crate::Mapping>> {
        self.sync_mappings(kind, None).await
    }

    async fn mapping(
        &self,
        kind: ResourceKind,
        scim_id: &str,
    ) -> StoreResult<Option<crate::Mapping>> {
        Ok(self.sync_mappings(kind, Some(scim_id)).await?.pop())
    }

    async fn create_held(
        &self,
        ctx: &WriteCtx,
        source: &str,
        outbox_ids: &[i64],
        summary: &str,
        removals: i64,
        plan: &Value,
    ) -> StoreResult<i64> {
        self.sync_create_held(ctx, source, outbox_ids, summary, removals, plan)
            .await
    }

    async fn list_held(&self, state: Option<&str>) -> StoreResult<Vec<crate::HeldBatch>> {
        self.sync_list_held(state).await
    }

    async fn held_batch(&self, id: i64) -> StoreResult<Option<crate::HeldBatch>> {
        self.sync_held_batch(id).await
    }

    async fn approve_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::HeldBatch> {
        self.sync_approve_held(ctx, id).await
    }

    async fn mark_held_applied(&self, ctx: &WriteCtx, id: i64) -> StoreResult<()> {
        self.sync_mark_held_applied(ctx, id).await
    }

    async fn drop_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::HeldBatch> {
        self.sync_drop_held(ctx, id).await
    }

    async fn pins(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.sync_pins().await
    }

    async fn set_pin(&self, ctx: &WriteCtx, rule: &str, group_id: &str) -> StoreResult<()> {
        self.sync_set_pin(ctx, rule, group_id).await
    }

    async fn sync_state_get(&self, key: &str) -> StoreResult<Option<String>> {
        self.sync_state_read(key).await
    }

    async fn sync_state_set(&self, key: &str, value: &str) -> StoreResult<()> {
        self.sync_state_write(key, value).await
    }

    async fn sync_state_increment(&self, key: &str) -> StoreResult<i64> {
        self.sync_state_increment(key).await
    }

    async fn directory(&self) -> StoreResult<crate::DirectorySnapshot> {
        self.sync_directory().await
    }

    async fn directory_of(
        &self,
        users: &[String],
        groups: &[String],
    ) -> StoreResult<crate::DirectorySnapshot> {
        self.sync_directory_of(users, groups).await
    }

    async fn audit(&self, ctx: &WriteCtx, entry: crate::AuditEntry) -> StoreResult<i64> {
        self.sync_audit(ctx, entry).await
    }
}
