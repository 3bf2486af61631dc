//! The manifest: published files, which row groups hold which experiment, the WAL
//! pieces they hold, the upload spool, and replacements (compaction, retention).

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::catalog::{prefix_keys, record_batch_ids};
use super::changes::{Change, release_awaiting};
use super::fold::queue_summaries;
use super::{
    DELETIONS, FILE_EXPERIMENTS, FILE_EXPERIMENTS_REV, FILES, INTENTS, Index, IndexError,
    PUBLISHED, REPLACE_INTENTS, SPOOLED, UNINDEXED, decode, encode, storage,
};
use crate::model::{MetricSummary, Micros};
use crate::paths::{ObjectKey, Table};

/// Files written before step and wallclock became int64: both are uint64.
pub const SCHEMA_UINT64: u32 = 1;
/// The current metrics schema: step and wallclock_time are int64.
pub const SCHEMA_INT64: u32 = 2;

fn legacy_schema() -> u32 {
    SCHEMA_UINT64
}

/// A published Parquet file, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    /// Smallest and largest experiment id in the file.
    pub min_experiment: String,
    pub max_experiment: String,
    pub created_at: Micros,
    /// [`SCHEMA_INT64`] for files written by this release; older entries lack the
    /// field and read as [`SCHEMA_UINT64`].
    #[serde(default = "legacy_schema")]
    pub schema: u32,
    /// Written by compaction (sorted as a whole, row groups along experiments).
    #[serde(default)]
    pub compacted: bool,
}

#[cfg(test)]
impl FileEntry {
    /// A 5-byte, one-row file of experiment `e` under `key`, for tests.
    pub(crate) fn one_row_of_e(key: &str) -> Self {
        Self {
            key: key.into(),
            rows: 1,
            bytes: 5,
            min_experiment: "e".into(),
            max_experiment: "e".into(),
            created_at: 0,
            schema: SCHEMA_INT64,
            compacted: false,
        }
    }
}

impl FileEntry {
    pub fn object_key(&self) -> ObjectKey {
        ObjectKey::from_manifest(self.key.clone())
    }

    /// Whether the file may hold rows of `experiment_id`.
    pub fn may_contain(&self, experiment_id: &str) -> bool {
        self.min_experiment.as_str() <= experiment_id
            && experiment_id <= self.max_experiment.as_str()
    }

    /// The partition folder the file sits in.
    pub fn partition(&self) -> &str {
        self.key.rsplit_once('/').map_or("", |(dir, _)| dir)
    }
}

/// Where one experiment's rows are in one file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePart {
    /// Row groups holding rows of the experiment, ascending.
    pub row_groups: Vec<u32>,
    pub rows: u64,
}

/// A file that may hold an experiment's rows, and where.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRef {
    pub entry: FileEntry,
    /// The row groups to read; `None` for a file without an experiment index
    /// (read every row group whose statistics admit the experiment).
    pub row_groups: Option<Vec<u32>>,
}

/// A file about to be published, and what its publication records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishIntent {
    pub entry: FileEntry,
    /// The partition folder, e.g. `metrics/namespace=cv/date=2026-11-26`.
    pub partition: String,
    /// (WAL seq, experiment id) pieces in the file, sorted and distinct.
    pub pieces: Vec<(u64, String)>,
    /// Where each experiment's rows are in the file.
    #[serde(default)]
    pub experiments: Vec<(String, FilePart)>,
    /// (experiment, key, summary) of the numeric points in the file.
    #[serde(default)]
    pub summaries: Vec<(String, String, MetricSummary)>,
    /// (client batch id, accepted at, points) of the batches in the file.
    #[serde(default)]
    pub batch_ids: Vec<(String, Micros, u64)>,
}

/// Files replacing others (compaction) or none (retention), in one swap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplaceIntent {
    pub id: String,
    /// New files, in place (renamed or uploaded) before the swap commits.
    pub outputs: Vec<(FileEntry, Vec<(String, FilePart)>)>,
    /// Keys of the files they replace.
    pub inputs: Vec<String>,
}

