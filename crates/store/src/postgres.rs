//! The PostgreSQL backend: a connection pool shared by any number of processes.
//!
//! Audited writes append to one chain through the one row of `audit_head` (`SELECT … FOR
//! UPDATE`), which holds the chain's last seq and hash: writers from every process append with
//! gap-free seq in commit order. Every audited write takes that lock first. The SCIM resource
//! commands of a process are queued to its group-commit writer (`crate::group_commit`), which
//! runs what is waiting in one transaction — one head lock and one WAL flush for many writes,
//! each in its own savepoint, their audit events and outbox rows appended once at the end
//! ([`BatchTx`]); row locks (`FOR UPDATE` on a resource read then written, `FOR
//! SHARE` on a member being added) and unique indexes hold what SQLite's single writer gives,
//! and since the head is always the first lock, replicas never deadlock through it. Outbox claims
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
    self, NewEvent, Record, TokenRow, chain_event, indexed, read_back, table, token_row,
};
use crate::sql_filter::{Bind, Dialect};
use crate::{
    BatchOp, Clock, ListPage, ListQuery, MemberRef, MemberType, MembershipChange, NewMember,
    ReadOpts, Resource, StoreError, StoreResult, TokenRecord, TokenScope, WriteCtx, timefmt,
};

mod audit_log;
mod copy;
mod directory;
mod held;
mod lease;
mod lookups;
mod mappings;
mod outbox;
mod resources;
mod sync;
use crate::group_commit as gc;
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
    /// Set on a [`Leases::fenced`] view: every write transaction checks them first.
    fences: Vec<Arc<crate::Fence>>,
    /// The group-commit writer of SCIM resource commands (`crate::group_commit`); `None` on a
    /// fenced view and inside the writer itself (they write directly).
    writer: Option<tokio::sync::mpsc::Sender<gc::Job>>,
    /// Concurrent reads of the resource generation, sharing round trips.
    generation: Arc<GenerationReads>,
    /// Concurrent exact lookups, sharing statements (`None` inside the writer).
    lookups: Option<lookups::Lookups>,
}

/// Reads of the resource generation (`audit_head.resource_gen`, which every resource write
/// transaction moves), shared by concurrent callers without ever answering one of them with a
/// value read before it asked. One read is in flight at a time; a caller that finds one in
/// flight waits for it to end, and then takes the last value read if that read *started*
/// after the caller asked (its query was sent later, so it sees every write committed before
/// the caller asked), else reads again itself — and whoever waited behind that read takes its
/// value in turn. Under load one round trip answers every lookup that arrived while the one
/// before it was in flight, instead of one each.
#[derive(Debug, Default)]
struct GenerationReads {
    /// Reads started so far; a read's number is taken before its query is sent.
    started: std::sync::atomic::AtomicU64,
    /// One read at a time; the last completed read: its number and the value it read.
    last: tokio::sync::Mutex<(u64, i64)>,
}

impl GenerationReads {
    /// The generation as of a moment after this call began.
    async fn read(&self, pool: &PgPool) -> StoreResult<i64> {
        use std::sync::atomic::Ordering::SeqCst;
        let asked = self.started.load(SeqCst);
        let mut last = self.last.lock().await;
        if last.0 > asked {
            return Ok(last.1);
        }
        let n = self.started.fetch_add(1, SeqCst) + 1;
        let (g,): (i64,) = sqlx::query_as("SELECT resource_gen FROM audit_head WHERE id = 1")
            .fetch_one(pool)
            .await?;
        *last = (n, g);
        Ok(g)
    }
}

