//! Persistence for teamcity-scim behind one backend-neutral [`Store`] trait.
//!
//! The store owns the SCIM resources (canonical JSON plus indexed columns), group membership as
//! rows, SCIM bearer tokens (hashes only), the hash-chained audit trail and the transactional
//! outbox. **Every mutating command writes its change, its audit event and its outbox row in one
//! database transaction**; nothing else audits or enqueues. Nothing above this trait knows which
//! database is in use; the implementations live in [`sqlite`] and [`postgres`], the logic they
//! share (everything that is not SQL) in `common`.
//!
//! This crate does no HTTP and never talks to TeamCity.

use std::sync::Arc;

use scim::filter::Filter;
use scim::{AttrPath, ResourceKind};
use serde_json::Value;
use time::OffsetDateTime;

pub mod access;
pub mod audit;
mod capability;
mod clock;
mod common;
pub mod copy;
mod group_commit;
pub mod postgres;
mod state;
pub use postgres::redact_url;
mod sql_filter;
pub mod sqlite;
pub mod sync_model;
pub mod timefmt;

pub use capability::{
    AuditLog, Directory, HeldBatches, Leases, Mappings, Outbox, Resources, SyncState, TableCopy,
    Tokens,
};
pub use clock::{Clock, FixedClock, SystemClock};
pub use state::{HeldState, OutboxState, UnknownState};

/// The capability traits, imported anonymously: `use store::prelude::*;` brings their methods
/// into scope (for calls on a [`DynStore`]) without taking their names.
pub mod prelude {
    pub use crate::capability::{
        AuditLog as _, Directory as _, HeldBatches as _, Leases as _, Mappings as _, Outbox as _,
        Resources as _, SyncState as _, TableCopy as _, Tokens as _,
    };
}
pub use sync_model::{
    AuditEntry, ClaimedEntity, DirGroup, DirUser, DirectorySnapshot, FailedItem, HeldBatch,
    Mapping, MappingLink, OutboxEntry, OutboxSummary, RetryPolicy, backoff,
};

/// Errors a store command reports. Callers branch on these variants only.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The resource does not exist (404).
    #[error("not found")]
    NotFound,
    /// A uniqueness constraint was violated (409 `uniqueness`); the text names the attribute.
    #[error("{0}")]
    Conflict(String),
    /// The expected version did not match (412).
    #[error("version mismatch")]
    PreconditionFailed,
    /// The request named something that cannot be stored, e.g. a member that does not exist
    /// (400 `invalidValue`).
    #[error("{0}")]
    Invalid(String),
    /// A write made under a [`Fence`] whose lease is no longer held (another holder took it
    /// over, or it ran out): nothing was written. The text names the lease.
    #[error("{0}")]
    Fenced(String),
    /// The database cannot be reached (connection refused or lost, pool timed out): nothing was
    /// written; try again (503).
    #[error("the database is unavailable: {0}")]
    Unavailable(String),
    /// Anything else: corrupt row, bug. Logged, answered as 500.
    #[error(transparent)]
    Other(#[from] anyhow_like::Error),
}

/// A tiny boxed error so the crate needs no `anyhow` dependency.
pub mod anyhow_like {
    /// A boxed error with a message.
    pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            // The server is away (refused, reset, closed; or a proxy / load balancer in front
            // of it accepts and drops the connection mid-handshake) or every connection is busy.
            sqlx::Error::Io(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed => StoreError::Unavailable(e.to_string()),
            // PostgreSQL shutting down or refusing connections: class 57P (operator
            // intervention), 08 (connection exception), 53300 (too many connections).
            sqlx::Error::Database(ref d)
                if d.code().is_some_and(|c| {
                    c.starts_with("57P") || c.starts_with("08") || c == "53300"
                }) =>
            {
                StoreError::Unavailable(e.to_string())
            }
            e => StoreError::Other(Box::new(e)),
        }
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(e: serde_json::Error) -> Self {
        StoreError::Other(Box::new(e))
    }
}

/// Result alias for store commands.
pub type StoreResult<T> = Result<T, StoreError>;

/// Who is writing, for the audit trail.
#[derive(Debug, Clone)]
pub struct WriteCtx {
    /// `token:<id>`, `cli`, `reconciler`.
    pub actor: String,
    /// The request id of the HTTP request, if any.
    pub request_id: Option<String>,
}

impl WriteCtx {
    /// A context for a CLI command.
    pub fn cli() -> Self {
        WriteCtx {
            actor: "cli".into(),
            request_id: None,
        }
    }
}

