//! [`S3Sink`]: the buffer that concurrent deliveries share, the age timer and the uploads.
//!
//! Every record goes into the open object of its partition (`key::partition`). The open
//! objects are written together, each as one PUT, when their total reaches
//! `max_object_bytes`, when the oldest record in them is `max_object_age_secs` old (a timer
//! task, so this happens with no new record too), or at `close`. Each open object carries
//! a `watch` channel: every `deliver` call that put a record into it waits on that channel,
//! so several batches wait on one upload and all learn its result at once. The upload runs
//! in its own task: a `deliver` future that is dropped does not cancel it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt as _, PutPayload, RetryConfig};
use secrecy::ExposeSecret as _;
use tokio::sync::{watch, Notify};
use tracing::{debug, warn};

use super::config::{Format, S3Config};
use super::key;
use crate::compress::Compression;
use crate::{CheckContext, Outcome, Record, Sink, SinkError};
#[cfg(test)]
use crate::ErrorClass;

/// The result of one object's upload, once known.
type UploadResult = Option<Result<(), SinkError>>;

/// Records waiting for the PUT of the object that will hold them.
struct OpenObject {
    /// A number unique within the sink, to tell this object from a later one of the same
    /// partition.
    id: u64,
    /// JSON lines (format `jsonl`).
    lines: Vec<u8>,
    /// The records themselves (format `parquet`; `Record` clones share their bodies).
    rows: Vec<Record>,
    /// Number of records.
    count: usize,
    /// The smallest record timestamp, which starts the object's name.
    first_timestamp_ms: u64,
    /// Where the upload's result is published.
    done: watch::Sender<UploadResult>,
}

/// Every open object, and what the flush rules look at.
#[derive(Default)]
struct Buffer {
    /// Open objects by partition folder.
    objects: HashMap<String, OpenObject>,
    /// Their total size: uncompressed JSON lines, or an estimate for Parquet.
    bytes: u64,
    /// When the oldest record in them arrived; `None` while empty.
    since: Option<Instant>,
}

impl Buffer {
    /// Takes every open object out, leaving the buffer empty.
    fn take(&mut self) -> Vec<(String, OpenObject)> {
        self.bytes = 0;
        self.since = None;
        self.objects.drain().collect()
    }
}

/// What the sink and its tasks share.
struct Inner {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    format: Format,
    compression: Compression,
    max_object_bytes: u64,
    max_object_age: Duration,
    upload_timeout: Duration,
    /// Random hex, unique to this sink instance: the first half of each object's unique
    /// name part.
    instance: String,
    /// Numbers objects (the second half of the unique part, and [`OpenObject::id`]).
    sequence: AtomicU64,
    buffer: Mutex<Buffer>,
    /// Wakes the timer when the buffer goes from empty to not empty.
    opened: Notify,
}

/// The `s3` sink. See the module documentation of `cfq_sinks::s3`.
pub struct S3Sink {
    inner: Arc<Inner>,
    timer: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for S3Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Sink")
            .field("bucket", &self.inner.bucket)
            .field("prefix", &self.inner.prefix)
            .field("format", &self.inner.format)
            .field("compression", &self.inner.compression)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Sink {
    fn drop(&mut self) {
        self.timer.abort();
    }
}

/// Why a request failed, as far as it tells: the bucket is missing, the credentials are
/// refused, or anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    NoBucket,
    Denied,
    Other,
}

/// Reads an `object_store` failure. Its error kinds say `NotFound` / `PermissionDenied`
/// only for some requests (a failed list or PUT is `Generic`), so the S3 error code and
/// the HTTP status in the error text are read too.
fn refusal(error: &object_store::Error) -> Refusal {
    use object_store::Error as E;
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    let has = |needles: &[&str]| needles.iter().any(|n| text.contains(n));
    if has(&["NoSuchBucket"]) {
        return Refusal::NoBucket;
    }
    if matches!(error, E::PermissionDenied { .. } | E::Unauthenticated { .. })
        || has(&[
            "AccessDenied",
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "status code: 403",
            "status code: 401",
        ])
    {
        return Refusal::Denied;
    }
    // A PUT or a list answered 404: the bucket (not the key) is missing.
    if matches!(error, E::NotFound { .. }) || has(&["status code: 404"]) {
        return Refusal::NoBucket;
    }
    Refusal::Other
}