type Tx = Transaction<'static, Postgres>;

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
        let pool = pool_options(size)
            .connect_with(opts.clone())
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
        let mut store = PostgresStore {
            pool,
            clock,
            fences: Vec::new(),
            writer: None,
            generation: Arc::default(),
            lookups: None,
        };
        store.lookups = Some(lookups::Lookups::spawn(store.pool.clone()));
        warn_without_autovacuum(&store.pool, &shown).await;
        store.writer = Some(store.spawn_writer(opts, &shown).await?);
        Ok(store)
    }

    /// Starts the group-commit writer on a thread and runtime of its own, with a connection of
    /// its own: each batch is a run of round trips one after another, and on the shared runtime
    /// every one of them waited for a worker busy with HTTP requests.
    async fn spawn_writer(
        &self,
        opts: PgConnectOptions,
        shown: &str,
    ) -> StoreResult<tokio::sync::mpsc::Sender<gc::Job>> {
        let (tx, rx) = gc::queue();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (clock, generation) = (self.clock.clone(), self.generation.clone());
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Other(format!("cannot start the writer: {e}").into()))?;
        std::thread::Builder::new()
            .name("pg-writer".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let pool = pool_options(1).connect_with(opts).await;
                    match pool {
                        Ok(pool) => {
                            let _ = ready_tx.send(Ok(()));
                            let writer = PostgresStore {
                                pool,
                                clock,
                                fences: Vec::new(),
                                writer: None,
                                generation,
                                lookups: None,
                            };
                            gc::run(writer, rx).await;
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(|e| StoreError::Other(format!("cannot start the writer: {e}").into()))?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(tx),
            Ok(Err(e)) => Err(StoreError::Other(
                format!("cannot connect to PostgreSQL at `{shown}`: {e}").into(),
            )),
            Err(_) => Err(StoreError::Other("the writer did not start".into())),
        }
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

    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }
}

