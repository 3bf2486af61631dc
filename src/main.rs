//! The `mboxd` binary: parses flags, starts tracing, and runs [`mboxd::server`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mboxd::config::{Config, Durability, LogFormat, Namespaces, StorageRoot, Tls, TokenValue};

// Request-per-point workloads allocate per request; mimalloc measurably cuts that cost.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "mboxd",
    version,
    about = "High-throughput ML experiment tracking ingest"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the ModelStore gRPC API.
    Serve(ServeArgs),
    /// Print the effective configuration (file, environment variables and flags
    /// merged, then checked) as JSON, and exit. Takes the same options as `serve`.
    Config(ServeArgs),
    /// Run one compaction and retention pass over a data folder that no daemon
    /// holds, print each partition as it is done, and exit. Takes the same
    /// options as `serve`.
    Compact(ServeArgs),
}

/// Flags override the config file; `MBOXD_*` environment variables stand in for flags.
#[derive(Debug, clap::Args)]
struct ServeArgs {
    /// Config file (see config/mboxd.toml for every setting and its default).
    #[arg(long, env = "MBOXD_CONFIG")]
    config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:8085].
    #[arg(long, env = "MBOXD_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data folder: index, daemon id and Parquet tables [default: ./mbox-data].
    #[arg(long, env = "MBOXD_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Daemon id used in file names [default: host name plus a random suffix, kept in the data folder].
    #[arg(long, env = "MBOXD_DAEMON_ID")]
    daemon_id: Option<String>,
    /// When to acknowledge writes [default: wal-fsync].
    #[arg(long, env = "MBOXD_DURABILITY")]
    durability: Option<Durability>,
    /// Where Parquet files go: "" for the data folder, or s3://bucket/prefix
    /// (credentials, region and endpoint from [storage.s3] or the AWS_* variables).
    #[arg(long, env = "MBOXD_STORAGE_ROOT")]
    storage_root: Option<String>,
    /// Publish a partition's rows once the oldest is this old, in ms [default: 5000].
    #[arg(long, env = "MBOXD_ROLL_MAX_AGE_MS")]
    roll_max_age_ms: Option<u64>,
    /// Bound on bytes held in queues and buffers [default: 48 MiB].
    #[arg(long, env = "MBOXD_MAX_BUFFERED_BYTES")]
    max_buffered_bytes: Option<usize>,
    /// HTTP listen address: Prometheus /metrics, the web view and its JSON API
    /// [default: 127.0.0.1:9185].
    #[arg(long, alias = "metrics-listen", env = "MBOXD_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// Turn the HTTP listener (metrics and web view) off.
    #[arg(long, alias = "no-http")]
    no_metrics: bool,
    /// TLS certificate chain (PEM) for both listeners; with --tls-key-file turns TLS
    /// on. Re-read when the file changes.
    #[arg(long, env = "MBOXD_TLS_CERT_FILE")]
    tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "MBOXD_TLS_KEY_FILE")]
    tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) for mutual TLS: gRPC clients must present a
    /// certificate signed by one of them.
    #[arg(long, env = "MBOXD_TLS_CLIENT_CA_FILE")]
    tls_client_ca_file: Option<PathBuf>,
    /// A TOML file of [[tokens]] (a mounted Secret); turns token authentication on.
    #[arg(long, env = "MBOXD_AUTH_TOKENS_FILE")]
    auth_tokens_file: Option<PathBuf>,
    /// Log format [default: text].
    #[arg(long, env = "MBOXD_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Write the bound address to this file once listening (for scripts and tests).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Run as a reader: serve every daemon's data from the shared storage root (as
    /// their change logs describe it) and accept no writes. Same as
    /// `[reader] enabled = true`.
    #[arg(long)]
    reader: bool,
}

