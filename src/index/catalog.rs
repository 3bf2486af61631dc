//! The catalog: experiments, their metadata, metric summaries and recent client
//! batch ids.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, ReadableTable, ReadableTableMetadata, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::changes::{Change, meta_get};
use super::journal::{self, CatalogJournal, Durable, FileSync, JournalRecord};
use super::{
    BATCH_IDS, CATALOG_CLOCK, CATALOG_FILES, DIRTY, EXPERIMENTS, EXPERIMENTS_BY_NS, Index,
    IndexError, JOURNAL_SEQ, META, METADATA, MetadataEntry, OLD_DIRTY, OLD_EXPERIMENTS_BY_NS,
    OLD_SEARCH, REBUILD_PENDING, SEARCH, SUMMARIES, SUMMARY_DELTA_NUMBERS, SUMMARY_DELTAS,
    begin_write, decode, encode, search, storage,
};
use crate::model::{
    ExperimentRecord, ExperimentRef, MetricSummary, Micros, experiment_id, now_micros,
};

/// Experiments kept in the cache at most.
pub(super) const CACHE_ENTRIES: usize = 65_536;
const CACHE_SHARDS: usize = 16;

/// A bounded cache of experiment handles, for the existence check every write
/// makes. When a shard is full it is emptied: simple, O(1), and a cold entry costs
/// only one index lookup to bring back.
#[derive(Debug)]
pub struct ExperimentCache {
    shards: Vec<RwLock<HashMap<Box<str>, ExperimentRef>>>,
    per_shard: usize,
}

impl ExperimentCache {
    pub fn new(entries: usize) -> Self {
        Self {
            shards: (0..CACHE_SHARDS)
                .map(|_| RwLock::new(HashMap::new()))
                .collect(),
            per_shard: (entries / CACHE_SHARDS).max(1),
        }
    }

    fn shard(&self, id: &str) -> &RwLock<HashMap<Box<str>, ExperimentRef>> {
        let h = id
            .bytes()
            .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
        &self.shards[h as usize % CACHE_SHARDS]
    }

    fn get(&self, id: &str) -> Option<ExperimentRef> {
        let shard = self.shard(id).read().unwrap_or_else(|p| p.into_inner());
        shard.get(id).cloned()
    }

    fn insert(&self, r: ExperimentRef) {
        let mut shard = self.shard(&r.id).write().unwrap_or_else(|p| p.into_inner());
        if shard.len() >= self.per_shard {
            shard.clear();
        }
        shard.insert(Box::from(&*r.id), r);
    }
}

/// Commits `txn` without a sync (and so without quick repair's saved state):
/// for journaled batches only. Every other commit is durable, which the
/// journal's replay relies on (see [`super::journal`]).
fn without_sync(txn: &mut WriteTransaction) {
    txn.set_durability(redb::Durability::None);
    txn.set_quick_repair(false);
}

/// How a batch of creations is committed.
enum Commit<'j> {
    /// Durably, by itself.
    Durable,
    /// Through the journal (see [`super::journal`]).
    Journaled(&'j mut CatalogJournal),
    /// Written again from the journal after a crash, at its first time.
    Replay { seq: u64, now: Micros },
}

/// Fields of a CreateExperiment request, validated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NewExperiment {
    pub name: String,
    pub namespace: String,
    pub owner: String,
    pub framework: i32,
    pub task: String,
    pub external_id: String,
}

fn experiment_ref(record: &ExperimentRecord) -> ExperimentRef {
    ExperimentRef {
        id: Arc::from(record.id.as_str()),
        namespace: Arc::from(record.namespace.as_str()),
    }
}

impl Index {
    /// The write path's view of an experiment: from the cache, else the index.
    pub fn experiment_ref(&self, id: &str) -> Result<Option<ExperimentRef>, IndexError> {
        if let Some(r) = self.cache.get(id) {
            return Ok(Some(r));
        }
        let Some(record) = self.get_experiment(id)? else {
            return Ok(None);
        };
        let r = experiment_ref(&record);
        self.cache.insert(r.clone());
        Ok(Some(r))
    }

    /// Creates the experiment unless it exists; writes `metadata` either way.
    /// Returns the record and whether it already existed.
    pub fn create_experiment(
        &self,
        new: NewExperiment,
        metadata: &[(String, serde_json::Value)],
    ) -> Result<(ExperimentRecord, bool), IndexError> {
        let mut out = self.create_experiments(vec![(new, metadata.to_vec())])?;
        out.pop()
            .ok_or_else(|| IndexError::ExperimentNotFound(String::new()))
    }

    /// Creates experiments (unless they exist) and writes their metadata, in one
    /// transaction: concurrent CreateExperiment calls share one commit.
    ///
    /// The batch is written in id order, and its search entries in key order
    /// ([`search::SearchUpdates`]), so each index page changes in one visit. An id
    /// repeated in the batch finds the experiment as its previous occurrence left
    /// it, as it would have in arrival order. Results come back in arrival order.
    #[allow(clippy::type_complexity)]
    pub fn create_experiments(
        &self,
        batch: Vec<(NewExperiment, Vec<(String, serde_json::Value)>)>,
    ) -> Result<Vec<(ExperimentRecord, bool)>, IndexError> {
        self.create_batch(batch, Commit::Durable)
            .map(|(created, _)| created)
    }

