//! [`Directory`](crate::Directory) on PostgreSQL.

use super::*;
use crate::Directory;

#[async_trait]
impl Directory for PostgresStore {
    async fn directory(&self) -> StoreResult<crate::DirectorySnapshot> {
        self.sync_directory().await
    }

    async fn directory_of(
        &self,
        users: &[String],
        groups: &[String],
    ) -> StoreResult<crate::DirectorySnapshot> {
        self.sync_directory_of(users, groups).await
    }
}
