//! SCIM 2.0 protocol core (RFC 7643, RFC 7644, RFC 9865): resources and their schemas, filters,
//! PATCH with the IdP dialect normaliser, projection, paging types and the error vocabulary.
//!
//! This crate is pure: no I/O, no async, no HTTP or database types. Everything hard about SCIM
//! lives here and is tested with tables of RFC examples and real IdP request shapes.

pub mod error;
pub mod filter;
pub mod list;
pub mod patch;
pub mod path;
pub mod projection;
pub mod resource;
pub mod schema;

pub use error::{ScimError, ScimResult, ScimType};
pub use patch::{
    MemberChange, MemberSelector, PatchOpKind, PatchOperation, PatchOutcome, apply_patch,
    parse_patch,
};
pub use path::AttrPath;
pub use resource::{Member, Normalized, check_immutable, normalize};
pub use schema::ResourceKind;
