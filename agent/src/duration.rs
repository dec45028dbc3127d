//! Human durations (`100ms`, `10s`, `1m`) as flags and trigger metadata write them.
//!
//! Owns parsing and printing only.

use std::time::Duration;

/// Parses `<number><unit>` with unit `ns`, `us`, `ms`, `s`, `m` or `h` (`1.5s` is allowed).
pub fn parse(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit; write it like 100ms, 10s or 1m"))?;
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        format!("{text:?} does not start with a number; write it like 100ms, 10s or 1m")
    })?;
    let scale = match unit {
        "ns" => 1e-9,
        "us" | "µs" => 1e-6,
        "ms" => 1e-3,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "{text:?} has unknown unit {unit:?}; use ns, us, ms, s, m or h"
            ))
        }
    };
    Duration::try_from_secs_f64(value * scale).map_err(|_| format!("{text:?} is out of range"))
}

/// Prints a duration the way [`parse`] reads it (`100ms`, `2.5s`).
pub fn format(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns.is_multiple_of(1_000_000_000) {
        format!("{}s", ns / 1_000_000_000)
    } else if ns.is_multiple_of(1_000_000) {
        format!("{}ms", ns / 1_000_000)
    } else if ns.is_multiple_of(1000) {
        format!("{}us", ns / 1000)
    } else {
        format!("{ns}ns")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_units_users_write() {
        assert_eq!(parse("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(format(Duration::from_millis(100)), "100ms");
        assert_eq!(format(Duration::from_secs(30)), "30s");
    }

    #[test]
    fn bad_durations_say_how_to_write_them() {
        assert!(parse("100").unwrap_err().contains("no unit"));
        assert!(parse("10parsecs").unwrap_err().contains("unknown unit"));
        assert!(parse("ms").unwrap_err().contains("number"));
        assert!(parse("1e400s").is_err());
    }
}
