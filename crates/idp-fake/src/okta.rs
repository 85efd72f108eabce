//! An Okta API fake: the Users, Groups and OAuth token endpoints pull mode reads, in memory,
//! over real HTTP on `127.0.0.1:0`, with Okta's documented shapes, paging, rate-limit headers
//! and errors.
//!
//! Shapes and behaviour, each from Okta's developer documentation:
//! - User object (`id`, `status`, `created`, `statusChanged`, `lastUpdated`, `profile.login`,
//!   `profile.firstName`, `profile.lastName`, `profile.email`, `profile.displayName`):
//!   <https://developer.okta.com/docs/api/openapi/okta-management/management/tag/User/>.
//! - User statuses (STAGED, PROVISIONED, ACTIVE, RECOVERY, LOCKED_OUT, PASSWORD_EXPIRED,
//!   SUSPENDED, DEPROVISIONED): <https://developer.okta.com/docs/api/openapi/okta-management/management/tag/UserLifecycle/>.
//! - `GET /api/v1/users?search=lastUpdated gt "yyyy-MM-dd'T'HH:mm:ss.SSSZ"`: search covers every
//!   status including DEPROVISIONED, while the plain list leaves DEPROVISIONED out:
//!   <https://developer.okta.com/docs/api/openapi/okta-management/management/tag/User/#tag/User/operation/listUsers>.
//! - Group object (`id`, `created`, `lastUpdated`, `lastMembershipUpdated`, `type`,
//!   `profile.name`) and `GET /api/v1/groups/{id}/users` with `limit` / `after`:
//!   <https://developer.okta.com/docs/reference/api/groups/>.
//! - Pagination by `Link` headers, `rel="self"` and `rel="next"`, the `after` cursor opaque:
//!   <https://developer.okta.com/docs/api/#pagination>.
//! - Rate limits: every response carries `X-Rate-Limit-Limit`, `X-Rate-Limit-Remaining` and
//!   `X-Rate-Limit-Reset` (UTC epoch seconds), per endpoint family; over the limit a 429 with
//!   error `E0000047`: <https://developer.okta.com/docs/reference/rl-best-practices/>,
//!   <https://developer.okta.com/docs/reference/error-codes/#E0000047>.
//! - Errors (`errorCode`, `errorSummary`, `errorLink`, `errorId`, `errorCauses`): E0000011
//!   invalid token (401), E0000006 no permission (403), E0000007 not found (404), E0000031
//!   invalid search (400): <https://developer.okta.com/docs/reference/error-codes/>.
//! - `Authorization: SSWS {token}` API tokens and OAuth 2.0 service apps: `POST
//!   /oauth2/v1/token` with `grant_type=client_credentials`, `scope`, and a `private_key_jwt`
//!   client assertion (RS256, `iss` = `sub` = client id, `aud` = the token URL, `exp` at most an
//!   hour ahead, `jti` not reused), answering `{token_type, expires_in, access_token, scope}` or
//!   an OAuth error (`invalid_client`, `invalid_scope`):
//!   <https://developer.okta.com/docs/guides/implement-oauth-for-okta-serviceapp/main/>.
//!   Bearer tokens reach only the endpoints their scopes allow (`okta.users.read`,
//!   `okta.groups.read`); otherwise 403.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::SubjectPublicKeyInfoDer;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};

/// The API token the fake accepts as `Authorization: SSWS …`.
const API_TOKEN: &str = "00fake-okta-api-token-0123456789abcdef";
/// The admin the API token belongs to (`GET /api/v1/users/me`).
const TOKEN_OWNER: &str = "admin@fake-okta.test";
/// Lifetime of issued access tokens (Okta: one hour).
const TOKEN_LIFETIME_SECS: u64 = 3600;

/// A user of the fake directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeUser {
    /// Okta user id (`00u…`).
    pub id: String,
    /// `profile.login`.
    pub login: String,
    /// `profile.email`.
    pub email: String,
    /// `profile.firstName`.
    pub first: String,
    /// `profile.lastName`.
    pub last: String,
    /// `profile.displayName` (optional in Okta's default profile).
    pub display: Option<String>,
    /// `status`: `ACTIVE`, `DEPROVISIONED`, `SUSPENDED`, ...
    pub status: String,
}

