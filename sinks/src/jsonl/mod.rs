//! The JSONL file sink: an append-only archive, one JSON object per line.
//!
//! Durability: a batch is confirmed only after its bytes are written and `sync_data` has
//! returned. A dedicated writer thread takes every batch that is waiting, writes them all
//! and syncs once (group commit), so concurrent batches share one fsync. When the sink
//! creates the file or any of its parent directories, the directory that lists each new
//! entry is synced before the sink is ready, so a confirmed record never sits in a file
//! that a crash could unlink ([`dir`]).
//!
//! Crash safety: a crash can leave a partial last line. Nothing in it was confirmed (the
//! sync never returned), so [`JsonlSink::open`] cuts it off and the archive stays readable
//! line by line. A failed write is rolled back the same way (`set_len` to the confirmed
//! length) before it is reported. If that rollback fails too, the end of the file is
//! unknown: the sink enters a failed state in which it writes and confirms nothing more
//! (every batch fails, with the reason), because a later rollback to a stale length could
//! cut bytes that were confirmed after the garbage. A restart repairs the tail.
//!
//! Exclusive use: the archive is locked through `<path>.lock` ([`crate::lock`]) for as
//! long as the sink is open, so a second bridge on the same path fails at start instead of
//! interleaving lines and cutting each other's tails.
//!
//! Directory mode (`directory` instead of `path`): the same writer thread and group commit,
//! but into rotating, optionally compressed segments; see [`segments`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

mod config;
pub mod dir;
pub mod segments;

pub use config::{
    JsonlConfig, JsonlMode, SegmentSettings, DEFAULT_ROTATE_BYTES, DEFAULT_ROTATE_SECS,
};

use crate::lock::{LockError, PathLock};
use crate::{ErrorClass, Outcome, Record, Sink, SinkError};