/// A pool of `size` connections. A connection idle for more than a second is pinged before it
/// is handed out (one that died with its server is replaced, not failed on); one in steady use
/// is not — sqlx's default pings every time, a round trip more for every query.
fn pool_options(size: u32) -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(size)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > Duration::from_secs(1) {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// Says so when the server runs without autovacuum. Every write rewrites the audit chain's head
/// row and the outbox rows change state as they are applied; without vacuuming, their dead
/// versions pile up and every write and claim slows down (a 100,000-user first load went from
/// hundreds of rows a second to tens: docs/BENCHMARKS.md).
async fn warn_without_autovacuum(pool: &PgPool, shown: &str) {
    let setting: Result<(String,), _> = sqlx::query_as("SELECT current_setting('autovacuum')")
        .fetch_one(pool)
        .await;
    if let Ok((v,)) = setting
        && v != "on"
    {
        tracing::warn!(
            database = %shown,
            "PostgreSQL runs with autovacuum off: the outbox and the audit chain head are \
             rewritten on every write and slow down as their dead rows pile up; set \
             `autovacuum = on` on the server (docs/OPERATIONS.md, High availability)"
        );
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

/// The columns of `audit_events`, in the order [`bind_events`] binds them.
const EVENT_COLS: &str = "seq, time, actor, request_id, resource_type, resource_id, operation, \
     outcome, status, detail, prev_hash, hash";
/// Events as rows: the arrays [`bind_events`] binds as `$1`–`$12`.
const EVENT_ROWS: &str = "SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], \
     $5::text[], $6::text[], $7::text[], $8::text[], $9::bigint[], $10::text[], $11::text[], $12::text[])";

/// Binds `events` as twelve arrays, one per column ([`EVENT_COLS`]), as `$1`–`$12`.
fn bind_events<'q>(
    q: sqlx::query::Query<'q, Postgres, PgArguments>,
    events: &[AuditEvent],
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    let col = |f: fn(&AuditEvent) -> String| events.iter().map(f).collect::<Vec<String>>();
    let opt = |f: fn(&AuditEvent) -> Option<String>| {
        events.iter().map(f).collect::<Vec<Option<String>>>()
    };
    q.bind(events.iter().map(|e| e.seq).collect::<Vec<i64>>())
        .bind(col(|e| e.time.clone()))
        .bind(col(|e| e.actor.clone()))
        .bind(opt(|e| e.request_id.clone()))
        .bind(col(|e| e.resource_type.clone()))
        .bind(opt(|e| e.resource_id.clone()))
        .bind(col(|e| e.operation.clone()))
        .bind(col(|e| e.outcome.clone()))
        .bind(
            events
                .iter()
                .map(|e| e.status)
                .collect::<Vec<Option<i64>>>(),
        )
        .bind(col(|e| e.detail.clone()))
        .bind(col(|e| e.prev_hash.clone()))
        .bind(col(|e| e.hash.clone()))
}

/// Inserts chained events (one statement, arrays unnested) and moves the head to the last.
async fn insert_events(tx: &mut Tx, events: &[AuditEvent]) -> StoreResult<()> {
    let Some(last) = events.last() else {
        return Ok(());
    };
    let sql = format!("INSERT INTO audit_events ({EVENT_COLS}) {EVENT_ROWS}");
    bind_events(sqlx::query(AssertSqlSafe(sql)), events)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
        .bind(last.seq)
        .bind(&last.hash)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// An audited write transaction whose audit events and outbox rows are appended at its end,
/// one statement each, instead of as each command records them: the chain head is locked and
/// read once when it begins ([`BatchTx::begin`]), each recorded event is chained to it in
/// memory, and [`BatchTx::commit`] inserts the events, moves the head (and the resource
/// generation, when a resource changed), inserts the outbox rows, notifies, and commits. The
/// group-commit writer's batches and `write_batch` run in one; every statement a command sends
/// itself still runs in order inside it. A savepoint's rollback drops what was recorded since
/// ([`BatchTx::savepoint`], [`BatchTx::undo`]).
pub(crate) type BatchTx = common::BatchTx<Postgres>;

impl BatchTx {
    /// Begins the transaction: the chain head's row lock first (see
    /// [`PostgresStore::begin_write`]), then the fences.
    async fn begin(store: &PostgresStore) -> StoreResult<Self> {
        let mut tx = store.pool.begin().await?;
        let head: (i64, String) =
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?;
        store.check_fence(&mut tx).await?;
        Ok(BatchTx {
            tx,
            rec: common::Recorded::new(head),
        })
    }

    /// Appends what was recorded and commits: the events, the outbox rows (in the order they
    /// were recorded), the chain head, the resource generation and the `NOTIFY` (when a resource
    /// changed: every replica's lookup cache must see it, and every replica's worker may wake
    /// up now; delivered on commit) in one statement, then the commit.
    async fn commit(mut self) -> StoreResult<()> {
        // Every outbox row was recorded with its event: no events, no rows.
        let (events, outbox) = (&self.rec.events, &self.rec.outbox);
        let Some(last) = events.last() else {
            return Ok(self.tx.commit().await?);
        };
        let sql = format!(
            "WITH ev AS (INSERT INTO audit_events ({EVENT_COLS}) {EVENT_ROWS}), \
             ob AS (INSERT INTO outbox (entity_type, entity_id, operation, detail, audit_seq, \
               created, next_attempt_at, linked) \
               SELECT u.t, u.i, u.o, u.d, u.s, u.c, u.c, \
               CASE WHEN EXISTS (SELECT 1 FROM mappings WHERE kind = u.t AND scim_id = u.i) \
               THEN 1 ELSE 0 END \
               FROM UNNEST($13::text[], $14::text[], $15::text[], $16::text[], $17::bigint[], \
               $18::text[]) WITH ORDINALITY AS u(t, i, o, d, s, c, n) ORDER BY u.n), \
             hd AS (UPDATE audit_head SET seq = $19, hash = $20, \
               resource_gen = resource_gen + $21 WHERE id = 1) \
             SELECT pg_notify($22, '') WHERE $21 > 0"
        );
        let col = |f: fn(&common::PendingOutbox) -> &str| {
            outbox
                .iter()
                .map(|o| f(o).to_owned())
                .collect::<Vec<String>>()
        };
        bind_events(sqlx::query(AssertSqlSafe(sql)), events)
            .bind(col(|o| &o.entity_type))
            .bind(col(|o| &o.entity_id))
            .bind(col(|o| &o.operation))
            .bind(col(|o| &o.detail))
            .bind(outbox.iter().map(|o| o.audit_seq).collect::<Vec<i64>>())
            .bind(col(|o| &o.time))
            .bind(last.seq)
            .bind(&last.hash)
            .bind(i64::from(!outbox.is_empty()))
            .bind(OUTBOX_CHANNEL)
            .execute(&mut *self.tx)
            .await?;
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
