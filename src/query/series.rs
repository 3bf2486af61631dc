//! Series reads: gathering one experiment's points per key from every source,
//! ordering them, and cutting them into pages, exact or bucketed.

use std::collections::BTreeMap;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};

use super::QueryError;
use super::parquet::{IntColumn, RowSink, StrColumn};
use crate::model::{MetricChunk, MetricValue};

/// What a series read asks for.
#[derive(Debug, Clone)]
pub struct SeriesQuery {
    /// Only these keys, sorted and distinct; `None`: every key.
    pub keys: Option<Vec<String>>,
    pub start_step: Option<i64>,
    pub end_step: Option<i64>,
    /// Series longer than this come back as at most this many step buckets.
    pub max_points: Option<usize>,
    /// Most points in a page.
    pub page_points: usize,
    /// About the most bytes a page takes on the wire.
    pub page_bytes: usize,
    /// Where the previous page stopped.
    pub cursor: Option<Cursor>,
    /// Points read at once (a group of keys, or one longer series).
    pub read_points: usize,
}

impl SeriesQuery {
    /// Every point of every key, in pages of the given size.
    pub fn all(page_points: usize, page_bytes: usize) -> Self {
        Self {
            keys: None,
            start_step: None,
            end_step: None,
            max_points: None,
            page_points,
            page_bytes,
            cursor: None,
            read_points: 1 << 20,
        }
    }

    pub(crate) fn wants_key(&self, key: &str) -> bool {
        self.keys
            .as_ref()
            .is_none_or(|k| k.binary_search_by(|w| w.as_str().cmp(key)).is_ok())
            && self.cursor.as_ref().is_none_or(|c| key >= c.key.as_str())
    }

    pub(crate) fn steps(&self) -> (i64, i64) {
        (
            self.start_step.unwrap_or(i64::MIN),
            self.end_step.unwrap_or(i64::MAX),
        )
    }

    /// What a read of `key` must hold for this page: the points from a step on,
    /// and how many of them (see [`Gathered::prune`]). `None` for a bucketed read,
    /// which needs the whole series.
    pub(crate) fn keep_of(&self, key: &str) -> Option<(i64, usize)> {
        if self.max_points.is_some() {
            return None;
        }
        // No page holds more points than this; one more tells where the next
        // page starts.
        let page = self.page_points.min(self.page_bytes / POINT_BYTES + 1);
        let (from, skip) = match &self.cursor {
            Some(c) if c.key == key => (c.step, usize::try_from(c.skip).unwrap_or(usize::MAX)),
            _ => (self.steps().0, 0),
        };
        Some((from, skip.saturating_add(page).saturating_add(1)))
    }
}

/// A read's series as they are gathered from its sources: pruned as they grow
/// (see [`bound`]), and told of the rows a source counted instead of decoding.
#[derive(Debug)]
pub(crate) struct Gathering<'q> {
    series: BTreeMap<String, Gathered>,
    query: &'q SeriesQuery,
}

impl<'q> Gathering<'q> {
    /// The `keys` series, each with room for its expected size.
    pub(crate) fn new(keys: &[String], sizes: &[u64], query: &'q SeriesQuery) -> Self {
        let series = keys
            .iter()
            .zip(sizes)
            .map(|(k, &n)| (k.clone(), Gathered::with_capacity(n as usize)))
            .collect();
        Self { series, query }
    }

    /// Adds a buffered chunk's rows of the wanted `keys`.
    pub(crate) fn chunk(&mut self, chunk: &MetricChunk, keys: &[String]) {
        gather_chunk(chunk, keys, &mut self.series, self.query);
        bound(&mut self.series, self.query);
    }

    pub(crate) fn into_series(self) -> BTreeMap<String, Gathered> {
        self.series
    }
}

impl RowSink for Gathering<'_> {
    fn batch(&mut self, batch: RecordBatch) -> Result<(), QueryError> {
        gather_batch(&batch, &mut self.series)?;
        bound(&mut self.series, self.query);
        Ok(())
    }

    fn first_points(&self, key: &str) -> Option<(i64, usize)> {
        if !self.series.contains_key(key) {
            return None;
        }
        self.query.keep_of(key)
    }

    fn held_through(&mut self, key: &str) -> Option<i64> {
        let (from, keep) = self.query.keep_of(key)?;
        let g = self.series.get_mut(key)?;
        if g.len() < keep {
            return None;
        }
        g.prune(from, keep);
        (g.len() == keep).then(|| g.steps[keep - 1])
    }

    fn unread(&mut self, key: &str, rows: u64) {
        if let Some(g) = self.series.get_mut(key) {
            g.dropped = g.dropped.saturating_add(rows);
        }
    }
}