    /// [`Index::create_experiments`] through the catalog journal: durable once the
    /// returned [`Durable`] says (see [`super::journal`]).
    #[allow(clippy::type_complexity)]
    pub fn create_journaled(
        &self,
        batch: Vec<(NewExperiment, Vec<(String, serde_json::Value)>)>,
        journal: &mut CatalogJournal,
    ) -> Result<(Vec<(ExperimentRecord, bool)>, Durable), IndexError> {
        self.create_batch(batch, Commit::Journaled(journal))
    }

    /// Replays the journal at `path` after a crash: the batches after the last
    /// durable commit are written again as they were (see [`super::journal`]).
    /// Returns the journal, emptied, to append to, and how many batches it
    /// replayed.
    pub fn open_journal(&self, path: &Path) -> Result<(CatalogJournal, usize), IndexError> {
        let (batches, torn) = journal::read_journal(path)?;
        if torn > 0 {
            tracing::warn!(
                bytes = torn,
                path = %path.display(),
                "the catalog journal ends in a torn record (a crash mid-append); it was never acknowledged"
            );
        }
        let read = self.db.begin_read().map_err(storage)?;
        let mut seq = meta_get(&read.open_table(META).map_err(storage)?, JOURNAL_SEQ)?.unwrap_or(0);
        drop(read);
        let mut replayed = 0;
        for b in batches {
            if b.seq <= seq {
                continue;
            }
            seq = b.seq;
            self.create_batch(b.batch, Commit::Replay { seq, now: b.now })?;
            replayed += 1;
        }
        if replayed > 0 {
            // The replayed batches were committed without a sync: this makes
            // them durable before the journal that holds them is emptied.
            self.begin_write()?.commit().map_err(storage)?;
        }
        Ok((CatalogJournal::create(path, seq)?, replayed))
    }

