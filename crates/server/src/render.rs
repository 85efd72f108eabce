//! Store records → SCIM JSON: `id`, `meta` (with `location` and `version`), derived `groups`
//! and `members`, then `attributes`/`excludedAttributes`.

use scim::ResourceKind;
use scim::projection::project;
use serde::ser::{Serialize, SerializeMap, Serializer};
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

fn members_value(base_url: &str, members: &[store::MemberRef]) -> Value {
    Value::Array(
        members
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
            .collect(),
    )
}

fn groups_value(base_url: &str, groups: &[store::GroupRef]) -> Value {
    Value::Array(
        groups
            .iter()
            .map(|g| {
                json!({
                    "value": g.value,
                    "display": g.display,
                    "type": "direct",
                    "$ref": location(base_url, ResourceKind::Group, &g.value),
                })
            })
            .collect(),
    )
}

fn meta_value(base_url: &str, r: &Resource) -> Value {
    json!({
        "resourceType": r.kind.name(),
        "created": timefmt::format(r.created),
        "lastModified": timefmt::format(r.last_modified),
        "location": location(base_url, r.kind, &r.id),
        "version": etag(r.version),
    })
}

/// The enterprise extension with its manager's `$ref` (derived from the manager's id, never
/// stored), or `None` when it names no manager.
fn with_manager_ref(base_url: &str, ext: &Value) -> Option<Value> {
    let id = ext.get("manager")?.get("value")?.as_str()?;
    let mut ext = ext.clone();
    ext["manager"]["$ref"] = json!(location(base_url, ResourceKind::User, id));
    Some(ext)
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
            if k == "schemas" {
                continue;
            }
            let v = match k.as_str() {
                scim::schema::ENTERPRISE_USER_SCHEMA => {
                    with_manager_ref(base_url, v).unwrap_or_else(|| v.clone())
                }
                _ => v.clone(),
            };
            o.insert(k.clone(), v);
        }
    }
    if let Some(members) = &r.members {
        o.insert("members".into(), members_value(base_url, members));
    }
    if let Some(groups) = &r.groups
        && !groups.is_empty()
    {
        o.insert("groups".into(), groups_value(base_url, groups));
    }
    o.insert("meta".into(), meta_value(base_url, r));
    let full = Value::Object(o);
    if proj.attributes.is_empty() && proj.excluded.is_empty() {
        full
    } else {
        project(r.kind, &full, &proj.attributes, &proj.excluded)
    }
}

/// [`render`] without a projection, serialized straight from the stored resource (no JSON tree
/// is built or cloned): what list responses use when no `attributes`/`excludedAttributes` is
/// asked for — every IdP's `userName eq` lookup. The same members as [`render`]'s value.
pub(crate) struct FullView<'a> {
    /// The absolute SCIM base URL.
    pub(crate) base_url: &'a str,
    /// The resource.
    pub(crate) r: &'a Resource,
}

impl Serialize for FullView<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let (base_url, r) = (self.base_url, self.r);
        let mut m = s.serialize_map(None)?;
        match r.attrs.get("schemas") {
            Some(v) => m.serialize_entry("schemas", v)?,
            None => m.serialize_entry("schemas", &[r.kind.core().id])?,
        }
        m.serialize_entry("id", &r.id)?;
        if let Value::Object(attrs) = &r.attrs {
            for (k, v) in attrs {
                match k.as_str() {
                    "schemas" => {}
                    scim::schema::ENTERPRISE_USER_SCHEMA => match with_manager_ref(base_url, v) {
                        Some(ext) => m.serialize_entry(k, &ext)?,
                        None => m.serialize_entry(k, v)?,
                    },
                    _ => m.serialize_entry(k, v)?,
                }
            }
        }
        if let Some(members) = &r.members {
            m.serialize_entry("members", &members_value(base_url, members))?;
        }
        if let Some(groups) = &r.groups
            && !groups.is_empty()
        {
            m.serialize_entry("groups", &groups_value(base_url, groups))?;
        }
        m.serialize_entry(
            "meta",
            &Meta {
                resource_type: r.kind.name(),
                created: timefmt::format(r.created),
                last_modified: timefmt::format(r.last_modified),
                location: location(base_url, r.kind, &r.id),
                version: etag(r.version),
            },
        )?;
        m.end()
    }
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct Meta {
    resource_type: &'static str,
    created: String,
    last_modified: String,
    location: String,
    version: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn resource(kind: ResourceKind, attrs: Value) -> Resource {
        Resource {
            kind,
            id: "r1".into(),
            attrs,
            created: datetime!(2026-01-01 00:00 UTC),
            last_modified: datetime!(2026-01-02 00:00 UTC),
            version: 3,
            members: None,
            groups: None,
        }
    }

    /// The list fast path and `render` are the same document (key order aside).
    #[test]
    fn full_view_equals_render_without_projection() {
        let base = "https://scim.example.com/scim/v2";
        let mut user = resource(
            ResourceKind::User,
            json!({
                "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User", scim::schema::ENTERPRISE_USER_SCHEMA],
                "userName": "ann",
                "emails": [{"value": "ann@example.com", "primary": true}],
                scim::schema::ENTERPRISE_USER_SCHEMA: {"department": "R&D", "manager": {"value": "m1"}},
            }),
        );
        user.groups = Some(vec![store::GroupRef {
            value: "g1".into(),
            display: "Ops".into(),
        }]);
        let mut group = resource(ResourceKind::Group, json!({"displayName": "Ops"}));
        group.members = Some(vec![
            store::MemberRef {
                value: "u1".into(),
                ty: store::MemberType::User,
                display: Some("ann".into()),
            },
            store::MemberRef {
                value: "g2".into(),
                ty: store::MemberType::Group,
                display: None,
            },
        ]);
        let no_manager = resource(ResourceKind::User, json!({"userName": "bob"}));
        for r in [&user, &group, &no_manager] {
            let streamed: Value = serde_json::from_slice(
                &serde_json::to_vec(&FullView { base_url: base, r }).expect("serialize"),
            )
            .expect("json");
            assert_eq!(
                streamed,
                render(base, r, &Projection::default()),
                "{}",
                r.id
            );
        }
        let v = render(base, &user, &Projection::default());
        assert_eq!(
            v[scim::schema::ENTERPRISE_USER_SCHEMA]["manager"]["$ref"],
            json!(format!("{base}/Users/m1"))
        );
        assert_eq!(v["meta"]["version"], json!("W/\"3\""));
        assert_eq!(
            v["schemas"][0],
            json!("urn:ietf:params:scim:schemas:core:2.0:User")
        );
        assert_eq!(
            render(base, &no_manager, &Projection::default())["schemas"],
            json!(["urn:ietf:params:scim:schemas:core:2.0:User"])
        );
    }
}
