//! The embedded index (redb): experiments, metadata, and the manifest of published
//! files. Small and transactional; the metric and event firehose never touches it.
//!
//! Tables:
//! - `experiments`: id → [`ExperimentRecord`] (JSON)
//! - `experiments_by_namespace`: (namespace, id) → ()
//! - `metadata`: (parent id, key) → [`MetadataEntry`] (JSON)
//! - `files`: object key → [`FileEntry`] (JSON); keys start with the partition
//!   folder, so a prefix scan lists one table's files for one namespace.
//! - `publish_intents`: object key → [`PublishIntent`] (JSON), written before a file
//!   is renamed into place and removed with the manifest entry.
//! - `published_pieces`: (WAL seq, partition folder) → experiment ids (JSON) whose
//!   rows of that record are in a published file; replay skips them. Entries below
//!   the oldest WAL segment on disk are forgotten.
//! - `spooled`: object key → size in bytes, for files published into the local
//!   spool and not yet confirmed uploaded to the remote store (S3 roots only).
//!
//! Exactly-once publication: intent (durable) → rename → manifest entry, published
//! pieces and intent removal in one transaction. After a crash, an intent whose file
//! exists is completed, and one whose file does not is dropped (its rows replay from
//! the WAL). So every file on disk is in the manifest, and every WAL record's rows
//! are published once. That needs WAL sequence numbers that are never reused while
//! a piece names them: the log is opened numbering from at least
//! [`Index::next_unreferenced_seq`], since it may hold no file to remember by.
//!
//! With an S3 root, "published" means finished in the spool: the manifest entry
//! and a `spooled` entry are written together, the WAL records are released, and
//! the upload happens later. The object key is fixed at that moment, so an upload
//! retried after any failure overwrites the same object with the same bytes: never a
//! duplicate. The `spooled` entry is removed only after the upload is confirmed, and
//! the local file only after that.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::model::{ExperimentRecord, ExperimentRef, Micros, experiment_id, now_micros};
use crate::paths::{ObjectKey, Table};

const EXPERIMENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("experiments");
const EXPERIMENTS_BY_NS: TableDefinition<(&str, &str), ()> =
    TableDefinition::new("experiments_by_namespace");
const METADATA: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("metadata");
const FILES: TableDefinition<&str, &[u8]> = TableDefinition::new("files");
const INTENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("publish_intents");
const PUBLISHED: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("published_pieces");
const SPOOLED: TableDefinition<&str, u64> = TableDefinition::new("spooled");

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
}

fn storage<E: Into<redb::Error>>(e: E) -> IndexError {
    IndexError::Storage(Box::new(e.into()))
}

/// One stored metadata value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataEntry {
    pub value: serde_json::Value,
    pub updated_at: Micros,
}

/// A published Parquet file, as recorded in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileEntry {
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    /// Smallest and largest experiment id in the file, for pruning reads.
    pub min_experiment: String,
    pub max_experiment: String,
    pub created_at: Micros,
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
}

/// A file about to be published, and the WAL pieces it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishIntent {
    pub entry: FileEntry,
    /// The partition folder, e.g. `metrics/namespace=cv/date=2026-11-26`.
    pub partition: String,
    /// (WAL seq, experiment id) pieces in the file, sorted and distinct.
    pub pieces: Vec<(u64, String)>,
}

/// Fields of a CreateExperiment request, validated.
#[derive(Debug, Clone)]
pub struct NewExperiment {
    pub name: String,
    pub namespace: String,
    pub owner: String,
    pub framework: i32,
    pub task: String,
    pub external_id: String,
}

/// The embedded index. Cheap to share behind an `Arc`; every method is blocking
/// (call it from a blocking thread when on the async runtime).
#[derive(Debug)]
pub struct Index {
    db: Database,
    /// Experiments by id, for the per-request existence check on the hot path.
    known: RwLock<HashMap<String, ExperimentRef>>,
    /// Bumped by every change to experiments or metadata, so the snapshot tables
    /// are rewritten only when something changed.
    generation: AtomicU64,
}

