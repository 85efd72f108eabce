//! The dashboard in a real headless Chromium (Debian's `chromium` and `chromedriver`, driven over
//! the W3C WebDriver protocol): `serve` with the emulator and data, every page loaded and its
//! content checked, no error in the browser's console, and no page without an admin token.
//!
//! Without Chromium the test is skipped with a printed reason, except under CI (`CI` set), where
//! that is a failure. `SCREENSHOTS=DIR` keeps a PNG of every page (docs/screenshots/ holds the
//! committed ones).

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::{Env, KillOnDrop, free_port, serve_with, text, wait_up};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// A WebDriver session.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    _driver: KillOnDrop,
}

impl Browser {
    async fn start() -> Option<Browser> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        if !std::path::Path::new(CHROMEDRIVER).exists() || !std::path::Path::new(CHROMIUM).exists()
        {
            let reason = format!(
                "{CHROMIUM} or {CHROMEDRIVER} is missing (apt-get install chromium chromium-driver)"
            );
            assert!(std::env::var_os("CI").is_none(), "under CI: {reason}");
            eprintln!("SKIPPED: {reason}");
            return None;
        }
        let port = free_port();
        let driver = KillOnDrop(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("chromedriver"),
        );
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-extensions", "--no-first-run",
                         "--window-size=1280,1000"],
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session json");
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_owned();
        Some(Browser {
            http,
            base,
            session,
            _driver: driver,
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let post = method == reqwest::Method::POST;
        let mut req = self.http.request(method, url);
        // WebDriver wants a JSON body on every POST, `{}` when there are no parameters.
        if let Some(b) = body.or_else(|| post.then(|| json!({}))) {
            req = req.json(&b);
        }
        let v: Value = req
            .send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("webdriver json");
        assert!(
            v["value"]["error"].is_null(),
            "WebDriver {path} failed: {}",
            v["value"]
        );
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.call(reqwest::Method::POST, "/url", Some(json!({ "url": url })))
            .await;
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .call(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v["element-6066-11e4-a52e-4f735466cecf"]
            .as_str()
            .expect("element id")
            .to_owned()
    }

    /// The visible text of the element `css`.
    async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        self.call(reqwest::Method::GET, &format!("/element/{id}/text"), None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.call(reqwest::Method::POST, &format!("/element/{id}/click"), None)
            .await;
    }

    /// Waits until the page title starts with `prefix` (after a click navigates).
    async fn wait_for_title(&self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let title = self.title().await;
            if title.starts_with(prefix) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no page titled {prefix:?}: {title:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn title(&self) -> String {
        self.call(reqwest::Method::GET, "/title", None)
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Console entries at level WARNING or above since the last call.
    async fn console_problems(&self) -> Vec<String> {
        let v = self
            .call(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| matches!(e["level"].as_str(), Some("SEVERE" | "WARNING")))
            .map(|e| e["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    async fn screenshot(&self, name: &str) {
        let Some(dir) = std::env::var_os("SCREENSHOTS").map(PathBuf::from) else {
            return;
        };
        let v = self.call(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().expect("base64"))
            .expect("png");
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
    }

    async fn close(self) {
        let _ = self
            .http
            .delete(format!("{}/session/{}", self.base, self.session))
            .send()
            .await;
    }
}

const DASHBOARD_POLICY: &str = r#"
[[policy.groups]]
name = "developers"
match = { externalId = "00g-dev" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]

[policy.defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_dashboard_page_renders_in_chromium_without_errors_and_only_for_admin_tokens() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let env = Env::new(DASHBOARD_POLICY, Duration::ZERO).await;
    let ann = env.user("ann").await;
    let bob = env.user("bob").await;
    let dev = env.group("Developers", "00g-dev", &[&ann, &bob]).await;
    env.group("Book club", "00g-books", &[&ann]).await;

    // Tokens: one for the SCIM API, one for the dashboard (made by the command operators use).
    let out = env
        .run(&["token", "create", "--admin", "--name", "ops"])
        .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "token create --admin: {stderr}");
    let admin_token = stdout
        .lines()
        .last()
        .expect("secret line")
        .trim()
        .to_owned();
    assert!(stdout.contains("dashboard (admin) token"), "{stdout}");
    let out = env.run(&["token", "create", "--name", "okta"]).await;
    let scim_token = text(&out)
        .0
        .lines()
        .last()
        .expect("secret")
        .trim()
        .to_owned();

    let port = free_port();
    let admin_port = free_port();
    let _serve = KillOnDrop(serve_with(
        &env,
        port,
        &[(
            "TEAMCITY_SCIM_ADMIN__LISTEN",
            format!("127.0.0.1:{admin_port}"),
        )],
    ));
    let http = reqwest::Client::new();
    wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env
        .store
        .sync_state_get(sync::LAST_RECONCILE_KEY)
        .await
        .expect("state")
        .is_none()
    {
        assert!(
            Instant::now() < deadline,
            "the first reconcile did not finish"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dashboard = format!("http://127.0.0.1:{admin_port}");

    // No page without an admin token: none, a SCIM token, a wrong one.
    for (label, auth) in [
        ("no token", None),
        ("a SCIM token", Some(scim_token.as_str())),
        ("a made-up token", Some("tcscim_not-a-token")),
    ] {
        for page in [
            "/",
            "/people",
            "/groups",
            "/audit",
            "/plan",
            &format!("/people/{ann}"),
        ] {
            let mut req = http.get(format!("{dashboard}{page}"));
            if let Some(t) = auth {
                req = req.bearer_auth(t);
            }
            let r = req.send().await.expect("get");
            assert_eq!(r.status().as_u16(), 401, "{page} with {label}");
            let body = r.text().await.expect("body");
            assert!(
                !body.contains("ann@example.com"),
                "{page} with {label} leaks data"
            );
        }
    }
    // The admin token does not open the SCIM API either.
    let r = http
        .get(format!("http://127.0.0.1:{port}/scim/v2/Users"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .expect("scim");
    assert_eq!(
        r.status().as_u16(),
        401,
        "an admin token is not a SCIM token"
    );
    let r = http
        .get(format!("{dashboard}/groups"))
        .bearer_auth(&admin_token)
        .send()
        .await
        .expect("groups");
    assert_eq!(r.status().as_u16(), 200, "bearer admin token");

    // Drift the plan will show: ann taken out of the developers group by hand in TeamCity.
    let key = env
        .store
        .mapping(scim::ResourceKind::Group, &dev)
        .await
        .expect("mapping")
        .expect("developers group created")
        .teamcity_id;
    env.emu.with_state(|s| {
        for u in s.users.values_mut() {
            if u.username == "ann@example.com" {
                u.groups.retain(|g| *g != key);
            }
        }
    });

    // Sign in through the form, as a person does.
    browser.go(&format!("{dashboard}/")).await;
    assert!(
        browser.title().await.contains("Sign in"),
        "{}",
        browser.title().await
    );
    browser.screenshot("login").await;
    let field = browser.element("#token").await;
    browser
        .call(
            reqwest::Method::POST,
            &format!("/element/{field}/value"),
            Some(json!({ "text": admin_token })),
        )
        .await;
    browser.click("#sign-in").await;
    browser.wait_for_title("Overview").await;
    // Until now the only complaint may be the 401 of the sign-in page itself.
    let before = browser.console_problems().await;
    assert!(
        before.iter().all(|m| m.contains("401")),
        "the browser logged before sign-in: {before:?}"
    );

    // Overview.
    let readiness = browser.text("#readiness").await;
    assert!(readiness.contains("Ready"), "{readiness}");
    let teamcity = browser.text("#teamcity").await;
    assert!(
        teamcity.contains(&env.tc_url) && teamcity.contains("reachable"),
        "{teamcity}"
    );
    let outbox = browser.text("#outbox").await;
    assert!(outbox.contains("0 dead"), "{outbox}");
    let drift = browser.text("#drift").await;
    assert!(
        drift.contains("ann@example.com") && drift.contains("Developers"),
        "{drift}"
    );
    browser.screenshot("overview").await;

    // People: search, then one person with every role and why.
    browser.go(&format!("{dashboard}/people?q=ann")).await;
    let people = browser.text("#people").await;
    assert!(people.contains("ann@example.com"), "{people}");
    assert!(
        !people.contains("bob@example.com"),
        "the search filters: {people}"
    );
    browser.screenshot("people").await;
    browser.click("#people a").await;
    browser.wait_for_title("ann@example.com").await;
    let grants = browser.text("#grants").await;
    for want in [
        "PROJECT_DEVELOPER@p:Backend",
        "PROJECT_VIEWER@p:Frontend",
        "member of group \"Developers\", policy rule \"developers\" (externalId = \"00g-dev\")",
        "PROJECT_VIEWER@p:_Root",
        "policy defaults",
    ] {
        assert!(grants.contains(want), "grants lack {want:?}: {grants}");
    }
    let tc_user = browser.text("#teamcity-user").await;
    assert!(tc_user.contains("ann@example.com"), "{tc_user}");
    assert!(
        !tc_user.contains("Developers"),
        "the TeamCity user is shown as TeamCity has it (taken out by hand): {tc_user}"
    );
    browser.screenshot("person").await;

    // Groups.
    browser.go(&format!("{dashboard}/groups")).await;
    let groups = browser.text("#groups").await;
    for want in [
        "Developers",
        &key,
        "rule \"developers\" (externalId = \"00g-dev\")",
        "PROJECT_DEVELOPER@p:Backend",
        "Book club",
        "none (no roles)",
        "[policy.defaults]",
    ] {
        assert!(
            groups.contains(want),
            "groups page lacks {want:?}: {groups}"
        );
    }
    browser.screenshot("groups").await;

    // Audit, filtered by user, and a filter that names nobody.
    browser
        .go(&format!("{dashboard}/audit?user=ann%40example.com"))
        .await;
    let events = browser.text(".events").await;
    assert!(events.contains(&ann), "{events}");
    assert!(
        !events.contains(&format!("User {bob}")) && !events.contains(&format!("user:new:{bob}")),
        "only events about ann (a group with both is about both): {events}"
    );
    assert!(
        events.contains("create_user"),
        "TeamCity actions are listed: {events}"
    );
    assert!(
        events.contains("create_group"),
        "a group created with ann as a member is about ann: {events}"
    );
    browser.screenshot("audit").await;
    browser
        .go(&format!(
            "{dashboard}/audit?user=ann%40example.com&group=Developers"
        ))
        .await;
    let both = browser.text(".events").await;
    assert!(both.contains("create_group"), "{both}");
    assert!(
        !both.contains("create_user") && !both.contains("Book club"),
        "user and group together: the events about ann in Developers only: {both}"
    );
    browser.go(&format!("{dashboard}/audit?user=nobody")).await;
    let problem = browser.text("#audit-problem").await;
    assert!(problem.contains("nobody"), "{problem}");

    // Plan: the drift made by hand above.
    browser.go(&format!("{dashboard}/plan")).await;
    let plan = browser.text("#plan").await;
    assert!(
        plan.contains("ann@example.com") && plan.contains('+') && plan.contains("Developers"),
        "{plan}"
    );
    browser.screenshot("plan").await;

    let problems = browser.console_problems().await;
    assert!(problems.is_empty(), "the browser logged: {problems:?}");

    // Signing out forgets the cookie.
    browser.go(&format!("{dashboard}/")).await;
    browser.click(".logout button").await;
    browser.wait_for_title("Sign in").await;
    browser.go(&format!("{dashboard}/groups")).await;
    assert!(browser.title().await.contains("Sign in"), "signed out");
    browser.close().await;
}
