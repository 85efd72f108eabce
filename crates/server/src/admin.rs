//! The read-only dashboard: server-rendered HTML on its own listener (`[admin] listen`),
//! behind admin tokens (`token create --admin`, `[admin] token_file`) that the SCIM API never
//! accepts, and SCIM tokens that it never accepts.
//!
//! Pages: Overview (TeamCity, the last pass and reconcile, the outbox, held batches, drift),
//! People (a user's SCIM record, TeamCity user and every role with why), Groups, Audit and
//! Plan. Nothing here writes: the store is only read, and what needs the sync engine's
//! knowledge (explanations, the plan, who a held batch affects) comes through
//! [`AdminSource`], which the binary implements over the sync engine. No JavaScript; the
//! Content-Security-Policy forbids scripts.
//!
//! A browser signs in by pasting an admin token into the sign-in form, which sets an
//! `HttpOnly`, `SameSite=Strict` cookie holding it; other clients send
//! `Authorization: Bearer <admin token>`. Either is checked on every request, so a revoked
//! token stops working within [`crate::auth::REFRESH`].

use std::collections::BTreeSet;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Form, Router};
use futures::future::BoxFuture;
use scim::ResourceKind;
use serde::Deserialize;
use serde_json::Value;
use store::{
    AuditEvent, AuditLog, DynStore, HeldBatch, HeldState, ListQuery, Mappings, OutboxState,
    ReadOpts, Resources,
};

use crate::auth::TokenCache;
use crate::state::Readiness;

/// The cookie that carries the admin token of a signed-in browser.
pub const COOKIE: &str = "tcscim_admin";

/// How long a browser stays signed in.
const SESSION_SECONDS: u32 = 8 * 3600;

/// At most this many audit events are scanned for one Audit page.
const AUDIT_SCAN: i64 = 20_000;

/// Rows on one Audit page.
const AUDIT_PAGE: usize = 100;

/// What the dashboard needs from the sync engine. Implemented by the binary; every method only
/// reads (TeamCity included).
pub trait AdminSource: Send + Sync + std::fmt::Debug {
    /// TeamCity as the bridge last saw it: `Ok` with a description, `Err` with why it cannot be
    /// used (unreachable, token refused, no token configured, a policy that does not match).
    fn teamcity(&self) -> Result<String, String>;

    /// Who a held batch would take access from, for people.
    fn held_affects<'a>(&'a self, batch: &'a HeldBatch) -> BoxFuture<'a, String>;

    /// A user's access, explained, and their TeamCity user as TeamCity has it now.
    fn person<'a>(&'a self, scim_id: &'a str) -> BoxFuture<'a, Result<PersonView, String>>;

    /// Every SCIM group with its TeamCity group, policy rules, roles and members; the defaults
    /// group last.
    fn groups(&self) -> BoxFuture<'_, Result<Vec<GroupView>, String>>;

    /// What a reconcile would change now.
    fn plan(&self) -> BoxFuture<'_, Result<PlanView, String>>;

    /// In pull mode, where the directory comes from and how the last pull went (`Err`: the IdP
    /// could not be read); `None` when IdPs push over SCIM.
    fn directory_source(&self) -> BoxFuture<'_, Option<Result<String, String>>> {
        Box::pin(async { None })
    }
}

/// One role and why the user has it.
#[derive(Debug, Clone)]
pub struct GrantView {
    /// `ROLE@scope`.
    pub role: String,
    /// Why.
    pub via: String,
}

/// A TeamCity user as TeamCity has it now.
#[derive(Debug, Clone)]
pub struct TeamCityUserView {
    /// Numeric id.
    pub id: String,
    /// Username.
    pub username: String,
    /// Display name.
    pub name: Option<String>,
    /// Group names and keys.
    pub groups: Vec<String>,
    /// Direct roles, `ROLE@scope`.
    pub roles: Vec<String>,
}

/// A user's access.
#[derive(Debug, Clone)]
pub struct PersonView {
    /// Active in the directory.
    pub active: bool,
    /// Every role the directory gives, with why.
    pub grants: Vec<GrantView>,
    /// What caps removed, for people.
    pub capped: Vec<String>,
    /// IdP groups of the user that no policy rule gives roles.
    pub roleless_groups: Vec<String>,
    /// The TeamCity user: `Ok(None)` when the bridge has not created or linked it yet.
    pub teamcity: Result<Option<TeamCityUserView>, String>,
}

