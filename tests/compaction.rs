//! Compaction and retention: every row kept exactly (values, order, ingest times),
//! files sorted as a whole with row groups along experiment boundaries, on local and
//! S3 roots; SIGKILLs during compaction lose and duplicate nothing; retention drops
//! exactly the expired partitions.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, RecordBatch};
use bytes::Bytes;
use common::s3::{S3Server, parquet_objects};
use common::*;
use mboxd::config::{Config, StorageRoot};
use mboxd::model::Clock;
use mboxd::proto;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::file::statistics::Statistics;

/// (experiment, key, step, wallclock, value as text, ingested_at) of a metric row.
type Row = (String, String, i64, i64, String, i64);

fn text_column(batch: &RecordBatch, name: &str) -> Vec<String> {
    let c = batch.column_by_name(name).unwrap();
    let d = c.as_dictionary::<arrow_array::types::Int32Type>();
    let v = d.values().as_string::<i32>();
    d.keys()
        .values()
        .iter()
        .map(|&k| v.value(k as usize).to_owned())
        .collect()
}

/// The rows of a metrics file, per row group.
fn file_rows(bytes: &Bytes) -> Vec<Vec<Row>> {
    let groups = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .unwrap()
        .metadata()
        .num_row_groups();
    (0..groups)
        .map(|g| {
            let mut out = Vec::new();
            let reader = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
                .unwrap()
                .with_row_groups(vec![g])
                .build()
                .unwrap();
            for batch in reader {
                let batch = batch.unwrap();
                let (ids, keys) = (
                    text_column(&batch, "experiment_id"),
                    text_column(&batch, "key"),
                );
                let col = |n: &str| batch.column_by_name(n).unwrap().clone();
                let (steps, walls) = (col("step"), col("wallclock_time"));
                let (steps, walls) = (
                    steps.as_primitive::<Int64Type>(),
                    walls.as_primitive::<Int64Type>(),
                );
                let doubles = col("value_double");
                let doubles = doubles.as_primitive::<Float64Type>();
                let strings = col("value_string");
                let strings = strings.as_string::<i32>();
                let raw = col("value_bytes");
                let raw = raw.as_binary::<i32>();
                let at = col("ingested_at");
                let at = at.as_primitive::<TimestampMicrosecondType>();
                for r in 0..batch.num_rows() {
                    let value = if doubles.is_valid(r) {
                        format!("d:{:x}", doubles.value(r).to_bits())
                    } else if strings.is_valid(r) {
                        format!("s:{}", strings.value(r))
                    } else {
                        format!("b:{:?}", raw.value(r))
                    };
                    out.push((
                        ids[r].clone(),
                        keys[r].clone(),
                        steps.value(r),
                        walls.value(r),
                        value,
                        at.value(r),
                    ));
                }
            }
            out
        })
        .collect()
}

/// Every metrics object under a local root, by key.
fn local_objects(root: &Path) -> Vec<(String, Bytes)> {
    parquet_files(root, "metrics")
        .into_iter()
        .map(|p| {
            (
                p.strip_prefix(root).unwrap().to_string_lossy().into_owned(),
                Bytes::from(std::fs::read(&p).unwrap()),
            )
        })
        .collect()
}

/// All rows, sorted (a multiset), and the objects' count per partition.
fn all_rows(objects: &[(String, Bytes)]) -> (Vec<Row>, BTreeMap<String, usize>) {
    let mut rows = Vec::new();
    let mut per_partition = BTreeMap::new();
    for (key, bytes) in objects {
        let dir = key.rsplit_once('/').unwrap().0.to_owned();
        *per_partition.entry(dir).or_default() += 1;
        rows.extend(file_rows(bytes).into_iter().flatten());
    }
    rows.sort();
    (rows, per_partition)
}

