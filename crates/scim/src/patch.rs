//! PATCH (RFC 7644 §3.5.2) with the IdP dialect normaliser.
//!
//! [`parse_patch`] reads a `PatchOp` body in any dialect seen in the wild and yields RFC-form
//! [`PatchOperation`]s; [`apply_patch`] applies them atomically to a stored resource (see
//! [`crate::resource`] for the stored form) and reports Group membership changes separately so
//! the store can apply member deltas without loading the whole group.
//!
//! # Dialects accepted (`scim-interop.md` §2)
//!
//! * `op` in any case (`Add`, `REPLACE`; Entra default dialect), `Operations`/`operations` and
//!   the `PatchOp` schema URN in any case. The `?aadOptscim062020` dialect (lower-case ops, real
//!   booleans, filter removes, path-less multi-attribute replace) is a subset of the above.
//! * Booleans as strings (`"False"`) and every other coercion of [`crate::resource`].
//! * `remove` on `members` with a value array removes only those members (Entra default dialect,
//!   JumpCloud); without a value it removes all members.
//!   The same shape on any other multi-valued attribute removes only the elements that have
//!   every sub-attribute value given (`{"op":"remove","path":"emails","value":[{"value":"x"}]}`).
//! * Path-less `add`/`replace` whose value keys are attribute paths (`"name.givenName"`,
//!   `"urn:...:enterprise:2.0:User:employeeNumber"`), nested objects, or extension URNs whose
//!   value is an object of that extension's attributes. Read-only, write-only and unknown keys in
//!   a path-less value are ignored (Okta sends `{"id": .., "displayName": ..}` with every group
//!   membership push); an explicit `path` naming a read-only attribute is a 400 `mutability`.
//! * A value filter that matches nothing on `add`/`replace` creates the element from the
//!   filter's `eq` terms plus the value (Entra: `replace emails[type eq "work"].value` with no
//!   work email). RFC 7644 says `noTarget`; we upsert. A filter that cannot seed an element
//!   (`or`, `ne`, ...) and matches nothing is a 400 `noTarget`.
//! * `add` on a single-valued attribute sets it; `add`/`replace` of a single-valued complex
//!   attribute merges sub-attributes (RFC 7644 §3.5.2.1/§3.5.2.3); Entra's manager as
//!   `[{"$ref": .., "value": "<id>"}]` becomes `{"value": "<id>"}`.
//! * URN-qualified paths whose URN contains dots are split at the URN's last `:` first.
//!
//! # Choices where the RFC is loose
//!
//! * The body must list the `PatchOp` schema (400 `invalidSyntax` otherwise); `Operations` must be
//!   a non-empty array (400 `invalidSyntax`); an unknown `op` is 400 `invalidSyntax`; `add` or
//!   `replace` without a `value` member is 400 `invalidSyntax`.
//! * Any path that fails to parse, including a malformed value filter inside it, is 400
//!   `invalidPath` (the path member is what is malformed); the detail keeps the parser's text.
//! * `remove` of a required attribute (`userName`, a Group's `displayName`) is 400 `mutability`;
//!   `replace` with `null`/`""` on one is 400 `invalidValue` ("userName is required").
//! * `replace` with `null`, `""` or `[]` unassigns (RFC 7643 §2.5: these states are equivalent);
//!   `add` with such a value is a no-op.
//! * A value filter that matches elements on `replace` (no sub-attribute) replaces each
//!   matching element with the value; on `add` it merges the value into each.
//! * A sub-attribute path on a multi-valued attribute without a filter (`emails.type`) applies
//!   to every element (and creates one element when there is none, for `add`/`replace`).
//! * A write to the write-only `password` is accepted and dropped (TeamCity gets random
//!   passwords); `$ref` sub-attributes are derived, so writes to them are dropped too.
//! * When an operation makes an element of a multi-valued attribute `primary: true` and another
//!   element already was, the older one becomes `primary: false` (RFC 7643 §2.4).
//! * Group `members`: sub-attribute paths (`members.display`, `members[..].value`) are 400
//!   `mutability` (members are added or removed, never edited); `add` with a filter is 400
//!   `invalidPath`.
//! * Element matching for value filters evaluates `attr[filter]` with [`crate::filter::matches`]
//!   on a synthetic one-element resource `{"attr": [element]}`, so filter semantics (caseExact,
//!   operators) are exactly those of `GET ?filter=`.

use serde_json::{Map, Value};

