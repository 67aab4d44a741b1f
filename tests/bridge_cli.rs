//! Black-box tests of the `cfq-bridge` binary against the emulator: the 10,000-message
//! export, authentication failure, SIGTERM mid-run, config errors, the JSONL round trip of
//! every content type, and the torn-tail repair.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use base64::Engine as _;
use cfq_emulator::{ContentType, SeedSpec};
use common::*;
use serde_json::{json, Map, Value};

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_mixed_messages_into_jsonl_until_empty() {
    let emulator = start_emulator().await;
    let queue = queue_name("tenk");
    let mut ids = HashSet::new();
    for (content_type, size) in [
        (ContentType::Text, 200),
        (ContentType::Json, 300),
        (ContentType::Bytes, 100),
    ] {
        for _ in 0..2 {
            ids.extend(emulator.seed(
                ACCOUNT,
                &queue,
                &SeedSpec {
                    count: 10_000 / 6 + 1,
                    body_size: size,
                    content_type,
                },
            ));
        }
    }
    let total = ids.len();
    assert!(total >= 10_000);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("out/archive.jsonl");
    let config = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "", &jsonl_sink(&archive)),
    );
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(240),
    )
    .await;
    assert!(
        output.status.success(),
        "exit {:?}: {}",
        output.status,
        stderr(&output)
    );

    let lines = read_jsonl(&archive);
    let archived: HashSet<String> = lines
        .iter()
        .map(|l| l["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(archived, ids, "every id is in the archive");
    for line in &lines {
        let keys: Vec<&str> = line
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "id",
                "queue_id",
                "timestamp_ms",
                "attempts",
                "content_type",
                "metadata",
                "body"
            ]
        );
    }
    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.acked as usize, total, "every lease acked");
    assert_eq!(stats.backlog, 0);
    assert!(stats.never_acked_ids.is_empty());
    let checked = assert_requests_match_schema(&emulator);
    assert!(checked > 100, "only {checked} requests recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_token_stops_with_a_clear_message() {
    let emulator = start_emulator().await;
    let queue = queue_name("auth");
    emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count: 5,
            body_size: 10,
            content_type: ContentType::Text,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "", "type = \"stdout\""),
    );
    let child = bridge()
        .env("CLOUDFLARE_API_TOKEN", "wrong-token")
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
        .await
        .expect("a 401 must stop the bridge")
        .unwrap();
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(err.contains("authentication failed"), "{err}");
    assert!(err.contains("CLOUDFLARE_API_TOKEN"), "{err}");
    assert!(
        !err.contains("wrong-token"),
        "the token must not be logged: {err}"
    );
    assert_eq!(emulator.stats(ACCOUNT, &queue).acked, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_token_is_explained() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &config_text(&emulator, "q1", "", "type = \"stdout\""),
    );
    let child = bridge()
        .env_remove("CLOUDFLARE_API_TOKEN")
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(!output.status.success());
    assert!(stderr(&output).contains("CLOUDFLARE_API_TOKEN"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_run_acks_only_archived_records_and_exits_zero() {
    let emulator = start_emulator().await;
    let queue = queue_name("sigterm");
    let ids = seed_ids(&emulator, &queue, 30_000, 500, ContentType::Json);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("archive.jsonl");
    let config = write_config(
        dir.path(),
        &config_text(
            &emulator,
            &queue,
            "batch_size = 20\npullers = 2",
            &jsonl_sink(&archive),
        ),
    );
    let mut child = bridge()
        .args(["run", "--config", config.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "some records archived",
        Duration::from_secs(60),
        async || {
            std::fs::metadata(&archive)
                .map(|m| m.len() > 200_000)
                .unwrap_or(false)
        },
    )
    .await;
    let pid = child.id().unwrap().to_string();
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(kill.success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status:?}");

    let archived = archive_ids(&archive);
    assert!(!archived.is_empty());
    let stats = emulator.stats(ACCOUNT, &queue);
    assert_eq!(stats.in_flight, 0, "everything unconfirmed was released");
    let never_acked: HashSet<String> = stats.never_acked_ids.iter().cloned().collect();
    // Every acked message is in the archive (no ack before confirmation). Some must have
    // been acked, or the loop below checks nothing.
    let acked: Vec<&String> = ids.difference(&never_acked).collect();
    assert!(!acked.is_empty(), "nothing was acked before SIGTERM");
    for id in acked {
        assert!(archived.contains(id), "{id} acked but not archived");
    }
    assert!(
        !never_acked.is_empty(),
        "the run was stopped before the end"
    );

    // A second run picks up the rest.
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(240),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(archive_ids(&archive), ids);
    assert_eq!(emulator.stats(ACCOUNT, &queue).backlog, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_each_step() {
    let emulator = start_emulator().await;
    let dir = tempfile::tempdir().unwrap();
    let good = write_config(
        dir.path(),
        &config_text(&emulator, "checkq", "", "type = \"stdout\""),
    );
    let output = run_bridge(
        &["check", "--config", good.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .await;
    let out = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{out}\n{}", stderr(&output));
    assert!(
        out.contains("config: ok") && out.contains("API: ok") && out.contains("sink: ok"),
        "{out}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        config_text(&emulator, "checkq", "batchsize = 5", "type = \"stdout\""),
    )
    .unwrap();
    let output = run_bridge(
        &["check", "--config", bad.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("queue.batchsize"),
        "{}",
        stderr(&output)
    );

    let range = dir.path().join("range.toml");
    std::fs::write(
        &range,
        config_text(&emulator, "checkq", "batch_size = 500", "type = \"stdout\""),
    )
    .unwrap();
    let output = run_bridge(
        &["check", "--config", range.to_str().unwrap()],
        Duration::from_secs(30),
    )
    .await;
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("queue.batch_size"),
        "{}",
        stderr(&output)
    );

    let output = {
        let mut cmd = bridge();
        cmd.env("CLOUDFLARE_API_TOKEN", "nope");
        cmd.args(["check", "--config", good.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .unwrap()
    };
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("authentication failed"),
        "{}",
        stderr(&output)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_round_trip_of_every_content_type() {
    let emulator = start_emulator().await;
    let queue = queue_name("roundtrip");
    let b64 = base64::engine::general_purpose::STANDARD;
    let text = "héllo\nworld \"quoted\" \u{1F600}";
    let json_value = json!({"a": [1, 2.5, {"b": null}], "s": "line\nbreak", "u": "\u{e9}"});
    let bytes: Vec<u8> = (0..=255).collect();
    let meta = |ct: &str| {
        let mut m = Map::new();
        m.insert("CF-Content-Type".into(), Value::from(ct));
        m.insert("CF-sourceMessageSource".into(), Value::from("test"));
        m
    };
    let text_id = emulator.publish_raw(ACCOUNT, &queue, text, meta("text"));
    let json_id = emulator.publish_raw(
        ACCOUNT,
        &queue,
        &b64.encode(serde_json::to_vec_pretty(&json_value).unwrap()),
        meta("json"),
    );
    let bytes_id = emulator.publish_raw(ACCOUNT, &queue, &b64.encode(&bytes), meta("bytes"));
    // JSON with no line break is archived byte for byte: spacing, `1.50`, escapes and a
    // number beyond u64 survive (a re-serializing writer would change each).
    let exact_json = r#"{"b" : 1.50,"a":"\u00e9\/", "big":123456789012345678901234567890}"#;
    let exact_id = emulator.publish_raw(ACCOUNT, &queue, &b64.encode(exact_json), meta("json"));

    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("rt.jsonl");
    let config = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "", &jsonl_sink(&archive)),
    );
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(60),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    let lines = read_jsonl(&archive);
    assert_eq!(lines.len(), 4);
    let by_id = |id: &str| lines.iter().find(|l| l["id"] == id).unwrap().clone();

    let t = by_id(&text_id);
    assert_eq!(t["content_type"], "text");
    assert_eq!(t["body"], text);
    assert_eq!(t["metadata"]["CF-sourceMessageSource"], "test");
    assert_eq!(t["queue_id"], queue.as_str());
    assert_eq!(t["attempts"], 1);
    assert!(t["timestamp_ms"].as_u64().unwrap() > 1_600_000_000_000);

    let j = by_id(&json_id);
    assert_eq!(j["content_type"], "json");
    assert_eq!(j["body"], json_value, "json bodies are embedded as values");

    let b = by_id(&bytes_id);
    assert_eq!(b["content_type"], "bytes");
    assert_eq!(b64.decode(b["body"].as_str().unwrap()).unwrap(), bytes);

    let raw = std::fs::read_to_string(&archive).unwrap();
    let exact_line = raw
        .lines()
        .find(|l| l.contains(exact_id.as_str()))
        .expect("the exact-json line");
    assert!(
        exact_line.ends_with(&format!(",\"body\":{exact_json}}}")),
        "{exact_line}"
    );
    assert_eq!(emulator.stats(ACCOUNT, &queue).acked, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_torn_archive_tail_is_repaired_before_appending() {
    let emulator = start_emulator().await;
    let queue = queue_name("torn");
    let ids: HashSet<String> = emulator
        .seed(
            ACCOUNT,
            &queue,
            &SeedSpec {
                count: 50,
                body_size: 20,
                content_type: ContentType::Text,
            },
        )
        .into_iter()
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("torn.jsonl");
    std::fs::write(
        &archive,
        "{\"id\":\"earlier\",\"body\":\"kept\"}\n{\"id\":\"torn\",\"bo",
    )
    .unwrap();
    let config = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "", &jsonl_sink(&archive)),
    );
    let output = run_bridge(
        &["run", "--config", config.to_str().unwrap(), "--until-empty"],
        Duration::from_secs(60),
    )
    .await;
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(stderr(&output).contains("torn"), "the repair is logged");
    let mut archived = archive_ids(&archive);
    assert!(archived.remove("earlier"));
    assert!(!archived.contains("torn"));
    assert_eq!(archived, ids);
}

/// `cfq-bridge emulator` forwards to the emulator crate: it prints its address and serves
/// the queue API with the tokens it was given. (The command exists with the default
/// feature `emulator`.)
#[cfg(feature = "emulator")]
#[tokio::test]
async fn the_emulator_command_serves_the_queue_api() {
    use tokio::io::AsyncBufReadExt as _;

    let mut child = bridge()
        .args(["emulator", "--port", "0", "--token", TOKEN])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn cfq-bridge emulator");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(30),
        tokio::io::BufReader::new(stdout).read_line(&mut line),
    )
    .await
    .expect("the emulator prints its address in time")
    .expect("stdout is readable");
    let base_url = line
        .trim()
        .strip_prefix("cfq-bridge emulator listening on ")
        .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
        .to_owned();
    let queue_url = format!("{base_url}/accounts/{ACCOUNT}/queues/q");
    let http = reqwest::Client::new();

    let refused = http
        .post(format!("{queue_url}/messages/pull"))
        .bearer_auth("not-the-token")
        .json(&json!({}))
        .send()
        .await
        .expect("the emulator answers");
    assert_eq!(refused.status(), reqwest::StatusCode::UNAUTHORIZED);

    let published = http
        .post(format!("{queue_url}/messages"))
        .bearer_auth(TOKEN)
        .json(&json!({"body": "hello", "content_type": "text"}))
        .send()
        .await
        .expect("the emulator answers");
    assert_eq!(published.status(), reqwest::StatusCode::OK);
    let pulled: Value = http
        .post(format!("{queue_url}/messages/pull"))
        .bearer_auth(TOKEN)
        .json(&json!({}))
        .send()
        .await
        .expect("the emulator answers")
        .json()
        .await
        .expect("a JSON envelope");
    assert_eq!(pulled["success"], json!(true), "{pulled}");
    assert_eq!(pulled["result"]["messages"][0]["body"], "hello", "{pulled}");
    child.kill().await.expect("stop the emulator");
}
