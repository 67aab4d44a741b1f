//! The directory mode of the JSONL sink: rotating, optionally compressed segments.
//!
//! Layout: `<directory>/<queue_id>-<UTC start, YYYYMMDDTHHMMSSZ>-<sequence>.jsonl[.gz|.zst]`,
//! for example `q1-20261130T071500Z-000042.jsonl.zst`. The sequence number grows across
//! the whole directory (it continues after the highest one found at start), so names sort
//! by queue, then start time, then sequence. One segment is open at a time; it ends in
//! `.partial` and loses that suffix when it is closed: once it holds `rotate_bytes` of
//! uncompressed lines, once it is `rotate_secs` old (a timer closes it even when no record
//! arrives), and at a clean shutdown.
//!
//! Several queues, one sink: a segment is named after the queue of the first record it
//! holds, and records of other queues that reach the same sink go into the open segment
//! too (each line carries its `queue_id`). A `run` route reads one queue, so its segments
//! hold that queue only; mixing happens only when one sink is fed several queues (an
//! archive replayed into `jsonl`).
//!
//! Durability, as in the single-file mode and through the same writer thread and group
//! commit: each group of batches is written as one piece (the lines as they are, or one
//! gzip member / zstd frame, [`Compression::encode`]), then `sync_data`-ed, then confirmed.
//! A new segment's directory entry is synced before anything in it is confirmed, and the
//! directory is synced again after each rename. A failed write is cut back to the end of
//! the last confirmed piece; when that cut fails too the sink turns failed, and the
//! segment is left `.partial` for the next start to repair.
//!
//! Repair at start: a leftover `.partial` segment (a crash) is cut back to its readable
//! prefix (the last complete line; for compressed segments, the end of the last gzip
//! member or zstd frame that decodes whole), synced, and closed. Only unconfirmed bytes
//! can be cut: every confirmed piece was complete and synced.
//!
//! Exclusive use: the directory is locked through `<directory>/.lock` ([`crate::lock`]).

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use super::{dir, repair_torn_tail, Appender, ArchiveFile, JsonlError, Target, WriteRequest};
use crate::compress::Compression;
use crate::lock::PathLock;
use crate::SinkError;

use super::config::SegmentSettings;

/// The suffix of the open segment.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// After a segment could not be closed, how long before trying again.
const CLOSE_RETRY: Duration = Duration::from_secs(1);

/// Opens a new segment file (a seam: tests put a file that fails on demand behind it).
type Opener = Box<dyn FnMut(&Path) -> io::Result<Box<dyn ArchiveFile>> + Send>;

/// The segment being written.
struct OpenSegment {
    appender: Appender<Box<dyn ArchiveFile>>,
    /// Its name once closed (`appender.path` is the `.partial` one).
    closed: PathBuf,
    /// When it was created, for age rotation.
    opened: Instant,
    /// Uncompressed bytes of lines confirmed in it, for size rotation.
    raw_bytes: u64,
}

/// The writer thread's target in directory mode: the open segment and how to rotate.
pub(super) struct Segments {
    directory: PathBuf,
    rotate_bytes: u64,
    rotate_after: Duration,
    compression: Compression,
    open: Option<OpenSegment>,
    /// The sequence number of the next segment.
    next_seq: u64,
    /// Set when closing the open segment failed: when to try again.
    retry_close_at: Option<Instant>,
    opener: Opener,
    /// Held until the writer thread ends, after the final close.
    _lock: PathLock,
}

impl Segments {
    /// Creates the directory (durably) if missing, locks it, repairs and closes leftover
    /// `.partial` segments, and finds the next sequence number. Every failure is
    /// permanent and names the path.
    pub(super) fn open(settings: &SegmentSettings<'_>) -> Result<Segments, SinkError> {
        Self::open_with(settings, Box::new(create_segment_file))
    }

