//! The read side at scale: builds a data folder of many points over many
//! experiments and several UTC days with the default roll (the days simulated by
//! mboxd's injectable ingest clock), then reports, before and after compaction:
//! files, bytes per point, GetMetrics for one 100k-point experiment (p50 of 20,
//! after a restart), a 2,000-point `max_points` read of a 1M-point series, every
//! default page of that series (once), and a DuckDB `count(*)` over everything.
//! Query results must not change.
//!
//! ```text
//! cargo bench --bench readside -- --points 100000000            # the issue's size
//! cargo bench --bench readside -- --points 10000000             # a tenth, to compare
//! ```
//! DuckDB runs through Python (`$MBOX_PYTHON`, default `.venv/bin/python`, which
//! `scripts/test.sh` creates); without it that line is skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mboxd::config::Config;
use mboxd::model::{Clock, now_micros};
use mboxd::proto;
use mboxd::proto::model_store_client::ModelStoreClient;
use tonic::transport::Channel;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(about = "mboxd read-side benchmark")]
struct Args {
    /// Points in all.
    #[arg(long, default_value_t = 100_000_000)]
    points: u64,
    /// Experiments (two of them are the 100k-point and the 1M-point runs).
    #[arg(long, default_value_t = 1_000)]
    experiments: usize,
    /// UTC days the points spread over.
    #[arg(long, default_value_t = 7)]
    days: i64,
    /// Ingest rounds per day, each at least a roll age long (more rounds: more files).
    #[arg(long, default_value_t = 3)]
    rounds_per_day: usize,
    /// Where to build the data folder [default: a temporary folder].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Reuse the data folder that an earlier run with the same --data-dir built
    /// (and maybe compacted) instead of building one: for profiling the reads.
    #[arg(long, requires = "data_dir")]
    reuse: bool,
    /// Stop after the measurements before compaction.
    #[arg(long)]
    no_compact: bool,
    /// Timed repetitions of each read (the p50 is reported).
    #[arg(long, default_value_t = 20)]
    reads: usize,
    /// cargo passes --bench to bench targets.
    #[arg(long, hide = true)]
    bench: bool,
}

const DAY: i64 = 86_400_000_000;
const KEYS: usize = 10;

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), mboxd::server::ServerError>>,
}

