//! Audit export ranges, prune checkpoints and retention.

use serde_json::json;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;

use super::{NewEvent, SqliteStore, append_event};
use crate::access::AccessState;
use crate::audit::{AuditEvent, Checkpoint, GENESIS_HASH, link_error};
use crate::{StoreError, StoreResult, WriteCtx, timefmt};

const EVENT_COLS: &str = "seq, time, actor, request_id, resource_type, resource_id, operation, \
     outcome, status, detail, prev_hash, hash";

fn event_row(r: &SqliteRow) -> StoreResult<AuditEvent> {
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

fn checkpoint_row(r: &SqliteRow) -> StoreResult<Checkpoint> {
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

const CHECKPOINT_COLS: &str =
    "id, created, last_seq, last_hash, last_time, pruned, total_pruned, snapshot, signature";

impl SqliteStore {
    pub(super) async fn audit_log_range(
        &self,
        since: Option<OffsetDateTime>,
        until: Option<OffsetDateTime>,
        after: i64,
        limit: i64,
    ) -> StoreResult<Vec<AuditEvent>> {
        // The stored form is fixed-width UTC, so text comparison is time comparison.
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLS} FROM audit_events WHERE seq > ? \
             AND (? IS NULL OR time >= ?) AND (? IS NULL OR time <= ?) ORDER BY seq LIMIT ?"
        )))
        .bind(after)
        .bind(since.map(timefmt::format))
        .bind(since.map(timefmt::format))
        .bind(until.map(timefmt::format))
        .bind(until.map(timefmt::format))
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(event_row).collect()
    }

    pub(super) async fn audit_log_recent(
        &self,
        before: Option<i64>,
        limit: i64,
    ) -> StoreResult<Vec<AuditEvent>> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {EVENT_COLS} FROM audit_events WHERE (? IS NULL OR seq < ?) \
             ORDER BY seq DESC LIMIT ?"
        )))
        .bind(before)
        .bind(before)
        .bind(limit)
        .fetch_all(&self.read)
        .await?;
        rows.iter().map(event_row).collect()
    }

    pub(super) async fn audit_log_checkpoint(&self) -> StoreResult<Option<Checkpoint>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CHECKPOINT_COLS} FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
        )))
        .fetch_optional(&self.read)
        .await?;
        row.as_ref().map(checkpoint_row).transpose()
    }

    pub(super) async fn audit_log_prune(
        &self,
        ctx: &WriteCtx,
        before: OffsetDateTime,
        key: &[u8],
    ) -> StoreResult<Option<Checkpoint>> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let prev = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CHECKPOINT_COLS} FROM audit_checkpoints ORDER BY id DESC LIMIT 1"
        )))
        .fetch_optional(&mut *tx)
        .await?
        .as_ref()
        .map(checkpoint_row)
        .transpose()?;
        if let Some(p) = &prev
            && !p.signature_valid(key)
        {
            return Err(StoreError::Invalid(format!(
                "audit checkpoint {} has an invalid signature: refusing to prune (run `audit verify`)",
                p.id
            )));
        }
        let (mut seq, mut hash, mut state, total) = match &prev {
            Some(p) => (
                p.last_seq,
                p.last_hash.clone(),
                AccessState::from_snapshot(&p.snapshot)?,
                p.total_pruned,
            ),
            None => (0, GENESIS_HASH.to_owned(), AccessState::default(), 0),
        };
        state.last_seq = seq;
        // Replay (and check) what will be deleted, a page at a time.
        let cutoff = timefmt::format(before);
        let mut pruned = 0i64;
        let mut last_time = String::new();
        loop {
            let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT {EVENT_COLS} FROM audit_events WHERE seq > ? ORDER BY seq LIMIT 500"
            )))
            .bind(seq)
            .fetch_all(&mut *tx)
            .await?;
            let mut done = rows.is_empty();
            for r in &rows {
                let e = event_row(r)?;
                if e.time >= cutoff {
                    done = true;
                    break;
                }
                if let Some(reason) = link_error(seq, &hash, &e) {
                    return Err(StoreError::Invalid(format!(
                        "audit chain broken at seq {}: {reason}; refusing to prune",
                        e.seq
                    )));
                }
                state.apply(&e);
                seq = e.seq;
                hash = e.hash;
                last_time = e.time;
                pruned += 1;
            }
            if done {
                break;
            }
        }
        if pruned == 0 {
            return Ok(None);
        }
        sqlx::query("DELETE FROM audit_events WHERE seq <= ?")
            .bind(seq)
            .execute(&mut *tx)
            .await?;
        let mut cp = Checkpoint {
            id: 0,
            created: timefmt::format(now),
            last_seq: seq,
            last_hash: hash,
            last_time,
            pruned,
            total_pruned: total + pruned,
            snapshot: state.snapshot(),
            signature: String::new(),
        };
        cp.sign(key);
        cp.id = sqlx::query(
            "INSERT INTO audit_checkpoints (created, last_seq, last_hash, last_time, pruned, \
             total_pruned, snapshot, signature) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&cp.created)
        .bind(cp.last_seq)
        .bind(&cp.last_hash)
        .bind(&cp.last_time)
        .bind(cp.pruned)
        .bind(cp.total_pruned)
        .bind(cp.snapshot.to_string())
        .bind(&cp.signature)
        .execute(&mut *tx)
        .await?
        .last_insert_rowid();
        let cp_id = cp.id.to_string();
        append_event(
            &mut tx,
            ctx,
            now,
            NewEvent {
                resource_type: "Audit",
                resource_id: Some(&cp_id),
                operation: "audit.prune",
                outcome: "success",
                status: Some(200),
                detail: json!({
                    "before": cutoff,
                    "pruned": pruned,
                    "last_seq": cp.last_seq,
                    "total_pruned": cp.total_pruned,
                }),
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Some(cp))
    }
}
