//! Errors of the TeamCity client, classified for the caller's retry policy.
//!
//! TeamCity answers errors with a three-line `text/plain` body
//! (`Responding with error, status code: ...`, `Details: <exception>: <message>`,
//! a hint line). [`ErrorBody::parse`] splits it; [`TeamCityError::kind`] turns
//! status and exception into one of a few classes callers branch on.
//!
//! [`TeamCityError::is_misconfiguration`] separates failures that mean the bridge
//! itself is set up wrong (token refused, certificate not trusted, a login page or a
//! proxy answering instead of TeamCity) from failures of one object or one moment.
//!
//! This module decides what a failure *is*, never what to do about it: no
//! retries, no sleeping. `Display` names the status and exception class only;
//! the server's message (which can quote usernames) is in [`ErrorBody`].

use std::time::Duration;

/// What kind of failure an error is, for callers deciding what to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// Worth retrying later: connect failure, timeout, dropped connection, 5xx,
    /// 409 `InvalidStateException`, 429.
    Transient,
    /// The addressed entity does not exist (404), including TeamCity's masked
    /// "User not found".
    NotFound,
    /// A uniqueness conflict: duplicate username (`DuplicateUserAccountException`,
    /// 400 on create, 500 on rename), duplicate group key or name, duplicate token name.
    Conflict,
    /// The token is valid but lacks permission (403).
    Forbidden,
    /// The token was missing or not accepted (401).
    Unauthorized,
    /// Anything else: the request is wrong and repeating it will not help.
    Permanent,
}

/// TeamCity's `text/plain` error body, split into its parts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    /// Fully qualified exception class from the `Details:` line, if present.
    pub exception: Option<String>,
    /// The exception message (without the cause part).
    pub message: String,
    /// Fully qualified class of the `caused by:` exception, if present.
    pub cause_exception: Option<String>,
    /// Message of the cause, if present.
    pub cause_message: Option<String>,
    /// The hint line, if present.
    pub hint: Option<String>,
}

impl ErrorBody {
    /// Parses a TeamCity error body; text that does not follow the format
    /// becomes the whole `message` (truncated to 1 KiB).
    pub fn parse(text: &str) -> ErrorBody {
        let lines: Vec<&str> = text.lines().collect();
        let details_at = lines.iter().position(|l| l.starts_with("Details: "));
        let Some(at) = details_at else {
            let mut message = text.trim().to_owned();
            truncate(&mut message, 1024);
            return ErrorBody {
                message,
                ..ErrorBody::default()
            };
        };
        let details = &lines[at]["Details: ".len()..];
        let (head, cause) = match details.find(", caused by: ") {
            Some(i) => (&details[..i], Some(&details[i + ", caused by: ".len()..])),
            None => (details, None),
        };
        let (exception, message) = split_exception(head);
        let (cause_exception, cause_message) = match cause {
            Some(c) => {
                let (e, m) = split_exception(c);
                (e, Some(m))
            }
            None => (None, None),
        };
        let hint = lines
            .get(at + 1)
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty());
        ErrorBody {
            exception,
            message,
            cause_exception,
            cause_message,
            hint,
        }
    }

    /// True when the exception or its cause is (or ends with) `simple_name`.
    pub fn mentions(&self, simple_name: &str) -> bool {
        let matches = |e: &Option<String>| {
            e.as_deref()
                .is_some_and(|e| e == simple_name || e.ends_with(&format!(".{simple_name}")))
        };
        matches(&self.exception) || matches(&self.cause_exception)
    }
}

fn split_exception(text: &str) -> (Option<String>, String) {
    // "<fqn>: <message>" where the fqn has no spaces.
    match text.find(": ") {
        Some(i) if !text[..i].contains(' ') && text[..i].contains('.') => {
            (Some(text[..i].to_owned()), text[i + 2..].to_owned())
        }
        _ => (None, text.to_owned()),
    }
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Everything that can go wrong calling TeamCity.
#[derive(Debug, thiserror::Error)]
pub enum TeamCityError {
    /// The request did not complete: connect error, timeout, dropped connection,
    /// or a failed TLS handshake.
    #[error("TeamCity request failed ({what}): {source}")]
    Transport {
        /// Short description: `connect`, `timeout`, `io`, or `tls` (the TLS handshake
        /// failed, e.g. the server's certificate is not trusted; see [`TLS`]).
        what: &'static str,
        /// The underlying reqwest error.
        #[source]
        source: reqwest::Error,
    },
    /// TeamCity answered with a non-success status.
    #[error("TeamCity answered {status}{}", exception_suffix(.body))]
    Status {
        /// HTTP status code.
        status: u16,
        /// The parsed error body (boxed to keep `Result`s small).
        body: Box<ErrorBody>,
        /// `Retry-After` in seconds, when sent (429/503).
        retry_after: Option<Duration>,
    },
    /// A success (2xx) answer that is an HTML page rather than TeamCity's JSON or text:
    /// a proxy, an SSO login page or a maintenance page stands in front of TeamCity.
    #[error(
        "TeamCity answered with {content_type} instead of JSON (a login page or a proxy in front of TeamCity?)"
    )]
    NotJson {
        /// The answer's `Content-Type` (or a note when it had none).
        content_type: String,
    },
    /// A success response whose body did not parse.
    #[error("TeamCity response could not be decoded: {0}")]
    Decode(String),
    /// The caller passed something the client refuses to send (e.g. a project
    /// id with characters TeamCity never allows in one).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The client configuration is unusable (bad base URL, TLS setup).
    #[error("invalid TeamCity client configuration: {0}")]
    Config(String),
}

