//! Okta: users and groups of the configured groups through the Users and Groups APIs.
//!
//! - **Full round** (no cursor, or one this source cannot use): each configured group
//!   (`GET /api/v1/groups/{id}`) and its members (`GET /api/v1/groups/{id}/users`, following
//!   `Link: <…>; rel="next"`): a [`Change::Group`], a [`Change::User`] per member and one
//!   [`Change::AllMembers`] per group.
//! - **Incremental round**: users changed since the cursor's `since` (`GET /api/v1/users?search=
//!   lastUpdated gt "…"`, which covers every status, DEPROVISIONED included); each configured
//!   group read again, its members re-read when its `lastMembershipUpdated` moved and a
//!   [`Change::Group`] when its `lastUpdated` moved; a group gone (404) is
//!   [`Change::GroupRemoved`]. A user deleted in Okta leaves their groups, so the bridge sees
//!   them go through the groups' `AllMembers` (Okta has no feed of deletions to read).
//! - **Rate limits**: Okta limits each endpoint separately and reports the bucket of every
//!   answer in `X-Rate-Limit-Limit`, `X-Rate-Limit-Remaining` and `X-Rate-Limit-Reset` (UTC
//!   epoch seconds, <https://developer.okta.com/docs/reference/rl-best-practices/>). The source
//!   keeps those per endpoint (ids replaced by `*`) and, before sending, waits for the reset of a
//!   bucket down to its reserve, so a 429 is not reached in normal operation; a 429 anyway (the
//!   org's budget is shared with other clients) waits for the reset and retries, within
//!   [`crate::THROTTLE_BUDGET`].
//! - **Credentials**: an API token (`Authorization: SSWS …`), or an OAuth 2.0 service app with
//!   a private key (`private_key_jwt` client credentials for the scopes [`SCOPES`],
//!   <https://developer.okta.com/docs/guides/implement-oauth-for-okta-serviceapp/main/>), whose
//!   access token is cached until shortly before it expires.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use reqwest::{StatusCode, Url, header};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::http::{error_chain, status_error};
use crate::{
    Change, CheckReport, Round, SecretFile, Source, SourceError, SourceGroup, SourceResult,
    SourceUser, jwt,
};

/// The scopes the service app asks for (and must be granted in Okta's "Okta API Scopes" tab).
pub const SCOPES: &str = "okta.users.read okta.groups.read";

/// Page size asked for: the largest Okta serves for users and group members.
const PAGE: &str = "200";
/// The longest wait for a rate-limit reset before one request.
const MAX_RATE_WAIT: Duration = Duration::from_secs(60);
/// An access token is renewed this long before Okta says it expires.
const TOKEN_RENEW_EARLY: Duration = Duration::from_secs(60);
/// How far before the round's start the next `since` may reach (clock granularity of `Date`).
const SINCE_MARGIN: time::Duration = time::Duration::seconds(1);

/// What the Okta source reads and how it authenticates.
#[derive(Debug)]
pub struct OktaOptions {
    /// `https://{yourOktaDomain}` (no path).
    pub org_url: String,
    /// How the bridge authenticates.
    pub credential: OktaCredential,
    /// Ids of the groups in scope (`00g…`).
    pub groups: Vec<String>,
}

/// How the bridge authenticates to Okta.
#[derive(Debug)]
pub enum OktaCredential {
    /// An API token (`Authorization: SSWS <token>`), of an admin who can read users and groups.
    ApiToken(SecretFile),
    /// An OAuth 2.0 service app authenticating with `private_key_jwt`, granted the scopes
    /// `okta.users.read` and `okta.groups.read`.
    PrivateKey {
        /// The service app's client id.
        client_id: String,
        /// The PEM RSA private key whose public key is registered with the app.
        key: SecretFile,
        /// The registered key's id (`kid`), when the app has several keys.
        key_id: Option<String>,
    },
}

/// The Okta [`Source`].
pub struct OktaSource {
    org_url: String,
    credential: OktaCredential,
    groups: Vec<String>,
    http: reqwest::Client,
    rate: Mutex<HashMap<String, RateState>>,
    token: Mutex<Option<CachedToken>>,
}

impl std::fmt::Debug for OktaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The cached access token stays out.
        f.debug_struct("OktaSource")
            .field("org_url", &self.org_url)
            .field("credential", &self.credential)
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