    /// Makes every journaled batch durable with one durable commit, and empties
    /// the journal. The commit records the last batch's sequence number, so a
    /// record of a batch whose commit failed, if it could not be taken back,
    /// is never replayed.
    pub fn checkpoint_journal(&self, journal: &mut CatalogJournal) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        txn.open_table(META)
            .map_err(storage)?
            .insert(JOURNAL_SEQ, journal.seq())
            .map_err(storage)?;
        txn.commit().map_err(storage)?;
        journal.empty()
    }

    /// A handle that writes the index's file back (see [`super::journal`]), if
    /// it is in a file.
    pub fn writeback(&self) -> Result<Option<FileSync>, IndexError> {
        self.file
            .as_deref()
            .map(|path| {
                FileSync::open(path).map_err(journal::journal_err(
                    "opening the index to write back",
                    path,
                ))
            })
            .transpose()
    }

    #[allow(clippy::type_complexity)]
    fn create_batch(
        &self,
        batch: Vec<(NewExperiment, Vec<(String, serde_json::Value)>)>,
        mut commit: Commit<'_>,
    ) -> Result<(Vec<(ExperimentRecord, bool)>, Durable), IndexError> {
        struct Planned {
            arrival: usize,
            before: Option<ExperimentRecord>,
            record: ExperimentRecord,
            metadata: Vec<(String, serde_json::Value)>,
        }
        impl Planned {
            /// Whether the creation writes anything: a new experiment, or metadata.
            fn touches(&self) -> bool {
                self.before.is_none() || !self.metadata.is_empty()
            }
        }
        let mut jobs: Vec<(String, usize, NewExperiment, _)> = batch
            .into_iter()
            .enumerate()
            .map(|(arrival, (new, metadata))| {
                let id = experiment_id(&new.namespace, &new.name, &new.owner, &new.external_id);
                (id, arrival, new, metadata)
            })
            .collect();
        jobs.sort_unstable_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        let mut txn = self.begin_write()?;
        let (now, seq) = match &commit {
            Commit::Durable => (catalog_time(&txn)?, None),
            Commit::Journaled(journal) => (catalog_time(&txn)?, Some(journal.next_seq())),
            Commit::Replay { seq, now } => (*now, Some(*seq)),
        };
        // A journaled batch's record, framed, unless this commit is a checkpoint.
        let mut record = None;
        match &commit {
            Commit::Journaled(journal) if !journal.checkpoint_due() => {
                record = Some(journal::frame(&JournalRecord {
                    seq: journal.next_seq(),
                    now,
                    batch: jobs.iter().map(|(_, _, new, m)| (new, m)).collect(),
                })?);
                without_sync(&mut txn);
            }
            // The replay ends with a durable commit.
            Commit::Replay { .. } => without_sync(&mut txn),
            _ => {}
        }
        if let Some(seq) = seq {
            txn.open_table(META)
                .map_err(storage)?
                .insert(JOURNAL_SEQ, seq)
                .map_err(storage)?;
        }
        let mut planned: Vec<Planned> = Vec::with_capacity(jobs.len());
        let mut written = BTreeMap::new();
        {
            let mut t = CatalogTables::open(&txn, self.catalog_marks)?;
            for (id, arrival, new, metadata) in jobs {
                let before = match planned.last() {
                    Some(p) if p.record.id == id => Some(p.record.clone()),
                    _ => match t.experiments.get(id.as_str()).map_err(storage)? {
                        Some(v) => Some(decode::<ExperimentRecord>(&id, v.value())?),
                        None => None,
                    },
                };
                let record = match &before {
                    Some(old) => ExperimentRecord {
                        updated_at: if metadata.is_empty() {
                            old.updated_at
                        } else {
                            now
                        },
                        ..old.clone()
                    },
                    None => ExperimentRecord {
                        id,
                        name: new.name,
                        namespace: new.namespace,
                        owner: new.owner,
                        framework: new.framework,
                        task: new.task,
                        external_id: new.external_id,
                        created_at: now,
                        updated_at: now,
                    },
                };
                planned.push(Planned {
                    arrival,
                    before,
                    record,
                    metadata,
                });
            }
            let mut updates = search::SearchUpdates::default();
            for p in planned.iter().filter(|p| p.touches()) {
                if p.before.is_none() {
                    t.place(&p.record)?;
                }
                t.experiments
                    .insert(p.record.id.as_str(), encode(&p.record).as_slice())
                    .map_err(storage)?;
                updates.record(p.before.as_ref(), &p.record);
                t.write_metadata(&mut updates, &p.record, &p.metadata, now, &mut written)?;
                t.mark_dirty(&p.record.id)?;
            }
            updates.apply(&mut t.search)?;
        }
        let touched = || planned.iter().filter(|p| p.touches());
        let changed = touched().next().is_some();
        if changed {
            record_catalog_time(&txn, now)?;
            self.log_change(&txn, || Change::Catalog {
                experiments: touched().map(|p| p.record.clone()).collect(),
                // A key set twice in the batch (one experiment created twice)
                // is logged once, with the value the index keeps: the last.
                metadata: logged(written),
            })?;
        }
        let durable = match (&mut commit, record) {
            (Commit::Journaled(journal), Some(record)) => {
                // Appended right before the commit, so only a failed commit
                // leaves a record to take back.
                let before = journal.append(&record, seq.unwrap_or_default())?;
                if let Err(e) = txn.commit().map_err(storage) {
                    if let Err(rewind) = journal.rewind(before) {
                        tracing::warn!(error = %rewind, "a failed batch's record stays in the catalog journal");
                    }
                    return Err(e);
                }
                Durable::AfterSync
            }
            (Commit::Journaled(journal), None) => {
                txn.commit().map_err(storage)?;
                journal.advance(seq.unwrap_or_default());
                // Durable now: every record in the journal is at or before this
                // commit's sequence number, so one left behind is not replayed.
                if let Err(e) = journal.empty() {
                    tracing::warn!(error = %e, "the catalog journal could not be emptied");
                }
                Durable::Now
            }
            _ => {
                txn.commit().map_err(storage)?;
                Durable::Now
            }
        };
        if changed {
            self.bump_generation();
        }
        planned.sort_unstable_by_key(|p| p.arrival);
        let created = planned
            .into_iter()
            .map(|p| {
                self.cache.insert(experiment_ref(&p.record));
                (p.record, p.before.is_some())
            })
            .collect();
        Ok((created, durable))
    }

    pub fn get_experiment(&self, id: &str) -> Result<Option<ExperimentRecord>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(EXPERIMENTS).map_err(storage)?;
        match table.get(id).map_err(storage)? {
            Some(v) => Ok(Some(decode(id, v.value())?)),
            None => Ok(None),
        }
    }

    /// Experiments of a namespace, in creation order.
    pub fn list_experiments(&self, namespace: &str) -> Result<Vec<ExperimentRecord>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let by_ns = read.open_table(EXPERIMENTS_BY_NS).map_err(storage)?;
        let experiments = read.open_table(EXPERIMENTS).map_err(storage)?;
        let mut out = Vec::new();
        for row in by_ns.range((namespace, i64::MIN, "")..).map_err(storage)? {
            let (key, _) = row.map_err(storage)?;
            let (ns, _, id) = key.value();
            if ns != namespace {
                break;
            }
            if let Some(v) = experiments.get(id).map_err(storage)? {
                out.push(decode(id, v.value())?);
            }
        }
        Ok(out)
    }

    /// Every namespace that has an experiment, sorted.
    pub fn namespaces(&self) -> Result<Vec<String>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let by_ns = read.open_table(EXPERIMENTS_BY_NS).map_err(storage)?;
        let mut out: Vec<String> = Vec::new();
        let mut from = String::new();
        // Skip from namespace to namespace instead of walking every experiment.
        loop {
            let next = by_ns
                .range((from.as_str(), i64::MIN, "")..)
                .map_err(storage)?
                .next()
                .transpose()
                .map_err(storage)?;
            let Some((key, _)) = next else { break };
            let ns = key.value().0.to_owned();
            from = format!("{ns}\u{0}");
            if ns != search::ALL {
                out.push(ns);
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
        let txn = self.begin_write()?;
        let now = take_catalog_time(&txn)?;
        let mut written = BTreeMap::new();
        let record = {
            let mut t = CatalogTables::open(&txn, self.catalog_marks)?;
            let old: ExperimentRecord = match t.experiments.get(parent_id).map_err(storage)? {
                Some(v) => decode(parent_id, v.value())?,
                None => return Err(IndexError::ExperimentNotFound(parent_id.to_owned())),
            };
            let mut record = old.clone();
            record.updated_at = now;
            t.experiments
                .insert(parent_id, encode(&record).as_slice())
                .map_err(storage)?;
            let mut updates = search::SearchUpdates::default();
            updates.record(Some(&old), &record);
            t.write_metadata(&mut updates, &record, entries, now, &mut written)?;
            updates.apply(&mut t.search)?;
            t.mark_dirty(&record.id)?;
            record
        };
        self.log_change(&txn, || Change::Catalog {
            metadata: logged(written),
            experiments: vec![record],
        })?;
        txn.commit().map_err(storage)?;
        self.bump_generation();
        Ok(now)
    }

    /// How far (micros, 0 if not at all) the catalog clock's last time is ahead
    /// of the wall clock: the next write's time, were the lead to grow no more.
    pub fn catalog_clock_lead(&self) -> Result<Micros, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let last = stored_catalog_time(&read.open_table(META).map_err(storage)?)?;
        Ok(last.map_or(0, |last| last.saturating_sub(now_micros()).max(0)))
    }

    /// A time from the catalog clock for rows written outside the index (the
    /// snapshot tables' `written_at`), so a later snapshot's rows are later even
    /// after the wall clock went back.
    pub fn catalog_now(&self) -> Result<Micros, IndexError> {
        let txn = self.begin_write()?;
        let now = take_catalog_time(&txn)?;
        txn.commit().map_err(storage)?;
        Ok(now)
    }

    /// All metadata of `parent_id`, ordered by key.
    pub fn list_metadata(
        &self,
        parent_id: &str,
    ) -> Result<Vec<(String, MetadataEntry)>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(METADATA).map_err(storage)?;
        prefix_rows(&table, parent_id, |k, v| Ok((k.to_owned(), decode(k, v)?)))
    }

    /// The metric summaries of one experiment, ordered by key: every published
    /// file's, folded in yet or not ([`super::fold`]).
    pub fn summaries(&self, experiment: &str) -> Result<Vec<(String, MetricSummary)>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let folded = folded_summaries(&read, experiment)?;
        let numbers = read.open_table(SUMMARY_DELTA_NUMBERS).map_err(storage)?;
        if numbers.is_empty().map_err(storage)? {
            return Ok(folded);
        }
        let deltas = read.open_table(SUMMARY_DELTAS).map_err(storage)?;
        let mut all: BTreeMap<String, MetricSummary> = folded.into_iter().collect();
        self.pending_summaries
            .add_to(&numbers, &deltas, experiment, &mut all)?;
        Ok(all.into_iter().collect())
    }

    /// The summaries folded into `summaries` so far, without the waiting ones.
    #[cfg(test)]
    pub(super) fn folded_summaries(
        &self,
        experiment: &str,
    ) -> Result<Vec<(String, MetricSummary)>, IndexError> {
        folded_summaries(&self.db.begin_read().map_err(storage)?, experiment)
    }

    /// Client batch ids accepted at or after `since`, with their point counts.
    pub fn batch_ids_since(&self, since: Micros) -> Result<Vec<(String, Micros, u64)>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(BATCH_IDS).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.range((since, "")..).map_err(storage)? {
            let (key, points) = row.map_err(storage)?;
            let (at, id) = key.value();
            out.push((id.to_owned(), at, points.value()));
        }
        Ok(out)
    }
}

