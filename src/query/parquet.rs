//! Reading one experiment's rows out of a Parquet file: a published file (local,
//! or in the bucket in byte ranges), or a staged file still being written.
//!
//! Row groups come from the manifest's experiment index (or, for files without
//! one, from their statistics). Within a row group, a row filter on
//! `experiment_id` runs first, then one on key and step, so the other columns are
//! decoded only for the rows that match (and whole pages are skipped where the
//! page index allows). A read that keeps only a series' first points decodes,
//! of a row group holding that series alone, only the pages that hold them.

use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type, UInt64Type};
use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow_buffer::BooleanBuffer;
use arrow_schema::{ArrowError, DataType};
use bytes::{Buf, Bytes};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{
    ArrowPredicateFn, ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder,
    RowFilter, RowSelection, RowSelectionPolicy, RowSelector,
};
use parquet::errors::ParquetError;
use parquet::file::metadata::{
    PageIndexPolicy, ParquetMetaData, ParquetMetaDataReader, RowGroupMetaData,
};
use parquet::file::page_index::column_index::ColumnIndexMetaData;
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::statistics::Statistics;
use parquet::schema::types::SchemaDescriptor;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

use super::QueryError;
use crate::sink::RemoteObject;

/// A local file read with positional reads only, so any number of readers (and
/// the writer appending to a staged file) share it safely.
#[derive(Debug, Clone)]
pub(crate) struct PositionalFile {
    file: Arc<File>,
    len: u64,
}

impl PositionalFile {
    pub(crate) fn new(file: Arc<File>, len: u64) -> Self {
        Self { file, len }
    }
}

impl Length for PositionalFile {
    fn len(&self) -> u64 {
        self.len
    }
}

/// A sequential reader over a [`PositionalFile`].
#[derive(Debug)]
pub(crate) struct PositionalRead {
    file: Arc<File>,
    pos: u64,
}

impl Read for PositionalRead {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read_at(buf, self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl ChunkReader for PositionalFile {
    type T = PositionalRead;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(PositionalRead {
            file: Arc::clone(&self.file),
            pos: start,
        })
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let mut buf = vec![0; length];
        self.file.read_exact_at(&mut buf, start)?;
        Ok(buf.into())
    }
}

/// Every column of a metrics row a read needs besides `experiment_id`.
pub(crate) const METRIC_COLUMNS: &[&str] = &[
    "key",
    "step",
    "wallclock_time",
    "value_double",
    "value_string",
    "value_bytes",
    "ingested_at",
];

/// Every column of an events row a read needs besides `experiment_id`.
pub(crate) const EVENT_COLUMNS: &[&str] =
    &["name", "source", "wallclock", "metadata", "ingested_at"];

/// Which metric keys to read.
#[derive(Debug, Clone, Copy)]
pub(crate) enum KeyFilter<'a> {
    All,
    /// Pages that may hold these keys (sorted), whole: rows of other keys on them
    /// come back too, for a reader that skips them itself more cheaply than a
    /// row filter (which decodes the key and step columns twice) drops them.
    Pages(&'a [String]),
    /// Keys from the first (inclusive) to the second (exclusive); `None`: open.
    Range(Option<&'a str>, Option<&'a str>),
}

impl KeyFilter<'_> {
    fn owned(&self) -> Option<OwnedKeyFilter> {
        match self {
            KeyFilter::All => None,
            KeyFilter::Pages(k) => Some(OwnedKeyFilter::Set(k.to_vec())),
            KeyFilter::Range(a, b) => Some(OwnedKeyFilter::Range(
                a.map(str::to_owned),
                b.map(str::to_owned),
            )),
        }
    }
}

#[derive(Clone)]
enum OwnedKeyFilter {
    Set(Vec<String>),
    Range(Option<String>, Option<String>),
}

impl OwnedKeyFilter {
    /// Whether some admitted key may lie within `min..=max` (raw bytes, which
    /// order as the strings do).
    fn may_overlap(&self, min: &[u8], max: &[u8]) -> bool {
        match self {
            OwnedKeyFilter::Set(k) => {
                let from = k.partition_point(|w| w.as_bytes() < min);
                k.get(from).is_some_and(|w| w.as_bytes() <= max)
            }
            OwnedKeyFilter::Range(a, b) => {
                a.as_deref().is_none_or(|a| a.as_bytes() <= max)
                    && b.as_deref().is_none_or(|b| min < b.as_bytes())
            }
        }
    }

    fn admits(&self, key: &str) -> bool {
        match self {
            OwnedKeyFilter::Set(k) => k.binary_search_by(|w| w.as_str().cmp(key)).is_ok(),
            OwnedKeyFilter::Range(a, b) => {
                a.as_deref().is_none_or(|a| a <= key) && b.as_deref().is_none_or(|b| key < b)
            }
        }
    }
}

/// What to read: the rows of one experiment (or of a range of experiments).
#[derive(Debug, Clone)]
pub(crate) struct RowsWanted<'a> {
    /// Inclusive range of experiment ids (one experiment: the same id twice).
    pub experiments: (&'a str, &'a str),
    pub keys: KeyFilter<'a>,
    /// Inclusive step range (ignored for events).
    pub steps: (i64, i64),
    /// Columns to read besides the filter columns, by name.
    pub columns: &'a [&'a str],
}

/// Where [`read_rows`] hands the rows it reads.
pub(crate) trait RowSink {
    /// A non-empty batch of wanted rows.
    fn batch(&mut self, batch: RecordBatch) -> Result<(), QueryError>;

    /// For a read that keeps only the first points of `key`'s series: the step
    /// they start at and how many. Rows after that many need not be decoded, only
    /// counted ([`Self::unread`]). `None`: every row.
    fn first_points(&self, _key: &str) -> Option<(i64, usize)> {
        None
    }

    /// The step of the last of the first points of `key` ([`Self::first_points`]),
    /// once the sink holds that many: a row at a later step is not one of them.
    fn held_through(&mut self, _key: &str) -> Option<i64> {
        None
    }

    /// `rows` wanted rows of `key` that the read counted instead of decoding:
    /// each is at a step later than the last of at least [`Self::first_points`]
    /// rows that it hands over from the same row group, or than
    /// [`Self::held_through`].
    fn unread(&mut self, _key: &str, _rows: u64) {}
}

impl<F: FnMut(RecordBatch) -> Result<(), QueryError>> RowSink for F {
    fn batch(&mut self, batch: RecordBatch) -> Result<(), QueryError> {
        self(batch)
    }
}

fn parquet_err(path: &str) -> impl Fn(ParquetError) -> QueryError + '_ {
    move |source| QueryError::Parquet {
        path: path.to_owned(),
        source,
    }
}

/// A string column, dictionary-encoded (as mboxd writes it) or plain (as a file
/// read without its Arrow schema comes back).
pub(crate) enum StrColumn<'a> {
    Dict {
        keys: &'a arrow_array::PrimitiveArray<Int32Type>,
        values: &'a arrow_array::StringArray,
    },
    Plain(&'a arrow_array::StringArray),
}

impl<'a> StrColumn<'a> {
    pub(crate) fn of(array: &'a ArrayRef) -> Option<Self> {
        match array.data_type() {
            DataType::Dictionary(_, _) => {
                let d = array.as_dictionary_opt::<Int32Type>()?;
                Some(Self::Dict {
                    keys: d.keys(),
                    values: d.values().as_string_opt::<i32>()?,
                })
            }
            DataType::Utf8 => Some(Self::Plain(array.as_string_opt::<i32>()?)),
            _ => None,
        }
    }

