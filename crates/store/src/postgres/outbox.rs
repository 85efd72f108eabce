//! [`Outbox`](crate::Outbox) on PostgreSQL.

use super::*;
use crate::Outbox;

#[async_trait]
impl Outbox for PostgresStore {
    fn watch_outbox(&self, wake: Arc<tokio::sync::Notify>) -> bool {
        lease::spawn_outbox_listener(self.pool.clone(), wake);
        true
    }

    async fn outbox_items(&self, after: i64, limit: i64) -> StoreResult<Vec<OutboxItem>> {
        let rows = sqlx::query(
            "SELECT id, entity_type, entity_id, operation, detail, audit_seq, state, attempts \
             FROM outbox WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(after)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(sync::item_row).collect()
    }

    // ----- Sync bookkeeping: implemented in `postgres/sync.rs`. -----

    async fn claim_outbox(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.sync_claim_outbox(worker, now, lease, limit, false)
            .await
    }

    async fn claim_outbox_newest(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.sync_claim_outbox(worker, now, lease, limit, true)
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
}
