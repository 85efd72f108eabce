//! `teamcity-scim db copy --from URL --to URL`: moves a deployment between backends (SQLite ⇄
//! PostgreSQL) with a progress bar, then verifies the copied audit chain.

use std::io::IsTerminal as _;
use std::io::Write;

use anyhow::Context as _;
use store::copy::copy_all;

use crate::config::Config;

/// A database URL as it may be shown: its password replaced.
fn shown(url: &str) -> String {
    store::redact_url(url)
}

/// Copies every table; the target must be new (empty). Stop every `serve` on the source first.
pub(crate) async fn copy(
    cfg: &Config,
    from: &str,
    to: &str,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    if from == to {
        anyhow::bail!("--from and --to are the same database");
    }
    // A running `serve` on a SQLite source (or target) holds its lock: refuse rather than copy
    // a database that changes underneath.
    let mut locks = Vec::new();
    for url in [from, to] {
        let mut c = cfg.clone();
        c.database.url = url.to_owned();
        c.database.url_file = None;
        locks.push(crate::lock_database(&c).with_context(|| {
            format!(
                "stop `teamcity-scim serve` on {} before copying",
                shown(url)
            )
        })?);
    }
    // Opening a SQLite URL creates the file: a mistyped source path must not become an empty
    // database that is then "copied".
    let mut source_cfg = cfg.clone();
    source_cfg.database.url = from.to_owned();
    if let Some(file) = source_cfg.database_file()
        && !file.exists()
    {
        anyhow::bail!(
            "the source {} does not exist (no file {})",
            shown(from),
            std::path::absolute(&file).unwrap_or(file).display()
        );
    }
    let clock = std::sync::Arc::new(store::SystemClock);
    let source = store::open(from, clock.clone())
        .await
        .with_context(|| format!("cannot open the source {}", shown(from)))?;
    let target = store::open(to, clock)
        .await
        .with_context(|| format!("cannot open the target {}", shown(to)))?;

    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} rows  {per_sec}  {eta} left  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let lines = sync::periodic_progress(
        std::time::Duration::from_secs(5),
        0,
        |done, total, rate, left| {
            eprintln!("copied {done}/{total} rows ({rate:.0}/s, {left:.0} s left)");
        },
    );
    let counts = copy_all(&source, &target, |table, done, total| match &bar {
        Some(b) => {
            b.set_length(total);
            b.set_position(done);
            b.set_message(table.to_owned());
        }
        None => lines(done as usize, total as usize),
    })
    .await
    .with_context(|| format!("copying {} to {}", shown(from), shown(to)))?;
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    drop(locks);

    writeln!(out, "copied {} to {}:", shown(from), shown(to))?;
    for (table, n) in &counts {
        writeln!(out, "  {table:<18} {n:>9} rows")?;
    }
    let key = crate::audit_cmd::load_key(cfg, false)?;
    match store::audit::verify_store(target.as_ref(), key.as_deref(), 1000).await {
        Ok(r) => writeln!(
            out,
            "audit chain of the copy verified: {} events{}",
            r.events,
            r.last_seq
                .map(|s| format!(", up to seq {s}"))
                .unwrap_or_default()
        )?,
        Err(e) => anyhow::bail!("the copied audit chain does not verify: {e}"),
    }
    writeln!(
        out,
        "Point `database.url` at {} and start `serve`.",
        shown(to)
    )?;
    Ok(())
}
