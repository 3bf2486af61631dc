//! The ingest handle: the one door from the API into the write path.
//!
//! A request's batch first reserves room in the [`MemoryBudget`] (bytes held in
//! queues and writer buffers), then is made durable as the [`Durability`] mode asks,
//! then goes onto a writer's queue, the writers taking batches in turn. The
//! reservation travels with the batch and is released once the writer has encoded
//! its rows, so memory stays bounded whatever clients do. When the budget is full,
//! [`WhenFull`] decides: wait a little, then [`IngestError::Full`]
//! (RESOURCE_EXHAUSTED at the edge). A client batch id makes a retried batch an
//! acknowledged duplicate ([`dedup`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

pub mod dedup;
pub mod record;

use crate::config::{Durability, WhenFull};
use crate::live::{LiveView, WriterView};
use crate::model::{EventChunk, EventsBatch, MetricChunk, MetricsBatch, Micros};
use crate::sink::upload::Spool;
use crate::telemetry::Metrics;
use crate::wal::{RecordKind, Seq, Wal, WalError};
use dedup::{Admission, RecentBatches};

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
    #[error("a writer thread has stopped")]
    WriterGone,
    /// The write-ahead log could not make the batch durable; nothing was accepted.
    #[error(transparent)]
    Wal(#[from] WalError),
}

/// A byte budget shared by everything a batch passes through before publication.
#[derive(Debug)]
pub struct MemoryBudget {
    used: AtomicUsize,
    limit: usize,
    released: Notify,
    /// Recent reservations' size, smoothed (the newest weighs an eighth): about
    /// what the next write asks for. See [`MemoryBudget::wait_for_room`].
    typical: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(Self {
            used: AtomicUsize::new(0),
            limit,
            released: Notify::new(),
            typical: AtomicUsize::new(0),
        })
    }

    /// Whether a reservation of the typical size would fit now (an empty budget
    /// admits any, as [`MemoryBudget::try_reserve`] does).
    pub fn has_room(&self) -> bool {
        self.admits(self.used(), self.typical.load(Ordering::Relaxed))
    }

    /// Whether `bytes` more may be reserved beside `used`. An empty budget admits
    /// any reservation, so a batch up to the limit can always make progress.
    fn admits(&self, used: usize, bytes: usize) -> bool {
        used == 0 || used.saturating_add(bytes) <= self.limit
    }

    /// Waits, as `when_full` allows, until a reservation of the typical size
    /// would fit; whether it would. Nothing is reserved: this lets the server
    /// refuse a write it could not admit before receiving and decoding it, work
    /// that under sustained overload took the cores the writers needed to drain
    /// the budget (see [`crate::api::receive`]).
    pub async fn wait_for_room(&self, when_full: WhenFull) -> bool {
        wait_until(
            || self.released.notified(),
            when_full,
            || self.has_room().then_some(()),
        )
        .await
        .is_some()
    }

    /// Bytes currently reserved.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn try_reserve(self: &Arc<Self>, bytes: usize) -> Option<Reservation> {
        let mut used = self.used.load(Ordering::Relaxed);
        loop {
            if !self.admits(used, bytes) {
                return None;
            }
            match self.used.compare_exchange_weak(
                used,
                used + bytes,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    let _ = self
                        .typical
                        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| {
                            Some(t - t / 8 + bytes / 8)
                        });
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

/// A batch on its way to a writer, with what the writer must account for it.
#[derive(Debug)]
pub struct Work<T> {
    /// The batch's rows, already visible to reads in the writer's live view.
    pub chunks: T,
    /// The batch's share of the memory budget, released once its rows are encoded.
    pub reservation: Reservation,
    /// Its WAL record (none without a WAL).
    pub seq: Option<Seq>,
    /// The client's batch id, recorded in the index with the file.
    pub client_batch: Option<Arc<str>>,
    /// Its hand-off id in the writer's live view.
    pub handoff: u64,
    pub ingested_at: Micros,
    /// Points or events in the batch.
    pub count: u64,
}

/// Messages to a writer thread.
#[derive(Debug)]
pub enum Command {
    Metrics(Work<Vec<Arc<MetricChunk>>>),
    Events(Work<Arc<EventChunk>>),
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

    /// The namespaces the batch writes to, sorted and distinct.
    pub fn namespaces(&self) -> Vec<&str> {
        let mut out: Vec<&str> = match self {
            Batch::Metrics(b) => b
                .blocks()
                .iter()
                .map(|block| &*block.experiment.namespace)
                .collect(),
            Batch::Events(b) => vec![&*b.experiment().namespace],
        };
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The client's batch id, scoped by the namespaces the batch writes to. Ids
    /// are the clients' own choice: unscoped, a batch in one namespace would pass
    /// as a retry of another namespace's batch with the same id, and be dropped.
    pub fn scoped_id(&self, client_batch_id: &str) -> String {
        dedup::scoped(&self.namespaces(), client_batch_id)
    }

    /// Points or events in the batch.
    pub fn count(&self) -> usize {
        match self {
            Batch::Metrics(b) => b.points(),
            Batch::Events(b) => b.events().len(),
        }
    }

    fn ingested_at(&self) -> Micros {
        match self {
            Batch::Metrics(b) => b.ingested_at(),
            Batch::Events(b) => b.ingested_at(),
        }
    }

    /// The WAL record: its kind, payload, and the pieces the writers release it by
    /// (one per metrics block; an events batch goes to one writer whole).
    fn wal_record(&self, client_batch_id: &str) -> (RecordKind, Vec<u8>, u32) {
        match self {
            Batch::Metrics(b) => (
                RecordKind::Metrics,
                record::encode_metrics(b, client_batch_id),
                b.blocks().len() as u32,
            ),
            Batch::Events(b) => (
                RecordKind::Events,
                record::encode_events(b, client_batch_id),
                1,
            ),
        }
    }

    /// The batch as chunks, made visible to reads in `view` as hand-off
    /// `handoff`, and the command that hands them to the writer.
    fn into_command(
        self,
        view: &WriterView,
        handoff: u64,
        reservation: Reservation,
        seq: Option<Seq>,
        client_batch: Option<Arc<str>>,
    ) -> Command {
        let ingested_at = self.ingested_at();
        let count = self.count() as u64;
        match self {
            Batch::Metrics(batch) => {
                let chunks: Vec<Arc<MetricChunk>> = batch
                    .into_blocks()
                    .into_iter()
                    .map(|b| Arc::new(MetricChunk::new(b, ingested_at)))
                    .collect();
                view.queue_metrics(handoff, chunks.clone());
                Command::Metrics(Work {
                    chunks,
                    reservation,
                    seq,
                    client_batch,
                    handoff,
                    ingested_at,
                    count,
                })
            }
            Batch::Events(batch) => {
                let chunk = Arc::new(EventChunk {
                    experiment: Arc::clone(&batch.experiment().id),
                    experiment_namespace: Arc::clone(&batch.experiment().namespace),
                    ingested_at,
                    events: batch.into_events(),
                });
                view.queue_events(handoff, Arc::clone(&chunk));
                Command::Events(Work {
                    chunks: chunk,
                    reservation,
                    seq,
                    client_batch,
                    handoff,
                    ingested_at,
                    count,
                })
            }
        }
    }
}

/// A batch accepted under the durability mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Accepted {
    /// Points or events.
    pub count: usize,
    /// The client's batch id was seen before: nothing new was written.
    pub duplicate: bool,
}

/// The API's handle on the write path. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Ingest {
    /// One unbounded queue per writer: the memory budget bounds what they hold.
    writers: Vec<Sender<Command>>,
    /// Batches go to the writers in turn (a WAL record to one writer whole).
    next_writer: AtomicUsize,
    /// The writers' live views, where handed-off rows become visible.
    live: LiveView,
    next_handoff: AtomicU64,
    budget: Arc<MemoryBudget>,
    when_full: WhenFull,
    wal: Option<Arc<Wal>>,
    closed: AtomicBool,
    metrics: Metrics,
    /// With an S3 root: new data waits while the upload spool is full.
    spool: Option<Arc<Spool>>,
    recent: Arc<RecentBatches>,
}

