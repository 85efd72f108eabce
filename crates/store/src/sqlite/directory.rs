//! [`Directory`](crate::Directory) on SQLite.

use std::collections::HashMap;

use serde_json::Value;

use super::SqliteStore;
use super::*;
use crate::Directory;
use crate::common::{self};
use crate::{
    DirectorySnapshot, MemberRef, StoreError, StoreResult,
    sync_model::{GroupDoc, UserDoc},
};

/// The queries of `directory_of`, each an indexed lookup per id (checked with `EXPLAIN QUERY
/// PLAN` in the tests below). Id lists are one JSON array. Each query returns ONE row, its rows
/// as a JSON array: a pass reads thousands of rows, and each row sqlx hands over is a round
/// trip to the connection's thread (measured on a pass of 64 new groups, 3,100 members with
/// their other groups: 95 → 80 ms before its first call).
const SCOPED_MEMBERS_OF_GROUPS: &str = "SELECT coalesce(json_group_array(\
     json_array(group_id, member_id, member_type, display)), '[]') FROM group_members \
     WHERE group_id IN (SELECT value FROM json_each(?))";
const SCOPED_USERS: &str = concat!(
    "SELECT '[' || coalesce(group_concat('[' || json_quote(id) || ',' || data || ']', ",
    "',' ORDER BY seq), '') || ']' FROM users WHERE id IN (SELECT value FROM json_each(?))"
);
const SCOPED_GROUPS_OF_USERS: &str = "SELECT coalesce(json_group_array(\
     json_array(group_id, member_id, member_type, display)), '[]') FROM group_members \
     WHERE member_id IN (SELECT value FROM json_each(?))";
const SCOPED_GROUPS: &str = concat!(
    "SELECT '[' || coalesce(group_concat('[' || json_quote(id) || ',' || data || ']', ",
    "',' ORDER BY seq), '') || ']' FROM groups WHERE id IN (SELECT value FROM json_each(?))"
);

/// The query that returns every row of a resource table as ONE row: a JSON array of
/// `[id, data]` pairs in creation order, built by concatenating the stored JSON text.
macro_rules! all_as_one_row {
    ($table:literal) => {
        concat!(
            "SELECT '[' || coalesce(group_concat('[' || json_quote(id) || ',' || data || ']', ",
            "',' ORDER BY seq), '') || ']' FROM ",
            $table
        )
    };
}

#[async_trait]
impl Directory for SqliteStore {
    async fn directory(&self) -> StoreResult<crate::DirectorySnapshot> {
        // One read transaction: in WAL mode the three queries see the same snapshot.
        let mut tx = self.read.begin().await?;
        // Each table comes back as ONE row, a JSON array of `[id, data]` pairs built by
        // concatenating the stored JSON text (no re-parse in SQLite): each row sqlx hands over
        // costs a round trip to the connection's thread, and an initial load has 10,000 users.
        let users: String = sqlx::query_scalar(all_as_one_row!("users"))
            .fetch_one(&mut *tx)
            .await?;
        // The users are parsed on another thread while SQLite reads the groups.
        let users = tokio::task::spawn_blocking(move || {
            serde_json::from_str::<Vec<(String, UserDoc)>>(&users).map(|list| {
                list.into_iter()
                    .map(|(id, doc)| doc.into_user(id))
                    .collect::<Vec<_>>()
            })
        });
        let groups: String = sqlx::query_scalar(all_as_one_row!("groups"))
            .fetch_one(&mut *tx)
            .await?;
        // One row per group, its members aggregated in SQL.
        let members: Vec<(String, String)> = sqlx::query_as(
            "SELECT group_id, \
             json_group_array(json_array(member_id, member_type, display) ORDER BY member_id) \
             FROM group_members GROUP BY group_id",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.rollback().await?;
        let groups: Vec<(String, GroupDoc)> = serde_json::from_str(&groups)?;
        let mut by_group: HashMap<String, Vec<MemberRef>> = HashMap::with_capacity(members.len());
        for (group_id, list) in members {
            let list: Vec<(String, String, Option<String>)> = serde_json::from_str(&list)?;
            by_group.insert(group_id, common::member_refs(list));
        }
        let users = users
            .await
            .map_err(|e| StoreError::Other(format!("directory parse: {e}").into()))??;
        Ok(DirectorySnapshot {
            users,
            groups: groups
                .into_iter()
                .map(|(id, doc)| {
                    let members = by_group.remove(&id).unwrap_or_default();
                    doc.into_group(id, members)
                })
                .collect(),
        })
    }

    async fn directory_of(
        &self,
        users: &[String],
        groups: &[String],
        context: Option<&[String]>,
    ) -> StoreResult<crate::DirectorySnapshot> {
        let list = |ids: &[String]| Value::from(ids.to_vec()).to_string();
        // One read transaction: in WAL mode the four queries see the same snapshot.
        let mut tx = self.read.begin().await?;
        let rows = |json: String| serde_json::from_str::<Vec<common::MemberRow>>(&json);
        let full: String = sqlx::query_scalar(SCOPED_MEMBERS_OF_GROUPS)
            .bind(list(groups))
            .fetch_one(&mut *tx)
            .await?;
        let full = rows(full)?;
        let (user_ids, whole) = common::scoped_user_ids(users, &full, context);
        let user_rows: String = sqlx::query_scalar(SCOPED_USERS)
            .bind(list(&user_ids))
            .fetch_one(&mut *tx)
            .await?;
        let user_rows: Vec<(String, UserDoc)> = serde_json::from_str(&user_rows)?;
        let whole = common::loaded(&user_rows, &whole);
        let memberships: String = sqlx::query_scalar(SCOPED_GROUPS_OF_USERS)
            .bind(list(&whole))
            .fetch_one(&mut *tx)
            .await?;
        let memberships = rows(memberships)?;
        let group_ids = common::scoped_group_ids(groups, &memberships);
        let group_rows: String = sqlx::query_scalar(SCOPED_GROUPS)
            .bind(list(&group_ids))
            .fetch_one(&mut *tx)
            .await?;
        let group_rows: Vec<(String, GroupDoc)> = serde_json::from_str(&group_rows)?;
        tx.rollback().await?;
        common::scoped_snapshot(user_rows, group_rows, groups, full, memberships)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// Every query of a scoped directory read looks its rows up by index: no table is scanned.
    #[tokio::test]
    async fn scoped_directory_reads_use_indexes_only() {
        let store = SqliteStore::open("sqlite::memory:", Arc::new(crate::SystemClock))
            .await
            .expect("open");
        for sql in [
            SCOPED_MEMBERS_OF_GROUPS,
            SCOPED_USERS,
            SCOPED_GROUPS_OF_USERS,
            SCOPED_GROUPS,
        ] {
            let plan: Vec<(i64, i64, i64, String)> =
                sqlx::query_as(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")))
                    .bind("[\"a\",\"b\"]")
                    .fetch_all(&store.read)
                    .await
                    .expect("explain");
            let steps: Vec<&str> = plan.iter().map(|(_, _, _, d)| d.as_str()).collect();
            for table in ["users", "groups", "group_members"] {
                assert!(
                    !steps
                        .iter()
                        .any(|d| d.starts_with(&format!("SCAN {table}"))),
                    "{sql}: scans {table}: {steps:?}"
                );
            }
            assert!(
                steps
                    .iter()
                    .any(|d| d.starts_with("SEARCH ") && d.contains(" USING ")),
                "{sql}: no index used: {steps:?}"
            );
        }
    }
}
