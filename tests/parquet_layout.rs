//! The published files honour the storage contract: Hive partitions, unique names,
//! row groups sorted by (experiment_id, key, step), int64 steps and wallclocks,
//! dictionary-encoded ids and keys, delta encoded steps, zstd, and a page index.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use arrow_array::cast::AsArray;
use arrow_array::types::{Int32Type, Int64Type};
use common::*;
use mboxd::proto;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, Encoding};
use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::file::serialized_reader::ReadOptionsBuilder;

#[tokio::test]
async fn files_are_partitioned_sorted_and_encoded_as_documented() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let a = create_experiment(&mut c, "vision", "a").await;
    let b = create_experiment(&mut c, "vision", "b").await;
    let n = create_experiment(&mut c, "nlp", "n").await;
    // Arrive out of order: descending steps, experiments interleaved.
    for round in (0..5u64).rev() {
        let mut blocks = Vec::new();
        for id in [&b, &a, &n] {
            let mut block = numeric_block(id, &["z", "a", "m"], 3_000, round * 3_000);
            block.steps.reverse();
            blocks.push(block);
        }
        c.log_metrics(proto::LogMetricsRequest {
            blocks,
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let dir = server.config.data_dir.clone();
    server.stop().await;

    let files = parquet_files(&dir, "metrics");
    let today = chrono::Utc::now()
        .date_naive()
        .format("%Y-%m-%d")
        .to_string();
    let mut dirs: Vec<_> = files
        .iter()
        .map(|f| {
            f.parent()
                .unwrap()
                .strip_prefix(&dir)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    dirs.dedup();
    assert_eq!(
        dirs,
        [
            format!("metrics/namespace=nlp/date={today}"),
            format!("metrics/namespace=vision/date={today}")
        ]
    );
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy();
        assert!(name.starts_with("test-daemon-"), "{name}");
    }

    // Each writer thread writes its own files; every file honours the contract.
    let vision: Vec<_> = files
        .iter()
        .filter(|f| f.to_string_lossy().contains("namespace=vision"))
        .collect();
    let mut rows = Vec::new();
    for path in vision {
        let file = std::fs::File::open(path).unwrap();
        let reader = SerializedFileReader::new_with_options(
            file.try_clone().unwrap(),
            ReadOptionsBuilder::new().with_page_index().build(),
        )
        .unwrap();
        let meta = reader.metadata();
        assert!(
            meta.offset_index().is_some_and(|o| !o.is_empty()),
            "page index missing"
        );
        for rg in meta.row_groups() {
            for col in rg.columns() {
                // The run-length-encoded dictionary columns are stored as they are.
                let plain = ["experiment_id", "key", "ingested_at"]
                    .contains(&col.column_path().string().as_str());
                let codec = col.compression();
                assert!(
                    match plain {
                        true => codec == Compression::UNCOMPRESSED,
                        false => matches!(codec, Compression::ZSTD(_)),
                    },
                    "{} is {codec:?}",
                    col.column_path()
                );
            }
            let enc = |name: &str| {
                rg.columns()
                    .iter()
                    .find(|c| c.column_path().string() == name)
                    .unwrap()
                    .encodings()
                    .collect::<Vec<_>>()
            };
            assert!(enc("experiment_id").contains(&Encoding::RLE_DICTIONARY));
            assert!(enc("key").contains(&Encoding::RLE_DICTIONARY));
            assert!(enc("step").contains(&Encoding::DELTA_BINARY_PACKED));
            assert!(enc("wallclock_time").contains(&Encoding::DELTA_BINARY_PACKED));
        }
        let groups = meta.num_row_groups();
        for group in 0..groups {
            let batches: Vec<_> =
                ParquetRecordBatchReaderBuilder::try_new(file.try_clone().unwrap())
                    .unwrap()
                    .with_row_groups(vec![group])
                    .build()
                    .unwrap()
                    .collect::<Result<_, _>>()
                    .unwrap();
            let mut group_rows = Vec::new();
            for batch in &batches {
                let ids = batch.column(0).as_dictionary::<Int32Type>();
                let id_values = ids.values().as_string::<i32>();
                let keys = batch.column(1).as_dictionary::<Int32Type>();
                let key_values = keys.values().as_string::<i32>();
                let steps = batch.column(2).as_primitive::<Int64Type>();
                let wallclocks = batch.column(3).as_primitive::<Int64Type>();
                for r in 0..batch.num_rows() {
                    assert!(wallclocks.value(r) > 0);
                    group_rows.push((
                        id_values.value(ids.keys().value(r) as usize).to_owned(),
                        key_values.value(keys.keys().value(r) as usize).to_owned(),
                        steps.value(r),
                    ));
                }
            }
            assert!(
                group_rows.windows(2).all(|w| w[0] <= w[1]),
                "a row group is not sorted by (experiment_id, key, step)"
            );
            rows.extend(group_rows);
        }
    }
    assert_eq!(rows.len(), 30_000);
    rows.sort();
    let distinct = rows.len();
    rows.dedup();
    assert_eq!(rows.len(), distinct, "no row twice");
    let mut ids: Vec<_> = rows.iter().map(|r| r.0.clone()).collect();
    ids.dedup();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(ids, want);
}

/// A staged file is published once it holds `writer.max_series` series, without
/// waiting for its age: what a publication carries per series stays bounded when
/// a burst spans many experiments.
#[tokio::test]
async fn a_file_is_published_once_it_holds_max_series_series() {
    let (_dir, mut config) = temp_config();
    config.roll.max_series = 10;
    // Each request (one experiment, 2 keys x 4 points) is encoded at once, so
    // series are counted as they arrive.
    config.roll.row_group_rows = 8;
    config.roll.max_age = std::time::Duration::from_secs(600);
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let mut ids = Vec::new();
    for i in 0..30 {
        ids.push(create_experiment(&mut c, "wide", &format!("e{i}")).await);
    }
    for id in &ids {
        c.log_metrics(proto::LogMetricsRequest {
            blocks: vec![numeric_block(id, &["a", "b"], 8, 0)],
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let dir = server.config.data_dir.clone();
    // All 60 series are published in files of 10, long before max_age.
    wait_for_rows(&dir, "metrics", 240).await;
    let files = parquet_files(&dir, "metrics");
    assert_eq!(files.len(), 6, "{files:?}");
    let mut seen = std::collections::BTreeSet::new();
    for path in &files {
        let file = std::fs::File::open(path).unwrap();
        let mut series = std::collections::BTreeSet::new();
        for batch in ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap()
        {
            let batch = batch.unwrap();
            let ids = batch.column(0).as_dictionary::<Int32Type>();
            let id_values = ids.values().as_string::<i32>();
            let keys = batch.column(1).as_dictionary::<Int32Type>();
            let key_values = keys.values().as_string::<i32>();
            for r in 0..batch.num_rows() {
                series.insert((
                    id_values.value(ids.keys().value(r) as usize).to_owned(),
                    key_values.value(keys.keys().value(r) as usize).to_owned(),
                ));
            }
        }
        assert_eq!(series.len(), 10, "{path:?}");
        seen.extend(series);
    }
    assert_eq!(seen.len(), 60);
    server.stop().await;
}
