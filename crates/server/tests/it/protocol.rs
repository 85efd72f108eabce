//! The SCIM protocol surface: listing, paging, search, projection, ETags, writes, Bulk,
//! discovery and media types.

use reqwest::Method;
use serde_json::{Value, json};
use server::Limits;

use crate::support::{
    BULK_REQUEST, ENTERPRISE, GROUP_SCHEMA, LIST_RESPONSE, SEARCH_REQUEST, Server, USER_SCHEMA,
    assert_scim_json, enc, patch_op, user,
};

/// Creates `n` users `user-00@x.example` … and returns their ids in creation order.
async fn seed_users(s: &Server, n: usize) -> Vec<String> {
    let mut ids = vec![];
    for i in 0..n {
        ids.push(s.create_user(&format!("user-{i:02}@x.example")).await);
    }
    ids
}

fn ids_of(resources: &[Value]) -> Vec<String> {
    resources
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

fn names_of(resources: &[Value]) -> Vec<String> {
    resources
        .iter()
        .map(|r| r["userName"].as_str().unwrap().to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Listing, filtering, sorting, paging
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn list_filter_and_sort() {
    let s = Server::start().await;
    for n in ["carol@x.example", "alice@x.example", "bob@y.example"] {
        s.create_user(n).await;
    }
    let cases: &[(&str, &[&str])] = &[
        (
            "sortBy=userName",
            &["alice@x.example", "bob@y.example", "carol@x.example"],
        ),
        (
            "sortBy=userName&sortOrder=descending",
            &["carol@x.example", "bob@y.example", "alice@x.example"],
        ),
        (
            "filter=userName%20co%20%22x.example%22&sortBy=userName",
            &["alice@x.example", "carol@x.example"],
        ),
        ("filter=userName%20sw%20%22B%22", &["bob@y.example"]),
        ("filter=userName%20ew%20%22y.example%22", &["bob@y.example"]),
        (
            "filter=userName%20ne%20%22bob@y.example%22&sortBy=userName",
            &["alice@x.example", "carol@x.example"],
        ),
        (
            "filter=not%20(userName%20eq%20%22bob@y.example%22)%20and%20userName%20pr&sortBy=userName",
            &["alice@x.example", "carol@x.example"],
        ),
        (
            "filter=userName%20eq%20%22alice@x.example%22%20or%20userName%20eq%20%22carol@x.example%22&sortBy=userName&sortOrder=descending",
            &["carol@x.example", "alice@x.example"],
        ),
        (
            "filter=emails%5Btype%20eq%20%22work%22%20and%20value%20co%20%22bob%22%5D",
            &["bob@y.example"],
        ),
        (
            "filter=userName%20gt%20%22b%22&sortBy=userName",
            &["bob@y.example", "carol@x.example"],
        ),
        (
            "FILTER=USERNAME%20EQ%20%22ALICE@X.EXAMPLE%22",
            &["alice@x.example"],
        ),
    ];
    for (q, want) in cases {
        let r = s.get(&format!("/Users?{q}")).await;
        r.expect(200);
        assert_eq!(names_of(r.resources()), *want, "query {q}");
        assert_eq!(r.body["totalResults"], json!(want.len()), "query {q}");
    }
}

#[tokio::test]
async fn index_paging_is_stable_and_clamped() {
    let s = Server::start().await;
    let ids = seed_users(&s, 7).await;
    // Walk in pages of 3: every id exactly once, in creation order.
    let mut seen = vec![];
    let mut start = 1;
    loop {
        let r = s.get(&format!("/Users?startIndex={start}&count=3")).await;
        r.expect(200);
        assert_eq!(r.body["totalResults"], json!(7));
        assert_eq!(r.body["startIndex"], json!(start));
        let page = ids_of(r.resources());
        assert_eq!(r.body["itemsPerPage"], json!(page.len()));
        if page.is_empty() {
            break;
        }
        seen.extend(page);
        start += 3;
    }
    assert_eq!(seen, ids);
    // The same walk sorted by userName is stable too.
    let a = s.get("/Users?sortBy=userName&startIndex=1&count=4").await;
    let b = s.get("/Users?sortBy=userName&startIndex=5&count=4").await;
    let mut walked = names_of(a.resources());
    walked.extend(names_of(b.resources()));
    let mut sorted = walked.clone();
    sorted.sort();
    assert_eq!(walked, sorted);
    assert_eq!(walked.len(), 7);

    // startIndex < 1 is 1.
    for si in ["0", "-5"] {
        let r = s.get(&format!("/Users?startIndex={si}&count=2")).await;
        r.expect(200);
        assert_eq!(r.body["startIndex"], json!(1), "startIndex={si}");
        assert_eq!(ids_of(r.resources()), ids[..2].to_vec());
    }
    // count=0: totals only.
    let r = s.get("/Users?count=0").await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(7));
    assert_eq!(r.body["itemsPerPage"], json!(0));
    assert!(r.resources().is_empty());
    // Negative count is 0.
    let r = s.get("/Users?count=-3").await;
    assert_eq!(r.body["itemsPerPage"], json!(0));
    // count above the maximum is clamped (to maxPageSize, so all 7 here).
    let r = s.get("/Users?count=100000").await;
    r.expect(200);
    assert_eq!(r.resources().len(), 7);
    // Past the end: empty page, correct total.
    let r = s.get("/Users?startIndex=50").await;
    assert_eq!(r.body["totalResults"], json!(7));
    assert!(r.resources().is_empty());
    // A non-numeric value is a 400.
    s.get("/Users?count=lots")
        .await
        .expect_error(400, Some("invalidValue"));
}

#[tokio::test]
async fn cursor_paging_walks_all_pages() {
    let s = Server::start().await;
    let ids = seed_users(&s, 7).await;
    let mut seen = vec![];
    let mut cursor = String::new();
    let mut pages = 0;
    loop {
        let r = s.get(&format!("/Users?cursor={cursor}&count=3")).await;
        r.expect(200);
        pages += 1;
        assert_eq!(r.body["totalResults"], json!(7));
        seen.extend(ids_of(r.resources()));
        if pages > 1 {
            assert!(r.body["previousCursor"].is_string(), "{}", r.text);
        }
        match r.body["nextCursor"].as_str() {
            Some(c) => {
                assert!(
                    c.chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-._~".contains(ch)),
                    "cursor uses unreserved characters only: {c}"
                );
                cursor = c.to_owned();
            }
            None => break,
        }
        assert!(pages < 10, "cursor walk does not end");
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, ids);

    // The same walk with a filter through POST /.search.
    let r = s
        .post(
            "/Users/.search",
            &json!({"schemas": [SEARCH_REQUEST], "filter": "userName sw \"user-0\"", "cursor": "", "count": 4}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.resources().len(), 4);
    let next = r.body["nextCursor"].as_str().unwrap().to_owned();
    let r = s
        .post(
            "/Users/.search",
            &json!({"schemas": [SEARCH_REQUEST], "filter": "userName sw \"user-0\"", "cursor": next, "count": 4}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.resources().len(), 3);
    assert!(r.body.get("nextCursor").is_none());

    // Invalid, tampered and foreign cursors.
    s.get("/Users?cursor=not-a-cursor&count=3")
        .await
        .expect_error(400, Some("invalidCursor"));
    let first = s.get("/Users?cursor=&count=3").await;
    let good = first.body["nextCursor"].as_str().unwrap().to_owned();
    // Edit one character in the middle (the offset/fingerprint part).
    let mid = good.len() / 2;
    let c = good.as_bytes()[mid];
    let mut tampered = good.clone();
    tampered.replace_range(mid..=mid, if c == b'A' { "B" } else { "A" });
    s.get(&format!("/Users?cursor={tampered}&count=3"))
        .await
        .expect_error(400, Some("invalidCursor"));
    // A cursor replayed against another filter.
    s.get(&format!(
        "/Users?cursor={good}&count=3&filter={}",
        enc("userName pr")
    ))
    .await
    .expect_error(400, Some("invalidCursor"));
    // Non-numeric count in cursor mode: invalidCount.
    s.get("/Users?cursor=&count=x")
        .await
        .expect_error(400, Some("invalidCount"));
}

#[tokio::test]
async fn search_at_root_and_per_type() {
    let s = Server::start().await;
    let u = s.create_user("searcher@x.example").await;
    s.create_user("other@x.example").await;
    let g = s.create_group("Search Group", &[&u]).await;

    let r = s
        .post(
            "/Users/.search",
            &json!({"schemas": [SEARCH_REQUEST], "filter": "userName eq \"searcher@x.example\"",
                    "attributes": ["userName"], "startIndex": 1, "count": 10}),
        )
        .await;
    r.expect(200);
    assert_scim_json(&r);
    assert_eq!(r.body["totalResults"], json!(1));
    let res = &r.resources()[0];
    assert_eq!(res["id"], json!(u));
    assert_eq!(res["userName"], json!("searcher@x.example"));
    assert!(res.get("emails").is_none(), "projection applies: {res}");

    let r = s
        .post(
            "/Groups/.search",
            &json!({"schemas": [SEARCH_REQUEST], "excludedAttributes": "members"}),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    assert!(r.resources()[0].get("members").is_none());

    // Root search: users then groups.
    let r = s
        .post("/.search", &json!({"schemas": [SEARCH_REQUEST]}))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(3));
    let types: Vec<&str> = r
        .resources()
        .iter()
        .map(|x| x["meta"]["resourceType"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["User", "User", "Group"]);
    // Root search paged across the type boundary.
    let r = s
        .post(
            "/.search",
            &json!({"schemas": [SEARCH_REQUEST], "startIndex": 2, "count": 2}),
        )
        .await;
    assert_eq!(r.body["totalResults"], json!(3));
    assert_eq!(r.body["startIndex"], json!(2));
    let got = ids_of(r.resources());
    assert_eq!(got.len(), 2);
    assert_eq!(got[1], g);
    // A filter only Groups understand still searches the root.
    let r = s
        .post(
            "/.search",
            &json!({"schemas": [SEARCH_REQUEST], "filter": "displayName eq \"Search Group\""}),
        )
        .await;
    r.expect(200);
    assert!(ids_of(r.resources()).contains(&g));
    // A bad search body.
    s.post("/Users/.search", &json!({"filter": 5}))
        .await
        .expect_error(400, Some("invalidValue"));
    // GET on .search is not allowed.
    s.get("/Users/.search").await.expect_error(405, None);
}

// ---------------------------------------------------------------------------------------------
// Projection
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn projection_on_get_list_and_writes() {
    let s = Server::start().await;
    let mut body = user("proj@x.example");
    body[ENTERPRISE] = json!({"department": "R&D", "employeeNumber": "5"});
    let r = s
        .post("/Users?attributes=userName,name.givenName", &body)
        .await;
    r.expect(201);
    let id = r.body["id"].as_str().unwrap().to_owned();
    assert_eq!(r.body["userName"], json!("proj@x.example"));
    assert_eq!(r.body["name"], json!({"givenName": "Given"}));
    assert!(r.body.get("emails").is_none() && r.body.get("active").is_none());
    assert!(r.body["schemas"].is_array(), "schemas is returned always");
    // The store kept everything.
    let full = s.get(&format!("/Users/{id}")).await.body;
    assert_eq!(full["emails"][0]["value"], json!("proj@x.example"));
    assert_eq!(full[ENTERPRISE]["department"], json!("R&D"));

    let cases: &[(&str, &[&str], &[&str])] = &[
        (
            "attributes=userName",
            &["id", "schemas", "userName"],
            &["emails", "name", "active", "meta"],
        ),
        (
            "excludedAttributes=emails,name",
            &["id", "userName", "active", "meta"],
            &["emails", "name"],
        ),
        ("excludedAttributes=id,schemas", &["id", "schemas"], &[]),
        (
            "attributes=urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
            &["id", ENTERPRISE],
            &["userName", "emails"],
        ),
        (
            "attributes=emails.value",
            &["emails"],
            &["name", "userName"],
        ),
    ];
    for (q, present, absent) in cases {
        for path in [format!("/Users/{id}?{q}"), format!("/Users?{q}")] {
            let r = s.get(&path).await;
            r.expect(200);
            let res = if path.contains(&id) {
                r.body.clone()
            } else {
                r.resources()[0].clone()
            };
            for k in *present {
                assert!(res.get(*k).is_some(), "{path}: `{k}` missing in {res}");
            }
            for k in *absent {
                assert!(res.get(*k).is_none(), "{path}: `{k}` present in {res}");
            }
        }
    }
    let r = s.get(&format!("/Users/{id}?attributes=emails.value")).await;
    assert_eq!(r.body["emails"], json!([{"value": "proj@x.example"}]));
    let r = s
        .get(&format!(
            "/Users/{id}?attributes={}",
            enc(&format!("{ENTERPRISE}:department"))
        ))
        .await;
    assert_eq!(r.body[ENTERPRISE], json!({"department": "R&D"}));

    // PUT and PATCH responses honour projection.
    let mut put = full.clone();
    put["displayName"] = json!("Proj");
    let r = s
        .put(&format!("/Users/{id}?attributes=displayName"), &put)
        .await;
    r.expect(200);
    assert_eq!(r.body["displayName"], json!("Proj"));
    assert!(r.body.get("userName").is_none());
    let r = s
        .patch(
            &format!("/Users/{id}?excludedAttributes=emails"),
            &patch_op(json!([{"op": "replace", "path": "nickName", "value": "pj"}])),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["nickName"], json!("pj"));
    assert!(r.body.get("emails").is_none());
    assert_eq!(r.body["userName"], json!("proj@x.example"));
    // Unknown attribute names in projection are ignored, never a 500.
    s.get(&format!("/Users/{id}?attributes=noSuchThing"))
        .await
        .expect(200);
}

// ---------------------------------------------------------------------------------------------
// ETags
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn etags_and_preconditions() {
    let s = Server::start().await;
    let id = s.create_user("etag@x.example").await;
    let path = format!("/Users/{id}");
    let r = s.get(&path).await;
    let etag = r.header("etag").expect("ETag header").to_owned();
    assert_eq!(json!(etag), r.body["meta"]["version"]);
    assert!(etag.starts_with("W/\""));

    // If-None-Match: current → 304; other → 200.
    let r = s
        .send(s.req(Method::GET, &path).header("if-none-match", &etag))
        .await;
    assert_eq!(r.status, 304);
    assert!(r.text.is_empty());
    let r = s
        .send(
            s.req(Method::GET, &path)
                .header("if-none-match", "W/\"999\""),
        )
        .await;
    r.expect(200);

    let stale = "W/\"999\"";
    let before = s.snapshot(&path).await;
    // PUT, PATCH, DELETE with a stale If-Match: 412, nothing changes.
    let mut body = s.get(&path).await.body;
    body["nickName"] = json!("new");
    s.send_json(Method::PUT, &path, &body, &[("if-match", stale)])
        .await
        .expect_error(412, None);
    s.send_json(
        Method::PATCH,
        &path,
        &patch_op(json!([{"op": "add", "path": "nickName", "value": "x"}])),
        &[("if-match", stale)],
    )
    .await
    .expect_error(412, None);
    let r = s
        .send(s.req(Method::DELETE, &path).header("if-match", stale))
        .await;
    r.expect_error(412, None);
    assert_eq!(s.snapshot(&path).await, before);

    // With the current version: applied, and the ETag moves.
    let r = s
        .send_json(
            Method::PATCH,
            &path,
            &patch_op(json!([{"op": "add", "path": "nickName", "value": "x"}])),
            &[("if-match", &etag)],
        )
        .await;
    r.expect(200);
    let etag2 = r.header("etag").unwrap().to_owned();
    assert_ne!(etag2, etag);
    assert_eq!(json!(etag2), r.body["meta"]["version"]);
    let r = s
        .send_json(Method::PUT, &path, &body, &[("if-match", &etag2)])
        .await;
    r.expect(200);
    let etag3 = r.header("etag").unwrap().to_owned();
    assert_eq!(s.get(&path).await.body["nickName"], json!("new"));
    // `*` matches anything.
    let r = s
        .send(s.req(Method::DELETE, &path).header("if-match", "*"))
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    assert_ne!(etag3, etag2);
    s.get(&path).await.expect_error(404, None);
}

// ---------------------------------------------------------------------------------------------
// Writes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn create_answers_201_with_location_and_etag() {
    let s = Server::start().await;
    let mut body = user("loc@x.example");
    body["id"] = json!("client-chosen");
    body["meta"] =
        json!({"resourceType": "User", "version": "W/\"77\"", "created": "2001-01-01T00:00:00Z"});
    let r = s.post("/Users", &body).await;
    r.expect(201);
    assert_scim_json(&r);
    let id = r.body["id"].as_str().unwrap();
    assert_ne!(id, "client-chosen");
    let loc = r.header("location").unwrap();
    assert_eq!(loc, format!("{}/Users/{id}", s.base));
    assert_eq!(r.body["meta"]["location"], json!(loc));
    assert_eq!(json!(r.header("etag").unwrap()), r.body["meta"]["version"]);
    assert_ne!(r.body["meta"]["created"], json!("2001-01-01T00:00:00Z"));
    // The Location answers.
    let g = s.get(loc).await;
    g.expect(200);
    assert_eq!(g.body, r.body);
    s.get("/Users/client-chosen").await.expect_error(404, None);

    let r = s
        .post(
            "/Groups",
            &json!({"schemas": [GROUP_SCHEMA], "displayName": "G", "members": [{"value": id}]}),
        )
        .await;
    r.expect(201);
    assert!(r.header("location").unwrap().contains("/Groups/"));
    assert_eq!(r.body["members"][0]["value"], json!(id));
}

#[tokio::test]
async fn patch_answers_200_with_the_resource() {
    let s = Server::start().await;
    let id = s.create_user("p200@x.example").await;
    let r = s
        .patch(
            &format!("/Users/{id}"),
            &patch_op(json!([{"op": "replace", "path": "title", "value": "Boss"}])),
        )
        .await;
    r.expect(200);
    assert_scim_json(&r);
    assert_eq!(r.body["id"], json!(id));
    assert_eq!(r.body["title"], json!("Boss"));
    assert_eq!(r.body["userName"], json!("p200@x.example"));
    assert_eq!(json!(r.header("etag").unwrap()), r.body["meta"]["version"]);
    let stored = s.get(&format!("/Users/{id}")).await.body;
    assert_eq!(stored, r.body);
}

#[tokio::test]
async fn large_group_patch_response_omits_members_unless_asked() {
    let s = Server::start().await;
    let mut ids = vec![];
    for i in 0..102 {
        ids.push(s.create_user(&format!("m{i:03}@x.example")).await);
    }
    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let gid = s.create_group("Big", &refs[..101]).await;
    let path = format!("/Groups/{gid}");
    // 102 members after this add: members are left out of the response.
    let r = s
        .patch(
            &path,
            &patch_op(json!([{"op": "add", "path": "members", "value": [{"value": ids[101]}]}])),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["id"], json!(gid));
    assert_eq!(r.body["displayName"], json!("Big"));
    assert!(r.body.get("members").is_none(), "members omitted");
    assert_eq!(s.member_ids(&gid).await.len(), 102);
    // With attributes=members they are listed.
    let r = s
        .patch(
            &format!("{path}?attributes=members"),
            &patch_op(
                json!([{"op": "remove", "path": format!("members[value eq \"{}\"]", ids[0])}]),
            ),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["members"].as_array().unwrap().len(), 101);
    assert_eq!(s.member_ids(&gid).await.len(), 101);
    // A small group's PATCH response lists members without being asked.
    let small = s.create_group("Small", &refs[..2]).await;
    let r = s
        .patch(
            &format!("/Groups/{small}"),
            &patch_op(json!([{"op": "replace", "path": "displayName", "value": "Small2"}])),
        )
        .await;
    r.expect(200);
    assert_eq!(r.body["members"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn uniqueness_conflicts() {
    let s = Server::start().await;
    let a = s.create_user("Unique@x.example").await;
    let b = s.create_user("second@x.example").await;
    s.post("/Users", &user("unique@X.EXAMPLE"))
        .await
        .expect_error(409, Some("uniqueness"));
    s.create_group("Admins", &[]).await;
    let g2 = s.create_group("Devs", &[]).await;
    s.post(
        "/Groups",
        &json!({"schemas": [GROUP_SCHEMA], "displayName": "admins"}),
    )
    .await
    .expect_error(409, Some("uniqueness"));
    // Renaming into a taken name is a 409 too, and leaves the resource as it was.
    let before = s.snapshot(&format!("/Users/{b}")).await;
    s.patch(
        &format!("/Users/{b}"),
        &patch_op(json!([{"op": "replace", "path": "userName", "value": "UNIQUE@x.example"}])),
    )
    .await
    .expect_error(409, Some("uniqueness"));
    let mut put = s.get(&format!("/Users/{b}")).await.body;
    put["userName"] = json!("unique@x.example");
    s.put(&format!("/Users/{b}"), &put)
        .await
        .expect_error(409, Some("uniqueness"));
    assert_eq!(s.snapshot(&format!("/Users/{b}")).await, before);
    let gbefore = s.snapshot(&format!("/Groups/{g2}")).await;
    s.patch(
        &format!("/Groups/{g2}"),
        &patch_op(json!([{"op": "replace", "path": "displayName", "value": "ADMINS"}])),
    )
    .await
    .expect_error(409, Some("uniqueness"));
    assert_eq!(s.snapshot(&format!("/Groups/{g2}")).await, gbefore);
    // Changing only the case of one's own name is fine.
    s.patch(
        &format!("/Users/{a}"),
        &patch_op(json!([{"op": "replace", "path": "userName", "value": "unique@x.example"}])),
    )
    .await
    .expect(200);
    assert_eq!(
        s.get(&format!("/Users/{a}")).await.body["userName"],
        json!("unique@x.example")
    );
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(2));
    assert_eq!(s.get("/Groups").await.body["totalResults"], json!(2));
}

#[tokio::test]
async fn put_replaces_ignores_read_only_and_never_creates() {
    let s = Server::start().await;
    let mut body = user("put@x.example");
    body["nickName"] = json!("nick");
    body["title"] = json!("Engineer");
    body[ENTERPRISE] = json!({"department": "Ops"});
    let r = s.post("/Users", &body).await;
    r.expect(201);
    let id = r.body["id"].as_str().unwrap().to_owned();
    let created = r.body["meta"]["created"].clone();
    let path = format!("/Users/{id}");
    let r = s
        .put(
            &path,
            &json!({
                "schemas": [USER_SCHEMA],
                "id": "some-other-id",
                "meta": {"created": "1999-01-01T00:00:00Z", "version": "W/\"42\""},
                "userName": "put@x.example",
                "groups": [{"value": "nope"}],
                "active": false,
            }),
        )
        .await;
    r.expect(200);
    let u = s.get(&path).await.body;
    assert_eq!(u["id"], json!(id));
    assert_eq!(u["meta"]["created"], created);
    assert_ne!(u["meta"]["version"], json!("W/\"42\""));
    assert_eq!(u["active"], json!(false));
    for gone in ["nickName", "title", "emails", "name", ENTERPRISE, "groups"] {
        assert!(u.get(gone).is_none(), "`{gone}` was cleared: {u}");
    }
    assert_eq!(u["schemas"], json!([USER_SCHEMA]));
    s.get("/Users/some-other-id").await.expect_error(404, None);

    // PUT never creates.
    s.put("/Users/does-not-exist", &user("ghost@x.example"))
        .await
        .expect_error(404, None);
    s.put(
        "/Groups/does-not-exist",
        &json!({"schemas": [GROUP_SCHEMA], "displayName": "ghost"}),
    )
    .await
    .expect_error(404, None);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
    assert_eq!(s.get("/Groups").await.body["totalResults"], json!(0));

    // A group PUT replaces its members.
    let u2 = s.create_user("put2@x.example").await;
    let gid = s.create_group("PutGroup", &[&id]).await;
    s.put(
        &format!("/Groups/{gid}"),
        &json!({"schemas": [GROUP_SCHEMA], "displayName": "PutGroup2", "members": [{"value": u2}]}),
    )
    .await
    .expect(200);
    let g = s.get(&format!("/Groups/{gid}")).await.body;
    assert_eq!(g["displayName"], json!("PutGroup2"));
    assert_eq!(s.member_ids(&gid).await, vec![u2]);
}

#[tokio::test]
async fn delete_then_404() {
    let s = Server::start().await;
    let u = s.create_user("del@x.example").await;
    let g = s.create_group("DelGroup", &[&u]).await;
    let r = s.delete(&format!("/Users/{u}")).await;
    assert_eq!(r.status, 204);
    assert!(r.text.is_empty());
    s.get(&format!("/Users/{u}")).await.expect_error(404, None);
    s.delete(&format!("/Users/{u}"))
        .await
        .expect_error(404, None);
    // The deleted user left its group.
    assert!(s.member_ids(&g).await.is_empty());
    s.delete(&format!("/Groups/{g}")).await.expect(204);
    s.get(&format!("/Groups/{g}")).await.expect_error(404, None);
    assert_eq!(s.get("/Groups").await.body["totalResults"], json!(0));
}

// ---------------------------------------------------------------------------------------------
// Bulk
// ---------------------------------------------------------------------------------------------

fn bulk(ops: Value) -> Value {
    json!({"schemas": [BULK_REQUEST], "Operations": ops})
}

fn op_status(r: &Value, i: usize) -> String {
    r["Operations"][i]["status"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

#[tokio::test]
async fn bulk_with_bulk_id_references_including_forward() {
    let s = Server::start().await;
    let r = s
        .post(
            "/Bulk",
            &bulk(json!([
                {"method": "POST", "path": "/Users", "bulkId": "u1", "data": user("bulk1@x.example")},
                // A forward reference: u2 is created by a later operation.
                {"method": "POST", "path": "/Groups", "bulkId": "g1", "data": {
                    "schemas": [GROUP_SCHEMA], "displayName": "BulkGroup",
                    "members": [{"type": "User", "value": "bulkId:u1"}, {"type": "User", "value": "bulkId:u2"}]}},
                {"method": "POST", "path": "/Users", "bulkId": "u2", "data": user("bulk2@x.example")},
                {"method": "PATCH", "path": "/Users/bulkId:u1", "data":
                    {"schemas": ["urn:ietf:params:scim:api:messages:2.0:PatchOp"],
                     "Operations": [{"op": "replace", "path": "title", "value": "Bulky"}]}},
            ])),
        )
        .await;
    r.expect(200);
    let ops = r.body["Operations"].as_array().unwrap();
    assert_eq!(ops.len(), 4, "{}", r.text);
    for (i, op) in ops.iter().enumerate().take(3) {
        assert_eq!(op_status(&r.body, i), "201", "{}", r.text);
        assert!(op["location"].is_string());
    }
    assert_eq!(op_status(&r.body, 3), "200", "{}", r.text);
    let loc = |i: usize| ops[i]["location"].as_str().unwrap().to_owned();
    let u1 = loc(0).rsplit('/').next().unwrap().to_owned();
    let u2 = loc(2).rsplit('/').next().unwrap().to_owned();
    let g = s.get(&loc(1)).await;
    g.expect(200);
    assert_eq!(g.body["displayName"], json!("BulkGroup"));
    let gid = g.body["id"].as_str().unwrap();
    let mut want = vec![u1.clone(), u2];
    want.sort();
    assert_eq!(s.member_ids(gid).await, want);
    assert_eq!(
        s.get(&format!("/Users/{u1}")).await.body["title"],
        json!("Bulky")
    );
    assert!(!u1.contains("bulkId"));
}

#[tokio::test]
async fn bulk_fail_on_errors_stops() {
    let s = Server::start().await;
    s.create_user("dup@x.example").await;
    let r = s
        .post(
            "/Bulk",
            &json!({"schemas": [BULK_REQUEST], "failOnErrors": 1, "Operations": [
                {"method": "POST", "path": "/Users", "bulkId": "a", "data": user("dup@x.example")},
                {"method": "POST", "path": "/Users", "bulkId": "b", "data": user("never@x.example")},
            ]}),
        )
        .await;
    r.expect(200);
    let ops = r.body["Operations"].as_array().unwrap();
    assert_eq!(ops.len(), 1, "stopped after one error: {}", r.text);
    assert_eq!(op_status(&r.body, 0), "409");
    assert_eq!(ops[0]["response"]["scimType"], json!("uniqueness"));
    let f = s
        .get(&format!(
            "/Users?filter={}",
            enc("userName eq \"never@x.example\"")
        ))
        .await;
    assert_eq!(f.body["totalResults"], json!(0));

    // Without failOnErrors every operation runs.
    let r = s
        .post(
            "/Bulk",
            &bulk(json!([
                {"method": "POST", "path": "/Users", "bulkId": "a", "data": user("dup@x.example")},
                {"method": "DELETE", "path": "/Users/missing"},
                {"method": "POST", "path": "/Users", "bulkId": "b", "data": user("ok@x.example")},
            ])),
        )
        .await;
    r.expect(200);
    assert_eq!(op_status(&r.body, 0), "409");
    assert_eq!(op_status(&r.body, 1), "404");
    assert_eq!(op_status(&r.body, 2), "201");
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(2));
}

#[tokio::test]
async fn bulk_limits_are_413() {
    let s = Server::with_limits(Limits {
        bulk_max_operations: 2,
        bulk_max_payload: 2048,
        ..Limits::default()
    })
    .await;
    let spc = s.get("/ServiceProviderConfig").await.body;
    assert_eq!(spc["bulk"]["maxOperations"], json!(2));
    assert_eq!(spc["bulk"]["maxPayloadSize"], json!(2048));
    let three = bulk(json!([
        {"method": "POST", "path": "/Users", "bulkId": "a", "data": user("a@x.example")},
        {"method": "POST", "path": "/Users", "bulkId": "b", "data": user("b@x.example")},
        {"method": "POST", "path": "/Users", "bulkId": "c", "data": user("c@x.example")},
    ]));
    s.post("/Bulk", &three).await.expect_error(413, None);
    let mut big = user("big@x.example");
    big["title"] = json!("x".repeat(4000));
    s.post(
        "/Bulk",
        &bulk(json!([{"method": "POST", "path": "/Users", "bulkId": "a", "data": big}])),
    )
    .await
    .expect_error(413, None);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(0));
}

#[tokio::test]
async fn bulk_circular_reference_is_an_error_entry() {
    let s = Server::start().await;
    let r = s
        .post(
            "/Bulk",
            &bulk(json!([
                {"method": "POST", "path": "/Groups", "bulkId": "ga", "data": {
                    "schemas": [GROUP_SCHEMA], "displayName": "A", "members": [{"type": "Group", "value": "bulkId:gb"}]}},
                {"method": "POST", "path": "/Groups", "bulkId": "gb", "data": {
                    "schemas": [GROUP_SCHEMA], "displayName": "B", "members": [{"type": "Group", "value": "bulkId:ga"}]}},
                {"method": "POST", "path": "/Users", "bulkId": "u", "data": user("fine@x.example")},
            ])),
        )
        .await;
    r.expect(200);
    let ops = r.body["Operations"].as_array().unwrap();
    assert_eq!(ops.len(), 3, "{}", r.text);
    let by_id = |b: &str| {
        ops.iter()
            .find(|o| o["bulkId"] == json!(b))
            .unwrap_or_else(|| panic!("no entry for {b}: {}", r.text))
            .clone()
    };
    for b in ["ga", "gb"] {
        let e = by_id(b);
        assert!(e["status"].as_str().unwrap().starts_with('4'), "{e}");
        assert!(
            e["response"]["detail"]
                .as_str()
                .unwrap()
                .contains("circular")
        );
    }
    assert_eq!(by_id("u")["status"], json!("201"));
    assert_eq!(s.get("/Groups").await.body["totalResults"], json!(0));
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
}

// ---------------------------------------------------------------------------------------------
// Discovery, media types, odd routes
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn service_provider_config_advertises_features() {
    let s = Server::start().await;
    let r = s.get("/ServiceProviderConfig").await;
    r.expect(200);
    assert_scim_json(&r);
    let b = &r.body;
    assert_eq!(b["patch"]["supported"], json!(true));
    assert_eq!(b["bulk"]["supported"], json!(true));
    assert!(b["bulk"]["maxOperations"].is_u64());
    assert!(b["bulk"]["maxPayloadSize"].is_u64());
    assert_eq!(b["filter"]["supported"], json!(true));
    assert!(b["filter"]["maxResults"].is_u64());
    assert_eq!(b["etag"]["supported"], json!(true));
    assert_eq!(b["sort"]["supported"], json!(true));
    assert_eq!(b["changePassword"]["supported"], json!(false));
    let p = &b["pagination"];
    assert_eq!(p["cursor"], json!(true));
    assert_eq!(p["index"], json!(true));
    for k in [
        "defaultPaginationMethod",
        "defaultPageSize",
        "maxPageSize",
        "cursorTimeout",
    ] {
        assert!(!p[k].is_null(), "pagination.{k}: {b}");
    }
    assert!(!b["authenticationSchemes"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn resource_types_and_schemas_by_id() {
    let s = Server::start().await;
    let r = s.get("/ResourceTypes").await;
    r.expect(200);
    assert_eq!(r.body["schemas"], json!([LIST_RESPONSE]));
    assert_eq!(r.body["totalResults"], json!(2));
    for rt in r.resources() {
        let id = rt["id"].as_str().unwrap();
        let one = s.get(&format!("/ResourceTypes/{id}")).await;
        one.expect(200);
        assert_eq!(&one.body, rt);
        let schema = rt["schema"].as_str().unwrap();
        s.get(&format!("/Schemas/{schema}")).await.expect(200);
    }
    s.get("/ResourceTypes/Nope").await.expect_error(404, None);
    let r = s.get("/Schemas").await;
    r.expect(200);
    let ids: Vec<String> = r
        .resources()
        .iter()
        .map(|x| x["id"].as_str().unwrap().to_owned())
        .collect();
    for want in [USER_SCHEMA, GROUP_SCHEMA, ENTERPRISE] {
        assert!(ids.iter().any(|i| i == want), "{want} listed");
        let one = s.get(&format!("/Schemas/{want}")).await;
        one.expect(200);
        assert_eq!(one.body["id"], json!(want));
        assert!(!one.text.contains("null"), "no nulls in schema documents");
    }
    s.get("/Schemas/urn:nope").await.expect_error(404, None);
    // Non-GET on discovery endpoints: 405 with a SCIM body.
    for path in [
        "/ServiceProviderConfig",
        "/ResourceTypes",
        "/ResourceTypes/User",
        "/Schemas",
        &format!("/Schemas/{USER_SCHEMA}"),
    ] {
        for m in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
            let r = s
                .send(
                    s.req(m.clone(), path)
                        .header("content-type", "application/scim+json")
                        .body("{}"),
                )
                .await;
            r.expect_error(405, None);
            let _ = m;
        }
    }
}

#[tokio::test]
async fn me_unknown_paths_and_media_types() {
    let s = Server::start().await;
    s.get("/Me").await.expect_error(501, None);
    s.get("/NoSuchThing").await.expect_error(404, None);
    s.get("/Users/x/y/z").await.expect_error(404, None);
    // The method on a collection that has none: 405.
    s.delete("/Users").await.expect_error(405, None);

    // application/json is accepted; text/plain is 415 and stores nothing.
    let r = s
        .send(
            s.req(Method::POST, "/Users")
                .header("content-type", "application/json; charset=utf-8")
                .body(user("json@x.example").to_string()),
        )
        .await;
    r.expect(201);
    assert_scim_json(&r);
    let r = s
        .send(
            s.req(Method::POST, "/Users")
                .header("content-type", "text/plain")
                .body(user("text@x.example").to_string()),
        )
        .await;
    r.expect_error(415, None);
    assert_eq!(s.get("/Users").await.body["totalResults"], json!(1));
    // Every response, lists and errors alike, is application/scim+json.
    for path in ["/Users", "/Groups", "/Schemas", "/Users/nope"] {
        assert_scim_json(&s.get(path).await);
    }
}

#[tokio::test]
async fn filters_on_extension_derived_and_case_exact_attributes() {
    let s = Server::start().await;
    let mut a = user("fa@x.example");
    a["externalId"] = json!("ExtA");
    a["title"] = json!("Lead");
    a["name"] = json!({"givenName": "Ann", "familyName": "Zed"});
    a[ENTERPRISE] = json!({"employeeNumber": "1001"});
    let a = s.post("/Users", &a).await.expect(201).body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut b = user("fb@x.example");
    b["externalId"] = json!("extb");
    b["name"] = json!({"givenName": "Bob", "familyName": "Young"});
    b["emails"] = json!([{"value": "fb@home.example", "type": "home"}]);
    let b = s.post("/Users", &b).await.expect(201).body["id"]
        .as_str()
        .unwrap()
        .to_owned();
    s.patch(
        &format!("/Users/{b}"),
        &patch_op(json!([{"op": "replace", "path": "active", "value": false}])),
    )
    .await
    .expect(200);
    let g = s.create_group("Filter Group", &[&a]).await;
    let created = s.get(&format!("/Users/{a}")).await.body["meta"]["created"]
        .as_str()
        .unwrap()
        .to_owned();

    let user_cases: Vec<(String, Vec<&str>)> = vec![
        ("externalId eq \"ExtA\"".into(), vec![&a]),
        ("externalId eq \"exta\"".into(), vec![]),
        ("externalId eq \"extb\"".into(), vec![&b]),
        (format!("id eq \"{a}\""), vec![&a]),
        ("name.givenName eq \"ANN\"".into(), vec![&a]),
        ("title pr".into(), vec![&a]),
        ("not (title pr)".into(), vec![&b]),
        ("active eq false".into(), vec![&b]),
        ("active eq true".into(), vec![&a]),
        ("emails.type eq \"home\"".into(), vec![&b]),
        (
            "emails[type eq \"work\"].value eq \"fa@x.example\"".into(),
            vec![&a],
        ),
        (format!("{ENTERPRISE}:employeeNumber eq \"1001\""), vec![&a]),
        (format!("groups.value eq \"{g}\""), vec![&a]),
        (format!("groups[value eq \"{g}\"]"), vec![&a]),
        (
            format!("meta.created ge \"{created}\" and userName sw \"f\""),
            vec![&a, &b],
        ),
        (
            "meta.lastModified lt \"2000-01-01T00:00:00Z\"".into(),
            vec![],
        ),
        (
            "userName eq \"fa@x.example\" or externalId eq \"extb\"".into(),
            vec![&a, &b],
        ),
    ];
    for (f, want) in &user_cases {
        let r = s.get(&format!("/Users?filter={}", enc(f))).await;
        r.expect(200);
        let mut got = ids_of(r.resources());
        got.sort();
        let mut want: Vec<String> = want.iter().map(|x| x.to_string()).collect();
        want.sort();
        assert_eq!(got, want, "filter `{f}`");
        assert_eq!(r.body["totalResults"], json!(want.len()), "filter `{f}`");
    }
    let group_cases: Vec<(String, usize)> = vec![
        (format!("members.value eq \"{a}\""), 1),
        (format!("members[value eq \"{b}\"]"), 0),
        ("displayName co \"filter\"".into(), 1),
        ("members pr".into(), 1),
    ];
    for (f, n) in &group_cases {
        let r = s.get(&format!("/Groups?filter={}", enc(f))).await;
        r.expect(200);
        assert_eq!(r.body["totalResults"], json!(n), "filter `{f}`: {}", r.text);
    }
    // Sorting by a sub-attribute, combined with a filter and paging.
    let r = s
        .get(&format!(
            "/Users?filter={}&sortBy=name.familyName&sortOrder=descending&count=1",
            enc("userName sw \"f\"")
        ))
        .await;
    assert_eq!(r.body["totalResults"], json!(2));
    assert_eq!(ids_of(r.resources()), vec![a.clone()], "Zed before Young");
}

#[tokio::test]
async fn group_put_without_members_keeps_them() {
    // RFC 7644 §3.5.1 lets a service provider treat omitted readWrite attributes as "not
    // asserted"; this server clears every omitted attribute except a Group's `members`, which
    // only a PUT that carries `members` (even `[]`) replaces.
    let s = Server::start().await;
    let u = s.create_user("keep@x.example").await;
    let gid = s.create_group("Keep", &[&u]).await;
    let path = format!("/Groups/{gid}");
    s.put(
        &path,
        &json!({"schemas": [GROUP_SCHEMA], "displayName": "Keep2", "externalId": "k"}),
    )
    .await
    .expect(200);
    assert_eq!(s.member_ids(&gid).await, vec![u]);
    s.put(
        &path,
        &json!({"schemas": [GROUP_SCHEMA], "displayName": "Keep3", "members": []}),
    )
    .await
    .expect(200);
    assert!(s.member_ids(&gid).await.is_empty());
    let g = s.get(&path).await.body;
    assert_eq!(g["displayName"], json!("Keep3"));
    assert!(g.get("externalId").is_none(), "omitted externalId cleared");
}

#[tokio::test]
async fn bulk_version_and_unknown_references() {
    let s = Server::start().await;
    let id = s.create_user("bv@x.example").await;
    let r = s
        .post(
            "/Bulk",
            &bulk(json!([
                {"method": "PATCH", "path": format!("/Users/{id}"), "version": "W/\"99\"", "data":
                    patch_op(json!([{"op": "replace", "path": "title", "value": "stale"}]))},
                {"method": "PATCH", "path": format!("/Users/{id}"), "version": "W/\"1\"", "data":
                    patch_op(json!([{"op": "replace", "path": "title", "value": "fresh"}]))},
                {"method": "POST", "path": "/Groups", "bulkId": "g", "data":
                    {"schemas": [GROUP_SCHEMA], "displayName": "Refs", "members": [{"value": "bulkId:nowhere"}]}},
                {"method": "DELETE", "path": "/Users/bulkId:g"},
            ])),
        )
        .await;
    r.expect(200);
    assert_eq!(op_status(&r.body, 0), "412", "{}", r.text);
    assert_eq!(op_status(&r.body, 1), "200", "{}", r.text);
    assert_eq!(op_status(&r.body, 2), "400", "{}", r.text);
    assert!(op_status(&r.body, 3).starts_with('4'), "{}", r.text);
    assert_eq!(
        s.get(&format!("/Users/{id}")).await.body["title"],
        json!("fresh")
    );
    assert_eq!(s.get("/Groups").await.body["totalResults"], json!(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_serialise_cleanly() {
    let s = std::sync::Arc::new(Server::start().await);
    let mut users = vec![];
    for i in 0..12 {
        users.push(s.create_user(&format!("cc{i:02}@x.example")).await);
    }
    let gid = s.create_group("Concurrent", &[]).await;
    // Twelve membership PATCHes at once on the same group: all apply.
    let mut set = tokio::task::JoinSet::new();
    for u in users.clone() {
        let s = s.clone();
        let gid = gid.clone();
        set.spawn(async move {
            s.patch(
                &format!("/Groups/{gid}"),
                &patch_op(json!([{"op": "add", "path": "members", "value": [{"value": u}]}])),
            )
            .await
            .status
        });
    }
    while let Some(st) = set.join_next().await {
        assert_eq!(st.unwrap(), 200);
    }
    let mut want = users.clone();
    want.sort();
    assert_eq!(s.member_ids(&gid).await, want);
    // Eight creates of the same userName at once: one 201, the rest 409.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8 {
        let s = s.clone();
        set.spawn(async move {
            s.post(
                "/Users",
                &user(if i % 2 == 0 {
                    "race@x.example"
                } else {
                    "RACE@x.example"
                }),
            )
            .await
            .status
        });
    }
    let mut statuses = vec![];
    while let Some(st) = set.join_next().await {
        statuses.push(st.unwrap());
    }
    statuses.sort();
    assert_eq!(statuses, [201, 409, 409, 409, 409, 409, 409, 409]);
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("userName eq \"race@x.example\"")
        ))
        .await;
    assert_eq!(r.body["totalResults"], json!(1));
}

#[tokio::test]
async fn user_groups_are_derived_from_membership() {
    let s = Server::start().await;
    let u = s.create_user("derived@x.example").await;
    let upath = format!("/Users/{u}");
    assert!(s.get(&upath).await.body.get("groups").is_none());
    let g = s.create_group("Derived", &[&u]).await;
    let groups = s.get(&upath).await.body["groups"].clone();
    assert_eq!(groups[0]["value"], json!(g));
    assert_eq!(groups[0]["display"], json!("Derived"));
    assert!(
        groups[0]["$ref"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/Groups/{g}"))
    );
    // A rename shows up on the user.
    s.patch(
        &format!("/Groups/{g}"),
        &patch_op(json!([{"op": "replace", "path": "displayName", "value": "Derived2"}])),
    )
    .await
    .expect(200);
    assert_eq!(
        s.get(&upath).await.body["groups"][0]["display"],
        json!("Derived2")
    );
    // The user's list entry carries groups too, unless excluded.
    let r = s.get("/Users").await;
    assert_eq!(r.resources()[0]["groups"][0]["value"], json!(g));
    let r = s.get("/Users?excludedAttributes=groups").await;
    assert!(r.resources()[0].get("groups").is_none());
    // Deleting the group removes it from the user.
    s.delete(&format!("/Groups/{g}")).await.expect(204);
    assert!(s.get(&upath).await.body.get("groups").is_none());
}

/// Lookups are served from the response cache until a resource write: every kind of write is
/// seen by the very next lookup, and a cached answer is byte-for-byte the uncached one.
#[tokio::test]
async fn cached_lookups_never_outlive_a_write() {
    let s = Server::start().await;
    let q = |name: &str| format!("/Users?filter={}", enc(&format!("userName eq \"{name}\"")));
    // An empty answer is cached too, and a create makes it stale.
    s.get(&q("ann@x.example")).await.expect(200);
    assert!(s.get(&q("ann@x.example")).await.resources().is_empty());
    let ann = s.create_user("ann@x.example").await;
    let first = s.snapshot(&q("ann@x.example")).await;
    let again = s.snapshot(&q("ann@x.example")).await;
    assert_eq!(first, again, "the cached answer is the uncached one");
    assert!(first.contains(&ann));
    // A rename is seen by both the old and the new name at once.
    s.patch(
        &format!("/Users/{ann}"),
        &patch_op(json!([{"op": "replace", "path": "userName", "value": "anna@x.example"}])),
    )
    .await
    .expect(200);
    assert!(s.get(&q("ann@x.example")).await.resources().is_empty());
    assert_eq!(
        s.get(&q("anna@x.example")).await.resources()[0]["id"],
        json!(ann)
    );
    // A change of another attribute shows in the cached lookup's body.
    s.patch(
        &format!("/Users/{ann}"),
        &patch_op(json!([{"op": "replace", "path": "active", "value": false}])),
    )
    .await
    .expect(200);
    assert_eq!(
        s.get(&q("anna@x.example")).await.resources()[0]["active"],
        json!(false)
    );
    // A group write also moves the generation (a user's `groups` come from memberships).
    let g = s.create_group("Ops", &[&ann]).await;
    assert_eq!(
        s.get(&q("anna@x.example")).await.resources()[0]["groups"][0]["value"],
        json!(g)
    );
    s.delete(&format!("/Users/{ann}")).await.expect(204);
    assert!(s.get(&q("anna@x.example")).await.resources().is_empty());
}

/// Okta pushes a group's membership as bursts of PATCHes to that one group, Entra in parallel
/// requests: adding and removing members commute, so none of them may fail or lose a member
/// however many arrive at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_membership_patches_to_one_group_never_fails_and_loses_nothing() {
    const USERS: usize = 400;
    const IN_FLIGHT: usize = 64;
    let s = std::sync::Arc::new(Server::start().await);
    let mut users = vec![];
    for i in 0..USERS {
        users.push(s.create_user(&format!("burst{i:03}@x.example")).await);
    }
    let gid = s.create_group("Burst", &[]).await;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
    let mut set = tokio::task::JoinSet::new();
    for u in users.clone() {
        let (s, gid, sem) = (s.clone(), gid.clone(), sem.clone());
        set.spawn(async move {
            let _permit = sem.acquire().await.expect("permit");
            s.patch(
                &format!("/Groups/{gid}"),
                &patch_op(json!([{"op": "add", "path": "members", "value": [{"value": u}]}])),
            )
            .await
            .status
        });
    }
    let mut failed = 0;
    while let Some(st) = set.join_next().await {
        if st.unwrap() != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "{failed} of {USERS} membership PATCHes failed");
    let mut want = users.clone();
    want.sort();
    assert_eq!(s.member_ids(&gid).await, want, "no member lost");
    let r = s.get(&format!("/Groups/{gid}")).await;
    // Created at version 1, one bump per PATCH that changed something.
    assert_eq!(
        r.header("etag"),
        Some(format!("W/\"{}\"", USERS + 1).as_str()),
        "the ETag moved once per change"
    );
}
