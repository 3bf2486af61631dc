//! Every bad-input case gets its precise status code, names the field, and leaves
//! nothing half-written.

#![allow(clippy::unwrap_used)] // Tests panic on failure by design.

mod common;

use std::time::Duration;

use common::*;
use mboxd::config::WhenFull;
use mboxd::proto;
use mboxd::proto::metrics_value::Value as V;
use prost_types::Timestamp;
use prost_types::value::Kind;
use tonic::Code;

fn point(parent: &str, key: &str, value: Option<V>) -> proto::LogMetricsRequest {
    proto::LogMetricsRequest {
        parent_id: parent.into(),
        key: key.into(),
        value: Some(proto::MetricsValue {
            step: 1,
            wallclock_time: 1,
            value,
        }),
        blocks: Vec::new(),
        ..Default::default()
    }
}

fn blocks(bs: Vec<proto::MetricsBlock>) -> proto::LogMetricsRequest {
    proto::LogMetricsRequest {
        blocks: bs,
        ..Default::default()
    }
}

fn md(key: &str, kind: Kind) -> Option<proto::Metadata> {
    Some(proto::Metadata {
        metadata: [(key.to_owned(), prost_types::Value { kind: Some(kind) })].into(),
    })
}

fn ev(name: &str, wallclock: Option<Timestamp>) -> proto::Event {
    proto::Event {
        name: name.into(),
        source: Some(proto::EventSource { name: "t".into() }),
        wallclock_time: wallclock,
        metadata: None,
    }
}

#[track_caller]
fn expect<T: std::fmt::Debug>(
    case: &str,
    result: Result<tonic::Response<T>, tonic::Status>,
    code: Code,
    needle: &str,
) {
    let err = result.expect_err(case);
    assert_eq!(err.code(), code, "{case}: {}", err.message());
    assert!(
        err.message().contains(needle),
        "{case}: message {:?} should mention {needle:?}",
        err.message()
    );
}

