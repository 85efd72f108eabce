//! Shared state handed to every handler.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use store::DynStore;

use crate::auth::TokenCache;
use crate::limit::RateLimiter;

/// Request limits: sizes and time.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted on ordinary routes, in bytes.
    pub max_body: usize,
    /// `bulk.maxOperations`.
    pub bulk_max_operations: usize,
    /// `bulk.maxPayloadSize`, in bytes.
    pub bulk_max_payload: usize,
    /// Longest a request may take, body included (`None`: no limit); then a SCIM 503.
    pub request_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body: 1024 * 1024,
            bulk_max_operations: 1000,
            bulk_max_payload: 4 * 1024 * 1024,
            request_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// Everything handlers need.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The store.
    pub store: DynStore,
    /// The authentication snapshot.
    pub tokens: TokenCache,
    /// Size limits.
    pub limits: Limits,
    /// Prometheus renderer for `/metrics`, when metrics are enabled.
    pub metrics: Option<PrometheusHandle>,
    /// Per-token and failed-authentication rate limits (off unless configured).
    pub rate_limiter: RateLimiter,
    /// Small list responses, until the next resource write.
    pub lookups: std::sync::Arc<crate::lookup_cache::ResponseCache>,
    /// Why the process is not ready beyond its database (the sync engine: TeamCity unreachable,
    /// its token refused, a policy that does not match TeamCity), for `/healthz/ready`.
    pub readiness: Option<Readiness>,
    /// Pull mode: the directory comes from the IdP's API, and SCIM writes answer 405 with this
    /// reason (reads keep working).
    pub read_only: Option<std::sync::Arc<str>>,
    /// Groups lately counted too large to list in a PATCH response.
    pub(crate) large_groups: std::sync::Arc<crate::resources::LargeGroups>,
}

/// A check `/healthz/ready` asks: `None` when ready, else the reason.
#[derive(Clone)]
pub struct Readiness(pub std::sync::Arc<dyn Fn() -> Option<String> + Send + Sync>);

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Readiness(..)")
    }
}

impl AppState {
    /// State over a store with default limits.
    pub fn new(store: DynStore) -> Self {
        AppState {
            tokens: TokenCache::new(store.clone()),
            store,
            limits: Limits::default(),
            metrics: None,
            rate_limiter: RateLimiter::disabled(),
            lookups: std::sync::Arc::default(),
            readiness: None,
            read_only: None,
            large_groups: std::sync::Arc::default(),
        }
    }
}
