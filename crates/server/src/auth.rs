//! Bearer-token authentication for SCIM clients.
//!
//! Tokens are random secrets shown once; the store keeps only their SHA-256. The server holds a
//! snapshot of the valid hashes, refreshed every [`REFRESH`] (so a token revoked from the CLI
//! or on another replica stops working here within that time: the snapshot's age counts from
//! the moment its query started) and whenever an unknown token is presented (so a token
//! created a moment ago works at once; repeated failures are rate-limited per peer).
//! Every presented token is compared with every snapshot entry in constant time.

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use scim::ScimError;
use sha2::{Digest, Sha256};
use store::{TokenRecord, TokenScope, Tokens};
use subtle::ConstantTimeEq;
use tokio::sync::RwLock;

use crate::error::scim_error_response;
use crate::state::AppState;

/// How often the snapshot of valid tokens is refreshed: the longest a revoked token still
/// works on a replica that did not revoke it (one small query per second under load).
pub const REFRESH: Duration = Duration::from_secs(1);

/// The prefix of every token this service issues (helps secret scanners).
pub const TOKEN_PREFIX: &str = "tcscim_";

/// Generates a new token secret: the prefix and 256 random bits, base64url.
pub fn generate_token(random: [u8; 32]) -> String {
    format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(random))
}

/// The SHA-256 of a token secret, as stored.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The authenticated client, available to handlers as a request extension.
#[derive(Debug, Clone)]
pub struct Actor {
    /// `token:<id>`.
    pub name: String,
}

#[derive(Debug)]
struct Snapshot {
    entries: Vec<([u8; 32], TokenRecord)>,
    loaded: Instant,
}

/// SCIM tokens from a file (one per line, `#` comments), re-read when it changes. A token that
/// leaves the file stays valid for the grace period, so a rotation (write the new token, let the
/// IdP pick it up, drop the old one) never locks the IdP out.
#[derive(Debug)]
struct FileTokens {
    scope: TokenScope,
    path: PathBuf,
    grace: time::Duration,
    content: Option<[u8; 32]>,
    current: Vec<[u8; 32]>,
    retiring: Vec<([u8; 32], time::OffsetDateTime)>,
}

impl FileTokens {
    /// Re-reads the file if it changed; returns the entries valid now.
    fn refresh(&mut self, now: time::OffsetDateTime) -> Vec<([u8; 32], TokenRecord)> {
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let digest = hash_token(&text);
                if self.content != Some(digest) {
                    let new: Vec<[u8; 32]> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with('#'))
                        .map(hash_token)
                        .collect();
                    for old in &self.current {
                        if !new.contains(old) {
                            self.retiring.push((*old, now + self.grace));
                        }
                    }
                    self.retiring.retain(|(h, _)| !new.contains(h));
                    if self.content.is_some() {
                        tracing::info!(
                            tokens = new.len(),
                            "SCIM token file changed; replaced tokens stay valid for the grace period"
                        );
                    }
                    self.current = new;
                    self.content = Some(digest);
                }
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read the SCIM token file; keeping the tokens read before")
            }
        }
        self.retiring.retain(|(_, until)| *until > now);
        let scope = self.scope;
        let record = |h: &[u8; 32], expires: Option<time::OffsetDateTime>| TokenRecord {
            // A prefix of the hash names the token in the audit trail without revealing it.
            id: format!("file:{}", hex::encode(&h[..4])),
            scope,
            name: "token_file".into(),
            created: now,
            expires,
            revoked: None,
        };
        self.current
            .iter()
            .map(|h| (*h, record(h, None)))
            .chain(
                self.retiring
                    .iter()
                    .map(|(h, until)| (*h, record(h, Some(*until)))),
            )
            .collect()
    }
}

/// The snapshot of valid token hashes of one [`TokenScope`].
#[derive(Debug, Clone)]
pub struct TokenCache {
    store: Arc<dyn Tokens>,
    scope: TokenScope,
    snapshot: Arc<RwLock<Snapshot>>,
    file: Option<Arc<std::sync::Mutex<FileTokens>>>,
}

impl TokenCache {
    /// A cache of the SCIM tokens in `store`, loaded on first use.
    pub fn new(store: Arc<dyn Tokens>) -> Self {
        Self::for_scope(store, TokenScope::Scim)
    }

