//! Projection (`attributes` / `excludedAttributes`, RFC 7644 §3.4.2.5 and §3.9) and sorting
//! (`sortBy`, RFC 7644 §3.4.2.3) of resource JSON, plus the value helpers shared with filter
//! evaluation (case-insensitive key lookup, case folding, dateTime parsing).

use std::borrow::Cow;
use std::cmp::Ordering;

use serde_json::{Map, Number, Value};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::error::{ScimError, ScimResult};
use crate::filter::parse_patch_path;
use crate::path::AttrPath;
use crate::schema::{AttrDef, AttrType, ResourceKind, Returned, SchemaDef};

/// Parses an `attributes` / `excludedAttributes` value: comma-separated attribute paths
/// (`userName,name.givenName,urn:...:enterprise:2.0:User:department`). Spaces around entries are
/// trimmed and empty entries skipped, so `""` is an empty list. Microsoft's
/// `emails[type eq "work"]` is accepted and stands for its attribute (`emails`;
/// `emails[type eq "work"].value` stands for `emails.value`). A bare schema URN is returned as
/// `AttrPath { urn: Some(urn), attr: "", sub: None }` and selects that whole schema's
/// attributes. Unknown (well-formed) names are kept here and ignored by [`project`].
///
/// A malformed entry is 400 `invalidPath` (the entries are attribute paths; the RFC names no
/// `scimType` for this case).
pub fn parse_attribute_list(s: &str) -> ScimResult<Vec<AttrPath>> {
    let mut out = Vec::new();
    for item in split_top_level(s) {
        let item = item.trim();
        if item.is_empty() {
            continue;
        }
        let pp = parse_patch_path(item).map_err(|e| {
            ScimError::invalid_path(format!(
                "invalid attribute list entry `{item}`: {}",
                e.detail
            ))
        })?;
        let mut attr = pp.attr;
        if pp.sub.is_some() {
            attr.sub = pp.sub;
        }
        out.push(attr);
    }
    Ok(out)
}

