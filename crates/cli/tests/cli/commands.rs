//! `plan` (+/-/~, summary, --exit-code), `policy check`, `outbox list|retry|drop`, `held`,
//! `approve`.

use std::time::Duration;

use store::{HeldState, OutboxState, WriteCtx};
use sync::{Engine, EngineConfig, GuardLimits, Policy};
use teamcity_emulator::{Fault, FaultAction};

use crate::support::{Env, POLICY, TC_TOKEN, text};

fn engine(env: &Env, limits: GuardLimits) -> Engine {
    let client = teamcity::Client::new(teamcity::ClientConfig::new(
        env.tc_url.clone(),
        teamcity::Token::new(TC_TOKEN),
    ))
    .expect("client");
    let policy_text = POLICY
        .replace("[[policy.groups]]", "[[groups]]")
        .replace("[policy.defaults]", "[defaults]");
    Engine::new(
        env.store.clone(),
        client,
        Policy::from_toml(&policy_text).expect("policy"),
        EngineConfig {
            poll: Duration::from_millis(20),
            limits,
            ..EngineConfig::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn plan_shows_add_change_remove_with_summary_and_exit_codes() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let ann = env.user("ann").await;
    let bob = env.user("bob").await;
    env.group("Developers", "00g-dev", &[&ann, &bob]).await;

    let o = env.run(&["plan", "--exit-code"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(
        out.lines().any(|l| l.trim_start().starts_with('+')),
        "{out}"
    );
    assert!(out.contains("Plan: ") && out.contains("to add"), "{out}");

    let o = env.run(&["reconcile", "--apply"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    // Not on a terminal: plain progress lines on stderr, the last one at the end.
    let (_, err) = text(&o);
    let last = err
        .lines()
        .rfind(|l| l.starts_with("applied "))
        .unwrap_or_else(|| panic!("{err}"));
    let counts = last
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.split_once('/'))
        .unwrap_or_else(|| panic!("{last}"));
    assert_eq!(
        counts.0, counts.1,
        "the last line says all steps are done: {last}"
    );
    let o = env.run(&["plan", "--exit-code"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("No changes."), "{out}");

    // Drift by hand: a name changed (~) and a role added to a managed group (-).
    env.emu.with_state(|s| {
        let u = s
            .users
            .values_mut()
            .find(|u| u.username == "ann@example.com")
            .expect("ann");
        u.name = Some("Somebody Else".into());
        let g = s
            .groups
            .values_mut()
            .find(|g| g.name == "Developers")
            .expect("group");
        g.roles.insert(("PROJECT_ADMIN".into(), "p:Backend".into()));
    });
    let o = env.run(&["plan", "--exit-code"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{out}{err}");
    assert!(
        out.lines().any(|l| l.trim_start().starts_with('~')),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.trim_start().starts_with('-')),
        "{out}"
    );
    assert!(
        out.contains("to change") && out.contains("to destroy"),
        "{out}"
    );
    // Without --exit-code, pending changes still exit 0.
    let o = env.run(&["plan"]).await;
    assert_eq!(o.status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn policy_check_names_unknown_roles_and_projects() {
    let bad = r#"
[[policy.groups]]
name = "devs"
match = { externalId = "00g-dev" }
roles = ["NO_SUCH_ROLE@g", "PROJECT_VIEWER@p:Nowhere"]
"#;
    let env = Env::new(bad, Duration::ZERO).await;
    let o = env.run(&["policy", "check"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(out.contains("TeamCity has no role 'NO_SUCH_ROLE'"), "{out}");
    assert!(
        out.contains("TeamCity has no project with external id 'Nowhere'"),
        "{out}"
    );
    assert!(
        out.contains("groups[0] \"devs\""),
        "each problem names its rule: {out}"
    );
    assert!(out.contains("2 problem(s) found."), "{out}");

    std::fs::write(&env.config, POLICY).expect("config");
    let o = env.run(&["policy", "check"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("Policy OK"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn outbox_list_retry_drop_and_held_approve_commands() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let e = engine(
        &env,
        GuardLimits {
            max_removals: Some(1),
            max_removals_percent: None,
        },
    );
    e.drain().await.expect("drain");
    env.emu.inject_fault(Fault {
        method: Some("POST".into()),
        path_prefix: Some("/app/rest/users".into()),
        path_contains: None,
        times: 2,
        // A 400: refused for these objects. (A 403 on every write would be the bridge's own
        // missing permissions: nothing is dead-lettered for that.)
        action: FaultAction::Status {
            status: 400,
            retry_after_secs: None,
        },
    });
    let ann = env.user("ann").await;
    let bob = env.user("bob").await;
    e.drain().await.expect("drain");
    let dead = env
        .store
        .list_outbox(Some(OutboxState::Dead), 10)
        .await
        .expect("dead");
    assert_eq!(dead.len(), 2);

    let o = env.run(&["plan"]).await;
    let (out, _) = text(&o);
    assert!(
        out.contains("Failed or not attempted") && out.contains("create_user"),
        "`plan` shows what failed: {out}"
    );
    let o = env.run(&["outbox", "list", "--state", "dead"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        out.contains(&format!("user:{ann}")) && out.contains("create_user"),
        "{out}"
    );
    let (ann_row, bob_row) = (dead[0].item.id.to_string(), dead[1].item.id.to_string());
    let o = env.run(&["outbox", "retry", &ann_row]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    assert!(text(&o).0.contains("pending again"), "{:?}", text(&o));
    let o = env.run(&["outbox", "drop", &bob_row]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    e.drain().await.expect("drain");
    let s = env.emu.snapshot();
    assert!(
        s.users.values().any(|u| u.username == "ann@example.com"),
        "retried item applied"
    );
    let o = env.run(&["outbox", "list", "--state", "dropped"]).await;
    assert!(
        text(&o).0.contains(&format!("user:{bob}")),
        "{:?}",
        text(&o)
    );
    assert!(
        env.store
            .list_outbox(Some(OutboxState::Dead), 10)
            .await
            .expect("dead")
            .is_empty()
    );

    // Guard: three users leave a group at once; max_removals = 1 holds it.
    let c1 = env.user("c1").await;
    let c2 = env.user("c2").await;
    let g = env.group("Developers", "00g-dev", &[&ann, &c1, &c2]).await;
    e.drain().await.expect("drain");
    let v = env
        .store
        .get(scim::ResourceKind::Group, &g, store::ReadOpts::default())
        .await
        .expect("get")
        .expect("g")
        .version;
    env.store
        .update(
            &WriteCtx::cli(),
            scim::ResourceKind::Group,
            &g,
            v,
            None,
            &[store::MembershipChange::RemoveAll],
        )
        .await
        .expect("update");
    e.drain().await.expect("drain");
    let o = env.run(&["held"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let held = env
        .store
        .list_held(Some(HeldState::Held))
        .await
        .expect("held");
    assert_eq!(held.len(), 1, "{out}");
    assert!(
        out.contains(&held[0].id.to_string()) && out.contains("max_removals"),
        "{out}"
    );
    // It names who would lose access, and the exact command.
    let affects = out
        .lines()
        .find(|l| l.trim_start().starts_with("affects:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        affects.contains("c1@example.com") && affects.contains("c2@example.com"),
        "{out}"
    );
    assert!(
        out.contains(&format!("teamcity-scim approve {}", held[0].id)),
        "{out}"
    );
    // The rows that asked for it wait in the batch: `outbox list` shows them as held.
    let o = env.run(&["outbox", "list", "--state", "held"]).await;
    let (out, _) = text(&o);
    assert!(out.contains(&format!("held batch {}", held[0].id)), "{out}");
    // `plan` lists the batch waiting for approval.
    let o = env.run(&["plan"]).await;
    let (out, _) = text(&o);
    assert!(
        out.contains("Waiting for approval")
            && out.contains(&format!("teamcity-scim approve {}", held[0].id)),
        "{out}"
    );
    let members = |name: &str| {
        env.emu
            .snapshot()
            .users
            .values()
            .find(|u| u.username == format!("{name}@example.com"))
            .map(|u| u.groups.len())
            .unwrap_or(0)
    };
    assert_eq!(members("c1"), 2, "still in the group and defaults");
    let o = env.run(&["approve", &held[0].id.to_string()]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    e.drain().await.expect("drain");
    assert_eq!(members("c1"), 1, "removed after approval; defaults remain");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_summarises_the_bridge_and_exits_1_when_not_ready() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let ann = env.user("ann").await;
    env.group("Developers", "00g-dev", &[&ann]).await;
    let o = env.run(&["status"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{err}");
    assert!(out.contains("the bridge's token is accepted"), "{out}");
    assert!(out.contains("policy:     matches TeamCity"), "{out}");
    assert!(out.contains("reconcile:  never"), "{out}");
    assert!(out.contains("outbox:     2 pending"), "{out}");
    assert!(out.trim_end().ends_with("ready"), "{out}");

    let o = env.run(&["reconcile", "--apply"]).await;
    assert!(o.status.success(), "{:?}", text(&o));
    let o = env.run(&["status"]).await;
    let (out, _) = text(&o);
    assert!(
        out.lines()
            .any(|l| l.starts_with("reconcile:") && l.contains("applied")),
        "{out}"
    );

    // A policy TeamCity does not match: not ready, with the reason.
    let typo = POLICY.replace("PROJECT_DEVELOPER@p:Backend", "PROJECT_ADMINN@p:Backend");
    std::fs::write(&env.config, typo).expect("config");
    let o = env.run(&["status"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}{err}");
    assert!(
        out.contains("NOT READY: the policy does not match TeamCity")
            && out.contains("PROJECT_ADMINN"),
        "{out}"
    );

    // TeamCity refusing the token: not ready.
    std::fs::write(&env.config, POLICY).expect("config");
    let o = env
        .cmd(&["status"])
        .env("TEAMCITY_SCIM_TEAMCITY__TOKEN", "wrong-token")
        .output()
        .expect("status");
    let (out, _) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("NOT READY: TeamCity at"), "{out}");
}
