//! Points accepted per experiment in about the last minute, for the experiment
//! list's live activity column.
//!
//! Each experiment gets 12 buckets of 5 s (the window is the current bucket and
//! the 11 before it: 55 to 60 s). At most [`MAX_TRACKED`] experiments are counted
//! at once, so a burst across a million experiments costs a few MiB rather than a
//! ring per experiment ever seen; when the table is full of experiments active in
//! the window, a new one is turned away and reads as unknown (`None`) until the
//! window has passed. Experiments idle for a whole window are dropped when room is
//! needed, at most once per bucket. A request takes the lock once for all its
//! experiments.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const BUCKET_SECS: u64 = 5;
const BUCKETS: u64 = 12;
/// Experiments counted at once (about 100 bytes each, plus its id).
pub const MAX_TRACKED: usize = 32_768;

#[derive(Debug)]
struct Ring {
    /// The newest bucket written (buckets count `BUCKET_SECS` from `Activity::start`).
    newest: u64,
    /// Points per bucket, at `bucket % BUCKETS`.
    counts: [u32; BUCKETS as usize],
}

impl Ring {
    fn new(bucket: u64) -> Self {
        Self {
            newest: bucket,
            counts: [0; BUCKETS as usize],
        }
    }

    fn add(&mut self, bucket: u64, points: u64) {
        if bucket > self.newest {
            for b in (self.newest + 1).max(bucket.saturating_sub(BUCKETS - 1))..=bucket {
                self.counts[(b % BUCKETS) as usize] = 0;
            }
            self.newest = bucket;
        }
        let slot = &mut self.counts[(self.newest % BUCKETS) as usize];
        *slot = slot.saturating_add(u32::try_from(points).unwrap_or(u32::MAX));
    }

    /// Points in the window that ends with `bucket` (never before `newest`).
    fn sum(&self, bucket: u64) -> u64 {
        let first = (bucket + 1).saturating_sub(BUCKETS);
        (first..=self.newest)
            .map(|b| u64::from(self.counts[(b % BUCKETS) as usize]))
            .sum()
    }

    fn idle(&self, bucket: u64) -> bool {
        self.newest + BUCKETS <= bucket
    }
}

#[derive(Debug, Default)]
struct Rings {
    by_experiment: HashMap<Arc<str>, Ring>,
    /// The bucket of the last sweep for idle experiments.
    swept: Option<u64>,
    /// The bucket an experiment was last turned away in (the table was full).
    turned_away: Option<u64>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    limit: usize,
    rings: Mutex<Rings>,
}

impl Default for Activity {
    fn default() -> Self {
        Self::with_limit(MAX_TRACKED)
    }
}

impl Activity {
    /// Counts at most `limit` experiments at once.
    pub fn with_limit(limit: usize) -> Self {
        Self {
            start: Instant::now(),
            limit,
            rings: Mutex::default(),
        }
    }

    fn bucket(&self) -> u64 {
        self.start.elapsed().as_secs() / BUCKET_SECS
    }

    /// Counts points accepted now, per experiment.
    pub fn record<'a>(&self, points: impl IntoIterator<Item = (&'a Arc<str>, u64)>) {
        self.record_at(self.bucket(), points);
    }

    /// Points accepted for `experiment` in about the last minute; `None` if it was
    /// not counted because the table was full.
    pub fn last_minute(&self, experiment: &str) -> Option<u64> {
        self.last_minute_at(self.bucket(), experiment)
    }

    fn record_at<'a>(&self, bucket: u64, points: impl IntoIterator<Item = (&'a Arc<str>, u64)>) {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        for (experiment, n) in points {
            if let Some(ring) = rings.by_experiment.get_mut(experiment) {
                ring.add(bucket, n);
                continue;
            }
            if rings.by_experiment.len() >= self.limit && rings.swept != Some(bucket) {
                rings.by_experiment.retain(|_, r| !r.idle(bucket));
                rings.swept = Some(bucket);
            }
            if rings.by_experiment.len() < self.limit {
                let mut ring = Ring::new(bucket);
                ring.add(bucket, n);
                rings.by_experiment.insert(Arc::clone(experiment), ring);
            } else {
                rings.turned_away = Some(bucket);
            }
        }
    }

    fn last_minute_at(&self, bucket: u64, experiment: &str) -> Option<u64> {
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        match rings.by_experiment.get(experiment) {
            Some(ring) => Some(ring.sum(bucket)),
            None if rings.turned_away.is_some_and(|b| b + BUCKETS > bucket) => None,
            None => Some(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn counts_add_up_per_experiment() {
        let a = Activity::default();
        let (e, f) = (id("e"), id("f"));
        a.record([(&e, 5), (&f, 1)]);
        a.record([(&e, 7)]);
        assert_eq!(a.last_minute("e"), Some(12));
        assert_eq!(a.last_minute("f"), Some(1));
        assert_eq!(a.last_minute("other"), Some(0));
    }

    #[test]
    fn points_leave_the_window_after_a_minute() {
        let a = Activity::default();
        let e = id("e");
        a.record_at(100, [(&e, 1)]);
        a.record_at(105, [(&e, 10)]);
        a.record_at(111, [(&e, 100)]);
        // Window ending at bucket 111: buckets 100..=111.
        assert_eq!(a.last_minute_at(111, "e"), Some(111));
        // Bucket 100 has left it.
        assert_eq!(a.last_minute_at(112, "e"), Some(110));
        assert_eq!(a.last_minute_at(116, "e"), Some(110));
        assert_eq!(a.last_minute_at(117, "e"), Some(100));
        assert_eq!(a.last_minute_at(123, "e"), Some(0));
        // A write after a long gap starts from zero.
        a.record_at(500, [(&e, 3)]);
        assert_eq!(a.last_minute_at(500, "e"), Some(3));
    }

    #[test]
    fn a_full_table_turns_new_experiments_away_until_room_is_made() {
        let a = Activity::with_limit(2);
        let (e, f, g) = (id("e"), id("f"), id("g"));
        a.record_at(0, [(&e, 1), (&f, 2), (&g, 4)]);
        assert_eq!(a.last_minute_at(0, "e"), Some(1));
        assert_eq!(a.last_minute_at(0, "f"), Some(2));
        // Turned away: unknown, not zero; counted ones keep counting.
        assert_eq!(a.last_minute_at(0, "g"), None);
        assert_eq!(a.last_minute_at(0, "other"), None);
        a.record_at(6, [(&e, 1)]);
        assert_eq!(a.last_minute_at(6, "e"), Some(2));
        // f has been idle for a window: g takes its place.
        a.record_at(13, [(&g, 8)]);
        assert_eq!(a.last_minute_at(13, "g"), Some(8));
        assert_eq!(a.last_minute_at(13, "f"), Some(0));
        assert_eq!(a.last_minute_at(13, "e"), Some(1));
        // A window after the last refusal, untracked experiments read as zero again.
        assert_eq!(a.last_minute_at(12, "other"), Some(0));
    }
}
