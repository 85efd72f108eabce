//! Moving a whole deployment between backends (`teamcity-scim db copy`): every table's rows as
//! they are — ids, versions, sequence numbers and audit hashes kept — so the copy is the same
//! deployment, its audit chain still verifies and its outbox resumes where it stopped.

/// The tables a copy moves, in an order that satisfies every reference between them.
pub const COPY_TABLES: &[CopyTable] = &[
    CopyTable::new("users", "seq"),
    CopyTable::new("groups", "seq"),
    CopyTable::new("group_members", "group_id, member_id"),
    CopyTable::new("api_tokens", "id"),
    CopyTable::new("audit_events", "seq"),
    CopyTable::new("audit_checkpoints", "id"),
    CopyTable::new("outbox", "id"),
    CopyTable::new("mappings", "kind, scim_id"),
    CopyTable::new("held_batches", "id"),
    CopyTable::new("policy_pins", "rule"),
    CopyTable::new("sync_state", "key"),
];

/// A table a copy moves and the columns that order its rows stably.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyTable {
    /// Table name.
    pub name: &'static str,
    /// `ORDER BY` columns (its primary key).
    pub order: &'static str,
}

impl CopyTable {
    const fn new(name: &'static str, order: &'static str) -> Self {
        CopyTable { name, order }
    }
}

/// One stored value, whatever the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// An integer.
    Int(i64),
    /// Text.
    Text(String),
    /// Bytes (token hashes).
    Bytes(Vec<u8>),
}

/// Rows of one table, every column by name.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rows {
    /// Column names, in the order of each row's cells.
    pub columns: Vec<String>,
    /// The rows.
    pub rows: Vec<Vec<Cell>>,
}

/// The copy table named `name`, if it is one (table names are never taken from input).
pub fn copy_table(name: &str) -> Option<&'static CopyTable> {
    COPY_TABLES.iter().find(|t| t.name == name)
}

/// Rows moved per chunk (one transaction on the target each).
const CHUNK: i64 = 1000;

/// Copies every table from `from` to `to`, which must be empty, then moves `to`'s sequences and
/// chain head past the copied rows and checks that every table holds as many rows as the
/// source. `progress(table, done, total)` is called after every chunk. Returns the rows copied
/// per table. Nothing must write to either store meanwhile.
pub async fn copy_all(
    from: &crate::DynStore,
    to: &crate::DynStore,
    mut progress: impl FnMut(&str, u64, u64),
) -> crate::StoreResult<Vec<(&'static str, i64)>> {
    use crate::StoreError;
    for t in COPY_TABLES {
        let n = to.copy_count(t).await?;
        if n > 0 {
            return Err(StoreError::Invalid(format!(
                "the target database is not empty ({} has {n} rows): `db copy` only fills a new, \
                 empty database",
                t.name
            )));
        }
    }
    let mut counts = Vec::with_capacity(COPY_TABLES.len());
    for t in COPY_TABLES {
        counts.push((t, from.copy_count(t).await?));
    }
    let total: u64 = counts.iter().map(|(_, n)| *n as u64).sum();
    if total == 0 {
        return Err(StoreError::Invalid(
            "the source database is empty: nothing to copy (is it the right URL?)".into(),
        ));
    }
    let mut done = 0u64;
    progress("", 0, total);
    for (t, _) in &counts {
        let mut offset = 0;
        loop {
            let rows = from.copy_out(t, offset, CHUNK).await?;
            if rows.rows.is_empty() {
                break;
            }
            let k = rows.rows.len() as i64;
            to.copy_in(t, &rows).await?;
            offset += k;
            done += k as u64;
            progress(t.name, done, total);
        }
    }
    to.copy_finish().await?;
    let mut out = Vec::with_capacity(counts.len());
    for (t, n) in counts {
        let copied = to.copy_count(t).await?;
        if copied != n {
            return Err(StoreError::Other(
                format!(
                    "{}: {n} rows in the source but {copied} in the target (was the source written \
                     to during the copy?)",
                    t.name
                )
                .into(),
            ));
        }
        out.push((t.name, n));
    }
    Ok(out)
}
