//! [`Mappings`](crate::Mappings) on PostgreSQL.

use scim::ResourceKind;
use serde_json::json;

use super::PostgresStore;
use super::sync::*;
use super::*;
use crate::Mappings;
use crate::common::{self, entity, parse_time};
use crate::{Mapping, StoreResult, WriteCtx};

#[async_trait]
impl Mappings for PostgresStore {
    async fn upsert_mappings(
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

    async fn delete_mapping(
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
        let mut tx = self.begin_write().await?;
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

impl PostgresStore {
    pub(super) async fn load_mappings(
        &self,
        kind: ResourceKind,
        scim_ids: Option<&[String]>,
    ) -> StoreResult<Vec<Mapping>> {
        let rows: Vec<(String, String, String, String)> = sqlx::query_as(
            "SELECT scim_id, teamcity_id, teamcity_name, updated FROM mappings \
             WHERE kind = $1 AND ($2::text[] IS NULL OR scim_id = ANY($2)) ORDER BY scim_id",
        )
        .bind(entity(kind))
        .bind(scim_ids)
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
}
