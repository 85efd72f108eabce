//! Bad input: every case answers a SCIM 4xx with the right `scimType` and a useful detail,
//! never a 500, and leaves the stored resource byte-identical (same `meta.version`).

use reqwest::Method;
use serde_json::{Value, json};
use server::Limits;

use crate::support::{GROUP_SCHEMA, Resp, Server, USER_SCHEMA, enc, patch_op, user};

/// Sends a raw body with the SCIM media type.
async fn send_raw(s: &Server, method: Method, path: &str, body: &str) -> Resp {
    s.send(
        s.req(method, path)
            .header("content-type", "application/scim+json")
            .body(body.to_owned()),
    )
    .await
}

#[track_caller]
fn assert_detail_mentions(r: &Resp, words: &[&str]) {
    let d = r.detail().to_ascii_lowercase();
    for w in words {
        assert!(
            d.contains(&w.to_ascii_lowercase()),
            "detail should mention `{w}`: {}",
            r.text
        );
    }
}

#[tokio::test]
async fn malformed_json_is_invalid_syntax() {
    let s = Server::start().await;
    let id = s.create_user("mj@x.example").await;
    let path = format!("/Users/{id}");
    let before = s.snapshot(&path).await;
    let cases: &[(Method, &str, &str)] = &[
        (Method::POST, "/Users", "{\"userName\": "),
        (Method::POST, "/Users", "{\"userName\": \"a\",}"),
        (Method::POST, "/Users", "not json at all"),
        (Method::POST, "/Users", ""),
        (Method::POST, "/Users", "[1, 2]"),
        (Method::POST, "/Users", "\"just a string\""),
        (Method::POST, "/Groups", "{\"displayName\": "),
        (Method::PUT, &path, "{\"userName\": \"x\""),
        (Method::PUT, &path, "[]"),
        (Method::PATCH, &path, "{\"Operations\": [}"),
        (Method::PATCH, &path, "[]"),
        (Method::POST, "/Users/.search", "{"),
        (Method::POST, "/Bulk", "{\"Operations\": "),
    ];
    for (m, p, body) in cases {
        let r = send_raw(&s, m.clone(), p, body).await;
        assert_eq!(r.status, 400, "{m} {p} `{body}`: {}", r.text);
        r.expect_error(400, Some("invalidSyntax"));
    }
    // The parser's position is in the detail.
    let r = send_raw(&s, Method::POST, "/Users", "{\n  \"userName\": ,\n}").await;
    r.expect_error(400, Some("invalidSyntax"));
    assert_detail_mentions(&r, &["line 2", "column"]);
    assert_eq!(s.snapshot(&path).await, before);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
    assert_eq!(s.get("/Groups").await.body["totalResults"], json!(0));
}

#[tokio::test]
async fn wrong_types_are_invalid_value_naming_the_attribute() {
    let s = Server::start().await;
    let id = s.create_user("wt@x.example").await;
    let path = format!("/Users/{id}");
    let before = s.snapshot(&path).await;
    let cases: &[(&str, Value, &str)] = &[
        ("userName", json!(123), "userName"),
        ("active", json!("maybe"), "active"),
        ("emails", json!(5), "emails"),
        ("name", json!("Just A String"), "name"),
        ("emails", json!([{"value": 7}]), "emails.value"),
        ("displayName", json!({"a": 1}), "displayName"),
        ("userName", json!(["a", "b"]), "userName"),
    ];
    for (attr, value, mention) in cases {
        let mut body = user("wt-new@x.example");
        body[*attr] = value.clone();
        // POST: rejected, nothing stored.
        let r = s.post("/Users", &body).await;
        r.expect_error(400, Some("invalidValue"));
        assert_detail_mentions(&r, &[mention]);
        // PUT: rejected, nothing changed.
        let r = s.put(&path, &body).await;
        r.expect_error(400, Some("invalidValue"));
        assert_detail_mentions(&r, &[mention]);
        // PATCH replace: rejected, nothing changed.
        let r = s
            .patch(
                &path,
                &patch_op(json!([{"op": "replace", "path": attr, "value": value}])),
            )
            .await;
        r.expect_error(400, Some("invalidValue"));
        assert_eq!(s.snapshot(&path).await, before, "{attr} = {value}");
    }
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
}

