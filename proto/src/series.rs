//! Which series a stream of the agent API carries (`Interest.series`, revision 3): for each
//! metric its last value and any of the windows the agent keeps. The agent computes only these;
//! the collector asks for the ones its triggers read; both read and write `Interest.series`
//! through [`Wanted`].

use vocab::{Metric, Window};

use crate::agent::{Interest, MetricSummary, Series};

/// A set of series: per metric, its last value and some windows. Small and `Copy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Wanted {
    /// Per metric (by [`Metric::index`]): bit 0 its last value, bit 1 + w window w.
    bits: [u8; Metric::ALL.len()],
}

/// The bits of a metric that name a series this build knows.
const KNOWN: u8 = (1 << (1 + Window::ALL.len())) - 1;

impl Wanted {
    /// No series.
    pub const fn none() -> Wanted {
        Wanted {
            bits: [0; Metric::ALL.len()],
        }
    }

    /// Every metric, every window and the last value (`GetSnapshot`, a stream without
    /// `Interest`).
    pub const fn every() -> Wanted {
        Wanted {
            bits: [KNOWN; Metric::ALL.len()],
        }
    }

    /// The last value of every metric, no window.
    pub const fn lasts() -> Wanted {
        Wanted {
            bits: [1; Metric::ALL.len()],
        }
    }

    /// `self` with `metric` over `window` (`None`: its last value).
    #[must_use]
    pub fn with(mut self, metric: Metric, window: Option<Window>) -> Wanted {
        self.bits[metric.index()] |= match window {
            None => 1,
            Some(w) => 1 << (1 + w.index()),
        };
        self
    }

    /// Every series of `self` and of `other`.
    #[must_use]
    pub fn union(mut self, other: Wanted) -> Wanted {
        for (a, b) in self.bits.iter_mut().zip(other.bits) {
            *a |= b;
        }
        self
    }

    /// Whether `self` holds every series of `other`.
    pub fn covers(&self, other: &Wanted) -> bool {
        self.bits.iter().zip(other.bits).all(|(a, b)| a & b == b)
    }

    /// What `interest` names (every series when it names none). A metric or window this build
    /// does not know (a newer collector's) is left out.
    pub fn of(interest: &Interest) -> Wanted {
        if interest.series.is_empty() {
            return Wanted::every();
        }
        let mut w = Wanted::none();
        for s in &interest.series {
            let Some(m) = crate::agent::Metric::try_from(s.metric)
                .ok()
                .and_then(crate::agent::Metric::vocab)
            else {
                continue;
            };
            let window = match s.window_s {
                0 => None,
                secs => match Window::from_secs(secs) {
                    Some(window) => Some(window),
                    None => continue,
                },
            };
            w = w.with(m, window);
        }
        w
    }

    /// The series as `Interest.series` names them, metric by metric, the last value (window 0)
    /// before the windows, shortest first. Empty for [`Wanted::none`], which an agent reads as
    /// every series: ask for at least one.
    pub fn series(&self) -> Vec<Series> {
        let mut out = Vec::new();
        for m in Metric::ALL {
            let metric = crate::agent::Metric::from(m) as i32;
            if self.last(m) {
                out.push(Series {
                    metric,
                    window_s: 0,
                });
            }
            for w in Window::ALL {
                if self.window(m, w) {
                    out.push(Series {
                        metric,
                        window_s: w.secs(),
                    });
                }
            }
        }
        out
    }

    /// Whether any series of `m` is wanted.
    pub fn any(&self, m: Metric) -> bool {
        self.bits[m.index()] != 0
    }

    /// Whether `m`'s last value is wanted.
    pub fn last(&self, m: Metric) -> bool {
        self.bits[m.index()] & 1 != 0
    }

    /// Whether `m` over `w` is wanted.
    pub fn window(&self, m: Metric, w: Window) -> bool {
        self.bits[m.index()] & (1 << (1 + w.index())) != 0
    }

    /// How many series it names (for logs).
    pub fn count(&self) -> u32 {
        self.bits.iter().map(|b| (b & KNOWN).count_ones()).sum()
    }

    /// Leaves in `metrics` only what is wanted: the metrics with a series wanted, the last value
    /// when wanted, the wanted windows (what an agent computing only these would send).
    pub fn retain(&self, metrics: &mut Vec<MetricSummary>) {
        metrics.retain_mut(|s| {
            let Some(m) = crate::agent::Metric::try_from(s.metric)
                .ok()
                .and_then(crate::agent::Metric::vocab)
            else {
                return false;
            };
            if !self.any(m) {
                return false;
            }
            if !self.last(m) {
                s.last = None;
            }
            s.windows.retain(|w| {
                Window::from_secs(w.window_s).is_some_and(|window| self.window(m, window))
            });
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_name_what_was_added_and_read_back_the_same() {
        let w = Wanted::none()
            .with(Metric::SmActive, Some(Window::S30))
            .with(Metric::GpuUtil, Some(Window::S30))
            .with(Metric::GpuUtil, None);
        assert_eq!(w.count(), 3);
        let interest = Interest {
            series: w.series(),
            ..Interest::default()
        };
        assert_eq!(Wanted::of(&interest), w);
        assert!(w.window(Metric::SmActive, Window::S30));
        assert!(!w.last(Metric::SmActive) && w.last(Metric::GpuUtil));
        assert!(!w.any(Metric::PowerWatts));
        // No series named: every one, as revision 2 sent.
        assert_eq!(Wanted::of(&Interest::default()), Wanted::every());
        assert_eq!(Wanted::every().count() as usize, 10 * 5);
    }

    #[test]
    fn a_series_this_build_does_not_know_is_left_out() {
        let interest = Interest {
            series: vec![
                Series {
                    metric: 9_999,
                    window_s: 0,
                },
                Series {
                    metric: crate::agent::Metric::from(Metric::SmActive) as i32,
                    window_s: 45,
                },
                Series {
                    metric: crate::agent::Metric::from(Metric::SmActive) as i32,
                    window_s: 60,
                },
            ],
            ..Interest::default()
        };
        assert_eq!(
            Wanted::of(&interest),
            Wanted::none().with(Metric::SmActive, Some(Window::S60))
        );
    }

    #[test]
    fn union_and_covers_agree() {
        let a = Wanted::lasts();
        let b = Wanted::none().with(Metric::SmActive, Some(Window::M5));
        let u = a.union(b);
        assert!(u.covers(&a) && u.covers(&b) && !a.covers(&u) && !b.covers(&a));
        assert!(Wanted::every().covers(&u));
        assert!(a.covers(&Wanted::none()));
    }

    #[test]
    fn retain_keeps_only_the_wanted_series() {
        let mut ms: Vec<MetricSummary> = Metric::ALL
            .map(|m| MetricSummary::steady(m, 5.0, |w| w.secs()))
            .to_vec();
        let w = Wanted::none()
            .with(Metric::SmActive, Some(Window::S30))
            .with(Metric::GpuUtil, None);
        w.retain(&mut ms);
        assert_eq!(ms.len(), 2);
        let sm = &ms[0];
        assert_eq!(sm.last, None);
        assert_eq!(
            sm.windows.iter().map(|w| w.window_s).collect::<Vec<_>>(),
            [30]
        );
        assert_eq!(ms[1].last, Some(5.0));
        assert!(ms[1].windows.is_empty());
    }
}
