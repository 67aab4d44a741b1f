//! Compression of archive data, in self-contained pieces.
//!
//! Each call to [`Compression::encode`] returns one complete gzip member or zstd frame.
//! Both formats allow such pieces to be concatenated into one file, and a reader (`zcat`,
//! `zstdcat`, the archive source) reads them as one stream. A sink that writes one piece
//! per group commit therefore leaves, after a crash, a file whose every confirmed record
//! sits in a complete piece: only the unconfirmed tail can be cut.

use std::io::Write as _;

use serde::Deserialize;

/// How archive data is compressed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    /// Stored as is.
    #[default]
    None,
    /// gzip members (RFC 1952), level 6.
    Gzip,
    /// zstd frames, level 1.
    Zstd,
}

/// zstd's fastest standard level. Archives are compressed on the write path, at the
/// pipeline's rate; in `cargo bench --bench archive` level 3 cost 10.3 µs of CPU per
/// message against 6.0 for level 1 (plain JSONL: 4.8), for a 2.4:1 ratio either way
/// on its events (BENCHMARKS.md).
const ZSTD_LEVEL: i32 = 1;

impl Compression {
    /// The name used in configs: `none`, `gzip`, `zstd`.
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }

    /// The file name suffix of data compressed this way: `""`, `".gz"`, `".zst"`.
    pub fn extension(self) -> &'static str {
        match self {
            Compression::None => "",
            Compression::Gzip => ".gz",
            Compression::Zstd => ".zst",
        }
    }

    /// The compression a file name's suffix says (`a.jsonl.zst` → zstd), ignoring a
    /// trailing `.partial`.
    pub fn from_file_name(name: &str) -> Compression {
        let name = name.strip_suffix(".partial").unwrap_or(name);
        if name.ends_with(".gz") {
            Compression::Gzip
        } else if name.ends_with(".zst") {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// `data` as one complete, self-contained piece: itself, a gzip member or a zstd
    /// frame.
    pub fn encode(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        match self {
            Compression::None => Ok(data.to_vec()),
            Compression::Gzip => {
                let mut encoder = flate2::write::GzEncoder::new(
                    Vec::with_capacity(data.len() / 3 + 64),
                    flate2::Compression::default(),
                );
                encoder.write_all(data)?;
                encoder.finish()
            }
            Compression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL),
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    /// Pieces concatenate: a stream reader gets every piece's data back, in order.
    #[test]
    fn pieces_concatenate_into_one_readable_stream() {
        let parts: [&[u8]; 3] = [b"{\"a\":1}\n", b"", b"{\"b\":2}\n{\"c\":3}\n"];
        let whole: Vec<u8> = parts.concat();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let mut file = Vec::new();
            for part in parts {
                file.extend(compression.encode(part).unwrap());
            }
            let mut back = Vec::new();
            match compression {
                Compression::None => back = file.clone(),
                Compression::Gzip => {
                    flate2::read::MultiGzDecoder::new(&file[..])
                        .read_to_end(&mut back)
                        .unwrap();
                }
                Compression::Zstd => {
                    zstd::stream::read::Decoder::new(&file[..])
                        .unwrap()
                        .read_to_end(&mut back)
                        .unwrap();
                }
            }
            assert_eq!(back, whole, "{compression}");
        }
    }

    #[test]
    fn names_and_extensions() {
        assert_eq!(
            Compression::from_file_name("a.jsonl.zst"),
            Compression::Zstd
        );
        assert_eq!(
            Compression::from_file_name("a.jsonl.gz.partial"),
            Compression::Gzip
        );
        assert_eq!(Compression::from_file_name("a.jsonl"), Compression::None);
        let parsed: Compression = serde_json::from_str("\"zstd\"").unwrap();
        assert_eq!(parsed, Compression::Zstd);
        assert_eq!(Compression::Gzip.extension(), ".gz");
    }
}
