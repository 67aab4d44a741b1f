//! `cfq-bridge doctor`: a preflight that goes beyond `check`. It prints one finding per
//! line, `ok|warn|fail  WHAT  WHAT TO DO`, and a summary; the command exits 1 when any
//! finding is `fail`.
//!
//! For a `[queue]` source it checks:
//! - the token: it reads the queue's details (`GET .../queues/{id}`, Queues Read), and an
//!   ack call with empty `acks` and `retries` succeeds (Queues Write). Nothing is pulled:
//!   a pull would lease messages;
//! - the queue has an HTTP pull consumer (and shows its settings), is not paused, and
//!   has a dead-letter queue for the messages its retries give up on;
//! - the visibility timeout outlasts the sink's worst confirmation time
//!   ([`cfq_sinks::doctor`]).
//!
//! For an `[archive]` source: the archive files are there and readable.
//!
//! Then the sink: what `check` checks (the sink opens and [`cfq_sinks::Sink::check`]
//! passes), and the sink's own doctor (Kafka topics and their `max.message.bytes`, the
//! NATS stream and its duplicate window). A `check` warning that the sink's doctor
//! reports with its remedy is shown once, by the doctor.
//!
//! Secrets never appear: the token is sent, never printed, and the errors quoted come
//! from the API, the brokers and the file system.

use std::path::Path;
use std::sync::Arc;

use cfq_sinks::doctor::{DoctorContext, Finding, Level};
use cfq_sinks::{CheckContext, SinkConfig};

use crate::app::api_client;
use crate::cloudflare::{ApiError, Client, QueueDetails};
use crate::config::{ArchiveConfig, Config, QueueConfig, SourceConfig, MAX_VISIBILITY_TIMEOUT_MS};
use crate::sources::archive::ArchiveSource;
use crate::stats::Stats;

/// Runs every check of the config at `path`, prints the findings on stdout, and returns
/// whether none failed.
pub async fn run(path: &Path) -> anyhow::Result<bool> {
    let findings = diagnose(path).await;
    for finding in &findings {
        println!("{finding}");
    }
    let count = |level| findings.iter().filter(|f| f.level == level).count();
    let failed = count(Level::Fail);
    println!(
        "doctor: {} ok, {} warnings, {failed} failures",
        count(Level::Ok),
        count(Level::Warn)
    );
    Ok(failed == 0)
}

/// Every finding about the config at `path`, in the order they were made.
pub async fn diagnose(path: &Path) -> Vec<Finding> {
    let config = match Config::load(path) {
        Ok(config) => config,
        Err(error) => {
            return vec![Finding::fail(
                format!("config {}: {error}", path.display()),
                "fix the config file (config/*.toml has a commented example of each sink)",
            )]
        }
    };
    let mut findings = vec![Finding::ok(format!(
        "config {} parses and validates",
        path.display()
    ))];
    let routes = match config.routes() {
        Ok(routes) => routes,
        Err(error) => {
            findings.push(Finding::fail(
                error.to_string(),
                "keep one source table: [queue] or [archive]",
            ));
            return findings;
        }
    };
    let named = !config.routes.is_empty();
    for route in &routes {
        let mut found = route_findings(route).await;
        if named {
            for finding in &mut found {
                finding.what = format!("route {}: {}", route.name, finding.what);
            }
        }
        findings.extend(found);
    }
    findings
}

/// The findings of one route: its source, then its sink.
async fn route_findings(route: &crate::config::Route<'_>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let ctx = match route.source {
        SourceConfig::Queue(queue) => {
            findings.extend(queue_findings(route, queue).await);
            DoctorContext {
                visibility_timeout_ms: Some(queue.visibility_timeout_ms),
                max_retry_delay_secs: queue.retry_max_delay_secs,
            }
        }
        SourceConfig::Archive(archive) => {
            findings.push(archive_finding(archive));
            DoctorContext {
                visibility_timeout_ms: None,
                max_retry_delay_secs: archive.retry_max_delay_secs,
            }
        }
    };
    findings.extend(sink_findings(route.sink, &ctx).await);
    findings
}

