//! The deployment files under `deploy/`, checked offline:
//!
//! - every Kubernetes manifest of a built-in kind passes the Kubernetes JSON schemas in
//!   strict mode (unknown fields rejected), through PyPI's `kubernetes-validate` (pinned in
//!   `tests/python/requirements.txt`), for the oldest and newest Kubernetes we aim at;
//! - the custom resources that tool has no schema for (KEDA's `ScaledObject`, the
//!   Prometheus operator's `ServiceMonitor`) pass a structural checker of our own, written
//!   from the fields those projects document, which rejects unknown keys and wrong types;
//!   the checker is itself tested on broken copies;
//! - the pieces agree: the ConfigMap's TOML loads with the bridge's own config loader and
//!   the environment the pod gets, the probes and the Service use the port of its
//!   `[metrics] listen`, the writable paths are on emptyDirs, the shutdown fits the grace
//!   period, and the token only ever comes from the Secret;
//! - the systemd unit passes `systemd-analyze verify` and a structural check, and never
//!   carries a secret on its command line.
//!
//! Needs `python3` with `pip install -r tests/python/requirements.txt` (`.ci/test` does
//! it); without them the schema test fails and says so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use cfq_bridge::config::{read_token, Config, TOKEN_ENV};
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn kube_dir() -> PathBuf {
    root().join("deploy/kubernetes")
}

/// Every YAML file under `deploy/kubernetes/`, in name order, with its documents.
fn manifests() -> Vec<(PathBuf, Vec<Yaml>)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(kube_dir())
        .expect("deploy/kubernetes exists")
        .map(|entry| entry.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests under deploy/kubernetes");
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).unwrap();
            let docs = YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", path.display()));
            (path, docs)
        })
        .collect()
}

/// The one resource of `kind` under `deploy/kubernetes/`.
fn resource(kind: &str) -> Yaml {
    let mut found: Vec<Yaml> = manifests()
        .into_iter()
        .flat_map(|(_, docs)| docs)
        .filter(|doc| doc["kind"].as_str() == Some(kind))
        .collect();
    assert_eq!(found.len(), 1, "expected exactly one {kind}");
    found.remove(0)
}

fn load(text: &str) -> Yaml {
    let mut docs = YamlLoader::load_from_str(text).expect("valid YAML");
    assert_eq!(docs.len(), 1);
    docs.remove(0)
}

fn string<'a>(value: &'a Yaml, what: &str) -> &'a str {
    value
        .as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {value:?}"))
}

fn list<'a>(value: &'a Yaml, what: &str) -> &'a [Yaml] {
    value
        .as_vec()
        .unwrap_or_else(|| panic!("{what} is not a list: {value:?}"))
}

/// A string → string map (labels, selectors).
fn labels(value: &Yaml) -> BTreeMap<String, String> {
    value
        .as_hash()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (string(k, "a label").into(), string(v, "a label").into()))
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// The Kubernetes schemas (kubernetes-validate).

/// Kinds that `kubernetes-validate` must check against the Kubernetes schemas.
const BUILT_IN_KINDS: &[&str] = &["ConfigMap", "Deployment", "Secret", "Service"];
/// Kinds it has no schema for, each checked by a test below instead.
const CUSTOM_KINDS: &[&str] = &["Kustomization", "ScaledObject", "ServiceMonitor"];
/// The Kubernetes versions validated against: the oldest we aim to support and the newest
/// the pinned kubernetes-validate knows.
const KUBERNETES_VERSIONS: &[&str] = &["1.29.0", "1.37.0"];

