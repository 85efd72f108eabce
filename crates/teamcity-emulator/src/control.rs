//! The `/__emulator/` control API: fault injection, call counters, state dump.
//!
//! Not part of TeamCity; kept under its own prefix so it can never be
//! mistaken for a TeamCity path. It needs no token (the emulator is a test
//! tool) and must not be reachable under `/app/rest`.

use axum::Router;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use crate::{Emulator, lock};

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

/// A fault for the next `times` requests matching method and path prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Only requests with this method (any when `None`).
    #[serde(default)]
    pub method: Option<String>,
    /// Only requests whose path starts with this (any when `None`), e.g. `/app/rest/users`.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// How many requests it applies to.
    #[serde(default = "one")]
    pub times: u32,
    /// What happens.
    pub action: FaultAction,
}

fn one() -> u32 {
    1
}

impl Fault {
    /// A fault on any request, `times` times.
    pub fn any(times: u32, action: FaultAction) -> Fault {
        Fault {
            method: None,
            path_prefix: None,
            times,
            action,
        }
    }
}

/// Takes one use of the first fault matching the request.
pub(crate) fn take_fault(emu: &Emulator, method: &str, path: &str) -> Option<FaultAction> {
    let mut faults = lock(&emu.inner.faults);
    let at = faults.iter().position(|f| {
        f.times > 0
            && f.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && f.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
    })?;
    let action = faults[at].action.clone();
    faults[at].times -= 1;
    if faults[at].times == 0 {
        faults.remove(at);
    }
    Some(action)
}

pub(crate) fn routes(emu: Emulator) -> Router {
    Router::new()
        .route("/state", get(state))
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
