//! The ingest handle: the one door from the API into the write path.
//!
//! A request's batch first reserves room in the [`MemoryBudget`] (bytes held in
//! queues and writer buffers), then is made durable as the [`Durability`] mode asks,
//! then goes onto its writer's bounded queue. The reservation travels with the batch
//! and is released when the writer has published its rows, so memory stays bounded
//! whatever clients do. When the budget or a queue is full, [`WhenFull`] decides:
//! wait a little, then [`IngestError::Full`] (RESOURCE_EXHAUSTED at the edge).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use tokio::sync::futures::Notified;
use tokio::sync::{Notify, oneshot};
use tokio::time::Instant;

pub mod record;

use crate::config::{Durability, WhenFull};
use crate::index::{FileEntry, IndexError};
use crate::model::{EventPoint, EventsBatch, ExperimentRef, MetricPoint, MetricsBatch};
use crate::sink::upload::Spool;
use crate::telemetry::Metrics;
use crate::wal::{RecordKind, Seq, Wal, WalError};

/// Errors submitting to the write path.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The memory budget or a queue stayed full for the whole wait.
    #[error("ingest buffers are full ({what}); retry after {retry_after:?}")]
    Full {
        what: &'static str,
        retry_after: Duration,
    },
    /// The batch alone is larger than the whole memory budget.
    #[error("batch of {bytes} bytes exceeds the ingest memory budget of {limit} bytes")]
    TooLarge { bytes: usize, limit: usize },
    /// The daemon is shutting down and takes no more data.
    #[error("mboxd is shutting down")]
    ShuttingDown,
    /// A writer thread stopped (it logged why).
    #[error("writer {0} has stopped")]
    WriterGone(usize),
    /// Reading the file manifest for a snapshot failed.
    #[error(transparent)]
    Index(#[from] IndexError),
    /// The write-ahead log could not make the batch durable; nothing was accepted.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The task accepting the batch failed (a bug; it is logged).
    #[error("accepting the batch failed: {0}")]
    Task(String),
}

/// A byte budget shared by everything a batch passes through before publication.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
    released: Notify,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            released: Notify::new(),
        })
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            // An empty budget always admits one batch, so a batch up to the limit
            // can always make progress.
            if used != 0 && used + bytes > self.limit {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Some(Reservation {
                        budget: Arc::clone(self),
                        bytes,
                    });
                }
                Err(actual) => used = actual,
            }
        }
    }
}

/// Bytes reserved in a [`MemoryBudget`]; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    bytes: usize,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.used.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.released.notify_waiters();
    }
}

/// Waits until `ready` yields a value, re-checking each time `changed` fires, for as
/// long as `when_full` allows; `None` if it never did. The notification is armed
/// before each check, so a change in between is not missed.
async fn wait_until<'a, T>(
    changed: impl Fn() -> Notified<'a>,
    when_full: WhenFull,
    mut ready: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = match when_full {
        WhenFull::Wait(wait) => Instant::now().checked_add(wait),
        WhenFull::Reject => Some(Instant::now()),
    };
    loop {
        let notified = changed();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if let Some(value) = ready() {
            return Some(value);
        }
        match deadline {
            Some(deadline) => {
                if tokio::time::timeout_at(deadline, notified).await.is_err() {
                    return ready();
                }
            }
            None => notified.await,
        }
    }
}

/// What a writer holds for one experiment that is not yet in a published file,
/// with the published files that may hold its other rows, taken at one instant.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub metrics: Vec<MetricPoint>,
    pub events: Vec<EventPoint>,
    pub metric_files: Vec<FileEntry>,
    pub event_files: Vec<FileEntry>,
}

/// Messages to a writer thread.
#[derive(Debug)]
pub enum Command {
    /// A batch, its memory reservation, and its WAL record (none without a WAL).
    Metrics(MetricsBatch, Reservation, Option<Seq>),
    Events(EventsBatch, Reservation, Option<Seq>),
    /// Answer with a [`Snapshot`] of one experiment.
    Snapshot(ExperimentRef, oneshot::Sender<Result<Snapshot, IndexError>>),
    /// Publish every buffered row and stop.
    Shutdown,
}

/// A validated batch on its way to the writers.
#[derive(Debug)]
pub enum Batch {
    Metrics(MetricsBatch),
    Events(EventsBatch),
}

impl Batch {
    fn approx_bytes(&self) -> usize {
        match self {
            Batch::Metrics(b) => b.approx_bytes(),
            Batch::Events(b) => b.approx_bytes(),
        }
    }

    /// The WAL record: its kind, payload, and the pieces the writers release it by
    /// (one per metrics block; an events batch goes to one writer whole).
    fn wal_record(&self) -> (RecordKind, Vec<u8>, u32) {
        match self {
            Batch::Metrics(b) => (
                RecordKind::Metrics,
                record::encode_metrics(b),
                b.blocks().len() as u32,
            ),
            Batch::Events(b) => (RecordKind::Events, record::encode_events(b), 1),
        }
    }
}

