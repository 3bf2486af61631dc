//! The index's side of the change log ([`crate::changelog`]).
//!
//! Writer side: while the change log is on, every transaction that changes what a
//! reader serves (experiments and metadata, a file published, files replaced)
//! also records a [`Change`] in the `change_outbox` table, in that same
//! transaction. So the outbox holds exactly the changes committed and not yet
//! shipped, whatever crashes in between; the shipper puts them into the storage
//! root in entry order and removes them. Objects a replacement removed wait in
//! `held_deletions` until the entry that says so is shipped, so a reader learns
//! of the swap before the old files go.
//!
//! Shipping state lives in `meta`: the last log object shipped, a plan (the log
//! object being written and the last entry it holds, recorded before the write,
//! so a retry after a crash writes the same object with the same entries), and
//! the latest checkpoints.
//!
//! Reader side: [`Index::apply`] and [`Index::apply_checkpoint`] merge what every
//! daemon shipped into one index: an experiment created through many daemons is
//! one experiment (earliest creation, latest update), a metadata key keeps its
//! latest update, and metric summaries combine ([`MetricSummary::merge`]).

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::catalog::{CatalogTables, merge_summaries, prefix_keys};
use super::manifest::{insert_file, remove_file};
use super::{
    AWAITING_UPLOAD, DELETIONS, EXPERIMENTS, FILE_EXPERIMENTS, FILE_EXPERIMENTS_REV, FILES, HELD,
    Index, IndexError, META, METADATA, MetadataEntry, OUTBOX, SUMMARIES, SUMMARY_DELTAS, UNINDEXED,
    decode, encode, search, storage,
};
use crate::index::{FileEntry, FilePart};
use crate::model::{ExperimentRecord, MetricSummary};

/// What one index transaction changed, as a reader needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Change {
    /// Experiments created or updated and metadata written, in one transaction.
    Catalog {
        experiments: Vec<ExperimentRecord>,
        #[serde(default)]
        metadata: Vec<(String, String, MetadataEntry)>,
    },
    /// A file published: where each experiment's rows are in it, and the
    /// summaries of its numeric points (experiment, key, summary).
    Publish {
        file: FileEntry,
        experiments: Vec<(String, FilePart)>,
        #[serde(default)]
        summaries: Vec<(String, String, MetricSummary)>,
    },
    /// Files swapped for others (compaction) or dropped (retention).
    Replace {
        added: Vec<(FileEntry, Vec<(String, FilePart)>)>,
        removed: Vec<String>,
    },
}

impl Change {
    /// Object keys this change adds: they must be in the storage root before a
    /// reader hears of them.
    pub fn added_files(&self) -> Vec<&str> {
        match self {
            Change::Catalog { .. } => Vec::new(),
            Change::Publish { file, .. } => vec![file.key.as_str()],
            Change::Replace { added, .. } => added.iter().map(|(e, _)| e.key.as_str()).collect(),
        }
    }
}

/// A change waiting in the outbox, with its entry number.
#[derive(Debug, Clone, PartialEq)]
pub struct ChangeEntry {
    pub entry: u64,
    pub change: Change,
}

/// One published file in a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointFile {
    pub entry: FileEntry,
    /// Where each experiment's rows are; `None` for a file from before the
    /// experiment index.
    pub experiments: Option<Vec<(String, FilePart)>>,
}

/// Everything a daemon's change log has said so far, in one piece.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub experiments: Vec<ExperimentRecord>,
    pub metadata: Vec<(String, String, MetadataEntry)>,
    pub summaries: Vec<(String, String, MetricSummary)>,
    pub files: Vec<CheckpointFile>,
}

/// The log object being written: its number and the last outbox entry in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShipPlan {
    pub log: u64,
    pub last_entry: u64,
}

/// Where shipping stands.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ShipState {
    /// The last log object shipped (0: none yet).
    pub shipped_log: u64,
    /// The log number of the latest checkpoint, and of the one before it.
    pub checkpoint: Option<u64>,
    pub previous_checkpoint: Option<u64>,
    /// Size of the latest checkpoint, and of the log objects shipped since.
    pub checkpoint_bytes: u64,
    pub log_bytes_since: u64,
    /// The log may be missing changes (it was off, or never checkpointed): the
    /// next checkpoint must come before anything relies on the log alone.
    pub checkpoint_needed: bool,
}

const NEXT_ENTRY: &str = "change_next_entry";
const SHIPPED_LOG: &str = "change_shipped_log";
const PLAN_LOG: &str = "change_plan_log";
const PLAN_LAST: &str = "change_plan_last";
const CHECKPOINT: &str = "change_checkpoint";
const PREVIOUS_CHECKPOINT: &str = "change_previous_checkpoint";
const CHECKPOINT_BYTES: &str = "change_checkpoint_bytes";
const LOG_BYTES_SINCE: &str = "change_log_bytes_since";
const ACTIVE: &str = "change_log_active";
const CHECKPOINT_NEEDED: &str = "change_checkpoint_needed";

