//! Compaction and retention: the read side's housekeeping.
//!
//! Writers publish many small files (one per writer, partition and roll), each
//! sorted within its row groups. Compaction merges a partition's small files into
//! large ones sorted as a whole by (experiment_id, key, step), whose row groups
//! follow experiment boundaries: small experiments share a row group, a large one
//! spans several, and no row group holds a slice of an experiment it shares with
//! another file. So row-group statistics prune by experiment and a read opens
//! only what holds its experiment. Files of the old schema (uint64 step and
//! wallclock) are always rewritten, so a data folder reads as one schema after a
//! pass.
//!
//! Only this daemon's files are touched (the manifest lists nothing else), so
//! daemons sharing a bucket never coordinate. A partition of a past day is merged
//! whole; one still being written merges files of about the same size a few at a
//! time (size tiers), so each row is rewritten a logarithmic number of times. The
//! swap is [`Persister::replace`]: the new files are in place before the manifest
//! changes in one transaction, and the old ones are deleted right after. On S3,
//! files still waiting for their upload are left for a later pass, and the
//! inputs are deleted once the outputs are uploaded.
//!
//! Retention drops whole date partitions older than a namespace's limit, through
//! the same swap (with no new files).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use chrono::NaiveDate;

use crate::config::{Compaction, RollPolicy};
use crate::index::{FileEntry, FilePart, IndexError, SCHEMA_INT64};
use crate::model::{
    Clock, EventChunk, EventRecord, ExperimentRef, Ingested, MetricBlock, MetricChunk, Micros,
    SparseColumn,
};
use crate::paths::{ObjectKey, PartitionKey, Table};
use crate::persist::{Persister, Replacement};
use crate::query::QueryError;
use crate::query::parquet::{
    EVENT_COLUMNS, IntColumn, KeyFilter, METRIC_COLUMNS, PositionalFile, RowsWanted, StrColumn,
    local_metadata, read_rows,
};
use crate::sink::{FileData, Files, SinkError};
use crate::telemetry::Metrics;
use crate::writer::events::EventsBuffer;
use crate::writer::file::StreamingFile;
use crate::writer::metrics::{MetricsBuffer, SortedRows};
use crate::writer::{WriterError, schema};

