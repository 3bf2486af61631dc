//! The reader role over a shared S3 root (s3s-fs): three writer processes and a
//! reader (`mboxd serve --reader`); the reader returns every point, event,
//! metadata key and experiment of runs logged through all three, within 10 s of
//! the acknowledgements, after a writer is SIGKILLed and after a compaction on
//! one writer; and a fresh reader over 10,000 files from 20 writers serves (the
//! time it takes is printed, a figure for the README, not asserted) and never
//! lists the data prefixes.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::s3::S3Server;
use common::*;
use futures::TryStreamExt;
use mboxd::api::convert::json_to_value;
use mboxd::proto;
use object_store::ObjectStoreExt;
use serde_json::json;

const PREFIX: &str = "fleet/runs";
const NS: &str = "fleet";
/// The documented bound on a reader's freshness with default settings.
const FRESHNESS: Duration = Duration::from_secs(10);

/// The tests here measure time; each runs alone so the other's processes do not
/// take its cores.
static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// (key, step, wallclock, value bits) of one point as GetMetrics returns it.
type Point = (String, u64, u64, u64);

/// What the reader must return for one experiment.
#[derive(Debug, Default, Clone, PartialEq)]
struct Expected {
    points: BTreeSet<Point>,
    /// (wallclock µs, name) of each event.
    events: BTreeSet<(i64, String)>,
    metadata: BTreeMap<String, serde_json::Value>,
}

/// Everything the writers acknowledged, by experiment id.
#[derive(Debug, Default)]
struct Ledger {
    runs: BTreeMap<String, Expected>,
}

impl Ledger {
    fn run(&mut self, id: &str) -> &mut Expected {
        self.runs.entry(id.to_owned()).or_default()
    }
}

fn config_file(dir: &Path, s3: &S3Server, name: &str, extra: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("{}{extra}", s3.storage_toml(PREFIX))).unwrap();
    path
}

