//! Where finished files go. A file is written to a private staging folder,
//! fsynced, then renamed into its partition under a local root, so a reader never
//! sees a partial file. That local root is the storage root itself (the data
//! folder), or, with an S3 root, the spool that [`upload::Uploader`] drains into
//! the bucket, through the client [`s3::S3Settings`] configures.

pub mod counting;
pub mod s3;
pub mod upload;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::{ObjectStore, ObjectStoreExt};

use crate::paths::{ObjectKey, Table};

/// Errors publishing or reading a file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("{action} {key} in {store}: {source}")]
    Remote {
        action: &'static str,
        key: String,
        store: String,
        source: Box<object_store::Error>,
    },
    #[error("object key {key}: {source}")]
    Key {
        key: String,
        source: object_store::path::Error,
    },
}

impl SinkError {
    /// Whether the file or object does not exist (any more).
    pub fn is_not_found(&self) -> bool {
        match self {
            SinkError::Io { source, .. } => source.kind() == io::ErrorKind::NotFound,
            SinkError::Remote { source, .. } => {
                matches!(**source, object_store::Error::NotFound { .. })
            }
            SinkError::Key { .. } => false,
        }
    }
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> SinkError + 'a {
    move |source| SinkError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// The error of `action` on `key` in `store`.
pub(crate) fn remote_err(
    action: &'static str,
    key: &str,
    store: &dyn ObjectStore,
) -> impl FnOnce(object_store::Error) -> SinkError {
    let (key, store) = (key.to_owned(), store.to_string());
    move |source| SinkError::Remote {
        action,
        key,
        store,
        source: Box::new(source),
    }
}

/// Deletes `key` from `store`; an object already gone is fine.
pub(crate) async fn delete_remote(
    store: &dyn ObjectStore,
    key: &ObjectKey,
) -> Result<(), SinkError> {
    match store.delete(&object_path(key)?).await {
        Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
        Err(e) => Err(remote_err("deleting", key.as_str(), store)(e)),
    }
}

/// A local-folder storage root.
#[derive(Debug, Clone)]
pub struct LocalSink {
    root: PathBuf,
    staging: PathBuf,
}

/// A [`LocalSink::try_publish`] that failed: why, and the staged file when it can
/// be published again.
#[derive(Debug)]
pub struct PublishFailed {
    pub error: SinkError,
    pub staged: Option<StagedFile>,
}

/// A file being written, not yet visible to readers.
#[derive(Debug)]
pub struct StagedFile {
    pub file: File,
    path: PathBuf,
}

impl StagedFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl LocalSink {
    /// Opens the root, creating it, and clears files a crash left half-written in the
    /// staging folder (they were never published, so nothing is lost).
    pub fn open(root: &Path, staging: &Path) -> Result<Self, SinkError> {
        std::fs::create_dir_all(root).map_err(io_err("creating", root))?;
        if staging.exists() {
            std::fs::remove_dir_all(staging).map_err(io_err("clearing", staging))?;
        }
        std::fs::create_dir_all(staging).map_err(io_err("creating", staging))?;
        Ok(Self {
            root: root.to_owned(),
            staging: staging.to_owned(),
        })
    }

    /// The full path of an object.
    pub fn path_of(&self, key: &ObjectKey) -> PathBuf {
        self.root.join(key.to_path())
    }

    /// A new file in the staging folder.
    pub fn stage(&self) -> Result<StagedFile, SinkError> {
        let path = self
            .staging
            .join(format!("{}.tmp", uuid::Uuid::now_v7().simple()));
        let file = File::create(&path).map_err(io_err("creating", &path))?;
        Ok(StagedFile { file, path })
    }

    /// Makes a staged file durable and visible as `key`; returns its size. A
    /// failure drops the staged file; see [`LocalSink::try_publish`] to keep it.
    pub fn publish(&self, staged: StagedFile, key: &ObjectKey) -> Result<u64, SinkError> {
        self.try_publish(staged, key).map_err(|failed| failed.error)
    }