    /// A cache of the tokens of `scope` in `store`, loaded on first use.
    pub fn for_scope(store: Arc<dyn Tokens>, scope: TokenScope) -> Self {
        let stale = Instant::now()
            .checked_sub(REFRESH * 10)
            .unwrap_or_else(Instant::now);
        TokenCache {
            store,
            scope,
            snapshot: Arc::new(RwLock::new(Snapshot {
                entries: vec![],
                loaded: stale,
            })),
            file: None,
        }
    }

    /// Also accepts the tokens listed in `path`, re-read when it changes; a token removed from
    /// the file stays valid for `grace`.
    pub fn with_token_file(mut self, path: PathBuf, grace: std::time::Duration) -> Self {
        self.file = Some(Arc::new(std::sync::Mutex::new(FileTokens {
            scope: self.scope,
            path,
            grace: time::Duration::try_from(grace).unwrap_or(time::Duration::minutes(10)),
            content: None,
            current: vec![],
            retiring: vec![],
        })));
        self
    }

    async fn refresh_if_older_than(&self, age: Duration) {
        let mut snap = self.snapshot.write().await;
        if snap.loaded.elapsed() < age {
            return;
        }
        // The snapshot is as old as the moment its query started, not when it returned.
        let started = Instant::now();
        match self.store.valid_token_hashes().await {
            Ok(mut entries) => {
                entries.retain(|(_, rec)| rec.scope == self.scope);
                if let Some(file) = &self.file {
                    let now = time::OffsetDateTime::now_utc();
                    entries.extend(file.lock().unwrap_or_else(|e| e.into_inner()).refresh(now));
                }
                snap.entries = entries;
                snap.loaded = started;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not refresh SCIM tokens; keeping the last snapshot")
            }
        }
    }

    fn find(entries: &[([u8; 32], TokenRecord)], hash: &[u8; 32]) -> Option<TokenRecord> {
        // No early exit: every entry is compared in constant time.
        let mut found = None;
        for (h, rec) in entries {
            if bool::from(h.ct_eq(hash)) {
                found = Some(rec.clone());
            }
        }
        found
    }

    /// Checks a presented token; returns its record when valid now.
    pub async fn authenticate(&self, token: &str) -> Option<TokenRecord> {
        let hash = hash_token(token);
        if self.snapshot.read().await.loaded.elapsed() >= REFRESH {
            self.refresh_if_older_than(REFRESH).await;
        }
        let now = time::OffsetDateTime::now_utc();
        let hit = Self::find(&self.snapshot.read().await.entries, &hash);
        let hit = match hit {
            Some(rec) => Some(rec),
            None => {
                // Perhaps a token created a moment ago by the CLI: look again. The re-read is
                // one small query; failed authentications are rate-limited per peer.
                self.refresh_if_older_than(Duration::ZERO).await;
                Self::find(&self.snapshot.read().await.entries, &hash)
            }
        };
        hit.filter(|rec| rec.is_valid_at(now))
    }
}

fn unauthorized(detail: &str, invalid: bool) -> Response {
    let mut resp = scim_error_response(&ScimError::new(401, None, detail));
    if invalid {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static(
                "Bearer realm=\"teamcity-scim\", error=\"invalid_token\"",
            ),
        );
    }
    resp
}

/// Middleware: requires a valid bearer token and records the actor.
pub async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    match check_token(&state, &mut req).await {
        ControlFlow::Continue(()) => next.run(req).await,
        ControlFlow::Break(resp) => resp,
    }
}

/// [`require_token`]'s check: on success the [`Actor`] is in the request's extensions; on
/// failure, `Break` with the 401 to answer.
pub(crate) async fn check_token(state: &AppState, req: &mut Request) -> ControlFlow<Response> {
    let Some(value) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return ControlFlow::Break(unauthorized(
            "authentication required: send `Authorization: Bearer <token>` (create one with `teamcity-scim token create --name NAME`)",
            false,
        ));
    };
    let token = match value.split_once(' ') {
        Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
        _ => {
            return ControlFlow::Break(unauthorized(
                "the Authorization header must use the Bearer scheme",
                true,
            ));
        }
    };
    match state.tokens.authenticate(token).await {
        Some(rec) => {
            req.extensions_mut().insert(Actor {
                name: format!("token:{}", rec.id),
            });
            ControlFlow::Continue(())
        }
        None => {
            metrics::counter!("scim_auth_failures_total").increment(1);
            ControlFlow::Break(unauthorized(
                "the bearer token is not valid (unknown, revoked or expired)",
                true,
            ))
        }
    }
}