/// The token, its permissions, and the queue's consumer and state.
async fn queue_findings(route: &crate::config::Route<'_>, queue: &QueueConfig) -> Vec<Finding> {
    let token_source = match &queue.api_token_file {
        Some(file) => format!("queue.api_token_file ({})", file.display()),
        None => crate::config::TOKEN_ENV.to_owned(),
    };
    let token = match route.api_token() {
        Ok(token) => token,
        Err(error) => {
            return vec![Finding::fail(
                error.to_string(),
                format!(
                    "set {} or queue.api_token_file to a Cloudflare API token with the \
                     \"Queues Read\" and \"Queues Write\" permissions",
                    crate::config::TOKEN_ENV
                ),
            )]
        }
    };
    let mut findings = vec![Finding::ok(format!("API token found in {token_source}"))];
    let client = match api_client(queue, &token) {
        Ok(client) => client,
        Err(error) => {
            findings.push(Finding::fail(
                format!("{error:#}"),
                format!("fix the token in {token_source}"),
            ));
            return findings;
        }
    };
    let details = client.parsed_queue_details().await;
    match &details {
        Ok(details) => findings.push(Finding::ok(format!(
            "the token reads queue {} ({}) at {} (Queues Read)",
            queue.queue_id,
            details.name_for_commands(),
            queue.api_base_url
        ))),
        Err(error) => findings.push(api_failure(queue, error, Permission::Read)),
    }
    findings.push(ack_probe(queue, &client).await);
    if let Ok(details) = &details {
        findings.extend(consumer_findings(queue, details));
    }
    findings
}

/// Which permission a call needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Permission {
    Read,
    Write,
}

/// An ack call with nothing in it: it needs Queues Write and touches no message.
async fn ack_probe(queue: &QueueConfig, client: &Client) -> Finding {
    match client.probe_ack().await {
        Ok(_) => Finding::ok(
            "the token may acknowledge messages: an ack call with empty acks and retries \
             succeeded (Queues Write)",
        ),
        Err(error) => api_failure(queue, &error, Permission::Write),
    }
}

/// A failed API call, with what to fix.
fn api_failure(queue: &QueueConfig, error: &ApiError, permission: Permission) -> Finding {
    let operation = match permission {
        Permission::Read => "reading the queue's details",
        Permission::Write => "an empty ack call",
    };
    match error {
        ApiError::Auth { status, message } => {
            let fix = match permission {
                Permission::Read => format!(
                    "give the API token the \"Queues Read\" and \"Queues Write\" permissions \
                     on account {} (or fix the token itself)",
                    queue.account_id
                ),
                Permission::Write => format!(
                    "give the API token the \"Queues Write\" permission on account {}: \
                     acknowledging messages writes to the queue",
                    queue.account_id
                ),
            };
            Finding::fail(
                format!("{operation} was refused (HTTP {status}): {message}"),
                fix,
            )
        }
        ApiError::NotFound { message } => Finding::fail(
            format!(
                "{operation}: no queue {} in account {} (HTTP 404): {message}",
                queue.queue_id, queue.account_id
            ),
            "check queue.account_id and queue.queue_id: the queue's id (32 hex digits; \
             `npx wrangler queues info <queue-name>` shows it), not its name",
        ),
        ApiError::Transport(_) => Finding::fail(
            format!("{operation}: {error}"),
            format!(
                "check queue.api_base_url ({}) and the network (DNS, proxy, TLS)",
                queue.api_base_url
            ),
        ),
        ApiError::RateLimited { .. }
        | ApiError::Server { .. }
        | ApiError::Malformed { .. }
        | ApiError::Paused { .. } => Finding::fail(
            format!("{operation} could not be checked: {error}"),
            "run doctor again; if it persists, check queue.api_base_url and Cloudflare's status",
        ),
        ApiError::Rejected { .. } => Finding::fail(
            format!("{operation}: {error}"),
            "check queue.api_base_url, queue.account_id and queue.queue_id",
        ),
    }
}

