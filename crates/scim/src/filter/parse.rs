//! Filter and PATCH-path parser (placeholder: being written).

use std::fmt;

use super::Filter;
use crate::error::{ScimError, ScimResult};
use crate::path::AttrPath;

/// Longest filter text accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 4096;
/// Deepest nesting of parentheses, `not` and value paths accepted.
pub const MAX_FILTER_DEPTH: usize = 16;

/// A PATCH `path`: `attrPath` or `valuePath [ "." subAttr ]` (RFC 7644 §3.5.2).
#[derive(Debug, Clone, PartialEq)]
pub struct PatchPath {
    /// The attribute (URN and name; `attr.sub` holds a plain `a.b` sub-attribute).
    pub attr: AttrPath,
    /// The value filter in brackets, if any.
    pub filter: Option<Filter>,
    /// The sub-attribute after the brackets (`emails[type eq "work"].value`).
    pub sub: Option<String>,
}

/// Parses a filter.
pub fn parse(input: &str) -> ScimResult<Filter> {
    Err(ScimError::invalid_filter(format!(
        "filter parser not built yet: {input}"
    )))
}

/// Parses a PATCH path.
pub fn parse_patch_path(input: &str) -> ScimResult<PatchPath> {
    Err(ScimError::invalid_path(format!(
        "path parser not built yet: {input}"
    )))
}

impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}
