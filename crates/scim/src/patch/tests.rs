//! PATCH tests: RFC 7644 §3.5.2 examples, one fixture per IdP PATCH shape of
//! `scim-interop.md` §2.6, and the error vocabulary. Every case goes through
//! [`check`]: parse the body, apply it, and compare the stored JSON and member changes exactly.

use serde_json::{Value, json};

use super::*;
use crate::schema::{ENTERPRISE_USER_SCHEMA, GROUP_SCHEMA, USER_SCHEMA};

const ENT: &str = ENTERPRISE_USER_SCHEMA;
const U1: &str = "2819c223-7f76-453a-919d-413861904646";
const U2: &str = "902c246b-6245-4190-8e05-00816be7344a";
const U3: &str = "c3a26dd3-27a0-4dec-a2ac-ce211e105f97";

/// What a case expects.
enum Want {
    /// The new stored attributes; no member changes.
    Attrs(Value),
    /// The new stored attributes and these member changes.
    Members(Value, Vec<MemberChange>),
    /// The input is returned unchanged (`changed == false`).
    Unchanged,
    /// An error of this `scimType`.
    Err(ScimType),
}

fn body(ops: Value) -> Value {
    json!({"schemas": [PATCH_OP_SCHEMA], "Operations": ops})
}

/// Parses and applies `patch` to `before`, asserting the outcome and that the input is untouched.
fn check(kind: ResourceKind, before: &Value, patch: &Value, want: Want) {
    let before_text = serde_json::to_string(before).unwrap();
    let result = parse_patch(kind, patch).and_then(|ops| apply_patch(kind, before, &ops));
    assert_eq!(
        serde_json::to_string(before).unwrap(),
        before_text,
        "input modified"
    );
    same_without_the_resource(kind, before, patch, &result);
    match want {
        Want::Attrs(expected) => {
            let out = result.unwrap_or_else(|e| panic!("{patch}: {e}"));
            assert_eq!(out.attrs, expected, "{patch}");
            assert_eq!(out.members, vec![], "{patch}");
            assert_eq!(out.changed, expected != *before, "{patch}");
        }
        Want::Members(expected, changes) => {
            let out = result.unwrap_or_else(|e| panic!("{patch}: {e}"));
            assert_eq!(out.attrs, expected, "{patch}");
            assert_eq!(out.members, changes, "{patch}");
            assert!(out.changed, "{patch}");
        }
        Want::Unchanged => {
            let out = result.unwrap_or_else(|e| panic!("{patch}: {e}"));
            assert_eq!(out.attrs, *before, "{patch}");
            assert_eq!(out.members, vec![], "{patch}");
            assert!(!out.changed, "{patch}");
        }
        Want::Err(t) => match result {
            Ok(out) => panic!("{patch}: expected {t:?}, got {}", out.attrs),
            Err(e) => {
                assert_eq!(e.scim_type, Some(t), "{patch}: {e}");
                assert_eq!(e.status, 400, "{patch}");
                assert!(!e.detail.is_empty());
            }
        },
    }
}

/// Where [`member_changes_only`] answers a PATCH (without the stored resource), it answers
/// what [`apply_patch`] does: the same member changes and unchanged attributes, or an error of
/// the same type.
fn same_without_the_resource(
    kind: ResourceKind,
    before: &Value,
    patch: &Value,
    result: &ScimResult<PatchOutcome>,
) -> bool {
    let Ok(ops) = parse_patch(kind, patch) else {
        return false;
    };
    let Some(only) = member_changes_only(kind, &ops) else {
        return false;
    };
    match (result, only) {
        (Ok(out), Ok(changes)) => {
            assert_eq!(out.members, changes, "{patch}");
            assert_eq!(
                out.attrs, *before,
                "{patch}: a members-only PATCH changed attributes"
            );
        }
        (Err(e), Err(only)) => assert_eq!(e.scim_type, only.scim_type, "{patch}"),
        (Ok(_), Err(e)) => panic!("{patch}: only the members-only path failed: {e}"),
        (Err(e), Ok(_)) => panic!("{patch}: only apply_patch failed: {e}"),
    }
    true
}

