//! The `/__emulator/` control API: fault injection, call counters, state dump
//! and restore, settings.
//!
//! Not part of TeamCity; kept under its own prefix so it can never be
//! mistaken for a TeamCity path. It needs no token (the emulator is a test
//! tool) and must not be reachable under `/app/rest`.
//!
//! | method & path | effect |
//! |---|---|
//! | `GET /__emulator/state` | the whole [`State`] as JSON |
//! | `PUT /__emulator/state` | replaces the whole state with exactly what `GET` returned (204; 400 when inconsistent) |
//! | `GET /__emulator/counters`, `DELETE` | calls per `"<METHOD> <route template>"`; reset |
//! | `GET/POST/DELETE /__emulator/faults` | list / add / clear faults |
//! | `GET/PUT /__emulator/settings` | `{"logout_supported": bool}`; PUT takes any subset (unknown fields: 400) and answers the settings now in force |
//! | `GET /__emulator/health` | `ok` |
//!
//! A [`Fault`] applies to requests whose method, path prefix and path substring all match
//! (each optional), `times` times, or without end when `times` is absent (or `u32::MAX`):
//!
//! ```json
//! {"method":"PUT","path_contains":"/password","action":{"kind":"status","status":500}}
//! {"path_prefix":"/app/rest/users","times":2,"action":{"kind":"drop"}}
//! ```
//!
//! Paths are matched as sent, after the `/app/rest/latest` alias is mapped to
//! `/app/rest` (the context path, if any, stays in front). The first matching fault wins.

use axum::Router;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Deserializer, Serialize};

use crate::{Emulator, State, lock};

/// What a fault does to a matching request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultAction {
    /// Answer with this status and a TeamCity-style error body
    /// (optionally with `Retry-After`).
    Status {
        /// HTTP status code.
        status: u16,
        /// `Retry-After` seconds.
        #[serde(default)]
        retry_after_secs: Option<u64>,
    },
    /// Close the connection without answering.
    Drop,
    /// Wait this long, then answer normally.
    Delay {
        /// Milliseconds to wait.
        ms: u64,
    },
}

/// A fault for the next `times` requests matching method, path prefix and path substring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Only requests with this method (any when `None`).
    #[serde(default)]
    pub method: Option<String>,
    /// Only requests whose path starts with this (any when `None`), e.g. `/app/rest/users`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Only requests whose path contains this (any when `None`), e.g. `/password` or
    /// `/tokens`. Matched against the path as sent (percent-encoding included).
    #[serde(default)]
    pub path_contains: Option<String>,
    /// How many requests it applies to; [`Fault::UNLIMITED`] (`u32::MAX`, also what an
    /// absent or `null` `times` means in JSON) applies to every matching request until
    /// the faults are cleared.
    #[serde(
        default = "unlimited",
        deserialize_with = "times_or_unlimited",
        skip_serializing_if = "is_unlimited"
    )]
    pub times: u32,
    /// What happens.
    pub action: FaultAction,
}

fn unlimited() -> u32 {
    Fault::UNLIMITED
}

fn is_unlimited(times: &u32) -> bool {
    *times == Fault::UNLIMITED
}

fn times_or_unlimited<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    Ok(Option::<u32>::deserialize(d)?.unwrap_or(Fault::UNLIMITED))
}

impl Fault {
    /// `times` for a fault that never runs out.
    pub const UNLIMITED: u32 = u32::MAX;

    /// A fault on any request, `times` times.
    pub fn any(times: u32, action: FaultAction) -> Fault {
        Fault {
            method: None,
            path_prefix: None,
            path_contains: None,
            times,
            action,
        }
    }

    /// A fault on every request until cleared; narrow it with the builder methods.
    pub fn always(action: FaultAction) -> Fault {
        Fault::any(Fault::UNLIMITED, action)
    }

    /// Only requests with this method.
    pub fn method(mut self, method: &str) -> Fault {
        self.method = Some(method.to_owned());
        self
    }

    /// Only requests whose path starts with `prefix`.
    pub fn path_prefix(mut self, prefix: &str) -> Fault {
        self.path_prefix = Some(prefix.to_owned());
        self
    }

    /// Only requests whose path contains `part`.
    pub fn path_contains(mut self, part: &str) -> Fault {
        self.path_contains = Some(part.to_owned());
        self
    }

    /// Applies `times` times ([`Fault::UNLIMITED`] for no end).
    pub fn times(mut self, times: u32) -> Fault {
        self.times = times;
        self
    }

