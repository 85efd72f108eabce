//! Backend-neutral logic shared by the SQLite and PostgreSQL stores: everything that is not SQL.
//!
//! Indexed columns of a resource, audit chaining, the retry/dead-letter decision, completing
//! list filters and sorts in memory, mapping diffs and the prune replay (with the checkpoint's
//! signature) are written once here; the backends only read and write rows.

use std::collections::{HashMap, HashSet};

use scim::AttrPath;
use scim::filter::{self, Filter};
use scim::schema::ResourceKind;
use serde_json::{Map, Value, json};
use time::OffsetDateTime;

use crate::access::AccessState;
use crate::audit::{AuditEvent, Checkpoint, GENESIS_HASH, link_error};
use crate::sql_filter::{self, Bind, Dialect};
use crate::{
    AuditEntry, GroupRef, HeldState, ListPage, ListQuery, MappingLink, MemberRef, MemberType,
    NewMember, ReadOpts, Resource, RetryPolicy, StoreError, StoreResult, TokenRecord, TokenScope,
    WriteCtx, backoff, timefmt,
};

/// Which due entities an outbox claim takes first (the SQL is the same on both backends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimOrder {
    /// The oldest due row first: the backlog drains in the order it was written.
    Oldest,
    /// The newest due row first.
    Newest,
    /// Only rows written while their entity had a stored link (TeamCity has it; the row's
    /// `linked`), oldest first.
    Linked,
}

impl ClaimOrder {
    /// Due rows in claim order from a keyset position: `$1` now, `$2` the position (the last
    /// id of the page before; [`ClaimOrder::start`] at first), `$3` the page size. The scan
    /// follows the `(state, id)` index and stops at the page's end, so a claim costs what it
    /// takes, not the size of the backlog; a row is due when its entity has no row leased to
    /// someone else.
    pub(crate) fn due_sql(self) -> String {
        let (linked, cmp, dir) = match self {
            ClaimOrder::Oldest => ("", ">", "ASC"),
            ClaimOrder::Newest => ("", "<", "DESC"),
            ClaimOrder::Linked => ("AND o.linked = 1 ", ">", "ASC"),
        };
        format!(
            "SELECT o.id, o.entity_type, o.entity_id FROM outbox o \
             WHERE o.state = 'pending' {linked}AND o.id {cmp} $2 AND o.next_attempt_at <= $1 \
               AND (o.lease_until IS NULL OR o.lease_until <= $1) \
               AND NOT EXISTS (SELECT 1 FROM outbox l WHERE l.entity_type = o.entity_type \
                   AND l.entity_id = o.entity_id AND l.state = 'pending' AND l.lease_until > $1) \
             ORDER BY o.id {dir} LIMIT $3"
        )
    }

    /// The keyset position before the first row.
    pub(crate) fn start(self) -> i64 {
        match self {
            ClaimOrder::Newest => i64::MAX,
            ClaimOrder::Oldest | ClaimOrder::Linked => 0,
        }
    }
}

/// The entities a claim takes, in claim order, each once.
#[derive(Debug, Default)]
pub(crate) struct DueEntities {
    pub(crate) list: Vec<(String, String)>,
    seen: std::collections::HashSet<(String, String)>,
}

impl DueEntities {
    /// Adds the entities of a page of due rows (in claim order) until the list holds `limit`;
    /// the keyset position of the next page, or `None` when the claim has what it needs or
    /// there are no more rows (`page` is the size asked for).
    pub(crate) fn add_page(
        &mut self,
        rows: Vec<(i64, String, String)>,
        page: usize,
        limit: usize,
    ) -> Option<i64> {
        let full = rows.len() == page;
        let mut last = None;
        for (id, ty, eid) in rows {
            if self.list.len() == limit {
                return None;
            }
            last = Some(id);
            if self.seen.insert((ty.clone(), eid.clone())) {
                self.list.push((ty, eid));
            }
        }
        if self.list.len() == limit || !full {
            None
        } else {
            last
        }
    }
}

/// The table of a resource kind.
pub(crate) fn table(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::User => "users",
        ResourceKind::Group => "groups",
    }
}

/// The outbox entity type of a resource kind.
pub(crate) fn entity(kind: ResourceKind) -> &'static str {
    match kind {
        ResourceKind::User => "user",
        ResourceKind::Group => "group",
    }
}

/// The SCIM resource type of an outbox entity type.
pub(crate) fn resource_type(entity_type: &str) -> &str {
    match entity_type {
        "user" => "User",
        "group" => "Group",
        other => other,
    }
}

/// What a write reads back: a user's groups, never a group's members.
pub(crate) fn read_back(kind: ResourceKind) -> ReadOpts {
    ReadOpts {
        members: false,
        groups: kind == ResourceKind::User,
    }
}

pub(crate) fn parse_time(s: &str) -> StoreResult<OffsetDateTime> {
    timefmt::parse(s).ok_or_else(|| StoreError::Other(format!("corrupt timestamp `{s}`").into()))
}

pub(crate) fn opt_time(s: Option<String>) -> StoreResult<Option<OffsetDateTime>> {
    s.as_deref().map(parse_time).transpose()
}

/// `NotFound`-free check that a state is one of `allowed`, naming it otherwise.
pub(crate) fn held_state_error(
    id: i64,
    state: HeldState,
    allowed: &[HeldState],
) -> Option<StoreError> {
    (!allowed.contains(&state)).then(|| {
        let allowed: Vec<&str> = allowed.iter().map(|s| s.as_str()).collect();
        StoreError::Invalid(format!(
            "held batch {id} is {state}, not {}",
            allowed.join(" or ")
        ))
    })
}