/// The API's handle on the write path. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Ingest {
    shards: Vec<Sender<Command>>,
    budget: Arc<MemoryBudget>,
    when_full: WhenFull,
    wal: Option<Arc<Wal>>,
    closed: AtomicBool,
    metrics: Metrics,
    /// With an S3 root: new data waits while the upload spool is full.
    spool: Option<Arc<Spool>>,
}

/// How long a client is told to wait before retrying after [`IngestError::Full`].
const RETRY_AFTER: Duration = Duration::from_millis(200);

impl Ingest {
    /// Creates the handle and one bounded queue per writer; the receivers go to the
    /// writer threads.
    pub fn new(
        writers: usize,
        queue_batches: usize,
        budget: Arc<MemoryBudget>,
        when_full: WhenFull,
        durability: Durability,
        wal: Option<Arc<Wal>>,
        metrics: Metrics,
    ) -> (Self, Vec<Receiver<Command>>) {
        let (shards, receivers) = (0..writers.max(1))
            .map(|_| crossbeam_channel::bounded(queue_batches))
            .unzip();
        let ingest = Self {
            shards,
            budget,
            when_full,
            wal: if durability == Durability::Memory {
                None
            } else {
                wal
            },
            closed: AtomicBool::new(false),
            metrics,
            spool: None,
        };
        (ingest, receivers)
    }

    /// Makes new (not replayed) data wait while `spool` is full.
    pub fn with_spool(mut self, spool: Arc<Spool>) -> Self {
        self.spool = Some(spool);
        self
    }