/// Errors compacting.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CompactError {
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("reading a file to compact: {0}")]
    Read(#[from] QueryError),
    #[error(transparent)]
    Open(#[from] SinkError),
    #[error("writing a compacted file: {0}")]
    Write(#[from] WriterError),
    #[error("file {path} has an unexpected schema: {reason}")]
    Schema { path: String, reason: String },
    #[error("stopped")]
    Stopped,
}

/// What one partition's compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PartitionReport {
    pub partition: String,
    pub files_in: usize,
    pub bytes_in: u64,
    pub files_out: usize,
    pub bytes_out: u64,
    pub rows: u64,
    pub elapsed: Duration,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassReport {
    pub partitions: Vec<PartitionReport>,
    /// Files deleted by retention.
    pub expired_files: usize,
    /// Partitions left as they were, and why.
    pub failed: Vec<(String, String)>,
}

/// Which files of a partition to merge.
#[derive(Debug, Clone)]
struct Job {
    partition: PartitionKey,
    dir: String,
    files: Vec<FileEntry>,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct Compactor {
    pub persister: Persister,
    pub files: Files,
    pub config: Compaction,
    pub roll: RollPolicy,
    pub daemon_id: Arc<str>,
    pub clock: Clock,
    pub metrics: Metrics,
    /// Where inputs fetched from the bucket are kept while they are merged.
    pub scratch: std::path::PathBuf,
    /// Set to stop between row groups (shutdown).
    pub stop: Arc<AtomicBool>,
}

/// The partition a published file belongs to.
fn partition_of(entry: &FileEntry) -> Option<PartitionKey> {
    let dir = entry.partition();
    let mut parts = dir.split('/');
    let table = match parts.next()? {
        "metrics" => Table::Metrics,
        "events" => Table::Events,
        _ => return None,
    };
    let namespace = parts.next()?.strip_prefix("namespace=")?;
    let date = parts.next()?.strip_prefix("date=")?;
    Some(PartitionKey {
        table,
        namespace: Arc::from(namespace),
        date: NaiveDate::parse_from_str(date, "%Y-%m-%d").ok()?,
    })
}

/// Size tier of a file: files within a factor of four share one.
fn tier(bytes: u64) -> u32 {
    let mib = (bytes >> 20).max(1);
    mib.ilog2() / 2
}

impl Compactor {
    /// A day is closed (no writer adds to it any more) once the clock is past its
    /// end by two roll ages and a minute.
    fn closed_before(&self, now: Micros) -> NaiveDate {
        let margin = (2 * self.roll.max_age + Duration::from_secs(60)).as_micros() as i64;
        crate::paths::utc_date(now - margin)
    }

    /// Files waiting in the spool for their upload (none on a local root). Neither
    /// compaction nor retention touches them: compaction would read an object not
    /// in the bucket yet, and retention's deletion would race the upload in flight,
    /// which could then put the object back with nothing in the index naming it.
    fn spooled(&self) -> Result<HashSet<String>, CompactError> {
        if self.persister.remote.is_none() {
            return Ok(HashSet::new());
        }
        let spooled = self.persister.index.spooled()?;
        Ok(spooled.into_iter().map(|(key, _)| key).collect())
    }

    /// Decides what to merge: every partition's small files (and any file of the
    /// old schema) if its day is closed, else a size tier with enough files.
    fn plan(&self, everything: bool) -> Result<Vec<Job>, CompactError> {
        let index = &self.persister.index;
        let closed_before = self.closed_before(self.clock.now());
        let spooled = self.spooled()?;
        let mut by_partition: BTreeMap<String, (PartitionKey, Vec<FileEntry>)> = BTreeMap::new();
        for entry in index.all_files()? {
            let Some(partition) = partition_of(&entry) else {
                continue;
            };
            if spooled.contains(&entry.key) {
                continue;
            }
            by_partition
                .entry(entry.partition().to_owned())
                .or_insert_with(|| (partition, Vec::new()))
                .1
                .push(entry);
        }
        let target = self.config.target_file_bytes;
        let mut jobs = Vec::new();
        for (dir, (partition, files)) in by_partition {
            let legacy = files.iter().any(|f| f.schema < SCHEMA_INT64);
            let small: Vec<FileEntry> = files
                .into_iter()
                .filter(|f| f.schema < SCHEMA_INT64 || f.bytes < target / 2)
                .collect();
            let closed = everything || partition.date < closed_before;
            let chosen = if closed {
                if small.len() >= 2 || legacy {
                    small
                } else {
                    Vec::new()
                }
            } else {
                let mut tiers: BTreeMap<u32, Vec<FileEntry>> = BTreeMap::new();
                for f in small {
                    let t = if f.schema < SCHEMA_INT64 {
                        0
                    } else {
                        tier(f.bytes)
                    };
                    tiers.entry(t).or_default().push(f);
                }
                tiers
                    .into_values()
                    .find(|t| {
                        t.len() >= self.config.min_files
                            || t.iter().any(|f| f.schema < SCHEMA_INT64)
                    })
                    .unwrap_or_default()
            };
            if !chosen.is_empty() {
                jobs.push(Job {
                    partition,
                    dir,
                    files: chosen,
                });
            }
        }
        Ok(jobs)
    }

    /// Runs one pass: retention, then compaction of every partition that needs it.
    /// `everything`: treat every partition as closed (the offline `mboxd compact`).
    pub fn run_pass(
        &self,
        everything: bool,
        progress: &mut dyn FnMut(&PartitionReport),
    ) -> Result<PassReport, CompactError> {
        // Objects whose removal readers have heard of since the last pass.
        self.persister.finish_deletions();
        let mut report = PassReport {
            expired_files: self.expire()?,
            ..PassReport::default()
        };
        for job in self.plan(everything)? {
            if self.stop.load(Ordering::Relaxed) {
                return Err(CompactError::Stopped);
            }
            // One partition that cannot be compacted (a damaged file) is left as it
            // was; it must not hold back every partition after it.
            let dir = job.dir.clone();
            match self.compact(job) {
                Ok(done) => {
                    progress(&done);
                    report.partitions.push(done);
                }
                Err(CompactError::Stopped) => return Err(CompactError::Stopped),
                Err(e) => {
                    tracing::error!(partition = %dir, error = %e, "cannot compact a partition; it is left as it was");
                    report.failed.push((dir, e.to_string()));
                }
            }
        }
        Ok(report)
    }

    /// Deletes date partitions older than their namespace's retention. Files still
    /// waiting for their upload go in a later pass, once uploaded.
    fn expire(&self) -> Result<usize, CompactError> {
        let today = crate::paths::utc_date(self.clock.now());
        let spooled = self.spooled()?;
        let mut expired: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for entry in self.persister.index.all_files()? {
            let Some(p) = partition_of(&entry) else {
                continue;
            };
            if spooled.contains(&entry.key) {
                continue;
            }
            let days = self.config.retention_days_of(&p.namespace);
            if days == 0 {
                continue;
            }
            let age = (today - p.date).num_days();
            if age > i64::from(days) {
                expired
                    .entry(entry.partition().to_owned())
                    .or_default()
                    .push(entry.key);
            }
        }
        let mut n = 0;
        for (dir, keys) in expired {
            let removed = self
                .persister
                .replace(format!("expire:{dir}"), Vec::new(), keys)?;
            n += removed.len();
            tracing::info!(partition = %dir, files = removed.len(), "retention: deleted an expired partition");
        }
        if n > 0 {
            self.metrics.expired_files.inc_by(n as u64);
            self.persister.finish_deletions();
        }
        Ok(n)
    }

    /// Merges one partition's chosen files.
    fn compact(&self, job: Job) -> Result<PartitionReport, CompactError> {
        let started = Instant::now();
        let mut inputs = Inputs::open(self, &job)?;
        let experiments = inputs.experiments(self)?;
        let props = schema::compaction_properties(&self.roll);
        let (table_schema, sink) = (
            match job.partition.table {
                Table::Metrics => schema::metrics_schema(),
                Table::Events => schema::events_schema(),
            },
            &self.persister.sink,
        );
        let mut outputs: Vec<Replacement> = Vec::new();
        let mut current: Option<StreamingFile> = None;
        let mut report = PartitionReport {
            partition: job.dir.clone(),
            files_in: job.files.len(),
            bytes_in: job.files.iter().map(|f| f.bytes).sum(),
            ..PartitionReport::default()
        };
        let written = (|| -> Result<(), CompactError> {
            let index = &self.persister.index;
            // Metric keys cut a large experiment between row groups; events have
            // no key column, so an experiment's events are one group, whatever its
            // metrics.
            let keys_of = |e: &str| -> Vec<(String, u64)> {
                match job.partition.table {
                    Table::Metrics => index
                        .summaries(e)
                        .map(|s| s.into_iter().map(|(k, s)| (k, s.points)).collect())
                        .unwrap_or_default(),
                    Table::Events => Vec::new(),
                }
            };
            for group in groups(&experiments, self.config.row_group_rows as u64, &keys_of) {
                if self.stop.load(Ordering::Relaxed) {
                    return Err(CompactError::Stopped);
                }
                let sorted = inputs.merge(&job, &group)?;
                if sorted.batch.num_rows() == 0 {
                    continue;
                }
                if current.is_none() {
                    let key = Arc::new(ObjectKey::new_file(&job.partition, &self.daemon_id));
                    current = Some(StreamingFile::create(
                        sink,
                        key,
                        Arc::clone(&table_schema),
                        &props,
                    )?);
                }
                if let Some(file) = current.as_mut() {
                    file.append_row_group(&sorted)?;
                    report.rows += sorted.batch.num_rows() as u64;
                    if file.bytes() >= self.config.target_file_bytes
                        && let Some(done) = current.take()
                    {
                        outputs.extend(finish(done, sink)?);
                    }
                }
            }
            if let Some(done) = current.take() {
                outputs.extend(finish(done, sink)?);
            }
            Ok(())
        })();
        inputs.clean_up();
        if let Err(e) = written {
            for o in outputs {
                sink.discard(o.staged);
            }
            return Err(e);
        }
        let rows_in: u64 = job.files.iter().map(|f| f.rows).sum();
        if report.rows != rows_in {
            for o in outputs {
                sink.discard(o.staged);
            }
            return Err(CompactError::Schema {
                path: job.dir,
                reason: format!(
                    "read {} rows from files listing {rows_in}; the partition is left as it was",
                    report.rows
                ),
            });
        }
        report.files_out = outputs.len();
        report.bytes_out = outputs.iter().map(|o| o.entry.bytes).sum();
        let inputs_keys = job.files.iter().map(|f| f.key.clone()).collect();
        let id = format!("compact:{}:{}", job.dir, uuid::Uuid::now_v7().simple());
        let output_keys: Vec<String> = outputs.iter().map(|o| o.entry.key.clone()).collect();
        self.persister.replace(id, outputs, inputs_keys)?;
        // On S3 the old objects go once the new ones are in the bucket, and with
        // a change log once the change is shipped (see `Index::queue_deletions`),
        // so a reader of the bucket, or an mboxd reader, never meets a gap. The
        // index holds them until then; this wait only deletes them in this pass.
        let index = &self.persister.index;
        let deadline = Instant::now() + Duration::from_secs(600);
        while (output_keys
            .iter()
            .any(|k| index.is_spooled(k).unwrap_or(false))
            || index.has_held_deletions().unwrap_or(false))
            && Instant::now() < deadline
            && !self.stop.load(Ordering::Relaxed)
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.persister.finish_deletions();
        report.elapsed = started.elapsed();
        let m = &self.metrics;
        m.compactions.inc();
        m.compacted_files.inc_by(report.files_in as u64);
        m.compaction_seconds.observe(report.elapsed.as_secs_f64());
        tracing::info!(
            partition = %report.partition,
            files_in = report.files_in,
            bytes_in = report.bytes_in,
            files_out = report.files_out,
            bytes_out = report.bytes_out,
            rows = report.rows,
            elapsed_ms = report.elapsed.as_millis() as u64,
            "compacted"
        );
        Ok(report)
    }
}

/// A finished compacted file as a replacement.
fn finish(
    file: StreamingFile,
    sink: &crate::sink::LocalSink,
) -> Result<Option<Replacement>, CompactError> {
    let Some(done) = file.finish(sink)? else {
        return Ok(None);
    };
    let experiments: Vec<(String, FilePart)> = done
        .experiments
        .iter()
        .map(|(e, p)| (e.to_string(), p.clone()))
        .collect();
    let entry = FileEntry {
        key: done.key.as_str().to_owned(),
        rows: done.rows,
        bytes: done.bytes,
        min_experiment: experiments
            .first()
            .map(|(e, _)| e.clone())
            .unwrap_or_default(),
        max_experiment: experiments
            .last()
            .map(|(e, _)| e.clone())
            .unwrap_or_default(),
        created_at: crate::model::now_micros(),
        schema: SCHEMA_INT64,
        compacted: true,
    };
    Ok(Some(Replacement {
        staged: done.staged,
        entry,
        experiments,
    }))
}

/// The rows of one output row group: a run of whole experiments, or a range of
/// keys of one large experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    /// Inclusive range of experiment ids.
    lo: String,
    hi: String,
    /// For a slice of one experiment: keys from (inclusive) .. to (exclusive).
    keys: Option<(Option<String>, Option<String>)>,
}

/// Row groups of about `rows` rows: consecutive small experiments share one; an
/// experiment larger than `rows` is cut between keys (`keys_of` gives its keys and
/// their points, sorted); a single key larger than `rows` is one row group.
fn groups(
    experiments: &[(String, u64)],
    rows: u64,
    keys_of: &dyn Fn(&str) -> Vec<(String, u64)>,
) -> Vec<Group> {
    let mut out = Vec::new();
    let mut run: Option<(usize, u64)> = None;
    let close = |out: &mut Vec<Group>, from: usize, to: usize| {
        out.push(Group {
            lo: experiments[from].0.clone(),
            hi: experiments[to].0.clone(),
            keys: None,
        });
    };
    for (i, (e, n)) in experiments.iter().enumerate() {
        if *n > rows {
            if let Some((from, _)) = run.take() {
                close(&mut out, from, i - 1);
            }
            let keys = keys_of(e);
            let mut cuts: Vec<String> = Vec::new();
            let mut acc = 0;
            for (k, m) in &keys {
                if acc > 0 && acc + m > rows {
                    cuts.push(k.clone());
                    acc = 0;
                }
                acc += m;
            }
            let mut from: Option<String> = None;
            for cut in cuts.into_iter().map(Some).chain(std::iter::once(None)) {
                out.push(Group {
                    lo: e.clone(),
                    hi: e.clone(),
                    keys: Some((from.clone(), cut.clone())),
                });
                from = cut;
            }
            continue;
        }
        match &mut run {
            Some((from, acc)) if *acc + n > rows => {
                close(&mut out, *from, i - 1);
                run = Some((i, *n));
            }
            Some((_, acc)) => *acc += n,
            None => run = Some((i, *n)),
        }
    }
    if let Some((from, _)) = run {
        close(&mut out, from, experiments.len() - 1);
    }
    out
}

/// The files being merged, open for reading.
struct Inputs {
    files: Vec<(
        FileEntry,
        PositionalFile,
        parquet::arrow::arrow_reader::ArrowReaderMetadata,
    )>,
    /// Copies fetched from the bucket, deleted afterwards.
    fetched: Vec<std::path::PathBuf>,
}

impl Inputs {
    fn open(c: &Compactor, job: &Job) -> Result<Self, CompactError> {
        let mut inputs = Inputs {
            files: Vec::new(),
            fetched: Vec::new(),
        };
        for entry in &job.files {
            let file = match c.files.open(&entry.object_key(), entry.bytes)? {
                FileData::Local(f) => f,
                FileData::Remote(object) => {
                    std::fs::create_dir_all(&c.scratch).map_err(|source| SinkError::Io {
                        action: "creating",
                        path: c.scratch.clone(),
                        source,
                    })?;
                    let path = c
                        .scratch
                        .join(format!("{}.parquet", uuid::Uuid::now_v7().simple()));
                    let bytes = object.get_range(0..entry.bytes)?;
                    std::fs::write(&path, &bytes).map_err(|source| SinkError::Io {
                        action: "writing",
                        path: path.clone(),
                        source,
                    })?;
                    inputs.fetched.push(path.clone());
                    std::fs::File::open(&path).map_err(|source| SinkError::Io {
                        action: "opening",
                        path,
                        source,
                    })?
                }
            };
            let len = file.metadata().map(|m| m.len()).unwrap_or(entry.bytes);
            let reader = PositionalFile::new(Arc::new(file), len);
            let metadata = local_metadata(&reader, &entry.key)?;
            inputs.files.push((entry.clone(), reader, metadata));
        }
        Ok(inputs)
    }

    fn clean_up(&mut self) {
        for path in self.fetched.drain(..) {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Every experiment in the inputs with its row count, sorted by id: from the
    /// manifest's experiment index, or read from files that have none.
    fn experiments(&self, c: &Compactor) -> Result<Vec<(String, u64)>, CompactError> {
        let mut rows: BTreeMap<String, u64> = BTreeMap::new();
        for (entry, reader, metadata) in &self.files {
            match c.persister.index.file_experiments(&entry.key)? {
                Some(parts) => {
                    for (e, p) in parts {
                        *rows.entry(e).or_default() += p.rows;
                    }
                }
                None => {
                    let want = RowsWanted {
                        experiments: ("", "\u{10ffff}"),
                        keys: KeyFilter::All,
                        steps: (i64::MIN, i64::MAX),
                        columns: &[],
                    };
                    read_rows(
                        reader,
                        metadata.clone(),
                        &entry.key,
                        None,
                        &want,
                        &mut |batch: RecordBatch| {
                            let ids = StrColumn::of(batch.column(0))
                                .ok_or_else(|| schema_err(&entry.key, "experiment_id"))?;
                            for r in 0..batch.num_rows() {
                                *rows.entry(ids.value(r).to_owned()).or_default() += 1;
                            }
                            Ok(())
                        },
                    )?;
                }
            }
        }
        Ok(rows.into_iter().collect())
    }

    /// The rows of a group of experiments from every input, sorted as one row group.
    fn merge(&mut self, job: &Job, group: &Group) -> Result<SortedRows, CompactError> {
        let columns = match job.partition.table {
            Table::Metrics => METRIC_COLUMNS,
            Table::Events => EVENT_COLUMNS,
        };
        let want = RowsWanted {
            experiments: (&group.lo, &group.hi),
            keys: match &group.keys {
                Some((from, to)) => KeyFilter::Range(from.as_deref(), to.as_deref()),
                None => KeyFilter::All,
            },
            steps: (i64::MIN, i64::MAX),
            columns,
        };
        let namespace = Arc::clone(&job.partition.namespace);
        match job.partition.table {
            Table::Metrics => {
                let mut buffer = MetricsBuffer::default();
                self.read_inputs(&want, &mut |batch, key| {
                    for chunk in metric_chunks(&batch, &namespace, key)? {
                        buffer.append(Arc::new(chunk));
                    }
                    Ok(())
                })?;
                Ok(buffer.to_record_batch().map_err(WriterError::from)?)
            }
            Table::Events => {
                let mut buffer = EventsBuffer::default();
                self.read_inputs(&want, &mut |batch, key| {
                    for chunk in event_chunks(&batch, &namespace, key)? {
                        buffer.append(Arc::new(chunk));
                    }
                    Ok(())
                })?;
                Ok(buffer.to_record_batch().map_err(WriterError::from)?)
            }
        }
    }

    /// Hands `sink` every wanted batch of every input, with the input's key.
    fn read_inputs(
        &self,
        want: &RowsWanted,
        sink: &mut dyn FnMut(RecordBatch, &str) -> Result<(), QueryError>,
    ) -> Result<(), QueryError> {
        for (entry, reader, metadata) in &self.files {
            read_rows(
                reader,
                metadata.clone(),
                &entry.key,
                None,
                want,
                &mut |batch: RecordBatch| sink(batch, &entry.key),
            )?;
        }
        Ok(())
    }
}

fn schema_err(path: &str, column: &str) -> QueryError {
    QueryError::Schema {
        path: path.to_owned(),
        reason: format!("column {column} is missing or has the wrong type"),
    }
}

/// Runs of one experiment in a batch, as `[start, end)` row ranges.
fn runs(ids: &StrColumn<'_>, n: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut start = 0;
    for r in 1..=n {
        if r == n || ids.value(r) != ids.value(start) {
            out.push((start, r));
            start = r;
        }
    }
    out
}

/// A batch of metric rows (with `experiment_id`) as one chunk per experiment run.
fn metric_chunks(
    batch: &RecordBatch,
    namespace: &Arc<str>,
    path: &str,
) -> Result<Vec<MetricChunk>, QueryError> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| schema_err(path, name))
    };
    let ids =
        StrColumn::of(col("experiment_id")?).ok_or_else(|| schema_err(path, "experiment_id"))?;
    let keys = StrColumn::of(col("key")?).ok_or_else(|| schema_err(path, "key"))?;
    let steps = IntColumn::of(col("step")?).ok_or_else(|| schema_err(path, "step"))?;
    let walls =
        IntColumn::of(col("wallclock_time")?).ok_or_else(|| schema_err(path, "wallclock_time"))?;
    let doubles = col("value_double")?
        .as_primitive_opt::<Float64Type>()
        .ok_or_else(|| schema_err(path, "value_double"))?;
    let strings = col("value_string")?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err(path, "value_string"))?;
    let bytes = col("value_bytes")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| schema_err(path, "value_bytes"))?;
    let ingested = col("ingested_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err(path, "ingested_at"))?;
    let mut out = Vec::new();
    for (start, end) in runs(&ids, batch.num_rows()) {
        let mut dict: BTreeMap<&str, u32> = BTreeMap::new();
        let mut block = MetricBlock {
            experiment: ExperimentRef {
                id: Arc::from(ids.value(start)),
                namespace: Arc::clone(namespace),
            },
            keys: Vec::new(),
            key_index: Vec::with_capacity(end - start),
            steps: Vec::with_capacity(end - start),
            wallclocks: Vec::with_capacity(end - start),
            values: Vec::with_capacity(end - start),
            strings: SparseColumn::default(),
            bytes: SparseColumn::default(),
        };
        let mut at = Vec::with_capacity(end - start);
        for r in start..end {
            let key = keys.value(r);
            let next = dict.len() as u32;
            let k = *dict.entry(key).or_insert_with(|| {
                block.keys.push(key.to_owned());
                next
            });
            let row = (r - start) as u32;
            block.key_index.push(k);
            block.steps.push(steps.value(r).max(0) as u64);
            block.wallclocks.push(walls.value(r).max(0) as u64);
            if doubles.is_valid(r) {
                block.values.push(doubles.value(r));
            } else {
                block.values.push(0.0);
                if strings.is_valid(r) {
                    block.strings.rows.push(row);
                    block.strings.values.push(strings.value(r).to_owned());
                } else if bytes.is_valid(r) {
                    block.bytes.rows.push(row);
                    block.bytes.values.push(bytes.value(r).to_vec());
                } else {
                    // A row with no value at all: keep it as NaN.
                    if let Some(v) = block.values.last_mut() {
                        *v = f64::NAN;
                    }
                }
            }
            at.push(ingested.value(r));
        }
        out.push(MetricChunk {
            block,
            ingested: Ingested::PerRow(at),
        });
    }
    Ok(out)
}

