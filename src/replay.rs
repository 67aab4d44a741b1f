//! `cfq-bridge replay`: publishes archived records back into a Cloudflare queue.
//!
//! It is the `archive` source joined to the `cloudflare_queue` sink by the ordinary
//! pipeline, so the invariant is the one every run keeps: the checkpoint moves past a
//! record only once its publish call answered `success: true` (or, for a record the
//! queue cannot take, once it is fsynced whole in the rejects file).
//!
//! The destination is the config's `[queue]` table (its account, queue, API URL and
//! token); `[sink]`, if present, is not used. Around the pipeline this module adds what a
//! one-off job needs: a count of what is to do (read ahead with the same filters), a
//! progress display, a dry run that validates without sending, a summary, and an exit
//! code that tells a script whether anything was skipped.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use cfq_sinks::cloudflare_queue::{self, BytesPolicy, CloudflareQueue, CloudflareQueueConfig};

use crate::config::Config;
use crate::pipeline::{self, StopReason};
use crate::progress::{Progress, Style};
use crate::sources::archive::{self, ArchiveConfig, ArchiveReport, ArchiveSource};
use crate::stats::Stats;

/// Records read and not yet settled, at most. Five calls of 100 in flight publish
/// 10,000 messages/s at 50 ms round trips, twice the queue's cap; and after a crash no
/// more than this many are published again.
pub const REPLAY_MAX_IN_FLIGHT: u32 = 500;

/// Where skipped records go when neither `--rejects` nor `--checkpoint` says.
pub const DEFAULT_REJECTS: &str = "cfq-replay-rejects.jsonl";

/// Arguments of `cfq-bridge replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// The TOML config whose `[queue]` table names the destination queue (and its token:
    /// `queue.api_token_file` or CLOUDFLARE_API_TOKEN).
    #[arg(long, short)]
    pub config: PathBuf,
    /// Archive files or globs (JSONL, `.gz`, `.zst`), read in name order.
    #[arg(long = "input", short = 'i', required = true, num_args = 1..)]
    pub inputs: Vec<String>,
    /// Only records published at or after this time (RFC 3339, or ms since the epoch).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<u64>,
    /// Only records published before this time (RFC 3339, or ms since the epoch).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<u64>,
    /// A checkpoint file: a rerun with the same file and inputs resumes where the last
    /// one stopped.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Most messages published per second (default: the queue's cap, 5000).
    #[arg(long)]
    pub rate: Option<u32>,
    /// What to do with `bytes` records, which HTTP publishing cannot carry as bytes.
    #[arg(long, value_enum, default_value_t = BytesPolicyArg::Refuse)]
    pub bytes_policy: BytesPolicyArg,
    /// The JSONL file that receives skipped records whole (default: the checkpoint's path
    /// with `.rejects.jsonl`, else `cfq-replay-rejects.jsonl`).
    #[arg(long)]
    pub rejects: Option<PathBuf>,
    /// Read and validate everything, count what would be published and skipped, and send
    /// nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `--bytes-policy` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BytesPolicyArg {
    /// Do not publish `bytes` records; write them to the rejects file.
    Refuse,
    /// Publish the standard base64 of the bytes as a `text` message.
    Base64Text,
}

impl From<BytesPolicyArg> for BytesPolicy {
    fn from(arg: BytesPolicyArg) -> BytesPolicy {
        match arg {
            BytesPolicyArg::Refuse => BytesPolicy::Refuse,
            BytesPolicyArg::Base64Text => BytesPolicy::Base64Text,
        }
    }
}

/// How a replay ended, for the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplayEnd {
    /// Every record read was published (or, in a dry run, would be).
    Complete,
    /// Some records were skipped by policy or size. They are in `rejects` (none in a dry
    /// run).
    Skipped {
        /// How many.
        count: u64,
        /// The rejects file, when records were written to one.
        rejects: Option<PathBuf>,
    },
    /// Stopped by a signal before the end; a rerun with the same checkpoint resumes.
    Interrupted,
}

/// Parses `--since` / `--until`: milliseconds since the epoch, or an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let time = humantime::parse_rfc3339_weak(text).map_err(|e| {
        format!("{text:?} is neither milliseconds since the epoch nor an RFC 3339 time ({e})")
    })?;
    let since_epoch = time
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| format!("{text:?} is before 1970"))?;
    u64::try_from(since_epoch.as_millis()).map_err(|_| format!("{text:?} is too far ahead"))
}

