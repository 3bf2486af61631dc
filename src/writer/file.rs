//! A Parquet file written in the staging folder one sorted row group at a time, so
//! an open partition holds at most one row group of rows in memory.
//!
//! After each row group the file's bytes are handed to the OS and a new
//! [`StagedRows`] (the file's schema, its row groups so far and which experiments
//! they hold) is published to the writer's live view, so reads see the rows while
//! the file is still being written. If writing fails (a full disk, say), the file
//! is cut back to its last whole row group and given a footer: nothing already
//! encoded is lost.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::sync::Arc;

use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::errors::ParquetError;
use parquet::file::metadata::{
    FileMetaData, ParquetMetaData, ParquetMetaDataWriter, RowGroupMetaData,
};
use parquet::file::properties::WriterProperties;

use super::WriterError;
use super::metrics::SortedRows;
use crate::index::FilePart;
use crate::live::StagedRows;
use crate::paths::ObjectKey;
use crate::sink::{LocalSink, SinkError, StagedFile};

/// A finished file, ready to publish.
#[derive(Debug)]
pub(crate) struct Finished {
    pub staged: StagedFile,
    pub key: Arc<ObjectKey>,
    pub rows: u64,
    pub bytes: u64,
    pub experiments: BTreeMap<Arc<str>, FilePart>,
}

/// See the module docs.
#[derive(Debug)]
pub(crate) struct StreamingFile {
    key: Arc<ObjectKey>,
    staged: StagedFile,
    /// `None` once finished or failed.
    writer: Option<ArrowWriter<File>>,
    read: Arc<File>,
    experiments: BTreeMap<Arc<str>, FilePart>,
    keys: HashMap<Arc<str>, BTreeMap<Arc<str>, u64>>,
    rows: u64,
    view: Option<Arc<StagedRows>>,
}

impl StreamingFile {
    /// Starts a file that will be published as `key`.
    pub(crate) fn create(
        sink: &LocalSink,
        key: Arc<ObjectKey>,
        schema: SchemaRef,
        props: &WriterProperties,
    ) -> Result<Self, WriterError> {
        let staged = sink.stage()?;
        let io = |action| {
            let path = staged.path().to_owned();
            move |source| SinkError::Io {
                action,
                path,
                source,
            }
        };
        let write = staged.file.try_clone().map_err(io("duplicating"))?;
        let read = File::open(staged.path()).map_err(io("opening"))?;
        let writer = match ArrowWriter::try_new(write, schema, Some(props.clone())) {
            Ok(w) => w,
            Err(e) => {
                sink.discard(staged);
                return Err(e.into());
            }
        };
        Ok(Self {
            key,
            staged,
            writer: Some(writer),
            read: Arc::new(read),
            experiments: BTreeMap::new(),
            keys: HashMap::new(),
            rows: 0,
            view: None,
        })
    }

    pub(crate) fn key(&self) -> &Arc<ObjectKey> {
        &self.key
    }

    pub(crate) fn rows(&self) -> u64 {
        self.rows
    }

