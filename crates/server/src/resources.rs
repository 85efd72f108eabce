//! The resource operations behind `/Users` and `/Groups`: thin adapters from parsed requests to
//! one store command each. The HTTP handlers and `/Bulk` both call these functions; neither
//! calls TeamCity (the store's outbox row is the only path there).

use std::fmt::Write as _;

use axum::http::StatusCode;
use scim::filter::{self, Filter};
use scim::list::{self, Cursor, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE};
use scim::patch::{MemberChange, MemberSelector};
use scim::resource::Member;
use scim::{AttrPath, ResourceKind, ScimError, ScimResult, ScimType};
use serde_json::{Value, json};
use store::{ListQuery, MemberType, MembershipChange, NewMember, ReadOpts, StoreError, WriteCtx};

use crate::error::{ApiError, ApiResult};
use crate::extract::{Projection, get_ci};
use crate::render::{FullView, etag, location, parse_etags, render};
use crate::reply::{Reply, ReplyBody};
use crate::state::AppState;

/// Attempts at a PATCH's read-modify-write when another writer got in between. Each lost race
/// means another write committed, so a burst of concurrent PATCHes on one resource (an IdP
/// pushing many membership changes to one group at once) completes within this many rounds.
const PATCH_ATTEMPTS: usize = 64;

/// A short random pause before retrying a PATCH that lost a race (1–8 ms), so the losers do
/// not collide again in lockstep.
fn retry_pause() -> std::time::Duration {
    let jitter = uuid::Uuid::new_v4().as_bytes()[0] % 8;
    std::time::Duration::from_millis(1 + u64::from(jitter))
}

/// Largest group whose members a PATCH response lists without being asked.
pub(crate) const PATCH_INLINE_MEMBERS_MAX: usize = 100;

/// How long a group counted above [`PATCH_INLINE_MEMBERS_MAX`] is taken to still be: the
/// PATCHes of a burst to one group (how Okta pushes a group) are answered without counting its
/// members each time.
const LARGE_GROUP_FOR: std::time::Duration = std::time::Duration::from_secs(5);
/// Most groups remembered as large (those seen longer ago are forgotten first).
const LARGE_GROUPS_MAX: usize = 10_000;

/// Groups lately counted above [`PATCH_INLINE_MEMBERS_MAX`] members. It only chooses the shape
/// of a PATCH response: a group taken as large that has since shrunk is answered without its
/// members (which any client may GET), and a group not remembered is counted. What a response
/// lists is always read fresh.
#[derive(Debug, Default)]
pub(crate) struct LargeGroups {
    seen: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl LargeGroups {
    /// Whether `id` was counted large within [`LARGE_GROUP_FOR`] before `now`.
    fn recently(&self, id: &str, now: std::time::Instant) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        seen.get(id)
            .is_some_and(|at| now.saturating_duration_since(*at) < LARGE_GROUP_FOR)
    }

    /// `id` was counted large at `now`.
    fn note(&self, id: &str, now: std::time::Instant) {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        if seen.len() >= LARGE_GROUPS_MAX {
            seen.retain(|_, at| now.saturating_duration_since(*at) < LARGE_GROUP_FOR);
            if seen.len() >= LARGE_GROUPS_MAX {
                seen.clear();
            }
        }
        seen.insert(id.to_owned(), now);
    }

    /// Whether `id` has more than [`PATCH_INLINE_MEMBERS_MAX`] members: remembered, or counted.
    async fn exceeds(&self, store: &store::DynStore, id: &str) -> store::StoreResult<bool> {
        if self.recently(id, std::time::Instant::now()) {
            return Ok(true);
        }
        let large = store
            .member_count_exceeds(id, PATCH_INLINE_MEMBERS_MAX)
            .await?;
        if large {
            self.note(id, std::time::Instant::now());
        }
        Ok(large)
    }
}

