//! Series reads through GetMetrics: bucketed series match a brute-force
//! computation, pages hold every point once, key and step filters select exactly,
//! reads do not wait for busy writers, and a million-point read stays within the
//! memory bound.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mboxd::config::Config;
use mboxd::proto;
use proto::metrics_value::Value as V;

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// (step, value) in the order the points were sent.
type Sent = Vec<(u64, f64)>;

/// Sends `batches` blocks of random points (repeated and out-of-order steps) for
/// key `k`, some published (several files) and the last ones still buffered.
async fn send_random(c: &mut Client, id: &str, batches: usize, rng: &mut Rng) -> Sent {
    let mut sent = Vec::new();
    for b in 0..batches {
        let n = 50 + (rng.next() % 200) as usize;
        let steps: Vec<u64> = (0..n).map(|_| rng.next() % 5_000).collect();
        let values: Vec<f64> = (0..n)
            .map(|_| (rng.next() % 10_000) as f64 / 7.0 - 500.0)
            .collect();
        sent.extend(steps.iter().copied().zip(values.iter().copied()));
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![proto::MetricsBlock {
                parent_id: id.into(),
                keys: vec!["k".into()],
                key_index: vec![0; n],
                steps,
                wallclock_times: vec![42; n],
                values,
                ..Default::default()
            }],
            ..Default::default()
        })
        .await
        .unwrap();
        if b % 5 == 4 {
            // Let some files roll, so points come from files and buffers.
            tokio::time::sleep(Duration::from_millis(60)).await;
        }
    }
    sent
}

/// The points of `sent` in the order mboxd returns them: by step, then as sent.
fn ordered(sent: &Sent) -> Vec<(u64, f64)> {
    let mut v = sent.clone();
    v.sort_by_key(|p| p.0); // stable: equal steps keep their order
    v
}

/// The buckets docs/http-api.md defines, by brute force: (last step, last value,
/// min, max) per non-empty bucket.
fn brute_buckets(points: &[(u64, f64)], max: u64) -> Vec<(u64, f64, f64, f64)> {
    let lo = points.first().unwrap().0;
    let hi = points.last().unwrap().0;
    let width = (hi - lo + 1).div_ceil(max);
    let mut out: Vec<(u64, (u64, f64, f64, f64))> = Vec::new();
    for &(s, v) in points {
        let b = (s - lo) / width;
        match out.last_mut() {
            Some((bb, acc)) if *bb == b => {
                *acc = (s, v, acc.2.min(v), acc.3.max(v));
            }
            _ => out.push((b, (s, v, v, v))),
        }
    }
    out.into_iter().map(|(_, a)| a).collect()
}

fn value(v: &proto::MetricsValue) -> f64 {
    match v.value {
        Some(V::DVal(d)) => d,
        ref other => panic!("unexpected value {other:?}"),
    }
}

async fn get(c: &mut Client, req: proto::GetMetricsRequest) -> proto::GetMetricsResponse {
    c.get_metrics(proto::GetMetricsRequest {
        full_precision: true,
        ..req
    })
    .await
    .unwrap()
    .into_inner()
}

fn config() -> (tempfile::TempDir, Config) {
    let (dir, mut config) = temp_config();
    config.roll.max_age = Duration::from_millis(50);
    config.writer_threads = 2;
    (dir, config)
}

