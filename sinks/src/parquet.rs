//! Records as Parquet files, and Parquet files back as records (cargo feature `parquet`).
//!
//! One row per record, with the columns:
//!
//! | column         | type                              | holds                                   |
//! |----------------|-----------------------------------|-----------------------------------------|
//! | `id`           | utf8                              | the Cloudflare message id               |
//! | `queue_id`     | utf8                              | the queue it came from                  |
//! | `timestamp`    | timestamp (ms, UTC)               | when it was published                   |
//! | `attempts`     | int32                             | the delivery attempt                    |
//! | `content_type` | dictionary (int32 keys, utf8)     | `text`, `json`, `bytes` or `v8`         |
//! | `metadata`     | utf8                              | the metadata object, as JSON text       |
//! | `body`         | binary                            | the decoded body, byte for byte         |
//!
//! No column is nullable. The `json` body is the JSON text the producer sent, `text` is its
//! UTF-8 bytes, and `bytes`/`v8` are the raw bytes: unlike the JSONL line, nothing is
//! base64-encoded. Query engines read it directly, e.g. DuckDB:
//! `SELECT id, decode(body) FROM 'cf/*/dt=*/hour=*/*.parquet' WHERE content_type = 'text'`.
//!
//! [`encode`] then [`decode`] gives back identical records, provided the timestamp fits in
//! an `i64` and `attempts` in an `i32` (always true for Cloudflare messages; larger values
//! are stored as the largest the column holds).

use std::sync::{Arc, OnceLock};

use arrow_array::builder::StringDictionaryBuilder;
use arrow_array::cast::AsArray as _;
use arrow_array::types::{Int32Type, TimestampMillisecondType};
use arrow_array::{
    Array, ArrayRef, BinaryArray, Int32Array, RecordBatch, StringArray, TimestampMillisecondArray,
};
use arrow_schema::{ArrowError, DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression as Codec, GzipLevel, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::compress::Compression;
use crate::{ContentType, Record};

/// Why records could not be written as Parquet, or a file not read back as records.
#[derive(Debug, thiserror::Error)]
pub enum ParquetError {
    /// The Parquet writer or reader failed (not a Parquet file, a cut file, ...).
    #[error("parquet: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Building or reading the Arrow columns failed.
    #[error("arrow: {0}")]
    Arrow(#[from] ArrowError),
    /// A column is missing or has another type than the schema's.
    #[error("column {name:?}: {problem}")]
    Column {
        /// The column.
        name: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// A row's `metadata` is not a JSON object.
    #[error("row {row}: metadata is not a JSON object: {source}")]
    Metadata {
        /// The row number in the file.
        row: usize,
        /// What the JSON parser found.
        #[source]
        source: serde_json::Error,
    },
    /// A row's `content_type` is not one of `text`, `json`, `bytes`, `v8`.
    #[error("row {row}: unknown content_type {value:?}")]
    ContentType {
        /// The row number in the file.
        row: usize,
        /// The value found.
        value: String,
    },
}

/// The Arrow schema of the archive's Parquet files (see the module documentation).
pub fn schema() -> SchemaRef {
    static SCHEMA: OnceLock<SchemaRef> = OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("id", DataType::Utf8, false),
                Field::new("queue_id", DataType::Utf8, false),
                Field::new(
                    "timestamp",
                    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
                    false,
                ),
                Field::new("attempts", DataType::Int32, false),
                Field::new(
                    "content_type",
                    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                    false,
                ),
                Field::new("metadata", DataType::Utf8, false),
                Field::new("body", DataType::Binary, false),
            ]))
        })
        .clone()
}

/// The Parquet codec for a configured compression (zstd level 3, gzip level 6).
fn codec(compression: Compression) -> Codec {
    match compression {
        Compression::None => Codec::UNCOMPRESSED,
        // Both levels are in range, so the constructors cannot fail; the defaults are the
        // fallback documented by the crate.
        Compression::Gzip => Codec::GZIP(GzipLevel::try_new(6).unwrap_or_default()),
        Compression::Zstd => Codec::ZSTD(ZstdLevel::try_new(3).unwrap_or_default()),
    }
}

