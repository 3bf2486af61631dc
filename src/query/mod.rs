//! The read path: metric series and events of one experiment, from the files the
//! manifest's experiment index names, the writers' staged row groups and their
//! buffered chunks ([`crate::live`]). Reads never pass through the ingest queues or
//! the writer threads.
//!
//! Series come back per key in (step, ingest time) order, a page at a time: keys
//! are read a group at a time, sized by the points the index and the writers say
//! they hold, so a read holds about one page of points (or one series, if a single
//! series is longer). With `max_points`, a longer series comes back as step buckets
//! with min, max and last value.

pub(crate) mod parquet;
mod series;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use ::parquet::arrow::arrow_reader::ArrowReaderMetadata;
use ::parquet::errors::ParquetError;
use arrow_array::cast::AsArray;
use arrow_array::types::TimestampMicrosecondType;
use arrow_array::{Array, RecordBatch};

use crate::index::{FileRef, Index, IndexError};
use crate::live::{LiveRows, LiveView};
use crate::model::{EventPoint, EventRecord, ExperimentRef};
use crate::paths::Table;
use crate::sink::{FileData, Files, RemoteObject, SinkError};
use crate::telemetry::Metrics;

use self::parquet::{
    CacheCounters, EVENT_COLUMNS, KeyFilter, MetadataCache, PositionalFile, RemoteFile, RowSink,
    RowsWanted, StrColumn, local_metadata, metadata_from, read_rows, remote_metadata,
};
pub use series::{Cursor, SeriesOut, SeriesPage, SeriesQuery};

/// Errors reading.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    #[error(transparent)]
    Open(#[from] SinkError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("reading {path}: {source}")]
    Parquet { path: String, source: ParquetError },
    #[error("file {path} does not have the expected schema: {reason}")]
    Schema { path: String, reason: String },
    #[error("invalid page token: {0}")]
    Token(String),
    #[error("a read task failed: {0}")]
    Task(String),
}

impl QueryError {
    /// A file the manifest named was gone when opened (compacted away meanwhile).
    fn is_vanished(&self) -> bool {
        matches!(self, QueryError::Open(e) if e.is_not_found())
    }
}

/// Files a read opens at once; the footers of those in the bucket are fetched
/// together.
const OPEN_AHEAD: usize = 8;

/// A file of a read, opened: one in the bucket with its metadata.
enum Opened {
    Local(std::fs::File),
    Remote(Arc<RemoteObject>, ArrowReaderMetadata),
}

/// A file being opened: one in the bucket while its metadata is fetched.
enum Pending<'scope> {
    Local(std::fs::File),
    Remote(
        Arc<RemoteObject>,
        std::thread::ScopedJoinHandle<'scope, Result<ArrowReaderMetadata, QueryError>>,
    ),
}

/// How many times a read starts over when a file it was about to read has been
/// replaced by compaction meanwhile.
const ATTEMPTS: usize = 4;

/// Brings the manifest up to date before a read starts over because a file it
/// named was gone (a reader following other daemons' change logs: the file was
/// compacted away and the reader has not heard yet).
#[derive(Clone)]
pub struct Refresh(Arc<dyn Fn() + Send + Sync>);

impl Refresh {
    pub fn new(f: impl Fn() + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for Refresh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Refresh")
    }
}

/// Reads published files and the writers' unpublished rows.
#[derive(Debug, Clone)]
pub struct Reader {
    index: Arc<Index>,
    files: Files,
    live: LiveView,
    refresh: Option<Refresh>,
    metadata: Arc<MetadataCache>,
}

impl Reader {
    pub fn new(index: Arc<Index>, files: Files, live: LiveView) -> Self {
        Self {
            index,
            files,
            live,
            refresh: None,
            metadata: Arc::new(MetadataCache::new(0, Default::default())),
        }
    }

