//! `db copy` on PostgreSQL: rows out and in as they are stored.

use std::collections::HashMap;

use sqlx::{AssertSqlSafe, Row, TypeInfo, ValueRef};

use super::PostgresStore;
use crate::StoreResult;
use crate::copy::{COPY_TABLES, Cell, Rows};

/// Tables whose id column is a sequence, and that column.
const SERIALS: &[(&str, &str)] = &[
    ("users", "seq"),
    ("groups", "seq"),
    ("outbox", "id"),
    ("held_batches", "id"),
    ("audit_checkpoints", "id"),
];

#[async_trait::async_trait]
impl crate::TableCopy for PostgresStore {
    async fn copy_count(&self, table: &crate::copy::CopyTable) -> StoreResult<i64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            table.name
        )))
        .fetch_one(&self.pool)
        .await?;
        Ok(n)
    }

    async fn copy_out(
        &self,
        table: &crate::copy::CopyTable,
        offset: i64,
        limit: i64,
    ) -> StoreResult<crate::copy::Rows> {
        let rows = sqlx::query(AssertSqlSafe(format!(
            "SELECT * FROM {} ORDER BY {} LIMIT $1 OFFSET $2",
            table.name, table.order
        )))
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Rows::default();
        for row in &rows {
            if out.columns.is_empty() {
                out.columns = row
                    .columns()
                    .iter()
                    .map(|c| sqlx::Column::name(c).to_owned())
                    .collect();
            }
            let mut cells = Vec::with_capacity(out.columns.len());
            for i in 0..out.columns.len() {
                let raw = row.try_get_raw(i)?;
                let cell = if raw.is_null() {
                    Cell::Null
                } else {
                    match raw.type_info().name() {
                        "INT8" => Cell::Int(row.try_get(i)?),
                        "INT4" => Cell::Int(i64::from(row.try_get::<i32, _>(i)?)),
                        "BYTEA" => Cell::Bytes(row.try_get(i)?),
                        _ => Cell::Text(row.try_get(i)?),
                    }
                };
                cells.push(cell);
            }
            out.rows.push(cells);
        }
        Ok(out)
    }

    async fn copy_in(
        &self,
        table: &crate::copy::CopyTable,
        rows: &crate::copy::Rows,
    ) -> StoreResult<()> {
        if rows.rows.is_empty() {
            return Ok(());
        }
        let types: HashMap<String, String> = sqlx::query_as(
            "SELECT column_name::text, data_type::text FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = $1",
        )
        .bind(table.name)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let placeholders: Vec<String> = (1..=rows.columns.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            table.name,
            rows.columns.join(", "),
            placeholders.join(", ")
        );
        let mut tx = self.begin().await?;
        for row in &rows.rows {
            let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
            for (cell, column) in row.iter().zip(&rows.columns) {
                let ty = types.get(column).map(String::as_str).unwrap_or("text");
                q = match (cell, ty) {
                    (Cell::Null, "bigint" | "integer") => q.bind(None::<i64>),
                    (Cell::Null, "bytea") => q.bind(None::<Vec<u8>>),
                    (Cell::Null, _) => q.bind(None::<String>),
                    (Cell::Int(v), _) => q.bind(*v),
                    (Cell::Text(v), _) => q.bind(v.clone()),
                    (Cell::Bytes(v), _) => q.bind(v.clone()),
                };
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn copy_finish(&self) -> StoreResult<()> {
        let mut tx = self.begin_write().await?;
        for (table, column) in SERIALS {
            debug_assert!(COPY_TABLES.iter().any(|t| t.name == *table));
            sqlx::query(AssertSqlSafe(format!(
                "SELECT setval(pg_get_serial_sequence('{table}', '{column}'), \
                 COALESCE((SELECT MAX({column}) FROM {table}), 1), \
                 (SELECT MAX({column}) FROM {table}) IS NOT NULL)"
            )))
            .execute(&mut *tx)
            .await?;
        }
        // The chain continues from the newest copied event (or the newest checkpoint when every
        // event was pruned).
        let head: Option<(i64, String)> =
            sqlx::query_as("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&mut *tx)
                .await?;
        let head =
            match head {
                Some(h) => Some(h),
                None => sqlx::query_as(
                    "SELECT last_seq, last_hash FROM audit_checkpoints ORDER BY id DESC LIMIT 1",
                )
                .fetch_optional(&mut *tx)
                .await?,
            };
        if let Some((seq, hash)) = head {
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                .bind(seq)
                .bind(hash)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
