//! A local Cloudflare Queues API (being written: issue 3). This stub only fixes the
//! interface the rest of the crate codes against; the emulator branch replaces it.

use std::net::SocketAddr;

/// Options of `cfq-bridge emulator`.
#[derive(clap::Args, Debug, Clone)]
pub struct EmulatorArgs {
    /// TCP port to listen on (loopback).
    #[arg(long, default_value_t = 8787)]
    pub port: u16,
}

/// Runs the emulator server until interrupted.
pub async fn run(_args: EmulatorArgs) -> anyhow::Result<()> {
    anyhow::bail!("the emulator is being written (issue 3)")
}

/// Emulator settings.
#[derive(Debug, Clone, Default)]
pub struct EmulatorConfig {
    /// Accepted tokens.
    pub tokens: Vec<String>,
    /// Deliveries before dead-lettering.
    pub max_retries: u32,
    /// Dead-letter queue.
    pub dead_letter_queue: Option<String>,
}

/// What to seed.
#[derive(Debug, Clone)]
pub struct SeedSpec {
    /// How many.
    pub count: usize,
    /// Body size.
    pub body_size: usize,
    /// Content type.
    pub content_type: cfq_sinks::ContentType,
}

/// Queue counters.
#[derive(Debug, Clone, Default)]
pub struct QueueStats {
    /// Acked.
    pub acked: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Backlog.
    pub backlog: u64,
}

/// A running emulator.
#[derive(Debug)]
pub struct Emulator;

/// Starts an emulator.
pub async fn start(_addr: SocketAddr, _config: EmulatorConfig) -> std::io::Result<Emulator> {
    Err(std::io::Error::other(
        "the emulator is being written (issue 3)",
    ))
}

impl Emulator {
    /// Base URL.
    pub fn base_url(&self) -> String {
        String::new()
    }
    /// Seeds messages.
    pub fn seed(&self, _a: &str, _q: &str, _spec: &SeedSpec) -> Vec<String> {
        Vec::new()
    }
    /// Counters.
    pub fn stats(&self, _a: &str, _q: &str) -> QueueStats {
        QueueStats::default()
    }
    /// Stops.
    pub async fn shutdown(self) {}
}
