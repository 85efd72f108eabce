//! [`HeldBatches`](crate::HeldBatches) on SQLite.

use super::*;
use crate::HeldBatches;

#[async_trait]
impl HeldBatches for SqliteStore {
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
}
