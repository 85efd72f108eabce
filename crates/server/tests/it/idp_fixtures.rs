//! The IdP fixtures F1–F26 of `scim-interop.md` §2.6, replayed over HTTP; each asserts the
//! stored result with a GET after the write.

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{
    ENTERPRISE, GROUP_SCHEMA, LIST_RESPONSE, Server, USER_SCHEMA, enc, patch_op, user,
};

const ADSCIM_GROUP: &str =
    "http://schemas.microsoft.com/2006/11/ResourceManagement/ADSCIM/2.0/Group";

async fn entra_user(s: &Server, user_name: &str) -> String {
    let r = s
        .post(
            "/Users",
            &json!({
                "schemas": [USER_SCHEMA, ENTERPRISE],
                "externalId": format!("ext-{user_name}"),
                "userName": user_name,
                "active": true,
                "emails": [{"primary": true, "type": "work", "value": user_name}],
                "meta": {"resourceType": "User"},
                "name": {"formatted": "Ryan Leenay", "familyName": "Leenay", "givenName": "Ryan"},
                "roles": [],
            }),
        )
        .await;
    r.expect(201);
    r.body["id"].as_str().unwrap().to_owned()
}

async fn stored_user(s: &Server, id: &str) -> Value {
    let r = s.get(&format!("/Users/{id}")).await;
    r.expect(200);
    r.body
}

#[tokio::test]
async fn f01_entra_probe_filter_returns_empty_list() {
    let s = Server::start().await;
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("userName eq \"5b1e3c6a-0f7d-4a4e-9f3c-1d2e3f405060\"")
        ))
        .await;
    r.expect(200);
    assert_eq!(
        r.body,
        json!({"schemas": [LIST_RESPONSE], "totalResults": 0, "Resources": [], "startIndex": 1, "itemsPerPage": 0})
    );
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(0));
}

#[tokio::test]
async fn f02_entra_create_user() {
    let s = Server::start().await;
    let r = s
        .post(
            "/Users",
            &json!({
                "schemas": [USER_SCHEMA, ENTERPRISE],
                "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
                "userName": "Test_User_ab6490ee@contoso.com",
                "active": true,
                "emails": [{"primary": true, "type": "work", "value": "Test_User_fd0ea19b@contoso.com"}],
                "meta": {"resourceType": "User"},
                "name": {"formatted": "givenName familyName", "familyName": "familyName", "givenName": "givenName"},
                "roles": [],
                ENTERPRISE: {"employeeNumber": "4711", "department": "Engineering"},
            }),
        )
        .await;
    r.expect(201);
    let id = r.body["id"].as_str().unwrap();
    assert!(
        r.header("location")
            .unwrap()
            .ends_with(&format!("/Users/{id}"))
    );
    let u = stored_user(&s, id).await;
    assert_eq!(u["userName"], json!("Test_User_ab6490ee@contoso.com"));
    assert_eq!(
        u["externalId"],
        json!("0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef")
    );
    assert_eq!(u["active"], json!(true));
    assert_eq!(
        u["emails"][0]["value"],
        json!("Test_User_fd0ea19b@contoso.com")
    );
    assert_eq!(u["emails"][0]["type"], json!("work"));
    assert_eq!(u["name"]["formatted"], json!("givenName familyName"));
    assert_eq!(u[ENTERPRISE]["employeeNumber"], json!("4711"));
    assert_eq!(u["schemas"], json!([USER_SCHEMA, ENTERPRISE]));
    assert_eq!(u["meta"]["resourceType"], json!("User"));
    assert!(u.get("roles").is_none(), "empty roles are not stored: {u}");
}

#[tokio::test]
async fn f03_entra_filtered_email_and_family_name_replace() {
    let s = Server::start().await;
    let id = entra_user(&s, "f3@contoso.com").await;
    s.patch(
        &format!("/Users/{id}"),
        &patch_op(json!([
            {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "updated@contoso.com"},
            {"op": "Replace", "path": "name.familyName", "value": "updatedFamilyName"},
        ])),
    )
    .await
    .expect(200);
    let u = stored_user(&s, &id).await;
    assert_eq!(u["emails"].as_array().unwrap().len(), 1);
    assert_eq!(u["emails"][0]["value"], json!("updated@contoso.com"));
    assert_eq!(u["emails"][0]["type"], json!("work"));
    assert_eq!(u["name"]["familyName"], json!("updatedFamilyName"));
    assert_eq!(
        u["name"]["givenName"],
        json!("Ryan"),
        "other sub-attributes stay"
    );
    // Entra quirk #6: the same filtered replace on a user without a work email creates it.
    let r = s
        .post(
            "/Users",
            &json!({"schemas": [USER_SCHEMA], "userName": "f3-noemail@contoso.com"}),
        )
        .await;
    let id2 = r.expect(201).body["id"].as_str().unwrap().to_owned();
    s.patch(
        &format!("/Users/{id2}"),
        &patch_op(json!([
            {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "new@contoso.com"},
        ])),
    )
    .await
    .expect(200);
    let u2 = stored_user(&s, &id2).await;
    assert_eq!(
        u2["emails"],
        json!([{"type": "work", "value": "new@contoso.com"}])
    );
}

