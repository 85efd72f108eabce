//! An in-memory TeamCity REST server for tests, the demo and benchmarks.
//!
//! It serves TeamCity's own paths under `/app/rest` (optionally behind a
//! context path) with TeamCity's JSON shapes, status codes and `text/plain`
//! error bodies, as documented in `docs/teamcity-compat.md`. A separate
//! `/__emulator/` API (and the methods on [`Emulator`]) injects faults, reads
//! per-endpoint call counters and dumps the state.
//!
//! It must stay faithful where TeamCity is awkward (404 masking on user paths,
//! lower-cased usernames, 500 on duplicate renames) and strict where the
//! reference is unconfirmed. It knows nothing of SCIM.
//!
//! Who is calling: the configured `token` is the admin user; each read-only token
//! may only read; a token issued by `POST /app/rest/users/{u}/tokens` is its user
//! (`users/current` answers that user). Such a user may do everything when it holds
//! `SYSTEM_ADMIN` globally (directly or through a group); otherwise it may read
//! everything and write only its own tokens, sessions (`logout`) and remember-me
//! data, and any other write answers 403.

pub mod cli;
mod control;
mod errors;
mod fields;
pub mod locator;
mod rest;
mod state;
mod timer;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::extract::{MatchedPath, Request, State as AxState};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tower::ServiceExt as _;

pub use control::{Fault, FaultAction};
pub use state::{ALL_USERS_GROUP, GroupRec, ProjectRec, RoleRec, State, TokenRec, UserRec};

/// How to start an emulator.
#[derive(Debug, Clone, Default)]
pub struct EmulatorOptions {
    /// The bearer token that authenticates as `admin` (id 1, `SYSTEM_ADMIN`).
    pub token: String,
    /// Tokens that may only read: any POST/PUT/DELETE answers 403.
    pub read_only_tokens: Vec<String>,
    /// Project external ids to create under `_Root`.
    pub projects: Vec<String>,
    /// Usernames to create at startup.
    pub users: Vec<String>,
    /// Group keys to create at startup (name = key).
    pub groups: Vec<String>,
    /// Latency added to every `/app/rest` request.
    pub latency: Duration,
    /// A JSON seed file (see [`Seed`]).
    pub seed_file: Option<PathBuf>,
    /// Serve TeamCity under this context path, e.g. `/tc` (`/tc/app/rest/...`).
    pub context_path: Option<String>,
    /// Answer `POST /app/rest/users/{u}/logout` with 404, like a server older than the
    /// endpoint (see [`Emulator::set_logout_supported`]).
    pub logout_unsupported: bool,
}

/// Seed data, read from [`EmulatorOptions::seed_file`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Seed {
    /// Project external ids (parent `_Root`).
    #[serde(default)]
    pub projects: Vec<String>,
    /// Groups.
    #[serde(default)]
    pub groups: Vec<SeedGroup>,
    /// Users.
    #[serde(default)]
    pub users: Vec<SeedUser>,
}

/// A seeded group.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeedGroup {
    /// Key.
    pub key: String,
    /// Name (defaults to the key).
    #[serde(default)]
    pub name: Option<String>,
    /// Description.
    #[serde(default)]
    pub description: Option<String>,
    /// Roles as `(roleId, scope)`.
    #[serde(default)]
    pub roles: Vec<(String, String)>,
}

/// A seeded user.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct SeedUser {
    /// Username.
    pub username: String,
    /// Display name.
    #[serde(default)]
    pub name: Option<String>,
    /// Email.
    #[serde(default)]
    pub email: Option<String>,
    /// Properties.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// Group keys.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Roles as `(roleId, scope)`.
    #[serde(default)]
    pub roles: Vec<(String, String)>,
}

/// Errors starting an emulator.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    /// The seed file could not be read.
    #[error("cannot read seed file {path}: {source}")]
    SeedRead {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The seed file is not valid.
    #[error("invalid seed: {0}")]
    Seed(String),
    /// A state given to [`Emulator::restore`] is not consistent.
    #[error("invalid state: {0}")]
    InvalidState(String),
}

/// A cloneable handle over one emulated server.
#[derive(Debug, Clone)]
pub struct Emulator {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    opts: EmulatorOptions,
    state: Mutex<State>,
    faults: Mutex<Vec<Fault>>,
    counters: Mutex<BTreeMap<String, u64>>,
    started: String,
    logout_supported: AtomicBool,
}

tokio::task_local! {
    /// The user a request authenticated as with one of its own tokens.
    static CALLER: u64;
}

/// The user the current request authenticated as, when it used a user's own token
/// (`None` for the configured admin and read-only tokens, and outside a request).
pub(crate) fn caller() -> Option<u64> {
    CALLER.try_with(|c| *c).ok()
}

