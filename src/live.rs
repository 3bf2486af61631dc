//! The rows writers hold that are not yet in a published file, published for reads.
//!
//! Each writer thread owns a [`WriterView`], updated as rows move through its
//! stages. A batch's chunks join it when the batch is handed to the writer (before
//! it is acknowledged, so a client always reads its own writes); the writer then
//! claims them for a partition's buffer; when the chunks of a buffer
//! are encoded into a row group of the staged file, they leave the view and the
//! staged file's new row group joins it, under one lock; once the file is
//! published (in the manifest) its staged entry leaves. Readers take a
//! [`LiveRows`] snapshot under the same short lock and never wait for a writer's
//! queue or its encoding work.
//!
//! Every entry names the object key its rows will be published under. A reader
//! takes the live snapshot first and the manifest second, and drops live entries
//! whose key the manifest already lists, or lately dropped (a file published and
//! compacted away in between, whose rows are in its replacement): a file published
//! in between is then read once, from the manifest, never twice and never missed.

use std::collections::HashMap;
use std::fs::File;
use std::sync::{Arc, Mutex};

use parquet::file::metadata::ParquetMetaData;

use crate::model::{EventChunk, MetricChunk};
use crate::paths::ObjectKey;

/// Row groups of a Parquet file still being written in the staging folder.
#[derive(Debug)]
pub struct StagedRows {
    /// The key the file will be published under.
    pub key: Arc<ObjectKey>,
    /// A read handle of its own (positional reads only).
    pub file: Arc<File>,
    /// The file's schema and the row groups flushed so far.
    pub metadata: Arc<ParquetMetaData>,
    /// Row groups holding each experiment.
    pub experiments: HashMap<Arc<str>, Vec<u32>>,
    /// Metric keys of each experiment in the file, with their row counts.
    pub keys: HashMap<Arc<str>, Vec<(Arc<str>, u64)>>,
}

/// A chunk in the view, tagged with the buffer it belongs to.
#[derive(Debug, Clone)]
struct Tagged<T> {
    tag: u64,
    key: Arc<ObjectKey>,
    chunk: Arc<T>,
}

/// Chunks handed to a writer that it has not taken up yet.
#[derive(Debug)]
enum Queued {
    Metrics(Vec<Arc<MetricChunk>>),
    Events(Arc<EventChunk>),
}

#[derive(Debug, Default)]
struct State {
    queued: HashMap<u64, Queued>,
    metrics: HashMap<Arc<str>, Vec<Tagged<MetricChunk>>>,
    events: HashMap<Arc<str>, Vec<Tagged<EventChunk>>>,
    staged: HashMap<Arc<ObjectKey>, Arc<StagedRows>>,
}

/// The key of chunks not yet in any file's buffer: never in the manifest.
fn unfiled() -> Arc<ObjectKey> {
    Arc::new(ObjectKey::from_manifest(String::new()))
}

/// One writer thread's unpublished rows.
#[derive(Debug, Default)]
pub struct WriterView {
    state: Mutex<State>,
}

/// What a reader gets for one experiment.
#[derive(Debug, Default)]
pub struct LiveRows {
    /// Buffered metric chunks of the experiment, in arrival order per writer, with
    /// the key of the file they will be in.
    pub metrics: Vec<(Arc<ObjectKey>, Arc<MetricChunk>)>,
    /// Staged files with row groups holding the experiment, and those row groups.
    pub staged: Vec<(Arc<StagedRows>, Vec<u32>)>,
    /// Metric keys in the staged files, with row counts.
    pub staged_keys: Vec<(Arc<str>, u64)>,
    pub events: Vec<(Arc<ObjectKey>, Arc<EventChunk>)>,
}

impl LiveRows {
    /// Drops everything bound for a file `published` says is (or was) in the
    /// manifest.
    pub fn without(mut self, published: impl Fn(&str) -> bool) -> Self {
        self.metrics.retain(|(k, _)| !published(k.as_str()));
        self.events.retain(|(k, _)| !published(k.as_str()));
        self.staged.retain(|(s, _)| !published(s.key.as_str()));
        self
    }
}

impl WriterView {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Metric chunks handed to the writer as hand-off `id`.
    pub fn queue_metrics(&self, id: u64, chunks: Vec<Arc<MetricChunk>>) {
        self.lock().queued.insert(id, Queued::Metrics(chunks));
    }

    /// An event chunk handed to the writer as hand-off `id`.
    pub fn queue_events(&self, id: u64, chunk: Arc<EventChunk>) {
        self.lock().queued.insert(id, Queued::Events(chunk));
    }

    /// The writer took up hand-off `id`: each chunk joins buffer `tag`, bound for
    /// the file `key`.
    pub fn claim_metrics(&self, id: u64, claims: Vec<(Arc<MetricChunk>, u64, Arc<ObjectKey>)>) {
        let mut state = self.lock();
        state.queued.remove(&id);
        for (chunk, tag, key) in claims {
            state
                .metrics
                .entry(Arc::clone(&chunk.block.experiment.id))
                .or_default()
                .push(Tagged { tag, key, chunk });
        }
    }

