//! [`Resources`](crate::Resources) on PostgreSQL.

use std::collections::HashSet;

use super::*;
use crate::Resources;

const USER_COLS: &str = "t.id, t.created, t.last_modified, t.version, t.data";
const GROUPS_OF_USER: &str = "(SELECT json_agg(json_build_object('value', g.id, 'display', g.display_name) \
     ORDER BY g.id)::text FROM group_members m JOIN groups g ON g.id = m.group_id WHERE m.member_id = t.id)";

#[async_trait]
impl Resources for PostgresStore {
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
            let record = match op {
                BatchOp::Create {
                    kind,
                    id,
                    attrs,
                    members,
                } => Some(create_in(tx.tx(), now, *kind, id, attrs, members.as_deref()).await?),
                BatchOp::Replace { kind, id, attrs } => {
                    Some(replace_in(tx.tx(), now, *kind, id, None, attrs, None).await?)
                }
                BatchOp::Members { id, changes } => {
                    update_in(tx.tx(), now, ResourceKind::Group, id, None, None, changes)
                        .await?
                        .0
                }
                BatchOp::Delete { kind, id } => {
                    Some(delete_in(tx.tx(), now, *kind, id, None).await?)
                }
                BatchOp::Audit(entry) => {
                    tx.event(ctx, now, common::new_event(entry));
                    None
                }
            };
            if let Some(r) = record {
                tx.record(ctx, now, r);
            }
        }
        if let Some((key, value)) = state {
            sqlx::query(
                "INSERT INTO sync_state (key, value) VALUES ($1, $2) \
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            )
            .bind(key)
            .bind(value)
            .execute(&mut **tx.tx())
            .await?;
        }
        tx.commit().await
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
        let g = self.generation.read(&self.pool).await?;
        Ok(Some(g as u64))
    }
}

/// The ids among `ids` that exist as resources of type `ty`, in one statement, share-locked
/// until commit (in id order, so two such lookups never wait on each other in a cycle): a
/// concurrent delete of a member waits for this transaction and then removes the membership it
/// added, never the other way round.
async fn existing(tx: &mut Tx, ty: MemberType, ids: &[&str]) -> StoreResult<HashSet<String>> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = match ty {
        MemberType::User => "SELECT id FROM users WHERE id = ANY($1) ORDER BY id FOR SHARE",
        MemberType::Group => "SELECT id FROM groups WHERE id = ANY($1) ORDER BY id FOR SHARE",
    };
    let rows: Vec<(String,)> = sqlx::query_as(sql).bind(ids).fetch_all(&mut **tx).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Applies one membership change, each in one or two statements whatever the number of
/// members; the ids added and removed go to `added` and `removed`, in the order the change
/// names them (a removal of all: in id order, as on SQLite).
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
                "DELETE FROM group_members WHERE group_id = $1 AND member_id = ANY($2) \
                 RETURNING member_id",
            )
            .bind(group_id)
            .bind(ids)
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
                "DELETE FROM group_members WHERE group_id = $1 AND NOT (member_id = ANY($2)) \
                 RETURNING member_id",
            )
            .bind(group_id)
            .bind(&keep)
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

/// Adds members, each checked to exist and share-locked ([`existing`], then
/// [`common::resolve_members`]), in at most three statements: the users and the groups among
/// them looked up, then the rows inserted unless there.
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
    let rows = common::resolve_members(group_id, list, &users, &groups)?;
    let ids: Vec<&str> = rows.iter().map(|(m, _)| m.value.as_str()).collect();
    let types: Vec<&str> = rows.iter().map(|(_, t)| t.as_str()).collect();
    let displays: Vec<Option<&str>> = rows.iter().map(|(m, _)| m.display.as_deref()).collect();
    let inserted: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO group_members (group_id, member_id, member_type, display) \
         SELECT $1, * FROM UNNEST($2::text[], $3::text[], $4::text[]) \
         ON CONFLICT DO NOTHING RETURNING member_id",
    )
    .bind(group_id)
    .bind(&ids)
    .bind(&types)
    .bind(&displays)
    .fetch_all(&mut **tx)
    .await?;
    let inserted = inserted.into_iter().map(|(id,)| id).collect();
    added.extend(common::in_order_of(ids.iter().copied(), &inserted));
    Ok(())
}

