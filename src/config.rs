//! The bridge's configuration: a TOML file with `${ENV}` interpolation.
//!
//! Loading happens in three steps, kept apart so each can be tested alone:
//! 1. the text is parsed as TOML, then [`interpolate`] replaces `${NAME}` with the
//!    environment variable `NAME` inside string values only (`$$` is a literal `$`); the
//!    value is taken verbatim and cannot change the file's structure; a missing variable
//!    is an error naming it and the key it is used in;
//! 2. deserializing into `deny_unknown_fields` structs, where an unknown key is an error
//!    naming its full path (`queue.batchsize`);
//! 3. [`Config::validate`]: I/O-free range and consistency checks, naming the key.
//!
//! Reaching the API and the sink is `cfq-bridge check`'s job, not this module's.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

pub use crate::sources::archive::ArchiveConfig;
pub use crate::sources::cloudflare::config::{
    Concurrency, QueueConfig, V8Policy, DEFAULT_API_BASE_URL, MAX_RETRY_DELAY_SECS,
    MAX_VISIBILITY_TIMEOUT_MS,
};
pub use cfq_sinks::SinkConfig;

/// The source table of a config, for `run` and `check`.
#[derive(Debug, Clone, Copy)]
pub enum SourceConfig<'a> {
    /// `[queue]`: pull from a Cloudflare queue.
    Queue(&'a QueueConfig),
    /// `[archive]`: read archive files.
    Archive(&'a ArchiveConfig),
}

/// The environment variable holding the API token (the official SDKs' convention).
pub const TOKEN_ENV: &str = "CLOUDFLARE_API_TOKEN";

/// A configuration error, with the key or file it is about.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `${NAME}` named a variable that is not set.
    #[error("config `{key}` refers to environment variable ${{{name}}}, which is not set")]
    MissingEnv {
        /// The variable.
        name: String,
        /// The key path of the string that names it (`queue.account_id`).
        key: String,
    },
    /// `${` without a closing `}` in a string value.
    #[error("config `{key}` has an unterminated `${{` (write `$$` for a literal `$`)")]
    BadInterpolation {
        /// The key path of the string (`queue.account_id`).
        key: String,
    },
    /// TOML syntax or a type error, or an unknown key.
    #[error("invalid config at `{path}`: {message}")]
    Parse {
        /// The key path (`queue.batch_size`), or `.` for the document.
        path: String,
        /// What is wrong.
        message: String,
    },
    /// A value out of range or inconsistent with another.
    #[error("invalid config: {0}")]
    Invalid(String),
    /// A table the command needs is not in the file.
    #[error("the config has no [{table}] table: add one ({why})")]
    Missing {
        /// The table's name.
        table: &'static str,
        /// What the table says, for the message.
        why: &'static str,
    },
    /// No token in the environment and no `api_token_file`, or an unreadable token file.
    #[error("{0}")]
    Token(String),
}

/// The whole configuration file.
///
/// Every table is optional when parsing, because commands use them in different roles:
/// `run` and `check` read from the one source table (`[queue]` or `[archive]`) and
/// write to `[sink]`;
/// `replay` publishes into the queue named by `[queue]` and needs no `[sink]`. Each
/// command asks for the tables it needs ([`Config::queue`], [`Config::sink`]), and a
/// missing one is an error naming it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// A Cloudflare queue: where `run` pulls from, or where `replay` publishes to.
    #[serde(default)]
    pub queue: Option<QueueConfig>,
    /// Archive files: what `run` reads instead of a queue.
    #[serde(default)]
    pub archive: Option<ArchiveConfig>,
    /// Where `run` delivers records.
    #[serde(default)]
    pub sink: Option<SinkConfig>,
    /// Prometheus metrics exporter (off unless `listen` is set).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// Several source → sink routes in one process, instead of the single-route tables
    /// (`[queue]` or `[archive]`, and `[sink]`).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

/// One `[[routes]]` entry: a named source (`queue` or `archive`) and its sink.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The route's name: the `route` label of its metrics, and how errors name it.
    pub name: String,
    /// A Cloudflare queue to pull from.
    #[serde(default)]
    pub queue: Option<QueueConfig>,
    /// Archive files to read.
    #[serde(default)]
    pub archive: Option<ArchiveConfig>,
    /// Where the route's records go.
    pub sink: SinkConfig,
}

