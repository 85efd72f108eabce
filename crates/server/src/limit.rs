//! Abuse resistance: per-token rate limiting, a per-peer limit on failed authentication, and
//! the whole-request timeout.
//!
//! * **Authenticated requests** are limited per token (the [`Actor`] the auth middleware put in
//!   the request) with a keyed GCRA limiter: `per_second` sustained, `burst` at once. Over the
//!   limit the answer is a SCIM 429 with `Retry-After` in whole seconds (rounded up).
//! * **Failed authentication** is limited per peer IP address, much more strictly: every 401
//!   spends one cell of `auth_failures_per_minute`. Once a peer is over that limit, *every*
//!   request from it is answered 429 before its token is even looked at, until the limiter
//!   allows another attempt — so guessing tokens is slow and a correct guess is not revealed by
//!   a different status while blocked. The peer is the TCP peer address, or with
//!   `trust_forwarded_for` the last `X-Forwarded-For` entry (the one our own proxy appended).
//!
//! Both limiters are off when their rate is 0; [`RateLimiter::disabled`] is the library default
//! (the `serve` command turns them on from `[server]`).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroU32;
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use scim::ScimError;

use crate::auth::Actor;
use crate::error::scim_error_response;
use crate::state::AppState;

/// Keys kept before idle ones are pruned.
const PRUNE_ABOVE: usize = 10_000;

/// Rate-limit settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Sustained requests per second per token; 0 turns per-token limiting off.
    pub per_second: u32,
    /// Requests a token may make at once above the sustained rate (at least 1).
    pub burst: u32,
    /// Failed authentications per minute per peer address; 0 turns this limit off.
    pub auth_failures_per_minute: u32,
    /// Take the peer address from the last `X-Forwarded-For` entry instead of the socket.
    pub trust_forwarded_for: bool,
}

impl RateLimitConfig {
    /// Everything off.
    pub const OFF: RateLimitConfig = RateLimitConfig {
        per_second: 0,
        burst: 0,
        auth_failures_per_minute: 0,
        trust_forwarded_for: false,
    };
}

/// The shared limiter state; cheap to clone.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: RateLimitConfig,
    clock: DefaultClock,
    tokens: Option<DefaultKeyedRateLimiter<String>>,
    failures: Option<DefaultKeyedRateLimiter<IpAddr>>,
    /// Peers over the failure limit, and until when.
    blocked: Mutex<HashMap<IpAddr, Instant>>,
}

impl RateLimiter {
    /// Limiters for `config`.
    pub fn new(config: RateLimitConfig) -> Self {
        let tokens = NonZeroU32::new(config.per_second).map(|rate| {
            let burst = NonZeroU32::new(config.burst).unwrap_or(NonZeroU32::MIN);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(rate).allow_burst(burst))
        });
        let failures = NonZeroU32::new(config.auth_failures_per_minute)
            .map(|rate| DefaultKeyedRateLimiter::keyed(Quota::per_minute(rate)));
        RateLimiter {
            inner: Arc::new(Inner {
                config,
                clock: DefaultClock::default(),
                tokens,
                failures,
                blocked: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// No limits.
    pub fn disabled() -> Self {
        RateLimiter::new(RateLimitConfig::OFF)
    }

    /// The settings.
    pub fn config(&self) -> RateLimitConfig {
        self.inner.config
    }

    /// Spends one request of `token`'s budget; `Err(wait)` when over the limit.
    pub fn check_token(&self, token: &str) -> Result<(), Duration> {
        let Some(limiter) = &self.inner.tokens else {
            return Ok(());
        };
        if limiter.len() > PRUNE_ABOVE {
            limiter.retain_recent();
        }
        limiter
            .check_key(&token.to_owned())
            .map_err(|not_until| not_until.wait_time_from(self.inner.clock.now()))
    }

    /// When `peer` is blocked for failing authentication too often, how long it still is.
    pub fn blocked_for(&self, peer: IpAddr) -> Option<Duration> {
        self.inner.failures.as_ref()?;
        let blocked = self.inner.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let until = *blocked.get(&peer)?;
        until.checked_duration_since(Instant::now())
    }

    /// Records a failed authentication from `peer`; `Err(wait)` once the peer is over the limit
    /// (it is then blocked for `wait`).
    pub fn record_failure(&self, peer: IpAddr) -> Result<(), Duration> {
        let Some(limiter) = &self.inner.failures else {
            return Ok(());
        };
        if limiter.len() > PRUNE_ABOVE {
            limiter.retain_recent();
        }
        match limiter.check_key(&peer) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.inner.clock.now());
                let now = Instant::now();
                let mut blocked = self.inner.blocked.lock().unwrap_or_else(|e| e.into_inner());
                if blocked.len() > PRUNE_ABOVE {
                    blocked.retain(|_, until| *until > now);
                }
                blocked.insert(peer, now + wait);
                Err(wait)
            }
        }
    }

    /// The address a request is limited under.
    pub fn peer(&self, headers: &HeaderMap, socket: Option<SocketAddr>) -> IpAddr {
        if self.inner.config.trust_forwarded_for
            && let Some(ip) = last_forwarded_for(headers)
        {
            return ip;
        }
        socket
            .map(|s| s.ip())
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
    }
}

/// The last address of the last `X-Forwarded-For` header: the one the nearest proxy appended.
fn last_forwarded_for(headers: &HeaderMap) -> Option<IpAddr> {
    let last = headers.get_all("x-forwarded-for").iter().next_back()?;
    let entry = last.to_str().ok()?.rsplit(',').next()?.trim();
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
}