#[tokio::test]
async fn bucketed_series_match_a_brute_force_computation() {
    let (_dir, config) = config();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "s", "random").await;
    let sent = send_random(&mut c, &id, 40, &mut Rng(0x9E37_79B9_7F4A_7C15)).await;
    let all = ordered(&sent);
    for (max, start, end) in [
        (100u32, None, None),
        (7, None, None),
        (64, Some(1_000i64), Some(3_999i64)),
        (1, None, None),
        (100_000, None, None),
    ] {
        let page = get(
            &mut c,
            proto::GetMetricsRequest {
                parent_id: id.clone(),
                max_points: max,
                start_step: start,
                end_step: end,
                ..Default::default()
            },
        )
        .await;
        assert!(page.next_page_token.is_empty());
        let points: Vec<(u64, f64)> = all
            .iter()
            .copied()
            .filter(|p| {
                start.is_none_or(|s| p.0 as i64 >= s) && end.is_none_or(|e| p.0 as i64 <= e)
            })
            .collect();
        let [m] = page.metrics.as_slice() else {
            panic!("one series expected: {:?}", page.metrics.len());
        };
        assert_eq!(m.total_points, points.len() as u64);
        if points.len() <= max as usize {
            assert!(!m.bucketed && m.min.is_empty());
            let got: Vec<(u64, f64)> = m.values.iter().map(|v| (v.step, value(v))).collect();
            assert_eq!(got, points);
            continue;
        }
        assert!(m.bucketed, "max_points {max}");
        let want = brute_buckets(&points, u64::from(max));
        assert!(want.len() <= max as usize);
        let got: Vec<(u64, f64, f64, f64)> = m
            .values
            .iter()
            .zip(&m.min)
            .zip(&m.max)
            .map(|((v, &lo), &hi)| (v.step, value(v), lo, hi))
            .collect();
        assert_eq!(got, want, "max_points {max}, range {start:?}..{end:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn pages_return_every_point_once_and_filters_select_exactly() {
    let (_dir, config) = config();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "s", "paged").await;
    let mut rng = Rng(7);
    let sent = send_random(&mut c, &id, 20, &mut rng).await;
    // More keys, so pages also cut between series.
    for key in ["a", "b", "zz"] {
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(&id, &[key], 300, 10)],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let whole = metrics_of(&mut c, &id).await;
    let keys: Vec<&str> = whole.iter().map(|m| m.key.as_str()).collect();
    assert_eq!(keys, ["a", "b", "k", "zz"]);
    let k: Vec<(u64, f64)> = whole[2].values.iter().map(|v| (v.step, value(v))).collect();
    assert_eq!(k, ordered(&sent));

    let want: Vec<(String, u64, f64)> = whole
        .iter()
        .flat_map(|m| m.values.iter().map(|v| (m.key.clone(), v.step, value(v))))
        .collect();
    for page_size in [97u32, 299, 300, 301, 5_000] {
        walk_pages(&mut c, &id, page_size, &want).await;
    }

    // Keys and a step range select exactly.
    let page = get(
        &mut c,
        proto::GetMetricsRequest {
            parent_id: id.clone(),
            keys: vec!["zz".into(), "a".into(), "nope".into()],
            start_step: Some(100),
            end_step: Some(199),
            ..Default::default()
        },
    )
    .await;
    let got: Vec<(&str, u64)> = page
        .metrics
        .iter()
        .flat_map(|m| m.values.iter().map(move |v| (m.key.as_str(), v.step)))
        .collect();
    let want: Vec<(&str, u64)> = ["a", "zz"]
        .into_iter()
        .flat_map(|k| (100..200).map(move |s| (k, s)))
        .collect();
    assert_eq!(got, want);
    // A token from elsewhere is refused, naming the field.
    let err = c
        .get_metrics(proto::GetMetricsRequest {
            parent_id: id.clone(),
            page_token: "not-a-token".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().starts_with("page_token"), "{}", err.message());
    server.stop().await;
}

/// Pages through an experiment's series at `page_size` and asserts that they
/// hold `whole` (key, step, value) once, in order, no page more than
/// `page_size` points, and each page's `total_points`: the series' points from
/// where the page starts in it on.
async fn walk_pages(c: &mut Client, id: &str, page_size: u32, whole: &[(String, u64, f64)]) {
    let mut token = String::new();
    let mut got: Vec<(String, u64, f64)> = Vec::new();
    let mut pages = 0;
    loop {
        let page = get(
            c,
            proto::GetMetricsRequest {
                parent_id: id.to_owned(),
                page_size,
                page_token: token,
                ..Default::default()
            },
        )
        .await;
        let n: usize = page.metrics.iter().map(|m| m.values.len()).sum();
        assert!(n <= page_size as usize, "a page of {n} > {page_size}");
        pages += 1;
        for m in page.metrics {
            let all = whole.iter().filter(|(k, _, _)| *k == m.key).count();
            let before = got.iter().filter(|(k, _, _)| *k == m.key).count();
            assert_eq!(
                m.total_points,
                (all - before) as u64,
                "{} at {before}",
                m.key
            );
            got.extend(m.values.iter().map(|v| (m.key.clone(), v.step, value(v))));
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(got, whole, "page size {page_size}");
    assert!(pages >= whole.len().div_ceil(page_size as usize));
}

/// A long series with repeated steps, compacted into one row group of many
/// pages, pages exactly as it did before compaction: every point once, in order,
/// and each page's `total_points` exact, although a page then decodes only the
/// file pages that hold it and counts the rest from the page index.
#[tokio::test]
async fn a_compacted_long_series_pages_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::test_config(dir.path().join("data"));
    config.roll.max_age = Duration::from_millis(50);
    config.compaction.enabled = false;
    config.compaction.row_group_rows = 1_000;
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "s", "long").await;
    // Three rounds of 20,000 points at steps i / 3 from round * 3,000: each
    // step three times within a round, and up to nine times across rounds.
    let mut sent: Sent = Vec::new();
    for round in 0..3u64 {
        let steps: Vec<u64> = (0..20_000).map(|i| i / 3 + round * 3_000).collect();
        let values: Vec<f64> = (0..20_000).map(|i| (round * 20_000 + i) as f64).collect();
        sent.extend(steps.iter().copied().zip(values.iter().copied()));
        let n = steps.len();
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![
                proto::MetricsBlock {
                    parent_id: id.clone(),
                    keys: vec!["long".into()],
                    key_index: vec![0; n],
                    steps,
                    wallclock_times: vec![42; n],
                    values,
                    ..Default::default()
                },
                numeric_block(&id, &["a"], 10, round * 10),
            ],
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
    let mut whole: Vec<(String, u64, f64)> = (0..30u64)
        .map(|s| ("a".to_owned(), s, s as f64 / 2.0))
        .collect();
    whole.extend(
        ordered(&sent)
            .into_iter()
            .map(|(s, v)| ("long".to_owned(), s, v)),
    );
    for page_size in [7_001, 25_000] {
        walk_pages(&mut c, &id, page_size, &whole).await;
    }
    server.stop().await;

    let report = mboxd::server::compact_once(config.clone(), |_| {})
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let rows: u64 = report.partitions.iter().map(|p| p.rows).sum();
    assert_eq!(rows, 60_030);
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    for page_size in [7_001, 25_000] {
        walk_pages(&mut c, &id, page_size, &whole).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_do_not_wait_for_busy_writers() {
    let (_dir, mut config) = config();
    // Writers kept busy: small row groups at a slow zstd level, fed by two clients
    // sending large batches as fast as they are acknowledged.
    config.roll.max_age = Duration::from_secs(2);
    config.roll.row_group_rows = 8_192;
    config.roll.zstd_level = 9;
    // A small backlog, so the graceful stop publishes it in time.
    config.max_buffered_bytes = config.limits.max_message_bytes;
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let small = create_experiment(&mut c, "s", "small").await;
    c.log_metrics(proto::LogMetricsRequest {
        blocks: vec![numeric_block(&small, &["loss"], 100, 0)],
        ..Default::default()
    })
    .await
    .unwrap();
    let busy = create_experiment(&mut c, "s", "busy").await;
    // Keep the writers' queues full with large batches from several clients.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = Vec::new();
    for i in 0..2u64 {
        let mut fc = server.client().await;
        let (stop, busy) = (std::sync::Arc::clone(&stop), busy.clone());
        flood.push(tokio::spawn(async move {
            let mut step = i * 1_000_000_000;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = fc
                    .log_metrics(proto::LogMetricsRequest {
                        blocks: vec![numeric_block(&busy, &["x", "y"], 20_000, step)],
                        ..Default::default()
                    })
                    .await;
                step += 20_000;
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let started = Instant::now();
        let m = metrics_of(&mut c, &small).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(m[0].values.len(), 100);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for f in flood {
        f.await.unwrap();
    }
    assert!(
        slowest < Duration::from_millis(100),
        "a read took {slowest:?} while the writers were busy"
    );
    server.stop().await;
}

/// Peak RSS since the last reset, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test]
async fn a_million_point_read_stays_within_the_memory_bound() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let proc = Process::start(&data, &["--roll-max-age-ms", "200"]).await;
    let mut c = proc.client().await;
    let id = create_experiment(&mut c, "big", "million").await;
    for b in 0..10u64 {
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(&id, &["loss"], 100_000, b * 100_000)],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Measure the read alone: reset the peak (Linux: 5 > clear_refs).
    let pid = proc.child.id();
    let reset = std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok();
    let before = peak_rss(pid);
    let m = metrics_of(&mut c, &id).await;
    assert_eq!(m[0].values.len(), 1_000_000);
    assert!(
        m[0].values
            .iter()
            .enumerate()
            .all(|(i, v)| v.step == i as u64)
    );
    let peak = peak_rss(pid);
    let bound = Config::default().memory_bound_bytes();
    assert!(peak < bound, "peak RSS {peak} over the bound {bound}");
    eprintln!(
        "1M-point read: peak RSS {} MiB (before the read {} MiB, peak reset: {reset}); bound {} MiB",
        peak >> 20,
        before >> 20,
        bound >> 20
    );
    assert!(proc.terminate().await);
}

/// A series no longer than `max_points` comes back exact, string and bytes values
/// included, whether its points are still buffered or in files.
#[tokio::test]
async fn max_points_keeps_a_short_series_string_and_bytes_values() {
    let (dir, mut config) = config();
    config.roll.max_age = Duration::from_secs(3600);
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "s", "mixed").await;
    let mut block = numeric_block(&id, &["status"], 4, 0);
    block.string_rows = vec![1];
    block.string_values = vec!["ok".into()];
    block.bytes_rows = vec![2];
    block.bytes_values = vec![vec![0, 255]];
    c.log_metrics(proto::LogMetricsRequest {
        blocks: vec![block],
        ..Default::default()
    })
    .await
    .unwrap();
    let want = vec![
        (0, Some(V::DVal(0.0))),
        (1, Some(V::STensor("ok".into()))),
        (2, Some(V::BTensor(vec![0, 255]))),
        (3, Some(V::DVal(1.5))),
    ];
    let read = |c: &mut Client| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            let page = get(
                &mut c,
                proto::GetMetricsRequest {
                    parent_id: id,
                    max_points: 10,
                    ..Default::default()
                },
            )
            .await;
            let [m] = page.metrics.as_slice() else {
                panic!("one series expected: {:?}", page.metrics);
            };
            assert!(!m.bucketed);
            m.values
                .iter()
                .map(|v| (v.step, v.value.clone()))
                .collect::<Vec<_>>()
        }
    };
    // Buffered.
    assert_eq!(read(&mut c).await, want);
    // In a file, after a restart.
    server.stop().await;
    assert_eq!(parquet_files(&dir.path().join("data"), "metrics").len(), 1);
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    assert_eq!(read(&mut c).await, want);
    server.stop().await;
}

/// A repeated read takes every published file's footer and page index from the
/// metadata cache: the second read of a series loads none, and finds each file
/// the first one loaded, with the same answer.
#[tokio::test]
async fn a_repeated_read_takes_file_metadata_from_the_cache() {
    let (_dir, mut config) = config();
    let http = free_addr();
    config.http_listen = Some(http);
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "s", "cached").await;
    // Three rounds, each published as files of its own.
    for round in 0..3u64 {
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(&id, &["loss"], 100, round * 100)],
            ..Default::default()
        })
        .await
        .unwrap();
        wait_for_rows(server.data_dir(), "metrics", (round as usize + 1) * 100).await;
    }
    // A file is in its folder a moment before its manifest entry commits; a read
    // in between takes it as staged, without the cache. Wait for every entry.
    let on_disk = parquet_files(server.data_dir(), "metrics").len() as f64;
    let published = r#"mboxd_files_published_total{table="metrics"}"#;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while scrape(http).await.get(published).copied().unwrap_or(0.0) < on_disk {
        assert!(
            std::time::Instant::now() < deadline,
            "{on_disk} files never all published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let read = || proto::GetMetricsRequest {
        parent_id: id.clone(),
        ..Default::default()
    };
    let counts = |m: &std::collections::HashMap<String, f64>| {
        (
            m["mboxd_read_metadata_cache_hits_total"],
            m["mboxd_read_metadata_cache_misses_total"],
        )
    };
    let (hits0, misses0) = counts(&scrape(http).await);
    let first = get(&mut c, read()).await;
    let (hits1, misses1) = counts(&scrape(http).await);
    let second = get(&mut c, read()).await;
    let (hits2, misses2) = counts(&scrape(http).await);
    assert_eq!(first, second);
    assert_eq!(first.metrics[0].values.len(), 300);
    let files = misses1 - misses0;
    assert!(files >= 3.0, "{files} files loaded");
    assert_eq!(hits1, hits0, "nothing cached before the first read");
    assert_eq!((misses2, hits2 - hits1), (misses1, files));
    let m = scrape(http).await;
    assert!(m["mboxd_read_metadata_cache_bytes"] > 0.0);
    server.stop().await;
}