/// One route of a config, borrowed: its name, source and sink.
#[derive(Debug, Clone, Copy)]
pub struct Route<'a> {
    /// `default` for the single-route form.
    pub name: &'a str,
    /// Where records come from.
    pub source: SourceConfig<'a>,
    /// Where they go.
    pub sink: &'a SinkConfig,
}

impl Route<'_> {
    /// The route's API token, for a queue source: its `api_token_file`, else
    /// `CLOUDFLARE_API_TOKEN`.
    pub fn api_token(&self) -> Result<SecretString, ConfigError> {
        match self.source {
            SourceConfig::Queue(queue) => {
                read_token(queue.api_token_file.as_deref(), |n| std::env::var(n).ok())
            }
            SourceConfig::Archive(_) => Err(ConfigError::Token(format!(
                "route `{}` reads an archive and uses no API token",
                self.name
            ))),
        }
    }
}

impl RouteConfig {
    fn validate(&self) -> Result<(), String> {
        let valid_name = !self.name.is_empty()
            && self.name.len() <= 64
            && self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !valid_name {
            return Err(format!(
                "route name {:?}: use 1 to 64 letters, digits, `-` or `_`",
                self.name
            ));
        }
        let named = |e: String| format!("route `{}`: {e}", self.name);
        match (&self.queue, &self.archive) {
            (Some(queue), None) => queue.validate().map_err(named)?,
            (None, Some(archive)) => archive.validate().map_err(named)?,
            (Some(_), Some(_)) => {
                return Err(named(
                    "has both `queue` and `archive`; a route reads from one source".into(),
                ))
            }
            (None, None) => {
                return Err(named(
                    "needs a source: a [routes.queue] or a [routes.archive] table".into(),
                ))
            }
        }
        self.sink.validate().map_err(|e| named(e.to_string()))
    }
}

/// The `[metrics]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for a Prometheus `/metrics` endpoint, e.g. `127.0.0.1:9464`. Off when absent.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
}

