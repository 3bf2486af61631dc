//! SIGTERM during ingest: mboxd stops accepting, publishes every buffered row and
//! exits 0; every acknowledged point is in the Parquet files.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use common::*;
use mboxd::proto;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_ingest_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Long roll age: everything acknowledged is still in memory at SIGTERM.
    let proc = Process::start(&data, &["--roll-max-age-ms", "600000"]).await;
    let mut c = proc.client().await;
    let id = create_experiment(&mut c, "cv", "sigterm").await;

    // Four clients send 1,000-point batches with unique step ranges until refused.
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for client in 0..4u64 {
        let mut c = c.clone();
        let id = id.clone();
        let stop = Arc::clone(&stop);
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..100_000u64 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let first = (client << 40) | (i * 1_000);
                let req = proto::LogMetricsRequest {
                    blocks: vec![numeric_block(&id, &["loss"], 1_000, first)],
                    ..Default::default()
                };
                match c.log_metrics(req).await {
                    Ok(_) => acked.push(first),
                    Err(_) => break,
                }
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    let exited_cleanly = proc.terminate().await;
    stop.store(true, Ordering::Relaxed);
    assert!(exited_cleanly, "mboxd did not exit 0 after SIGTERM");
    // Everything was published, so the write-ahead log is empty: the next start
    // has nothing to replay.
    let segments: Vec<_> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
        .map(|e| e.path())
        .collect();
    assert!(
        segments.is_empty(),
        "left after a graceful stop: {segments:?}"
    );

    let mut acked = HashSet::new();
    for t in tasks {
        for first in t.await.unwrap() {
            acked.extend(first..first + 1_000);
        }
    }
    assert!(
        acked.len() >= 10_000,
        "too little was acknowledged to test anything: {}",
        acked.len()
    );
    let mut written = HashSet::new();
    for f in parquet_files(&data, "metrics") {
        let reader = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(f).unwrap())
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            for s in batch.column(2).as_primitive::<Int64Type>().values() {
                assert!(written.insert(*s as u64), "step {s} written twice");
            }
        }
    }
    let missing = acked.difference(&written).count();
    assert_eq!(
        missing,
        0,
        "{missing} acknowledged points lost (of {})",
        acked.len()
    );
    // A point was written only if its request was accepted: a batch is whole or absent.
    let extra = written.difference(&acked).count();
    assert_eq!(extra % 1_000, 0);
    assert!(extra <= 4 * 1_000, "{extra} unacknowledged points written");
}