/// The `what` of a [`TeamCityError::Transport`] whose TLS handshake failed.
pub const TLS: &str = "tls";

/// True when `err` (or anything in its source chain) is a TLS failure: a rustls error,
/// or a message naming a certificate or handshake problem. reqwest wraps rustls errors
/// in `std::io::Error`, whose `source()` skips the wrapped error, so the wrapped error
/// is checked too.
pub(crate) fn is_tls_failure(err: &(dyn std::error::Error + 'static)) -> bool {
    const MARKERS: &[&str] = &[
        "invalid peer certificate",
        "certificate",
        "unknownissuer",
        "tls handshake",
        "handshake failure",
        "received fatal alert",
        "rustls",
    ];
    let mut current = Some(err);
    while let Some(e) = current {
        if e.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref)
            && inner.downcast_ref::<rustls::Error>().is_some()
        {
            return true;
        }
        let text = e.to_string().to_ascii_lowercase();
        if MARKERS.iter().any(|m| text.contains(m)) {
            return true;
        }
        current = e.source();
    }
    false
}

fn exception_suffix(body: &ErrorBody) -> String {
    match (&body.exception, &body.cause_exception) {
        (Some(e), Some(c)) => format!(" ({e}, caused by {c})"),
        (Some(e), None) => format!(" ({e})"),
        _ => String::new(),
    }
}

impl TeamCityError {
    /// The class of this error; see [`ErrorKind`].
    pub fn kind(&self) -> ErrorKind {
        match self {
            TeamCityError::Transport { what, .. } if *what == TLS => ErrorKind::Permanent,
            TeamCityError::Transport { .. } => ErrorKind::Transient,
            TeamCityError::Decode(_) | TeamCityError::NotJson { .. } => ErrorKind::Permanent,
            TeamCityError::InvalidInput(_) | TeamCityError::Config(_) => ErrorKind::Permanent,
            TeamCityError::Status { status, body, .. } => classify(*status, body),
        }
    }

    /// True when repeating the same call later may succeed.
    pub fn is_transient(&self) -> bool {
        self.kind() == ErrorKind::Transient
    }

    /// True when the error means the bridge itself is misconfigured rather than one
    /// object being wrong: the token was refused (401), TeamCity's certificate was not
    /// accepted (a TLS failure), the client configuration is unusable
    /// ([`TeamCityError::Config`]), or a success answer was an HTML page
    /// ([`TeamCityError::NotJson`]: a login page or a proxy in front of TeamCity).
    /// Every call will fail the same way until someone fixes the setup. A 403 is not
    /// included: it can be one object the account may not touch.
    pub fn is_misconfiguration(&self) -> bool {
        match self {
            TeamCityError::Status { status, .. } => *status == 401,
            TeamCityError::Transport { what, .. } => *what == TLS,
            TeamCityError::Config(_) | TeamCityError::NotJson { .. } => true,
            TeamCityError::Decode(_) | TeamCityError::InvalidInput(_) => false,
        }
    }

    /// True for a 404 (including TeamCity's masked "User not found").
    pub fn is_not_found(&self) -> bool {
        self.kind() == ErrorKind::NotFound
    }

    /// True for a uniqueness conflict (duplicate username, group key or name).
    pub fn is_conflict(&self) -> bool {
        self.kind() == ErrorKind::Conflict
    }

    /// The server's `Retry-After`, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TeamCityError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The HTTP status, when TeamCity answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            TeamCityError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The parsed error body, when TeamCity answered.
    pub fn body(&self) -> Option<&ErrorBody> {
        match self {
            TeamCityError::Status { body, .. } => Some(body.as_ref()),
            _ => None,
        }
    }
}

