//! SQLite implementation of the sync bookkeeping commands (outbox claims and outcomes, dead
//! letters, mappings, held batches, pins, sync state, directory snapshot, standalone audit).
//!
//! Writes go through the single writer connection with `BEGIN IMMEDIATE` ([`SqliteStore::begin`]),
//! so a claim is atomic even with the CLI writing from another process. Id lists are bound as
//! one JSON array and expanded with `json_each`, so no SQL is built from values.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use scim::ResourceKind;
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use time::OffsetDateTime;

use super::{SqliteStore, Tx, append_event, chain_head, insert_events, record};
use crate::common::{
    self, Chain, HELD_STATES, OUTBOX_STATES, Record, check_state, entity, new_event, opt_time,
    parse_time, resource_type,
};
use crate::{
    AuditEntry, ClaimedEntity, DirectorySnapshot, FailedItem, HeldBatch, Mapping, MappingLink,
    MemberRef, OutboxEntry, OutboxItem, OutboxSummary, RetryPolicy, StoreError, StoreResult,
    WriteCtx,
    sync_model::{GroupDoc, UserDoc},
    timefmt,
};

/// The query that returns every row of a resource table as ONE row: a JSON array of
/// `[id, data]` pairs in creation order, built by concatenating the stored JSON text.
macro_rules! all_as_one_row {
    ($table:literal) => {
        concat!(
            "SELECT '[' || coalesce(group_concat('[' || json_quote(id) || ',' || data || ']', ",
            "',' ORDER BY seq), '') || ']' FROM ",
            $table
        )
    };
}

/// The queries of [`SqliteStore::sync_directory_of`], each an indexed lookup per id (checked
/// with `EXPLAIN QUERY PLAN` in the tests below). Id lists are one JSON array.
pub(super) const SCOPED_MEMBERS_OF_GROUPS: &str = "SELECT group_id, member_id, member_type, display FROM group_members \
     WHERE group_id IN (SELECT value FROM json_each(?))";
pub(super) const SCOPED_USERS: &str =
    "SELECT id, data FROM users WHERE id IN (SELECT value FROM json_each(?)) ORDER BY seq";
pub(super) const SCOPED_GROUPS_OF_USERS: &str = "SELECT group_id, member_id, member_type, display FROM group_members \
     WHERE member_id IN (SELECT value FROM json_each(?))";
pub(super) const SCOPED_GROUPS: &str =
    "SELECT id, data FROM groups WHERE id IN (SELECT value FROM json_each(?)) ORDER BY seq";

const ITEM_COLS: &str = "id, entity_type, entity_id, operation, detail, audit_seq, state, attempts";
const ENTRY_COLS: &str = "id, entity_type, entity_id, operation, detail, audit_seq, state, attempts, \
     created, next_attempt_at, lease_until, leased_by, last_error, dead_reason, held_batch_id, finished";
const HELD_COLS: &str =
    "id, created, source, outbox_ids, summary, removals, plan, state, decided_at, decided_by";

fn ids_json(ids: &[i64]) -> String {
    Value::from(ids.to_vec()).to_string()
}

fn item_row(r: &SqliteRow) -> StoreResult<OutboxItem> {
    Ok(OutboxItem {
        id: r.try_get("id")?,
        entity_type: r.try_get("entity_type")?,
        entity_id: r.try_get("entity_id")?,
        operation: r.try_get("operation")?,
        detail: r.try_get("detail")?,
        audit_seq: r.try_get("audit_seq")?,
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
    })
}

fn entry_row(r: &SqliteRow) -> StoreResult<OutboxEntry> {
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

fn held_row(r: &SqliteRow) -> StoreResult<HeldBatch> {
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
        state: r.try_get("state")?,
        decided_at: opt_time(r.try_get("decided_at")?)?,
        decided_by: r.try_get("decided_by")?,
    })
}

