//! The HTTP client: configuration, transport, and one method per TeamCity call.
//!
//! Every call sends `Authorization: Bearer`, `Accept: application/json` (or
//! `text/plain` for TeamCity's single-value endpoints, which answer 406
//! otherwise), waits for a concurrency permit and the optional rate limit,
//! and logs one line with a request id, the operation name, the status and the
//! duration. URLs, bodies, tokens, passwords and emails are never logged.
//!
//! This module must not retry or sleep on errors: it returns a classified
//! [`TeamCityError`] and the caller decides.

use std::fmt;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng as _;
use rand::distr::Alphanumeric;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use reqwest::{Method, StatusCode, Url};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, Semaphore};

use crate::error::{ErrorBody, TLS, TeamCityError, is_tls_failure};
use crate::locator::Locator;
use crate::model::{
    Group, Groups, Project, Projects, Properties, Property, RoleAssignment, RoleAssignments,
    RoleDefinition, RoleDefinitions, Scope, ServerInfo, TokenInfo, Tokens, User, Users,
};

/// A TeamCity access token. Its `Debug` and `Display` never show the value.
#[derive(Clone)]
pub struct Token(String);

impl Token {
    /// Wraps a token value.
    pub fn new(value: impl Into<String>) -> Self {
        Token(value.into())
    }

    /// The secret value, for building the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// How to reach TeamCity and how hard to push it.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Server root, with or without a context path: `https://tc.example.com`
    /// or `https://example.com/teamcity`. `/app/rest` is appended.
    pub base_url: String,
    /// Access token of the bridge's TeamCity account.
    pub token: Token,
    /// TCP + TLS connect timeout.
    pub connect_timeout: Duration,
    /// Whole-request timeout, body included.
    pub request_timeout: Duration,
    /// Most requests in flight at once (also the idle pool size).
    pub max_concurrency: usize,
    /// Optional steady request rate limit (requests per second, no bursts).
    pub requests_per_second: Option<NonZeroU32>,
    /// Extra trusted CA certificates (PEM, one or more), added to the platform's trust store —
    /// for a TeamCity behind a private CA. Certificates are always verified.
    pub ca_pem: Option<Vec<u8>>,
}

impl ClientConfig {
    /// A config with defaults: 5 s connect, 30 s request, 8 concurrent, no rate limit.
    pub fn new(base_url: impl Into<String>, token: Token) -> Self {
        ClientConfig {
            base_url: base_url.into(),
            token,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_concurrency: 8,
            requests_per_second: None,
            ca_pem: None,
        }
    }
}

/// A user to create. The client always adds a random password, because newer
/// servers reject users without one.
#[derive(Debug, Clone, Default)]
pub struct NewUser {
    /// Username (TeamCity lower-cases it).
    pub username: String,
    /// Display name.
    pub name: Option<String>,
    /// Email.
    pub email: Option<String>,
    /// Properties to set in the same call (e.g. the managed marker).
    pub properties: Vec<(String, String)>,
    /// Keys of existing groups the user joins in the same call (TeamCity applies them right
    /// after creating the user; a failure there answers 400 but the user exists).
    pub groups: Vec<String>,
}

/// Fields to change on a user; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct UserUpdate {
    /// New username.
    pub username: Option<String>,
    /// New display name.
    pub name: Option<String>,
    /// New email.
    pub email: Option<String>,
}

/// A single user field addressable as `/users/{u}/{field}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UserField {
    /// `username` (cannot be cleared).
    Username,
    /// `name`.
    Name,
    /// `email`.
    Email,
}

impl UserField {
    fn as_str(self) -> &'static str {
        match self {
            UserField::Username => "username",
            UserField::Name => "name",
            UserField::Email => "email",
        }
    }
}

/// A group to create, with its roles and members in the same call.
#[derive(Debug, Clone, Default)]
pub struct NewGroup {
    /// Group key (immutable).
    pub key: String,
    /// Display name (unique in TeamCity).
    pub name: String,
    /// Description.
    pub description: Option<String>,
    /// Roles granted to the group.
    pub roles: Vec<(String, Scope)>,
    /// Member user ids.
    pub members: Vec<u64>,
    /// Group properties (e.g. the managed marker).
    pub properties: Vec<(String, String)>,
}

/// Fields requested when listing users page by page, if the caller has no opinion.
pub const DEFAULT_USER_FIELDS: &str =
    "count,user(id,username,name,email,properties(property(name,value)))";

