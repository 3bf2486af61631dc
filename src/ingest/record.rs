//! Batches as write-ahead log payloads, and back.
//!
//! A metrics record is a protobuf message with the batch's ingest time (field 1),
//! its blocks (field 2) and the client's batch id, if any (field 3). A block is a
//! `modelbox.MetricsBlock` except that steps and wall-clock times are written as
//! zigzag deltas from the previous row (fields 11 and 12) instead of fields 4 and 5:
//! steps mostly advance by 0 or 1 and a batch's times are close, so each takes one
//! byte instead of up to ten, and a 10,000-point block is about half the bytes to
//! write and sync. Records from before the deltas (fields 4 and 5) and before batch
//! ids (no field 3) still decode. A record is encoded straight from the validated
//! batch's slices, without building protobuf structs first.

use prost::Message;
use prost::encoding::{self, WireType};

use crate::model::{EventRecord, EventsBatch, MetricBlock, MetricsBatch};
use crate::proto;

/// A decoded metrics record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetricsRecord {
    #[prost(int64, tag = "1")]
    pub ingested_at: i64,
    #[prost(message, repeated, tag = "2")]
    pub blocks: Vec<WalBlock>,
    #[prost(string, tag = "3")]
    pub client_batch_id: String,
}

/// A block as the log stores it: `modelbox.MetricsBlock`'s fields, with steps and
/// wall-clock times either plain (fields 4 and 5, older records) or as deltas
/// (fields 11 and 12).
#[derive(Clone, PartialEq, prost::Message)]
pub struct WalBlock {
    #[prost(string, tag = "1")]
    pub parent_id: String,
    #[prost(string, repeated, tag = "2")]
    pub keys: Vec<String>,
    #[prost(uint32, repeated, tag = "3")]
    pub key_index: Vec<u32>,
    #[prost(uint64, repeated, tag = "4")]
    pub steps: Vec<u64>,
    #[prost(uint64, repeated, tag = "5")]
    pub wallclock_times: Vec<u64>,
    #[prost(double, repeated, tag = "6")]
    pub values: Vec<f64>,
    #[prost(uint32, repeated, tag = "7")]
    pub string_rows: Vec<u32>,
    #[prost(string, repeated, tag = "8")]
    pub string_values: Vec<String>,
    #[prost(uint32, repeated, tag = "9")]
    pub bytes_rows: Vec<u32>,
    #[prost(bytes = "vec", repeated, tag = "10")]
    pub bytes_values: Vec<Vec<u8>>,
    #[prost(sint64, repeated, tag = "11")]
    pub step_deltas: Vec<i64>,
    #[prost(sint64, repeated, tag = "12")]
    pub wallclock_deltas: Vec<i64>,
}

impl From<WalBlock> for proto::MetricsBlock {
    fn from(b: WalBlock) -> Self {
        let steps = if b.step_deltas.is_empty() {
            b.steps
        } else {
            undelta(&b.step_deltas)
        };
        let wallclock_times = if b.wallclock_deltas.is_empty() {
            b.wallclock_times
        } else {
            undelta(&b.wallclock_deltas)
        };
        proto::MetricsBlock {
            parent_id: b.parent_id,
            keys: b.keys,
            key_index: b.key_index,
            steps,
            wallclock_times,
            values: b.values,
            string_rows: b.string_rows,
            string_values: b.string_values,
            bytes_rows: b.bytes_rows,
            bytes_values: b.bytes_values,
        }
    }
}

/// Each value's difference from the one before (the first from 0), wrapping, so
/// every `u64` sequence round-trips through [`undelta`].
fn deltas(values: &[u64]) -> impl Iterator<Item = i64> + '_ {
    let mut prev = 0u64;
    values.iter().map(move |&v| {
        let d = v.wrapping_sub(prev) as i64;
        prev = v;
        d
    })
}

