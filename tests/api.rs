//! End-to-end behaviour of every served RPC through a real server and tonic client.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use common::*;
use mboxd::proto;
use mboxd::proto::metrics_value::Value as V;
use prost_types::value::Kind;
use prost_types::{Struct, Timestamp, Value};

fn num(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

fn text(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.into())),
    }
}

fn object(fields: Vec<(&str, Value)>) -> Value {
    Value {
        kind: Some(Kind::StructValue(Struct {
            fields: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
        })),
    }
}

fn metadata(fields: Vec<(&str, Value)>) -> proto::Metadata {
    proto::Metadata {
        metadata: fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
    }
}

#[tokio::test]
async fn create_experiment_is_idempotent_with_a_pinned_stable_id() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let req = proto::CreateExperimentRequest {
        name: "yolo-v4".into(),
        owner: "foo@bar.com".into(),
        namespace: "cv".into(),
        framework: proto::MlFramework::Pytorch as i32,
        external_id: "ext1".into(),
        task: "detection".into(),
        metadata: Some(metadata(vec![("lr", num(0.0002))])),
    };
    let first = c.create_experiment(req.clone()).await.unwrap().into_inner();
    // The stable id of (cv, yolo-v4, foo@bar.com, ext1): the same on every daemon.
    assert_eq!(first.experiment_id, "2b2a19e145c92827d50144d50ee13c68");
    assert!(!first.experiment_exists);
    let second = c.create_experiment(req).await.unwrap().into_inner();
    assert_eq!(second.experiment_id, first.experiment_id);
    assert!(second.experiment_exists);
    assert_eq!(second.created_at, first.created_at);

    let got = c
        .get_experiment(proto::GetExperimentRequest {
            id: first.experiment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .experiment
        .unwrap();
    assert_eq!(
        (
            got.name.as_str(),
            got.owner.as_str(),
            got.namespace.as_str(),
            got.external_id.as_str()
        ),
        ("yolo-v4", "foo@bar.com", "cv", "ext1")
    );
    assert_eq!(got.framework, proto::MlFramework::Pytorch as i32);
    assert_eq!(got.created_at, first.created_at);

    // The request's metadata is stored as UpdateMetadata would.
    let md = c
        .list_metadata(proto::ListMetadataRequest {
            parent_id: first.experiment_id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .metadata;
    assert_eq!(md.len(), 1);
    assert_eq!(md["lr"], num(0.0002));

    let other = create_experiment(&mut c, "cv", "resnet").await;
    create_experiment(&mut c, "nlp", "bert").await;
    let listed = c
        .list_experiments(proto::ListExperimentsRequest {
            namespace: "cv".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .experiments;
    let mut ids: Vec<_> = listed.iter().map(|e| e.id.clone()).collect();
    ids.sort();
    let mut want = vec![first.experiment_id, other];
    want.sort();
    assert_eq!(ids, want);
    // An empty namespace is the default namespace.
    let default_id = create_experiment(&mut c, "", "no-namespace").await;
    let listed = c
        .list_experiments(proto::ListExperimentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .experiments;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, default_id);
    assert_eq!(listed[0].namespace, "default");
    server.stop().await;
}

#[tokio::test]
async fn update_metadata_merges_keys() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "m").await;
    let r1 = c
        .update_metadata(proto::UpdateMetadataRequest {
            parent_id: id.clone(),
            metadata: Some(metadata(vec![
                (
                    "hyperparams",
                    object(vec![("fc_layers", num(3.0)), ("lr", num(0.0002))]),
                ),
                ("seed", num(7.0)),
            ])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r1.num_keys_written, 2);
    let r2 = c
        .update_metadata(proto::UpdateMetadataRequest {
            parent_id: id.clone(),
            metadata: Some(metadata(vec![
                ("seed", num(8.0)),
                ("optimizer", text("adam")),
            ])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r2.num_keys_written, 2);
    let t = |ts: Option<Timestamp>| ts.map(|t| (t.seconds, t.nanos)).unwrap();
    assert!(t(r2.updated_at) >= t(r1.updated_at));
    let md = c
        .list_metadata(proto::ListMetadataRequest { parent_id: id })
        .await
        .unwrap()
        .into_inner()
        .metadata;
    assert_eq!(md.len(), 3);
    assert_eq!(md["seed"], num(8.0));
    assert_eq!(md["optimizer"], text("adam"));
    assert_eq!(
        md["hyperparams"],
        object(vec![("fc_layers", num(3.0)), ("lr", num(0.0002))])
    );
    server.stop().await;
}

fn single(parent: &str, key: &str, step: u64, value: V) -> proto::LogMetricsRequest {
    proto::LogMetricsRequest {
        parent_id: parent.into(),
        key: key.into(),
        value: Some(proto::MetricsValue {
            step,
            wallclock_time: 5000 + step,
            value: Some(value),
        }),
        blocks: Vec::new(),
        ..Default::default()
    }
}

async fn get_metrics(c: &mut Client, id: &str, full_precision: bool) -> Vec<proto::Metrics> {
    c.get_metrics(proto::GetMetricsRequest {
        parent_id: id.into(),
        full_precision,
        ..Default::default()
    })
    .await
    .unwrap()
    .into_inner()
    .metrics
}

#[tokio::test]
async fn metrics_of_every_value_kind_round_trip_before_and_after_flush_and_restart() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "kinds").await;
    let precise = 0.1_f64 + 0.2_f64;
    for req in [
        single(&id, "loss", 1, V::FVal(2.5)),
        single(&id, "loss", 2, V::FVal(1.25)),
        single(&id, "precise", 1, V::DVal(precise)),
        single(&id, "text", 1, V::STensor("[1, 2, 3]".into())),
        single(&id, "blob", 1, V::BTensor(vec![0, 159, 146, 150])),
    ] {
        let r = c.log_metrics(req).await.unwrap().into_inner();
        assert_eq!(r.points_accepted, 1);
    }

    let check = |metrics: Vec<proto::Metrics>, full: bool| {
        let keys: Vec<_> = metrics.iter().map(|m| m.key.as_str()).collect();
        assert_eq!(keys, ["blob", "loss", "precise", "text"]);
        assert_eq!(
            metrics[0].values[0].value,
            Some(V::BTensor(vec![0, 159, 146, 150]))
        );
        let loss: Vec<_> = metrics[1]
            .values
            .iter()
            .map(|v| (v.step, v.wallclock_time, v.value.clone()))
            .collect();
        if full {
            assert_eq!(
                loss,
                [
                    (1, 5001, Some(V::DVal(2.5))),
                    (2, 5002, Some(V::DVal(1.25)))
                ]
            );
            assert_eq!(metrics[2].values[0].value, Some(V::DVal(precise)));
        } else {
            assert_eq!(
                loss,
                [
                    (1, 5001, Some(V::FVal(2.5))),
                    (2, 5002, Some(V::FVal(1.25)))
                ]
            );
            assert_eq!(metrics[2].values[0].value, Some(V::FVal(precise as f32)));
        }
        assert_eq!(
            metrics[3].values[0].value,
            Some(V::STensor("[1, 2, 3]".into()))
        );
    };
    // From memory (the roll age has not passed yet: no file exists).
    assert!(parquet_files(server.data_dir(), "metrics").is_empty());
    check(get_metrics(&mut c, &id, false).await, false);
    check(get_metrics(&mut c, &id, true).await, true);
    // From Parquet, once published.
    wait_for_rows(server.data_dir(), "metrics", 5).await;
    check(get_metrics(&mut c, &id, true).await, true);
    server.stop().await;
    // And after a restart.
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    check(get_metrics(&mut c, &id, true).await, true);
    check(get_metrics(&mut c, &id, false).await, false);
    server.stop().await;
}

#[tokio::test]
async fn batches_of_10000_points_are_read_back_exactly_once() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let a = create_experiment(&mut c, "cv", "batch-a").await;
    let b = create_experiment(&mut c, "cv", "batch-b").await;
    // Two blocks (two experiments) in one request, one with string and bytes rows.
    let mut block_a = numeric_block(&a, &["loss", "acc", "lr"], 10_000, 0);
    block_a.string_rows = vec![3, 9_999];
    block_a.string_values = vec!["three".into(), "last".into()];
    block_a.bytes_rows = vec![4];
    block_a.bytes_values = vec![vec![4, 4]];
    let block_b = numeric_block(&b, &["loss"], 10_000, 100_000);
    let r = c
        .log_metrics(proto::LogMetricsRequest {
            blocks: vec![block_a, block_b],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.points_accepted, 20_000);

    let check = |metrics: Vec<proto::Metrics>| {
        let counts: Vec<_> = metrics
            .iter()
            .map(|m| (m.key.clone(), m.values.len()))
            .collect();
        assert_eq!(
            counts,
            [
                ("acc".into(), 3333),
                ("loss".into(), 3334),
                ("lr".into(), 3333)
            ]
        );
        let loss = &metrics[1].values;
        // Sorted by step; step i has value i/2 unless it is a string/bytes row.
        assert!(loss.windows(2).all(|w| w[0].step < w[1].step));
        for v in loss {
            let want = match v.step {
                3 => V::STensor("three".into()),
                9_999 => V::STensor("last".into()),
                s => V::DVal(s as f64 / 2.0),
            };
            assert_eq!(v.value, Some(want));
            assert_eq!(v.wallclock_time, 1000 + v.step);
        }
        let acc4 = metrics[0].values.iter().find(|v| v.step == 4).unwrap();
        assert_eq!(acc4.value, Some(V::BTensor(vec![4, 4])));
    };
    check(get_metrics(&mut c, &a, true).await);
    wait_for_rows(server.data_dir(), "metrics", 20_000).await;
    check(get_metrics(&mut c, &a, true).await);
    let bm = get_metrics(&mut c, &b, true).await;
    assert_eq!(bm.len(), 1);
    assert_eq!(bm[0].values.len(), 10_000);
    assert_eq!(bm[0].values[0].step, 100_000);

    // Half in a file, half in memory: still exactly once.
    c.log_metrics(proto::LogMetricsRequest {
        blocks: vec![numeric_block(&a, &["loss"], 10, 20_000)],
        ..Default::default()
    })
    .await
    .unwrap();
    let m = get_metrics(&mut c, &a, true).await;
    assert_eq!(m[1].values.len(), 3344);
    server.stop().await;

    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let m = get_metrics(&mut c, &a, true).await;
    assert_eq!(m[1].values.len(), 3344);
    assert_eq!(get_metrics(&mut c, &b, true).await[0].values.len(), 10_000);
    server.stop().await;
}

fn event(name: &str, source: &str, wallclock_s: i64, md: proto::Metadata) -> proto::Event {
    proto::Event {
        name: name.into(),
        source: Some(proto::EventSource {
            name: source.into(),
        }),
        wallclock_time: Some(Timestamp {
            seconds: wallclock_s,
            nanos: 500_000_000,
        }),
        metadata: Some(md),
    }
}

#[tokio::test]
async fn events_with_nested_metadata_round_trip_and_filter_by_since() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "events").await;
    let nested = metadata(vec![
        ("chk_size", num(2345.0)),
        (
            "layout",
            object(vec![
                (
                    "shards",
                    Value {
                        kind: Some(Kind::ListValue(prost_types::ListValue {
                            values: vec![text("a"), text("b")],
                        })),
                    },
                ),
                (
                    "compressed",
                    Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                ),
            ]),
        ),
    ]);
    let r = c
        .log_event(proto::LogEventRequest {
            parent_id: id.clone(),
            event: Some(event(
                "checkpoint_started",
                "trainer",
                12_000,
                nested.clone(),
            )),
            events: Vec::new(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.events_accepted, 1);
    assert!(r.created_at.is_some());
    let r = c
        .log_event(proto::LogEventRequest {
            parent_id: id.clone(),
            event: None,
            events: vec![
                event(
                    "checkpoint_finish",
                    "trainer",
                    12_500,
                    metadata(vec![("write_speed", num(2000.0))]),
                ),
                event("eval", "evaluator", 11_000, metadata(vec![])),
            ],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.events_accepted, 2);

    let list = |since: Option<i64>| {
        let mut c = c.clone();
        let id = id.clone();
        async move {
            c.list_events(proto::ListEventsRequest {
                parent_id: id,
                since: since.map(|seconds| Timestamp { seconds, nanos: 0 }),
            })
            .await
            .unwrap()
            .into_inner()
            .events
        }
    };
    let check = |events: Vec<proto::Event>| {
        let names: Vec<_> = events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["eval", "checkpoint_started", "checkpoint_finish"]);
        assert_eq!(events[1].source.as_ref().unwrap().name, "trainer");
        assert_eq!(
            events[1].wallclock_time,
            Some(Timestamp {
                seconds: 12_000,
                nanos: 500_000_000
            })
        );
        assert_eq!(events[1].metadata, Some(nested.clone()));
        assert_eq!(events[0].metadata, Some(metadata(vec![])));
    };
    check(list(None).await);
    let since: Vec<_> = list(Some(12_000))
        .await
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(since, ["checkpoint_started", "checkpoint_finish"]);
    wait_for_rows(server.data_dir(), "events", 3).await;
    check(list(None).await);
    server.stop().await;
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let events = c
        .list_events(proto::ListEventsRequest {
            parent_id: id,
            since: None,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert_eq!(events.len(), 3);
    assert_eq!(events[1].metadata, Some(nested));
    server.stop().await;
}

#[tokio::test]
async fn out_of_scope_rpcs_answer_unimplemented() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let err = c
        .create_model(proto::CreateModelRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    assert!(err.message().contains("CreateModel"), "{}", err.message());
    let err = c
        .list_checkpoints(proto::ListCheckpointsRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    let err = c
        .download_file(proto::DownloadFileRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);
    server.stop().await;
}

/// A writer encodes full row groups of metrics into a staged file before it
/// publishes it; an events read of the same experiment at that moment reads the
/// events only (it once opened the staged metrics file as an events file).
#[tokio::test]
async fn events_read_while_metrics_are_staged() {
    let (_dir, mut config) = temp_config();
    config.roll.max_age = std::time::Duration::from_secs(3600);
    config.roll.row_group_rows = 1000;
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "staged").await;
    c.log_metrics(proto::LogMetricsRequest {
        blocks: vec![numeric_block(&id, &["loss"], 5_000, 0)],
        ..Default::default()
    })
    .await
    .unwrap();
    c.log_event(proto::LogEventRequest {
        parent_id: id.clone(),
        event: Some(event("start", "trainer", 1_700_000_000, metadata(vec![]))),
        ..Default::default()
    })
    .await
    .unwrap();
    // The staged file appears as the writer encodes its row groups.
    // (Only metrics are staged: any file there is the metrics file.)
    let staged = server.config.data_dir.join("_staging");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        fn any_file(dir: &std::path::Path) -> bool {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .any(|e| {
                    let p = e.path();
                    if p.is_dir() { any_file(&p) } else { true }
                })
        }
        if any_file(&staged) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no staged metrics file"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let events = c
        .list_events(proto::ListEventsRequest {
            parent_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("ListEvents while metrics are staged")
        .into_inner()
        .events;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].name, "start");
    let metrics = get_metrics(&mut c, &id, true).await;
    assert_eq!(metrics[0].values.len(), 5_000);
    server.stop().await;
}

/// A client batch id marks a retry only within the namespaces its batch writes to:
/// another namespace's batch with the same id is written, not dropped as a
/// duplicate; after a restart too.
#[tokio::test]
async fn a_batch_id_is_a_retry_only_within_its_namespaces() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config.clone()).await;
    let mut c = server.client().await;
    let cv = create_experiment(&mut c, "cv", "same-id").await;
    let nlp = create_experiment(&mut c, "nlp", "same-id").await;
    async fn log(c: &mut Client, id: &str, points: usize) -> (u64, bool) {
        let req = proto::LogMetricsRequest {
            blocks: vec![numeric_block(id, &["loss"], points, 0)],
            client_batch_id: "batch-1".into(),
            ..Default::default()
        };
        let r = c.log_metrics(req).await.unwrap().into_inner();
        (r.points_accepted, r.duplicate)
    }
    assert_eq!(log(&mut c, &cv, 100).await, (100, false));
    assert_eq!(log(&mut c, &cv, 100).await, (100, true));
    assert_eq!(log(&mut c, &nlp, 50).await, (50, false));
    assert_eq!(log(&mut c, &nlp, 50).await, (50, true));
    server.stop().await;

    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    assert_eq!(log(&mut c, &nlp, 50).await, (50, true));
    assert_eq!(log(&mut c, &cv, 100).await, (100, true));
    for (id, points) in [(&cv, 100), (&nlp, 50)] {
        let m = metrics_of(&mut c, id).await;
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].values.len(), points);
    }
    server.stop().await;
}

/// A graceful stop returns only when the index is closed and the catalog
/// journal checkpointed: the folder opens again in the same process at once, with
/// nothing left to replay, while a client that just created experiments is still
/// connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_closes_the_index_and_empties_the_catalog_journal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for round in 0..5 {
        let mut server = TestServer::start(mboxd::config::Config::test_config(data.clone())).await;
        let c = server.client().await;
        let tasks: Vec<_> = (0..4)
            .map(|t| {
                let mut c = c.clone();
                tokio::spawn(async move {
                    for i in 0..25 {
                        create_experiment(&mut c, "stop", &format!("r{round}-{t}-{i}")).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        server.stop().await;
        let journal = std::fs::metadata(data.join("catalog.journal")).unwrap();
        assert_eq!(
            journal.len(),
            0,
            "round {round}: the journal was not checkpointed"
        );
        let index = mboxd::index::Index::open(&data.join("index.redb"))
            .unwrap_or_else(|e| panic!("round {round}: the index is still open: {e}"));
        assert_eq!(
            index.list_experiments("stop").unwrap().len(),
            (round + 1) * 100
        );
        drop(c);
    }
}
