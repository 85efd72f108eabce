//! Exact lookups that arrive together share one query.
//!
//! Every IdP looks a user up by `userName eq "…"` before it creates one, many at a time, and
//! no cache can answer a name that exists nowhere. On PostgreSQL each such query costs a round
//! trip and a backend's parse, plan and executor start far above its index probe. So a lookup
//! whose page is one parameter away from another's (same resource type, filter shape, columns,
//! sort and page; only the value differs) is queued, and a worker runs whatever is queued in one
//! statement: the lookup's own query as a `LATERAL` subquery over the values, each row tagged
//! with the number of the lookup it answers.
//!
//! Each lookup is answered by a query sent after it was queued, so it sees every write committed
//! before it asked, as its own query would. The statement reads one snapshot.

use std::collections::HashMap;
use std::sync::Arc;

use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, PgPool, Row};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::{StoreError, StoreResult};

/// Workers, so one batch is sent while the one before it is still in flight.
const WORKERS: usize = 2;
/// Most lookups one statement carries.
const MAX_BATCH: usize = 256;

/// A lookup: a query of one text parameter (`$1`, once), the order of its rows in terms of its
/// columns as `x` (`x.lookup_sort ASC, …`), and its value.
struct Lookup {
    sql: String,
    order: String,
    value: String,
    reply: oneshot::Sender<StoreResult<Vec<PgRow>>>,
}

/// The queue of lookups and its workers (which stop when the last handle is dropped).
#[derive(Debug, Clone)]
pub(crate) struct Lookups {
    queue: mpsc::Sender<Lookup>,
}

impl std::fmt::Debug for Lookup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lookup").field("sql", &self.sql).finish()
    }
}

impl Lookups {
    /// Starts the workers on the current runtime, reading through `pool`.
    pub(crate) fn spawn(pool: PgPool) -> Self {
        let (queue, rx) = mpsc::channel(4 * MAX_BATCH);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WORKERS {
            tokio::spawn(work(pool.clone(), rx.clone()));
        }
        Lookups { queue }
    }

    /// The rows of `sql` (whose one parameter is `$1`, appearing once) with `$1 = value`, in
    /// `sql`'s order, which `order` states over its columns (as `x.<column>`): a shared
    /// statement sorts by lookup, then by `order`.
    pub(crate) async fn fetch(
        &self,
        sql: String,
        order: String,
        value: String,
    ) -> StoreResult<Vec<PgRow>> {
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Unavailable("the lookup workers have stopped".into());
        self.queue
            .send(Lookup {
                sql,
                order,
                value,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// Whether `sql` can be batched: one parameter, `$1`, appearing once.
pub(crate) fn batchable(sql: &str) -> bool {
    sql.matches('$').count() == 1
        && sql
            .split_once("$1")
            .is_some_and(|(_, rest)| !rest.starts_with(|c: char| c.is_ascii_digit()))
}

async fn work(pool: PgPool, rx: Arc<Mutex<mpsc::Receiver<Lookup>>>) {
    loop {
        let mut batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
                return;
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(l) => batch.push(l),
                    Err(_) => break,
                }
            }
            batch
        };
        // A lookup whose caller went away needs no answer.
        batch.retain(|l| !l.reply.is_closed());
        let mut shapes: HashMap<String, Vec<Lookup>> = HashMap::new();
        for l in batch {
            shapes.entry(l.sql.clone()).or_default().push(l);
        }
        for (sql, lookups) in shapes {
            run(&pool, &sql, lookups).await;
        }
    }
}

/// One statement for `lookups` (all of shape `sql`), and each one's rows to its caller.
async fn run(pool: &PgPool, sql: &str, lookups: Vec<Lookup>) {
    if let [_] = lookups.as_slice() {
        let l = lookups.into_iter().next().expect("one lookup");
        let rows = sqlx::query(AssertSqlSafe(l.sql))
            .bind(l.value)
            .fetch_all(pool)
            .await
            .map_err(StoreError::from);
        let _ = l.reply.send(rows);
        return;
    }
    let joined = format!(
        "SELECT q.n AS lookup_n, x.* FROM UNNEST($1::text[]) WITH ORDINALITY AS q(v, n) \
         CROSS JOIN LATERAL ({}) x ORDER BY q.n, {}",
        sql.replacen("$1", "q.v", 1),
        lookups[0].order
    );
    let values: Vec<&str> = lookups.iter().map(|l| l.value.as_str()).collect();
    match sqlx::query(AssertSqlSafe(joined))
        .bind(values)
        .fetch_all(pool)
        .await
    {
        Ok(rows) => {
            let mut each: Vec<Vec<PgRow>> = lookups.iter().map(|_| Vec::new()).collect();
            for row in rows {
                let n: i64 = match row.try_get("lookup_n") {
                    Ok(n) => n,
                    Err(e) => return fail(lookups, &StoreError::from(e)),
                };
                match usize::try_from(n - 1).ok().and_then(|i| each.get_mut(i)) {
                    Some(list) => list.push(row),
                    None => {
                        let e = StoreError::Other(format!("a lookup row for #{n}").into());
                        return fail(lookups, &e);
                    }
                }
            }
            for (l, rows) in lookups.into_iter().zip(each) {
                let _ = l.reply.send(Ok(rows));
            }
        }
        Err(e) => fail(lookups, &StoreError::from(e)),
    }
}

/// The same error to every caller of a failed statement (its kind kept: 503 stays 503).
fn fail(lookups: Vec<Lookup>, e: &StoreError) {
    for l in lookups {
        let each = match e {
            StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
            other => StoreError::Other(other.to_string().into()),
        };
        let _ = l.reply.send(Err(each));
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_a_query_of_one_parameter_is_batched() {
        for (sql, ok) in [
            (
                "SELECT t.id FROM users t WHERE t.user_name_ci = $1 LIMIT 1",
                true,
            ),
            (
                "SELECT t.id FROM users t WHERE t.a = $1 AND t.b = $2",
                false,
            ),
            ("SELECT t.id FROM users t WHERE t.a = $10", false),
            ("SELECT t.id FROM users t", false),
        ] {
            assert_eq!(super::batchable(sql), ok, "{sql}");
        }
    }
}
