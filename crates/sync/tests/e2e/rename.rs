//! (5) Rename safety: a two-call swap, never a member without roles, not counted by the guard;
//! a displayName rule stays pinned and raises an alert.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use sync::{EngineConfig, GuardLimits, group_key};

use crate::support::{World, cfg, roles};

#[tokio::test]
async fn group_rename_is_exactly_two_calls_and_not_counted_by_the_guard() {
    // The guard would hold any batch removing access from more than one user.
    let w = World::with(
        crate::support::POLICY,
        EngineConfig {
            limits: GuardLimits {
                max_removals: Some(1),
                max_removals_percent: Some(1),
            },
            ..cfg()
        },
    )
    .await;
    let mut members = vec![];
    for n in 0..6 {
        members.push(w.create_user(&format!("u{n}"), None).await);
    }
    let refs: Vec<&str> = members.iter().map(String::as_str).collect();
    let dev = w.create_group("Developers", Some("00g-dev"), &refs).await;
    w.drain().await;
    let old_key = group_key(&dev, 0);
    let seq_before = w
        .store
        .audit_events(0, 1_000_000)
        .await
        .expect("audit")
        .len();
    w.emu.reset_counters();

    w.okta_patch_group(&dev, "Platform Engineering", vec![])
        .await;
    let r = w.drain().await;
    assert_eq!(r.held, 0, "a swap is not a removal: {r:?}");
    assert!(w.store.list_held(None).await.expect("held").is_empty());
    let c = w.emu.counters();
    assert_eq!(w.writes(), 2, "{c:?}");
    assert_eq!(c.get("POST /app/rest/userGroups"), Some(&1), "{c:?}");
    assert_eq!(c.get("DELETE /app/rest/userGroups/{g}"), Some(&1), "{c:?}");

    let s = w.emu.snapshot();
    let new_key = group_key(&dev, 1);
    assert!(!s.groups.contains_key(&old_key));
    let g = &s.groups[&new_key];
    assert_eq!(g.name, "Platform Engineering");
    assert_eq!(
        g.roles,
        roles(&["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"])
    );
    for n in 0..6 {
        assert!(
            w.tc_user(&format!("u{n}"))
                .expect("user")
                .groups
                .contains(&new_key)
        );
    }
    // Create (with roles and members in one call) came before the delete: at no moment was
    // a member without the group's roles.
    let events = w.store.audit_events(0, 1_000_000).await.expect("audit");
    let tc: Vec<&str> = events[seq_before..]
        .iter()
        .filter(|e| e.resource_type == "TeamCity")
        .map(|e| e.operation.as_str())
        .collect();
    assert_eq!(tc, ["create_group", "delete_group"]);
    let create = events[seq_before..]
        .iter()
        .find(|e| e.operation == "create_group")
        .expect("create");
    let detail: serde_json::Value = serde_json::from_str(&create.detail).expect("json");
    assert_eq!(detail["members"], 6, "{detail}");
    assert_eq!(
        detail["roles"].as_array().map(Vec::len),
        Some(2),
        "{detail}"
    );
}

#[derive(Debug, Default)]
struct Count(AtomicU64);

impl CounterFn for Count {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.store(value, Ordering::Relaxed);
    }
}

/// Counts `teamcity_scim_policy_alerts_total` increments.
#[derive(Debug, Default)]
struct Alerts(Arc<Count>);

impl Recorder for Alerts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        if key.name() == "teamcity_scim_policy_alerts_total" {
            Counter::from_arc(self.0.clone())
        } else {
            Counter::noop()
        }
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

/// One rule matching the group named "Mobile".
const MOBILE_BY_NAME: &str = r#"
[[groups]]
name = "mobile"
match = { displayName = "Mobile" }
roles = ["PROJECT_DEVELOPER@p:Mobile"]
"#;

#[tokio::test(flavor = "current_thread")]
async fn display_name_rule_is_pinned_and_a_rename_alerts_without_losing_access() {
    let recorder = Alerts::default();
    let count = recorder.0.clone();
    // The test runs on one thread, so a thread-local recorder sees the engine's metrics.
    let _guard = metrics::set_default_local_recorder(&recorder);
    let w = World::with(MOBILE_BY_NAME, cfg()).await;
    let ann = w.create_user("ann", None).await;
    let mobile = w.create_group("Mobile", None, &[&ann]).await;
    w.drain().await;
    assert_eq!(
        w.store.pins().await.expect("pins").get("mobile"),
        Some(&mobile)
    );
    assert_eq!(count.0.load(Ordering::Relaxed), 0);

    w.okta_patch_group(&mobile, "Mobile Apps", vec![]).await;
    w.drain().await;
    let g = w.tc_group("Mobile Apps").expect("renamed group");
    assert_eq!(
        g.roles,
        roles(&["PROJECT_DEVELOPER@p:Mobile"]),
        "the pinned rule still applies"
    );
    assert!(
        w.tc_user("ann").expect("ann").groups.contains(&g.key),
        "nobody loses access"
    );
    let alerts = w.audit_ops("policy.alert").await;
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert!(
        alerts[0].detail.contains("PinnedGroupRenamed"),
        "{}",
        alerts[0].detail
    );
    assert_eq!(
        count.0.load(Ordering::Relaxed),
        1,
        "alert metric counted once"
    );

    // A new group taking the old name is not picked up by the pinned rule.
    let other = w.create_group("Mobile", None, &[&ann]).await;
    w.drain().await;
    let s = w.emu.snapshot();
    assert!(s.groups[&group_key(&other, 0)].roles.is_empty());
    assert_eq!(
        w.store.pins().await.expect("pins").get("mobile"),
        Some(&mobile)
    );
    // The alert is raised once, not on every pass.
    w.engine.reconcile(false).await.expect("reconcile");
    assert_eq!(w.audit_ops("policy.alert").await.len(), 1);
}

#[tokio::test]
async fn a_display_name_rule_is_pinned_by_a_scoped_pass_without_planning_the_whole_directory() {
    let w = World::with(MOBILE_BY_NAME, cfg()).await;
    let ann = w.create_user("ann", None).await;
    let bob = w.create_user("bob", None).await;
    let other = w.create_group("Mobile Platform", None, &[&bob]).await;
    let r = w.drain().await;
    assert_eq!(r.whole_passes, 0, "no rule matched yet: {r:?}");

    // The first group the rule matches arrives: the pass asks the store whether the name is
    // unique (it is) and pins it, instead of reading and planning the whole directory.
    let mobile = w.create_group("Mobile", None, &[&ann]).await;
    let r = w.drain().await;
    assert_eq!(r.whole_passes, 0, "{r:?}");
    assert_eq!(
        w.store.pins().await.expect("pins").get("mobile"),
        Some(&mobile)
    );
    let g = w.tc_group("Mobile").expect("group");
    assert_eq!(g.roles, roles(&["PROJECT_DEVELOPER@p:Mobile"]));
    assert!(w.tc_user("ann").expect("ann").groups.contains(&g.key));
    let s = w.emu.snapshot();
    assert!(
        s.groups[&group_key(&other, 0)].roles.is_empty(),
        "a name that only starts like the rule's is not matched"
    );
}
