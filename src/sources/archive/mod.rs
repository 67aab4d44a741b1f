//! The archive source: reads JSONL archives back (the lines [`Record::write_json_line`]
//! writes, as the JSONL sink stores them), plain or compressed (`.gz`, `.zst`), and feeds
//! their records to a sink, for replays and migrations.
//!
//! - [`config`]: the `[archive]` table (files and globs, filters, checkpoint, bounds);
//! - [`reader`]: files to lines, on a thread of its own so that reading and parsing
//!   never block the async runtime;
//! - [`checkpoint`]: the contiguous settled prefix and the checkpoint file.
//!
//! **What done means.** A record is done when the checkpoint has moved past it, and the
//! checkpoint moves only past a contiguous prefix of settled lines: records the sink
//! confirmed (only [`Confirmed`](crate::pipeline::Confirmed) values settle a record), and
//! lines that cannot or must not be replayed (malformed, blank, filtered out). A record
//! confirmed after one that is not waits for it. A record the sink refuses for good is
//! offered again after its retry delay, up to `archive.max_attempts` offers; then the run
//! fails with an error naming its file and line, and the checkpoint stays before it. A
//! record given back at shutdown is not checkpointed, so the next run reads it again.
//!
//! **Bounds.** A record keeps its room in the in-flight bound until the checkpoint that
//! records it is durable (or, without a checkpoint file, until the prefix passes it). So
//! `archive.max_in_flight` bounds the records being delivered, waiting for a retry, or
//! confirmed and not yet recorded together: the memory held, and the records a crash can
//! make a restart deliver twice.
//!
//! A torn file (a last line cut short, a truncated gzip member or zstd frame) gives its
//! readable prefix; the rest is reported as an unreadable tail (warn log with the file,
//! line and byte, a counter, [`ArchiveReport::unreadable_tails`]) and reading goes on with
//! the next file. A malformed line in the middle is skipped and reported with its
//! `file:line`.

pub mod checkpoint;
pub mod config;
pub mod reader;

use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cfq_sinks::lock::{LockError, PathLock};
use cfq_sinks::Record;
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::bump;
use crate::pipeline::{
    Feed, InFlight, PipelineOptions, Reservation, Retry, Settlement, Source, SourceBatch,
};
use crate::stats::Stats;

pub use checkpoint::{InputFile, Position};
pub use config::ArchiveConfig;

use checkpoint::{CheckpointFile, Progress};
use reader::{Event, LineKind, Origin, Reader};

/// How many malformed lines a report quotes (and logs at warn); the rest are counted.
pub const MALFORMED_EXAMPLES: usize = 10;

/// Longest wait between two checkpoint writes while records settle.
const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);

/// Skipped lines (filtered, malformed, blank) the reader settles in one go.
const SKIPPED_FLUSH: usize = 1024;

/// Batches the reader thread may have ready ahead of the pipeline.
const READ_AHEAD_BATCHES: usize = 2;