    /// The writer took up hand-off `id` into events buffer `tag`.
    pub fn claim_events(&self, id: u64, chunk: Arc<EventChunk>, tag: u64, key: Arc<ObjectKey>) {
        let mut state = self.lock();
        state.queued.remove(&id);
        state
            .events
            .entry(Arc::clone(&chunk.experiment))
            .or_default()
            .push(Tagged { tag, key, chunk });
    }

    /// The chunks of buffer `tag` (holding rows of `experiments`) became a row group
    /// of `staged`: swap them in one step.
    pub fn encoded<'a>(
        &self,
        tag: u64,
        experiments: impl Iterator<Item = &'a Arc<str>>,
        staged: Arc<StagedRows>,
    ) {
        let mut state = self.lock();
        remove_tagged(&mut state.metrics, tag, experiments);
        state.staged.insert(Arc::clone(&staged.key), staged);
    }

    /// The chunks of buffer `tag` now belong to buffer `new_tag`, bound for the
    /// file `key` (after the file they were bound for failed).
    pub fn retag_metrics<'a>(
        &self,
        tag: u64,
        new_tag: u64,
        key: &Arc<ObjectKey>,
        experiments: impl Iterator<Item = &'a Arc<str>>,
    ) {
        let mut state = self.lock();
        for experiment in experiments {
            if let Some(chunks) = state.metrics.get_mut(experiment) {
                for t in chunks.iter_mut().filter(|t| t.tag == tag) {
                    t.tag = new_tag;
                    t.key = Arc::clone(key);
                }
            }
        }
    }

    /// A staged file is in the manifest now (or abandoned).
    pub fn published(&self, key: &ObjectKey) {
        self.lock().staged.remove(key);
    }

    /// The events of buffer `tag` are in the manifest now.
    pub fn events_published<'a>(&self, tag: u64, experiments: impl Iterator<Item = &'a Arc<str>>) {
        let mut state = self.lock();
        remove_tagged(&mut state.events, tag, experiments);
    }

    fn collect(&self, experiment: &str, out: &mut LiveRows) {
        let state = self.lock();
        let mut queued: Vec<_> = state.queued.iter().collect();
        queued.sort_by_key(|(id, _)| **id);
        for (_, q) in queued {
            match q {
                Queued::Metrics(chunks) => out.metrics.extend(
                    chunks
                        .iter()
                        .filter(|c| &*c.block.experiment.id == experiment)
                        .map(|c| (unfiled(), Arc::clone(c))),
                ),
                Queued::Events(c) if &*c.experiment == experiment => {
                    out.events.push((unfiled(), Arc::clone(c)));
                }
                Queued::Events(_) => {}
            }
        }
        if let Some(chunks) = state.metrics.get(experiment) {
            out.metrics.extend(
                chunks
                    .iter()
                    .map(|t| (Arc::clone(&t.key), Arc::clone(&t.chunk))),
            );
        }
        if let Some(chunks) = state.events.get(experiment) {
            out.events.extend(
                chunks
                    .iter()
                    .map(|t| (Arc::clone(&t.key), Arc::clone(&t.chunk))),
            );
        }
        for staged in state.staged.values() {
            if let Some(groups) = staged.experiments.get(experiment) {
                out.staged.push((Arc::clone(staged), groups.clone()));
                if let Some(keys) = staged.keys.get(experiment) {
                    out.staged_keys.extend(keys.iter().cloned());
                }
            }
        }
    }

    /// Hand-offs the writer has not taken up yet (its queue depth).
    pub fn queued(&self) -> usize {
        self.lock().queued.len()
    }
}

fn remove_tagged<'a, T>(
    map: &mut HashMap<Arc<str>, Vec<Tagged<T>>>,
    tag: u64,
    experiments: impl Iterator<Item = &'a Arc<str>>,
) {
    for experiment in experiments {
        if let Some(chunks) = map.get_mut(experiment) {
            chunks.retain(|t| t.tag != tag);
            if chunks.is_empty() {
                map.remove(experiment);
            }
        }
    }
}

/// Every writer's view.
#[derive(Debug, Clone, Default)]
pub struct LiveView {
    writers: Vec<Arc<WriterView>>,
}

impl LiveView {
    /// A view with one part per writer thread.
    pub fn new(writers: usize) -> Self {
        Self {
            writers: (0..writers).map(|_| Arc::default()).collect(),
        }
    }

    /// Writer `i`'s part.
    pub fn writer(&self, i: usize) -> Arc<WriterView> {
        Arc::clone(&self.writers[i])
    }

    /// Writer `i`'s part, by reference.
    pub fn part(&self, i: usize) -> &WriterView {
        &self.writers[i]
    }

    /// Hand-offs waiting for their writers.
    pub fn queued(&self) -> usize {
        self.writers.iter().map(|w| w.queued()).sum()
    }

    /// What the writers hold of `experiment` right now.
    pub fn snapshot(&self, experiment: &str) -> LiveRows {
        let mut out = LiveRows::default();
        for w in &self.writers {
            w.collect(experiment, &mut out);
        }
        out
    }
}