/// The records as one Arrow batch in the archive schema.
pub fn to_batch(records: &[Record]) -> Result<RecordBatch, ParquetError> {
    let ids = StringArray::from_iter_values(records.iter().map(|r| r.id.as_str()));
    let queues = StringArray::from_iter_values(records.iter().map(|r| &*r.queue_id));
    let timestamps = TimestampMillisecondArray::from_iter_values(
        records
            .iter()
            .map(|r| i64::try_from(r.timestamp_ms).unwrap_or(i64::MAX)),
    )
    .with_timezone("UTC");
    let attempts = Int32Array::from_iter_values(
        records
            .iter()
            .map(|r| i32::try_from(r.attempts).unwrap_or(i32::MAX)),
    );
    let mut content_types = StringDictionaryBuilder::<Int32Type>::new();
    for record in records {
        content_types.append(record.content_type.as_str())?;
    }
    let metadata = StringArray::from_iter_values(records.iter().map(|r| {
        // A map of JSON values always serializes.
        serde_json::to_string(&r.metadata).unwrap_or_else(|_| "{}".to_owned())
    }));
    let bodies = BinaryArray::from_iter_values(records.iter().map(|r| &r.body[..]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids),
        Arc::new(queues),
        Arc::new(timestamps),
        Arc::new(attempts),
        Arc::new(content_types.finish()),
        Arc::new(metadata),
        Arc::new(bodies),
    ];
    Ok(RecordBatch::try_new(schema(), columns)?)
}

/// The records as one complete Parquet file (one row group per 1,048,576 rows), its
/// column chunks compressed with `compression`.
pub fn encode(records: &[Record], compression: Compression) -> Result<Vec<u8>, ParquetError> {
    let batch = to_batch(records)?;
    let properties = WriterProperties::builder()
        .set_compression(codec(compression))
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), schema(), Some(properties))?;
    writer.write(&batch)?;
    Ok(writer.into_inner()?)
}

/// Reads every row of a Parquet file written by [`encode`] back as records, in order.
pub fn decode(file: Bytes) -> Result<Vec<Record>, ParquetError> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)?.build()?;
    let mut records = Vec::new();
    for batch in reader {
        from_batch(&batch?, &mut records)?;
    }
    Ok(records)
}

fn column<'a>(batch: &'a RecordBatch, name: &'static str) -> Result<&'a ArrayRef, ParquetError> {
    batch.column_by_name(name).ok_or(ParquetError::Column {
        name,
        problem: "missing".into(),
    })
}

fn wrong_type(name: &'static str, array: &dyn Array) -> ParquetError {
    ParquetError::Column {
        name,
        problem: format!("unexpected type {}", array.data_type()),
    }
}

fn strings<'a>(
    batch: &'a RecordBatch,
    name: &'static str,
) -> Result<&'a StringArray, ParquetError> {
    let array = column(batch, name)?;
    array
        .as_string_opt::<i32>()
        .ok_or_else(|| wrong_type(name, array))
}

