//! Signed heads: the chain's newest `(seq, hash, time)` signed with an Ed25519 key and appended
//! as an `audit.head` event, every `audit.head_interval` and at clean shutdown.
//!
//! The hash chain alone proves nothing against someone who can write the database: they can
//! edit an event and recompute every later hash. A signed head fixes the hash at its `seq`;
//! without the private key nobody can sign a new one, so after such a rewrite the hash stored
//! at a signed `seq` no longer matches its signature. [`verify`] finds the first signed head
//! that no longer matches: the rewrite is after the last head that still matches and at or
//! before that one. What it cannot see: events after the newest signed head, and heads deleted
//! along with the rewrite — keep them outside the database too (a streaming sink).

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use store::{AuditEntry, AuditEvent, AuditLog, DynStore, WriteCtx};

/// The operation of a signed-head event.
pub const HEAD_OPERATION: &str = "audit.head";

/// Errors of key handling and signing.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// A key file could not be read, written or parsed; the message names it.
    #[error("{0}")]
    Key(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] store::StoreError),
}

/// The text a head signature covers.
pub fn payload(seq: i64, hash: &str, time: &str) -> String {
    format!("teamcity-scim audit head v1\nseq={seq}\nhash={hash}\ntime={time}\n")
}

/// A short, stable id of a public key: the first 16 hex digits of SHA-256 of its bytes.
pub fn key_id(key: &VerifyingKey) -> String {
    hex::encode(&Sha256::digest(key.as_bytes())[..8])
}

/// Writes a new key pair: `private` (PKCS#8 PEM, mode 0600) and `public` (SPKI PEM, publishable).
/// Refuses to overwrite either file.
pub fn keygen(private: &Path, public: &Path) -> Result<String, HeadError> {
    for p in [private, public] {
        if p.exists() {
            return Err(HeadError::Key(format!(
                "{} exists; move it away first (a new key does not verify heads signed by the old one)",
                p.display()
            )));
        }
    }
    let mut seed = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut seed);
    let key = SigningKey::from_bytes(&seed);
    let pem = key
        .to_pkcs8_pem(Default::default())
        .map_err(|e| HeadError::Key(format!("cannot encode the private key: {e}")))?;
    let public_pem = key
        .verifying_key()
        .to_public_key_pem(Default::default())
        .map_err(|e| HeadError::Key(format!("cannot encode the public key: {e}")))?;
    write_private(private, pem.as_bytes())?;
    std::fs::write(public, public_pem)
        .map_err(|e| HeadError::Key(format!("cannot write {}: {e}", public.display())))?;
    Ok(key_id(&key.verifying_key()))
}

fn write_private(path: &Path, data: &[u8]) -> Result<(), HeadError> {
    use std::io::Write as _;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    opts.open(path)
        .and_then(|mut f| f.write_all(data))
        .map_err(|e| HeadError::Key(format!("cannot write {}: {e}", path.display())))
}

/// Reads a private key written by [`keygen`] (any PKCS#8 PEM Ed25519 key, e.g. from
/// `openssl genpkey -algorithm ed25519`).
pub fn load_signing_key(path: &Path) -> Result<SigningKey, HeadError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        HeadError::Key(format!(
            "audit.signing_key_file: cannot read {}: {e}",
            path.display()
        ))
    })?;
    SigningKey::from_pkcs8_pem(&text).map_err(|e| {
        HeadError::Key(format!(
            "audit.signing_key_file: {} is not an Ed25519 private key in PKCS#8 PEM ({e}); \
             `teamcity-scim audit keygen` writes one",
            path.display()
        ))
    })
}

/// Reads a public key (SPKI PEM, as [`keygen`] writes it or `openssl pkey -pubout` prints it).
pub fn load_verifying_key(path: &Path) -> Result<VerifyingKey, HeadError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| HeadError::Key(format!("cannot read {}: {e}", path.display())))?;
    VerifyingKey::from_public_key_pem(&text).map_err(|e| {
        HeadError::Key(format!(
            "{} is not an Ed25519 public key in PEM ({e})",
            path.display()
        ))
    })
}

/// Signs heads with one key.
#[derive(Debug)]
pub struct HeadSigner {
    store: DynStore,
    key: SigningKey,
}