impl Server {
    async fn start(config: Config) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(mboxd::server::run(config, listener, async {
            let _ = rx.await;
        }));
        Ok(Self {
            addr,
            stop: Some(tx),
            task,
        })
    }

    async fn client(&self) -> anyhow::Result<ModelStoreClient<Channel>> {
        let url = format!("http://{}", self.addr);
        for _ in 0..500 {
            if let Ok(c) = ModelStoreClient::connect(url.clone()).await {
                return Ok(c
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("cannot connect to {url}")
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        (&mut self.task).await??;
        Ok(())
    }
}

/// `n` points of one experiment from the `first`-th of its points on: point p is
/// key p mod keys at step p / keys, so every (key, step) is written once.
fn block(parent: &str, keys: &[String], first: u64, n: usize, seed: u64) -> proto::MetricsBlock {
    let mut x = seed | 1;
    let k = keys.len() as u64;
    proto::MetricsBlock {
        parent_id: parent.into(),
        keys: keys.to_vec(),
        key_index: (0..n as u64).map(|i| ((first + i) % k) as u32).collect(),
        steps: (0..n as u64).map(|i| (first + i) / k).collect(),
        wallclock_times: (0..n as u64)
            .map(|i| 1_700_000_000_000 + first + i)
            .collect(),
        // A training curve: decaying, noisy, float32 (as most frameworks log).
        values: (0..n as u64)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let noise = (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5;
                let step = ((first + i) / k) as f64;
                (2.0 * (-step / 20_000.0).exp() + 0.05 * noise) as f32 as f64
            })
            .collect(),
        ..Default::default()
    }
}

/// Reads every page of an experiment (`page_size` 0: the default pages of about
/// 3 MiB); returns (points, pages, a checksum of the answer).
async fn read_all(
    c: &mut ModelStoreClient<Channel>,
    id: &str,
    page_size: u32,
) -> anyhow::Result<(usize, usize, u64)> {
    let mut token = String::new();
    let (mut points, mut pages, mut sum) = (0usize, 0usize, 0u64);
    loop {
        let page = c
            .get_metrics(proto::GetMetricsRequest {
                parent_id: id.into(),
                full_precision: true,
                page_size,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        pages += 1;
        for m in &page.metrics {
            for v in &m.values {
                points += 1;
                let bits = match v.value {
                    Some(proto::metrics_value::Value::DVal(d)) => d.to_bits(),
                    _ => 0,
                };
                sum = sum.wrapping_mul(31).wrapping_add(v.step ^ bits);
            }
        }
        if page.next_page_token.is_empty() {
            return Ok((points, pages, sum));
        }
        token = page.next_page_token;
    }
}

async fn read_bucketed(
    c: &mut ModelStoreClient<Channel>,
    id: &str,
) -> anyhow::Result<(usize, u64)> {
    let page = c
        .get_metrics(proto::GetMetricsRequest {
            parent_id: id.into(),
            full_precision: true,
            max_points: 2_000,
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut sum = 0u64;
    let mut n = 0;
    for m in &page.metrics {
        for (v, (lo, hi)) in m.values.iter().zip(m.min.iter().zip(&m.max)) {
            n += 1;
            sum = sum
                .wrapping_mul(31)
                .wrapping_add(v.step ^ lo.to_bits() ^ hi.to_bits());
        }
    }
    Ok((n, sum))
}

fn p50(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn parquet_stats(root: &Path) -> (usize, u64, usize) {
    fn walk(p: &Path, files: &mut Vec<(PathBuf, u64)>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, files);
            } else if path.extension().is_some_and(|x| x == "parquet") {
                files.push((path.clone(), e.metadata().map(|m| m.len()).unwrap_or(0)));
            }
        }
    }
    let mut files = Vec::new();
    walk(&root.join("metrics"), &mut files);
    let partitions: std::collections::HashSet<_> = files
        .iter()
        .filter_map(|(p, _)| p.parent().map(Path::to_path_buf))
        .collect();
    (
        files.len(),
        files.iter().map(|(_, b)| b).sum(),
        partitions.len(),
    )
}

fn duckdb_count(root: &Path) -> Option<(u64, Duration)> {
    let python = std::env::var("MBOX_PYTHON").unwrap_or_else(|_| ".venv/bin/python".into());
    let script = format!(
        "import duckdb,time\nt=time.time()\nn=duckdb.sql(\"select count(*) from read_parquet('{}/metrics/**/*.parquet', hive_partitioning=true)\").fetchall()[0][0]\nprint(n, time.time()-t)",
        root.display()
    );
    let out = std::process::Command::new(python)
        .args(["-c", &script])
        .output()
        .ok()?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        eprintln!("DuckDB failed: {}", err.lines().last().unwrap_or_default());
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace();
    let n = parts.next()?.parse().ok()?;
    let secs: f64 = parts.next()?.parse().ok()?;
    Some((n, Duration::from_secs_f64(secs)))
}

struct Measured {
    files: usize,
    partitions: usize,
    bytes: u64,
    read_100k: Duration,
    bucketed_1m: Duration,
    /// Every default page of the 1M-point series, and how many pages.
    walk_1m: (Duration, usize),
    answers: (u64, u64, u64),
    duckdb: Option<(u64, Duration)>,
}

async fn measure(
    config: &Config,
    small: &str,
    big: &str,
    points: u64,
    reads: usize,
) -> anyhow::Result<Measured> {
    let (files, bytes, partitions) = parquet_stats(&config.data_dir);
    // After a restart: nothing cached, nothing buffered.
    let server = Server::start(config.clone()).await?;
    let mut c = server.client().await?;
    let (mut full, mut bucketed) = (Vec::new(), Vec::new());
    let (mut a1, mut a2) = (0, 0);
    for _ in 0..reads.max(1) {
        let t = Instant::now();
        let (n, _, sum) = read_all(&mut c, small, 1_000_000).await?;
        full.push(t.elapsed());
        anyhow::ensure!(n == 100_000, "the 100k-point run read {n} points");
        a1 = sum;
        let t = Instant::now();
        let (n, sum) = read_bucketed(&mut c, big).await?;
        bucketed.push(t.elapsed());
        anyhow::ensure!(n > 1_000 && n <= 2_000, "{n} buckets");
        a2 = sum;
    }
    let t = Instant::now();
    let (n, pages, a3) = read_all(&mut c, big, 0).await?;
    let walk_1m = (t.elapsed(), pages);
    anyhow::ensure!(n == 1_000_000, "the 1M-point series read {n} points");
    server.stop().await?;
    let duckdb = duckdb_count(&config.data_dir);
    if let Some((n, _)) = duckdb {
        anyhow::ensure!(n == points, "DuckDB counted {n} of {points} points");
    }
    Ok(Measured {
        files,
        partitions,
        bytes,
        read_100k: p50(full),
        bucketed_1m: p50(bucketed),
        walk_1m,
        answers: (a1, a2, a3),
        duckdb,
    })
}

fn report(label: &str, m: &Measured, points: u64) {
    println!(
        "{label}: {} files in {} partitions ({:.1} per partition), {:.2} bytes/point",
        m.files,
        m.partitions,
        m.files as f64 / m.partitions.max(1) as f64,
        m.bytes as f64 / points as f64
    );
    println!(
        "  GetMetrics, one 100k-point experiment (p50 of 20): {:.1} ms",
        m.read_100k.as_secs_f64() * 1e3
    );
    println!(
        "  GetMetrics max_points=2000 of a 1M-point series (p50 of 20): {:.1} ms",
        m.bucketed_1m.as_secs_f64() * 1e3
    );
    println!(
        "  GetMetrics, every default page of the 1M-point series: {:.0} ms ({} pages)",
        m.walk_1m.0.as_secs_f64() * 1e3,
        m.walk_1m.1
    );
    match m.duckdb {
        Some((n, t)) => println!(
            "  DuckDB count(*) over metrics/: {n} in {:.0} ms",
            t.as_secs_f64() * 1e3
        ),
        None => println!("  DuckDB: skipped (set MBOX_PYTHON to a Python with duckdb)"),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temp = tempfile::tempdir()?;
    let data = args
        .data_dir
        .clone()
        .unwrap_or_else(|| temp.path().join("data"));
    let offset = Arc::new(AtomicI64::new(0));
    let mut config = Config::test_config(&data);
    config.roll = mboxd::config::RollPolicy::default();
    config.compaction.enabled = false;
    let shift = Arc::clone(&offset);
    config.clock = Clock::new(move || now_micros() + shift.load(Ordering::Relaxed));

    let ids_file = data.join("bench-ids");
    if args.reuse {
        let ids = std::fs::read_to_string(&ids_file).context("reading bench-ids: build first")?;
        let (small, big) = ids.trim().split_once(' ').context("bench-ids")?;
        let m = measure(&config, small, big, args.points, args.reads).await?;
        report("reused data folder", &m, args.points);
        return Ok(());
    }

    // The data: a 100k-point run (10 keys), a 1M-point series, and fillers.
    let server = Server::start(config.clone()).await?;
    let mut c = server.client().await?;
    let mut ids = Vec::new();
    for i in 0..args.experiments {
        ids.push(
            c.create_experiment(proto::CreateExperimentRequest {
                name: format!("run-{i:05}"),
                namespace: "bench".into(),
                ..Default::default()
            })
            .await?
            .into_inner()
            .experiment_id,
        );
    }
    let (small, big) = (ids[0].clone(), ids[1].clone());
    std::fs::write(&ids_file, format!("{small} {big}\n"))?;
    let keys: Vec<String> = (0..KEYS).map(|k| format!("train/metric_{k}")).collect();
    let one_key = vec!["train/loss".to_owned()];
    let fillers = (args.experiments - 2) as u64;
    let filler_points = args.points - 1_100_000;
    let rounds = args.days as usize * args.rounds_per_day;
    let started = Instant::now();
    let per_request = 50_000usize;
    let mut sent = 0u64;
    for round in 0..rounds {
        let day = round / args.rounds_per_day;
        offset.store(-(args.days - 1 - day as i64) * DAY, Ordering::Relaxed);
        let round_started = Instant::now();
        // This round's share of every experiment.
        let share =
            |total: u64| total / rounds as u64 + u64::from((round as u64) < total % rounds as u64);
        // (experiment, keys, first point of this round, points this round)
        let offset_of = |total: u64| round as u64 * (total / rounds as u64 + 1);
        let mut jobs: Vec<(String, Vec<String>, u64, u64)> = vec![
            (
                small.clone(),
                keys.clone(),
                offset_of(100_000),
                share(100_000),
            ),
            (
                big.clone(),
                one_key.clone(),
                offset_of(1_000_000),
                share(1_000_000),
            ),
        ];
        for (i, id) in ids[2..].iter().enumerate() {
            let total = filler_points / fillers + u64::from((i as u64) < filler_points % fillers);
            jobs.push((id.clone(), keys.clone(), offset_of(total), share(total)));
        }
        let mut tasks = tokio::task::JoinSet::new();
        let jobs = Arc::new(std::sync::Mutex::new(jobs));
        for w in 0..8u64 {
            let (jobs, mut c) = (Arc::clone(&jobs), server.client().await?);
            tasks.spawn(async move {
                let mut sent = 0u64;
                loop {
                    let Some((id, keys, first, n)) = jobs.lock().ok().and_then(|mut j| j.pop())
                    else {
                        return Ok::<u64, anyhow::Error>(sent);
                    };
                    let mut done = 0u64;
                    while done < n {
                        let take = (n - done).min(per_request as u64) as usize;
                        let b = block(&id, &keys, first + done, take, w ^ done ^ first);
                        loop {
                            match c
                                .log_metrics(proto::LogMetricsRequest {
                                    blocks: vec![b.clone()],
                                    ..Default::default()
                                })
                                .await
                            {
                                Ok(_) => break,
                                Err(s) if s.code() == tonic::Code::ResourceExhausted => {
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                }
                                Err(s) => return Err(s.into()),
                            }
                        }
                        done += take as u64;
                        sent += take as u64;
                    }
                }
            });
        }
        while let Some(r) = tasks.join_next().await {
            sent += r??;
        }
        // Each round lasts at least a roll age, so files pile up as in a real day.
        let roll = config.roll.max_age + Duration::from_millis(200);
        if let Some(rest) = roll.checked_sub(round_started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
        eprintln!(
            "round {}/{rounds}: {sent} points ({:.1} M points/s so far)",
            round + 1,
            sent as f64 / started.elapsed().as_secs_f64() / 1e6
        );
    }
    offset.store(0, Ordering::Relaxed);
    server.stop().await?;
    anyhow::ensure!(sent == args.points, "sent {sent} of {} points", args.points);
    println!(
        "built {} points over {} experiments and {} days in {:.0} s",
        args.points,
        args.experiments,
        args.days,
        started.elapsed().as_secs_f64()
    );

    let before = measure(&config, &small, &big, args.points, args.reads).await?;
    report("before compaction", &before, args.points);
    if args.no_compact {
        return Ok(());
    }
    let t = Instant::now();
    let pass = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .context("compacting")?;
    println!(
        "compaction: {} partitions in {:.1} s ({:.1} M rows/s)",
        pass.partitions.len(),
        t.elapsed().as_secs_f64(),
        pass.partitions.iter().map(|p| p.rows).sum::<u64>() as f64
            / t.elapsed().as_secs_f64()
            / 1e6
    );
    let after = measure(&config, &small, &big, args.points, args.reads).await?;
    report("after compaction", &after, args.points);
    anyhow::ensure!(
        before.answers == after.answers,
        "compaction changed a query's result"
    );
    println!("query results identical before and after compaction");
    Ok(())
}