/// Failures of the archive source.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The `[archive]` settings are invalid.
    #[error("invalid [archive] settings: {0}")]
    Config(String),
    /// A glob pattern matched no file.
    #[error("archive.paths: {pattern:?} matches no file")]
    NoMatch {
        /// The pattern as configured.
        pattern: String,
    },
    /// A glob pattern is not valid.
    #[error("archive.paths: {pattern:?} is not a valid glob pattern: {reason}")]
    Pattern {
        /// The pattern as configured.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An input cannot be found, opened or examined.
    #[error("archive input {}: {source}", path.display())]
    Input {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// An input named in `archive.paths` is a directory or another non-file.
    #[error("archive input {} is not a file (use a glob such as {}/*.jsonl)", path.display(), path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Reading a file failed (the device, not the data).
    #[error("reading archive {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file has fewer readable lines than the checkpoint says were settled.
    #[error(
        "{} has {lines} readable lines, but the checkpoint says {settled} are settled: the file changed, or the checkpoint belongs to other inputs",
        path.display()
    )]
    ResumeBeyondEnd {
        /// The file.
        path: PathBuf,
        /// Its readable lines.
        lines: u64,
        /// Lines the checkpoint settled.
        settled: u64,
    },
    /// The checkpoint exists but cannot be read.
    #[error("reading the checkpoint {}: {source}", path.display())]
    CheckpointRead {
        /// The checkpoint file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The checkpoint is not one this build wrote.
    #[error("the checkpoint {} is unreadable: {reason}", path.display())]
    CheckpointCorrupt {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The checkpoint was written for other input files.
    #[error(
        "the checkpoint {} does not match the inputs: {detail}. Restore the inputs it was written for, or remove it to read from the start",
        path.display()
    )]
    CheckpointMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The first difference.
        detail: String,
    },
    /// The checkpoint's directory cannot be created.
    #[error("creating the directory of the checkpoint {}: {source}", path.display())]
    CheckpointDir {
        /// The checkpoint file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Another process uses the checkpoint.
    #[error(transparent)]
    CheckpointLock(#[from] LockError),
    /// The sink refused a record on every offer.
    #[error(
        "the sink refused the archive record at {}:{line} (message id {id}) on all {offers} offers (archive.max_attempts); stopping with the checkpoint before it. Last reason: {reason}",
        path.display()
    )]
    Refused {
        /// The record's file.
        path: PathBuf,
        /// Its line, from 1.
        line: u64,
        /// Its message id.
        id: String,
        /// How many times it was offered.
        offers: u32,
        /// What the sink said the last time.
        reason: String,
    },
    /// The reader thread could not start, or stopped unexpectedly.
    #[error("the archive reader thread failed: {0}")]
    Reader(String),
}

impl ArchiveError {
    /// Whether running again unchanged may succeed (an I/O failure), as opposed to a
    /// setting, an input or a record that must change first.
    pub fn is_retriable(&self) -> bool {
        matches!(
            self,
            ArchiveError::Input { .. }
                | ArchiveError::Read { .. }
                | ArchiveError::CheckpointRead { .. }
                | ArchiveError::CheckpointDir { .. }
                | ArchiveError::CheckpointLock(_)
                | ArchiveError::Reader(_)
        )
    }
}

/// The end of a file that could not be read: a last line cut short, or compressed data
/// that stops decoding (a truncated gzip member or zstd frame).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnreadableTail {
    /// The file.
    pub path: PathBuf,
    /// The first line not read, from 1.
    pub line: u64,
    /// Where that line starts, in bytes from the start of the (decompressed) data.
    pub byte: u64,
    /// For a compressed file, the compressed bytes read when decoding stopped.
    pub compressed_bytes_read: Option<u64>,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for UnreadableTail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: unreadable from byte {}",
            self.path.display(),
            self.line,
            self.byte
        )?;
        if let Some(read) = self.compressed_bytes_read {
            write!(
                f,
                " of the decompressed data ({read} compressed bytes read)"
            )?;
        }
        write!(f, ": {}", self.reason)
    }
}

/// What reading the archive found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArchiveReport {
    /// The input files, in reading order.
    pub files: Vec<PathBuf>,
    /// Records read (lines that parsed), before the filters.
    pub read: u64,
    /// Records the filters left out.
    pub filtered: u64,
    /// Records that passed the filters: delivered, or visited by [`scan`].
    pub selected: u64,
    /// Lines that are not records (skipped: they cannot be replayed).
    pub malformed: u64,
    /// The first [`MALFORMED_EXAMPLES`] of them, as `file:line: reason`.
    pub malformed_examples: Vec<String>,
    /// Lines holding only whitespace (skipped).
    pub blank_lines: u64,
    /// Files whose end could not be read, and where.
    pub unreadable_tails: Vec<UnreadableTail>,
    /// For the source: how far the lines are settled (the checkpoint's position once
    /// written). For [`scan`]: where reading started.
    pub position: Position,
    /// Whether `position` is past every input.
    pub complete: bool,
}

impl ArchiveReport {
    /// The position as `path:line` (lines settled in that file), or `complete`.
    pub fn position_text(&self) -> String {
        match self.files.get(self.position.file) {
            Some(path) if !self.complete => format!("{}:{}", path.display(), self.position.line),
            _ => "complete".to_string(),
        }
    }