    /// [`LocalSink::publish`], handing the staged file back when it failed before
    /// the rename with the file synced (a folder that could not be created, a
    /// rename refused), so the caller can try again. A file that could not be
    /// synced is removed: its contents may not be on disk whatever a later sync
    /// says.
    pub fn try_publish(
        &self,
        staged: StagedFile,
        key: &ObjectKey,
    ) -> Result<u64, Box<PublishFailed>> {
        let synced = (staged
            .file
            .sync_all()
            .map_err(io_err("syncing", &staged.path)))
        .and_then(|()| (staged.file.metadata()).map_err(io_err("reading size of", &staged.path)));
        let size = match synced {
            Ok(metadata) => metadata.len(),
            Err(error) => {
                self.discard(staged);
                return Err(Box::new(PublishFailed {
                    error,
                    staged: None,
                }));
            }
        };
        let target = self.path_of(key);
        let dir = target.parent().unwrap_or(&self.root);
        let placed = std::fs::create_dir_all(dir)
            .map_err(io_err("creating", dir))
            .and_then(|()| {
                std::fs::rename(&staged.path, &target).map_err(io_err("renaming into", &target))
            });
        if let Err(error) = placed {
            return Err(Box::new(PublishFailed {
                error,
                staged: Some(staged),
            }));
        }
        drop(staged);
        sync_dir(dir).map_err(|error| {
            Box::new(PublishFailed {
                error,
                staged: None,
            })
        })?;
        Ok(size)
    }

    /// Whether `key` is in place, its folder entry made durable: after a
    /// [`LocalSink::try_publish`] that failed without handing the file back.
    pub fn is_placed(&self, key: &ObjectKey) -> Result<bool, SinkError> {
        let target = self.path_of(key);
        if !target.exists() {
            return Ok(false);
        }
        sync_dir(target.parent().unwrap_or(&self.root))?;
        Ok(true)
    }

    /// Removes a published file (an uploaded spool file); a missing one is fine.
    pub fn remove(&self, key: &ObjectKey) {
        let path = self.path_of(key);
        if let Err(e) = std::fs::remove_file(&path)
            && e.kind() != io::ErrorKind::NotFound
        {
            tracing::warn!(path = %path.display(), error = %e, "could not remove an uploaded spool file");
        }
    }

    /// Keys of every published file under the root (its table folders).
    pub fn published_keys(&self) -> Result<Vec<ObjectKey>, SinkError> {
        fn walk(dir: &Path, prefix: &str, out: &mut Vec<ObjectKey>) -> Result<(), SinkError> {
            let entries = match std::fs::read_dir(dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_err("listing", dir)(e)),
            };
            for entry in entries {
                let entry = entry.map_err(io_err("listing", dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let key = format!("{prefix}/{name}");
                if entry.file_type().map_err(io_err("listing", dir))?.is_dir() {
                    walk(&entry.path(), &key, out)?;
                } else {
                    out.push(ObjectKey::from_manifest(key));
                }
            }
            Ok(())
        }
        let mut out = Vec::new();
        for table in [Table::Metrics, Table::Events] {
            let name = table.dir_name();
            walk(&self.root.join(name), name, &mut out)?;
        }
        Ok(out)
    }

    /// Removes a staged file that will not be published.
    pub fn discard(&self, staged: StagedFile) {
        drop(staged.file);
        let _ = std::fs::remove_file(&staged.path);
    }
}

/// Makes a folder's entries (a rename into it) durable.
fn sync_dir(dir: &Path) -> Result<(), SinkError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))
}

/// The location of `key` in an object store.
pub fn object_path(key: &ObjectKey) -> Result<object_store::path::Path, SinkError> {
    object_store::path::Path::parse(key.as_str()).map_err(|source| SinkError::Key {
        key: key.to_string(),
        source,
    })
}

/// The read side of the storage root: finds a published file wherever it is now
/// (the local root or spool, else the remote store).
#[derive(Debug, Clone)]
pub struct Files {
    /// `None` for a reader, which has no local root or spool.
    local: Option<LocalSink>,
    remote: Option<Remote>,
}

/// A remote store and the runtime its client runs on.
#[derive(Debug, Clone)]
pub struct Remote {
    pub store: Arc<dyn ObjectStore>,
    pub runtime: tokio::runtime::Handle,
}

/// A published file, for Parquet readers.
#[derive(Debug)]
pub enum FileData {
    Local(File),
    /// An uploaded file, read in ranges.
    Remote(RemoteObject),
}

/// Ranged GETs of one object in flight at once.
pub const PARALLEL_GETS: usize = 8;

/// An object in the remote store. Blocking: use it from a blocking thread.
#[derive(Debug)]
pub struct RemoteObject {
    remote: Remote,
    location: object_store::path::Path,
    key: String,
    size: u64,
}

