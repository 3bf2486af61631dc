//! The embedded index (redb): the catalog (experiments, metadata, metric summaries)
//! and the manifest (published files, the experiment → file index, WAL pieces,
//! spool, deletions). Small and transactional; the metric and event firehose never
//! touches it point by point.
//!
//! Catalog tables ([`catalog`]):
//! - `experiments`: id → [`ExperimentRecord`]
//! - `experiments_by_scope`: (namespace, created at, id) → (), and the same under
//!   `*` for every namespace: experiments in creation order
//! - `metadata`: (parent id, key) → [`MetadataEntry`]
//! - `summaries`: (experiment id, metric key) → [`MetricSummary`]
//! - `summary_deltas`: number → a published file's summaries, not yet folded into
//!   `summaries` and the search entries ([`fold`]); `summary_delta_numbers`
//!   lists their numbers, for reads
//! - `batch_ids`: (accepted at, client batch id) → points, for recognising retries
//! - `search_entries`: (scope, field, value, created at, id) → (), for run search
//!   ([`search`])
//! - `catalog_dirty_marks`: (mark, experiment id) → (), experiments whose rows in
//!   the catalog tables (`experiments/`, `metadata/`, `summaries/`) are out of
//!   date; a transaction's marks follow every earlier one (earlier releases kept
//!   ids alone, in `catalog_dirty`, moved here at open)
//! - `catalog_files`: the catalog table files this daemon wrote
//!
//! Manifest tables ([`manifest`]):
//! - `files`: object key → [`FileEntry`]; keys start with the partition folder, so a
//!   prefix scan lists one table's files for one namespace.
//! - `file_experiments`: (experiment id, object key) → [`FilePart`] (with the
//!   file's entry): which row groups of which files hold an experiment, so a read
//!   opens only those; `file_experiments_by_file` is its reverse, for removal.
//! - `unindexed_files`: object key → (): files published before the experiment
//!   index existed; reads prune them by their experiment range until compaction
//!   rewrites them.
//! - `publish_intents`: object key → [`PublishIntent`], written before a file is
//!   renamed into place and removed with the manifest entry.
//! - `published_pieces`: (WAL seq, partition folder) → experiment ids whose rows of
//!   that record are in a published file; replay skips them. Entries below the
//!   oldest WAL segment on disk are forgotten.
//! - `spooled`: object key → size, for files published into the local spool and not
//!   yet confirmed uploaded to the remote store (S3 roots only).
//! - `replace_intents`: id → [`ReplaceIntent`]: a compaction or retention swap in
//!   progress (new files staged, old files to go).
//! - `deletions`: object key → (): objects no longer in the manifest, still to be
//!   deleted from storage.
//!
//! Change-log tables ([`changes`], only written while the change log is on):
//! - `change_outbox`: entry number → [`Change`]: what each committed transaction
//!   changed, written in that same transaction, until the shipper has put it into
//!   the storage root (see [`crate::changelog`]).
//! - `held_deletions`: (entry number, object key) → (): objects a replacement
//!   removed, deleted only once readers can know (the entry is shipped).
//!
//! Exactly-once publication: intent (durable) → rename → manifest entry, published
//! pieces, the file's summaries (as one `summary_deltas` row), batch ids and intent
//! removal in one transaction. After a crash, an intent whose file exists is
//! completed, and one whose file does not is dropped (its rows replay from the
//! WAL). So every file on disk is in the manifest, every WAL record's rows are
//! published once, and, since a fold deletes the rows it applies in the
//! transaction that applies them ([`fold`]), the metric summaries count every
//! published point once. That needs WAL sequence numbers that are never
//! reused while a piece names them: the log is opened numbering from at least
//! [`Index::next_unreferenced_seq`], since it may hold no file to remember by.
//!
//! With an S3 root, "published" means finished in the spool: the manifest entry
//! and a `spooled` entry are written together, the WAL records are released, and
//! the upload happens later. The object key is fixed at that moment, so an upload
//! retried after any failure overwrites the same object with the same bytes: never a
//! duplicate. The `spooled` entry is removed only after the upload is confirmed, and
//! the local file only after that.
//!
//! Values are stored as JSON: small, self-describing, and readable with any redb
//! tool when something goes wrong.

mod catalog;
mod changes;
mod fold;
pub mod journal;
mod manifest;
pub mod search;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redb::{Database, ReadableTable, TableDefinition, TableHandle};
use serde::{Deserialize, Serialize};

pub use catalog::{CatalogRows, DirtyCatalog, ExperimentCache, NewExperiment};
pub use changes::{Change, ChangeEntry, Checkpoint, CheckpointFile, ShipPlan, ShipState};
pub use fold::{FOLD_SUMMARIES, SummaryFolder};
pub use journal::{CatalogJournal, Durable, FileSync};
pub use manifest::{
    FileEntry, FilePart, FileRef, Forget, PublishIntent, ReplaceIntent, SCHEMA_INT64, SCHEMA_UINT64,
};

use crate::model::Micros;

const EXPERIMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("experiments");
const EXPERIMENTS_BY_NS: TableDefinition<(&str, i64, &str), ()> =
    TableDefinition::new("experiments_by_scope");
/// Layout 1's namespace table, keyed by id (dropped by the migration).
const OLD_EXPERIMENTS_BY_NS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("experiments_by_namespace");
const METADATA: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("metadata");
const SUMMARIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("summaries");
const SUMMARY_DELTAS: TableDefinition<u64, &[u8]> = TableDefinition::new("summary_deltas");
/// The numbers of the `summary_deltas` rows: a read walks these small rows, not
/// the large ones (see [`fold::PendingSummaries`]).
const SUMMARY_DELTA_NUMBERS: TableDefinition<u64, ()> =
    TableDefinition::new("summary_delta_numbers");
const BATCH_IDS: TableDefinition<(i64, &str), u64> = TableDefinition::new("batch_ids");
const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const FILE_EXPERIMENTS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("file_experiments");
const FILE_EXPERIMENTS_REV: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("file_experiments_by_file");
const UNINDEXED: TableDefinition<&str, ()> = TableDefinition::new("unindexed_files");
const INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("publish_intents");
const PUBLISHED: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("published_pieces");
const SPOOLED: TableDefinition<&str, u64> = TableDefinition::new("spooled");
const REPLACE_INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("replace_intents");
const DELETIONS: TableDefinition<&str, ()> = TableDefinition::new("deletions");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// (mark, experiment id): experiments whose catalog-table rows are out of date.
/// Marks grow with each transaction that makes some, so marking appends instead of
/// landing on a random page by id; see `CatalogTables::mark_dirty`.
const DIRTY: TableDefinition<(u64, &str), ()> = TableDefinition::new("catalog_dirty_marks");
/// The marks of earlier releases, by id (moved into [`DIRTY`] at open).
const OLD_DIRTY: TableDefinition<&str, ()> = TableDefinition::new("catalog_dirty");
const CATALOG_FILES: TableDefinition<&str, ()> = TableDefinition::new("catalog_files");
const SEARCH: TableDefinition<(&str, &str, &[u8], i64, &str), ()> =
    TableDefinition::new("search_entries");
