//! Settings of the NATS sink: the `[sink]` table for `type = "nats"` and its sub-tables.
//!
//! They parse and validate in every build, with or without the cargo feature `nats`, so a
//! config naming this sink is checked even by a build that cannot run it. Validation here
//! is I/O-free; files named by the config (secrets, certificates) are read when the sink
//! is built.

use std::path::PathBuf;

use async_trait::async_trait;
use secrecy::SecretString;
use serde::Deserialize;

use crate::registry::{SinkConfigError, SinkSettings, Weakening};
use crate::{Sink, SinkError};

/// Default wait for a record's PubAck (or, in core mode, for the flush), in milliseconds.
pub const DEFAULT_PUBLISH_TIMEOUT_MS: u64 = 5_000;
/// Default wait for the TCP/TLS connection and the NATS handshake, in milliseconds.
pub const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 5_000;
/// Default bound on PubAcks awaited at once, across all batches.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 10_000;
/// Default duplicate window of a stream made by `create_stream`, in seconds.
pub const DEFAULT_DUPLICATE_WINDOW_SECS: u64 = 30 * 60;

/// The `[sink]` table for `type = "nats"`.
///
/// ```toml
/// [sink]
/// type = "nats"
/// url = "nats://127.0.0.1:4222"
/// subject = "events.{queue_id}"
/// jetstream = true
/// ```
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL, or several separated by commas, for example `nats://127.0.0.1:4222` or
    /// `tls://a:4222,tls://b:4222`. Credentials belong in the auth settings below, not in
    /// the URL (a URL is redacted in logs anyway).
    pub url: String,
    /// Destination subject. Static (`events`) or a template using `{queue_id}` and
    /// `{metadata.NAME}`; a record whose template cannot be expanded, or expands to an
    /// invalid subject, fails permanently.
    pub subject: String,
    /// Publish through JetStream and confirm each record on its PubAck (default, and the
    /// only mode that is at least once). `false` publishes with core NATS and counts a
    /// record as delivered once the connection flushed it: the server confirms nothing, so
    /// a record can be lost if the server or the connection fails right after the flush.
    /// `false` needs `allow_weaker_delivery = true`.
    #[serde(default = "default_true")]
    pub jetstream: bool,
    /// The JetStream stream expected to capture `subject`. Optional: for a static subject
    /// the stream is looked up by subject. Checked at start and by `cfq-bridge check`.
    /// Exclusive with `create_stream`.
    #[serde(default)]
    pub stream: Option<String>,
    /// Create the stream at start when it does not exist yet. Without it, the stream must
    /// already exist (the sink refuses to start otherwise).
    #[serde(default)]
    pub create_stream: Option<Box<CreateStreamConfig>>,
    /// Subject that receives records the destination refuses for good (no stream for the
    /// subject, message larger than the server's or the stream's maximum, invalid subject
    /// or header). The dead-letter message is the whole record, its body and every header,
    /// plus `cfq-error-class`, `cfq-error-reason` and `cfq-original-subject`. A record that
    /// cannot travel there whole (a body above the server's `max_payload`, a header NATS
    /// cannot carry, a dead-letter stream that refuses it) fails permanently instead, as
    /// does every refused record without this setting: the bridge retries it with a
    /// growing delay, so that Cloudflare's own retries and dead-letter queue take over.
    #[serde(default)]
    pub dead_letter_subject: Option<String>,
    /// How long to wait for a record's PubAck (JetStream) or for the flush (core NATS)
    /// before failing it as transient, in milliseconds. Keep it well below the bridge's
    /// visibility timeout.
    #[serde(default = "default_publish_timeout_ms")]
    pub publish_timeout_ms: u64,
    /// How long to wait for the connection to a server, in milliseconds.
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Largest number of JetStream publishes awaiting their PubAck at once, across all
    /// batches; further publishes wait for a free slot.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Name this client reports to the server (shown by `nats server report connections`).
    #[serde(default = "default_client_name")]
    pub client_name: String,
    /// Authentication (`[sink.auth]`): at most one method. Without it the client connects
    /// anonymously.
    #[serde(default)]
    pub auth: Option<Box<NatsAuthConfig>>,
    /// TLS settings. Without this table TLS is used only when the URL says `tls://` or the
    /// server requires it, verified against the system's root certificates.
    #[serde(default)]
    pub tls: Option<Box<NatsTlsConfig>>,
    /// Accept settings that weaken delivery: `jetstream = false`. Without it that setting is
    /// refused at load, naming the key; with it the bridge starts and logs at warn what is
    /// given up. Default false.
    #[serde(default)]
    pub allow_weaker_delivery: bool,
}

