//! The pure part of `cfq-bridge top`: Prometheus exposition text in, table rows out.
//!
//! A scrape is parsed with `prometheus-parse` and reduced to a [`Snapshot`]: per
//! (`route`, `queue_id`) pair, the counter series `top` turns into rates, the gauges it
//! shows as they are, and the end-to-end latency histogram. [`rows`] compares two
//! snapshots taken `elapsed` apart:
//! - a rate is the increase of its counters divided by `elapsed`. Each series is compared
//!   with itself; a series that went down was reset (the bridge restarted) and counts from
//!   0, and a series seen for the first time counts from 0 too;
//! - errors/s adds up every series of the API, sink and decode error families (all their
//!   classes, sinks and kinds);
//! - latency p50 and p99 come from the increase of the histogram's buckets over the
//!   interval, interpolated inside the bucket as Prometheus' `histogram_quantile` does.
//!   Without buckets (a summary, say) the interval's mean, Δsum / Δcount, stands in.
//!
//! `prometheus-parse` splits label sets on `,` and `=` without unescaping; the bridge's
//! label values (route names, queue ids, sink kinds, classes) never contain either.
//!
//! Nothing here does I/O or reads a clock, so the tests feed it fixture text (two scrapes
//! of a real bridge among them, in `fixtures/`).

use std::collections::BTreeMap;
use std::time::Duration;

use prometheus_parse::{Labels, Scrape, Value};

/// Messages received from pulls (counter).
pub const PULLED: &str = "cfq_messages_pulled_total";
/// Messages acknowledged (counter).
pub const ACKED: &str = "cfq_messages_acked_total";
/// The counter families whose sum is the errors/s column.
pub const ERROR_FAMILIES: [&str; 3] = [
    "cfq_api_errors_total",
    "cfq_sink_errors_total",
    "cfq_decode_errors_total",
];
/// Leased messages not settled yet (gauge).
pub const IN_FLIGHT: &str = "cfq_in_flight_messages";
/// Messages in the queue, as its metrics endpoint last said (gauge).
pub const BACKLOG: &str = "cfq_queue_backlog_messages";
/// Age of the oldest message in the queue, in seconds (gauge).
pub const OLDEST_AGE: &str = "cfq_queue_oldest_message_age_seconds";
/// From the message's timestamp to its ack, in seconds (histogram).
pub const END_TO_END: &str = "cfq_end_to_end_latency_seconds";

/// The labels that name a row of the table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowKey {
    /// The `route` label (empty when the series has none).
    pub route: String,
    /// The `queue_id` label (empty when the series has none).
    pub queue_id: String,
}

/// Counter series of one column, each by its family and full label set, with its value.
type Counters = BTreeMap<String, f64>;

/// A cumulative histogram, possibly several series merged.
#[derive(Debug, Clone, Default, PartialEq)]
struct Histogram {
    /// `(le, cumulative count)`, sorted by `le`; the last bound is usually `+Inf`.
    buckets: Vec<(f64, f64)>,
    /// The `_sum` series, when served.
    sum: Option<f64>,
    /// The `_count` series, when served.
    count: Option<f64>,
}

