//! Points accepted per experiment in the last minute, for the experiment list's
//! live activity column. One counter per second per experiment, kept for 60 s;
//! idle experiments are dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

const WINDOW: usize = 60;

#[derive(Debug)]
struct Ring {
    /// Points per second, by second since `Activity::start` modulo the window.
    counts: [u64; WINDOW],
    /// The second each slot was last written.
    seconds: [u64; WINDOW],
}

/// See the module docs.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    rings: Mutex<HashMap<Arc<str>, Ring>>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            start: Instant::now(),
            rings: Mutex::default(),
        }
    }
}

impl Activity {
    fn now(&self) -> u64 {
        self.start.elapsed().as_secs()
    }

    /// Counts `points` accepted now for `experiment`.
    pub fn record(&self, experiment: &Arc<str>, points: u64) {
        let now = self.now();
        let slot = (now % WINDOW as u64) as usize;
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let ring = rings.entry(Arc::clone(experiment)).or_insert(Ring {
            counts: [0; WINDOW],
            seconds: [0; WINDOW],
        });
        if ring.seconds[slot] != now {
            ring.seconds[slot] = now;
            ring.counts[slot] = 0;
        }
        ring.counts[slot] += points;
        // Now and then, forget experiments idle for a whole window.
        if now.is_multiple_of(16) && slot == (now % WINDOW as u64) as usize && rings.len() > 1024 {
            rings.retain(|_, r| r.seconds.iter().any(|&s| s + WINDOW as u64 > now));
        }
    }

    /// Points accepted for `experiment` in the last 60 seconds.
    pub fn last_minute(&self, experiment: &str) -> u64 {
        let now = self.now();
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        rings.get(experiment).map_or(0, |r| {
            r.counts
                .iter()
                .zip(&r.seconds)
                .filter(|(_, s)| **s + (WINDOW as u64) > now && **s <= now)
                .map(|(c, _)| c)
                .sum()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_add_up_per_experiment() {
        let a = Activity::default();
        let id: Arc<str> = Arc::from("e");
        a.record(&id, 5);
        a.record(&id, 7);
        assert_eq!(a.last_minute("e"), 12);
        assert_eq!(a.last_minute("other"), 0);
    }
}
