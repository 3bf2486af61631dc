//! S3 roots under failure, against a real S3-compatible server (s3s-fs): the
//! server goes away during sustained ingest; mboxd is SIGKILLed with files in its
//! spool; a full spool pushes back; retention waits for a spooled file's upload;
//! three daemons share one bucket prefix. And how
//! S3 is configured: through the AWS environment alone, and with the config file
//! overriding the environment.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::s3::{
    ACCESS_KEY, BUCKET, S3Server, SECRET_KEY, numeric_points, parquet_objects, spooled_files,
    steps_in_store, wait_for_points,
};
use common::*;
use mboxd::config::{Config, WhenFull};
use mboxd::model::Clock;
use mboxd::proto;
use object_store::ObjectStore;

const BATCH: u64 = 500;
const PREFIX: &str = "fleet/runs";

/// Clients logging batches of `BATCH` points with steps unique to (`tag`, client,
/// batch) until `stop`; each returns (first step, acknowledged?) per batch.
fn spawn_clients(
    c: &Client,
    id: &str,
    tag: u64,
    clients: u64,
    stop: &Arc<AtomicBool>,
    acked_count: &Arc<AtomicU64>,
) -> Vec<tokio::task::JoinHandle<Vec<(u64, bool)>>> {
    (0..clients)
        .map(|client| {
            let mut c = c.clone();
            let id = id.to_owned();
            let stop = Arc::clone(stop);
            let acked_count = Arc::clone(acked_count);
            tokio::spawn(async move {
                let mut outcomes = Vec::new();
                for i in 0.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let first = (tag << 40) | (client << 32) | (i * BATCH);
                    let req = proto::LogMetricsRequest {
                        blocks: vec![numeric_block(&id, &["loss"], BATCH as usize, first)],
                        ..Default::default()
                    };
                    let acked = c.log_metrics(req).await.is_ok();
                    outcomes.push((first, acked));
                    if acked {
                        acked_count.fetch_add(1, Ordering::Relaxed);
                    } else {
                        break;
                    }
                    // Sustained, not flat out: leave the 2 cores some room.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                outcomes
            })
        })
        .collect()
}

/// Every acknowledged step is in the store exactly once; unacknowledged batches
/// are whole or absent.
async fn assert_exactly_once(store: &dyn ObjectStore, sent: &[(u64, bool)]) {
    let seen = steps_in_store(store).await;
    let acked: Vec<u64> = sent.iter().filter(|(_, a)| *a).map(|(f, _)| *f).collect();
    assert!(acked.len() > 10, "too little acknowledged: {}", acked.len());
    let mut missing = 0;
    for first in &acked {
        for s in *first..*first + BATCH {
            match seen.get(&s) {
                None => missing += 1,
                Some(&n) => assert_eq!(n, 1, "acknowledged step {s} is in the bucket {n} times"),
            }
        }
    }
    assert_eq!(
        missing, 0,
        "{missing} acknowledged points missing from the bucket"
    );
    let mut unacked_present = 0;
    for (first, _) in sent.iter().filter(|(_, a)| !*a) {
        let counts: Vec<u32> = (*first..*first + BATCH)
            .filter_map(|s| seen.get(&s).copied())
            .collect();
        assert!(
            counts.is_empty() || (counts.len() as u64 == BATCH && counts.iter().all(|&n| n == 1)),
            "unacknowledged batch {first} is partial or duplicated: {} of {BATCH} points",
            counts.len()
        );
        unacked_present += counts.len() as u64;
    }
    // Nothing else: every row in the bucket belongs to a batch that was sent.
    let total: u64 = seen.values().map(|&n| u64::from(n)).sum();
    assert_eq!(total, acked.len() as u64 * BATCH + unacked_present);
}

