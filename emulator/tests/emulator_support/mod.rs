//! Helpers shared by the emulator's black-box tests: start an emulator on a free loopback
//! port and talk to it over HTTP, as a client would, or (for tests under a paused tokio
//! clock) through its in-process API with the same request bodies.

#![allow(dead_code)]

use std::time::Duration;

use cfq_emulator::{start, Emulator, EmulatorConfig, Endpoint};
use reqwest::header::HeaderMap;
use reqwest::StatusCode;
use serde_json::{json, Value};

/// Account id used by the tests.
pub const ACCOUNT: &str = "023e105f4ecef8ad9ca31a8372d0c353";
/// The token the tests' emulators accept.
pub const TOKEN: &str = "test-token";

/// A started emulator and an HTTP client for it.
pub struct Harness {
    pub emulator: Emulator,
    pub http: reqwest::Client,
    pub token: Option<String>,
    /// Whether [`Harness::post`] (and so `pull`, `ack`, `publish_text`) calls the emulator
    /// in process ([`Emulator::request`]) instead of over HTTP.
    pub in_process: bool,
}

/// An answer: status, headers, raw body, and the body as JSON (`Null` if not JSON).
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub raw: Vec<u8>,
    pub json: Value,
}

impl Answer {
    /// The `result` of a successful envelope, after checking the envelope's shape.
    pub fn result(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "expected 200, got {self:?}");
        assert_envelope(&self.json, true);
        &self.json["result"]
    }

    /// The first error `(code, message)` of a failure envelope, after checking its shape.
    pub fn error(&self) -> (u64, String) {
        assert_envelope(&self.json, false);
        let error = &self.json["errors"][0];
        (
            error["code"].as_u64().expect("error code"),
            error["message"].as_str().expect("error message").to_owned(),
        )
    }
}

/// Checks Cloudflare's envelope: `success`, `errors`, `messages`, `result`.
pub fn assert_envelope(body: &Value, success: bool) {
    assert_eq!(body["success"], json!(success), "envelope: {body}");
    assert!(body["errors"].is_array(), "errors must be an array: {body}");
    assert!(
        body["messages"].is_array(),
        "messages must be an array: {body}"
    );
    assert!(
        body.get("result").is_some(),
        "result must be present: {body}"
    );
    if success {
        assert_eq!(body["errors"], json!([]), "{body}");
    } else {
        let errors = body["errors"].as_array().unwrap();
        assert!(!errors.is_empty(), "a failure needs an error: {body}");
        for error in errors {
            assert!(error["code"]
                .as_u64()
                .is_some_and(|c| c >= 1000 || c == 971));
            assert!(error["message"].is_string());
        }
    }
}

impl Harness {
    /// Starts an emulator accepting [`TOKEN`] with `config` otherwise.
    pub async fn start(mut config: EmulatorConfig) -> Harness {
        if config.tokens.is_empty() {
            config.tokens = vec![TOKEN.to_owned()];
        }
        let emulator = start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .expect("the emulator starts on a free loopback port");
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        Harness {
            emulator,
            http,
            token: Some(TOKEN.to_owned()),
            in_process: false,
        }
    }

    /// Starts an emulator whose queue API calls made through [`Harness::post`] skip HTTP
    /// (for tests under a paused tokio clock, which an HTTP round trip would let jump).
    pub async fn in_process(config: EmulatorConfig) -> Harness {
        Harness {
            in_process: true,
            ..Harness::start(config).await
        }
    }

    /// Starts an emulator with the default configuration (plus [`TOKEN`]).
    pub async fn default() -> Harness {
        Harness::start(EmulatorConfig::default()).await
    }

    /// The base URL (`http://127.0.0.1:PORT/client/v4`).
    pub fn base(&self) -> String {
        self.emulator.base_url()
    }

    /// The queue URL prefix for `queue`.
    pub fn queue_url(&self, queue: &str) -> String {
        format!("{}/accounts/{ACCOUNT}/queues/{queue}", self.base())
    }

