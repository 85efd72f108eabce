//! PostgreSQL implementation of the sync bookkeeping commands (outbox claims and outcomes, dead
//! letters, mappings, held batches, pins, sync state, directory snapshot, standalone audit).
//!
//! Audited commands run under the chain-head lock ([`PostgresStore::begin_write`]). Claims are
//! not audited: they skip rows other transactions hold (`FOR UPDATE SKIP LOCKED`) and take a
//! transaction-scoped advisory lock, so two processes never lease one entity at once. Id lists
//! are bound as arrays (`= ANY($n)`), so no SQL is built from values.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use scim::ResourceKind;
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::postgres::PgRow;
use time::OffsetDateTime;

use super::{PostgresStore, Tx, append_event, chain_head, insert_events, record};
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

/// The advisory lock key that serialises outbox claims across processes.
const CLAIM_LOCK: i64 = 0x7463_7363_696d_0001;

const ITEM_COLS: &str = "id, entity_type, entity_id, operation, detail, audit_seq, state, attempts";
const ENTRY_COLS: &str = "id, entity_type, entity_id, operation, detail, audit_seq, state, attempts, \
     created, next_attempt_at, lease_until, leased_by, last_error, dead_reason, held_batch_id, finished";
const HELD_COLS: &str =
    "id, created, source, outbox_ids, summary, removals, plan, state, decided_at, decided_by";

fn ids_json(ids: &[i64]) -> String {
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
        state: r.try_get("state")?,
        attempts: r.try_get("attempts")?,
    })
}