impl Index {
    /// Opens (or creates) the index at `path` and loads the experiment cache.
    pub fn open(path: &Path) -> Result<Self, IndexError> {
        let db = Database::create(path).map_err(storage)?;
        let txn = db.begin_write().map_err(storage)?;
        {
            // Create every table so read transactions never meet a missing one.
            txn.open_table(EXPERIMENTS).map_err(storage)?;
            txn.open_table(EXPERIMENTS_BY_NS).map_err(storage)?;
            txn.open_table(METADATA).map_err(storage)?;
            txn.open_table(FILES).map_err(storage)?;
            txn.open_table(INTENTS).map_err(storage)?;
            txn.open_table(PUBLISHED).map_err(storage)?;
            txn.open_table(SPOOLED).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;

        let mut known = HashMap::new();
        let read = db.begin_read().map_err(storage)?;
        let table = read.open_table(EXPERIMENTS).map_err(storage)?;
        for row in table.iter().map_err(storage)? {
            let (id, value) = row.map_err(storage)?;
            let record: ExperimentRecord = decode(id.value(), value.value())?;
            known.insert(record.id.clone(), experiment_ref(&record));
        }
        Ok(Self {
            db,
            known: RwLock::new(known),
            generation: AtomicU64::new(0),
        })
    }

    /// The write path's view of an experiment, from memory.
    pub fn experiment_ref(&self, id: &str) -> Option<ExperimentRef> {
        let known = self.known.read().unwrap_or_else(|p| p.into_inner());
        known.get(id).cloned()
    }

    /// Creates the experiment unless it exists; writes `metadata` either way.
    /// Returns the record and whether it already existed.
    pub fn create_experiment(
        &self,
        new: NewExperiment,
        metadata: &[(String, serde_json::Value)],
    ) -> Result<(ExperimentRecord, bool), IndexError> {
        let id = experiment_id(&new.namespace, &new.name, &new.owner, &new.external_id);
        let now = now_micros();
        let txn = self.db.begin_write().map_err(storage)?;
        let (record, existed) = {
            let mut experiments = txn.open_table(EXPERIMENTS).map_err(storage)?;
            let existing = match experiments.get(id.as_str()).map_err(storage)? {
                Some(v) => Some(decode::<ExperimentRecord>(&id, v.value())?),
                None => None,
            };
            match existing {
                Some(mut record) => {
                    if !metadata.is_empty() {
                        record.updated_at = now;
                        experiments
                            .insert(id.as_str(), encode(&record).as_slice())
                            .map_err(storage)?;
                    }
                    (record, true)
                }
                None => {
                    let record = ExperimentRecord {
                        id: id.clone(),
                        name: new.name,
                        namespace: new.namespace,
                        owner: new.owner,
                        framework: new.framework,
                        task: new.task,
                        external_id: new.external_id,
                        created_at: now,
                        updated_at: now,
                    };
                    experiments
                        .insert(id.as_str(), encode(&record).as_slice())
                        .map_err(storage)?;
                    txn.open_table(EXPERIMENTS_BY_NS)
                        .map_err(storage)?
                        .insert((record.namespace.as_str(), id.as_str()), ())
                        .map_err(storage)?;
                    (record, false)
                }
            }
        };
        write_metadata(&txn, &id, metadata, now)?;
        txn.commit().map_err(storage)?;
        if !existed || !metadata.is_empty() {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        if !existed {
            let mut known = self.known.write().unwrap_or_else(|p| p.into_inner());
            known.insert(id, experiment_ref(&record));
        }
        Ok((record, existed))
    }

    pub fn get_experiment(&self, id: &str) -> Result<Option<ExperimentRecord>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(EXPERIMENTS).map_err(storage)?;
        match table.get(id).map_err(storage)? {
            Some(v) => Ok(Some(decode(id, v.value())?)),
            None => Ok(None),
        }
    }

    /// Experiments of a namespace, ordered by id.
    pub fn list_experiments(&self, namespace: &str) -> Result<Vec<ExperimentRecord>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let by_ns = read.open_table(EXPERIMENTS_BY_NS).map_err(storage)?;
        let experiments = read.open_table(EXPERIMENTS).map_err(storage)?;
        let mut out = Vec::new();
        for row in by_ns.range((namespace, "")..).map_err(storage)? {
            let (key, _) = row.map_err(storage)?;
            let (ns, id) = key.value();
            if ns != namespace {
                break;
            }
            if let Some(v) = experiments.get(id).map_err(storage)? {
                out.push(decode(id, v.value())?);
            }
        }
        Ok(out)
    }