    /// Keeps up to `bytes` of published files' parsed metadata between reads,
    /// counting its hits, misses and size into `metrics`.
    pub fn with_metadata_cache(mut self, bytes: usize, metrics: &Metrics) -> Self {
        let counters = CacheCounters {
            hits: metrics.metadata_cache_hits.clone(),
            misses: metrics.metadata_cache_misses.clone(),
            bytes: metrics.metadata_cache_bytes.clone(),
        };
        self.metadata = Arc::new(MetadataCache::new(bytes, counters));
        self
    }

    /// Calls `refresh` before a read starts over after a file vanished.
    pub fn with_refresh(mut self, refresh: Refresh) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// Before starting a read over: lets the manifest catch up.
    fn catch_up(&self) {
        if let Some(Refresh(f)) = &self.refresh {
            f();
        }
    }

    /// Every source of `experiment`'s rows in `table`, at one instant: the files
    /// the manifest lists, and what the writers hold that is not in them.
    fn sources(
        &self,
        table: Table,
        experiment: &ExperimentRef,
    ) -> Result<(Vec<FileRef>, LiveRows), QueryError> {
        // The live view first, the manifest second (see `crate::live`).
        let live = self.live.snapshot(&experiment.id);
        let files = self
            .index
            .experiment_files(table, &experiment.namespace, &experiment.id)?;
        let listed: HashSet<&str> = files.iter().map(|f| f.entry.key.as_str()).collect();
        let mut live = live.without(|key| listed.contains(key) || self.index.was_removed(key));
        if table != Table::Metrics {
            // Staged files are metrics files (events are buffered whole until they
            // are published): another table's read must not open them.
            live.staged.clear();
            live.staged_keys.clear();
        }
        Ok((files, live))
    }

    /// Opens `window`'s files; the footers of those in the bucket are fetched
    /// at once (through the cache), as each would otherwise be a round trip of
    /// its own before its pages.
    fn open_window(&self, window: &[FileRef]) -> Result<Vec<Opened>, QueryError> {
        let opened = window
            .iter()
            .map(|f| self.files.open(&f.entry.object_key(), f.entry.bytes))
            .collect::<Result<Vec<_>, _>>()?;
        std::thread::scope(|scope| {
            let pending: Vec<_> = window
                .iter()
                .zip(opened)
                .map(|(file, data)| match data {
                    FileData::Local(f) => Pending::Local(f),
                    FileData::Remote(object) => {
                        let object = Arc::new(object);
                        let fetch = Arc::clone(&object);
                        let path = file.entry.key.as_str();
                        let footer = scope.spawn(move || {
                            self.metadata
                                .get_or_load(path, fetch.size(), || remote_metadata(&fetch, path))
                        });
                        Pending::Remote(object, footer)
                    }
                })
                .collect();
            pending
                .into_iter()
                .map(|p| {
                    Ok(match p {
                        Pending::Local(f) => Opened::Local(f),
                        Pending::Remote(object, footer) => {
                            let metadata = footer.join().unwrap_or_else(|_| {
                                Err(QueryError::Task(
                                    "fetching a file's metadata panicked".into(),
                                ))
                            })?;
                            Opened::Remote(object, metadata)
                        }
                    })
                })
                .collect()
        })
    }

