//! The PostgreSQL backend: a connection pool shared by any number of processes.
//!
//! Audited writes append to one chain through the one row of `audit_head` (`SELECT … FOR
//! UPDATE`), which holds the chain's last seq and hash: writers from every process append with
//! gap-free seq in commit order. The SCIM resource commands take that lock only for their
//! append, at their end; before it, what SQLite gets from its single writer holds through row
//! locks and indexes (`FOR UPDATE` on a resource read then written, `FOR SHARE` on a member
//! being added, unique indexes for names). Other audited writes lock the head first. Outbox claims
//! (not audited) skip rows another transaction holds (`FOR UPDATE SKIP LOCKED`) and are
//! serialised with each other by a transaction-scoped advisory lock, so no entity is ever
//! leased to two workers. Timestamps and JSON are TEXT exactly as in SQLite (see the schema).
//!
//! Nothing here is SQLite-specific logic: the backend-neutral parts live in `common`.

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use scim::schema::ResourceKind;
use serde_json::{Value, json};
use sqlx::postgres::{PgArguments, PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, PgPool, Postgres, Row, Transaction};
use time::OffsetDateTime;

use crate::audit::AuditEvent;
use crate::common::{
    self, Indexed, NewEvent, Record, TokenRow, chain_event, entity, indexed, read_back, table,
    token_row,
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
mod held;
mod lease;
mod mappings;
mod outbox;
mod resources;
mod sync;
mod sync_state;
mod tokens;

/// The channel a transaction that inserts an outbox row notifies (`LISTEN` on it to wake up).
pub const OUTBOX_CHANNEL: &str = "teamcity_scim_outbox";

/// The default pool size (override with `?max_connections=N` in the URL).
pub const DEFAULT_MAX_CONNECTIONS: u32 = 10;

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    /// Set on a [`Store::fenced`] view: every write transaction checks them first.
    fences: Vec<Arc<crate::Fence>>,
}

type Tx = Transaction<'static, Postgres>;

const USER_COLS: &str = "t.id, t.created, t.last_modified, t.version, t.data";
const GROUPS_OF_USER: &str = "(SELECT json_agg(json_build_object('value', g.id, 'display', g.display_name) \
     ORDER BY g.id)::text FROM group_members m JOIN groups g ON g.id = m.group_id WHERE m.member_id = t.id)";

/// `url` with the password (userinfo or `password=` parameter) replaced, for messages.
pub fn redact_url(url: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((creds, host)) => match creds.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                None => head.to_owned(),
            },
            None => head.to_owned(),
        },
        None => head.to_owned(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=<redacted>"),
                _ => p.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Splits our own `max_connections` parameter off `url` (the driver rejects what it does not
/// know). Returns the URL for the driver and the pool size.
fn pool_size(url: &str) -> StoreResult<(String, u32)> {
    let Some((head, q)) = url.split_once('?') else {
        return Ok((url.to_owned(), DEFAULT_MAX_CONNECTIONS));
    };
    let mut size = DEFAULT_MAX_CONNECTIONS;
    let mut rest = Vec::new();
    for p in q.split('&').filter(|p| !p.is_empty()) {
        match p.split_once('=') {
            Some(("max_connections", v)) => {
                size = v.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    StoreError::Invalid(format!(
                        "max_connections in the database URL must be a positive integer, not `{v}`"
                    ))
                })?;
            }
            _ => rest.push(p),
        }
    }
    let url = if rest.is_empty() {
        head.to_owned()
    } else {
        format!("{head}?{}", rest.join("&"))
    };
    Ok((url, size))
}

impl PostgresStore {
    /// Connects to the database at `url` (`postgres://…` / `postgresql://…`, optionally with
    /// `max_connections=N`) and runs the migrations.
    pub async fn open(url: &str, clock: Arc<dyn Clock>) -> StoreResult<Self> {
        let shown = redact_url(url);
        let (driver_url, size) = pool_size(url)?;
        let opts = PgConnectOptions::from_str(&driver_url)
            .map_err(|e| StoreError::Invalid(format!("invalid PostgreSQL URL `{shown}`: {e}")))?
            // The migrator's "already exists, skipping" notices are not news.
            .options([("client_min_messages", "warning")]);
        let pool = PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await
            .map_err(|e| {
                StoreError::Other(format!("cannot connect to PostgreSQL at `{shown}`: {e}").into())
            })?;
        sqlx::migrate!("./migrations/postgres")
            .run(&pool)
            .await
            .map_err(|e| {
                StoreError::Other(
                    format!("cannot migrate the PostgreSQL database at `{shown}`: {e}").into(),
                )
            })?;
        Ok(PostgresStore {
            pool,
            clock,
            fences: Vec::new(),
        })
    }

