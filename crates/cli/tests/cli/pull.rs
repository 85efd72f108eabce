//! PULL MODE end to end: `serve` with `source.kind = "graph"` / `"okta"` reads the directory
//! from the IdP fake every second and TeamCity (the emulator) follows it — first sync, a new
//! hire (timed against `interval` + 5 s), a group rename, a deactivation, a deletion, an expired
//! delta link (Graph), throttling, the IdP unreachable for a while (nothing removed meanwhile,
//! readiness says why), and a mass removal held by the guard exactly as for push.

use std::time::{Duration, Instant};

use idp_fake::graph::GraphFake;
use idp_fake::okta::OktaFake;

use crate::support::{Env, KillOnDrop, POLICY, free_port, serve_with, text, wait_up};

/// The group the policy maps (`POLICY` matches externalId `00g-dev`).
const GROUP: &str = "00g-dev";
const INTERVAL: Duration = Duration::from_secs(1);

enum Idp {
    Graph(GraphFake),
    Okta(OktaFake),
}

impl Idp {
    /// The `[source]` section, with its secret written to a file in `dir`.
    fn config(&self, dir: &std::path::Path) -> String {
        match self {
            Idp::Graph(g) => {
                let secret = dir.join("graph-secret");
                std::fs::write(&secret, g.client_secret()).expect("secret");
                format!(
                    "[source]\nkind = \"graph\"\ninterval = \"1s\"\ngroups = [\"{GROUP}\"]\n\
                     tenant_id = \"{}\"\nclient_id = \"{}\"\nclient_secret_file = \"{}\"\n\
                     graph_url = \"{}\"\nauthority_url = \"{}\"\n",
                    g.tenant_id(),
                    g.client_id(),
                    secret.display(),
                    g.url(),
                    g.url()
                )
            }
            Idp::Okta(o) => {
                let token = dir.join("okta-token");
                std::fs::write(&token, o.api_token()).expect("token");
                format!(
                    "[source]\nkind = \"okta\"\ninterval = \"1s\"\ngroups = [\"{GROUP}\"]\n\
                     org_url = \"{}\"\ntoken_file = \"{}\"\n",
                    o.url(),
                    token.display()
                )
            }
        }
    }

    /// The TeamCity username of person `name`.
    fn login(&self, name: &str) -> String {
        match self {
            Idp::Graph(_) => format!("{name}@contoso.example"),
            Idp::Okta(_) => format!("{name}.example@example.com"),
        }
    }

    fn add_group(&self, name: &str) {
        match self {
            Idp::Graph(g) => g.add_group(GROUP, name),
            Idp::Okta(o) => o.add_group(GROUP, name),
        }
    }

    /// A person with id `id`, in the group when `member`.
    fn hire(&self, id: &str, name: &str, member: bool) {
        match self {
            Idp::Graph(g) => {
                g.add_user(idp_fake::graph::FakeUser::new(id, name));
                if member {
                    g.add_member(GROUP, id);
                }
            }
            Idp::Okta(o) => {
                o.add_user(idp_fake::okta::FakeUser::new(id, name, "Example"));
                if member {
                    o.add_member(GROUP, id);
                }
            }
        }
    }

    fn leave(&self, id: &str) {
        match self {
            Idp::Graph(g) => g.remove_member(GROUP, id),
            Idp::Okta(o) => o.remove_member(GROUP, id),
        }
    }

    /// Disabled (Graph `accountEnabled = false`; Okta deactivated: DEPROVISIONED).
    fn disable(&self, id: &str) {
        match self {
            Idp::Graph(g) => g.update_user(id, |u| u.enabled = false),
            Idp::Okta(o) => o.set_status(id, "DEPROVISIONED"),
        }
    }

    fn delete(&self, id: &str) {
        match self {
            Idp::Graph(g) => g.delete_user(id, true),
            Idp::Okta(o) => o.delete_user(id),
        }
    }

    fn rename_group(&self, name: &str) {
        match self {
            Idp::Graph(g) => g.rename_group(GROUP, name),
            Idp::Okta(o) => o.rename_group(GROUP, name),
        }
    }

