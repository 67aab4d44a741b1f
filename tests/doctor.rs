//! `cfq-bridge doctor` through the real binary, against the in-process emulator: a good
//! setup passes with every line `ok`; a visibility timeout shorter than Kafka's
//! `message.timeout.ms`, a queue without a pull consumer, a bad token and a token without
//! write permission each fail (exit 1) with a line saying what to change; a paused queue
//! only warns. Doctor never pulls, and never prints the token.
//!
//! The NATS test needs the shared server on 127.0.0.1:4222 (`bash .ci/start-nats.sh`), the
//! Kafka test the shared broker on 127.0.0.1:9092 (`bash .ci/start-kafka.sh`).

mod common;

use std::path::Path;
use std::time::Duration;

use cfq_emulator::{Emulator, EmulatorConfig, Endpoint, Faults, ScriptedResponse};

use common::{
    config_text, jsonl_config, jsonl_sink, queue_name, run_bridge, start_emulator_with,
    write_config, ACCOUNT, TOKEN,
};

/// An emulator that accepts [`TOKEN`], records requests, and gives every queue a
/// dead-letter queue (a good setup has one).
async fn emulator() -> Emulator {
    start_emulator_with(EmulatorConfig {
        tokens: vec![TOKEN.to_string()],
        record_requests: true,
        dead_letter_queue: Some("doctor-dlq".into()),
        ..EmulatorConfig::default()
    })
    .await
}

/// The doctor's output and exit code.
struct Doctor {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Doctor {
    /// The finding lines (every stdout line but the summary).
    fn findings(&self) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| !l.starts_with("doctor: "))
            .collect()
    }

    /// The one finding line holding every one of `parts`.
    fn line(&self, parts: &[&str]) -> &str {
        let found: Vec<&str> = self
            .findings()
            .into_iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .collect();
        assert_eq!(
            found.len(),
            1,
            "expected one line with {parts:?}:\n{}\nstderr:\n{}",
            self.stdout,
            self.stderr
        );
        found[0]
    }
}

async fn doctor(config: &Path) -> Doctor {
    doctor_with_token(config, TOKEN).await
}

