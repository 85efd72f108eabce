//! Resource bodies: normalising POST/PUT bodies into the canonical stored JSON, the PUT
//! immutability check, and accessors for the few attributes the rest of the service reads.
//!
//! # The stored form
//!
//! A resource is stored as a JSON object with canonical attribute names (the casing of
//! [`crate::schema`]), extension attributes nested under their schema URN, and a `schemas` array
//! recomputed from what is present (core URN first, then each extension that has a value). It
//! never contains:
//!
//! * `id` and `meta` (the store owns them),
//! * a Group's `members` (membership rows live in their own table; [`Normalized::members`]
//!   carries them out of the body),
//! * a User's `groups` (derived from membership, read-only),
//! * `password` (write-only; TeamCity accounts get random passwords, so an IdP password is
//!   accepted and dropped).
//!
//! # Tolerance rules (see `scim-interop.md` §1.3, §1.4, §2)
//!
//! * Attribute names and extension URN keys match case-insensitively; URN-qualified top-level
//!   keys (`"urn:...:enterprise:2.0:User:department"`) and dotted keys (`"name.givenName"`) are
//!   folded into their place.
//! * Unknown attributes, unknown sub-attributes, unknown schema URNs (Entra's ADSCIM Group URN,
//!   OneLogin's `urn:scim:schemas:core:1.0`) and read-only attributes are ignored.
//! * `null`, `""`, `[]` and `{}` mean "not provided" and never reach the stored form (OneLogin
//!   sends `"title":""` for unmapped template placeholders).
//! * Booleans accept `true`/`false` and the strings `"true"`/`"false"` in any case (Entra sends
//!   `"True"`/`"False"`).
//! * String attributes must be JSON strings: a number for `userName` or `employeeNumber` is a
//!   400 `invalidValue` that names the attribute (strict, so a mis-mapped IdP attribute is
//!   visible instead of silently stringified).
//! * A multi-valued attribute given a single value is wrapped in a one-element array; a
//!   single-valued attribute given a one-element array is unwrapped (Entra's manager
//!   `[{"$ref":..,"value":"<id>"}]`). A complex attribute with a `value` sub-attribute given a bare
//!   string becomes `{"value": s}` (Entra's manager as a plain id). Equal elements of a
//!   multi-valued attribute are de-duplicated.
//! * `$ref` sub-attributes are dropped: the server derives them from `value`.

use serde_json::{Map, Value};

use crate::error::{ScimError, ScimResult};
use crate::path::AttrPath;
use crate::schema::{self, AttrDef, AttrType, Mutability, ResourceKind, SchemaDef};

/// One Group member as given in a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// The member's `id` (a User or Group id; possibly a `bulkId:` reference).
    pub value: String,
    /// `"User"` or `"Group"` when the client said which (canonical casing).
    pub ty: Option<String>,
    /// The display name the client sent, if any.
    pub display: Option<String>,
}

/// A normalised POST/PUT body.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// The canonical stored JSON (see the module documentation).
    pub attrs: Value,
    /// Groups: `Some(list)` when the body had `members` (including an empty list), `None` when
    /// it was absent or `null`. Users: always `None`.
    pub members: Option<Vec<Member>>,
}

/// Normalises a POST or PUT body into the stored form. Errors: a body that is not an object
/// (400 `invalidSyntax`), a value of the wrong type or a missing required attribute (400
/// `invalidValue`, naming the attribute).
pub fn normalize(kind: ResourceKind, body: &Value) -> ScimResult<Normalized> {
    let (attrs, members) = normalize_inner(kind, body, true)?;
    Ok(Normalized { attrs, members })
}

/// [`normalize`] with the required-attribute check optional (PATCH normalises the stored input
/// without it and enforces it on the result).
pub(crate) fn normalize_inner(
    kind: ResourceKind,
    body: &Value,
    check_required: bool,
) -> ScimResult<(Value, Option<Vec<Member>>)> {
    let Value::Object(map) = body else {
        return Err(ScimError::invalid_syntax(
            "the request body must be a JSON object",
        ));
    };
    let mut out = Map::new();
    let mut members = None;
    for (key, value) in map {
        if key.eq_ignore_ascii_case("schemas") {
            continue;
        }
        if kind == ResourceKind::Group && key.eq_ignore_ascii_case("members") {
            members = if value.is_null() {
                None
            } else {
                Some(parse_members(value)?)
            };
            continue;
        }
        if let Some(ext) = kind.extension(key) {
            fold_schema_object(kind, Some(ext), key, value, &mut out)?;
            continue;
        }
        if kind.core().id.eq_ignore_ascii_case(key) {
            fold_schema_object(kind, None, key, value, &mut out)?;
            continue;
        }
        let Ok(path) = AttrPath::parse(key) else {
            // Not an attribute name at all: an unknown attribute, ignored.
            continue;
        };
        fold_path(kind, &path, value, &mut out)?;
    }
    finish(kind, out, check_required).map(|attrs| (attrs, members))
}

