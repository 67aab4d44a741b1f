//! The NATS sink against the real server on 127.0.0.1:4222 (start it with
//! `bash .ci/start-nats.sh`). Each test uses its own stream and subjects, and deletes its
//! stream at the end. Tests that need their own server settings (auth) run a private one.

#![cfg(feature = "nats")]

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, stream::Config as StreamConfig};
use bytes::Bytes;
use cfq_sinks::nats::{NatsConfig, NatsSink};
use cfq_sinks::{CheckContext, ContentType, ErrorClass, Outcome, Record, Sink};
use futures_util::StreamExt;
use serde_json::json;

use common::nats_server::{require_shared_server, NatsServer, SHARED_URL};

/// A name no other test (or earlier run) uses.
fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!(
        "{prefix}_{}_{}_{}",
        std::process::id(),
        nanos % 1_000_000_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn config(toml_text: &str) -> NatsConfig {
    let cfg: NatsConfig = toml::from_str(toml_text).expect("test config parses");
    cfg.validate().expect("test config is valid");
    cfg
}

fn record(id: &str, queue: &str, content_type: ContentType, body: &[u8]) -> Record {
    common::record(id)
        .queue(queue)
        .timestamp_ms(1_710_950_954_154)
        .body(content_type, Bytes::copy_from_slice(body))
        .meta("tenant", "acme")
        .meta("n", 42)
        .build()
}

async fn js() -> jetstream::Context {
    require_shared_server();
    let client = async_nats::connect(SHARED_URL)
        .await
        .expect("connect to 4222");
    jetstream::new(client)
}

fn ctx() -> CheckContext {
    CheckContext {
        visibility_timeout_ms: 30_000,
        max_retry_delay_secs: 600,
    }
}

/// Reads every message of a stream, in order, with an independent client.
async fn read_all(
    js: &jetstream::Context,
    stream: &str,
) -> Vec<async_nats::jetstream::message::StreamMessage> {
    let mut s = js.get_stream(stream).await.expect("stream exists");
    let info = s.info().await.expect("stream info").clone();
    let mut out = Vec::new();
    for seq in info.state.first_sequence..=info.state.last_sequence {
        if info.state.messages == 0 {
            break;
        }
        out.push(s.get_raw_message(seq).await.expect("stored message"));
    }
    out
}

fn header<'a>(m: &'a async_nats::jetstream::message::StreamMessage, name: &str) -> Option<&'a str> {
    m.headers.get(name).map(|v| v.as_str())
}

#[tokio::test]
async fn every_record_is_stored_with_body_and_headers() {
    let js = js().await;
    let stream = unique("CFQ_STORE");
    let prefix = unique("cfqtest.store");
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{prefix}.{{queue_id}}'\n\
         [create_stream]\nname = '{stream}'\nstorage = 'memory'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    assert_eq!(sink.kind(), "nats");

    let kinds = [ContentType::Json, ContentType::Text, ContentType::Bytes];
    let records: Vec<Record> = (0..300)
        .map(|i| {
            let ct = kinds[i % 3];
            let body = match ct {
                ContentType::Json => json!({"i": i, "s": "x\ny"}).to_string().into_bytes(),
                ContentType::Text => format!("text message {i}").into_bytes(),
                _ => vec![0, 255, i as u8, 10, 13],
            };
            let mut r = record(&format!("id-{i:04}"), "q-one", ct, &body);
            r.attempts = 1 + (i % 3) as u32;
            r
        })
        .collect();
    for batch in records.chunks(100) {
        let outcomes = sink.deliver(batch).await;
        assert_eq!(outcomes.len(), batch.len());
        assert!(
            outcomes.iter().all(|o| *o == Outcome::Confirmed),
            "{outcomes:?}"
        );
    }

    let stored = read_all(&js, &stream).await;
    assert_eq!(stored.len(), records.len());
    for (m, r) in stored.iter().zip(&records) {
        assert_eq!(m.subject.as_str(), format!("{prefix}.q-one"));
        assert_eq!(m.payload, r.body, "body of {}", r.id);
        assert_eq!(header(m, "Nats-Msg-Id"), Some(r.id.as_str()));
        assert_eq!(header(m, "cf-queue-message-id"), Some(r.id.as_str()));
        assert_eq!(header(m, "cf-queue-id"), Some("q-one"));
        assert_eq!(header(m, "cf-queue-timestamp-ms"), Some("1710950954154"));
        assert_eq!(
            header(m, "cf-queue-attempts"),
            Some(r.attempts.to_string().as_str())
        );
        assert_eq!(header(m, "CF-Content-Type"), Some(r.content_type.as_str()));
        assert_eq!(header(m, "tenant"), Some("acme"));
        assert_eq!(header(m, "n"), Some("42"));
    }
    sink.close().await.expect("close");
    js.delete_stream(&stream).await.expect("cleanup");
}

