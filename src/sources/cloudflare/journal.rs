//! The optional crash-safe ack journal (`queue.ack_journal`).
//!
//! As soon as the sink confirmed a batch, its leases are appended as `+LEASE` lines and
//! synced (by the delivery task, before the acker sees them); after their ack call
//! succeeds, `-LEASE` lines are appended (not synced: losing them only means a harmless
//! second ack). At start, leases with a `+` and no `-` were confirmed by the sink but maybe
//! never acknowledged (a crash in between); the acker acks them first, which Cloudflare
//! accepts even after the lease expired. That turns most post-crash redeliveries
//! (duplicates) into nothing. The journal only ever saves duplicates: an entry skipped or
//! dropped means at worst that its message is delivered again.
//!
//! Format (version 2), one entry per line, each ending in a space and the CRC-32 (IEEE)
//! of the bytes before that space, as 8 lowercase hex digits:
//!
//! ```text
//! cfq-bridge-ack-journal v2 account=<account_id> queue=<queue_id> 1a2b3c4d
//! +<lease_id> 5e6f7a8b
//! -<lease_id> 9c0d1e2f
//! ```
//!
//! A line whose checksum does not match, or the last line when it has no newline, is a
//! torn write: it is skipped and counted ([`Journal::skipped_lines`]), never read as a
//! shorter lease id. The header names the account and queue the journal belongs to;
//! opening it for another queue is an error ([`JournalError::OtherQueue`]).
//!
//! Old journals (version 1: bare `+LEASE`/`-LEASE` lines, no header, no checksums) are
//! read once and rewritten as version 2 for the configured queue: only lines ending in a
//! newline count (the old writer wrote whole lines, so a line without one is the torn
//! last write). They name no queue, so they are adopted as this queue's, with a warning.
//! Reading rather than refusing them keeps an upgrade from stopping at start; a wrong
//! entry can only be refused by the API, which is dropped and counted.
//!
//! Compaction: once the file has grown past a threshold, it is rewritten with only the
//! pending leases (at most the in-flight bound of them), so its size stays bounded under a
//! steady stream, where some lease is always pending. Rewrites go to `<path>.tmp`, are
//! synced, renamed over the journal, and the directory is synced.
//!
//! Exclusive use: the journal is locked through `<path>.lock` while open
//! ([`cfq_sinks::lock`]); a second bridge on the same journal fails at start.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use cfq_sinks::jsonl::dir;
use cfq_sinks::lock::{LockError, PathLock};

/// Grow past this many bytes before compacting.
const COMPACT_AFTER_BYTES: u64 = 4 * 1024 * 1024;

/// The first word of a version-2 journal.
const MAGIC: &str = "cfq-bridge-ack-journal v2";

/// Why the journal could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// Another process has the journal open.
    #[error("ack journal: {0}")]
    Locked(#[from] LockError),
    /// Reading, writing or replacing the file failed.
    #[error("ack journal {}: {action}: {source}", path.display())]
    Io {
        /// The journal (or its temporary rewrite).
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The journal belongs to another account or queue.
    #[error("ack journal {} belongs to account {found_account} queue {found_queue}, not to this config's account {account} queue {queue}. Give each queue its own queue.ack_journal path", path.display())]
    OtherQueue {
        /// The journal.
        path: PathBuf,
        /// The account named in its header.
        found_account: String,
        /// The queue named in its header.
        found_queue: String,
        /// The account of this run.
        account: String,
        /// The queue of this run.
        queue: String,
    },
    /// The file is not a journal this bridge can read.
    #[error("{} is not a cfq-bridge ack journal (first line {first_line:?}). Point queue.ack_journal at a journal file, or at a path that does not exist yet", path.display())]
    NotAJournal {
        /// The file.
        path: PathBuf,
        /// The start of its first line.
        first_line: String,
    },
}

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
    /// The header line (with its newline), written again by every rewrite.
    header: String,
    inner: Arc<Mutex<Inner>>,
    /// Leases found pending when the journal was opened.
    recovered: Vec<String>,
    /// Torn lines skipped when the journal was opened.
    skipped: u64,
    /// Held while the journal is open.
    _lock: PathLock,
}

