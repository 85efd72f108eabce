//! [`Directory`](crate::Directory) on PostgreSQL.

use std::collections::HashMap;

use super::PostgresStore;
use super::*;
use crate::Directory;
use crate::common::{self};
use crate::{
    DirectorySnapshot, MemberRef, StoreResult,
    sync_model::{GroupDoc, UserDoc},
};

#[async_trait]
impl Directory for PostgresStore {
    async fn directory(&self) -> StoreResult<crate::DirectorySnapshot> {
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

    async fn directory_of(
        &self,
        users: &[String],
        groups: &[String],
        context: Option<&[String]>,
    ) -> StoreResult<crate::DirectorySnapshot> {
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
        let (user_ids, whole) = common::scoped_user_ids(users, &full, context);
        let user_rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, data FROM users WHERE id = ANY($1) ORDER BY seq")
                .bind(&user_ids)
                .fetch_all(&mut *tx)
                .await?;
        let whole = common::loaded(&user_rows, &whole);
        let memberships: Vec<common::MemberRow> = sqlx::query_as(
            "SELECT group_id, member_id, member_type, display FROM group_members \
             WHERE member_id = ANY($1)",
        )
        .bind(&whole)
        .fetch_all(&mut *tx)
        .await?;
        let group_ids = common::scoped_group_ids(groups, &memberships);
        let group_rows: Vec<(String, String)> =
            sqlx::query_as("SELECT id, data FROM groups WHERE id = ANY($1) ORDER BY seq")
                .bind(&group_ids)
                .fetch_all(&mut *tx)
                .await?;
        tx.rollback().await?;
        common::scoped_snapshot(
            common::parse_docs(user_rows)?,
            common::parse_docs(group_rows)?,
            groups,
            full,
            memberships,
        )
    }
}