    pub(crate) fn value(&self, row: usize) -> &'a str {
        match self {
            Self::Dict { keys, values } => values.value(keys.value(row) as usize),
            Self::Plain(a) => a.value(row),
        }
    }

    /// The end of the run of rows from `start` (below `end`) that hold the same
    /// value as row `start`: for a dictionary column, by comparing its indices.
    pub(crate) fn run_end(&self, start: usize, end: usize) -> usize {
        match self {
            Self::Dict { keys, .. } => {
                let k = keys.values();
                let first = k[start];
                start
                    + 1
                    + k[start + 1..end]
                        .iter()
                        .take_while(|&&v| v == first)
                        .count()
            }
            Self::Plain(a) => {
                let first = a.value(start);
                start
                    + 1
                    + (start + 1..end)
                        .take_while(|&r| a.value(r) == first)
                        .count()
            }
        }
    }

    /// Rows within `lo..=hi`, comparing each dictionary entry once.
    fn range_mask(&self, lo: &str, hi: &str) -> BooleanArray {
        let within = |s: &str| lo <= s && s <= hi;
        match self {
            Self::Dict { keys, values } => {
                let ok: Vec<bool> = (0..values.len()).map(|i| within(values.value(i))).collect();
                dict_mask(keys, &ok)
            }
            Self::Plain(a) => a.iter().map(|v| Some(v.is_some_and(within))).collect(),
        }
    }

    /// Which rows hold a wanted key (each dictionary entry checked once).
    fn in_mask(&self, wanted: &OwnedKeyFilter) -> BooleanArray {
        let hit = |s: &str| wanted.admits(s);
        match self {
            Self::Dict { keys, values } => {
                let ok: Vec<bool> = (0..values.len()).map(|i| hit(values.value(i))).collect();
                dict_mask(keys, &ok)
            }
            Self::Plain(a) => a.iter().map(|v| Some(v.is_some_and(hit))).collect(),
        }
    }
}

/// The rows whose dictionary entry is `ok`, packed 64 at a time.
fn dict_mask(keys: &arrow_array::PrimitiveArray<Int32Type>, ok: &[bool]) -> BooleanArray {
    let k = keys.values();
    let bits = BooleanBuffer::collect_bool(k.len(), |row| {
        usize::try_from(k[row])
            .ok()
            .and_then(|v| ok.get(v))
            .is_some_and(|&b| b)
    });
    BooleanArray::new(bits, None)
}

/// A 64-bit integer column as i64 (files from before the int64 schema hold uint64;
/// values past i64::MAX, which mboxd never accepted, saturate).
pub(crate) enum IntColumn<'a> {
    Signed(&'a arrow_array::PrimitiveArray<Int64Type>),
    Unsigned(&'a arrow_array::PrimitiveArray<UInt64Type>),
}

impl<'a> IntColumn<'a> {
    pub(crate) fn of(array: &'a ArrayRef) -> Option<Self> {
        match array.data_type() {
            DataType::Int64 => Some(Self::Signed(array.as_primitive_opt()?)),
            DataType::UInt64 => Some(Self::Unsigned(array.as_primitive_opt()?)),
            _ => None,
        }
    }

    pub(crate) fn value(&self, row: usize) -> i64 {
        match self {
            Self::Signed(a) => a.value(row),
            Self::Unsigned(a) => i64::try_from(a.value(row)).unwrap_or(i64::MAX),
        }
    }

    /// The values as one slice, for an int64 column without nulls.
    pub(crate) fn signed_values(&self) -> Option<&'a [i64]> {
        match self {
            Self::Signed(a) if a.null_count() == 0 => Some(a.values()),
            _ => None,
        }
    }
}

fn filter_err(column: &str) -> ArrowError {
    ArrowError::SchemaError(format!("column {column} is missing or has the wrong type"))
}

/// Whether a row group's statistics admit the experiment (and, for metrics, the
/// step range).
fn row_group_may_match(
    rg: &RowGroupMetaData,
    id_column: usize,
    step_column: Option<usize>,
    want: &RowsWanted,
) -> bool {
    if let Some(Statistics::ByteArray(stats)) = rg.column(id_column).statistics()
        && let (Some(min), Some(max)) = (stats.min_opt(), stats.max_opt())
    {
        let (lo, hi) = want.experiments;
        if hi.as_bytes() < min.data() || max.data() < lo.as_bytes() {
            return false;
        }
    }
    if let Some(c) = step_column {
        let (lo, hi) = want.steps;
        if let Some(Statistics::Int64(s)) = rg.column(c).statistics()
            && let (Some(min), Some(max)) = (s.min_opt(), s.max_opt())
            && (*max < lo || *min > hi)
        {
            return false;
        }
    }
    true
}

/// The exact value of a byte-array column in a row group, when its statistics
/// say every row holds the same one.
fn single_value(rg: &RowGroupMetaData, column: usize) -> Option<&[u8]> {
    match rg.column(column).statistics() {
        Some(Statistics::ByteArray(s)) if s.null_count_opt() == Some(0) => {
            match (s.min_opt(), s.max_opt()) {
                (Some(min), Some(max)) if min == max && s.min_is_exact() && s.max_is_exact() => {
                    Some(min.data())
                }
                _ => None,
            }
        }
        _ => None,
    }
}

/// Whether a row group's statistics prove that every row is wanted, so no row
/// filter need decode its filter columns (the usual case for a compacted file,
/// whose row groups follow experiment boundaries).
fn row_group_all_match(
    rg: &RowGroupMetaData,
    id_column: usize,
    key_and_step: Option<(usize, usize)>,
    keys: Option<&OwnedKeyFilter>,
    want: &RowsWanted,
) -> bool {
    if !one_wanted_experiment(rg, id_column, want) {
        return false;
    }
    let Some((key_column, step_column)) = key_and_step else {
        return true;
    };
    if let Some(keys) = keys
        && one_wanted_key(rg, key_column, keys).is_none()
    {
        return false;
    }
    let (lo, hi) = want.steps;
    if lo == i64::MIN && hi == i64::MAX {
        return true;
    }
    step_bounds(rg, step_column).is_some_and(|(min, max)| min >= lo && max <= hi)
}

/// A row group's exact step bounds, when its statistics hold them and say that
/// every row has a step: only then may a read accept or count its rows by step
/// without decoding them (a null step is outside every range).
fn step_bounds(rg: &RowGroupMetaData, step_column: usize) -> Option<(i64, i64)> {
    match rg.column(step_column).statistics()? {
        Statistics::Int64(s)
            if s.min_is_exact() && s.max_is_exact() && s.null_count_opt() == Some(0) =>
        {
            Some((*s.min_opt()?, *s.max_opt()?))
        }
        _ => None,
    }
}

/// Whether every row of a row group is of one experiment, a wanted one.
fn one_wanted_experiment(rg: &RowGroupMetaData, id_column: usize, want: &RowsWanted) -> bool {
    let (lo, hi) = want.experiments;
    single_value(rg, id_column).is_some_and(|id| lo.as_bytes() <= id && id <= hi.as_bytes())
}

/// The key of every row of a row group, when there is one and it is wanted.
fn one_wanted_key<'m>(
    rg: &'m RowGroupMetaData,
    key_column: usize,
    keys: &OwnedKeyFilter,
) -> Option<&'m str> {
    let key = std::str::from_utf8(single_value(rg, key_column)?).ok()?;
    keys.admits(key).then_some(key)
}

/// The rows of the chosen row groups (in order) on pages whose column-index
/// bounds admit `admits(min, max)`; `None` without a page index.
fn pages_admitted(
    metadata: &ParquetMetaData,
    groups: &[usize],
    column: usize,
    admits: &dyn Fn(&[u8], &[u8]) -> bool,
) -> Option<RowSelection> {
    let (bounds, offsets) = (metadata.column_index()?, metadata.offset_index()?);
    let mut selectors = Vec::new();
    for &g in groups {
        let rows = usize::try_from(metadata.row_group(g).num_rows()).ok()?;
        let pages = offsets.get(g)?.get(column)?.page_locations();
        let index = bounds.get(g)?.get(column)?;
        // Another writer's file may list fewer bounds than pages; the index's
        // accessors would panic past its end.
        if let ColumnIndexMetaData::BYTE_ARRAY(ix) = index
            && ix.num_pages() != pages.len() as u64
        {
            return None;
        }
        for (i, page) in pages.iter().enumerate() {
            let first = usize::try_from(page.first_row_index).ok()?;
            let end = match pages.get(i + 1) {
                Some(next) => usize::try_from(next.first_row_index).ok()?,
                None => rows,
            };
            // Truncated bounds stay bounds (a shortened min is a prefix, a
            // shortened max is rounded up), so a page admitted here may match.
            let admitted = match index {
                ColumnIndexMetaData::BYTE_ARRAY(ix) => match (ix.min_value(i), ix.max_value(i)) {
                    (Some(min), Some(max)) => admits(min, max),
                    _ => !ix.is_null_page(i),
                },
                _ => true,
            };
            let n = end.checked_sub(first)?;
            selectors.push(match admitted {
                true => RowSelector::select(n),
                false => RowSelector::skip(n),
            });
        }
    }
    Some(RowSelection::from(selectors))
}