pub(crate) fn check_held_source(source: &str) -> StoreResult<()> {
    if ["outbox", "reconcile"].contains(&source) {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "held batch source must be `outbox` or `reconcile`, not `{source}`"
        )))
    }
}

// ----- Resources -----

/// The indexed values of a resource's attributes.
pub(crate) struct Indexed {
    pub(crate) name: String,
    pub(crate) name_ci: String,
    pub(crate) external_id: Option<String>,
    pub(crate) active: bool,
}

pub(crate) fn indexed(kind: ResourceKind, attrs: &Value) -> StoreResult<Indexed> {
    let key = match kind {
        ResourceKind::User => "userName",
        ResourceKind::Group => "displayName",
    };
    let name = attrs
        .get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| StoreError::Invalid(format!("{key} is required")))?
        .to_owned();
    Ok(Indexed {
        name_ci: name.to_lowercase(),
        name,
        external_id: attrs
            .get("externalId")
            .and_then(Value::as_str)
            .map(str::to_owned),
        active: attrs.get("active").and_then(Value::as_bool).unwrap_or(true),
    })
}

/// The `Conflict` a duplicate name gets.
pub(crate) fn name_conflict(kind: ResourceKind) -> StoreError {
    StoreError::Conflict(match kind {
        ResourceKind::User => "a User with this userName already exists (userName is unique, compared case-insensitively)".into(),
        ResourceKind::Group => "a Group with this displayName already exists (displayName is unique, compared case-insensitively)".into(),
    })
}

/// A write that broke the case-insensitive uniqueness of a user's userName or a group's
/// displayName (the `*_ci` unique indexes, on both backends) as the SCIM conflict; any other
/// error as it is.
pub(crate) fn name_taken(kind: ResourceKind, e: sqlx::Error) -> StoreError {
    match &e {
        sqlx::Error::Database(d) if d.is_unique_violation() && d.message().contains("_ci") => {
            name_conflict(kind)
        }
        sqlx::Error::Database(d)
            if d.is_unique_violation() && d.constraint().is_some_and(|c| c.contains("_ci")) =>
        {
            name_conflict(kind)
        }
        _ => e.into(),
    }
}

pub(crate) fn self_member_error() -> StoreError {
    StoreError::Invalid("a group cannot be a member of itself".into())
}

pub(crate) fn missing_member_error(value: &str) -> StoreError {
    StoreError::Invalid(format!("member `{value}` does not exist"))
}

/// The types to try for a member, in order.
fn member_candidates(ty: Option<MemberType>) -> &'static [MemberType] {
    match ty {
        Some(MemberType::User) => &[MemberType::User],
        Some(MemberType::Group) => &[MemberType::Group],
        None => &[MemberType::User, MemberType::Group],
    }
}

/// The ids of new members that may be users: what a backend looks up in its users table (in
/// one statement) before [`resolve_members`].
pub(crate) fn maybe_users(list: &[NewMember]) -> Vec<&str> {
    list.iter()
        .filter(|m| m.ty != Some(MemberType::Group))
        .map(|m| m.value.as_str())
        .collect()
}

/// The ids of new members that may be groups once `users` (the ids found among
/// [`maybe_users`]) are known: a member without a type is a group only if it is no user.
pub(crate) fn maybe_groups<'a>(list: &'a [NewMember], users: &HashSet<String>) -> Vec<&'a str> {
    list.iter()
        .filter(|m| match m.ty {
            Some(MemberType::Group) => true,
            Some(MemberType::User) => false,
            None => !users.contains(&m.value),
        })
        .map(|m| m.value.as_str())
        .collect()
}

/// A group's new members with their types, in the order given and each id once (its first
/// mention, display included, as one insert after another would have kept), from the ids found
/// in the users and groups tables. The error is the one the first failing member in the list
/// gets: a group given as a member of itself, or a member that exists as none of its types.
pub(crate) fn resolve_members<'a>(
    group_id: &str,
    list: &'a [NewMember],
    users: &HashSet<String>,
    groups: &HashSet<String>,
) -> StoreResult<Vec<(&'a NewMember, MemberType)>> {
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(list.len());
    'members: for m in list {
        for &t in member_candidates(m.ty) {
            if t == MemberType::Group && m.value == group_id {
                return Err(self_member_error());
            }
            let found = match t {
                MemberType::User => users,
                MemberType::Group => groups,
            };
            if found.contains(&m.value) {
                if seen.insert(m.value.as_str()) {
                    out.push((m, t));
                }
                continue 'members;
            }
        }
        return Err(missing_member_error(&m.value));
    }
    Ok(out)
}

/// The ids of `asked` (in its order, each once) that a statement reports it changed: the
/// members added or removed, in the order a statement per id would have found them.
pub(crate) fn in_order_of<'a>(
    asked: impl IntoIterator<Item = &'a str>,
    changed: &HashSet<String>,
) -> Vec<String> {
    let mut seen = HashSet::new();
    asked
        .into_iter()
        .filter(|id| changed.contains(*id) && seen.insert(*id))
        .map(str::to_owned)
        .collect()
}

/// A user's groups from the JSON array (`[{value, display}]`) the read query aggregates.
pub(crate) fn groups_from_json(raw: Option<String>) -> StoreResult<Vec<GroupRef>> {
    let list: Vec<Value> = match raw {
        Some(s) => serde_json::from_str(&s)?,
        None => vec![],
    };
    Ok(list
        .into_iter()
        .filter_map(|g| {
            Some(GroupRef {
                value: g.get("value")?.as_str()?.to_owned(),
                display: g.get("display")?.as_str()?.to_owned(),
            })
        })
        .collect())
}