/// Which PATCHes the members-only path takes: every operation on `members`, in the shapes IdPs
/// send; anything else goes through the stored resource.
#[test]
fn member_only_patches_are_answered_without_the_stored_resource() {
    let cases = [
        (
            json!([{"op": "add", "path": "members", "value": [{"value": U1}]}]),
            true,
        ),
        (
            json!([{"op": "Add", "path": "members", "value": [{"value": U1}, {"value": U2}]}]),
            true,
        ),
        (
            json!([{"op": "remove", "path": format!("members[value eq \"{U1}\"]")}]),
            true,
        ),
        (
            json!([{"op": "remove", "path": "members", "value": [{"value": U1}]}]),
            true,
        ),
        (
            json!([{"op": "replace", "path": "members", "value": [{"value": U3}]}]),
            true,
        ),
        (
            json!([{"op": "add", "path": "members", "value": [{"value": U1}]},
                   {"op": "remove", "path": format!("members[value eq \"{U2}\"]")}]),
            true,
        ),
        (
            json!([{"op": "add", "path": "members[value eq \"x\"]", "value": [{"value": U1}]}]),
            true,
        ),
        (
            json!([{"op": "add", "path": "members", "value": "not a list"}]),
            true,
        ),
        (
            json!([{"op": "replace", "path": "displayName", "value": "New"}]),
            false,
        ),
        (
            json!([{"op": "add", "path": "members", "value": [{"value": U1}]},
                   {"op": "replace", "path": "displayName", "value": "New"}]),
            false,
        ),
        (
            json!([{"op": "add", "value": {"members": [{"value": U1}]}}]),
            false,
        ),
    ];
    for (ops, taken) in cases {
        let patch = body(ops);
        let result = parse_patch(ResourceKind::Group, &patch)
            .and_then(|o| apply_patch(ResourceKind::Group, &group(), &o));
        assert_eq!(
            same_without_the_resource(ResourceKind::Group, &group(), &patch, &result),
            taken,
            "{patch}"
        );
    }
    // Users have no members: never taken.
    let patch = body(json!([{"op": "replace", "path": "displayName", "value": "x"}]));
    let ops = parse_patch(ResourceKind::User, &patch).unwrap();
    assert!(member_changes_only(ResourceKind::User, &ops).is_none());
}

fn user() -> Value {
    json!({
        "schemas": [USER_SCHEMA],
        "userName": "bjensen@example.com",
        "externalId": "bjensen",
        "name": {"givenName": "Barbara", "familyName": "Jensen", "formatted": "Ms. Barbara J Jensen III"},
        "active": true,
        "emails": [
            {"value": "bjensen@example.com", "type": "work", "primary": true},
            {"value": "babs@jensen.org", "type": "home"}
        ],
        "addresses": [
            {"type": "work", "streetAddress": "100 Universal City Plaza", "locality": "Hollywood"},
            {"type": "home", "streetAddress": "456 Hollywood Blvd", "locality": "Hollywood"}
        ]
    })
}

/// `user()` with `f` applied to a clone.
fn user_with(f: impl FnOnce(&mut Value)) -> Value {
    let mut u = user();
    f(&mut u);
    u
}

fn group() -> Value {
    json!({"schemas": [GROUP_SCHEMA], "displayName": "Tour Guides", "externalId": "tg-1"})
}

fn m(value: &str) -> Member {
    Member {
        value: value.to_owned(),
        ty: None,
        display: None,
    }
}

fn md(value: &str, display: &str) -> Member {
    Member {
        value: value.to_owned(),
        ty: None,
        display: Some(display.to_owned()),
    }
}

fn values(ids: &[&str]) -> MemberChange {
    MemberChange::Remove(MemberSelector::Values(
        ids.iter().map(|s| (*s).to_owned()).collect(),
    ))
}

// ---------------------------------------------------------------------------------------------
// RFC 7644 §3.5.2 examples
// ---------------------------------------------------------------------------------------------

#[test]
fn rfc_add_member() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{
            "op": "add", "path": "members",
            "value": [{"display": "Babs Jensen", "$ref": format!("https://example.com/v2/Users/{U1}"), "value": U1}]
        }])),
        Want::Members(
            group(),
            vec![MemberChange::Add(vec![md(U1, "Babs Jensen")])],
        ),
    );
}

#[test]
fn rfc_add_pathless_emails_and_nickname() {
    let before = user_with(|u| {
        u["emails"] = json!([{"value": "bjensen@example.com", "type": "work", "primary": true}]);
    });
    check(
        ResourceKind::User,
        &before,
        &body(json!([{
            "op": "add",
            "value": {"emails": [{"value": "babs@jensen.org", "type": "home"}], "nickName": "Babs"}
        }])),
        Want::Attrs(user_with(|u| u["nickName"] = json!("Babs"))),
    );
}

#[test]
fn rfc_add_to_multi_valued_dedupes_equal_values() {
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "add", "path": "emails", "value": [{"value": "babs@jensen.org", "type": "home"}]}]),
        ),
        Want::Unchanged,
    );
}

#[test]
fn rfc_add_to_multi_valued_appends() {
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "add", "path": "phoneNumbers", "value": {"value": "555-555-8377", "type": "work"}}]),
        ),
        Want::Attrs(user_with(|u| {
            u["phoneNumbers"] = json!([{"value": "555-555-8377", "type": "work"}]);
        })),
    );
}

#[test]
fn rfc_remove_single_member_by_filter() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "remove", "path": format!("members[value eq \"{U1}\"]")}])),
        Want::Members(group(), vec![values(&[U1])]),
    );
}

#[test]
fn rfc_remove_all_members() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "remove", "path": "members"}])),
        Want::Members(group(), vec![MemberChange::Remove(MemberSelector::All)]),
    );
}

#[test]
fn rfc_remove_members_by_non_value_filter_keeps_the_filter() {
    let path = format!("members[value eq \"{U1}\" and type eq \"User\"]");
    let f = filter::parse_patch_path(&path).unwrap().filter.unwrap();
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "remove", "path": path}])),
        Want::Members(
            group(),
            vec![MemberChange::Remove(MemberSelector::Filter(f))],
        ),
    );
}

