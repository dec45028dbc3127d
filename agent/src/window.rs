//! Rolling windows (10 s, 30 s, 60 s, 5 min) of every metric: avg, min, max, p95, last, count.
//!
//! Owns the windowed statistics and nothing else: no I/O, no clocks (time comes from the
//! samples). Each push costs O(1) amortized per metric and window: a running sum, monotonic
//! deques for min and max, and a log-linear histogram for p95. Memory is bounded by the samples
//! of the longest window.
//!
//! Precision: `avg`, `min`, `max`, `last` and `count` are exact. `p95` (nearest rank) comes from
//! a histogram with 32 buckets per power of two (0.25-unit buckets below 16), so it is within
//! 1.6 % of the true value, and exact when the window's values are all equal (it is clamped to
//! `[min, max]`). `vram_used_bytes` is bucketed in MiB.

use std::collections::VecDeque;
use std::time::Duration;

use crate::sample::Metric;

/// The windows every metric keeps: the vocabulary's (`vocab`).
pub use vocab::Window;

const LINEAR: u64 = 64;
const SUB: u64 = 32;
/// Histogram buckets: 64 linear ones, then 32 per power of two up to 2^32.
const BINS: usize = (LINEAR + (32 - 6) * SUB) as usize;

fn bin(units: u64) -> usize {
    if units < LINEAR {
        return units as usize;
    }
    let e = 63 - u64::from(units.leading_zeros()); // 6..=31
    (LINEAR + (e - 6) * SUB + ((units >> (e - 5)) - SUB)) as usize
}

/// Lower edge (in units) of bucket `b`.
fn bin_lower(b: usize) -> u64 {
    let b = b as u64;
    if b < LINEAR {
        return b;
    }
    let e = (b - LINEAR) / SUB + 6;
    ((b - LINEAR) % SUB + SUB) << (e - 5)
}

/// Units per value: 4 units per point (0.25 resolution), MiB for bytes.
fn units_per_value(metric: Metric) -> f64 {
    match metric {
        Metric::VramUsedBytes => 4.0 / (1u64 << 20) as f64,
        _ => 4.0,
    }
}

/// Summary of one metric over one window. Only exists when the window has samples.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Mean.
    pub avg: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// 95th percentile (nearest rank, see the module doc for precision).
    pub p95: f64,
    /// Samples in the window.
    pub count: u32,
}

struct Stat {
    sum: f64,
    count: u32,
    min_q: VecDeque<(u64, f32)>,
    max_q: VecDeque<(u64, f32)>,
    hist: Box<[u16]>,
}

impl Stat {
    fn new() -> Stat {
        Stat {
            sum: 0.0,
            count: 0,
            min_q: VecDeque::new(),
            max_q: VecDeque::new(),
            hist: vec![0; BINS].into_boxed_slice(),
        }
    }

    fn add(&mut self, seq: u64, v: f32, b: usize) {
        self.sum += f64::from(v);
        self.count += 1;
        while self.min_q.back().is_some_and(|&(_, x)| x >= v) {
            self.min_q.pop_back();
        }
        self.min_q.push_back((seq, v));
        while self.max_q.back().is_some_and(|&(_, x)| x <= v) {
            self.max_q.pop_back();
        }
        self.max_q.push_back((seq, v));
        self.hist[b] = self.hist[b].saturating_add(1);
    }

    fn remove(&mut self, seq: u64, v: f32, b: usize) {
        self.count -= 1;
        self.sum = if self.count == 0 {
            0.0
        } else {
            self.sum - f64::from(v)
        };
        if self.min_q.front().is_some_and(|&(s, _)| s == seq) {
            self.min_q.pop_front();
        }
        if self.max_q.front().is_some_and(|&(s, _)| s == seq) {
            self.max_q.pop_front();
        }
        self.hist[b] = self.hist[b].saturating_sub(1);
    }

