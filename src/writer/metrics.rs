//! The columnar buffer of one metrics partition.
//!
//! Blocks arrive whole from the API and are kept as they came ("chunks"): their packed
//! columns move in without a copy, and their key dictionary is mapped to series ids
//! once. No per-point allocation, lock or copy on the way in. At roll time the rows of
//! all chunks are ordered by (experiment_id, key, step) and gathered into Arrow arrays.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{BinaryBuilder, StringBuilder};
use arrow_array::types::Int32Type;
use arrow_array::{
    ArrayRef, DictionaryArray, Float64Array, Int32Array, RecordBatch, StringArray,
    TimestampMicrosecondArray, UInt64Array, new_null_array,
};
use arrow_buffer::{BooleanBuffer, NullBuffer};
use arrow_schema::{ArrowError, DataType};

use crate::model::{MetricBlock, MetricPoint, MetricValue, Micros};

use super::schema::metrics_schema;

/// A (experiment, key) pair with rows in the buffer.
#[derive(Debug)]
struct Series {
    experiment: Arc<str>,
    key: Arc<str>,
}

/// One appended block and what the buffer learned about it.
#[derive(Debug)]
struct Chunk {
    block: MetricBlock,
    /// Series id of each entry of the block's key dictionary.
    series_of_key: Vec<u32>,
    ingested_at: Micros,
}

impl Chunk {
    fn series(&self, row: usize) -> u32 {
        self.series_of_key[self.block.key_index[row] as usize]
    }

    fn sparse<T>(column: &crate::model::SparseColumn<T>, row: u32) -> Option<&T> {
        column
            .rows
            .binary_search(&row)
            .ok()
            .map(|j| &column.values[j])
    }

    fn value(&self, row: u32) -> MetricValue {
        if let Some(s) = Self::sparse(&self.block.strings, row) {
            return MetricValue::String(s.clone());
        }
        if let Some(b) = Self::sparse(&self.block.bytes, row) {
            return MetricValue::Bytes(b.clone());
        }
        MetricValue::Double(self.block.values[row as usize])
    }
}

/// A row's place: chunk number in the high 32 bits, row within the chunk below.
type RowRef = u64;

fn row_ref(chunk: usize, row: usize) -> RowRef {
    ((chunk as u64) << 32) | row as u64
}

#[derive(Debug, Default)]
pub(super) struct MetricsBuffer {
    series: Vec<Series>,
    /// experiment id → key → series id.
    series_ids: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
    chunks: Vec<Chunk>,
    rows: usize,
}