/// Layout 1's search index, keyed by id (dropped by the migration).
const OLD_SEARCH: TableDefinition<(&str, &str, &[u8], &str), ()> =
    TableDefinition::new("search_index");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("change_outbox");
const HELD: TableDefinition<(u64, &str), ()> = TableDefinition::new("held_deletions");
/// (spooled output, replaced input): on an S3 root without a change log, an input
/// is deleted once every output that replaced it is uploaded.
const AWAITING_UPLOAD: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("deletions_awaiting_upload");

/// The index layout version; see [`Index::open`] for what each step migrates.
const LAYOUT_VERSION: u64 = 2;
/// Meta key present while the scope listing and search entries are being rebuilt.
const REBUILD_PENDING: &str = "rebuild_listings";
/// `meta` key: the time of the last catalog write (see `catalog::catalog_time`).
const CATALOG_CLOCK: &str = "catalog_clock";
/// `meta` key: the sequence number of the last journaled batch written (see
/// [`journal`]).
const JOURNAL_SEQ: &str = "catalog_journal_seq";

/// Errors from the index.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    #[error("index storage: {0}")]
    Storage(#[from] Box<redb::Error>),
    #[error("index record {what} is corrupt: {source}")]
    Corrupt {
        what: String,
        source: serde_json::Error,
    },
    #[error("experiment {0} not found")]
    ExperimentNotFound(String),
    /// `summary_delta_numbers` lists a row `summary_deltas` lacks (they are
    /// written and deleted together).
    #[error("index: summary_deltas row {0} is listed but missing")]
    MissingDelta(u64),
    #[error("catalog journal: {what} {}: {source}", path.display())]
    Journal {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("an index task failed: {0}")]
    Task(String),
    #[error(
        "replacement {id} was dropped: its input {missing} had already left the manifest, so its outputs would duplicate or revive rows; they are queued for deletion"
    )]
    StaleReplacement { id: String, missing: String },
}

fn storage<E: Into<redb::Error>>(e: E) -> IndexError {
    IndexError::Storage(Box::new(e.into()))
}

/// Begins a write transaction that saves redb's allocator state as it commits
/// (quick repair). Without it, opening the index after a crash (a SIGKILL, an OOM
/// kill, a power loss) walks and checksums the whole file before mboxd serves:
/// 4.4 s at 200,000 experiments with the file in the page cache, and growing with
/// the catalogue. Every durable commit must save it, since any one may be the
/// last; journaled CreateExperiment batches are the only commits without a sync
/// (see [`journal`]), and its replay relies on that.
fn begin_write(db: &Database) -> Result<redb::WriteTransaction, IndexError> {
    let mut txn = db.begin_write().map_err(storage)?;
    txn.set_quick_repair(true);
    Ok(txn)
}

/// One stored metadata value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataEntry {
    pub value: serde_json::Value,
    pub updated_at: Micros,
}

/// The embedded index. Cheap to share behind an `Arc`; every method is blocking
/// (call it from a blocking thread when on the async runtime).
#[derive(Debug)]
pub struct Index {
    db: Database,
    /// Recently used experiments, for the per-request existence check on the hot
    /// path. Bounded: the catalog itself stays on disk.
    cache: ExperimentCache,
    /// Bumped by every change to experiments or metadata, so the snapshot tables
    /// are rewritten only when something changed.
    generation: AtomicU64,
    /// Serialises read-modify-write transactions on summaries with the publishes
    /// that merge into them (redb has one writer at a time anyway; this keeps the
    /// lock order obvious).
    publish: Mutex<()>,
    /// Whether each transaction records its [`Change`] in the outbox.
    change_log: AtomicBool,
    /// Files this process dropped from the manifest lately (replaced or expired).
    removed: RecentlyRemoved,
    /// Whether changes mark experiments for the catalog tables: a daemon's index
    /// does; a fleet reader's writes no catalog tables, so nothing would ever
    /// take its marks away.
    catalog_marks: bool,
    /// See [`Index::repaired_in`].
    repaired_in: Option<Duration>,
    /// The index's file; none for one held in memory (a fleet reader's).
    file: Option<std::path::PathBuf>,
    /// Unfolded summaries, decoded for reads.
    pending_summaries: fold::PendingSummaries,
    /// Wakes the summary folder.
    fold_wake: (
        crossbeam_channel::Sender<()>,
        crossbeam_channel::Receiver<()>,
    ),
}

/// How long a file dropped from the manifest is remembered as dropped: far longer
/// than a read takes from its live snapshot to its manifest read.
const REMEMBER_REMOVED: Duration = Duration::from_secs(600);

/// Object keys recently dropped from the manifest, with when.
///
/// A reader takes the writers' live view first and the manifest second, and drops
/// live rows bound for a file the manifest lists (see [`crate::live`]). A file
/// published and then compacted away between the two is in neither list, though
/// its rows are in the manifest's replacement: without this memory the reader
/// would read them twice. Keys are noted before the replacement commits, so a
/// reader whose manifest no longer lists a key always finds it here.
#[derive(Debug, Default)]
struct RecentlyRemoved(Mutex<HashMap<String, Instant>>);

impl RecentlyRemoved {
    fn note(&self, keys: &[String]) {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        map.retain(|_, at| now.duration_since(*at) < REMEMBER_REMOVED);
        map.extend(keys.iter().map(|k| (k.clone(), now)));
    }

    fn contains(&self, key: &str) -> bool {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .is_some_and(|at| at.elapsed() < REMEMBER_REMOVED)
    }
}

/// The index's page cache: part of the memory bound's fixed overhead.
pub const INDEX_CACHE_BYTES: usize = 16 << 20;

