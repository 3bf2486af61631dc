//! Group commit for CreateExperiment: concurrent calls are taken together by one
//! thread and written in one index transaction, so many ranks creating their
//! experiments at once do not wait for one another's commits. A batch is made
//! durable by the catalog journal ([`crate::index::journal`]): a second thread
//! syncs it and answers the batch's callers while the first writes the next, and
//! a third writes the index's pages back ahead of the journal's checkpoints.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::index::journal::WRITEBACK_EVERY;
use crate::index::{CatalogJournal, Durable, FileSync, Index, IndexError, NewExperiment};
use crate::model::ExperimentRecord;

type Entries = Vec<(String, serde_json::Value)>;
type Created = Result<(ExperimentRecord, bool), IndexError>;

struct Job {
    new: NewExperiment,
    metadata: Entries,
    reply: oneshot::Sender<Created>,
}

/// What the catalog thread is sent.
#[derive(Debug)]
enum Msg {
    Create(Job),
    /// Answer what came before, checkpoint the journal and stop.
    Stop,
}

/// Most creations written in one transaction.
const MAX_BATCH: usize = 512;

/// See the module docs. [`CreateBatcher::stop`] stops its threads.
#[derive(Debug, Clone)]
pub struct CreateBatcher {
    tx: Sender<Msg>,
    /// The catalog thread first: the others stop when it has.
    threads: Arc<Mutex<Vec<JoinHandle<()>>>>,
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
        let writeback = index
            .writeback()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let writeback = writeback
            .map(|file| {
                std::thread::Builder::new()
                    .name("mboxd-catalog-writeback".into())
                    .spawn(move || write_back(&file, &dirty_rx))
            })
            .transpose()?;
        let sync = std::thread::Builder::new()
            .name("mboxd-catalog-sync".into())
            .spawn({
                let sync_failed = Arc::clone(&sync_failed);
                move || syncs(&sync, &sync_rx, &sync_failed)
            })?;
        let catalog = std::thread::Builder::new()
            .name("mboxd-catalog".into())
            .spawn(move || {
                let to = After {
                    sync: sync_tx,
                    sync_failed,
                    dirty: dirty_tx,
                };
                run(&index, &rx, journal, &to);
            })?;
        let threads = [Some(catalog), Some(sync), writeback];
        Ok(Self {
            tx,
            threads: Arc::new(Mutex::new(threads.into_iter().flatten().collect())),
        })
    }

    /// Creates (or finds) an experiment; see [`Index::create_experiment`].
    /// `None` once the batcher has stopped.
    pub async fn create(&self, new: NewExperiment, metadata: Entries) -> Option<Created> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Msg::Create(Job {
                new,
                metadata,
                reply,
            }))
            .ok()?;
        rx.await.ok()
    }

    /// Answers the creations sent before, checkpoints the journal, and waits
    /// for the threads to end, so the index is let go and the journal left
    /// empty. Later creations are answered `None`. Blocks.
    pub fn stop(&self) {
        let _ = self.tx.send(Msg::Stop);
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            if thread.join().is_err() {
                tracing::error!("a catalog thread panicked");
            }
        }
    }
}

/// A batch's answers, waiting for a sync of the journal.
struct Waiting {
    answers: Vec<(oneshot::Sender<Created>, (ExperimentRecord, bool))>,
    /// The journal's checkpoints when the batch was committed: the next one
    /// makes it durable without the journal.
    checkpoints: u64,
}

/// The catalog thread's lines to the threads that finish its work.
struct After {
    /// Batches waiting for a sync of the journal.
    sync: Sender<Waiting>,
    /// Set when a sync failed.
    sync_failed: Arc<AtomicBool>,
    /// Told of every commit that left pages to write back.
    dirty: Sender<()>,
}

fn run(index: &Index, rx: &Receiver<Msg>, mut journal: CatalogJournal, to: &After) {
    let mut stopping = false;
    while let Ok(Msg::Create(first)) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Create(job)) => jobs.push(job),
                Ok(Msg::Stop) => {
                    stopping = true;
                    break;
                }
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
                        let _ = to.sync.send(Waiting {
                            answers: answers.collect(),
                            checkpoints: journal.checkpoints(),
                        });
                        let _ = to.dirty.try_send(());
                    }
                }
            }
            // One bad apple fails the transaction: write each on its own (durably),
            // so every caller gets its own answer. The checkpoint first: the
            // failed batch's record, if it stayed in the journal, must not be
            // replayed over what these write.
            Err(_) => {
                if let Err(e) = index.checkpoint_journal(&mut journal) {
                    tracing::warn!(error = %e, "checkpointing the catalog journal");
                }
                for job in jobs {
                    let _ = job
                        .reply
                        .send(index.create_experiment(job.new, &job.metadata));
                }
            }
        }
        if stopping {
            break;
        }
    }
    // Stopping: one durable commit, so the journal is left empty. (A process
    // that exits first leaves it to the next start, which finds every batch in
    // it already durable, since the stop's own commits are.)
    if let Err(e) = index.checkpoint_journal(&mut journal) {
        tracing::warn!(error = %e, "the catalog journal is replayed at the next start");
    }
}

/// Syncs the journal for every batch waiting, then answers their callers.
///
/// After a failed sync, Linux reports the error once: a later sync can succeed
/// although the pages it failed to write are lost. So every batch committed
/// before the checkpoint that follows a failure fails too.
fn syncs(sync: &FileSync, rx: &Receiver<Waiting>, failed: &AtomicBool) {
    // The checkpoint count of the last batch whose sync failed.
    let mut failed_through = None;
    while let Ok(first) = rx.recv() {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        let result = sync.sync();
        for batch in waiting {
            let lost = match &result {
                Err(e) => Some((e.kind(), e.to_string())),
                Ok(()) if failed_through.is_some_and(|c| batch.checkpoints <= c) => Some((
                    std::io::ErrorKind::Other,
                    "an earlier sync failed, so this one may have lost its pages".to_string(),
                )),
                Ok(()) => None,
            };
            let Some((kind, message)) = lost else {
                for (reply, result) in batch.answers {
                    let _ = reply.send(Ok(result));
                }
                continue;
            };
            // In the index, not durable: the callers are told to retry (the
            // experiment is then found and answered as existing), and the next
            // batch is committed durably.
            failed_through = failed_through.max(Some(batch.checkpoints));
            failed.store(true, Ordering::Relaxed);
            for (reply, _) in batch.answers {
                let _ = reply.send(Err(IndexError::Journal {
                    what: "syncing",
                    path: sync.path().to_owned(),
                    source: std::io::Error::new(kind, message.clone()),
                }));
            }
        }
    }
}

/// Writes the index's file back after commits that left pages to write, at most
/// every [`WRITEBACK_EVERY`]. A failure is only logged: the checkpoint's own
/// sync reports it where it counts.
fn write_back(index_file: &FileSync, dirty: &Receiver<()>) {
    while dirty.recv().is_ok() {
        if let Err(e) = index_file.sync() {
            tracing::debug!(error = %e, "writing the index back");
        }
        std::thread::sleep(WRITEBACK_EVERY);
    }
}