fn undelta(deltas: &[i64]) -> Vec<u64> {
    let mut prev = 0u64;
    deltas
        .iter()
        .map(|&d| {
            prev = prev.wrapping_add(d as u64);
            prev
        })
        .collect()
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

/// The bytes of `values` as packed zigzag deltas, without tag and length.
fn delta_body_len(values: &[u64]) -> usize {
    deltas(values)
        .map(|d| encoding::encoded_len_varint(zigzag(d)))
        .sum()
}

/// The length of field `tag` whose packed body is `body` bytes (0 when empty).
fn packed_len(tag: u32, body: usize) -> usize {
    if body == 0 {
        return 0;
    }
    encoding::key_len(tag) + encoding::encoded_len_varint(body as u64) + body
}

/// Writes `values` as field `tag`, packed zigzag deltas (as prost's `sint64`)
/// taking `body` bytes ([`delta_body_len`]).
fn encode_delta_packed(tag: u32, values: &[u64], body: usize, buf: &mut Vec<u8>) {
    if values.is_empty() {
        return;
    }
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(body as u64, buf);
    for d in deltas(values) {
        encoding::encode_varint(zigzag(d), buf);
    }
}

/// A decoded events record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventsRecord {
    #[prost(int64, tag = "1")]
    pub ingested_at: i64,
    #[prost(string, tag = "2")]
    pub parent_id: String,
    #[prost(message, repeated, tag = "3")]
    pub events: Vec<EventEntry>,
    #[prost(string, tag = "4")]
    pub client_batch_id: String,
}

/// One event in an [`EventsRecord`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct EventEntry {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub source: String,
    #[prost(int64, tag = "3")]
    pub wallclock: i64,
    #[prost(string, tag = "4")]
    pub metadata_json: String,
}

impl From<EventEntry> for EventRecord {
    fn from(e: EventEntry) -> Self {
        EventRecord {
            name: e.name,
            source: e.source,
            wallclock: e.wallclock,
            metadata_json: e.metadata_json,
        }
    }
}

fn str_len(tag: u32, s: &str) -> usize {
    encoding::key_len(tag) + encoding::encoded_len_varint(s.len() as u64) + s.len()
}

fn encode_str(tag: u32, s: &str, buf: &mut Vec<u8>) {
    encoding::encode_key(tag, WireType::LengthDelimited, buf);
    encoding::encode_varint(s.len() as u64, buf);
    buf.extend_from_slice(s.as_bytes());
}

/// A block's encoded length, and its step and time deltas' packed bodies (each
/// walked once per point, not again when written).
struct BlockLen {
    len: usize,
    steps: usize,
    wallclocks: usize,
}

fn block_len(b: &MetricBlock) -> BlockLen {
    let steps = delta_body_len(&b.steps);
    let wallclocks = delta_body_len(&b.wallclocks);
    let len = str_len(1, &b.experiment.id)
        + encoding::string::encoded_len_repeated(2, &b.keys)
        + encoding::uint32::encoded_len_packed(3, &b.key_index)
        + packed_len(11, steps)
        + packed_len(12, wallclocks)
        + encoding::double::encoded_len_packed(6, &b.values)
        + encoding::uint32::encoded_len_packed(7, &b.strings.rows)
        + encoding::string::encoded_len_repeated(8, &b.strings.values)
        + encoding::uint32::encoded_len_packed(9, &b.bytes.rows)
        + encoding::bytes::encoded_len_repeated(10, &b.bytes.values);
    BlockLen {
        len,
        steps,
        wallclocks,
    }
}

