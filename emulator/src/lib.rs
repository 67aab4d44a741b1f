//! cfq-emulator: a local Cloudflare Queues API, for tests, demos and local development.
//!
//! It is a crate of its own, independent of cfq-bridge: it shares no client, parser or
//! type with the bridge, so that tests of the bridge against it check two independent
//! readings of Cloudflare's API against each other. The `cfq-bridge emulator` command and
//! the `cfq-emulator` binary both run [`run`].
//!
//! It serves the HTTP pull-consumer API (publish, publish batch, pull, ack, queue details)
//! under both `/client/v4/accounts/...` and `/accounts/...`, with Cloudflare's response
//! envelope and error shapes, permissive leases, retries with delays, `max_retries` and a
//! dead-letter queue. On top of that it injects faults (500s, 429s, "applied then 500",
//! latency, HTML 502s, empty 520s, paused queues), answers scripted raw responses, records
//! requests, and offers an admin API under `/_emulator/` (loopback peers only).
//! `docs/emulator.md` is the user documentation.
//!
//! Modules:
//! - `state`: one queue: messages, leases, delays, retry counting, stats;
//! - `registry`: all queues, created on first use, and dead-letter moves;
//! - `lease`: the lease id format;
//! - [`ContentType`]: the `CF-Content-Type` values;
//! - `wire`: request parsing and validation, response encoding, error codes;
//! - [`faults`]: fault injection and scripted responses;
//! - `server`: routing, auth, recording and the API handlers;
//! - `details`: queue details, and the refusal of pulls from a queue without an HTTP pull
//!   consumer;
//! - [`admin`]: the admin API.
//!
//! In-process use (tests):
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use cfq_emulator::{start, EmulatorConfig, SeedSpec};
//! let emulator = start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default()).await?;
//! let ids = emulator.seed("acct", "queue", &SeedSpec::default());
//! let base_url = emulator.base_url(); // http://127.0.0.1:PORT/client/v4
//! # let _ = (ids, base_url);
//! emulator.shutdown().await;
//! # Ok(()) }
//! ```

pub mod admin;
mod content_type;
mod details;
pub mod faults;
mod lease;
mod registry;
mod server;
mod shared;
mod state;
mod wire;

use std::fmt;
use std::future::IntoFuture as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::serve::ListenerExt as _;
use serde_json::{Map, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use admin::peer_allowed as admin_peer_allowed;
pub use content_type::ContentType;
pub use faults::{Endpoint, Faults, FaultsError, ScriptedResponse};
pub use shared::RecordedRequest;
pub use state::QueueStats;
pub use wire::{
    DEFAULT_PULL_BATCH, DEFAULT_VISIBILITY_TIMEOUT_MS, MAX_BATCH_BYTES, MAX_BATCH_MESSAGES,
    MAX_BODY_BYTES, MAX_DELAY_SECONDS, MAX_ID_LEN, MAX_PULL_BATCH, MAX_VISIBILITY_TIMEOUT_MS,
};

use shared::Shared;

/// Largest accepted `max_retries` (Cloudflare's limit).
pub const MAX_RETRIES_LIMIT: u32 = 100;

/// How often due leases and delays are applied in the background, in milliseconds.
const SWEEP_INTERVAL_MS: u64 = 20;

/// How long [`Emulator::shutdown`] lets open responses finish before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Options of `cfq-bridge emulator` and of the `cfq-emulator` binary.
#[derive(clap::Args, Clone)]
pub struct EmulatorArgs {
    /// TCP port to listen on (0 picks a free port; the address is printed on stdout).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
    /// Address to listen on. The admin API answers loopback peers only, whatever this is.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// An API token to accept (repeatable, or comma-separated in CFQ_EMULATOR_TOKEN).
    /// Without any, every non-empty bearer token is accepted.
    #[arg(
        long = "token",
        value_name = "TOKEN",
        env = "CFQ_EMULATOR_TOKEN",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub tokens: Vec<String>,
    /// Deliveries a message gets before it is dropped or dead-lettered (0..=100).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_retries: u32,
    /// Queue (in the same account) that receives messages whose retries ran out.
    #[arg(long, value_name = "NAME")]
    pub dead_letter_queue: Option<String>,
    /// A queue id (in any account) that has no HTTP pull consumer: its details list no
    /// consumer and pulls get HTTP 405 (repeatable).
    #[arg(long = "no-pull-consumer", value_name = "QUEUE")]
    pub no_pull_consumer: Vec<String>,
    /// Record every API request (see `GET /_emulator/requests`).
    #[arg(long)]
    pub record_requests: bool,
    /// Fault injection (changeable at run time through `PUT /_emulator/faults`).
    #[command(flatten)]
    pub faults: Faults,
}

impl fmt::Debug for EmulatorArgs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorArgs")
            .field("port", &self.port)
            .field("host", &self.host)
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("max_retries", &self.max_retries)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("no_pull_consumer", &self.no_pull_consumer)
            .field("record_requests", &self.record_requests)
            .field("faults", &self.faults)
            .finish()
    }
}

