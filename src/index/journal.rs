//! The catalog journal: how a batch of creations is made durable without the
//! index's own sync.
//!
//! A durable index commit syncs the file twice (quick repair's two phases) and
//! saves the allocator state, all on the one thread that writes the index. A
//! journaled batch is instead appended here (`<data_dir>/catalog.journal`) before
//! its commit, committed without a sync, and acknowledged once a thread of its
//! own has synced the journal; the index thread meanwhile writes the next batch.
//! About once a second a batch is committed durably (a checkpoint), which makes
//! every earlier one durable too, and the journal is emptied. The commits in
//! between leave their pages to the page cache; a third thread writes them back
//! every [`WRITEBACK_EVERY`] ([`super::Index::writeback`]), so the checkpoint's sync finds
//! little left to write instead of holding the index thread for a second's pages.
//!
//! After a crash the index is as its last durable commit left it (redb drops the
//! commits after it), and the batches the journal holds after that commit's
//! sequence number (`meta` key `catalog_journal_seq`) are written again, in
//! order, at the times they were first written: the index ends as it was. Any
//! other writer's commit is durable, so nothing else was written in between.
//!
//! A record: length (u32, little-endian), CRC-32 of the payload, the payload (a
//! JSON [`JournalBatch`]). A torn record can only be the last (a crash
//! mid-append); reading stops at the first record that does not check.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::catalog::NewExperiment;
use super::{IndexError, encode};
use crate::model::Micros;

/// How often a journaled batch is committed durably instead.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// How often the index's file is written back while batches are committed
/// without a sync.
pub const WRITEBACK_EVERY: Duration = Duration::from_millis(20);
/// A journal this long is emptied at the next batch, however recent the last
/// checkpoint.
const CHECKPOINT_BYTES: u64 = 8 << 20;

/// One CreateExperiment batch as the journal keeps it.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct JournalBatch {
    pub seq: u64,
    /// The catalog time the batch was written at.
    pub now: Micros,
    pub batch: Vec<(NewExperiment, Vec<(String, serde_json::Value)>)>,
}

/// [`JournalBatch`] as it is written, borrowing the batch.
#[derive(Debug, Serialize)]
pub(super) struct JournalRecord<'a> {
    pub seq: u64,
    pub now: Micros,
    pub batch: Vec<(&'a NewExperiment, &'a Vec<(String, serde_json::Value)>)>,
}

/// The journal, open for appending (see the module docs).
#[derive(Debug)]
pub struct CatalogJournal {
    file: File,
    path: PathBuf,
    /// Bytes of records in the file.
    len: u64,
    /// The last batch's sequence number.
    seq: u64,
    checkpointed_at: Instant,
    /// Checkpoints since the journal was opened: a batch committed after the
    /// n-th is made durable by a journal sync, or by the (n+1)-th.
    checkpoints: u64,
    /// [`CHECKPOINT_EVERY`], but in tests.
    checkpoint_every: Duration,
    /// See [`CatalogJournal::checkpoint_next`].
    force: bool,
}

/// What a commit through the journal asks of its caller before acknowledging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durable {
    /// The commit was durable itself.
    Now,
    /// A sync of the journal ([`CatalogJournal::syncer`]) makes it durable.
    AfterSync,
}

/// A handle that syncs one file from a thread of its own: the journal (before
/// its batches are answered) or the index (written back ahead of checkpoints).
#[derive(Debug)]
pub struct FileSync {
    file: File,
    path: PathBuf,
}

impl FileSync {
    pub(super) fn open(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            file: File::open(path)?,
            path: path.to_owned(),
        })
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

pub(super) fn journal_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> IndexError {
    let path = path.to_owned();
    move |source| IndexError::Journal { what, path, source }
}

