//! [`SyncState`](crate::SyncState) on SQLite.

use serde_json::json;

use super::SqliteStore;
use super::sync::*;
use super::*;
use crate::SyncState;
use crate::{StoreError, StoreResult, WriteCtx, timefmt};

#[async_trait]
impl SyncState for SqliteStore {
    fn now(&self) -> time::OffsetDateTime {
        self.clock.now()
    }

    async fn pins(&self) -> StoreResult<std::collections::BTreeMap<String, String>> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT rule, group_id FROM policy_pins")
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().collect())
    }

    async fn set_pin(&self, ctx: &WriteCtx, rule: &str, group_id: &str) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let prev: Option<String> =
            sqlx::query_scalar("SELECT group_id FROM policy_pins WHERE rule = ?")
                .bind(rule)
                .fetch_optional(&mut *tx)
                .await?;
        if prev.as_deref() == Some(group_id) {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO policy_pins (rule, group_id, pinned_at) VALUES (?, ?, ?) \
             ON CONFLICT (rule) DO UPDATE SET group_id = excluded.group_id, pinned_at = excluded.pinned_at",
        )
        .bind(rule)
        .bind(group_id)
        .bind(timefmt::format(now))
        .execute(&mut *tx)
        .await?;
        note(
            &mut tx,
            ctx,
            now,
            "PolicyPin",
            rule,
            "policy.pin",
            json!({"group_id": group_id, "previous": prev}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sync_state_get(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM sync_state WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    async fn sync_state_set(&self, key: &str, value: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO sync_state (key, value) VALUES (?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn sync_state_increment(&self, key: &str) -> StoreResult<i64> {
        let mut tx = self.begin().await?;
        let v: String = sqlx::query_scalar(
            "INSERT INTO sync_state (key, value) VALUES (?, '1') \
             ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) \
             RETURNING value",
        )
        .bind(key)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        v.parse()
            .map_err(|_| StoreError::Invalid(format!("sync_state {key} is not a number: {v}")))
    }
}