/// Folds `{"<urn>": {attr: value, ...}}` into `out` (an extension, or the core schema when
/// `ext` is `None`).
fn fold_schema_object(
    kind: ResourceKind,
    ext: Option<&'static SchemaDef>,
    key: &str,
    value: &Value,
    out: &mut Map<String, Value>,
) -> ScimResult<()> {
    match value {
        Value::Null => Ok(()),
        Value::Object(inner) => {
            let urn = ext.map_or(kind.core().id, |e| e.id);
            for (k, v) in inner {
                let Ok(mut path) = AttrPath::parse(k) else {
                    continue;
                };
                path.urn = Some(urn.to_owned());
                fold_path(kind, &path, v, out)?;
            }
            Ok(())
        }
        _ => Err(ScimError::invalid_value(format!(
            "`{key}` must be an object of that schema's attributes"
        ))),
    }
}

/// Folds one `[urn:]attr[.sub]: value` entry into `out`. Unknown, read-only and write-only
/// targets are ignored.
fn fold_path(
    kind: ResourceKind,
    path: &AttrPath,
    value: &Value,
    out: &mut Map<String, Value>,
) -> ScimResult<()> {
    let Some((top, sub)) = path.resolve(kind) else {
        return Ok(());
    };
    if kind == ResourceKind::Group && top.def.name == "members" {
        // Only reachable through a URN-qualified or dotted key; members travel separately.
        return Ok(());
    }
    if !writable(top.def) || sub.is_some_and(|s| !writable(s)) {
        return Ok(());
    }
    let container = container_mut(out, top.extension);
    let label = label_of(top.extension, top.def, sub);
    match sub {
        None => {
            let Some(v) = coerce_attr(top.def, value, &label)? else {
                return Ok(());
            };
            match (container.get_mut(top.def.name), v) {
                // `name.givenName` seen before `name`: merge.
                (Some(Value::Object(old)), Value::Object(new)) if !top.def.multi_valued => {
                    old.extend(new);
                }
                (_, v) => {
                    container.insert(top.def.name.to_owned(), v);
                }
            }
        }
        Some(sd) => {
            if top.def.multi_valued {
                // `emails.value` in a POST body has no element to land in: ignored.
                return Ok(());
            }
            let Some(v) = coerce_attr(sd, value, &label)? else {
                return Ok(());
            };
            let slot = container
                .entry(top.def.name.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            if let Value::Object(o) = slot {
                o.insert(sd.name.to_owned(), v);
            }
        }
    }
    Ok(())
}

/// Whether a client may write the attribute (read-only ignored; write-only `password` dropped,
/// see the module documentation).
fn writable(def: &AttrDef) -> bool {
    matches!(
        def.mutability,
        Mutability::ReadWrite | Mutability::Immutable
    ) && def.name != "$ref"
}

/// The object holding an attribute: the resource itself or its extension's object.
pub(crate) fn container_mut<'a>(
    root: &'a mut Map<String, Value>,
    ext: Option<&'static SchemaDef>,
) -> &'a mut Map<String, Value> {
    match ext {
        None => root,
        Some(e) => {
            let slot = root
                .entry(e.id.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            match slot {
                Value::Object(o) => o,
                _ => unreachable!("slot was just made an object"),
            }
        }
    }
}

/// A human-readable attribute name for error details (`name.givenName`,
/// `urn:...:User:employeeNumber`).
pub(crate) fn label_of(
    ext: Option<&'static SchemaDef>,
    def: &AttrDef,
    sub: Option<&AttrDef>,
) -> String {
    let mut s = String::new();
    if let Some(e) = ext {
        s.push_str(e.id);
        s.push(':');
    }
    s.push_str(def.name);
    if let Some(sd) = sub {
        s.push('.');
        s.push_str(sd.name);
    }
    s
}

/// Final pass shared by POST/PUT and PATCH: drop empty extension objects, enforce required
/// attributes and recompute `schemas`.
fn finish(
    kind: ResourceKind,
    mut out: Map<String, Value>,
    check_required: bool,
) -> ScimResult<Value> {
    let mut schemas = vec![Value::String(kind.core().id.to_owned())];
    for ext in kind.extensions() {
        match out.get(ext.id) {
            Some(Value::Object(o)) if !o.is_empty() => {
                schemas.push(Value::String(ext.id.to_owned()));
            }
            Some(_) => {
                out.remove(ext.id);
            }
            None => {}
        }
    }
    if check_required {
        check_required_attrs(kind, &out)?;
    }
    out.insert("schemas".to_owned(), Value::Array(schemas));
    Ok(Value::Object(out))
}