/// Like a derived `Debug`, with credentials in the URL masked (secrets in `auth` are
/// [`SecretString`]s and mask themselves).
impl std::fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.redacted_url())
            .field("subject", &self.subject)
            .field("jetstream", &self.jetstream)
            .field("stream", &self.stream)
            .field("create_stream", &self.create_stream)
            .field("dead_letter_subject", &self.dead_letter_subject)
            .field("publish_timeout_ms", &self.publish_timeout_ms)
            .field("connect_timeout_ms", &self.connect_timeout_ms)
            .field("max_in_flight", &self.max_in_flight)
            .field("client_name", &self.client_name)
            .field("auth", &self.auth)
            .field("tls", &self.tls)
            .field("allow_weaker_delivery", &self.allow_weaker_delivery)
            .finish()
    }
}

/// `[sink.auth]`: how the client authenticates. Secrets are kept as
/// [`SecretString`] (redacted in `Debug`) and never logged.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsAuthConfig {
    /// User name, with `password` or `password_file`.
    #[serde(default)]
    pub user: Option<String>,
    /// Password for `user`. Use `${ENV_VAR}` interpolation rather than writing it here.
    #[serde(default)]
    pub password: Option<SecretString>,
    /// File holding the password for `user` (surrounding whitespace is ignored).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Authentication token. Use `${ENV_VAR}` interpolation rather than writing it here.
    #[serde(default)]
    pub token: Option<SecretString>,
    /// File holding the authentication token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// NKey seed (starts with `SU`). Use `${ENV_VAR}` interpolation.
    #[serde(default)]
    pub nkey_seed: Option<SecretString>,
    /// File holding the NKey seed.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and NKey seed), as issued by `nsc`.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

/// `[sink.create_stream]`: the stream to create at start when missing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateStreamConfig {
    /// Stream name (no spaces, dots, `*` or `>`).
    pub name: String,
    /// Subjects the stream captures. Default: the sink's subject, with every token that
    /// holds a placeholder replaced by `*` (`events.{queue_id}` becomes `events.*`).
    #[serde(default)]
    pub subjects: Vec<String>,
    /// How long the server remembers a `Nats-Msg-Id` to drop redeliveries, in seconds.
    /// It should cover the bridge's visibility timeout plus its largest retry delay.
    #[serde(default = "default_duplicate_window_secs")]
    pub duplicate_window_secs: u64,
    /// `file` (default) or `memory`.
    #[serde(default)]
    pub storage: StreamStorage,
    /// Number of replicas in a cluster (1 on a single server).
    #[serde(default = "default_replicas")]
    pub replicas: usize,
    /// Age after which the server discards messages, in seconds; 0 keeps them forever.
    #[serde(default)]
    pub max_age_secs: u64,
}

/// Where a created stream keeps its messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamStorage {
    /// On disk (the only choice that survives a server restart).
    #[default]
    File,
    /// In memory.
    Memory,
}

/// `[sink.tls]`: TLS towards the NATS server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTlsConfig {
    /// Refuse to connect without TLS (default `true` once this table is present).
    #[serde(default = "default_true")]
    pub required: bool,
    /// PEM file with the certificate authorities that sign the server's certificate, in
    /// addition to the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients (with `key_file`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Start TLS before the server's INFO (servers configured with `handshake_first`).
    #[serde(default)]
    pub handshake_first: bool,
}

fn default_true() -> bool {
    true
}
fn default_publish_timeout_ms() -> u64 {
    DEFAULT_PUBLISH_TIMEOUT_MS
}
fn default_connect_timeout_ms() -> u64 {
    DEFAULT_CONNECT_TIMEOUT_MS
}
fn default_max_in_flight() -> usize {
    DEFAULT_MAX_IN_FLIGHT
}
fn default_client_name() -> String {
    "cfq-bridge".into()
}
fn default_duplicate_window_secs() -> u64 {
    DEFAULT_DUPLICATE_WINDOW_SECS
}
fn default_replicas() -> usize {
    1
}

