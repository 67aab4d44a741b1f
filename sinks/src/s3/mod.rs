//! The `s3` sink (cargo feature `s3`): records archived as objects in an S3-compatible
//! bucket (AWS S3, Cloudflare R2, MinIO, GCS through its S3 interface, ...), through the
//! `object_store` crate, as JSONL (optionally gzip or zstd) or Parquet.
//!
//! Durability: a record is confirmed only when the PUT of the object holding it succeeded,
//! that is when the object is in the bucket, whole. Until then the `deliver` call that
//! brought it has not returned, so its lease is held, and the bridge's in-flight bound and
//! `max_object_bytes` bound the memory the buffer takes.
//!
//! - [`config`](S3Config): the `[sink]` settings, the credentials and the `check` timing
//!   rule ([`timing_problem`]), in every build;
//! - `key`: the Hive-style object keys (`PREFIX dt=YYYY-MM-DD/hour=HH/<ts>-<unique>.<ext>`);
//! - `sink`: [`S3Sink`], the buffer shared by concurrent deliveries, the age timer and the
//!   uploads;
//! - `doctor`: the worst confirmation time `cfq-bridge doctor` compares with the lease.
//!
//! Without the `s3` feature only the settings exist, and building the sink answers
//! "s3 support not compiled in".

mod config;
mod doctor;
pub mod key;
#[cfg(feature = "s3")]
mod sink;

pub use config::{
    timing_problem, Credentials, Format, S3Config, ACCESS_KEY_ID_ENV, DEFAULT_MAX_OBJECT_AGE_SECS,
    DEFAULT_MAX_OBJECT_BYTES, DEFAULT_REGION, DEFAULT_UPLOAD_TIMEOUT_SECS, MAX_OBJECT_BYTES,
    MIN_OBJECT_BYTES, SECRET_ACCESS_KEY_ENV, SESSION_TOKEN_ENV,
};
#[cfg(feature = "s3")]
pub use sink::{object_store_for, S3Sink};

use crate::{Sink, SinkError};

/// The error message of a build without the `s3` feature.
pub const NOT_COMPILED_IN: &str = "s3 support not compiled in; rebuild with `--features s3`";

/// Opens the sink behind the registry (settings already checked).
async fn open_boxed(config: &S3Config) -> Result<Box<dyn Sink>, SinkError> {
    #[cfg(not(feature = "s3"))]
    {
        let _ = config;
        Err(SinkError::permanent(NOT_COMPILED_IN))
    }
    #[cfg(feature = "s3")]
    {
        Ok(Box::new(S3Sink::open(config).await?))
    }
}

#[cfg(test)]
mod tests {
    #[cfg(not(feature = "s3"))]
    #[tokio::test]
    async fn build_without_the_feature_says_how_to_rebuild() {
        let config: super::S3Config = toml::from_str("bucket = \"b\"\n").unwrap();
        let error = crate::registry::build("s3", &config)
            .await
            .err()
            .expect("build must fail");
        assert_eq!(error.message, super::NOT_COMPILED_IN);
    }
}
