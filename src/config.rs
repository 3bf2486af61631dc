//! Configuration in two layers: [`FileConfig`] mirrors `config/mboxd.toml` (serde,
//! unknown keys rejected) and is overridden by CLI flags and `MBOXD_*` environment
//! variables; [`Config`] is the typed domain configuration the rest of the daemon uses.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Errors reading or checking configuration.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing config file {path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid setting {key}: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// The HTTP/2 connection flow-control window mboxd grants: what one connection can
/// send before mboxd reads it, so a term of the memory bound.
pub const CONNECTION_WINDOW_BYTES: u32 = 512 << 10;

/// A secret (a token): never printed by `Debug`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// When acknowledgements are sent, relative to making a batch durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Durability {
    /// Acknowledge once the batch is in the bounded in-memory queue. Survives a
    /// graceful shutdown (the queues are drained), not a crash. The fastest mode.
    Memory,
    /// Acknowledge once the batch is written to the write-ahead log. Survives a
    /// process crash, not a power loss.
    WalWrite,
    /// Acknowledge once the batch is written to the write-ahead log and fsynced
    /// (group-committed). Survives a crash and a power loss. The default.
    WalFsync,
}

/// What a request does when the memory budget or a queue is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Wait up to the given time for room, then answer RESOURCE_EXHAUSTED.
    Wait(Duration),
    /// Answer RESOURCE_EXHAUSTED at once.
    Reject,
}

/// Validation limits applied to every request.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest accepted gRPC message, in bytes.
    pub max_message_bytes: usize,
    /// Most metric points in one LogMetrics request.
    pub max_points_per_request: usize,
    /// Most events in one LogEvent request.
    pub max_events_per_request: usize,
    /// Longest metric key, metadata key, event name or source name, in bytes.
    pub max_key_bytes: usize,
    /// Largest string or bytes metric value, in bytes.
    pub max_value_bytes: usize,
    /// Largest metadata map (as JSON) on one request or event, in bytes.
    pub max_metadata_bytes: usize,
    /// Longest experiment name, owner, namespace or external id, in bytes.
    pub max_name_bytes: usize,
}

impl Limits {
    /// No limits: for records replayed from the write-ahead log, which were valid when
    /// accepted even if the limits have been lowered since.
    pub fn unbounded() -> Self {
        Self {
            max_message_bytes: usize::MAX,
            max_points_per_request: usize::MAX,
            max_events_per_request: usize::MAX,
            max_key_bytes: usize::MAX,
            max_value_bytes: usize::MAX,
            max_metadata_bytes: usize::MAX,
            max_name_bytes: usize::MAX,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_bytes: 4 << 20,
            max_points_per_request: 1_000_000,
            max_events_per_request: 10_000,
            max_key_bytes: 256,
            max_value_bytes: 1 << 20,
            max_metadata_bytes: 256 << 10,
            max_name_bytes: 256,
        }
    }
}

/// How a partition's rows become row groups and files.
#[derive(Debug, Clone)]
pub struct RollPolicy {
    /// Publish a partition's file once it holds this many rows.
    pub max_rows: usize,
    /// Publish a partition's file once it is this large (encoded bytes).
    pub max_bytes: usize,
    /// Publish a partition's file once its oldest row is this old.
    pub max_age: Duration,
    /// Publish a partition's file once it holds this many series (experiment,
    /// key): what a publication carries per series (summaries, the experiment
    /// index) is held in memory until it is committed.
    pub max_series: usize,
    /// Rows a partition buffers before encoding them as a row group.
    pub row_group_rows: usize,
    /// Bytes a partition buffers before encoding them as a row group.
    pub row_group_bytes: usize,
    /// zstd level for Parquet pages.
    pub zstd_level: i32,
}

impl Default for RollPolicy {
    fn default() -> Self {
        Self {
            max_rows: 4_000_000,
            max_bytes: 128 << 20,
            max_age: Duration::from_secs(5),
            max_series: 64 * 1024,
            row_group_rows: 128 * 1024,
            row_group_bytes: 16 << 20,
            zstd_level: 1,
        }
    }
}

/// Background compaction and retention ([`crate::compact`]).
#[derive(Debug, Clone)]
pub struct Compaction {
    pub enabled: bool,
    /// Time between passes.
    pub interval: Duration,
    /// Compacted files grow to about this size.
    pub target_file_bytes: u64,
    /// Files of about the same size merged at once in a partition still being
    /// written (closed partitions are merged whole).
    pub min_files: usize,
    /// Rows per row group of a compacted file; row groups follow experiment
    /// boundaries, so small experiments share one and large ones span several.
    pub row_group_rows: usize,
    /// Partitions older than this many days are deleted (0: kept forever).
    pub retention_days: u32,
    /// Per-namespace retention, overriding `retention_days`.
    pub retention_by_namespace: std::collections::BTreeMap<String, u32>,
}

impl Default for Compaction {
    fn default() -> Self {
        Self {
            enabled: true,
            interval: Duration::from_secs(60),
            target_file_bytes: 256 << 20,
            min_files: 8,
            row_group_rows: 256 * 1024,
            retention_days: 0,
            retention_by_namespace: std::collections::BTreeMap::new(),
        }
    }
}

impl Compaction {
    /// The retention of a namespace, in days (0: forever).
    pub fn retention_days_of(&self, namespace: &str) -> u32 {
        self.retention_by_namespace
            .get(namespace)
            .copied()
            .unwrap_or(self.retention_days)
    }
}

/// The read path's limits.
#[derive(Debug, Clone)]
pub struct Reads {
    /// Series reads served at once; more wait.
    pub max_concurrent: usize,
    /// Points one read gathers at once (a longer single series is read whole).
    pub read_points: usize,
    /// A GetMetrics page that asks for no size is cut at about this many bytes, so
    /// it fits a standard 4 MiB client limit.
    pub default_page_bytes: usize,
    /// The largest page a client may ask for.
    pub max_page_bytes: usize,
    /// Parsed footers (with page indexes) of published files kept between reads,
    /// in bytes: a repeated read neither re-reads nor, on S3, re-fetches them.
    pub metadata_cache_bytes: usize,
}

impl Default for Reads {
    fn default() -> Self {
        Self {
            max_concurrent: 2,
            read_points: 256 * 1024,
            default_page_bytes: 3 << 20,
            max_page_bytes: 64 << 20,
            metadata_cache_bytes: 2 << 20,
        }
    }
}