/// Failures of the JSONL sink. Those met while opening the archive are permanent (the
/// configuration or the file system must change); those met while writing (a full disk, a
/// segment that cannot be created) are transient, so that the pipeline keeps the records
/// and Cloudflare redelivers them.
#[derive(Debug, thiserror::Error)]
pub enum JsonlError {
    /// A missing parent directory could not be created (or made durable).
    #[error("creating directory {}: {source}", dir.display())]
    CreateDir {
        /// The directory that was to be created.
        dir: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The archive's lock is held by another process, or could not be taken.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// The archive could not be opened or created.
    #[error("opening {}: {source}", path.display())]
    Open {
        /// The archive.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The directory listing a newly created archive could not be synced.
    #[error("syncing the directory of the new file {}: {source}", path.display())]
    SyncDir {
        /// The new archive.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A torn last line could not be found or cut off.
    #[error("repairing {}: {source}", path.display())]
    Repair {
        /// The archive.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A segment could not be created, closed (synced and renamed) or encoded, or the
    /// directory listing it could not be synced. Nothing of the group being written is
    /// confirmed.
    #[error("{action} segment {}: {source}", path.display())]
    Segment {
        /// What was being done: `creating`, `closing`, `compressing`.
        action: &'static str,
        /// The segment.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The segments' directory could not be listed, or a leftover `.partial` segment could
    /// not be repaired and closed, at start.
    #[error("repairing the segments in {}: {source}", path.display())]
    RepairSegments {
        /// The directory, or the segment that could not be repaired.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("starting the JSONL writer thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// A batch came after `close`.
    #[error("the JSONL sink is closed")]
    Closed,
    /// The writer thread is gone, so nothing can be written.
    #[error("the JSONL writer thread stopped")]
    WriterStopped,
    /// The writer thread panicked; seen when joining it at close.
    #[error("the JSONL writer thread panicked")]
    WriterPanicked,
    /// Writing or syncing a group of batches failed; it was rolled back.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The archive.
        path: PathBuf,
        /// What failed (the append or the `sync_data`).
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not find the end of the archive, so it writes nothing.
    #[error("the JSONL sink cannot write {}: finding the end of the file failed: {source}", path.display())]
    End {
        /// The archive.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The failed state: a write failed and rolling it back failed too, so the end of the
    /// file is unknown and the sink confirms nothing more until restarted.
    #[error(
        "the JSONL sink stopped writing {}: a write failed ({write}) and rolling it back to the {confirmed} confirmed bytes failed too ({rollback}), so the end of the file is unknown. It confirms nothing more; restart the bridge (opening the archive cuts the torn tail, unconfirmed records are redelivered)",
        path.display()
    )]
    RollbackFailed {
        /// The archive.
        path: PathBuf,
        /// Why the write failed.
        write: std::io::Error,
        /// Why the rollback failed.
        #[source]
        rollback: std::io::Error,
        /// The bytes confirmed before the failed write, where the rollback was to cut.
        confirmed: u64,
    },
}

impl JsonlError {
    /// Whether retrying later can help: opening failures are [`ErrorClass::Permanent`],
    /// failures while running (the failed state included) are [`ErrorClass::Transient`].
    pub fn class(&self) -> ErrorClass {
        match self {
            JsonlError::CreateDir { .. }
            | JsonlError::Lock(_)
            | JsonlError::Open { .. }
            | JsonlError::SyncDir { .. }
            | JsonlError::Repair { .. }
            | JsonlError::RepairSegments { .. }
            | JsonlError::Spawn(_) => ErrorClass::Permanent,
            JsonlError::Closed
            | JsonlError::WriterStopped
            | JsonlError::WriterPanicked
            | JsonlError::Write { .. }
            | JsonlError::Segment { .. }
            | JsonlError::End { .. }
            | JsonlError::RollbackFailed { .. } => ErrorClass::Transient,
        }
    }
}

impl From<&JsonlError> for SinkError {
    fn from(error: &JsonlError) -> Self {
        SinkError {
            class: error.class(),
            message: error.to_string(),
        }
    }
}

impl From<JsonlError> for SinkError {
    fn from(error: JsonlError) -> Self {
        SinkError::from(&error)
    }
}

/// One batch waiting for the writer thread.
struct WriteRequest {
    lines: Vec<u8>,
    /// The queue of the batch's first record (names a new segment in directory mode).
    queue: Arc<str>,
    /// The writer's answer. Shared (`Arc`) because one failure answers a whole group.
    done: oneshot::Sender<Result<(), Arc<JsonlError>>>,
}

/// Appends records to a file, or to rotating segments in a directory, fsynced before
/// confirming.
pub struct JsonlSink {
    /// The archive file, or the segments' directory.
    path: PathBuf,
    /// Feeds the writer thread. Dropping it (on close) ends the thread.
    requests: Mutex<Option<mpsc::UnboundedSender<WriteRequest>>>,
    /// The writer thread, joined on close so that its final sync and the release of the
    /// lock happen before `close` returns.
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Set once by the writer thread when it has stopped writing for good: why.
    failed: Arc<OnceLock<Arc<JsonlError>>>,
}

impl std::fmt::Debug for JsonlSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlSink")
            .field("path", &self.path)
            .finish()
    }
}

/// The file operations of the writer thread. A seam: tests put a file that fails on
/// demand behind it.
trait ArchiveFile: Send + 'static {
    /// Appends bytes (all of them, or an error; some may have reached the file then).
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()>;
    /// `fdatasync`.
    fn sync_data(&mut self) -> std::io::Result<()>;
    /// Cuts the file to `len` bytes and appends from there.
    fn truncate_to(&mut self, len: u64) -> std::io::Result<()>;
    /// The current length, where the next append goes.
    fn end(&mut self) -> std::io::Result<u64>;
    /// `fsync`, at close.
    fn sync_all(&mut self) -> std::io::Result<()>;
}

impl ArchiveFile for File {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.write_all(bytes)?;
        self.flush()
    }

    fn sync_data(&mut self) -> std::io::Result<()> {
        File::sync_data(self)
    }

    fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        self.set_len(len)?;
        self.seek(SeekFrom::End(0)).map(drop)
    }

    fn end(&mut self) -> std::io::Result<u64> {
        self.seek(SeekFrom::End(0))
    }

    fn sync_all(&mut self) -> std::io::Result<()> {
        File::sync_all(self)
    }
}

