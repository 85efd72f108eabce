//! Tokens that authenticate, server links, the `/latest` alias, sessions, pinned
//! locators, permanent faults and restoring an earlier state.

use serde_json::{Value as Json, json};
use teamcity::{ErrorKind, Locator, NewGroup, NewUser, Scope, UserUpdate};
use teamcity_emulator::{EmulatorOptions, Fault, FaultAction};

use crate::{TOKEN, client_for, options, start, start_with};

fn new_user(username: &str) -> NewUser {
    NewUser {
        username: username.into(),
        ..NewUser::default()
    }
}

async fn raw(
    method: reqwest::Method,
    url: &str,
    token: &str,
    accept: Option<&str>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .request(method, url)
        .bearer_auth(token);
    if let Some(a) = accept {
        req = req.header("Accept", a);
    }
    req.send().await.expect("send")
}

/// Issues a token for user `id` over REST and returns its value.
async fn issue_token(base: &str, id: u64, name: &str) -> String {
    let resp = reqwest::Client::new()
        .post(format!("{base}/app/rest/users/id:{id}/tokens"))
        .bearer_auth(TOKEN)
        .header("Accept", "application/json")
        .json(&json!({ "name": name }))
        .send()
        .await
        .expect("create token");
    assert_eq!(resp.status(), 200);
    let body: Json = resp.json().await.expect("json");
    body["value"].as_str().expect("value").to_owned()
}

async fn current_username(base: &str, token: &str) -> Result<String, u16> {
    let resp = raw(
        reqwest::Method::GET,
        &format!("{base}/app/rest/users/current"),
        token,
        Some("application/json"),
    )
    .await;
    if resp.status() != 200 {
        return Err(resp.status().as_u16());
    }
    let body: Json = resp.json().await.expect("json");
    Ok(body["username"].as_str().expect("username").to_owned())
}

#[tokio::test]
async fn issued_tokens_look_like_teamcity_s_and_authenticate_until_deleted() {
    let (admin, emu, base) = start_with(options()).await;
    let alice = admin
        .create_user(&new_user("alice"))
        .await
        .expect("alice")
        .id
        .expect("id");
    let bob = admin
        .create_user(&new_user("bob"))
        .await
        .expect("bob")
        .id
        .expect("id");
    let value = issue_token(&base, alice, "laptop").await;

    let parts: Vec<&str> = value.split('.').collect();
    assert_eq!(parts.len(), 3, "{value}");
    assert_eq!(
        parts[0], "eyJ0eXAiOiAiVENWMiJ9",
        "base64 of {{\"typ\": \"TCV2\"}}"
    );
    for part in &parts[1..] {
        assert!(
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'),
            "{part}"
        );
    }
    // The value is never kept, only its digest.
    let stored = emu.snapshot().users[&alice].tokens[0].clone();
    assert!(
        stored
            .value_sha256
            .as_deref()
            .is_some_and(|d| d.len() == 64)
    );
    assert!(
        !serde_json::to_string(&emu.snapshot())
            .expect("dump")
            .contains(&value)
    );

    // The token is alice: `current`, reads, and her own tokens and sessions.
    assert_eq!(current_username(&base, &value).await, Ok("alice".into()));
    let as_alice = client_for(&base, &value);
    let me = as_alice
        .get_user(&Locator::by_username("bob"), Some("id"))
        .await
        .expect("a user may read");
    assert_eq!(me.id, Some(bob));
    as_alice
        .logout_user(&Locator::by_id(alice))
        .await
        .expect("her own sessions");
    // Writes to other users and creating users are refused.
    let err = as_alice
        .set_user_property(&Locator::by_id(bob), "p", "v")
        .await
        .expect_err("not her user");
    assert_eq!(err.kind(), ErrorKind::Forbidden);
    assert!(!err.is_misconfiguration());
    let err = as_alice
        .create_user(&new_user("mallory"))
        .await
        .expect_err("no CREATE_USER");
    assert_eq!(err.kind(), ErrorKind::Forbidden);
    assert!(emu.snapshot().users[&bob].properties.is_empty());

    // Deleted: the same value is now as unknown as any other.
    admin
        .delete_token(&Locator::by_id(alice), "laptop")
        .await
        .expect("delete");
    assert_eq!(current_username(&base, &value).await, Err(401));
    let err = as_alice.server_info().await.expect_err("revoked");
    assert_eq!(err.kind(), ErrorKind::Unauthorized);
    assert!(err.is_misconfiguration());
}

