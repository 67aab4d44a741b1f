//! The `[sink]` settings of the `s3` sink, their validation, the `check` timing rule and the
//! credentials.

use std::path::PathBuf;

use async_trait::async_trait;
use secrecy::SecretString;
use serde::Deserialize;

use crate::compress::Compression;
use crate::registry::{SinkConfigError, SinkSettings};
use crate::{Sink, SinkError};

/// Default of [`S3Config::region`].
pub const DEFAULT_REGION: &str = "us-east-1";
/// Default of [`S3Config::max_object_bytes`]: 64 MiB.
pub const DEFAULT_MAX_OBJECT_BYTES: u64 = 64 * 1024 * 1024;
/// Default of [`S3Config::max_object_age_secs`]. With the default upload timeout it fits
/// the rule of [`timing_problem`] for the bridge's default 60 s visibility timeout.
pub const DEFAULT_MAX_OBJECT_AGE_SECS: u64 = 20;
/// Default of [`S3Config::upload_timeout_secs`].
pub const DEFAULT_UPLOAD_TIMEOUT_SECS: u64 = 25;
/// Smallest accepted [`S3Config::max_object_bytes`] (1 KiB).
pub const MIN_OBJECT_BYTES: u64 = 1024;
/// Largest accepted [`S3Config::max_object_bytes`]: 5 GiB, the most one S3 PUT takes.
pub const MAX_OBJECT_BYTES: u64 = 5 * 1024 * 1024 * 1024;
/// The environment variable the access key id is read from, unless
/// [`S3Config::access_key_id_file`] is set.
pub const ACCESS_KEY_ID_ENV: &str = "AWS_ACCESS_KEY_ID";
/// The environment variable the secret access key is read from, unless
/// [`S3Config::secret_access_key_file`] is set.
pub const SECRET_ACCESS_KEY_ENV: &str = "AWS_SECRET_ACCESS_KEY";
/// The environment variable of an optional session token (temporary credentials).
pub const SESSION_TOKEN_ENV: &str = "AWS_SESSION_TOKEN";

/// The layout of the objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// One JSON line per record (the archive line of the `jsonl` sink), the whole object
    /// compressed as one gzip member or zstd frame. Keys end in `.jsonl`, `.jsonl.gz` or
    /// `.jsonl.zst`.
    #[default]
    Jsonl,
    /// One Parquet file per object, one row per record (see `cfq_sinks::parquet`); the
    /// compression is the codec of its column chunks. Keys end in `.parquet`.
    Parquet,
}

impl Format {
    /// The name used in configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Jsonl => "jsonl",
            Format::Parquet => "parquet",
        }
    }

    /// The key suffix of an object in this format and compression (`.jsonl.zst`,
    /// `.parquet`).
    pub fn extension(self, compression: Compression) -> String {
        match self {
            Format::Jsonl => format!(".jsonl{}", compression.extension()),
            Format::Parquet => ".parquet".to_owned(),
        }
    }
}

