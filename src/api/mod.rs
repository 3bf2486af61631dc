//! The gRPC service: `modelbox.ModelStore`.
//!
//! Each handler validates its request into typed values ([`validate`]), hands them to
//! the index or the ingest path, and maps failures through [`status`]. Blocking work
//! (index transactions, Parquet reads) runs on tokio's blocking pool.
//!
//! Authentication runs before any handler, in [`authenticate`] (a tonic
//! interceptor): it puts the request's [`Principal`] in its extensions, or answers
//! UNAUTHENTICATED. Each handler checks that principal's scope against the
//! namespace of what it touches, once that is known, and answers PERMISSION_DENIED
//! naming the namespace.

pub mod batcher;
pub mod codec;
pub mod convert;
pub mod receive;
pub mod status;
pub mod validate;

use std::sync::Arc;
use std::time::Instant;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthError, Authorizer, Principal};
use crate::config::{Limits, Reads, Scope};
use crate::index::{CatalogJournal, Index};
use crate::ingest::{Accepted, Batch, Ingest, IngestError};
use crate::model::{Clock, ExperimentRecord, MetricValue};
use crate::proto::{self, model_store_server::ModelStore};
use crate::query::Reader;
use crate::telemetry::{Metrics, Reason, ReasonLabel};
use crate::web::Activity;

use convert::{json_to_value, micros, timestamp};
use receive::ReceiveSlot;
use status::ApiError;

/// The service's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub limits: Limits,
    pub reads: Reads,
    /// `reads.max_concurrent` slots, shared with the HTTP API so that the memory
    /// bound counts each read once.
    pub read_slots: Arc<tokio::sync::Semaphore>,
    /// Decides ingest times.
    pub clock: Clock,
}

/// The ModelStore service.
#[derive(Debug, Clone)]
pub struct ModelStoreService {
    index: Arc<Index>,
    /// The write path; `None` on a reader, which answers writes
    /// FAILED_PRECONDITION.
    writes: Option<Writes>,
    reader: Reader,
    limits: Limits,
    reads: Reads,
    /// Bounds the series reads served at once (each holds up to a read's points).
    read_slots: Arc<tokio::sync::Semaphore>,
    metrics: Metrics,
    /// Points per experiment in the last minute, for the web view.
    activity: Arc<Activity>,
    /// Decides ingest times.
    clock: Clock,
}

/// A writer's write path.
#[derive(Debug, Clone)]
struct Writes {
    creates: batcher::CreateBatcher,
    ingest: Arc<Ingest>,
}

impl ModelStoreService {
    /// The service of a writer: reads and writes.
    pub fn new(
        index: Arc<Index>,
        journal: CatalogJournal,
        ingest: Arc<Ingest>,
        reader: Reader,
        settings: Settings,
        metrics: Metrics,
        activity: Arc<Activity>,
    ) -> std::io::Result<Self> {
        let writes = Writes {
            creates: batcher::CreateBatcher::start(Arc::clone(&index), journal)?,
            ingest,
        };
        Ok(Self::with(
            index,
            Some(writes),
            reader,
            settings,
            metrics,
            activity,
        ))
    }

    /// Stops the catalog's threads ([`batcher::CreateBatcher::stop`]); later
    /// creations are answered UNAVAILABLE. Blocks.
    pub fn stop_creates(&self) {
        if let Some(writes) = &self.writes {
            writes.creates.stop();
        }
    }

    /// The service of a reader: every read, and FAILED_PRECONDITION for writes.
    pub fn read_only(
        index: Arc<Index>,
        reader: Reader,
        settings: Settings,
        metrics: Metrics,
        activity: Arc<Activity>,
    ) -> Self {
        Self::with(index, None, reader, settings, metrics, activity)
    }

