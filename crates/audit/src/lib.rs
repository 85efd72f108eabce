//! The audit trail leaving the database.
//!
//! - [`sinks`]: every event streamed, in `seq` order and at least once, to syslog (RFC 5424 over
//!   TCP, octet-counted per RFC 6587, optionally TLS), an HTTPS webhook (JSON Lines, HMAC-SHA256
//!   signed) or a file (JSON Lines), each sink from its own stored position, so a sink that is
//!   down catches up after it comes back and nothing is lost across restarts.
//! - [`heads`]: the chain's head signed with an Ed25519 key every `audit.head_interval`, appended
//!   as an `audit.head` event; `audit verify --public-key` checks every signed head, so a rewrite
//!   of the trail (events and every later hash) is detected by whoever holds the public key.
//!
//! Both only read the store, except for the sinks' positions (`sync_state`) and the head events.

pub mod heads;
pub mod sinks;

pub use heads::{HeadProblem, HeadReport, HeadSigner};
pub use sinks::{SinkConfig, SinkKind};
