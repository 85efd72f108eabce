//! The `teamcity-scim emulator` subcommand: arguments and the run loop.
//!
//! Binds, prints the base URL, serves until Ctrl-C or SIGTERM. It must not
//! grow options the library does not have; it only maps flags to
//! [`EmulatorOptions`].

use std::path::PathBuf;
use std::time::Duration;

use crate::{Emulator, EmulatorOptions};

/// Runs an in-memory TeamCity REST server.
#[derive(Debug, Clone, clap::Args)]
pub struct EmulatorArgs {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8111)]
    pub port: u16,
    /// Address to bind.
    #[arg(long, default_value = "127.0.0.1")]
    pub bind: String,
    /// Bearer token accepted as the admin user.
    #[arg(long, env = "TEAMCITY_EMULATOR_TOKEN")]
    pub token: String,
    /// Project external ids to create under _Root (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub projects: Vec<String>,
    /// Usernames to create (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub users: Vec<String>,
    /// Group keys to create (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub groups: Vec<String>,
    /// Latency added to every TeamCity request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// JSON seed file with projects, groups and users.
    #[arg(long)]
    pub seed: Option<PathBuf>,
    /// Serve under a context path, e.g. /tc.
    #[arg(long)]
    pub context_path: Option<String>,
    /// Answer POST /app/rest/users/{u}/logout with 404, like a server older than it.
    #[arg(long)]
    pub logout_unsupported: bool,
}

impl EmulatorArgs {
    /// The library options these flags describe.
    pub fn options(&self) -> EmulatorOptions {
        EmulatorOptions {
            token: self.token.clone(),
            read_only_tokens: Vec::new(),
            projects: self
                .projects
                .iter()
                .filter(|p| !p.is_empty() && *p != "_Root")
                .cloned()
                .collect(),
            users: self.users.clone(),
            groups: self.groups.clone(),
            latency: Duration::from_millis(self.latency_ms),
            seed_file: self.seed.clone(),
            context_path: self.context_path.clone(),
            logout_unsupported: self.logout_unsupported,
        }
    }
}

/// Binds, prints the base URL on stdout, and serves until Ctrl-C or SIGTERM.
pub async fn run(args: EmulatorArgs) -> anyhow::Result<()> {
    let emu = Emulator::new(args.options())?;
    let listener = tokio::net::TcpListener::bind((args.bind.as_str(), args.port)).await?;
    let addr = listener.local_addr()?;
    let context = args
        .context_path
        .as_deref()
        .unwrap_or("")
        .trim_end_matches('/');
    println!("teamcity emulator listening on http://{addr}{context}");
    emu.serve(listener, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Wrapper {
        #[command(flatten)]
        args: EmulatorArgs,
    }

    #[test]
    fn flags_map_to_options() {
        let w = Wrapper::parse_from([
            "x",
            "--port",
            "0",
            "--token",
            "T",
            "--projects",
            "_Root,Backend,Frontend",
            "--latency-ms",
            "5",
        ]);
        let opts = w.args.options();
        assert_eq!(opts.token, "T");
        assert_eq!(
            opts.projects,
            vec!["Backend".to_string(), "Frontend".to_string()]
        );
        assert_eq!(opts.latency, Duration::from_millis(5));
        assert_eq!(w.args.port, 0);
    }
}