    fn note_malformed(&mut self, path: &std::path::Path, line: u64, reason: &str) {
        self.malformed += 1;
        if self.malformed_examples.len() < MALFORMED_EXAMPLES {
            tracing::warn!(file = %path.display(), line, reason, "malformed archive line skipped");
            self.malformed_examples
                .push(format!("{}:{line}: {reason}", path.display()));
        } else {
            tracing::debug!(file = %path.display(), line, reason, "malformed archive line skipped");
        }
    }

    fn note_tail(&mut self, tail: UnreadableTail) {
        tracing::warn!(
            file = %tail.path.display(),
            line = tail.line,
            byte = tail.byte,
            compressed_bytes_read = tail.compressed_bytes_read,
            reason = %tail.reason,
            "the end of an archive file is unreadable; skipping it and going on with the next file"
        );
        self.unreadable_tails.push(tail);
    }
}

/// What the source needs to settle one record: its sequence number (for the checkpoint),
/// where it is (for errors), how many times it was offered, and the record itself, to
/// offer again when the sink refuses it.
#[derive(Debug)]
pub struct ArchiveTicket {
    seq: u64,
    origin: Origin,
    offers: u32,
    record: Record,
}

/// A refused record waiting to be offered again.
#[derive(Debug)]
struct PendingRetry {
    due: Instant,
    ticket: ArchiveTicket,
    /// Its room in the in-flight bound, kept while it waits.
    in_flight: InFlight,
}

/// Room held by confirmed records until the checkpoint records them.
#[derive(Debug, Default)]
struct Held {
    units: Option<InFlight>,
    /// Confirmed records whose room was returned.
    released: u64,
}

impl Held {
    fn hold(&mut self, units: InFlight) {
        match &mut self.units {
            Some(held) => held.merge(units),
            None => self.units = Some(units),
        }
    }

    /// Returns (as a value to drop outside any lock) the room of confirmed records up to
    /// the `recorded`-th.
    fn release_through(&mut self, recorded: u64) -> Option<InFlight> {
        let n = recorded.saturating_sub(self.released);
        self.released += n;
        self.units.as_mut().map(|held| held.split(n))
    }
}

/// What the last successful checkpoint write recorded.
#[derive(Debug, Default)]
struct Written {
    position: Option<Position>,
    /// Confirmed records below it.
    confirmed: u64,
}

/// State shared by the source, its reader thread and its checkpoint writer.
#[derive(Debug)]
struct Shared {
    config: ArchiveConfig,
    stats: Arc<Stats>,
    paths: Arc<[PathBuf]>,
    progress: Mutex<Progress>,
    report: Mutex<ArchiveReport>,
    checkpoint: Option<Arc<CheckpointFile>>,
    held: Mutex<Held>,
    written: Mutex<Written>,
    /// Wakes the source's loop: a retry was queued, or lines were settled.
    wake: Notify,
    /// Wakes the checkpoint writer early: many confirmed records wait for a write.
    urgent: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while holding it; every value behind
    // these locks stays consistent between statements, so it is still usable.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// After the prefix moved: without a checkpoint file, confirmed records below it give
    /// their room back at once; with one, the writer is woken when many wait for it.
    fn prefix_moved(&self, confirmed_below: u64) {
        let released = {
            let mut held = lock(&self.held);
            if self.checkpoint.is_none() {
                held.release_through(confirmed_below)
            } else {
                if confirmed_below.saturating_sub(held.released)
                    >= u64::from(self.config.max_in_flight / 2).max(1)
                {
                    self.urgent.notify_one();
                }
                None
            }
        };
        drop(released);
        self.wake.notify_one();
    }