impl<F: ArchiveFile + ?Sized> ArchiveFile for Box<F> {
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        (**self).append(bytes)
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        (**self).sync_data()
    }
    fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
        (**self).truncate_to(len)
    }
    fn end(&mut self) -> std::io::Result<u64> {
        (**self).end()
    }
    fn sync_all(&mut self) -> std::io::Result<()> {
        (**self).sync_all()
    }
}

/// An open archive file and the bytes of it that are confirmed: the group commit with its
/// rollback, shared by the single file and each segment.
struct Appender<F> {
    file: F,
    /// The file, for errors and logs.
    path: PathBuf,
    /// Bytes confirmed (synced) so far: where a failed write is rolled back to.
    len: u64,
}

impl<F: ArchiveFile> Appender<F> {
    /// Takes an open file whose whole content counts as confirmed.
    fn new(mut file: F, path: PathBuf) -> Result<Self, JsonlError> {
        match file.end() {
            Ok(len) => Ok(Appender { file, path, len }),
            Err(source) => Err(JsonlError::End { path, source }),
        }
    }

    /// Appends `parts` in order and syncs once. On failure, cuts the file back to the
    /// confirmed length, so that a later write does not follow a torn line, and reports
    /// [`JsonlError::Write`]; when that cut fails too, [`JsonlError::RollbackFailed`]: the
    /// end of the file is then unknown.
    fn commit(&mut self, parts: &[&[u8]]) -> Result<(), JsonlError> {
        let written = (|| {
            let mut written = 0u64;
            for part in parts {
                self.file.append(part)?;
                written += part.len() as u64;
            }
            self.file.sync_data()?;
            Ok::<u64, std::io::Error>(written)
        })();
        match written {
            Ok(written) => {
                self.len += written;
                Ok(())
            }
            Err(write) => {
                tracing::warn!(path = %self.path.display(), error = %write, "JSONL write failed");
                match self.file.truncate_to(self.len) {
                    Ok(()) => Err(JsonlError::Write {
                        path: self.path.clone(),
                        source: write,
                    }),
                    Err(rollback) => {
                        tracing::error!(path = %self.path.display(), error = %rollback, confirmed_bytes = self.len, "could not roll back a failed JSONL write; the sink confirms nothing more until restarted");
                        Err(JsonlError::RollbackFailed {
                            path: self.path.clone(),
                            write,
                            rollback,
                            confirmed: self.len,
                        })
                    }
                }
            }
        }
    }

    /// `fsync` at close; a failure is logged (everything confirmed was synced already).
    fn sync_all(&mut self) -> std::io::Result<()> {
        self.file.sync_all().inspect_err(|e| {
            tracing::warn!(path = %self.path.display(), error = %e, "final sync of a JSONL file failed");
        })
    }
}

/// Where the writer thread puts each group: one file, or rotating segments.
trait Target: Send + 'static {
    /// Writes and syncs the group's batches, in order. An `Err` means nothing of the group
    /// is confirmed; [`JsonlError::RollbackFailed`] turns the sink failed.
    fn commit(&mut self, group: &[WriteRequest]) -> Result<(), JsonlError>;
    /// When [`Target::tick`] is due next, if ever.
    fn next_tick(&self) -> Option<Instant> {
        None
    }
    /// Time-driven work, called when no batch arrived by [`Target::next_tick`].
    fn tick(&mut self) {}
    /// At close: syncs. `healthy` is false in the failed state, where the end of the file
    /// is unknown and must be left for the repair at the next start.
    fn finish(&mut self, healthy: bool);
}

/// The single-file mode: every group is appended to one file.
struct SingleFile<F> {
    appender: Appender<F>,
    /// Held until the writer thread ends, after the final sync.
    _lock: Option<PathLock>,
}

impl<F: ArchiveFile> Target for SingleFile<F> {
    fn commit(&mut self, group: &[WriteRequest]) -> Result<(), JsonlError> {
        let parts: Vec<&[u8]> = group.iter().map(|r| &r.lines[..]).collect();
        self.appender.commit(&parts)
    }

    fn finish(&mut self, _healthy: bool) {
        let _ = self.appender.sync_all();
    }
}