fn row_to_resource(kind: ResourceKind, row: &PgRow, with_groups: bool) -> StoreResult<Resource> {
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
    E: sqlx::Executor<'e, Database = Postgres>,
{
    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(
        "SELECT m.member_id, m.member_type, m.display FROM group_members m \
         WHERE m.group_id = $1 ORDER BY m.member_id",
    )
    .bind(group_id)
    .fetch_all(exec)
    .await?;
    Ok(common::member_refs(rows))
}

fn select_sql(kind: ResourceKind, read: ReadOpts) -> String {
    format!("{} FROM {} t", select_list(kind, read), table(kind))
}

/// `SELECT` and the columns a resource is read from (over the alias `t`).
fn select_list(kind: ResourceKind, read: ReadOpts) -> String {
    let groups = if kind == ResourceKind::User && read.groups {
        format!(", {GROUPS_OF_USER} AS groups_json")
    } else {
        String::new()
    };
    format!("SELECT {USER_COLS}{groups}")
}

fn bind_all<'q>(
    mut q: sqlx::query::Query<'q, Postgres, PgArguments>,
    binds: &'q [Bind],
) -> sqlx::query::Query<'q, Postgres, PgArguments> {
    for b in binds {
        q = match b {
            Bind::Text(s) => q.bind(s.as_str()),
            Bind::Int(i) => q.bind(*i),
        };
    }
    q
}

impl PostgresStore {
    async fn list_query(&self, kind: ResourceKind, q: &ListQuery) -> StoreResult<ListPage> {
        let plan = common::list_plan(kind, q, Dialect::Postgres);
        let (where_sql, binds, read) = (&plan.where_sql, &plan.binds[..], plan.read);
        if let Some(col) = plan.sql_sort {
            let mut resources = Vec::new();
            let mut total = None;
            if q.count > 0 {
                let dir = if q.descending { "DESC" } else { "ASC" };
                // Integers we computed: nothing to inject.
                let sql = format!(
                    "{}{where_sql} ORDER BY {col} {dir}, t.seq {dir} LIMIT {} OFFSET {}",
                    select_sql(kind, read),
                    q.count,
                    q.offset
                );
                let rows = match (&self.lookups, binds) {
                    // The lookup every IdP sends before a create: shared with its peers. The
                    // page's order is carried out of the shared statement in two columns.
                    (Some(lookups), [Bind::Text(value)])
                        if !read.members && lookups::batchable(&sql) =>
                    {
                        let keyed = format!(
                            "{}, {col} AS lookup_sort, t.seq AS lookup_seq FROM {} t{where_sql} \
                             ORDER BY {col} {dir}, t.seq {dir} LIMIT {} OFFSET {}",
                            select_list(kind, read),
                            table(kind),
                            q.count,
                            q.offset
                        );
                        let order = format!("x.lookup_sort {dir}, x.lookup_seq {dir}");
                        lookups.fetch(keyed, order, value.clone()).await?
                    }
                    _ => {
                        bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
                            .fetch_all(&self.pool)
                            .await?
                    }
                };
                total = common::total_from_page(q, rows.len());
                for row in &rows {
                    let mut r = row_to_resource(kind, row, read.groups)?;
                    if read.members {
                        r.members = Some(load_members(&self.pool, &r.id).await?);
                    }
                    resources.push(r);
                }
            }
            let total = match total {
                Some(t) => t,
                None => {
                    let count_sql = format!("SELECT COUNT(*) FROM {} t{where_sql}", table(kind));
                    let n: i64 = bind_all(sqlx::query(AssertSqlSafe(count_sql)), binds)
                        .fetch_one(&self.pool)
                        .await?
                        .try_get(0)?;
                    usize::try_from(n).unwrap_or(0)
                }
            };
            return Ok(ListPage {
                total,
                resources: resources.into(),
            });
        }
        // Inexact filter or a sort without a column: complete in memory over the candidates,
        // read in one snapshot.
        let mut tx = self
            .pool
            .begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await?;
        let sql = format!("{}{where_sql} ORDER BY t.seq", select_sql(kind, read));
        let rows = bind_all(sqlx::query(AssertSqlSafe(sql)), binds)
            .fetch_all(&mut *tx)
            .await?;
        let mut candidates = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut r = row_to_resource(kind, row, read.groups)?;
            if read.members {
                r.members = Some(load_members(&mut *tx, &r.id).await?);
            }
            candidates.push(r);
        }
        tx.rollback().await?;
        Ok(common::complete_in_memory(kind, q, candidates))
    }
}

