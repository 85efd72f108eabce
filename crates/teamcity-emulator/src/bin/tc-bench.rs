//! `tc-bench`: client calls per second against an in-process emulator.
//!
//! A baseline for the sync engine, not a target. Runs a fixed mix (get user,
//! list a users page, add a member, remove it) over real HTTP on 127.0.0.1.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use teamcity::{Client, ClientConfig, Locator, Token};
use teamcity_emulator::EmulatorOptions;

/// Benchmark the TeamCity client against the emulator.
#[derive(Debug, Parser)]
struct Args {
    /// Latency the emulator adds to every request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Total requests.
    #[arg(long, default_value_t = 5000)]
    requests: u64,
    /// Users seeded before the run.
    #[arg(long, default_value_t = 1000)]
    users: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    teamcity::install_crypto_provider();
    let opts = EmulatorOptions {
        token: "bench".into(),
        latency: Duration::from_millis(args.latency_ms),
        groups: vec!["BENCH".into()],
        ..EmulatorOptions::default()
    };
    let (base, emu) = teamcity_emulator::spawn(opts).await?;
    emu.with_state(|s| {
        for i in 0..args.users {
            s.insert_user(&format!("bench{i}"), Some("Bench"), None);
        }
    });
    let mut config = ClientConfig::new(base, Token::new("bench"));
    config.max_concurrency = args.concurrency;
    let client = Client::new(config)?;
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (client, next, total, users) = (
            client.clone(),
            next.clone(),
            args.requests,
            args.users.max(1),
        );
        workers.push(tokio::spawn(async move {
            worker(client, next, total, users).await
        }));
    }
    let mut errors = 0;
    for w in workers {
        errors += w.await??;
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "latency_ms={} concurrency={} requests={} errors={} elapsed_s={:.2} calls_per_s={:.0}",
        args.latency_ms,
        args.concurrency,
        args.requests,
        errors,
        secs,
        args.requests as f64 / secs
    );
    Ok(())
}

async fn worker(
    client: Client,
    next: Arc<AtomicU64>,
    total: u64,
    users: u64,
) -> anyhow::Result<u64> {
    let mut errors = 0;
    loop {
        let n = next.fetch_add(1, Ordering::Relaxed);
        if n >= total {
            return Ok(errors);
        }
        let user = Locator::by_id(2 + n % users);
        let result = match n % 4 {
            0 => client
                .get_user(&user, Some("id,username,email"))
                .await
                .map(drop),
            1 => client
                .list_users(
                    &Locator::new().count(100).start(n % users),
                    Some("count,user(id,username)"),
                )
                .await
                .map(drop),
            2 => client.add_user_to_group(&user, "BENCH").await,
            _ => client
                .remove_user_from_group(&user, "BENCH")
                .await
                .or_else(|e| if e.is_not_found() { Ok(()) } else { Err(e) }),
        };
        if result.is_err() {
            errors += 1;
        }
    }
}
