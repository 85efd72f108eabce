//! [`Resources`](crate::Resources) on SQLite.

use super::*;
use crate::Resources;

#[async_trait]
impl Resources for SqliteStore {
    async fn create(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource> {
        let id = uuid::Uuid::new_v4().to_string();
        let op = group_commit::Op::Create {
            kind,
            id: id.clone(),
            attrs: attrs.clone(),
            members: members.clone(),
        };
        if let Some(r) = self.submit(ctx, op).await {
            return r?.ok_or(StoreError::NotFound);
        }
        let now = self.now();
        let mut tx = self.begin().await?;
        Self::create_in(&mut tx, ctx, now, kind, &id, &attrs, members.as_deref()).await?;
        let r = match kind {
            // A new user is what was just written (no groups yet): no read back.
            ResourceKind::User => {
                let ts = common::parse_time(&timefmt::format(now))?;
                Resource {
                    kind,
                    id,
                    attrs,
                    created: ts,
                    last_modified: ts,
                    version: 1,
                    members: None,
                    groups: Some(Vec::new()),
                }
            }
            // A group's members carry what the store resolved (types, displays): read back.
            ResourceKind::Group => {
                self.read_one_tx(&mut tx, kind, &id, read_back(kind))
                    .await?
            }
        };
        tx.commit().await?;
        self.written();
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
        let op = group_commit::Op::Replace {
            kind,
            id: id.to_owned(),
            expected: expected_version,
            attrs: attrs.clone(),
            members: members.clone(),
        };
        if let Some(r) = self.submit(ctx, op).await {
            return r?.ok_or(StoreError::NotFound);
        }
        let mut tx = self.begin().await?;
        Self::replace_in(
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
        let r = self.read_one_tx(&mut tx, kind, id, read_back(kind)).await?;
        tx.commit().await?;
        self.written();
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
        let op = group_commit::Op::Delete {
            kind,
            id: id.to_owned(),
            expected: expected_version,
        };
        if let Some(r) = self.submit(ctx, op).await {
            return r.map(|_| ());
        }
        let mut tx = self.begin().await?;
        Self::delete_in(&mut tx, ctx, self.now(), kind, id, expected_version).await?;
        tx.commit().await?;
        self.written();
        Ok(())
    }

    async fn write_batch(
        &self,
        ctx: &WriteCtx,
        ops: &[BatchOp],
        state: Option<(&str, &str)>,
    ) -> StoreResult<()> {
        let now = self.now();
        let mut tx = self.begin().await?;
        for op in ops {
            match op {
                BatchOp::Create {
                    kind,
                    id,
                    attrs,
                    members,
                } => {
                    Self::create_in(&mut tx, ctx, now, *kind, id, attrs, members.as_deref()).await?
                }
                BatchOp::Replace { kind, id, attrs } => {
                    Self::replace_in(&mut tx, ctx, now, *kind, id, None, attrs, None).await?
                }
                BatchOp::Members { id, changes } => Self::update_in(
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
                    Self::delete_in(&mut tx, ctx, now, *kind, id, None).await?
                }
                BatchOp::Audit(entry) => sync::append_audit(&mut tx, ctx, now, entry)
                    .await
                    .map(|_| ())?,
            }
        }
        if let Some((key, value)) = state {
            sqlx::query(
                "INSERT INTO sync_state (key, value) VALUES (?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        self.written();
        Ok(())
    }

    async fn get(
        &self,
        kind: ResourceKind,
        id: &str,
        read: ReadOpts,
    ) -> StoreResult<Option<Resource>> {
        let sql = format!("{} WHERE t.id = ?", select_sql(kind, read));
        let Some(row) = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.read)
            .await?
        else {
            return Ok(None);
        };
        let mut r = row_to_resource(kind, &row, kind == ResourceKind::User && read.groups)?;
        if kind == ResourceKind::Group && read.members {
            r.members = Some(load_members(&self.read, id).await?);
        }
        Ok(Some(r))
    }

    async fn member_count(&self, group_id: &str) -> StoreResult<usize> {
        let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM group_members WHERE group_id = ?")
            .bind(group_id)
            .fetch_one(&self.read)
            .await?;
        Ok(n as usize)
    }

    async fn member_count_exceeds(&self, group_id: &str, n: usize) -> StoreResult<bool> {
        // Counts at most n + 1 rows (a literal LIMIT: see `list`).
        let sql = format!(
            "SELECT COUNT(*) FROM (SELECT 1 FROM group_members WHERE group_id = ? LIMIT {})",
            n.saturating_add(1)
        );
        let (c,): (i64,) = sqlx::query_as(AssertSqlSafe(sql))
            .bind(group_id)
            .fetch_one(&self.read)
            .await?;
        Ok(c as usize > n)
    }

    async fn list(&self, kind: ResourceKind, q: &ListQuery) -> StoreResult<ListPage> {
        self.list_uncached(kind, q).await
    }

    async fn resource_generation(&self) -> StoreResult<Option<u64>> {
        Ok(Some(
            self.generation.load(std::sync::atomic::Ordering::Acquire),
        ))
    }
}