impl FakeUser {
    /// An ACTIVE user `first.last@example.com`.
    pub fn new(id: &str, first: &str, last: &str) -> Self {
        let login = format!(
            "{}.{}@example.com",
            first.to_lowercase(),
            last.to_lowercase()
        );
        FakeUser {
            id: id.into(),
            email: login.clone(),
            login,
            first: first.into(),
            last: last.into(),
            display: None,
            status: "ACTIVE".into(),
        }
    }
}

#[derive(Debug)]
struct UserRec {
    user: FakeUser,
    created: u64,
    last_updated: u64,
    status_changed: u64,
}

#[derive(Debug)]
struct GroupRec {
    name: String,
    created: u64,
    last_updated: u64,
    last_membership_updated: u64,
    members: BTreeSet<String>,
}

#[derive(Debug)]
struct Client {
    /// PKCS#1 `RSAPublicKey` DER, as ring verifies it.
    public_key: Vec<u8>,
    scopes: Vec<String>,
}

#[derive(Debug)]
struct Issued {
    scopes: Vec<String>,
    expires_ms: u64,
}

#[derive(Debug)]
struct Inner {
    users: BTreeMap<String, UserRec>,
    groups: BTreeMap<String, GroupRec>,
    clock_ms: u64,
    page_size: usize,
    clients: HashMap<String, Client>,
    tokens: HashMap<String, Issued>,
    used_jtis: HashSet<String>,
    rate_limit: u64,
    rate_window_secs: u64,
    /// Per endpoint family: (window index, requests counted in it).
    windows: HashMap<String, (u64, u64)>,
    throttle_next: u64,
    down: bool,
    requests: u64,
    throttled: u64,
    token_requests: u64,
}

impl Inner {
    /// A timestamp strictly after every earlier one, so `lastUpdated gt` never misses a change.
    fn stamp(&mut self) -> u64 {
        self.clock_ms = now_ms().max(self.clock_ms + 1);
        self.clock_ms
    }
}

#[derive(Debug)]
struct Shared {
    base: String,
    state: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The running fake. Dropping it stops the server.
#[derive(Debug)]
pub struct OktaFake {
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for OktaFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl OktaFake {
    /// Starts the fake on `127.0.0.1:0` with an empty directory, pages of 200, and a rate
    /// limit too high to matter (10,000 requests a minute per endpoint family).
    pub async fn start() -> OktaFake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let shared = Arc::new(Shared {
            base: format!("http://{addr}"),
            state: Mutex::new(Inner {
                users: BTreeMap::new(),
                groups: BTreeMap::new(),
                clock_ms: 0,
                page_size: 200,
                clients: HashMap::new(),
                tokens: HashMap::new(),
                used_jtis: HashSet::new(),
                rate_limit: 10_000,
                rate_window_secs: 60,
                windows: HashMap::new(),
                throttle_next: 0,
                down: false,
                requests: 0,
                throttled: 0,
                token_requests: 0,
            }),
        });
        let app = Router::new()
            .route("/api/v1/users", get(list_users))
            .route("/api/v1/users/{id}", get(get_user))
            .route("/api/v1/groups", get(list_groups))
            .route("/api/v1/groups/{id}", get(get_group))
            .route("/api/v1/groups/{id}/users", get(group_users))
            .route("/oauth2/v1/token", post(token))
            .layer(axum::middleware::from_fn_with_state(shared.clone(), gate))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OktaFake { shared, server }
    }

    /// The org URL (`http://127.0.0.1:PORT`), as `https://{yourOktaDomain}` would be.
    pub fn url(&self) -> String {
        self.shared.base.clone()
    }

    /// The token endpoint URL (the audience of client assertions).
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/v1/token", self.shared.base)
    }

