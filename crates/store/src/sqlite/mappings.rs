//! [`Mappings`](crate::Mappings) on SQLite.

use scim::ResourceKind;
use serde_json::json;

use super::SqliteStore;
use super::sync::*;
use super::*;
use crate::Mappings;
use crate::common::{self, entity, parse_time};
use crate::{Mapping, StoreResult, WriteCtx};

#[async_trait]
impl Mappings for SqliteStore {
    async fn upsert_mappings(
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

    async fn delete_mapping(
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

    async fn record_applied(
        &self,
        ctx: &WriteCtx,
        entries: &[crate::AuditEntry],
        links: &[crate::MappingLink],
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

    async fn mappings(&self, kind: ResourceKind) -> StoreResult<Vec<crate::Mapping>> {
        self.load_mappings(kind, None).await
    }

    async fn mappings_of(
        &self,
        kind: ResourceKind,
        scim_ids: &[String],
    ) -> StoreResult<Vec<crate::Mapping>> {
        if scim_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.load_mappings(kind, Some(scim_ids)).await
    }
}

impl SqliteStore {
    pub(super) async fn load_mappings(
        &self,
        kind: ResourceKind,
        scim_ids: Option<&[String]>,
    ) -> StoreResult<Vec<Mapping>> {
        // One row holding them all (a JSON array): a reconcile after an initial load reads
        // 11,000 links, and each row sqlx hands over is a round trip to the connection's thread.
        const SELECT: &str = "SELECT coalesce(json_group_array(json_array(scim_id, teamcity_id, \
             teamcity_name, updated) ORDER BY scim_id), '[]') FROM mappings WHERE kind = ?";
        let all: String = match scim_ids {
            None => {
                sqlx::query_scalar(SELECT)
                    .bind(entity(kind))
                    .fetch_one(&self.read)
                    .await?
            }
            Some(ids) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                    "{SELECT} AND scim_id IN (SELECT value FROM json_each(?))"
                )))
                .bind(entity(kind))
                .bind(serde_json::Value::from(ids.to_vec()).to_string())
                .fetch_one(&self.read)
                .await?
            }
        };
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
}
