//! The HTTP listener: Prometheus `/metrics`, `/healthz` for probes, the read-only
//! web view (static files embedded in the binary) and the JSON API it is built on
//! (`docs/http-api.md`). Every read goes through the same [`Reader`] and index
//! search as gRPC.
//!
//! Only `/api/` is protected: [`authenticate`] finds the caller's [`Principal`]
//! (401 without a valid token, unless exempt; with authentication off, the API
//! serves loopback clients only), and each handler checks it may read the
//! namespace of what it returns (403 naming the namespace). Pages, assets,
//! `/metrics` and `/healthz` stay open for browsers, Prometheus and probes. With
//! TLS configured the whole listener speaks HTTPS ([`HttpListener`]).

pub mod activity;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Extension, Path, RawQuery, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value as Json, json};

use crate::auth::{AuthError, Authorizer, Principal, Visible};
use crate::config::{Reads, Scope};
use crate::index::search::{ExperimentDetail, SearchCursor, framework_name};
use crate::index::{Index, IndexError};
use crate::model::{ExperimentRef, MetricValue};
use crate::paths::valid_namespace;
use crate::query::{QueryError, Reader, SeriesQuery};
use crate::search::{Search, parse_filter, parse_order_by};
use crate::telemetry::{Metrics, Reason, ReasonLabel};
use crate::tls::{Certificates, MaybeTls};

pub use activity::Activity;

mod assets {
    include!(concat!(env!("OUT_DIR"), "/web_assets.rs"));
}

/// Figures the health endpoint reads from other components.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub buffered_bytes: u64,
    pub memory_budget_bytes: u64,
    pub queue_depth: u64,
    pub wal_bytes: u64,
    pub spool_bytes: u64,
    pub spool_files: u64,
}