/// What reading an existing journal found.
struct Read {
    /// Pending leases, in the order they were confirmed.
    pending: Vec<String>,
    /// Torn (or otherwise unverifiable) lines.
    skipped: u64,
    /// The file was in the old, version-1 format.
    legacy: bool,
}

impl Journal {
    /// Opens (or creates) the journal of `account_id`/`queue_id`, locks it, and reads the
    /// leases left pending by an earlier run.
    pub fn open(path: &Path, account_id: &str, queue_id: &str) -> Result<Journal, JournalError> {
        let io = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| JournalError::Io {
                path,
                action,
                source,
            }
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            dir::create_dir_all_synced(parent).map_err(io("creating its directory", parent))?;
        }
        let lock = PathLock::acquire(path)?;
        let header = line(&format!("{MAGIC} account={account_id} queue={queue_id}"));
        let read = match std::fs::read(path) {
            Ok(bytes) => read_journal(path, &bytes, account_id, queue_id)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Read {
                pending: Vec::new(),
                skipped: 0,
                legacy: false,
            },
            Err(e) => return Err(io("reading", path)(e)),
        };
        if read.skipped > 0 {
            tracing::warn!(
                path = %path.display(),
                lines = read.skipped,
                "skipped torn ack journal lines (a write cut short by a crash; those leases may be redelivered)"
            );
        }
        if read.legacy {
            tracing::warn!(
                path = %path.display(),
                account_id,
                queue_id,
                leases = read.pending.len(),
                "read an ack journal of the old format (no header, no checksums); it is rewritten in the new format for this queue"
            );
        }
        // Rewrite the file with only the pending leases, then append from there.
        let index: HashSet<String> = read.pending.iter().cloned().collect();
        let (file, len) = rewrite(path, &header, read.pending.iter())
            .map_err(io("rewriting with the pending leases", path))?;
        Ok(Journal {
            path: path.to_path_buf(),
            header,
            inner: Arc::new(Mutex::new(Inner {
                file,
                pending: index,
                len,
            })),
            recovered: read.pending,
            skipped: read.skipped,
            _lock: lock,
        })
    }

    /// Leases confirmed but maybe not acknowledged by the previous run.
    pub fn pending(&self) -> Vec<String> {
        self.recovered.clone()
    }

    /// Lines skipped when the journal was opened because they failed their check (torn
    /// writes).
    pub fn skipped_lines(&self) -> u64 {
        self.skipped
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
        let mut text = String::with_capacity(leases.iter().map(|l| l.len() + 11).sum());
        for lease in leases {
            push_entry(&mut text, '+', lease);
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

    /// Marks leases acknowledged (or dropped for good); compacts the file once it has
    /// grown past the threshold.
    pub async fn record_acked(&self, leases: &[String]) -> std::io::Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let leases = leases.to_vec();
        let inner = Arc::clone(&self.inner);
        let path = self.path.clone();
        let header = self.header.clone();
        run_blocking(move || {
            let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
            for lease in &leases {
                inner.pending.remove(lease);
            }
            if inner.len > COMPACT_AFTER_BYTES {
                let (file, len) = rewrite(&path, &header, inner.pending.iter())?;
                inner.file = file;
                inner.len = len;
                return Ok(());
            }
            let mut text = String::new();
            for lease in &leases {
                push_entry(&mut text, '-', lease);
            }
            inner.file.write_all(text.as_bytes())?;
            inner.len += text.len() as u64;
            Ok(())
        })
        .await
    }
}

/// `content`, a space, its checksum and a newline.
fn line(content: &str) -> String {
    format!("{content} {:08x}\n", crc32fast::hash(content.as_bytes()))
}

/// Appends the line of one entry (`sign` is `+` or `-`).
fn push_entry(text: &mut String, sign: char, lease: &str) {
    let start = text.len();
    text.push(sign);
    text.push_str(lease);
    let crc = crc32fast::hash(&text.as_bytes()[start..]);
    text.push(' ');
    // Writing into a String cannot fail.
    let _ = std::fmt::Write::write_fmt(text, format_args!("{crc:08x}\n"));
}

