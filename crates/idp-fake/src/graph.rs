//! A Microsoft Graph fake: the Microsoft identity platform token endpoint (client credentials)
//! and the Graph v1.0 endpoints pull mode reads (`users/delta`, `groups/delta`, `users/{id}`,
//! `groups/{id}`, `groups/{id}/members`), over real HTTP on 127.0.0.1.
//!
//! The directory is in memory; every mutation is appended to a change log with a sequence
//! number, and delta tokens are positions in that log (opaque base64url JSON), so an
//! incremental delta answers exactly what changed since the token was issued.
//!
//! Shapes served, with the Microsoft Learn page each follows:
//! - token: <https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-client-creds-grant-flow>
//!   (`POST /{tenant}/oauth2/v2.0/token`, form body, `{token_type, expires_in, access_token}`,
//!   errors `{error, error_description, error_codes, ...}` with AADSTS codes);
//! - users delta: <https://learn.microsoft.com/en-us/graph/delta-query-users> and
//!   <https://learn.microsoft.com/en-us/graph/api/user-delta> (`@odata.nextLink` with
//!   `$skiptoken`, last page `@odata.deltaLink` with `$deltatoken`; an updated user carries "at
//!   least the properties that have been updated"; `@removed` `{"reason":"changed"}` when
//!   deleted (restorable), `"deleted"` when permanently deleted);
//! - groups delta: <https://learn.microsoft.com/en-us/graph/delta-query-groups> and
//!   <https://learn.microsoft.com/en-us/graph/api/group-delta> (`$filter=id eq '…' or …` with
//!   at most 50 ids, `members@delta` entries typed `#microsoft.graph.user` / `group`, removed
//!   members annotated `@removed`; a group's members may be split over several entries and
//!   pages);
//! - expired delta links: <https://learn.microsoft.com/en-us/graph/delta-query-overview#synchronization-reset>
//!   (410 Gone, `syncStateNotFound`) and the Microsoft 365 Developer blog post "Duration of
//!   change tracking tokens for identity and education resources" (a 7-day-old link answers 400
//!   BadRequest with `syncStateNotFound`, "The sync state generation is not found...");
//! - throttling: <https://learn.microsoft.com/en-us/graph/throttling> (429 with `Retry-After`
//!   in seconds, error code `TooManyRequests`);
//! - errors: <https://learn.microsoft.com/en-us/graph/errors> (`{"error": {"code", "message",
//!   "innerError"}}`; 401 `InvalidAuthenticationToken`, 403 `Authorization_RequestDenied`, 404
//!   `Request_ResourceNotFound`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Form, Path, Query, State as AxState};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// The tenant id the fake answers for.
pub const TENANT_ID: &str = "4f8e2f0a-6b1d-4c2e-9a51-0c6d7e8f9a01";
/// The application (client) id the fake knows.
pub const CLIENT_ID: &str = "a1b2c3d4-0000-4000-8000-0123456789ab";
/// The client secret the fake accepts.
pub const CLIENT_SECRET: &str = "fake~graph~secret~Zq8Q~not-a-real-one";