impl CatalogJournal {
    /// Opens the journal at `path` after its records were replayed (see
    /// [`super::Index::open_journal`]), empty, continuing after `seq`.
    pub(super) fn create(path: &Path, seq: u64) -> Result<Self, IndexError> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .map_err(journal_err("opening", path))?;
        // The file's entry in its folder, so a power loss cannot take the file
        // with the batches synced into it.
        if let Some(dir) = path.parent() {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(journal_err("syncing the folder of", path))?;
        }
        let mut journal = Self {
            file,
            path: path.to_owned(),
            len: 0,
            seq,
            checkpointed_at: Instant::now(),
            checkpoints: 0,
            checkpoint_every: CHECKPOINT_EVERY,
            force: false,
        };
        journal.empty()?;
        Ok(journal)
    }

    /// A handle that syncs this journal.
    pub fn syncer(&self) -> Result<FileSync, IndexError> {
        FileSync::open(&self.path).map_err(journal_err("opening", &self.path))
    }

    /// Commits the next batch durably, however recent the last checkpoint (a
    /// sync of the journal failed).
    pub fn checkpoint_next(&mut self) {
        self.force = true;
    }

    /// Commits durably only when asked to or full, for tests that need the
    /// batches in the journal alone.
    #[cfg(test)]
    pub(super) fn without_timed_checkpoints(mut self) -> Self {
        self.checkpoint_every = Duration::MAX;
        self
    }

    /// Whether the next batch should be committed durably.
    pub(super) fn checkpoint_due(&self) -> bool {
        self.force
            || self.len >= CHECKPOINT_BYTES
            || self.checkpointed_at.elapsed() >= self.checkpoint_every
    }

    /// See [`CatalogJournal::checkpoints`].
    pub fn checkpoints(&self) -> u64 {
        self.checkpoints
    }

    /// The last batch's sequence number.
    pub(super) fn seq(&self) -> u64 {
        self.seq
    }

    /// The sequence number of the next batch.
    pub(super) fn next_seq(&self) -> u64 {
        self.seq + 1
    }

    /// Appends a batch's record (see [`frame`]), not yet synced; returns where
    /// the file ended before it, to [`CatalogJournal::rewind`] to if its commit
    /// fails.
    pub(super) fn append(&mut self, record: &[u8], seq: u64) -> Result<u64, IndexError> {
        let before = self.len;
        self.file
            .write_all_at(record, before)
            .map_err(journal_err("appending to", &self.path))?;
        self.len += record.len() as u64;
        self.seq = seq;
        Ok(before)
    }

    /// Notes a batch committed durably without a record (a checkpoint).
    pub(super) fn advance(&mut self, seq: u64) {
        self.seq = self.seq.max(seq);
    }

    /// Drops what was appended after `len`: its commit failed.
    pub(super) fn rewind(&mut self, len: u64) -> Result<(), IndexError> {
        self.file
            .set_len(len)
            .map_err(journal_err("truncating", &self.path))?;
        self.len = len;
        Ok(())
    }

    /// Empties the journal: every batch in it is in a durable commit.
    pub(super) fn empty(&mut self) -> Result<(), IndexError> {
        self.rewind(0)?;
        self.checkpointed_at = Instant::now();
        self.checkpoints += 1;
        self.force = false;
        Ok(())
    }
}

