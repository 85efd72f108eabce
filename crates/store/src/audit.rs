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

    /// The event as one JSON object: the stored columns, `detail` as JSON, both hashes. The
    /// form of `audit export` lines and of what the streaming sinks deliver, so a receiver can
    /// check the chain itself (`hash` = SHA-256 of `prev_hash`, a newline and
    /// [`AuditEvent::canonical_json`]).
    pub fn to_json(&self) -> Value {
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
            "detail": serde_json::from_str::<Value>(&self.detail)
                .unwrap_or(Value::String(self.detail.clone())),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        })
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

/// Replaces every email address in the string values of `v` with `[email]`, so no audit detail
/// can carry one whatever its producer put there. An email is `local@domain.tld`; role texts
/// such as `PROJECT_VIEWER@p:Backend` have no dot after the `@` and are kept.
pub fn scrub_emails(v: &mut Value) {
    match v {
        Value::String(s) if s.contains('@') => *s = scrub_str(s),
        Value::Array(a) => a.iter_mut().for_each(scrub_emails),
        Value::Object(o) => o.values_mut().for_each(scrub_emails),
        _ => {}
    }
}

/// Whether a text looks like (or contains) an email address.
pub fn looks_like_email(s: &str) -> bool {
    s.contains('@') && scrub_str(s) != s
}

fn scrub_str(s: &str) -> String {
    let local = |c: char| c.is_alphanumeric() || "._%+-".contains(c);
    let domain = |c: char| c.is_alphanumeric() || ".-".contains(c);
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len());
    let mut i = 0;
    let mut copied = 0;
    while i < chars.len() {
        if chars[i] == '@' {
            let mut start = i;
            while start > copied && local(chars[start - 1]) {
                start -= 1;
            }
            let mut end = i + 1;
            while end < chars.len() && domain(chars[end]) {
                end += 1;
            }
            let dom: String = chars[i + 1..end].iter().collect();
            let dom = dom.trim_end_matches('.');
            if start < i && dom.contains('.') && !dom.starts_with('.') {
                out.extend(&chars[copied..start]);
                out.push_str("[email]");
                copied = end;
                i = end;
                continue;
            }
        }
        i += 1;
    }
    out.extend(&chars[copied..]);
    out
}

/// A signed record of a prune: the chain now starts after `last_seq`, from `last_hash`.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Row id (not signed: assigned on insert).
    pub id: i64,
    /// When the prune ran (stored timestamp form).
    pub created: String,
    /// The last pruned event.
    pub last_seq: i64,
    /// Its hash: the `prev_hash` of the first event kept.
    pub last_hash: String,
    /// Its time.
    pub last_time: String,
    /// Events this prune deleted.
    pub pruned: i64,
    /// Events every prune so far deleted.
    pub total_pruned: i64,
    /// The access state replayed up to `last_seq` (see [`crate::access::AccessState`]).
    pub snapshot: Value,
    /// Hex HMAC-SHA256 over [`Checkpoint::signed_payload`].
    pub signature: String,
}

impl Checkpoint {
    /// The canonical JSON the signature covers: every field but `id` and `signature`.
    pub fn signed_payload(&self) -> String {
        json!({
            "created": self.created,
            "last_seq": self.last_seq,
            "last_hash": self.last_hash,
            "last_time": self.last_time,
            "pruned": self.pruned,
            "total_pruned": self.total_pruned,
            "snapshot": self.snapshot,
        })
        .to_string()
    }

    fn mac(&self, key: &[u8]) -> hmac::Hmac<Sha256> {
        use hmac::{KeyInit, Mac};
        let mut m = <hmac::Hmac<Sha256> as KeyInit>::new_from_slice(key)
            .expect("HMAC takes keys of any length");
        m.update(self.signed_payload().as_bytes());
        m
    }

    /// Sets `signature` with `key`.
    pub fn sign(&mut self, key: &[u8]) {
        use hmac::Mac;
        self.signature = hex::encode(self.mac(key).finalize().into_bytes());
    }

    /// Whether `signature` is this checkpoint's signature under `key` (constant-time compare).
    pub fn signature_valid(&self, key: &[u8]) -> bool {
        use hmac::Mac;
        match hex::decode(&self.signature) {
            Ok(sig) => self.mac(key).verify_slice(&sig).is_ok(),
            Err(_) => false,
        }
    }
}