#[test]
fn rfc_remove_email_by_complex_filter() {
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "remove", "path": "emails[type eq \"work\" and value ew \"example.com\"]"}]),
        ),
        Want::Attrs(user_with(|u| {
            u["emails"] = json!([{"value": "babs@jensen.org", "type": "home"}]);
        })),
    );
}

#[test]
fn rfc_remove_then_add_replaces_one_member() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([
            {"op": "remove", "path": format!("members[value eq \"{U1}\"]")},
            {"op": "add", "path": "members", "value": [{"display": "James Smith", "value": U2}]}
        ])),
        Want::Members(
            group(),
            vec![
                values(&[U1]),
                MemberChange::Add(vec![md(U2, "James Smith")]),
            ],
        ),
    );
}

#[test]
fn rfc_remove_all_then_add() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([
            {"op": "remove", "path": "members"},
            {"op": "add", "path": "members", "value": [{"value": U1}, {"value": U2}]}
        ])),
        Want::Members(
            group(),
            vec![
                MemberChange::Remove(MemberSelector::All),
                MemberChange::Add(vec![m(U1), m(U2)]),
            ],
        ),
    );
}

#[test]
fn rfc_replace_members() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{
            "op": "replace", "path": "members",
            "value": [{"display": "Babs Jensen", "value": U1}, {"display": "James Smith", "value": U2}]
        }])),
        Want::Members(
            group(),
            vec![MemberChange::ReplaceAll(vec![
                md(U1, "Babs Jensen"),
                md(U2, "James Smith"),
            ])],
        ),
    );
}

#[test]
fn rfc_replace_members_with_filter_is_remove_then_add() {
    check(
        ResourceKind::Group,
        &group(),
        &body(
            json!([{"op": "replace", "path": format!("members[value eq \"{U1}\"]"), "value": [{"value": U2}]}]),
        ),
        Want::Members(group(), vec![values(&[U1]), MemberChange::Add(vec![m(U2)])]),
    );
}

#[test]
fn rfc_replace_work_address_element() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{
            "op": "replace", "path": "addresses[type eq \"work\"]",
            "value": {"type": "work", "streetAddress": "911 Universal City Plaza", "locality": "Hollywood", "region": "CA", "postalCode": "91608", "country": "US", "primary": true}
        }])),
        Want::Attrs(user_with(|u| {
            u["addresses"][0] = json!({"type": "work", "streetAddress": "911 Universal City Plaza", "locality": "Hollywood", "region": "CA", "postalCode": "91608", "country": "US", "primary": true});
        })),
    );
}

#[test]
fn rfc_replace_work_address_street() {
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "replace", "path": "addresses[type eq \"work\"].streetAddress", "value": "1010 Broadway Ave"}]),
        ),
        Want::Attrs(user_with(|u| {
            u["addresses"][0]["streetAddress"] = json!("1010 Broadway Ave");
        })),
    );
}

#[test]
fn rfc_replace_pathless_replaces_multi_valued_set() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{
            "op": "replace",
            "value": {"emails": [{"value": "bjensen@example.com", "type": "work", "primary": true}], "nickName": "Babs"}
        }])),
        Want::Attrs(user_with(|u| {
            u["emails"] =
                json!([{"value": "bjensen@example.com", "type": "work", "primary": true}]);
            u["nickName"] = json!("Babs");
        })),
    );
}

#[test]
fn rfc_replace_complex_singular_merges_sub_attributes() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "replace", "path": "name", "value": {"givenName": "Babs"}}])),
        Want::Attrs(user_with(|u| u["name"]["givenName"] = json!("Babs"))),
    );
}

#[test]
fn rfc_add_complex_singular_merges_sub_attributes() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "add", "path": "name", "value": {"middleName": "Jane"}}])),
        Want::Attrs(user_with(|u| u["name"]["middleName"] = json!("Jane"))),
    );
}

#[test]
fn rfc_replace_meta_is_read_only() {
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "replace", "path": "meta.lastModified", "value": "2011-05-13T04:42:34Z"}]),
        ),
        Want::Err(ScimType::Mutability),
    );
}

#[test]
fn remove_single_valued_and_sub_attribute() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([
            {"op": "remove", "path": "externalId"},
            {"op": "remove", "path": "name.formatted"}
        ])),
        Want::Attrs(user_with(|u| {
            u.as_object_mut().unwrap().remove("externalId");
            u["name"].as_object_mut().unwrap().remove("formatted");
        })),
    );
}

#[test]
fn remove_last_sub_attribute_drops_the_complex_attribute() {
    let before = user_with(|u| u["name"] = json!({"givenName": "Barbara"}));
    check(
        ResourceKind::User,
        &before,
        &body(json!([{"op": "remove", "path": "name.givenName"}])),
        Want::Attrs(user_with(|u| {
            u.as_object_mut().unwrap().remove("name");
        })),
    );
}

#[test]
fn remove_whole_multi_valued_attribute() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "remove", "path": "emails"}])),
        Want::Attrs(user_with(|u| {
            u.as_object_mut().unwrap().remove("emails");
        })),
    );
}

#[test]
fn remove_with_filter_matching_nothing_is_a_no_op() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "remove", "path": "emails[type eq \"other\"]"}])),
        Want::Unchanged,
    );
}