/// A resource from its stored columns.
pub(crate) fn resource(
    kind: ResourceKind,
    id: String,
    data: &str,
    created: &str,
    last_modified: &str,
    version: i64,
    groups: Option<Vec<GroupRef>>,
) -> StoreResult<Resource> {
    Ok(Resource {
        kind,
        id,
        attrs: serde_json::from_str(data)?,
        created: parse_time(created)?,
        last_modified: parse_time(last_modified)?,
        version,
        members: None,
        groups,
    })
}

pub(crate) fn member_refs(rows: Vec<(String, String, Option<String>)>) -> Vec<MemberRef> {
    rows.into_iter()
        .map(|(value, ty, display)| MemberRef {
            value,
            ty: MemberType::parse(&ty).unwrap_or(MemberType::User),
            display,
        })
        .collect()
}

/// `id, name, created, expires, revoked, scope` of `api_tokens`.
pub(crate) type TokenRow = (
    String,
    String,
    String,
    Option<String>,
    Option<String>,
    String,
);

pub(crate) fn token_row(
    (id, name, created, expires, revoked, scope): TokenRow,
) -> StoreResult<TokenRecord> {
    Ok(TokenRecord {
        scope: TokenScope::parse(&scope).ok_or_else(|| {
            StoreError::Other(format!("token {id} has an unknown scope {scope:?}").into())
        })?,
        id,
        name,
        created: parse_time(&created)?,
        expires: expires.as_deref().map(parse_time).transpose()?,
        revoked: revoked.as_deref().map(parse_time).transpose()?,
    })
}

pub(crate) fn new_token_id() -> String {
    format!("tok_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

// ----- Lists -----

/// How a list query runs: the SQL pre-filter, whether the database can page it, what to load.
pub(crate) struct ListPlan {
    /// ` WHERE …` (empty without a pre-filter).
    pub(crate) where_sql: String,
    pub(crate) binds: Vec<Bind>,
    /// `Some(column)`: the database filters exactly and sorts by this column, so it pages.
    pub(crate) sql_sort: Option<&'static str>,
    pub(crate) read: ReadOpts,
}

pub(crate) fn list_plan(kind: ResourceKind, q: &ListQuery, dialect: Dialect) -> ListPlan {
    let pre = q
        .filter
        .as_ref()
        .and_then(|f| sql_filter::translate(kind, f, dialect));
    let exact = match (&q.filter, &pre) {
        (None, _) => true,
        (Some(_), Some(p)) => p.exact,
        (Some(_), None) => false,
    };
    let sort_col = match &q.sort_by {
        None => Some("t.seq"),
        Some(p) => sql_filter::sort_column(kind, p),
    };
    let (where_sql, binds) = match pre {
        Some(p) => (format!(" WHERE {}", p.sql), p.binds),
        None => (String::new(), vec![]),
    };
    // What in-memory evaluation needs loaded.
    let need_members = kind == ResourceKind::Group
        && (q.read.members
            || q.filter.as_ref().is_some_and(|f| mentions(f, "members"))
            || q.sort_by
                .as_ref()
                .is_some_and(|p| p.attr.eq_ignore_ascii_case("members")));
    let read = ReadOpts {
        members: need_members,
        groups: kind == ResourceKind::User
            && (q.read.groups || q.filter.as_ref().is_some_and(|f| mentions(f, "groups"))),
    };
    ListPlan {
        where_sql,
        binds,
        sql_sort: if exact { sort_col } else { None },
        read,
    }
}

/// The total of a page the database paged, when the page itself proves it: a short page that
/// is not past the end is the end.
pub(crate) fn total_from_page(q: &ListQuery, rows: usize) -> Option<usize> {
    (q.count > 0 && rows < q.count && (rows > 0 || q.offset == 0)).then_some(q.offset + rows)
}

/// Completes an inexact filter or a sort without a column in memory over the candidates (in
/// creation order).
pub(crate) fn complete_in_memory(
    kind: ResourceKind,
    q: &ListQuery,
    candidates: Vec<Resource>,
) -> ListPage {
    let mut matched: Vec<(Resource, Value)> = Vec::new();
    for r in candidates {
        let v = eval_json(&r);
        if q.filter
            .as_ref()
            .is_none_or(|f| filter::matches(f, kind, &v))
        {
            matched.push((r, v));
        }
    }
    if let Some(by) = &q.sort_by {
        sort_in_memory(kind, by, q.descending, &mut matched);
    }
    let total = matched.len();
    let resources: Vec<Resource> = matched
        .into_iter()
        .skip(q.offset)
        .take(q.count)
        .map(|(r, _)| r)
        .collect();
    ListPage {
        total,
        resources: resources.into(),
    }
}

/// The JSON a filter or sort is evaluated against: attributes plus `id`, `meta`, and the
/// derived multi-valued attributes.
fn eval_json(r: &Resource) -> Value {
    let mut o = match &r.attrs {
        Value::Object(m) => m.clone(),
        _ => Map::new(),
    };
    o.insert("id".into(), json!(r.id));
    o.insert(
        "meta".into(),
        json!({
            "resourceType": r.kind.name(),
            "created": timefmt::format(r.created),
            "lastModified": timefmt::format(r.last_modified),
            "version": format!("W/\"{}\"", r.version),
        }),
    );
    if let Some(members) = &r.members {
        let list: Vec<Value> = members
            .iter()
            .map(|m| json!({"value": m.value, "type": m.ty.as_str(), "display": m.display}))
            .collect();
        o.insert("members".into(), Value::Array(list));
    }
    if let Some(groups) = &r.groups {
        let list: Vec<Value> = groups
            .iter()
            .map(|g| json!({"value": g.value, "display": g.display}))
            .collect();
        o.insert("groups".into(), Value::Array(list));
    }
    Value::Object(o)
}

fn mentions(f: &Filter, attr: &str) -> bool {
    match f {
        Filter::And(a, b) | Filter::Or(a, b) => mentions(a, attr) || mentions(b, attr),
        Filter::Not(a) => mentions(a, attr),
        Filter::Present(p)
        | Filter::Compare { path: p, .. }
        | Filter::ValuePath { path: p, .. } => p.attr.eq_ignore_ascii_case(attr),
    }
}

fn sort_in_memory(
    kind: ResourceKind,
    by: &AttrPath,
    descending: bool,
    items: &mut [(Resource, Value)],
) {
    items.sort_by(|(_, a), (_, b)| {
        let o = scim::projection::sort_cmp(kind, by, a, b);
        if descending { o.reverse() } else { o }
    });
}

// ----- Audit chain -----

/// What a command records besides its change.
pub(crate) struct Record<'a> {
    pub(crate) resource_type: &'a str,
    pub(crate) resource_id: &'a str,
    pub(crate) operation: &'a str,
    pub(crate) status: i64,
    pub(crate) detail: Value,
    /// `(entity_type, operation, detail)` of the outbox row, if the change concerns TeamCity.
    pub(crate) outbox: Option<(&'a str, &'a str, Value)>,
}

impl<'a> Record<'a> {
    /// A success event without an outbox row.
    pub(crate) fn note(
        resource_type: &'a str,
        resource_id: &'a str,
        operation: &'a str,
        detail: Value,
    ) -> Self {
        Record {
            resource_type,
            resource_id,
            operation,
            status: 200,
            detail,
            outbox: None,
        }
    }

    /// A resource created, with the members it was created with.
    pub(crate) fn created(kind: ResourceKind, id: &'a str, added: Vec<String>) -> Self {
        Record {
            resource_type: kind.name(),
            resource_id: id,
            operation: "create",
            status: 201,
            detail: json!({"members_added": added.len()}),
            outbox: Some((entity(kind), "upsert", json!({"added": added}))),
        }
    }

    /// A resource replaced, with the members it gained and lost.
    pub(crate) fn replaced(
        kind: ResourceKind,
        id: &'a str,
        added: Vec<String>,
        removed: Vec<String>,
    ) -> Self {
        Record {
            resource_type: kind.name(),
            resource_id: id,
            operation: "replace",
            status: 200,
            detail: json!({"members_added": added.len(), "members_removed": removed.len()}),
            outbox: Some((
                entity(kind),
                "upsert",
                json!({"added": added, "removed": removed}),
            )),
        }
    }

    /// A resource patched: its attributes (`attrs_changed`), its members, or both.
    pub(crate) fn patched(
        kind: ResourceKind,
        id: &'a str,
        attrs_changed: bool,
        added: Vec<String>,
        removed: Vec<String>,
    ) -> Self {
        let op = if attrs_changed { "upsert" } else { "members" };
        Record {
            resource_type: kind.name(),
            resource_id: id,
            operation: "patch",
            status: 200,
            detail: json!({
                "attributes_changed": attrs_changed,
                "members_added": added.len(),
                "members_removed": removed.len(),
            }),
            outbox: Some((
                entity(kind),
                op,
                json!({"added": added, "removed": removed}),
            )),
        }
    }

    /// A resource deleted, with the groups it left.
    pub(crate) fn deleted(kind: ResourceKind, id: &'a str, groups: Vec<String>) -> Self {
        Record {
            resource_type: kind.name(),
            resource_id: id,
            operation: "delete",
            status: 204,
            detail: json!({"left_groups": groups.len()}),
            outbox: Some((entity(kind), "delete", json!({"groups": groups}))),
        }
    }

    /// The event part.
    pub(crate) fn event(&self) -> NewEvent<'a> {
        NewEvent {
            resource_type: self.resource_type,
            resource_id: Some(self.resource_id),
            operation: self.operation,
            outcome: "success",
            status: Some(self.status),
            detail: self.detail.clone(),
        }
    }
}