use crate::error::{ScimError, ScimResult, ScimType};
use crate::filter::{self, CompareOp, Filter, PatchPath};
use crate::path::AttrPath;
use crate::resource::{
    Member, check_immutable, coerce_attr, coerce_single, container_mut, get_ci, label_of,
    normalize_inner, parse_members, short_json,
};
use crate::schema::{AttrDef, Mutability, PATCH_OP_SCHEMA, ResourceKind, SchemaDef};

/// A PATCH operation kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchOpKind {
    /// `add`
    Add,
    /// `remove`
    Remove,
    /// `replace`
    Replace,
}

impl PatchOpKind {
    /// The keyword in RFC (lower) case.
    pub fn as_str(self) -> &'static str {
        match self {
            PatchOpKind::Add => "add",
            PatchOpKind::Remove => "remove",
            PatchOpKind::Replace => "replace",
        }
    }
}

/// One operation of a `PatchOp` request, in RFC form.
#[derive(Debug, Clone, PartialEq)]
pub struct PatchOperation {
    /// The operation.
    pub op: PatchOpKind,
    /// The target; `None` means the resource itself (`add`/`replace` only).
    pub path: Option<PatchPath>,
    /// The value as sent (`Some(Value::Null)` when the client sent `null`).
    pub value: Option<Value>,
}

/// A change to a Group's membership.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberChange {
    /// Add these members (already present ones are no-ops).
    Add(Vec<Member>),
    /// Remove the selected members.
    Remove(MemberSelector),
    /// Replace the whole membership with this list.
    ReplaceAll(Vec<Member>),
}

/// Which members a removal selects.
#[derive(Debug, Clone, PartialEq)]
pub enum MemberSelector {
    /// Every member.
    All,
    /// The members with these ids.
    Values(Vec<String>),
    /// Members matching a filter over member sub-attributes (`value`, `type`, `display`); only
    /// used when the filter is not a plain set of `value eq "<id>"` terms joined by `or`.
    Filter(Filter),
}

/// The result of [`apply_patch`].
#[derive(Debug, Clone, PartialEq)]
pub struct PatchOutcome {
    /// The new stored JSON, re-normalised.
    pub attrs: Value,
    /// Groups: membership changes in request order. Users: empty.
    pub members: Vec<MemberChange>,
    /// `false` when `attrs` equals the input and there are no member changes.
    pub changed: bool,
}

/// Parses a PatchOp request body and normalises every IdP dialect into RFC form.
///
/// Checks structure (schema, `Operations`, `op`, `path` syntax, `remove` without a path) and
/// that each path names a writable attribute of `kind`.
pub fn parse_patch(kind: ResourceKind, body: &Value) -> ScimResult<Vec<PatchOperation>> {
    let Value::Object(map) = body else {
        return Err(ScimError::invalid_syntax(
            "the PATCH body must be a JSON object",
        ));
    };
    let has_schema = match get_ci(map, "schemas") {
        Some(Value::Array(a)) => a.iter().any(|s| {
            s.as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case(PATCH_OP_SCHEMA))
        }),
        Some(Value::String(s)) => s.eq_ignore_ascii_case(PATCH_OP_SCHEMA),
        _ => false,
    };
    if !has_schema {
        return Err(ScimError::invalid_syntax(format!(
            "a PATCH body must have \"schemas\": [\"{PATCH_OP_SCHEMA}\"]"
        )));
    }
    let ops = match get_ci(map, "Operations") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        _ => {
            return Err(ScimError::invalid_syntax(
                "a PATCH body must have a non-empty \"Operations\" array",
            ));
        }
    };
    let mut out = Vec::with_capacity(ops.len());
    for (i, raw) in ops.iter().enumerate() {
        out.push(parse_one(kind, raw).map_err(|e| at_op(e, i))?);
    }
    Ok(out)
}

fn at_op(mut e: ScimError, i: usize) -> ScimError {
    e.detail = format!("Operations[{i}]: {}", e.detail);
    e
}

