//! A real mboxd on 127.0.0.1:0, started in-process with its own data folder, and a
//! tonic client for it.
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mboxd::config::Config;
use mboxd::proto;
use mboxd::proto::model_store_client::ModelStoreClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub mod s3;
pub mod tls;

pub type Client = ModelStoreClient<Channel>;

pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub config: Config,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), mboxd::server::ServerError>>,
}

impl TestServer {
    pub async fn start(config: Config) -> Self {
        Self::start_on("127.0.0.1:0".parse().expect("addr"), config).await
    }

    /// Starts mboxd with its gRPC listener on `addr` (port 0 for any).
    pub async fn start_on(addr: std::net::SocketAddr, config: Config) -> Self {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(mboxd::server::run(config.clone(), listener, async {
            let _ = rx.await;
        }));
        Self {
            addr,
            config,
            stop: Some(tx),
            task,
        }
    }

    pub async fn client(&mut self) -> Client {
        let url = format!("http://{}", self.addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match ModelStoreClient::connect(url.clone()).await {
                Ok(c) => {
                    return c
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX);
                }
                Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
                Err(_) if self.task.is_finished() => {
                    panic!("mboxd stopped at start-up: {:?}", (&mut self.task).await)
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }

    /// Starts a graceful shutdown without waiting for it.
    pub fn begin_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }

    /// Graceful shutdown: returns once every buffered row is published.
    pub async fn stop(mut self) {
        self.begin_stop();
        let result = (&mut self.task).await.expect("server task");
        result.expect("server stopped cleanly");
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }
}

/// Parquet files under `<dir>/<table>/`, sorted.
pub fn parquet_files(dir: &Path, table: &str) -> Vec<PathBuf> {
    fn walk(p: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(p) else {
            return;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|x| x == "parquet") {
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join(table), &mut out);
    out.sort();
    out
}

/// Waits until `<dir>/<table>` holds files with `rows` rows in all.
pub async fn wait_for_rows(dir: &Path, table: &str, rows: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got: usize = parquet_files(dir, table)
            .iter()
            .map(|f| parquet_rows(f))
            .sum();
        if got == rows {
            return;
        }
        assert!(got < rows, "{got} rows in {table}, expected {rows}");
        assert!(
            Instant::now() < deadline,
            "timed out with {got}/{rows} rows in {table}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn parquet_rows(path: &Path) -> usize {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let file = std::fs::File::open(path).expect("open parquet");
    let reader = SerializedFileReader::new(file).expect("read parquet");
    reader.metadata().file_metadata().num_rows() as usize
}

pub async fn create_experiment(client: &mut Client, ns: &str, name: &str) -> String {
    client
        .create_experiment(proto::CreateExperimentRequest {
            name: name.into(),
            owner: "tester".into(),
            namespace: ns.into(),
            framework: proto::MlFramework::Pytorch as i32,
            ..Default::default()
        })
        .await
        .expect("create experiment")
        .into_inner()
        .experiment_id
}

/// A block of `n` numeric points over `keys`, step i, wallclock 1000+i, value i/2.
pub fn numeric_block(
    parent_id: &str,
    keys: &[&str],
    n: usize,
    first_step: u64,
) -> proto::MetricsBlock {
    proto::MetricsBlock {
        parent_id: parent_id.into(),
        keys: keys.iter().map(|k| k.to_string()).collect(),
        key_index: (0..n).map(|i| (i % keys.len()) as u32).collect(),
        steps: (0..n as u64).map(|i| first_step + i).collect(),
        wallclock_times: (0..n as u64).map(|i| 1000 + first_step + i).collect(),
        values: (0..n)
            .map(|i| (first_step as f64 + i as f64) / 2.0)
            .collect(),
        ..Default::default()
    }
}

pub fn temp_config() -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = Config::test_config(dir.path().join("data"));
    (dir, config)
}

/// A real mboxd process (the binary cargo built), on a loopback port.
pub struct Process {
    pub child: std::process::Child,
    pub addr: String,
}

impl Process {
    pub async fn start(data: &Path, extra: &[&str]) -> Self {
        Self::start_as(data, "proc", extra).await
    }

    /// Starts mboxd with daemon id `daemon_id`.
    pub async fn start_as(data: &Path, daemon_id: &str, extra: &[&str]) -> Self {
        Self::start_with(data, daemon_id, extra, |_| {}).await
    }

    /// Starts mboxd with daemon id `daemon_id`, after `setup` adjusts its command
    /// (environment, log level, where stderr goes). The child never inherits the
    /// test runner's `AWS_*` variables: S3 settings are only what a test gives it.
    pub async fn start_with(
        data: &Path,
        daemon_id: &str,
        extra: &[&str],
        setup: impl FnOnce(&mut std::process::Command),
    ) -> Self {
        Self::start_full(data, daemon_id, "127.0.0.1:0", extra, setup).await
    }

    /// Starts mboxd with its HTTP listener (web view, JSON API, `/metrics`) on
    /// `http`, so a test can scrape it.
    pub async fn start_with_http(
        data: &Path,
        daemon_id: &str,
        http: std::net::SocketAddr,
        extra: &[&str],
    ) -> Self {
        Self::start_full(data, daemon_id, &http.to_string(), extra, |_| {}).await
    }

    async fn start_full(
        data: &Path,
        daemon_id: &str,
        http: &str,
        extra: &[&str],
        setup: impl FnOnce(&mut std::process::Command),
    ) -> Self {
        let addr_file = data.with_extension("addr");
        let _ = std::fs::remove_file(&addr_file);
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_mboxd"));
        command
            .args(["serve", "--listen", "127.0.0.1:0", "--daemon-id", daemon_id])
            .args(["--metrics-listen", http])
            .arg("--data-dir")
            .arg(data)
            .arg("--addr-file")
            .arg(&addr_file)
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null());
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("AWS_") {
                command.env_remove(name);
            }
        }
        setup(&mut command);
        let mut child = command.spawn().expect("start mboxd");
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file).map(|a| a.trim().to_owned())
                && !a.is_empty()
            {
                break a;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("mboxd stopped at start-up: {status}");
            }
            assert!(Instant::now() < deadline, "mboxd did not start");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        Self { child, addr }
    }

    pub async fn client(&self) -> Client {
        let url = format!("http://{}", self.addr);
        loop {
            match ModelStoreClient::connect(url.clone()).await {
                Ok(c) => {
                    return c
                        .max_encoding_message_size(usize::MAX)
                        .max_decoding_message_size(usize::MAX);
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            }
        }
    }

    fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// SIGKILL: no chance to flush anything.
    pub async fn kill(mut self) {
        self.signal("-KILL");
        self.wait().await;
    }

    /// SIGTERM and wait; returns whether mboxd exited 0.
    pub async fn terminate(mut self) -> bool {
        self.signal("-TERM");
        self.wait().await.success()
    }

    async fn wait(&mut self) -> std::process::ExitStatus {
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Peak resident set size so far (VmHWM), in bytes.
    pub fn peak_rss(&self) -> u64 {
        self.proc_field("status", "VmHWM:")
            .map_or(0, |kb| kb * 1024)
    }

    /// The number after `name` in the process's `/proc/<pid>/<file>` (such as
    /// `status` or `smaps_rollup`), if the file has it.
    pub fn proc_field(&self, file: &str, name: &str) -> Option<u64> {
        std::fs::read_to_string(format!("/proc/{}/{file}", self.child.id()))
            .ok()?
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }
}

impl Drop for Process {
    /// A test that fails half-way must not leave a daemon behind (it would also hold
    /// the test harness's output pipe open).
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every `step` value in the metrics files under `data`, with how often it occurs.
pub fn steps_on_disk(data: &Path) -> std::collections::HashMap<u64, u32> {
    let mut seen = std::collections::HashMap::new();
    for f in parquet_files(data, "metrics") {
        count_steps(std::fs::File::open(&f).expect("open"), &mut seen);
    }
    seen
}

/// Adds every `step` value of one metrics file to `seen`.
pub fn count_steps<R: parquet::file::reader::ChunkReader + 'static>(
    file: R,
    seen: &mut std::collections::HashMap<u64, u32>,
) {
    use arrow_array::cast::AsArray;
    use arrow_array::types::Int64Type;
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .expect("a whole Parquet file")
        .build()
        .expect("reader");
    for batch in reader {
        let batch = batch.expect("batch");
        let steps = batch.column_by_name("step").expect("step column");
        for s in steps.as_primitive::<Int64Type>().values() {
            *seen.entry(*s as u64).or_insert(0) += 1;
        }
    }
}

/// A free loopback address for a listener the test configures.
pub fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// Scrapes `http://<addr>/metrics`: sample name (with labels, as exposed) → value.
pub async fn scrape(addr: std::net::SocketAddr) -> std::collections::HashMap<String, f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to /metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: mboxd\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
    assert!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// GetMetrics for `id`, with full precision.
/// Every series of an experiment, following page tokens to the end; a series cut
/// across pages comes back joined.
pub async fn metrics_of(c: &mut Client, id: &str) -> Vec<proto::Metrics> {
    let mut out: Vec<proto::Metrics> = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .get_metrics(proto::GetMetricsRequest {
                parent_id: id.to_owned(),
                full_precision: true,
                page_token: token,
                ..Default::default()
            })
            .await
            .expect("GetMetrics")
            .into_inner();
        for m in page.metrics {
            match out.last_mut() {
                Some(last) if last.key == m.key => last.values.extend(m.values),
                _ => out.push(m),
            }
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}
