//! An object store that counts its requests by operation and by area of the root
//! (the change logs under `_mboxd/`, or the data), into
//! `mboxd_store_requests_total`. A reader wraps its store in it, so what it costs
//! the bucket is visible (and tested: after start-up it never lists the data).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;

use crate::telemetry::{StoreArea, StoreLabel, StoreOp};

/// Counts every request to `inner`.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    requests: Family<StoreLabel, Counter>,
}

impl CountingStore {
    pub fn new(inner: Arc<dyn ObjectStore>, requests: Family<StoreLabel, Counter>) -> Self {
        Self { inner, requests }
    }

    fn count(&self, op: StoreOp, location: Option<&Path>) {
        self.requests
            .get_or_create(&StoreLabel {
                op,
                area: area(location),
            })
            .inc();
    }
}

/// The area of a location or list prefix; listing without a prefix lists the data.
pub fn area(location: Option<&Path>) -> StoreArea {
    match location.and_then(|l| l.parts().next()) {
        Some(first) if first.as_ref() == crate::changelog::PREFIX => StoreArea::changelog,
        _ => StoreArea::data,
    }
}

impl fmt::Display for CountingStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.inner)
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        self.count(StoreOp::put, Some(location));
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        self.count(StoreOp::put, Some(location));
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head {
            StoreOp::head
        } else {
            StoreOp::get
        };
        self.count(op, Some(location));
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        self.count(StoreOp::get, Some(location));
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        use futures::StreamExt;
        let requests = self.requests.clone();
        let counted = locations
            .inspect(move |l| {
                requests
                    .get_or_create(&StoreLabel {
                        op: StoreOp::delete,
                        area: area(l.as_ref().ok()),
                    })
                    .inc();
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.count(StoreOp::list, prefix);
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        self.count(StoreOp::list, prefix);
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.count(StoreOp::list, prefix);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.count(StoreOp::copy, Some(to));
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.count(StoreOp::rename, Some(to));
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    fn value(requests: &Family<StoreLabel, Counter>, op: StoreOp, area: StoreArea) -> u64 {
        requests.get_or_create(&StoreLabel { op, area }).get()
    }

    #[tokio::test]
    async fn requests_are_counted_by_operation_and_area() {
        use futures::TryStreamExt;
        let requests = Family::default();
        let store = CountingStore::new(Arc::new(InMemory::new()), requests.clone());
        let log = Path::from("_mboxd/d/log/00000000000000000001.json");
        let file = Path::from("metrics/namespace=a/date=2026-01-01/f.parquet");
        store
            .put(&log, PutPayload::from_static(b"{}"))
            .await
            .unwrap();
        store
            .put(&file, PutPayload::from_static(b"x"))
            .await
            .unwrap();
        store.get(&log).await.unwrap();
        assert!(store.get(&Path::from("_mboxd/d/log/2.json")).await.is_err());
        store.get_range(&file, 0..1).await.unwrap();
        store.head(&file).await.unwrap();
        store
            .list_with_delimiter(Some(&Path::from("_mboxd")))
            .await
            .unwrap();
        let all: Vec<_> = store.list(None).try_collect().await.unwrap();
        assert_eq!(all.len(), 2);
        store.delete(&file).await.unwrap();
        use StoreArea::{changelog, data};
        assert_eq!(value(&requests, StoreOp::put, changelog), 1);
        assert_eq!(value(&requests, StoreOp::put, data), 1);
        assert_eq!(value(&requests, StoreOp::get, changelog), 2);
        assert_eq!(value(&requests, StoreOp::get, data), 1);
        assert_eq!(value(&requests, StoreOp::head, data), 1);
        assert_eq!(value(&requests, StoreOp::list, changelog), 1);
        assert_eq!(value(&requests, StoreOp::list, data), 1);
        assert_eq!(value(&requests, StoreOp::delete, data), 1);
    }
}
