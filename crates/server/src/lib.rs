//! The HTTP surface of teamcity-scim: the SCIM 2.0 routes under a base path, bearer-token
//! authentication, `/healthz`, `/readyz` and `/metrics`.
//!
//! Handlers are thin: parse with `scim`, make one store call, render. Nothing here calls
//! TeamCity — a write reaches TeamCity only through the outbox row its store command writes.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, any, get, post};
use scim::{ResourceKind, ScimError};
use store::WriteCtx;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

pub mod admin;
pub mod auth;
mod bulk;
mod discovery;
pub mod error;
mod extract;
pub mod limit;
pub mod lookup_cache;
mod render;
mod reply;
mod resources;
pub mod state;
pub mod tls;

pub use auth::{generate_token, hash_token};
pub use limit::{RateLimitConfig, RateLimiter};
pub use state::{AppState, Limits, Readiness};

use error::{ApiError, ApiResult, scim_error_response};
use extract::{Params, read_json};
use reply::Reply;
use resources::ListParams;

/// The SCIM base path.
pub const BASE_PATH: &str = "/scim/v2";

/// The absolute SCIM base URL as the client addressed us (`Host`, and `X-Forwarded-Proto` from
/// a reverse proxy).
fn base_url(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    let proto = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or("http");
    format!("{proto}://{host}{BASE_PATH}")
}

