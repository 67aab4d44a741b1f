//! `cfq-bridge demo`: the whole pipeline on an embedded emulator, no account needed.
//!
//! It starts the emulator on a free loopback port, seeds sample messages of every content
//! type (including a few `v8` ones, to show that they are released rather than forwarded
//! as if decoded), runs the real pipeline with `--until-empty` into stdout (or a JSONL
//! file with `--out`), and prints a summary on stderr.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context as _;
use cfq_emulator::{self as emulator, ContentType, EmulatorConfig, SeedSpec};
use secrecy::SecretString;

use crate::config::Config;

const ACCOUNT: &str = "demo-account";
const QUEUE: &str = "demo-queue";
const DEAD_LETTER_QUEUE: &str = "demo-dead-letter";
const TOKEN: &str = "demo-token";

/// Options of `cfq-bridge demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Write the records to this JSONL file instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Sample messages per decodable content type (text, json, bytes).
    #[arg(long, default_value_t = 100)]
    pub per_type: usize,
    /// `v8` messages to seed (they cannot be decoded and end in the dead-letter queue).
    #[arg(long, default_value_t = 5)]
    pub v8: usize,
}

/// Runs the demo.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let emulator = emulator::start(
        "127.0.0.1:0".parse().context("loopback address")?,
        EmulatorConfig {
            tokens: vec![TOKEN.to_string()],
            max_retries: 2,
            dead_letter_queue: Some(DEAD_LETTER_QUEUE.to_string()),
            ..EmulatorConfig::default()
        },
    )
    .await
    .context("starting the embedded emulator")?;
    tracing::info!(url = %emulator.base_url(), "embedded Cloudflare Queues emulator listening");

    let mut seeded = 0;
    for (content_type, count, size) in [
        (ContentType::Text, args.per_type, 64),
        (ContentType::Json, args.per_type, 128),
        (ContentType::Bytes, args.per_type, 48),
        (ContentType::V8, args.v8, 32),
    ] {
        seeded += emulator
            .seed(
                ACCOUNT,
                QUEUE,
                &SeedSpec {
                    count,
                    body_size: size,
                    content_type,
                },
            )
            .len();
    }
    tracing::info!(
        messages = seeded,
        "seeded sample messages (text, json, bytes and a few v8)"
    );

    let sink = match &args.out {
        Some(path) => format!(
            "type = \"jsonl\"\npath = {}",
            toml_string(&path.display().to_string())
        ),
        None => "type = \"stdout\"".to_string(),
    };
    // Short delays so v8 messages reach the dead-letter queue within the demo.
    let text = format!(
        "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{QUEUE}\"\napi_base_url = \"{}\"\n\
         batch_size = 100\npullers = 2\nvisibility_timeout_ms = 30000\n\
         retry_base_delay_secs = 0\nempty_backoff_max_ms = 200\n\n[sink]\n{sink}\n",
        emulator.base_url()
    );
    let config = Config::from_toml(&text, |_| None).context("demo config")?;
    let summary = crate::app::run_pipeline(
        config,
        SecretString::from(TOKEN.to_string()),
        true,
        crate::app::shutdown_signal(),
    )
    .await?;

    let q = emulator.stats(ACCOUNT, QUEUE);
    let s = &summary.stats;
    let duplicates = s.confirmed.saturating_sub(q.acked);
    let destination = args
        .out
        .as_ref()
        .map_or("stdout".to_string(), |p| p.display().to_string());
    crate::summary::JobReport {
        job: "demo",
        elapsed: started.elapsed(),
        input: Some(format!("{seeded} messages (text, json, bytes, v8)")),
        moved: s.confirmed,
        destination,
        acked: s.acked,
        released: s.released,
        released_note: Some(format!(
            "v8 bodies cannot be decoded: released {} times, then dead-lettered by the queue",
            s.v8_released
        )),
        dead_lettered: format!("{} messages (queue {DEAD_LETTER_QUEUE})", q.dead_lettered),
        duplicates,
        left_in_queue: Some(q.backlog),
    }
    .print();
    eprintln!();
    eprintln!("Next: copy config/jsonl.toml, set CLOUDFLARE_API_TOKEN, run `cfq-bridge check --config FILE`,");
    eprintln!("then `cfq-bridge run --config FILE`. Develop locally with `cfq-bridge emulator` (docs/emulator.md).");
    emulator.shutdown().await;
    Ok(())
}

fn toml_string(s: &str) -> String {
    // serde_json's string escaping is valid TOML basic-string escaping for these inputs.
    serde_json::to_string(s).unwrap_or_else(|_| format!("{s:?}"))
}