/// Prunes each gathered series that holds more than twice what its page needs,
/// so a read holds about a page of each long series, not all of it.
fn bound(out: &mut BTreeMap<String, Gathered>, query: &SeriesQuery) {
    for (key, g) in out.iter_mut() {
        if let Some((from, keep)) = query.keep_of(key)
            && g.len() > keep.saturating_mul(2)
        {
            g.prune(from, keep);
        }
    }
}

/// Where a page stopped: the next point is the `skip`-th (from 0) of `key`'s
/// points at `step`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub key: String,
    pub step: i64,
    pub skip: u64,
}

impl Cursor {
    /// The page token: versioned, the key hex-encoded so any key round-trips.
    pub fn encode(&self) -> String {
        let hex: String = self.key.bytes().map(|b| format!("{b:02x}")).collect();
        format!("s1.{}.{}.{hex}", self.step, self.skip)
    }

    pub fn decode(token: &str) -> Result<Self, QueryError> {
        let bad = || QueryError::Token(format!("{token:?} is not a page token from mboxd"));
        let mut parts = token.splitn(4, '.');
        if parts.next() != Some("s1") {
            return Err(bad());
        }
        let step = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let skip = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let hex = parts.next().ok_or_else(bad)?;
        if hex.len() % 2 != 0 {
            return Err(bad());
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
            .collect::<Result<Vec<u8>, _>>()
            .map_err(|_| bad())?;
        let key = String::from_utf8(bytes).map_err(|_| bad())?;
        Ok(Self { key, step, skip })
    }
}

/// One series in a page.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesOut {
    pub key: String,
    pub bucketed: bool,
    /// Points of the series in the step range (before bucketing).
    pub total_points: u64,
    pub steps: Vec<i64>,
    pub wallclocks: Vec<i64>,
    pub values: Vec<MetricValue>,
    /// Per bucket, when bucketed.
    pub min: Vec<f64>,
    pub max: Vec<f64>,
}

/// A page of series, and where the next one starts.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SeriesPage {
    pub series: Vec<SeriesOut>,
    pub next: Option<Cursor>,
}

/// One series' points from every source, in arrival order.
#[derive(Debug, Clone, Default)]
pub(crate) struct Gathered {
    steps: Vec<i64>,
    wallclocks: Vec<i64>,
    /// NaN for a string or bytes value (kept in `other`).
    values: Vec<f64>,
    ingested: Vec<i64>,
    other: Vec<(u32, MetricValue)>,
    /// Points [`Self::prune`] let go, and points a source counted instead of
    /// handing over ([`RowSink::unread`]): each comes after the first points the
    /// page can take.
    dropped: u64,
}

impl Gathered {
    /// Room for `n` points, if the allocator grants it; else none, and the series
    /// grows as it is read. `n` comes from summaries, which another daemon's
    /// change log can set to anything.
    pub(crate) fn with_capacity(n: usize) -> Self {
        let mut g = Self::default();
        let granted = g.steps.try_reserve_exact(n).is_ok()
            && g.wallclocks.try_reserve_exact(n).is_ok()
            && g.values.try_reserve_exact(n).is_ok()
            && g.ingested.try_reserve_exact(n).is_ok();
        if granted { g } else { Self::default() }
    }

    pub(crate) fn len(&self) -> usize {
        self.steps.len()
    }

    /// Keeps the first `keep` points at or after step `from` in (step, ingest
    /// time, arrival) order, and counts those after them as dropped; points
    /// before `from` go uncounted. The points kept rank before every point let
    /// go, and a point gathered later ranks after a kept one it ties with, so
    /// pruning as points arrive keeps exactly the first `keep` of them all.
    pub(crate) fn prune(&mut self, from: i64, keep: usize) {
        self.sort();
        let lo = self.steps.partition_point(|&s| s < from);
        let hi = (lo + keep).min(self.steps.len());
        self.dropped += (self.steps.len() - hi) as u64;
        for column in [&mut self.steps, &mut self.wallclocks, &mut self.ingested] {
            column.truncate(hi);
            column.drain(..lo);
        }
        self.values.truncate(hi);
        self.values.drain(..lo);
        let (lo, hi) = (lo as u32, hi as u32);
        self.other.retain(|(i, _)| (lo..hi).contains(i));
        for (i, _) in &mut self.other {
            *i -= lo;
        }
    }

