//! Metric summaries folded in after publication, off the publish path.
//!
//! A published file's summaries touch a row of `summaries` and up to six search
//! entries for every (experiment, key) in it, at random places in B-trees that
//! grow with the catalogue. Merged in the publish transaction, they made a
//! publish of a file spanning tens of thousands of experiments take seconds once
//! the catalogue held a million, and the writers, waiting on their publishers,
//! stopped taking points. So the publish transaction records the file's summaries
//! as one row of `summary_deltas` instead, and a thread of its own folds those
//! rows into `summaries` and the search entries in bounded transactions, each
//! deleting the rows it applies: every published point is counted once, whatever
//! fails, as before. Search trails publication by the fold's backlog, as it
//! already trailed ingest by a writer's roll; a read of one experiment's
//! summaries does not, adding the rows still waiting ([`PendingSummaries`]).
//!
//! The fold takes that work off the publish transaction, not off the index's one
//! writer, which folds and publishes share: at a million experiments it still
//! paces publication (the README's search bench says by how much).
//!
//! A fold commits without a sync: a crash takes its applied summaries and its
//! deleted rows back together, and the next durable commit (a publish) makes
//! both durable together.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use redb::{ReadOnlyTable, ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::catalog::merge_summaries;
use super::changes::meta_get;
use super::{
    Index, IndexError, META, SUMMARY_DELTA_NUMBERS, SUMMARY_DELTAS, decode, encode, storage,
};
use crate::model::MetricSummary;

/// The (experiment, key) summaries a fold transaction takes, at least one file's.
/// The fold is bound by its B-tree work, not its commits: at 100,000 experiments
/// 512 and 4,096 a transaction folded alike (18.7 and 19.3 s for 300,000), so a
/// small transaction holds up the publishes and creations waiting for the
/// index's writer briefly.
pub const FOLD_SUMMARIES: usize = 1_024;

/// The folder's pause between transactions.
const YIELD: Duration = Duration::from_millis(1);

/// How often the folder looks for rows nobody told it of.
const IDLE_CHECK: Duration = Duration::from_secs(1);

/// `meta` key: the number the next `summary_deltas` row takes.
pub(super) const NEXT_DELTA: &str = "summary_deltas_next";

/// One published file's summaries: (experiment, key, summary).
pub(super) type Summaries = Vec<(String, String, MetricSummary)>;

/// Decodes a `summary_deltas` row.
pub(super) fn decode_deltas(row: &[u8]) -> Result<Summaries, IndexError> {
    decode("summary deltas", row)
}

/// The summaries a read of one experiment's folds in from unfolded rows, decoded
/// once per row and kept, by experiment, until the row is folded.
///
/// A read takes the rows' numbers from its own read transaction
/// (`summary_delta_numbers`, written and deleted with the rows), so it adds
/// exactly the rows that transaction's `summaries` lacks: nothing is missed
/// while a file's summaries wait, and nothing counted twice once folded. A row
/// (a whole file's summaries, megabytes for a file of many series) is read and
/// decoded once, then served from here; past [`MOST_CACHED`] summaries a row is
/// read and decoded for each read of it.
#[derive(Debug, Default)]
pub(super) struct PendingSummaries(Mutex<Pending>);

/// Numbers are never reused, so a row cached by a read whose snapshot predates
/// its fold is still that row; only reads whose snapshot lists it use it, and
/// the next fold drops it.
#[derive(Debug, Default)]
struct Pending {
    rows: HashMap<u64, Arc<ByExperiment>>,
    /// Summaries held in `rows`.
    held: usize,
}

/// One row's summaries by experiment: (key, summary).
type ByExperiment = HashMap<String, Vec<(String, MetricSummary)>>;

/// The decoded summaries the cache holds at most: tens of MiB.
const MOST_CACHED: usize = 1 << 18;

