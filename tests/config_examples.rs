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
        seen.push(config.sink.kind());
    }
    for kind in ["stdout", "jsonl"] {
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
    assert_eq!(c.sink.kind(), "jsonl");
}
