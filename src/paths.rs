//! The storage layout: the contract with DuckDB, Spark and every other reader.
//!
//! ```text
//! <root>/metrics/namespace=<ns>/date=<YYYY-MM-DD>/<daemon-id>-<uuid v7>.parquet
//! <root>/events/namespace=<ns>/date=<YYYY-MM-DD>/<daemon-id>-<uuid v7>.parquet
//! ```
//!
//! Namespaces are restricted (see [`valid_namespace`]) so a partition value never
//! needs escaping. File names carry the daemon id and a time-ordered UUID, so many
//! daemons can share one root.

use std::fmt;

use chrono::{DateTime, NaiveDate};

use crate::model::Micros;

/// The tables mboxd writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Metrics,
    Events,
}

impl Table {
    pub fn dir_name(self) -> &'static str {
        match self {
            Table::Metrics => "metrics",
            Table::Events => "events",
        }
    }
}

/// The UTC date of a timestamp, the `date=` partition value.
pub fn utc_date(at: Micros) -> NaiveDate {
    DateTime::from_timestamp_micros(at)
        .unwrap_or_default()
        .date_naive()
}

/// A partition: one table, namespace and ingest date.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub table: Table,
    pub namespace: std::sync::Arc<str>,
    pub date: NaiveDate,
}

impl PartitionKey {
    /// The partition's folder relative to the root, with `/` separators.
    pub fn dir(&self) -> String {
        format!(
            "{}/namespace={}/date={}",
            self.table.dir_name(),
            self.namespace,
            self.date.format("%Y-%m-%d")
        )
    }
}

/// An object key relative to the storage root, always with `/` separators.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey(String);

impl ObjectKey {
    /// A new, unique file name in `partition` for a daemon.
    pub fn new_file(partition: &PartitionKey, daemon_id: &str) -> Self {
        Self(format!(
            "{}/{}-{}.parquet",
            partition.dir(),
            daemon_id,
            uuid::Uuid::now_v7().simple()
        ))
    }

    /// Wraps a key read back from the manifest.
    pub fn from_manifest(key: String) -> Self {
        Self(key)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as a relative filesystem path.
    pub fn to_path(&self) -> std::path::PathBuf {
        self.0.split('/').collect()
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether `ns` may be used as a namespace: 1 to `max` bytes of ASCII letters,
/// digits, `-`, `_` and `.`, not starting with `.` (so it is a plain, unescaped
/// Hive partition value and never a hidden folder).
pub fn valid_namespace(ns: &str, max: usize) -> bool {
    !ns.is_empty()
        && ns.len() <= max
        && !ns.starts_with('.')
        && ns
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Whether `id` may be used as a daemon id in file names (same rules as namespaces).
pub fn valid_daemon_id(id: &str) -> bool {
    valid_namespace(id, 128)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_hive_style() {
        let p = PartitionKey {
            table: Table::Metrics,
            namespace: "cv".into(),
            date: NaiveDate::from_ymd_opt(2026, 11, 26).unwrap(),
        };
        let key = ObjectKey::new_file(&p, "host-1a2b");
        let s = key.as_str();
        assert!(
            s.starts_with("metrics/namespace=cv/date=2026-11-26/host-1a2b-"),
            "{s}"
        );
        assert!(s.ends_with(".parquet"));
        assert_ne!(
            key,
            ObjectKey::new_file(&p, "host-1a2b"),
            "names are unique"
        );
    }

    #[test]
    fn file_names_sort_by_creation_time() {
        let p = PartitionKey {
            table: Table::Events,
            namespace: "a".into(),
            date: NaiveDate::from_ymd_opt(2026, 1, 1).unwrap(),
        };
        let a = ObjectKey::new_file(&p, "d");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = ObjectKey::new_file(&p, "d");
        assert!(a < b);
    }

    #[test]
    fn namespace_rules() {
        assert!(valid_namespace("cv-team_1.x", 64));
        for bad in ["", ".hidden", "a/b", "a=b", "ü", "a b", "..", "x%2F"] {
            assert!(!valid_namespace(bad, 64), "{bad:?} must be rejected");
        }
        assert!(!valid_namespace(&"a".repeat(65), 64));
    }

    #[test]
    fn utc_date_of_micros() {
        assert_eq!(utc_date(0).to_string(), "1970-01-01");
        assert_eq!(utc_date(1_764_115_200_000_000).to_string(), "2025-11-26");
    }
}
