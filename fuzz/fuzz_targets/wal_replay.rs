//! Reading back a WAL segment never panics, whatever its bytes; what it reads back
//! is consistent (increasing sequence numbers, frames that re-encode identically),
//! and record payloads decode or fail cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mboxd::ingest::record;
use mboxd::wal::{self, RecordKind};

fuzz_target!(|bytes: &[u8]| {
    let scan = wal::scan(bytes);
    assert!(scan.records.windows(2).all(|w| w[0].seq < w[1].seq));
    assert!(scan.records_after_damage <= scan.records.len());
    if scan.damage.is_none() {
        let mut again = Vec::new();
        for r in &scan.records {
            wal::encode_frame(&mut again, r.seq, r.kind, &r.payload);
        }
        assert_eq!(again, bytes, "an undamaged segment is exactly its frames");
    }
    for r in &scan.records {
        match r.kind {
            RecordKind::Metrics => drop(record::decode_metrics(&r.payload)),
            RecordKind::Events => drop(record::decode_events(&r.payload)),
        }
    }
});
