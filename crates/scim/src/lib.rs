//! SCIM 2.0 protocol core (RFC 7643, RFC 7644, RFC 9865): resources and their schemas, filters,
//! PATCH with the IdP dialect normaliser, projection, paging types and the error vocabulary.
//!
//! This crate is pure: no I/O, no async, no HTTP or database types. Everything hard about SCIM
//! lives here and is tested with tables of RFC examples and real IdP request shapes.

pub mod error;
pub mod filter;
pub mod path;
pub mod schema;

pub use error::{ScimError, ScimResult, ScimType};
pub use path::AttrPath;
pub use schema::ResourceKind;