    fn summary(&self, units: f64) -> Option<Summary> {
        if self.count == 0 {
            return None;
        }
        let min = f64::from(self.min_q.front()?.1);
        let max = f64::from(self.max_q.front()?.1);
        // Nearest rank: the smallest value with at least ceil(0.95 n) values at or below it,
        // i.e. with at least n - ceil(0.95 n) + 1 values at or above it. Scan down from max.
        let n = u64::from(self.count);
        let need = n - (n * 95).div_ceil(100) + 1;
        let mut seen = 0u64;
        let mut b = bin(to_units(max, units));
        loop {
            seen += u64::from(self.hist[b]);
            if seen >= need || b == 0 {
                break;
            }
            b -= 1;
        }
        let mid = (bin_lower(b) + bin_lower(b + 1)) as f64 / 2.0 / units;
        Some(Summary {
            avg: self.sum / self.count as f64,
            min,
            max,
            p95: mid.clamp(min, max),
            count: self.count,
        })
    }
}

fn to_units(v: f64, units: f64) -> u64 {
    (v * units).clamp(0.0, u32::MAX as f64) as u64
}

struct Entry<const M: usize> {
    ts_ns: u64,
    /// Values; NaN means absent. (Histogram buckets are recomputed on eviction rather than
    /// stored: memory is what the 5 m window costs.)
    values: [f32; M],
}

struct Span<const M: usize> {
    dur_ns: u64,
    /// Sequence number of the oldest sample inside the window.
    start: u64,
    stats: [Stat; M],
}

/// Rolling windows over `M` metrics whose values arrive together, one sample at a time.
pub struct WindowSet<const M: usize> {
    units: [f64; M],
    buf: VecDeque<Entry<M>>,
    /// Sequence number of `buf[0]`.
    first_seq: u64,
    windows: Vec<Span<M>>,
    last: [Option<f32>; M],
    last_ts_ns: u64,
}

/// The windows of one GPU: every [`Metric`].
pub type GpuWindows = WindowSet<{ Metric::COUNT }>;

impl GpuWindows {
    /// Windows for every [`Metric`].
    pub fn for_gpu() -> GpuWindows {
        WindowSet::new(Metric::ALL.map(units_per_value))
    }

    /// Windows for every [`Metric`], with room for the longest window's samples at `interval`
    /// reserved up front (a growing buffer would double past it).
    pub fn for_gpu_at(interval: Duration) -> GpuWindows {
        let mut w = Self::for_gpu();
        let longest = Window::LONGEST.duration();
        let n = longest.as_nanos() / interval.as_nanos().max(1);
        w.buf.reserve_exact(n.min(1 << 20) as usize + 2);
        w
    }

    /// Pushes one sample's metrics (as [`crate::sample::Sample::metrics`] gives them).
    pub fn push_metrics(&mut self, ts_ns: u64, values: [Option<f64>; Metric::COUNT]) {
        self.push(ts_ns, values.map(|v| v.map(|v| v as f32)));
    }

    /// Rebuilds the windows from a ring's history (an agent restarted on an existing ring file,
    /// or `dump` reading a running agent's ring).
    pub fn from_ring(
        ring: crate::ring::SampleReader<'_>,
        vram_total_bytes: u64,
        interval: Duration,
    ) -> GpuWindows {
        let mut w = GpuWindows::for_gpu_at(interval);
        ring.for_each(|s| w.push_metrics(s.ts_ns, s.metrics(vram_total_bytes)));
        w
    }

    /// The summary of `metric` over window `w`.
    pub fn metric(&self, metric: Metric, w: Window) -> Option<Summary> {
        self.summary(metric.index(), w)
    }
}

