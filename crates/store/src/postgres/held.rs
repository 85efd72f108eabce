//! [`HeldBatches`](crate::HeldBatches) on PostgreSQL.

use super::*;
use crate::HeldBatches;

#[async_trait]
impl HeldBatches for PostgresStore {
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
        self.held_transition(ctx, id, &["held"], "approved", "sync.approve", None)
            .await
    }

    async fn mark_held_applied(&self, ctx: &WriteCtx, id: i64) -> StoreResult<()> {
        self.held_transition(
            ctx,
            id,
            &["approved"],
            "applied",
            "sync.applied",
            Some("done"),
        )
        .await
        .map(drop)
    }

    async fn drop_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::HeldBatch> {
        self.held_transition(
            ctx,
            id,
            &["held", "approved"],
            "dropped",
            "sync.drop",
            Some("dropped"),
        )
        .await
    }
}