impl HeadSigner {
    /// A signer appending to `store`.
    pub fn new(store: DynStore, key: SigningKey) -> Self {
        HeadSigner { store, key }
    }

    /// Signs the current head and appends it as an `audit.head` event, unless the newest event
    /// already is one (nothing new to cover). Returns the signed `seq`.
    pub async fn sign(&self, actor: &str) -> Result<Option<i64>, HeadError> {
        let Some(head) = self.store.audit_recent(None, 1).await?.into_iter().next() else {
            return Ok(None);
        };
        if head.operation == HEAD_OPERATION {
            return Ok(None);
        }
        let signature = self
            .key
            .sign(payload(head.seq, &head.hash, &head.time).as_bytes());
        let ctx = WriteCtx {
            actor: actor.to_owned(),
            request_id: None,
        };
        self.store
            .audit(
                &ctx,
                AuditEntry {
                    resource_type: "Audit".into(),
                    resource_id: None,
                    operation: HEAD_OPERATION.into(),
                    outcome: "success".into(),
                    status: None,
                    detail: json!({
                        "seq": head.seq,
                        "hash": head.hash,
                        "time": head.time,
                        "key_id": key_id(&self.key.verifying_key()),
                        "signature": STANDARD.encode(signature.to_bytes()),
                    }),
                },
            )
            .await?;
        metrics::gauge!("teamcity_scim_audit_signed_head_seq").set(head.seq as f64);
        Ok(Some(head.seq))
    }

    /// Signs every `interval` until `stop`, then once more (the clean-shutdown head).
    pub async fn run(
        self,
        interval: std::time::Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut every = tokio::time::interval(interval);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every.tick().await;
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = stop.wait_for(|s| *s) => break,
            }
            if let Err(e) = self.sign("audit").await {
                tracing::warn!(error = %e, "could not sign the audit head; retrying at the next interval");
            }
        }
        match self.sign("audit").await {
            Ok(Some(seq)) => tracing::info!(seq, "audit head signed at shutdown"),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not sign the audit head at shutdown"),
        }
    }
}

/// What [`verify`] found wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadProblem {
    /// No head signed by this key: nothing to check the trail against.
    NoSignedHead {
        /// Heads signed by other keys.
        other_keys: usize,
    },
    /// A head event whose signature does not verify with the key (forged or altered).
    BadSignature {
        /// The head event's own seq.
        head_event: i64,
    },
    /// The hash stored at a signed seq differs from the signed one: the trail was rewritten.
    Rewritten {
        /// The first signed seq whose hash no longer matches.
        signed_seq: i64,
        /// When that head was signed.
        signed_time: String,
        /// The first event that may have been changed (just after the last head that still
        /// matches).
        first_bad_seq: i64,
    },
    /// A signed seq that is missing from the trail (deleted, not pruned).
    Missing {
        /// The signed seq.
        signed_seq: i64,
    },
}

impl std::fmt::Display for HeadProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeadProblem::NoSignedHead { other_keys } => write!(
                f,
                "no audit head is signed by this key ({other_keys} by other keys): nothing to check the trail against"
            ),
            HeadProblem::BadSignature { head_event } => write!(
                f,
                "the signed head in event {head_event} does not verify with this key: it was forged or altered"
            ),
            HeadProblem::Rewritten {
                signed_seq,
                signed_time,
                first_bad_seq,
            } => write!(
                f,
                "the trail was rewritten: the hash of event {signed_seq} differs from the one signed at \
                 {signed_time}; the first changed event is between seq {first_bad_seq} and {signed_seq} \
                 (first bad seq: {first_bad_seq})"
            ),
            HeadProblem::Missing { signed_seq } => write!(
                f,
                "event {signed_seq}, covered by a signed head, is missing from the trail"
            ),
        }
    }
}

/// What [`verify`] checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HeadReport {
    /// Heads signed by this key that verified and match the trail.
    pub verified: usize,
    /// Heads signed by other keys (not checked).
    pub other_keys: usize,
    /// Heads covering pruned events (their hash is checked against the prune checkpoint when it
    /// is the same seq, else not checkable).
    pub pruned: usize,
    /// The newest signed seq that matches, and when it was signed.
    pub newest: Option<(i64, String)>,
    /// Events after the newest matching signed head (not covered by any signature yet).
    pub uncovered: i64,
    /// The first problem, if any.
    pub problem: Option<HeadProblem>,
}