    /// The API token accepted as `Authorization: SSWS {token}` (all read permissions).
    pub fn api_token(&self) -> &'static str {
        API_TOKEN
    }

    /// Registers an OAuth service app with its public key (PEM `BEGIN PUBLIC KEY`, RSA),
    /// granted `okta.users.read` and `okta.groups.read`.
    ///
    /// # Panics
    /// When the PEM is not an RSA public key.
    pub fn register_client(&self, client_id: &str, public_key_pem: &str) {
        let spki = SubjectPublicKeyInfoDer::from_pem_slice(public_key_pem.as_bytes())
            .expect("a PEM public key");
        let public_key = rsa_public_key_of_spki(spki.as_ref())
            .expect("an RSA SubjectPublicKeyInfo")
            .to_vec();
        self.shared.lock().clients.insert(
            client_id.into(),
            Client {
                public_key,
                scopes: vec!["okta.users.read".into(), "okta.groups.read".into()],
            },
        );
    }

    /// Sets the scopes granted to a registered service app. A token request for a scope not
    /// granted fails with `invalid_scope`; tokens already issued keep their scopes.
    pub fn set_scopes(&self, client_id: &str, scopes: &[&str]) {
        if let Some(c) = self.shared.lock().clients.get_mut(client_id) {
            c.scopes = scopes.iter().map(|s| s.to_string()).collect();
        }
    }

    /// Revokes every issued access token (the next use gets 401, as after expiry).
    pub fn expire_tokens(&self) {
        self.shared.lock().tokens.clear();
    }

    /// Token endpoint requests served (successful or not).
    pub fn token_requests(&self) -> u64 {
        self.shared.lock().token_requests
    }

    /// Adds (or replaces) a user.
    pub fn add_user(&self, user: FakeUser) {
        let mut s = self.shared.lock();
        let t = s.stamp();
        s.users.insert(
            user.id.clone(),
            UserRec {
                user,
                created: t,
                last_updated: t,
                status_changed: t,
            },
        );
    }

    /// Changes a user's profile (bumps `lastUpdated`). Unknown ids are ignored.
    pub fn update_user(&self, id: &str, change: impl FnOnce(&mut FakeUser)) {
        let mut s = self.shared.lock();
        let t = s.stamp();
        if let Some(u) = s.users.get_mut(id) {
            let before = u.user.status.clone();
            change(&mut u.user);
            u.last_updated = t;
            if u.user.status != before {
                u.status_changed = t;
            }
        }
    }

    /// Sets a user's status (`DEPROVISIONED`, `SUSPENDED`, `ACTIVE`...), bumping
    /// `statusChanged` and `lastUpdated`.
    pub fn set_status(&self, id: &str, status: &str) {
        self.update_user(id, |u| u.status = status.into());
    }

    /// Deletes a user: gone from the directory and from every group (those groups'
    /// `lastMembershipUpdated` move).
    pub fn delete_user(&self, id: &str) {
        let mut s = self.shared.lock();
        s.users.remove(id);
        let t = s.stamp();
        for g in s.groups.values_mut() {
            if g.members.remove(id) {
                g.last_membership_updated = t;
            }
        }
    }

    /// Adds (or replaces) an empty group.
    pub fn add_group(&self, id: &str, name: &str) {
        let mut s = self.shared.lock();
        let t = s.stamp();
        s.groups.insert(
            id.into(),
            GroupRec {
                name: name.into(),
                created: t,
                last_updated: t,
                last_membership_updated: t,
                members: BTreeSet::new(),
            },
        );
    }

    /// Renames a group (bumps its `lastUpdated`).
    pub fn rename_group(&self, id: &str, name: &str) {
        let mut s = self.shared.lock();
        let t = s.stamp();
        if let Some(g) = s.groups.get_mut(id) {
            g.name = name.into();
            g.last_updated = t;
        }
    }

    /// Deletes a group.
    pub fn delete_group(&self, id: &str) {
        self.shared.lock().groups.remove(id);
    }

    /// Adds a user to a group (bumps its `lastMembershipUpdated`).
    pub fn add_member(&self, group: &str, user: &str) {
        let mut s = self.shared.lock();
        let t = s.stamp();
        if let Some(g) = s.groups.get_mut(group)
            && g.members.insert(user.into())
        {
            g.last_membership_updated = t;
        }
    }

    /// Removes a user from a group (bumps its `lastMembershipUpdated`).
    pub fn remove_member(&self, group: &str, user: &str) {
        let mut s = self.shared.lock();
        let t = s.stamp();
        if let Some(g) = s.groups.get_mut(group)
            && g.members.remove(user)
        {
            g.last_membership_updated = t;
        }
    }

    /// The largest page served (requests may ask for less with `limit`); Okta's maximum for
    /// group members and users is 200.
    pub fn set_page_size(&self, n: usize) {
        self.shared.lock().page_size = n.max(1);
    }

    /// `limit` requests per endpoint family in each window of `window_secs` seconds (windows
    /// aligned to the epoch, so `X-Rate-Limit-Reset` is the window's end).
    pub fn set_rate_limit(&self, limit_per_window: u64, window_secs: u64) {
        let mut s = self.shared.lock();
        s.rate_limit = limit_per_window.max(1);
        s.rate_window_secs = window_secs.max(1);
        s.windows.clear();
    }

    /// The next `n` requests get a 429 whatever the counts (a throttle the client could not
    /// foresee, e.g. another client of the same org spending the budget).
    pub fn throttle_next(&self, n: u64) {
        self.shared.lock().throttle_next = n;
    }

    /// 429 responses served so far.
    pub fn throttled(&self) -> u64 {
        self.shared.lock().throttled
    }

    /// While `true`, every request gets a 503.
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
    }

    /// Requests served so far (all endpoints, including refused ones).
    pub fn requests(&self) -> u64 {
        self.shared.lock().requests
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `2024-01-01T00:00:00.000Z`, Okta's timestamp format.
fn iso(ms: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(ms as i128 * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    ))
    .unwrap_or_default()
}

