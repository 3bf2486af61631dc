//! The reader role (`mboxd serve --reader`): one place to read a fleet's runs.
//!
//! Writers (sidecars, standalone daemons) share a storage root and ship change
//! logs into it ([`crate::changelog`]). A reader follows those logs into an
//! in-memory index and serves every read (GetExperiment, ListExperiments and run
//! search, ListMetadata, GetMetrics with series queries, ListEvents, the web view
//! and its JSON API) through the same [`crate::query`] and index code as a writer,
//! over every daemon's files, read straight from the store. Writes answer
//! FAILED_PRECONDITION. It keeps nothing on disk, so it can be restarted or
//! replaced at any time, and several can run at once.
//!
//! Freshness: a point is visible through a reader at most the writer's roll age
//! (writer.max_age_ms, 5 s by default) plus its upload and ship interval plus the
//! reader's poll interval (reader.poll_interval_ms, 1 s by default) after it was
//! acknowledged: about 7 s with the defaults. Each writer still answers its own
//! reads at once (read-your-writes).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::api::ModelStoreService;
use crate::auth::Authorizer;
use crate::changelog::follow::Follower;
use crate::config::{Config, StorageRoot};
use crate::index::Index;
use crate::live::LiveView;
use crate::proto::model_store_server::ModelStoreServer;
use crate::query::{Reader, Refresh};
use crate::server::{
    CONNECTION_WINDOW, CountingBody, DRAIN_TIMEOUT, STREAM_WINDOW, ServerError, count_refused,
    limit_connections, oversized_is_resource_exhausted,
};
use crate::sink::counting::CountingStore;
use crate::sink::s3::S3Settings;
use crate::sink::{Files, Remote};
use crate::telemetry::Metrics;
use crate::tls::{Certificates, ClientCerts};
use crate::web::{self, Activity, Gauges, WebState};

/// The storage root a reader reads, wrapped to count its requests: the S3
/// bucket, or a local folder (the data folder setting names it).
fn reader_store(
    config: &Config,
    metrics: &Metrics,
) -> Result<Arc<dyn object_store::ObjectStore>, ServerError> {
    let store: Arc<dyn object_store::ObjectStore> = match &config.storage.root {
        StorageRoot::S3 { bucket, prefix } => {
            let s3 = S3Settings::resolve(bucket, prefix, &config.storage.s3, std::env::vars_os());
            tracing::info!("{}", s3.describe());
            s3.build()?
        }
        StorageRoot::DataDir => Arc::new(object_store::local::LocalFileSystem::new_with_prefix(
            &config.data_dir,
        )?),
    };
    Ok(Arc::new(CountingStore::new(
        store,
        metrics.store_requests.clone(),
    )))
}

/// Loads every daemon's change log, retrying while the store fails, until it
/// succeeds or `stopping` resolves (then `false`).
async fn load(
    follower: &Follower,
    retry: Duration,
    stopping: &mut (impl Future<Output = ()> + Unpin),
) -> bool {
    let started = std::time::Instant::now();
    loop {
        match follower.poll().await {
            Ok(report) => {
                tracing::info!(
                    daemons = report.new_daemons,
                    objects = report.objects,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "reader: change logs loaded"
                );
                return true;
            }
            Err(e) => {
                tracing::error!(error = %e, "reader: cannot read the change logs yet; retrying")
            }
        }
        tokio::select! {
            () = &mut *stopping => return false,
            () = tokio::time::sleep(retry) => {}
        }
    }
}

