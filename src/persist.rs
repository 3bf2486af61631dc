//! Publication: the one owner of stage → intent → rename → manifest → WAL release →
//! upload, of replacements (compaction, retention) and of their recovery.
//!
//! A new file: its intent is recorded durably, the staged file is renamed into its
//! partition (under the storage root, or into the spool of an S3 root), then one
//! index transaction records it in the manifest with its experiment index, WAL
//! pieces, metric summaries and client batch ids. Only then are its WAL records
//! released and, on S3, its upload queued. After a crash at any step,
//! [`Persister::recover`] finishes or drops what was under way (see
//! [`crate::index`]).
//!
//! A replacement: the new files are staged, its intent recorded, the files renamed
//! into place, then one transaction swaps the old files for the new ones in the
//! manifest and queues the old ones for deletion; they are deleted right after. A
//! crash before the swap drops the new files; after it, the deletions finish at
//! start-up.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::index::{FileEntry, FilePart, Forget, Index, IndexError, PublishIntent, ReplaceIntent};
use crate::model::{MetricSummary, Micros, now_micros};
use crate::paths::{ObjectKey, Table};
use crate::sink::upload::Uploader;
use crate::sink::{LocalSink, Remote, SinkError, StagedFile, delete_remote};
use crate::telemetry::{Metrics, TableLabel, TableName};
use crate::wal::{Seq, Tracker};
use crate::writer::WriterError;

/// A finished file and what its publication records.
#[derive(Debug)]
pub struct Publication {
    /// `None` once renamed into place (a retry then only commits).
    staged: Option<StagedFile>,
    pub key: Arc<ObjectKey>,
    pub table: Table,
    pub partition: String,
    pub rows: u64,
    pub bytes: u64,
    pub experiments: BTreeMap<Arc<str>, FilePart>,
    /// (WAL seq, experiment) of every block in the file.
    pub pieces: Vec<(Seq, Arc<str>)>,
    /// Moved into the intent when it is built (they can be as many as the file's
    /// series, so they are not held twice).
    pub summaries: Vec<(Arc<str>, Arc<str>, MetricSummary)>,
    /// (client batch id, accepted at, points) of the batches in the file.
    pub batch_ids: Vec<(Arc<str>, Micros, u64)>,
    /// The writer's tag of the buffer the rows came from (for its live view).
    pub tag: u64,
    /// Built once, kept for retries.
    intent: Option<Arc<PublishIntent>>,
}

impl Publication {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        staged: StagedFile,
        key: Arc<ObjectKey>,
        table: Table,
        partition: String,
        rows: u64,
        bytes: u64,
        experiments: BTreeMap<Arc<str>, FilePart>,
    ) -> Self {
        Self {
            staged: Some(staged),
            key,
            table,
            partition,
            rows,
            bytes,
            experiments,
            pieces: Vec::new(),
            summaries: Vec::new(),
            batch_ids: Vec::new(),
            tag: 0,
            intent: None,
        }
    }

    fn intent(&mut self) -> Arc<PublishIntent> {
        let intent = self.intent.get_or_insert_with(|| {
            let mut pieces: Vec<(u64, String)> = self
                .pieces
                .iter()
                .map(|(s, e)| (*s, e.to_string()))
                .collect();
            pieces.sort();
            pieces.dedup();
            let min = self.experiments.keys().next().map(|e| e.to_string());
            let max = self.experiments.keys().next_back().map(|e| e.to_string());
            Arc::new(PublishIntent {
                entry: FileEntry {
                    key: self.key.as_str().to_owned(),
                    rows: self.rows,
                    bytes: self.bytes,
                    min_experiment: min.unwrap_or_default(),
                    max_experiment: max.unwrap_or_default(),
                    created_at: now_micros(),
                    schema: crate::index::SCHEMA_INT64,
                    compacted: false,
                },
                partition: self.partition.clone(),
                pieces,
                experiments: self
                    .experiments
                    .iter()
                    .map(|(e, p)| (e.to_string(), p.clone()))
                    .collect(),
                summaries: std::mem::take(&mut self.summaries)
                    .into_iter()
                    .map(|(e, k, s)| (e.to_string(), k.to_string(), s))
                    .collect(),
                batch_ids: self
                    .batch_ids
                    .iter()
                    .map(|(id, at, n)| (id.to_string(), *at, *n))
                    .collect(),
            })
        });
        Arc::clone(intent)
    }
}

