//! Tracing set-up and Prometheus metrics.
//!
//! [`Metrics`] holds the metric handles; it is created once by the server and passed
//! to each component that updates it (no global registry). Names follow Prometheus
//! conventions: `mboxd_` prefix, units in names, `_total` on counters, and only
//! low-cardinality labels (never an experiment id).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Call once, from `main`.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Why a request was refused, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reason {
    invalid_argument,
    not_found,
    resource_exhausted,
    unavailable,
    internal,
    /// No token, or one that is not configured.
    unauthenticated,
    /// A token outside its scope or namespaces.
    permission_denied,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::invalid_argument,
        Reason::not_found,
        Reason::resource_exhausted,
        Reason::unavailable,
        Reason::internal,
        Reason::unauthenticated,
        Reason::permission_denied,
    ];

    pub fn of(code: tonic::Code) -> Self {
        match code {
            tonic::Code::InvalidArgument => Reason::invalid_argument,
            tonic::Code::NotFound => Reason::not_found,
            tonic::Code::ResourceExhausted => Reason::resource_exhausted,
            tonic::Code::Unavailable => Reason::unavailable,
            tonic::Code::Unauthenticated => Reason::unauthenticated,
            tonic::Code::PermissionDenied => Reason::permission_denied,
            _ => Reason::internal,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: Reason,
}

/// The tables mboxd publishes, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum TableName {
    metrics,
    events,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: TableName,
}

/// The objects of a change log, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ChangeLogKind {
    log,
    checkpoint,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ChangeLogLabel {
    pub kind: ChangeLogKind,
}

/// An object-store request, as a metric label.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StoreOp {
    get,
    head,
    put,
    list,
    delete,
    copy,
    rename,
}