impl Index {
    /// Opens (or creates) the index at `path`, creating every table and migrating an
    /// older layout: an index from before the experiment → file index lists its
    /// files in `unindexed_files`, which reads prune by experiment range.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let repaired = std::sync::Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        // redb caches 1 GiB by default, outside the memory bound; the operating
        // system's page cache holds the rest of the file.
        let db = Database::builder()
            .set_cache_size(INDEX_CACHE_BYTES)
            .set_repair_callback({
                let repaired = repaired.clone();
                move |_| repaired.store(true, Ordering::Relaxed)
            })
            .create(path)
            .map_err(storage)?;
        let mut index = Self::init(db)?;
        if repaired.load(Ordering::Relaxed) {
            index.repaired_in = Some(started.elapsed());
        }
        index.file = Some(path.to_owned());
        Ok(index)
    }

    /// How long opening took, if the index had to be walked in full to be
    /// repaired: only after a crash that left no saved allocator state (an index
    /// last written by a release without quick repair).
    pub fn repaired_in(&self) -> Option<Duration> {
        self.repaired_in
    }

    /// An index held in memory only: a reader's view of the storage root, which it
    /// rebuilds from the root at every start.
    pub fn open_in_memory() -> Result<Self, IndexError> {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .map_err(storage)?;
        Self::init(db)
    }

    fn init(db: Database) -> Result<Self, IndexError> {
        let txn = begin_write(&db)?;
        let no_clock;
        let rebuild_search = {
            // Create every table so read transactions never meet a missing one.
            txn.open_table(EXPERIMENTS).map_err(storage)?;
            txn.open_table(EXPERIMENTS_BY_NS).map_err(storage)?;
            txn.open_table(METADATA).map_err(storage)?;
            txn.open_table(SUMMARIES).map_err(storage)?;
            fold::number_deltas(&txn)?;
            txn.open_table(BATCH_IDS).map_err(storage)?;
            txn.open_table(FILE_EXPERIMENTS).map_err(storage)?;
            txn.open_table(FILE_EXPERIMENTS_REV).map_err(storage)?;
            txn.open_table(INTENTS).map_err(storage)?;
            txn.open_table(PUBLISHED).map_err(storage)?;
            txn.open_table(SPOOLED).map_err(storage)?;
            txn.open_table(REPLACE_INTENTS).map_err(storage)?;
            txn.open_table(DELETIONS).map_err(storage)?;
            txn.open_table(SEARCH).map_err(storage)?;
            txn.open_table(DIRTY).map_err(storage)?;
            txn.open_table(CATALOG_FILES).map_err(storage)?;
            txn.open_table(OUTBOX).map_err(storage)?;
            txn.open_table(HELD).map_err(storage)?;
            txn.open_table(AWAITING_UPLOAD).map_err(storage)?;
            let files = txn.open_table(FILES).map_err(storage)?;
            let mut unindexed = txn.open_table(UNINDEXED).map_err(storage)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            let version = meta
                .get("layout_version")
                .map_err(storage)?
                .map(|v| v.value());
            // Earlier releases keep the id-keyed catalog tables (every one creates
            // them at start-up, and indexes its changes there only): their presence
            // is what says the scope listing and search entries need rebuilding,
            // whether from an upgrade or after an earlier release ran again.
            let id_keyed_tables = txn
                .list_tables()
                .map_err(storage)?
                .any(|t| t.name() == OLD_SEARCH.name() || t.name() == OLD_EXPERIMENTS_BY_NS.name());
            let mut rebuild_search =
                id_keyed_tables || meta.get(REBUILD_PENDING).map_err(storage)?.is_some();
            // Every release creates its tables at start-up: an earlier one that ran
            // on this index left its marks (if any) by id.
            if txn
                .list_tables()
                .map_err(storage)?
                .any(|t| t.name() == OLD_DIRTY.name())
            {
                catalog::move_old_dirty_marks(&txn)?;
            }
            no_clock = meta.get(CATALOG_CLOCK).map_err(storage)?.is_none();
            if version.is_none_or(|v| v < LAYOUT_VERSION) {
                for row in files.iter().map_err(storage)? {
                    let (key, _) = row.map_err(storage)?;
                    unindexed.insert(key.value(), ()).map_err(storage)?;
                }
                meta.insert("layout_version", LAYOUT_VERSION)
                    .map_err(storage)?;
                rebuild_search = true;
                catalog::mark_all_dirty(&txn)?;
            }
            if rebuild_search {
                meta.insert(REBUILD_PENDING, 1).map_err(storage)?;
            }
            rebuild_search
        };
        txn.commit().map_err(storage)?;
        if rebuild_search {
            catalog::rebuild_listings(&db, catalog::REBUILD_CHUNK)?;
        }
        if no_clock {
            // After any rebuild: the seed reads the search entries.
            catalog::seed_catalog_clock(&db)?;
        }
        Ok(Self {
            db,
            cache: ExperimentCache::new(catalog::CACHE_ENTRIES),
            generation: AtomicU64::new(0),
            publish: Mutex::new(()),
            change_log: AtomicBool::new(false),
            removed: RecentlyRemoved::default(),
            catalog_marks: true,
            repaired_in: None,
            file: None,
            pending_summaries: fold::PendingSummaries::default(),
            fold_wake: crossbeam_channel::bounded(1),
        })
    }

    /// This index's changes mark nothing for the catalog tables: for an index
    /// whose catalog tables nobody writes.
    pub fn without_catalog_marks(mut self) -> Self {
        self.catalog_marks = false;
        self
    }

    /// Whether this process dropped `key` from the manifest in the last minutes
    /// (see [`RecentlyRemoved`]).
    pub fn was_removed(&self, key: &str) -> bool {
        self.removed.contains(key)
    }

    /// A number that changes whenever experiments or metadata change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Begins a write transaction: [`begin_write`]'s for an index in a file; an
    /// index in memory has nothing to repair after a crash, so it skips the cost.
    fn begin_write(&self) -> Result<redb::WriteTransaction, IndexError> {
        if self.file.is_none() {
            self.db.begin_write().map_err(storage)
        } else {
            begin_write(&self.db)
        }
    }

    fn bump_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs (strings, numbers, JSON values) cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: for<'de> Deserialize<'de>>(what: &str, bytes: &[u8]) -> Result<T, IndexError> {
    serde_json::from_slice(bytes).map_err(|source| IndexError::Corrupt {
        what: what.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MetricSummary;
    use crate::paths::Table;
    use serde_json::json;

    #[test]
    fn stored_numbers_come_back_bit_for_bit() {
        // serde_json's default float parser may land one ULP off; summaries and
        // metadata must read back exactly what was stored.
        for k in 0..100_000u32 {
            let v = f64::from(k) / 7.0;
            let back: f64 = decode("n", &encode(&v)).unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{k}/7");
        }
        let edges = [f64::MIN_POSITIVE, 5e-324, 1.7976931348623157e308, 0.1 + 0.2];
        for v in edges {
            let back: f64 = decode("n", &encode(&v)).unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{v:e}");
        }
    }

    #[test]
    fn a_metadata_number_reads_back_and_matches_exactly() {
        use crate::search::{Search, parse_filter};
        // 632/7 is a number serde_json's default parser read back one ULP off: the
        // stored value then no longer equalled what was sent, in a read or a filter.
        let index = Index::open_in_memory().unwrap();
        let lr: f64 = 632.0 / 7.0;
        let (rec, _) = index
            .create_experiment(new_exp("lr"), &[("lr".into(), json!(lr))])
            .unwrap();
        let stored = index.list_metadata(&rec.id).unwrap();
        let [(key, entry)] = stored.as_slice() else {
            panic!("{stored:?}");
        };
        assert_eq!(key, "lr");
        assert_eq!(entry.value.as_f64().map(f64::to_bits), Some(lr.to_bits()));
        let count = |filter: &str| {
            let s = Search {
                conditions: parse_filter(filter).unwrap(),
                order_by: vec![],
            };
            index
                .search(Some("cv"), &s, 10, None)
                .unwrap()
                .experiments
                .len()
        };
        assert_eq!(count(&format!("params.lr = {lr:?}")), 1);
        index
            .update_metadata(&rec.id, &[("lr".into(), json!(1.5))])
            .unwrap();
        assert_eq!(count(&format!("params.lr = {lr:?}")), 0);
        assert_eq!(count("params.lr = 1.5"), 1);
    }

    fn intent(key: &str, seq: u64) -> PublishIntent {
        PublishIntent {
            entry: FileEntry {
                key: key.into(),
                rows: 1,
                bytes: 10,
                min_experiment: "e".into(),
                max_experiment: "e".into(),
                created_at: 0,
                schema: SCHEMA_INT64,
                compacted: false,
            },
            partition: "metrics/namespace=a/date=2026-01-01".into(),
            pieces: vec![(seq, "e".into())],
            experiments: vec![(
                "e".into(),
                FilePart {
                    row_groups: vec![0],
                    rows: 1,
                },
            )],
            summaries: vec![(
                "e".into(),
                "loss".into(),
                MetricSummary::of(seq as i64, Some(seq as f64), 0),
            )],
            batch_ids: vec![(format!("b{seq}"), 1_000 + seq as i64, 1)],
        }
    }

    /// Published summaries wait in `summary_deltas` until folded, a bounded number
    /// of files per transaction, each file's once; the counter survives a reopen.
    /// Reads count every published file's summaries all along, folded or not.
    #[test]
    fn summaries_fold_in_bounded_transactions_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        let index = Index::open(&path).unwrap();
        for seq in 1..=5 {
            let mut i = intent(
                &format!("metrics/namespace=a/date=2026-01-01/f{seq}.parquet"),
                seq,
            );
            // Two summaries a file: "e" in every file, and one experiment of its own.
            i.summaries.push((
                format!("x{seq}"),
                "acc".into(),
                MetricSummary::of(1, Some(0.5), 0),
            ));
            index.begin_publish(&i).unwrap();
            index.commit_publish(&i, Forget::default(), false).unwrap();
        }
        assert_eq!(index.summaries_pending().unwrap(), 5);
        assert!(index.folded_summaries("e").unwrap().is_empty());
        let counts = |index: &Index| {
            let e = index.summaries("e").unwrap();
            assert_eq!(e.len(), 1);
            let x: Vec<u64> = (1..=5)
                .map(|seq| index.summaries(&format!("x{seq}")).unwrap()[0].1.points)
                .collect();
            (e[0].1.count, e[0].1.last_step, e[0].1.min, e[0].1.max, x)
        };
        let all = (5, 5, 1.0, 5.0, vec![1; 5]);
        assert_eq!(counts(&index), all, "read before any fold");
        assert!(index.summaries("nobody").unwrap().is_empty());
        // An index from before the rows' numbers were listed and the next one
        // kept: both are set at open.
        let txn = index.begin_write().unwrap();
        txn.delete_table(SUMMARY_DELTA_NUMBERS).unwrap();
        txn.open_table(META)
            .unwrap()
            .remove(fold::NEXT_DELTA)
            .unwrap();
        txn.commit().unwrap();
        drop(index);
        let index = Index::open(&path).unwrap();
        assert_eq!(
            index.summaries_pending().unwrap(),
            5,
            "counted again at open"
        );
        // At least one file, whatever the bound; then files until it is reached.
        assert_eq!(counts(&index), all, "read after a reopen");
        assert_eq!(index.fold_summaries(1).unwrap(), 1);
        assert_eq!(index.folded_summaries("e").unwrap()[0].1.count, 1);
        assert_eq!(counts(&index), all, "read with one file folded");
        assert_eq!(index.fold_summaries(3).unwrap(), 2);
        assert_eq!(index.summaries_pending().unwrap(), 2);
        assert_eq!(index.folded_summaries("e").unwrap()[0].1.count, 3);
        assert_eq!(counts(&index), all, "read with three files folded");
        assert_eq!(index.fold_summaries(100).unwrap(), 2);
        assert_eq!(counts(&index), all, "read with every file folded");
        assert_eq!(index.fold_summaries(100).unwrap(), 0);
        let e = index.summaries("e").unwrap();
        assert_eq!(
            (e[0].1.count, e[0].1.last_step, e[0].1.min, e[0].1.max),
            (5, 5, 1.0, 5.0)
        );
        for seq in 1..=5 {
            assert_eq!(index.summaries(&format!("x{seq}")).unwrap()[0].1.count, 1);
        }
        // A file published once the table is empty takes a new number, read as
        // its own, not as a folded row's.
        let mut i = intent("metrics/namespace=a/date=2026-01-01/f6.parquet", 6);
        i.summaries[0].2 = MetricSummary::of(9, Some(9.0), 0);
        index.begin_publish(&i).unwrap();
        index.commit_publish(&i, Forget::default(), false).unwrap();
        let read = index.db.begin_read().unwrap();
        let deltas = read.open_table(SUMMARY_DELTAS).unwrap();
        let numbers: Vec<u64> = deltas
            .iter()
            .unwrap()
            .map(|r| r.unwrap().0.value())
            .collect();
        assert_eq!(numbers, [5], "rows 0 to 4 were folded; 5 is next");
        drop((deltas, read));
        let e = index.summaries("e").unwrap();
        assert_eq!((e[0].1.count, e[0].1.last_step, e[0].1.max), (6, 9, 9.0));
        assert_eq!(index.fold_summaries(100).unwrap(), 1);
        assert_eq!(index.summaries("e").unwrap(), e);
        // Folded rows are gone: a reopen finds nothing to fold again.
        drop(index);
        let index = Index::open(&path).unwrap();
        assert_eq!(index.summaries_pending().unwrap(), 0);
        assert_eq!(index.fold_all_summaries().unwrap(), 0);
        assert_eq!(index.summaries("e").unwrap()[0].1.count, 6);
    }

    #[test]
    fn interrupted_publications_complete_if_the_file_exists_else_drop() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i.redb")).unwrap();
        assert_eq!(index.next_unreferenced_seq().unwrap(), 1);
        index
            .begin_publish(&intent(
                "metrics/namespace=a/date=2026-01-01/landed.parquet",
                1,
            ))
            .unwrap();
        index
            .begin_publish(&intent(
                "metrics/namespace=a/date=2026-01-01/lost.parquet",
                2,
            ))
            .unwrap();
        let (completed, dropped) = index
            .recover_intents(|k| k.ends_with("landed.parquet"), true)
            .unwrap();
        assert_eq!((completed, dropped), (1, 1));
        // A completed publication into the spool is queued for upload.
        assert_eq!(
            index.spooled().unwrap(),
            [(
                "metrics/namespace=a/date=2026-01-01/landed.parquet".to_owned(),
                10
            )]
        );
        let files: Vec<_> = index
            .files(Table::Metrics, "a")
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect();
        assert_eq!(
            files,
            ["metrics/namespace=a/date=2026-01-01/landed.parquet"]
        );
        let part = "metrics/namespace=a/date=2026-01-01";
        assert_eq!(index.published_experiments(1, part).unwrap(), ["e"]);
        assert!(index.published_experiments(2, part).unwrap().is_empty());
        assert_eq!(index.recover_intents(|_| true, true).unwrap(), (0, 0));
    }

    pub(super) fn new_exp(name: &str) -> NewExperiment {
        NewExperiment {
            name: name.into(),
            namespace: "cv".into(),
            owner: "o".into(),
            framework: 1,
            task: String::new(),
            external_id: String::new(),
        }
    }

    /// Set in the child process of the crash test: the index it writes, then
    /// leaves without closing.
    const CRASH_CHILD: &str = "MBOXD_TEST_INDEX_LEFT_BY_A_CRASH";

    #[test]
    fn an_index_left_by_a_crash_opens_without_a_full_repair() {
        let name = "index::tests::an_index_left_by_a_crash_opens_without_a_full_repair";
        if let Some(path) = std::env::var_os(CRASH_CHILD) {
            let index = Index::open(Path::new(&path)).unwrap();
            index.create_experiment(new_exp("a"), &[]).unwrap();
            index.create_experiment(new_exp("b"), &[]).unwrap();
            // Exits without dropping the index, as a SIGKILL would.
            std::process::exit(3);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(CRASH_CHILD, &path)
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(3), "the child wrote and crashed");
        let index = Index::open(&path).unwrap();
        assert_eq!(index.repaired_in(), None, "a full repair ran");
        assert_eq!(index.experiment_names("cv"), ["a", "b"]);
    }

    #[test]
    fn experiments_metadata_and_files_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let id;
        {
            let index = Index::open(&path).unwrap();
            let (rec, existed) = index
                .create_experiment(new_exp("a"), &[("lr".into(), json!(0.1))])
                .unwrap();
            assert!(!existed);
            id = rec.id.clone();
            let (again, existed) = index.create_experiment(new_exp("a"), &[]).unwrap();
            assert!(existed);
            assert_eq!(again.id, id);
            index
                .update_metadata(&id, &[("opt".into(), json!({"name": "adam"}))])
                .unwrap();
            let intent = PublishIntent {
                entry: FileEntry {
                    key: "metrics/namespace=cv/date=2026-01-01/x.parquet".into(),
                    rows: 3,
                    bytes: 10,
                    min_experiment: id.clone(),
                    max_experiment: id.clone(),
                    created_at: 1,
                    schema: SCHEMA_INT64,
                    compacted: false,
                },
                partition: "metrics/namespace=cv/date=2026-01-01".into(),
                pieces: vec![(5, id.clone()), (6, id.clone())],
                experiments: vec![],
                summaries: vec![],
                batch_ids: vec![],
            };
            index.begin_publish(&intent).unwrap();
            index
                .commit_publish(&intent, Forget::default(), true)
                .unwrap();
        }
        let index = Index::open(&path).unwrap();
        // Pieces name WAL records 5 and 6: new records must be numbered from 7.
        assert_eq!(index.next_unreferenced_seq().unwrap(), 7);
        let spooled = index.spooled().unwrap();
        assert_eq!(spooled.len(), 1);
        assert_eq!(spooled[0].1, 10);
        index.mark_uploaded(&spooled[0].0).unwrap();
        assert!(index.spooled().unwrap().is_empty());
        // The manifest keeps the file: it is now read from the remote store.
        assert_eq!(index.files(Table::Metrics, "cv").unwrap().len(), 1);
        assert!(index.experiment_ref(&id).unwrap().is_some());
        let md = index.list_metadata(&id).unwrap();
        let keys: Vec<_> = md.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["lr", "opt"]);
        assert_eq!(md[1].1.value, json!({"name": "adam"}));
        assert_eq!(index.list_experiments("cv").unwrap().len(), 1);
        assert!(index.list_experiments("c").unwrap().is_empty());
        assert_eq!(index.files(Table::Metrics, "cv").unwrap().len(), 1);
        assert!(index.files(Table::Metrics, "c").unwrap().is_empty());
        assert!(index.files(Table::Events, "cv").unwrap().is_empty());
        let part = "metrics/namespace=cv/date=2026-01-01";
        assert_eq!(index.published_experiments(5, part).unwrap(), [id.as_str()]);
        assert!(
            index
                .published_experiments(5, "events/namespace=cv/date=2026-01-01")
                .unwrap()
                .is_empty()
        );
        index.forget_published_below(6).unwrap();
        assert!(index.published_experiments(5, part).unwrap().is_empty());
        assert_eq!(index.published_experiments(6, part).unwrap(), [id.as_str()]);
        assert!(matches!(
            index.update_metadata("nope", &[]),
            Err(IndexError::ExperimentNotFound(_))
        ));
    }

    #[test]
    fn the_experiment_index_names_files_and_row_groups_and_follows_replacements() {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i.redb")).unwrap();
        let a = intent("metrics/namespace=a/date=2026-01-01/f1.parquet", 1);
        let b = intent("metrics/namespace=a/date=2026-01-01/f2.parquet", 2);
        for i in [&a, &b] {
            index.begin_publish(i).unwrap();
            index.commit_publish(i, Forget::default(), false).unwrap();
        }
        let files = |exp: &str| -> Vec<(String, Option<Vec<u32>>)> {
            index
                .experiment_files(Table::Metrics, "a", exp)
                .unwrap()
                .into_iter()
                .map(|f| (f.entry.key, f.row_groups))
                .collect()
        };
        assert_eq!(
            files("e"),
            [
                (a.entry.key.clone(), Some(vec![0])),
                (b.entry.key.clone(), Some(vec![0]))
            ]
        );
        assert!(files("other").is_empty());
        assert!(
            index
                .experiment_files(Table::Events, "a", "e")
                .unwrap()
                .is_empty()
        );
        // Summaries of both files merged, folded in or not: steps 1 and 2, the
        // last is step 2.
        assert_eq!(index.summaries_pending().unwrap(), 2);
        assert!(index.folded_summaries("e").unwrap().is_empty());
        let waiting = index.summaries("e").unwrap();
        assert_eq!(index.fold_all_summaries().unwrap(), 2);
        assert_eq!(index.summaries_pending().unwrap(), 0);
        let s = index.summaries("e").unwrap();
        assert_eq!(s, waiting);
        assert_eq!(s.len(), 1);
        assert_eq!((s[0].1.count, s[0].1.last_step, s[0].1.last), (2, 2, 2.0));
        // Batch ids are remembered, and forgotten past their window.
        assert_eq!(index.batch_ids_since(0).unwrap().len(), 2);
        let c = intent("metrics/namespace=a/date=2026-01-01/f3.parquet", 3);
        index.begin_publish(&c).unwrap();
        index
            .commit_publish(
                &c,
                Forget {
                    pieces_below: 0,
                    batch_ids_before: 1_002,
                },
                false,
            )
            .unwrap();
        let ids: Vec<_> = index
            .batch_ids_since(0)
            .unwrap()
            .into_iter()
            .map(|(id, _, _)| id)
            .collect();
        assert_eq!(ids, ["b2", "b3"]);

        // A compaction replaces f1..f3 by one file.
        let mut merged = a.entry.clone();
        merged.key = "metrics/namespace=a/date=2026-01-01/big.parquet".into();
        merged.compacted = true;
        let replace = ReplaceIntent {
            id: "r1".into(),
            outputs: vec![(
                merged.clone(),
                vec![(
                    "e".into(),
                    FilePart {
                        row_groups: vec![0, 1],
                        rows: 3,
                    },
                )],
            )],
            inputs: vec![
                a.entry.key.clone(),
                b.entry.key.clone(),
                c.entry.key.clone(),
            ],
        };
        index.begin_replace(&replace).unwrap();
        assert_eq!(
            index.replace_intents().unwrap(),
            std::slice::from_ref(&replace)
        );
        let removed = index.commit_replace(&replace, false).unwrap();
        assert_eq!(removed.len(), 3);
        assert_eq!(files("e"), [(merged.key.clone(), Some(vec![0, 1]))]);
        assert!(index.replace_intents().unwrap().is_empty());
        assert_eq!(index.deletions().unwrap().len(), 3);
        index.deleted(&a.entry.key).unwrap();
        assert_eq!(index.deletions().unwrap().len(), 2);
        // Summaries are untouched by a compaction.
        assert_eq!(index.fold_all_summaries().unwrap(), 1);
        assert_eq!(index.summaries("e").unwrap()[0].1.count, 3);
    }

    #[test]
    fn files_from_before_the_experiment_index_are_found_by_their_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        {
            // An index as the previous release left it: files, no layout version.
            let db = redb::Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut files = txn.open_table(FILES).unwrap();
                let entry = serde_json::json!({
                    "key": "metrics/namespace=a/date=2026-01-01/old.parquet",
                    "rows": 5, "bytes": 100, "min_experiment": "a1",
                    "max_experiment": "a9", "created_at": 1
                });
                files
                    .insert(
                        "metrics/namespace=a/date=2026-01-01/old.parquet",
                        serde_json::to_vec(&entry).unwrap().as_slice(),
                    )
                    .unwrap();
            }
            txn.commit().unwrap();
        }
        let index = Index::open(&path).unwrap();
        let found = index.experiment_files(Table::Metrics, "a", "a5").unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].row_groups, None);
        assert_eq!(found[0].entry.schema, SCHEMA_UINT64);
        assert!(
            index
                .experiment_files(Table::Metrics, "a", "b")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_layout_1_catalog_is_placed_in_creation_order_and_searchable() {
        use crate::search::{Search, parse_filter, parse_order_by};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let mut ids = Vec::new();
        {
            let index = Index::open(&path).unwrap();
            for (name, ns, lr) in [("z", "cv", 0.1), ("y", "nlp", 0.2), ("x", "cv", 0.1)] {
                let mut new = new_exp(name);
                new.namespace = ns.into();
                let (rec, _) = index
                    .create_experiment(new, &[("lr".into(), json!(lr))])
                    .unwrap();
                ids.push(rec.id);
            }
        }
        // Turn it into what an earlier release wrote: id-keyed namespace and
        // search tables.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let experiments = txn.open_table(EXPERIMENTS).unwrap();
                let mut by_ns = txn.open_table(OLD_EXPERIMENTS_BY_NS).unwrap();
                let mut old_search = txn.open_table(OLD_SEARCH).unwrap();
                for id in &ids {
                    let r: crate::model::ExperimentRecord =
                        decode(id, experiments.get(id.as_str()).unwrap().unwrap().value()).unwrap();
                    by_ns
                        .insert((r.namespace.as_str(), id.as_str()), ())
                        .unwrap();
                    old_search
                        .insert(
                            (r.namespace.as_str(), "name", [3u8].as_slice(), id.as_str()),
                            (),
                        )
                        .unwrap();
                }
            }
            assert!(txn.delete_table(EXPERIMENTS_BY_NS).unwrap());
            assert!(txn.delete_table(SEARCH).unwrap());
            txn.commit().unwrap();
        }
        let index = Index::open(&path).unwrap();
        assert_eq!(index.experiment_names("cv"), ["z", "x"]);
        assert_eq!(index.namespaces().unwrap(), ["cv", "nlp"]);
        let search = |ns: Option<&str>, filter: &str, order: &str| -> Vec<String> {
            let s = Search {
                conditions: parse_filter(filter).unwrap(),
                order_by: vec![parse_order_by(order).unwrap()],
            };
            let p = index.search(ns, &s, 10, None).unwrap();
            p.experiments.into_iter().map(|d| d.record.name).collect()
        };
        assert_eq!(search(Some("cv"), "params.lr = 0.1", "name"), ["x", "z"]);
        // Equal values: creation order.
        assert_eq!(
            search(Some("cv"), "params.lr = 0.1", "params.lr DESC"),
            ["z", "x"]
        );
        assert_eq!(search(None, "owner = \"o\"", "owner"), ["z", "y", "x"]);
        // New experiments are listed after the migrated ones.
        index.create_experiment(new_exp("w"), &[]).unwrap();
        assert_eq!(search(None, "owner = \"o\"", "owner"), ["z", "y", "x", "w"]);
        {
            let read = index.db.begin_read().unwrap();
            assert!(read.open_table(OLD_SEARCH).is_err());
            assert!(read.open_table(OLD_EXPERIMENTS_BY_NS).is_err());
        }
        drop(index);
        // An earlier release runs on the index again: it recreates its tables and
        // creates "v" into them only. The next open lists it again.
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let mut experiments = txn.open_table(EXPERIMENTS).unwrap();
                let mut r: crate::model::ExperimentRecord = decode(
                    &ids[0],
                    experiments.get(ids[0].as_str()).unwrap().unwrap().value(),
                )
                .unwrap();
                r.id = "v-id".into();
                r.name = "v".into();
                r.created_at += 1;
                experiments
                    .insert(r.id.as_str(), encode(&r).as_slice())
                    .unwrap();
                txn.open_table(OLD_EXPERIMENTS_BY_NS)
                    .unwrap()
                    .insert(("cv", "v-id"), ())
                    .unwrap();
                txn.open_table(OLD_SEARCH).unwrap();
            }
            txn.commit().unwrap();
        }
        let index = Index::open(&path).unwrap();
        assert_eq!(index.experiment_names("cv"), ["z", "v", "x", "w"]);
        let s = Search {
            conditions: parse_filter("name = \"v\"").unwrap(),
            order_by: vec![],
        };
        assert_eq!(
            index
                .search(Some("cv"), &s, 10, None)
                .unwrap()
                .experiments
                .len(),
            1
        );
    }

    #[test]
    fn an_interrupted_rebuild_is_done_again_at_the_next_open() {
        use crate::search::{Search, parse_filter, parse_order_by};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        {
            let index = Index::open(&path).unwrap();
            for i in 0..25 {
                let mut new = new_exp(&format!("e{i:02}"));
                new.namespace = if i % 2 == 0 { "even" } else { "odd" }.into();
                index
                    .create_experiment(new, &[("i".into(), json!(i))])
                    .unwrap();
            }
        }
        let interrupt = || {
            // As a crash after the rebuild's first transaction leaves it: the
            // tables emptied, the mark still there.
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META)
                .unwrap()
                .insert(REBUILD_PENDING, 1)
                .unwrap();
            assert!(txn.delete_table(EXPERIMENTS_BY_NS).unwrap());
            assert!(txn.delete_table(SEARCH).unwrap());
            txn.commit().unwrap();
            db
        };
        let check = |index: &Index| {
            let names = index.experiment_names("odd");
            let want: Vec<String> = (0..25)
                .filter(|i| i % 2 == 1)
                .map(|i| format!("e{i:02}"))
                .collect();
            assert_eq!(names, want);
            let s = Search {
                conditions: parse_filter("params.i >= 20").unwrap(),
                order_by: vec![parse_order_by("params.i").unwrap()],
            };
            let page = index.search(None, &s, 10, None).unwrap();
            let found: Vec<String> = page
                .experiments
                .into_iter()
                .map(|d| d.record.name)
                .collect();
            assert_eq!(found, ["e20", "e21", "e22", "e23", "e24"]);
            let read = index.db.begin_read().unwrap();
            let meta = read.open_table(META).unwrap();
            assert!(meta.get(REBUILD_PENDING).unwrap().is_none());
        };
        // The mark alone makes the next open rebuild.
        drop(interrupt());
        check(&Index::open(&path).unwrap());
        // In transactions of a few experiments, as a large catalogue is.
        let db = interrupt();
        catalog::rebuild_listings(&db, 4).unwrap();
        check(&Index::init(db).unwrap());
    }

    #[test]
    fn explicit_null_values_page_with_the_missing_ones_once() {
        use crate::search::{Search, parse_order_by};
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i.redb")).unwrap();
        let mut want = Vec::new();
        for i in 0..7 {
            let note = if i == 3 { json!("x") } else { json!(null) };
            let (rec, _) = index
                .create_experiment(new_exp(&format!("e{i}")), &[("note".into(), note)])
                .unwrap();
            want.push(rec.name);
        }
        // "x" first, then the nulls in creation order.
        let x = want.remove(3);
        want.insert(0, x);
        for desc in ["", " DESC"] {
            let s = Search {
                conditions: vec![],
                order_by: vec![parse_order_by(&format!("params.note{desc}")).unwrap()],
            };
            for page in [1, 2, 5, 10] {
                let mut got = Vec::new();
                let mut cursor = None;
                loop {
                    let p = index.search(Some("cv"), &s, page, cursor.as_ref()).unwrap();
                    got.extend(p.experiments.into_iter().map(|d| d.record.name));
                    match p.next {
                        Some(c) => cursor = Some(c),
                        None => break,
                    }
                }
                assert_eq!(got, want, "order {desc:?}, page {page}");
            }
        }
    }

    #[test]
    fn search_sorts_by_indexed_metrics_and_pages_by_cursor() {
        use crate::search::{Search, parse_filter, parse_order_by};
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i.redb")).unwrap();
        let mut ids = Vec::new();
        for (name, last) in [("a", 0.3), ("b", 0.1), ("c", 0.2), ("d", f64::NAN)] {
            let (rec, _) = index
                .create_experiment(new_exp(name), &[("lr".into(), json!(0.1))])
                .unwrap();
            let mut i = intent(
                &format!("metrics/namespace=cv/date=2026-01-01/{name}.parquet"),
                1,
            );
            i.summaries = if last.is_nan() {
                vec![]
            } else {
                vec![(
                    rec.id.clone(),
                    "loss".into(),
                    MetricSummary::of(5, Some(last), 1),
                )]
            };
            index.begin_publish(&i).unwrap();
            index.commit_publish(&i, Forget::default(), false).unwrap();
            ids.push(rec.id);
        }
        assert_eq!(index.fold_all_summaries().unwrap(), 3);
        let names = |search: &Search, page: usize| -> Vec<String> {
            let mut out = Vec::new();
            let mut cursor = None;
            loop {
                let p = index
                    .search(Some("cv"), search, page, cursor.as_ref())
                    .unwrap();
                out.extend(p.experiments.into_iter().map(|d| d.record.name));
                match p.next {
                    Some(c) => cursor = Some(c),
                    None => return out,
                }
            }
        };
        let by = |o: &str| Search {
            conditions: vec![],
            order_by: vec![parse_order_by(o).unwrap()],
        };
        for page in [1, 2, 10] {
            assert_eq!(
                names(&by("metrics.loss.last ASC"), page),
                ["b", "c", "a", "d"]
            );
            assert_eq!(
                names(&by("metrics.loss.last DESC"), page),
                ["a", "c", "b", "d"]
            );
            assert_eq!(names(&by("name DESC"), page), ["d", "c", "b", "a"]);
        }
        let filtered = Search {
            conditions: parse_filter("metrics.loss.last < 0.25 and params.lr = 0.1").unwrap(),
            order_by: vec![parse_order_by("metrics.loss.last").unwrap()],
        };
        assert_eq!(names(&filtered, 1), ["b", "c"]);
    }

    /// A batch is written in id order with its search entries last-change-wins:
    /// an experiment created and updated in one batch keeps only its last values.
    #[test]
    fn a_batch_that_creates_and_updates_an_experiment_indexes_its_last_values() {
        let index = Index::open_in_memory().unwrap();
        let lr = |v: i64| vec![("lr".to_string(), json!(v))];
        let out = index
            .create_experiments(vec![
                (new_exp("x"), lr(1)),
                (new_exp("y"), lr(5)),
                (new_exp("x"), lr(2)),
                (new_exp("x"), vec![]),
            ])
            .unwrap();
        let answers: Vec<(&str, bool)> = out
            .iter()
            .map(|(r, existed)| (r.name.as_str(), *existed))
            .collect();
        assert_eq!(
            answers,
            [("x", false), ("y", false), ("x", true), ("x", true)]
        );
        let x = &out[0].0;
        assert!(out[2].0.id == x.id && out[3].0 == out[2].0);
        let metadata = index.list_metadata(&x.id).unwrap();
        assert_eq!(metadata.len(), 1);
        assert_eq!(metadata[0].1.value, json!(2));

        // Exactly one entry per field and scope: none left from the first values.
        let entries_of = |id: &str| -> Vec<(String, String, i64)> {
            let read = index.db.begin_read().unwrap();
            let table = read.open_table(SEARCH).unwrap();
            let mut entries = Vec::new();
            for row in table.iter().unwrap() {
                let (k, _) = row.unwrap();
                let (scope, field, value, _, entry_id) = k.value();
                if entry_id == id {
                    let n = match search::decode_value(value) {
                        crate::search::Value::Number(n) => n as i64,
                        _ => 0,
                    };
                    entries.push((scope.to_owned(), field.to_owned(), n));
                }
            }
            entries
        };
        let check = |entries: &[(String, String, i64)], lr: i64, updated_at: i64| {
            let fields: Vec<(&str, &str)> = entries
                .iter()
                .map(|(s, f, _)| (s.as_str(), f.as_str()))
                .collect();
            assert_eq!(
                fields,
                [
                    ("*", "created_at"),
                    ("*", "name"),
                    ("*", "owner"),
                    ("*", "updated_at"),
                    ("cv", "created_at"),
                    ("cv", "name"),
                    ("cv", "owner"),
                    ("cv", "p:lr"),
                    ("cv", "updated_at"),
                ]
            );
            assert_eq!(entries[7].2, lr);
            assert_eq!(entries[3].2, updated_at / 1000);
            assert_eq!(entries[8].2, updated_at / 1000);
        };
        check(&entries_of(&x.id), 2, x.updated_at);

        // A later batch replaces the committed entries.
        std::thread::sleep(std::time::Duration::from_millis(2));
        let out = index
            .create_experiments(vec![(new_exp("x"), lr(3))])
            .unwrap();
        assert!(out[0].0.updated_at > x.updated_at + 1000);
        check(&entries_of(&x.id), 3, out[0].0.updated_at);
    }

    /// The ids a page of [`Index::dirty_catalog`] names, sorted.
    fn dirty_ids(index: &Index, limit: usize) -> (Vec<String>, bool) {
        let page = index.dirty_catalog(limit).unwrap();
        let ids = page.rows.iter().map(|r| r.record.id.clone()).collect();
        (ids, page.more)
    }

    #[test]
    fn a_change_made_while_the_catalog_is_written_stays_marked() {
        let index = Index::open_in_memory().unwrap();
        let lr = |v: i64| vec![("lr".to_string(), json!(v))];
        let a = index.create_experiment(new_exp("a"), &lr(1)).unwrap().0.id;
        let b = index.create_experiment(new_exp("b"), &lr(1)).unwrap().0.id;
        let c = index.create_experiment(new_exp("c"), &lr(1)).unwrap().0.id;
        // Marks are read in the order they were made, a page at a time.
        let page = index.dirty_catalog(2).unwrap();
        let mut ids: Vec<_> = page.rows.iter().map(|r| r.record.id.clone()).collect();
        ids.sort();
        let mut want = vec![a.clone(), b.clone()];
        want.sort();
        assert_eq!((ids, page.more), (want, true));
        // `a` changes after its rows were read: its new mark outlives the write.
        index.update_metadata(&a, &lr(2)).unwrap();
        index.catalog_written(&page).unwrap();
        let mut want = vec![a.clone(), c.clone()];
        want.sort();
        assert_eq!(dirty_ids(&index, 10), (want, false));
        let page = index.dirty_catalog(10).unwrap();
        let a_row = page.rows.iter().find(|r| r.record.id == a).unwrap();
        assert_eq!(a_row.metadata[0].1.value, json!(2));
        index.catalog_written(&page).unwrap();
        assert!(!index.catalog_is_dirty().unwrap());
        // Marks start again once all are gone, and still follow each other.
        index.update_metadata(&b, &lr(3)).unwrap();
        index.update_metadata(&c, &lr(3)).unwrap();
        assert_eq!(dirty_ids(&index, 1), (vec![b.clone()], true));
        index.update_metadata(&b, &lr(4)).unwrap();
        let mut want = vec![b, c];
        want.sort();
        assert_eq!(dirty_ids(&index, 10), (want, false));
    }

    #[test]
    fn a_page_takes_every_mark_of_its_experiments_and_marks_without_a_record() {
        let index = Index::open_in_memory().unwrap();
        let lr = |v: i64| vec![("lr".to_string(), json!(v))];
        let a = index.create_experiment(new_exp("a"), &lr(0)).unwrap().0.id;
        for v in 1..5 {
            index.update_metadata(&a, &lr(v)).unwrap();
        }
        let b = index.create_experiment(new_exp("b"), &lr(0)).unwrap().0.id;
        // `a`'s five marks make one row of a one-experiment page.
        let page = index.dirty_catalog(1).unwrap();
        assert_eq!((page.rows.len(), page.marks.len(), page.more), (1, 5, true));
        assert_eq!(page.rows[0].metadata[0].1.value, json!(4));
        index.catalog_written(&page).unwrap();
        assert_eq!(dirty_ids(&index, 10), (vec![b.clone()], false));
        index
            .catalog_written(&index.dirty_catalog(10).unwrap())
            .unwrap();
        // A summary merged for an id with no record marks it: the page has no
        // row, but its marks still go.
        index.merge_summaries_for_test(&["ghost"]);
        let page = index.dirty_catalog(10).unwrap();
        assert!(page.rows.is_empty() && !page.is_empty());
        index.catalog_written(&page).unwrap();
        assert!(!index.catalog_is_dirty().unwrap());
    }

    #[test]
    fn an_index_without_catalog_marks_keeps_none() {
        // A fleet reader's index: nothing would ever take its marks away.
        let index = Index::open_in_memory().unwrap().without_catalog_marks();
        let lr = vec![("lr".to_string(), json!(1))];
        let id = index.create_experiment(new_exp("a"), &lr).unwrap().0.id;
        index.update_metadata(&id, &lr).unwrap();
        index.merge_summaries_for_test(&[&id]);
        assert!(!index.catalog_is_dirty().unwrap());
    }

    #[test]
    fn an_earlier_release_s_marks_by_id_are_kept_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("index.redb");
        let id = {
            let index = Index::open(&path).unwrap();
            let id = index.create_experiment(new_exp("x"), &[]).unwrap().0.id;
            let page = index.dirty_catalog(10).unwrap();
            index.catalog_written(&page).unwrap();
            assert!(!index.catalog_is_dirty().unwrap());
            // An earlier release marks by id alone.
            let txn = index.db.begin_write().unwrap();
            txn.open_table(OLD_DIRTY)
                .unwrap()
                .insert(id.as_str(), ())
                .unwrap();
            txn.commit().unwrap();
            id
        };
        let index = Index::open(&path).unwrap();
        assert_eq!(dirty_ids(&index, 10), (vec![id], false));
        let read = index.db.begin_read().unwrap();
        assert!(
            !read
                .list_tables()
                .unwrap()
                .any(|t| t.name() == OLD_DIRTY.name())
        );
    }
}