impl JsonlSink {
    /// Opens the archive the settings describe: one file ([`JsonlSink::open_file`]) or a
    /// directory of rotating segments ([`segments`]).
    ///
    /// Fails with a permanent error naming the path and the holder's pid when another
    /// process has the archive open.
    pub fn open(config: &JsonlConfig) -> Result<Self, SinkError> {
        match config.mode().map_err(SinkError::permanent)? {
            JsonlMode::File(path) => Self::open_file(path),
            JsonlMode::Segments(settings) => {
                let segments = segments::Segments::open(&settings)?;
                Self::start(settings.directory.to_path_buf(), segments)
            }
        }
    }

    /// Creates missing parent directories (durably), locks the archive, opens (or
    /// creates, durably) the file, repairs a torn tail, and starts the writer thread.
    fn open_file(path: &Path) -> Result<Self, SinkError> {
        let path = path.to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            dir::create_dir_all_synced(parent).map_err(|source| JsonlError::CreateDir {
                dir: parent.to_path_buf(),
                source,
            })?;
        }
        let lock = PathLock::acquire(&path).map_err(JsonlError::from)?;
        let opening = |source| JsonlError::Open {
            path: path.clone(),
            source,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true);
        let mut file = match options.clone().create_new(true).open(&path) {
            Ok(file) => {
                // A new directory entry: durable before anything written there is confirmed.
                dir::sync_parent(&path).map_err(|source| JsonlError::SyncDir {
                    path: path.clone(),
                    source,
                })?;
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                options.open(&path).map_err(opening)?
            }
            Err(e) => return Err(opening(e).into()),
        };
        let cut = repair_torn_tail(&mut file).map_err(|source| JsonlError::Repair {
            path: path.clone(),
            source,
        })?;
        if cut > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = cut,
                "cut off a torn last line left by an earlier crash (it was never confirmed)"
            );
        }
        Self::start_file(path, file, Some(lock))
    }

    /// Starts the writer thread on one open archive file. It owns the lock, so the lock is
    /// released only after the thread's final sync.
    fn start_file(
        path: PathBuf,
        file: impl ArchiveFile,
        lock: Option<PathLock>,
    ) -> Result<Self, SinkError> {
        let appender = Appender::new(file, path.clone())?;
        Self::start(
            path,
            SingleFile {
                appender,
                _lock: lock,
            },
        )
    }

    /// Starts the writer thread on a target. The target owns the lock, so the lock is
    /// released only after the thread's final sync.
    fn start(path: PathBuf, target: impl Target) -> Result<Self, SinkError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let failed = Arc::new(OnceLock::new());
        let thread_failed = Arc::clone(&failed);
        // The writer's own clock for age rotation: waiting for a batch with a deadline.
        let clock = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(JsonlError::Spawn)?;
        let writer = std::thread::Builder::new()
            .name("jsonl-writer".into())
            .spawn(move || writer_loop(target, &clock, rx, &thread_failed))
            .map_err(JsonlError::Spawn)?;
        Ok(JsonlSink {
            path,
            requests: Mutex::new(Some(tx)),
            writer: Mutex::new(Some(writer)),
            failed,
        })
    }

    /// The archive's path: the file, or the segments' directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sender(&self) -> Option<mpsc::UnboundedSender<WriteRequest>> {
        // A poisoned lock only means another thread panicked while cloning a sender;
        // the Option inside is still valid.
        let guard = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }
}

