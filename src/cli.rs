//! The command line: parses arguments and dispatches to [`crate::app`], nothing more.
//!
//! Secrets are never accepted as arguments: the API token comes from the environment
//! (`CLOUDFLARE_API_TOKEN`) or from the file named by `queue.api_token_file`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::app::{self, LogFormat};

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
    /// Drain the queue (or read the archive) once, like `run --until-empty`, with a
    /// progress bar (plain lines when stderr is not a terminal) and a closing report.
    ///
    /// Exit codes: 0 when drained; 130 when interrupted; 1 on an error.
    Export {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// The route to export, for a config of [[routes]] (needed when it has several).
        #[arg(long)]
        route: Option<String>,
    },
    /// Validate the config, make one authenticated call to the queue, and open the sink.
    /// Exits non-zero with a message when any step fails.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Preflight beyond `check`: the token's permissions (read and write, without pulling),
    /// the queue's HTTP pull consumer and pause state, the visibility timeout against the
    /// sink's worst confirmation time, and the destination (Kafka topics and their
    /// max.message.bytes, the NATS stream and its duplicate window), plus everything
    /// `check` checks. Prints `ok|warn|fail  WHAT  WHAT TO DO` lines.
    ///
    /// Exit codes: 0 when nothing failed (warnings allowed); 1 when something failed.
    Doctor {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Publish archived records (JSONL, .gz, .zst) back into the queue named by the
    /// config's [queue] table.
    ///
    /// Exit codes: 0 when every record was published; 3 when some were skipped by policy
    /// or size (they are in the rejects file); 130 when interrupted (rerun with the same
    /// --checkpoint to resume); 1 on an error.
    #[cfg(feature = "cloudflare_queue")]
    Replay(crate::replay::ReplayArgs),
    /// Work with archives written by the jsonl sink.
    Archive {
        /// What to do.
        #[command(subcommand)]
        command: ArchiveCommand,
    },
    /// A live view of a running bridge: per route and queue, pulled/s, acked/s, errors/s,
    /// in flight, backlog, oldest age and end-to-end latency, from its /metrics, every
    /// second. q, Esc or Ctrl-C quits.
    Top(crate::top::TopArgs),
    /// Run a local Cloudflare Queues API emulator (for tests and development).
    #[cfg(feature = "emulator")]
    Emulator(cfq_emulator::EmulatorArgs),
    /// Try the whole pipeline locally: an embedded emulator seeded with sample messages,
    /// bridged to stdout (or a JSONL file). No account or broker needed.
    #[cfg(feature = "emulator")]
    Demo(crate::demo::DemoArgs),
}

/// `cfq-bridge archive ...` subcommands.
#[derive(Subcommand, Debug)]
pub enum ArchiveCommand {
    /// Read every segment to its end and report segments, records, time span, duplicate
    /// ids and unreadable parts. Exits 1 when something is unreadable beyond a tail the
    /// writer repairs by itself.
    Verify {
        /// A file, a directory of segments (read recursively), a glob, or
        /// s3://BUCKET/PREFIX.
        target: String,
        /// For s3:// targets: a config whose [sink] is the bucket's s3 sink (endpoint,
        /// region, credential files). Without it: AWS_ENDPOINT_URL, AWS_REGION and the
        /// AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY variables.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// Parses arguments, runs the command, and maps the result to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let log_format = cli.log_format;
    // `top` owns the terminal: a log line on stderr would tear its screen.
    if !matches!(cli.command, Command::Top(_)) {
        app::init_logging(&cli.log, log_format);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            app::say(format_args!("error: cannot start the async runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run {
                config,
                until_empty,
            } => app::run_command(&config, until_empty)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Export { config, route } => {
                crate::export::run(&config, route.as_deref()).await
            }
            Command::Check { config } => app::check_command(&config)
                .await
                .map(|()| ExitCode::SUCCESS),
            Command::Doctor { config } => crate::doctor::run(&config).await.map(|passed| {
                if passed {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                }
            }),
            #[cfg(feature = "cloudflare_queue")]
            Command::Replay(args) => crate::replay::run(args).await.map(replay_exit),
            Command::Archive {
                command: ArchiveCommand::Verify { target, config },
            } => crate::verify::run(&target, config.as_deref())
                .await
                .map(|ok| {
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::FAILURE
                    }
                }),
            Command::Top(args) => crate::top::run(args)
                .await
                .map(|()| ExitCode::SUCCESS)
                .map_err(anyhow::Error::from),
            #[cfg(feature = "emulator")]
            Command::Emulator(args) => cfq_emulator::run(args).await.map(|()| ExitCode::SUCCESS),
            #[cfg(feature = "emulator")]
            Command::Demo(args) => crate::demo::run(args).await.map(|()| ExitCode::SUCCESS),
        }
    });
    // Don't wait for blocking tasks (a stdout writer stuck on a closed pipe, say).
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(e) => {
            // Once on stderr: a JSON line for `--log-format json`, else a plain line.
            match log_format {
                LogFormat::Json => tracing::error!(error = %format!("{e:#}"), "fatal error"),
                LogFormat::Text => app::say(format_args!("error: {e:#}")),
            }
            ExitCode::FAILURE
        }
    }
}

/// Exit code of `replay` when some records were skipped by policy or size.
pub const EXIT_SKIPPED: u8 = 3;
/// Exit code of a job stopped by a signal before it finished.
pub const EXIT_INTERRUPTED: u8 = 130;

/// Says how a replay ended and picks its exit code.
#[cfg(feature = "cloudflare_queue")]
fn replay_exit(end: crate::replay::ReplayEnd) -> ExitCode {
    use crate::replay::ReplayEnd;
    match end {
        ReplayEnd::Complete => ExitCode::SUCCESS,
        ReplayEnd::Skipped { count, rejects } => {
            match rejects {
                Some(path) => app::say(format_args!(
                    "replay: {count} records were skipped by policy or size; they are in {}",
                    path.display()
                )),
                None => app::say(format_args!(
                    "replay (dry run): {count} records would be skipped by policy or size"
                )),
            }
            ExitCode::from(EXIT_SKIPPED)
        }
        ReplayEnd::Interrupted => {
            app::say(format_args!(
                "replay: interrupted; run it again with the same --checkpoint to resume"
            ));
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}