    /// Writes the checkpoint if the prefix moved since the last write. On success, the
    /// records it recorded give their room back.
    async fn write_checkpoint(&self) {
        let Some(file) = &self.checkpoint else {
            return;
        };
        let (position, confirmed_below) = {
            let progress = lock(&self.progress);
            (progress.position(), progress.confirmed_below())
        };
        if lock(&self.written).position == Some(position) {
            return;
        }
        let file = Arc::clone(file);
        let result = tokio::task::spawn_blocking(move || file.write(position))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match result {
            Ok(()) => {
                *lock(&self.written) = Written {
                    position: Some(position),
                    confirmed: confirmed_below,
                };
                let released = lock(&self.held).release_through(confirmed_below);
                drop(released);
            }
            Err(error) => {
                bump!(self.stats, archive_checkpoint_failures);
                tracing::warn!(
                    path = %self.checkpoint.as_ref().map(|f| f.path().display().to_string()).unwrap_or_default(),
                    error = %error,
                    "writing the archive checkpoint failed; trying again at the next write (reading pauses once the in-flight bound is full)"
                );
            }
        }
    }
}

/// What the reader thread hands the source's loop.
#[derive(Debug)]
enum FromReader {
    /// Records that passed the filters, with their sequence numbers and places.
    Batch(Vec<(u64, Origin, Record)>),
    /// Every input is read.
    Ended,
    /// Reading cannot go on.
    Failed(ArchiveError),
}

/// Reads archive files into a pipeline. See the module documentation.
pub struct ArchiveSource {
    shared: Arc<Shared>,
    start: Position,
    /// Refused records waiting for their retry delay.
    pending: Mutex<Vec<PendingRetry>>,
    /// The pipeline's handle while running (for failing the run from `settle`). Cleared by
    /// `finish`, since the feed holds the source in turn.
    feed: Mutex<Option<Feed<ArchiveTicket>>>,
    /// The periodic checkpoint writer and the token that stops it.
    writer: Mutex<Option<(JoinHandle<()>, CancellationToken)>>,
    /// The checkpoint's lock, held from construction to `finish`.
    lock: Mutex<Option<PathLock>>,
}

impl fmt::Debug for ArchiveSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ArchiveSource")
            .field("files", &self.shared.paths.len())
            .field("start", &self.start)
            .field("checkpoint", &self.shared.config.checkpoint)
            .finish_non_exhaustive()
    }
}

/// The inputs of a config, ready to read.
struct Prepared {
    /// The files, expanded, in reading order.
    paths: Arc<[PathBuf]>,
    /// The checkpoint file, when configured.
    checkpoint: Option<Arc<CheckpointFile>>,
    /// Where to start reading (after the checkpoint, when there is one).
    start: Position,
}

/// Validates `config`, expands its inputs, fingerprints them and reads the checkpoint
/// when there is one.
fn prepare(config: &ArchiveConfig) -> Result<Prepared, ArchiveError> {
    config.validate().map_err(ArchiveError::Config)?;
    let paths: Arc<[PathBuf]> = reader::expand(&config.paths)?.into();
    let Some(path) = &config.checkpoint else {
        return Ok(Prepared {
            paths,
            checkpoint: None,
            start: Position::default(),
        });
    };
    let inputs = paths
        .iter()
        .map(|p| reader::fingerprint(p))
        .collect::<Result<Arc<[InputFile]>, _>>()?;
    let file = Arc::new(CheckpointFile::new(path.clone(), inputs));
    let start = file.load()?.unwrap_or_default();
    Ok(Prepared {
        paths,
        checkpoint: Some(file),
        start,
    })
}

