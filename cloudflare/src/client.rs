//! The HTTP client for one queue: pull, ack, publish and queue details over pooled keep-alive
//! connections, bodies read with a size bound, every answer classified by
//! [`crate::error`]. TLS certificates are always verified.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::error::{classify_status, parse_retry_after, ApiError};
use crate::queue_details::QueueDetails;
use crate::wire::{
    envelope_result, parse_ack_response, parse_publish_response, parse_pull_response, AckRequest,
    AckResult, PublishBatchRequest, PublishResult, PullRequest, PullResult,
};

/// The Cloudflare Queues client for one queue.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `Bearer <token>`, marked sensitive; sent with each request, so that clients of
    /// several queues (and tokens) can share one connection pool.
    auth: HeaderValue,
    timeout: Duration,
    pull_url: String,
    ack_url: String,
    publish_batch_url: String,
    queue_url: String,
    max_response_bytes: usize,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("queue_url", &self.queue_url)
            .finish_non_exhaustive()
    }
}

/// How to build a [`Client`].
pub struct ClientOptions<'a> {
    /// API base URL, e.g. `https://api.cloudflare.com/client/v4`.
    pub base_url: &'a str,
    /// Account id.
    pub account_id: &'a str,
    /// Queue id.
    pub queue_id: &'a str,
    /// Bearer token.
    pub token: &'a SecretString,
    /// Timeout of one call, covering a slow or stalled body.
    pub request_timeout: Duration,
    /// Largest response accepted.
    pub max_response_bytes: usize,
    /// Keep-alive connections kept per host (at least the number of concurrent calls).
    pub pool_size: usize,
    /// A connection pool to share (see [`Client::pool`]); `None` builds one for this
    /// client alone.
    pub shared_pool: Option<&'a reqwest::Client>,
}

impl Client {
    /// Builds a client. TLS certificates are always verified.
    pub fn new(options: ClientOptions<'_>) -> Result<Client, ApiError> {
        let mut auth = HeaderValue::from_str(&format!("Bearer {}", options.token.expose_secret()))
            .map_err(|_| ApiError::Rejected {
                status: 0,
                message: "the API token contains characters not allowed in an HTTP header".into(),
            })?;
        // Keeps the token out of any debug output of the HTTP stack.
        auth.set_sensitive(true);
        let http = match options.shared_pool {
            Some(pool) => pool.clone(),
            None => Client::pool(options.pool_size)?,
        };
        let base = options.base_url.trim_end_matches('/');
        let queue_url = format!(
            "{base}/accounts/{}/queues/{}",
            options.account_id, options.queue_id
        );
        Ok(Client {
            http,
            auth,
            timeout: options.request_timeout,
            pull_url: format!("{queue_url}/messages/pull"),
            ack_url: format!("{queue_url}/messages/ack"),
            publish_batch_url: format!("{queue_url}/messages/batch"),
            queue_url,
            max_response_bytes: options.max_response_bytes,
        })
    }

