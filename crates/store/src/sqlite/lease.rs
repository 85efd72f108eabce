//! Leases and fenced writes on SQLite (see [`crate::Leases::acquire_lease`]). One process writes
//! a SQLite database, so it always gets the lease; the same code path runs as on PostgreSQL.

use std::sync::Arc;

use super::{SqliteStore, Tx};
use crate::common::{
    LEASE_ACQUIRE, LEASE_CHECK, LEASE_RELEASE, LEASE_RENEW, fenced_error, lease, lease_until,
};
use crate::{DynStore, Fence, StoreResult, timefmt};

/// Fails with `Fenced` unless `f` holds inside `tx` (a `BEGIN IMMEDIATE` transaction: no
/// other write, a takeover included, can commit until it ends).
pub(super) async fn check(tx: &mut Tx, f: &Fence, now: &str) -> StoreResult<()> {
    let held: Option<(i64,)> = sqlx::query_as(LEASE_CHECK)
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

impl SqliteStore {
    pub(super) fn with_fence(&self, fence: Fence) -> DynStore {
        let mut s = self.clone();
        s.fences.push(Arc::new(fence));
        // Fenced writes go straight to their own transaction (each checks the fence).
        s.writer = None;
        Arc::new(s)
    }
}

#[async_trait::async_trait]
impl crate::Leases for SqliteStore {
    async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: std::time::Duration,
    ) -> StoreResult<Option<crate::Lease>> {
        let now = self.now();
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(i64, String)> = sqlx::query_as(LEASE_ACQUIRE)
            .bind(name)
            .bind(holder)
            .bind(lease_until(now, ttl))
            .bind(timefmt::format(now))
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        row.map(|(epoch, exp)| lease(name, holder, epoch, &exp))
            .transpose()
    }

    async fn renew_lease(
        &self,
        f: &crate::Fence,
        ttl: std::time::Duration,
    ) -> StoreResult<crate::Lease> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        let row: Option<(String,)> = sqlx::query_as(LEASE_RENEW)
            .bind(lease_until(self.now(), ttl))
            .bind(&f.name)
            .bind(&f.holder)
            .bind(f.epoch)
            .fetch_optional(&mut *tx)
            .await?;
        tx.commit().await?;
        match row {
            Some((exp,)) => lease(&f.name, &f.holder, f.epoch, &exp),
            None => Err(fenced_error(f)),
        }
    }

    async fn release_lease(&self, f: &crate::Fence) -> StoreResult<()> {
        let mut tx = self.write.begin_with("BEGIN IMMEDIATE").await?;
        sqlx::query(LEASE_RELEASE)
            .bind(timefmt::format(self.now()))
            .bind(&f.name)
            .bind(&f.holder)
            .bind(f.epoch)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    fn fenced(&self, fence: crate::Fence) -> crate::DynStore {
        self.with_fence(fence)
    }
}