impl Histogram {
    /// Adds `count` to the bucket bounded by `le` (merging series with the same bounds).
    fn add_bucket(&mut self, le: f64, count: f64) {
        match self.buckets.iter_mut().find(|(bound, _)| *bound == le) {
            Some((_, total)) => *total += count,
            None => {
                self.buckets.push((le, count));
                self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
        }
    }

    /// The increase from `previous` to `self`. When the bucket bounds differ or a count
    /// went down (a restart), `self` is taken whole, as counting from 0.
    fn since(&self, previous: &Histogram) -> Histogram {
        let same_bounds = self.buckets.len() == previous.buckets.len()
            && self
                .buckets
                .iter()
                .zip(&previous.buckets)
                .all(|(a, b)| a.0 == b.0 && a.1 >= b.1);
        let buckets = if same_bounds {
            self.buckets
                .iter()
                .zip(&previous.buckets)
                .map(|(now, before)| (now.0, now.1 - before.1))
                .collect()
        } else {
            self.buckets.clone()
        };
        Histogram {
            buckets,
            sum: delta(self.sum, previous.sum),
            count: delta(self.count, previous.count),
        }
    }

    /// The `q` quantile (0..=1) of the observations in the buckets, or `None` when there
    /// are none. Linear interpolation inside the bucket that holds the rank; a rank in the
    /// `+Inf` bucket answers the highest finite bound.
    fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total <= 0.0 {
            return None;
        }
        let rank = q * total;
        let mut lower = 0.0;
        let mut below = 0.0;
        for &(upper, cumulative) in &self.buckets {
            if cumulative >= rank {
                if upper.is_infinite() {
                    return Some(lower);
                }
                if upper <= 0.0 {
                    return Some(upper);
                }
                let in_bucket = cumulative - below;
                if in_bucket <= 0.0 {
                    return Some(upper);
                }
                return Some(lower + (upper - lower) * (rank - below) / in_bucket);
            }
            lower = upper;
            below = cumulative;
        }
        // The counts never reached the rank (no `+Inf` bucket and an inconsistent scrape):
        // the highest bound is the best answer there is.
        Some(lower)
    }
}

/// `now - before` for a counter-like value; a decrease is a reset and counts from 0.
fn delta(now: Option<f64>, before: Option<f64>) -> Option<f64> {
    let now = now?;
    match before {
        Some(before) if now >= before => Some(now - before),
        _ => Some(now),
    }
}

/// What one scrape said about one row.
#[derive(Debug, Clone, Default, PartialEq)]
struct RowSample {
    pulled: Counters,
    acked: Counters,
    errors: Counters,
    in_flight: Option<f64>,
    backlog: Option<f64>,
    oldest_age: Option<f64>,
    latency: Option<Histogram>,
}

/// One scrape, reduced to what `top` shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    rows: BTreeMap<RowKey, RowSample>,
}

impl Snapshot {
    /// Parses exposition text. Lines the parser does not understand are skipped, as a
    /// scraper would; the error is the parser's own (it reads from memory, so in practice
    /// there is none).
    pub fn parse(text: &str) -> std::io::Result<Snapshot> {
        let scrape = Scrape::parse(text.lines().map(|line| Ok(line.to_owned())))?;
        Ok(Snapshot::from_scrape(&scrape))
    }

    /// Keeps the samples of the families `top` shows, by row.
    pub fn from_scrape(scrape: &Scrape) -> Snapshot {
        let mut rows: BTreeMap<RowKey, RowSample> = BTreeMap::new();
        for sample in &scrape.samples {
            let name = sample.metric.as_str();
            let Some(column) = Column::of(name) else {
                continue;
            };
            let key = RowKey {
                route: sample.labels.get("route").unwrap_or_default().to_owned(),
                queue_id: sample.labels.get("queue_id").unwrap_or_default().to_owned(),
            };
            let row = rows.entry(key).or_default();
            let series = || format!("{name}{{{}}}", sample.labels);
            if let Value::Histogram(buckets) = &sample.value {
                if column == Column::Latency {
                    let histogram = row.latency.get_or_insert_with(Histogram::default);
                    for bucket in buckets {
                        histogram.add_bucket(bucket.less_than, bucket.count);
                    }
                }
                continue;
            }
            let Some(value) = scalar(&sample.value) else {
                continue;
            };
            match column {
                Column::Pulled => add(&mut row.pulled, series(), value),
                Column::Acked => add(&mut row.acked, series(), value),
                Column::Errors => add(&mut row.errors, series(), value),
                Column::InFlight => add_gauge(&mut row.in_flight, value),
                Column::Backlog => add_gauge(&mut row.backlog, value),
                Column::OldestAge => add_gauge(&mut row.oldest_age, value),
                // A histogram's buckets are a `Value::Histogram` (above) when the scrape
                // has its `# TYPE` line; without it they arrive here one by one.
                Column::Latency => {}
                Column::LatencyBucket => {
                    if let Some(le) = bucket_bound(&sample.labels) {
                        row.latency
                            .get_or_insert_with(Histogram::default)
                            .add_bucket(le, value);
                    }
                }
                Column::LatencySum => add_gauge(
                    &mut row.latency.get_or_insert_with(Histogram::default).sum,
                    value,
                ),
                Column::LatencyCount => add_gauge(
                    &mut row.latency.get_or_insert_with(Histogram::default).count,
                    value,
                ),
            }
        }
        Snapshot { rows }
    }

