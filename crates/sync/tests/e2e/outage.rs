//! OUTAGE: TeamCity refuses every write (503, or dropped connections) for a while during 1,000
//! SCIM changes; after recovery TeamCity equals the desired state exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use sync::{EngineConfig, GROUP_MARKER, GuardLimits, USER_MARKER};
use teamcity_emulator::FaultAction;

use crate::support::{World, cfg};
use store::OutboxState;

const POLICY: &str = r#"
[[groups]]
match = { externalId = "00g-0" }
roles = ["PROJECT_DEVELOPER@p:Backend"]
[[groups]]
match = { externalId = "00g-1" }
roles = ["PROJECT_ADMIN@p:Frontend"]
[defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

/// A small deterministic generator.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % n
    }
}

async fn outage_during_1000_changes(fault: FaultAction) {
    let w = World::with(POLICY, cfg()).await;
    let engine = Arc::new(w.engine_with(
        POLICY,
        EngineConfig {
            limits: GuardLimits {
                max_removals: None,
                max_removals_percent: None,
            },
            ..cfg()
        },
    ));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let worker = tokio::spawn(engine.clone().run(stop_rx));

    let mut rng = Lcg(7);
    let mut users = vec![];
    let mut changes = 0usize;
    for n in 0..80 {
        users.push(w.create_user(&format!("u{n}"), None).await);
        changes += 1;
    }
    let mut groups = vec![];
    for n in 0..10 {
        let name = format!("G{n}");
        groups.push((
            w.create_group(&name, Some(&format!("00g-{n}")), &[]).await,
            name,
        ));
        changes += 1;
    }
    let mut active: BTreeMap<usize, bool> = (0..users.len()).map(|i| (i, true)).collect();
    while changes < 1000 {
        if changes == 150 {
            w.fail_writes(fault.clone());
        }
        if changes == 800 {
            w.emu.clear_faults();
        }
        match rng.next(10) {
            0..=5 => {
                let (g, name) = &groups[rng.next(groups.len())];
                let u = &users[rng.next(users.len())];
                let op = if rng.next(3) == 0 {
                    json!({"op": "remove", "path": format!("members[value eq \"{u}\"]")})
                } else {
                    json!({"op": "add", "path": "members", "value": [{"value": u}]})
                };
                w.okta_patch_group(g, name, vec![op]).await;
            }
            6 => {
                let i = rng.next(users.len());
                let a = !active[&i];
                active.insert(i, a);
                w.set_active(&users[i], a).await;
            }
            7 => {
                let i = rng.next(groups.len());
                let name = format!("G{i} r{changes}");
                let g = groups[i].0.clone();
                w.okta_patch_group(&g, &name, vec![]).await;
                groups[i].1 = name;
            }
            _ => {
                let u = &users[rng.next(users.len())];
                w.patch(
                    &format!("/Users/{u}"),
                    json!([{"op": "replace", "path": "displayName", "value": format!("User {changes}")}]),
                )
                .await;
            }
        }
        changes += 1;
    }
    w.emu.clear_faults();

    let deadline = Instant::now() + Duration::from_secs(15);
    while w.pending().await > 0 {
        assert!(
            Instant::now() < deadline,
            "the outbox did not drain after recovery"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = stop_tx.send(true);
    worker.await.expect("worker");

    // Nothing lost: every row done.
    assert!(w.rows(OutboxState::Dead).await.is_empty());
    assert!(w.rows(OutboxState::Held).await.is_empty());
    let all = w.store.outbox_items(0, 1_000_000).await.expect("rows");
    assert!(all.len() >= 500, "{}", all.len());
    assert!(
        all.iter().all(|r| r.state == OutboxState::Done),
        "{:?}",
        all.iter().find(|r| r.state != OutboxState::Done)
    );
    // Equal to the desired state: a fresh plan is empty.
    let fresh = w.engine_with(POLICY, cfg());
    let (p, _, _) = fresh.plan_full().await.expect("plan");
    assert!(
        p.is_empty(),
        "{} actions left: {:?}",
        p.actions.len(),
        p.actions.first()
    );
    assert!(p.conflicts.is_empty(), "{:?}", p.conflicts);

    // Nothing duplicated, memberships exact.
    let s = w.emu.snapshot();
    let managed: Vec<_> = s
        .users
        .values()
        .filter(|u| u.properties.contains_key(USER_MARKER))
        .collect();
    assert_eq!(
        managed.len(),
        users.len(),
        "one TeamCity user per SCIM user"
    );
    let markers: BTreeSet<&String> = managed.iter().map(|u| &u.properties[USER_MARKER]).collect();
    assert_eq!(markers.len(), users.len());
    let managed_groups: Vec<_> = s
        .groups
        .values()
        .filter(|g| g.properties.contains_key(GROUP_MARKER))
        .collect();
    assert_eq!(
        managed_groups.len(),
        groups.len() + 1,
        "one per SCIM group plus defaults"
    );
    let names: BTreeSet<&String> = s.groups.values().map(|g| &g.name).collect();
    assert_eq!(names.len(), s.groups.len(), "group names unique");
    let dir = w.store.directory().await.expect("directory");
    for (gid, name) in &groups {
        let tc = managed_groups
            .iter()
            .find(|g| g.properties.get(GROUP_MARKER) == Some(gid))
            .expect("group in TeamCity");
        assert_eq!(&tc.name, name);
        let want: BTreeSet<String> = dir
            .groups
            .iter()
            .find(|g| &g.id == gid)
            .expect("scim group")
            .members
            .iter()
            .map(|m| m.value.clone())
            .filter(|m| active[&users.iter().position(|u| u == m).expect("user")])
            .collect();
        let got: BTreeSet<String> = managed
            .iter()
            .filter(|u| u.groups.contains(&tc.key))
            .map(|u| u.properties[USER_MARKER].clone())
            .collect();
        assert_eq!(got, want, "members of {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_503_during_1000_changes_converges_exactly() {
    outage_during_1000_changes(FaultAction::Status {
        status: 503,
        retry_after_secs: None,
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outage_dropped_connections_during_1000_changes_converges_exactly() {
    outage_during_1000_changes(FaultAction::Drop).await;
}