    /// Reads the wanted rows of every file and staged file, in that order.
    fn read_files(
        &self,
        files: &[FileRef],
        live: &LiveRows,
        want: &RowsWanted,
        sink: &mut dyn RowSink,
    ) -> Result<(), QueryError> {
        for window in files.chunks(OPEN_AHEAD) {
            for (file, opened) in window.iter().zip(self.open_window(window)?) {
                let path = file.entry.key.as_str();
                let groups = file.row_groups.as_deref();
                match opened {
                    Opened::Local(f) => {
                        let len = f.metadata().map(|m| m.len()).unwrap_or(file.entry.bytes);
                        let reader = PositionalFile::new(Arc::new(f), len);
                        let metadata = self
                            .metadata
                            .get_or_load(path, len, || local_metadata(&reader, path))?;
                        read_rows(&reader, metadata, path, groups, want, sink)?;
                    }
                    Opened::Remote(object, metadata) => {
                        let file = RemoteFile::new(object, path);
                        read_rows(&file, metadata, path, groups, want, sink)?;
                        tracing::debug!(
                            file = path,
                            bytes = file.fetched_bytes(),
                            unplanned = file.unplanned_fetches(),
                            "read a remote file"
                        );
                    }
                }
            }
        }
        for (staged, groups) in &live.staged {
            let path = staged.key.as_str();
            let end = staged
                .metadata
                .row_groups()
                .iter()
                .flat_map(|rg| rg.columns())
                .map(|c| {
                    let (start, len) = c.byte_range();
                    start + len
                })
                .max()
                .unwrap_or(0);
            let reader = PositionalFile::new(Arc::clone(&staged.file), end);
            let metadata = metadata_from(Arc::clone(&staged.metadata), path)?;
            read_rows(&reader, metadata, path, Some(groups), want, sink)?;
        }
        Ok(())
    }

    /// Metric keys of an experiment with about how many points each holds, sorted.
    fn keys_with_counts(
        &self,
        experiment: &ExperimentRef,
        live: &LiveRows,
    ) -> Result<BTreeMap<String, u64>, QueryError> {
        let mut keys: BTreeMap<String, u64> = self
            .index
            .summaries(&experiment.id)?
            .into_iter()
            .map(|(k, s)| (k, s.points))
            .collect();
        for (key, n) in &live.staged_keys {
            let count = keys.entry(key.to_string()).or_default();
            *count = count.saturating_add(*n);
        }
        for (_, chunk) in &live.metrics {
            let b = &chunk.block;
            let mut counts = vec![0u64; b.keys.len()];
            for &k in &b.key_index {
                counts[k as usize] += 1;
            }
            for (key, n) in b.keys.iter().zip(counts) {
                if n > 0 {
                    let count = keys.entry(key.clone()).or_default();
                    *count = count.saturating_add(n);
                }
            }
        }
        Ok(keys)
    }

    /// Metric keys of an experiment, sorted.
    pub fn keys(&self, experiment: &ExperimentRef) -> Result<Vec<String>, QueryError> {
        let live = self.live.snapshot(&experiment.id);
        Ok(self
            .keys_with_counts(experiment, &live)?
            .into_keys()
            .collect())
    }

    /// One page of an experiment's series. Blocking.
    pub fn series(
        &self,
        experiment: &ExperimentRef,
        query: &SeriesQuery,
    ) -> Result<SeriesPage, QueryError> {
        let live = self.live.snapshot(&experiment.id);
        let counts = self.keys_with_counts(experiment, &live)?;
        drop(live);
        let mut page = series::PageBuilder::new(query);
        let mut keys: Vec<(String, u64)> = counts
            .into_iter()
            .filter(|(k, _)| query.wants_key(k))
            .collect();
        keys.reverse();
        while !keys.is_empty() && !page.is_full() {
            // A group of keys whose points fit a read's budget (at least one key):
            // every point of them is decoded, whatever the page keeps.
            let mut group: Vec<String> = Vec::new();
            let mut sizes: Vec<u64> = Vec::new();
            let mut points = 0u64;
            while let Some((key, n)) = keys.last() {
                if !group.is_empty() && points.saturating_add(*n) > query.read_points as u64 {
                    break;
                }
                points = points.saturating_add(*n);
                // An exact read holds about a page of a long series (see
                // `series::bound`), a bucketed one all of it.
                let held = query
                    .keep_of(key)
                    .map_or(*n, |(_, keep)| (*n).min((keep as u64).saturating_mul(2)));
                group.push(key.clone());
                // A step range, or a page resuming inside this series, may want a
                // sliver of a long series: no reservation.
                let whole = query.start_step.is_none()
                    && query.end_step.is_none()
                    && query.cursor.as_ref().is_none_or(|c| c.key != *key);
                sizes.push(if whole { held } else { 0 });
                keys.pop();
            }
            let mut gathered = self.gather_series(experiment, &group, &sizes, query)?;
            for key in &group {
                if page.is_full() {
                    page.stop_at(key);
                    break;
                }
                // Moved out, not copied: a long series is the read's largest allocation.
                let points = gathered.remove(key.as_str()).unwrap_or_default();
                page.add(key, points);
            }
        }
        if page.is_full()
            && let Some((key, _)) = keys.last()
        {
            page.stop_at(key);
        }
        Ok(page.finish())
    }

