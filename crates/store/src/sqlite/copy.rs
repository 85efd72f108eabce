//! `db copy` on SQLite: rows out and in as they are stored.

use sqlx::{AssertSqlSafe, Row, TypeInfo, ValueRef};

use super::SqliteStore;
use crate::StoreResult;
use crate::copy::{Cell, Rows};

#[async_trait::async_trait]
impl crate::TableCopy for SqliteStore {
    async fn copy_count(&self, table: &crate::copy::CopyTable) -> StoreResult<i64> {
        let n: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {}",
            table.name
        )))
        .fetch_one(&self.read)
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
            "SELECT * FROM {} ORDER BY {} LIMIT ? OFFSET ?",
            table.name, table.order
        )))
        .bind(limit)
        .bind(offset)
        .fetch_all(&self.read)
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
                        "INTEGER" => Cell::Int(row.try_get(i)?),
                        "BLOB" => Cell::Bytes(row.try_get(i)?),
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
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({})",
            table.name,
            rows.columns.join(", "),
            vec!["?"; rows.columns.len()].join(", ")
        );
        let mut tx = self.begin().await?;
        for row in &rows.rows {
            let mut q = sqlx::query(AssertSqlSafe(sql.clone()));
            for cell in row {
                q = match cell {
                    Cell::Null => q.bind(None::<String>),
                    Cell::Int(v) => q.bind(*v),
                    Cell::Text(v) => q.bind(v.clone()),
                    Cell::Bytes(v) => q.bind(v.clone()),
                };
            }
            q.execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn copy_finish(&self) -> StoreResult<()> {
        // AUTOINCREMENT keeps its counters in sqlite_sequence, which explicit ids move on; the
        // next audit seq is read from the trail itself.
        self.written();
        Ok(())
    }
}
