//! SCIM filters (RFC 7644 §3.4.2.2): the AST, its parser and printer, and in-memory evaluation
//! against a resource's JSON.
//!
//! The parser is tolerant where real IdPs need it (unquoted values, odd casing; see
//! `scim-interop.md` §1.2) and strict everywhere else: malformed input is a 400 `invalidFilter`
//! whose detail names the position. Evaluation is schema-aware (`caseExact`, dateTime ordering,
//! multi-valued "any element matches").

use serde_json::Value;

use crate::path::AttrPath;

mod eval;
mod parse;
#[cfg(test)]
mod tests;

pub use eval::{matches, validate};
pub use parse::{MAX_FILTER_DEPTH, MAX_FILTER_LEN, PatchPath, parse, parse_patch_path};

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CompareOp {
    /// `eq`
    Eq,
    /// `ne`
    Ne,
    /// `co`
    Co,
    /// `sw`
    Sw,
    /// `ew`
    Ew,
    /// `gt`
    Gt,
    /// `ge`
    Ge,
    /// `lt`
    Lt,
    /// `le`
    Le,
}

impl CompareOp {
    /// The operator keyword in lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            CompareOp::Eq => "eq",
            CompareOp::Ne => "ne",
            CompareOp::Co => "co",
            CompareOp::Sw => "sw",
            CompareOp::Ew => "ew",
            CompareOp::Gt => "gt",
            CompareOp::Ge => "ge",
            CompareOp::Lt => "lt",
            CompareOp::Le => "le",
        }
    }
}

/// A parsed filter.
///
/// Inside a [`Filter::ValuePath`], the inner filter's paths name sub-attributes of the
/// multi-valued attribute (`emails[type eq "work"]` has inner path `type`).
#[derive(Debug, Clone, PartialEq)]
pub enum Filter {
    /// `a and b`
    And(Box<Filter>, Box<Filter>),
    /// `a or b`
    Or(Box<Filter>, Box<Filter>),
    /// `not (a)`
    Not(Box<Filter>),
    /// `path op value`; `value` is a JSON string, number, boolean or null.
    Compare {
        /// The attribute compared.
        path: AttrPath,
        /// The operator.
        op: CompareOp,
        /// The literal.
        value: Value,
    },
    /// `path pr`
    Present(AttrPath),
    /// `attr[filter]`: some element of the multi-valued `attr` satisfies `filter`.
    /// Entra's `emails[type eq "work"].value eq "x"` parses to
    /// `emails[type eq "work" and value eq "x"]`.
    ValuePath {
        /// The multi-valued attribute (no sub-attribute).
        path: AttrPath,
        /// The filter over its elements.
        filter: Box<Filter>,
    },
}
