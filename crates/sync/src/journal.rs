//! Group commit of what a pass applies: the audit event of every TeamCity action, and the
//! SCIM ↔ TeamCity link of every object it created.
//!
//! Lanes apply actions concurrently (see [`crate::waves`]) and each awaits the commit of its
//! action's audit event before it goes on, exactly as with one transaction per event. The
//! difference is that the events of lanes that finish at about the same time share one
//! transaction: a single writer task takes whatever is queued (up to [`MAX_BATCH`]) and writes
//! it with [`Store::record_applied`], then answers every waiter. With eight calls in flight,
//! an initial load of 10,000 users needs a few thousand transactions instead of 20,000, and
//! the links are in the database as soon as the users exist (not after the whole pass).

use store::{AuditEntry, DynStore, MappingLink, StoreError, WriteCtx};
use tokio::sync::{mpsc, oneshot};

/// Most events one transaction takes.
const MAX_BATCH: usize = 256;

struct Item {
    entry: AuditEntry,
    link: Option<MappingLink>,
    done: oneshot::Sender<Result<(), String>>,
}

/// The writer of one pass; dropping it (after the last [`Journal::write`]) ends the task.
#[derive(Debug)]
pub(crate) struct Journal {
    tx: mpsc::UnboundedSender<Item>,
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
    pub(crate) fn start(store: DynStore, ctx: WriteCtx) -> Journal {
        let (tx, mut rx) = mpsc::unbounded_channel::<Item>();
        tokio::spawn(async move {
            let mut batch: Vec<Item> = Vec::new();
            while let Some(first) = rx.recv().await {
                batch.push(first);
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(item) => batch.push(item),
                        Err(_) => break,
                    }
                }
                let entries: Vec<AuditEntry> = batch.iter().map(|i| i.entry.clone()).collect();
                let links: Vec<MappingLink> = batch.iter().filter_map(|i| i.link.clone()).collect();
                let result = store
                    .record_applied(&ctx, &entries, &links)
                    .await
                    .map_err(|e| e.to_string());
                for item in batch.drain(..) {
                    let _ = item.done.send(result.clone());
                }
            }
        });
        Journal { tx }
    }

    /// Appends `entry` (and stores `link`) and waits until it is committed.
    pub(crate) async fn write(
        &self,
        entry: AuditEntry,
        link: Option<MappingLink>,
    ) -> Result<(), StoreError> {
        let (done, committed) = oneshot::channel();
        self.tx
            .send(Item { entry, link, done })
            .map_err(|_| StoreError::Other("the audit writer stopped".into()))?;
        match committed.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(StoreError::Other(e.into())),
            Err(_) => Err(StoreError::Other("the audit writer stopped".into())),
        }
    }
}
