//! Shared setup: an in-process TeamCity emulator, a temporary database, a config file, and a
//! way to run the binary against them.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use store::{DynStore, MemberType, NewMember, WriteCtx};
use teamcity_emulator::{Emulator, EmulatorOptions};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_teamcity-scim");
pub(crate) const TC_TOKEN: &str = "cli-teamcity-token";

pub(crate) const POLICY: &str = r#"
[[policy.groups]]
match = { externalId = "00g-dev" }
roles = ["PROJECT_DEVELOPER@p:Backend", "PROJECT_VIEWER@p:Frontend"]

[policy.defaults]
roles = ["PROJECT_VIEWER@p:_Root"]
"#;

pub(crate) struct Env {
    pub(crate) emu: Emulator,
    pub(crate) tc_url: String,
    pub(crate) db_url: String,
    pub(crate) store: DynStore,
    pub(crate) config: PathBuf,
    pub(crate) dir: tempfile::TempDir,
}

impl Env {
    /// An emulator (with `latency`), a fresh database and a config file holding `config_toml`.
    pub(crate) async fn new(config_toml: &str, latency: std::time::Duration) -> Env {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let (tc_url, emu) = teamcity_emulator::spawn(EmulatorOptions {
            token: TC_TOKEN.into(),
            projects: ["Backend", "Frontend"].map(String::from).to_vec(),
            latency,
            ..EmulatorOptions::default()
        })
        .await
        .expect("emulator");
        let dir = tempfile::tempdir().expect("tempdir");
        let db_url = format!("sqlite://{}/cli.db", dir.path().display());
        let store = store::open(&db_url, Arc::new(store::SystemClock))
            .await
            .expect("store");
        let config = dir.path().join("config.toml");
        std::fs::write(&config, config_toml).expect("config");
        Env {
            emu,
            tc_url,
            db_url,
            store,
            config,
            dir,
        }
    }

    /// The binary with `--config` and the environment pointing at this setup.
    pub(crate) fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("TEAMCITY_SCIM_DATABASE__URL", &self.db_url)
            .env("TEAMCITY_SCIM_TEAMCITY__URL", &self.tc_url)
            .env("TEAMCITY_SCIM_TEAMCITY__TOKEN", TC_TOKEN)
            // Tests run in parallel: the dashboard only where a test gives it a port.
            .env("TEAMCITY_SCIM_ADMIN__LISTEN", "")
            .env("RUST_LOG", "warn")
            .current_dir(self.dir.path());
        c
    }

    /// Runs the binary to completion (off the async threads).
    pub(crate) async fn run(&self, args: &[&str]) -> Output {
        let mut c = self.cmd(args);
        tokio::task::spawn_blocking(move || c.output().expect("run the binary"))
            .await
            .expect("join")
    }

    /// A SCIM user, written straight to the store.
    pub(crate) async fn user(&self, name: &str) -> String {
        self.store
            .create(
                &WriteCtx::cli(),
                scim::ResourceKind::User,
                json!({"userName": format!("{name}@example.com"), "displayName": name, "active": true}),
                None,
            )
            .await
            .expect("user")
            .id
    }

    /// A SCIM group with members, written straight to the store.
    pub(crate) async fn group(&self, name: &str, external_id: &str, members: &[&str]) -> String {
        let members = members
            .iter()
            .map(|m| NewMember {
                value: (*m).to_owned(),
                ty: Some(MemberType::User),
                display: None,
            })
            .collect();
        self.store
            .create(
                &WriteCtx::cli(),
                scim::ResourceKind::Group,
                json!({"displayName": name, "externalId": external_id}),
                Some(members),
            )
            .await
            .expect("group")
            .id
    }
}

/// stdout and stderr as text.
pub(crate) fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Sends a signal to a process by pid.
pub(crate) fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A free local port.
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// `serve` on `port` against this setup.
pub(crate) fn serve(env: &Env, port: u16) -> Child {
    serve_with(env, port, &[])
}

/// `serve` on `port` with extra environment variables (e.g. the dashboard's address).
pub(crate) fn serve_with(env: &Env, port: u16, vars: &[(&str, String)]) -> Child {
    let mut cmd = env.cmd(&["serve"]);
    cmd.env("TEAMCITY_SCIM_SERVER__LISTEN", format!("127.0.0.1:{port}"));
    for (k, v) in vars {
        cmd.env(k, v);
    }
    cmd.stdout(Stdio::null())
        .stderr(if std::env::var_os("DEBUG_SERVE").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("serve")
}

/// Waits until the SCIM API at `base` answers.
pub(crate) async fn wait_up(http: &reqwest::Client, base: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while http
        .get(format!("{base}/ServiceProviderConfig"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "serve did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped, so a failing test never leaves a `serve` running (nor
/// a reader of its output blocked).
pub(crate) struct KillOnDrop(pub(crate) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