fn write_ctx(req_headers: &HeaderMap, actor: &auth::Actor) -> WriteCtx {
    WriteCtx {
        actor: actor.name.clone(),
        request_id: req_headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn respond(r: ApiResult<Reply>) -> Response {
    match r {
        Ok(reply) => reply.into_response(),
        Err(e) => e.into_response(),
    }
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    scim_error_response(&ScimError::new(
        405,
        None,
        format!("{method} is not allowed on {}", uri.path()),
    ))
}

async fn not_found(uri: Uri) -> Response {
    scim_error_response(&ScimError::not_found(format!(
        "no SCIM endpoint at {}",
        uri.path()
    )))
}

fn collection(kind: ResourceKind) -> MethodRouter<AppState> {
    get(
        move |State(s): State<AppState>, headers: HeaderMap, uri: Uri| async move {
            let r = async {
                let p = ListParams::from_params(&Params::from_query(uri.query()))?;
                resources::list(&s, &base_url(&headers), kind, &p).await
            };
            respond(r.await)
        },
    )
    .post(
        move |State(s): State<AppState>,
              axum::Extension(actor): axum::Extension<auth::Actor>,
              headers: HeaderMap,
              uri: Uri,
              body: Body| async move {
            let r = async {
                let proj = Params::from_query(uri.query()).projection()?;
                let json = read_json(&headers, body, s.limits.max_body).await?;
                let ctx = write_ctx(&headers, &actor);
                Ok::<_, ApiError>(
                    resources::create(&s, &ctx, &base_url(&headers), kind, &json, &proj)
                        .await?
                        .1,
                )
            };
            respond(r.await)
        },
    )
    .fallback(method_not_allowed)
}

fn search(kind: Option<ResourceKind>) -> MethodRouter<AppState> {
    post(
        move |State(s): State<AppState>, headers: HeaderMap, body: Body| async move {
            let r = async {
                let json = read_json(&headers, body, s.limits.max_body).await?;
                let p = ListParams::from_search_body(&json)?;
                let base = base_url(&headers);
                match kind {
                    Some(k) => resources::list(&s, &base, k, &p).await,
                    None => resources::search_all(&s, &base, &p).await,
                }
            };
            respond(r.await)
        },
    )
    .fallback(method_not_allowed)
}

fn item(kind: ResourceKind) -> MethodRouter<AppState> {
    get(move |State(s): State<AppState>, Path(id): Path<String>, headers: HeaderMap, uri: Uri| async move {
        let r = async {
            let proj = Params::from_query(uri.query()).projection()?;
            resources::get(&s, &base_url(&headers), kind, &id, &proj, header_str(&headers, header::IF_NONE_MATCH)).await
        };
        respond(r.await)
    })
    .put(
        move |State(s): State<AppState>,
              axum::Extension(actor): axum::Extension<auth::Actor>,
              Path(id): Path<String>,
              headers: HeaderMap,
              uri: Uri,
              body: Body| async move {
            let r = async {
                let proj = Params::from_query(uri.query()).projection()?;
                let json = read_json(&headers, body, s.limits.max_body).await?;
                let ctx = write_ctx(&headers, &actor);
                let if_match = header_str(&headers, header::IF_MATCH);
                resources::replace(&s, &ctx, &base_url(&headers), kind, &id, &json, if_match, &proj).await
            };
            respond(r.await)
        },
    )
    .patch(
        move |State(s): State<AppState>,
              axum::Extension(actor): axum::Extension<auth::Actor>,
              Path(id): Path<String>,
              headers: HeaderMap,
              uri: Uri,
              body: Body| async move {
            let r = async {
                let proj = Params::from_query(uri.query()).projection()?;
                let json = read_json(&headers, body, s.limits.max_body).await?;
                let ctx = write_ctx(&headers, &actor);
                let if_match = header_str(&headers, header::IF_MATCH);
                resources::patch(&s, &ctx, &base_url(&headers), kind, &id, &json, if_match, &proj).await
            };
            respond(r.await)
        },
    )
    .delete(
        move |State(s): State<AppState>,
              axum::Extension(actor): axum::Extension<auth::Actor>,
              Path(id): Path<String>,
              headers: HeaderMap| async move {
            let ctx = write_ctx(&headers, &actor);
            respond(resources::delete(&s, &ctx, kind, &id, header_str(&headers, header::IF_MATCH)).await)
        },
    )
    .fallback(method_not_allowed)
}

fn discovery_routes() -> Router<AppState> {
    let spc = get(|State(s): State<AppState>, headers: HeaderMap| async move {
        Reply::ok(discovery::service_provider_config(
            &base_url(&headers),
            &s.limits,
        ))
    })
    .fallback(method_not_allowed);
    Router::new()
        .route("/ServiceProviderConfig", spc)
        .route(
            "/ResourceTypes",
            get(|headers: HeaderMap| async move { Reply::ok(discovery::resource_types(&base_url(&headers))) })
                .fallback(method_not_allowed),
        )
        .route(
            "/ResourceTypes/{id}",
            get(|Path(id): Path<String>, headers: HeaderMap| async move {
                respond(discovery::resource_type(&base_url(&headers), &id).map(Reply::ok).map_err(ApiError))
            })
            .fallback(method_not_allowed),
        )
        .route(
            "/Schemas",
            get(|headers: HeaderMap| async move { Reply::ok(discovery::schemas(&base_url(&headers))) })
                .fallback(method_not_allowed),
        )
        .route(
            "/Schemas/{id}",
            get(|Path(id): Path<String>, headers: HeaderMap| async move {
                respond(discovery::schema_doc(&base_url(&headers), &id).map(Reply::ok).map_err(ApiError))
            })
            .fallback(method_not_allowed),
        )
}

/// The SCIM router (to be nested under [`BASE_PATH`]), authenticated.
fn scim_router(state: AppState) -> Router<AppState> {
    let bulk = post(
        |State(s): State<AppState>,
         axum::Extension(actor): axum::Extension<auth::Actor>,
         headers: HeaderMap,
         body: Body| async move {
            let r = async {
                let json = read_json(&headers, body, s.limits.bulk_max_payload).await.map_err(|e| {
                    if e.status == 413 {
                        ScimError::new(
                            413,
                            None,
                            format!("the bulk request is larger than {} bytes (bulk.maxPayloadSize)", s.limits.bulk_max_payload),
                        )
                    } else {
                        e
                    }
                })?;
                let ctx = write_ctx(&headers, &actor);
                bulk::bulk(&s, &ctx, &base_url(&headers), &json).await
            };
            respond(r.await)
        },
    )
    .fallback(method_not_allowed);
    Router::new()
        .route("/Users", collection(ResourceKind::User))
        .route("/Users/.search", search(Some(ResourceKind::User)))
        .route("/Users/{id}", item(ResourceKind::User))
        .route("/Groups", collection(ResourceKind::Group))
        .route("/Groups/.search", search(Some(ResourceKind::Group)))
        .route("/Groups/{id}", item(ResourceKind::Group))
        .route("/.search", search(None))
        .route("/Bulk", bulk)
        .route(
            "/Me",
            any(|| async {
                scim_error_response(&ScimError::new(
                    501,
                    None,
                    "/Me is not implemented: a SCIM client token is not a user of this service",
                ))
            }),
        )
        .merge(discovery_routes())
        .fallback(not_found)
        // Inside the gate: only an authenticated client learns that writes are refused.
        .layer(middleware::from_fn_with_state(
            state.clone(),
            refuse_writes_in_pull_mode,
        ))
        // Peers that keep failing authentication are blocked for a while; then the token;
        // then the token's rate limit. `layer`, not `route_layer`: unknown paths under the
        // base need a token too, so an unauthenticated client learns nothing about which
        // endpoints exist.
        .layer(middleware::from_fn_with_state(state, limit::scim_gate))
}

/// Pull mode: every SCIM write (POST, PUT, PATCH, DELETE — searches excepted) answers 405 with
/// a SCIM error saying where the directory comes from; reads go on.
async fn refuse_writes_in_pull_mode(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let Some(reason) = &s.read_only else {
        return next.run(req).await;
    };
    let write = matches!(
        *req.method(),
        axum::http::Method::POST
            | axum::http::Method::PUT
            | axum::http::Method::PATCH
            | axum::http::Method::DELETE
    ) && !req.uri().path().ends_with("/.search");
    if !write {
        return next.run(req).await;
    }
    let mut resp = scim_error_response(&ScimError::new(405, None, reason.to_string()));
    resp.headers_mut()
        .insert(header::ALLOW, axum::http::HeaderValue::from_static("GET"));
    resp
}

/// A label value that lives as long as the process: routes, methods and statuses are a small
/// fixed set, so each distinct value is allocated once instead of on every request.
fn interned(value: &str) -> &'static str {
    static SEEN: std::sync::Mutex<std::collections::BTreeSet<&'static str>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(v) = seen.get(value) {
        return v;
    }
    let v: &'static str = Box::leak(value.to_owned().into_boxed_str());
    seen.insert(v);
    v
}

