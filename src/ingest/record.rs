//! Batches as write-ahead log payloads, and back.
//!
//! A metrics record is a protobuf message with the batch's ingest time (field 1),
//! its blocks as `modelbox.MetricsBlock` (field 2) and the client's batch id, if
//! any (field 3), so it decodes with the same generated code as requests. Records
//! written before batch ids existed decode with an empty id. It is encoded straight from the validated batch's
//! slices, without building protobuf structs first.

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
    pub blocks: Vec<proto::MetricsBlock>,
    #[prost(string, tag = "3")]
    pub client_batch_id: String,
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

fn block_len(b: &MetricBlock) -> usize {
    str_len(1, &b.experiment.id)
        + encoding::string::encoded_len_repeated(2, &b.keys)
        + encoding::uint32::encoded_len_packed(3, &b.key_index)
        + encoding::uint64::encoded_len_packed(4, &b.steps)
        + encoding::uint64::encoded_len_packed(5, &b.wallclocks)
        + encoding::double::encoded_len_packed(6, &b.values)
        + encoding::uint32::encoded_len_packed(7, &b.strings.rows)
        + encoding::string::encoded_len_repeated(8, &b.strings.values)
        + encoding::uint32::encoded_len_packed(9, &b.bytes.rows)
        + encoding::bytes::encoded_len_repeated(10, &b.bytes.values)
}

/// Encodes a metrics batch as a [`MetricsRecord`].
pub fn encode_metrics(batch: &MetricsBatch, client_batch_id: &str) -> Vec<u8> {
    let lens: Vec<usize> = batch.blocks().iter().map(block_len).collect();
    let total: usize = lens
        .iter()
        .map(|l| 1 + encoding::encoded_len_varint(*l as u64) + l)
        .sum();
    let mut buf = Vec::with_capacity(total + 11 + str_len(3, client_batch_id));
    encoding::int64::encode(1, &batch.ingested_at(), &mut buf);
    for (b, len) in batch.blocks().iter().zip(lens) {
        encoding::encode_key(2, WireType::LengthDelimited, &mut buf);
        encoding::encode_varint(len as u64, &mut buf);
        encode_str(1, &b.experiment.id, &mut buf);
        encoding::string::encode_repeated(2, &b.keys, &mut buf);
        encoding::uint32::encode_packed(3, &b.key_index, &mut buf);
        encoding::uint64::encode_packed(4, &b.steps, &mut buf);
        encoding::uint64::encode_packed(5, &b.wallclocks, &mut buf);
        encoding::double::encode_packed(6, &b.values, &mut buf);
        encoding::uint32::encode_packed(7, &b.strings.rows, &mut buf);
        encoding::string::encode_repeated(8, &b.strings.values, &mut buf);
        encoding::uint32::encode_packed(9, &b.bytes.rows, &mut buf);
        encoding::bytes::encode_repeated(10, &b.bytes.values, &mut buf);
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
        let b = &blocks[1];
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