pub(super) fn meta_get(
    table: &impl ReadableTable<&'static str, u64>,
    key: &str,
) -> Result<Option<u64>, IndexError> {
    Ok(table.get(key).map_err(storage)?.map(|v| v.value()))
}

impl Index {
    /// Turns the change log on: from now on every transaction records its change.
    /// If it was off before (or this index never had it), the changes made
    /// meanwhile are in no log, so a checkpoint is marked as needed.
    pub fn enable_change_log(&self) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            if meta_get(&meta, ACTIVE)? != Some(1) {
                meta.insert(ACTIVE, 1).map_err(storage)?;
                meta.insert(CHECKPOINT_NEEDED, 1).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)?;
        self.change_log
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Turns the change log off (a daemon configured without it). Entries not yet
    /// shipped are dropped and held deletions released: turning it on again starts
    /// with a checkpoint.
    pub fn disable_change_log(&self) -> Result<(), IndexError> {
        self.change_log
            .store(false, std::sync::atomic::Ordering::Release);
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            if meta_get(&meta, ACTIVE)? != Some(1) {
                drop(meta);
                return txn.abort().map_err(storage);
            }
            meta.insert(ACTIVE, 0).map_err(storage)?;
            meta.remove(PLAN_LOG).map_err(storage)?;
            meta.remove(PLAN_LAST).map_err(storage)?;
            drop(meta);
            self.release_held_unshipped(&txn)?;
            txn.open_table(OUTBOX)
                .map_err(storage)?
                .retain(|_, _| false)
                .map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// With the change log going off, the deletions held for entries that will
    /// never ship go where they would have gone without it: to the deletion queue,
    /// or, for inputs whose replacements are still in the spool, to wait for those
    /// uploads (shipping would have waited for them too). Reads the outbox, so it
    /// runs before the outbox is emptied.
    fn release_held_unshipped(&self, txn: &WriteTransaction) -> Result<(), IndexError> {
        let mut by_entry: std::collections::BTreeMap<u64, Vec<String>> = Default::default();
        {
            let mut held = txn.open_table(HELD).map_err(storage)?;
            for row in held.iter().map_err(storage)? {
                let (k, _) = row.map_err(storage)?;
                let (entry, key) = k.value();
                by_entry.entry(entry).or_default().push(key.to_owned());
            }
            held.retain(|_, _| false).map_err(storage)?;
        }
        let outbox = txn.open_table(OUTBOX).map_err(storage)?;
        let spooled = txn.open_table(super::SPOOLED).map_err(storage)?;
        for (entry, inputs) in by_entry {
            let change: Option<Change> = match outbox.get(entry).map_err(storage)? {
                Some(value) => Some(decode("change", value.value())?),
                None => None,
            };
            let uploading = match &change {
                Some(change) => added_spooled(change, &spooled)?,
                None => Vec::new(),
            };
            self.queue_deletions(txn, None, &inputs, &uploading)?;
        }
        Ok(())
    }

    pub(super) fn change_log_on(&self) -> bool {
        self.change_log.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Records `change` in the outbox within `txn`, if the change log is on;
    /// returns its entry number.
    pub(super) fn log_change(
        &self,
        txn: &WriteTransaction,
        change: impl FnOnce() -> Change,
    ) -> Result<Option<u64>, IndexError> {
        if !self.change_log_on() {
            return Ok(None);
        }
        let mut meta = txn.open_table(META).map_err(storage)?;
        let entry = meta_get(&meta, NEXT_ENTRY)?.unwrap_or(1);
        meta.insert(NEXT_ENTRY, entry + 1).map_err(storage)?;
        txn.open_table(OUTBOX)
            .map_err(storage)?
            .insert(entry, encode(&change()).as_slice())
            .map_err(storage)?;
        Ok(Some(entry))
    }

    /// Queues objects a replacement removed for deletion: with the change log
    /// on, once the change's `entry` is shipped (which waits for the uploads);
    /// else once the `spooled` outputs are uploaded; else at once.
    pub(super) fn queue_deletions(
        &self,
        txn: &WriteTransaction,
        entry: Option<u64>,
        keys: &[String],
        spooled: &[&str],
    ) -> Result<(), IndexError> {
        match entry {
            Some(entry) => {
                let mut held = txn.open_table(HELD).map_err(storage)?;
                for key in keys {
                    held.insert((entry, key.as_str()), ()).map_err(storage)?;
                }
            }
            None if !spooled.is_empty() => {
                let mut awaiting = txn.open_table(AWAITING_UPLOAD).map_err(storage)?;
                for output in spooled {
                    for key in keys {
                        awaiting
                            .insert((*output, key.as_str()), ())
                            .map_err(storage)?;
                    }
                }
            }
            None => {
                let mut deletions = txn.open_table(DELETIONS).map_err(storage)?;
                for key in keys {
                    deletions.insert(key.as_str(), ()).map_err(storage)?;
                }
            }
        }
        Ok(())
    }

    /// Up to `limit` outbox entries, in order, that can be shipped now: those
    /// before the first one adding a file still waiting in the spool.
    pub fn shippable(&self, limit: usize) -> Result<Vec<ChangeEntry>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let outbox = read.open_table(OUTBOX).map_err(storage)?;
        let spooled = read.open_table(super::SPOOLED).map_err(storage)?;
        let mut out = Vec::new();
        for row in outbox.iter().map_err(storage)? {
            let (entry, value) = row.map_err(storage)?;
            let change: Change = decode("change", value.value())?;
            if !added_spooled(&change, &spooled)?.is_empty() {
                return Ok(out);
            }
            out.push(ChangeEntry {
                entry: entry.value(),
                change,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// The outbox entries up to `last`, in order (to write a planned log object
    /// again after a crash).
    pub fn entries_through(&self, last: u64) -> Result<Vec<ChangeEntry>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let outbox = read.open_table(OUTBOX).map_err(storage)?;
        let mut out = Vec::new();
        for row in outbox.range(..=last).map_err(storage)? {
            let (entry, value) = row.map_err(storage)?;
            out.push(ChangeEntry {
                entry: entry.value(),
                change: decode("change", value.value())?,
            });
        }
        Ok(out)
    }

    /// The log object being written, if a write was planned and not finished.
    pub fn ship_plan(&self) -> Result<Option<ShipPlan>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let meta = read.open_table(META).map_err(storage)?;
        Ok(
            match (meta_get(&meta, PLAN_LOG)?, meta_get(&meta, PLAN_LAST)?) {
                (Some(log), Some(last_entry)) => Some(ShipPlan { log, last_entry }),
                _ => None,
            },
        )
    }

    /// Durably records the log object about to be written.
    pub fn plan_ship(&self, plan: ShipPlan) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(PLAN_LOG, plan.log).map_err(storage)?;
            meta.insert(PLAN_LAST, plan.last_entry).map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// The planned log object (of `bytes`) is in the root: its entries leave the
    /// outbox, and the deletions they held are released.
    pub fn shipped(&self, plan: ShipPlan, bytes: u64) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            txn.open_table(OUTBOX)
                .map_err(storage)?
                .retain_in(..=plan.last_entry, |_, _| false)
                .map_err(storage)?;
            release_held(&txn, plan.last_entry)?;
            let mut meta = txn.open_table(META).map_err(storage)?;
            meta.insert(SHIPPED_LOG, plan.log).map_err(storage)?;
            let since = meta_get(&meta, LOG_BYTES_SINCE)?.unwrap_or(0);
            meta.insert(LOG_BYTES_SINCE, since + bytes)
                .map_err(storage)?;
            meta.remove(PLAN_LOG).map_err(storage)?;
            meta.remove(PLAN_LAST).map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// Where shipping stands.
    pub fn ship_state(&self) -> Result<ShipState, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let meta = read.open_table(META).map_err(storage)?;
        Ok(ShipState {
            shipped_log: meta_get(&meta, SHIPPED_LOG)?.unwrap_or(0),
            checkpoint: meta_get(&meta, CHECKPOINT)?,
            previous_checkpoint: meta_get(&meta, PREVIOUS_CHECKPOINT)?,
            checkpoint_bytes: meta_get(&meta, CHECKPOINT_BYTES)?.unwrap_or(0),
            log_bytes_since: meta_get(&meta, LOG_BYTES_SINCE)?.unwrap_or(0),
            checkpoint_needed: meta_get(&meta, CHECKPOINT_NEEDED)? == Some(1),
        })
    }

    /// Whether entries wait in the outbox.
    pub fn outbox_is_empty(&self) -> Result<bool, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        read.open_table(OUTBOX)
            .map_err(storage)?
            .is_empty()
            .map_err(storage)
    }

    /// Whether objects wait for their replacement's change to be shipped before
    /// they may be deleted.
    pub fn has_held_deletions(&self) -> Result<bool, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        Ok(!read
            .open_table(HELD)
            .map_err(storage)?
            .is_empty()
            .map_err(storage)?)
    }