/// One event to append.
pub(crate) struct NewEvent<'a> {
    pub(crate) resource_type: &'a str,
    pub(crate) resource_id: Option<&'a str>,
    pub(crate) operation: &'a str,
    pub(crate) outcome: &'a str,
    pub(crate) status: Option<i64>,
    pub(crate) detail: Value,
}

pub(crate) fn new_event(e: &AuditEntry) -> NewEvent<'_> {
    NewEvent {
        resource_type: &e.resource_type,
        resource_id: e.resource_id.as_deref(),
        operation: &e.operation,
        outcome: &e.outcome,
        status: e.status,
        detail: e.detail.clone(),
    }
}

/// The chain head when no event is stored: the newest checkpoint, else genesis.
pub(crate) fn empty_head(checkpoint: Option<(i64, String)>) -> (i64, String) {
    checkpoint.unwrap_or((0, GENESIS_HASH.to_owned()))
}

/// The event that follows `prev` (its seq and hash); email addresses in the detail are
/// scrubbed first.
pub(crate) fn chain_event(
    ctx: &WriteCtx,
    now: OffsetDateTime,
    n: NewEvent<'_>,
    (prev_seq, prev_hash): (i64, String),
) -> AuditEvent {
    let mut detail = n.detail;
    crate::audit::scrub_emails(&mut detail);
    let mut ev = AuditEvent {
        seq: prev_seq + 1,
        time: timefmt::format(now),
        actor: ctx.actor.clone(),
        request_id: ctx.request_id.clone(),
        resource_type: n.resource_type.to_owned(),
        resource_id: n.resource_id.map(str::to_owned),
        operation: n.operation.to_owned(),
        outcome: n.outcome.to_owned(),
        status: n.status,
        detail: detail.to_string(),
        prev_hash,
        hash: String::new(),
    };
    ev.hash = ev.compute_hash();
    ev
}