/// A head event's signed fields.
struct Head {
    event: i64,
    seq: i64,
    hash: String,
    time: String,
    key_id: String,
    signature: Vec<u8>,
}

fn parse_head(e: &AuditEvent) -> Option<Head> {
    let d: Value = serde_json::from_str(&e.detail).ok()?;
    Some(Head {
        event: e.seq,
        seq: d["seq"].as_i64()?,
        hash: d["hash"].as_str()?.to_owned(),
        time: d["time"].as_str()?.to_owned(),
        key_id: d["key_id"].as_str()?.to_owned(),
        signature: STANDARD.decode(d["signature"].as_str()?).ok()?,
    })
}

/// Checks every signed head in the trail against `key` and the stored hashes. Reads the whole
/// trail once, in pages.
pub async fn verify(store: &dyn AuditLog, key: &VerifyingKey) -> Result<HeadReport, HeadError> {
    let id = key_id(key);
    let checkpoint = store.audit_checkpoint().await?;
    let mut hashes: std::collections::HashMap<i64, String> = std::collections::HashMap::new();
    let mut heads: Vec<Head> = Vec::new();
    let mut last_seq = 0;
    let mut after = 0;
    loop {
        let page = store.audit_events(after, 1000).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        last_seq = last.seq;
        for e in &page {
            hashes.insert(e.seq, e.hash.clone());
            if e.operation == HEAD_OPERATION {
                match parse_head(e) {
                    Some(h) => heads.push(h),
                    None => {
                        return Ok(HeadReport {
                            problem: Some(HeadProblem::BadSignature { head_event: e.seq }),
                            ..HeadReport::default()
                        });
                    }
                }
            }
        }
    }
    let mut report = HeadReport::default();
    let mut last_good: i64 = checkpoint.as_ref().map_or(0, |c| c.last_seq);
    // Head events whose signature verifies cannot have been altered: a rewrite starts after them.
    let verified_heads: std::collections::HashSet<i64> = heads
        .iter()
        .filter(|h| h.key_id == id)
        .filter(|h| {
            Signature::from_slice(&h.signature).is_ok_and(|s| {
                key.verify(payload(h.seq, &h.hash, &h.time).as_bytes(), &s)
                    .is_ok()
            })
        })
        .map(|h| h.event)
        .collect();
    let first_bad_after = |good: i64| {
        let mut seq = good + 1;
        while verified_heads.contains(&seq) {
            seq += 1;
        }
        seq
    };
    for h in &heads {
        if h.key_id != id {
            report.other_keys += 1;
            continue;
        }
        let sig = Signature::from_slice(&h.signature).ok();
        let valid = sig.is_some_and(|s| {
            key.verify(payload(h.seq, &h.hash, &h.time).as_bytes(), &s)
                .is_ok()
        });
        if !valid {
            report.problem = Some(HeadProblem::BadSignature {
                head_event: h.event,
            });
            return Ok(report);
        }
        match hashes.get(&h.seq) {
            Some(stored) if *stored == h.hash => {
                report.verified += 1;
                last_good = last_good.max(h.seq);
                report.newest = Some((h.seq, h.time.clone()));
            }
            Some(_) => {
                report.problem = Some(HeadProblem::Rewritten {
                    signed_seq: h.seq,
                    signed_time: h.time.clone(),
                    first_bad_seq: first_bad_after(last_good),
                });
                return Ok(report);
            }
            None => match &checkpoint {
                Some(cp) if h.seq <= cp.last_seq => {
                    if h.seq == cp.last_seq && cp.last_hash != h.hash {
                        report.problem = Some(HeadProblem::Rewritten {
                            signed_seq: h.seq,
                            signed_time: h.time.clone(),
                            first_bad_seq: 1,
                        });
                        return Ok(report);
                    }
                    report.pruned += 1;
                }
                _ => {
                    report.problem = Some(HeadProblem::Missing { signed_seq: h.seq });
                    return Ok(report);
                }
            },
        }
    }
    if report.verified == 0 && report.pruned == 0 {
        report.problem = Some(HeadProblem::NoSignedHead {
            other_keys: report.other_keys,
        });
    }
    report.uncovered = last_seq - report.newest.as_ref().map_or(last_good, |(s, _)| *s);
    Ok(report)
}