/// One experiment's rows of `summaries`, by key.
fn folded_summaries(
    read: &ReadTransaction,
    experiment: &str,
) -> Result<Vec<(String, MetricSummary)>, IndexError> {
    let table = read.open_table(SUMMARIES).map_err(storage)?;
    prefix_rows(&table, experiment, |k, v| Ok((k.to_owned(), decode(k, v)?)))
}

/// The rows of a `(parent, key)` table under one parent, decoded by `f`.
pub(super) fn prefix_rows<T>(
    table: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    parent: &str,
    f: impl Fn(&str, &[u8]) -> Result<T, IndexError>,
) -> Result<Vec<T>, IndexError> {
    let mut out = Vec::new();
    for row in table.range((parent, "")..).map_err(storage)? {
        let (key, value) = row.map_err(storage)?;
        let (p, k) = key.value();
        if p != parent {
            break;
        }
        out.push(f(k, value.value())?);
    }
    Ok(out)
}

/// The second halves of a `(parent, key) → ()` table's keys under one parent.
pub(super) fn prefix_keys(
    table: &impl ReadableTable<(&'static str, &'static str), ()>,
    parent: &str,
) -> Result<Vec<String>, IndexError> {
    let mut out = Vec::new();
    for row in table.range((parent, "")..).map_err(storage)? {
        let (key, _) = row.map_err(storage)?;
        let (p, k) = key.value();
        if p != parent {
            break;
        }
        out.push(k.to_owned());
    }
    Ok(out)
}

/// The catalog's tables, opened once for all of a write transaction's changes:
/// opening a redb table looks its root up, and dropping it writes the root back.
pub(super) struct CatalogTables<'txn> {
    pub(super) experiments: redb::Table<'txn, &'static str, &'static [u8]>,
    pub(super) by_namespace: redb::Table<'txn, (&'static str, i64, &'static str), ()>,
    pub(super) metadata: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    pub(super) summaries: redb::Table<'txn, (&'static str, &'static str), &'static [u8]>,
    pub(super) search: search::SearchTable<'txn>,
    pub(super) dirty: redb::Table<'txn, (u64, &'static str), ()>,
    /// Whether changes mark experiments (see `Index::catalog_marks`).
    marks: bool,
    /// This transaction's mark, once it made one.
    mark: Option<u64>,
}

impl<'txn> CatalogTables<'txn> {
    pub(super) fn open(txn: &'txn WriteTransaction, marks: bool) -> Result<Self, IndexError> {
        Ok(Self {
            experiments: txn.open_table(EXPERIMENTS).map_err(storage)?,
            by_namespace: txn.open_table(EXPERIMENTS_BY_NS).map_err(storage)?,
            metadata: txn.open_table(METADATA).map_err(storage)?,
            summaries: txn.open_table(SUMMARIES).map_err(storage)?,
            search: txn.open_table(SEARCH).map_err(storage)?,
            dirty: txn.open_table(DIRTY).map_err(storage)?,
            marks,
            mark: None,
        })
    }