#[tokio::test]
async fn every_bad_input_gets_its_status_and_names_the_field() {
    let (_dir, mut config) = temp_config();
    config.limits.max_points_per_request = 50_000;
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "target").await;
    let good = numeric_block(&id, &["loss"], 4, 0);
    let long = "k".repeat(257);

    // CreateExperiment
    let create = |f: fn(&mut proto::CreateExperimentRequest)| {
        let mut r = proto::CreateExperimentRequest {
            name: "n".into(),
            namespace: "cv".into(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    let cases: Vec<(&str, proto::CreateExperimentRequest, Code, &str)> = vec![
        (
            "empty name",
            create(|r| r.name.clear()),
            Code::InvalidArgument,
            "name: required",
        ),
        (
            "long name",
            create(|r| r.name = "n".repeat(300)),
            Code::InvalidArgument,
            "name: 300 bytes",
        ),
        (
            "long owner",
            create(|r| r.owner = "o".repeat(300)),
            Code::InvalidArgument,
            "owner",
        ),
        (
            "bad namespace",
            create(|r| r.namespace = "a/b".into()),
            Code::InvalidArgument,
            "namespace",
        ),
        (
            "hidden namespace",
            create(|r| r.namespace = ".x".into()),
            Code::InvalidArgument,
            "namespace",
        ),
        (
            "unknown framework",
            create(|r| r.framework = 9),
            Code::InvalidArgument,
            "framework",
        ),
        (
            "NaN metadata",
            create(|r| r.metadata = md("lr", Kind::NumberValue(f64::NAN))),
            Code::InvalidArgument,
            "metadata.lr",
        ),
    ];
    for (case, req, code, needle) in cases {
        expect(case, c.create_experiment(req).await, code, needle);
    }

    // GetExperiment / ListExperiments / metadata RPCs
    expect(
        "get empty",
        c.get_experiment(proto::GetExperimentRequest::default())
            .await,
        Code::InvalidArgument,
        "id",
    );
    expect(
        "get unknown",
        c.get_experiment(proto::GetExperimentRequest { id: "nope".into() })
            .await,
        Code::NotFound,
        "id: experiment \"nope\" not found",
    );
    expect(
        "list bad ns",
        c.list_experiments(proto::ListExperimentsRequest {
            namespace: "a b".into(),
            ..Default::default()
        })
        .await,
        Code::InvalidArgument,
        "namespace",
    );
    let update = |parent: &str, m| proto::UpdateMetadataRequest {
        parent_id: parent.into(),
        metadata: m,
    };
    expect(
        "update empty parent",
        c.update_metadata(update("", None)).await,
        Code::InvalidArgument,
        "parent_id",
    );
    expect(
        "update unknown",
        c.update_metadata(update("nope", None)).await,
        Code::NotFound,
        "parent_id: experiment \"nope\" not found",
    );
    expect(
        "update empty key",
        c.update_metadata(update(&id, md("", Kind::BoolValue(true))))
            .await,
        Code::InvalidArgument,
        "metadata key",
    );
    expect(
        "update oversized",
        c.update_metadata(update(
            &id,
            md("big", Kind::StringValue("x".repeat(300_000))),
        ))
        .await,
        Code::InvalidArgument,
        "metadata: ",
    );
    expect(
        "list md empty",
        c.list_metadata(proto::ListMetadataRequest::default()).await,
        Code::InvalidArgument,
        "parent_id",
    );
    expect(
        "list md unknown",
        c.list_metadata(proto::ListMetadataRequest {
            parent_id: "nope".into(),
        })
        .await,
        Code::NotFound,
        "parent_id: experiment \"nope\" not found",
    );

    // LogMetrics
    let mut mismatch = good.clone();
    mismatch.values.pop();
    let mut bad_index = good.clone();
    bad_index.key_index[2] = 1;
    let mut bad_row = good.clone();
    bad_row.string_rows = vec![4];
    bad_row.string_values = vec!["s".into()];
    let mut dup_row = good.clone();
    dup_row.string_rows = vec![1];
    dup_row.string_values = vec!["s".into()];
    dup_row.bytes_rows = vec![1];
    dup_row.bytes_values = vec![vec![1]];
    let mut orphan = good.clone();
    orphan.string_rows = vec![1, 2];
    orphan.string_values = vec!["s".into()];
    let mut empty_key = good.clone();
    empty_key.keys = vec![String::new()];
    let mut unknown_parent = good.clone();
    unknown_parent.parent_id = "nope".into();
    let mut big_value = good.clone();
    big_value.bytes_rows = vec![0];
    big_value.bytes_values = vec![vec![0; (1 << 20) + 1]];
    let mut both = point(&id, "loss", Some(V::FVal(1.0)));
    both.blocks = vec![good.clone()];
    let cases: Vec<(&str, proto::LogMetricsRequest, Code, &str)> = vec![
        (
            "empty request",
            proto::LogMetricsRequest::default(),
            Code::InvalidArgument,
            "parent_id: required",
        ),
        (
            "empty parent",
            point("", "loss", Some(V::FVal(1.0))),
            Code::InvalidArgument,
            "parent_id",
        ),
        (
            "unknown parent",
            point("nope", "loss", Some(V::FVal(1.0))),
            Code::NotFound,
            "parent_id: experiment \"nope\" not found",
        ),
        (
            "empty key",
            point(&id, "", Some(V::FVal(1.0))),
            Code::InvalidArgument,
            "key: required",
        ),
        (
            "long key",
            point(&id, &long, Some(V::FVal(1.0))),
            Code::InvalidArgument,
            "key: 257 bytes",
        ),
        (
            "no value",
            point(&id, "loss", None),
            Code::InvalidArgument,
            "value.value",
        ),
        (
            "missing value message",
            proto::LogMetricsRequest {
                parent_id: id.clone(),
                key: "loss".into(),
                ..Default::default()
            },
            Code::InvalidArgument,
            "value: required",
        ),
        (
            "oversized string",
            point(&id, "t", Some(V::STensor("s".repeat((1 << 20) + 1)))),
            Code::InvalidArgument,
            "value.s_tensor",
        ),
        (
            "single and blocks",
            both,
            Code::InvalidArgument,
            "blocks: set either",
        ),
        (
            "length mismatch",
            blocks(vec![good.clone(), mismatch]),
            Code::InvalidArgument,
            "blocks[1].values: 3 entries",
        ),
        (
            "key index",
            blocks(vec![bad_index]),
            Code::InvalidArgument,
            "blocks[0].key_index[2]",
        ),
        (
            "row out of range",
            blocks(vec![bad_row]),
            Code::InvalidArgument,
            "blocks[0].string_rows[0]",
        ),
        (
            "row twice",
            blocks(vec![dup_row]),
            Code::InvalidArgument,
            "blocks[0].string_rows[0]",
        ),
        (
            "rows without values",
            blocks(vec![orphan]),
            Code::InvalidArgument,
            "blocks[0].string_values",
        ),
        (
            "empty block key",
            blocks(vec![empty_key]),
            Code::InvalidArgument,
            "blocks[0].keys[0]",
        ),
        (
            "unknown block parent",
            blocks(vec![good.clone(), unknown_parent]),
            Code::NotFound,
            "blocks[1].parent_id: experiment \"nope\" not found",
        ),
        (
            "oversized bytes",
            blocks(vec![big_value]),
            Code::InvalidArgument,
            "blocks[0].bytes_values[0]",
        ),
        (
            "empty block",
            blocks(vec![proto::MetricsBlock {
                parent_id: id.clone(),
                ..Default::default()
            }]),
            Code::InvalidArgument,
            "blocks[0].steps",
        ),
        (
            "too many points",
            blocks(vec![numeric_block(&id, &["a"], 50_001, 0)]),
            Code::InvalidArgument,
            "50001 points",
        ),
        (
            // Storage is int64: Spark, Delta Lake and Iceberg have no uint64.
            "step past int64",
            blocks(vec![{
                let mut b = good.clone();
                b.steps[2] = 1 << 63;
                b
            }]),
            Code::InvalidArgument,
            "blocks[0].steps[2]: 9223372036854775808 exceeds",
        ),
        (
            "wallclock past int64",
            blocks(vec![good.clone(), {
                let mut b = good.clone();
                b.wallclock_times[3] = u64::MAX;
                b
            }]),
            Code::InvalidArgument,
            "blocks[1].wallclock_times[3]",
        ),
        (
            "single point step past int64",
            proto::LogMetricsRequest {
                parent_id: id.clone(),
                key: "k".into(),
                value: Some(proto::MetricsValue {
                    step: u64::MAX,
                    wallclock_time: 1,
                    value: Some(V::DVal(1.0)),
                }),
                ..Default::default()
            },
            Code::InvalidArgument,
            "value.step",
        ),
        (
            "a client batch id too long",
            proto::LogMetricsRequest {
                client_batch_id: "b".repeat(300),
                ..blocks(vec![good.clone()])
            },
            Code::InvalidArgument,
            "client_batch_id",
        ),
    ];
    for (case, req, code, needle) in cases {
        expect(case, c.log_metrics(req).await, code, needle);
    }

    // LogEvent / ListEvents / GetMetrics
    let log_event = |parent: &str, event: Option<proto::Event>| proto::LogEventRequest {
        parent_id: parent.into(),
        event,
        events: Vec::new(),
        ..Default::default()
    };
    let bad_ts = Timestamp {
        seconds: 1,
        nanos: 2_000_000_000,
    };
    let cases: Vec<(&str, proto::LogEventRequest, Code, &str)> = vec![
        (
            "event empty parent",
            log_event("", Some(ev("e", None))),
            Code::InvalidArgument,
            "parent_id",
        ),
        (
            "event unknown parent",
            log_event("nope", Some(ev("e", None))),
            Code::NotFound,
            "parent_id: experiment \"nope\" not found",
        ),
        (
            "no event",
            log_event(&id, None),
            Code::InvalidArgument,
            "event: required",
        ),
        (
            "event empty name",
            log_event(&id, Some(ev("", None))),
            Code::InvalidArgument,
            "event.name",
        ),
        (
            "event long name",
            log_event(&id, Some(ev(&long, None))),
            Code::InvalidArgument,
            "event.name",
        ),
        (
            "event bad time",
            log_event(&id, Some(ev("e", Some(bad_ts)))),
            Code::InvalidArgument,
            "event.wallclock_time",
        ),
        (
            "batch bad time",
            proto::LogEventRequest {
                parent_id: id.clone(),
                event: Some(ev("ok", None)),
                events: vec![
                    ev("ok", None),
                    ev(
                        "e",
                        Some(Timestamp {
                            seconds: i64::MAX,
                            nanos: 0,
                        }),
                    ),
                ],
                ..Default::default()
            },
            Code::InvalidArgument,
            "events[1].wallclock_time",
        ),
    ];
    for (case, req, code, needle) in cases {
        expect(case, c.log_event(req).await, code, needle);
    }
    expect(
        "since out of range",
        c.list_events(proto::ListEventsRequest {
            parent_id: id.clone(),
            since: Some(bad_ts),
        })
        .await,
        Code::InvalidArgument,
        "since",
    );
    expect(
        "list events unknown",
        c.list_events(proto::ListEventsRequest {
            parent_id: "nope".into(),
            since: None,
        })
        .await,
        Code::NotFound,
        "parent_id: experiment \"nope\" not found",
    );
    expect(
        "get metrics empty",
        c.get_metrics(proto::GetMetricsRequest::default()).await,
        Code::InvalidArgument,
        "parent_id",
    );
    let get = |f: fn(&mut proto::GetMetricsRequest)| {
        let mut r = proto::GetMetricsRequest {
            parent_id: id.clone(),
            ..Default::default()
        };
        f(&mut r);
        r
    };
    for (case, req, needle) in [
        (
            "end before start",
            get(|r| {
                r.start_step = Some(10);
                r.end_step = Some(9);
            }),
            "end_step: 9 is before start_step 10",
        ),
        (
            "too many buckets",
            get(|r| r.max_points = 2_000_000),
            "max_points: 2000000",
        ),
        (
            "empty key",
            get(|r| r.keys = vec!["a".into(), String::new()]),
            "keys[1]: required",
        ),
        (
            "foreign token",
            get(|r| r.page_token = "x".into()),
            "page_token",
        ),
    ] {
        expect(
            case,
            c.get_metrics(req).await,
            Code::InvalidArgument,
            needle,
        );
    }
    let list = |filter: &str, order_by: &[&str], token: &str| proto::ListExperimentsRequest {
        namespace: "cv".into(),
        filter: filter.into(),
        order_by: order_by.iter().map(|s| s.to_string()).collect(),
        page_token: token.into(),
        ..Default::default()
    };
    for (case, req, needle) in [
        (
            "unknown field",
            list("nmae = 1", &[], ""),
            "filter: unknown field",
        ),
        (
            "missing operator",
            list("name \"x\"", &[], ""),
            "filter: expected an operator after the field at \"\\\"x\\\"\"",
        ),
        (
            "or",
            list("name = 1 or owner = 2", &[], ""),
            "expected `and` at \"or\"",
        ),
        (
            "bad sort",
            list("", &["created_at", "name sideways"], ""),
            "order_by[1]",
        ),
        ("bad token", list("", &[], "garbage"), "page_token"),
    ] {
        expect(
            case,
            c.list_experiments(req).await,
            Code::InvalidArgument,
            needle,
        );
    }

    // Nothing of any rejected request was written: not in memory, not on disk.
    let metrics = metrics_of(&mut c, &id).await;
    assert!(metrics.is_empty(), "rejected points leaked: {metrics:?}");
    let events = c
        .list_events(proto::ListEventsRequest {
            parent_id: id.clone(),
            since: None,
        })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events.is_empty(), "rejected events leaked: {events:?}");

    let md = c
        .list_metadata(proto::ListMetadataRequest {
            parent_id: id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .metadata;
    assert!(md.is_empty());
    let listed = c
        .list_experiments(proto::ListExperimentsRequest {
            namespace: "cv".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .experiments;
    assert_eq!(
        listed.len(),
        1,
        "a rejected CreateExperiment created something"
    );
    let dir = server.config.data_dir.clone();
    server.stop().await;
    assert!(parquet_files(&dir, "metrics").is_empty());
    assert!(parquet_files(&dir, "events").is_empty());
}

/// A message that puts raw bytes where ModelBox has string fields (same field
/// numbers and wire type), to send invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawLogMetrics {
    #[prost(bytes = "vec", tag = "1")]
    parent_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    key: Vec<u8>,
}

#[tokio::test]
async fn invalid_utf8_and_oversized_messages() {
    let (_dir, mut config) = temp_config();
    config.limits.max_message_bytes = 1 << 20;
    config.max_buffered_bytes = 1 << 20;
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "raw").await;

    let channel = tonic::transport::Channel::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let raw = RawLogMetrics {
        parent_id: id.clone().into_bytes(),
        key: vec![b'l', 0xff, 0xfe],
    };
    let result: Result<tonic::Response<proto::LogMetricsResponse>, _> = grpc
        .unary(
            tonic::Request::new(raw),
            http::uri::PathAndQuery::from_static("/modelbox.ModelStore/LogMetrics"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    let err = result.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(
        err.message().contains("LogMetricsRequest.key"),
        "{}",
        err.message()
    );

    // Over max_message_bytes: RESOURCE_EXHAUSTED, and nothing written.
    let err = c
        .log_metrics(blocks(vec![numeric_block(&id, &["a"], 100_000, 0)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    let metrics = c
        .get_metrics(proto::GetMetricsRequest {
            parent_id: id,
            full_precision: false,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .metrics;
    assert!(metrics.is_empty());
    server.stop().await;
}

/// Stops the server and checks that its metric files hold exactly `acked` points.
async fn stop_and_assert_published(server: TestServer, acked: u64) {
    let dir = server.config.data_dir.clone();
    server.stop().await;
    let rows: usize = parquet_files(&dir, "metrics")
        .iter()
        .map(|f| parquet_rows(f))
        .sum();
    assert_eq!(
        rows as u64, acked,
        "every acknowledged point, and only those, is published"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_buffers_answer_resource_exhausted_with_a_retry_hint_and_keep_acked_data() {
    let (_dir, mut config) = temp_config();
    config.max_buffered_bytes = 2 << 20;
    config.limits.max_message_bytes = 2 << 20;
    config.when_full = WhenFull::Wait(Duration::from_millis(5));
    // Slow writers (zstd's slowest level on small row groups): eight clients
    // sending at once fill a 2 MiB budget faster than rows become row groups.
    config.roll.zstd_level = 22;
    config.roll.row_group_rows = 20_000;
    config.writer_threads = 1;
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "flood").await;
    let exhausted = std::sync::Arc::new(std::sync::Mutex::new(None::<tonic::Status>));
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8u64 {
        let (mut c, id, exhausted) = (c.clone(), id.clone(), std::sync::Arc::clone(&exhausted));
        tasks.spawn(async move {
            let mut acked = 0u64;
            for i in 0..40 {
                if exhausted.lock().unwrap().is_some() {
                    break;
                }
                let first = (t * 1_000 + i) * 40_000;
                match c
                    .log_metrics(blocks(vec![numeric_block(&id, &["x"], 40_000, first)]))
                    .await
                {
                    Ok(r) => acked += r.into_inner().points_accepted,
                    Err(e) => {
                        exhausted.lock().unwrap().get_or_insert(e);
                        break;
                    }
                }
            }
            acked
        });
    }
    let mut acked = 0;
    while let Some(n) = tasks.join_next().await {
        acked += n.unwrap();
    }
    let err = exhausted
        .lock()
        .unwrap()
        .take()
        .expect("eight clients must fill a 2 MiB budget");
    assert_eq!(err.code(), Code::ResourceExhausted, "{}", err.message());
    assert!(err.metadata().get("grpc-retry-pushback-ms").is_some());
    assert!(err.message().contains("memory budget"), "{}", err.message());
    assert!(acked > 0);
    stop_and_assert_published(server, acked).await;
}

#[tokio::test]
async fn more_large_requests_than_receive_slots_on_one_connection_are_all_answered() {
    let (_dir, mut config) = temp_config();
    config.max_concurrent_requests = 2;
    config.limits.max_message_bytes = 4 << 20;
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "many-streams").await;
    // Sixteen ~1 MB requests at once over one connection and two receive slots:
    // the bodies of those waiting for a slot arrive anyway and fill the
    // connection's flow-control window, which the slot holders need to receive
    // the rest of theirs. Waiting is bounded, so every request gets an answer.
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16u64 {
        let (mut c, id) = (c.clone(), id.clone());
        tasks.spawn(async move {
            c.log_metrics(blocks(vec![numeric_block(&id, &["x"], 40_000, t * 40_000)]))
                .await
                .map(|r| r.into_inner().points_accepted)
        });
    }
    let answers = tokio::time::timeout(Duration::from_secs(60), tasks.join_all())
        .await
        .expect("every request is answered (no flow-control deadlock)");
    let mut acked = 0;
    for answer in answers {
        match answer {
            Ok(n) => acked += n,
            Err(e) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
                assert!(e.metadata().get("grpc-retry-pushback-ms").is_some());
            }
        }
    }
    assert!(acked > 0);
    stop_and_assert_published(server, acked).await;
}

#[tokio::test]
async fn the_largest_int64_step_and_wallclock_are_accepted() {
    let (_dir, config) = temp_config();
    let mut server = TestServer::start(config).await;
    let mut c = server.client().await;
    let id = create_experiment(&mut c, "cv", "edge").await;
    // The largest allowed step and wallclock are accepted (and nothing above was).
    let mut edge = numeric_block(&id, &["edge"], 1, 0);
    edge.steps[0] = i64::MAX as u64;
    edge.wallclock_times[0] = i64::MAX as u64;
    assert_eq!(
        c.log_metrics(blocks(vec![edge]))
            .await
            .unwrap()
            .into_inner()
            .points_accepted,
        1
    );
    let edge_points: Vec<u64> = metrics_of(&mut c, &id)
        .await
        .into_iter()
        .filter(|m| m.key == "edge")
        .flat_map(|m| m.values)
        .map(|v| v.step)
        .collect();
    assert_eq!(edge_points, [i64::MAX as u64]);
    server.stop().await;
}
