//! Run search at scale (issue #15): starts a real mboxd release binary, measures an
//! empty daemon's RSS, creates `--experiments` experiments from `--clients`
//! clients, gives each 5 metadata keys (UpdateMetadata) and 3 metric series
//! (LogMetrics, many experiments' blocks per request), then times a filtered and
//! sorted search page of 100, stops mboxd with SIGTERM, restarts it on the same data
//! folder, and reports the time to serving and the RSS after restart. Ends with a
//! Markdown table of the figures against the issue's targets.
//!
//! ```text
//! cargo build --release --bin mboxd
//! cargo bench --bench search                                        # the issue's size: 1,000,000 from 64 clients
//! cargo bench --bench search -- --experiments 20000 --clients 16    # a quick check
//! ```
//!
//! The search page (`--searches` timed runs, after one warm-up) is
//! `params.optimizer = "adamw" and metrics.val/loss.last < 0.5` ordered by
//! `metrics.val/acc.max DESC`, 100 experiments with details; every page is checked
//! against the top 100 the bench computes itself from the values it sent.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use mboxd::proto;
use mboxd::proto::model_store_client::ModelStoreClient;
use prost_types::value::Kind;
use tonic::transport::{Channel, Endpoint};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "mboxd run-search benchmark (issue #15)")]
struct Args {
    /// Experiments to create.
    #[arg(long, default_value_t = 1_000_000)]
    experiments: usize,
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// mboxd binary [default: the release mboxd cargo built next to this bench].
    #[arg(long)]
    mboxd: Option<PathBuf>,
    /// mboxd's data folder; must be empty or absent [default: a temporary folder,
    /// removed at the end].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Points per metric series (3 series per experiment).
    #[arg(long, default_value_t = 5)]
    points: usize,
    /// Experiments' blocks per LogMetrics request.
    #[arg(long, default_value_t = 1000)]
    blocks_per_request: usize,
    /// Timed searches (after one warm-up).
    #[arg(long, default_value_t = 20)]
    searches: usize,
    /// Send the 5 metadata keys with CreateExperiment (one group-committed
    /// transaction per batch of creations) instead of one UpdateMetadata each.
    #[arg(long)]
    metadata_at_create: bool,
    /// Before creating, send this many CreateExperiment requests of the same shape
    /// that validation refuses (an unknown framework) before the catalog sees them:
    /// about the rate the request path alone allows, with these clients on these
    /// cores (the refusal comes before the namespace and metadata checks, and the
    /// answer is an error status instead of a reply).
    #[arg(long, default_value_t = 0)]
    request_path_only: usize,
    /// Durability mode for mboxd [default: mboxd's own, wal-fsync].
    #[arg(long)]
    durability: Option<String>,
    /// cargo passes --bench to bench targets.
    #[arg(long, hide = true)]
    bench: bool,
}

const NAMESPACE: &str = "bench";
const PAGE: usize = 100;
const FILTER: &str = r#"params.optimizer = "adamw" and metrics.val/loss.last < 0.5"#;
const ORDER_BY: &str = "metrics.val/acc.max DESC";
const METRIC_KEYS: [&str; 3] = ["train/loss", "val/loss", "val/acc"];
const OPTIMIZERS: [&str; 3] = ["adam", "adamw", "sgd"];
/// How long a daemon idles after its first answers before its RSS is read.
const SETTLE: Duration = Duration::from_secs(2);
/// mboxd's default `server.max_connections`.
const DEFAULT_MAX_CONNECTIONS: usize = 64;

type Client = ModelStoreClient<Channel>;

// ---------------------------------------------------------------------------
// The data: every value is a pure function of the experiment's number, so the
// bench knows what each search must answer.

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform number in [0, 1) for experiment `i`, draw `salt`.
fn unit(i: usize, salt: u64) -> f64 {
    (splitmix((i as u64) << 8 ^ salt) >> 11) as f64 / (1u64 << 53) as f64
}

fn pick<T: Copy>(i: usize, salt: u64, from: &[T]) -> T {
    from[(splitmix((i as u64) << 8 ^ salt) % from.len() as u64) as usize]
}

fn name(i: usize) -> String {
    format!("exp-{i:08}")
}