#[tokio::test]
async fn a_redelivered_message_is_stored_once_and_counted_as_duplicate() {
    let js = js().await;
    let stream = unique("CFQ_DUP");
    let subject = unique("cfqtest.dup");
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{subject}'\n\
         [create_stream]\nname = '{stream}'\nstorage = 'memory'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let a = record("msg-a", "q", ContentType::Text, b"a");
    let b = record("msg-b", "q", ContentType::Text, b"b");
    assert_eq!(
        sink.deliver(&[a.clone(), b.clone()]).await,
        [Outcome::Confirmed, Outcome::Confirmed]
    );

    // Cloudflare redelivers `a` (lease expired before the ack reached it).
    let mut again = a.clone();
    again.attempts = 2;
    let c = record("msg-c", "q", ContentType::Text, b"c");
    let outcomes = sink.deliver(&[again, c.clone(), c.clone()]).await;
    assert_eq!(outcomes[0], Outcome::Duplicate);
    // The same id twice in one batch: stored once, the other counted as a duplicate.
    let mut tail = outcomes[1..].to_vec();
    tail.sort_by_key(|o| format!("{o:?}"));
    assert_eq!(tail, [Outcome::Confirmed, Outcome::Duplicate]);
    assert!(outcomes.iter().all(Outcome::is_confirmed));

    let stored = read_all(&js, &stream).await;
    let ids: Vec<&str> = stored
        .iter()
        .map(|m| header(m, "Nats-Msg-Id").unwrap())
        .collect();
    assert_eq!(ids, ["msg-a", "msg-b", "msg-c"]);
    // The stored copy of `a` is the first delivery.
    assert_eq!(header(&stored[0], "cf-queue-attempts"), Some("1"));
    js.delete_stream(&stream).await.expect("cleanup");
}