/// The change log a writer ships into the storage root for readers
/// ([`crate::changelog`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeLog {
    /// `None`: on for S3 roots (where daemons share a root), off for the data
    /// folder.
    pub enabled: Option<bool>,
    pub ship: crate::changelog::ship::ShipSettings,
}

/// The reader role (`mboxd serve --reader`): serves every daemon's data from the
/// shared root and accepts no writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reader {
    pub enabled: bool,
    /// How often each daemon's change log is checked for new objects.
    pub poll_interval: Duration,
}

impl Default for Reader {
    fn default() -> Self {
        Self {
            enabled: false,
            poll_interval: Duration::from_millis(1000),
        }
    }
}

/// TLS on the gRPC and HTTP listeners ([`crate::tls`]): PEM files, re-read when
/// they change on disk, so a rotated certificate is served without a restart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// The server's certificate chain, leaf first.
    pub cert_file: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// CA certificates for mutual TLS: gRPC clients must present a certificate
    /// signed by one of them. On the HTTP listener a client certificate is optional
    /// (probes, Prometheus and browsers have none), but one presented must verify.
    pub client_ca_file: Option<PathBuf>,
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Experiments, metadata, metrics and events: every ModelStore read and the
    /// HTTP JSON API.
    Read,
    /// CreateExperiment, UpdateMetadata, LogMetrics and LogEvent.
    Write,
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Scope::Read => "read",
            Scope::Write => "write",
        })
    }
}

/// The namespaces a token reaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Namespaces {
    /// `"*"`: every namespace, including ones created later.
    All,
    /// These namespaces only.
    Only(std::collections::BTreeSet<String>),
}

impl Namespaces {
    pub fn contains(&self, namespace: &str) -> bool {
        match self {
            Namespaces::All => true,
            Namespaces::Only(set) => set.contains(namespace),
        }
    }
}

/// Where a token's value comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenValue {
    /// Written in the config file.
    Inline(Secret),
    /// Read from this file (a mounted Secret) at start-up, surrounding whitespace
    /// removed.
    File(PathBuf),
}

/// One `[[auth.tokens]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// A name for logs and `mboxd config`; never the token itself.
    pub name: String,
    pub value: TokenValue,
    pub scopes: std::collections::BTreeSet<Scope>,
    pub namespaces: Namespaces,
}

/// Token authentication ([`crate::auth`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    /// Without it every gRPC client may do everything (ModelBox has no
    /// authentication), and the HTTP JSON API serves loopback clients only.
    pub enabled: bool,
    /// Loopback clients without a token may do everything: a trainer beside a
    /// sidecar, and ModelBox clients that cannot send a token. A loopback client
    /// that sends a token is held to that token.
    pub allow_unauthenticated_loopback: bool,
    pub tokens: Vec<TokenConfig>,
    /// A TOML file of further `[[tokens]]` entries (the same keys as
    /// `[[auth.tokens]]`), such as a mounted Secret, read at start-up.
    pub tokens_file: Option<PathBuf>,
}

impl Default for Auth {
    fn default() -> Self {
        Self {
            enabled: false,
            allow_unauthenticated_loopback: true,
            tokens: Vec::new(),
            tokens_file: None,
        }
    }
}

/// Where published Parquet files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageRoot {
    /// The data folder itself: `metrics/` and `events/` beside the index.
    DataDir,
    /// An S3 (or S3-compatible) bucket and key prefix. Files are finished in
    /// `<data_dir>/spool` first and uploaded from there.
    S3 { bucket: String, prefix: String },
}

impl StorageRoot {
    /// Parses `""` (the data folder) or `s3://bucket[/prefix]`.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let invalid = |reason: &str| ConfigError::Invalid {
            key: "storage.root",
            reason: format!("{text:?}: {reason}"),
        };
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::DataDir);
        }
        let Some(rest) = text.strip_prefix("s3://") else {
            return Err(invalid(
                "use \"\" for the data folder or s3://bucket/prefix",
            ));
        };
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(invalid("the bucket name is missing"));
        }
        let prefix = prefix.trim_matches('/');
        if prefix
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
            && !prefix.is_empty()
        {
            return Err(invalid("the prefix has an empty, '.' or '..' segment"));
        }
        Ok(Self::S3 {
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
        })
    }
}

/// S3 connection settings from the config file. What they leave unset comes from
/// the standard AWS environment variables (`AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT_URL`,
/// `AWS_ALLOW_HTTP`, proxies, web identity, ...); see [`crate::sink::s3`] for how
/// the two are layered.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// Custom endpoint for S3-compatible stores (MinIO, Ceph, s3s), e.g.
    /// `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// A static key pair; both or neither (see [`Config::validate`]).
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allow plain `http://` endpoints (local testing). Only `true` is a setting:
    /// `false` is the documented default and leaves `AWS_ALLOW_HTTP` in charge.
    pub allow_http: bool,
    /// Virtual-hosted-style requests (`bucket.host/key`) instead of path-style
    /// (`host/bucket/key`, which S3-compatible stores expect). As with
    /// `allow_http`, `false` leaves `AWS_VIRTUAL_HOSTED_STYLE_REQUEST` in charge.
    pub virtual_hosted_style: bool,
    /// Retries of one request inside object_store before an upload attempt fails.
    pub max_retries: usize,
    /// Longest time object_store keeps retrying one request.
    pub retry_timeout: Duration,
    /// Time limit of one HTTP request. `None`: `AWS_TIMEOUT`, else
    /// [`S3Options::DEFAULT_REQUEST_TIMEOUT`].
    pub request_timeout: Option<Duration>,
}