/// Lower-case hex SHA-256 of a token value, as kept in [`TokenRec::value_sha256`].
pub(crate) fn token_digest(value: &str) -> String {
    use sha2::Digest as _;
    sha2::Sha256::digest(value.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Marker extension: the serve loop drops the connection instead of answering.
#[derive(Debug, Clone, Copy)]
struct DropConnection;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Emulator {
    /// Creates an emulator with seeded state.
    pub fn new(opts: EmulatorOptions) -> Result<Self, EmulatorError> {
        let mut state = State::new(&opts.projects);
        let mut seed = Seed {
            projects: Vec::new(),
            groups: opts
                .groups
                .iter()
                .map(|k| SeedGroup {
                    key: k.clone(),
                    ..SeedGroup::default()
                })
                .collect(),
            users: opts
                .users
                .iter()
                .map(|u| SeedUser {
                    username: u.clone(),
                    ..SeedUser::default()
                })
                .collect(),
        };
        if let Some(path) = &opts.seed_file {
            let text = std::fs::read_to_string(path).map_err(|source| EmulatorError::SeedRead {
                path: path.clone(),
                source,
            })?;
            let file: Seed =
                serde_json::from_str(&text).map_err(|e| EmulatorError::Seed(e.to_string()))?;
            seed.projects.extend(file.projects);
            seed.groups.extend(file.groups);
            seed.users.extend(file.users);
        }
        apply_seed(&mut state, &seed)?;
        let now = time::OffsetDateTime::now_utc();
        let logout_supported = AtomicBool::new(!opts.logout_unsupported);
        Ok(Emulator {
            inner: Arc::new(Shared {
                logout_supported,
                opts,
                state: Mutex::new(state),
                faults: Mutex::new(Vec::new()),
                counters: Mutex::new(BTreeMap::new()),
                started: format!(
                    "{:04}{:02}{:02}T{:02}{:02}{:02}+0000",
                    now.year(),
                    u8::from(now.month()),
                    now.day(),
                    now.hour(),
                    now.minute(),
                    now.second()
                ),
            }),
        })
    }

    pub(crate) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.inner.state)
    }

    /// Runs `f` with mutable access to the state (for seeding large data sets in tests).
    pub fn with_state<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let mut s = self.state();
        let r = f(&mut s);
        // The closure may have inserted, renamed or removed users directly.
        s.reindex();
        r
    }

    /// Runs `f` with read access to the state: no copy and no re-index, so a benchmark can
    /// poll a large state every millisecond.
    pub fn read_state<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.state())
    }

    /// A copy of the whole state (passwords and token values are never stored; tokens
    /// keep a SHA-256 of their value).
    pub fn snapshot(&self) -> State {
        self.state().clone()
    }

    /// Replaces the whole state, id counters included, with `state` (e.g. an earlier
    /// [`Emulator::snapshot`]): what a TeamCity restored from a backup looks like to a
    /// running client. Tokens issued before the snapshot authenticate again. Faults,
    /// counters and settings are not part of the state and stay as they are.
    pub fn restore(&self, state: State) -> Result<(), EmulatorError> {
        state.validate().map_err(EmulatorError::InvalidState)?;
        let mut state = state;
        state.reindex();
        *self.state() = state;
        Ok(())
    }

    /// Whether `POST /app/rest/users/{u}/logout` exists (true unless
    /// [`EmulatorOptions::logout_unsupported`]); when false it answers 404 like a server
    /// older than the endpoint.
    pub fn set_logout_supported(&self, supported: bool) {
        self.inner
            .logout_supported
            .store(supported, Ordering::SeqCst);
    }

    /// See [`Emulator::set_logout_supported`].
    pub fn logout_supported(&self) -> bool {
        self.inner.logout_supported.load(Ordering::SeqCst)
    }

    /// Queues a fault for the next matching requests.
    pub fn inject_fault(&self, fault: Fault) {
        lock(&self.inner.faults).push(fault);
    }

    /// Removes all pending faults.
    pub fn clear_faults(&self) {
        lock(&self.inner.faults).clear();
    }

    /// Calls per endpoint, keyed `"<METHOD> <route template>"`, e.g.
    /// `"GET /app/rest/users/{u}"`.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        lock(&self.inner.counters).clone()
    }

    /// Total calls to TeamCity endpoints.
    pub fn total_calls(&self) -> u64 {
        lock(&self.inner.counters).values().sum()
    }

    /// Resets all counters.
    pub fn reset_counters(&self) {
        lock(&self.inner.counters).clear();
    }

    /// The router: TeamCity under `[context]/app/rest` and, identically, under
    /// `[context]/app/rest/latest`; the control API under `/__emulator`.
    pub fn router(&self) -> Router {
        let rest = rest::routes(self.clone())
            .route_layer(middleware::from_fn_with_state(self.clone(), per_call))
            .layer(middleware::from_fn_with_state(self.clone(), authenticate))
            .fallback(|| async { errors::TcError::no_such_url().into_response() })
            .method_not_allowed_fallback(|| async {
                errors::TcError::web(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "HTTP 405 Method Not Allowed",
                )
                .into_response()
            });
        let prefix = match self
            .inner
            .opts
            .context_path
            .as_deref()
            .map(|p| p.trim_end_matches('/'))
        {
            Some(p) if !p.is_empty() => format!(
                "{}/app/rest",
                if p.starts_with('/') {
                    p.to_owned()
                } else {
                    format!("/{p}")
                }
            ),
            _ => "/app/rest".to_owned(),
        };
        // TeamCity's `/app/rest/latest` alias is the current API (§1.1): same routes, same
        // answers, counted and matched by faults under the plain `/app/rest` path.
        Router::new()
            .nest(&format!("{prefix}/latest"), rest.clone())
            .nest(&prefix, rest)
            .nest("/__emulator", control::routes(self.clone()))
            .layer(middleware::from_fn(reject_encoded_slash))
            .layer(middleware::map_response(node_header))
    }

    /// Serves until `shutdown` completes, then lets open requests finish.
    /// Connections are served by hyper directly so a fault can drop them.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let router = self.router();
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(conn) => conn,
                        Err(e) => {
                            tracing::warn!(error = %e, "emulator accept failed");
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    };
                    // As Tomcat does: small answers go out at once, not after a delayed ACK.
                    let _ = stream.set_nodelay(true);
                    let router = router.clone();
                    let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let router = router.clone();
                        async move {
                            let resp = match router.oneshot(req).await {
                                Ok(resp) => resp,
                                Err(never) => match never {},
                            };
                            if resp.extensions().get::<DropConnection>().is_some() {
                                Err(std::io::Error::other("fault: drop connection"))
                            } else {
                                Ok(resp)
                            }
                        }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service);
                    let conn = graceful.watch(conn);
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(listener);
        let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
        Ok(())
    }
}