/// A SCIM group and what it becomes in TeamCity.
#[derive(Debug, Clone)]
pub struct GroupView {
    /// SCIM id (`None` for the defaults group).
    pub scim_id: Option<String>,
    /// Name.
    pub name: String,
    /// The IdP's id.
    pub external_id: Option<String>,
    /// The TeamCity group key, once created.
    pub teamcity_key: Option<String>,
    /// Matching policy rules.
    pub rules: Vec<String>,
    /// Roles it carries, `ROLE@scope`.
    pub roles: Vec<String>,
    /// Members in the directory.
    pub members: usize,
    /// Members in TeamCity's group (active, not kept out by a cap).
    pub teamcity_members: usize,
}

/// What a reconcile would change.
#[derive(Debug, Clone)]
pub struct PlanView {
    /// When it was computed (RFC 3339).
    pub computed: String,
    /// The plan, rendered as `teamcity-scim plan` renders it.
    pub text: String,
    /// Number of steps.
    pub steps: usize,
    /// TeamCity reads it took.
    pub reads: usize,
}

/// The dashboard's state.
#[derive(Debug, Clone)]
pub struct AdminState {
    /// Read only.
    pub store: DynStore,
    /// Admin tokens.
    pub tokens: TokenCache,
    /// The sync engine's view.
    pub source: Arc<dyn AdminSource>,
    /// Readiness beyond the database, as `/healthz/ready` answers it.
    pub readiness: Option<Readiness>,
    /// Mark the cookie `Secure` (the listener serves HTTPS).
    pub secure_cookie: bool,
}

/// The dashboard's router.
pub fn router(state: AdminState) -> Router {
    let pages = Router::new()
        .route("/", get(overview))
        .route("/people", get(people))
        .route("/people/{id}", get(person))
        .route("/groups", get(groups))
        .route("/audit", get(audit))
        .route("/plan", get(plan))
        .route("/logout", axum::routing::post(logout))
        .layer(middleware::from_fn_with_state(state.clone(), require_admin));
    Router::new()
        .merge(pages)
        .route("/login", get(login_form).post(login))
        .route("/static/admin.css", get(css))
        .route("/static/favicon.svg", get(favicon))
        .route("/favicon.ico", get(favicon))
        .layer(middleware::from_fn(security_headers))
        .with_state(state)
}

async fn security_headers(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("../static/admin.css"),
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        include_str!("../static/favicon.svg"),
    )
        .into_response()
}

/// The token a request presents: the bearer token, else the sign-in cookie.
fn presented_token(req: &Request) -> Option<String> {
    let headers = req.headers();
    if let Some(v) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        && let Some((scheme, t)) = v.split_once(' ')
        && scheme.eq_ignore_ascii_case("bearer")
    {
        return Some(t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

async fn require_admin(State(s): State<AdminState>, mut req: Request, next: Next) -> Response {
    let rec = match presented_token(&req) {
        Some(t) => s.tokens.authenticate(&t).await,
        None => None,
    };
    match rec {
        Some(rec) => {
            req.extensions_mut().insert(crate::auth::Actor {
                name: format!("admin:{}", rec.id),
            });
            next.run(req).await
        }
        None => {
            metrics::counter!("teamcity_scim_admin_auth_failures_total").increment(1);
            let mut resp = render_status(
                StatusCode::UNAUTHORIZED,
                &LoginPage {
                    error: presented_token(&req).is_some().then_some(
                        "That token is not a valid admin token (unknown, revoked or expired).",
                    ),
                },
            );
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"teamcity-scim dashboard\""),
            );
            resp
        }
    }
}

#[derive(Template)]
#[template(path = "admin/login.html")]
struct LoginPage {
    error: Option<&'static str>,
}

async fn login_form() -> Response {
    render(&LoginPage { error: None })
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(s): State<AdminState>, Form(form): Form<LoginForm>) -> Response {
    let token = form.token.trim();
    if s.tokens.authenticate(token).await.is_none() {
        metrics::counter!("teamcity_scim_admin_auth_failures_total").increment(1);
        return render_status(
            StatusCode::UNAUTHORIZED,
            &LoginPage {
                error: Some(
                    "That is not a valid admin token. Create one with \
                     `teamcity-scim token create --admin --name NAME`.",
                ),
            },
        );
    }
    // Tokens are base64url: nothing in them needs quoting in a cookie.
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}{}",
        if s.secure_cookie { "; Secure" } else { "" }
    );
    let mut resp = Redirect::to("/").into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