    /// How many rows the scrape had (pairs of `route` and `queue_id`).
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when the scrape had no `cfq_` family `top` shows.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Where a sample goes in a row, by its metric name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Column {
    Pulled,
    Acked,
    Errors,
    InFlight,
    Backlog,
    OldestAge,
    /// The end-to-end histogram as one parsed value.
    Latency,
    /// One `_bucket` line of it (served without `# TYPE`).
    LatencyBucket,
    LatencySum,
    LatencyCount,
}

impl Column {
    /// The column of a sample named `name`, or `None` for families `top` does not show.
    fn of(name: &str) -> Option<Column> {
        Some(match name {
            PULLED => Column::Pulled,
            ACKED => Column::Acked,
            _ if ERROR_FAMILIES.contains(&name) => Column::Errors,
            IN_FLIGHT => Column::InFlight,
            BACKLOG => Column::Backlog,
            OLDEST_AGE => Column::OldestAge,
            END_TO_END => Column::Latency,
            _ => match name.strip_prefix(END_TO_END)? {
                "_bucket" => Column::LatencyBucket,
                "_sum" => Column::LatencySum,
                "_count" => Column::LatencyCount,
                _ => return None,
            },
        })
    }
}

/// The number in a counter, gauge or untyped sample.
fn scalar(value: &Value) -> Option<f64> {
    match value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(*v),
        Value::Histogram(_) | Value::Summary(_) => None,
    }
}

/// The `le` label of an untyped bucket sample.
fn bucket_bound(labels: &Labels) -> Option<f64> {
    let le = labels.get("le")?;
    match le {
        "+Inf" | "Inf" | "inf" | "+inf" => Some(f64::INFINITY),
        _ => le.parse().ok(),
    }
}

fn add(counters: &mut Counters, series: String, value: f64) {
    *counters.entry(series).or_insert(0.0) += value;
}

fn add_gauge(slot: &mut Option<f64>, value: f64) {
    *slot = Some(slot.unwrap_or(0.0) + value);
}

/// The end-to-end latency of a row over the last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Latency {
    /// Not known yet (the first scrape) or not served.
    Unknown,
    /// Nothing was acknowledged during the interval.
    Idle,
    /// Estimated from the histogram's buckets, in seconds.
    Quantiles {
        /// The median.
        p50: f64,
        /// The 99th percentile.
        p99: f64,
    },
    /// No buckets: the mean of the interval (Δsum / Δcount), in seconds.
    Mean(f64),
}

/// One line of the table. Rates are per second; `None` means not known yet (the first
/// scrape) or not served by the bridge.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The route and queue.
    pub key: RowKey,
    /// Messages pulled per second.
    pub pulled_per_sec: Option<f64>,
    /// Messages acknowledged per second.
    pub acked_per_sec: Option<f64>,
    /// API, sink and decode errors per second, together.
    pub errors_per_sec: Option<f64>,
    /// Messages leased and not settled.
    pub in_flight: Option<f64>,
    /// Messages in the queue.
    pub backlog: Option<f64>,
    /// Age of the oldest message in the queue, in seconds.
    pub oldest_age_secs: Option<f64>,
    /// End-to-end latency over the interval.
    pub latency: Latency,
}

