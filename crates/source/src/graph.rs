//! Microsoft Graph: users and groups through delta queries.
//!
//! - Token: OAuth 2.0 client credentials against `{authority}/{tenant}/oauth2/v2.0/token` with
//!   a client secret or a signed client assertion (certificate), scope `{graph}/.default`;
//!   cached until shortly before `expires_in`, dropped and fetched again once when Graph answers
//!   401.
//! - Full round (first sync, or the stored cursor refused): `GET /v1.0/users/delta` (every user
//!   of the tenant, `$select` of the attributes the bridge maps) and `GET /v1.0/groups/delta`
//!   filtered to the configured group ids (`$filter=id eq '…' or …`, at most 50 ids per query)
//!   with `$select=displayName,members`; `@odata.nextLink` followed to the `@odata.deltaLink`.
//! - Incremental round: the stored delta links; `@removed` users and groups, `members@delta`
//!   membership changes.
//! - Only direct user members count: `members@delta` entries typed `#microsoft.graph.user`.
//!   Nested groups are not expanded (a group inside a configured group gives its members no
//!   membership here), as in the SCIM pushes Entra makes.
//!
//! Every request goes through [`http::send`] (counted, 429/503 `Retry-After` honoured).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::Engine;
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http;
use crate::{
    Change, CheckReport, Round, SecretFile, Source, SourceError, SourceGroup, SourceResult,
    SourceUser,
};

/// Microsoft Graph in the global cloud (no `/v1.0` suffix).
pub const DEFAULT_GRAPH_URL: &str = "https://graph.microsoft.com";
/// The Microsoft Entra authority of the global cloud.
pub const DEFAULT_AUTHORITY_URL: &str = "https://login.microsoftonline.com";

/// The user properties read (`id` plus [`USER_PROPS`]).
const USER_SELECT: &str = "id,userPrincipalName,mail,givenName,surname,displayName,accountEnabled";
const USER_PROPS: [&str; 6] = [
    "userPrincipalName",
    "mail",
    "givenName",
    "surname",
    "displayName",
    "accountEnabled",
];
/// Graph accepts at most 50 ids in one `$filter` of a groups delta query.
const GROUP_CHUNK: usize = 50;
const PERMISSION_HINT: &str = "grant the application the Microsoft Graph application permissions User.Read.All and GroupMember.Read.All and grant admin consent";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// Application permissions that include reading users / group members.
const USER_READ: [&str; 4] = [
    "User.Read.All",
    "User.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];
const MEMBER_READ: [&str; 6] = [
    "GroupMember.Read.All",
    "GroupMember.ReadWrite.All",
    "Group.Read.All",
    "Group.ReadWrite.All",
    "Directory.Read.All",
    "Directory.ReadWrite.All",
];

/// How to reach and read a tenant.
#[derive(Debug)]
pub struct GraphOptions {
    /// The Directory (tenant) ID.
    pub tenant_id: String,
    /// The app registration's Application (client) ID.
    pub client_id: String,
    /// The app's credential.
    pub credential: GraphCredential,
    /// Graph's base URL, [`DEFAULT_GRAPH_URL`] unless a sovereign cloud (no `/v1.0` suffix).
    pub graph_url: String,
    /// The authority, [`DEFAULT_AUTHORITY_URL`] unless a sovereign cloud.
    pub authority_url: String,
    /// Object ids of the groups in scope.
    pub groups: Vec<String>,
    /// The Graph property that becomes the SCIM `userName`: `userPrincipalName` (default) or
    /// `mail` (falling back to `userPrincipalName` for users without one).
    pub user_name_attribute: String,
}

/// The app registration's credential.
#[derive(Debug)]
pub enum GraphCredential {
    /// A client secret (its value, not its id).
    Secret(SecretFile),
    /// A certificate registered on the app (PEM) and its private key (PEM): the token request
    /// carries a signed client assertion.
    Certificate {
        /// The certificate, PEM.
        certificate: std::path::PathBuf,
        /// The private key, PEM.
        key: SecretFile,
    },
}

/// An access token and when to stop using it. `Debug` does not show the token.
struct CachedToken {
    value: String,
    until: Instant,
}

impl std::fmt::Debug for CachedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedToken")
            .field("until", &self.until)
            .finish_non_exhaustive()
    }
}