fn parse_one(kind: ResourceKind, raw: &Value) -> ScimResult<PatchOperation> {
    let Value::Object(m) = raw else {
        return Err(ScimError::invalid_syntax("an operation must be an object"));
    };
    let op = match get_ci(m, "op").and_then(Value::as_str).map(str::trim) {
        Some(s) if s.eq_ignore_ascii_case("add") => PatchOpKind::Add,
        Some(s) if s.eq_ignore_ascii_case("remove") => PatchOpKind::Remove,
        Some(s) if s.eq_ignore_ascii_case("replace") => PatchOpKind::Replace,
        Some(s) => {
            return Err(ScimError::invalid_syntax(format!(
                "unknown op `{s}`; expected add, remove or replace"
            )));
        }
        None => {
            return Err(ScimError::invalid_syntax(
                "\"op\" must be one of add, remove, replace",
            ));
        }
    };
    let path = match get_ci(m, "path") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.trim().is_empty() => None,
        Some(Value::String(s)) => Some(filter::parse_patch_path(s.trim()).map_err(|e| {
            if e.scim_type == Some(ScimType::InvalidPath) {
                e
            } else {
                ScimError::invalid_path(format!("invalid path `{s}`: {}", e.detail))
            }
        })?),
        Some(other) => {
            return Err(ScimError::invalid_path(format!(
                "\"path\" must be a string, got {}",
                short_json(other)
            )));
        }
    };
    let value = get_ci(m, "value").cloned();
    match (op, &path, &value) {
        (PatchOpKind::Remove, None, _) => {
            return Err(ScimError::no_target("remove requires a \"path\""));
        }
        (PatchOpKind::Add | PatchOpKind::Replace, _, None) => {
            return Err(ScimError::invalid_syntax(format!(
                "{} requires a \"value\"",
                op.as_str()
            )));
        }
        _ => {}
    }
    if let Some(p) = &path {
        resolve_target(kind, p)?;
    }
    Ok(PatchOperation { op, path, value })
}