const USER_ROLES: [&str; 4] = [
    "User.Read.All",
    "User.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];
const GROUP_ROLES: [&str; 6] = [
    "GroupMember.Read.All",
    "GroupMember.ReadWrite.All",
    "Group.Read.All",
    "Group.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];

/// A user of the fake directory (the Graph properties pull mode selects).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeUser {
    /// Object id.
    pub id: String,
    /// `userPrincipalName`.
    pub upn: String,
    /// `mail`.
    pub mail: Option<String>,
    /// `givenName`.
    pub given: Option<String>,
    /// `surname`.
    pub surname: Option<String>,
    /// `displayName`.
    pub display: Option<String>,
    /// `accountEnabled`.
    pub enabled: bool,
}

impl FakeUser {
    /// A user with every property derived from `id` and `name` (`name@contoso.example`).
    pub fn new(id: &str, name: &str) -> Self {
        FakeUser {
            id: id.to_string(),
            upn: format!("{name}@contoso.example"),
            mail: Some(format!("{name}@contoso.example")),
            given: Some(name.to_string()),
            surname: Some("Example".to_string()),
            display: Some(format!("{name} Example")),
            enabled: true,
        }
    }

    fn props(&self) -> [(&'static str, Value); 6] {
        [
            ("userPrincipalName", json!(self.upn)),
            ("mail", json!(self.mail)),
            ("givenName", json!(self.given)),
            ("surname", json!(self.surname)),
            ("displayName", json!(self.display)),
            ("accountEnabled", json!(self.enabled)),
        ]
    }

    /// The Graph JSON of this user restricted to `select` (all properties when empty).
    fn to_json(&self, select: &[String], only: Option<&BTreeSet<&'static str>>) -> Value {
        let mut m = Map::new();
        m.insert("id".into(), json!(self.id));
        for (k, v) in self.props() {
            let selected = select.is_empty() || select.iter().any(|s| s == k);
            if selected && only.is_none_or(|o| o.contains(k)) {
                m.insert(k.into(), v);
            }
        }
        Value::Object(m)
    }
}

#[derive(Debug)]
struct FakeGroup {
    name: String,
    members: BTreeSet<String>,
}

#[derive(Debug, Clone)]
enum Event {
    /// A user created (`fields` None) or changed (the Graph names of the changed properties).
    User {
        id: String,
        fields: Option<BTreeSet<&'static str>>,
    },
    UserRemoved {
        id: String,
        hard: bool,
    },
    /// A group created or renamed.
    Group {
        id: String,
    },
    GroupRemoved {
        id: String,
    },
    Member {
        group: String,
        member: String,
        added: bool,
    },
}

#[derive(Debug)]
struct State {
    base: String,
    users: BTreeMap<String, FakeUser>,
    groups: BTreeMap<String, FakeGroup>,
    log: Vec<Event>,
    /// Delta tokens of an older epoch are refused.
    epoch: u64,
    expired_status: StatusCode,
    page_size: usize,
    roles: Vec<String>,
    token_lifetime: u64,
    tokens: HashMap<String, (Instant, Vec<String>)>,
    throttle: (u32, u64),
    down: bool,
    thumbprint: Option<String>,
    requests: u64,
    per_route: HashMap<&'static str, u64>,
}

/// The position a `$skiptoken` or `$deltatoken` encodes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Position {
    /// Epoch of the log (bumped by `expire_delta_links`).
    e: u64,
    /// Log position the changes are counted from (`None`: a full enumeration).
    since: Option<usize>,
    /// Log position the round ends at (the delta link's `since`).
    upto: usize,
    /// Full users: the last id served. Full groups: unused.
    after: Option<String>,
    /// Incremental: entries already served. Full groups: index of the group.
    off: usize,
    /// Full groups: members of the current group already served.
    moff: usize,
    select: Vec<String>,
    /// Groups: the `$filter` ids (`None`: every group).
    ids: Option<Vec<String>>,
}

fn encode(p: &Position) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(p).expect("a position serializes"))
}

fn decode(s: &str) -> Option<Position> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(s).ok()?).ok()
}

/// A running Microsoft Graph fake. Stops when dropped.
#[derive(Debug)]
pub struct GraphFake {
    url: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for GraphFake {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GraphFake {
    /// Starts the fake on 127.0.0.1 (a free port), serving both the token endpoint and Graph.
    pub async fn start() -> GraphFake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let url = format!("http://{}", listener.local_addr().expect("local addr"));
        let state = Arc::new(Mutex::new(State {
            base: url.clone(),
            users: BTreeMap::new(),
            groups: BTreeMap::new(),
            log: Vec::new(),
            epoch: 0,
            expired_status: StatusCode::GONE,
            page_size: 100,
            roles: vec!["User.Read.All".into(), "GroupMember.Read.All".into()],
            token_lifetime: 3599,
            tokens: HashMap::new(),
            throttle: (0, 0),
            down: false,
            thumbprint: None,
            requests: 0,
            per_route: HashMap::new(),
        }));
        let app = Router::new()
            .route("/{tenant}/oauth2/v2.0/token", post(token))
            .route("/v1.0/users/delta", get(users_delta))
            .route("/v1.0/groups/delta", get(groups_delta))
            .route("/v1.0/users/{id}", get(user_by_id))
            .route("/v1.0/groups/{id}", get(group_by_id))
            .route("/v1.0/groups/{id}/members", get(group_members))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        GraphFake { url, state, task }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Base URL (`http://127.0.0.1:port`), to use as both the Graph URL and the authority URL.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The tenant id the token endpoint accepts ([`TENANT_ID`]).
    pub fn tenant_id(&self) -> &'static str {
        TENANT_ID
    }

    /// The application (client) id the token endpoint accepts ([`CLIENT_ID`]).
    pub fn client_id(&self) -> &'static str {
        CLIENT_ID
    }