fn apply_seed(state: &mut State, seed: &Seed) -> Result<(), EmulatorError> {
    for p in &seed.projects {
        state.add_project(p, "_Root");
    }
    for g in &seed.groups {
        let mut roles = std::collections::BTreeSet::new();
        for (role, scope) in &g.roles {
            state
                .check_role(role)
                .map_err(|e| EmulatorError::Seed(e.message))?;
            roles.insert((
                role.clone(),
                state
                    .parse_scope(scope)
                    .map_err(|e| EmulatorError::Seed(e.message))?,
            ));
        }
        state.insert_group(GroupRec {
            key: g.key.clone(),
            name: g.name.clone().unwrap_or_else(|| g.key.clone()),
            description: g.description.clone(),
            properties: BTreeMap::new(),
            roles,
        });
    }
    for u in &seed.users {
        if state.user_by_username(&u.username).is_some() {
            return Err(EmulatorError::Seed(format!(
                "duplicate seeded user '{}'",
                u.username
            )));
        }
        let id = state.insert_user(&u.username, u.name.as_deref(), u.email.as_deref());
        let mut roles = std::collections::BTreeSet::new();
        for (role, scope) in &u.roles {
            state
                .check_role(role)
                .map_err(|e| EmulatorError::Seed(e.message))?;
            roles.insert((
                role.clone(),
                state
                    .parse_scope(scope)
                    .map_err(|e| EmulatorError::Seed(e.message))?,
            ));
        }
        for g in &u.groups {
            if !state.groups.contains_key(g) {
                return Err(EmulatorError::Seed(format!("unknown group '{g}'")));
            }
        }
        let user = state.users.get_mut(&id).expect("just inserted");
        user.properties = u.properties.clone();
        user.roles = roles;
        state.set_user_groups(id, u.groups.iter().cloned());
    }
    Ok(())
}

/// Binds `127.0.0.1:0`, serves in the background, and returns the base URL
/// (including the context path, if any) and the handle.
pub async fn spawn(opts: EmulatorOptions) -> std::io::Result<(String, Emulator)> {
    let context = opts.context_path.clone().unwrap_or_default();
    let emu = Emulator::new(opts).map_err(std::io::Error::other)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let server = emu.clone();
    tokio::spawn(async move {
        let _ = server.serve(listener, std::future::pending()).await;
    });
    Ok((
        format!("http://{addr}{}", context.trim_end_matches('/')),
        emu,
    ))
}

