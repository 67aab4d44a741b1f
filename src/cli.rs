//! The command line: `run`, `check`, `emulator`, `demo`.
//!
//! Secrets are never accepted as arguments: the API token comes from the environment
//! (`CLOUDFLARE_API_TOKEN`) or from the file named by `queue.api_token_file`.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand, ValueEnum};
use secrecy::SecretString;

use crate::cloudflare::{Client, ClientOptions};
use crate::config::{Config, QueueConfig};
use crate::pipeline::{self, RunOptions, Summary};
use crate::stats::Stats;

/// Move messages out of Cloudflare Queues into Kafka, NATS, stdout or JSONL files,
/// at least once: a message is acknowledged only after its destination confirmed it.
#[derive(Parser, Debug)]
#[command(name = "cfq-bridge", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// Log level or filter (`info`, `debug`, `cfq_bridge=trace,info`). RUST_LOG also works.
    #[arg(long, global = true, env = "CFQ_LOG", default_value = "info")]
    pub log: String,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Log output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the bridge: pull from the queue, deliver to the sink, acknowledge.
    ///
    /// The API token comes from CLOUDFLARE_API_TOKEN or queue.api_token_file.
    /// SIGINT/SIGTERM stop it cleanly (a second signal exits at once).
    Run {
        /// The TOML config file (see config/ for examples).
        #[arg(long, short)]
        config: PathBuf,
        /// Exit 0 once the queue is drained (an empty pull, a backlog of 0, nothing in
        /// flight). For export and archive jobs.
        #[arg(long)]
        until_empty: bool,
    },
    /// Validate the config, make one authenticated call to the queue, and open the sink.
    /// Exits non-zero with a message when any step fails.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a local Cloudflare Queues API emulator (for tests and development).
    Emulator(crate::emulator::EmulatorArgs),
    /// Try the whole pipeline locally: an embedded emulator seeded with sample messages,
    /// bridged to stdout (or a JSONL file). No account or broker needed.
    Demo(crate::demo::DemoArgs),
}

/// Parses arguments, runs the command, and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                config,
                until_empty,
            } => run_command(&config, until_empty).await,
            Command::Check { config } => check_command(&config).await,
            Command::Emulator(args) => crate::emulator::run(args).await,
            Command::Demo(args) => crate::demo::run(args).await,
        }
    });
    // Don't wait for blocking tasks (a stdout writer stuck on a closed pipe, say).
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Builds the API client for a queue config and token, warning about plain HTTP.
pub fn api_client(queue: &QueueConfig, token: &SecretString) -> anyhow::Result<Client> {
    if queue.api_base_url.starts_with("http://") {
        tracing::warn!(
            url = %queue.api_base_url,
            "queue.api_base_url is plain http: the token travels unencrypted (fine for a local emulator only)"
        );
    }
    Client::new(ClientOptions {
        base_url: &queue.api_base_url,
        account_id: &queue.account_id,
        queue_id: &queue.queue_id,
        token,
        request_timeout: Duration::from_millis(queue.request_timeout_ms),
        max_response_bytes: queue.max_response_bytes,
        pool_size: (queue.pullers + queue.ack_concurrency) as usize,
    })
    .context("building the API client")
}

/// Starts the Prometheus exporter when `[metrics] listen` is set.
fn start_metrics(config: &Config) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics.listen {
        crate::stats::serve_prometheus(addr)?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics");
    }
    Ok(())
}

async fn run_command(path: &std::path::Path, until_empty: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let token = config.api_token()?;
    start_metrics(&config)?;
    let summary = run_pipeline(config, token, until_empty, shutdown_signal()).await?;
    log_summary(&summary);
    Ok(())
}

/// Builds the client and sink and runs the pipeline until `shutdown` (or drained).
pub async fn run_pipeline(
    config: Config,
    token: SecretString,
    until_empty: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    run_pipeline_with_stats(
        config,
        token,
        until_empty,
        shutdown,
        Arc::new(Stats::default()),
    )
    .await
}