/// Reads a Microsoft Entra tenant through Microsoft Graph.
#[derive(Debug)]
pub struct GraphSource {
    opts: GraphOptions,
    graph: String,
    authority: String,
    client: reqwest::Client,
    token: tokio::sync::Mutex<Option<CachedToken>>,
}

/// The stored position: the delta links, and what they were made for.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    /// The Graph URL the links point to.
    graph: String,
    /// The configured group ids (sorted, deduplicated) the group links cover.
    groups: Vec<String>,
    /// The users delta link.
    users: String,
    /// One groups delta link per chunk of [`GROUP_CHUNK`] configured ids, in order.
    group_links: Vec<String>,
}

/// A group of a full round, aggregated over the entries and pages it appears in.
#[derive(Debug, Default)]
struct FullGroup {
    name: Option<String>,
    /// Direct user members, in the order Graph listed them.
    members: Vec<String>,
    seen: HashSet<String>,
}

/// A delta request that failed: the link refused (start over) or an error.
#[derive(Debug)]
enum DeltaError {
    Refused(String),
    Failed(SourceError),
}

impl From<SourceError> for DeltaError {
    fn from(e: SourceError) -> Self {
        DeltaError::Failed(e)
    }
}

/// The `{"error": {"code", "message"}}` of a Graph error body.
fn graph_error_code(body: &str) -> Option<(String, String)> {
    let v: Value = serde_json::from_str(body).ok()?;
    let e = v.get("error")?;
    Some((
        e.get("code")?.as_str()?.to_string(),
        e.get("message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
    ))
}

fn str_of<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

/// The claims of a JWT (payload decoded, signature not verified: for reporting only).
fn jwt_claims(token: &str) -> Value {
    token
        .split('.')
        .nth(1)
        .and_then(|p| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p.trim_end_matches('='))
                .ok()
        })
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null)
}

use crate::jwt::{client_assertion, x5t_of_certificate};

impl GraphSource {
    /// A source for `opts` (no request is made until used).
    pub fn new(opts: GraphOptions) -> Self {
        GraphSource {
            graph: opts.graph_url.trim_end_matches('/').to_string(),
            authority: opts.authority_url.trim_end_matches('/').to_string(),
            opts,
            client: http::client(),
            token: tokio::sync::Mutex::new(None),
        }
    }

    fn validate(&self) -> SourceResult<()> {
        match self.opts.user_name_attribute.as_str() {
            "userPrincipalName" | "mail" => Ok(()),
            other => Err(SourceError::Config(format!(
                "user_name_attribute {other:?} is not supported: use userPrincipalName or mail"
            ))),
        }
    }

    /// The configured group ids, sorted and deduplicated.
    fn scope(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .opts
            .groups
            .iter()
            .map(|g| g.trim().to_string())
            .filter(|g| !g.is_empty())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }

    /// `{graph}/v1.0/{segments…}?{query}` (spaces as `%20`, as OData expects).
    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> SourceResult<String> {
        let bad = |e: String| SourceError::Config(format!("graph_url {:?}: {e}", self.graph));
        let mut u = reqwest::Url::parse(&self.graph).map_err(|e| bad(e.to_string()))?;
        u.path_segments_mut()
            .map_err(|()| bad("not a base URL".into()))?
            .pop_if_empty()
            .push("v1.0")
            .extend(segments);
        if !query.is_empty() {
            let q = serde_urlencoded::to_string(query).map_err(|e| bad(e.to_string()))?;
            u.set_query(Some(&q.replace('+', "%20")));
        }
        Ok(u.to_string())
    }

    // ---- token ----

