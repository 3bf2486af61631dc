//! The catalog tables `experiments/`, `metadata/` and `summaries/`: the index's
//! experiments, hyperparameters and metric summaries as Parquet, for joins in
//! DuckDB, Spark or Trino.
//!
//! They are written incrementally: every change to an experiment (creation,
//! metadata, a summary merged at a publish) marks it in the index, and within a
//! roll interval a delta file per table holds the changed experiments' current
//! rows (`<table>/<daemon-id>-<uuid v7>.parquet`). Once the deltas since the
//! last whole rewrite hold a share of the catalogue ([`REWRITE_SHARE`]), or
//! their files pile up ([`MOST_DELTAS`]), one pass writes the whole catalog as
//! one file per table, in pages, and deletes the deltas. So a change costs a
//! bounded number of rows rewritten whatever the catalogue's size, readers find
//! a bounded number of files, and memory stays one page of experiments. Rows of
//! one experiment may appear in several files (and from several daemons):
//! readers keep the latest (`updated_at` for experiments and metadata,
//! `written_at` for summaries), as the README's queries do. The tables are
//! derived from the index, so they need no WAL: a write that fails is done again
//! at the next tick or start.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow_array::{
    ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMicrosecondArray,
};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use tokio::sync::oneshot;

use super::{WriterError, schema};
use crate::index::search::framework_name;
use crate::index::{CatalogRows, Index};
use crate::paths::ObjectKey;
use crate::sink::{LocalSink, SinkError, delete_remote, object_path, remote_err};

/// Where the catalog files go.
#[derive(Debug, Clone)]
pub enum SnapshotTarget {
    /// Renamed into place under a local root.
    Local(LocalSink),
    /// Put into the remote store (large files staged locally first).
    Remote {
        store: Arc<dyn ObjectStore>,
        runtime: tokio::runtime::Handle,
        staging: LocalSink,
    },
}

/// Experiments (at most) per delta file and per page of a full rewrite.
const PAGE: usize = 4_096;
/// Files per table below which the catalog is never rewritten whole.
const CONSOLIDATE_AFTER: usize = 16;
/// Files per table past which it is rewritten whole, however little they hold.
const MOST_DELTAS: usize = 128;
/// Past [`CONSOLIDATE_AFTER`] files, the catalog is rewritten whole once the
/// deltas since the last rewrite hold a 1/`REWRITE_SHARE` of its experiments:
/// each experiment changed then costs at most this many rows rewritten. A
/// rewrite after every 16 deltas rewrote a large catalogue every 16 passes for
/// a trickle of changes (every 80 s at the default 5 s roll).
const REWRITE_SHARE: u64 = 4;
const TABLES: [&str; 3] = ["experiments", "metadata", "summaries"];

/// Writes one daemon's catalog tables as the index changes.
#[derive(Debug)]
pub struct Snapshots {
    index: Arc<Index>,
    target: SnapshotTarget,
    daemon_id: Arc<str>,
    props: WriterProperties,
    legacy_noted: bool,
    /// Experiments per delta file and per page of a full rewrite.
    page: usize,
    /// See [`MOST_DELTAS`].
    most_deltas: usize,
    /// Experiments written to deltas since this process last rewrote the catalog
    /// whole (none counted from before a restart: [`MOST_DELTAS`] bounds those).
    since_rewrite: u64,
    /// Set when the daemon stops: a pass then ends after the page it is writing
    /// and skips the whole rewrite. What is left stays marked in the index and is
    /// written at the next start, so a stop does not wait for a large catalogue.
    stopping: Arc<AtomicBool>,
}