async fn doctor_with_token(config: &Path, token: &str) -> Doctor {
    let mut cmd = common::bridge();
    cmd.env("CLOUDFLARE_API_TOKEN", token)
        .args(["doctor", "--config", config.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let output = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("doctor finished in time")
        .expect("doctor output");
    let doctor = Doctor {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    };
    let summary = doctor.stdout.lines().last().unwrap_or_default();
    assert!(
        summary.starts_with("doctor: "),
        "no summary line:\n{}\nstderr:\n{}",
        doctor.stdout,
        doctor.stderr
    );
    for line in doctor.findings() {
        assert!(
            ["ok    ", "warn  ", "fail  "]
                .iter()
                .any(|level| line.starts_with(level)),
            "not a finding line: {line:?}"
        );
    }
    doctor
}

/// Doctor made no pull (a pull would lease messages), only reads and empty acks.
fn assert_no_pull(emulator: &Emulator, queue: &str) {
    let requests = emulator.recorded_requests();
    assert!(!requests.is_empty(), "doctor made no API call");
    for request in &requests {
        assert!(
            matches!(
                request.endpoint,
                Some(Endpoint::QueueDetails) | Some(Endpoint::Ack)
            ),
            "doctor called {} {}",
            request.method,
            request.path
        );
        if request.endpoint == Some(Endpoint::Ack) {
            assert_eq!(
                request.body,
                Some(serde_json::json!({"acks": [], "retries": []})),
                "the ack probe must be empty"
            );
        }
    }
    assert_eq!(emulator.stats(ACCOUNT, queue).delivered, 0);
}

#[cfg(feature = "nats")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_setup_is_all_ok() {
    common::nats_server::require_shared_server();
    let emulator = emulator().await;
    let queue = queue_name("doctorgood");
    emulator.seed(ACCOUNT, &queue, &cfq_emulator::SeedSpec::default());
    let subject = format!("cfq.doctor.{queue}");
    let stream = format!("CFQ_DOCTOR_{queue}");
    let dir = tempfile::tempdir().unwrap();
    // The window covers the default lease (60 s) plus the largest retry delay (3,600 s).
    let config = write_config(
        dir.path(),
        &config_text(
            &emulator,
            &queue,
            "",
            &format!(
                "type = \"nats\"\nurl = \"{}\"\nsubject = \"{subject}\"\n\n\
                 [sink.create_stream]\nname = \"{stream}\"\nduplicate_window_secs = 7200\n\
                 storage = \"memory\"",
                common::nats_server::SHARED_URL
            ),
        ),
    );

    let out = doctor(&config).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    for line in out.findings() {
        assert!(line.starts_with("ok    "), "not ok: {line}\n{}", out.stdout);
    }
    out.line(&["API token found in CLOUDFLARE_API_TOKEN"]);
    out.line(&["Queues Read"]);
    out.line(&["Queues Write"]);
    out.line(&[
        "HTTP pull consumer",
        "max_retries 3",
        "dead_letter_queue doctor-dlq",
    ]);
    out.line(&[
        "queue.visibility_timeout_ms (60000 ms) covers the nats sink's",
        "sink.publish_timeout_ms",
    ]);
    out.line(&["the nats sink opens and passes `check`"]);
    out.line(&[&format!(
        "JetStream stream {stream} captures subject {subject}"
    )]);
    out.line(&["duplicate window (7200 s) covers"]);
    assert!(
        out.stdout.ends_with("0 warnings, 0 failures\n"),
        "{}",
        out.stdout
    );
    assert_no_pull(&emulator, &queue);
    assert_eq!(
        emulator.stats(ACCOUNT, &queue).backlog,
        10,
        "nothing consumed"
    );

    let client = async_nats::connect(common::nats_server::SHARED_URL)
        .await
        .unwrap();
    let _ = async_nats::jetstream::new(client)
        .delete_stream(&stream)
        .await;
}

#[cfg(feature = "kafka")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_visibility_timeout_below_the_kafka_message_timeout_fails() {
    use common::kafka_broker::{brokers, create_topic, require_broker, unique_topic};

    let brokers = brokers();
    require_broker(&brokers).await;
    let topic = unique_topic("doctor");
    create_topic(&brokers, &topic, 1).await;
    let emulator = emulator().await;
    let queue = queue_name("doctorkafka");
    let dir = tempfile::tempdir().unwrap();
    let sink = |timeout_ms: u64| {
        format!(
            "type = \"kafka\"\nbrokers = \"{brokers}\"\ntopic = \"{topic}\"\n\n\
             [sink.librdkafka_options]\n\"message.timeout.ms\" = {timeout_ms}"
        )
    };
    let config = write_config(
        dir.path(),
        &config_text(
            &emulator,
            &queue,
            "visibility_timeout_ms = 60000",
            &sink(300_000),
        ),
    );

    let out = doctor(&config).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let line = out.line(&["visibility_timeout_ms", "message.timeout.ms"]);
    assert!(line.starts_with("fail  "), "{line}");
    assert!(
        line.contains(
            "set queue.visibility_timeout_ms >= 330000 or lower \
             sink.librdkafka_options.\"message.timeout.ms\""
        ),
        "{line}"
    );
    // The rest of the setup is fine: the topic is there.
    out.line(&[&format!("kafka topic {topic:?}"), "exists"]);
    out.line(&["the kafka sink opens and passes `check`"]);
    assert!(out.stdout.ends_with(", 1 failures\n"), "{}", out.stdout);
    assert_no_pull(&emulator, &queue);

    // A timeout the lease covers passes that line.
    let config = write_config(
        dir.path(),
        &config_text(
            &emulator,
            &queue,
            "visibility_timeout_ms = 60000",
            &sink(20_000),
        ),
    );
    let out = doctor(&config).await;
    let line = out.line(&[
        "queue.visibility_timeout_ms (60000 ms)",
        "message.timeout.ms",
    ]);
    assert!(line.starts_with("ok    "), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_without_a_pull_consumer_fails_with_the_wrangler_command() {
    let emulator = emulator().await;
    let queue = queue_name("doctornopull");
    emulator.set_pull_consumer(ACCOUNT, &queue, false);
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_config(&emulator, &queue, "", dir.path());

    let out = doctor(&config).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let line = out.line(&["has no HTTP pull consumer"]);
    assert!(line.starts_with("fail  "), "{line}");
    assert!(
        line.contains(&format!("npx wrangler queues consumer http add {queue}")),
        "{line}"
    );
    // The token itself is fine, and so is the jsonl sink.
    out.line(&["Queues Read"]);
    out.line(&["Queues Write"]);
    out.line(&["the jsonl sink opens and passes `check`"]);
    assert!(out.stdout.ends_with(", 1 failures\n"), "{}", out.stdout);
    assert_no_pull(&emulator, &queue);

    // With the consumer attached again, the same config passes.
    emulator.set_pull_consumer(ACCOUNT, &queue, true);
    let out = doctor(&config).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.line(&["has an HTTP pull consumer"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_fails_without_printing_it() {
    let emulator = emulator().await;
    let queue = queue_name("doctortoken");
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_config(&emulator, &queue, "", dir.path());
    let secret = "cfq-doctor-wrong-token-5b1e";

    let out = doctor_with_token(&config, secret).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    let read = out.line(&["reading the queue's details was refused (HTTP 401)"]);
    assert!(read.starts_with("fail  "), "{read}");
    assert!(read.contains("\"Queues Read\""), "{read}");
    let write = out.line(&["an empty ack call was refused (HTTP 401)"]);
    assert!(write.contains("\"Queues Write\""), "{write}");
    assert!(
        !out.stdout.contains(secret) && !out.stderr.contains(secret),
        "the token was printed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(!out.stdout.contains(TOKEN) && !out.stderr.contains(TOKEN));
    assert_eq!(emulator.stats(ACCOUNT, &queue).delivered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_that_cannot_write_fails_on_the_empty_ack() {
    let emulator = emulator().await;
    let queue = queue_name("doctorreadonly");
    // What Cloudflare answers a token with Queues Read only.
    emulator.script(
        Endpoint::Ack,
        vec![ScriptedResponse::json(
            403,
            r#"{"success":false,"errors":[{"code":10000,"message":"Authentication error"}],"messages":[],"result":null}"#,
        )],
    );
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_config(&emulator, &queue, "", dir.path());

    let out = doctor(&config).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(out.line(&["Queues Read"]).starts_with("ok    "));
    let write = out.line(&["an empty ack call was refused (HTTP 403)"]);
    assert!(write.starts_with("fail  "), "{write}");
    assert!(
        write.contains("give the API token the \"Queues Write\" permission"),
        "{write}"
    );
    assert_no_pull(&emulator, &queue);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_and_a_missing_dead_letter_queue_only_warn() {
    let emulator = common::start_emulator().await;
    let queue = queue_name("doctorpaused");
    emulator.set_faults(Faults {
        paused_queues: vec![queue.clone()],
        ..Faults::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let config = jsonl_config(&emulator, &queue, "", dir.path());

    let out = doctor(&config).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    let paused = out.line(&["is paused"]);
    assert!(paused.starts_with("warn  "), "{paused}");
    assert!(
        paused.contains(&format!("npx wrangler queues resume-delivery {queue}")),
        "{paused}"
    );
    let dlq = out.line(&["has no dead-letter queue"]);
    assert!(dlq.starts_with("warn  "), "{dlq}");
    assert!(
        out.stdout.ends_with(" 2 warnings, 0 failures\n"),
        "{}",
        out.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_source_checks_its_files_and_the_sink() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("part-1.jsonl");
    common::archives::write_plain(&archive, &[common::record("a1").text("hello").build()]);
    let text = |paths: &str| {
        format!(
            "[archive]\npaths = [{paths}]\n\n[sink]\n{}\n",
            jsonl_sink(&dir.path().join("out.jsonl"))
        )
    };
    let quoted = |path: &Path| serde_json::to_string(&path.display().to_string()).unwrap();

    let config = write_config(dir.path(), &text(&quoted(&archive)));
    let out = doctor(&config).await;
    assert_eq!(out.code, Some(0), "{}\n{}", out.stdout, out.stderr);
    out.line(&["archive: 1 files readable"]);
    out.line(&["the jsonl sink opens and passes `check`"]);
    assert!(
        !out.stdout.contains("visibility_timeout_ms"),
        "an archive holds no lease:\n{}",
        out.stdout
    );

    let missing = dir.path().join("missing-*.jsonl");
    let config = write_config(dir.path(), &text(&quoted(&missing)));
    let out = doctor(&config).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert!(out.line(&["matches no file"]).starts_with("fail  "));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_one_fail_line() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "[queue]\naccount_id = \"a\"\nqueue_id = \"q\"\nbatchsize = 5\n",
    );
    let out = doctor(&config).await;
    assert_eq!(out.code, Some(1), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(out.findings().len(), 1, "{}", out.stdout);
    assert!(out.line(&["queue.batchsize"]).starts_with("fail  "));
    let help = run_bridge(&["doctor", "--help"], Duration::from_secs(30)).await;
    assert!(help.status.success());
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--config") && !help.contains("--token"),
        "{help}"
    );
}