/// What a path designates.
enum Target {
    /// A bare schema URN: the extension's object, or the resource itself for the core URN.
    Schema(Option<&'static SchemaDef>),
    /// An attribute of the stored JSON.
    Attr {
        ext: Option<&'static SchemaDef>,
        def: &'static AttrDef,
        filter: Option<Filter>,
        sub: Option<&'static AttrDef>,
    },
    /// A Group's `members`.
    Members(Option<Filter>),
    /// A write-only or derived target whose writes are accepted and dropped.
    Dropped,
}

fn resolve_target(kind: ResourceKind, p: &PatchPath) -> ScimResult<Target> {
    let text = display_path(p);
    if p.attr.attr.is_empty() {
        let urn = p.attr.urn.as_deref().unwrap_or("");
        if p.filter.is_some() || p.sub.is_some() || p.attr.sub.is_some() {
            return Err(ScimError::invalid_path(format!(
                "`{text}` is not a valid path"
            )));
        }
        if let Some(ext) = kind.extension(urn) {
            return Ok(Target::Schema(Some(ext)));
        }
        if kind.core().id.eq_ignore_ascii_case(urn) {
            return Ok(Target::Schema(None));
        }
        return Err(ScimError::invalid_path(format!(
            "`{urn}` is not a schema of {}",
            kind.name()
        )));
    }
    let Some(top) = kind.resolve(p.attr.urn.as_deref(), &p.attr.attr) else {
        return Err(ScimError::invalid_path(format!(
            "unknown attribute `{}` in path `{text}`",
            p.attr.attr
        )));
    };
    if p.attr.sub.is_some() && (p.filter.is_some() || p.sub.is_some()) {
        return Err(ScimError::invalid_path(format!(
            "`{text}` is not a valid path"
        )));
    }
    let sub_name = p.attr.sub.as_deref().or(p.sub.as_deref());
    let sub = match sub_name {
        None => None,
        Some(s) => Some(top.def.sub(s).ok_or_else(|| {
            ScimError::invalid_path(format!(
                "unknown sub-attribute `{s}` of `{}` in path `{text}`",
                top.def.name
            ))
        })?),
    };
    let label = label_of(top.extension, top.def, sub);
    if top.def.mutability == Mutability::ReadOnly {
        return Err(ScimError::mutability(format!("`{label}` is read-only")));
    }
    if p.filter.is_some() && !top.def.multi_valued {
        return Err(ScimError::invalid_path(format!(
            "`{}` is single-valued; a value filter needs a multi-valued attribute",
            top.def.name
        )));
    }
    if let Some(f) = &p.filter {
        let whole = Filter::ValuePath {
            path: AttrPath {
                urn: top.extension.map(|e| e.id.to_owned()),
                attr: top.def.name.to_owned(),
                sub: None,
            },
            filter: Box::new(f.clone()),
        };
        filter::validate(&whole, kind).map_err(|e| {
            ScimError::invalid_path(format!("invalid value filter in `{text}`: {}", e.detail))
        })?;
    }
    if kind == ResourceKind::Group && top.def.name == "members" {
        if sub.is_some() {
            return Err(ScimError::mutability(format!(
                "`{label}` cannot be modified: add or remove members instead"
            )));
        }
        return Ok(Target::Members(p.filter.clone()));
    }
    if top.def.mutability == Mutability::WriteOnly {
        return Ok(Target::Dropped);
    }
    if let Some(sd) = sub {
        if sd.mutability == Mutability::ReadOnly {
            return Err(ScimError::mutability(format!("`{label}` is read-only")));
        }
        if sd.name == "$ref" || sd.mutability == Mutability::WriteOnly {
            return Ok(Target::Dropped);
        }
    }
    Ok(Target::Attr {
        ext: top.extension,
        def: top.def,
        filter: p.filter.clone(),
        sub,
    })
}

fn display_path(p: &PatchPath) -> String {
    let mut s = p.attr.to_string();
    if let Some(f) = &p.filter {
        s.push_str(&format!("[{f}]"));
    }
    if let Some(sub) = &p.sub {
        s.push('.');
        s.push_str(sub);
    }
    s
}

/// The membership changes of a Group PATCH whose every operation targets `members` (how IdPs
/// add and remove members), found without the stored resource: such operations never read or
/// write its attributes. `None` when any operation targets anything else; the caller then
/// applies the PATCH to the stored resource with [`apply_patch`], which returns the same
/// changes, or the same error, for these operations.
pub fn member_changes_only(
    kind: ResourceKind,
    ops: &[PatchOperation],
) -> Option<ScimResult<Vec<MemberChange>>> {
    if kind != ResourceKind::Group || ops.is_empty() {
        return None;
    }
    let mut filters = Vec::with_capacity(ops.len());
    for op in ops {
        match resolve_target(kind, op.path.as_ref()?) {
            Ok(Target::Members(f)) => filters.push(f),
            _ => return None,
        }
    }
    let (mut root, mut members) = (Map::new(), Vec::new());
    let mut ctx = Ctx {
        kind,
        root: &mut root,
        members: &mut members,
    };
    for (i, (op, f)) in ops.iter().zip(filters).enumerate() {
        if let Err(e) = ctx.apply_members(op.op, f, op.value.as_ref()) {
            return Some(Err(at_op(e, i)));
        }
    }
    Some(Ok(members))
}

/// Applies operations atomically: on any error nothing is returned but the error, and the input
/// is untouched.
pub fn apply_patch(
    kind: ResourceKind,
    attrs: &Value,
    ops: &[PatchOperation],
) -> ScimResult<PatchOutcome> {
    let (start, _) = normalize_inner(kind, attrs, false)?;
    let Value::Object(mut root) = start.clone() else {
        return Err(ScimError::invalid_syntax(
            "stored resource is not an object",
        ));
    };
    let mut members = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        let mut ctx = Ctx {
            kind,
            root: &mut root,
            members: &mut members,
        };
        ctx.apply(op).map_err(|e| at_op(e, i))?;
    }
    let (new, _) = normalize_inner(kind, &Value::Object(root), true)?;
    check_immutable(kind, &start, &new)?;
    let changed = new != *attrs || !members.is_empty();
    Ok(PatchOutcome {
        attrs: new,
        members,
        changed,
    })
}

struct Ctx<'a> {
    kind: ResourceKind,
    root: &'a mut Map<String, Value>,
    members: &'a mut Vec<MemberChange>,
}

