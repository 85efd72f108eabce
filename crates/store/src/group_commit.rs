//! Group commit of SCIM resource writes, written once above the backends.
//!
//! Every write is durable before it is answered (SQLite with `synchronous = FULL`, PostgreSQL
//! with `synchronous_commit` on: the WAL is flushed at each commit), and audited writes append
//! to one hash chain, so they run one after another; a flush costs far more than the statements
//! of one write. So concurrent resource commands (create, replace, update, delete) are queued to
//! one writer task per process, which runs whatever is waiting — up to [`MAX_BATCH`] — in one
//! transaction (a command that fails is rolled back alone and answered with its own error: see
//! [`batch`]), commits once, and only then answers every command of the batch. A command alone
//! in the queue is a batch of one: nothing waits for company.
//!
//! Each backend supplies the statements ([`Writer`]): SQLite's transaction is `BEGIN
//! IMMEDIATE`; PostgreSQL's takes the audit chain head's row lock first, so a batch's row locks
//! are all taken after it and batches of several replicas cannot deadlock through it, and
//! appends the batch's audit events and outbox rows once at its end (`postgres::BatchTx`).

use std::future::Future;

use scim::schema::ResourceKind;
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};

use crate::{MembershipChange, NewMember, Resource, StoreError, StoreResult, WriteCtx};

/// Most commands one transaction carries.
pub(crate) const MAX_BATCH: usize = 64;

/// One resource command.
#[derive(Debug)]
pub(crate) enum Op {
    Create {
        kind: ResourceKind,
        id: String,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    },
    Replace {
        kind: ResourceKind,
        id: String,
        expected: Option<i64>,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    },
    Update {
        kind: ResourceKind,
        id: String,
        expected: Option<i64>,
        attrs: Option<Value>,
        members: Vec<MembershipChange>,
    },
    Delete {
        kind: ResourceKind,
        id: String,
        expected: Option<i64>,
    },
}

/// A queued command and where its answer goes: the resource as written (`None` for a delete).
#[derive(Debug)]
pub(crate) struct Job {
    pub(crate) ctx: WriteCtx,
    pub(crate) op: Op,
    pub(crate) reply: oneshot::Sender<StoreResult<Option<Resource>>>,
}

/// What a backend provides to the writer: its transaction and the resource commands inside it.
pub(crate) trait Writer: Clone + Send + Sync + 'static {
    /// A write transaction.
    type Tx: Send;

    /// Begins the batch's transaction (with the fence checks of a fenced view).
    fn begin(&self) -> impl Future<Output = StoreResult<Self::Tx>> + Send;

    /// Opens the savepoint one command runs in.
    fn savepoint(tx: &mut Self::Tx) -> impl Future<Output = StoreResult<()>> + Send;

    /// Keeps what the command did since its savepoint (releases it).
    fn keep(tx: &mut Self::Tx) -> impl Future<Output = StoreResult<()>> + Send;

    /// Undoes what the command did since its savepoint (rolls back to it and releases it).
    fn undo(tx: &mut Self::Tx) -> impl Future<Output = StoreResult<()>> + Send;

    /// Commits the batch.
    fn commit(tx: Self::Tx) -> impl Future<Output = StoreResult<()>> + Send;

    /// Creates a resource inside `tx` (its audit event and outbox row with it).
    #[allow(clippy::too_many_arguments)]
    fn create_in<'a>(
        tx: &'a mut Self::Tx,
        ctx: &'a WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &'a str,
        attrs: &'a Value,
        members: Option<&'a [NewMember]>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a;

    /// Replaces a resource inside `tx`.
    #[allow(clippy::too_many_arguments)]
    fn replace_in<'a>(
        tx: &'a mut Self::Tx,
        ctx: &'a WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &'a str,
        expected: Option<i64>,
        attrs: &'a Value,
        members: Option<&'a [NewMember]>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a;

    /// Updates a resource inside `tx`; whether anything changed, and the resource as written
    /// when the update read it back already (else the writer reads it: [`Writer::read_in`]).
    #[allow(clippy::too_many_arguments)]
    fn update_in<'a>(
        tx: &'a mut Self::Tx,
        ctx: &'a WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &'a str,
        expected: Option<i64>,
        attrs: Option<&'a Value>,
        members: &'a [MembershipChange],
    ) -> impl Future<Output = StoreResult<(bool, Option<Resource>)>> + Send + 'a;

    /// Deletes a resource inside `tx`.
    fn delete_in<'a>(
        tx: &'a mut Self::Tx,
        ctx: &'a WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &'a str,
        expected: Option<i64>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a;

    /// Reads a resource back inside `tx`.
    fn read_in<'a>(
        &'a self,
        tx: &'a mut Self::Tx,
        kind: ResourceKind,
        id: &'a str,
    ) -> impl Future<Output = StoreResult<Resource>> + Send + 'a;

    /// The store's clock.
    fn now(&self) -> OffsetDateTime;

    /// Called after a committed batch that changed something (the in-process generation of
    /// the lookup cache; PostgreSQL keeps its generation in the database and does nothing).
    fn written(&self);

    /// What the writer says when it has stopped.
    fn stopped() -> StoreError;

    /// The writer task's queue; `None` on a fenced view and inside the writer itself.
    fn queue(&self) -> Option<&mpsc::Sender<Job>>;
}

