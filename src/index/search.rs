//! Run search over the catalog: secondary indexes kept with every change, and the
//! query that uses them.
//!
//! `search_entries`: (scope, field, value, created at, experiment id) → (). The
//! scope is a namespace, or `*` for every namespace (namespaces never contain `*`);
//! the value is an order-preserving encoding of a [`Value`], so a range scan walks
//! one field's values in order. Equal values are in creation order (then id): a new
//! experiment's entries go to the end of their value's run, so creating
//! experiments appends to the index, where keys ending in the (hashed) id put every
//! entry on a random page. Creation time and id are the experiment's own, so every
//! daemon and reader orders ties alike and a page token works on any of them.
//! Indexed: `created_at`, `updated_at`, `name` and `owner` in both scopes; top-level metadata values (`p:<key>`) and metric
//! summaries' last, min and max (`m:<key>:<aggregate>`) in the namespace scope.
//!
//! A search whose (single) sort key is indexed walks that index from the page
//! cursor and stops once a page matched; experiments without the sort value come
//! after the others (in creation order). Any other search walks its scope once,
//! keeping only the best page after the cursor. Ties in the sort order are broken
//! by creation time, then id, so pages are stable while experiments are added.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use redb::ReadableTable;
use serde::{Deserialize, Serialize};

use super::catalog::prefix_rows;
use super::{
    EXPERIMENTS, EXPERIMENTS_BY_NS, Index, IndexError, METADATA, MetadataEntry, SEARCH, SUMMARIES,
    decode, storage,
};
use crate::model::{ExperimentRecord, MetricSummary, Micros};
use crate::search::{Agg, Condition, Field, Op, OrderBy, Search, Value};

/// Every namespace.
pub const ALL: &str = "*";

/// The aggregates of a summary that are indexed.
const INDEXED_AGGS: [Agg; 3] = [Agg::Last, Agg::Min, Agg::Max];

/// An order-preserving byte encoding of a value.
fn encode_value(v: &Value) -> Vec<u8> {
    match v {
        Value::Null => vec![0],
        Value::Bool(b) => vec![1, u8::from(*b)],
        Value::Number(n) => {
            let bits = n.to_bits();
            // The same order as f64::total_cmp.
            let key = if bits >> 63 == 1 {
                !bits
            } else {
                bits ^ (1 << 63)
            };
            let mut out = vec![2];
            out.extend_from_slice(&key.to_be_bytes());
            out
        }
        Value::Text(s) => {
            let mut out = vec![3];
            out.extend_from_slice(s.as_bytes());
            out
        }
    }
}

pub(super) fn decode_value(b: &[u8]) -> Value {
    match b.split_first() {
        Some((1, rest)) => Value::Bool(rest.first() == Some(&1)),
        Some((2, rest)) => {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&rest[..8.min(rest.len())]);
            let key = u64::from_be_bytes(raw);
            let bits = if key >> 63 == 1 {
                key ^ (1 << 63)
            } else {
                !key
            };
            Value::Number(f64::from_bits(bits))
        }
        Some((3, rest)) => Value::Text(String::from_utf8_lossy(rest).into_owned()),
        _ => Value::Null,
    }
}

fn param_field(key: &str) -> String {
    format!("p:{key}")
}

fn metric_field(key: &str, agg: Agg) -> String {
    format!("m:{key}:{}", agg.name())
}

/// The index field of a search field, if it is indexed in `scope`.
fn index_field(field: &Field, scope: &str) -> Option<String> {
    match field {
        Field::CreatedAt => Some("created_at".into()),
        Field::UpdatedAt => Some("updated_at".into()),
        Field::Name => Some("name".into()),
        Field::Owner => Some("owner".into()),
        Field::Param(k) if scope != ALL && !k.contains('.') => Some(param_field(k)),
        Field::Metric(k, a) if scope != ALL && INDEXED_AGGS.contains(a) => {
            Some(metric_field(k, *a))
        }
        _ => None,
    }
}

fn millis(micros: i64) -> Value {
    Value::Number((micros / 1000) as f64)
}

