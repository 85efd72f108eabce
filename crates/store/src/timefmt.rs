//! The one timestamp format stored and emitted: fixed-width UTC RFC 3339 with microseconds, so
//! that text order is chronological order (filters on `meta.lastModified` run in SQL).

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Formats a time in the stored form, e.g. `2026-11-29T10:00:00.123456Z`.
pub fn format(t: OffsetDateTime) -> String {
    t.to_offset(UtcOffset::UTC)
        .format(FORMAT)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses any RFC 3339 time (the stored form included).
pub fn parse(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &Rfc3339).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_sorts() {
        let a = parse("2015-10-10T14:38:21.86-07:00").unwrap();
        let b = parse("2015-10-10T21:38:21.861Z").unwrap();
        assert_eq!(format(a), "2015-10-10T21:38:21.860000Z");
        assert!(format(a) < format(b));
        assert_eq!(parse(&format(a)), Some(a));
    }
}
