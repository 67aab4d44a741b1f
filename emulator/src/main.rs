//! `cfq-emulator`: the emulator as a program of its own, with the same options as
//! `cfq-bridge emulator`, for those who want the local API without building the bridge.

use clap::Parser;

/// A local Cloudflare Queues API (HTTP pull consumers) for tests and development.
#[derive(Debug, Parser)]
#[command(name = "cfq-emulator", version)]
struct Cli {
    #[command(flatten)]
    args: cfq_emulator::EmulatorArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    cfq_emulator::run(Cli::parse().args).await
}