#[tokio::test]
async fn a_token_of_a_system_admin_may_write_and_dies_with_its_user() {
    let (admin, _emu, base) = start_with(options()).await;
    let ops = admin
        .create_user(&new_user("ops"))
        .await
        .expect("ops")
        .id
        .expect("id");
    let value = issue_token(&base, ops, "ci").await;
    let as_ops = client_for(&base, &value);
    assert_eq!(
        as_ops
            .create_user(&new_user("x"))
            .await
            .expect_err("not yet admin")
            .kind(),
        ErrorKind::Forbidden
    );
    admin
        .add_user_role(&Locator::by_id(ops), "SYSTEM_ADMIN", &Scope::Global)
        .await
        .expect("grant");
    as_ops
        .create_user(&new_user("x"))
        .await
        .expect("a global SYSTEM_ADMIN writes");
    // A project-scoped role is not enough; a group's global SYSTEM_ADMIN is.
    admin
        .remove_user_role(&Locator::by_id(ops), "SYSTEM_ADMIN", &Scope::Global)
        .await
        .expect("revoke");
    admin
        .add_user_role(
            &Locator::by_id(ops),
            "PROJECT_ADMIN",
            &Scope::Project("Backend".into()),
        )
        .await
        .expect("project role");
    assert!(as_ops.create_user(&new_user("y")).await.is_err());
    admin
        .create_group(&NewGroup {
            key: "ADMINS".into(),
            name: "Admins".into(),
            roles: vec![("SYSTEM_ADMIN".into(), Scope::Global)],
            members: vec![ops],
            ..NewGroup::default()
        })
        .await
        .expect("group");
    as_ops
        .create_user(&new_user("y"))
        .await
        .expect("admin through a group");

    admin
        .delete_user(&Locator::by_id(ops))
        .await
        .expect("delete user");
    assert_eq!(current_username(&base, &value).await, Err(401));
}

#[tokio::test]
async fn server_info_links_the_collections() {
    let (_client, _emu, base) = start_with(options()).await;
    let resp = raw(
        reqwest::Method::GET,
        &format!("{base}/app/rest/server"),
        TOKEN,
        Some("application/json"),
    )
    .await;
    let body: Json = resp.json().await.expect("json");
    for (field, href) in [
        ("projects", "/app/rest/projects"),
        ("vcsRoots", "/app/rest/vcs-roots"),
        ("builds", "/app/rest/builds"),
        ("users", "/app/rest/users"),
        ("userGroups", "/app/rest/userGroups"),
        ("agents", "/app/rest/agents"),
        ("buildQueue", "/app/rest/buildQueue"),
        ("agentPools", "/app/rest/agentPools"),
        ("investigations", "/app/rest/investigations"),
        ("mutes", "/app/rest/mutes"),
        ("nodes", "/app/rest/server/nodes"),
    ] {
        assert_eq!(body[field], json!({ "href": href }), "{field}");
    }
}

#[tokio::test]
async fn latest_answers_exactly_like_the_plain_root() {
    for context in [None, Some("/tc")] {
        let (_client, emu, base) = start_with(EmulatorOptions {
            context_path: context.map(str::to_owned),
            ..options()
        })
        .await;
        let get = |path: String| async move {
            let resp = raw(reqwest::Method::GET, &path, TOKEN, Some("application/json")).await;
            let status = resp.status().as_u16();
            (status, resp.text().await.expect("body"))
        };
        for path in [
            "users/id:1",
            "users?locator=username:admin",
            "userGroups",
            "projects/id:Backend",
            "users/id:999",
            "no/such/path",
        ] {
            let plain = get(format!("{base}/app/rest/{path}")).await;
            let latest = get(format!("{base}/app/rest/latest/{path}")).await;
            assert_eq!(plain, latest, "{context:?} {path}");
        }
        // Writes too.
        let resp = reqwest::Client::new()
            .post(format!("{base}/app/rest/latest/users"))
            .bearer_auth(TOKEN)
            .header("Accept", "application/json")
            .json(&json!({"username": "viaLatest", "password": "x"}))
            .send()
            .await
            .expect("post");
        assert_eq!(resp.status(), 200);
        assert!(
            emu.snapshot()
                .users
                .values()
                .any(|u| u.username == "vialatest")
        );
        // Counted under the plain route, and faults match it the same way.
        let prefix = context.unwrap_or("");
        assert_eq!(
            emu.counters()
                .get(&format!("GET {prefix}/app/rest/users/{{u}}")),
            Some(&4),
            "{:?}",
            emu.counters()
        );
        emu.inject_fault(
            Fault::any(
                1,
                FaultAction::Status {
                    status: 503,
                    retry_after_secs: None,
                },
            )
            .path_prefix(&format!("{prefix}/app/rest/users")),
        );
        let (status, _) = get(format!("{base}/app/rest/latest/users/id:1")).await;
        assert_eq!(status, 503);
    }
}

