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

/// The largest step or wallclock a metric point may carry: both are int64 in
/// storage (Spark, Delta Lake and Iceberg have no unsigned 64-bit type).
pub const MAX_STEP: u64 = i64::MAX as u64;

/// The current time in microseconds since the Unix epoch.
pub fn now_micros() -> Micros {
    chrono::Utc::now().timestamp_micros()
}

/// Where the daemon reads the time that decides a row's ingest time (and so its
/// date partition): the system clock, or a shifted one in benchmarks and tests
/// that need several days of data.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> Micros + Send + Sync>);

impl Clock {
    pub fn system() -> Self {
        Self(Arc::new(now_micros))
    }

    pub fn new(f: impl Fn() -> Micros + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub fn now(&self) -> Micros {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
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

/// When the rows of a chunk were ingested.
#[derive(Debug, Clone, PartialEq)]
pub enum Ingested {
    /// Every row at once (a request).
    At(Micros),
    /// Row by row (rows read back from files by compaction).
    PerRow(Vec<Micros>),
}

/// One block of metric points as it arrived, with its ingest time.
#[derive(Debug)]
pub struct MetricChunk {
    pub block: MetricBlock,
    pub ingested: Ingested,
}

impl MetricChunk {
    pub fn new(block: MetricBlock, ingested_at: Micros) -> Self {
        Self {
            block,
            ingested: Ingested::At(ingested_at),
        }
    }

    pub fn len(&self) -> usize {
        self.block.len()
    }

    pub fn is_empty(&self) -> bool {
        self.block.is_empty()
    }

    pub fn ingested_at(&self, row: usize) -> Micros {
        match &self.ingested {
            Ingested::At(at) => *at,
            Ingested::PerRow(at) => at[row],
        }
    }

    pub(crate) fn sparse<T>(column: &SparseColumn<T>, row: u32) -> Option<&T> {
        if column.rows.is_empty() {
            return None;
        }
        column
            .rows
            .binary_search(&row)
            .ok()
            .map(|j| &column.values[j])
    }

    /// Whether the row holds a number (not a string or bytes value).
    pub fn is_numeric(&self, row: usize) -> bool {
        Self::sparse(&self.block.strings, row as u32).is_none()
            && Self::sparse(&self.block.bytes, row as u32).is_none()
    }

    pub fn value(&self, row: usize) -> MetricValue {
        if let Some(s) = Self::sparse(&self.block.strings, row as u32) {
            return MetricValue::String(s.clone());
        }
        if let Some(b) = Self::sparse(&self.block.bytes, row as u32) {
            return MetricValue::Bytes(b.clone());
        }
        MetricValue::Double(self.block.values[row])
    }

    /// The memory the chunk holds, for the byte budget.
    pub fn approx_bytes(&self) -> usize {
        self.block.approx_bytes()
            + match &self.ingested {
                Ingested::At(_) => 0,
                Ingested::PerRow(v) => v.capacity() * 8,
            }
    }
}

/// Events of one experiment that arrived together.
#[derive(Debug)]
pub struct EventChunk {
    pub experiment: Arc<str>,
    pub experiment_namespace: Arc<str>,
    pub events: Vec<EventRecord>,
    pub ingested_at: Micros,
}

impl EventChunk {
    pub fn approx_bytes(&self) -> usize {
        self.events
            .iter()
            .map(|e| e.name.len() + e.source.len() + e.metadata_json.len() + 64)
            .sum()
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
    pub step: i64,
    pub wallclock: i64,
    pub value: MetricValue,
    pub ingested_at: Micros,
}

/// A series in brief: its points, and over its numeric values the last one (by
/// step; among equal steps the latest ingested), the extremes and their count.
/// Summaries of disjoint sets of points merge into the summary of their union, in
/// any order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricSummary {
    #[serde(with = "json_float")]
    pub last: f64,
    /// `i64::MIN` while there is no numeric value.
    pub last_step: i64,
    /// When the last value was ingested, breaking ties between equal steps.
    pub last_at: Micros,
    #[serde(with = "json_float")]
    pub min: f64,
    #[serde(with = "json_float")]
    pub max: f64,
    /// Numeric values.
    pub count: u64,
    /// Every point, strings and bytes included.
    pub points: u64,
}

impl MetricSummary {
    /// The summary of one point; `value` is `None` for a string or bytes value.
    pub fn of(step: i64, value: Option<f64>, at: Micros) -> Self {
        match value {
            Some(value) => Self {
                last: value,
                last_step: step,
                last_at: at,
                // NaN takes no part in the extremes (f64::min/max ignore it).
                min: if value.is_nan() { f64::INFINITY } else { value },
                max: if value.is_nan() {
                    f64::NEG_INFINITY
                } else {
                    value
                },
                count: 1,
                points: 1,
            },
            None => Self {
                last: f64::NAN,
                last_step: i64::MIN,
                last_at: i64::MIN,
                min: f64::INFINITY,
                max: f64::NEG_INFINITY,
                count: 0,
                points: 1,
            },
        }
    }

    /// Adds one point.
    pub fn add(&mut self, step: i64, value: Option<f64>, at: Micros) {
        self.merge(&Self::of(step, value, at));
    }

    /// Merges another summary into this one. Commutative and associative: the last
    /// value is the one with the largest (step, ingest time, value).
    pub fn merge(&mut self, other: &Self) {
        // Saturating: a summary from another daemon's change log is input.
        self.count = self.count.saturating_add(other.count);
        self.points = self.points.saturating_add(other.points);
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        let mine = (self.last_step, self.last_at);
        let theirs = (other.last_step, other.last_at);
        if theirs > mine || (theirs == mine && other.last.total_cmp(&self.last).is_gt()) {
            self.last = other.last;
            self.last_step = other.last_step;
            self.last_at = other.last_at;
        }
    }
}

/// JSON has no NaN or infinities; store them as strings.
mod json_float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else if v.is_nan() {
            s.serialize_str("NaN")
        } else if *v > 0.0 {
            s.serialize_str("Infinity")
        } else {
            s.serialize_str("-Infinity")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(v) => Ok(v),
            Repr::Text(t) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "Infinity" => Ok(f64::INFINITY),
                "-Infinity" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!(
                    "{other:?} is not a number"
                ))),
            },
        }
    }
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

    /// A summary from another daemon's change log can hold any count: merging
    /// saturates rather than overflowing.
    #[test]
    fn summaries_merge_counts_without_overflow() {
        let mut s = MetricSummary::of(1, Some(0.5), 10);
        let huge = MetricSummary {
            count: u64::MAX,
            points: u64::MAX,
            ..MetricSummary::of(2, Some(0.25), 20)
        };
        s.merge(&huge);
        assert_eq!((s.count, s.points), (u64::MAX, u64::MAX));
        assert_eq!((s.last, s.last_step, s.min, s.max), (0.25, 2, 0.25, 0.5));
    }

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
    fn summaries_merge_in_any_order() {
        let points = [
            (3, Some(1.0), 10),
            (1, Some(-2.0), 11),
            (3, Some(5.0), 12),
            (2, Some(f64::NAN), 13),
            (9, None, 14),
        ];
        let mut forward = MetricSummary::of(points[0].0, points[0].1, points[0].2);
        for &(s, v, at) in &points[1..] {
            forward.add(s, v, at);
        }
        let mut backward = MetricSummary::of(points[4].0, points[4].1, points[4].2);
        for &(s, v, at) in points[..4].iter().rev() {
            backward.add(s, v, at);
        }
        assert_eq!(forward, backward);
        // Step 3 twice: the later ingest (value 5) is last; the text at step 9 is
        // not a value.
        assert_eq!((forward.last, forward.last_step), (5.0, 3));
        assert_eq!((forward.min, forward.max), (-2.0, 5.0));
        assert_eq!((forward.count, forward.points), (4, 5));
        let json = serde_json::to_string(&MetricSummary::of(1, Some(f64::NAN), 0)).unwrap();
        let back: MetricSummary = serde_json::from_str(&json).unwrap();
        assert!(back.last.is_nan() && back.min == f64::INFINITY, "{json}");
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