    fn matches(&self, method: &str, path: &str) -> bool {
        self.times > 0
            && self
                .method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .path_prefix
                .as_deref()
                .is_none_or(|p| path.starts_with(p))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path.contains(p))
    }
}

/// Takes one use of the first fault matching the request.
pub(crate) fn take_fault(emu: &Emulator, method: &str, path: &str) -> Option<FaultAction> {
    let mut faults = lock(&emu.inner.faults);
    let at = faults.iter().position(|f| f.matches(method, path))?;
    let action = faults[at].action.clone();
    if faults[at].times != Fault::UNLIMITED {
        faults[at].times -= 1;
        if faults[at].times == 0 {
            faults.remove(at);
        }
    }
    Some(action)
}

pub(crate) fn routes(emu: Emulator) -> Router {
    Router::new()
        .route("/state", get(state).put(restore))
        .route("/settings", get(settings).put(change_settings))
        .route("/counters", get(counters).delete(reset_counters))
        .route(
            "/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/health", get(|| async { "ok" }))
        .route("/reset-counters", post(reset_counters))
        .with_state(emu)
}

async fn state(AxState(emu): AxState<Emulator>) -> Response {
    axum::Json(emu.snapshot()).into_response()
}

async fn restore(
    AxState(emu): AxState<Emulator>,
    axum::Json(state): axum::Json<State>,
) -> Response {
    match emu.restore(state) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    }
}

/// Emulator behaviour switches (`/__emulator/settings`); on PUT, absent fields stay as
/// they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    /// Whether `POST /app/rest/users/{u}/logout` exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    logout_supported: Option<bool>,
}

async fn settings(AxState(emu): AxState<Emulator>) -> Response {
    axum::Json(Settings {
        logout_supported: Some(emu.logout_supported()),
    })
    .into_response()
}

async fn change_settings(
    AxState(emu): AxState<Emulator>,
    axum::Json(change): axum::Json<Settings>,
) -> Response {
    if let Some(supported) = change.logout_supported {
        emu.set_logout_supported(supported);
    }
    settings(AxState(emu)).await
}

async fn counters(AxState(emu): AxState<Emulator>) -> Response {
    axum::Json(emu.counters()).into_response()
}

async fn reset_counters(AxState(emu): AxState<Emulator>) -> StatusCode {
    emu.reset_counters();
    StatusCode::NO_CONTENT
}

async fn list_faults(AxState(emu): AxState<Emulator>) -> Response {
    axum::Json(lock(&emu.inner.faults).clone()).into_response()
}

async fn add_fault(
    AxState(emu): AxState<Emulator>,
    axum::Json(fault): axum::Json<Fault>,
) -> StatusCode {
    emu.inject_fault(fault);
    StatusCode::NO_CONTENT
}

async fn clear_faults(AxState(emu): AxState<Emulator>) -> StatusCode {
    emu.clear_faults();
    StatusCode::NO_CONTENT
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absent_or_null_times_is_unlimited_and_round_trips() {
        let parse = |text: &str| serde_json::from_str::<Fault>(text).expect("fault");
        let action = r#""action":{"kind":"drop"}"#;
        assert_eq!(parse(&format!("{{{action}}}")).times, Fault::UNLIMITED);
        assert_eq!(
            parse(&format!(r#"{{"times":null,{action}}}"#)).times,
            Fault::UNLIMITED
        );
        assert_eq!(parse(&format!(r#"{{"times":3,{action}}}"#)).times, 3);
        let unlimited = Fault::always(FaultAction::Drop).path_contains("/tokens");
        let text = serde_json::to_string(&unlimited).expect("json");
        assert!(!text.contains("times"), "{text}");
        assert_eq!(parse(&text), unlimited);
    }

    #[test]
    fn all_given_conditions_must_match() {
        let f = Fault::any(1, FaultAction::Drop)
            .method("put")
            .path_prefix("/app/rest/users")
            .path_contains("/password");
        assert!(f.matches("PUT", "/app/rest/users/id:3/password"));
        assert!(!f.matches("GET", "/app/rest/users/id:3/password"));
        assert!(!f.matches("PUT", "/app/rest/users/id:3/name"));
        assert!(!f.matches("PUT", "/tc/app/rest/users/id:3/password"));
        assert!(
            !f.clone()
                .times(0)
                .matches("PUT", "/app/rest/users/id:3/password")
        );
    }
}