fn parse_iso(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Okta's error object.
fn okta_error(status: StatusCode, code: &str, summary: &str) -> Response {
    (
        status,
        axum::Json(json!({
            "errorCode": code,
            "errorSummary": summary,
            "errorLink": code,
            "errorId": format!("oae{}", uuid::Uuid::new_v4().simple()),
            "errorCauses": [],
        })),
    )
        .into_response()
}

fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    (
        status,
        axum::Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

/// The rate-limit bucket of a path: Okta limits per endpoint, so ids are replaced by `*`
/// (`/api/v1/groups/*/users`).
fn family(path: &str) -> String {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", "v1", kind] => format!("/api/v1/{kind}"),
        ["api", "v1", kind, _id, rest @ ..] => {
            let mut f = format!("/api/v1/{kind}/*");
            for r in rest {
                f.push('/');
                f.push_str(r);
            }
            f
        }
        _ => format!("/{}", segs.join("/")),
    }
}

/// Counts requests, serves outages and rate limits, and stamps the rate-limit headers.
async fn gate(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let fam = family(req.uri().path());
    let now = now_ms() / 1000;
    let (limit, remaining, reset, refuse) = {
        let mut s = shared.lock();
        s.requests += 1;
        if s.down {
            return okta_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "E0000010",
                "Service is in read only mode",
            );
        }
        let window = s.rate_window_secs;
        let limit = s.rate_limit;
        let index = now / window;
        let entry = s.windows.entry(fam).or_insert((index, 0));
        if entry.0 != index {
            *entry = (index, 0);
        }
        let mut refuse = entry.1 >= limit;
        if !refuse {
            entry.1 += 1;
        }
        let mut remaining = limit.saturating_sub(entry.1);
        let mut reset = (index + 1) * window;
        if s.throttle_next > 0 {
            s.throttle_next -= 1;
            refuse = true;
            remaining = 0;
            reset = now + 1;
        }
        if refuse {
            s.throttled += 1;
        }
        (limit, remaining, reset, refuse)
    };
    let mut resp = if refuse {
        okta_error(
            StatusCode::TOO_MANY_REQUESTS,
            "E0000047",
            "API call exceeded rate limit due to too many requests.",
        )
    } else {
        next.run(req).await
    };
    let h = resp.headers_mut();
    h.insert("x-rate-limit-limit", HeaderValue::from(limit));
    h.insert("x-rate-limit-remaining", HeaderValue::from(remaining));
    h.insert("x-rate-limit-reset", HeaderValue::from(reset));
    resp
}