/// Configuration of an emulator started in process with [`start`].
#[derive(Clone)]
pub struct EmulatorConfig {
    /// API tokens accepted as `Authorization: Bearer TOKEN` (or as `X-Auth-Key` with an
    /// `X-Auth-Email`). Empty accepts any non-empty token; a request without one always
    /// gets a 401 (code 10000).
    pub tokens: Vec<String>,
    /// The consumer's `max_retries`: a message whose delivery number `attempts` reached
    /// this value leaves the queue when that delivery fails (0..=100, default 3).
    pub max_retries: u32,
    /// Queue name that receives messages whose retries ran out (in the same account);
    /// `None` drops them.
    pub dead_letter_queue: Option<String>,
    /// Queue ids (in any account) that have no HTTP pull consumer: their details list no
    /// consumer and pulls are refused with HTTP 405, as Cloudflare does. Default: none;
    /// every other queue has one. [`Emulator::set_pull_consumer`] changes one queue.
    pub queues_without_pull_consumer: Vec<String>,
    /// Faults injected from the start (default: none).
    pub faults: Faults,
    /// Record every API request for [`Emulator::recorded_requests`].
    pub record_requests: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            tokens: Vec::new(),
            max_retries: 3,
            dead_letter_queue: None,
            queues_without_pull_consumer: Vec::new(),
            faults: Faults::default(),
            record_requests: false,
        }
    }
}

impl fmt::Debug for EmulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EmulatorConfig")
            .field("tokens", &format_args!("[{} redacted]", self.tokens.len()))
            .field("max_retries", &self.max_retries)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field(
                "queues_without_pull_consumer",
                &self.queues_without_pull_consumer,
            )
            .field("faults", &self.faults)
            .field("record_requests", &self.record_requests)
            .finish()
    }
}

/// What to seed: `count` generated messages of `body_size` bytes of `content_type`.
///
/// Bodies are distinct and reproducible: `text` is ASCII (`seed message N ...`), `json` an
/// object `{"seq":N,"pad":"..."}` (never smaller than `{"seq":N}`), `bytes` pseudo-random
/// bytes and `v8` an opaque payload starting with `0xFF 0x0F`. Seeded messages carry
/// `CF-sourceMessageSource: worker`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedSpec {
    /// Number of messages.
    pub count: usize,
    /// Size of each decoded body, in bytes.
    pub body_size: usize,
    /// Their `CF-Content-Type`.
    pub content_type: ContentType,
}

impl Default for SeedSpec {
    fn default() -> Self {
        SeedSpec {
            count: 10,
            body_size: 100,
            content_type: ContentType::Json,
        }
    }
}

/// The answer of an in-process call ([`Emulator::request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiAnswer {
    /// The HTTP status the server would have sent (200, or the error's status).
    pub status: u16,
    /// The response body: Cloudflare's JSON envelope.
    pub body: Vec<u8>,
}

/// A running emulator. Dropping it stops the server as [`Emulator::shutdown`] does, but
/// without waiting.
pub struct Emulator {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<watch::Sender<bool>>,
    server: Option<JoinHandle<()>>,
}

impl fmt::Debug for Emulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Emulator")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Binds `addr` (port 0 picks a free one) and serves the emulator in the background.
pub async fn start(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<Emulator> {
    if config.max_retries > MAX_RETRIES_LIMIT {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "max_retries must be at most {MAX_RETRIES_LIMIT}, got {}",
                config.max_retries
            ),
        ));
    }
    if let Err(error) = config.faults.validate() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, error));
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let without_pull_consumer = config.queues_without_pull_consumer.clone();
    let shared = Arc::new(Shared::new(config));
    shared
        .registry
        .set_queues_without_pull_consumer(without_pull_consumer);
    let (stop, stopped) = watch::channel(false);

    let app = axum::Router::new()
        .fallback(server::handle)
        .with_state(Arc::clone(&shared))
        .into_make_service_with_connect_info::<SocketAddr>();
    let listener = listener.tap_io(|tcp| {
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY");
        }
    });
    let mut on_stop = stopped.clone();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = on_stop.wait_for(|stop| *stop).await;
    });

    let sweeper_shared = Arc::clone(&shared);
    let mut sweeper_stop = stopped;
    let server = tokio::spawn(async move {
        let sweeper = async move {
            let mut tick = tokio::time::interval(Duration::from_millis(SWEEP_INTERVAL_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => sweeper_shared.registry.sweep(),
                    _ = sweeper_stop.wait_for(|stop| *stop) => break,
                }
            }
        };
        let (served, ()) = tokio::join!(serve.into_future(), sweeper);
        if let Err(error) = served {
            tracing::error!(%error, "emulator server failed");
        }
    });
    tracing::info!(%addr, "emulator listening");
    Ok(Emulator {
        addr,
        shared,
        stop: Some(stop),
        server: Some(server),
    })
}

impl Emulator {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API base URL to give a client, e.g. `http://127.0.0.1:PORT/client/v4`.
    pub fn base_url(&self) -> String {
        format!("http://{}/client/v4", self.addr)
    }

