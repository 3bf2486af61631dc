//! The reader side: follows every daemon's change log into one in-memory index.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::{
    ChangeLogError, CheckpointObject, LogKey, LogKeys, LogObject, PREFIX, decode, parse_key,
};
use crate::index::{Index, IndexError};
use crate::telemetry::Metrics;

/// Log objects read at once while a daemon's log is loaded.
const FETCH_CONCURRENCY: usize = 16;
/// Daemons loaded at once.
const DAEMON_CONCURRENCY: usize = 8;

/// After this many polls in a row that find a daemon's next log object missing,
/// the reader checks (one LIST of the daemon's checkpoints) that it has not fallen
/// so far behind that the object was deleted.
const GAP_CHECK_MISSES: u32 = 10;

/// Where the reader is in one daemon's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Position {
    /// The next log object to read.
    next: u64,
    /// Polls in a row that found it missing.
    misses: u32,
}

/// Follows the change logs of every daemon under the root.
#[derive(Debug)]
pub struct Follower {
    store: Arc<dyn ObjectStore>,
    index: Arc<Index>,
    metrics: Metrics,
    /// Daemons followed, by id. Locked for a whole poll, so polls never overlap
    /// (a log object is applied exactly once).
    daemons: tokio::sync::Mutex<BTreeMap<String, Position>>,
}

/// What one poll did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PollReport {
    pub new_daemons: usize,
    pub objects: usize,
}

impl Follower {
    pub fn new(store: Arc<dyn ObjectStore>, index: Arc<Index>, metrics: Metrics) -> Arc<Self> {
        Arc::new(Self {
            store,
            index,
            metrics,
            daemons: tokio::sync::Mutex::new(BTreeMap::new()),
        })
    }

