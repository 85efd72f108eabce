//! Store records → SCIM JSON: `id`, `meta` (with `location` and `version`), derived `groups`
//! and `members`, then `attributes`/`excludedAttributes`.

use scim::ResourceKind;
use scim::projection::project;
use serde_json::{Map, Value, json};
use store::{Resource, timefmt};

use crate::extract::Projection;

/// The weak ETag of a version.
pub(crate) fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// Parses an `If-Match`/`If-None-Match` value into versions; `*` is `None` (any).
pub(crate) fn parse_etags(header: &str) -> Option<Vec<Option<i64>>> {
    let mut out = vec![];
    for part in header.split(',') {
        let p = part.trim();
        if p == "*" {
            out.push(None);
            continue;
        }
        let p = p.strip_prefix("W/").unwrap_or(p);
        let p = p.trim_matches('"');
        out.push(Some(p.parse().ok()?));
    }
    Some(out)
}

/// The absolute URL of a resource.
pub(crate) fn location(base_url: &str, kind: ResourceKind, id: &str) -> String {
    format!("{base_url}{}/{id}", kind.endpoint())
}

/// The full SCIM representation of a stored resource, projected.
pub(crate) fn render(base_url: &str, r: &Resource, proj: &Projection) -> Value {
    let mut o = Map::new();
    let schemas = r
        .attrs
        .get("schemas")
        .cloned()
        .unwrap_or_else(|| json!([r.kind.core().id]));
    o.insert("schemas".into(), schemas);
    o.insert("id".into(), json!(r.id));
    if let Value::Object(attrs) = &r.attrs {
        for (k, v) in attrs {
            if k != "schemas" {
                o.insert(k.clone(), v.clone());
            }
        }
    }
    // The manager reference is derived from its id, never stored.
    if let Some(mgr) = o
        .get_mut(scim::schema::ENTERPRISE_USER_SCHEMA)
        .and_then(|e| e.get_mut("manager"))
        .and_then(Value::as_object_mut)
        && let Some(id) = mgr.get("value").and_then(Value::as_str).map(str::to_owned)
    {
        mgr.insert(
            "$ref".into(),
            json!(location(base_url, ResourceKind::User, &id)),
        );
    }
    if let Some(members) = &r.members {
        let list: Vec<Value> = members
            .iter()
            .map(|m| {
                let kind = if m.ty == store::MemberType::Group {
                    ResourceKind::Group
                } else {
                    ResourceKind::User
                };
                let mut e = json!({
                    "value": m.value,
                    "type": m.ty.as_str(),
                    "$ref": location(base_url, kind, &m.value),
                });
                if let Some(d) = &m.display {
                    e["display"] = json!(d);
                }
                e
            })
            .collect();
        o.insert("members".into(), Value::Array(list));
    }
    if let Some(groups) = &r.groups
        && !groups.is_empty()
    {
        let list: Vec<Value> = groups
            .iter()
            .map(|g| {
                json!({
                    "value": g.value,
                    "display": g.display,
                    "type": "direct",
                    "$ref": location(base_url, ResourceKind::Group, &g.value),
                })
            })
            .collect();
        o.insert("groups".into(), Value::Array(list));
    }
    o.insert(
        "meta".into(),
        json!({
            "resourceType": r.kind.name(),
            "created": timefmt::format(r.created),
            "lastModified": timefmt::format(r.last_modified),
            "location": location(base_url, r.kind, &r.id),
            "version": etag(r.version),
        }),
    );
    let full = Value::Object(o);
    if proj.attributes.is_empty() && proj.excluded.is_empty() {
        full
    } else {
        project(r.kind, &full, &proj.attributes, &proj.excluded)
    }
}