fn classify(status: u16, body: &ErrorBody) -> ErrorKind {
    // A duplicate username is a 400 on create and a 500 on rename.
    if body.mentions("DuplicateUserAccountException") {
        return ErrorKind::Conflict;
    }
    match status {
        401 => ErrorKind::Unauthorized,
        403 => ErrorKind::Forbidden,
        404 => ErrorKind::NotFound,
        // InvalidStateException: "Cannot process this request at this time. Repeat later."
        409 | 408 | 429 => ErrorKind::Transient,
        400 if body.message.contains("already exists") => ErrorKind::Conflict,
        500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DUP_CREATE: &str = "Responding with error, status code: 400 (Bad Request).\n\
Details: jetbrains.buildServer.server.rest.errors.BadRequestException: Cannot create user as user with the same username already exists, caused by: jetbrains.buildServer.users.DuplicateUserAccountException: The specified username 'admin' is already in use by some other user.\n\
Invalid request. Please check the request URL and data are correct.\n";

    #[test]
    fn parses_error_body_with_cause() {
        let body = ErrorBody::parse(DUP_CREATE);
        assert_eq!(
            body.exception.as_deref(),
            Some("jetbrains.buildServer.server.rest.errors.BadRequestException")
        );
        assert_eq!(
            body.message,
            "Cannot create user as user with the same username already exists"
        );
        assert_eq!(
            body.cause_exception.as_deref(),
            Some("jetbrains.buildServer.users.DuplicateUserAccountException")
        );
        assert!(
            body.cause_message
                .as_deref()
                .unwrap_or("")
                .contains("already in use")
        );
        assert_eq!(
            body.hint.as_deref(),
            Some("Invalid request. Please check the request URL and data are correct.")
        );
    }

    #[test]
    fn parses_non_teamcity_body() {
        let body = ErrorBody::parse(
            "Authentication required\nTo login manually go to \"/login.html\" page",
        );
        assert_eq!(body.exception, None);
        assert!(body.message.starts_with("Authentication required"));
    }

    fn status(status: u16) -> TeamCityError {
        TeamCityError::Status {
            status,
            body: Box::default(),
            retry_after: None,
        }
    }

    #[test]
    fn misconfiguration_is_401_config_and_html_not_403() {
        let html = TeamCityError::NotJson {
            content_type: "text/html;charset=UTF-8".into(),
        };
        assert!(html.is_misconfiguration());
        assert!(!html.is_transient());
        assert_eq!(html.kind(), ErrorKind::Permanent);
        assert_eq!(
            html.to_string(),
            "TeamCity answered with text/html;charset=UTF-8 instead of JSON (a login page or a proxy in front of TeamCity?)"
        );
        assert!(status(401).is_misconfiguration());
        assert!(TeamCityError::Config("base URL".into()).is_misconfiguration());
        for not in [
            status(403),
            status(404),
            status(400),
            status(500),
            status(503),
            TeamCityError::Decode("x".into()),
            TeamCityError::InvalidInput("x".into()),
        ] {
            assert!(!not.is_misconfiguration(), "{not}");
        }
        // The kinds of everything else are unchanged.
        assert_eq!(status(403).kind(), ErrorKind::Forbidden);
        assert_eq!(status(401).kind(), ErrorKind::Unauthorized);
    }

    #[derive(Debug)]
    struct Wrapper(Box<dyn std::error::Error + Send + Sync>);

    impl std::fmt::Display for Wrapper {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("client error (Connect)")
        }
    }

    impl std::error::Error for Wrapper {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(self.0.as_ref())
        }
    }

    #[test]
    fn tls_failures_are_found_in_the_source_chain() {
        // As reqwest/hyper wrap it: a connect error around an io::Error around rustls.
        let rustls_err = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, rustls_err);
        let chain = Wrapper(Box::new(io));
        assert!(is_tls_failure(&chain));
        let text_only = Wrapper("invalid peer certificate: UnknownIssuer".into());
        assert!(is_tls_failure(&text_only));
        let refused = Wrapper(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "Connection refused (os error 111)",
        )));
        assert!(!is_tls_failure(&refused));
    }

    #[test]
    fn classifies_statuses() {
        let dup = ErrorBody::parse(DUP_CREATE);
        let rename = ErrorBody::parse(
            "Error has occurred during request processing, status code: 500 (Internal Server Error).\n\
Details: jetbrains.buildServer.users.DuplicateUserAccountException: The specified username 'x' is already in use by some other user.\n\
Error occurred while processing this request.",
        );
        let group_dup = ErrorBody::parse(
            "Responding with error, status code: 400 (Bad Request).\n\
Details: jetbrains.buildServer.server.rest.errors.BadRequestException: Cannot create group as group with key 'K': group with the same key already exists\n\
Invalid request. Please check the request URL and data are correct.",
        );
        let plain = ErrorBody::default();
        let cases = [
            (400, &dup, ErrorKind::Conflict),
            (500, &rename, ErrorKind::Conflict),
            (400, &group_dup, ErrorKind::Conflict),
            (400, &plain, ErrorKind::Permanent),
            (401, &plain, ErrorKind::Unauthorized),
            (403, &plain, ErrorKind::Forbidden),
            (404, &plain, ErrorKind::NotFound),
            (405, &plain, ErrorKind::Permanent),
            (409, &plain, ErrorKind::Transient),
            (415, &plain, ErrorKind::Permanent),
            (429, &plain, ErrorKind::Transient),
            (500, &plain, ErrorKind::Transient),
            (503, &plain, ErrorKind::Transient),
        ];
        for (status, body, want) in cases {
            assert_eq!(classify(status, body), want, "{status}");
        }
    }
}