impl Ctx<'_> {
    fn apply(&mut self, op: &PatchOperation) -> ScimResult<()> {
        let null = Value::Null;
        let value = op.value.as_ref().unwrap_or(&null);
        match &op.path {
            None => match op.op {
                PatchOpKind::Remove => Err(ScimError::no_target("remove requires a \"path\"")),
                _ => self.apply_pathless(op.op, None, value),
            },
            Some(p) => match resolve_target(self.kind, p)? {
                Target::Dropped => Ok(()),
                Target::Schema(ext) => match op.op {
                    PatchOpKind::Remove => match ext {
                        Some(e) => {
                            self.root.remove(e.id);
                            Ok(())
                        }
                        None => Err(ScimError::mutability("the core schema cannot be removed")),
                    },
                    _ => self.apply_pathless(op.op, Some(ext), value),
                },
                Target::Members(f) => self.apply_members(op.op, f, op.value.as_ref()),
                Target::Attr {
                    ext,
                    def,
                    filter,
                    sub,
                } => self.apply_attr(op.op, ext, def, filter.as_ref(), sub, value),
            },
        }
    }

    /// `add`/`replace` of an object of attributes: the resource (`scope` `None`), or a schema's
    /// attributes (`Some(None)` core, `Some(Some(ext))` an extension).
    fn apply_pathless(
        &mut self,
        op: PatchOpKind,
        scope: Option<Option<&'static SchemaDef>>,
        value: &Value,
    ) -> ScimResult<()> {
        let Value::Object(map) = value else {
            return Err(ScimError::invalid_value(format!(
                "{} without an attribute path needs an object of attributes as its value, got {}",
                op.as_str(),
                short_json(value)
            )));
        };
        let mut entries: Vec<(AttrPath, &Value)> = Vec::new();
        for (k, v) in map {
            match scope {
                Some(s) => {
                    let urn = s.map_or(self.kind.core().id, |e| e.id);
                    push_entry(&mut entries, Some(urn), k, v);
                }
                None => {
                    if k.eq_ignore_ascii_case("schemas") {
                        continue;
                    }
                    let urn = self.kind.extension(k).map(|e| e.id).or_else(|| {
                        self.kind
                            .core()
                            .id
                            .eq_ignore_ascii_case(k)
                            .then_some(self.kind.core().id)
                    });
                    match (urn, v) {
                        (Some(urn), Value::Object(inner)) => {
                            for (ik, iv) in inner {
                                push_entry(&mut entries, Some(urn), ik, iv);
                            }
                        }
                        (Some(_), Value::Null) => {}
                        (Some(_), other) => {
                            return Err(ScimError::invalid_value(format!(
                                "`{k}` must be an object of that schema's attributes, got {}",
                                short_json(other)
                            )));
                        }
                        (None, _) => push_entry(&mut entries, None, k, v),
                    }
                }
            }
        }
        for (attr, v) in entries {
            let p = PatchPath {
                attr,
                filter: None,
                sub: None,
            };
            let target = match resolve_target(self.kind, &p) {
                Ok(t) => t,
                // Unknown and read-only keys in a path-less value are ignored (Okta's `id`).
                Err(e)
                    if matches!(
                        e.scim_type,
                        Some(ScimType::InvalidPath | ScimType::Mutability)
                    ) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            };
            match target {
                Target::Dropped | Target::Schema(_) => {}
                Target::Members(f) => self.apply_members(op, f, Some(v))?,
                Target::Attr {
                    ext,
                    def,
                    filter,
                    sub,
                } => self.apply_attr(op, ext, def, filter.as_ref(), sub, v)?,
            }
        }
        Ok(())
    }

    fn apply_members(
        &mut self,
        op: PatchOpKind,
        filter: Option<Filter>,
        value: Option<&Value>,
    ) -> ScimResult<()> {
        let value = value.unwrap_or(&Value::Null);
        match (op, filter) {
            (PatchOpKind::Add, None) => {
                let list = parse_members(value)?;
                if !list.is_empty() {
                    self.members.push(MemberChange::Add(list));
                }
            }
            (PatchOpKind::Add, Some(_)) => {
                return Err(ScimError::invalid_path(
                    "add to `members` takes no value filter; send the members as the value",
                ));
            }
            (PatchOpKind::Remove, None) => {
                if value.is_null() {
                    self.members.push(MemberChange::Remove(MemberSelector::All));
                } else {
                    // Entra default dialect / JumpCloud: the value lists the members to remove.
                    let list = parse_members(value)?;
                    if !list.is_empty() {
                        self.members
                            .push(MemberChange::Remove(MemberSelector::Values(
                                list.into_iter().map(|m| m.value).collect(),
                            )));
                    }
                }
            }
            (PatchOpKind::Remove, Some(f)) => {
                self.members.push(MemberChange::Remove(member_selector(f)));
            }
            (PatchOpKind::Replace, None) => {
                let list = parse_members(value)?;
                self.members.push(MemberChange::ReplaceAll(list));
            }
            (PatchOpKind::Replace, Some(f)) => {
                let list = parse_members(value)?;
                self.members.push(MemberChange::Remove(member_selector(f)));
                if !list.is_empty() {
                    self.members.push(MemberChange::Add(list));
                }
            }
        }
        Ok(())
    }

    /// Applies one operation to an attribute of the stored JSON. For multi-valued attributes,
    /// an element this operation made `primary: true` turns `primary` off on the others (RFC
    /// 7643 §2.4: at most one primary value).
    fn apply_attr(
        &mut self,
        op: PatchOpKind,
        ext: Option<&'static SchemaDef>,
        def: &'static AttrDef,
        filter: Option<&Filter>,
        sub: Option<&'static AttrDef>,
        value: &Value,
    ) -> ScimResult<()> {
        if !def.multi_valued {
            return self.apply_attr_inner(op, ext, def, filter, sub, value);
        }
        let before = match container_mut(self.root, ext).get(def.name) {
            Some(Value::Array(a)) => a.clone(),
            _ => Vec::new(),
        };
        self.apply_attr_inner(op, ext, def, filter, sub, value)?;
        if let Some(Value::Array(after)) = container_mut(self.root, ext).get_mut(def.name) {
            single_primary(&before, after);
        }
        Ok(())
    }

    fn apply_attr_inner(
        &mut self,
        op: PatchOpKind,
        ext: Option<&'static SchemaDef>,
        def: &'static AttrDef,
        filter: Option<&Filter>,
        sub: Option<&'static AttrDef>,
        value: &Value,
    ) -> ScimResult<()> {
        let kind = self.kind;
        let label = label_of(ext, def, sub);
        let container = container_mut(self.root, ext);
        let name = def.name;
        match (filter, sub) {
            (None, None) => match op {
                PatchOpKind::Add => {
                    let Some(v) = coerce_attr(def, value, &label)? else {
                        return Ok(());
                    };
                    match (container.get_mut(name), v) {
                        (Some(Value::Array(cur)), Value::Array(new)) => {
                            for e in new {
                                if !cur.contains(&e) {
                                    cur.push(e);
                                }
                            }
                        }
                        (Some(Value::Object(cur)), Value::Object(new)) => cur.extend(new),
                        (_, v) => {
                            container.insert(name.to_owned(), v);
                        }
                    }
                }
                PatchOpKind::Replace => match coerce_attr(def, value, &label)? {
                    None => {
                        container.remove(name);
                    }
                    Some(v) => match (container.get_mut(name), v) {
                        (Some(Value::Object(cur)), Value::Object(new)) if !def.multi_valued => {
                            cur.extend(new);
                        }
                        (_, v) => {
                            container.insert(name.to_owned(), v);
                        }
                    },
                },
                PatchOpKind::Remove => {
                    if def.required {
                        return Err(ScimError::mutability(format!(
                            "`{label}` is required and cannot be removed"
                        )));
                    }
                    if def.multi_valued && !value.is_null() {
                        // Entra/JumpCloud style: the value lists the elements to remove; an
                        // element goes when it has every sub-attribute value given.
                        let given = match coerce_attr(def, value, &label)? {
                            Some(Value::Array(g)) => g,
                            _ => return Ok(()),
                        };
                        if let Some(Value::Array(cur)) = container.get_mut(name) {
                            cur.retain(|e| !given.iter().any(|g| is_part_of(g, e)));
                            if cur.is_empty() {
                                container.remove(name);
                            }
                        }
                        return Ok(());
                    }
                    container.remove(name);
                }
            },
            (None, Some(sd)) if !def.multi_valued => {
                let new = match op {
                    PatchOpKind::Remove => None,
                    _ => coerce_attr(sd, value, &label)?,
                };
                if new.is_none() && op == PatchOpKind::Add {
                    return Ok(());
                }
                let slot = container
                    .entry(name.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(o) = slot {
                    match new {
                        Some(v) => {
                            o.insert(sd.name.to_owned(), v);
                        }
                        None => {
                            o.remove(sd.name);
                        }
                    }
                    if o.is_empty() {
                        container.remove(name);
                    }
                }
            }
            (filter, sub) => {
                // Multi-valued: with a value filter, or a sub-attribute applied to every element.
                let mut elems: Vec<Value> = match container.get(name) {
                    Some(Value::Array(a)) => a.clone(),
                    _ => Vec::new(),
                };
                let hits: Vec<bool> = match filter {
                    Some(f) => {
                        let m = ElementMatcher::new(kind, ext, def, f);
                        elems.iter().map(|e| m.matches(e)).collect()
                    }
                    None => vec![true; elems.len()],
                };
                let any = hits.iter().any(|h| *h);
                match (op, sub) {
                    (PatchOpKind::Remove, None) => {
                        let mut it = hits.iter();
                        elems.retain(|_| !*it.next().unwrap_or(&false));
                    }
                    (PatchOpKind::Remove, Some(sd)) => {
                        for (e, hit) in elems.iter_mut().zip(&hits) {
                            if let (true, Value::Object(o)) = (*hit, e) {
                                o.remove(sd.name);
                            }
                        }
                    }
                    (_, None) => {
                        let new = match coerce_attr(def, value, &label)? {
                            Some(Value::Array(mut a)) if a.len() == 1 => a.pop(),
                            Some(Value::Array(_)) => {
                                return Err(ScimError::invalid_value(format!(
                                    "a value filter on `{label}` selects single elements; give one object"
                                )));
                            }
                            other => other,
                        };
                        match (new, op) {
                            (None, PatchOpKind::Add) => {}
                            (None, _) => {
                                let mut it = hits.iter();
                                elems.retain(|_| !*it.next().unwrap_or(&false));
                            }
                            (Some(v), _) if any => {
                                for (e, hit) in elems.iter_mut().zip(&hits) {
                                    if !*hit {
                                        continue;
                                    }
                                    match (op, &mut *e, &v) {
                                        (PatchOpKind::Add, Value::Object(o), Value::Object(n)) => {
                                            o.extend(n.clone());
                                        }
                                        _ => *e = v.clone(),
                                    }
                                }
                            }
                            (Some(v), _) => {
                                let mut seed = upsert_seed(def, filter, &label)?;
                                if let Value::Object(n) = v {
                                    seed.extend(n);
                                }
                                elems.push(Value::Object(seed));
                            }
                        }
                    }
                    (_, Some(sd)) => {
                        let sub_label = label.clone();
                        match coerce_attr(sd, value, &sub_label)? {
                            None if op == PatchOpKind::Add => {}
                            None => {
                                for (e, hit) in elems.iter_mut().zip(&hits) {
                                    if let (true, Value::Object(o)) = (*hit, e) {
                                        o.remove(sd.name);
                                    }
                                }
                            }
                            Some(v) if any => {
                                for (e, hit) in elems.iter_mut().zip(&hits) {
                                    if let (true, Value::Object(o)) = (*hit, e) {
                                        o.insert(sd.name.to_owned(), v.clone());
                                    }
                                }
                            }
                            Some(v) => {
                                let mut seed = upsert_seed(def, filter, &label)?;
                                seed.insert(sd.name.to_owned(), v);
                                elems.push(Value::Object(seed));
                            }
                        }
                    }
                }
                elems.retain(|e| !matches!(e, Value::Object(o) if o.is_empty()));
                if elems.is_empty() {
                    container.remove(name);
                } else {
                    container.insert(name.to_owned(), Value::Array(elems));
                }
            }
        }
        Ok(())
    }
}

