//! End-to-end benchmark of the bridge against the emulator, with baselines measured in the
//! same run (the machines are shared and noisy: compare ratios, not absolute figures).
//!
//! Run: `cargo bench --bench pipeline` (env `BENCH_MESSAGES`, default 100000; `BENCH_ROUNDS`, default 3).
//!
//! The emulator runs as its own process (`cfq-bridge emulator`), so the CPU figures below
//! are the bridge's (or the baseline loop's) alone:
//! 1. **JSONL vs raw loop**: 1 KB json messages. Baseline: a raw pull+ack loop (same
//!    pullers and batch size, no decoding, no sink). Bridge: `cfq-bridge run --until-empty`
//!    into a JSONL file (fsync per batch). Ratio of rates, CPU µs per message.
//! 2. **50 ms round trips**: the emulator adds 50 ms to every call; the bridge's sustained
//!    rate and CPU per message.
//! 3. **10,000 in flight**: acks delayed by 400 ms and `max_in_flight = 10000`, so about
//!    10,000 messages are held at once; the bridge's peak RSS.
//!
//! Interleaved with the rounds of 1., the same bridge run with `[metrics] listen` on a free
//! loopback port while the bench scrapes `/metrics` once a second, as Prometheus would:
//! CPU per message and rate with metrics on against off, and their ratio (issue 13).

#[path = "support/mod.rs"]
mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{
    median, raw_pull_ack_loop, reserve_port, run_bridge, seed, start_emulator, Measured, ACCOUNT,
};

fn main() {
    let messages: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(run(messages));
}

/// Runs the bridge from `queue` into a JSONL file and checks the archive is complete.
/// `tables` is appended to the config (e.g. a `[metrics]` table).
fn bridge_into_jsonl(
    dir: &Path,
    base: &str,
    queue: &str,
    queue_extra: &str,
    tables: &str,
    expected: usize,
) -> Measured {
    let archive = dir.join(format!("{queue}.jsonl"));
    let config = dir.join(format!("{queue}.toml"));
    std::fs::write(
        &config,
        format!(
            "[queue]\naccount_id = \"{ACCOUNT}\"\nqueue_id = \"{queue}\"\napi_base_url = \"{base}\"\n\
             batch_size = 100\n{queue_extra}\n[sink]\ntype = \"jsonl\"\npath = \"{}\"\n{tables}",
            archive.display()
        ),
    )
    .unwrap();
    let measured = run_bridge(&config, expected);
    let lines = std::fs::read_to_string(&archive).unwrap().lines().count();
    assert!(
        lines >= expected,
        "archive has {lines} of {expected} messages"
    );
    measured
}

