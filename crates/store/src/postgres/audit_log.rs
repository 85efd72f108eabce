//! Audit export ranges, prune checkpoints and retention (PostgreSQL).

use sqlx::Row;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;

use super::sync::append_audit;
use super::{PostgresStore, append_event};
use crate::audit::{AuditEvent, Checkpoint};
use crate::common::PruneReplay;
use crate::{StoreResult, WriteCtx, timefmt};

const EVENT_COLS: &str = "seq, time, actor, request_id, resource_type, resource_id, operation, \
     outcome, status, detail, prev_hash, hash";

const CHECKPOINT_COLS: &str =
    "id, created, last_seq, last_hash, last_time, pruned, total_pruned, snapshot, signature";

fn event_row(r: &PgRow) -> StoreResult<AuditEvent> {
    Ok(AuditEvent {
        seq: r.try_get("seq")?,
        time: r.try_get("time")?,
        actor: r.try_get("actor")?,
        request_id: r.try_get("request_id")?,
        resource_type: r.try_get("resource_type")?,
        resource_id: r.try_get("resource_id")?,
        operation: r.try_get("operation")?,
        outcome: r.try_get("outcome")?,
        status: r.try_get("status")?,
        detail: r.try_get("detail")?,
        prev_hash: r.try_get("prev_hash")?,
        hash: r.try_get("hash")?,
    })
}

fn checkpoint_row(r: &PgRow) -> StoreResult<Checkpoint> {
    let snapshot: String = r.try_get("snapshot")?;
    Ok(Checkpoint {
        id: r.try_get("id")?,
        created: r.try_get("created")?,
        last_seq: r.try_get("last_seq")?,
        last_hash: r.try_get("last_hash")?,
        last_time: r.try_get("last_time")?,
        pruned: r.try_get("pruned")?,
        total_pruned: r.try_get("total_pruned")?,
        snapshot: serde_json::from_str(&snapshot)?,
        signature: r.try_get("signature")?,
    })
}

#[async_trait::async_trait]
impl crate::AuditLog for PostgresStore {
    async fn audit_events(&self, after: i64, limit: i64) -> StoreResult<Vec<AuditEvent>> {
        self.audit_range(None, None, after, limit).await
    }

    async fn audit_recent(&self, before: Option<i64>, limit: i64) -> StoreResult<Vec<AuditEvent>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLS} FROM audit_events WHERE ($1::bigint IS NULL OR seq < $1) \
             ORDER BY seq DESC LIMIT $2"
        )))
        .bind(before)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_row).collect()
    }

    async fn audit_range(
        &self,
        since: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEvent>> {
        // The stored form is fixed-width UTC (and the column byte-ordered), so text comparison
        // is time comparison.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLS} FROM audit_events WHERE seq > $1 \
             AND ($2::text IS NULL OR time >= $2) AND ($3::text IS NULL OR time <= $3) \
             ORDER BY seq LIMIT $4"
        )))
        .bind(after)
        .bind(since.map(timefmt::format))
        .bind(until.map(timefmt::format))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(event_row).collect()
    }

    async fn audit_checkpoint(&self) -> StoreResult<Option<crate::Checkpoint>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CHECKPOINT_COLS} FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
        )))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(checkpoint_row).transpose()
    }

    async fn prune_audit(
        &self,
        ctx: &WriteCtx,
        before: OffsetDateTime,
        key: &[u8],
    ) -> StoreResult<Option<crate::Checkpoint>> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        let prev = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CHECKPOINT_COLS} FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
        )))
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(checkpoint_row)
        .transpose()?;
        let mut replay = PruneReplay::start(prev.as_ref(), key, before)?;
        let cutoff = replay.cutoff().to_owned();
        // Replay (and check) what will be deleted, a page at a time.
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {EVENT_COLS} FROM audit_events WHERE seq > $1 ORDER BY seq LIMIT 500"
            )))
            .bind(replay.seq)
            .fetch_all(&mut *tx)
            .await?;
            let page = rows
                .iter()
                .map(event_row)
                .collect::<StoreResult<Vec<_>>>()?;
            if !replay.feed(page)? {
                break;
            }
        }
        let Some(mut cp) = replay.checkpoint(now, key) else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM audit_events WHERE seq <= $1")
            .bind(cp.last_seq)
            .execute(&mut *tx)
            .await?;
        cp.id = sqlx::query_scalar(
            "INSERT INTO audit_checkpoints (created, last_seq, last_hash, last_time, pruned, \
             total_pruned, snapshot, signature) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        )
        .bind(&cp.created)
        .bind(cp.last_seq)
        .bind(&cp.last_hash)
        .bind(&cp.last_time)
        .bind(cp.pruned)
        .bind(cp.total_pruned)
        .bind(cp.snapshot.to_string())
        .bind(&cp.signature)
        .fetch_one(&mut *tx)
        .await?;
        let cp_id = cp.id.to_string();
        append_event(
            &mut tx,
            ctx,
            now,
            PruneReplay::prune_event(&cp, &cp_id, &cutoff),
        )
        .await?;
        tx.commit().await?;
        Ok(Some(cp))
    }

    async fn audit(&self, ctx: &WriteCtx, entry: crate::AuditEntry) -> StoreResult<i64> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        let seq = append_audit(&mut tx, ctx, now, &entry).await?;
        tx.commit().await?;
        Ok(seq)
    }
}