#[test]
fn remove_sub_attribute_of_filtered_elements() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "remove", "path": "emails[type eq \"work\"].primary"}])),
        Want::Attrs(user_with(|u| {
            u["emails"][0].as_object_mut().unwrap().remove("primary");
        })),
    );
}

#[test]
fn sub_attribute_without_filter_applies_to_every_element() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "replace", "path": "addresses.locality", "value": "Los Angeles"}])),
        Want::Attrs(user_with(|u| {
            u["addresses"][0]["locality"] = json!("Los Angeles");
            u["addresses"][1]["locality"] = json!("Los Angeles");
        })),
    );
}

#[test]
fn remove_multi_valued_with_value_array_removes_only_those() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "Remove", "path": "emails", "value": [{"value": "babs@jensen.org"}]}])),
        Want::Attrs(user_with(|u| {
            u["emails"] =
                json!([{"value": "bjensen@example.com", "type": "work", "primary": true}]);
        })),
    );
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "remove", "path": "emails", "value": []}])),
        Want::Unchanged,
    );
}

#[test]
fn a_new_primary_value_clears_the_old_primary() {
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "add", "path": "emails", "value": [{"value": "b@new.example.com", "type": "other", "primary": "True"}]}]),
        ),
        Want::Attrs(user_with(|u| {
            u["emails"][0]["primary"] = json!(false);
            u["emails"]
                .as_array_mut()
                .unwrap()
                .push(json!({"value": "b@new.example.com", "type": "other", "primary": true}));
        })),
    );
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "replace", "path": "emails[type eq \"home\"].primary", "value": true}]),
        ),
        Want::Attrs(user_with(|u| {
            u["emails"][0]["primary"] = json!(false);
            u["emails"][1]["primary"] = json!(true);
        })),
    );
}

#[test]
fn replace_with_null_unassigns() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "replace", "path": "externalId", "value": null}])),
        Want::Attrs(user_with(|u| {
            u.as_object_mut().unwrap().remove("externalId");
        })),
    );
}

#[test]
fn add_with_filter_merges_into_matching_element() {
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "add", "path": "emails[type eq \"home\"]", "value": {"display": "Home"}}]),
        ),
        Want::Attrs(user_with(|u| u["emails"][1]["display"] = json!("Home"))),
    );
}

#[test]
fn filter_on_extension_of_core_urn_qualified_path() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{
            "op": "replace",
            "path": "urn:ietf:params:scim:schemas:core:2.0:User:emails[type eq \"home\"].value",
            "value": "b@jensen.org"
        }])),
        Want::Attrs(user_with(|u| {
            u["emails"][1]["value"] = json!("b@jensen.org")
        })),
    );
}

#[test]
fn filter_value_matching_honours_case_exactness() {
    // `type` is caseExact false: "WORK" matches "work".
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "replace", "path": "emails[type eq \"WORK\"].value", "value": "barbara@example.com"}]),
        ),
        Want::Attrs(user_with(|u| {
            u["emails"][0]["value"] = json!("barbara@example.com");
        })),
    );
}

#[test]
fn password_writes_are_accepted_and_dropped() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([
            {"op": "replace", "path": "password", "value": "t1meMa$heen"},
            {"op": "replace", "value": {"password": "other"}}
        ])),
        Want::Unchanged,
    );
}

#[test]
fn bare_extension_urn_path_add_and_remove() {
    let with_ent = user_with(|u| {
        u[ENT] = json!({"department": "Tour Operations", "costCenter": "4130"});
        u["schemas"] = json!([USER_SCHEMA, ENT]);
    });
    check(
        ResourceKind::User,
        &user(),
        &body(
            json!([{"op": "add", "path": ENT, "value": {"department": "Tour Operations", "costCenter": "4130"}}]),
        ),
        Want::Attrs(with_ent.clone()),
    );
    check(
        ResourceKind::User,
        &with_ent,
        &body(json!([{"op": "remove", "path": ENT}])),
        Want::Attrs(user()),
    );
}

#[test]
fn pathless_value_with_extension_urn_object() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{
            "op": "replace",
            "value": {"urn:ietf:params:scim:schemas:extension:enterprise:2.0:user": {"Division": "Theme Park"}}
        }])),
        Want::Attrs(user_with(|u| {
            u[ENT] = json!({"division": "Theme Park"});
            u["schemas"] = json!([USER_SCHEMA, ENT]);
        })),
    );
}

#[test]
fn removing_last_extension_attribute_drops_the_extension_schema() {
    let before = user_with(|u| {
        u[ENT] = json!({"department": "Sales"});
        u["schemas"] = json!([USER_SCHEMA, ENT]);
    });
    check(
        ResourceKind::User,
        &before,
        &body(json!([{"op": "remove", "path": format!("{ENT}:department")}])),
        Want::Attrs(user()),
    );
}

#[test]
fn group_pathless_members_become_member_changes() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "add", "value": {"members": [{"value": U1, "type": "user"}]}}])),
        Want::Members(
            group(),
            vec![MemberChange::Add(vec![Member {
                value: U1.to_owned(),
                ty: Some("User".to_owned()),
                display: None,
            }])],
        ),
    );
}