/// The record's own indexed fields.
fn record_fields(r: &ExperimentRecord) -> [(&'static str, Value); 4] {
    [
        ("created_at", millis(r.created_at)),
        ("updated_at", millis(r.updated_at)),
        ("name", Value::Text(r.name.clone())),
        ("owner", Value::Text(r.owner.clone())),
    ]
}

/// The search table, opened by the caller once for all its changes.
pub(super) type SearchTable<'t> =
    redb::Table<'t, (&'static str, &'static str, &'static [u8], i64, &'static str), ()>;

/// What ends an experiment's entries, and breaks ties: creation time, then id.
type Tie<'a> = (Micros, &'a str);

/// Where an experiment's entries go: its namespace, creation time and id.
pub(super) type Placed<'a> = (&'a str, Micros, &'a str);

/// Re-indexes a record's own fields after it changed (`old`: before, if any).
pub(super) fn index_record(
    t: &mut SearchTable<'_>,
    old: Option<&ExperimentRecord>,
    new: &ExperimentRecord,
) -> Result<(), IndexError> {
    let mut updates = SearchUpdates::default();
    updates.record(old, new);
    updates.apply(t)
}

/// Re-indexes a metadata key after it changed.
pub(super) fn index_param(
    t: &mut SearchTable<'_>,
    placed: Placed<'_>,
    key: &str,
    old: Option<&serde_json::Value>,
    new: &serde_json::Value,
) -> Result<(), IndexError> {
    let mut updates = SearchUpdates::default();
    updates.param(placed, key, old, new);
    updates.apply(t)
}

fn summary_value(s: &MetricSummary, agg: Agg) -> Option<Value> {
    let v = match agg {
        Agg::Last => s.last,
        Agg::Min => s.min,
        Agg::Max => s.max,
        Agg::Count => return Some(Value::Number(s.count as f64)),
        Agg::LastStep => {
            return (s.count > 0).then_some(Value::Number(s.last_step as f64));
        }
    };
    (s.count > 0 && v.is_finite()).then_some(Value::Number(v))
}

/// A search-index entry's key, owned where it is built.
type EntryKey<'a> = (&'a str, String, Vec<u8>, Micros, &'a str);

/// Search-index changes of a transaction, applied in key order: each B-tree page
/// is then changed in one visit. In arrival order a merge of many summaries, or a
/// batch of creations, visits pages at random, and redb's write buffer (a tenth of
/// its cache) holds too few pages for a revisited one to still be there, so it is
/// read and written again.
///
/// Only an entry's last change counts: an entry added and then removed again (an
/// experiment created and updated in one batch) is never written.
#[derive(Debug, Default)]
pub(super) struct SearchUpdates<'a> {
    /// Changes in arrival order: `true` adds the entry, `false` removes it. Sorted
    /// once when applied (a map kept sorted on every change took a fifth of a
    /// summary fold's time).
    changes: Vec<(EntryKey<'a>, bool)>,
}

impl<'a> SearchUpdates<'a> {
    fn put(&mut self, key: EntryKey<'a>) {
        self.changes.push((key, true));
    }

    fn del(&mut self, key: EntryKey<'a>) {
        self.changes.push((key, false));
    }

    /// Re-indexes a record's own fields after it changed (`old`: before, if any),
    /// in its namespace and in every namespace's scope.
    pub(super) fn record(&mut self, old: Option<&'a ExperimentRecord>, new: &'a ExperimentRecord) {
        for scope in [new.namespace.as_str(), ALL] {
            if let Some(old) = old {
                for (field, v) in record_fields(old) {
                    self.del((
                        scope,
                        field.into(),
                        encode_value(&v),
                        old.created_at,
                        &old.id,
                    ));
                }
            }
            for (field, v) in record_fields(new) {
                self.put((
                    scope,
                    field.into(),
                    encode_value(&v),
                    new.created_at,
                    &new.id,
                ));
            }
        }
    }

    /// Re-indexes a metadata key after it changed.
    pub(super) fn param(
        &mut self,
        (namespace, created_at, id): Placed<'a>,
        key: &str,
        old: Option<&serde_json::Value>,
        new: &serde_json::Value,
    ) {
        let field = param_field(key);
        if let Some(old) = old {
            let v = encode_value(&Value::of_json(old));
            self.del((namespace, field.clone(), v, created_at, id));
        }
        let v = encode_value(&Value::of_json(new));
        self.put((namespace, field, v, created_at, id));
    }