    fn push(&mut self, step: i64, wallclock: i64, value: f64, ingested: i64) {
        self.steps.push(step);
        self.wallclocks.push(wallclock);
        self.values.push(value);
        self.ingested.push(ingested);
    }

    fn push_other(&mut self, step: i64, wallclock: i64, value: MetricValue, ingested: i64) {
        self.other.push((self.steps.len() as u32, value));
        self.push(step, wallclock, f64::NAN, ingested);
    }

    /// The points' indices in (step, ingest time) order, `None` when they are in
    /// it already; among equals, arrival order (file order, then staged, then
    /// buffered). Files are sorted and mostly follow one another in step order, so
    /// the common case is one pass. Else, with `merge`, a stable sort, which
    /// merges the sorted runs each file contributed (fast, but its scratch space
    /// raised a 1M-point read's peak by about 20 MiB); without, an in-place sort.
    fn sorted_order(&self, merge: bool) -> Option<Vec<u32>> {
        let n = self.steps.len();
        if (0..n).is_sorted_by_key(|i| (self.steps[i], self.ingested[i])) {
            return None;
        }
        let mut order: Vec<u32> = (0..n as u32).collect();
        let key = |i: u32| (self.steps[i as usize], self.ingested[i as usize], i);
        match merge {
            true => order.sort_by_key(|&i| key(i)),
            false => order.sort_unstable_by_key(|&i| key(i)),
        }
        Some(order)
    }

    /// Puts the points in [`Self::sorted_order`], in place.
    fn sort(&mut self) {
        let Some(mut order) = self.sorted_order(true) else {
            return;
        };
        if !self.other.is_empty() {
            let mut new_index = vec![0u32; order.len()];
            for (to, &from) in order.iter().enumerate() {
                new_index[from as usize] = to as u32;
            }
            for (i, _) in &mut self.other {
                *i = new_index[*i as usize];
            }
            self.other.sort_unstable_by_key(|(i, _)| *i);
        }
        // Point `to` takes point `order[to]`: one cycle of the permutation at a
        // time, marking each place done as a fixed point.
        for start in 0..order.len() {
            if order[start] as usize == start {
                continue;
            }
            let held = self.point(start);
            let mut to = start;
            loop {
                let from = order[to] as usize;
                order[to] = to as u32;
                if from == start {
                    self.set_point(to, held);
                    break;
                }
                self.set_point(to, self.point(from));
                to = from;
            }
        }
    }

    fn point(&self, i: usize) -> (i64, i64, f64, i64) {
        (
            self.steps[i],
            self.wallclocks[i],
            self.values[i],
            self.ingested[i],
        )
    }

    fn set_point(&mut self, i: usize, (step, wallclock, value, ingested): (i64, i64, f64, i64)) {
        self.steps[i] = step;
        self.wallclocks[i] = wallclock;
        self.values[i] = value;
        self.ingested[i] = ingested;
    }

    fn value(&self, i: usize, other: &BTreeMap<u32, &MetricValue>) -> MetricValue {
        match other.get(&(i as u32)) {
            Some(v) => (*v).clone(),
            None => MetricValue::Double(self.values[i]),
        }
    }
}

fn schema_err(column: &str) -> QueryError {
    QueryError::Schema {
        path: String::new(),
        reason: format!("column {column} is missing or has the wrong type"),
    }
}