impl ArchiveSource {
    /// Validates `config`, expands its paths, takes the checkpoint's lock
    /// (`<checkpoint>.lock`: one replay per checkpoint) and reads it. Fails when a path
    /// matches no file, or the checkpoint belongs to other inputs.
    pub fn new(config: ArchiveConfig, stats: Arc<Stats>) -> Result<ArchiveSource, ArchiveError> {
        config.validate().map_err(ArchiveError::Config)?;
        let lock = match &config.checkpoint {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    cfq_sinks::jsonl::dir::create_dir_all_synced(dir).map_err(|source| {
                        ArchiveError::CheckpointDir {
                            path: path.clone(),
                            source,
                        }
                    })?;
                }
                Some(PathLock::acquire(path)?)
            }
            None => None,
        };
        let Prepared {
            paths,
            checkpoint,
            start,
        } = prepare(&config)?;
        tracing::info!(
            files = paths.len(),
            checkpoint = ?config.checkpoint,
            resume_file = start.file,
            resume_line = start.line,
            "archive source ready"
        );
        let report = ArchiveReport {
            files: paths.to_vec(),
            position: start,
            complete: start.is_complete(paths.len()),
            ..ArchiveReport::default()
        };
        Ok(ArchiveSource {
            shared: Arc::new(Shared {
                progress: Mutex::new(Progress::new(start)),
                report: Mutex::new(report),
                held: Mutex::new(Held::default()),
                written: Mutex::new(Written {
                    position: checkpoint.as_ref().map(|_| start),
                    confirmed: 0,
                }),
                wake: Notify::new(),
                urgent: Notify::new(),
                paths,
                checkpoint,
                config,
                stats,
            }),
            start,
            pending: Mutex::new(Vec::new()),
            feed: Mutex::new(None),
            writer: Mutex::new(None),
            lock: Mutex::new(lock),
        })
    }

    /// The pipeline settings the config asks for.
    pub fn pipeline_options(&self) -> PipelineOptions {
        let config = &self.shared.config;
        PipelineOptions {
            max_in_flight: config.max_in_flight,
            // Archive records have no lease to outrun.
            deadline_margin: Duration::ZERO,
            shutdown_grace: Duration::from_millis(config.shutdown_grace_ms),
            retry_base_delay_secs: config.retry_base_delay_secs,
            retry_max_delay_secs: config.retry_max_delay_secs,
        }
    }

    /// What the source has read so far, and how far its lines are settled.
    pub fn report(&self) -> ArchiveReport {
        let mut report = lock(&self.shared.report).clone();
        report.position = lock(&self.shared.progress).position();
        report.complete = report.position.is_complete(self.shared.paths.len());
        report
    }

    /// Offers the refused records whose delay is over; returns when the next one is due.
    fn offer_due_retries(&self, feed: &Feed<ArchiveTicket>) -> Option<Instant> {
        let now = Instant::now();
        let due: Vec<PendingRetry> = {
            let mut pending = lock(&self.pending);
            let (due, waiting) = std::mem::take(&mut *pending)
                .into_iter()
                .partition(|p| p.due <= now);
            *pending = waiting;
            due
        };
        let batch_size = self.shared.config.batch_size as usize;
        let mut due = due.into_iter().peekable();
        while due.peek().is_some() {
            let mut tickets = Vec::with_capacity(batch_size);
            let mut in_flight: Option<InFlight> = None;
            for retry in due.by_ref().take(batch_size) {
                match &mut in_flight {
                    Some(held) => held.merge(retry.in_flight),
                    None => in_flight = Some(retry.in_flight),
                }
                tickets.push(retry.ticket);
            }
            let Some(in_flight) = in_flight else { break };
            let records = tickets.iter().map(|t| t.record.clone()).collect();
            feed.deliver(SourceBatch {
                records,
                tickets,
                deadline: None,
                in_flight,
            });
        }
        lock(&self.pending).iter().map(|p| p.due).min()
    }

    /// Starts the reader thread.
    fn start_reader(
        &self,
        stop: CancellationToken,
    ) -> Result<mpsc::Receiver<FromReader>, ArchiveError> {
        let (tx, rx) = mpsc::channel(READ_AHEAD_BATCHES);
        let reader = Reader::new(Arc::clone(&self.shared.paths), self.start);
        let shared = Arc::clone(&self.shared);
        std::thread::Builder::new()
            .name("archive-reader".into())
            .spawn(move || read_loop(reader, &shared, &tx, &stop))
            .map_err(|e| ArchiveError::Reader(e.to_string()))?;
        Ok(rx)
    }
}

/// Counts kept by the reader between flushes.
#[derive(Debug, Default)]
struct Counts {
    read: u64,
    filtered: u64,
    malformed: u64,
    blank: u64,
    tails: u64,
    selected: u64,
}