/// A checkpoint of what publication needs to forget, passed to each commit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Forget {
    /// Published pieces below this WAL seq (records no longer on disk).
    pub pieces_below: u64,
    /// Client batch ids accepted before this time.
    pub batch_ids_before: Micros,
}

pub(super) fn insert_file(
    txn: &WriteTransaction,
    entry: &FileEntry,
    experiments: &[(String, FilePart)],
) -> Result<(), IndexError> {
    txn.open_table(FILES)
        .map_err(storage)?
        .insert(entry.key.as_str(), encode(entry).as_slice())
        .map_err(storage)?;
    let mut index = txn.open_table(FILE_EXPERIMENTS).map_err(storage)?;
    let mut rev = txn.open_table(FILE_EXPERIMENTS_REV).map_err(storage)?;
    for (experiment, part) in experiments {
        rev.insert((entry.key.as_str(), experiment.as_str()), ())
            .map_err(storage)?;
        index
            .insert(
                (experiment.as_str(), entry.key.as_str()),
                encode(&IndexedPart {
                    part: part.clone(),
                    entry: entry.clone(),
                })
                .as_slice(),
            )
            .map_err(storage)?;
    }
    Ok(())
}

/// A `file_experiments` value: the part, and the file's entry so a read needs no
/// second lookup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct IndexedPart {
    pub(super) part: FilePart,
    pub(super) entry: FileEntry,
}

/// Queues a replacement's outputs for deletion and forgets its intent.
fn abandon(txn: &WriteTransaction, intent: &ReplaceIntent) -> Result<(), IndexError> {
    let mut deletions = txn.open_table(DELETIONS).map_err(storage)?;
    for (entry, _) in &intent.outputs {
        deletions.insert(entry.key.as_str(), ()).map_err(storage)?;
    }
    txn.open_table(REPLACE_INTENTS)
        .map_err(storage)?
        .remove(intent.id.as_str())
        .map_err(storage)?;
    Ok(())
}

pub(super) fn remove_file(
    txn: &WriteTransaction,
    key: &str,
) -> Result<Option<FileEntry>, IndexError> {
    let removed = txn
        .open_table(FILES)
        .map_err(storage)?
        .remove(key)
        .map_err(storage)?
        .map(|v| decode::<FileEntry>(key, v.value()))
        .transpose()?;
    let Some(entry) = removed else {
        return Ok(None);
    };
    txn.open_table(UNINDEXED)
        .map_err(storage)?
        .remove(key)
        .map_err(storage)?;
    if txn
        .open_table(SPOOLED)
        .map_err(storage)?
        .remove(key)
        .map_err(storage)?
        .is_some()
    {
        release_awaiting(txn, key)?;
    }
    let mut rev = txn.open_table(FILE_EXPERIMENTS_REV).map_err(storage)?;
    let experiments = prefix_keys(&rev, key)?;
    let mut index = txn.open_table(FILE_EXPERIMENTS).map_err(storage)?;
    for experiment in &experiments {
        index.remove((experiment.as_str(), key)).map_err(storage)?;
        rev.remove((key, experiment.as_str())).map_err(storage)?;
    }
    Ok(Some(entry))
}