/// Runs `kubernetes-validate --strict` on `files`; returns (success, stdout + stderr).
fn kubernetes_validate(files: &[PathBuf]) -> (bool, String) {
    let mut command = Command::new("python3");
    command.args(["-m", "kubernetes_validate", "--strict"]);
    for version in KUBERNETES_VERSIONS {
        command.args(["-k", version]);
    }
    let output = command.args(files).output().unwrap_or_else(|e| {
        panic!(
            "python3 is not available ({e}); install Python 3, then \
             `pip install -r tests/python/requirements.txt`"
        )
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !text.contains("No module named kubernetes_validate"),
        "kubernetes-validate is not installed: `pip install -r tests/python/requirements.txt`"
    );
    (output.status.success(), text)
}

#[test]
fn built_in_kinds_pass_the_kubernetes_schemas_strictly() {
    let manifests = manifests();
    let files: Vec<PathBuf> = manifests.iter().map(|(p, _)| p.clone()).collect();
    let (ok, output) = kubernetes_validate(&files);
    assert!(ok, "kubernetes-validate refused a manifest:\n{output}");
    assert!(!output.contains("ERROR"), "{output}");

    let mut kinds = BTreeSet::new();
    for (path, docs) in &manifests {
        let file = path.display().to_string();
        for doc in docs {
            let kind = string(&doc["kind"], "kind");
            kinds.insert(kind.to_string());
            if BUILT_IN_KINDS.contains(&kind) {
                let name = string(&doc["metadata"]["name"], "metadata.name");
                // A misspelt apiVersion or kind would only be warned about ("no schema"):
                // each built-in resource must have really passed, for every version.
                for version in KUBERNETES_VERSIONS {
                    let minor = version.rsplit_once('.').unwrap().0;
                    let passed = format!(
                        "INFO {file} passed for resource {}/{name} against version {minor}",
                        kind.to_lowercase()
                    );
                    assert!(
                        output.lines().any(|l| l == passed),
                        "{kind} {name} was not validated against {minor}:\n{output}"
                    );
                }
            } else {
                assert!(
                    CUSTOM_KINDS.contains(&kind),
                    "{file}: kind {kind} is checked by nothing: add it to BUILT_IN_KINDS or give it a structural check"
                );
                assert!(
                    output
                        .lines()
                        .any(|l| l.starts_with(&format!("WARN {file} ")) && l.contains(kind)),
                    "{kind} should be reported as having no built-in schema:\n{output}"
                );
            }
        }
    }
    for kind in [
        "ConfigMap",
        "Deployment",
        "Secret",
        "Service",
        "ScaledObject",
        "ServiceMonitor",
    ] {
        assert!(kinds.contains(kind), "no {kind} under deploy/kubernetes");
    }
}

/// The validator is strict: an unknown field and a wrong type fail it. Without
/// `--strict` the first would pass.
#[test]
fn the_schema_validation_rejects_unknown_fields_and_wrong_types() {
    let deployment = std::fs::read_to_string(kube_dir().join("deployment.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "readOnlyRootFilesystem: true",
            "readOnlyRootFS: true",
            "'readOnlyRootFS' was unexpected",
        ),
        (
            "terminationGracePeriodSeconds: 75",
            "terminationGracePeriodSeconds: \"75\"",
            "is not of type 'integer'",
        ),
    ];
    for (i, (from, to, expected)) in cases.iter().enumerate() {
        assert!(deployment.contains(from), "deployment.yaml has no {from:?}");
        let path = dir.path().join(format!("broken{i}.yaml"));
        std::fs::write(&path, deployment.replacen(from, to, 1)).unwrap();
        let (ok, output) = kubernetes_validate(&[path]);
        assert!(!ok, "a deployment with {to:?} passed:\n{output}");
        assert!(output.contains(expected), "{output}");
    }
}

// ---------------------------------------------------------------------------------------
// A structural checker for the custom resources.

/// The expected form of a YAML value. Objects are closed: a key they do not list is an
/// error, as in the projects' CRD schemas. The field lists hold the documented fields a
/// bridge deployment may plausibly use; a manifest that needs another documented field
/// adds it here.
enum Shape {
    Str,
    /// A string that parses as a positive number (KEDA's metadata values are strings).
    NumberStr,
    /// A Prometheus duration (`30s`, `1m30s`).
    Duration,
    /// One of these strings.
    OneOf(&'static [&'static str]),
    /// An integer of at least this value.
    Int(i64),
    Bool,
    /// A port: a number or a name.
    IntOrStr,
    /// A string → string map (labels, annotations, matchLabels).
    StrMap,
    List(Box<Shape>),
    Object(Vec<Field>),
}

struct Field {
    name: &'static str,
    required: bool,
    shape: Shape,
}

fn req(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        required: true,
        shape,
    }
}

fn opt(name: &'static str, shape: Shape) -> Field {
    Field {
        name,
        required: false,
        shape,
    }
}

fn list_of(shape: Shape) -> Shape {
    Shape::List(Box::new(shape))
}

fn is_duration(text: &str) -> bool {
    // Prometheus: units y, w, d, h, m, s, ms, each at most once, largest first.
    const UNITS: &[&str] = &["y", "w", "d", "h", "m", "s", "ms"];
    if text == "0" {
        return true;
    }
    let mut rest = text;
    let mut next_unit = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &rest[digits..];
        // "ms" before "m" so that "10ms" is not read as minutes then "s".
        let Some(unit) = (next_unit..UNITS.len())
            .filter(|&u| rest.starts_with(UNITS[u]))
            .max_by_key(|&u| UNITS[u].len())
        else {
            return false;
        };
        rest = &rest[UNITS[unit].len()..];
        next_unit = unit + 1;
    }
    !text.is_empty()
}

fn check(value: &Yaml, shape: &Shape, path: &str, errors: &mut Vec<String>) {
    let mut fail = |what: &str| errors.push(format!("{path}: {what}, got {value:?}"));
    match shape {
        Shape::Str => {
            if value.as_str().is_none() {
                fail("expected a string");
            }
        }
        Shape::NumberStr => match value.as_str().map(str::parse::<f64>) {
            Some(Ok(n)) if n > 0.0 => {}
            _ => fail("expected a string holding a positive number"),
        },
        Shape::Duration => {
            if !value.as_str().is_some_and(is_duration) {
                fail("expected a duration string such as 30s");
            }
        }
        Shape::OneOf(allowed) => {
            if !value.as_str().is_some_and(|s| allowed.contains(&s)) {
                fail(&format!("expected one of {allowed:?}"));
            }
        }
        Shape::Int(min) => match value.as_i64() {
            Some(n) if n >= *min => {}
            Some(_) => fail(&format!("expected an integer of at least {min}")),
            None => fail("expected an integer"),
        },
        Shape::Bool => {
            if value.as_bool().is_none() {
                fail("expected true or false");
            }
        }
        Shape::IntOrStr => {
            if value.as_i64().is_none() && value.as_str().is_none() {
                fail("expected a port number or name");
            }
        }
        Shape::StrMap => match value.as_hash() {
            Some(map) => {
                for (k, v) in map {
                    if k.as_str().is_none() || v.as_str().is_none() {
                        errors.push(format!("{path}: {k:?}: {v:?} is not a string to a string"));
                    }
                }
            }
            None => fail("expected a map of strings"),
        },
        Shape::List(item) => match value.as_vec() {
            Some(items) => {
                for (i, v) in items.iter().enumerate() {
                    check(v, item, &format!("{path}[{i}]"), errors);
                }
            }
            None => fail("expected a list"),
        },
        Shape::Object(fields) => {
            let Some(map) = value.as_hash() else {
                fail("expected a map");
                return;
            };
            let child = |name: &str| {
                if path.is_empty() {
                    name.to_string()
                } else {
                    format!("{path}.{name}")
                }
            };
            for key in map.keys() {
                match key.as_str() {
                    Some(k) if fields.iter().any(|f| f.name == k) => {}
                    Some(k) => errors.push(format!("{}: unknown key", child(k))),
                    None => errors.push(format!("{path}: a key that is not a string: {key:?}")),
                }
            }
            for field in fields {
                match map.get(&Yaml::String(field.name.into())) {
                    Some(v) => check(v, &field.shape, &child(field.name), errors),
                    None if field.required => {
                        errors.push(format!("{}: required key missing", child(field.name)))
                    }
                    None => {}
                }
            }
        }
    }
}

