//! Group commit of SCIM resource writes on SQLite.
//!
//! Every write is durable before it is answered (`synchronous = FULL`: the WAL is flushed at each
//! commit), and a flush costs far more than the statements of one write. So concurrent resource
//! commands (create, replace, update, delete) are queued to one writer task, which runs whatever
//! is waiting — up to [`MAX_BATCH`] — in one transaction, each command inside its own savepoint
//! (a command that fails is rolled back alone and answered with its own error), commits once,
//! and only then answers every command of the batch. A command alone in the queue is a batch of
//! one: nothing waits for company.

use scim::schema::ResourceKind;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use super::{SqliteStore, Tx};
use crate::common::{self, read_back};
use crate::{MembershipChange, NewMember, Resource, StoreError, StoreResult, WriteCtx, timefmt};

/// Most commands one transaction carries.
pub(super) const MAX_BATCH: usize = 64;

/// One resource command.
#[derive(Debug)]
pub(super) enum Op {
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

/// A queued command and where its answer goes: the resource as written (`None` for a delete)
/// and whether it changed anything.
#[derive(Debug)]
pub(super) struct Job {
    pub(super) ctx: WriteCtx,
    pub(super) op: Op,
    pub(super) reply: oneshot::Sender<StoreResult<Option<Resource>>>,
}

/// Runs the writer until every sender is gone.
pub(super) async fn run(store: SqliteStore, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        let (results, changed) = match batch(&store, &jobs).await {
            Ok(r) => r,
            Err(e) => {
                // The commit (or the transaction around it) failed: nothing of the batch is
                // there, and every command says so.
                let msg = e.to_string();
                let unavailable = matches!(e, StoreError::Unavailable(_));
                let results = jobs
                    .iter()
                    .map(|_| {
                        Err(if unavailable {
                            StoreError::Unavailable(msg.clone())
                        } else {
                            StoreError::Other(anyhow_like(format!(
                                "the write was not committed: {msg}"
                            )))
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

fn anyhow_like(msg: String) -> crate::anyhow_like::Error {
    msg.into()
}

/// One transaction: each command in a savepoint, one commit.
async fn batch(
    store: &SqliteStore,
    jobs: &[Job],
) -> StoreResult<(Vec<StoreResult<Option<Resource>>>, bool)> {
    let now = store.now();
    let mut tx = store.begin().await?;
    let mut results = Vec::with_capacity(jobs.len());
    let mut any = false;
    for job in jobs {
        // The request gave up while it waited in the queue (its timeout, or the client went
        // away): it is not written, so no one is told "failed" about a write that then lands.
        if job.reply.is_closed() {
            results.push(Err(StoreError::Unavailable(
                "the request was given up before it was written".into(),
            )));
            continue;
        }
        sqlx::query("SAVEPOINT scim_write")
            .execute(&mut *tx)
            .await?;
        match one(store, &mut tx, job, now).await {
            Ok((r, changed)) => {
                sqlx::query("RELEASE scim_write").execute(&mut *tx).await?;
                any |= changed;
                results.push(Ok(r));
            }
            Err(e) => {
                sqlx::query("ROLLBACK TO scim_write")
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("RELEASE scim_write").execute(&mut *tx).await?;
                results.push(Err(e));
            }
        }
    }
    tx.commit().await?;
    Ok((results, any))
}

/// One command inside the batch's transaction: what it returns and whether it changed anything.
async fn one(
    store: &SqliteStore,
    tx: &mut Tx,
    job: &Job,
    now: time::OffsetDateTime,
) -> StoreResult<(Option<Resource>, bool)> {
    let ctx = &job.ctx;
    match &job.op {
        Op::Create {
            kind,
            id,
            attrs,
            members,
        } => {
            SqliteStore::create_in(tx, ctx, now, *kind, id, attrs, members.as_deref()).await?;
            let r = match kind {
                // A new user is what was just written (no groups yet): no read back.
                ResourceKind::User => {
                    let ts = common::parse_time(&timefmt::format(now))?;
                    Resource {
                        kind: *kind,
                        id: id.clone(),
                        attrs: attrs.clone(),
                        created: ts,
                        last_modified: ts,
                        version: 1,
                        members: None,
                        groups: Some(Vec::new()),
                    }
                }
                // A group's members carry what the store resolved: read back.
                ResourceKind::Group => store.read_one_tx(tx, *kind, id, read_back(*kind)).await?,
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
            SqliteStore::replace_in(
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
            let r = store.read_one_tx(tx, *kind, id, read_back(*kind)).await?;
            Ok((Some(r), true))
        }
        Op::Update {
            kind,
            id,
            expected,
            attrs,
            members,
        } => {
            let changed =
                SqliteStore::update_in(tx, ctx, now, *kind, id, *expected, attrs.as_ref(), members)
                    .await?;
            let r = store.read_one_tx(tx, *kind, id, read_back(*kind)).await?;
            Ok((Some(r), changed))
        }
        Op::Delete { kind, id, expected } => {
            SqliteStore::delete_in(tx, ctx, now, *kind, id, *expected).await?;
            Ok((None, true))
        }
    }
}