impl MetricsBuffer {
    pub(super) fn len(&self) -> usize {
        self.rows
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

    /// Appends a validated block (its sparse rows sorted, as validation leaves them).
    pub(super) fn append(&mut self, block: MetricBlock, ingested_at: Micros) {
        let series_of_key = block
            .keys
            .iter()
            .map(|k| self.series_id(&block.experiment.id, k))
            .collect();
        self.rows += block.len();
        self.chunks.push(Chunk {
            block,
            series_of_key,
            ingested_at,
        });
    }

    /// The buffered points of one experiment, in arrival order.
    pub(super) fn points_of(&self, experiment_id: &str) -> Vec<MetricPoint> {
        let mut out = Vec::new();
        for chunk in self
            .chunks
            .iter()
            .filter(|c| &*c.block.experiment.id == experiment_id)
        {
            let b = &chunk.block;
            out.extend((0..b.len()).map(|row| MetricPoint {
                key: b.keys[b.key_index[row] as usize].clone(),
                step: b.steps[row],
                wallclock: b.wallclocks[row],
                value: chunk.value(row as u32),
                ingested_at: chunk.ingested_at,
            }));
        }
        out
    }

    fn step(&self, r: RowRef) -> u64 {
        self.chunks[(r >> 32) as usize].block.steps[(r & 0xffff_ffff) as usize]
    }

    /// Rows ordered by (series rank, step), arrival order breaking ties.
    ///
    /// A counting sort places rows into their series' range in one pass (stable, no
    /// comparisons); a series' range is then sorted by step only if its steps did not
    /// arrive in order. Each block contributes an ascending run, which the stable sort
    /// merges.
    fn sort_permutation(&self, rank: &[u32]) -> Vec<RowRef> {
        let mut starts = vec![0usize; rank.len() + 1];
        for chunk in &self.chunks {
            for row in 0..chunk.block.len() {
                starts[rank[chunk.series(row) as usize] as usize + 1] += 1;
            }
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut next = starts.clone();
        let mut perm = vec![0; self.rows];
        for (c, chunk) in self.chunks.iter().enumerate() {
            for row in 0..chunk.block.len() {
                let slot = &mut next[rank[chunk.series(row) as usize] as usize];
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
            // sort keeps arrival order among equal steps.
            scratch.sort();
            for (dst, &(_, r)) in rows.iter_mut().zip(&scratch) {
                *dst = r;
            }
        }
        perm
    }

    /// The buffer as one Arrow batch sorted by (experiment_id, key, step), with the
    /// smallest and largest experiment id.
    pub(super) fn to_record_batch(&self) -> Result<(RecordBatch, String, String), ArrowError> {
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

        let chunk = |r: RowRef| &self.chunks[(r >> 32) as usize];
        let row = |r: RowRef| (r & 0xffff_ffff) as usize;
        let gather_series = |of_series: &[i32]| -> Int32Array {
            perm.iter()
                .map(|&r| of_series[chunk(r).series(row(r)) as usize])
                .collect::<Vec<i32>>()
                .into()
        };
        let experiment_id = DictionaryArray::<Int32Type>::try_new(
            gather_series(&experiment_of_series),
            Arc::new(StringArray::from_iter_values(
                experiment_values.iter().map(|s| &**s),
            )),
        )?;
        let key = DictionaryArray::<Int32Type>::try_new(
            gather_series(&key_of_series),
            Arc::new(StringArray::from_iter_values(
                key_values.iter().map(|s| &**s),
            )),
        )?;
        let step: UInt64Array = perm
            .iter()
            .map(|&r| self.step(r))
            .collect::<Vec<_>>()
            .into();
        let wallclock: UInt64Array = perm
            .iter()
            .map(|&r| chunk(r).block.wallclocks[row(r)])
            .collect::<Vec<_>>()
            .into();
        let doubles: Vec<f64> = perm
            .iter()
            .map(|&r| chunk(r).block.values[row(r)])
            .collect();
        let any_strings = self.chunks.iter().any(|c| !c.block.strings.is_empty());
        let any_bytes = self.chunks.iter().any(|c| !c.block.bytes.is_empty());
        let value_double = if !any_strings && !any_bytes {
            Float64Array::from(doubles)
        } else {
            let valid: BooleanBuffer = perm
                .iter()
                .map(|&r| {
                    let (c, i) = (chunk(r), row(r) as u32);
                    Chunk::sparse(&c.block.strings, i).is_none()
                        && Chunk::sparse(&c.block.bytes, i).is_none()
                })
                .collect();
            Float64Array::new(doubles.into(), Some(NullBuffer::new(valid)))
        };
        let value_string: ArrayRef = if any_strings {
            let mut b = StringBuilder::new();
            for &r in &perm {
                b.append_option(Chunk::sparse(&chunk(r).block.strings, row(r) as u32));
            }
            Arc::new(b.finish())
        } else {
            new_null_array(&DataType::Utf8, n)
        };
        let value_bytes: ArrayRef = if any_bytes {
            let mut b = BinaryBuilder::new();
            for &r in &perm {
                b.append_option(Chunk::sparse(&chunk(r).block.bytes, row(r) as u32));
            }
            Arc::new(b.finish())
        } else {
            new_null_array(&DataType::Binary, n)
        };
        let ingested_at = TimestampMicrosecondArray::from(
            perm.iter()
                .map(|&r| chunk(r).ingested_at)
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
        let min = experiment_values
            .first()
            .map(|s| s.to_string())
            .unwrap_or_default();
        let max = experiment_values
            .last()
            .map(|s| s.to_string())
            .unwrap_or_default();
        Ok((batch, min, max))
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
    use crate::model::{ExperimentRef, SparseColumn};
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, UInt64Type};

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
        buf.append(
            block("e2", &["loss", "acc"], vec![0, 1, 0, 1], vec![5, 5, 1, 1]),
            100,
        );
        let mut b = block("e1", &["loss"], vec![0, 0], vec![9, 3]);
        b.strings = SparseColumn {
            rows: vec![1],
            values: vec!["s".into()],
        };
        buf.append(b, 200);
        let (batch, min, max) = buf.to_record_batch().unwrap();
        assert_eq!((min.as_str(), max.as_str()), ("e1", "e2"));
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
            .as_primitive::<UInt64Type>()
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
        buf.append(block("e", &["k"], vec![0, 0], vec![3, 1]), 1);
        buf.append(block("e", &["k"], vec![0, 0], vec![3, 1]), 2);
        let (batch, _, _) = buf.to_record_batch().unwrap();
        let steps = batch
            .column(2)
            .as_primitive::<UInt64Type>()
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
    fn points_of_one_experiment_in_arrival_order() {
        let mut buf = MetricsBuffer::default();
        buf.append(block("e1", &["a"], vec![0, 0], vec![2, 1]), 7);
        buf.append(block("e2", &["a"], vec![0], vec![1]), 8);
        let pts = buf.points_of("e1");
        assert_eq!(pts.iter().map(|p| p.step).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(pts[1].value, MetricValue::Double(1.0));
        assert!(buf.points_of("e3").is_empty());
    }
}
