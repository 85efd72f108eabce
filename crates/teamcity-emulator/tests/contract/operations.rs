//! Every client operation, checked against the emulator's state.

use teamcity::{Locator, NewGroup, NewUser, Scope, UserField, UserUpdate};
use teamcity_emulator::{ALL_USERS_GROUP, EmulatorOptions};

use crate::{options, start, start_with};

fn new_user(username: &str) -> NewUser {
    NewUser {
        username: username.into(),
        name: Some("Jane Doe".into()),
        email: Some("jane@example.com".into()),
        properties: vec![("scim.id".into(), "00u1".into())],
        groups: vec![],
    }
}

#[tokio::test]
async fn server_info_reports_version() {
    let (client, _emu) = start().await;
    let info = client.server_info().await.expect("server info");
    assert_eq!(info.version_major, Some(2025));
    assert!(info.version.unwrap_or_default().contains("build"));
}

#[tokio::test]
async fn works_under_a_context_path() {
    let (client, emu, base) = start_with(EmulatorOptions {
        context_path: Some("/tc".into()),
        ..options()
    })
    .await;
    assert!(base.ends_with("/tc"));
    client.server_info().await.expect("server info under /tc");
    assert_eq!(emu.counters().get("GET /tc/app/rest/server"), Some(&1));
}

#[tokio::test]
async fn user_lifecycle() {
    let (client, emu) = start().await;
    let created = client
        .create_user(&new_user("Jane.Doe"))
        .await
        .expect("create");
    let id = created.id.expect("id");
    // TeamCity stores usernames lower-cased and requires (and got) a password.
    assert_eq!(created.username.as_deref(), Some("jane.doe"));
    let stored = emu.snapshot().users[&id].clone();
    assert!(stored.has_password);
    assert_eq!(
        stored.properties.get("scim.id").map(String::as_str),
        Some("00u1")
    );

    let by_name = client
        .get_user(&Locator::by_username("JANE.DOE"), None)
        .await
        .expect("by username");
    assert_eq!(by_name.id, Some(id));
    assert_eq!(by_name.email.as_deref(), Some("jane@example.com"));
    let groups = by_name.groups.expect("groups");
    assert_eq!(groups.group[0].key.as_deref(), Some(ALL_USERS_GROUP));

    let user = Locator::by_id(id);
    let update = UserUpdate {
        username: Some("jane.smith".into()),
        name: Some("Jane Smith".into()),
        email: None,
    };
    let updated = client.update_user(&user, &update).await.expect("update");
    assert_eq!(updated.username.as_deref(), Some("jane.smith"));
    assert_eq!(
        emu.snapshot().users[&id].email.as_deref(),
        Some("jane@example.com")
    );

    client
        .set_user_field(&user, UserField::Email, Some("js@example.com"))
        .await
        .expect("set email");
    client
        .set_user_field(&user, UserField::Name, None)
        .await
        .expect("clear name");
    let s = emu.snapshot();
    assert_eq!(s.users[&id].email.as_deref(), Some("js@example.com"));
    assert_eq!(s.users[&id].name, None);

    client
        .set_user_property(&user, "scim.active", "false")
        .await
        .expect("set prop");
    client
        .delete_user_property(&user, "scim.id")
        .await
        .expect("delete prop");
    let props = &emu.snapshot().users[&id].properties;
    assert_eq!(props.get("scim.active").map(String::as_str), Some("false"));
    assert!(!props.contains_key("scim.id"));

    let found = client
        .list_users(
            &Locator::by_property("scim.active", "false"),
            Some("user(id)"),
        )
        .await
        .expect("by prop");
    assert_eq!(
        found.user.iter().map(|u| u.id).collect::<Vec<_>>(),
        vec![Some(id)]
    );
    let by_email = client
        .list_users(&Locator::by_email("js@example.com"), Some("user(id)"))
        .await
        .expect("by email");
    assert_eq!(by_email.user.len(), 1);

    client.delete_user(&user).await.expect("delete");
    assert!(!emu.snapshot().users.contains_key(&id));
    assert!(client.find_user(&user, None).await.expect("find").is_none());
}