fn read_opts(kind: ResourceKind, proj: &Projection) -> ReadOpts {
    ReadOpts {
        members: kind == ResourceKind::Group && proj.keeps("members"),
        groups: kind == ResourceKind::User && proj.keeps("groups"),
    }
}

fn new_members(list: Vec<Member>) -> Vec<NewMember> {
    list.into_iter()
        .map(|m| NewMember {
            ty: m.ty.as_deref().and_then(MemberType::parse),
            value: m.value,
            display: m.display,
        })
        .collect()
}

/// The version an `If-Match` header demands, given the current one: `Ok(None)` for no header or
/// `*`, `Err(412)` when no listed version is current.
fn expected_version(if_match: Option<&str>, current: i64) -> ApiResult<Option<i64>> {
    let Some(h) = if_match else { return Ok(None) };
    match parse_etags(h) {
        Some(list) if list.iter().any(|v| v.is_none()) => Ok(None),
        Some(list) if list.contains(&Some(current)) => Ok(Some(current)),
        _ => Err(StoreError::PreconditionFailed.into()),
    }
}

async fn current(
    state: &AppState,
    kind: ResourceKind,
    id: &str,
    read: ReadOpts,
) -> ApiResult<store::Resource> {
    state
        .store
        .get(kind, id, read)
        .await?
        .ok_or_else(|| not_found(kind, id))
}

fn not_found(kind: ResourceKind, id: &str) -> ApiError {
    ApiError(ScimError::not_found(format!(
        "{} `{id}` not found",
        kind.name()
    )))
}

/// `POST /{Users,Groups}`.
pub(crate) async fn create(
    state: &AppState,
    ctx: &WriteCtx,
    base: &str,
    kind: ResourceKind,
    body: &Value,
    proj: &Projection,
) -> ApiResult<(String, Reply)> {
    let n = scim::resource::normalize(kind, body)?;
    let members = n.members.map(new_members);
    let mut r = state.store.create(ctx, kind, n.attrs, members).await?;
    if kind == ResourceKind::Group && proj.keeps("members") {
        r = current(state, kind, &r.id, read_opts(kind, proj)).await?;
    }
    let reply = Reply {
        status: StatusCode::CREATED,
        body: Some(render(base, &r, proj).into()),
        etag: Some(etag(r.version)),
        location: Some(location(base, kind, &r.id)),
    };
    Ok((r.id, reply))
}

/// `GET /{Users,Groups}/{id}`.
pub(crate) async fn get(
    state: &AppState,
    base: &str,
    kind: ResourceKind,
    id: &str,
    proj: &Projection,
    if_none_match: Option<&str>,
) -> ApiResult<Reply> {
    let r = current(state, kind, id, read_opts(kind, proj)).await?;
    if let Some(list) = if_none_match.and_then(parse_etags)
        && list.iter().any(|v| v.is_none_or(|v| v == r.version))
    {
        let mut reply = Reply::empty(StatusCode::NOT_MODIFIED);
        reply.etag = Some(etag(r.version));
        return Ok(reply);
    }
    Ok(Reply {
        status: StatusCode::OK,
        body: Some(render(base, &r, proj).into()),
        etag: Some(etag(r.version)),
        location: Some(location(base, kind, &r.id)),
    })
}

/// `PUT /{Users,Groups}/{id}`: replaces every writable attribute; read-only values in the body
/// are ignored; a changed immutable value is 400 `mutability`. Never creates.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn replace(
    state: &AppState,
    ctx: &WriteCtx,
    base: &str,
    kind: ResourceKind,
    id: &str,
    body: &Value,
    if_match: Option<&str>,
    proj: &Projection,
) -> ApiResult<Reply> {
    let old = current(state, kind, id, ReadOpts::default()).await?;
    let expected = expected_version(if_match, old.version)?;
    let n = scim::resource::normalize(kind, body)?;
    scim::resource::check_immutable(kind, &old.attrs, &n.attrs)?;
    let members = n.members.map(new_members);
    let mut r = state
        .store
        .replace(ctx, kind, id, expected, n.attrs, members)
        .await?;
    if kind == ResourceKind::Group && proj.keeps("members") {
        r = current(state, kind, id, read_opts(kind, proj)).await?;
    }
    Ok(Reply {
        status: StatusCode::OK,
        body: Some(render(base, &r, proj).into()),
        etag: Some(etag(r.version)),
        location: Some(location(base, kind, id)),
    })
}

