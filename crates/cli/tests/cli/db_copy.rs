//! `db copy`: a SQLite deployment moved to PostgreSQL and back with the binary, progress on
//! stderr, the copy verified; a non-empty target and a source under a running `serve` refused.

use std::time::Duration;

use sqlx::Connection as _;

use crate::support::{Env, KillOnDrop, POLICY, free_port, serve, text, wait_up};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh PostgreSQL database, dropped at the end; `None` (with the reason printed) when the
/// server is unreachable outside CI.
pub(crate) struct PgDb {
    pub(crate) url: String,
    name: String,
}

impl PgDb {
    pub(crate) async fn create() -> Option<PgDb> {
        let server = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| SERVER.to_owned());
        let mut conn = match sqlx::PgConnection::connect(&server).await {
            Ok(c) => c,
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "PostgreSQL is unreachable under CI: {e}"
                );
                eprintln!("SKIPPED (PostgreSQL): {e}");
                return None;
            }
        };
        let name = format!("cli_copy_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&mut conn)
            .await
            .expect("create database");
        let base = server.rsplit_once('/').map_or(server.as_str(), |(b, _)| b);
        Some(PgDb {
            url: format!("{base}/{name}"),
            name,
        })
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| SERVER.to_owned());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut c) = sqlx::PgConnection::connect(&server).await {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"
                    )))
                    .execute(&mut c)
                    .await;
                }
            });
        })
        .join();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn db_copy_moves_a_deployment_to_postgresql_and_refuses_what_it_must() {
    let Some(pg) = PgDb::create().await else {
        return;
    };
    let env = Env::new(POLICY, Duration::ZERO).await;
    let ann = env.user("ann").await;
    env.group("Developers", "00g-dev", &[&ann]).await;
    let out = env.run(&["token", "create", "--name", "okta"]).await;
    assert!(out.status.success());

    // A mistyped source is not created and copied as an empty database.
    let missing = format!("sqlite://{}/no-such.db", env.dir.path().display());
    let out = env
        .run(&["db", "copy", "--from", &missing, "--to", &pg.url])
        .await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("does not exist"), "{stderr}");
    assert!(!env.dir.path().join("no-such.db").exists());

    // Not while `serve` runs on the source.
    let port = free_port();
    let running = KillOnDrop(serve(&env, port));
    wait_up(
        &reqwest::Client::new(),
        &format!("http://127.0.0.1:{port}/scim/v2"),
    )
    .await;
    let out = env
        .run(&["db", "copy", "--from", &env.db_url, "--to", &pg.url])
        .await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("stop `teamcity-scim serve`"), "{stderr}");
    drop(running);

    let out = env
        .run(&["db", "copy", "--from", &env.db_url, "--to", &pg.url])
        .await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("copied") && stderr.contains("rows ("),
        "progress: {stderr}"
    );
    assert!(
        stdout.contains("audit chain of the copy verified"),
        "{stdout}"
    );
    assert!(
        stdout.contains("users") && stdout.contains("audit_events"),
        "{stdout}"
    );

    // The copy serves: the CLI against PostgreSQL sees the token and the trail.
    let mut on_pg = env.cmd(&["token", "list"]);
    on_pg.env("TEAMCITY_SCIM_DATABASE__URL", &pg.url);
    let listed = on_pg.output().expect("token list");
    assert!(text(&listed).0.contains("okta"), "{:?}", text(&listed));

    // Never into a database that has rows.
    let out = env
        .run(&["db", "copy", "--from", &env.db_url, "--to", &pg.url])
        .await;
    let (_, stderr) = text(&out);
    assert!(!out.status.success());
    assert!(stderr.contains("not empty"), "{stderr}");
}