fn optimizer(i: usize) -> &'static str {
    pick(i, 2, &OPTIMIZERS)
}

fn number(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn text(s: &str) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(s.to_owned())),
    }
}

/// The 5 metadata keys of experiment `i`.
fn metadata(i: usize) -> proto::Metadata {
    let entries = [
        ("lr", number(pick(i, 1, &[1e-4, 3e-4, 1e-3, 3e-3]))),
        ("optimizer", text(optimizer(i))),
        (
            "batch_size",
            number(pick(i, 3, &[32.0, 64.0, 128.0, 256.0])),
        ),
        ("seed", number(i as f64)),
        ("dropout", number(pick(i, 4, &[0.0, 0.1, 0.2, 0.3]))),
    ];
    proto::Metadata {
        metadata: entries
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
    }
}

/// The series of experiment `i`, in METRIC_KEYS order, `points` values each at
/// steps 0, 100, 200...: losses fall to a final val/loss uniform in [0.15, 1).
fn curves(i: usize, points: usize) -> [Vec<f64>; 3] {
    let last = 0.15 + 0.85 * unit(i, 5);
    let val_loss: Vec<f64> = (0..points)
        .map(|s| {
            let left = 1.0 - (s + 1) as f64 / points as f64;
            last + left * (0.4 + 0.4 * unit(i, 16 + s as u64))
        })
        .collect();
    let train_loss = val_loss.iter().map(|v| v * 0.9).collect();
    let val_acc = val_loss
        .iter()
        .enumerate()
        .map(|(s, v)| 1.0 - v * (0.6 + 0.2 * unit(i, 128 + s as u64)))
        .collect();
    [train_loss, val_loss, val_acc]
}

fn block(id: &str, i: usize, points: usize, now_ms: u64) -> proto::MetricsBlock {
    let series = curves(i, points);
    let n = 3 * points;
    proto::MetricsBlock {
        parent_id: id.to_owned(),
        keys: METRIC_KEYS.iter().map(|k| (*k).to_owned()).collect(),
        key_index: (0..n).map(|p| (p / points) as u32).collect(),
        steps: (0..n).map(|p| (p % points) as u64 * 100).collect(),
        wallclock_times: vec![now_ms; n],
        values: series.iter().flatten().copied().collect(),
        ..Default::default()
    }
}

/// What the search page must be: the matching experiments' val/acc.max and ids,
/// best first (ties by id); and how many match in all.
fn expected_page(ids: &[String], points: usize) -> (Vec<(f64, String)>, usize) {
    let mut matching: Vec<(f64, String)> = (0..ids.len())
        .filter(|&i| optimizer(i) == "adamw")
        .filter_map(|i| {
            let [_, val_loss, val_acc] = curves(i, points);
            let last = *val_loss.last()?;
            let best = val_acc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (last < 0.5).then(|| (best, ids[i].clone()))
        })
        .collect();
    let total = matching.len();
    matching.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    matching.truncate(PAGE);
    (matching, total)
}

// ---------------------------------------------------------------------------
// The daemon.

struct Daemon {
    child: Child,
    addr: String,
    http: std::net::SocketAddr,
    spawned: Instant,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> anyhow::Result<std::net::SocketAddr> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .context("finding a free port for mboxd's HTTP listener")
}

fn mboxd_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(bin) = &args.mboxd {
        return Ok(bin.clone());
    }
    let built = PathBuf::from(env!("CARGO_BIN_EXE_mboxd"));
    if built.exists() {
        return Ok(built);
    }
    // A bench binary copied elsewhere: look next to it, then in its target dir.
    let exe = std::env::current_exe().context("locating the bench executable")?;
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join("mboxd");
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "no mboxd binary at {} or next to {}: build it (cargo build --release --bin mboxd) or pass --mboxd",
        built.display(),
        exe.display()
    )
}

