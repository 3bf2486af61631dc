//! The buffer of one events partition. Events are few next to metrics, so they are
//! kept as rows and turned into columns at roll time.

use std::sync::Arc;

use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::types::Int32Type;
use arrow_array::{RecordBatch, StringArray, TimestampMicrosecondArray};
use arrow_schema::ArrowError;

use crate::model::{EventPoint, EventRecord, Micros};

use super::schema::events_schema;

#[derive(Debug)]
struct Row {
    experiment: Arc<str>,
    event: EventRecord,
    ingested_at: Micros,
}

#[derive(Debug, Default)]
pub(super) struct EventsBuffer {
    rows: Vec<Row>,
    bytes: usize,
}

impl EventsBuffer {
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    pub(super) fn approx_bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn append(&mut self, experiment: &Arc<str>, events: Vec<EventRecord>, at: Micros) {
        self.bytes += events
            .iter()
            .map(|e| e.name.len() + e.source.len() + e.metadata_json.len() + 64)
            .sum::<usize>();
        self.rows.extend(events.into_iter().map(|event| Row {
            experiment: Arc::clone(experiment),
            event,
            ingested_at: at,
        }));
    }

    pub(super) fn points_of(&self, experiment_id: &str) -> Vec<EventPoint> {
        self.rows
            .iter()
            .filter(|r| &*r.experiment == experiment_id)
            .map(|r| EventPoint {
                event: r.event.clone(),
                ingested_at: r.ingested_at,
            })
            .collect()
    }

    /// The rows sorted by (experiment_id, wallclock), arrival order breaking ties.
    pub(super) fn to_record_batch(&self) -> Result<(RecordBatch, String, String), ArrowError> {
        let mut perm: Vec<usize> = (0..self.rows.len()).collect();
        perm.sort_by(|&a, &b| {
            let (a, b) = (&self.rows[a], &self.rows[b]);
            (&a.experiment, a.event.wallclock).cmp(&(&b.experiment, b.event.wallclock))
        });
        let mut experiment = StringDictionaryBuilder::<Int32Type>::new();
        let mut name = StringDictionaryBuilder::<Int32Type>::new();
        let mut source = StringDictionaryBuilder::<Int32Type>::new();
        for &i in &perm {
            let r = &self.rows[i];
            experiment.append_value(&r.experiment);
            name.append_value(&r.event.name);
            source.append_value(&r.event.source);
        }
        let wallclock: TimestampMicrosecondArray = perm
            .iter()
            .map(|&i| self.rows[i].event.wallclock)
            .collect::<Vec<_>>()
            .into();
        let metadata =
            StringArray::from_iter_values(perm.iter().map(|&i| &self.rows[i].event.metadata_json));
        let ingested: TimestampMicrosecondArray = perm
            .iter()
            .map(|&i| self.rows[i].ingested_at)
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
        let min = perm
            .first()
            .map(|&i| self.rows[i].experiment.to_string())
            .unwrap_or_default();
        let max = perm
            .last()
            .map(|&i| self.rows[i].experiment.to_string())
            .unwrap_or_default();
        Ok((batch, min, max))
    }
}