#[test]
fn group_external_id_and_name_update_attrs() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([
            {"op": "replace", "path": "externalId", "value": "tg-2"},
            {"op": "add", "path": "members", "value": [{"value": U3}]}
        ])),
        Want::Members(
            json!({"schemas": [GROUP_SCHEMA], "displayName": "Tour Guides", "externalId": "tg-2"}),
            vec![MemberChange::Add(vec![m(U3)])],
        ),
    );
}

// ---------------------------------------------------------------------------------------------
// IdP fixtures (scim-interop.md §2.6) and dialect quirks (§2)
// ---------------------------------------------------------------------------------------------

/// F3: Entra replaces the work email through a filtered path and the family name.
#[test]
fn f3_entra_replace_filtered_email_and_family_name() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([
            {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "barbara.jensen@example.com"},
            {"op": "Replace", "path": "name.familyName", "value": "Jensen-Smith"}
        ])),
        Want::Attrs(user_with(|u| {
            u["emails"][0]["value"] = json!("barbara.jensen@example.com");
            u["name"]["familyName"] = json!("Jensen-Smith");
        })),
    );
}

/// Entra quirk #6: a filtered `replace`/`add` with no matching element creates it.
#[test]
fn entra_filtered_replace_without_match_upserts() {
    let before = user_with(|u| {
        u.as_object_mut().unwrap().remove("emails");
    });
    check(
        ResourceKind::User,
        &before,
        &body(json!([
            {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "bjensen@example.com"},
            {"op": "Add", "path": "phoneNumbers[type eq \"mobile\"].value", "value": "+1 555 0100"},
            {"op": "Replace", "path": "addresses[type eq \"other\"]", "value": {"locality": "Paris"}}
        ])),
        Want::Attrs(user_with(|u| {
            u["emails"] = json!([{"type": "work", "value": "bjensen@example.com"}]);
            u["phoneNumbers"] = json!([{"type": "mobile", "value": "+1 555 0100"}]);
            u["addresses"] = json!([
                {"type": "work", "streetAddress": "100 Universal City Plaza", "locality": "Hollywood"},
                {"type": "home", "streetAddress": "456 Hollywood Blvd", "locality": "Hollywood"},
                {"type": "other", "locality": "Paris"}
            ]);
        })),
    );
}

/// F4: Entra default dialect, capitalised op and a string boolean.
#[test]
fn f4_entra_replace_active_string_false() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "Replace", "path": "active", "value": "False"}])),
        Want::Attrs(user_with(|u| u["active"] = json!(false))),
    );
    let inactive = user_with(|u| u["active"] = json!(false));
    check(
        ResourceKind::User,
        &inactive,
        &body(json!([{"op": "Replace", "path": "active", "value": "True"}])),
        Want::Attrs(user()),
    );
}

/// Entra quirk #1: ops in any case.
#[test]
fn entra_ops_in_any_case() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([
            {"op": "ADD", "path": "nickName", "value": "Babs"},
            {"op": "rEpLaCe", "path": "title", "value": "Tour Guide"},
            {"op": "Remove", "path": "externalId"}
        ])),
        Want::Attrs(user_with(|u| {
            u["nickName"] = json!("Babs");
            u["title"] = json!("Tour Guide");
            u.as_object_mut().unwrap().remove("externalId");
        })),
    );
}

/// F5: Entra `aadOptscim062020` dialect: lower-case op, real boolean, lower-case `operations`
/// key and schema URN in another case.
#[test]
fn f5_entra_flag_replace_active_bool() {
    check(
        ResourceKind::User,
        &user(),
        &json!({
            "schemas": ["urn:ietf:params:scim:api:messages:2.0:patchop"],
            "operations": [{"op": "replace", "path": "active", "value": false}]
        }),
        Want::Attrs(user_with(|u| u["active"] = json!(false))),
    );
}

/// F6: Entra `Add` of a single-valued attribute, the manager as a one-element array, and a
/// URN-qualified path whose URN contains dots (quirks #7, #8).
#[test]
fn f6_entra_add_nickname_manager_department() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([
            {"op": "Add", "path": "nickName", "value": "Babs"},
            {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager",
             "value": [{"$ref": format!("../Users/{U2}"), "value": U2}]},
            {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
             "value": "Tour Operations"}
        ])),
        Want::Attrs(user_with(|u| {
            u["nickName"] = json!("Babs");
            u[ENT] = json!({"manager": {"value": U2}, "department": "Tour Operations"});
            u["schemas"] = json!([USER_SCHEMA, ENT]);
        })),
    );
}

