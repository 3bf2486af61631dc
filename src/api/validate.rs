//! Request validation: every check a request must pass, producing the typed values
//! the index and the writers accept. A request is accepted or rejected as a whole;
//! errors name the field path.

use std::fmt::Display;

use crate::config::Limits;
use crate::index::{Index, NewExperiment};
use crate::model::{
    DEFAULT_NAMESPACE, EventRecord, EventsBatch, ExperimentRef, MAX_STEP, MetricBlock,
    MetricsBatch, Micros, SparseColumn,
};
use crate::paths::valid_namespace;
use crate::proto;

use super::convert::{micros, value_to_json};
use super::status::ApiError;

type Entries = Vec<(String, serde_json::Value)>;

// Field paths are `impl Display` and become strings only in an error: callers pass
// `format_args!`, so a valid request allocates nothing for them, however many
// blocks, keys, string values or events it holds.

fn required(field: impl Display, value: &str) -> Result<(), ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field.to_string(), "required"));
    }
    Ok(())
}

fn bounded(field: impl Display, value: &str, max: usize) -> Result<(), ApiError> {
    if value.len() > max {
        return Err(ApiError::invalid(
            field.to_string(),
            format!("{} bytes, at most {max} allowed", value.len()),
        ));
    }
    Ok(())
}

/// A step or wallclock: stored as int64, so at most 2^63 - 1.
fn int64(field: &str, value: u64) -> Result<(), ApiError> {
    if value > MAX_STEP {
        return Err(ApiError::invalid(
            field,
            format!("{value} exceeds the largest allowed value {MAX_STEP} (2^63 - 1)"),
        ));
    }
    Ok(())
}

fn name(field: impl Display + Copy, value: &str, max: usize) -> Result<(), ApiError> {
    required(field, value)?;
    bounded(field, value, max)
}

