//! Group commit for CreateExperiment: concurrent calls are taken together by one
//! thread and written in one index transaction (one fsync), so many ranks creating
//! their experiments at once do not wait for one another's commits.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use crate::index::{Index, IndexError, NewExperiment};
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
    pub fn start(index: Arc<Index>) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("mboxd-catalog".into())
            .spawn(move || run(&index, &rx))?;
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

fn run(index: &Index, rx: &Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let batch = jobs
            .iter()
            .map(|j| (j.new.clone(), j.metadata.clone()))
            .collect();
        match index.create_experiments(batch) {
            Ok(created) => {
                for (job, result) in jobs.into_iter().zip(created) {
                    let _ = job.reply.send(Ok(result));
                }
            }
            // One bad apple fails the transaction: write each on its own, so every
            // caller gets its own answer.
            Err(_) => {
                for job in jobs {
                    let _ = job
                        .reply
                        .send(index.create_experiment(job.new, &job.metadata));
                }
            }
        }
    }
}