async fn wait_for_empty_spool(data: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while spooled_files(data) > 0 {
        assert!(Instant::now() < deadline, "the spool never emptied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn s3_config(dir: &Path, s3: &S3Server) -> Config {
    let mut config = Config::test_config(dir.join("data"));
    config.storage = s3.storage(PREFIX);
    config.roll.max_age = Duration::from_millis(200);
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_never_stops_ingest_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(&dir.path().join("s3")).await;
    let config = s3_config(dir.path(), &s3);
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "ops", "outage").await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let clients = spawn_clients(&c, &id, 1, 3, &stop, &acked);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    s3.stop();
    let before_outage = acked.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during_outage = acked.load(Ordering::Relaxed) - before_outage;
    let spooled = spooled_files(&config.data_dir);
    s3.resume().await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for t in clients {
        sent.extend(t.await.unwrap());
    }

    assert!(
        during_outage > 100,
        "ingest stalled during the outage: {during_outage} batches acknowledged"
    );
    assert!(
        spooled > 0,
        "nothing was waiting in the spool during the outage"
    );
    assert!(sent.iter().all(|(_, a)| *a), "a request failed");
    server.stop().await;
    wait_for_empty_spool(&config.data_dir).await;
    assert_exactly_once(s3.store(PREFIX).as_ref(), &sent).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_spooled_at_a_sigkill_are_uploaded_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(&dir.path().join("s3")).await;
    let data = dir.path().join("data");
    let config_file = dir.path().join("mboxd.toml");
    std::fs::write(
        &config_file,
        format!("{}[writer]\nmax_age_ms = 100\n", s3.storage_toml(PREFIX)),
    )
    .unwrap();
    let args = ["--config", config_file.to_str().unwrap()];

    let proc = Process::start(&data, &args).await;
    let mut c = proc.client().await;
    let id = create_experiment(&mut c, "ops", "restart").await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let clients = spawn_clients(&c, &id, 2, 2, &stop, &acked);
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The store goes away; files pile up in the spool; then mboxd is killed.
    s3.stop();
    let deadline = Instant::now() + Duration::from_secs(20);
    while spooled_files(&data) < 3 {
        assert!(Instant::now() < deadline, "files never reached the spool");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proc.kill().await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for t in clients {
        sent.extend(t.await.unwrap());
    }
    let left = spooled_files(&data);
    assert!(left >= 3, "{left} files in the spool at the kill");

    s3.resume().await;
    let proc = Process::start(&data, &args).await;
    wait_for_empty_spool(&data).await;
    assert!(proc.terminate().await, "mboxd did not stop cleanly");
    assert_eq!(spooled_files(&data), 0);
    assert_exactly_once(s3.store(PREFIX).as_ref(), &sent).await;
}

/// Retention leaves a file that waits for its upload: deleting it then would race
/// the upload in flight, which could put the object back with nothing naming it.
/// The file expires in the first pass after it is uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_waits_for_a_spooled_file_to_be_uploaded() {
    const DAY: i64 = 86_400_000_000;
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(&dir.path().join("s3")).await;
    let mut config = s3_config(dir.path(), &s3);
    let offset = Arc::new(AtomicI64::new(0));
    let shift = Arc::clone(&offset);
    config.clock = Clock::new(move || mboxd::model::now_micros() + shift.load(Ordering::Relaxed));
    config.compaction.enabled = false;
    config
        .compaction
        .retention_by_namespace
        .insert("short".into(), 5);
    config.shutdown_timeout = Duration::from_secs(2);

    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "short", "old").await;
    s3.stop();
    offset.store(-10 * DAY, Ordering::Relaxed);
    c.log_metrics(proto::LogMetricsRequest {
        blocks: vec![numeric_block(&id, &["loss"], 100, 0)],
        ..Default::default()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while spooled_files(&config.data_dir) == 0 {
        assert!(
            Instant::now() < deadline,
            "the file never reached the spool"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    offset.store(0, Ordering::Relaxed);
    server.stop().await;
    assert_eq!(spooled_files(&config.data_dir), 1);

    // The store is still away: the file stays listed and spooled.
    let report = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .unwrap();
    assert_eq!(report.expired_files, 0, "{report:?}");
    assert_eq!(spooled_files(&config.data_dir), 1);

    s3.resume().await;
    let server = TestServer::start(config.clone()).await;
    wait_for_empty_spool(&config.data_dir).await;
    server.stop().await;
    let store = s3.store(PREFIX);
    assert_eq!(parquet_objects(store.as_ref(), "metrics").await.len(), 1);

    let report = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .unwrap();
    assert_eq!(report.expired_files, 1, "{report:?}");
    assert!(parquet_objects(store.as_ref(), "metrics").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_pushes_back_until_uploads_make_room() {
    let dir = tempfile::tempdir().unwrap();
    let mut s3 = S3Server::start(&dir.path().join("s3")).await;
    let mut config = s3_config(dir.path(), &s3);
    // Any one file fills it.
    config.storage.spool_max_bytes = 1;
    config.when_full = WhenFull::Wait(Duration::from_millis(300));
    let metrics = free_addr();
    config.http_listen = Some(metrics);
    let data = config.data_dir.clone();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "ops", "full").await;
    s3.stop();
    let log = |c: &mut Client, first: u64| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.log_metrics(proto::LogMetricsRequest {
                blocks: vec![numeric_block(&id, &["loss"], 100, first)],
                ..Default::default()
            })
            .await
        }
    };
    log(&mut c, 0).await.unwrap();
    // Spooled and counted (the file lands on disk a moment before it is counted).
    let deadline = Instant::now() + Duration::from_secs(10);
    while scrape(metrics).await["mboxd_spool_files"] < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the file never reached the spool"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = log(&mut c, 100).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("upload spool"), "{refused:?}");
    assert!(refused.metadata().get("grpc-retry-pushback-ms").is_some());
    // Reads still work while writes are refused.
    let got = metrics_of(&mut c, &id).await;
    assert_eq!(got[0].values.len(), 100);
    let during = scrape(metrics).await;
    assert_eq!(during["mboxd_spool_files"], 1.0);
    assert!(during["mboxd_spool_bytes"] > 0.0);
    assert_eq!(during["mboxd_uploads_total"], 0.0);
    assert!(during["mboxd_upload_errors_total"] >= 1.0, "{during:?}");
    assert_eq!(
        during[r#"mboxd_points_rejected_total{reason="resource_exhausted"}"#],
        100.0
    );

    s3.resume().await;
    wait_for_empty_spool(&data).await;
    let after = scrape(metrics).await;
    assert_eq!(after["mboxd_spool_files"], 0.0);
    assert_eq!(after["mboxd_spool_bytes"], 0.0);
    assert_eq!(after["mboxd_uploads_total"], 1.0);
    assert!(after["mboxd_upload_retries_total"] >= 1.0, "{after:?}");
    assert_eq!(
        after["mboxd_uploaded_bytes_total"],
        during["mboxd_spool_bytes"]
    );
    log(&mut c, 100).await.unwrap();
    server.stop().await;
    let seen = steps_in_store(s3.store(PREFIX).as_ref()).await;
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_share_one_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3")).await;
    let config_file = dir.path().join("mboxd.toml");
    std::fs::write(
        &config_file,
        format!("{}[writer]\nmax_age_ms = 200\n", s3.storage_toml(PREFIX)),
    )
    .unwrap();
    let args = ["--config", config_file.to_str().unwrap()];
    let names = ["fleet-a", "fleet-b", "fleet-c"];
    let mut procs = Vec::new();
    for name in names {
        procs.push(Process::start_as(&dir.path().join(name), name, &args).await);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let mut ids: Vec<(String, String)> = Vec::new();
    let mut clients = Vec::new();
    for (tag, proc) in procs.iter().enumerate() {
        let mut c = proc.client().await;
        // Every rank of one job, on every daemon, names the same experiments.
        let shared = create_experiment(&mut c, "fleet", "job-1").await;
        let other = create_experiment(&mut c, "fleet", "job-2").await;
        ids.push((shared.clone(), other.clone()));
        let id = if tag == 2 { other } else { shared };
        clients.extend(spawn_clients(&c, &id, tag as u64 + 1, 2, &stop, &acked));
    }
    assert!(
        ids.iter().all(|x| *x == ids[0]),
        "experiment ids differ across daemons: {ids:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut sent = Vec::new();
    for t in clients {
        sent.extend(t.await.unwrap());
    }
    for proc in procs {
        assert!(proc.terminate().await, "a daemon did not stop cleanly");
    }
    assert!(sent.iter().all(|(_, a)| *a), "a request failed");

    let store = s3.store(PREFIX);
    assert_exactly_once(store.as_ref(), &sent).await;
    // Files from each daemon, all in the same partitions.
    let mut per_daemon: HashMap<&str, usize> = HashMap::new();
    for (key, _) in parquet_objects(store.as_ref(), "metrics").await {
        assert!(key.starts_with("metrics/namespace=fleet/date="), "{key}");
        let name = key.rsplit('/').next().unwrap();
        let daemon = names
            .iter()
            .find(|d| name.starts_with(&format!("{d}-")))
            .unwrap_or_else(|| panic!("{key} names no daemon"));
        *per_daemon.entry(daemon).or_default() += 1;
    }
    assert_eq!(per_daemon.len(), 3, "{per_daemon:?}");
}

/// Starts mboxd on `s3`'s bucket with `env` as its only `AWS_*` variables (and
/// `extra` flags), logging at info into `<dir>/mboxd.log`; logs two requests of
/// points, checks every one of them in the bucket, stops mboxd and returns its log.
async fn log_points_and_read_them_back(
    dir: &Path,
    s3: &S3Server,
    prefix: &str,
    extra: &[&str],
    env: &[(&str, String)],
) -> String {
    let data = dir.join("data");
    let log = dir.join("mboxd.log");
    let stderr = std::fs::File::create(&log).unwrap();
    let proc = Process::start_with(&data, "env-test", extra, |command| {
        command
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(stderr);
    })
    .await;
    let mut c = proc.client().await;
    let id = create_experiment(&mut c, "env", "aws-environment").await;
    let keys = ["loss", "accuracy", "lr"];
    let mut sent = Vec::new();
    for first in [0, 700] {
        let accepted = c
            .log_metrics(proto::LogMetricsRequest {
                blocks: vec![numeric_block(&id, &keys, 700, first)],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .points_accepted;
        assert_eq!(accepted, 700);
        sent.extend(numeric_points(&id, &keys, 700, first));
    }
    sent.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));

    let stored = wait_for_points(s3.store(prefix).as_ref(), sent.len()).await;
    assert_eq!(stored, sent, "the bucket holds other rows than were logged");
    assert!(proc.terminate().await, "mboxd did not stop cleanly");
    assert_eq!(spooled_files(&data), 0, "files left in the spool");
    std::fs::read_to_string(&log).unwrap()
}

/// Issue 14: `AWS_ALLOW_HTTP` (and every other client option) from the
/// environment used to be replaced by mboxd's own client options, so an
/// environment-only setup against a plain-http endpoint never uploaded anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_root_configured_only_through_the_aws_environment() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3")).await;
    let prefix = "env/only";
    let root = format!("s3://{BUCKET}/{prefix}");
    // No config file at all: the root from the flag, S3 from the environment.
    let env = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.to_owned()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.to_owned()),
        ("AWS_REGION", "us-east-1".to_owned()),
        ("AWS_ENDPOINT_URL", s3.endpoint()),
        ("AWS_ALLOW_HTTP", "true".to_owned()),
    ];
    let extra = ["--storage-root", &root, "--roll-max-age-ms", "100"];
    let log = log_points_and_read_them_back(dir.path(), &s3, prefix, &extra, &env).await;

    let described = format!(
        "S3 storage root {root}: endpoint={} (environment AWS_ENDPOINT_URL), \
         region=us-east-1 (environment AWS_REGION), \
         allow_http=true (environment AWS_ALLOW_HTTP), virtual_hosted_style=false (default), \
         credentials=access key (environment AWS_ACCESS_KEY_ID), request_timeout=60s (default); \
         also from the environment: AWS_SECRET_ACCESS_KEY\n",
        s3.endpoint()
    );
    assert!(log.contains(&described), "{log}");
    assert!(log.contains("S3 storage root reachable"), "{log}");
    assert!(!log.contains("upload failed"), "{log}");
    assert!(
        !log.contains(SECRET_KEY),
        "the secret key was logged: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_value_overrides_the_same_environment_variable() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3")).await;
    let prefix = "env/overridden";
    let config_file = dir.path().join("mboxd.toml");
    std::fs::write(
        &config_file,
        format!("{}[writer]\nmax_age_ms = 100\n", s3.storage_toml(prefix)),
    )
    .unwrap();
    // Every variable names a setting the file also sets, and none of them works:
    // uploads succeed only if each file value wins.
    let nowhere = format!("http://{}", free_addr());
    let env = [
        ("AWS_ENDPOINT_URL", nowhere.clone()),
        ("AWS_ENDPOINT_URL_S3", nowhere.clone()),
        ("AWS_ACCESS_KEY_ID", "AKIAWRONG".to_owned()),
        ("AWS_SECRET_ACCESS_KEY", "wrong-secret".to_owned()),
        ("AWS_REGION", "eu-west-1".to_owned()),
        ("AWS_ALLOW_HTTP", "false".to_owned()),
        ("AWS_TIMEOUT", "1ms".to_owned()),
    ];
    let extra = ["--config", config_file.to_str().unwrap()];
    let log = log_points_and_read_them_back(dir.path(), &s3, prefix, &extra, &env).await;

    let described = format!(
        "S3 storage root s3://{BUCKET}/{prefix}: endpoint={} (file), region=us-east-1 (file), \
         allow_http=true (file), virtual_hosted_style=false (default), \
         credentials=access key (file), request_timeout=10s (file)\n",
        s3.endpoint()
    );
    assert!(log.contains(&described), "{log}");
    assert!(!log.contains("upload failed"), "{log}");
    assert!(
        !log.contains(SECRET_KEY) && !log.contains("wrong-secret"),
        "{log}"
    );
}