async fn logout() -> Response {
    let mut resp = Redirect::to("/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tcscim_admin=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

fn render(page: &impl Template) -> Response {
    render_status(StatusCode::OK, page)
}

fn render_status(status: StatusCode, page: &impl Template) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "dashboard template failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be rendered",
            )
                .into_response()
        }
    }
}

/// A page that could not be built: the reason, inside the layout.
#[derive(Template)]
#[template(path = "admin/error.html")]
struct ErrorPage {
    nav: &'static str,
    message: String,
}

fn failed(nav: &'static str, message: impl std::fmt::Display) -> Response {
    render_status(
        StatusCode::INTERNAL_SERVER_ERROR,
        &ErrorPage {
            nav,
            message: message.to_string(),
        },
    )
}

// ---- Overview ------------------------------------------------------------------------------

/// A pass report as `sync` stores it.
#[derive(Debug, Default)]
struct PassView {
    time: String,
    seconds: String,
    planned: u64,
    applied: u64,
    failed: u64,
    cancelled: u64,
    held: u64,
    stopped_early: bool,
    drift: String,
}

impl PassView {
    fn parse(json: &str) -> PassView {
        let v: Value = serde_json::from_str(json).unwrap_or_default();
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        PassView {
            time: v["time"].as_str().unwrap_or("?").to_owned(),
            seconds: format!("{:.1}", v["seconds"].as_f64().unwrap_or(0.0)),
            planned: n("planned"),
            applied: n("applied"),
            failed: n("failed"),
            cancelled: n("cancelled"),
            held: n("held"),
            stopped_early: v["stopped_early"].as_bool() == Some(true),
            drift: v["drift"].as_str().unwrap_or_default().to_owned(),
        }
    }
}

struct OutboxRow {
    id: i64,
    what: String,
    attempts: i64,
    reason: String,
}

struct HeldView {
    id: i64,
    created: String,
    source: String,
    state: HeldState,
    summary: String,
    affects: String,
}

#[derive(Template)]
#[template(path = "admin/overview.html")]
struct OverviewPage {
    nav: &'static str,
    ready: Result<(), String>,
    teamcity: Result<String, String>,
    directory_source: Option<Result<String, String>>,
    last_pass: Option<PassView>,
    last_reconcile: Option<PassView>,
    pending: usize,
    retrying: Vec<OutboxRow>,
    dead: Vec<OutboxRow>,
    dead_total: usize,
    oldest_pending: Option<String>,
    held: Vec<HeldView>,
    drift: Vec<PlanLine>,
}

async fn overview(State(s): State<AdminState>) -> Response {
    match overview_page(&s).await {
        Ok(page) => render(&page),
        Err(e) => failed("overview", e),
    }
}

fn outbox_row(e: &store::OutboxEntry, reason: Option<&str>) -> OutboxRow {
    OutboxRow {
        id: e.item.id,
        what: format!(
            "{} {} {}",
            e.item.operation, e.item.entity_type, e.item.entity_id
        ),
        attempts: e.item.attempts,
        reason: reason.unwrap_or("-").to_owned(),
    }
}

