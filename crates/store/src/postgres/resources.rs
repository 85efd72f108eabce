//! [`Resources`](crate::Resources) on PostgreSQL.

use super::*;
use crate::Resources;

#[async_trait]
impl Resources for PostgresStore {
    async fn create(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource> {
        let id = uuid::Uuid::new_v4().to_string();
        let mut tx = self.begin_resource_write().await?;
        create_in(
            &mut tx,
            ctx,
            self.now(),
            kind,
            &id,
            &attrs,
            members.as_deref(),
        )
        .await?;
        let r = read_one_tx(&mut tx, kind, &id, read_back(kind)).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn replace(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource> {
        let mut tx = self.begin_resource_write().await?;
        replace_in(
            &mut tx,
            ctx,
            self.now(),
            kind,
            id,
            expected_version,
            &attrs,
            members.as_deref(),
        )
        .await?;
        let r = read_one_tx(&mut tx, kind, id, read_back(kind)).await?;
        tx.commit().await?;
        Ok(r)
    }

    async fn update(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: i64,
        attrs: Option<Value>,
        members: &[MembershipChange],
    ) -> StoreResult<Resource> {
        self.update_at(ctx, kind, id, Some(expected_version), attrs, members)
            .await
    }

    async fn update_members(
        &self,
        ctx: &WriteCtx,
        id: &str,
        members: &[MembershipChange],
    ) -> StoreResult<Resource> {
        self.update_at(ctx, ResourceKind::Group, id, None, None, members)
            .await
    }

    async fn delete(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()> {
        let mut tx = self.begin_resource_write().await?;
        delete_in(&mut tx, ctx, self.now(), kind, id, expected_version).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn write_batch(
        &self,
        ctx: &WriteCtx,
        ops: &[BatchOp],
        state: Option<(&str, &str)>,
    ) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin_write().await?;
        for op in ops {
            match op {
                BatchOp::Create {
                    kind,
                    id,
                    attrs,
                    members,
                } => create_in(&mut tx, ctx, now, *kind, id, attrs, members.as_deref()).await?,
                BatchOp::Replace { kind, id, attrs } => {
                    replace_in(&mut tx, ctx, now, *kind, id, None, attrs, None).await?
                }
                BatchOp::Members { id, changes } => update_in(
                    &mut tx,
                    ctx,
                    now,
                    ResourceKind::Group,
                    id,
                    None,
                    None,
                    changes,
                )
                .await
                .map(|_| ())?,
                BatchOp::Delete { kind, id } => {
                    delete_in(&mut tx, ctx, now, *kind, id, None).await?
                }
                BatchOp::Audit(entry) => sync::append_audit(&mut tx, ctx, now, entry)
                    .await
                    .map(|_| ())?,
            }
        }
        if let Some((key, value)) = state {
            sqlx::query(
                "INSERT INTO sync_state (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn get(
        &self,
        kind: ResourceKind,
        id: &str,
        read: ReadOpts,
    ) -> StoreResult<Option<Resource>> {
        let sql = format!("{} WHERE t.id = $1", select_sql(kind, read));
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut r = row_to_resource(kind, &row, kind == ResourceKind::User && read.groups)?;
        if kind == ResourceKind::Group && read.members {
            r.members = Some(load_members(&self.pool, id).await?);
        }
        Ok(Some(r))
    }

    async fn member_count(&self, group_id: &str) -> StoreResult<usize> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM group_members WHERE group_id = $1")
            .bind(group_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    async fn member_count_exceeds(&self, group_id: &str, n: usize) -> StoreResult<bool> {
        let (c,): (i64,) = sqlx::query_as(
            "SELECT COUNT(*) FROM (SELECT 1 FROM group_members WHERE group_id = $1 LIMIT $2) x",
        )
        .bind(group_id)
        .bind(i64::try_from(n.saturating_add(1)).unwrap_or(i64::MAX))
        .fetch_one(&self.pool)
        .await?;
        Ok(usize::try_from(c).unwrap_or(0) > n)
    }

    async fn list(&self, kind: ResourceKind, q: &ListQuery) -> StoreResult<ListPage> {
        self.list_query(kind, q).await
    }

    async fn resource_generation(&self) -> StoreResult<Option<u64>> {
        let (g,): (i64,) = sqlx::query_as("SELECT resource_gen FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(Some(g as u64))
    }
}
