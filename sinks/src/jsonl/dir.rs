//! Durable directory entries: a new file or directory exists after a crash only once the
//! directory that lists it has been synced. Used by the JSONL sink and the ack journal.

use std::io;
use std::path::Path;

/// Syncs a directory, so that the entries created, renamed or removed in it survive a
/// crash. On platforms where a directory cannot be opened as a file (Windows), this does
/// nothing: there the file system keeps directory entries by itself.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(test)]
    hook::record(dir);
    #[cfg(unix)]
    {
        std::fs::File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// Syncs the directory that holds `path` (its parent, or `.` for a bare file name).
pub fn sync_parent(path: &Path) -> io::Result<()> {
    match path.parent().filter(|p| !p.as_os_str().is_empty()) {
        Some(parent) => sync_dir(parent),
        None => sync_dir(Path::new(".")),
    }
}

/// Like `std::fs::create_dir_all`, but every level it creates is made durable: each new
/// directory's parent is synced after it was created, top-down. Levels that already
/// existed are left alone.
pub fn create_dir_all_synced(dir: &Path) -> io::Result<()> {
    if dir.as_os_str().is_empty() || dir.is_dir() {
        return Ok(());
    }
    // The missing levels, deepest first.
    let missing: Vec<&Path> = dir
        .ancestors()
        .filter(|p| !p.as_os_str().is_empty())
        .take_while(|p| !p.is_dir())
        .collect();
    for level in missing.into_iter().rev() {
        match std::fs::create_dir(level) {
            Ok(()) => sync_parent(level)?,
            // Another process created it meanwhile; who created it synced it (or will).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && level.is_dir() => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A record of the directories synced by this thread, for unit tests of the code paths
/// that must sync.
#[cfg(test)]
pub(crate) mod hook {
    use std::cell::RefCell;
    use std::path::{Path, PathBuf};

    thread_local! {
        static SYNCED: RefCell<Vec<PathBuf>> = const { RefCell::new(Vec::new()) };
    }

    pub(super) fn record(dir: &Path) {
        SYNCED.with(|s| s.borrow_mut().push(dir.to_path_buf()));
    }

    /// Takes the directories synced by this thread since the last call.
    pub(crate) fn take() -> Vec<PathBuf> {
        SYNCED.with(|s| std::mem::take(&mut *s.borrow_mut()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_new_level_has_its_parent_synced_and_existing_levels_are_left_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        hook::take();
        create_dir_all_synced(&root.join("a/b/c")).unwrap();
        assert!(root.join("a/b/c").is_dir());
        assert_eq!(
            hook::take(),
            vec![root.to_path_buf(), root.join("a"), root.join("a/b")]
        );
        create_dir_all_synced(&root.join("a/b/c")).unwrap();
        create_dir_all_synced(&root.join("a/d")).unwrap();
        assert_eq!(hook::take(), vec![root.join("a")]);
    }
}