/// A compacted file is sorted as a whole, and its row groups' experiment ranges
/// follow one another without overlap (a group shares an experiment with the next
/// only when that experiment spans both).
fn assert_compacted(key: &str, bytes: &Bytes) {
    let groups = file_rows(bytes);
    let flat: Vec<_> = groups.iter().flatten().map(|r| (&r.0, &r.1, r.2)).collect();
    assert!(flat.windows(2).all(|w| w[0] <= w[1]), "{key} is not sorted");
    let meta = ParquetRecordBatchReaderBuilder::try_new(bytes.clone())
        .unwrap()
        .metadata()
        .clone();
    let ranges: Vec<(Vec<u8>, Vec<u8>)> = meta
        .row_groups()
        .iter()
        .map(|rg| match rg.column(0).statistics() {
            Some(Statistics::ByteArray(s)) => (
                s.min_opt().unwrap().data().to_vec(),
                s.max_opt().unwrap().data().to_vec(),
            ),
            other => panic!("{key}: no experiment statistics: {other:?}"),
        })
        .collect();
    for w in ranges.windows(2) {
        assert!(w[0].1 <= w[1].0, "{key}: row groups overlap by experiment");
        if w[0].1 == w[1].0 {
            assert_eq!(
                w[0].0, w[0].1,
                "{key}: a shared experiment spans whole groups"
            );
            assert_eq!(
                w[1].0, w[1].1,
                "{key}: a shared experiment spans whole groups"
            );
        }
    }
}

/// Logs rows that exercise the merge: several experiments and namespaces,
/// interleaved and descending steps, a repeated step, string and bytes values,
/// many small files.
async fn log_mixed(c: &mut Client) -> Vec<String> {
    let a = create_experiment(c, "vision", "a").await;
    let b = create_experiment(c, "vision", "b").await;
    let n = create_experiment(c, "nlp", "n").await;
    for round in (0..6u64).rev() {
        let mut blocks = Vec::new();
        for (i, id) in [&b, &a, &n].into_iter().enumerate() {
            let mut block = numeric_block(id, &["z", "a", "m"], 2_000 + i * 100, round * 3_000);
            block.steps.reverse();
            if round == 2 && i == 0 {
                block.string_rows = vec![5];
                block.string_values = vec!["five".into()];
                block.bytes_rows = vec![6];
                block.bytes_values = vec![vec![0, 255]];
            }
            blocks.push(block);
        }
        c.log_metrics(proto::LogMetricsRequest {
            blocks,
            ..Default::default()
        })
        .await
        .unwrap();
        // A repeated step: the same (experiment, key, step) twice.
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(&a, &["dup"], 1, 7)],
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    vec![a, b, n]
}

async fn compaction_keeps_every_row(s3: bool) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::test_config(dir.path().join("data"));
    config.roll.max_age = Duration::from_millis(50);
    config.writer_threads = 2;
    config.compaction.enabled = false;
    let server_s3 = if s3 {
        let server = S3Server::start(dir.path()).await;
        config.storage = server.storage("team/runs");
        Some(server)
    } else {
        None
    };
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let ids = log_mixed(&mut c).await;
    let mut before_reads = Vec::new();
    for id in &ids {
        before_reads.push(metrics_of(&mut c, id).await);
    }
    server.stop().await;

    let objects = |config: &Config| {
        let config = config.clone();
        let server_s3 = &server_s3;
        async move {
            match (&config.storage.root, server_s3) {
                (StorageRoot::S3 { .. }, Some(s)) => {
                    parquet_objects(s.store("team/runs").as_ref(), "metrics").await
                }
                _ => local_objects(&config.data_dir),
            }
        }
    };
    let (before, files_before) = all_rows(&objects(&config).await);
    assert!(
        files_before.values().all(|&n| n >= 4),
        "the test wants many small files per partition: {files_before:?}"
    );

    let report = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .unwrap();
    assert_eq!(report.partitions.len(), 2, "{report:?}");
    let after_objects = objects(&config).await;
    let (after, files_after) = all_rows(&after_objects);
    assert_eq!(after.len(), before.len());
    assert!(after == before, "compaction changed the rows");
    assert!(files_after.values().all(|&n| n == 1), "{files_after:?}");
    for (key, bytes) in &after_objects {
        assert_compacted(key, bytes);
    }
    // Nothing more to do.
    let again = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .unwrap();
    assert!(again.partitions.is_empty(), "{again:?}");

    // Reads after a restart see the same series, in the same order.
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    for (id, before) in ids.iter().zip(before_reads) {
        assert_eq!(metrics_of(&mut c, id).await, before, "GetMetrics for {id}");
    }
    server.stop().await;
}

#[tokio::test]
async fn compaction_keeps_every_row_on_a_local_root() {
    compaction_keeps_every_row(false).await;
}

#[tokio::test]
async fn compaction_keeps_every_row_on_an_s3_root() {
    compaction_keeps_every_row(true).await;
}