async fn overview_page(s: &AdminState) -> Result<OverviewPage, store::StoreError> {
    let store = &s.store;
    let ready = match &s.readiness {
        Some(r) => (r.0)().map_or(Ok(()), Err),
        None => Ok(()),
    };
    let report = |key: &'static str| async move {
        Ok::<_, store::StoreError>(
            store
                .sync_state_get(key)
                .await?
                .map(|j| PassView::parse(&j)),
        )
    };
    let last_pass = report(LAST_PASS_KEY).await?;
    let last_reconcile = report(LAST_RECONCILE_KEY).await?;
    let summary = store.outbox_summary().await?;
    let pending_rows = store.list_outbox(Some(OutboxState::Pending), 200).await?;
    let retrying = pending_rows
        .iter()
        .filter(|e| e.last_error.is_some())
        .map(|e| outbox_row(e, e.last_error.as_deref()))
        .collect();
    let dead_rows = store.list_outbox(Some(OutboxState::Dead), 50).await?;
    let dead = dead_rows
        .iter()
        .map(|e| outbox_row(e, e.dead_reason.as_deref().or(e.last_error.as_deref())))
        .collect();
    let mut held = Vec::new();
    let mut batches = store.list_held(Some(HeldState::Held)).await?;
    batches.extend(store.list_held(Some(HeldState::Approved)).await?);
    for b in &batches {
        held.push(HeldView {
            id: b.id,
            created: store::timefmt::format(b.created),
            source: b.source.clone(),
            state: b.state,
            summary: b.summary.clone(),
            affects: s.source.held_affects(b).await,
        });
    }
    let drift = last_reconcile
        .as_ref()
        .map(|r| plan_lines(&r.drift))
        .unwrap_or_default();
    Ok(OverviewPage {
        nav: "overview",
        drift,
        ready,
        teamcity: s.source.teamcity(),
        directory_source: s.source.directory_source().await,
        last_pass,
        last_reconcile,
        pending: summary
            .by_state
            .get(&OutboxState::Pending)
            .copied()
            .unwrap_or(0) as usize,
        retrying,
        dead,
        dead_total: summary
            .by_state
            .get(&OutboxState::Dead)
            .copied()
            .unwrap_or(0) as usize,
        oldest_pending: summary.oldest_pending.map(store::timefmt::format),
        held,
    })
}

/// `sync::LAST_PASS_KEY` (the server does not depend on `sync`; a test in the binary pins them
/// equal).
pub const LAST_PASS_KEY: &str = "last_pass_report";
/// `sync::LAST_RECONCILE_KEY`.
pub const LAST_RECONCILE_KEY: &str = "last_reconcile_report";

// ---- People --------------------------------------------------------------------------------

#[derive(Deserialize)]
struct PeopleQuery {
    #[serde(default)]
    q: String,
}

struct PersonRow {
    id: String,
    user_name: String,
    name: String,
    email: String,
    active: bool,
}

fn person_row(r: &store::Resource) -> PersonRow {
    let a = &r.attrs;
    PersonRow {
        id: r.id.clone(),
        user_name: a["userName"].as_str().unwrap_or_default().to_owned(),
        name: a["displayName"]
            .as_str()
            .map(str::to_owned)
            .or_else(|| a["name"]["formatted"].as_str().map(str::to_owned))
            .unwrap_or_default(),
        email: primary_email(a).unwrap_or_default(),
        active: a["active"].as_bool().unwrap_or(true),
    }
}

fn primary_email(attrs: &Value) -> Option<String> {
    let emails = attrs["emails"].as_array()?;
    emails
        .iter()
        .find(|e| e["primary"].as_bool() == Some(true))
        .or_else(|| emails.first())
        .and_then(|e| e["value"].as_str())
        .map(str::to_owned)
}

#[derive(Template)]
#[template(path = "admin/people.html")]
struct PeoplePage {
    nav: &'static str,
    q: String,
    total: usize,
    rows: Vec<PersonRow>,
}

/// A SCIM filter matching `q` in userName or an email (the literal is a JSON string).
fn people_filter(q: &str) -> Option<scim::filter::Filter> {
    let lit = serde_json::to_string(q).ok()?;
    let f = scim::filter::parse(&format!(
        "userName co {lit} or emails.value co {lit} or displayName co {lit}"
    ))
    .ok()?;
    scim::filter::validate(&f, ResourceKind::User).ok()?;
    Some(f)
}

async fn people(State(s): State<AdminState>, Query(q): Query<PeopleQuery>) -> Response {
    let query = q.q.trim().to_owned();
    let filter = if query.is_empty() {
        None
    } else {
        people_filter(&query)
    };
    let list = ListQuery {
        filter,
        sort_by: scim::AttrPath::parse("userName").ok(),
        descending: false,
        offset: 0,
        count: 200,
        read: ReadOpts::default(),
    };
    match s.store.list(ResourceKind::User, &list).await {
        Ok(page) => render(&PeoplePage {
            nav: "people",
            q: query,
            total: page.total,
            rows: page.resources.iter().map(person_row).collect(),
        }),
        Err(e) => failed("people", e),
    }
}

#[derive(Template)]
#[template(path = "admin/person.html")]
struct PersonPage {
    nav: &'static str,
    row: PersonRow,
    record: String,
    scim_groups: Vec<(String, String)>,
    access: Result<PersonView, String>,
    events: Vec<EventRow>,
}