#[tokio::test]
async fn logout_and_remember_me_are_counted_and_recorded_per_user() {
    let (client, emu, base) = start_with(options()).await;
    let id = client
        .create_user(&new_user("leaver"))
        .await
        .expect("create")
        .id
        .expect("id");
    let user = Locator::by_id(id);
    client.logout_user(&user).await.expect("logout");
    client.logout_user(&user).await.expect("logout again");
    client.delete_remember_me(&user).await.expect("remember me");
    let rec = emu.snapshot().users[&id].clone();
    assert_eq!((rec.logouts, rec.remember_me_cleared), (2, 1));
    assert_eq!(emu.snapshot().users[&1].logouts, 0, "nobody else");
    let counters = emu.counters();
    assert_eq!(counters.get("POST /app/rest/users/{u}/logout"), Some(&2));
    assert_eq!(
        counters.get("DELETE /app/rest/users/{u}/debug/rememberMe"),
        Some(&1)
    );
    // The state dump shows them too.
    let dump: Json = reqwest::get(format!("{}/__emulator/state", base.trim_end_matches('/')))
        .await
        .expect("state")
        .json()
        .await
        .expect("json");
    assert_eq!(dump["users"][id.to_string()]["logouts"], 2);
    assert_eq!(dump["users"][id.to_string()]["remember_me_cleared"], 1);

    // Unknown users: TeamCity's masked 404.
    let nobody = Locator::by_id(999);
    assert!(
        client
            .logout_user(&nobody)
            .await
            .expect_err("404")
            .is_not_found()
    );
    assert!(
        client
            .delete_remember_me(&nobody)
            .await
            .expect_err("404")
            .is_not_found()
    );
    // rememberMe produces text/plain only; `logout` under GET is the `{field}` endpoint.
    let url = format!("{base}/app/rest/users/id:{id}/debug/rememberMe");
    let resp = raw(
        reqwest::Method::DELETE,
        &url,
        TOKEN,
        Some("application/json"),
    )
    .await;
    assert_eq!(resp.status(), 406);
    let url = format!("{base}/app/rest/users/id:{id}/logout");
    let resp = raw(reqwest::Method::GET, &url, TOKEN, Some("text/plain")).await;
    assert_eq!(resp.status(), 400);
    assert!(
        resp.text()
            .await
            .expect("body")
            .contains("Unknown field 'logout'")
    );
}

#[tokio::test]
async fn logout_can_be_switched_off_like_an_older_server() {
    let (client, emu, base) = start_with(EmulatorOptions {
        logout_unsupported: true,
        ..options()
    })
    .await;
    let user = Locator::by_id(1);
    let err = client.logout_user(&user).await.expect_err("older server");
    assert_eq!(err.status(), Some(404));
    assert_eq!(
        err.body().and_then(|b| b.exception.as_deref()),
        Some("javax.ws.rs.NotFoundException")
    );
    // remember-me is older and stays.
    client.delete_remember_me(&user).await.expect("remember me");

    let settings = |body: Json| {
        let url = format!("{base}/__emulator/settings");
        async move {
            let resp = reqwest::Client::new()
                .put(url)
                .json(&body)
                .send()
                .await
                .expect("put settings");
            (resp.status().as_u16(), resp.json::<Json>().await.ok())
        }
    };
    let (status, now) = settings(json!({"logout_supported": true})).await;
    assert_eq!(
        (status, now),
        (200, Some(json!({"logout_supported": true})))
    );
    assert!(emu.logout_supported());
    client.logout_user(&user).await.expect("supported now");
    emu.set_logout_supported(false);
    assert!(client.logout_user(&user).await.is_err());
    let (status, _) = settings(json!({"logout_supportd": true})).await;
    assert_eq!(status, 422, "a misspelt setting is refused");
    assert_eq!(emu.snapshot().users[&1].logouts, 1);
    assert_eq!(
        emu.counters().get("POST /app/rest/users/{u}/logout"),
        Some(&3)
    );
}