    /// A connection pool for clients of one or more queues: keep-alive connections, at
    /// most `pool_size` idle per host. The token and the timeout are set per client.
    pub fn pool(pool_size: usize) -> Result<reqwest::Client, ApiError> {
        reqwest::Client::builder()
            .user_agent(concat!("cfq-bridge/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(pool_size.max(1))
            .tcp_nodelay(true)
            .https_only(false)
            .build()
            .map_err(|e| ApiError::Transport(format!("building the HTTP client: {e}")))
    }

    /// Pulls a batch of messages.
    pub async fn pull(&self, request: PullRequest) -> Result<PullResult, ApiError> {
        let builder = self.http.post(&self.pull_url).json(&request);
        let (status, body) = self.send(builder).await?;
        parse_pull_response(status, &body)
    }

    /// Acknowledges and releases leases in one call.
    pub async fn ack(&self, request: &AckRequest) -> Result<AckResult, ApiError> {
        let builder = self.http.post(&self.ack_url).json(request);
        let (status, body) = self.send(builder).await?;
        parse_ack_response(status, &body)
    }

    /// Publishes a batch of messages in one call (`POST .../messages/batch`). `Ok` only
    /// when the answer's envelope said `success: true`: only then are the messages in the
    /// queue. Every other answer is an [`ApiError`] saying what to do next: wait
    /// (`RateLimited`, with the `Retry-After` delay), back off and retry (`Server`,
    /// `Malformed`, `Transport`: the call may or may not have been applied, so a retry can
    /// publish duplicates, never lose a message), or stop (`Auth`, `NotFound`, `Rejected`).
    ///
    /// The caller keeps the batch within the API's limits
    /// ([`crate::wire::MAX_PUBLISH_BATCH_MESSAGES`], [`crate::wire::MAX_PUBLISH_BATCH_BYTES`],
    /// [`crate::wire::MAX_PUBLISH_MESSAGE_BYTES`]); the API refuses a batch beyond them.
    pub async fn publish_batch(
        &self,
        request: &PublishBatchRequest<'_>,
    ) -> Result<PublishResult, ApiError> {
        let builder = self.http.post(&self.publish_batch_url).json(request);
        let (status, body) = self.send(builder).await?;
        parse_publish_response(status, &body)
    }

    /// Fetches the queue's details (name, consumers and their settings).
    pub async fn queue_details(&self) -> Result<Value, ApiError> {
        let (status, body) = self.send(self.http.get(&self.queue_url)).await?;
        envelope_result(status, &body)
    }

    /// Fetches the queue's details and reads them leniently (see [`QueueDetails`]).
    pub async fn parsed_queue_details(&self) -> Result<QueueDetails, ApiError> {
        Ok(QueueDetails::from_result(&self.queue_details().await?))
    }

    /// An ack call with empty `acks` and `retries`: it needs the same permission as a
    /// real ack (Queues Write) and touches no message. For preflight checks; pulling
    /// instead would lease messages.
    pub async fn probe_ack(&self) -> Result<AckResult, ApiError> {
        self.ack(&AckRequest::default()).await
    }

    /// Sends a request and reads the body, bounded in size. Classifies HTTP errors.
    async fn send(&self, builder: reqwest::RequestBuilder) -> Result<(u16, Vec<u8>), ApiError> {
        let mut response = builder
            .header(AUTHORIZATION, self.auth.clone())
            .timeout(self.timeout)
            .send()
            .await
            .map_err(transport_error)?;
        let status = response.status();
        let retry_after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        let is_html = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("html"));
        if let Some(len) = response.content_length() {
            if len as usize > self.max_response_bytes {
                return Err(ApiError::Malformed {
                    status: status.as_u16(),
                    detail: format!(
                        "response of {len} bytes exceeds queue.max_response_bytes ({})",
                        self.max_response_bytes
                    ),
                });
            }
        }
        // Sized up front when the length is known, so the body is copied once.
        let mut body = Vec::with_capacity(response.content_length().unwrap_or(0) as usize);
        while let Some(chunk) = response.chunk().await.map_err(transport_error)? {
            if body.len() + chunk.len() > self.max_response_bytes {
                return Err(ApiError::Malformed {
                    status: status.as_u16(),
                    detail: format!(
                        "response exceeds queue.max_response_bytes ({})",
                        self.max_response_bytes
                    ),
                });
            }
            body.extend_from_slice(&chunk);
        }
        classify_status(status, retry_after, is_html, &body)?;
        Ok((status.as_u16(), body))
    }
}

fn transport_error(e: reqwest::Error) -> ApiError {
    let what = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the response body was cut off"
    } else {
        "request failed"
    };
    // `without_url` keeps the message short; the URL carries no secret either way.
    let mut source = String::new();
    let mut err: Option<&dyn std::error::Error> = std::error::Error::source(&e);
    while let Some(inner) = err {
        source = format!("{source}: {inner}");
        err = inner.source();
    }
    ApiError::Transport(format!("{what}{source}"))
}
