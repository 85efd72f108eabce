//! Schema validation of parsed filters and in-memory evaluation against a resource's JSON
//! (RFC 7644 §3.4.2.2).
//!
//! Semantics chosen where the RFC is loose:
//! - `ne` is exactly `not eq`: it matches when no value of the attribute equals the literal, so
//!   an absent attribute matches `ne`, and a multi-valued attribute matches `ne "x"` only when no
//!   element equals `"x"`.
//! - `eq null` matches when the attribute is not present (absent, null, `""`, `[]`, `{}`);
//!   `ne null` is the same as `pr`.
//! - A path that does not resolve against the schema never matches (any operator, `ne` too);
//!   [`validate`] reports it as `invalidFilter` before evaluation.
//! - Comparisons on a complex attribute without a sub-attribute (`emails co "x"`) compare its
//!   `value` sub-attribute (of every element, when multi-valued).
//! - A literal compared with a string attribute is compared as text, so an unquoted number
//!   (`externalId eq 12345`) still matches the string `"12345"`. Boolean attributes accept the
//!   strings `"true"`/`"false"` in any case (Entra). A dateTime value or literal that does not
//!   parse as RFC 3339 (or a plain `YYYY-MM-DD`) never matches.

use std::cmp::Ordering;

use serde_json::{Number, Value};

use super::{CompareOp, Filter};
use crate::error::{ScimError, ScimResult};
use crate::path::AttrPath;
use crate::projection::{as_bool, cmp_numbers, fold, get_ci, parse_datetime, top_value};
use crate::schema::{AttrDef, AttrType, ResourceKind, Returned};

/// Whether `resource` (a SCIM resource's JSON) satisfies `filter`.
pub fn matches(filter: &Filter, kind: ResourceKind, resource: &Value) -> bool {
    eval(filter, Scope::Top(kind), resource)
}

/// Checks a parsed filter against a resource type's schema: every attribute must exist (inner
/// paths of a value path are sub-attributes of its attribute), `password` and other
/// `returned: never` attributes cannot be filtered on, and operators must suit the attribute
/// type (`gt`/`ge`/`lt`/`le` not on booleans or complex attributes; `co`/`sw`/`ew` only on
/// string, reference and binary attributes; `null` only with `eq`/`ne`). Errors are 400
/// `invalidFilter`.
pub fn validate(filter: &Filter, kind: ResourceKind) -> ScimResult<()> {
    validate_in(filter, Scope::Top(kind))
}

