//! Recent client batch ids, so a retried batch is acknowledged again instead of
//! being written twice.
//!
//! A client (the SDK) gives every batch an id and keeps it on every retry. When a
//! batch with a new id is admitted, its id is held "in flight" until the batch is
//! durable (then it is remembered with its point count) or has failed (then it is
//! forgotten, and a retry is admitted afresh). A retry that arrives while the first
//! attempt is still in flight waits for its outcome.
//!
//! Remembered ids survive a restart and a crash: the id travels in the batch's WAL
//! record (replay remembers it) and is stored in the index with the published file
//! (start-up loads the recent ones). Ids are kept for a time window and up to a
//! count; a retry later than that is taken as a new batch.
//!
//! The API scopes each id by the namespaces its batch writes to (see
//! [`super::Batch::scoped_id`]), so one namespace's clients cannot make another's
//! batches pass as retries. Ids recorded unscoped, by a release before the scoping,
//! still match a retry of theirs for as long as they are kept.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::model::Micros;

/// Ends the namespaces that scope a client batch id.
const SCOPE_END: char = '\u{1f}';

/// A client batch id scoped by the namespaces (sorted, distinct) its batch writes
/// to. Namespaces never hold `/` or the separator (see
/// [`crate::paths::valid_namespace`]), so scoped ids of different namespaces never
/// meet.
pub fn scoped(namespaces: &[&str], client_batch_id: &str) -> String {
    format!("{}{SCOPE_END}{client_batch_id}", namespaces.join("/"))
}

#[derive(Debug)]
enum Entry {
    /// Being written; the receiver resolves when the attempt ends either way.
    InFlight(watch::Receiver<()>),
    Done {
        points: u64,
    },
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<Arc<str>, Entry>,
    /// Remembered ids, oldest first, for expiry.
    order: VecDeque<(Micros, Arc<str>)>,
}

/// See the module docs.
#[derive(Debug)]
pub struct RecentBatches {
    state: Mutex<State>,
    window: Duration,
    max_entries: usize,
}

/// What to do with a batch, by its id.
#[derive(Debug)]
pub enum Admission {
    /// A new batch: write it, then complete the ticket.
    New(Ticket),
    /// Already written: acknowledge it again.
    Duplicate { points: u64 },
    /// Another attempt is in flight: wait on this, then ask again.
    Wait(watch::Receiver<()>),
}

/// An admitted batch id. [`Ticket::complete`] once the batch is durable; dropping
/// it without completing lets a retry write the batch.
#[derive(Debug)]
pub struct Ticket {
    owner: Arc<RecentBatches>,
    id: Arc<str>,
    done: bool,
    _resolve: watch::Sender<()>,
}

impl Ticket {
    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The batch of `points` points accepted at `at` is durable.
    pub fn complete(mut self, points: u64, at: Micros) {
        self.done = true;
        self.owner.remember(Arc::clone(&self.id), at, points);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.done {
            let mut state = self.owner.lock();
            if matches!(state.entries.get(&self.id), Some(Entry::InFlight(_))) {
                state.entries.remove(&self.id);
            }
        }
        // Dropping the sender wakes every waiter.
    }
}

impl RecentBatches {
    pub fn new(window: Duration, max_entries: usize) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::default(),
            window,
            max_entries: max_entries.max(1),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long ids are kept.
    pub fn window(&self) -> Duration {
        self.window
    }

    pub fn admit(self: &Arc<Self>, id: &str) -> Admission {
        let mut state = self.lock();
        let recorded = state.entries.get(id).or_else(|| {
            // An id recorded before ids were scoped.
            let (_, unscoped) = id.split_once(SCOPE_END)?;
            if unscoped.contains(SCOPE_END) {
                // It could name another namespace's scoped id.
                return None;
            }
            match state.entries.get(unscoped) {
                done @ Some(Entry::Done { .. }) => done,
                _ => None,
            }
        });
        match recorded {
            Some(Entry::Done { points }) => Admission::Duplicate { points: *points },
            Some(Entry::InFlight(rx)) => Admission::Wait(rx.clone()),
            None => {
                let (tx, rx) = watch::channel(());
                let id: Arc<str> = Arc::from(id);
                state.entries.insert(Arc::clone(&id), Entry::InFlight(rx));
                Admission::New(Ticket {
                    owner: Arc::clone(self),
                    id,
                    done: false,
                    _resolve: tx,
                })
            }
        }
    }

    /// Remembers a written batch (also at start-up, from the index and the WAL).
    pub fn remember(&self, id: Arc<str>, at: Micros, points: u64) {
        let mut state = self.lock();
        state
            .entries
            .insert(Arc::clone(&id), Entry::Done { points });
        state.order.push_back((at, id));
        let horizon = at.saturating_sub(self.window.as_micros() as i64);
        while let Some((oldest, _)) = state.order.front() {
            if *oldest >= horizon && state.order.len() <= self.max_entries {
                break;
            }
            if let Some((_, old)) = state.order.pop_front()
                && matches!(state.entries.get(&old), Some(Entry::Done { .. }))
            {
                state.entries.remove(&old);
            }
        }
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.lock().order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_are_recognised_failures_forgotten_and_waits_resolved() {
        let recent = RecentBatches::new(Duration::from_secs(60), 100);
        let Admission::New(ticket) = recent.admit("a") else {
            panic!("first sight of an id is new");
        };
        let Admission::Wait(mut rx) = recent.admit("a") else {
            panic!("a retry during the first attempt waits");
        };
        drop(ticket); // the attempt failed
        assert!(rx.changed().await.is_err(), "the waiter is woken");
        let Admission::New(ticket) = recent.admit("a") else {
            panic!("after a failure the retry is new");
        };
        ticket.complete(42, 1_000);
        assert!(matches!(
            recent.admit("a"),
            Admission::Duplicate { points: 42 }
        ));
    }

    /// An id recorded unscoped (by a release before ids were scoped) still
    /// matches a retry of its batch; an id holding the separator never reaches
    /// another namespace's scoped id that way.
    #[test]
    fn ids_recorded_before_scoping_still_match_their_retries() {
        let recent = RecentBatches::new(Duration::from_secs(60), 100);
        recent.remember(Arc::from("old"), 1_000, 7);
        assert!(matches!(
            recent.admit(&scoped(&["cv"], "old")),
            Admission::Duplicate { points: 7 }
        ));
        recent.remember(Arc::from(scoped(&["nlp"], "x")), 1_000, 3);
        assert!(matches!(
            recent.admit(&scoped(&["cv"], &scoped(&["nlp"], "x"))),
            Admission::New(_)
        ));
    }

    #[test]
    fn old_and_excess_ids_are_forgotten() {
        let recent = RecentBatches::new(Duration::from_micros(100), 3);
        for (i, at) in [0, 10, 20, 30].into_iter().enumerate() {
            recent.remember(Arc::from(format!("b{i}")), at, 1);
        }
        // At most three: b0 went first.
        assert!(matches!(recent.admit("b0"), Admission::New(_)));
        assert!(matches!(recent.admit("b1"), Admission::Duplicate { .. }));
        recent.remember(Arc::from("late"), 1_000, 1);
        // Everything older than 100 µs before the newest is gone.
        assert!(matches!(recent.admit("b3"), Admission::New(_)));
        assert!(matches!(recent.admit("late"), Admission::Duplicate { .. }));
    }
}
