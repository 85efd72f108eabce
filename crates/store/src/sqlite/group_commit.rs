//! SQLite's statements for the group-commit writer (`crate::group_commit`): a batch is one
//! `BEGIN IMMEDIATE` transaction on the one write connection, its audit events and outbox rows
//! appended at its end ([`BatchTx`]).

use std::future::Future;

use scim::schema::ResourceKind;
use serde_json::Value;
use time::OffsetDateTime;

use super::{BatchTx, SqliteStore};
use crate::common::read_back;
use crate::group_commit::Writer;
use crate::{MembershipChange, NewMember, Resource, StoreError, StoreResult, WriteCtx};

impl Writer for SqliteStore {
    type Tx = BatchTx;

    fn begin(&self) -> impl Future<Output = StoreResult<BatchTx>> + Send {
        BatchTx::begin(self)
    }

    async fn savepoint(tx: &mut BatchTx) -> StoreResult<()> {
        tx.savepoint().await
    }

    /// Released with the next command's savepoint, or by the commit.
    async fn keep(_tx: &mut BatchTx) -> StoreResult<()> {
        Ok(())
    }

    async fn undo(tx: &mut BatchTx) -> StoreResult<()> {
        tx.undo().await
    }

    async fn commit(tx: BatchTx) -> StoreResult<()> {
        tx.commit().await
    }

    fn create_in<'a>(
        tx: &'a mut BatchTx,
        ctx: &'a WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &'a str,
        attrs: &'a Value,
        members: Option<&'a [NewMember]>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a {
        SqliteStore::create_in(tx, ctx, now, kind, id, attrs, members)
    }

    fn replace_in<'a>(
        tx: &'a mut BatchTx,
        ctx: &'a WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &'a str,
        expected: Option<i64>,
        attrs: &'a Value,
        members: Option<&'a [NewMember]>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a {
        SqliteStore::replace_in(tx, ctx, now, kind, id, expected, attrs, members)
    }

    /// The resource is read back by the writer (an in-process read costs little).
    #[allow(clippy::too_many_arguments)]
    async fn update_in(
        tx: &mut BatchTx,
        ctx: &WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &str,
        expected: Option<i64>,
        attrs: Option<&Value>,
        members: &[MembershipChange],
    ) -> StoreResult<(bool, Option<Resource>)> {
        let changed =
            SqliteStore::update_in(tx, ctx, now, kind, id, expected, attrs, members).await?;
        Ok((changed, None))
    }

    fn delete_in<'a>(
        tx: &'a mut BatchTx,
        ctx: &'a WriteCtx,
        now: OffsetDateTime,
        kind: ResourceKind,
        id: &'a str,
        expected: Option<i64>,
    ) -> impl Future<Output = StoreResult<()>> + Send + 'a {
        SqliteStore::delete_in(tx, ctx, now, kind, id, expected)
    }

    fn read_in<'a>(
        &'a self,
        tx: &'a mut BatchTx,
        kind: ResourceKind,
        id: &'a str,
    ) -> impl Future<Output = StoreResult<Resource>> + Send + 'a {
        self.read_one_tx(tx.tx(), kind, id, read_back(kind))
    }

    fn now(&self) -> OffsetDateTime {
        SqliteStore::now(self)
    }

    fn written(&self) {
        SqliteStore::written(self)
    }

    fn queue(&self) -> Option<&tokio::sync::mpsc::Sender<crate::group_commit::Job>> {
        self.writer.as_ref()
    }

    fn stopped() -> StoreError {
        StoreError::Unavailable("the SQLite writer has stopped".into())
    }
}