/// The HTTP pull consumer, its settings, and whether delivery is paused.
fn consumer_findings(queue: &QueueConfig, details: &QueueDetails) -> Vec<Finding> {
    let name = details.name_for_commands();
    let mut findings = Vec::new();
    match (details.http_pull_consumer(), &details.consumers) {
        (Some(consumer), _) => {
            let s = &consumer.settings;
            let shown =
                |value: Option<u64>| value.map_or_else(|| "?".to_owned(), |v| v.to_string());
            findings.push(Finding::ok(format!(
                "queue {name} has an HTTP pull consumer: max_retries {}, retry_delay {} s, \
                 dead_letter_queue {}, visibility_timeout_ms {} and batch_size {} (the bridge \
                 pulls with its own: {} ms, {})",
                shown(s.max_retries),
                shown(s.retry_delay),
                consumer.dead_letter_queue.as_deref().unwrap_or("none"),
                shown(s.visibility_timeout_ms),
                shown(s.batch_size),
                queue.visibility_timeout_ms,
                queue.batch_size,
            )));
            if consumer.dead_letter_queue.is_none() {
                findings.push(Finding::warn(
                    format!(
                        "queue {name}'s pull consumer has no dead-letter queue: a message the \
                         sink refuses for good (or a v8 message) is deleted after {} deliveries",
                        shown(s.max_retries)
                    ),
                    format!(
                        "give the consumer a dead-letter queue (dashboard, or `npx wrangler \
                         queues consumer http remove {name}` then `npx wrangler queues \
                         consumer http add {name} --dead-letter-queue <dlq-name>`)"
                    ),
                ));
            }
        }
        (None, Some(consumers)) => {
            let worker = consumers
                .iter()
                .find_map(|c| c.script_name.as_deref())
                .map(|script| {
                    format!(
                        "; a queue cannot have both a Worker and a pull consumer: remove the \
                         Worker consumer ({script}) first"
                    )
                })
                .unwrap_or_default();
            findings.push(Finding::fail(
                format!(
                    "queue {name} has no HTTP pull consumer ({} consumers listed): the bridge's \
                     pulls are refused",
                    consumers.len()
                ),
                format!("add one: npx wrangler queues consumer http add {name}{worker}"),
            ));
        }
        (None, None) => findings.push(Finding::warn(
            format!(
                "the details of queue {name} list no consumers: whether it has an HTTP pull \
                 consumer cannot be told"
            ),
            format!(
                "check with `npx wrangler queues info {name}`; add one with `npx wrangler \
                 queues consumer http add {name}`"
            ),
        )),
    }
    if details.settings.delivery_paused == Some(true) {
        findings.push(Finding::warn(
            format!("delivery of queue {name} is paused: pulls get HTTP 409 until it resumes"),
            format!("npx wrangler queues resume-delivery {name}"),
        ));
    }
    findings
}

/// The archive's files: matched, readable, and where reading starts.
fn archive_finding(archive: &ArchiveConfig) -> Finding {
    // Expands the globs and reads the checkpoint (taking and releasing its lock), as
    // `check` and a run do; reads no record.
    let source = match ArchiveSource::new(archive.clone(), Arc::new(Stats::default())) {
        Ok(source) => source,
        Err(error) => {
            return Finding::fail(
                error.to_string(),
                "fix archive.paths (every path or pattern must match a readable file) or \
                 archive.checkpoint",
            )
        }
    };
    let report = source.report();
    drop(source);
    for file in &report.files {
        if let Err(error) = std::fs::File::open(file) {
            return Finding::fail(
                format!("archive file {} cannot be opened: {error}", file.display()),
                "make it readable by the bridge's user, or leave it out of archive.paths",
            );
        }
    }
    Finding::ok(format!(
        "archive: {} files readable, starting at {}",
        report.files.len(),
        report.position_text()
    ))
}

/// `check`'s verdict on the sink, then the sink's doctor; a `check` line that the doctor
/// reports too (the same text) is left out.
async fn sink_findings(sink_config: &SinkConfig, ctx: &DoctorContext) -> Vec<Finding> {
    let kind = sink_config.kind();
    let check_ctx = ctx.check_context().unwrap_or(CheckContext {
        // Nothing expires while an archive record waits for its sink.
        visibility_timeout_ms: MAX_VISIBILITY_TIMEOUT_MS,
        max_retry_delay_secs: ctx.max_retry_delay_secs,
    });
    let fix = "fix the [sink] table or the destination, then run doctor again";
    let mut checked = Vec::new();
    match cfq_sinks::build(sink_config).await {
        Ok(sink) => {
            match sink.check(&check_ctx).await {
                Ok(warnings) => {
                    checked.push(Finding::ok(format!(
                        "the {kind} sink opens and passes `check`"
                    )));
                    checked.extend(warnings.into_iter().map(|warning| Finding {
                        level: Level::Warn,
                        what: warning,
                        fix: None,
                    }));
                }
                Err(error) => checked.push(Finding::fail(error.message, fix)),
            }
            let _ = sink.close().await;
        }
        Err(error) => checked.push(Finding::fail(
            format!("opening the {kind} sink: {}", error.message),
            fix,
        )),
    }
    // After `check`, which may have created the NATS stream the doctor looks for.
    let doctored = cfq_sinks::doctor::run(sink_config, ctx).await;
    checked.retain(|c| c.level == Level::Ok || !doctored.iter().any(|d| d.what == c.what));
    checked.extend(doctored);
    checked
}
