//! Damaged write-ahead logs and a full data folder: the daemon still
//! starts, reports precisely, loses only what the damage destroyed, and recovers.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use mboxd::proto;
use tonic::Code;

const BATCH: u64 = 100;

async fn log_batches(c: &mut Client, id: &str, batches: std::ops::Range<u64>) {
    for b in batches {
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(id, &["loss"], BATCH as usize, b * 1000)],
            ..Default::default()
        })
        .await
        .unwrap();
    }
}

async fn experiment(c: &mut Client) -> String {
    c.create_experiment(proto::CreateExperimentRequest {
        name: "wal".into(),
        namespace: "dur".into(),
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .experiment_id
}

fn only_segment(data: &Path) -> PathBuf {
    let segs: Vec<_> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "wal"))
        .collect();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs[0].clone()
}

/// Byte offsets of the frames in a segment (24-byte header, magic at 0..4, length
/// at 8..12), up to the zeros of a preallocated segment.
fn frame_offsets(bytes: &[u8]) -> Vec<usize> {
    let mut at = 0;
    let mut out = Vec::new();
    while at + 24 <= bytes.len() && &bytes[at..at + 4] == b"MBXW" {
        out.push(at);
        at += 24 + u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
    }
    out
}

fn batches_on_disk(data: &Path) -> Vec<u64> {
    let steps = steps_on_disk(data);
    let mut batches: Vec<u64> = (0..6).filter(|b| steps.contains_key(&(b * 1000))).collect();
    batches.sort();
    for b in &batches {
        for s in b * 1000..b * 1000 + BATCH {
            assert_eq!(steps.get(&s), Some(&1), "step {s} of batch {b}");
        }
    }
    batches
}

/// Waits until the log's first zero-filled segment is ready (named `.zeros` once
/// synced), so the first record goes into it and no later one moves on to a new
/// segment. False if none comes: too little free space here to preallocate.
async fn wait_for_preallocated_segment(data: &Path) -> bool {
    let file = data.join("wal").join("next-0.zeros");
    for _ in 0..1000 {
        if file.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    eprintln!("no preallocated write-ahead log segment after 10 s: appending instead");
    false
}

/// Six acknowledged batches, one WAL record each, none published; then SIGKILL.
async fn six_records_then_kill(data: &Path) {
    let proc = Process::start(data, &["--roll-max-age-ms", "600000"]).await;
    let mut c = proc.client().await;
    let id = experiment(&mut c).await;
    let preallocated = wait_for_preallocated_segment(data).await;
    log_batches(&mut c, &id, 0..6).await;
    proc.kill().await;
    if preallocated {
        // The records went into the preallocated file, which kept its length.
        assert_eq!(
            std::fs::metadata(only_segment(data)).unwrap().len(),
            64 << 20
        );
    }
}

#[tokio::test]
async fn corruption_in_the_middle_keeps_the_segment_aside_and_replays_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    six_records_then_kill(&data).await;
    let seg = only_segment(&data);
    let mut bytes = std::fs::read(&seg).unwrap();
    let frames = frame_offsets(&bytes);
    // One frame per batch (experiments live in the index, not the WAL).
    assert_eq!(frames.len(), 6);
    bytes[frames[2] + 40] ^= 0x55; // a payload byte of batch 2
    std::fs::write(&seg, &bytes).unwrap();

    let proc = Process::start(&data, &[]).await;
    assert!(proc.terminate().await);
    let aside = data
        .join("wal")
        .join("corrupt")
        .join(seg.file_name().unwrap());
    assert_eq!(
        std::fs::read(&aside).unwrap(),
        bytes,
        "the damaged segment is kept as found"
    );
    assert_eq!(batches_on_disk(&data), [0, 1, 3, 4, 5]);
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_everything_before_it_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    six_records_then_kill(&data).await;
    let seg = only_segment(&data);
    let bytes = std::fs::read(&seg).unwrap();
    let last = *frame_offsets(&bytes).last().unwrap();
    let end =
        last + 24 + u32::from_le_bytes(bytes[last + 8..last + 12].try_into().unwrap()) as usize;
    // The last frame loses its last bytes, and whatever followed it is gone.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&seg)
        .unwrap()
        .set_len(end as u64 - 10)
        .unwrap();

    let proc = Process::start(&data, &[]).await;
    assert!(proc.terminate().await);
    assert!(!data.join("wal").join("corrupt").exists());
    assert_eq!(batches_on_disk(&data), [0, 1, 2, 3, 4]);
}