/// Who called: the API token (every read permission) or a bearer token with scopes.
fn authorize(shared: &Shared, headers: &HeaderMap, scope: &str) -> Result<bool, Box<Response>> {
    let invalid = || {
        Box::new(okta_error(
            StatusCode::UNAUTHORIZED,
            "E0000011",
            "Invalid token provided",
        ))
    };
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(invalid)?;
    if let Some(t) = auth.strip_prefix("SSWS ") {
        return if t == API_TOKEN {
            Ok(true)
        } else {
            Err(invalid())
        };
    }
    let t = auth.strip_prefix("Bearer ").ok_or_else(invalid)?;
    let s = shared.lock();
    let issued = s.tokens.get(t).ok_or_else(invalid)?;
    if issued.expires_ms <= now_ms() {
        return Err(invalid());
    }
    if !issued.scopes.iter().any(|s| s == scope) {
        let mut resp = okta_error(
            StatusCode::FORBIDDEN,
            "E0000006",
            "You do not have permission to perform the requested action",
        );
        if let Ok(v) = HeaderValue::from_str(&format!(
            "Bearer error=\"insufficient_scope\", error_description=\"The access token provided does not contain the required scopes.\", resource=\"{scope}\""
        )) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        return Err(Box::new(resp));
    }
    Ok(false)
}

fn page_limit(s: &Inner, q: &HashMap<String, String>) -> usize {
    q.get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(s.page_size)
        .clamp(1, s.page_size)
}

