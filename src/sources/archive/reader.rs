//! Files to lines: expands `archive.paths`, opens each file by its extension (plain,
//! `.gz`, `.zst`, with or without a trailing `.partial`), and yields its lines in order, each parsed as a record or reported as
//! malformed, with the unreadable tail of a torn file reported once.
//!
//! This is blocking code: the source runs it on a thread of its own, [`super::scan`] on
//! the caller's.

use cfq_sinks::compress::Compression;
use std::collections::BTreeSet;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use cfq_sinks::Record;

use super::checkpoint::{InputFile, Position};
use super::{ArchiveError, UnreadableTail};

/// A line longer than this is malformed (and skipped without being held in memory). A
/// Cloudflare message is at most 128 KB, about 171 KB in base64.
pub(crate) const MAX_LINE_BYTES: usize = 16 << 20;

/// How much of each file's start goes into its fingerprint.
const FINGERPRINT_BYTES: u64 = 64 << 10;

/// Read buffer size, for the file and for the decoder's output.
const BUFFER_BYTES: usize = 128 << 10;

/// Expands `patterns` (files or glob patterns) into the files to read, each once, in
/// name order. A pattern that matches no file, or a file that does not exist, is an
/// error naming it.
pub(crate) fn expand(patterns: &[String]) -> Result<Vec<PathBuf>, ArchiveError> {
    let mut files = BTreeSet::new();
    for pattern in patterns {
        if !pattern.contains(['*', '?', '[']) {
            let path = PathBuf::from(pattern);
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => {
                    files.insert(path);
                }
                Ok(_) => return Err(ArchiveError::NotAFile { path }),
                Err(source) => return Err(ArchiveError::Input { path, source }),
            }
            continue;
        }
        let matches = glob::glob(pattern).map_err(|source| ArchiveError::Pattern {
            pattern: pattern.clone(),
            reason: source.to_string(),
        })?;
        let mut matched = false;
        for entry in matches {
            let path = entry.map_err(|e| ArchiveError::Input {
                path: e.path().to_path_buf(),
                source: io::Error::new(e.error().kind(), e.error().to_string()),
            })?;
            if path.is_file() {
                matched = true;
                files.insert(path);
            }
        }
        if !matched {
            return Err(ArchiveError::NoMatch {
                pattern: pattern.clone(),
            });
        }
    }
    Ok(files.into_iter().collect())
}

/// What the checkpoint records of `path`: its size and a checksum of its first bytes.
pub(crate) fn fingerprint(path: &Path) -> Result<InputFile, ArchiveError> {
    let io = |source| ArchiveError::Input {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let size = file.metadata().map_err(io)?.len();
    let mut head = Vec::with_capacity(FINGERPRINT_BYTES.min(size) as usize);
    file.take(FINGERPRINT_BYTES)
        .read_to_end(&mut head)
        .map_err(io)?;
    Ok(InputFile {
        path: path.to_string_lossy().into_owned(),
        size,
        head_crc32: crc32fast::hash(&head),
    })
}

/// Where a line is: its input file (index in reading order) and its line number (from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    /// Index of the input file.
    pub(crate) file: usize,
    /// Line number in the (decompressed) file, from 1.
    pub(crate) line: u64,
}

/// What a line held.
#[derive(Debug)]
pub(crate) enum LineKind {
    /// A record.
    Record(Record),
    /// Not a record: why.
    Malformed(String),
    /// Only whitespace.
    Blank,
}

/// What the reader found next.
#[derive(Debug)]
pub(crate) enum Event {
    /// An input file is opened (and its settled lines skipped): its next line gets
    /// sequence number `first_seq`; `first_line` lines were settled before.
    FileStarted {
        file: usize,
        first_seq: u64,
        first_line: u64,
    },
    /// One line, with its sequence number.
    Line {
        seq: u64,
        origin: Origin,
        kind: LineKind,
    },
    /// A file ends in bytes that cannot be read: the rest of it is skipped.
    Tail(UnreadableTail),
    /// Every input is read: `total` lines in this run.
    Ended { files: usize, total: u64 },
}

/// What the underlying file did, seen from outside the decoder that owns it: bytes read,
/// and whether reading the file itself failed (as opposed to decoding its bytes).
#[derive(Debug, Default)]
struct RawState {
    read: AtomicU64,
    failed: AtomicBool,
}