/// The `[sink]` table for `type = "s3"`: records archived as objects in an S3-compatible
/// bucket (AWS S3, Cloudflare R2, MinIO, GCS through its S3 interface, ...).
///
/// Records are buffered and written as one object when the buffer reaches
/// `max_object_bytes`, when its first record is `max_object_age_secs` old, or at shutdown.
/// A record is confirmed (its lease acknowledged) only once the object holding it was
/// written completely.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// The bucket (required). It must exist: the sink does not create buckets.
    pub bucket: String,
    /// Key prefix, a template: `{queue_id}` and `{metadata.NAME}` expand per record
    /// (default empty). Objects go under `PREFIX dt=YYYY-MM-DD/hour=HH/` (UTC, from each
    /// record's timestamp), so query engines can prune by date. Usually ends in `/`.
    #[serde(default)]
    pub prefix: String,
    /// The service URL, for anything but AWS S3 itself: R2
    /// (`https://ACCOUNT.r2.cloudflarestorage.com`), MinIO, a local server. Paths are then
    /// addressed path-style (`ENDPOINT/BUCKET/KEY`). Without it, AWS S3 in `region`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The region (default `us-east-1`; R2 takes `auto`).
    #[serde(default = "default_region")]
    pub region: String,
    /// `jsonl` (default) or `parquet`.
    #[serde(default)]
    pub format: Format,
    /// `none`, `gzip` or `zstd` (default `zstd`). For `jsonl`, how the whole object is
    /// compressed; for `parquet`, the codec inside the file.
    #[serde(default = "default_compression")]
    pub compression: Compression,
    /// Size at which the buffered records are written out, in bytes of uncompressed JSON
    /// lines (an estimate for Parquet), 1 KiB..=5 GiB (default 64 MiB). This bounds the
    /// sink's memory, together with the bridge's `max_in_flight`: records wait in the
    /// buffer with their leases held, so `max_in_flight` must be large enough to fill an
    /// object, or objects are written by age only.
    #[serde(default = "default_max_object_bytes")]
    pub max_object_bytes: u64,
    /// Age of the oldest buffered record at which the buffer is written out, in seconds,
    /// 1..=3600 (default 20). A timer writes it even when no new record comes.
    #[serde(default = "default_max_object_age_secs")]
    pub max_object_age_secs: u64,
    /// Longest time one object upload may take, retries included, in seconds, 1..=3600
    /// (default 25). When it runs out, the object's records fail as transient and are
    /// retried.
    #[serde(default = "default_upload_timeout_secs")]
    pub upload_timeout_secs: u64,
    /// Accept a plain `http://` endpoint (default false). Only for a local server: over
    /// http the requests, though signed, travel unencrypted.
    #[serde(default)]
    pub allow_http: bool,
    /// A file holding the access key id (e.g. a mounted secret). Without it the
    /// environment variable `AWS_ACCESS_KEY_ID` is used.
    #[serde(default)]
    pub access_key_id_file: Option<PathBuf>,
    /// A file holding the secret access key. Without it the environment variable
    /// `AWS_SECRET_ACCESS_KEY` is used.
    #[serde(default)]
    pub secret_access_key_file: Option<PathBuf>,
}

fn default_region() -> String {
    DEFAULT_REGION.to_owned()
}

fn default_compression() -> Compression {
    Compression::Zstd
}

fn default_max_object_bytes() -> u64 {
    DEFAULT_MAX_OBJECT_BYTES
}

fn default_max_object_age_secs() -> u64 {
    DEFAULT_MAX_OBJECT_AGE_SECS
}

fn default_upload_timeout_secs() -> u64 {
    DEFAULT_UPLOAD_TIMEOUT_SECS
}