async fn read_one_tx(
    tx: &mut Tx,
    kind: ResourceKind,
    id: &str,
    read: ReadOpts,
) -> StoreResult<Resource> {
    let sql = format!("{} WHERE t.id = $1", select_sql(kind, read));
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

/// The resource's version, its row locked until the transaction ends.
async fn current_version(tx: &mut Tx, kind: ResourceKind, id: &str) -> StoreResult<i64> {
    let sql = format!(
        "SELECT version FROM {} WHERE id = $1 FOR UPDATE",
        table(kind)
    );
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
    // Uniqueness of the name is the `*_ci` unique index's (one statement fewer per write): a
    // violation aborts the statement, and the command's savepoint takes the rest back.
    let data = attrs.to_string();
    let q = match kind {
        ResourceKind::User => sqlx::query(
            "UPDATE users SET user_name = $1, user_name_ci = $2, external_id = $3, active = $4, \
             last_modified = $5, version = $6, data = $7 WHERE id = $8",
        )
        .bind(&ix.name)
        .bind(&ix.name_ci)
        .bind(&ix.external_id)
        .bind(i64::from(ix.active)),
        ResourceKind::Group => sqlx::query(
            "UPDATE groups SET display_name = $1, display_name_ci = $2, external_id = $3, \
             last_modified = $4, version = $5, data = $6 WHERE id = $7",
        )
        .bind(&ix.name)
        .bind(&ix.name_ci)
        .bind(&ix.external_id),
    };
    q.bind(now)
        .bind(version)
        .bind(&data)
        .bind(id)
        .execute(&mut **tx)
        .await
        .map_err(|e| common::name_taken(kind, e))?;
    Ok(())
}

/// Moves a resource's version and time; a group comes back as a write reads it back
/// ([`read_back`]: its members are not read), in the same round trip.
async fn touch(
    tx: &mut Tx,
    kind: ResourceKind,
    id: &str,
    now: &str,
    version: i64,
) -> StoreResult<Option<Resource>> {
    let sql = format!(
        "UPDATE {} t SET last_modified = $1, version = $2 WHERE t.id = $3 RETURNING {USER_COLS}",
        table(kind)
    );
    let row = sqlx::query(AssertSqlSafe(sql))
        .bind(now)
        .bind(version)
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
    match kind {
        ResourceKind::Group => Ok(Some(row_to_resource(kind, &row, false)?)),
        // A user's read back carries its groups: read by the writer.
        ResourceKind::User => Ok(None),
    }
}

/// A PATCH that adds one member who is a user (how Okta and Entra push a membership), in one
/// round trip: the group's row locked (as [`current_version`]), the version checked against
/// `expected_version`, the user found and share-locked (as [`existing`]), the membership
/// inserted unless it is there, and, only when it was inserted, the group's version and time
/// moved (as [`touch`]); the group comes back as a write reads it back. `None` when the member
/// is not a user: the general path then tries the other types.
async fn add_user_member<'a>(
    tx: &mut Tx,
    now: &str,
    id: &'a str,
    expected_version: Option<i64>,
    m: &NewMember,
) -> StoreResult<Option<(Option<Record<'a>>, Option<Resource>)>> {
    let row = sqlx::query(
        "WITH g AS (SELECT t.id, t.created, t.last_modified, t.version, t.data FROM groups t \
           WHERE t.id = $1 FOR UPDATE), \
         m AS (SELECT id FROM users WHERE id = $2 FOR SHARE), \
         ins AS (INSERT INTO group_members (group_id, member_id, member_type, display) \
           SELECT g.id, m.id, $3, $4 FROM g, m WHERE $6::bigint IS NULL OR g.version = $6 \
           ON CONFLICT DO NOTHING RETURNING 1), \
         up AS (UPDATE groups t SET last_modified = $5, version = t.version + 1 \
           WHERE t.id = $1 AND EXISTS (SELECT 1 FROM ins) RETURNING t.last_modified, t.version) \
         SELECT g.id, g.created, COALESCE(up.last_modified, g.last_modified) AS last_modified, \
           COALESCE(up.version, g.version) AS version, g.data, g.version AS was, \
           EXISTS (SELECT 1 FROM m) AS found, up.version IS NOT NULL AS added \
         FROM g LEFT JOIN up ON true",
    )
    .bind(id)
    .bind(&m.value)
    .bind(MemberType::User.as_str())
    .bind(&m.display)
    .bind(now)
    .bind(expected_version)
    .fetch_optional(&mut **tx)
    .await?;
    let row = row.ok_or(StoreError::NotFound)?;
    let was: i64 = row.try_get("was")?;
    if expected_version.is_some_and(|v| v != was) {
        return Err(StoreError::PreconditionFailed);
    }
    if !row.try_get::<bool, _>("found")? {
        return match m.ty {
            Some(MemberType::User) => Err(common::missing_member_error(&m.value)),
            _ => Ok(None),
        };
    }
    let group = row_to_resource(ResourceKind::Group, &row, false)?;
    if !row.try_get::<bool, _>("added")? {
        // Already a member: nothing changed (no version bump, no audit noise).
        return Ok(Some((None, Some(group))));
    }
    let record = Record::patched(
        ResourceKind::Group,
        id,
        false,
        vec![m.value.clone()],
        vec![],
    );
    Ok(Some((Some(record), Some(group))))
}