/// The length of `value` as JSON text, without building the text.
fn json_len(value: &serde_json::Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing a Value into a sink that cannot fail does not fail.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// The namespace to use: empty means [`DEFAULT_NAMESPACE`].
pub fn namespace(field: &str, ns: String, limits: &Limits) -> Result<String, ApiError> {
    if ns.is_empty() {
        return Ok(DEFAULT_NAMESPACE.to_owned());
    }
    if !valid_namespace(&ns, limits.max_name_bytes) {
        return Err(ApiError::invalid(
            field,
            format!(
                "{ns:?} is not a valid namespace: use 1 to {} ASCII letters, digits, '-', '_' or '.', not starting with '.'",
                limits.max_name_bytes
            ),
        ));
    }
    Ok(ns)
}

/// A metadata map as JSON entries, within the size limits.
pub fn metadata(
    field: impl Display + Copy,
    md: Option<proto::Metadata>,
    limits: &Limits,
) -> Result<Entries, ApiError> {
    let Some(md) = md else { return Ok(Vec::new()) };
    let mut entries = Vec::with_capacity(md.metadata.len());
    let mut size = 0;
    for (key, value) in md.metadata {
        name(format_args!("{field} key"), &key, limits.max_key_bytes)?;
        let json = value_to_json(&format_args!("{field}.{key}"), value)?;
        size += key.len() + json_len(&json);
        entries.push((key, json));
    }
    if size > limits.max_metadata_bytes {
        return Err(ApiError::invalid(
            field.to_string(),
            format!(
                "{size} bytes of metadata, at most {} allowed",
                limits.max_metadata_bytes
            ),
        ));
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

/// JSON text of a metadata map (an object), for event rows.
pub fn metadata_json(
    field: impl Display + Copy,
    md: Option<proto::Metadata>,
    limits: &Limits,
) -> Result<String, ApiError> {
    let entries = metadata(field, md, limits)?;
    Ok(serde_json::Value::Object(entries.into_iter().collect()).to_string())
}

pub fn create_experiment(
    req: proto::CreateExperimentRequest,
    limits: &Limits,
) -> Result<(NewExperiment, Entries), ApiError> {
    name("name", &req.name, limits.max_name_bytes)?;
    bounded("owner", &req.owner, limits.max_name_bytes)?;
    bounded("external_id", &req.external_id, limits.max_name_bytes)?;
    bounded("task", &req.task, limits.max_name_bytes)?;
    if proto::MlFramework::try_from(req.framework).is_err() {
        return Err(ApiError::invalid(
            "framework",
            format!("unknown MLFramework value {}", req.framework),
        ));
    }
    let namespace = namespace("namespace", req.namespace, limits)?;
    let md = metadata("metadata", req.metadata, limits)?;
    Ok((
        NewExperiment {
            name: req.name,
            namespace,
            owner: req.owner,
            framework: req.framework,
            task: req.task,
            external_id: req.external_id,
        },
        md,
    ))
}

/// The experiment `id` names, or NOT_FOUND.
pub fn experiment(
    field: impl Display + Copy,
    id: &str,
    index: &Index,
) -> Result<ExperimentRef, ApiError> {
    required(field, id)?;
    index
        .experiment_ref(id)?
        .ok_or_else(|| ApiError::experiment_not_found(&field.to_string(), id))
}

pub fn log_metrics(
    req: proto::LogMetricsRequest,
    index: &Index,
    limits: &Limits,
    now: Micros,
) -> Result<MetricsBatch, ApiError> {
    let single = !req.parent_id.is_empty() || !req.key.is_empty() || req.value.is_some();
    if single && !req.blocks.is_empty() {
        return Err(ApiError::invalid(
            "blocks",
            "set either a single point (parent_id, key, value) or blocks, not both",
        ));
    }
    if req.blocks.is_empty() {
        return Ok(MetricsBatch::from_validated(
            vec![single_point(req, index, limits)?],
            now,
        ));
    }
    let points: usize = req.blocks.iter().map(|b| b.steps.len()).sum();
    if points > limits.max_points_per_request {
        return Err(ApiError::invalid(
            "blocks",
            format!(
                "{points} points, at most {} per request",
                limits.max_points_per_request
            ),
        ));
    }
    let blocks = req
        .blocks
        .into_iter()
        .enumerate()
        .map(|(i, b)| block(format_args!("blocks[{i}]"), b, index, limits))
        .collect::<Result<_, _>>()?;
    Ok(MetricsBatch::from_validated(blocks, now))
}

fn single_point(
    req: proto::LogMetricsRequest,
    index: &Index,
    limits: &Limits,
) -> Result<MetricBlock, ApiError> {
    let experiment = experiment("parent_id", &req.parent_id, index)?;
    name("key", &req.key, limits.max_key_bytes)?;
    let value = req
        .value
        .ok_or_else(|| ApiError::invalid("value", "required"))?;
    int64("value.step", value.step)?;
    int64("value.wallclock_time", value.wallclock_time)?;
    let mut block = MetricBlock {
        experiment,
        keys: vec![req.key],
        key_index: vec![0],
        steps: vec![value.step],
        wallclocks: vec![value.wallclock_time],
        values: vec![0.0],
        strings: SparseColumn::default(),
        bytes: SparseColumn::default(),
    };
    use proto::metrics_value::Value as V;
    match value.value {
        None => {
            return Err(ApiError::invalid(
                "value.value",
                "no value set (f_val, d_val, s_tensor or b_tensor)",
            ));
        }
        Some(V::FVal(f)) => block.values[0] = f64::from(f),
        Some(V::DVal(d)) => block.values[0] = d,
        Some(V::STensor(s)) => {
            bounded("value.s_tensor", &s, limits.max_value_bytes)?;
            block.strings = SparseColumn {
                rows: vec![0],
                values: vec![s],
            };
        }
        Some(V::BTensor(b)) => {
            if b.len() > limits.max_value_bytes {
                return Err(ApiError::invalid(
                    "value.b_tensor",
                    format!(
                        "{} bytes, at most {} allowed",
                        b.len(),
                        limits.max_value_bytes
                    ),
                ));
            }
            block.bytes = SparseColumn {
                rows: vec![0],
                values: vec![b],
            };
        }
    }
    Ok(block)
}

/// Validates one columnar block (also used to re-check blocks replayed from the WAL).
pub fn block(
    field: impl Display + Copy,
    b: proto::MetricsBlock,
    index: &Index,
    limits: &Limits,
) -> Result<MetricBlock, ApiError> {
    let experiment = experiment(format_args!("{field}.parent_id"), &b.parent_id, index)?;
    let n = b.steps.len();
    if n == 0 {
        return Err(ApiError::invalid(
            format!("{field}.steps"),
            "a block needs at least one point",
        ));
    }
    for (column, len) in [
        ("key_index", b.key_index.len()),
        ("wallclock_times", b.wallclock_times.len()),
        ("values", b.values.len()),
    ] {
        if len != n {
            return Err(ApiError::invalid(
                format!("{field}.{column}"),
                format!("{len} entries, expected {n} (one per step)"),
            ));
        }
    }
    for (i, key) in b.keys.iter().enumerate() {
        name(format_args!("{field}.keys[{i}]"), key, limits.max_key_bytes)?;
    }
    // Storage is int64 (Spark, Delta Lake and Iceberg have no unsigned type).
    for (column, values) in [("steps", &b.steps), ("wallclock_times", &b.wallclock_times)] {
        if let Some(at) = values.iter().position(|&v| v > MAX_STEP) {
            return Err(ApiError::invalid(
                format!("{field}.{column}[{at}]"),
                format!(
                    "{} exceeds the largest allowed value {MAX_STEP} (2^63 - 1)",
                    values[at]
                ),
            ));
        }
    }
    let max_index = b.key_index.iter().copied().max().unwrap_or(0);
    if max_index as usize >= b.keys.len() {
        let at = b
            .key_index
            .iter()
            .position(|&k| k == max_index)
            .unwrap_or(0);
        return Err(ApiError::invalid(
            format!("{field}.key_index[{at}]"),
            format!("{max_index} is out of range for {} keys", b.keys.len()),
        ));
    }
    if b.string_rows.len() != b.string_values.len() {
        return Err(ApiError::invalid(
            format!("{field}.string_values"),
            format!(
                "{} values for {} string_rows",
                b.string_values.len(),
                b.string_rows.len()
            ),
        ));
    }
    if b.bytes_rows.len() != b.bytes_values.len() {
        return Err(ApiError::invalid(
            format!("{field}.bytes_values"),
            format!(
                "{} values for {} bytes_rows",
                b.bytes_values.len(),
                b.bytes_rows.len()
            ),
        ));
    }
    for (i, s) in b.string_values.iter().enumerate() {
        bounded(
            format_args!("{field}.string_values[{i}]"),
            s,
            limits.max_value_bytes,
        )?;
    }
    for (i, v) in b.bytes_values.iter().enumerate() {
        if v.len() > limits.max_value_bytes {
            return Err(ApiError::invalid(
                format!("{field}.bytes_values[{i}]"),
                format!(
                    "{} bytes, at most {} allowed",
                    v.len(),
                    limits.max_value_bytes
                ),
            ));
        }
    }
    if !b.string_rows.is_empty() || !b.bytes_rows.is_empty() {
        let mut rows: Vec<(u32, &str, usize)> = b
            .string_rows
            .iter()
            .enumerate()
            .map(|(i, &r)| (r, "string_rows", i))
            .chain(
                b.bytes_rows
                    .iter()
                    .enumerate()
                    .map(|(i, &r)| (r, "bytes_rows", i)),
            )
            .collect();
        if let Some(&(r, column, i)) = rows.iter().find(|(r, _, _)| *r as usize >= n) {
            return Err(ApiError::invalid(
                format!("{field}.{column}[{i}]"),
                format!("row {r} is out of range for {n} points"),
            ));
        }
        rows.sort_unstable();
        if let Some(w) = rows.windows(2).find(|w| w[0].0 == w[1].0) {
            let (r, column, i) = w[1];
            return Err(ApiError::invalid(
                format!("{field}.{column}[{i}]"),
                format!("row {r} already has a string or bytes value"),
            ));
        }
    }
    let mut block = MetricBlock {
        experiment,
        keys: b.keys,
        key_index: b.key_index,
        steps: b.steps,
        wallclocks: b.wallclock_times,
        values: b.values,
        strings: SparseColumn {
            rows: b.string_rows,
            values: b.string_values,
        },
        bytes: SparseColumn {
            rows: b.bytes_rows,
            values: b.bytes_values,
        },
    };
    block.compact();
    Ok(block)
}

/// A parsed run search and its page cursor.
#[derive(Debug)]
pub struct SearchQuery {
    pub search: crate::search::Search,
    pub cursor: Option<crate::index::search::SearchCursor>,
}

/// A ListExperiments filter, sort keys and page token.
pub fn search(filter: &str, order_by: &[String], token: &str) -> Result<SearchQuery, ApiError> {
    let conditions = crate::search::parse_filter(filter)
        .map_err(|e| ApiError::invalid("filter", e.to_string()))?;
    let order_by = order_by
        .iter()
        .enumerate()
        .map(|(i, o)| {
            crate::search::parse_order_by(o)
                .map_err(|e| ApiError::invalid(format!("order_by[{i}]"), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let cursor = match token {
        "" => None,
        t => Some(
            crate::index::search::SearchCursor::decode(t).ok_or_else(|| {
                ApiError::invalid(
                    "page_token",
                    format!("{t:?} is not a page token from mboxd"),
                )
            })?,
        ),
    };
    Ok(SearchQuery {
        search: crate::search::Search {
            conditions,
            order_by,
        },
        cursor,
    })
}

/// A client batch id: optional, at most `max_key_bytes` long.
pub fn client_batch_id(id: &str, limits: &Limits) -> Result<(), ApiError> {
    bounded("client_batch_id", id, limits.max_key_bytes)
}

/// The series a GetMetrics request asks for.
pub fn series_query(
    req: &proto::GetMetricsRequest,
    limits: &Limits,
    reads: &crate::config::Reads,
) -> Result<crate::query::SeriesQuery, ApiError> {
    for (i, key) in req.keys.iter().enumerate() {
        name(format_args!("keys[{i}]"), key, limits.max_key_bytes)?;
    }
    let keys = (!req.keys.is_empty()).then(|| {
        let mut keys = req.keys.clone();
        keys.sort();
        keys.dedup();
        keys
    });
    if let (Some(start), Some(end)) = (req.start_step, req.end_step)
        && start > end
    {
        return Err(ApiError::invalid(
            "end_step",
            format!("{end} is before start_step {start}"),
        ));
    }
    const MAX_BUCKETS: u32 = 1_000_000;
    if req.max_points > MAX_BUCKETS {
        return Err(ApiError::invalid(
            "max_points",
            format!("{}, at most {MAX_BUCKETS} allowed", req.max_points),
        ));
    }
    let cursor = match req.page_token.as_str() {
        "" => None,
        token => Some(
            crate::query::Cursor::decode(token)
                .map_err(|e| ApiError::invalid("page_token", e.to_string()))?,
        ),
    };
    let (page_points, page_bytes) = match req.page_size {
        0 => (usize::MAX, reads.default_page_bytes),
        n => (n as usize, reads.max_page_bytes),
    };
    Ok(crate::query::SeriesQuery {
        keys,
        start_step: req.start_step,
        end_step: req.end_step,
        max_points: (req.max_points > 0).then_some(req.max_points as usize),
        page_points,
        page_bytes,
        cursor,
        read_points: reads.read_points,
    })
}

pub fn log_event(
    req: proto::LogEventRequest,
    index: &Index,
    limits: &Limits,
    now: Micros,
) -> Result<EventsBatch, ApiError> {
    let experiment = experiment("parent_id", &req.parent_id, index)?;
    let count = usize::from(req.event.is_some()) + req.events.len();
    if count == 0 {
        return Err(ApiError::invalid(
            "event",
            "required (or a non-empty events batch)",
        ));
    }
    if count > limits.max_events_per_request {
        return Err(ApiError::invalid(
            "events",
            format!(
                "{count} events, at most {} per request",
                limits.max_events_per_request
            ),
        ));
    }
    let mut events = Vec::with_capacity(count);
    if let Some(e) = req.event {
        events.push(event("event", e, limits, now)?);
    }
    for (i, e) in req.events.into_iter().enumerate() {
        events.push(event(format_args!("events[{i}]"), e, limits, now)?);
    }
    Ok(EventsBatch::from_validated(experiment, events, now))
}

fn event(
    field: impl Display + Copy,
    e: proto::Event,
    limits: &Limits,
    now: Micros,
) -> Result<EventRecord, ApiError> {
    name(format_args!("{field}.name"), &e.name, limits.max_key_bytes)?;
    let source = e.source.map(|s| s.name).unwrap_or_default();
    bounded(
        format_args!("{field}.source.name"),
        &source,
        limits.max_key_bytes,
    )?;
    let wallclock = match &e.wallclock_time {
        Some(ts) => micros(format_args!("{field}.wallclock_time"), ts)?,
        None => now,
    };
    Ok(EventRecord {
        name: e.name,
        source,
        wallclock,
        metadata_json: metadata_json(format_args!("{field}.metadata"), e.metadata, limits)?,
    })
}
