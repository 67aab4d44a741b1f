//! `cfq-bridge export --config FILE`: a drain that visibly finishes. It is
//! `run --until-empty` with a progress display on stderr (messages moved against the
//! backlog seen at the start and now, the rate, an ETA; plain lines when stderr is not a
//! terminal) and the same closing report as `demo`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::app;
use crate::config::{Config, SourceConfig};
use crate::pipeline::StopReason;
use crate::progress::{Progress, Reading, Style};
use crate::stats::Stats;
use crate::summary::JobReport;

/// Runs the export; exit code 0 when drained, 130 when stopped by a signal first.
pub async fn run(path: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let source = config.source()?;
    let destination = format!("the {} sink", config.sink()?.kind());
    let started = Instant::now();
    app::start_metrics(&config).await?;
    let stats = app::route_stats(&config)?;
    let from_queue = matches!(source, SourceConfig::Queue(_));
    let progress = {
        let stats = Arc::clone(&stats);
        Progress::watch("export", "messages", Style::for_stderr(), move || {
            reading(&stats, from_queue)
        })
    };
    let result = match source {
        SourceConfig::Queue(_) => {
            let token = config.api_token()?;
            let stats = Arc::clone(&stats);
            app::run_pipeline_with_stats(config, token, true, app::shutdown_signal(), stats).await
        }
        SourceConfig::Archive(archive) => {
            let sink = app::build_sink(config.sink()?).await?;
            app::run_archive(
                archive.clone(),
                sink,
                Arc::clone(&stats),
                app::shutdown_signal(),
            )
            .await
        }
    };
    progress.finish().await;
    let summary = result?;
    let s = &summary.stats;
    JobReport {
        job: "export",
        elapsed: started.elapsed(),
        input: None,
        moved: s.confirmed,
        destination,
        acked: s.acked,
        released: s.released,
        released_note: None,
        dead_lettered: format!(
            "{} records (at the sink's dead-letter destination)",
            s.sink_dead_lettered
        ),
        duplicates: s.duplicates,
        left_in_queue: if from_queue {
            stats.gauges.backlog()
        } else {
            None
        },
    }
    .print();
    Ok(match summary.reason {
        StopReason::Drained => ExitCode::SUCCESS,
        StopReason::Signal => {
            app::say(format_args!(
                "export: interrupted before the queue was drained; run it again to continue"
            ));
            ExitCode::from(crate::cli::EXIT_INTERRUPTED)
        }
    })
}

/// A progress reading: for a queue, leases acked against acked + the backlog now (the
/// backlog counts leased messages until their ack); for an archive, records delivered.
fn reading(stats: &Stats, from_queue: bool) -> Reading {
    use std::sync::atomic::Ordering::Relaxed;
    if !from_queue {
        return Reading {
            done: stats.confirmed.load(Relaxed),
            total: None,
            note: String::new(),
        };
    }
    let done = stats.acked.load(Relaxed);
    let Some(now) = stats.gauges.backlog() else {
        return Reading {
            done,
            total: None,
            note: "backlog not known yet".to_string(),
        };
    };
    let at_start = stats.gauges.first_backlog().unwrap_or(now);
    Reading {
        done,
        total: Some(done + now),
        note: format!("backlog {at_start} at start, {now} now"),
    }
}