#[tokio::test]
async fn f04_entra_string_false_deactivates() {
    let s = Server::start().await;
    let id = entra_user(&s, "f4@contoso.com").await;
    s.patch(
        &format!("/Users/{id}"),
        &patch_op(json!([{"op": "Replace", "path": "active", "value": "False"}])),
    )
    .await
    .expect(200);
    assert_eq!(stored_user(&s, &id).await["active"], json!(false));
    // And "True" turns it back on.
    s.patch(
        &format!("/Users/{id}"),
        &patch_op(json!([{"op": "Replace", "path": "active", "value": "True"}])),
    )
    .await
    .expect(200);
    assert_eq!(stored_user(&s, &id).await["active"], json!(true));
}

#[tokio::test]
async fn f05_entra_flag_boolean_false_deactivates() {
    let s = Server::start().await;
    let id = entra_user(&s, "f5@contoso.com").await;
    s.patch(
        &format!("/Users/{id}?aadOptscim062020"),
        &patch_op(json!([{"op": "replace", "path": "active", "value": false}])),
    )
    .await
    .expect(200);
    assert_eq!(stored_user(&s, &id).await["active"], json!(false));
    let r = s
        .get(&format!("/Users?filter={}", enc("active eq false")))
        .await;
    assert_eq!(r.body["totalResults"], json!(1));
}