impl PendingSummaries {
    /// Merges into `out` (one experiment's folded summaries, by key) what the
    /// unfolded rows of `deltas` hold for `experiment`.
    pub(super) fn add_to(
        &self,
        numbers: &ReadOnlyTable<u64, ()>,
        deltas: &ReadOnlyTable<u64, &'static [u8]>,
        experiment: &str,
        out: &mut BTreeMap<String, MetricSummary>,
    ) -> Result<(), IndexError> {
        for row in numbers.iter().map_err(storage)? {
            let seq = row.map_err(storage)?.0.value();
            let cached = self.lock().rows.get(&seq).cloned();
            let by_experiment = match cached {
                Some(rows) => rows,
                None => {
                    let Some(value) = deltas.get(seq).map_err(storage)? else {
                        return Err(IndexError::MissingDelta(seq));
                    };
                    self.cache(seq, decode_deltas(value.value())?)
                }
            };
            for (key, summary) in by_experiment.get(experiment).into_iter().flatten() {
                out.entry(key.clone())
                    .and_modify(|m| m.merge(summary))
                    .or_insert(*summary);
            }
        }
        Ok(())
    }

    fn cache(&self, seq: u64, summaries: Summaries) -> Arc<ByExperiment> {
        let n = summaries.len();
        let mut by_experiment = ByExperiment::new();
        for (experiment, key, summary) in summaries {
            by_experiment
                .entry(experiment)
                .or_default()
                .push((key, summary));
        }
        let by_experiment = Arc::new(by_experiment);
        let mut pending = self.lock();
        if pending.held.saturating_add(n) <= MOST_CACHED {
            pending.held += n;
            pending.rows.insert(seq, Arc::clone(&by_experiment));
        }
        by_experiment
    }

    /// Forgets rows up to `through`, just folded.
    fn folded(&self, through: u64) {
        let mut pending = self.lock();
        let mut held = pending.held;
        pending.rows.retain(|&seq, rows| {
            let keep = seq > through;
            if !keep {
                held -= rows.values().map(Vec::len).sum::<usize>();
            }
            keep
        });
        pending.held = held;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Records a published file's summaries for the folder, in the publish
/// transaction.
pub(super) fn queue_summaries(
    txn: &WriteTransaction,
    summaries: &Summaries,
) -> Result<(), IndexError> {
    if summaries.is_empty() {
        return Ok(());
    }
    // Numbers are never used twice, even once the table is empty: a read's
    // cache ([`PendingSummaries`]) knows a row by its number.
    let mut meta = txn.open_table(META).map_err(storage)?;
    let next = meta_get(&meta, NEXT_DELTA)?.unwrap_or(0);
    txn.open_table(SUMMARY_DELTAS)
        .map_err(storage)?
        .insert(next, encode(summaries).as_slice())
        .map_err(storage)?;
    txn.open_table(SUMMARY_DELTA_NUMBERS)
        .map_err(storage)?
        .insert(next, ())
        .map_err(storage)?;
    meta.insert(NEXT_DELTA, next + 1).map_err(storage)?;
    Ok(())
}

/// Creates the delta tables at open. For rows an index from before
/// `summary_delta_numbers` and `NEXT_DELTA` left, lists their numbers and sets
/// the next one past them.
pub(super) fn number_deltas(txn: &WriteTransaction) -> Result<(), IndexError> {
    let deltas = txn.open_table(SUMMARY_DELTAS).map_err(storage)?;
    let mut numbers = txn.open_table(SUMMARY_DELTA_NUMBERS).map_err(storage)?;
    let mut meta = txn.open_table(META).map_err(storage)?;
    if let Some((last, _)) = deltas.last().map_err(storage)?
        && meta_get(&meta, NEXT_DELTA)?.is_none_or(|next| next <= last.value())
    {
        meta.insert(NEXT_DELTA, last.value() + 1).map_err(storage)?;
    }
    if numbers.len().map_err(storage)? == deltas.len().map_err(storage)? {
        return Ok(());
    }
    for row in deltas.iter().map_err(storage)? {
        numbers
            .insert(row.map_err(storage)?.0.value(), ())
            .map_err(storage)?;
    }
    Ok(())
}

impl Index {
    /// Folds the oldest waiting files' summaries, at least one file's and at most
    /// about `most` summaries, into `summaries` and the search entries, and deletes
    /// their rows, in one transaction. Returns how many files' rows it folded.
    pub fn fold_summaries(&self, most: usize) -> Result<usize, IndexError> {
        let _serial = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let mut txn = self.begin_write()?;
        txn.set_durability(redb::Durability::None);
        let folded = {
            let mut table = txn.open_table(SUMMARY_DELTAS).map_err(storage)?;
            let mut deltas: Summaries = Vec::new();
            let (mut folded, mut through) = (0, 0);
            for row in table.iter().map_err(storage)? {
                let (k, v) = row.map_err(storage)?;
                let mut file = decode_deltas(v.value())?;
                deltas.append(&mut file);
                (folded, through) = (folded + 1, k.value());
                if deltas.len() >= most {
                    break;
                }
            }
            if folded == 0 {
                return Ok(0);
            }
            table.retain_in(..=through, |_, _| false).map_err(storage)?;
            txn.open_table(SUMMARY_DELTA_NUMBERS)
                .map_err(storage)?
                .retain_in(..=through, |_, _| false)
                .map_err(storage)?;
            merge_summaries(&txn, &deltas, self.catalog_marks)?;
            (folded, through)
        };
        txn.commit().map_err(storage)?;
        self.pending_summaries.folded(folded.1);
        Ok(folded.0)
    }

    /// Folds every waiting file's summaries. Returns how many files' there were.
    pub fn fold_all_summaries(&self) -> Result<usize, IndexError> {
        let mut all = 0;
        loop {
            match self.fold_summaries(FOLD_SUMMARIES)? {
                0 => return Ok(all),
                n => all += n,
            }
        }
    }

    /// Published files whose summaries wait to be folded in.
    pub fn summaries_pending(&self) -> Result<u64, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        read.open_table(SUMMARY_DELTAS)
            .map_err(storage)?
            .len()
            .map_err(storage)
    }

    /// Tells the folder that a publish left summaries to fold.
    pub(super) fn deltas_queued(&self) {
        let _ = self.fold_wake.0.try_send(());
    }
}

/// The thread that folds summaries in as files are published.
#[derive(Debug)]
pub struct SummaryFolder {
    /// Told when to give up folding what is left, once asked to stop.
    stop: Sender<Instant>,
    thread: JoinHandle<()>,
}

impl SummaryFolder {
    pub fn start(index: Arc<Index>) -> std::io::Result<Self> {
        let (stop, stopping) = crossbeam_channel::bounded(1);
        let thread = std::thread::Builder::new()
            .name("mboxd-summaries".into())
            .spawn(move || fold(&index, &stopping))?;
        Ok(Self { stop, thread })
    }

