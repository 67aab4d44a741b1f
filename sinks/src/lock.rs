//! Exclusive locks on files that one process at a time may write: the JSONL archive and
//! the ack journal.
//!
//! The lock is taken on a small sidecar file, `<path>.lock`, never on the data file
//! itself: the data file may be replaced (the journal is rewritten and renamed over) while
//! the lock must stay on one inode. The holder writes its process id into the sidecar, so
//! a second process that finds the lock taken can say who holds it.
//!
//! Locking uses the standard library's `File::try_lock` (stable since Rust 1.89): on Unix
//! it is `flock(LOCK_EX | LOCK_NB)`, on Windows `LockFileEx`. It needs no extra crate, and
//! the kernel drops the lock when the process dies, however it dies (SIGKILL included),
//! so a crash never leaves a stale lock behind. The sidecar file is left in place on
//! release: deleting it would let a third process lock a fresh inode while a second one
//! still holds the old one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Why a path could not be locked.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process (or another open of the same path in this one) holds the lock.
    #[error(
        "{} is in use by another process ({}); lock file {}. Two bridges must not write one file: give each its own path",
        path.display(),
        holder.map_or_else(|| "pid unknown".to_string(), |pid| format!("pid {pid}")),
        lock_path.display()
    )]
    Held {
        /// The data file that is locked.
        path: PathBuf,
        /// The sidecar lock file.
        lock_path: PathBuf,
        /// The holder's process id, when it had written it.
        holder: Option<u32>,
    },
    /// The lock file could not be opened, locked or written.
    #[error("cannot lock {} (lock file {}): {source}", path.display(), lock_path.display())]
    Io {
        /// The data file to lock.
        path: PathBuf,
        /// The sidecar lock file.
        lock_path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
}

/// An exclusive lock on a path, held until this value is dropped (or the process ends).
#[derive(Debug)]
pub struct PathLock {
    /// The open, locked sidecar file. Closing it releases the lock.
    _file: File,
    lock_path: PathBuf,
}

impl PathLock {
    /// Locks `path` through its sidecar `<path>.lock` (created if missing), without
    /// waiting: if another holder has it, fails at once with [`LockError::Held`].
    pub fn acquire(path: &Path) -> Result<PathLock, LockError> {
        let lock_path = lock_path_of(path);
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            lock_path: lock_path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LockError::Held {
                    path: path.to_path_buf(),
                    holder: read_pid(&mut file),
                    lock_path,
                })
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io(e)),
        }
        // Ours now: replace whatever pid an earlier holder left.
        file.set_len(0)
            .and_then(|()| file.seek(SeekFrom::Start(0)).map(drop))
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .and_then(|()| file.flush())
            .map_err(io)?;
        Ok(PathLock {
            _file: file,
            lock_path,
        })
    }

    /// The sidecar file holding the lock.
    pub fn lock_path(&self) -> &Path {
        &self.lock_path
    }
}

/// The sidecar lock file of `path`: `<path>.lock`.
pub fn lock_path_of(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

/// The pid a holder wrote, if it did (it may not have yet: it writes just after locking).
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_with_the_path_and_pid_until_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("archive.jsonl");
        let first = PathLock::acquire(&path).unwrap();
        assert_eq!(first.lock_path(), dir.path().join("archive.jsonl.lock"));
        // flock locks belong to the open file, so a second open in this process conflicts
        // just as another process would.
        let err = PathLock::acquire(&path).unwrap_err();
        match &err {
            LockError::Held { holder, .. } => assert_eq!(*holder, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(
            text.contains(&format!("pid {}", std::process::id())),
            "{text}"
        );
        drop(first);
        let again = PathLock::acquire(&path).unwrap();
        drop(again);
    }

    #[test]
    fn a_holder_that_has_not_written_its_pid_yet_is_reported_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        let sidecar = File::create(lock_path_of(&path)).unwrap();
        sidecar.try_lock().unwrap();
        let err = PathLock::acquire(&path).unwrap_err();
        assert!(err.to_string().contains("pid unknown"), "{err}");
    }
}
