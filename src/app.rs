//! Wiring: builds what a command needs from its config and runs it. The client, the
//! source, the sink, the pipeline, the metrics exporter, logging and the one
//! [`shutdown_signal`] of the binary all meet here, and nowhere else.
//!
//! [`crate::cli`] parses arguments and calls into this module; `demo` uses it too.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use cfq_sinks::Sink;
use secrecy::SecretString;

use crate::cloudflare::{Client, ClientOptions};
use crate::config::{ArchiveConfig, Config, QueueConfig, SourceConfig};
use crate::pipeline::{self, Summary};
use crate::sources::archive::ArchiveSource;
use crate::sources::cloudflare::{CloudflareSource, SourceOptions};
use crate::stats::{MetricLabels, Stats};

/// Log output formats.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Sets up logging on stderr: `filter` (or RUST_LOG), as text or JSON lines, with
/// repeated warnings limited by [`crate::log_throttle`].
pub fn init_logging(filter: &str, format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::{EnvFilter, Layer as _};
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .or_else(|| EnvFilter::try_new(filter).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let output = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(|| LogWriter);
    let output = match format {
        LogFormat::Text => output.boxed(),
        LogFormat::Json => output.json().boxed(),
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(output.with_filter(crate::log_throttle::Throttle::start()))
        .try_init();
}

/// Log lines that could not be written to stderr (a full disk under a redirect, a closed
/// pipe), not yet reported.
static LOG_LINES_DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Stderr for log lines, where a failed write drops the line instead of failing. The
/// logging layer answers a writer's error by printing it with `eprintln!`, which panics
/// when stderr cannot be written: the task that logged would die and, with it, a pull
/// loop or the acker, leaving a process that is up and moves nothing. Dropped lines are
/// counted, and the count is reported by the next line that can be written.
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        use std::sync::atomic::Ordering;
        let mut stderr = std::io::stderr().lock();
        let dropped = LOG_LINES_DROPPED.swap(0, Ordering::AcqRel);
        if dropped > 0
            && writeln!(
                stderr,
                "({dropped} log lines could not be written to stderr and were dropped)"
            )
            .is_err()
        {
            LOG_LINES_DROPPED.fetch_add(dropped, Ordering::AcqRel);
        }
        if stderr.write_all(buf).is_err() {
            LOG_LINES_DROPPED.fetch_add(1, Ordering::AcqRel);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Writes a line for the user on stderr; unlike `eprintln!`, never panics when stderr
/// cannot be written.
pub fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Builds the API client for a queue config and token, warning about plain HTTP.
pub fn api_client(queue: &QueueConfig, token: &SecretString) -> anyhow::Result<Client> {
    api_client_in(queue, token, None)
}

/// [`api_client`] on a shared connection pool, when given (one pool per process: every
/// route's calls to one API host share its keep-alive connections).
pub fn api_client_in(
    queue: &QueueConfig,
    token: &SecretString,
    pool: Option<&reqwest::Client>,
) -> anyhow::Result<Client> {
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
        pool_size: (queue.most_pullers() + queue.most_ack_calls()) as usize,
        shared_pool: pool,
    })
    .context("building the API client")
}

/// Starts the metrics listener (`/metrics`, `/health`, `/ready`) when `[metrics] listen`
/// is set. Call it before creating any [`Stats`], so their families register with it.
pub async fn start_metrics(config: &Config) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics.listen {
        let addr = crate::metrics::serve(addr).await?;
        tracing::info!(%addr, "serving Prometheus metrics at /metrics, and /health and /ready");
    }
    Ok(())
}

/// The stats of the single route of `config` (its families labelled with its queue and
/// sink).
pub fn route_stats(config: &Config) -> anyhow::Result<Arc<Stats>> {
    let routes = config.routes()?;
    let route = routes.first().context("the config has no route")?;
    Ok(stats_for(route))
}

/// A route's stats, its families labelled with its name, queue and sink.
pub fn stats_for(route: &crate::config::Route<'_>) -> Arc<Stats> {
    Arc::new(Stats::new(MetricLabels {
        route: Arc::from(route.name),
        queue_id: Arc::from(match route.source {
            SourceConfig::Queue(queue) => queue.queue_id.as_str(),
            SourceConfig::Archive(_) => "",
        }),
        sink: route.sink.kind(),
    }))
}

/// `cfq-bridge run`: loads the config, starts the metrics listener and runs every route
/// until a signal (or until each is drained, with `until_empty`).
pub async fn run_command(path: &std::path::Path, until_empty: bool) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    run_routes(&config, until_empty, shutdown_signal()).await
}

