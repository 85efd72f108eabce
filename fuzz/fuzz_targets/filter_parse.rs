//! Arbitrary text → filter parser. A parsed filter must print to text that parses back to the
//! same tree, and schema validation and evaluation against fixed resources must not panic. The
//! same input is also tried as a PATCH path, which must round-trip through its printer too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scim::ResourceKind;
use scim::filter::{matches, parse, parse_patch_path, validate};
use serde_json::{Value, json};
use std::sync::LazyLock;

static USER: LazyLock<Value> = LazyLock::new(|| {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": "bjensen@example.com",
        "externalId": "12345",
        "name": {"givenName": "Barbara", "familyName": "Jensen"},
        "active": "True",
        "emails": [
            {"value": "bjensen@example.com", "type": "work", "primary": true},
            {"value": "babs@jensen.org", "type": "home"}
        ],
        "meta": {"created": "2011-08-01T18:29:49.793Z", "lastModified": "2011-08-01T18:29:49Z"},
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {
            "employeeNumber": "701984",
            "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d"}
        }
    })
});

static GROUP: LazyLock<Value> = LazyLock::new(|| {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
        "displayName": "Tour Guides",
        "externalId": 7,
        "members": [{"value": "2819c223", "display": "Babs", "type": "User"}]
    })
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(f) = parse(text) {
        let printed = f.to_string();
        match parse(&printed) {
            Ok(again) => assert_eq!(again, f, "{text:?} printed as {printed:?}"),
            Err(e) => panic!("{text:?} printed as {printed:?}, which does not parse: {e}"),
        }
        for (kind, res) in [(ResourceKind::User, &*USER), (ResourceKind::Group, &*GROUP)] {
            let _ = validate(&f, kind);
            let _ = matches(&f, kind, res);
        }
    }
    if let Ok(p) = parse_patch_path(text) {
        let printed = p.to_string();
        match parse_patch_path(&printed) {
            Ok(again) => assert_eq!(again, p, "{text:?} printed as {printed:?}"),
            Err(e) => panic!("path {text:?} printed as {printed:?}, which does not parse: {e}"),
        }
    }
});
