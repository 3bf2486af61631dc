//! The change log: how a reader (`mboxd serve --reader`) learns every daemon's
//! files, experiments, metadata and metric summaries from the storage root alone.
//!
//! ```text
//! <root>/_mboxd/<daemon-id>/log/<n:020>.json          changes n (1, 2, 3, ... no gaps)
//! <root>/_mboxd/<daemon-id>/checkpoint/<n:020>.json   the whole state after log n
//! ```
//!
//! `_mboxd/` sits beside `metrics/` and `events/`, so the analytics globs
//! (`metrics/**/*.parquet`, `spark.read.parquet("<root>/metrics")`) never see it.
//!
//! Writer side ([`ship`]): each index transaction that changes what a reader
//! serves records a [`Change`] in the index's outbox in that same transaction (see
//! [`crate::index`]); the [`ship::Shipper`] writes the ready ones, in order, as the
//! next log object. An entry adding a file is ready once the file is in the root
//! (on S3: its upload confirmed), so a reader never hears of a file it cannot
//! read. A log object's number and entries are recorded before it is written, so a
//! retry after any failure writes the same object: objects are immutable once
//! written, and numbered without gaps. Every so often the shipper writes a
//! checkpoint (only when the outbox is empty, so it is exactly the state the log
//! describes) and deletes log objects older than the checkpoint before it.
//!
//! Reader side ([`follow`]): at start-up a reader lists `_mboxd/` only: the daemon
//! folders, then each daemon's checkpoints and logs. It applies the latest
//! checkpoint and the logs after it, then polls each daemon by reading its next
//! log object (not found: nothing new), and lists `_mboxd/` (never the data
//! folders) to notice new daemons. It keeps its index in memory: it holds nothing
//! that is not in the root, so it can be restarted or replaced at any time, and
//! many can run at once.

pub mod follow;
pub mod ship;

use object_store::path::Path;
use serde::{Deserialize, Serialize};

use crate::index::{Change, Checkpoint, IndexError};

/// The folder under the root that holds every daemon's change log.
pub const PREFIX: &str = "_mboxd";

/// The version of the log and checkpoint objects this release writes and reads.
pub const FORMAT: u32 = 1;

/// Errors shipping or following a change log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ChangeLogError {
    #[error("{action} {key}: {source}")]
    Store {
        action: &'static str,
        key: String,
        source: Box<object_store::Error>,
    },
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("{key} is not a valid change-log object: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("{key} has format {format}; this mboxd reads format {FORMAT}: upgrade the reader")]
    Format { key: String, format: u32 },
    /// The daemon's log object `next` is gone and a checkpoint at or after it
    /// exists: the daemon deleted it (it keeps two checkpoints) before this reader
    /// read it. Only a fresh start from the checkpoints brings the reader back.
    #[error(
        "fell behind daemon {daemon}: its log object {next} was deleted after its checkpoint {checkpoint}; \
         restart the reader to load the latest checkpoints"
    )]
    FellBehind {
        daemon: String,
        next: u64,
        checkpoint: u64,
    },
}

impl ChangeLogError {
    fn store<'a>(
        action: &'static str,
        key: &'a Path,
    ) -> impl FnOnce(object_store::Error) -> Self + 'a {
        move |source| ChangeLogError::Store {
            action,
            key: key.to_string(),
            source: Box::new(source),
        }
    }
}

/// The keys of one daemon's change log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogKeys {
    daemon: String,
}

impl LogKeys {
    pub fn new(daemon: &str) -> Self {
        Self {
            daemon: daemon.to_owned(),
        }
    }

    pub fn daemon(&self) -> &str {
        &self.daemon
    }

    /// `_mboxd/<daemon>`: everything of this daemon's log.
    pub fn folder(&self) -> Path {
        Path::from(format!("{PREFIX}/{}", self.daemon))
    }

    /// `_mboxd/<daemon>/log/<n>.json`.
    pub fn log(&self, n: u64) -> Path {
        Path::from(format!("{PREFIX}/{}/log/{n:020}.json", self.daemon))
    }

