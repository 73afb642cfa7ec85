//! An object store that counts what is asked of it: requests by S3 price class and bytes
//! written, so the simulator can say what a run costs in requests (and in dollars at S3's list
//! prices) without a network.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::StreamExt;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult,
};

/// Requests by kind and bytes written, as counted so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// PUT (plain and create-only) and multipart uploads.
    pub put: u64,
    /// Bytes carried by those PUTs.
    pub put_bytes: u64,
    /// Server-side copies.
    pub copy: u64,
    /// Listings (one per call; a real store pages every 1,000 keys, counted here as one).
    pub list: u64,
    /// GETs.
    pub get: u64,
    /// HEADs.
    pub head: u64,
    /// Deletes, one per key.
    pub delete: u64,
}

/// S3 Standard list prices (us-east-1, per 1,000 requests, USD) as published by AWS: PUT, COPY,
/// POST and LIST requests $0.005; GET, HEAD and others $0.0004; DELETE free.
pub const S3_PUT_COPY_LIST_PER_1000: f64 = 0.005;
/// See [`S3_PUT_COPY_LIST_PER_1000`].
pub const S3_GET_HEAD_PER_1000: f64 = 0.0004;

impl Requests {
    /// Every request, whatever its kind.
    pub fn total(&self) -> u64 {
        self.put + self.copy + self.list + self.get + self.head + self.delete
    }

    /// What these requests cost at S3 Standard list prices (USD; storage and transfer not included).
    pub fn s3_usd(&self) -> f64 {
        (self.put + self.copy + self.list) as f64 / 1000.0 * S3_PUT_COPY_LIST_PER_1000
            + (self.get + self.head) as f64 / 1000.0 * S3_GET_HEAD_PER_1000
    }

    /// The sum of two counts.
    pub fn plus(&self, other: &Requests) -> Requests {
        Requests {
            put: self.put + other.put,
            put_bytes: self.put_bytes + other.put_bytes,
            copy: self.copy + other.copy,
            list: self.list + other.list,
            get: self.get + other.get,
            head: self.head + other.head,
            delete: self.delete + other.delete,
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    put: AtomicU64,
    put_bytes: AtomicU64,
    copy: AtomicU64,
    list: AtomicU64,
    get: AtomicU64,
    head: AtomicU64,
    delete: AtomicU64,
}

/// Wraps a store and counts every request made through it.
#[derive(Debug)]
pub struct CountingStore {
    inner: Arc<dyn ObjectStore>,
    counters: Arc<Counters>,
}

impl std::fmt::Display for CountingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Counting({})", self.inner)
    }
}

impl CountingStore {
    /// Counts the requests made to `inner` through the returned store.
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        CountingStore { inner, counters: Arc::default() }
    }

    /// The counts so far.
    pub fn requests(&self) -> Requests {
        let c = &self.counters;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Requests {
            put: load(&c.put),
            put_bytes: load(&c.put_bytes),
            copy: load(&c.copy),
            list: load(&c.list),
            get: load(&c.get),
            head: load(&c.head),
            delete: load(&c.delete),
        }
    }

    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

#[async_trait::async_trait]
impl ObjectStore for CountingStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        Self::add(&self.counters.put, 1);
        Self::add(&self.counters.put_bytes, payload.content_length() as u64);
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        Self::add(&self.counters.put, 1);
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        Self::add(if options.head { &self.counters.head } else { &self.counters.get }, 1);
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        let counters = self.counters.clone();
        let counted = locations
            .map(move |path| {
                Self::add(&counters.delete, 1);
                path
            })
            .boxed();
        self.inner.delete_stream(counted)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        Self::add(&self.counters.list, 1);
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        Self::add(&self.counters.list, 1);
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        Self::add(&self.counters.copy, 1);
        self.inner.copy_opts(from, to, options).await
    }
}
