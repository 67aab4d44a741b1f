//! `cfq-bridge archive verify`: reads a whole archive and says whether every record in it
//! can be read back.
//!
//! An archive is a file, a directory of segments (the `jsonl` sink's directory mode, read
//! recursively), a glob, or `s3://BUCKET/PREFIX` (the `s3` sink's objects, read with the
//! settings of an `s3` `[sink]` table given by `--config`, or from the environment). Every segment is read to its end, whatever its format and
//! compression, with the archive source's own reader, so what `verify` calls readable is
//! exactly what a replay reads. It prints the segments and records, the time span of the
//! records, the ids seen more than once (at-least-once delivery allows them; they are
//! counted, not errors) and every unreadable part with where it starts.
//!
//! Only a torn tail that the writer repairs by itself is acceptable: the last line of a
//! plain file (the `jsonl` sink cuts it when it opens the file) or the end of a segment
//! still named `.partial` (cut when the sink next starts). Anything else that cannot be
//! read (a closed compressed segment that stops decoding, a malformed line, an unreadable
//! file) fails the verification: exit code 1.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use cfq_sinks::compress::Compression;
use cfq_sinks::jsonl::segments::PARTIAL_SUFFIX;
use cfq_sinks::Record;

use crate::sources::archive::{self, ArchiveConfig, ArchiveReport};

/// How many examples of duplicate ids and malformed lines are printed.
const EXAMPLES: usize = 5;

/// What one segment held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentReport {
    /// The file (or object) name.
    pub name: String,
    /// Records read.
    pub records: u64,
    /// Malformed lines, and the first few as `file:line: reason`.
    pub malformed: u64,
    /// Examples of them.
    pub malformed_examples: Vec<String>,
    /// Where the unreadable end starts, and why, when there is one.
    pub tail: Option<String>,
    /// Whether that end is one the writer repairs by itself.
    pub tail_repairable: bool,
}

/// What a whole archive held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Every segment, in name order.
    pub segments: Vec<SegmentReport>,
    /// Records read in all.
    pub records: u64,
    /// The earliest and latest `timestamp_ms`.
    pub span: Option<(u64, u64)>,
    /// Distinct ids seen more than once.
    pub duplicate_ids: u64,
    /// Extra copies beyond one per id.
    pub extra_copies: u64,
    /// A few of the duplicate ids, with how many times each was seen.
    pub duplicate_examples: Vec<(String, u32)>,
}

impl VerifyReport {
    /// True when every segment is readable to its end, but for repairable tails.
    pub fn is_ok(&self) -> bool {
        self.segments
            .iter()
            .all(|s| s.malformed == 0 && (s.tail.is_none() || s.tail_repairable))
    }

    /// The report as lines for the terminal.
    pub fn lines(&self, target: &str) -> Vec<String> {
        let mut out = vec![format!("archive verify: {target}")];
        let open = self
            .segments
            .iter()
            .filter(|s| s.name.ends_with(PARTIAL_SUFFIX))
            .count();
        out.push(format!(
            "  segments       {}{}",
            self.segments.len(),
            if open > 0 {
                format!(" ({open} still open: .partial)")
            } else {
                String::new()
            }
        ));
        out.push(format!("  records        {}", self.records));
        if let Some((first, last)) = self.span {
            out.push(format!(
                "  time span      {} .. {}",
                rfc3339(first),
                rfc3339(last)
            ));
        }
        if self.duplicate_ids == 0 {
            out.push("  duplicate ids  none".to_string());
        } else {
            let examples: Vec<String> = self
                .duplicate_examples
                .iter()
                .map(|(id, n)| format!("{id} ×{n}"))
                .collect();
            out.push(format!(
                "  duplicate ids  {} ({} extra copies; at-least-once delivery allows them), e.g. {}",
                self.duplicate_ids,
                self.extra_copies,
                examples.join(", ")
            ));
        }
        let mut unreadable = 0;
        for segment in &self.segments {
            if let Some(tail) = &segment.tail {
                if segment.tail_repairable {
                    out.push(format!(
                        "  repairable     {tail} (the sink cuts it when it next opens the file)"
                    ));
                } else {
                    unreadable += 1;
                    out.push(format!("  UNREADABLE     {tail}"));
                }
            }
            if segment.malformed > 0 {
                unreadable += 1;
                out.push(format!(
                    "  UNREADABLE     {}: {} malformed lines",
                    segment.name, segment.malformed
                ));
                for example in &segment.malformed_examples {
                    out.push(format!("                 {example}"));
                }
            }
        }
        out.push(if unreadable == 0 {
            "result: ok: every record can be read".to_string()
        } else {
            format!("result: FAILED: {unreadable} segments have unreadable parts")
        });
        out
    }
}

