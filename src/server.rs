//! Start-up, wiring and ordered graceful shutdown.
//!
//! [`run`] takes its listener and its shutdown future, so tests bind port 0 and stop
//! the server at will. Shutdown runs in order: stop accepting and finish in-flight
//! requests, refuse new data, let every writer drain its queue and publish every
//! buffered row, then return.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::ModelStoreService;
use crate::auth::{AuthSetupError, Authorizer};
use crate::changelog::ship::{ShipLoop, Shipper};
use crate::compact::{self, Compactor, PartitionReport, PassReport};
use crate::config::{Config, Durability, StorageRoot};
use crate::index::{CatalogJournal, Index, IndexError, SummaryFolder};
use crate::ingest::dedup::RecentBatches;
use crate::ingest::{Ingest, MemoryBudget, Policy};
use crate::live::LiveView;
use crate::model::now_micros;
use crate::paths::valid_daemon_id;
use crate::persist::Persister;
use crate::proto::model_store_server::ModelStoreServer;
use crate::query::Reader;
use crate::recovery::{self, RecoveryError};
use crate::sink::s3::S3Settings;
use crate::sink::upload::Uploader;
use crate::sink::{Files, LocalSink, Remote, SinkError};
use crate::telemetry::{Metrics, Reason, ReasonLabel, log_summaries};
use crate::tls::{Certificates, ClientCerts, TlsError};
use crate::wal::{SyncMode, Wal, WalConfig, WalError};
use crate::web::{self, Activity, Gauges, WebState};
use crate::writer::snapshot::{SnapshotLoop, SnapshotTarget, Snapshots};
use crate::writer::{self, WriterContext};

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("preparing data folder {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid daemon id {0:?}: use ASCII letters, digits, '-', '_' or '.'")]
    DaemonId(String),
    #[error("opening the index: {0}")]
    Index(#[from] IndexError),
    #[error("opening the storage root: {0}")]
    Sink(#[from] SinkError),
    #[error("configuring the S3 storage root: {0}")]
    Store(#[from] object_store::Error),
    #[error("starting a writer thread: {0}")]
    Thread(std::io::Error),
    #[error("opening the write-ahead log: {0}")]
    Wal(#[from] WalError),
    #[error("replaying the write-ahead log: {0}")]
    Recovery(#[from] RecoveryError),
    #[error("binding the metrics listener {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("building the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving gRPC: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("writers did not finish within the shutdown timeout")]
    ShutdownTimeout,
    #[error("a start-up task failed: {0}")]
    Task(String),
    #[error("loading the TLS certificate: {0}")]
    Tls(#[from] TlsError),
    #[error("loading the auth tokens: {0}")]
    Auth(#[from] AuthSetupError),
    #[error("compaction failed: {0}")]
    Compaction(String),
    #[error("{0}")]
    FellBehind(String),
    #[error("reading the change logs: {0}")]
    ChangeLog(#[from] crate::changelog::ChangeLogError),
}

/// How long requests in flight may take to finish once the listener closes.
pub(crate) const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// HTTP/2 flow-control windows (see [`run`]). A connection's window is also what a
/// client can make mboxd buffer unread, so it is part of the memory bound.
pub(crate) const STREAM_WINDOW: u32 = 512 << 10;
pub(crate) const CONNECTION_WINDOW: u32 = crate::config::CONNECTION_WINDOW_BYTES;

/// The daemon id: configured, or generated once (host name plus a random suffix)
/// and kept in the data folder so it is stable across restarts.
fn daemon_id(config: &Config) -> Result<String, ServerError> {
    if let Some(id) = &config.daemon_id {
        return if valid_daemon_id(id) {
            Ok(id.clone())
        } else {
            Err(ServerError::DaemonId(id.clone()))
        };
    }
    let path = config.data_dir.join("daemon-id");
    let io = |source| ServerError::DataDir {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(id) if valid_daemon_id(id.trim()) => return Ok(id.trim().to_owned()),
        Ok(id) => return Err(ServerError::DaemonId(id)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    let host: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    let host = if host.is_empty() {
        "mboxd".to_owned()
    } else {
        host
    };
    let id = format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff);
    std::fs::write(&path, format!("{id}\n")).map_err(io)?;
    Ok(id)
}

/// Opens the data folder's index, saying so when a crash left it to be walked in
/// full before mboxd could serve.
fn open_index(config: &Config) -> Result<Arc<Index>, ServerError> {
    let index = Index::open(&config.data_dir.join("index.redb"))?;
    if let Some(took) = index.repaired_in() {
        tracing::warn!(
            seconds = took.as_secs_f64(),
            "the index was left by a crash without its allocator state and was repaired in full"
        );
    }
    Ok(Arc::new(index))
}

/// Replays the catalog journal (see [`crate::index::journal`]) and opens it for
/// appending. Before anything else writes the index, since the batches it
/// replays were written right after its last durable commit; after the change
/// log is set, since they are logged as they were at first.
fn open_journal(config: &Config, index: &Index) -> Result<CatalogJournal, ServerError> {
    let (journal, replayed) = index.open_journal(&config.data_dir.join("catalog.journal"))?;
    if replayed > 0 {
        tracing::info!(
            batches = replayed,
            "CreateExperiment batches written again from the catalog journal"
        );
    }
    Ok(journal)
}

pub(crate) fn create_dir(path: &Path) -> Result<(), ServerError> {
    std::fs::create_dir_all(path).map_err(|source| ServerError::DataDir {
        path: path.to_owned(),
        source,
    })
}

/// Serves until `shutdown` completes, then drains and publishes everything.
/// Returns once the index is closed, so that the folder can be opened again at
/// once: by a restart in the same process, or by [`compact_once`].
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    if config.reader.enabled {
        return crate::fleet::run_reader(config, listener, shutdown).await;
    }
    let within = config.shutdown_timeout;
    let mut index = Weak::new();
    let served = serve(config, listener, shutdown, &mut index).await;
    let_go(&index, within).await;
    served
}

/// Waits for the last holder of the index to let it go. Every thread that
/// holds it is joined by then, but a connection the drain cut off can keep a
/// request's handle for a moment after serving has ended.
async fn let_go(index: &Weak<Index>, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    while index.strong_count() > 0 {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                "the index is still held after the stop; opening this folder again \
                 in this process fails until it is let go"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// [`run`]'s writer, which sets `opened` to the index once it is open.
async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
    opened: &mut Weak<Index>,
) -> Result<(), ServerError> {
    create_dir(&config.data_dir)?;
    // Certificates and tokens first: a mistake there stops start-up before any
    // recovery work, and nothing is ever served without them.
    let (grpc_certs, http_certs) = match &config.tls {
        Some(files) => (
            Some(Arc::new(Certificates::load(
                files,
                &[b"h2"],
                ClientCerts::Required,
            )?)),
            Some(Arc::new(Certificates::load(
                files,
                &[b"http/1.1"],
                ClientCerts::Optional,
            )?)),
        ),
        None => (None, None),
    };
    let authorizer = Arc::new(Authorizer::load(&config.auth)?);
    tracing::info!(
        tls = config.tls.is_some(),
        mutual_tls = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_file.is_some()),
        auth = authorizer.enabled(),
        tokens = authorizer.token_count(),
        unauthenticated_loopback = config.auth.allow_unauthenticated_loopback,
        "security"
    );
    let metrics = Metrics::new();
    let daemon_id: Arc<str> = daemon_id(&config)?.into();
    let index = open_index(&config)?;
    *opened = Arc::downgrade(&index);
    // Before recovery, whose publications readers must hear of too.
    set_change_log(&config, &index)?;
    let journal = open_journal(&config, &index)?;
    let (sink, remote) = open_root(&config)?;

    let files = Files::new(
        sink.clone(),
        remote.as_ref().map(|store| Remote {
            store: Arc::clone(store),
            runtime: tokio::runtime::Handle::current(),
        }),
    );
    let (wal, replayed) = Wal::open(WalConfig {
        dir: config.data_dir.join("wal"),
        min_next_seq: index.next_unreferenced_seq()?,
        segment_bytes: config.wal_segment_bytes,
        sync: match config.durability {
            Durability::WalWrite => SyncMode::Write,
            Durability::WalFsync | Durability::Memory => SyncMode::Fsync,
        },
        appends: metrics.wal_appends.clone(),
        fsync_seconds: metrics.wal_fsync_seconds.clone(),
        preallocate: config.durability == Durability::WalFsync,
    })?;
    let wal = Arc::new(wal);
    index.forget_published_below(wal.retained_from())?;
    let mut persister = Persister {
        index: Arc::clone(&index),
        sink: sink.clone(),
        uploader: None,
        remote: remote.as_ref().map(|store| Remote {
            store: Arc::clone(store),
            runtime: tokio::runtime::Handle::current(),
        }),
        wal: Some((Arc::clone(wal.tracker()), wal.retained_from_handle())),
        batch_id_window: config.batch_id_window,
        metrics: metrics.clone(),
    };
    // Recovery, before anything is served: finish interrupted publications and
    // replacements, then read the WAL back (it is always opened, so records a
    // previous run left are replayed even if durability has since been set to
    // memory).
    {
        let persister = persister.clone();
        tokio::task::spawn_blocking(move || persister.recover())
            .await
            .map_err(|e| ServerError::Task(e.to_string()))??;
    }
    let folder = SummaryFolder::start(Arc::clone(&index)).map_err(ServerError::Thread)?;
    let (uploader, upload_loop) = match &remote {
        Some(store) => {
            let pending = index.spooled()?;
            // A spool file no entry names was uploaded just before a crash.
            let names: std::collections::HashSet<&str> =
                pending.iter().map(|(k, _)| k.as_str()).collect();
            for key in sink.published_keys()? {
                if !names.contains(key.as_str()) {
                    sink.remove(&key);
                }
            }
            if !pending.is_empty() {
                tracing::info!(
                    files = pending.len(),
                    bytes = pending.iter().map(|(_, b)| b).sum::<u64>(),
                    "uploading files left in the spool"
                );
            }
            tokio::spawn(check_store(Arc::clone(store)));
            let (uploader, upload_loop) = Uploader::start(
                Arc::clone(store),
                sink.clone(),
                Arc::clone(&index),
                &config.storage,
                metrics.clone(),
                pending,
            );
            (Some(uploader), Some(upload_loop))
        }
        None => {
            let stranded = index.spooled()?;
            if !stranded.is_empty() {
                tracing::error!(
                    files = stranded.len(),
                    "files wait in the spool for an S3 root that is no longer configured; \
                     set storage.root back to upload them"
                );
            }
            (None, None)
        }
    };
    persister.uploader = uploader.clone();
    let shipping = start_shipper(&config, &index, &remote, &daemon_id, &metrics)?;

    let recent = RecentBatches::new(config.batch_id_window, config.batch_ids_max);
    let since = now_micros().saturating_sub(config.batch_id_window.as_micros() as i64);
    for (id, at, points) in index.batch_ids_since(since)? {
        recent.remember(Arc::from(id), at, points);
    }
    let writer_threads = config.writer_threads();
    let budget = MemoryBudget::new(config.max_buffered_bytes);
    let live = LiveView::new(writer_threads);
    let (ingest, receivers) = Ingest::new(
        Policy {
            writers: writer_threads,
            when_full: config.when_full,
            durability: config.durability,
        },
        Arc::clone(&budget),
        Some(Arc::clone(&wal)),
        recent,
        live.clone(),
        metrics.clone(),
    );
    let ingest = Arc::new(match &uploader {
        Some(u) => ingest.with_spool(Arc::clone(u.spool())),
        None => ingest,
    });
    let ctx = WriterContext {
        persister: persister.clone(),
        daemon_id: Arc::clone(&daemon_id),
        roll: config.roll.clone(),
        budget: Arc::clone(&budget),
    };
    let writers = receivers
        .into_iter()
        .enumerate()
        .map(|(i, rx)| writer::spawn(i, ctx.clone(), live.writer(i), rx))
        .collect::<Result<Vec<_>, _>>()
        .map_err(ServerError::Thread)?;

    recovery::replay(replayed, &index, &ingest, wal.tracker()).await?;

    // The experiments/ and metadata/ snapshot tables, for joins in analytics.
    let snapshots = SnapshotLoop::start(
        Snapshots::new(
            Arc::clone(&index),
            match &remote {
                Some(store) => SnapshotTarget::Remote {
                    store: Arc::clone(store),
                    runtime: tokio::runtime::Handle::current(),
                    staging: sink.clone(),
                },
                None => SnapshotTarget::Local(sink.clone()),
            },
            Arc::clone(&daemon_id),
            writer::schema::writer_properties(&config.roll),
        ),
        config.roll.max_age,
    );

    // Compaction and retention, in the background.
    let compactor = compactor(&config, &persister, &files, &daemon_id, &metrics);
    let compact_stop = Arc::clone(&compactor.stop);
    let compaction = if config.compaction.enabled {
        Some(compact::spawn_loop(compactor).map_err(ServerError::Thread)?)
    } else {
        None
    };

    let reader = Reader::new(Arc::clone(&index), files, live.clone())
        .with_metadata_cache(config.reads.metadata_cache_bytes, &metrics);
    let activity = Arc::new(Activity::default());
    let read_slots = Arc::new(tokio::sync::Semaphore::new(config.reads.max_concurrent));
    let service = ModelStoreService::new(
        Arc::clone(&index),
        journal,
        Arc::clone(&ingest),
        reader.clone(),
        crate::api::Settings {
            limits: config.limits.clone(),
            reads: config.reads.clone(),
            read_slots: Arc::clone(&read_slots),
            clock: config.clock.clone(),
        },
        metrics.clone(),
        Arc::clone(&activity),
    )
    .map_err(ServerError::Thread)?;
    let creates = service.clone();
    let grpc = ModelStoreServer::new(service)
        .max_decoding_message_size(config.limits.max_message_bytes)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Zstd);
    // Every ModelStore call is authenticated before it is decoded; health and
    // reflection stay open for probes and tools.
    let grpc = {
        let authorizer = Arc::clone(&authorizer);
        tonic::service::interceptor::InterceptedService::new(grpc, move |req| {
            crate::api::authenticate(&authorizer, req)
        })
    };

    // Health (grpc.health.v1) for probes: SERVING now, NOT_SERVING once shutdown
    // begins, for `not_serving_grace` before the listener closes.
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<ModelStoreServer<ModelStoreService>>()
        .await;
    health.set_service_status("", ServingStatus::Serving).await;
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    // v1, and v1alpha for older grpcurl releases.
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;
    let grace = config.not_serving_grace;
    // The HTTP listener's /healthz follows the gRPC health status.
    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    // Told when the listener closes, so the drain of open connections is bounded:
    // an idle client that never answers the closing PING (old grpcio does not read
    // idle connections) must not hold the stop open.
    let (closing, closed) = tokio::sync::oneshot::channel::<()>();
    let shutdown = {
        let serving = Arc::clone(&serving);
        async move {
            shutdown.await;
            serving.store(false, std::sync::atomic::Ordering::Relaxed);
            health
                .set_not_serving::<ModelStoreServer<ModelStoreService>>()
                .await;
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            tracing::info!(
                grace_ms = grace.as_millis() as u64,
                "health is NOT_SERVING; draining"
            );
            tokio::time::sleep(grace).await;
            let _ = closing.send(());
        }
    };

    // Prometheus metrics on their own listener, stopped after the drain.
    let (metrics_stop, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_server = match config.http_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::MetricsListen { addr, source })?;
            tracing::info!(
                addr = ?listener.local_addr().ok(),
                tls = http_certs.is_some(),
                "HTTP: web view at /, JSON API at /api/v1, metrics at /metrics, health at /healthz"
            );
            let budget = Arc::clone(&budget);
            let spool = uploader.as_ref().map(|u| Arc::clone(u.spool()));
            let (wal, live) = (Arc::clone(&wal), live.clone());
            let state = WebState {
                index: Arc::clone(&index),
                reader: reader.clone(),
                metrics: metrics.clone(),
                activity: Arc::clone(&activity),
                reads: config.reads.clone(),
                auth: Arc::clone(&authorizer),
                serving: Arc::clone(&serving),
                gauges: Arc::new(move || Gauges {
                    buffered_bytes: budget.used() as u64,
                    memory_budget_bytes: budget.limit() as u64,
                    queue_depth: live.queued() as u64,
                    wal_bytes: wal.bytes(),
                    spool_bytes: spool.as_ref().map_or(0, |s| s.bytes()),
                    spool_files: spool.as_ref().map_or(0, |s| s.files()),
                }),
                started: std::time::Instant::now(),
                read_slots: Arc::clone(&read_slots),
            };
            Some(tokio::spawn(web::serve(
                listener,
                http_certs.clone(),
                state,
                async {
                    let _ = metrics_stopped.await;
                },
            )))
        }
        None => None,
    };
    let received = metrics.received_bytes.clone();
    let refused = metrics.requests_refused.clone();
    let summaries = {
        let budget = Arc::clone(&budget);
        tokio::spawn(log_summaries(
            metrics.clone(),
            config.log_summary_interval,
            move || budget.used(),
        ))
    };

    let local = listener.local_addr().ok();
    tracing::info!(
        addr = ?local,
        data_dir = %config.data_dir.display(),
        daemon_id = %daemon_id,
        durability = ?config.durability,
        "mboxd listening"
    );
    // Acks are small and latency-bound: no Nagle delay.
    let incoming = crate::tls::handshakes(
        limit_connections(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            config.max_connections,
        ),
        grpc_certs,
    );
    let served = Server::builder()
        // h2's default 64 KiB windows make a 10,000-point batch (~240 KB) wait for
        // several WINDOW_UPDATE round trips; 512 KiB lets a typical batch arrive in
        // one go while keeping what one connection can push unread small.
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .layer(
            crate::api::receive::ReceiveLimitLayer::new(
                config.concurrent_requests(),
                crate::api::receive::SLOT_WAIT,
            )
            .with_gate(crate::api::receive::BudgetGate {
                budget: Arc::clone(&budget),
                when_full: config.when_full,
                refused: metrics.writes_refused_unread.clone(),
            }),
        )
        .layer(tower::util::MapResponseLayer::new(
            oversized_is_resource_exhausted,
        ))
        .layer(tower::util::MapResponseLayer::new(
            move |response: http::Response<tonic::body::Body>| {
                count_refused(&refused, &response);
                response
            },
        ))
        .layer(tower::util::MapRequestLayer::new(
            move |req: http::Request<tonic::body::Body>| {
                let received = received.clone();
                req.map(|body| {
                    tonic::body::Body::new(CountingBody {
                        inner: body,
                        received,
                    })
                })
            },
        ))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(grpc)
        .serve_with_incoming_shutdown(incoming, shutdown);
    let served = tokio::select! {
        served = served => served,
        () = async {
            let _ = closed.await;
            tokio::time::sleep(DRAIN_TIMEOUT).await;
        } => {
            tracing::warn!(
                timeout_ms = DRAIN_TIMEOUT.as_millis() as u64,
                "connections still open after the drain timeout; closing them"
            );
            Ok(())
        }
    };

    tracing::info!("no longer accepting requests; publishing buffered rows");
    let draining_since = tokio::time::Instant::now();
    let time_left = || {
        config
            .shutdown_timeout
            .saturating_sub(draining_since.elapsed())
    };
    ingest.shutdown();
    // The catalog's last commit checkpoints its journal, so the next start has
    // nothing to replay.
    let _ = tokio::task::spawn_blocking(move || creates.stop_creates()).await;
    let joined = tokio::task::spawn_blocking(move || {
        for w in writers {
            if w.join().is_err() {
                tracing::error!("a writer thread panicked");
            }
        }
    });
    compact_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let drained = tokio::time::timeout(config.shutdown_timeout, joined).await;
    if let Some(compaction) = compaction {
        let _ = tokio::task::spawn_blocking(move || compaction.join()).await;
    }
    // Nothing publishes any more: the summaries left are folded now (within the
    // stop's time), not at the next start.
    let left = time_left();
    let _ = tokio::task::spawn_blocking(move || folder.finish(left)).await;
    snapshots.finish().await;
    if let Some(uploader) = &uploader
        && !uploader.spool().wait_empty(time_left()).await
    {
        tracing::warn!(
            files = uploader.spool().files(),
            bytes = uploader.spool().bytes(),
            "files stay in the spool; they are uploaded on the next start"
        );
    }
    if let Some(upload_loop) = upload_loop {
        upload_loop.stop().await;
    }
    if let Some((shipper, ship_loop)) = shipping {
        if !shipper.flush(time_left()).await {
            tracing::warn!("change-log entries stay unshipped; the next start ships them");
        }
        ship_loop.stop().await;
    }
    summaries.abort();
    let _ = summaries.await;
    let _ = metrics_stop.send(());
    if let Some(server) = http_server {
        let _ = server.await;
    }
    let wal_closed = tokio::task::spawn_blocking(move || wal.close());
    let _ = tokio::time::timeout(config.shutdown_timeout, wal_closed).await;
    served?;
    match drained {
        Ok(_) => {
            tracing::info!("shutdown complete");
            Ok(())
        }
        Err(_) => Err(ServerError::ShutdownTimeout),
    }
}

/// Turns the index's change log on or off as configured.
fn set_change_log(config: &Config, index: &Index) -> Result<(), ServerError> {
    if config.change_log_enabled() {
        index.enable_change_log()?;
    } else {
        index.disable_change_log()?;
    }
    Ok(())
}

/// The storage root as an object store: the S3 bucket, or the data folder.
pub(crate) fn root_store(
    config: &Config,
    remote: &Option<Arc<dyn object_store::ObjectStore>>,
) -> Result<Arc<dyn object_store::ObjectStore>, ServerError> {
    Ok(match remote {
        Some(store) => Arc::clone(store),
        None => {
            create_dir(&config.data_dir)?;
            Arc::new(object_store::local::LocalFileSystem::new_with_prefix(
                &config.data_dir,
            )?)
        }
    })
}

/// Starts shipping the change log, if it is on.
fn start_shipper(
    config: &Config,
    index: &Arc<Index>,
    remote: &Option<Arc<dyn object_store::ObjectStore>>,
    daemon_id: &str,
    metrics: &Metrics,
) -> Result<Option<(Arc<Shipper>, ShipLoop)>, ServerError> {
    if !config.change_log_enabled() {
        return Ok(None);
    }
    let shipper = Shipper::new(
        root_store(config, remote)?,
        Arc::clone(index),
        daemon_id,
        config.change_log.ship.clone(),
        metrics.clone(),
    );
    let ship_loop = shipper.start();
    Ok(Some((shipper, ship_loop)))
}

/// Where files are published: the data folder, or the spool of an S3 root (with
/// its store).
fn open_root(
    config: &Config,
) -> Result<(LocalSink, Option<Arc<dyn object_store::ObjectStore>>), ServerError> {
    let (publish_root, remote) = match &config.storage.root {
        StorageRoot::DataDir => (config.data_dir.clone(), None),
        StorageRoot::S3 { bucket, prefix } => {
            let s3 = S3Settings::resolve(bucket, prefix, &config.storage.s3, std::env::vars_os());
            // Before building, so a setting object_store rejects is explained too.
            tracing::info!("{}", s3.describe());
            (config.data_dir.join("spool"), Some(s3.build()?))
        }
    };
    let sink = LocalSink::open(&publish_root, &config.data_dir.join("_staging"))?;
    Ok((sink, remote))
}

/// The compactor of a data folder.
fn compactor(
    config: &Config,
    persister: &Persister,
    files: &Files,
    daemon_id: &Arc<str>,
    metrics: &Metrics,
) -> Compactor {
    Compactor {
        persister: persister.clone(),
        files: files.clone(),
        config: config.compaction.clone(),
        roll: config.roll.clone(),
        daemon_id: Arc::clone(daemon_id),
        clock: config.clock.clone(),
        metrics: metrics.clone(),
        scratch: config.data_dir.join("_staging").join("compact"),
        stop: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    }
}

/// Runs one compaction and retention pass over a data folder no daemon holds
/// (`mboxd compact`): every partition is merged as if its day were over.
/// `progress` hears of each partition as it is done.
pub async fn compact_once(
    config: Config,
    progress: impl FnMut(&PartitionReport) + Send + 'static,
) -> Result<PassReport, ServerError> {
    if !config.data_dir.join("index.redb").exists() {
        return Err(ServerError::DataDir {
            path: config.data_dir.clone(),
            source: std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no index.redb here: not an mboxd data folder",
            ),
        });
    }
    let metrics = Metrics::new();
    let daemon_id: Arc<str> = daemon_id(&config)?.into();
    let index = open_index(&config)?;
    set_change_log(&config, &index)?;
    // Nothing creates experiments here; the journal is left empty.
    drop(open_journal(&config, &index)?);
    let (sink, remote) = open_root(&config)?;
    let shipping = start_shipper(&config, &index, &remote, &daemon_id, &metrics)?;
    let remote = remote.map(|store| Remote {
        store,
        runtime: tokio::runtime::Handle::current(),
    });
    let files = Files::new(sink.clone(), remote.clone());
    let mut persister = Persister {
        index: Arc::clone(&index),
        sink: sink.clone(),
        uploader: None,
        remote: remote.clone(),
        wal: None,
        batch_id_window: config.batch_id_window,
        metrics: metrics.clone(),
    };
    {
        let persister = persister.clone();
        tokio::task::spawn_blocking(move || persister.recover())
            .await
            .map_err(|e| ServerError::Task(e.to_string()))??;
    }
    let uploads = match &remote {
        Some(r) => {
            let (uploader, upload_loop) = Uploader::start(
                Arc::clone(&r.store),
                sink.clone(),
                Arc::clone(&index),
                &config.storage,
                metrics.clone(),
                index.spooled()?,
            );
            persister.uploader = Some(Arc::clone(&uploader));
            Some((uploader, upload_loop))
        }
        None => None,
    };
    let compactor = compactor(&config, &persister, &files, &daemon_id, &metrics);
    let mut progress = progress;
    let report = tokio::task::spawn_blocking(move || compactor.run_pass(true, &mut progress))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))?;
    if let Some((uploader, upload_loop)) = uploads {
        if !uploader.spool().wait_empty(config.shutdown_timeout).await {
            tracing::warn!("files stay in the spool; the next `mboxd serve` uploads them");
        }
        upload_loop.stop().await;
    }
    if let Some((shipper, ship_loop)) = shipping {
        if shipper.flush(config.shutdown_timeout).await {
            // Replaced files wait for the change that removes them to be shipped.
            let persister = persister.clone();
            let _ = tokio::task::spawn_blocking(move || persister.finish_deletions()).await;
        } else {
            tracing::warn!("change-log entries stay unshipped; the next `mboxd serve` ships them");
        }
        ship_loop.stop().await;
    }
    report.map_err(|e| ServerError::Compaction(e.to_string()))
}

/// Accepts at most `max` connections at once; further ones wait in the listen
/// backlog until one closes. Each connection can make h2 buffer up to its window of
/// request bytes before mboxd reads them, so this bounds that memory.
pub(crate) fn limit_connections(
    incoming: TcpIncoming,
    max: usize,
) -> impl futures::Stream<Item = std::io::Result<Limited>> {
    use futures::StreamExt;
    let slots = Arc::new(tokio::sync::Semaphore::new(max));
    let accepted = futures::stream::unfold((incoming, slots), |(mut incoming, slots)| async move {
        // A slot first, then accept: the next client waits in the kernel's backlog.
        let slot = Arc::clone(&slots).acquire_owned().await.ok()?;
        let next = incoming.next().await?;
        Some((
            next.map(|io| Limited { io, _slot: slot }),
            (incoming, slots),
        ))
    });
    Box::pin(accepted)
}

/// A connection holding one of [`limit_connections`]'s slots until it closes.
pub(crate) struct Limited {
    io: tokio::net::TcpStream,
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl tokio::io::AsyncRead for Limited {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Limited {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Says at start-up whether the S3 root answers, so that wrong credentials, a
/// missing bucket or an unreachable endpoint show in the log at once rather than at
/// the first upload. Never fatal: an outage at start-up only means files wait in
/// the spool.
pub(crate) async fn check_store(store: Arc<dyn object_store::ObjectStore>) {
    use object_store::ObjectStoreExt;
    let probe = object_store::path::Path::from("_mboxd_probe");
    match store.head(&probe).await {
        Ok(_) | Err(object_store::Error::NotFound { .. }) => {
            tracing::info!(store = %store, "S3 storage root reachable");
        }
        Err(e) => tracing::error!(
            store = %store,
            error = %e,
            "S3 storage root not usable yet; files wait in the spool until it is"
        ),
    }
}

/// tonic answers a request over the size limit OUT_OF_RANGE; gRPC's convention (and
/// DESIGN.md) is RESOURCE_EXHAUSTED. mboxd itself never answers OUT_OF_RANGE, so the
/// rewrite cannot hide anything else.
pub(crate) fn oversized_is_resource_exhausted<B>(
    mut response: http::Response<B>,
) -> http::Response<B> {
    let headers = response.headers_mut();
    if headers.get("grpc-status").is_some_and(|v| v == "11") {
        headers.insert("grpc-status", http::HeaderValue::from_static("8"));
    }
    response
}

/// Counts a response refused by authentication (UNAUTHENTICATED, 16) or
/// authorization (PERMISSION_DENIED, 7); only the auth checks answer those.
pub(crate) fn count_refused<B>(
    refused: &prometheus_client::metrics::family::Family<
        ReasonLabel,
        prometheus_client::metrics::counter::Counter,
    >,
    response: &http::Response<B>,
) {
    let reason = match response.headers().get("grpc-status").map(|v| v.as_bytes()) {
        Some(b"16") => Reason::unauthenticated,
        Some(b"7") => Reason::permission_denied,
        _ => return,
    };
    refused.get_or_create(&ReasonLabel { reason }).inc();
}

/// A request body that counts the bytes it yields into `received`.
pub(crate) struct CountingBody {
    pub(crate) inner: tonic::body::Body,
    pub(crate) received: prometheus_client::metrics::counter::Counter,
}

impl http_body::Body for CountingBody {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.received.inc_by(data.len() as u64);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