/// The content of a whole, checked line (without its checksum), or `None` when the line
/// is torn: bytes that are not UTF-8, no checksum, or a checksum that does not match.
fn checked(raw: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(raw).ok()?;
    let (content, crc) = text.rsplit_once(' ')?;
    if crc.len() != 8 {
        return None;
    }
    let crc = u32::from_str_radix(crc, 16).ok()?;
    (crc32fast::hash(content.as_bytes()) == crc).then_some(content)
}

/// Parses the bytes of an existing journal.
fn read_journal(
    path: &Path,
    bytes: &[u8],
    account_id: &str,
    queue_id: &str,
) -> Result<Read, JournalError> {
    let mut read = Read {
        pending: Vec::new(),
        skipped: 0,
        legacy: false,
    };
    if bytes.is_empty() {
        return Ok(read);
    }
    // Whole lines end in a newline; what follows the last one is a torn write.
    let (whole, torn) = match bytes.iter().rposition(|&b| b == b'\n') {
        Some(i) => (&bytes[..i], &bytes[i + 1..]),
        None => (&[][..], bytes),
    };
    if !torn.is_empty() {
        read.skipped += 1;
    }
    let mut lines = whole.split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let entries: Box<dyn Iterator<Item = Option<&str>>> = match checked(first) {
        Some(header) if header.starts_with(MAGIC) => {
            let field = |name: &str| {
                header
                    .split(' ')
                    .find_map(|w| w.strip_prefix(name))
                    .unwrap_or_default()
                    .to_string()
            };
            let (found_account, found_queue) = (field("account="), field("queue="));
            if found_account != account_id || found_queue != queue_id {
                return Err(JournalError::OtherQueue {
                    path: path.to_path_buf(),
                    found_account,
                    found_queue,
                    account: account_id.to_string(),
                    queue: queue_id.to_string(),
                });
            }
            Box::new(lines.map(checked))
        }
        // Nothing but a torn write (only an old journal can be in that state).
        _ if whole.is_empty() => Box::new(std::iter::empty()),
        _ if first.starts_with(b"+") || first.starts_with(b"-") => {
            // Version 1: every whole line stands as written.
            read.legacy = true;
            Box::new(
                std::iter::once(first)
                    .chain(lines)
                    .filter(|l| !l.is_empty())
                    .map(|l| std::str::from_utf8(l).ok()),
            )
        }
        _ => {
            let shown = String::from_utf8_lossy(&first[..first.len().min(60)]).into_owned();
            return Err(JournalError::NotAJournal {
                path: path.to_path_buf(),
                first_line: shown,
            });
        }
    };
    let mut index: HashSet<String> = HashSet::new();
    for entry in entries {
        let Some(entry) = entry else {
            read.skipped += 1;
            continue;
        };
        if let Some(lease) = entry.strip_prefix('+').filter(|l| !l.is_empty()) {
            if index.insert(lease.to_string()) {
                read.pending.push(lease.to_string());
            }
        } else if let Some(lease) = entry.strip_prefix('-').filter(|l| !l.is_empty()) {
            index.remove(lease);
        } else {
            read.skipped += 1;
        }
    }
    read.pending.retain(|l| index.contains(l));
    Ok(read)
}

