//! The windows every metric keeps: the agent summarises each over all four, a trigger's `window`
//! picks one, and dumps name them.

use std::time::Duration;
use strum::{Display, EnumCount, IntoStaticStr, VariantArray};

/// A window the agent keeps. Named `10s`, `30s`, `60s`, `5m` in dumps; on the wire by its
/// length in seconds ([`Window::secs`]); in `GetMetricSpec` metric names by
/// [`Window::label`] (`1m` for 60 s, as ever).
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    IntoStaticStr,
    Display,
    EnumCount,
    VariantArray,
)]
pub enum Window {
    /// The last 10 s.
    #[strum(serialize = "10s")]
    S10,
    /// The last 30 s (a trigger's default).
    #[strum(serialize = "30s")]
    S30,
    /// The last minute.
    #[strum(serialize = "60s")]
    S60,
    /// The last 5 minutes.
    #[strum(serialize = "5m")]
    M5,
}

impl Window {
    /// Every window, shortest first.
    pub const ALL: [Window; <Window as strum::EnumCount>::COUNT] =
        [Window::S10, Window::S30, Window::S60, Window::M5];

    /// The longest window: how far back the agent keeps samples.
    pub const LONGEST: Window = Window::M5;

    /// Position in [`Window::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The name dumps print (`10s`, `30s`, `60s`, `5m`).
    pub fn name(self) -> &'static str {
        self.into()
    }

    /// Its length in seconds, as the agent API's `window_s` carries it.
    pub fn secs(self) -> u32 {
        match self {
            Window::S10 => 10,
            Window::S30 => 30,
            Window::S60 => 60,
            Window::M5 => 300,
        }
    }

    /// Its length.
    pub fn duration(self) -> Duration {
        Duration::from_secs(self.secs().into())
    }

    /// The window `secs` seconds long, if the agent keeps one.
    pub fn from_secs(secs: u32) -> Option<Window> {
        Self::ALL.into_iter().find(|w| w.secs() == secs)
    }

    /// The window exactly `d` long, if the agent keeps one (`1m` and `60s` are the same window).
    pub fn of(d: Duration) -> Option<Window> {
        Self::ALL.into_iter().find(|w| w.duration() == d)
    }

    /// The spelling `GetMetricSpec` metric names use: the duration printed in its largest unit
    /// (`10s`, `30s`, `1m`, `5m`).
    pub fn label(self) -> String {
        crate::duration::format(self.duration())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_named_measured_and_found_by_length() {
        let names: Vec<&str> = Window::ALL.iter().map(|w| w.name()).collect();
        assert_eq!(names, ["10s", "30s", "60s", "5m"]);
        let labels: Vec<String> = Window::ALL.iter().map(|w| w.label()).collect();
        assert_eq!(labels, ["10s", "30s", "1m", "5m"]);
        for w in Window::ALL {
            assert_eq!(Window::from_secs(w.secs()), Some(w));
            assert_eq!(Window::of(w.duration()), Some(w));
            assert_eq!(w.to_string(), w.name());
            assert_eq!(Window::ALL[w.index()], w);
        }
        assert_eq!(Window::from_secs(45), None);
        assert_eq!(Window::of(Duration::from_millis(10_500)), None);
        assert_eq!(Window::ALL.last(), Some(&Window::LONGEST));
        assert!(Window::ALL.windows(2).all(|p| p[0].secs() < p[1].secs()));
    }
}