fn metadata() -> Shape {
    Shape::Object(vec![
        req("name", Shape::Str),
        opt("namespace", Shape::Str),
        opt("labels", Shape::StrMap),
        opt("annotations", Shape::StrMap),
    ])
}

/// `autoscaling/v2` HorizontalPodAutoscalerBehavior, which KEDA passes to its HPA.
fn hpa_behavior() -> Shape {
    let rules = || {
        Shape::Object(vec![
            opt("stabilizationWindowSeconds", Shape::Int(0)),
            opt("selectPolicy", Shape::OneOf(&["Max", "Min", "Disabled"])),
            opt(
                "policies",
                list_of(Shape::Object(vec![
                    req("type", Shape::OneOf(&["Pods", "Percent"])),
                    req("value", Shape::Int(1)),
                    req("periodSeconds", Shape::Int(1)),
                ])),
            ),
        ])
    };
    Shape::Object(vec![opt("scaleUp", rules()), opt("scaleDown", rules())])
}

/// KEDA's `prometheus` trigger metadata (https://keda.sh/docs/latest/scalers/prometheus/):
/// every value is a string, as in the CRD (`map[string]string`).
fn prometheus_metadata() -> Shape {
    Shape::Object(vec![
        req("serverAddress", Shape::Str),
        req("query", Shape::Str),
        req("threshold", Shape::NumberStr),
        opt("activationThreshold", Shape::NumberStr),
        opt("namespace", Shape::Str),
        opt("customHeaders", Shape::Str),
        opt("ignoreNullValues", Shape::OneOf(&["true", "false"])),
        opt("unsafeSsl", Shape::OneOf(&["true", "false"])),
        opt("queryParameters", Shape::Str),
        opt("timeout", Shape::NumberStr),
        opt("authModes", Shape::Str),
    ])
}

/// KEDA's ScaledObject (https://keda.sh/docs/latest/reference/scaledobject-spec/), with
/// the bridge's own rule that `minReplicaCount` is at least 1 (see scaledobject.yaml) and
/// with `prometheus` as the only trigger type this checker knows.
fn scaled_object() -> Shape {
    Shape::Object(vec![
        req("apiVersion", Shape::OneOf(&["keda.sh/v1alpha1"])),
        req("kind", Shape::OneOf(&["ScaledObject"])),
        req("metadata", metadata()),
        req(
            "spec",
            Shape::Object(vec![
                req(
                    "scaleTargetRef",
                    Shape::Object(vec![
                        opt("apiVersion", Shape::Str),
                        opt("kind", Shape::Str),
                        req("name", Shape::Str),
                        opt("envSourceContainerName", Shape::Str),
                    ]),
                ),
                opt("pollingInterval", Shape::Int(1)),
                opt("cooldownPeriod", Shape::Int(0)),
                opt("initialCooldownPeriod", Shape::Int(0)),
                opt("idleReplicaCount", Shape::Int(0)),
                req("minReplicaCount", Shape::Int(1)),
                req("maxReplicaCount", Shape::Int(1)),
                opt(
                    "fallback",
                    Shape::Object(vec![
                        req("failureThreshold", Shape::Int(0)),
                        req("replicas", Shape::Int(0)),
                    ]),
                ),
                opt(
                    "advanced",
                    Shape::Object(vec![
                        opt("restoreToOriginalReplicaCount", Shape::Bool),
                        opt(
                            "horizontalPodAutoscalerConfig",
                            Shape::Object(vec![
                                opt("name", Shape::Str),
                                opt("behavior", hpa_behavior()),
                            ]),
                        ),
                    ]),
                ),
                req(
                    "triggers",
                    list_of(Shape::Object(vec![
                        req("type", Shape::OneOf(&["prometheus"])),
                        opt("name", Shape::Str),
                        req("metadata", prometheus_metadata()),
                        opt("metricType", Shape::OneOf(&["AverageValue", "Value"])),
                        opt("useCachedMetrics", Shape::Bool),
                        opt(
                            "authenticationRef",
                            Shape::Object(vec![req("name", Shape::Str), opt("kind", Shape::Str)]),
                        ),
                    ])),
                ),
            ]),
        ),
    ])
}