    /// Folds what is left, for at most `within` (call it once nothing publishes
    /// any more), and stops. What it leaves waits for the next start: a stop is
    /// not held up by a backlog, which loses nothing.
    pub fn finish(self, within: Duration) {
        let _ = self.stop.send(Instant::now() + within);
        if self.thread.join().is_err() {
            tracing::error!("the summary folder panicked");
        }
    }
}

fn fold(index: &Index, stopping: &Receiver<Instant>) {
    let mut until: Option<Instant> = None;
    loop {
        loop {
            if until.is_some_and(|by| Instant::now() >= by) {
                tracing::warn!(
                    files = index.summaries_pending().ok(),
                    "metric summaries left to fold at the next start"
                );
                return;
            }
            match index.fold_summaries(FOLD_SUMMARIES) {
                Ok(0) => break,
                // A pause between transactions, so a publish or a creation
                // waiting for the index's one writer gets it first.
                Ok(_) if until.is_none() => std::thread::sleep(YIELD),
                Ok(_) => {}
                Err(e) => {
                    // Left in place; tried again at the next wake, or the next start.
                    tracing::warn!(error = %e, "folding metric summaries");
                    break;
                }
            }
        }
        if until.is_some() {
            return;
        }
        crossbeam_channel::select! {
            recv(stopping) -> by => until = Some(by.unwrap_or_else(|_| Instant::now())),
            recv(index.fold_wake.1) -> _ => {}
            default(IDLE_CHECK) => {}
        }
    }
}
