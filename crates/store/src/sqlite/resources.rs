//! [`Resources`](crate::Resources) on SQLite.

use std::collections::HashSet;

use super::*;
use crate::Resources;

const USER_COLS: &str = "t.id, t.created, t.last_modified, t.version, t.data";
const GROUPS_OF_USER: &str = "(SELECT json_group_array(json_object('value', g.id, 'display', g.display_name)) \
     FROM group_members m JOIN groups g ON g.id = m.group_id WHERE m.member_id = t.id)";

#[async_trait]
impl Resources for SqliteStore {
    async fn create(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        attrs: Value,
        members: Option<Vec<NewMember>>,
    ) -> StoreResult<Resource> {
        gc::create(self, ctx, kind, attrs, members).await
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
        gc::replace(self, ctx, kind, id, expected_version, attrs, members).await
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
        gc::update(self, ctx, kind, id, Some(expected_version), attrs, members).await
    }

    async fn update_members(
        &self,
        ctx: &WriteCtx,
        id: &str,
        members: &[MembershipChange],
    ) -> StoreResult<Resource> {
        gc::update(self, ctx, ResourceKind::Group, id, None, None, members).await
    }

    async fn delete(
        &self,
        ctx: &WriteCtx,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()> {
        gc::delete(self, ctx, kind, id, expected_version).await
    }

    async fn write_batch(
        &self,
        ctx: &WriteCtx,
        ops: &[BatchOp],
        state: Option<(&str, &str)>,
    ) -> StoreResult<()> {
        let now = self.now();
        let mut tx = BatchTx::begin(self).await?;
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
                BatchOp::Audit(entry) => {
                    tx.event(ctx, now, common::new_event(entry));
                }
            }
        }
        if let Some((key, value)) = state {
            sqlx::query(
                "INSERT INTO sync_state (key, value) VALUES (?, ?) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut **tx.tx())
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

impl SqliteStore {
    /// The update inside `tx`. Returns whether anything changed (nothing: no version bump, no
    /// audit noise, nothing for TeamCity).
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn update_in(
        btx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: Option<&Value>,
        members: &[MembershipChange],
    ) -> StoreResult<bool> {
        let tx = btx.tx();
        let ts = timefmt::format(now);
        let version = Self::current_version(tx, kind, id).await?;
        if expected_version.is_some_and(|v| v != version) {
            return Err(StoreError::PreconditionFailed);
        }
        let (mut added, mut removed) = (vec![], vec![]);
        if kind == ResourceKind::Group {
            for change in members {
                apply_members(tx, id, change, &mut added, &mut removed).await?;
            }
        }
        let attrs_changed = attrs.is_some();
        let members_changed = !added.is_empty() || !removed.is_empty();
        if !attrs_changed && !members_changed {
            return Ok(false);
        }
        match attrs {
            Some(a) => Self::write_attrs(tx, kind, id, a, &ts, version + 1).await?,
            None => Self::touch(tx, kind, id, &ts, version + 1).await?,
        }
        btx.record(
            ctx,
            now,
            Record::patched(kind, id, attrs_changed, added, removed),
        );
        Ok(true)
    }

    /// [`Resources::create`] inside `tx`, with the id chosen by the caller.
    pub(super) async fn create_in(
        btx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        attrs: &Value,
        members: Option<&[NewMember]>,
    ) -> StoreResult<()> {
        let tx = btx.tx();
        let ts = timefmt::format(now);
        let ix = indexed(kind, attrs)?;
        // Uniqueness of the name is the `*_ci` unique index's (one statement fewer per write).
        let data = attrs.to_string();
        let insert = match kind {
            ResourceKind::User => sqlx::query(
                "INSERT INTO users (id, user_name, user_name_ci, external_id, active, created, last_modified, version, data) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?)",
            )
            .bind(id)
            .bind(&ix.name)
            .bind(&ix.name_ci)
            .bind(&ix.external_id)
            .bind(ix.active),
            ResourceKind::Group => sqlx::query(
                "INSERT INTO groups (id, display_name, display_name_ci, external_id, created, last_modified, version, data) \
                 VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
            )
            .bind(id)
            .bind(&ix.name)
            .bind(&ix.name_ci)
            .bind(&ix.external_id),
        };
        insert
            .bind(&ts)
            .bind(&ts)
            .bind(&data)
            .execute(&mut **tx)
            .await
            .map_err(|e| common::name_taken(kind, e))?;
        let (mut added, mut removed) = (vec![], vec![]);
        if let (ResourceKind::Group, Some(list)) = (kind, members) {
            apply_members(
                tx,
                id,
                &MembershipChange::Add(list.to_vec()),
                &mut added,
                &mut removed,
            )
            .await?;
        }
        btx.record(ctx, now, Record::created(kind, id, added));
        Ok(())
    }

    /// [`Resources::replace`] inside `tx`.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn replace_in(
        btx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
        attrs: &Value,
        members: Option<&[NewMember]>,
    ) -> StoreResult<()> {
        let tx = btx.tx();
        let ts = timefmt::format(now);
        let version = Self::current_version(tx, kind, id).await?;
        if expected_version.is_some_and(|v| v != version) {
            return Err(StoreError::PreconditionFailed);
        }
        Self::write_attrs(tx, kind, id, attrs, &ts, version + 1).await?;
        let (mut added, mut removed) = (vec![], vec![]);
        if let (ResourceKind::Group, Some(list)) = (kind, members) {
            apply_members(
                tx,
                id,
                &MembershipChange::ReplaceAll(list.to_vec()),
                &mut added,
                &mut removed,
            )
            .await?;
        }
        btx.record(ctx, now, Record::replaced(kind, id, added, removed));
        Ok(())
    }

    /// [`Resources::delete`] inside `tx`.
    pub(super) async fn delete_in(
        btx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected_version: Option<i64>,
    ) -> StoreResult<()> {
        let tx = btx.tx();
        let version = Self::current_version(tx, kind, id).await?;
        if expected_version.is_some_and(|v| v != version) {
            return Err(StoreError::PreconditionFailed);
        }
        let affected: Vec<(String,)> =
            sqlx::query_as("SELECT group_id FROM group_members WHERE member_id = ?")
                .bind(id)
                .fetch_all(&mut **tx)
                .await?;
        sqlx::query("DELETE FROM group_members WHERE member_id = ? OR group_id = ?")
            .bind(id)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let sql = format!("DELETE FROM {} WHERE id = ?", table(kind));
        sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .execute(&mut **tx)
            .await?;
        let groups: Vec<String> = affected.into_iter().map(|(g,)| g).collect();
        // The groups it left changed too: their ETags must move.
        let ts = timefmt::format(now);
        for g in &groups {
            sqlx::query("UPDATE groups SET version = version + 1, last_modified = ? WHERE id = ?")
                .bind(&ts)
                .bind(g)
                .execute(&mut **tx)
                .await?;
        }
        btx.record(ctx, now, Record::deleted(kind, id, groups));
        Ok(())
    }
}

/// The ids among `ids` that exist as resources of type `ty`, in one statement.
async fn existing(tx: &mut Tx, ty: MemberType, ids: &[&str]) -> StoreResult<HashSet<String>> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = match ty {
        MemberType::User => "SELECT id FROM users WHERE id IN (SELECT value FROM json_each(?))",
        MemberType::Group => "SELECT id FROM groups WHERE id IN (SELECT value FROM json_each(?))",
    };
    let rows: Vec<(String,)> = sqlx::query_as(sql)
        .bind(serde_json::to_string(ids)?)
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Applies one membership change, each in one or two statements whatever the number of
/// members; the ids added and removed go to `added` and `removed`, in the order the change
/// names them (a removal of all: in id order).
async fn apply_members(
    tx: &mut Tx,
    group_id: &str,
    change: &MembershipChange,
    added: &mut Vec<String>,
    removed: &mut Vec<String>,
) -> StoreResult<()> {
    match change {
        MembershipChange::Add(list) => add_members(tx, group_id, list, added).await?,
        MembershipChange::Remove(ids) => {
            let gone: Vec<(String,)> = sqlx::query_as(
                "DELETE FROM group_members WHERE group_id = ? \
                 AND member_id IN (SELECT value FROM json_each(?)) RETURNING member_id",
            )
            .bind(group_id)
            .bind(serde_json::to_string(ids)?)
            .fetch_all(&mut **tx)
            .await?;
            let gone = gone.into_iter().map(|(id,)| id).collect();
            removed.extend(common::in_order_of(ids.iter().map(String::as_str), &gone));
        }
        MembershipChange::RemoveAll | MembershipChange::ReplaceAll(_) => {
            let keep: Vec<&str> = match change {
                MembershipChange::ReplaceAll(list) => {
                    list.iter().map(|m| m.value.as_str()).collect()
                }
                _ => vec![],
            };
            let mut gone: Vec<(String,)> = sqlx::query_as(
                "DELETE FROM group_members WHERE group_id = ? \
                 AND member_id NOT IN (SELECT value FROM json_each(?)) RETURNING member_id",
            )
            .bind(group_id)
            .bind(serde_json::to_string(&keep)?)
            .fetch_all(&mut **tx)
            .await?;
            gone.sort_unstable();
            removed.extend(gone.into_iter().map(|(id,)| id));
            if let MembershipChange::ReplaceAll(list) = change {
                add_members(tx, group_id, list, added).await?;
            }
        }
    }
    Ok(())
}

/// Adds members, each checked to exist (see [`common::resolve_members`]), in at most three
/// statements: the users and the groups among them looked up, then the rows inserted.
async fn add_members(
    tx: &mut Tx,
    group_id: &str,
    list: &[NewMember],
    added: &mut Vec<String>,
) -> StoreResult<()> {
    if list.is_empty() {
        return Ok(());
    }
    let users = existing(tx, MemberType::User, &common::maybe_users(list)).await?;
    let groups = existing(tx, MemberType::Group, &common::maybe_groups(list, &users)).await?;
    let rows: Vec<(&str, &str, Option<&str>)> =
        common::resolve_members(group_id, list, &users, &groups)?
            .into_iter()
            .map(|(m, t)| (m.value.as_str(), t.as_str(), m.display.as_deref()))
            .collect();
    let inserted: Vec<(String,)> = sqlx::query_as(
        "INSERT OR IGNORE INTO group_members (group_id, member_id, member_type, display) \
         SELECT ?, value ->> 0, value ->> 1, value ->> 2 FROM json_each(?) RETURNING member_id",
    )
    .bind(group_id)
    .bind(serde_json::to_string(&rows)?)
    .fetch_all(&mut **tx)
    .await?;
    let inserted = inserted.into_iter().map(|(id,)| id).collect();
    added.extend(common::in_order_of(rows.iter().map(|r| r.0), &inserted));
    Ok(())
}

fn row_to_resource(
    kind: ResourceKind,
    row: &sqlx::sqlite::SqliteRow,
    with_groups: bool,
) -> StoreResult<Resource> {
    let groups = if with_groups {
        Some(common::groups_from_json(row.try_get("groups_json")?)?)
    } else {
        None
    };
    common::resource(
        kind,
        row.try_get("id")?,
        row.try_get("data")?,
        row.try_get("created")?,
        row.try_get("last_modified")?,
        row.try_get("version")?,
        groups,
    )
}

async fn load_members<'e, E>(exec: E, group_id: &str) -> StoreResult<Vec<MemberRef>>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT m.member_id, m.member_type, m.display FROM group_members m \
         WHERE m.group_id = ? ORDER BY m.member_id",
    )
    .bind(group_id)
    .fetch_all(exec)
    .await?;
    Ok(common::member_refs(rows))
}