#[tokio::test]
async fn background_compaction_runs_while_serving_and_reads_never_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::test_config(dir.path().join("data"));
    config.roll.max_age = Duration::from_millis(50);
    config.compaction.interval = Duration::from_millis(100);
    config.compaction.min_files = 2;
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "live", "compacting").await;
    let mut expected = 0usize;
    let mut seen_fewer_files = false;
    for round in 0..30u64 {
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(&id, &["loss", "acc"], 500, round * 500)],
            ..Default::default()
        })
        .await
        .unwrap();
        expected += 500;
        // Every read, whatever compaction is doing, holds each point once.
        let points: usize = metrics_of(&mut c, &id)
            .await
            .iter()
            .map(|m| m.values.len())
            .sum();
        assert_eq!(points, expected, "round {round}");
        tokio::time::sleep(Duration::from_millis(40)).await;
        seen_fewer_files |= parquet_files(&config.data_dir, "metrics").len() < round as usize / 2;
    }
    assert!(seen_fewer_files, "background compaction never merged files");
    server.stop().await;
    let steps = steps_on_disk(&config.data_dir);
    assert_eq!(steps.len(), 15_000);
    assert!(steps.values().all(|&n| n == 1));
}

#[tokio::test]
async fn sigkill_during_compaction_loses_and_duplicates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Many small files in four partitions.
    let proc = Process::start(&data, &["--roll-max-age-ms", "30"]).await;
    let mut c = proc.client().await;
    let mut ids = Vec::new();
    for ns in ["p1", "p2", "p3", "p4"] {
        ids.push(create_experiment(&mut c, ns, "e").await);
    }
    for round in 0..12u64 {
        let blocks = ids
            .iter()
            .map(|id| numeric_block(id, &["a", "b"], 12_000, round * 12_000))
            .collect();
        c.log_metrics(proto::LogMetricsRequest {
            blocks,
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert!(proc.terminate().await);
    let (before, files) = all_rows(&local_objects(&data));
    assert_eq!(before.len(), 4 * 12 * 12_000);
    assert!(files.values().all(|&n| n >= 4), "{files:?}");

    let mut rng = 0x2545_F491_4F6C_DD1D_u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for round in 0..10 {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_mboxd"))
            .args(["compact", "--daemon-id", "proc", "--data-dir"])
            .arg(&data)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20 + next() % 1_500)).await;
        let _ = child.kill();
        let _ = child.wait();
        // Half of the time, a daemon starts in between and finishes what it can.
        if round % 2 == 1 {
            let proc = Process::start(&data, &["--roll-max-age-ms", "30"]).await;
            assert!(proc.terminate().await);
        }
    }
    // A last start recovers whatever the last kill interrupted.
    let proc = Process::start(&data, &[]).await;
    let mut c = proc.client().await;
    let served: usize = {
        let mut n = 0;
        for id in &ids {
            n += metrics_of(&mut c, id)
                .await
                .iter()
                .map(|m| m.values.len())
                .sum::<usize>();
        }
        n
    };
    assert!(proc.terminate().await);
    let (after, files_after) = all_rows(&local_objects(&data));
    assert_eq!(after.len(), before.len(), "rows lost or duplicated");
    assert!(after == before, "rows changed");
    assert_eq!(
        served,
        before.len(),
        "the read path disagrees with the files"
    );
    assert!(
        files_after.values().sum::<usize>() < files.values().sum::<usize>(),
        "no compaction finished between the kills: {files_after:?}"
    );
    // And a pass left to finish ends with one file per partition, same rows.
    let mut config = Config::test_config(&data);
    config.daemon_id = Some("proc".into());
    mboxd::server::compact_once(config, |_| {}).await.unwrap();
    let (last, files_last) = all_rows(&local_objects(&data));
    assert!(last == before);
    assert!(files_last.values().all(|&n| n == 1), "{files_last:?}");
    // Nothing left half-done in staging.
    let staged = std::fs::read_dir(data.join("_staging"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.path().is_file())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(staged, 0);
}

#[tokio::test]
async fn retention_deletes_exactly_the_expired_partitions() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::test_config(dir.path().join("data"));
    const DAY: i64 = 86_400_000_000;
    let offset = Arc::new(AtomicI64::new(0));
    let shift = Arc::clone(&offset);
    config.clock = Clock::new(move || mboxd::model::now_micros() + shift.load(Ordering::Relaxed));
    config.roll.max_age = Duration::from_millis(50);
    config.compaction.enabled = false;
    config
        .compaction
        .retention_by_namespace
        .insert("short".into(), 5);
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let short = create_experiment(&mut c, "short", "s").await;
    let long = create_experiment(&mut c, "long", "l").await;
    for (days_ago, first) in [(10, 0u64), (3, 1_000), (0, 2_000)] {
        offset.store(-days_ago * DAY, Ordering::Relaxed);
        for id in [&short, &long] {
            c.log_metrics(proto::LogMetricsRequest {
                blocks: vec![numeric_block(id, &["loss"], 100, first)],
                ..Default::default()
            })
            .await
            .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    offset.store(0, Ordering::Relaxed);
    server.stop().await;
    let dirs = |data: &Path| -> Vec<String> {
        let mut d: Vec<String> = parquet_files(data, "metrics")
            .iter()
            .map(|f| {
                f.parent()
                    .unwrap()
                    .strip_prefix(data)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        d.sort();
        d.dedup();
        d
    };
    let day = |ago: i64| {
        mboxd::paths::utc_date(mboxd::model::now_micros() - ago * DAY)
            .format("%Y-%m-%d")
            .to_string()
    };
    assert_eq!(dirs(&config.data_dir).len(), 6);
    let report = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .unwrap();
    assert_eq!(report.expired_files, 1, "{report:?}");
    let mut want: Vec<String> = [
        format!("metrics/namespace=long/date={}", day(10)),
        format!("metrics/namespace=long/date={}", day(3)),
        format!("metrics/namespace=long/date={}", day(0)),
        format!("metrics/namespace=short/date={}", day(3)),
        format!("metrics/namespace=short/date={}", day(0)),
    ]
    .into();
    want.sort();
    assert_eq!(dirs(&config.data_dir), want);
    // The manifest agrees: the expired points are gone from reads, the rest stay.
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let steps = |m: Vec<proto::Metrics>| -> Vec<u64> {
        m.into_iter()
            .flat_map(|m| m.values)
            .map(|v| v.step)
            .collect()
    };
    assert_eq!(
        steps(metrics_of(&mut c, &short).await),
        (1_000..1_100).chain(2_000..2_100).collect::<Vec<_>>()
    );
    assert_eq!(
        steps(metrics_of(&mut c, &long).await),
        (0..100)
            .chain(1_000..1_100)
            .chain(2_000..2_100)
            .collect::<Vec<_>>()
    );
    server.stop().await;
}

/// An experiment with more events than a row group, and metric keys that cut its
/// metrics between row groups: its events are one group (they have no key column),
/// every row is kept once, and the metrics partition after it is compacted too.
#[tokio::test]
async fn a_large_experiments_events_compact_whole_and_hold_back_no_partition() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::test_config(dir.path().join("data"));
    config.roll.max_age = Duration::from_millis(50);
    config.compaction.enabled = false;
    config.compaction.row_group_rows = 4;
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "vision", "big").await;
    for round in 0..3u64 {
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(&id, &["k1", "k2"], 6, round * 6)],
            ..Default::default()
        })
        .await
        .unwrap();
        let events = (0..3)
            .map(|i| proto::Event {
                name: format!("e{round}-{i}"),
                source: Some(proto::EventSource {
                    name: "trainer".into(),
                }),
                wallclock_time: Some(prost_types::Timestamp {
                    seconds: 1_000 + (round * 3 + i) as i64,
                    nanos: 0,
                }),
                metadata: None,
            })
            .collect();
        c.log_event(proto::LogEventRequest {
            parent_id: id.clone(),
            events,
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    server.stop().await;
    let data = &config.data_dir;
    let rows = |table: &str| -> (usize, usize) {
        let files = parquet_files(data, table);
        (files.len(), files.iter().map(|f| parquet_rows(f)).sum())
    };
    let (event_files, events) = rows("events");
    let (metric_files, points) = rows("metrics");
    assert_eq!((events, points), (9, 18));
    assert!(
        event_files >= 2 && metric_files >= 2,
        "{event_files} {metric_files}"
    );

    let report = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    assert_eq!(report.partitions.len(), 2, "{report:?}");
    assert_eq!(rows("events"), (1, 9));
    assert_eq!(rows("metrics"), (1, 18));
    let names: Vec<String> = {
        let file = std::fs::File::open(&parquet_files(data, "events")[0]).unwrap();
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        let mut out = Vec::new();
        for batch in reader {
            out.extend(text_column(&batch.unwrap(), "name"));
        }
        out.sort();
        out
    };
    let mut want: Vec<String> = (0..3)
        .flat_map(|r| (0..3).map(move |i| format!("e{r}-{i}")))
        .collect();
    want.sort();
    assert_eq!(names, want);
}