impl ServeArgs {
    fn into_config(self) -> anyhow::Result<(Config, Option<PathBuf>)> {
        let mut config = Config::from_file(self.config.as_deref())?;
        if let Some(v) = self.listen {
            config.listen = v;
        }
        if let Some(v) = self.data_dir {
            config.data_dir = v;
        }
        if self.daemon_id.is_some() {
            config.daemon_id = self.daemon_id;
        }
        if let Some(v) = self.durability {
            config.durability = v;
        }
        if let Some(v) = self.storage_root {
            config.storage.root = StorageRoot::parse(&v)?;
        }
        if let Some(v) = self.roll_max_age_ms {
            config.roll.max_age = Duration::from_millis(v);
        }
        if let Some(v) = self.max_buffered_bytes {
            config.max_buffered_bytes = v;
        }
        if let Some(v) = self.http_listen {
            config.http_listen = Some(v);
        }
        if self.no_metrics {
            config.http_listen = None;
        }
        if let Some(v) = self.log_format {
            config.log_format = v;
        }
        config.tls = match (config.tls.take(), self.tls_cert_file, self.tls_key_file) {
            (tls, None, None) => tls,
            (Some(tls), cert, key) => Some(Tls {
                cert_file: cert.unwrap_or(tls.cert_file),
                key_file: key.unwrap_or(tls.key_file),
                ..tls
            }),
            (None, Some(cert_file), Some(key_file)) => Some(Tls {
                cert_file,
                key_file,
                client_ca_file: None,
            }),
            (None, _, _) => anyhow::bail!("give --tls-cert-file and --tls-key-file together"),
        };
        if let Some(ca) = self.tls_client_ca_file {
            match &mut config.tls {
                Some(tls) => tls.client_ca_file = Some(ca),
                None => anyhow::bail!("--tls-client-ca-file needs a certificate and key"),
            }
        }
        if self.reader {
            config.reader.enabled = true;
        }
        if let Some(path) = self.auth_tokens_file {
            config.auth.enabled = true;
            config.auth.tokens_file = Some(path);
        }
        config.validate()?;
        Ok((config, self.addr_file))
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is called,
/// before start-up work, so a signal during recovery still means a graceful stop.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

/// TLS and auth as `mboxd config` shows them: files, names, scopes and
/// namespaces, never a token.
fn describe_security(config: &Config) -> (serde_json::Value, serde_json::Value) {
    let tls = config.tls.as_ref().map(|t| {
        serde_json::json!({
            "cert_file": t.cert_file,
            "key_file": t.key_file,
            "client_ca_file": t.client_ca_file,
        })
    });
    let a = &config.auth;
    let tokens: Vec<_> = a
        .tokens
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name,
                "token_file": match &t.value {
                    TokenValue::File(p) => Some(p),
                    TokenValue::Inline(_) => None,
                },
                "scopes": t.scopes.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                "namespaces": match &t.namespaces {
                    Namespaces::All => vec!["*".to_owned()],
                    Namespaces::Only(set) => set.iter().cloned().collect(),
                },
            })
        })
        .collect();
    let auth = serde_json::json!({
        "enabled": a.enabled,
        "allow_unauthenticated_loopback": a.allow_unauthenticated_loopback,
        "tokens_file": a.tokens_file,
        "tokens": tokens,
    });
    (serde_json::json!(tls), auth)
}

/// mimalloc's `mi_option_purge_delay` (the same in its v2 and v3 headers); the sys
/// crate names no constant for it.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Applies `[server] allocator_purge_delay_ms` to the global allocator (over
/// `MIMALLOC_PURGE_DELAY`).
fn set_allocator_options(config: &Config) {
    let ms = std::ffi::c_long::try_from(config.allocator_purge_delay.as_millis())
        .unwrap_or(std::ffi::c_long::MAX);
    // SAFETY: mi_option_set stores one aligned `long` and marks the option
    // initialised; any value is valid. Threads already running (the runtime's)
    // read the option at their next purge decision and see the old or the new
    // value, either of which is a valid delay.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms) }
}