/// The rejects file: `--rejects`, else next to the checkpoint, else the default name.
fn rejects_path(args: &ReplayArgs) -> PathBuf {
    if let Some(path) = &args.rejects {
        return path.clone();
    }
    match &args.checkpoint {
        Some(checkpoint) => {
            let mut name = checkpoint.as_os_str().to_owned();
            name.push(".rejects.jsonl");
            PathBuf::from(name)
        }
        None => PathBuf::from(DEFAULT_REJECTS),
    }
}

/// The `[archive]` settings the flags describe.
fn archive_config(args: &ReplayArgs) -> anyhow::Result<ArchiveConfig> {
    let mut config = ArchiveConfig::new(args.inputs.clone());
    config.checkpoint = args.checkpoint.clone();
    config.since_ms = args.since;
    config.until_ms = args.until;
    config.max_in_flight = REPLAY_MAX_IN_FLIGHT;
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("replay: {e}"))?;
    Ok(config)
}

/// The `cloudflare_queue` sink settings for the destination `[queue]`.
fn sink_config(
    config: &Config,
    args: &ReplayArgs,
    rejects: &Path,
) -> anyhow::Result<CloudflareQueueConfig> {
    let queue = config.queue()?;
    let sink = CloudflareQueueConfig {
        account_id: queue.account_id.clone(),
        queue_id: queue.queue_id.clone(),
        api_base_url: queue.api_base_url.clone(),
        api_token_file: queue.api_token_file.clone(),
        api_token_env: None,
        max_messages_per_second: args
            .rate
            .unwrap_or(cloudflare_queue::DEFAULT_MAX_MESSAGES_PER_SECOND),
        delay_seconds: 0,
        bytes_policy: args.bytes_policy.into(),
        rejects_path: Some(rejects.to_path_buf()),
        request_timeout_ms: queue.request_timeout_ms,
        max_retries: cloudflare_queue::DEFAULT_MAX_RETRIES,
    };
    sink.check().map_err(|e| {
        anyhow::anyhow!(
            "replay: {}",
            e.to_string()
                .replace("sink.max_messages_per_second", "--rate")
        )
    })?;
    Ok(sink)
}