/// A batch of event rows as one chunk per (experiment, ingest time) run.
fn event_chunks(
    batch: &RecordBatch,
    namespace: &Arc<str>,
    path: &str,
) -> Result<Vec<EventChunk>, QueryError> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| schema_err(path, name))
    };
    let ids =
        StrColumn::of(col("experiment_id")?).ok_or_else(|| schema_err(path, "experiment_id"))?;
    let names = StrColumn::of(col("name")?).ok_or_else(|| schema_err(path, "name"))?;
    let sources = StrColumn::of(col("source")?).ok_or_else(|| schema_err(path, "source"))?;
    let wallclock = col("wallclock")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err(path, "wallclock"))?;
    let metadata = col("metadata")?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err(path, "metadata"))?;
    let ingested = col("ingested_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err(path, "ingested_at"))?;
    let mut out: Vec<EventChunk> = Vec::new();
    for r in 0..batch.num_rows() {
        let event = EventRecord {
            name: names.value(r).to_owned(),
            source: sources.value(r).to_owned(),
            wallclock: wallclock.value(r),
            metadata_json: if metadata.is_valid(r) {
                metadata.value(r).to_owned()
            } else {
                "{}".to_owned()
            },
        };
        let (id, at) = (ids.value(r), ingested.value(r));
        match out.last_mut() {
            Some(c) if &*c.experiment == id && c.ingested_at == at => c.events.push(event),
            _ => out.push(EventChunk {
                experiment: Arc::from(id),
                experiment_namespace: Arc::clone(namespace),
                events: vec![event],
                ingested_at: at,
            }),
        }
    }
    Ok(out)
}