/// Splits on commas outside brackets and string literals.
fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut in_str, mut escaped, mut start) = (0usize, false, false, 0usize);
    for (i, c) in s.char_indices() {
        if in_str {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_str = false;
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

/// Applies `attributes` / `excludedAttributes` to a resource's JSON.
///
/// - `returned: never` attributes (`password`) are always dropped; `returned: always` ones
///   (`id`, `schemas`) are always kept.
/// - With a non-empty `attributes`, only the listed attributes are kept (`name.givenName` keeps
///   `{"name":{"givenName":..}}`; for multi-valued complex attributes the sub-attribute is kept
///   in every element); `meta` only when listed. Extension attributes stay under their URN key,
///   which is dropped when nothing in it is selected. A bare schema URN selects the whole
///   extension (or all core attributes).
/// - Otherwise `returned: request` attributes are dropped and everything else kept.
/// - `excluded` then removes attributes or sub-attributes (never `returned: always` ones).
///   Both lists may be given; `excluded` applies after `attributes`.
///
/// Names match case-insensitively; unknown names are ignored. Keys of the resource that are not
/// in the schema are kept only when `attributes` is empty. `schemas` is copied as is.
pub fn project(
    kind: ResourceKind,
    resource: &Value,
    attributes: &[AttrPath],
    excluded: &[AttrPath],
) -> Value {
    let Value::Object(obj) = resource else {
        return resource.clone();
    };
    let attrs_mode = !attributes.is_empty();
    let core_whole = attributes.iter().any(|p| is_bare(p, kind.core().id));
    let mut out = Map::new();
    for (key, val) in obj {
        if let Some(ext) = kind.extension(key) {
            if excluded.iter().any(|p| is_bare(p, ext.id)) {
                continue;
            }
            let whole = attributes.iter().any(|p| is_bare(p, ext.id));
            let Value::Object(ext_obj) = val else {
                if !attrs_mode || whole {
                    out.insert(key.clone(), val.clone());
                }
                continue;
            };
            let mut eo = Map::new();
            for (k, v) in ext_obj {
                match ext.attr(k) {
                    Some(def) => {
                        let sel = Selection::new(kind, Some(ext), def, attributes, excluded, whole);
                        if let Some(v) = project_attr(def, v, &sel) {
                            eo.insert(k.clone(), v);
                        }
                    }
                    None => {
                        if !attrs_mode || whole {
                            eo.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            if !eo.is_empty() || (ext_obj.is_empty() && (!attrs_mode || whole)) {
                out.insert(key.clone(), Value::Object(eo));
            }
            continue;
        }
        match kind.resolve(None, key) {
            Some(r) => {
                let sel = Selection::new(kind, None, r.def, attributes, excluded, core_whole);
                if let Some(v) = project_attr(r.def, val, &sel) {
                    out.insert(key.clone(), v);
                }
            }
            None => {
                let excl = excluded.iter().any(|p| {
                    p.urn.is_none() && p.sub.is_none() && p.attr.eq_ignore_ascii_case(key)
                });
                if !attrs_mode && !excl {
                    out.insert(key.clone(), val.clone());
                }
            }
        }
    }
    Value::Object(out)
}

fn is_bare(p: &AttrPath, urn: &str) -> bool {
    p.attr.is_empty()
        && p.urn
            .as_deref()
            .is_some_and(|u| u.eq_ignore_ascii_case(urn))
}

/// Whether `p` names the top-level attribute `def` of the given extension (or core/common).
fn names(p: &AttrPath, kind: ResourceKind, ext: Option<&SchemaDef>, def: &AttrDef) -> bool {
    if p.attr.is_empty() || !p.attr.eq_ignore_ascii_case(def.name) {
        return false;
    }
    match (p.urn.as_deref(), ext) {
        (None, None) => true,
        (Some(u), None) => u.eq_ignore_ascii_case(kind.core().id),
        (Some(u), Some(e)) => u.eq_ignore_ascii_case(e.id),
        (None, Some(_)) => false,
    }
}

#[derive(Debug)]
struct Selection<'a> {
    attrs_mode: bool,
    include_whole: bool,
    include_subs: Vec<&'a str>,
    exclude_whole: bool,
    exclude_subs: Vec<&'a str>,
}

impl<'a> Selection<'a> {
    fn new(
        kind: ResourceKind,
        ext: Option<&SchemaDef>,
        def: &AttrDef,
        attributes: &'a [AttrPath],
        excluded: &'a [AttrPath],
        whole_schema: bool,
    ) -> Selection<'a> {
        let mut s = Selection {
            attrs_mode: !attributes.is_empty(),
            include_whole: whole_schema,
            include_subs: Vec::new(),
            exclude_whole: false,
            exclude_subs: Vec::new(),
        };
        for p in attributes.iter().filter(|p| names(p, kind, ext, def)) {
            match &p.sub {
                None => s.include_whole = true,
                Some(sub) => s.include_subs.push(sub),
            }
        }
        for p in excluded.iter().filter(|p| names(p, kind, ext, def)) {
            match &p.sub {
                None => s.exclude_whole = true,
                Some(sub) => s.exclude_subs.push(sub),
            }
        }
        s
    }
}

fn project_attr(def: &AttrDef, val: &Value, sel: &Selection<'_>) -> Option<Value> {
    match def.returned {
        Returned::Never => return None,
        Returned::Always => return Some(filter_subs(def, val, |_| true)),
        Returned::Request if !sel.attrs_mode => return None,
        _ => {}
    }
    if sel.attrs_mode && !sel.include_whole && sel.include_subs.is_empty() {
        return None;
    }
    if sel.exclude_whole {
        return None;
    }
    if def.ty != AttrType::Complex {
        return Some(val.clone());
    }
    let keep = |name: &str, sub: Option<&AttrDef>| {
        let always = sub.is_some_and(|d| d.returned == Returned::Always);
        let in_list = |list: &[&str]| list.iter().any(|s| s.eq_ignore_ascii_case(name));
        if always {
            return true;
        }
        if sel.attrs_mode && !sel.include_whole && !in_list(&sel.include_subs) {
            return false;
        }
        if sub.is_some_and(|d| d.returned == Returned::Request)
            && !(sel.attrs_mode && in_list(&sel.include_subs))
        {
            return false;
        }
        !in_list(&sel.exclude_subs)
    };
    let projected = filter_subs(def, val, |name| keep(name, def.sub(name)));
    let emptied = |before: &Value, after: &Value| match (before, after) {
        (Value::Object(b), Value::Object(a)) => !b.is_empty() && a.is_empty(),
        (Value::Array(b), Value::Array(a)) => !b.is_empty() && a.is_empty(),
        _ => false,
    };
    if emptied(val, &projected) {
        None
    } else {
        Some(projected)
    }
}

/// Keeps the sub-attributes of a complex value (or of each element) for which `keep` holds;
/// `returned: never` sub-attributes are always dropped. Elements emptied by the projection are
/// dropped.
fn filter_subs(def: &AttrDef, val: &Value, keep: impl Fn(&str) -> bool) -> Value {
    let one = |v: &Value| -> Option<Value> {
        match v {
            Value::Object(m) if !m.is_empty() => {
                let out: Map<String, Value> = m
                    .iter()
                    .filter(|(k, _)| {
                        def.sub(k).is_none_or(|d| d.returned != Returned::Never) && keep(k)
                    })
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (!out.is_empty()).then_some(Value::Object(out))
            }
            other => Some(other.clone()),
        }
    };
    if def.ty != AttrType::Complex {
        return val.clone();
    }
    match val {
        Value::Array(items) => Value::Array(items.iter().filter_map(one).collect()),
        other => one(other).unwrap_or_else(|| Value::Object(Map::new())),
    }
}

/// Ascending order of two resources by `by` (RFC 7644 §3.4.2.3): strings compared
/// case-insensitively unless the attribute is `caseExact`, numbers numerically, dateTimes
/// chronologically, booleans `false < true`. A multi-valued attribute sorts by its `primary`
/// element (else its first element). Resources without a value (absent, null, `""`, `[]`) sort
/// **last**; the caller reverses the ordering for `descending`, which puts them first, as the
/// RFC describes. An unknown `by` makes every pair equal (a stable sort keeps the input order).
pub fn sort_cmp(kind: ResourceKind, by: &AttrPath, a: &Value, b: &Value) -> Ordering {
    let Some((top, sub)) = by.resolve(kind) else {
        return Ordering::Equal;
    };
    let ext = top.extension.map(|e| e.id);
    let (def, ka) = sort_key(a, ext, top.def, sub);
    let (_, kb) = sort_key(b, ext, top.def, sub);
    match (ka, kb) {
        (None, None) => Ordering::Equal,
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (Some(x), Some(y)) => cmp_values(x, y, def),
    }
}

fn sort_key<'a>(
    res: &'a Value,
    ext: Option<&str>,
    top: &'static AttrDef,
    sub: Option<&'static AttrDef>,
) -> (Option<&'static AttrDef>, Option<&'a Value>) {
    let mut node = top_value(res, ext, top.name);
    if let Some(Value::Array(items)) = node {
        node = items
            .iter()
            .find(|e| get_ci(e, "primary").and_then(as_bool) == Some(true))
            .or_else(|| items.first());
    }
    let (node, def) = match sub {
        Some(s) => (node.and_then(|n| get_ci(n, s.name)), Some(s)),
        None if top.ty == AttrType::Complex => {
            let vdef = top.sub("value");
            (node.and_then(|n| get_ci(n, "value")), vdef)
        }
        None => (node, Some(top)),
    };
    let node = node.filter(|v| match v {
        Value::Null => false,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(_) => false,
        _ => true,
    });
    (def, node)
}

fn type_rank(v: &Value) -> u8 {
    match v {
        Value::Bool(_) => 0,
        Value::Number(_) => 1,
        Value::String(_) => 2,
        _ => 3,
    }
}

fn cmp_values(a: &Value, b: &Value, def: Option<&AttrDef>) -> Ordering {
    let case_exact = def.is_some_and(|d| d.case_exact);
    if def.is_some_and(|d| d.ty == AttrType::DateTime)
        && let (Some(x), Some(y)) = (
            a.as_str().and_then(parse_datetime),
            b.as_str().and_then(parse_datetime),
        )
    {
        return x.cmp(&y);
    }
    match (a, b) {
        (Value::Bool(x), Value::Bool(y)) => x.cmp(y),
        (Value::Number(x), Value::Number(y)) => cmp_numbers(x, y).unwrap_or(Ordering::Equal),
        (Value::String(x), Value::String(y)) => fold(x, case_exact).cmp(&fold(y, case_exact)),
        _ => type_rank(a).cmp(&type_rank(b)),
    }
}

/// Numeric comparison: exact for integers, `f64` otherwise.
pub(crate) fn cmp_numbers(a: &Number, b: &Number) -> Option<Ordering> {
    let int = |n: &Number| {
        n.as_i64()
            .map(i128::from)
            .or_else(|| n.as_u64().map(i128::from))
    };
    match (int(a), int(b)) {
        (Some(x), Some(y)) => Some(x.cmp(&y)),
        _ => a.as_f64()?.partial_cmp(&b.as_f64()?),
    }
}

/// Looks a key up in a JSON object: the exact key first, then case-insensitively.
pub(crate) fn get_ci<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    let map = obj.as_object()?;
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// The value of a top-level attribute: under the extension's URN object when `ext` is set.
pub(crate) fn top_value<'a>(res: &'a Value, ext: Option<&str>, name: &str) -> Option<&'a Value> {
    match ext {
        Some(urn) => get_ci(get_ci(res, urn)?, name),
        None => get_ci(res, name),
    }
}

/// Case folding for `caseExact: false` comparisons (Unicode lower-casing).
pub(crate) fn fold(s: &str, case_exact: bool) -> Cow<'_, str> {
    if case_exact {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(s.to_lowercase())
    }
}

/// A boolean, or the strings `"true"`/`"false"` in any case (Entra sends `"False"`).
pub(crate) fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

/// Parses an `xsd:dateTime` as RFC 3339 (`2015-10-10T14:38:21.86-07:00`, `...Z`), tolerating a
/// lower-case `t`/`z` and a bare date (`2015-10-10`, taken as midnight UTC).
pub(crate) fn parse_datetime(s: &str) -> Option<OffsetDateTime> {
    let s = s.trim();
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    if s.contains(['t', 'z'])
        && let Ok(t) = OffsetDateTime::parse(&s.to_ascii_uppercase(), &Rfc3339)
    {
        return Some(t);
    }
    time::Date::parse(s, format_description!("[year]-[month]-[day]"))
        .ok()
        .map(|d| d.midnight().assume_utc())
}