/// A SCIM 429 with `Retry-After` in whole seconds, rounded up (at least 1).
pub fn too_many_requests(wait: Duration, detail: &str) -> Response {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    let secs = secs.max(1);
    let mut resp = scim_error_response(&ScimError::new(
        429,
        None,
        format!("{detail}; retry after {secs} s"),
    ));
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    resp
}

/// Middleware in front of every SCIM route, in one layer (each `from_fn` layer costs a state
/// clone and a boxed future per request): peers that failed authentication too often are
/// refused; the bearer token is checked ([`crate::auth::check_token`]); the token's rate limit
/// applies; and a 401 counts against its peer.
pub(crate) async fn scim_gate(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let peer = match blocked_peer(&state, &req) {
        ControlFlow::Continue(peer) => peer,
        ControlFlow::Break(resp) => return resp,
    };
    let resp = match crate::auth::check_token(&state, &mut req).await {
        ControlFlow::Break(resp) => resp,
        ControlFlow::Continue(()) => match token_limit(&state, &req) {
            ControlFlow::Break(resp) => resp,
            ControlFlow::Continue(()) => next.run(req).await,
        },
    };
    match peer {
        Some(peer) => count_failure(&state, peer, resp),
        None => resp,
    }
}

/// The per-token limit, after authentication: `Break` with the 429.
fn token_limit(state: &AppState, req: &Request) -> ControlFlow<Response> {
    if let Some(actor) = req.extensions().get::<Actor>()
        && let Err(wait) = state.rate_limiter.check_token(&actor.name)
    {
        metrics::counter!("scim_rate_limited_total", "reason" => "token").increment(1);
        return ControlFlow::Break(too_many_requests(wait, "too many requests for this token"));
    }
    ControlFlow::Continue(())
}

/// The peer a request's failed authentication counts against (`None` when that limit is
/// off), or `Break` with the 429 for a peer that is blocked.
fn blocked_peer(state: &AppState, req: &Request) -> ControlFlow<Response, Option<IpAddr>> {
    let limiter = &state.rate_limiter;
    if limiter.inner.failures.is_none() {
        return ControlFlow::Continue(None);
    }
    let socket = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let peer = limiter.peer(req.headers(), socket);
    if let Some(wait) = limiter.blocked_for(peer) {
        metrics::counter!("scim_rate_limited_total", "reason" => "auth_failures").increment(1);
        return ControlFlow::Break(too_many_requests(
            wait,
            "too many failed authentication attempts from this address",
        ));
    }
    ControlFlow::Continue(Some(peer))
}

/// Counts a 401 against its peer; the answer that blocks it is a 429.
fn count_failure(state: &AppState, peer: IpAddr, resp: Response) -> Response {
    if resp.status() == StatusCode::UNAUTHORIZED
        && let Err(wait) = state.rate_limiter.record_failure(peer)
    {
        tracing::warn!(%peer, "peer blocked after repeated authentication failures");
        metrics::counter!("scim_rate_limited_total", "reason" => "auth_failures").increment(1);
        return too_many_requests(
            wait,
            "too many failed authentication attempts from this address",
        );
    }
    resp
}

/// Middleware: the whole-request timeout (reading the body included). A request still running
/// after `limits.request_timeout` is dropped — a store write in it rolls back unless it had
/// committed — and answered 503 with a SCIM body.
pub(crate) async fn request_timeout(
    State(state): State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let Some(limit) = state.limits.request_timeout else {
        return next.run(req).await;
    };
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            metrics::counter!("scim_request_timeouts_total").increment(1);
            scim_error_response(&ScimError::new(
                503,
                None,
                format!(
                    "the request did not complete within {} ms (server.request_timeout); retry later",
                    limit.as_millis()
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_limit_then_other_token_unaffected() {
        let l = RateLimiter::new(RateLimitConfig {
            per_second: 1,
            burst: 2,
            ..RateLimitConfig::OFF
        });
        assert!(l.check_token("a").is_ok());
        assert!(l.check_token("a").is_ok());
        let wait = l.check_token("a").unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(l.check_token("b").is_ok());
    }

    #[test]
    fn off_means_unlimited() {
        let l = RateLimiter::disabled();
        for _ in 0..10_000 {
            assert!(l.check_token("a").is_ok());
        }
        let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
        for _ in 0..1000 {
            assert!(l.record_failure(ip).is_ok());
        }
        assert_eq!(l.blocked_for(ip), None);
    }

    #[test]
    fn failures_block_the_peer() {
        let l = RateLimiter::new(RateLimitConfig {
            auth_failures_per_minute: 2,
            ..RateLimitConfig::OFF
        });
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert!(l.record_failure(ip).is_ok());
        assert!(l.record_failure(ip).is_ok());
        assert!(l.record_failure(ip).is_err());
        assert!(l.blocked_for(ip).is_some());
        assert_eq!(l.blocked_for(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2))), None);
    }

    #[test]
    fn forwarded_for_only_when_trusted() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 203.0.113.9"),
        );
        let sock: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let plain = RateLimiter::disabled();
        assert_eq!(plain.peer(&h, Some(sock)), sock.ip());
        let trusting = RateLimiter::new(RateLimitConfig {
            trust_forwarded_for: true,
            ..RateLimitConfig::OFF
        });
        assert_eq!(
            trusting.peer(&h, Some(sock)),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        assert_eq!(trusting.peer(&HeaderMap::new(), Some(sock)), sock.ip());
    }

    #[test]
    fn retry_after_rounds_up() {
        let r = too_many_requests(Duration::from_millis(1500), "slow down");
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "2");
        let r = too_many_requests(Duration::from_millis(10), "slow down");
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }
}
