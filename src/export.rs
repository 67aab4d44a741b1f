//! `cfq-bridge export --config FILE`: a drain that visibly finishes. It is
//! `run --until-empty` with a progress display on stderr (messages moved against the
//! backlog seen at the start and now, the rate, an ETA; plain lines when stderr is not a
//! terminal) and the same closing report as `demo`.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use crate::app;
use anyhow::{bail, Context as _};

use crate::config::{Config, Route, SourceConfig};
use crate::pipeline::StopReason;
use crate::progress::{Progress, Reading, Style};
use crate::sources::cloudflare::SourceOptions;
use crate::stats::Stats;
use crate::summary::JobReport;

/// Runs the export of one route (`route`, or the config's only one); exit code 0 when
/// drained, 130 when stopped by a signal first.
pub async fn run(path: &Path, route: Option<&str>) -> anyhow::Result<ExitCode> {
    let config = Config::load(path)?;
    let routes = config.routes()?;
    let route = pick(&routes, route)?;
    let destination = format!("the {} sink", route.sink.kind());
    let started = Instant::now();
    app::start_metrics(&config).await?;
    let stats = app::stats_for(route);
    let from_queue = matches!(route.source, SourceConfig::Queue(_));
    let progress = {
        let stats = Arc::clone(&stats);
        Progress::watch("export", "messages", Style::for_stderr(), move || {
            reading(&stats, from_queue)
        })
    };
    let sink = app::build_sink(route.sink).await?;
    let shutdown = app::shutdown_signal();
    let result = match route.source {
        SourceConfig::Queue(queue) => {
            let token = route.api_token()?;
            let client = app::api_client(queue, &token)?;
            let options = SourceOptions { until_empty: true };
            let stats = Arc::clone(&stats);
            app::run_cloudflare(queue.clone(), client, sink, stats, options, shutdown).await
        }
        SourceConfig::Archive(archive) => {
            app::run_archive(archive.clone(), sink, Arc::clone(&stats), shutdown).await
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

/// The route to export: the one named, or the only one.
fn pick<'a>(routes: &'a [Route<'a>], name: Option<&str>) -> anyhow::Result<&'a Route<'a>> {
    let names = || routes.iter().map(|r| r.name).collect::<Vec<_>>().join(", ");
    match name {
        Some(name) => routes
            .iter()
            .find(|r| r.name == name)
            .with_context(|| format!("the config has no route `{name}` (its routes: {})", names())),
        None if routes.len() == 1 => Ok(&routes[0]),
        None => bail!(
            "the config has several routes; export one at a time with --route NAME ({})",
            names()
        ),
    }
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
