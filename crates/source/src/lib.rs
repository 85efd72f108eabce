//! Pull mode: the directory read from an identity provider's API (Microsoft Graph, Okta) instead
//! of received as SCIM pushes.
//!
//! A [`Source`] turns the IdP's API into [`Round`]s of [`Change`]s in one neutral model; the
//! [`apply`] module turns a round into the same store writes a SCIM push makes (resource rows,
//! membership rows, audit event and outbox row, in one transaction with the round's cursor), so
//! the engine, policy, guard and audit downstream are the same for push and pull.
//!
//! Crate edges: `source` knows the store and SCIM resources; it never calls TeamCity.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;

pub mod apply;
pub mod graph;
pub mod http;
pub mod jwt;
pub mod okta;
pub mod pull;

/// A user as the IdP describes it, mapped to what a SCIM push would carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceUser {
    /// The IdP's immutable object id (Graph `id`, Okta `id`): stored as the SCIM `externalId`.
    pub id: String,
    /// The SCIM `userName` (Graph `userPrincipalName`, Okta `profile.login`, by default).
    pub user_name: String,
    /// `name.givenName`.
    pub given_name: Option<String>,
    /// `name.familyName`.
    pub family_name: Option<String>,
    /// `displayName`.
    pub display_name: Option<String>,
    /// The primary work email.
    pub email: Option<String>,
    /// `active` (Graph `accountEnabled`; Okta: not DEPROVISIONED / SUSPENDED / ...).
    pub active: bool,
}

/// A group as the IdP describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceGroup {
    /// The IdP's immutable object id: stored as the SCIM `externalId`.
    pub id: String,
    /// `displayName`.
    pub display_name: String,
}

/// One change the IdP reported. Ids are the IdP's object ids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A user created or changed, with every attribute the bridge reads (not a partial update).
    User(SourceUser),
    /// A user deleted in the IdP. `hard`: permanently (Graph `@removed.reason = "deleted"`);
    /// otherwise soft-deleted / restorable (Graph `"changed"`), which the bridge treats as
    /// deactivated.
    UserRemoved {
        /// The IdP's object id.
        id: String,
        /// Permanently deleted.
        hard: bool,
    },
    /// A group created or renamed.
    Group(SourceGroup),
    /// A group deleted in the IdP (or no longer readable).
    GroupRemoved {
        /// The IdP's object id.
        id: String,
    },
    /// Incremental membership change of one group (Graph `members@delta`).
    Members {
        /// The group's object id.
        group: String,
        /// User object ids added.
        added: Vec<String>,
        /// User object ids removed.
        removed: Vec<String>,
    },
    /// The complete direct user membership of one group (a full read).
    AllMembers {
        /// The group's object id.
        group: String,
        /// Every user object id that is a direct member.
        members: Vec<String>,
    },
}

/// What one pull returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Round {
    /// The changes, in the order the IdP reported them.
    pub changes: Vec<Change>,
    /// A full enumeration (first sync, or a resync after the IdP refused the stored cursor):
    /// every in-scope group appears with `AllMembers` and every user the IdP still has appears
    /// as `User`; what is stored but not mentioned is gone from the IdP.
    pub full: bool,
    /// The position to resume from next time (opaque to everyone but the source that made it);
    /// stored in the same transaction as the changes it carried.
    pub cursor: String,
    /// Why this round is full although a cursor was given (e.g. "the delta link expired"), for
    /// the audit event and the log.
    pub resync_reason: Option<String>,
    /// HTTP requests this round made to the IdP (for the audit event and benchmarks).
    pub requests: u64,
}

/// What `source check` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Who the bridge authenticated as (app id, token owner...).
    pub identity: String,
    /// Permissions / scopes verified, each with whether it is granted.
    pub permissions: Vec<(String, bool)>,
    /// The configured groups: (object id, display name or the error reading it, member count).
    pub groups: Vec<(String, Result<String, String>, usize)>,
}

/// Errors of a source. The classification decides what the pull loop does.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// Worth retrying later (network, 5xx, throttling past the retry budget).
    #[error("{0}")]
    Transient(String),
    /// The bridge is misconfigured (bad credentials, missing permission, wrong tenant or URL):
    /// retrying without an operator changes nothing. The message says what to fix.
    #[error("{0}")]
    Config(String),
    /// The IdP answered something the bridge cannot read.
    #[error("{0}")]
    Protocol(String),
}

/// Result alias.
pub type SourceResult<T> = Result<T, SourceError>;

/// An identity provider's API, read on a schedule.
#[async_trait]
pub trait Source: Send + Sync + std::fmt::Debug {
    /// `graph` or `okta`: for logs, metrics and the audit trail.
    fn kind(&self) -> &'static str;

    /// Reads what changed since `cursor` (`None`: the first sync, a full enumeration). When
    /// the IdP refuses the cursor (expired), the source starts over itself and returns a full
    /// round with `resync_reason` set.
    async fn pull(&self, cursor: Option<&str>) -> SourceResult<Round>;

    /// Reads one user by object id (a user who joined an in-scope group but did not change, so
    /// no user change carried their attributes). `None` when the IdP has no such user.
    async fn user(&self, id: &str) -> SourceResult<Option<SourceUser>>;

    /// Verifies credentials and permissions and reads the configured groups.
    async fn check(&self) -> SourceResult<CheckReport>;
}

/// A secret kept in a file, re-read when the file changes (rotation without a restart). Its
/// value is never logged: `Debug` shows the path only.
pub struct SecretFile {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, String)>>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .finish()
    }
}

impl SecretFile {
    /// A secret read from `path` (trimmed of surrounding whitespace).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SecretFile {
            path: path.into(),
            cached: Mutex::new(None),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// The current value: the cached one unless the file's modification time moved.
    pub fn get(&self) -> SourceResult<String> {
        let what = |e: std::io::Error| {
            SourceError::Config(format!("cannot read {}: {e}", self.path.display()))
        };
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .map_err(what)?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = cached.as_ref()
            && *at == modified
        {
            return Ok(value.clone());
        }
        let value = std::fs::read_to_string(&self.path)
            .map_err(what)?
            .trim()
            .to_string();
        if value.is_empty() {
            return Err(SourceError::Config(format!(
                "{} is empty",
                self.path.display()
            )));
        }
        *cached = Some((modified, value.clone()));
        Ok(value)
    }
}

/// How long a pull waits in total for an IdP that throttles (429 / 503 with `Retry-After`)
/// before the round is given up as transient and retried at the next interval.
pub const THROTTLE_BUDGET: Duration = Duration::from_secs(120);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_file_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "first\n").unwrap();
        let s = SecretFile::new(&path);
        assert_eq!(s.get().unwrap(), "first");
        // Rotation: a new value (and a new modification time) is picked up without a restart.
        std::fs::write(&path, "second").unwrap();
        let later = SystemTime::now() + Duration::from_secs(2);
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(s.get().unwrap(), "second");
        // Empty or missing: a configuration error naming the file, never a value.
        std::fs::write(&path, "  \n").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(later + Duration::from_secs(2))
            .unwrap();
        assert!(matches!(s.get(), Err(SourceError::Config(m)) if m.contains("is empty")));
        std::fs::remove_file(&path).unwrap();
        let e = s.get().unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("secret"), "{e}");
        assert_eq!(format!("{s:?}"), format!("SecretFile {{ path: {path:?} }}"));
    }
}