/// Entra quirk #7 variants: the manager as a bare id string, and a manager change replacing
/// the old id.
#[test]
fn entra_manager_as_string_and_replacement() {
    let before = user_with(|u| {
        u[ENT] = json!({"manager": {"value": U1}});
        u["schemas"] = json!([USER_SCHEMA, ENT]);
    });
    check(
        ResourceKind::User,
        &before,
        &body(json!([{"op": "Replace", "path": format!("{ENT}:manager"), "value": U2}])),
        Want::Attrs(user_with(|u| {
            u[ENT] = json!({"manager": {"value": U2}});
            u["schemas"] = json!([USER_SCHEMA, ENT]);
        })),
    );
    check(
        ResourceKind::User,
        &before,
        &body(
            json!([{"op": "Add", "path": format!("{ENT}:manager"), "value": [{"$ref": null, "value": U3}]}]),
        ),
        Want::Attrs(user_with(|u| {
            u[ENT] = json!({"manager": {"value": U3}});
            u["schemas"] = json!([USER_SCHEMA, ENT]);
        })),
    );
    check(
        ResourceKind::User,
        &before,
        &body(json!([{"op": "Remove", "path": format!("{ENT}:manager")}])),
        Want::Attrs(user()),
    );
}

/// F7: Entra flag dialect, a filtered replace plus a path-less replace whose value keys are
/// attribute paths (quirk #5), read-only keys ignored.
#[test]
fn f7_entra_flag_pathless_dotted_keys() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([
            {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "barbara@example.com"},
            {"op": "replace", "value": {
                "displayName": "Barbara Jensen",
                "name.givenName": "Barbara",
                "name.familyName": "Jensen-Smith",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:employeeNumber": "701984",
                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:manager.value": U2,
                "active": "True",
                "id": "ignored"
            }}
        ])),
        Want::Attrs(user_with(|u| {
            u["emails"][0]["value"] = json!("barbara@example.com");
            u["displayName"] = json!("Barbara Jensen");
            u["name"]["familyName"] = json!("Jensen-Smith");
            u[ENT] = json!({"employeeNumber": "701984", "manager": {"value": U2}});
            u["schemas"] = json!([USER_SCHEMA, ENT]);
        })),
    );
}

/// F10: Entra adds several members in one op, one with `"$ref": null` (quirk #9).
#[test]
fn f10_entra_add_multiple_members() {
    check(
        ResourceKind::Group,
        &group(),
        &body(
            json!([{"op": "Add", "path": "members", "value": [{"$ref": null, "value": U1}, {"value": U2}]}]),
        ),
        Want::Members(group(), vec![MemberChange::Add(vec![m(U1), m(U2)])]),
    );
}

/// F11: Entra default dialect (and JumpCloud) remove members with a value array: only those go
/// (quirk #3; a literal RFC reading would remove everyone).
#[test]
fn f11_entra_remove_members_value_array() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "Remove", "path": "members", "value": [{"value": U1}]}])),
        Want::Members(group(), vec![values(&[U1])]),
    );
}

/// JumpCloud: the same value-array removal, several members and a duplicate.
#[test]
fn jumpcloud_remove_several_members_value_array() {
    check(
        ResourceKind::Group,
        &group(),
        &body(
            json!([{"op": "remove", "path": "members", "value": [{"value": U1}, {"value": U2}, {"value": U1}]}]),
        ),
        Want::Members(group(), vec![values(&[U1, U2])]),
    );
}

/// F12: Entra flag dialect removes a member by value filter (quirk #4).
#[test]
fn f12_entra_flag_remove_member_by_filter() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "remove", "path": format!("members[value eq \"{U1}\"]")}])),
        Want::Members(group(), vec![values(&[U1])]),
    );
}

/// Several members in one filter (`or` of `value eq`) still come out as a value set.
#[test]
fn remove_members_or_filter_is_a_value_set() {
    check(
        ResourceKind::Group,
        &group(),
        &body(
            json!([{"op": "remove", "path": format!("members[value eq \"{U1}\" or value eq \"{U2}\"]")}]),
        ),
        Want::Members(group(), vec![values(&[U1, U2])]),
    );
}

/// F13: Entra renames a group.
#[test]
fn f13_entra_rename_group() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "Replace", "path": "displayName", "value": "Tour Guides EU"}])),
        Want::Attrs(
            json!({"schemas": [GROUP_SCHEMA], "displayName": "Tour Guides EU", "externalId": "tg-1"}),
        ),
    );
}

/// F18: Okta deactivates with a path-less replace.
#[test]
fn f18_okta_pathless_deactivate() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "replace", "value": {"active": false}}])),
        Want::Attrs(user_with(|u| u["active"] = json!(false))),
    );
}

/// F19: Okta sends a path-less replace of `{id, displayName}` with every push: `id` is ignored,
/// an unchanged name is not a change, a new name is a rename.
#[test]
fn f19_okta_pathless_id_and_display_name() {
    check(
        ResourceKind::Group,
        &group(),
        &body(
            json!([{"op": "replace", "value": {"id": "abf4dd94-a4c0-4f67-89c9-76b03340cb9b", "displayName": "Tour Guides"}}]),
        ),
        Want::Unchanged,
    );
    check(
        ResourceKind::Group,
        &group(),
        &body(
            json!([{"op": "replace", "value": {"id": "abf4dd94-a4c0-4f67-89c9-76b03340cb9b", "displayName": "Guides"}}]),
        ),
        Want::Attrs(
            json!({"schemas": [GROUP_SCHEMA], "displayName": "Guides", "externalId": "tg-1"}),
        ),
    );
}