/// The Prometheus operator's ServiceMonitor (monitoring.coreos.com/v1, API reference of
/// prometheus-operator).
fn service_monitor() -> Shape {
    let relabel = || {
        list_of(Shape::Object(vec![
            opt("sourceLabels", list_of(Shape::Str)),
            opt("separator", Shape::Str),
            opt("targetLabel", Shape::Str),
            opt("regex", Shape::Str),
            opt("modulus", Shape::Int(1)),
            opt("replacement", Shape::Str),
            opt(
                "action",
                Shape::OneOf(&[
                    "replace",
                    "Replace",
                    "keep",
                    "Keep",
                    "drop",
                    "Drop",
                    "hashmod",
                    "HashMod",
                    "labelmap",
                    "LabelMap",
                    "labeldrop",
                    "LabelDrop",
                    "labelkeep",
                    "LabelKeep",
                ]),
            ),
        ]))
    };
    let endpoint = Shape::Object(vec![
        opt("port", Shape::Str),
        opt("targetPort", Shape::IntOrStr),
        opt("path", Shape::Str),
        opt("scheme", Shape::OneOf(&["http", "https"])),
        opt("interval", Shape::Duration),
        opt("scrapeTimeout", Shape::Duration),
        opt("honorLabels", Shape::Bool),
        opt("honorTimestamps", Shape::Bool),
        opt("followRedirects", Shape::Bool),
        opt("enableHttp2", Shape::Bool),
        opt("filterRunning", Shape::Bool),
        opt("proxyUrl", Shape::Str),
        opt("relabelings", relabel()),
        opt("metricRelabelings", relabel()),
        opt(
            "tlsConfig",
            Shape::Object(vec![
                opt("insecureSkipVerify", Shape::Bool),
                opt("serverName", Shape::Str),
                opt("caFile", Shape::Str),
                opt("certFile", Shape::Str),
                opt("keyFile", Shape::Str),
            ]),
        ),
    ]);
    Shape::Object(vec![
        req("apiVersion", Shape::OneOf(&["monitoring.coreos.com/v1"])),
        req("kind", Shape::OneOf(&["ServiceMonitor"])),
        req("metadata", metadata()),
        req(
            "spec",
            Shape::Object(vec![
                req(
                    "selector",
                    Shape::Object(vec![
                        opt("matchLabels", Shape::StrMap),
                        opt(
                            "matchExpressions",
                            list_of(Shape::Object(vec![
                                req("key", Shape::Str),
                                req(
                                    "operator",
                                    Shape::OneOf(&["In", "NotIn", "Exists", "DoesNotExist"]),
                                ),
                                opt("values", list_of(Shape::Str)),
                            ])),
                        ),
                    ]),
                ),
                req("endpoints", list_of(endpoint)),
                opt(
                    "namespaceSelector",
                    Shape::Object(vec![
                        opt("any", Shape::Bool),
                        opt("matchNames", list_of(Shape::Str)),
                    ]),
                ),
                opt("jobLabel", Shape::Str),
                opt("targetLabels", list_of(Shape::Str)),
                opt("podTargetLabels", list_of(Shape::Str)),
                opt("sampleLimit", Shape::Int(0)),
                opt("targetLimit", Shape::Int(0)),
                opt("labelLimit", Shape::Int(0)),
                opt("labelNameLengthLimit", Shape::Int(0)),
                opt("labelValueLengthLimit", Shape::Int(0)),
                opt("keepDroppedTargets", Shape::Int(0)),
                opt("bodySizeLimit", Shape::Str),
                opt("scrapeClass", Shape::Str),
                opt(
                    "attachMetadata",
                    Shape::Object(vec![opt("node", Shape::Bool)]),
                ),
            ]),
        ),
    ])
}

fn errors_of(doc: &Yaml, shape: &Shape) -> Vec<String> {
    let mut errors = Vec::new();
    check(doc, shape, "", &mut errors);
    errors
}

/// `file`'s text with `from` replaced by `to` (which must be there).
fn broken(file: &str, from: &str, to: &str) -> Yaml {
    let text = std::fs::read_to_string(kube_dir().join(file)).unwrap();
    assert!(text.contains(from), "{file} has no {from:?} to break");
    load(&text.replacen(from, to, 1))
}

#[test]
fn the_custom_resources_pass_the_structural_checks() {
    let errors = errors_of(&resource("ScaledObject"), &scaled_object());
    assert!(errors.is_empty(), "scaledobject.yaml: {errors:#?}");
    let errors = errors_of(&resource("ServiceMonitor"), &service_monitor());
    assert!(errors.is_empty(), "servicemonitor.yaml: {errors:#?}");
}

#[test]
fn the_structural_checker_rejects_broken_custom_resources() {
    let cases = [
        (
            "scaledobject.yaml",
            "  minReplicaCount: 1",
            "  minReplicaCount: 1\n  minReplicas: 2",
            "spec.minReplicas: unknown key",
        ),
        (
            "scaledobject.yaml",
            "threshold: \"10000\"",
            "threshold: 10000",
            "spec.triggers[0].metadata.threshold: expected a string",
        ),
        (
            "scaledobject.yaml",
            "threshold: \"10000\"",
            "threshold: \"ten thousand\"",
            "spec.triggers[0].metadata.threshold: expected a string",
        ),
        (
            "scaledobject.yaml",
            "minReplicaCount: 1",
            "minReplicaCount: 0",
            "spec.minReplicaCount: expected an integer of at least 1",
        ),
        (
            "scaledobject.yaml",
            "serverAddress:",
            "serverAdress:",
            "spec.triggers[0].metadata.serverAdress: unknown key",
        ),
        (
            "scaledobject.yaml",
            "    name: cfq-bridge\n  pollingInterval",
            "    nme: cfq-bridge\n  pollingInterval",
            "spec.scaleTargetRef.name: required key missing",
        ),
        (
            "scaledobject.yaml",
            "type: prometheus",
            "type: kafka",
            "spec.triggers[0].type: expected one of",
        ),
        (
            "servicemonitor.yaml",
            "interval: 15s",
            "intervall: 15s",
            "spec.endpoints[0].intervall: unknown key",
        ),
        (
            "servicemonitor.yaml",
            "interval: 15s",
            "interval: 15 seconds",
            "spec.endpoints[0].interval: expected a duration",
        ),
        (
            "servicemonitor.yaml",
            "  selector:",
            "  selectors:",
            "spec.selectors: unknown key",
        ),
    ];
    for (file, from, to, expected) in cases {
        let shape = if file == "scaledobject.yaml" {
            scaled_object()
        } else {
            service_monitor()
        };
        let errors = errors_of(&broken(file, from, to), &shape);
        assert!(
            errors.iter().any(|e| e.starts_with(expected)),
            "{file} with {to:?}: expected an error starting {expected:?}, got {errors:#?}"
        );
    }
}

