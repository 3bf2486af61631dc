//! Writer threads. Each owns a set of partitions (one table, namespace and UTC date
//! each). A metrics partition buffers rows until it holds a row group's worth,
//! then encodes them, sorted by (experiment_id, key, step), as the next row group
//! of a Parquet file in the staging folder; the file is published once it is old
//! or large enough. So an open partition costs one row group of memory, and the
//! global sort of a partition is compaction's job ([`crate::compact`]). Events are
//! few: an events partition keeps its rows until its file rolls.
//!
//! Every buffered chunk and every staged row group is visible to reads through the
//! writer's [`WriterView`]; reads never pass through a writer's queue.
//! Publication itself is [`Persister`]'s; a writer's metrics files are published
//! on a thread of its own ([`publish`]), so commits do not hold up its queue.

pub mod events;
pub(crate) mod file;
pub mod metrics;
mod publish;
pub mod schema;
pub mod snapshot;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use arrow_schema::ArrowError;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use parquet::errors::ParquetError;
use parquet::file::properties::WriterProperties;

use crate::config::RollPolicy;
use crate::index::IndexError;
use crate::ingest::{Command, MemoryBudget, Reservation, Work};
use crate::live::WriterView;
use crate::model::{EventChunk, MetricChunk, MetricSummary, Micros};
use crate::paths::{ObjectKey, PartitionKey, Table, utc_date};
use crate::persist::{Persister, Publication};
use crate::sink::SinkError;
use crate::wal::Seq;

use events::EventsBuffer;
use file::StreamingFile;
use metrics::MetricsBuffer;
use publish::Publisher;

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
    #[error(
        "{0} could not be made durable; its rows stay in the WAL and are written again at the next start"
    )]
    NotPlaced(String),
}

/// What every writer thread shares.
#[derive(Debug, Clone)]
pub struct WriterContext {
    pub persister: Persister,
    pub daemon_id: Arc<str>,
    pub roll: RollPolicy,
    /// The ingest memory budget: under pressure, writers encode buffers early.
    pub budget: Arc<MemoryBudget>,
}

/// Starts writer thread `id` reading `rx`. It returns once told to shut down (or
/// once every sender is gone), after publishing every buffered row it can.
pub fn spawn(
    id: usize,
    ctx: WriterContext,
    view: Arc<WriterView>,
    rx: Receiver<Command>,
) -> std::io::Result<JoinHandle<()>> {
    let publisher = Publisher::start(id, ctx.persister.clone(), Arc::clone(&view))?;
    std::thread::Builder::new()
        .name(format!("mboxd-writer-{id}"))
        .spawn(move || Writer::new(ctx, view, publisher).run(&rx))
}

/// What a file (or the rows on their way into one) owes the manifest.
#[derive(Debug, Default)]
struct Owed {
    /// (WAL seq, experiment) of every block.
    pieces: Vec<(Seq, Arc<str>)>,
    /// (client batch id, accepted at, points) of every batch.
    batch_ids: Vec<(Arc<str>, Micros, u64)>,
}

impl Owed {
    fn take_into(&mut self, other: &mut Owed) {
        other.pieces.append(&mut self.pieces);
        other.batch_ids.append(&mut self.batch_ids);
    }

    fn record(
        &mut self,
        seq: Option<Seq>,
        experiment: &Arc<str>,
        client_batch: &Option<Arc<str>>,
        at: Micros,
        points: u64,
    ) {
        if let Some(seq) = seq {
            self.pieces.push((seq, Arc::clone(experiment)));
        }
        if let Some(id) = client_batch
            && !self.batch_ids.iter().any(|(b, _, _)| b == id)
        {
            self.batch_ids.push((Arc::clone(id), at, points));
        }
    }
}