/// The rows the page index admits for this experiment range and key filter:
/// a writer's row group holds many experiments, each in a run of rows (rows are
/// sorted within a row group), so a read decodes the pages of its run only.
fn page_selection(
    metadata: &ParquetMetaData,
    groups: &[usize],
    id_column: usize,
    key_column: Option<usize>,
    keys: Option<&OwnedKeyFilter>,
    want: &RowsWanted,
) -> Option<RowSelection> {
    let (lo, hi) = (want.experiments.0.as_bytes(), want.experiments.1.as_bytes());
    let by_id = pages_admitted(metadata, groups, id_column, &|min, max| {
        min <= hi && lo <= max
    })?;
    let (Some(key_column), Some(keys)) = (key_column, keys) else {
        return Some(by_id);
    };
    let by_key = pages_admitted(metadata, groups, key_column, &|min, max| {
        keys.may_overlap(min, max)
    });
    Some(match by_key {
        Some(by_key) => by_id.intersection(&by_key),
        None => by_id,
    })
}

/// For a row group of one experiment and one key whose sink wants only the
/// first points of that key: the pages that hold them, by the step column's page
/// index, and how many wanted rows the pages after them hold (counted, not
/// read). Pages wholly before the first step are skipped uncounted. `None` when
/// the page index cannot tell: no index, or pages out of step order.
fn first_points_selection(
    metadata: &ParquetMetaData,
    group: usize,
    step_column: usize,
    (from, keep): (i64, usize),
    hi: i64,
) -> Option<(RowSelection, u64)> {
    let ColumnIndexMetaData::INT64(index) =
        metadata.column_index()?.get(group)?.get(step_column)?
    else {
        return None;
    };
    let pages = metadata
        .offset_index()?
        .get(group)?
        .get(step_column)?
        .page_locations();
    let rows = usize::try_from(metadata.row_group(group).num_rows()).ok()?;
    // As in `pages_admitted`: bounds for every page, and rows from the first.
    if index.num_pages() != pages.len() as u64 || pages.first()?.first_row_index != 0 {
        return None;
    }
    let mut selectors = Vec::with_capacity(pages.len());
    let (mut sure, mut counted) = (0usize, 0u64);
    // The last step of the page by which `keep` rows from `from` on are read:
    // every row at a later step comes after them.
    let mut last: Option<i64> = None;
    let mut previous_max = i64::MIN;
    for (i, page) in pages.iter().enumerate() {
        let first = usize::try_from(page.first_row_index).ok()?;
        let end = match pages.get(i + 1) {
            Some(next) => usize::try_from(next.first_row_index).ok()?,
            None => rows,
        };
        let n = end.checked_sub(first)?;
        let (&min, &max) = (index.min_value(i)?, index.max_value(i)?);
        if min < previous_max || max < min {
            return None;
        }
        previous_max = max;
        let selector = match last {
            _ if max < from || min > hi => RowSelector::skip(n),
            Some(last) if min > last && max <= hi => {
                counted += n as u64;
                RowSelector::skip(n)
            }
            _ => {
                if min >= from && max <= hi {
                    sure += n;
                }
                if last.is_none() && sure >= keep {
                    last = Some(max);
                }
                RowSelector::select(n)
            }
        };
        selectors.push(selector);
    }
    Some((RowSelection::from(selectors), counted))
}

/// Reads the wanted rows of one file, handing each non-empty batch to `sink`;
/// rows after the first points a sink keeps may be counted to it instead (see
/// [`RowSink::first_points`]).
/// `row_groups`: the experiment index's list, or `None` for every row group the
/// statistics admit.
pub(crate) fn read_rows<S: Source>(
    source: &S,
    metadata: ArrowReaderMetadata,
    path: &str,
    row_groups: Option<&[u32]>,
    want: &RowsWanted,
    sink: &mut dyn RowSink,
) -> Result<(), QueryError> {
    let perr = parquet_err(path);
    let parquet_schema = metadata.metadata().file_metadata().schema_descr_ptr();
    let arrow_schema = Arc::clone(metadata.schema());
    let index_of = |name: &str| {
        arrow_schema.index_of(name).map_err(|_| QueryError::Schema {
            path: path.to_owned(),
            reason: format!("column {name} is missing"),
        })
    };
    let id_col = index_of("experiment_id")?;
    let key_col = arrow_schema.index_of("key").ok();
    let step_col = arrow_schema.index_of("step").ok();
    let groups: Vec<usize> = metadata
        .metadata()
        .row_groups()
        .iter()
        .enumerate()
        .filter(|(i, _)| row_groups.is_none_or(|g| g.contains(&(*i as u32))))
        .filter(|(_, rg)| {
            row_group_may_match(rg, id_col, step_col.filter(|_| key_col.is_some()), want)
        })
        .map(|(i, _)| i)
        .collect();
    if groups.is_empty() {
        return Ok(());
    }
    let mut columns = vec![id_col];
    for name in want.columns {
        columns.push(index_of(name)?);
    }
    columns.sort_unstable();
    columns.dedup();
    let projection = ProjectionMask::roots(&parquet_schema, columns.iter().copied());
    let keys = want.keys.owned();
    let key_and_step = key_col.zip(step_col);
    let every_row = groups.iter().all(|&g| {
        let rg = metadata.metadata().row_group(g);
        row_group_all_match(rg, id_col, key_and_step, keys.as_ref(), want)
    });
    // The leaf columns a read fetches: the projection's, and the row filter's.
    let mut roots = columns;
    if !every_row {
        roots.extend(key_col.into_iter().chain(step_col));
    }
    let fetch_columns: Vec<usize> = (0..parquet_schema.num_columns())
        .filter(|&leaf| roots.contains(&parquet_schema.get_column_root_idx(leaf)))
        .collect();
    // One reader per row group: a batch that spans two row groups spans two
    // dictionaries, and the Parquet reader then spills its dictionary columns
    // (key, experiment_id) to plain strings and hashes every row back into a
    // dictionary, a fifth of a long series read's time.
    let read_group = |group: usize,
                      builder: ParquetRecordBatchReaderBuilder<S::Reader>,
                      sink: &mut dyn RowSink| {
        let batches = builder
            .with_row_groups(vec![group])
            .with_projection(projection.clone())
            .with_batch_size(64 * 1024)
            .build()
            .map_err(&perr)?;
        for batch in batches {
            let batch = batch.map_err(|e| perr(ParquetError::from(e)))?;
            if batch.num_rows() > 0 {
                sink.batch(batch)?;
            }
        }
        Ok::<(), QueryError>(())
    };
    // Pages of other keys are pruned either way; with `Pages` their rows on
    // admitted pages are the caller's to skip.
    let filter_keys = match want.keys {
        KeyFilter::Pages(_) => None,
        _ => keys.clone(),
    };
    for &group in &groups {
        let selection = match first_points_rows(
            metadata.metadata(),
            group,
            id_col,
            key_and_step,
            keys.as_ref(),
            want,
            sink,
        ) {
            Some(first) => Some(first),
            None if every_row => None,
            None => page_selection(
                metadata.metadata(),
                &[group],
                id_col,
                key_col,
                keys.as_ref(),
                want,
            ),
        };
        if selection.as_ref().is_some_and(|s| !s.selects_any()) {
            continue;
        }
        let reader = source.row_group(
            metadata.metadata(),
            group,
            selection.as_ref(),
            &fetch_columns,
        )?;
        let mut builder =
            ParquetRecordBatchReaderBuilder::new_with_metadata(reader, metadata.clone());
        if !every_row {
            builder = builder.with_row_filter(row_filter(
                &parquet_schema,
                id_col,
                key_and_step,
                filter_keys.clone(),
                want,
            ));
        }
        if let Some(selection) = selection {
            builder = builder.with_row_selection(selection);
        }
        if source.fetches_pages() {
            // Never a bitmask over a fragmented selection: the reader would
            // decode (and so fetch) the pages between the selected rows too.
            builder = builder.with_row_selection_policy(RowSelectionPolicy::Selectors);
        }
        read_group(group, builder, sink)?;
    }
    Ok(())
}