async fn person(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    let opts = ReadOpts {
        groups: true,
        ..ReadOpts::default()
    };
    let user = match s.store.get(ResourceKind::User, &id, opts).await {
        Ok(Some(u)) => u,
        Ok(None) => {
            return render_status(
                StatusCode::NOT_FOUND,
                &ErrorPage {
                    nav: "people",
                    message: format!("There is no user with SCIM id {id}."),
                },
            );
        }
        Err(e) => return failed("people", e),
    };
    let mut record = user.attrs.clone();
    if let Some(o) = record.as_object_mut() {
        o.insert("id".into(), Value::String(user.id.clone()));
    }
    let scim_groups = user
        .groups
        .iter()
        .flatten()
        .map(|g| (g.value.clone(), g.display.clone()))
        .collect();
    let access = s.source.person(&id).await;
    let subject = Subject::user(&*s.store, &id).await;
    let events = match recent_matching(&*s.store, None, None, None, |e| subject.matches(e)).await {
        Ok((rows, _)) => rows.into_iter().take(20).collect(),
        Err(e) => return failed("people", e),
    };
    render(&PersonPage {
        nav: "people",
        row: person_row(&user),
        record: serde_json::to_string_pretty(&record).unwrap_or_default(),
        scim_groups,
        access,
        events,
    })
}

// ---- Groups --------------------------------------------------------------------------------

#[derive(Template)]
#[template(path = "admin/groups.html")]
struct GroupsPage {
    nav: &'static str,
    groups: Result<Vec<GroupView>, String>,
}

async fn groups(State(s): State<AdminState>) -> Response {
    render(&GroupsPage {
        nav: "groups",
        groups: s.source.groups().await,
    })
}

// ---- Plan ----------------------------------------------------------------------------------

struct PlanLine {
    class: &'static str,
    text: String,
}

#[derive(Template)]
#[template(path = "admin/plan.html")]
struct PlanPage {
    nav: &'static str,
    plan: Result<PlanView, String>,
    lines: Vec<PlanLine>,
}

/// The CSS class of a rendered plan line: additions, removals and changes are coloured.
fn plan_lines(text: &str) -> Vec<PlanLine> {
    text.lines()
        .map(|l| {
            let class = match l.trim_start().chars().next() {
                Some('+') => "add",
                Some('-') => "remove",
                Some('~') => "change",
                Some('!') => "warn",
                _ => "",
            };
            PlanLine {
                class,
                text: l.to_owned(),
            }
        })
        .collect()
}

async fn plan(State(s): State<AdminState>) -> Response {
    let plan = s.source.plan().await;
    let lines = plan
        .as_ref()
        .map(|p| plan_lines(&p.text))
        .unwrap_or_default();
    render(&PlanPage {
        nav: "plan",
        plan,
        lines,
    })
}

// ---- Audit ---------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct AuditQuery {
    #[serde(default)]
    user: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    before: Option<i64>,
}

struct EventRow {
    seq: i64,
    time: String,
    actor: String,
    operation: String,
    resource: String,
    outcome: String,
    detail: String,
}

fn event_row(e: &AuditEvent) -> EventRow {
    let mut detail = e.detail.clone();
    if detail.chars().count() > 240 {
        detail = detail.chars().take(240).collect::<String>() + "…";
    }
    EventRow {
        seq: e.seq,
        time: e.time.clone(),
        actor: e.actor.clone(),
        operation: e.operation.clone(),
        resource: format!(
            "{} {}",
            e.resource_type,
            e.resource_id.as_deref().unwrap_or("")
        ),
        outcome: e.outcome.clone(),
        detail,
    }
}

#[derive(Template)]
#[template(path = "admin/audit.html")]
struct AuditPage {
    nav: &'static str,
    q: AuditQuery,
    problem: Option<String>,
    rows: Vec<EventRow>,
    older: Option<String>,
}

/// What audit events say about one user or one group.
#[derive(Debug, Default)]
struct Subject {
    /// `resource_id`s naming it.
    ids: BTreeSet<String>,
    /// Entries of a detail's `member_ids` naming it (a user).
    member_ids: BTreeSet<String>,
    /// A detail's `group` naming it (a group's TeamCity key).
    group_key: Option<String>,
}