/// Percent-encodes a query value.
fn enc(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A JSON array with `Link` headers: `rel="self"` always, `rel="next"` when more follow.
fn paged(
    base: &str,
    path: &str,
    extra: &[(&str, &str)],
    limit: usize,
    after: Option<&str>,
    items: Vec<Value>,
    next_after: Option<String>,
) -> Response {
    let mut query = format!("limit={limit}");
    for (k, v) in extra {
        query.push_str(&format!("&{k}={}", enc(v)));
    }
    let this = match after {
        Some(a) => format!("{query}&after={}", enc(a)),
        None => query.clone(),
    };
    let mut links = vec![format!("<{base}{path}?{this}>; rel=\"self\"")];
    if let Some(n) = next_after {
        links.push(format!(
            "<{base}{path}?{query}&after={}>; rel=\"next\"",
            enc(&n)
        ));
    }
    let mut resp = axum::Json(Value::Array(items)).into_response();
    for l in links {
        if let Ok(v) = HeaderValue::from_str(&l) {
            resp.headers_mut().append(header::LINK, v);
        }
    }
    resp
}

fn user_json(base: &str, r: &UserRec) -> Value {
    let u = &r.user;
    let mut profile = json!({
        "firstName": u.first,
        "lastName": u.last,
        "mobilePhone": null,
        "secondEmail": null,
        "login": u.login,
        "email": u.email,
    });
    if let Some(d) = &u.display {
        profile["displayName"] = d.clone().into();
    }
    json!({
        "id": u.id,
        "status": u.status,
        "created": iso(r.created),
        "activated": if u.status == "STAGED" { Value::Null } else { iso(r.created).into() },
        "statusChanged": iso(r.status_changed),
        "lastLogin": null,
        "lastUpdated": iso(r.last_updated),
        "passwordChanged": null,
        "type": { "id": "oty1fakedefaultusertype" },
        "profile": profile,
        "credentials": { "provider": { "type": "OKTA", "name": "OKTA" } },
        "_links": { "self": { "href": format!("{base}/api/v1/users/{}", u.id) } },
    })
}

fn group_json(base: &str, id: &str, g: &GroupRec) -> Value {
    json!({
        "id": id,
        "created": iso(g.created),
        "lastUpdated": iso(g.last_updated),
        "lastMembershipUpdated": iso(g.last_membership_updated),
        "objectClass": ["okta:user_group"],
        "type": "OKTA_GROUP",
        "profile": { "name": g.name, "description": null },
        "_links": {
            "self": { "href": format!("{base}/api/v1/groups/{id}") },
            "users": { "href": format!("{base}/api/v1/groups/{id}/users") },
        },
    })
}

fn not_found(id: &str, kind: &str) -> Response {
    okta_error(
        StatusCode::NOT_FOUND,
        "E0000007",
        &format!("Not found: Resource not found: {id} ({kind})"),
    )
}

/// `GET /api/v1/users`: `search=lastUpdated gt "…"` (every status) or the plain list
/// (DEPROVISIONED left out), ordered by id, paged with `after`.
async fn list_users(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = authorize(&shared, &headers, "okta.users.read") {
        return *r;
    }
    let search = q.get("search").map(|s| s.trim().to_string());
    let since = match &search {
        None => None,
        Some(expr) => match parse_search(expr) {
            Some(since) => Some(since),
            None => {
                return okta_error(
                    StatusCode::BAD_REQUEST,
                    "E0000031",
                    "Invalid search criteria.",
                );
            }
        },
    };
    let s = shared.lock();
    let limit = page_limit(&s, &q);
    let after = q.get("after").cloned();
    let range = match &after {
        Some(a) => s
            .users
            .range::<String, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
        None => s.users.range::<String, _>(..),
    };
    let mut items = Vec::new();
    let mut more = false;
    let mut last = None;
    for (id, r) in range {
        let keep = match since {
            Some((ge, t)) => {
                if ge {
                    r.last_updated >= t
                } else {
                    r.last_updated > t
                }
            }
            None => r.user.status != "DEPROVISIONED",
        };
        if !keep {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(user_json(&shared.base, r));
        last = Some(id.clone());
    }
    let extra: Vec<(&str, &str)> = search
        .as_deref()
        .map(|s| vec![("search", s)])
        .unwrap_or_default();
    paged(
        &shared.base,
        "/api/v1/users",
        &extra,
        limit,
        after.as_deref(),
        items,
        if more { last } else { None },
    )
}

/// `lastUpdated gt "…"` / `lastUpdated ge "…"` → (inclusive, ms).
fn parse_search(expr: &str) -> Option<(bool, u64)> {
    let rest = expr.strip_prefix("lastUpdated ")?;
    let (ge, value) = if let Some(v) = rest.strip_prefix("gt ") {
        (false, v)
    } else {
        (true, rest.strip_prefix("ge ")?)
    };
    let value = value.trim().strip_prefix('"')?.strip_suffix('"')?;
    Some((ge, parse_iso(value)?))
}

/// `GET /api/v1/users/{id}` (id or login; `me` is the API token's owner).
async fn get_user(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if id == "me" {
        // `me` needs a user context: the API token's admin; a service app has none.
        return match authorize(&shared, &headers, "okta.users.read") {
            Ok(true) => axum::Json(json!({
                "id": "00ufakeadmin",
                "status": "ACTIVE",
                "profile": { "login": TOKEN_OWNER, "email": TOKEN_OWNER, "firstName": "Fake", "lastName": "Admin" },
            }))
            .into_response(),
            Ok(false) => not_found("me", "User"),
            Err(r) => *r,
        };
    }
    if let Err(r) = authorize(&shared, &headers, "okta.users.read") {
        return *r;
    }
    let s = shared.lock();
    let found = s
        .users
        .get(&id)
        .or_else(|| s.users.values().find(|r| r.user.login == id));
    match found {
        Some(r) => axum::Json(user_json(&shared.base, r)).into_response(),
        None => not_found(&id, "User"),
    }
}

/// `GET /api/v1/groups` (ordered by id, paged).
async fn list_groups(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = authorize(&shared, &headers, "okta.groups.read") {
        return *r;
    }
    let s = shared.lock();
    let limit = page_limit(&s, &q);
    let after = q.get("after").cloned();
    let mut items = Vec::new();
    let mut more = false;
    let mut last = None;
    for (id, g) in &s.groups {
        if after.as_ref().is_some_and(|a| id <= a) {
            continue;
        }
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(group_json(&shared.base, id, g));
        last = Some(id.clone());
    }
    paged(
        &shared.base,
        "/api/v1/groups",
        &[],
        limit,
        after.as_deref(),
        items,
        if more { last } else { None },
    )
}

/// `GET /api/v1/groups/{id}`.
async fn get_group(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(r) = authorize(&shared, &headers, "okta.groups.read") {
        return *r;
    }
    let s = shared.lock();
    match s.groups.get(&id) {
        Some(g) => axum::Json(group_json(&shared.base, &id, g)).into_response(),
        None => not_found(&id, "UserGroup"),
    }
}

/// `GET /api/v1/groups/{id}/users` (members ordered by id, paged with `after`).
async fn group_users(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = authorize(&shared, &headers, "okta.groups.read") {
        return *r;
    }
    let s = shared.lock();
    let Some(g) = s.groups.get(&id) else {
        return not_found(&id, "UserGroup");
    };
    let limit = page_limit(&s, &q);
    let after = q.get("after").cloned();
    let range = match &after {
        Some(a) => g
            .members
            .range::<String, _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
        None => g.members.range::<String, _>(..),
    };
    let mut items = Vec::new();
    let mut more = false;
    let mut last = None;
    for uid in range {
        let Some(r) = s.users.get(uid) else { continue };
        if items.len() == limit {
            more = true;
            break;
        }
        items.push(user_json(&shared.base, r));
        last = Some(uid.clone());
    }
    let path = format!("/api/v1/groups/{id}/users");
    paged(
        &shared.base,
        &path,
        &[],
        limit,
        after.as_deref(),
        items,
        if more { last } else { None },
    )
}

/// `POST /oauth2/v1/token`: client credentials with a `private_key_jwt` assertion.
async fn token(
    State(shared): State<Arc<Shared>>,
    axum::Form(form): axum::Form<HashMap<String, String>>,
) -> Response {
    shared.lock().token_requests += 1;
    let field = |k: &str| form.get(k).map(String::as_str).unwrap_or("");
    if field("grant_type") != "client_credentials" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "The authorization grant type is not supported by the authorization server.",
        );
    }
    if field("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "The client_assertion_type is missing or not jwt-bearer.",
        );
    }
    let audience = format!("{}/oauth2/v1/token", shared.base);
    let client_id = match verify_assertion(&shared, field("client_assertion"), &audience) {
        Ok(c) => c,
        Err(why) => return oauth_error(StatusCode::UNAUTHORIZED, "invalid_client", &why),
    };
    let mut s = shared.lock();
    let granted = s
        .clients
        .get(&client_id)
        .map(|c| c.scopes.clone())
        .unwrap_or_default();
    let requested: Vec<String> = field("scope")
        .split_whitespace()
        .map(String::from)
        .collect();
    if requested.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "The authorization server resource does not have any configured default scopes, 'scope' must be provided.",
        );
    }
    let missing: Vec<&str> = requested
        .iter()
        .filter(|r| !granted.contains(r))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            &format!(
                "The following scopes are not allowed: [{}]",
                missing.join(", ")
            ),
        );
    }
    let access_token = format!("fake.{}", uuid::Uuid::new_v4().simple());
    s.tokens.insert(
        access_token.clone(),
        Issued {
            scopes: requested.clone(),
            expires_ms: now_ms() + TOKEN_LIFETIME_SECS * 1000,
        },
    );
    axum::Json(json!({
        "token_type": "Bearer",
        "expires_in": TOKEN_LIFETIME_SECS,
        "access_token": access_token,
        "scope": requested.join(" "),
    }))
    .into_response()
}

