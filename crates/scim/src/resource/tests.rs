//! POST/PUT normalisation tests: the IdP create/replace fixtures of `scim-interop.md` §2.6
//! (F2, F8, F16, F17, F25), the coercion and tolerance rules, and the immutability check.

use serde_json::{Value, json};

use super::*;
use crate::error::ScimType;
use crate::schema::{ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, Returned, USER_SCHEMA, Uniqueness};

const ENT: &str = ENTERPRISE_USER_SCHEMA;

fn attrs(kind: ResourceKind, body: Value) -> Value {
    let n = normalize(kind, &body).unwrap_or_else(|e| panic!("{body}: {e}"));
    if kind == ResourceKind::User {
        assert_eq!(n.members, None);
    }
    n.attrs
}

fn err(kind: ResourceKind, body: Value) -> ScimError {
    match normalize(kind, &body) {
        Ok(n) => panic!("{body}: expected an error, got {}", n.attrs),
        Err(e) => {
            assert_eq!(e.status, 400);
            e
        }
    }
}

/// F2: Entra's user create.
#[test]
fn f2_entra_post_user() {
    let body = json!({
        "schemas": [USER_SCHEMA, ENT],
        "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
        "userName": "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1",
        "active": true,
        "emails": [{"primary": true, "type": "work", "value": "Test_User_fd0ea19b@testuser.com"}],
        "meta": {"resourceType": "User"},
        "name": {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"},
        "roles": []
    });
    assert_eq!(
        attrs(ResourceKind::User, body),
        json!({
            "schemas": [USER_SCHEMA],
            "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
            "userName": "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1",
            "active": true,
            "emails": [{"primary": true, "type": "work", "value": "Test_User_fd0ea19b@testuser.com"}],
            "name": {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"}
        })
    );
}

/// Entra's enterprise user create with string booleans and the manager as a plain id.
#[test]
fn entra_post_enterprise_user() {
    let body = json!({
        "schemas": [USER_SCHEMA, ENT],
        "userName": "bjensen",
        "active": "True",
        ENT: {"employeeNumber": "701984", "department": "Tour Operations", "manager": "26118915-6090-4610-87e4-49d8ca9f808d"}
    });
    assert_eq!(
        attrs(ResourceKind::User, body),
        json!({
            "schemas": [USER_SCHEMA, ENT],
            "userName": "bjensen",
            "active": true,
            ENT: {"employeeNumber": "701984", "department": "Tour Operations",
                  "manager": {"value": "26118915-6090-4610-87e4-49d8ca9f808d"}}
        })
    );
}

/// F8: Entra's group create with Microsoft's extra schema URN and no members.
#[test]
fn f8_entra_post_group() {
    let n = normalize(
        ResourceKind::Group,
        &json!({
            "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
            "displayName": "Group1DisplayName",
            "schemas": [GROUP_SCHEMA, "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group"],
            "meta": {"resourceType": "Group"},
            "members": []
        }),
    )
    .unwrap();
    assert_eq!(
        n.attrs,
        json!({
            "schemas": [GROUP_SCHEMA],
            "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
            "displayName": "Group1DisplayName"
        })
    );
    assert_eq!(n.members, Some(vec![]));
}

/// F16: Okta's user create carries a password, `groups: []` and `locale`.
#[test]
fn f16_okta_post_user() {
    let body = json!({
        "schemas": [USER_SCHEMA],
        "userName": "john.doe@example.com",
        "name": {"givenName": "John", "familyName": "Doe"},
        "emails": [{"primary": true, "value": "john.doe@example.com", "type": "work"}],
        "displayName": "John Doe",
        "locale": "en-US",
        "externalId": "00ujl29u0le5T6Aj10h7",
        "groups": [],
        "password": "1mz050nq",
        "active": true
    });
    assert_eq!(
        attrs(ResourceKind::User, body),
        json!({
            "schemas": [USER_SCHEMA],
            "userName": "john.doe@example.com",
            "name": {"givenName": "John", "familyName": "Doe"},
            "emails": [{"primary": true, "value": "john.doe@example.com", "type": "work"}],
            "displayName": "John Doe",
            "locale": "en-US",
            "externalId": "00ujl29u0le5T6Aj10h7",
            "active": true
        })
    );
}

/// F17: Okta's PUT re-sends the whole object including `id`, `meta` and `groups`.
#[test]
fn f17_okta_put_user() {
    let body = json!({
        "schemas": [USER_SCHEMA],
        "id": "23a35c27-23d3-4c03-b4c5-6443c09e7173",
        "userName": "john.doe@example.com",
        "name": {"givenName": "John", "familyName": "Doe"},
        "emails": [{"primary": true, "value": "john.doe@example.com", "type": "work"}],
        "active": false,
        "groups": [{"value": "g1", "display": "Engineering"}],
        "meta": {"resourceType": "User"}
    });
    let new = attrs(ResourceKind::User, body);
    assert_eq!(
        new,
        json!({
            "schemas": [USER_SCHEMA],
            "userName": "john.doe@example.com",
            "name": {"givenName": "John", "familyName": "Doe"},
            "emails": [{"primary": true, "value": "john.doe@example.com", "type": "work"}],
            "active": false
        })
    );
    assert!(!active(&new));
    let old = json!({"schemas": [USER_SCHEMA], "userName": "john@example.com", "active": true});
    assert_eq!(check_immutable(ResourceKind::User, &old, &new), Ok(()));
}

/// F25: OneLogin template with the SCIM 1.x URN and an unmapped placeholder as `""`.
#[test]
fn f25_onelogin_legacy_schema_and_empty_strings() {
    let body = json!({
        "schemas": ["urn:scim:schemas:core:1.0"],
        "userName": "kim@example.com",
        "title": "",
        "name": {"givenName": "Kim", "familyName": ""},
        "emails": [{"value": "", "type": "work"}],
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": ""}
    });
    assert_eq!(
        attrs(ResourceKind::User, body),
        json!({
            "schemas": [USER_SCHEMA],
            "userName": "kim@example.com",
            "name": {"givenName": "Kim"},
            "emails": [{"type": "work"}]
        })
    );
}

#[test]
fn names_and_urns_match_case_insensitively_and_fold_in() {
    let body = json!({
        "SCHEMAS": [USER_SCHEMA],
        "USERNAME": "bjensen",
        "Name": {"GivenName": "Barbara", "FAMILYNAME": "Jensen", "nickname": "dropped"},
        "name.middleName": "Jane",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department": "Sales",
        "urn:ietf:params:scim:schemas:extension:enterprise:2.0:user": {"CostCenter": "4130"},
        "urn:ietf:params:scim:schemas:core:2.0:User:title": "Guide",
        "urn:ietf:params:scim:schemas:core:2.0:User": {"locale": "en-US"},
        "urn:example:custom:1.0:User": {"badge": 7},
        "shoeSize": 9,
        "bad key!": 1,
        "Emails": {"Value": "b@example.com", "TYPE": "work", "unknownSub": "x"}
    });
    assert_eq!(
        attrs(ResourceKind::User, body),
        json!({
            "schemas": [USER_SCHEMA, ENT],
            "userName": "bjensen",
            "name": {"givenName": "Barbara", "familyName": "Jensen", "middleName": "Jane"},
            "title": "Guide",
            "locale": "en-US",
            ENT: {"department": "Sales", "costCenter": "4130"},
            "emails": [{"value": "b@example.com", "type": "work"}]
        })
    );
}

#[test]
fn coercions_and_tolerances() {
    let body = json!({
        "userName": "bjensen",
        "active": "FALSE",
        "nickName": null,
        "displayName": [],
        "phoneNumbers": [
            {"value": "555-0100", "type": "work", "primary": "true"},
            {"value": "555-0100", "type": "work", "primary": true},
            null,
            {}
        ],
        "ims": [],
        "photos": [{"value": "https://photos.example.com/profilephoto/72930000000Ccne/F", "type": "photo"}],
        "x509Certificates": [{"value": "MIIDQzCCAqygAwIBAgICEAAwDQYJKoZIhvcNAQEFBQAw"}],
        ENT: {"manager": [{"$ref": "../Users/m1", "value": "m1", "displayName": "Boss"}]}
    });
    assert_eq!(
        attrs(ResourceKind::User, body),
        json!({
            "schemas": [USER_SCHEMA, ENT],
            "userName": "bjensen",
            "active": false,
            "phoneNumbers": [{"value": "555-0100", "type": "work", "primary": true}],
            "photos": [{"value": "https://photos.example.com/profilephoto/72930000000Ccne/F", "type": "photo"}],
            "x509Certificates": [{"value": "MIIDQzCCAqygAwIBAgICEAAwDQYJKoZIhvcNAQEFBQAw"}],
            ENT: {"manager": {"value": "m1"}}
        })
    );
}

#[test]
fn value_errors_name_the_attribute() {
    let cases: Vec<(Value, ScimType, &str)> = vec![
        (json!("x"), ScimType::InvalidSyntax, "object"),
        (
            json!([{"userName": "a"}]),
            ScimType::InvalidSyntax,
            "object",
        ),
        (
            json!({"displayName": "x"}),
            ScimType::InvalidValue,
            "userName is required",
        ),
        (
            json!({"userName": ""}),
            ScimType::InvalidValue,
            "userName is required",
        ),
        (json!({"userName": 42}), ScimType::InvalidValue, "userName"),
        (
            json!({"userName": "a", "active": "yes"}),
            ScimType::InvalidValue,
            "active",
        ),
        (
            json!({"userName": "a", "active": 1}),
            ScimType::InvalidValue,
            "active",
        ),
        (
            json!({"userName": "a", "emails": [3]}),
            ScimType::InvalidValue,
            "emails",
        ),
        (
            json!({"userName": "a", "emails": [{"primary": "no"}]}),
            ScimType::InvalidValue,
            "emails.primary",
        ),
        (
            json!({"userName": "a", "name": "Barbara"}),
            ScimType::InvalidValue,
            "name",
        ),
        (
            json!({"userName": "a", "title": ["a", "b"]}),
            ScimType::InvalidValue,
            "title",
        ),
        (
            json!({"userName": "a", ENT: {"employeeNumber": 701984}}),
            ScimType::InvalidValue,
            "employeeNumber",
        ),
        (
            json!({"userName": "a", ENT: "Sales"}),
            ScimType::InvalidValue,
            ENT,
        ),
        (
            json!({"userName": "a", "x509Certificates": [{"value": "%%%"}]}),
            ScimType::InvalidValue,
            "x509Certificates.value",
        ),
    ];
    for (body, t, needle) in cases {
        let e = err(ResourceKind::User, body.clone());
        assert_eq!(e.scim_type, Some(t), "{body}: {e}");
        assert!(e.detail.contains(needle), "{body}: {}", e.detail);
    }
    let e = err(
        ResourceKind::Group,
        json!({"externalId": "x", "members": []}),
    );
    assert_eq!(e.scim_type, Some(ScimType::InvalidValue));
    assert!(e.detail.contains("displayName is required"), "{}", e.detail);
}

#[test]
fn group_members_are_parsed_out_of_the_body() {
    let n = normalize(
        ResourceKind::Group,
        &json!({
            "displayName": "Admins",
            "members": [
                {"value": "u1", "type": "user", "display": "Alice", "$ref": "https://x/Users/u1"},
                {"Value": "g2", "Type": "GROUP"},
                {"value": "u1", "display": "dupe"},
                "u3",
                null
            ]
        }),
    )
    .unwrap();
    assert_eq!(
        n.attrs,
        json!({"schemas": [GROUP_SCHEMA], "displayName": "Admins"})
    );
    assert_eq!(
        n.members,
        Some(vec![
            Member {
                value: "u1".into(),
                ty: Some("User".into()),
                display: Some("Alice".into())
            },
            Member {
                value: "g2".into(),
                ty: Some("Group".into()),
                display: None
            },
            Member {
                value: "u3".into(),
                ty: None,
                display: None
            },
        ])
    );
    let absent = normalize(ResourceKind::Group, &json!({"displayName": "A"})).unwrap();
    assert_eq!(absent.members, None);
    let null = normalize(
        ResourceKind::Group,
        &json!({"displayName": "A", "members": null}),
    )
    .unwrap();
    assert_eq!(null.members, None);
    for bad in [
        json!({"displayName": "A", "members": [{"display": "x"}]}),
        json!({"displayName": "A", "members": [{"value": 1}]}),
        json!({"displayName": "A", "members": [{"value": "u", "type": "Robot"}]}),
        json!({"displayName": "A", "members": [7]}),
    ] {
        let e = err(ResourceKind::Group, bad.clone());
        assert_eq!(e.scim_type, Some(ScimType::InvalidValue), "{bad}");
        assert!(e.detail.contains("members[0]"), "{}", e.detail);
    }
}

#[test]
fn users_ignore_members_and_groups_ignore_user_attributes() {
    assert_eq!(
        attrs(
            ResourceKind::User,
            json!({"userName": "a", "members": [{"value": "x"}]})
        ),
        json!({"schemas": [USER_SCHEMA], "userName": "a"})
    );
    let n = normalize(
        ResourceKind::Group,
        &json!({"displayName": "G", "userName": "a", ENT: {"department": "x"}}),
    )
    .unwrap();
    assert_eq!(
        n.attrs,
        json!({"schemas": [GROUP_SCHEMA], "displayName": "G"})
    );
}

#[test]
fn normalize_is_idempotent() {
    let body = json!({
        "schemas": [USER_SCHEMA, ENT],
        "userName": "bjensen",
        "active": "true",
        "emails": {"value": "b@example.com"},
        ENT: {"manager": "m1", "department": "Sales"}
    });
    let once = attrs(ResourceKind::User, body);
    let twice = attrs(ResourceKind::User, once.clone());
    assert_eq!(once, twice);
}

#[test]
fn accessors() {
    let a =
        json!({"userName": "bjensen", "displayName": "Babs", "externalId": "e1", "active": false});
    assert_eq!(user_name(&a), Some("bjensen"));
    assert_eq!(display_name(&a), Some("Babs"));
    assert_eq!(external_id(&a), Some("e1"));
    assert!(!active(&a));
    let empty = json!({});
    assert_eq!(user_name(&empty), None);
    assert_eq!(display_name(&empty), None);
    assert_eq!(external_id(&empty), None);
    assert!(active(&empty));
}

/// Synthetic schema with immutable attributes: our User/Group schemas have none that are
/// stored, so the generic check is exercised here.
static SYNTHETIC: &[AttrDef] = &[
    immutable_def("badge", AttrType::String, &[]),
    immutable_def("hired", AttrType::Boolean, &[]),
    rw_def(
        "origin",
        AttrType::Complex,
        &[
            immutable_def("tenant", AttrType::String, &[]),
            rw_def("note", AttrType::String, &[]),
        ],
    ),
    rw_def("nickName", AttrType::String, &[]),
];

const fn rw_def(name: &'static str, ty: AttrType, subs: &'static [AttrDef]) -> AttrDef {
    AttrDef {
        name,
        ty,
        multi_valued: false,
        required: false,
        case_exact: false,
        mutability: Mutability::ReadWrite,
        returned: Returned::Default,
        uniqueness: Uniqueness::None,
        description: "synthetic",
        canonical_values: &[],
        reference_types: &[],
        sub_attributes: subs,
    }
}

const fn immutable_def(name: &'static str, ty: AttrType, subs: &'static [AttrDef]) -> AttrDef {
    let mut d = rw_def(name, ty, subs);
    d.mutability = Mutability::Immutable;
    d
}

#[test]
fn immutable_attributes_cannot_change() {
    let old = json!({"badge": "B-1", "origin": {"tenant": "t1", "note": "n"}, "nickName": "a"});
    let run = |new: Value| {
        check_immutable_defs(SYNTHETIC, old.as_object(), new.as_object(), "")
            .map_err(|e| (e.scim_type, e.detail))
    };
    // Same values, read-write changes, and first-time sets are fine.
    assert_eq!(
        run(
            json!({"badge": "B-1", "hired": true, "origin": {"tenant": "t1", "note": "other"}, "nickName": "b"})
        ),
        Ok(())
    );
    for (new, needle) in [
        (
            json!({"badge": "B-2", "origin": {"tenant": "t1"}}),
            "`badge`",
        ),
        (json!({"origin": {"tenant": "t1"}}), "`badge`"),
        (
            json!({"badge": "B-1", "origin": {"tenant": "t2"}}),
            "`origin.tenant`",
        ),
        (json!({"badge": "B-1"}), "`origin.tenant`"),
    ] {
        let (t, detail) = run(new.clone()).unwrap_err();
        assert_eq!(t, Some(ScimType::Mutability), "{new}");
        assert!(detail.contains(needle), "{new}: {detail}");
    }
    // Nothing set before: anything goes.
    assert_eq!(
        check_immutable_defs(SYNTHETIC, None, json!({"badge": "x"}).as_object(), ""),
        Ok(())
    );
}

#[test]
fn check_immutable_accepts_ordinary_put_changes() {
    let old = attrs(
        ResourceKind::User,
        json!({"userName": "a", "externalId": "e1", ENT: {"department": "x", "manager": "m1"}}),
    );
    let new = attrs(
        ResourceKind::User,
        json!({"userName": "b", ENT: {"manager": "m2"}}),
    );
    assert_eq!(check_immutable(ResourceKind::User, &old, &new), Ok(()));
    let g_old = attrs(ResourceKind::Group, json!({"displayName": "A"}));
    let g_new = attrs(ResourceKind::Group, json!({"displayName": "B"}));
    assert_eq!(check_immutable(ResourceKind::Group, &g_old, &g_new), Ok(()));
}