fn select_sql(kind: ResourceKind, read: ReadOpts) -> String {
    let groups = if kind == ResourceKind::User && read.groups {
        format!(", {GROUPS_OF_USER} AS groups_json")
    } else {
        String::new()
    };
    format!("SELECT {USER_COLS}{groups} FROM {} t", table(kind))
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments> {
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s.as_str()),
            Bind::Int(i) => q.bind(*i),
        };
    }
    q
}

impl SqliteStore {
    async fn list_uncached(&self, kind: ResourceKind, q: &ListQuery) -> StoreResult<ListPage> {
        let plan = common::list_plan(kind, q, Dialect::Sqlite);
        let (where_sql, binds, read) = (&plan.where_sql, &plan.binds[..], plan.read);
        if let Some(col) = plan.sql_sort {
            // One connection for the page and the count: each pool checkout costs a round
            // trip to the connection's worker thread (sqlx pings it on release).
            let mut conn = self.read.acquire().await?;
            let mut resources = Vec::new();
            let mut total = None;
            if q.count > 0 {
                let dir = if q.descending { "DESC" } else { "ASC" };
                // LIMIT and OFFSET are literals, not parameters: SQLite (3.4x+) re-prepares a
                // statement whenever a parameter its LIMIT reads is bound again — a full parse
                // and plan on every execution. (Integers we computed: nothing to inject.)
                let sql = format!(
                    "{}{where_sql} ORDER BY {col} {dir}, t.seq {dir} LIMIT {} OFFSET {}",
                    select_sql(kind, read),
                    q.count,
                    q.offset
                );
                let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
                    .fetch_all(&mut *conn)
                    .await?;
                // A short page that is not past the end is the end: it gives the total (the
                // `userName eq` lookup every IdP sends then costs one query, not two).
                total = common::total_from_page(q, rows.len());
                for row in &rows {
                    let mut r = row_to_resource(kind, row, read.groups)?;
                    if read.members {
                        r.members = Some(load_members(&mut *conn, &r.id).await?);
                    }
                    resources.push(r);
                }
            }
            let total = match total {
                Some(t) => t,
                None => {
                    let count_sql = format!("SELECT COUNT(*) FROM {} t{where_sql}", table(kind));
                    let n: i64 = bind_all(sqlx::query(AssertSqlSafe(count_sql)), binds)
                        .fetch_one(&mut *conn)
                        .await?
                        .try_get(0)?;
                    n as usize
                }
            };
            return Ok(ListPage {
                total,
                resources: resources.into(),
            });
        }
        // Inexact filter or a sort without a column: complete in memory over the candidates.
        let sql = format!("{}{where_sql} ORDER BY t.seq", select_sql(kind, read));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
            .fetch_all(&self.read)
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = row_to_resource(kind, row, read.groups)?;
            if read.members {
                r.members = Some(load_members(&self.read, &r.id).await?);
            }
            candidates.push(r);
        }
        Ok(common::complete_in_memory(kind, q, candidates))
    }

    pub(super) async fn read_one_tx(
        &self,
        tx: &mut Tx,
        kind: ResourceKind,
        id: &str,
        read: ReadOpts,
    ) -> StoreResult<Resource> {
        let sql = format!("{} WHERE t.id = ?", select_sql(kind, read));
        let row = sqlx::query(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        let row = row.ok_or(StoreError::NotFound)?;
        let mut r = row_to_resource(kind, &row, kind == ResourceKind::User && read.groups)?;
        if kind == ResourceKind::Group && read.members {
            r.members = Some(load_members(&mut **tx, id).await?);
        }
        Ok(r)
    }

    async fn current_version(tx: &mut Tx, kind: ResourceKind, id: &str) -> StoreResult<i64> {
        let sql = format!("SELECT version FROM {} WHERE id = ?", table(kind));
        let v: Option<(i64,)> = sqlx::query_as(AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
        v.map(|(v,)| v).ok_or(StoreError::NotFound)
    }

    async fn write_attrs(
        tx: &mut Tx,
        kind: ResourceKind,
        id: &str,
        attrs: &Value,
        now: &str,
        version: i64,
    ) -> StoreResult<()> {
        let ix = indexed(kind, attrs)?;
        let data = attrs.to_string();
        match kind {
            ResourceKind::User => {
                sqlx::query(
                    "UPDATE users SET user_name = ?, user_name_ci = ?, external_id = ?, active = ?, \
                     last_modified = ?, version = ?, data = ? WHERE id = ?",
                )
                .bind(&ix.name)
                .bind(&ix.name_ci)
                .bind(&ix.external_id)
                .bind(ix.active)
                .bind(now)
                .bind(version)
                .bind(&data)
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(|e| common::name_taken(kind, e))?;
            }
            ResourceKind::Group => {
                sqlx::query(
                    "UPDATE groups SET display_name = ?, display_name_ci = ?, external_id = ?, \
                     last_modified = ?, version = ?, data = ? WHERE id = ?",
                )
                .bind(&ix.name)
                .bind(&ix.name_ci)
                .bind(&ix.external_id)
                .bind(now)
                .bind(version)
                .bind(&data)
                .bind(id)
                .execute(&mut **tx)
                .await
                .map_err(|e| common::name_taken(kind, e))?;
            }
        }
        Ok(())
    }

    async fn touch(
        tx: &mut Tx,
        kind: ResourceKind,
        id: &str,
        now: &str,
        version: i64,
    ) -> StoreResult<()> {
        let sql = format!(
            "UPDATE {} SET last_modified = ?, version = ? WHERE id = ?",
            table(kind)
        );
        sqlx::query(AssertSqlSafe(sql))
            .bind(now)
            .bind(version)
            .bind(id)
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}