async fn node_header(mut resp: Response) -> Response {
    resp.headers_mut().insert(
        "TeamCity-Node-Id",
        header::HeaderValue::from_static("MAIN_SERVER"),
    );
    resp
}

/// Tomcat rejects encoded slashes in paths by default (assumed for TeamCity).
async fn reject_encoded_slash(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.contains("%2F") || path.contains("%2f") {
        return errors::text_response(
            StatusCode::BAD_REQUEST,
            "Bad Request: encoded '/' in path".into(),
        );
    }
    next.run(req).await
}

async fn authenticate(AxState(emu): AxState<Emulator>, req: Request, next: Next) -> Response {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let Some(auth) = auth else {
        return errors::unauthorized(false);
    };
    let token = auth.strip_prefix("Bearer ").unwrap_or("");
    let opts = &emu.inner.opts;
    if !token.is_empty() && token == opts.token {
        return next.run(req).await;
    }
    if !token.is_empty() && opts.read_only_tokens.iter().any(|t| t == token) {
        if req.method() == axum::http::Method::GET {
            return next.run(req).await;
        }
        return access_denied();
    }
    if !token.is_empty() {
        let digest = token_digest(token);
        let verdict = {
            let s = emu.state();
            s.token_owner(&digest, time::OffsetDateTime::now_utc())
                .map(|user| (user, may_write(&s, user, req.method(), req.uri().path())))
        };
        match verdict {
            Some((user, true)) => return CALLER.scope(user, next.run(req)).await,
            Some((_, false)) => return access_denied(),
            None => {}
        }
    }
    errors::unauthorized(true)
}

fn access_denied() -> Response {
    errors::TcError::forbidden(
        "Access denied: the token's user lacks the permission for this operation.",
    )
    .into_response()
}

/// Whether a user authenticated by its own token may make this request (`path` relative to
/// `/app/rest`): anything when it is a global `SYSTEM_ADMIN`; otherwise reads, and writes to
/// its own tokens, sessions and remember-me data only.
fn may_write(s: &State, user: u64, method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    if *method == Method::GET || *method == Method::HEAD || s.is_system_admin(user) {
        return true;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let own_path = match segments.as_slice() {
        ["users", _, "tokens"] => *method == Method::POST,
        ["users", _, "tokens", _] => *method == Method::POST || *method == Method::DELETE,
        ["users", _, "logout"] => *method == Method::POST,
        ["users", _, "debug", "rememberMe"] => *method == Method::DELETE,
        _ => false,
    };
    own_path
        && CALLER
            .sync_scope(user, || s.find_user_item(&percent_decode(segments[1])))
            .is_ok_and(|target| target == user)
}

/// Decodes `%XX` escapes in a path segment (invalid escapes stay as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Counts the call, applies a pending fault and the configured latency (measured from the
/// request's arrival).
async fn per_call(AxState(emu): AxState<Emulator>, req: Request, next: Next) -> Response {
    // The `/latest` alias counts and matches faults as the plain path.
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned())
        .replacen("/app/rest/latest/", "/app/rest/", 1);
    let method = req.method().as_str().to_owned();
    *lock(&emu.inner.counters)
        .entry(format!("{method} {template}"))
        .or_insert(0) += 1;
    let path = req
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|| req.uri().path().to_owned())
        .replacen("/app/rest/latest/", "/app/rest/", 1);
    let fault = control::take_fault(&emu, &method, &path);
    // The response leaves `latency` after the request arrived, however long the handler took:
    // a server's latency includes its own work, and the emulator's work is not TeamCity's.
    let latency = emu.inner.opts.latency;
    let answer_at = (!latency.is_zero()).then(|| std::time::Instant::now() + latency);
    let response = match fault {
        None => next.run(req).await,
        Some(FaultAction::Delay { ms }) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            next.run(req).await
        }
        Some(FaultAction::Status {
            status,
            retry_after_secs,
        }) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            errors::TcError::injected(status, retry_after_secs).into_response()
        }
        Some(FaultAction::Drop) => {
            let mut resp = errors::text_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "fault: connection dropped".into(),
            );
            resp.extensions_mut().insert(DropConnection);
            resp
        }
    };
    if let Some(at) = answer_at {
        timer::sleep_until(at).await;
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_segments_are_percent_decoded() {
        assert_eq!(percent_decode("id:5"), "id:5");
        assert_eq!(
            percent_decode("username:(%24base64:YQ)%2C"),
            "username:($base64:YQ),"
        );
        assert_eq!(percent_decode("a%2"), "a%2", "a broken escape stays");
        assert_eq!(percent_decode("%C3%BC"), "ü");
    }

    #[test]
    fn token_digests_are_sha256_hex() {
        assert_eq!(
            token_digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