/// Classifies an `object_store` failure: a missing bucket, refused credentials and
/// malformed requests are permanent; everything else (timeouts, 5xx, connection refused)
/// is transient. The message names the bucket.
fn classify(error: &object_store::Error, bucket: &str) -> SinkError {
    use object_store::Error as E;
    match (refusal(error), error) {
        (Refusal::NoBucket, _) => SinkError::permanent(format!(
            "bucket {bucket:?} does not exist (check sink.bucket and sink.endpoint): {error}"
        )),
        (Refusal::Denied, _) => SinkError::permanent(format!(
            "access to bucket {bucket:?} denied: check the credentials (AWS_ACCESS_KEY_ID / \
             AWS_SECRET_ACCESS_KEY or sink.access_key_id_file / sink.secret_access_key_file) \
             and the bucket's permissions: {error}"
        )),
        (_, E::InvalidPath { .. } | E::NotSupported { .. } | E::NotImplemented { .. }) => {
            SinkError::permanent(format!("bucket {bucket:?} refused the request: {error}"))
        }
        _ => SinkError::transient(format!("writing to bucket {bucket:?} failed: {error}")),
    }
}

/// The object-store client for `config`'s bucket, endpoint and credentials (the sink's,
/// and what `cfq-bridge archive verify s3://...` reads with). Makes no request.
pub fn object_store_for(config: &S3Config) -> Result<AmazonS3, SinkError> {
    let credentials = config.credentials()?;
    let upload_timeout = Duration::from_secs(config.upload_timeout_secs);
    let mut builder = AmazonS3Builder::new()
        .with_bucket_name(&config.bucket)
        .with_region(&config.region)
        .with_access_key_id(credentials.access_key_id.expose_secret())
        .with_secret_access_key(credentials.secret_access_key.expose_secret())
        // The client options carry `allow_http` too: set it there, since they replace
        // the builder's whole set.
        .with_client_options(
            ClientOptions::new()
                .with_allow_http(config.allow_http)
                .with_timeout(upload_timeout)
                .with_connect_timeout(Duration::from_secs(5).min(upload_timeout)),
        )
        .with_retry(RetryConfig {
            retry_timeout: upload_timeout,
            ..RetryConfig::default()
        });
    if let Some(token) = &credentials.session_token {
        builder = builder.with_token(token.expose_secret());
    }
    if let Some(endpoint) = &config.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_virtual_hosted_style_request(false);
    }
    builder.build().map_err(|e| {
        SinkError::permanent(format!(
            "s3 sink for bucket {:?}: invalid settings: {e}",
            config.bucket
        ))
    })
}

impl S3Sink {
    /// Connects to the bucket: builds the client, reads the credentials, and lists the
    /// prefix once. A missing bucket or refused credentials fail here (permanent); an
    /// unreachable server is only logged, since deliveries retry until it is back.
    pub async fn open(config: &S3Config) -> Result<S3Sink, SinkError> {
        config.check()?;
        let upload_timeout = Duration::from_secs(config.upload_timeout_secs);
        let store = object_store_for(config)?;
        let instance = format!("{:08x}", rand::random::<u32>());
        let inner = Arc::new(Inner {
            store: Arc::new(store),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            format: config.format,
            compression: config.compression,
            max_object_bytes: config.max_object_bytes,
            max_object_age: Duration::from_secs(config.max_object_age_secs),
            upload_timeout,
            instance,
            sequence: AtomicU64::new(0),
            buffer: Mutex::new(Buffer::default()),
            opened: Notify::new(),
        });
        match inner.probe().await {
            Ok(()) => {}
            Err(error) if error.is_transient() => {
                warn!(bucket = %inner.bucket, %error, "s3 sink: bucket not reachable yet; deliveries will retry");
            }
            Err(error) => return Err(error),
        }
        let timer = tokio::spawn(age_timer(Arc::downgrade(&inner)));
        Ok(S3Sink { inner, timer })
    }