    /// Lists a new experiment in its namespace and in every namespace's scope.
    pub(super) fn place(&mut self, record: &ExperimentRecord) -> Result<(), IndexError> {
        place(&mut self.by_namespace, record)
    }

    /// Moves an experiment whose creation time changed (a reader learnt of an
    /// earlier creation by another daemon): every entry that ends with it.
    pub(super) fn replace_created(
        &mut self,
        old: &ExperimentRecord,
        new: &ExperimentRecord,
    ) -> Result<(), IndexError> {
        let id = old.id.as_str();
        for scope in [old.namespace.as_str(), search::ALL] {
            self.by_namespace
                .remove((scope, old.created_at, id))
                .map_err(storage)?;
        }
        self.place(new)?;
        let params: Vec<(String, MetadataEntry)> =
            prefix_rows(&self.metadata, id, |k, v| Ok((k.to_owned(), decode(k, v)?)))?;
        let summaries: Vec<(String, MetricSummary)> = prefix_rows(&self.summaries, id, |k, v| {
            Ok((k.to_owned(), decode(k, v)?))
        })?;
        let (from, to) = (
            (old.namespace.as_str(), old.created_at, id),
            (new.namespace.as_str(), new.created_at, id),
        );
        let mut updates = search::SearchUpdates::default();
        for (key, e) in &params {
            updates.param_moved(from, to, key, &e.value);
        }
        for (key, s) in &summaries {
            updates.summary_moved(from, to, key, s);
        }
        updates.apply(&mut self.search)
    }

    /// Writes `entries` into `record`'s metadata, and their search entries into
    /// `updates`.
    fn write_metadata<'a>(
        &mut self,
        updates: &mut search::SearchUpdates<'a>,
        record: &'a ExperimentRecord,
        entries: &[(String, serde_json::Value)],
        now: Micros,
        written: &mut BTreeMap<(String, String), MetadataEntry>,
    ) -> Result<(), IndexError> {
        let parent_id = record.id.as_str();
        for (key, value) in entries {
            let entry = MetadataEntry {
                value: value.clone(),
                updated_at: now,
            };
            let old = self
                .metadata
                .insert((parent_id, key.as_str()), encode(&entry).as_slice())
                .map_err(storage)?
                .map(|v| decode::<MetadataEntry>(key, v.value()))
                .transpose()?;
            updates.param(
                (&record.namespace, record.created_at, parent_id),
                key,
                old.as_ref().map(|o| &o.value),
                value,
            );
            written.insert((parent_id.to_owned(), key.clone()), entry);
        }
        Ok(())
    }

    /// Experiment `id`'s namespace and creation time, if it exists.
    pub(super) fn placement_of(&self, id: &str) -> Result<Option<(String, Micros)>, IndexError> {
        Ok(self
            .experiments
            .get(id)
            .map_err(storage)?
            .map(|v| decode::<ExperimentRecord>(id, v.value()))
            .transpose()?
            .map(|r| (r.namespace, r.created_at)))
    }

    /// Marks an experiment's catalog rows out of date.
    ///
    /// A transaction's marks come after every mark already made, so the catalog
    /// writer, which reads marks from the first, can drop those it read (and
    /// only those) once it wrote their rows: a change made meanwhile has a later
    /// mark and stays. Once every mark is dropped they start again from 0.
    fn mark_dirty(&mut self, id: &str) -> Result<(), IndexError> {
        if !self.marks {
            return Ok(());
        }
        let mark = match self.mark {
            Some(mark) => mark,
            None => {
                let last = self.dirty.last().map_err(storage)?;
                let mark = last.map_or(0, |(k, _)| k.value().0.saturating_add(1));
                *self.mark.insert(mark)
            }
        };
        self.dirty.insert((mark, id), ()).map_err(storage)?;
        Ok(())
    }
}

/// Experiments listed and indexed per transaction of a rebuild.
pub(super) const REBUILD_CHUNK: usize = 10_000;

/// Lists every experiment by scope and indexes it for search anew, then drops the
/// id-keyed tables of earlier releases and the [`REBUILD_PENDING`] mark.
///
/// The emptied tables are committed first, so their pages are free for the new
/// entries, and the experiments follow in transactions of `chunk`, one
/// at a time from the tables: neither the file nor memory grows with the
/// catalogue beyond what the entries take. A crash part-way leaves the mark (or
/// the earlier tables), and the next start rebuilds from the beginning.
pub(super) fn rebuild_listings(db: &Database, chunk: usize) -> Result<(), IndexError> {
    let txn = begin_write(db)?;
    txn.delete_table(EXPERIMENTS_BY_NS).map_err(storage)?;
    txn.delete_table(SEARCH).map_err(storage)?;
    txn.open_table(EXPERIMENTS_BY_NS).map_err(storage)?;
    txn.open_table(SEARCH).map_err(storage)?;
    txn.commit().map_err(storage)?;

    let mut after: Option<String> = None;
    loop {
        let txn = begin_write(db)?;
        let (listed, last) = {
            // Rebuilding the listings changes no experiment: it marks none.
            let mut t = CatalogTables::open(&txn, false)?;
            let from = after.as_deref().map_or(Bound::Unbounded, Bound::Excluded);
            let mut listed = 0;
            let mut last = None;
            for row in t
                .experiments
                .range::<&str>((from, Bound::Unbounded))
                .map_err(storage)?
                .take(chunk)
            {
                let (k, v) = row.map_err(storage)?;
                let record: ExperimentRecord = decode(k.value(), v.value())?;
                place(&mut t.by_namespace, &record)?;
                search::index_experiment(&mut t.search, &t.metadata, &t.summaries, &record)?;
                listed += 1;
                last = Some(k.value().to_owned());
            }
            (listed, last)
        };
        txn.commit().map_err(storage)?;
        after = last;
        if listed < chunk {
            break;
        }
    }

    let txn = begin_write(db)?;
    txn.delete_table(OLD_EXPERIMENTS_BY_NS).map_err(storage)?;
    txn.delete_table(OLD_SEARCH).map_err(storage)?;
    txn.open_table(META)
        .map_err(storage)?
        .remove(REBUILD_PENDING)
        .map_err(storage)?;
    txn.commit().map_err(storage)
}

