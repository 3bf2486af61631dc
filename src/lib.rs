//! mboxd: a high-throughput ingest daemon for ML experiment tracking.
//!
//! Training jobs send experiments, metadata, metrics and events over the ModelBox
//! gRPC protocol (plus mboxd's columnar batch extension). mboxd validates each
//! request into a typed batch, queues it on a bounded channel, and writer threads turn
//! whole batches into sorted, partitioned Parquet files that DuckDB and Spark read
//! directly.
//!
//! ```text
//! client ─gRPC─▶ api ──validate──▶ ingest (byte budget, bounded queues) ──▶ writer threads
//!                 │                                                          │ roll by rows/bytes/age
//!                 ▼                                                          ▼
//!               index (experiments, metadata, file manifest)   ◀──  sink (atomic publish)
//!                 ▲
//!               query (GetMetrics/ListEvents: published Parquet + writer buffers)
//!
//! index outbox ──changelog::ship──▶ <root>/_mboxd/<daemon>/{log,checkpoint}/
//!                                        │ (every writer sharing the root)
//!                                        ▼
//!       reader (serve --reader): changelog::follow ──▶ in-memory index ──▶ query, api, web
//! ```
//!
//! Modules, each owning one stage:
//! - [`config`]: typed configuration, defaults, file + env + flag loading.
//! - [`auth`]: bearer tokens with scopes and namespaces; who may do what, checked
//!   by [`api`] and [`web`] (no token: UNAUTHENTICATED / 401; outside the token's
//!   scope or namespaces: PERMISSION_DENIED / 403).
//! - [`tls`]: rustls on both listeners, certificates re-read when their files
//!   change, TLS handshakes off the accept loop.
//! - [`model`]: the validated domain types that flow between stages.
//! - [`api`]: the tonic service, request validation, proto ⇄ model conversion,
//!   and the single mapping of errors to gRPC status codes.
//! - [`index`]: the embedded key-value index (redb): experiments, metadata, and the
//!   manifest of published files.
//! - [`ingest`]: the handle the API pushes batches through: memory budget,
//!   backpressure policy, durability mode, and sharding across writer threads.
//! - [`writer`]: writer threads with per-partition columnar buffers, the roll policy,
//!   and Parquet encoding.
//! - [`paths`]: the storage layout (the contract with analytics) in one place.
//! - [`sink`]: atomic publication of finished files; for S3 roots, the spool, its
//!   uploader, and the S3 client configured from the config file over the AWS
//!   environment.
//! - [`query`]: the read path, merging published files with unflushed buffers.
//! - [`changelog`]: the change log writers ship into the storage root (their
//!   manifest and catalog changes) and readers follow.
//! - [`fleet`]: the reader role, serving every daemon's data from the shared root.
//! - [`recovery`]: start-up replay of the write-ahead log, exactly once.
//! - [`wal`]: the write-ahead log: framed segments, group commit, replay, truncation.
//! - [`web`]: the HTTP listener: Prometheus `/metrics`, `/healthz`, the web view
//!   and its JSON API.
//! - [`telemetry`]: tracing set-up and Prometheus metrics.
//! - [`server`]: start-up, wiring and ordered graceful shutdown.

pub mod api;
pub mod auth;
pub mod changelog;
pub mod compact;
pub mod config;
pub mod fleet;
pub mod index;
pub mod ingest;
pub mod live;
pub mod model;
pub mod paths;
pub mod persist;
pub mod query;
pub mod recovery;
pub mod search;
pub mod server;
pub mod sink;
pub mod telemetry;
pub mod tls;
pub mod wal;
pub mod web;
pub mod writer;

/// Code generated from `proto/modelbox.proto`.
#[allow(
    missing_docs,
    unreachable_pub,
    missing_debug_implementations,
    clippy::all,
    clippy::unwrap_used
)]
pub mod proto {
    tonic::include_proto!("modelbox");

    /// The encoded descriptors of `modelbox.proto` and its imports, for reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/modelbox_descriptor.bin"));
}