/// Events chained one after another from a head.
pub(crate) struct Chain<'c> {
    ctx: &'c WriteCtx,
    now: OffsetDateTime,
    head: (i64, String),
    pub(crate) events: Vec<AuditEvent>,
}

impl<'c> Chain<'c> {
    pub(crate) fn new(ctx: &'c WriteCtx, now: OffsetDateTime, head: (i64, String)) -> Self {
        Chain {
            ctx,
            now,
            head,
            events: vec![],
        }
    }

    pub(crate) fn push(&mut self, n: NewEvent<'_>) -> i64 {
        let ev = chain_event(self.ctx, self.now, n, self.head.clone());
        self.head = (ev.seq, ev.hash.clone());
        self.events.push(ev);
        self.head.0
    }
}

/// What an audited write transaction records as its commands run, appended at its end in a
/// statement or two (both backends' group-commit batches): each event is chained to the head
/// in memory, each outbox row points at its event. A savepoint marks what was recorded, so a
/// command undone drops what it recorded.
pub(crate) struct Recorded {
    head: (i64, String),
    pub(crate) events: Vec<AuditEvent>,
    pub(crate) outbox: Vec<PendingOutbox>,
    /// What had been recorded when the open savepoint was taken.
    saved: Option<(usize, usize, (i64, String))>,
}

/// An audited write transaction of either backend with what it recorded (see [`Recorded`]);
/// each backend begins it (reading the chain head under its lock) and commits it (appending
/// what was recorded) in its own SQL.
pub(crate) struct BatchTx<DB: sqlx::Database> {
    pub(crate) tx: sqlx::Transaction<'static, DB>,
    pub(crate) rec: Recorded,
}

impl<DB: sqlx::Database> BatchTx<DB>
where
    for<'c> &'c mut DB::Connection: sqlx::Executor<'c, Database = DB>,
{
    /// The transaction, for the commands' own statements.
    pub(crate) fn tx(&mut self) -> &mut sqlx::Transaction<'static, DB> {
        &mut self.tx
    }

    /// Chains an event to the head (in memory until the commit).
    pub(crate) fn event(&mut self, ctx: &WriteCtx, now: OffsetDateTime, n: NewEvent<'_>) -> i64 {
        self.rec.event(ctx, now, n)
    }

    /// Records a command's event and outbox row (in memory until the commit).
    pub(crate) fn record(&mut self, ctx: &WriteCtx, now: OffsetDateTime, r: Record<'_>) {
        self.rec.record(ctx, now, r)
    }

    /// Opens the savepoint of one command.
    pub(crate) async fn savepoint(&mut self) -> StoreResult<()> {
        sqlx::raw_sql(self.rec.savepoint())
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// Undoes what the command did since its savepoint, recorded events included.
    pub(crate) async fn undo(&mut self) -> StoreResult<()> {
        sqlx::raw_sql(Recorded::UNDO).execute(&mut *self.tx).await?;
        self.rec.restore();
        Ok(())
    }
}

/// An outbox row recorded in a [`Recorded`], inserted at the transaction's end.
pub(crate) struct PendingOutbox {
    pub(crate) entity_type: String,
    pub(crate) entity_id: String,
    pub(crate) operation: String,
    pub(crate) detail: String,
    pub(crate) audit_seq: i64,
    pub(crate) time: String,
}

impl Recorded {
    /// Nothing recorded yet; events chain from `head` (the chain head read under the
    /// transaction's lock).
    pub(crate) fn new(head: (i64, String)) -> Self {
        Recorded {
            head,
            events: Vec::new(),
            outbox: Vec::new(),
            saved: None,
        }
    }

    /// Chains an event to the head; its seq.
    pub(crate) fn event(&mut self, ctx: &WriteCtx, now: OffsetDateTime, n: NewEvent<'_>) -> i64 {
        let ev = chain_event(ctx, now, n, self.head.clone());
        self.head = (ev.seq, ev.hash.clone());
        let seq = ev.seq;
        self.events.push(ev);
        seq
    }

    /// Records a command's event and outbox row.
    pub(crate) fn record(&mut self, ctx: &WriteCtx, now: OffsetDateTime, r: Record<'_>) {
        let seq = self.event(ctx, now, r.event());
        if let Some((entity_type, op, detail)) = r.outbox {
            self.outbox.push(PendingOutbox {
                entity_type: entity_type.to_owned(),
                entity_id: r.resource_id.to_owned(),
                operation: op.to_owned(),
                detail: detail.to_string(),
                audit_seq: seq,
                time: timefmt::format(now),
            });
        }
    }

    /// Marks what is recorded now and gives the SQL that opens a command's savepoint (the
    /// previous command's released in the same round trip: a kept command's savepoint stays
    /// open until then or until the commit). Same SQL on both backends.
    pub(crate) fn savepoint(&mut self) -> &'static str {
        let had = self.saved.is_some();
        self.saved = Some((self.events.len(), self.outbox.len(), self.head.clone()));
        if had {
            "RELEASE SAVEPOINT scim_write; SAVEPOINT scim_write"
        } else {
            "SAVEPOINT scim_write"
        }
    }

    /// The SQL that undoes a command since its savepoint and closes it.
    pub(crate) const UNDO: &'static str =
        "ROLLBACK TO SAVEPOINT scim_write; RELEASE SAVEPOINT scim_write";

    /// Drops what was recorded since the mark (its savepoint was rolled back: [`Self::UNDO`]).
    pub(crate) fn restore(&mut self) {
        if let Some((events, outbox, head)) = self.saved.take() {
            self.events.truncate(events);
            self.outbox.truncate(outbox);
            self.head = head;
        }
    }
}