/// Encodes a metrics batch as a [`MetricsRecord`].
pub fn encode_metrics(batch: &MetricsBatch, client_batch_id: &str) -> Vec<u8> {
    let lens: Vec<BlockLen> = batch.blocks().iter().map(block_len).collect();
    let total: usize = lens
        .iter()
        .map(|l| 1 + encoding::encoded_len_varint(l.len as u64) + l.len)
        .sum();
    let mut buf = Vec::with_capacity(total + 11 + str_len(3, client_batch_id));
    encoding::int64::encode(1, &batch.ingested_at(), &mut buf);
    for (b, l) in batch.blocks().iter().zip(lens) {
        encoding::encode_key(2, WireType::LengthDelimited, &mut buf);
        encoding::encode_varint(l.len as u64, &mut buf);
        encode_str(1, &b.experiment.id, &mut buf);
        encoding::string::encode_repeated(2, &b.keys, &mut buf);
        encoding::uint32::encode_packed(3, &b.key_index, &mut buf);
        encoding::double::encode_packed(6, &b.values, &mut buf);
        encoding::uint32::encode_packed(7, &b.strings.rows, &mut buf);
        encoding::string::encode_repeated(8, &b.strings.values, &mut buf);
        encoding::uint32::encode_packed(9, &b.bytes.rows, &mut buf);
        encoding::bytes::encode_repeated(10, &b.bytes.values, &mut buf);
        encode_delta_packed(11, &b.steps, l.steps, &mut buf);
        encode_delta_packed(12, &b.wallclocks, l.wallclocks, &mut buf);
    }
    if !client_batch_id.is_empty() {
        encode_str(3, client_batch_id, &mut buf);
    }
    buf
}

/// Encodes an events batch as an [`EventsRecord`].
pub fn encode_events(batch: &EventsBatch, client_batch_id: &str) -> Vec<u8> {
    EventsRecord {
        ingested_at: batch.ingested_at(),
        parent_id: batch.experiment().id.to_string(),
        events: batch
            .events()
            .iter()
            .map(|e| EventEntry {
                name: e.name.clone(),
                source: e.source.clone(),
                wallclock: e.wallclock,
                metadata_json: e.metadata_json.clone(),
            })
            .collect(),
        client_batch_id: client_batch_id.to_owned(),
    }
    .encode_to_vec()
}

/// Decodes a metrics record.
pub fn decode_metrics(payload: &[u8]) -> Result<MetricsRecord, prost::DecodeError> {
    MetricsRecord::decode(payload)
}