impl S3Options {
    /// The request time limit when neither the file nor `AWS_TIMEOUT` sets one.
    pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<redacted>"),
            )
            .field("allow_http", &self.allow_http)
            .field("virtual_hosted_style", &self.virtual_hosted_style)
            .field("max_retries", &self.max_retries)
            .field("retry_timeout", &self.retry_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// Storage root and, for S3, the spool and upload settings.
#[derive(Debug, Clone)]
pub struct Storage {
    pub root: StorageRoot,
    pub s3: S3Options,
    /// Bytes of finished files waiting in the spool for upload before ingest pushes
    /// back (RESOURCE_EXHAUSTED, as when the memory budget is full).
    pub spool_max_bytes: u64,
    /// Files uploaded at once.
    pub upload_concurrency: usize,
    /// Files at least this large are uploaded in parts.
    pub multipart_threshold_bytes: u64,
    /// Size of one part of a multipart upload (S3's minimum is 5 MiB).
    pub multipart_part_bytes: usize,
    /// Longest wait between attempts to upload a file while the store fails.
    pub max_upload_backoff: Duration,
}

impl Storage {
    /// Parts of one multipart upload in flight at once.
    pub const PARTS_IN_FLIGHT: usize = 2;

    /// The most memory one upload holds: a whole file below the multipart
    /// threshold, else the parts in flight plus the one being read.
    pub fn upload_buffer_bytes(&self) -> u64 {
        self.multipart_threshold_bytes
            .max((Self::PARTS_IN_FLIGHT as u64 + 1) * self.multipart_part_bytes as u64)
    }
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            root: StorageRoot::DataDir,
            s3: S3Options {
                max_retries: 3,
                retry_timeout: Duration::from_secs(30),
                ..S3Options::default()
            },
            spool_max_bytes: 10 << 30,
            upload_concurrency: 4,
            multipart_threshold_bytes: 16 << 20,
            multipart_part_bytes: 8 << 20,
            max_upload_backoff: Duration::from_secs(30),
        }
    }
}

/// The daemon's typed configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Folder for the index, the daemon id and (for now) the Parquet tables.
    pub data_dir: PathBuf,
    /// Name unique to this daemon, part of every file name. `None`: the host name
    /// plus a random suffix, generated once and kept in the data folder.
    pub daemon_id: Option<String>,
    /// Acknowledgement policy.
    pub durability: Durability,
    /// Size at which the write-ahead log starts a new segment.
    pub wal_segment_bytes: u64,
    /// Upper bound on bytes held in queues and writer buffers.
    pub max_buffered_bytes: usize,
    /// Policy when the budget or a queue is full.
    pub when_full: WhenFull,
    /// Writer threads (batches go to them in turn); 0: one per available core.
    pub writer_threads: usize,
    /// How long client batch ids are remembered to recognise retries.
    pub batch_id_window: Duration,
    /// Most client batch ids remembered at once.
    pub batch_ids_max: usize,
    /// Requests being received or served at once, across all connections; more wait
    /// unread, at most a second, then are answered RESOURCE_EXHAUSTED. Bounds the
    /// memory of request bodies to this times max_message_bytes.
    pub max_concurrent_requests: usize,
    /// Client connections open at once; more wait in the listen backlog. Each may
    /// hold a connection window of unread request bytes.
    pub max_connections: usize,
    /// How long memory freed inside the allocator (mimalloc) stays there for reuse
    /// before it goes back to the system (set at start-up, over
    /// `MIMALLOC_PURGE_DELAY`). mimalloc's own default, a second, held some 30 MiB
    /// more at peak than 300 ms for no more throughput; zero keeps the resident
    /// size nearest what is in use, at a CPU cost under heavy load (the sidecar
    /// preset's choice).
    pub allocator_purge_delay: Duration,
    /// Roll policy for metric and event files.
    pub roll: RollPolicy,
    /// Request limits.
    pub limits: Limits,
    /// How long a graceful shutdown may take before it is forced.
    pub shutdown_timeout: Duration,
    /// On shutdown, how long gRPC health reports NOT_SERVING while requests are
    /// still served, so load balancers and probes stop routing here first.
    pub not_serving_grace: Duration,
    /// Log format.
    pub log_format: LogFormat,
    /// Address of the HTTP listener (Prometheus `/metrics`, the web view and its
    /// JSON API); `None` turns it off.
    pub http_listen: Option<SocketAddr>,
    /// TLS on both listeners; `None`: plain text.
    pub tls: Option<Tls>,
    /// Who may do what, on both listeners.
    pub auth: Auth,
    /// How often an info-level summary line is logged; zero turns it off.
    pub log_summary_interval: Duration,
    /// Where Parquet files are published.
    pub storage: Storage,
    /// Compaction and retention.
    pub compaction: Compaction,
    /// The read path's limits.
    pub reads: Reads,
    /// The change log shipped for readers.
    pub change_log: ChangeLog,
    /// The reader role.
    pub reader: Reader,
    /// The clock that decides ingest times (the system clock; shifted in
    /// benchmarks and tests).
    pub clock: crate::model::Clock,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8085)),
            data_dir: PathBuf::from("./mbox-data"),
            daemon_id: None,
            durability: Durability::WalFsync,
            wal_segment_bytes: 64 << 20,
            max_buffered_bytes: 48 << 20,
            when_full: WhenFull::Wait(Duration::from_millis(25)),
            writer_threads: 0,
            batch_id_window: Duration::from_secs(600),
            batch_ids_max: 100_000,
            max_concurrent_requests: 0,
            max_connections: 64,
            allocator_purge_delay: Duration::from_millis(300),
            roll: RollPolicy::default(),
            limits: Limits::default(),
            shutdown_timeout: Duration::from_secs(30),
            not_serving_grace: Duration::from_millis(1000),
            log_format: LogFormat::Text,
            http_listen: Some(SocketAddr::from(([127, 0, 0, 1], 9185))),
            tls: None,
            auth: Auth::default(),
            log_summary_interval: Duration::from_secs(60),
            storage: Storage::default(),
            compaction: Compaction::default(),
            reads: Reads::default(),
            change_log: ChangeLog::default(),
            reader: Reader::default(),
            clock: crate::model::Clock::system(),
        }
    }
}

/// Cores this process may run on (its affinity and cgroup quota), at least one.
pub fn available_cores() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

impl Config {
    /// Writer threads to run: as configured, or one per available core.
    pub fn writer_threads(&self) -> usize {
        match self.writer_threads {
            0 => available_cores(),
            n => n,
        }
    }