/// The identity provider family of a request, from its `User-Agent`, as a bounded metric label:
/// `okta` (`Okta SCIM Client …`), `entra` (Microsoft's provisioning service), or `other`.
pub fn client_family(user_agent: Option<&str>) -> &'static str {
    let ua = user_agent.unwrap_or_default().to_ascii_lowercase();
    if ua.contains("okta") {
        "okta"
    } else if ua.contains("azure") || ua.contains("microsoft") || ua.contains("entra") {
        "entra"
    } else {
        "other"
    }
}

async fn track_metrics(req: Request, next: Next) -> Response {
    let start = Instant::now();
    // Only matched routes (a fixed set) become labels; anything else is `unmatched`.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| interned(p.as_str()));
    let method = match *req.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "other",
    };
    let client = client_family(
        req.headers()
            .get(axum::http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok()),
    );
    let resp = next.run(req).await;
    let status = interned(resp.status().as_str());
    metrics::counter!("scim_requests_total", "method" => method, "route" => route, "status" => status, "client" => client)
        .increment(1);
    metrics::histogram!("scim_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// The span of one request: method, path and request id. Never the query string: SCIM filters
/// carry user names and email addresses (`filter=userName eq "…"`), which must not reach logs.
fn request_span(req: &axum::http::Request<Body>) -> tracing::Span {
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!(
        "request",
        method = req.method().as_str(),
        path = req.uri().path(),
        request_id
    )
}

/// Request ids for requests that bring none: UUID-shaped, a random per-process half and a
/// counter half, so making one needs no system call (a random UUID per request asked the
/// kernel for entropy every time).
#[derive(Debug, Clone)]
struct RequestIds {
    prefix: u64,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Default for RequestIds {
    fn default() -> Self {
        let p = uuid::Uuid::new_v4().as_u64_pair().0;
        RequestIds {
            prefix: p,
            next: Arc::default(),
        }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = uuid::Uuid::from_u64_pair(self.prefix, n);
        axum::http::HeaderValue::from_str(&id.hyphenated().to_string())
            .ok()
            .map(RequestId::new)
    }
}

/// `/healthz/ready` (and `/readyz`): 200 `{"ready": true}` when the database answers and the
/// sync engine can work; else 503 `{"ready": false, "reason": "…"}` saying what to fix.
async fn ready(State(s): State<AppState>) -> axum::response::Response {
    let reason = match s.store.list_tokens().await {
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            Some(format!("the database is unavailable: {e}"))
        }
        Ok(_) => s.readiness.as_ref().and_then(|r| (r.0)()),
    };
    match reason {
        None => (
            StatusCode::OK,
            axum::Json(serde_json::json!({"ready": true})),
        )
            .into_response(),
        Some(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(serde_json::json!({"ready": false, "reason": reason})),
        )
            .into_response(),
    }
}

/// The whole application router.
pub fn router(state: AppState) -> Router {
    let scim = scim_router(state.clone());
    Router::new()
        .nest(BASE_PATH, scim)
        .route("/healthz", get(|| async { "ok" }))
        .route("/healthz/live", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/healthz/ready", get(ready))
        .route(
            "/metrics",
            get(|State(s): State<AppState>| async move {
                match &s.metrics {
                    Some(h) => (StatusCode::OK, h.render()).into_response(),
                    None => (StatusCode::NOT_FOUND, "metrics are disabled").into_response(),
                }
            }),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit::request_timeout,
        ))
        .layer(middleware::from_fn(track_metrics))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(TraceLayer::new_for_http().make_span_with(request_span))
        .layer(SetRequestIdLayer::x_request_id(RequestIds::default()))
        .with_state(state)
}

/// How [`serve_with`] runs connections.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Longest wait for a request's head: from accepting a connection to its first request
    /// (TLS handshake and protocol detection included), and for each later request head on a
    /// kept-alive HTTP/1.1 connection. A client that is slower is disconnected.
    pub header_read_timeout: Duration,
    /// HTTPS: the certificate in service, reloaded from its files. `None` serves plain HTTP.
    pub tls: Option<Arc<tls::ReloadingCert>>,
    /// Longest wait for in-flight requests after shutdown was asked for.
    pub drain_timeout: Duration,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            header_read_timeout: Duration::from_secs(10),
            tls: None,
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves the application on `listener` over plain HTTP with default [`ServeOptions`] until
/// `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, state, ServeOptions::default(), shutdown).await
}