    /// The whole state the shipped log describes, as of log object `n` (returned
    /// with it), when the outbox is empty (so that state is exactly what was
    /// shipped); `None` while entries wait.
    pub fn checkpoint_state(&self) -> Result<Option<(u64, Checkpoint)>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        if !read
            .open_table(OUTBOX)
            .map_err(storage)?
            .is_empty()
            .map_err(storage)?
        {
            return Ok(None);
        }
        let meta = read.open_table(META).map_err(storage)?;
        if meta_get(&meta, PLAN_LOG)?.is_some() {
            return Ok(None);
        }
        let log = meta_get(&meta, SHIPPED_LOG)?.unwrap_or(0);
        Ok(Some((log, snapshot(&read)?)))
    }

    /// A checkpoint of `bytes` as of log object `log` is in the root.
    pub fn checkpoint_written(&self, log: u64, bytes: u64) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(META).map_err(storage)?;
            match meta_get(&meta, CHECKPOINT)? {
                Some(previous) if previous != log => {
                    meta.insert(PREVIOUS_CHECKPOINT, previous)
                        .map_err(storage)?;
                }
                _ => {}
            }
            meta.insert(CHECKPOINT, log).map_err(storage)?;
            meta.insert(CHECKPOINT_BYTES, bytes).map_err(storage)?;
            meta.insert(LOG_BYTES_SINCE, 0).map_err(storage)?;
            meta.remove(CHECKPOINT_NEEDED).map_err(storage)?;
        }
        txn.commit().map_err(storage)
    }

    /// Merges what one daemon's log object says into this (reader's) index, in one
    /// transaction.
    pub fn apply(&self, changes: &[Change]) -> Result<(), IndexError> {
        let _serial = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.begin_write()?;
        for change in changes {
            match change {
                Change::Catalog {
                    experiments,
                    metadata,
                } => {
                    let mut t = CatalogTables::open(&txn, self.catalog_marks)?;
                    for record in experiments {
                        merge_experiment(&mut t, record)?;
                    }
                    for (id, key, entry) in metadata {
                        merge_metadata(&mut t, id, key, entry)?;
                    }
                }
                Change::Publish {
                    file,
                    experiments,
                    summaries,
                } => {
                    insert_file(&txn, file, experiments)?;
                    merge_summaries(&txn, summaries, self.catalog_marks)?;
                }
                Change::Replace { added, removed } => {
                    for (entry, experiments) in added {
                        insert_file(&txn, entry, experiments)?;
                    }
                    for key in removed {
                        remove_file(&txn, key)?;
                    }
                }
            }
        }
        txn.commit().map_err(storage)?;
        self.bump_generation();
        Ok(())
    }

    /// Merges one daemon's checkpoint into this (reader's) index.
    pub fn apply_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), IndexError> {
        let _serial = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.begin_write()?;
        {
            let mut t = CatalogTables::open(&txn, self.catalog_marks)?;
            for record in &checkpoint.experiments {
                merge_experiment(&mut t, record)?;
            }
            for (id, key, entry) in &checkpoint.metadata {
                merge_metadata(&mut t, id, key, entry)?;
            }
        }
        merge_summaries(&txn, &checkpoint.summaries, self.catalog_marks)?;
        for file in &checkpoint.files {
            match &file.experiments {
                Some(parts) => insert_file(&txn, &file.entry, parts)?,
                None => {
                    insert_file(&txn, &file.entry, &[])?;
                    txn.open_table(UNINDEXED)
                        .map_err(storage)?
                        .insert(file.entry.key.as_str(), ())
                        .map_err(storage)?;
                }
            }
        }
        txn.commit().map_err(storage)?;
        self.bump_generation();
        Ok(())
    }
}