#[derive(Debug, Clone, Copy)]
enum Scope {
    /// Top level of a resource of this kind.
    Top(ResourceKind),
    /// Inside `attr[...]`: paths name sub-attributes of this complex attribute.
    Within(&'static AttrDef),
}

/// Resolves a path in a scope to its top-level and (optional) sub-attribute definitions.
fn resolve(
    path: &AttrPath,
    scope: Scope,
) -> Option<(
    &'static AttrDef,
    Option<&'static AttrDef>,
    Option<&'static str>,
)> {
    match scope {
        Scope::Top(kind) => {
            let (top, sub) = path.resolve(kind)?;
            Some((top.def, sub, top.extension.map(|e| e.id)))
        }
        Scope::Within(parent) => {
            if path.urn.is_some() || path.sub.is_some() {
                return None;
            }
            parent.sub(&path.attr).map(|d| (d, None, None))
        }
    }
}

fn describe(path: &AttrPath, scope: Scope) -> String {
    match scope {
        Scope::Top(_) => path.to_string(),
        Scope::Within(parent) => format!("{}.{path}", parent.name),
    }
}

fn validate_in(filter: &Filter, scope: Scope) -> ScimResult<()> {
    match filter {
        Filter::And(a, b) | Filter::Or(a, b) => {
            validate_in(a, scope)?;
            validate_in(b, scope)
        }
        Filter::Not(inner) => validate_in(inner, scope),
        Filter::Present(path) => leaf_def(path, scope).map(|_| ()),
        Filter::Compare { path, op, value } => {
            let mut def = leaf_def(path, scope)?;
            let name = describe(path, scope);
            if def.ty == AttrType::Complex {
                def = def.sub("value").ok_or_else(|| {
                    ScimError::invalid_filter(format!(
                        "`{name}` is a complex attribute; compare one of its sub-attributes"
                    ))
                })?;
            }
            let ordering = matches!(
                op,
                CompareOp::Gt | CompareOp::Ge | CompareOp::Lt | CompareOp::Le
            );
            let substring = matches!(op, CompareOp::Co | CompareOp::Sw | CompareOp::Ew);
            if value.is_null() && !matches!(op, CompareOp::Eq | CompareOp::Ne) {
                return Err(ScimError::invalid_filter(format!(
                    "`{name} {} null`: `null` can only be compared with `eq` or `ne`",
                    op.as_str()
                )));
            }
            if ordering && def.ty == AttrType::Boolean {
                return Err(ScimError::invalid_filter(format!(
                    "`{}` cannot be used on the boolean attribute `{name}`",
                    op.as_str()
                )));
            }
            if substring
                && !matches!(
                    def.ty,
                    AttrType::String | AttrType::Reference | AttrType::Binary
                )
            {
                return Err(ScimError::invalid_filter(format!(
                    "`{}` needs a string attribute; `{name}` is not one",
                    op.as_str()
                )));
            }
            if def.ty == AttrType::Boolean && !value.is_null() && as_bool(value).is_none() {
                return Err(ScimError::invalid_filter(format!(
                    "`{name}` is boolean; compare it with true or false, not {value}"
                )));
            }
            Ok(())
        }
        Filter::ValuePath { path, filter } => {
            let Scope::Top(_) = scope else {
                return Err(ScimError::invalid_filter(
                    "nested value paths are not allowed",
                ));
            };
            let def = leaf_def(path, scope)?;
            if path.sub.is_some() || def.ty != AttrType::Complex {
                return Err(ScimError::invalid_filter(format!(
                    "`{path}` is not a complex attribute and cannot take a `[` value filter"
                )));
            }
            validate_in(filter, Scope::Within(def))
        }
    }
}

/// The definition a path ends at, with the unknown-attribute and `returned: never` checks.
fn leaf_def(path: &AttrPath, scope: Scope) -> ScimResult<&'static AttrDef> {
    let name = describe(path, scope);
    let Some((top, sub, _)) = resolve(path, scope) else {
        return Err(ScimError::invalid_filter(format!(
            "unknown attribute `{name}` in filter"
        )));
    };
    if top.returned == Returned::Never || sub.is_some_and(|s| s.returned == Returned::Never) {
        return Err(ScimError::invalid_filter(format!(
            "attribute `{name}` cannot be used in a filter"
        )));
    }
    Ok(sub.unwrap_or(top))
}

fn eval(filter: &Filter, scope: Scope, res: &Value) -> bool {
    match filter {
        Filter::And(a, b) => eval(a, scope, res) && eval(b, scope, res),
        Filter::Or(a, b) => eval(a, scope, res) || eval(b, scope, res),
        Filter::Not(inner) => !eval(inner, scope, res),
        Filter::Present(path) => {
            collect(path, scope, res).is_some_and(|(nodes, _)| nodes.into_iter().any(is_present))
        }
        Filter::Compare { path, op, value } => {
            let Some((nodes, def)) = collect(path, scope, res) else {
                return false;
            };
            if value.is_null() {
                let present = nodes.into_iter().any(is_present);
                return match op {
                    CompareOp::Eq => !present,
                    CompareOp::Ne => present,
                    _ => false,
                };
            }
            let (nodes, def) = if def.ty == AttrType::Complex {
                let Some(vdef) = def.sub("value") else {
                    return false;
                };
                let mut vals = Vec::new();
                for n in nodes {
                    if let Some(v) = get_ci(n, "value") {
                        flatten_into(v, &mut vals);
                    }
                }
                (vals, vdef)
            } else {
                (nodes, def)
            };
            match op {
                CompareOp::Ne => !nodes
                    .iter()
                    .any(|n| compare_one(n, CompareOp::Eq, value, def)),
                _ => nodes.iter().any(|n| compare_one(n, *op, value, def)),
            }
        }
        Filter::ValuePath { path, filter } => {
            let Scope::Top(_) = scope else {
                return false;
            };
            let Some((nodes, def)) = collect(path, scope, res) else {
                return false;
            };
            if path.sub.is_some() || def.ty != AttrType::Complex {
                return false;
            }
            nodes
                .into_iter()
                .any(|elem| eval(filter, Scope::Within(def), elem))
        }
    }
}