/// A cheap-to-clone TeamCity REST client.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    http: reqwest::Client,
    rest_root: Url,
    auth: HeaderValue,
    permits: Semaphore,
    max_concurrency: usize,
    pacer: Option<Pacer>,
}

#[derive(Debug)]
struct Pacer {
    interval: Duration,
    next: Mutex<Instant>,
}

impl Pacer {
    async fn wait(&self) {
        let slot = {
            let mut next = self.next.lock().await;
            let now = Instant::now();
            let slot = (*next).max(now);
            *next = slot + self.interval;
            slot
        };
        tokio::time::sleep_until(slot.into()).await;
    }
}

enum Body {
    Empty,
    Json(Vec<u8>),
    Text(String),
}

#[derive(Clone, Copy)]
enum Want {
    Json,
    Text,
    Nothing,
}

#[derive(Serialize)]
struct CreateUserBody<'a> {
    username: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    password: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Properties>,
    #[serde(skip_serializing_if = "Option::is_none")]
    groups: Option<GroupRefs<'a>>,
}

#[derive(Serialize)]
struct UpdateUserBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    username: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
}

#[derive(Serialize)]
struct GroupRef<'a> {
    key: &'a str,
}

#[derive(Serialize)]
struct GroupRefs<'a> {
    group: Vec<GroupRef<'a>>,
}

#[derive(Serialize)]
struct UserRef {
    id: u64,
}

#[derive(Serialize)]
struct UserRefs {
    user: Vec<UserRef>,
}

#[derive(Serialize)]
struct CreateGroupBody<'a> {
    key: &'a str,
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    roles: Option<RoleAssignments>,
    #[serde(skip_serializing_if = "Option::is_none")]
    users: Option<UserRefs>,
    #[serde(skip_serializing_if = "Option::is_none")]
    properties: Option<Properties>,
}

fn properties(pairs: &[(String, String)]) -> Option<Properties> {
    (!pairs.is_empty()).then(|| Properties {
        count: None,
        property: pairs
            .iter()
            .map(|(name, value)| Property {
                name: name.clone(),
                value: value.clone(),
            })
            .collect(),
    })
}

fn random_password() -> String {
    rand::rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect()
}

/// The `Content-Type` of an answer when it is an HTML page.
fn html_content_type(resp: &reqwest::Response) -> Option<String> {
    let value = resp.headers().get(CONTENT_TYPE)?.to_str().ok()?;
    let mime = value.split(';').next().unwrap_or("").trim();
    (mime.eq_ignore_ascii_case("text/html") || mime.eq_ignore_ascii_case("application/xhtml+xml"))
        .then(|| value.to_owned())
}

/// Role ids and project external ids go into path segments unescaped by
/// TeamCity's rules, so only the characters TeamCity itself allows pass.
fn check_identifier(what: &str, value: &str) -> Result<(), TeamCityError> {
    let ok = !value.is_empty()
        && value.len() <= 255
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(TeamCityError::InvalidInput(format!(
            "{what} must be 1-255 of [A-Za-z0-9_]"
        )))
    }
}

fn check_scope(scope: &Scope) -> Result<(), TeamCityError> {
    match scope {
        Scope::Global => Ok(()),
        Scope::Project(id) => check_identifier("project id", id),
    }
}

/// What [`Client::create_user`] asks TeamCity to answer with.
const CREATED_USER_FIELDS: &str = "id,username,name,email,properties(property(name,value))";
/// What [`Client::create_group`] asks TeamCity to answer with.
const CREATED_GROUP_FIELDS: &str = "key,name,description,properties(property(name,value))";