    /// The writer that owns an experiment's rows.
    fn shard_of(&self, experiment_id: &str) -> usize {
        if self.shards.len() == 1 {
            return 0;
        }
        // FNV-1a: stable and cheap; ids are already uniform hex.
        let hash = experiment_id
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            });
        (hash % self.shards.len() as u64) as usize
    }

    /// Submits a batch; returns the number of points or events once they are
    /// accepted under the durability mode. A batch is accepted whole or not at all.
    ///
    /// Once room is reserved, the WAL append and the hand-off to the writer run as
    /// their own task: a client that gives up mid-way (a deadline, a dropped
    /// connection) cannot leave a durable record that never reaches a writer.
    pub async fn submit(self: &Arc<Self>, batch: Batch) -> Result<usize, IngestError> {
        self.refuse_if_closed()?;
        self.wait_for_spool().await?;
        let reservation = self.reserve(batch.approx_bytes(), self.when_full).await?;
        let this = Arc::clone(self);
        let accepted = tokio::spawn(async move {
            let seq = match &this.wal {
                Some(wal) => {
                    let (kind, payload, pieces) = batch.wal_record();
                    Some(wal.append(kind, payload, pieces).await?)
                }
                None => None,
            };
            this.dispatch(batch, reservation, seq).await
        });
        accepted
            .await
            .map_err(|e| IngestError::Task(e.to_string()))?
    }

    /// Re-submits a batch read back from the WAL at start-up (already durable; its
    /// record is held in the WAL tracker for each of its pieces). Waits for room,
    /// however long: it was acknowledged before the restart.
    pub async fn submit_replayed(&self, batch: Batch, seq: Seq) -> Result<usize, IngestError> {
        let reservation = self
            .reserve(batch.approx_bytes(), WhenFull::Wait(Duration::MAX))
            .await?;
        self.dispatch(batch, reservation, Some(seq)).await
    }

    async fn dispatch(
        &self,
        batch: Batch,
        reservation: Reservation,
        seq: Option<Seq>,
    ) -> Result<usize, IngestError> {
        match batch {
            Batch::Metrics(batch) => self.dispatch_metrics(batch, reservation, seq).await,
            Batch::Events(batch) => self.dispatch_events(batch, reservation, seq).await,
        }
    }

    /// Hands a reserved (and, with a WAL, durable) batch to its writers.
    async fn dispatch_metrics(
        &self,
        batch: MetricsBatch,
        mut reservation: Reservation,
        seq: Option<Seq>,
    ) -> Result<usize, IngestError> {
        let points = batch.points();
        if self.shards.len() == 1 {
            self.send(0, Command::Metrics(batch, reservation, seq))
                .await?;
            return Ok(points);
        }
        // Split the blocks by owning writer; each part is one whole batch for it.
        let ingested_at = batch.ingested_at();
        let mut parts: Vec<Vec<_>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
        for block in batch.into_blocks() {
            parts[self.shard_of(&block.experiment.id)].push(block);
        }
        let mut parts: Vec<_> = parts
            .into_iter()
            .enumerate()
            .filter(|(_, blocks)| !blocks.is_empty())
            .map(|(shard, blocks)| (shard, MetricsBatch::from_validated(blocks, ingested_at)))
            .collect();
        let last = parts.pop();
        for (shard, part) in parts {
            let r = reservation.split(part.approx_bytes());
            self.send(shard, Command::Metrics(part, r, seq)).await?;
        }
        if let Some((shard, part)) = last {
            self.send(shard, Command::Metrics(part, reservation, seq))
                .await?;
        }
        Ok(points)
    }

    async fn dispatch_events(
        &self,
        batch: EventsBatch,
        reservation: Reservation,
        seq: Option<Seq>,
    ) -> Result<usize, IngestError> {
        let n = batch.events().len();
        let shard = self.shard_of(&batch.experiment().id);
        self.send(shard, Command::Events(batch, reservation, seq))
            .await?;
        Ok(n)
    }

    /// Everything not yet published for one experiment, plus its published files.
    /// Every batch acknowledged before this call is included.
    pub async fn snapshot(&self, experiment: &ExperimentRef) -> Result<Snapshot, IngestError> {
        let shard = self.shard_of(&experiment.id);
        let (tx, rx) = oneshot::channel();
        self.send(shard, Command::Snapshot(experiment.clone(), tx))
            .await?;
        Ok(rx.await.map_err(|_| IngestError::WriterGone(shard))??)
    }

    /// Refuses new data from now on and tells every writer to publish and stop.
    /// Batches already queued are written first (queues are FIFO).
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for shard in &self.shards {
            // A full queue drains on its own; block until the stop is queued.
            let _ = shard.send(Command::Shutdown);
        }
    }

    fn refuse_if_closed(&self) -> Result<(), IngestError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(IngestError::ShuttingDown);
        }
        Ok(())
    }

    /// Waits, as `when_full` allows, while the upload spool is full: an S3 outage
    /// longer than the spool can absorb pushes back on clients instead of filling
    /// the disk.
    async fn wait_for_spool(&self) -> Result<(), IngestError> {
        let Some(spool) = &self.spool else {
            return Ok(());
        };
        if !spool.is_full() {
            return Ok(());
        }
        wait_until(
            || spool.changed(),
            self.when_full,
            || (!spool.is_full()).then_some(()),
        )
        .await
        .ok_or(IngestError::Full {
            what: "upload spool",
            retry_after: RETRY_AFTER,
        })
    }

    /// Reserves room for `bytes`, waiting as `when_full` allows.
    async fn reserve(&self, bytes: usize, when_full: WhenFull) -> Result<Reservation, IngestError> {
        if bytes > self.budget.limit {
            return Err(IngestError::TooLarge {
                bytes,
                limit: self.budget.limit,
            });
        }
        // Fast path: room now, no waiter registration (which takes a lock).
        if let Some(r) = self.budget.try_reserve(bytes) {
            return Ok(r);
        }
        wait_until(
            || self.budget.released.notified(),
            when_full,
            || self.budget.try_reserve(bytes),
        )
        .await
        .ok_or(IngestError::Full {
            what: "memory budget",
            retry_after: RETRY_AFTER,
        })
    }

    /// Queues a command for a writer. The byte budget already bounds what is queued,
    /// so a queue full of small batches is waited out rather than refused: a batch
    /// that reached here may already be in the WAL and must not be dropped.
    async fn send(&self, shard: usize, mut command: Command) -> Result<(), IngestError> {
        let data = matches!(command, Command::Metrics(..) | Command::Events(..));
        loop {
            match self.shards[shard].try_send(command) {
                Ok(()) => {
                    if data {
                        self.metrics.queue_pushes.inc();
                    }
                    return Ok(());
                }
                Err(TrySendError::Disconnected(_)) => return Err(IngestError::WriterGone(shard)),
                Err(TrySendError::Full(back)) => {
                    command = back;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
    }
}

impl Reservation {
    /// Moves `bytes` (at most all) of this reservation into a new one.
    fn split(&mut self, bytes: usize) -> Reservation {
        let bytes = bytes.min(self.bytes);
        self.bytes -= bytes;
        Reservation {
            budget: Arc::clone(&self.budget),
            bytes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_release_on_drop_and_respect_the_limit() {
        let budget = MemoryBudget::new(100);
        let a = budget.try_reserve(60).unwrap();
        assert!(budget.try_reserve(50).is_none());
        let b = budget.try_reserve(40).unwrap();
        assert_eq!(budget.used(), 100);
        drop(a);
        assert_eq!(budget.used(), 40);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn full_budget_waits_then_reports_full() {
        let budget = MemoryBudget::new(100);
        let (ingest, _rx) = Ingest::new(
            1,
            4,
            Arc::clone(&budget),
            WhenFull::Wait(Duration::from_millis(30)),
            Durability::Memory,
            None,
            Metrics::new(),
        );
        let wait = WhenFull::Wait(Duration::from_millis(30));
        let held = ingest.reserve(80, wait).await.unwrap();
        let err = ingest.reserve(30, wait).await.unwrap_err();
        assert!(matches!(err, IngestError::Full { .. }), "{err}");
        // Released while waiting: the waiter gets in.
        let waiter = async { ingest.reserve(30, wait).await.map(|r| r.bytes()) };
        let release = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            drop(held);
        };
        let (got, ()) = tokio::join!(waiter, release);
        assert_eq!(got.unwrap(), 30);
        assert!(matches!(
            ingest.reserve(101, wait).await,
            Err(IngestError::TooLarge {
                bytes: 101,
                limit: 100
            })
        ));
    }
}
