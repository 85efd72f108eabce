//! Attribute paths: `[urn:...:]attr[.subAttr]` (RFC 7644 §3.10).
//!
//! A schema URN contains dots (`...:enterprise:2.0:User`), so the URN prefix is split off at its
//! last `:` before the remainder is split on `.`. Names keep the casing the client sent; lookups
//! are case-insensitive through [`crate::schema`].

use std::fmt;

use crate::error::{ScimError, ScimResult};
use crate::schema::{AttrDef, Resolved, ResourceKind};

/// An attribute path as written by a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrPath {
    /// The schema URN prefix, when the path was URN-qualified.
    pub urn: Option<String>,
    /// The top-level attribute name.
    pub attr: String,
    /// The sub-attribute name, if any.
    pub sub: Option<String>,
}

impl AttrPath {
    /// A path with just an attribute name.
    pub fn simple(attr: impl Into<String>) -> Self {
        AttrPath {
            urn: None,
            attr: attr.into(),
            sub: None,
        }
    }

    /// Parses `[urn:]attr[.sub]`. The text must be non-empty and consist of attribute-name
    /// characters (`ALPHA *(nameChar)`, `$ref` allowed).
    pub fn parse(text: &str) -> ScimResult<AttrPath> {
        let (urn, rest) = split_urn(text);
        let (attr, sub) = match rest.split_once('.') {
            Some((a, s)) => (a, Some(s)),
            None => (rest, None),
        };
        if !is_attr_name(attr) || sub.is_some_and(|s| !is_attr_name(s)) {
            return Err(ScimError::invalid_path(format!(
                "`{text}` is not a valid attribute path"
            )));
        }
        Ok(AttrPath {
            urn: urn.map(str::to_owned),
            attr: attr.to_owned(),
            sub: sub.map(str::to_owned),
        })
    }

    /// Resolves the path against a resource type's schemas: the top-level definition and, when
    /// the path has a sub-attribute, its definition.
    pub fn resolve(&self, kind: ResourceKind) -> Option<(Resolved, Option<&'static AttrDef>)> {
        let top = kind.resolve(self.urn.as_deref(), &self.attr)?;
        match &self.sub {
            None => Some((top, None)),
            Some(s) => top.def.sub(s).map(|d| (top, Some(d))),
        }
    }
}

impl fmt::Display for AttrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(urn) = &self.urn {
            write!(f, "{urn}:")?;
        }
        f.write_str(&self.attr)?;
        if let Some(sub) = &self.sub {
            write!(f, ".{sub}")?;
        }
        Ok(())
    }
}

/// Splits a leading `urn:` prefix from a path at its last `:`. Returns `(None, text)` when the
/// text is not URN-qualified.
pub fn split_urn(text: &str) -> (Option<&str>, &str) {
    if text.len() > 4
        && text.is_char_boundary(4)
        && text[..4].eq_ignore_ascii_case("urn:")
        && let Some(i) = text.rfind(':')
    {
        return (Some(&text[..i]), &text[i + 1..]);
    }
    (None, text)
}

/// `ATTRNAME = ALPHA *(nameChar)`, `nameChar = "-" / "_" / DIGIT / ALPHA`, plus `$ref`.
pub fn is_attr_name(s: &str) -> bool {
    if s == "$ref" {
        return true;
    }
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_paths() {
        let cases: &[(&str, Option<&str>, &str, Option<&str>)] = &[
            ("userName", None, "userName", None),
            ("name.givenName", None, "name", Some("givenName")),
            (
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber",
                Some("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"),
                "employeeNumber",
                None,
            ),
            (
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value",
                Some("urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"),
                "manager",
                Some("value"),
            ),
            ("members.$ref", None, "members", Some("$ref")),
        ];
        for (text, urn, attr, sub) in cases {
            let p = AttrPath::parse(text).unwrap();
            assert_eq!(p.urn.as_deref(), *urn, "{text}");
            assert_eq!(p.attr, *attr, "{text}");
            assert_eq!(p.sub.as_deref(), *sub, "{text}");
            assert_eq!(p.to_string(), *text);
        }
        for bad in ["", "1abc", "a..b", "a.b.c", "emails[type", "a b"] {
            assert!(AttrPath::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolves_case_insensitively() {
        let p = AttrPath::parse("NAME.FamilyName").unwrap();
        let (top, sub) = p.resolve(ResourceKind::User).unwrap();
        assert_eq!(top.def.name, "name");
        assert_eq!(sub.unwrap().name, "familyName");
        let p = AttrPath::parse(
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user:Department",
        )
        .unwrap();
        let (top, _) = p.resolve(ResourceKind::User).unwrap();
        assert_eq!(top.def.name, "department");
        assert!(top.extension.is_some());
        assert!(
            AttrPath::parse("nope")
                .unwrap()
                .resolve(ResourceKind::User)
                .is_none()
        );
    }
}