impl Config {
    /// Reads, interpolates, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, |name| std::env::var(name).ok())
    }

    /// Parses config text, interpolates its strings with `lookup`, deserializes and
    /// validates it.
    pub fn from_toml(
        text: &str,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let message = match e.span() {
                Some(span) => {
                    let before = &text.as_bytes()[..span.start.min(text.len())];
                    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
                    format!("{} (line {line})", e.message())
                }
                None => e.message().to_string(),
            };
            ConfigError::Parse {
                path: ".".to_string(),
                message,
            }
        })?;
        interpolate(&mut table, lookup)?;
        let value = toml::Value::Table(table);
        let config: Config = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            ConfigError::Parse {
                path,
                message: inner.message().to_string(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// I/O-free checks of ranges and consistency of every table present, and that there is
    /// something to do: a source table.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.routes.is_empty() {
            return self.validate_routes();
        }
        if self.queue.is_none() && self.archive.is_none() {
            return Err(ConfigError::Missing {
                table: "queue",
                why: "the queue to pull from (run) or to publish to (replay); or an [archive] table to read files",
            });
        }
        if let Some(queue) = &self.queue {
            queue.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(archive) = &self.archive {
            archive.validate().map_err(ConfigError::Invalid)?;
        }
        if let Some(sink) = &self.sink {
            sink.validate()
                .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        }
        Ok(())
    }

    fn validate_routes(&self) -> Result<(), ConfigError> {
        if self.queue.is_some() || self.archive.is_some() || self.sink.is_some() {
            return Err(ConfigError::Invalid(
                "the config has [[routes]] and also a top-level [queue], [archive] or [sink]; \
                 move those into a [[routes]] entry (or drop [[routes]])"
                    .into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for route in &self.routes {
            route.validate().map_err(ConfigError::Invalid)?;
            if !names.insert(route.name.as_str()) {
                return Err(ConfigError::Invalid(format!(
                    "two routes are named `{}`; route names must be unique",
                    route.name
                )));
            }
        }
        Ok(())
    }

    /// Every route: the `[[routes]]` entries, or the single route of `[queue]`/`[archive]`
    /// and `[sink]`, named `default`.
    pub fn routes(&self) -> Result<Vec<Route<'_>>, ConfigError> {
        if self.routes.is_empty() {
            return Ok(vec![Route {
                name: crate::stats::DEFAULT_ROUTE,
                source: self.source()?,
                sink: self.sink()?,
            }]);
        }
        self.routes
            .iter()
            .map(|r| {
                let source = match (&r.queue, &r.archive) {
                    (Some(queue), None) => SourceConfig::Queue(queue),
                    (None, Some(archive)) => SourceConfig::Archive(archive),
                    _ => {
                        return Err(ConfigError::Invalid(format!(
                        "route `{}` needs exactly one source: [routes.queue] or [routes.archive]",
                        r.name
                    )))
                    }
                };
                Ok(Route {
                    name: &r.name,
                    source,
                    sink: &r.sink,
                })
            })
            .collect()
    }

    /// The `[queue]` table, or an error saying it is needed.
    pub fn queue(&self) -> Result<&QueueConfig, ConfigError> {
        self.queue.as_ref().ok_or(ConfigError::Missing {
            table: "queue",
            why: "the Cloudflare queue to pull from or to publish to",
        })
    }

    /// The one source table `run` reads from: `[queue]` or `[archive]`.
    pub fn source(&self) -> Result<SourceConfig<'_>, ConfigError> {
        match (&self.queue, &self.archive) {
            (Some(_), Some(_)) => Err(ConfigError::Invalid(
                "the config has both [queue] and [archive]; `run` reads from one source: keep one of them".into(),
            )),
            (Some(queue), None) => Ok(SourceConfig::Queue(queue)),
            (None, Some(archive)) => Ok(SourceConfig::Archive(archive)),
            (None, None) => Err(ConfigError::Missing {
                table: "queue",
                why: "the queue to pull from; or an [archive] table to read files",
            }),
        }
    }

    /// The `[sink]` table, or an error saying it is needed.
    pub fn sink(&self) -> Result<&SinkConfig, ConfigError> {
        self.sink.as_ref().ok_or(ConfigError::Missing {
            table: "sink",
            why: "where records go; see config/*.toml for one of each type",
        })
    }

    /// Reads the API token of the `[queue]` table: the file named by `api_token_file`, else
    /// `CLOUDFLARE_API_TOKEN`.
    pub fn api_token(&self) -> Result<SecretString, ConfigError> {
        read_token(self.queue()?.api_token_file.as_deref(), |n| {
            std::env::var(n).ok()
        })
    }
}

/// Reads the token from `file` when given, else from the environment via `lookup`.
pub fn read_token(
    file: Option<&Path>,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<SecretString, ConfigError> {
    let token = match file {
        Some(path) => std::fs::read_to_string(path).map_err(|e| {
            ConfigError::Token(format!(
                "cannot read queue.api_token_file {}: {e}",
                path.display()
            ))
        })?,
        None => lookup(TOKEN_ENV).ok_or_else(|| {
            ConfigError::Token(format!(
                "no API token: set the environment variable {TOKEN_ENV} or queue.api_token_file \
                 (a Cloudflare API token with Queues read and write)"
            ))
        })?,
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        return Err(ConfigError::Token("the API token is empty".into()));
    }
    let secret = SecretString::from(token);
    debug_assert!(!secret.expose_secret().is_empty());
    Ok(secret)
}

/// Replaces `${NAME}` with `lookup(NAME)` inside every string value of `table`, in place.
///
/// Keys are never touched, nor anything outside a string (comments are gone once the TOML
/// is parsed, so a commented-out `${NAME}` needs no variable). A value is pasted verbatim:
/// quotes, newlines or brackets in it stay part of that one string, and it is not scanned
/// again. `$$` stands for a literal `$`, and a `$` followed by anything but `$` or `{` is
/// kept as is.
pub fn interpolate(
    table: &mut toml::Table,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let mut path = String::new();
    for (key, value) in table.iter_mut() {
        interpolate_value(value, &mut path, key, &lookup)?;
    }
    Ok(())
}

/// Walks `value`, found at `path` + `.key`, substituting inside its strings.
fn interpolate_value(
    value: &mut toml::Value,
    path: &mut String,
    key: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    let parent_len = path.len();
    if !path.is_empty() {
        path.push('.');
    }
    path.push_str(key);
    let result = interpolate_at(value, path, lookup);
    path.truncate(parent_len);
    result
}

/// Substitutes inside `value`, whose key path is `path`.
fn interpolate_at(
    value: &mut toml::Value,
    path: &mut String,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    match value {
        toml::Value::String(s) => {
            if s.contains('$') {
                *s = interpolate_str(s, path, lookup)?;
            }
            Ok(())
        }
        toml::Value::Table(table) => {
            for (key, value) in table.iter_mut() {
                interpolate_value(value, path, key, lookup)?;
            }
            Ok(())
        }
        toml::Value::Array(items) => {
            let parent_len = path.len();
            for (i, item) in items.iter_mut().enumerate() {
                path.push_str(&format!("[{i}]"));
                let result = interpolate_at(item, path, lookup);
                path.truncate(parent_len);
                result?;
            }
            Ok(())
        }
        toml::Value::Integer(_)
        | toml::Value::Float(_)
        | toml::Value::Boolean(_)
        | toml::Value::Datetime(_) => Ok(()),
    }
}

/// Interpolates one string value, found at `key`.
fn interpolate_str(
    text: &str,
    key: &str,
    lookup: &impl Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(tail) = after.strip_prefix('{') {
            let end = tail
                .find(['}', '\n'])
                .filter(|&i| tail.as_bytes()[i] == b'}')
                .ok_or_else(|| ConfigError::BadInterpolation {
                    key: key.to_string(),
                })?;
            let name = &tail[..end];
            let value = lookup(name).ok_or_else(|| ConfigError::MissingEnv {
                name: name.to_string(),
                key: key.to_string(),
            })?;
            out.push_str(&value);
            rest = &tail[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[queue]
account_id = "acc"
queue_id = "q"
[sink]
type = "stdout"
"#;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = Config::from_toml(MINIMAL, no_env).unwrap();
        assert_eq!(c.queue().unwrap().batch_size, 100);
        assert_eq!(c.queue().unwrap().visibility_timeout_ms, 60_000);
        assert_eq!(c.queue().unwrap().pullers, Concurrency::Auto);
        assert_eq!(c.queue().unwrap().ack_concurrency, Concurrency::Auto);
        assert_eq!(c.queue().unwrap().max_in_flight, 2000);
        assert_eq!(c.queue().unwrap().api_base_url, DEFAULT_API_BASE_URL);
        assert_eq!(c.queue().unwrap().v8_policy, V8Policy::Release);
    }

    #[test]
    fn unknown_key_names_its_path() {
        let text = MINIMAL.replace("queue_id = \"q\"", "queue_id = \"q\"\nbatchsize = 5");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("queue.batchsize"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
        let text = MINIMAL.replace(
            "type = \"stdout\"",
            "type = \"jsonl\"\npath = \"x\"\npth = 1",
        );
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("pth"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_named() {
        for (key, value) in [
            ("batch_size", "101"),
            ("batch_size", "0"),
            ("visibility_timeout_ms", "43200001"),
            ("pullers", "0"),
            ("pullers", "\"many\""),
            ("min_pullers", "0"),
            ("max_pullers", "65"),
            ("ack_concurrency", "0"),
            ("retry_max_delay_secs", "50000"),
        ] {
            let text = MINIMAL.replace(
                "queue_id = \"q\"",
                &format!("queue_id = \"q\"\n{key} = {value}"),
            );
            let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
            assert!(
                err.contains(&format!("queue.{key}")),
                "{key}={value}: {err}"
            );
        }
    }

    #[test]
    fn missing_required_key_is_named() {
        let text = MINIMAL.replace("account_id = \"acc\"\n", "");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("account_id"), "{err}");
        // A file without [sink] loads (replay needs none), and asking for it names it.
        let c = Config::from_toml("[queue]\naccount_id='a'\nqueue_id='q'\n", no_env).unwrap();
        let err = c.sink().unwrap_err().to_string();
        assert!(err.contains("[sink]"), "{err}");
        let err = Config::from_toml("[sink]\ntype='stdout'\n", no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[queue]"), "{err}");
    }

    /// `MINIMAL` with `account_id` taken from `${ACC}`, which holds `value`.
    fn load_with_acc(value: &str) -> Result<Config, ConfigError> {
        let text = MINIMAL.replace("\"acc\"", "\"${ACC}\"");
        Config::from_toml(&text, |n| (n == "ACC").then(|| value.to_string()))
    }

    #[test]
    fn env_interpolation() {
        let c = load_with_acc("from-env").unwrap();
        assert_eq!(c.queue().unwrap().account_id, "from-env");
        let text = MINIMAL.replace("\"acc\"", "\"${ACC}\"");
        let err = Config::from_toml(&text, no_env).unwrap_err();
        assert!(
            matches!(&err, ConfigError::MissingEnv { name, key } if name == "ACC" && key == "queue.account_id"),
            "{err:?}"
        );
        let err = err.to_string();
        assert!(
            err.contains("${ACC}") && err.contains("queue.account_id"),
            "{err}"
        );
    }

    #[test]
    fn env_values_are_taken_verbatim_and_cannot_change_the_structure() {
        // Each would, pasted into the source, end the string early, add a line or a table.
        for value in [
            "a\"b",
            "a\nb",
            "a]b",
            "a$$b",
            "${OTHER}",
            "x\"\n[sink]\ntype=\"stdout",
            "x\"\nbatch_size = 1\ny=\"",
            "'''\"\"\"\\",
        ] {
            let c = load_with_acc(value).unwrap_or_else(|e| panic!("{value:?}: {e}"));
            assert_eq!(c.queue().unwrap().account_id, value, "value {value:?}");
            // Nothing else moved: defaults and the sink are as in MINIMAL.
            assert_eq!(c.queue().unwrap().queue_id, "q");
            assert_eq!(c.queue().unwrap().batch_size, 100, "value {value:?}");
            assert_eq!(c.sink().unwrap().kind(), "stdout");
        }
    }

    #[test]
    fn only_string_values_are_interpolated() {
        let mut table: toml::Table = r#"
"${KEY}" = "${X}"
n = 5
list = ["a${X}", "$$", "${X}$$${X}", "5$", "$a", "$$${X}", "$${X}"]
[t.u]
v = "pre-${X}-post"
# comment = "${UNSET}"
"#
        .parse()
        .unwrap();
        let x = |n: &str| (n == "X").then(|| "x".to_string());
        interpolate(&mut table, x).unwrap();
        let expected: toml::Table = r#"
"${KEY}" = "x"
n = 5
list = ["ax", "$", "x$x", "5$", "$a", "$x", "${X}"]
[t.u]
v = "pre-x-post"
"#
        .parse()
        .unwrap();
        assert_eq!(table, expected);
    }

    #[test]
    fn interpolation_errors_name_the_key_path() {
        let mut table: toml::Table = "[sink]\nbrokers = [\"ok\", \"${MISSING}\"]\n"
            .parse()
            .unwrap();
        let err = interpolate(&mut table, no_env).unwrap_err();
        assert!(
            matches!(&err, ConfigError::MissingEnv { name, key } if name == "MISSING" && key == "sink.brokers[1]"),
            "{err:?}"
        );
        let mut table: toml::Table = "[queue]\nqueue_id = \"a${OPEN\"\n".parse().unwrap();
        let err = interpolate(&mut table, no_env).unwrap_err();
        assert!(
            matches!(&err, ConfigError::BadInterpolation { key } if key == "queue.queue_id"),
            "{err:?}"
        );
        let err = Config::from_toml("[queue\n", no_env)
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1"), "{err}");
    }

    #[test]
    fn unknown_sink_type_is_an_error() {
        let text = MINIMAL.replace("\"stdout\"", "\"s3\"");
        let err = Config::from_toml(&text, no_env).unwrap_err().to_string();
        assert!(err.contains("sink"), "{err}");
    }

    #[test]
    fn token_comes_from_file_or_env_and_never_prints() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tok");
        std::fs::write(&file, "s3cr3t-token\n").unwrap();
        let t = read_token(Some(&file), no_env).unwrap();
        assert_eq!(t.expose_secret(), "s3cr3t-token");
        assert!(!format!("{t:?}").contains("s3cr3t"));
        let t = read_token(None, |n| (n == TOKEN_ENV).then(|| "envtok".into())).unwrap();
        assert_eq!(t.expose_secret(), "envtok");
        let err = read_token(None, no_env).unwrap_err().to_string();
        assert!(err.contains(TOKEN_ENV), "{err}");
    }
}