/// A file that records its reads and failures in a shared [`RawState`].
struct RawFile {
    file: File,
    state: Arc<RawState>,
}

impl Read for RawFile {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.file.read(buf) {
            Ok(n) => {
                self.state.read.fetch_add(n as u64, Ordering::Relaxed);
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                self.state.failed.store(true, Ordering::Relaxed);
                Err(e)
            }
        }
    }
}

/// One open input.
struct OpenFile {
    file: usize,
    path: PathBuf,
    lines: Box<dyn BufRead + Send>,
    state: Arc<RawState>,
    compressed: bool,
    /// Lines consumed so far (settled earlier ones included).
    line: u64,
    /// Bytes consumed so far, in the decompressed data.
    byte: u64,
}

/// A Parquet file's rows as JSON lines, the form every other archive file has: the file is
/// read and decoded whole (Parquet keeps its index at the end), each row rendered as the
/// JSONL sink would write it. A file that does not decode reads as one unreadable line.
#[cfg(feature = "parquet")]
fn parquet_lines(path: &Path, mut raw: impl Read) -> Result<Box<dyn BufRead + Send>, ArchiveError> {
    let mut bytes = Vec::new();
    raw.read_to_end(&mut bytes)
        .map_err(|source| ArchiveError::Input {
            path: path.to_path_buf(),
            source,
        })?;
    let mut lines = Vec::with_capacity(bytes.len() * 2);
    match cfq_sinks::parquet::decode(bytes.into()) {
        Ok(records) => {
            for record in &records {
                record.write_json_line(&mut lines);
            }
        }
        // Not a record, no newline: the reader reports it as the file's unreadable tail.
        Err(error) => {
            tracing::warn!(file = %path.display(), %error, "not a readable Parquet file");
            lines.extend_from_slice(format!("not a readable Parquet file: {error}").as_bytes());
        }
    }
    Ok(Box::new(std::io::Cursor::new(lines)))
}

/// Without the `parquet` feature a Parquet file cannot be read: say how to get it.
#[cfg(not(feature = "parquet"))]
fn parquet_lines(path: &Path, _raw: impl Read) -> Result<Box<dyn BufRead + Send>, ArchiveError> {
    Err(ArchiveError::Input {
        path: path.to_path_buf(),
        source: std::io::Error::other(
            "parquet support not compiled in; rebuild with `--features parquet`",
        ),
    })
}

/// Opens `path`, decompressing by its extension.
fn open(file: usize, path: &Path) -> Result<OpenFile, ArchiveError> {
    let io = |source| ArchiveError::Input {
        path: path.to_path_buf(),
        source,
    };
    let state = Arc::new(RawState::default());
    let raw = BufReader::with_capacity(
        BUFFER_BYTES,
        RawFile {
            file: File::open(path).map_err(io)?,
            state: Arc::clone(&state),
        },
    );
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name.ends_with(".parquet") {
        return Ok(OpenFile {
            file,
            path: path.to_path_buf(),
            lines: parquet_lines(path, raw)?,
            state,
            compressed: true,
            line: 0,
            byte: 0,
        });
    }
    // The same names the sinks write: `.gz`, `.zst`, and either with `.partial` after it
    // (a segment still open, or left by a crash).
    let (lines, compressed): (Box<dyn BufRead + Send>, bool) =
        match Compression::from_file_name(name) {
            // Several gzip members one after the other are one stream (`cat a.gz b.gz`).
            Compression::Gzip => (
                Box::new(BufReader::with_capacity(
                    BUFFER_BYTES,
                    flate2::bufread::MultiGzDecoder::new(raw),
                )),
                true,
            ),
            // The zstd decoder reads every frame of a file, not only the first.
            Compression::Zstd => (
                Box::new(BufReader::with_capacity(
                    BUFFER_BYTES,
                    zstd::stream::read::Decoder::with_buffer(raw).map_err(io)?,
                )),
                true,
            ),
            Compression::None => (Box::new(raw), false),
        };
    Ok(OpenFile {
        file,
        path: path.to_path_buf(),
        lines,
        state,
        compressed,
        line: 0,
        byte: 0,
    })
}