    /// Re-indexes a metric summary after it changed.
    pub(super) fn summary(
        &mut self,
        (namespace, created_at, id): Placed<'a>,
        key: &str,
        old: Option<&MetricSummary>,
        new: &MetricSummary,
    ) {
        for agg in INDEXED_AGGS {
            let old = old.and_then(|o| summary_value(o, agg));
            let new = summary_value(new, agg);
            if old == new {
                continue;
            }
            let field = metric_field(key, agg);
            if let Some(v) = old {
                self.del((namespace, field.clone(), encode_value(&v), created_at, id));
            }
            if let Some(v) = new {
                self.put((namespace, field, encode_value(&v), created_at, id));
            }
        }
    }

    /// Moves a metadata value's entry to an experiment's new placement.
    pub(super) fn param_moved(
        &mut self,
        from: Placed<'a>,
        to: Placed<'a>,
        key: &str,
        value: &serde_json::Value,
    ) {
        self.moved(from, to, param_field(key), &Value::of_json(value));
    }

    /// Moves a summary's entries to an experiment's new placement.
    pub(super) fn summary_moved(
        &mut self,
        from: Placed<'a>,
        to: Placed<'a>,
        key: &str,
        s: &MetricSummary,
    ) {
        for agg in INDEXED_AGGS {
            if let Some(v) = summary_value(s, agg) {
                self.moved(from, to, metric_field(key, agg), &v);
            }
        }
    }

    fn moved(
        &mut self,
        (from_ns, from, id): Placed<'a>,
        (to_ns, to, _): Placed<'a>,
        field: String,
        v: &Value,
    ) {
        let value = encode_value(v);
        self.del((from_ns, field.clone(), value.clone(), from, id));
        self.put((to_ns, field, value, to, id));
    }

    /// Writes each entry's last change, in key order.
    pub(super) fn apply(mut self, t: &mut SearchTable<'_>) -> Result<(), IndexError> {
        // Stable: an entry's changes keep their order, and the last one counts.
        self.changes.sort_by(|a, b| a.0.cmp(&b.0));
        let last = self
            .changes
            .iter()
            .enumerate()
            .filter(|(i, (key, _))| self.changes.get(i + 1).is_none_or(|next| next.0 != *key));
        for (_, ((scope, field, value, created_at, id), add)) in last {
            let key = (*scope, field.as_str(), value.as_slice(), *created_at, *id);
            if *add {
                t.insert(key, ()).map_err(storage)?;
            } else {
                t.remove(key).map_err(storage)?;
            }
        }
        Ok(())
    }
}

/// Indexes an experiment with its metadata values and summaries, as a rebuild of
/// the search entries does ([`super::catalog::rebuild_listings`]).
pub(super) fn index_experiment(
    t: &mut SearchTable<'_>,
    metadata: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    summaries: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    r: &ExperimentRecord,
) -> Result<(), IndexError> {
    let at = (r.namespace.as_str(), r.created_at, r.id.as_str());
    let params: Vec<(String, MetadataEntry)> =
        prefix_rows(metadata, &r.id, |k, v| Ok((k.to_owned(), decode(k, v)?)))?;
    let summaries: Vec<(String, MetricSummary)> =
        prefix_rows(summaries, &r.id, |k, v| Ok((k.to_owned(), decode(k, v)?)))?;
    let mut updates = SearchUpdates::default();
    updates.record(None, r);
    for (key, e) in &params {
        updates.param(at, key, None, &e.value);
    }
    for (key, s) in &summaries {
        updates.summary(at, key, None, s);
    }
    updates.apply(t)
}

/// An experiment with its metadata and summaries.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentDetail {
    pub record: ExperimentRecord,
    pub metadata: Vec<(String, MetadataEntry)>,
    pub summaries: Vec<(String, MetricSummary)>,
}

