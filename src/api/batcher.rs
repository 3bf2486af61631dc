//! Group commit for CreateExperiment: concurrent calls are taken together by one
//! thread and written in one index transaction, so many ranks creating their
//! experiments at once do not wait for one another's commits. A batch is made
//! durable by the catalog journal ([`crate::index::journal`]): a second thread
//! syncs it and answers the batch's callers while the first writes the next, and
//! a third writes the index's pages back ahead of the journal's checkpoints.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::index::journal::WRITEBACK_EVERY;
use crate::index::{
    CatalogJournal, Durable, Index, IndexError, IndexWriteback, JournalSync, NewExperiment,
};
use crate::model::ExperimentRecord;

type Entries = Vec<(String, serde_json::Value)>;
type Created = Result<(ExperimentRecord, bool), IndexError>;

struct Job {
    new: NewExperiment,
    metadata: Entries,
    reply: oneshot::Sender<Created>,
}

/// Most creations written in one transaction.
const MAX_BATCH: usize = 512;

/// See the module docs. Dropping the last handle stops its thread.
#[derive(Debug, Clone)]
pub struct CreateBatcher {
    tx: Sender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("name", &self.new.name).finish()
    }
}

impl CreateBatcher {
    pub fn start(index: Arc<Index>, journal: CatalogJournal) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (sync_tx, sync_rx) = crossbeam_channel::unbounded();
        let sync = journal
            .syncer()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let sync_failed = Arc::new(AtomicBool::new(false));
        let (dirty_tx, dirty_rx) = crossbeam_channel::bounded(1);
        if let Some(writeback) = journal
            .writeback()
            .map_err(|e| std::io::Error::other(e.to_string()))?
        {
            std::thread::Builder::new()
                .name("mboxd-catalog-writeback".into())
                .spawn(move || write_back(&writeback, &dirty_rx))?;
        }
        std::thread::Builder::new()
            .name("mboxd-catalog-sync".into())
            .spawn({
                let sync_failed = Arc::clone(&sync_failed);
                move || syncs(&sync, &sync_rx, &sync_failed)
            })?;
        std::thread::Builder::new()
            .name("mboxd-catalog".into())
            .spawn(move || {
                let to = After {
                    sync: sync_tx,
                    sync_failed,
                    dirty: dirty_tx,
                };
                run(&index, &rx, journal, &to);
            })?;
        Ok(Self { tx })
    }

    /// Creates (or finds) an experiment; see [`Index::create_experiment`].
    pub async fn create(&self, new: NewExperiment, metadata: Entries) -> Option<Created> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job {
                new,
                metadata,
                reply,
            })
            .ok()?;
        rx.await.ok()
    }
}

/// Answers waiting for a sync of the journal.
type Waiting = Vec<(oneshot::Sender<Created>, (ExperimentRecord, bool))>;

/// The catalog thread's lines to the threads that finish its work.
struct After {
    /// Batches waiting for a sync of the journal.
    sync: Sender<Waiting>,
    /// Set when a sync failed.
    sync_failed: Arc<AtomicBool>,
    /// Told of every commit that left pages to write back.
    dirty: Sender<()>,
}

fn run(index: &Index, rx: &Receiver<Job>, mut journal: CatalogJournal, to: &After) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        if to.sync_failed.swap(false, Ordering::Relaxed) {
            journal.checkpoint_next();
        }
        let batch = jobs
            .iter()
            .map(|j| (j.new.clone(), j.metadata.clone()))
            .collect();
        match index.create_journaled(batch, &mut journal) {
            Ok((created, durable)) => {
                let answers = jobs.into_iter().map(|j| j.reply).zip(created);
                match durable {
                    Durable::Now => {
                        for (reply, result) in answers {
                            let _ = reply.send(Ok(result));
                        }
                    }
                    Durable::AfterSync => {
                        // The other threads outlive this one; a write-back
                        // already due covers this commit too.
                        let _ = to.sync.send(answers.collect());
                        let _ = to.dirty.try_send(());
                    }
                }
            }
            // One bad apple fails the transaction: write each on its own (durably),
            // so every caller gets its own answer.
            Err(_) => {
                for job in jobs {
                    let _ = job
                        .reply
                        .send(index.create_experiment(job.new, &job.metadata));
                }
            }
        }
    }
    // Stopping: one durable commit, so the journal is left empty.
    if let Err(e) = index.checkpoint_journal(&mut journal) {
        tracing::warn!(error = %e, "the catalog journal is replayed at the next start");
    }
}

/// Syncs the journal for every batch waiting, then answers their callers.
fn syncs(sync: &JournalSync, rx: &Receiver<Waiting>, failed: &AtomicBool) {
    while let Ok(first) = rx.recv() {
        let mut waiting = first;
        while let Ok(more) = rx.try_recv() {
            waiting.extend(more);
        }
        match sync.sync() {
            Ok(()) => {
                for (reply, result) in waiting {
                    let _ = reply.send(Ok(result));
                }
            }
            // The batches are in the index, not yet durable: their callers are
            // told to retry (a creation found again is answered as such), and
            // the next batch is committed durably.
            Err(e) => {
                failed.store(true, Ordering::Relaxed);
                let message = e.to_string();
                for (reply, _) in waiting {
                    let _ = reply.send(Err(IndexError::Journal {
                        what: "syncing",
                        path: sync.path().to_owned(),
                        source: std::io::Error::new(e.kind(), message.clone()),
                    }));
                }
            }
        }
    }
}

/// Writes the index's file back after commits that left pages to write, at most
/// every [`WRITEBACK_EVERY`]. A failure is only logged: the checkpoint's own
/// sync reports it where it counts.
fn write_back(writeback: &IndexWriteback, dirty: &Receiver<()>) {
    while dirty.recv().is_ok() {
        if let Err(e) = writeback.write_back() {
            tracing::debug!(error = %e, "writing the index back");
        }
        std::thread::sleep(WRITEBACK_EVERY);
    }
}