async fn run(messages: usize) {
    let dir = tempfile::tempdir().unwrap();
    println!("# cfq-bridge pipeline benchmark ({messages} messages of ~1 KB json)\n");

    // 1. JSONL vs raw pull+ack loop, no added latency. Interleaved rounds, medians: the
    //    machine is shared, so one round can be disturbed by neighbours.
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (emulator, base) = start_emulator(&[]).await;
    let mut raws = Vec::new();
    let mut bridges = Vec::new();
    let (mut metered, mut scraped) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let raw_queue = format!("rawloop{round}");
        seed(&base, &raw_queue, messages, 1000).await;
        raws.push(raw_pull_ack_loop(&base, &raw_queue, 4, messages).await);
        // The bridge with metrics off, then on (on, then off, in odd rounds).
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for metrics_on in order {
            let kind = if metrics_on { "metrics" } else { "jsonl" };
            let bridge_queue = format!("bridge{kind}{round}");
            seed(&base, &bridge_queue, messages, 1000).await;
            if metrics_on {
                let (run, scrapes) =
                    bridge_with_metrics(dir.path(), &base, &bridge_queue, "pullers = 4", messages);
                metered.push(run);
                scraped.push(scrapes);
            } else {
                bridges.push(bridge_into_jsonl(
                    dir.path(),
                    &base,
                    &bridge_queue,
                    "pullers = 4",
                    "",
                    messages,
                ));
            }
        }
        println!(
            "round {round}: raw {:.0} msg/s, bridge {:.0} msg/s, ratio {:.2}",
            raws[round].rate(),
            bridges[round].rate(),
            bridges[round].rate() / raws[round].rate()
        );
        println!(
            "round {round}: metrics off {:.0} msg/s {:.2} µs/msg, on {:.0} msg/s {:.2} µs/msg \
             ({} scrapes), CPU ratio on/off {:.3}",
            bridges[round].rate(),
            bridges[round].cpu_us_per_message(),
            metered[round].rate(),
            metered[round].cpu_us_per_message(),
            scraped[round],
            metered[round].cpu_us_per_message() / bridges[round].cpu_us_per_message()
        );
    }
    drop(emulator);
    // Metrics on against off: medians of each variant's rates and CPU per message (each
    // on its own), and the rounds' paired ratios (on / off in the same round).
    let paired = |figure: fn(&Measured) -> f64| -> Vec<f64> {
        (0..rounds)
            .map(|r| figure(&metered[r]) / figure(&bridges[r]))
            .collect()
    };
    let (cpu_ratios, rate_ratios) = (paired(Measured::cpu_us_per_message), paired(Measured::rate));
    let (off_rate, on_rate) = (
        median_of(bridges.iter().map(Measured::rate).collect()),
        median_of(metered.iter().map(Measured::rate).collect()),
    );
    let (off_cpu, on_cpu) = (
        median_of(bridges.iter().map(Measured::cpu_us_per_message).collect()),
        median_of(metered.iter().map(Measured::cpu_us_per_message).collect()),
    );
    let raw = median(raws);
    let bridge = median(bridges);
    println!();
    println!("| scenario | messages | msg/s | CPU µs/msg | peak RSS |");
    println!("|---|---|---|---|---|");
    println!(
        "| raw pull+ack loop (baseline, median of {rounds}) | {} | {:.0} | {:.1} | |",
        raw.messages,
        raw.rate(),
        raw.cpu_us_per_message()
    );
    println!(
        "| bridge → JSONL, fsync per batch (median of {rounds}) | {} | {:.0} | {:.1} | {} MB |",
        bridge.messages,
        bridge.rate(),
        bridge.cpu_us_per_message(),
        bridge.max_rss_kb / 1024
    );

    // 2. 50 ms round trips.
    let (slow, slow_base) = start_emulator(&["--fault-latency-ms", "50"]).await;
    let n = messages.min(30_000);
    seed(&slow_base, "bridgertt", n, 1000).await;
    let rtt = bridge_into_jsonl(
        dir.path(),
        &slow_base,
        "bridgertt",
        "pullers = 8\nack_concurrency = 8",
        "",
        n,
    );
    drop(slow);
    println!(
        "| bridge → JSONL, 50 ms round trips | {} | {:.0} | {:.1} | {} MB |",
        rtt.messages,
        rtt.rate(),
        rtt.cpu_us_per_message(),
        rtt.max_rss_kb / 1024
    );

    // 3. About 10,000 in flight: acks take 400 ms.
    let (held, held_base) =
        start_emulator(&["--fault-latency-ms", "400", "--fault-endpoint", "ack"]).await;
    let n = messages.min(40_000);
    seed(&held_base, "bridgeheld", n, 1000).await;
    let inflight = bridge_into_jsonl(
        dir.path(),
        &held_base,
        "bridgeheld",
        "pullers = 8\nmax_in_flight = 10000\nack_concurrency = 32",
        "",
        n,
    );
    drop(held);
    println!(
        "| bridge → JSONL, ~10,000 in flight | {} | {:.0} | {:.1} | {} MB |",
        inflight.messages,
        inflight.rate(),
        inflight.cpu_us_per_message(),
        inflight.max_rss_kb / 1024
    );
    println!();
    println!(
        "ratio bridge/raw (JSONL, medians, same emulator, same run): {:.2}",
        bridge.rate() / raw.rate()
    );
    println!();
    println!("metrics on versus off (bridge → JSONL, medians of {rounds} interleaved rounds):\n");
    println!("| bridge → JSONL | msg/s | CPU µs/msg |");
    println!("|---|---|---|");
    println!("| metrics off | {off_rate:.0} | {off_cpu:.2} |");
    println!("| `[metrics] listen`, /metrics scraped every second | {on_rate:.0} | {on_cpu:.2} |");
    println!(
        "| ratio on/off | {:.3} | {:.3} |",
        on_rate / off_rate,
        on_cpu / off_cpu
    );
    println!();
    for (figure, ratios) in [("CPU per message", cpu_ratios), ("rate", rate_ratios)] {
        println!(
            "{figure} on/off paired by round: median {:.3}, range {:.3}-{:.3}",
            median_of(ratios.clone()),
            ratios.iter().copied().fold(f64::INFINITY, f64::min),
            ratios.iter().copied().fold(0.0, f64::max),
        );
    }
    println!("scrapes per metrics-on run: {scraped:?}");
}

/// Runs [`bridge_into_jsonl`] with `[metrics] listen` on a free loopback port while a
/// thread scrapes `/metrics` about once a second, as Prometheus would. Returns the run and
/// how many scrapes the bridge answered.
fn bridge_with_metrics(
    dir: &Path,
    base: &str,
    queue: &str,
    queue_extra: &str,
    expected: usize,
) -> (Measured, usize) {
    let port = reserve_port();
    let stop = Arc::new(AtomicBool::new(false));
    let scraper = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || scrape_until(port, &stop))
    };
    let tables = format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n");
    let measured = bridge_into_jsonl(dir, base, queue, queue_extra, &tables, expected);
    stop.store(true, Ordering::Relaxed);
    let scrapes = scraper.join().expect("the scraper");
    assert!(
        scrapes > 0,
        "no scrape of /metrics succeeded during the run"
    );
    (measured, scrapes)
}

/// Scrapes `http://127.0.0.1:PORT/metrics` as soon as the listener answers, then once a
/// second, until `stop`. Returns the number of pages served with the bridge's families.
fn scrape_until(port: u16, stop: &AtomicBool) -> usize {
    let mut scrapes = 0;
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            // A page served before the route registered its families is tried again.
            if get_metrics(port).is_some_and(|page| page.contains("cfq_messages_pulled_total")) {
                scrapes += 1;
                next = Instant::now() + Duration::from_secs(1);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    scrapes
}

/// One plain HTTP/1.1 GET of `/metrics`: the body of a 200 answer, or `None` when the
/// listener is not up (yet, or any more).
fn get_metrics(port: u16) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    let (head, body) = answer.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
}

/// The median of some figures.
fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}