#[tokio::test]
async fn pinned_locators_reach_the_user_only_while_the_username_matches() {
    let (client, emu) = start().await;
    let alice = client
        .create_user(&new_user("alice"))
        .await
        .expect("alice")
        .id
        .expect("id");
    client
        .create_group(&NewGroup {
            key: "G".into(),
            name: "G".into(),
            ..NewGroup::default()
        })
        .await
        .expect("group");
    // Matching (case-insensitively): a read and a write.
    let pinned = Locator::user_pinned(alice, "ALICE");
    let got = client.get_user(&pinned, Some("id")).await.expect("read");
    assert_eq!(got.id, Some(alice));
    client
        .set_user_property(&pinned, "k", "v")
        .await
        .expect("write");
    assert_eq!(
        emu.snapshot().users[&alice]
            .properties
            .get("k")
            .map(String::as_str),
        Some("v")
    );

    // After a rename the old pin misses on every user path, and nothing changes.
    client
        .update_user(
            &Locator::by_id(alice),
            &UserUpdate {
                username: Some("alice2".into()),
                ..UserUpdate::default()
            },
        )
        .await
        .expect("rename");
    let stale = Locator::user_pinned(alice, "alice");
    let before = emu.snapshot();
    let mut results = vec![
        ("get", client.get_user(&stale, None).await.map(drop)),
        (
            "update",
            client
                .update_user(
                    &stale,
                    &UserUpdate {
                        name: Some("x".into()),
                        ..UserUpdate::default()
                    },
                )
                .await
                .map(drop),
        ),
        ("groups", client.user_groups(&stale).await.map(drop)),
        (
            "set groups",
            client.set_user_groups(&stale, &["G"]).await.map(drop),
        ),
        ("add group", client.add_user_to_group(&stale, "G").await),
        ("roles", client.user_roles(&stale).await.map(drop)),
        (
            "add role",
            client
                .add_user_role(&stale, "PROJECT_VIEWER", &Scope::Global)
                .await,
        ),
        (
            "remove role",
            client
                .remove_user_role(&stale, "PROJECT_VIEWER", &Scope::Global)
                .await,
        ),
        (
            "set property",
            client.set_user_property(&stale, "k", "w").await,
        ),
        (
            "delete property",
            client.delete_user_property(&stale, "k").await,
        ),
        ("tokens", client.list_tokens(&stale).await.map(drop)),
        ("delete token", client.delete_token(&stale, "t").await),
        ("password", client.randomize_password(&stale).await),
        ("logout", client.logout_user(&stale).await),
        ("remember me", client.delete_remember_me(&stale).await),
    ];
    results.push(("delete", client.delete_user(&stale).await));
    for (what, result) in results {
        let err = result.expect_err(what);
        assert_eq!(err.status(), Some(404), "{what}: {err}");
        assert_eq!(
            err.body().map(|b| b.message.as_str()),
            Some("User not found"),
            "{what}"
        );
    }
    assert_eq!(emu.snapshot(), before, "a stale pin changed nothing");
    // The fresh pin works.
    client
        .delete_user(&Locator::user_pinned(alice, "alice2"))
        .await
        .expect("delete with the current name");
    assert!(!emu.snapshot().users.contains_key(&alice));
}