async fn create(c: &mut Client, name: &str, metadata: serde_json::Value) -> String {
    let metadata = metadata
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), json_to_value(v.clone())))
        .collect();
    c.create_experiment(proto::CreateExperimentRequest {
        name: name.into(),
        owner: "fleet-test".into(),
        namespace: NS.into(),
        framework: proto::MlFramework::Pytorch as i32,
        metadata: Some(proto::Metadata { metadata }),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .experiment_id
}

/// Logs `n` points over `keys` from `first_step` and records them.
async fn log_points(
    c: &mut Client,
    ledger: &mut Ledger,
    id: &str,
    keys: &[&str],
    n: usize,
    first_step: u64,
) {
    let block = numeric_block(id, keys, n, first_step);
    let reply = c
        .log_metrics(proto::LogMetricsRequest {
            blocks: vec![block.clone()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.points_accepted, n as u64);
    let run = ledger.run(id);
    for i in 0..n {
        run.points.insert((
            block.keys[block.key_index[i] as usize].clone(),
            block.steps[i],
            block.wallclock_times[i],
            block.values[i].to_bits(),
        ));
    }
}

async fn log_events(c: &mut Client, ledger: &mut Ledger, id: &str, tag: &str, n: i64, at: i64) {
    let events: Vec<proto::Event> = (0..n)
        .map(|i| proto::Event {
            name: format!("{tag}-{i}"),
            source: Some(proto::EventSource {
                name: "fleet-test".into(),
            }),
            wallclock_time: Some(prost_types::Timestamp {
                seconds: at + i,
                nanos: 0,
            }),
            metadata: None,
        })
        .collect();
    c.log_event(proto::LogEventRequest {
        parent_id: id.into(),
        events: events.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let run = ledger.run(id);
    for e in events {
        let ts = e.wallclock_time.unwrap();
        run.events.insert((ts.seconds * 1_000_000, e.name));
    }
}

async fn update_metadata(
    c: &mut Client,
    ledger: &mut Ledger,
    id: &str,
    metadata: serde_json::Value,
) {
    let map = metadata.as_object().unwrap().clone();
    c.update_metadata(proto::UpdateMetadataRequest {
        parent_id: id.into(),
        metadata: Some(proto::Metadata {
            metadata: map
                .iter()
                .map(|(k, v)| (k.clone(), json_to_value(v.clone())))
                .collect(),
        }),
    })
    .await
    .unwrap();
    ledger.run(id).metadata.extend(map);
}

/// What the reader returns for the ledger's experiments: the experiment ids of
/// the namespace, and each run's points, events and metadata. Points come back
/// as a list, so a duplicate shows.
async fn reader_view(
    c: &mut Client,
    ids: &[String],
) -> Result<
    (
        Vec<String>,
        BTreeMap<
            String,
            (
                Vec<Point>,
                Vec<(i64, String)>,
                BTreeMap<String, serde_json::Value>,
            ),
        >,
    ),
    tonic::Status,
> {
    let listed = c
        .list_experiments(proto::ListExperimentsRequest {
            namespace: NS.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut listed: Vec<String> = listed.experiments.into_iter().map(|e| e.id).collect();
    listed.sort();
    let mut runs = BTreeMap::new();
    for id in ids {
        let mut points = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .get_metrics(proto::GetMetricsRequest {
                    parent_id: id.clone(),
                    full_precision: true,
                    page_token: token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            for m in page.metrics {
                for v in m.values {
                    let value = match v.value {
                        Some(proto::metrics_value::Value::DVal(d)) => d.to_bits(),
                        other => panic!("unexpected value {other:?}"),
                    };
                    points.push((m.key.clone(), v.step, v.wallclock_time, value));
                }
            }
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        points.sort();
        let events = c
            .list_events(proto::ListEventsRequest {
                parent_id: id.clone(),
                since: None,
            })
            .await?
            .into_inner()
            .events
            .into_iter()
            .map(|e| {
                let ts = e.wallclock_time.unwrap_or_default();
                (ts.seconds * 1_000_000 + i64::from(ts.nanos) / 1000, e.name)
            })
            .collect();
        let metadata = c
            .list_metadata(proto::ListMetadataRequest {
                parent_id: id.clone(),
            })
            .await?
            .into_inner()
            .metadata
            .into_iter()
            .map(|(k, v)| {
                (
                    k,
                    mboxd::api::convert::value_to_json(&"metadata", v).unwrap_or_default(),
                )
            })
            .collect();
        runs.insert(id.clone(), (points, events, metadata));
    }
    Ok((listed, runs))
}

/// Waits until the reader returns exactly the ledger (every point, event and
/// metadata key once, every experiment once), failing if that takes longer than
/// `FRESHNESS` after `acked`. Returns how long it took.
async fn assert_reader_catches_up(
    c: &mut Client,
    ledger: &Ledger,
    acked: Instant,
    what: &str,
) -> Duration {
    let ids: Vec<String> = ledger.runs.keys().cloned().collect();
    let want: BTreeMap<_, _> = ledger
        .runs
        .iter()
        .map(|(id, e)| {
            (
                id.clone(),
                (
                    e.points.iter().cloned().collect::<Vec<_>>(),
                    e.events.iter().cloned().collect::<Vec<_>>(),
                    e.metadata.clone(),
                ),
            )
        })
        .collect();
    loop {
        let last = match reader_view(c, &ids).await {
            Ok((listed, runs)) if listed == ids && runs == want => return acked.elapsed(),
            Ok(view) => {
                // Never more than was acknowledged: no duplicates, no strays.
                for (id, (points, events, _)) in &view.1 {
                    let (wp, we, _) = &want[id];
                    let distinct: BTreeSet<_> = points.iter().collect();
                    assert_eq!(
                        distinct.len(),
                        points.len(),
                        "{what}: duplicate points of {id}"
                    );
                    assert!(
                        points.iter().all(|p| wp.contains(p)),
                        "{what}: a point never logged"
                    );
                    assert!(events.len() <= we.len(), "{what}: more events than logged");
                }
                format!(
                    "{} experiments listed; {:?}",
                    view.0.len(),
                    view.1
                        .iter()
                        .map(|(id, r)| (id.clone(), r.0.len(), r.1.len(), r.2.len()))
                        .collect::<Vec<_>>()
                )
            }
            Err(e) => format!("error: {e}"),
        };
        assert!(
            acked.elapsed() < FRESHNESS,
            "{what}: the reader did not return everything within {FRESHNESS:?} of the last \
             acknowledgement; last view: {last}; wanted {:?}",
            want.iter()
                .map(|(id, r)| (id.clone(), r.0.len(), r.1.len(), r.2.len()))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether any of `daemon`'s log objects records a replacement (a compaction).
async fn compaction_shipped(s3: &S3Server, daemon: &str) -> bool {
    let store = s3.store(PREFIX);
    let prefix = object_store::path::Path::from(format!("_mboxd/{daemon}/log"));
    let logs: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    for meta in logs {
        let bytes = store
            .get(&meta.location)
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        if String::from_utf8_lossy(&bytes).contains("\"kind\":\"replace\"") {
            return true;
        }
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_writers_one_reader_every_point_once_through_a_sigkill_and_a_compaction() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3")).await;
    // Writers keep the default roll age (5 s); writer a also rolls every second
    // and compacts every second, so its files are merged while the reader reads.
    let plain = config_file(dir.path(), &s3, "writer", "");
    let compacting = config_file(
        dir.path(),
        &s3,
        "compacting",
        "[writer]\nmax_age_ms = 1000\n[compaction]\ninterval_s = 1\nmin_files = 2\n",
    );
    let reader_toml = config_file(dir.path(), &s3, "reader", "");
    let arg = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let (plain, compacting, reader_toml) = (arg(&plain), arg(&compacting), arg(&reader_toml));
    let a = Process::start_as(&dir.path().join("a"), "fleet-a", &["--config", &compacting]).await;
    let mut b = Process::start_as(&dir.path().join("b"), "fleet-b", &["--config", &plain]).await;
    let c_proc = Process::start_as(&dir.path().join("c"), "fleet-c", &["--config", &plain]).await;
    let http = free_addr();
    let reader = Process::start_with_http(
        &dir.path().join("reader"),
        "reader",
        http,
        &["--config", &reader_toml, "--reader"],
    )
    .await;
    let (mut ca, mut cb, mut cc) = (a.client().await, b.client().await, c_proc.client().await);
    let mut r = reader.client().await;
    let mut ledger = Ledger::default();

    // Round 1: one run logged through all three daemons, and a run on each of
    // two of them alone.
    let job = create(&mut ca, "job-1", json!({"seed": 7.0})).await;
    assert_eq!(create(&mut cb, "job-1", json!({"seed": 7.0})).await, job);
    assert_eq!(create(&mut cc, "job-1", json!({"seed": 7.0})).await, job);
    ledger.run(&job).metadata.insert("seed".into(), json!(7.0));
    let solo_a = create(&mut ca, "solo-a", json!({})).await;
    let solo_c = create(&mut cc, "solo-c", json!({"owner_note": "c"})).await;
    ledger.run(&solo_a);
    ledger
        .run(&solo_c)
        .metadata
        .insert("owner_note".into(), json!("c"));
    update_metadata(
        &mut ca,
        &mut ledger,
        &job,
        json!({"lr": 0.1, "a_only": "x"}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    // The later update of lr, through another daemon, wins.
    update_metadata(&mut cb, &mut ledger, &job, json!({"lr": 0.2})).await;
    update_metadata(&mut cc, &mut ledger, &job, json!({"c_only": 3.0})).await;
    for (t, client) in [&mut ca, &mut cb, &mut cc].into_iter().enumerate() {
        let t = t as u64;
        log_points(client, &mut ledger, &job, &["loss", "acc"], 200, t * 1000).await;
        log_events(
            client,
            &mut ledger,
            &job,
            &format!("w{t}"),
            3,
            1_700_000_000 + t as i64 * 10,
        )
        .await;
    }
    log_points(&mut ca, &mut ledger, &solo_a, &["loss"], 50, 0).await;
    log_events(&mut cc, &mut ledger, &solo_c, "solo", 2, 1_700_001_000).await;
    let took = assert_reader_catches_up(&mut r, &ledger, Instant::now(), "three writers").await;
    eprintln!("three writers: the reader had everything {took:?} after the last ack");

    // Writes to the reader are refused, saying why.
    let refused = r
        .log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(&job, &["loss"], 1, 99_999)],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("reader"),
        "{}",
        refused.message()
    );
    let refused = r
        .create_experiment(proto::CreateExperimentRequest {
            name: "x".into(),
            namespace: NS.into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);

    // Round 2: points acknowledged by b, which is SIGKILLed before it rolls a
    // file; after its restart they are published from its WAL, and more come.
    log_points(&mut cb, &mut ledger, &job, &["loss", "acc"], 300, 10_000).await;
    log_events(&mut cb, &mut ledger, &job, "before-kill", 2, 1_700_002_000).await;
    b.kill().await;
    b = Process::start_as(&dir.path().join("b"), "fleet-b", &["--config", &plain]).await;
    cb = b.client().await;
    log_points(&mut cb, &mut ledger, &job, &["loss"], 100, 20_000).await;
    let took = assert_reader_catches_up(&mut r, &ledger, Instant::now(), "after a SIGKILL").await;
    eprintln!("after a SIGKILL: {took:?}");

    // Round 3: a's files are compacted while the reader serves: a few rolls of
    // points, then wait until a ships a replacement.
    for round in 0..3u64 {
        log_points(
            &mut ca,
            &mut ledger,
            &job,
            &["loss", "acc"],
            100,
            30_000 + round * 100,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let acked = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !compaction_shipped(&s3, "fleet-a").await {
        assert!(Instant::now() < deadline, "writer a never compacted");
        // Reads during the compaction never hold a duplicate.
        let _ = reader_view(&mut r, std::slice::from_ref(&job))
            .await
            .map(|(_, runs)| {
                let points = &runs[&job].0;
                let distinct: BTreeSet<_> = points.iter().collect();
                assert_eq!(
                    distinct.len(),
                    points.len(),
                    "duplicate points during compaction"
                );
            });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let took = assert_reader_catches_up(&mut r, &ledger, acked, "after a compaction").await;
    eprintln!("after a compaction: {took:?}");
    // And stays exact once the compacted inputs are deleted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_reader_catches_up(
        &mut r,
        &ledger,
        Instant::now(),
        "after the inputs were deleted",
    )
    .await;

    // The web view's JSON API on the reader sees the merged run.
    let body = http_get(http, &format!("/api/v1/experiments/{job}")).await;
    let detail: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(detail["keys"], json!(["acc", "loss"]), "{detail}");

    // Reads went to the data by GET only: never a LIST of the data prefixes.
    let m = scrape(http).await;
    let data_lists: f64 = m
        .iter()
        .filter(|(k, _)| {
            k.starts_with("mboxd_store_requests_total")
                && k.contains("area=\"data\"")
                && k.contains("op=\"list\"")
        })
        .map(|(_, v)| v)
        .sum();
    assert_eq!(data_lists, 0.0, "{m:?}");
    assert_eq!(m.get("mboxd_reader_daemons"), Some(&3.0));

    for p in [a, b, c_proc, reader] {
        assert!(p.terminate().await, "a daemon did not stop cleanly");
    }
}

/// The numbers of `daemon`'s log objects in the bucket.
async fn log_numbers(s3: &S3Server, daemon: &str) -> Vec<u64> {
    let store = s3.store(PREFIX);
    let prefix = object_store::path::Path::from(format!("_mboxd/{daemon}/log"));
    let logs: Vec<_> = store.list(Some(&prefix)).try_collect().await.unwrap();
    let mut n: Vec<u64> = logs
        .iter()
        .filter_map(|m| m.location.filename()?.strip_suffix(".json")?.parse().ok())
        .collect();
    n.sort_unstable();
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_fell_behind_past_deleted_log_objects_stops_and_restarts_exact() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3")).await;
    // A checkpoint after every two log objects: the log objects before the
    // previous checkpoint are deleted within seconds.
    let writer_toml = config_file(
        dir.path(),
        &s3,
        "writer",
        "[writer]\nmax_age_ms = 300\n[changelog]\ncheckpoint_min_objects = 1\ncheckpoint_max_objects = 2\n",
    );
    let reader_toml = config_file(
        dir.path(),
        &s3,
        "reader",
        "[reader]\npoll_interval_ms = 100\n",
    );
    let arg = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let (writer_toml, reader_toml) = (arg(&writer_toml), arg(&reader_toml));
    let w = Process::start_as(
        &dir.path().join("w"),
        "behind-w",
        &["--config", &writer_toml],
    )
    .await;
    let reader_args = ["--config", reader_toml.as_str(), "--reader"];
    let reader_dir = dir.path().join("reader");
    let reader = Process::start_with_http(&reader_dir, "reader", free_addr(), &reader_args).await;
    let mut cw = w.client().await;
    let mut r = reader.client().await;
    let mut ledger = Ledger::default();
    let run = create(&mut cw, "behind", json!({"seed": 1.0})).await;
    ledger.run(&run).metadata.insert("seed".into(), json!(1.0));
    log_points(&mut cw, &mut ledger, &run, &["loss"], 100, 0).await;
    assert_reader_catches_up(&mut r, &ledger, Instant::now(), "before the pause").await;

    // The reader pauses; the writer ships on until the log objects the reader
    // would read next are deleted.
    let pid = reader.child.id().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, pid.as_str()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let before = *log_numbers(&s3, "behind-w").await.last().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut step = 100;
    while log_numbers(&s3, "behind-w")
        .await
        .first()
        .is_none_or(|&n| n <= before + 1)
    {
        assert!(
            Instant::now() < deadline,
            "the writer never deleted old log objects"
        );
        log_points(&mut cw, &mut ledger, &run, &["loss"], 10, step).await;
        step += 10;
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    signal("-CONT");

    // It notices, says why, and exits with an error instead of serving stale data.
    let mut reader = reader;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = reader.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the reader kept serving after a gap"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Exit 1: mboxd returned its error (not a panic, 101, nor a signal).
    assert_eq!(status.code(), Some(1), "{status:?}");
    drop(reader);

    // Started again, it loads the latest checkpoint and has every point once.
    let reader = Process::start_with_http(&reader_dir, "reader", free_addr(), &reader_args).await;
    let mut r = reader.client().await;
    assert_reader_catches_up(&mut r, &ledger, Instant::now(), "after the restart").await;
    for p in [w, reader] {
        assert!(p.terminate().await, "a daemon did not stop cleanly");
    }
}

/// `GET path` on the HTTP listener; returns the body of a 200.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: mboxd\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}\n{body}"
    );
    body.to_owned()
}

const WRITERS: usize = 20;
const FILES_PER_WRITER: usize = 500;
const RUNS: usize = 10;

/// Writes what `WRITERS` daemons with `FILES_PER_WRITER` published files each
/// ship, through the writers' own index and shipper (the files themselves are
/// not needed to start a reader, so they are not written): every daemon creates
/// the same `RUNS` runs, and each file holds one point of one run.
async fn ship_synthetic_fleet(s3: &S3Server) {
    use mboxd::changelog::ship::{ShipSettings, Shipper};
    use mboxd::index::{FileEntry, FilePart, Forget, Index, NewExperiment, PublishIntent};
    use mboxd::model::MetricSummary;
    let store = s3.store(PREFIX);
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let store = Arc::clone(&store);
        tasks.push(tokio::spawn(async move {
            let daemon = format!("synthetic-{w:02}");
            let index = Arc::new(Index::open_in_memory().unwrap());
            index.enable_change_log().unwrap();
            // No checkpoint after the first: a reader replays every log object,
            // the slowest start-up this layout allows.
            let settings = ShipSettings {
                checkpoint_min_objects: 1000,
                ..ShipSettings::default()
            };
            let shipper = Shipper::new(
                store,
                Arc::clone(&index),
                &daemon,
                settings,
                mboxd::telemetry::Metrics::new(),
            );
            shipper.ship_once().await.unwrap();
            let ids: Vec<String> = (0..RUNS)
                .map(|r| {
                    index
                        .create_experiment(
                            NewExperiment {
                                name: format!("run-{r}"),
                                namespace: NS.into(),
                                owner: "o".into(),
                                framework: 1,
                                task: String::new(),
                                external_id: String::new(),
                            },
                            &[],
                        )
                        .unwrap()
                        .0
                        .id
                })
                .collect();
            for f in 0..FILES_PER_WRITER {
                let id = &ids[f % RUNS];
                let intent = PublishIntent {
                    entry: FileEntry {
                        key: format!(
                            "metrics/namespace={NS}/date=2026-01-01/{daemon}-{f:05}.parquet"
                        ),
                        rows: 1,
                        bytes: 1000,
                        min_experiment: id.clone(),
                        max_experiment: id.clone(),
                        created_at: 0,
                        schema: mboxd::index::SCHEMA_INT64,
                        compacted: false,
                    },
                    partition: format!("metrics/namespace={NS}/date=2026-01-01"),
                    pieces: vec![],
                    experiments: vec![(
                        id.clone(),
                        FilePart {
                            row_groups: vec![0],
                            rows: 1,
                        },
                    )],
                    summaries: vec![(
                        id.clone(),
                        "loss".into(),
                        MetricSummary::of((w * FILES_PER_WRITER + f) as i64, Some(f as f64), 0),
                    )],
                    batch_ids: vec![],
                };
                index.begin_publish(&intent).unwrap();
                index
                    .commit_publish(&intent, Forget::default(), false)
                    .unwrap();
                // A log object per four files, as a writer publishing files
                // about as fast as it ships would write.
                if f % 4 == 3 {
                    shipper.ship_once().await.unwrap();
                }
            }
            shipper.ship_once().await.unwrap();
            index.ship_state().unwrap().shipped_log
        }));
    }
    let mut objects = 0;
    for t in tasks {
        objects += t.await.unwrap();
    }
    assert_eq!(objects, (WRITERS * FILES_PER_WRITER / 4) as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_reader_over_10000_files_from_20_writers_serves_and_never_lists_data() {
    let _alone = ALONE.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start(&dir.path().join("s3")).await;
    ship_synthetic_fleet(&s3).await;
    let config = config_file(
        dir.path(),
        &s3,
        "reader",
        "[reader]\npoll_interval_ms = 500\n",
    );
    let http = free_addr();
    let started = Instant::now();
    let reader = Process::start_with_http(
        &dir.path().join("reader"),
        "reader",
        http,
        &["--config", config.to_str().unwrap(), "--reader"],
    )
    .await;
    let mut r = reader.client().await;
    // Serving: every run listed, with every file's point in its summary.
    let listed = loop {
        let listed = r
            .list_experiments(proto::ListExperimentsRequest {
                namespace: NS.into(),
                include_details: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .experiments;
        if !listed.is_empty() {
            break listed;
        }
        // Liveness only: how fast it serves is a figure, printed below.
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the reader listed nothing in a minute"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = started.elapsed();
    eprintln!(
        "a fresh reader over {} files served in {took:?}",
        WRITERS * FILES_PER_WRITER
    );
    assert_eq!(
        listed.len(),
        RUNS,
        "runs created by every writer are one run each"
    );
    let points: u64 = listed
        .iter()
        .map(|e| e.metric_summaries.iter().map(|s| s.count).sum::<u64>())
        .sum();
    assert_eq!(points, (WRITERS * FILES_PER_WRITER) as u64);
    for e in &listed {
        let s = &e.metric_summaries[0];
        assert_eq!(
            s.count,
            (WRITERS * FILES_PER_WRITER / RUNS) as u64,
            "{}",
            e.name
        );
    }

    // After start-up: only the change logs, and only by GET of each daemon's
    // next object plus one LIST of _mboxd/ per poll; nothing of the data.
    let at_start = scrape(http).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let later = scrape(http).await;
    let count = |m: &std::collections::HashMap<String, f64>, op: &str, area: &str| -> f64 {
        m.get(&format!(
            "mboxd_store_requests_total{{op=\"{op}\",area=\"{area}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    for m in [&at_start, &later] {
        let data: f64 = m
            .iter()
            .filter(|(k, _)| {
                k.starts_with("mboxd_store_requests_total") && k.contains("area=\"data\"")
            })
            .map(|(_, v)| v)
            .sum();
        assert_eq!(data, 0.0, "the reader touched the data: {m:?}");
    }
    // Start-up: one LIST of _mboxd/ and one per daemon folder.
    assert!(count(&at_start, "list", "changelog") >= (1 + WRITERS) as f64);
    let polls = count(&later, "list", "changelog") - count(&at_start, "list", "changelog");
    assert!(
        (4.0..=8.0).contains(&polls),
        "{polls} polls in 3 s at 500 ms"
    );
    let gets = count(&later, "get", "changelog") - count(&at_start, "get", "changelog");
    // One GET per daemon per poll (a poll may straddle a scrape).
    let per_poll = WRITERS as f64;
    assert!(
        ((polls - 1.0) * per_poll..=(polls + 1.0) * per_poll).contains(&gets),
        "{gets} GETs in {polls} polls of {WRITERS} daemons"
    );
    assert_eq!(later.get("mboxd_reader_daemons"), Some(&(WRITERS as f64)));
    assert!(reader.terminate().await);
}