    /// Merges `entries` into the metadata of `parent_id`, which must be an
    /// experiment. Returns the update time.
    pub fn update_metadata(
        &self,
        parent_id: &str,
        entries: &[(String, serde_json::Value)],
    ) -> Result<Micros, IndexError> {
        let now = now_micros();
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut experiments = txn.open_table(EXPERIMENTS).map_err(storage)?;
            let mut record: ExperimentRecord = match experiments.get(parent_id).map_err(storage)? {
                Some(v) => decode(parent_id, v.value())?,
                None => return Err(IndexError::ExperimentNotFound(parent_id.to_owned())),
            };
            record.updated_at = now;
            experiments
                .insert(parent_id, encode(&record).as_slice())
                .map_err(storage)?;
        }
        write_metadata(&txn, parent_id, entries, now)?;
        txn.commit().map_err(storage)?;
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(now)
    }

    /// A number that changes whenever experiments or metadata change.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Every experiment, ordered by id.
    pub fn all_experiments(&self) -> Result<Vec<ExperimentRecord>, IndexError> {
        self.decode_all(EXPERIMENTS)
    }

    /// Every record of a table of JSON values keyed by string, in key order.
    fn decode_all<T: for<'de> Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
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

    /// Every metadata entry as (experiment id, key, entry), ordered by both.
    pub fn all_metadata(&self) -> Result<Vec<(String, String, MetadataEntry)>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(METADATA).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            let (key, value) = row.map_err(storage)?;
            let (parent, k) = key.value();
            out.push((parent.to_owned(), k.to_owned(), decode(k, value.value())?));
        }
        Ok(out)
    }

    /// All metadata of `parent_id`, ordered by key.
    pub fn list_metadata(
        &self,
        parent_id: &str,
    ) -> Result<Vec<(String, MetadataEntry)>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(METADATA).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.range((parent_id, "")..).map_err(storage)? {
            let (key, value) = row.map_err(storage)?;
            let (parent, k) = key.value();
            if parent != parent_id {
                break;
            }
            out.push((k.to_owned(), decode(k, value.value())?));
        }
        Ok(out)
    }

    /// Durably records that `intent`'s file is about to be renamed into place.
    pub fn begin_publish(&self, intent: &PublishIntent) -> Result<(), IndexError> {
        let txn = self.db.begin_write().map_err(storage)?;
        txn.open_table(INTENTS)
            .map_err(storage)?
            .insert(intent.entry.key.as_str(), encode(intent).as_slice())
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Records the published file and its WAL pieces and drops the intent, in one
    /// transaction. Also forgets published pieces below `forget_below` (WAL records
    /// that no longer exist). `spooled`: the file waits in the spool for upload.
    pub fn commit_publish(
        &self,
        intent: &PublishIntent,
        forget_below: u64,
        spooled: bool,
    ) -> Result<(), IndexError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            if spooled {
                txn.open_table(SPOOLED)
                    .map_err(storage)?
                    .insert(intent.entry.key.as_str(), intent.entry.bytes)
                    .map_err(storage)?;
            }
            txn.open_table(FILES)
                .map_err(storage)?
                .insert(intent.entry.key.as_str(), encode(&intent.entry).as_slice())
                .map_err(storage)?;
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
            forget_published(&mut published, forget_below)?;
        }
        txn.commit().map_err(storage)
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
                self.commit_publish(&intent, 0, spooled)?;
                completed += 1;
            } else {
                let txn = self.db.begin_write().map_err(storage)?;
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
        let txn = self.db.begin_write().map_err(storage)?;
        forget_published(&mut txn.open_table(PUBLISHED).map_err(storage)?, seq)?;
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

    /// Records that a spooled file's upload is confirmed.
    pub fn mark_uploaded(&self, key: &str) -> Result<(), IndexError> {
        let txn = self.db.begin_write().map_err(storage)?;
        txn.open_table(SPOOLED)
            .map_err(storage)?
            .remove(key)
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// Published files of one table and namespace.
    pub fn files(&self, table: Table, namespace: &str) -> Result<Vec<FileEntry>, IndexError> {
        let prefix = format!("{}/namespace={}/", table.dir_name(), namespace);
        let read = self.db.begin_read().map_err(storage)?;
        let files = read.open_table(FILES).map_err(storage)?;
        let mut out = Vec::new();
        for row in files.range(prefix.as_str()..).map_err(storage)? {
            let (key, value) = row.map_err(storage)?;
            if !key.value().starts_with(&prefix) {
                break;
            }
            out.push(decode(key.value(), value.value())?);
        }
        Ok(out)
    }
}

fn write_metadata(
    txn: &redb::WriteTransaction,
    parent_id: &str,
    entries: &[(String, serde_json::Value)],
    now: Micros,
) -> Result<(), IndexError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut table = txn.open_table(METADATA).map_err(storage)?;
    for (key, value) in entries {
        let entry = MetadataEntry {
            value: value.clone(),
            updated_at: now,
        };
        table
            .insert((parent_id, key.as_str()), encode(&entry).as_slice())
            .map_err(storage)?;
    }
    Ok(())
}