/// What a successful [`verify_store`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    /// Events checked.
    pub events: u64,
    /// First and last sequence numbers checked, if any event exists.
    pub first_seq: Option<i64>,
    /// Last sequence number checked.
    pub last_seq: Option<i64>,
    /// The checkpoint the chain started from (its `last_seq`), if events were pruned.
    pub checkpoint_seq: Option<i64>,
    /// The hash of the last event (the chain head).
    pub head: String,
}

/// Why [`verify_store`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The link at `seq` is broken.
    #[error("audit chain BROKEN at seq {seq}: {reason}")]
    Broken {
        /// The first event whose link or hash is wrong.
        seq: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint the chain starts from is not trustworthy.
    #[error("audit checkpoint {id} (after seq {last_seq}) is INVALID: {reason}")]
    Checkpoint {
        /// Checkpoint row id.
        id: i64,
        /// Its last pruned seq.
        last_seq: i64,
        /// What is wrong with it.
        reason: String,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] crate::StoreError),
}

/// Why one event does not link: `None` if it does.
pub fn link_error(prev_seq: i64, prev_hash: &str, e: &AuditEvent) -> Option<String> {
    if e.seq != prev_seq + 1 {
        Some(format!(
            "expected seq {} next, found seq {} (events were deleted)",
            prev_seq + 1,
            e.seq
        ))
    } else if e.prev_hash != prev_hash {
        Some(format!(
            "prev_hash {} does not match the hash of seq {prev_seq} ({}): the event before it was \
             deleted, replaced or edited",
            short(&e.prev_hash),
            short(prev_hash)
        ))
    } else if e.compute_hash() != e.hash {
        Some(format!(
            "stored hash {} does not match its content (recomputed {}): this event was edited",
            short(&e.hash),
            short(&e.compute_hash())
        ))
    } else {
        None
    }
}

fn short(h: &str) -> &str {
    h.get(..12).unwrap_or(h)
}

/// Recomputes the whole chain from the newest checkpoint (after checking its signature with
/// `key`) or from genesis, reading `page` events at a time (constant memory).
///
/// Without a key, checkpoints cannot be checked and are an error unless none exists.
pub async fn verify_store(
    store: &dyn crate::Store,
    key: Option<&[u8]>,
    page: i64,
) -> Result<VerifyReport, VerifyError> {
    let cp = store.audit_checkpoint().await?;
    let (mut prev_seq, mut prev_hash) = match &cp {
        Some(c) => {
            let bad = |reason: &str| VerifyError::Checkpoint {
                id: c.id,
                last_seq: c.last_seq,
                reason: reason.to_owned(),
            };
            match key {
                None => return Err(bad("no checkpoint key to check its signature with")),
                Some(k) if !c.signature_valid(k) => {
                    return Err(bad(
                        "signature mismatch (forged or edited checkpoint, or a different key)",
                    ));
                }
                Some(_) => {}
            }
            (c.last_seq, c.last_hash.clone())
        }
        None => (0, GENESIS_HASH.to_owned()),
    };
    let mut report = VerifyReport {
        events: 0,
        first_seq: None,
        last_seq: None,
        checkpoint_seq: cp.as_ref().map(|c| c.last_seq),
        head: prev_hash.clone(),
    };
    // Rows at or before the checkpoint must be gone: a leftover one would be outside the chain.
    let mut after = 0;
    loop {
        let events = store.audit_events(after, page.max(1)).await?;
        let Some(last) = events.last() else { break };
        after = last.seq;
        for e in &events {
            if e.seq <= report.checkpoint_seq.unwrap_or(0) {
                return Err(VerifyError::Broken {
                    seq: e.seq,
                    reason: "event at or before the checkpoint was not pruned (inserted later?)"
                        .into(),
                });
            }
            if let Some(reason) = link_error(prev_seq, &prev_hash, e) {
                return Err(VerifyError::Broken { seq: e.seq, reason });
            }
            report.first_seq.get_or_insert(e.seq);
            report.last_seq = Some(e.seq);
            report.events += 1;
            prev_seq = e.seq;
            prev_hash.clone_from(&e.hash);
        }
    }
    report.head = prev_hash;
    Ok(report)
}