    /// Seeds generated messages (see [`SeedSpec`]) and returns their ids in order.
    pub fn seed(&self, account_id: &str, queue_id: &str, spec: &SeedSpec) -> Vec<String> {
        self.shared.registry.seed(account_id, queue_id, spec)
    }

    /// Enqueues a message whose pull `body` string and `metadata` are exactly as given
    /// (for bad-input tests: invalid base64, unknown content types, missing
    /// `CF-Content-Type`). Returns its id.
    pub fn publish_raw(
        &self,
        account_id: &str,
        queue_id: &str,
        body: &str,
        metadata: Map<String, Value>,
    ) -> String {
        self.shared
            .registry
            .publish_raw(account_id, queue_id, body, &metadata)
    }

    /// A queue's counters and contents (all zero for a queue never used).
    pub fn stats(&self, account_id: &str, queue_id: &str) -> QueueStats {
        self.shared.registry.stats(account_id, queue_id)
    }

    /// Attaches (`true`) or removes (`false`) the HTTP pull consumer of a queue, creating
    /// the queue if needed. Without one, its details list no consumer and pulls get HTTP
    /// 405 (`messages cannot be pulled unless http_pull mode is enabled`); its messages
    /// and leases are kept, and acks and publishes still work. A reset forgets it.
    pub fn set_pull_consumer(&self, account_id: &str, queue_id: &str, attached: bool) {
        self.shared
            .registry
            .set_pull_consumer(account_id, queue_id, attached);
    }

    /// The faults currently injected.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Replaces the injected faults (rates outside 0.0..=1.0 are clamped).
    pub fn set_faults(&self, mut faults: Faults) {
        for rate in [
            &mut faults.error_500_rate,
            &mut faults.rate_limit_429_rate,
            &mut faults.applied_then_500_rate,
            &mut faults.html_502_rate,
            &mut faults.empty_520_rate,
        ] {
            *rate = if rate.is_nan() {
                0.0
            } else {
                rate.clamp(0.0, 1.0)
            };
        }
        self.shared.set_faults(faults);
    }

    /// Makes one API call in process, without a socket: the request `body` (JSON, as a
    /// client would send it; ignored by [`Endpoint::QueueDetails`]) goes to the same
    /// handler an HTTP request of `endpoint` for `account_id`/`queue_id` reaches.
    /// Authentication, scripted responses, faults and request recording are HTTP
    /// concerns and are skipped.
    ///
    /// This is how tests drive leases under a paused tokio clock
    /// (`#[tokio::test(start_paused = true)]`): leases, delays and retries follow tokio's
    /// clock, and no HTTP round trip lets it jump ahead while a request is on the wire.
    pub fn request(
        &self,
        endpoint: Endpoint,
        account_id: &str,
        queue_id: &str,
        body: &[u8],
    ) -> ApiAnswer {
        let (status, body) =
            server::answer_in_process(&self.shared, endpoint, account_id, queue_id, body);
        ApiAnswer {
            status: status.as_u16(),
            body,
        }
    }

    /// Queues raw answers for the next requests of `endpoint`, one request each.
    pub fn script(&self, endpoint: Endpoint, responses: Vec<ScriptedResponse>) {
        self.shared.script(endpoint, responses);
    }

    /// The API requests received so far (empty unless
    /// [`EmulatorConfig::record_requests`] is on).
    pub fn recorded_requests(&self) -> Vec<RecordedRequest> {
        self.shared.recorded_requests()
    }

    /// Forgets every queue, script and recorded request, and restores the faults given
    /// at start. Leases issued before become unknown.
    pub fn reset(&self) {
        self.shared.reset();
    }

    /// Stops accepting requests, lets open responses finish (up to 5 s), and returns.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(mut server) = self.server.take() {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut server)
                .await
                .is_err()
            {
                tracing::warn!(
                    "emulator connections still open after the grace period; closing them"
                );
                server.abort();
            }
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
    }
}

/// Runs the emulator server of `cfq-bridge emulator` (or `cfq-emulator`) until SIGINT or
/// SIGTERM, printing its base URL as the one line on stdout.
pub async fn run(args: EmulatorArgs) -> anyhow::Result<()> {
    // The CLI may already have installed a subscriber; then this one is not needed.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    if !args.host.is_loopback() {
        tracing::warn!(host = %args.host, "listening beyond loopback: anyone who can reach this address can use the queue API (the admin API stays loopback-only)");
    }
    let config = EmulatorConfig {
        tokens: args.tokens,
        max_retries: args.max_retries,
        dead_letter_queue: args.dead_letter_queue,
        queues_without_pull_consumer: args.no_pull_consumer,
        faults: args.faults,
        record_requests: args.record_requests,
    };
    let emulator = start(SocketAddr::new(args.host, args.port), config)
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    // The one line of CLI output: scripts and tests read the address from it.
    println!("cfq-bridge emulator listening on {}", emulator.base_url());
    shutdown_signal().await;
    tracing::info!("signal received, shutting down");
    emulator.shutdown().await;
    Ok(())
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