/// How a call to [`read_line`] ended.
#[derive(Debug, PartialEq, Eq)]
enum LineEnd {
    /// A line is in the buffer; `terminated` when it ended with a newline.
    Line { terminated: bool },
    /// The line was longer than the limit; it was consumed but not kept.
    TooLong { terminated: bool },
    /// No byte left.
    Eof,
}

/// Reads one line (newline included) into `buf`, keeping at most `max` bytes; `byte`
/// advances by what was consumed.
fn read_line(
    reader: &mut dyn BufRead,
    buf: &mut Vec<u8>,
    max: usize,
    byte: &mut u64,
) -> io::Result<LineEnd> {
    buf.clear();
    let (mut any, mut too_long) = (false, false);
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(match (any, too_long) {
                (false, _) => LineEnd::Eof,
                (true, false) => LineEnd::Line { terminated: false },
                (true, true) => LineEnd::TooLong { terminated: false },
            });
        }
        any = true;
        let (n, found) = match memchr::memchr(b'\n', available) {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if !too_long {
            if buf.len() + n > max {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&available[..n]);
            }
        }
        reader.consume(n);
        *byte += n as u64;
        if found {
            return Ok(if too_long {
                LineEnd::TooLong { terminated: true }
            } else {
                LineEnd::Line { terminated: true }
            });
        }
    }
}

/// Reads the inputs' lines in order, from a [`Position`].
pub(crate) struct Reader {
    paths: Arc<[PathBuf]>,
    start: Position,
    next_file: usize,
    current: Option<OpenFile>,
    /// The next line's sequence number.
    seq: u64,
    buf: Vec<u8>,
    ended: bool,
}

impl Reader {
    /// Reads `paths` from `start` (its file's settled lines are skipped, and so are the
    /// files before it).
    pub(crate) fn new(paths: Arc<[PathBuf]>, start: Position) -> Reader {
        Reader {
            next_file: start.file,
            paths,
            start,
            current: None,
            seq: 0,
            buf: Vec::new(),
            ended: false,
        }
    }

    /// The next event; `None` after [`Event::Ended`]. An error is fatal: a file that
    /// cannot be read (as opposed to decoded), or fewer lines than the checkpoint settled.
    pub(crate) fn next_event(&mut self) -> Result<Option<Event>, ArchiveError> {
        let Some(open) = self.current.as_mut() else {
            if self.next_file >= self.paths.len() {
                if self.ended {
                    return Ok(None);
                }
                self.ended = true;
                return Ok(Some(Event::Ended {
                    files: self.paths.len(),
                    total: self.seq,
                }));
            }
            let file = self.next_file;
            let mut open = open(file, &self.paths[file])?;
            let skip = if file == self.start.file {
                self.start.line
            } else {
                0
            };
            skip_lines(&mut open, skip, &mut self.buf)?;
            self.current = Some(open);
            return Ok(Some(Event::FileStarted {
                file,
                first_seq: self.seq,
                first_line: skip,
            }));
        };
        let line_start = open.byte;
        let read = read_line(
            &mut *open.lines,
            &mut self.buf,
            MAX_LINE_BYTES,
            &mut open.byte,
        );
        let kind = match read {
            Ok(LineEnd::Eof) => {
                self.close();
                return self.next_event();
            }
            Ok(LineEnd::Line { terminated }) => {
                if self.buf.iter().all(u8::is_ascii_whitespace) {
                    LineKind::Blank
                } else {
                    match Record::from_json_line(&self.buf) {
                        // A last line without its newline that is a whole record is read:
                        // its content is all there.
                        Ok(record) => LineKind::Record(record),
                        Err(e) if terminated => LineKind::Malformed(e.to_string()),
                        Err(e) => {
                            let reason = format!(
                                "the last line has no newline and is not a whole record ({e})"
                            );
                            let tail = tail_of(open, line_start, reason);
                            self.close();
                            return Ok(Some(Event::Tail(tail)));
                        }
                    }
                }
            }
            Ok(LineEnd::TooLong { terminated: true }) => {
                LineKind::Malformed(format!("line longer than {MAX_LINE_BYTES} bytes"))
            }
            Ok(LineEnd::TooLong { terminated: false }) => {
                let reason = format!(
                    "the last line has no newline and is longer than {MAX_LINE_BYTES} bytes"
                );
                let tail = tail_of(open, line_start, reason);
                self.close();
                return Ok(Some(Event::Tail(tail)));
            }
            Err(e) if open.state.failed.load(Ordering::Relaxed) || !open.compressed => {
                return Err(ArchiveError::Read {
                    path: open.path.clone(),
                    source: e,
                })
            }
            Err(e) => {
                let reason = format!("the compressed data stops decoding: {e}");
                let tail = tail_of(open, line_start, reason);
                self.close();
                return Ok(Some(Event::Tail(tail)));
            }
        };
        open.line += 1;
        let seq = self.seq;
        self.seq += 1;
        Ok(Some(Event::Line {
            seq,
            origin: Origin {
                file: open.file,
                line: open.line,
            },
            kind,
        }))
    }

