//! Durations as users write them in flags and trigger metadata, in Go's grammar (the one
//! Kubernetes and KEDA users type): one or more `<number><unit>` parts, as in `100ms`, `30s`,
//! `1.5s`, `1m30s` or `1h2m3s`; units `ns`, `us` (or `µs`), `ms`, `s`, `m`, `h`; a bare `0`.
//!
//! Parsing is exact (integer nanoseconds, no float rounding) and bounded: negative durations,
//! inputs over [`MAX_LEN`] characters and durations beyond `u64` nanoseconds (584 years) are
//! errors that quote the input. Owns parsing and printing only; what range a flag accepts is the
//! caller's to check and to say.

use std::time::Duration;

/// The units, as error messages list them.
pub const UNITS: &str = "ns, us, ms, s, m, h";

/// The longest input read; anything longer is no sensible duration.
pub const MAX_LEN: usize = 64;

const UNIT_NANOS: [(&str, u128); 9] = [
    ("ns", 1),
    ("us", 1_000),
    ("µs", 1_000),
    ("μs", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60_000_000_000),
    ("h", 3_600_000_000_000),
    ("", 0),
];

/// Parses `text` (surrounding whitespace ignored). The error quotes the input and says what is
/// wrong; the caller adds what its flag or key accepts.
pub fn parse(text: &str) -> Result<Duration, String> {
    let s = text.trim();
    let not_a_duration = || {
        format!("{text:?} is not a duration (a number and a unit of {UNITS}, as in 30s or 1m30s)")
    };
    if s.len() > MAX_LEN {
        return Err(format!("{text:?} is too long to be a duration"));
    }
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    if s.is_empty() {
        return Err(not_a_duration());
    }
    let mut rest = s;
    let mut total: u128 = 0;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(split);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos = match UNIT_NANOS.iter().find(|(u, _)| *u == unit) {
            Some((_, n)) if *n > 0 => *n,
            Some(_) if !number.is_empty() => {
                return Err(format!(
                    "{text:?} has no unit after {number:?} (write one of {UNITS}, as in 1m30s)"
                ))
            }
            _ if !number.is_empty() => {
                return Err(format!(
                    "{text:?} has unknown unit {unit:?} (write one of {UNITS})"
                ))
            }
            _ => return Err(not_a_duration()),
        };
        let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
        if (whole.is_empty() && frac.is_empty()) || frac.contains('.') {
            return Err(not_a_duration());
        }
        // Up to 20 digits per part keeps the arithmetic below in u128.
        if whole.len() > 20 || frac.len() > 20 {
            return Err(format!("{text:?} is too long a duration"));
        }
        let digits = |d: &str| -> u128 { d.parse().unwrap_or(0) };
        let frac_nanos = if frac.is_empty() {
            0
        } else {
            digits(frac) * unit_nanos / 10u128.pow(frac.len() as u32)
        };
        total += digits(whole) * unit_nanos + frac_nanos;
        if total > u128::from(u64::MAX) {
            return Err(format!("{text:?} is too long a duration"));
        }
        rest = next;
    }
    Ok(Duration::from_nanos(total as u64))
}

/// Prints `d` so that [`parse`] reads it back exactly, in the largest units that fit: `100ms`,
/// `30s`, `1m30s`, `2h`, `1500us`.
pub fn format(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".into();
    }
    if !ns.is_multiple_of(1_000_000_000) {
        return if ns.is_multiple_of(1_000_000) {
            format!("{}ms", ns / 1_000_000)
        } else if ns.is_multiple_of(1_000) {
            format!("{}us", ns / 1_000)
        } else {
            format!("{ns}ns")
        };
    }
    let secs = ns / 1_000_000_000;
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_every_unit_fractions_and_go_style_compounds() {
        for (v, d) in [
            ("1500ns", Duration::from_nanos(1500)),
            ("250us", Duration::from_micros(250)),
            ("250µs", Duration::from_micros(250)),
            ("20ms", Duration::from_millis(20)),
            ("1.5s", Duration::from_millis(1500)),
            (".5s", Duration::from_millis(500)),
            ("2m", Duration::from_secs(120)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            ("1h2m3s", Duration::from_secs(3723)),
            ("1.5m", Duration::from_secs(90)),
            ("1s500ms", Duration::from_millis(1500)),
            (" 10s ", Duration::from_secs(10)),
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
        ] {
            assert_eq!(parse(v), Ok(d), "{v}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_duration_quoting_it_and_saying_how() {
        for v in [
            "",
            "s",
            ".s",
            "1.2.3s",
            "5 s",
            "5sec",
            "1d",
            "+1s",
            "1e3s",
            "99999999999999999999h",
            "18446744073709551616ns",
        ] {
            let e = parse(v).expect_err(v);
            assert!(e.starts_with(&format!("{v:?}")), "{e}");
        }
        assert!(parse("-1s").unwrap_err().contains("negative"));
        assert!(parse("100").unwrap_err().contains("has no unit"));
        assert!(parse("1m30").unwrap_err().contains("no unit after \"30\""));
        assert!(parse("10parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse("10parsecs").unwrap_err().contains(UNITS));
        assert!(parse(&"1".repeat(100)).unwrap_err().contains("too long"));
        assert_eq!(
            parse("18446744073709551615ns"),
            Ok(Duration::from_nanos(u64::MAX))
        );
    }

    #[test]
    fn prints_what_it_reads_back() {
        for (d, text) in [
            (Duration::ZERO, "0s"),
            (Duration::from_millis(100), "100ms"),
            (Duration::from_secs(30), "30s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(7200), "2h"),
            (Duration::from_secs(3723), "1h2m3s"),
            (Duration::from_micros(1500), "1500us"),
            (Duration::from_nanos(7), "7ns"),
        ] {
            assert_eq!(format(d), text);
            assert_eq!(parse(text), Ok(d));
        }
        for ns in [
            1u64,
            999,
            1_000_001,
            59_999_999_999,
            86_400_000_000_000,
            u64::MAX,
        ] {
            let d = Duration::from_nanos(ns);
            assert_eq!(parse(&format(d)), Ok(d), "{ns}");
        }
    }
}