/// Sends `op` to the writer and waits for its answer.
pub(crate) async fn submit<W: Writer>(
    writer: &mpsc::Sender<Job>,
    ctx: &WriteCtx,
    op: Op,
) -> StoreResult<Option<Resource>> {
    let (reply, answer) = oneshot::channel();
    let job = Job {
        ctx: ctx.clone(),
        op,
        reply,
    };
    if writer.send(job).await.is_err() {
        return Err(W::stopped());
    }
    answer.await.unwrap_or_else(|_| Err(W::stopped()))
}

/// Starts the writer task of `store`; the sender it returns is where commands are queued.
pub(crate) fn spawn<W: Writer>(store: W) -> mpsc::Sender<Job> {
    let (tx, rx) = queue();
    tokio::spawn(run(store, rx));
    tx
}

/// The writer's queue.
pub(crate) fn queue() -> (mpsc::Sender<Job>, mpsc::Receiver<Job>) {
    mpsc::channel(4 * MAX_BATCH)
}

/// Runs the writer until every sender is gone.
pub(crate) async fn run<W: Writer>(store: W, mut rx: mpsc::Receiver<Job>) {
    let mut careful = 0u32;
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (results, changed) = match batch(&store, &jobs, careful > 0).await {
            Ok((results, changed, failed)) => {
                careful = if failed {
                    CAREFUL_BATCHES
                } else {
                    careful.saturating_sub(1)
                };
                (results, changed)
            }
            Err(e) => {
                // The commit (or the transaction around it) failed: nothing of the batch is
                // there, and every command says so.
                let msg = e.to_string();
                let unavailable = matches!(e, StoreError::Unavailable(_));
                let fenced = matches!(e, StoreError::Fenced(_));
                let results = jobs
                    .iter()
                    .map(|_| {
                        Err(if unavailable {
                            StoreError::Unavailable(msg.clone())
                        } else if fenced {
                            StoreError::Fenced(msg.clone())
                        } else {
                            StoreError::Other(format!("the write was not committed: {msg}").into())
                        })
                    })
                    .collect();
                (results, false)
            }
        };
        if changed {
            store.written();
        }
        for (job, result) in jobs.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

type Results = Vec<StoreResult<Option<Resource>>>;

/// Batches after one with a failing command run their commands in savepoints from the start
/// (see [`batch`]): while commands keep failing (a burst of conflicting creates), no batch is
/// run twice.
const CAREFUL_BATCHES: u32 = 8;

/// One transaction, one commit. Commands run one after another without savepoints — a
/// savepoint costs a round trip per command, and almost every command succeeds. When one fails,
/// what the batch did is rolled back and every command runs again, each in its own savepoint,
/// so the one that fails is undone alone and answered with its own error (the others run on
/// the same rows as the first time). A batch of one needs no second run: the transaction is
/// rolled back and its command answered with the error. `careful` skips the first run. Returns
/// the answers, whether anything changed, and whether a command failed.
async fn batch<W: Writer>(
    store: &W,
    jobs: &[Job],
    careful: bool,
) -> StoreResult<(Results, bool, bool)> {
    let now = store.now();
    if (!careful || jobs.len() == 1)
        && let Some(done) = attempt(store, jobs, now, false).await?
    {
        return Ok(done);
    }
    attempt(store, jobs, now, true)
        .await?
        .ok_or_else(|| StoreError::Other("a batch in savepoints did not finish".into()))
}

/// One run of `jobs` in one transaction. With `savepoints`, each command runs in its own, a
/// failing one is undone alone, and the run always finishes (`Some`). Without, a failing command
/// ends the run: the transaction is dropped (rolled back: sqlx sends the rollback before the
/// connection's next use) and the run gives `None` — except for a batch of one, answered with
/// its error.
async fn attempt<W: Writer>(
    store: &W,
    jobs: &[Job],
    now: OffsetDateTime,
    savepoints: bool,
) -> StoreResult<Option<(Results, bool, bool)>> {
    let mut tx = store.begin().await?;
    let mut results = Vec::with_capacity(jobs.len());
    let (mut any, mut failed) = (false, false);
    for job in jobs {
        // The request gave up while it waited in the queue (its timeout, or the client went
        // away): it is not written, so no one is told "failed" about a write that then lands.
        if job.reply.is_closed() {
            results.push(Err(given_up()));
            continue;
        }
        if savepoints {
            W::savepoint(&mut tx).await?;
        }
        match one(store, &mut tx, job, now).await {
            Ok((r, changed)) => {
                if savepoints {
                    W::keep(&mut tx).await?;
                }
                any |= changed;
                results.push(Ok(r));
            }
            Err(e) if savepoints => {
                W::undo(&mut tx).await?;
                failed = true;
                results.push(Err(e));
            }
            Err(e) if jobs.len() == 1 => return Ok(Some((vec![Err(e)], false, true))),
            Err(_) => return Ok(None),
        }
    }
    W::commit(tx).await?;
    Ok(Some((results, any, failed)))
}

fn given_up() -> StoreError {
    StoreError::Unavailable("the request was given up before it was written".into())
}

/// One command inside `tx` — what it returns and whether it changed anything. Also the
/// direct path of a store without a writer (a fenced view), in a transaction of its own.
pub(crate) async fn one<W: Writer>(
    store: &W,
    tx: &mut W::Tx,
    job: &Job,
    now: OffsetDateTime,
) -> StoreResult<(Option<Resource>, bool)> {
    let ctx = &job.ctx;
    match &job.op {
        Op::Create {
            kind,
            id,
            attrs,
            members,
        } => {
            W::create_in(tx, ctx, now, *kind, id, attrs, members.as_deref()).await?;
            // What was just written is what a read back (`common::read_back`) would give: a
            // new user is in no group yet, and a group's read back leaves its members out. No
            // read, on either backend.
            let ts = crate::common::parse_time(&crate::timefmt::format(now))?;
            let r = Resource {
                kind: *kind,
                id: id.clone(),
                attrs: attrs.clone(),
                created: ts,
                last_modified: ts,
                version: 1,
                members: None,
                groups: (*kind == ResourceKind::User).then(Vec::new),
            };
            Ok((Some(r), true))
        }
        Op::Replace {
            kind,
            id,
            expected,
            attrs,
            members,
        } => {
            W::replace_in(
                tx,
                ctx,
                now,
                *kind,
                id,
                *expected,
                attrs,
                members.as_deref(),
            )
            .await?;
            Ok((Some(store.read_in(tx, *kind, id).await?), true))
        }
        Op::Update {
            kind,
            id,
            expected,
            attrs,
            members,
        } => {
            let (changed, written) =
                W::update_in(tx, ctx, now, *kind, id, *expected, attrs.as_ref(), members).await?;
            let r = match written {
                Some(r) => r,
                None => store.read_in(tx, *kind, id).await?,
            };
            Ok((Some(r), changed))
        }
        Op::Delete { kind, id, expected } => {
            W::delete_in(tx, ctx, now, *kind, id, *expected).await?;
            Ok((None, true))
        }
    }
}

/// Runs `op` through the store's writer when it has one, else directly in a transaction of its
/// own (a fenced view: its fence is checked in that transaction).
async fn write<W: Writer>(store: &W, ctx: &WriteCtx, op: Op) -> StoreResult<Option<Resource>> {
    if let Some(w) = store.queue() {
        return submit::<W>(w, ctx, op).await;
    }
    let (reply, _answer) = oneshot::channel();
    let job = Job {
        ctx: ctx.clone(),
        op,
        reply,
    };
    let mut tx = store.begin().await?;
    let (r, changed) = one(store, &mut tx, &job, store.now()).await?;
    W::commit(tx).await?;
    if changed {
        store.written();
    }
    Ok(r)
}

/// [`crate::Resources::create`] for a backend.
pub(crate) async fn create<W: Writer>(
    store: &W,
    ctx: &WriteCtx,
    kind: ResourceKind,
    attrs: Value,
    members: Option<Vec<NewMember>>,
) -> StoreResult<Resource> {
    let id = uuid::Uuid::new_v4().to_string();
    let op = Op::Create {
        kind,
        id,
        attrs,
        members,
    };
    write(store, ctx, op).await?.ok_or(StoreError::NotFound)
}

/// [`crate::Resources::replace`] for a backend.
pub(crate) async fn replace<W: Writer>(
    store: &W,
    ctx: &WriteCtx,
    kind: ResourceKind,
    id: &str,
    expected: Option<i64>,
    attrs: Value,
    members: Option<Vec<NewMember>>,
) -> StoreResult<Resource> {
    let id = id.to_owned();
    let op = Op::Replace {
        kind,
        id,
        expected,
        attrs,
        members,
    };
    write(store, ctx, op).await?.ok_or(StoreError::NotFound)
}

/// [`crate::Resources::update`] (a version to match) and [`crate::Resources::update_members`]
/// (`expected` `None`: membership changes only, which commute) for a backend.
pub(crate) async fn update<W: Writer>(
    store: &W,
    ctx: &WriteCtx,
    kind: ResourceKind,
    id: &str,
    expected: Option<i64>,
    attrs: Option<Value>,
    members: &[MembershipChange],
) -> StoreResult<Resource> {
    let (id, members) = (id.to_owned(), members.to_vec());
    let op = Op::Update {
        kind,
        id,
        expected,
        attrs,
        members,
    };
    write(store, ctx, op).await?.ok_or(StoreError::NotFound)
}

/// [`crate::Resources::delete`] for a backend.
pub(crate) async fn delete<W: Writer>(
    store: &W,
    ctx: &WriteCtx,
    kind: ResourceKind,
    id: &str,
    expected: Option<i64>,
) -> StoreResult<()> {
    let id = id.to_owned();
    let op = Op::Delete { kind, id, expected };
    write(store, ctx, op).await.map(|_| ())
}
