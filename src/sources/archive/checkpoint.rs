//! The checkpoint: how far the archive's lines are settled, and the file that keeps it.
//!
//! Every line read gets a sequence number, in reading order across all input files.
//! [`Progress`] tracks which of them are settled (a record the sink confirmed; a line that
//! is skipped because it is malformed, blank or filtered out) and moves a watermark past
//! the **contiguous** settled prefix only: a record confirmed after one that is still
//! unsettled waits until that one is settled too. The watermark, mapped back to a file and
//! a line ([`Position`]), is what the checkpoint file records.
//!
//! The file ([`CheckpointFile`]) also lists the input files it was written for, each with
//! its size and a checksum of its first bytes, so that a restart over other or changed
//! inputs is refused instead of skipping lines it never read. It is replaced atomically:
//! written to a temporary file in the same directory, synced, renamed over, and the
//! directory synced.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::ArchiveError;

/// The version of the checkpoint file format written by this build.
const FORMAT_VERSION: u32 = 1;

/// One input file as the checkpoint knows it: enough to tell whether it is still the
/// same file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputFile {
    /// The path, as expanded from `archive.paths`.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// CRC-32 of its first 64 KiB (all of it when smaller).
    pub head_crc32: u32,
}

/// How far the inputs are settled: every line before line `line + 1` of input `file` (in
/// name order, counted from 0), and every line of the inputs before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Position {
    /// Index of the input file in name order. Equal to the number of inputs when all of
    /// them are settled.
    pub file: usize,
    /// Lines of that file settled (so reading resumes at line `line + 1`, 1-based).
    pub line: u64,
}

impl Position {
    /// Whether the position is past every one of `inputs` files.
    pub fn is_complete(&self, inputs: usize) -> bool {
        self.file >= inputs
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "input {} line {}", self.file, self.line)
    }
}

/// Where one file's lines start in the sequence numbering.
#[derive(Debug, Clone, Copy)]
struct Span {
    /// The input file.
    file: usize,
    /// The sequence number of its first line read.
    first_seq: u64,
    /// How many of its lines were settled before that one (skipped on resume).
    first_line: u64,
}

/// A settled run of sequence numbers above the watermark.
#[derive(Debug, Clone, Copy)]
struct Run {
    /// One past its last sequence number.
    end: u64,
    /// How many of them are records the sink confirmed.
    confirmed: u64,
}

/// The contiguous settled prefix of the lines read, in sequence numbers.
///
/// Memory stays bounded by the number of unsettled records: settled numbers above the
/// watermark are kept as runs, and two runs are separated by at least one unsettled
/// record.
#[derive(Debug)]
pub(crate) struct Progress {
    /// Where reading started (from an earlier checkpoint).
    start: Position,
    /// Each file's first sequence number, in reading order.
    spans: Vec<Span>,
    /// Every sequence number below this is settled.
    watermark: u64,
    /// Settled runs above the watermark, by first sequence number. None starts at the
    /// watermark (it would have been absorbed).
    above: BTreeMap<u64, Run>,
    /// Confirmed records settled, in all.
    confirmed: u64,
    /// Confirmed records below the watermark.
    confirmed_below: u64,
    /// The number of lines read in all, once the last input is read.
    end: Option<u64>,
}

impl Progress {
    /// Nothing settled yet; reading starts at `start`.
    pub(crate) fn new(start: Position) -> Progress {
        Progress {
            start,
            spans: Vec::new(),
            watermark: 0,
            above: BTreeMap::new(),
            confirmed: 0,
            confirmed_below: 0,
            end: None,
        }
    }

    /// Input `file` is being read: its next line gets `first_seq`, and `first_line` of its
    /// lines were settled in an earlier run.
    pub(crate) fn file_started(&mut self, file: usize, first_seq: u64, first_line: u64) {
        self.spans.push(Span {
            file,
            first_seq,
            first_line,
        });
    }

    /// Every input is read: `files` inputs, `total` lines in this run.
    pub(crate) fn input_ended(&mut self, files: usize, total: u64) {
        self.file_started(files, total, 0);
        self.end = Some(total);
    }

