//! Start-up recovery: replays write-ahead log records into the writers, skipping
//! the blocks whose rows a published file already holds (see [`crate::index`]), so
//! every acknowledged point reaches Parquet exactly once whatever instant the last
//! process died at.

use std::collections::HashMap;

use crate::api::validate;
use crate::config::Limits;
use crate::index::{Index, IndexError};
use crate::ingest::{Ingest, IngestError, record};
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
    let mut report = Report {
        records: records.len(),
        ..Report::default()
    };
    let limits = Limits::unbounded();
    for r in records {
        let seq = r.seq;
        let outcome = match r.kind {
            RecordKind::Metrics => {
                replay_metrics(
                    seq,
                    &r.payload,
                    index,
                    ingest,
                    tracker,
                    &limits,
                    &mut report,
                )
                .await
            }
            RecordKind::Events => {
                replay_events(
                    seq,
                    &r.payload,
                    index,
                    ingest,
                    tracker,
                    &limits,
                    &mut report,
                )
                .await
            }
        };
        match outcome {
            Ok(()) => tracker.release(seq, 1),
            Err(Unusable(reason)) => {
                // Kept held: the segment stays on disk for inspection.
                tracing::error!(seq, %reason, "a write-ahead log record cannot be replayed; keeping it in the log");
                report.unusable_records += 1;
            }
        }
    }
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

/// Experiments of `seq` already published in `partition`, cached per record.
fn published<'a>(
    cache: &'a mut HashMap<String, Vec<String>>,
    index: &Index,
    seq: Seq,
    partition: String,
) -> Result<&'a Vec<String>, RecoveryError> {
    if !cache.contains_key(&partition) {
        let done = index.published_experiments(seq, &partition)?;
        cache.insert(partition.clone(), done);
    }
    Ok(&cache[&partition])
}

async fn replay_metrics(
    seq: Seq,
    payload: &[u8],
    index: &Index,
    ingest: &Ingest,
    tracker: &Tracker,
    limits: &Limits,
    report: &mut Report,
) -> Result<(), Unusable> {
    let (at, blocks) = record::decode_metrics(payload).map_err(|e| Unusable(e.to_string()))?;
    let date = utc_date(at);
    let mut cache = HashMap::new();
    let mut kept = Vec::new();
    for (i, b) in blocks.into_iter().enumerate() {
        let block = validate::block(&format!("blocks[{i}]"), b, index, limits)
            .map_err(|e| Unusable(e.to_string()))?;
        let partition = PartitionKey {
            table: Table::Metrics,
            namespace: block.experiment.namespace.clone(),
            date,
        }
        .dir();
        if published(&mut cache, index, seq, partition)?
            .iter()
            .any(|id| **id == *block.experiment.id)
        {
            report.skipped_blocks += 1;
        } else {
            kept.push(block);
        }
    }
    report.replayed_blocks += kept.len();
    if !kept.is_empty() {
        tracker.hold(seq, kept.len() as u32);
        ingest
            .submit_replayed_metrics(MetricsBatch::from_validated(kept, at), seq)
            .await
            .map_err(RecoveryError::from)?;
    }
    Ok(())
}

async fn replay_events(
    seq: Seq,
    payload: &[u8],
    index: &Index,
    ingest: &Ingest,
    tracker: &Tracker,
    _limits: &Limits,
    report: &mut Report,
) -> Result<(), Unusable> {
    let r = record::decode_events(payload).map_err(|e| Unusable(e.to_string()))?;
    let experiment = validate::experiment("parent_id", &r.parent_id, index)
        .map_err(|e| Unusable(e.to_string()))?;
    let partition = PartitionKey {
        table: Table::Events,
        namespace: experiment.namespace.clone(),
        date: utc_date(r.ingested_at),
    }
    .dir();
    let mut cache = HashMap::new();
    if published(&mut cache, index, seq, partition)?
        .iter()
        .any(|id| **id == *experiment.id)
    {
        report.skipped_blocks += 1;
        return Ok(());
    }
    report.replayed_blocks += 1;
    tracker.hold(seq, 1);
    let events = r.events.into_iter().map(EventRecord::from).collect();
    ingest
        .submit_replayed_events(
            EventsBatch::from_validated(experiment, events, r.ingested_at),
            seq,
        )
        .await
        .map_err(RecoveryError::from)?;
    Ok(())
}