fn rfc3339(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Whether a file name is one an archive is made of: `.parquet`, or `.jsonl` with an
/// optional `.gz` or `.zst`, and an optional `.partial` after that.
pub fn is_segment_name(name: &str) -> bool {
    if name.ends_with(".parquet") {
        return true;
    }
    let name = name.strip_suffix(PARTIAL_SUFFIX).unwrap_or(name);
    let name = name
        .strip_suffix(Compression::from_file_name(name).extension())
        .unwrap_or(name);
    name.ends_with(".jsonl")
}

/// The segment files of a local target: the file itself, every segment under a
/// directory (recursively), or what a glob matches; in name order.
pub fn local_segments(target: &str) -> anyhow::Result<Vec<PathBuf>> {
    let path = Path::new(target);
    let mut files = Vec::new();
    if path.is_dir() {
        walk(path, &mut files)
            .with_context(|| format!("listing the archive directory {}", path.display()))?;
    } else if path.is_file() {
        files.push(path.to_path_buf());
    } else {
        for entry in
            glob::glob(target).with_context(|| format!("{target:?} is not a valid glob"))?
        {
            let file = entry.with_context(|| format!("listing {target}"))?;
            if file.is_file() {
                files.push(file);
            }
        }
    }
    if files.is_empty() {
        anyhow::bail!("{target}: no archive segments there (looked for *.jsonl, *.jsonl.gz, *.jsonl.zst, *.parquet, and those with .partial)");
    }
    files.sort();
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(&path, files)?;
        } else if path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(is_segment_name)
        {
            files.push(path);
        }
    }
    Ok(())
}

/// Accumulates ids and times across segments.
#[derive(Default)]
struct Tally {
    seen: HashMap<String, u32>,
    span: Option<(u64, u64)>,
}

impl Tally {
    fn add(&mut self, record: &Record) {
        *self.seen.entry(record.id.clone()).or_default() += 1;
        let t = record.timestamp_ms;
        self.span = Some(match self.span {
            None => (t, t),
            Some((first, last)) => (first.min(t), last.max(t)),
        });
    }

    fn finish(self, segments: Vec<SegmentReport>) -> VerifyReport {
        let records = segments.iter().map(|s| s.records).sum();
        let mut duplicates: Vec<(String, u32)> =
            self.seen.into_iter().filter(|(_, n)| *n > 1).collect();
        duplicates.sort();
        VerifyReport {
            records,
            span: self.span,
            duplicate_ids: duplicates.len() as u64,
            extra_copies: duplicates.iter().map(|(_, n)| u64::from(*n - 1)).sum(),
            duplicate_examples: duplicates.into_iter().take(EXAMPLES).collect(),
            segments,
        }
    }
}

/// Reads one local segment with the archive source's reader. `name` is what the report
/// calls it (the path, or the object's URL).
fn read_local(path: &Path, name: String, tally: &mut Tally) -> anyhow::Result<SegmentReport> {
    let pattern = glob::Pattern::escape(&path.display().to_string());
    let mut records = 0u64;
    let report: ArchiveReport = archive::scan(&ArchiveConfig::new(vec![pattern]), |record| {
        records += 1;
        tally.add(record);
    })
    .with_context(|| format!("reading {name}"))?;
    let mut tail = report.unreadable_tails.first().map(|t| t.to_string());
    if let Some(text) = &mut tail {
        // The reader names the local file; an object is named by its URL.
        let local = path.display().to_string();
        if local != name {
            *text = text.replacen(&local, &name, 1);
        }
    }
    // A plain file's torn tail is its last line; a `.partial` is repaired at the
    // sink's next start. A closed compressed segment was synced whole before its rename,
    // and a Parquet file or an object was written whole.
    let repairable = tail.is_some()
        && !name.starts_with("s3://")
        && (name.ends_with(PARTIAL_SUFFIX)
            || (Compression::from_file_name(&name) == Compression::None
                && !name.ends_with(".parquet")));
    Ok(SegmentReport {
        name,
        records,
        malformed: report.malformed,
        malformed_examples: report.malformed_examples,
        tail: tail.map(|t| t.to_string()),
        tail_repairable: repairable,
    })
}

/// Verifies a local archive (a file, a directory of segments, or a glob).
pub fn verify_local(target: &str) -> anyhow::Result<VerifyReport> {
    let mut tally = Tally::default();
    let mut segments = Vec::new();
    for path in local_segments(target)? {
        let name = path.display().to_string();
        segments.push(read_local(&path, name, &mut tally)?);
    }
    Ok(tally.finish(segments))
}