    /// Bytes written so far.
    pub(crate) fn bytes(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.bytes_written() as u64)
    }

    pub(crate) fn is_failed(&self) -> bool {
        self.writer.is_none()
    }

    /// The live view of the row groups written so far.
    pub(crate) fn view(&self) -> Option<&Arc<StagedRows>> {
        self.view.as_ref()
    }

    /// Encodes `rows` as the next row group and makes it readable. On failure the
    /// file takes no more rows (finish it to keep what it has).
    pub(crate) fn append_row_group(&mut self, rows: &SortedRows) -> Result<(), WriterError> {
        let Some(writer) = self.writer.as_mut() else {
            return Err(ParquetError::General("the staged file failed earlier".into()).into());
        };
        let written = writer
            .write(&rows.batch)
            .and_then(|()| writer.flush())
            .and_then(|()| writer.sync().map_err(ParquetError::from));
        if let Err(e) = written {
            self.writer = None;
            return Err(e.into());
        }
        let group = (writer.flushed_row_groups().len() - 1) as u32;
        for (experiment, n) in &rows.experiments {
            let part = self
                .experiments
                .entry(Arc::clone(experiment))
                .or_insert_with(|| FilePart {
                    row_groups: Vec::new(),
                    rows: 0,
                });
            part.row_groups.push(group);
            part.rows += n;
        }
        for (experiment, key, n) in &rows.series {
            *self
                .keys
                .entry(Arc::clone(experiment))
                .or_default()
                .entry(Arc::clone(key))
                .or_default() += n;
        }
        self.rows += rows.batch.num_rows() as u64;
        let Some(metadata) = metadata_of(writer.flushed_row_groups(), self.rows) else {
            return Ok(());
        };
        self.view = Some(Arc::new(StagedRows {
            key: Arc::clone(&self.key),
            file: Arc::clone(&self.read),
            metadata: Arc::new(metadata),
            experiments: self
                .experiments
                .iter()
                .map(|(e, p)| (Arc::clone(e), p.row_groups.clone()))
                .collect::<HashMap<_, _>>(),
            keys: self
                .keys
                .iter()
                .map(|(e, k)| {
                    (
                        Arc::clone(e),
                        k.iter().map(|(k, n)| (Arc::clone(k), *n)).collect(),
                    )
                })
                .collect(),
        }));
        Ok(())
    }

    /// Writes the footer (with the page index), or, after a failure, cuts the file
    /// back to its whole row groups and writes a plain footer for them. `None` if
    /// the file holds no rows (it is discarded).
    pub(crate) fn finish(mut self, sink: &LocalSink) -> Result<Option<Finished>, WriterError> {
        if self.rows == 0 {
            sink.discard(self.staged);
            return Ok(None);
        }
        let bytes = match self.writer.take() {
            Some(mut writer) => {
                // finish() writes the footer and flushes; the handle just closes.
                writer.finish()?;
                writer.bytes_written() as u64
            }
            None => self.salvage()?,
        };
        Ok(Some(Finished {
            staged: self.staged,
            key: self.key,
            rows: self.rows,
            bytes,
            experiments: self.experiments,
        }))
    }

    /// Gives the file's whole row groups a footer after a failed write. Returns the
    /// file's size.
    fn salvage(&mut self) -> Result<u64, WriterError> {
        let Some(view) = &self.view else {
            return Err(ParquetError::General("no row group to salvage".into()).into());
        };
        let end = view
            .metadata
            .row_groups()
            .iter()
            .flat_map(|rg| rg.columns())
            .map(|c| {
                let (start, len) = c.byte_range();
                start + len
            })
            .max()
            .unwrap_or(4);
        let path = self.staged.path().to_owned();
        let io = |action| {
            let path = path.clone();
            move |source| SinkError::Io {
                action,
                path,
                source,
            }
        };
        let file = &mut self.staged.file;
        file.set_len(end).map_err(io("truncating"))?;
        file.seek(SeekFrom::End(0)).map_err(io("seeking"))?;
        ParquetMetaDataWriter::new(&mut *file, &view.metadata).finish()?;
        let bytes = file.stream_position().map_err(io("measuring"))?;
        tracing::warn!(
            file = %self.key,
            rows = self.rows,
            "a staged file failed part-way; kept its whole row groups"
        );
        Ok(bytes)
    }
}

/// The metadata of a file made of `row_groups` (at least one), for readers of an
/// unfinished file.
fn metadata_of(row_groups: &[RowGroupMetaData], rows: u64) -> Option<ParquetMetaData> {
    let schema = row_groups.first()?.schema_descr_ptr();
    Some(ParquetMetaData::new(
        FileMetaData::new(
            1,
            rows as i64,
            Some(format!("mboxd {}", env!("CARGO_PKG_VERSION"))),
            None,
            schema,
            None,
        ),
        row_groups.to_vec(),
    ))
}
