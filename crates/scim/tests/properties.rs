//! Property tests: the filter printer and parser round-trip over generated ASTs, and PATCH is
//! atomic (an operation list with one failing operation changes nothing).

use proptest::prelude::*;
use scim::filter::{CompareOp, Filter, parse};
use scim::schema::{ENTERPRISE_USER_SCHEMA, PATCH_OP_SCHEMA, USER_SCHEMA};
use scim::{AttrPath, ResourceKind, apply_patch, parse_patch};
use serde_json::{Number, Value, json};

/// `ATTRNAME`, minus the words the parser reads as keywords in attribute position.
fn attr_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z][a-zA-Z0-9_-]{0,10}",
        Just("$ref".to_owned()),
        Just("userName".to_owned()),
        Just("emails".to_owned()),
    ]
    .prop_filter("keyword", |s| {
        !["and", "or", "not"]
            .iter()
            .any(|k| s.eq_ignore_ascii_case(k))
    })
}

fn attr_path() -> impl Strategy<Value = AttrPath> {
    let urn = prop_oneof![
        4 => Just(None),
        1 => Just(Some(USER_SCHEMA.to_owned())),
        1 => Just(Some(ENTERPRISE_USER_SCHEMA.to_owned())),
        1 => Just(Some("urn:example:x-1".to_owned())),
    ];
    (urn, attr_name(), proptest::option::of(attr_name()))
        .prop_map(|(urn, attr, sub)| AttrPath { urn, attr, sub })
        // `$ref` is a sub-attribute in practice; as a top-level name it is still valid syntax.
        .prop_filter("urn needs a name", |p| p.urn.is_none() || p.attr != "$ref")
}

fn literal() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<String>().prop_map(Value::String),
        "[ -~]{0,12}".prop_map(Value::String),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter_map("finite", Number::from_f64)
            .prop_map(Value::Number),
        any::<bool>().prop_map(Value::Bool),
        Just(Value::Null),
    ]
}

fn compare_op() -> impl Strategy<Value = CompareOp> {
    prop_oneof![
        Just(CompareOp::Eq),
        Just(CompareOp::Ne),
        Just(CompareOp::Co),
        Just(CompareOp::Sw),
        Just(CompareOp::Ew),
        Just(CompareOp::Gt),
        Just(CompareOp::Ge),
        Just(CompareOp::Lt),
        Just(CompareOp::Le),
    ]
}

/// Filters without value paths (what may appear inside `attr[...]`).
fn flat_filter() -> impl Strategy<Value = Filter> {
    let leaf = prop_oneof![
        (attr_path(), compare_op(), literal()).prop_map(|(path, op, value)| Filter::Compare {
            path,
            op,
            value
        }),
        attr_path().prop_map(Filter::Present),
    ];
    leaf.prop_recursive(4, 16, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Filter::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Filter::Or(Box::new(a), Box::new(b))),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
}

fn filter() -> impl Strategy<Value = Filter> {
    let value_path = (attr_path(), flat_filter()).prop_map(|(mut path, f)| {
        path.sub = None;
        Filter::ValuePath {
            path,
            filter: Box::new(f),
        }
    });
    let leaf = prop_oneof![3 => flat_filter(), 1 => value_path];
    leaf.prop_recursive(3, 12, 2, |inner| {
        prop_oneof![
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Filter::And(Box::new(a), Box::new(b))),
            (inner.clone(), inner.clone()).prop_map(|(a, b)| Filter::Or(Box::new(a), Box::new(b))),
            inner.prop_map(|f| Filter::Not(Box::new(f))),
        ]
    })
}

fn user() -> Value {
    json!({
        "schemas": [USER_SCHEMA, ENTERPRISE_USER_SCHEMA],
        "userName": "bjensen@example.com",
        "externalId": "bjensen",
        "name": {"givenName": "Barbara", "familyName": "Jensen"},
        "active": true,
        "emails": [
            {"value": "bjensen@example.com", "type": "work", "primary": true},
            {"value": "babs@jensen.org", "type": "home"}
        ],
        "addresses": [
            {"type": "work", "streetAddress": "100 Universal City Plaza"},
            {"type": "home", "streetAddress": "456 Hollywood Blvd"}
        ],
        ENTERPRISE_USER_SCHEMA: {"employeeNumber": "701984"}
    })
}