/// Verifies an RS256 client assertion; the client id, or why it is refused.
fn verify_assertion(shared: &Shared, jwt: &str, audience: &str) -> Result<String, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [h, c, sig] = parts.as_slice() else {
        return Err("The client_assertion is not a JWT.".into());
    };
    let decode = |p: &str| -> Result<Value, String> {
        let bytes = URL_SAFE_NO_PAD
            .decode(p)
            .map_err(|_| "The client_assertion is not base64url.".to_string())?;
        serde_json::from_slice(&bytes).map_err(|_| "The client_assertion is not JSON.".to_string())
    };
    let header = decode(h)?;
    let claims = decode(c)?;
    if header["alg"] != "RS256" {
        return Err("The client_assertion alg is not supported.".into());
    }
    let iss = claims["iss"].as_str().unwrap_or_default().to_string();
    if claims["sub"].as_str() != Some(iss.as_str()) {
        return Err("The client_assertion sub must equal iss.".into());
    }
    if claims["aud"].as_str() != Some(audience) {
        return Err(format!(
            "The audience claim for client_assertion must be the endpoint invoked for the request: {audience}"
        ));
    }
    let now = now_ms() / 1000;
    let exp = claims["exp"]
        .as_u64()
        .ok_or("The client_assertion has no exp.")?;
    if exp <= now {
        return Err("The client_assertion token is expired.".into());
    }
    if exp > now + 3600 + 60 {
        return Err("The client_assertion token has an expiration too far into the future.".into());
    }
    let jti = claims["jti"]
        .as_str()
        .ok_or("The client_assertion has no jti.")?
        .to_string();
    let signature = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| "The client_assertion signature is not base64url.")?;
    let mut s = shared.lock();
    let client = s
        .clients
        .get(&iss)
        .ok_or("The client_id is not registered.")?;
    let key = ring::signature::UnparsedPublicKey::new(
        &ring::signature::RSA_PKCS1_2048_8192_SHA256,
        &client.public_key,
    );
    key.verify(format!("{h}.{c}").as_bytes(), &signature)
        .map_err(|_| "The client_assertion signature is invalid.".to_string())?;
    if !s.used_jtis.insert(jti) {
        return Err("The client_assertion token has already been used.".into());
    }
    Ok(iss)
}

