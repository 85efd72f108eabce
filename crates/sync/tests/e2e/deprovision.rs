//! (4) Deprovisioning: active=false, reactivation, SCIM DELETE (strip / delete), group DELETE.

use crate::support::{POLICY, World, cfg, give_tokens};
use serde_json::json;
use sync::{
    DEFAULTS_GROUP_KEY, Deprovision, EngineConfig, USER_DEACTIVATED, USER_MARKER, group_key,
};

#[tokio::test]
async fn deactivation_strips_groups_roles_tokens_and_password() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let bot = w.create_user("bot", Some("Agent")).await;
    w.create_group("Developers", Some("00g-dev"), &[&ann, &bot])
        .await;
    w.create_group("Ops", Some("00g-ops"), &[&ann]).await;
    w.drain().await;
    give_tokens(&w, "ann", 3);
    give_tokens(&w, "bot", 1);
    let bot_before = w.tc_user("bot").expect("bot");
    assert!(
        !bot_before.roles.is_empty(),
        "capped user has per-user roles"
    );
    let ann_before = w.tc_user("ann").expect("ann");
    assert_eq!(ann_before.groups.len(), 3);

    w.set_active(&ann, false).await;
    w.set_active(&bot, false).await;
    w.drain().await;

    for (name, before) in [("ann", &ann_before), ("bot", &bot_before)] {
        let u = w.tc_user(name).expect("the user stays");
        assert_eq!(u.id, before.id);
        assert!(
            u.groups.is_empty(),
            "{name} left every managed group: {:?}",
            u.groups
        );
        assert!(u.roles.is_empty(), "{name} lost per-user roles");
        assert!(u.tokens.is_empty(), "{name}: every token revoked");
        assert_eq!(
            u.password_changes,
            before.password_changes + 1,
            "{name}: password randomised"
        );
        assert_eq!(
            u.properties.get(USER_DEACTIVATED).map(String::as_str),
            Some("true")
        );
        assert!(u.properties.contains_key(USER_MARKER));
    }
    // A second pass does nothing more.
    w.emu.reset_counters();
    w.engine.reconcile(false).await.expect("reconcile");
    assert_eq!(w.writes(), 0, "{:?}", w.emu.counters());
}

#[tokio::test]
async fn reactivation_recomputes_groups_from_the_current_directory() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let dev = w.create_group("Developers", Some("00g-dev"), &[&ann]).await;
    let ops = w.create_group("Ops", Some("00g-ops"), &[]).await;
    w.drain().await;
    w.set_active(&ann, false).await;
    w.drain().await;
    // While Ann is inactive, the IdP moves her from Developers to Ops.
    w.okta_patch_group(
        &dev,
        "Developers",
        vec![json!({"op": "remove", "path": format!("members[value eq \"{ann}\"]")})],
    )
    .await;
    w.okta_patch_group(
        &ops,
        "Ops",
        vec![json!({"op": "add", "path": "members", "value": [{"value": ann}]})],
    )
    .await;
    w.drain().await;
    assert!(w.tc_user("ann").expect("ann").groups.is_empty());

    w.set_active(&ann, true).await;
    w.drain().await;
    let u = w.tc_user("ann").expect("ann");
    let want: std::collections::BTreeSet<String> =
        [group_key(&ops, 0), DEFAULTS_GROUP_KEY.to_owned()]
            .into_iter()
            .collect();
    assert_eq!(u.groups, want, "no stale membership of Developers");
    assert!(!u.properties.contains_key(USER_DEACTIVATED));
}

#[tokio::test]
async fn scim_delete_with_strip_keeps_the_user_without_access() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    w.create_group("Developers", Some("00g-dev"), &[&ann]).await;
    w.drain().await;
    give_tokens(&w, "ann", 2);
    let before = w.tc_user("ann").expect("ann");
    w.delete(&format!("/Users/{ann}")).await;
    w.drain().await;
    let u = w.tc_user("ann").expect("strip keeps the user");
    assert_eq!(u.id, before.id);
    assert!(u.groups.is_empty() && u.roles.is_empty() && u.tokens.is_empty());
    assert_eq!(u.password_changes, before.password_changes + 1);
    assert_eq!(
        u.properties.get(USER_DEACTIVATED).map(String::as_str),
        Some("true")
    );
}

#[tokio::test]
async fn scim_delete_with_deprovision_delete_deletes_the_user() {
    let w = World::with(
        POLICY,
        EngineConfig {
            deprovision: Deprovision::Delete,
            ..cfg()
        },
    )
    .await;
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    w.create_group("Developers", Some("00g-dev"), &[&ann, &bob])
        .await;
    w.drain().await;
    w.delete(&format!("/Users/{ann}")).await;
    w.drain().await;
    assert!(w.tc_user("ann").is_none(), "deleted in TeamCity");
    assert!(w.tc_user("bob").is_some());
    assert_eq!(w.emu.counters().get("DELETE /app/rest/users/{u}"), Some(&1));
}

#[tokio::test]
async fn group_delete_deletes_the_teamcity_group() {
    let w = World::start().await;
    let ann = w.create_user("ann", None).await;
    let dev = w.create_group("Developers", Some("00g-dev"), &[&ann]).await;
    w.drain().await;
    assert!(w.tc_group("Developers").is_some());
    w.delete(&format!("/Groups/{dev}")).await;
    w.drain().await;
    assert!(w.tc_group("Developers").is_none());
    assert!(!w.emu.snapshot().groups.contains_key(&group_key(&dev, 0)));
    let u = w.tc_user("ann").expect("ann stays");
    assert_eq!(
        u.groups.len(),
        1,
        "only the defaults group left: {:?}",
        u.groups
    );
}