/// F20: Okta mixes a filtered remove and an add with `{value, display}` in one request.
#[test]
fn f20_okta_remove_and_add_members() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([
            {"op": "remove", "path": format!("members[value eq \"{U1}\"]")},
            {"op": "add", "path": "members", "value": [{"value": U2, "display": "james@example.com"}]}
        ])),
        Want::Members(
            group(),
            vec![
                values(&[U1]),
                MemberChange::Add(vec![md(U2, "james@example.com")]),
            ],
        ),
    );
}

/// F21: Okta full push replaces the member list.
#[test]
fn f21_okta_replace_full_member_list() {
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([
            {"op": "replace", "value": {"id": "g1", "displayName": "Tour Guides"}},
            {"op": "replace", "path": "members", "value": [
                {"value": U1, "display": "bjensen@example.com"},
                {"value": U2, "display": "james@example.com"}
            ]}
        ])),
        Want::Members(
            group(),
            vec![MemberChange::ReplaceAll(vec![
                md(U1, "bjensen@example.com"),
                md(U2, "james@example.com"),
            ])],
        ),
    );
    check(
        ResourceKind::Group,
        &group(),
        &body(json!([{"op": "replace", "path": "members", "value": []}])),
        Want::Members(group(), vec![MemberChange::ReplaceAll(vec![])]),
    );
}

// ---------------------------------------------------------------------------------------------
// Atomicity and errors
// ---------------------------------------------------------------------------------------------

#[test]
fn failing_third_operation_leaves_nothing_applied() {
    let before = user();
    let text = serde_json::to_string(&before).unwrap();
    let ops = parse_patch(
        ResourceKind::User,
        &body(json!([
            {"op": "replace", "path": "active", "value": false},
            {"op": "add", "path": "nickName", "value": "Babs"},
            {"op": "replace", "path": "title", "value": 42}
        ])),
    )
    .unwrap();
    assert_eq!(ops.len(), 3);
    let err = apply_patch(ResourceKind::User, &before, &ops).unwrap_err();
    assert_eq!(err.scim_type, Some(ScimType::InvalidValue));
    assert!(err.detail.starts_with("Operations[2]"), "{}", err.detail);
    assert!(err.detail.contains("title"), "{}", err.detail);
    assert_eq!(serde_json::to_string(&before).unwrap(), text);
}

#[test]
fn parse_patch_yields_rfc_form() {
    let ops = parse_patch(
        ResourceKind::User,
        &body(json!([
            {"op": "Add", "path": "name.givenName", "value": "Babs"},
            {"OP": "remove", "Path": "emails[type eq \"work\"]"},
            {"op": "replace", "value": {"active": "False"}}
        ])),
    )
    .unwrap();
    assert_eq!(
        ops.iter().map(|o| o.op).collect::<Vec<_>>(),
        vec![PatchOpKind::Add, PatchOpKind::Remove, PatchOpKind::Replace]
    );
    let p = ops[0].path.as_ref().unwrap();
    assert_eq!(p.attr, AttrPath::parse("name.givenName").unwrap());
    assert!(ops[1].path.as_ref().unwrap().filter.is_some());
    assert_eq!(ops[1].value, None);
    assert_eq!(ops[2].path, None);
    assert_eq!(ops[2].value, Some(json!({"active": "False"})));
}

