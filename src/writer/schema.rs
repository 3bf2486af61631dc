//! Arrow schemas of the published tables and the Parquet properties that go with them.

use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::basic::{Compression, Encoding, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use parquet::schema::types::ColumnPath;

use crate::config::RollPolicy;

fn dict() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// `metrics/`: one row per point, sorted by (experiment_id, key, step).
pub fn metrics_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("experiment_id", dict(), false),
        Field::new("key", dict(), false),
        Field::new("step", DataType::Int64, false),
        Field::new("wallclock_time", DataType::Int64, false),
        Field::new("value_double", DataType::Float64, true),
        Field::new("value_string", DataType::Utf8, true),
        Field::new("value_bytes", DataType::Binary, true),
        Field::new("ingested_at", utc_micros(), false),
    ]))
}

/// `events/`: one row per event, sorted by (experiment_id, wallclock).
pub fn events_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("experiment_id", dict(), false),
        Field::new("name", dict(), false),
        Field::new("source", dict(), false),
        Field::new("wallclock", utc_micros(), false),
        Field::new("metadata", DataType::Utf8, false),
        Field::new("ingested_at", utc_micros(), false),
    ]))
}

/// `experiments/`: one row per experiment this daemon knows, sorted by id.
pub fn experiments_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("experiment_id", DataType::Utf8, false),
        Field::new("name", DataType::Utf8, false),
        Field::new("namespace", DataType::Utf8, false),
        Field::new("owner", DataType::Utf8, false),
        Field::new("framework", DataType::Utf8, false),
        Field::new("task", DataType::Utf8, false),
        Field::new("external_id", DataType::Utf8, false),
        Field::new("created_at", utc_micros(), false),
        Field::new("updated_at", utc_micros(), false),
    ]))
}

/// `metadata/`: one row per (experiment, key), sorted by both; values as JSON text.
pub fn metadata_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("experiment_id", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("value", DataType::Utf8, false),
        Field::new("updated_at", utc_micros(), false),
    ]))
}

/// `summaries/`: one row per (experiment, metric key): the metric summaries run
/// search uses; `written_at` tells the latest of several rows for one pair.
pub fn summaries_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("experiment_id", DataType::Utf8, false),
        Field::new("key", DataType::Utf8, false),
        Field::new("last", DataType::Float64, true),
        Field::new("last_step", DataType::Int64, true),
        Field::new("min", DataType::Float64, true),
        Field::new("max", DataType::Float64, true),
        Field::new("count", DataType::Int64, false),
        Field::new("points", DataType::Int64, false),
        Field::new("written_at", utc_micros(), false),
    ]))
}

/// zstd (but on the run-length-encoded dictionary columns), dictionaries on the string columns, delta encoding on the
/// monotone integer columns, and page-level statistics (which write the page index).
pub fn writer_properties(roll: &RollPolicy) -> WriterProperties {
    properties(roll.zstd_level)
}

/// As [`writer_properties`], for compacted files: written once and read for
/// months, so they take a stronger zstd level.
pub fn compaction_properties(roll: &RollPolicy) -> WriterProperties {
    properties(roll.zstd_level.max(3))
}

fn properties(zstd_level: i32) -> WriterProperties {
    let level = ZstdLevel::try_new(zstd_level).unwrap_or_default();
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(level))
        // Writers end each row group themselves (a sorted buffer, or an
        // experiment-aligned group in compaction); never split one.
        .set_max_row_group_size(usize::MAX)
        .set_statistics_enabled(EnabledStatistics::Page)
        .set_dictionary_enabled(true)
        .set_created_by(format!("mboxd {}", env!("CARGO_PKG_VERSION")));
    for column in ["step", "wallclock_time"] {
        let path = ColumnPath::from(column);
        props = props
            .set_column_dictionary_enabled(path.clone(), false)
            .set_column_encoding(path, Encoding::DELTA_BINARY_PACKED);
    }
    // Dictionary indices of sorted rows are runs that RLE already shrinks to a
    // few bytes per page; zstd would gain little and cost a reader a fresh
    // decompression context per page (a tenth of a long series read).
    for column in ["experiment_id", "key", "ingested_at"] {
        props = props.set_column_compression(ColumnPath::from(column), Compression::UNCOMPRESSED);
    }
    let value = ColumnPath::from("value_double");
    props = props
        .set_column_dictionary_enabled(value.clone(), false)
        .set_column_encoding(value, Encoding::BYTE_STREAM_SPLIT);
    props.build()
}