/// Whether every sub-attribute of `given` has the same value in `element` (plain equality for
/// non-objects).
fn is_part_of(given: &Value, element: &Value) -> bool {
    match (given, element) {
        (Value::Object(g), Value::Object(e)) => g.iter().all(|(k, v)| e.get(k) == Some(v)),
        _ => given == element,
    }
}

/// When more than one element is `primary: true` and some of them are new or changed by this
/// operation, the previously primary ones get `primary: false`.
fn single_primary(before: &[Value], after: &mut [Value]) {
    let is_primary = |e: &Value| e.get("primary") == Some(&Value::Bool(true));
    let primaries: Vec<usize> = (0..after.len())
        .filter(|&i| is_primary(&after[i]))
        .collect();
    if primaries.len() < 2 {
        return;
    }
    let fresh: Vec<usize> = primaries
        .iter()
        .copied()
        .filter(|&i| !before.contains(&after[i]))
        .collect();
    if fresh.is_empty() {
        return;
    }
    for i in primaries {
        if !fresh.contains(&i)
            && let Value::Object(o) = &mut after[i]
        {
            o.insert("primary".to_owned(), Value::Bool(false));
        }
    }
}

/// Adds `key: value` of a path-less value as a path entry; keys that are not attribute paths are
/// unknown attributes and ignored.
fn push_entry<'v>(
    entries: &mut Vec<(AttrPath, &'v Value)>,
    urn: Option<&str>,
    key: &str,
    value: &'v Value,
) {
    let Ok(mut path) = AttrPath::parse(key) else {
        return;
    };
    if let Some(u) = urn {
        path.urn = Some(u.to_owned());
    }
    entries.push((path, value));
}