#[tokio::test]
async fn group_lifecycle_with_roles_and_members() {
    let (client, emu) = start().await;
    let a = client
        .create_user(&new_user("a"))
        .await
        .expect("a")
        .id
        .expect("id");
    let b = client
        .create_user(&new_user("b"))
        .await
        .expect("b")
        .id
        .expect("id");
    let group = NewGroup {
        key: "DEVS".into(),
        name: "Developers".into(),
        description: Some("managed".into()),
        roles: vec![("PROJECT_DEVELOPER".into(), Scope::Project("Backend".into()))],
        members: vec![a, b],
        properties: vec![("scim.id".into(), "g1".into())],
    };
    let created = client.create_group(&group).await.expect("create group");
    assert_eq!(created.key.as_deref(), Some("DEVS"));
    let s = emu.snapshot();
    assert!(s.users[&a].groups.contains("DEVS") && s.users[&b].groups.contains("DEVS"));
    assert!(
        s.groups["DEVS"]
            .roles
            .contains(&("PROJECT_DEVELOPER".into(), "p:Backend".into()))
    );

    let listed = client
        .list_groups(Some("group(key,users(user(id)))"))
        .await
        .expect("list groups");
    let devs = listed
        .group
        .iter()
        .find(|g| g.key.as_deref() == Some("DEVS"))
        .expect("devs listed");
    let mut members: Vec<u64> = devs
        .users
        .as_ref()
        .expect("users")
        .user
        .iter()
        .filter_map(|u| u.id)
        .collect();
    members.sort_unstable();
    assert_eq!(members, vec![a, b]);

    let key = Locator::by_key("DEVS");
    let fetched = client.get_group(&key, None).await.expect("get group");
    assert_eq!(
        fetched.properties.expect("props").get("scim.id"),
        Some("g1")
    );

    client
        .set_group_property(&key, "scim.name", "Developers")
        .await
        .expect("set");
    client
        .delete_group_property(&key, "scim.id")
        .await
        .expect("delete");
    let props = emu.snapshot().groups["DEVS"].properties.clone();
    assert_eq!(
        props.into_iter().collect::<Vec<_>>(),
        vec![("scim.name".to_string(), "Developers".to_string())]
    );

    client
        .add_group_role(&key, "PROJECT_VIEWER", &Scope::Global)
        .await
        .expect("add role");
    client
        .remove_group_role(&key, "PROJECT_DEVELOPER", &Scope::Project("Backend".into()))
        .await
        .expect("remove role");
    let roles = client.group_roles(&key).await.expect("roles");
    assert_eq!(roles.len(), 1);
    assert_eq!(
        (roles[0].role_id.as_str(), roles[0].scope.as_str()),
        ("PROJECT_VIEWER", "g")
    );

    client.delete_group(&key).await.expect("delete group");
    let s = emu.snapshot();
    assert!(!s.groups.contains_key("DEVS") && !s.users[&a].groups.contains("DEVS"));
    assert!(client.find_group(&key, None).await.expect("find").is_none());
}

#[tokio::test]
async fn membership_add_remove_replace() {
    let (client, emu, _) = start_with(EmulatorOptions {
        groups: vec!["G1".into(), "G2".into(), "G3".into()],
        ..options()
    })
    .await;
    let id = client
        .create_user(&new_user("m"))
        .await
        .expect("create")
        .id
        .expect("id");
    let user = Locator::by_id(id);
    client.add_user_to_group(&user, "G1").await.expect("add");
    client
        .add_user_to_group(&user, "G1")
        .await
        .expect("add again is a no-op");
    client.add_user_to_group(&user, "G2").await.expect("add");
    client
        .remove_user_from_group(&user, "G1")
        .await
        .expect("remove");
    assert_eq!(
        emu.snapshot().users[&id]
            .groups
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["G2".to_string()]
    );
    let err = client
        .remove_user_from_group(&user, "G1")
        .await
        .expect_err("not a member");
    assert!(err.is_not_found());

    let groups = client
        .set_user_groups(&user, &["G3"])
        .await
        .expect("replace");
    let keys: Vec<_> = groups.group.iter().filter_map(|g| g.key.clone()).collect();
    assert_eq!(keys, vec![ALL_USERS_GROUP.to_string(), "G3".to_string()]);
    assert_eq!(
        emu.snapshot().users[&id]
            .groups
            .iter()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["G3".to_string()]
    );
    let all = client.user_groups(&user).await.expect("groups");
    assert_eq!(all.group.len(), 2);
}

#[tokio::test]
async fn user_roles_and_role_list() {
    let (client, emu) = start().await;
    let roles = client.list_roles().await.expect("roles");
    let ids: Vec<_> = roles.iter().map(|r| r.id.as_str()).collect();
    assert!(ids.contains(&"SYSTEM_ADMIN") && ids.contains(&"PROJECT_DEVELOPER"));

    let id = client
        .create_user(&new_user("r"))
        .await
        .expect("create")
        .id
        .expect("id");
    let user = Locator::by_id(id);
    let backend = Scope::Project("Backend".into());
    client
        .add_user_role(&user, "PROJECT_ADMIN", &backend)
        .await
        .expect("add");
    client
        .add_user_role(&user, "PROJECT_ADMIN", &backend)
        .await
        .expect("idempotent");
    client
        .add_user_role(&user, "AGENT_MANAGER", &Scope::Global)
        .await
        .expect("add global");
    assert_eq!(client.user_roles(&user).await.expect("list").len(), 2);
    client
        .remove_user_role(&user, "AGENT_MANAGER", &Scope::Global)
        .await
        .expect("remove");
    let stored = emu.snapshot().users[&id].roles.clone();
    assert_eq!(
        stored.into_iter().collect::<Vec<_>>(),
        vec![("PROJECT_ADMIN".to_string(), "p:Backend".to_string())]
    );

    // Role inclusion: PROJECT_ADMIN includes PROJECT_DEVELOPER for the role filter.
    let filter = Locator::new().nested(
        "role",
        &Locator::new()
            .nested("scope", &Locator::new().value("p", "Backend"))
            .nested("role", &Locator::new().value("id", "PROJECT_DEVELOPER")),
    );
    let found = client
        .list_users(&filter, Some("user(id)"))
        .await
        .expect("role filter");
    assert_eq!(
        found.user.iter().filter_map(|u| u.id).collect::<Vec<_>>(),
        vec![id]
    );

    let err = client
        .add_user_role(&user, "PROJECT_ADMIN", &Scope::Project("Nope".into()))
        .await
        .expect_err("unknown project");
    assert!(err.is_not_found());
    let err = client
        .add_user_role(&user, "NO_SUCH_ROLE", &Scope::Global)
        .await
        .expect_err("unknown role");
    assert!(err.is_not_found());
}

