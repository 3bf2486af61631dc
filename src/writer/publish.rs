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

use super::RETRY_AFTER;
use crate::live::WriterView;
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
            Ok(publication) => publish(persister, view, publication, &mut failed),
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

fn publish(
    persister: &Persister,
    view: &WriterView,
    mut publication: Publication,
    failed: &mut Vec<Publication>,
) {
    match persister.publish(&mut publication) {
        Ok(()) => view.published(&publication.key),
        Err(e) => {
            tracing::error!(file = %publication.key, error = %e, "publishing failed; keeping the file and retrying");
            failed.push(publication);
        }
    }
}

fn retry(persister: &Persister, view: &WriterView, failed: &mut Vec<Publication>) {
    for mut publication in std::mem::take(failed) {
        match persister.publish(&mut publication) {
            Ok(()) => view.published(&publication.key),
            Err(_) => failed.push(publication),
        }
    }
}
