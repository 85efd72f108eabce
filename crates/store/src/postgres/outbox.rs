//! [`Outbox`](crate::Outbox) on PostgreSQL.

use std::time::Duration;

use serde_json::json;
use time::OffsetDateTime;

use super::PostgresStore;
use super::sync::*;
use super::*;
use crate::Outbox;
use crate::common::{self, Chain, parse_time};
use crate::{
    ClaimedEntity, FailedItem, OutboxItem, OutboxState, OutboxSummary, StoreError, StoreResult,
    WriteCtx, timefmt,
};

/// The advisory lock key that serialises outbox claims across processes.
const CLAIM_LOCK: i64 = 0x7463_7363_696d_0001;

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

    async fn claim_outbox(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.claim_due(worker, now, lease, limit, common::ClaimOrder::Oldest)
            .await
    }

    async fn claim_outbox_linked(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.claim_due(worker, now, lease, limit, common::ClaimOrder::Linked)
            .await
    }

    async fn claim_outbox_newest(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
    ) -> StoreResult<Vec<crate::ClaimedEntity>> {
        self.claim_due(worker, now, lease, limit, common::ClaimOrder::Newest)
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
        let now = self.now();
        let mut tx = self.begin_write().await?;
        // The pass's events and one `outbox.complete` per entity, chained in memory and
        // appended in one statement (three round trips per event before, under the head lock
        // every SCIM write waits for).
        let done: Vec<(i64, String, String)> = sqlx::query_as(
            "UPDATE outbox SET state = 'done', lease_until = NULL, finished = $1 \
             WHERE id = ANY($2) AND state = 'pending' RETURNING id, entity_type, entity_id",
        )
        .bind(timefmt::format(now))
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut chain = Chain::new(ctx, now, chain_head(&mut tx).await?);
        common::chain_completion(&mut chain, &events, done);
        insert_events(&mut tx, &chain.events).await?;
        tx.commit().await?;
        Ok(())
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
        let mut tx = self.begin_write().await?;
        let rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "SELECT id, entity_type, entity_id, attempts FROM outbox \
             WHERE id = ANY($1) AND state = 'pending' ORDER BY id FOR UPDATE",
        )
        .bind(ids)
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, ty, eid, attempts) in rows {
            let d = common::fail_decision(id, attempts, error, transient, now, policy)?;
            sqlx::query(
                "UPDATE outbox SET attempts = $1, last_error = $2, lease_until = NULL, \
                 state = CASE WHEN $3::text IS NULL THEN state ELSE 'dead' END, \
                 dead_reason = $3, finished = CASE WHEN $3::text IS NULL THEN NULL ELSE $4 END, \
                 next_attempt_at = COALESCE($5, next_attempt_at) WHERE id = $6",
            )
            .bind(d.attempts)
            .bind(error)
            .bind(&d.dead_reason)
            .bind(timefmt::format(now))
            .bind(d.next.map(timefmt::format))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            let entry = common::fail_entry(id, &ty, eid, &d, error, transient);
            append_audit(&mut tx, ctx, self.now(), &entry).await?;
            out.push(FailedItem {
                id,
                attempts: d.attempts,
                next_attempt_at: d.next,
                dead_reason: d.dead_reason,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    async fn defer_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        reason: &str,
        until: OffsetDateTime,
    ) -> StoreResult<usize> {
        let mut tx = self.begin_write().await?;
        let n = sqlx::query(
            "UPDATE outbox SET last_error = $1, lease_until = NULL, next_attempt_at = $2 \
             WHERE id = ANY($3) AND state = 'pending'",
        )
        .bind(reason)
        .bind(timefmt::format(until))
        .bind(ids)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let entry = common::defer_entry(ids, reason, until);
        append_audit(&mut tx, ctx, self.now(), &entry).await?;
        tx.commit().await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn outbox_summary(&self) -> StoreResult<crate::OutboxSummary> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM outbox GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        let oldest: Option<String> =
            sqlx::query_scalar("SELECT MIN(created) FROM outbox WHERE state = 'pending'")
                .fetch_one(&self.pool)
                .await?;
        Ok(OutboxSummary {
            by_state: rows
                .into_iter()
                .map(|(s, n)| Ok((OutboxState::from_db(&s)?, n)))
                .collect::<StoreResult<_>>()?,
            oldest_pending: oldest.as_deref().map(parse_time).transpose()?,
        })
    }

    async fn deleted_entities(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT entity_type, entity_id FROM outbox WHERE operation = 'delete' \
             ORDER BY entity_type, entity_id",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    async fn hold_outbox(&self, ctx: &WriteCtx, ids: &[i64], batch_id: i64) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        held_tx(&mut tx, batch_id, true)
            .await?
            .ok_or(StoreError::NotFound)?;
        let held = hold_tx(&mut tx, ids, batch_id).await?;
        note(
            &mut tx,
            ctx,
            now,
            "HeldBatch",
            &batch_id.to_string(),
            "outbox.hold",
            json!({"outbox_ids": held}),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn list_outbox(
        &self,
        state: Option<OutboxState>,
        limit: i64,
    ) -> StoreResult<Vec<crate::OutboxEntry>> {
        let state = state.map(OutboxState::as_str);
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM outbox WHERE ($1::text IS NULL OR state = $1) ORDER BY id LIMIT $2"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(entry_row).collect()
    }

    async fn retry_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::OutboxEntry> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        let before = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if before.item.state != OutboxState::Dead {
            return Err(StoreError::Invalid(format!(
                "outbox item {id} is {}, not dead",
                before.item.state
            )));
        }
        sqlx::query(
            "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = $1, \
             lease_until = NULL, leased_by = NULL, dead_reason = NULL, finished = NULL WHERE id = $2",
        )
        .bind(timefmt::format(now))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        note(
            &mut tx,
            ctx,
            now,
            "Outbox",
            &id.to_string(),
            "outbox.retry",
            json!({"dead_reason": before.dead_reason, "attempts": before.item.attempts}),
        )
        .await?;
        let after = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok(after)
    }

    async fn drop_outbox(&self, ctx: &WriteCtx, id: i64) -> StoreResult<crate::OutboxEntry> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        let before = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if ![OutboxState::Pending, OutboxState::Dead, OutboxState::Held]
            .contains(&before.item.state)
        {
            return Err(StoreError::Invalid(format!(
                "outbox item {id} is {}, not pending, dead or held",
                before.item.state
            )));
        }
        sqlx::query(
            "UPDATE outbox SET state = 'dropped', lease_until = NULL, finished = $1 WHERE id = $2",
        )
        .bind(timefmt::format(now))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        note(
            &mut tx,
            ctx,
            now,
            "Outbox",
            &id.to_string(),
            "outbox.drop",
            json!({"previous_state": before.item.state}),
        )
        .await?;
        let after = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok(after)
    }
}

impl PostgresStore {
    pub(super) async fn claim_due(
        &self,
        worker: &str,
        now: OffsetDateTime,
        lease: Duration,
        limit: usize,
        order: common::ClaimOrder,
    ) -> StoreResult<Vec<ClaimedEntity>> {
        let now_s = timefmt::format(now);
        let until = timefmt::format(now + lease);
        let mut tx = self.begin().await?;
        // Claims from every process one after another: the lease check below then sees every
        // committed lease, so an entity is never leased to two workers.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CLAIM_LOCK)
            .execute(&mut *tx)
            .await?;
        let page = limit.clamp(16, 1024);
        let sql = order.due_sql();
        let mut due = common::DueEntities::default();
        let mut from = Some(order.start());
        while let Some(at) = from {
            let rows: Vec<(i64, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(&now_s)
                .bind(at)
                .bind(i64::try_from(page).unwrap_or(i64::MAX))
                .fetch_all(&mut *tx)
                .await?;
            from = due.add_page(rows, page, limit);
        }
        let due = due.list;
        // Every entity's due rows leased in one statement; rows another transaction holds are
        // skipped (it is finishing them right now).
        let sql = format!(
            "UPDATE outbox SET lease_until = $1, leased_by = $2 WHERE id IN ( \
               SELECT o.id FROM outbox o \
               JOIN UNNEST($3::text[], $4::text[]) AS e(t, i) \
                 ON o.entity_type = e.t AND o.entity_id = e.i \
               WHERE o.state = 'pending' AND (o.lease_until IS NULL OR o.lease_until <= $5) \
               FOR UPDATE OF o SKIP LOCKED) \
             RETURNING {ITEM_COLS}"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(&until)
            .bind(worker)
            .bind(due.iter().map(|(t, _)| t.clone()).collect::<Vec<String>>())
            .bind(due.iter().map(|(_, i)| i.clone()).collect::<Vec<String>>())
            .bind(&now_s)
            .fetch_all(&mut *tx)
            .await?;
        let items = rows.iter().map(item_row).collect::<StoreResult<Vec<_>>>()?;
        let out = common::claimed_in_order(due, items);
        tx.commit().await?;
        Ok(out)
    }
}
