//! List responses and paging: index paging (RFC 7644 §3.4.2.4) and cursor paging (RFC 9865).
//!
//! A cursor is opaque to clients and made of RFC 3986 unreserved characters only: the
//! base64url encoding of the next offset, a fingerprint of the query it belongs to and the
//! time it was issued. A cursor replayed against a different query is `invalidCursor`; one
//! older than [`CURSOR_TIMEOUT_SECS`] is `expiredCursor`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::error::{ScimError, ScimResult, ScimType};
use crate::schema::LIST_RESPONSE_SCHEMA;

/// Page size when the client gives no `count`.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest page served (`filter.maxResults`, `pagination.maxPageSize`).
pub const MAX_PAGE_SIZE: usize = 1000;
/// Minimum lifetime of a cursor, in seconds (`pagination.cursorTimeout`).
pub const CURSOR_TIMEOUT_SECS: i64 = 3600;

/// A decoded cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Zero-based offset of the page it points at.
    pub offset: usize,
    /// Fingerprint of the query (filter, sort) it was issued for.
    pub fingerprint: u64,
    /// Unix time it was issued.
    pub issued: i64,
}

impl Cursor {
    /// Encodes the cursor, with a check value so an edited cursor is rejected.
    pub fn encode(&self) -> String {
        let body = format!("{}.{:x}.{}", self.offset, self.fingerprint, self.issued);
        URL_SAFE_NO_PAD.encode(format!("{body}.{:x}", check_value(&body)))
    }

    /// Decodes and checks a cursor for a query with `fingerprint` at time `now`.
    pub fn decode(text: &str, fingerprint: u64, now: i64) -> ScimResult<Cursor> {
        let invalid = || {
            ScimError::bad_request(
                ScimType::InvalidCursor,
                "the cursor is not one this server issued for this query; start again with cursor= (empty)",
            )
        };
        let raw = URL_SAFE_NO_PAD.decode(text).map_err(|_| invalid())?;
        let raw = String::from_utf8(raw).map_err(|_| invalid())?;
        let (body, check) = raw.rsplit_once('.').ok_or_else(invalid)?;
        if u64::from_str_radix(check, 16).ok() != Some(check_value(body)) {
            return Err(invalid());
        }
        let mut parts = body.split('.');
        let (Some(o), Some(f), Some(t), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid());
        };
        let cursor = Cursor {
            offset: o.parse().map_err(|_| invalid())?,
            fingerprint: u64::from_str_radix(f, 16).map_err(|_| invalid())?,
            issued: t.parse().map_err(|_| invalid())?,
        };
        if cursor.fingerprint != fingerprint {
            return Err(invalid());
        }
        if now - cursor.issued > CURSOR_TIMEOUT_SECS {
            return Err(ScimError::bad_request(
                ScimType::ExpiredCursor,
                "the cursor has expired; start again with cursor= (empty)",
            ));
        }
        Ok(cursor)
    }
}

/// The check value of an encoded cursor's fields: detects a cursor edited by hand (offset or
/// issue time changed), which is then `invalidCursor` like any cursor this server did not issue.
/// Not a secret MAC: a cursor grants nothing index paging does not.
fn check_value(body: &str) -> u64 {
    fingerprint(&["scim-cursor", body])
}

/// A stable 64-bit fingerprint (FNV-1a) of the parts of a query a cursor is bound to.
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for b in p.bytes().chain(std::iter::once(0xff)) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Builds a ListResponse. `start_index` is 1-based; cursors are added by the caller.
pub fn list_response(total: usize, start_index: usize, resources: Vec<Value>) -> Value {
    json!({
        "schemas": [LIST_RESPONSE_SCHEMA],
        "totalResults": total,
        "itemsPerPage": resources.len(),
        "startIndex": start_index,
        "Resources": resources,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trip_and_rejections() {
        let fp = fingerprint(&["User", "userName sw \"a\""]);
        let c = Cursor {
            offset: 200,
            fingerprint: fp,
            issued: 1000,
        };
        let text = c.encode();
        assert!(
            text.chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        );
        assert_eq!(Cursor::decode(&text, fp, 1100).unwrap(), c);
        let other = fingerprint(&["User", "userName sw \"b\""]);
        assert_eq!(
            Cursor::decode(&text, other, 1100).unwrap_err().scim_type,
            Some(ScimType::InvalidCursor)
        );
        assert_eq!(
            Cursor::decode(&text, fp, 1000 + CURSOR_TIMEOUT_SECS + 1)
                .unwrap_err()
                .scim_type,
            Some(ScimType::ExpiredCursor)
        );
        let forged = URL_SAFE_NO_PAD.encode(format!("0.{fp:x}.1000.0"));
        let unchecked = URL_SAFE_NO_PAD.encode(format!("0.{fp:x}.1000"));
        for junk in [
            "",
            "!!",
            "YWJj",
            &URL_SAFE_NO_PAD.encode("1.zz.3"),
            &forged,
            &unchecked,
        ] {
            assert_eq!(
                Cursor::decode(junk, fp, 1100).unwrap_err().scim_type,
                Some(ScimType::InvalidCursor),
                "{junk}"
            );
        }
    }
}