/// A batch's record: length, CRC-32 and payload (see the module docs).
pub(super) fn frame(batch: &JournalRecord<'_>) -> Result<Vec<u8>, IndexError> {
    let payload = encode(batch);
    let len = u32::try_from(payload.len()).map_err(|_| IndexError::Journal {
        what: "framing a batch over 4 GiB for",
        path: PathBuf::from("catalog.journal"),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    let mut record = Vec::with_capacity(payload.len() + 8);
    record.extend_from_slice(&len.to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    record.extend_from_slice(&payload);
    Ok(record)
}

/// The batches a journal file holds, in order, up to the first record that does
/// not check (with how many bytes follow it, for a warning). A missing file
/// holds none. A record that checks but does not parse (one of a later
/// release) is an error: it was acknowledged.
pub(super) fn read_journal(path: &Path) -> Result<(Vec<JournalBatch>, u64), IndexError> {
    let mut bytes = Vec::new();
    match File::open(path) {
        Ok(mut f) => {
            f.read_to_end(&mut bytes)
                .map_err(journal_err("reading", path))?;
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(journal_err("opening", path)(e)),
    }
    let mut batches = Vec::new();
    let mut rest = bytes.as_slice();
    while let Some(payload) = next_record(&mut rest) {
        let batch = serde_json::from_slice(payload).map_err(|source| IndexError::Corrupt {
            what: format!("{} record {}", path.display(), batches.len() + 1),
            source,
        })?;
        batches.push(batch);
    }
    Ok((batches, rest.len() as u64))
}

/// The payload of the record at the start of `rest` (advancing past it), if it
/// checks.
fn next_record<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    let (len, tail) = rest.split_first_chunk::<4>()?;
    let (crc, tail) = tail.split_first_chunk::<4>()?;
    let payload = tail.get(..u32::from_le_bytes(*len) as usize)?;
    if crc32fast::hash(payload) != u32::from_le_bytes(*crc) {
        return None;
    }
    *rest = &tail[payload.len()..];
    Some(payload)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::Index;
    use super::super::tests::new_exp;
    use super::*;
    use crate::model::ExperimentRecord;
    use crate::search::{Search, parse_filter, parse_order_by};

    /// Set in the child process of the crash test: the folder of its index and
    /// journal.
    const CRASH_CHILD: &str = "MBOXD_TEST_JOURNAL_LEFT_BY_A_CRASH";

    fn batch(names: &[&str], lr: f64) -> Vec<(NewExperiment, Vec<(String, serde_json::Value)>)> {
        names
            .iter()
            .map(|n| (new_exp(n), vec![("lr".to_string(), json!(lr))]))
            .collect()
    }

    /// The experiments of namespace `cv` with this `lr`, as search finds them,
    /// by name.
    fn with_lr(index: &Index, lr: f64) -> Vec<ExperimentRecord> {
        let search = Search {
            conditions: parse_filter(&format!("params.lr = {lr}")).unwrap(),
            order_by: vec![parse_order_by("name").unwrap()],
        };
        let page = index.search(Some("cv"), &search, 1000, None).unwrap();
        page.experiments.into_iter().map(|d| d.record).collect()
    }

    #[test]
    fn acknowledged_batches_left_by_a_crash_are_written_again_once() {
        let name =
            "index::journal::tests::acknowledged_batches_left_by_a_crash_are_written_again_once";
        if let Some(dir) = std::env::var_os(CRASH_CHILD) {
            let dir = Path::new(&dir);
            let index = Index::open(&dir.join("index.redb")).unwrap();
            index.enable_change_log().unwrap();
            let (journal, replayed) = index.open_journal(&dir.join("catalog.journal")).unwrap();
            assert_eq!(replayed, 0);
            let mut journal = journal.without_timed_checkpoints();
            let sync = journal.syncer().unwrap();
            let mut created = Vec::new();
            for (names, lr) in [(&["a", "b"][..], 0.1), (&["c", "a"][..], 0.2)] {
                let (records, durable) = index
                    .create_journaled(batch(names, lr), &mut journal)
                    .unwrap();
                assert_eq!(durable, Durable::AfterSync);
                sync.sync().unwrap();
                if created.is_empty() {
                    // Another writer's commit, durable, between the batches: it
                    // makes the first one durable too, so only the second is
                    // replayed.
                    index
                        .update_metadata(&records[0].0.id, &[("opt".into(), json!("adam"))])
                        .unwrap();
                }
                created.extend(records.into_iter().map(|(r, _)| r));
            }
            std::fs::write(dir.join("acknowledged.json"), encode(&created)).unwrap();
            // Exits without a durable commit or closing the index, as a SIGKILL
            // would.
            std::process::exit(3);
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", name, "--test-threads=1", "--nocapture"])
            .env(CRASH_CHILD, dir.path())
            .status()
            .unwrap();
        assert_eq!(status.code(), Some(3), "the child wrote and crashed");
        let acknowledged: Vec<ExperimentRecord> =
            serde_json::from_slice(&std::fs::read(dir.path().join("acknowledged.json")).unwrap())
                .unwrap();
        assert_eq!(acknowledged.len(), 4);

        let names = |v: Vec<ExperimentRecord>| v.into_iter().map(|r| r.name).collect::<Vec<_>>();
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        assert_eq!(index.repaired_in(), None);
        let path = dir.path().join("catalog.journal");
        // As mboxd starts: the change log is set before the replay.
        index.enable_change_log().unwrap();
        assert_eq!(index.experiment_names("cv"), ["a", "b"]);
        let (_, replayed) = index.open_journal(&path).unwrap();
        assert_eq!(replayed, 1);
        for r in &acknowledged {
            // The last acknowledgement of "a" (updated by the second batch) wins.
            let last = acknowledged.iter().rev().find(|x| x.id == r.id).unwrap();
            assert_eq!(index.get_experiment(&r.id).unwrap().as_ref(), Some(last));
        }
        assert_eq!(index.experiment_names("cv"), ["a", "b", "c"]);
        assert_eq!(names(with_lr(&index, 0.1)), ["b"]);
        assert_eq!(names(with_lr(&index, 0.2)), ["a", "c"]);
        // One change per batch and the update in the log: each written once.
        let changes = index.shippable(100).unwrap();
        assert_eq!(changes.len(), 3);
        let metadata = index.list_metadata(&acknowledged[0].id).unwrap();
        assert_eq!(metadata.len(), 2, "lr and opt: {metadata:?}");
        drop(index);

        // The journal is empty, and opening it again writes nothing twice.
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        index.enable_change_log().unwrap();
        let (_, replayed) = index.open_journal(&path).unwrap();
        assert_eq!(replayed, 0);
        assert_eq!(index.shippable(100).unwrap().len(), 3);
        assert_eq!(index.experiment_names("cv"), ["a", "b", "c"]);
    }

    /// An index in a new folder, with its journal (no timed checkpoints).
    fn fresh() -> (tempfile::TempDir, PathBuf, Index, CatalogJournal) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.journal");
        let index = Index::open(&dir.path().join("index.redb")).unwrap();
        let (journal, _) = index.open_journal(&path).unwrap();
        (dir, path, index, journal.without_timed_checkpoints())
    }

    /// Appends a record of a batch to the journal, as a batch whose commit
    /// never happened (or failed) would leave it.
    fn append_uncommitted(journal: &mut CatalogJournal, names: &[&str], lr: f64) {
        let batch = batch(names, lr);
        let record = JournalRecord {
            seq: journal.next_seq(),
            now: 1_000_000,
            batch: batch.iter().map(|(n, m)| (n, m)).collect(),
        };
        let seq = record.seq;
        journal.append(&frame(&record).unwrap(), seq).unwrap();
    }

    #[test]
    fn a_torn_last_record_is_dropped_and_the_ones_before_it_kept() {
        let (_dir, path, index, mut journal) = fresh();
        append_uncommitted(&mut journal, &["a"], 0.1);
        append_uncommitted(&mut journal, &["b"], 0.2);
        let whole = std::fs::metadata(&path).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(whole - 3)
            .unwrap();
        let (batches, torn) = read_journal(&path).unwrap();
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].batch[0].0.name, "a");
        assert!(torn > 0);
        let (_, replayed) = index.open_journal(&path).unwrap();
        assert_eq!(replayed, 1);
        let a = index.list_experiments("cv").unwrap();
        assert_eq!(a.len(), 1);
        assert_eq!((a[0].name.as_str(), a[0].created_at), ("a", 1_000_000));
    }

    #[test]
    fn a_checkpoint_answers_at_once_empties_the_journal_and_outdates_what_it_held() {
        let (_dir, path, index, mut journal) = fresh();
        journal.checkpoint_next();
        let (_, durable) = index
            .create_journaled(batch(&["a"], 0.1), &mut journal)
            .unwrap();
        assert_eq!(durable, Durable::Now);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        let (_, durable) = index
            .create_journaled(batch(&["b"], 0.1), &mut journal)
            .unwrap();
        assert_eq!(durable, Durable::AfterSync);
        // A failed batch's record that could not be taken back.
        append_uncommitted(&mut journal, &["never"], 0.1);
        let held = std::fs::read(&path).unwrap();
        assert!(!held.is_empty());
        index.checkpoint_journal(&mut journal).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
        // Were the emptying lost, nothing it held would be written again.
        std::fs::write(&path, held).unwrap();
        let (_, replayed) = index.open_journal(&path).unwrap();
        assert_eq!(replayed, 0);
        assert_eq!(index.experiment_names("cv"), ["a", "b"]);
    }
}