/// Writes the header and the pending leases to `<path>.tmp`, syncs it, renames it over the
/// journal and syncs the directory. A crash at any point leaves either file, both correct.
/// Returns the new file, open for appending, and its length.
fn rewrite<'a>(
    path: &Path,
    header: &str,
    pending: impl Iterator<Item = &'a String>,
) -> std::io::Result<(File, u64)> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut text = String::from(header);
    for lease in pending {
        push_entry(&mut text, '+', lease);
    }
    {
        let mut out = File::create(&tmp)?;
        out.write_all(text.as_bytes())?;
        out.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    dir::sync_parent(path)?;
    let file = OpenOptions::new().append(true).open(path)?;
    Ok((file, text.len() as u64))
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

    const ACCOUNT: &str = "acc";
    const QUEUE: &str = "q1";

    fn open(path: &Path) -> Journal {
        Journal::open(path, ACCOUNT, QUEUE).unwrap()
    }

    fn append(path: &Path, bytes: &[u8]) {
        let mut f = OpenOptions::new().append(true).open(path).unwrap();
        f.write_all(bytes).unwrap();
    }

    #[tokio::test]
    async fn pending_leases_survive_a_restart_and_acked_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        let j = open(&path);
        assert!(j.pending().is_empty());
        j.record_confirmed(&["a".into(), "b".into(), "c".into()])
            .await
            .unwrap();
        j.record_acked(&["b".into()]).await.unwrap();
        drop(j);
        let j = open(&path);
        assert_eq!(j.pending(), vec!["a".to_string(), "c".into()]);
        assert_eq!(j.skipped_lines(), 0);
        j.record_acked(&j.pending()).await.unwrap();
        drop(j);
        assert!(open(&path).pending().is_empty());
    }

    #[tokio::test]
    async fn a_lease_id_cut_in_half_is_skipped_and_counted_not_read_as_a_shorter_id() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        let j = open(&path);
        let whole = "00000001000000020000000000000003deadbeef".to_string();
        j.record_confirmed(std::slice::from_ref(&whole))
            .await
            .unwrap();
        drop(j);
        // A crash cut the next entry half-way through its lease id: no checksum, and here
        // even a newline after it (as when the file size was extended past the data).
        append(&path, b"+0000000100000002000000\n");
        // A whole-looking line whose checksum does not match (a damaged sector).
        append(&path, b"+abc 00000000\n");
        // And a torn last line without its newline.
        append(&path, b"+00000001");
        let j = open(&path);
        assert_eq!(j.pending(), vec![whole]);
        assert_eq!(j.skipped_lines(), 3);
        drop(j);
        // The rewrite on open dropped them: they are not counted twice.
        assert_eq!(open(&path).skipped_lines(), 0);
    }

    #[test]
    fn a_journal_of_another_queue_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        drop(open(&path));
        let err = Journal::open(&path, ACCOUNT, "q2").err().expect("refused");
        assert!(matches!(err, JournalError::OtherQueue { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains("queue q1"), "{text}");
        assert!(text.contains("queue q2"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        let err = Journal::open(&path, "other", QUEUE).err().expect("refused");
        assert!(err.to_string().contains("account other"), "{err}");
        // Refusing did not damage it: its own queue still opens it.
        drop(open(&path));
    }

    #[test]
    fn an_old_journal_is_read_once_by_whole_lines_and_rewritten_in_the_new_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        std::fs::write(&path, b"+a\n+b\n-a\n+tor").unwrap();
        let j = open(&path);
        assert_eq!(j.pending(), vec!["b".to_string()]);
        assert_eq!(j.skipped_lines(), 1);
        drop(j);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with(MAGIC), "{text}");
        assert_eq!(open(&path).pending(), vec!["b".to_string()]);
    }

    #[test]
    fn a_file_that_is_not_a_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        std::fs::write(&path, b"dear diary\n").unwrap();
        let err = Journal::open(&path, ACCOUNT, QUEUE).err().expect("refused");
        assert!(matches!(err, JournalError::NotAJournal { .. }), "{err:?}");
        assert_eq!(std::fs::read(&path).unwrap(), b"dear diary\n", "left as is");
    }

    #[test]
    fn a_second_open_is_refused_with_the_lock_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        let first = open(&path);
        let err = Journal::open(&path, ACCOUNT, QUEUE).err().expect("locked");
        assert!(matches!(err, JournalError::Locked(_)), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        drop(open(&path));
    }

    #[tokio::test]
    async fn compaction_keeps_the_pending_leases_under_a_steady_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks.journal");
        let j = open(&path);
        // A lease always pending, as under a steady stream of confirmations.
        j.record_confirmed(&["keep".into()]).await.unwrap();
        let lease = "l".repeat(200);
        // Each round writes 100 lines of about 210 bytes: enough rounds to pass the
        // threshold twice, with few syncs.
        let rounds = 2 * COMPACT_AFTER_BYTES as usize / (100 * 210) + 10;
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
        let j = open(&path);
        assert_eq!(j.pending(), vec!["keep".to_string()]);
        assert_eq!(j.skipped_lines(), 0);
    }
}