    async fn token(&self, requests: &mut u64) -> SourceResult<String> {
        let mut cached = self.token.lock().await;
        if let Some(t) = cached.as_ref()
            && t.until > Instant::now()
        {
            return Ok(t.value.clone());
        }
        let (value, expires_in) = self.fetch_token(requests).await?;
        let margin = (expires_in / 10).min(300);
        *cached = Some(CachedToken {
            value: value.clone(),
            until: Instant::now() + Duration::from_secs(expires_in - margin),
        });
        Ok(value)
    }

    /// Forgets `used` if it is still the cached token (Graph refused it).
    async fn drop_token(&self, used: &str) {
        let mut cached = self.token.lock().await;
        if cached.as_ref().is_some_and(|t| t.value == used) {
            *cached = None;
        }
    }

    async fn fetch_token(&self, requests: &mut u64) -> SourceResult<(String, u64)> {
        let url = format!(
            "{}/{}/oauth2/v2.0/token",
            self.authority, self.opts.tenant_id
        );
        let mut form: Vec<(&str, String)> = vec![
            ("grant_type", "client_credentials".into()),
            ("client_id", self.opts.client_id.clone()),
            ("scope", format!("{}/.default", self.graph)),
        ];
        let mut secret = None;
        match &self.opts.credential {
            GraphCredential::Secret(file) => {
                let s = file.get()?;
                form.push(("client_secret", s.clone()));
                secret = Some(s);
            }
            GraphCredential::Certificate { certificate, key } => {
                let pem = std::fs::read_to_string(certificate).map_err(|e| {
                    SourceError::Config(format!(
                        "cannot read the certificate {}: {e}",
                        certificate.display()
                    ))
                })?;
                let x5t = x5t_of_certificate(&pem)?;
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                let assertion =
                    client_assertion(&self.opts.client_id, &url, &key.get()?, Some(&x5t), now)?;
                form.push(("client_assertion_type", JWT_BEARER.into()));
                form.push(("client_assertion", assertion));
            }
        }
        let body = serde_urlencoded::to_string(&form)
            .map_err(|e| SourceError::Protocol(format!("token request: {e}")))?;
        let what = "Microsoft Entra token request";
        let resp = http::send(
            || {
                self.client
                    .post(&url)
                    .header(
                        reqwest::header::CONTENT_TYPE,
                        "application/x-www-form-urlencoded",
                    )
                    .body(body.clone())
            },
            requests,
            what,
        )
        .await?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| SourceError::Transient(format!("{what}: {}", http::error_chain(&e))))?;
        if !status.is_success() {
            let mut e = self.token_error(&url, status, &text);
            if let Some(s) = secret.filter(|s| s.len() >= 4) {
                e = match e {
                    SourceError::Config(m) => SourceError::Config(m.replace(&s, "[redacted]")),
                    SourceError::Transient(m) => {
                        SourceError::Transient(m.replace(&s, "[redacted]"))
                    }
                    SourceError::Protocol(m) => SourceError::Protocol(m.replace(&s, "[redacted]")),
                };
            }
            return Err(e);
        }
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| SourceError::Protocol(format!("{what}: unreadable answer: {e}")))?;
        let token = str_of(&v, "access_token").ok_or_else(|| {
            SourceError::Protocol(format!("{what}: no access_token in the answer"))
        })?;
        let expires_in = match v.get("expires_in") {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
        .unwrap_or(300);
        Ok((token.to_string(), expires_in))
    }

    /// What a refused token request means, as the operator's to-do.
    fn token_error(&self, url: &str, status: StatusCode, body: &str) -> SourceError {
        let (tenant, app) = (&self.opts.tenant_id, &self.opts.client_id);
        if status.is_server_error() {
            let body: String = body.chars().take(300).collect();
            return SourceError::Transient(format!(
                "Microsoft Entra token request: {status}: {body}"
            ));
        }
        let v: Value = serde_json::from_str(body).unwrap_or(Value::Null);
        let Some(error) = str_of(&v, "error") else {
            return SourceError::Config(format!(
                "the token endpoint {url} answered {status}: check authority_url and tenant_id"
            ));
        };
        let description = str_of(&v, "error_description").unwrap_or("");
        // The description's first line, without the trace / correlation ids.
        let description = description
            .split(" Trace ID:")
            .next()
            .unwrap_or("")
            .lines()
            .next()
            .unwrap_or("");
        let code = v
            .get("error_codes")
            .and_then(|c| c.get(0))
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let credential = match &self.opts.credential {
            GraphCredential::Secret(f) => format!("the client secret in {}", f.path().display()),
            GraphCredential::Certificate { certificate, .. } => {
                format!("the certificate {}", certificate.display())
            }
        };
        let hint = match code {
            7000215 | 7000216 | 7000222 | 7000229 => format!(
                "{credential} is wrong or expired: write the secret's Value (not its Secret ID) from the app registration's Certificates & secrets"
            ),
            700016 => format!(
                "application {app} is not in tenant {tenant}: check client_id (the app registration's Application (client) ID) and tenant_id"
            ),
            90002 | 900023 | 90013 => format!(
                "tenant {tenant} is not found: check tenant_id (the Directory (tenant) ID) and authority_url"
            ),
            700023 | 700024 | 700027 | 7000274 | 500181 => format!(
                "{credential} is not one registered on application {app}, or the key does not match it: upload the certificate to the app registration"
            ),
            70011 | 1002012 => format!(
                "the scope {}/.default is refused: check graph_url",
                self.graph
            ),
            _ => format!("check tenant_id, client_id and {credential}"),
        };
        SourceError::Config(format!(
            "Microsoft Entra refused the token request of application {app} in tenant {tenant} ({status} {error}): {description} — {hint}"
        ))
    }

    // ---- Graph requests ----

    /// GET with the bearer token; a 401 drops the token and retries once with a fresh one.
    async fn get(
        &self,
        url: &str,
        requests: &mut u64,
        what: &str,
    ) -> SourceResult<reqwest::Response> {
        let mut retried = false;
        loop {
            let token = self.token(requests).await?;
            let resp =
                http::send(|| self.client.get(url).bearer_auth(&token), requests, what).await?;
            if resp.status() == StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                self.drop_token(&token).await;
                continue;
            }
            return Ok(resp);
        }
    }

    /// GET a JSON answer: `Ok(None)` on 404, errors classified.
    async fn get_json(
        &self,
        url: &str,
        requests: &mut u64,
        what: &str,
    ) -> SourceResult<Option<Value>> {
        let resp = self.get(url, requests, what).await?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| SourceError::Transient(format!("{what}: {}", http::error_chain(&e))))?;
        if status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(graph_error(what, status, &text));
        }
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| SourceError::Protocol(format!("{what}: unreadable answer: {e}")))
    }

    /// Checks that a link Graph returned (or a stored one) points to the configured Graph's
    /// origin: the bearer token is sent to it.
    fn own_link(&self, link: &str, what: &str) -> SourceResult<String> {
        let origin = |u: &str| reqwest::Url::parse(u).ok().map(|u| u.origin());
        match (origin(link), origin(&self.graph)) {
            (Some(a), Some(b)) if a == b && a.is_tuple() => Ok(link.to_string()),
            _ => Err(SourceError::Protocol(format!(
                "{what}: a link outside {}: {link}",
                self.graph
            ))),
        }
    }

    /// Follows a delta query from `first` through its `@odata.nextLink`s to the
    /// `@odata.deltaLink`: every entry, and the delta link.
    async fn walk(
        &self,
        first: String,
        requests: &mut u64,
        what: &str,
    ) -> Result<(Vec<Value>, String), DeltaError> {
        let mut entries = Vec::new();
        let mut url = self.own_link(&first, what)?;
        loop {
            let resp = self.get(&url, requests, what).await?;
            let status = resp.status();
            let text = resp.text().await.map_err(|e| {
                SourceError::Transient(format!("{what}: {}", http::error_chain(&e)))
            })?;
            if !status.is_success() {
                let code = graph_error_code(&text).map(|(c, _)| c);
                return Err(match code.as_deref() {
                    Some(c @ ("syncStateNotFound" | "resyncRequired" | "syncStateInvalid")) => {
                        let verb = if c == "syncStateNotFound" {
                            "expired"
                        } else {
                            "was refused"
                        };
                        DeltaError::Refused(format!("the delta link {verb} ({c})"))
                    }
                    _ if status == StatusCode::GONE => {
                        DeltaError::Refused("the delta link expired (410 Gone)".into())
                    }
                    _ => DeltaError::Failed(graph_error(what, status, &text)),
                });
            }
            let mut page: Value = serde_json::from_str(&text)
                .map_err(|e| SourceError::Protocol(format!("{what}: unreadable answer: {e}")))?;
            match page.get_mut("value").map(Value::take) {
                Some(Value::Array(v)) => entries.extend(v),
                _ => {
                    return Err(
                        SourceError::Protocol(format!("{what}: an answer without value")).into(),
                    );
                }
            }
            if let Some(next) = str_of(&page, "@odata.nextLink") {
                url = self.own_link(next, what)?;
            } else if let Some(delta) = str_of(&page, "@odata.deltaLink") {
                return Ok((entries, self.own_link(delta, what)?));
            } else {
                return Err(SourceError::Protocol(format!(
                    "{what}: an answer with neither @odata.nextLink nor @odata.deltaLink"
                ))
                .into());
            }
        }
    }

    // ---- mapping ----

    /// A Graph user (every selected property present) as a [`SourceUser`]; `None` (logged)
    /// without a usable user name.
    fn map_user(&self, v: &Value) -> Option<SourceUser> {
        let id = str_of(v, "id")?;
        let upn = str_of(v, "userPrincipalName");
        let mail = str_of(v, "mail");
        let user_name = if self.opts.user_name_attribute == "mail" {
            mail.or(upn)
        } else {
            upn
        };
        let Some(user_name) = user_name.filter(|n| !n.is_empty()) else {
            tracing::warn!(
                id,
                attribute = %self.opts.user_name_attribute,
                "graph: a user with neither the configured attribute nor a userPrincipalName, skipped"
            );
            return None;
        };
        let s = |k: &str| str_of(v, k).map(String::from);
        Some(SourceUser {
            id: id.to_string(),
            user_name: user_name.to_string(),
            given_name: s("givenName"),
            family_name: s("surname"),
            display_name: s("displayName"),
            email: s("mail"),
            active: v
                .get("accountEnabled")
                .and_then(Value::as_bool)
                .unwrap_or(true),
        })
    }

    async fn read_user(&self, id: &str, requests: &mut u64) -> SourceResult<Option<SourceUser>> {
        let url = self.url(&["users", id], &[("$select", USER_SELECT)])?;
        Ok(self
            .get_json(&url, requests, "Graph user read")
            .await?
            .and_then(|v| self.map_user(&v)))
    }

    /// The users delta's entries as changes. `complete`: entries carry every selected property
    /// (a full enumeration, where Graph returns whole objects, absent properties as null);
    /// otherwise an entry missing one is completed by reading the user, since an updated user
    /// carries only "at least the properties that have been updated".
    async fn user_changes(
        &self,
        entries: Vec<Value>,
        complete: bool,
        requests: &mut u64,
        changes: &mut Vec<Change>,
    ) -> SourceResult<()> {
        for e in entries {
            let Some(id) = str_of(&e, "id") else {
                return Err(SourceError::Protocol(
                    "users delta: an entry without id".into(),
                ));
            };
            if let Some(r) = e.get("@removed") {
                changes.push(Change::UserRemoved {
                    id: id.to_string(),
                    hard: str_of(r, "reason") == Some("deleted"),
                });
                continue;
            }
            let user = if complete || USER_PROPS.iter().all(|p| e.get(*p).is_some()) {
                self.map_user(&e)
            } else {
                let user = self.read_user(id, requests).await?;
                if user.is_none() {
                    // Gone since: the next delta reports the removal.
                    tracing::debug!(id, "graph: a changed user is no longer readable");
                }
                user
            };
            changes.extend(user.map(Change::User));
        }
        Ok(())
    }

    fn users_delta_url(&self) -> SourceResult<String> {
        self.url(&["users", "delta"], &[("$select", USER_SELECT)])
    }

    fn groups_delta_url(&self, ids: &[String]) -> SourceResult<String> {
        let filter = ids
            .iter()
            .map(|id| format!("id eq '{}'", id.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(" or ");
        self.url(
            &["groups", "delta"],
            &[("$filter", &filter), ("$select", "displayName,members")],
        )
    }

    /// The direct user members of a `members@delta` list: (added, removed).
    fn member_delta(e: &Value) -> (Vec<String>, Vec<String>) {
        let (mut added, mut removed) = (Vec::new(), Vec::new());
        for m in e
            .get("members@delta")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if str_of(m, "@odata.type") != Some("#microsoft.graph.user") {
                continue; // nested groups and other objects are not expanded
            }
            if let Some(id) = str_of(m, "id") {
                if m.get("@removed").is_some() {
                    removed.push(id.to_string());
                } else {
                    added.push(id.to_string());
                }
            }
        }
        (added, removed)
    }

    // ---- rounds ----

    async fn full(&self, requests: &mut u64, reason: Option<String>) -> SourceResult<Round> {
        let refused = |e: DeltaError| match e {
            DeltaError::Failed(e) => e,
            DeltaError::Refused(r) => {
                SourceError::Protocol(format!("Graph refused a delta query without a token: {r}"))
            }
        };
        let mut changes = Vec::new();
        let (users, users_link) = self
            .walk(self.users_delta_url()?, requests, "Graph users delta")
            .await
            .map_err(refused)?;
        self.user_changes(users, true, requests, &mut changes)
            .await?;

        let scope = self.scope();
        let mut group_links = Vec::new();
        // Aggregated over pages: a group's members can span several entries and pages.
        let mut found: HashMap<String, FullGroup> = HashMap::new();
        for chunk in scope.chunks(GROUP_CHUNK) {
            let (entries, link) = self
                .walk(
                    self.groups_delta_url(chunk)?,
                    requests,
                    "Graph groups delta",
                )
                .await
                .map_err(refused)?;
            group_links.push(link);
            for e in entries {
                let Some(id) = str_of(&e, "id") else { continue };
                if e.get("@removed").is_some() {
                    found.remove(id);
                    continue;
                }
                let acc = found.entry(id.to_string()).or_default();
                if acc.name.is_none() {
                    acc.name = str_of(&e, "displayName").map(String::from);
                }
                for m in Self::member_delta(&e).0 {
                    if acc.seen.insert(m.clone()) {
                        acc.members.push(m);
                    }
                }
            }
        }
        for id in &scope {
            match found.remove(id) {
                Some(g) => {
                    changes.push(Change::Group(SourceGroup {
                        id: id.clone(),
                        display_name: g.name.unwrap_or_else(|| id.clone()),
                    }));
                    changes.push(Change::AllMembers {
                        group: id.clone(),
                        members: g.members,
                    });
                }
                None => {
                    tracing::warn!(group = %id, "graph: a configured group is not in the tenant")
                }
            }
        }
        Ok(Round {
            changes,
            full: true,
            cursor: self.cursor(scope, users_link, group_links),
            resync_reason: reason,
            requests: *requests,
        })
    }

    fn cursor(&self, groups: Vec<String>, users: String, group_links: Vec<String>) -> String {
        serde_json::to_string(&Cursor {
            graph: self.graph.clone(),
            groups,
            users,
            group_links,
        })
        .expect("a cursor serializes")
    }

    async fn incremental(&self, cursor: Cursor, requests: &mut u64) -> Result<Round, DeltaError> {
        let mut changes = Vec::new();
        let (users, users_link) = self
            .walk(cursor.users, requests, "Graph users delta")
            .await?;
        self.user_changes(users, false, requests, &mut changes)
            .await?;
        let in_scope: HashSet<&str> = cursor.groups.iter().map(String::as_str).collect();
        let mut group_links = Vec::new();
        for link in cursor.group_links {
            let (entries, link) = self.walk(link, requests, "Graph groups delta").await?;
            group_links.push(link);
            for e in entries {
                let Some(id) = str_of(&e, "id").filter(|id| in_scope.contains(id)) else {
                    continue;
                };
                if e.get("@removed").is_some() {
                    changes.push(Change::GroupRemoved { id: id.to_string() });
                    continue;
                }
                if let Some(name) = str_of(&e, "displayName") {
                    changes.push(Change::Group(SourceGroup {
                        id: id.to_string(),
                        display_name: name.to_string(),
                    }));
                }
                let (added, removed) = Self::member_delta(&e);
                if !added.is_empty() || !removed.is_empty() {
                    changes.push(Change::Members {
                        group: id.to_string(),
                        added,
                        removed,
                    });
                }
            }
        }
        Ok(Round {
            changes,
            full: false,
            cursor: self.cursor(cursor.groups, users_link, group_links),
            resync_reason: None,
            requests: *requests,
        })
    }

    /// A configured group's name and direct user member count, or what went wrong.
    async fn check_group(&self, id: &str, requests: &mut u64) -> (Result<String, String>, usize) {
        let url = match self.url(&["groups", id], &[("$select", "id,displayName")]) {
            Ok(u) => u,
            Err(e) => return (Err(e.to_string()), 0),
        };
        let name = match self.get_json(&url, requests, "Graph group read").await {
            Ok(Some(v)) => str_of(&v, "displayName").unwrap_or(id).to_string(),
            Ok(None) => return (Err("not found in the tenant".into()), 0),
            Err(e) => return (Err(e.to_string()), 0),
        };
        let mut count = 0;
        let mut next = self
            .url(&["groups", id, "members"], &[("$select", "id")])
            .ok();
        while let Some(url) = next.take() {
            match self.get_json(&url, requests, "Graph group members").await {
                Ok(Some(page)) => {
                    count += page
                        .get("value")
                        .and_then(Value::as_array)
                        .into_iter()
                        .flatten()
                        .filter(|m| str_of(m, "@odata.type") == Some("#microsoft.graph.user"))
                        .count();
                    next = match str_of(&page, "@odata.nextLink") {
                        Some(l) => match self.own_link(l, "Graph group members") {
                            Ok(l) => Some(l),
                            Err(e) => return (Err(format!("{name}: {e}")), count),
                        },
                        None => None,
                    };
                }
                Ok(None) => return (Err(format!("{name}: its members are not found")), 0),
                Err(e) => return (Err(format!("{name}: cannot read its members: {e}")), count),
            }
        }
        (Ok(name), count)
    }
}