/// The rows one claim statement leased, grouped by entity in the order the lane chose the
/// entities (`due`), each entity's rows oldest first; an entity none of whose rows were leased
/// (another transaction holds them) is left out.
pub(crate) fn claimed_in_order(
    due: Vec<(String, String)>,
    items: Vec<crate::OutboxItem>,
) -> Vec<crate::ClaimedEntity> {
    let mut by_entity: HashMap<(String, String), Vec<crate::OutboxItem>> =
        HashMap::with_capacity(due.len());
    for item in items {
        by_entity
            .entry((item.entity_type.clone(), item.entity_id.clone()))
            .or_default()
            .push(item);
    }
    let mut out = Vec::with_capacity(due.len());
    for (entity_type, entity_id) in due {
        let Some(mut items) = by_entity.remove(&(entity_type.clone(), entity_id.clone())) else {
            continue;
        };
        items.sort_by_key(|i| i.id);
        out.push(crate::ClaimedEntity {
            entity_type,
            entity_id,
            items,
        });
    }
    out
}

/// The events of a completed outbox pass chained onto `chain`: the pass's own `events`, then
/// one `outbox.complete` per entity whose rows were marked done (`done`: id, entity type,
/// entity id as the update returned them), naming its rows in id order, entities in order.
pub(crate) fn chain_completion(
    chain: &mut Chain<'_>,
    events: &[AuditEntry],
    done: Vec<(i64, String, String)>,
) {
    for e in events {
        chain.push(new_event(e));
    }
    let mut by_entity: std::collections::BTreeMap<(String, String), Vec<i64>> =
        std::collections::BTreeMap::new();
    for (id, ty, eid) in done {
        by_entity.entry((ty, eid)).or_default().push(id);
    }
    for ((ty, eid), mut ids) in by_entity {
        ids.sort_unstable();
        let r = Record::note(
            resource_type(&ty),
            &eid,
            "outbox.complete",
            json!({"outbox_ids": ids}),
        );
        chain.push(r.event());
    }
}

// ----- Mappings -----

/// The links of one kind that change, with their previous link, given the current links of
/// their SCIM ids; pushes one `mapping.upsert` event per change onto `chain`. Returns the rows
/// to upsert (`scim_id, teamcity_id, teamcity_name`).
pub(crate) fn link_changes(
    chain: &mut Chain<'_>,
    kind: ResourceKind,
    of_kind: &[&MappingLink],
    prev: Vec<(String, String, String)>,
) -> Vec<(String, String, String)> {
    let mut current: HashMap<String, (String, String)> = prev
        .into_iter()
        .map(|(scim_id, id, name)| (scim_id, (id, name)))
        .collect();
    let mut rows = Vec::new();
    for link in of_kind {
        let new = (link.teamcity_id.clone(), link.teamcity_name.clone());
        let previous = current.insert(link.scim_id.clone(), new.clone());
        if previous.as_ref() == Some(&new) {
            continue;
        }
        let resource_id = format!("{}:{}", entity(kind), link.scim_id);
        chain.push(NewEvent {
            resource_type: "Mapping",
            resource_id: Some(&resource_id),
            operation: "mapping.upsert",
            outcome: "success",
            status: Some(200),
            detail: json!({
                "teamcity_id": link.teamcity_id,
                "teamcity_name": link.teamcity_name,
                "previous": previous.map(|(i, n)| json!({"teamcity_id": i, "teamcity_name": n})),
            }),
        });
        rows.push((
            link.scim_id.clone(),
            link.teamcity_id.clone(),
            link.teamcity_name.clone(),
        ));
    }
    rows
}

pub(crate) fn links_from_items(
    kind: ResourceKind,
    items: &[(String, String, String)],
) -> Vec<MappingLink> {
    items
        .iter()
        .map(|(scim_id, teamcity_id, teamcity_name)| MappingLink {
            kind,
            scim_id: scim_id.clone(),
            teamcity_id: teamcity_id.clone(),
            teamcity_name: teamcity_name.clone(),
        })
        .collect()
}

// ----- Outbox outcomes -----

/// What a failure does to one claimed row.
pub(crate) struct FailDecision {
    /// Attempts including this one.
    pub(crate) attempts: i64,
    /// `Some`: the row is dead now.
    pub(crate) dead_reason: Option<String>,
    /// When it is due again (at the stored precision), unless dead.
    pub(crate) next: Option<OffsetDateTime>,
}

/// Retry later with backoff, or dead-letter (permanent, or out of attempts).
pub(crate) fn fail_decision(
    id: i64,
    attempts_before: i64,
    error: &str,
    transient: bool,
    now: OffsetDateTime,
    policy: &RetryPolicy,
) -> StoreResult<FailDecision> {
    let attempts = attempts_before + 1;
    let n = u32::try_from(attempts).unwrap_or(u32::MAX);
    let dead_reason = if !transient {
        Some(format!("permanent failure: {error}"))
    } else if n >= policy.max_attempts {
        Some(format!("gave up after {attempts} attempts: {error}"))
    } else {
        None
    };
    let next = match dead_reason {
        Some(_) => None,
        None => {
            let seed = (id as u64) ^ (u64::from(n) << 40);
            // At the stored (microsecond) precision, so the caller sees what is stored.
            let at = timefmt::format(now + backoff(n, policy.base, policy.cap, seed));
            Some(parse_time(&at)?)
        }
    };
    Ok(FailDecision {
        attempts,
        dead_reason,
        next,
    })
}