    fn with(
        index: Arc<Index>,
        writes: Option<Writes>,
        reader: Reader,
        settings: Settings,
        metrics: Metrics,
        activity: Arc<Activity>,
    ) -> Self {
        let Settings {
            limits,
            reads,
            read_slots,
            clock,
        } = settings;
        Self {
            index,
            writes,
            reader,
            limits,
            read_slots,
            reads,
            metrics,
            activity,
            clock,
        }
    }

    /// The write path, or FAILED_PRECONDITION on a reader.
    fn writes(&self, rpc: &'static str) -> Result<&Writes, Status> {
        self.writes
            .as_ref()
            .ok_or_else(|| ApiError::ReadOnly { rpc }.into())
    }

    /// Submits a validated batch, or passes on why it is invalid.
    async fn submit(
        &self,
        writes: &Writes,
        batch: Result<Batch, ApiError>,
        client_batch_id: &str,
        slot: &ReceiveSlot,
        started: Instant,
    ) -> Result<Accepted, Status> {
        let batch = batch?;
        let id = (!client_batch_id.is_empty()).then(|| batch.scoped_id(client_batch_id));
        let accepted = writes
            .ingest
            .submit(batch, id.as_deref(), || slot.release())
            .await
            .map_err(ApiError::from)?;
        // A duplicate was committed before; its wait is not a commit's.
        if !accepted.duplicate {
            self.metrics
                .ack_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(accepted)
    }
}

/// Counts a write's `sent` points or events as accepted, or as rejected by the
/// reason its status gives. A duplicate is acknowledged, not counted again.
fn tally(
    result: Result<Accepted, Status>,
    sent: usize,
    accepted: &Counter,
    rejected: &Family<ReasonLabel, Counter>,
) -> Result<Accepted, Status> {
    match &result {
        Ok(a) if a.duplicate => {}
        Ok(a) => {
            accepted.inc_by(a.count as u64);
        }
        Err(status) => count_rejected(status, sent, rejected),
    };
    result
}

/// Counts `sent` points or events as rejected for `status`'s reason.
fn count_rejected(status: &Status, sent: usize, rejected: &Family<ReasonLabel, Counter>) {
    rejected
        .get_or_create(&ReasonLabel {
            reason: Reason::of(status.code()),
        })
        .inc_by(sent as u64);
}

/// The tonic interceptor in front of the ModelStore service: who the request comes
/// from (its `authorization` metadata and its peer address), before anything of
/// it is decoded or looked up.
pub fn authenticate(auth: &Authorizer, mut req: Request<()>) -> Result<Request<()>, Status> {
    let header = req.metadata().get("authorization").map(|v| v.as_bytes());
    let who = auth.authenticate(req.remote_addr(), header)?;
    req.extensions_mut().insert(who);
    Ok(req)
}

/// The principal [`authenticate`] found, if it may use `scope` at all. A request
/// without one did not pass through it, and is refused; a token without the
/// scope is refused before anything is looked up or validated, so the status is
/// PERMISSION_DENIED whatever else is wrong with the request.
fn principal<T>(req: &Request<T>, scope: Scope) -> Result<Principal, Status> {
    let who = req
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or(AuthError::MissingToken)?;
    who.allow_any(scope)?;
    Ok(who)
}

/// Runs blocking work off the async runtime.
async fn blocking<T, F>(f: F) -> Result<T, ApiError>
where
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Task(e.to_string()))?
}

fn experiment_proto(r: ExperimentRecord) -> proto::Experiment {
    proto::Experiment {
        id: r.id,
        name: r.name,
        namespace: r.namespace,
        owner: r.owner,
        framework: r.framework,
        external_id: r.external_id,
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        ..Default::default()
    }
}

/// Page sizes of ListExperiments: without details an experiment takes about 200
/// bytes on the wire, with them a few KiB.
const DEFAULT_LIST_PAGE: usize = 10_000;
const DEFAULT_DETAIL_PAGE: usize = 500;
const MAX_LIST_PAGE: usize = 10_000;