/// `PATCH /{Users,Groups}/{id}`: atomic; answers 200 with the resource (a group without its
/// members unless `attributes` asks for them).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn patch(
    state: &AppState,
    ctx: &WriteCtx,
    base: &str,
    kind: ResourceKind,
    id: &str,
    body: &Value,
    if_match: Option<&str>,
    proj: &Projection,
) -> ApiResult<Reply> {
    let ops = scim::patch::parse_patch(kind, body)?;
    // Members alone and no If-Match (how IdPs push membership): nothing of the stored group is
    // needed, so it is not read; the changes go to the membership rows in the write.
    let members_only = match if_match {
        None => scim::patch::member_changes_only(kind, &ops).transpose()?,
        Some(_) => None,
    };
    let mut attempt = 0;
    let r = if let Some(list) = members_only {
        let mut changes = Vec::with_capacity(list.len());
        for c in list {
            changes.push(membership_change(state, id, c).await?);
        }
        match state.store.update_members(ctx, id, &changes).await {
            Ok(r) => r,
            Err(StoreError::NotFound) => return Err(not_found(kind, id)),
            Err(e) => return Err(e.into()),
        }
    } else {
        loop {
            attempt += 1;
            let cur = current(state, kind, id, ReadOpts::default()).await?;
            let pinned = expected_version(if_match, cur.version)?;
            let outcome = scim::patch::apply_patch(kind, &cur.attrs, &ops)?;
            let mut changes = Vec::with_capacity(outcome.members.len());
            for c in outcome.members {
                changes.push(membership_change(state, id, c).await?);
            }
            let attrs = (outcome.attrs != cur.attrs).then_some(outcome.attrs);
            // Membership changes alone commute: applied to the rows at whatever version the group
            // has, so a burst of PATCHes to one group never retries, fails or loses a member. An
            // If-Match still pins the version.
            let written = if kind == ResourceKind::Group && attrs.is_none() && pinned.is_none() {
                state.store.update_members(ctx, id, &changes).await
            } else {
                state
                    .store
                    .update(ctx, kind, id, cur.version, attrs, &changes)
                    .await
            };
            match written {
                Ok(r) => break r,
                Err(StoreError::PreconditionFailed)
                    if pinned.is_none() && attempt < PATCH_ATTEMPTS =>
                {
                    tokio::time::sleep(retry_pause()).await;
                    continue;
                }
                // Without If-Match the client set no precondition: 412 would be wrong.
                Err(StoreError::PreconditionFailed) if pinned.is_none() => {
                    return Err(ApiError(ScimError::new(
                        503,
                        None,
                        "the resource kept changing while this PATCH was applied; retry the request",
                    )));
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    // A group's PATCH response leaves out its members (Entra asks for this; a 50,000-member
    // list per membership change would dominate the cost) unless `attributes` asks for them
    // or the group is small enough that listing them is cheap — generic SCIM clients such as
    // scim2-tester compare the PATCH response with what they sent.
    let mut patch_proj = proj.clone();
    if kind == ResourceKind::Group
        && !proj.requests("members")
        && read_opts(kind, proj).members
        && state.large_groups.exceeds(&state.store, id).await?
    {
        patch_proj.excluded.push(AttrPath::simple("members"));
    }
    let r = if read_opts(kind, &patch_proj).members {
        current(state, kind, id, read_opts(kind, &patch_proj)).await?
    } else {
        r
    };
    Ok(Reply {
        status: StatusCode::OK,
        body: Some(render(base, &r, &patch_proj).into()),
        etag: Some(etag(r.version)),
        location: Some(location(base, kind, id)),
    })
}

/// Resolves a PATCH member change to row operations; a filter selector is evaluated against
/// the current members.
async fn membership_change(
    state: &AppState,
    group_id: &str,
    c: MemberChange,
) -> ApiResult<MembershipChange> {
    Ok(match c {
        MemberChange::Add(list) => MembershipChange::Add(new_members(list)),
        MemberChange::ReplaceAll(list) => MembershipChange::ReplaceAll(new_members(list)),
        MemberChange::Remove(MemberSelector::All) => MembershipChange::RemoveAll,
        MemberChange::Remove(MemberSelector::Values(ids)) => MembershipChange::Remove(ids),
        MemberChange::Remove(MemberSelector::Filter(f)) => {
            let g = current(
                state,
                ResourceKind::Group,
                group_id,
                ReadOpts {
                    members: true,
                    groups: false,
                },
            )
            .await?;
            let vp = Filter::ValuePath {
                path: AttrPath::simple("members"),
                filter: Box::new(f),
            };
            let ids = g
                .members
                .unwrap_or_default()
                .into_iter()
                .filter(|m| {
                    let doc = json!({"members": [{"value": m.value, "type": m.ty.as_str(), "display": m.display}]});
                    filter::matches(&vp, ResourceKind::Group, &doc)
                })
                .map(|m| m.value)
                .collect();
            MembershipChange::Remove(ids)
        }
    })
}

/// `DELETE /{Users,Groups}/{id}`.
pub(crate) async fn delete(
    state: &AppState,
    ctx: &WriteCtx,
    kind: ResourceKind,
    id: &str,
    if_match: Option<&str>,
) -> ApiResult<Reply> {
    let expected = match if_match {
        None => None,
        Some(_) => {
            let cur = current(state, kind, id, ReadOpts::default()).await?;
            expected_version(if_match, cur.version)?
        }
    };
    match state.store.delete(ctx, kind, id, expected).await {
        Ok(()) => Ok(Reply::empty(StatusCode::NO_CONTENT)),
        Err(StoreError::NotFound) => Err(ApiError(ScimError::not_found(format!(
            "{} `{id}` not found",
            kind.name()
        )))),
        Err(e) => Err(e.into()),
    }
}

/// List/search parameters, from a query string or a SearchRequest body.
#[derive(Debug, Default, Clone)]
pub(crate) struct ListParams {
    /// `filter`.
    pub(crate) filter: Option<String>,
    /// `sortBy`.
    pub(crate) sort_by: Option<String>,
    /// `sortOrder`.
    pub(crate) sort_order: Option<String>,
    /// `startIndex` as given.
    pub(crate) start_index: Option<Value>,
    /// `count` as given.
    pub(crate) count: Option<Value>,
    /// `cursor` (RFC 9865); `Some("")` asks for the first page.
    pub(crate) cursor: Option<String>,
    /// `attributes`/`excludedAttributes`.
    pub(crate) projection: Projection,
}

impl ListParams {
    /// From query parameters.
    pub(crate) fn from_params(p: &crate::extract::Params) -> ScimResult<Self> {
        Ok(ListParams {
            filter: p.get("filter").map(str::to_owned),
            sort_by: p.get("sortBy").filter(|s| !s.is_empty()).map(str::to_owned),
            sort_order: p
                .get("sortOrder")
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            start_index: p.get("startIndex").map(|s| Value::String(s.to_owned())),
            count: p.get("count").map(|s| Value::String(s.to_owned())),
            cursor: p.get("cursor").map(str::to_owned),
            projection: p.projection()?,
        })
    }

    /// From a SearchRequest body.
    pub(crate) fn from_search_body(body: &Value) -> ScimResult<Self> {
        if !body.is_object() {
            return Err(ScimError::invalid_syntax(
                "a SearchRequest must be a JSON object",
            ));
        }
        let text = |key: &str| -> ScimResult<Option<String>> {
            match get_ci(body, key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(ScimError::bad_request(
                    ScimType::InvalidValue,
                    format!("`{key}` must be a string"),
                )),
            }
        };
        Ok(ListParams {
            filter: text("filter")?,
            sort_by: text("sortBy")?,
            sort_order: text("sortOrder")?,
            start_index: get_ci(body, "startIndex").cloned(),
            count: get_ci(body, "count").cloned(),
            cursor: text("cursor")?,
            projection: Projection::from_body(body)?,
        })
    }
}

fn int_param(v: &Value, name: &str, scim_type: ScimType) -> ScimResult<i64> {
    let n = match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    };
    n.ok_or_else(|| ScimError::bad_request(scim_type, format!("`{name}` must be an integer")))
}

/// A validated list query for one resource type.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The store query (offset/count filled in by the caller).
    pub(crate) query: ListQuery,
    /// 1-based index of the first result (index paging).
    pub(crate) start_index: usize,
    /// The cursor in use (cursor paging), and the fingerprint it is bound to.
    pub(crate) cursor: Option<u64>,
}

/// Validates list parameters for `kind`.
pub(crate) fn plan_list(kind: ResourceKind, p: &ListParams, now_unix: i64) -> ScimResult<Plan> {
    let filter = match p.filter.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(text) => {
            let f = filter::parse(text)?;
            filter::validate(&f, kind)?;
            Some(f)
        }
    };
    let sort_by = match &p.sort_by {
        None => None,
        Some(s) => {
            let path = AttrPath::parse(s).map_err(|_| {
                ScimError::bad_request(
                    ScimType::InvalidValue,
                    format!("`sortBy={s}` is not an attribute path"),
                )
            })?;
            if path.resolve(kind).is_none() {
                return Err(ScimError::bad_request(
                    ScimType::InvalidValue,
                    format!("`sortBy`: {} has no attribute `{s}`", kind.name()),
                ));
            }
            Some(path)
        }
    };
    let descending = match p.sort_order.as_deref() {
        None => false,
        Some(s) if s.eq_ignore_ascii_case("ascending") => false,
        Some(s) if s.eq_ignore_ascii_case("descending") => true,
        Some(s) => {
            return Err(ScimError::bad_request(
                ScimType::InvalidValue,
                format!("`sortOrder={s}`: use ascending or descending"),
            ));
        }
    };
    let cursor_mode = p.cursor.is_some();
    let count_type = if cursor_mode {
        ScimType::InvalidCount
    } else {
        ScimType::InvalidValue
    };
    let count = match &p.count {
        None => DEFAULT_PAGE_SIZE,
        Some(v) => int_param(v, "count", count_type)?.clamp(0, MAX_PAGE_SIZE as i64) as usize,
    };
    let (offset, start_index, cursor) = if let Some(c) = &p.cursor {
        let fp = list::fingerprint(&[
            kind.name(),
            p.filter.as_deref().unwrap_or(""),
            p.sort_by.as_deref().unwrap_or(""),
            if descending { "d" } else { "a" },
        ]);
        let offset = if c.is_empty() {
            0
        } else {
            Cursor::decode(c, fp, now_unix)?.offset
        };
        (offset, offset + 1, Some(fp))
    } else {
        let si = match &p.start_index {
            None => 1,
            Some(v) => int_param(v, "startIndex", ScimType::InvalidValue)?.max(1) as usize,
        };
        (si - 1, si, None)
    };
    Ok(Plan {
        query: ListQuery {
            filter,
            sort_by,
            descending,
            offset,
            count,
            read: ReadOpts::default(),
        },
        start_index,
        cursor,
    })
}

/// `GET /{Users,Groups}` and `POST /{Users,Groups}/.search`.
pub(crate) async fn list(
    state: &AppState,
    base: &str,
    kind: ResourceKind,
    p: &ListParams,
) -> ApiResult<Reply> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    // The common case (every IdP's `userName eq` lookup): no cursor, no projection. Its answer
    // is cached until the next resource write, keyed by everything it depends on; the
    // generation is read before the data, so a write in between only makes the entry unusable.
    let plain = p.cursor.is_none()
        && p.projection.attributes.is_empty()
        && p.projection.excluded.is_empty();
    let cache_key = plain.then(|| {
        let start_index = p.start_index.as_ref().map(ToString::to_string);
        let count = p.count.as_ref().map(ToString::to_string);
        // Length-prefixed parts: no two parameter sets share a key, whatever they contain.
        let mut key = String::new();
        for part in [
            kind.name(),
            base,
            p.filter.as_deref().unwrap_or(""),
            p.sort_by.as_deref().unwrap_or(""),
            p.sort_order.as_deref().unwrap_or(""),
            start_index.as_deref().unwrap_or(""),
            count.as_deref().unwrap_or(""),
        ] {
            let _ = write!(key, "{}:{part}", part.len());
        }
        key
    });
    // One primary-key read on PostgreSQL (the generation every replica's resource writes move
    // on), a memory read on SQLite; only asked when the answer could come from the cache or be
    // kept in it (a key seen before).
    let generation = match &cache_key {
        Some(key) if state.lookups.admits(key) => state.store.resource_generation().await?,
        _ => None,
    };
    if let (Some(key), Some(g)) = (&cache_key, generation)
        && let Some(body) = state.lookups.get(key, g)
    {
        return Ok(Reply::ok(ReplyBody::Serialized(body)));
    }
    let mut plan = plan_list(kind, p, now)?;
    plan.query.read = read_opts(kind, &p.projection);
    let page = state.store.list(kind, &plan.query).await?;
    if plain {
        // Serialized straight from the stored resources.
        let out = ListOut {
            schemas: [scim::schema::LIST_RESPONSE_SCHEMA],
            total_results: page.total,
            items_per_page: page.resources.len(),
            start_index: plan.start_index,
            resources: page
                .resources
                .iter()
                .map(|r| FullView { base_url: base, r })
                .collect(),
        };
        let mut bytes = Vec::with_capacity(1024 * (1 + out.resources.len()));
        serde_json::to_writer(&mut bytes, &out)
            .map_err(|e| ApiError(ScimError::new(500, None, format!("cannot render: {e}"))))?;
        let body = axum::body::Bytes::from(bytes);
        if let (Some(key), Some(g)) = (cache_key, generation)
            && page.resources.len() <= crate::lookup_cache::MAX_RESOURCES
        {
            state.lookups.insert(key, g, body.clone());
        }
        return Ok(Reply::ok(ReplyBody::Serialized(body)));
    }
    let resources: Vec<Value> = page
        .resources
        .iter()
        .map(|r| render(base, r, &p.projection))
        .collect();
    let n = resources.len();
    let mut body = list::list_response(page.total, plan.start_index, resources);
    if let Some(fp) = plan.cursor {
        add_cursors(
            &mut body,
            plan.query.offset,
            plan.query.count,
            n,
            page.total,
            fp,
            now,
        );
    }
    Ok(Reply::ok(body))
}

