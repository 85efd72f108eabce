//! Integration tests of the SCIM HTTP surface, over real HTTP against a server on a loopback
//! port with its own SQLite database per test.

mod admin;
mod audit_outbox;
mod auth;
mod bad_input;
mod hardening;
mod idp_fixtures;
mod okta_spec;
mod protocol;
mod support;