    /// A transaction for writes that are not audited (outbox claims, sync state).
    async fn begin(&self) -> StoreResult<Tx> {
        let mut tx = self.pool.begin().await?;
        self.check_fence(&mut tx).await?;
        Ok(tx)
    }

    /// On a fenced view, fails unless the fence still holds (inside `tx`).
    async fn check_fence(&self, tx: &mut Tx) -> StoreResult<()> {
        for f in &self.fences {
            lease::check(tx, f, &timefmt::format(self.now())).await?;
        }
        Ok(())
    }

    /// A transaction for an audited write: the chain head is locked first, so audited writes
    /// run one after another (as on SQLite) and their events form one chain.
    async fn begin_write(&self) -> StoreResult<Tx> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut *tx)
            .await?;
        self.check_fence(&mut tx).await?;
        Ok(tx)
    }

    /// A transaction for one SCIM resource command (create, replace, update, delete): it locks
    /// the rows it reads before writing them (`FOR UPDATE` on the resource, `FOR SHARE` on
    /// members it adds; uniqueness is the indexes'), and takes the chain head's lock only when it
    /// appends its one audit event, at its end — so concurrent commands overlap until then, and
    /// the head is always the last lock taken (no deadlock through it).
    async fn begin_resource_write(&self) -> StoreResult<Tx> {
        self.begin().await
    }

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }
}

/// The chain head (locked: see [`PostgresStore::begin_write`]).
async fn chain_head(tx: &mut Tx) -> StoreResult<(i64, String)> {
    Ok(
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
            .fetch_one(&mut **tx)
            .await?,
    )
}

/// Appends one audit event inside `tx`, chained to the head.
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

/// Inserts chained events (one statement, arrays unnested) and moves the head to the last.
async fn insert_events(tx: &mut Tx, events: &[AuditEvent]) -> StoreResult<()> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    let col = |f: fn(&AuditEvent) -> String| events.iter().map(f).collect::<Vec<String>>();
    let opt = |f: fn(&AuditEvent) -> Option<String>| {
        events.iter().map(f).collect::<Vec<Option<String>>>()
    };
    sqlx::query(
        "INSERT INTO audit_events (seq, time, actor, request_id, resource_type, resource_id, operation, \
         outcome, status, detail, prev_hash, hash) \
         SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], \
         $7::text[], $8::text[], $9::bigint[], $10::text[], $11::text[], $12::text[])",
    )
    .bind(events.iter().map(|e| e.seq).collect::<Vec<i64>>())
    .bind(col(|e| e.time.clone()))
    .bind(col(|e| e.actor.clone()))
    .bind(opt(|e| e.request_id.clone()))
    .bind(col(|e| e.resource_type.clone()))
    .bind(opt(|e| e.resource_id.clone()))
    .bind(col(|e| e.operation.clone()))
    .bind(col(|e| e.outcome.clone()))
    .bind(events.iter().map(|e| e.status).collect::<Vec<Option<i64>>>())
    .bind(col(|e| e.detail.clone()))
    .bind(col(|e| e.prev_hash.clone()))
    .bind(col(|e| e.hash.clone()))
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(last.seq)
        .bind(&last.hash)
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
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
        // A SCIM resource changed: every replica's lookup cache must see it (the head row is
        // locked by this transaction already), and every replica's worker may wake up now
        // (delivered on commit, once per transaction).
        sqlx::query("UPDATE audit_head SET resource_gen = resource_gen + 1 WHERE id = 1")
            .execute(&mut **tx)
            .await?;
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(OUTBOX_CHANNEL)
            .execute(&mut **tx)
            .await?;
    }
    Ok(ev.seq)
}

/// A unique violation on a name column is the uniqueness conflict (a second line of defence:
/// [`check_unique`] runs first under the head lock).
fn map_unique(kind: ResourceKind, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() => common::name_conflict(kind),
        _ => e.into(),
    }
}