/// An output of a replacement left the spool (uploaded, or removed by retention):
/// the inputs that waited for no other output go into the deletion queue.
pub(super) fn release_awaiting(txn: &WriteTransaction, output: &str) -> Result<(), IndexError> {
    let mut awaiting = txn.open_table(AWAITING_UPLOAD).map_err(storage)?;
    let inputs = prefix_keys(&awaiting, output)?;
    if inputs.is_empty() {
        return Ok(());
    }
    for input in &inputs {
        awaiting.remove((output, input.as_str())).map_err(storage)?;
    }
    // The table holds the replacements still uploading: few rows.
    let mut still = std::collections::HashSet::new();
    for row in awaiting.iter().map_err(storage)? {
        let (k, _) = row.map_err(storage)?;
        still.insert(k.value().1.to_owned());
    }
    let mut deletions = txn.open_table(DELETIONS).map_err(storage)?;
    for input in inputs.iter().filter(|i| !still.contains(*i)) {
        deletions.insert(input.as_str(), ()).map_err(storage)?;
    }
    Ok(())
}

/// The files `change` adds that still wait in the spool for their upload.
fn added_spooled<'c>(
    change: &'c Change,
    spooled: &impl ReadableTable<&'static str, u64>,
) -> Result<Vec<&'c str>, IndexError> {
    let mut out = Vec::new();
    for key in change.added_files() {
        if spooled.get(key).map_err(storage)?.is_some() {
            out.push(key);
        }
    }
    Ok(out)
}