/// A Graph error answer classified, with the Graph error code and message (never the token).
fn graph_error(what: &str, status: StatusCode, body: &str) -> SourceError {
    let body = match graph_error_code(body) {
        Some((code, message)) => format!("{code}: {message}"),
        None => body.to_string(),
    };
    if status == StatusCode::UNAUTHORIZED {
        let hint = format!(
            "Graph refused a fresh access token: check that graph_url and authority_url are of the same cloud, and {PERMISSION_HINT}"
        );
        return http::status_error(what, status, &body, &hint);
    }
    http::status_error(what, status, &body, PERMISSION_HINT)
}

#[async_trait]
impl Source for GraphSource {
    fn kind(&self) -> &'static str {
        "graph"
    }

    async fn pull(&self, cursor: Option<&str>) -> SourceResult<Round> {
        self.validate()?;
        let mut requests = 0;
        let reason = match cursor.map(serde_json::from_str::<Cursor>) {
            None => None,
            Some(Err(_)) => Some("the stored cursor is not a Microsoft Graph cursor".to_string()),
            Some(Ok(c)) if c.graph != self.graph => Some("the Graph URL changed".to_string()),
            Some(Ok(c)) if c.groups != self.scope() => {
                Some("the configured groups changed".to_string())
            }
            Some(Ok(c)) if c.group_links.len() != c.groups.len().div_ceil(GROUP_CHUNK) => {
                Some("the stored cursor is not a Microsoft Graph cursor".to_string())
            }
            Some(Ok(c)) => match self.incremental(c, &mut requests).await {
                Ok(round) => return Ok(round),
                Err(DeltaError::Failed(e)) => return Err(e),
                Err(DeltaError::Refused(reason)) => {
                    tracing::info!(%reason, "graph: starting over with a full round");
                    Some(reason)
                }
            },
        };
        self.full(&mut requests, reason).await
    }

    async fn user(&self, id: &str) -> SourceResult<Option<SourceUser>> {
        self.validate()?;
        let mut requests = 0;
        self.read_user(id, &mut requests).await
    }

    async fn check(&self) -> SourceResult<CheckReport> {
        self.validate()?;
        let mut requests = 0;
        let token = self.token(&mut requests).await?;
        let claims = jwt_claims(&token);
        let roles: Vec<&str> = claims
            .get("roles")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let has = |ok: &[&str]| roles.iter().any(|r| ok.contains(r));
        let mut identity = format!(
            "application {} in tenant {}",
            str_of(&claims, "appid").unwrap_or(&self.opts.client_id),
            str_of(&claims, "tid").unwrap_or(&self.opts.tenant_id)
        );
        if let Some(name) = str_of(&claims, "app_displayname") {
            identity = format!("{identity} ({name})");
        }
        let permissions = vec![
            ("User.Read.All".to_string(), has(&USER_READ)),
            ("GroupMember.Read.All".to_string(), has(&MEMBER_READ)),
        ];
        let mut groups = Vec::new();
        for id in self.scope() {
            let (name, count) = self.check_group(&id, &mut requests).await;
            groups.push((id, name, count));
        }
        Ok(CheckReport {
            identity,
            permissions,
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(graph_url: &str) -> GraphSource {
        let _ = rustls::crypto::ring::default_provider().install_default();
        GraphSource::new(GraphOptions {
            tenant_id: "t".into(),
            client_id: "c".into(),
            credential: GraphCredential::Secret(SecretFile::new("/nonexistent")),
            graph_url: graph_url.into(),
            authority_url: DEFAULT_AUTHORITY_URL.into(),
            groups: vec!["b".into(), " a ".into(), "b".into()],
            user_name_attribute: "userPrincipalName".into(),
        })
    }

    #[test]
    fn urls_encode_odata_queries_and_keep_the_base_path() {
        let s = source("https://graph.microsoft.com/");
        assert_eq!(s.scope(), vec!["a".to_string(), "b".to_string()]);
        assert_eq!(
            s.groups_delta_url(&["a".into(), "o'k".into()]).unwrap(),
            "https://graph.microsoft.com/v1.0/groups/delta?%24filter=id%20eq%20%27a%27%20or%20id%20eq%20%27o%27%27k%27&%24select=displayName%2Cmembers"
        );
        let proxied = source("http://proxy.example:8080/graph");
        assert_eq!(
            proxied.url(&["users", "x/y"], &[]).unwrap(),
            "http://proxy.example:8080/graph/v1.0/users/x%2Fy"
        );
    }

    #[test]
    fn links_must_stay_on_the_graph_origin() {
        let s = source(DEFAULT_GRAPH_URL);
        assert!(
            s.own_link(
                "https://graph.microsoft.com:443/v1.0/users/delta?$skiptoken=x",
                "t"
            )
            .is_ok()
        );
        assert!(
            s.own_link("https://evil.example/v1.0/users/delta", "t")
                .is_err()
        );
        assert!(
            s.own_link("http://graph.microsoft.com/v1.0/users/delta", "t")
                .is_err()
        );
    }

    #[test]
    fn claims_are_read_from_the_token_payload() {
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"roles":["Group.Read.All"],"tid":"t"}"#);
        let claims = jwt_claims(&format!("e30.{payload}.sig"));
        assert_eq!(claims["roles"][0], "Group.Read.All");
        assert_eq!(jwt_claims("not a jwt"), Value::Null);
    }
}