impl Subject {
    /// A user: its SCIM id and its TeamCity user id, as resources and as group members.
    async fn user(store: &dyn Mappings, scim_id: &str) -> Subject {
        let mut s = Subject {
            ids: BTreeSet::from([scim_id.to_owned(), format!("user:new:{scim_id}")]),
            member_ids: BTreeSet::from([format!("new:{scim_id}")]),
            group_key: None,
        };
        if let Ok(Some(m)) = store.mapping(ResourceKind::User, scim_id).await {
            s.ids.insert(format!("user:{}", m.teamcity_id));
            s.member_ids.insert(m.teamcity_id);
        }
        s
    }

    /// A group: its SCIM id and its TeamCity key, as resources and as the group of a
    /// membership change.
    async fn group(store: &dyn Mappings, scim_id: &str) -> Subject {
        let mut s = Subject {
            ids: BTreeSet::from([scim_id.to_owned()]),
            ..Subject::default()
        };
        if let Ok(Some(m)) = store.mapping(ResourceKind::Group, scim_id).await {
            s.ids.insert(format!("group:{}", m.teamcity_id));
            s.group_key = Some(m.teamcity_id);
        }
        s
    }

    /// Whether `e` is about this subject.
    fn matches(&self, e: &AuditEvent) -> bool {
        if e.resource_id
            .as_deref()
            .is_some_and(|r| self.ids.contains(r))
        {
            return true;
        }
        if self.member_ids.is_empty() && self.group_key.is_none() {
            return false;
        }
        let Ok(detail) = serde_json::from_str::<Value>(&e.detail) else {
            return false;
        };
        let member = detail["member_ids"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .any(|m| self.member_ids.contains(m));
        member
            || self.group_key.as_deref().is_some_and(|k| {
                detail["group"].as_str() == Some(k)
                    || detail["groups"]
                        .as_array()
                        .is_some_and(|gs| gs.iter().any(|g| g.as_str() == Some(k)))
            })
    }
}

/// Looks a user up by SCIM id or userName.
async fn find(store: &dyn Resources, kind: ResourceKind, text: &str) -> Option<String> {
    if let Ok(Some(r)) = store.get(kind, text, ReadOpts::default()).await {
        return Some(r.id);
    }
    let attr = match kind {
        ResourceKind::User => "userName",
        ResourceKind::Group => "displayName",
    };
    let lit = serde_json::to_string(text).ok()?;
    let filter = scim::filter::parse(&format!("{attr} eq {lit}")).ok()?;
    scim::filter::validate(&filter, kind).ok()?;
    let q = ListQuery {
        filter: Some(filter),
        sort_by: None,
        descending: false,
        offset: 0,
        count: 1,
        read: ReadOpts::default(),
    };
    let page = store.list(kind, &q).await.ok()?;
    page.resources.first().map(|r| r.id.clone())
}

/// The newest events before `before` that `keep` accepts, within `since..=until`, scanning at
/// most [`AUDIT_SCAN`] events. Returns the rows and, when there may be more, the seq to
/// continue before.
async fn recent_matching(
    store: &dyn AuditLog,
    before: Option<i64>,
    since: Option<&str>,
    until: Option<&str>,
    keep: impl Fn(&AuditEvent) -> bool,
) -> Result<(Vec<EventRow>, Option<i64>), store::StoreError> {
    let mut rows = Vec::new();
    let mut cursor = before;
    let mut scanned = 0;
    loop {
        let batch = store.audit_recent(cursor, 500).await?;
        let Some(last) = batch.last() else {
            return Ok((rows, None));
        };
        cursor = Some(last.seq);
        for e in &batch {
            scanned += 1;
            // Stored times are fixed-width UTC: text order is time order.
            if since.is_some_and(|s| e.time.as_str() < s) {
                return Ok((rows, None));
            }
            if until.is_some_and(|u| e.time.as_str() > u) || !keep(e) {
                continue;
            }
            rows.push(event_row(e));
            if rows.len() == AUDIT_PAGE {
                return Ok((rows, Some(e.seq)));
            }
        }
        if scanned >= AUDIT_SCAN {
            return Ok((rows, cursor));
        }
    }
}

/// A time bound from the form: RFC 3339, or a date (`2026-12-07`, the start or end of the day
/// in UTC), in the stored fixed-width form.
fn time_bound(text: &str, end_of_day: bool) -> Result<Option<String>, String> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let parsed = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
        .or_else(|_| {
            let date =
                time::Date::parse(t, time::macros::format_description!("[year]-[month]-[day]"))?;
            let at = if end_of_day {
                time::Time::from_hms_nano(23, 59, 59, 999_999_999).unwrap_or(time::Time::MIDNIGHT)
            } else {
                time::Time::MIDNIGHT
            };
            Ok::<_, time::error::Parse>(date.with_time(at).assume_utc())
        })
        .map_err(|_| format!("{t:?} is not a time: use 2026-12-07 or 2026-12-07T10:00:00Z"))?;
    Ok(Some(store::timefmt::format(parsed)))
}