/// The table for `current`, with rates against `previous` taken `elapsed` earlier (rates
/// and latency are unknown without one). Rows are sorted by route, then queue id.
pub fn rows(previous: Option<&Snapshot>, current: &Snapshot, elapsed: Duration) -> Vec<Row> {
    let secs = elapsed.as_secs_f64();
    let previous = previous.filter(|_| secs > 0.0);
    let empty = RowSample::default();
    current
        .rows
        .iter()
        .map(|(key, now)| {
            let before = previous.map(|p| p.rows.get(key).unwrap_or(&empty));
            let rate = |pick: fn(&RowSample) -> &Counters| {
                before.map(|before| increase(pick(now), pick(before)) / secs)
            };
            let latency = match (before, &now.latency) {
                (Some(before), Some(histogram)) => {
                    let interval = match &before.latency {
                        Some(old) => histogram.since(old),
                        None => histogram.clone(),
                    };
                    interval_latency(&interval)
                }
                _ => Latency::Unknown,
            };
            Row {
                key: key.clone(),
                pulled_per_sec: rate(|r| &r.pulled),
                acked_per_sec: rate(|r| &r.acked),
                errors_per_sec: rate(|r| &r.errors),
                in_flight: now.in_flight,
                backlog: now.backlog,
                oldest_age_secs: now.oldest_age,
                latency,
            }
        })
        .collect()
}

/// The total increase of the series in `now` since `before`, series by series.
fn increase(now: &Counters, before: &Counters) -> f64 {
    now.iter()
        .map(|(series, value)| delta(Some(*value), before.get(series).copied()).unwrap_or(0.0))
        .sum()
}

/// p50/p99 from the interval's buckets, else its mean, else idle.
fn interval_latency(interval: &Histogram) -> Latency {
    if !interval.buckets.is_empty() {
        return match (interval.quantile(0.5), interval.quantile(0.99)) {
            (Some(p50), Some(p99)) => Latency::Quantiles { p50, p99 },
            _ => Latency::Idle,
        };
    }
    match (interval.sum, interval.count) {
        (Some(sum), Some(count)) if count > 0.0 => Latency::Mean(sum / count),
        (Some(_), Some(_)) => Latency::Idle,
        _ => Latency::Unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two scrapes of a bridge with two routes, one second apart, as the exporter writes
    /// them (a histogram with `# TYPE`, labelled error counters, a family `top` ignores).
    const FIRST: &str = r#"# HELP cfq_messages_pulled_total Messages received from pulls.
# TYPE cfq_messages_pulled_total counter
cfq_messages_pulled_total{route="orders",queue_id="q1"} 100
cfq_messages_pulled_total{route="audit",queue_id="q2"} 7
# TYPE cfq_messages_acked_total counter
cfq_messages_acked_total{route="orders",queue_id="q1"} 90
cfq_messages_acked_total{route="audit",queue_id="q2"} 7
# TYPE cfq_api_errors_total counter
cfq_api_errors_total{route="orders",queue_id="q1",class="429"} 1
# TYPE cfq_sink_errors_total counter
cfq_sink_errors_total{route="orders",queue_id="q1",sink="kafka",class="transient"} 2
# TYPE cfq_decode_errors_total counter
cfq_decode_errors_total{route="orders",queue_id="q1",kind="base64"} 0
# TYPE cfq_in_flight_messages gauge
cfq_in_flight_messages{route="orders",queue_id="q1"} 10
cfq_in_flight_messages{route="audit",queue_id="q2"} 0
# TYPE cfq_queue_backlog_messages gauge
cfq_queue_backlog_messages{route="orders",queue_id="q1"} 5000
# TYPE cfq_queue_oldest_message_age_seconds gauge
cfq_queue_oldest_message_age_seconds{route="orders",queue_id="q1"} 42.5
# TYPE cfq_pulls_total counter
cfq_pulls_total{route="orders",queue_id="q1"} 12
# TYPE cfq_end_to_end_latency_seconds histogram
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="0.1"} 50
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="0.5"} 80
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="1"} 90
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="+Inf"} 90
cfq_end_to_end_latency_seconds_sum{route="orders",queue_id="q1"} 20
cfq_end_to_end_latency_seconds_count{route="orders",queue_id="q1"} 90
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="0.1"} 7
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="0.5"} 7
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="1"} 7
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="+Inf"} 7
cfq_end_to_end_latency_seconds_sum{route="audit",queue_id="q2"} 0.3
cfq_end_to_end_latency_seconds_count{route="audit",queue_id="q2"} 7
# TYPE process_open_fds gauge
process_open_fds 12
"#;

    /// Two seconds later: orders moved 200 pulled / 100 acked (all 100 between 0.1 and
    /// 0.5 s), a new API error class appeared, audit stood still.
    const SECOND: &str = r#"# TYPE cfq_messages_pulled_total counter