impl NatsConfig {
    /// I/O-free checks; the error names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("sink.url must not be empty".into());
        }
        if self.url.split(',').any(|u| u.trim().is_empty()) {
            return Err("sink.url has an empty entry in its comma-separated list".into());
        }
        validate_subject_template(&self.subject).map_err(|e| format!("sink.subject: {e}"))?;
        if let Some(dl) = &self.dead_letter_subject {
            validate_subject(dl).map_err(|e| format!("sink.dead_letter_subject: {e}"))?;
            if !has_placeholder(&self.subject) && dl == &self.subject {
                return Err("sink.dead_letter_subject must differ from sink.subject".into());
            }
        }
        if self.publish_timeout_ms == 0 {
            return Err("sink.publish_timeout_ms must be greater than 0".into());
        }
        if self.connect_timeout_ms == 0 {
            return Err("sink.connect_timeout_ms must be greater than 0".into());
        }
        if self.max_in_flight == 0 {
            return Err("sink.max_in_flight must be greater than 0".into());
        }
        if let Some(name) = &self.stream {
            validate_stream_name(name).map_err(|e| format!("sink.stream: {e}"))?;
            if self.create_stream.is_some() {
                return Err(
                    "sink.stream and sink.create_stream are exclusive (create_stream names the stream)"
                        .into(),
                );
            }
        }
        if let Some(create) = &self.create_stream {
            create.validate()?;
        }
        if !self.jetstream && (self.stream.is_some() || self.create_stream.is_some()) {
            return Err("sink.stream and sink.create_stream need sink.jetstream = true".into());
        }
        if let Some(auth) = &self.auth {
            auth.validate()?;
        }
        if let Some(tls) = &self.tls {
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                return Err(
                    "sink.tls.cert_file and sink.tls.key_file must be given together".into(),
                );
            }
        }
        Ok(())
    }
}

impl NatsConfig {
    /// What these settings give up of the at-least-once promise: core NATS
    /// (`jetstream = false`), where the server confirms nothing.
    pub fn weakenings(&self) -> Vec<Weakening> {
        if self.jetstream {
            return Vec::new();
        }
        vec![Weakening {
            key: "sink.jetstream".into(),
            value: "false".into(),
            given_up: "core NATS: the server confirms nothing, a record counts as delivered once \
                       the connection flushed it, and it is lost if the server or the network \
                       fails right after"
                .into(),
        }]
    }
}

#[async_trait]
impl SinkSettings for NatsConfig {
    fn validate(&self) -> Result<(), SinkConfigError> {
        NatsConfig::validate(self).map_err(SinkConfigError::Invalid)
    }

    fn weakenings(&self) -> Vec<Weakening> {
        NatsConfig::weakenings(self)
    }

    fn allows_weaker_delivery(&self) -> bool {
        self.allow_weaker_delivery
    }

    async fn open(&self) -> Result<Box<dyn Sink>, SinkError> {
        super::open(self).await
    }
}

impl NatsAuthConfig {
    fn validate(&self) -> Result<(), String> {
        let pairs = [
            (
                "password",
                self.password.is_some(),
                "password_file",
                self.password_file.is_some(),
            ),
            (
                "token",
                self.token.is_some(),
                "token_file",
                self.token_file.is_some(),
            ),
            (
                "nkey_seed",
                self.nkey_seed.is_some(),
                "nkey_seed_file",
                self.nkey_seed_file.is_some(),
            ),
        ];
        for (a, has_a, b, has_b) in pairs {
            if has_a && has_b {
                return Err(format!("sink.auth.{a} and sink.auth.{b} are exclusive"));
            }
        }
        let has_password = self.password.is_some() || self.password_file.is_some();
        if self.user.is_some() != has_password {
            return Err(
                "sink.auth.user needs sink.auth.password or sink.auth.password_file, and vice versa".into(),
            );
        }
        let methods = [
            ("user/password", self.user.is_some()),
            ("token", self.token.is_some() || self.token_file.is_some()),
            (
                "nkey_seed",
                self.nkey_seed.is_some() || self.nkey_seed_file.is_some(),
            ),
            ("credentials_file", self.credentials_file.is_some()),
        ];
        let chosen: Vec<&str> = methods.iter().filter(|m| m.1).map(|m| m.0).collect();
        if chosen.len() > 1 {
            return Err(format!(
                "sink.auth: choose one authentication method, not {}",
                chosen.join(" and ")
            ));
        }
        Ok(())
    }
}

impl NatsConfig {
    /// The subjects a created stream captures: `create_stream.subjects`, or the sink's
    /// subject with each templated token turned into `*`.
    pub fn stream_subjects(&self) -> Vec<String> {
        match &self.create_stream {
            Some(create) if !create.subjects.is_empty() => create.subjects.clone(),
            _ => vec![template_to_wildcard(&self.subject)],
        }
    }