    /// Sequence numbers `start..end` are settled; `confirmed` of them are records the sink
    /// confirmed (the others were skipped).
    pub(crate) fn settle_run(&mut self, mut start: u64, mut end: u64, mut confirmed: u64) {
        if end <= start {
            return;
        }
        // Each number is settled once; a stale one below the watermark changes nothing.
        debug_assert!(start >= self.watermark, "{start} settled twice");
        if start < self.watermark {
            return;
        }
        self.confirmed += confirmed;
        if let Some((&before, run)) = self.above.range(..start).next_back() {
            if run.end == start {
                confirmed += run.confirmed;
                start = before;
                self.above.remove(&before);
            }
        }
        if let Some(after) = self.above.remove(&end) {
            end = after.end;
            confirmed += after.confirmed;
        }
        if start == self.watermark {
            self.watermark = end;
            self.confirmed_below += confirmed;
        } else {
            self.above.insert(start, Run { end, confirmed });
        }
    }

    /// Settles each of `seqs` (in any order; sorted in place), `confirmed` saying whether
    /// they are confirmed records or skipped lines.
    pub(crate) fn settle(&mut self, seqs: &mut [u64], confirmed: bool) {
        seqs.sort_unstable();
        let mut i = 0;
        while i < seqs.len() {
            let mut j = i + 1;
            while j < seqs.len() && seqs[j] == seqs[j - 1] + 1 {
                j += 1;
            }
            let n = (j - i) as u64;
            self.settle_run(seqs[i], seqs[i] + n, if confirmed { n } else { 0 });
            i = j;
        }
    }

    /// Every sequence number below this is settled.
    #[cfg(test)]
    pub(crate) fn watermark(&self) -> u64 {
        self.watermark
    }

    /// Confirmed records below the watermark: those a checkpoint at [`Self::position`]
    /// records.
    pub(crate) fn confirmed_below(&self) -> u64 {
        self.confirmed_below
    }

    /// Confirmed records settled in all, above the watermark or not.
    pub(crate) fn confirmed(&self) -> u64 {
        self.confirmed
    }

    /// Whether every input is read and every line read is settled.
    pub(crate) fn all_settled(&self) -> bool {
        self.end == Some(self.watermark)
    }

    /// The watermark as a file and line.
    pub(crate) fn position(&self) -> Position {
        let w = self.watermark;
        let after = self.spans.partition_point(|s| s.first_seq <= w);
        match after.checked_sub(1).map(|i| self.spans[i]) {
            Some(span) => Position {
                file: span.file,
                line: span.first_line + (w - span.first_seq),
            },
            None => self.start,
        }
    }
}

/// The checkpoint file as stored.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Stored {
    /// [`FORMAT_VERSION`].
    version: u32,
    /// Whether every input is settled.
    complete: bool,
    /// The position's input file, by index in `inputs`.
    file: usize,
    /// That file's path, for people reading the checkpoint (absent when complete).
    path: Option<String>,
    /// Lines of that file settled.
    line: u64,
    /// The inputs, in reading order.
    inputs: Vec<InputFile>,
}

/// A checkpoint file for one list of inputs.
#[derive(Debug)]
pub(crate) struct CheckpointFile {
    path: PathBuf,
    inputs: Arc<[InputFile]>,
    /// Serializes writers (the periodic writer and the final write).
    writing: Mutex<()>,
}

impl CheckpointFile {
    /// The checkpoint at `path` for `inputs`.
    pub(crate) fn new(path: PathBuf, inputs: Arc<[InputFile]>) -> CheckpointFile {
        CheckpointFile {
            path,
            inputs,
            writing: Mutex::new(()),
        }
    }

