//! Leases and fenced writes on PostgreSQL (see [`crate::Store::acquire_lease`]).

use std::sync::Arc;
use std::time::Duration;

use super::{PostgresStore, Tx};
use crate::common::{
    LEASE_ACQUIRE, LEASE_CHECK, LEASE_RELEASE, LEASE_RENEW, fenced_error, lease, lease_until,
};
use crate::{DynStore, Fence, Lease, StoreResult, timefmt};

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
    pub(super) async fn lease_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> StoreResult<Option<Lease>> {
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

    pub(super) async fn lease_renew(&self, f: &Fence, ttl: Duration) -> StoreResult<Lease> {
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

    pub(super) async fn lease_release(&self, f: &Fence) -> StoreResult<()> {
        sqlx::query(LEASE_RELEASE)
            .bind(timefmt::format(self.now()))
            .bind(&f.name)
            .bind(&f.holder)
            .bind(f.epoch)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) fn with_fence(&self, fence: Fence) -> DynStore {
        let mut s = self.clone();
        s.fence = Some(Arc::new(fence));
        Arc::new(s)
    }
}