cfq_messages_pulled_total{route="orders",queue_id="q1"} 300
cfq_messages_pulled_total{route="audit",queue_id="q2"} 7
# TYPE cfq_messages_acked_total counter
cfq_messages_acked_total{route="orders",queue_id="q1"} 190
cfq_messages_acked_total{route="audit",queue_id="q2"} 7
# TYPE cfq_api_errors_total counter
cfq_api_errors_total{route="orders",queue_id="q1",class="429"} 3
cfq_api_errors_total{route="orders",queue_id="q1",class="5xx"} 1
# TYPE cfq_sink_errors_total counter
cfq_sink_errors_total{route="orders",queue_id="q1",sink="kafka",class="transient"} 2
# TYPE cfq_decode_errors_total counter
cfq_decode_errors_total{route="orders",queue_id="q1",kind="base64"} 1
# TYPE cfq_in_flight_messages gauge
cfq_in_flight_messages{route="orders",queue_id="q1"} 110
cfq_in_flight_messages{route="audit",queue_id="q2"} 0
# TYPE cfq_queue_backlog_messages gauge
cfq_queue_backlog_messages{route="orders",queue_id="q1"} 4800
# TYPE cfq_queue_oldest_message_age_seconds gauge
cfq_queue_oldest_message_age_seconds{route="orders",queue_id="q1"} 44.5
# TYPE cfq_end_to_end_latency_seconds histogram
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="0.1"} 50
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="0.5"} 180
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="1"} 190
cfq_end_to_end_latency_seconds_bucket{route="orders",queue_id="q1",le="+Inf"} 190
cfq_end_to_end_latency_seconds_sum{route="orders",queue_id="q1"} 50
cfq_end_to_end_latency_seconds_count{route="orders",queue_id="q1"} 190
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="0.1"} 7
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="0.5"} 7
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="1"} 7
cfq_end_to_end_latency_seconds_bucket{route="audit",queue_id="q2",le="+Inf"} 7
cfq_end_to_end_latency_seconds_sum{route="audit",queue_id="q2"} 0.3
cfq_end_to_end_latency_seconds_count{route="audit",queue_id="q2"} 7
"#;

    fn snapshot(text: &str) -> Snapshot {
        Snapshot::parse(text).expect("fixture parses")
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn the_first_scrape_shows_gauges_and_no_rates() {
        let rows = rows(None, &snapshot(FIRST), Duration::from_secs(1));
        assert_eq!(rows.len(), 2, "{rows:#?}");
        // Sorted by route: audit before orders.
        assert_eq!(rows[0].key.route, "audit");
        let orders = &rows[1];
        assert_eq!(
            orders.key,
            RowKey {
                route: "orders".into(),
                queue_id: "q1".into()
            }
        );
        assert_eq!(orders.pulled_per_sec, None);
        assert_eq!(orders.acked_per_sec, None);
        assert_eq!(orders.errors_per_sec, None);
        assert_eq!(orders.in_flight, Some(10.0));
        assert_eq!(orders.backlog, Some(5000.0));
        assert_eq!(orders.oldest_age_secs, Some(42.5));
        assert_eq!(orders.latency, Latency::Unknown);
        // audit serves no backlog gauge: unknown, not 0.
        assert_eq!(rows[0].backlog, None);
    }

    #[test]
    fn rates_come_from_counter_increases_over_the_interval() {
        let rows = rows(
            Some(&snapshot(FIRST)),
            &snapshot(SECOND),
            Duration::from_secs(2),
        );
        let orders = rows.iter().find(|r| r.key.route == "orders").unwrap();
        assert_eq!(orders.pulled_per_sec, Some(100.0));
        assert_eq!(orders.acked_per_sec, Some(50.0));
        // 429: +2, 5xx: new series, +1 from 0; sink: +0; decode: +1. 4 in 2 s.
        assert_eq!(orders.errors_per_sec, Some(2.0));
        assert_eq!(orders.in_flight, Some(110.0));
        assert_eq!(orders.backlog, Some(4800.0));
        assert_eq!(orders.oldest_age_secs, Some(44.5));
        let audit = rows.iter().find(|r| r.key.route == "audit").unwrap();
        assert_eq!(audit.pulled_per_sec, Some(0.0));
        assert_eq!(audit.errors_per_sec, Some(0.0));
        assert_eq!(
            audit.latency,
            Latency::Idle,
            "nothing acked in the interval"
        );
    }

    #[test]
    fn latency_quantiles_use_only_the_interval_buckets() {
        let rows = rows(
            Some(&snapshot(FIRST)),
            &snapshot(SECOND),
            Duration::from_secs(2),
        );
        let orders = rows.iter().find(|r| r.key.route == "orders").unwrap();
        // The interval: 0 at ≤0.1, 100 in (0.1, 0.5], 0 above. p50 = rank 50 of 100 in
        // (0.1, 0.5] → 0.1 + 0.4 × 50/100 = 0.3; p99 → 0.1 + 0.4 × 99/100 = 0.496.
        // Over the whole history the median would be in the first bucket instead.
        let Latency::Quantiles { p50, p99 } = orders.latency else {
            panic!("quantiles expected: {:?}", orders.latency)
        };
        assert!(close(p50, 0.3), "p50 = {p50}");
        assert!(close(p99, 0.496), "p99 = {p99}");
    }

    #[test]
    fn a_counter_that_went_down_was_reset_and_counts_from_zero() {
        let before = snapshot(
            "cfq_messages_pulled_total{route=\"r\",queue_id=\"q\"} 1000\n\
             cfq_messages_acked_total{route=\"r\",queue_id=\"q\"} 1000\n",
        );
        let after = snapshot(
            "cfq_messages_pulled_total{route=\"r\",queue_id=\"q\"} 30\n\
             cfq_messages_acked_total{route=\"r\",queue_id=\"q\"} 1010\n",
        );
        let rows = rows(Some(&before), &after, Duration::from_secs(1));
        assert_eq!(rows[0].pulled_per_sec, Some(30.0));
        assert_eq!(rows[0].acked_per_sec, Some(10.0));
    }

    #[test]
    fn without_buckets_the_interval_mean_stands_in() {
        let text = |sum: f64, count: f64| {
            format!(
                "# TYPE cfq_end_to_end_latency_seconds summary\n\
                 cfq_end_to_end_latency_seconds{{route=\"r\",queue_id=\"q\",quantile=\"0.5\"}} 9\n\
                 cfq_end_to_end_latency_seconds_sum{{route=\"r\",queue_id=\"q\"}} {sum}\n\
                 cfq_end_to_end_latency_seconds_count{{route=\"r\",queue_id=\"q\"}} {count}\n"
            )
        };
        let before = snapshot(&text(10.0, 100.0));
        let after = snapshot(&text(12.0, 110.0));
        let rows_now = rows(Some(&before), &after, Duration::from_secs(1));
        assert_eq!(rows_now.len(), 1);
        let Latency::Mean(mean) = rows_now[0].latency else {
            panic!("a mean expected: {:?}", rows_now[0].latency)
        };
        assert!(close(mean, 0.2), "mean = {mean}");
        // Nothing observed: idle, not a division by zero.
        let idle = rows(Some(&after), &after, Duration::from_secs(1));
        assert_eq!(idle[0].latency, Latency::Idle);
    }

    #[test]
    fn buckets_without_a_type_line_are_still_read() {
        let text = |fast: f64, all: f64| {
            format!(
                "cfq_end_to_end_latency_seconds_bucket{{route=\"r\",queue_id=\"q\",le=\"1\"}} {fast}\n\
                 cfq_end_to_end_latency_seconds_bucket{{route=\"r\",queue_id=\"q\",le=\"+Inf\"}} {all}\n"
            )
        };
        let rows = rows(
            Some(&snapshot(&text(0.0, 0.0))),
            &snapshot(&text(10.0, 10.0)),
            Duration::from_secs(1),
        );
        let Latency::Quantiles { p50, p99 } = rows[0].latency else {
            panic!("quantiles expected: {:?}", rows[0].latency)
        };
        assert!(close(p50, 0.5), "p50 = {p50}");
        assert!(close(p99, 0.99), "p99 = {p99}");
    }

    #[test]
    fn a_rank_in_the_inf_bucket_answers_the_highest_finite_bound() {
        let h = Histogram {
            buckets: vec![(0.5, 1.0), (2.0, 2.0), (f64::INFINITY, 10.0)],
            sum: None,
            count: None,
        };
        assert_eq!(h.quantile(0.99), Some(2.0));
        assert_eq!(h.quantile(0.5), Some(2.0));
        // The first bucket interpolates from 0.
        assert!(close(h.quantile(0.05).unwrap(), 0.25));
        let empty = Histogram {
            buckets: vec![(1.0, 0.0), (f64::INFINITY, 0.0)],
            ..Histogram::default()
        };
        assert_eq!(empty.quantile(0.5), None);
    }

    #[test]
    fn other_families_and_garbage_lines_are_ignored() {
        let snap = snapshot(
            "not a metric line at all {\n\
             process_open_fds 12\n\
             cfq_messages_pulled_total{route=\"r\",queue_id=\"q\"} 5\n",
        );
        assert_eq!(snap.len(), 1);
        assert!(snapshot("# nothing here\n").is_empty());
    }

    /// Two scrapes of a real `cfq-bridge run` (emulator with 50 ms latency and a few
    /// 429s, batches of 10), two seconds apart, as its exporter wrote them.
    const BRIDGE_1: &str = include_str!("fixtures/bridge-scrape-1.prom");
    const BRIDGE_2: &str = include_str!("fixtures/bridge-scrape-2.prom");

    #[test]
    fn scrapes_of_a_real_bridge_make_one_row() {
        let rows = rows(
            Some(&snapshot(BRIDGE_1)),
            &snapshot(BRIDGE_2),
            Duration::from_secs(2),
        );
        assert_eq!(rows.len(), 1, "{rows:#?}");
        let row = &rows[0];
        assert_eq!(row.key.route, "default");
        assert_eq!(row.key.queue_id, "3f9c0e2a7b5d4e1f8a6c2b9d0e7f1a3c");
        // pulled 220 → 370, acked 220 → 360, one more 429 (every other class at 0).
        assert_eq!(row.pulled_per_sec, Some(75.0));
        assert_eq!(row.acked_per_sec, Some(70.0));
        assert_eq!(row.errors_per_sec, Some(0.5));
        assert_eq!(row.in_flight, Some(20.0));
        assert_eq!(row.backlog, Some(2650.0));
        assert_eq!(row.oldest_age_secs, Some(5.059));
        // The interval's 150 observations: 140 in (2.5, 5], 10 in (5, 10].
        // p50: rank 75 → 2.5 + 2.5 × 75/140; p99: rank 148.5 → 5 + 5 × 8.5/10.
        let Latency::Quantiles { p50, p99 } = row.latency else {
            panic!("quantiles expected: {:?}", row.latency)
        };
        assert!(close(p50, 2.5 + 2.5 * 75.0 / 140.0), "p50 = {p50}");
        assert!(close(p99, 9.25), "p99 = {p99}");
    }

    #[test]
    fn no_rates_when_no_time_passed() {
        let snap = snapshot(FIRST);
        let rows = rows(Some(&snap), &snap, Duration::ZERO);
        assert!(rows.iter().all(|r| r.pulled_per_sec.is_none()));
    }
}