impl<const M: usize> WindowSet<M> {
    /// Empty windows; `units[i]` is the histogram resolution of metric `i` (buckets per unit).
    pub fn new(units: [f64; M]) -> Self {
        WindowSet {
            units,
            buf: VecDeque::new(),
            first_seq: 0,
            windows: Window::ALL
                .iter()
                .map(|w| Span {
                    dur_ns: w.duration().as_nanos() as u64,
                    start: 0,
                    stats: std::array::from_fn(|_| Stat::new()),
                })
                .collect(),
            last: [None; M],
            last_ts_ns: 0,
        }
    }

    /// Adds a sample taken at `ts_ns`; `None` values are absent (not zero). A timestamp older
    /// than the previous one (a clock step back) is treated as the previous one.
    pub fn push(&mut self, ts_ns: u64, values: [Option<f32>; M]) {
        let ts_ns = ts_ns.max(self.last_ts_ns);
        self.last_ts_ns = ts_ns;
        let seq = self.first_seq + self.buf.len() as u64;
        let mut entry = Entry {
            ts_ns,
            values: [f32::NAN; M],
        };
        for (i, v) in values.iter().enumerate() {
            // `last` is this sample's value: a metric the newest sample lacks has none, rather
            // than a stale one that reads as current.
            self.last[i] = v.filter(|v| v.is_finite());
            if let Some(v) = self.last[i] {
                entry.values[i] = v;
                let b = bin(to_units(f64::from(v), self.units[i]));
                for w in &mut self.windows {
                    w.stats[i].add(seq, v, b);
                }
            }
        }
        self.buf.push_back(entry);
        self.evict(ts_ns);
    }

    fn evict(&mut self, now_ns: u64) {
        let units = self.units;
        for w in &mut self.windows {
            // The window is (now - dur, now]; nothing is old enough before `dur` has passed.
            let Some(cutoff) = now_ns.checked_sub(w.dur_ns) else {
                continue;
            };
            while let Some(e) = self.buf.get((w.start - self.first_seq) as usize) {
                if e.ts_ns > cutoff {
                    break;
                }
                for (i, &v) in e.values.iter().enumerate() {
                    if !v.is_nan() {
                        let b = bin(to_units(f64::from(v), units[i]));
                        w.stats[i].remove(w.start, v, b);
                    }
                }
                w.start += 1;
            }
        }
        let keep_from = self.windows.iter().map(|w| w.start).min().unwrap_or(0);
        while self.first_seq < keep_from {
            self.buf.pop_front();
            self.first_seq += 1;
        }
    }

    /// The summary of metric `i` over window `w`; `None` when the
    /// window holds no value of it.
    pub fn summary(&self, i: usize, w: Window) -> Option<Summary> {
        self.windows[w.index()].stats[i].summary(self.units[i])
    }

    /// Metric `i` in the newest sample; `None` when that sample lacks it.
    pub fn last(&self, i: usize) -> Option<f32> {
        self.last[i]
    }

    /// Timestamp of the newest sample.
    pub fn last_ts_ns(&self) -> u64 {
        self.last_ts_ns
    }