/// One DER element: (tag, content, rest).
fn der(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let tag = *input.first()?;
    let first = *input.get(1)?;
    let (len, start) = if first < 0x80 {
        (first as usize, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 {
            return None;
        }
        let mut len = 0usize;
        for i in 0..n {
            len = (len << 8) | *input.get(2 + i)? as usize;
        }
        (len, 2 + n)
    };
    let end = start.checked_add(len)?;
    Some((tag, input.get(start..end)?, input.get(end..)?))
}

/// The PKCS#1 `RSAPublicKey` inside a SubjectPublicKeyInfo (RFC 5280 §4.1).
fn rsa_public_key_of_spki(spki: &[u8]) -> Option<&[u8]> {
    let (0x30, seq, _) = der(spki)? else {
        return None;
    };
    let (0x30, _algorithm, rest) = der(seq)? else {
        return None;
    };
    let (0x03, bits, _) = der(rest)? else {
        return None;
    };
    let (0, key) = bits.split_first()? else {
        return None;
    };
    Some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_replace_ids() {
        assert_eq!(family("/api/v1/users"), "/api/v1/users");
        assert_eq!(family("/api/v1/users/00u1"), "/api/v1/users/*");
        assert_eq!(
            family("/api/v1/groups/00g1/users"),
            "/api/v1/groups/*/users"
        );
        assert_eq!(family("/oauth2/v1/token"), "/oauth2/v1/token");
    }

    #[test]
    fn timestamps_round_trip() {
        let t = 1_704_067_200_123;
        assert_eq!(iso(t), "2024-01-01T00:00:00.123Z");
        assert_eq!(parse_iso(&iso(t)), Some(t));
        assert_eq!(
            parse_search(r#"lastUpdated gt "2024-01-01T00:00:00.123Z""#),
            Some((false, t))
        );
        assert_eq!(parse_search("status eq \"ACTIVE\""), None);
    }
}