/// The rows to read of a row group of one wanted experiment and one wanted key,
/// when `sink` keeps only that key's first points (see
/// [`first_points_selection`]); the rows after them are counted to `sink`.
fn first_points_rows(
    metadata: &ParquetMetaData,
    group: usize,
    id_col: usize,
    key_and_step: Option<(usize, usize)>,
    keys: Option<&OwnedKeyFilter>,
    want: &RowsWanted,
    sink: &mut dyn RowSink,
) -> Option<RowSelection> {
    let rg = metadata.row_group(group);
    let (key_col, step_col) = key_and_step?;
    if !one_wanted_experiment(rg, id_col, want) {
        return None;
    }
    // Only a read of chosen keys keeps first points.
    let key = one_wanted_key(rg, key_col, keys?)?;
    // Rows are counted by their step, here and page by page below, so every row
    // must have one.
    let (min, max) = step_bounds(rg, step_col)?;
    let (from, keep) = sink.first_points(key)?;
    // A row group wholly after the first points the sink already holds (an
    // earlier partition's file held them) is counted from its statistics.
    if max <= want.steps.1
        && sink.held_through(key).is_some_and(|last| min > last)
        && let Ok(rows) = u64::try_from(rg.num_rows())
    {
        sink.unread(key, rows);
        return Some(RowSelection::from(vec![RowSelector::skip(rows as usize)]));
    }
    let (selection, counted) = first_points_selection(
        metadata,
        group,
        step_col,
        (from.max(want.steps.0), keep),
        want.steps.1,
    )?;
    if counted > 0 {
        sink.unread(key, counted);
    }
    Some(selection)
}

/// The predicates that pick a read's rows out of a row group's: its experiment
/// range, then its keys and steps.
fn row_filter(
    parquet_schema: &SchemaDescriptor,
    id_col: usize,
    key_and_step: Option<(usize, usize)>,
    keys: Option<OwnedKeyFilter>,
    want: &RowsWanted,
) -> RowFilter {
    let (lo, hi) = (want.experiments.0.to_owned(), want.experiments.1.to_owned());
    let by_experiment = ArrowPredicateFn::new(
        ProjectionMask::roots(parquet_schema, [id_col]),
        move |batch: RecordBatch| {
            let ids = StrColumn::of(batch.column(0)).ok_or_else(|| filter_err("experiment_id"))?;
            Ok(ids.range_mask(&lo, &hi))
        },
    );
    let mut predicates: Vec<Box<dyn parquet::arrow::arrow_reader::ArrowPredicate>> =
        vec![Box::new(by_experiment)];
    if let Some((key_col, step_col)) = key_and_step {
        let (lo, hi) = want.steps;
        if keys.is_some() || lo > i64::MIN || hi < i64::MAX {
            let by_key_and_step = ArrowPredicateFn::new(
                ProjectionMask::roots(parquet_schema, [key_col, step_col]),
                move |batch: RecordBatch| {
                    let key = StrColumn::of(batch.column(0)).ok_or_else(|| filter_err("key"))?;
                    let step = IntColumn::of(batch.column(1)).ok_or_else(|| filter_err("step"))?;
                    let in_keys = keys.as_ref().map(|k| key.in_mask(k));
                    let in_steps = |r: usize| {
                        let s = step.value(r);
                        lo <= s && s <= hi
                    };
                    let bits = match in_keys {
                        Some(m) if lo == i64::MIN && hi == i64::MAX => return Ok(m),
                        Some(m) => &BooleanBuffer::collect_bool(m.len(), in_steps) & m.values(),
                        None => BooleanBuffer::collect_bool(batch.num_rows(), in_steps),
                    };
                    Ok(BooleanArray::new(bits, None))
                },
            );
            predicates.push(Box::new(by_key_and_step));
        }
    }
    RowFilter::new(predicates)
}

/// The metadata of a local file, with its page index.
pub(crate) fn local_metadata(
    file: &PositionalFile,
    path: &str,
) -> Result<ArrowReaderMetadata, QueryError> {
    let metadata = ParquetMetaDataReader::new()
        .with_page_index_policy(PageIndexPolicy::Optional)
        .parse_and_finish(file)
        .map_err(parquet_err(path))?;
    reader_metadata(metadata, file.len(), path)
}

/// Reader metadata for a published file's footer: refused if its column chunks
/// lie outside the file, without its page index if that index is unsound.
fn reader_metadata(
    metadata: ParquetMetaData,
    size: u64,
    path: &str,
) -> Result<ArrowReaderMetadata, QueryError> {
    check_layout(&metadata, size, path)?;
    let metadata = if page_index_is_sound(&metadata) {
        metadata
    } else {
        tracing::warn!(
            file = path,
            "ignoring a page index that does not match its pages"
        );
        metadata
            .into_builder()
            .set_column_index(None)
            .set_offset_index(None)
            .build()
    };
    ArrowReaderMetadata::try_new(
        Arc::new(metadata),
        ArrowReaderOptions::new().with_page_index(true),
    )
    .map_err(parquet_err(path))
}

/// Whether a file's offset index (if any) can be trusted to plan reads: one
/// entry per row group and column; each chunk's pages start at row 0 in
/// increasing rows below the group's count, and lie, non-empty, inside their
/// column chunk. A file in the bucket may have been written by anything, and
/// the Parquet reader and our fetch plans take these numbers as they are.
fn page_index_is_sound(metadata: &ParquetMetaData) -> bool {
    let Some(offsets) = metadata.offset_index() else {
        return true;
    };
    if offsets.len() != metadata.num_row_groups() {
        return false;
    }
    metadata
        .row_groups()
        .iter()
        .zip(offsets)
        .all(|(rg, group)| {
            group.len() == rg.num_columns()
                && rg.columns().iter().zip(group).all(|(chunk, index)| {
                    let (start, len) = chunk.byte_range();
                    let end = start.saturating_add(len);
                    let pages = index.page_locations();
                    let mut next_row = 0i64;
                    pages.first().is_some_and(|p| p.first_row_index == 0)
                        && pages.iter().all(|p| {
                            let ok = p.first_row_index >= next_row
                                && p.first_row_index < rg.num_rows()
                                && p.compressed_page_size > 0
                                && u64::try_from(p.offset).is_ok_and(|at| {
                                    at >= start
                                        && at.saturating_add(p.compressed_page_size as u64) <= end
                                });
                            next_row = p.first_row_index.saturating_add(1);
                            ok
                        })
                })
        })
}

/// Refuses a footer whose column chunks start before the file or end past it.
/// The Parquet reader asserts on a negative offset rather than returning an
/// error, and a file in the bucket may have been written by anything.
fn check_layout(metadata: &ParquetMetaData, size: u64, path: &str) -> Result<(), QueryError> {
    for (g, rg) in metadata.row_groups().iter().enumerate() {
        for (c, column) in rg.columns().iter().enumerate() {
            let data = column.data_page_offset();
            let start = column.dictionary_page_offset().unwrap_or(data);
            let len = column.compressed_size();
            let inside = data >= 0
                && start >= 0
                && len >= 0
                && (start as u64)
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= size);
            if !inside {
                return Err(parquet_err(path)(ParquetError::General(format!(
                    "row group {g}, column {c}: {len} bytes at {start} lie outside the file's {size}"
                ))));
            }
        }
    }
    Ok(())
}

/// Reader metadata for given Parquet metadata (a staged file's).
pub(crate) fn metadata_from(
    metadata: Arc<ParquetMetaData>,
    path: &str,
) -> Result<ArrowReaderMetadata, QueryError> {
    ArrowReaderMetadata::try_new(metadata, ArrowReaderOptions::new()).map_err(parquet_err(path))
}

/// How much of a remote file's end is fetched at first: the footer and, almost
/// always, all of its metadata and page index.
const FOOTER_PREFETCH: u64 = 64 << 10;