/// Adds a batch of one experiment's rows (filtered by step) to the per-key
/// gatherings of `out`, which holds one for each wanted key; rows of other keys
/// are skipped.
fn gather_batch(
    batch: &RecordBatch,
    out: &mut BTreeMap<String, Gathered>,
) -> Result<(), QueryError> {
    let col = |name: &str| batch.column_by_name(name).ok_or_else(|| schema_err(name));
    let keys = StrColumn::of(col("key")?).ok_or_else(|| schema_err("key"))?;
    let steps = IntColumn::of(col("step")?).ok_or_else(|| schema_err("step"))?;
    let wallclocks =
        IntColumn::of(col("wallclock_time")?).ok_or_else(|| schema_err("wallclock_time"))?;
    let doubles = col("value_double")?
        .as_primitive_opt::<Float64Type>()
        .ok_or_else(|| schema_err("value_double"))?;
    let ingested = col("ingested_at")?
        .as_primitive_opt::<TimestampMicrosecondType>()
        .ok_or_else(|| schema_err("ingested_at"))?;
    // Read even for a bucketed query: a series no longer than `max_points` comes
    // back exact, string and bytes values included.
    let strings = col("value_string")?
        .as_string_opt::<i32>()
        .ok_or_else(|| schema_err("value_string"))?;
    let bytes = col("value_bytes")?
        .as_binary_opt::<i32>()
        .ok_or_else(|| schema_err("value_bytes"))?;
    let n = batch.num_rows();
    // The usual batch: int64 steps and times, every value a double. Its runs are
    // copied as slices rather than row by row.
    let columns = match (steps.signed_values(), wallclocks.signed_values()) {
        (Some(s), Some(w)) if doubles.null_count() == 0 && ingested.null_count() == 0 => {
            Some((s, w, &doubles.values()[..], &ingested.values()[..]))
        }
        _ => None,
    };
    let mut start = 0;
    // Rows come in runs of one key (files are sorted): one lookup per run.
    while start < n {
        let key = keys.value(start);
        let end = keys.run_end(start, n);
        // `out` holds every wanted key: a run of another is skipped.
        let Some(g) = out.get_mut(key) else {
            start = end;
            continue;
        };
        if let Some((s, w, v, i)) = columns {
            g.steps.extend_from_slice(&s[start..end]);
            g.wallclocks.extend_from_slice(&w[start..end]);
            g.values.extend_from_slice(&v[start..end]);
            g.ingested.extend_from_slice(&i[start..end]);
            start = end;
            continue;
        }
        for row in start..end {
            let (step, wallclock, at) =
                (steps.value(row), wallclocks.value(row), ingested.value(row));
            if doubles.is_valid(row) {
                g.push(step, wallclock, doubles.value(row), at);
            } else if strings.is_valid(row) {
                g.push_other(
                    step,
                    wallclock,
                    MetricValue::String(strings.value(row).to_owned()),
                    at,
                );
            } else if bytes.is_valid(row) {
                g.push_other(
                    step,
                    wallclock,
                    MetricValue::Bytes(bytes.value(row).to_vec()),
                    at,
                );
            } else {
                g.push(step, wallclock, f64::NAN, at);
            }
        }
        start = end;
    }
    Ok(())
}

/// Adds a buffered chunk's rows of the wanted keys within the step range.
fn gather_chunk(
    chunk: &MetricChunk,
    keys: &[String],
    out: &mut BTreeMap<String, Gathered>,
    query: &SeriesQuery,
) {
    let b = &chunk.block;
    let wanted: Vec<bool> = b
        .keys
        .iter()
        .map(|k| keys.binary_search(k).is_ok())
        .collect();
    if !wanted.iter().any(|&w| w) {
        return;
    }
    let (lo, hi) = query.steps();
    for row in 0..b.len() {
        let k = b.key_index[row] as usize;
        let step = b.steps[row] as i64;
        if !wanted[k] || step < lo || step > hi {
            continue;
        }
        let g = out.entry(b.keys[k].clone()).or_default();
        let (wallclock, at) = (b.wallclocks[row] as i64, chunk.ingested_at(row));
        match chunk.value(row) {
            MetricValue::Double(v) => g.push(step, wallclock, v, at),
            other => g.push_other(step, wallclock, other, at),
        }
    }
}

/// About the bytes one point takes in a GetMetrics response.
const POINT_BYTES: usize = 32;
const BUCKET_EXTRA_BYTES: usize = 18;

/// Builds a page from series offered in key order.
#[derive(Debug)]
pub(crate) struct PageBuilder<'q> {
    query: &'q SeriesQuery,
    page: SeriesPage,
    points: usize,
    bytes: usize,
}

impl<'q> PageBuilder<'q> {
    pub(crate) fn new(query: &'q SeriesQuery) -> Self {
        Self {
            query,
            page: SeriesPage::default(),
            points: 0,
            bytes: 0,
        }
    }