/// The audit entry of one failed row.
pub(crate) fn fail_entry(
    id: i64,
    entity_type: &str,
    entity_id: String,
    d: &FailDecision,
    error: &str,
    transient: bool,
) -> AuditEntry {
    AuditEntry {
        resource_type: resource_type(entity_type).to_owned(),
        resource_id: Some(entity_id),
        operation: if d.dead_reason.is_some() {
            "outbox.dead".into()
        } else {
            "outbox.retry_later".into()
        },
        outcome: "failure".into(),
        status: None,
        detail: json!({
            "outbox_id": id,
            "attempts": d.attempts,
            "transient": transient,
            "error": error,
            "next_attempt_at": d.next.map(timefmt::format),
        }),
    }
}

pub(crate) fn defer_entry(ids: &[i64], reason: &str, until: OffsetDateTime) -> AuditEntry {
    AuditEntry {
        resource_type: "Outbox".into(),
        resource_id: None,
        operation: "outbox.deferred".into(),
        outcome: "failure".into(),
        status: None,
        detail: json!({
            "outbox_ids": ids,
            "reason": reason,
            "next_attempt_at": timefmt::format(until),
        }),
    }
}

// ----- Prune -----

/// Replays (and checks) the events a prune deletes, from the previous checkpoint, and builds
/// the signed checkpoint.
pub(crate) struct PruneReplay {
    pub(crate) seq: i64,
    hash: String,
    state: AccessState,
    total: i64,
    cutoff: String,
    pruned: i64,
    last_time: String,
}

impl PruneReplay {
    /// Starts after `prev` (whose signature must be valid under `key`), else at genesis.
    pub(crate) fn start(
        prev: Option<&Checkpoint>,
        key: &[u8],
        before: OffsetDateTime,
    ) -> StoreResult<Self> {
        if let Some(p) = prev
            && !p.signature_valid(key)
        {
            return Err(StoreError::Invalid(format!(
                "audit checkpoint {} has an invalid signature: refusing to prune (run `audit verify`)",
                p.id
            )));
        }
        let (seq, hash, mut state, total) = match prev {
            Some(p) => (
                p.last_seq,
                p.last_hash.clone(),
                AccessState::from_snapshot(&p.snapshot)?,
                p.total_pruned,
            ),
            None => (0, GENESIS_HASH.to_owned(), AccessState::default(), 0),
        };
        state.last_seq = seq;
        Ok(PruneReplay {
            seq,
            hash,
            state,
            total,
            cutoff: timefmt::format(before),
            pruned: 0,
            last_time: String::new(),
        })
    }

    /// Feeds the next page of events (in seq order, after [`PruneReplay::seq`]). Returns
    /// whether to read another page.
    pub(crate) fn feed(&mut self, page: Vec<AuditEvent>) -> StoreResult<bool> {
        if page.is_empty() {
            return Ok(false);
        }
        for e in page {
            if e.time >= self.cutoff {
                return Ok(false);
            }
            if let Some(reason) = link_error(self.seq, &self.hash, &e) {
                return Err(StoreError::Invalid(format!(
                    "audit chain broken at seq {}: {reason}; refusing to prune",
                    e.seq
                )));
            }
            self.state.apply(&e);
            self.seq = e.seq;
            self.hash = e.hash;
            self.last_time = e.time;
            self.pruned += 1;
        }
        Ok(true)
    }

    /// The signed checkpoint (id 0 until stored), or `None` when nothing is pruned.
    pub(crate) fn checkpoint(self, now: OffsetDateTime, key: &[u8]) -> Option<Checkpoint> {
        if self.pruned == 0 {
            return None;
        }
        let mut cp = Checkpoint {
            id: 0,
            created: timefmt::format(now),
            last_seq: self.seq,
            last_hash: self.hash,
            last_time: self.last_time,
            pruned: self.pruned,
            total_pruned: self.total + self.pruned,
            snapshot: self.state.snapshot(),
            signature: String::new(),
        };
        cp.sign(key);
        Some(cp)
    }

    /// The `audit.prune` event chained after the stored checkpoint.
    pub(crate) fn prune_event<'a>(cp: &Checkpoint, cp_id: &'a str, before: &str) -> NewEvent<'a> {
        NewEvent {
            resource_type: "Audit",
            resource_id: Some(cp_id),
            operation: "audit.prune",
            outcome: "success",
            status: Some(200),
            detail: json!({
                "before": before,
                "pruned": cp.pruned,
                "last_seq": cp.last_seq,
                "total_pruned": cp.total_pruned,
            }),
        }
    }

    pub(crate) fn cutoff(&self) -> &str {
        &self.cutoff
    }
}

// ----- Leases: the SQL is the same in both dialects (`$n` parameters, upsert, RETURNING) -----

/// Takes the lease ($1 name, $2 holder, $3 new expiry, $4 now) when it is absent, expired or
/// already the holder's; the epoch stays only when the holder renews a lease it still has.
pub(crate) const LEASE_ACQUIRE: &str = "INSERT INTO leases (name, holder, epoch, expires_at) \
     VALUES ($1, $2, 1, $3) \
     ON CONFLICT (name) DO UPDATE SET \
       epoch = CASE WHEN leases.holder = excluded.holder AND leases.expires_at > $4 \
               THEN leases.epoch ELSE leases.epoch + 1 END, \
       holder = excluded.holder, expires_at = excluded.expires_at \
     WHERE leases.expires_at <= $4 OR leases.holder = excluded.holder \
     RETURNING epoch, expires_at";

/// Extends the lease ($1 new expiry) if ($2 name, $3 holder, $4 epoch) still holds it.
pub(crate) const LEASE_RENEW: &str = "UPDATE leases SET expires_at = $1 \
     WHERE name = $2 AND holder = $3 AND epoch = $4 RETURNING expires_at";