/// Where [`read_rows`] reads a file from: for each row group it reads, a reader
/// of what reading `selection` (every row: `None`) of `columns` there needs.
pub(crate) trait Source {
    type Reader: ChunkReader + Clone + 'static;

    /// Whether a row group's reader holds only the pages planned for it.
    fn fetches_pages(&self) -> bool {
        false
    }

    fn row_group(
        &self,
        metadata: &ParquetMetaData,
        group: usize,
        selection: Option<&RowSelection>,
        columns: &[usize],
    ) -> Result<Self::Reader, QueryError>;
}

impl Source for PositionalFile {
    type Reader = PositionalFile;

    fn row_group(
        &self,
        _: &ParquetMetaData,
        _: usize,
        _: Option<&RowSelection>,
        _: &[usize],
    ) -> Result<PositionalFile, QueryError> {
        Ok(self.clone())
    }
}

/// A file in the bucket, opened for reading: its metadata and page index are
/// fetched once, then each row group a read reaches fetches only the pages that
/// hold its selected rows (and their dictionaries), in one batch of ranged GETs.
#[derive(Debug)]
pub(crate) struct RemoteFile {
    object: Arc<RemoteObject>,
    key: String,
    stats: Arc<FetchStats>,
}

/// What reads of one remote file fetched.
#[derive(Debug, Default)]
pub(crate) struct FetchStats {
    /// Bytes of row groups fetched.
    bytes: AtomicU64,
    /// Ranges the reader asked for that no row group's plan had fetched, each
    /// fetched on its own.
    unplanned: AtomicU64,
}

impl RemoteFile {
    pub(crate) fn new(object: Arc<RemoteObject>, path: &str) -> Self {
        Self {
            object,
            key: path.to_owned(),
            stats: Arc::default(),
        }
    }

    /// Bytes of row groups fetched so far.
    pub(crate) fn fetched_bytes(&self) -> u64 {
        self.stats.bytes.load(Ordering::Relaxed)
    }

    /// Ranges fetched one by one because no plan foresaw them.
    pub(crate) fn unplanned_fetches(&self) -> u64 {
        self.stats.unplanned.load(Ordering::Relaxed)
    }
}

/// The metadata of a remote file, with its page index: fetches the file's end,
/// and more of it if they reach further back.
pub(crate) fn remote_metadata(
    object: &RemoteObject,
    path: &str,
) -> Result<ArrowReaderMetadata, QueryError> {
    let perr = parquet_err(path);
    let size = object.size();
    // The last `n` bytes; a store may answer a range past the object's end
    // with less, and each retry must fetch more than the one before.
    let end = |n: u64| -> Result<Bytes, QueryError> {
        let bytes = object.get_range(size - n..size)?;
        if bytes.len() as u64 != n {
            return Err(perr(ParquetError::EOF(format!(
                "the object is shorter than the {size} bytes the manifest lists"
            ))));
        }
        Ok(bytes)
    };
    let mut tail = end(size.min(FOOTER_PREFETCH))?;
    let mut reader = ParquetMetaDataReader::new().with_page_index_policy(PageIndexPolicy::Optional);
    loop {
        match reader.try_parse_sized(&tail, size) {
            Ok(()) => break,
            Err(ParquetError::NeedMoreData(needed))
                if needed > tail.len() && needed as u64 <= size =>
            {
                tail = end(needed as u64)?;
            }
            Err(e) => return Err(perr(e)),
        }
    }
    let metadata = reader.finish().map_err(&perr)?;
    reader_metadata(metadata, size, path)
}

/// Parsed footers, with their page indexes, of published files, by object key
/// and size. A file is never rewritten under its key (compaction writes new
/// ones), so an entry holds for as long as the file lives; one for a file gone
/// is never asked for again and ages out. Bounded by the metadata's size in
/// memory; the least recently used go first.
#[derive(Debug)]
pub(crate) struct MetadataCache {
    budget: usize,
    state: std::sync::Mutex<CacheState>,
    counters: CacheCounters,
}

/// The cache's figures on `/metrics`.
#[derive(Debug, Clone, Default)]
pub(crate) struct CacheCounters {
    pub(crate) hits: Counter,
    pub(crate) misses: Counter,
    pub(crate) bytes: Gauge,
}

#[derive(Debug, Default)]
struct CacheState {
    entries: std::collections::HashMap<(String, u64), CacheEntry>,
    /// Keys by last use.
    by_use: std::collections::BTreeMap<u64, (String, u64)>,
    bytes: usize,
    uses: u64,
}

#[derive(Debug)]
struct CacheEntry {
    metadata: ArrowReaderMetadata,
    bytes: usize,
    used: u64,
}

impl MetadataCache {
    /// A cache of at most `budget` bytes of metadata (0: none kept).
    pub(crate) fn new(budget: usize, counters: CacheCounters) -> Self {
        Self {
            budget,
            state: Default::default(),
            counters,
        }
    }

    /// The metadata of file `key` of `size` bytes: kept, or loaded by `load`
    /// (without holding the cache) and kept.
    pub(crate) fn get_or_load(
        &self,
        key: &str,
        size: u64,
        load: impl FnOnce() -> Result<ArrowReaderMetadata, QueryError>,
    ) -> Result<ArrowReaderMetadata, QueryError> {
        if self.budget == 0 {
            self.counters.misses.inc();
            return load();
        }
        let id = (key.to_owned(), size);
        {
            let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let state = &mut *guard;
            state.uses += 1;
            let now = state.uses;
            if let Some(entry) = state.entries.get_mut(&id) {
                state.by_use.remove(&entry.used);
                entry.used = now;
                state.by_use.insert(now, id.clone());
                self.counters.hits.inc();
                return Ok(entry.metadata.clone());
            }
        }
        self.counters.misses.inc();
        let metadata = load()?;
        let bytes = metadata.metadata().memory_size();
        if bytes > self.budget {
            return Ok(metadata);
        }
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let state = &mut *guard;
        state.uses += 1;
        let used = state.uses;
        let entry = CacheEntry {
            metadata: metadata.clone(),
            bytes,
            used,
        };
        // Another read may have loaded it meanwhile.
        if let Some(old) = state.entries.insert(id.clone(), entry) {
            state.by_use.remove(&old.used);
            state.bytes -= old.bytes;
        }
        state.by_use.insert(used, id);
        state.bytes += bytes;
        while state.bytes > self.budget {
            let Some((_, oldest)) = state.by_use.pop_first() else {
                break;
            };
            if let Some(old) = state.entries.remove(&oldest) {
                state.bytes -= old.bytes;
            }
        }
        self.counters
            .bytes
            .set(i64::try_from(state.bytes).unwrap_or(i64::MAX));
        Ok(metadata)
    }

    /// Reads served from the cache, and bytes of metadata held.
    #[cfg(test)]
    fn stats(&self) -> (u64, usize) {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (self.counters.hits.get(), state.bytes)
    }
}

impl Source for RemoteFile {
    type Reader = Fetched;

    fn fetches_pages(&self) -> bool {
        true
    }

    fn row_group(
        &self,
        metadata: &ParquetMetaData,
        group: usize,
        selection: Option<&RowSelection>,
        columns: &[usize],
    ) -> Result<Fetched, QueryError> {
        let ranges = ranges_needed(metadata, group, selection, columns);
        let bytes = self.object.get_ranges(&ranges)?;
        let fetched: u64 = bytes.iter().map(|b| b.len() as u64).sum();
        self.stats.bytes.fetch_add(fetched, Ordering::Relaxed);
        Ok(Fetched {
            size: self.object.size(),
            key: self.key.clone(),
            parts: ranges.iter().map(|r| r.start).zip(bytes).collect(),
            object: Arc::clone(&self.object),
            stats: Arc::clone(&self.stats),
        })
    }
}