    pub(crate) fn is_full(&self) -> bool {
        self.page.next.is_some()
            || self.points >= self.query.page_points
            || self.bytes >= self.query.page_bytes
    }

    /// The page stops before `key` (unless it stopped already).
    pub(crate) fn stop_at(&mut self, key: &str) {
        if self.page.next.is_none() {
            self.page.next = Some(Cursor {
                key: key.to_owned(),
                step: i64::MIN,
                skip: 0,
            });
        }
    }

    pub(crate) fn finish(self) -> SeriesPage {
        self.page
    }

    /// Adds as much of one series as the page takes.
    pub(crate) fn add(&mut self, key: &str, mut g: Gathered) {
        // A series to bucket is sorted in place and read as slices; one listed
        // point by point (whose page holds a copy of each point, so memory is
        // what counts) is read through its sorted order.
        let order = match self.query.max_points {
            Some(_) => {
                g.sort();
                None
            }
            None => g.sorted_order(false),
        };
        let at = |k: usize| order.as_ref().map_or(k, |o| o[k] as usize);
        let step_at = |k: usize| g.steps[at(k)];
        let n = g.steps.len();
        // Resume inside this series where the previous page stopped.
        let mut start = 0;
        let mut skipped_at_step = 0;
        if let Some(c) = &self.query.cursor
            && c.key == key
        {
            start = match &order {
                Some(o) => o.partition_point(|&i| g.steps[i as usize] < c.step),
                None => g.steps.partition_point(|&s| s < c.step),
            };
            let run = (start..n).take_while(|&k| step_at(k) == c.step).count();
            let skip = (c.skip as usize).min(run);
            start += skip;
            skipped_at_step = skip;
        }
        if start == n {
            return;
        }
        let other: BTreeMap<u32, &MetricValue> = g.other.iter().map(|(i, v)| (*i, v)).collect();
        let total = (n - start) as u64 + g.dropped;
        // A page resuming inside a series continues it as it began: exact (a
        // bucketed series is never split), even if points arrived since.
        let resumed_inside = self
            .query
            .cursor
            .as_ref()
            .is_some_and(|c| c.key == key && (c.step, c.skip) != (i64::MIN, 0));
        match self.query.max_points {
            Some(max) if n - start > max && !resumed_inside => {
                // No more buckets than one page's bytes hold (a bucketed series is
                // not split between pages), so a page fits a client's limit.
                let fit = (self.query.page_bytes / (POINT_BYTES + BUCKET_EXTRA_BYTES)).max(1);
                let out = bucketed(key, &g, start, max.min(fit), total);
                if self.points > 0
                    && (self.points + out.steps.len() > self.query.page_points
                        || self.bytes + out.steps.len() * (POINT_BYTES + BUCKET_EXTRA_BYTES)
                            > self.query.page_bytes)
                {
                    self.stop_at(key);
                    return;
                }
                self.points += out.steps.len();
                self.bytes += out.steps.len() * (POINT_BYTES + BUCKET_EXTRA_BYTES) + key.len();
                self.page.series.push(out);
            }
            _ => {
                let mut out = SeriesOut {
                    key: key.to_owned(),
                    bucketed: false,
                    total_points: total,
                    ..SeriesOut::default()
                };
                self.bytes += key.len() + 8;
                let mut end = start;
                // A page takes at least one point, whatever its budget, so paging
                // always moves on.
                while end < n
                    && (self.points == 0
                        || (self.points < self.query.page_points
                            && self.bytes < self.query.page_bytes))
                {
                    let i = at(end);
                    let value = g.value(i, &other);
                    self.bytes += POINT_BYTES
                        + match &value {
                            MetricValue::Double(_) => 0,
                            MetricValue::String(s) => s.len(),
                            MetricValue::Bytes(b) => b.len(),
                        };
                    out.steps.push(g.steps[i]);
                    out.wallclocks.push(g.wallclocks[i]);
                    out.values.push(value);
                    self.points += 1;
                    end += 1;
                }
                if end < n {
                    let next_step = step_at(end);
                    let taken = end - start;
                    let before = (start..end)
                        .rev()
                        .take_while(|&k| step_at(k) == next_step)
                        .count();
                    let carried = match &self.query.cursor {
                        Some(c) if c.key == key && c.step == next_step && before == taken => {
                            skipped_at_step
                        }
                        _ => 0,
                    };
                    self.page.next = Some(Cursor {
                        key: key.to_owned(),
                        step: next_step,
                        skip: (before + carried) as u64,
                    });
                }
                if !out.steps.is_empty() {
                    self.page.series.push(out);
                }
            }
        }
    }
}