/// Starts mboxd on `data`; returns once it wrote its address (not yet serving).
fn spawn(
    bin: &Path,
    data: &Path,
    scratch: &Path,
    args: &Args,
    config: Option<&Path>,
) -> anyhow::Result<Daemon> {
    let addr_file = scratch.join("addr");
    match std::fs::remove_file(&addr_file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing {}", addr_file.display())),
    }
    let http = free_port()?;
    let mut cmd = Command::new(bin);
    cmd.args([
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--daemon-id",
        "search-bench",
    ])
    .arg("--http-listen")
    .arg(http.to_string())
    .arg("--data-dir")
    .arg(data)
    .arg("--addr-file")
    .arg(&addr_file);
    if let Some(d) = &args.durability {
        cmd.args(["--durability", d]);
    }
    if let Some(c) = config {
        cmd.arg("--config").arg(c);
    }
    // mboxd logs warnings and errors to the bench's stderr; RUST_LOG overrides.
    let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
    cmd.env("RUST_LOG", log).stdout(Stdio::null());
    let spawned = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = spawned + Duration::from_secs(60);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.trim().is_empty()
        {
            return Ok(Daemon {
                child,
                addr: a.trim().to_owned(),
                http,
                spawned,
            });
        }
        if let Some(status) = child.try_wait().context("waiting for mboxd")? {
            bail!("mboxd exited at start-up: {status}");
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("mboxd wrote no address within 60 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

async fn connect(addr: &str) -> anyhow::Result<Client> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .context("mboxd's address")?
        .connect_timeout(Duration::from_secs(10))
        .connect()
        .await
        .with_context(|| format!("connecting to mboxd at {addr}"))?;
    Ok(ModelStoreClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX))
}

/// Retries a connection and a ListExperiments call until one answers: the daemon
/// is serving. Returns the connected client.
async fn wait_serving(d: &Daemon) -> anyhow::Result<Client> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let attempt = async {
            let mut c = connect(&d.addr).await?;
            c.list_experiments(proto::ListExperimentsRequest {
                namespace: NAMESPACE.into(),
                page_size: 1,
                ..Default::default()
            })
            .await
            .context("ListExperiments")?;
            anyhow::Ok(c)
        };
        match tokio::time::timeout(Duration::from_secs(30), attempt).await {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e.context("mboxd never served")),
            Err(_) if Instant::now() > deadline => bail!("mboxd never served"),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
}

/// Resident set size of a process now (VmRSS), in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS in {path}"))?;
    Ok(kb * 1024)
}

/// SIGTERM, then waits for a graceful exit; returns how long it took.
fn stop(d: &mut Daemon) -> anyhow::Result<Duration> {
    let pid = d.child.id().to_string();
    let started = Instant::now();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .context("running kill -TERM")?;
    ensure!(sent.success(), "kill -TERM {pid} failed: {sent}");
    let status = d.child.wait().context("waiting for mboxd to stop")?;
    ensure!(status.success(), "mboxd stopped with {status}");
    Ok(started.elapsed())
}

/// `mboxd_published_rows_total{table="metrics"}` from the daemon's /metrics.
/// Metric rows published, and published files whose summaries wait to be folded
/// into search, from mboxd's /metrics.
fn published_metric_rows(http: std::net::SocketAddr) -> anyhow::Result<(u64, u64)> {
    let mut s = std::net::TcpStream::connect_timeout(&http, Duration::from_secs(5))
        .with_context(|| format!("connecting to mboxd's HTTP listener {http}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .context("setting a read timeout")?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .context("asking for /metrics")?;
    let mut body = String::new();
    s.read_to_string(&mut body).context("reading /metrics")?;
    let value = |prefix: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map_or(0, |v| v as u64)
    };
    Ok((
        value("mboxd_published_rows_total{table=\"metrics\"}"),
        value("mboxd_summaries_pending_files "),
    ))
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let p = e.path();
            if p.is_dir() {
                dir_bytes(&p)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

// ---------------------------------------------------------------------------
// Load.

/// Whether a refused call is worth retrying (full buffers, a busy daemon).
fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::ResourceExhausted | tonic::Code::Unavailable
    )
}

/// How long a call keeps being retried: as long as a stalled daemon could
/// plausibly take to catch up (a publish merging a million experiments' summaries).
const RETRY_FOR: Duration = Duration::from_secs(300);

/// Calls `call` until it succeeds, retrying refusals that say "later" after the
/// pause the daemon asks for (`grpc-retry-pushback-ms`), as the SDK does.
async fn with_retries<T, F, Fut>(retries: &AtomicU64, what: F, mut call: Fut) -> anyhow::Result<T>
where
    F: Fn() -> String,
    Fut: AsyncCall<T>,
{
    let started = Instant::now();
    loop {
        match call.call().await {
            Ok(v) => return Ok(v),
            Err(s) if retryable(&s) && started.elapsed() < RETRY_FOR => {
                retries.fetch_add(1, Ordering::Relaxed);
                let pause = s
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .map_or(Duration::from_millis(10), Duration::from_millis);
                tokio::time::sleep(pause).await;
            }
            Err(s) => bail!("{}: {} {}", what(), s.code(), s.message()),
        }
    }
}

/// One gRPC call that can be made again.
trait AsyncCall<T> {
    fn call(&mut self) -> impl Future<Output = Result<T, tonic::Status>>;
}

struct Create<'a> {
    client: &'a mut Client,
    i: usize,
    with_metadata: bool,
}