/// Operations that apply cleanly to [`user`], alone or in any order.
fn valid_ops() -> Vec<Value> {
    vec![
        json!({"op": "replace", "path": "displayName", "value": "Babs"}),
        json!({"op": "add", "path": "title", "value": "Tour Guide"}),
        json!({"op": "replace", "path": "emails[type eq \"work\"].value", "value": "b@example.com"}),
        json!({"op": "remove", "path": "name.givenName"}),
        json!({"op": "add", "path": "phoneNumbers", "value": [{"value": "555-1234", "type": "work"}]}),
        json!({"op": "Replace", "path": "active", "value": "False"}),
        json!({"op": "remove", "path": "addresses[type eq \"home\"]"}),
        json!({"op": "add", "path": format!("{ENTERPRISE_USER_SCHEMA}:department"), "value": "Tours"}),
        json!({"op": "replace", "value": {"nickName": "Babs", "name.familyName": "J"}}),
    ]
}

/// Operations that parse but fail when applied to [`user`] (after any of [`valid_ops`]).
fn failing_ops() -> Vec<Value> {
    vec![
        json!({"op": "replace", "path": "userName", "value": ""}),
        json!({"op": "replace", "path": "userName", "value": null}),
        json!({"op": "replace", "path": "active", "value": "maybe"}),
        json!({"op": "replace", "path": "name.givenName", "value": 5}),
        json!({"op": "add", "path": "emails[type eq \"x\" or type eq \"y\"].value", "value": "a@b"}),
        json!({"op": "replace", "path": "title", "value": {"nested": true}}),
    ]
}

fn patch_body(ops: Vec<Value>) -> Value {
    json!({"schemas": [PATCH_OP_SCHEMA], "Operations": ops})
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `parse(f.to_string()) == f` for generated filters (printer output is canonical).
    #[test]
    fn filter_print_parse_round_trip(f in filter()) {
        let printed = f.to_string();
        let parsed = parse(&printed);
        prop_assert_eq!(parsed.as_ref().ok(), Some(&f), "printed {:?}: {:?}", printed, parsed);
        // And the printed form is a fixed point.
        prop_assert_eq!(parsed.unwrap().to_string(), printed);
    }

    /// A list of valid operations with one failing operation anywhere in it: the whole PATCH
    /// errors, nothing is returned, and the stored input is byte-identical.
    #[test]
    fn patch_is_atomic(
        picks in proptest::collection::vec(0..valid_ops().len(), 0..6),
        bad in 0..failing_ops().len(),
        at in any::<proptest::sample::Index>(),
    ) {
        let valid = valid_ops();
        let mut ops: Vec<Value> = picks.iter().map(|&i| valid[i].clone()).collect();
        // The valid prefix/suffix alone applies cleanly, so the failure is the bad operation's.
        let good = parse_patch(ResourceKind::User, &patch_body(ops.clone()));
        if !ops.is_empty() {
            let good = good.expect("valid operations parse");
            prop_assert!(apply_patch(ResourceKind::User, &user(), &good).is_ok());
        }
        let pos = at.index(ops.len() + 1);
        ops.insert(pos, failing_ops()[bad].clone());
        let before = user();
        let before_text = serde_json::to_string(&before).unwrap();
        let parsed = parse_patch(ResourceKind::User, &patch_body(ops)).expect("all operations parse");
        let result = apply_patch(ResourceKind::User, &before, &parsed);
        prop_assert_eq!(serde_json::to_string(&before).unwrap(), before_text);
        match result {
            Ok(out) => prop_assert!(false, "expected an error, got {}", out.attrs),
            Err(e) => {
                prop_assert_eq!(e.status, 400);
                // Either the bad operation failed, or the result failed the final required-attribute
                // check (`userName` unassigned); never one of the valid operations.
                prop_assert!(
                    e.detail.starts_with(&format!("Operations[{pos}]"))
                        || !e.detail.starts_with("Operations["),
                    "{}",
                    e.detail
                );
            }
        }
    }
}
