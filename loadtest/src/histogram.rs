//! A fixed-size log-linear histogram of durations in microseconds: bounded memory whatever the
//! run's length (about 19 KiB), at most 1/64 relative error per value.
//!
//! Values below 128 µs have a bucket each; above, every power of two [2^e, 2^(e+1)) is split into
//! 64 equal buckets. Values of 2^40 µs (about 12.7 days) and more share the last bucket.
//! Quantiles report the upper edge of the bucket holding the nearest-rank sample (never below
//! the true value, never above the largest value seen); max and mean are exact.

use std::time::Duration;

use serde::Serialize;

/// Values below this have one bucket per microsecond.
const LINEAR: u64 = 128;
/// Buckets per power of two above `LINEAR` (log2 = 6).
const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS;
/// Exponents 7..40 are split; everything from 2^40 µs on goes to the last bucket.
const MAX_EXP: u32 = 40;
const BUCKETS: usize = LINEAR as usize + ((MAX_EXP - 7) as usize) * SUB as usize + 1;

#[derive(Clone, Debug)]
pub struct Histogram {
    counts: Vec<u64>,
    total: u64,
    sum_us: u128,
    max_us: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: vec![0; BUCKETS],
            total: 0,
            sum_us: 0,
            max_us: 0,
        }
    }
}

fn index(us: u64) -> usize {
    if us < LINEAR {
        return us as usize;
    }
    let exp = 63 - us.leading_zeros();
    if exp >= MAX_EXP {
        return BUCKETS - 1;
    }
    let sub = (us >> (exp - SUB_BITS)) & (SUB - 1);
    LINEAR as usize + (exp - 7) as usize * SUB as usize + sub as usize
}

/// The largest value (µs) that falls into bucket `i`.
fn upper(i: usize) -> u64 {
    if i < LINEAR as usize {
        return i as u64;
    }
    if i >= BUCKETS - 1 {
        return u64::MAX;
    }
    let k = (i - LINEAR as usize) as u64;
    let exp = 7 + (k / SUB) as u32;
    let sub = k % SUB;
    let width = 1u64 << (exp - SUB_BITS);
    (1u64 << exp) + (sub + 1) * width - 1
}

/// Quantiles and moments in milliseconds, as written into the ack file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
    pub mean: f64,
}

impl Histogram {
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.counts[index(us)] += 1;
        self.total += 1;
        self.sum_us += u128::from(us);
        self.max_us = self.max_us.max(us);
    }

    /// The value (µs) at quantile `q` (0 < q <= 1) by nearest rank: the upper edge of its
    /// bucket, capped at the largest value recorded. 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((q * self.total as f64).ceil() as u64).clamp(1, self.total);
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return upper(i).min(self.max_us);
            }
        }
        self.max_us
    }

    pub fn summary(&self) -> Summary {
        let ms = |us: u64| us as f64 / 1000.0;
        Summary {
            count: self.total,
            p50: ms(self.quantile_us(0.50)),
            p95: ms(self.quantile_us(0.95)),
            p99: ms(self.quantile_us(0.99)),
            p999: ms(self.quantile_us(0.999)),
            max: ms(self.max_us),
            mean: if self.total == 0 {
                0.0
            } else {
                self.sum_us as f64 / self.total as f64 / 1000.0
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_lands_in_a_bucket_whose_upper_edge_is_within_one_64th_above_it() {
        let mut v = 0u64;
        while v < (1u64 << MAX_EXP) {
            let i = index(v);
            assert!(upper(i) >= v, "{v} above its bucket's edge {}", upper(i));
            assert!(
                (upper(i) - v) as f64 <= (v as f64 / 64.0).max(0.0),
                "{v}: edge {} too far",
                upper(i)
            );
            if i > 0 {
                assert!(upper(i - 1) < v, "{v} also fits the bucket before");
            }
            v = v + 1 + v / 97;
        }
        assert_eq!(index(u64::MAX), BUCKETS - 1);
    }

    #[test]
    fn quantiles_follow_the_nearest_rank_and_never_exceed_the_max() {
        let mut h = Histogram::default();
        for ms in 1..=1000u64 {
            h.record(Duration::from_millis(ms));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        for (got, want) in [(s.p50, 500.0), (s.p95, 950.0), (s.p99, 990.0), (s.p999, 999.0)] {
            assert!(got >= want && got <= want * (1.0 + 1.0 / 64.0), "{got} vs {want}");
        }
        assert_eq!(s.max, 1000.0);
        assert!((s.mean - 500.5).abs() < 1e-9);

        let mut one = Histogram::default();
        one.record(Duration::from_micros(1234));
        assert_eq!(one.summary().p99, 1.234);
        assert_eq!(Histogram::default().summary(), Summary::default());
    }
}
