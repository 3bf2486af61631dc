//! End-to-end load generator: starts mboxd as a separate process (or targets a running
//! one with `--addr`), drives it over real gRPC, and prints points/s, ack latency
//! percentiles, mboxd's peak RSS and the bytes per point it wrote.
//!
//! ```text
//! cargo bench --bench loadgen -- --mode batch --clients 8 --batch 10000 --seconds 10
//! cargo bench --bench loadgen -- --mode single --clients 16 --seconds 10
//! cargo bench --bench loadgen -- --s3s-fs /var/tmp/mboxd-tools/bin/s3s-fs   # S3 root
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, ValueEnum};
use mboxd::proto;
use mboxd::proto::model_store_client::ModelStoreClient;
use tonic::transport::Channel;

// Request-per-point workloads allocate per request; mimalloc measurably cuts that cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// mboxd's columnar batches of `--batch` points.
    Batch,
    /// ModelBox-style LogMetrics requests of one point each.
    Single,
}

#[derive(Debug, Parser)]
#[command(about = "mboxd end-to-end load generator")]
struct Args {
    #[arg(long, value_enum, default_value = "batch")]
    mode: Mode,
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Points per request in batch mode.
    #[arg(long, default_value_t = 10_000)]
    batch: usize,
    /// Distinct metric keys per experiment.
    #[arg(long, default_value_t = 10)]
    keys: usize,
    /// How long to send.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Total target rate in points/s (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    rate: u64,
    /// Durability mode passed to the spawned mboxd.
    #[arg(long, default_value = "memory")]
    durability: String,
    /// Pin the spawned mboxd to these CPUs (a `taskset -c` list, such as `0` or `0-7`).
    #[arg(long)]
    mboxd_cpus: Option<String>,
    /// Extra flags for the spawned mboxd, space-separated.
    #[arg(long, default_value = "")]
    mboxd_args: String,
    /// Target an already running mboxd instead of spawning one (no RSS or disk figures).
    #[arg(long)]
    addr: Option<String>,
    /// mboxd binary to spawn [default: the one cargo built with this bench].
    #[arg(long)]
    mboxd: Option<PathBuf>,
    /// Publish to an S3 root on a local s3s-fs server started from this binary,
    /// instead of the data folder.
    #[arg(long)]
    s3s_fs: Option<PathBuf>,
    /// cargo passes --bench to bench targets.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Spawned {
    child: Child,
    data: tempfile::TempDir,
    s3: Option<Child>,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.s3.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts s3s-fs serving `<dir>/runs` as bucket `runs`; returns it and the config
/// file that points mboxd at `s3://runs/bench`.
fn spawn_s3(bin: &Path, dir: &Path) -> anyhow::Result<(Child, PathBuf)> {
    std::fs::create_dir_all(dir.join("s3").join("runs"))?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(bin)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args(["--access-key", "bench", "--secret-key", "bench-secret"])
        .arg(dir.join("s3"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("s3s-fs did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let config = dir.join("mboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nroot = \"s3://runs/bench\"\n[storage.s3]\n\
             endpoint = \"http://127.0.0.1:{port}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"bench\"\nsecret_access_key = \"bench-secret\"\nallow_http = true\n"
        ),
    )?;
    Ok((child, config))
}

fn spawn_mboxd(args: &Args) -> anyhow::Result<(Spawned, String)> {
    let bin = args
        .mboxd
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mboxd")));
    let data = tempfile::tempdir()?;
    let addr_file = data.path().join("addr");
    let (s3, config) = match &args.s3s_fs {
        Some(s3s) => {
            let (child, config) = spawn_s3(s3s, data.path())?;
            (Some(child), Some(config))
        }
        None => (None, None),
    };
    // taskset execs mboxd in its own process, so the pid (and its RSS) stays mboxd's.
    let mut cmd = match &args.mboxd_cpus {
        Some(cpus) => {
            let mut c = Command::new("taskset");
            c.args(["-c", cpus]).arg(&bin);
            c
        }
        None => Command::new(&bin),
    };
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--daemon-id", "loadgen"])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data.path().join("data"))
        .arg("--addr-file")
        .arg(&addr_file)
        .args(["--durability", &args.durability])
        .args(
            config
                .iter()
                .flat_map(|c| [std::ffi::OsStr::new("--config"), c.as_os_str()]),
        )
        .args(args.mboxd_args.split_whitespace())
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            return Ok((Spawned { child, data, s3 }, a.trim().to_owned()));
        }
        if Instant::now() > deadline {
            bail!("mboxd did not start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Peak resident set size of a process, in bytes (VmHWM).
fn peak_rss(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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

struct ClientStats {
    points: u64,
    latencies_us: Vec<u32>,
    errors: u64,
}

fn make_block(
    parent: &str,
    keys: &[String],
    n: usize,
    first_step: u64,
    now_ms: u64,
) -> proto::MetricsBlock {
    proto::MetricsBlock {
        parent_id: parent.to_owned(),
        keys: keys.to_vec(),
        key_index: (0..n).map(|i| (i % keys.len()) as u32).collect(),
        steps: (0..n as u64)
            .map(|i| first_step + i / keys.len() as u64)
            .collect(),
        wallclock_times: vec![now_ms; n],
        values: (0..n)
            .map(|i| 1.0 / (1.0 + (first_step as f64) + i as f64))
            .collect(),
        ..Default::default()
    }
}

async fn run_client(
    mut client: ModelStoreClient<Channel>,
    args: Arc<Args>,
    experiment: String,
    index: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
) -> ClientStats {
    let keys: Vec<String> = (0..args.keys)
        .map(|k| format!("train/metric_{k}"))
        .collect();
    let per_request = match args.mode {
        Mode::Batch => args.batch as u64,
        Mode::Single => 1,
    };
    // Pacing: each client sends its share of the target rate.
    let interval = (args.rate > 0).then(|| {
        Duration::from_secs_f64(per_request as f64 * args.clients as f64 / args.rate as f64)
    });
    let mut stats = ClientStats {
        points: 0,
        latencies_us: Vec::new(),
        errors: 0,
    };
    // Clients start out of phase, as independent trainer ranks do, rather than all
    // sending at the same instants.
    let started = tokio::time::Instant::now()
        + interval.map_or(Duration::ZERO, |i| {
            i.mul_f64(index as f64 / args.clients as f64)
        });
    let mut step = (index as u64) << 40;
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Some(interval) = interval {
            tokio::time::sleep_until(started + interval.mul_f64(i as f64)).await;
        }
        i += 1;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let req = match args.mode {
            Mode::Batch => proto::LogMetricsRequest {
                blocks: vec![make_block(&experiment, &keys, args.batch, step, now_ms)],
                ..Default::default()
            },
            Mode::Single => proto::LogMetricsRequest {
                parent_id: experiment.clone(),
                key: keys[(i as usize) % keys.len()].clone(),
                value: Some(proto::MetricsValue {
                    step,
                    wallclock_time: now_ms,
                    value: Some(proto::metrics_value::Value::FVal(0.5)),
                }),
                blocks: Vec::new(),
                ..Default::default()
            },
        };
        let t = Instant::now();
        match client.log_metrics(req).await {
            Ok(r) => {
                stats
                    .latencies_us
                    .push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                let n = r.into_inner().points_accepted;
                stats.points += n;
                sent.fetch_add(n, Ordering::Relaxed);
            }
            Err(e) => {
                stats.errors += 1;
                if stats.errors == 1 {
                    eprintln!("client {index}: {} {}", e.code(), e.message());
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        step += per_request;
    }
    stats
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i] as f64 / 1000.0
}

fn main() -> anyhow::Result<()> {
    let args = Arc::new(Args::parse());
    let (spawned, addr) = match &args.addr {
        Some(a) => (None, a.clone()),
        None => {
            let (s, a) = spawn_mboxd(&args)?;
            (Some(s), a)
        }
    };
    let pid = spawned.as_ref().map(|s| s.child.id());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (stats, elapsed) = rt.block_on(async {
        let url = format!("http://{addr}");
        let mut admin = ModelStoreClient::connect(url.clone()).await?;
        let experiment = admin
            .create_experiment(proto::CreateExperimentRequest {
                name: "loadgen".into(),
                namespace: "bench".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .experiment_id;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        // The first client takes over the set-up connection: one more would make
        // `clients` + 1 connections, and at `server.max_connections` the last
        // client would wait in the listen backlog for the whole run.
        let mut admin = Some(admin);
        for index in 0..args.clients {
            let client = match admin.take() {
                Some(c) => c,
                None => ModelStoreClient::connect(url.clone()).await?,
            }
            .max_encoding_message_size(usize::MAX);
            tasks.push(tokio::spawn(run_client(
                client,
                Arc::clone(&args),
                experiment.clone(),
                index,
                Arc::clone(&stop),
                Arc::clone(&sent),
            )));
        }
        let started = Instant::now();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await?);
        }
        anyhow::Ok((all, started.elapsed()))
    })?;

    let points: u64 = stats.iter().map(|s| s.points).sum();
    let errors: u64 = stats.iter().map(|s| s.errors).sum();
    let mut lat: Vec<u32> = stats.into_iter().flat_map(|s| s.latencies_us).collect();
    lat.sort_unstable();
    let rate = points as f64 / elapsed.as_secs_f64();
    println!(
        "mode={:?} clients={} batch={} keys={} durability={} target_rate={} mboxd_cpus={}",
        args.mode,
        args.clients,
        args.batch,
        args.keys,
        args.durability,
        args.rate,
        args.mboxd_cpus.as_deref().unwrap_or("all")
    );
    println!(
        "acked points: {points} in {:.2}s = {:.0} points/s ({} requests, {errors} errors)",
        elapsed.as_secs_f64(),
        rate,
        lat.len()
    );
    println!(
        "ack latency ms: p50={:.2} p90={:.2} p99={:.2} max={:.2}",
        percentile(&lat, 0.5),
        percentile(&lat, 0.9),
        percentile(&lat, 0.99),
        percentile(&lat, 1.0)
    );
    if let (Some(mut s), Some(pid)) = (spawned, pid) {
        let root = match s.s3 {
            Some(_) => s.data.path().join("s3/runs/bench"),
            None => s.data.path().join("data"),
        };
        let peak_running = peak_rss(pid).unwrap_or(0);
        // Graceful stop publishes everything, so the disk figure covers every point.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let mut peak = peak_running;
        loop {
            if let Some(r) = peak_rss(pid) {
                peak = peak.max(r);
            }
            if s.child.try_wait()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // With an S3 root the figure is what reached the bucket.
        let bytes = dir_bytes(&root.join("metrics"));
        println!(
            "mboxd peak RSS: {:.1} MiB; metrics on disk: {:.1} MiB = {:.2} bytes/point",
            peak as f64 / (1 << 20) as f64,
            bytes as f64 / (1 << 20) as f64,
            bytes as f64 / points.max(1) as f64
        );
    }
    Ok(())
}