    /// The server list, with surrounding whitespace removed.
    pub fn servers(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).collect()
    }

    /// The URL(s) with any `user:password@` part masked, for logs and errors.
    pub fn redacted_url(&self) -> String {
        self.servers()
            .into_iter()
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl CreateStreamConfig {
    fn validate(&self) -> Result<(), String> {
        validate_stream_name(&self.name).map_err(|e| format!("sink.create_stream.name: {e}"))?;
        for subject in &self.subjects {
            validate_filter(subject)
                .map_err(|e| format!("sink.create_stream.subjects: {subject:?}: {e}"))?;
        }
        if self.duplicate_window_secs == 0 {
            return Err("sink.create_stream.duplicate_window_secs must be greater than 0".into());
        }
        if self.replicas == 0 {
            return Err("sink.create_stream.replicas must be at least 1".into());
        }
        Ok(())
    }
}

/// True when `template` contains a `{...}` placeholder.
pub(crate) fn has_placeholder(template: &str) -> bool {
    template.contains('{')
}

/// Replaces each token of a subject template that holds a placeholder by `*`.
///
/// A value that itself contains dots spans several tokens, which `*` does not match: give
/// `create_stream.subjects` explicitly (for example with `>`) in that case.
pub(crate) fn template_to_wildcard(template: &str) -> String {
    // Placeholder names may contain dots (`{metadata.a.b}`): mark each placeholder with a
    // character a subject cannot hold before splitting into tokens.
    let mut marked = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        marked.push_str(&rest[..start]);
        marked.push('\0');
        rest = match rest[start..].find('}') {
            Some(end) => &rest[start + end + 1..],
            None => "",
        };
    }
    marked.push_str(rest);
    marked
        .split('.')
        .map(|token| if token.contains('\0') { "*" } else { token })
        .collect::<Vec<_>>()
        .join(".")
}

/// Masks the user information of a URL (`nats://user:pass@host` -> `nats://***@host`).
pub(crate) fn redact_url(url: &str) -> String {
    let (scheme, rest) = match url.find("://") {
        Some(i) => (&url[..i + 3], &url[i + 3..]),
        None => ("", url),
    };
    match rest.rfind('@') {
        Some(at) => format!("{scheme}***@{}", &rest[at + 1..]),
        None => url.to_string(),
    }
}

/// Checks a subject a message can be published to: non-empty dot-separated tokens, no
/// whitespace or control characters, no wildcards.
pub(crate) fn validate_subject(subject: &str) -> Result<(), String> {
    validate_tokens(subject, false)
}

/// Checks a subject filter (wildcards allowed), as a stream captures.
fn validate_filter(subject: &str) -> Result<(), String> {
    validate_tokens(subject, true)
}

fn validate_tokens(subject: &str, wildcards: bool) -> Result<(), String> {
    if subject.is_empty() {
        return Err("subject is empty".into());
    }
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "subject {subject:?} contains whitespace or control characters"
        ));
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(format!("subject {subject:?} has an empty token"));
        }
        let wildcard = *token == "*" || (*token == ">" && i + 1 == tokens.len());
        if (*token == "*" || *token == ">") && !wildcards {
            return Err(format!(
                "subject {subject:?} has a wildcard; messages need a literal subject"
            ));
        }
        if !wildcard && (token.contains('*') || token.contains('>')) {
            return Err(format!("subject {subject:?} has '*' or '>' inside a token"));
        }
    }
    Ok(())
}

/// Checks a subject template: placeholders are well formed and the literal parts would
/// make a valid subject.
fn validate_subject_template(template: &str) -> Result<(), String> {
    let mut literal = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        literal.push_str(&rest[..start]);
        let after = &rest[start + 1..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in {template:?}"))?;
        let name = &after[..end];
        let known = name == "queue_id"
            || name
                .strip_prefix("metadata.")
                .is_some_and(|n| !n.is_empty());
        if !known {
            return Err(format!(
                "unknown placeholder {{{name}}} in {template:?} (use {{queue_id}} or {{metadata.NAME}})"
            ));
        }
        literal.push('x');
        rest = &after[end + 1..];
    }
    if rest.contains('}') {
        return Err(format!("unmatched '}}' in {template:?}"));
    }
    literal.push_str(rest);
    validate_subject(&literal)
}