/// The allocator's purge delay in effect, in milliseconds.
fn allocator_purge_delay_ms() -> std::ffi::c_long {
    // SAFETY: mi_option_get reads one option's value; any option index is valid.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

/// The settings operators check against their deployment (ports, paths, time
/// budgets, memory bound, TLS files, token scopes), as JSON.
fn describe(config: &Config) -> serde_json::Value {
    let (tls, auth) = describe_security(config);
    let storage_root = match &config.storage.root {
        StorageRoot::DataDir => String::new(),
        StorageRoot::S3 { bucket, prefix } => format!("s3://{bucket}/{prefix}"),
    };
    serde_json::json!({
        "listen": config.listen.to_string(),
        "metrics_listen": config.http_listen.map(|a| a.to_string()),
        "http_listen": config.http_listen.map(|a| a.to_string()),
        "data_dir": config.data_dir,
        "daemon_id": config.daemon_id,
        "durability": format!("{:?}", config.durability),
        "storage_root": storage_root,
        "spool_max_bytes": config.storage.spool_max_bytes,
        "shutdown_timeout_ms": config.shutdown_timeout.as_millis() as u64,
        "not_serving_grace_ms": config.not_serving_grace.as_millis() as u64,
        "max_buffered_bytes": config.max_buffered_bytes,
        "max_concurrent_requests": config.concurrent_requests(),
        "max_connections": config.max_connections,
        // Read back from the allocator, so this shows what start-up put in effect.
        "allocator_purge_delay_ms": allocator_purge_delay_ms(),
        "transparent_huge_pages": huge_pages_allowed(),
        "max_message_bytes": config.limits.max_message_bytes,
        "max_rows": config.roll.max_rows,
        "memory_bound_bytes": config.memory_bound_bytes(),
        "role": if config.reader.enabled { "reader" } else { "writer" },
        "change_log": config.change_log_enabled(),
        "reader_poll_interval_ms": config.reader.poll_interval.as_millis() as u64,
        "tls": tls,
        "auth": auth,
    })
}

/// `mboxd compact`: one pass, with a line per partition.
async fn compact(args: ServeArgs) -> anyhow::Result<()> {
    let (config, _) = args.into_config()?;
    mboxd::telemetry::init(config.log_format);
    set_allocator_options(&config);
    let dir = config.data_dir.clone();
    println!("compacting {}", dir.display());
    let started = std::time::Instant::now();
    let report = mboxd::server::compact_once(config, |p| {
        println!(
            "  {}: {} files ({:.1} MiB) -> {} ({:.1} MiB), {} rows in {:.1} s",
            p.partition,
            p.files_in,
            p.bytes_in as f64 / (1 << 20) as f64,
            p.files_out,
            p.bytes_out as f64 / (1 << 20) as f64,
            p.rows,
            p.elapsed.as_secs_f64()
        );
    })
    .await
    .with_context(|| format!("compacting {}", dir.display()))?;
    let files_in: usize = report.partitions.iter().map(|p| p.files_in).sum();
    let files_out: usize = report.partitions.iter().map(|p| p.files_out).sum();
    println!(
        "done in {:.1} s: {} partitions, {files_in} files -> {files_out}; {} expired files deleted",
        started.elapsed().as_secs_f64(),
        report.partitions.len(),
        report.expired_files
    );
    for (partition, reason) in &report.failed {
        println!("  {partition}: left as it was: {reason}");
    }
    if !report.failed.is_empty() {
        anyhow::bail!("{} partitions could not be compacted", report.failed.len());
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    small_pages_only();
    let cli = Cli::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run(cli))
}

/// Keeps this process's memory in 4 KiB pages, before the runtime's threads start.
///
/// mimalloc reserves its heap in 1 GiB arenas and, unless built with `no_thp`
/// (Cargo.toml), asks for transparent huge pages on them; a kernel set to
/// `always` gives them without asking. Either way each 2 MiB region the heap
/// touches counts whole in RSS: an idle daemon measured 69 MiB with huge pages
/// and 35 MiB without, on a kernel set to `madvise`. For a sidecar under a memory
/// limit that inflation is pure cost, so it is turned off for the whole process.
fn small_pages_only() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        // Nothing is set up to log yet, and the daemon works either way.
        eprintln!("mboxd: transparent huge pages stay enabled: {e}");
    }
}

/// Whether this process may use transparent huge pages (see
/// [`small_pages_only`]), read back from the kernel; `None` where it cannot say.
fn huge_pages_allowed() -> Option<bool> {
    #[cfg(target_os = "linux")]
    {
        rustix::thread::transparent_huge_pages_are_disabled()
            .ok()
            .map(|disabled| !disabled)
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let args = match cli.command {
        Command::Serve(args) => args,
        Command::Config(args) => {
            let (config, _) = args.into_config()?;
            set_allocator_options(&config);
            println!("{:#}", describe(&config));
            return Ok(());
        }
        Command::Compact(args) => return compact(args).await,
    };
    let shutdown = shutdown_signal()?;
    let (config, addr_file) = args.into_config()?;
    mboxd::telemetry::init(config.log_format);
    set_allocator_options(&config);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    if let Some(path) = addr_file {
        let addr = listener.local_addr()?;
        std::fs::write(&path, addr.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    mboxd::server::run(config, listener, shutdown)
        .await
        .context("mboxd failed")
}
