//! The columnar buffer of one metrics partition: the rows that are not yet in a
//! row group.
//!
//! Blocks arrive whole from the API and are kept as they came ("chunks"): their
//! packed columns move in without a copy, and their key dictionary is mapped to
//! series ids once. No per-point allocation, lock or copy on the way in. When the
//! buffer is encoded, its rows are ordered by (experiment_id, key, step) and
//! gathered into Arrow arrays. Compaction uses the same buffer to merge rows read
//! back from files.
//!
//! Chunks are shared (`Arc`) with the writer's live view, so reads see buffered
//! rows without going through the writer thread.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, DictionaryArray, Float64Array, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, new_null_array,
};
use arrow_buffer::{BooleanBuffer, NullBuffer};
use arrow_schema::{ArrowError, DataType};

use crate::model::{MetricChunk, MetricSummary};

use super::schema::metrics_schema;

/// A (experiment, key) pair with rows in the buffer.
#[derive(Debug)]
struct Series {
    experiment: Arc<str>,
    key: Arc<str>,
}

/// One appended chunk and what the buffer learned about it.
#[derive(Debug)]
struct Entry {
    chunk: Arc<MetricChunk>,
    /// Series id of each entry of the block's key dictionary.
    series_of_key: Vec<u32>,
}

impl Entry {
    fn series(&self, row: usize) -> u32 {
        self.series_of_key[self.chunk.block.key_index[row] as usize]
    }
}

/// A row's place: chunk number in the high 32 bits, row within the chunk below.
type RowRef = u64;

fn row_ref(chunk: usize, row: usize) -> RowRef {
    ((chunk as u64) << 32) | row as u64
}

/// The buffer encoded: rows sorted by (experiment_id, key, step), and how many rows
/// each experiment has, in that order.
#[derive(Debug)]
pub(crate) struct SortedRows {
    pub batch: RecordBatch,
    pub experiments: Vec<(Arc<str>, u64)>,
    /// (experiment, key, rows) in the same order; empty for events.
    pub series: Vec<(Arc<str>, Arc<str>, u64)>,
}

#[derive(Debug, Default)]
pub(crate) struct MetricsBuffer {
    series: Vec<Series>,
    /// experiment id → key → series id.
    series_ids: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
    entries: Vec<Entry>,
    rows: usize,
    bytes: usize,
}

impl MetricsBuffer {
    pub(crate) fn len(&self) -> usize {
        self.rows
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.rows == 0
    }

    /// The memory the buffered chunks hold.
    pub(crate) fn approx_bytes(&self) -> usize {
        self.bytes
    }

    fn series_id(&mut self, experiment: &Arc<str>, key: &str) -> u32 {
        let keys = self.series_ids.entry(Arc::clone(experiment)).or_default();
        if let Some(&id) = keys.get(key) {
            return id;
        }
        let id = self.series.len() as u32;
        let key: Arc<str> = Arc::from(key);
        self.series.push(Series {
            experiment: Arc::clone(experiment),
            key: Arc::clone(&key),
        });
        keys.insert(key, id);
        id
    }

    /// Appends a validated chunk (its sparse rows sorted, as validation leaves them).
    pub(crate) fn append(&mut self, chunk: Arc<MetricChunk>) {
        let series_of_key = chunk
            .block
            .keys
            .iter()
            .map(|k| self.series_id(&chunk.block.experiment.id, k))
            .collect();
        self.rows += chunk.len();
        self.bytes += chunk.approx_bytes();
        self.entries.push(Entry {
            chunk,
            series_of_key,
        });
    }

    /// The experiments with rows in the buffer.
    pub(crate) fn experiments(&self) -> impl Iterator<Item = &Arc<str>> {
        self.series_ids.keys()
    }

    /// Empties the buffer.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// Summaries per (experiment, key).
    pub(crate) fn summaries(&self) -> Vec<(Arc<str>, Arc<str>, MetricSummary)> {
        let mut by_series: Vec<Option<MetricSummary>> = vec![None; self.series.len()];
        for e in &self.entries {
            let b = &e.chunk.block;
            let all_numeric = b.strings.is_empty() && b.bytes.is_empty();
            for row in 0..b.len() {
                let value = (all_numeric || e.chunk.is_numeric(row)).then(|| b.values[row]);
                let (step, at) = (b.steps[row] as i64, e.chunk.ingested_at(row));
                match &mut by_series[e.series(row) as usize] {
                    Some(s) => s.add(step, value, at),
                    slot => *slot = Some(MetricSummary::of(step, value, at)),
                }
            }
        }
        by_series
            .into_iter()
            .zip(&self.series)
            .filter_map(|(s, series)| {
                s.map(|s| (Arc::clone(&series.experiment), Arc::clone(&series.key), s))
            })
            .collect()
    }

