//! The one place errors become HTTP responses.
//!
//! Protocol errors carry their own status and `scimType`; store errors map by variant; anything
//! else is logged here (once) and answered as a SCIM 500 without internal detail.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use scim::{ScimError, ScimType};
use store::StoreError;

/// The media type of every SCIM response.
pub const SCIM_JSON: &str = "application/scim+json";

/// An error answered to a SCIM client.
#[derive(Debug)]
pub struct ApiError(pub ScimError);

impl From<ScimError> for ApiError {
    fn from(e: ScimError) -> Self {
        ApiError(e)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError(match e {
            // 404 Not Found.
            StoreError::NotFound => ScimError::not_found("resource not found"),
            // 409 uniqueness.
            StoreError::Conflict(detail) => ScimError::uniqueness(detail),
            // 412 Precondition Failed.
            StoreError::PreconditionFailed => ScimError::new(
                412,
                None,
                "the resource has changed since the version in If-Match; read it again and retry",
            ),
            // 400 invalidValue.
            StoreError::Invalid(detail) => ScimError::bad_request(ScimType::InvalidValue, detail),
            // 503: the database is away; nothing was written, the client retries.
            StoreError::Unavailable(e) => {
                tracing::warn!(error = %e, "database unavailable");
                ScimError::new(
                    503,
                    None,
                    "the database is unavailable; the request was not applied, try again",
                )
            }
            // 500: logged, never shown (a fenced write never comes from a SCIM request).
            StoreError::Fenced(e) => {
                tracing::error!(error = %e, "store failure");
                ScimError::new(500, None, "internal error; the request was not applied")
            }
            // 500: logged, never shown.
            StoreError::Other(e) => {
                tracing::error!(error = %e, "store failure");
                ScimError::new(500, None, "internal error; the request was not applied")
            }
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        scim_error_response(&self.0)
    }
}

/// Renders a SCIM error body with its status.
pub fn scim_error_response(e: &ScimError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, e.to_json().to_string()).into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(SCIM_JSON));
    if e.status == 401 {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"teamcity-scim\""),
        );
    }
    resp
}

/// Result alias for handlers.
pub type ApiResult<T> = Result<T, ApiError>;