#[test]
fn durations_are_read_as_prometheus_reads_them() {
    for good in ["0", "15s", "1m30s", "500ms", "1h", "2d12h"] {
        assert!(is_duration(good), "{good}");
    }
    for bad in ["", "15", "s", "15 s", "1s1m", "15sec", "-1s", "1.5s"] {
        assert!(!is_duration(bad), "{bad}");
    }
}

// ---------------------------------------------------------------------------------------
// The pieces agree with each other and with the bridge.

fn deployment() -> Yaml {
    resource("Deployment")
}

fn container(deployment: &Yaml) -> &Yaml {
    let containers = list(
        &deployment["spec"]["template"]["spec"]["containers"],
        "containers",
    );
    assert_eq!(containers.len(), 1, "one container");
    &containers[0]
}

/// The environment the container gets: literal values as they are, values from a Secret
/// as a stand-in token (after checking the Secret and key exist in secret.yaml).
fn pod_env(container: &Yaml) -> BTreeMap<String, String> {
    let secret = resource("Secret");
    let mut env = BTreeMap::new();
    for entry in container["env"].as_vec().map(Vec::as_slice).unwrap_or(&[]) {
        let name = string(&entry["name"], "env name").to_string();
        if let Some(value) = entry["value"].as_str() {
            env.insert(name, value.to_string());
            continue;
        }
        let from = &entry["valueFrom"]["secretKeyRef"];
        let secret_name = string(&from["name"], "secretKeyRef.name");
        let key = string(&from["key"], "secretKeyRef.key");
        assert_eq!(
            secret_name,
            string(&secret["metadata"]["name"], "Secret name"),
            "{name} names a Secret that is not secret.yaml's"
        );
        assert!(
            !secret["stringData"][key].is_badvalue() || !secret["data"][key].is_badvalue(),
            "secret.yaml has no key {key} for {name}"
        );
        env.insert(name, "stand-in-token-from-the-secret".to_string());
    }
    env
}

/// The ConfigMap's file that `--config` names, and the path it is mounted at.
fn configmap_toml(deployment: &Yaml) -> String {
    let container = container(deployment);
    let args: Vec<&str> = list(&container["args"], "args")
        .iter()
        .map(|a| string(a, "an argument"))
        .collect();
    let at = args
        .iter()
        .position(|a| *a == "--config")
        .expect("args pass --config");
    let config_path = Path::new(args[at + 1]);
    let mount = list(&container["volumeMounts"], "volumeMounts")
        .iter()
        .find(|m| config_path.starts_with(string(&m["mountPath"], "mountPath")))
        .expect("the --config file is on a volume");
    let volume_name = string(&mount["name"], "mount name");
    let volume = list(
        &deployment["spec"]["template"]["spec"]["volumes"],
        "volumes",
    )
    .iter()
    .find(|v| v["name"].as_str() == Some(volume_name))
    .expect("the config volume is declared");
    let configmap = resource("ConfigMap");
    assert_eq!(
        volume["configMap"]["name"].as_str(),
        configmap["metadata"]["name"].as_str(),
        "the config volume is the ConfigMap"
    );
    let key = config_path
        .strip_prefix(string(&mount["mountPath"], "mountPath"))
        .unwrap();
    string(
        &configmap["data"][key.to_str().unwrap()],
        "the ConfigMap entry --config names",
    )
    .to_string()
}

