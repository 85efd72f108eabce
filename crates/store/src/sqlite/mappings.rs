//! [`Mappings`](crate::Mappings) on SQLite.

use super::*;
use crate::Mappings;

#[async_trait]
impl Mappings for SqliteStore {
    async fn upsert_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
        teamcity_id: &str,
        teamcity_name: &str,
    ) -> StoreResult<bool> {
        self.sync_upsert_mapping(ctx, kind, scim_id, teamcity_id, teamcity_name)
            .await
    }

    async fn upsert_mappings(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        items: &[(String, String, String)],
    ) -> StoreResult<usize> {
        self.sync_upsert_mappings(ctx, kind, items).await
    }

    async fn delete_mapping(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        scim_id: &str,
    ) -> StoreResult<bool> {
        self.sync_delete_mapping(ctx, kind, scim_id).await
    }

    async fn record_applied(
        &self,
        ctx: &WriteCtx,
        entries: &[crate::AuditEntry],
        links: &[crate::MappingLink],
    ) -> StoreResult<()> {
        self.sync_record_applied(ctx, entries, links).await
    }

    async fn mappings(&self, kind: ResourceKind) -> StoreResult<Vec<crate::Mapping>> {
        self.sync_mappings(kind, None).await
    }

    async fn mapping(
        &self,
        kind: ResourceKind,
        scim_id: &str,
    ) -> StoreResult<Option<crate::Mapping>> {
        Ok(self.sync_mappings(kind, Some(scim_id)).await?.pop())
    }
}