    /// Sends a request with the harness token and returns the answer.
    pub async fn send(&self, method: reqwest::Method, url: &str, body: Option<&str>) -> Answer {
        let mut request = self.http.request(method, url);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_owned());
        }
        let response = request.send().await.expect("the emulator answers");
        let status = response.status();
        let headers = response.headers().clone();
        let raw = response.bytes().await.expect("a complete body").to_vec();
        let json = serde_json::from_slice(&raw).unwrap_or(Value::Null);
        Answer {
            status,
            headers,
            raw,
            json,
        }
    }

    /// POSTs JSON to `{queue_url}{suffix}` (in process when [`Harness::in_process`]).
    pub async fn post(&self, queue: &str, suffix: &str, body: &Value) -> Answer {
        if self.in_process {
            let endpoint = match suffix {
                "/messages" => Endpoint::Publish,
                "/messages/batch" => Endpoint::PublishBatch,
                "/messages/pull" => Endpoint::Pull,
                "/messages/ack" => Endpoint::Ack,
                other => panic!("no in-process endpoint for POST {other}"),
            };
            let answer =
                self.emulator
                    .request(endpoint, ACCOUNT, queue, body.to_string().as_bytes());
            let json = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
            return Answer {
                status: StatusCode::from_u16(answer.status).expect("a valid status"),
                headers: HeaderMap::new(),
                raw: answer.body,
                json,
            };
        }
        let url = format!("{}{suffix}", self.queue_url(queue));
        self.send(reqwest::Method::POST, &url, Some(&body.to_string()))
            .await
    }

    /// Pulls and returns the `result` (asserting a 200 envelope).
    pub async fn pull(&self, queue: &str, body: Value) -> Value {
        self.post(queue, "/messages/pull", &body)
            .await
            .result()
            .clone()
    }

    /// Acks and retries; returns the `result`.
    pub async fn ack(&self, queue: &str, acks: &[&str], retries: &[(&str, f64)]) -> Value {
        let acks: Vec<Value> = acks.iter().map(|l| json!({ "lease_id": l })).collect();
        let retries: Vec<Value> = retries
            .iter()
            .map(|(l, d)| json!({ "lease_id": l, "delay_seconds": d }))
            .collect();
        self.post(
            queue,
            "/messages/ack",
            &json!({ "acks": acks, "retries": retries }),
        )
        .await
        .result()
        .clone()
    }

    /// Publishes one text message.
    pub async fn publish_text(&self, queue: &str, body: &str) {
        self.post(
            queue,
            "/messages",
            &json!({ "body": body, "content_type": "text" }),
        )
        .await
        .result();
    }

    /// GETs an admin path (`/_emulator/...`) and returns the JSON.
    pub async fn admin_get(&self, path: &str) -> (StatusCode, Value) {
        let url = format!("http://{}/_emulator/{path}", self.emulator.addr());
        let response = self.http.get(url).send().await.expect("admin answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// Sends JSON to an admin path with `method` and returns the JSON answer.
    pub async fn admin_send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> (StatusCode, Value) {
        let url = format!("http://{}/_emulator/{path}", self.emulator.addr());
        let response = self
            .http
            .request(method, url)
            .json(body)
            .send()
            .await
            .expect("admin answers");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }
}

/// Lease ids of the messages of a pull result.
pub fn leases(result: &Value) -> Vec<String> {
    result["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["lease_id"].as_str().expect("lease_id").to_owned())
        .collect()
}

/// Ids of the messages of a pull result.
pub fn ids(result: &Value) -> Vec<String> {
    result["messages"]
        .as_array()
        .expect("messages array")
        .iter()
        .map(|m| m["id"].as_str().expect("id").to_owned())
        .collect()
}

/// Loads Cloudflare's schema (dereferenced variant), vendored in the workspace's tests/fixtures/openapi.
pub fn openapi() -> Value {
    let text =
        include_str!("../../../tests/fixtures/openapi/queues-messages.dereferenced.openapi.json");
    serde_json::from_str(text).expect("the schema is JSON")
}

/// The errors of `instance` against the schema of `path`'s POST response for `status`
/// ("200" or "4XX"); empty when it conforms.
pub fn schema_errors(spec: &Value, path: &str, status: &str, instance: &Value) -> Vec<String> {
    let schema =
        &spec["paths"][path]["post"]["responses"][status]["content"]["application/json"]["schema"];
    assert!(schema.is_object(), "no {status} schema for {path}");
    let validator = jsonschema::validator_for(schema).expect("the schema compiles");
    validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

/// Checks `instance` against the schema of `path`'s POST response for `status`.
pub fn assert_matches_schema(spec: &Value, path: &str, status: &str, instance: &Value) {
    let errors = schema_errors(spec, path, status, instance);
    assert!(
        errors.is_empty(),
        "{path} {status} answer does not match Cloudflare's schema: {errors:?}\n{instance}"
    );
}