#[async_trait]
impl Sink for JsonlSink {
    fn kind(&self) -> &'static str {
        "jsonl"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        if records.is_empty() {
            return Vec::new();
        }
        let mut lines = Vec::with_capacity(records.len() * (records[0].body.len() + 200));
        for record in records {
            record.write_json_line(&mut lines);
        }
        let queue = Arc::clone(&records[0].queue_id);
        let (done, answer) = oneshot::channel();
        // Every failure here is transient, the failed state included: the pipeline then
        // keeps the records, pauses pulling while `ready` fails, and finally releases them
        // to Cloudflare for redelivery. Nothing is lost, the process keeps running and
        // reports why; a permanent class would instead push good records through
        // Cloudflare's retries into the dead-letter queue.
        let outcome = match self.sender() {
            None => Outcome::Failed(JsonlError::Closed.into()),
            Some(tx) => match tx.send(WriteRequest { lines, queue, done }) {
                Err(_) => Outcome::Failed(JsonlError::WriterStopped.into()),
                Ok(()) => match answer.await {
                    Ok(Ok(())) => Outcome::Confirmed,
                    Ok(Err(e)) => Outcome::Failed(SinkError::from(&*e)),
                    Err(_) => Outcome::Failed(JsonlError::WriterStopped.into()),
                },
            },
        };
        vec![outcome; records.len()]
    }

    async fn ready(&self) -> Result<(), SinkError> {
        if let Some(reason) = self.failed.get() {
            return Err(SinkError::from(&**reason));
        }
        match self.sender() {
            Some(tx) if !tx.is_closed() => Ok(()),
            _ => Err(JsonlError::WriterStopped.into()),
        }
    }

    async fn close(&self) -> Result<(), SinkError> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        let writer = self.writer.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(writer) = writer {
            // The thread ends once the sender is gone: final sync, then the lock is let go.
            let joined = tokio::task::spawn_blocking(move || writer.join()).await;
            if !matches!(joined, Ok(Ok(()))) {
                return Err(JsonlError::WriterPanicked.into());
            }
        }
        Ok(())
    }
}

/// The writer thread: waits for a batch (or for the target's next tick), takes every
/// other batch already waiting, writes them all, syncs once, then answers each. After a
/// rollback failed, answers every batch with the failure and writes nothing.
fn writer_loop(
    mut target: impl Target,
    clock: &tokio::runtime::Runtime,
    mut rx: mpsc::UnboundedReceiver<WriteRequest>,
    failed: &OnceLock<Arc<JsonlError>>,
) {
    loop {
        let next_tick = target.next_tick().filter(|_| failed.get().is_none());
        let received = clock.block_on(async {
            match next_tick {
                Some(at) => tokio::time::timeout_at(at.into(), rx.recv()).await.ok(),
                None => Some(rx.recv().await),
            }
        });
        let first = match received {
            // The tick is due, nothing arrived.
            None => {
                target.tick();
                continue;
            }
            // Every sender is gone: the sink is closed.
            Some(None) => break,
            Some(Some(request)) => request,
        };
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let answer = match failed.get() {
            Some(reason) => Err(Arc::clone(reason)),
            None => match target.commit(&group) {
                Ok(()) => Ok(()),
                Err(e @ JsonlError::RollbackFailed { .. }) => {
                    Err(Arc::clone(failed.get_or_init(|| Arc::new(e))))
                }
                Err(e) => Err(Arc::new(e)),
            },
        };
        for request in group {
            // The delivering task may have been cancelled (shutdown); nothing to tell it.
            let _ = request.done.send(answer.clone());
        }
    }
    target.finish(failed.get().is_none());
}

