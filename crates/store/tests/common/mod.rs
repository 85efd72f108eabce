//! One test story for both backends: every store test runs against SQLite and, when it is
//! reachable, PostgreSQL.
//!
//! PostgreSQL: the server named by `TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, used only to create and drop databases); each
//! test gets its own database `store_test_<random>`, dropped when the test ends (also when it
//! panics). When the server is unreachable the tests run on SQLite alone and say
//! `SKIPPED (PostgreSQL): <reason>` — unless `CI` is set, where that is a failure.

#![allow(dead_code)]

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use sqlx::{ConnectOptions, Connection};
use store::{DynStore, FixedClock};

const DEFAULT_SERVER: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A backend to run a test against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
        })
    }
}

fn server_url() -> String {
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| DEFAULT_SERVER.to_owned())
}

/// The backends to run on: SQLite always, PostgreSQL when its server answers.
pub(crate) async fn backends() -> Vec<Backend> {
    let url = server_url();
    let reachable = async {
        let opts = sqlx::postgres::PgConnectOptions::from_str(&url).map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(std::time::Duration::from_secs(5), opts.connect())
            .await
            .map_err(|_| "connection timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        conn.close().await.map_err(|e| e.to_string())
    }
    .await;
    match reachable {
        Ok(()) => vec![Backend::Sqlite, Backend::Postgres],
        Err(reason) if std::env::var_os("CI").is_some() => {
            panic!("PostgreSQL at TEST_DATABASE_URL is unreachable and CI is set: {reason}")
        }
        Err(reason) => {
            eprintln!("SKIPPED (PostgreSQL): {reason}");
            vec![Backend::Sqlite]
        }
    }
}

/// Direct access to the database under the store, for tests that tamper with rows.
pub(crate) enum Raw {
    Sqlite(sqlx::SqlitePool),
    Postgres(sqlx::PgPool),
}

impl Raw {
    /// Runs one statement without parameters.
    pub(crate) async fn exec(&self, sql: &str) {
        let q = sqlx::AssertSqlSafe(sql.to_owned());
        match self {
            Raw::Sqlite(p) => sqlx::query(q).execute(p).await.map(drop),
            Raw::Postgres(p) => sqlx::query(q).execute(p).await.map(drop),
        }
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

/// A store on a fresh database of `backend`, with what the test needs to reach under it.
pub(crate) struct TestDb {
    pub(crate) store: DynStore,
    pub(crate) url: String,
    pub(crate) clock: Arc<FixedClock>,
    pub(crate) raw: Raw,
    pub(crate) backend: Backend,
    _guard: Guard,
}

enum Guard {
    Dir(tempfile::TempDir),
    Database { server: String, name: String },
}

impl Drop for Guard {
    fn drop(&mut self) {
        let Guard::Database { server, name } = self else {
            return;
        };
        let (server, db) = (server.clone(), name.clone());
        // Drop runs inside the test's runtime: drop the database from a thread of its own.
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&server).await?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await?;
                conn.close().await
            })
        })
        .join();
        if let Ok(Err(e)) = dropped {
            eprintln!("could not drop test database {name}: {e}");
        }
    }
}

/// `url` (a server URL) naming database `name` instead.
fn with_database(url: &str, name: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, Some(q)),
        None => (url, None),
    };
    let after_scheme = head.find("://").map_or(0, |i| i + 3);
    let base = match head[after_scheme..].find('/') {
        Some(i) => &head[..after_scheme + i],
        None => head,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// Opens a store on a fresh database; `file` names the SQLite file.
pub(crate) async fn open(backend: Backend, file: &str, clock: Arc<FixedClock>) -> TestDb {
    eprintln!("-- backend: {backend}");
    match backend {
        Backend::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            let url = format!("sqlite://{}/{file}", dir.path().display());
            let store = store::open(&url, clock.clone()).await.unwrap();
            let raw = Raw::Sqlite(sqlx::SqlitePool::connect(&url).await.unwrap());
            TestDb {
                store,
                url,
                clock,
                raw,
                backend,
                _guard: Guard::Dir(dir),
            }
        }
        Backend::Postgres => {
            let server = server_url();
            let name = format!("store_test_{}", uuid::Uuid::new_v4().simple());
            let mut conn = sqlx::PgConnection::connect(&server).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
                .execute(&mut conn)
                .await
                .unwrap();
            conn.close().await.unwrap();
            let guard = Guard::Database {
                server: server.clone(),
                name: name.clone(),
            };
            let url = with_database(&server, &name);
            let store = store::open(&url, clock.clone()).await.unwrap();
            let raw = Raw::Postgres(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect(&url)
                    .await
                    .unwrap(),
            );
            TestDb {
                store,
                url,
                clock,
                raw,
                backend,
                _guard: guard,
            }
        }
    }
}

/// Declares `#[tokio::test] async fn $name()` running `$body(d)` on every backend in turn,
/// where `d` comes from the test file's `db(backend)`.
#[macro_export]
macro_rules! both {
    ($name:ident, $body:ident) => {
        #[tokio::test]
        async fn $name() {
            for backend in common::backends().await {
                $body(db(backend).await).await;
            }
        }
    };
}