fn validate_stream_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("stream name is empty".into());
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
    {
        return Err(format!(
            "stream name {name:?} may not contain whitespace, '.', '*', '>', '/' or '\\'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<NatsConfig, String> {
        let text =
            format!("url = \"nats://127.0.0.1:4222\"\nsubject = \"events.{{queue_id}}\"\n{extra}");
        let cfg: NatsConfig = toml::from_str(&text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn contract_parses_with_defaults() {
        let cfg = parse("jetstream = true").unwrap();
        assert!(cfg.jetstream);
        assert_eq!(cfg.publish_timeout_ms, DEFAULT_PUBLISH_TIMEOUT_MS);
        assert_eq!(cfg.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
        assert_eq!(cfg.stream_subjects(), vec!["events.*".to_string()]);
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(parse("jetstrem = true").unwrap_err().contains("jetstrem"));
    }

    #[test]
    fn bad_templates_and_subjects_name_the_key() {
        let bad = |subject: &str| {
            let text = format!("url = \"nats://h\"\nsubject = {subject:?}\n");
            let cfg: NatsConfig = toml::from_str(&text).unwrap();
            cfg.validate().unwrap_err()
        };
        assert!(bad("events.{other}").contains("sink.subject"));
        assert!(bad("events.{queue_id").contains("unclosed"));
        assert!(bad("events..x").contains("empty token"));
        assert!(bad("events.*").contains("wildcard"));
        assert!(bad("has space").contains("whitespace"));
        assert!(bad("").contains("empty"));
    }

    #[test]
    fn auth_methods_are_exclusive_and_complete() {
        assert!(parse("[auth]\nuser = \"u\"")
            .unwrap_err()
            .contains("sink.auth.user"));
        assert!(parse("[auth]\nuser = \"u\"\npassword = \"p\"").is_ok());
        let err = parse("[auth]\ntoken = \"t\"\ntoken_file = \"/t\"").unwrap_err();
        assert!(err.contains("exclusive"), "{err}");
        let err = parse("[auth]\ntoken = \"t\"\ncredentials_file = \"/c\"").unwrap_err();
        assert!(err.contains("token and credentials_file"), "{err}");
        assert!(parse("[auth]\npasword = \"p\"")
            .unwrap_err()
            .contains("pasword"));
    }

    #[test]
    fn secrets_do_not_show_in_debug() {
        for auth in [
            "user = \"u\"\npassword = \"hunter2-secret\"",
            "token = \"tok-secret\"",
            "nkey_seed = \"SUAseed-secret\"",
        ] {
            let cfg = parse(&format!("[auth]\n{auth}")).unwrap();
            let text = format!("{cfg:?}");
            assert!(!text.contains("secret"), "{text}");
        }
    }

    #[test]
    fn create_stream_and_tls_tables() {
        let cfg = parse(
            "[create_stream]\nname = \"EVENTS\"\nduplicate_window_secs = 600\n[tls]\nca_file = \"/ca.pem\"\n",
        )
        .unwrap();
        let create = cfg.create_stream.as_ref().unwrap();
        assert_eq!(create.duplicate_window_secs, 600);
        assert_eq!(create.storage, StreamStorage::File);
        assert!(cfg.tls.as_ref().unwrap().required);
        assert!(parse("[create_stream]\nname = \"A.B\"")
            .unwrap_err()
            .contains("create_stream.name"));
        assert!(parse("[tls]\ncert_file = \"/c\"")
            .unwrap_err()
            .contains("key_file"));
        assert!(parse("stream = \"S\"\n[create_stream]\nname = \"S\"").is_err());
        assert!(parse("jetstream = false\nstream = \"S\"").is_err());
    }

    #[test]
    fn url_credentials_do_not_show_in_debug() {
        let text = "url = \"nats://u:hunter2@h:4222\"\nsubject = \"s\"\n";
        let cfg: NatsConfig = toml::from_str(text).unwrap();
        let debug = format!("{cfg:?}");
        assert!(
            !debug.contains("hunter2") && debug.contains("***@h:4222"),
            "{debug}"
        );
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(redact_url("nats://u:p@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("h:4222"), "h:4222");
        let cfg = parse("").unwrap();
        assert_eq!(cfg.redacted_url(), "nats://127.0.0.1:4222");
    }

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../../config/nats.toml");
        let mut doc: toml::Table = toml::from_str(text).unwrap();
        let mut sink = doc.remove("sink").unwrap().as_table().unwrap().clone();
        assert_eq!(sink.remove("type").unwrap().as_str(), Some("nats"));
        let cfg: NatsConfig = toml::Value::Table(sink).try_into().unwrap();
        cfg.validate().unwrap();
        assert!(cfg.jetstream);
        assert_eq!(cfg.subject, "events.{queue_id}");
    }

    #[test]
    fn wildcard_from_template() {
        assert_eq!(
            template_to_wildcard("a.{queue_id}.b-{metadata.x}.c"),
            "a.*.*.c"
        );
        assert_eq!(template_to_wildcard("plain"), "plain");
    }
}