    /// The bucket the sink writes to.
    pub fn bucket(&self) -> &str {
        &self.inner.bucket
    }
}

/// Writes the buffer out whenever its oldest record reaches `max_object_age`. Ends when
/// the sink is gone.
async fn age_timer(inner: Weak<Inner>) {
    loop {
        let since = match inner.upgrade() {
            Some(inner) => {
                let since = inner.lock().since;
                if since.is_none() {
                    // `notify_one` keeps a permit when nobody waits, so an object opened
                    // between the look above and this wait still wakes the timer.
                    inner.opened.notified().await;
                    continue;
                }
                since.map(|since| since + inner.max_object_age)
            }
            None => return,
        };
        if let Some(due) = since {
            tokio::time::sleep_until(due.into()).await;
        }
        let Some(inner) = inner.upgrade() else { return };
        let due = {
            let mut buffer = inner.lock();
            if buffer
                .since
                .is_some_and(|since| since.elapsed() >= inner.max_object_age)
            {
                buffer.take()
            } else {
                Vec::new()
            }
        };
        for (partition, object) in due {
            inner.spawn_upload(partition, object);
        }
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // A panic while holding the lock leaves a buffer whose records are either still
        // waiting or already taken; both are consistent, so the poison is ignored.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists the prefix's fixed part once: the cheapest request that fails on a missing
    /// bucket or refused credentials.
    async fn probe(&self) -> Result<(), SinkError> {
        let fixed = self.prefix.split('{').next().unwrap_or_default();
        let fixed = fixed.rsplit_once('/').map_or("", |(dir, _)| dir);
        let prefix = (!fixed.is_empty()).then(|| Path::from(fixed));
        let listing = async {
            let mut list = self.store.list(prefix.as_ref());
            match list.next().await {
                Some(Err(error)) => Err(classify(&error, &self.bucket)),
                _ => Ok(()),
            }
        };
        match tokio::time::timeout(self.upload_timeout, listing).await {
            Ok(result) => result,
            Err(_) => Err(SinkError::transient(format!(
                "bucket {:?} did not answer within {} s",
                self.bucket,
                self.upload_timeout.as_secs()
            ))),
        }
    }

    /// Estimated size of a record in the buffer (Parquet).
    fn row_size(record: &Record) -> u64 {
        (record.body.len() + record.id.len() + record.queue_id.len() + 64 + 32 * record.metadata.len())
            as u64
    }

    /// Starts writing one object; its result goes to the object's `watch` channel.
    fn spawn_upload(self: &Arc<Self>, partition: String, object: OpenObject) {
        let inner = Arc::clone(self);
        tokio::spawn(async move {
            let sequence = inner.sequence.fetch_add(1, Ordering::Relaxed);
            let unique = format!("{}-{sequence:06}", inner.instance);
            let key = key::object_key(
                &partition,
                object.first_timestamp_ms,
                &unique,
                &inner.format.extension(inner.compression),
            );
            let OpenObject {
                lines,
                rows,
                count,
                done,
                ..
            } = object;
            let result = inner.upload(&key, lines, rows).await;
            match &result {
                Ok(()) => debug!(bucket = %inner.bucket, key, records = count, "object written"),
                Err(error) => warn!(
                    bucket = %inner.bucket,
                    key,
                    records = count,
                    %error,
                    "object not written; its records are not confirmed"
                ),
            }
            done.send_replace(Some(result));
        });
    }

    /// Encodes and PUTs one object, within the upload timeout.
    async fn upload(
        &self,
        key: &str,
        lines: Vec<u8>,
        rows: Vec<Record>,
    ) -> Result<(), SinkError> {
        let format = self.format;
        let compression = self.compression;
        let encoded = tokio::task::spawn_blocking(move || match format {
            Format::Jsonl => compression
                .encode(&lines)
                .map_err(|e| SinkError::transient(format!("compressing an object: {e}"))),
            Format::Parquet => crate::parquet::encode(&rows, compression)
                .map_err(|e| SinkError::permanent(format!("encoding a Parquet object: {e}"))),
        })
        .await
        .map_err(|e| SinkError::transient(format!("encoding task failed: {e}")))??;
        let path = Path::parse(key).map_err(|e| {
            SinkError::permanent(format!("object key {key:?} is not valid: {e}"))
        })?;
        let put = self.store.put(&path, PutPayload::from(encoded));
        match tokio::time::timeout(self.upload_timeout, put).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(error)) => Err(classify(&error, &self.bucket)),
            Err(_) => Err(SinkError::transient(format!(
                "upload of {key:?} to bucket {:?} timed out after {} s (sink.upload_timeout_secs)",
                self.bucket,
                self.upload_timeout.as_secs()
            ))),
        }
    }

    /// Waits for every upload in `waits`, then gives each of its records the result.
    async fn wait(
        waits: Vec<(watch::Receiver<UploadResult>, Vec<usize>)>,
        outcomes: &mut [Option<Outcome>],
    ) {
        for (mut done, indexes) in waits {
            let outcome = match done.wait_for(Option::is_some).await {
                Ok(result) => match result.as_ref() {
                    Some(Ok(())) => Outcome::Confirmed,
                    Some(Err(error)) => Outcome::Failed(error.clone()),
                    None => Outcome::Failed(SinkError::transient("upload result missing")),
                },
                // The sender is only dropped after sending; without a result, the
                // upload task itself was lost: nothing is confirmed.
                Err(_) => Outcome::Failed(SinkError::transient(
                    "the upload of this record's object was abandoned",
                )),
            };
            for index in indexes {
                outcomes[index] = Some(outcome.clone());
            }
        }
    }
}