/// The reader thread: reads events, keeps the records that pass the filters, settles the
/// lines that are skipped, and hands batches to the source's loop.
fn read_loop(
    mut reader: Reader,
    shared: &Shared,
    tx: &mpsc::Sender<FromReader>,
    stop: &CancellationToken,
) {
    let batch_size = shared.config.batch_size as usize;
    let mut batch = Vec::with_capacity(batch_size);
    let mut skipped: Vec<u64> = Vec::new();
    let mut counts = Counts::default();
    // Settles the skipped lines and publishes the counts; done before each batch is
    // handed over, so a batch's records never wait on skipped lines before them.
    let flush = |skipped: &mut Vec<u64>, counts: &mut Counts| {
        let confirmed_below = {
            let mut progress = lock(&shared.progress);
            progress.settle(skipped, false);
            progress.confirmed_below()
        };
        skipped.clear();
        let c = std::mem::take(counts);
        bump!(shared.stats, archive_records_read, c.read);
        bump!(shared.stats, archive_filtered, c.filtered);
        bump!(shared.stats, archive_malformed_lines, c.malformed);
        bump!(shared.stats, archive_unreadable_tails, c.tails);
        {
            let mut report = lock(&shared.report);
            report.read += c.read;
            report.filtered += c.filtered;
            report.selected += c.selected;
            report.blank_lines += c.blank;
        }
        shared.prefix_moved(confirmed_below);
    };
    loop {
        if stop.is_cancelled() {
            return;
        }
        let event = match reader.next_event() {
            Ok(Some(event)) => event,
            Ok(None) => return,
            Err(error) => {
                flush(&mut skipped, &mut counts);
                let _ = tx.blocking_send(FromReader::Failed(error));
                return;
            }
        };
        match event {
            Event::FileStarted {
                file,
                first_seq,
                first_line,
            } => {
                tracing::info!(file = %shared.paths[file].display(), skipped_lines = first_line, "reading archive file");
                lock(&shared.progress).file_started(file, first_seq, first_line);
            }
            Event::Line { seq, origin, kind } => match kind {
                LineKind::Record(record) => {
                    counts.read += 1;
                    if shared
                        .config
                        .selects(record.timestamp_ms, record.content_type)
                    {
                        counts.selected += 1;
                        batch.push((seq, origin, record));
                    } else {
                        counts.filtered += 1;
                        skipped.push(seq);
                    }
                }
                LineKind::Malformed(reason) => {
                    counts.malformed += 1;
                    lock(&shared.report).note_malformed(
                        &shared.paths[origin.file],
                        origin.line,
                        &reason,
                    );
                    skipped.push(seq);
                }
                LineKind::Blank => {
                    counts.blank += 1;
                    skipped.push(seq);
                }
            },
            Event::Tail(tail) => {
                counts.tails += 1;
                lock(&shared.report).note_tail(tail);
            }
            Event::Ended { files, total } => {
                flush(&mut skipped, &mut counts);
                if !batch.is_empty()
                    && tx
                        .blocking_send(FromReader::Batch(std::mem::take(&mut batch)))
                        .is_err()
                {
                    return;
                }
                lock(&shared.progress).input_ended(files, total);
                shared.wake.notify_one();
                let _ = tx.blocking_send(FromReader::Ended);
                return;
            }
        }
        if batch.len() >= batch_size {
            flush(&mut skipped, &mut counts);
            let full = std::mem::replace(&mut batch, Vec::with_capacity(batch_size));
            if tx.blocking_send(FromReader::Batch(full)).is_err() {
                return;
            }
        } else if skipped.len() >= SKIPPED_FLUSH {
            flush(&mut skipped, &mut counts);
        }
    }
}

/// What the source's loop does next.
enum Step {
    /// Look again (a retry is due, lines were settled).
    Again,
    /// Room for a batch was found and the reader's next message taken.
    Read(Option<FromReader>, Reservation),
    /// The pipeline is stopping.
    Stop,
}

#[async_trait]
impl Source for ArchiveSource {
    type Ticket = ArchiveTicket;