/// One metrics partition: the buffer of rows not yet encoded, and the staged file
/// their row groups go into.
#[derive(Debug)]
struct MetricsPartition {
    buffer: MetricsBuffer,
    /// Tags the buffer's chunks in the live view; new after each row group.
    tag: u64,
    /// The key of the file the buffered rows will be in.
    key: Arc<ObjectKey>,
    buffer_owes: Owed,
    reservations: Vec<Reservation>,
    file: Option<StreamingFile>,
    file_owes: Owed,
    summaries: HashMap<(Arc<str>, Arc<str>), MetricSummary>,
    /// When the oldest unpublished row arrived.
    since: Instant,
    /// After a failed write, when to try again.
    retry_at: Option<Instant>,
}

/// One events partition.
#[derive(Debug)]
struct EventsPartition {
    buffer: EventsBuffer,
    tag: u64,
    key: Arc<ObjectKey>,
    owes: Owed,
    reservations: Vec<Reservation>,
    since: Instant,
}

#[derive(Debug)]
struct Writer {
    ctx: WriterContext,
    props: WriterProperties,
    view: Arc<WriterView>,
    metrics: HashMap<PartitionKey, MetricsPartition>,
    events: HashMap<PartitionKey, EventsPartition>,
    /// Publishes finished metrics files.
    publisher: Publisher,
    /// Finished files whose publication failed here, retried each tick.
    unpublished: Vec<Publication>,
    next_tag: u64,
}

/// How long to wait after a failed write before trying again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// Under memory pressure, buffers at least this large are encoded early.
const MIN_EARLY_ROWS: usize = 4096;

/// How long a writer whose queue ran dry waits before it blocks on the queue
/// again, when the daemon has more than one core. A blocked writer is woken (a
/// futex call and a wake-up on another core) by every batch handed to it: under
/// single-point LogMetrics (16 clients, 2 cores) that was one wake per request,
/// and the two writers took a quarter of the daemon's CPU, nearly all of it
/// switching. A writer that naps instead takes whatever arrived meanwhile in one
/// go, and senders find no one to wake (5 % of the CPU, 8-11 % more requests a
/// second). The rows are visible to reads from the hand-off and their memory is
/// bounded by the budget, so the nap delays nothing a client waits for (a batch
/// that came during a nap holds its share of the budget up to 1 ms longer); a busy
/// writer never naps. On one core the wake costs no cross-core hop, and the batches a
/// napping writer then encodes at once preempt the requests in flight instead
/// (single-point `memory` on one core: 39 k/s without the nap, 31 k/s with it).
const LINGER: Duration = Duration::from_millis(1);

fn linger(rx: &Receiver<Command>, nap: Option<Duration>) {
    if let Some(nap) = nap
        && rx.is_empty()
    {
        std::thread::sleep(nap);
    }
}

