//! Integration tests of the SCIM HTTP surface over real HTTP.
mod support;