/// Appends `entries`, then upserts `links` and audits each changed link (`mapping.upsert`,
/// with the previous link), inside `tx`: one statement for the events, one read and one
/// upsert per resource kind, however many there are. Returns how many links changed.
async fn append_applied(
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
        let ids: Vec<&str> = of_kind.iter().map(|l| l.scim_id.as_str()).collect();
        let prev: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT scim_id, teamcity_id, teamcity_name FROM mappings \
             WHERE kind = ? AND scim_id IN (SELECT value FROM json_each(?))",
        )
        .bind(entity(kind))
        .bind(serde_json::to_string(&ids)?)
        .fetch_all(&mut **tx)
        .await?;
        let rows = common::link_changes(&mut chain, kind, &of_kind, prev);
        changed += rows.len();
        if !rows.is_empty() {
            let rows: Vec<Value> = rows.into_iter().map(|(a, b, c)| json!([a, b, c])).collect();
            // `WHERE true`: SQLite's grammar needs it between an upsert's SELECT and ON CONFLICT.
            sqlx::query(
                "INSERT INTO mappings (kind, scim_id, teamcity_id, teamcity_name, updated) \
                 SELECT ?, value->>0, value->>1, value->>2, ? FROM json_each(?) WHERE true \
                 ON CONFLICT (kind, scim_id) DO UPDATE SET teamcity_id = excluded.teamcity_id, \
                 teamcity_name = excluded.teamcity_name, updated = excluded.updated",
            )
            .bind(entity(kind))
            .bind(timefmt::format(now))
            .bind(Value::Array(rows).to_string())
            .execute(&mut **tx)
            .await?;
        }
    }
    insert_events(tx, &chain.events).await?;
    Ok(changed)
}

