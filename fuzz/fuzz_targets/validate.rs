//! Request validation never panics, and whatever it accepts survives the trip
//! through a WAL record unchanged.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use mboxd::api::validate;
use mboxd::config::Limits;
use mboxd::index::{Index, NewExperiment};
use mboxd::ingest::record;
use mboxd::proto;
use prost::Message;

struct Fixture {
    _dir: tempfile::TempDir,
    index: Index,
    id: String,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = Index::open(&dir.path().join("index.redb")).expect("index");
        let (rec, _) = index
            .create_experiment(
                NewExperiment {
                    name: "fuzz".into(),
                    namespace: "fuzz".into(),
                    owner: String::new(),
                    framework: 0,
                    task: String::new(),
                    external_id: String::new(),
                },
                &[],
            )
            .expect("experiment");
        Fixture { _dir: dir, index, id: rec.id }
    })
}

#[derive(Arbitrary, Debug)]
struct Block {
    known_parent: bool,
    keys: Vec<String>,
    key_index: Vec<u32>,
    steps: Vec<u64>,
    wallclocks: Vec<u64>,
    values: Vec<f64>,
    string_rows: Vec<u32>,
    string_values: Vec<String>,
    bytes_rows: Vec<u32>,
    bytes_values: Vec<Vec<u8>>,
}

#[derive(Arbitrary, Debug)]
enum Input {
    /// Bytes as they come off the wire.
    Raw(Vec<u8>),
    /// Well-formed protobuf with adversarial contents, to get past decoding.
    Blocks(Vec<Block>),
    Event { name: String, source: String, seconds: i64, nanos: i32, raw_metadata: Vec<u8> },
}

fuzz_target!(|input: Input| {
    let f = fixture();
    let limits = Limits {
        max_points_per_request: 10_000,
        max_value_bytes: 1 << 16,
        ..Limits::default()
    };
    match input {
        Input::Raw(bytes) => {
            if let Ok(req) = proto::LogMetricsRequest::decode(bytes.as_slice()) {
                check_metrics(f, req, &limits);
            }
            if let Ok(req) = proto::LogEventRequest::decode(bytes.as_slice()) {
                let _ = validate::log_event(req, &f.index, &limits, 0);
            }
            if let Ok(req) = proto::CreateExperimentRequest::decode(bytes.as_slice()) {
                let _ = validate::create_experiment(req, &limits);
            }
        }
        Input::Blocks(blocks) => {
            let req = proto::LogMetricsRequest {
                blocks: blocks
                    .into_iter()
                    .map(|b| proto::MetricsBlock {
                        parent_id: if b.known_parent { f.id.clone() } else { "unknown".into() },
                        keys: b.keys,
                        key_index: b.key_index,
                        steps: b.steps,
                        wallclock_times: b.wallclocks,
                        values: b.values,
                        string_rows: b.string_rows,
                        string_values: b.string_values,
                        bytes_rows: b.bytes_rows,
                        bytes_values: b.bytes_values,
                    })
                    .collect(),
                ..Default::default()
            };
            check_metrics(f, req, &limits);
        }
        Input::Event { name, source, seconds, nanos, raw_metadata } => {
            let metadata = proto::Metadata::decode(raw_metadata.as_slice()).ok();
            let req = proto::LogEventRequest {
                parent_id: f.id.clone(),
                event: Some(proto::Event {
                    name,
                    source: Some(proto::EventSource { name: source }),
                    wallclock_time: Some(prost_types::Timestamp { seconds, nanos }),
                    metadata,
                }),
                events: Vec::new(),
                ..Default::default()
            };
            if let Ok(batch) = validate::log_event(req, &f.index, &limits, 0) {
                let r = record::decode_events(&record::encode_events(&batch, "")).expect("own events record decodes");
                assert_eq!(r.events.len(), batch.events().len());
            }
        }
    }
});

fn check_metrics(f: &Fixture, req: proto::LogMetricsRequest, limits: &Limits) {
    let Ok(batch) = validate::log_metrics(req, &f.index, limits, 42) else {
        return;
    };
    let decoded = record::decode_metrics(&record::encode_metrics(&batch, "")).expect("own metrics record decodes");
    assert_eq!(decoded.ingested_at, 42);
    assert!(decoded.client_batch_id.is_empty());
    let blocks: Vec<proto::MetricsBlock> = decoded.blocks.into_iter().map(Into::into).collect();
    assert_eq!(blocks.len(), batch.blocks().len());
    for (decoded, original) in blocks.iter().zip(batch.blocks()) {
        assert_eq!(decoded.parent_id, *original.experiment.id);
        assert_eq!(decoded.keys, original.keys);
        assert_eq!(decoded.key_index, original.key_index);
        assert_eq!(decoded.steps, original.steps);
        assert_eq!(decoded.wallclock_times, original.wallclocks);
        assert_eq!(decoded.values.len(), original.values.len());
        assert!(decoded.values.iter().zip(&original.values).all(|(a, b)| a.to_bits() == b.to_bits()));
        assert_eq!(decoded.string_rows, original.strings.rows);
        assert_eq!(decoded.string_values, original.strings.values);
        assert_eq!(decoded.bytes_rows, original.bytes.rows);
        assert_eq!(decoded.bytes_values, original.bytes.values);
        // Replay re-validates: an accepted block must pass again.
        let again = validate::block("replay", decoded.clone(), &f.index, &Limits::unbounded());
        assert!(again.is_ok(), "{again:?}");
    }
}