    /// A configuration for tests: everything under `data_dir`, a loopback port chosen
    /// by the caller's listener, and quick rolls.
    pub fn test_config(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            daemon_id: Some("test-daemon".to_owned()),
            not_serving_grace: Duration::ZERO,
            http_listen: None,
            roll: RollPolicy {
                max_age: Duration::from_millis(300),
                ..RollPolicy::default()
            },
            ..Self::default()
        }
    }

    /// Loads `path` (if given) over the defaults.
    pub fn from_file(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = Self::default();
        if let Some(path) = path {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            let file: FileConfig = toml::from_str(&text).map_err(|source| ConfigError::Parse {
                path: path.to_owned(),
                source,
            })?;
            file.apply(&mut config)?;
        }
        Ok(config)
    }

    /// Whether this daemon ships a change log for readers: as configured, else
    /// on for S3 roots.
    pub fn change_log_enabled(&self) -> bool {
        self.change_log
            .enabled
            .unwrap_or(matches!(self.storage.root, StorageRoot::S3 { .. }))
    }

    /// Requests received or served at once: as configured, or two per core (at
    /// least four).
    pub fn concurrent_requests(&self) -> usize {
        match self.max_concurrent_requests {
            0 => (2 * self.writer_threads()).max(4),
            n => n,
        }
    }

    /// The most memory mboxd uses under these settings, as documented in
    /// `config/mboxd.toml`; `mboxd config` prints it. The terms:
    /// - rows waiting in queues and writer buffers (the memory budget);
    /// - requests being accepted, each about three times its size (body, decoded
    ///   arrays, WAL record);
    /// - request bytes received but not yet read (a connection window each);
    /// - each writer's row-group working set (sorting and encoding);
    /// - compaction's row group, and the reads served at once;
    /// - remembered client batch ids;
    /// - uploads in flight (S3 roots);
    /// - runtime, allocator and encoder overhead, and the index's 16 MiB cache.
    pub fn memory_bound_bytes(&self) -> u64 {
        const OVERHEAD: u64 = 48 << 20;
        let uploads = match self.storage.root {
            StorageRoot::DataDir => 0,
            StorageRoot::S3 { .. } => {
                self.storage.upload_concurrency as u64 * self.storage.upload_buffer_bytes()
            }
        };
        let compaction = if self.compaction.enabled {
            self.compaction.row_group_rows as u64 * 128
        } else {
            0
        };
        self.max_buffered_bytes as u64
            + self.concurrent_requests() as u64 * 3 * self.limits.max_message_bytes as u64
            + self.max_connections as u64 * u64::from(CONNECTION_WINDOW_BYTES)
            + self.writer_threads() as u64 * self.roll.row_group_rows as u64 * 64
            + compaction
            + self.reads.max_concurrent as u64 * self.reads.read_points as u64 * 32
            + self.reads.metadata_cache_bytes as u64
            + self.batch_ids_max as u64 * 128
            + uploads
            + OVERHEAD
    }

    /// Checks settings that depend on each other.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: &str| {
            Err(ConfigError::Invalid {
                key,
                reason: reason.to_owned(),
            })
        };
        if self.batch_ids_max == 0 {
            return invalid("ingest.batch_ids_max", "must be at least 1");
        }
        if self.compaction.min_files < 2 {
            return invalid("compaction.min_files", "must be at least 2");
        }
        if self.compaction.row_group_rows == 0 || self.compaction.target_file_bytes == 0 {
            return invalid("compaction.row_group_rows", "sizes must be at least 1");
        }
        if self.reads.max_concurrent == 0 || self.reads.read_points == 0 {
            return invalid("reads.max_concurrent", "must be at least 1");
        }
        if self.reads.default_page_bytes == 0
            || self.reads.default_page_bytes > self.reads.max_page_bytes
        {
            return invalid(
                "reads.default_page_bytes",
                "must be at least 1 and at most reads.max_page_bytes",
            );
        }
        if self.wal_segment_bytes < 1 << 20 {
            return invalid("wal.segment_bytes", "must be at least 1 MiB");
        }
        if self.max_connections == 0 {
            return invalid("server.max_connections", "must be at least 1");
        }
        if self.roll.max_rows == 0 || self.roll.row_group_rows == 0 {
            return invalid("writer.max_rows", "row counts must be at least 1");
        }
        if self.roll.max_series == 0 {
            return invalid("writer.max_series", "must be at least 1");
        }
        if !(1..=22).contains(&self.roll.zstd_level) {
            return invalid("writer.zstd_level", "must be between 1 and 22");
        }
        if self.reader.poll_interval.is_zero() || self.reader.poll_interval > MAX_POLL_INTERVAL {
            return invalid("reader.poll_interval_ms", "must be between 1 and 60000");
        }
        let ship = &self.change_log.ship;
        if ship.interval.is_zero()
            || ship.max_changes_per_object == 0
            || ship.checkpoint_min_objects == 0
            || ship.checkpoint_min_objects > ship.checkpoint_max_objects
        {
            return invalid(
                "changelog",
                "ship_interval_ms and the checkpoint counts must be at least 1, \
                 and checkpoint_min_objects at most checkpoint_max_objects",
            );
        }
        if self.storage.upload_concurrency == 0 {
            return invalid("storage.upload_concurrency", "must be at least 1");
        }
        if self.storage.multipart_part_bytes < 5 << 20 {
            return invalid(
                "storage.multipart_part_bytes",
                "must be at least 5 MiB (S3's smallest part)",
            );
        }
        let s3 = &self.storage.s3;
        if s3.access_key_id.is_some() != s3.secret_access_key.is_some() {
            // Half a key pair from the file and half from the environment would be
            // two identities mixed; say so instead of failing every upload.
            return invalid(
                "storage.s3.access_key_id",
                "set it together with storage.s3.secret_access_key, or neither to use the AWS environment",
            );
        }
        self.validate_auth()?;
        if self.max_buffered_bytes < self.limits.max_message_bytes {
            return invalid(
                "ingest.max_buffered_bytes",
                "must be at least limits.max_message_bytes, or a maximal request could never be accepted",
            );
        }
        Ok(())
    }
}

impl Config {
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.enabled
            && auth.tokens.is_empty()
            && auth.tokens_file.is_none()
            && !auth.allow_unauthenticated_loopback
        {
            return Err(ConfigError::Invalid {
                key: "auth.tokens",
                reason: "auth is enabled with no tokens and no loopback exemption, so no client \
                         could get in: add [[auth.tokens]] or auth.tokens_file"
                    .to_owned(),
            });
        }
        Ok(())
    }
}

/// The longest poll interval a reader accepts.
const MAX_POLL_INTERVAL: Duration = Duration::from_secs(60);

/// Parses a tokens file (`[[tokens]]` entries with the keys of `[[auth.tokens]]`).
/// `path` names the file in errors and default token names.
pub fn parse_tokens_file(path: &Path, text: &str) -> Result<Vec<TokenConfig>, ConfigError> {
    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct TokensFile {
        #[serde(default)]
        tokens: Vec<TokenEntry>,
    }
    let file: TokensFile = toml::from_str(text).map_err(|source| ConfigError::Parse {
        path: path.to_owned(),
        source,
    })?;
    file.tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| t.into_config(&format!("{}[{i}]", path.display())))
        .collect()
}

