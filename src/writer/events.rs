//! The buffer of one events partition. Events are few next to metrics, so a
//! partition keeps them as rows until its file rolls, and turns them into columns
//! then. Chunks are shared (`Arc`) with the writer's live view for reads.

use std::sync::Arc;

use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::ArrowError;

use crate::model::{EventChunk, EventRecord};

use super::metrics::SortedRows;
use super::schema::events_schema;

#[derive(Debug, Default)]
pub(crate) struct EventsBuffer {
    chunks: Vec<Arc<EventChunk>>,
    rows: usize,
    bytes: usize,
}

impl EventsBuffer {
    pub(crate) fn len(&self) -> usize {
        self.rows
    }

    pub(crate) fn approx_bytes(&self) -> usize {
        self.bytes
    }

    pub(crate) fn append(&mut self, chunk: Arc<EventChunk>) {
        self.rows += chunk.events.len();
        self.bytes += chunk.approx_bytes();
        self.chunks.push(chunk);
    }

    /// The rows sorted by (experiment_id, wallclock), arrival order breaking ties,
    /// with each experiment's row count.
    pub(crate) fn to_record_batch(&self) -> Result<SortedRows, ArrowError> {
        let mut perm: Vec<(&EventChunk, &EventRecord)> = self
            .chunks
            .iter()
            .flat_map(|c| c.events.iter().map(move |e| (&**c, e)))
            .collect();
        // Stable: equal (experiment, wallclock) keep their arrival order.
        perm.sort_by(|(ca, a), (cb, b)| {
            (&ca.experiment, a.wallclock).cmp(&(&cb.experiment, b.wallclock))
        });
        let mut experiments: Vec<(Arc<str>, u64)> = Vec::new();
        let mut experiment = StringDictionaryBuilder::<Int32Type>::new();
        let mut name = StringDictionaryBuilder::<Int32Type>::new();
        let mut source = StringDictionaryBuilder::<Int32Type>::new();
        for (c, e) in &perm {
            match experiments.last_mut() {
                Some((id, n)) if *id == c.experiment => *n += 1,
                _ => experiments.push((Arc::clone(&c.experiment), 1)),
            }
            experiment.append_value(&c.experiment);
            name.append_value(&e.name);
            source.append_value(&e.source);
        }
        let wallclock: TimestampMicrosecondArray = perm
            .iter()
            .map(|(_, e)| e.wallclock)
            .collect::<Vec<_>>()
            .into();
        let metadata = StringArray::from_iter_values(perm.iter().map(|(_, e)| &e.metadata_json));
        let ingested: TimestampMicrosecondArray = perm
            .iter()
            .map(|(c, _)| c.ingested_at)
            .collect::<Vec<_>>()
            .into();
        let batch = RecordBatch::try_new(
            events_schema(),
            vec![
                Arc::new(experiment.finish()),
                Arc::new(name.finish()),
                Arc::new(source.finish()),
                Arc::new(wallclock.with_timezone("UTC")),
                Arc::new(metadata),
                Arc::new(ingested.with_timezone("UTC")),
            ],
        )?;
        Ok(SortedRows {
            batch,
            experiments,
            series: Vec::new(),
        })
    }
}
