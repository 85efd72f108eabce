//! HTTP shared by the sources: one client, throttling honoured, errors classified.

use std::time::Duration;

use reqwest::{Response, StatusCode};

use crate::{SourceError, SourceResult, THROTTLE_BUDGET};

/// An HTTP client for an IdP API (rustls, timeouts).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .user_agent(concat!("teamcity-scim/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a reqwest client with rustls builds")
}

/// The `Retry-After` of a response, in seconds (the IdPs send delta-seconds; an HTTP date is
/// read as 1 s), capped at 60 s.
pub fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp.headers().get(reqwest::header::RETRY_AFTER)?;
    let secs = v.to_str().ok()?.trim().parse::<u64>().unwrap_or(1);
    Some(Duration::from_secs(secs.min(60)))
}

/// What a source does around each attempt of a request: count it, pace before it, read the
/// answer's rate-limit headers, and say how long to wait when the answer asks for a retry.
pub trait Throttling: Send {
    /// Called for every attempt (the request is counted).
    fn sent(&mut self);

    /// Called before every attempt, e.g. to wait for a rate-limit window to reset.
    fn before(&mut self) -> impl std::future::Future<Output = ()> + Send {
        async {}
    }

    /// Called with every answer.
    fn observe(&mut self, _resp: &Response) {}

    /// How long to wait before the next attempt, when the answer is throttling: 429 (1 s when
    /// the IdP names no wait), or 503 with `Retry-After` — without it a 503 is an outage, and
    /// the round fails at once as transient (the next interval tries again).
    fn wait(&self, resp: &Response) -> Option<Duration> {
        match resp.status() {
            StatusCode::TOO_MANY_REQUESTS => {
                Some(retry_after(resp).unwrap_or(Duration::from_secs(1)))
            }
            StatusCode::SERVICE_UNAVAILABLE => retry_after(resp),
            _ => None,
        }
    }
}

/// The plain policy: `Retry-After`, counted in the given counter.
#[derive(Debug)]
pub struct RetryAfter<'a>(pub &'a mut u64);

impl Throttling for RetryAfter<'_> {
    fn sent(&mut self) {
        *self.0 += 1;
    }
}

/// Sends the request `make` builds with the plain policy ([`RetryAfter`]).
pub async fn send(
    make: impl Fn() -> reqwest::RequestBuilder,
    requests: &mut u64,
    what: &str,
) -> SourceResult<Response> {
    send_with(make, &mut RetryAfter(requests), what).await
}

/// Sends the request `make` builds, again after the wait `policy` names while the IdP throttles
/// and the total wait stays within [`THROTTLE_BUDGET`]. Network errors are transient; any other
/// answer comes back to the caller.
pub async fn send_with(
    make: impl Fn() -> reqwest::RequestBuilder,
    policy: &mut impl Throttling,
    what: &str,
) -> SourceResult<Response> {
    let mut waited = Duration::ZERO;
    loop {
        policy.before().await;
        policy.sent();
        let resp = make()
            .send()
            .await
            .map_err(|e| SourceError::Transient(format!("{what}: {}", error_chain(&e))))?;
        policy.observe(&resp);
        let status = resp.status();
        let Some(wait) = policy.wait(&resp) else {
            return Ok(resp);
        };
        if waited + wait > THROTTLE_BUDGET {
            return Err(SourceError::Transient(format!(
                "{what}: still throttled ({status}) after waiting {}s",
                waited.as_secs()
            )));
        }
        metrics::counter!("teamcity_scim_source_throttled_total").increment(1);
        tracing::info!(
            what,
            status = status.as_u16(),
            wait_ms = wait.as_millis() as u64,
            "source: throttled, waiting as asked"
        );
        tokio::time::sleep(wait).await;
        waited += wait;
    }
}

/// A reqwest error with its sources, for messages.
pub fn error_chain(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    let mut cur: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Classifies a non-success answer: 401/403 mean the bridge's credentials or permissions are
/// wrong (`Config`, with `hint` saying what to fix), 5xx are transient, the rest protocol.
pub fn status_error(what: &str, status: StatusCode, body: &str, hint: &str) -> SourceError {
    let body: String = body.chars().take(300).collect();
    match status.as_u16() {
        401 | 403 => SourceError::Config(format!("{what}: {status}: {body} — {hint}")),
        500..=599 => SourceError::Transient(format!("{what}: {status}: {body}")),
        _ => SourceError::Protocol(format!("{what}: {status}: {body}")),
    }
}
