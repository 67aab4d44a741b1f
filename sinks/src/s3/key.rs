//! Object keys: `PREFIX dt=YYYY-MM-DD/hour=HH/<first timestamp ms>-<unique><extension>`.
//!
//! The prefix is a template expanded per record ([`crate::Record::expand_template`]); the
//! `dt=` and `hour=` folders (UTC, from the record's timestamp) are Hive-style partitions
//! that Athena, Spark, DuckDB and ClickHouse prune by. Records of different partitions
//! never share an object. The file name starts with the smallest timestamp in the object,
//! so names sort by time within a partition, and ends with a part unique to the process
//! and the object, so that two bridges (or two objects of one millisecond) never write
//! the same key.

/// Checks a prefix template without a record: every `{` is closed, and each placeholder
/// is `{queue_id}` or `{metadata.NAME}`.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    crate::record::template_literal(prefix, "").map(drop)
}

/// The partition folder of a record: its expanded prefix, then `dt=YYYY-MM-DD/hour=HH/`
/// for its timestamp in UTC. A timestamp beyond what a calendar date can hold goes to
/// `dt=invalid/hour=invalid/` rather than failing the record.
#[cfg(feature = "s3")]
pub fn partition(expanded_prefix: &str, timestamp_ms: u64) -> String {
    let time = i64::try_from(timestamp_ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis);
    match time {
        Some(time) => format!("{expanded_prefix}{}", time.format("dt=%Y-%m-%d/hour=%H/")),
        None => format!("{expanded_prefix}dt=invalid/hour=invalid/"),
    }
}

/// The key of one object in `partition`: `<first_timestamp_ms>-<unique><extension>`.
pub fn object_key(partition: &str, first_timestamp_ms: u64, unique: &str, extension: &str) -> String {
    format!("{partition}{first_timestamp_ms}-{unique}{extension}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_checked_without_a_record() {
        check_prefix("").unwrap();
        check_prefix("cf/{queue_id}/").unwrap();
        check_prefix("{metadata.tenant}/{queue_id}/").unwrap();
        assert!(check_prefix("cf/{queue_id").unwrap_err().contains("unclosed"));
        assert!(check_prefix("cf/{queue}/").unwrap_err().contains("{queue}"));
        assert!(check_prefix("{metadata.}/").is_err());
    }

    #[cfg(feature = "s3")]
    #[test]
    fn keys_are_hive_partitioned_by_utc_date_and_hour() {
        // 2026-11-30T07:59:59.999Z and the next millisecond.
        let before = 1_796_025_599_999;
        assert_eq!(partition("cf/q1/", before), "cf/q1/dt=2026-11-30/hour=07/");
        assert_eq!(
            partition("cf/q1/", before + 1),
            "cf/q1/dt=2026-11-30/hour=08/"
        );
        assert_eq!(partition("", 0), "dt=1970-01-01/hour=00/");
        assert_eq!(
            partition("p/", u64::MAX),
            "p/dt=invalid/hour=invalid/"
        );
        let dir = partition("cf/q1/", before);
        assert_eq!(
            object_key(&dir, before, "0a1b2c3d-000007", ".jsonl.zst"),
            "cf/q1/dt=2026-11-30/hour=07/1796025599999-0a1b2c3d-000007.jsonl.zst"
        );
    }

    #[cfg(feature = "s3")]
    #[test]
    fn the_prefix_expands_per_record_queue() {
        let mut record = crate::Record {
            id: "m".into(),
            queue_id: std::sync::Arc::from("QUEUE"),
            timestamp_ms: 1_796_025_599_999,
            attempts: 1,
            content_type: crate::ContentType::Text,
            metadata: serde_json::Map::new(),
            body: bytes::Bytes::from_static(b"x"),
        };
        let expanded = record.expand_template("cf/{queue_id}/").unwrap();
        assert_eq!(
            partition(&expanded, record.timestamp_ms),
            "cf/QUEUE/dt=2026-11-30/hour=07/"
        );
        record.queue_id = std::sync::Arc::from("other");
        let expanded = record.expand_template("cf/{queue_id}/").unwrap();
        assert!(partition(&expanded, record.timestamp_ms).starts_with("cf/other/"));
    }
}