/// Lets the lease ($2 name, $3 holder, $4 epoch) run out now ($1).
pub(crate) const LEASE_RELEASE: &str = "UPDATE leases SET expires_at = $1 \
     WHERE name = $2 AND holder = $3 AND epoch = $4";

/// Whether ($1 name, $2 holder, $3 epoch) still holds the lease at $4 (now).
pub(crate) const LEASE_CHECK: &str = "SELECT epoch FROM leases \
     WHERE name = $1 AND holder = $2 AND epoch = $3 AND expires_at > $4";

/// The error of a write whose fence no longer holds.
pub(crate) fn fenced_error(f: &crate::Fence) -> StoreError {
    StoreError::Fenced(format!(
        "the `{}` lease is no longer held by `{}` at epoch {} (another replica took it over, or \
         it ran out before it was renewed): nothing was written",
        f.name, f.holder, f.epoch
    ))
}

/// A lease from the row [`LEASE_ACQUIRE`] / [`LEASE_RENEW`] returned.
pub(crate) fn lease(
    name: &str,
    holder: &str,
    epoch: i64,
    expires: &str,
) -> StoreResult<crate::Lease> {
    Ok(crate::Lease {
        fence: crate::Fence {
            name: name.to_owned(),
            holder: holder.to_owned(),
            epoch,
        },
        expires: parse_time(expires)?,
    })
}

/// `now + ttl`, formatted.
pub(crate) fn lease_until(now: time::OffsetDateTime, ttl: std::time::Duration) -> String {
    crate::timefmt::format(now + ttl)
}

/// A membership row: `(group_id, member_id, member_type, display)`.
pub(crate) type MemberRow = (String, String, String, Option<String>);

/// The users a scoped directory read loads ([`crate::Directory::directory_of`]): all of them,
/// and those of them whose memberships are loaded too — `users`, and the user members of the
/// groups asked for (`full`: their membership rows) unless `context` says they are context,
/// as the ids in `context` are. Sorted, no duplicates.
pub(crate) fn scoped_user_ids(
    users: &[String],
    full: &[MemberRow],
    context: Option<&[String]>,
) -> (Vec<String>, Vec<String>) {
    let mut whole: std::collections::BTreeSet<&str> = users.iter().map(String::as_str).collect();
    let members = full
        .iter()
        .filter(|(_, _, ty, _)| MemberType::parse(ty) != Some(MemberType::Group))
        .map(|(_, m, _, _)| m.as_str());
    let mut all = whole.clone();
    match context {
        None => whole.extend(members),
        Some(ctx) => all.extend(members.chain(ctx.iter().map(String::as_str))),
    }
    all.extend(whole.iter().copied());
    let own = |s: std::collections::BTreeSet<&str>| s.into_iter().map(str::to_owned).collect();
    (own(all), own(whole))
}

/// The ids among `whole` that a scoped read found (`rows`: the users it loaded, by id).
pub(crate) fn loaded<T>(rows: &[(String, T)], whole: &[String]) -> Vec<String> {
    let whole: std::collections::HashSet<&str> = whole.iter().map(String::as_str).collect();
    rows.iter()
        .filter(|(id, _)| whole.contains(id.as_str()))
        .map(|(id, _)| id.clone())
        .collect()
}

/// The groups a scoped directory read loads: those asked for, and those the loaded users are
/// in (`memberships`: the loaded users' membership rows). Sorted, no duplicates.
pub(crate) fn scoped_group_ids(groups: &[String], memberships: &[MemberRow]) -> Vec<String> {
    let mut ids: std::collections::BTreeSet<&str> = groups.iter().map(String::as_str).collect();
    ids.extend(memberships.iter().map(|(g, _, _, _)| g.as_str()));
    ids.into_iter().map(str::to_owned).collect()
}

/// `(id, stored JSON)` rows parsed into their documents.
pub(crate) fn parse_docs<T: serde::de::DeserializeOwned>(
    rows: Vec<(String, String)>,
) -> StoreResult<Vec<(String, T)>> {
    rows.into_iter()
        .map(|(id, data)| Ok((id, serde_json::from_str(&data)?)))
        .collect()
}

/// Assembles a scoped snapshot from its rows: `users` and `groups` as `(id, stored document)`
/// in creation order; the groups asked for (`asked`) get their `full` membership rows, the others
/// the loaded users' `memberships` only.
pub(crate) fn scoped_snapshot(
    users: Vec<(String, crate::sync_model::UserDoc)>,
    groups: Vec<(String, crate::sync_model::GroupDoc)>,
    asked: &[String],
    full: Vec<MemberRow>,
    memberships: Vec<MemberRow>,
) -> StoreResult<crate::DirectorySnapshot> {
    let asked: std::collections::HashSet<&str> = asked.iter().map(String::as_str).collect();
    let mut rows: HashMap<String, std::collections::BTreeMap<String, (String, Option<String>)>> =
        HashMap::new();
    for (g, m, ty, display) in memberships {
        if !asked.contains(g.as_str()) {
            rows.entry(g).or_default().insert(m, (ty, display));
        }
    }
    for (g, m, ty, display) in full {
        rows.entry(g).or_default().insert(m, (ty, display));
    }
    let users = users
        .into_iter()
        .map(|(id, doc)| doc.into_user(id))
        .collect();
    let groups = groups
        .into_iter()
        .map(|(id, doc)| {
            let members = member_refs(
                rows.remove(&id)
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(m, (ty, display))| (m, ty, display))
                    .collect(),
            );
            doc.into_group(id, members)
        })
        .collect();
    Ok(crate::DirectorySnapshot { users, groups })
}