/// Runs every route of `config` in this runtime, side by side, until `shutdown` (or, with
/// `until_empty`, until each is drained). Each route has its own in-flight bound, back-off,
/// sink health and counters; they share the metrics listener and one connection pool. A
/// fatal error in one route stops them all, and is returned naming the route.
pub async fn run_routes(
    config: &Config,
    until_empty: bool,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let routes = config.routes()?;
    // A config of `[[routes]]` names the route in errors; the single-route form does not.
    let named = !config.routes.is_empty();
    let in_route = |error: anyhow::Error, name: &str| {
        if named {
            error.context(format!("route `{name}`"))
        } else {
            error
        }
    };
    // Every token first: a missing one fails before anything starts.
    let mut tokens = Vec::with_capacity(routes.len());
    let mut pool_size = 0usize;
    for route in &routes {
        tokens.push(match route.source {
            SourceConfig::Queue(queue) => {
                pool_size += (queue.most_pullers() + queue.most_ack_calls()) as usize;
                Some(
                    route
                        .api_token()
                        .map_err(|e| in_route(e.into(), route.name))?,
                )
            }
            SourceConfig::Archive(_) => None,
        });
    }
    start_metrics(config).await?;
    let pool = Client::pool(pool_size).context("building the HTTP connection pool")?;
    let stop = tokio_util::sync::CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let mut running = tokio::task::JoinSet::new();
    for (route, token) in routes.iter().zip(tokens) {
        let name = route.name.to_string();
        let stats = stats_for(route);
        let sink = build_sink(route.sink)
            .await
            .map_err(|e| in_route(e, &name))?;
        let shutdown = stop.clone().cancelled_owned();
        match (route.source, token) {
            (SourceConfig::Queue(queue), Some(token)) => {
                let client =
                    api_client_in(queue, &token, Some(&pool)).map_err(|e| in_route(e, &name))?;
                let queue = queue.clone();
                let options = SourceOptions { until_empty };
                running.spawn(async move {
                    let result =
                        run_cloudflare(queue, client, sink, stats, options, shutdown).await;
                    (name, false, result)
                });
            }
            (SourceConfig::Archive(archive), _) => {
                let archive = archive.clone();
                running.spawn(async move {
                    let result = run_archive(archive, sink, stats, shutdown).await;
                    (name, true, result)
                });
            }
            (SourceConfig::Queue(_), None) => bail!("route `{name}`: no API token"),
        }
    }
    let mut failed: Option<anyhow::Error> = None;
    while let Some(joined) = running.join_next().await {
        match joined {
            Ok((name, archive, Ok(summary))) => log_summary(&name, &summary, archive),
            Ok((name, _, Err(error))) => {
                stop.cancel();
                failed.get_or_insert(in_route(error, &name));
            }
            Err(error) => {
                stop.cancel();
                failed.get_or_insert(anyhow::anyhow!("a route's task failed: {error}"));
            }
        }
    }
    failed.map_or(Ok(()), Err)
}

/// Builds the sink a `[sink]` table describes, with its kind in the error.
pub async fn build_sink(config: &cfq_sinks::SinkConfig) -> anyhow::Result<Arc<dyn Sink>> {
    let sink = cfq_sinks::build(config)
        .await
        .with_context(|| format!("opening the {} sink", config.kind()))?;
    Ok(Arc::from(sink))
}

/// Runs the archive source of `archive` into an already built `sink`, until every input
/// is read and settled (or `shutdown`).
pub async fn run_archive(
    archive: ArchiveConfig,
    sink: Arc<dyn Sink>,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    tracing::info!(
        route = %stats.labels().route,
        paths = ?archive.paths,
        checkpoint = ?archive.checkpoint,
        sink = sink.kind(),
        "bridge starting (archive source)"
    );
    let source = Arc::new(ArchiveSource::new(archive, Arc::clone(&stats))?);
    let options = source.pipeline_options();
    // The source logs what it read when it finishes.
    let summary = pipeline::run(source, sink, stats, options, shutdown).await?;
    Ok(summary)
}

/// Builds the client and sink and runs the pipeline until `shutdown` (or drained).
pub async fn run_pipeline(
    config: Config,
    token: SecretString,
    until_empty: bool,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    let stats = route_stats(&config)?;
    run_pipeline_with_stats(config, token, until_empty, shutdown, stats).await
}

/// [`run_pipeline`] with counters the caller can watch while it runs.
pub async fn run_pipeline_with_stats(
    config: Config,
    token: SecretString,
    until_empty: bool,
    shutdown: impl Future<Output = ()>,
    stats: Arc<Stats>,
) -> anyhow::Result<Summary> {
    let queue = config.queue()?.clone();
    let sink_config = config.sink()?;
    let client = api_client(&queue, &token)?;
    let sink = build_sink(sink_config).await?;
    run_cloudflare(
        queue,
        client,
        sink,
        stats,
        SourceOptions { until_empty },
        shutdown,
    )
    .await
}

