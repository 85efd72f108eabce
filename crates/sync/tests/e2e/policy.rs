//! (1) Policy: externalId / id / displayName rules, the defaults group, caps by userType.

use sync::{DEFAULTS_GROUP_KEY, group_key};

use crate::support::{World, cfg, roles};

#[tokio::test]
async fn rules_match_by_external_id_id_and_display_name() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let by_ext = w.create_group("Developers", Some("00g-dev"), &[&ann]).await;
    let by_id = w.create_group("Release", None, &[&ann]).await;
    let by_name = w.create_group("Mobile", None, &[&ann]).await;
    let unmatched = w.create_group("Book club", None, &[&ann]).await;
    // A policy naming the SCIM id assigned above, and a displayName rule.
    let policy = format!(
        r#"
[[groups]]
match = {{ externalId = "00g-dev" }}
roles = ["PROJECT_DEVELOPER@p:Backend"]
[[groups]]
match = {{ id = "{by_id}" }}
roles = ["PROJECT_ADMIN@p:Frontend"]
[[groups]]
name = "mobile"
match = {{ displayName = "Mobile" }}
roles = ["PROJECT_DEVELOPER@p:Mobile"]
"#
    );
    let engine = w.engine_with(&policy, cfg());
    engine.drain().await.expect("drain");

    let s = w.emu.snapshot();
    let g = |id: &str| s.groups.get(&group_key(id, 0)).expect("group").clone();
    assert_eq!(g(&by_ext).roles, roles(&["PROJECT_DEVELOPER@p:Backend"]));
    assert_eq!(g(&by_ext).name, "Developers");
    assert_eq!(g(&by_id).roles, roles(&["PROJECT_ADMIN@p:Frontend"]));
    assert_eq!(g(&by_name).roles, roles(&["PROJECT_DEVELOPER@p:Mobile"]));
    assert!(g(&unmatched).roles.is_empty(), "no rule, no roles");
    let user = w.tc_user("ann").expect("ann");
    for id in [&by_ext, &by_id, &by_name, &unmatched] {
        assert!(user.groups.contains(&group_key(id, 0)), "member of {id}");
    }
    assert!(user.roles.is_empty(), "roles come through groups only");
    assert_eq!(
        w.store.pins().await.expect("pins").get("mobile"),
        Some(&by_name),
        "a displayName rule is pinned at first match"
    );
}

#[tokio::test]
async fn defaults_group_holds_every_active_managed_user_never_all_users() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    w.drain().await;
    w.set_active(&bob, false).await;
    w.drain().await;

    let s = w.emu.snapshot();
    let defaults = &s.groups[DEFAULTS_GROUP_KEY];
    assert_eq!(defaults.roles, roles(&["PROJECT_VIEWER@p:_Root"]));
    assert!(
        s.groups["ALL_USERS_GROUP"].roles.is_empty(),
        "defaults never go on ALL_USERS_GROUP"
    );
    let ann_tc = w.tc_user("ann").expect("ann");
    assert!(ann_tc.groups.contains(DEFAULTS_GROUP_KEY));
    let bob_tc = w.tc_user("bob").expect("bob exists, deactivated");
    assert!(bob_tc.groups.is_empty(), "inactive users are in no group");
    let admin = &s.users[&s.admin_id];
    assert!(
        !admin.groups.contains(DEFAULTS_GROUP_KEY),
        "unmanaged admin not added"
    );
    let _ = ann;
}

#[tokio::test]
async fn caps_by_user_type_keep_an_agent_inside_allowed_roles() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let bot = w.create_user("bot", Some("Agent")).await;
    let dev = w
        .create_group("Developers", Some("00g-dev"), &[&ann, &bot])
        .await;
    w.drain().await;

    let key = group_key(&dev, 0);
    let ann_tc = w.tc_user("ann").expect("ann");
    assert!(ann_tc.groups.contains(&key));
    let bot_tc = w.tc_user("bot").expect("bot");
    assert!(
        !bot_tc.groups.contains(&key),
        "the group carries PROJECT_DEVELOPER, beyond the cap: the agent stays out"
    );
    assert_eq!(
        bot_tc.roles,
        roles(&["PROJECT_VIEWER@p:Frontend"]),
        "the agent gets the allowed part of the group's roles as direct roles"
    );
    assert!(
        bot_tc.groups.contains(DEFAULTS_GROUP_KEY),
        "the defaults (PROJECT_VIEWER only) are inside the cap: the agent joins that group"
    );
    for (role, _) in &bot_tc.roles {
        assert_eq!(role, "PROJECT_VIEWER");
    }
}
