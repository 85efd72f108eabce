//! The typed states of outbox rows and held batches. The database columns hold the lowercase
//! names ([`OutboxState::as_str`], [`HeldState::as_str`]); a row holding anything else is
//! reported as corrupt when it is read.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::StoreError;

/// A state name that is not one of a state type's values; the message names the allowed ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} state `{given}`; expected one of {allowed}")]
pub struct UnknownState {
    what: &'static str,
    given: String,
    allowed: String,
}

impl From<UnknownState> for StoreError {
    fn from(e: UnknownState) -> Self {
        StoreError::Invalid(e.to_string())
    }
}

macro_rules! state_enum {
    (
        $(#[$meta:meta])*
        $name:ident, $what:literal, { $( $(#[$vmeta:meta])* $variant:ident = $text:literal ),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every state, in the documented order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored (and displayed) name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( $name::$variant => $text, )+
                }
            }

            /// Parses a state read from the database: an unknown one is a corrupt row.
            pub(crate) fn from_db(s: &str) -> Result<Self, StoreError> {
                s.parse::<Self>()
                    .map_err(|e| StoreError::Other(format!("corrupt row: {e}").into()))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownState;

            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $( $text => Ok($name::$variant), )+
                    _ => Err(UnknownState {
                        what: $what,
                        given: s.to_owned(),
                        allowed: [$($text),+].join(", "),
                    }),
                }
            }
        }
    };
}

state_enum!(
    /// The state of an outbox row.
    OutboxState, "outbox", {
        /// Waiting to be applied (or retried).
        Pending = "pending",
        /// Applied.
        Done = "done",
        /// Failed for good (permanently, or out of retries); `outbox retry` revives it.
        Dead = "dead",
        /// Parked in a held batch.
        Held = "held",
        /// Dropped by an operator: never applied.
        Dropped = "dropped",
    }
);

state_enum!(
    /// The state of a held batch.
    HeldState, "held batch", {
        /// Waiting for an operator.
        Held = "held",
        /// Approved: the worker applies it.
        Approved = "approved",
        /// Applied after approval.
        Applied = "applied",
        /// Dropped by an operator.
        Dropped = "dropped",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_name_the_allowed_values() {
        for s in OutboxState::ALL {
            assert_eq!(s.as_str().parse::<OutboxState>(), Ok(*s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::json!(s.as_str())
            );
        }
        for s in HeldState::ALL {
            assert_eq!(s.to_string().parse::<HeldState>(), Ok(*s));
        }
        let e = "nonsense".parse::<OutboxState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown outbox state `nonsense`; expected one of pending, done, dead, held, dropped"
        );
        let e = "x".parse::<HeldState>().unwrap_err();
        assert!(
            e.to_string().contains("held, approved, applied, dropped"),
            "{e}"
        );
    }
}