/// A ListResponse over [`FullView`]s (what `list::list_response` builds as a value).
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ListOut<'a> {
    schemas: [&'static str; 1],
    total_results: usize,
    items_per_page: usize,
    start_index: usize,
    #[serde(rename = "Resources")]
    resources: Vec<FullView<'a>>,
}

fn add_cursors(
    body: &mut Value,
    offset: usize,
    count: usize,
    n: usize,
    total: usize,
    fp: u64,
    now: i64,
) {
    if offset + n < total && n > 0 {
        body["nextCursor"] = json!(
            Cursor {
                offset: offset + n,
                fingerprint: fp,
                issued: now
            }
            .encode()
        );
    }
    if offset > 0 {
        let prev = offset.saturating_sub(count.max(1));
        body["previousCursor"] = json!(
            Cursor {
                offset: prev,
                fingerprint: fp,
                issued: now
            }
            .encode()
        );
    }
}

/// `POST /.search` at the root: Users then Groups, paged as one list.
pub(crate) async fn search_all(state: &AppState, base: &str, p: &ListParams) -> ApiResult<Reply> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let fp = list::fingerprint(&[
        "*",
        p.filter.as_deref().unwrap_or(""),
        p.sort_by.as_deref().unwrap_or(""),
        p.sort_order.as_deref().unwrap_or(""),
    ]);
    let cursor_offset = match p.cursor.as_deref() {
        None | Some("") => 0,
        Some(c) => Cursor::decode(c, fp, now)?.offset,
    };
    let per_type = ListParams {
        cursor: None,
        ..p.clone()
    };
    let mut plans = vec![];
    let mut first_err = None;
    for kind in [ResourceKind::User, ResourceKind::Group] {
        match plan_list(kind, &per_type, now) {
            Ok(plan) => plans.push((kind, plan)),
            Err(e)
                if e.scim_type == Some(ScimType::InvalidFilter)
                    || e.scim_type == Some(ScimType::InvalidValue) =>
            {
                first_err.get_or_insert(e);
            }
            Err(e) => return Err(e.into()),
        }
    }
    if plans.is_empty() {
        return Err(first_err
            .map(ApiError)
            .unwrap_or_else(|| ApiError(ScimError::invalid_filter("invalid filter"))));
    }
    let count = plans[0].1.query.count;
    let (offset, start_index) = if p.cursor.is_some() {
        (cursor_offset, cursor_offset + 1)
    } else {
        (plans[0].1.query.offset, plans[0].1.start_index)
    };
    let mut total = 0;
    let mut resources = vec![];
    for (kind, mut plan) in plans {
        // Count this type, then take the part of the combined page that falls in it.
        plan.query.count = 0;
        plan.query.offset = 0;
        let t = state.store.list(kind, &plan.query).await?.total;
        let want = count.saturating_sub(resources.len());
        if want > 0 && offset + resources.len() < total + t {
            plan.query.offset = (offset + resources.len()).saturating_sub(total);
            plan.query.count = want;
            plan.query.read = read_opts(kind, &p.projection);
            let page = state.store.list(kind, &plan.query).await?;
            resources.extend(
                page.resources
                    .iter()
                    .map(|r| render(base, r, &p.projection)),
            );
        }
        total += t;
    }
    let n = resources.len();
    let mut body = list::list_response(total, start_index, resources);
    if p.cursor.is_some() {
        add_cursors(&mut body, offset, count, n, total, fp, now);
    }
    Ok(Reply::ok(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_counted_large_is_taken_as_large_for_a_few_seconds_only() {
        let g = LargeGroups::default();
        let t0 = std::time::Instant::now();
        let at = |d: std::time::Duration| t0 + d;
        let ms = std::time::Duration::from_millis;
        assert!(!g.recently("a", t0), "never counted");
        g.note("a", t0);
        assert!(g.recently("a", t0));
        assert!(!g.recently("b", t0));
        assert!(g.recently("a", at(LARGE_GROUP_FOR - ms(1))));
        assert!(
            !g.recently("a", at(LARGE_GROUP_FOR)),
            "counted again after {LARGE_GROUP_FOR:?}"
        );
        // Bounded: the stale are forgotten first, then everything.
        for i in 0..LARGE_GROUPS_MAX - 1 {
            g.note(&i.to_string(), t0);
        }
        let later = at(LARGE_GROUP_FOR + ms(1));
        g.note("last", later);
        assert!(g.recently("last", later));
        assert_eq!(g.seen.lock().unwrap().len(), 1, "the stale were forgotten");
    }
}
