//! Typed async client for the TeamCity REST API (`/app/rest`).
//!
//! This crate is for talking to one TeamCity server: users, user groups,
//! memberships, roles, access tokens, projects and server info. It builds
//! locators that escape every value it did not write itself, and it classifies
//! every failure so callers can decide whether to retry.
//!
//! It must not know about SCIM, the store or the outbox, and it never retries
//! on its own: [`TeamCityError::is_transient`] and [`TeamCityError::retry_after`]
//! tell the caller whether a retry makes sense.

pub mod client;
pub mod error;
pub mod locator;
pub mod model;

pub use client::{Client, ClientConfig, NewGroup, NewUser, Token, UserField, UserUpdate};
pub use error::{ErrorBody, ErrorKind, TeamCityError};
pub use locator::Locator;
pub use model::{
    Group, Groups, Project, Projects, Properties, Property, RoleAssignment, RoleAssignments,
    RoleDefinition, RoleDefinitions, Scope, ServerInfo, TokenInfo, Tokens, User, Users,
};

/// Installs the ring crypto provider as rustls' process default.
///
/// reqwest is built with `rustls-no-provider`, so building a [`Client`]
/// panics unless a provider is installed first. Call this once at startup
/// (and in tests); calling it again is harmless.
pub fn install_crypto_provider() {
    // An error only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}