/// One endpoint's rate-limit bucket as last reported.
#[derive(Debug, Clone, Copy)]
struct RateState {
    limit: u64,
    remaining: u64,
    /// When the bucket refills, on this machine's monotonic clock.
    resets_at: Instant,
}

struct CachedToken {
    value: String,
    renew_at: Instant,
}

/// The state of one pull.
#[derive(Debug, Default)]
struct Ctx {
    requests: u64,
    /// Okta's clock (`Date`) at the round's first answer.
    started: Option<OffsetDateTime>,
    /// The largest user `lastUpdated` the round saw.
    max_seen: Option<OffsetDateTime>,
}

impl Ctx {
    fn saw(&mut self, user: &OktaUser) {
        if let Some(t) = user.last_updated.as_deref().and_then(parse_time)
            && self.max_seen.is_none_or(|m| t > m)
        {
            self.max_seen = Some(t);
        }
    }

    /// The `since` of the next round: the largest `lastUpdated` seen, but never after the
    /// round's start (less a margin): a user changed while the round paged may have been read
    /// before the change, and their new `lastUpdated` is after the start.
    fn next_since(&self) -> OffsetDateTime {
        let start = self.started.unwrap_or_else(OffsetDateTime::now_utc) - SINCE_MARGIN;
        self.max_seen.map_or(start, |m| m.min(start))
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OktaUser {
    id: String,
    status: String,
    last_updated: Option<String>,
    profile: UserProfile,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UserProfile {
    login: String,
    first_name: Option<String>,
    last_name: Option<String>,
    display_name: Option<String>,
    email: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct OktaGroup {
    id: String,
    last_updated: Option<String>,
    last_membership_updated: Option<String>,
    profile: GroupProfile,
}

#[derive(Debug, Deserialize)]
struct GroupProfile {
    name: String,
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    expires_in: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct OAuthError {
    error: String,
    error_description: Option<String>,
}

/// One GET's outcome.
enum Fetched<T> {
    /// 2xx: the body and the `rel="next"` link.
    Found(T, Option<String>),
    /// 404.
    NotFound,
    /// Any other answer, classified.
    Refused(StatusCode, SourceError),
}

/// What a round collects.
#[derive(Debug, Default)]
struct Acc {
    changes: Vec<Change>,
    /// Users already reported this round.
    emitted: HashSet<String>,
    /// The groups' marks for the next cursor.
    marks: BTreeMap<String, GroupMark>,
}

/// The cursor: this source's own JSON.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Cursor {
    /// Format version.
    okta: u32,
    /// The configured groups the cursor was made for (sorted).
    groups: Vec<String>,
    /// Users changed after this are read next time.
    since: String,
    /// Per group: `lastUpdated` and `lastMembershipUpdated` as last read.
    marks: BTreeMap<String, GroupMark>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct GroupMark {
    updated: Option<String>,
    membership: Option<String>,
}

impl GroupMark {
    fn of(g: &OktaGroup) -> Self {
        GroupMark {
            updated: g.last_updated.clone(),
            membership: g.last_membership_updated.clone(),
        }
    }
}

/// Whether an Okta user status means the account may be used.
///
/// Okta's user statuses (<https://developer.okta.com/docs/reference/api/users/#user-status>,
/// <https://support.okta.com/help/s/article/check-user-lifecycle-state-via-the-okta-api>):
/// - ACTIVE, PASSWORD_EXPIRED, LOCKED_OUT, RECOVERY: an activated account whose owner is only
///   held at sign-in (a password to change, too many failures, a reset under way): still an
///   employee with access, so active.
/// - PROVISIONED: activated by an admin, the owner has not set a password yet: a new hire
///   about to start, active.
/// - STAGED: created but not activated: not yet meant to have access, inactive.
/// - SUSPENDED: an admin blocked sign-in temporarily: inactive until unsuspended.
/// - DEPROVISIONED: deactivated, the account is off: inactive.
///
/// An unknown status is treated as inactive (the safe side).
pub(crate) fn is_active_status(status: &str) -> bool {
    matches!(
        status,
        "ACTIVE" | "PASSWORD_EXPIRED" | "LOCKED_OUT" | "RECOVERY" | "PROVISIONED"
    )
}

fn map_user(u: OktaUser) -> SourceUser {
    let p = u.profile;
    let non_empty = |s: Option<String>| s.filter(|s| !s.trim().is_empty());
    let given_name = non_empty(p.first_name);
    let family_name = non_empty(p.last_name);
    let display_name = non_empty(p.display_name).or_else(|| {
        let joined = [given_name.as_deref(), family_name.as_deref()]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ");
        (!joined.is_empty()).then_some(joined)
    });
    SourceUser {
        id: u.id,
        user_name: p.login,
        given_name,
        family_name,
        display_name,
        email: non_empty(p.email),
        active: is_active_status(&u.status),
    }
}

fn parse_time(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Okta's timestamp format, `2024-01-01T00:00:00.000Z`.
fn format_time(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(time::macros::format_description!(
            "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
        ))
        .unwrap_or_default()
}

/// An HTTP `Date` (`Mon, 07 Dec 2026 05:24:10 GMT`).
fn parse_http_date(s: &str) -> Option<OffsetDateTime> {
    time::PrimitiveDateTime::parse(
        s.trim(),
        time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        ),
    )
    .ok()
    .map(|t| t.assume_utc())
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

/// The `rel="next"` target of `Link` headers (RFC 8288).
fn next_link(headers: &header::HeaderMap) -> Option<String> {
    for value in headers.get_all(header::LINK) {
        let Ok(value) = value.to_str() else { continue };
        for link in value.split(',') {
            let Some((target, params)) = link.split_once(';') else {
                continue;
            };
            let is_next = params.split(';').any(|p| {
                let p = p.trim().replace(' ', "");
                p == "rel=\"next\"" || p == "rel=next"
            });
            if is_next {
                let t = target.trim();
                return Some(t.trim_start_matches('<').trim_end_matches('>').to_string());
            }
        }
    }
    None
}

fn header_u64(resp: &reqwest::Response, name: &str) -> Option<u64> {
    resp.headers().get(name)?.to_str().ok()?.trim().parse().ok()
}

/// How long until the bucket of `resp` refills: `X-Rate-Limit-Reset` less Okta's `Date` when
/// both are there (immune to clock skew; `Date` is truncated to the second, so the wait errs
/// long), else less this machine's clock.
fn until_reset(resp: &reqwest::Response) -> Option<Duration> {
    let reset = header_u64(resp, "x-rate-limit-reset")?;
    let now = resp
        .headers()
        .get(header::DATE)
        .and_then(|d| d.to_str().ok())
        .and_then(parse_http_date)
        .map(|d| d.unix_timestamp() as f64)
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0)
        });
    Some(Duration::from_secs_f64((reset as f64 - now).max(0.0)).min(MAX_RATE_WAIT))
}

impl OktaSource {
    /// A source reading `opts.groups` from `opts.org_url`.
    pub fn new(opts: OktaOptions) -> Self {
        OktaSource {
            org_url: opts.org_url.trim_end_matches('/').to_string(),
            credential: opts.credential,
            groups: opts.groups,
            http: crate::http::client(),
            rate: Mutex::new(HashMap::new()),
            token: Mutex::new(None),
        }
    }

    fn url(&self, segments: &[&str], query: &[(&str, &str)]) -> SourceResult<Url> {
        let mut url = Url::parse(&self.org_url).map_err(|e| {
            SourceError::Config(format!(
                "the Okta org URL {:?} is not a URL ({e}); expected https://{{yourOktaDomain}}",
                self.org_url
            ))
        })?;
        url.path_segments_mut()
            .map_err(|()| {
                SourceError::Config(format!(
                    "the Okta org URL {:?} cannot have a path",
                    self.org_url
                ))
            })?
            .pop_if_empty()
            .extend(segments);
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        Ok(url)
    }

    fn token_url(&self) -> SourceResult<Url> {
        self.url(&["oauth2", "v1", "token"], &[])
    }

    fn hint(&self, status: StatusCode) -> String {
        match (&self.credential, status.as_u16()) {
            (OktaCredential::ApiToken(f), 401) => format!(
                "the API token is invalid or revoked: create one (Security → API → Tokens) and write it to {}",
                f.path().display()
            ),
            (OktaCredential::ApiToken(_), _) => "the API token's administrator may not read users and groups: use a token of an admin with the Read-Only Administrator role or more".into(),
            (OktaCredential::PrivateKey { .. }, 401) => "Okta refused the service app's access token: check the app is active".into(),
            (OktaCredential::PrivateKey { .. }, _) => "grant the scopes okta.users.read and okta.groups.read to the service app (Okta API Scopes) and assign it an admin role that can read users and groups (e.g. Read-Only Administrator)".into(),
        }
    }

    /// Waits, before a request to `family`, for the reset of a bucket down to its reserve.
    async fn pace(&self, family: &str) {
        let wait = {
            let mut rate = self.rate.lock().unwrap_or_else(|p| p.into_inner());
            match rate.get(family) {
                Some(r) if r.remaining <= (r.limit / 20).max(1) => {
                    let wait = r.resets_at.saturating_duration_since(Instant::now());
                    rate.remove(family);
                    Some(wait)
                }
                _ => None,
            }
        };
        if let Some(wait) = wait.filter(|w| !w.is_zero()) {
            metrics::counter!("teamcity_scim_source_rate_waits_total", "source" => "okta")
                .increment(1);
            tracing::debug!(
                family,
                wait_ms = wait.as_millis() as u64,
                "okta: rate-limit bucket at its reserve, waiting for the reset"
            );
            tokio::time::sleep(wait).await;
        }
    }

    fn observe(&self, family: &str, resp: &reqwest::Response, ctx: &mut Ctx) {
        if ctx.started.is_none() {
            ctx.started = resp
                .headers()
                .get(header::DATE)
                .and_then(|d| d.to_str().ok())
                .and_then(parse_http_date);
        }
        let (Some(limit), Some(remaining), Some(wait)) = (
            header_u64(resp, "x-rate-limit-limit"),
            header_u64(resp, "x-rate-limit-remaining"),
            until_reset(resp),
        ) else {
            return;
        };
        self.rate.lock().unwrap_or_else(|p| p.into_inner()).insert(
            family.to_string(),
            RateState {
                limit,
                remaining,
                resets_at: Instant::now() + wait,
            },
        );
    }

    /// Sends a request, pacing by the rate-limit headers and retrying 429 (and 503 with
    /// `Retry-After`) after the announced wait while the total stays within
    /// [`crate::THROTTLE_BUDGET`]. Counts every request.
    async fn send(
        &self,
        ctx: &mut Ctx,
        url: &Url,
        make: impl Fn() -> reqwest::RequestBuilder,
        what: &str,
    ) -> SourceResult<reqwest::Response> {
        let mut pacing = Pacing {
            source: self,
            family: family(url.path()),
            ctx,
        };
        crate::http::send_with(make, &mut pacing, what).await
    }

    /// The `Authorization` header value; for a service app the cached access token, or a new
    /// one.
    async fn authorization(&self, ctx: &mut Ctx) -> SourceResult<String> {
        let (client_id, key, key_id) = match &self.credential {
            OktaCredential::ApiToken(f) => return Ok(format!("SSWS {}", f.get()?)),
            OktaCredential::PrivateKey {
                client_id,
                key,
                key_id,
            } => (client_id, key, key_id),
        };
        if let Some(t) = self
            .token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .filter(|t| Instant::now() < t.renew_at)
        {
            return Ok(format!("Bearer {}", t.value));
        }
        let token_url = self.token_url()?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let assertion = jwt::sign_assertion(
            client_id,
            token_url.as_str(),
            &key.get()?,
            None,
            key_id.as_deref(),
            now,
        )
        .map_err(|e| match e {
            SourceError::Config(m) => {
                SourceError::Config(format!("{m} (in {})", key.path().display()))
            }
            other => other,
        })?;
        let body = serde_urlencoded::to_string([
            ("grant_type", "client_credentials"),
            ("scope", SCOPES),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ),
            ("client_assertion", assertion.as_str()),
        ])
        .map_err(|e| SourceError::Protocol(format!("encoding the token request: {e}")))?;
        let what = "okta: getting an access token";
        let resp = self
            .send(
                ctx,
                &token_url,
                || {
                    self.http
                        .post(token_url.clone())
                        .header(header::ACCEPT, "application/json")
                        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                        .body(body.clone())
                },
                what,
            )
            .await?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| SourceError::Transient(format!("{what}: {}", error_chain(&e))))?;
        if !status.is_success() {
            if let Ok(err) = serde_json::from_str::<OAuthError>(&text) {
                let desc = err.error_description.unwrap_or_default();
                let fix = match err.error.as_str() {
                    "invalid_scope" => "grant the scopes okta.users.read and okta.groups.read to the service app (Okta API Scopes)".to_string(),
                    "invalid_client" => format!(
                        "check the client id {client_id:?}, that the app authenticates with public key / private key, and that the public key of {} is registered with it{}",
                        key.path().display(),
                        key_id.as_deref().map(|k| format!(" under the key id {k:?}")).unwrap_or_default()
                    ),
                    _ => "check the service app's settings".to_string(),
                };
                if status.is_client_error() {
                    return Err(SourceError::Config(format!(
                        "{what}: Okta answered {status} {}: {desc} — {fix}",
                        err.error
                    )));
                }
            }
            return Err(status_error(what, status, &text, &self.hint(status)));
        }
        let answer: TokenAnswer = serde_json::from_str(&text)
            .map_err(|e| SourceError::Protocol(format!("{what}: unreadable answer: {e}")))?;
        let lifetime = Duration::from_secs(answer.expires_in.unwrap_or(300));
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(CachedToken {
            value: answer.access_token.clone(),
            renew_at: Instant::now() + lifetime.saturating_sub(TOKEN_RENEW_EARLY),
        });
        Ok(format!("Bearer {}", answer.access_token))
    }

    /// GETs `url` as JSON: `None` on 404; with the `rel="next"` link.
    async fn get<T: DeserializeOwned>(
        &self,
        ctx: &mut Ctx,
        url: &Url,
        what: &str,
    ) -> SourceResult<Option<(T, Option<String>)>> {
        match self.try_get(ctx, url, what).await? {
            Fetched::Found(value, next) => Ok(Some((value, next))),
            Fetched::NotFound => Ok(None),
            Fetched::Refused(_, e) => Err(e),
        }
    }

    /// [`Self::get`] with refusals (non-success answers but 404) handed back with their status.
    async fn try_get<T: DeserializeOwned>(
        &self,
        ctx: &mut Ctx,
        url: &Url,
        what: &str,
    ) -> SourceResult<Fetched<T>> {
        let mut renewed = false;
        loop {
            let auth = self.authorization(ctx).await?;
            let resp = self
                .send(
                    ctx,
                    url,
                    || {
                        self.http
                            .get(url.clone())
                            .header(header::ACCEPT, "application/json")
                            .header(header::AUTHORIZATION, &auth)
                    },
                    what,
                )
                .await?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED
                && !renewed
                && matches!(self.credential, OktaCredential::PrivateKey { .. })
            {
                // The access token expired or was revoked early: a new one, once.
                *self.token.lock().unwrap_or_else(|p| p.into_inner()) = None;
                renewed = true;
                continue;
            }
            if status == StatusCode::NOT_FOUND {
                return Ok(Fetched::NotFound);
            }
            let next = next_link(resp.headers());
            let text = resp
                .text()
                .await
                .map_err(|e| SourceError::Transient(format!("{what}: {}", error_chain(&e))))?;
            if !status.is_success() {
                let error = status_error(what, status, &text, &self.hint(status));
                return Ok(Fetched::Refused(status, error));
            }
            let value = serde_json::from_str(&text)
                .map_err(|e| SourceError::Protocol(format!("{what}: unreadable answer: {e}")))?;
            return Ok(Fetched::Found(value, next));
        }
    }

    /// Every page of a list, following `rel="next"` links (which must stay on the org).
    /// `None` when a page is a 404 (the list's owner is gone: a partial list would be wrong).
    async fn get_all<T: DeserializeOwned>(
        &self,
        ctx: &mut Ctx,
        first: Url,
        what: &str,
    ) -> SourceResult<Option<Vec<T>>> {
        let mut all = Vec::new();
        let mut url = first;
        loop {
            let Some((page, next)) = self.get::<Vec<T>>(ctx, &url, what).await? else {
                return Ok(None);
            };
            all.extend(page);
            let Some(next) = next else {
                return Ok(Some(all));
            };
            let next = Url::parse(&next).map_err(|e| {
                SourceError::Protocol(format!("{what}: unreadable next link {next:?}: {e}"))
            })?;
            if next.origin() != url.origin() {
                return Err(SourceError::Protocol(format!(
                    "{what}: the next link leaves the org ({})",
                    next.origin().ascii_serialization()
                )));
            }
            url = next;
        }
    }

    async fn group(&self, ctx: &mut Ctx, id: &str) -> SourceResult<Option<OktaGroup>> {
        let url = self.url(&["api", "v1", "groups", id], &[])?;
        Ok(self
            .get::<OktaGroup>(ctx, &url, &format!("okta: reading group {id}"))
            .await?
            .map(|(g, _)| g))
    }

    async fn members(&self, ctx: &mut Ctx, id: &str) -> SourceResult<Option<Vec<OktaUser>>> {
        let url = self.url(&["api", "v1", "groups", id, "users"], &[("limit", PAGE)])?;
        self.get_all(
            ctx,
            url,
            &format!("okta: reading the members of group {id}"),
        )
        .await
    }

    /// A group read again: `Group` when new or renamed, members when new or changed.
    async fn read_group(
        &self,
        ctx: &mut Ctx,
        id: &str,
        full: bool,
        before: Option<&GroupMark>,
        acc: &mut Acc,
    ) -> SourceResult<()> {
        let Acc {
            changes,
            emitted,
            marks,
        } = acc;
        let Some(group) = self.group(ctx, id).await? else {
            // Gone: a full round reports it; an incremental one when it was there last time.
            if full || before.is_some() {
                changes.push(Change::GroupRemoved { id: id.into() });
            }
            return Ok(());
        };
        let mark = GroupMark::of(&group);
        if before.is_none_or(|b| b.updated != mark.updated) {
            changes.push(Change::Group(SourceGroup {
                id: group.id.clone(),
                display_name: group.profile.name.clone(),
            }));
        }
        if before.is_none_or(|b| b.membership != mark.membership) {
            let Some(members) = self.members(ctx, id).await? else {
                changes.push(Change::GroupRemoved { id: id.into() });
                return Ok(());
            };
            let mut ids = Vec::with_capacity(members.len());
            for u in members {
                ctx.saw(&u);
                ids.push(u.id.clone());
                if emitted.insert(u.id.clone()) {
                    changes.push(Change::User(map_user(u)));
                }
            }
            changes.push(Change::AllMembers {
                group: id.into(),
                members: ids,
            });
        }
        marks.insert(id.into(), mark);
        Ok(())
    }

    fn sorted_groups(&self) -> Vec<String> {
        let mut g = self.groups.clone();
        g.sort();
        g.dedup();
        g
    }

    async fn full(&self, resync_reason: Option<String>) -> SourceResult<Round> {
        let mut ctx = Ctx::default();
        let mut acc = Acc::default();
        for id in self.sorted_groups() {
            self.read_group(&mut ctx, &id, true, None, &mut acc).await?;
        }
        self.finish(ctx, acc, true, resync_reason)
    }

    async fn incremental(&self, cursor: Cursor) -> SourceResult<Round> {
        let mut ctx = Ctx::default();
        let mut acc = Acc::default();
        let search = format!("lastUpdated gt \"{}\"", cursor.since);
        let url = self.url(
            &["api", "v1", "users"],
            &[("search", &search), ("limit", PAGE)],
        )?;
        let users: Vec<OktaUser> = self
            .get_all(
                &mut ctx,
                url,
                "okta: reading the users changed since the last pull",
            )
            .await?
            .unwrap_or_default();
        for u in users {
            ctx.saw(&u);
            if acc.emitted.insert(u.id.clone()) {
                acc.changes.push(Change::User(map_user(u)));
            }
        }
        for id in self.sorted_groups() {
            let before = cursor.marks.get(&id);
            self.read_group(&mut ctx, &id, false, before, &mut acc)
                .await?;
        }
        self.finish(ctx, acc, false, None)
    }

    fn finish(
        &self,
        ctx: Ctx,
        Acc { changes, marks, .. }: Acc,
        full: bool,
        resync_reason: Option<String>,
    ) -> SourceResult<Round> {
        let cursor = Cursor {
            okta: 1,
            groups: self.sorted_groups(),
            since: format_time(ctx.next_since()),
            marks,
        };
        let cursor = serde_json::to_string(&cursor)
            .map_err(|e| SourceError::Protocol(format!("okta: encoding the cursor: {e}")))?;
        Ok(Round {
            changes,
            full,
            cursor,
            resync_reason,
            requests: ctx.requests,
        })
    }
}

#[async_trait]
impl Source for OktaSource {
    fn kind(&self) -> &'static str {
        "okta"
    }

