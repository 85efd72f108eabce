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
use crate::common::{self, NewEvent, Record, TokenRow, chain_event, indexed, table, token_row};
use crate::sql_filter::{Bind, Dialect};
use crate::{
    BatchOp, Clock, ListPage, ListQuery, MemberRef, MemberType, MembershipChange, NewMember,
    ReadOpts, Resource, StoreError, StoreResult, TokenRecord, TokenScope, WriteCtx, timefmt,
};

mod audit_log;
mod copy;
mod directory;
mod group_commit;
use crate::group_commit as gc;
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
    /// Bumped after every committed resource write (see [`Resources::resource_generation`]). Only
    /// this process writes SCIM resources to its SQLite file (the CLI's commands touch tokens,
    /// the outbox and the audit trail), which is what makes a process-local counter enough.
    generation: Arc<std::sync::atomic::AtomicU64>,
    /// Set on a [`Leases::fenced`] view: every write transaction checks them first.
    fences: Vec<Arc<crate::Fence>>,
    /// The group-commit writer of SCIM resource commands (see `group_commit`); `None` on a
    /// fenced view and inside the writer itself (they write directly).
    writer: Option<tokio::sync::mpsc::Sender<gc::Job>>,
}

type Tx = Transaction<'static, Sqlite>;

impl SqliteStore {
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
            // The one write connection is a local file's: sqlx's ping before every acquire
            // would be a round trip to its thread per transaction.
            .test_before_acquire(false)
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
                // A reader's page cache is 1 MiB, not the writer's 4: the four stay full while
                // the service idles (the pool hands them out in turn) and the OS caches the
                // file anyway.
                .connect_with(opts.read_only(true).pragma("cache_size", "-1024"))
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

    /// Moves the resource generation on; called after every committed resource write.
    pub(super) fn written(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
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

/// An audited write transaction whose audit events and outbox rows are appended at its end,
/// one statement each, instead of three statements per command (the chain head read, the
/// event, the outbox row; each a round trip to the connection's thread): the head is read once
/// when it begins (`BEGIN IMMEDIATE` holds the database's write lock, so no one else appends),
/// each event is chained in memory ([`common::Recorded`]), and [`BatchTx::commit`] inserts them
/// and the outbox rows in the order recorded, then commits. The group-commit writer's batches
/// and `write_batch` run in one; a command's own statements run in order inside it.
pub(crate) type BatchTx = common::BatchTx<Sqlite>;

impl BatchTx {
    /// Begins the transaction (fences checked) and reads the chain head.
    async fn begin(store: &SqliteStore) -> StoreResult<Self> {
        let mut tx = store.begin().await?;
        let head = chain_head(&mut tx).await?;
        Ok(BatchTx {
            tx,
            rec: common::Recorded::new(head),
        })
    }

    /// Appends what was recorded (the events, then the outbox rows, each in one statement and
    /// in the order recorded) and commits.
    async fn commit(mut self) -> StoreResult<()> {
        insert_events(&mut self.tx, &self.rec.events).await?;
        if !self.rec.outbox.is_empty() {
            let rows: Vec<Value> = self
                .rec
                .outbox
                .iter()
                .map(|o| {
                    json!([
                        o.entity_type,
                        o.entity_id,
                        o.operation,
                        o.detail,
                        o.audit_seq,
                        o.time
                    ])
                })
                .collect();
            sqlx::query(
                "INSERT INTO outbox (entity_type, entity_id, operation, detail, audit_seq, created, \
                 next_attempt_at, linked) \
                 SELECT value->>0, value->>1, value->>2, value->>3, value->>4, value->>5, value->>5, \
                 CASE WHEN EXISTS (SELECT 1 FROM mappings m WHERE m.kind = value->>0 \
                 AND m.scim_id = value->>1) THEN 1 ELSE 0 END \
                 FROM json_each(?) ORDER BY key",
            )
            .bind(Value::Array(rows).to_string())
            .execute(&mut *self.tx)
            .await?;
        }
        Ok(self.tx.commit().await?)
    }
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