    /// The index the logs are applied to.
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// Reads new log objects of every known daemon, and loads daemons that
    /// appeared since the last poll. The first poll loads everything.
    pub async fn poll(&self) -> Result<PollReport, ChangeLogError> {
        let mut daemons = self.daemons.lock().await;
        let mut report = PollReport::default();
        let found = self.discover().await?;
        let new: Vec<String> = found
            .into_iter()
            .filter(|d| !daemons.contains_key(d))
            .collect();
        report.new_daemons = new.len();
        let loaded = per_daemon(new, |d| async move {
            let r = self.load(&d).await;
            (d, r)
        })
        .await;
        let mut first_error = None;
        for (daemon, r) in loaded {
            match r {
                Ok(Some((position, objects))) => {
                    report.objects += objects;
                    daemons.insert(daemon, position);
                }
                // No checkpoint yet: tried again at the next poll.
                Ok(None) => report.new_daemons -= 1,
                Err(e) => {
                    tracing::warn!(daemon = %daemon, error = %e, "cannot load a daemon's change log yet");
                    first_error.get_or_insert(e);
                }
            }
        }
        let known: Vec<(String, Position)> = daemons.iter().map(|(d, p)| (d.clone(), *p)).collect();
        let followed = per_daemon(known, |(d, p)| async move {
            let r = self.follow(&d, p).await;
            (d, r)
        })
        .await;
        let mut fell_behind = None;
        for (daemon, r) in followed {
            match r {
                Ok((position, objects)) => {
                    report.objects += objects;
                    daemons.insert(daemon, position);
                }
                Err((position, e @ ChangeLogError::FellBehind { .. })) => {
                    daemons.insert(daemon, position);
                    fell_behind = Some(e);
                }
                Err((position, e)) => {
                    daemons.insert(daemon.clone(), position);
                    tracing::warn!(daemon = %daemon, error = %e, "cannot follow a daemon's change log yet");
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = fell_behind {
            return Err(e);
        }
        self.metrics.reader_daemons.set(daemons.len() as i64);
        self.metrics
            .reader_log_objects
            .inc_by(report.objects as u64);
        match first_error {
            // A daemon that cannot be read now is retried at the next poll; the
            // others are served meanwhile.
            Some(e) if report.objects == 0 && report.new_daemons == 0 => Err(e),
            _ => Ok(report),
        }
    }

    /// The daemons with a change log under the root: one LIST of `_mboxd/`.
    async fn discover(&self) -> Result<BTreeSet<String>, ChangeLogError> {
        let prefix = Path::from(PREFIX);
        let listed = self
            .store
            .list_with_delimiter(Some(&prefix))
            .await
            .map_err(ChangeLogError::store("listing", &prefix))?;
        Ok(listed
            .common_prefixes
            .iter()
            .filter_map(|p| p.filename().map(str::to_owned))
            .collect())
    }

    /// Loads one daemon's log: its latest checkpoint, then the log objects after
    /// it. Returns where to go on from and how many objects were applied; `None`
    /// while the daemon has no checkpoint yet (its first one is written before it
    /// relies on its log alone, see [`super::ship`]).
    async fn load(&self, daemon: &str) -> Result<Option<(Position, usize)>, ChangeLogError> {
        let keys = LogKeys::new(daemon);
        let folder = keys.folder();
        let listed: Vec<_> = self
            .store
            .list(Some(&folder))
            .try_collect()
            .await
            .map_err(ChangeLogError::store("listing", &folder))?;
        let mut checkpoints = Vec::new();
        let mut logs = BTreeSet::new();
        for meta in &listed {
            match parse_key(&meta.location) {
                Some((d, LogKey::Checkpoint(n))) if d == daemon => checkpoints.push(n),
                Some((d, LogKey::Log(n))) if d == daemon => {
                    logs.insert(n);
                }
                _ => {}
            }
        }
        let Some(&c) = checkpoints.iter().max() else {
            return Ok(None);
        };
        let next = {
            {
                let key = keys.checkpoint(c);
                let bytes = self.get(&key).await?.ok_or_else(|| ChangeLogError::Store {
                    action: "reading",
                    key: key.to_string(),
                    source: Box::new(object_store::Error::NotFound {
                        path: key.to_string(),
                        source: "deleted after it was listed".into(),
                    }),
                })?;
                let checkpoint: CheckpointObject = decode(&key, &bytes)?;
                let index = Arc::clone(&self.index);
                blocking(move || index.apply_checkpoint(&checkpoint.state)).await?;
                c + 1
            }
        };
        // The listed objects from `next` on, as long as there is no gap (the rest
        // is read by polling).
        let mut wanted = Vec::new();
        let mut n = next;
        while logs.contains(&n) {
            wanted.push(n);
            n += 1;
        }
        let (position, objects) = self.read_logs(&keys, next, wanted).await?;
        Ok(Some((position, 1 + objects)))
    }

    /// Reads and applies `wanted` log objects (consecutive from `next`), fetched
    /// several at a time and applied in order.
    async fn read_logs(
        &self,
        keys: &LogKeys,
        next: u64,
        wanted: Vec<u64>,
    ) -> Result<(Position, usize), ChangeLogError> {
        let mut position = Position { next, misses: 0 };
        let mut fetched = futures::stream::iter(wanted)
            .map(|n| {
                let key = keys.log(n);
                async move { (n, self.get(&key).await.map(|b| (key, b))) }
            })
            .buffered(FETCH_CONCURRENCY);
        let mut applied = 0;
        while let Some((n, r)) = fetched.next().await {
            let Some(bytes) = r.map(|(key, b)| b.map(|b| (key, b)))? else {
                break;
            };
            self.apply(n, &bytes.0, &bytes.1).await?;
            position.next = n + 1;
            applied += 1;
        }
        Ok((position, applied))
    }

    /// Reads the daemon's next log objects until one is not there yet.
    async fn follow(
        &self,
        daemon: &str,
        mut position: Position,
    ) -> Result<(Position, usize), (Position, ChangeLogError)> {
        let keys = LogKeys::new(daemon);
        let mut applied = 0;
        loop {
            // No log object has the last number (see `parse_key`).
            if position.next == u64::MAX {
                return Ok((position, applied));
            }
            let key = keys.log(position.next);
            match self.get(&key).await {
                Ok(Some(bytes)) => {
                    if let Err(e) = self.apply(position.next, &key, &bytes).await {
                        return Err((position, e));
                    }
                    position.next += 1;
                    position.misses = 0;
                    applied += 1;
                }
                Ok(None) if applied > 0 => return Ok((position, applied)),
                Ok(None) => {
                    position.misses = position.misses.saturating_add(1);
                    if position.misses.is_multiple_of(GAP_CHECK_MISSES) {
                        match self.latest_checkpoint(&keys).await {
                            Ok(Some(checkpoint)) if checkpoint >= position.next => {
                                let e = ChangeLogError::FellBehind {
                                    daemon: daemon.to_owned(),
                                    next: position.next,
                                    checkpoint,
                                };
                                return Err((position, e));
                            }
                            Ok(_) => {}
                            Err(e) => return Err((position, e)),
                        }
                    }
                    return Ok((position, 0));
                }
                Err(e) => return Err((position, e)),
            }
        }
    }

    /// The number of the daemon's latest checkpoint, if it has one.
    async fn latest_checkpoint(&self, keys: &LogKeys) -> Result<Option<u64>, ChangeLogError> {
        let folder = keys.checkpoints();
        let listed: Vec<_> = self
            .store
            .list(Some(&folder))
            .try_collect()
            .await
            .map_err(ChangeLogError::store("listing", &folder))?;
        Ok(listed
            .iter()
            .filter_map(|meta| match parse_key(&meta.location) {
                Some((d, LogKey::Checkpoint(n))) if d == keys.daemon() => Some(n),
                _ => None,
            })
            .max())
    }

    async fn apply(&self, n: u64, key: &Path, bytes: &[u8]) -> Result<(), ChangeLogError> {
        let object: LogObject = decode(key, bytes)?;
        if object.log != n {
            tracing::warn!(key = %key, log = object.log, "a log object names another number; applying it as {n}");
        }
        let index = Arc::clone(&self.index);
        blocking(move || index.apply(&object.changes)).await?;
        Ok(())
    }

    /// The object's bytes, or `None` if it does not exist (yet).
    async fn get(&self, key: &Path) -> Result<Option<bytes::Bytes>, ChangeLogError> {
        let got = match self.store.get(key).await {
            Ok(got) => got,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(ChangeLogError::store("reading", key)(e)),
        };
        got.bytes()
            .await
            .map(Some)
            .map_err(ChangeLogError::store("reading", key))
    }

    /// Polls every `interval` until stopped. Errors are retried at the next poll,
    /// except [`ChangeLogError::FellBehind`], which ends the loop and goes to
    /// `fatal`: the reader's index can no longer be brought up to date.
    pub fn start(
        self: &Arc<Self>,
        interval: Duration,
        fatal: tokio::sync::oneshot::Sender<ChangeLogError>,
    ) -> FollowLoop {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let follower = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(interval) => {}
                }
                match follower.poll().await {
                    Ok(_) => {}
                    Err(e @ ChangeLogError::FellBehind { .. }) => {
                        let _ = fatal.send(e);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "polling the change logs failed; retrying");
                    }
                }
            }
        });
        FollowLoop { stop, task }
    }
}