    /// The client secret the token endpoint accepts ([`CLIENT_SECRET`]).
    pub fn client_secret(&self) -> &'static str {
        CLIENT_SECRET
    }

    /// The application permissions (`roles` claim) of tokens issued from now on. Default:
    /// `User.Read.All`, `GroupMember.Read.All`. Graph answers 403 to requests whose token lacks
    /// the permission they need.
    pub fn set_roles(&self, roles: Vec<&str>) {
        self.st().roles = roles.into_iter().map(String::from).collect();
    }

    /// `expires_in` of tokens issued from now on (default 3599 s); the fake refuses expired
    /// tokens with 401.
    pub fn set_token_lifetime(&self, secs: u64) {
        self.st().token_lifetime = secs;
    }

    /// The `x5t` (base64url SHA-1 thumbprint) of the certificate registered on the app: client
    /// assertions whose header names another are refused (AADSTS700027). Unset, any is taken.
    pub fn set_certificate_thumbprint(&self, x5t: &str) {
        self.st().thumbprint = Some(x5t.to_string());
    }

    /// Revokes every issued token: Graph answers 401 `InvalidAuthenticationToken` to them.
    pub fn revoke_tokens(&self) {
        self.st().tokens.clear();
    }

    /// Entries per page of delta and member listings (default 100); smaller forces paging.
    pub fn set_page_size(&self, n: usize) {
        self.st().page_size = n.max(1);
    }

    /// Adds a user (logged as created).
    pub fn add_user(&self, u: FakeUser) {
        let mut st = self.st();
        st.log.push(Event::User {
            id: u.id.clone(),
            fields: None,
        });
        st.users.insert(u.id.clone(), u);
    }

    /// Changes a user; the change log records only the properties that changed, so the next
    /// incremental delta carries only those (a partial entry, as Graph may send).
    pub fn update_user(&self, id: &str, f: impl FnOnce(&mut FakeUser)) {
        let mut st = self.st();
        let Some(u) = st.users.get_mut(id) else {
            panic!("update_user: no user {id}");
        };
        let before = u.props();
        f(u);
        let fields: BTreeSet<&'static str> = before
            .into_iter()
            .zip(u.props())
            .filter(|((_, a), (_, b))| a != b)
            .map(|((k, _), _)| k)
            .collect();
        if !fields.is_empty() {
            st.log.push(Event::User {
                id: id.to_string(),
                fields: Some(fields),
            });
        }
    }

    /// Deletes a user: `hard` = permanently (delta `@removed: {"reason": "deleted"}`), else
    /// soft (restorable, `"changed"`). Its memberships go with it, without a group change in
    /// the log (Graph does not report them in the groups' delta either).
    pub fn delete_user(&self, id: &str, hard: bool) {
        let mut st = self.st();
        st.users.remove(id);
        for g in st.groups.values_mut() {
            g.members.remove(id);
        }
        st.log.push(Event::UserRemoved {
            id: id.to_string(),
            hard,
        });
    }

    /// Adds a group.
    pub fn add_group(&self, id: &str, name: &str) {
        let mut st = self.st();
        st.groups.insert(
            id.to_string(),
            FakeGroup {
                name: name.to_string(),
                members: BTreeSet::new(),
            },
        );
        st.log.push(Event::Group { id: id.to_string() });
    }

    /// Renames a group.
    pub fn rename_group(&self, id: &str, name: &str) {
        let mut st = self.st();
        st.groups
            .get_mut(id)
            .unwrap_or_else(|| panic!("rename_group: no group {id}"))
            .name = name.to_string();
        st.log.push(Event::Group { id: id.to_string() });
    }

    /// Deletes a group permanently (delta `@removed: {"reason": "deleted"}`).
    pub fn delete_group(&self, id: &str) {
        let mut st = self.st();
        st.groups.remove(id);
        st.log.push(Event::GroupRemoved { id: id.to_string() });
    }

    /// Adds `member` (a user id, or a group id: a nested group) to `group`.
    pub fn add_member(&self, group: &str, member: &str) {
        self.member(group, member, true);
    }

    /// Removes `member` from `group`.
    pub fn remove_member(&self, group: &str, member: &str) {
        self.member(group, member, false);
    }

    fn member(&self, group: &str, member: &str, added: bool) {
        let mut st = self.st();
        let g = st
            .groups
            .get_mut(group)
            .unwrap_or_else(|| panic!("no group {group}"));
        let changed = if added {
            g.members.insert(member.to_string())
        } else {
            g.members.remove(member)
        };
        if changed {
            st.log.push(Event::Member {
                group: group.to_string(),
                member: member.to_string(),
                added,
            });
        }
    }

    /// Every delta link (and next link) issued so far is refused from now on with 410 Gone and
    /// `syncStateNotFound`, as an expired (7-day-old) link is.
    pub fn expire_delta_links(&self) {
        let mut st = self.st();
        st.epoch += 1;
        st.expired_status = StatusCode::GONE;
    }

    /// As [`GraphFake::expire_delta_links`], but refused with 400 BadRequest and
    /// `syncStateNotFound` (the answer the Microsoft 365 Developer blog documents for
    /// identity resources).
    pub fn expire_delta_links_as_bad_request(&self) {
        let mut st = self.st();
        st.epoch += 1;
        st.expired_status = StatusCode::BAD_REQUEST;
    }

    /// The next `n` Graph requests (not token requests) answer 429 with `Retry-After:
    /// retry_after_secs`.
    pub fn throttle(&self, n: u32, retry_after_secs: u64) {
        self.st().throttle = (n, retry_after_secs);
    }

    /// While down, every request (token and Graph) answers 500 `generalException` (not 503,
    /// which clients wait on as throttling).
    pub fn set_down(&self, down: bool) {
        self.st().down = down;
    }

    /// Requests served so far (token and Graph, including refused ones).
    pub fn requests(&self) -> u64 {
        self.st().requests
    }

    /// Requests served so far to one route: `token`, `users/delta`, `groups/delta`,
    /// `users/{id}`, `groups/{id}` or `groups/{id}/members`.
    pub fn requests_to(&self, route: &str) -> u64 {
        self.st().per_route.get(route).copied().unwrap_or(0)
    }
}

