//! UTC hours as segment names (`2026-11-26T05`), without a date library:
//! the proleptic Gregorian calendar's day count (Howard Hinnant's
//! `civil_from_days` and `days_from_civil`).

/// Milliseconds in an hour.
pub const HOUR_MS: u64 = 3_600_000;

/// The start of the UTC hour holding `ms` (ms since the Unix epoch).
pub fn floor(ms: u64) -> u64 {
    ms - ms % HOUR_MS
}

/// `YYYY-MM-DDTHH` of the UTC hour holding `ms`.
pub fn name(ms: u64) -> String {
    let hours = ms / HOUR_MS;
    let (days, hour) = (hours / 24, hours % 24);
    let (y, m, d) = civil_from_days(days as i64);
    format!("{y:04}-{m:02}-{d:02}T{hour:02}")
}

/// The start (ms) of the hour `YYYY-MM-DDTHH` names; `None` for anything else.
pub fn parse(name: &str) -> Option<u64> {
    let b = name.as_bytes();
    if b.len() != 13 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<u64> {
        let s = &name[r];
        s.bytes().all(|c| c.is_ascii_digit()).then(|| s.parse().ok())?
    };
    let (y, m, d, h) = (num(0..4)?, num(5..7)?, num(8..10)?, num(11..13)?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) || h > 23 {
        return None;
    }
    let days = days_from_civil(y as i64, m as u32, d as u32);
    // Reject 2026-02-31 and friends: the day must name itself.
    if civil_from_days(days) != (y as i64, m as u32, d as u32) {
        return None;
    }
    Some((days as u64 * 24 + h) * HOUR_MS)
}

fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(name(0), "1970-01-01T00");
        // 2026-11-26T05:12:55Z
        let ms = 1_795_670_775_000;
        assert_eq!(name(ms), "2026-11-26T05");
        assert_eq!(parse("2026-11-26T05"), Some(floor(ms)));
        assert_eq!(name(951_782_400_000), "2000-02-29T00", "a leap day");
        for h in (0..2_000_000u64).step_by(997) {
            let ms = h * HOUR_MS;
            assert_eq!(parse(&name(ms)), Some(ms), "{}", name(ms));
        }
        for bad in ["2026-02-30T00", "2026-11-26T24", "2026-11-26", "2026-11-26T5x", "x"] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
