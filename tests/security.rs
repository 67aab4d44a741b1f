//! Security properties of the bridge:
//! - the API token never appears in the log output, even at `--log trace`, nor in the
//!   `Debug` output of the config, the client or the secret;
//! - no command-line flag takes a token, and `run --token X` is refused;
//! - a plain-http base URL is logged as a warning;
//! - TLS certificates are verified: an https API whose certificate is not signed by a
//!   trusted authority is refused. The client has no option to turn verification off
//!   (`ClientOptions` has no such field; `Client::new` never calls reqwest's
//!   `danger_accept_invalid_certs`); the last test pins that.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cfq_bridge::cloudflare::{ApiError, Client, ClientOptions};
use cfq_bridge::config::Config;
use cfq_emulator::{ContentType, EmulatorConfig, Endpoint, Faults, SeedSpec};
use common::*;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::SecretString;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// A token that cannot occur by chance in any log.
const SECRET: &str = "cfq-SECRET-4e1f9a7b2c";

fn output_text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_never_appears_in_trace_logs() {
    let emulator = start_emulator_with(EmulatorConfig {
        tokens: vec![SECRET.to_string()],
        // Error paths log more: let some requests fail.
        faults: Faults {
            error_500_rate: 0.1,
            rate_limit_429_rate: 0.05,
            retry_after_secs: 0,
            // Not queue details: `check` makes one call and must succeed.
            endpoints: vec![Endpoint::Pull, Endpoint::Ack],
            ..Faults::default()
        },
        ..EmulatorConfig::default()
    })
    .await;
    let queue = queue_name("tracelog");
    emulator.seed(
        ACCOUNT,
        &queue,
        &SeedSpec {
            count: 200,
            body_size: 50,
            content_type: ContentType::Json,
        },
    );
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{SECRET}\n")).unwrap();
    let archive = dir.path().join("a.jsonl");
    let from_env = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "batch_size = 20", &jsonl_sink(&archive)),
    );
    let from_file = dir.path().join("file.toml");
    std::fs::write(
        &from_file,
        config_text(
            &emulator,
            &queue,
            &format!(
                "batch_size = 20\napi_token_file = {}",
                serde_json::to_string(&token_file.display().to_string()).unwrap()
            ),
            "type = \"stdout\"",
        ),
    )
    .unwrap();

    // Token from the environment, a JSONL sink; token from a file, the stdout sink (the
    // records go to stdout, which is scanned too). Half the queue each; then `check`.
    let runs: [(&[&str], Option<&str>); 3] = [
        (
            &[
                "--log",
                "trace",
                "run",
                "--config",
                from_env.to_str().unwrap(),
            ],
            Some(SECRET),
        ),
        (
            &[
                "--log",
                "trace",
                "run",
                "--until-empty",
                "--config",
                from_file.to_str().unwrap(),
            ],
            None,
        ),
        (
            &[
                "--log",
                "trace",
                "check",
                "--config",
                from_env.to_str().unwrap(),
            ],
            Some(SECRET),
        ),
    ];
    for (i, (args, env_token)) in runs.iter().enumerate() {
        let mut cmd = bridge();
        match env_token {
            Some(t) => cmd.env("CLOUDFLARE_API_TOKEN", t),
            None => cmd.env_remove("CLOUDFLARE_API_TOKEN"),
        };
        let child = cmd
            .args(*args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let output = if i == 0 {
            // The first run is stopped with SIGTERM once it has archived something.
            let pid = child.id().unwrap().to_string();
            let stopper = async {
                wait_until("records archived", Duration::from_secs(60), async || {
                    std::fs::metadata(&archive)
                        .map(|m| m.len() > 2000)
                        .unwrap_or(false)
                })
                .await;
                std::process::Command::new("kill")
                    .args(["-TERM", &pid])
                    .status()
                    .unwrap();
            };
            let (output, ()) = tokio::join!(
                tokio::time::timeout(Duration::from_secs(90), child.wait_with_output()),
                stopper
            );
            output.expect("the bridge stops").unwrap()
        } else {
            tokio::time::timeout(Duration::from_secs(90), child.wait_with_output())
                .await
                .expect("the bridge finishes")
                .unwrap()
        };
        let text = output_text(&output);
        assert!(output.status.success(), "run {i}: {text}");
        println!(
            "run {i}: {} lines scanned, {} at TRACE level (from hyper/reqwest: {})",
            text.lines().count(),
            text.lines().filter(|l| l.contains("TRACE")).count(),
            text.lines()
                .filter(|l| l.contains("TRACE") && (l.contains("hyper") || l.contains("reqwest")))
                .count()
        );
        assert!(
            text.contains("TRACE") && text.contains("DEBUG"),
            "run {i} logged at trace level: {}",
            &text[..text.len().min(2000)]
        );
        assert!(
            !text.contains(SECRET),
            "run {i}: the token appears in the output:\n{}",
            text.lines()
                .filter(|l| l.contains(SECRET))
                .collect::<Vec<_>>()
                .join("\n")
        );
        assert!(
            !text.contains(&SECRET[4..]),
            "run {i}: part of the token appears in the output"
        );
    }
    assert_eq!(emulator.stats(ACCOUNT, &queue).backlog, 0);

    // A wrong token: refused, and not echoed either.
    let output = {
        let mut cmd = bridge();
        cmd.env("CLOUDFLARE_API_TOKEN", "cfq-WRONG-8d3a")
            .args([
                "--log",
                "trace",
                "run",
                "--config",
                from_env.to_str().unwrap(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .expect("a 401 stops the bridge")
            .unwrap()
    };
    let text = output_text(&output);
    assert!(!output.status.success());
    assert!(text.contains("authentication failed"), "{text}");
    assert!(!text.contains("cfq-WRONG-8d3a"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debug_output_never_shows_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, SECRET).unwrap();
    let text = format!(
        "[queue]\naccount_id = \"acc\"\nqueue_id = \"q\"\napi_token_file = {}\n[sink]\ntype = \"stdout\"\n",
        serde_json::to_string(&token_file.display().to_string()).unwrap()
    );
    let config = Config::from_toml(&text, |_| None).unwrap();
    let token = config.api_token().unwrap();
    let client = Client::new(ClientOptions {
        base_url: "https://api.cloudflare.com/client/v4",
        account_id: "acc",
        queue_id: "q",
        token: &token,
        request_timeout: Duration::from_secs(5),
        max_response_bytes: 1 << 20,
        pool_size: 1,
        shared_pool: None,
    })
    .unwrap();
    let from_env = cfq_bridge::config::read_token(None, |_| Some(SECRET.to_string())).unwrap();
    let shown = [
        format!("{config:?}"),
        format!("{config:#?}"),
        format!("{:?}", config.queue().unwrap()),
        format!("{token:?}"),
        format!("{from_env:?}"),
        format!("{client:?}"),
        format!("{client:#?}"),
    ];
    for s in &shown {
        assert!(!s.contains(SECRET), "Debug shows the token: {s}");
    }
    // The HTTP client behind it marks the header as sensitive (reqwest then hides it);
    // an error about a bad header value does not quote it either.
    let bad = SecretString::from(format!("{SECRET}\n"));
    let error = Client::new(ClientOptions {
        base_url: "https://api.cloudflare.com/client/v4",
        account_id: "acc",
        queue_id: "q",
        token: &bad,
        request_timeout: Duration::from_secs(5),
        max_response_bytes: 1 << 20,
        pool_size: 1,
        shared_pool: None,
    })
    .unwrap_err();
    assert!(!format!("{error} {error:?}").contains(SECRET));
}

/// Help text of a subcommand (or of the top level with `[]`).
async fn help(sub: &[&str]) -> String {
    let output = run_bridge(&[sub, &["--help"]].concat(), Duration::from_secs(30)).await;
    assert!(output.status.success(), "--help of {sub:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The option names (`--config`, `-c`) a help text lists.
fn option_names(help: &str) -> Vec<String> {
    help.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .flat_map(|l| {
            l.split([' ', ',', '='])
                .filter(|w| w.starts_with('-'))
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_command_line_flag_takes_the_token() {
    let suspicious = ["token", "secret", "password", "key", "auth", "credential"];
    let mut subcommands: Vec<&[&str]> = vec![
        &[],
        &["run"],
        &["check"],
        &["export"],
        &["doctor"],
        &["top"],
        &["archive", "verify"],
    ];
    if cfg!(feature = "emulator") {
        subcommands.push(&["demo"]);
    }
    if cfg!(feature = "cloudflare_queue") {
        subcommands.push(&["replay"]);
    }
    for sub in subcommands {
        let text = help(sub).await;
        let names = option_names(&text);
        assert!(names.iter().any(|n| n == "--help"), "{sub:?}: {names:?}");
        for name in &names {
            assert!(
                !suspicious.iter().any(|s| name.to_lowercase().contains(s)),
                "{sub:?} has a flag {name} that looks like it takes a secret"
            );
        }
    }
    // `run` and `check` say where the token comes from instead.
    assert!(help(&["run"]).await.contains("CLOUDFLARE_API_TOKEN"));
    // The emulator's `--token` is the list of tokens the local emulator accepts (test
    // credentials for a fake server), not the bridge's API token.
    if cfg!(feature = "emulator") {
        let emulator_help = help(&["emulator"]).await;
        assert!(emulator_help.contains("An API token to accept"));
    }

    for flag in [
        "--token",
        "--api-token",
        "--cloudflare-api-token",
        "--api-key",
    ] {
        for sub in ["run", "check"] {
            let output = run_bridge(
                &[sub, "--config", "x.toml", flag, SECRET],
                Duration::from_secs(30),
            )
            .await;
            let text = output_text(&output);
            assert_eq!(output.status.code(), Some(2), "{sub} {flag}: {text}");
            assert!(text.contains("unexpected argument"), "{sub} {flag}: {text}");
        }
    }
    // `--flag=value` too.
    let output = run_bridge(
        &["run", "--config", "x.toml", &format!("--token={SECRET}")],
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(output.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_http_base_url_logs_a_warning() {
    let emulator = start_emulator().await;
    let queue = queue_name("plainhttp");
    emulator.seed(ACCOUNT, &queue, &SeedSpec::default());
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &config_text(&emulator, &queue, "", "type = \"stdout\""),
    );
    assert!(emulator.base_url().starts_with("http://"));
    let output = run_bridge(
        &["run", "--until-empty", "--config", config.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    let text = output_text(&output);
    assert!(output.status.success(), "{text}");
    assert_eq!(
        warn_lines(&text, "queue.api_base_url is plain http"),
        1,
        "{text}"
    );
}

// ---------------------------------------------------------------------------------------
// TLS
// ---------------------------------------------------------------------------------------

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tls")
        .join(name)
}

/// A TLS server on 127.0.0.1 with a certificate for `127.0.0.1` and `localhost` signed
/// by a test CA nobody trusts. It answers any request with a Cloudflare-shaped 200.
struct TlsServer {
    port: u16,
    handshakes_ok: Arc<AtomicUsize>,
    handshakes_failed: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

async fn start_tls_server() -> TlsServer {
    use tokio_rustls::rustls;
    let certs = vec![CertificateDer::from_pem_file(fixture("server.pem")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(fixture("server.key.pem")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = TlsServer {
        port,
        handshakes_ok: Arc::default(),
        handshakes_failed: Arc::default(),
        requests: Arc::default(),
    };
    let (ok, failed, requests) = (
        Arc::clone(&server.handshakes_ok),
        Arc::clone(&server.handshakes_failed),
        Arc::clone(&server.requests),
    );
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let (ok, failed, requests) =
                (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&requests));
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    failed.fetch_add(1, Ordering::SeqCst);
                    return;
                };
                ok.fetch_add(1, Ordering::SeqCst);
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                requests.fetch_add(1, Ordering::SeqCst);
                let body =
                    r#"{"success":true,"errors":[],"messages":[],"result":{"queue_name":"tls"}}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untrusted_certificate_is_refused() {
    let server = start_tls_server().await;
    let base = format!("https://127.0.0.1:{}/client/v4", server.port);

    // Control: a client that trusts the test CA reaches the server, so the server works
    // and any refusal below is the certificate check.
    let ca = reqwest::Certificate::from_pem(&std::fs::read(fixture("ca.pem")).unwrap()).unwrap();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let answer = trusting
        .get(format!("{base}/accounts/a/queues/q"))
        .send()
        .await
        .expect("a client trusting the test CA connects");
    assert_eq!(answer.status(), 200);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);

    // The bridge's client, as built for `run`: refused during the handshake.
    let token = SecretString::from(SECRET.to_string());
    let client = Client::new(ClientOptions {
        base_url: &base,
        account_id: "a",
        queue_id: "q",
        token: &token,
        request_timeout: Duration::from_secs(10),
        max_response_bytes: 1 << 20,
        pool_size: 1,
        shared_pool: None,
    })
    .unwrap();
    let error = client.queue_details().await.unwrap_err();
    assert!(matches!(error, ApiError::Transport(_)), "{error:?}");
    assert!(
        error.to_string().contains("certificate"),
        "the error names the certificate problem: {error}"
    );
    assert_eq!(
        server.requests.load(Ordering::SeqCst),
        1,
        "no request (and so no token) reached the server"
    );

    // The binary: `check` fails with the reason, and an https URL gets no plain-http
    // warning.
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        &format!(
            "[queue]\naccount_id = \"a\"\nqueue_id = \"q\"\napi_base_url = \"{base}\"\n[sink]\ntype = \"stdout\"\n"
        ),
    );
    let output = run_bridge(
        &["check", "--config", config.to_str().unwrap()],
        Duration::from_secs(60),
    )
    .await;
    let text = output_text(&output);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("certificate"), "{text}");
    assert!(!text.contains("plain http"), "{text}");
    assert!(!text.contains(SECRET));
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    assert!(server.handshakes_failed.load(Ordering::SeqCst) >= 2);
    assert_eq!(server.handshakes_ok.load(Ordering::SeqCst), 1);
}

#[test]
fn the_client_has_no_switch_to_skip_certificate_checks() {
    // Every field of ClientOptions, named: adding one (say, `insecure`) breaks this
    // test's build, which is the point: such an option needs a deliberate decision.
    let token = SecretString::from("t".to_string());
    let options = ClientOptions {
        base_url: "https://example.invalid",
        account_id: "a",
        queue_id: "q",
        token: &token,
        request_timeout: Duration::from_secs(1),
        max_response_bytes: 1 << 16,
        pool_size: 1,
        shared_pool: None,
    };
    assert!(Client::new(options).is_ok());
    // And the client's source never asks reqwest to skip verification.
    let source = include_str!("../cloudflare/src/client.rs");
    for switch in [
        "danger_accept_invalid_certs",
        "danger_accept_invalid_hostnames",
        "tls_built_in_root_certs(false)",
    ] {
        assert!(
            !source.contains(switch),
            "cloudflare/src/client.rs uses {switch}"
        );
    }
}