/// [`run_pipeline`] with counters the caller can watch while it runs.
pub async fn run_pipeline_with_stats(
    config: Config,
    token: SecretString,
    until_empty: bool,
    shutdown: impl Future<Output = ()>,
    stats: Arc<Stats>,
) -> anyhow::Result<Summary> {
    let client = api_client(&config.queue, &token)?;
    let sink = cfq_sinks::build(&config.sink)
        .await
        .with_context(|| format!("opening the {} sink", config.sink.kind()))?;
    tracing::info!(
        queue = %config.queue.queue_id,
        sink = config.sink.kind(),
        pullers = config.queue.pullers,
        batch_size = config.queue.batch_size,
        max_in_flight = config.queue.max_in_flight,
        "bridge starting"
    );
    let summary = pipeline::run(
        config.queue,
        client,
        Arc::from(sink),
        stats,
        RunOptions { until_empty },
        shutdown,
    )
    .await?;
    Ok(summary)
}

fn log_summary(summary: &Summary) {
    let s = &summary.stats;
    tracing::info!(
        reason = ?summary.reason,
        elapsed_ms = summary.elapsed.as_millis() as u64,
        pulled = s.pulled,
        confirmed = s.confirmed,
        acked = s.acked,
        released = s.released,
        duplicates = s.duplicates,
        decode_errors = s.decode_errors,
        v8_released = s.v8_released,
        unacked_confirmed = summary.unacked_confirmed,
        "bridge stopped"
    );
}

/// Resolves on the first SIGINT or SIGTERM; a second one exits the process at once
/// (nothing unconfirmed is acknowledged: the process just ends).
pub async fn shutdown_signal() {
    wait_for_signal().await;
    tokio::spawn(async {
        wait_for_signal().await;
        eprintln!("second signal: exiting now; unacknowledged messages will be redelivered");
        std::process::exit(130);
    });
}

#[cfg(unix)]
async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(not(unix))]
async fn wait_for_signal() {
    let _ = tokio::signal::ctrl_c().await;
}

async fn check_command(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path).context("config")?;
    println!("config: ok ({})", path.display());
    let token = config.api_token().context("token")?;
    println!("token: found");
    let client = api_client(&config.queue, &token)?;
    let details = client
        .queue_details()
        .await
        .context("API: reading the queue's details")?;
    let name = details
        .get("queue_name")
        .and_then(|v| v.as_str())
        .unwrap_or("?");
    println!(
        "API: ok: queue {} ({name}) at {}",
        config.queue.queue_id, config.queue.api_base_url
    );
    let mut warnings = Vec::new();
    let consumers = details
        .get("consumers")
        .and_then(|v| v.as_array())
        .cloned()
        .unwrap_or_default();
    let pull = consumers
        .iter()
        .find(|c| c.get("type").and_then(|t| t.as_str()) == Some("http_pull"));
    match pull {
        None if !consumers.is_empty() => bail!(
            "the queue has no HTTP pull consumer (add one with `wrangler queues consumer http add <queue>`)"
        ),
        None => warnings.push("the queue details list no consumer; make sure an HTTP pull consumer is attached".to_string()),
        Some(c) => {
            if let Some(max_retries) = c.pointer("/settings/max_retries").and_then(|v| v.as_u64()) {
                println!("API: http_pull consumer, max_retries {max_retries}");
            }
        }
    }
    let sink = cfq_sinks::build(&config.sink)
        .await
        .with_context(|| format!("sink: opening the {} sink", config.sink.kind()))?;
    let ctx = cfq_sinks::CheckContext {
        visibility_timeout_ms: config.queue.visibility_timeout_ms,
        max_retry_delay_secs: config.queue.retry_max_delay_secs,
    };
    let sink_warnings = sink
        .check(&ctx)
        .await
        .with_context(|| format!("sink: checking the {} sink", config.sink.kind()))?;
    warnings.extend(sink_warnings);
    let _ = sink.close().await;
    println!("sink: ok ({})", config.sink.kind());
    for w in &warnings {
        println!("warning: {w}");
    }
    println!("check passed");
    Ok(())
}
