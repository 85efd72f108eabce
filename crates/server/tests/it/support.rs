//! The test harness: a real server on `127.0.0.1:0` over a fresh SQLite file, a bearer token,
//! and a small SCIM client over reqwest.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime};

use reqwest::Method;
use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};
use server::{AppState, Limits};
use store::DynStore;
use tokio::sync::oneshot;

pub(crate) const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub(crate) const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub(crate) const ENTERPRISE: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub(crate) const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";
pub(crate) const LIST_RESPONSE: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub(crate) const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
pub(crate) const BULK_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:BulkRequest";
pub(crate) const SEARCH_REQUEST: &str = "urn:ietf:params:scim:api:messages:2.0:SearchRequest";

/// 32 bytes that differ on every call (not cryptographic; test tokens only).
pub(crate) fn random_bytes() -> [u8; 32] {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    server::hash_token(&format!(
        "{n}-{now}-{:?}-{}",
        Instant::now(),
        std::process::id()
    ))
}

/// A running server with its own database and one valid token.
#[derive(Debug)]
pub(crate) struct Server {
    /// `http://127.0.0.1:PORT/scim/v2`.
    pub(crate) base: String,
    /// The same store handle the server uses.
    pub(crate) store: DynStore,
    /// A valid bearer token.
    pub(crate) token: String,
    client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

/// A response, fully read.
#[derive(Debug)]
pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) text: String,
    /// The body as JSON (`Null` when empty or not JSON).
    pub(crate) body: Value,
}

impl Resp {
    /// A header as a string.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status, showing the body on failure.
    #[track_caller]
    pub(crate) fn expect(&self, status: u16) -> &Self {
        assert_eq!(
            self.status, status,
            "unexpected status; body: {}",
            self.text
        );
        self
    }

    /// Asserts a SCIM error with this status and `scimType` (`None`: no scimType required),
    /// a non-empty detail and the SCIM media type.
    #[track_caller]
    pub(crate) fn expect_error(&self, status: u16, scim_type: Option<&str>) -> &Self {
        self.expect(status);
        assert_eq!(self.body["schemas"], json!([ERROR_SCHEMA]), "{}", self.text);
        assert_eq!(
            self.body["status"],
            json!(status.to_string()),
            "{}",
            self.text
        );
        let detail = self.body["detail"].as_str().unwrap_or("");
        assert!(
            detail.len() > 5,
            "error detail is not useful: {}",
            self.text
        );
        if let Some(t) = scim_type {
            assert_eq!(self.body["scimType"], json!(t), "{}", self.text);
        }
        assert_scim_json(self);
        self
    }

    /// `Resources` of a ListResponse.
    pub(crate) fn resources(&self) -> &Vec<Value> {
        self.body["Resources"]
            .as_array()
            .unwrap_or_else(|| panic!("no Resources array: {}", self.text))
    }

    /// `detail` of an error body.
    pub(crate) fn detail(&self) -> &str {
        self.body["detail"].as_str().unwrap_or("")
    }
}

/// Asserts `Content-Type: application/scim+json`.
#[track_caller]
pub(crate) fn assert_scim_json(r: &Resp) {
    let ct = r.header("content-type").unwrap_or("");
    assert!(
        ct.starts_with("application/scim+json"),
        "content-type `{ct}` for status {}",
        r.status
    );
}

impl Server {
    /// A server with default limits.
    pub(crate) async fn start() -> Server {
        Server::with_limits(Limits::default()).await
    }

