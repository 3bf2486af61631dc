//! The storage conformance suite: the same tests, run once against a local-folder
//! root and once against an S3 root on a real S3-compatible server (s3s-fs). Each
//! test writes through a real mboxd and gRPC, then reads the root back through
//! object_store (a local-folder or S3 client) and the parquet crate, and through
//! GetMetrics / ListEvents.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, RecordBatch};
use bytes::Bytes;
use common::s3::{S3Server, parquet_objects, spooled_files};
use common::*;
use mboxd::config::Config;
use mboxd::proto;
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[derive(Debug, Clone, Copy)]
enum Backend {
    Local,
    S3,
}

/// A config for `backend` and a client for the root it publishes to.
struct Root {
    dir: tempfile::TempDir,
    config: Config,
    store: Arc<dyn ObjectStore>,
    s3: Option<S3Server>,
}

async fn root(backend: Backend, tune: impl FnOnce(&mut Config)) -> Root {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = Config::test_config(&data);
    tune(&mut config);
    match backend {
        Backend::Local => {
            std::fs::create_dir_all(&data).unwrap();
            let store = Arc::new(LocalFileSystem::new_with_prefix(&data).unwrap());
            Root {
                dir,
                config,
                store,
                s3: None,
            }
        }
        Backend::S3 => {
            let s3 = S3Server::start(&dir.path().join("s3")).await;
            let tuned = config.storage.clone();
            config.storage = s3.storage("team/runs");
            config.storage.multipart_threshold_bytes = tuned.multipart_threshold_bytes;
            config.storage.multipart_part_bytes = tuned.multipart_part_bytes;
            let store = s3.store("team/runs");
            Root {
                dir,
                config,
                store,
                s3: Some(s3),
            }
        }
    }
}