/// A record too large for the server cannot travel to the dead-letter subject either (the
/// same server's `max_payload` applies). It must fail permanently, so that Cloudflare keeps
/// it, and never be reported dead-lettered with an empty body: that would ack a lease
/// whose payload then exists nowhere.
#[tokio::test]
async fn a_record_above_max_payload_fails_permanently_and_is_never_dead_lettered_empty() {
    let dir = tempfile::tempdir().expect("temp dir");
    let conf = dir.path().join("small-payload.conf");
    std::fs::write(&conf, "max_payload: 4096\n").expect("write server config");
    let server = NatsServer::start_with_args(&["-c", conf.to_str().expect("utf-8 path")]);
    let url = server.url();
    let cfg = config(&format!(
        "url = '{url}'\nsubject = 'big.main'\ndead_letter_subject = 'big.dead'\n\
         [create_stream]\nname = 'BIG'\nsubjects = ['big.>']\nstorage = 'memory'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let max = client.server_info().max_payload;
    assert_eq!(
        max, 4096,
        "the private server runs with the small max_payload"
    );
    let big = record("too-big", "q", ContentType::Bytes, &vec![7u8; max + 1]);
    let small = record("small", "q", ContentType::Text, b"fine");

    let outcomes = sink.deliver(&[big, small]).await;
    match &outcomes[0] {
        Outcome::Failed(error) => {
            assert_eq!(error.class, ErrorClass::Permanent, "{error}");
            assert!(error.message.contains("too large"), "{error}");
            assert!(
                error
                    .message
                    .contains("dead-lettering to big.dead failed too"),
                "{error}"
            );
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }
    assert_eq!(outcomes[1], Outcome::Confirmed);

    let stored = read_all(&jetstream::new(client), "BIG").await;
    let subjects: Vec<&str> = stored.iter().map(|m| m.subject.as_str()).collect();
    assert_eq!(
        subjects,
        ["big.main"],
        "nothing, empty or not, was dead-lettered"
    );
    sink.close().await.expect("close");
}

/// A record its stream refuses as too large goes to a dead-letter stream that takes it:
/// whole, with the same body and every header.
#[tokio::test]
async fn a_record_its_stream_refuses_is_dead_lettered_whole() {
    let js = js().await;
    let main_stream = unique("CFQ_SMALL");
    let dead_stream = unique("CFQ_DEAD");
    let base = unique("cfqtest.whole");
    js.create_stream(StreamConfig {
        name: main_stream.clone(),
        subjects: vec![format!("{base}.main")],
        max_message_size: 1000,
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create main stream");
    js.create_stream(StreamConfig {
        name: dead_stream.clone(),
        subjects: vec![format!("{base}.dead")],
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create dead-letter stream");
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{base}.main'\nstream = '{main_stream}'\n\
         dead_letter_subject = '{base}.dead'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let body: Vec<u8> = (0..2000u32).map(|i| (i % 251) as u8).collect();
    let big = record("over-stream-limit", "q", ContentType::Bytes, &body);
    // A header NATS cannot carry: the record cannot travel anywhere whole.
    let mut odd = record("odd-header", "q", ContentType::Text, b"x");
    odd.metadata
        .insert("has space".into(), serde_json::Value::from("v"));

    let outcomes = sink.deliver(&[big, odd]).await;
    assert!(
        matches!(&outcomes[0], Outcome::DeadLettered { reason } if reason.contains("JetStream refused")),
        "{outcomes:?}"
    );
    match &outcomes[1] {
        Outcome::Failed(error) => {
            assert_eq!(error.class, ErrorClass::Permanent, "{error}");
            assert!(error.message.contains("cannot be dead-lettered"), "{error}");
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }

    assert!(read_all(&js, &main_stream).await.is_empty());
    let dead = read_all(&js, &dead_stream).await;
    assert_eq!(dead.len(), 1, "only the whole record was dead-lettered");
    let dead = &dead[0];
    assert_eq!(
        dead.payload,
        Bytes::from(body),
        "the body travels byte for byte"
    );
    for (name, value) in [
        ("CF-Content-Type", "bytes"),
        ("tenant", "acme"),
        ("n", "42"),
        ("cf-queue-message-id", "over-stream-limit"),
        ("cf-queue-id", "q"),
        ("cf-queue-attempts", "1"),
        ("cf-queue-timestamp-ms", "1710950954154"),
        ("Nats-Msg-Id", "over-stream-limit"),
        ("cfq-error-class", "permanent"),
    ] {
        assert_eq!(header(dead, name), Some(value), "header {name}");
    }
    assert_eq!(
        header(dead, "cfq-original-subject"),
        Some(format!("{base}.main").as_str())
    );
    assert!(header(dead, "cfq-body-omitted-bytes").is_none());
    js.delete_stream(&main_stream).await.expect("cleanup");
    js.delete_stream(&dead_stream).await.expect("cleanup");
}

#[tokio::test]
async fn without_dead_letter_subject_refused_records_fail_permanently() {
    let js = js().await;
    // The stream refuses messages above 1000 bytes (server error 10054), the server's
    // max_payload refuses 1 MiB + 1 before sending.
    let stream = unique("CFQ_LIMIT");
    let subject = unique("cfqtest.limit");
    js.create_stream(StreamConfig {
        name: stream.clone(),
        subjects: vec![subject.clone()],
        max_message_size: 1000,
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .expect("create stream");
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{subject}'\nstream = '{stream}'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let max = async_nats::connect(SHARED_URL)
        .await
        .unwrap()
        .server_info()
        .max_payload;
    let outcomes = sink
        .deliver(&[
            record("over-stream-limit", "q", ContentType::Bytes, &[1u8; 2000]),
            record(
                "over-max-payload",
                "q",
                ContentType::Bytes,
                &vec![1u8; max + 1],
            ),
            record("ok", "q", ContentType::Text, b"ok"),
        ])
        .await;
    for outcome in &outcomes[..2] {
        match outcome {
            Outcome::Failed(e) => assert_eq!(e.class, ErrorClass::Permanent, "{e}"),
            other => panic!("expected a permanent failure, got {other:?}"),
        }
    }
    assert_eq!(outcomes[2], Outcome::Confirmed);
    assert_eq!(read_all(&js, &stream).await.len(), 1);
    js.delete_stream(&stream).await.expect("cleanup");
}

#[tokio::test]
async fn a_missing_stream_is_a_clear_error_at_start_in_check_and_per_record() {
    let _js = js().await;
    let subject = unique("cfqtest.nostream");
    let cfg = config(&format!("url = '{SHARED_URL}'\nsubject = '{subject}'\n"));

    let err = match cfq_sinks::nats::build(&cfg).await {
        Ok(_) => panic!("build must refuse a subject without stream"),
        Err(e) => e,
    };
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(
        err.message.contains("no JetStream stream captures subject"),
        "{err}"
    );
    assert!(err.message.contains(&subject), "{err}");
    assert!(err.message.contains("must exist"), "{err}");

    let sink = NatsSink::connect(&cfg).await.expect("connects");
    let err = sink
        .check(&ctx())
        .await
        .expect_err("check reports the missing stream");
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(
        err.message.contains("no JetStream stream captures subject"),
        "{err}"
    );

    let outcomes = sink
        .deliver(&[record("m", "q", ContentType::Text, b"x")])
        .await;
    match &outcomes[0] {
        Outcome::Failed(e) => {
            assert_eq!(e.class, ErrorClass::Permanent);
            assert!(
                e.message.contains("no JetStream stream captures subject"),
                "{e}"
            );
        }
        other => panic!("expected a permanent failure, got {other:?}"),
    }

    // A named stream that does not exist is reported too.
    let named = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{subject}.{{queue_id}}'\nstream = '{}'\n",
        unique("CFQ_NONE")
    ));
    let sink = NatsSink::connect(&named).await.expect("connects");
    let err = sink.check(&ctx()).await.expect_err("missing named stream");
    assert!(err.message.contains("does not exist"), "{err}");
}

#[tokio::test]
async fn check_warns_when_the_duplicate_window_is_shorter_than_lease_plus_retry_delay() {
    let js = js().await;
    let short = unique("CFQ_SHORT");
    let subject = unique("cfqtest.window");
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{subject}.{{queue_id}}'\n\
         [create_stream]\nname = '{short}'\nduplicate_window_secs = 60\nstorage = 'memory'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let warnings = sink.check(&ctx()).await.expect("check passes");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("duplicate_window") && w.contains(&short)),
        "{warnings:?}"
    );
    js.delete_stream(&short).await.expect("cleanup");

    let long = unique("CFQ_LONG");
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{subject}.{{queue_id}}'\n\
         [create_stream]\nname = '{long}'\nduplicate_window_secs = 3600\nstorage = 'memory'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let warnings = sink.check(&ctx()).await.expect("check passes");
    assert!(warnings.is_empty(), "{warnings:?}");
    sink.ready().await.expect("ready");
    js.delete_stream(&long).await.expect("cleanup");
}

#[tokio::test]
async fn templated_subjects_use_queue_and_metadata() {
    let js = js().await;
    let stream = unique("CFQ_TPL");
    let base = unique("cfqtest.tpl");
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{base}.{{queue_id}}.{{metadata.tenant}}'\n\
         dead_letter_subject = '{base}.dead'\n\
         [create_stream]\nname = '{stream}'\nsubjects = ['{base}.>']\nstorage = 'memory'\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let ok = record("t1", "q9", ContentType::Text, b"x");
    let mut no_tenant = record("t2", "q9", ContentType::Text, b"y");
    no_tenant.metadata.remove("tenant");
    let outcomes = sink.deliver(&[ok, no_tenant]).await;
    assert_eq!(outcomes[0], Outcome::Confirmed);
    assert!(
        matches!(&outcomes[1], Outcome::DeadLettered { reason } if reason.contains("tenant")),
        "{outcomes:?}"
    );
    let stored = read_all(&js, &stream).await;
    let subjects: HashSet<String> = stored.iter().map(|m| m.subject.to_string()).collect();
    assert_eq!(
        subjects,
        HashSet::from([format!("{base}.q9.acme"), format!("{base}.dead")])
    );
    let dead = stored
        .iter()
        .find(|m| m.subject.as_str().ends_with(".dead"))
        .unwrap();
    assert_eq!(dead.payload, "y", "a body that is not the problem is kept");
    js.delete_stream(&stream).await.expect("cleanup");
}

#[tokio::test]
async fn core_mode_publishes_then_flushes() {
    require_shared_server();
    let subject = unique("cfqtest.core");
    let client = async_nats::connect(SHARED_URL).await.unwrap();
    let mut sub = client.subscribe(subject.clone()).await.unwrap();
    client.flush().await.unwrap();
    // Core mode weakens delivery: refused without the explicit flag, naming the key.
    let weak = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{subject}'\njetstream = false\n"
    ));
    let error = cfq_sinks::nats::build(&weak)
        .await
        .err()
        .expect("core mode needs allow_weaker_delivery");
    assert_eq!(error.class, ErrorClass::Permanent, "{error}");
    assert!(
        error.message.contains("sink.jetstream") && error.message.contains("allow_weaker_delivery"),
        "{error}"
    );
    let cfg = config(&format!(
        "url = '{SHARED_URL}'\nsubject = '{subject}'\njetstream = false\n\
         allow_weaker_delivery = true\n"
    ));
    let sink = cfq_sinks::nats::build(&cfg).await.expect("sink builds");
    let records: Vec<Record> = (0..50)
        .map(|i| {
            record(
                &format!("c{i}"),
                "q",
                ContentType::Text,
                format!("m{i}").as_bytes(),
            )
        })
        .collect();
    let outcomes = sink.deliver(&records).await;
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Confirmed),
        "{outcomes:?}"
    );
    let warnings = sink.check(&ctx()).await.expect("check");
    assert!(
        warnings.iter().any(|w| w.contains("confirms nothing")),
        "{warnings:?}"
    );
    for r in &records {
        let m = tokio::time::timeout(Duration::from_secs(5), sub.next())
            .await
            .expect("message arrives")
            .expect("subscription open");
        assert_eq!(m.payload, r.body);
        let h = m.headers.expect("headers");
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), r.id);
        assert_eq!(h.get("cf-queue-message-id").unwrap().as_str(), r.id);
    }
}

#[tokio::test]
async fn authentication_user_password_and_token_file() {
    let server = NatsServer::start_with_args(&["--user", "bridge", "--pass", "s3cret-pass"]);
    let url = server.url();

    let good = config(&format!(
        "url = '{url}'\nsubject = 'x'\njetstream = false\nallow_weaker_delivery = true\n[auth]\nuser = 'bridge'\npassword = 's3cret-pass'\n"
    ));
    let sink = NatsSink::connect(&good)
        .await
        .expect("right password connects");
    sink.ready().await.expect("ready");
    assert!(
        !format!("{sink:?} {good:?}").contains("s3cret"),
        "secret in Debug output"
    );

    let bad = config(&format!(
        "url = '{url}'\nsubject = 'x'\njetstream = false\nallow_weaker_delivery = true\nconnect_timeout_ms = 2000\n\
         [auth]\nuser = 'bridge'\npassword = 'wrong-pass'\n"
    ));
    let err = match cfq_sinks::nats::build(&bad).await {
        Ok(_) => panic!("a wrong password must not connect"),
        Err(e) => e,
    };
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(
        !err.message.contains("wrong-pass"),
        "secret in error: {err}"
    );

    drop(server);
    let server = NatsServer::start_with_args(&["--auth", "tok-123"]);
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "tok-123\n").unwrap();
    let cfg = config(&format!(
        "url = '{}'\nsubject = 'x'\njetstream = false\nallow_weaker_delivery = true\n[auth]\ntoken_file = '{}'\n",
        server.url(),
        token_file.display()
    ));
    let sink = cfq_sinks::nats::build(&cfg)
        .await
        .expect("token from file connects");
    sink.ready().await.expect("ready");
}

