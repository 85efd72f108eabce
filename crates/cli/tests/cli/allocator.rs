//! `serve` returns freed memory to the OS promptly: it runs with `MIMALLOC_PURGE_DELAY` at
//! 100 ms (same process, same arguments) unless the operator set it.

use std::time::Duration;

use crate::support::{Env, KillOnDrop, POLICY, free_port, serve_with, wait_up};

/// The NUL-separated entries of `/proc/<pid>/<what>`.
fn proc_list(pid: u32, what: &str) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/{what}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/{what}: {e}"))
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_with_a_short_purge_delay_and_keeps_the_operators() {
    let env = Env::new(POLICY, Duration::ZERO).await;
    let http = reqwest::Client::new();
    for (set, want) in [(None, "100"), (Some("1000"), "1000")] {
        let port = free_port();
        let vars: Vec<(&str, String)> = set
            .map(|v| ("MIMALLOC_PURGE_DELAY", v.to_owned()))
            .into_iter()
            .collect();
        let child = KillOnDrop(serve_with(&env, port, &vars));
        // The PID spawned is the one serving: the process replaced itself, it did not fork.
        wait_up(&http, &format!("http://127.0.0.1:{port}/scim/v2")).await;
        let pid = child.0.id();
        let environ = proc_list(pid, "environ");
        let delays: Vec<&String> = environ
            .iter()
            .filter(|e| e.starts_with("MIMALLOC_PURGE_DELAY="))
            .collect();
        assert_eq!(
            delays,
            [&format!("MIMALLOC_PURGE_DELAY={want}")],
            "operator's setting: {set:?}"
        );
        let args = proc_list(pid, "cmdline");
        assert_eq!(
            args[1..],
            [
                "--config".to_owned(),
                env.config.display().to_string(),
                "serve".to_owned()
            ],
            "same arguments"
        );
        assert!(
            environ
                .iter()
                .any(|e| e == &format!("TEAMCITY_SCIM_SERVER__LISTEN=127.0.0.1:{port}")),
            "the rest of the environment is kept"
        );
    }
}