fn flatten_into<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => out.extend(items.iter()),
        other => out.push(other),
    }
}

/// The values a path addresses (array elements flattened) and the definition that governs them.
fn collect<'a>(
    path: &AttrPath,
    scope: Scope,
    res: &'a Value,
) -> Option<(Vec<&'a Value>, &'static AttrDef)> {
    let (top, sub, ext) = resolve(path, scope)?;
    let node = match scope {
        Scope::Top(_) => top_value(res, ext, top.name),
        Scope::Within(_) => get_ci(res, top.name),
    };
    let mut tops = Vec::new();
    if let Some(n) = node {
        flatten_into(n, &mut tops);
    }
    match sub {
        None => Some((tops, top)),
        Some(sdef) => {
            let mut out = Vec::new();
            for t in tops {
                if let Some(v) = get_ci(t, sdef.name) {
                    flatten_into(v, &mut out);
                }
            }
            Some((out, sdef))
        }
    }
}

/// Present: not null, not `""`, not an empty array, and for objects some member present.
fn is_present(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(items) => items.iter().any(is_present),
        Value::Object(map) => map.values().any(is_present),
        Value::Bool(_) | Value::Number(_) => true,
    }
}

fn ordering_holds(op: CompareOp, ord: Ordering) -> bool {
    match op {
        CompareOp::Eq => ord == Ordering::Equal,
        CompareOp::Ne => ord != Ordering::Equal,
        CompareOp::Gt => ord == Ordering::Greater,
        CompareOp::Ge => ord != Ordering::Less,
        CompareOp::Lt => ord == Ordering::Less,
        CompareOp::Le => ord != Ordering::Greater,
        CompareOp::Co | CompareOp::Sw | CompareOp::Ew => false,
    }
}

/// Text of a scalar: strings as is, numbers and booleans in their JSON form.
fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn as_number(v: &Value) -> Option<Number> {
    match v {
        Value::Number(n) => Some(n.clone()),
        Value::String(s) => serde_json::from_str::<Number>(s.trim()).ok(),
        _ => None,
    }
}

/// One stored value against the literal, under the attribute definition `def`.
fn compare_one(v: &Value, op: CompareOp, lit: &Value, def: &AttrDef) -> bool {
    if v.is_null() || lit.is_null() {
        return false;
    }
    match def.ty {
        AttrType::String | AttrType::Reference | AttrType::Binary => {
            let (Some(a), Some(b)) = (scalar_text(v), scalar_text(lit)) else {
                return false;
            };
            let (a, b) = (fold(&a, def.case_exact), fold(&b, def.case_exact));
            match op {
                CompareOp::Co => a.contains(b.as_ref()),
                CompareOp::Sw => a.starts_with(b.as_ref()),
                CompareOp::Ew => a.ends_with(b.as_ref()),
                _ => ordering_holds(op, a.cmp(&b)),
            }
        }
        AttrType::Boolean => match (as_bool(v), as_bool(lit)) {
            (Some(a), Some(b)) => match op {
                CompareOp::Eq => a == b,
                CompareOp::Ne => a != b,
                _ => false,
            },
            _ => false,
        },
        AttrType::Integer | AttrType::Decimal => match (as_number(v), as_number(lit)) {
            (Some(a), Some(b)) => cmp_numbers(&a, &b).is_some_and(|o| ordering_holds(op, o)),
            _ => false,
        },
        AttrType::DateTime => {
            let parse = |x: &Value| x.as_str().and_then(parse_datetime);
            match (parse(v), parse(lit)) {
                (Some(a), Some(b)) => ordering_holds(op, a.cmp(&b)),
                _ => false,
            }
        }
        AttrType::Complex => false,
    }
}