/// A small tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Self(path.to_owned()))
    }

    fn remount(&self, options: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,{options}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount {options}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test]
async fn a_full_data_folder_gets_a_clear_error_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let Some(fs) = Tmpfs::mount(&data, "3m") else {
        eprintln!(
            "SKIPPED: mounting a tmpfs needs root (CAP_SYS_ADMIN); this test cannot run here"
        );
        return;
    };
    let proc = Process::start(&data, &["--roll-max-age-ms", "600000"]).await;
    let mut c = proc.client().await;
    let id = experiment(&mut c).await;
    let mut acked = Vec::new();
    let mut full = None;
    for b in 0..10_000u64 {
        let req = proto::LogMetricsRequest {
            blocks: vec![numeric_block(&id, &["loss"], BATCH as usize, b * 1000)],
            ..Default::default()
        };
        match c.log_metrics(req).await {
            Ok(_) => acked.push(b),
            Err(e) => {
                full = Some(e);
                break;
            }
        }
    }
    let err = full.expect("a 3 MiB folder must fill up");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(
        err.message().contains("data folder is full"),
        "{}",
        err.message()
    );

    // Space returns: ingest resumes.
    fs.remount("size=64m");
    let next = acked.last().unwrap() + 1;
    log_batches(&mut c, &id, next..next + 5).await;
    acked.extend(next..next + 5);
    // (A read-only remount is refused while mboxd holds the WAL open for writing, so
    // this test cannot produce a read-only folder; the error path is the same.)

    assert!(proc.terminate().await, "graceful stop after recovery");
    // Nothing corrupt, every acknowledged batch exactly once, nothing else.
    assert!(!data.join("wal").join("corrupt").exists());
    let steps = steps_on_disk(&data);
    for b in &acked {
        for s in b * 1000..b * 1000 + BATCH {
            assert_eq!(steps.get(&s), Some(&1), "step {s}");
        }
    }
    assert_eq!(steps.len() as u64, acked.len() as u64 * BATCH);
    drop(fs);
}

fn wal_segments(data: &Path) -> usize {
    std::fs::read_dir(data.join("wal"))
        .map(|d| {
            d.filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "wal"))
            })
            .count()
        })
        .unwrap_or(0)
}

/// WAL sequence numbers are never reused. Once every record a restart replayed is
/// published, their segments are deleted and the log can be left with no file at
/// all, while the index still records which (record, partition, experiment) pieces
/// were published. If the next run numbered its records from 1 again, a record
/// acked then and replayed after a crash would be taken for one already published,
/// and skipped: an acknowledged batch lost.
#[tokio::test]
async fn a_record_acked_after_the_log_emptied_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Run 1: two batches acked, not published; SIGKILL.
    six_records_then_kill(&data).await;
    // Run 2: replays and publishes them, deletes their segments, appends nothing.
    let proc = Process::start(&data, &["--roll-max-age-ms", "50"]).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while wal_segments(&data) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "segments never deleted"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proc.kill().await;
    assert_eq!(batches_on_disk(&data), [0, 1, 2, 3, 4, 5]);
    // Run 3: more batches acked, not published; SIGKILL.
    let proc = Process::start(&data, &["--roll-max-age-ms", "600000"]).await;
    let mut c = proc.client().await;
    let id = experiment(&mut c).await;
    c.log_metrics(proto::LogMetricsRequest {
        blocks: vec![numeric_block(&id, &["loss"], BATCH as usize, 100_000)],
        ..Default::default()
    })
    .await
    .unwrap();
    proc.kill().await;
    // Run 4 replays it.
    let proc = Process::start(&data, &[]).await;
    assert!(proc.terminate().await);
    let steps = steps_on_disk(&data);
    for s in 100_000..100_000 + BATCH {
        assert_eq!(steps.get(&s), Some(&1), "acknowledged step {s}");
    }
}
