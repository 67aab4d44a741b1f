//! The optional crash-safe ack journal (`queue.ack_journal`).
//!
//! As soon as the sink confirmed a batch, its leases are appended as `+LEASE` lines and
//! synced (by the delivery task, before the acker sees them); after their ack call
//! succeeds, `-LEASE` lines are appended (not synced: losing them only means a harmless
//! second ack). At start, leases with a `+` and no `-` were confirmed by the sink but maybe
//! never acknowledged (a crash in between); the acker acks them first, which Cloudflare
//! accepts even after the lease expired. That turns most post-crash redeliveries
//! (duplicates) into nothing.
//!
//! Compaction: once the file has grown past a threshold, it is rewritten with only the
//! pending leases (at most the in-flight bound of them), so its size stays bounded under a
//! steady stream, where some lease is always pending.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Grow past this many bytes before compacting.
const COMPACT_AFTER_BYTES: u64 = 4 * 1024 * 1024;

struct Inner {
    file: File,
    /// Leases written as confirmed and not yet as acked.
    pending: HashSet<String>,
    /// Bytes in the file.
    len: u64,
}

/// The journal file and the set of pending leases.
pub struct Journal {
    path: PathBuf,
    inner: Arc<Mutex<Inner>>,
    /// Leases found pending when the journal was opened.
    recovered: Vec<String>,
}

impl Journal {
    /// Opens (or creates) the journal and reads the leases left pending by an earlier run.
    pub fn open(path: &Path) -> Result<Journal, String> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let mut pending: Vec<String> = Vec::new();
        let mut index: HashSet<String> = HashSet::new();
        if path.exists() {
            let file = File::open(path).map_err(|e| format!("opening {}: {e}", path.display()))?;
            for line in BufReader::new(file).lines() {
                // A torn last line (crash mid-write) is not valid UTF-8 or lacks its
                // sign: skipping it is safe, its ack was never sent.
                let Ok(line) = line else { break };
                if let Some(lease) = line.strip_prefix('+') {
                    if index.insert(lease.to_string()) {
                        pending.push(lease.to_string());
                    }
                } else if let Some(lease) = line.strip_prefix('-') {
                    index.remove(lease);
                }
            }
        }
        pending.retain(|l| index.contains(l));
        // Rewrite the file with only the pending leases, then append from there.
        let tmp = path.with_extension("tmp");
        {
            let mut out =
                File::create(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
            for lease in &pending {
                writeln!(out, "+{lease}").map_err(|e| e.to_string())?;
            }
            out.sync_all().map_err(|e| e.to_string())?;
        }
        std::fs::rename(&tmp, path).map_err(|e| format!("replacing {}: {e}", path.display()))?;
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|e| format!("opening {}: {e}", path.display()))?;
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Journal {
            path: path.to_path_buf(),
            inner: Arc::new(Mutex::new(Inner {
                file,
                pending: index,
                len,
            })),
            recovered: pending,
        })
    }

    /// Leases confirmed but maybe not acknowledged by the previous run.
    pub fn pending(&self) -> Vec<String> {
        self.recovered.clone()
    }

    /// The journal's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends confirmed leases and syncs, before their ack call.
    pub async fn record_confirmed(&self, leases: &[String]) -> std::io::Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let mut text = String::with_capacity(leases.iter().map(|l| l.len() + 2).sum());
        for lease in leases {
            text.push('+');
            text.push_str(lease);
            text.push('\n');
        }
        let leases = leases.to_vec();
        let inner = Arc::clone(&self.inner);
        run_blocking(move || {
            let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
            inner.file.write_all(text.as_bytes())?;
            inner.file.sync_data()?;
            inner.len += text.len() as u64;
            inner.pending.extend(leases);
            Ok(())
        })
        .await
    }

    /// Marks leases acknowledged; compacts the file once it has grown past the threshold.
    pub async fn record_acked(&self, leases: &[String]) -> std::io::Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let leases = leases.to_vec();
        let inner = Arc::clone(&self.inner);
        let path = self.path.clone();
        run_blocking(move || {
            let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
            for lease in &leases {
                inner.pending.remove(lease);
            }
            if inner.len > COMPACT_AFTER_BYTES {
                return compact(&mut inner, &path);
            }
            let mut text = String::new();
            for lease in &leases {
                text.push('-');
                text.push_str(lease);
                text.push('\n');
            }
            inner.file.write_all(text.as_bytes())?;
            inner.len += text.len() as u64;
            Ok(())
        })
        .await
    }
}

/// Rewrites the journal with only the pending leases: a new file, synced, renamed over
/// the old one, then appended to. A crash at any point leaves either file, both correct.
fn compact(inner: &mut Inner, path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut text = String::new();
    for lease in &inner.pending {
        text.push('+');
        text.push_str(lease);
        text.push('\n');
    }
    {
        let mut out = File::create(&tmp)?;
        out.write_all(text.as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    inner.file = OpenOptions::new().append(true).open(path)?;
    inner.len = text.len() as u64;
    Ok(())
}

async fn run_blocking(
    f: impl FnOnce() -> std::io::Result<()> + Send + 'static,
) -> std::io::Result<()> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pending_leases_survive_a_restart_and_acked_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        let j = Journal::open(&path).unwrap();
        assert!(j.pending().is_empty());
        j.record_confirmed(&["a".into(), "b".into(), "c".into()])
            .await
            .unwrap();
        j.record_acked(&["b".into()]).await.unwrap();
        drop(j);
        // Simulate a torn last line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"+tor").unwrap();
        drop(f);
        let j = Journal::open(&path).unwrap();
        let mut p = j.pending();
        p.sort();
        assert_eq!(p, vec!["a".to_string(), "c".into(), "tor".into()]);
        j.record_acked(&p).await.unwrap();
        drop(j);
        assert!(Journal::open(&path).unwrap().pending().is_empty());
    }

    #[tokio::test]
    async fn compaction_keeps_the_pending_leases_under_a_steady_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        let j = Journal::open(&path).unwrap();
        // A lease always pending, as under a steady stream of confirmations.
        j.record_confirmed(&["keep".into()]).await.unwrap();
        let lease = "l".repeat(200);
        // Each round writes 100 lines of about 200 bytes: enough rounds to pass the
        // threshold twice, with few syncs.
        let rounds = 2 * COMPACT_AFTER_BYTES as usize / (100 * 200) + 10;
        for i in 0..rounds {
            let batch: Vec<String> = (0..50).map(|k| format!("{lease}{i}-{k}")).collect();
            j.record_confirmed(&batch).await.unwrap();
            j.record_acked(&batch).await.unwrap();
        }
        let size = std::fs::metadata(&path).unwrap().len();
        assert!(
            size < COMPACT_AFTER_BYTES,
            "the journal was compacted: {size} bytes"
        );
        drop(j);
        assert_eq!(
            Journal::open(&path).unwrap().pending(),
            vec!["keep".to_string()]
        );
    }
}
