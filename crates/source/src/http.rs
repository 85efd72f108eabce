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

/// Sends the request `make` builds, again after the `Retry-After` wait while the IdP answers
/// 429 or 503 and the total wait stays within [`THROTTLE_BUDGET`]; counts every request in
/// `requests`. Network errors are transient; any other status comes back to the caller.
pub async fn send(
    make: impl Fn() -> reqwest::RequestBuilder,
    requests: &mut u64,
    what: &str,
) -> SourceResult<Response> {
    let mut waited = Duration::ZERO;
    loop {
        *requests += 1;
        let resp = make()
            .send()
            .await
            .map_err(|e| SourceError::Transient(format!("{what}: {}", error_chain(&e))))?;
        let status = resp.status();
        if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
            let wait = retry_after(&resp).unwrap_or(Duration::from_secs(1));
            if waited + wait > THROTTLE_BUDGET {
                return Err(SourceError::Transient(format!(
                    "{what}: still throttled ({status}) after waiting {}s",
                    waited.as_secs()
                )));
            }
            metrics::counter!("teamcity_scim_source_throttled_total").increment(1);
            tracing::info!(what, status = status.as_u16(), wait_ms = wait.as_millis() as u64, "source: throttled, waiting as asked");
            tokio::time::sleep(wait).await;
            waited += wait;
            continue;
        }
        return Ok(resp);
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