/// The credentials the sink signs its requests with. `Debug` shows neither secret.
#[derive(Clone)]
pub struct Credentials {
    /// The access key id.
    pub access_key_id: SecretString,
    /// The secret access key.
    pub secret_access_key: SecretString,
    /// A session token, for temporary credentials (`AWS_SESSION_TOKEN`).
    pub session_token: Option<SecretString>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &"[redacted]")
            .field("secret_access_key", &"[redacted]")
            .field(
                "session_token",
                &self.session_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// Why `check` refuses the timing of the settings: `max_object_age_secs` plus
/// `upload_timeout_secs` must fit in three quarters of the visibility timeout, leaving the
/// last quarter for pulling, settling and the ack call. Returns the message, naming the
/// values to change, or `None` when they fit.
pub fn timing_problem(
    max_object_age_secs: u64,
    upload_timeout_secs: u64,
    visibility_timeout_ms: u64,
) -> Option<String> {
    let needed_ms = max_object_age_secs
        .saturating_add(upload_timeout_secs)
        .saturating_mul(1000);
    let budget_ms = visibility_timeout_ms / 4 * 3;
    if needed_ms <= budget_ms {
        return None;
    }
    Some(format!(
        "sink.max_object_age_secs ({max_object_age_secs}) + sink.upload_timeout_secs \
         ({upload_timeout_secs}) = {} s does not fit in three quarters of the visibility \
         timeout ({visibility_timeout_ms} ms, so {} s): a record could wait for its object \
         past its lease and be delivered twice. Lower sink.max_object_age_secs (to at most \
         {} s with this upload timeout), or raise queue.visibility_timeout_ms to at least {}",
        needed_ms / 1000,
        budget_ms / 1000,
        (budget_ms / 1000).saturating_sub(upload_timeout_secs),
        needed_ms.div_ceil(3).saturating_mul(4),
    ))
}

impl S3Config {
    /// I/O-free checks; the error names the key (`sink.<key>`).
    pub fn check(&self) -> Result<(), SinkConfigError> {
        let invalid = |message: String| Err(SinkConfigError::Invalid(message));
        let bucket = self.bucket.as_str();
        if bucket.trim().is_empty() {
            return invalid("sink.bucket must not be empty".into());
        }
        if bucket.contains('/') || bucket.chars().any(char::is_whitespace) {
            return invalid(format!(
                "sink.bucket must be a bucket name, without '/' or spaces, got {bucket:?} \
                 (put key prefixes in sink.prefix)"
            ));
        }
        if self.prefix.starts_with('/') || self.prefix.contains("//") {
            return invalid(format!(
                "sink.prefix must not start with '/' or contain '//', got {:?}",
                self.prefix
            ));
        }
        if let Err(problem) = super::key::check_prefix(&self.prefix) {
            return invalid(format!("sink.prefix: {problem}"));
        }
        if let Some(endpoint) = &self.endpoint {
            if endpoint.starts_with("http://") {
                if !self.allow_http {
                    return invalid(format!(
                        "sink.endpoint {endpoint:?} is plain http: set sink.allow_http = true \
                         (only for a local server), or use https://"
                    ));
                }
            } else if !endpoint.starts_with("https://") {
                return invalid(format!(
                    "sink.endpoint must be an https:// URL (or http:// with sink.allow_http), \
                     got {endpoint:?}"
                ));
            }
        }
        if self.region.trim().is_empty() {
            return invalid("sink.region must not be empty (R2 takes \"auto\")".into());
        }
        if !(MIN_OBJECT_BYTES..=MAX_OBJECT_BYTES).contains(&self.max_object_bytes) {
            return invalid(format!(
                "sink.max_object_bytes must be from {MIN_OBJECT_BYTES} (1 KiB) to \
                 {MAX_OBJECT_BYTES} (5 GiB), got {}",
                self.max_object_bytes
            ));
        }
        if !(1..=3600).contains(&self.max_object_age_secs) {
            return invalid(format!(
                "sink.max_object_age_secs must be from 1 to 3600, got {}",
                self.max_object_age_secs
            ));
        }
        if !(1..=3600).contains(&self.upload_timeout_secs) {
            return invalid(format!(
                "sink.upload_timeout_secs must be from 1 to 3600, got {}",
                self.upload_timeout_secs
            ));
        }
        for (key, path) in [
            ("sink.access_key_id_file", &self.access_key_id_file),
            ("sink.secret_access_key_file", &self.secret_access_key_file),
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                return invalid(format!("{key} must not be empty"));
            }
        }
        Ok(())
    }

    /// Reads the credentials: each key from its `*_file` when set, else from
    /// `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN` when set).
    /// Surrounding whitespace is trimmed. Errors never quote a secret.
    pub fn credentials(&self) -> Result<Credentials, SinkError> {
        self.credentials_from(|name| std::env::var(name).ok())
    }

    /// [`S3Config::credentials`] with the environment given by `lookup`.
    pub fn credentials_from(
        &self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Credentials, SinkError> {
        let read = |file: &Option<PathBuf>, key: &str, env: &str| -> Result<SecretString, SinkError> {
            let (value, from) = match file {
                Some(path) => {
                    let value = std::fs::read_to_string(path).map_err(|e| {
                        SinkError::permanent(format!(
                            "cannot read {key} {}: {e}",
                            path.display()
                        ))
                    })?;
                    (value, format!("{key} {}", path.display()))
                }
                None => {
                    let value = lookup(env).ok_or_else(|| {
                        SinkError::permanent(format!(
                            "no credentials for the s3 sink: set the environment variables \
                             {ACCESS_KEY_ID_ENV} and {SECRET_ACCESS_KEY_ENV}, or \
                             sink.access_key_id_file and sink.secret_access_key_file \
                             ({env} is not set)"
                        ))
                    })?;
                    (value, format!("the environment variable {env}"))
                }
            };
            let value = value.trim();
            if value.is_empty() {
                return Err(SinkError::permanent(format!("{from} is empty")));
            }
            Ok(SecretString::from(value.to_owned()))
        };
        Ok(Credentials {
            access_key_id: read(
                &self.access_key_id_file,
                "sink.access_key_id_file",
                ACCESS_KEY_ID_ENV,
            )?,
            secret_access_key: read(
                &self.secret_access_key_file,
                "sink.secret_access_key_file",
                SECRET_ACCESS_KEY_ENV,
            )?,
            session_token: lookup(SESSION_TOKEN_ENV)
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .map(SecretString::from),
        })
    }
}

#[async_trait]
impl SinkSettings for S3Config {
    fn validate(&self) -> Result<(), SinkConfigError> {
        self.check()
    }

    async fn open(&self) -> Result<Box<dyn Sink>, SinkError> {
        super::open_boxed(self).await
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret as _;

    use super::*;

    fn config(extra: &str) -> S3Config {
        toml::from_str(&format!("bucket = \"b\"\n{extra}")).unwrap()
    }

    #[test]
    fn defaults() {
        let c = config("");
        assert_eq!(c.prefix, "");
        assert_eq!(c.region, "us-east-1");
        assert_eq!(c.format, Format::Jsonl);
        assert_eq!(c.compression, Compression::Zstd);
        assert_eq!(c.max_object_bytes, 64 * 1024 * 1024);
        assert_eq!(c.max_object_age_secs, 20);
        assert_eq!(c.upload_timeout_secs, 25);
        assert!(!c.allow_http);
        c.check().unwrap();
        // The defaults pass the timing rule with the bridge's default 60 s lease.
        assert_eq!(
            timing_problem(c.max_object_age_secs, c.upload_timeout_secs, 60_000),
            None
        );
        let p = config("format = \"parquet\"\ncompression = \"none\"");
        assert_eq!(p.format, Format::Parquet);
        assert_eq!(p.format.extension(p.compression), ".parquet");
        assert_eq!(Format::Jsonl.extension(Compression::Zstd), ".jsonl.zst");
        assert_eq!(Format::Jsonl.extension(Compression::None), ".jsonl");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (extra, key) in [
            ("prefix = \"/cf/\"", "sink.prefix"),
            ("prefix = \"cf//x\"", "sink.prefix"),
            ("prefix = \"cf/{queue}/\"", "sink.prefix"),
            ("prefix = \"cf/{queue_id\"", "sink.prefix"),
            ("endpoint = \"http://127.0.0.1:9000\"", "sink.allow_http"),
            ("endpoint = \"ftp://x\"", "sink.endpoint"),
            ("region = \"\"", "sink.region"),
            ("max_object_bytes = 1023", "sink.max_object_bytes"),
            ("max_object_bytes = 5368709121", "sink.max_object_bytes"),
            ("max_object_age_secs = 0", "sink.max_object_age_secs"),
            ("max_object_age_secs = 3601", "sink.max_object_age_secs"),
            ("upload_timeout_secs = 0", "sink.upload_timeout_secs"),
            ("access_key_id_file = \"\"", "sink.access_key_id_file"),
            ("secret_access_key_file = \"\"", "sink.secret_access_key_file"),
        ] {
            let error = config(extra).check().unwrap_err().to_string();
            assert!(error.contains(key), "{extra}: {error}");
        }
        for bucket in ["", "a/b", "a b"] {
            let c: S3Config = toml::from_str(&format!("bucket = {bucket:?}")).unwrap();
            let error = c.check().unwrap_err().to_string();
            assert!(error.contains("sink.bucket"), "{bucket:?}: {error}");
        }
        config("endpoint = \"http://127.0.0.1:9000\"\nallow_http = true")
            .check()
            .unwrap();
        config("endpoint = \"https://acc.r2.cloudflarestorage.com\"\nregion = \"auto\"")
            .check()
            .unwrap();
        // Unknown keys and inline secrets are refused at parse time.
        for extra in ["secret_access_key = \"s\"", "buckt = \"x\"", "format = \"csv\""] {
            assert!(
                toml::from_str::<S3Config>(&format!("bucket = \"b\"\n{extra}")).is_err(),
                "{extra}"
            );
        }
    }

    #[test]
    fn the_timing_rule_names_what_to_change() {
        // 20 + 25 = 45 s fits in 3/4 of 60 s; 46 s does not.
        assert_eq!(timing_problem(20, 25, 60_000), None);
        let problem = timing_problem(21, 25, 60_000).expect("too long");
        assert!(problem.contains("sink.max_object_age_secs"), "{problem}");
        assert!(problem.contains("queue.visibility_timeout_ms"), "{problem}");
        assert!(problem.contains("at most 20 s"), "{problem}");
        // 46 s needs 46 / 0.75 = 61.34 s, rounded up to whole milliseconds.
        assert!(problem.contains("at least 61336"), "{problem}");
        // The example (60 s objects) needs a longer lease than the default.
        assert!(timing_problem(60, 25, 60_000).is_some());
        assert_eq!(timing_problem(60, 25, 120_000), None);
        assert!(timing_problem(u64::MAX, u64::MAX, 43_200_000).is_some());
    }

    #[test]
    fn credentials_come_from_the_environment_or_files_and_stay_hidden() {
        let env = |name: &str| match name {
            "AWS_ACCESS_KEY_ID" => Some("AKID-env\n".to_owned()),
            "AWS_SECRET_ACCESS_KEY" => Some("SECRET-env".to_owned()),
            _ => None,
        };
        let creds = config("").credentials_from(env).unwrap();
        assert_eq!(creds.access_key_id.expose_secret(), "AKID-env");
        assert_eq!(creds.secret_access_key.expose_secret(), "SECRET-env");
        assert!(creds.session_token.is_none());
        let shown = format!("{creds:?}");
        assert!(!shown.contains("AKID-env") && !shown.contains("SECRET-env"), "{shown}");

        let error = config("").credentials_from(|_| None).unwrap_err();
        assert!(
            error.message.contains("AWS_ACCESS_KEY_ID")
                && error.message.contains("sink.access_key_id_file"),
            "{error}"
        );

        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("id");
        let secret = dir.path().join("secret");
        std::fs::write(&id, "AKID-file\n").unwrap();
        std::fs::write(&secret, "SECRET-file\n").unwrap();
        let c = config(&format!(
            "access_key_id_file = {}\nsecret_access_key_file = {}",
            toml::Value::String(id.display().to_string()),
            toml::Value::String(secret.display().to_string())
        ));
        let creds = c.credentials_from(|_| None).unwrap();
        assert_eq!(creds.secret_access_key.expose_secret(), "SECRET-file");
        assert!(!format!("{c:?}{creds:?}").contains("SECRET-file"));
        std::fs::write(&secret, "  \n").unwrap();
        let error = c.credentials_from(|_| None).unwrap_err();
        assert!(error.message.contains("is empty"), "{error}");
    }
}
