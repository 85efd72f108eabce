//! Paging through 10,000 users with `fields=` limited, and the HTTP surface
//! a curl user sees.

use std::time::Instant;

use teamcity::Locator;

use crate::start;

#[tokio::test]
async fn pages_through_ten_thousand_users() {
    let (client, emu) = start().await;
    emu.with_state(|s| {
        for i in 0..10_000 {
            let id = s.insert_user(&format!("user{i:05}"), Some("N"), Some("n@example.com"));
            s.users
                .get_mut(&id)
                .expect("inserted")
                .properties
                .insert("scim.id".into(), format!("s{i}"));
        }
    });
    emu.reset_counters();
    let started = Instant::now();
    let users = client
        .list_all_users(
            500,
            "count,user(id,username,properties(property(name,value)))",
        )
        .await
        .expect("page");
    assert_eq!(users.len(), 10_001);
    let mut ids: Vec<u64> = users.iter().filter_map(|u| u.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 10_001, "no duplicates across pages");
    // fields= limited: no email, no href.
    assert!(
        users
            .iter()
            .all(|u| u.email.is_none() && u.href.is_none() && u.username.is_some())
    );
    assert_eq!(
        users[42].properties.as_ref().and_then(|p| p.get("scim.id")),
        Some("s41")
    );
    assert_eq!(emu.counters().get("GET /app/rest/users"), Some(&21));
    assert!(started.elapsed().as_secs() < 30);

    let page = client
        .list_users(
            &Locator::new().count(10).start(9_995),
            Some("count,user(id)"),
        )
        .await
        .expect("last page");
    assert_eq!((page.count, page.user.len()), (Some(6), 6));
}

#[tokio::test]
async fn plain_http_create_and_read_like_curl() {
    let (_client, emu, base) = crate::start_with(crate::options()).await;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/app/rest/users"))
        .bearer_auth(crate::TOKEN)
        .header("Accept", "application/json")
        .header("Content-Type", "application/json")
        .body(r#"{"username":"Curl","password":"p"}"#)
        .send()
        .await
        .expect("create");
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["TeamCity-Node-Id"], "MAIN_SERVER");
    let resp = http
        .get(format!("{base}/app/rest/users/username:curl"))
        .bearer_auth(crate::TOKEN)
        .header("Accept", "application/json")
        .send()
        .await
        .expect("read");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["username"], "curl");
    assert_eq!(body["groups"]["group"][0]["key"], "ALL_USERS_GROUP");

    let resp = http
        .get(format!("{base}/app/rest/users"))
        .send()
        .await
        .expect("no auth");
    assert_eq!(resp.status(), 401);
    assert!(
        resp.text()
            .await
            .expect("text")
            .starts_with("Authentication required")
    );
    let resp = http
        .get(format!("{base}/app/rest/users"))
        .bearer_auth(crate::TOKEN)
        .send()
        .await
        .expect("no accept");
    assert_eq!(resp.status(), 406);
    let resp = http
        .post(format!("{base}/app/rest/users"))
        .bearer_auth(crate::TOKEN)
        .header("Accept", "application/json")
        .body("{}")
        .send()
        .await
        .expect("no content type");
    assert_eq!(resp.status(), 415);

    let state: serde_json::Value = http
        .get(format!("{base}/__emulator/state"))
        .send()
        .await
        .expect("dump")
        .json()
        .await
        .expect("json");
    assert!(state["users"].as_object().expect("users").len() >= 2);
    let counters: serde_json::Value = http
        .get(format!("{base}/__emulator/counters"))
        .send()
        .await
        .expect("counters")
        .json()
        .await
        .expect("json");
    // Calls rejected by content negotiation count; calls rejected by auth do not.
    assert_eq!(counters["POST /app/rest/users"], 2);
    assert_eq!(emu.total_calls(), 4);
}
