//! The one timestamp format stored and emitted: fixed-width UTC RFC 3339 with microseconds, so
//! that text order is chronological order (filters on `meta.lastModified` run in SQL).

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, UtcOffset};

const FORMAT: &[time::format_description::BorrowedFormatItem<'static>] =
    format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z");

/// Formats a time in the stored form, e.g. `2026-11-29T10:00:00.123456Z`.
pub fn format(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    // Every rendered resource carries two timestamps: format the common case directly (the
    // generic formatter was a visible share of a list response's cost).
    if (0..=9999).contains(&t.year()) {
        return format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second(),
            t.microsecond()
        );
    }
    t.format(FORMAT)
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

    #[test]
    fn fast_path_matches_the_format_description() {
        for s in [
            "0001-01-01T00:00:00Z",
            "1999-12-31T23:59:59.999999Z",
            "2026-02-28T05:06:07.000001+03:30",
            "9999-12-31T23:59:59.5Z",
        ] {
            let t = parse(s).unwrap();
            let generic = t.to_offset(UtcOffset::UTC).format(FORMAT).unwrap();
            assert_eq!(format(t), generic, "{s}");
        }
    }
}