impl Client {
    /// Builds a client. Call [`crate::install_crypto_provider`] first.
    pub fn new(config: ClientConfig) -> Result<Client, TeamCityError> {
        let mut root = Url::parse(&config.base_url)
            .map_err(|e| TeamCityError::Config(format!("base URL: {e}")))?;
        if root.cannot_be_a_base() || !matches!(root.scheme(), "http" | "https") {
            return Err(TeamCityError::Config("base URL must be http(s)".into()));
        }
        root.set_query(None);
        root.set_fragment(None);
        root.path_segments_mut()
            .map_err(|()| TeamCityError::Config("base URL cannot have a path".into()))?
            .pop_if_empty()
            .extend(["app", "rest"]);
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", config.token.expose()))
            .map_err(|_| TeamCityError::Config("token contains invalid characters".into()))?;
        auth.set_sensitive(true);
        let max = config.max_concurrency.max(1);
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| {
                TeamCityError::Config(format!("CA file: not PEM certificates: {e}"))
            })?;
            if certs.is_empty() {
                return Err(TeamCityError::Config(
                    "CA file: no certificate in it".into(),
                ));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(max)
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| TeamCityError::Config(e.to_string()))?;
        let pacer = config.requests_per_second.map(|rps| Pacer {
            interval: Duration::from_secs_f64(1.0 / f64::from(rps.get())),
            next: Mutex::new(Instant::now()),
        });
        Ok(Client {
            inner: Arc::new(Inner {
                http,
                rest_root: root,
                auth,
                permits: Semaphore::new(max),
                max_concurrency: max,
                pacer,
            }),
        })
    }

    /// Most requests this client keeps in flight at once ([`ClientConfig::max_concurrency`],
    /// at least 1). Callers that fan out use it to size their own concurrency.
    pub fn max_concurrency(&self) -> usize {
        self.inner.max_concurrency
    }

    fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.inner.rest_root.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.extend(segments);
        }
        url
    }

    async fn send(
        &self,
        op: &'static str,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Body,
        want: Want,
    ) -> Result<reqwest::Response, TeamCityError> {
        let _permit = self
            .inner
            .permits
            .acquire()
            .await
            .map_err(|_| TeamCityError::Config("client semaphore closed".into()))?;
        if let Some(pacer) = &self.inner.pacer {
            pacer.wait().await;
        }
        let request_id = uuid::Uuid::now_v7();
        let mut url = self.url(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        let mut req = self
            .inner
            .http
            .request(method.clone(), url)
            .header(AUTHORIZATION, self.inner.auth.clone())
            .header("X-Request-Id", request_id.to_string());
        req = match want {
            Want::Json => req.header(ACCEPT, "application/json"),
            Want::Text => req.header(ACCEPT, "text/plain"),
            Want::Nothing => req,
        };
        req = match body {
            Body::Empty => req,
            Body::Json(bytes) => req.header(CONTENT_TYPE, "application/json").body(bytes),
            Body::Text(text) => req
                .header(CONTENT_TYPE, "text/plain; charset=UTF-8")
                .body(text),
        };
        let started = Instant::now();
        let result = req.send().await;
        let elapsed = started.elapsed();
        let duration_ms = elapsed.as_millis() as u64;
        // Bounded labels: the operation is one of the client's own names, the outcome a class.
        let outcome = match &result {
            Ok(r) if r.status().is_success() => "success",
            Ok(r) if r.status().is_server_error() => "server_error",
            Ok(_) => "client_error",
            Err(_) => "transport",
        };
        metrics::histogram!(
            "teamcity_scim_teamcity_request_duration_seconds",
            "operation" => op,
            "outcome" => outcome
        )
        .record(elapsed.as_secs_f64());
        match result {
            Ok(resp) if resp.status().is_success() => {
                tracing::debug!(%request_id, op, %method, status = resp.status().as_u16(), duration_ms, "teamcity call");
                // TeamCity never answers a REST call with HTML: a login page or a proxy did.
                if let Some(content_type) = html_content_type(&resp) {
                    tracing::warn!(%request_id, op, %method, status = resp.status().as_u16(),
                        content_type, "teamcity call answered with an HTML page");
                    return Err(TeamCityError::NotJson { content_type });
                }
                Ok(resp)
            }
            Ok(resp) => {
                let status = resp.status();
                let retry_after = resp
                    .headers()
                    .get(RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs);
                let text = resp.text().await.unwrap_or_default();
                let body = ErrorBody::parse(&text);
                tracing::info!(%request_id, op, %method, status = status.as_u16(), duration_ms,
                    exception = body.exception.as_deref().unwrap_or(""), "teamcity call failed");
                Err(TeamCityError::Status {
                    status: status.as_u16(),
                    body: Box::new(body),
                    retry_after,
                })
            }
            Err(source) => {
                let what = if is_tls_failure(&source) {
                    TLS
                } else if source.is_timeout() {
                    "timeout"
                } else if source.is_connect() {
                    "connect"
                } else {
                    "io"
                };
                tracing::info!(%request_id, op, %method, duration_ms, what, "teamcity call did not complete");
                Err(TeamCityError::Transport { what, source })
            }
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        op: &'static str,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Body,
    ) -> Result<T, TeamCityError> {
        let resp = self
            .send(op, method, segments, query, body, Want::Json)
            .await?;
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| TeamCityError::Transport {
                what: if source.is_timeout() { "timeout" } else { "io" },
                source,
            })?;
        if bytes.trim_ascii_start().starts_with(b"<") {
            return Err(TeamCityError::NotJson {
                content_type: content_type.unwrap_or_else(|| "no content type".to_owned()),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| TeamCityError::Decode(format!("{op}: {e}")))
    }

    async fn text(
        &self,
        op: &'static str,
        method: Method,
        segments: &[&str],
        body: Body,
    ) -> Result<String, TeamCityError> {
        let resp = self
            .send(op, method, segments, &[], body, Want::Text)
            .await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(String::new());
        }
        resp.text()
            .await
            .map_err(|source| TeamCityError::Transport { what: "io", source })
    }

    async fn nothing(
        &self,
        op: &'static str,
        method: Method,
        segments: &[&str],
        body: Body,
        want: Want,
    ) -> Result<(), TeamCityError> {
        self.nothing_with(op, method, segments, &[], body, want)
            .await
    }

    /// [`Client::nothing`] with query parameters (e.g. a small `fields=` for the answer).
    async fn nothing_with(
        &self,
        op: &'static str,
        method: Method,
        segments: &[&str],
        query: &[(&str, &str)],
        body: Body,
        want: Want,
    ) -> Result<(), TeamCityError> {
        let resp = self.send(op, method, segments, query, body, want).await?;
        // Drain so the connection goes back to the pool.
        let _ = resp.bytes().await;
        Ok(())
    }

    fn encode<T: Serialize>(value: &T) -> Result<Body, TeamCityError> {
        serde_json::to_vec(value)
            .map(Body::Json)
            .map_err(|e| TeamCityError::InvalidInput(e.to_string()))
    }

    fn fields_query(fields: Option<&str>) -> Vec<(&str, &str)> {
        fields.map(|f| vec![("fields", f)]).unwrap_or_default()
    }

    // ---- server ---------------------------------------------------------

    /// `GET /app/rest/server`: version and node info; also a cheap liveness probe.
    pub async fn server_info(&self) -> Result<ServerInfo, TeamCityError> {
        self.json("server_info", Method::GET, &["server"], &[], Body::Empty)
            .await
    }

    // ---- users ----------------------------------------------------------

    /// `GET /app/rest/users?locator=..&fields=..`: one page of users matching `locator`.
    pub async fn list_users(
        &self,
        locator: &Locator,
        fields: Option<&str>,
    ) -> Result<Users, TeamCityError> {
        let mut query = Self::fields_query(fields);
        if !locator.is_empty() {
            query.push(("locator", locator.as_str()));
        }
        self.json("list_users", Method::GET, &["users"], &query, Body::Empty)
            .await
    }

    /// Reads all users in pages of `page_size` (`count:`/`start:`), with `fields`
    /// limited as given (e.g. [`DEFAULT_USER_FIELDS`]).
    pub async fn list_all_users(
        &self,
        page_size: u64,
        fields: &str,
    ) -> Result<Vec<User>, TeamCityError> {
        let page_size = page_size.max(1);
        let mut all = Vec::new();
        let mut start = 0;
        loop {
            let locator = Locator::new().count(page_size).start(start);
            let page = self.list_users(&locator, Some(fields)).await?;
            let got = page.user.len() as u64;
            all.extend(page.user);
            if got < page_size {
                return Ok(all);
            }
            start += got;
        }
    }

    /// `GET /app/rest/users/{locator}`: exactly one user; 404 when none (TeamCity
    /// masks every lookup failure on this path as "User not found").
    pub async fn get_user(
        &self,
        user: &Locator,
        fields: Option<&str>,
    ) -> Result<User, TeamCityError> {
        let query = Self::fields_query(fields);
        self.json(
            "get_user",
            Method::GET,
            &["users", user.as_str()],
            &query,
            Body::Empty,
        )
        .await
    }

    /// Like [`Client::get_user`] but `Ok(None)` on 404.
    pub async fn find_user(
        &self,
        user: &Locator,
        fields: Option<&str>,
    ) -> Result<Option<User>, TeamCityError> {
        match self.get_user(user, fields).await {
            Ok(u) => Ok(Some(u)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /app/rest/users` with a random password; answers the new user's id, username,
    /// name, email and properties. A duplicate username is [`crate::ErrorKind::Conflict`].
    pub async fn create_user(&self, user: &NewUser) -> Result<User, TeamCityError> {
        let body = CreateUserBody {
            username: &user.username,
            name: user.name.as_deref(),
            email: user.email.as_deref(),
            password: random_password(),
            properties: properties(&user.properties),
            groups: (!user.groups.is_empty()).then(|| GroupRefs {
                group: user.groups.iter().map(|key| GroupRef { key }).collect(),
            }),
        };
        // `fields=` keeps the answer to what a caller needs: by default TeamCity renders the
        // user's groups and roles too.
        self.json(
            "create_user",
            Method::POST,
            &["users"],
            &[("fields", CREATED_USER_FIELDS)],
            Self::encode(&body)?,
        )
        .await
    }

    /// `PUT /app/rest/users/{locator}` with only the given fields: a partial update.
    /// Renaming onto an existing username is [`crate::ErrorKind::Conflict`].
    pub async fn update_user(
        &self,
        user: &Locator,
        update: &UserUpdate,
    ) -> Result<User, TeamCityError> {
        let body = UpdateUserBody {
            username: update.username.as_deref(),
            name: update.name.as_deref(),
            email: update.email.as_deref(),
        };
        self.json(
            "update_user",
            Method::PUT,
            &["users", user.as_str()],
            &[],
            Self::encode(&body)?,
        )
        .await
    }

    /// `PUT /app/rest/users/{u}/{field}` (text) to set, or `DELETE` to clear
    /// (`Username` cannot be cleared).
    pub async fn set_user_field(
        &self,
        user: &Locator,
        field: UserField,
        value: Option<&str>,
    ) -> Result<(), TeamCityError> {
        let segments = ["users", user.as_str(), field.as_str()];
        match value {
            Some(v) => self
                .text(
                    "set_user_field",
                    Method::PUT,
                    &segments,
                    Body::Text(v.to_owned()),
                )
                .await
                .map(drop),
            None if field == UserField::Username => Err(TeamCityError::InvalidInput(
                "username cannot be cleared".into(),
            )),
            None => {
                self.nothing(
                    "clear_user_field",
                    Method::DELETE,
                    &segments,
                    Body::Empty,
                    Want::Nothing,
                )
                .await
            }
        }
    }

    /// `PUT /app/rest/users/{u}/password` (text/plain) → 204. The password is
    /// never logged.
    pub async fn set_user_password(
        &self,
        user: &Locator,
        password: &str,
    ) -> Result<(), TeamCityError> {
        if password.is_empty() {
            return Err(TeamCityError::InvalidInput(
                "password must not be empty".into(),
            ));
        }
        let segments = ["users", user.as_str(), "password"];
        self.text(
            "set_user_password",
            Method::PUT,
            &segments,
            Body::Text(password.to_owned()),
        )
        .await
        .map(drop)
    }

    /// Sets a long random password nobody knows (deactivation: TeamCity has no
    /// "disabled" flag, so this locks out password logins).
    pub async fn randomize_password(&self, user: &Locator) -> Result<(), TeamCityError> {
        self.set_user_password(user, &random_password()).await
    }

    /// `PUT /app/rest/users/{u}/properties/{name}` (text).
    pub async fn set_user_property(
        &self,
        user: &Locator,
        name: &str,
        value: &str,
    ) -> Result<(), TeamCityError> {
        let segments = ["users", user.as_str(), "properties", name];
        self.text(
            "set_user_property",
            Method::PUT,
            &segments,
            Body::Text(value.to_owned()),
        )
        .await
        .map(drop)
    }

    /// `DELETE /app/rest/users/{u}/properties/{name}` (no error when absent).
    pub async fn delete_user_property(
        &self,
        user: &Locator,
        name: &str,
    ) -> Result<(), TeamCityError> {
        let segments = ["users", user.as_str(), "properties", name];
        self.nothing(
            "delete_user_property",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    /// `POST /app/rest/users/{u}/logout`: ends every session of the user ("Terminate all
    /// current sessions of the matching user"). Any 2xx is success; the body is ignored.
    /// Servers without the endpoint (it is not in the 2024.03 REST plugin source) answer
    /// 404, which comes back as [`crate::ErrorKind::NotFound`] like an unknown user (a
    /// Jersey server might answer 405 instead: unconfirmed). A caller that needs to tell
    /// "no such endpoint" from "no such user" should check the user exists first.
    pub async fn logout_user(&self, user: &Locator) -> Result<(), TeamCityError> {
        let segments = ["users", user.as_str(), "logout"];
        self.nothing(
            "logout_user",
            Method::POST,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    /// `DELETE /app/rest/users/{u}/debug/rememberMe` (204): drops the user's "remember me"
    /// logins, so a browser cookie cannot sign the user back in. TeamCity marks the
    /// endpoint experimental; it produces `text/plain`, so no JSON `Accept` is sent.
    pub async fn delete_remember_me(&self, user: &Locator) -> Result<(), TeamCityError> {
        let segments = ["users", user.as_str(), "debug", "rememberMe"];
        self.nothing(
            "delete_remember_me",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    /// `DELETE /app/rest/users/{u}`.
    pub async fn delete_user(&self, user: &Locator) -> Result<(), TeamCityError> {
        self.nothing(
            "delete_user",
            Method::DELETE,
            &["users", user.as_str()],
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    // ---- groups ---------------------------------------------------------

    /// `GET /app/rest/userGroups?fields=..`: all groups (TeamCity takes no locator
    /// here). Ask for members with e.g. `group(key,name,users(user(id)))`.
    pub async fn list_groups(&self, fields: Option<&str>) -> Result<Groups, TeamCityError> {
        let query = Self::fields_query(fields);
        self.json(
            "list_groups",
            Method::GET,
            &["userGroups"],
            &query,
            Body::Empty,
        )
        .await
    }

    /// `GET /app/rest/userGroups/{locator}`.
    pub async fn get_group(
        &self,
        group: &Locator,
        fields: Option<&str>,
    ) -> Result<Group, TeamCityError> {
        let query = Self::fields_query(fields);
        self.json(
            "get_group",
            Method::GET,
            &["userGroups", group.as_str()],
            &query,
            Body::Empty,
        )
        .await
    }

    /// Like [`Client::get_group`] but `Ok(None)` on 404.
    pub async fn find_group(
        &self,
        group: &Locator,
        fields: Option<&str>,
    ) -> Result<Option<Group>, TeamCityError> {
        match self.get_group(group, fields).await {
            Ok(g) => Ok(Some(g)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `POST /app/rest/userGroups` with key, name, description, roles, members and
    /// properties in one call; answers the key, name, description and properties (not the
    /// members). TeamCity deletes the group again if any part fails.
    pub async fn create_group(&self, group: &NewGroup) -> Result<Group, TeamCityError> {
        for (role, scope) in &group.roles {
            check_identifier("role id", role)?;
            check_scope(scope)?;
        }
        let body = CreateGroupBody {
            key: &group.key,
            name: &group.name,
            description: group.description.as_deref(),
            roles: (!group.roles.is_empty()).then(|| RoleAssignments {
                role: group
                    .roles
                    .iter()
                    .map(|(r, s)| RoleAssignment::new(r.clone(), s))
                    .collect(),
            }),
            users: (!group.members.is_empty()).then(|| UserRefs {
                user: group.members.iter().map(|&id| UserRef { id }).collect(),
            }),
            properties: properties(&group.properties),
        };
        // Without `fields=` TeamCity renders every member of the new group in the answer.
        self.json(
            "create_group",
            Method::POST,
            &["userGroups"],
            &[("fields", CREATED_GROUP_FIELDS)],
            Self::encode(&body)?,
        )
        .await
    }

    /// `PUT /app/rest/userGroups/{g}/properties/{name}` (text).
    pub async fn set_group_property(
        &self,
        group: &Locator,
        name: &str,
        value: &str,
    ) -> Result<(), TeamCityError> {
        let segments = ["userGroups", group.as_str(), "properties", name];
        self.text(
            "set_group_property",
            Method::PUT,
            &segments,
            Body::Text(value.to_owned()),
        )
        .await
        .map(drop)
    }

    /// `DELETE /app/rest/userGroups/{g}/properties/{name}`.
    pub async fn delete_group_property(
        &self,
        group: &Locator,
        name: &str,
    ) -> Result<(), TeamCityError> {
        let segments = ["userGroups", group.as_str(), "properties", name];
        self.nothing(
            "delete_group_property",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    /// `DELETE /app/rest/userGroups/{g}` (members stay; only the group goes).
    pub async fn delete_group(&self, group: &Locator) -> Result<(), TeamCityError> {
        let segments = ["userGroups", group.as_str()];
        self.nothing(
            "delete_group",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    // ---- membership -----------------------------------------------------

    /// `POST /app/rest/users/{u}/groups {"key":K}`: adds; a no-op when already a member.
    pub async fn add_user_to_group(&self, user: &Locator, key: &str) -> Result<(), TeamCityError> {
        let segments = ["users", user.as_str(), "groups"];
        let body = Self::encode(&GroupRef { key })?;
        // Without `fields=` the answer lists every member of the group.
        self.nothing_with(
            "add_member",
            Method::POST,
            &segments,
            &[("fields", "key")],
            body,
            Want::Json,
        )
        .await
    }

    /// `DELETE /app/rest/users/{u}/groups/key:(..)`: 404 when not a member.
    pub async fn remove_user_from_group(
        &self,
        user: &Locator,
        key: &str,
    ) -> Result<(), TeamCityError> {
        let group = Locator::by_key(key);
        let segments = ["users", user.as_str(), "groups", group.as_str()];
        self.nothing(
            "remove_member",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    /// `PUT /app/rest/users/{u}/groups`: replaces direct membership (TeamCity keeps
    /// `ALL_USERS_GROUP`). Returns the resulting groups.
    pub async fn set_user_groups(
        &self,
        user: &Locator,
        keys: &[&str],
    ) -> Result<Groups, TeamCityError> {
        let body = GroupRefs {
            group: keys.iter().map(|key| GroupRef { key }).collect(),
        };
        let segments = ["users", user.as_str(), "groups"];
        // Without `fields=` each group in the answer lists all its members.
        self.json(
            "set_user_groups",
            Method::PUT,
            &segments,
            &[("fields", "count,group(key,name)")],
            Self::encode(&body)?,
        )
        .await
    }

    /// `GET /app/rest/users/{u}/groups`.
    pub async fn user_groups(&self, user: &Locator) -> Result<Groups, TeamCityError> {
        let segments = ["users", user.as_str(), "groups"];
        self.json("user_groups", Method::GET, &segments, &[], Body::Empty)
            .await
    }

    // ---- roles ----------------------------------------------------------

    /// `GET /app/rest/roles`: the roles this server defines.
    pub async fn list_roles(&self) -> Result<Vec<RoleDefinition>, TeamCityError> {
        let roles: RoleDefinitions = self
            .json("list_roles", Method::GET, &["roles"], &[], Body::Empty)
            .await?;
        Ok(roles.role)
    }

    /// `GET /app/rest/users/{u}/roles`: direct assignments only.
    pub async fn user_roles(&self, user: &Locator) -> Result<Vec<RoleAssignment>, TeamCityError> {
        let segments = ["users", user.as_str(), "roles"];
        let roles: RoleAssignments = self
            .json("user_roles", Method::GET, &segments, &[], Body::Empty)
            .await?;
        Ok(roles.role)
    }

    /// `PUT /app/rest/users/{u}/roles/{role}/{scope}`: grants (no-op when present).
    pub async fn add_user_role(
        &self,
        user: &Locator,
        role_id: &str,
        scope: &Scope,
    ) -> Result<(), TeamCityError> {
        check_identifier("role id", role_id)?;
        check_scope(scope)?;
        let scope = scope.to_string();
        let segments = ["users", user.as_str(), "roles", role_id, &scope];
        self.nothing(
            "add_user_role",
            Method::PUT,
            &segments,
            Body::Empty,
            Want::Json,
        )
        .await
    }

    /// `DELETE /app/rest/users/{u}/roles/{role}/{scope}`.
    pub async fn remove_user_role(
        &self,
        user: &Locator,
        role_id: &str,
        scope: &Scope,
    ) -> Result<(), TeamCityError> {
        check_identifier("role id", role_id)?;
        check_scope(scope)?;
        let scope = scope.to_string();
        let segments = ["users", user.as_str(), "roles", role_id, &scope];
        self.nothing(
            "remove_user_role",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    /// `GET /app/rest/userGroups/{g}/roles`.
    pub async fn group_roles(&self, group: &Locator) -> Result<Vec<RoleAssignment>, TeamCityError> {
        let segments = ["userGroups", group.as_str(), "roles"];
        let roles: RoleAssignments = self
            .json("group_roles", Method::GET, &segments, &[], Body::Empty)
            .await?;
        Ok(roles.role)
    }

    /// `POST /app/rest/userGroups/{g}/roles/{role}/{scope}` (POST for groups, not PUT).
    pub async fn add_group_role(
        &self,
        group: &Locator,
        role_id: &str,
        scope: &Scope,
    ) -> Result<(), TeamCityError> {
        check_identifier("role id", role_id)?;
        check_scope(scope)?;
        let scope = scope.to_string();
        let segments = ["userGroups", group.as_str(), "roles", role_id, &scope];
        self.nothing(
            "add_group_role",
            Method::POST,
            &segments,
            Body::Empty,
            Want::Json,
        )
        .await
    }

    /// `DELETE /app/rest/userGroups/{g}/roles/{role}/{scope}`.
    pub async fn remove_group_role(
        &self,
        group: &Locator,
        role_id: &str,
        scope: &Scope,
    ) -> Result<(), TeamCityError> {
        check_identifier("role id", role_id)?;
        check_scope(scope)?;
        let scope = scope.to_string();
        let segments = ["userGroups", group.as_str(), "roles", role_id, &scope];
        self.nothing(
            "remove_group_role",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    // ---- tokens ---------------------------------------------------------

    /// `GET /app/rest/users/{u}/tokens` with names and times (never values).
    pub async fn list_tokens(&self, user: &Locator) -> Result<Vec<TokenInfo>, TeamCityError> {
        let segments = ["users", user.as_str(), "tokens"];
        let query = [("fields", "count,token(name,creationTime,expirationTime)")];
        let tokens: Tokens = self
            .json("list_tokens", Method::GET, &segments, &query, Body::Empty)
            .await?;
        Ok(tokens.token)
    }

    /// `DELETE /app/rest/users/{u}/tokens/{name}` (the name is taken literally).
    /// A name containing `/` cannot be addressed through a path and is refused.
    pub async fn delete_token(&self, user: &Locator, name: &str) -> Result<(), TeamCityError> {
        if name.contains('/') {
            return Err(TeamCityError::InvalidInput(
                "a token name containing '/' cannot be addressed".into(),
            ));
        }
        let segments = ["users", user.as_str(), "tokens", name];
        self.nothing(
            "delete_token",
            Method::DELETE,
            &segments,
            Body::Empty,
            Want::Nothing,
        )
        .await
    }

    /// Deletes every token of the user; returns the names of the tokens deleted, in
    /// TeamCity's listing order. A token that vanished meanwhile (404) counts as deleted.
    /// On another error the tokens before it are already gone.
    pub async fn revoke_all_tokens(&self, user: &Locator) -> Result<Vec<String>, TeamCityError> {
        let tokens = self.list_tokens(user).await?;
        let mut deleted = Vec::with_capacity(tokens.len());
        for token in tokens {
            match self.delete_token(user, &token.name).await {
                Ok(()) => deleted.push(token.name),
                Err(e) if e.is_not_found() => deleted.push(token.name),
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    // ---- projects -------------------------------------------------------

    /// `GET /app/rest/projects?fields=project(id,name,parentProjectId)`.
    pub async fn list_projects(&self) -> Result<Vec<Project>, TeamCityError> {
        let query = [("fields", "count,project(id,name,parentProjectId)")];
        let projects: Projects = self
            .json(
                "list_projects",
                Method::GET,
                &["projects"],
                &query,
                Body::Empty,
            )
            .await?;
        Ok(projects.project)
    }

    /// True when a project with this external id exists (to validate a `p:` scope).
    pub async fn project_exists(&self, external_id: &str) -> Result<bool, TeamCityError> {
        check_identifier("project id", external_id)?;
        let locator = Locator::new().value("id", external_id);
        let query = [("fields", "id")];
        let segments = ["projects", locator.as_str()];
        match self
            .json::<Project>("get_project", Method::GET, &segments, &query, Body::Empty)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_debug_is_redacted() {
        let config = ClientConfig::new("http://x", Token::new("s3cret"));
        assert!(!format!("{config:?}").contains("s3cret"));
    }

    #[test]
    fn urls_keep_context_path_and_escape_segments() {
        crate::install_crypto_provider();
        let cases = [
            ("http://h:1", "http://h:1/app/rest/users/a%2Fb"),
            ("http://h:1/", "http://h:1/app/rest/users/a%2Fb"),
            ("http://h:1/tc", "http://h:1/tc/app/rest/users/a%2Fb"),
            ("http://h:1/tc/", "http://h:1/tc/app/rest/users/a%2Fb"),
        ];
        for (base, want) in cases {
            let client = Client::new(ClientConfig::new(base, Token::new("t"))).expect("client");
            assert_eq!(client.url(&["users", "a/b"]).as_str(), want);
        }
    }

    #[test]
    fn rejects_bad_identifiers() {
        for bad in ["", "a b", "a/b", "p:x", "Ä"] {
            assert!(check_identifier("x", bad).is_err(), "{bad}");
        }
        assert!(check_identifier("x", "PROJECT_ADMIN").is_ok());
    }

    #[test]
    fn passwords_are_long_and_random() {
        let (a, b) = (random_password(), random_password());
        assert_eq!(a.len(), 40);
        assert_ne!(a, b);
    }
}