fn check_required_attrs(kind: ResourceKind, out: &Map<String, Value>) -> ScimResult<()> {
    type Scope<'m> = (Option<&'m Map<String, Value>>, &'static [AttrDef]);
    let mut scopes: Vec<Scope<'_>> = vec![(Some(out), kind.core().attributes)];
    for ext in kind.extensions() {
        scopes.push((out.get(ext.id).and_then(Value::as_object), ext.attributes));
    }
    for (map, defs) in scopes {
        for def in defs.iter().filter(|d| d.required) {
            if map.and_then(|m| m.get(def.name)).is_none() {
                return Err(ScimError::invalid_value(format!(
                    "{} is required",
                    def.name
                )));
            }
        }
    }
    Ok(())
}

/// Coerces a value for attribute `def` (multi-valued or not). `Ok(None)` means "no value"
/// (`null`, `""`, `[]`, `{}`).
pub(crate) fn coerce_attr(def: &AttrDef, v: &Value, label: &str) -> ScimResult<Option<Value>> {
    if def.multi_valued {
        let items: &[Value] = match v {
            Value::Array(a) => a,
            other => std::slice::from_ref(other),
        };
        let mut out: Vec<Value> = Vec::with_capacity(items.len());
        for item in items {
            if let Some(c) = coerce_single(def, item, label)?
                && !out.contains(&c)
            {
                out.push(c);
            }
        }
        Ok((!out.is_empty()).then_some(Value::Array(out)))
    } else {
        match v {
            Value::Array(a) if a.is_empty() => Ok(None),
            Value::Array(a) if a.len() == 1 => coerce_single(def, &a[0], label),
            Value::Array(_) => Err(ScimError::invalid_value(format!(
                "`{label}` is single-valued but an array of several values was given"
            ))),
            other => coerce_single(def, other, label),
        }
    }
}

/// Coerces one value (one element of a multi-valued attribute, or the value of a single-valued
/// one) to the attribute's type.
pub(crate) fn coerce_single(def: &AttrDef, v: &Value, label: &str) -> ScimResult<Option<Value>> {
    if v.is_null() {
        return Ok(None);
    }
    if v.as_str() == Some("") {
        return Ok(None);
    }
    let wrong = |what: &str| {
        ScimError::invalid_value(format!("`{label}` must be {what}, got {}", short_json(v)))
    };
    match def.ty {
        AttrType::Complex => match v {
            Value::Object(o) => {
                let mut out = Map::new();
                for (k, sv) in o {
                    let Some(sd) = def.sub(k) else { continue };
                    if !writable(sd) {
                        continue;
                    }
                    let sub_label = format!("{label}.{}", sd.name);
                    if let Some(c) = coerce_attr(sd, sv, &sub_label)? {
                        out.insert(sd.name.to_owned(), c);
                    }
                }
                Ok((!out.is_empty()).then_some(Value::Object(out)))
            }
            Value::String(s) if def.sub("value").is_some() => {
                let mut out = Map::new();
                out.insert("value".to_owned(), Value::String(s.clone()));
                Ok(Some(Value::Object(out)))
            }
            _ => Err(wrong("an object")),
        },
        AttrType::String | AttrType::Reference => match v {
            Value::String(_) => Ok(Some(v.clone())),
            _ => Err(wrong("a string")),
        },
        AttrType::Binary => match v {
            Value::String(s) if is_base64(s) => Ok(Some(v.clone())),
            _ => Err(wrong("base64 data")),
        },
        AttrType::Boolean => match v {
            Value::Bool(_) => Ok(Some(v.clone())),
            Value::String(s) if s.trim().eq_ignore_ascii_case("true") => {
                Ok(Some(Value::Bool(true)))
            }
            Value::String(s) if s.trim().eq_ignore_ascii_case("false") => {
                Ok(Some(Value::Bool(false)))
            }
            _ => Err(wrong("a boolean")),
        },
        AttrType::Integer => match v {
            Value::Number(n) if n.is_i64() || n.is_u64() => Ok(Some(v.clone())),
            _ => Err(wrong("an integer")),
        },
        AttrType::Decimal => match v {
            Value::Number(_) => Ok(Some(v.clone())),
            _ => Err(wrong("a number")),
        },
        AttrType::DateTime => match v {
            Value::String(s)
                if time::OffsetDateTime::parse(
                    s,
                    &time::format_description::well_known::Rfc3339,
                )
                .is_ok() =>
            {
                Ok(Some(v.clone()))
            }
            _ => Err(wrong("an RFC 3339 dateTime")),
        },
    }
}

fn is_base64(s: &str) -> bool {
    use base64::Engine as _;
    let compact: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(&compact)
        .is_ok()
        || base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(&compact)
            .is_ok()
}

/// A value's JSON text, truncated for error details.
pub(crate) fn short_json(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        let mut t: String = s.chars().take(57).collect();
        t.push_str("...");
        t
    } else {
        s
    }
}

