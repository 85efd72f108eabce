//! A successful SCIM answer: status, optional body, `ETag` and `Location`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::error::SCIM_JSON;

/// A response body: a JSON tree, or JSON already serialized (the list hot path renders
/// straight to bytes).
#[derive(Debug, Clone)]
pub(crate) enum ReplyBody {
    /// A JSON value.
    Json(Value),
    /// Serialized JSON.
    Serialized(axum::body::Bytes),
}

impl From<Value> for ReplyBody {
    fn from(v: Value) -> Self {
        ReplyBody::Json(v)
    }
}

/// A successful SCIM response.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// HTTP status.
    pub(crate) status: StatusCode,
    /// JSON body, if any.
    pub(crate) body: Option<ReplyBody>,
    /// `ETag` header.
    pub(crate) etag: Option<String>,
    /// `Location` header.
    pub(crate) location: Option<String>,
}

impl Reply {
    /// 200 with a body.
    pub(crate) fn ok(body: impl Into<ReplyBody>) -> Self {
        Reply {
            status: StatusCode::OK,
            body: Some(body.into()),
            etag: None,
            location: None,
        }
    }

    /// A status with no body.
    pub(crate) fn empty(status: StatusCode) -> Self {
        Reply {
            status,
            body: None,
            etag: None,
            location: None,
        }
    }
}

impl IntoResponse for Reply {
    fn into_response(self) -> Response {
        let mut resp = match self.body {
            Some(ReplyBody::Json(b)) => (self.status, b.to_string()).into_response(),
            Some(ReplyBody::Serialized(b)) => (self.status, b).into_response(),
            None => self.status.into_response(),
        };
        let h = resp.headers_mut();
        if self.status != StatusCode::NO_CONTENT && self.status != StatusCode::NOT_MODIFIED {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(SCIM_JSON));
        }
        if let Some(e) = self.etag.and_then(|e| HeaderValue::from_str(&e).ok()) {
            h.insert(header::ETAG, e);
        }
        if let Some(l) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            h.insert(header::LOCATION, l);
        }
        resp
    }
}