#[tokio::test]
async fn missing_required_attributes() {
    let s = Server::start().await;
    let id = s.create_user("mr@x.example").await;
    let gid = s.create_group("Required", &[]).await;
    let upath = format!("/Users/{id}");
    let gpath = format!("/Groups/{gid}");
    let ubefore = s.snapshot(&upath).await;
    let gbefore = s.snapshot(&gpath).await;
    let r = s
        .post(
            "/Users",
            &json!({"schemas": [USER_SCHEMA], "name": {"givenName": "x"}}),
        )
        .await;
    r.expect_error(400, Some("invalidValue"));
    assert_detail_mentions(&r, &["userName"]);
    for empty in [json!(""), json!(null)] {
        let r = s
            .post(
                "/Users",
                &json!({"schemas": [USER_SCHEMA], "userName": empty}),
            )
            .await;
        r.expect_error(400, Some("invalidValue"));
    }
    // PUT without userName (MS "garbage" suite).
    let r = s
        .put(
            &upath,
            &json!({"schemas": [USER_SCHEMA], "displayName": "no user name"}),
        )
        .await;
    r.expect_error(400, Some("invalidValue"));
    assert_detail_mentions(&r, &["userName"]);
    // PATCH that removes or blanks userName.
    let r = s
        .patch(
            &upath,
            &patch_op(json!([{"op": "remove", "path": "userName"}])),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    r.expect_error(400, None);
    let r = s
        .patch(
            &upath,
            &patch_op(json!([{"op": "replace", "path": "userName", "value": ""}])),
        )
        .await;
    r.expect_error(400, Some("invalidValue"));
    // Groups need a displayName.
    let r = s
        .post(
            "/Groups",
            &json!({"schemas": [GROUP_SCHEMA], "members": []}),
        )
        .await;
    r.expect_error(400, Some("invalidValue"));
    assert_detail_mentions(&r, &["displayName"]);
    let r = s.put(&gpath, &json!({"schemas": [GROUP_SCHEMA]})).await;
    r.expect_error(400, Some("invalidValue"));
    assert_eq!(s.snapshot(&upath).await, ubefore);
    assert_eq!(s.snapshot(&gpath).await, gbefore);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
}

#[tokio::test]
async fn oversize_body_is_413() {
    let s = Server::with_limits(Limits {
        max_body: 1024,
        ..Limits::default()
    })
    .await;
    let id = s.create_user("big@x.example").await;
    let path = format!("/Users/{id}");
    let before = s.snapshot(&path).await;
    let mut big = user("big2@x.example");
    big["title"] = json!("x".repeat(2000));
    let r = s.post("/Users", &big).await;
    r.expect_error(413, None);
    assert_detail_mentions(&r, &["1024"]);
    s.put(&path, &big).await.expect_error(413, None);
    s.patch(
        &path,
        &patch_op(json!([{"op": "replace", "path": "title", "value": "y".repeat(2000)}])),
    )
    .await
    .expect_error(413, None);
    s.post(
        "/Users/.search",
        &json!({"filter": format!("userName eq \"{}\"", "z".repeat(2000))}),
    )
    .await
    .expect_error(413, None);
    assert_eq!(s.snapshot(&path).await, before);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
}

#[tokio::test]
async fn bad_filters_are_invalid_filter() {
    let s = Server::start().await;
    s.create_user("bf@x.example").await;
    let cases: &[(&str, &[&str])] = &[
        ("userName xx \"a\"", &["position"]),
        ("userName eq", &["position"]),
        ("(userName eq \"a\"", &["position"]),
        ("userName eq \"a\" and", &["position"]),
        ("userName eq \"unterminated", &["position"]),
        ("emails[type eq \"work\"", &["position"]),
        ("noSuchAttribute eq \"a\"", &["noSuchAttribute"]),
        ("name.noSuchSub eq \"a\"", &["noSuchSub"]),
        ("urn:example:unknown:Schema:attr eq \"a\"", &[]),
    ];
    for (f, mentions) in cases {
        let r = s.get(&format!("/Users?filter={}", enc(f))).await;
        assert_eq!(r.status, 400, "filter `{f}`: {}", r.text);
        r.expect_error(400, Some("invalidFilter"));
        assert_detail_mentions(&r, mentions);
        // The same through .search.
        let r = s.post("/Users/.search", &json!({"filter": f})).await;
        r.expect_error(400, Some("invalidFilter"));
    }
    // A position is a number.
    let r = s
        .get(&format!("/Users?filter={}", enc("userName xx \"a\"")))
        .await;
    assert!(r.detail().chars().any(|c| c.is_ascii_digit()), "{}", r.text);
    // Group attributes on /Users are unknown there.
    s.get(&format!("/Users?filter={}", enc("members pr")))
        .await
        .expect_error(400, Some("invalidFilter"));
    // Bad sort parameters.
    s.get("/Users?sortBy=noSuchAttribute")
        .await
        .expect_error(400, Some("invalidValue"));
    s.get("/Users?sortOrder=sideways")
        .await
        .expect_error(400, Some("invalidValue"));
    s.get("/Users?startIndex=first")
        .await
        .expect_error(400, Some("invalidValue"));
}

#[tokio::test]
async fn bad_patch_requests() {
    let s = Server::start().await;
    let u1 = s.create_user("bp1@x.example").await;
    let gid = s.create_group("BadPatch", &[&u1]).await;
    let upath = format!("/Users/{u1}");
    let gpath = format!("/Groups/{gid}");
    let ubefore = s.snapshot(&upath).await;
    let gbefore = s.snapshot(&gpath).await;
    let user_cases: &[(Value, &str, &[&str])] = &[
        (
            patch_op(json!([{"op": "replace", "path": "noSuchAttr", "value": "x"}])),
            "invalidPath",
            &["noSuchAttr"],
        ),
        (
            patch_op(json!([{"op": "add", "path": "name.noSuchSub", "value": "x"}])),
            "invalidPath",
            &["noSuchSub"],
        ),
        (
            patch_op(
                json!([{"op": "replace", "path": "emails[type xx \"work\"].value", "value": "x"}]),
            ),
            "invalidPath",
            &[],
        ),
        (
            patch_op(json!([{"op": "replace", "path": "emails[", "value": "x"}])),
            "invalidPath",
            &[],
        ),
        (patch_op(json!([{"op": "remove"}])), "noTarget", &["path"]),
        (
            patch_op(json!([{"op": "remove", "value": {"title": "x"}}])),
            "noTarget",
            &["path"],
        ),
        (
            patch_op(json!([{"op": "replace", "path": "id", "value": "new-id"}])),
            "mutability",
            &["id"],
        ),
        (
            patch_op(json!([{"op": "replace", "path": "meta", "value": {"version": "W/\"9\""}}])),
            "mutability",
            &["meta"],
        ),
        (
            patch_op(
                json!([{"op": "add", "path": "meta.lastModified", "value": "2020-01-01T00:00:00Z"}]),
            ),
            "mutability",
            &["meta"],
        ),
        (
            patch_op(json!([{"op": "add", "path": "groups", "value": [{"value": gid}]}])),
            "mutability",
            &["groups"],
        ),
        (
            patch_op(json!([{"op": "remove", "path": "groups"}])),
            "mutability",
            &["groups"],
        ),
        (
            patch_op(json!([{"op": "frobnicate", "path": "title", "value": "x"}])),
            "invalidSyntax",
            &["frobnicate"],
        ),
        (
            patch_op(json!([{"op": "replace", "path": "title"}])),
            "invalidSyntax",
            &["value"],
        ),
        (patch_op(json!([])), "invalidSyntax", &[]),
        (
            json!({"Operations": [{"op": "replace", "path": "title", "value": "x"}]}),
            "invalidSyntax",
            &["PatchOp"],
        ),
        (
            patch_op(json!([{"op": "replace", "path": 5, "value": "x"}])),
            "invalidPath",
            &[],
        ),
        (
            patch_op(json!([{"op": "replace", "value": "not an object"}])),
            "invalidValue",
            &[],
        ),
    ];
    for (body, scim_type, mentions) in user_cases {
        let r = s.patch(&upath, body).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        r.expect_error(400, Some(scim_type));
        assert_detail_mentions(&r, mentions);
        assert_eq!(s.snapshot(&upath).await, ubefore, "after {body}");
    }
    let group_cases: &[(Value, &str)] = &[
        (
            patch_op(
                json!([{"op": "add", "path": "members", "value": [{"value": "no-such-user"}]}]),
            ),
            "invalidValue",
        ),
        (
            patch_op(json!([{"op": "replace", "path": "members.display", "value": "x"}])),
            "mutability",
        ),
        (
            patch_op(
                json!([{"op": "add", "path": "members[value eq \"x\"]", "value": [{"value": "x"}]}]),
            ),
            "invalidPath",
        ),
        (
            patch_op(json!([{"op": "add", "path": "members", "value": [{"display": "no value"}]}])),
            "invalidValue",
        ),
        (
            patch_op(
                json!([{"op": "add", "path": "members", "value": [{"value": gid, "type": "Group"}]}]),
            ),
            "invalidValue",
        ),
    ];
    for (body, scim_type) in group_cases {
        let r = s.patch(&gpath, body).await;
        r.expect_error(400, Some(scim_type));
        assert_eq!(s.snapshot(&gpath).await, gbefore, "after {body}");
    }
    // PATCH on a resource that does not exist.
    s.patch(
        "/Users/nope",
        &patch_op(json!([{"op": "replace", "path": "title", "value": "x"}])),
    )
    .await
    .expect_error(404, None);
}

#[tokio::test]
async fn failing_multi_op_patch_changes_nothing() {
    let s = Server::start().await;
    let u1 = s.create_user("mo1@x.example").await;
    let u2 = s.create_user("mo2@x.example").await;
    let gid = s.create_group("MultiOp", &[&u1]).await;
    let upath = format!("/Users/{u1}");
    let gpath = format!("/Groups/{gid}");
    let ubefore = s.get(&upath).await.body;
    let gbefore = s.snapshot(&gpath).await;
    let trail = s.trail_counts().await;
    // Valid ops first, then a failing one.
    let r = s
        .patch(
            &upath,
            &patch_op(json!([
                {"op": "replace", "path": "title", "value": "Changed"},
                {"op": "replace", "path": "active", "value": false},
                {"op": "add", "path": "emails", "value": [{"value": "extra@x.example", "type": "home"}]},
                {"op": "replace", "path": "active", "value": "maybe"},
            ])),
        )
        .await;
    r.expect_error(400, Some("invalidValue"));
    let after = s.get(&upath).await.body;
    assert_eq!(after, ubefore);
    assert_eq!(after["meta"]["version"], ubefore["meta"]["version"]);
    // A group PATCH: rename + add a real member + add a missing one → nothing applied.
    let r = s
        .patch(
            &gpath,
            &patch_op(json!([
                {"op": "replace", "path": "displayName", "value": "Renamed"},
                {"op": "add", "path": "members", "value": [{"value": u2}]},
                {"op": "add", "path": "members", "value": [{"value": "ghost"}]},
            ])),
        )
        .await;
    r.expect_error(400, Some("invalidValue"));
    assert_eq!(s.snapshot(&gpath).await, gbefore);
    assert_eq!(s.member_ids(&gid).await, vec![u1.clone()]);
    // A path error after a members op also rolls everything back.
    let r = s
        .patch(
            &gpath,
            &patch_op(json!([
                {"op": "remove", "path": "members"},
                {"op": "replace", "path": "noSuchAttr", "value": 1},
            ])),
        )
        .await;
    r.expect_error(400, Some("invalidPath"));
    assert_eq!(s.snapshot(&gpath).await, gbefore);
    assert_eq!(
        s.trail_counts().await,
        trail,
        "failed writes leave no trail"
    );
}

#[tokio::test]
async fn odd_requests_never_500() {
    let s = Server::start().await;
    let id = s.create_user("odd@x.example").await;
    let path = format!("/Users/{id}");
    let before = s.snapshot(&path).await;
    let long_id = "a".repeat(5000);
    let requests: Vec<(Method, String, Option<String>)> = vec![
        (Method::GET, format!("/Users/{}", enc("../../etc/passwd")), None),
        (Method::GET, format!("/Users/{long_id}"), None),
        (Method::GET, "/Users?filter=%ZZ".into(), None),
        (Method::GET, format!("/Users?filter={}", enc("userName eq \"\u{1F600}\"")), None),
        (Method::GET, "/Users?attributes=%5B%5D".into(), None),
        (Method::GET, "/Users?count=99999999999999999999999".into(), None),
        (Method::GET, "/Users?startIndex=99999999999999999999999".into(), None),
        (Method::GET, "/Users?startIndex=9223372036854775807&count=10".into(), None),
        (Method::POST, "/Users".into(), Some("{\"userName\": \"\\ud800\"}".into())),
        (Method::POST, "/Users".into(), Some(format!("{{\"userName\": \"{}\"}}", "n".repeat(100)))),
        (Method::PATCH, path.clone(), Some("{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:PatchOp\"],\"Operations\":[null]}".into())),
        (Method::PATCH, path.clone(), Some("{\"schemas\":[\"urn:ietf:params:scim:api:messages:2.0:PatchOp\"],\"Operations\":{}}".into())),
        (Method::POST, "/Bulk".into(), Some("{\"Operations\": [{\"method\": \"GET\", \"path\": \"/Users\"}]}".into())),
        (Method::POST, "/Bulk".into(), Some("{\"Operations\": [{\"method\": \"POST\", \"path\": \"/Nope\", \"bulkId\": \"x\", \"data\": {}}]}".into())),
        (Method::POST, "/Bulk".into(), Some("{\"failOnErrors\": -1, \"Operations\": []}".into())),
    ];
    for (m, p, body) in requests {
        let rb = s.req(m.clone(), &p);
        let rb = match body {
            Some(b) => rb.header("content-type", "application/scim+json").body(b),
            None => rb,
        };
        let r = s.send(rb).await;
        assert!(r.status < 500, "{m} {p}: {} {}", r.status, r.text);
        if r.status >= 400 {
            r.expect_error(r.status, None);
        }
    }
    assert_eq!(s.snapshot(&path).await, before);
}