/// Cuts a partial last line (no trailing newline) off the file. Returns the bytes removed.
pub fn repair_torn_tail(file: &mut File) -> std::io::Result<u64> {
    let len = file.seek(SeekFrom::End(0))?;
    if len == 0 {
        return Ok(0);
    }
    let mut last = [0u8; 1];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    if last[0] == b'\n' {
        return Ok(0);
    }
    // Scan backwards in chunks for the last newline.
    const CHUNK: u64 = 64 * 1024;
    let mut end = len;
    let mut keep = 0u64;
    let mut buf = vec![0u8; CHUNK as usize];
    while end > 0 {
        let start = end.saturating_sub(CHUNK);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut buf[..n])?;
        if let Some(pos) = buf[..n].iter().rposition(|b| *b == b'\n') {
            keep = start + pos as u64 + 1;
            break;
        }
        end = start;
    }
    file.set_len(keep)?;
    file.sync_data()?;
    file.seek(SeekFrom::End(0))?;
    Ok(len - keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ContentType;
    use bytes::Bytes;
    use std::sync::Arc;

    fn record(i: usize, content_type: ContentType, body: &[u8]) -> Record {
        let mut metadata = serde_json::Map::new();
        metadata.insert("CF-Content-Type".into(), content_type.as_str().into());
        Record {
            id: format!("id-{i}"),
            queue_id: Arc::from("q"),
            timestamp_ms: 1,
            attempts: 1,
            content_type,
            metadata,
            body: Bytes::copy_from_slice(body),
        }
    }

    #[tokio::test]
    async fn appends_lines_and_confirms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/a.jsonl");
        let sink = JsonlSink::open(&JsonlConfig::file(path.clone())).unwrap();
        let batch: Vec<_> = (0..3).map(|i| record(i, ContentType::Text, b"t")).collect();
        let outcomes = sink.deliver(&batch).await;
        assert!(outcomes.iter().all(Outcome::is_confirmed));
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        sink.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_torn_tail_is_cut_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, b"{\"id\":\"1\"}\n{\"id\":\"2\"}\n{\"id\":\"3\",\"bo").unwrap();
        let sink = JsonlSink::open(&JsonlConfig::file(path.clone())).unwrap();
        let outcomes = sink.deliver(&[record(4, ContentType::Json, b"{}")]).await;
        assert!(outcomes[0].is_confirmed());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for line in lines {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }

    #[tokio::test]
    async fn new_directories_and_the_new_file_are_synced_into_their_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let path = root.join("x/y/a.jsonl");
        dir::hook::take();
        let sink = JsonlSink::open(&JsonlConfig::file(path.clone())).unwrap();
        // x listed in root, y in x, a.jsonl in y: all durable before the first confirm.
        assert_eq!(
            dir::hook::take(),
            vec![root.to_path_buf(), root.join("x"), root.join("x/y")]
        );
        assert!(sink.deliver(&[record(1, ContentType::Text, b"t")]).await[0].is_confirmed());
        sink.close().await.unwrap();
        // Opening an existing file in existing directories creates no entry: no sync.
        let sink = JsonlSink::open(&JsonlConfig::file(path)).unwrap();
        assert_eq!(dir::hook::take(), Vec::<PathBuf>::new());
        sink.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_second_open_of_the_archive_is_refused_while_the_first_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let first = JsonlSink::open(&JsonlConfig::file(path.clone())).unwrap();
        let err = JsonlSink::open(&JsonlConfig::file(path.clone())).unwrap_err();
        let text = err.to_string();
        assert!(!err.is_transient(), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        // Closing lets go of the lock (after the writer's final sync).
        first.close().await.unwrap();
        let again = JsonlSink::open(&JsonlConfig::file(path)).unwrap();
        again.close().await.unwrap();
    }

    /// A file in memory whose writes and truncations fail on demand.
    #[derive(Default)]
    struct Flaky {
        data: Vec<u8>,
        fail_writes: bool,
        fail_truncate: bool,
        truncations: Vec<u64>,
    }

    #[derive(Clone, Default)]
    struct FlakyFile(Arc<Mutex<Flaky>>);

    impl FlakyFile {
        fn with<R>(&self, f: impl FnOnce(&mut Flaky) -> R) -> R {
            f(&mut self.0.lock().unwrap())
        }
    }

    impl ArchiveFile for FlakyFile {
        fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.with(|f| {
                if f.fail_writes {
                    // Half the bytes reach the file, then the disk is full.
                    f.data.extend_from_slice(&bytes[..bytes.len() / 2]);
                    return Err(std::io::Error::other("no space left (injected)"));
                }
                f.data.extend_from_slice(bytes);
                Ok(())
            })
        }
        fn sync_data(&mut self) -> std::io::Result<()> {
            Ok(())
        }
        fn truncate_to(&mut self, len: u64) -> std::io::Result<()> {
            self.with(|f| {
                f.truncations.push(len);
                if f.fail_truncate {
                    return Err(std::io::Error::other("I/O error on set_len (injected)"));
                }
                f.data.truncate(len as usize);
                Ok(())
            })
        }
        fn end(&mut self) -> std::io::Result<u64> {
            Ok(self.with(|f| f.data.len() as u64))
        }
        fn sync_all(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn open_failures_are_permanent_and_name_the_path_and_a_closed_sink_is_transient() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("not-a-dir");
        std::fs::write(&blocker, b"x").unwrap();
        let parent = blocker.join("sub");
        let err = JsonlSink::open(&JsonlConfig::file(parent.join("a.jsonl")))
        .unwrap_err();
        let text = err.to_string();
        assert!(!err.is_transient(), "{text}");
        assert!(
            text.contains(&format!("creating directory {}: ", parent.display())),
            "{text}"
        );

        let sink = JsonlSink::open(&JsonlConfig::file(dir.path().join("b.jsonl")))
        .unwrap();
        sink.close().await.unwrap();
        let outcomes = sink.deliver(&[record(0, ContentType::Text, b"t")]).await;
        let Outcome::Failed(error) = &outcomes[0] else {
            panic!("{outcomes:?}")
        };
        assert!(error.is_transient(), "{error}");
        assert!(error.to_string().ends_with("the JSONL sink is closed"), "{error}");
    }

    #[tokio::test]
    async fn a_failed_rollback_turns_the_sink_failed_and_it_confirms_nothing_more() {
        let file = FlakyFile::default();
        let sink = JsonlSink::start_file("flaky.jsonl".into(), file.clone(), None).unwrap();
        let batch: Vec<_> = (0..4).map(|i| record(i, ContentType::Text, b"t")).collect();
        assert!(sink.deliver(&batch).await.iter().all(Outcome::is_confirmed));
        let confirmed = file.with(|f| f.data.clone());

        // A write fails half-way and so does its rollback.
        file.with(|f| {
            f.fail_writes = true;
            f.fail_truncate = true;
        });
        let outcomes = sink.deliver(&batch).await;
        let Outcome::Failed(error) = &outcomes[0] else {
            panic!("{outcomes:?}")
        };
        assert!(error.is_transient(), "{error}");
        assert!(error.to_string().contains("rolling it back"), "{error}");

        // The disk is fine again: the sink still writes nothing and confirms nothing, so
        // no later rollback can cut below bytes confirmed after the garbage.
        file.with(|f| {
            f.fail_writes = false;
            f.fail_truncate = false;
        });
        let garbage_end = file.with(|f| f.data.len());
        for _ in 0..3 {
            let outcomes = sink.deliver(&batch).await;
            match &outcomes[0] {
                Outcome::Failed(e) => {
                    assert!(e.is_transient());
                    assert!(e.to_string().contains("confirms nothing more"), "{e}");
                }
                other => panic!("a failed sink confirmed a batch: {other:?}"),
            }
        }
        let err = sink.ready().await.unwrap_err();
        assert!(err.to_string().contains("stopped writing"), "{err}");
        file.with(|f| {
            assert_eq!(
                f.data.len(),
                garbage_end,
                "nothing written after the failure"
            );
            assert_eq!(&f.data[..confirmed.len()], &confirmed[..]);
            assert_eq!(f.truncations, vec![confirmed.len() as u64]);
        });
        sink.close().await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_that_rolls_back_leaves_the_sink_writing() {
        let file = FlakyFile::default();
        let sink = JsonlSink::start_file("flaky.jsonl".into(), file.clone(), None).unwrap();
        let batch = [record(1, ContentType::Text, b"t")];
        assert!(sink.deliver(&batch).await[0].is_confirmed());
        let confirmed = file.with(|f| f.data.clone());
        file.with(|f| f.fail_writes = true);
        assert!(!sink.deliver(&batch).await[0].is_confirmed());
        assert_eq!(file.with(|f| f.data.clone()), confirmed, "rolled back");
        file.with(|f| f.fail_writes = false);
        assert!(sink.deliver(&batch).await[0].is_confirmed());
        assert!(sink.ready().await.is_ok());
        assert_eq!(file.with(|f| f.data.len()), 2 * confirmed.len());
        sink.close().await.unwrap();
    }

    #[test]
    fn a_file_that_is_one_torn_line_becomes_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        std::fs::write(&path, vec![b'x'; 200_000]).unwrap();
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        assert_eq!(repair_torn_tail(&mut f).unwrap(), 200_000);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