fn entry_row(r: &PgRow) -> StoreResult<OutboxEntry> {
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

fn held_row(r: &PgRow) -> StoreResult<HeldBatch> {
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
/// with the previous link), inside `tx`. Returns how many links changed.
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
    let sql = format!("SELECT {ENTRY_COLS} FROM outbox WHERE id = $1 FOR UPDATE");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    row.as_ref().map(entry_row).transpose()
}

async fn held_tx(tx: &mut Tx, id: i64, lock: bool) -> StoreResult<Option<HeldBatch>> {
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
async fn hold_tx(tx: &mut Tx, ids: &[i64], batch_id: i64) -> StoreResult<Vec<i64>> {
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
async fn held_in_state(tx: &mut Tx, id: i64, allowed: &[&str]) -> StoreResult<HeldBatch> {
    let b = held_tx(tx, id, true).await?.ok_or(StoreError::NotFound)?;
    match common::held_state_error(id, &b.state, allowed) {
        Some(e) => Err(e),
        None => Ok(b),
    }
}

impl PostgresStore {
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
        let mut out = Vec::with_capacity(due.len());
        let sql = format!(
            "UPDATE outbox SET lease_until = $1, leased_by = $2 WHERE id IN ( \
               SELECT id FROM outbox WHERE entity_type = $3 AND entity_id = $4 AND state = 'pending' \
               AND (lease_until IS NULL OR lease_until <= $5) FOR UPDATE SKIP LOCKED) \
             RETURNING {ITEM_COLS}"
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
            if items.is_empty() {
                // Another transaction is finishing those rows right now.
                continue;
            }
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
        let mut tx = self.begin_write().await?;
        for e in &events {
            append_audit(&mut tx, ctx, now, e).await?;
        }
        let done: Vec<(i64, String, String)> = sqlx::query_as(
            "UPDATE outbox SET state = 'done', lease_until = NULL, finished = $1 \
             WHERE id = ANY($2) AND state = 'pending' RETURNING id, entity_type, entity_id",
        )
        .bind(timefmt::format(now))
        .bind(ids)
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

    pub(super) async fn sync_defer_outbox(
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

    pub(super) async fn sync_outbox_summary(&self) -> StoreResult<OutboxSummary> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM outbox GROUP BY state")
                .fetch_all(&self.pool)
                .await?;
        let oldest: Option<String> =
            sqlx::query_scalar("SELECT MIN(created) FROM outbox WHERE state = 'pending'")
                .fetch_one(&self.pool)
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
        .fetch_all(&self.pool)
        .await?)
    }

    pub(super) async fn sync_hold_outbox(
        &self,
        ctx: &WriteCtx,
        ids: &[i64],
        batch_id: i64,
    ) -> StoreResult<()> {
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

    pub(super) async fn sync_list_outbox(
        &self,
        state: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<OutboxEntry>> {
        check_state(state, OUTBOX_STATES, "outbox")?;
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

    pub(super) async fn sync_retry_outbox(
        &self,
        ctx: &WriteCtx,
        id: i64,
    ) -> StoreResult<OutboxEntry> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        let before = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if before.item.state != "dead" {
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

    pub(super) async fn sync_drop_outbox(
        &self,
        ctx: &WriteCtx,
        id: i64,
    ) -> StoreResult<OutboxEntry> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        let before = entry_tx(&mut tx, id).await?.ok_or(StoreError::NotFound)?;
        if !["pending", "dead", "held"].contains(&before.item.state.as_str()) {
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

    pub(super) async fn sync_upsert_mappings(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        items: &[(String, String, String)],
    ) -> StoreResult<usize> {
        let links = common::links_from_items(kind, items);
        let now = self.now();
        let mut tx = self.begin_write().await?;
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
        let mut tx = self.begin_write().await?;
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
        let mut tx = self.begin_write().await?;
        let prev: Option<(String, String)> = sqlx::query_as(
            "DELETE FROM mappings WHERE kind = $1 AND scim_id = $2 RETURNING teamcity_id, teamcity_name",
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
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT scim_id, teamcity_id, teamcity_name, updated FROM mappings \
             WHERE kind = $1 AND ($2::text IS NULL OR scim_id = $2) ORDER BY scim_id",
        )
        .bind(entity(kind))
        .bind(scim_id)
        .fetch_all(&self.pool)
        .await?;
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
        let mut tx = self.begin_write().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO held_batches (created, source, outbox_ids, summary, removals, plan) \
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(timefmt::format(now))
        .bind(source)
        .bind(ids_json(outbox_ids))
        .bind(summary)
        .bind(removals)
        .bind(plan.to_string())
        .fetch_one(&mut *tx)
        .await?;
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
            "SELECT {HELD_COLS} FROM held_batches WHERE ($1::text IS NULL OR state = $1) ORDER BY id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(state)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(held_row).collect()
    }

    pub(super) async fn sync_held_batch(&self, id: i64) -> StoreResult<Option<HeldBatch>> {
        let sql = format!("SELECT {HELD_COLS} FROM held_batches WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(held_row).transpose()
    }

    /// Moves a batch from one of `from` to `to` (recording who decided, except for `applied`)
    /// and its held outbox rows to `outbox_to`.
    pub(super) async fn held_transition(
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
        let mut tx = self.begin_write().await?;
        let before = held_in_state(&mut tx, id, from).await?;
        if to == "applied" {
            sqlx::query("UPDATE held_batches SET state = $1 WHERE id = $2")
                .bind(to)
                .bind(id)
                .execute(&mut *tx)
                .await?;
        } else {
            sqlx::query(
                "UPDATE held_batches SET state = $1, decided_at = $2, decided_by = $3 WHERE id = $4",
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
                    "UPDATE outbox SET state = $1, finished = $2 \
                     WHERE held_batch_id = $3 AND state = 'held' RETURNING id",
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
        let after = held_tx(&mut tx, id, false)
            .await?
            .ok_or(StoreError::NotFound)?;
        tx.commit().await?;
        Ok(after)
    }

    pub(super) async fn sync_pins(&self) -> StoreResult<BTreeMap<String, String>> {
        let rows: Vec<(String, String)> = sqlx::query_as("SELECT rule, group_id FROM policy_pins")
            .fetch_all(&self.pool)
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
        let mut tx = self.begin_write().await?;
        let prev: Option<String> =
            sqlx::query_scalar("SELECT group_id FROM policy_pins WHERE rule = $1 FOR UPDATE")
                .bind(rule)
                .fetch_optional(&mut *tx)
                .await?;
        if prev.as_deref() == Some(group_id) {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO policy_pins (rule, group_id, pinned_at) VALUES ($1, $2, $3) \
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
            sqlx::query_scalar("SELECT value FROM sync_state WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    pub(super) async fn sync_state_write(&self, key: &str, value: &str) -> StoreResult<()> {
        // A transaction of its own, so a fenced view checks its fence in it.
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO sync_state (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    pub(super) async fn sync_state_add_one(&self, key: &str) -> StoreResult<i64> {
        // One statement: the conflicting row is locked, so concurrent increments never lose one.
        let mut tx = self.begin().await?;
        let v: String = sqlx::query_scalar(
            "INSERT INTO sync_state (key, value) VALUES ($1, '1') \
             ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(sync_state.value AS BIGINT) + 1 AS TEXT) \
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
        // One snapshot for the three queries.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let users: Vec<(String, String)> =
            sqlx::query_as("SELECT id, data FROM users ORDER BY seq")
                .fetch_all(&mut *tx)
                .await?;
        let groups: Vec<(String, String)> =
            sqlx::query_as("SELECT id, data FROM groups ORDER BY seq")
                .fetch_all(&mut *tx)
                .await?;
        let members: Vec<(String, String, String, Option<String>)> = sqlx::query_as(
            "SELECT group_id, member_id, member_type, display FROM group_members \
             ORDER BY group_id, member_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        let mut rows_by_group: HashMap<String, Vec<(String, String, Option<String>)>> =
            HashMap::new();
        for (g, m, ty, display) in members {
            rows_by_group.entry(g).or_default().push((m, ty, display));
        }
        let mut by_group: HashMap<String, Vec<MemberRef>> = rows_by_group
            .into_iter()
            .map(|(g, rows)| (g, common::member_refs(rows)))
            .collect();
        let users = users
            .into_iter()
            .map(|(id, data)| Ok(serde_json::from_str::<UserDoc>(&data)?.into_user(id)))
            .collect::<StoreResult<Vec<_>>>()?;
        let groups = groups
            .into_iter()
            .map(|(id, data)| {
                let members = by_group.remove(&id).unwrap_or_default();
                Ok(serde_json::from_str::<GroupDoc>(&data)?.into_group(id, members))
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(DirectorySnapshot { users, groups })
    }

    pub(super) async fn sync_directory_of(
        &self,
        users: &[String],
        groups: &[String],
    ) -> StoreResult<DirectorySnapshot> {
        // One snapshot for the four queries; each looks its rows up by primary key or index.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let full: Vec<common::MemberRow> = sqlx::query_as(
            "SELECT group_id, member_id, member_type, display FROM group_members \
             WHERE group_id = ANY($1)",
        )
        .bind(groups)
        .fetch_all(&mut *tx)
        .await?;
        let user_ids = common::scoped_user_ids(users, &full);
        let user_rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, data FROM users WHERE id = ANY($1) ORDER BY seq")
                .bind(&user_ids)
                .fetch_all(&mut *tx)
                .await?;
        let loaded: Vec<String> = user_rows.iter().map(|(id, _)| id.clone()).collect();
        let memberships: Vec<common::MemberRow> = sqlx::query_as(
            "SELECT group_id, member_id, member_type, display FROM group_members \
             WHERE member_id = ANY($1)",
        )
        .bind(&loaded)
        .fetch_all(&mut *tx)
        .await?;
        let group_ids = common::scoped_group_ids(groups, &memberships);
        let group_rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, data FROM groups WHERE id = ANY($1) ORDER BY seq")
                .bind(&group_ids)
                .fetch_all(&mut *tx)
                .await?;
        tx.rollback().await?;
        common::scoped_snapshot(user_rows, group_rows, groups, full, memberships)
    }

    pub(super) async fn sync_audit(&self, ctx: &WriteCtx, entry: AuditEntry) -> StoreResult<i64> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        let seq = append_audit(&mut tx, ctx, now, &entry).await?;
        tx.commit().await?;
        Ok(seq)
    }
}