/// [`Resources::update`] inside `tx`. Returns whether anything changed (nothing: no version bump,
/// no audit noise, nothing for TeamCity).
#[allow(clippy::too_many_arguments)]
async fn update_in<'a>(
    tx: &mut Tx,
    now: OffsetDateTime,
    kind: ResourceKind,
    id: &'a str,
    expected_version: Option<i64>,
    attrs: Option<&Value>,
    members: &[MembershipChange],
) -> StoreResult<(Option<Record<'a>>, Option<Resource>)> {
    let ts = timefmt::format(now);
    if let (ResourceKind::Group, None, [MembershipChange::Add(list)]) = (kind, attrs, members)
        && let [m] = list.as_slice()
        && m.ty != Some(MemberType::Group)
        && let Some(done) = add_user_member(tx, &ts, id, expected_version, m).await?
    {
        return Ok(done);
    }
    let version = current_version(tx, kind, id).await?;
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
        return Ok((None, None));
    }
    let written = match attrs {
        Some(a) => {
            write_attrs(tx, kind, id, a, &ts, version + 1).await?;
            None
        }
        None => touch(tx, kind, id, &ts, version + 1).await?,
    };
    let record = Record::patched(kind, id, attrs_changed, added, removed);
    Ok((Some(record), written))
}

/// [`Resources::create`] inside `tx`, with the id chosen by the caller.
async fn create_in<'a>(
    tx: &mut Tx,
    now: OffsetDateTime,
    kind: ResourceKind,
    id: &'a str,
    attrs: &Value,
    members: Option<&[NewMember]>,
) -> StoreResult<Record<'a>> {
    let ts = timefmt::format(now);
    let ix = indexed(kind, attrs)?;
    // Uniqueness of the name is the `*_ci` unique index's, as in `write_attrs`.
    let data = attrs.to_string();
    let insert = match kind {
        ResourceKind::User => sqlx::query(
            "INSERT INTO users (id, user_name, user_name_ci, external_id, active, created, last_modified, version, data) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8)",
        )
        .bind(id)
        .bind(&ix.name)
        .bind(&ix.name_ci)
        .bind(&ix.external_id)
        .bind(i64::from(ix.active)),
        ResourceKind::Group => sqlx::query(
            "INSERT INTO groups (id, display_name, display_name_ci, external_id, created, last_modified, version, data) \
             VALUES ($1, $2, $3, $4, $5, $6, 1, $7)",
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
    Ok(Record::created(kind, id, added))
}

/// [`Resources::replace`] inside `tx`.
#[allow(clippy::too_many_arguments)]
async fn replace_in<'a>(
    tx: &mut Tx,
    now: OffsetDateTime,
    kind: ResourceKind,
    id: &'a str,
    expected_version: Option<i64>,
    attrs: &Value,
    members: Option<&[NewMember]>,
) -> StoreResult<Record<'a>> {
    let ts = timefmt::format(now);
    let version = current_version(tx, kind, id).await?;
    if expected_version.is_some_and(|v| v != version) {
        return Err(StoreError::PreconditionFailed);
    }
    write_attrs(tx, kind, id, attrs, &ts, version + 1).await?;
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
    Ok(Record::replaced(kind, id, added, removed))
}

