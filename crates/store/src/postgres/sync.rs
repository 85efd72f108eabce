//! What the PostgreSQL sync bookkeeping capabilities share (`outbox`, `held`, `mappings`,
//! `audit_log`): row readers and the steps they take inside a transaction.
//!
//! Audited commands run under the chain-head lock ([`PostgresStore::begin_write`]). Claims are
//! not audited: they skip rows other transactions hold (`FOR UPDATE SKIP LOCKED`) and take a
//! transaction-scoped advisory lock, so two processes never lease one entity at once. Id lists
//! are bound as arrays (`= ANY($n)`), so no SQL is built from values.

use std::collections::HashMap;

use scim::ResourceKind;
use serde_json::Value;
use sqlx::Row;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;

use super::{Tx, append_event, chain_head, insert_events, record};
use crate::common::{self, Chain, Record, entity, new_event, opt_time, parse_time};
use crate::{
    AuditEntry, HeldBatch, MappingLink, OutboxEntry, OutboxItem, StoreError, StoreResult, WriteCtx,
    timefmt,
};
use crate::{HeldState, OutboxState};

pub(super) const ITEM_COLS: &str =
    "id, entity_type, entity_id, operation, detail, audit_seq, state, attempts";
pub(super) const ENTRY_COLS: &str = "id, entity_type, entity_id, operation, detail, audit_seq, state, attempts, \
     created, next_attempt_at, lease_until, leased_by, last_error, dead_reason, held_batch_id, finished";
pub(super) const HELD_COLS: &str =
    "id, created, source, outbox_ids, summary, removals, plan, state, decided_at, decided_by";

pub(super) fn ids_json(ids: &[i64]) -> String {
    Value::from(ids.to_vec()).to_string()
}

pub(super) fn item_row(r: &PgRow) -> StoreResult<OutboxItem> {
    Ok(OutboxItem {
        id: r.try_get("id")?,
        entity_type: r.try_get("entity_type")?,
        entity_id: r.try_get("entity_id")?,
        operation: r.try_get("operation")?,
        detail: r.try_get("detail")?,
        audit_seq: r.try_get("audit_seq")?,
        state: OutboxState::from_db(r.try_get("state")?)?,
        attempts: r.try_get("attempts")?,
    })
}

pub(super) fn entry_row(r: &PgRow) -> StoreResult<OutboxEntry> {
    Ok(OutboxEntry {
        item: item_row(r)?,
        created: parse_time(r.try_get("created")?)?,
        next_attempt_at: parse_time(r.try_get("next_attempt_at")?)?,
        lease_until: opt_time(r.try_get("lease_until")?)?,
        leased_by: r.try_get("leased_by")?,
        last_error: r.try_get("last_error")?,
        dead_reason: r.try_get("dead_reason")?,
        held_batch_id: r.try_get("held_batch_id")?,
        finished: opt_time(r.try_get("finished")?)?,
    })
}

pub(super) fn held_row(r: &PgRow) -> StoreResult<HeldBatch> {
    let ids: String = r.try_get("outbox_ids")?;
    let plan: String = r.try_get("plan")?;
    Ok(HeldBatch {
        id: r.try_get("id")?,
        created: parse_time(r.try_get("created")?)?,
        source: r.try_get("source")?,
        outbox_ids: serde_json::from_str(&ids)?,
        summary: r.try_get("summary")?,
        removals: r.try_get("removals")?,
        plan: serde_json::from_str(&plan)?,
        state: HeldState::from_db(r.try_get("state")?)?,
        decided_at: opt_time(r.try_get("decided_at")?)?,
        decided_by: r.try_get("decided_by")?,
    })
}

