//! Publication of finished files under the storage root. A file is written to a
//! private temporary folder, fsynced, then renamed into its partition, so a reader
//! never sees a partial file.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use crate::paths::ObjectKey;

/// Errors publishing a file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SinkError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SinkError + 'a {
    move |source| SinkError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// A local-folder storage root.
#[derive(Debug, Clone)]
pub struct LocalSink {
    root: PathBuf,
    staging: PathBuf,
}

/// A file being written, not yet visible to readers.
#[derive(Debug)]
pub struct StagedFile {
    pub file: File,
    path: PathBuf,
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

    /// Makes a staged file durable and visible as `key`; returns its size.
    pub fn publish(&self, staged: StagedFile, key: &ObjectKey) -> Result<u64, SinkError> {
        let StagedFile { file, path } = staged;
        file.sync_all().map_err(io_err("syncing", &path))?;
        let size = file
            .metadata()
            .map_err(io_err("reading size of", &path))?
            .len();
        drop(file);
        let target = self.path_of(key);
        let dir = target.parent().unwrap_or(&self.root);
        std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
        std::fs::rename(&path, &target).map_err(io_err("renaming into", &target))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("syncing", dir))?;
        Ok(size)
    }

    /// Removes a staged file that will not be published.
    pub fn discard(&self, staged: StagedFile) {
        drop(staged.file);
        let _ = std::fs::remove_file(&staged.path);
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