    fn close(&mut self) {
        self.current = None;
        self.next_file += 1;
    }
}

/// The unreadable tail of `open`, from the line that starts at byte `line_start`.
fn tail_of(open: &OpenFile, line_start: u64, reason: String) -> UnreadableTail {
    UnreadableTail {
        path: open.path.clone(),
        line: open.line + 1,
        byte: line_start,
        compressed_bytes_read: open
            .compressed
            .then(|| open.state.read.load(Ordering::Relaxed)),
        reason,
    }
}

/// Skips the `skip` lines of `open` an earlier run settled. Fewer readable lines than
/// that means the file is not the one the checkpoint was written for.
fn skip_lines(open: &mut OpenFile, skip: u64, buf: &mut Vec<u8>) -> Result<(), ArchiveError> {
    while open.line < skip {
        let counted = match read_line(&mut *open.lines, buf, MAX_LINE_BYTES, &mut open.byte) {
            Ok(LineEnd::Line { terminated: true } | LineEnd::TooLong { terminated: true }) => true,
            // An unterminated last line was read (and settled) only if it was blank or a
            // record; otherwise it was an unreadable tail.
            Ok(LineEnd::Line { terminated: false }) => {
                buf.iter().all(u8::is_ascii_whitespace) || Record::from_json_line(buf).is_ok()
            }
            Ok(_) => false,
            Err(e) if open.state.failed.load(Ordering::Relaxed) || !open.compressed => {
                return Err(ArchiveError::Read {
                    path: open.path.clone(),
                    source: e,
                })
            }
            Err(_) => false,
        };
        if !counted {
            return Err(ArchiveError::ResumeBeyondEnd {
                path: open.path.clone(),
                lines: open.line,
                settled: skip,
            });
        }
        open.line += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn lines_are_cut_at_newlines_and_long_ones_are_not_kept() {
        let data = b"ab\n\ncdefgh\nxyz".to_vec();
        let mut reader = Cursor::new(data);
        let (mut buf, mut byte) = (Vec::new(), 0);
        let mut next = || {
            let end = read_line(&mut reader, &mut buf, 5, &mut byte).unwrap();
            (end, String::from_utf8(buf.clone()).unwrap(), byte)
        };
        assert_eq!(
            next(),
            (LineEnd::Line { terminated: true }, "ab\n".into(), 3)
        );
        assert_eq!(next(), (LineEnd::Line { terminated: true }, "\n".into(), 4));
        assert_eq!(
            next(),
            (LineEnd::TooLong { terminated: true }, "".into(), 11)
        );
        assert_eq!(
            next(),
            (LineEnd::Line { terminated: false }, "xyz".into(), 14)
        );
        assert_eq!(next(), (LineEnd::Eof, "".into(), 14));
    }

    #[test]
    fn a_missing_file_and_an_empty_glob_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl").display().to_string();
        let e = expand(std::slice::from_ref(&missing))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&missing), "{e}");
        let pattern = dir.path().join("*.gz").display().to_string();
        let e = expand(std::slice::from_ref(&pattern))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&pattern) && e.contains("matches no file"), "{e}");
    }

    #[test]
    fn globs_expand_in_name_order_and_each_file_once() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["b.jsonl", "a.jsonl", "c.txt"] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        std::fs::create_dir(dir.path().join("d.jsonl")).unwrap();
        let files = expand(&[
            dir.path().join("*.jsonl").display().to_string(),
            dir.path().join("a.jsonl").display().to_string(),
        ])
        .unwrap();
        assert_eq!(
            files,
            [dir.path().join("a.jsonl"), dir.path().join("b.jsonl")]
        );
    }
}