/// Verifies the objects under `s3://BUCKET/PREFIX`. The client settings (endpoint,
/// region, `allow_http`, credential files) are those of the `s3` `[sink]` of `config`
/// when given, else the defaults with `AWS_ENDPOINT_URL` and `AWS_REGION` from the
/// environment; credentials as for the sink (`AWS_ACCESS_KEY_ID`, ...).
#[cfg(feature = "s3")]
pub async fn verify_s3(url: &str, config: Option<&Path>) -> anyhow::Result<VerifyReport> {
    use futures_util::TryStreamExt as _;
    use object_store::{ObjectStore as _, ObjectStoreExt as _};

    let rest = url
        .strip_prefix("s3://")
        .with_context(|| format!("{url} is not an s3:// URL"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(!bucket.is_empty(), "{url}: no bucket name");
    let mut settings = match config {
        Some(path) => match crate::config::Config::load(path)?.sink()? {
            cfq_sinks::SinkConfig::S3(settings) => settings.clone(),
            other => anyhow::bail!(
                "{}: its [sink] is {:?}, not s3; give a config whose sink is the bucket's",
                path.display(),
                other.kind()
            ),
        },
        None => {
            let mut table = toml::Table::new();
            table.insert("bucket".into(), bucket.into());
            if let Ok(endpoint) = std::env::var("AWS_ENDPOINT_URL") {
                table.insert("allow_http".into(), endpoint.starts_with("http://").into());
                table.insert("endpoint".into(), endpoint.into());
            }
            if let Ok(region) = std::env::var("AWS_REGION") {
                table.insert("region".into(), region.into());
            }
            table
                .try_into()
                .context("s3 settings from the environment")?
        }
    };
    settings.bucket = bucket.to_string();
    let store = cfq_sinks::s3::object_store_for(&settings)?;
    let prefix = (!prefix.is_empty()).then(|| object_store::path::Path::from(prefix));
    let mut objects: Vec<object_store::ObjectMeta> = store
        .list(prefix.as_ref())
        .try_collect()
        .await
        .with_context(|| format!("listing {url}"))?;
    objects.retain(|o| o.location.filename().is_some_and(is_segment_name));
    anyhow::ensure!(!objects.is_empty(), "{url}: no archive objects there");
    objects.sort_by(|a, b| a.location.cmp(&b.location));
    // Each object is read into a file of the same name and read like a local segment, so
    // that formats and damage are judged by the one reader.
    let scratch = tempfile::tempdir().context("a scratch directory")?;
    let mut tally = Tally::default();
    let mut segments = Vec::new();
    for object in objects {
        let bytes = store
            .get(&object.location)
            .await
            .with_context(|| format!("reading s3://{bucket}/{}", object.location))?
            .bytes()
            .await
            .with_context(|| format!("reading s3://{bucket}/{}", object.location))?;
        let file = scratch
            .path()
            .join(object.location.filename().unwrap_or("object"));
        std::fs::write(&file, &bytes).context("writing a scratch copy")?;
        let name = format!("s3://{bucket}/{}", object.location);
        let segment = tokio::task::block_in_place(|| read_local(&file, name, &mut tally))?;
        segments.push(segment);
        let _ = std::fs::remove_file(&file);
    }
    Ok(tally.finish(segments))
}

/// `cfq-bridge archive verify TARGET`: prints the report; `Ok(false)` when something is
/// unreadable beyond a repairable tail.
pub async fn run(target: &str, config: Option<&Path>) -> anyhow::Result<bool> {
    let report = if target.starts_with("s3://") {
        #[cfg(feature = "s3")]
        {
            verify_s3(target, config).await?
        }
        #[cfg(not(feature = "s3"))]
        {
            let _ = config;
            anyhow::bail!("s3 support not compiled in; rebuild with `--features s3`")
        }
    } else {
        let owned = target.to_string();
        tokio::task::spawn_blocking(move || verify_local(&owned))
            .await
            .context("the verify task")??
    };
    for line in report.lines(target) {
        println!("{line}");
    }
    Ok(report.is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_names() {
        for name in [
            "a.jsonl",
            "q-20261130T070000Z-000001.jsonl.zst",
            "q-20261130T070000Z-000002.jsonl.gz.partial",
            "b.jsonl.partial",
        ] {
            assert!(is_segment_name(name), "{name}");
        }
        for name in [".lock", "a.jsonl.lock", "a.json", "cp", "a.zst"] {
            assert!(!is_segment_name(name), "{name}");
        }
    }

    #[test]
    fn times_print_as_utc() {
        assert_eq!(rfc3339(1_764_460_800_250), "2025-11-30T00:00:00.250Z");
    }
}
