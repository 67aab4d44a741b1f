//! Every example in config/ parses and validates, and the documented config errors say
//! which key is wrong.

use std::path::Path;

use cfq_bridge::config::Config;

fn env(name: &str) -> Option<String> {
    match name {
        "CF_ACCOUNT_ID" => Some("023e105f4ecef8ad9ca31a8372d0c353".into()),
        "CF_QUEUE_ID" => Some("a1b2c3d4e5f60718293a4b5c6d7e8f90".into()),
        // Examples may only require these two; a `${NAME}` in a comment needs nothing.
        _ => None,
    }
}

#[test]
fn every_example_config_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("toml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let config =
            Config::from_toml(&text, env).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        // A replay destination has a [queue] and no [sink].
        seen.push(match (&config.sink, &config.archive) {
            (Some(sink), None) if config.queue.is_some() => sink.kind(),
            (Some(_), Some(_)) => "archive source",
            (None, _) => "replay destination",
            (Some(_), None) => unreachable!("a config without [queue] has [archive]"),
        });
    }
    for kind in [
        "stdout",
        "jsonl",
        "cloudflare_queue",
        "archive source",
        "replay destination",
    ] {
        assert!(
            seen.contains(&kind),
            "no example for the {kind} sink in config/"
        );
    }
}

#[test]
fn the_documented_contract_parses() {
    let text = r#"
[queue]
account_id = "acc"
queue_id = "q"
api_base_url = "https://api.cloudflare.com/client/v4"
batch_size = 100
visibility_timeout_ms = 60000
pullers = 4
max_in_flight = 2000

[sink]
type = "jsonl"
path = "archive/queue.jsonl"
"#;
    let c = Config::from_toml(text, |_| None).unwrap();
    assert_eq!(c.sink().unwrap().kind(), "jsonl");
}

/// The stdout example is for piping and debugging; it must not present a redirect to a
/// file as a way to keep messages (acknowledged lines there are never synced to disk).
#[test]
fn the_stdout_example_does_not_suggest_a_durable_export() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/stdout.toml");
    let text = std::fs::read_to_string(path).unwrap();
    for line in text.lines().filter(|l| l.trim_start().starts_with('#')) {
        assert!(
            !line.contains("> ") && !line.contains(">>"),
            "config/stdout.toml suggests redirecting stdout to a file: {line:?}"
        );
    }
    assert!(text.contains("Not a durable export"), "{text}");
    assert!(text.contains("jsonl sink"), "{text}");
}

const QUEUE: &str = r#"
[queue]
account_id = "acc"
queue_id = "q"
"#;

/// Settings that weaken delivery stop the config from loading, naming the key, unless
/// `allow_weaker_delivery = true` is in `[sink]`.
#[test]
fn weaker_delivery_is_refused_without_the_explicit_flag() {
    let cases = [
        (
            "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n",
            "[sink.librdkafka_options]\nacks = 1\n",
            "sink.librdkafka_options.\"acks\"",
        ),
        (
            "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n",
            "[sink.librdkafka_options]\n\"enable.idempotence\" = false\n",
            "sink.librdkafka_options.\"enable.idempotence\"",
        ),
        (
            "type = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\nmessage_timeout_ms = 50000000\n",
            "",
            "sink.message_timeout_ms",
        ),
        (
            "type = \"nats\"\nurl = \"nats://h:4222\"\nsubject = \"s\"\njetstream = false\n",
            "",
            "sink.jetstream",
        ),
    ];
    for (sink, options, key) in cases {
        let text = format!("{QUEUE}\n[sink]\n{sink}{options}");
        let error = Config::from_toml(&text, |_| None)
            .expect_err("a weaker delivery needs the flag")
            .to_string();
        assert!(
            error.contains(key) && error.contains("allow_weaker_delivery = true"),
            "{error}"
        );
        let allowed = format!("{QUEUE}\n[sink]\n{sink}allow_weaker_delivery = true\n{options}");
        let config = Config::from_toml(&allowed, |_| None)
            .unwrap_or_else(|e| panic!("allowed explicitly, yet: {e}"));
        assert_eq!(config.sink().unwrap().weakenings().len(), 1);
    }
}

/// A config for a sink left out of the build still loads; building it says how to rebuild.
#[cfg(not(feature = "kafka"))]
#[tokio::test]
async fn a_compiled_out_sink_parses_then_says_it_is_not_compiled_in() {
    let text = format!("{QUEUE}\n[sink]\ntype = \"kafka\"\nbrokers = \"b:9092\"\ntopic = \"t\"\n");
    let config = Config::from_toml(&text, |_| None).expect("parses in every build");
    let error = cfq_sinks::build(config.sink().unwrap())
        .await
        .err()
        .expect("no kafka here");
    assert!(
        error.message.contains("kafka support not compiled in"),
        "{error}"
    );
}
