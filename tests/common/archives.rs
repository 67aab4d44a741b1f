//! Archive files for tests: records written as the JSONL sink writes them, plain, as
//! gzip members or as zstd frames, and ways to damage them.

#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use cfq_sinks::Record;

/// The records as JSON lines, as the JSONL sink writes them.
pub fn json_lines(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for record in records {
        record.write_json_line(&mut out);
    }
    out
}

/// A plain JSONL archive.
pub fn write_plain(path: &Path, records: &[Record]) {
    std::fs::write(path, json_lines(records)).expect("write a plain archive");
}

/// A gzip archive of several members, one after the other (as `cat a.gz b.gz` makes).
pub fn write_gz(path: &Path, members: &[&[Record]]) {
    let mut out = Vec::new();
    for member in members {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(&json_lines(member)).unwrap();
        out.extend(encoder.finish().unwrap());
    }
    std::fs::write(path, out).expect("write a gzip archive");
}

/// A zstd archive of several frames, one after the other.
pub fn write_zst(path: &Path, frames: &[&[Record]]) {
    let mut out = Vec::new();
    for frame in frames {
        out.extend(zstd::encode_all(&json_lines(frame)[..], 3).unwrap());
    }
    std::fs::write(path, out).expect("write a zstd archive");
}

/// Cuts `path` to its first `keep` bytes.
pub fn truncate(path: &Path, keep: u64) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.set_len(keep).unwrap();
}

/// The size of `path` in bytes.
pub fn size(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().len()
}