impl Index {
    /// Durably records that `intent`'s file is about to be renamed into place.
    pub fn begin_publish(&self, intent: &PublishIntent) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        txn.open_table(INTENTS)
            .map_err(storage)?
            .insert(intent.entry.key.as_str(), encode(intent).as_slice())
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Records the published file, its experiment index, WAL pieces, metric
    /// summaries and batch ids, and drops the intent, in one transaction. Also
    /// forgets what `forget` says is no longer needed. `spooled`: the file waits in
    /// the spool for upload.
    pub fn commit_publish(
        &self,
        intent: &PublishIntent,
        forget: Forget,
        spooled: bool,
    ) -> Result<(), IndexError> {
        let _serial = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.begin_write()?;
        {
            if spooled {
                txn.open_table(SPOOLED)
                    .map_err(storage)?
                    .insert(intent.entry.key.as_str(), intent.entry.bytes)
                    .map_err(storage)?;
            }
            insert_file(&txn, &intent.entry, &intent.experiments)?;
            txn.open_table(INTENTS)
                .map_err(storage)?
                .remove(intent.entry.key.as_str())
                .map_err(storage)?;
            let mut published = txn.open_table(PUBLISHED).map_err(storage)?;
            let mut i = 0;
            while i < intent.pieces.len() {
                let seq = intent.pieces[i].0;
                let key = (seq, intent.partition.as_str());
                let mut experiments: Vec<String> = match published.get(key).map_err(storage)? {
                    Some(v) => decode("published piece", v.value())?,
                    None => Vec::new(),
                };
                while i < intent.pieces.len() && intent.pieces[i].0 == seq {
                    experiments.push(intent.pieces[i].1.clone());
                    i += 1;
                }
                experiments.sort();
                experiments.dedup();
                published
                    .insert(key, encode(&experiments).as_slice())
                    .map_err(storage)?;
            }
            if forget.pieces_below > 0 {
                published
                    .retain_in((0, "")..(forget.pieces_below, ""), |_, _| false)
                    .map_err(storage)?;
            }
            queue_summaries(&txn, &intent.summaries)?;
            record_batch_ids(&txn, &intent.batch_ids, forget.batch_ids_before)?;
            self.log_change(&txn, || Change::Publish {
                file: intent.entry.clone(),
                experiments: intent.experiments.clone(),
                summaries: intent.summaries.clone(),
            })?;
        }
        txn.commit().map_err(storage)?;
        if !intent.summaries.is_empty() {
            self.deltas_queued();
        }
        Ok(())
    }

    /// Completes or drops publications a crash interrupted: an intent whose file
    /// exists (per `exists`) is committed, others are dropped. Returns (completed,
    /// dropped).
    pub fn recover_intents(
        &self,
        exists: impl Fn(&str) -> bool,
        spooled: bool,
    ) -> Result<(usize, usize), IndexError> {
        let intents: Vec<PublishIntent> = self.decode_all(INTENTS)?;
        let (mut completed, mut dropped) = (0, 0);
        for intent in intents {
            if exists(&intent.entry.key) {
                self.commit_publish(&intent, Forget::default(), spooled)?;
                completed += 1;
            } else {
                let txn = self.begin_write()?;
                txn.open_table(INTENTS)
                    .map_err(storage)?
                    .remove(intent.entry.key.as_str())
                    .map_err(storage)?;
                txn.commit().map_err(storage)?;
                dropped += 1;
            }
        }
        Ok((completed, dropped))
    }

    /// Every value of a table keyed by string, decoded, in key order.
    fn decode_all<T: for<'de> Deserialize<'de>>(
        &self,
        table: redb::TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(table).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (key, value) = row.map_err(storage)?;
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// Experiments whose rows of WAL record `seq` in `partition` are published.
    pub fn published_experiments(
        &self,
        seq: u64,
        partition: &str,
    ) -> Result<Vec<String>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(PUBLISHED).map_err(storage)?;
        match table.get((seq, partition)).map_err(storage)? {
            Some(v) => decode("published piece", v.value()),
            None => Ok(Vec::new()),
        }
    }