fn detail_proto(d: crate::index::search::ExperimentDetail) -> proto::Experiment {
    let task = d.record.task.clone();
    proto::Experiment {
        task,
        metadata: Some(proto::Metadata {
            metadata: d
                .metadata
                .into_iter()
                .map(|(k, e)| (k, json_to_value(e.value)))
                .collect(),
        }),
        metric_summaries: d
            .summaries
            .into_iter()
            .filter(|(_, s)| s.count > 0)
            .map(|(key, s)| proto::MetricSummary {
                key,
                last: s.last,
                last_step: s.last_step,
                min: s.min,
                max: s.max,
                count: s.count,
            })
            .collect(),
        ..experiment_proto(d.record)
    }
}

fn unimplemented<T>(rpc: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "ModelStore.{rpc} is not served by mboxd, which implements experiment tracking only \
         (experiments, metadata, metrics, events)"
    )))
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl ModelStore for ModelStoreService {
    async fn create_experiment(
        &self,
        req: Request<proto::CreateExperimentRequest>,
    ) -> Reply<proto::CreateExperimentResponse> {
        let who = principal(&req, Scope::Write)?;
        let slot = ReceiveSlot::of(&req);
        let writes = self.writes("CreateExperiment")?;
        let ns = validate::namespace("namespace", req.get_ref().namespace.clone(), &self.limits)?;
        who.allow(Scope::Write, &ns)?;
        // Held in the budget until written, so that the receive slot can go: the
        // catalog commits many creations at once, and a waiting request should not
        // keep the next one from being received. With the budget full, the slot
        // stays (as it did before) rather than refusing a creation.
        let held = writes
            .ingest
            .try_hold(prost::Message::encoded_len(req.get_ref()).saturating_mul(2));
        if held.is_some() {
            slot.release();
        }
        let (new, metadata) = validate::create_experiment(req.into_inner(), &self.limits)?;
        let (record, existed) = writes
            .creates
            .create(new, metadata)
            .await
            .ok_or(ApiError::Ingest(IngestError::ShuttingDown))?
            .map_err(ApiError::from)?;
        drop(held);
        Ok(Response::new(proto::CreateExperimentResponse {
            experiment_id: record.id,
            experiment_exists: existed,
            created_at: Some(timestamp(record.created_at)),
            updated_at: Some(timestamp(record.updated_at)),
        }))
    }

    async fn get_experiment(
        &self,
        req: Request<proto::GetExperimentRequest>,
    ) -> Reply<proto::GetExperimentResponse> {
        let who = principal(&req, Scope::Read)?;
        let id = req.into_inner().id;
        if id.is_empty() {
            return Err(ApiError::invalid("id", "required").into());
        }
        let index = Arc::clone(&self.index);
        let record = blocking(move || {
            index
                .get_experiment(&id)?
                .ok_or_else(|| ApiError::experiment_not_found("id", &id))
        })
        .await?;
        who.allow(Scope::Read, &record.namespace)?;
        Ok(Response::new(proto::GetExperimentResponse {
            experiment: Some(experiment_proto(record)),
        }))
    }

    async fn list_experiments(
        &self,
        req: Request<proto::ListExperimentsRequest>,
    ) -> Reply<proto::ListExperimentsResponse> {
        let who = principal(&req, Scope::Read)?;
        let req = req.into_inner();
        let ns = validate::namespace("namespace", req.namespace.clone(), &self.limits)?;
        who.allow(Scope::Read, &ns)?;
        let query = validate::search(&req.filter, &req.order_by, &req.page_token)?;
        let details = req.include_details;
        // ModelBox clients send no page size: the newest experiments, up to a page
        // that fits a standard 4 MiB client limit.
        let page_size = match req.page_size {
            0 if details => DEFAULT_DETAIL_PAGE,
            0 => DEFAULT_LIST_PAGE,
            n => (n as usize).min(MAX_LIST_PAGE),
        };
        let index = Arc::clone(&self.index);
        let page = blocking(move || {
            Ok(index.search(Some(&ns), &query.search, page_size, query.cursor.as_ref())?)
        })
        .await?;
        Ok(Response::new(proto::ListExperimentsResponse {
            experiments: page
                .experiments
                .into_iter()
                .map(|d| {
                    if details {
                        detail_proto(d)
                    } else {
                        experiment_proto(d.record)
                    }
                })
                .collect(),
            next_page_token: page.next.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    async fn update_metadata(
        &self,
        req: Request<proto::UpdateMetadataRequest>,
    ) -> Reply<proto::UpdateMetadataResponse> {
        let who = principal(&req, Scope::Write)?;
        self.writes("UpdateMetadata")?;
        let req = req.into_inner();
        let experiment = validate::experiment("parent_id", &req.parent_id, &self.index)?;
        who.allow(Scope::Write, &experiment.namespace)?;
        let entries = validate::metadata("metadata", req.metadata, &self.limits)?;
        let written = i32::try_from(entries.len()).unwrap_or(i32::MAX);
        let index = Arc::clone(&self.index);
        let updated_at =
            blocking(move || Ok(index.update_metadata(&req.parent_id, &entries)?)).await?;
        Ok(Response::new(proto::UpdateMetadataResponse {
            num_keys_written: written,
            updated_at: Some(timestamp(updated_at)),
        }))
    }

    async fn list_metadata(
        &self,
        req: Request<proto::ListMetadataRequest>,
    ) -> Reply<proto::ListMetadataResponse> {
        let who = principal(&req, Scope::Read)?;
        let parent_id = req.into_inner().parent_id;
        let experiment = validate::experiment("parent_id", &parent_id, &self.index)?;
        who.allow(Scope::Read, &experiment.namespace)?;
        let index = Arc::clone(&self.index);
        let entries = blocking(move || Ok(index.list_metadata(&parent_id)?)).await?;
        Ok(Response::new(proto::ListMetadataResponse {
            metadata: entries
                .into_iter()
                .map(|(k, e)| (k, json_to_value(e.value)))
                .collect(),
        }))
    }

    async fn log_metrics(
        &self,
        req: Request<proto::LogMetricsRequest>,
    ) -> Reply<proto::LogMetricsResponse> {
        let started = Instant::now();
        let m = &self.metrics;
        let sent = {
            let r = req.get_ref();
            r.blocks.iter().map(|b| b.steps.len()).sum::<usize>() + usize::from(r.value.is_some())
        };
        let who = principal(&req, Scope::Write)
            .inspect_err(|s| count_rejected(s, sent, &m.points_rejected))?;
        let slot = ReceiveSlot::of(&req);
        let writes = self.writes("LogMetrics")?;
        let mut req = req.into_inner();
        let client_batch_id = std::mem::take(&mut req.client_batch_id);
        validate::client_batch_id(&client_batch_id, &self.limits)?;
        // Every block's experiment must be writable, or nothing of the batch is.
        let batch = validate::log_metrics(req, &self.index, &self.limits, self.clock.now())
            .and_then(|b| {
                for block in b.blocks() {
                    who.allow(Scope::Write, &block.experiment.namespace)?;
                }
                Ok(b)
            });
        let per_experiment: Vec<(Arc<str>, u64)> = match &batch {
            Ok(b) => b
                .blocks()
                .iter()
                .map(|b| (Arc::clone(&b.experiment.id), b.len() as u64))
                .collect(),
            Err(_) => Vec::new(),
        };
        let accepted = tally(
            self.submit(
                writes,
                batch.map(Batch::Metrics),
                &client_batch_id,
                &slot,
                started,
            )
            .await,
            sent,
            &m.points_accepted,
            &m.points_rejected,
        )?;
        if !accepted.duplicate {
            self.activity
                .record(per_experiment.iter().map(|(id, n)| (id, *n)));
        }
        Ok(Response::new(proto::LogMetricsResponse {
            points_accepted: accepted.count as u64,
            duplicate: accepted.duplicate,
        }))
    }

    async fn get_metrics(
        &self,
        req: Request<proto::GetMetricsRequest>,
    ) -> Reply<proto::GetMetricsResponse> {
        let who = principal(&req, Scope::Read)?;
        let req = req.into_inner();
        let experiment = validate::experiment("parent_id", &req.parent_id, &self.index)?;
        who.allow(Scope::Read, &experiment.namespace)?;
        let query = validate::series_query(&req, &self.limits, &self.reads)?;
        let _slot = self
            .read_slots
            .acquire()
            .await
            .map_err(|e| ApiError::Task(e.to_string()))?;
        let reader = self.reader.clone();
        let page = blocking(move || Ok(reader.series(&experiment, &query)?)).await?;
        use proto::metrics_value::Value as V;
        let value = |v: MetricValue| match v {
            MetricValue::Double(d) if req.full_precision => V::DVal(d),
            MetricValue::Double(d) => V::FVal(d as f32),
            MetricValue::String(s) => V::STensor(s),
            MetricValue::Bytes(b) => V::BTensor(b),
        };
        let metrics = page
            .series
            .into_iter()
            .map(|s| proto::Metrics {
                values: s
                    .steps
                    .iter()
                    .zip(&s.wallclocks)
                    .zip(s.values)
                    .map(|((&step, &wallclock), v)| proto::MetricsValue {
                        step: step.max(0) as u64,
                        wallclock_time: wallclock.max(0) as u64,
                        value: Some(value(v)),
                    })
                    .collect(),
                key: s.key,
                bucketed: s.bucketed,
                min: s.min,
                max: s.max,
                total_points: s.total_points,
            })
            .collect();
        Ok(Response::new(proto::GetMetricsResponse {
            metrics,
            next_page_token: page.next.map(|c| c.encode()).unwrap_or_default(),
        }))
    }

    async fn log_event(
        &self,
        req: Request<proto::LogEventRequest>,
    ) -> Reply<proto::LogEventResponse> {
        let started = Instant::now();
        let m = &self.metrics;
        let sent = usize::from(req.get_ref().event.is_some()) + req.get_ref().events.len();
        let who = principal(&req, Scope::Write)
            .inspect_err(|s| count_rejected(s, sent, &m.events_rejected))?;
        let slot = ReceiveSlot::of(&req);
        let writes = self.writes("LogEvent")?;
        let mut req = req.into_inner();
        let now = self.clock.now();
        let client_batch_id = std::mem::take(&mut req.client_batch_id);
        validate::client_batch_id(&client_batch_id, &self.limits)?;
        let batch = validate::log_event(req, &self.index, &self.limits, now).and_then(|b| {
            who.allow(Scope::Write, &b.experiment().namespace)?;
            Ok(b)
        });
        let accepted = tally(
            self.submit(
                writes,
                batch.map(Batch::Events),
                &client_batch_id,
                &slot,
                started,
            )
            .await,
            sent,
            &m.events_accepted,
            &m.events_rejected,
        )?;
        Ok(Response::new(proto::LogEventResponse {
            created_at: Some(timestamp(now)),
            events_accepted: accepted.count as u64,
            duplicate: accepted.duplicate,
        }))
    }

    async fn list_events(
        &self,
        req: Request<proto::ListEventsRequest>,
    ) -> Reply<proto::ListEventsResponse> {
        let who = principal(&req, Scope::Read)?;
        let req = req.into_inner();
        let experiment = validate::experiment("parent_id", &req.parent_id, &self.index)?;
        who.allow(Scope::Read, &experiment.namespace)?;
        let since = req
            .since
            .as_ref()
            .map(|ts| micros("since", ts))
            .transpose()?;
        let reader = self.reader.clone();
        let mut events = blocking(move || Ok(reader.events(&experiment)?)).await?;
        if let Some(since) = since {
            events.retain(|e| e.event.wallclock >= since);
        }
        let events = events
            .into_iter()
            .map(|e| {
                let metadata = serde_json::from_str::<serde_json::Value>(&e.event.metadata_json)
                    .ok()
                    .and_then(|v| match v {
                        serde_json::Value::Object(m) => Some(m),
                        _ => None,
                    })
                    .unwrap_or_default();
                proto::Event {
                    name: e.event.name,
                    source: Some(proto::EventSource {
                        name: e.event.source,
                    }),
                    wallclock_time: Some(timestamp(e.event.wallclock)),
                    metadata: Some(proto::Metadata {
                        metadata: metadata
                            .into_iter()
                            .map(|(k, v)| (k, json_to_value(v)))
                            .collect(),
                    }),
                }
            })
            .collect();
        Ok(Response::new(proto::ListEventsResponse { events }))
    }

    async fn create_model(
        &self,
        _: Request<proto::CreateModelRequest>,
    ) -> Reply<proto::CreateModelResponse> {
        unimplemented("CreateModel")
    }

    async fn list_models(
        &self,
        _: Request<proto::ListModelsRequest>,
    ) -> Reply<proto::ListModelsResponse> {
        unimplemented("ListModels")
    }

    async fn create_model_version(
        &self,
        _: Request<proto::CreateModelVersionRequest>,
    ) -> Reply<proto::CreateModelVersionResponse> {
        unimplemented("CreateModelVersion")
    }

    async fn list_model_versions(
        &self,
        _: Request<proto::ListModelVersionsRequest>,
    ) -> Reply<proto::ListModelVersionsResponse> {
        unimplemented("ListModelVersions")
    }

    async fn create_checkpoint(
        &self,
        _: Request<proto::CreateCheckpointRequest>,
    ) -> Reply<proto::CreateCheckpointResponse> {
        unimplemented("CreateCheckpoint")
    }

    async fn list_checkpoints(
        &self,
        _: Request<proto::ListCheckpointsRequest>,
    ) -> Reply<proto::ListCheckpointsResponse> {
        unimplemented("ListCheckpoints")
    }

    async fn get_checkpoint(
        &self,
        _: Request<proto::GetCheckpointRequest>,
    ) -> Reply<proto::GetCheckpointResponse> {
        unimplemented("GetCheckpoint")
    }

    async fn upload_file(
        &self,
        _: Request<Streaming<proto::UploadFileRequest>>,
    ) -> Reply<proto::UploadFileResponse> {
        unimplemented("UploadFile")
    }

    type DownloadFileStream = tokio_stream::Empty<Result<proto::DownloadFileResponse, Status>>;

    async fn download_file(
        &self,
        _: Request<proto::DownloadFileRequest>,
    ) -> Reply<Self::DownloadFileStream> {
        unimplemented("DownloadFile")
    }

    async fn track_artifacts(
        &self,
        _: Request<proto::TrackArtifactsRequest>,
    ) -> Reply<proto::TrackArtifactsResponse> {
        unimplemented("TrackArtifacts")
    }

    async fn list_tracked_artifacts(
        &self,
        _: Request<proto::ListTrackedArtifactsRequest>,
    ) -> Reply<proto::ListTrackedArtifactsResponse> {
        unimplemented("ListTrackedArtifacts")
    }

    type WatchNamespaceStream = tokio_stream::Empty<Result<proto::WatchNamespaceResponse, Status>>;

    async fn watch_namespace(
        &self,
        _: Request<proto::WatchNamespaceRequest>,
    ) -> Reply<Self::WatchNamespaceStream> {
        unimplemented("WatchNamespace")
    }

    async fn get_cluster_members(
        &self,
        _: Request<proto::GetClusterMembersRequest>,
    ) -> Reply<proto::GetClusterMembersResponse> {
        unimplemented("GetClusterMembers")
    }
}