/// A new file of a replacement: staged, with its manifest entry and experiment
/// index.
#[derive(Debug)]
pub struct Replacement {
    pub staged: StagedFile,
    pub entry: FileEntry,
    pub experiments: Vec<(String, FilePart)>,
}

/// What publication needs, shared by the writer threads and compaction.
#[derive(Debug, Clone)]
pub struct Persister {
    pub index: Arc<Index>,
    /// Where files are published: the storage root, or the spool of an S3 root.
    pub sink: LocalSink,
    /// With an S3 root: takes each file published into the spool.
    pub uploader: Option<Arc<Uploader>>,
    /// With an S3 root: the bucket, for deleting replaced objects.
    pub remote: Option<Remote>,
    /// Where published WAL records are released, and the oldest record still on disk.
    pub wal: Option<(Arc<Tracker>, Arc<AtomicU64>)>,
    /// How long client batch ids are remembered.
    pub batch_id_window: Duration,
    pub metrics: Metrics,
}

fn label(table: Table) -> TableLabel {
    TableLabel {
        table: match table {
            Table::Metrics => TableName::metrics,
            Table::Events => TableName::events,
        },
    }
}

impl Persister {
    /// Whether files publish into a spool for upload (an S3 root).
    fn spooled(&self) -> bool {
        self.remote.is_some()
    }