/// The byte ranges of row group `group` that reading `selection` (every row:
/// `None`) of leaf `columns` needs, sorted and merged (see [`MERGE_GAP`]): each page holding a
/// selected row, with its column's dictionary page; a whole column chunk where
/// the file has no offset index, or every row is read.
fn ranges_needed(
    metadata: &ParquetMetaData,
    group: usize,
    selection: Option<&RowSelection>,
    columns: &[usize],
) -> Vec<Range<u64>> {
    let rg = metadata.row_group(group);
    let offsets = metadata.offset_index().and_then(|i| i.get(group));
    let mut ranges = Vec::new();
    for &c in columns {
        let Some(chunk) = rg.columns().get(c) else {
            continue;
        };
        let (start, len) = chunk.byte_range();
        let pages = offsets
            .and_then(|o| o.get(c))
            .map(|o| o.page_locations())
            .filter(|p| !p.is_empty());
        let (Some(selection), Some(pages)) = (selection, pages) else {
            ranges.push(start..start + len);
            continue;
        };
        let first_page = u64::try_from(pages[0].offset).unwrap_or(start);
        if first_page > start {
            // The dictionary page (or anything else before the first data page).
            ranges.push(start..first_page);
        }
        // Page locations passed `page_index_is_sound`, so their casts hold.
        ranges.extend(selection.scan_ranges(pages));
    }
    ranges.sort_unstable_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(MERGE_GAP) => {
                last.end = last.end.max(r.end);
            }
            _ => merged.push(r),
        }
    }
    merged
}

/// Ranges of a row group this close are fetched as one: the bytes between cost
/// less than another request. (object_store's own merging joins ranges up to
/// 1 MiB apart, which would fetch nearly all of a typical row group.)
const MERGE_GAP: u64 = 64 << 10;

/// Parts of a remote file fetched in advance, served to the Parquet reader; a
/// range no part holds is fetched when asked for.
#[derive(Debug, Clone)]
pub(crate) struct Fetched {
    size: u64,
    key: String,
    /// (offset, bytes) of each fetched range.
    parts: Vec<(u64, Bytes)>,
    object: Arc<RemoteObject>,
    stats: Arc<FetchStats>,
}

