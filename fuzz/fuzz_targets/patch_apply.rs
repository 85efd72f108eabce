//! PATCH bodies → `parse_patch` + `apply_patch` on a fixed User and Group.
//!
//! Input is either JSON (a whole `PatchOp` body, or an `Operations` array) or, to reach deeper
//! faster, lines `op`, `path`, `value` (value as JSON, else as a string). On error the stored
//! input is byte-identical; on success the result is a fixed point of `normalize`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scim::{ResourceKind, apply_patch, normalize, parse_patch};
use serde_json::{Value, json};
use std::sync::LazyLock;

const PATCH_OP: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

static USER: LazyLock<Value> = LazyLock::new(|| {
    json!({
        "schemas": [
            "urn:ietf:params:scim:schemas:core:2.0:User",
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"
        ],
        "userName": "bjensen@example.com",
        "externalId": "bjensen",
        "name": {"givenName": "Barbara", "familyName": "Jensen"},
        "active": true,
        "emails": [
            {"value": "bjensen@example.com", "type": "work", "primary": true},
            {"value": "babs@jensen.org", "type": "home"}
        ],
        "addresses": [{"type": "work", "streetAddress": "100 Universal City Plaza"}],
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
            "employeeNumber": "701984",
            "manager": {"value": "26118915"}
        }
    })
});

static GROUP: LazyLock<Value> = LazyLock::new(|| {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": "Tour Guides",
        "externalId": "tg-1"
    })
});

fn body(data: &[u8]) -> Option<Value> {
    match data.first() {
        Some(b'{') => serde_json::from_slice(data).ok(),
        Some(b'[') => {
            let ops: Value = serde_json::from_slice(data).ok()?;
            Some(json!({"schemas": [PATCH_OP], "Operations": ops}))
        }
        _ => {
            let text = std::str::from_utf8(data).ok()?;
            let mut parts = text.splitn(3, '\n');
            let op = parts.next().unwrap_or_default();
            let mut o = serde_json::Map::new();
            o.insert("op".into(), Value::String(op.into()));
            if let Some(path) = parts.next().filter(|p| !p.is_empty()) {
                o.insert("path".into(), Value::String(path.into()));
            }
            if let Some(v) = parts.next() {
                let v = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.into()));
                o.insert("value".into(), v);
            }
            Some(json!({"schemas": [PATCH_OP], "Operations": [o]}))
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some(body) = body(data) else {
        return;
    };
    for (kind, before) in [(ResourceKind::User, &*USER), (ResourceKind::Group, &*GROUP)] {
        let Ok(ops) = parse_patch(kind, &body) else {
            continue;
        };
        let before_text = serde_json::to_string(before).unwrap();
        let result = apply_patch(kind, before, &ops);
        assert_eq!(
            serde_json::to_string(before).unwrap(),
            before_text,
            "input modified"
        );
        if let Ok(out) = result {
            let again = normalize(kind, &out.attrs)
                .unwrap_or_else(|e| panic!("{body}: result {} does not normalise: {e}", out.attrs));
            assert_eq!(again.attrs, out.attrs, "{body}: result is not normalised");
            assert_eq!(out.changed, out.attrs != *before || !out.members.is_empty());
        }
    }
});