    fn step(&self, r: RowRef) -> u64 {
        self.entries[(r >> 32) as usize].chunk.block.steps[(r & 0xffff_ffff) as usize]
    }

    /// Rows ordered by (series rank, step), arrival order breaking ties.
    ///
    /// A counting sort places rows into their series' range in one pass (stable, no
    /// comparisons); a series' range is then sorted by step only if its steps did not
    /// arrive in order. Each block contributes an ascending run, which the stable sort
    /// merges.
    fn sort_permutation(&self, rank: &[u32]) -> Vec<RowRef> {
        let mut starts = vec![0usize; rank.len() + 1];
        for e in &self.entries {
            for row in 0..e.chunk.len() {
                starts[rank[e.series(row) as usize] as usize + 1] += 1;
            }
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut next = starts.clone();
        let mut perm = vec![0; self.rows];
        for (c, e) in self.entries.iter().enumerate() {
            for row in 0..e.chunk.len() {
                let slot = &mut next[rank[e.series(row) as usize] as usize];
                perm[*slot] = row_ref(c, row);
                *slot += 1;
            }
        }
        let mut scratch: Vec<(u64, RowRef)> = Vec::new();
        for range in starts.windows(2) {
            let rows = &mut perm[range[0]..range[1]];
            if rows.windows(2).all(|w| self.step(w[0]) <= self.step(w[1])) {
                continue;
            }
            scratch.clear();
            scratch.extend(rows.iter().map(|&r| (self.step(r), r)));
            // (step, row) pairs are distinct and row refs grow with arrival, so the
            // order keeps arrival order among equal steps. The stable sort finds the
            // blocks' ascending runs and merges them (n log runs), where an unstable
            // one would sort from scratch (n log n).
            scratch.sort();
            for (dst, &(_, r)) in rows.iter_mut().zip(&scratch) {
                *dst = r;
            }
        }
        perm
    }

    /// The buffer as one Arrow batch sorted by (experiment_id, key, step), with each
    /// experiment's row count.
    pub(crate) fn to_record_batch(&self) -> Result<SortedRows, ArrowError> {
        let n = self.rows;
        // Rank series by (experiment, key); dictionaries hold sorted distinct values.
        let mut order: Vec<u32> = (0..self.series.len() as u32).collect();
        order.sort_unstable_by(|&a, &b| {
            let (a, b) = (&self.series[a as usize], &self.series[b as usize]);
            (&a.experiment, &a.key).cmp(&(&b.experiment, &b.key))
        });
        let mut rank = vec![0u32; self.series.len()];
        for (r, &s) in order.iter().enumerate() {
            rank[s as usize] = r as u32;
        }
        let (experiment_values, experiment_of_series) = dictionary(&self.series, |s| &s.experiment);
        let (key_values, key_of_series) = dictionary(&self.series, |s| &s.key);
        let perm = self.sort_permutation(&rank);
        let mut rows_of_series = vec![0u64; self.series.len()];
        for e in &self.entries {
            for row in 0..e.chunk.len() {
                rows_of_series[e.series(row) as usize] += 1;
            }
        }
        let series: Vec<(Arc<str>, Arc<str>, u64)> = order
            .iter()
            .map(|&s| {
                let x = &self.series[s as usize];
                (
                    Arc::clone(&x.experiment),
                    Arc::clone(&x.key),
                    rows_of_series[s as usize],
                )
            })
            .collect();

        let entry = |r: RowRef| &self.entries[(r >> 32) as usize];
        let row = |r: RowRef| (r & 0xffff_ffff) as usize;
        let experiment_keys: Vec<i32> = perm
            .iter()
            .map(|&r| experiment_of_series[entry(r).series(row(r)) as usize])
            .collect();
        // Each experiment's rows are one run of its dictionary key: compare keys,
        // not ids.
        let experiments: Vec<(Arc<str>, u64)> = experiment_keys
            .chunk_by(|a, b| a == b)
            .map(|run| {
                (
                    Arc::clone(experiment_values[run[0] as usize]),
                    run.len() as u64,
                )
            })
            .collect();
        let experiment_id = DictionaryArray::<Int32Type>::try_new(
            Int32Array::from(experiment_keys),
            Arc::new(StringArray::from_iter_values(
                experiment_values.iter().map(|s| &**s),
            )),
        )?;
        let key = DictionaryArray::<Int32Type>::try_new(
            perm.iter()
                .map(|&r| key_of_series[entry(r).series(row(r)) as usize])
                .collect::<Vec<i32>>()
                .into(),
            Arc::new(StringArray::from_iter_values(
                key_values.iter().map(|s| &**s),
            )),
        )?;
        let step: Int64Array = perm
            .iter()
            .map(|&r| self.step(r) as i64)
            .collect::<Vec<_>>()
            .into();
        let wallclock: Int64Array = perm
            .iter()
            .map(|&r| entry(r).chunk.block.wallclocks[row(r)] as i64)
            .collect::<Vec<_>>()
            .into();
        let doubles: Vec<f64> = perm
            .iter()
            .map(|&r| entry(r).chunk.block.values[row(r)])
            .collect();
        let any_strings = self
            .entries
            .iter()
            .any(|e| !e.chunk.block.strings.is_empty());
        let any_bytes = self.entries.iter().any(|e| !e.chunk.block.bytes.is_empty());
        let value_double = if !any_strings && !any_bytes {
            Float64Array::from(doubles)
        } else {
            let valid: BooleanBuffer = perm
                .iter()
                .map(|&r| entry(r).chunk.is_numeric(row(r)))
                .collect();
            Float64Array::new(doubles.into(), Some(NullBuffer::new(valid)))
        };
        let value_string: ArrayRef = if any_strings {
            let mut b = StringBuilder::new();
            for &r in &perm {
                b.append_option(MetricChunk::sparse(
                    &entry(r).chunk.block.strings,
                    row(r) as u32,
                ));
            }
            Arc::new(b.finish())
        } else {
            new_null_array(&DataType::Utf8, n)
        };
        let value_bytes: ArrayRef = if any_bytes {
            let mut b = BinaryBuilder::new();
            for &r in &perm {
                b.append_option(MetricChunk::sparse(
                    &entry(r).chunk.block.bytes,
                    row(r) as u32,
                ));
            }
            Arc::new(b.finish())
        } else {
            new_null_array(&DataType::Binary, n)
        };
        let ingested_at = TimestampMicrosecondArray::from(
            perm.iter()
                .map(|&r| entry(r).chunk.ingested_at(row(r)))
                .collect::<Vec<_>>(),
        )
        .with_timezone("UTC");

        let batch = RecordBatch::try_new(
            metrics_schema(),
            vec![
                Arc::new(experiment_id),
                Arc::new(key),
                Arc::new(step),
                Arc::new(wallclock),
                Arc::new(value_double),
                value_string,
                value_bytes,
                Arc::new(ingested_at),
            ],
        )?;
        Ok(SortedRows {
            batch,
            experiments,
            series,
        })
    }
}

/// Sorted distinct values of one string attribute of the series, and each series'
/// index into them.
fn dictionary<'a>(
    series: &'a [Series],
    attr: impl Fn(&'a Series) -> &'a Arc<str>,
) -> (Vec<&'a Arc<str>>, Vec<i32>) {
    let mut values: Vec<&Arc<str>> = series.iter().map(&attr).collect();
    values.sort_unstable();
    values.dedup();
    let of_series = series
        .iter()
        .map(|s| values.binary_search(&attr(s)).unwrap_or(0) as i32)
        .collect();
    (values, of_series)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExperimentRef, MetricBlock, Micros, SparseColumn};
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type};

    fn chunk(block: MetricBlock, at: Micros) -> Arc<MetricChunk> {
        Arc::new(MetricChunk::new(block, at))
    }

    fn block(exp: &str, keys: &[&str], key_index: Vec<u32>, steps: Vec<u64>) -> MetricBlock {
        let n = steps.len();
        MetricBlock {
            experiment: ExperimentRef {
                id: exp.into(),
                namespace: "ns".into(),
            },
            keys: keys.iter().map(|s| s.to_string()).collect(),
            key_index,
            wallclocks: steps.iter().map(|s| s * 10).collect(),
            values: (0..n).map(|i| i as f64).collect(),
            steps,
            strings: SparseColumn::default(),
            bytes: SparseColumn::default(),
        }
    }

    #[test]
    fn rows_sort_by_experiment_key_step_and_keep_values() {
        let mut buf = MetricsBuffer::default();
        buf.append(chunk(
            block("e2", &["loss", "acc"], vec![0, 1, 0, 1], vec![5, 5, 1, 1]),
            100,
        ));
        let mut b = block("e1", &["loss"], vec![0, 0], vec![9, 3]);
        b.strings = SparseColumn {
            rows: vec![1],
            values: vec!["s".into()],
        };
        buf.append(chunk(b, 200));
        let sorted = buf.to_record_batch().unwrap();
        let batch = sorted.batch;
        let counts: Vec<_> = sorted
            .experiments
            .iter()
            .map(|(e, n)| (e.to_string(), *n))
            .collect();
        assert_eq!(counts, [("e1".to_owned(), 2), ("e2".to_owned(), 4)]);
        let exp = batch.column(0).as_dictionary::<Int32Type>();
        let exp_values = exp.values().as_string::<i32>();
        let exps: Vec<_> = exp
            .keys()
            .values()
            .iter()
            .map(|&k| exp_values.value(k as usize))
            .collect();
        assert_eq!(exps, ["e1", "e1", "e2", "e2", "e2", "e2"]);
        let key = batch.column(1).as_dictionary::<Int32Type>();
        let key_values = key.values().as_string::<i32>();
        let keys: Vec<_> = key
            .keys()
            .values()
            .iter()
            .map(|&k| key_values.value(k as usize))
            .collect();
        assert_eq!(keys, ["loss", "loss", "acc", "acc", "loss", "loss"]);
        let steps = batch
            .column(2)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(steps, [3, 9, 1, 5, 1, 5]);
        let doubles = batch.column(4).as_primitive::<Float64Type>();
        // e1/loss step 3 is the string row (original row 1 of its block).
        assert!(doubles.is_null(0));
        assert_eq!(doubles.value(1), 0.0);
        assert_eq!(batch.column(5).as_string::<i32>().value(0), "s");
        assert_eq!(doubles.value(2), 3.0);
        let ingested = batch
            .column(7)
            .as_primitive::<arrow_array::types::TimestampMicrosecondType>();
        assert_eq!(ingested.value(0), 200);
        assert_eq!(ingested.value(5), 100);
    }

    #[test]
    fn equal_steps_keep_arrival_order_within_an_unordered_series() {
        let mut buf = MetricsBuffer::default();
        buf.append(chunk(block("e", &["k"], vec![0, 0], vec![3, 1]), 1));
        buf.append(chunk(block("e", &["k"], vec![0, 0], vec![3, 1]), 2));
        let batch = buf.to_record_batch().unwrap().batch;
        let steps = batch
            .column(2)
            .as_primitive::<Int64Type>()
            .values()
            .to_vec();
        assert_eq!(steps, [1, 1, 3, 3]);
        // block() sets value = row number within the block; ingest time tells blocks apart.
        let ingested = batch
            .column(7)
            .as_primitive::<arrow_array::types::TimestampMicrosecondType>()
            .values()
            .to_vec();
        assert_eq!(ingested, [1, 2, 1, 2]);
    }

    #[test]
    fn summaries_count_every_point_and_take_numbers_for_extremes() {
        let mut buf = MetricsBuffer::default();
        let mut b = block("e1", &["loss"], vec![0, 0, 0], vec![2, 1, 3]);
        b.strings = SparseColumn {
            rows: vec![2],
            values: vec!["text".into()],
        };
        buf.append(chunk(b, 7));
        buf.append(chunk(block("e1", &["loss"], vec![0], vec![2]), 8));
        let sums = buf.summaries();
        assert_eq!(sums.len(), 1);
        let (e, k, s) = &sums[0];
        assert_eq!((&**e, &**k), ("e1", "loss"));
        // Rows: step 2 = 0.0 (at 7), step 1 = 1.0, step 3 is text, step 2 = 0.0 (at 8).
        assert_eq!((s.count, s.points, s.min, s.max), (3, 4, 0.0, 1.0));
        // The last number is step 2's later ingest; the text at step 3 is no value.
        assert_eq!((s.last_step, s.last_at, s.last), (2, 8, 0.0));
    }
}