/// The metadata a transaction wrote, as the change log lists it: each key once,
/// with the value the index kept (the last).
fn logged(
    written: BTreeMap<(String, String), MetadataEntry>,
) -> Vec<(String, String, MetadataEntry)> {
    written
        .into_iter()
        .map(|((id, key), entry)| (id, key, entry))
        .collect()
}

/// The time of a catalog write: the wall clock, or just after the last
/// write's (kept in `meta`) if the clock stands still or went back, restarts
/// included. So every write of a record or a metadata key is later than the one
/// it replaces, and a change-log reader, which keeps the later, keeps what this
/// index keeps.
///
/// Only read here: [`record_catalog_time`] keeps it once the transaction
/// writes something.
fn catalog_time(txn: &WriteTransaction) -> Result<Micros, IndexError> {
    let last = stored_catalog_time(&txn.open_table(META).map_err(storage)?)?;
    let wall = now_micros();
    let Some(last) = last else { return Ok(wall) };
    let now = wall.max(last.saturating_add(1));
    warn_of_lead(now.saturating_sub(wall));
    Ok(now)
}

/// The last catalog write's time, if the clock was started.
fn stored_catalog_time(
    meta: &impl ReadableTable<&'static str, u64>,
) -> Result<Option<Micros>, IndexError> {
    Ok(meta
        .get(CATALOG_CLOCK)
        .map_err(storage)?
        .map(|v| i64::try_from(v.value()).unwrap_or(i64::MAX)))
}

/// A lead of the catalog clock over the wall clock worth a warning.
const NOTABLE_LEAD: Micros = 1_000_000;

/// When the last lead warning was given, to give one a minute (a monotonic
/// clock: the wall clock is what is in doubt).
static LEAD_WARNED_AT: Mutex<Option<Instant>> = Mutex::new(None);

/// Warns, at most once a minute, that catalog times are pinned ahead of the wall
/// clock: every write is stamped just after the last one until the wall clock
/// catches up, which a clock set forward by mistake and then back can make years.
fn warn_of_lead(lead: Micros) {
    if lead < NOTABLE_LEAD {
        return;
    }
    let mut warned_at = LEAD_WARNED_AT.lock().unwrap_or_else(|p| p.into_inner());
    if warned_at.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
        *warned_at = Some(Instant::now());
        tracing::warn!(
            lead_seconds = lead as f64 / 1e6,
            "the catalog clock is ahead of the wall clock: creation and update times are \
             stamped just after the last write's until the wall clock catches up (was the \
             system clock set back?)"
        );
    }
}

/// The catalog time of a transaction that writes, kept as the last one.
fn take_catalog_time(txn: &WriteTransaction) -> Result<Micros, IndexError> {
    let now = catalog_time(txn)?;
    record_catalog_time(txn, now)?;
    Ok(now)
}

/// Keeps `now` as the last catalog write's time.
fn record_catalog_time(txn: &WriteTransaction, now: Micros) -> Result<(), IndexError> {
    txn.open_table(META)
        .map_err(storage)?
        .insert(CATALOG_CLOCK, u64::try_from(now).unwrap_or(0))
        .map_err(storage)?;
    Ok(())
}

/// Starts the catalog clock of an index an earlier release wrote, which kept
/// none: just after the latest `updated_at` (its search entry, in
/// milliseconds, is the last of its field), so no write goes behind one of
/// those even if the wall clock went back since.
pub(super) fn seed_catalog_clock(db: &Database) -> Result<(), IndexError> {
    let txn = begin_write(db)?;
    let seed = {
        let search = txn.open_table(SEARCH).map_err(storage)?;
        let field = (search::ALL, "updated_at");
        let latest = search
            .range(
                (field.0, field.1, &[][..], i64::MIN, "")
                    ..(field.0, "updated_at\0", &[][..], i64::MIN, ""),
            )
            .map_err(storage)?
            .next_back()
            .transpose()
            .map_err(storage)?
            .map(|(k, _)| search::decode_value(k.value().2));
        match latest {
            Some(crate::search::Value::Number(millis)) => {
                (millis as i64).saturating_mul(1000).saturating_add(999)
            }
            _ => 0,
        }
    };
    record_catalog_time(&txn, seed)?;
    txn.commit().map_err(storage)
}