    /// Samples currently held (bounded by the longest window).
    pub fn held(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn one(units: f64) -> WindowSet<1> {
        WindowSet::new([units])
    }

    /// Exact nearest-rank p95, the reference for the histogram.
    fn p95(values: &[f32]) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f32::total_cmp);
        f64::from(v[((v.len() * 95).div_ceil(100)) - 1])
    }

    #[test]
    fn buckets_cover_the_range_monotonically() {
        let mut prev = 0;
        for u in (0..5000).chain([u32::MAX as u64 - 1, u32::MAX as u64]) {
            let b = bin(u);
            assert!(b >= prev && b < BINS, "{u} -> {b}");
            assert!(
                bin_lower(b) <= u && u < bin_lower(b + 1).max(u + 1),
                "{u} -> {b}"
            );
            prev = b;
        }
    }

    #[test]
    fn windows_forget_samples_older_than_their_duration() {
        let mut w = one(4.0);
        // One sample per second for 400 s: value = second.
        for t in 0..400u64 {
            w.push(t * S, [Some(t as f32)]);
        }
        let s10 = w.summary(0, Window::S10).unwrap();
        assert_eq!(s10.count, 10);
        assert_eq!((s10.min, s10.max), (390.0, 399.0));
        assert_eq!(s10.avg, 394.5);
        let s5m = w.summary(0, Window::M5).unwrap();
        assert_eq!(s5m.count, 300);
        assert_eq!((s5m.min, s5m.max), (100.0, 399.0));
        assert!(
            w.held() <= 301,
            "memory bounded by the longest window: {}",
            w.held()
        );
        assert_eq!(w.last(0), Some(399.0));
        // A sample without the metric: no `last`, though the windows still hold older values.
        w.push(400 * S, [None]);
        assert_eq!(w.last(0), None);
        assert!(w.summary(0, Window::S10).is_some());
    }

    #[test]
    fn p95_is_within_the_documented_precision() {
        let mut w = one(4.0);
        let mut vals = vec![];
        let mut x = 12345u64;
        for t in 0..3000u64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = (x >> 40) as f32 / (1u64 << 24) as f32 * 100.0;
            vals.push(v);
            w.push(t * S / 10, [Some(v)]);
        }
        let s = w.summary(0, Window::M5).unwrap();
        let want = p95(&vals);
        assert!(
            (s.p95 - want).abs() <= want * 0.016 + 0.125,
            "{} vs {want}",
            s.p95
        );
        let exact_avg = vals.iter().map(|&v| f64::from(v)).sum::<f64>() / vals.len() as f64;
        assert!((s.avg - exact_avg).abs() < 1e-6);
    }

    #[test]
    fn constant_load_gives_exact_p95_and_a_spike_shows_in_max_and_p95() {
        let mut w = one(4.0);
        for t in 0..100u64 {
            w.push(t * S / 10, [Some(90.0)]);
        }
        assert_eq!(w.summary(0, Window::S10).unwrap().p95, 90.0);
        for t in 100..110u64 {
            w.push(t * S / 10, [Some(30.0)]);
        }
        let s = w.summary(0, Window::S10).unwrap();
        assert_eq!((s.min, s.max, s.count), (30.0, 90.0, 100));
        assert_eq!(s.p95, 90.0);
    }

    #[test]
    fn absent_values_are_not_counted_as_zero() {
        let mut w = WindowSet::<2>::new([4.0, 4.0]);
        w.push(0, [Some(50.0), None]);
        w.push(S, [None, None]);
        let s = w.summary(0, Window::S10).unwrap();
        assert_eq!((s.avg, s.count), (50.0, 1));
        assert_eq!(w.summary(1, Window::S10), None);
        // After the window passes with only absent samples, the metric is unavailable again.
        w.push(20 * S, [None, None]);
        assert_eq!(w.summary(0, Window::S10), None);
        assert_eq!(w.summary(0, Window::M5).unwrap().count, 1);
    }

    #[test]
    fn a_clock_step_back_does_not_corrupt_the_windows() {
        let mut w = one(4.0);
        w.push(100 * S, [Some(1.0)]);
        w.push(50 * S, [Some(2.0)]);
        w.push(105 * S, [Some(3.0)]);
        assert_eq!(w.summary(0, Window::S10).unwrap().count, 3);
        w.push(200 * S, [Some(4.0)]);
        assert_eq!(w.summary(0, Window::S10).unwrap().count, 1);
    }

    #[test]
    fn vram_bytes_are_bucketed_in_mib() {
        let mut w = GpuWindows::for_gpu();
        let mut vals = [None; Metric::COUNT];
        vals[Metric::VramUsedBytes.index()] = Some(20.0 * (1u64 << 30) as f64);
        w.push_metrics(0, vals);
        let s = w.metric(Metric::VramUsedBytes, Window::S10).unwrap();
        assert_eq!(s.p95, 20.0 * (1u64 << 30) as f64);
    }
}