/// Serves reads of the whole fleet until `shutdown` completes.
pub async fn run_reader(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
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
    let metrics = Metrics::new();
    // No probe of the store: the first load says whether it answers.
    let store = reader_store(&config, &metrics)?;
    let index = Arc::new(Index::open_in_memory()?.without_catalog_marks());
    let follower = Follower::new(Arc::clone(&store), Arc::clone(&index), metrics.clone());

    let mut shutdown = Box::pin(shutdown);
    if !load(&follower, config.reader.poll_interval, &mut shutdown).await {
        return Ok(());
    }
    let (fatal, fell_behind) = tokio::sync::oneshot::channel();
    let follow_loop = follower.start(config.reader.poll_interval, fatal);
    // A reader that fell too far behind a daemon stops (with an error, so that its
    // supervisor starts it again from the latest checkpoints) rather than serve
    // that daemon's data stale for ever.
    let failure = Arc::new(std::sync::Mutex::new(None::<String>));
    let shutdown = {
        let failure = Arc::clone(&failure);
        async move {
            let failed = async move {
                match fell_behind.await {
                    Ok(e) => e,
                    Err(_) => std::future::pending().await,
                }
            };
            tokio::select! {
                () = shutdown => {}
                e = failed => {
                    tracing::error!(error = %e, "the reader stops");
                    if let Ok(mut f) = failure.lock() {
                        *f = Some(e.to_string());
                    }
                }
            }
        }
    };

    let runtime = tokio::runtime::Handle::current();
    let refresh = {
        let follower = Arc::clone(&follower);
        Refresh::new(move || {
            // Called from a blocking thread when a file the index names is gone:
            // the change that removed it may have been shipped since the last poll.
            if let Err(e) = runtime.block_on(follower.poll()) {
                tracing::warn!(error = %e, "reader: refreshing the change logs failed");
            }
        })
    };
    let reader = Reader::new(
        Arc::clone(&index),
        Files::remote(Remote {
            store: Arc::clone(&store),
            runtime: tokio::runtime::Handle::current(),
        }),
        LiveView::new(0),
    )
    .with_refresh(refresh)
    .with_metadata_cache(config.reads.metadata_cache_bytes, &metrics);
    let activity = Arc::new(Activity::default());
    let read_slots = Arc::new(tokio::sync::Semaphore::new(config.reads.max_concurrent));
    let service = ModelStoreService::read_only(
        Arc::clone(&index),
        reader.clone(),
        crate::api::Settings {
            limits: config.limits.clone(),
            reads: config.reads.clone(),
            read_slots: Arc::clone(&read_slots),
            clock: config.clock.clone(),
        },
        metrics.clone(),
        Arc::clone(&activity),
    );
    let grpc = ModelStoreServer::new(service)
        .max_decoding_message_size(config.limits.max_message_bytes)
        .max_encoding_message_size(usize::MAX)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Zstd);
    let grpc = {
        let authorizer = Arc::clone(&authorizer);
        tonic::service::interceptor::InterceptedService::new(grpc, move |req| {
            crate::api::authenticate(&authorizer, req)
        })
    };
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
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let serving = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let grace = config.not_serving_grace;
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
            tokio::time::sleep(grace).await;
            let _ = closing.send(());
        }
    };

    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_server = match config.http_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::MetricsListen { addr, source })?;
            tracing::info!(
                addr = ?listener.local_addr().ok(),
                tls = http_certs.is_some(),
                "reader HTTP: web view at /, JSON API at /api/v1, metrics at /metrics"
            );
            let state = WebState {
                index: Arc::clone(&index),
                reader: reader.clone(),
                metrics: metrics.clone(),
                activity: Arc::clone(&activity),
                reads: config.reads.clone(),
                auth: Arc::clone(&authorizer),
                serving: Arc::clone(&serving),
                gauges: Arc::new(Gauges::default),
                started: std::time::Instant::now(),
                read_slots: Arc::clone(&read_slots),
            };
            Some(tokio::spawn(web::serve(
                listener,
                http_certs.clone(),
                state,
                async {
                    let _ = http_stopped.await;
                },
            )))
        }
        None => None,
    };

    tracing::info!(
        addr = ?listener.local_addr().ok(),
        poll_interval_ms = config.reader.poll_interval.as_millis() as u64,
        "mboxd reader listening"
    );
    let received = metrics.received_bytes.clone();
    let refused = metrics.requests_refused.clone();
    let incoming = crate::tls::handshakes(
        limit_connections(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            config.max_connections,
        ),
        grpc_certs,
    );
    let served = Server::builder()
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .layer(tower::limit::GlobalConcurrencyLimitLayer::new(
            config.concurrent_requests(),
        ))
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
        } => Ok(()),
    };
    follow_loop.stop().await;
    let _ = http_stop.send(());
    if let Some(server) = http_server {
        let _ = server.await;
    }
    tracing::info!("reader stopped");
    served?;
    match failure.lock().ok().and_then(|mut f| f.take()) {
        Some(reason) => Err(ServerError::FellBehind(reason)),
        None => Ok(()),
    }
}