/// `config/mboxd.toml` as written; every field optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    server: ServerSection,
    #[serde(default)]
    ingest: IngestSection,
    #[serde(default)]
    writer: WriterSection,
    #[serde(default)]
    limits: LimitsSection,
    #[serde(default)]
    wal: WalSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    http: HttpSection,
    #[serde(default)]
    log: LogSection,
    #[serde(default)]
    storage: StorageSection,
    #[serde(default)]
    compaction: CompactionSection,
    #[serde(default)]
    reads: ReadsSection,
    #[serde(default)]
    tls: TlsSection,
    #[serde(default)]
    auth: AuthSection,
    #[serde(default)]
    changelog: ChangeLogSection,
    #[serde(default)]
    reader: ReaderSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ChangeLogSection {
    enabled: Option<bool>,
    ship_interval_ms: Option<u64>,
    max_changes_per_object: Option<usize>,
    checkpoint_min_objects: Option<u64>,
    checkpoint_max_objects: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReaderSection {
    enabled: Option<bool>,
    poll_interval_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSection {
    cert_file: Option<String>,
    key_file: Option<String>,
    client_ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthSection {
    enabled: Option<bool>,
    allow_unauthenticated_loopback: Option<bool>,
    tokens_file: Option<String>,
    #[serde(default)]
    tokens: Vec<TokenEntry>,
}

/// A `[[auth.tokens]]` (or tokens file `[[tokens]]`) entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    name: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    #[serde(default)]
    scopes: Vec<Scope>,
    #[serde(default)]
    namespaces: Vec<String>,
}

impl TokenEntry {
    /// Checks the entry; `at` names it in errors and is its default name.
    fn into_config(self, at: &str) -> Result<TokenConfig, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            key: "auth.tokens",
            reason: format!("{at}: {reason}"),
        };
        let value = match (self.token, self.token_file) {
            (Some(t), None) if !t.0.trim().is_empty() => {
                TokenValue::Inline(Secret(t.0.trim().to_owned()))
            }
            (Some(_), None) => return Err(invalid("token is empty".into())),
            (None, Some(path)) => TokenValue::File(path),
            (Some(_), Some(_)) => return Err(invalid("set token or token_file, not both".into())),
            (None, None) => return Err(invalid("token or token_file is required".into())),
        };
        if self.scopes.is_empty() {
            return Err(invalid(
                "scopes is required: [\"write\"], [\"read\"] or both".into(),
            ));
        }
        if self.namespaces.is_empty() {
            return Err(invalid(
                "namespaces is required: names, or [\"*\"] for every namespace".into(),
            ));
        }
        let namespaces = if self.namespaces.iter().any(|n| n == "*") {
            Namespaces::All
        } else {
            for ns in &self.namespaces {
                if !crate::paths::valid_namespace(ns, 256) {
                    return Err(invalid(format!(
                        "{ns:?} is not a namespace ([A-Za-z0-9._-]) or \"*\""
                    )));
                }
            }
            Namespaces::Only(self.namespaces.into_iter().collect())
        };
        Ok(TokenConfig {
            name: self.name.unwrap_or_else(|| at.to_owned()),
            value,
            scopes: self.scopes.into_iter().collect(),
            namespaces,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerSection {
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    daemon_id: Option<String>,
    shutdown_timeout_ms: Option<u64>,
    not_serving_grace_ms: Option<u64>,
    max_connections: Option<usize>,
    allocator_purge_delay_ms: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct IngestSection {
    durability: Option<Durability>,
    max_buffered_bytes: Option<usize>,
    when_full: Option<WhenFullName>,
    full_wait_ms: Option<u64>,
    writer_threads: Option<usize>,
    max_concurrent_requests: Option<usize>,
    batch_id_window_s: Option<u64>,
    batch_ids_max: Option<usize>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
enum WhenFullName {
    Wait,
    Reject,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WriterSection {
    max_rows: Option<usize>,
    max_bytes: Option<usize>,
    max_age_ms: Option<u64>,
    max_series: Option<usize>,
    row_group_rows: Option<usize>,
    row_group_bytes: Option<usize>,
    zstd_level: Option<i32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CompactionSection {
    enabled: Option<bool>,
    interval_s: Option<u64>,
    target_file_bytes: Option<u64>,
    min_files: Option<usize>,
    row_group_rows: Option<usize>,
    retention_days: Option<u32>,
    #[serde(default)]
    retention_days_by_namespace: std::collections::BTreeMap<String, u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadsSection {
    max_concurrent: Option<usize>,
    read_points: Option<usize>,
    default_page_bytes: Option<usize>,
    max_page_bytes: Option<usize>,
    metadata_cache_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsSection {
    max_message_bytes: Option<usize>,
    max_points_per_request: Option<usize>,
    max_events_per_request: Option<usize>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_metadata_bytes: Option<usize>,
    max_name_bytes: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    enabled: Option<bool>,
    listen: Option<SocketAddr>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSection {
    listen: Option<SocketAddr>,
    /// Replaced by `[auth]`; kept only to say so.
    token: Option<Secret>,
    token_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WalSection {
    segment_bytes: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LogSection {
    format: Option<LogFormat>,
    summary_interval_s: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StorageSection {
    root: Option<String>,
    spool_max_bytes: Option<u64>,
    upload_concurrency: Option<usize>,
    multipart_threshold_bytes: Option<u64>,
    multipart_part_bytes: Option<usize>,
    max_upload_backoff_ms: Option<u64>,
    #[serde(default)]
    s3: S3Section,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct S3Section {
    endpoint: Option<String>,
    region: Option<String>,
    access_key_id: Option<String>,
    secret_access_key: Option<String>,
    allow_http: Option<bool>,
    virtual_hosted_style: Option<bool>,
    max_retries: Option<usize>,
    retry_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
}

/// An empty string in the file means "not set" (so the example file can show
/// every key).
fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|v| !v.trim().is_empty())
}

fn set<T>(slot: &mut T, value: Option<T>) {
    if let Some(value) = value {
        *slot = value;
    }
}

impl FileConfig {
    fn apply(self, c: &mut Config) -> Result<(), ConfigError> {
        set(&mut c.listen, self.server.listen);
        set(&mut c.data_dir, self.server.data_dir);
        set(&mut c.daemon_id, self.server.daemon_id.map(Some));
        set(
            &mut c.shutdown_timeout,
            self.server.shutdown_timeout_ms.map(Duration::from_millis),
        );
        set(
            &mut c.not_serving_grace,
            self.server.not_serving_grace_ms.map(Duration::from_millis),
        );
        set(&mut c.max_connections, self.server.max_connections);
        set(
            &mut c.allocator_purge_delay,
            self.server
                .allocator_purge_delay_ms
                .map(Duration::from_millis),
        );
        set(&mut c.durability, self.ingest.durability);
        set(&mut c.max_buffered_bytes, self.ingest.max_buffered_bytes);
        set(&mut c.writer_threads, self.ingest.writer_threads);
        set(
            &mut c.batch_id_window,
            self.ingest.batch_id_window_s.map(Duration::from_secs),
        );
        set(&mut c.batch_ids_max, self.ingest.batch_ids_max);
        set(
            &mut c.max_concurrent_requests,
            self.ingest.max_concurrent_requests,
        );
        let wait = match c.when_full {
            WhenFull::Wait(d) => d,
            WhenFull::Reject => Duration::from_millis(500),
        };
        let wait = self.ingest.full_wait_ms.map_or(wait, Duration::from_millis);
        c.when_full = match self.ingest.when_full {
            Some(WhenFullName::Reject) => WhenFull::Reject,
            Some(WhenFullName::Wait) | None => WhenFull::Wait(wait),
        };
        let w = self.writer;
        set(&mut c.roll.max_rows, w.max_rows);
        set(&mut c.roll.max_bytes, w.max_bytes);
        set(&mut c.roll.max_age, w.max_age_ms.map(Duration::from_millis));
        set(&mut c.roll.max_series, w.max_series);
        set(&mut c.roll.row_group_rows, w.row_group_rows);
        set(&mut c.roll.row_group_bytes, w.row_group_bytes);
        let cp = self.compaction;
        set(&mut c.compaction.enabled, cp.enabled);
        set(
            &mut c.compaction.interval,
            cp.interval_s.map(Duration::from_secs),
        );
        set(&mut c.compaction.target_file_bytes, cp.target_file_bytes);
        set(&mut c.compaction.min_files, cp.min_files);
        set(&mut c.compaction.row_group_rows, cp.row_group_rows);
        set(&mut c.compaction.retention_days, cp.retention_days);
        for (ns, days) in cp.retention_days_by_namespace {
            c.compaction.retention_by_namespace.insert(ns, days);
        }
        let cl = self.changelog;
        set(&mut c.change_log.enabled, cl.enabled.map(Some));
        set(
            &mut c.change_log.ship.interval,
            cl.ship_interval_ms.map(Duration::from_millis),
        );
        set(
            &mut c.change_log.ship.max_changes_per_object,
            cl.max_changes_per_object,
        );
        set(
            &mut c.change_log.ship.checkpoint_min_objects,
            cl.checkpoint_min_objects,
        );
        set(
            &mut c.change_log.ship.checkpoint_max_objects,
            cl.checkpoint_max_objects,
        );
        set(&mut c.reader.enabled, self.reader.enabled);
        set(
            &mut c.reader.poll_interval,
            self.reader.poll_interval_ms.map(Duration::from_millis),
        );
        let r = self.reads;
        set(&mut c.reads.max_concurrent, r.max_concurrent);
        set(&mut c.reads.read_points, r.read_points);
        set(&mut c.reads.default_page_bytes, r.default_page_bytes);
        set(&mut c.reads.max_page_bytes, r.max_page_bytes);
        set(&mut c.reads.metadata_cache_bytes, r.metadata_cache_bytes);
        set(&mut c.roll.zstd_level, w.zstd_level);
        let l = self.limits;
        set(&mut c.limits.max_message_bytes, l.max_message_bytes);
        set(
            &mut c.limits.max_points_per_request,
            l.max_points_per_request,
        );
        set(
            &mut c.limits.max_events_per_request,
            l.max_events_per_request,
        );
        set(&mut c.limits.max_key_bytes, l.max_key_bytes);
        set(&mut c.limits.max_value_bytes, l.max_value_bytes);
        set(&mut c.limits.max_metadata_bytes, l.max_metadata_bytes);
        set(&mut c.limits.max_name_bytes, l.max_name_bytes);
        set(&mut c.wal_segment_bytes, self.wal.segment_bytes);
        set(&mut c.http_listen, self.metrics.listen.map(Some));
        set(&mut c.http_listen, self.http.listen.map(Some));
        if self.metrics.enabled == Some(false) {
            c.http_listen = None;
        }
        if self.http.token.is_some() || self.http.token_file.is_some() {
            return Err(ConfigError::Invalid {
                key: "http.token",
                reason: "replaced by [auth]: set enabled = true and add an [[auth.tokens]] entry \
                         with scopes = [\"read\"] and namespaces = [\"*\"] (token or token_file)"
                    .to_owned(),
            });
        }
        let tls = self.tls;
        match (
            non_empty(tls.cert_file),
            non_empty(tls.key_file),
            non_empty(tls.client_ca_file),
        ) {
            (Some(cert), Some(key), ca) => {
                c.tls = Some(Tls {
                    cert_file: cert.into(),
                    key_file: key.into(),
                    client_ca_file: ca.map(PathBuf::from),
                });
            }
            (None, None, None) => {}
            _ => {
                return Err(ConfigError::Invalid {
                    key: "tls.cert_file",
                    reason: "set cert_file and key_file together (client_ca_file needs both)"
                        .to_owned(),
                });
            }
        }
        let a = self.auth;
        // Tokens in the file turn authentication on: tokens configured with
        // authentication off would let every client in, unnoticed.
        let tokens_given =
            !a.tokens.is_empty() || a.tokens_file.as_deref().is_some_and(|f| !f.is_empty());
        match (a.enabled, tokens_given) {
            (Some(false), true) => {
                return Err(ConfigError::Invalid {
                    key: "auth.enabled",
                    reason: "tokens are configured ([[auth.tokens]] or auth.tokens_file) but \
                             enabled = false would let every client in: set enabled = true, \
                             or remove the tokens"
                        .to_owned(),
                });
            }
            (None, true) => c.auth.enabled = true,
            (enabled, _) => set(&mut c.auth.enabled, enabled),
        }
        set(
            &mut c.auth.allow_unauthenticated_loopback,
            a.allow_unauthenticated_loopback,
        );
        set(
            &mut c.auth.tokens_file,
            non_empty(a.tokens_file).map(|p| Some(PathBuf::from(p))),
        );
        for (i, t) in a.tokens.into_iter().enumerate() {
            c.auth
                .tokens
                .push(t.into_config(&format!("auth.tokens[{i}]"))?);
        }
        let st = self.storage;
        if let Some(root) = st.root {
            c.storage.root = StorageRoot::parse(&root)?;
        }
        set(&mut c.storage.spool_max_bytes, st.spool_max_bytes);
        set(&mut c.storage.upload_concurrency, st.upload_concurrency);
        set(
            &mut c.storage.multipart_threshold_bytes,
            st.multipart_threshold_bytes,
        );
        set(&mut c.storage.multipart_part_bytes, st.multipart_part_bytes);
        set(
            &mut c.storage.max_upload_backoff,
            st.max_upload_backoff_ms.map(Duration::from_millis),
        );
        let s3 = &mut c.storage.s3;
        set(&mut s3.endpoint, non_empty(st.s3.endpoint).map(Some));
        set(&mut s3.region, non_empty(st.s3.region).map(Some));
        set(
            &mut s3.access_key_id,
            non_empty(st.s3.access_key_id).map(Some),
        );
        set(
            &mut s3.secret_access_key,
            non_empty(st.s3.secret_access_key).map(Some),
        );
        set(&mut s3.allow_http, st.s3.allow_http);
        set(&mut s3.virtual_hosted_style, st.s3.virtual_hosted_style);
        set(&mut s3.max_retries, st.s3.max_retries);
        set(
            &mut s3.retry_timeout,
            st.s3.retry_timeout_ms.map(Duration::from_millis),
        );
        set(
            &mut s3.request_timeout,
            st.s3
                .request_timeout_ms
                .map(|ms| Some(Duration::from_millis(ms))),
        );
        set(&mut c.log_format, self.log.format);
        set(
            &mut c.log_summary_interval,
            self.log.summary_interval_s.map(Duration::from_secs),
        );
        c.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_config_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mboxd.toml");
        let loaded = Config::from_file(Some(&path)).expect("shipped config must load");
        let default = Config::default();
        // The shipped file documents the defaults, so loading it changes nothing.
        assert_eq!(format!("{loaded:?}"), format!("{default:?}"));
    }

    #[test]
    fn the_default_and_sidecar_bounds_fit_their_budgets() {
        // On two cores (the CI machine's and this test's assumption about defaults).
        let default = Config {
            writer_threads: 2,
            ..Config::default()
        };
        assert!(
            default.memory_bound_bytes() <= 256 << 20,
            "default bound {} MiB",
            default.memory_bound_bytes() >> 20
        );
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/sidecar.toml");
        let sidecar = Config::from_file(Some(&path)).expect("the sidecar preset loads");
        assert!(
            sidecar.memory_bound_bytes() <= 128 << 20,
            "sidecar bound {} MiB",
            sidecar.memory_bound_bytes() >> 20
        );
        let mut with_s3 = sidecar.clone();
        with_s3.storage.root = StorageRoot::parse("s3://b/p").unwrap();
        with_s3.storage.upload_concurrency = 1;
        with_s3.storage.multipart_threshold_bytes = 8 << 20;
        with_s3.storage.multipart_part_bytes = 5 << 20;
        assert!(with_s3.memory_bound_bytes() <= 128 << 20);
        // Peak RSS held to the bound takes freed memory going back at once.
        assert_eq!(sidecar.allocator_purge_delay, Duration::ZERO);
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/kubernetes/overlays/sidecar/mboxd.toml");
        let overlay = Config::from_file(Some(&path)).expect("the sidecar overlay loads");
        assert!(overlay.memory_bound_bytes() <= 128 << 20);
        assert_eq!(overlay.allocator_purge_delay, Duration::ZERO);
    }

    #[test]
    fn storage_roots_parse() {
        assert_eq!(StorageRoot::parse("").unwrap(), StorageRoot::DataDir);
        assert_eq!(
            StorageRoot::parse("s3://runs/team/a/").unwrap(),
            StorageRoot::S3 {
                bucket: "runs".into(),
                prefix: "team/a".into()
            }
        );
        assert_eq!(
            StorageRoot::parse("s3://runs").unwrap(),
            StorageRoot::S3 {
                bucket: "runs".into(),
                prefix: String::new()
            }
        );
        for bad in [
            "/tmp/x",
            "s3://",
            "s3:///p",
            "s3://b/a//c",
            "s3://b/../c",
            "gs://b",
        ] {
            assert!(StorageRoot::parse(bad).is_err(), "{bad}");
        }
        let file: FileConfig = toml::from_str(
            "[storage]\nroot = \"s3://b/p\"\n[storage.s3]\nendpoint = \"http://127.0.0.1:9\"\naccess_key_id = \"k\"\nsecret_access_key = \"shh\"\nallow_http = true\nrequest_timeout_ms = 2500\n",
        )
        .unwrap();
        let mut c = Config::default();
        file.apply(&mut c).unwrap();
        assert_eq!(c.storage.s3.endpoint.as_deref(), Some("http://127.0.0.1:9"));
        assert!(c.storage.s3.allow_http);
        assert_eq!(
            c.storage.s3.request_timeout,
            Some(Duration::from_millis(2500))
        );
        assert!(
            !format!("{c:?}").contains("shh"),
            "secrets never reach logs"
        );
    }

    #[test]
    fn s3_settings_left_out_stay_unset_for_the_environment() {
        // Empty strings and the shipped defaults leave every S3 setting to the
        // AWS environment.
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mboxd.toml");
        let s3 = Config::from_file(Some(&path)).unwrap().storage.s3;
        assert_eq!(s3.endpoint, None);
        assert_eq!(s3.region, None);
        assert_eq!(s3.access_key_id, None);
        assert_eq!(s3.secret_access_key, None);
        assert!(!s3.allow_http && !s3.virtual_hosted_style);
        assert_eq!(s3.request_timeout, None);

        // Half a key pair in the file would mix two identities.
        for half in ["access_key_id = \"k\"", "secret_access_key = \"shh\""] {
            let file: FileConfig = toml::from_str(&format!("[storage.s3]\n{half}\n")).unwrap();
            let err = file.apply(&mut Config::default()).unwrap_err();
            assert!(
                matches!(
                    err,
                    ConfigError::Invalid {
                        key: "storage.s3.access_key_id",
                        ..
                    }
                ),
                "{err}"
            );
            assert!(!err.to_string().contains("shh"), "{err}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<FileConfig>("[writer]\nmax_rowz = 3\n").unwrap_err();
        assert!(err.to_string().contains("max_rowz"), "{err}");
    }

    #[test]
    fn overrides_apply_and_are_checked() {
        let file: FileConfig =
            toml::from_str("[ingest]\nwhen_full = \"reject\"\nwriter_threads = 3\n").unwrap();
        let mut c = Config::default();
        file.apply(&mut c).unwrap();
        assert_eq!(c.when_full, WhenFull::Reject);
        assert_eq!(c.writer_threads, 3);

        let file: FileConfig = toml::from_str("[compaction]\nmin_files = 1\n").unwrap();
        let err = file.apply(&mut Config::default()).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::Invalid {
                key: "compaction.min_files",
                ..
            }
        ));
        let file: FileConfig = toml::from_str(
            "[compaction]\nretention_days = 30\n[compaction.retention_days_by_namespace]\nscratch = 2\n",
        )
        .unwrap();
        let mut c = Config::default();
        file.apply(&mut c).unwrap();
        assert_eq!(c.compaction.retention_days_of("scratch"), 2);
        assert_eq!(c.compaction.retention_days_of("cv"), 30);
    }

    #[test]
    fn tls_and_auth_sections_parse_and_are_checked() {
        let file: FileConfig = toml::from_str(
            r#"
[tls]
cert_file = "/tls/tls.crt"
key_file = "/tls/tls.key"
client_ca_file = "/tls/ca.crt"
[auth]
enabled = true
allow_unauthenticated_loopback = false
tokens_file = "/auth/tokens.toml"
[[auth.tokens]]
name = "trainers"
token = " s3cret "
scopes = ["write", "read"]
namespaces = ["cv", "nlp"]
[[auth.tokens]]
token_file = "/auth/reader"
scopes = ["read"]
namespaces = ["*", "cv"]
"#,
        )
        .unwrap();
        let mut c = Config::default();
        file.apply(&mut c).unwrap();
        let tls = c.tls.clone().unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("/tls/tls.crt"));
        assert_eq!(tls.client_ca_file, Some(PathBuf::from("/tls/ca.crt")));
        assert!(c.auth.enabled && !c.auth.allow_unauthenticated_loopback);
        assert_eq!(c.auth.tokens_file, Some(PathBuf::from("/auth/tokens.toml")));
        let [trainers, reader] = &c.auth.tokens[..] else {
            panic!("{:?}", c.auth.tokens)
        };
        assert_eq!(trainers.name, "trainers");
        assert_eq!(trainers.value, TokenValue::Inline(Secret("s3cret".into())));
        assert_eq!(
            trainers.scopes,
            [Scope::Read, Scope::Write].into_iter().collect()
        );
        assert_eq!(
            trainers.namespaces,
            Namespaces::Only(["cv".to_string(), "nlp".to_string()].into())
        );
        assert_eq!(reader.name, "auth.tokens[1]");
        assert_eq!(reader.value, TokenValue::File("/auth/reader".into()));
        assert_eq!(reader.namespaces, Namespaces::All);
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "tokens never reach logs"
        );

        // Tokens without `enabled` turn authentication on; with `enabled = false`
        // they are refused.
        let token = "[[auth.tokens]]\ntoken = \"x\"\nscopes = [\"read\"]\nnamespaces = [\"cv\"]\n";
        for text in [
            token.to_owned(),
            "[auth]\ntokens_file = \"/t\"\n".to_owned(),
        ] {
            let file: FileConfig = toml::from_str(&text).unwrap();
            let mut c = Config::default();
            file.apply(&mut c).unwrap();
            assert!(c.auth.enabled, "{text}");
        }
        let file: FileConfig =
            toml::from_str("[auth]\nenabled = false\ntokens_file = \"\"\n").unwrap();
        let mut c = Config::default();
        file.apply(&mut c).unwrap();
        assert!(!c.auth.enabled);

        let rejected = |text: &str| {
            let file: FileConfig = toml::from_str(text).unwrap();
            file.apply(&mut Config::default()).unwrap_err().to_string()
        };
        for (text, says) in [
            ("[tls]\ncert_file = \"/c\"\n", "tls.cert_file"),
            ("[tls]\nclient_ca_file = \"/ca\"\n", "tls.cert_file"),
            ("[http]\ntoken = \"x\"\n", "replaced by [auth]"),
            (
                "[[auth.tokens]]\ntoken = \"x\"\nnamespaces = [\"*\"]\n",
                "scopes is required",
            ),
            (
                "[[auth.tokens]]\ntoken = \"x\"\nscopes = [\"read\"]\n",
                "namespaces is required",
            ),
            (
                "[[auth.tokens]]\ntoken = \"x\"\nscopes = [\"read\"]\nnamespaces = [\"a/b\"]\n",
                "not a namespace",
            ),
            (
                "[auth]\nenabled = false\n[[auth.tokens]]\ntoken = \"x\"\nscopes = [\"read\"]\nnamespaces = [\"cv\"]\n",
                "auth.enabled",
            ),
            (
                "[auth]\nenabled = false\ntokens_file = \"/t\"\n",
                "enabled = false would let every client in",
            ),
            (
                "[[auth.tokens]]\ntoken = \"x\"\ntoken_file = \"/t\"\nscopes = [\"read\"]\nnamespaces = [\"*\"]\n",
                "not both",
            ),
            (
                "[[auth.tokens]]\ntoken = \"  \"\nscopes = [\"read\"]\nnamespaces = [\"*\"]\n",
                "token is empty",
            ),
            (
                "[auth]\nenabled = true\nallow_unauthenticated_loopback = false\n",
                "no client",
            ),
        ] {
            let err = rejected(text);
            assert!(err.contains(says), "{text}: {err}");
        }
        // An unknown scope is a parse error naming it.
        let err = toml::from_str::<FileConfig>(
            "[[auth.tokens]]\ntoken = \"x\"\nscopes = [\"admin\"]\nnamespaces = [\"*\"]\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("admin"), "{err}");
    }
}