/// [`Resources::delete`] inside `tx`.
async fn delete_in<'a>(
    tx: &mut Tx,
    now: OffsetDateTime,
    kind: ResourceKind,
    id: &'a str,
    expected_version: Option<i64>,
) -> StoreResult<Record<'a>> {
    let version = current_version(tx, kind, id).await?;
    if expected_version.is_some_and(|v| v != version) {
        return Err(StoreError::PreconditionFailed);
    }
    let affected: Vec<(String,)> =
        sqlx::query_as("SELECT group_id FROM group_members WHERE member_id = $1 ORDER BY group_id")
            .bind(id)
            .fetch_all(&mut **tx)
            .await?;
    sqlx::query("DELETE FROM group_members WHERE member_id = $1 OR group_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    let sql = format!("DELETE FROM {} WHERE id = $1", table(kind));
    sqlx::query(AssertSqlSafe(sql))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    let groups: Vec<String> = affected.into_iter().map(|(g,)| g).collect();
    // The groups it left changed too: their ETags must move.
    let ts = timefmt::format(now);
    for g in &groups {
        sqlx::query("UPDATE groups SET version = version + 1, last_modified = $1 WHERE id = $2")
            .bind(&ts)
            .bind(g)
            .execute(&mut **tx)
            .await?;
    }
    Ok(Record::deleted(kind, id, groups))
}

/// PostgreSQL's statements for the group-commit writer (`crate::group_commit`): a batch's
/// transaction takes the audit chain head's lock first ([`PostgresStore::begin_write`]), so
/// every row lock of the batch comes after it and batches of several replicas never deadlock.
impl gc::Writer for PostgresStore {
    type Tx = BatchTx;

    fn begin(&self) -> impl std::future::Future<Output = StoreResult<BatchTx>> + Send {
        BatchTx::begin(self)
    }

    async fn savepoint(tx: &mut BatchTx) -> StoreResult<()> {
        tx.savepoint().await
    }

    /// Released with the next command's savepoint, or committed with the transaction: one
    /// round trip fewer per command.
    async fn keep(_tx: &mut BatchTx) -> StoreResult<()> {
        Ok(())
    }

    async fn undo(tx: &mut BatchTx) -> StoreResult<()> {
        tx.undo().await
    }

    async fn commit(tx: BatchTx) -> StoreResult<()> {
        tx.commit().await
    }

    async fn create_in(
        tx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        attrs: &Value,
        members: Option<&[NewMember]>,
    ) -> StoreResult<()> {
        let r = create_in(tx.tx(), now, kind, id, attrs, members).await?;
        tx.record(ctx, now, r);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn replace_in(
        tx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected: Option<i64>,
        attrs: &Value,
        members: Option<&[NewMember]>,
    ) -> StoreResult<()> {
        let r = replace_in(tx.tx(), now, kind, id, expected, attrs, members).await?;
        tx.record(ctx, now, r);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn update_in(
        tx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected: Option<i64>,
        attrs: Option<&Value>,
        members: &[MembershipChange],
    ) -> StoreResult<(bool, Option<Resource>)> {
        let (record, written) = update_in(tx.tx(), now, kind, id, expected, attrs, members).await?;
        let changed = record.is_some();
        if let Some(r) = record {
            tx.record(ctx, now, r);
        }
        Ok((changed, written))
    }

    async fn delete_in(
        tx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected: Option<i64>,
    ) -> StoreResult<()> {
        let r = delete_in(tx.tx(), now, kind, id, expected).await?;
        tx.record(ctx, now, r);
        Ok(())
    }

    fn read_in<'a>(
        &'a self,
        tx: &'a mut BatchTx,
        kind: ResourceKind,
        id: &'a str,
    ) -> impl std::future::Future<Output = StoreResult<Resource>> + Send + 'a {
        read_one_tx(tx.tx(), kind, id, read_back(kind))
    }

    fn now(&self) -> OffsetDateTime {
        PostgresStore::now(self)
    }

    /// The generation every replica's lookup cache reads lives in the database
    /// (`audit_head.resource_gen`, moved by each write): nothing to do here.
    fn written(&self) {}

    fn queue(&self) -> Option<&tokio::sync::mpsc::Sender<gc::Job>> {
        self.writer.as_ref()
    }

    fn stopped() -> StoreError {
        StoreError::Unavailable("the PostgreSQL writer has stopped".into())
    }
}