/// Decodes an events record.
pub fn decode_events(payload: &[u8]) -> Result<EventsRecord, prost::DecodeError> {
    EventsRecord::decode(payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ExperimentRef, SparseColumn};

    #[test]
    fn metrics_round_trip_through_the_generated_decoder() {
        let block = MetricBlock {
            experiment: ExperimentRef {
                id: "exp".into(),
                namespace: "ns".into(),
            },
            keys: vec!["loss".into(), "text".into()],
            key_index: vec![0, 1, 0],
            steps: vec![1, 1, 2],
            wallclocks: vec![10, 10, 1 << 40],
            values: vec![0.5, 0.0, f64::NAN],
            strings: SparseColumn {
                rows: vec![1],
                values: vec!["hi".into()],
            },
            bytes: SparseColumn {
                rows: vec![2],
                values: vec![vec![0, 255]],
            },
        };
        let batch = MetricsBatch::from_validated(vec![block.clone(), block], 123);
        let bytes = encode_metrics(&batch, "batch-7");
        let MetricsRecord {
            ingested_at: at,
            blocks,
            client_batch_id,
        } = decode_metrics(&bytes).unwrap();
        assert_eq!((at, client_batch_id.as_str()), (123, "batch-7"));
        assert!(
            decode_metrics(&encode_metrics(&batch, ""))
                .unwrap()
                .client_batch_id
                .is_empty()
        );
        assert_eq!(blocks.len(), 2);
        let b = &proto::MetricsBlock::from(blocks[1].clone());
        assert_eq!(b.parent_id, "exp");
        assert_eq!(b.keys, ["loss", "text"]);
        assert_eq!(b.key_index, [0, 1, 0]);
        assert_eq!(b.steps, [1, 1, 2]);
        assert_eq!(b.wallclock_times, [10, 10, 1 << 40]);
        assert_eq!(b.values[0], 0.5);
        assert!(b.values[2].is_nan());
        assert_eq!(
            (b.string_rows.as_slice(), b.string_values.as_slice()),
            ([1].as_slice(), ["hi".to_string()].as_slice())
        );
        assert_eq!(b.bytes_values, [vec![0, 255]]);
    }

    fn block_of(steps: Vec<u64>, wallclocks: Vec<u64>) -> MetricBlock {
        let n = steps.len();
        MetricBlock {
            experiment: ExperimentRef {
                id: "exp".into(),
                namespace: "ns".into(),
            },
            keys: vec!["loss".into()],
            key_index: vec![0; n],
            steps,
            wallclocks,
            values: (0..n).map(|i| i as f64).collect(),
            strings: SparseColumn::default(),
            bytes: SparseColumn::default(),
        }
    }

    #[test]
    fn steps_and_times_round_trip_as_deltas_whatever_their_order_and_size() {
        let steps = vec![5, 5, 4, 0, u64::MAX, 1, u64::MAX - 1, 1 << 63, 7];
        let times = vec![
            u64::MAX,
            0,
            1_700_000_000_000,
            1_700_000_000_000,
            3,
            2,
            1,
            0,
            9,
        ];
        let batch = MetricsBatch::from_validated(vec![block_of(steps.clone(), times.clone())], 1);
        let record = decode_metrics(&encode_metrics(&batch, "")).unwrap();
        let b = proto::MetricsBlock::from(record.blocks[0].clone());
        assert_eq!(b.steps, steps);
        assert_eq!(b.wallclock_times, times);
        assert_eq!(b.values.len(), 9);
    }

    #[test]
    fn records_with_plain_steps_and_times_still_decode() {
        // As this daemon wrote them before the deltas: fields 4 and 5.
        let old = MetricsRecord {
            ingested_at: 3,
            blocks: vec![WalBlock {
                parent_id: "exp".into(),
                keys: vec!["loss".into()],
                key_index: vec![0, 0],
                steps: vec![10, 11],
                wallclock_times: vec![1_700_000_000_000, 1_700_000_000_001],
                values: vec![0.25, 0.5],
                ..Default::default()
            }],
            client_batch_id: "b".into(),
        }
        .encode_to_vec();
        let b = proto::MetricsBlock::from(decode_metrics(&old).unwrap().blocks[0].clone());
        assert_eq!(b.steps, [10, 11]);
        assert_eq!(b.wallclock_times, [1_700_000_000_000, 1_700_000_000_001]);
        assert_eq!(b.values, [0.25, 0.5]);
    }

    #[test]
    fn a_training_block_takes_about_eleven_bytes_a_point() {
        // 1,000 steps of 10 keys logged together at one time, as a trainer sends
        // them: the key index (1 byte), step and time deltas (1 each), the value (8).
        let n = 10_000u64;
        let mut block = block_of(
            (0..n).map(|i| (1 << 40) + i / 10).collect(),
            vec![1_700_000_000_000; n as usize],
        );
        block.keys = (0..10).map(|k| format!("train/metric_{k}")).collect();
        block.key_index = (0..n).map(|i| (i % 10) as u32).collect();
        let batch = MetricsBatch::from_validated(vec![block], 1);
        let bytes = encode_metrics(&batch, "").len() as u64;
        assert!((11 * n..12 * n).contains(&bytes), "{bytes} bytes");
    }

    #[test]
    fn events_round_trip() {
        let batch = EventsBatch::from_validated(
            ExperimentRef {
                id: "e".into(),
                namespace: "n".into(),
            },
            vec![EventRecord {
                name: "ckpt".into(),
                source: "trainer".into(),
                wallclock: -5,
                metadata_json: "{\"a\":1}".into(),
            }],
            9,
        );
        let r = decode_events(&encode_events(&batch, "b1")).unwrap();
        assert_eq!((r.ingested_at, r.parent_id.as_str()), (9, "e"));
        assert_eq!(r.client_batch_id, "b1");
        assert_eq!(EventRecord::from(r.events[0].clone()), batch.events()[0]);
    }
}
