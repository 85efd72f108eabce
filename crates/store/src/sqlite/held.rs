//! [`HeldBatches`](crate::HeldBatches) on SQLite.

use serde_json::{Value, json};

use super::sync::*;
use super::*;
use super::{SqliteStore, record};
use crate::HeldBatches;
use crate::common::{self, Record};
use crate::{HeldBatch, StoreError, StoreResult, WriteCtx, timefmt};
use crate::{HeldState, OutboxState};

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
        common::check_held_source(source)?;
        let now = self.now();
        let mut tx = self.begin().await?;
        let id = sqlx::query(
            "INSERT INTO held_batches (created, source, outbox_ids, summary, removals, plan) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(timefmt::format(now))
        .bind(source)
        .bind(ids_json(outbox_ids))
        .bind(summary)
        .bind(removals)
        .bind(plan.to_string())
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        let held = hold_tx(&mut tx, outbox_ids, id).await?;
        record(
            &mut tx,
            ctx,
            now,
            Record {
                resource_type: "HeldBatch",
                resource_id: &id.to_string(),
                operation: "sync.held",
                status: 202,
                detail: json!({
                    "source": source,
                    "outbox_ids": held,
                    "summary": summary,
                    "removals": removals,
                }),
                outbox: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    async fn list_held(&self, state: Option<HeldState>) -> StoreResult<Vec<crate::HeldBatch>> {
        let state = state.map(HeldState::as_str);
        let sql = format!(
            "SELECT {HELD_COLS} FROM held_batches WHERE (? IS NULL OR state = ?) ORDER BY id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state)
            .bind(state)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(held_row).collect()
    }

    async fn held_batch(&self, id: i64) -> StoreResult<Option<crate::HeldBatch>> {
        let sql = format!("SELECT {HELD_COLS} FROM held_batches WHERE id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(held_row).transpose()
    }

    async fn approve_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::HeldBatch> {
        self.held_transition(
            ctx,
            id,
            &[HeldState::Held],
            HeldState::Approved,
            "sync.approve",
            None,
        )
        .await
    }

    async fn mark_held_applied(&self, ctx: &WriteCtx, id: i64) -> StoreResult<()> {
        self.held_transition(
            ctx,
            id,
            &[HeldState::Approved],
            HeldState::Applied,
            "sync.applied",
            Some(OutboxState::Done),
        )
        .await
        .map(drop)
    }

    async fn drop_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::HeldBatch> {
        self.held_transition(
            ctx,
            id,
            &[HeldState::Held, HeldState::Approved],
            HeldState::Dropped,
            "sync.drop",
            Some(OutboxState::Dropped),
        )
        .await
    }
}

impl SqliteStore {
    /// Moves a batch from one of `from` to `to` (recording who decided, except for `applied`)
    /// and its held outbox rows to `outbox_to`.
    async fn held_transition(
        &self,
        ctx: &WriteCtx,
        id: i64,
        from: &[HeldState],
        to: HeldState,
        operation: &str,
        outbox_to: Option<OutboxState>,
    ) -> StoreResult<HeldBatch> {
        let now = self.now();
        let now_s = timefmt::format(now);
        let mut tx = self.begin().await?;
        let before = held_in_state(&mut tx, id, from).await?;
        if to == HeldState::Applied {
            sqlx::query("UPDATE held_batches SET state = ? WHERE id = ?")
                .bind(to.as_str())
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE held_batches SET state = ?, decided_at = ?, decided_by = ? WHERE id = ?",
            )
            .bind(to.as_str())
            .bind(&now_s)
            .bind(&ctx.actor)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        let mut rows: Vec<i64> = match outbox_to {
            Some(state) => {
                sqlx::query_scalar(
                    "UPDATE outbox SET state = ?, finished = ? \
                     WHERE held_batch_id = ? AND state = 'held' RETURNING id",
                )
                .bind(state.as_str())
                .bind(&now_s)
                .bind(id)
                .fetch_all(&mut *tx)
                .await?
            }
            None => vec![],
        };
        rows.sort_unstable();
        note(
            &mut tx,
            ctx,
            now,
            "HeldBatch",
            &id.to_string(),
            operation,
            json!({
                "previous_state": before.state,
                "source": before.source,
                "removals": before.removals,
                "outbox_ids": rows,
            }),
        )
        .await?;
        let after = held_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok(after)
    }
}