    /// A server with the given limits.
    pub(crate) async fn with_limits(limits: Limits) -> Server {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/t.db", dir.path().display());
        let store = store::open(&url, Arc::new(store::SystemClock))
            .await
            .expect("open store");
        let token = server::generate_token(random_bytes());
        store
            .create_token(
                &store::WriteCtx::cli(),
                "test",
                server::hash_token(&token),
                None,
            )
            .await
            .expect("create token");
        let mut state = AppState::new(store.clone());
        state.limits = limits;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = server::serve(listener, state, async move {
                let _ = rx.await;
            })
            .await;
        });
        Server {
            base: format!("http://{addr}/scim/v2"),
            store,
            token,
            client: reqwest::Client::builder().build().expect("client"),
            shutdown: Some(tx),
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT` without the SCIM base path.
    pub(crate) fn origin(&self) -> String {
        self.base.trim_end_matches("/scim/v2").to_owned()
    }

    /// Creates another valid token.
    pub(crate) async fn new_token(
        &self,
        expires: Option<time::OffsetDateTime>,
    ) -> (String, String) {
        let secret = server::generate_token(random_bytes());
        let rec = self
            .store
            .create_token(
                &store::WriteCtx::cli(),
                "extra",
                server::hash_token(&secret),
                expires,
            )
            .await
            .expect("create token");
        (secret, rec.id)
    }

    /// An authenticated request builder for `path` (relative to the SCIM base, or absolute).
    pub(crate) fn req(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.raw(method, path).bearer_auth(&self.token)
    }

    /// An unauthenticated request builder.
    pub(crate) fn raw(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let url = if path.starts_with("http") {
            path.to_owned()
        } else {
            format!("{}{path}", self.base)
        };
        self.client.request(method, url)
    }

    /// Sends a request and reads the whole response.
    pub(crate) async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let r = rb.send().await.expect("request failed");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.expect("body");
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Resp {
            status,
            headers,
            text,
            body,
        }
    }

    fn with_json(rb: reqwest::RequestBuilder, body: &Value) -> reqwest::RequestBuilder {
        rb.header(
            reqwest::header::CONTENT_TYPE,
            HeaderValue::from_static("application/scim+json"),
        )
        .body(body.to_string())
    }

    pub(crate) async fn get(&self, path: &str) -> Resp {
        self.send(self.req(Method::GET, path)).await
    }

    pub(crate) async fn post(&self, path: &str, body: &Value) -> Resp {
        self.send(Self::with_json(self.req(Method::POST, path), body))
            .await
    }

    pub(crate) async fn put(&self, path: &str, body: &Value) -> Resp {
        self.send(Self::with_json(self.req(Method::PUT, path), body))
            .await
    }

    pub(crate) async fn patch(&self, path: &str, body: &Value) -> Resp {
        self.send(Self::with_json(self.req(Method::PATCH, path), body))
            .await
    }

    pub(crate) async fn delete(&self, path: &str) -> Resp {
        self.send(self.req(Method::DELETE, path)).await
    }

    /// A request with a JSON body and extra headers.
    pub(crate) async fn send_json(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Resp {
        let mut rb = Self::with_json(self.req(method, path), body);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        self.send(rb).await
    }

    /// Creates a user and returns its id.
    pub(crate) async fn create_user(&self, user_name: &str) -> String {
        let r = self.post("/Users", &user(user_name)).await;
        r.expect(201);
        r.body["id"].as_str().expect("id").to_owned()
    }

    /// Creates a group (with member ids) and returns its id.
    pub(crate) async fn create_group(&self, name: &str, members: &[&str]) -> String {
        let members: Vec<Value> = members.iter().map(|m| json!({"value": m})).collect();
        let r = self
            .post(
                "/Groups",
                &json!({"schemas": [GROUP_SCHEMA], "displayName": name, "members": members}),
            )
            .await;
        r.expect(201);
        r.body["id"].as_str().expect("id").to_owned()
    }

    /// The stored resource's body text (for byte-identical comparisons).
    pub(crate) async fn snapshot(&self, path: &str) -> String {
        let r = self.get(path).await;
        r.expect(200);
        r.text
    }

    /// Sorted member ids of a group, as stored.
    pub(crate) async fn member_ids(&self, group_id: &str) -> Vec<String> {
        let r = self.get(&format!("/Groups/{group_id}")).await;
        r.expect(200);
        let mut ids: Vec<String> = r.body["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| m["value"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// Audit and outbox row counts.
    pub(crate) async fn trail_counts(&self) -> (usize, usize) {
        let a = self.store.audit_events(0, 100_000).await.expect("audit");
        let o = self.store.outbox_items(0, 100_000).await.expect("outbox");
        (a.len(), o.len())
    }
}

/// A minimal user body.
pub(crate) fn user(user_name: &str) -> Value {
    json!({
        "schemas": [USER_SCHEMA],
        "userName": user_name,
        "name": {"givenName": "Given", "familyName": "Family"},
        "emails": [{"value": user_name, "type": "work", "primary": true}],
        "active": true,
    })
}

/// A PatchOp body.
pub(crate) fn patch_op(ops: Value) -> Value {
    json!({"schemas": [PATCH_OP], "Operations": ops})
}

/// Percent-encodes a query value.
pub(crate) fn enc(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