type Shared = AxState<Arc<Mutex<State>>>;

fn graph_error(status: StatusCode, code: &str, message: &str) -> Response {
    // https://learn.microsoft.com/en-us/graph/errors
    let date = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let body = json!({"error": {"code": code, "message": message, "innerError": {
        "date": date,
        "request-id": uuid::Uuid::new_v4().to_string(),
        "client-request-id": uuid::Uuid::new_v4().to_string(),
    }}});
    (status, axum::Json(body)).into_response()
}

/// Counts the request, then applies the faults, the token and the permission checks. Returns
/// the state lock for the handler.
fn gate<'a>(
    st: &'a Mutex<State>,
    route: &'static str,
    headers: &HeaderMap,
    roles_needed: &[&str],
) -> Result<MutexGuard<'a, State>, Box<Response>> {
    let mut st = st.lock().unwrap_or_else(|p| p.into_inner());
    st.requests += 1;
    *st.per_route.entry(route).or_default() += 1;
    if st.down {
        return Err(Box::new(graph_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "generalException",
            "The service is down (fake).",
        )));
    }
    if route == "token" {
        return Ok(st);
    }
    if st.throttle.0 > 0 {
        st.throttle.0 -= 1;
        let mut resp = graph_error(
            StatusCode::TOO_MANY_REQUESTS,
            "TooManyRequests",
            "Too many requests.",
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, st.throttle.1.into());
        return Err(Box::new(resp));
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let roles = match st.tokens.get(bearer) {
        None if bearer.is_empty() => {
            return Err(Box::new(graph_error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                "Access token is empty.",
            )));
        }
        None => {
            return Err(Box::new(graph_error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                "Access token validation failure. Invalid audience.",
            )));
        }
        Some((until, _)) if *until <= Instant::now() => {
            return Err(Box::new(graph_error(
                StatusCode::UNAUTHORIZED,
                "InvalidAuthenticationToken",
                "Lifetime validation failed, the token is expired.",
            )));
        }
        Some((_, roles)) => roles,
    };
    if !roles_needed.iter().any(|r| roles.iter().any(|h| h == r)) {
        return Err(Box::new(graph_error(
            StatusCode::FORBIDDEN,
            "Authorization_RequestDenied",
            "Insufficient privileges to complete the operation.",
        )));
    }
    Ok(st)
}

fn token_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response {
    // https://learn.microsoft.com/en-us/entra/identity-platform/v2-oauth2-client-creds-grant-flow#error-response
    let now = time::OffsetDateTime::now_utc();
    let stamp = now
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let trace = uuid::Uuid::new_v4().to_string();
    let corr = uuid::Uuid::new_v4().to_string();
    let body = json!({
        "error": error,
        "error_description": format!("AADSTS{code}: {description} Trace ID: {trace} Correlation ID: {corr} Timestamp: {stamp}"),
        "error_codes": [code],
        "timestamp": stamp,
        "trace_id": trace,
        "correlation_id": corr,
        "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
    });
    (status, axum::Json(body)).into_response()
}

