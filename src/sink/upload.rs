//! The spool and its uploader, for S3 storage roots.
//!
//! Files are published into the local spool first (see [`super::LocalSink`]) and
//! recorded in the index as spooled. The [`Uploader`] copies each one to the
//! remote store (one PUT, or a multipart upload for large files), with bounded
//! concurrency, retrying with jittered exponential backoff for as long as the
//! store keeps failing. Only after an upload is confirmed is the spooled entry
//! removed from the index, and only after that the local file. An S3 object is
//! visible only once complete (a finished PUT or a completed multipart upload).
//!
//! The spool's size is tracked in [`Spool`]; when it reaches its bound, ingest
//! pushes back (see [`crate::ingest`]) instead of filling the disk.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};
use rand::Rng;
use tokio::io::AsyncReadExt;
use tokio::sync::{Notify, Semaphore, mpsc};

use super::{LocalSink, SinkError, io_err, object_path, remote_err};
use crate::config::Storage;
use crate::index::Index;
use crate::paths::ObjectKey;
use crate::telemetry::Metrics;

/// Bytes and files waiting in the spool, against its bound.
#[derive(Debug)]
pub struct Spool {
    bytes: AtomicU64,
    files: AtomicU64,
    limit: u64,
    changed: Notify,
}

impl Spool {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            bytes: AtomicU64::new(0),
            files: AtomicU64::new(0),
            limit,
            changed: Notify::new(),
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn files(&self) -> u64 {
        self.files.load(Ordering::Relaxed)
    }

    /// Whether new data should wait for uploads to make room.
    pub fn is_full(&self) -> bool {
        self.bytes() >= self.limit
    }

    /// A future that completes at the next change; create it before checking the
    /// state it waits on, so a change in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::AcqRel);
        self.files.fetch_add(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    fn remove(&self, bytes: u64) {
        self.bytes.fetch_sub(bytes, Ordering::AcqRel);
        self.files.fetch_sub(1, Ordering::AcqRel);
        self.changed.notify_waiters();
    }

    /// Waits until every spooled file is uploaded, or `timeout` passes; returns
    /// whether the spool is empty.
    pub async fn wait_empty(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let changed = self.changed();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.files() == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return self.files() == 0;
            }
        }
    }
}

/// A spooled file to upload.
#[derive(Debug)]
struct Job {
    key: ObjectKey,
    bytes: u64,
}

/// Upload settings and handles every upload task shares.
#[derive(Debug)]
struct Shared {
    store: Arc<dyn ObjectStore>,
    spool_dir: LocalSink,
    index: Arc<Index>,
    spool: Arc<Spool>,
    metrics: Metrics,
    multipart_threshold: u64,
    part_bytes: usize,
    max_backoff: Duration,
}

/// Uploads spooled files. Cheap to share behind an `Arc`; [`Uploader::enqueue`]
/// may be called from any thread.
#[derive(Debug)]
pub struct Uploader {
    tx: mpsc::UnboundedSender<Job>,
    spool: Arc<Spool>,
}