    /// The file's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Reads the position saved for these inputs: `None` when there is no checkpoint
    /// yet. A checkpoint written for other inputs, or unreadable, is an error.
    pub(crate) fn load(&self) -> Result<Option<Position>, ArchiveError> {
        let text = match std::fs::read(&self.path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(ArchiveError::CheckpointRead {
                    path: self.path.clone(),
                    source,
                })
            }
        };
        let corrupt = |reason: String| ArchiveError::CheckpointCorrupt {
            path: self.path.clone(),
            reason,
        };
        let stored: Stored = serde_json::from_slice(&text).map_err(|e| corrupt(e.to_string()))?;
        if stored.version != FORMAT_VERSION {
            return Err(corrupt(format!(
                "format version {} (this build reads {FORMAT_VERSION})",
                stored.version
            )));
        }
        if let Some(detail) = mismatch(&stored.inputs, &self.inputs) {
            return Err(ArchiveError::CheckpointMismatch {
                path: self.path.clone(),
                detail,
            });
        }
        let n = self.inputs.len();
        if stored.file > n
            || (stored.file == n && stored.line != 0)
            || stored.complete != (stored.file == n)
        {
            return Err(corrupt(format!(
                "position input {} line {} (complete: {}) does not fit its {n} inputs",
                stored.file, stored.line, stored.complete
            )));
        }
        Ok(Some(Position {
            file: stored.file,
            line: stored.line,
        }))
    }

    /// Replaces the checkpoint with `position`, atomically and durably: a temporary file
    /// in the same directory, synced, renamed over the old one, the directory synced.
    pub(crate) fn write(&self, position: Position) -> std::io::Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        let complete = position.is_complete(self.inputs.len());
        let stored = Stored {
            version: FORMAT_VERSION,
            complete,
            file: position.file.min(self.inputs.len()),
            path: self
                .inputs
                .get(position.file)
                .map(|input| input.path.clone()),
            line: if complete { 0 } else { position.line },
            inputs: self.inputs.to_vec(),
        };
        let mut text = serde_json::to_vec_pretty(&stored).map_err(std::io::Error::other)?;
        text.push(b'\n');
        let dir = match self.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            Some(dir) => dir,
            None => Path::new("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .suffix(".tmp")
            .tempfile_in(dir)?;
        tmp.write_all(&text)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        cfq_sinks::jsonl::dir::sync_dir(dir)
    }
}