/// Moves deletions held by entries up to `last` into the deletion queue.
fn release_held(txn: &WriteTransaction, last: u64) -> Result<(), IndexError> {
    let mut held = txn.open_table(HELD).map_err(storage)?;
    let mut keys = Vec::new();
    for row in held.range((0, "")..).map_err(storage)? {
        let (k, _) = row.map_err(storage)?;
        let (entry, key) = k.value();
        if entry > last {
            break;
        }
        keys.push(key.to_owned());
    }
    if keys.is_empty() {
        return Ok(());
    }
    held.retain(|(entry, _), _| entry > last).map_err(storage)?;
    let mut deletions = txn.open_table(DELETIONS).map_err(storage)?;
    for key in &keys {
        deletions.insert(key.as_str(), ()).map_err(storage)?;
    }
    Ok(())
}

/// Every experiment, metadata entry, summary and file, from one read transaction.
fn snapshot(read: &ReadTransaction) -> Result<Checkpoint, IndexError> {
    let mut out = Checkpoint::default();
    for row in read
        .open_table(EXPERIMENTS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = row.map_err(storage)?;
        out.experiments.push(decode(key.value(), value.value())?);
    }
    for row in read
        .open_table(METADATA)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = row.map_err(storage)?;
        let (id, k) = key.value();
        out.metadata
            .push((id.to_owned(), k.to_owned(), decode(k, value.value())?));
    }
    for row in read
        .open_table(SUMMARIES)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = row.map_err(storage)?;
        let (id, k) = key.value();
        out.summaries
            .push((id.to_owned(), k.to_owned(), decode(k, value.value())?));
    }
    // Published files' summaries not folded in yet ([`super::fold`]): a reader
    // merges a checkpoint's summaries, so these count as if they had been.
    for row in read
        .open_table(SUMMARY_DELTAS)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (_, value) = row.map_err(storage)?;
        out.summaries
            .append(&mut super::fold::decode_deltas(value.value())?);
    }
    let unindexed = read.open_table(UNINDEXED).map_err(storage)?;
    let rev = read.open_table(FILE_EXPERIMENTS_REV).map_err(storage)?;
    let index = read.open_table(FILE_EXPERIMENTS).map_err(storage)?;
    for row in read
        .open_table(FILES)
        .map_err(storage)?
        .iter()
        .map_err(storage)?
    {
        let (key, value) = row.map_err(storage)?;
        let key = key.value();
        let entry: FileEntry = decode(key, value.value())?;
        let experiments = if unindexed.get(key).map_err(storage)?.is_some() {
            None
        } else {
            let mut parts = Vec::new();
            for experiment in prefix_keys(&rev, key)? {
                if let Some(v) = index.get((experiment.as_str(), key)).map_err(storage)? {
                    let part: super::manifest::IndexedPart = decode(key, v.value())?;
                    parts.push((experiment, part.part));
                }
            }
            Some(parts)
        };
        out.files.push(CheckpointFile { entry, experiments });
    }
    Ok(out)
}

/// One experiment as several daemons created it: the earliest creation's fields,
/// the latest update.
fn merge_experiment(
    t: &mut CatalogTables<'_>,
    incoming: &ExperimentRecord,
) -> Result<(), IndexError> {
    let id = incoming.id.as_str();
    let old: Option<ExperimentRecord> = t
        .experiments
        .get(id)
        .map_err(storage)?
        .map(|v| decode(id, v.value()))
        .transpose()?;
    let merged = match &old {
        None => incoming.clone(),
        Some(old) => {
            let mut m = if incoming.created_at < old.created_at {
                incoming.clone()
            } else {
                old.clone()
            };
            m.updated_at = old.updated_at.max(incoming.updated_at);
            m
        }
    };
    if old.as_ref() == Some(&merged) {
        return Ok(());
    }
    t.experiments
        .insert(id, encode(&merged).as_slice())
        .map_err(storage)?;
    match &old {
        None => t.place(&merged)?,
        Some(old) if old.created_at != merged.created_at => t.replace_created(old, &merged)?,
        Some(_) => {}
    }
    search::index_record(&mut t.search, old.as_ref(), &merged)
}

/// The order in which metadata updates win: the later update, then (for equal
/// times on two daemons) the larger value as JSON text, so every reader agrees
/// whatever order it reads the daemons in.
fn update_order(e: &MetadataEntry) -> (i64, String) {
    (e.updated_at, e.value.to_string())
}