/// How batches are taken in.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Writer threads.
    pub writers: usize,
    pub when_full: WhenFull,
    pub durability: Durability,
}

/// How long a client is told to wait before retrying after [`IngestError::Full`]
/// (or a receive slot that stayed taken).
pub(crate) const RETRY_AFTER: Duration = Duration::from_millis(200);

impl Ingest {
    /// Creates the handle and one queue per writer; the receivers go to the writer
    /// threads.
    pub fn new(
        policy: Policy,
        budget: Arc<MemoryBudget>,
        wal: Option<Arc<Wal>>,
        recent: Arc<RecentBatches>,
        live: LiveView,
        metrics: Metrics,
    ) -> (Self, Vec<Receiver<Command>>) {
        let Policy {
            writers,
            when_full,
            durability,
        } = policy;
        let (writers, receivers) = (0..writers.max(1))
            .map(|_| crossbeam_channel::unbounded())
            .unzip();
        let ingest = Self {
            writers,
            next_writer: AtomicUsize::new(0),
            live,
            next_handoff: AtomicU64::new(0),
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
            recent,
        };
        (ingest, receivers)
    }

    /// Makes new (not replayed) data wait while `spool` is full.
    pub fn with_spool(mut self, spool: Arc<Spool>) -> Self {
        self.spool = Some(spool);
        self
    }

    pub fn recent_batches(&self) -> &Arc<RecentBatches> {
        &self.recent
    }

    /// The next writer in turn, and a hand-off id.
    fn writer(&self) -> (usize, u64) {
        let i = self.next_writer.fetch_add(1, Ordering::Relaxed) % self.writers.len();
        (i, self.next_handoff.fetch_add(1, Ordering::Relaxed))
    }