    fn kind(&self) -> &'static str {
        "archive"
    }

    async fn run(self: Arc<Self>, feed: Feed<ArchiveTicket>) {
        *lock(&self.feed) = Some(feed.clone());
        if self.shared.checkpoint.is_some() {
            let stop = CancellationToken::new();
            let shared = Arc::clone(&self.shared);
            let token = stop.clone();
            let handle = tokio::spawn(async move {
                loop {
                    tokio::select! {
                        biased;
                        () = token.cancelled() => return,
                        () = shared.urgent.notified() => {}
                        () = tokio::time::sleep(CHECKPOINT_INTERVAL) => {}
                    }
                    shared.write_checkpoint().await;
                }
            });
            *lock(&self.writer) = Some((handle, stop));
        }
        let reader_stop = CancellationToken::new();
        // The reader thread stops when this loop returns, however it returns.
        let _stop_reader = reader_stop.clone().drop_guard();
        let mut from_reader = match self.start_reader(reader_stop) {
            Ok(rx) => rx,
            Err(error) => {
                feed.fail(error);
                return;
            }
        };
        let batch_size = self.shared.config.batch_size;
        let mut input_done = false;
        loop {
            let next_due = self.offer_due_retries(&feed);
            if input_done && lock(&self.shared.progress).all_settled() {
                tracing::info!("every archive record is read and settled");
                feed.exhausted();
                return;
            }
            let step = tokio::select! {
                biased;
                () = feed.stopping().cancelled() => Step::Stop,
                () = tokio::time::sleep_until(next_due.unwrap_or_else(Instant::now).into()), if next_due.is_some() => Step::Again,
                () = self.shared.wake.notified() => Step::Again,
                room = feed.reserve(batch_size), if !input_done => match room {
                    None => Step::Stop,
                    Some(room) => tokio::select! {
                        biased;
                        () = feed.stopping().cancelled() => Step::Stop,
                        message = from_reader.recv() => Step::Read(message, room),
                    },
                },
            };
            match step {
                Step::Again => {}
                Step::Stop => return,
                Step::Read(Some(FromReader::Batch(lines)), room) => {
                    let in_flight = room.take(lines.len());
                    let mut records = Vec::with_capacity(lines.len());
                    let mut tickets = Vec::with_capacity(lines.len());
                    for (seq, origin, record) in lines {
                        records.push(record.clone());
                        tickets.push(ArchiveTicket {
                            seq,
                            origin,
                            offers: 1,
                            record,
                        });
                    }
                    feed.deliver(SourceBatch {
                        records,
                        tickets,
                        deadline: None,
                        in_flight,
                    });
                }
                Step::Read(Some(FromReader::Ended), _room) => input_done = true,
                Step::Read(Some(FromReader::Failed(error)), _room) => {
                    feed.fail(error);
                    return;
                }
                Step::Read(None, _room) => {
                    feed.fail(ArchiveError::Reader(
                        "it stopped before the end of the input".into(),
                    ));
                    return;
                }
            }
        }
    }

    async fn settle(&self, settlement: Settlement<ArchiveTicket>) {
        let Settlement {
            done,
            retry,
            mut in_flight,
            ..
        } = settlement;
        let mut seqs: Vec<u64> = done.iter().map(|c| c.ticket().seq).collect();
        let confirmed_room = in_flight.split(seqs.len() as u64);
        let feed = lock(&self.feed).clone();
        let stopping = feed.as_ref().is_none_or(|f| f.stopping().is_cancelled());
        let now = Instant::now();
        let mut queued = Vec::new();
        let mut refused: Option<ArchiveError> = None;
        for Retry {
            mut ticket,
            delay_secs,
            reason,
        } in retry
        {
            let room = in_flight.split(1);
            let path = &self.shared.paths[ticket.origin.file];
            if delay_secs == 0 {
                // Given back undelivered (shutdown): not checkpointed, so the next run
                // reads it again. Outside a shutdown, offer it again at once.
                if !stopping {
                    queued.push(PendingRetry {
                        due: now,
                        ticket,
                        in_flight: room,
                    });
                }
            } else if ticket.offers >= self.shared.config.max_attempts {
                // The first one becomes the run's fatal error, reported once by the command.
                if refused.is_some() {
                    tracing::warn!(file = %path.display(), line = ticket.origin.line, queue_id = %ticket.record.queue_id, message_id = %ticket.record.id, offers = ticket.offers, "the sink refused another archive record on every offer");
                }
                refused.get_or_insert(ArchiveError::Refused {
                    path: path.clone(),
                    line: ticket.origin.line,
                    id: ticket.record.id.clone(),
                    offers: ticket.offers,
                    reason: reason.unwrap_or_else(|| "not given".to_string()),
                });
            } else {
                ticket.offers += 1;
                bump!(self.shared.stats, archive_reoffered);
                tracing::warn!(file = %path.display(), line = ticket.origin.line, message_id = %ticket.record.id, offer = ticket.offers, delay_s = delay_secs, reason = reason.as_deref().unwrap_or("not given"), "the sink refused an archive record; offering it again after the delay");
                queued.push(PendingRetry {
                    due: now + Duration::from_secs(delay_secs),
                    ticket,
                    in_flight: room,
                });
            }
        }
        if !seqs.is_empty() {
            let confirmed_below = {
                let mut progress = lock(&self.shared.progress);
                progress.settle(&mut seqs, true);
                progress.confirmed_below()
            };
            lock(&self.shared.held).hold(confirmed_room);
            self.shared.prefix_moved(confirmed_below);
        }
        if !queued.is_empty() {
            lock(&self.pending).extend(queued);
            self.shared.wake.notify_one();
        }
        if let (Some(error), Some(feed)) = (refused, feed) {
            feed.fail(error);
        }
    }

    async fn finish(&self, _feed: &Feed<ArchiveTicket>) -> u64 {
        let writer = lock(&self.writer).take();
        if let Some((handle, stop)) = writer {
            stop.cancel();
            if let Err(e) = handle.await {
                tracing::error!(error = %e, "the archive checkpoint writer failed");
            }
        }
        // Refused records still waiting are not checkpointed: the next run reads them.
        lock(&self.pending).clear();
        *lock(&self.feed) = None;
        self.shared.write_checkpoint().await;
        let confirmed = lock(&self.shared.progress).confirmed();
        let unrecorded = if self.shared.checkpoint.is_some() {
            confirmed.saturating_sub(lock(&self.shared.written).confirmed)
        } else {
            // Without a checkpoint file nothing is recorded, and nothing is expected to
            // be: every run reads from the start.
            0
        };
        let held = lock(&self.shared.held).units.take();
        drop(held);
        let report = self.report();
        tracing::info!(
            read = report.read,
            selected = report.selected,
            filtered = report.filtered,
            malformed = report.malformed,
            unreadable_tails = report.unreadable_tails.len(),
            position = %report.position_text(),
            "archive source finished"
        );
        drop(lock(&self.lock).take());
        unrecorded
    }
}

