//! TeamCity's error responses: `text/plain`, three lines, status by exception.
//!
//! Built from `jersey/ExceptionMapperBase.java` and `errors/*Mapper.java` in
//! the REST plugin (see docs/teamcity-compat.md). Handlers return
//! [`TcError`]; this module alone decides how it looks on the wire.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::locator::LocatorError;

macro_rules! rest_error {
    ($name:literal) => {
        concat!("jetbrains.buildServer.server.rest.errors.", $name)
    };
}

/// An error as a TeamCity exception: class, message and optional cause.
#[derive(Debug, Clone)]
pub(crate) struct TcError {
    pub(crate) status: StatusCode,
    pub(crate) exception: &'static str,
    pub(crate) message: String,
    pub(crate) cause: Option<Box<(&'static str, String)>>,
    pub(crate) hint: &'static str,
    pub(crate) retry_after: Option<u64>,
}

impl TcError {
    fn new(
        status: StatusCode,
        exception: &'static str,
        message: impl Into<String>,
        hint: &'static str,
    ) -> Self {
        TcError {
            status,
            exception,
            message: message.into(),
            cause: None,
            hint,
            retry_after: None,
        }
    }

    /// `BadRequestException` → 400.
    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            rest_error!("BadRequestException"),
            message,
            "Invalid request. Please check the request URL and data are correct.",
        )
    }

    /// `LocatorProcessException` → 400.
    pub(crate) fn locator(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            rest_error!("LocatorProcessException"),
            message,
            "Invalid request. Check locator is specified correctly.",
        )
    }

    /// `PartialUpdateError` → 400.
    pub(crate) fn partial(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            rest_error!("PartialUpdateError"),
            message,
            "There was an error processing the request, but the data could be updated partially. Please ensure consistent data state.",
        )
    }

    /// `NotFoundException` → 404.
    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            rest_error!("NotFoundException"),
            message,
            "Could not find the entity requested. Check the reference is correct and the user has permissions to access the entity.",
        )
    }

    /// JAX-RS 404 for an unknown URL.
    pub(crate) fn no_such_url() -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "javax.ws.rs.NotFoundException",
            "HTTP 404 Not Found",
            "Please check URL is correct.",
        )
    }

    /// `AuthorizationFailedException` → 403.
    pub(crate) fn forbidden(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::FORBIDDEN,
            rest_error!("AuthorizationFailedException"),
            message,
            "Access denied. Check the user has enough permissions to perform the operation.",
        )
    }

    /// A JAX-RS `WebApplicationException` with its own status (405, 406, 415).
    pub(crate) fn web(status: StatusCode, message: impl Into<String>) -> Self {
        let hint = if matches!(
            status,
            StatusCode::NOT_ACCEPTABLE | StatusCode::UNSUPPORTED_MEDIA_TYPE
        ) {
            "Make sure you have supplied correct 'Content-Type'/'Accept' header."
        } else {
            "Not supported request. Check that URL, HTTP method and transferred data are correct."
        };
        Self::new(status, "javax.ws.rs.WebApplicationException", message, hint)
    }

    /// Any other `RuntimeException` → 500 (e.g. `DuplicateUserAccountException` on rename).
    pub(crate) fn internal(exception: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            exception,
            message,
            "Error occurred while processing this request.",
        )
    }

    /// An injected fault with an arbitrary status.
    pub(crate) fn injected(status: StatusCode, retry_after: Option<u64>) -> Self {
        let mut e = if status.is_server_error() {
            Self::internal("java.lang.RuntimeException", "Injected fault")
        } else {
            Self::bad_request("Injected fault")
        };
        match status.as_u16() {
            403 => e = Self::forbidden("Injected fault"),
            404 => e = Self::not_found("Injected fault"),
            409 => {
                e = Self::new(
                    StatusCode::CONFLICT,
                    rest_error!("InvalidStateException"),
                    "Injected fault",
                    "Cannot process this request at this time. Repeat later.",
                )
            }
            _ => {}
        }
        e.status = status;
        e.retry_after = retry_after;
        e
    }

    /// Adds a `caused by:` part.
    pub(crate) fn caused_by(mut self, exception: &'static str, message: impl Into<String>) -> Self {
        self.cause = Some(Box::new((exception, message.into())));
        self
    }

    fn body(&self) -> String {
        let reason = self.status.canonical_reason().unwrap_or("Unknown");
        let lead = if self.status.is_server_error() {
            "Error has occurred during request processing"
        } else {
            "Responding with error"
        };
        let mut details = format!("{}: {}", self.exception, self.message);
        if let Some((ce, cm)) = self.cause.as_deref()
            && !self.message.contains(cm.as_str())
        {
            details.push_str(&format!(", caused by: {ce}: {cm}"));
        }
        format!(
            "{lead}, status code: {} ({reason}).\nDetails: {details}\n{}\n",
            self.status.as_u16(),
            self.hint
        )
    }
}

impl From<LocatorError> for TcError {
    fn from(e: LocatorError) -> Self {
        TcError::locator(e.0)
    }
}

/// A `text/plain;charset=UTF-8` response with TeamCity's node header.
pub(crate) fn text_response(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain;charset=UTF-8"),
    );
    resp
}

impl IntoResponse for TcError {
    fn into_response(self) -> Response {
        let mut resp = text_response(self.status, self.body());
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        resp
    }
}

/// The 401 TeamCity sends with no or unaccepted credentials.
pub(crate) fn unauthorized(credentials_present: bool) -> Response {
    let first = if credentials_present {
        "Invalid authentication request or authentication scheme is not supported"
    } else {
        "Authentication required"
    };
    let mut resp = text_response(
        StatusCode::UNAUTHORIZED,
        format!("{first}\nTo login manually go to \"/login.html\" page"),
    );
    resp.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"TeamCity\", Bearer realm=\"TeamCity\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_duplicate_user_body() {
        let e = TcError::bad_request(
            "Cannot create user as user with the same username already exists",
        )
        .caused_by(
            "jetbrains.buildServer.users.DuplicateUserAccountException",
            "The specified username 'admin' is already in use by some other user.",
        );
        assert_eq!(
            e.body(),
            "Responding with error, status code: 400 (Bad Request).\n\
Details: jetbrains.buildServer.server.rest.errors.BadRequestException: Cannot create user as user with the same username already exists, caused by: jetbrains.buildServer.users.DuplicateUserAccountException: The specified username 'admin' is already in use by some other user.\n\
Invalid request. Please check the request URL and data are correct.\n"
        );
        let e500 = TcError::internal("java.lang.RuntimeException", "x");
        assert!(e500.body().starts_with("Error has occurred during request processing, status code: 500 (Internal Server Error)."));
    }
}