fn forget_published(
    table: &mut redb::Table<(u64, &str), &[u8]>,
    below: u64,
) -> Result<(), IndexError> {
    if below == 0 {
        return Ok(());
    }
    let keys: Vec<(u64, String)> = table
        .range((0, "")..(below, ""))
        .map_err(storage)?
        .map(|row| row.map(|(k, _)| (k.value().0, k.value().1.to_owned())))
        .collect::<Result<_, _>>()
        .map_err(storage)?;
    for (seq, partition) in keys {
        table.remove((seq, partition.as_str())).map_err(storage)?;
    }
    Ok(())
}

fn experiment_ref(record: &ExperimentRecord) -> ExperimentRef {
    ExperimentRef {
        id: Arc::from(record.id.as_str()),
        namespace: Arc::from(record.namespace.as_str()),
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
    use serde_json::json;

    fn intent(key: &str, seq: u64) -> PublishIntent {
        PublishIntent {
            entry: FileEntry {
                key: key.into(),
                rows: 1,
                bytes: 10,
                min_experiment: "e".into(),
                max_experiment: "e".into(),
                created_at: 0,
            },
            partition: "metrics/namespace=a/date=2026-01-01".into(),
            pieces: vec![(seq, "e".into())],
        }
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

    fn new_exp(name: &str) -> NewExperiment {
        NewExperiment {
            name: name.into(),
            namespace: "cv".into(),
            owner: "o".into(),
            framework: 1,
            task: String::new(),
            external_id: String::new(),
        }
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
                },
                partition: "metrics/namespace=cv/date=2026-01-01".into(),
                pieces: vec![(5, id.clone()), (6, id.clone())],
            };
            index.begin_publish(&intent).unwrap();
            index.commit_publish(&intent, 0, true).unwrap();
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
        assert!(index.experiment_ref(&id).is_some());
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
}