/// Lists an experiment in its namespace and in every namespace's scope.
fn place(
    by_scope: &mut redb::Table<'_, (&'static str, i64, &'static str), ()>,
    record: &ExperimentRecord,
) -> Result<(), IndexError> {
    for scope in [record.namespace.as_str(), search::ALL] {
        by_scope
            .insert((scope, record.created_at, record.id.as_str()), ())
            .map_err(storage)?;
    }
    Ok(())
}

/// Marks every experiment for the catalog tables (an index from before they were
/// written incrementally).
pub(super) fn mark_all_dirty(txn: &WriteTransaction) -> Result<(), IndexError> {
    mark_every_key(txn, EXPERIMENTS)
}

/// Moves the marks an earlier release kept by id into [`DIRTY`] and drops its
/// table.
pub(super) fn move_old_dirty_marks(txn: &WriteTransaction) -> Result<(), IndexError> {
    mark_every_key(txn, OLD_DIRTY)?;
    txn.delete_table(OLD_DIRTY).map_err(storage)?;
    Ok(())
}

/// Marks every experiment id `table` is keyed by, with mark 0: before any mark
/// made since, all of which a writer will take after these.
fn mark_every_key<V: redb::Value + 'static>(
    txn: &WriteTransaction,
    table: redb::TableDefinition<&str, V>,
) -> Result<(), IndexError> {
    let ids = txn.open_table(table).map_err(storage)?;
    let mut dirty = txn.open_table(DIRTY).map_err(storage)?;
    for row in ids.iter().map_err(storage)? {
        dirty
            .insert((0, row.map_err(storage)?.0.value()), ())
            .map_err(storage)?;
    }
    Ok(())
}

/// A page of experiments whose catalog rows are out of date: their rows as they
/// are now, and how far the marks read go.
#[derive(Debug)]
pub struct DirtyCatalog {
    pub rows: Vec<CatalogRows>,
    /// The marks read, in order; [`Index::catalog_written`] drops them.
    pub(super) marks: Vec<(u64, String)>,
    /// Whether marks are left after this page.
    pub more: bool,
}

impl DirtyCatalog {
    /// Whether the page read no mark: nothing is out of date.
    pub fn is_empty(&self) -> bool {
        self.marks.is_empty()
    }
}

/// Marks a page of [`Index::dirty_catalog`] reads at most, per experiment it may
/// hold: an experiment marked again and again while the writer could not write
/// (each publish marks its experiments) takes one row, not a page each.
const MARKS_PER_ROW: usize = 16;

/// An experiment's rows in the catalog tables.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogRows {
    pub record: ExperimentRecord,
    pub metadata: Vec<(String, MetadataEntry)>,
    pub summaries: Vec<(String, MetricSummary)>,
}

