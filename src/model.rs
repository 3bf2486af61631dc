//! Validated domain types that flow from the API to the writers and the index.
//!
//! A [`MetricsBatch`] or [`EventsBatch`] can only be built by the API's validation
//! (its constructors are `pub(crate)` and documented as taking checked parts), so the
//! writer never sees an unchecked request.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Namespace used when a client sends an empty one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Microseconds since the Unix epoch, UTC.
pub type Micros = i64;

/// The current time in microseconds since the Unix epoch.
pub fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

/// The stable experiment id for a (namespace, name, owner, external_id) tuple.
///
/// SHA-256 over a versioned, length-prefixed encoding of the four fields, first 16
/// bytes in hex. It is the same on every machine, daemon and release, so every rank
/// of a job and every sidecar computes the same id without coordination.
pub fn experiment_id(namespace: &str, name: &str, owner: &str, external_id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"mboxd.experiment.v1");
    for field in [namespace, name, owner, external_id] {
        hasher.update((field.len() as u64).to_le_bytes());
        hasher.update(field.as_bytes());
    }
    let digest = hasher.finalize();
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// An experiment as the index stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExperimentRecord {
    pub id: String,
    pub name: String,
    pub namespace: String,
    pub owner: String,
    pub framework: i32,
    pub task: String,
    pub external_id: String,
    pub created_at: Micros,
    pub updated_at: Micros,
}

/// What the write path needs to know about an experiment: its id and namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExperimentRef {
    pub id: Arc<str>,
    pub namespace: Arc<str>,
}

/// A column holding values for a few rows of a block (string or bytes metric values).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SparseColumn<T> {
    /// Row numbers within the block, each < the block's length, no repeats.
    pub rows: Vec<u32>,
    /// `values[j]` belongs to row `rows[j]`.
    pub values: Vec<T>,
}

impl<T> SparseColumn<T> {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Orders the entries by row (a no-op when they already are, the usual case).
    pub fn sort_by_row(&mut self) {
        if self.rows.is_sorted() {
            return;
        }
        let mut pairs: Vec<(u32, T)> = self.rows.drain(..).zip(self.values.drain(..)).collect();
        pairs.sort_unstable_by_key(|(r, _)| *r);
        (self.rows, self.values) = pairs.into_iter().unzip();
    }
}

/// Metric points of one experiment, columnar, as the client sent them.
#[derive(Debug, Clone)]
pub struct MetricBlock {
    pub experiment: ExperimentRef,
    pub keys: Vec<String>,
    pub key_index: Vec<u32>,
    pub steps: Vec<u64>,
    pub wallclocks: Vec<u64>,
    /// Numeric values; the entry of a string or bytes row is ignored.
    pub values: Vec<f64>,
    pub strings: SparseColumn<String>,
    pub bytes: SparseColumn<Vec<u8>>,
}

impl MetricBlock {
    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The memory this block holds (by capacity), for the byte budget.
    pub fn approx_bytes(&self) -> usize {
        let columns = self.key_index.capacity() * 4
            + (self.steps.capacity() + self.wallclocks.capacity() + self.values.capacity()) * 8
            + (self.strings.rows.capacity() + self.bytes.rows.capacity()) * 4;
        let keys: usize = self.keys.iter().map(|k| k.capacity() + 24).sum();
        let strings: usize = self.strings.values.iter().map(|s| s.capacity() + 24).sum();
        let bytes: usize = self.bytes.values.iter().map(|b| b.capacity() + 24).sum();
        // The block itself, its experiment handles and the writer's series map entry.
        columns + keys + strings + bytes + 256
    }

    /// Drops spare capacity (decoding grows vectors by doubling) so the block costs
    /// what it holds, and orders sparse values by row so lookups can binary-search.
    pub(crate) fn compact(&mut self) {
        self.key_index.shrink_to_fit();
        self.steps.shrink_to_fit();
        self.wallclocks.shrink_to_fit();
        self.values.shrink_to_fit();
        self.strings.sort_by_row();
        self.bytes.sort_by_row();
    }
}