    /// Publishes `p` exactly once. On failure `p` keeps its progress, and calling
    /// again resumes where it stopped.
    pub fn publish(&self, p: &mut Publication) -> Result<(), WriterError> {
        let started = Instant::now();
        let intent = p.intent();
        if let Some(staged) = p.staged.take() {
            if let Err(e) = self.index.begin_publish(&intent) {
                p.staged = Some(staged);
                return Err(e.into());
            }
            if let Err(failed) = self.sink.try_publish(staged, &p.key) {
                // Handed back: not renamed, tried again next time.
                p.staged = failed.staged;
                return Err(failed.error.into());
            }
        } else if !self.sink.is_placed(&p.key)? {
            // The file could not be synced, or was lost after a failed rename: never
            // list a file that is not there. Its rows stay in the WAL (nothing is
            // released), and the next start drops the intent and writes them again.
            return Err(WriterError::NotPlaced(p.key.to_string()));
        }
        let forget = Forget {
            pieces_below: self
                .wal
                .as_ref()
                .map_or(0, |(_, from)| from.load(Ordering::Acquire)),
            batch_ids_before: now_micros().saturating_sub(self.batch_id_window.as_micros() as i64),
        };
        self.index.commit_publish(&intent, forget, self.spooled())?;
        if let Some(uploader) = &self.uploader {
            uploader.enqueue((*p.key).clone(), p.bytes);
        }
        if let Some((tracker, _)) = &self.wal {
            for (seq, _) in &p.pieces {
                tracker.release(*seq, 1);
            }
        }
        let label = label(p.table);
        let m = &self.metrics;
        m.files_published.get_or_create(&label).inc();
        m.published_bytes.get_or_create(&label).inc_by(p.bytes);
        m.published_rows.get_or_create(&label).inc_by(p.rows);
        m.publish_seconds.observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            file = %p.key,
            rows = p.rows,
            bytes = p.bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "published"
        );
        Ok(())
    }

    /// Swaps `inputs` for the staged `outputs` (compaction), or drops `inputs`
    /// (retention, with no outputs). Returns the keys removed from the manifest.
    pub fn replace(
        &self,
        id: String,
        outputs: Vec<Replacement>,
        inputs: Vec<String>,
    ) -> Result<Vec<String>, WriterError> {
        let intent = ReplaceIntent {
            id,
            outputs: outputs
                .iter()
                .map(|r| (r.entry.clone(), r.experiments.clone()))
                .collect(),
            inputs,
        };
        if let Err(e) = self.index.begin_replace(&intent) {
            for r in outputs {
                self.sink.discard(r.staged);
            }
            return Err(e.into());
        }
        for r in outputs {
            if let Err(e) = self.sink.publish(r.staged, &r.entry.object_key()) {
                // Outputs already in place are deleted with the intent.
                self.index.abandon_replace(&intent)?;
                self.finish_deletions();
                return Err(e.into());
            }
        }
        let removed = match self.index.commit_replace(&intent, self.spooled()) {
            Ok(removed) => removed,
            Err(e) => {
                if matches!(e, IndexError::StaleReplacement { .. }) {
                    self.finish_deletions();
                }
                return Err(e.into());
            }
        };
        if let Some(uploader) = &self.uploader {
            for (entry, _) in &intent.outputs {
                uploader.enqueue(entry.object_key(), entry.bytes);
            }
        }
        Ok(removed)
    }

    /// Deletes every object queued for deletion; failures stay queued.
    pub fn finish_deletions(&self) -> usize {
        let keys = match self.index.deletions() {
            Ok(keys) => keys,
            Err(e) => {
                tracing::error!(error = %e, "cannot read the deletion queue");
                return 0;
            }
        };
        let mut deleted = 0;
        for key in keys {
            match self.delete_object(&ObjectKey::from_manifest(key.clone())) {
                Ok(()) => match self.index.deleted(&key) {
                    Ok(()) => deleted += 1,
                    Err(e) => tracing::error!(error = %e, "cannot record a deletion"),
                },
                Err(e) => {
                    tracing::warn!(object = %key, error = %e, "cannot delete a replaced object yet; retrying later");
                }
            }
        }
        deleted
    }

    /// Deletes an object wherever it is (the local root or spool, and the bucket);
    /// one already gone is fine.
    fn delete_object(&self, key: &ObjectKey) -> Result<(), SinkError> {
        self.sink.remove(key);
        if let Some(Remote { store, runtime }) = &self.remote {
            runtime.block_on(delete_remote(store.as_ref(), key))?;
        }
        Ok(())
    }

    /// Finishes what a crash interrupted, before anything is served: publications
    /// whose file landed are committed (others dropped), replacements whose
    /// outputs all landed are swapped (others dropped with their outputs), and
    /// queued deletions are carried out.
    pub fn recover(&self) -> Result<(), IndexError> {
        let exists = |key: &str| {
            self.sink
                .path_of(&ObjectKey::from_manifest(key.to_owned()))
                .exists()
        };
        let (completed, dropped) = self.index.recover_intents(exists, self.spooled())?;
        if completed + dropped > 0 {
            tracing::warn!(
                completed,
                dropped,
                "finished publications a crash interrupted"
            );
        }
        for intent in self.index.replace_intents()? {
            if intent.outputs.iter().all(|(e, _)| exists(&e.key)) {
                match self.index.commit_replace(&intent, self.spooled()) {
                    Ok(_) => {
                        if let Some(uploader) = &self.uploader {
                            for (entry, _) in &intent.outputs {
                                uploader.enqueue(entry.object_key(), entry.bytes);
                            }
                        }
                        tracing::warn!(id = %intent.id, "finished a replacement a crash interrupted");
                    }
                    Err(e @ IndexError::StaleReplacement { .. }) => tracing::warn!(error = %e),
                    Err(e) => return Err(e),
                }
            } else {
                self.index.abandon_replace(&intent)?;
                tracing::warn!(id = %intent.id, "dropped a replacement a crash interrupted");
            }
        }
        let deleted = self.finish_deletions();
        if deleted > 0 {
            tracing::info!(deleted, "deleted replaced files");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn setup(dir: &std::path::Path) -> Persister {
        let index = Arc::new(Index::open(&dir.join("index.redb")).unwrap());
        let sink = LocalSink::open(&dir.join("root"), &dir.join("staging")).unwrap();
        Persister {
            index,
            sink,
            uploader: None,
            remote: None,
            wal: None,
            batch_id_window: Duration::from_secs(60),
            metrics: Metrics::new(),
        }
    }

    fn entry(key: &str) -> FileEntry {
        FileEntry::one_row_of_e(key)
    }

    /// Publishes a small file under `key` as a writer would.
    fn publish(p: &Persister, key: &str) {
        p.publish(&mut publication(p, key)).unwrap();
    }

    /// A small file staged for `key`, as a writer hands it over.
    fn publication(p: &Persister, key: &str) -> Publication {
        let mut staged = p.sink.stage().unwrap();
        staged.file.write_all(b"input").unwrap();
        Publication::new(
            staged,
            Arc::new(ObjectKey::from_manifest(key.into())),
            Table::Metrics,
            "metrics/namespace=a/date=2026-01-01".into(),
            1,
            5,
            [(
                Arc::from("e"),
                FilePart {
                    row_groups: vec![0],
                    rows: 1,
                },
            )]
            .into(),
        )
    }

    #[test]
    fn a_publish_that_failed_before_the_rename_places_the_file_when_tried_again() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        // A file where the partition's folder goes: creating the folder fails.
        let blocker = dir.path().join("root/metrics/namespace=a");
        std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
        std::fs::write(&blocker, b"not a folder").unwrap();
        let mut publication = publication(&p, IN1);
        let e = p.publish(&mut publication).unwrap_err();
        assert!(
            matches!(
                e,
                WriterError::Sink(SinkError::Io {
                    action: "creating",
                    ..
                })
            ),
            "{e}"
        );
        assert!(keys(&p).is_empty());

        std::fs::remove_file(&blocker).unwrap();
        p.publish(&mut publication).unwrap();
        assert_eq!(keys(&p), [IN1]);
        let placed = p.sink.path_of(&ObjectKey::from_manifest(IN1.into()));
        assert_eq!(std::fs::read(placed).unwrap(), b"input");
    }

    #[test]
    fn a_publish_whose_file_is_gone_is_never_listed() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        let mut publication = publication(&p, IN1);
        p.index.begin_publish(&publication.intent()).unwrap();
        // What a failed sync leaves: the intent, and no file to rename.
        let staged = publication.staged.take().unwrap();
        p.sink.discard(staged);
        for _ in 0..2 {
            let e = p.publish(&mut publication).unwrap_err();
            assert!(
                matches!(&e, WriterError::NotPlaced(key) if key == IN1),
                "{e}"
            );
        }
        assert!(keys(&p).is_empty());
        // The next start drops the intent; the WAL (not released) writes the rows again.
        p.recover().unwrap();
        assert!(keys(&p).is_empty());
        assert_eq!(p.index.recover_intents(|_| true, false).unwrap(), (0, 0));
    }

    fn staged(p: &Persister, key: &str) -> Replacement {
        let mut staged = p.sink.stage().unwrap();
        staged.file.write_all(b"merged").unwrap();
        Replacement {
            staged,
            entry: entry(key),
            experiments: vec![(
                "e".into(),
                FilePart {
                    row_groups: vec![0],
                    rows: 2,
                },
            )],
        }
    }

    fn keys(p: &Persister) -> Vec<String> {
        p.index
            .all_files()
            .unwrap()
            .into_iter()
            .map(|f| f.key)
            .collect()
    }

    const IN1: &str = "metrics/namespace=a/date=2026-01-01/in1.parquet";
    const IN2: &str = "metrics/namespace=a/date=2026-01-01/in2.parquet";
    const OUT1: &str = "metrics/namespace=a/date=2026-01-01/out1.parquet";
    const OUT2: &str = "metrics/namespace=a/date=2026-01-01/out2.parquet";

    /// On an S3 root without a change log (nothing holds the deletions until a
    /// change ships), a replaced input leaves the bucket only once every output
    /// that replaced it is uploaded: whatever stops the compaction pass early.
    #[test]
    fn without_a_change_log_replaced_inputs_wait_for_every_spooled_output() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        publish(&p, IN1);
        publish(&p, IN2);
        let intent = ReplaceIntent {
            id: "compact:a".into(),
            outputs: vec![(entry(OUT1), Vec::new()), (entry(OUT2), Vec::new())],
            inputs: vec![IN1.into(), IN2.into()],
        };
        p.index.begin_replace(&intent).unwrap();
        p.index.commit_replace(&intent, true).unwrap();
        assert_eq!(keys(&p), [OUT1, OUT2]);
        assert!(p.index.deletions().unwrap().is_empty());
        p.finish_deletions();
        assert!(p.index.deletions().unwrap().is_empty());
        p.index.mark_uploaded(OUT1).unwrap();
        assert!(p.index.deletions().unwrap().is_empty());
        p.index.mark_uploaded(OUT2).unwrap();
        assert_eq!(p.index.deletions().unwrap(), [IN1, IN2]);
    }

    /// Turning the change log off drops its unshipped entries and the deletions
    /// they held: an input whose replacement still waits in the spool waits for
    /// that upload (as shipping would have), the others go at once.
    #[test]
    fn turning_the_change_log_off_keeps_inputs_whose_replacements_are_uploading() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        p.index.enable_change_log().unwrap();
        publish(&p, IN1);
        publish(&p, IN2);
        for (id, input, output, spooled) in [("a", IN1, OUT1, true), ("b", IN2, OUT2, false)] {
            let intent = ReplaceIntent {
                id: format!("compact:{id}"),
                outputs: vec![(entry(output), Vec::new())],
                inputs: vec![input.into()],
            };
            p.index.begin_replace(&intent).unwrap();
            p.index.commit_replace(&intent, spooled).unwrap();
        }
        assert!(p.index.has_held_deletions().unwrap());
        assert!(p.index.deletions().unwrap().is_empty());

        p.index.disable_change_log().unwrap();
        assert!(!p.index.has_held_deletions().unwrap());
        assert_eq!(p.index.deletions().unwrap(), [IN2]);
        p.index.mark_uploaded(OUT1).unwrap();
        assert_eq!(p.index.deletions().unwrap(), [IN1, IN2]);
    }

    /// Retention removing a spooled output before its upload frees what it
    /// replaced: the partition is going as a whole.
    #[test]
    fn an_expired_spooled_output_releases_the_inputs_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        publish(&p, IN1);
        let intent = ReplaceIntent {
            id: "compact:a".into(),
            outputs: vec![(entry(OUT1), Vec::new())],
            inputs: vec![IN1.into()],
        };
        p.index.begin_replace(&intent).unwrap();
        p.index.commit_replace(&intent, true).unwrap();
        assert!(p.index.deletions().unwrap().is_empty());
        let expire = ReplaceIntent {
            id: "expire:a".into(),
            outputs: Vec::new(),
            inputs: vec![OUT1.into()],
        };
        p.index.begin_replace(&expire).unwrap();
        p.index.commit_replace(&expire, true).unwrap();
        assert!(keys(&p).is_empty());
        assert_eq!(p.index.deletions().unwrap(), [IN1, OUT1]);
    }

    #[test]
    fn a_replacement_cut_short_by_a_crash_is_undone_or_finished_at_start_up() {
        for renamed in [0, 1, 2] {
            let dir = tempfile::tempdir().unwrap();
            let p = setup(dir.path());
            publish(&p, IN1);
            publish(&p, IN2);
            // The crash: the intent is recorded and `renamed` outputs are in place,
            // but the swap never committed.
            let outputs = [staged(&p, OUT1), staged(&p, OUT2)];
            let intent = ReplaceIntent {
                id: "r".into(),
                outputs: outputs
                    .iter()
                    .map(|r| (r.entry.clone(), r.experiments.clone()))
                    .collect(),
                inputs: vec![IN1.into(), IN2.into()],
            };
            p.index.begin_replace(&intent).unwrap();
            for r in outputs.into_iter().take(renamed) {
                p.sink.publish(r.staged, &r.entry.object_key()).unwrap();
            }
            let exists = |k: &str| p.sink.path_of(&ObjectKey::from_manifest(k.into())).exists();
            p.recover().unwrap();
            if renamed == 2 {
                // Every output landed: the swap is finished, the inputs deleted.
                assert_eq!(keys(&p), [OUT1, OUT2]);
                assert!(!exists(IN1) && !exists(IN2));
            } else {
                // Not every output landed: the outputs go, the inputs stay.
                assert_eq!(keys(&p), [IN1, IN2], "{renamed} renamed");
                assert!(exists(IN1) && exists(IN2));
                assert!(!exists(OUT1) && !exists(OUT2), "{renamed} renamed");
            }
            assert!(p.index.replace_intents().unwrap().is_empty());
            assert!(p.index.deletions().unwrap().is_empty());
        }
    }

    /// A swap whose commit failed stays an intent with its outputs in place; a
    /// later pass replaces the same inputs. Finishing the first at the next start
    /// would list its rows twice: it is dropped, and its outputs deleted.
    #[test]
    fn a_replacement_whose_inputs_were_replaced_since_is_dropped_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        publish(&p, IN1);
        publish(&p, IN2);
        let first = staged(&p, OUT1);
        let intent = ReplaceIntent {
            id: "first".into(),
            outputs: vec![(first.entry.clone(), first.experiments.clone())],
            inputs: vec![IN1.into(), IN2.into()],
        };
        p.index.begin_replace(&intent).unwrap();
        p.sink
            .publish(first.staged, &first.entry.object_key())
            .unwrap();
        let removed = p
            .replace(
                "second".into(),
                vec![staged(&p, OUT2)],
                vec![IN1.into(), IN2.into()],
            )
            .unwrap();
        assert_eq!(removed, [IN1, IN2]);

        p.recover().unwrap();
        assert_eq!(keys(&p), [OUT2]);
        let exists = |k: &str| p.sink.path_of(&ObjectKey::from_manifest(k.into())).exists();
        assert!(!exists(OUT1) && exists(OUT2));
        assert!(!exists(IN1) && !exists(IN2));
        assert!(p.index.replace_intents().unwrap().is_empty());
        assert!(p.index.deletions().unwrap().is_empty());
        let files = p.index.experiment_files(Table::Metrics, "a", "e").unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
    }

    /// Retention expiring a partition while it is being compacted: the
    /// compaction's swap would bring the expired rows back.
    #[test]
    fn a_replacement_of_expired_inputs_is_refused_and_its_outputs_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        publish(&p, IN1);
        publish(&p, IN2);
        p.replace("expire:a".into(), Vec::new(), vec![IN1.into()])
            .unwrap();
        let e = p
            .replace(
                "compact:a".into(),
                vec![staged(&p, OUT1)],
                vec![IN1.into(), IN2.into()],
            )
            .unwrap_err();
        assert!(
            matches!(
                &e,
                WriterError::Index(IndexError::StaleReplacement { id, missing })
                    if id == "compact:a" && missing == IN1
            ),
            "{e}"
        );
        assert_eq!(keys(&p), [IN2]);
        let exists = |k: &str| p.sink.path_of(&ObjectKey::from_manifest(k.into())).exists();
        assert!(!exists(OUT1) && !exists(IN1) && exists(IN2));
        assert!(p.index.replace_intents().unwrap().is_empty());
        assert!(p.index.deletions().unwrap().is_empty());
    }

    #[test]
    fn a_replacement_swaps_inputs_for_outputs_and_deletes_the_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let p = setup(dir.path());
        publish(&p, IN1);
        publish(&p, IN2);
        let removed = p
            .replace(
                "r".into(),
                vec![staged(&p, OUT1)],
                vec![IN1.into(), IN2.into()],
            )
            .unwrap();
        assert_eq!(removed, [IN1, IN2]);
        assert_eq!(keys(&p), [OUT1]);
        assert_eq!(p.finish_deletions(), 2);
        let path = |k: &str| p.sink.path_of(&ObjectKey::from_manifest(k.into()));
        assert!(!path(IN1).exists() && !path(IN2).exists());
        assert_eq!(std::fs::read(path(OUT1)).unwrap(), b"merged");
        let files = p.index.experiment_files(Table::Metrics, "a", "e").unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].row_groups, Some(vec![0]));
    }
}