/// Reads `config`'s archives as the source does (same files, order, filters, and the
/// checkpoint's position when there is one) without a pipeline, calling `visit` for each
/// record that passes the filters. For dry runs and for counting what a replay will send.
/// The report's `position` is where reading started. Nothing is written.
pub fn scan(
    config: &ArchiveConfig,
    mut visit: impl FnMut(&Record),
) -> Result<ArchiveReport, ArchiveError> {
    let Prepared { paths, start, .. } = prepare(config)?;
    let mut report = ArchiveReport {
        files: paths.to_vec(),
        position: start,
        complete: start.is_complete(paths.len()),
        ..ArchiveReport::default()
    };
    let mut reader = Reader::new(Arc::clone(&paths), start);
    while let Some(event) = reader.next_event()? {
        match event {
            Event::Line { origin, kind, .. } => match kind {
                LineKind::Record(record) => {
                    report.read += 1;
                    if config.selects(record.timestamp_ms, record.content_type) {
                        report.selected += 1;
                        visit(&record);
                    } else {
                        report.filtered += 1;
                    }
                }
                LineKind::Malformed(reason) => {
                    report.note_malformed(&paths[origin.file], origin.line, &reason)
                }
                LineKind::Blank => report.blank_lines += 1,
            },
            Event::Tail(tail) => report.note_tail(tail),
            Event::FileStarted { .. } | Event::Ended { .. } => {}
        }
    }
    Ok(report)
}
