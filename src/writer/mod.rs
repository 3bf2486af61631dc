//! Writer threads. Each owns a set of partitions (one table, namespace and UTC date
//! each) with columnar buffers, rolls them into Parquet files by rows, bytes or age,
//! publishes the files atomically and records them in the index. Requests reach a
//! writer through its bounded queue ([`crate::ingest::Command`]); since the queue is
//! FIFO, a snapshot request sees every batch acknowledged before it.

mod events;
mod metrics;
pub mod schema;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use arrow_schema::ArrowError;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use parquet::arrow::ArrowWriter;
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;

use crate::config::RollPolicy;
use crate::index::{FileEntry, Index, IndexError, PublishIntent};
use crate::ingest::{Command, Reservation, Snapshot};
use crate::model::{EventsBatch, ExperimentRef, MetricsBatch, now_micros};
use crate::paths::{ObjectKey, PartitionKey, Table, utc_date};
use crate::sink::upload::Uploader;
use crate::sink::{LocalSink, SinkError};
use crate::telemetry::{Metrics, TableLabel, TableName};
use crate::wal::{Seq, Tracker};

use events::EventsBuffer;
use metrics::MetricsBuffer;

/// Errors writing a file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriterError {
    #[error("building Arrow arrays: {0}")]
    Arrow(#[from] ArrowError),
    #[error("encoding Parquet: {0}")]
    Parquet(#[from] ParquetError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("recording the file in the index: {0}")]
    Index(#[from] IndexError),
}

/// What every writer thread shares.
#[derive(Debug, Clone)]
pub struct WriterContext {
    pub index: Arc<Index>,
    /// Where files are published: the storage root, or the spool of an S3 root.
    pub sink: LocalSink,
    /// With an S3 root: takes each file published into the spool.
    pub uploader: Option<Arc<Uploader>>,
    pub daemon_id: Arc<str>,
    pub roll: RollPolicy,
    /// Where published WAL records are released, and the oldest record still on disk.
    pub wal: Option<(Arc<Tracker>, Arc<AtomicU64>)>,
    pub metrics: Metrics,
}

/// Starts writer thread `id` reading `rx`. It returns once told to shut down (or
/// once every sender is gone), after publishing every buffered row it can.
pub fn spawn(
    id: usize,
    ctx: WriterContext,
    rx: Receiver<Command>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("mboxd-writer-{id}"))
        .spawn(move || Writer::new(ctx).run(&rx))
}

/// A partition's buffer and the memory reservations of the batches in it.
#[derive(Debug)]
struct Partition<B> {
    buffer: B,
    reservations: Vec<Reservation>,
    bytes: usize,
    /// (WAL seq, experiment) of every block appended, for exactly-once bookkeeping.
    wal: Vec<(Seq, Arc<str>)>,
    /// When the oldest buffered row arrived (or the last failed publish).
    since: Instant,
}

impl<B: Default> Partition<B> {
    fn new() -> Self {
        Self {
            buffer: B::default(),
            reservations: Vec::new(),
            bytes: 0,
            wal: Vec::new(),
            since: Instant::now(),
        }
    }

    fn hold(&mut self, reservation: Reservation) {
        self.bytes += reservation.bytes();
        self.reservations.push(reservation);
    }
}

#[derive(Debug)]
struct Writer {
    ctx: WriterContext,
    props: WriterProperties,
    metrics: HashMap<PartitionKey, Partition<MetricsBuffer>>,
    events: HashMap<PartitionKey, Partition<EventsBuffer>>,
}

impl Writer {
    fn new(ctx: WriterContext) -> Self {
        let props = schema::writer_properties(&ctx.roll);
        Self {
            ctx,
            props,
            metrics: HashMap::new(),
            events: HashMap::new(),
        }
    }

    fn run(mut self, rx: &Receiver<Command>) {
        let tick =
            (self.ctx.roll.max_age / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        loop {
            match rx.recv_timeout(tick) {
                Ok(Command::Metrics(batch, reservation, seq)) => {
                    self.ctx.metrics.queue_pops.inc();
                    self.add_metrics(batch, reservation, seq)
                }
                Ok(Command::Events(batch, reservation, seq)) => {
                    self.ctx.metrics.queue_pops.inc();
                    self.add_events(batch, reservation, seq)
                }
                Ok(Command::Snapshot(experiment, reply)) => {
                    let _ = reply.send(self.snapshot(&experiment));
                }
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    self.roll(|_| true);
                    let left = self.metrics.len() + self.events.len();
                    if left > 0 {
                        tracing::error!(
                            partitions = left,
                            "writer stopped with unpublished partitions"
                        );
                    }
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            let max_age = self.ctx.roll.max_age;
            self.roll(|since| since.elapsed() >= max_age);
        }
    }

    fn add_metrics(&mut self, batch: MetricsBatch, reservation: Reservation, seq: Option<Seq>) {
        let at = batch.ingested_at();
        let date = utc_date(at);
        let mut reservation = Some(reservation);
        let mut touched = Vec::new();
        for block in batch.into_blocks() {
            let key = PartitionKey {
                table: Table::Metrics,
                namespace: Arc::clone(&block.experiment.namespace),
                date,
            };
            let partition = self
                .metrics
                .entry(key.clone())
                .or_insert_with(Partition::new);
            if let Some(seq) = seq {
                partition.wal.push((seq, Arc::clone(&block.experiment.id)));
            }
            partition.buffer.append(block, at);
            if let Some(r) = reservation.take() {
                partition.hold(r);
            }
            touched.push(key);
        }
        let (max_rows, max_bytes) = (self.ctx.roll.max_rows, self.ctx.roll.max_bytes);
        for key in touched {
            if self
                .metrics
                .get(&key)
                .is_some_and(|p| p.buffer.len() >= max_rows || p.bytes >= max_bytes)
            {
                self.publish_metrics(&key);
            }
        }
    }

    fn add_events(&mut self, batch: EventsBatch, reservation: Reservation, seq: Option<Seq>) {
        let at = batch.ingested_at();
        let key = PartitionKey {
            table: Table::Events,
            namespace: Arc::clone(&batch.experiment().namespace),
            date: utc_date(at),
        };
        let experiment = Arc::clone(&batch.experiment().id);
        let partition = self
            .events
            .entry(key.clone())
            .or_insert_with(Partition::new);
        if let Some(seq) = seq {
            partition.wal.push((seq, Arc::clone(&experiment)));
        }
        partition
            .buffer
            .append(&experiment, batch.into_events(), at);
        partition.hold(reservation);
        if partition.buffer.len() >= self.ctx.roll.max_rows
            || partition.buffer.approx_bytes() >= self.ctx.roll.max_bytes
        {
            self.publish_events(&key);
        }
    }

    /// Publishes every partition whose age passes `due`.
    fn roll(&mut self, due: impl Fn(Instant) -> bool) {
        publish_due(&self.ctx, &self.props, &mut self.metrics, &due);
        publish_due(&self.ctx, &self.props, &mut self.events, &due);
    }

    fn publish_metrics(&mut self, key: &PartitionKey) {
        publish(&self.ctx, &self.props, &mut self.metrics, key);
    }

    fn publish_events(&mut self, key: &PartitionKey) {
        publish(&self.ctx, &self.props, &mut self.events, key);
    }

    fn snapshot(&self, experiment: &ExperimentRef) -> Result<Snapshot, IndexError> {
        let mut snapshot = Snapshot::default();
        let mut metric_keys: Vec<_> = self
            .metrics
            .keys()
            .filter(|k| k.namespace == experiment.namespace)
            .collect();
        metric_keys.sort();
        for key in metric_keys {
            snapshot
                .metrics
                .extend(self.metrics[key].buffer.points_of(&experiment.id));
        }
        let mut event_keys: Vec<_> = self
            .events
            .keys()
            .filter(|k| k.namespace == experiment.namespace)
            .collect();
        event_keys.sort();
        for key in event_keys {
            snapshot
                .events
                .extend(self.events[key].buffer.points_of(&experiment.id));
        }
        // Read in this thread, which is the only one that publishes this experiment's
        // files: no file can move from the buffers to the manifest in between.
        let index = &self.ctx.index;
        snapshot.metric_files = index.files(Table::Metrics, &experiment.namespace)?;
        snapshot.event_files = index.files(Table::Events, &experiment.namespace)?;
        snapshot
            .metric_files
            .retain(|f| f.may_contain(&experiment.id));
        snapshot
            .event_files
            .retain(|f| f.may_contain(&experiment.id));
        Ok(snapshot)
    }
}

/// A partition buffer that can become one sorted Arrow batch.
trait RollBuffer {
    /// The rows as one batch, with the smallest and largest experiment id.
    fn to_record_batch(&self) -> Result<(RecordBatch, String, String), ArrowError>;
}

impl RollBuffer for MetricsBuffer {
    fn to_record_batch(&self) -> Result<(RecordBatch, String, String), ArrowError> {
        MetricsBuffer::to_record_batch(self)
    }
}

impl RollBuffer for EventsBuffer {
    fn to_record_batch(&self) -> Result<(RecordBatch, String, String), ArrowError> {
        EventsBuffer::to_record_batch(self)
    }
}

/// Publishes the partitions of `map` whose age passes `due`.
fn publish_due<B: RollBuffer>(
    ctx: &WriterContext,
    props: &WriterProperties,
    map: &mut HashMap<PartitionKey, Partition<B>>,
    due: &impl Fn(Instant) -> bool,
) {
    let keys: Vec<_> = map
        .iter()
        .filter(|(_, p)| due(p.since))
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        publish(ctx, props, map, &key);
    }
}

/// Publishes one partition. On success it is removed (releasing its memory
/// reservations); on failure its rows stay and the publish is retried after
/// `max_age`.
fn publish<B: RollBuffer>(
    ctx: &WriterContext,
    props: &WriterProperties,
    map: &mut HashMap<PartitionKey, Partition<B>>,
    key: &PartitionKey,
) {
    let Some(partition) = map.get_mut(key) else {
        return;
    };
    let written = partition
        .buffer
        .to_record_batch()
        .map_err(WriterError::from)
        .and_then(|(batch, min, max)| {
            write_file(ctx, props, key, &batch, min, max, &partition.wal)
        });
    match written {
        Ok(_) => drop(map.remove(key)),
        Err(e) => {
            tracing::error!(partition = %key.dir(), error = %e, "publishing failed; keeping the rows and retrying");
            partition.since = Instant::now();
        }
    }
}

/// Encodes `batch` into a staged file and publishes it exactly once: a durable
/// intent, the atomic rename, then the manifest entry with the WAL pieces the file
/// holds (see [`crate::index`]). Then the pieces are released from the WAL.
fn write_file(
    ctx: &WriterContext,
    props: &WriterProperties,
    partition: &PartitionKey,
    batch: &RecordBatch,
    min_experiment: String,
    max_experiment: String,
    wal_blocks: &[(Seq, Arc<str>)],
) -> Result<FileEntry, WriterError> {
    let started = Instant::now();
    let mut staged = ctx.sink.stage()?;
    let encoded = (|| -> Result<u64, ParquetError> {
        let mut writer =
            ArrowWriter::try_new(&mut staged.file, batch.schema(), Some(props.clone()))?;
        writer.write(batch)?;
        writer.finish()?;
        Ok(writer.bytes_written() as u64)
    })();
    let bytes = match encoded {
        Ok(bytes) => bytes,
        Err(e) => {
            ctx.sink.discard(staged);
            return Err(e.into());
        }
    };
    let key = ObjectKey::new_file(partition, &ctx.daemon_id);
    let mut pieces: Vec<(u64, String)> = wal_blocks
        .iter()
        .map(|(s, e)| (*s, e.to_string()))
        .collect();
    pieces.sort();
    pieces.dedup();
    let intent = PublishIntent {
        entry: FileEntry {
            key: key.as_str().to_owned(),
            rows: batch.num_rows() as u64,
            bytes,
            min_experiment,
            max_experiment,
            created_at: now_micros(),
        },
        partition: partition.dir(),
        pieces,
    };
    if let Err(e) = ctx.index.begin_publish(&intent) {
        ctx.sink.discard(staged);
        return Err(e.into());
    }
    ctx.sink.publish(staged, &key)?;
    let forget_below = ctx
        .wal
        .as_ref()
        .map_or(0, |(_, from)| from.load(Ordering::Acquire));
    ctx.index
        .commit_publish(&intent, forget_below, ctx.uploader.is_some())?;
    if let Some(uploader) = &ctx.uploader {
        uploader.enqueue(key.clone(), bytes);
    }
    if let Some((tracker, _)) = &ctx.wal {
        for (seq, _) in wal_blocks {
            tracker.release(*seq, 1);
        }
    }
    let label = TableLabel {
        table: match partition.table {
            Table::Metrics => TableName::metrics,
            Table::Events => TableName::events,
        },
    };
    let m = &ctx.metrics;
    m.files_published.get_or_create(&label).inc();
    m.published_bytes.get_or_create(&label).inc_by(bytes);
    m.published_rows
        .get_or_create(&label)
        .inc_by(intent.entry.rows);
    m.publish_seconds.observe(started.elapsed().as_secs_f64());
    tracing::debug!(
        file = %key,
        rows = intent.entry.rows,
        bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "published"
    );
    Ok(intent.entry)
}