/// Experiment `i`'s CreateExperiment request.
fn create_request(i: usize, with_metadata: bool) -> proto::CreateExperimentRequest {
    proto::CreateExperimentRequest {
        name: name(i),
        namespace: NAMESPACE.into(),
        owner: "bench".into(),
        framework: proto::MlFramework::Pytorch as i32,
        metadata: with_metadata.then(|| metadata(i)),
        ..Default::default()
    }
}

impl AsyncCall<String> for Create<'_> {
    async fn call(&mut self) -> Result<String, tonic::Status> {
        let r = self
            .client
            .create_experiment(create_request(self.i, self.with_metadata))
            .await?;
        Ok(r.into_inner().experiment_id)
    }
}

/// A creation validation refuses (framework 999): the request path without the
/// catalog. Answers `Ok` only with INVALID_ARGUMENT.
struct Refused<'a> {
    client: &'a mut Client,
    i: usize,
}

impl AsyncCall<()> for Refused<'_> {
    async fn call(&mut self) -> Result<(), tonic::Status> {
        let answer = self
            .client
            .create_experiment(proto::CreateExperimentRequest {
                framework: 999,
                ..create_request(self.i, true)
            })
            .await;
        match answer {
            Err(status) if status.code() == tonic::Code::InvalidArgument => Ok(()),
            Err(status) => Err(status),
            Ok(_) => Err(tonic::Status::internal("framework 999 was accepted")),
        }
    }
}

struct Update<'a> {
    client: &'a mut Client,
    id: &'a str,
    i: usize,
}

impl AsyncCall<()> for Update<'_> {
    async fn call(&mut self) -> Result<(), tonic::Status> {
        self.client
            .update_metadata(proto::UpdateMetadataRequest {
                parent_id: self.id.to_owned(),
                metadata: Some(metadata(self.i)),
            })
            .await?;
        Ok(())
    }
}

struct Log<'a> {
    client: &'a mut Client,
    ids: &'a [String],
    first: usize,
    points: usize,
}

impl AsyncCall<u64> for Log<'_> {
    async fn call(&mut self) -> Result<u64, tonic::Status> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let blocks = self
            .ids
            .iter()
            .enumerate()
            .map(|(k, id)| block(id, self.first + k, self.points, now_ms))
            .collect();
        let r = self
            .client
            .log_metrics(proto::LogMetricsRequest {
                blocks,
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().points_accepted)
    }
}

/// Latencies and counts of one phase.
#[derive(Default)]
struct Phase {
    elapsed: Duration,
    requests: u64,
    items: u64,
    retries: u64,
    latencies_us: Vec<u32>,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.items as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p)
    }
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// Prints progress every 10 s until `done` reaches `total`.
fn progress(
    label: &'static str,
    done: Arc<AtomicUsize>,
    total: usize,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let started = Instant::now();
        loop {
            tokio::time::sleep(Duration::from_secs(10)).await;
            let n = done.load(Ordering::Relaxed);
            if n >= total {
                return;
            }
            eprintln!(
                "  {label}: {n}/{total} ({:.0}/s)",
                n as f64 / started.elapsed().as_secs_f64()
            );
        }
    })
}