impl Snapshots {
    pub fn new(
        index: Arc<Index>,
        target: SnapshotTarget,
        daemon_id: Arc<str>,
        props: WriterProperties,
    ) -> Self {
        Self {
            index,
            target,
            daemon_id,
            props,
            legacy_noted: false,
            page: PAGE,
            most_deltas: MOST_DELTAS,
            since_rewrite: 0,
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Writes delta files for every changed experiment, and rewrites the catalog
    /// whole once the deltas pile up. Returns whether anything was written.
    /// Blocking.
    pub fn write_if_changed(&mut self) -> Result<bool, WriterError> {
        if !self.legacy_noted {
            // Earlier releases kept one whole file per table under the daemon id;
            // the next rewrite replaces it.
            for table in TABLES {
                self.index
                    .add_catalog_file(&format!("{table}/{}.parquet", self.daemon_id))?;
            }
            self.legacy_noted = true;
        }
        let mut wrote = false;
        loop {
            let page = self.index.dirty_catalog(self.page)?;
            if page.is_empty() {
                break;
            }
            // A page can name only ids without a record (a summary merged for an
            // unknown experiment): no rows to write, but its marks still go, or
            // they would stop every mark behind them.
            if !page.rows.is_empty() {
                let key = |table: &str| {
                    ObjectKey::from_manifest(format!(
                        "{table}/{}-{}.parquet",
                        self.daemon_id,
                        uuid::Uuid::now_v7().simple()
                    ))
                };
                let written_at = self.index.catalog_now()?;
                for (table, batch) in batches(&page.rows, written_at)? {
                    let key = key(table);
                    self.index.add_catalog_file(key.as_str())?;
                    self.put(&key, &[batch])?;
                }
                self.since_rewrite += page.rows.len() as u64;
                wrote = true;
            }
            self.index.catalog_written(&page)?;
            let more = page.more;
            drop(page);
            release_freed_memory();
            if !more || self.stopping() {
                break;
            }
        }
        let files = self.index.catalog_files()?;
        if self.rewrite_due(files.len())? && !self.stopping() {
            self.consolidate(files)?;
        }
        Ok(wrote)
    }

    /// Whether the catalog is due a whole rewrite, with `files` in all tables.
    fn rewrite_due(&self, files: usize) -> Result<bool, WriterError> {
        let per_table = files / TABLES.len();
        if per_table <= CONSOLIDATE_AFTER {
            return Ok(false);
        }
        if per_table > self.most_deltas {
            return Ok(true);
        }
        let experiments = self.index.experiment_count()?;
        Ok(self.since_rewrite.saturating_mul(REWRITE_SHARE) >= experiments)
    }

    /// Writes the whole catalog as one file per table, a page of experiments per
    /// row group (streamed to staged files, so memory stays one page), then
    /// deletes `old`.
    fn consolidate(&mut self, old: Vec<String>) -> Result<(), WriterError> {
        let sink = self.staging();
        let schemas = [
            schema::experiments_schema(),
            schema::metadata_schema(),
            schema::summaries_schema(),
        ];
        let mut files = Vec::new();
        for schema in schemas {
            let staged = sink.stage()?;
            let write = staged.file.try_clone().map_err(|source| SinkError::Io {
                action: "duplicating",
                path: staged.path().to_owned(),
                source,
            })?;
            let writer = ArrowWriter::try_new(write, schema, Some(self.props.clone()))?;
            files.push((staged, writer));
        }
        let written_at = self.index.catalog_now()?;
        let mut after: Option<String> = None;
        loop {
            if self.stopping() {
                // Done again after the next start; the deltas are still in place.
                for (staged, _) in files {
                    sink.discard(staged);
                }
                return Ok(());
            }
            let rows = self.index.catalog_page(after.as_deref(), self.page)?;
            let Some(last) = rows.last() else {
                break;
            };
            after = Some(last.record.id.clone());
            for ((_, batch), (_, writer)) in batches(&rows, written_at)?.into_iter().zip(&mut files)
            {
                writer.write(&batch)?;
                writer.flush()?;
            }
            if rows.len() < self.page {
                break;
            }
            drop(rows);
            release_freed_memory();
        }
        for (table, (staged, mut writer)) in TABLES.iter().zip(files) {
            writer.finish()?;
            drop(writer);
            let key = ObjectKey::from_manifest(format!(
                "{table}/{}-{}.parquet",
                self.daemon_id,
                uuid::Uuid::now_v7().simple()
            ));
            self.index.add_catalog_file(key.as_str())?;
            self.publish_staged(&sink, staged, &key)?;
        }
        for key in &old {
            self.delete(&ObjectKey::from_manifest(key.clone()))?;
        }
        self.index.remove_catalog_files(&old)?;
        self.since_rewrite = 0;
        tracing::debug!(replaced = old.len(), "catalog tables rewritten whole");
        Ok(())
    }

    /// Where whole-catalog files are staged.
    fn staging(&self) -> LocalSink {
        match &self.target {
            SnapshotTarget::Local(sink) => sink.clone(),
            SnapshotTarget::Remote { staging, .. } => staging.clone(),
        }
    }

    /// Publishes a staged file: renamed into place, or uploaded and removed.
    fn publish_staged(
        &self,
        sink: &LocalSink,
        staged: crate::sink::StagedFile,
        key: &ObjectKey,
    ) -> Result<(), WriterError> {
        match &self.target {
            SnapshotTarget::Local(sink) => {
                sink.publish(staged, key)?;
            }
            SnapshotTarget::Remote { store, runtime, .. } => {
                let path = staged.path().to_owned();
                let size = staged.file.metadata().map(|m| m.len()).unwrap_or(0);
                let uploaded = runtime.block_on(async {
                    let file =
                        tokio::fs::File::open(&path)
                            .await
                            .map_err(|source| SinkError::Io {
                                action: "opening",
                                path: path.clone(),
                                source,
                            })?;
                    crate::sink::upload::put_file(
                        store.as_ref(),
                        key,
                        file,
                        size,
                        16 << 20,
                        8 << 20,
                        &path,
                    )
                    .await
                });
                sink.discard(staged);
                uploaded?;
            }
        }
        Ok(())
    }

    fn put(&self, key: &ObjectKey, batches: &[RecordBatch]) -> Result<(), WriterError> {
        let mut bytes = Vec::new();
        let schema = match batches.first() {
            Some(b) => b.schema(),
            None => return Ok(()),
        };
        let mut writer = ArrowWriter::try_new(&mut bytes, schema, Some(self.props.clone()))?;
        for batch in batches {
            writer.write(batch)?;
            writer.flush()?;
        }
        writer.close()?;
        match &self.target {
            SnapshotTarget::Local(sink) => {
                let mut staged = sink.stage()?;
                if let Err(source) = std::io::Write::write_all(&mut staged.file, &bytes) {
                    let path = staged.path().to_owned();
                    sink.discard(staged);
                    return Err(SinkError::Io {
                        action: "writing",
                        path,
                        source,
                    }
                    .into());
                }
                sink.publish(staged, key)?;
            }
            SnapshotTarget::Remote { store, runtime, .. } => {
                let location = object_path(key)?;
                runtime
                    .block_on(store.put(&location, PutPayload::from(bytes)))
                    .map_err(remote_err("uploading", key.as_str(), store.as_ref()))?;
            }
        }
        tracing::debug!(file = %key, "catalog file written");
        Ok(())
    }

    fn delete(&self, key: &ObjectKey) -> Result<(), WriterError> {
        match &self.target {
            SnapshotTarget::Local(sink) => sink.remove(key),
            SnapshotTarget::Remote { store, runtime, .. } => {
                runtime.block_on(delete_remote(store.as_ref(), key))?;
            }
        }
        Ok(())
    }
}

fn utc(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(values.map(Some).collect::<StringArray>())
}

fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// The three tables' rows for these experiments.
fn batches(
    rows: &[CatalogRows],
    written_at: i64,
) -> Result<[(&'static str, RecordBatch); 3], WriterError> {
    let experiments = RecordBatch::try_new(
        schema::experiments_schema(),
        vec![
            strings(rows.iter().map(|r| r.record.id.as_str())),
            strings(rows.iter().map(|r| r.record.name.as_str())),
            strings(rows.iter().map(|r| r.record.namespace.as_str())),
            strings(rows.iter().map(|r| r.record.owner.as_str())),
            strings(rows.iter().map(|r| framework_name(r.record.framework))),
            strings(rows.iter().map(|r| r.record.task.as_str())),
            strings(rows.iter().map(|r| r.record.external_id.as_str())),
            utc(rows.iter().map(|r| r.record.created_at).collect()),
            utc(rows.iter().map(|r| r.record.updated_at).collect()),
        ],
    )?;
    let md: Vec<(&str, &str, String, i64)> = rows
        .iter()
        .flat_map(|r| {
            r.metadata.iter().map(|(k, e)| {
                (
                    r.record.id.as_str(),
                    k.as_str(),
                    e.value.to_string(),
                    e.updated_at,
                )
            })
        })
        .collect();
    let metadata = RecordBatch::try_new(
        schema::metadata_schema(),
        vec![
            strings(md.iter().map(|m| m.0)),
            strings(md.iter().map(|m| m.1)),
            strings(md.iter().map(|m| m.2.as_str())),
            utc(md.iter().map(|m| m.3).collect()),
        ],
    )?;
    let sums: Vec<(&str, &str, &crate::model::MetricSummary)> = rows
        .iter()
        .flat_map(|r| {
            r.summaries
                .iter()
                .map(|(k, s)| (r.record.id.as_str(), k.as_str(), s))
        })
        .collect();
    let summaries = RecordBatch::try_new(
        schema::summaries_schema(),
        vec![
            strings(sums.iter().map(|s| s.0)),
            strings(sums.iter().map(|s| s.1)),
            Arc::new(
                sums.iter()
                    .map(|s| (s.2.count > 0).then(|| finite(s.2.last)).flatten())
                    .collect::<Float64Array>(),
            ),
            Arc::new(
                sums.iter()
                    .map(|s| (s.2.count > 0).then_some(s.2.last_step))
                    .collect::<Int64Array>(),
            ),
            Arc::new(
                sums.iter()
                    .map(|s| finite(s.2.min))
                    .collect::<Float64Array>(),
            ),
            Arc::new(
                sums.iter()
                    .map(|s| finite(s.2.max))
                    .collect::<Float64Array>(),
            ),
            Arc::new(
                sums.iter()
                    .map(|s| Some(s.2.count as i64))
                    .collect::<Int64Array>(),
            ),
            Arc::new(
                sums.iter()
                    .map(|s| Some(s.2.points as i64))
                    .collect::<Int64Array>(),
            ),
            utc(vec![written_at; sums.len()]),
        ],
    )?;
    Ok([
        ("experiments", experiments),
        ("metadata", metadata),
        ("summaries", summaries),
    ])
}

/// Hands memory freed on this thread back to the system now. A catch-up after a
/// bulk change writes hundreds of pages back to back, and mimalloc would keep each
/// page's freed buffers (Arrow arrays, Parquet and zstd state) for a while: some
/// 30 MiB above what is in use, sampled during a catch-up of a million experiments.
fn release_freed_memory() {
    // SAFETY: mi_collect has no preconditions; it frees only memory that holds no
    // live allocation. Without mimalloc as the global allocator it finds nothing.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// The running catalog-table task; [`SnapshotLoop::finish`] writes a last page of
/// what changed and stops it.
#[derive(Debug)]
pub struct SnapshotLoop {
    stop: oneshot::Sender<()>,
    stopping: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl SnapshotLoop {
    /// Checks for changes every `every` on the current runtime.
    pub fn start(snapshots: Snapshots, every: Duration) -> Self {
        let stopping = Arc::clone(&snapshots.stopping);
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut snapshots = Some(snapshots);
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let last = tokio::select! {
                    _ = &mut stopped => true,
                    _ = tick.tick() => false,
                };
                let Some(mut s) = snapshots.take() else {
                    return;
                };
                let done = tokio::task::spawn_blocking(move || {
                    if let Err(e) = s.write_if_changed() {
                        tracing::warn!(error = %e, "writing the catalog tables failed; retrying");
                    }
                    s
                })
                .await;
                match done {
                    Ok(s) if !last => snapshots = Some(s),
                    _ => return,
                }
            }
        });
        Self {
            stop,
            stopping,
            task,
        }
    }

    /// Ends a pass in progress after its current page, writes one more page of
    /// what changed, then stops. Experiments left over (a large catalogue changed
    /// in bulk) stay marked in the index and are written after the next start.
    pub async fn finish(self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::NewExperiment;

    fn rows_of(dir: &std::path::Path, table: &str) -> (usize, usize) {
        let mut files = 0;
        let mut rows = 0;
        for e in std::fs::read_dir(dir.join(table)).unwrap() {
            let path = e.unwrap().path();
            files += 1;
            let f = std::fs::File::open(path).unwrap();
            rows += parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(f)
                .unwrap()
                .metadata()
                .file_metadata()
                .num_rows() as usize;
        }
        (files, rows)
    }

    fn experiment(i: usize) -> NewExperiment {
        NewExperiment {
            name: format!("e{i}"),
            namespace: "ns".into(),
            owner: String::new(),
            framework: 0,
            task: String::new(),
            external_id: String::new(),
        }
    }

    /// An index and its catalog tables under a temporary root (`root/`).
    fn local_snapshots() -> (tempfile::TempDir, Arc<Index>, Snapshots) {
        let dir = tempfile::tempdir().unwrap();
        let index = Arc::new(Index::open(&dir.path().join("index.redb")).unwrap());
        let sink = LocalSink::open(&dir.path().join("root"), &dir.path().join("staging")).unwrap();
        let snapshots = Snapshots::new(
            Arc::clone(&index),
            SnapshotTarget::Local(sink),
            Arc::from("d"),
            schema::writer_properties(&crate::config::RollPolicy::default()),
        );
        (dir, index, snapshots)
    }

    #[test]
    fn marks_of_ids_without_a_record_do_not_stop_the_writer() {
        let (dir, index, mut snapshots) = local_snapshots();
        snapshots.page = 2;
        // Two summaries for ids the catalog does not hold: a page of no rows.
        index.merge_summaries_for_test(&["ghost-1", "ghost-2"]);
        index.create_experiment(experiment(0), &[]).unwrap();
        assert!(snapshots.write_if_changed().unwrap());
        assert_eq!(rows_of(&dir.path().join("root"), "experiments"), (1, 1));
        assert!(!index.catalog_is_dirty().unwrap());
    }

    #[test]
    fn deltas_pile_up_then_the_catalog_is_rewritten_whole() {
        let (dir, index, mut snapshots) = local_snapshots();
        assert!(
            !snapshots.write_if_changed().unwrap(),
            "nothing to write yet"
        );
        for i in 0..(CONSOLIDATE_AFTER + 1) {
            index
                .create_experiment(experiment(i), &[("i".into(), serde_json::json!(i))])
                .unwrap();
            assert!(snapshots.write_if_changed().unwrap());
            assert!(!snapshots.write_if_changed().unwrap(), "no change, no file");
        }
        // The deltas passed the limit once: a whole file per table, and the deltas
        // written since.
        let root = dir.path().join("root");
        let (files, rows) = rows_of(&root, "experiments");
        assert!(files < CONSOLIDATE_AFTER, "{files} files");
        assert!(rows > CONSOLIDATE_AFTER);
        let (files, _) = rows_of(&root, "metadata");
        assert!(files < CONSOLIDATE_AFTER, "{files} files");
        assert_eq!(index.catalog_files().unwrap().len(), 3 * files);
        assert!(!index.catalog_is_dirty().unwrap());
        // A whole rewrite holds every experiment once.
        let old = index.catalog_files().unwrap();
        snapshots.consolidate(old).unwrap();
        assert_eq!(rows_of(&root, "experiments"), (1, CONSOLIDATE_AFTER + 1));
        assert_eq!(rows_of(&root, "metadata"), (1, CONSOLIDATE_AFTER + 1));
    }

    /// A few changes to a large catalogue pile up as deltas, up to a bound,
    /// instead of rewriting it whole every few passes.
    #[test]
    fn a_large_catalogue_is_rewritten_once_its_deltas_hold_a_share_or_pile_up() {
        let (dir, index, mut snapshots) = local_snapshots();
        snapshots.most_deltas = 24;
        let root = dir.path().join("root");
        for i in 0..200 {
            index.create_experiment(experiment(i), &[]).unwrap();
        }
        assert!(snapshots.write_if_changed().unwrap());
        snapshots
            .consolidate(index.catalog_files().unwrap())
            .unwrap();
        assert_eq!(rows_of(&root, "experiments"), (1, 200));
        // One experiment changed a pass: 23 changes are far from a quarter of
        // 200 experiments, so no rewrite until the files pass 24 a table.
        let change = |n: usize| {
            index
                .create_experiment(experiment(n), &[("n".into(), serde_json::json!(n))])
                .unwrap();
        };
        for n in 0..23 {
            change(n);
            assert!(snapshots.write_if_changed().unwrap());
        }
        assert_eq!(rows_of(&root, "experiments"), (24, 223));
        change(23);
        assert!(snapshots.write_if_changed().unwrap());
        assert_eq!(rows_of(&root, "experiments"), (1, 200), "past the bound");
        // Past 16 files a table, changes that hold a quarter of the catalogue
        // rewrite it.
        snapshots.most_deltas = MOST_DELTAS;
        for n in 0..16 {
            change(2 * n);
            change(2 * n + 1);
            assert!(snapshots.write_if_changed().unwrap());
        }
        assert_eq!(rows_of(&root, "experiments"), (17, 232), "32 changes kept");
        for n in 32..50 {
            change(n);
        }
        assert!(snapshots.write_if_changed().unwrap());
        assert_eq!(rows_of(&root, "experiments"), (1, 200), "a quarter changed");
        assert!(!index.catalog_is_dirty().unwrap());
    }

    #[test]
    fn a_stopping_pass_writes_one_page_and_leaves_the_rest_marked() {
        let (dir, index, mut snapshots) = local_snapshots();
        snapshots.page = 2;
        for i in 0..5 {
            index.create_experiment(experiment(i), &[]).unwrap();
        }
        snapshots.stopping.store(true, Ordering::Relaxed);
        assert!(snapshots.write_if_changed().unwrap());
        let root = dir.path().join("root");
        assert_eq!(rows_of(&root, "experiments"), (1, 2));
        assert_eq!(index.dirty_catalog(10).unwrap().rows.len(), 3);
        // After a restart (not stopping) the rest is written, a page a file.
        snapshots.stopping.store(false, Ordering::Relaxed);
        assert!(snapshots.write_if_changed().unwrap());
        assert_eq!(rows_of(&root, "experiments"), (3, 5));
        assert!(!index.catalog_is_dirty().unwrap());
        // A whole rewrite started while stopping is dropped, staged files and all.
        snapshots.stopping.store(true, Ordering::Relaxed);
        let old = index.catalog_files().unwrap();
        snapshots.consolidate(old.clone()).unwrap();
        assert_eq!(index.catalog_files().unwrap(), old);
        assert_eq!(rows_of(&root, "experiments"), (3, 5));
        let staged = std::fs::read_dir(dir.path().join("staging"))
            .unwrap()
            .count();
        assert_eq!(staged, 0);
    }
}
