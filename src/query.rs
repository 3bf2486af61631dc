//! The read path: GetMetrics and ListEvents over published Parquet files, merged with
//! the rows a writer still holds (see [`crate::ingest::Snapshot`]).
//!
//! Files are pruned by the experiment range recorded in the manifest, then row
//! groups by their `experiment_id` statistics. A file already uploaded to S3 is
//! read in two ranged requests: its footer, then the span of row groups that may
//! hold the experiment.

use std::sync::Arc;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, TimestampMicrosecondType, UInt64Type};
use arrow_array::{Array, RecordBatch};
use bytes::{Buf, Bytes};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::errors::ParquetError;
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader, RowGroupMetaData};
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::statistics::Statistics;

use crate::index::FileEntry;
use crate::model::{EventPoint, EventRecord, MetricPoint, MetricValue};
use crate::sink::{FileData, Files, RemoteObject, SinkError};

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
    let parquet_err = |source| QueryError::Parquet {
        path: file.key.clone(),
        source,
    };
    match store.open(&file.object_key(), file.bytes)? {
        FileData::Local(f) => {
            let builder = ParquetRecordBatchReaderBuilder::try_new(f).map_err(parquet_err)?;
            read_experiment_rows(builder, &file.key, experiment_id)
        }
        FileData::Remote(object) => {
            let Some(fetched) = fetch_remote(&object, experiment_id, &file.key)? else {
                return Ok(Vec::new());
            };
            let (reader, metadata) = fetched;
            let metadata = ArrowReaderMetadata::try_new(Arc::new(metadata), Default::default())
                .map_err(parquet_err)?;
            let builder = ParquetRecordBatchReaderBuilder::new_with_metadata(reader, metadata);
            read_experiment_rows(builder, &file.key, experiment_id)
        }
    }
}

/// How much of a remote file's end is fetched at first: the footer and, almost
/// always, all of its metadata.
const FOOTER_PREFETCH: u64 = 64 << 10;

/// Fetches what reading `experiment_id` from a remote file needs: its metadata,
/// then the one contiguous span of row groups that may hold the experiment (files
/// are sorted by experiment). `None` when no row group can hold it.
fn fetch_remote(
    object: &RemoteObject,
    experiment_id: &str,
    key: &str,
) -> Result<Option<(Fetched, ParquetMetaData)>, QueryError> {
    let parquet_err = |source| QueryError::Parquet {
        path: key.to_owned(),
        source,
    };
    let size = object.size();
    let mut tail_start = size.saturating_sub(FOOTER_PREFETCH);
    let mut tail = object.get_range(tail_start..size)?;
    // The footer's last 8 bytes: metadata length (u32 LE) and the magic "PAR1".
    let footer = tail
        .len()
        .checked_sub(8)
        .and_then(|at| tail.get(at..at + 4))
        .ok_or_else(|| parquet_err(ParquetError::EOF(format!("{key} is too small"))))?;
    let needed = u64::from(u32::from_le_bytes([
        footer[0], footer[1], footer[2], footer[3],
    ])) + 8;
    if needed > tail.len() as u64 && needed <= size {
        tail_start = size - needed;
        tail = object.get_range(tail_start..size)?;
    }
    let mut fetched = Fetched {
        size,
        key: key.to_owned(),
        parts: vec![(tail_start, tail)],
    };
    let metadata = ParquetMetaDataReader::new()
        .parse_and_finish(&fetched)
        .map_err(parquet_err)?;
    let span = metadata
        .row_groups()
        .iter()
        .filter(|rg| row_group_may_contain(rg, experiment_id))
        .flat_map(|rg| rg.columns().iter().map(|c| c.byte_range()))
        .map(|(start, len)| (start, start + len))
        .reduce(|(a, b), (c, d)| (a.min(c), b.max(d)));
    let Some((start, end)) = span else {
        return Ok(None);
    };
    fetched.parts.push((start, object.get_range(start..end)?));
    Ok(Some((fetched, metadata)))
}

/// Parts of a remote file fetched in advance, served to the Parquet reader.
#[derive(Debug)]
struct Fetched {
    size: u64,
    key: String,
    /// (offset, bytes) of each fetched range.
    parts: Vec<(u64, Bytes)>,
}

impl Fetched {
    /// The fetched bytes from `start`, to the end of the part holding `length` of
    /// them.
    fn bytes_at(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.parts
            .iter()
            .find(|(at, bytes)| *at <= start && start + length as u64 <= at + bytes.len() as u64)
            .map(|(at, bytes)| bytes.slice((start - at) as usize..))
            .ok_or_else(|| {
                ParquetError::General(format!(
                    "bytes {start}..{} of {} were not fetched",
                    start + length as u64,
                    self.key
                ))
            })
    }
}

impl Length for Fetched {
    fn len(&self) -> u64 {
        self.size
    }
}

impl ChunkReader for Fetched {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.bytes_at(start, 0)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        Ok(self.bytes_at(start, length)?.slice(..length))
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
    builder: ParquetRecordBatchReaderBuilder<R>,
    display: &str,
    experiment_id: &str,
) -> Result<Vec<RecordBatch>, QueryError> {
    let parquet_err = |source| QueryError::Parquet {
        path: display.to_owned(),
        source,
    };
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
