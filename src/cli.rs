//! The command line: `run`, `check`, `emulator`, `demo`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Move messages out of Cloudflare Queues into Kafka, NATS, stdout or JSONL files,
/// at least once.
#[derive(Parser, Debug)]
#[command(name = "cfq-bridge", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a local Cloudflare Queues API emulator (for tests and development).
    Emulator(crate::emulator::EmulatorArgs),
}

/// Parses arguments, runs the command, and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Emulator(args) => crate::emulator::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
