//! Start-up recovery: replays write-ahead log records into the writers, skipping
//! the blocks whose rows a published file already holds (see [`crate::index`]), so
//! every acknowledged point reaches Parquet exactly once whatever instant the last
//! process died at.

use crate::api::validate;
use crate::config::Limits;
use crate::index::{Index, IndexError};
use crate::ingest::{Batch, Ingest, IngestError, record};
use crate::model::{EventRecord, EventsBatch, MetricsBatch};
use crate::paths::{PartitionKey, Table, utc_date};
use crate::wal::{RecordKind, Replayed, Seq, Tracker};

/// Errors that stop recovery.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecoveryError {
    #[error("reading published pieces: {0}")]
    Index(#[from] IndexError),
    #[error("re-submitting replayed rows: {0}")]
    Ingest(#[from] IngestError),
}

/// What recovery did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub records: usize,
    /// Blocks sent to the writers again.
    pub replayed_blocks: usize,
    /// Blocks already in published files.
    pub skipped_blocks: usize,
    /// Records that could not be decoded or checked; kept in the WAL, not replayed.
    pub unusable_records: usize,
}

/// Replays `records` (as [`crate::wal::Wal::open`] returned them, each held once in
/// `tracker`).
pub async fn replay(
    records: Vec<Replayed>,
    index: &Index,
    ingest: &Ingest,
    tracker: &Tracker,
) -> Result<Report, RecoveryError> {
    let mut replayer = Replayer {
        index,
        ingest,
        tracker,
        limits: Limits::unbounded(),
        report: Report {
            records: records.len(),
            ..Report::default()
        },
    };
    for r in records {
        let outcome = match r.kind {
            RecordKind::Metrics => replayer.metrics(r.seq, &r.payload).await,
            RecordKind::Events => replayer.events(r.seq, &r.payload).await,
        };
        match outcome {
            Ok(()) => tracker.release(r.seq, 1),
            Err(Unusable(reason)) => {
                // Kept held: the segment stays on disk for inspection.
                tracing::error!(seq = r.seq, %reason, "a write-ahead log record cannot be replayed; keeping it in the log");
                replayer.report.unusable_records += 1;
            }
        }
    }
    let report = replayer.report;
    if report.records > 0 {
        tracing::info!(?report, "write-ahead log replayed");
    }
    Ok(report)
}

struct Unusable(String);

impl From<RecoveryError> for Unusable {
    fn from(e: RecoveryError) -> Self {
        Unusable(e.to_string())
    }
}

/// What replaying one record needs.
struct Replayer<'a> {
    index: &'a Index,
    ingest: &'a Ingest,
    tracker: &'a Tracker,
    /// Records were valid when accepted, even if the limits were lowered since.
    limits: Limits,
    report: Report,
}

impl Replayer<'_> {
    /// Whether `experiment`'s rows of record `seq` in `partition` are published.
    fn published(
        &self,
        seq: Seq,
        partition: &PartitionKey,
        experiment: &str,
    ) -> Result<bool, RecoveryError> {
        let done = self.index.published_experiments(seq, &partition.dir())?;
        Ok(done.iter().any(|id| id == experiment))
    }

    async fn metrics(&mut self, seq: Seq, payload: &[u8]) -> Result<(), Unusable> {
        let r = record::decode_metrics(payload).map_err(|e| Unusable(e.to_string()))?;
        let at = r.ingested_at;
        let client_batch = client_batch(r.client_batch_id);
        let blocks: Vec<crate::proto::MetricsBlock> =
            r.blocks.into_iter().map(Into::into).collect();
        let points: u64 = blocks.iter().map(|b| b.steps.len() as u64).sum();
        let date = utc_date(at);
        let mut kept = Vec::new();
        for (i, b) in blocks.into_iter().enumerate() {
            let block = validate::block(format_args!("blocks[{i}]"), b, self.index, &self.limits)
                .map_err(|e| Unusable(e.to_string()))?;
            let partition = PartitionKey {
                table: Table::Metrics,
                namespace: block.experiment.namespace.clone(),
                date,
            };
            if self.published(seq, &partition, &block.experiment.id)? {
                self.report.skipped_blocks += 1;
            } else {
                kept.push(block);
            }
        }
        self.report.replayed_blocks += kept.len();
        if let Some(id) = &client_batch {
            // Remembered whole, even if some of its blocks are published: a retry
            // of the batch is a duplicate either way.
            self.ingest
                .recent_batches()
                .remember(std::sync::Arc::clone(id), at, points);
        }
        if !kept.is_empty() {
            self.tracker.hold(seq, kept.len() as u32);
            self.ingest
                .submit_replayed(
                    Batch::Metrics(MetricsBatch::from_validated(kept, at)),
                    seq,
                    client_batch,
                )
                .await
                .map_err(RecoveryError::from)?;
        }
        Ok(())
    }

    async fn events(&mut self, seq: Seq, payload: &[u8]) -> Result<(), Unusable> {
        let r = record::decode_events(payload).map_err(|e| Unusable(e.to_string()))?;
        let experiment = validate::experiment("parent_id", &r.parent_id, self.index)
            .map_err(|e| Unusable(e.to_string()))?;
        let client_batch = client_batch(r.client_batch_id);
        if let Some(id) = &client_batch {
            self.ingest.recent_batches().remember(
                std::sync::Arc::clone(id),
                r.ingested_at,
                r.events.len() as u64,
            );
        }
        let partition = PartitionKey {
            table: Table::Events,
            namespace: experiment.namespace.clone(),
            date: utc_date(r.ingested_at),
        };
        if self.published(seq, &partition, &experiment.id)? {
            self.report.skipped_blocks += 1;
            return Ok(());
        }
        self.report.replayed_blocks += 1;
        self.tracker.hold(seq, 1);
        let events = r.events.into_iter().map(EventRecord::from).collect();
        self.ingest
            .submit_replayed(
                Batch::Events(EventsBatch::from_validated(
                    experiment,
                    events,
                    r.ingested_at,
                )),
                seq,
                client_batch,
            )
            .await
            .map_err(RecoveryError::from)?;
        Ok(())
    }
}

fn client_batch(id: String) -> Option<std::sync::Arc<str>> {
    (!id.is_empty()).then(|| std::sync::Arc::from(id))
}