/// What the HTTP handlers share.
#[derive(Clone)]
pub struct WebState {
    pub index: Arc<Index>,
    pub reader: Reader,
    pub metrics: Metrics,
    pub activity: Arc<Activity>,
    pub reads: Reads,
    /// Who may read what through the API.
    pub auth: Arc<Authorizer>,
    /// False once shutdown begins: `/healthz` answers 503, as gRPC health
    /// answers NOT_SERVING.
    pub serving: Arc<AtomicBool>,
    pub gauges: Arc<dyn Fn() -> Gauges + Send + Sync>,
    pub started: Instant,
    pub read_slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for WebState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebState")
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The HTTP listener's connections, in TLS when certificates are configured
/// (handshakes off the accept loop, see [`crate::tls::handshakes`]).
pub struct HttpListener {
    local: SocketAddr,
    connections: std::pin::Pin<
        Box<dyn futures::Stream<Item = std::io::Result<MaybeTls<tokio::net::TcpStream>>> + Send>,
    >,
}

impl std::fmt::Debug for HttpListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpListener")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl HttpListener {
    pub fn new(
        listener: tokio::net::TcpListener,
        certificates: Option<Arc<Certificates>>,
    ) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let accepted = tokio_stream::wrappers::TcpListenerStream::new(listener);
        Ok(Self {
            local,
            connections: Box::pin(crate::tls::handshakes(accepted, certificates)),
        })
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = MaybeTls<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        use futures::StreamExt;
        loop {
            match self.connections.next().await {
                Some(Ok(io)) => {
                    // A peer that is already gone counts as not on loopback.
                    let peer = io
                        .inner()
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    return (io, peer);
                }
                Some(Err(e)) => {
                    // Out of file descriptors and the like: wait, as axum does.
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// The client's address, for the loopback exemption.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

impl Connected<axum::serve::IncomingStream<'_, HttpListener>> for Peer {
    fn connect_info(stream: axum::serve::IncomingStream<'_, HttpListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Serves the HTTP listener until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    certificates: Option<Arc<Certificates>>,
    state: WebState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        HttpListener::new(listener, certificates)?,
        router(state).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

/// The routes.
pub fn router(state: WebState) -> Router {
    let api = Router::new()
        .route("/v1/namespaces", get(namespaces))
        .route("/v1/experiments", get(experiments))
        .route("/v1/experiments/{id}", get(experiment))
        .route("/v1/experiments/{id}/events", get(events))
        .route("/v1/experiments/{id}/series", get(series))
        .route("/v1/health", get(health))
        .fallback(api_not_found)
        .method_not_allowed_fallback(api_method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .layer(middleware::map_response_with_state(
            state.clone(),
            count_refused,
        ));
    Router::new()
        .route("/metrics", get(prometheus))
        .route("/healthz", get(healthz))
        .route("/", get(page))
        .route("/experiments/{id}", get(page))
        .route("/compare", get(page))
        .route("/health", get(page))
        .route("/assets/{*path}", get(asset))
        .nest("/api", api.with_state(state.clone()))
        .with_state(state)
}

// --- responses ---------------------------------------------------------------

fn json_response(status: StatusCode, body: &Json) -> Response {
    let mut r = (status, body.to_string()).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    r
}

fn ok(body: Json) -> Response {
    json_response(StatusCode::OK, &body)
}

/// Why an API request failed, as the client sees it.
#[derive(Debug)]
enum HttpError {
    /// A 400 naming the parameter.
    Bad {
        parameter: String,
        message: String,
    },
    NotFound(String),
    Unavailable(String),
    /// 401 or 403.
    Auth(AuthError),
    /// Logged; the client is told only that it happened.
    Internal(String),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        match self {
            HttpError::Bad { parameter, message } => json_response(
                StatusCode::BAD_REQUEST,
                &json!({"error": format!("{parameter}: {message}"), "parameter": parameter}),
            ),
            HttpError::NotFound(message) => {
                json_response(StatusCode::NOT_FOUND, &json!({ "error": message }))
            }
            HttpError::Auth(e) => auth_response(&e),
            HttpError::Unavailable(message) => json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({ "error": message }),
            ),
            HttpError::Internal(e) => {
                tracing::error!(error = %e, "HTTP API request failed");
                json_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    &json!({"error": "internal error; see the mboxd log"}),
                )
            }
        }
    }
}

fn bad(parameter: &str, message: impl std::fmt::Display) -> HttpError {
    HttpError::Bad {
        parameter: parameter.to_owned(),
        message: message.to_string(),
    }
}

impl From<AuthError> for HttpError {
    fn from(e: AuthError) -> Self {
        HttpError::Auth(e)
    }
}

fn not_found(message: String) -> HttpError {
    HttpError::NotFound(message)
}

fn internal(e: impl std::fmt::Display) -> HttpError {
    HttpError::Internal(e.to_string())
}

fn from_query_error(e: QueryError) -> HttpError {
    match e {
        QueryError::Token(t) => bad("page_token", t),
        QueryError::Open(s) if matches!(s, crate::sink::SinkError::Remote { .. }) => {
            HttpError::Unavailable(format!("reading from the remote store failed: {s}"))
        }
        e => internal(e),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, HttpError> + Send + 'static,
) -> Result<T, HttpError> {
    tokio::task::spawn_blocking(f).await.map_err(internal)?
}

// --- authorization -------------------------------------------------------------

/// 401 (no valid token; with `WWW-Authenticate: Bearer`, so the page asks for
/// one) or 403 (a token without the permission, or a client off loopback while
/// authentication is off).
fn auth_response(e: &AuthError) -> Response {
    let status = if e.is_unauthenticated() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    };
    let mut r = json_response(status, &json!({ "error": e.to_string() }));
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

/// Finds who an API request comes from (see [`Authorizer::authenticate_http`])
/// before anything is looked up, and hands the [`Principal`] to the handler. Pages
/// and assets need no token: a browser cannot add the header to a page load; the
/// page asks for the token when the API answers 401.
async fn authenticate(
    State(state): State<WebState>,
    ConnectInfo(peer): ConnectInfo<Peer>,
    mut request: Request,
    next: Next,
) -> Response {
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    match state.auth.authenticate_http(Some(peer.0), header) {
        Ok(who) => {
            request.extensions_mut().insert(who);
            next.run(request).await
        }
        Err(e) => auth_response(&e),
    }
}

/// Counts API requests refused with 401 or 403 (only the auth checks answer those).
async fn count_refused(State(state): State<WebState>, response: Response) -> Response {
    let reason = match response.status() {
        StatusCode::UNAUTHORIZED => Reason::unauthenticated,
        StatusCode::FORBIDDEN => Reason::permission_denied,
        _ => return response,
    };
    state
        .metrics
        .requests_refused
        .get_or_create(&ReasonLabel { reason })
        .inc();
    response
}

async fn api_not_found(uri: axum::http::Uri) -> HttpError {
    not_found(format!("no API endpoint at {}", uri.path()))
}

async fn api_method_not_allowed(method: Method) -> Response {
    let mut r = json_response(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": format!("{method} is not allowed: the API is read-only")}),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
    r
}

// --- pages and files -----------------------------------------------------------

fn content_type(path: &str) -> &'static str {
    match path.rsplit_once('.').map(|(_, ext)| ext) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("png") => "image/png",
        Some("svg") => "image/svg+xml",
        _ => "text/plain; charset=utf-8",
    }
}

const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data:; connect-src 'self'; object-src 'none'; base-uri 'none'; \
                   form-action 'self'";

fn file(path: &str) -> Option<Response> {
    let (_, bytes) = assets::ASSETS.iter().find(|(p, _)| *p == path)?;
    let mut r = Response::new(Body::from(*bytes));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type(path)),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if path.ends_with(".html") {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static(CSP),
        );
    }
    Some(r)
}

async fn page() -> Result<Response, HttpError> {
    file("index.html").ok_or_else(|| not_found("the web view is not built in".into()))
}

async fn asset(Path(path): Path<String>) -> Result<Response, HttpError> {
    file(&path).ok_or_else(|| not_found(format!("no file {path}")))
}

/// For probes: 200 while serving, 503 once shutdown has begun (as gRPC health's
/// NOT_SERVING). Reachable means start-up (WAL replay) is done: the listener opens
/// only then.
async fn healthz(State(state): State<WebState>) -> Response {
    let (status, body) = if state.serving.load(Ordering::Relaxed) {
        (StatusCode::OK, "SERVING\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
    };
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

async fn prometheus(State(state): State<WebState>) -> Response {
    let g = (state.gauges)();
    let m = &state.metrics;
    m.buffered_bytes.set(g.buffered_bytes as i64);
    m.spool_bytes.set(g.spool_bytes as i64);
    m.spool_files.set(g.spool_files as i64);
    match state.index.summaries_pending() {
        Ok(files) => {
            m.summaries_pending_files.set(files as i64);
        }
        Err(e) => tracing::warn!(error = %e, "reading the summary backlog for /metrics"),
    }
    m.wal_bytes.set(g.wal_bytes as i64);
    match state.index.catalog_clock_lead() {
        Ok(lead) => {
            m.catalog_clock_lead_seconds.set(lead as f64 / 1e6);
        }
        Err(e) => tracing::warn!(error = %e, "reading the catalog clock for /metrics"),
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

// --- parameters ----------------------------------------------------------------

/// The query string's parameters, repeated ones kept in order.
fn params(raw: Option<String>) -> Vec<(String, String)> {
    form_urlencoded::parse(raw.unwrap_or_default().as_bytes())
        .into_owned()
        .collect()
}

fn last<'a>(params: &'a [(String, String)], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// A plain decimal integer parameter within `range`.
fn integer(
    params: &[(String, String)],
    name: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Result<Option<i64>, HttpError> {
    let Some(text) = last(params, name) else {
        return Ok(None);
    };
    let n = (!text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()))
        .then(|| text.parse::<i64>().ok())
        .flatten()
        .filter(|n| range.contains(n));
    match n {
        Some(n) => Ok(Some(n)),
        None => Err(bad(
            name,
            format!(
                "{text:?} is not an integer from {} to {}",
                range.start(),
                range.end()
            ),
        )),
    }
}

fn millis(micros: i64) -> i64 {
    micros.div_euclid(1000)
}

/// A number for JSON: null for NaN and infinities.
fn number(v: f64) -> Json {
    if v.is_finite() { json!(v) } else { Json::Null }
}

fn experiment_json(d: ExperimentDetail, activity: &Activity) -> Json {
    let r = d.record;
    let metadata: serde_json::Map<String, Json> =
        d.metadata.into_iter().map(|(k, e)| (k, e.value)).collect();
    let summaries: serde_json::Map<String, Json> = d
        .summaries
        .into_iter()
        .filter(|(_, s)| s.count > 0)
        .map(|(k, s)| {
            (
                k,
                json!({"last": number(s.last), "last_step": s.last_step, "min": number(s.min),
                       "max": number(s.max), "count": s.count}),
            )
        })
        .collect();
    json!({
        "id": r.id,
        "name": r.name,
        "namespace": r.namespace,
        "owner": r.owner,
        "framework": framework_name(r.framework),
        "task": r.task,
        "external_id": r.external_id,
        "created_at": millis(r.created_at),
        "updated_at": millis(r.updated_at),
        "metadata": metadata,
        "summaries": summaries,
        "points_last_minute": activity.last_minute(&r.id),
    })
}

fn detail(
    index: &Index,
    id: &str,
) -> Result<Option<(ExperimentDetail, ExperimentRef)>, IndexError> {
    let Some(record) = index.get_experiment(id)? else {
        return Ok(None);
    };
    let r = ExperimentRef {
        id: Arc::from(record.id.as_str()),
        namespace: Arc::from(record.namespace.as_str()),
    };
    Ok(Some((
        ExperimentDetail {
            metadata: index.list_metadata(id)?,
            summaries: index.summaries(id)?,
            record,
        },
        r,
    )))
}

fn unknown_experiment(id: &str) -> HttpError {
    not_found(format!("experiment {id} not found"))
}

// --- handlers ------------------------------------------------------------------

async fn namespaces(
    State(state): State<WebState>,
    Extension(who): Extension<Principal>,
) -> Result<Response, HttpError> {
    who.allow_any(Scope::Read)?;
    let index = Arc::clone(&state.index);
    let mut ns = blocking(move || index.namespaces().map_err(internal)).await?;
    if let Visible::Only(readable) = who.readable() {
        ns.retain(|n| readable.contains(n));
    }
    Ok(ok(json!({ "namespaces": ns })))
}

const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

async fn experiments(
    State(state): State<WebState>,
    Extension(who): Extension<Principal>,
    RawQuery(raw): RawQuery,
) -> Result<Response, HttpError> {
    let p = params(raw);
    let run = || -> Result<_, HttpError> {
        let namespace = match last(&p, "namespace") {
            None | Some("") => None,
            Some(ns) if valid_namespace(ns, 256) => Some(ns.to_owned()),
            Some(ns) => {
                return Err(bad(
                    "namespace",
                    format!("{ns:?} is not a namespace ([A-Za-z0-9._-])"),
                ));
            }
        };
        let conditions =
            parse_filter(last(&p, "filter").unwrap_or("")).map_err(|e| bad("filter", e))?;
        let order_by = p
            .iter()
            .filter(|(k, _)| k == "order_by")
            .map(|(_, v)| parse_order_by(v).map_err(|e| bad("order_by", e)))
            .collect::<Result<Vec<_>, _>>()?;
        let page_size = integer(&p, "page_size", 1..=MAX_PAGE)?.unwrap_or(DEFAULT_PAGE);
        let cursor = match last(&p, "page_token") {
            None | Some("") => None,
            Some(t) => Some(
                SearchCursor::decode(t)
                    .ok_or_else(|| bad("page_token", "not a page token from mboxd"))?,
            ),
        };
        Ok((
            namespace,
            Search {
                conditions,
                order_by,
            },
            page_size as usize,
            cursor,
        ))
    };
    let (namespace, search, page_size, cursor) = run()?;
    // One namespace: it must be readable. Every namespace: those readable.
    let visible = match &namespace {
        Some(ns) => {
            who.allow(Scope::Read, ns)?;
            None
        }
        None => {
            who.allow_any(Scope::Read)?;
            match who.readable() {
                Visible::All => None,
                Visible::Only(set) => Some(set),
            }
        }
    };
    let index = Arc::clone(&state.index);
    let activity = Arc::clone(&state.activity);
    let page = blocking(move || {
        index
            .search_within(
                namespace.as_deref(),
                visible.as_ref(),
                &search,
                page_size,
                cursor.as_ref(),
            )
            .map_err(internal)
    })
    .await?;
    Ok(ok(json!({
        "experiments": page.experiments.into_iter().map(|d| experiment_json(d, &activity)).collect::<Vec<_>>(),
        "next_page_token": page.next.map(|c| c.encode()).unwrap_or_default(),
    })))
}

async fn experiment(
    State(state): State<WebState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    who.allow_any(Scope::Read)?;
    let (index, reader, activity) = (
        Arc::clone(&state.index),
        state.reader.clone(),
        Arc::clone(&state.activity),
    );
    let found = blocking(move || {
        let Some((d, r)) = detail(&index, &id).map_err(internal)? else {
            return Err(unknown_experiment(&id));
        };
        who.allow(Scope::Read, &r.namespace)?;
        let keys = reader.keys(&r).map_err(from_query_error)?;
        Ok((d, keys))
    })
    .await?;
    let (d, keys) = found;
    let mut body = experiment_json(d, &activity);
    body["keys"] = json!(keys);
    Ok(ok(body))
}

async fn events(
    State(state): State<WebState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, HttpError> {
    who.allow_any(Scope::Read)?;
    let p = params(raw);
    let since = integer(&p, "since", 0..=i64::MAX / 1000)?;
    let (index, reader) = (Arc::clone(&state.index), state.reader.clone());
    let events = blocking(move || {
        let Some(r) = index.experiment_ref(&id).map_err(internal)? else {
            return Err(unknown_experiment(&id));
        };
        who.allow(Scope::Read, &r.namespace)?;
        reader.events(&r).map_err(from_query_error)
    })
    .await?;
    Ok(ok(json!({
        "events": events
                .into_iter()
                .filter(|e| since.is_none_or(|s| e.event.wallclock >= s * 1000))
                .map(|e| json!({
                    "name": e.event.name,
                    "source": e.event.source,
                    "wallclock": millis(e.event.wallclock),
                    "metadata": serde_json::from_str::<Json>(&e.event.metadata_json)
                        .ok()
                        .filter(Json::is_object)
                        .unwrap_or_else(|| json!({})),
                }))
                .collect::<Vec<_>>(),
    })))
}

const MAX_BUCKETS: i64 = 100_000;
const DEFAULT_BUCKETS: i64 = 1000;

async fn series(
    State(state): State<WebState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, HttpError> {
    who.allow_any(Scope::Read)?;
    let p = params(raw);
    let parsed = (|| -> Result<_, HttpError> {
        let start = integer(&p, "start_step", 0..=i64::MAX)?;
        let end = integer(&p, "end_step", 0..=i64::MAX)?;
        if let (Some(s), Some(e)) = (start, end)
            && e < s
        {
            return Err(bad("end_step", format!("{e} is before start_step {s}")));
        }
        let max_points = integer(&p, "max_points", 1..=MAX_BUCKETS)?.unwrap_or(DEFAULT_BUCKETS);
        let mut keys: Vec<String> = p
            .iter()
            .filter(|(k, _)| k == "keys")
            .map(|(_, v)| v.clone())
            .collect();
        keys.sort();
        keys.dedup();
        Ok((start, end, max_points as usize, keys))
    })();
    let (start, end, max_points, keys) = parsed?;
    let _slot = state.read_slots.acquire().await.map_err(internal)?;
    let (index, reader, reads) = (
        Arc::clone(&state.index),
        state.reader.clone(),
        state.reads.clone(),
    );
    let found = blocking(move || {
        let Some(r) = index.experiment_ref(&id).map_err(internal)? else {
            return Err(unknown_experiment(&id));
        };
        who.allow(Scope::Read, &r.namespace)?;
        let known = reader.keys(&r).map_err(from_query_error)?;
        let wanted: Vec<String> = if keys.is_empty() {
            known
        } else {
            keys.into_iter()
                .filter(|k| known.binary_search(k).is_ok())
                .collect()
        };
        let mut query = SeriesQuery {
            keys: Some(wanted.clone()),
            start_step: start,
            end_step: end,
            max_points: Some(max_points),
            page_points: usize::MAX,
            page_bytes: reads.max_page_bytes,
            cursor: None,
            read_points: reads.read_points,
        };
        let mut out: BTreeMap<String, Json> = BTreeMap::new();
        loop {
            let page = reader.series(&r, &query).map_err(from_query_error)?;
            for s in page.series {
                let values: Vec<Json> = s
                    .values
                    .into_iter()
                    .map(|v| match v {
                        MetricValue::Double(d) => number(d),
                        _ => Json::Null,
                    })
                    .collect();
                let entry = out.entry(s.key.clone()).or_insert_with(|| {
                    json!({"key": s.key, "bucketed": s.bucketed, "total_points": s.total_points,
                           "steps": [], "wallclocks": [], "values": [],
                           "min": if s.bucketed { json!([]) } else { Json::Null },
                           "max": if s.bucketed { json!([]) } else { Json::Null }})
                });
                extend(&mut entry["steps"], s.steps.into_iter().map(|v| json!(v)));
                extend(
                    &mut entry["wallclocks"],
                    s.wallclocks.into_iter().map(|v| json!(v)),
                );
                extend(&mut entry["values"], values.into_iter());
                if s.bucketed {
                    extend(&mut entry["min"], s.min.into_iter().map(number));
                    extend(&mut entry["max"], s.max.into_iter().map(number));
                }
            }
            match page.next {
                Some(c) => query.cursor = Some(c),
                None => break,
            }
        }
        // A key with no points in the range is answered empty.
        for key in wanted {
            out.entry(key.clone()).or_insert_with(|| {
                json!({"key": key, "bucketed": false, "total_points": 0, "steps": [],
                       "wallclocks": [], "values": [], "min": null, "max": null})
            });
        }
        Ok(out.into_values().collect::<Vec<_>>())
    })
    .await?;
    Ok(ok(json!({ "series": found })))
}

fn extend(array: &mut Json, items: impl Iterator<Item = Json>) {
    if let Some(a) = array.as_array_mut() {
        a.extend(items);
    }
}

async fn health(
    State(state): State<WebState>,
    Extension(who): Extension<Principal>,
    _headers: HeaderMap,
) -> Result<Response, HttpError> {
    // Figures of the whole daemon: for any token that may read.
    who.allow_any(Scope::Read)?;
    let g = (state.gauges)();
    let m = &state.metrics;
    let family_total = |f: &prometheus_client::metrics::family::Family<
        crate::telemetry::TableLabel,
        prometheus_client::metrics::counter::Counter,
    >| {
        [
            crate::telemetry::TableName::metrics,
            crate::telemetry::TableName::events,
        ]
        .into_iter()
        .map(|table| {
            f.get_or_create(&crate::telemetry::TableLabel { table })
                .get()
        })
        .sum::<u64>()
    };
    let rejected: u64 = crate::telemetry::Reason::ALL
        .iter()
        .map(|&reason| {
            m.points_rejected
                .get_or_create(&crate::telemetry::ReasonLabel { reason })
                .get()
        })
        .sum();
    Ok(ok(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs_f64(),
        "points_accepted_total": m.points_accepted.get(),
        "events_accepted_total": m.events_accepted.get(),
        "points_rejected_total": rejected,
        "buffered_bytes": g.buffered_bytes,
        "memory_budget_bytes": g.memory_budget_bytes,
        "queue_depth": g.queue_depth,
        "wal_appends_total": m.wal_appends.get(),
        "wal_bytes": g.wal_bytes,
        "files_published_total": family_total(&m.files_published),
        "published_bytes_total": family_total(&m.published_bytes),
        "spool_bytes": g.spool_bytes,
        "spool_files": g.spool_files,
        "summaries_pending_files": state
            .index
            .summaries_pending()
            .map_err(|e| HttpError::Internal(e.to_string()))?,
        "compactions_total": m.compactions.get(),
        "compacted_files_total": m.compacted_files.get(),
    })))
}