/// A series (sorted) from point `start` on as at most `max` step buckets with
/// min, max and last value.
fn bucketed(key: &str, g: &Gathered, start: usize, max: usize, total: u64) -> SeriesOut {
    let (steps, values) = (&g.steps[start..], &g.values[start..]);
    let wallclocks = &g.wallclocks[start..];
    // Buckets of equal width from the first step, as docs/http-api.md defines
    // them: width = ceil((last - first + 1) / max).
    let lo = steps[0];
    let hi = steps[steps.len() - 1];
    let span = hi as i128 - lo as i128 + 1;
    let width = ((span + max as i128 - 1) / max as i128).max(1);
    let bucket_of = |step: i64| -> i128 { (step as i128 - lo as i128) / width };
    let mut out = SeriesOut {
        key: key.to_owned(),
        bucketed: true,
        total_points: total,
        ..SeriesOut::default()
    };
    // Each bucket is a run of points, its last point the bucket's last. f64::min
    // and max skip a NaN operand, so a bucket of NaNs keeps NaN bounds.
    let mut first = 0;
    while first < steps.len() {
        let end = lo as i128 + (bucket_of(steps[first]) + 1) * width;
        let n = steps[first..]
            .iter()
            .take_while(|&&s| (s as i128) < end)
            .count();
        let run = &values[first..first + n];
        let (min, max) = run.iter().fold((f64::NAN, f64::NAN), |(min, max), &v| {
            (min.min(v), max.max(v))
        });
        let last = first + n - 1;
        out.steps.push(steps[last]);
        out.wallclocks.push(wallclocks[last]);
        out.values.push(MetricValue::Double(values[last]));
        out.min.push(min);
        out.max.push(max);
        first += n;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gathered(points: &[(i64, f64, i64)]) -> Gathered {
        let mut g = Gathered::default();
        for &(s, v, at) in points {
            g.push(s, s * 10, v, at);
        }
        g
    }

    #[test]
    fn tokens_round_trip_any_key() {
        for key in ["loss", "a.b.c", "ünï/😀", ""] {
            let c = Cursor {
                key: key.into(),
                step: -3,
                skip: 7,
            };
            assert_eq!(Cursor::decode(&c.encode()).unwrap(), c);
        }
        for bad in ["", "s1", "s2.1.2.61", "s1.x.2.61", "s1.1.2.6", "s1.1.2.zz"] {
            assert!(Cursor::decode(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn pages_split_inside_runs_of_equal_steps_and_resume_exactly() {
        // Step 2 three times (ingested at 1, 2, 3), then steps 3 and 4.
        let points = [
            (2, 0.0, 1),
            (4, 4.0, 9),
            (2, 1.0, 2),
            (3, 3.0, 5),
            (2, 2.0, 3),
        ];
        let mut query = SeriesQuery::all(2, usize::MAX);
        let mut seen = Vec::new();
        loop {
            let mut page = PageBuilder::new(&query);
            page.add("k", gathered(&points));
            let page = page.finish();
            for s in &page.series {
                seen.extend(s.values.iter().cloned());
            }
            match page.next {
                Some(c) => query.cursor = Some(c),
                None => break,
            }
        }
        let want: Vec<_> = [0.0, 1.0, 2.0, 3.0, 4.0]
            .into_iter()
            .map(MetricValue::Double)
            .collect();
        assert_eq!(seen, want);
    }

    /// Pages read by pruning each source's points as they arrive (as a read of a
    /// long series does) hold the same points, in the same order, with the same
    /// totals, as pages cut from the whole series; ties in step and in ingest time,
    /// string values and points before the cursor included.
    #[test]
    fn pruned_reads_page_exactly_like_whole_ones() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        // Five sources (files, staged row groups, buffers) of 60 points each.
        let sources: Vec<Vec<(i64, i64, bool)>> = (0..5)
            .map(|_| {
                (0..60)
                    .map(|_| (next(80) as i64, next(4) as i64, next(10) == 0))
                    .collect()
            })
            .collect();
        let gather = |query: &SeriesQuery, prune: bool| {
            let mut out = BTreeMap::from([("k".to_owned(), Gathered::default())]);
            for (n, source) in sources.iter().enumerate() {
                let g = out.get_mut("k").unwrap();
                for (i, &(step, at, text)) in source.iter().enumerate() {
                    let (from, _) = query.steps();
                    if step < from {
                        continue;
                    }
                    let value = (n * 100 + i) as f64;
                    match text {
                        true => g.push_other(step, 0, MetricValue::String(value.to_string()), at),
                        false => g.push(step, 0, value, at),
                    }
                }
                if prune {
                    bound(&mut out, query);
                }
            }
            out.remove("k").unwrap()
        };
        for page_points in [1, 2, 3, 7, 50, 1000] {
            for start_step in [None, Some(30)] {
                let mut query = SeriesQuery::all(page_points, usize::MAX);
                query.start_step = start_step;
                let (mut pages, mut pruned_any) = (0, false);
                loop {
                    let pruned = gather(&query, true);
                    pruned_any |= pruned.dropped > 0;
                    let mut a = PageBuilder::new(&query);
                    a.add("k", pruned);
                    let mut b = PageBuilder::new(&query);
                    b.add("k", gather(&query, false));
                    let (a, b) = (a.finish(), b.finish());
                    assert_eq!(a, b, "page {pages} of {page_points}");
                    pages += 1;
                    match a.next {
                        Some(c) => query.cursor = Some(c),
                        None => break,
                    }
                }
                let total = match start_step {
                    None => 300,
                    Some(from) => sources.iter().flatten().filter(|p| p.0 >= from).count(),
                };
                assert_eq!(pages, total.div_ceil(page_points).max(1), "{page_points}");
                assert_eq!(pruned_any, 2 * (page_points + 1) < total, "{page_points}");
            }
        }
    }

    /// A point count the allocator cannot grant (summaries from another daemon's
    /// change log can say anything) reserves nothing rather than aborting.
    #[test]
    fn a_reservation_the_allocator_refuses_is_skipped() {
        let g = Gathered::with_capacity(1 << 61);
        assert_eq!((g.len(), g.steps.capacity()), (0, 0));
        assert!(Gathered::with_capacity(1000).steps.capacity() >= 1000);
    }

    /// A page budget smaller than one point still takes a point a page, so paging
    /// moves on.
    #[test]
    fn a_page_takes_a_point_whatever_its_byte_budget() {
        let points = [(1, 1.0, 1), (2, 2.0, 1), (2, 3.0, 2), (3, 4.0, 1)];
        let mut query = SeriesQuery::all(100, 1);
        let mut seen = Vec::new();
        loop {
            let mut page = PageBuilder::new(&query);
            page.add("a-long-key", gathered(&points));
            let page = page.finish();
            assert_eq!(page.series[0].steps.len(), 1);
            seen.extend(page.series[0].values.iter().cloned());
            match page.next {
                Some(c) => query.cursor = Some(c),
                None => break,
            }
        }
        let want: Vec<_> = [1.0, 2.0, 3.0, 4.0].map(MetricValue::Double).to_vec();
        assert_eq!(seen, want);
    }

    #[test]
    fn sorting_carries_every_column_and_the_string_values_along() {
        // Two sorted runs, as two files give them, interleaved in step.
        let mut g = Gathered::default();
        for (step, at) in [(1, 1), (3, 1), (5, 1), (0, 2), (3, 0), (4, 2)] {
            match step {
                4 => g.push_other(step, step * 10, MetricValue::String("four".into()), at),
                _ => g.push(step, step * 10, step as f64 + at as f64 / 10.0, at),
            }
        }
        g.sort();
        assert_eq!(g.steps, [0, 1, 3, 3, 4, 5]);
        assert_eq!(g.ingested, [2, 1, 0, 1, 2, 1]);
        assert_eq!(g.wallclocks, [0, 10, 30, 30, 40, 50]);
        assert_eq!(g.values[..4], [0.2, 1.1, 3.0, 3.1]);
        assert_eq!(g.values[5], 5.1);
        assert_eq!(g.other, [(4, MetricValue::String("four".into()))]);
    }

    #[test]
    fn a_buffered_series_within_max_points_keeps_its_string_and_bytes_values() {
        use crate::model::{ExperimentRef, MetricBlock, SparseColumn};
        let chunk = MetricChunk::new(
            MetricBlock {
                experiment: ExperimentRef {
                    id: "e".into(),
                    namespace: "ns".into(),
                },
                keys: vec!["k".into()],
                key_index: vec![0; 3],
                steps: vec![0, 1, 2],
                wallclocks: vec![0, 10, 20],
                values: vec![0.5, 0.0, 0.0],
                strings: SparseColumn {
                    rows: vec![1],
                    values: vec!["ok".into()],
                },
                bytes: SparseColumn {
                    rows: vec![2],
                    values: vec![vec![0, 255]],
                },
            },
            7,
        );
        let mut query = SeriesQuery::all(usize::MAX, usize::MAX);
        query.max_points = Some(3);
        let mut out = BTreeMap::from([("k".to_owned(), Gathered::default())]);
        gather_chunk(&chunk, &["k".into()], &mut out, &query);
        let mut page = PageBuilder::new(&query);
        page.add("k", out.remove("k").unwrap_or_default());
        let page = page.finish();
        assert_eq!(page.series.len(), 1);
        assert!(!page.series[0].bucketed);
        assert_eq!(
            page.series[0].values,
            [
                MetricValue::Double(0.5),
                MetricValue::String("ok".into()),
                MetricValue::Bytes(vec![0, 255]),
            ]
        );
    }

    #[test]
    fn a_bucketed_series_has_no_more_buckets_than_a_page_holds() {
        let points: Vec<(i64, f64, i64)> = (0..10_000).map(|s| (s, s as f64, s)).collect();
        let page_bytes = 100 * (POINT_BYTES + BUCKET_EXTRA_BYTES);
        let mut query = SeriesQuery::all(usize::MAX, page_bytes);
        query.max_points = Some(5_000);
        let mut page = PageBuilder::new(&query);
        page.add("k", gathered(&points));
        let page = page.finish();
        let s = &page.series[0];
        assert!(s.bucketed);
        assert_eq!(s.steps.len(), 100);
        assert_eq!(s.total_points, 10_000);
        assert_eq!(s.steps.last(), Some(&9_999));
        assert_eq!(page.next, None);
    }

    #[test]
    fn a_series_begun_exact_stays_exact_when_points_arrive_between_pages() {
        let points: Vec<(i64, f64, i64)> = (0..1_000).map(|s| (s, s as f64, s)).collect();
        let mut query = SeriesQuery::all(600, usize::MAX);
        query.max_points = Some(1_000);
        let mut page = PageBuilder::new(&query);
        page.add("k", gathered(&points));
        let first = page.finish();
        assert!(!first.series[0].bucketed);
        assert_eq!(first.series[0].steps.len(), 600);
        // 601 points arrive before the next page: 1,001 left, more than max_points.
        let more: Vec<(i64, f64, i64)> = (0..1_601).map(|s| (s, s as f64, s)).collect();
        query.cursor = first.next;
        let mut page = PageBuilder::new(&query);
        page.add("k", gathered(&more));
        let second = page.finish();
        assert!(!second.series[0].bucketed);
        assert_eq!(second.series[0].steps, (600..1_200).collect::<Vec<i64>>());
        assert!(second.next.is_some());
    }

    #[test]
    fn buckets_hold_min_max_and_last() {
        let points: Vec<(i64, f64, i64)> = (0..100).map(|s| (s, (s % 7) as f64, s)).collect();
        let mut query = SeriesQuery::all(usize::MAX, usize::MAX);
        query.max_points = Some(10);
        let mut page = PageBuilder::new(&query);
        page.add("k", gathered(&points));
        let s = &page.finish().series[0];
        assert!(s.bucketed);
        assert_eq!((s.steps.len(), s.total_points), (10, 100));
        for b in 0..10 {
            let range: Vec<_> = points[b * 10..b * 10 + 10].to_vec();
            let min = range.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
            let max = range.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
            assert_eq!((s.min[b], s.max[b]), (min, max), "bucket {b}");
            assert_eq!(s.steps[b], range[9].0);
            assert_eq!(s.values[b], MetricValue::Double(range[9].1));
        }
    }
}