/// Appends an audit event with any outcome inside `tx`. The same chain logic as [`record`]
/// (which always writes `success`); the store tests verify the chain across both.
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
async fn note(
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

async fn entry_tx(tx: &mut Tx, id: i64) -> StoreResult<Option<OutboxEntry>> {
    let sql = format!("SELECT {ENTRY_COLS} FROM outbox WHERE id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(entry_row).transpose()
}

async fn held_tx(tx: &mut Tx, id: i64) -> StoreResult<Option<HeldBatch>> {
    let sql = format!("SELECT {HELD_COLS} FROM held_batches WHERE id = ?");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(held_row).transpose()
}

/// Parks pending rows in a batch; returns the ids actually parked.
async fn hold_tx(tx: &mut Tx, ids: &[i64], batch_id: i64) -> StoreResult<Vec<i64>> {
    let mut held: Vec<i64> = sqlx::query_scalar(
        "UPDATE outbox SET state = 'held', held_batch_id = ?, lease_until = NULL, leased_by = NULL \
         WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending' RETURNING id",
    )
    .bind(batch_id)
    .bind(ids_json(ids))
    .fetch_all(&mut **tx)
    .await?;
    held.sort_unstable();
    Ok(held)
}

/// A batch in one of `allowed` states, or `NotFound` / `Invalid` naming its state.
async fn held_in_state(tx: &mut Tx, id: i64, allowed: &[&str]) -> StoreResult<HeldBatch> {
    let b = held_tx(tx, id).await?.ok_or(StoreError::NotFound)?;
    match common::held_state_error(id, &b.state, allowed) {
        Some(e) => Err(e),
        None => Ok(b),
    }
}

impl SqliteStore {
    pub(super) async fn sync_claim_outbox(
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
        let mut out = Vec::with_capacity(due.len());
        let sql = format!(
            "UPDATE outbox SET lease_until = ?, leased_by = ? \
             WHERE entity_type = ? AND entity_id = ? AND state = 'pending' \
               AND (lease_until IS NULL OR lease_until <= ?) RETURNING {ITEM_COLS}"
        );
        for (entity_type, entity_id) in due {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(&until)
                .bind(worker)
                .bind(&entity_type)
                .bind(&entity_id)
                .bind(&now_s)
                .fetch_all(&mut *tx)
                .await?;
            let mut items = rows.iter().map(item_row).collect::<StoreResult<Vec<_>>>()?;
            items.sort_by_key(|i| i.id);
            out.push(ClaimedEntity {
                entity_type,
                entity_id,
                items,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn sync_complete_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        events: Vec<AuditEntry>,
    ) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        for e in &events {
            append_audit(&mut tx, ctx, now, e).await?;
        }
        let done: Vec<(i64, String, String)> = sqlx::query_as(
            "UPDATE outbox SET state = 'done', lease_until = NULL, finished = ? \
             WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending' \
             RETURNING id, entity_type, entity_id",
        )
        .bind(timefmt::format(now))
        .bind(ids_json(ids))
        .fetch_all(&mut *tx)
        .await?;
        let mut by_entity: BTreeMap<(String, String), Vec<i64>> = BTreeMap::new();
        for (id, ty, eid) in done {
            by_entity.entry((ty, eid)).or_default().push(id);
        }
        for ((ty, eid), mut ids) in by_entity {
            ids.sort_unstable();
            note(
                &mut tx,
                ctx,
                now,
                resource_type(&ty),
                &eid,
                "outbox.complete",
                json!({"outbox_ids": ids}),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn sync_fail_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        error: &str,
        transient: bool,
        now: OffsetDateTime,
        policy: &RetryPolicy,
    ) -> StoreResult<Vec<FailedItem>> {
        let mut tx = self.begin().await?;
        let rows: Vec<(i64, String, String, i64)> = sqlx::query_as(
            "SELECT id, entity_type, entity_id, attempts FROM outbox \
             WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending' ORDER BY id",
        )
        .bind(ids_json(ids))
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for (id, ty, eid, attempts) in rows {
            let d = common::fail_decision(id, attempts, error, transient, now, policy)?;
            let (attempts, dead_reason, next) = (d.attempts, d.dead_reason.clone(), d.next);
            sqlx::query(
                "UPDATE outbox SET attempts = ?, last_error = ?, lease_until = NULL, \
                 state = CASE WHEN ? IS NULL THEN state ELSE 'dead' END, \
                 dead_reason = ?, finished = CASE WHEN ? IS NULL THEN NULL ELSE ? END, \
                 next_attempt_at = COALESCE(?, next_attempt_at) WHERE id = ?",
            )
            .bind(attempts)
            .bind(error)
            .bind(&dead_reason)
            .bind(&dead_reason)
            .bind(&dead_reason)
            .bind(timefmt::format(now))
            .bind(next.map(timefmt::format))
            .bind(id)
            .execute(&mut *tx)
            .await?;
            let entry = common::fail_entry(id, &ty, eid, &d, error, transient);
            append_audit(&mut tx, ctx, self.now(), &entry).await?;
            out.push(FailedItem {
                id,
                attempts,
                next_attempt_at: next,
                dead_reason,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    pub(super) async fn sync_defer_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        reason: &str,
        until: OffsetDateTime,
    ) -> StoreResult<usize> {
        let mut tx = self.begin().await?;
        let n = sqlx::query(
            "UPDATE outbox SET last_error = ?, lease_until = NULL, next_attempt_at = ? \
             WHERE id IN (SELECT value FROM json_each(?)) AND state = 'pending'",
        )
        .bind(reason)
        .bind(timefmt::format(until))
        .bind(ids_json(ids))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let entry = common::defer_entry(ids, reason, until);
        append_audit(&mut tx, ctx, self.now(), &entry).await?;
        tx.commit().await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    pub(super) async fn sync_outbox_summary(&self) -> StoreResult<OutboxSummary> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM outbox GROUP BY state")
                .fetch_all(&self.read)
                .await?;
        let oldest: Option<String> =
            sqlx::query_scalar("SELECT MIN(created) FROM outbox WHERE state = 'pending'")
                .fetch_one(&self.read)
                .await?;
        Ok(OutboxSummary {
            by_state: rows.into_iter().collect(),
            oldest_pending: oldest.as_deref().map(parse_time).transpose()?,
        })
    }

    pub(super) async fn sync_deleted_entities(&self) -> StoreResult<Vec<(String, String)>> {
        Ok(sqlx::query_as(
            "SELECT DISTINCT entity_type, entity_id FROM outbox WHERE operation = 'delete' \
             ORDER BY entity_type, entity_id",
        )
        .fetch_all(&self.read)
        .await?)
    }

    pub(super) async fn sync_hold_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        batch_id: i64,
    ) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        held_tx(&mut tx, batch_id)
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

    pub(super) async fn sync_list_outbox(
        &self,
        state: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<OutboxEntry>> {
        check_state(state, OUTBOX_STATES, "outbox")?;
        let sql = format!(
            "SELECT {ENTRY_COLS} FROM outbox WHERE (? IS NULL OR state = ?) ORDER BY id LIMIT ?"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state)
            .bind(state)
            .bind(limit)
            .fetch_all(&self.read)
            .await?;
        rows.iter().map(entry_row).collect()
    }

    pub(super) async fn sync_retry_outbox(
        &self,
        ctx: &WriteCtx,
        id: i64,
    ) -> StoreResult<OutboxEntry> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let before = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if before.item.state != "dead" {
            return Err(StoreError::Invalid(format!(
                "outbox item {id} is {}, not dead",
                before.item.state
            )));
        }
        sqlx::query(
            "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, \
             lease_until = NULL, leased_by = NULL, dead_reason = NULL, finished = NULL WHERE id = ?",
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

    pub(super) async fn sync_drop_outbox(
        &self,
        ctx: &WriteCtx,
        id: i64,
    ) -> StoreResult<OutboxEntry> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let before = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if !["pending", "dead", "held"].contains(&before.item.state.as_str()) {
            return Err(StoreError::Invalid(format!(
                "outbox item {id} is {}, not pending, dead or held",
                before.item.state
            )));
        }
        sqlx::query(
            "UPDATE outbox SET state = 'dropped', lease_until = NULL, finished = ? WHERE id = ?",
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

    pub(super) async fn sync_upsert_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
        teamcity_id: &str,
        teamcity_name: &str,
    ) -> StoreResult<bool> {
        let items = [(
            scim_id.to_owned(),
            teamcity_id.to_owned(),
            teamcity_name.to_owned(),
        )];
        Ok(self.sync_upsert_mappings(ctx, kind, &items).await? > 0)
    }

    /// Upserts many links in one transaction (an initial load links thousands at once); each
    /// changed link is audited. Returns how many changed.
    pub(super) async fn sync_upsert_mappings(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        items: &[(String, String, String)],
    ) -> StoreResult<usize> {
        let links = common::links_from_items(kind, items);
        let now = self.now();
        let mut tx = self.begin().await?;
        let changed = append_applied(&mut tx, ctx, now, &[], &links).await?;
        tx.commit().await?;
        Ok(changed)
    }

    pub(super) async fn sync_record_applied(
        &self,
        ctx: &WriteCtx,
        entries: &[AuditEntry],
        links: &[MappingLink],
    ) -> StoreResult<()> {
        if entries.is_empty() && links.is_empty() {
            return Ok(());
        }
        let now = self.now();
        let mut tx = self.begin().await?;
        append_applied(&mut tx, ctx, now, entries, links).await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn sync_delete_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
    ) -> StoreResult<bool> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let prev: Option<(String, String)> = sqlx::query_as(
            "DELETE FROM mappings WHERE kind = ? AND scim_id = ? RETURNING teamcity_id, teamcity_name",
        )
        .bind(entity(kind))
        .bind(scim_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((teamcity_id, teamcity_name)) = prev else {
            return Ok(false);
        };
        note(
            &mut tx,
            ctx,
            now,
            "Mapping",
            &format!("{}:{scim_id}", entity(kind)),
            "mapping.delete",
            json!({"teamcity_id": teamcity_id, "teamcity_name": teamcity_name}),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    pub(super) async fn sync_mappings(
        &self,
        kind: ResourceKind,
        scim_id: Option<&str>,
    ) -> StoreResult<Vec<Mapping>> {
        // One row holding them all (a JSON array): a reconcile after an initial load reads
        // 11,000 links, and each row sqlx hands over is a round trip to the connection's thread.
        let all: String = sqlx::query_scalar(
            "SELECT json_group_array(json_array(scim_id, teamcity_id, teamcity_name, updated) \
             ORDER BY scim_id) FROM mappings WHERE kind = ? AND (? IS NULL OR scim_id = ?)",
        )
        .bind(entity(kind))
        .bind(scim_id)
        .bind(scim_id)
        .fetch_one(&self.read)
        .await?;
        let rows: Vec<(String, String, String, String)> = serde_json::from_str(&all)?;
        rows.into_iter()
            .map(|(scim_id, teamcity_id, teamcity_name, updated)| {
                Ok(Mapping {
                    kind,
                    scim_id,
                    teamcity_id,
                    teamcity_name,
                    updated: parse_time(&updated)?,
                })
            })
            .collect()
    }

    pub(super) async fn sync_create_held(
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

    pub(super) async fn sync_list_held(&self, state: Option<&str>) -> StoreResult<Vec<HeldBatch>> {
        check_state(state, HELD_STATES, "held batch")?;
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

    pub(super) async fn sync_held_batch(&self, id: i64) -> StoreResult<Option<HeldBatch>> {
        let sql = format!("SELECT {HELD_COLS} FROM held_batches WHERE id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.read)
            .await?;
        row.as_ref().map(held_row).transpose()
    }

    /// Moves a batch from one of `from` to `to` (recording who decided, except for `applied`)
    /// and its held outbox rows to `outbox_to`.
    async fn held_transition(
        &self,
        ctx: &WriteCtx,
        id: i64,
        from: &[&str],
        to: &str,
        operation: &str,
        outbox_to: Option<&str>,
    ) -> StoreResult<HeldBatch> {
        let now = self.now();
        let now_s = timefmt::format(now);
        let mut tx = self.begin().await?;
        let before = held_in_state(&mut tx, id, from).await?;
        if to == "applied" {
            sqlx::query("UPDATE held_batches SET state = ? WHERE id = ?")
                .bind(to)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE held_batches SET state = ?, decided_at = ?, decided_by = ? WHERE id = ?",
            )
            .bind(to)
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
                .bind(state)
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

    pub(super) async fn sync_approve_held(
        &self,
        ctx: &WriteCtx,
        id: i64,
    ) -> StoreResult<HeldBatch> {
        self.held_transition(ctx, id, &["held"], "approved", "sync.approve", None)
            .await
    }

    pub(super) async fn sync_mark_held_applied(&self, ctx: &WriteCtx, id: i64) -> StoreResult<()> {
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

    pub(super) async fn sync_drop_held(&self, ctx: &WriteCtx, id: i64) -> StoreResult<HeldBatch> {
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

    pub(super) async fn sync_pins(&self) -> StoreResult<BTreeMap<String, String>> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT rule, group_id FROM policy_pins")
            .fetch_all(&self.read)
            .await?;
        Ok(rows.into_iter().collect())
    }

    pub(super) async fn sync_set_pin(
        &self,
        ctx: &WriteCtx,
        rule: &str,
        group_id: &str,
    ) -> StoreResult<()> {
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

    pub(super) async fn sync_state_read(&self, key: &str) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT value FROM sync_state WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.read)
                .await?,
        )
    }

    pub(super) async fn sync_state_write(&self, key: &str, value: &str) -> StoreResult<()> {
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

    pub(super) async fn sync_state_increment(&self, key: &str) -> StoreResult<i64> {
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

    pub(super) async fn sync_directory(&self) -> StoreResult<DirectorySnapshot> {
        // One read transaction: in WAL mode the three queries see the same snapshot.
        let mut tx = self.read.begin().await?;
        // Each table comes back as ONE row, a JSON array of `[id, data]` pairs built by
        // concatenating the stored JSON text (no re-parse in SQLite): each row sqlx hands over
        // costs a round trip to the connection's thread, and an initial load has 10,000 users.
        let users: String = sqlx::query_scalar(all_as_one_row!("users"))
            .fetch_one(&mut *tx)
            .await?;
        // The users are parsed on another thread while SQLite reads the groups.
        let users = tokio::task::spawn_blocking(move || {
            serde_json::from_str::<Vec<(String, UserDoc)>>(&users).map(|list| {
                list.into_iter()
                    .map(|(id, doc)| doc.into_user(id))
                    .collect::<Vec<_>>()
            })
        });
        let groups: String = sqlx::query_scalar(all_as_one_row!("groups"))
            .fetch_one(&mut *tx)
            .await?;
        // One row per group, its members aggregated in SQL.
        let members: Vec<(String, String)> = sqlx::query_as(
            "SELECT group_id, \
             json_group_array(json_array(member_id, member_type, display) ORDER BY member_id) \
             FROM group_members GROUP BY group_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        let groups: Vec<(String, GroupDoc)> = serde_json::from_str(&groups)?;
        let mut by_group: HashMap<String, Vec<MemberRef>> = HashMap::with_capacity(members.len());
        for (group_id, list) in members {
            let list: Vec<(String, String, Option<String>)> = serde_json::from_str(&list)?;
            by_group.insert(group_id, common::member_refs(list));
        }
        let users = users
            .await
            .map_err(|e| StoreError::Other(format!("directory parse: {e}").into()))??;
        Ok(DirectorySnapshot {
            users,
            groups: groups
                .into_iter()
                .map(|(id, doc)| {
                    let members = by_group.remove(&id).unwrap_or_default();
                    doc.into_group(id, members)
                })
                .collect(),
        })
    }

    pub(super) async fn sync_directory_of(
        &self,
        users: &[String],
        groups: &[String],
    ) -> StoreResult<DirectorySnapshot> {
        let list = |ids: &[String]| Value::from(ids.to_vec()).to_string();
        // One read transaction: in WAL mode the four queries see the same snapshot.
        let mut tx = self.read.begin().await?;
        let full: Vec<common::MemberRow> = sqlx::query_as(SCOPED_MEMBERS_OF_GROUPS)
            .bind(list(groups))
            .fetch_all(&mut *tx)
            .await?;
        let user_ids = common::scoped_user_ids(users, &full);
        let user_rows: Vec<(String, String)> = sqlx::query_as(SCOPED_USERS)
            .bind(list(&user_ids))
            .fetch_all(&mut *tx)
            .await?;
        let loaded: Vec<String> = user_rows.iter().map(|(id, _)| id.clone()).collect();
        let memberships: Vec<common::MemberRow> = sqlx::query_as(SCOPED_GROUPS_OF_USERS)
            .bind(list(&loaded))
            .fetch_all(&mut *tx)
            .await?;
        let group_ids = common::scoped_group_ids(groups, &memberships);
        let group_rows: Vec<(String, String)> = sqlx::query_as(SCOPED_GROUPS)
            .bind(list(&group_ids))
            .fetch_all(&mut *tx)
            .await?;
        tx.rollback().await?;
        common::scoped_snapshot(user_rows, group_rows, groups, full, memberships)
    }

    pub(super) async fn sync_audit(&self, ctx: &WriteCtx, entry: AuditEntry) -> StoreResult<i64> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let seq = append_audit(&mut tx, ctx, now, &entry).await?;
        tx.commit().await?;
        Ok(seq)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Every query of a scoped directory read looks its rows up by index: no table is scanned.
    #[tokio::test]
    async fn scoped_directory_reads_use_indexes_only() {
        let store = SqliteStore::open("sqlite::memory:", Arc::new(crate::SystemClock))
            .await
            .expect("open");
        for sql in [
            SCOPED_MEMBERS_OF_GROUPS,
            SCOPED_USERS,
            SCOPED_GROUPS_OF_USERS,
            SCOPED_GROUPS,
        ] {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                    .bind("[\"a\",\"b\"]")
                    .fetch_all(&store.read)
                    .await
                    .expect("explain");
            let steps: Vec<&str> = plan.iter().map(|(_, _, _, d)| d.as_str()).collect();
            for table in ["users", "groups", "group_members"] {
                assert!(
                    !steps
                        .iter()
                        .any(|d| d.starts_with(&format!("SCAN {table}"))),
                    "{sql}: scans {table}: {steps:?}"
                );
            }
            assert!(
                steps
                    .iter()
                    .any(|d| d.starts_with("SEARCH ") && d.contains(" USING ")),
                "{sql}: no index used: {steps:?}"
            );
        }
    }
}

#[cfg(test)]
mod claim_plan_tests {
    use std::sync::Arc;

    use crate::common::ClaimOrder;

    /// Every claim lane follows an index to its rows and to each row's entity: a plan that
    /// scans (or answers the per-row question from the state index) made a claim cost the
    /// whole backlog for every row it took — 1.2 s per claim at 30,000 pending rows.
    #[tokio::test]
    async fn every_claim_lane_searches_indexes_and_never_scans_the_backlog() {
        let clock = Arc::new(crate::FixedClock::new(
            time::macros::datetime!(2026-01-01 00:00 UTC),
        ));
        let s = super::SqliteStore::open("sqlite::memory:", clock)
            .await
            .unwrap();
        for order in [ClaimOrder::Oldest, ClaimOrder::Newest, ClaimOrder::Linked] {
            let plan: Vec<(i64, i64, i64, String)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "EXPLAIN QUERY PLAN {}",
                order.due_sql()
            )))
            .bind("2026-01-01T00:00:00Z")
            .bind(order.start())
            .bind(256_i64)
            .fetch_all(&s.write)
            .await
            .unwrap();
            let steps: Vec<&str> = plan.iter().map(|p| p.3.as_str()).collect();
            let outer = if order == ClaimOrder::Linked {
                "SEARCH o USING INDEX outbox_claim_linked"
            } else {
                "SEARCH o USING INDEX outbox_claim "
            };
            assert!(
                steps.iter().any(|s| s.starts_with(outer)),
                "{order:?}: {steps:?}"
            );
            assert!(
                steps.iter().any(|s| s.starts_with(
                    "SEARCH l USING INDEX outbox_entity_state (entity_type=? AND entity_id=? AND state=?)"
                )),
                "{order:?}: {steps:?}"
            );
            assert!(
                !steps.iter().any(|s| s.starts_with("SCAN")),
                "{order:?}: {steps:?}"
            );
        }
    }
}