impl Writer {
    fn new(ctx: WriterContext, view: Arc<WriterView>, publisher: Publisher) -> Self {
        let props = schema::writer_properties(&ctx.roll);
        Self {
            ctx,
            props,
            view,
            metrics: HashMap::new(),
            events: HashMap::new(),
            publisher,
            unpublished: Vec::new(),
            next_tag: 0,
        }
    }

    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        self.next_tag
    }

    fn new_key(&self, partition: &PartitionKey) -> Arc<ObjectKey> {
        Arc::new(ObjectKey::new_file(partition, &self.ctx.daemon_id))
    }

    fn run(mut self, rx: &Receiver<Command>) {
        let tick =
            (self.ctx.roll.max_age / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        let mut next_tick = Instant::now() + tick;
        // None on a single core (see LINGER).
        let nap = (crate::config::available_cores() > 1).then_some(LINGER);
        loop {
            let wait = next_tick.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(Command::Metrics(work)) => {
                    self.ctx.persister.metrics.queue_pops.inc();
                    self.add_metrics(work);
                    linger(rx, nap);
                }
                Ok(Command::Events(work)) => {
                    self.ctx.persister.metrics.queue_pops.inc();
                    self.add_events(work);
                    linger(rx, nap);
                }
                Ok(Command::Shutdown) | Err(RecvTimeoutError::Disconnected) => {
                    self.roll(|_| true);
                    self.retry_unpublished();
                    let left = self.metrics.len()
                        + self.events.len()
                        + self.unpublished.len()
                        + self.publisher.finish();
                    if left > 0 {
                        tracing::error!(
                            partitions = left,
                            "writer stopped with unpublished rows; they replay from the write-ahead log"
                        );
                    }
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
            }
            if Instant::now() >= next_tick {
                let max_age = self.ctx.roll.max_age;
                self.roll(|since| since.elapsed() >= max_age);
                self.retry_unpublished();
                next_tick = Instant::now() + tick;
            }
        }
    }

    fn add_metrics(&mut self, work: Work<Vec<Arc<MetricChunk>>>) {
        let Work {
            chunks,
            mut reservation,
            seq,
            client_batch,
            handoff,
            ingested_at: at,
            count: points,
        } = work;
        let date = utc_date(at);
        let mut touched: Vec<PartitionKey> = Vec::new();
        let mut claims = Vec::with_capacity(chunks.len());
        let last = chunks.len().saturating_sub(1);
        for (i, chunk) in chunks.into_iter().enumerate() {
            let experiment = &chunk.block.experiment;
            let key = PartitionKey {
                table: Table::Metrics,
                namespace: Arc::clone(&experiment.namespace),
                date,
            };
            if !self.metrics.contains_key(&key) {
                let partition = MetricsPartition {
                    buffer: MetricsBuffer::default(),
                    tag: self.tag(),
                    key: self.new_key(&key),
                    buffer_owes: Owed::default(),
                    reservations: Vec::new(),
                    file: None,
                    file_owes: Owed::default(),
                    summaries: HashMap::new(),
                    since: Instant::now(),
                    retry_at: None,
                };
                self.metrics.insert(key.clone(), partition);
            }
            let Some(p) = self.metrics.get_mut(&key) else {
                continue;
            };
            // Each partition holds the reservation of what it buffers; the last
            // chunk takes what is left (rounding).
            let share = if i == last {
                reservation.split(usize::MAX)
            } else {
                reservation.split(chunk.approx_bytes())
            };
            p.reservations.push(share);
            p.buffer_owes
                .record(seq, &experiment.id, &client_batch, at, points);
            claims.push((Arc::clone(&chunk), p.tag, Arc::clone(&p.key)));
            p.buffer.append(chunk);
            if !touched.contains(&key) {
                touched.push(key);
            }
        }
        self.view.claim_metrics(handoff, claims);
        let rg_rows = self.ctx.roll.row_group_rows;
        let rg_bytes = self.ctx.roll.row_group_bytes;
        for key in &touched {
            let full = self.metrics.get(key).is_some_and(|p| {
                p.retry_at.is_none()
                    && (p.buffer.len() >= rg_rows || p.buffer.approx_bytes() >= rg_bytes)
            });
            if full {
                self.encode(key);
            }
        }
        self.relieve_pressure();
        let (max_rows, max_bytes, max_series) = (
            self.ctx.roll.max_rows as u64,
            self.ctx.roll.max_bytes as u64,
            self.ctx.roll.max_series,
        );
        for key in touched {
            let large = self.metrics.get(&key).is_some_and(|p| {
                p.file.as_ref().is_some_and(|f| {
                    f.rows() >= max_rows
                        || f.bytes() >= max_bytes
                        || p.summaries.len() >= max_series
                })
            });
            if large {
                self.roll_metrics(&key);
            }
        }
    }

    /// Encodes the largest buffers early while the memory budget is nearly full, so
    /// waiting requests get room before any file rolls.
    fn relieve_pressure(&mut self) {
        let budget = &self.ctx.budget;
        if budget.used() * 4 < budget.limit() * 3 {
            return;
        }
        let largest = self
            .metrics
            .iter()
            .filter(|(_, p)| p.retry_at.is_none() && p.buffer.len() >= MIN_EARLY_ROWS)
            .max_by_key(|(_, p)| p.buffer.approx_bytes())
            .map(|(k, _)| k.clone());
        if let Some(key) = largest {
            self.encode(&key);
        }
    }

    /// Encodes a partition's buffer as the next row group of its staged file.
    fn encode(&mut self, key: &PartitionKey) {
        let new_tag = self.tag();
        let Some(p) = self.metrics.get_mut(key) else {
            return;
        };
        if p.buffer.is_empty() {
            return;
        }
        let encoded = (|| -> Result<(), WriterError> {
            let sorted = p.buffer.to_record_batch()?;
            if p.file.is_none() {
                p.file = Some(StreamingFile::create(
                    &self.ctx.persister.sink,
                    Arc::clone(&p.key),
                    schema::metrics_schema(),
                    &self.props,
                )?);
            }
            let Some(file) = p.file.as_mut() else {
                return Ok(());
            };
            file.append_row_group(&sorted)?;
            if let Some(staged) = file.view() {
                self.view.encoded(
                    p.tag,
                    sorted.experiments.iter().map(|(e, _)| e),
                    Arc::clone(staged),
                );
            }
            for (experiment, key, s) in p.buffer.summaries() {
                p.summaries
                    .entry((experiment, key))
                    .and_modify(|old| old.merge(&s))
                    .or_insert(s);
            }
            Ok(())
        })();
        match encoded {
            Ok(()) => {
                p.buffer_owes.take_into(&mut p.file_owes);
                p.buffer.clear();
                p.reservations.clear();
                p.tag = new_tag;
                p.retry_at = None;
            }
            Err(e) => {
                tracing::error!(partition = %key.dir(), error = %e, "encoding a row group failed; keeping the rows and retrying");
                p.retry_at = Some(Instant::now() + RETRY_AFTER);
                let failed = p.file.as_ref().is_some_and(StreamingFile::is_failed);
                if failed {
                    // Publish what the file holds; the buffered rows go to a new one.
                    let old_key = Arc::clone(&p.key);
                    let new_key = self.new_key(key);
                    if let Some(p) = self.metrics.get_mut(key) {
                        p.key = Arc::clone(&new_key);
                    }
                    self.rekey_buffer(key, &old_key, &new_key);
                    self.finish_file(key);
                }
            }
        }
    }

    /// Points the live view's chunks of a partition's buffer at their new file.
    fn rekey_buffer(&mut self, key: &PartitionKey, _old: &Arc<ObjectKey>, new: &Arc<ObjectKey>) {
        let new_tag = self.tag();
        let Some(p) = self.metrics.get_mut(key) else {
            return;
        };
        let experiments: Vec<Arc<str>> = p.buffer.experiments().cloned().collect();
        self.view
            .retag_metrics(p.tag, new_tag, new, experiments.iter());
        p.tag = new_tag;
    }

    /// Finishes a partition's staged file (if any) and publishes it.
    fn finish_file(&mut self, key: &PartitionKey) {
        let Some(p) = self.metrics.get_mut(key) else {
            return;
        };
        let Some(file) = p.file.take() else {
            return;
        };
        let staged_view = file.view().cloned();
        let file_key = Arc::clone(file.key());
        let owes = std::mem::take(&mut p.file_owes);
        let summaries = std::mem::take(&mut p.summaries);
        match file.finish(&self.ctx.persister.sink) {
            Ok(Some(finished)) => {
                let mut publication = Publication::new(
                    finished.staged,
                    finished.key,
                    Table::Metrics,
                    key.dir(),
                    finished.rows,
                    finished.bytes,
                    finished.experiments,
                );
                publication.pieces = owes.pieces;
                publication.batch_ids = owes.batch_ids;
                publication.summaries =
                    summaries.into_iter().map(|((e, k), s)| (e, k, s)).collect();
                if let Some(publication) = self.publisher.send(publication) {
                    // The publisher has stopped (it logged why): publish here.
                    self.publish(publication);
                }
            }
            Ok(None) => {}
            Err(e) => {
                // The file is lost to this run, its rows not: they are in the WAL
                // (never released) and replay at the next start.
                tracing::error!(file = %file_key, error = %e, "finishing a staged file failed; its rows replay from the write-ahead log at the next start");
                if staged_view.is_some() {
                    self.view.published(&file_key);
                }
            }
        }
    }

    fn publish(&mut self, publication: Publication) {
        publish::publish_or_keep(
            &self.ctx.persister,
            &self.view,
            publication,
            &mut self.unpublished,
        );
    }

    fn retry_unpublished(&mut self) {
        publish::retry(&self.ctx.persister, &self.view, &mut self.unpublished);
    }

    /// Encodes what is buffered and publishes the partition's file.
    fn roll_metrics(&mut self, key: &PartitionKey) {
        let waiting = self
            .metrics
            .get(key)
            .is_some_and(|p| p.retry_at.is_some_and(|t| Instant::now() < t));
        if waiting {
            return;
        }
        self.encode(key);
        self.finish_file(key);
        let empty = self
            .metrics
            .get(key)
            .is_some_and(|p| p.buffer.is_empty() && p.file.is_none());
        if empty {
            self.metrics.remove(key);
        } else if let Some(p) = self.metrics.get_mut(key) {
            p.since = Instant::now();
        }
    }

    fn add_events(&mut self, work: Work<Arc<EventChunk>>) {
        let Work {
            chunks: chunk,
            reservation,
            seq,
            client_batch,
            handoff,
            ingested_at: at,
            count,
        } = work;
        let key = PartitionKey {
            table: Table::Events,
            namespace: Arc::clone(&chunk.experiment_namespace),
            date: utc_date(at),
        };
        if !self.events.contains_key(&key) {
            let partition = EventsPartition {
                buffer: EventsBuffer::default(),
                tag: self.tag(),
                key: self.new_key(&key),
                owes: Owed::default(),
                reservations: Vec::new(),
                since: Instant::now(),
            };
            self.events.insert(key.clone(), partition);
        }
        let Some(p) = self.events.get_mut(&key) else {
            return;
        };
        p.owes
            .record(seq, &chunk.experiment, &client_batch, at, count);
        self.view
            .claim_events(handoff, Arc::clone(&chunk), p.tag, Arc::clone(&p.key));
        p.buffer.append(chunk);
        p.reservations.push(reservation);
        if p.buffer.len() >= self.ctx.roll.max_rows
            || p.buffer.approx_bytes() >= self.ctx.roll.row_group_bytes
        {
            self.roll_events(&key);
        }
    }

    /// Writes an events partition's rows as one file and publishes it.
    fn roll_events(&mut self, key: &PartitionKey) {
        let Some(p) = self.events.get_mut(key) else {
            return;
        };
        let written = (|| -> Result<Option<file::Finished>, WriterError> {
            let sorted = p.buffer.to_record_batch()?;
            let mut file = StreamingFile::create(
                &self.ctx.persister.sink,
                Arc::clone(&p.key),
                schema::events_schema(),
                &self.props,
            )?;
            if let Err(e) = file.append_row_group(&sorted) {
                let _ = file.finish(&self.ctx.persister.sink);
                return Err(e);
            }
            file.finish(&self.ctx.persister.sink)
        })();
        match written {
            Ok(finished) => {
                let Some(p) = self.events.remove(key) else {
                    return;
                };
                let Some(finished) = finished else {
                    return;
                };
                let mut publication = Publication::new(
                    finished.staged,
                    finished.key,
                    Table::Events,
                    key.dir(),
                    finished.rows,
                    finished.bytes,
                    finished.experiments,
                );
                publication.tag = p.tag;
                publication.pieces = p.owes.pieces;
                publication.batch_ids = p.owes.batch_ids;
                self.publish(publication);
                drop(p.reservations);
            }
            Err(e) => {
                tracing::error!(partition = %key.dir(), error = %e, "writing an events file failed; keeping the rows and retrying");
                p.since = Instant::now();
            }
        }
    }

    /// Publishes every partition whose oldest row passes `due`.
    fn roll(&mut self, due: impl Fn(Instant) -> bool) {
        let keys: Vec<_> = self
            .metrics
            .iter()
            .filter(|(_, p)| due(p.since))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.roll_metrics(&key);
        }
        let keys: Vec<_> = self
            .events
            .iter()
            .filter(|(_, p)| due(p.since))
            .map(|(k, _)| k.clone())
            .collect();
        for key in keys {
            self.roll_events(&key);
        }
    }
}