    fn open_with(settings: &SegmentSettings<'_>, opener: Opener) -> Result<Segments, SinkError> {
        let directory = settings.directory.to_path_buf();
        dir::create_dir_all_synced(&directory).map_err(|source| JsonlError::CreateDir {
            dir: directory.clone(),
            source,
        })?;
        // `dir/` + `.lock`: the lock file sits inside the directory it guards.
        let lock = PathLock::acquire(&directory.join("")).map_err(JsonlError::from)?;
        let listing = |source| JsonlError::RepairSegments {
            path: directory.clone(),
            source,
        };
        let mut max_seq = None;
        let mut partials = Vec::new();
        for entry in std::fs::read_dir(&directory).map_err(listing)? {
            let entry = entry.map_err(listing)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(seq) = sequence_of(name) {
                max_seq = max_seq.max(Some(seq));
                if name.ends_with(PARTIAL_SUFFIX) {
                    partials.push(entry.path());
                }
            }
        }
        partials.sort();
        for partial in partials {
            repair_partial(&partial).map_err(|source| JsonlError::RepairSegments {
                path: partial.clone(),
                source,
            })?;
        }
        Ok(Segments {
            directory,
            rotate_bytes: settings.rotate_bytes,
            rotate_after: settings.rotate_after,
            compression: settings.compression,
            open: None,
            next_seq: max_seq.map_or(1, |s| s + 1),
            retry_close_at: None,
            opener,
            _lock: lock,
        })
    }

    /// Creates the next segment for `queue` and syncs the directory that lists it.
    fn create(&mut self, queue: &str) -> Result<(), JsonlError> {
        let stamp = utc_stamp(SystemTime::now());
        let (partial, closed, file) = loop {
            let name = segment_name(queue, &stamp, self.next_seq, self.compression);
            self.next_seq += 1;
            let closed = self.directory.join(&name);
            let partial = self.directory.join(format!("{name}{PARTIAL_SUFFIX}"));
            // A closed segment of that name cannot exist (its number is new), but a file
            // put there by hand could: take the next number rather than append to it.
            if closed.exists() {
                continue;
            }
            match (self.opener)(&partial) {
                Ok(file) => break (partial, closed, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(source) => {
                    return Err(JsonlError::Segment {
                        action: "creating",
                        path: partial,
                        source,
                    })
                }
            }
        };
        if let Err(source) = dir::sync_dir(&self.directory) {
            // Not durable, so never written to: take it away again.
            let _ = std::fs::remove_file(&partial);
            return Err(JsonlError::Segment {
                action: "creating",
                path: partial,
                source,
            });
        }
        tracing::debug!(segment = %partial.display(), "opened a JSONL segment");
        self.open = Some(OpenSegment {
            appender: Appender::new(file, partial)?,
            closed,
            opened: Instant::now(),
            raw_bytes: 0,
        });
        Ok(())
    }

    /// Closes the open segment: final sync, rename without `.partial`, directory sync. An
    /// empty segment (its only write failed) is removed instead. When it fails, the
    /// segment stays open and the error says why.
    fn close(&mut self) -> Result<(), JsonlError> {
        let Some(segment) = self.open.as_mut() else {
            return Ok(());
        };
        let partial = segment.appender.path.clone();
        let closing = |source| JsonlError::Segment {
            action: "closing",
            path: partial.clone(),
            source,
        };
        segment.appender.sync_all().map_err(closing)?;
        let empty = segment.appender.len == 0;
        if empty {
            std::fs::remove_file(&partial).map_err(closing)?;
        } else {
            std::fs::rename(&partial, &segment.closed).map_err(closing)?;
        }
        let closed = segment.closed.clone();
        let raw_bytes = segment.raw_bytes;
        self.open = None;
        self.retry_close_at = None;
        // The data was durable already; a lost rename only leaves a `.partial` that the
        // next start repairs and closes.
        if let Err(e) = dir::sync_dir(&self.directory) {
            tracing::warn!(directory = %self.directory.display(), error = %e, "syncing the segments' directory after closing a segment failed");
        }
        if !empty {
            tracing::info!(segment = %closed.display(), bytes = raw_bytes, "closed a JSONL segment");
        }
        Ok(())
    }

    /// Closes the open segment if it is due, logging a failure and planning a retry.
    fn close_if_due(&mut self, now: Instant) -> Result<(), JsonlError> {
        let due = self.open.as_ref().is_some_and(|s| {
            s.raw_bytes >= self.rotate_bytes || now.duration_since(s.opened) >= self.rotate_after
        });
        if !due {
            return Ok(());
        }
        self.close().inspect_err(|e| {
            tracing::warn!(error = %e, "could not close a JSONL segment; trying again");
            self.retry_close_at = Some(now + CLOSE_RETRY);
        })
    }
}

impl Target for Segments {
    fn commit(&mut self, group: &[WriteRequest]) -> Result<(), JsonlError> {
        // A segment that is full or old is closed before the group, so the group goes into
        // a fresh one; if it cannot be closed, the group is not written (transient).
        self.close_if_due(Instant::now())?;
        if self.open.is_none() {
            let queue = group.first().map_or("queue", |r| &r.queue);
            self.create(queue)?;
        }
        let raw: u64 = group.iter().map(|r| r.lines.len() as u64).sum();
        let compression = self.compression;
        let Some(segment) = self.open.as_mut() else {
            // `create` has just set it.
            return Ok(());
        };
        if compression == Compression::None {
            let parts: Vec<&[u8]> = group.iter().map(|r| &r.lines[..]).collect();
            segment.appender.commit(&parts)?;
        } else {
            let mut lines = Vec::with_capacity(raw as usize);
            for request in group {
                lines.extend_from_slice(&request.lines);
            }
            let piece = compression
                .encode(&lines)
                .map_err(|source| JsonlError::Segment {
                    action: "compressing for",
                    path: segment.appender.path.clone(),
                    source,
                })?;
            segment.appender.commit(&[&piece])?;
        }
        segment.raw_bytes += raw;
        // Full: close it now rather than at the next group, so that it does not wait.
        // The group is confirmed either way: it is synced in the `.partial`.
        let _ = self.close_if_due(Instant::now());
        Ok(())
    }