/// Where a search page stopped: the last experiment's sort values, id and
/// creation time (which break ties; absent from tokens of earlier releases, then
/// looked up by id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchCursor {
    pub values: Vec<Value>,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_at: Option<Micros>,
}

impl SearchCursor {
    pub fn encode(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        let hex: String = json.iter().map(|b| format!("{b:02x}")).collect();
        format!("x1.{hex}")
    }

    pub fn decode(token: &str) -> Option<Self> {
        let hex = token.strip_prefix("x1.")?;
        if hex.len() % 2 != 0 {
            return None;
        }
        let bytes = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// A page of search results.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SearchPage {
    pub experiments: Vec<ExperimentDetail>,
    pub next: Option<SearchCursor>,
}

/// One candidate, loaded as far as the search needed.
struct Candidate<'t> {
    id: String,
    created_at: Micros,
    record: Option<ExperimentRecord>,
    metadata: Option<BTreeMap<String, MetadataEntry>>,
    summaries: Option<BTreeMap<String, MetricSummary>>,
    tables: &'t Tables,
}

struct Tables {
    experiments: redb::ReadOnlyTable<&'static str, &'static [u8]>,
    metadata: redb::ReadOnlyTable<(&'static str, &'static str), &'static [u8]>,
    summaries: redb::ReadOnlyTable<(&'static str, &'static str), &'static [u8]>,
}

fn prefix<T: for<'de> Deserialize<'de>>(
    table: &redb::ReadOnlyTable<(&'static str, &'static str), &'static [u8]>,
    id: &str,
) -> Result<BTreeMap<String, T>, IndexError> {
    // Rows come in key order, so collecting them builds the map in order.
    let rows = prefix_rows(table, id, |k, v| Ok((k.to_owned(), decode(k, v)?)))?;
    Ok(rows.into_iter().collect())
}

impl<'t> Candidate<'t> {
    fn new(id: String, created_at: Micros, tables: &'t Tables) -> Self {
        Self {
            id,
            created_at,
            record: None,
            metadata: None,
            summaries: None,
            tables,
        }
    }

