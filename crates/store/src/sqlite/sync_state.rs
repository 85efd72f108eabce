//! [`SyncState`](crate::SyncState) on SQLite.

use super::*;
use crate::SyncState;

#[async_trait]
impl SyncState for SqliteStore {
    async fn pins(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        self.sync_pins().await
    }

    async fn set_pin(&self, ctx: &WriteCtx, rule: &str, group_id: &str) -> StoreResult<()> {
        self.sync_set_pin(ctx, rule, group_id).await
    }

    async fn sync_state_get(&self, key: &str) -> StoreResult<Option<String>> {
        self.sync_state_read(key).await
    }

    async fn sync_state_set(&self, key: &str, value: &str) -> StoreResult<()> {
        self.sync_state_write(key, value).await
    }

    async fn sync_state_increment(&self, key: &str) -> StoreResult<i64> {
        self.sync_state_increment(key).await
    }
}