    fn next_tick(&self) -> Option<Instant> {
        let open = self.open.as_ref()?;
        let due = open.opened + self.rotate_after;
        Some(self.retry_close_at.map_or(due, |retry| retry.max(due)))
    }

    fn tick(&mut self) {
        let _ = self.close_if_due(Instant::now());
    }

    fn finish(&mut self, healthy: bool) {
        if healthy {
            if let Err(e) = self.close() {
                tracing::warn!(error = %e, "could not close the last JSONL segment; the next start repairs and closes it");
            }
        } else if let Some(segment) = self.open.as_mut() {
            // The end of the file is unknown: leave it `.partial` for the repair.
            let _ = segment.appender.sync_all();
        }
    }
}

/// The default opener: a new file, created exclusively.
fn create_segment_file(path: &Path) -> io::Result<Box<dyn ArchiveFile>> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)?;
    Ok(Box::new(file))
}

/// The name of a closed segment: `<queue>-<stamp>-<seq, 6 digits>.jsonl<.gz|.zst>`.
/// Characters of the queue id other than ASCII letters, digits, `-` and `_` become `_`,
/// so that no queue id can leave the directory or hide a file.
pub fn segment_name(queue: &str, stamp: &str, seq: u64, compression: Compression) -> String {
    let mut safe: String = queue
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if safe.is_empty() {
        safe.push_str("queue");
    }
    format!("{safe}-{stamp}-{seq:06}.jsonl{}", compression.extension())
}

/// The sequence number in a segment's name (closed or `.partial`), or `None` for a file
/// that is not a segment.
pub fn sequence_of(name: &str) -> Option<u64> {
    let name = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name);
    let name = name
        .strip_suffix(".gz")
        .or_else(|| name.strip_suffix(".zst"))
        .unwrap_or(name);
    let stem = name.strip_suffix(".jsonl")?;
    let mut parts = stem.rsplitn(3, '-');
    let seq = parts.next()?;
    let stamp = parts.next()?;
    let _queue = parts.next().filter(|q| !q.is_empty())?;
    let stamp_ok = stamp.len() == 16
        && stamp.as_bytes()[8] == b'T'
        && stamp.ends_with('Z')
        && stamp[..8].bytes().chain(stamp[9..15].bytes()).all(|b| b.is_ascii_digit());
    if !stamp_ok || seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    seq.parse().ok()
}