    /// Every point of the `keys` series within the step range, from every source.
    /// `sizes`: each key's stored points, reserved up front so that a long series
    /// is never copied while it grows.
    fn gather_series(
        &self,
        experiment: &ExperimentRef,
        keys: &[String],
        sizes: &[u64],
        query: &SeriesQuery,
    ) -> Result<BTreeMap<String, series::Gathered>, QueryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut out = series::Gathering::new(keys, sizes, query);
            let (files, live) = self.sources(Table::Metrics, experiment)?;
            // A page that resumes inside a series it reads alone skips the steps
            // earlier pages returned.
            let (mut lo, hi) = query.steps();
            if let (Some(c), [key]) = (&query.cursor, keys)
                && c.key == *key
            {
                lo = lo.max(c.step);
            }
            let want = RowsWanted {
                experiments: (&experiment.id, &experiment.id),
                // gather_batch skips the runs of other keys.
                keys: KeyFilter::Pages(keys),
                steps: (lo, hi),
                columns: parquet::METRIC_COLUMNS,
            };
            let read = self.read_files(&files, &live, &want, &mut out);
            match read {
                Err(e) if e.is_vanished() && attempt < ATTEMPTS => {
                    self.catch_up();
                    continue;
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            for (_, chunk) in &live.metrics {
                out.chunk(chunk, keys);
            }
            return Ok(out.into_series());
        }
    }

    /// Every event of an experiment, ordered by wallclock (arrival order among
    /// equal times). Blocking.
    pub fn events(&self, experiment: &ExperimentRef) -> Result<Vec<EventPoint>, QueryError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (files, live) = self.sources(Table::Events, experiment)?;
            let want = RowsWanted {
                experiments: (&experiment.id, &experiment.id),
                keys: KeyFilter::All,
                steps: (i64::MIN, i64::MAX),
                columns: EVENT_COLUMNS,
            };
            let mut out = Vec::new();
            let read = self.read_files(&files, &live, &want, &mut |batch: RecordBatch| {
                event_points(&batch, &mut out)
            });
            match read {
                Err(e) if e.is_vanished() && attempt < ATTEMPTS => {
                    self.catch_up();
                    continue;
                }
                Err(e) => return Err(e),
                Ok(()) => {}
            }
            for (_, chunk) in &live.events {
                out.extend(chunk.events.iter().map(|e| EventPoint {
                    event: e.clone(),
                    ingested_at: chunk.ingested_at,
                }));
            }
            out.sort_by_key(|e| e.event.wallclock);
            return Ok(out);
        }
    }
}

fn schema_err(column: &str) -> QueryError {
    QueryError::Schema {
        path: String::new(),
        reason: format!("column {column} is missing or has the wrong type"),
    }
}