/// The container port a probe or Service names (by number or by name).
fn container_port(container: &Yaml, port: &Yaml) -> i64 {
    if let Some(number) = port.as_i64() {
        return number;
    }
    let name = string(port, "a port");
    list(&container["ports"], "ports")
        .iter()
        .find(|p| p["name"].as_str() == Some(name))
        .and_then(|p| p["containerPort"].as_i64())
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

#[test]
fn the_configmap_loads_with_the_bridges_loader_and_the_pods_environment() {
    let deployment = deployment();
    let env = pod_env(container(&deployment));
    assert!(
        env.contains_key(TOKEN_ENV),
        "the container gets {TOKEN_ENV} from the Secret"
    );
    let lookup = |name: &str| env.get(name).cloned();
    let text = configmap_toml(&deployment);
    let config = Config::from_toml(&text, lookup)
        .unwrap_or_else(|e| panic!("the ConfigMap's bridge.toml does not load: {e}"));
    let queue = config.queue().expect("a [queue] table");
    read_token(queue.api_token_file.as_deref(), lookup)
        .expect("the token is found where the pod puts it");
    let listen = config.metrics.listen.expect("[metrics] listen is set");
    assert!(
        listen.ip().is_unspecified(),
        "[metrics] listen must accept the kubelet's probes on the pod IP, not {listen}"
    );
}

#[test]
fn the_probes_and_the_service_use_the_metrics_listener() {
    let deployment = deployment();
    let container = container(&deployment);
    let config = Config::from_toml(&configmap_toml(&deployment), |_| {
        Some("stand-in".to_string())
    })
    .unwrap();
    let port = i64::from(config.metrics.listen.expect("[metrics] listen").port());
    for (probe, path) in [("livenessProbe", "/health"), ("readinessProbe", "/ready")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"].as_str(), Some(path), "{probe} path");
        assert_eq!(
            container_port(container, &get["port"]),
            port,
            "{probe} port is [metrics] listen's"
        );
    }

    let service = resource("Service");
    let pod_labels = labels(&deployment["spec"]["template"]["metadata"]["labels"]);
    for (k, v) in labels(&service["spec"]["selector"]) {
        assert_eq!(pod_labels.get(&k), Some(&v), "the Service selects the pods");
    }
    let service_ports = list(&service["spec"]["ports"], "Service ports");
    assert_eq!(service_ports.len(), 1);
    assert_eq!(
        container_port(container, &service_ports[0]["targetPort"]),
        port,
        "the Service targets the metrics port"
    );

    let monitor = resource("ServiceMonitor");
    let service_labels = labels(&service["metadata"]["labels"]);
    let selector = labels(&monitor["spec"]["selector"]["matchLabels"]);
    assert!(!selector.is_empty());
    for (k, v) in selector {
        assert_eq!(
            service_labels.get(&k),
            Some(&v),
            "the ServiceMonitor selects the Service"
        );
    }
    let endpoints = list(&monitor["spec"]["endpoints"], "endpoints");
    assert_eq!(
        endpoints[0]["port"].as_str(),
        service_ports[0]["name"].as_str()
    );
    assert_eq!(endpoints[0]["path"].as_str(), Some("/metrics"));
}

#[test]
fn the_pod_is_locked_down_and_writes_only_to_empty_dirs() {
    let deployment = deployment();
    let pod = &deployment["spec"]["template"]["spec"];
    let container = container(&deployment);
    assert_eq!(pod["automountServiceAccountToken"].as_bool(), Some(false));
    for (what, context) in [
        ("pod", &pod["securityContext"]),
        ("container", &container["securityContext"]),
    ] {
        assert_eq!(context["runAsNonRoot"].as_bool(), Some(true), "{what}");
        let uid = context["runAsUser"].as_i64().expect("a numeric runAsUser");
        assert!(uid > 0, "{what}: runAsUser {uid}");
        assert_eq!(
            context["seccompProfile"]["type"].as_str(),
            Some("RuntimeDefault"),
            "{what}"
        );
    }
    let context = &container["securityContext"];
    assert_eq!(context["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(context["allowPrivilegeEscalation"].as_bool(), Some(false));
    let dropped: Vec<&str> = list(&context["capabilities"]["drop"], "capabilities.drop")
        .iter()
        .map(|c| string(c, "a capability"))
        .collect();
    assert_eq!(dropped, ["ALL"]);
    assert!(
        context["capabilities"]["add"].is_badvalue(),
        "no capability added"
    );
    for side in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            assert!(
                !container["resources"][side][resource].is_badvalue(),
                "resources.{side}.{resource}"
            );
        }
    }

    // Every path the bridge writes is on an emptyDir mount: the ack journal and /tmp.
    let empty_dirs: BTreeSet<&str> = list(&pod["volumes"], "volumes")
        .iter()
        .filter(|v| !v["emptyDir"].is_badvalue())
        .map(|v| string(&v["name"], "volume name"))
        .collect();
    let writable: Vec<&str> = list(&container["volumeMounts"], "volumeMounts")
        .iter()
        .filter(|m| m["readOnly"].as_bool() != Some(true))
        .filter(|m| empty_dirs.contains(string(&m["name"], "mount name")))
        .map(|m| string(&m["mountPath"], "mountPath"))
        .collect();
    let config = Config::from_toml(&configmap_toml(&deployment), |_| {
        Some("stand-in".to_string())
    })
    .unwrap();
    let journal = config
        .queue()
        .unwrap()
        .ack_journal
        .clone()
        .expect("the pod config keeps an ack journal");
    let on_empty_dir = |path: &Path| writable.iter().any(|m| path.starts_with(m));
    assert!(
        on_empty_dir(&journal),
        "ack_journal {} is not on a writable emptyDir ({writable:?})",
        journal.display()
    );
    assert!(on_empty_dir(Path::new("/tmp")), "/tmp is not an emptyDir");
}

/// SIGTERM: deliveries get `shutdown_grace_ms`, acks up to 3 × `request_timeout_ms`
/// (src/sources/cloudflare/mod.rs, `finish`), then the sink flushes (Kafka: up to
/// `message_timeout_ms`). The pod must be given longer, or Kubernetes kills it mid-way.
fn shutdown_bound_ms(toml_text: &str) -> u64 {
    let table = parse_toml(toml_text);
    let get = |name: &str, key: &str, default: i64| {
        table_of(&table, name)
            .get(key)
            .and_then(|v| v.as_integer())
            .unwrap_or(default)
    };
    // The defaults are the bridge's (README, [queue] and the kafka sink).
    let grace = get("queue", "shutdown_grace_ms", 10_000);
    let request = get("queue", "request_timeout_ms", 30_000);
    let flush = get("sink", "message_timeout_ms", 10_000);
    (grace + 3 * request + flush) as u64
}

fn parse_toml(text: &str) -> toml::Table {
    text.parse().expect("TOML")
}

fn table_of(table: &toml::Table, name: &str) -> toml::Table {
    table
        .get(name)
        .and_then(|v| v.as_table())
        .cloned()
        .unwrap_or_default()
}

#[test]
fn the_pod_gets_longer_to_stop_than_the_bridges_shutdown() {
    let deployment = deployment();
    let grace_s = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        .as_i64()
        .expect("terminationGracePeriodSeconds");
    let bound = shutdown_bound_ms(&configmap_toml(&deployment));
    assert!(
        (grace_s as u64) * 1000 > bound,
        "terminationGracePeriodSeconds {grace_s} s is not longer than the bridge's shutdown ({bound} ms)"
    );
}

#[test]
fn the_token_only_comes_from_the_secret() {
    let deployment = deployment();
    let container = container(&deployment);
    for arg in list(&container["args"], "args") {
        let arg = string(arg, "an argument").to_lowercase();
        assert!(
            !arg.contains("token") && !arg.contains("secret"),
            "a secret-looking argument: {arg}"
        );
    }
    for entry in container["env"].as_vec().map(Vec::as_slice).unwrap_or(&[]) {
        let name = string(&entry["name"], "env name");
        if name.contains("TOKEN") || name.contains("SECRET") || name.contains("PASSWORD") {
            assert!(
                entry["value"].is_badvalue() && !entry["valueFrom"]["secretKeyRef"].is_badvalue(),
                "{name} must come from a Secret"
            );
        }
    }
    let secret = resource("Secret");
    for (_, value) in labels(&secret["stringData"]) {
        assert!(
            value.starts_with("REPLACE-"),
            "secret.yaml holds a placeholder, not {value:?}"
        );
    }
    assert!(
        secret["data"].is_badvalue(),
        "secret.yaml holds no encoded data"
    );
    let text = configmap_toml(&deployment);
    assert!(!text.contains("api_token ="), "no token in the ConfigMap");
}

#[test]
fn the_kustomization_lists_every_manifest_but_the_secret_template() {
    let kustomization = resource("Kustomization");
    let listed: BTreeSet<String> = list(&kustomization["resources"], "resources")
        .iter()
        .map(|r| string(r, "a resource").to_string())
        .collect();
    let files: BTreeSet<String> = manifests()
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_str().unwrap().to_string())
        .filter(|name| name != "kustomization.yaml" && name != "secret.yaml")
        .collect();
    assert_eq!(listed, files);
    // The image the Deployment names is the one the kustomization lets users replace,
    // and the placeholder docs/scaling.md explains.
    let image = string(&container(&deployment())["image"], "image").to_string();
    let images = list(&kustomization["images"], "images");
    let name = string(&images[0]["name"], "images[0].name");
    assert!(image.starts_with(&format!("{name}:")), "{image} vs {name}");
    let doc = std::fs::read_to_string(root().join("docs/scaling.md")).unwrap();
    assert!(
        doc.contains(name),
        "docs/scaling.md does not mention the image {name}"
    );
}