/// One write of a batch ([`Resources::write_batch`]); each is audited and enqueued exactly as the
/// single-resource command it mirrors.
#[derive(Debug, Clone)]
pub enum BatchOp {
    /// [`Resources::create`], with the id chosen by the caller (so later ops can name it).
    Create {
        /// Users or groups.
        kind: ResourceKind,
        /// The new resource's id.
        id: String,
        /// Its attributes.
        attrs: Value,
        /// A group's first members.
        members: Option<Vec<NewMember>>,
    },
    /// [`Resources::replace`] of the attributes at any version; a group's members are kept.
    Replace {
        /// Users or groups.
        kind: ResourceKind,
        /// The resource.
        id: String,
        /// Its new attributes.
        attrs: Value,
    },
    /// [`Resources::update_members`].
    Members {
        /// The group.
        id: String,
        /// The changes, in order.
        changes: Vec<MembershipChange>,
    },
    /// An audit event of its own ([`AuditLog::audit`]), e.g. what a whole batch did.
    Audit(AuditEntry),
    /// [`Resources::delete`] at any version.
    Delete {
        /// Users or groups.
        kind: ResourceKind,
        /// The resource.
        id: String,
    },
}

/// The type of a group member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MemberType {
    /// A user.
    User,
    /// A nested group.
    Group,
}

impl MemberType {
    /// `User` or `Group`.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberType::User => "User",
            MemberType::Group => "Group",
        }
    }

    /// Parses `User`/`Group` case-insensitively.
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("user") {
            Some(MemberType::User)
        } else if s.eq_ignore_ascii_case("group") {
            Some(MemberType::Group)
        } else {
            None
        }
    }
}

/// A member to add: its id and, if the client said, its type. A missing type is resolved by
/// looking the id up (users first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMember {
    /// The member's SCIM id.
    pub value: String,
    /// The member's type, if given.
    pub ty: Option<MemberType>,
    /// The display name the client sent, if any (echoed back, never derived).
    pub display: Option<String>,
}

/// A change to a group's membership, applied row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipChange {
    /// Add these members (already present ones are kept).
    Add(Vec<NewMember>),
    /// Remove these member ids (absent ones are ignored).
    Remove(Vec<String>),
    /// Remove every member.
    RemoveAll,
    /// Make the membership exactly this list.
    ReplaceAll(Vec<NewMember>),
}

/// A member as read back, with its current display name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRef {
    /// The member's SCIM id.
    pub value: String,
    /// The member's type.
    pub ty: MemberType,
    /// The display name the client sent with the member, if any.
    pub display: Option<String>,
}

/// A group a user belongs to, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupRef {
    /// The group's SCIM id.
    pub value: String,
    /// The group's `displayName`.
    pub display: String,
}

/// A stored SCIM resource.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    /// User or Group.
    pub kind: ResourceKind,
    /// The SCIM id (server-assigned, never reused).
    pub id: String,
    /// Canonical attributes, without `id`, `meta` and members.
    pub attrs: Value,
    /// Creation time.
    pub created: OffsetDateTime,
    /// Last modification time.
    pub last_modified: OffsetDateTime,
    /// Version counter; the ETag is derived from it.
    pub version: i64,
    /// Group members, when they were asked for.
    pub members: Option<Vec<MemberRef>>,
    /// A user's groups, when they were asked for.
    pub groups: Option<Vec<GroupRef>>,
}

/// What to load besides the attributes.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadOpts {
    /// Load a group's members.
    pub members: bool,
    /// Load a user's groups.
    pub groups: bool,
}

/// A list query. `filter` is evaluated in SQL where the attributes are indexed and in memory for
/// the rest (after an SQL pre-filter).
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// The filter, already validated against the resource type.
    pub filter: Option<Filter>,
    /// The sort attribute; `None` is the stable creation order.
    pub sort_by: Option<AttrPath>,
    /// Descending order.
    pub descending: bool,
    /// Zero-based offset of the first result.
    pub offset: usize,
    /// Page size (0 returns only the total).
    pub count: usize,
    /// Load members / groups for the returned resources.
    pub read: ReadOpts,
}

/// One page of a list. Cloning it is cheap (the resources are shared): the store keeps small
/// pages in its lookup cache and hands out clones.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// Number of resources matching the filter.
    pub total: usize,
    /// The requested page.
    pub resources: std::sync::Arc<[Resource]>,
}