/// Runs compaction passes every `config.interval` on a blocking thread until
/// `stop` is set.
pub fn spawn_loop(compactor: Compactor) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("mboxd-compact".into())
        .spawn(move || {
            let interval = compactor.config.interval;
            let mut next = Instant::now() + interval;
            while !compactor.stop.load(Ordering::Relaxed) {
                if Instant::now() < next {
                    std::thread::sleep(Duration::from_millis(200).min(interval));
                    continue;
                }
                match compactor.run_pass(false, &mut |_| {}) {
                    Ok(_) | Err(CompactError::Stopped) => {}
                    Err(e) => tracing::error!(error = %e, "compaction pass failed; retrying at the next interval"),
                }
                next = Instant::now() + interval;
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_experiment_boundaries_and_cut_large_ones_between_keys() {
        let e = |n: &str, r: u64| (n.to_owned(), r);
        let exps = [e("a", 10), e("b", 10), e("c", 100), e("d", 5), e("e", 5)];
        let keys_of = |x: &str| -> Vec<(String, u64)> {
            match x {
                "c" => vec![e("k1", 20), e("k2", 20), e("k3", 60)],
                _ => vec![],
            }
        };
        let g = |lo: &str, hi: &str, keys: Option<(Option<&str>, Option<&str>)>| Group {
            lo: lo.into(),
            hi: hi.into(),
            keys: keys.map(|(a, b)| (a.map(Into::into), b.map(Into::into))),
        };
        assert_eq!(
            groups(&exps, 25, &keys_of),
            [
                g("a", "b", None),
                g("c", "c", Some((None, Some("k2")))),
                g("c", "c", Some((Some("k2"), Some("k3")))),
                g("c", "c", Some((Some("k3"), None))),
                g("d", "e", None),
            ]
        );
        assert!(groups(&[], 10, &keys_of).is_empty());
        // No key list (a file from before summaries): the experiment whole.
        assert_eq!(
            groups(&[e("x", 100)], 25, &keys_of),
            [g("x", "x", Some((None, None)))]
        );
    }

    #[test]
    fn tiers_group_files_within_a_factor_of_four() {
        assert_eq!(tier(100), 0);
        assert_eq!(tier(3 << 20), 0);
        assert_eq!(tier(4 << 20), 1);
        assert_eq!(tier(15 << 20), 1);
        assert_eq!(tier(16 << 20), 2);
    }
}
