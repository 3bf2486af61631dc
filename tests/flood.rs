//! Far past capacity, memory stays bounded: clients are told RESOURCE_EXHAUSTED,
//! mboxd's peak RSS stays under its configured bound plus a stated margin, and all
//! acknowledged data arrives.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use mboxd::config::Config;
use mboxd::proto;
use tonic::Code;

const MIB: u64 = 1 << 20;
/// Small enough that 32 clients outrun the writers: with a faster writer (rows
/// counted per experiment without comparing ids) a debug-build mboxd kept up with
/// this flood at 32 MiB and never had to refuse anything.
const BUDGET: u64 = 8 * MIB;
const CONCURRENT: u64 = 8;
const MAX_MESSAGE: u64 = 2 * MIB;
const MAX_ROWS: u64 = 200_000;
/// Runtime, allocator slack, redb's cache and Parquet encoder buffers: the overhead
/// term of mboxd's documented bound.
const MARGIN: u64 = 64 * MIB;
const BATCH: usize = 40_000; // about 1 MiB on the wire
const CLIENTS: u64 = 32;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flooding_keeps_memory_bounded_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("mboxd.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nmax_connections = {CLIENTS}\n\
             [ingest]\nmax_buffered_bytes = {BUDGET}\nmax_concurrent_requests = {CONCURRENT}\nfull_wait_ms = 100\n\
             [limits]\nmax_message_bytes = {MAX_MESSAGE}\n[writer]\nmax_rows = {MAX_ROWS}\nmax_age_ms = 1000\n"
        ),
    )
    .unwrap();
    let proc = Process::start(&data, &["--config", config.to_str().unwrap()]).await;
    let mut c = proc.client().await;
    let id = c
        .create_experiment(proto::CreateExperimentRequest {
            name: "flood".into(),
            namespace: "flood".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .experiment_id;
    let baseline = proc.peak_rss();

    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let (id, stop) = (id.clone(), Arc::clone(&stop));
            let addr = proc.addr.clone();
            tokio::spawn(async move {
                let mut c = mboxd::proto::model_store_client::ModelStoreClient::connect(format!(
                    "http://{addr}"
                ))
                .await
                .unwrap()
                .max_encoding_message_size(usize::MAX);
                let (mut acked, mut exhausted) = (Vec::new(), 0u32);
                for i in 0u64.. {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let first = (client << 40) | (i * BATCH as u64);
                    let req = proto::LogMetricsRequest {
                        blocks: vec![numeric_block(&id, &["a", "b", "c"], BATCH, first)],
                        ..Default::default()
                    };
                    match c.log_metrics(req).await {
                        Ok(_) => acked.push(first),
                        Err(e) if e.code() == Code::ResourceExhausted => exhausted += 1,
                        Err(e) => panic!("unexpected status {e:?}"),
                    }
                }
                (acked, exhausted)
            })
        })
        .collect();
    let mut peak = 0;
    for _ in 0..30 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(proc.peak_rss());
    }
    stop.store(true, Ordering::Relaxed);
    let (mut acked, mut exhausted) = (Vec::new(), 0);
    for t in tasks {
        let (a, e) = t.await.unwrap();
        acked.extend(a);
        exhausted += e;
    }
    peak = peak.max(proc.peak_rss());
    // The heap stays out of transparent huge pages (src/main.rs), which count a
    // whole 2 MiB region in RSS for every byte touched in it.
    assert_eq!(proc.proc_field("status", "THP_enabled:"), Some(0));
    assert_eq!(
        proc.proc_field("smaps_rollup", "AnonHugePages:"),
        Some(0),
        "kB of the heap in huge pages after the flood"
    );
    assert!(proc.terminate().await);

    // The bound config/mboxd.toml documents, computed by mboxd itself: buffers,
    // in-flight requests (body, then decoded arrays and WAL record: about 3x their
    // size), unread bytes in each connection's window, one roll's working set, and
    // runtime overhead (the margin).
    let bound = Config::from_file(Some(&config))
        .unwrap()
        .memory_bound_bytes()
        - MARGIN;
    eprintln!(
        "flood: baseline RSS {} MiB, peak {} MiB, bound {} MiB + margin {} MiB; {} batches acked, {} refused",
        baseline / MIB,
        peak / MIB,
        bound / MIB,
        MARGIN / MIB,
        acked.len(),
        exhausted
    );
    assert!(exhausted > 0, "the flood never hit the limits");
    assert!(!acked.is_empty());
    assert!(
        peak <= baseline + bound + MARGIN,
        "peak RSS {} MiB exceeds baseline {} MiB + bound {} MiB + margin {} MiB",
        peak / MIB,
        baseline / MIB,
        bound / MIB,
        MARGIN / MIB
    );
    let on_disk = steps_on_disk(&data);
    for first in &acked {
        for s in *first..*first + BATCH as u64 {
            assert_eq!(on_disk.get(&s), Some(&1), "acknowledged step {s}");
        }
    }
    assert_eq!(
        on_disk.len(),
        acked.len() * BATCH,
        "only acknowledged points are written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_the_limit_wait_until_one_closes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("mboxd.toml");
    std::fs::write(&config, "[server]\nmax_connections = 1\n").unwrap();
    let proc = Process::start(&data, &["--config", config.to_str().unwrap()]).await;
    let mut first = proc.client().await;
    let list = |mut c: Client| async move {
        c.list_experiments(proto::ListExperimentsRequest {
            namespace: "x".into(),
            ..Default::default()
        })
        .await
    };
    list(first.clone()).await.unwrap();
    // A second connection is not accepted while the first is open...
    let url = format!("http://{}", proc.addr);
    let second = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect_lazy();
    let waiting = tokio::spawn(list(
        mboxd::proto::model_store_client::ModelStoreClient::new(second),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the second connection was served");
    // ...and is served once the first closes.
    first
        .list_experiments(proto::ListExperimentsRequest::default())
        .await
        .unwrap();
    drop(first);
    let served = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the waiting connection was never served")
        .unwrap();
    assert!(served.is_ok(), "{served:?}");
    assert!(proc.terminate().await);
}
