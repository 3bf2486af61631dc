//! SIGKILL at random moments under sustained load from concurrent clients, ten
//! times over: every acknowledged point ends up in Parquet exactly once, and every
//! batch is there whole or not at all.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use mboxd::proto;
use rand::Rng;

const BATCH: u64 = 500;
const CLIENTS: u64 = 4;
const CYCLES: u64 = 10;

/// The first step of batch `i` of `client` in `cycle`; steps never collide.
fn first_step(cycle: u64, client: u64, i: u64) -> u64 {
    (cycle << 40) | (client << 32) | (i * BATCH)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_and_duplicates_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Tiny rolls, so kills also land while files are being published.
    let config = dir.path().join("mboxd.toml");
    std::fs::write(
        &config,
        "[writer]\nmax_rows = 3000\nmax_age_ms = 50\n[wal]\nsegment_bytes = 1048576\n",
    )
    .unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let mut rng = rand::rng();
    // batch first step -> acknowledged?
    let mut sent: HashMap<u64, bool> = HashMap::new();
    let mut experiment = None;

    for cycle in 0..CYCLES {
        let proc = Process::start(&data, &args).await;
        let mut c = proc.client().await;
        let id = c
            .create_experiment(proto::CreateExperimentRequest {
                name: "crash".into(),
                namespace: "chaos".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .experiment_id;
        experiment.get_or_insert(id.clone());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|client| {
                let mut c = c.clone();
                let (id, stop) = (id.clone(), Arc::clone(&stop));
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    for i in 0.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let first = first_step(cycle, client, i);
                        let req = proto::LogMetricsRequest {
                            blocks: vec![numeric_block(
                                &id,
                                &["loss", "acc"],
                                BATCH as usize,
                                first,
                            )],
                            ..Default::default()
                        };
                        let acked = c.log_metrics(req).await.is_ok();
                        outcomes.push((first, acked));
                        if !acked {
                            break;
                        }
                    }
                    outcomes
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(rng.random_range(150..700))).await;
        proc.kill().await;
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            sent.extend(t.await.unwrap());
        }
    }

    // A last start replays what the WAL still holds; a graceful stop publishes it.
    let proc = Process::start(&data, &args).await;
    let mut c = proc.client().await;
    let id = experiment.unwrap();
    let served = metrics_of(&mut c, &id).await;
    assert!(proc.terminate().await, "mboxd did not stop cleanly");

    let on_disk = steps_on_disk(&data);
    let acked: Vec<u64> = sent.iter().filter(|(_, a)| **a).map(|(f, _)| *f).collect();
    assert!(
        acked.len() as u64 >= CYCLES * 2,
        "too little was acknowledged to test anything: {}",
        acked.len()
    );
    let mut missing = 0;
    for first in &acked {
        for s in *first..*first + BATCH {
            match on_disk.get(&s) {
                None => missing += 1,
                Some(&n) => assert_eq!(n, 1, "acknowledged step {s} is in Parquet {n} times"),
            }
        }
    }
    assert_eq!(missing, 0, "{missing} acknowledged points lost");
    // Unacknowledged batches: whole or absent, never partial, never duplicated.
    for (first, _) in sent.iter().filter(|(_, a)| !**a) {
        let present: Vec<u32> = (*first..*first + BATCH)
            .filter_map(|s| on_disk.get(&s).copied())
            .collect();
        assert!(
            present.is_empty()
                || (present.len() as u64 == BATCH && present.iter().all(|&n| n == 1)),
            "batch {first} is half-written or duplicated: {} of {BATCH} points",
            present.len()
        );
    }
    // Nothing on disk that was never sent.
    let total: u64 = on_disk.values().map(|&n| u64::from(n)).sum();
    assert!(total <= sent.len() as u64 * BATCH);
    // The read path agrees with the files.
    let served_points: usize = served.iter().map(|m| m.values.len()).sum();
    assert_eq!(served_points as u64, total);
    // And the WAL is empty after a graceful stop.
    let wal_left = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "wal")
        })
        .count();
    assert_eq!(wal_left, 0, "WAL segments left after a graceful stop");
    eprintln!(
        "crash test: {} batches sent, {} acknowledged, {} points on disk",
        sent.len(),
        acked.len(),
        total
    );
}

/// Creations acknowledged just before a SIGKILL are in the catalog journal, not
/// yet in a durable index commit: the next start writes them again, each once,
/// with the times and metadata they were acknowledged with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creations_acknowledged_before_a_sigkill_are_all_there_after_it() {
    use prost_types::{Value, value::Kind};

    const CREATORS: usize = 16;
    const EACH: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut acked = Vec::new();
    // A kill right after a checkpoint leaves nothing to replay: then again.
    for attempt in 0.. {
        assert!(attempt < 5, "every kill came right after a checkpoint");
        let proc = Process::start(&data, &[]).await;
        let c = proc.client().await;
        let tasks: Vec<_> = (0..CREATORS)
            .map(|t| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    let mut acked = Vec::new();
                    for i in 0..EACH {
                        let lr = (attempt * 1000 + t * EACH + i) as f64;
                        let lr_value = Value {
                            kind: Some(Kind::NumberValue(lr)),
                        };
                        let r = c
                            .create_experiment(proto::CreateExperimentRequest {
                                name: format!("run-{attempt}-{t}-{i}"),
                                namespace: "journal".into(),
                                metadata: Some(proto::Metadata {
                                    metadata: [("lr".to_string(), lr_value)].into(),
                                }),
                                ..Default::default()
                            })
                            .await
                            .unwrap()
                            .into_inner();
                        assert!(!r.experiment_exists);
                        acked.push((r.experiment_id, r.created_at.unwrap(), lr));
                    }
                    acked
                })
            })
            .collect();
        for t in tasks {
            acked.extend(t.await.unwrap());
        }
        proc.kill().await;
        if std::fs::metadata(data.join("catalog.journal"))
            .unwrap()
            .len()
            > 0
        {
            break;
        }
    }

    let proc = Process::start(&data, &[]).await;
    let mut c = proc.client().await;
    let listed = c
        .list_experiments(proto::ListExperimentsRequest {
            namespace: "journal".into(),
            page_size: 10_000,
            include_details: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .experiments;
    assert_eq!(listed.len(), acked.len(), "each creation once");
    let by_id: HashMap<_, _> = listed.iter().map(|e| (e.id.clone(), e)).collect();
    for (id, created_at, lr) in &acked {
        let e = by_id[id];
        assert_eq!(e.created_at.as_ref(), Some(created_at));
        let stored = e.metadata.as_ref().unwrap().metadata["lr"].kind.clone();
        assert_eq!(stored, Some(Kind::NumberValue(*lr)));
    }
    assert_eq!(
        std::fs::metadata(data.join("catalog.journal"))
            .unwrap()
            .len(),
        0,
        "the replay is durable and empties the journal"
    );
    proc.terminate().await;
}