/// `cfq-bridge replay`.
pub async fn run(args: ReplayArgs) -> anyhow::Result<ReplayEnd> {
    let config = Config::load(&args.config)?;
    let archive = archive_config(&args)?;
    let rejects = rejects_path(&args);
    let sink_config = sink_config(&config, &args, &rejects)?;
    if args.dry_run {
        return dry_run(&archive, &sink_config);
    }

    // Count what is to do, with the same filters and checkpoint, for the progress bar.
    let ahead = {
        let archive = archive.clone();
        tokio::task::spawn_blocking(move || archive::scan(&archive, |_| {}))
            .await
            .context("counting the archive's records")??
    };
    let total = ahead.selected;

    let sink = CloudflareQueue::open(&sink_config).context("opening the destination queue")?;
    let published = sink.stats();
    let stats = Arc::new(Stats::default());
    let source = Arc::new(ArchiveSource::new(archive, Arc::clone(&stats))?);
    let options = source.pipeline_options();
    tracing::info!(
        queue_id = %sink_config.queue_id,
        records = total,
        rate = sink_config.max_messages_per_second,
        "replay starting"
    );
    let progress = {
        let stats = Arc::clone(&stats);
        Progress::start(
            "replay",
            "messages",
            Some(total),
            Style::for_stderr(),
            move || stats.confirmed.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let result = pipeline::run(
        Arc::clone(&source),
        Arc::new(sink),
        Arc::clone(&stats),
        options,
        crate::app::shutdown_signal(),
    )
    .await;
    progress.finish().await;
    // `pipeline::run` has closed the sink (the rejects file is synced and released).
    let summary = result?;
    let report = source.report();
    let published = published.snapshot();
    let skipped = published.dead_lettered;
    print_summary(&report, &published, &rejects, skipped);
    Ok(match summary.reason {
        StopReason::Signal => ReplayEnd::Interrupted,
        StopReason::Drained if skipped > 0 => ReplayEnd::Skipped {
            count: skipped,
            rejects: Some(rejects),
        },
        StopReason::Drained => ReplayEnd::Complete,
    })
}

/// Reads everything, asks the sink's planner about each record, sends nothing.
fn dry_run(archive: &ArchiveConfig, sink: &CloudflareQueueConfig) -> anyhow::Result<ReplayEnd> {
    let mut would_publish = 0u64;
    let mut skipped = std::collections::BTreeMap::<String, u64>::new();
    let report = archive::scan(archive, |record| {
        match cloudflare_queue::plan(record, sink.bytes_policy) {
            Ok(()) => would_publish += 1,
            Err(reason) => *skipped.entry(reason.as_str().to_string()).or_default() += 1,
        }
    })?;
    let say = |line: std::fmt::Arguments<'_>| crate::app::say(line);
    say(format_args!(
        "replay (dry run): nothing was sent to queue {}",
        sink.queue_id
    ));
    print_report(&report);
    say(format_args!("  would publish  {would_publish}"));
    let total_skipped: u64 = skipped.values().sum();
    for (reason, count) in &skipped {
        say(format_args!("  would skip     {count} ({reason})"));
    }
    Ok(if total_skipped > 0 {
        ReplayEnd::Skipped {
            count: total_skipped,
            rejects: None,
        }
    } else {
        ReplayEnd::Complete
    })
}

/// What was read: records, filters, malformed lines, unreadable tails, checkpoint.
fn print_report(report: &ArchiveReport) {
    let say = |line: std::fmt::Arguments<'_>| crate::app::say(line);
    say(format_args!("  files          {}", report.files.len()));
    say(format_args!("  read           {}", report.read));
    if report.filtered > 0 {
        say(format_args!(
            "  filtered out   {} (--since/--until)",
            report.filtered
        ));
    }
    if report.malformed > 0 {
        say(format_args!(
            "  malformed      {} lines skipped, first ones:",
            report.malformed
        ));
        for example in &report.malformed_examples {
            say(format_args!("                 {example}"));
        }
    }
    for tail in &report.unreadable_tails {
        say(format_args!("  unreadable     {tail}"));
    }
}

fn print_summary(
    report: &ArchiveReport,
    published: &cloudflare_queue::PublishSnapshot,
    rejects: &Path,
    skipped: u64,
) {
    let say = |line: std::fmt::Arguments<'_>| crate::app::say(line);
    say(format_args!("replay summary:"));
    print_report(report);
    say(format_args!("  published      {}", published.published));
    for (reason, count) in published.skipped {
        if count > 0 {
            say(format_args!("  skipped        {count} ({reason})"));
        }
    }
    if !report.complete {
        say(format_args!(
            "  stopped at     {} (a rerun with the same --checkpoint resumes there)",
            report.position_text()
        ));
    }
    if skipped > 0 {
        say(format_args!(
            "  rejects        {} (every skipped record, whole)",
            rejects.display()
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_milliseconds_or_rfc3339() {
        assert_eq!(parse_time("1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(parse_time("2023-11-14T22:13:20Z"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("2023-11-14T22:13:20.250Z"),
            Ok(1_700_000_000_250)
        );
        let error = parse_time("yesterday").unwrap_err();
        assert!(
            error.contains("yesterday") && error.contains("RFC 3339"),
            "{error}"
        );
    }

    #[test]
    fn the_rejects_file_follows_the_flags() {
        let mut args = ReplayArgs {
            config: "c.toml".into(),
            inputs: vec!["a.jsonl".into()],
            since: None,
            until: None,
            checkpoint: None,
            rate: None,
            bytes_policy: BytesPolicyArg::Refuse,
            rejects: None,
            dry_run: false,
        };
        assert_eq!(rejects_path(&args), PathBuf::from(DEFAULT_REJECTS));
        args.checkpoint = Some("state/replay.ckpt".into());
        assert_eq!(
            rejects_path(&args),
            PathBuf::from("state/replay.ckpt.rejects.jsonl")
        );
        args.rejects = Some("r.jsonl".into());
        assert_eq!(rejects_path(&args), PathBuf::from("r.jsonl"));
    }
}
