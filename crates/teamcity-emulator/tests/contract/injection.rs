//! Locator injection: hostile usernames, emails and group names must address
//! exactly the intended object and no other.

use teamcity::{Locator, NewGroup, NewUser, UserUpdate};
use teamcity_emulator::EmulatorOptions;

use crate::{options, start_with};

fn hostile() -> Vec<String> {
    let mut v: Vec<String> = [
        "alice,id:1",
        "bob)",
        "a(b",
        "(admin)",
        "x:y:(z,a:b)",
        "$base64:YWRtaW4",
        "$base64:YWRtaW4=",
        "($base64:YWRtaW4)",
        "$any",
        "current",
        "name with spaces",
        "ünïcødé-用户",
        "a%2Fb",
        "plus+sign",
        "semi;colon&amp=",
        "user:admin",
        "id:1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.push("x".repeat(255));
    v.push(format!("{},id:1", "y".repeat(240)));
    v
}

/// A decoy named like what a broken escape would resolve to.
fn decoys() -> EmulatorOptions {
    EmulatorOptions {
        users: vec!["alice".into(), "bob".into(), "a".into(), "x".into()],
        ..options()
    }
}

#[tokio::test]
async fn usernames_address_exactly_one_user() {
    let (client, emu, _) = start_with(decoys()).await;
    for name in hostile() {
        let created = client
            .create_user(&NewUser {
                username: name.clone(),
                ..NewUser::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create {name:?}: {e}"));
        let id = created.id.expect("id");
        assert_eq!(
            created.username.as_deref(),
            Some(name.to_lowercase().as_str())
        );
        let user = Locator::by_username(&name);
        let got = client
            .get_user(&user, Some("id,username"))
            .await
            .unwrap_or_else(|e| panic!("get {name:?}: {e}"));
        assert_eq!(got.id, Some(id), "{name:?}");
        let listed = client
            .list_users(&user, Some("user(id)"))
            .await
            .expect("list");
        assert_eq!(
            listed.user.iter().filter_map(|u| u.id).collect::<Vec<_>>(),
            vec![id],
            "{name:?}"
        );

        let before = emu.snapshot();
        client
            .set_user_property(&user, "marker", &name)
            .await
            .expect("set property");
        let after = emu.snapshot();
        for (uid, u) in &after.users {
            let was = before
                .users
                .get(uid)
                .map(|b| b.properties.clone())
                .unwrap_or_default();
            if *uid == id {
                assert_eq!(u.properties.get("marker"), Some(&name));
            } else {
                assert_eq!(u.properties, was, "user {uid} changed by {name:?}");
            }
        }
    }
    // The admin was never touched.
    assert!(emu.snapshot().users[&1].properties.is_empty());
}

#[tokio::test]
async fn emails_and_properties_match_exactly() {
    let (client, emu, _) = start_with(decoys()).await;
    let emails = [
        "a,b@x.io",
        "x:(y)@z",
        "$base64:YUB4",
        "(p@q)",
        "name with space@x",
        "ü@ß.de",
    ];
    let mut ids = Vec::new();
    for (i, email) in emails.iter().enumerate() {
        let u = NewUser {
            username: format!("e{i}"),
            email: Some(email.to_string()),
            properties: vec![("scim.id".into(), email.to_string())],
            ..NewUser::default()
        };
        ids.push(
            client
                .create_user(&u)
                .await
                .expect("create")
                .id
                .expect("id"),
        );
    }
    for (email, id) in emails.iter().zip(&ids) {
        let found = client
            .list_users(&Locator::by_email(email), Some("user(id)"))
            .await
            .expect("by email");
        assert_eq!(
            found.user.iter().filter_map(|u| u.id).collect::<Vec<_>>(),
            vec![*id],
            "{email}"
        );
        let found = client
            .list_users(&Locator::by_property("scim.id", email), Some("user(id)"))
            .await
            .expect("by prop");
        assert_eq!(
            found.user.iter().filter_map(|u| u.id).collect::<Vec<_>>(),
            vec![*id],
            "{email}"
        );
    }
    assert_eq!(emu.snapshot().users.len(), 1 + 4 + emails.len());
}

#[tokio::test]
async fn group_keys_and_names_address_exactly_one_group() {
    let (client, emu, _) = start_with(EmulatorOptions {
        groups: vec!["A".into(), "K".into()],
        ..decoys()
    })
    .await;
    let member = client
        .create_user(&NewUser {
            username: "member".into(),
            ..NewUser::default()
        })
        .await
        .expect("user")
        .id
        .expect("id");
    let user = Locator::by_id(member);
    for (i, key) in hostile().into_iter().enumerate() {
        let name = format!("{key} name{i}");
        client
            .create_group(&NewGroup {
                key: key.clone(),
                name: name.clone(),
                ..NewGroup::default()
            })
            .await
            .unwrap_or_else(|e| panic!("create group {key:?}: {e}"));
        let got = client
            .get_group(&Locator::by_key(&key), Some("key,name"))
            .await
            .expect("by key");
        assert_eq!(got.key.as_deref(), Some(key.as_str()));
        let got = client
            .get_group(&Locator::by_group_name(&name), Some("key"))
            .await
            .expect("by name");
        assert_eq!(got.key.as_deref(), Some(key.as_str()));
        client.add_user_to_group(&user, &key).await.expect("add");
        client
            .remove_user_from_group(&user, &key)
            .await
            .expect("remove exactly this group");
        assert!(emu.snapshot().users[&member].groups.is_empty(), "{key:?}");
        client
            .delete_group(&Locator::by_key(&key))
            .await
            .expect("delete");
        let s = emu.snapshot();
        assert!(
            s.groups.contains_key("A")
                && s.groups.contains_key("K")
                && !s.groups.contains_key(&key),
            "{key:?}"
        );
    }
}

#[tokio::test]
async fn rename_to_hostile_username_keeps_other_users() {
    let (client, emu, _) = start_with(decoys()).await;
    let id = client
        .create_user(&NewUser {
            username: "target".into(),
            ..NewUser::default()
        })
        .await
        .expect("create")
        .id
        .expect("id");
    for name in hostile() {
        client
            .update_user(
                &Locator::by_id(id),
                &UserUpdate {
                    username: Some(name.clone()),
                    ..UserUpdate::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("rename to {name:?}: {e}"));
        assert_eq!(emu.snapshot().users[&id].username, name.to_lowercase());
    }
    let names: Vec<String> = emu
        .snapshot()
        .users
        .values()
        .map(|u| u.username.clone())
        .collect();
    for decoy in ["admin", "alice", "bob", "a", "x"] {
        assert!(names.contains(&decoy.to_string()), "{decoy} survived");
    }
}

#[tokio::test]
async fn the_emulator_parses_unescaped_values_like_teamcity() {
    // What a naive client would send: proof that the emulator's parser is strict,
    // so the escaping above is what makes the tests pass.
    let (_client, _emu, base) = start_with(decoys()).await;
    let http = reqwest::Client::new();
    let get = |loc: &str| {
        http.get(format!(
            "{base}/app/rest/users?locator={}&fields=user(username)",
            loc.replace(',', "%2C")
                .replace('(', "%28")
                .replace(')', "%29")
                .replace('$', "%24")
        ))
        .bearer_auth(crate::TOKEN)
        .header("Accept", "application/json")
        .send()
    };
    // `username:alice,id:1` becomes two filters: alice AND id 1 -> nobody.
    let resp = get("username:alice,id:1").await.expect("send");
    assert_eq!(resp.status(), 200);
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["user"], serde_json::json!([]));
    // An unbalanced parenthesis is a locator syntax error.
    let resp = get("username:a(b").await.expect("send");
    assert_eq!(resp.status(), 400);
    let text = resp.text().await.expect("body");
    assert!(text.contains("LocatorProcessException"), "{text}");
    // A value starting with $base64: is decoded: this finds "admin".
    let resp = get("username:$base64:YWRtaW4").await.expect("send");
    let body: serde_json::Value = resp.json().await.expect("json");
    assert_eq!(body["user"][0]["username"], "admin");
}