async fn audit(State(s): State<AdminState>, Query(q): Query<AuditQuery>) -> Response {
    let mut problem = None;
    let since = time_bound(&q.since, false).unwrap_or_else(|e| {
        problem = Some(e);
        None
    });
    let until = time_bound(&q.until, true).unwrap_or_else(|e| {
        problem = Some(e);
        None
    });
    // Both given: the events about that user in that group.
    let mut subjects: Vec<Subject> = Vec::new();
    if !q.user.trim().is_empty() {
        match find(&*s.store, ResourceKind::User, q.user.trim()).await {
            Some(id) => subjects.push(Subject::user(&*s.store, &id).await),
            None => problem = Some(format!("No user has SCIM id or userName {:?}.", q.user)),
        }
    }
    if !q.group.trim().is_empty() {
        match find(&*s.store, ResourceKind::Group, q.group.trim()).await {
            Some(id) => subjects.push(Subject::group(&*s.store, &id).await),
            None => {
                problem = Some(format!(
                    "No group has SCIM id or displayName {:?}.",
                    q.group
                ))
            }
        }
    }
    let (rows, next) = if problem.is_some() {
        (Vec::new(), None)
    } else {
        let keep = |e: &AuditEvent| subjects.iter().all(|s| s.matches(e));
        match recent_matching(
            &*s.store,
            q.before,
            since.as_deref(),
            until.as_deref(),
            keep,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => return failed("audit", e),
        }
    };
    let older = next.map(|seq| older_link(&q, seq));
    render(&AuditPage {
        nav: "audit",
        q,
        problem,
        rows,
        older,
    })
}

/// The query of the "older events" link: the same filters, continuing before `seq`.
fn older_link(q: &AuditQuery, seq: i64) -> String {
    let seq = seq.to_string();
    let query = serde_urlencoded::to_string([
        ("user", q.user.as_str()),
        ("group", q.group.as_str()),
        ("since", q.since.as_str()),
        ("until", q.until.as_str()),
        ("before", seq.as_str()),
    ])
    .unwrap_or_default();
    format!("?{query}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_lines_are_classed_by_their_sign() {
        let got: Vec<&str> = plan_lines("user ann\n  + role X\n  - group G\n  ~ name\nPlan: 3")
            .iter()
            .map(|l| l.class)
            .collect();
        assert_eq!(got, ["", "add", "remove", "change", ""]);
    }

    #[test]
    fn time_bounds_accept_dates_and_rfc3339_and_explain_the_rest() {
        assert_eq!(time_bound("", false), Ok(None));
        let day_start = time_bound("2026-12-07", false).unwrap().unwrap();
        let day_end = time_bound("2026-12-07", true).unwrap().unwrap();
        assert!(day_start.starts_with("2026-12-07T00:00:00"), "{day_start}");
        assert!(day_end.starts_with("2026-12-07T23:59:59"), "{day_end}");
        assert!(day_start < day_end);
        let exact = time_bound("2026-12-07T10:00:00+01:00", false)
            .unwrap()
            .unwrap();
        assert!(exact.starts_with("2026-12-07T09:00:00"), "{exact}");
        assert!(
            time_bound("yesterday", false)
                .unwrap_err()
                .contains("yesterday")
        );
    }

    #[test]
    fn the_older_link_keeps_every_filter() {
        let q = AuditQuery {
            user: "a b&c=d/é".into(),
            group: "Ops & Dev".into(),
            since: "2026-12-01".into(),
            until: String::new(),
            before: None,
        };
        let link = older_link(&q, 42);
        let back: AuditQuery =
            serde_urlencoded::from_str(link.strip_prefix('?').expect("query")).expect("parses");
        assert_eq!(
            (back.user, back.group, back.since, back.until, back.before),
            (q.user, q.group, q.since, q.until, Some(42))
        );
    }
}
