//! A writer's publisher thread: it commits the writer's finished metrics files,
//! so the writer goes on taking and encoding batches while a publication commits.
//! A commit merges the file's metric summaries into the index; with many
//! experiments that takes seconds, and on the writer thread it held back every
//! batch queued behind it. At most one finished file waits for the publisher;
//! beyond that the writer waits, so finished files cannot pile up in memory.
//! Files are independent of each other (summaries merge in any order), so the
//! exactly-once protocol is [`Persister::publish`]'s, unchanged.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::{RETRY_AFTER, WriterError};
use crate::live::WriterView;
use crate::paths::Table;
use crate::persist::{Persister, Publication};

/// Finished files waiting for the publisher.
const QUEUE: usize = 1;

#[derive(Debug)]
pub(super) struct Publisher {
    tx: Sender<Publication>,
    thread: JoinHandle<usize>,
}

impl Publisher {
    pub(super) fn start(
        id: usize,
        persister: Persister,
        view: Arc<WriterView>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let thread = std::thread::Builder::new()
            .name(format!("mboxd-publish-{id}"))
            .spawn(move || run(&persister, &view, &rx))?;
        Ok(Self { tx, thread })
    }

    /// Hands a finished metrics file over, waiting while the publisher is busy
    /// and its queue is full. Gives the file back if the publisher has stopped.
    pub(super) fn send(&self, publication: Publication) -> Option<Publication> {
        self.tx.send(publication).err().map(|e| e.into_inner())
    }

    /// Publishes what was handed over, then stops. Returns how many files stay
    /// unpublished (their rows replay from the write-ahead log at the next start).
    pub(super) fn finish(self) -> usize {
        drop(self.tx);
        self.thread.join().unwrap_or_else(|_| {
            tracing::error!("a publisher thread panicked");
            1
        })
    }
}

fn run(persister: &Persister, view: &WriterView, rx: &Receiver<Publication>) -> usize {
    let mut failed: Vec<Publication> = Vec::new();
    let mut retry_at: Option<Instant> = None;
    loop {
        let next = match retry_at {
            Some(at) => rx.recv_deadline(at),
            None => rx.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match next {
            Ok(publication) => publish_or_keep(persister, view, publication, &mut failed),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => {
                retry(persister, view, &mut failed);
                return failed.len();
            }
        }
        let now = Instant::now();
        if retry_at.is_some_and(|at| now >= at) {
            retry(persister, view, &mut failed);
            retry_at = None;
        }
        if !failed.is_empty() && retry_at.is_none() {
            retry_at = Some(now + RETRY_AFTER);
        }
    }
}

/// Publishes a finished file and tells the writer's view; if that fails, logs
/// why and keeps the file in `failed` to be retried.
pub(super) fn publish_or_keep(
    persister: &Persister,
    view: &WriterView,
    mut publication: Publication,
    failed: &mut Vec<Publication>,
) {
    if let Err(e) = try_publish(persister, view, &mut publication) {
        tracing::error!(file = %publication.key, error = %e, "publishing failed; keeping the file and retrying");
        failed.push(publication);
    }
}

/// Tries each file in `failed` again; those that fail again stay.
pub(super) fn retry(persister: &Persister, view: &WriterView, failed: &mut Vec<Publication>) {
    for mut publication in std::mem::take(failed) {
        if try_publish(persister, view, &mut publication).is_err() {
            failed.push(publication);
        }
    }
}

fn try_publish(
    persister: &Persister,
    view: &WriterView,
    publication: &mut Publication,
) -> Result<(), WriterError> {
    persister.publish(publication)?;
    match publication.table {
        Table::Metrics => view.published(&publication.key),
        Table::Events => view.events_published(publication.tag, publication.experiments.keys()),
    }
    Ok(())
}