/// How `saved` (the checkpoint's inputs) differs from `now`, if it does.
fn mismatch(saved: &[InputFile], now: &[InputFile]) -> Option<String> {
    for i in 0..saved.len().max(now.len()) {
        let detail = match (saved.get(i), now.get(i)) {
            (Some(then), Some(now)) if then.path != now.path => format!(
                "input {} was {:?} when it was written, and is {:?} now",
                i + 1,
                then.path,
                now.path
            ),
            (Some(then), Some(now)) if then.size != now.size => format!(
                "{:?} changed since it was written ({} bytes then, {} now)",
                now.path, then.size, now.size
            ),
            (Some(then), Some(now)) if then.head_crc32 != now.head_crc32 => format!(
                "{:?} changed since it was written (its first bytes differ)",
                now.path
            ),
            (Some(_), Some(_)) => continue,
            (Some(then), None) => format!("{:?} is missing from the inputs now", then.path),
            (None, Some(now)) => format!(
                "{:?} was not among the inputs when it was written",
                now.path
            ),
            (None, None) => continue,
        };
        return Some(detail);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(sizes: &[u64]) -> Arc<[InputFile]> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| InputFile {
                path: format!("in/{i}.jsonl"),
                size,
                head_crc32: i as u32,
            })
            .collect()
    }

    #[test]
    fn the_watermark_moves_past_the_contiguous_prefix_only() {
        let mut p = Progress::new(Position::default());
        p.file_started(0, 0, 0);
        // 0..10 read. 1, 2 and 5..10 settle first: the watermark waits for 0.
        p.settle(&mut [2, 1], true);
        p.settle_run(5, 10, 3);
        assert_eq!(p.watermark(), 0);
        assert_eq!(p.position(), Position { file: 0, line: 0 });
        assert_eq!((p.confirmed(), p.confirmed_below()), (5, 0));
        p.settle(&mut [0], true);
        assert_eq!(p.watermark(), 3, "0, 1, 2 done; 3 is not");
        assert_eq!(p.confirmed_below(), 3);
        p.settle(&mut [4], false);
        assert_eq!(p.watermark(), 3, "4 settled after the gap at 3 waits");
        p.settle(&mut [3], true);
        assert_eq!(p.watermark(), 10, "the gap filled: every run joins");
        assert_eq!((p.confirmed(), p.confirmed_below()), (7, 7));
        assert!(p.above.is_empty());
        assert!(!p.all_settled(), "the input has not ended");
        p.input_ended(1, 10);
        assert!(p.all_settled());
        assert_eq!(p.position(), Position { file: 1, line: 0 });
    }

    #[test]
    fn positions_map_to_files_and_resume_lines() {
        // Resuming at line 4 of input 1: its 5th line is sequence 0.
        let mut p = Progress::new(Position { file: 1, line: 4 });
        assert_eq!(p.position(), Position { file: 1, line: 4 });
        p.file_started(1, 0, 4);
        p.settle_run(0, 3, 3);
        assert_eq!(p.position(), Position { file: 1, line: 7 });
        // Input 1 ends after 5 lines; input 2 is empty; input 3 starts at 5.
        p.file_started(2, 5, 0);
        p.file_started(3, 5, 0);
        p.settle_run(3, 5, 0);
        assert_eq!(p.position(), Position { file: 3, line: 0 });
        p.settle_run(5, 6, 1);
        assert_eq!(p.position(), Position { file: 3, line: 1 });
    }

    #[test]
    fn runs_stay_few_when_many_lines_settle_around_gaps() {
        let mut p = Progress::new(Position::default());
        p.file_started(0, 0, 0);
        for seq in (1..10_000).rev() {
            if seq % 1000 != 0 {
                p.settle_run(seq, seq + 1, 1);
            }
        }
        assert_eq!(p.above.len(), 10, "one run per gap");
        p.settle_run(0, 1, 0);
        assert_eq!(p.watermark(), 1000);
    }

    #[test]
    fn a_checkpoint_is_written_atomically_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("replay.checkpoint");
        let file = CheckpointFile::new(path.clone(), inputs(&[10, 20]));
        assert_eq!(file.load().unwrap(), None, "no checkpoint yet");
        file.write(Position { file: 1, line: 7 }).unwrap();
        assert_eq!(file.load().unwrap(), Some(Position { file: 1, line: 7 }));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"path\": \"in/1.jsonl\""), "{text}");
        file.write(Position { file: 2, line: 0 }).unwrap();
        assert_eq!(file.load().unwrap(), Some(Position { file: 2, line: 0 }));
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("\"complete\": true"));
        // Only the checkpoint is left in the directory: no temporary file.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("replay.checkpoint")]);
    }

    #[test]
    fn a_checkpoint_for_other_inputs_is_refused_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cp");
        CheckpointFile::new(path.clone(), inputs(&[10, 20]))
            .write(Position { file: 1, line: 2 })
            .unwrap();
        let error = |now: Arc<[InputFile]>| {
            CheckpointFile::new(path.clone(), now)
                .load()
                .unwrap_err()
                .to_string()
        };
        let e = error(inputs(&[10]));
        assert!(e.contains("\"in/1.jsonl\" is missing"), "{e}");
        let e = error(inputs(&[10, 21]));
        assert!(
            e.contains("\"in/1.jsonl\" changed") && e.contains("20 bytes then, 21 now"),
            "{e}"
        );
        let e = error(inputs(&[10, 20, 30]));
        assert!(e.contains("\"in/2.jsonl\" was not among the inputs"), "{e}");
        let mut changed = inputs(&[10, 20]).to_vec();
        changed[0].head_crc32 = 99;
        let e = error(changed.into());
        assert!(e.contains("first bytes differ"), "{e}");
        let mut renamed = inputs(&[10, 20]).to_vec();
        renamed[1].path = "other.jsonl".into();
        let e = error(renamed.into());
        assert!(e.contains("input 2 was \"in/1.jsonl\""), "{e}");
        assert!(
            e.contains(&path.display().to_string()),
            "names the checkpoint: {e}"
        );

        std::fs::write(&path, b"{not json").unwrap();
        let e = error(inputs(&[10, 20]));
        assert!(e.contains("unreadable"), "{e}");
    }
}