    /// `_mboxd/<daemon>/checkpoint`: the daemon's checkpoints.
    pub fn checkpoints(&self) -> Path {
        Path::from(format!("{PREFIX}/{}/checkpoint", self.daemon))
    }

    /// `_mboxd/<daemon>/checkpoint/<n>.json`.
    pub fn checkpoint(&self, n: u64) -> Path {
        Path::from(format!("{PREFIX}/{}/checkpoint/{n:020}.json", self.daemon))
    }
}

/// What a key under a daemon's folder is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogKey {
    Log(u64),
    Checkpoint(u64),
}

/// Parses `_mboxd/<daemon>/(log|checkpoint)/<n>.json` into the daemon and the key;
/// anything else is `None`.
pub fn parse_key(location: &Path) -> Option<(String, LogKey)> {
    let parts: Vec<_> = location.parts().collect();
    let [root, daemon, kind, name] = parts.as_slice() else {
        return None;
    };
    if root.as_ref() != PREFIX {
        return None;
    }
    // The last number is never a log object: the one after it could not be named.
    let n: u64 = name
        .as_ref()
        .strip_suffix(".json")?
        .parse()
        .ok()
        .filter(|&n| n < u64::MAX)?;
    let key = match kind.as_ref() {
        "log" => LogKey::Log(n),
        "checkpoint" => LogKey::Checkpoint(n),
        _ => return None,
    };
    Some((daemon.as_ref().to_owned(), key))
}

/// A log object: the changes of one or more index transactions, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogObject {
    pub format: u32,
    pub daemon: String,
    pub log: u64,
    pub changes: Vec<Change>,
}

/// A checkpoint object: the whole state after log object `log`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointObject {
    pub format: u32,
    pub daemon: String,
    pub log: u64,
    pub state: Checkpoint,
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Plain structs of strings, numbers and JSON values: serializing cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

/// Decodes a log or checkpoint object, refusing formats this release cannot read.
fn decode<T: for<'de> Deserialize<'de>>(key: &Path, bytes: &[u8]) -> Result<T, ChangeLogError> {
    #[derive(Deserialize)]
    struct Header {
        format: u32,
    }
    let corrupt = |source| ChangeLogError::Corrupt {
        key: key.to_string(),
        source,
    };
    let header: Header = serde_json::from_slice(bytes).map_err(corrupt)?;
    if header.format != FORMAT {
        return Err(ChangeLogError::Format {
            key: key.to_string(),
            format: header.format,
        });
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_by_number_and_parse_back() {
        let keys = LogKeys::new("trainer-0-a1b2c3");
        assert_eq!(
            keys.log(7).as_ref(),
            "_mboxd/trainer-0-a1b2c3/log/00000000000000000007.json"
        );
        assert!(keys.log(9).as_ref() < keys.log(10).as_ref());
        assert_eq!(
            parse_key(&keys.log(12)),
            Some(("trainer-0-a1b2c3".to_owned(), LogKey::Log(12)))
        );
        assert_eq!(
            parse_key(&keys.checkpoint(0)),
            Some(("trainer-0-a1b2c3".to_owned(), LogKey::Checkpoint(0)))
        );
        assert_eq!(
            parse_key(&keys.checkpoint(u64::MAX - 1)),
            Some((
                "trainer-0-a1b2c3".to_owned(),
                LogKey::Checkpoint(u64::MAX - 1)
            ))
        );
        for other in [
            "metrics/namespace=a/date=2026-01-01/x.parquet",
            "_mboxd/d/log/x.json",
            "_mboxd/d/other/1.json",
            "_mboxd/d/log/1.json/more",
            "_mboxd/d/log/18446744073709551615.json",
            "_mboxd/d/checkpoint/18446744073709551615.json",
        ] {
            assert_eq!(parse_key(&Path::from(other)), None, "{other}");
        }
    }

    #[test]
    fn a_newer_format_is_refused_by_name() {
        let key = Path::from("_mboxd/d/log/1.json");
        let err = decode::<LogObject>(&key, br#"{"format": 2, "daemon": "d", "log": 1}"#)
            .expect_err("format 2");
        assert!(
            matches!(err, ChangeLogError::Format { format: 2, .. }),
            "{err}"
        );
    }
}