/// Runs `work(client, unit)` for units 0..units taken in turn by every client.
async fn run_phase<W, F>(
    label: &'static str,
    clients: &[Client],
    units: usize,
    work: W,
) -> anyhow::Result<Phase>
where
    W: Fn(Client, usize, Arc<AtomicU64>) -> F + Send + Sync + 'static,
    F: Future<Output = anyhow::Result<(Client, u64)>> + Send + 'static,
{
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicU64::new(0));
    let work = Arc::new(work);
    let ticker = progress(label, Arc::clone(&done), units);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in clients {
        let (next, done, retries, work) = (
            Arc::clone(&next),
            Arc::clone(&done),
            Arc::clone(&retries),
            Arc::clone(&work),
        );
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut items = 0u64;
            loop {
                let u = next.fetch_add(1, Ordering::Relaxed);
                if u >= units {
                    return anyhow::Ok((latencies, items));
                }
                let t = Instant::now();
                let (back, n) = work(c, u, Arc::clone(&retries)).await?;
                c = back;
                latencies.push(micros(t.elapsed()));
                items += n;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let mut phase = Phase::default();
    for t in tasks {
        let (lat, items) = t.await.context("a client task panicked")??;
        phase.requests += lat.len() as u64;
        phase.items += items;
        phase.latencies_us.extend(lat);
    }
    phase.elapsed = started.elapsed();
    phase.latencies_us.sort_unstable();
    phase.retries = retries.load(Ordering::Relaxed);
    ticker.abort();
    Ok(phase)
}

// ---------------------------------------------------------------------------
// Search.

async fn search_page(c: &mut Client) -> anyhow::Result<Vec<proto::Experiment>> {
    let r = c
        .list_experiments(proto::ListExperimentsRequest {
            namespace: NAMESPACE.into(),
            filter: FILTER.into(),
            order_by: vec![ORDER_BY.into()],
            page_size: PAGE as u32,
            include_details: true,
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("search: {} {}", s.code(), s.message()))?;
    Ok(r.into_inner().experiments)
}

fn summary(e: &proto::Experiment, key: &str) -> Option<proto::MetricSummary> {
    e.metric_summaries.iter().find(|s| s.key == key).cloned()
}

/// Checks a page: each experiment matches the filter, the page is sorted, and it is
/// exactly the top page the bench computed.
fn check_page(page: &[proto::Experiment], want: &[(f64, String)]) -> anyhow::Result<()> {
    ensure!(!page.is_empty(), "the search page is empty");
    for e in page {
        let opt = e
            .metadata
            .as_ref()
            .and_then(|m| m.metadata.get("optimizer"))
            .and_then(|v| match &v.kind {
                Some(Kind::StringValue(s)) => Some(s.as_str()),
                _ => None,
            });
        ensure!(opt == Some("adamw"), "{}: optimizer {opt:?}", e.id);
        let loss = summary(e, "val/loss").with_context(|| format!("{}: no val/loss", e.id))?;
        ensure!(loss.last < 0.5, "{}: val/loss.last {}", e.id, loss.last);
    }
    let best: Vec<f64> = page
        .iter()
        .map(|e| summary(e, "val/acc").map_or(f64::NAN, |s| s.max))
        .collect();
    ensure!(
        best.windows(2).all(|w| w[0] >= w[1]),
        "the page is not sorted by val/acc.max DESC: {best:?}"
    );
    let got: Vec<&str> = page.iter().map(|e| e.id.as_str()).collect();
    let expected: Vec<&str> = want.iter().map(|(_, id)| id.as_str()).collect();
    ensure!(
        got == expected,
        "the page is not the expected top {}: got {} experiments, first {:?}, expected first {:?}",
        want.len(),
        got.len(),
        got.first(),
        expected.first()
    );
    Ok(())
}

// ---------------------------------------------------------------------------

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map_or_else(
            || "? GiB".into(),
            |kb| format!("{:.0} GiB", kb as f64 / (1 << 20) as f64),
        )
}

fn yes(ok: bool) -> &'static str {
    if ok { "yes" } else { "**no**" }
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    ensure!(args.experiments > 0, "--experiments must be at least 1");
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(args.points > 0, "--points must be at least 1");
    ensure!(
        args.blocks_per_request > 0,
        "--blocks-per-request must be at least 1"
    );
    let bin = mboxd_binary(&args)?;
    let scratch = tempfile::tempdir().context("creating a scratch folder")?;
    let data = match &args.data_dir {
        Some(d) => {
            let empty = match std::fs::read_dir(d) {
                Ok(mut entries) => entries.next().is_none(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                Err(e) => return Err(e).with_context(|| format!("reading {}", d.display())),
            };
            ensure!(
                empty,
                "--data-dir {} is not empty: the bench needs an empty daemon",
                d.display()
            );
            d.clone()
        }
        None => scratch.path().join("data"),
    };
    // More clients than mboxd's default connection limit would wait in its backlog.
    let config = if args.clients > DEFAULT_MAX_CONNECTIONS {
        let path = scratch.path().join("mboxd.toml");
        std::fs::write(
            &path,
            format!("[server]\nmax_connections = {}\n", args.clients),
        )
        .with_context(|| format!("writing {}", path.display()))?;
        Some(path)
    } else {
        None
    };
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!(
        "mboxd {} | {} experiments, {} clients, {} points x 3 series each, {} blocks per LogMetrics | {cores} cores, {}",
        bin.display(),
        args.experiments,
        args.clients,
        args.points,
        args.blocks_per_request,
        cpu_model()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    rt.block_on(run(args, bin, data, scratch, config))
}

async fn run(
    args: Arc<Args>,
    bin: PathBuf,
    data: PathBuf,
    scratch: tempfile::TempDir,
    config: Option<PathBuf>,
) -> anyhow::Result<()> {
    let n = args.experiments;
    // 1. An empty daemon.
    let mut daemon = spawn(&bin, &data, scratch.path(), &args, config.as_deref())?;
    let first = wait_serving(&daemon).await?;
    let empty_start = daemon.spawned.elapsed();
    let mut probe = first.clone();
    ensure!(
        search_page(&mut probe).await?.is_empty(),
        "an empty daemon found experiments"
    );
    tokio::time::sleep(SETTLE).await;
    let empty_rss = rss(daemon.child.id())?;
    println!(
        "1. empty daemon: serving {:.3} s after spawn; RSS {:.1} MiB",
        empty_start.as_secs_f64(),
        mib(empty_rss)
    );

    let mut clients = vec![first];
    for _ in 1..args.clients {
        clients.push(connect(&daemon.addr).await?);
    }

    // 1b. The request path alone.
    if args.request_path_only > 0 {
        let refused = run_phase(
            "refused creates",
            &clients,
            args.request_path_only,
            |mut c, i, retries| async move {
                with_retries(
                    &retries,
                    || format!("refused CreateExperiment {}", name(i)),
                    Refused { client: &mut c, i },
                )
                .await?;
                Ok((c, 1))
            },
        )
        .await?;
        println!(
            "1b. request path alone (CreateExperiment with 5 metadata keys, refused by \
             validation before the catalog): {} in {:.2} s = {:.0}/s; latency p50 {:.2} ms, \
             p99 {:.2} ms",
            refused.items,
            refused.elapsed.as_secs_f64(),
            refused.rate(),
            refused.percentile_ms(0.5),
            refused.percentile_ms(0.99)
        );
    }

    // 2. CreateExperiment.
    let ids: Arc<Vec<std::sync::OnceLock<String>>> =
        Arc::new((0..n).map(|_| std::sync::OnceLock::new()).collect());
    let with_metadata = args.metadata_at_create;
    let creates = {
        let ids = Arc::clone(&ids);
        run_phase("creates", &clients, n, move |mut c, i, retries| {
            let ids = Arc::clone(&ids);
            async move {
                let id = with_retries(
                    &retries,
                    || format!("CreateExperiment {}", name(i)),
                    Create {
                        client: &mut c,
                        i,
                        with_metadata,
                    },
                )
                .await?;
                let _ = ids[i].set(id);
                Ok((c, 1))
            }
        })
        .await?
    };
    let ids: Arc<Vec<String>> = Arc::new(
        ids.iter()
            .enumerate()
            .map(|(i, id)| {
                id.get()
                    .cloned()
                    .with_context(|| format!("no id for {}", name(i)))
            })
            .collect::<anyhow::Result<_>>()?,
    );
    let distinct = ids.iter().collect::<std::collections::HashSet<_>>().len();
    ensure!(distinct == n, "{distinct} distinct ids for {n} experiments");
    let what = if with_metadata {
        "CreateExperiment with 5 metadata keys"
    } else {
        "CreateExperiment"
    };
    println!(
        "2. {what}: {n} in {:.2} s = {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms; {} retries",
        creates.elapsed.as_secs_f64(),
        creates.rate(),
        creates.percentile_ms(0.5),
        creates.percentile_ms(0.99),
        creates.retries
    );

    // 3a. UpdateMetadata, 5 keys each (unless they came with the creations).
    let updates = if with_metadata {
        println!("3a. UpdateMetadata: skipped (--metadata-at-create)");
        None
    } else {
        let updates = {
            let ids = Arc::clone(&ids);
            run_phase("metadata updates", &clients, n, move |mut c, i, retries| {
                let ids = Arc::clone(&ids);
                async move {
                    with_retries(
                        &retries,
                        || format!("UpdateMetadata {}", name(i)),
                        Update {
                            client: &mut c,
                            id: &ids[i],
                            i,
                        },
                    )
                    .await?;
                    Ok((c, 1))
                }
            })
            .await?
        };
        println!(
            "3a. UpdateMetadata (5 keys): {n} in {:.2} s = {:.0}/s; latency p50 {:.2} ms, p99 {:.2} ms; {} retries",
            updates.elapsed.as_secs_f64(),
            updates.rate(),
            updates.percentile_ms(0.5),
            updates.percentile_ms(0.99),
            updates.retries
        );
        Some(updates)
    };

    // 3b. LogMetrics, many experiments' blocks per request.
    let per = args.blocks_per_request;
    let requests = n.div_ceil(per);
    let points = args.points;
    let logs = {
        let ids = Arc::clone(&ids);
        run_phase(
            "LogMetrics requests",
            &clients,
            requests,
            move |mut c, r, retries| {
                let ids = Arc::clone(&ids);
                async move {
                    let first = r * per;
                    let last = (first + per).min(ids.len());
                    let accepted = with_retries(
                        &retries,
                        || format!("LogMetrics for experiments {first}..{last}"),
                        Log {
                            client: &mut c,
                            ids: &ids[first..last],
                            first,
                            points,
                        },
                    )
                    .await?;
                    Ok((c, accepted))
                }
            },
        )
        .await?
    };
    let total_points = (n * 3 * points) as u64;
    ensure!(
        logs.items == total_points,
        "{} points accepted of {total_points}",
        logs.items
    );
    println!(
        "3b. LogMetrics: {total_points} points in {} requests in {:.2} s = {:.0} points/s ({:.0} experiments/s); latency p50 {:.2} ms, p99 {:.2} ms; {} retries",
        logs.requests,
        logs.elapsed.as_secs_f64(),
        logs.rate(),
        n as f64 / logs.elapsed.as_secs_f64(),
        logs.percentile_ms(0.5),
        logs.percentile_ms(0.99),
        logs.retries
    );

    // 4. Once every point is published and every summary folded in, the search.
    let acked = Instant::now();
    let http = daemon.http;
    let deadline = acked + Duration::from_secs(300);
    loop {
        let (published, unfolded) =
            tokio::task::spawn_blocking(move || published_metric_rows(http))
                .await
                .context("the /metrics reader panicked")??;
        if published >= total_points && unfolded == 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "only {published} of {total_points} points published, and {unfolded} files' \
             summaries unfolded, 300 s after the last ack"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let visible_after = acked.elapsed();
    let (want, matches) = expected_page(&ids, points);
    let mut search_client = clients[0].clone();
    // The brief's belt and braces: the filtered search must find its page.
    let warm = Instant::now();
    let page = search_page(&mut search_client).await?;
    let warm_ms = warm.elapsed().as_secs_f64() * 1e3;
    check_page(&page, &want)?;
    let mut lat = Vec::with_capacity(args.searches);
    for _ in 0..args.searches {
        let t = Instant::now();
        let page = search_page(&mut search_client).await?;
        lat.push(micros(t.elapsed()));
        check_page(&page, &want)?;
    }
    lat.sort_unstable();
    let (search_p50, search_p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!(
        "4. search (page of {PAGE}, {matches} matches in all): summaries visible {:.2} s after the last ack; first {:.1} ms; {} timed: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        visible_after.as_secs_f64(),
        warm_ms,
        args.searches,
        search_p50,
        search_p99,
        percentile(&lat, 1.0)
    );
    let loaded_rss = rss(daemon.child.id())?;

    // 5. Graceful stop, restart on the same data folder.
    drop(search_client);
    drop(probe);
    drop(clients);
    let stopped = stop(&mut daemon)?;
    drop(daemon);
    let index_bytes = std::fs::metadata(data.join("index.redb")).map_or(0, |m| m.len());
    let data_bytes = dir_bytes(&data);
    let mut daemon = spawn(&bin, &data, scratch.path(), &args, config.as_deref())?;
    let mut c = wait_serving(&daemon).await?;
    let restart = daemon.spawned.elapsed();
    tokio::time::sleep(SETTLE).await;
    let t = Instant::now();
    let page = search_page(&mut c).await?;
    let cold_ms = t.elapsed().as_secs_f64() * 1e3;
    check_page(&page, &want)?;
    let restart_rss = rss(daemon.child.id())?;
    let delta = restart_rss as f64 - empty_rss as f64;
    println!(
        "5. graceful stop {:.2} s (RSS before it {:.1} MiB); restart to serving {:.3} s; first search {:.1} ms; RSS after restart {:.1} MiB ({:+.1} MiB vs the empty daemon)",
        stopped.as_secs_f64(),
        mib(loaded_rss),
        restart.as_secs_f64(),
        cold_ms,
        mib(restart_rss),
        delta / (1u64 << 20) as f64
    );
    drop(c);
    stop(&mut daemon)?;

    // The table.
    let create_rate = creates.rate();
    let delta_mib = delta / (1u64 << 20) as f64;
    println!();
    println!(
        "| figure ({} experiments, {} clients) | result | target | met |",
        n, args.clients
    );
    println!("|---|---|---|---|");
    println!(
        "| {what} | {create_rate:.0}/s (p50 {:.2} ms, p99 {:.2} ms) | ≥ 10,000/s | {} |",
        creates.percentile_ms(0.5),
        creates.percentile_ms(0.99),
        yes(create_rate >= 10_000.0)
    );
    if let Some(updates) = &updates {
        println!(
            "| UpdateMetadata, 5 keys | {:.0}/s (p50 {:.2} ms, p99 {:.2} ms) | | |",
            updates.rate(),
            updates.percentile_ms(0.5),
            updates.percentile_ms(0.99)
        );
    }
    println!(
        "| LogMetrics, 3 keys x {points} points, {per} experiments per request | {:.0} points/s ({:.0} experiments/s) | | |",
        logs.rate(),
        n as f64 / logs.elapsed.as_secs_f64()
    );
    println!(
        "| summaries searchable after the last ack | {:.2} s | | |",
        visible_after.as_secs_f64()
    );
    println!(
        "| filtered, sorted search page of {PAGE} | p50 {search_p50:.2} ms, p99 {search_p99:.2} ms ({} runs) | ≤ 50 ms | {} |",
        args.searches,
        yes(search_p99 <= 50.0)
    );
    println!(
        "| graceful stop (SIGTERM to exit) | {:.2} s | | |",
        stopped.as_secs_f64()
    );
    println!(
        "| restart to serving | {:.3} s | ≤ 1 s | {} |",
        restart.as_secs_f64(),
        yes(restart <= Duration::from_secs(1))
    );
    println!("| first search after restart | {cold_ms:.1} ms | | |");
    println!("| RSS, empty daemon | {:.1} MiB | | |", mib(empty_rss));
    println!(
        "| RSS after restart and a search | {:.1} MiB ({delta_mib:+.1} MiB) | ≤ empty + 50 MiB | {} |",
        mib(restart_rss),
        yes(delta_mib <= 50.0)
    );
    println!(
        "| data folder (index.redb) | {:.1} MiB ({:.1} MiB) | | |",
        mib(data_bytes),
        mib(index_bytes)
    );
    println!(
        "| machine | {cores} cores, {}, {}; bench and mboxd share them | | |",
        cpu_model(),
        mem_total(),
        cores = std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