    async fn pull(&self, cursor: Option<&str>) -> SourceResult<Round> {
        let Some(raw) = cursor else {
            return self.full(None).await;
        };
        match serde_json::from_str::<Cursor>(raw) {
            Ok(c) if c.okta == 1 && parse_time(&c.since).is_some() => {
                if c.groups == self.sorted_groups() {
                    self.incremental(c).await
                } else {
                    self.full(Some("the configured Okta groups changed".into()))
                        .await
                }
            }
            _ => {
                self.full(Some(
                    "the stored cursor is not an Okta cursor of this version".into(),
                ))
                .await
            }
        }
    }

    async fn user(&self, id: &str) -> SourceResult<Option<SourceUser>> {
        let mut ctx = Ctx::default();
        let url = self.url(&["api", "v1", "users", id], &[])?;
        Ok(self
            .get::<OktaUser>(&mut ctx, &url, &format!("okta: reading user {id}"))
            .await?
            .map(|(u, _)| map_user(u)))
    }

    async fn check(&self) -> SourceResult<CheckReport> {
        let mut ctx = Ctx::default();
        let identity = match &self.credential {
            OktaCredential::ApiToken(_) => {
                let url = self.url(&["api", "v1", "users", "me"], &[])?;
                // The token's owner when the token may read it; a wrong token stops here.
                match self
                    .try_get::<serde_json::Value>(&mut ctx, &url, "okta: reading the token's owner")
                    .await?
                {
                    Fetched::Found(me, _) => match me["profile"]["login"].as_str() {
                        Some(login) => format!("API token of {login}"),
                        None => "API token".into(),
                    },
                    Fetched::Refused(StatusCode::UNAUTHORIZED, e) => return Err(e),
                    Fetched::NotFound | Fetched::Refused(..) => "API token".into(),
                }
            }
            OktaCredential::PrivateKey { client_id, .. } => {
                self.authorization(&mut ctx).await?;
                format!("OAuth service app {client_id}")
            }
        };
        let users_url = self.url(&["api", "v1", "users"], &[("limit", "1")])?;
        let users_ok = match self
            .get::<Vec<serde_json::Value>>(&mut ctx, &users_url, "okta: listing users")
            .await
        {
            Ok(_) => true,
            Err(SourceError::Config(_)) => false,
            Err(e) => return Err(e),
        };
        let mut groups_ok = true;
        let mut groups = Vec::new();
        for id in &self.groups {
            let read = async {
                let Some(g) = self.group(&mut ctx, id).await? else {
                    return Ok::<_, SourceError>(Err("not found".to_string()));
                };
                let count = self.members(&mut ctx, id).await?.map_or(0, |m| m.len());
                Ok(Ok((g.profile.name, count)))
            }
            .await;
            match read {
                Ok(Ok((name, count))) => groups.push((id.clone(), Ok(name), count)),
                Ok(Err(e)) => groups.push((id.clone(), Err(e), 0)),
                Err(SourceError::Config(e)) => {
                    groups_ok = false;
                    groups.push((id.clone(), Err(e), 0));
                }
                Err(e) => groups.push((id.clone(), Err(e.to_string()), 0)),
            }
        }
        if self.groups.is_empty() {
            let url = self.url(&["api", "v1", "groups"], &[("limit", "1")])?;
            groups_ok = !matches!(
                self.get::<Vec<serde_json::Value>>(&mut ctx, &url, "okta: listing groups")
                    .await,
                Err(SourceError::Config(_))
            );
        }
        Ok(CheckReport {
            identity,
            permissions: vec![
                ("okta.users.read".into(), users_ok),
                ("okta.groups.read".into(), groups_ok),
            ],
            groups,
        })
    }
}