/// Runs the Cloudflare source of `queue` into an already built `sink`.
pub async fn run_cloudflare(
    queue: QueueConfig,
    client: Client,
    sink: Arc<dyn Sink>,
    stats: Arc<Stats>,
    options: SourceOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    tracing::info!(
        route = %stats.labels().route,
        queue_id = %queue.queue_id,
        sink = sink.kind(),
        pullers = %queue.pullers,
        batch_size = queue.batch_size,
        max_in_flight = queue.max_in_flight,
        "bridge starting"
    );
    let source = CloudflareSource::new(queue, client, Arc::clone(&stats), options)?;
    let pipeline_options = source.pipeline_options();
    let summary = pipeline::run(Arc::new(source), sink, stats, pipeline_options, shutdown).await?;
    Ok(summary)
}

/// Logs what a route's run did.
fn log_summary(route: &str, summary: &Summary, archive: bool) {
    let s = &summary.stats;
    if archive {
        // Nothing is pulled or acked: the source logged what it read and where it stopped.
        tracing::info!(
            route,
            reason = ?summary.reason,
            elapsed_ms = summary.elapsed.as_millis() as u64,
            delivered = s.confirmed,
            dead_lettered = s.sink_dead_lettered,
            refused = s.sink_permanent_failures,
            unrecorded_confirmed = summary.unacked_confirmed,
            "bridge stopped"
        );
        return;
    }
    tracing::info!(
        route,
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
        say(format_args!(
            "second signal: exiting now; unacknowledged messages will be redelivered"
        ));
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

/// `cfq-bridge check`: validates the config, makes one authenticated call to the queue,
/// opens and checks the sink.
pub async fn check_command(path: &std::path::Path) -> anyhow::Result<()> {
    let config = Config::load(path).context("config")?;
    println!("config: ok ({})", path.display());
    let routes = config.routes()?;
    for route in &routes {
        if !config.routes.is_empty() {
            println!("route {}:", route.name);
        }
        let checked = check_route(route).await;
        if config.routes.is_empty() {
            checked?;
        } else {
            checked.with_context(|| format!("route `{}`", route.name))?;
        }
    }
    println!("check passed");
    Ok(())
}

/// `check` for one route: its source (token, one API call, the pull consumer; or the
/// archive's files), then its sink.
async fn check_route(route: &crate::config::Route<'_>) -> anyhow::Result<()> {
    let sink_config = route.sink;
    let mut warnings = Vec::new();
    let ctx = match route.source {
        SourceConfig::Queue(queue) => {
            check_queue(route, queue, &mut warnings).await?;
            cfq_sinks::CheckContext {
                visibility_timeout_ms: queue.visibility_timeout_ms,
                max_retry_delay_secs: queue.retry_max_delay_secs,
            }
        }
        SourceConfig::Archive(archive) => {
            // Expands the globs and reads the checkpoint, as a run would; reads no record.
            let source = ArchiveSource::new(archive.clone(), Arc::new(Stats::default()))
                .context("archive")?;
            let report = source.report();
            println!(
                "archive: ok: {} files, starting at {}",
                report.files.len(),
                report.position_text()
            );
            // Nothing expires while an archive record waits for its sink.
            cfq_sinks::CheckContext {
                visibility_timeout_ms: crate::config::MAX_VISIBILITY_TIMEOUT_MS,
                max_retry_delay_secs: archive.retry_max_delay_secs,
            }
        }
    };
    let sink = cfq_sinks::build(sink_config)
        .await
        .with_context(|| format!("sink: opening the {} sink", sink_config.kind()))?;
    let sink_warnings = sink
        .check(&ctx)
        .await
        .with_context(|| format!("sink: checking the {} sink", sink_config.kind()))?;
    warnings.extend(sink_warnings);
    let _ = sink.close().await;
    println!("sink: ok ({})", sink_config.kind());
    for w in &warnings {
        println!("warning: {w}");
    }
    Ok(())
}

/// `check` for a `[queue]` source: the token, one authenticated call, the pull consumer.
async fn check_queue(
    route: &crate::config::Route<'_>,
    queue: &QueueConfig,
    warnings: &mut Vec<String>,
) -> anyhow::Result<()> {
    let token = route.api_token().context("token")?;
    println!("token: found");
    let client = api_client(queue, &token)?;
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
        queue.queue_id, queue.api_base_url
    );
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
    Ok(())
}