    /// The next requests are throttled (Graph: 429 with `Retry-After: 1`; Okta: 429 until the
    /// rate-limit window resets).
    fn throttle(&self) {
        match self {
            Idp::Graph(g) => g.throttle(2, 1),
            Idp::Okta(o) => o.throttle_next(2),
        }
    }

    fn set_down(&self, down: bool) {
        match self {
            Idp::Graph(g) => g.set_down(down),
            Idp::Okta(o) => o.set_down(down),
        }
    }

    fn requests(&self) -> u64 {
        match self {
            Idp::Graph(g) => g.requests(),
            Idp::Okta(o) => o.requests(),
        }
    }
}

/// `Some(true)`: the TeamCity user exists and has access (groups, no deactivation marker);
/// `Some(false)`: it exists without access; `None`: no such user.
fn access(env: &Env, login: &str) -> Option<bool> {
    let s = env.emu.snapshot();
    let u = s.users.values().find(|u| u.username == login)?;
    Some(!u.groups.is_empty() && !u.properties.contains_key(sync::USER_DEACTIVATED))
}

async fn eventually(secs: u64, what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn scenario(idp: Idp) {
    let kind = match idp {
        Idp::Graph(_) => "graph",
        Idp::Okta(_) => "okta",
    };
    // The config needs the secret file before the environment exists: write it in a
    // directory that lives as long as the test.
    let secrets = tempfile::tempdir().expect("dir");
    let config = format!("{}{POLICY}", idp.config(secrets.path()));
    let env = Env::new(&config, Duration::ZERO).await;
    idp.add_group("Developers");
    let team: Vec<String> = (0..13).map(|i| format!("p{i:02}")).collect();
    for (i, name) in team.iter().enumerate() {
        idp.hire(&format!("id-{i}"), name, true);
    }
    idp.hire("id-eve", "eve", false);

    // `source check` sees the credentials and the group.
    let o = env.run(&["source", "check"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{kind}: source check: {out}{err}");
    assert!(
        out.contains(GROUP) && out.contains("13 user members"),
        "{out}"
    );

    let o = env
        .run(&["token", "create", "--admin", "--name", "ops"])
        .await;
    let (out, _) = text(&o);
    let admin_token = out
        .lines()
        .last()
        .expect("the admin token")
        .trim()
        .to_owned();
    let port = free_port();
    let admin_port = free_port();
    let base = format!("http://127.0.0.1:{port}/scim/v2");
    let http = reqwest::Client::new();
    let before = idp.requests();
    let started = Instant::now();
    let _serve = KillOnDrop(serve_with(
        &env,
        port,
        &[(
            "TEAMCITY_SCIM_ADMIN__LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )],
    ));
    let overview = async || {
        http.get(format!("http://127.0.0.1:{admin_port}/"))
            .bearer_auth(&admin_token)
            .send()
            .await
            .expect("dashboard")
            .text()
            .await
            .expect("html")
    };
    wait_up(&http, &base).await;

    // First sync: the group's members get access; eve, in no configured group, does not exist.
    eventually(30, "first sync", || {
        team.iter()
            .all(|n| access(&env, &idp.login(n)) == Some(true))
    })
    .await;
    println!(
        "{kind}: first sync of {} users reached TeamCity in {:?} with {} IdP requests",
        team.len(),
        started.elapsed(),
        idp.requests() - before
    );
    assert_eq!(
        access(&env, &idp.login("eve")),
        None,
        "{kind}: eve is out of scope"
    );
    let page = overview().await;
    assert!(
        page.contains("Identity provider")
            && page.contains(&format!("Pulled from {kind} every 1s")),
        "{kind}: the Overview shows the source: {page}"
    );
    let o = env.run(&["status"]).await;
    let (out, err) = text(&o);
    assert!(o.status.success(), "{kind}: status: {out}{err}");
    assert!(
        out.contains(&format!("source:     {kind} (pull every 1s)"))
            && out.contains("last success"),
        "{out}"
    );

    // `plan` works in pull mode: nothing left to change after the first sync.
    let o = env.run(&["plan", "--exit-code"]).await;
    let (out, err) = text(&o);
    assert_eq!(o.status.code(), Some(0), "{kind}: plan: {out}{err}");

    // A new hire reaches TeamCity within interval + 5 s.
    let t = Instant::now();
    idp.hire("id-new", "newbie", true);
    eventually(20, "new hire", || {
        access(&env, &idp.login("newbie")) == Some(true)
    })
    .await;
    let took = t.elapsed();
    println!("{kind}: a new hire reached TeamCity in {took:?} (interval {INTERVAL:?})");
    assert!(took < INTERVAL + Duration::from_secs(5), "{kind}: {took:?}");

    // A group rename: the TeamCity group follows, nobody loses access.
    idp.rename_group("Engineering");
    eventually(20, "group renamed", || {
        env.emu
            .snapshot()
            .groups
            .values()
            .any(|g| g.name == "Engineering")
    })
    .await;
    assert!(
        team.iter()
            .all(|n| access(&env, &idp.login(n)) == Some(true))
    );

    // A deactivation strips access; a deletion too.
    idp.disable("id-1");
    eventually(20, "deactivation", || {
        access(&env, &idp.login(&team[1])) == Some(false)
    })
    .await;
    idp.delete("id-2");
    eventually(20, "deletion", || {
        access(&env, &idp.login(&team[2])) != Some(true)
    })
    .await;

    // Graph: an expired delta link is a full resync that removes nobody still there.
    if let Idp::Graph(g) = &idp {
        g.expire_delta_links();
        idp.hire("id-late", "late", true);
        eventually(20, "hire after the resync", || {
            access(&env, &idp.login("late")) == Some(true)
        })
        .await;
        assert!(
            team[3..]
                .iter()
                .all(|n| access(&env, &idp.login(n)) == Some(true))
        );
    }

    // Throttled: the pull waits as asked and still delivers.
    idp.throttle();
    idp.hire("id-slow", "slow", true);
    eventually(20, "hire while throttled", || {
        access(&env, &idp.login("slow")) == Some(true)
    })
    .await;

    // The IdP unreachable: nothing changes meanwhile, readiness says why; back: it applies.
    idp.set_down(true);
    idp.leave("id-3");
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(
        access(&env, &idp.login(&team[3])),
        Some(true),
        "{kind}: removed while down"
    );
    let r = http
        .get(format!("http://127.0.0.1:{port}/healthz/ready"))
        .send()
        .await
        .expect("ready");
    assert_eq!(r.status(), 503, "{kind}: not ready while the IdP is down");
    let body: serde_json::Value = r.json().await.expect("json");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or("")
            .contains("identity provider"),
        "{body}"
    );
    let o = env.run(&["status"]).await;
    let (out, _) = text(&o);
    assert!(
        !o.status.success(),
        "{kind}: status is not ready while the IdP is down: {out}"
    );
    assert!(out.contains("NOT READY: the identity provider"), "{out}");
    let page = overview().await;
    assert!(
        page.contains("failed, so nothing is changed until the identity provider can be read"),
        "{kind}: the Overview shows the failing source: {page}"
    );
    idp.set_down(false);
    eventually(20, "removal after the outage", || {
        access(&env, &idp.login(&team[3])) == Some(false)
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while http
        .get(format!("http://127.0.0.1:{port}/healthz/ready"))
        .send()
        .await
        .expect("ready")
        .status()
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "{kind}: not ready after the IdP came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A mass removal (11 people out of the group at once) is held by the guard, as for push.
    let leaving: Vec<usize> = (4..13).collect();
    for i in &leaving {
        idp.leave(&format!("id-{i}"));
    }
    idp.leave("id-new");
    idp.leave("id-slow");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = env.run(&["held"]).await;
        let (out, _) = text(&o);
        if out.contains("approve") {
            break;
        }
        assert!(Instant::now() < deadline, "{kind}: no held batch: {out}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        leaving
            .iter()
            .all(|i| access(&env, &idp.login(&team[*i])) == Some(true)),
        "{kind}: the held removals were not applied"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graph_pull_mode_end_to_end() {
    scenario(Idp::Graph(GraphFake::start().await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn okta_pull_mode_end_to_end() {
    scenario(Idp::Okta(OktaFake::start().await)).await;
}
