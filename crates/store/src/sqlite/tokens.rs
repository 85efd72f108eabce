//! [`Tokens`](crate::Tokens) on SQLite.

use super::*;
use crate::Tokens;

#[async_trait]
impl Tokens for SqliteStore {
    async fn create_scoped_token(
        &self,
        ctx: &WriteCtx,
        scope: TokenScope,
        name: &str,
        hash: [u8; 32],
        expires: Option<OffsetDateTime>,
    ) -> StoreResult<TokenRecord> {
        let now = self.now();
        let id = common::new_token_id();
        let mut tx = self.begin().await?;
        sqlx::query(
            "INSERT INTO api_tokens (id, name, hash, created, expires, scope) VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(name)
        .bind(&hash[..])
        .bind(timefmt::format(now))
        .bind(expires.map(timefmt::format))
        .bind(scope.as_str())
        .execute(&mut *tx)
        .await?;
        record(
            &mut tx,
            ctx,
            now,
            Record {
                resource_type: "Token",
                resource_id: &id,
                operation: "token.create",
                status: 201,
                detail: json!({"name": name, "scope": scope.as_str(), "expires": expires.map(timefmt::format)}),
                outbox: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(TokenRecord {
            id,
            scope,
            name: name.to_owned(),
            created: now,
            expires,
            revoked: None,
        })
    }

    async fn list_tokens(&self) -> StoreResult<Vec<TokenRecord>> {
        let rows: Vec<TokenRow> = sqlx::query_as(
            "SELECT id, name, created, expires, revoked, scope FROM api_tokens ORDER BY created DESC, id",
        )
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(token_row).collect()
    }

    async fn revoke_token(&self, ctx: &WriteCtx, id: &str) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        let r = sqlx::query("UPDATE api_tokens SET revoked = ? WHERE id = ? AND revoked IS NULL")
            .bind(timefmt::format(now))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        if r.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        record(
            &mut tx,
            ctx,
            now,
            Record {
                resource_type: "Token",
                resource_id: id,
                operation: "token.revoke",
                status: 200,
                detail: json!({}),
                outbox: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn valid_token_hashes(&self) -> StoreResult<Vec<([u8; 32], TokenRecord)>> {
        let rows: Vec<(Vec<u8>, String, String, String, Option<String>, Option<String>, String)> =
            sqlx::query_as(
                "SELECT hash, id, name, created, expires, revoked, scope FROM api_tokens WHERE revoked IS NULL",
            )
            .fetch_all(&self.read)
            .await?;
        let now = self.now();
        let mut out = Vec::new();
        for (hash, id, name, created, expires, revoked, scope) in rows {
            let rec = token_row((id, name, created, expires, revoked, scope))?;
            let Ok(hash) = <[u8; 32]>::try_from(hash.as_slice()) else {
                continue;
            };
            if rec.is_valid_at(now) {
                out.push((hash, rec));
            }
        }
        Ok(out)
    }
}