/// Appends `entries`, then upserts `links` and audits each changed link (`mapping.upsert`,
/// with the previous link), inside `tx`. Returns how many links changed.
pub(super) async fn append_applied(
    tx: &mut Tx,
    ctx: &WriteCtx,
    now: OffsetDateTime,
    entries: &[AuditEntry],
    links: &[MappingLink],
) -> StoreResult<usize> {
    let mut chain = Chain::new(ctx, now, chain_head(tx).await?);
    for e in entries {
        chain.push(new_event(e));
    }
    let mut changed = 0;
    for kind in [ResourceKind::User, ResourceKind::Group] {
        let of_kind: Vec<&MappingLink> = links.iter().filter(|l| l.kind == kind).collect();
        if of_kind.is_empty() {
            continue;
        }
        let ids: Vec<String> = of_kind.iter().map(|l| l.scim_id.clone()).collect();
        let prev: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT scim_id, teamcity_id, teamcity_name FROM mappings \
             WHERE kind = $1 AND scim_id = ANY($2) FOR UPDATE",
        )
        .bind(entity(kind))
        .bind(&ids)
        .fetch_all(&mut **tx)
        .await?;
        let rows = common::link_changes(&mut chain, kind, &of_kind, prev);
        changed += rows.len();
        if rows.is_empty() {
            continue;
        }
        // One row per SCIM id (the last link wins, as when applied one after another): an
        // upsert may not touch a row twice.
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, r) in rows.iter().enumerate() {
            last.insert(r.0.as_str(), i);
        }
        let (mut a, mut b, mut c) = (vec![], vec![], vec![]);
        for (i, r) in rows.iter().enumerate() {
            if last.get(r.0.as_str()) == Some(&i) {
                a.push(r.0.clone());
                b.push(r.1.clone());
                c.push(r.2.clone());
            }
        }
        sqlx::query(
            "INSERT INTO mappings (kind, scim_id, teamcity_id, teamcity_name, updated) \
             SELECT $1, u.s, u.i, u.n, $2 FROM UNNEST($3::text[], $4::text[], $5::text[]) AS u(s, i, n) \
             ON CONFLICT (kind, scim_id) DO UPDATE SET teamcity_id = excluded.teamcity_id, \
             teamcity_name = excluded.teamcity_name, updated = excluded.updated",
        )
        .bind(entity(kind))
        .bind(timefmt::format(now))
        .bind(a)
        .bind(b)
        .bind(c)
        .execute(&mut **tx)
        .await?;
    }
    insert_events(tx, &chain.events).await?;
    Ok(changed)
}

pub(super) async fn append_audit(
    tx: &mut Tx,
    ctx: &WriteCtx,
    now: OffsetDateTime,
    e: &AuditEntry,
) -> StoreResult<i64> {
    let ev = append_event(tx, ctx, now, new_event(e)).await?;
    Ok(ev.seq)
}

/// A success event without an outbox row.
pub(super) async fn note(
    tx: &mut Tx,
    ctx: &WriteCtx,
    now: OffsetDateTime,
    resource_type: &str,
    resource_id: &str,
    operation: &str,
    detail: Value,
) -> StoreResult<i64> {
    record(
        tx,
        ctx,
        now,
        Record::note(resource_type, resource_id, operation, detail),
    )
    .await
}

pub(super) async fn entry_tx(tx: &mut Tx, id: i64) -> StoreResult<Option<OutboxEntry>> {
    let sql = format!("SELECT {ENTRY_COLS} FROM outbox WHERE id = $1 FOR UPDATE");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(entry_row).transpose()
}

pub(super) async fn held_tx(tx: &mut Tx, id: i64, lock: bool) -> StoreResult<Option<HeldBatch>> {
    let sql = format!(
        "SELECT {HELD_COLS} FROM held_batches WHERE id = $1{}",
        if lock { " FOR UPDATE" } else { "" }
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(held_row).transpose()
}

/// Parks pending rows in a batch; returns the ids actually parked.
pub(super) async fn hold_tx(tx: &mut Tx, ids: &[i64], batch_id: i64) -> StoreResult<Vec<i64>> {
    let mut held: Vec<i64> = sqlx::query_scalar(
        "UPDATE outbox SET state = 'held', held_batch_id = $1, lease_until = NULL, leased_by = NULL \
         WHERE id = ANY($2) AND state = 'pending' RETURNING id",
    )
    .bind(batch_id)
    .bind(ids)
    .fetch_all(&mut **tx)
    .await?;
    held.sort_unstable();
    Ok(held)
}

/// A batch in one of `allowed` states (locked), or `NotFound` / `Invalid` naming its state.
pub(super) async fn held_in_state(
    tx: &mut Tx,
    id: i64,
    allowed: &[HeldState],
) -> StoreResult<HeldBatch> {
    let b = held_tx(tx, id, true).await?.ok_or(StoreError::NotFound)?;
    match common::held_state_error(id, b.state, allowed) {
        Some(e) => Err(e),
        None => Ok(b),
    }
}
