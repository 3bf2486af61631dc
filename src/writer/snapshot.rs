//! The `experiments/` and `metadata/` tables: snapshots of the index for joins in
//! DuckDB, Spark or Trino (names, owners and hyperparameters beside the metric rows).
//!
//! Each daemon keeps one file per table, `<table>/<daemon-id>.parquet`, holding
//! every experiment (or metadata entry) it knows, and replaces it whole (an atomic
//! rename locally, one PUT on S3) shortly after the index changes. The snapshots
//! are derived from the index, so they need no WAL: one that fails to be written is
//! written again at the next tick or the next start. Several daemons that saw the
//! same experiment each list it; readers keep one row per id (the latest
//! `updated_at`).

use std::sync::Arc;
use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch, StringArray, TimestampMicrosecondArray};
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use tokio::sync::oneshot;

use super::{WriterError, schema};
use crate::index::Index;
use crate::paths::ObjectKey;
use crate::proto::MlFramework;
use crate::sink::{LocalSink, SinkError, object_path};

/// Where the snapshot files go.
#[derive(Debug, Clone)]
pub enum SnapshotTarget {
    /// Renamed into place under a local root.
    Local(LocalSink),
    /// Put into the remote store.
    Remote {
        store: Arc<dyn ObjectStore>,
        runtime: tokio::runtime::Handle,
    },
}

/// Writes the snapshot tables of one daemon when the index changes.
#[derive(Debug)]
pub struct Snapshots {
    index: Arc<Index>,
    target: SnapshotTarget,
    daemon_id: Arc<str>,
    props: WriterProperties,
    /// The index generation last written; `None` before the first write.
    written: Option<u64>,
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
            written: None,
        }
    }

    /// Rewrites both tables if the index changed since the last write (always on
    /// the first call, unless there are no experiments). Blocking.
    pub fn write_if_changed(&mut self) -> Result<bool, WriterError> {
        let generation = self.index.generation();
        if self.written == Some(generation) {
            return Ok(false);
        }
        let experiments = experiments_batch(&self.index)?;
        if experiments.num_rows() == 0 {
            self.written = Some(generation);
            return Ok(false);
        }
        let metadata = metadata_batch(&self.index)?;
        self.put("experiments", &experiments)?;
        self.put("metadata", &metadata)?;
        self.written = Some(generation);
        Ok(true)
    }

    fn put(&self, table: &str, batch: &RecordBatch) -> Result<(), WriterError> {
        let key = ObjectKey::from_manifest(format!("{table}/{}.parquet", self.daemon_id));
        let mut bytes = Vec::new();
        let mut writer =
            ArrowWriter::try_new(&mut bytes, batch.schema(), Some(self.props.clone()))?;
        writer.write(batch)?;
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
                sink.publish(staged, &key)?;
            }
            SnapshotTarget::Remote { store, runtime } => {
                let location = object_path(&key)?;
                runtime
                    .block_on(store.put(&location, PutPayload::from(bytes)))
                    .map_err(|source| SinkError::Remote {
                        action: "uploading",
                        key: key.to_string(),
                        store: store.to_string(),
                        source: Box::new(source),
                    })?;
            }
        }
        tracing::debug!(file = %key, rows = batch.num_rows(), "snapshot written");
        Ok(())
    }
}

fn utc(values: Vec<i64>) -> ArrayRef {
    Arc::new(TimestampMicrosecondArray::from(values).with_timezone("UTC"))
}

fn strings<'a>(values: impl Iterator<Item = &'a str>) -> ArrayRef {
    Arc::new(values.map(Some).collect::<StringArray>())
}

fn experiments_batch(index: &Index) -> Result<RecordBatch, WriterError> {
    let rows = index.all_experiments()?;
    let framework = |f: i32| {
        MlFramework::try_from(f)
            .map(|f| f.as_str_name())
            .unwrap_or("UNKNOWN")
    };
    Ok(RecordBatch::try_new(
        schema::experiments_schema(),
        vec![
            strings(rows.iter().map(|r| r.id.as_str())),
            strings(rows.iter().map(|r| r.name.as_str())),
            strings(rows.iter().map(|r| r.namespace.as_str())),
            strings(rows.iter().map(|r| r.owner.as_str())),
            strings(rows.iter().map(|r| framework(r.framework))),
            strings(rows.iter().map(|r| r.task.as_str())),
            strings(rows.iter().map(|r| r.external_id.as_str())),
            utc(rows.iter().map(|r| r.created_at).collect()),
            utc(rows.iter().map(|r| r.updated_at).collect()),
        ],
    )?)
}

fn metadata_batch(index: &Index) -> Result<RecordBatch, WriterError> {
    let rows = index.all_metadata()?;
    let values: Vec<String> = rows.iter().map(|(_, _, e)| e.value.to_string()).collect();
    Ok(RecordBatch::try_new(
        schema::metadata_schema(),
        vec![
            strings(rows.iter().map(|(id, _, _)| id.as_str())),
            strings(rows.iter().map(|(_, key, _)| key.as_str())),
            strings(values.iter().map(String::as_str)),
            utc(rows.iter().map(|(_, _, e)| e.updated_at).collect()),
        ],
    )?)
}

/// The running snapshot task; [`SnapshotLoop::finish`] writes a last snapshot and
/// stops it.
#[derive(Debug)]
pub struct SnapshotLoop {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl SnapshotLoop {
    /// Checks for changes every `every` on the current runtime.
    pub fn start(snapshots: Snapshots, every: Duration) -> Self {
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
                        tracing::warn!(error = %e, "writing the experiments and metadata snapshots failed; retrying");
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
        Self { stop, task }
    }

    /// Writes the snapshots once more if anything changed, then stops.
    pub async fn finish(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