    /// One past the highest WAL sequence number a published piece names (1 if
    /// none): the write-ahead log must number new records from at least here, or a
    /// new record could be taken for a published one at replay.
    pub fn next_unreferenced_seq(&self) -> Result<u64, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(PUBLISHED).map_err(storage)?;
        Ok(match table.last().map_err(storage)? {
            Some((key, _)) => key.value().0 + 1,
            None => 1,
        })
    }

    /// Forgets published pieces of WAL records below `seq`.
    pub fn forget_published_below(&self, seq: u64) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        txn.open_table(PUBLISHED)
            .map_err(storage)?
            .retain_in((0, "")..(seq, ""), |_, _| false)
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Files in the spool not yet confirmed uploaded, with their sizes, in key order.
    pub fn spooled(&self) -> Result<Vec<(String, u64)>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(SPOOLED).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (key, bytes) = row.map_err(storage)?;
            out.push((key.value().to_owned(), bytes.value()));
        }
        Ok(out)
    }

    /// Whether a file waits in the spool for its upload.
    pub fn is_spooled(&self, key: &str) -> Result<bool, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(SPOOLED).map_err(storage)?;
        Ok(table.get(key).map_err(storage)?.is_some())
    }

    /// Records that a spooled file's upload is confirmed.
    pub fn mark_uploaded(&self, key: &str) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        txn.open_table(SPOOLED)
            .map_err(storage)?
            .remove(key)
            .map_err(storage)?;
        release_awaiting(&txn, key)?;
        txn.commit().map_err(storage)
    }

    /// Published files of one table and namespace.
    pub fn files(&self, table: Table, namespace: &str) -> Result<Vec<FileEntry>, IndexError> {
        self.files_under(&format!("{}/namespace={}/", table.dir_name(), namespace))
    }

    /// Every published file, in key order (so grouped by partition).
    pub fn all_files(&self) -> Result<Vec<FileEntry>, IndexError> {
        self.files_under("")
    }

    fn files_under(&self, prefix: &str) -> Result<Vec<FileEntry>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let files = read.open_table(FILES).map_err(storage)?;
        let mut out = Vec::new();
        for row in files.range(prefix..).map_err(storage)? {
            let (key, value) = row.map_err(storage)?;
            if !key.value().starts_with(prefix) {
                break;
            }
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }

    /// The files of `table` in `namespace` that hold rows of `experiment`, with the
    /// row groups to read, in key order (oldest first within a partition).
    pub fn experiment_files(
        &self,
        table: Table,
        namespace: &str,
        experiment: &str,
    ) -> Result<Vec<FileRef>, IndexError> {
        let prefix = format!("{}/namespace={}/", table.dir_name(), namespace);
        let read = self.db.begin_read().map_err(storage)?;
        let index = read.open_table(FILE_EXPERIMENTS).map_err(storage)?;
        let mut out = Vec::new();
        for row in index
            .range((experiment, prefix.as_str())..)
            .map_err(storage)?
        {
            let (key, value) = row.map_err(storage)?;
            let (exp, file) = key.value();
            if exp != experiment || !file.starts_with(&prefix) {
                break;
            }
            let part: IndexedPart = decode(file, value.value())?;
            out.push(FileRef {
                entry: part.entry,
                row_groups: Some(part.part.row_groups),
            });
        }
        let unindexed = read.open_table(UNINDEXED).map_err(storage)?;
        if !unindexed.is_empty().map_err(storage)? {
            let files = read.open_table(FILES).map_err(storage)?;
            for row in unindexed.range(prefix.as_str()..).map_err(storage)? {
                let (key, _) = row.map_err(storage)?;
                if !key.value().starts_with(&prefix) {
                    break;
                }
                if let Some(v) = files.get(key.value()).map_err(storage)? {
                    let entry: FileEntry = decode(key.value(), v.value())?;
                    if entry.may_contain(experiment) {
                        out.push(FileRef {
                            entry,
                            row_groups: None,
                        });
                    }
                }
            }
        }
        out.sort_by(|a, b| a.entry.key.cmp(&b.entry.key));
        Ok(out)
    }

    /// Where each experiment's rows are in a file; `None` for a file published
    /// before the experiment index existed.
    pub fn file_experiments(
        &self,
        key: &str,
    ) -> Result<Option<Vec<(String, FilePart)>>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        if read
            .open_table(UNINDEXED)
            .map_err(storage)?
            .get(key)
            .map_err(storage)?
            .is_some()
        {
            return Ok(None);
        }
        let rev = read.open_table(FILE_EXPERIMENTS_REV).map_err(storage)?;
        let index = read.open_table(FILE_EXPERIMENTS).map_err(storage)?;
        let mut out = Vec::new();
        for experiment in prefix_keys(&rev, key)? {
            if let Some(v) = index.get((experiment.as_str(), key)).map_err(storage)? {
                let part: IndexedPart = decode(key, v.value())?;
                out.push((experiment, part.part));
            }
        }
        Ok(Some(out))
    }

    /// Durably records a replacement about to happen: its outputs may appear in
    /// storage from now on.
    pub fn begin_replace(&self, intent: &ReplaceIntent) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        txn.open_table(REPLACE_INTENTS)
            .map_err(storage)?
            .insert(intent.id.as_str(), encode(intent).as_slice())
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Swaps the intent's inputs for its outputs in one transaction: the outputs
    /// join the manifest (and the spool when `spooled`), the inputs leave it and
    /// are queued for deletion. Returns the input keys that were still in the
    /// manifest.
    ///
    /// A replacement with outputs swaps only while every input is still listed.
    /// One is not when another replacement of the same files committed first
    /// (a swap whose commit failed is finished at the next start, after a later
    /// pass may have compacted its inputs again) or retention expired them: its
    /// outputs would then hold rows twice, or revive rows that are gone. Such a
    /// replacement is dropped instead (committed like
    /// [`abandon_replace`](Self::abandon_replace)) and answered with
    /// [`IndexError::StaleReplacement`].
    pub fn commit_replace(
        &self,
        intent: &ReplaceIntent,
        spooled: bool,
    ) -> Result<Vec<String>, IndexError> {
        let _serial = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let txn = self.begin_write()?;
        if !intent.outputs.is_empty() {
            let files = txn.open_table(FILES).map_err(storage)?;
            let mut missing = None;
            for key in &intent.inputs {
                if files.get(key.as_str()).map_err(storage)?.is_none() {
                    missing = Some(key.clone());
                    break;
                }
            }
            drop(files);
            if let Some(missing) = missing {
                abandon(&txn, intent)?;
                txn.commit().map_err(storage)?;
                return Err(IndexError::StaleReplacement {
                    id: intent.id.clone(),
                    missing,
                });
            }
        }
        let mut removed = Vec::new();
        {
            for (entry, experiments) in &intent.outputs {
                insert_file(&txn, entry, experiments)?;
                if spooled {
                    txn.open_table(SPOOLED)
                        .map_err(storage)?
                        .insert(entry.key.as_str(), entry.bytes)
                        .map_err(storage)?;
                }
            }
            for key in &intent.inputs {
                if remove_file(&txn, key)?.is_some() {
                    removed.push(key.clone());
                }
            }
            // With the change log on, the inputs are deleted once readers can
            // know they are gone (the change is shipped), not before.
            let entry = self.log_change(&txn, || Change::Replace {
                added: intent.outputs.clone(),
                removed: intent.inputs.clone(),
            })?;
            let uploading: Vec<&str> = if spooled {
                intent.outputs.iter().map(|(e, _)| e.key.as_str()).collect()
            } else {
                Vec::new()
            };
            self.queue_deletions(&txn, entry, &intent.inputs, &uploading)?;
            txn.open_table(REPLACE_INTENTS)
                .map_err(storage)?
                .remove(intent.id.as_str())
                .map_err(storage)?;
        }
        // Before the commit: once a reader's manifest lacks them, it knows.
        self.removed.note(&intent.inputs);
        txn.commit().map_err(storage)?;
        Ok(removed)
    }

    /// Drops a replacement that will not happen (its outputs are to be deleted).
    pub fn abandon_replace(&self, intent: &ReplaceIntent) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        abandon(&txn, intent)?;
        txn.commit().map_err(storage)
    }

    /// Replacements a crash interrupted.
    pub fn replace_intents(&self) -> Result<Vec<ReplaceIntent>, IndexError> {
        self.decode_all(REPLACE_INTENTS)
    }

    /// Objects no longer in the manifest that are still to be deleted.
    pub fn deletions(&self) -> Result<Vec<String>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(DELETIONS).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            out.push(row.map_err(storage)?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Records that an object is deleted from storage.
    pub fn deleted(&self, key: &str) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        txn.open_table(DELETIONS)
            .map_err(storage)?
            .remove(key)
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }
}