impl RemoteObject {
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The bytes in `range`.
    pub fn get_range(&self, range: std::ops::Range<u64>) -> Result<Bytes, SinkError> {
        let Remote { store, runtime } = &self.remote;
        runtime
            .block_on(store.get_range(&self.location, range))
            .map_err(remote_err("reading", &self.key, store.as_ref()))
    }

    /// The bytes in each of `ranges`, one GET each, up to
    /// [`PARALLEL_GETS`] at once. Unlike `ObjectStore::get_ranges`, which joins
    /// ranges up to 1 MiB apart, it fetches exactly what it is asked for:
    /// callers merge nearby ranges themselves.
    pub fn get_ranges(&self, ranges: &[std::ops::Range<u64>]) -> Result<Vec<Bytes>, SinkError> {
        use futures::{StreamExt, TryStreamExt};
        let Remote { store, runtime } = &self.remote;
        let parts: Vec<Bytes> = runtime
            .block_on(
                futures::stream::iter(ranges.iter().cloned())
                    .map(|r| store.get_range(&self.location, r))
                    .buffered(PARALLEL_GETS)
                    .try_collect(),
            )
            .map_err(remote_err("reading", &self.key, store.as_ref()))?;
        // A store answers a range past an object's end with what there is.
        if let Some((r, _)) = ranges
            .iter()
            .zip(&parts)
            .find(|(r, b)| b.len() as u64 != r.end - r.start)
        {
            return Err(SinkError::Io {
                action: "reading",
                path: self.key.clone().into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "bytes {}..{} lie past the object's end (the manifest says {} bytes)",
                        r.start, r.end, self.size
                    ),
                ),
            });
        }
        Ok(parts)
    }

    /// `key` in `remote`, of `size` bytes.
    #[cfg(test)]
    pub(crate) fn new(remote: Remote, key: &ObjectKey, size: u64) -> Result<Self, SinkError> {
        Ok(Self {
            remote,
            location: object_path(key)?,
            key: key.to_string(),
            size,
        })
    }
}

impl Files {
    pub fn new(local: LocalSink, remote: Option<Remote>) -> Self {
        Self {
            local: Some(local),
            remote,
        }
    }

    /// Files read from the store only (a reader's).
    pub fn remote(remote: Remote) -> Self {
        Self {
            local: None,
            remote: Some(remote),
        }
    }

    fn open_remote(&self, key: &ObjectKey, size: u64) -> Result<Option<FileData>, SinkError> {
        Ok(match &self.remote {
            Some(remote) => Some(FileData::Remote(RemoteObject {
                remote: remote.clone(),
                location: object_path(key)?,
                key: key.to_string(),
                size,
            })),
            None => None,
        })
    }

    /// Opens a published file of `size` bytes. A spooled file is read locally; once
    /// uploaded (and deleted locally) it is read from the store.
    pub fn open(&self, key: &ObjectKey, size: u64) -> Result<FileData, SinkError> {
        let Some(local) = &self.local else {
            // Made by `Files::remote`, so there is a store to read from.
            return self.open_remote(key, size)?.ok_or_else(|| SinkError::Io {
                action: "opening",
                path: key.to_path(),
                source: io::ErrorKind::NotFound.into(),
            });
        };
        let path = local.path_of(key);
        match File::open(&path) {
            Ok(file) => Ok(FileData::Local(file)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => match self.open_remote(key, size)? {
                Some(data) => Ok(data),
                None => Err(io_err("opening", &path)(e)),
            },
            Err(e) => Err(io_err("opening", &path)(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn staged_files_appear_only_when_published() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let sink = LocalSink::open(&root, &dir.path().join("staging")).unwrap();
        let mut staged = sink.stage().unwrap();
        staged.file.write_all(b"hello").unwrap();
        let key = ObjectKey::from_manifest("metrics/namespace=a/date=2026-01-01/f.parquet".into());
        assert!(!sink.path_of(&key).exists());
        assert_eq!(sink.publish(staged, &key).unwrap(), 5);
        assert_eq!(std::fs::read(sink.path_of(&key)).unwrap(), b"hello");
        // Reopening clears leftovers in staging but keeps published files.
        let leftover = sink.stage().unwrap();
        drop(leftover);
        let sink = LocalSink::open(&root, &dir.path().join("staging")).unwrap();
        assert_eq!(
            std::fs::read_dir(dir.path().join("staging"))
                .unwrap()
                .count(),
            0
        );
        assert!(sink.path_of(&key).exists());
    }
}
