//! docker-compose.yml (for users: these machines have no Docker engine) is parsed and
//! checked: Kafka in KRaft single-node mode, NATS with JetStream, topics created, and the
//! bridge built from the Dockerfile with ./config mounted and an existing config file.

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn compose() -> Yaml {
    let text = std::fs::read_to_string(root().join("docker-compose.yml"))
        .expect("docker-compose.yml exists at the repository root");
    let mut docs = YamlLoader::load_from_str(&text).expect("docker-compose.yml is valid YAML");
    assert_eq!(docs.len(), 1, "one YAML document");
    docs.remove(0)
}

/// A scalar as text (compose accepts numbers and booleans where it means strings).
fn text(value: &Yaml) -> Option<String> {
    match value {
        Yaml::String(s) | Yaml::Real(s) => Some(s.clone()),
        Yaml::Integer(i) => Some(i.to_string()),
        Yaml::Boolean(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A list of scalars (a YAML sequence) or one string split on spaces.
fn words(value: &Yaml) -> Vec<String> {
    match value {
        Yaml::Array(items) => items.iter().filter_map(text).collect(),
        other => text(other)
            .map(|s| s.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default(),
    }
}

fn env(service: &Yaml, name: &str) -> Option<String> {
    match &service["environment"] {
        Yaml::Hash(_) => text(&service["environment"][name]),
        Yaml::Array(items) => items.iter().filter_map(text).find_map(|entry| {
            entry
                .split_once('=')
                .filter(|(key, _)| *key == name)
                .map(|(_, value)| value.to_owned())
        }),
        _ => None,
    }
}

#[test]
fn has_kafka_nats_and_the_bridge() {
    let doc = compose();
    let services = doc["services"].as_hash().expect("a services map");
    for name in ["kafka", "nats", "bridge"] {
        assert!(
            services.contains_key(&Yaml::String(name.into())),
            "service {name} missing"
        );
    }
}

#[test]
fn kafka_runs_kraft_single_node_without_zookeeper() {
    let doc = compose();
    let kafka = &doc["services"]["kafka"];
    let image = text(&kafka["image"]).expect("kafka image");
    assert!(image.starts_with("apache/kafka:"), "{image}");
    let roles = env(kafka, "KAFKA_PROCESS_ROLES").expect("KAFKA_PROCESS_ROLES");
    assert!(
        roles.contains("broker") && roles.contains("controller"),
        "{roles}"
    );
    let voters = env(kafka, "KAFKA_CONTROLLER_QUORUM_VOTERS").expect("quorum voters");
    assert_eq!(voters.split(',').count(), 1, "single node: {voters}");
    assert!(env(kafka, "KAFKA_ZOOKEEPER_CONNECT").is_none());
    let advertised = env(kafka, "KAFKA_ADVERTISED_LISTENERS").expect("advertised listeners");
    assert!(advertised.contains("127.0.0.1:9092"), "{advertised}");
    assert_eq!(
        env(kafka, "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR").as_deref(),
        Some("1")
    );
    let ports = words(&kafka["ports"]);
    assert!(ports.iter().any(|p| p == "9092:9092"), "{ports:?}");
    assert!(ports.iter().any(|p| p == "4222:4222"), "{ports:?}");
    assert!(
        !kafka["healthcheck"].is_badvalue(),
        "kafka has a healthcheck"
    );
}

#[test]
fn topics_are_created_before_the_bridge_starts() {
    let doc = compose();
    let init = &doc["services"]["kafka-init"];
    let script = words(&init["command"]).join(" ");
    assert!(script.contains("kafka-topics.sh"), "{script}");
    assert!(
        script.contains("--create") && script.contains("--partitions 3"),
        "{script}"
    );
    assert!(
        script.contains("cf.$${CF_QUEUE_ID}"),
        "topic of config/kafka.toml: {script}"
    );
    assert_eq!(
        text(&doc["services"]["bridge"]["depends_on"]["kafka-init"]["condition"]).as_deref(),
        Some("service_completed_successfully")
    );
}

#[test]
fn nats_runs_with_jetstream() {
    let doc = compose();
    let nats = &doc["services"]["nats"];
    let image = text(&nats["image"]).expect("nats image");
    assert!(image.starts_with("nats:"), "{image}");
    let command = words(&nats["command"]);
    assert!(command.iter().any(|w| w == "-js"), "{command:?}");
}

#[test]
fn the_bridge_is_built_from_the_dockerfile_with_config_mounted() {
    let doc = compose();
    let bridge = &doc["services"]["bridge"];
    let context = text(&bridge["build"]["context"]).expect("build context");
    let dockerfile = text(&bridge["build"]["dockerfile"]).unwrap_or_else(|| "Dockerfile".into());
    let dockerfile = root().join(&context).join(dockerfile);
    let dockerfile_text = std::fs::read_to_string(&dockerfile)
        .unwrap_or_else(|e| panic!("{}: {e}", dockerfile.display()));
    assert!(dockerfile_text.contains("cargo build --release --locked"));
    assert!(dockerfile_text.contains("ENTRYPOINT [\"cfq-bridge\"]"));

    let volumes = words(&bridge["volumes"]);
    let mount = volumes
        .iter()
        .find(|v| v.starts_with("./config:"))
        .unwrap_or_else(|| panic!("./config not mounted: {volumes:?}"));
    let target = mount.split(':').nth(1).expect("mount target");
    assert_eq!(target, "/config");

    let command = words(&bridge["command"]);
    assert_eq!(
        command.first().map(String::as_str),
        Some("run"),
        "{command:?}"
    );
    let config_at = command
        .iter()
        .position(|w| w == "--config")
        .and_then(|i| command.get(i + 1))
        .expect("--config FILE");
    // "${CFQ_CONFIG:-/config/kafka.toml}": the default must be a file of ./config.
    let default = config_at
        .strip_prefix("${CFQ_CONFIG:-")
        .and_then(|s| s.strip_suffix('}'))
        .unwrap_or(config_at);
    let relative = default
        .strip_prefix("/config/")
        .unwrap_or_else(|| panic!("config outside the mount: {default}"));
    assert!(
        root().join("config").join(relative).is_file(),
        "config/{relative} does not exist"
    );
    assert!(
        env(bridge, "CLOUDFLARE_API_TOKEN").is_some(),
        "token passed through"
    );
    // The example configs use 127.0.0.1 addresses: the bridge shares kafka's namespace.
    assert_eq!(
        text(&bridge["network_mode"]).as_deref(),
        Some("service:kafka")
    );
}

#[test]
fn the_build_context_leaves_out_build_output_and_secrets() {
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).expect(".dockerignore");
    let lines: Vec<&str> = ignore.lines().map(str::trim).collect();
    for needed in ["target", ".git", ".env"] {
        assert!(lines.contains(&needed), "{needed} not in .dockerignore");
    }
}