#[tokio::test]
async fn tokens_are_listed_and_revoked() {
    let (client, emu, base) = start_with(options()).await;
    let id = client
        .create_user(&new_user("t"))
        .await
        .expect("create")
        .id
        .expect("id");
    let http = reqwest::Client::new();
    for name in ["ci", "laptop token", "ü,(x)"] {
        let resp = http
            .post(format!("{base}/app/rest/users/id:{id}/tokens"))
            .bearer_auth(crate::TOKEN)
            .header("Accept", "application/json")
            .json(&serde_json::json!({ "name": name }))
            .send()
            .await
            .expect("create token");
        assert_eq!(resp.status(), 200);
        let body: serde_json::Value = resp.json().await.expect("json");
        assert!(body["value"].as_str().is_some_and(|v| !v.is_empty()));
    }
    let user = Locator::by_id(id);
    let tokens = client.list_tokens(&user).await.expect("list");
    assert_eq!(tokens.len(), 3);
    assert!(tokens.iter().all(|t| t.creation_time.is_some()));
    assert_eq!(
        client.revoke_all_tokens(&user).await.expect("revoke"),
        vec!["ci", "laptop token", "ü,(x)"]
    );
    assert!(emu.snapshot().users[&id].tokens.is_empty());
    assert!(
        client
            .delete_token(&user, "a/b")
            .await
            .expect_err("slash refused")
            .kind()
            == teamcity::ErrorKind::Permanent
    );
}

#[tokio::test]
async fn projects_are_listed_and_validated() {
    let (client, _emu) = start().await;
    let ids: Vec<_> = client
        .list_projects()
        .await
        .expect("projects")
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids, vec!["_Root", "Backend", "Frontend"]);
    assert!(client.project_exists("Backend").await.expect("exists"));
    assert!(!client.project_exists("Nope").await.expect("missing"));
    assert!(client.project_exists("a,b").await.is_err());
}

#[tokio::test]
async fn password_set_and_randomized() {
    let (client, emu) = start().await;
    let id = client
        .create_user(&new_user("pw.user"))
        .await
        .expect("create")
        .id
        .expect("id");
    let user = Locator::by_id(id);
    assert_eq!(emu.snapshot().users[&id].password_changes, 1);

    client
        .set_user_password(&user, "correct horse battery staple")
        .await
        .expect("set password");
    client
        .randomize_password(&user)
        .await
        .expect("random password");
    let stored = emu.snapshot().users[&id].clone();
    assert!(stored.has_password);
    assert_eq!(stored.password_changes, 3);
    assert_eq!(
        emu.counters().get("PUT /app/rest/users/{u}/{field}"),
        Some(&2)
    );

    // An empty password is refused before any request goes out.
    let err = client
        .set_user_password(&user, "")
        .await
        .expect_err("empty password");
    assert!(matches!(err, teamcity::TeamCityError::InvalidInput(_)));
    // An unknown user is TeamCity's masked 404.
    let err = client
        .randomize_password(&Locator::by_id(999))
        .await
        .expect_err("unknown user");
    assert!(err.is_not_found());
}

/// `POST /users` with `groups`: joined right after the account is created, as
/// `DataUpdater.modify` does; a group key that does not exist answers 404 but the user exists,
/// with the properties it was created with.
#[tokio::test]
async fn create_user_joins_groups_and_keeps_the_user_when_a_group_is_missing() {
    let (client, emu) = start().await;
    client
        .create_group(&teamcity::NewGroup {
            key: "DEVS".into(),
            name: "Developers".into(),
            ..teamcity::NewGroup::default()
        })
        .await
        .expect("group");
    let u = client
        .create_user(&NewUser {
            groups: vec!["DEVS".into()],
            ..new_user("joins")
        })
        .await
        .expect("create with groups");
    let id = u.id.expect("id");
    assert!(emu.snapshot().users[&id].groups.contains("DEVS"));

    let err = client
        .create_user(&NewUser {
            groups: vec!["NO_SUCH_GROUP".into()],
            properties: vec![("scim.id".into(), "00u2".into())],
            ..new_user("half")
        })
        .await
        .expect_err("unknown group");
    assert!(err.is_not_found(), "{err}");
    let s = emu.snapshot();
    let half = s
        .user_by_username("half")
        .expect("the user was created anyway");
    assert_eq!(
        half.properties.get("scim.id").map(String::as_str),
        Some("00u2")
    );
    assert!(half.groups.is_empty());
}