/// Makes a CA, a server certificate for 127.0.0.1 and a client certificate with the
/// `openssl` command, in `dir`.
fn make_certificates(dir: &std::path::Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl (Debian package openssl)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    std::fs::write(dir.join("san.ext"), "subjectAltName = IP:127.0.0.1\n").unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=cfq test CA",
    ]);
    for name in ["server", "client"] {
        run(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={name}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]);
    }
}

#[tokio::test]
async fn tls_with_private_ca_and_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let path = |name: &str| dir.path().join(name).display().to_string();
    let server = NatsServer::start_with_args(&[
        "--tlsverify",
        "--tlscert",
        &path("server.pem"),
        "--tlskey",
        &path("server-key.pem"),
        "--tlscacert",
        &path("ca.pem"),
    ]);
    let base = format!(
        "url = '{}'\nsubject = 'x'\njetstream = false\nallow_weaker_delivery = true\nconnect_timeout_ms = 2000\n[tls]\nca_file = '{}'\n",
        server.url(),
        path("ca.pem")
    );

    let with_cert = config(&format!(
        "{base}cert_file = '{}'\nkey_file = '{}'\n",
        path("client.pem"),
        path("client-key.pem")
    ));
    let sink = cfq_sinks::nats::build(&with_cert)
        .await
        .expect("TLS with a client certificate connects");
    let outcomes = sink
        .deliver(&[record("tls-1", "q", ContentType::Text, b"over tls")])
        .await;
    assert_eq!(outcomes, [Outcome::Confirmed]);

    // The server verifies clients: without a certificate the handshake is refused.
    let err = match cfq_sinks::nats::build(&config(&base)).await {
        Ok(_) => panic!("a client without certificate must be refused"),
        Err(e) => e,
    };
    assert!(err.message.contains("cannot connect"), "{err}");

    // A CA file that does not exist is named in the error.
    let missing = config(&base.replace("ca.pem", "missing-ca.pem"));
    let err = match cfq_sinks::nats::build(&missing).await {
        Ok(_) => panic!("a missing CA file must fail"),
        Err(e) => e,
    };
    assert_eq!(err.class, ErrorClass::Permanent);
    assert!(err.message.contains("tls.ca_file"), "{err}");
}