#[tokio::test]
async fn faults_can_match_a_path_part_and_last_until_cleared() {
    let (client, emu, base) = start_with(options()).await;
    let id = client
        .create_user(&new_user("f"))
        .await
        .expect("create")
        .id
        .expect("id");
    let user = Locator::by_id(id);
    emu.inject_fault(
        Fault::always(FaultAction::Status {
            status: 500,
            retry_after_secs: None,
        })
        .method("PUT")
        .path_contains("/password"),
    );
    for _ in 0..5 {
        let err = client.randomize_password(&user).await.expect_err("fault");
        assert_eq!(err.status(), Some(500));
    }
    client
        .set_user_property(&user, "p", "v")
        .await
        .expect("other PUTs pass");
    assert_eq!(emu.snapshot().users[&id].password_changes, 1);
    emu.clear_faults();
    client.randomize_password(&user).await.expect("cleared");

    // Over the control API: no `times` means unlimited, and is listed without one.
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/__emulator/faults"))
        .json(&json!({"path_contains": "/tokens",
                      "action": {"kind": "status", "status": 403}}))
        .send()
        .await
        .expect("add fault");
    assert_eq!(resp.status(), 204);
    for _ in 0..4 {
        let err = client.list_tokens(&user).await.expect_err("fault");
        assert_eq!(err.kind(), ErrorKind::Forbidden);
    }
    client
        .get_user(&user, None)
        .await
        .expect("other paths pass");
    let listed: Json = http
        .get(format!("{base}/__emulator/faults"))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    assert_eq!(listed[0]["path_contains"], "/tokens");
    assert!(listed[0].get("times").is_none(), "{listed}");
    // `u32::MAX` is unlimited too; a count still runs out.
    emu.clear_faults();
    emu.inject_fault(Fault::any(u32::MAX, FaultAction::Drop).path_contains("/roles"));
    emu.inject_fault(Fault::any(2, FaultAction::Drop).path_contains("/groups"));
    for _ in 0..3 {
        assert!(client.user_roles(&user).await.is_err());
    }
    assert!(client.user_groups(&user).await.is_err());
    assert!(client.user_groups(&user).await.is_err());
    client
        .user_groups(&user)
        .await
        .expect("two uses, then gone");
}

#[tokio::test]
async fn restoring_a_snapshot_brings_back_the_whole_state() {
    let (client, emu, base) = start_with(options()).await;
    let alice = client
        .create_user(&new_user("alice"))
        .await
        .expect("alice")
        .id
        .expect("id");
    let bob = client
        .create_user(&new_user("bob"))
        .await
        .expect("bob")
        .id
        .expect("id");
    let old_token = issue_token(&base, alice, "before").await;
    client
        .logout_user(&Locator::by_id(bob))
        .await
        .expect("logout");
    let snapshot = emu.snapshot();

    // Things change under the running client.
    client
        .delete_user(&Locator::by_id(bob))
        .await
        .expect("delete");
    client
        .update_user(
            &Locator::by_id(alice),
            &UserUpdate {
                username: Some("alicia".into()),
                ..UserUpdate::default()
            },
        )
        .await
        .expect("rename");
    let carol = client
        .create_user(&new_user("carol"))
        .await
        .expect("carol")
        .id
        .expect("id");
    client
        .delete_token(&Locator::by_id(alice), "before")
        .await
        .expect("revoke");
    let new_token = issue_token(&base, carol, "after").await;
    assert_ne!(emu.snapshot(), snapshot);

    emu.restore(snapshot.clone()).expect("restore");
    assert_eq!(emu.snapshot(), snapshot);
    assert_eq!(
        current_username(&base, &old_token).await,
        Ok("alice".into())
    );
    assert_eq!(current_username(&base, &new_token).await, Err(401));
    // The id counter came back too: the next user gets carol's id again.
    let again = client
        .create_user(&new_user("dave"))
        .await
        .expect("dave")
        .id
        .expect("id");
    assert_eq!(again, carol);
    // Lookups by username use the restored names.
    assert!(
        client
            .find_user(&Locator::by_username("alicia"), None)
            .await
            .expect("find")
            .is_none()
    );
    assert!(
        client
            .find_user(&Locator::by_username("bob"), None)
            .await
            .expect("find")
            .is_some()
    );

    // Over HTTP: PUT takes exactly what GET returned.
    let http = reqwest::Client::new();
    let state_url = format!("{base}/__emulator/state");
    let dumped: Json = http
        .get(&state_url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    client
        .delete_user(&Locator::by_id(again))
        .await
        .expect("delete dave");
    let resp = http
        .put(&state_url)
        .json(&dumped)
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 204);
    let back: Json = http
        .get(&state_url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(back, dumped);
    // An inconsistent state is refused and changes nothing.
    let mut broken = dumped.clone();
    broken["next_user_id"] = json!(1);
    let resp = http
        .put(&state_url)
        .json(&broken)
        .send()
        .await
        .expect("put");
    assert_eq!(resp.status(), 400);
    assert!(resp.text().await.expect("body").contains("next_user_id"));
    let still: Json = http
        .get(&state_url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(still, dumped);
}