#[tokio::test]
async fn f06_entra_add_single_valued_manager_and_department() {
    let s = Server::start().await;
    let mgr = entra_user(&s, "boss@contoso.com").await;
    let id = entra_user(&s, "f6@contoso.com").await;
    s.patch(
        &format!("/Users/{id}"),
        &patch_op(json!([
            {"op": "Add", "path": "nickName", "value": "Babs"},
            {"op": "Add", "path": format!("{ENTERPRISE}:manager"),
             "value": [{"$ref": format!("../Users/{mgr}"), "value": mgr}]},
            {"op": "Add", "path": format!("{ENTERPRISE}:department"), "value": "Finance"},
        ])),
    )
    .await
    .expect(200);
    let u = stored_user(&s, &id).await;
    assert_eq!(u["nickName"], json!("Babs"));
    assert_eq!(u[ENTERPRISE]["manager"]["value"], json!(mgr));
    assert!(
        u[ENTERPRISE]["manager"]["$ref"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/Users/{mgr}"))
    );
    assert_eq!(u[ENTERPRISE]["department"], json!("Finance"));
    assert!(
        u["schemas"]
            .as_array()
            .unwrap()
            .contains(&json!(ENTERPRISE))
    );
}

#[tokio::test]
async fn f07_entra_flag_filtered_and_dotted_pathless_replace() {
    let s = Server::start().await;
    let id = entra_user(&s, "f7@contoso.com").await;
    s.patch(
        &format!("/Users/{id}?aadOptscim062020"),
        &patch_op(json!([
            {"op": "replace", "path": "emails[type eq \"work\"].value", "value": "f7.new@contoso.com"},
            {"op": "replace", "value": {
                "displayName": "Seven New",
                "name.givenName": "Seven",
                "name.familyName": "New",
                format!("{ENTERPRISE}:employeeNumber"): "77",
            }},
        ])),
    )
    .await
    .expect(200);
    let u = stored_user(&s, &id).await;
    assert_eq!(u["emails"][0]["value"], json!("f7.new@contoso.com"));
    assert_eq!(u["displayName"], json!("Seven New"));
    assert_eq!(u["name"]["givenName"], json!("Seven"));
    assert_eq!(u["name"]["familyName"], json!("New"));
    assert_eq!(u["name"]["formatted"], json!("Ryan Leenay"));
    assert_eq!(u[ENTERPRISE]["employeeNumber"], json!("77"));
    assert!(
        u.get("name.givenName").is_none(),
        "dotted keys are paths: {u}"
    );
}

#[tokio::test]
async fn f08_entra_create_group_with_adscim_urn() {
    let s = Server::start().await;
    let r = s
        .post(
            "/Groups",
            &json!({
                "schemas": [GROUP_SCHEMA, ADSCIM_GROUP],
                "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
                "displayName": "Group1DisplayName",
                "meta": {"resourceType": "Group"},
            }),
        )
        .await;
    r.expect(201);
    let id = r.body["id"].as_str().unwrap();
    let g = s
        .get(&format!("/Groups/{id}"))
        .await
        .expect(200)
        .body
        .clone();
    assert_eq!(g["displayName"], json!("Group1DisplayName"));
    assert_eq!(
        g["externalId"],
        json!("8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159")
    );
    assert_eq!(g["schemas"], json!([GROUP_SCHEMA]));
    assert!(
        g.get("members").is_none_or(|m| m == &json!([])),
        "no members: {g}"
    );
}

#[tokio::test]
async fn f09_entra_group_lookup_excludes_members() {
    let s = Server::start().await;
    let u = s.create_user("f9@contoso.com").await;
    let gid = s.create_group("Entra Group F9", &[&u]).await;
    let r = s
        .get(&format!(
            "/Groups?excludedAttributes=members&filter={}",
            enc("displayName eq \"Entra Group F9\"")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    let g = &r.resources()[0];
    assert_eq!(g["id"], json!(gid));
    assert_eq!(g["displayName"], json!("Entra Group F9"));
    assert!(g.get("members").is_none(), "members excluded: {g}");
    // The membership is still stored.
    assert_eq!(s.member_ids(&gid).await, vec![u]);
}

#[tokio::test]
async fn f10_entra_add_members() {
    let s = Server::start().await;
    let u1 = s.create_user("f10a@contoso.com").await;
    let u2 = s.create_user("f10b@contoso.com").await;
    let gid = s.create_group("F10", &[]).await;
    let r = s
        .patch(
            &format!("/Groups/{gid}"),
            &patch_op(json!([{"op": "Add", "path": "members",
                "value": [{"$ref": null, "value": u1}, {"value": u2}]}])),
        )
        .await;
    assert!(r.status == 200 || r.status == 204, "{}", r.text);
    let mut want = vec![u1, u2];
    want.sort();
    assert_eq!(s.member_ids(&gid).await, want);
}

#[tokio::test]
async fn f11_entra_remove_member_by_value_array_removes_only_that_member() {
    let s = Server::start().await;
    let u1 = s.create_user("f11a@contoso.com").await;
    let u2 = s.create_user("f11b@contoso.com").await;
    let gid = s.create_group("F11", &[&u1, &u2]).await;
    s.patch(
        &format!("/Groups/{gid}"),
        &patch_op(json!([{"op": "Remove", "path": "members", "value": [{"value": u1}]}])),
    )
    .await
    .expect(200);
    assert_eq!(s.member_ids(&gid).await, vec![u2]);
}

#[tokio::test]
async fn f12_entra_flag_remove_member_by_filter() {
    let s = Server::start().await;
    let u1 = s.create_user("f12a@contoso.com").await;
    let u2 = s.create_user("f12b@contoso.com").await;
    let gid = s.create_group("F12", &[&u1, &u2]).await;
    s.patch(
        &format!("/Groups/{gid}?aadOptscim062020"),
        &patch_op(json!([{"op": "remove", "path": format!("members[value eq \"{u1}\"]")}])),
    )
    .await
    .expect(200);
    assert_eq!(s.member_ids(&gid).await, vec![u2]);
}

#[tokio::test]
async fn f13_entra_rename_group_keeps_members() {
    let s = Server::start().await;
    let u1 = s.create_user("f13@contoso.com").await;
    let gid = s.create_group("Old Name", &[&u1]).await;
    s.patch(
        &format!("/Groups/{gid}"),
        &patch_op(json!([{"op": "Replace", "path": "displayName", "value": "New Name"}])),
    )
    .await
    .expect(200);
    let g = s.get(&format!("/Groups/{gid}")).await.body;
    assert_eq!(g["displayName"], json!("New Name"));
    assert_eq!(s.member_ids(&gid).await, vec![u1]);
    let r = s
        .get(&format!(
            "/Groups?filter={}",
            enc("displayName eq \"Old Name\"")
        ))
        .await;
    assert_eq!(r.body["totalResults"], json!(0));
}

#[tokio::test]
async fn f14_aad_flag_query_parameter_routes_normally() {
    let s = Server::start().await;
    let r = s
        .post("/Users?aadOptscim062020", &user("f14@contoso.com"))
        .await;
    r.expect(201);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let r = s.get("/Users?aadOptscim062020").await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    let r = s
        .get(&format!(
            "/Users?aadOptscim062020&filter={}",
            enc("userName eq \"f14@contoso.com\"")
        ))
        .await;
    assert_eq!(r.body["totalResults"], json!(1));
    s.get(&format!("/Users/{id}?aadOptscim062020"))
        .await
        .expect(200);
    s.patch(
        &format!("/Users/{id}?aadOptscim062020"),
        &patch_op(json!([{"op": "replace", "path": "displayName", "value": "F Fourteen"}])),
    )
    .await
    .expect(200);
    s.get("/Groups?aadOptscim062020").await.expect(200);
    s.get("/ServiceProviderConfig?aadOptscim062020")
        .await
        .expect(200);
    assert_eq!(
        stored_user(&s, &id).await["displayName"],
        json!("F Fourteen")
    );
    s.delete(&format!("/Users/{id}?aadOptscim062020"))
        .await
        .expect(204);
    s.get(&format!("/Users/{id}")).await.expect_error(404, None);
}

#[tokio::test]
async fn f15_okta_lookup_paging_fields_are_integers() {
    let s = Server::start().await;
    let id = s.create_user("f15@atko.example").await;
    let r = s
        .get(&format!(
            "/Users?filter={}&startIndex=1&count=100",
            enc("userName eq \"f15@atko.example\"")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    assert_eq!(r.body["itemsPerPage"], json!(1));
    assert_eq!(r.body["startIndex"], json!(1));
    assert!(r.body["totalResults"].is_u64() && r.body["startIndex"].is_u64());
    assert_eq!(r.resources()[0]["id"], json!(id));
}

fn okta_user(user_name: &str) -> Value {
    json!({
        "schemas": [USER_SCHEMA],
        "userName": user_name,
        "name": {"givenName": "Okta", "familyName": "User"},
        "emails": [{"primary": true, "value": user_name, "type": "work"}],
        "displayName": "Okta User",
        "locale": "en-US",
        "externalId": "00ujl29u0le5T6Aj10h7",
        "groups": [],
        "password": "1mz050nq",
        "active": true,
    })
}

#[tokio::test]
async fn f16_okta_create_with_password_groups_locale_then_duplicate() {
    let s = Server::start().await;
    let r = s.post("/Users", &okta_user("f16@atko.example")).await;
    r.expect(201);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let u = stored_user(&s, &id).await;
    assert_eq!(u["locale"], json!("en-US"));
    assert_eq!(u["externalId"], json!("00ujl29u0le5T6Aj10h7"));
    assert_eq!(u["displayName"], json!("Okta User"));
    assert!(u.get("password").is_none());
    assert!(u.get("groups").is_none_or(|g| g == &json!([])));
    s.post("/Users", &okta_user("f16@atko.example"))
        .await
        .expect_error(409, Some("uniqueness"));
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
}

#[tokio::test]
async fn f17_okta_put_whole_object_deactivates() {
    let s = Server::start().await;
    let id = s.create_user("f17@atko.example").await;
    let mut body = stored_user(&s, &id).await;
    body["active"] = json!(false);
    body["groups"] = json!([]);
    body["name"]["givenName"] = json!("Changed");
    body["meta"] = json!({"resourceType": "User"});
    body["password"] = json!("whatever");
    s.put(&format!("/Users/{id}"), &body).await.expect(200);
    let u = stored_user(&s, &id).await;
    assert_eq!(u["active"], json!(false));
    assert_eq!(u["name"]["givenName"], json!("Changed"));
    assert_eq!(u["userName"], json!("f17@atko.example"));
    assert_eq!(u["id"], json!(id));
}

#[tokio::test]
async fn f18_okta_pathless_deactivation() {
    let s = Server::start().await;
    let id = s.create_user("f18@atko.example").await;
    s.patch(
        &format!("/Users/{id}"),
        &patch_op(json!([{"op": "replace", "value": {"active": false}}])),
    )
    .await
    .expect(200);
    let u = stored_user(&s, &id).await;
    assert_eq!(u["active"], json!(false));
    assert_eq!(u["userName"], json!("f18@atko.example"));
}

#[tokio::test]
async fn f19_okta_pathless_id_displayname_replace_is_a_noop() {
    let s = Server::start().await;
    let u1 = s.create_user("f19@atko.example").await;
    let gid = s.create_group("Okta Push F19", &[&u1]).await;
    let path = format!("/Groups/{gid}");
    let before = s.get(&path).await.body;
    let trail = s.trail_counts().await;
    s.patch(
        &path,
        &patch_op(json!([{"op": "replace", "value": {"id": gid, "displayName": "Okta Push F19"}}])),
    )
    .await
    .expect(200);
    let after = s.get(&path).await.body;
    assert_eq!(after["meta"]["version"], before["meta"]["version"]);
    assert_eq!(
        after["meta"]["lastModified"],
        before["meta"]["lastModified"]
    );
    assert_eq!(after, before);
    assert_eq!(
        s.trail_counts().await,
        trail,
        "a no-op writes no audit/outbox"
    );
    // The same shape with a new name renames.
    s.patch(
        &path,
        &patch_op(json!([{"op": "replace", "value": {"id": gid, "displayName": "Renamed F19"}}])),
    )
    .await
    .expect(200);
    let g = s.get(&path).await.body;
    assert_eq!(g["displayName"], json!("Renamed F19"));
    assert_eq!(g["id"], json!(gid));
    assert_ne!(g["meta"]["version"], before["meta"]["version"]);
}

#[tokio::test]
async fn f20_okta_remove_and_add_members_in_one_request() {
    let s = Server::start().await;
    let u1 = s.create_user("f20a@atko.example").await;
    let u2 = s.create_user("f20b@atko.example").await;
    let u3 = s.create_user("f20c@atko.example").await;
    let gid = s.create_group("F20", &[&u1, &u2]).await;
    s.patch(
        &format!("/Groups/{gid}"),
        &patch_op(json!([
            {"op": "remove", "path": format!("members[value eq \"{u1}\"]")},
            {"op": "add", "path": "members", "value": [{"value": u3, "display": "f20c@atko.example"}]},
        ])),
    )
    .await
    .expect(200);
    let mut want = vec![u2, u3.clone()];
    want.sort();
    assert_eq!(s.member_ids(&gid).await, want);
    let g = s.get(&format!("/Groups/{gid}")).await.body;
    let m3 = g["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["value"] == json!(u3))
        .unwrap()
        .clone();
    assert_eq!(m3["display"], json!("f20c@atko.example"));
}

#[tokio::test]
async fn f21_okta_replace_full_member_list() {
    let s = Server::start().await;
    let u1 = s.create_user("f21a@atko.example").await;
    let u2 = s.create_user("f21b@atko.example").await;
    let u3 = s.create_user("f21c@atko.example").await;
    let gid = s.create_group("F21", &[&u1, &u2]).await;
    s.patch(
        &format!("/Groups/{gid}"),
        &patch_op(json!([{"op": "replace", "path": "members",
            "value": [{"value": u2, "display": "b"}, {"value": u3, "display": "c"}]}])),
    )
    .await
    .expect(200);
    let mut want = vec![u2, u3];
    want.sort();
    assert_eq!(s.member_ids(&gid).await, want);
}

#[tokio::test]
async fn f22_okta_uppercase_username_filter_finds_user() {
    let s = Server::start().await;
    let id = s.create_user("f22.mixed@atko.example").await;
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("userName eq \"F22.MIXED@ATKO.EXAMPLE\"")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    assert_eq!(r.resources()[0]["id"], json!(id));
    assert_eq!(
        r.resources()[0]["userName"],
        json!("f22.mixed@atko.example")
    );
}

#[tokio::test]
async fn f23_missing_or_bad_token_is_scim_401() {
    let s = Server::start().await;
    let r = s.send(s.raw(Method::GET, "/Users")).await;
    r.expect_error(401, None);
    let r = s
        .send(s.raw(Method::GET, "/Users").bearer_auth("wrong"))
        .await;
    r.expect_error(401, None);
    let r = s
        .send(
            s.raw(Method::POST, "/Users")
                .bearer_auth("wrong")
                .header("content-type", "application/scim+json")
                .body(user("f23@x.example").to_string()),
        )
        .await;
    r.expect_error(401, None);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(0));
}

#[tokio::test]
async fn f24_jumpcloud_probe_create_and_delete_leaves_nothing() {
    let s = Server::start().await;
    let uid = s.create_user("jumpcloud-test-user@example.com").await;
    let gid = s.create_group("JumpCloud Test Group", &[&uid]).await;
    s.delete(&format!("/Users/{uid}")).await.expect(204);
    s.delete(&format!("/Groups/{gid}")).await.expect(204);
    s.get(&format!("/Users/{uid}"))
        .await
        .expect_error(404, None);
    s.get(&format!("/Groups/{gid}"))
        .await
        .expect_error(404, None);
    for path in ["/Users", "/Groups"] {
        let r = s.get(path).await;
        assert_eq!(r.body["totalResults"], json!(0), "{path}: {}", r.text);
        assert_eq!(r.body["Resources"], json!([]));
    }
    // The names are free again.
    s.create_user("jumpcloud-test-user@example.com").await;
    s.create_group("JumpCloud Test Group", &[]).await;
}

#[tokio::test]
async fn f25_onelogin_legacy_urn_and_empty_strings() {
    let s = Server::start().await;
    let r = s
        .post(
            "/Users",
            &json!({
                "schemas": ["urn:scim:schemas:core:1.0", USER_SCHEMA],
                "userName": "f25@onelogin.example",
                "name": {"givenName": "One", "familyName": "Login", "middleName": ""},
                "title": "",
                "nickName": "",
                "emails": [{"value": "f25@onelogin.example", "primary": true}],
            }),
        )
        .await;
    r.expect(201);
    let u = stored_user(&s, r.body["id"].as_str().unwrap()).await;
    assert_eq!(u["userName"], json!("f25@onelogin.example"));
    assert!(
        u.get("title").is_none(),
        "empty string is not provided: {u}"
    );
    assert!(u.get("nickName").is_none());
    assert!(u["name"].get("middleName").is_none());
    assert_eq!(u["schemas"], json!([USER_SCHEMA]));
    // Only the legacy URN is tolerated too.
    let r = s
        .post(
            "/Users",
            &json!({"schemas": ["urn:scim:schemas:core:1.0"], "userName": "f25b@onelogin.example", "title": ""}),
        )
        .await;
    r.expect(201);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(2));
}

#[tokio::test]
async fn f26_ms_reference_suite_tolerant_parsing() {
    let s = Server::start().await;
    let mut o = user("OMalley@contoso.com");
    o["name"] = json!({"givenName": "Kim", "familyName": "Employee"});
    o["emails"] = json!([
        {"type": "work", "value": "omalley@example.com", "primary": true},
        {"type": "home", "value": "omalley@home.example"},
    ]);
    let oid = s.post("/Users", &o).await.expect(201).body["id"].clone();
    s.create_user("zed@contoso.com").await;
    let gid = s.create_group("Test Group Name", &[]).await;

    // Unquoted `sw` value.
    let r = s
        .get(&format!("/Users?filter={}", enc("userName sw O")))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    assert_eq!(r.resources()[0]["id"], oid);
    // Odd casing, unquoted values, grouping.
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("name.FamilyName eq Employee and (emails.Value co example.com or emails.Value co example.org)")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    // An unquoted date with a fractional second and an offset.
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("meta.Created gt 2015-10-10T14:38:21.86-07:00")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(2));
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("meta.created gt \"2999-01-01T00:00:00Z\"")
        ))
        .await;
    assert_eq!(r.body["totalResults"], json!(0));
    // `DisplayName eq` on groups, unquoted value with spaces is not possible: quoted.
    let r = s
        .get(&format!(
            "/Groups?filter={}",
            enc("DisplayName eq \"Test Group Name\"")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.resources()[0]["id"], json!(gid));
    // Complex-attribute projection with a value filter: accepted and read as its attribute
    // (`emails`), as `scim::projection::parse_attribute_list` documents.
    let r = s
        .get(&format!(
            "/Users/{}?attributes={}",
            oid.as_str().unwrap(),
            enc("emails[type eq \"work\"]")
        ))
        .await;
    r.expect(200);
    let emails = r.body["emails"].as_array().expect("emails kept");
    assert!(
        emails
            .iter()
            .any(|e| e["value"] == json!("omalley@example.com")),
        "{}",
        r.text
    );
    assert!(r.body.get("name").is_none(), "not asked for: {}", r.text);
    assert_eq!(r.body["id"], oid);
}