fn event_points(batch: &RecordBatch, out: &mut Vec<EventPoint>) -> Result<(), QueryError> {
    let col = |name: &str| batch.column_by_name(name).ok_or_else(|| schema_err(name));
    let names = StrColumn::of(col("name")?).ok_or_else(|| schema_err("name"))?;
    let sources = StrColumn::of(col("source")?).ok_or_else(|| schema_err("source"))?;
    let wallclock = col("wallclock")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err("wallclock"))?;
    let metadata = col("metadata")?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err("metadata"))?;
    let ingested = col("ingested_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err("ingested_at"))?;
    for row in 0..batch.num_rows() {
        out.push(EventPoint {
            event: EventRecord {
                name: names.value(row).to_owned(),
                source: sources.value(row).to_owned(),
                wallclock: wallclock.value(row),
                metadata_json: if metadata.is_valid(row) {
                    metadata.value(row).to_owned()
                } else {
                    "{}".to_owned()
                },
            },
            ingested_at: ingested.value(row),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::{FileEntry, FilePart, Forget, PublishIntent, ReplaceIntent};
    use crate::model::{MetricBlock, MetricChunk, SparseColumn};
    use crate::paths::ObjectKey;
    use crate::sink::LocalSink;

    const PUBLISHED: &str = "metrics/namespace=ns/date=2026-01-01/published.parquet";
    const COMPACTED: &str = "metrics/namespace=ns/date=2026-01-01/compacted.parquet";

    fn entry(key: &str) -> FileEntry {
        FileEntry::one_row_of_e(key)
    }

    fn part() -> Vec<(String, FilePart)> {
        vec![(
            "e".into(),
            FilePart {
                row_groups: vec![0],
                rows: 1,
            },
        )]
    }

    /// What the writers hold of the experiment, and the files the manifest lists.
    fn sources(reader: &Reader, experiment: &ExperimentRef) -> (usize, Vec<String>) {
        let (files, live) = reader.sources(Table::Metrics, experiment).unwrap();
        let files = files.into_iter().map(|f| f.entry.key).collect();
        (live.metrics.len(), files)
    }

    /// A read whose live snapshot was taken before a file was published, and whose
    /// manifest read comes after the file was compacted away, reads its rows once:
    /// from the replacement, not from the live view as well.
    #[test]
    fn rows_published_and_compacted_since_the_live_snapshot_are_read_once() {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let sink = LocalSink::open(&dir.path().join("root"), &dir.path().join("staging")).unwrap();
        let live = LiveView::new(1);
        let writer = live.writer(0);
        let reader = Reader::new(Arc::clone(&index), Files::new(sink, None), live);
        let experiment = ExperimentRef {
            id: "e".into(),
            namespace: "ns".into(),
        };
        // The writer holds one point bound for PUBLISHED, and keeps holding it: as
        // a snapshot taken before the publication still does.
        let chunk = Arc::new(MetricChunk::new(
            MetricBlock {
                experiment: experiment.clone(),
                keys: vec!["loss".into()],
                key_index: vec![0],
                steps: vec![1],
                wallclocks: vec![10],
                values: vec![0.5],
                strings: SparseColumn::default(),
                bytes: SparseColumn::default(),
            },
            10,
        ));
        writer.queue_metrics(1, vec![Arc::clone(&chunk)]);
        let key = Arc::new(ObjectKey::from_manifest(PUBLISHED.into()));
        writer.claim_metrics(1, vec![(chunk, 7, key)]);
        assert_eq!(sources(&reader, &experiment), (1, vec![]));

        let intent = PublishIntent {
            entry: entry(PUBLISHED),
            partition: "metrics/namespace=ns/date=2026-01-01".into(),
            pieces: vec![(1, "e".into())],
            experiments: part(),
            summaries: Vec::new(),
            batch_ids: Vec::new(),
        };
        index.begin_publish(&intent).unwrap();
        let forget = Forget {
            pieces_below: 0,
            batch_ids_before: 0,
        };
        index.commit_publish(&intent, forget, false).unwrap();
        assert_eq!(sources(&reader, &experiment), (0, vec![PUBLISHED.into()]));

        let replace = ReplaceIntent {
            id: "compact:test".into(),
            outputs: vec![(entry(COMPACTED), part())],
            inputs: vec![PUBLISHED.into()],
        };
        index.begin_replace(&replace).unwrap();
        index.commit_replace(&replace, false).unwrap();
        assert_eq!(sources(&reader, &experiment), (0, vec![COMPACTED.into()]));
    }
}