/// `f` of every item, `DAEMON_CONCURRENCY` at once, in completion order.
async fn per_daemon<I, T, F: std::future::Future<Output = T>>(
    items: Vec<I>,
    f: impl FnMut(I) -> F,
) -> Vec<T> {
    futures::stream::iter(items)
        .map(f)
        .buffer_unordered(DAEMON_CONCURRENCY)
        .collect()
        .await
}

/// Runs index work on the blocking pool.
async fn blocking(
    f: impl FnOnce() -> Result<(), IndexError> + Send + 'static,
) -> Result<(), ChangeLogError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => Ok(r?),
        Err(e) => Err(ChangeLogError::Index(IndexError::Task(e.to_string()))),
    }
}

/// The running poll loop.
#[derive(Debug)]
pub struct FollowLoop {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl FollowLoop {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::super::FORMAT;
    use super::*;
    use crate::index::Checkpoint;
    use object_store::PutPayload;
    use object_store::memory::InMemory;

    /// Objects numbered at the very end of the range (another process can name
    /// them anything) are not followed past the end: no overflow, no panic.
    #[tokio::test]
    async fn objects_numbered_at_the_end_of_the_range_are_not_followed_past_it() {
        let store = Arc::new(InMemory::new());
        let keys = LogKeys::new("d");
        fn json(v: &impl serde::Serialize) -> PutPayload {
            PutPayload::from(serde_json::to_vec(v).unwrap())
        }
        let checkpoint = CheckpointObject {
            format: FORMAT,
            daemon: "d".into(),
            log: u64::MAX - 1,
            state: Checkpoint::default(),
        };
        let at = keys.checkpoint(u64::MAX - 1);
        store.put(&at, json(&checkpoint)).await.unwrap();
        for log in [u64::MAX - 1, u64::MAX] {
            let object = LogObject {
                format: FORMAT,
                daemon: "d".into(),
                log,
                changes: Vec::new(),
            };
            store.put(&keys.log(log), json(&object)).await.unwrap();
        }
        let index = Arc::new(Index::open_in_memory().unwrap());
        let follower = Follower::new(store, index, Metrics::new());
        let first = follower.poll().await.unwrap();
        assert_eq!((first.new_daemons, first.objects), (1, 1));
        let again = follower.poll().await.unwrap();
        assert_eq!(again.objects, 0);
    }
}