impl Index {
    /// Up to `limit` experiments whose catalog rows are out of date, first
    /// marked first, with those rows (and every mark read for them, up to
    /// [`MARKS_PER_ROW`] times `limit`).
    pub fn dirty_catalog(&self, limit: usize) -> Result<DirtyCatalog, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let dirty = read.open_table(DIRTY).map_err(storage)?;
        let mut ids = BTreeSet::new();
        let mut marks = Vec::new();
        let mut more = false;
        for row in dirty.iter().map_err(storage)? {
            let (key, _) = row.map_err(storage)?;
            let (mark, id) = key.value();
            if marks.len() >= limit.saturating_mul(MARKS_PER_ROW)
                || (ids.len() >= limit && !ids.contains(id))
            {
                more = true;
                break;
            }
            ids.insert(id.to_owned());
            marks.push((mark, id.to_owned()));
        }
        Ok(DirtyCatalog {
            rows: self.catalog_rows(&read, ids.into_iter().collect())?,
            marks,
            more,
        })
    }

    /// Up to `limit` experiments after `after` (by id), with their catalog rows.
    pub fn catalog_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<CatalogRows>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(EXPERIMENTS).map_err(storage)?;
        let mut ids = Vec::new();
        for row in table.range(after.unwrap_or("")..).map_err(storage)? {
            let id = row.map_err(storage)?.0.value().to_owned();
            if after.is_some_and(|a| a == id) {
                continue;
            }
            ids.push(id);
            if ids.len() >= limit {
                break;
            }
        }
        self.catalog_rows(&read, ids)
    }

    fn catalog_rows(
        &self,
        read: &redb::ReadTransaction,
        ids: Vec<String>,
    ) -> Result<Vec<CatalogRows>, IndexError> {
        let experiments = read.open_table(EXPERIMENTS).map_err(storage)?;
        let metadata = read.open_table(METADATA).map_err(storage)?;
        let summaries = read.open_table(SUMMARIES).map_err(storage)?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let Some(v) = experiments.get(id.as_str()).map_err(storage)? else {
                continue;
            };
            out.push(CatalogRows {
                record: decode(&id, v.value())?,
                metadata: prefix_rows(&metadata, &id, |k, v| Ok((k.to_owned(), decode(k, v)?)))?,
                summaries: prefix_rows(&summaries, &id, |k, v| Ok((k.to_owned(), decode(k, v)?)))?,
            });
        }
        Ok(out)
    }

    /// Records a catalog table file about to be written (so it is cleaned up even if
    /// the write is interrupted).
    pub fn add_catalog_file(&self, key: &str) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        txn.open_table(CATALOG_FILES)
            .map_err(storage)?
            .insert(key, ())
            .map_err(storage)?;
        txn.commit().map_err(storage)
    }

    /// The names of `namespace`'s experiments, in listing order (newest first).
    #[cfg(test)]
    pub(crate) fn experiment_names(&self, namespace: &str) -> Vec<String> {
        let listed = self.list_experiments(namespace).expect("list experiments");
        listed.into_iter().map(|r| r.name).collect()
    }

    /// Merges a summary for each of `ids`, as a publish would.
    #[cfg(test)]
    pub(crate) fn merge_summaries_for_test(&self, ids: &[&str]) {
        let summary = MetricSummary {
            last: 1.0,
            last_step: 1,
            last_at: 1,
            min: 1.0,
            max: 1.0,
            count: 1,
            points: 1,
        };
        let summaries: Vec<_> = ids
            .iter()
            .map(|id| (id.to_string(), "loss".to_string(), summary))
            .collect();
        let txn = self.begin_write().expect("a write transaction");
        merge_summaries(&txn, &summaries, self.catalog_marks).expect("merged");
        txn.commit().expect("committed");
    }

    /// The rows of `page` are written: drops the marks it read. An experiment
    /// changed since has a later mark, so it stays out of date.
    pub fn catalog_written(&self, page: &DirtyCatalog) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            // One removal each, in order: redb's `retain_in` copies the leaf for
            // every entry it drops, which held the writer for 300 ms a page.
            let mut dirty = txn.open_table(DIRTY).map_err(storage)?;
            for (mark, id) in &page.marks {
                dirty.remove((*mark, id.as_str())).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }

    /// How many experiments the catalogue holds.
    pub fn experiment_count(&self) -> Result<u64, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        read.open_table(EXPERIMENTS)
            .map_err(storage)?
            .len()
            .map_err(storage)
    }

    /// The catalog table files this daemon wrote, by key.
    pub fn catalog_files(&self) -> Result<Vec<String>, IndexError> {
        let read = self.db.begin_read().map_err(storage)?;
        let table = read.open_table(CATALOG_FILES).map_err(storage)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(storage)? {
            out.push(row.map_err(storage)?.0.value().to_owned());
        }
        Ok(out)
    }

    /// Forgets catalog files (after deleting them).
    pub fn remove_catalog_files(&self, keys: &[String]) -> Result<(), IndexError> {
        let txn = self.begin_write()?;
        {
            let mut table = txn.open_table(CATALOG_FILES).map_err(storage)?;
            for k in keys {
                table.remove(k.as_str()).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }

    /// Whether any experiment's catalog rows are out of date.
    pub fn catalog_is_dirty(&self) -> Result<bool, IndexError> {
        use redb::ReadableTableMetadata;
        let read = self.db.begin_read().map_err(storage)?;
        Ok(!read
            .open_table(DIRTY)
            .map_err(storage)?
            .is_empty()
            .map_err(storage)?)
    }
}

/// Merges per-file summaries into the stored ones, within a publish transaction.
///
/// The summaries are merged in (experiment, key) order and their search entries
/// changed in key order ([`search::SearchUpdates`]): a merge of many summaries then
/// changes each index page in one visit. Repeated (experiment, key) pairs are
/// merged first, so each is read and written once.
pub(super) fn merge_summaries(
    txn: &WriteTransaction,
    summaries: &[(String, String, MetricSummary)],
    marks: bool,
) -> Result<(), IndexError> {
    if summaries.is_empty() {
        return Ok(());
    }
    let mut merged_input: BTreeMap<(&str, &str), MetricSummary> = BTreeMap::new();
    for (experiment, key, s) in summaries {
        merged_input
            .entry((experiment.as_str(), key.as_str()))
            .and_modify(|m| m.merge(s))
            .or_insert(*s);
    }
    let mut t = CatalogTables::open(txn, marks)?;
    // Placements are looked up once per experiment, in id order.
    let mut placements: BTreeMap<&str, Option<(String, Micros)>> = BTreeMap::new();
    for &(experiment, _) in merged_input.keys() {
        if !placements.contains_key(experiment) {
            placements.insert(experiment, t.placement_of(experiment)?);
        }
    }
    let mut updates = search::SearchUpdates::default();
    for ((experiment, key), s) in merged_input {
        let old: Option<MetricSummary> = t
            .summaries
            .get((experiment, key))
            .map_err(storage)?
            .map(|v| decode(key, v.value()))
            .transpose()?;
        let mut merged = s;
        if let Some(old) = &old {
            merged.merge(old);
        }
        t.summaries
            .insert((experiment, key), encode(&merged).as_slice())
            .map_err(storage)?;
        if let Some(Some((ns, created_at))) = placements.get(experiment) {
            updates.summary((ns, *created_at, experiment), key, old.as_ref(), &merged);
        }
    }
    updates.apply(&mut t.search)?;
    for experiment in placements.keys() {
        t.mark_dirty(experiment)?;
    }
    Ok(())
}

/// Records accepted client batch ids within a publish transaction, and forgets
/// those accepted before `forget_before`.
pub(super) fn record_batch_ids(
    txn: &WriteTransaction,
    ids: &[(String, Micros, u64)],
    forget_before: Micros,
) -> Result<(), IndexError> {
    let mut table = txn.open_table(BATCH_IDS).map_err(storage)?;
    for (id, at, points) in ids {
        table.insert((*at, id.as_str()), *points).map_err(storage)?;
    }
    if forget_before > i64::MIN {
        table
            .retain_in((i64::MIN, "")..(forget_before, ""), |_, _| false)
            .map_err(storage)?;
    }
    Ok(())
}