#[async_trait]
impl Sink for S3Sink {
    fn kind(&self) -> &'static str {
        "s3"
    }

    async fn deliver(&self, records: &[Record]) -> Vec<Outcome> {
        let inner = &self.inner;
        let mut outcomes: Vec<Option<Outcome>> = vec![None; records.len()];
        // One entry per object this batch put records into: its channel and the records.
        let mut waits: Vec<(watch::Receiver<UploadResult>, Vec<usize>)> = Vec::new();
        let mut wait_of: HashMap<u64, usize> = HashMap::new();
        let mut full = Vec::new();
        let mut opened = false;
        {
            let mut buffer = inner.lock();
            for (index, record) in records.iter().enumerate() {
                let prefix = match record.expand_template(&inner.prefix) {
                    Ok(prefix) => prefix,
                    Err(problem) => {
                        outcomes[index] = Some(Outcome::Failed(SinkError::permanent(format!(
                            "sink.prefix: {problem}"
                        ))));
                        continue;
                    }
                };
                let partition = key::partition(&prefix, record.timestamp_ms);
                let mut line = Vec::new();
                let size = match inner.format {
                    Format::Jsonl => {
                        record.write_json_line(&mut line);
                        line.len() as u64
                    }
                    Format::Parquet => Inner::row_size(record),
                };
                if buffer.bytes > 0 && buffer.bytes + size > inner.max_object_bytes {
                    full.extend(buffer.take());
                }
                if buffer.since.is_none() {
                    buffer.since = Some(Instant::now());
                    opened = true;
                }
                buffer.bytes += size;
                let object = buffer.objects.entry(partition).or_insert_with(|| OpenObject {
                    id: inner.sequence.fetch_add(1, Ordering::Relaxed),
                    lines: Vec::new(),
                    rows: Vec::new(),
                    count: 0,
                    first_timestamp_ms: record.timestamp_ms,
                    done: watch::channel(None).0,
                });
                match inner.format {
                    Format::Jsonl => object.lines.extend_from_slice(&line),
                    Format::Parquet => object.rows.push(record.clone()),
                }
                object.count += 1;
                object.first_timestamp_ms = object.first_timestamp_ms.min(record.timestamp_ms);
                let slot = *wait_of.entry(object.id).or_insert_with(|| {
                    waits.push((object.done.subscribe(), Vec::new()));
                    waits.len() - 1
                });
                waits[slot].1.push(index);
            }
            if buffer.bytes >= inner.max_object_bytes {
                full.extend(buffer.take());
            }
        }
        if opened {
            inner.opened.notify_one();
        }
        for (partition, object) in full {
            inner.spawn_upload(partition, object);
        }
        Inner::wait(waits, &mut outcomes).await;
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.unwrap_or_else(|| {
                    Outcome::Failed(SinkError::transient("record was not buffered"))
                })
            })
            .collect()
    }

    async fn ready(&self) -> Result<(), SinkError> {
        self.inner.probe().await
    }

    async fn check(&self, ctx: &CheckContext) -> Result<Vec<String>, SinkError> {
        if let Some(problem) = super::timing_problem(
            self.inner.max_object_age.as_secs(),
            self.inner.upload_timeout.as_secs(),
            ctx.visibility_timeout_ms,
        ) {
            return Err(SinkError::permanent(problem));
        }
        self.inner.probe().await?;
        Ok(Vec::new())
    }

    async fn close(&self) -> Result<(), SinkError> {
        let pending = self.inner.lock().take();
        let mut waits = Vec::new();
        let mut count = 0;
        for (partition, object) in pending {
            waits.push((object.done.subscribe(), (count..count + object.count).collect()));
            count += object.count;
            self.inner.spawn_upload(partition, object);
        }
        let mut outcomes = vec![None; count];
        Inner::wait(waits, &mut outcomes).await;
        self.timer.abort();
        match outcomes.into_iter().flatten().find(|o| !o.is_confirmed()) {
            Some(Outcome::Failed(error)) => Err(error),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(text: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: text.to_owned().into(),
        }
    }

    #[test]
    fn failures_are_classified_and_name_the_bucket() {
        let cases = [
            (
                generic("Error performing list request: Server returned non-2xx status code: 404 Not Found: <Code>NoSuchBucket</Code>"),
                ErrorClass::Permanent,
                "does not exist",
            ),
            (
                object_store::Error::NotFound {
                    path: "k".into(),
                    source: "404".into(),
                },
                ErrorClass::Permanent,
                "does not exist",
            ),
            (
                generic("Server returned non-2xx status code: 403 Forbidden: <Code>SignatureDoesNotMatch</Code>"),
                ErrorClass::Permanent,
                "denied",
            ),
            (
                object_store::Error::PermissionDenied {
                    path: "k".into(),
                    source: "403".into(),
                },
                ErrorClass::Permanent,
                "denied",
            ),
            (
                generic("Error performing PUT http://127.0.0.1:1/b/k: tcp connect error: Connection refused"),
                ErrorClass::Transient,
                "failed",
            ),
            (
                generic("Server returned non-2xx status code: 503 Service Unavailable: <Code>SlowDown</Code>"),
                ErrorClass::Transient,
                "failed",
            ),
        ];
        for (error, class, words) in cases {
            let classified = classify(&error, "queue-archive");
            assert_eq!(classified.class, class, "{error}");
            assert!(
                classified.message.contains("\"queue-archive\"") && classified.message.contains(words),
                "{classified}"
            );
        }
    }
}
