//! Leases and fenced writes on PostgreSQL (see [`crate::Leases::acquire_lease`]).

use std::sync::Arc;
use std::time::Duration;

use super::{PostgresStore, Tx};
use crate::common::{
    LEASE_ACQUIRE, LEASE_CHECK, LEASE_RELEASE, LEASE_RENEW, fenced_error, lease, lease_until,
};
use crate::{DynStore, Fence, StoreResult, timefmt};

/// Fails with `Fenced` unless `f` holds inside `tx`. The lease row is share-locked until `tx`
/// ends: a takeover (an UPDATE of that row) waits for this write, or this check sees it.
pub(super) async fn check(tx: &mut Tx, f: &Fence, now: &str) -> StoreResult<()> {
    let sql = format!("{LEASE_CHECK} FOR SHARE");
    let held: Option<(i64,)> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(&f.name)
        .bind(&f.holder)
        .bind(f.epoch)
        .bind(now)
        .fetch_optional(&mut **tx)
        .await?;
    match held {
        Some(_) => Ok(()),
        None => Err(fenced_error(f)),
    }
}

impl PostgresStore {
    pub(super) fn with_fence(&self, fence: Fence) -> DynStore {
        let mut s = self.clone();
        s.fences.push(Arc::new(fence));
        // Fenced writes go straight to their own transaction (each checks the fence).
        s.writer = None;
        Arc::new(s)
    }
}

/// [`crate::Outbox::watch_outbox`]: a task that `LISTEN`s on [`super::OUTBOX_CHANNEL`] and
/// wakes `wake` on every notification, reconnecting (after a pause) whenever the connection
/// drops. Notifications sent while it is away are lost: the worker polls as well.
pub(super) fn spawn_outbox_listener(pool: sqlx::PgPool, wake: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect_with(&pool).await?;
                l.listen(super::OUTBOX_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            match listener.await {
                Ok(mut l) => {
                    // Something may have been written while nobody listened.
                    wake.notify_one();
                    loop {
                        match l.try_recv().await {
                            Ok(Some(_)) => wake.notify_one(),
                            // The connection dropped: listen again on a new one.
                            Ok(None) => break,
                            Err(e) => {
                                tracing::warn!(error = %e, "outbox LISTEN connection failed; polling until it is back");
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot LISTEN for outbox rows; polling until it works");
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

#[async_trait::async_trait]
impl crate::Leases for PostgresStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> StoreResult<Option<crate::Lease>> {
        let now = self.now();
        let row: Option<(i64, String)> = sqlx::query_as(LEASE_ACQUIRE)
            .bind(name)
            .bind(holder)
            .bind(lease_until(now, ttl))
            .bind(timefmt::format(now))
            .fetch_optional(&self.pool)
            .await?;
        row.map(|(epoch, exp)| lease(name, holder, epoch, &exp))
            .transpose()
    }

    async fn renew_lease(&self, f: &crate::Fence, ttl: Duration) -> StoreResult<crate::Lease> {
        let row: Option<(String,)> = sqlx::query_as(LEASE_RENEW)
            .bind(lease_until(self.now(), ttl))
            .bind(&f.name)
            .bind(&f.holder)
            .bind(f.epoch)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some((exp,)) => lease(&f.name, &f.holder, f.epoch, &exp),
            None => Err(fenced_error(f)),
        }
    }

    async fn release_lease(&self, f: &crate::Fence) -> StoreResult<()> {
        sqlx::query(LEASE_RELEASE)
            .bind(timefmt::format(self.now()))
            .bind(&f.name)
            .bind(&f.holder)
            .bind(f.epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    fn fenced(&self, fence: crate::Fence) -> crate::DynStore {
        self.with_fence(fence)
    }
}
