//! The audit event and its hash chain.
//!
//! Each event's `hash` is the SHA-256 of the previous event's hash and the event's own canonical
//! JSON, so editing, inserting or deleting a row breaks every later link. [`verify_chain`] names
//! the first broken one. Details never carry tokens, passwords or email addresses.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first event.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// Sequence number, gap-free from 1.
    pub seq: i64,
    /// When it happened (stored timestamp form).
    pub time: String,
    /// `token:<id>`, `cli`, `reconciler`.
    pub actor: String,
    /// The HTTP request id, if any.
    pub request_id: Option<String>,
    /// `User`, `Group`, `Token`.
    pub resource_type: String,
    /// The resource's id.
    pub resource_id: Option<String>,
    /// e.g. `create`, `replace`, `patch`, `delete`, `token.create`.
    pub operation: String,
    /// `success` or `failure`.
    pub outcome: String,
    /// HTTP status or equivalent.
    pub status: Option<i64>,
    /// Canonical JSON detail.
    pub detail: String,
    /// The previous event's hash.
    pub prev_hash: String,
    /// This event's hash.
    pub hash: String,
}

impl AuditEvent {
    /// The canonical JSON the hash covers: every field but the hashes, keys sorted.
    pub fn canonical_json(&self) -> String {
        let detail: Value =
            serde_json::from_str(&self.detail).unwrap_or(Value::String(self.detail.clone()));
        json!({
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "request_id": self.request_id,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "operation": self.operation,
            "outcome": self.outcome,
            "status": self.status,
            "detail": detail,
        })
        .to_string()
    }

    /// The hash this event should carry given its `prev_hash`.
    pub fn compute_hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.prev_hash.as_bytes());
        h.update(b"\n");
        h.update(self.canonical_json().as_bytes());
        hex::encode(h.finalize())
    }
}

/// Checks a run of consecutive events starting after `prev_hash`. Returns the sequence number
/// of the first event whose link or hash is wrong.
pub fn verify_chain<'a>(
    prev_hash: &str,
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Result<String, i64> {
    let mut prev = prev_hash.to_owned();
    for e in events {
        if e.prev_hash != prev || e.compute_hash() != e.hash {
            return Err(e.seq);
        }
        prev = e.hash.clone();
    }
    Ok(prev)
}
