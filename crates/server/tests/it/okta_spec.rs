//! The Okta SCIM 2.0 spec test sequence (`scim-interop.md` §4.3), replayed step by step.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{Value, json};

use crate::support::{LIST_RESPONSE, Server, USER_SCHEMA, enc};

fn assert_paging_numbers(body: &Value) {
    for k in ["totalResults", "itemsPerPage", "startIndex"] {
        assert!(body[k].is_u64(), "`{k}` must be a JSON integer: {body}");
    }
    assert_eq!(body["schemas"], json!([LIST_RESPONSE]));
}

#[tokio::test]
async fn okta_spec_sequence() {
    let s = Server::start().await;
    // Okta's suite needs at least one user already there.
    s.create_user("existing.user@example.com").await;

    // 1. List with count=1&startIndex=1: one user with the attributes Okta reads.
    let r = s.get("/Users?count=1&startIndex=1").await;
    r.expect(200);
    assert_paging_numbers(&r.body);
    assert_eq!(r.body["startIndex"], json!(1));
    assert_eq!(r.body["itemsPerPage"], json!(1));
    assert!(r.body["totalResults"].as_u64().unwrap() >= 1);
    let first = &r.resources()[0];
    let id = first["id"].as_str().expect("id").to_owned();
    assert!(first["name"]["givenName"].is_string());
    assert!(first["name"]["familyName"].is_string());
    assert!(first["userName"].is_string());
    assert!(first["active"].is_boolean());
    assert!(first["emails"][0]["value"].is_string());

    // 2. GET that user by id.
    let r = s.get(&format!("/Users/{id}")).await;
    r.expect(200);
    assert_eq!(r.body["id"], json!(id));
    assert_eq!(r.body["userName"], first["userName"]);

    // 3. Filter by an unknown email: 200 and no results.
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("userName eq \"no-such-person-4f1c@atko.example\"")
        ))
        .await;
    r.expect(200);
    assert_paging_numbers(&r.body);
    assert_eq!(r.body["totalResults"], json!(0));

    // 4. GET an unknown id: 404 with a SCIM error and a detail.
    s.get("/Users/010101010101010101")
        .await
        .expect_error(404, None);

    // 5. Random userName: 0 results.
    let r = s
        .get(&format!(
            "/Users?filter={}&startIndex=1&count=100",
            enc("userName eq \"random-7c2e9a@atko.example\"")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(0));
    assert_eq!(r.body["Resources"], json!([]));

    // 6. Create a user, posted as `application/json` like Okta's suite.
    let new_user = json!({
        "schemas": [USER_SCHEMA],
        "userName": "okta.spec.user@atko.example",
        "name": {"givenName": "Okta", "familyName": "Spec"},
        "emails": [{"primary": true, "value": "okta.spec.user@atko.example", "type": "work"}],
        "active": true,
        "password": "1mz050nq",
    });
    let r = s
        .send(
            s.req(Method::POST, "/Users")
                .header("content-type", "application/json")
                .body(new_user.to_string()),
        )
        .await;
    r.expect(201);
    assert_eq!(r.body["active"], json!(true));
    assert_eq!(r.body["name"]["givenName"], json!("Okta"));
    assert_eq!(r.body["name"]["familyName"], json!("Spec"));
    assert_eq!(r.body["userName"], json!("okta.spec.user@atko.example"));
    assert!(
        r.body["schemas"]
            .as_array()
            .unwrap()
            .contains(&json!(USER_SCHEMA))
    );
    assert!(
        r.body.get("password").is_none(),
        "password is never returned"
    );
    let new_id = r.body["id"].as_str().unwrap().to_owned();

    // 7. GET the created user.
    let r = s.get(&format!("/Users/{new_id}")).await;
    r.expect(200);
    assert_eq!(r.body["userName"], json!("okta.spec.user@atko.example"));
    assert_eq!(r.body["active"], json!(true));

    // 8. POST the same user again: 409.
    let r = s
        .send(
            s.req(Method::POST, "/Users")
                .header("content-type", "application/json")
                .body(new_user.to_string()),
        )
        .await;
    r.expect_error(409, Some("uniqueness"));

    // 9. Filter by the upper-cased userName: 200 and it finds the user.
    let r = s
        .get(&format!(
            "/Users?filter={}",
            enc("userName eq \"OKTA.SPEC.USER@ATKO.EXAMPLE\"")
        ))
        .await;
    r.expect(200);
    assert_eq!(r.body["totalResults"], json!(1));
    assert_eq!(r.resources()[0]["id"], json!(new_id));

    // 10. GET /Groups answers 200 within 600 ms.
    let t = Instant::now();
    let r = s.get("/Groups").await;
    let took = t.elapsed();
    r.expect(200);
    assert_paging_numbers(&r.body);
    assert!(
        took < Duration::from_millis(600),
        "GET /Groups took {took:?}"
    );

    // 11. A bad token: 401 with a SCIM error (detail, status "401").
    let r = s
        .send(
            s.raw(Method::GET, "/Users")
                .bearer_auth("tcscim_not-a-real-token"),
        )
        .await;
    r.expect_error(401, None);

    // 12. GET /Users/00919288221112222: 404 with a SCIM error.
    s.get("/Users/00919288221112222")
        .await
        .expect_error(404, None);

    // Nothing above changed the stored users beyond the one create.
    let r = s.get("/Users").await;
    assert_eq!(r.body["totalResults"], json!(2));
}