#[test]
fn the_scaled_object_scales_the_deployment_on_the_backlog() {
    let scaled = resource("ScaledObject");
    let deployment = deployment();
    let target = &scaled["spec"]["scaleTargetRef"];
    assert_eq!(
        target["name"].as_str(),
        deployment["metadata"]["name"].as_str()
    );
    assert_eq!(
        target["kind"].as_str().unwrap_or("Deployment"),
        "Deployment"
    );
    let min = scaled["spec"]["minReplicaCount"].as_i64().unwrap();
    let max = scaled["spec"]["maxReplicaCount"].as_i64().unwrap();
    assert!(min >= 1 && max >= min, "min {min}, max {max}");
    let triggers = list(&scaled["spec"]["triggers"], "triggers");
    assert_eq!(triggers.len(), 1);
    let query = string(&triggers[0]["metadata"]["query"], "query");
    assert!(query.contains("cfq_queue_backlog_messages"), "{query}");
    // Every replica reports the same queue's backlog: a sum would count it once per
    // replica and scale up on its own replicas.
    assert!(query.starts_with("max("), "{query}");
    let service = resource("Service");
    let service_name = string(&service["metadata"]["name"], "Service name");
    assert!(
        query.contains(&format!("service=\"{service_name}\"")),
        "the query selects the bridge's series by its Service: {query}"
    );
}

// ---------------------------------------------------------------------------------------
// systemd.

fn unit_path() -> PathBuf {
    root().join("deploy/systemd/cfq-bridge.service")
}

/// The unit as (section, key, value) entries in order (comments and blank lines left out).
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("line {}: not key=value: {line}", n + 1));
        assert!(
            !section.is_empty(),
            "line {}: a key before any section",
            n + 1
        );
        assert!(
            !line.ends_with('\\'),
            "line {}: keep entries on one line",
            n + 1
        );
        entries.push((
            section.clone(),
            key.trim().to_string(),
            value.trim().to_string(),
        ));
    }
    entries
}

fn unit_value<'a>(
    entries: &'a [(String, String, String)],
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

fn one<'a>(entries: &'a [(String, String, String)], section: &str, key: &str) -> &'a str {
    let values = unit_value(entries, section, key);
    assert_eq!(values.len(), 1, "[{section}] {key}: {values:?}");
    values[0]
}

fn systemd_toml() -> String {
    std::fs::read_to_string(root().join("deploy/systemd/bridge.toml")).unwrap()
}

