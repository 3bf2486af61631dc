//! The columnar buffer of one metrics partition.
//!
//! Blocks are appended whole: the key dictionary of a block is mapped to series ids
//! once, then the packed columns are extended in bulk. No per-point allocation or
//! lock. At roll time the rows are ordered by (experiment_id, key, step) with a
//! stable sort (arrival order breaks ties) and gathered into Arrow arrays.

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

/// A (experiment, key) pair with its rows in the buffer.
#[derive(Debug)]
struct Series {
    experiment: Arc<str>,
    key: Arc<str>,
}

#[derive(Debug, Default)]
pub(super) struct MetricsBuffer {
    series: Vec<Series>,
    /// experiment id → key → series id.
    series_ids: HashMap<Arc<str>, HashMap<Arc<str>, u32>>,
    row_series: Vec<u32>,
    steps: Vec<u64>,
    wallclocks: Vec<u64>,
    values: Vec<f64>,
    /// (row, value) for string-valued rows, in row order.
    strings: Vec<(u32, String)>,
    /// (row, value) for bytes-valued rows, in row order.
    bytes: Vec<(u32, Vec<u8>)>,
    /// (first row, ingest time) runs: every row from `first row` on, up to the next
    /// run, was ingested at that time.
    ingested: Vec<(u32, Micros)>,
}