    fn tie(&self) -> Tie<'_> {
        (self.created_at, &self.id)
    }

    fn record(&mut self) -> Result<Option<&ExperimentRecord>, IndexError> {
        if self.record.is_none() {
            self.record = match self
                .tables
                .experiments
                .get(self.id.as_str())
                .map_err(storage)?
            {
                Some(v) => Some(decode(&self.id, v.value())?),
                None => None,
            };
        }
        Ok(self.record.as_ref())
    }

    fn metadata(&mut self) -> Result<&BTreeMap<String, MetadataEntry>, IndexError> {
        if self.metadata.is_none() {
            self.metadata = Some(prefix(&self.tables.metadata, &self.id)?);
        }
        Ok(self.metadata.get_or_insert_default())
    }

    fn summaries(&mut self) -> Result<&BTreeMap<String, MetricSummary>, IndexError> {
        if self.summaries.is_none() {
            self.summaries = Some(prefix(&self.tables.summaries, &self.id)?);
        }
        Ok(self.summaries.get_or_insert_default())
    }

    /// The value of a field; `None` when the experiment does not have it.
    fn value(&mut self, field: &Field) -> Result<Option<Value>, IndexError> {
        let text = |s: &str| Some(Value::Text(s.to_owned()));
        Ok(match field {
            Field::Id => text(&self.id),
            Field::Param(key) => param_value(self.metadata()?, key),
            Field::Metric(key, agg) => self
                .summaries()?
                .get(key)
                .and_then(|s| summary_value(s, *agg)),
            _ => {
                let Some(r) = self.record()? else {
                    return Ok(None);
                };
                match field {
                    Field::Name => text(&r.name),
                    Field::Owner => text(&r.owner),
                    Field::Namespace => text(&r.namespace),
                    Field::Framework => text(framework_name(r.framework)),
                    Field::Task => text(&r.task),
                    Field::ExternalId => text(&r.external_id),
                    Field::CreatedAt => Some(millis(r.created_at)),
                    Field::UpdatedAt => Some(millis(r.updated_at)),
                    Field::Id | Field::Param(_) | Field::Metric(..) => None,
                }
            }
        })
    }

    /// Is the experiment in one of these namespaces (`None`: any)?
    fn visible(
        &mut self,
        visible: Option<&std::collections::BTreeSet<String>>,
    ) -> Result<bool, IndexError> {
        let Some(visible) = visible else {
            return Ok(true);
        };
        Ok(self
            .record()?
            .is_some_and(|r| visible.contains(&r.namespace)))
    }

    fn matches(&mut self, conditions: &[Condition]) -> Result<bool, IndexError> {
        for c in conditions {
            let have = self.value(&c.field)?;
            let holds = match &have {
                Some(v) => c.op.holds(v, &c.value),
                // A missing value equals null and differs from everything else.
                None => match c.op {
                    Op::Eq => c.value == Value::Null,
                    Op::Ne => c.value != Value::Null,
                    _ => false,
                },
            };
            if !holds {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn sort_values(&mut self, order: &[OrderBy]) -> Result<Vec<Value>, IndexError> {
        order
            .iter()
            .map(|o| Ok(self.value(&o.field)?.unwrap_or(Value::Null)))
            .collect()
    }

    fn detail(mut self) -> Result<Option<ExperimentDetail>, IndexError> {
        let Some(record) = self.record()?.cloned() else {
            return Ok(None);
        };
        let metadata = self.metadata()?.clone().into_iter().collect();
        let summaries = self.summaries()?.clone().into_iter().collect();
        Ok(Some(ExperimentDetail {
            record,
            metadata,
            summaries,
        }))
    }
}

/// The framework's name, as the `experiments/` table and the filter see it.
pub fn framework_name(framework: i32) -> &'static str {
    match framework {
        1 => "PYTORCH",
        2 => "KERAS",
        _ => "UNKNOWN",
    }
}

/// A metadata value by key; a dotted key reaches into nested objects when no key
/// has that exact name.
fn param_value(metadata: &BTreeMap<String, MetadataEntry>, key: &str) -> Option<Value> {
    if let Some(e) = metadata.get(key) {
        return Some(Value::of_json(&e.value));
    }
    let mut at = 0;
    while let Some(dot) = key[at..].find('.') {
        let (head, rest) = (&key[..at + dot], &key[at + dot + 1..]);
        if let Some(e) = metadata.get(head) {
            let mut v = &e.value;
            for part in rest.split('.') {
                v = v.get(part)?;
            }
            return Some(Value::of_json(v));
        }
        at += dot + 1;
    }
    None
}

/// Compares sort values under `order`; missing values (null) come last in either
/// direction; creation time, then id, breaks ties.
fn compare(order: &[OrderBy], a: (&[Value], Tie<'_>), b: (&[Value], Tie<'_>)) -> Ordering {
    // A token's values may be fewer than the sort keys: the missing compare as null.
    let null = Value::Null;
    for (i, o) in order.iter().enumerate() {
        let (x, y) = (a.0.get(i).unwrap_or(&null), b.0.get(i).unwrap_or(&null));
        let ord = match (x, y) {
            (Value::Null, Value::Null) => Ordering::Equal,
            (Value::Null, _) => Ordering::Greater,
            (_, Value::Null) => Ordering::Less,
            _ if o.descending => y.total_cmp(x),
            _ => x.total_cmp(y),
        };
        if ord.is_ne() {
            return ord;
        }
    }
    a.1.cmp(&b.1)
}

/// Whether, walking a sort field's values in order, a condition on that field can
/// no longer hold for any later value.
fn bound_passed(conditions: &[Condition], field: &Field, value: &Value, descending: bool) -> bool {
    conditions.iter().any(|c| {
        &c.field == field
            && match (c.op, descending) {
                (Op::Lt, false) => value.total_cmp(&c.value).is_ge(),
                (Op::Le | Op::Eq, false) => value.total_cmp(&c.value).is_gt(),
                (Op::Gt, true) => value.total_cmp(&c.value).is_le(),
                (Op::Ge | Op::Eq, true) => value.total_cmp(&c.value).is_lt(),
                _ => false,
            }
    })
}

/// Whether the conditions need the field to have a value.
fn requires_value(conditions: &[Condition], field: &Field) -> bool {
    conditions
        .iter()
        .any(|c| &c.field == field && !(c.op == Op::Eq && c.value == Value::Null) && c.op != Op::Ne)
}

impl Index {
    /// One page of experiments in `namespace` (or every namespace: `None`) that
    /// match `search`, in its order, after `cursor`.
    pub fn search(
        &self,
        namespace: Option<&str>,
        search: &Search,
        page_size: usize,
        cursor: Option<&SearchCursor>,
    ) -> Result<SearchPage, IndexError> {
        self.search_within(namespace, None, search, page_size, cursor)
    }

    /// [`Index::search`] among the experiments of `visible` namespaces only
    /// (`None`: every namespace), for a caller who may read only those: paging and
    /// order are as if the others did not exist.
    pub fn search_within(
        &self,
        namespace: Option<&str>,
        visible: Option<&std::collections::BTreeSet<String>>,
        search: &Search,
        page_size: usize,
        cursor: Option<&SearchCursor>,
    ) -> Result<SearchPage, IndexError> {
        let scope = namespace.unwrap_or(ALL);
        let read = self.db.begin_read().map_err(storage)?;
        let tables = Tables {
            experiments: read.open_table(EXPERIMENTS).map_err(storage)?,
            metadata: read.open_table(METADATA).map_err(storage)?,
            summaries: read.open_table(SUMMARIES).map_err(storage)?,
        };
        let order = search.order();
        let conditions = &search.conditions;
        let page_size = page_size.max(1);
        // Tokens of earlier releases carry no creation time: looked up by id.
        let cursor_created = match cursor {
            Some(c) => match c.created_at {
                Some(t) => t,
                None => tables
                    .experiments
                    .get(c.id.as_str())
                    .map_err(storage)?
                    .map(|v| decode::<ExperimentRecord>(&c.id, v.value()))
                    .transpose()?
                    .map_or(Micros::MIN, |r| r.created_at),
            },
            None => Micros::MIN,
        };
        let after = |values: &[Value], tie: Tie<'_>| {
            cursor.is_none_or(|c| {
                compare(&order, (values, tie), (&c.values, (cursor_created, &c.id))).is_gt()
            })
        };
        let mut found: Vec<(Vec<Value>, Candidate<'_>)> = Vec::new();
        let indexed = match order.as_slice() {
            [only] => index_field(&only.field, scope).map(|f| (f, only)),
            _ => None,
        };
        if let Some((field, sort)) = indexed {
            // Walk the sort index from the cursor; stop at a full page.
            let search_table = read.open_table(SEARCH).map_err(storage)?;
            let cursor_value = cursor.and_then(|c| c.values.first());
            if !matches!(cursor_value, Some(Value::Null)) {
                let from = cursor_value.map(encode_value);
                // From just above null (entries of explicit null values sort with
                // the missing ones, after the walk).
                let (low, high): (&[u8], &[u8]) = (&[1u8], &[0xffu8]);
                let lo = (scope, field.as_str(), low, Micros::MIN, "");
                let hi = (scope, field.as_str(), high, Micros::MIN, "");
                let mut past = from.clone().unwrap_or_default();
                past.push(0);
                let rows: Box<dyn Iterator<Item = _>> = match (&from, sort.descending) {
                    (Some(from), false) => Box::new(
                        search_table
                            .range((scope, field.as_str(), from.as_slice(), Micros::MIN, "")..hi)
                            .map_err(storage)?,
                    ),
                    (Some(_), true) => {
                        let end = (scope, field.as_str(), past.as_slice(), Micros::MIN, "");
                        Box::new(search_table.range(lo..end).map_err(storage)?.rev())
                    }
                    (None, false) => Box::new(search_table.range(lo..hi).map_err(storage)?),
                    (None, true) => Box::new(search_table.range(lo..hi).map_err(storage)?.rev()),
                };
                // Within one value the index holds experiments in creation order,
                // so a descending walk meets them backwards: once the page is full,
                // the rest of the last value's run is taken too, and the page sorted.
                let mut full_at: Option<Vec<u8>> = None;
                for row in rows {
                    let (k, _) = row.map_err(storage)?;
                    let (_, _, v, created_at, id) = k.value();
                    if full_at.as_deref().is_some_and(|f| f != v) {
                        break;
                    }
                    let values = vec![decode_value(v)];
                    if bound_passed(conditions, &sort.field, &values[0], sort.descending) {
                        break;
                    }
                    if !after(&values, (created_at, id)) {
                        continue;
                    }
                    let mut c = Candidate::new(id.to_owned(), created_at, &tables);
                    if !c.visible(visible)? || !c.matches(conditions)? {
                        continue;
                    }
                    // An entry whose value is no longer the experiment's is stale
                    // (an index written while stored numbers could read back one
                    // ULP off missed some deletes): the current entry places it.
                    // Checked after the filter, so only matches pay for the lookup.
                    let current = c.value(&sort.field)?;
                    if current.is_some_and(|now| now.total_cmp(&values[0]).is_eq()) {
                        found.push((values, c));
                        if found.len() > page_size && full_at.is_none() {
                            if !sort.descending {
                                break;
                            }
                            full_at = Some(v.to_vec());
                        }
                    }
                }
                found.sort_by(|(a, x), (b, y)| compare(&order, (a, x.tie()), (b, y.tie())));
            }
            // Then those without the sort value, in creation order.
            if found.len() <= page_size && !requires_value(conditions, &sort.field) {
                let from = cursor
                    .filter(|c| matches!(c.values.first(), Some(Value::Null)))
                    .map(|c| (cursor_created, c.id.as_str()));
                self.each_id(&read, scope, from, &mut |id, created_at| {
                    let mut c = Candidate::new(id.to_owned(), created_at, &tables);
                    let values = c.sort_values(&order)?;
                    if values[0] == Value::Null
                        && after(&values, (created_at, id))
                        && c.visible(visible)?
                        && c.matches(conditions)?
                    {
                        found.push((values, c));
                    }
                    Ok(found.len() <= page_size)
                })?;
            }
        } else {
            // Walk the whole scope, keeping the best page after the cursor.
            self.each_id(&read, scope, None, &mut |id, created_at| {
                let mut c = Candidate::new(id.to_owned(), created_at, &tables);
                if !c.visible(visible)? || !c.matches(conditions)? {
                    return Ok(true);
                }
                let values = c.sort_values(&order)?;
                if !after(&values, (created_at, id)) {
                    return Ok(true);
                }
                let at = found.partition_point(|(v, f)| {
                    compare(&order, (v, f.tie()), (&values, (created_at, id))).is_lt()
                });
                if at <= page_size {
                    found.insert(at, (values, c));
                    found.truncate(page_size + 1);
                }
                Ok(true)
            })?;
        }
        let more = found.len() > page_size;
        found.truncate(page_size);
        let next = match (more, found.last()) {
            (true, Some((values, c))) => Some(SearchCursor {
                values: values.clone(),
                id: c.id.clone(),
                created_at: Some(c.created_at),
            }),
            _ => None,
        };
        let mut experiments = Vec::with_capacity(found.len());
        for (_, c) in found {
            if let Some(d) = c.detail()? {
                experiments.push(d);
            }
        }
        Ok(SearchPage { experiments, next })
    }

    /// Calls `f` with each experiment (id, creation time) of a scope, in creation
    /// order, after `from`, until it answers false.
    fn each_id(
        &self,
        read: &redb::ReadTransaction,
        scope: &str,
        from: Option<Tie<'_>>,
        f: &mut dyn FnMut(&str, Micros) -> Result<bool, IndexError>,
    ) -> Result<(), IndexError> {
        let (start, start_id) = from.unwrap_or((Micros::MIN, ""));
        let table = read.open_table(EXPERIMENTS_BY_NS).map_err(storage)?;
        for row in table.range((scope, start, start_id)..).map_err(storage)? {
            let (k, _) = row.map_err(storage)?;
            let (ns, created_at, id) = k.value();
            if ns != scope {
                break;
            }
            if from.is_some_and(|f| f == (created_at, id)) {
                continue;
            }
            if !f(id, created_at)? {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_encoding_preserves_order() {
        let mut values = vec![
            Value::Number(-1e300),
            Value::Number(-1.5),
            Value::Number(-0.0),
            Value::Number(0.0),
            Value::Number(3e-4),
            Value::Number(7.0),
            Value::Number(f64::INFINITY),
            Value::Text("".into()),
            Value::Text("a".into()),
            Value::Text("ab".into()),
            Value::Text("b".into()),
            Value::Null,
            Value::Bool(false),
            Value::Bool(true),
        ];
        values.sort_by(|a, b| a.total_cmp(b));
        let encoded: Vec<_> = values.iter().map(encode_value).collect();
        assert!(encoded.windows(2).all(|w| w[0] <= w[1]));
        for v in &values {
            assert_eq!(decode_value(&encode_value(v)).total_cmp(v), Ordering::Equal);
        }
    }

    #[test]
    fn a_sorted_walk_skips_stale_entries() {
        use crate::index::tests::new_exp;
        use crate::search::parse_order_by;
        let index = Index::open_in_memory().unwrap();
        let mut ids = Vec::new();
        for lr in [1, 2, 3] {
            let (rec, _) = index
                .create_experiment(
                    new_exp(&format!("e{lr}")),
                    &[("lr".into(), serde_json::json!(lr))],
                )
                .unwrap();
            ids.push(rec);
        }
        // What a missed delete left behind: e1 still indexed at its old lr = 10.
        let txn = index.db.begin_write().unwrap();
        {
            let mut t = txn.open_table(SEARCH).unwrap();
            let e1 = &ids[0];
            let mut stale = SearchUpdates::default();
            stale.put((
                "cv",
                param_field("lr"),
                encode_value(&Value::Number(10.0)),
                e1.created_at,
                &e1.id,
            ));
            stale.apply(&mut t).unwrap();
        }
        txn.commit().unwrap();
        for (filter, order, want) in [
            ("", "params.lr DESC", ["e3", "e2", "e1"]),
            ("", "params.lr", ["e1", "e2", "e3"]),
            ("params.lr >= 1", "params.lr DESC", ["e3", "e2", "e1"]),
            ("params.lr < 20", "params.lr", ["e1", "e2", "e3"]),
        ] {
            let s = Search {
                conditions: crate::search::parse_filter(filter).unwrap(),
                order_by: vec![parse_order_by(order).unwrap()],
            };
            for page_size in [1, 2, 10] {
                let mut names = Vec::new();
                let mut cursor = None;
                loop {
                    let page = index
                        .search(Some("cv"), &s, page_size, cursor.as_ref())
                        .unwrap();
                    names.extend(page.experiments.into_iter().map(|d| d.record.name));
                    match page.next {
                        Some(next) => cursor = Some(next),
                        None => break,
                    }
                }
                assert_eq!(names, want, "{filter} / {order}, pages of {page_size}");
            }
        }
    }

    #[test]
    fn cursors_round_trip() {
        let c = SearchCursor {
            values: vec![Value::Number(0.5), Value::Text("x\"y".into()), Value::Null],
            id: "abc".into(),
            created_at: Some(7),
        };
        assert_eq!(SearchCursor::decode(&c.encode()), Some(c));
        assert_eq!(SearchCursor::decode("nonsense"), None);
    }

    #[test]
    fn params_reach_into_nested_objects() {
        let md: BTreeMap<String, MetadataEntry> = [
            (
                "hyperparams".to_owned(),
                MetadataEntry {
                    value: serde_json::json!({"lr": 0.1, "opt": {"name": "adam"}}),
                    updated_at: 0,
                },
            ),
            (
                "a.b".to_owned(),
                MetadataEntry {
                    value: serde_json::json!(1),
                    updated_at: 0,
                },
            ),
        ]
        .into_iter()
        .collect();
        assert_eq!(param_value(&md, "hyperparams.lr"), Some(Value::Number(0.1)));
        assert_eq!(
            param_value(&md, "hyperparams.opt.name"),
            Some(Value::Text("adam".into()))
        );
        assert_eq!(param_value(&md, "a.b"), Some(Value::Number(1.0)));
        assert_eq!(param_value(&md, "hyperparams.nope"), None);
    }
}
