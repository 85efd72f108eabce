//! Durations written as `30d`, `12h`, `90m`, `45s` (or a sum like `1d12h`).

use anyhow::bail;
use time::Duration;

/// Parses a duration.
pub(crate) fn parse(s: &str) -> anyhow::Result<Duration> {
    let mut total = Duration::ZERO;
    let mut num = String::new();
    let mut any = false;
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num
            .parse()
            .map_err(|_| anyhow::anyhow!("invalid duration `{s}`: expected e.g. 30d, 12h, 90m"))?;
        num.clear();
        total += match c {
            'd' => Duration::days(n),
            'h' => Duration::hours(n),
            'm' => Duration::minutes(n),
            's' => Duration::seconds(n),
            'w' => Duration::weeks(n),
            _ => bail!("invalid duration `{s}`: unknown unit `{c}` (use d, h, m, s or w)"),
        };
        any = true;
    }
    if !num.is_empty() || !any || total <= Duration::ZERO {
        bail!("invalid duration `{s}`: expected a number with a unit, e.g. 30d, 12h, 90m");
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse("30d").unwrap(), Duration::days(30));
        assert_eq!(parse("1d12h").unwrap(), Duration::hours(36));
        assert_eq!(parse("90m").unwrap(), Duration::minutes(90));
        for bad in ["", "30", "d", "5x", "0d", "-1d"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