/// Evaluates a value filter against single elements of a multi-valued attribute by evaluating
/// `attr[filter]` against the synthetic resource `{"attr": [element]}` (nested under the
/// extension URN for extension attributes).
struct ElementMatcher {
    kind: ResourceKind,
    ext: Option<&'static SchemaDef>,
    name: &'static str,
    filter: Filter,
}

impl ElementMatcher {
    fn new(
        kind: ResourceKind,
        ext: Option<&'static SchemaDef>,
        def: &'static AttrDef,
        inner: &Filter,
    ) -> Self {
        let path = AttrPath {
            urn: ext.map(|e| e.id.to_owned()),
            attr: def.name.to_owned(),
            sub: None,
        };
        ElementMatcher {
            kind,
            ext,
            name: def.name,
            filter: Filter::ValuePath {
                path,
                filter: Box::new(inner.clone()),
            },
        }
    }

    fn matches(&self, element: &Value) -> bool {
        let mut attr = Map::new();
        attr.insert(self.name.to_owned(), Value::Array(vec![element.clone()]));
        let resource = match self.ext {
            None => attr,
            Some(e) => {
                let mut root = Map::new();
                root.insert(e.id.to_owned(), Value::Object(attr));
                root
            }
        };
        filter::matches(&self.filter, self.kind, &Value::Object(resource))
    }
}