    /// Submits a batch; returns once it is accepted under the durability mode. A
    /// batch is accepted whole or not at all. With a client batch id, a batch seen
    /// before is acknowledged again without being written.
    ///
    /// Once the batch is handed to the WAL's commit thread, the rest happens there
    /// (the hand-off to a writer right after the fsync): a client that gives up
    /// mid-way (a deadline, a dropped connection) cannot leave a durable record
    /// that never reaches a writer.
    /// `received`: called once the batch holds its reservation in the budget,
    /// which from then on bounds its memory (the API gives back the request's
    /// receive slot), before the wait for durability.
    pub async fn submit(
        &self,
        batch: Batch,
        client_batch_id: Option<&str>,
        received: impl FnOnce(),
    ) -> Result<Accepted, IngestError> {
        self.refuse_if_closed()?;
        let ticket = match client_batch_id {
            Some(id) => loop {
                match self.recent.admit(id) {
                    Admission::New(ticket) => break Some(ticket),
                    Admission::Duplicate { points } => {
                        return Ok(Accepted {
                            count: points as usize,
                            duplicate: true,
                        });
                    }
                    Admission::Wait(mut rx) => {
                        let _ = rx.changed().await;
                    }
                }
            },
            None => None,
        };
        self.wait_for_spool().await?;
        let record = self
            .wal
            .as_ref()
            .map(|_| batch.wal_record(client_batch_id.unwrap_or("")));
        // The WAL record's bytes are reserved too, until the commit has written them.
        let record_bytes = record.as_ref().map_or(0, |(_, payload, _)| payload.len());
        let mut reservation = self
            .reserve(batch.approx_bytes() + record_bytes, self.when_full)
            .await?;
        let record_reservation = reservation.split(record_bytes);
        received();
        let count = batch.count();
        let at = batch.ingested_at();
        let client_batch = ticket.as_ref().map(|t| Arc::clone(t.id()));
        let (i, handoff) = self.writer();
        let writer = self.writers[i].clone();
        let view = self.live.writer(i);
        let pushes = self.metrics.queue_pushes.clone();
        let hand_off = move |seq: Option<Seq>| {
            // Visible to reads before anyone hears of the batch. An unbounded send
            // never blocks; it fails only once the writer has stopped, at shutdown,
            // and then the WAL replays the record.
            let command = batch.into_command(&view, handoff, reservation, seq, client_batch);
            if writer.send(command).is_ok() {
                pushes.inc();
            }
            if let Some(ticket) = ticket {
                ticket.complete(count as u64, at);
            }
        };
        match (&self.wal, record) {
            // Encoded above, on this (the request's) thread; the commit thread only
            // writes, syncs and hands off.
            (Some(wal), Some((kind, payload, pieces))) => {
                wal.append(
                    kind,
                    payload,
                    pieces,
                    Box::new(move |seq| {
                        drop(record_reservation);
                        hand_off(Some(seq));
                    }),
                )
                .await?;
            }
            _ => {
                drop(record_reservation);
                hand_off(None);
            }
        }
        Ok(Accepted {
            count,
            duplicate: false,
        })
    }

    /// Reserves `bytes` of the budget, if there is room now, for other work that
    /// holds a request's data (a catalog write).
    pub fn try_hold(&self, bytes: usize) -> Option<Reservation> {
        self.budget.try_reserve(bytes)
    }

    /// Re-submits a batch read back from the WAL at start-up (already durable; its
    /// record is held in the WAL tracker for each of its pieces). Waits for room,
    /// however long: it was acknowledged before the restart.
    pub async fn submit_replayed(
        &self,
        batch: Batch,
        seq: Seq,
        client_batch_id: Option<Arc<str>>,
    ) -> Result<usize, IngestError> {
        let reservation = self
            .reserve(batch.approx_bytes(), WhenFull::Wait(Duration::MAX))
            .await?;
        let count = batch.count();
        if let Some(id) = &client_batch_id {
            self.recent
                .remember(Arc::clone(id), batch.ingested_at(), count as u64);
        }
        let (i, handoff) = self.writer();
        let command = batch.into_command(
            self.live.part(i),
            handoff,
            reservation,
            Some(seq),
            client_batch_id,
        );
        self.writers[i]
            .send(command)
            .map_err(|_| IngestError::WriterGone)?;
        self.metrics.queue_pushes.inc();
        Ok(count)
    }

    /// Refuses new data from now on and tells every writer to publish and stop.
    /// Batches already queued are written first (queues are FIFO).
    pub fn shutdown(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for writer in &self.writers {
            let _ = writer.send(Command::Shutdown);
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
}

impl Reservation {
    /// Moves `bytes` (at most all) of this reservation into a new one.
    pub(crate) fn split(&mut self, bytes: usize) -> Reservation {
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
            Policy {
                writers: 1,
                when_full: WhenFull::Wait(Duration::from_millis(30)),
                durability: Durability::Memory,
            },
            Arc::clone(&budget),
            None,
            RecentBatches::new(Duration::from_secs(1), 10),
            LiveView::new(1),
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