async fn token(
    AxState(state): Shared,
    Path(tenant): Path<String>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut st = match gate(&state, "token", &headers, &[]) {
        Ok(st) => st,
        Err(r) => return *r,
    };
    let f = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if tenant != TENANT_ID {
        return token_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            90002,
            &format!(
                "Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."
            ),
        );
    }
    if f("grant_type") != "client_credentials" {
        return token_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            70003,
            "The app requested an unsupported grant type.",
        );
    }
    if f("client_id") != CLIENT_ID {
        return token_error(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            700016,
            &format!(
                "Application with identifier '{}' was not found in the directory '{tenant}'.",
                f("client_id")
            ),
        );
    }
    let scope_ok = f("scope") == format!("{}/.default", st.base);
    if !scope_ok {
        return token_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            1002012,
            "The provided value for scope is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI).",
        );
    }
    if f("client_assertion_type") == JWT_BEARER {
        let audience = format!("{}/{tenant}/oauth2/v2.0/token", st.base);
        if let Err(why) =
            check_assertion(f("client_assertion"), &audience, st.thumbprint.as_deref())
        {
            return token_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700027,
                &format!(
                    "The certificate with identifier used to sign the client assertion is not registered on application, or the assertion is invalid: {why}."
                ),
            );
        }
    } else if f("client_secret") != CLIENT_SECRET {
        return token_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            7000215,
            &format!(
                "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{CLIENT_ID}'."
            ),
        );
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let lifetime = st.token_lifetime;
    let claims = json!({
        "aud": st.base,
        "iss": format!("https://sts.windows.net/{TENANT_ID}/"),
        "iat": now,
        "nbf": now,
        "exp": now + lifetime as i64,
        "app_displayname": "teamcity-scim (fake)",
        "appid": CLIENT_ID,
        "idtyp": "app",
        "roles": st.roles,
        "tid": TENANT_ID,
        "jti": uuid::Uuid::new_v4().to_string(),
    });
    let header = URL_SAFE_NO_PAD.encode(br#"{"typ":"JWT","alg":"RS256"}"#);
    let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
    let access_token = format!("{header}.{payload}.ZmFrZS1zaWduYXR1cmU");
    let roles = st.roles.clone();
    st.tokens.insert(
        access_token.clone(),
        (Instant::now() + Duration::from_secs(lifetime), roles),
    );
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": lifetime,
        "ext_expires_in": lifetime,
        "access_token": access_token,
    }))
    .into_response()
}