/// `time` in UTC as `YYYYMMDDTHHMMSSZ` (times before 1970 read as 1970).
pub fn utc_stamp(time: SystemTime) -> String {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// Repairs a leftover `.partial` segment: cuts its torn tail, syncs it, and closes it
/// (renamed without `.partial`; removed when nothing readable is left), then syncs the
/// directory. Returns the bytes cut.
pub fn repair_partial(partial: &Path) -> io::Result<u64> {
    let name = partial
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let compression = Compression::from_file_name(name);
    let mut file = OpenOptions::new().read(true).write(true).open(partial)?;
    let len = file.seek(SeekFrom::End(0))?;
    let cut = match compression {
        Compression::None => repair_torn_tail(&mut file)?,
        Compression::Gzip | Compression::Zstd => {
            let keep = readable_prefix(&mut file, compression)?;
            if keep < len {
                file.set_len(keep)?;
                file.sync_data()?;
            }
            len - keep
        }
    };
    let empty = file.seek(SeekFrom::End(0))? == 0;
    drop(file);
    let closed = partial.with_file_name(name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name));
    if empty {
        std::fs::remove_file(partial)?;
    } else {
        std::fs::rename(partial, &closed)?;
    }
    dir::sync_parent(partial)?;
    tracing::warn!(
        segment = %partial.display(),
        closed = %if empty { "(removed: nothing readable)".to_string() } else { closed.display().to_string() },
        bytes_cut = cut,
        "repaired a segment left open by an earlier crash (what was cut was never confirmed)"
    );
    Ok(cut)
}