impl MetricsBuffer {
    pub(super) fn len(&self) -> usize {
        self.steps.len()
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

    /// Appends a validated block.
    pub(super) fn append(&mut self, block: MetricBlock, ingested_at: Micros) {
        let base = self.len() as u32;
        if self
            .ingested
            .last()
            .is_none_or(|&(_, at)| at != ingested_at)
        {
            self.ingested.push((base, ingested_at));
        }
        let ids: Vec<u32> = block
            .keys
            .iter()
            .map(|k| self.series_id(&block.experiment.id, k))
            .collect();
        self.row_series
            .extend(block.key_index.iter().map(|&k| ids[k as usize]));
        self.steps.extend_from_slice(&block.steps);
        self.wallclocks.extend_from_slice(&block.wallclocks);
        self.values.extend_from_slice(&block.values);
        // Sparse rows are sorted here so lookups at roll time can binary-search.
        let mut strings: Vec<_> = block
            .strings
            .rows
            .into_iter()
            .map(|r| base + r)
            .zip(block.strings.values)
            .collect();
        strings.sort_unstable_by_key(|(r, _)| *r);
        self.strings.extend(strings);
        let mut bytes: Vec<_> = block
            .bytes
            .rows
            .into_iter()
            .map(|r| base + r)
            .zip(block.bytes.values)
            .collect();
        bytes.sort_unstable_by_key(|(r, _)| *r);
        self.bytes.extend(bytes);
    }

    fn ingested_at(&self, row: u32) -> Micros {
        let run = self.ingested.partition_point(|&(first, _)| first <= row);
        self.ingested[run.saturating_sub(1)].1
    }

    fn value_of(&self, row: u32) -> MetricValue {
        if let Ok(i) = self.strings.binary_search_by_key(&row, |(r, _)| *r) {
            return MetricValue::String(self.strings[i].1.clone());
        }
        if let Ok(i) = self.bytes.binary_search_by_key(&row, |(r, _)| *r) {
            return MetricValue::Bytes(self.bytes[i].1.clone());
        }
        MetricValue::Double(self.values[row as usize])
    }

    /// The buffered points of one experiment, in arrival order.
    pub(super) fn points_of(&self, experiment_id: &str) -> Vec<MetricPoint> {
        let Some(keys) = self.series_ids.get(experiment_id) else {
            return Vec::new();
        };
        let mut wanted = vec![false; self.series.len()];
        for &id in keys.values() {
            wanted[id as usize] = true;
        }
        (0..self.len() as u32)
            .filter(|&row| wanted[self.row_series[row as usize] as usize])
            .map(|row| {
                let r = row as usize;
                MetricPoint {
                    key: self.series[self.row_series[r] as usize].key.to_string(),
                    step: self.steps[r],
                    wallclock: self.wallclocks[r],
                    value: self.value_of(row),
                    ingested_at: self.ingested_at(row),
                }
            })
            .collect()
    }

    /// Row numbers ordered by (series rank, step), arrival order breaking ties.
    ///
    /// A counting sort places rows into their series' range in one pass (stable, no
    /// comparisons); a series' range is then sorted by step only if its steps did not
    /// arrive in order, which is rare for a training run's metrics.
    fn sort_permutation(&self, rank: &[u32]) -> Vec<u32> {
        let mut starts = vec![0usize; rank.len() + 1];
        for &s in &self.row_series {
            starts[rank[s as usize] as usize + 1] += 1;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        let mut next = starts.clone();
        let mut perm = vec![0u32; self.len()];
        for (row, &s) in self.row_series.iter().enumerate() {
            let slot = &mut next[rank[s as usize] as usize];
            perm[*slot] = row as u32;
            *slot += 1;
        }
        let mut scratch: Vec<(u64, u32)> = Vec::new();
        for range in starts.windows(2) {
            let rows = &mut perm[range[0]..range[1]];
            let steps = &self.steps;
            if rows
                .windows(2)
                .all(|w| steps[w[0] as usize] <= steps[w[1] as usize])
            {
                continue;
            }
            scratch.clear();
            scratch.extend(rows.iter().map(|&r| (steps[r as usize], r)));
            // Each block contributes an ascending run, and the stable sort merges
            // natural runs; (step, row) pairs are distinct, so arrival order breaks ties.
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
        let n = self.len();
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

        let gather_series = |of_series: &[i32]| -> Int32Array {
            perm.iter()
                .map(|&i| of_series[self.row_series[i as usize] as usize])
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
            .map(|&i| self.steps[i as usize])
            .collect::<Vec<_>>()
            .into();
        let wallclock: UInt64Array = perm
            .iter()
            .map(|&i| self.wallclocks[i as usize])
            .collect::<Vec<_>>()
            .into();
        let doubles: Vec<f64> = perm.iter().map(|&i| self.values[i as usize]).collect();
        let value_double = if self.strings.is_empty() && self.bytes.is_empty() {
            Float64Array::from(doubles)
        } else {
            let mut numeric = vec![true; n];
            for &(r, _) in &self.strings {
                numeric[r as usize] = false;
            }
            for &(r, _) in &self.bytes {
                numeric[r as usize] = false;
            }
            let valid: BooleanBuffer = perm.iter().map(|&i| numeric[i as usize]).collect();
            Float64Array::new(doubles.into(), Some(NullBuffer::new(valid)))
        };
        let value_string: ArrayRef = if self.strings.is_empty() {
            new_null_array(&DataType::Utf8, n)
        } else {
            let mut b = StringBuilder::new();
            for &i in &perm {
                match self.strings.binary_search_by_key(&i, |(r, _)| *r) {
                    Ok(j) => b.append_value(&self.strings[j].1),
                    Err(_) => b.append_null(),
                }
            }
            Arc::new(b.finish())
        };
        let value_bytes: ArrayRef = if self.bytes.is_empty() {
            new_null_array(&DataType::Binary, n)
        } else {
            let mut b = BinaryBuilder::new();
            for &i in &perm {
                match self.bytes.binary_search_by_key(&i, |(r, _)| *r) {
                    Ok(j) => b.append_value(&self.bytes[j].1),
                    Err(_) => b.append_null(),
                }
            }
            Arc::new(b.finish())
        };
        let mut ingested_by_row = Vec::with_capacity(n);
        for (run, &(first, at)) in self.ingested.iter().enumerate() {
            let end = self
                .ingested
                .get(run + 1)
                .map_or(n, |&(next, _)| next as usize);
            ingested_by_row.resize(end.max(first as usize), at);
        }
        let ingested_at = TimestampMicrosecondArray::from(
            perm.iter()
                .map(|&i| ingested_by_row[i as usize])
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