/// The element an unmatched `add`/`replace` creates: the filter's `eq` terms (joined by `and`).
fn upsert_seed(
    def: &'static AttrDef,
    filter: Option<&Filter>,
    label: &str,
) -> ScimResult<Map<String, Value>> {
    let mut seed = Map::new();
    if let Some(f) = filter
        && !collect_eq_terms(def, f, &mut seed)?
    {
        return Err(ScimError::no_target(format!(
            "the filter `{f}` on `{label}` matched no value, and only `eq` terms joined by \
             `and` can describe a new one"
        )));
    }
    Ok(seed)
}

fn collect_eq_terms(
    def: &'static AttrDef,
    f: &Filter,
    seed: &mut Map<String, Value>,
) -> ScimResult<bool> {
    match f {
        Filter::And(a, b) => Ok(collect_eq_terms(def, a, seed)? && collect_eq_terms(def, b, seed)?),
        Filter::Compare {
            path,
            op: CompareOp::Eq,
            value,
        } => {
            let name = element_sub_name(def, path);
            let Some(sd) = def.sub(name) else {
                return Ok(false);
            };
            let label = format!("{}.{}", def.name, sd.name);
            match coerce_single(sd, value, &label)? {
                Some(v) => {
                    seed.insert(sd.name.to_owned(), v);
                    Ok(true)
                }
                None => Ok(false),
            }
        }
        _ => Ok(false),
    }
}

/// The sub-attribute a path inside a value filter names (`type`, or `emails.type`).
fn element_sub_name<'p>(def: &AttrDef, path: &'p AttrPath) -> &'p str {
    match &path.sub {
        Some(s) if path.attr.eq_ignore_ascii_case(def.name) => s,
        _ => &path.attr,
    }
}

/// `members[value eq "a" or value eq "b"]` → `Values([a, b])`; anything else → `Filter`.
fn member_selector(f: Filter) -> MemberSelector {
    fn collect(f: &Filter, out: &mut Vec<String>) -> bool {
        match f {
            Filter::Or(a, b) => collect(a, out) && collect(b, out),
            Filter::Compare {
                path,
                op: CompareOp::Eq,
                value: Value::String(s),
            } if path.urn.is_none()
                && match &path.sub {
                    None => path.attr.eq_ignore_ascii_case("value"),
                    Some(sub) => {
                        path.attr.eq_ignore_ascii_case("members")
                            && sub.eq_ignore_ascii_case("value")
                    }
                } =>
            {
                if !out.contains(s) {
                    out.push(s.clone());
                }
                true
            }
            _ => false,
        }
    }
    let mut ids = Vec::new();
    if collect(&f, &mut ids) {
        MemberSelector::Values(ids)
    } else {
        MemberSelector::Filter(f)
    }
}

#[cfg(test)]
mod tests;