impl Root {
    /// Waits until the root holds `rows` rows of `table`; returns its objects.
    async fn wait_for_rows(&self, table: &str, rows: usize) -> Vec<(String, Bytes)> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let objects = parquet_objects(self.store.as_ref(), table).await;
            let got: usize = objects.iter().map(|(_, b)| rows_in(b)).sum();
            assert!(got <= rows, "{got} rows of {table}, expected {rows}");
            if got == rows {
                return objects;
            }
            assert!(
                Instant::now() < deadline,
                "timed out with {got}/{rows} rows of {table}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// With an S3 root, waits until the spool is empty (every file uploaded and
    /// deleted locally).
    async fn wait_for_empty_spool(&self) {
        if self.s3.is_none() {
            return;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while spooled_files(&self.config.data_dir) > 0 {
            assert!(Instant::now() < deadline, "the spool never emptied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn rows_in(bytes: &Bytes) -> usize {
    ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .unwrap()
        .metadata()
        .file_metadata()
        .num_rows() as usize
}

/// The rows of each row group, as batches.
fn row_groups(bytes: &Bytes) -> Vec<Vec<RecordBatch>> {
    let groups = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .unwrap()
        .metadata()
        .num_row_groups();
    (0..groups)
        .map(|g| {
            ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
                .unwrap()
                .with_row_groups(vec![g])
                .build()
                .unwrap()
                .map(|b| b.unwrap())
                .collect()
        })
        .collect()
}

fn batches(bytes: &Bytes) -> Vec<RecordBatch> {
    row_groups(bytes).into_iter().flatten().collect()
}

/// (experiment, key, step) → value of every metric row, checking each row
/// group's order.
fn metric_rows(objects: &[(String, Bytes)]) -> BTreeMap<(String, String, i64), Option<f64>> {
    let mut out = BTreeMap::new();
    for (name, bytes) in objects {
        for group in row_groups(bytes) {
            let mut previous: Option<(String, String, i64)> = None;
            for batch in group {
                let dict = |col: &str| {
                    let d = batch
                        .column_by_name(col)
                        .unwrap()
                        .as_dictionary::<Int32Type>();
                    let v = d.values().as_string::<i32>();
                    d.keys()
                        .values()
                        .iter()
                        .map(|&k| v.value(k as usize).to_owned())
                        .collect::<Vec<_>>()
                };
                let (ids, keys) = (dict("experiment_id"), dict("key"));
                let steps = batch
                    .column_by_name("step")
                    .unwrap()
                    .as_primitive::<Int64Type>();
                let values = batch
                    .column_by_name("value_double")
                    .unwrap()
                    .as_primitive::<Float64Type>();
                for row in 0..batch.num_rows() {
                    let at = (ids[row].clone(), keys[row].clone(), steps.value(row));
                    if let Some(p) = &previous {
                        assert!(p < &at, "{name} is not sorted: {p:?} then {at:?}");
                    }
                    let value = values.is_valid(row).then(|| values.value(row));
                    assert!(out.insert(at.clone(), value).is_none(), "{at:?} twice");
                    previous = Some(at);
                }
            }
        }
    }
    out
}

async fn get_metrics(c: &mut Client, id: &str) -> BTreeMap<(String, u64), f64> {
    let metrics = metrics_of(c, id).await;
    let mut out = BTreeMap::new();
    for m in metrics {
        for v in m.values {
            let value = match v.value {
                Some(proto::metrics_value::Value::DVal(d)) => d,
                Some(proto::metrics_value::Value::STensor(_)) => f64::NAN,
                other => panic!("unexpected value {other:?}"),
            };
            assert!(out.insert((m.key.clone(), v.step), value).is_none());
        }
    }
    out
}

fn today() -> String {
    chrono::Utc::now().format("%Y-%m-%d").to_string()
}

async fn log(c: &mut Client, blocks: Vec<proto::MetricsBlock>) -> u64 {
    c.log_metrics(proto::LogMetricsRequest {
        blocks,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .points_accepted
}

/// Metrics and events go through a real mboxd into the root as whole, sorted,
/// Hive-partitioned files named by the daemon, and read back the same through
/// the root and through the API.
async fn publishes_partitioned_sorted_files_that_read_back(backend: Backend) {
    let root = root(backend, |_| {}).await;
    let mut server = TestServer::start(root.config.clone()).await;
    let mut c = server.client().await;
    let a = create_experiment(&mut c, "vision", "a").await;
    let b = create_experiment(&mut c, "vision", "b").await;
    // Later steps first, and experiments interleaved: the writer sorts.
    assert_eq!(
        log(
            &mut c,
            vec![
                numeric_block(&b, &["loss", "acc"], 3000, 3000),
                numeric_block(&a, &["loss"], 2000, 2000)
            ]
        )
        .await,
        5000
    );
    let mut with_text = numeric_block(&a, &["loss"], 2000, 0);
    with_text.string_rows = vec![7];
    with_text.string_values = vec!["seven".into()];
    assert_eq!(
        log(
            &mut c,
            vec![numeric_block(&b, &["loss", "acc"], 3000, 0), with_text]
        )
        .await,
        5000
    );
    let events: Vec<_> = (0..3)
        .map(|i| proto::Event {
            name: format!("epoch-{i}"),
            source: Some(proto::EventSource {
                name: "trainer".into(),
            }),
            wallclock_time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + i,
                nanos: 0,
            }),
            metadata: None,
        })
        .collect();
    c.log_event(proto::LogEventRequest {
        parent_id: a.clone(),
        event: None,
        events,
        ..Default::default()
    })
    .await
    .unwrap();

    let objects = root.wait_for_rows("metrics", 10_000).await;
    let event_objects = root.wait_for_rows("events", 3).await;
    let partition = format!("metrics/namespace=vision/date={}/test-daemon-", today());
    for (name, _) in &objects {
        let id = name
            .strip_prefix(&partition)
            .and_then(|n| n.strip_suffix(".parquet"))
            .unwrap_or_else(|| panic!("unexpected object {name}"));
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{name}"
        );
    }
    assert!(
        event_objects[0]
            .0
            .starts_with("events/namespace=vision/date=")
    );

    let rows = metric_rows(&objects);
    assert_eq!(rows.len(), 10_000);
    for ((exp, key, step), value) in &rows {
        // a logs only "loss"; b alternates "loss" (even steps) and "acc".
        let expected_key = if exp == &a || step % 2 == 0 {
            "loss"
        } else {
            "acc"
        };
        assert_eq!(key, expected_key, "{exp} {step}");
        if exp == &a && *step == 7 {
            assert_eq!(*value, None, "the string row has no double");
        } else {
            assert_eq!(*value, Some(*step as f64 / 2.0));
        }
    }

    let api = get_metrics(&mut c, &a).await;
    assert_eq!(api.len(), 4000);
    assert_eq!(api[&("loss".to_owned(), 3999)], 3999.0 / 2.0);
    assert!(
        api[&("loss".to_owned(), 7)].is_nan(),
        "step 7 is the string"
    );
    let listed = c
        .list_events(proto::ListEventsRequest {
            parent_id: a.clone(),
            since: None,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    let names: Vec<_> = listed.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["epoch-0", "epoch-1", "epoch-2"]);
    root.wait_for_empty_spool().await;
    server.stop().await;
}

/// After a graceful stop everything is in the root (nothing left in a spool), and a
/// restarted daemon reads it back from there and adds to it, each row once.
async fn survives_restart_and_reads_back_from_the_root(backend: Backend) {
    let root = root(backend, |_| {}).await;
    let mut server = TestServer::start(root.config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "nlp", "restart").await;
    assert_eq!(
        log(&mut c, vec![numeric_block(&id, &["ppl"], 5000, 0)]).await,
        5000
    );
    server.stop().await;
    if root.s3.is_some() {
        assert_eq!(spooled_files(&root.config.data_dir), 0, "shutdown uploads");
    }
    assert_eq!(
        metric_rows(&parquet_objects(root.store.as_ref(), "metrics").await).len(),
        5000
    );

    let mut server = TestServer::start(root.config.clone()).await;
    let mut c = server.client().await;
    let api = get_metrics(&mut c, &id).await;
    assert_eq!(api.len(), 5000);
    assert!(api.iter().all(|((_, step), v)| *v == *step as f64 / 2.0));
    assert_eq!(
        log(&mut c, vec![numeric_block(&id, &["ppl"], 5000, 5000)]).await,
        5000
    );
    server.stop().await;
    let rows = metric_rows(&parquet_objects(root.store.as_ref(), "metrics").await);
    assert_eq!(rows.len(), 10_000);
    assert_eq!(
        rows.keys().map(|k| k.2).collect::<Vec<_>>(),
        (0..10_000).collect::<Vec<_>>()
    );
    drop(root.dir);
}

/// A file larger than the multipart threshold (and than one part) arrives as one
/// whole object with every value intact; reads of one experiment fetch only the
/// row groups that may hold it and return exactly its rows.
async fn large_files_arrive_whole(backend: Backend) {
    let root = root(backend, |c| {
        c.storage.multipart_threshold_bytes = 1 << 20;
        c.storage.multipart_part_bytes = 5 << 20;
        c.roll.max_age = Duration::from_secs(3600);
        // One writer, so every batch lands in one large file.
        c.writer_threads = 1;
    })
    .await;
    let mut server = TestServer::start(root.config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "big", "large").await;
    // Random values, about 7 bytes a row compressed: more than one 5 MiB part.
    let mut x = 0x9E37_79B9_7F4A_7C15_u64;
    let mut noise = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f64::from_bits((x >> 12) | 0x3FF0_0000_0000_0000)
    };
    let mut expected = Vec::new();
    // In requests of 100k points (1.6 MB), under the default message limit.
    for part in 0..12_u64 {
        let mut block = numeric_block(&id, &["noise"], 100_000, part * 100_000);
        block.values = (0..100_000).map(|_| noise()).collect();
        expected.extend(block.values.iter().copied());
        assert_eq!(log(&mut c, vec![block]).await, 100_000);
    }
    // A small experiment in the same file: it shares an edge row group with `id`.
    let small = create_experiment(&mut c, "big", "small").await;
    assert_eq!(
        log(&mut c, vec![numeric_block(&small, &["lr"], 10, 0)]).await,
        10
    );
    server.stop().await;
    let objects = parquet_objects(root.store.as_ref(), "metrics").await;
    assert_eq!(objects.len(), 1, "one roll, one object");
    assert!(objects[0].1.len() > 6 << 20, "{} bytes", objects[0].1.len());
    let rows = metric_rows(&objects);
    let values: Vec<f64> = rows
        .iter()
        .filter(|((exp, _, _), _)| exp == &id)
        .map(|(_, v)| v.unwrap())
        .collect();
    assert_eq!(values, expected);

    // After a restart the file is read back from the root (on S3, from the bucket).
    let mut server = TestServer::start(root.config.clone()).await;
    let mut c = server.client().await;
    let small_points = get_metrics(&mut c, &small).await;
    let want: BTreeMap<_, _> = (0..10)
        .map(|s| (("lr".to_owned(), s), s as f64 / 2.0))
        .collect();
    assert_eq!(small_points, want);
    let big: Vec<f64> = get_metrics(&mut c, &id).await.into_values().collect();
    assert_eq!(big, expected);
    server.stop().await;
}

/// The current rows of a catalog table written by this daemon: every row of its
/// `<table>/test-daemon-*.parquet` files as strings per column, keeping the latest
/// (by the last column, `updated_at` or `written_at`) per `identity` columns,
/// sorted; once they satisfy `ready`.
async fn snapshot_rows(
    root: &Root,
    table: &str,
    identity: usize,
    ready: impl Fn(&[Vec<String>]) -> bool,
) -> Vec<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let objects = parquet_objects(root.store.as_ref(), table).await;
        let mut latest: BTreeMap<Vec<String>, Vec<String>> = BTreeMap::new();
        for (key, bytes) in &objects {
            assert!(
                key.starts_with(&format!("{table}/test-daemon-")),
                "{key} is not one of this daemon's files"
            );
            for batch in batches(bytes) {
                for row in 0..batch.num_rows() {
                    let cells: Vec<String> = batch
                        .columns()
                        .iter()
                        .map(|c| {
                            if c.is_null(row) {
                                return "null".to_owned();
                            }
                            if let Some(text) = c.as_string_opt::<i32>() {
                                return text.value(row).to_owned();
                            }
                            if let Some(t) =
                                c.as_primitive_opt::<arrow_array::types::TimestampMicrosecondType>()
                            {
                                return t.value(row).to_string();
                            }
                            if let Some(n) = c.as_primitive_opt::<arrow_array::types::Int64Type>() {
                                return n.value(row).to_string();
                            }
                            c.as_primitive::<Float64Type>().value(row).to_string()
                        })
                        .collect();
                    let id = cells[..identity].to_vec();
                    let newer = latest.get(&id).is_none_or(|old| {
                        old.last().unwrap().parse::<i64>().unwrap()
                            <= cells.last().unwrap().parse::<i64>().unwrap()
                    });
                    if newer {
                        latest.insert(id, cells);
                    }
                }
            }
        }
        let rows: Vec<Vec<String>> = latest.into_values().collect();
        if ready(&rows) {
            return rows;
        }
        assert!(
            Instant::now() < deadline,
            "{table} snapshot never became ready: {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn number(n: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(prost_types::value::Kind::NumberValue(n)),
    }
}

/// `experiments/`, `metadata/` and `summaries/` hold the catalog for joins; a
/// change adds the changed experiments' rows, and the latest row wins.
async fn experiments_and_metadata_snapshots_follow_the_index(backend: Backend) {
    let root = root(backend, |_| {}).await;
    let mut server = TestServer::start(root.config.clone()).await;
    let mut c = server.client().await;
    let a = create_experiment(&mut c, "vision", "a").await;
    let b = c
        .create_experiment(proto::CreateExperimentRequest {
            name: "b".into(),
            owner: "ana".into(),
            namespace: "nlp".into(),
            framework: proto::MlFramework::Keras as i32,
            external_id: "run-7".into(),
            metadata: Some(proto::Metadata {
                metadata: [("lr".to_owned(), number(0.1))].into(),
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .experiment_id;
    let experiments = snapshot_rows(&root, "experiments", 1, |rows| rows.len() == 2).await;
    let mut expected = vec![
        [a.as_str(), "a", "vision", "tester", "PYTORCH", "", ""],
        [b.as_str(), "b", "nlp", "ana", "KERAS", "", "run-7"],
    ];
    expected.sort();
    let got: Vec<Vec<&str>> = experiments
        .iter()
        .map(|r| r[..7].iter().map(String::as_str).collect())
        .collect();
    assert_eq!(got, expected, "sorted by id, every field");
    let after_2023 = |t: &String| t.parse::<i64>().unwrap() > 1_700_000_000_000_000;
    assert!(
        experiments
            .iter()
            .all(|r| after_2023(&r[7]) && after_2023(&r[8])),
        "created_at and updated_at are times in µs"
    );
    let metadata = snapshot_rows(&root, "metadata", 2, |rows| rows.len() == 1).await;
    assert_eq!(metadata[0][..3], [b.clone(), "lr".into(), "0.1".into()]);

    // A change replaces the snapshot.
    c.update_metadata(proto::UpdateMetadataRequest {
        parent_id: b.clone(),
        metadata: Some(proto::Metadata {
            metadata: [
                ("lr".to_owned(), number(0.2)),
                ("layers".to_owned(), number(12.0)),
            ]
            .into(),
        }),
    })
    .await
    .unwrap();
    let metadata = snapshot_rows(&root, "metadata", 2, |rows| {
        rows.len() == 2 && rows.iter().any(|r| r[2] == "0.2")
    })
    .await;
    let got: Vec<&[String]> = metadata.iter().map(|r| &r[..3]).collect();
    assert_eq!(
        got,
        [
            [b.clone(), "layers".into(), "12.0".into()].as_slice(),
            [b.clone(), "lr".into(), "0.2".into()].as_slice()
        ]
    );

    // Metric summaries, once the points are published.
    let mut block = numeric_block(&a, &["loss"], 10, 0);
    block.values = (0..10).map(|i| 10.0 - i as f64).collect();
    c.log_metrics(proto::LogMetricsRequest {
        blocks: vec![block],
        ..Default::default()
    })
    .await
    .unwrap();
    let summaries = snapshot_rows(&root, "summaries", 2, |rows| rows.len() == 1).await;
    // experiment_id, key, last, last_step, min, max, count, points
    assert_eq!(
        summaries[0][..8],
        [
            a.clone(),
            "loss".into(),
            "1".into(),
            "9".into(),
            "1".into(),
            "10".into(),
            "10".into(),
            "10".into()
        ]
    );
    server.stop().await;
}

macro_rules! conformance {
    ($($test:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::Local).await
                }
            )*
        }
        mod s3 {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Backend::S3).await
                }
            )*
        }
    };
}

conformance!(
    publishes_partitioned_sorted_files_that_read_back,
    survives_restart_and_reads_back_from_the_root,
    large_files_arrive_whole,
    experiments_and_metadata_snapshots_follow_the_index,
);