impl Fetched {
    /// The fetched bytes from `start`, to the end of the part holding `length` of
    /// them.
    fn bytes_at(&self, start: u64, length: usize) -> Option<Bytes> {
        let end = start.checked_add(length as u64)?;
        self.parts
            .iter()
            .find(|(at, bytes)| *at <= start && end <= at + bytes.len() as u64)
            .map(|(at, bytes)| bytes.slice((start - at) as usize..))
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
        // Only a column chunk read whole asks for a reader; its chunk was fetched.
        let bytes = self.bytes_at(start, 0).ok_or_else(|| {
            ParquetError::General(format!(
                "bytes from {start} of {} were not fetched",
                self.key
            ))
        })?;
        Ok(bytes.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        if let Some(bytes) = self.bytes_at(start, length) {
            return Ok(bytes.slice(..length));
        }
        let end = start
            .checked_add(length as u64)
            .filter(|&end| end <= self.size)
            .ok_or_else(|| {
                ParquetError::EOF(format!(
                    "bytes {start}+{length} lie past the end of {}",
                    self.key
                ))
            })?;
        tracing::debug!(file = %self.key, start, length, "fetching a range no plan foresaw");
        self.stats.unplanned.fetch_add(1, Ordering::Relaxed);
        self.object
            .get_range(start..end)
            .map_err(|e| ParquetError::External(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{Float64Array, Int64Array, StringArray};
    use arrow_schema::{Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::page_index::offset_index::PageLocation;
    use parquet::file::properties::WriterProperties;
    use prometheus_client::metrics::family::Family;

    use crate::sink::counting::CountingStore;
    use crate::telemetry::{StoreArea, StoreLabel, StoreOp};

    /// A writer-shaped file: few large row groups, each holding many experiments
    /// in sorted runs, on small pages, so the page index has something to prune.
    fn file(rows: &[(String, String, i64)]) -> (PositionalFile, tempfile::TempDir) {
        file_with(rows, rows.len() / 2)
    }

    /// A file of row groups of `group_rows` rows, on pages of 64 rows.
    fn file_with(
        rows: &[(String, String, i64)],
        group_rows: usize,
    ) -> (PositionalFile, tempfile::TempDir) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("experiment_id", DataType::Utf8, false),
            Field::new("key", DataType::Utf8, false),
            Field::new("step", DataType::Int64, false),
            Field::new("value", DataType::Float64, false),
        ]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1))),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.2))),
                Arc::new(Float64Array::from_iter_values(
                    (0..rows.len()).map(|i| i as f64),
                )),
            ],
        )
        .expect("batch");
        let props = WriterProperties::builder()
            .set_max_row_group_size(group_rows)
            .set_data_page_row_count_limit(64)
            .set_write_batch_size(64)
            // As mboxd's writers: no dictionary for steps and values.
            .set_column_dictionary_enabled("step".into(), false)
            .set_column_dictionary_enabled("value".into(), false)
            .build();
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.parquet");
        let mut writer =
            ArrowWriter::try_new(File::create(&path).expect("create"), schema, Some(props))
                .expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
        let f = File::open(&path).expect("open");
        let len = f.metadata().expect("len").len();
        (PositionalFile::new(Arc::new(f), len), dir)
    }

    fn read(file: &PositionalFile, want: &RowsWanted) -> Vec<(String, String, i64)> {
        let metadata = local_metadata(file, "f").expect("metadata");
        assert!(metadata.metadata().column_index().is_some(), "page index");
        read_from(file, metadata, want)
    }

    fn read_from<S: Source>(
        source: &S,
        metadata: ArrowReaderMetadata,
        want: &RowsWanted,
    ) -> Vec<(String, String, i64)> {
        let mut out = Vec::new();
        read_rows(source, metadata, "f", None, want, &mut |b: RecordBatch| {
            let col = |n: &str| b.column(b.schema().index_of(n).expect("col")).clone();
            let (id, key, step) = (col("experiment_id"), col("key"), col("step"));
            let id = id.as_any().downcast_ref::<StringArray>().expect("ids");
            let key = key.as_any().downcast_ref::<StringArray>().expect("keys");
            let step = step.as_any().downcast_ref::<Int64Array>().expect("steps");
            for i in 0..b.num_rows() {
                out.push((id.value(i).into(), key.value(i).into(), step.value(i)));
            }
            Ok(())
        })
        .expect("read");
        out
    }

    /// The steps of a series of 1,000 points, and a file of them (experiment
    /// `e`, key `k`) in row groups of `group_rows` on pages of 64 rows: step i
    /// at row i, except that rows 380..=390 are all step 380, across the
    /// boundary of pages 5 and 6.
    fn one_series(group_rows: usize) -> (Vec<i64>, PositionalFile, tempfile::TempDir) {
        let steps: Vec<i64> = (0..1000)
            .map(|i| if (380..=390).contains(&i) { 380 } else { i })
            .collect();
        let rows: Vec<(String, String, i64)> =
            steps.iter().map(|&s| ("e".into(), "k".into(), s)).collect();
        let (file, dir) = file_with(&rows, group_rows);
        (steps, file, dir)
    }

    /// A sink that keeps only a series' first points.
    struct FirstPoints {
        from: i64,
        keep: usize,
        /// What it holds from other sources: through this step.
        held: Option<i64>,
        steps: Vec<i64>,
        unread: u64,
    }

    impl FirstPoints {
        fn new(held: Option<i64>) -> Self {
            Self {
                from: 200,
                keep: 100,
                held,
                steps: Vec::new(),
                unread: 0,
            }
        }
    }

    impl RowSink for FirstPoints {
        fn batch(&mut self, b: RecordBatch) -> Result<(), QueryError> {
            let steps = b.column(b.schema().index_of("step").expect("step"));
            let steps = steps.as_any().downcast_ref::<Int64Array>().expect("steps");
            self.steps.extend(steps.values().iter().copied());
            Ok(())
        }

        fn first_points(&self, key: &str) -> Option<(i64, usize)> {
            (key == "k").then_some((self.from, self.keep))
        }

        fn held_through(&mut self, _key: &str) -> Option<i64> {
            self.held
        }

        fn unread(&mut self, key: &str, rows: u64) {
            assert_eq!(key, "k");
            self.unread += rows;
        }
    }

    /// A read that keeps a series' first points decodes the pages that hold
    /// them, and the next ones while they start at the step the last of those
    /// ends at (ties rank by ingest time, which the page index does not hold);
    /// it counts the wanted rows after them, and neither reads nor counts pages
    /// before the first step or past the last.
    #[test]
    fn a_read_of_first_points_decodes_their_pages_and_counts_the_rest() {
        // One row group.
        let (steps, file, _dir) = one_series(1000);
        let keys = ["k".to_owned()];
        let read = |lo: i64, hi: i64| {
            let want = RowsWanted {
                experiments: ("e", "e"),
                keys: KeyFilter::Pages(&keys),
                steps: (lo, hi),
                columns: &["step", "value"],
            };
            let metadata = local_metadata(&file, "f").expect("metadata");
            let mut sink = FirstPoints::new(None);
            read_rows(&file, metadata, "f", None, &want, &mut sink).expect("read");
            (sink.steps, sink.unread)
        };
        // Pages 3 (from step 192: it holds 200) to 6 (it starts at 380, where
        // page 5, the one by which 100 rows from step 200 are read, ends).
        let (got, unread) = read(i64::MIN, i64::MAX);
        assert_eq!(got, steps[192..448]);
        assert_eq!(unread, 1000 - 448);
        // With an end step: pages 7 and 8 are counted, page 9 holds the end and
        // is read up to it, the pages after it are not wanted.
        let (got, unread) = read(i64::MIN, 600);
        let want: Vec<i64> = steps[192..448].iter().copied().chain(576..=600).collect();
        assert_eq!(got, want);
        assert_eq!(unread, 128);
        // A start step past the sink's (a page resuming inside the series): the
        // first points count from it, and the rows before it are filtered out.
        let (got, unread) = read(250, i64::MAX);
        assert_eq!(got, steps[250..448]);
        assert_eq!(unread, 1000 - 448);
    }

    /// A row group wholly after the first points a sink already holds is counted
    /// from its statistics, unread.
    #[test]
    fn a_row_group_after_the_points_held_is_counted_unread() {
        // Row groups of steps 0..=499 and 500..=999.
        let (steps, file, _dir) = one_series(500);
        let keys = ["k".to_owned()];
        let want = RowsWanted {
            experiments: ("e", "e"),
            keys: KeyFilter::Pages(&keys),
            steps: (i64::MIN, i64::MAX),
            columns: &["step", "value"],
        };
        let first: Vec<i64> = steps[192..448].to_vec();
        let both: Vec<i64> = first.iter().copied().chain(500..628).collect();
        for (held, read, unread) in [
            // Each group's own first points: 52 rows of the first counted, 372
            // of the second (it reads steps 500..=627, two pages).
            (None, &both, 52 + 372),
            // The second group starts at the step held through: it is read.
            (Some(500), &both, 52 + 372),
            // Held through 450: the second group is counted whole.
            (Some(450), &first, 52 + 500),
        ] {
            let metadata = local_metadata(&file, "f").expect("metadata");
            let mut sink = FirstPoints::new(held);
            read_rows(&file, metadata, "f", None, &want, &mut sink).expect("read");
            assert_eq!((&sink.steps, sink.unread), (read, unread), "held {held:?}");
        }
    }

    /// `file` as a remote file, and its metadata.
    fn in_store(
        file: &PositionalFile,
        dir: &tempfile::TempDir,
        runtime: &tokio::runtime::Runtime,
    ) -> (RemoteFile, ArrowReaderMetadata) {
        let object = counted_object(file, dir, runtime, &Default::default());
        let metadata = remote_metadata(&object, "f").expect("metadata");
        (RemoteFile::new(Arc::new(object), "f"), metadata)
    }

    /// `file` as an object in a store (a local folder: the bucket's API without
    /// a server), counting requests into `requests`.
    fn counted_object(
        file: &PositionalFile,
        dir: &tempfile::TempDir,
        runtime: &tokio::runtime::Runtime,
        requests: &Family<StoreLabel, Counter>,
    ) -> RemoteObject {
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir.path()).unwrap();
        let store = CountingStore::new(Arc::new(store), requests.clone());
        let remote = crate::sink::Remote {
            store: Arc::new(store),
            runtime: runtime.handle().clone(),
        };
        let key = crate::paths::ObjectKey::from_manifest("f.parquet".into());
        RemoteObject::new(remote, &key, file.len()).unwrap()
    }

    /// GET requests to the data so far.
    fn gets(requests: &Family<StoreLabel, Counter>) -> u64 {
        requests
            .get_or_create(&StoreLabel {
                op: StoreOp::get,
                area: StoreArea::data,
            })
            .get()
    }

    /// The rows of `experiments` runs (`e000`, `e001`, ...) of `points` steps
    /// of key `k` each, in order.
    fn runs(experiments: usize, points: i64) -> Vec<(String, String, i64)> {
        (0..experiments)
            .flat_map(|e| (0..points).map(move |s| (format!("e{e:03}"), "k".to_owned(), s)))
            .collect()
    }

    /// A page index whose pages do not lie inside their column chunks, or do
    /// not start at row 0 in order, is dropped: the read plans whole chunks and
    /// stays exact, where the Parquet reader would be handed the bad offsets.
    #[test]
    fn an_unsound_page_index_is_ignored_and_the_read_stays_exact() {
        let rows = runs(4, 300);
        let (file, _dir) = file_with(&rows, rows.len());
        let want = RowsWanted {
            experiments: ("e002", "e002"),
            keys: KeyFilter::All,
            steps: (i64::MIN, i64::MAX),
            columns: &["key", "step", "value"],
        };
        let expected = read(&file, &want);
        assert_eq!(expected.len(), 300);
        let footer = || {
            ParquetMetaDataReader::new()
                .with_page_index_policy(PageIndexPolicy::Optional)
                .parse_and_finish(&file)
                .unwrap()
        };
        assert!(page_index_is_sound(&footer()));
        type Damage = fn(&mut PageLocation);
        let damages: [(&str, Damage); 4] = [
            ("a negative offset", |p| p.offset = -5),
            ("past the chunk", |p| p.offset += 1 << 30),
            ("an empty page", |p| p.compressed_page_size = 0),
            ("rows out of order", |p| p.first_row_index = 1),
        ];
        for (what, damage) in damages {
            let metadata = footer();
            let mut offsets = metadata.offset_index().unwrap().clone();
            // A page of the step column (column 2): its first for the row
            // numbers, its third for the others.
            let page = if what == "rows out of order" { 0 } else { 2 };
            damage(&mut offsets[0][2].page_locations[page]);
            let damaged = metadata
                .into_builder()
                .set_offset_index(Some(offsets))
                .build();
            assert!(!page_index_is_sound(&damaged), "{what}");
            let md = reader_metadata(damaged, file.len(), "f").unwrap();
            assert!(md.metadata().offset_index().is_none(), "{what}");
            assert!(md.metadata().column_index().is_none(), "{what}");
            assert_eq!(read_from(&file, md, &want), expected, "{what}");
        }
    }

    /// A repeated read takes a file's metadata from the cache: one batch of
    /// page GETs instead of the footer's GET and the pages'. Past the budget
    /// the least recently used file goes; metadata larger than it is never kept.
    #[test]
    fn a_repeated_read_takes_the_metadata_from_the_cache() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let rows = runs(4, 500);
        let (file, dir) = file_with(&rows, rows.len());
        let (other, other_dir) = file_with(&rows[..1000], 1000);
        let want = RowsWanted {
            experiments: ("e001", "e001"),
            keys: KeyFilter::All,
            steps: (i64::MIN, i64::MAX),
            columns: &["key", "step", "value"],
        };
        let requests = Family::default();
        // Reads `f` (of `file` in `dir`) through `cache`: its rows of e001, and
        // the GETs it took.
        let read = |cache: &MetadataCache, key: &str, file: &PositionalFile, dir| {
            let before = gets(&requests);
            let object = counted_object(file, dir, &runtime, &requests);
            let metadata = cache
                .get_or_load(key, file.len(), || remote_metadata(&object, key))
                .expect("metadata");
            let got = read_from(&RemoteFile::new(Arc::new(object), key), metadata, &want);
            (got.len(), gets(&requests) - before)
        };
        let size = local_metadata(&file, "f").unwrap().metadata().memory_size();
        let other_size = local_metadata(&other, "g")
            .unwrap()
            .metadata()
            .memory_size();

        let cache = MetadataCache::new(size + other_size, Default::default());
        assert_eq!(read(&cache, "f", &file, &dir), (500, 2));
        assert_eq!(read(&cache, "f", &file, &dir), (500, 1));
        assert_eq!(read(&cache, "g", &other, &other_dir), (500, 2));
        assert_eq!(read(&cache, "f", &file, &dir), (500, 1));
        assert_eq!(read(&cache, "g", &other, &other_dir), (500, 1));
        assert_eq!(cache.stats(), (3, size + other_size));

        // Room for one: each read of the other file evicts it.
        let cache = MetadataCache::new(size.max(other_size), Default::default());
        for _ in 0..2 {
            assert_eq!(read(&cache, "f", &file, &dir), (500, 2));
            assert_eq!(read(&cache, "g", &other, &other_dir), (500, 2));
        }
        assert_eq!(cache.stats().0, 0);
        // Too small for either: nothing kept.
        let cache = MetadataCache::new(size.min(other_size) - 1, Default::default());
        assert_eq!(read(&cache, "f", &file, &dir), (500, 2));
        assert_eq!(read(&cache, "f", &file, &dir), (500, 2));
        assert_eq!(cache.stats(), (0, 0));
    }

    /// A read from the bucket fetches the metadata with the page index, then
    /// of each row group only the pages that hold wanted rows, all foreseen:
    /// the same rows as a local read, for a fraction of the bytes.
    #[test]
    fn a_remote_read_fetches_only_the_pages_of_its_rows() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        // 200 experiments of 500 points in one row group, on pages of 64 rows.
        let rows = runs(200, 500);
        let (file, dir) = file_with(&rows, rows.len());
        let (remote, metadata) = in_store(&file, &dir, &runtime);
        assert!(
            metadata.metadata().offset_index().is_some(),
            "page index fetched"
        );
        let size = file.len();

        let one = RowsWanted {
            experiments: ("e107", "e107"),
            keys: KeyFilter::All,
            steps: (i64::MIN, i64::MAX),
            columns: &["key", "step", "value"],
        };
        let got = read_from(&remote, metadata.clone(), &one);
        assert_eq!(got.len(), 500);
        assert!(got.iter().all(|r| r.0 == "e107"));
        assert_eq!(got, read(&file, &one));
        let fetched = remote.fetched_bytes();
        assert!(
            fetched > 0 && fetched * 20 < size,
            "{fetched} of {size} bytes"
        );
        assert_eq!(remote.unplanned_fetches(), 0);

        // Every row: every chunk, and nothing more.
        let all = RowsWanted {
            experiments: ("", "\u{10ffff}"),
            ..one
        };
        assert_eq!(read_from(&remote, metadata, &all), rows);
        let whole = remote.fetched_bytes() - fetched;
        assert!(
            whole > fetched * 20 && whole < size,
            "{whole} of {size} bytes"
        );
        assert_eq!(remote.unplanned_fetches(), 0);

        // A read of first points: the pages that hold them, all planned.
        let (steps, file, dir) = one_series(1000);
        let (remote, metadata) = in_store(&file, &dir, &runtime);
        let keys = ["k".to_owned()];
        let want = RowsWanted {
            experiments: ("e", "e"),
            keys: KeyFilter::Pages(&keys),
            steps: (i64::MIN, i64::MAX),
            columns: &["step", "value"],
        };
        let mut sink = FirstPoints::new(None);
        read_rows(&remote, metadata, "f", None, &want, &mut sink).expect("read");
        assert_eq!(sink.steps, steps[192..448]);
        // (A file this small is fetched whole: its gaps are under MERGE_GAP.)
        assert_eq!(remote.unplanned_fetches(), 0);
    }

    /// A footer naming bytes before the file's start or past its end is an
    /// error naming the file, not a panic in the Parquet reader.
    #[test]
    fn a_footer_pointing_outside_the_file_is_refused() {
        let rows: Vec<(String, String, i64)> =
            (0..200).map(|i| ("e".into(), "k".into(), i)).collect();
        let (f, _dir) = file(&rows);
        let metadata = local_metadata(&f, "f").expect("metadata");
        let metadata = metadata.metadata();
        let size = f.len();
        assert!(check_layout(metadata, size, "f").is_ok());
        let with_column =
            |change: &dyn Fn(
                parquet::file::metadata::ColumnChunkMetaDataBuilder,
            )
                -> parquet::file::metadata::ColumnChunkMetaDataBuilder| {
                let rg = metadata.row_group(0).clone();
                let mut columns = rg.columns().to_vec();
                columns[0] = change(columns[0].clone().into_builder())
                    .build()
                    .expect("column");
                let rg = rg
                    .into_builder()
                    .set_column_metadata(columns)
                    .build()
                    .expect("rg");
                ParquetMetaData::new(metadata.file_metadata().clone(), vec![rg])
            };
        let bad = [
            with_column(&|c| c.set_data_page_offset(-1).set_dictionary_page_offset(None)),
            with_column(&|c| c.set_dictionary_page_offset(Some(-8))),
            with_column(&|c| c.set_total_compressed_size(-1)),
            with_column(&|c| c.set_total_compressed_size(i64::MAX)),
        ];
        for m in &bad {
            let e = check_layout(m, size, "f").expect_err("outside the file");
            assert!(
                matches!(&e, QueryError::Parquet { path, .. } if path == "f"),
                "{e}"
            );
        }
    }

    #[test]
    fn page_pruned_reads_return_exactly_the_wanted_rows() {
        let mut rows = Vec::new();
        for e in 0..40 {
            for k in ["loss", "lr", "val/acc"] {
                for s in 0..150 {
                    rows.push((format!("exp{e:03}"), k.to_owned(), s));
                }
            }
        }
        let (f, _dir) = file(&rows);
        let keys = ["loss".to_owned(), "val/acc".to_owned()];
        let cases = [
            (("exp007", "exp007"), KeyFilter::All, (i64::MIN, i64::MAX)),
            (("exp007", "exp007"), KeyFilter::Pages(&keys), (10, 120)),
            (
                ("exp008", "exp008"),
                KeyFilter::Pages(&keys),
                (i64::MIN, i64::MAX),
            ),
            (
                ("exp010", "exp013"),
                KeyFilter::Range(Some("lr"), None),
                (0, 5),
            ),
            (
                ("exp039", "exp039"),
                KeyFilter::Range(None, Some("lr")),
                (140, 149),
            ),
            (("exp100", "exp200"), KeyFilter::All, (i64::MIN, i64::MAX)),
        ];
        for (experiments, keys, steps) in cases {
            let want = RowsWanted {
                experiments,
                keys,
                steps,
                columns: &["key", "step"],
            };
            let owned = keys.owned();
            let keys_admit = |k: &str| owned.as_ref().is_none_or(|f| f.admits(k));
            if experiments.0 == experiments.1 {
                // The page index alone narrows a one-experiment read to its run.
                let metadata = local_metadata(&f, "f").expect("metadata");
                let groups: Vec<usize> = (0..metadata.metadata().num_row_groups()).collect();
                let selection = page_selection(
                    metadata.metadata(),
                    &groups,
                    0,
                    Some(1),
                    owned.as_ref(),
                    &want,
                )
                .expect("a page index");
                assert!(selection.row_count() < rows.len() / 20, "{experiments:?}");
            }
            let expected: Vec<_> = rows
                .iter()
                .filter(|(e, k, s)| {
                    experiments.0 <= e.as_str()
                        && e.as_str() <= experiments.1
                        && owned.as_ref().is_none_or(|f| f.admits(k))
                        && steps.0 <= *s
                        && *s <= steps.1
                })
                .cloned()
                .collect();
            let mut got = read(&f, &want);
            if let KeyFilter::Pages(_) = keys {
                // Whole pages: rows of other keys only where a page holds both.
                let others = got.iter().filter(|(_, k, _)| !keys_admit(k)).count();
                assert!(others <= 2 * 64, "{others} rows of other keys");
                got.retain(|(_, k, _)| keys_admit(k));
            }
            assert_eq!(got, expected, "{experiments:?} {steps:?}");
        }
    }
}
