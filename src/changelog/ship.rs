//! The writer side: ships the index's outbox into the storage root as log
//! objects, and writes checkpoints.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use super::{ChangeLogError, CheckpointObject, FORMAT, LogKeys, LogObject, encode};
use crate::index::{Index, ShipPlan};
use crate::telemetry::{ChangeLogKind, ChangeLogLabel, Metrics};

/// How a writer ships its change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShipSettings {
    /// How often the outbox is checked for changes to ship.
    pub interval: Duration,
    /// Most changes in one log object.
    pub max_changes_per_object: usize,
    /// A checkpoint is written once this many log objects followed the last one
    /// and they add up to a quarter of its size (so checkpoints cost at most
    /// about four times what the log itself does)...
    pub checkpoint_min_objects: u64,
    /// ...or once this many did, whatever their size (so a reader starting up
    /// reads at most this many log objects per daemon).
    pub checkpoint_max_objects: u64,
}

impl Default for ShipSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_millis(200),
            max_changes_per_object: 1000,
            checkpoint_min_objects: 100,
            checkpoint_max_objects: 1000,
        }
    }
}

/// Ships one daemon's change log. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Shipper {
    store: Arc<dyn ObjectStore>,
    index: Arc<Index>,
    keys: LogKeys,
    settings: ShipSettings,
    metrics: Metrics,
    /// One shipping pass at a time (the loop, a flush at shutdown).
    pass: tokio::sync::Mutex<()>,
}

