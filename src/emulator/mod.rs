//! A local Cloudflare Queues API (being written: issue 3).

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
