//! The read path: GetMetrics and ListEvents over published Parquet files, merged with
//! the rows a writer still holds (see [`crate::ingest::Snapshot`]).
//!
//! Files are pruned by the experiment range recorded in the manifest, then row
//! groups by their `experiment_id` statistics.

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, TimestampMicrosecondType, UInt64Type};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::errors::ParquetError;
use parquet::file::metadata::RowGroupMetaData;
use parquet::file::reader::ChunkReader;
use parquet::file::statistics::Statistics;

use crate::index::FileEntry;
use crate::model::{EventPoint, EventRecord, MetricPoint, MetricValue};
use crate::sink::{FileData, Files, SinkError};

/// Errors reading published files.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    #[error(transparent)]
    Open(#[from] SinkError),
    #[error("reading {path}: {source}")]
    Parquet { path: String, source: ParquetError },
    #[error("file {path} does not have the expected schema: {reason}")]
    Schema { path: String, reason: String },
}

/// Metric points of one experiment from the given files, in file order.
pub fn read_metrics(
    store: &Files,
    files: &[FileEntry],
    experiment_id: &str,
) -> Result<Vec<MetricPoint>, QueryError> {
    let mut out = Vec::new();
    for file in files {
        for batch in experiment_rows(store, file, experiment_id)? {
            metric_points(&batch, &file.key, &mut out)?;
        }
    }
    Ok(out)
}

/// Events of one experiment from the given files, in file order.
pub fn read_events(
    store: &Files,
    files: &[FileEntry],
    experiment_id: &str,
) -> Result<Vec<EventPoint>, QueryError> {
    let mut out = Vec::new();
    for file in files {
        for batch in experiment_rows(store, file, experiment_id)? {
            event_points(&batch, &file.key, &mut out)?;
        }
    }
    Ok(out)
}

/// The rows of `experiment_id` in one published file, wherever it is.
fn experiment_rows(
    store: &Files,
    file: &FileEntry,
    experiment_id: &str,
) -> Result<Vec<RecordBatch>, QueryError> {
    match store.open(&file.object_key())? {
        FileData::Local(f) => read_experiment_rows(f, &file.key, experiment_id),
        FileData::Remote(bytes) => read_experiment_rows(bytes, &file.key, experiment_id),
    }
}

fn row_group_may_contain(rg: &RowGroupMetaData, experiment_id: &str) -> bool {
    let Some(Statistics::ByteArray(stats)) = rg.column(0).statistics() else {
        return true;
    };
    let (Some(min), Some(max)) = (stats.min_opt(), stats.max_opt()) else {
        return true;
    };
    let id = experiment_id.as_bytes();
    min.data() <= id && id <= max.data()
}

/// The rows of `experiment_id` in one file, as Arrow batches.
fn read_experiment_rows<R: ChunkReader + 'static>(
    file: R,
    display: &str,
    experiment_id: &str,
) -> Result<Vec<RecordBatch>, QueryError> {
    let parquet_err = |source| QueryError::Parquet {
        path: display.to_owned(),
        source,
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(parquet_err)?;
    let groups: Vec<usize> = builder
        .metadata()
        .row_groups()
        .iter()
        .enumerate()
        .filter(|(_, rg)| row_group_may_contain(rg, experiment_id))
        .map(|(i, _)| i)
        .collect();
    if groups.is_empty() {
        return Ok(Vec::new());
    }
    let reader = builder
        .with_row_groups(groups)
        .build()
        .map_err(parquet_err)?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| parquet_err(ParquetError::from(e)))?;
        let ids = batch
            .column(0)
            .as_dictionary_opt::<Int32Type>()
            .ok_or_else(|| QueryError::Schema {
                path: display.to_owned(),
                reason: "experiment_id is not a dictionary column".into(),
            })?;
        let values = ids.values().as_string::<i32>();
        let Some(wanted) = (0..values.len()).find(|&i| values.value(i) == experiment_id) else {
            continue;
        };
        let mask: arrow_array::BooleanArray = ids
            .keys()
            .iter()
            .map(|k| Some(k == Some(wanted as i32)))
            .collect();
        let filtered = arrow_select::filter::filter_record_batch(&batch, &mask)
            .map_err(|e| parquet_err(e.into()))?;
        if filtered.num_rows() > 0 {
            out.push(filtered);
        }
    }
    Ok(out)
}

fn schema_err(path: &str, column: &str) -> QueryError {
    QueryError::Schema {
        path: path.to_owned(),
        reason: format!("column {column} is missing or has the wrong type"),
    }
}

fn metric_points(
    batch: &RecordBatch,
    path: &str,
    out: &mut Vec<MetricPoint>,
) -> Result<(), QueryError> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| schema_err(path, name))
    };
    let keys = col("key")?
        .as_dictionary_opt::<Int32Type>()
        .ok_or_else(|| schema_err(path, "key"))?;
    let key_values = keys
        .values()
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err(path, "key"))?;
    let steps = col("step")?
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| schema_err(path, "step"))?;
    let wallclocks = col("wallclock_time")?
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| schema_err(path, "wallclock_time"))?;
    let doubles = col("value_double")?
        .as_primitive_opt::<Float64Type>()
        .ok_or_else(|| schema_err(path, "value_double"))?;
    let strings = col("value_string")?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err(path, "value_string"))?;
    let bytes = col("value_bytes")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| schema_err(path, "value_bytes"))?;
    let ingested = col("ingested_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err(path, "ingested_at"))?;
    for row in 0..batch.num_rows() {
        let value = if doubles.is_valid(row) {
            MetricValue::Double(doubles.value(row))
        } else if strings.is_valid(row) {
            MetricValue::String(strings.value(row).to_owned())
        } else {
            MetricValue::Bytes(bytes.value(row).to_vec())
        };
        out.push(MetricPoint {
            key: key_values.value(keys.keys().value(row) as usize).to_owned(),
            step: steps.value(row),
            wallclock: wallclocks.value(row),
            value,
            ingested_at: ingested.value(row),
        });
    }
    Ok(())
}

fn event_points(
    batch: &RecordBatch,
    path: &str,
    out: &mut Vec<EventPoint>,
) -> Result<(), QueryError> {
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| schema_err(path, name))
    };
    let dict = |name: &str| -> Result<Vec<String>, QueryError> {
        let d = col(name)?
            .as_dictionary_opt::<Int32Type>()
            .ok_or_else(|| schema_err(path, name))?;
        let v = d
            .values()
            .as_string_opt::<i32>()
            .ok_or_else(|| schema_err(path, name))?;
        Ok(d.keys()
            .values()
            .iter()
            .map(|&k| v.value(k as usize).to_owned())
            .collect())
    };
    let names = dict("name")?;
    let sources = dict("source")?;
    let wallclock = col("wallclock")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err(path, "wallclock"))?;
    let metadata = col("metadata")?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err(path, "metadata"))?;
    let ingested = col("ingested_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err(path, "ingested_at"))?;
    for (row, (name, source)) in names.into_iter().zip(sources).enumerate() {
        out.push(EventPoint {
            event: EventRecord {
                name,
                source,
                wallclock: wallclock.value(row),
                metadata_json: metadata.value(row).to_owned(),
            },
            ingested_at: ingested.value(row),
        });
    }
    Ok(())
}