impl Shipper {
    /// A shipper for `daemon`'s log; the index's change log must be on.
    pub fn new(
        store: Arc<dyn ObjectStore>,
        index: Arc<Index>,
        daemon: &str,
        settings: ShipSettings,
        metrics: Metrics,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            index,
            keys: LogKeys::new(daemon),
            settings,
            metrics,
            pass: tokio::sync::Mutex::new(()),
        })
    }

    /// Runs an index call on the blocking pool.
    async fn index<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Index) -> Result<T, crate::index::IndexError> + Send + 'static,
    ) -> Result<T, ChangeLogError> {
        let index = Arc::clone(&self.index);
        match tokio::task::spawn_blocking(move || f(&index)).await {
            Ok(r) => Ok(r?),
            Err(e) => Err(ChangeLogError::Index(crate::index::IndexError::Task(
                e.to_string(),
            ))),
        }
    }

    /// Ships every change that is ready, then writes a checkpoint if one is due.
    /// Returns how many changes were shipped.
    pub async fn ship_once(&self) -> Result<usize, ChangeLogError> {
        let _pass = self.pass.lock().await;
        let mut shipped = 0;
        // The first checkpoint (or the one after the log was off) before any log
        // object a reader could take for the whole story.
        if self.index(|i| i.ship_state()).await?.checkpoint_needed {
            self.checkpoint_if_due().await?;
        }
        // A log object planned before a crash or a failed write: the same number
        // with the same entries, so a reader that already read it sees no change.
        if let Some(plan) = self.index(|i| i.ship_plan()).await? {
            let entries = self
                .index(move |i| i.entries_through(plan.last_entry))
                .await?;
            shipped += entries.len();
            self.write_log(plan, entries.into_iter().map(|e| e.change).collect())
                .await?;
        }
        loop {
            let max = self.settings.max_changes_per_object;
            let entries = self.index(move |i| i.shippable(max)).await?;
            let Some(last) = entries.last() else { break };
            let plan = ShipPlan {
                log: self.index(|i| i.ship_state()).await?.shipped_log + 1,
                last_entry: last.entry,
            };
            self.index(move |i| i.plan_ship(plan)).await?;
            shipped += entries.len();
            self.write_log(plan, entries.into_iter().map(|e| e.change).collect())
                .await?;
        }
        self.checkpoint_if_due().await?;
        Ok(shipped)
    }

    async fn write_log(
        &self,
        plan: ShipPlan,
        changes: Vec<crate::index::Change>,
    ) -> Result<(), ChangeLogError> {
        let n = changes.len() as u64;
        let bytes = encode(&LogObject {
            format: FORMAT,
            daemon: self.keys.daemon().to_owned(),
            log: plan.log,
            changes,
        });
        let size = bytes.len() as u64;
        let key = self.keys.log(plan.log);
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(ChangeLogError::store("writing", &key))?;
        self.index(move |i| i.shipped(plan, size)).await?;
        self.metrics
            .changelog_objects
            .get_or_create(&ChangeLogLabel {
                kind: ChangeLogKind::log,
            })
            .inc();
        self.metrics.changelog_changes.inc_by(n);
        tracing::debug!(
            log = plan.log,
            changes = n,
            bytes = size,
            "change log shipped"
        );
        Ok(())
    }

    /// Writes a checkpoint when one is due and the outbox is empty, then deletes
    /// what the checkpoint before it made unnecessary.
    async fn checkpoint_if_due(&self) -> Result<(), ChangeLogError> {
        let before = self.index(|i| i.ship_state()).await?;
        let since = before
            .shipped_log
            .saturating_sub(before.checkpoint.unwrap_or(0));
        let s = &self.settings;
        let due = before.checkpoint_needed
            || before.checkpoint.is_none()
            || since >= s.checkpoint_max_objects
            || (since >= s.checkpoint_min_objects
                && before.log_bytes_since.saturating_mul(4) >= before.checkpoint_bytes);
        if !due || before.checkpoint == Some(before.shipped_log) && !before.checkpoint_needed {
            return Ok(());
        }
        let Some((log, state)) = self.index(|i| i.checkpoint_state()).await? else {
            return Ok(());
        };
        let bytes = encode(&CheckpointObject {
            format: FORMAT,
            daemon: self.keys.daemon().to_owned(),
            log,
            state,
        });
        let size = bytes.len() as u64;
        let key = self.keys.checkpoint(log);
        self.store
            .put(&key, PutPayload::from(bytes))
            .await
            .map_err(ChangeLogError::store("writing", &key))?;
        self.index(move |i| i.checkpoint_written(log, size)).await?;
        self.metrics
            .changelog_objects
            .get_or_create(&ChangeLogLabel {
                kind: ChangeLogKind::checkpoint,
            })
            .inc();
        tracing::debug!(log, bytes = size, "change log checkpoint written");
        // Keep the last two checkpoints and the logs after the older one, so a
        // reader that started from it is not left with a gap.
        if let Some(previous) = before.checkpoint.filter(|&p| p != log) {
            let from = before.previous_checkpoint.unwrap_or(0);
            let mut doomed: Vec<object_store::path::Path> =
                ((from + 1)..=previous).map(|n| self.keys.log(n)).collect();
            if let Some(old) = before.previous_checkpoint.filter(|&c| c != previous) {
                doomed.push(self.keys.checkpoint(old));
            }
            self.delete(doomed).await;
        }
        Ok(())
    }

    /// Deletes objects no longer needed; a failure only leaves them behind.
    async fn delete(&self, keys: Vec<object_store::path::Path>) {
        let stream = futures::stream::iter(keys.into_iter().map(Ok)).boxed();
        let mut results = self.store.delete_stream(stream);
        while let Some(r) = results.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "cannot delete an old change-log object; it stays");
                }
            }
        }
    }

    /// Ships until the outbox is empty or `timeout` passes; returns whether it is
    /// empty (for shutdown and `mboxd compact`).
    pub async fn flush(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Err(e) = self.ship_once().await {
                tracing::warn!(error = %e, "shipping the change log failed");
            }
            if self.index(|i| i.outbox_is_empty()).await.unwrap_or(false) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(self.settings.interval).await;
        }
    }

    /// Ships every `interval` until stopped.
    pub fn start(self: &Arc<Self>) -> ShipLoop {
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let shipper = Arc::clone(self);
        let task = tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let wait = if failures == 0 {
                    shipper.settings.interval
                } else {
                    // Back off while the store fails, up to 30 s.
                    (shipper.settings.interval * 2u32.saturating_pow(failures.min(8)))
                        .min(Duration::from_secs(30))
                };
                tokio::select! {
                    _ = &mut stopped => return,
                    () = tokio::time::sleep(wait) => {}
                }
                match shipper.ship_once().await {
                    Ok(_) => failures = 0,
                    Err(e) => {
                        failures += 1;
                        tracing::warn!(error = %e, failures, "shipping the change log failed; retrying");
                    }
                }
            }
        });
        ShipLoop { stop, task }
    }
}

/// The running ship loop.
#[derive(Debug)]
pub struct ShipLoop {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl ShipLoop {
    /// Stops the loop after its current pass.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}