/// The structural check of the unit, also the fallback when `systemd-analyze` is missing.
fn check_unit_structure(text: &str) {
    let entries = unit_entries(text);
    let sections: BTreeSet<&str> = entries.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(sections, BTreeSet::from(["Install", "Service", "Unit"]));

    let exec = one(&entries, "Service", "ExecStart");
    let lowered = exec.to_lowercase();
    for word in ["token", "secret", "password", "key=", "cloudflare_api"] {
        assert!(
            !lowered.contains(word),
            "ExecStart carries a secret-looking {word:?}: {exec}"
        );
    }
    for env in unit_value(&entries, "Service", "Environment") {
        assert!(!env.contains(TOKEN_ENV), "the token in Environment=: {env}");
    }
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert!(words[0].starts_with('/'), "an absolute ExecStart: {exec}");
    let at = words
        .iter()
        .position(|w| *w == "--config")
        .expect("--config");
    assert_eq!(words[at + 1], "/etc/cfq-bridge/bridge.toml");
    assert!(words.contains(&"run"));

    // An unprivileged user and a read-only system.
    let dynamic = unit_value(&entries, "Service", "DynamicUser") == ["yes"];
    let user = unit_value(&entries, "Service", "User");
    assert!(
        dynamic || (user.len() == 1 && user[0] != "root"),
        "a dedicated user"
    );
    assert_eq!(one(&entries, "Service", "ProtectSystem"), "strict");
    assert_eq!(one(&entries, "Service", "NoNewPrivileges"), "yes");
    assert_eq!(one(&entries, "Service", "CapabilityBoundingSet"), "");
    assert_eq!(one(&entries, "Service", "Restart"), "on-failure");
    assert_eq!(one(&entries, "Service", "KillSignal"), "SIGTERM");

    // The token: a credential file, named by the config through $CREDENTIALS_DIRECTORY.
    let credential = one(&entries, "Service", "LoadCredential");
    let (id, source) = credential.split_once(':').expect("LoadCredential=ID:PATH");
    assert!(source.starts_with('/'), "{credential}");
    let config_text = systemd_toml();
    let table = table_of(&parse_toml(&config_text), "queue");
    let token_file = table["api_token_file"].as_str().expect("api_token_file");
    assert_eq!(token_file, format!("${{CREDENTIALS_DIRECTORY}}/{id}"));

    // The state directory holds the journal.
    let state = one(&entries, "Service", "StateDirectory");
    let journal = table["ack_journal"].as_str().expect("ack_journal");
    assert!(
        Path::new(journal).starts_with(format!("/var/lib/{state}")),
        "ack_journal {journal} is outside StateDirectory={state}"
    );

    // Stopping takes at most the bridge's shutdown; systemd waits longer.
    let stop = one(&entries, "Service", "TimeoutStopSec");
    let stop_s: u64 = stop.parse().expect("TimeoutStopSec in plain seconds");
    let bound = shutdown_bound_ms(&config_text);
    assert!(
        stop_s * 1000 > bound,
        "TimeoutStopSec={stop} is not longer than {bound} ms"
    );
}

#[test]
fn the_systemd_unit_is_hardened_and_keeps_the_token_off_the_command_line() {
    check_unit_structure(&std::fs::read_to_string(unit_path()).unwrap());
}

#[test]
fn the_structural_unit_check_rejects_a_token_on_the_command_line() {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    let exec = text
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .unwrap()
        .to_string();
    for bad in [
        text.replace(&exec, &format!("{exec} --api-token abc")),
        text.replace(
            &exec,
            &format!(
                "ExecStart=/usr/bin/env CLOUDFLARE_API_TOKEN=abc {}",
                &exec[10..]
            ),
        ),
        text.replace("TimeoutStopSec=75", "TimeoutStopSec=30"),
        text.replace("ProtectSystem=strict", "ProtectSystem=full"),
    ] {
        let result = std::panic::catch_unwind(|| check_unit_structure(&bad));
        assert!(result.is_err(), "accepted:\n{bad}");
    }
}

#[test]
fn the_systemd_config_loads_with_the_credential_systemd_provides() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().to_str().unwrap().to_string();
    std::fs::write(
        dir.path().join("cloudflare-api-token"),
        "token-from-systemd\n",
    )
    .unwrap();
    let lookup = |name: &str| (name == "CREDENTIALS_DIRECTORY").then(|| credentials.clone());
    let config = Config::from_toml(&systemd_toml(), lookup)
        .unwrap_or_else(|e| panic!("deploy/systemd/bridge.toml does not load: {e}"));
    let queue = config.queue().unwrap();
    let token = read_token(queue.api_token_file.as_deref(), |_| None)
        .expect("the token is read from the credential file, not the environment");
    use secrecy::ExposeSecret as _;
    assert_eq!(token.expose_secret(), "token-from-systemd");
}

/// `systemd-analyze verify` on the unit, with ExecStart pointed at the bridge built for
/// this test (verify insists that the binary exists). It exits 0 even for unknown keys and
/// bad values, which it only prints: any line about the unit fails the test.
fn systemd_analyze_verify(text: &str) -> Option<(bool, String)> {
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("cfq-bridge.service");
    let text = text.replace(
        "ExecStart=/usr/local/bin/cfq-bridge ",
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_cfq-bridge")),
    );
    std::fs::write(&unit, text).unwrap();
    let output = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .ok()?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let about_unit: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("cfq-bridge.service"))
        .collect();
    Some((output.status.success() && about_unit.is_empty(), said))
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let text = std::fs::read_to_string(unit_path()).unwrap();
    match systemd_analyze_verify(&text) {
        Some((ok, said)) => {
            assert!(ok, "systemd-analyze verify:\n{said}");
            // And it does catch a mistake, so its silence above means something.
            let broken = text.replace("PrivateTmp=yes", "PrivateTmp=yes\nPrivateTemp=yes");
            let (ok, said) = systemd_analyze_verify(&broken).unwrap();
            assert!(
                !ok,
                "systemd-analyze did not notice an unknown key:\n{said}"
            );
        }
        None => {
            println!("systemd-analyze is not installed: the structural check stands in");
            check_unit_structure(&text);
        }
    }
}