/// A validated LogMetrics request: blocks that share one ingest time.
#[derive(Debug, Clone)]
pub struct MetricsBatch {
    blocks: Vec<MetricBlock>,
    ingested_at: Micros,
}

impl MetricsBatch {
    /// Builds a batch from blocks that the API has validated: lengths agree, every
    /// key index and sparse row is in range, and each experiment exists.
    pub(crate) fn from_validated(blocks: Vec<MetricBlock>, ingested_at: Micros) -> Self {
        Self {
            blocks,
            ingested_at,
        }
    }

    pub fn blocks(&self) -> &[MetricBlock] {
        &self.blocks
    }

    pub fn into_blocks(self) -> Vec<MetricBlock> {
        self.blocks
    }

    pub fn ingested_at(&self) -> Micros {
        self.ingested_at
    }

    pub fn points(&self) -> usize {
        self.blocks.iter().map(MetricBlock::len).sum()
    }

    pub fn approx_bytes(&self) -> usize {
        self.blocks.iter().map(MetricBlock::approx_bytes).sum()
    }
}

/// One event.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub name: String,
    pub source: String,
    pub wallclock: Micros,
    /// The event's metadata map as JSON text.
    pub metadata_json: String,
}

/// A validated LogEvent request: events of one experiment.
#[derive(Debug, Clone)]
pub struct EventsBatch {
    experiment: ExperimentRef,
    events: Vec<EventRecord>,
    ingested_at: Micros,
}

impl EventsBatch {
    /// Builds a batch from events the API has validated for an existing experiment.
    pub(crate) fn from_validated(
        experiment: ExperimentRef,
        events: Vec<EventRecord>,
        ingested_at: Micros,
    ) -> Self {
        Self {
            experiment,
            events,
            ingested_at,
        }
    }

    pub fn experiment(&self) -> &ExperimentRef {
        &self.experiment
    }

    pub fn events(&self) -> &[EventRecord] {
        &self.events
    }

    pub fn into_events(self) -> Vec<EventRecord> {
        self.events
    }

    pub fn ingested_at(&self) -> Micros {
        self.ingested_at
    }

    pub fn approx_bytes(&self) -> usize {
        self.events
            .iter()
            .map(|e| e.name.len() + e.source.len() + e.metadata_json.len() + 96)
            .sum()
    }
}

/// A numeric, string or bytes metric value, as the read path returns it.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricValue {
    Double(f64),
    String(String),
    Bytes(Vec<u8>),
}

/// One metric point read back.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricPoint {
    pub key: String,
    pub step: u64,
    pub wallclock: u64,
    pub value: MetricValue,
    pub ingested_at: Micros,
}

/// One event read back.
#[derive(Debug, Clone, PartialEq)]
pub struct EventPoint {
    pub event: EventRecord,
    pub ingested_at: Micros,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiment_id_is_pinned() {
        // Changing this breaks every deployed fleet: ids must never change.
        assert_eq!(
            experiment_id("cv", "yolo-v4", "foo@bar.com", "ext1"),
            "2b2a19e145c92827d50144d50ee13c68"
        );
    }

    #[test]
    fn sparse_columns_sort_by_row_keeping_pairs() {
        let mut c = SparseColumn {
            rows: vec![9, 2, 5],
            values: vec!["nine", "two", "five"],
        };
        c.sort_by_row();
        assert_eq!(c.rows, [2, 5, 9]);
        assert_eq!(c.values, ["two", "five", "nine"]);
    }

    #[test]
    fn experiment_id_separates_fields() {
        assert_ne!(
            experiment_id("a", "bc", "", ""),
            experiment_id("ab", "c", "", "")
        );
        assert_ne!(
            experiment_id("", "", "x", ""),
            experiment_id("", "", "", "x")
        );
    }
}