/// Serves the application on `listener` (HTTP/1.1 and HTTP/2, over TLS when
/// `options.tls` is set) until `shutdown` resolves, then drains in-flight requests for at most
/// `options.drain_timeout`.
///
/// The accept loop is hyper-util's rather than `axum::serve` so that slow clients are cut off
/// ([`ServeOptions::header_read_timeout`]) and the peer address reaches the rate limiter as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    state: AppState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_router(listener, router(state), options, shutdown).await
}

/// Serves the read-only dashboard ([`admin::router`]) on its own listener, with the same
/// connection handling as [`serve_with`].
pub async fn serve_admin(
    listener: tokio::net::TcpListener,
    state: admin::AdminState,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = admin::router(state).layer(TraceLayer::new_for_http().make_span_with(request_span));
    serve_router(listener, app, options, shutdown).await
}

/// The accept loop behind [`serve_with`] and [`serve_admin`].
async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use hyper_util::server::conn::auto;
    use hyper_util::server::graceful::GracefulShutdown;
    use hyper_util::service::TowerToHyperService;
    use tower::ServiceExt as _;

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let builder = Arc::new(builder);
    let acceptor = match &options.tls {
        Some(cert) => Some(tokio_rustls::TlsAcceptor::from(Arc::new(
            cert.server_config().map_err(std::io::Error::other)?,
        ))),
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    if let Some(cert) = &options.tls {
        let mut rx = stop_rx.clone();
        tokio::spawn(cert.clone().watch(async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }));
    }
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        // Set once the first request head has been read: until then the connection is on
        // the clock (TLS handshake, HTTP/2 preface and first head within header_read_timeout).
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = started.clone();
        let svc =
            app.clone()
                .map_request(move |mut req: axum::http::Request<hyper::body::Incoming>| {
                    seen.store(true, std::sync::atomic::Ordering::Relaxed);
                    req.extensions_mut()
                        .insert(axum::extract::ConnectInfo(peer));
                    req
                });
        let svc = TowerToHyperService::new(svc);
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let acceptor = acceptor.clone();
        let first_deadline = options.header_read_timeout;
        tokio::spawn(async move {
            let serve = async {
                match acceptor {
                    None => {
                        watcher
                            .watch(
                                builder.serve_connection_with_upgrades(TokioIo::new(stream), svc),
                            )
                            .await
                    }
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(tls) => {
                            watcher
                                .watch(
                                    builder.serve_connection_with_upgrades(TokioIo::new(tls), svc),
                                )
                                .await
                        }
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            Ok(())
                        }
                    },
                }
            };
            let first_request = async {
                tokio::time::sleep(first_deadline).await;
                if started.load(std::sync::atomic::Ordering::Relaxed) {
                    // Later requests are hyper's header_read_timeout's business.
                    std::future::pending::<()>().await;
                }
            };
            tokio::select! {
                result = serve => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                () = first_request => {
                    tracing::debug!(%peer, "no request within header_read_timeout; connection closed");
                }
            }
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    if tokio::time::timeout(options.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "in-flight requests did not finish within {:?}; closing their connections",
            options.drain_timeout
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::client_family;

    #[test]
    fn client_family_from_the_user_agent() {
        let cases = [
            (Some("Okta SCIM Client 1.0.0"), "okta"),
            (Some("Microsoft.AzureAD.Provisioning/1.0"), "entra"),
            (Some("Microsoft Entra Provisioning"), "entra"),
            (Some("python-requests/2.31"), "other"),
            (Some(""), "other"),
            (None, "other"),
        ];
        for (ua, want) in cases {
            assert_eq!(client_family(ua), want, "{ua:?}");
        }
    }
}