/// Okta's throttling: pace each endpoint family by its rate-limit headers before a 429 is ever
/// reached; a 429 anyway waits for `Retry-After` or the bucket's reset.
struct Pacing<'a> {
    source: &'a OktaSource,
    family: String,
    ctx: &'a mut Ctx,
}

impl crate::http::Throttling for Pacing<'_> {
    fn sent(&mut self) {
        self.ctx.requests += 1;
    }

    async fn before(&mut self) {
        self.source.pace(&self.family).await;
    }

    fn observe(&mut self, resp: &reqwest::Response) {
        self.source.observe(&self.family, resp, self.ctx);
    }

    fn wait(&self, resp: &reqwest::Response) -> Option<Duration> {
        let retry_after = crate::http::retry_after(resp);
        match resp.status() {
            StatusCode::TOO_MANY_REQUESTS => Some(
                retry_after
                    .or_else(|| until_reset(resp))
                    .unwrap_or(Duration::from_secs(1))
                    .max(Duration::from_millis(100)),
            ),
            StatusCode::SERVICE_UNAVAILABLE => retry_after,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for s in [
            "ACTIVE",
            "PASSWORD_EXPIRED",
            "LOCKED_OUT",
            "RECOVERY",
            "PROVISIONED",
        ] {
            assert!(is_active_status(s), "{s}");
        }
        for s in ["STAGED", "SUSPENDED", "DEPROVISIONED", "SOMETHING_NEW"] {
            assert!(!is_active_status(s), "{s}");
        }
    }

    #[test]
    fn link_headers() {
        let mut h = header::HeaderMap::new();
        h.append(
            header::LINK,
            "<https://x.okta.com/api/v1/users?limit=2>; rel=\"self\""
                .parse()
                .unwrap(),
        );
        assert_eq!(next_link(&h), None);
        h.append(
            header::LINK,
            "<https://x.okta.com/api/v1/users?after=00u2&limit=2>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(
            next_link(&h).as_deref(),
            Some("https://x.okta.com/api/v1/users?after=00u2&limit=2")
        );
        let mut one = header::HeaderMap::new();
        one.insert(
            header::LINK,
            "<https://a/self>; rel=\"self\", <https://a/next>; rel=\"next\""
                .parse()
                .unwrap(),
        );
        assert_eq!(next_link(&one).as_deref(), Some("https://a/next"));
    }

    #[test]
    fn times() {
        let t = parse_time("2024-01-01T00:00:00.120Z").unwrap();
        assert_eq!(format_time(t), "2024-01-01T00:00:00.120Z");
        let d = parse_http_date("Mon, 07 Dec 2026 05:24:10 GMT").unwrap();
        assert_eq!(format_time(d), "2026-12-07T05:24:10.000Z");
        assert_eq!(
            family("/api/v1/groups/00g1/users"),
            "/api/v1/groups/*/users"
        );
        assert_eq!(family("/api/v1/users"), "/api/v1/users");
    }

    #[test]
    fn since_never_after_the_start() {
        let start = parse_time("2024-01-01T00:00:10.000Z").unwrap();
        let mut ctx = Ctx {
            started: Some(start),
            ..Ctx::default()
        };
        assert_eq!(format_time(ctx.next_since()), "2024-01-01T00:00:09.000Z");
        ctx.max_seen = parse_time("2024-01-01T00:00:05.000Z");
        assert_eq!(format_time(ctx.next_since()), "2024-01-01T00:00:05.000Z");
        ctx.max_seen = parse_time("2024-01-01T00:00:11.000Z");
        assert_eq!(format_time(ctx.next_since()), "2024-01-01T00:00:09.000Z");
    }

    #[test]
    fn display_name_falls_back_to_first_last() {
        let u = OktaUser {
            id: "00u1".into(),
            status: "SUSPENDED".into(),
            last_updated: None,
            profile: UserProfile {
                login: "a@x".into(),
                first_name: Some("Ada".into()),
                last_name: Some("Lovelace".into()),
                display_name: None,
                email: Some("a@x".into()),
            },
        };
        let s = map_user(u);
        assert_eq!(s.display_name.as_deref(), Some("Ada Lovelace"));
        assert!(!s.active);
        assert_eq!(s.user_name, "a@x");
    }
}
