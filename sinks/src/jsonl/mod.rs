//! The JSONL file sink: an append-only archive, one JSON object per line.
//!
//! Durability: a batch is confirmed only after its bytes are written and `sync_data` has
//! returned. A dedicated writer thread takes every batch that is waiting, writes them all
//! and syncs once (group commit), so concurrent batches share one fsync.
//!
//! Crash safety: a crash can leave a partial last line. Nothing in it was confirmed (the
//! sync never returned), so [`JsonlSink::open`] cuts it off and the archive stays readable
//! line by line. A failed write is rolled back the same way before it is reported.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

mod config;

pub use config::JsonlConfig;

use crate::{Outcome, Record, Sink, SinkError};

/// One batch waiting for the writer thread.
struct WriteRequest {
    lines: Vec<u8>,
    done: oneshot::Sender<Result<(), String>>,
}

/// Appends records to a file, fsynced before confirming.
pub struct JsonlSink {
    path: PathBuf,
    /// Feeds the writer thread. Dropping it (on close) ends the thread.
    requests: std::sync::Mutex<Option<mpsc::UnboundedSender<WriteRequest>>>,
}

impl std::fmt::Debug for JsonlSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JsonlSink")
            .field("path", &self.path)
            .finish()
    }
}

impl JsonlSink {
    /// Opens (or creates) the archive, repairs a torn tail, and starts the writer thread.
    pub fn open(config: &JsonlConfig) -> Result<Self, SinkError> {
        let path = config.path.clone();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                SinkError::permanent(format!("creating directory {}: {e}", parent.display()))
            })?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| SinkError::permanent(format!("opening {}: {e}", path.display())))?;
        let cut = repair_torn_tail(&mut file)
            .map_err(|e| SinkError::permanent(format!("repairing {}: {e}", path.display())))?;
        if cut > 0 {
            tracing::warn!(
                path = %path.display(),
                bytes = cut,
                "cut off a torn last line left by an earlier crash (it was never confirmed)"
            );
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("jsonl-writer".into())
            .spawn(move || writer_loop(file, &thread_path, rx))
            .map_err(|e| SinkError::permanent(format!("starting the JSONL writer thread: {e}")))?;
        Ok(JsonlSink {
            path,
            requests: std::sync::Mutex::new(Some(tx)),
        })
    }

    /// The archive's path.
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
        let (done, answer) = oneshot::channel();
        let outcome = match self.sender() {
            None => Outcome::Failed(SinkError::transient("the JSONL sink is closed")),
            Some(tx) => match tx.send(WriteRequest { lines, done }) {
                Err(_) => Outcome::Failed(SinkError::transient("the JSONL writer thread stopped")),
                Ok(()) => match answer.await {
                    Ok(Ok(())) => Outcome::Confirmed,
                    Ok(Err(e)) => Outcome::Failed(SinkError::transient(format!(
                        "writing {}: {e}",
                        self.path.display()
                    ))),
                    Err(_) => {
                        Outcome::Failed(SinkError::transient("the JSONL writer thread stopped"))
                    }
                },
            },
        };
        vec![outcome; records.len()]
    }

    async fn ready(&self) -> Result<(), SinkError> {
        match self.sender() {
            Some(tx) if !tx.is_closed() => Ok(()),
            _ => Err(SinkError::transient("the JSONL writer thread stopped")),
        }
    }

    async fn close(&self) -> Result<(), SinkError> {
        let mut guard = self.requests.lock().unwrap_or_else(|e| e.into_inner());
        guard.take();
        Ok(())
    }
}

/// The writer thread: waits for a batch, takes every other batch already waiting, writes
/// them all, syncs once, then answers each.
fn writer_loop(mut file: File, path: &Path, mut rx: mpsc::UnboundedReceiver<WriteRequest>) {
    let mut len = match file.seek(SeekFrom::End(0)) {
        Ok(len) => len,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot seek the JSONL archive");
            return;
        }
    };
    while let Some(first) = rx.blocking_recv() {
        let mut group = vec![first];
        while let Ok(more) = rx.try_recv() {
            group.push(more);
        }
        let result = write_group(&mut file, &group).and_then(|written| {
            file.sync_data()?;
            Ok(written)
        });
        let answer = match result {
            Ok(written) => {
                len += written;
                Ok(())
            }
            Err(e) => {
                // Roll back whatever part of the group reached the file, so that a later
                // successful write does not follow a torn line.
                if let Err(e2) = file
                    .set_len(len)
                    .and_then(|()| file.seek(SeekFrom::End(0)).map(drop))
                {
                    tracing::error!(path = %path.display(), error = %e2, "could not roll back a failed JSONL write");
                }
                tracing::warn!(path = %path.display(), error = %e, "JSONL write failed");
                Err(e.to_string())
            }
        };
        for request in group {
            // The delivering task may have been cancelled (shutdown); nothing to tell it.
            let _ = request.done.send(answer.clone());
        }
    }
    if let Err(e) = file.sync_all() {
        tracing::warn!(path = %path.display(), error = %e, "final sync of the JSONL archive failed");
    }
}

fn write_group(file: &mut File, group: &[WriteRequest]) -> std::io::Result<u64> {
    let mut written = 0u64;
    for request in group {
        file.write_all(&request.lines)?;
        written += request.lines.len() as u64;
    }
    file.flush()?;
    Ok(written)
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
        let sink = JsonlSink::open(&JsonlConfig { path: path.clone() }).unwrap();
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
        let sink = JsonlSink::open(&JsonlConfig { path: path.clone() }).unwrap();
        let outcomes = sink.deliver(&[record(4, ContentType::Json, b"{}")]).await;
        assert!(outcomes[0].is_confirmed());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        for line in lines {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
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