async fn check_unique(
    tx: &mut Tx,
    kind: ResourceKind,
    ix: &Indexed,
    except_id: Option<&str>,
) -> StoreResult<()> {
    let sql = match kind {
        ResourceKind::User => "SELECT id FROM users WHERE user_name_ci = $1",
        ResourceKind::Group => "SELECT id FROM groups WHERE display_name_ci = $1",
    };
    let found: Option<(String,)> = sqlx::query_as(sql)
        .bind(&ix.name_ci)
        .fetch_optional(&mut **tx)
        .await?;
    match found {
        Some((id,)) if Some(id.as_str()) != except_id => Err(common::name_conflict(kind)),
        _ => Ok(()),
    }
}

/// Resolves a member's type, checking that it exists.
async fn resolve_member(tx: &mut Tx, group_id: &str, m: &NewMember) -> StoreResult<MemberType> {
    for t in common::member_candidates(m.ty) {
        if t == MemberType::Group && m.value == group_id {
            return Err(common::self_member_error());
        }
        // Share-locked until commit: a concurrent delete of the member waits for this
        // transaction (and then removes the membership it added), never the other way round.
        let sql = match t {
            MemberType::User => "SELECT 1 FROM users WHERE id = $1 FOR SHARE",
            MemberType::Group => "SELECT 1 FROM groups WHERE id = $1 FOR SHARE",
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
                    sqlx::query("DELETE FROM group_members WHERE group_id = $1 AND member_id = $2")
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
            // The order SQLite returns them in (its primary key order).
            let current: Vec<(String,)> = sqlx::query_as(
                "SELECT member_id FROM group_members WHERE group_id = $1 ORDER BY member_id",
            )
            .bind(group_id)
            .fetch_all(&mut **tx)
            .await?;
            for (id,) in current {
                if !keep.contains(&id.as_str()) {
                    sqlx::query("DELETE FROM group_members WHERE group_id = $1 AND member_id = $2")
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
            "INSERT INTO group_members (group_id, member_id, member_type, display) \
             VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
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

fn row_to_resource(kind: ResourceKind, row: &PgRow, with_groups: bool) -> StoreResult<Resource> {
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
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT m.member_id, m.member_type, m.display FROM group_members m \
         WHERE m.group_id = $1 ORDER BY m.member_id",
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
    mut q: sqlx::query::Query<'q, Postgres, PgArguments>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s.as_str()),
            Bind::Int(i) => q.bind(*i),
        };
    }
    q
}

impl PostgresStore {
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
        let mut tx = self.begin_resource_write().await?;
        update_in(
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
        let r = read_one_tx(&mut tx, kind, id, read_back(kind)).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn list_query(&self, kind: ResourceKind, q: &ListQuery) -> StoreResult<ListPage> {
        let plan = common::list_plan(kind, q, Dialect::Postgres);
        let (where_sql, binds, read) = (&plan.where_sql, &plan.binds[..], plan.read);
        if let Some(col) = plan.sql_sort {
            let mut conn = self.pool.acquire().await?;
            let mut resources = Vec::new();
            let mut total = None;
            if q.count > 0 {
                let dir = if q.descending { "DESC" } else { "ASC" };
                // Integers we computed: nothing to inject.
                let sql = format!(
                    "{}{where_sql} ORDER BY {col} {dir}, t.seq {dir} LIMIT {} OFFSET {}",
                    select_sql(kind, read),
                    q.count,
                    q.offset
                );
                let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
                    .fetch_all(&mut *conn)
                    .await?;
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
                    usize::try_from(n).unwrap_or(0)
                }
            };
            return Ok(ListPage {
                total,
                resources: resources.into(),
            });
        }
        // Inexact filter or a sort without a column: complete in memory over the candidates,
        // read in one snapshot.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let sql = format!("{}{where_sql} ORDER BY t.seq", select_sql(kind, read));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
            .fetch_all(&mut *tx)
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = row_to_resource(kind, row, read.groups)?;
            if read.members {
                r.members = Some(load_members(&mut *tx, &r.id).await?);
            }
            candidates.push(r);
        }
        tx.rollback().await?;
        Ok(common::complete_in_memory(kind, q, candidates))
    }
}

async fn read_one_tx(
    tx: &mut Tx,
    kind: ResourceKind,
    id: &str,
    read: ReadOpts,
) -> StoreResult<Resource> {
    let sql = format!("{} WHERE t.id = $1", select_sql(kind, read));
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

/// The resource's version, its row locked until the transaction ends.
async fn current_version(tx: &mut Tx, kind: ResourceKind, id: &str) -> StoreResult<i64> {
    let sql = format!(
        "SELECT version FROM {} WHERE id = $1 FOR UPDATE",
        table(kind)
    );
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
    check_unique(tx, kind, &ix, Some(id)).await?;
    let data = attrs.to_string();
    let q = match kind {
        ResourceKind::User => sqlx::query(
            "UPDATE users SET user_name = $1, user_name_ci = $2, external_id = $3, active = $4, \
             last_modified = $5, version = $6, data = $7 WHERE id = $8",
        )
        .bind(&ix.name)
        .bind(&ix.name_ci)
        .bind(&ix.external_id)
        .bind(i64::from(ix.active)),
        ResourceKind::Group => sqlx::query(
            "UPDATE groups SET display_name = $1, display_name_ci = $2, external_id = $3, \
             last_modified = $4, version = $5, data = $6 WHERE id = $7",
        )
        .bind(&ix.name)
        .bind(&ix.name_ci)
        .bind(&ix.external_id),
    };
    q.bind(now)
        .bind(version)
        .bind(&data)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(|e| map_unique(kind, e))?;
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
        "UPDATE {} SET last_modified = $1, version = $2 WHERE id = $3",
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

/// [`Store::update`] inside `tx`. Returns whether anything changed (nothing: no version bump,
/// no audit noise, nothing for TeamCity).
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
    let version = current_version(tx, kind, id).await?;
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
        Some(a) => write_attrs(tx, kind, id, a, &ts, version + 1).await?,
        None => touch(tx, kind, id, &ts, version + 1).await?,
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
    check_unique(tx, kind, &ix, None).await?;
    let data = attrs.to_string();
    let insert = match kind {
        ResourceKind::User => sqlx::query(
            "INSERT INTO users (id, user_name, user_name_ci, external_id, active, created, last_modified, version, data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8)",
        )
        .bind(id)
        .bind(&ix.name)
        .bind(&ix.name_ci)
        .bind(&ix.external_id)
        .bind(i64::from(ix.active)),
        ResourceKind::Group => sqlx::query(
            "INSERT INTO groups (id, display_name, display_name_ci, external_id, created, last_modified, version, data) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7)",
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
        .map_err(|e| map_unique(kind, e))?;
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
    let version = current_version(tx, kind, id).await?;
    if expected_version.is_some_and(|v| v != version) {
        return Err(StoreError::PreconditionFailed);
    }
    write_attrs(tx, kind, id, attrs, &ts, version + 1).await?;
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
    let version = current_version(tx, kind, id).await?;
    if expected_version.is_some_and(|v| v != version) {
        return Err(StoreError::PreconditionFailed);
    }
    let affected: Vec<(String,)> =
        sqlx::query_as("SELECT group_id FROM group_members WHERE member_id = $1 ORDER BY group_id")
            .bind(id)
            .fetch_all(&mut **tx)
            .await?;
    sqlx::query("DELETE FROM group_members WHERE member_id = $1 OR group_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    let sql = format!("DELETE FROM {} WHERE id = $1", table(kind));
    sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    let groups: Vec<String> = affected.into_iter().map(|(g,)| g).collect();
    // The groups it left changed too: their ETags must move.
    let ts = timefmt::format(now);
    for g in &groups {
        sqlx::query("UPDATE groups SET version = version + 1, last_modified = $1 WHERE id = $2")
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        for (url, want) in [
            (
                "postgres://bridge:s3cret@db:5432/scim",
                "postgres://bridge:<redacted>@db:5432/scim",
            ),
            ("postgres://bridge@db/scim", "postgres://bridge@db/scim"),
            (
                "postgresql://u:p@ss@h/d?sslmode=require&password=x",
                "postgresql://u:<redacted>@h/d?sslmode=require&password=<redacted>",
            ),
        ] {
            assert_eq!(redact_url(url), want);
        }
    }

    #[test]
    fn pool_size_comes_from_the_url_or_defaults_to_ten() {
        assert_eq!(
            pool_size("postgres://h/d").unwrap(),
            ("postgres://h/d".into(), DEFAULT_MAX_CONNECTIONS)
        );
        assert_eq!(
            pool_size("postgres://h/d?max_connections=3&sslmode=disable").unwrap(),
            ("postgres://h/d?sslmode=disable".into(), 3)
        );
        assert_eq!(
            pool_size("postgres://h/d?max_connections=4").unwrap(),
            ("postgres://h/d".into(), 4)
        );
        assert!(matches!(
            pool_size("postgres://h/d?max_connections=0"),
            Err(StoreError::Invalid(_))
        ));
    }
}
