//! A real S3-compatible server (s3s-fs) on a loopback port, started and stopped by
//! the tests, and an object_store client to read back what mboxd uploaded.
//!
//! The binary comes from `MBOXD_S3S_FS`, else `s3s-fs` on the PATH; `scripts/test.sh`
//! installs it (`cargo install s3s-fs@0.14.1 --features binary --locked`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::TryStreamExt;
use mboxd::config::{S3Options, Storage, StorageRoot};
use object_store::aws::AmazonS3Builder;
use object_store::prefix::PrefixStore;
use object_store::{ObjectStore, ObjectStoreExt};

pub const ACCESS_KEY: &str = "mboxd-test";
pub const SECRET_KEY: &str = "mboxd-test-secret";
pub const BUCKET: &str = "runs";

fn binary() -> PathBuf {
    if let Some(path) = std::env::var_os("MBOXD_S3S_FS") {
        return PathBuf::from(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("s3s-fs"))
            .find(|p| p.is_file())
    });
    on_path.unwrap_or_else(|| {
        panic!(
            "s3s-fs not found: run ./scripts/test.sh, which installs it, or set MBOXD_S3S_FS \
             (cargo install s3s-fs@0.14.1 --features binary --locked)"
        )
    })
}

/// An s3s-fs process serving `dir`, where each sub-folder is a bucket.
pub struct S3Server {
    child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
}

impl S3Server {
    /// Starts a server with the bucket [`BUCKET`] on a free port.
    pub async fn start(dir: &Path) -> Self {
        std::fs::create_dir_all(dir.join(BUCKET)).expect("bucket folder");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let mut server = Self {
            child: None,
            port,
            dir: dir.to_owned(),
        };
        server.resume().await;
        server
    }

    /// Starts it again on the same port and folder after [`S3Server::stop`].
    pub async fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(binary())
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "s3s-fs did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Kills the server: an outage.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// mboxd storage settings for `s3://runs/<prefix>` on this server, with quick
    /// retries so a failure shows fast.
    pub fn storage(&self, prefix: &str) -> Storage {
        Storage {
            root: StorageRoot::S3 {
                bucket: BUCKET.to_owned(),
                prefix: prefix.to_owned(),
            },
            s3: S3Options {
                endpoint: Some(self.endpoint()),
                region: Some("us-east-1".to_owned()),
                access_key_id: Some(ACCESS_KEY.to_owned()),
                secret_access_key: Some(SECRET_KEY.to_owned()),
                allow_http: true,
                max_retries: 1,
                retry_timeout: Duration::from_secs(2),
                request_timeout: Some(Duration::from_secs(10)),
                ..S3Options::default()
            },
            max_upload_backoff: Duration::from_millis(500),
            ..Storage::default()
        }
    }

    /// The same settings as a config file section, for mboxd processes.
    pub fn storage_toml(&self, prefix: &str) -> String {
        format!(
            "[storage]\nroot = \"s3://{BUCKET}/{prefix}\"\nmax_upload_backoff_ms = 500\n\
             [storage.s3]\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"{ACCESS_KEY}\"\nsecret_access_key = \"{SECRET_KEY}\"\n\
             allow_http = true\nmax_retries = 1\nretry_timeout_ms = 2000\nrequest_timeout_ms = 10000\n",
            self.endpoint()
        )
    }

    /// A client for `s3://runs/<prefix>`, to read back what mboxd wrote.
    pub fn store(&self, prefix: &str) -> Arc<dyn ObjectStore> {
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(self.endpoint())
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .with_allow_http(true)
            .build()
            .expect("s3 client");
        Arc::new(PrefixStore::new(s3, prefix))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Every `.parquet` object under `<table>/` in `store`, by key, with its bytes.
pub async fn parquet_objects(store: &dyn ObjectStore, table: &str) -> Vec<(String, Bytes)> {
    let prefix = object_store::path::Path::from(table);
    let metas: Vec<_> = store
        .list(Some(&prefix))
        .try_collect()
        .await
        .expect("list objects");
    let mut out = Vec::new();
    for meta in metas {
        let key = meta.location.to_string();
        if !key.ends_with(".parquet") {
            continue;
        }
        let bytes = store
            .get(&meta.location)
            .await
            .expect("get object")
            .bytes()
            .await
            .expect("object body");
        out.push((key, bytes));
    }
    out.sort();
    out
}

/// Every `step` in the metrics objects under `store`, with how often it occurs.
pub async fn steps_in_store(store: &dyn ObjectStore) -> std::collections::HashMap<u64, u32> {
    let mut seen = std::collections::HashMap::new();
    for (_, bytes) in parquet_objects(store, "metrics").await {
        super::count_steps(bytes, &mut seen);
    }
    seen
}

/// Parquet files waiting in a data folder's spool.
pub fn spooled_files(data: &Path) -> usize {
    super::parquet_files(&data.join("spool"), "metrics").len()
        + super::parquet_files(&data.join("spool"), "events").len()
}

/// One metric row as stored: experiment id, key, step, wallclock time, value.
pub type Point = (String, String, u64, u64, Option<f64>);

/// Every metric row in the metrics objects under `store`, ordered by
/// (experiment, key, step).
pub async fn points_in_store(store: &dyn ObjectStore) -> Vec<Point> {
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int32Type, Int64Type};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let mut points = Vec::new();
    for (key, bytes) in parquet_objects(store, "metrics").await {
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .unwrap_or_else(|e| panic!("{key} is not a whole Parquet file: {e}"))
            .build()
            .expect("reader");
        for batch in reader {
            let batch = batch.expect("batch");
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .unwrap_or_else(|| panic!("{key} has no {name} column"))
            };
            let text = |name: &str| {
                let dict = column(name).as_dictionary::<Int32Type>();
                let values = dict.values().as_string::<i32>();
                dict.keys()
                    .values()
                    .iter()
                    .map(|&k| values.value(k as usize).to_owned())
                    .collect::<Vec<_>>()
            };
            let (ids, keys) = (text("experiment_id"), text("key"));
            let steps = column("step").as_primitive::<Int64Type>();
            let wallclocks = column("wallclock_time").as_primitive::<Int64Type>();
            let values = column("value_double").as_primitive::<Float64Type>();
            for row in 0..batch.num_rows() {
                points.push((
                    ids[row].clone(),
                    keys[row].clone(),
                    steps.value(row) as u64,
                    wallclocks.value(row) as u64,
                    values.is_valid(row).then(|| values.value(row)),
                ));
            }
        }
    }
    points.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
    points
}

/// The rows [`super::numeric_block`] sends for `id`.
pub fn numeric_points(id: &str, keys: &[&str], n: usize, first_step: u64) -> Vec<Point> {
    let block = super::numeric_block(id, keys, n, first_step);
    (0..n)
        .map(|i| {
            (
                id.to_owned(),
                block.keys[block.key_index[i] as usize].clone(),
                block.steps[i],
                block.wallclock_times[i],
                Some(block.values[i]),
            )
        })
        .collect()
}

/// Waits until the metrics objects under `store` hold `rows` rows in all, then
/// returns them; fails if more arrive or none in time (say, because uploads fail).
pub async fn wait_for_points(store: &dyn ObjectStore, rows: usize) -> Vec<Point> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let points = points_in_store(store).await;
        assert!(
            points.len() <= rows,
            "{} rows in the bucket, expected {rows}",
            points.len()
        );
        if points.len() == rows {
            return points;
        }
        assert!(
            Instant::now() < deadline,
            "timed out with {}/{rows} rows in the bucket",
            points.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