/// Which part of the root a request touched: the change logs under `_mboxd/`, or
/// anything else (the data and catalog tables).
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum StoreArea {
    changelog,
    data,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabel {
    pub op: StoreOp,
    pub area: StoreArea,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

/// Handles on every metric mboxd exports. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Metrics {
    pub points_accepted: Counter,
    pub points_rejected: Family<ReasonLabel, Counter>,
    pub events_accepted: Counter,
    pub events_rejected: Family<ReasonLabel, Counter>,
    pub received_bytes: Counter,
    /// gRPC and HTTP API requests refused by authentication (unauthenticated) or
    /// authorization (permission_denied).
    pub requests_refused: Family<ReasonLabel, Counter>,
    /// Writes refused before they were read, the memory budget being full.
    pub writes_refused_unread: Counter,
    pub queue_pushes: Counter,
    pub queue_pops: Counter,
    pub buffered_bytes: Gauge,
    pub files_published: Family<TableLabel, Counter>,
    pub published_bytes: Family<TableLabel, Counter>,
    pub published_rows: Family<TableLabel, Counter>,
    pub publish_seconds: Histogram,
    pub wal_appends: Counter,
    pub wal_fsync_seconds: Histogram,
    /// Accepted writes (LogMetrics, LogEvent; not a retry's duplicate), from the
    /// handler's start (the message decoded) to the acknowledgement.
    pub ack_seconds: Histogram,
    pub uploads: Counter,
    pub uploaded_bytes: Counter,
    pub upload_errors: Counter,
    pub upload_retries: Counter,
    pub upload_seconds: Histogram,
    pub spool_bytes: Gauge,
    pub spool_files: Gauge,
    pub summaries_pending_files: Gauge,
    pub wal_bytes: Gauge,
    pub compactions: Counter,
    pub compacted_files: Counter,
    pub compaction_seconds: Histogram,
    pub expired_files: Counter,
    /// Change-log objects a writer wrote, by kind, and the changes in them.
    pub changelog_objects: Family<ChangeLogLabel, Counter>,
    pub changelog_changes: Counter,
    /// Object-store requests (counted where the store is wrapped: a reader's).
    pub store_requests: Family<StoreLabel, Counter>,
    /// Daemons a reader follows, and the change-log objects it applied.
    pub reader_daemons: Gauge,
    pub reader_log_objects: Counter,
    /// Reads of a published file's metadata from the cache, from the file, and
    /// the bytes the cache holds.
    pub metadata_cache_hits: Counter,
    pub metadata_cache_misses: Counter,
    pub metadata_cache_bytes: Gauge,
    /// How far the catalog clock is ahead of the wall clock (see
    /// [`crate::index::Index::catalog_clock_lead`]).
    pub catalog_clock_lead_seconds: Gauge<f64, AtomicU64>,
    registry: Arc<Registry>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            points_accepted: Counter::default(),
            points_rejected: Family::default(),
            events_accepted: Counter::default(),
            events_rejected: Family::default(),
            received_bytes: Counter::default(),
            requests_refused: Family::default(),
            writes_refused_unread: Counter::default(),
            queue_pushes: Counter::default(),
            queue_pops: Counter::default(),
            buffered_bytes: Gauge::default(),
            files_published: Family::default(),
            published_bytes: Family::default(),
            published_rows: Family::default(),
            publish_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            wal_appends: Counter::default(),
            wal_fsync_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            ack_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            uploads: Counter::default(),
            uploaded_bytes: Counter::default(),
            upload_errors: Counter::default(),
            upload_retries: Counter::default(),
            upload_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            spool_bytes: Gauge::default(),
            spool_files: Gauge::default(),
            summaries_pending_files: Gauge::default(),
            wal_bytes: Gauge::default(),
            compactions: Counter::default(),
            compacted_files: Counter::default(),
            compaction_seconds: Histogram::new(exponential_buckets(0.01, 2.0, 16)),
            expired_files: Counter::default(),
            changelog_objects: Family::default(),
            changelog_changes: Counter::default(),
            store_requests: Family::default(),
            reader_daemons: Gauge::default(),
            reader_log_objects: Counter::default(),
            metadata_cache_hits: Counter::default(),
            metadata_cache_misses: Counter::default(),
            metadata_cache_bytes: Gauge::default(),
            catalog_clock_lead_seconds: Gauge::default(),
            registry: Arc::new(Registry::default()),
        };
        let mut r = Registry::with_prefix("mboxd");
        r.register(
            "points_accepted",
            "Metric points accepted (acknowledged)",
            m.points_accepted.clone(),
        );
        r.register(
            "points_rejected",
            "Metric points in refused requests, by reason",
            m.points_rejected.clone(),
        );
        r.register(
            "events_accepted",
            "Events accepted (acknowledged)",
            m.events_accepted.clone(),
        );
        r.register(
            "events_rejected",
            "Events in refused requests, by reason",
            m.events_rejected.clone(),
        );
        r.register(
            "received_bytes",
            "gRPC request body bytes received",
            m.received_bytes.clone(),
        );
        r.register(
            "requests_refused",
            "gRPC and HTTP API requests refused for want of a valid token \
             (unauthenticated) or of its permission (permission_denied)",
            m.requests_refused.clone(),
        );
        r.register(
            "writes_refused_unread",
            "LogMetrics and LogEvent requests refused RESOURCE_EXHAUSTED before being \
             read, the memory budget having no room for a write of recent size \
             (points_rejected counts only those refused after decoding)",
            m.writes_refused_unread.clone(),
        );
        r.register(
            "queue_pushes",
            "Batches pushed onto writer queues",
            m.queue_pushes.clone(),
        );
        r.register(
            "queue_pops",
            "Batches taken off writer queues",
            m.queue_pops.clone(),
        );
        r.register(
            "buffered_bytes",
            "Bytes held in queues and writer buffers",
            m.buffered_bytes.clone(),
        );
        r.register(
            "files_published",
            "Parquet files published",
            m.files_published.clone(),
        );
        r.register(
            "published_bytes",
            "Bytes of Parquet published",
            m.published_bytes.clone(),
        );
        r.register(
            "published_rows",
            "Rows published to Parquet",
            m.published_rows.clone(),
        );
        r.register(
            "publish_duration_seconds",
            "Time to encode and publish one Parquet file",
            m.publish_seconds.clone(),
        );
        r.register(
            "wal_appends",
            "Records appended to the write-ahead log",
            m.wal_appends.clone(),
        );
        r.register(
            "wal_fsync_duration_seconds",
            "Time of one write-ahead log group commit's fdatasync",
            m.wal_fsync_seconds.clone(),
        );
        r.register(
            "ingest_ack_duration_seconds",
            "Time from an accepted write request's handler starting (its message decoded) to its acknowledgement: validation, the memory budget's wait, the durability mode's commit (a retry's duplicate is not counted)",
            m.ack_seconds.clone(),
        );
        r.register(
            "uploads",
            "Files uploaded to the remote store (S3 roots)",
            m.uploads.clone(),
        );
        r.register(
            "uploaded_bytes",
            "Bytes uploaded to the remote store",
            m.uploaded_bytes.clone(),
        );
        r.register(
            "upload_errors",
            "Upload attempts that failed (each is retried)",
            m.upload_errors.clone(),
        );
        r.register(
            "upload_retries",
            "Upload attempts after a failed one",
            m.upload_retries.clone(),
        );
        r.register(
            "upload_duration_seconds",
            "Time of one successful upload",
            m.upload_seconds.clone(),
        );
        r.register(
            "spool_bytes",
            "Bytes of finished files waiting in the spool for upload",
            m.spool_bytes.clone(),
        );
        r.register(
            "spool_files",
            "Finished files waiting in the spool for upload",
            m.spool_files.clone(),
        );
        r.register(
            "summaries_pending_files",
            "Published files whose metric summaries wait to be folded into search",
            m.summaries_pending_files.clone(),
        );
        r.register(
            "wal_bytes",
            "Bytes of write-ahead log on disk",
            m.wal_bytes.clone(),
        );
        r.register(
            "compactions",
            "Compactions done (one partition's files merged)",
            m.compactions.clone(),
        );
        r.register(
            "compacted_files",
            "Files merged away by compaction",
            m.compacted_files.clone(),
        );
        r.register(
            "compaction_duration_seconds",
            "Time of one compaction",
            m.compaction_seconds.clone(),
        );
        r.register(
            "expired_files",
            "Files deleted by retention",
            m.expired_files.clone(),
        );
        r.register(
            "changelog_objects",
            "Change-log objects written to the storage root, by kind",
            m.changelog_objects.clone(),
        );
        r.register(
            "changelog_changes",
            "Changes (index transactions) shipped in change-log objects",
            m.changelog_changes.clone(),
        );
        r.register(
            "store_requests",
            "Object-store requests of a reader, by operation and by area \
             (changelog: under _mboxd/; data: anything else)",
            m.store_requests.clone(),
        );
        r.register(
            "reader_daemons",
            "Daemons whose change log a reader follows",
            m.reader_daemons.clone(),
        );
        r.register(
            "reader_log_objects",
            "Change-log objects (checkpoints and logs) a reader applied",
            m.reader_log_objects.clone(),
        );
        r.register(
            "read_metadata_cache_hits",
            "File footers (with page indexes) a read took from the metadata cache",
            m.metadata_cache_hits.clone(),
        );
        r.register(
            "read_metadata_cache_misses",
            "File footers (with page indexes) a read loaded from the file",
            m.metadata_cache_misses.clone(),
        );
        r.register(
            "read_metadata_cache_bytes",
            "Bytes of parsed file metadata the metadata cache holds",
            m.metadata_cache_bytes.clone(),
        );
        r.register(
            "catalog_clock_lead_seconds",
            "How far the catalog clock (the time of a daemon's catalog writes) is ahead of \
             the wall clock: above zero after the wall clock went back, until it catches up \
             (0 on a fleet reader, which stamps no catalog writes)",
            m.catalog_clock_lead_seconds.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        r.register("build_info", "Build information; always 1", build);
        Self {
            registry: Arc::new(r),
            ..m
        }
    }

    /// The metrics in the Prometheus text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// (points, events, files, metric rows) published or accepted so far.
///
/// `Family::get_or_create` returns a read guard; holding one while creating another
/// label deadlocks (the second call needs the write lock). So every read is its own
/// statement, and its guard is gone before the next.
fn summary_totals(m: &Metrics) -> (u64, u64, u64, u64) {
    let metrics_table = TableLabel {
        table: TableName::metrics,
    };
    let events_table = TableLabel {
        table: TableName::events,
    };
    let metric_files = m.files_published.get_or_create(&metrics_table).get();
    let event_files = m.files_published.get_or_create(&events_table).get();
    let rows = m.published_rows.get_or_create(&metrics_table).get();
    (
        m.points_accepted.get(),
        m.events_accepted.get(),
        metric_files + event_files,
        rows,
    )
}

/// Logs an info line every `interval` with what happened since the last one.
pub async fn log_summaries(
    metrics: Metrics,
    interval: std::time::Duration,
    buffered: impl Fn() -> usize,
) {
    if interval.is_zero() {
        return;
    }
    let mut last = summary_totals(&metrics);
    let mut tick = tokio::time::interval(interval);
    tick.tick().await;
    loop {
        tick.tick().await;
        let now = summary_totals(&metrics);
        tracing::info!(
            points = now.0 - last.0,
            events = now.1 - last.1,
            files = now.2 - last.2,
            rows_published = now.3 - last.3,
            buffered_bytes = buffered(),
            interval_s = interval.as_secs(),
            "summary"
        );
        last = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_totals_do_not_deadlock_on_fresh_label_families() {
        let m = Metrics::new();
        m.points_accepted.inc_by(3);
        let (tx, rx) = std::sync::mpsc::channel();
        let probe = m.clone();
        std::thread::spawn(move || {
            let _ = tx.send(summary_totals(&probe));
        });
        let totals = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("summary_totals deadlocked");
        assert_eq!(totals, (3, 0, 0, 0));
        // And families stay usable afterwards (no guard left behind).
        m.files_published
            .get_or_create(&TableLabel {
                table: TableName::events,
            })
            .inc();
        assert_eq!(summary_totals(&m).2, 1);
    }
}