/// What a token may be used for. A token of one scope is never accepted by the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum TokenScope {
    /// The SCIM API (identity providers).
    #[default]
    Scim,
    /// The read-only dashboard.
    Admin,
}

impl TokenScope {
    /// The stored form: `scim` or `admin`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenScope::Scim => "scim",
            TokenScope::Admin => "admin",
        }
    }

    /// Parses the stored form.
    pub fn parse(s: &str) -> Option<TokenScope> {
        match s {
            "scim" => Some(TokenScope::Scim),
            "admin" => Some(TokenScope::Admin),
            _ => None,
        }
    }
}

/// A stored bearer token (never the secret itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id, shown in `token list` and in the audit trail.
    pub id: String,
    /// What it may be used for.
    pub scope: TokenScope,
    /// Human-readable name.
    pub name: String,
    /// When it was created.
    pub created: OffsetDateTime,
    /// When it stops working, if ever.
    pub expires: Option<OffsetDateTime>,
    /// When it was revoked, if it was.
    pub revoked: Option<OffsetDateTime>,
}

impl TokenRecord {
    /// Whether the token may authenticate at `now`.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.revoked.is_none() && self.expires.is_none_or(|e| now < e)
    }
}

/// An outbox row, as the sync engine will consume it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxItem {
    /// Row id.
    pub id: i64,
    /// `user` or `group`.
    pub entity_type: String,
    /// The SCIM id of the changed entity.
    pub entity_id: String,
    /// `upsert`, `delete` or `members`.
    pub operation: String,
    /// JSON detail (e.g. the member ids a membership change touched).
    pub detail: String,
    /// The audit event written in the same transaction.
    pub audit_seq: i64,
    /// `pending`, `done`, `dead`, `held` or `dropped`.
    pub state: OutboxState,
    /// Attempts so far.
    pub attempts: i64,
}

pub use audit::{AuditEvent, Checkpoint};

/// The proof that a writer holds a lease ([`Leases::acquire_lease`]): every write made through
/// [`Leases::fenced`] checks, inside its own transaction, that the lease `name` is still held by
/// `holder` at `epoch` and has not run out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Fence {
    /// The lease, e.g. [`RECONCILE_LEASE`].
    pub name: String,
    /// Who holds it (a replica's id).
    pub holder: String,
    /// Moves on every time the lease changes hands.
    pub epoch: i64,
}

/// A lease as held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// What writes under it must present.
    pub fence: Fence,
    /// When it runs out unless renewed.
    pub expires: OffsetDateTime,
}

/// The lease the periodic reconcile runs under: one replica reconciles at a time.
pub const RECONCILE_LEASE: &str = "reconcile";

impl WriteCtx {
    /// The context of the outbox worker and the reconciler.
    pub fn sync() -> Self {
        WriteCtx {
            actor: "sync".into(),
            request_id: None,
        }
    }
}

/// Declares [`Store`] as every capability at once, with its blanket impl (one list of them).
macro_rules! store_of {
    ($(#[$doc:meta])* $($cap:ident),+ $(,)?) => {
        $(#[$doc])*
        pub trait Store: $($cap +)+ 'static {}

        impl<T: $($cap +)+ 'static> Store for T {}
    };
}

store_of!(
    /// The backend-neutral store: every capability at once. Implemented for whatever implements all
    /// of them (both backends do); a caller that needs only some takes those instead, e.g.
    /// `&dyn Resources` or `Arc<dyn Outbox>` (an `Arc<dyn Store>` converts to either). Every
    /// mutating method of every capability is one transaction that also appends its audit event
    /// (and, for resource writes, its outbox row).
    Resources, Tokens, Outbox, Mappings, AuditLog, HeldBatches, Leases, SyncState, Directory,
    TableCopy,
);

/// A shared store handle.
pub type DynStore = Arc<dyn Store>;

/// Opens the store a database URL names (`sqlite://PATH`, `sqlite::memory:`,
/// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB[?max_connections=N]`), creating (SQLite) and
/// migrating it as needed.
pub async fn open(url: &str, clock: Arc<dyn Clock>) -> StoreResult<DynStore> {
    if url.starts_with("sqlite:") {
        Ok(Arc::new(sqlite::SqliteStore::open(url, clock).await?))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::open(url, clock).await?))
    } else {
        Err(StoreError::Invalid(format!(
            "unsupported database URL scheme in `{}`: expected sqlite://PATH or postgres://…",
            url.split(':').next().unwrap_or(url)
        )))
    }
}