#[test]
fn errors() {
    let u = user();
    let g = group();
    let user_cases: Vec<(Value, ScimType)> = vec![
        // Body structure.
        (json!([1, 2]), ScimType::InvalidSyntax),
        (
            json!({"Operations": [{"op": "add", "path": "nickName", "value": "x"}]}),
            ScimType::InvalidSyntax,
        ),
        (
            json!({"schemas": [USER_SCHEMA], "Operations": [{"op": "add", "path": "nickName", "value": "x"}]}),
            ScimType::InvalidSyntax,
        ),
        (
            json!({"schemas": [PATCH_OP_SCHEMA]}),
            ScimType::InvalidSyntax,
        ),
        (body(json!([])), ScimType::InvalidSyntax),
        (body(json!({"op": "add"})), ScimType::InvalidSyntax),
        (body(json!(["add"])), ScimType::InvalidSyntax),
        (
            body(json!([{"op": "move", "path": "nickName", "value": "x"}])),
            ScimType::InvalidSyntax,
        ),
        (
            body(json!([{"path": "nickName", "value": "x"}])),
            ScimType::InvalidSyntax,
        ),
        (
            body(json!([{"op": "add", "path": "nickName"}])),
            ScimType::InvalidSyntax,
        ),
        // Targets.
        (body(json!([{"op": "remove"}])), ScimType::NoTarget),
        (
            body(json!([{"op": "Remove", "path": ""}])),
            ScimType::NoTarget,
        ),
        (
            body(json!([{"op": "add", "path": "shoeSize", "value": "9"}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "add", "path": "name.nick", "value": "x"}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "add", "path": "urn:example:ext:1.0:User:x", "value": "x"}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "add", "path": format!("{ENT}:shoeSize"), "value": "x"}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "replace", "path": "emails[type eq", "value": "x"}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "replace", "path": "emails[type zz \"work\"]", "value": {}}])),
            ScimType::InvalidPath,
        ),
        (
            body(
                json!([{"op": "replace", "path": "emails[shoe eq \"work\"].value", "value": "x"}]),
            ),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "replace", "path": "name[givenName eq \"x\"]", "value": {}}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "replace", "path": 7, "value": "x"}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "remove", "path": "members"}])),
            ScimType::InvalidPath,
        ),
        // Read-only targets.
        (
            body(json!([{"op": "replace", "path": "id", "value": "x"}])),
            ScimType::Mutability,
        ),
        (
            body(json!([{"op": "replace", "path": "meta", "value": {}}])),
            ScimType::Mutability,
        ),
        (
            body(json!([{"op": "replace", "path": "schemas", "value": []}])),
            ScimType::Mutability,
        ),
        (
            body(json!([{"op": "add", "path": "groups", "value": [{"value": "g"}]}])),
            ScimType::Mutability,
        ),
        (
            body(
                json!([{"op": "replace", "path": format!("{ENT}:manager.displayName"), "value": "x"}]),
            ),
            ScimType::Mutability,
        ),
        // Required attributes.
        (
            body(json!([{"op": "remove", "path": "userName"}])),
            ScimType::Mutability,
        ),
        (
            body(json!([{"op": "replace", "path": "userName", "value": ""}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "replace", "value": {"userName": null}}])),
            ScimType::InvalidValue,
        ),
        // Value types.
        (
            body(json!([{"op": "replace", "path": "active", "value": "yes"}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "replace", "path": "active", "value": 0}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "replace", "path": "userName", "value": 42}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "add", "path": "emails", "value": [5]}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "add", "path": "name", "value": "Barbara"}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "add", "path": "nickName", "value": ["a", "b"]}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "replace", "value": "Barbara"}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "replace", "value": {ENT: "x"}}])),
            ScimType::InvalidValue,
        ),
        (
            body(
                json!([{"op": "add", "path": "x509Certificates", "value": [{"value": "not base64!"}]}]),
            ),
            ScimType::InvalidValue,
        ),
        (
            body(
                json!([{"op": "replace", "path": "emails[type eq \"work\"].primary", "value": "maybe"}]),
            ),
            ScimType::InvalidValue,
        ),
        // Filter that matches nothing and cannot seed a new element.
        (
            body(
                json!([{"op": "replace", "path": "phoneNumbers[type eq \"work\" or type eq \"home\"].value", "value": "1"}]),
            ),
            ScimType::NoTarget,
        ),
        (
            body(
                json!([{"op": "replace", "path": "phoneNumbers[value co \"555\"]", "value": {"value": "1"}}]),
            ),
            ScimType::NoTarget,
        ),
    ];
    for (patch, t) in user_cases {
        check(ResourceKind::User, &u, &patch, Want::Err(t));
    }
    let group_cases: Vec<(Value, ScimType)> = vec![
        (
            body(json!([{"op": "replace", "path": "displayName", "value": null}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "remove", "path": "displayName"}])),
            ScimType::Mutability,
        ),
        (
            body(json!([{"op": "add", "path": "members", "value": [{"display": "no id"}]}])),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "add", "path": "members", "value": [{"value": 17}]}])),
            ScimType::InvalidValue,
        ),
        (
            body(
                json!([{"op": "add", "path": "members", "value": [{"value": U1, "type": "Robot"}]}]),
            ),
            ScimType::InvalidValue,
        ),
        (
            body(json!([{"op": "replace", "path": "members.display", "value": "x"}])),
            ScimType::Mutability,
        ),
        (
            body(
                json!([{"op": "replace", "path": format!("members[value eq \"{U1}\"].value"), "value": U2}]),
            ),
            ScimType::Mutability,
        ),
        (
            body(
                json!([{"op": "add", "path": format!("members[value eq \"{U1}\"]"), "value": [{"value": U2}]}]),
            ),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "add", "path": "userName", "value": "x"}])),
            ScimType::InvalidPath,
        ),
        (
            body(json!([{"op": "add", "path": ENT, "value": {"department": "x"}}])),
            ScimType::InvalidPath,
        ),
    ];
    for (patch, t) in group_cases {
        check(ResourceKind::Group, &g, &patch, Want::Err(t));
    }
}

#[test]
fn pathless_unknown_and_read_only_keys_are_ignored() {
    check(
        ResourceKind::User,
        &user(),
        &body(json!([{"op": "replace", "value": {
            "schemas": [USER_SCHEMA],
            "id": "x", "meta": {"resourceType": "User"}, "groups": [{"value": "g"}],
            "shoeSize": 9, "urn:example:custom:1.0:User:badge": "b", "bad key": 1,
            "urné:x": 2, "名前": 3
        }}])),
        Want::Unchanged,
    );
}

#[test]
fn applying_to_a_non_canonical_input_canonicalises_it() {
    let before =
        json!({"USERNAME": "bjensen", "Active": "true", "schemas": ["urn:scim:schemas:core:1.0"]});
    let out = apply_patch(
        ResourceKind::User,
        &before,
        &parse_patch(
            ResourceKind::User,
            &body(json!([{"op": "add", "path": "nickName", "value": "Babs"}])),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(
        out.attrs,
        json!({"schemas": [USER_SCHEMA], "userName": "bjensen", "active": true, "nickName": "Babs"})
    );
    assert!(out.changed);
}