/// A metadata key as several daemons wrote it: the latest update wins.
fn merge_metadata(
    t: &mut CatalogTables<'_>,
    id: &str,
    key: &str,
    incoming: &MetadataEntry,
) -> Result<(), IndexError> {
    let old: Option<MetadataEntry> = t
        .metadata
        .get((id, key))
        .map_err(storage)?
        .map(|v| decode(key, v.value()))
        .transpose()?;
    if old
        .as_ref()
        .is_some_and(|o| update_order(o) >= update_order(incoming))
    {
        return Ok(());
    }
    t.metadata
        .insert((id, key), encode(incoming).as_slice())
        .map_err(storage)?;
    if let Some((ns, created_at)) = t.placement_of(id)? {
        search::index_param(
            &mut t.search,
            (&ns, created_at, id),
            key,
            old.as_ref().map(|o| &o.value),
            &incoming.value,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::tests::new_exp;
    use crate::index::{CATALOG_CLOCK, EXPERIMENTS_BY_NS, META, SEARCH};
    use crate::index::{Forget, PublishIntent, ReplaceIntent, SCHEMA_INT64};
    use crate::paths::Table;
    use redb::ReadableTable;
    use serde_json::json;

    fn writer() -> (tempfile::TempDir, Index) {
        let dir = tempfile::tempdir().unwrap();
        let index = Index::open(&dir.path().join("i.redb")).unwrap();
        index.enable_change_log().unwrap();
        (dir, index)
    }

    fn publish(index: &Index, key: &str, experiment: &str, step: i64, value: f64) {
        let intent = PublishIntent {
            entry: FileEntry {
                key: key.into(),
                rows: 1,
                bytes: 10,
                min_experiment: experiment.into(),
                max_experiment: experiment.into(),
                created_at: 0,
                schema: SCHEMA_INT64,
                compacted: false,
            },
            partition: "metrics/namespace=cv/date=2026-01-01".into(),
            pieces: vec![],
            experiments: vec![(
                experiment.into(),
                FilePart {
                    row_groups: vec![0],
                    rows: 1,
                },
            )],
            summaries: vec![(
                experiment.into(),
                "loss".into(),
                MetricSummary::of(step, Some(value), step),
            )],
            batch_ids: vec![],
        };
        index.begin_publish(&intent).unwrap();
        index
            .commit_publish(&intent, Forget::default(), false)
            .unwrap();
    }

    /// Ships everything in the outbox as one log object; returns its changes.
    fn ship(index: &Index) -> Vec<Change> {
        let entries = index.shippable(usize::MAX).unwrap();
        let Some(last) = entries.last() else {
            return Vec::new();
        };
        let plan = ShipPlan {
            log: index.ship_state().unwrap().shipped_log + 1,
            last_entry: last.entry,
        };
        index.plan_ship(plan).unwrap();
        index.shipped(plan, 100).unwrap();
        entries.into_iter().map(|e| e.change).collect()
    }

    fn files(index: &Index, experiment: &str) -> Vec<String> {
        index
            .experiment_files(Table::Metrics, "cv", experiment)
            .unwrap()
            .into_iter()
            .map(|f| f.entry.key)
            .collect()
    }

    #[test]
    fn two_daemons_merge_into_one_view_whatever_order_they_are_read_in() {
        let (_a_dir, a) = writer();
        let (_b_dir, b) = writer();
        let (rec_a, _) = a
            .create_experiment(new_exp("job"), &[("lr".into(), json!(0.1))])
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (rec_b, _) = b
            .create_experiment(new_exp("job"), &[("lr".into(), json!(0.2))])
            .unwrap();
        assert_eq!(rec_a.id, rec_b.id);
        let id = rec_a.id.clone();
        a.update_metadata(&id, &[("opt".into(), json!("adam"))])
            .unwrap();
        publish(
            &a,
            "metrics/namespace=cv/date=2026-01-01/a1.parquet",
            &id,
            1,
            5.0,
        );
        publish(
            &b,
            "metrics/namespace=cv/date=2026-01-01/b1.parquet",
            &id,
            3,
            1.0,
        );
        publish(
            &a,
            "metrics/namespace=cv/date=2026-01-01/a2.parquet",
            &id,
            2,
            9.0,
        );
        let (log_a, log_b) = (ship(&a), ship(&b));
        assert!(a.outbox_is_empty().unwrap());
        let mut entries = Vec::new();
        for order in [[&log_a, &log_b], [&log_b, &log_a]] {
            let reader = Index::open_in_memory().unwrap();
            for log in order {
                reader.apply(log).unwrap();
            }
            let exp = reader.get_experiment(&id).unwrap().unwrap();
            // The earliest creation, the latest update.
            assert_eq!(exp.created_at, rec_a.created_at);
            assert!(exp.updated_at >= rec_b.updated_at);
            assert_eq!(reader.list_experiments("cv").unwrap().len(), 1);
            let md: Vec<_> = reader
                .list_metadata(&id)
                .unwrap()
                .into_iter()
                .map(|(k, e)| (k, e.value))
                .collect();
            // lr was written last through b.
            assert_eq!(
                md,
                [("lr".into(), json!(0.2)), ("opt".into(), json!("adam"))]
            );
            let s = reader.summaries(&id).unwrap();
            assert_eq!(s.len(), 1);
            let s = s[0].1;
            assert_eq!((s.count, s.last_step, s.last), (3, 3, 1.0));
            assert_eq!((s.min, s.max), (1.0, 9.0));
            assert_eq!(
                files(&reader, &id),
                [
                    "metrics/namespace=cv/date=2026-01-01/a1.parquet",
                    "metrics/namespace=cv/date=2026-01-01/a2.parquet",
                    "metrics/namespace=cv/date=2026-01-01/b1.parquet",
                ]
            );
            // Every search and listing entry ends with the earliest creation, even
            // where the later one was read first.
            let read = reader.db.begin_read().unwrap();
            let mut keys: Vec<(String, String, Vec<u8>, i64)> = Vec::new();
            for row in read.open_table(SEARCH).unwrap().iter().unwrap() {
                let (key, _) = row.unwrap();
                let (scope, field, value, created_at, _) = key.value();
                assert_eq!(created_at, rec_a.created_at, "{field}");
                keys.push((scope.into(), field.into(), value.to_vec(), created_at));
            }
            for row in read.open_table(EXPERIMENTS_BY_NS).unwrap().iter().unwrap() {
                assert_eq!(row.unwrap().0.value().1, rec_a.created_at);
            }
            entries.push(keys);
        }
        // Both orders index the same entries: two params, three summary
        // aggregates, four record fields in two scopes.
        assert_eq!(entries[0].len(), 2 + 3 + 8);
        assert_eq!(entries[0], entries[1]);
    }

    /// A key set twice in one batch (two creations of one experiment), then
    /// twice by updates: a reader of the change log ends with the values the
    /// writer kept, the last ones, though the first have the larger JSON text.
    #[test]
    fn a_reader_keeps_the_last_value_of_a_key_set_twice_at_once() {
        let (_dir, a) = writer();
        let lr = |v: i64| vec![("lr".to_string(), json!(v))];
        let out = a
            .create_experiments(vec![(new_exp("job"), lr(9)), (new_exp("job"), lr(1))])
            .unwrap();
        let id = out[0].0.id.clone();
        let reader = Index::open_in_memory().unwrap();
        reader.apply(&ship(&a)).unwrap();
        for index in [&a, &reader] {
            let metadata = index.list_metadata(&id).unwrap();
            assert_eq!(metadata.len(), 1);
            assert_eq!(metadata[0].1.value, json!(1));
        }
        assert_eq!(
            reader.list_metadata(&id).unwrap(),
            a.list_metadata(&id).unwrap()
        );

        for v in [8, 2] {
            a.update_metadata(&id, &lr(v)).unwrap();
        }
        reader.apply(&ship(&a)).unwrap();
        let kept = a.list_metadata(&id).unwrap();
        assert_eq!(kept[0].1.value, json!(2));
        assert_eq!(reader.list_metadata(&id).unwrap(), kept);
    }

    /// After the wall clock stepped back (here: the last catalog write is an
    /// hour ahead of it), each write still gets a later time than the last, so
    /// a reader of the change log keeps the last value and the last record.
    #[test]
    fn writes_after_the_clock_stepped_back_are_still_later() {
        let (_dir, a) = writer();
        let lr = |v: i64| vec![("lr".to_string(), json!(v))];
        assert_eq!(a.catalog_clock_lead().unwrap(), 0);
        let ahead = crate::model::now_micros() + 3_600_000_000;
        let txn = a.db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(CATALOG_CLOCK, ahead as u64)
            .unwrap();
        txn.commit().unwrap();
        let lead = a.catalog_clock_lead().unwrap();
        assert!((3_599_000_000..=3_600_000_000).contains(&lead), "{lead}");
        let out = a.create_experiments(vec![(new_exp("job"), lr(9))]).unwrap();
        let record = &out[0].0;
        assert_eq!(
            (record.created_at, record.updated_at),
            (ahead + 1, ahead + 1)
        );
        let id = record.id.clone();
        for (v, at) in [(8, ahead + 2), (2, ahead + 3)] {
            assert_eq!(a.update_metadata(&id, &lr(v)).unwrap(), at);
        }
        let kept = a.list_metadata(&id).unwrap();
        assert_eq!(
            (&kept[0].1.value, kept[0].1.updated_at),
            (&json!(2), ahead + 3)
        );
        let reader = Index::open_in_memory().unwrap();
        reader.apply(&ship(&a)).unwrap();
        assert_eq!(reader.list_metadata(&id).unwrap(), kept);
        assert_eq!(
            reader.get_experiment(&id).unwrap(),
            a.get_experiment(&id).unwrap()
        );
        assert_eq!(
            a.get_experiment(&id).unwrap().unwrap().updated_at,
            ahead + 3
        );
        // The snapshot tables' `written_at` comes from the same clock.
        assert_eq!(a.catalog_now().unwrap(), ahead + 4);
    }

    /// An index an earlier release wrote keeps no catalog clock; if its times
    /// lie ahead of the wall clock, the clock starts after the latest of them.
    #[test]
    fn an_index_without_a_catalog_clock_starts_it_after_its_latest_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i.redb");
        let ahead = crate::model::now_micros() + 3_600_000_000;
        let id = {
            let a = Index::open(&path).unwrap();
            let set_clock = |value: Option<u64>| {
                let txn = a.db.begin_write().unwrap();
                let mut meta = txn.open_table(META).unwrap();
                match value {
                    Some(v) => meta.insert(CATALOG_CLOCK, v).unwrap(),
                    None => meta.remove(CATALOG_CLOCK).unwrap(),
                };
                drop(meta);
                txn.commit().unwrap();
            };
            set_clock(Some(ahead as u64));
            let out = a
                .create_experiments(vec![(new_exp("job"), vec![])])
                .unwrap();
            assert_eq!(out[0].0.updated_at, ahead + 1);
            set_clock(None);
            out[0].0.id.clone()
        };
        let a = Index::open(&path).unwrap();
        let at = a
            .update_metadata(&id, &[("lr".to_string(), json!(1))])
            .unwrap();
        assert!(at > ahead + 1, "{at} is not after {}", ahead + 1);
        assert_eq!(a.get_experiment(&id).unwrap().unwrap().updated_at, at);
    }

    #[test]
    fn a_replacement_is_shipped_before_its_inputs_may_be_deleted_and_a_checkpoint_equals_the_log() {
        let (_dir, a) = writer();
        let (rec, _) = a.create_experiment(new_exp("job"), &[]).unwrap();
        let id = rec.id;
        let k1 = "metrics/namespace=cv/date=2026-01-01/a1.parquet";
        let k2 = "metrics/namespace=cv/date=2026-01-01/a2.parquet";
        publish(&a, k1, &id, 1, 1.0);
        publish(&a, k2, &id, 2, 2.0);
        let mut log = ship(&a);
        let mut merged = a.files(Table::Metrics, "cv").unwrap()[0].clone();
        merged.key = "metrics/namespace=cv/date=2026-01-01/big.parquet".into();
        let replace = ReplaceIntent {
            id: "r".into(),
            outputs: vec![(
                merged.clone(),
                vec![(
                    id.clone(),
                    FilePart {
                        row_groups: vec![0],
                        rows: 2,
                    },
                )],
            )],
            inputs: vec![k1.into(), k2.into()],
        };
        a.begin_replace(&replace).unwrap();
        a.commit_replace(&replace, false).unwrap();
        // Held until the change is shipped.
        assert!(a.deletions().unwrap().is_empty());
        assert!(a.has_held_deletions().unwrap());
        assert!(a.checkpoint_state().unwrap().is_none(), "outbox not empty");
        log.extend(ship(&a));
        assert!(!a.has_held_deletions().unwrap());
        assert_eq!(a.deletions().unwrap(), [k1, k2]);

        // The checkpoint counts the summaries still waiting to be folded in.
        assert!(a.summaries_pending().unwrap() > 0);
        let (n, checkpoint) = a.checkpoint_state().unwrap().unwrap();
        assert_eq!(n, 2);
        a.fold_all_summaries().unwrap();
        let from_log = Index::open_in_memory().unwrap();
        from_log.apply(&log).unwrap();
        let from_checkpoint = Index::open_in_memory().unwrap();
        from_checkpoint.apply_checkpoint(&checkpoint).unwrap();
        for reader in [&from_log, &from_checkpoint] {
            assert_eq!(files(reader, &id), [merged.key.as_str()]);
            assert_eq!(reader.summaries(&id).unwrap(), a.summaries(&id).unwrap());
            assert_eq!(
                reader.get_experiment(&id).unwrap(),
                a.get_experiment(&id).unwrap()
            );
            assert_eq!(
                reader.file_experiments(&merged.key).unwrap(),
                a.file_experiments(&merged.key).unwrap()
            );
        }
    }

    #[test]
    fn a_planned_object_is_written_again_with_the_same_entries() {
        let (_dir, a) = writer();
        a.create_experiment(new_exp("x"), &[]).unwrap();
        let first = a.shippable(10).unwrap();
        let plan = ShipPlan {
            log: 1,
            last_entry: first.last().unwrap().entry,
        };
        a.plan_ship(plan).unwrap();
        // More changes after the plan: not part of object 1.
        a.create_experiment(new_exp("y"), &[]).unwrap();
        assert_eq!(a.ship_plan().unwrap(), Some(plan));
        assert_eq!(a.entries_through(plan.last_entry).unwrap(), first);
        a.shipped(plan, 10).unwrap();
        assert_eq!(a.ship_plan().unwrap(), None);
        assert_eq!(a.shippable(10).unwrap().len(), 1);
        assert_eq!(a.ship_state().unwrap().shipped_log, 1);
        // Off: nothing recorded, nothing held; on again: a checkpoint is needed.
        a.disable_change_log().unwrap();
        a.create_experiment(new_exp("z"), &[]).unwrap();
        assert!(a.outbox_is_empty().unwrap());
        a.enable_change_log().unwrap();
        assert!(a.ship_state().unwrap().checkpoint_needed);
        a.checkpoint_written(1, 10).unwrap();
        assert!(!a.ship_state().unwrap().checkpoint_needed);
    }
}