impl Uploader {
    /// Starts the upload loop on the current runtime, first queueing the files a
    /// previous run left in the spool (`pending`, from [`Index::spooled`]).
    pub fn start(
        store: Arc<dyn ObjectStore>,
        spool_dir: LocalSink,
        index: Arc<Index>,
        settings: &Storage,
        metrics: Metrics,
        pending: Vec<(String, u64)>,
    ) -> (Arc<Self>, UploadLoop) {
        let spool = Spool::new(settings.spool_max_bytes);
        let (tx, rx) = mpsc::unbounded_channel();
        let uploader = Arc::new(Self {
            tx,
            spool: Arc::clone(&spool),
        });
        for (key, bytes) in pending {
            uploader.enqueue(ObjectKey::from_manifest(key), bytes);
        }
        let shared = Arc::new(Shared {
            store,
            spool_dir,
            index,
            spool,
            metrics,
            multipart_threshold: settings.multipart_threshold_bytes,
            part_bytes: settings.multipart_part_bytes,
            max_backoff: settings.max_upload_backoff,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(run(shared, rx, settings.upload_concurrency, stopped));
        (uploader, UploadLoop { stop, task })
    }

    /// Queues a file just published into the spool (and recorded as spooled).
    pub fn enqueue(&self, key: ObjectKey, bytes: u64) {
        self.spool.add(bytes);
        // The loop only stops with the runtime, when nothing is uploaded any more;
        // the file stays spooled and is uploaded on the next start.
        let _ = self.tx.send(Job { key, bytes });
    }

    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }
}

/// The running upload loop; [`UploadLoop::stop`] ends it.
#[derive(Debug)]
pub struct UploadLoop {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl UploadLoop {
    /// Stops uploading and waits until no upload task holds the index any more.
    /// Files not yet confirmed stay spooled, for the next start.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::UnboundedReceiver<Job>,
    concurrency: usize,
    mut stopped: tokio::sync::oneshot::Receiver<()>,
) {
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut uploads = tokio::task::JoinSet::new();
    loop {
        let job = tokio::select! {
            _ = &mut stopped => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
            // Reap finished uploads so the set stays small.
            Some(_) = uploads.join_next(), if !uploads.is_empty() => continue,
        };
        let slot = tokio::select! {
            _ = &mut stopped => break,
            slot = Arc::clone(&slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let shared = Arc::clone(&shared);
        uploads.spawn(async move {
            upload_until_confirmed(&shared, &job).await;
            drop(slot);
        });
    }
    uploads.shutdown().await;
}

/// Uploads one file, retrying until the store confirms it, then forgets it.
async fn upload_until_confirmed(shared: &Shared, job: &Job) {
    let m = &shared.metrics;
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        match upload_once(shared, job).await {
            Ok(()) => {
                m.uploads.inc();
                m.uploaded_bytes.inc_by(job.bytes);
                m.upload_seconds.observe(started.elapsed().as_secs_f64());
                tracing::debug!(file = %job.key, bytes = job.bytes, "uploaded");
                break;
            }
            Err(UploadError::Missing) => {
                tracing::error!(file = %job.key, "spooled file is missing locally and remotely; its rows are lost");
                break;
            }
            Err(UploadError::Sink(e)) => {
                m.upload_errors.inc();
                let pause = jittered(backoff);
                tracing::warn!(file = %job.key, error = %e, retry_in_ms = pause.as_millis() as u64, "upload failed; retrying");
                tokio::time::sleep(pause).await;
                m.upload_retries.inc();
                backoff = (backoff * 2).min(shared.max_backoff);
            }
        }
    }
    // Confirmed: forget the spooled entry, then the local copy. A crash in between
    // leaves a local file no entry names, which the next start deletes.
    loop {
        let index = Arc::clone(&shared.index);
        let key = job.key.as_str().to_owned();
        match tokio::task::spawn_blocking(move || index.mark_uploaded(&key)).await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => {
                tracing::error!(file = %job.key, error = %e, "recording an upload failed; retrying")
            }
            Err(e) => {
                tracing::error!(file = %job.key, error = %e, "recording an upload failed; retrying")
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    shared.spool_dir.remove(&job.key);
    shared.spool.remove(job.bytes);
}

#[derive(Debug)]
enum UploadError {
    Sink(SinkError),
    /// The spooled file is gone and the store does not have it either.
    Missing,
}

impl From<SinkError> for UploadError {
    fn from(e: SinkError) -> Self {
        Self::Sink(e)
    }
}

fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(rand::rng().random_range(0.5..1.0))
}

async fn upload_once(shared: &Shared, job: &Job) -> Result<(), UploadError> {
    let location = object_path(&job.key)?;
    let path = shared.spool_dir.path_of(&job.key);
    let file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Only possible if something outside mboxd removed it; if the store
            // has it (an earlier run uploaded it), it is done.
            return match shared.store.head(&location).await {
                Ok(_) => Ok(()),
                Err(object_store::Error::NotFound { .. }) => Err(UploadError::Missing),
                Err(e) => {
                    Err(remote_err("checking", job.key.as_str(), shared.store.as_ref())(e).into())
                }
            };
        }
        Err(e) => return Err(io_err("opening spooled file", &path)(e).into()),
    };
    put_file(
        shared.store.as_ref(),
        &job.key,
        file,
        job.bytes,
        shared.multipart_threshold,
        shared.part_bytes,
        &path,
    )
    .await
    .map_err(UploadError::from)
}

/// Puts a local file's bytes as `key`: one PUT below `threshold`, else a
/// multipart upload in parts of `part_bytes`, a few in flight. The object is
/// visible only once whole.
pub async fn put_file(
    store: &dyn ObjectStore,
    key: &ObjectKey,
    mut file: tokio::fs::File,
    bytes: u64,
    threshold: u64,
    part_bytes: usize,
    path: &std::path::Path,
) -> Result<(), SinkError> {
    let location = object_path(key)?;
    let remote = |action| remote_err(action, key.as_str(), store);
    let local = |action| io_err(action, path);
    if bytes < threshold {
        let mut data = Vec::with_capacity(bytes as usize);
        file.read_to_end(&mut data)
            .await
            .map_err(local("reading spooled file"))?;
        store
            .put(&location, PutPayload::from(data))
            .await
            .map_err(remote("uploading"))?;
        return Ok(());
    }
    let upload = store
        .put_multipart(&location)
        .await
        .map_err(remote("starting multipart upload of"))?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, part_bytes);
    let streamed: Result<(), SinkError> = async {
        loop {
            let mut part = Vec::with_capacity(part_bytes);
            let read = (&mut file)
                .take(part_bytes as u64)
                .read_to_end(&mut part)
                .await
                .map_err(local("reading spooled file"))?;
            if read == 0 {
                return Ok(());
            }
            writer
                .wait_for_capacity(Storage::PARTS_IN_FLIGHT)
                .await
                .map_err(remote("uploading a part of"))?;
            writer.put(Bytes::from(part));
        }
    }
    .await;
    match streamed {
        Ok(()) => {
            writer
                .finish()
                .await
                .map_err(remote("completing multipart upload of"))?;
            Ok(())
        }
        Err(e) => {
            // Abandoned parts are never visible; abort to free them now.
            let _ = writer.abort().await;
            Err(e)
        }
    }
}