const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Checks a client assertion's header and claims as Microsoft Entra does
/// (<https://learn.microsoft.com/en-us/entra/identity-platform/certificate-credentials>): `alg`
/// RS256 (or PS256), `x5t` (or `x5t#S256`) naming the registered certificate, `aud` the token
/// endpoint, `iss` = `sub` = the client id, `exp` in the future, a `jti`. The signature is NOT
/// verified (the fake has no RSA).
fn check_assertion(jwt: &str, audience: &str, thumbprint: Option<&str>) -> Result<(), String> {
    let part = |i: usize| -> Result<Value, String> {
        let seg = jwt.split('.').nth(i).ok_or("not a JWT")?;
        let bytes = URL_SAFE_NO_PAD
            .decode(seg)
            .map_err(|e| format!("segment {i}: {e}"))?;
        serde_json::from_slice(&bytes).map_err(|e| format!("segment {i}: {e}"))
    };
    if jwt.split('.').count() != 3 {
        return Err("not a signed JWT".into());
    }
    let (h, c) = (part(0)?, part(1)?);
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(String::from);
    if !matches!(s(&h, "alg").as_deref(), Some("RS256" | "PS256")) {
        return Err("alg is not RS256".into());
    }
    let x5t = s(&h, "x5t").or_else(|| s(&h, "x5t#S256")).ok_or("no x5t")?;
    if thumbprint.is_some_and(|t| t != x5t) {
        return Err(format!("x5t {x5t} is not the registered certificate"));
    }
    if s(&c, "aud").as_deref() != Some(audience) {
        return Err(format!("aud is not {audience}"));
    }
    if s(&c, "iss").as_deref() != Some(CLIENT_ID) || s(&c, "sub").as_deref() != Some(CLIENT_ID) {
        return Err("iss and sub must be the client id".into());
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if c.get("exp")
        .and_then(Value::as_i64)
        .is_none_or(|exp| exp <= now)
    {
        return Err("expired or no exp".into());
    }
    if s(&c, "jti").is_none() {
        return Err("no jti".into());
    }
    Ok(())
}

fn select_of(q: &HashMap<String, String>) -> Vec<String> {
    q.get("$select")
        .map(|s| {
            s.split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// `id eq 'a' or id eq 'b'` → the ids; `None` when the filter is not of that form.
fn filter_ids(filter: &str) -> Option<Vec<String>> {
    filter
        .split(" or ")
        .map(|c| {
            c.trim()
                .strip_prefix("id eq '")?
                .strip_suffix('\'')
                .map(String::from)
        })
        .collect()
}

enum Start {
    Pos(Position),
    Refused(Response),
}

/// Reads `$skiptoken` / `$deltatoken`, or starts a full enumeration.
fn start(st: &State, q: &HashMap<String, String>, ids: Option<Vec<String>>) -> Start {
    let refused = |st: &State| {
        // 410 Gone per https://learn.microsoft.com/en-us/graph/delta-query-overview#synchronization-reset;
        // 400 per the Microsoft 365 Developer blog on delta link lifetime.
        Start::Refused(graph_error(
            st.expired_status,
            "syncStateNotFound",
            "The sync state generation is not found. The delta token is expired and data must be synchronized again.",
        ))
    };
    if let Some(t) = q.get("$skiptoken") {
        return match decode(t) {
            Some(p) if p.e == st.epoch => Start::Pos(p),
            Some(_) => refused(st),
            None => Start::Refused(graph_error(
                StatusCode::BAD_REQUEST,
                "syncStateInvalid",
                "The sync state is invalid.",
            )),
        };
    }
    if let Some(t) = q.get("$deltatoken") {
        return match decode(t) {
            Some(p) if p.e == st.epoch => Start::Pos(Position {
                e: p.e,
                since: Some(p.upto),
                upto: st.log.len(),
                after: None,
                off: 0,
                moff: 0,
                select: p.select,
                ids: p.ids,
            }),
            Some(_) => refused(st),
            None => Start::Refused(graph_error(
                StatusCode::BAD_REQUEST,
                "syncStateInvalid",
                "The sync state is invalid.",
            )),
        };
    }
    Start::Pos(Position {
        e: st.epoch,
        since: None,
        upto: st.log.len(),
        after: None,
        off: 0,
        moff: 0,
        select: select_of(q),
        ids,
    })
}

/// The page's JSON: `value` and either `@odata.nextLink` (more) or `@odata.deltaLink` (done).
fn page(
    st: &State,
    what: &str,
    value: Vec<Value>,
    next: Option<Position>,
    p: &Position,
) -> Response {
    let mut body = Map::new();
    body.insert(
        "@odata.context".into(),
        json!(format!("{}/v1.0/$metadata#{what}", st.base)),
    );
    match next {
        Some(n) => body.insert(
            "@odata.nextLink".into(),
            json!(format!(
                "{}/v1.0/{what}/delta?$skiptoken={}",
                st.base,
                encode(&n)
            )),
        ),
        None => {
            let d = Position {
                e: p.e,
                since: None,
                upto: p.upto,
                after: None,
                off: 0,
                moff: 0,
                select: p.select.clone(),
                ids: p.ids.clone(),
            };
            body.insert(
                "@odata.deltaLink".into(),
                json!(format!(
                    "{}/v1.0/{what}/delta?$deltatoken={}",
                    st.base,
                    encode(&d)
                )),
            )
        }
    };
    body.insert("value".into(), Value::Array(value));
    axum::Json(Value::Object(body)).into_response()
}

fn removed(id: &str, reason: &str) -> Value {
    json!({"id": id, "@removed": {"reason": reason}})
}

async fn users_delta(
    AxState(state): Shared,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let st = match gate(&state, "users/delta", &headers, &USER_ROLES) {
        Ok(st) => st,
        Err(r) => return *r,
    };
    let mut p = match start(&st, &q, None) {
        Start::Pos(p) => p,
        Start::Refused(r) => return r,
    };
    let n = st.page_size;
    let Some(since) = p.since else {
        // Full enumeration: the users that exist, by id.
        let from = match &p.after {
            Some(a) => std::ops::Bound::Excluded(a.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let mut value = Vec::with_capacity(n);
        let mut last = None;
        let mut more = false;
        for (id, u) in st.users.range((from, std::ops::Bound::Unbounded)) {
            if value.len() == n {
                more = true;
                break;
            }
            value.push(u.to_json(&p.select, None));
            last = Some(id.clone());
        }
        let next = more.then(|| Position {
            after: last,
            ..p.clone()
        });
        return page(&st, "users", value, next, &p);
    };
    // Incremental: what the log says changed in since..upto, one entry per user.
    enum Acc {
        Changed(Option<BTreeSet<&'static str>>),
        Removed(bool),
    }
    let mut acc: BTreeMap<&str, Acc> = BTreeMap::new();
    for ev in &st.log[since.min(p.upto)..p.upto] {
        match ev {
            Event::User { id, fields } => {
                let e = acc.entry(id).or_insert(Acc::Changed(Some(BTreeSet::new())));
                *e = match (std::mem::replace(e, Acc::Removed(false)), fields) {
                    (Acc::Changed(Some(mut have)), Some(f)) => {
                        have.extend(f.iter().copied());
                        Acc::Changed(Some(have))
                    }
                    _ => Acc::Changed(None),
                };
            }
            Event::UserRemoved { id, hard } => {
                acc.insert(id, Acc::Removed(*hard));
            }
            _ => {}
        }
    }
    let entries: Vec<Value> = acc
        .into_iter()
        .filter_map(|(id, a)| match a {
            Acc::Removed(hard) => Some(removed(id, if hard { "deleted" } else { "changed" })),
            Acc::Changed(fields) => st
                .users
                .get(id)
                .map(|u| u.to_json(&p.select, fields.as_ref())),
        })
        .collect();
    let value: Vec<Value> = entries.iter().skip(p.off).take(n).cloned().collect();
    let next = (p.off + value.len() < entries.len()).then(|| {
        p.off += value.len();
        p.clone()
    });
    page(&st, "users", value, next, &p)
}

fn member_json(st: &State, id: &str) -> Value {
    let kind = if st.groups.contains_key(id) {
        "#microsoft.graph.group"
    } else {
        "#microsoft.graph.user"
    };
    json!({"@odata.type": kind, "id": id})
}

async fn groups_delta(
    AxState(state): Shared,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let st = match gate(&state, "groups/delta", &headers, &GROUP_ROLES) {
        Ok(st) => st,
        Err(r) => return *r,
    };
    let ids = match q.get("$filter") {
        None => None,
        Some(f) => match filter_ids(f) {
            Some(ids) if ids.len() <= 50 => Some(ids),
            Some(_) => {
                return graph_error(
                    StatusCode::BAD_REQUEST,
                    "Request_UnsupportedQuery",
                    "Too many ids in the filter: at most 50 are supported.",
                );
            }
            None => {
                return graph_error(
                    StatusCode::BAD_REQUEST,
                    "Request_UnsupportedQuery",
                    "Unsupported query.",
                );
            }
        },
    };
    let mut p = match start(&st, &q, ids) {
        Start::Pos(p) => p,
        Start::Refused(r) => return r,
    };
    let n = st.page_size;
    let name_selected = p.select.is_empty() || p.select.iter().any(|s| s == "displayName");
    let members_selected = p.select.iter().any(|s| s == "members");
    let in_scope = |id: &str| p.ids.as_ref().is_none_or(|ids| ids.iter().any(|i| i == id));
    let Some(since) = p.since else {
        // Full enumeration: each group with its members, split into entries of at most a page
        // of members (a group can appear in several entries and pages, as Graph documents).
        let list: Vec<&String> = match &p.ids {
            Some(ids) => {
                let set: BTreeSet<&String> = ids.iter().collect();
                set.into_iter()
                    .filter(|i| st.groups.contains_key(*i))
                    .collect()
            }
            None => st.groups.keys().collect(),
        };
        let mut value = Vec::new();
        let (mut g, mut m) = (p.off, p.moff);
        while value.len() < n && g < list.len() {
            let grp = &st.groups[list[g]];
            let mut e = Map::new();
            e.insert("id".into(), json!(list[g]));
            if name_selected {
                e.insert("displayName".into(), json!(grp.name));
            }
            if members_selected {
                let chunk: Vec<Value> = grp
                    .members
                    .iter()
                    .skip(m)
                    .take(n)
                    .map(|id| member_json(&st, id))
                    .collect();
                m += chunk.len();
                e.insert("members@delta".into(), Value::Array(chunk));
            }
            if !members_selected || m >= grp.members.len() {
                g += 1;
                m = 0;
            }
            value.push(Value::Object(e));
        }
        let next = (g < list.len()).then(|| Position {
            off: g,
            moff: m,
            ..p.clone()
        });
        return page(&st, "groups", value, next, &p);
    };
    // Incremental.
    #[derive(Default)]
    struct Acc<'a> {
        renamed: bool,
        removed: bool,
        members: BTreeMap<&'a str, bool>,
    }
    let mut acc: BTreeMap<&str, Acc> = BTreeMap::new();
    for ev in &st.log[since.min(p.upto)..p.upto] {
        match ev {
            Event::Group { id } if in_scope(id) => {
                let a = acc.entry(id).or_default();
                a.renamed = true;
                a.removed = false;
            }
            Event::GroupRemoved { id } if in_scope(id) => acc.entry(id).or_default().removed = true,
            Event::Member {
                group,
                member,
                added,
            } if in_scope(group) => {
                acc.entry(group).or_default().members.insert(member, *added);
            }
            _ => {}
        }
    }
    let entries: Vec<Value> = acc
        .into_iter()
        .filter_map(|(id, a)| {
            if a.removed {
                return Some(removed(id, "deleted"));
            }
            let grp = st.groups.get(id)?;
            let mut e = Map::new();
            e.insert("id".into(), json!(id));
            if a.renamed && name_selected {
                e.insert("displayName".into(), json!(grp.name));
            }
            if members_selected && !a.members.is_empty() {
                let list = a
                    .members
                    .iter()
                    .map(|(m, added)| {
                        let mut v = member_json(&st, m);
                        if !added {
                            v["@removed"] = json!({"reason": "deleted"});
                        }
                        v
                    })
                    .collect();
                e.insert("members@delta".into(), Value::Array(list));
            }
            (e.len() > 1).then_some(Value::Object(e))
        })
        .collect();
    let value: Vec<Value> = entries.iter().skip(p.off).take(n).cloned().collect();
    let next = (p.off + value.len() < entries.len()).then(|| {
        p.off += value.len();
        p.clone()
    });
    page(&st, "groups", value, next, &p)
}

fn not_found(id: &str) -> Response {
    graph_error(
        StatusCode::NOT_FOUND,
        "Request_ResourceNotFound",
        &format!(
            "Resource '{id}' does not exist or one of its queried reference-property objects are not present."
        ),
    )
}

async fn user_by_id(
    AxState(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // https://learn.microsoft.com/en-us/graph/api/user-get
    let st = match gate(&state, "users/{id}", &headers, &USER_ROLES) {
        Ok(st) => st,
        Err(r) => return *r,
    };
    match st.users.get(&id) {
        None => not_found(&id),
        Some(u) => {
            let mut v = u.to_json(&select_of(&q), None);
            v["@odata.context"] = json!(format!("{}/v1.0/$metadata#users/$entity", st.base));
            axum::Json(v).into_response()
        }
    }
}

async fn group_by_id(
    AxState(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    // https://learn.microsoft.com/en-us/graph/api/group-get
    let st = match gate(&state, "groups/{id}", &headers, &GROUP_ROLES) {
        Ok(st) => st,
        Err(r) => return *r,
    };
    match st.groups.get(&id) {
        None => not_found(&id),
        Some(g) => axum::Json(json!({
            "@odata.context": format!("{}/v1.0/$metadata#groups(id,displayName)/$entity", st.base),
            "id": id,
            "displayName": g.name,
        }))
        .into_response(),
    }
}

async fn group_members(
    AxState(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    // https://learn.microsoft.com/en-us/graph/api/group-list-members (paged with
    // `@odata.nextLink`; each member typed with `@odata.type`).
    let st = match gate(&state, "groups/{id}/members", &headers, &GROUP_ROLES) {
        Ok(st) => st,
        Err(r) => return *r,
    };
    let Some(g) = st.groups.get(&id) else {
        return not_found(&id);
    };
    let off: usize = q
        .get("$skiptoken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let n = st.page_size;
    let value: Vec<Value> = g
        .members
        .iter()
        .skip(off)
        .take(n)
        .map(|m| member_json(&st, m))
        .collect();
    let mut body = json!({
        "@odata.context": format!("{}/v1.0/$metadata#directoryObjects(id)", st.base),
        "value": value,
    });
    if off + n < g.members.len() {
        body["@odata.nextLink"] = json!(format!(
            "{}/v1.0/groups/{id}/members?$select=id&$skiptoken={}",
            st.base,
            off + n
        ));
    }
    axum::Json(body).into_response()
}
