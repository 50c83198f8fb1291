//! The `Date:` of a monit mail: RFC 1123 with a numeric zone (Go's `time.RFC1123Z`), parsed
//! to Unix seconds without a date library.

use std::time::{SystemTime, UNIX_EPOCH};

const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

struct DateCursor<'a> {
    rest: &'a [u8],
}

impl<'a> DateCursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.rest.get(..n)?, self.rest.get(n..)?);
        self.rest = tail;
        Some(head)
    }

    /// One of `names`, compared case-insensitively (Go's `lookup`); its index.
    fn name(&mut self, names: &[&str]) -> Option<usize> {
        let word = self.take(3)?;
        names
            .iter()
            .position(|n| n.as_bytes().eq_ignore_ascii_case(word))
    }

    /// Exactly `n` ASCII digits.
    fn digits(&mut self, n: usize) -> Option<i64> {
        let d = self.take(n)?;
        d.iter().try_fold(0i64, |acc, b| {
            b.is_ascii_digit().then(|| acc * 10 + i64::from(b - b'0'))
        })
    }

    /// One or two digits (Go's `getnum(value, false)`).
    fn one_or_two_digits(&mut self) -> Option<i64> {
        let first = self.digits(1)?;
        match self.rest.first() {
            Some(b) if b.is_ascii_digit() => Some(first * 10 + self.digits(1)?),
            _ => Some(first),
        }
    }

    /// A layout literal: bytes must match, and a space matches a run of spaces (Go's `skip`).
    fn literal(&mut self, lit: &str) -> Option<()> {
        for &b in lit.as_bytes() {
            if b == b' ' {
                if self.rest.first() != Some(&b' ') {
                    return None;
                }
                while self.rest.first() == Some(&b' ') {
                    self.rest = self.rest.get(1..)?;
                }
            } else if self.take(1)? != [b] {
                return None;
            }
        }
        Some(())
    }
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days from 1970-01-01 to the given proleptic Gregorian date (month 1..=12).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    // Howard Hinnant's algorithm: years start in March so that leap days come last.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Unix seconds of a date in Go's `time.RFC1123Z` layout, `Mon, 02 Jan 2006 15:04:05 -0700`
/// (what monit's `$DATE` produces), or `None` when it does not parse.
///
/// Follows Go's `time.Parse` for that layout: names case-insensitive and the weekday not
/// checked against the date; two-digit day, minute and second; one- or two-digit hour; a
/// four-digit year; optional fractional seconds (dropped); a space matching a run of spaces;
/// day checked against the month; zone offset up to 24 h 60 min; no trailing text.
pub fn parse_rfc1123z(date: &str) -> Option<i64> {
    let mut c = DateCursor {
        rest: date.as_bytes(),
    };
    c.name(&WEEKDAYS)?;
    c.literal(", ")?;
    let day = c.digits(2)?;
    c.literal(" ")?;
    let month = i64::try_from(c.name(&MONTHS)?).ok()? + 1;
    c.literal(" ")?;
    let year = c.digits(4)?;
    c.literal(" ")?;
    let hour = c.one_or_two_digits()?;
    c.literal(":")?;
    let minute = c.digits(2)?;
    c.literal(":")?;
    let second = c.digits(2)?;
    if matches!(c.rest.first(), Some(b'.' | b',')) && c.rest.get(1).is_some_and(u8::is_ascii_digit)
    {
        c.take(1)?;
        while c.rest.first().is_some_and(u8::is_ascii_digit) {
            c.take(1)?;
        }
    }
    c.literal(" ")?;
    let sign = match c.take(1)? {
        b"+" => 1,
        b"-" => -1,
        _ => return None,
    };
    let zone_hours = c.digits(2)?;
    let zone_minutes = c.digits(2)?;
    if !c.rest.is_empty()
        || !(1..=days_in_month(year, month)).contains(&day)
        || hour >= 24
        || minute >= 60
        || second >= 60
        || zone_hours > 24
        || zone_minutes > 60
    {
        return None;
    }
    let local = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(local - sign * (zone_hours * 3600 + zone_minutes * 60))
}

pub(super) fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rfc1123z_dates() {
        assert_eq!(parse_rfc1123z("Thu, 01 Jan 1970 00:00:00 +0000"), Some(0));
        assert_eq!(
            parse_rfc1123z("Sun, 22 Nov 2026 03:00:00 +0000"),
            Some(1_795_316_400)
        );
        assert_eq!(
            parse_rfc1123z("Sun, 22 Nov 2026 04:30:00 +0130"),
            Some(1_795_316_400)
        );
        assert_eq!(
            parse_rfc1123z("Sat, 21 Nov 2026 22:00:00 -0500"),
            Some(1_795_316_400)
        );
        // Go accepts: weekday not checked, any case, one-digit hour, space runs, fractions.
        assert_eq!(
            parse_rfc1123z("mon, 22 NOV 2026 3:00:00 +0000"),
            Some(1_795_316_400)
        );
        assert_eq!(
            parse_rfc1123z("Sun,  22 Nov  2026 03:00:00.123 +0000"),
            Some(1_795_316_400)
        );
        assert_eq!(
            parse_rfc1123z("Tue, 29 Feb 2028 00:00:00 +0000"),
            Some(1_835_395_200)
        );
        assert_eq!(
            parse_rfc1123z("Fri, 31 Dec 1965 23:59:59 +0000"),
            Some(-126_230_401)
        );
        for bad in [
            "",
            "Sun, 22 Nov 2026 03:00:00",
            "Sun, 22 Nov 2026 03:00:00 GMT",
            "Sun, 22 Nov 2026 03:00:00 +0000 extra",
            "Sun, 2 Nov 2026 03:00:00 +0000",
            "Sun,22 Nov 2026 03:00:00 +0000",
            "Xyz, 22 Nov 2026 03:00:00 +0000",
            "Sun, 22 Foo 2026 03:00:00 +0000",
            "Sun, 31 Nov 2026 03:00:00 +0000",
            "Sun, 29 Feb 2026 03:00:00 +0000",
            "Sun, 00 Nov 2026 03:00:00 +0000",
            "Sun, 22 Nov 2026 24:00:00 +0000",
            "Sun, 22 Nov 2026 03:60:00 +0000",
            "Sun, 22 Nov 2026 03:00:60 +0000",
            "Sun, 22 Nov 2026 03:00:00 +2500",
            "Sun, 22 Nov 26 03:00:00 +0000",
            "Sun, 22 Nov 2026 03:00:00 *0000",
            "Sun, 22 Nov 2026 03:00:00 +00",
            "2026-11-22T03:00:00Z",
            "Sün, 22 Nov 2026 03:00:00 +0000",
        ] {
            assert_eq!(parse_rfc1123z(bad), None, "{bad:?}");
        }
    }
}