/// Appends the rows of one batch to `out`.
fn from_batch<'a>(batch: &'a RecordBatch, out: &mut Vec<Record>) -> Result<(), ParquetError> {
    let ids = strings(batch, "id")?;
    let queues = strings(batch, "queue_id")?;
    let metadata = strings(batch, "metadata")?;
    let timestamps = column(batch, "timestamp")?;
    let timestamps = timestamps
        .as_primitive_opt::<TimestampMillisecondType>()
        .ok_or_else(|| wrong_type("timestamp", timestamps))?;
    let attempts = column(batch, "attempts")?;
    let attempts = attempts
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| wrong_type("attempts", attempts))?;
    let bodies = column(batch, "body")?;
    let bodies = bodies
        .as_binary_opt::<i32>()
        .ok_or_else(|| wrong_type("body", bodies))?;
    let content_types = column(batch, "content_type")?;
    let content_type_at: Box<dyn Fn(usize) -> &'a str + 'a> =
        if let Some(dictionary) = content_types.as_dictionary_opt::<Int32Type>() {
            let values = dictionary
                .values()
                .as_string_opt::<i32>()
                .ok_or_else(|| wrong_type("content_type", content_types))?;
            let keys = dictionary.keys();
            Box::new(move |row| {
                usize::try_from(keys.value(row))
                    .ok()
                    .filter(|&k| k < values.len())
                    .map_or("", |k| values.value(k))
            })
        } else if let Some(plain) = content_types.as_string_opt::<i32>() {
            Box::new(move |row| plain.value(row))
        } else {
            return Err(wrong_type("content_type", content_types));
        };
    let base = out.len();
    for row in 0..batch.num_rows() {
        let value = content_type_at(row);
        let content_type = ContentType::parse(value).ok_or_else(|| ParquetError::ContentType {
            row: base + row,
            value: value.to_owned(),
        })?;
        let metadata =
            serde_json::from_str(metadata.value(row)).map_err(|source| ParquetError::Metadata {
                row: base + row,
                source,
            })?;
        out.push(Record {
            id: ids.value(row).to_owned(),
            queue_id: Arc::from(queues.value(row)),
            timestamp_ms: u64::try_from(timestamps.value(row)).unwrap_or(0),
            attempts: u32::try_from(attempts.value(row)).unwrap_or(0),
            content_type,
            metadata,
            body: Bytes::copy_from_slice(bodies.value(row)),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, Value};

    use super::*;

    fn records() -> Vec<Record> {
        let all_bytes: Vec<u8> = (0..=255).collect();
        let bodies: [(ContentType, &[u8]); 6] = [
            (ContentType::Text, "tab\t\u{e9} \u{1F600}\n".as_bytes()),
            (
                ContentType::Json,
                br#" { "b" : 1.50, "big":123456789012345678901234567890 } "#,
            ),
            (ContentType::Bytes, &all_bytes),
            (ContentType::Bytes, b""),
            (ContentType::V8, &[0xff, 0x0f, 0x22]),
            (ContentType::Text, b""),
        ];
        bodies
            .iter()
            .enumerate()
            .map(|(i, (content_type, body))| {
                let mut metadata: Map<String, Value> = serde_json::from_str(
                    r#"{"z":null,"a":[1,{"b":false}],"":"empty key","n":-12.5}"#,
                )
                .unwrap();
                metadata.insert("CF-Content-Type".into(), content_type.as_str().into());
                Record {
                    id: format!("id-{i}-\u{e9}"),
                    queue_id: Arc::from(if i % 2 == 0 { "q1" } else { "q2" }),
                    timestamp_ms: 1_796_025_599_999 + i as u64,
                    attempts: i as u32 + 1,
                    content_type: *content_type,
                    metadata,
                    body: Bytes::copy_from_slice(body),
                }
            })
            .collect()
    }

    #[test]
    fn encode_then_decode_gives_identical_records_with_every_codec() {
        let sent = records();
        for compression in [Compression::None, Compression::Gzip, Compression::Zstd] {
            let file = encode(&sent, compression).unwrap();
            assert_eq!(&file[..4], b"PAR1", "{compression}");
            let back = decode(Bytes::from(file)).unwrap();
            assert_eq!(back, sent, "{compression}");
            let keys: Vec<_> = back[0].metadata.keys().cloned().collect();
            assert_eq!(
                keys,
                ["z", "a", "", "n", "CF-Content-Type"],
                "key order kept"
            );
        }
        assert!(decode(Bytes::from(encode(&[], Compression::Zstd).unwrap()))
            .unwrap()
            .is_empty());
    }

    #[test]
    fn the_file_has_the_documented_schema_and_codec() {
        let file = Bytes::from(encode(&records(), Compression::Zstd).unwrap());
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).unwrap();
        let names: Vec<&str> = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().as_str())
            .collect();
        assert_eq!(
            names,
            [
                "id",
                "queue_id",
                "timestamp",
                "attempts",
                "content_type",
                "metadata",
                "body"
            ]
        );
        assert_eq!(builder.schema().fields(), schema().fields());
        assert_eq!(
            schema().field(2).data_type(),
            &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
        );
        assert!(builder.schema().fields().iter().all(|f| !f.is_nullable()));
        let column = builder.metadata().row_group(0).column(6);
        assert!(
            matches!(column.compression(), Codec::ZSTD(_)),
            "{:?}",
            column.compression()
        );
    }

    #[test]
    fn damaged_files_give_errors_not_panics() {
        let file = encode(&records(), Compression::Zstd).unwrap();
        for cut in [0, 4, file.len() / 2, file.len() - 1] {
            assert!(
                decode(Bytes::copy_from_slice(&file[..cut])).is_err(),
                "{cut}"
            );
        }
        assert!(decode(Bytes::from_static(b"not parquet at all")).is_err());
    }
}