/// Case-insensitive key lookup.
pub(crate) fn get_ci<'a>(map: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    map.get(key).or_else(|| {
        map.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// Parses a `members` value: an array of member objects (or one object, or bare id strings).
/// Each needs a non-empty string `value`; `type` is canonicalised to `User`/`Group`; `$ref` is
/// dropped; duplicates by `value` are removed (first wins).
pub(crate) fn parse_members(v: &Value) -> ScimResult<Vec<Member>> {
    let items: &[Value] = match v {
        Value::Null => &[],
        Value::Array(a) => a,
        other => std::slice::from_ref(other),
    };
    let mut out: Vec<Member> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let m = match item {
            Value::Null => continue,
            Value::String(s) if !s.is_empty() => Member {
                value: s.clone(),
                ty: None,
                display: None,
            },
            Value::Object(o) => {
                let value = match get_ci(o, "value") {
                    Some(Value::String(s)) if !s.is_empty() => s.clone(),
                    _ => {
                        return Err(ScimError::invalid_value(format!(
                            "members[{i}].value must be a non-empty string (the member's id)"
                        )));
                    }
                };
                let ty = match get_ci(o, "type") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) if s.is_empty() => None,
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("user") => {
                        Some("User".to_owned())
                    }
                    Some(Value::String(s)) if s.eq_ignore_ascii_case("group") => {
                        Some("Group".to_owned())
                    }
                    Some(other) => {
                        return Err(ScimError::invalid_value(format!(
                            "members[{i}].type must be \"User\" or \"Group\", got {}",
                            short_json(other)
                        )));
                    }
                };
                let display = match get_ci(o, "display") {
                    Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
                    _ => None,
                };
                Member { value, ty, display }
            }
            other => {
                return Err(ScimError::invalid_value(format!(
                    "members[{i}] must be an object with a `value`, got {}",
                    short_json(other)
                )));
            }
        };
        if !out.iter().any(|x| x.value == m.value) {
            out.push(m);
        }
    }
    Ok(out)
}

/// PUT check: an attribute (or a sub-attribute of a single-valued complex attribute) whose
/// mutability is `immutable` and that has a value in `old` must have the same value in `new`;
/// otherwise 400 `mutability` naming it. Dropping such a value (absent in `new`) is a change
/// too. Both arguments are stored forms.
pub fn check_immutable(kind: ResourceKind, old: &Value, new: &Value) -> ScimResult<()> {
    let root_old = old.as_object();
    let root_new = new.as_object();
    check_immutable_defs(schema::common_attributes(), root_old, root_new, "")?;
    check_immutable_defs(kind.core().attributes, root_old, root_new, "")?;
    for ext in kind.extensions() {
        let o = root_old
            .and_then(|m| m.get(ext.id))
            .and_then(Value::as_object);
        let n = root_new
            .and_then(|m| m.get(ext.id))
            .and_then(Value::as_object);
        check_immutable_defs(ext.attributes, o, n, &format!("{}:", ext.id))?;
    }
    Ok(())
}

/// The schema-independent core of [`check_immutable`].
pub(crate) fn check_immutable_defs(
    defs: &[AttrDef],
    old: Option<&Map<String, Value>>,
    new: Option<&Map<String, Value>>,
    prefix: &str,
) -> ScimResult<()> {
    for def in defs {
        let o = old.and_then(|m| m.get(def.name));
        let n = new.and_then(|m| m.get(def.name));
        if def.mutability == Mutability::Immutable {
            if o.is_some() && o != n {
                return Err(ScimError::mutability(format!(
                    "`{prefix}{}` is immutable: it was set to {} and cannot be changed",
                    def.name,
                    short_json(o.unwrap_or(&Value::Null))
                )));
            }
        } else if def.ty == AttrType::Complex && !def.multi_valued {
            check_immutable_defs(
                def.sub_attributes,
                o.and_then(Value::as_object),
                n.and_then(Value::as_object),
                &format!("{prefix}{}.", def.name),
            )?;
        }
    }
    Ok(())
}

/// The stored `userName`.
pub fn user_name(attrs: &Value) -> Option<&str> {
    attrs.get("userName").and_then(Value::as_str)
}

/// The stored `displayName`.
pub fn display_name(attrs: &Value) -> Option<&str> {
    attrs.get("displayName").and_then(Value::as_str)
}

/// The stored `externalId`.
pub fn external_id(attrs: &Value) -> Option<&str> {
    attrs.get("externalId").and_then(Value::as_str)
}

/// The stored `active` flag; `true` when absent (a User nobody deactivated is active).
pub fn active(attrs: &Value) -> bool {
    attrs.get("active").and_then(Value::as_bool).unwrap_or(true)
}

#[cfg(test)]
mod tests;