/// The length of the longest prefix of `file` made of complete gzip members or zstd
/// frames that decode whole.
pub fn readable_prefix(file: &mut File, compression: Compression) -> io::Result<u64> {
    file.seek(SeekFrom::Start(0))?;
    let mut reader = BufReader::new(file);
    let mut keep = 0u64;
    loop {
        if reader.fill_buf()?.is_empty() {
            break;
        }
        let whole = match compression {
            Compression::Gzip => {
                let mut member = flate2::bufread::GzDecoder::new(&mut reader);
                io::copy(&mut member, &mut io::sink()).is_ok()
            }
            Compression::Zstd => match zstd::stream::read::Decoder::with_buffer(&mut reader) {
                Ok(decoder) => {
                    let mut frame = decoder.single_frame();
                    io::copy(&mut frame, &mut io::sink()).is_ok()
                }
                Err(_) => false,
            },
            Compression::None => false,
        };
        if !whole {
            break;
        }
        let end = reader.stream_position()?;
        if end <= keep {
            break;
        }
        keep = end;
    }
    Ok(keep)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jsonl::{JsonlConfig, JsonlSink};
    use crate::{ContentType, Outcome, Record, Sink};
    use bytes::Bytes;
    use std::io::Read;
    use std::sync::{Arc, Mutex};

    fn record(i: usize) -> Record {
        let mut metadata = serde_json::Map::new();
        metadata.insert("CF-Content-Type".into(), "text".into());
        Record {
            id: format!("id-{i}"),
            queue_id: Arc::from("q1"),
            timestamp_ms: 1,
            attempts: 1,
            content_type: ContentType::Text,
            metadata,
            body: Bytes::from(format!("body {i}")),
        }
    }

    fn lines(records: &[Record]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            r.write_json_line(&mut out);
        }
        out
    }

    #[test]
    fn stamps_are_utc() {
        assert_eq!(utc_stamp(SystemTime::UNIX_EPOCH), "19700101T000000Z");
        let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_022_900);
        assert_eq!(utc_stamp(at), "20261130T071500Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(utc_stamp(leap), "20000229T000000Z");
    }

    #[test]
    fn names_carry_queue_time_and_sequence_and_parse_back() {
        let name = segment_name("q1", "20261130T071500Z", 42, Compression::Zstd);
        assert_eq!(name, "q1-20261130T071500Z-000042.jsonl.zst");
        assert_eq!(sequence_of(&name), Some(42));
        assert_eq!(sequence_of(&format!("{name}.partial")), Some(42));
        let odd = segment_name("../a b-c", "20261130T071500Z", 7, Compression::None);
        assert_eq!(odd, "___a_b-c-20261130T071500Z-000007.jsonl");
        assert_eq!(sequence_of(&odd), Some(7));
        for other in [".lock", "notes.txt", "a.jsonl", "q-2026-1.jsonl", "-20261130T071500Z-1.jsonl"] {
            assert_eq!(sequence_of(other), None, "{other}");
        }
    }

    /// A torn last piece is cut at the end of the last complete one, for each format.
    #[test]
    fn a_torn_partial_keeps_exactly_its_complete_pieces() {
        let a: Vec<Record> = (0..5).map(record).collect();
        let b: Vec<Record> = (5..9).map(record).collect();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let dir = tempfile::tempdir().unwrap();
            let name = segment_name("q1", "20261130T071500Z", 3, compression);
            let partial = dir.path().join(format!("{name}.partial"));
            let first = compression.encode(&lines(&a)).unwrap();
            let second = compression.encode(&lines(&b)).unwrap();
            let mut data = first.clone();
            data.extend_from_slice(&second);
            // Several cut points inside the second piece, and none.
            for torn in [1, second.len() / 2, second.len() - 1, second.len()] {
                std::fs::write(&partial, &data[..first.len() + torn]).unwrap();
                repair_partial(&partial).unwrap();
                assert!(!partial.exists());
                let closed = dir.path().join(&name);
                let kept = std::fs::read(&closed).unwrap();
                let expected = if torn == second.len() { data.len() } else { first.len() };
                if compression == Compression::None && torn < second.len() {
                    // Plain: cut at the last complete line, inside the second piece.
                    assert!(kept.ends_with(b"\n") && kept.len() >= first.len());
                } else {
                    assert_eq!(kept.len(), expected, "{compression} torn at {torn}");
                }
                std::fs::remove_file(&closed).unwrap();
            }
            // Nothing readable at all: removed.
            std::fs::write(&partial, &second[..1]).unwrap();
            repair_partial(&partial).unwrap();
            assert!(!partial.exists(), "{compression}");
            assert!(!dir.path().join(&name).exists(), "{compression}");
        }
    }

    /// A segment file whose `sync_data` fails on demand.
    #[derive(Clone, Default)]
    struct SyncSwitch(Arc<Mutex<bool>>);

    struct FailingSync {
        file: File,
        fail: SyncSwitch,
    }

    impl ArchiveFile for FailingSync {
        fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
            self.file.append(bytes)
        }
        fn sync_data(&mut self) -> io::Result<()> {
            if *self.fail.0.lock().unwrap() {
                return Err(io::Error::other("fsync failed (injected)"));
            }
            ArchiveFile::sync_data(&mut self.file)
        }
        fn truncate_to(&mut self, len: u64) -> io::Result<()> {
            self.file.truncate_to(len)
        }
        fn end(&mut self) -> io::Result<u64> {
            ArchiveFile::end(&mut self.file)
        }
        fn sync_all(&mut self) -> io::Result<()> {
            ArchiveFile::sync_all(&mut self.file)
        }
    }

    /// THE INVARIANT: a group whose fsync failed is not confirmed, and is cut from the
    /// segment, so that the segment holds exactly the confirmed records.
    #[tokio::test]
    async fn nothing_is_confirmed_when_the_segment_sync_fails() {
        let dir = tempfile::tempdir().unwrap();
        let switch = SyncSwitch::default();
        let opener_switch = switch.clone();
        let config = JsonlConfig {
            compression: Some(Compression::Zstd),
            ..JsonlConfig::directory(dir.path())
        };
        let super::super::JsonlMode::Segments(settings) = config.mode().unwrap() else {
            unreachable!()
        };
        let segments = Segments::open_with(
            &settings,
            Box::new(move |path| {
                let file = create_segment_file_raw(path)?;
                Ok(Box::new(FailingSync {
                    file,
                    fail: opener_switch.clone(),
                }) as Box<dyn ArchiveFile>)
            }),
        )
        .unwrap();
        let sink = JsonlSink::start(dir.path().to_path_buf(), segments).unwrap();
        let first: Vec<Record> = (0..3).map(record).collect();
        assert!(sink.deliver(&first).await.iter().all(Outcome::is_confirmed));
        *switch.0.lock().unwrap() = true;
        let second: Vec<Record> = (3..6).map(record).collect();
        let outcomes = sink.deliver(&second).await;
        for outcome in &outcomes {
            let Outcome::Failed(error) = outcome else {
                panic!("confirmed although the fsync failed: {outcomes:?}")
            };
            assert!(error.is_transient(), "{error}");
            assert!(error.to_string().contains("fsync failed"), "{error}");
        }
        *switch.0.lock().unwrap() = false;
        let third: Vec<Record> = (6..8).map(record).collect();
        assert!(sink.deliver(&third).await.iter().all(Outcome::is_confirmed));
        sink.close().await.unwrap();

        let names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".zst"))
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        let mut text = String::new();
        zstd::stream::read::Decoder::new(File::open(dir.path().join(&names[0])).unwrap())
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["id-0", "id-1", "id-2", "id-6", "id-7"]);
    }

    fn create_segment_file_raw(path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
    }
}
