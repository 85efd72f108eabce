//! Group commit of what a pass applies: the audit event of every TeamCity action, and the
//! SCIM ↔ TeamCity link of every object it created.
//!
//! Lanes apply actions concurrently (see [`crate::waves`]) and each awaits the commit of its
//! action's audit event before it goes on, exactly as with one transaction per event. The
//! difference is that the events of lanes that finish at about the same time share one
//! transaction: a single writer task takes whatever is queued (up to [`MAX_BATCH`]) and writes
//! it with [`Mappings::record_applied`], then answers every waiter. While other lanes are still in
//! a TeamCity call it waits up to [`GATHER`] for their events first, so a transaction's fixed
//! cost is shared by every lane that finishes within that window. With eight calls in flight,
//! an initial load of 10,000 users needs about 1,500 transactions instead of 20,000, and
//! the links are in the database as soon as the users exist (not after the whole pass).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use store::{AuditEntry, MappingLink, Mappings, StoreError, WriteCtx};
use tokio::sync::{mpsc, oneshot};

/// Most events one transaction takes.
const MAX_BATCH: usize = 256;

/// How long the writer waits for the events of lanes still in a call before it commits what
/// it has. A transaction's fixed cost (begin, chain head, commit: several round trips to the
/// database thread) is then shared by the lanes that finish within a few milliseconds of each
/// other, at the price of a lane waiting this much longer for its commit — while other lanes
/// use the TeamCity connection.
const GATHER: Duration = Duration::from_millis(2);

struct Item {
    entry: AuditEntry,
    link: Option<MappingLink>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The writer of one pass; dropping it (after the last [`Journal::write`]) ends the task.
#[derive(Debug)]
pub(crate) struct Journal {
    tx: mpsc::UnboundedSender<Item>,
    /// Lanes in a TeamCity call (their event is on its way).
    busy: Arc<AtomicUsize>,
}

/// See [`Journal::busy`].
#[derive(Debug)]
pub(crate) struct BusyGuard(Arc<AtomicUsize>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Item {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Item")
            .field("operation", &self.entry.operation)
            .finish_non_exhaustive()
    }
}

impl Journal {
    /// Starts the writer task for `ctx`'s events.
    pub(crate) fn start(store: Arc<dyn Mappings>, ctx: WriteCtx) -> Journal {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        let busy = Arc::new(AtomicUsize::new(0));
        let lanes = busy.clone();
        tokio::spawn(async move {
            let mut batch: Vec<Item> = Vec::new();
            let (mut events, mut transactions) = (0usize, 0usize);
            while let Some(first) = rx.recv().await {
                batch.push(first);
                let until = tokio::time::Instant::now() + GATHER;
                loop {
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(item) => batch.push(item),
                            Err(_) => break,
                        }
                    }
                    // Wait a little for the lanes still in a call, so their events share
                    // this transaction; nobody else is coming when none is.
                    if batch.len() >= MAX_BATCH || lanes.load(Ordering::Acquire) == 0 {
                        break;
                    }
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(item)) => batch.push(item),
                        Ok(None) | Err(_) => break,
                    }
                }
                let entries: Vec<AuditEntry> = batch.iter().map(|i| i.entry.clone()).collect();
                let links: Vec<MappingLink> = batch.iter().filter_map(|i| i.link.clone()).collect();
                let result = store
                    .record_applied(&ctx, &entries, &links)
                    .await
                    .map_err(|e| e.to_string());
                events += batch.len();
                transactions += 1;
                for item in batch.drain(..) {
                    let _ = item.done.send(result.clone());
                }
            }
            if transactions > 0 {
                tracing::debug!(events, transactions, "journal: pass recorded");
            }
        });
        Journal { tx, busy }
    }

    /// Marks a lane as in a TeamCity call until the guard drops: the writer waits up to
    /// [`GATHER`] for such lanes' events before it commits a batch.
    pub(crate) fn busy(&self) -> BusyGuard {
        self.busy.fetch_add(1, Ordering::AcqRel);
        BusyGuard(self.busy.clone())
    }

    /// Appends `entry` (and stores `link`) and waits until it is committed. `in_call` (the
    /// lane's [`Journal::busy`] guard) is released once the event is queued.
    pub(crate) async fn write(
        &self,
        entry: AuditEntry,
        link: Option<MappingLink>,
        in_call: BusyGuard,
    ) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        let sent = self.tx.send(Item { entry, link, done });
        drop(in_call);
        sent.map_err(|_| StoreError::Other("the audit writer stopped".into()))?;
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Other(e.into())),
            Err(_) => Err(StoreError::Other("the audit writer stopped".into())),
        }
    }
}
