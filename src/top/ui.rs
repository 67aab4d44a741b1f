//! The screen of `cfq-bridge top`: a title, one table row per route and queue, and a
//! status line that says whether the endpoint answers. Drawing only; the numbers come
//! from [`super::model`] and the loop from [`super`].

use std::time::Duration;

use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Borders, Cell, Paragraph, Row as TableRow, Table};
use ratatui::Frame;

use super::model::{Latency, Row};

/// How the last scrape went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// No scrape has finished yet.
    Waiting,
    /// The last scrape answered 200 and parsed.
    Live,
    /// The last scrape failed; what went wrong, in a sentence.
    Failed(String),
}

/// Everything one frame shows.
#[derive(Debug)]
pub struct View<'a> {
    /// The scraped URL.
    pub url: &'a str,
    /// The table, from the last good scrape.
    pub rows: &'a [Row],
    /// How the last scrape went.
    pub health: &'a Health,
    /// How long ago the last good scrape was, if there was one.
    pub last_good: Option<Duration>,
    /// The time between scrapes.
    pub interval: Duration,
}

/// The column headers, in order.
const HEADERS: [&str; 10] = [
    "ROUTE",
    "QUEUE",
    "PULLED/S",
    "ACKED/S",
    "ERRORS/S",
    "IN-FLIGHT",
    "BACKLOG",
    "OLDEST",
    "E2E P50",
    "E2E P99",
];

/// Draws `view` over the whole frame.
pub fn draw(frame: &mut Frame<'_>, view: &View<'_>) {
    let [title, table, status] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(3),
        Constraint::Length(1),
    ])
    .areas(frame.area());

    frame.render_widget(
        Paragraph::new(Line::from(vec![
            Span::styled("cfq-bridge top", Style::new().add_modifier(Modifier::BOLD)),
            Span::raw(format!("  {}  (q to quit)", view.url)),
        ])),
        title,
    );

    let stale = matches!(view.health, Health::Failed(_));
    let row_style = if stale {
        Style::new().add_modifier(Modifier::DIM)
    } else {
        Style::new()
    };
    let rows = view.rows.iter().map(|row| {
        let (p50, p99) = latency_cells(row.latency);
        let errors = rate(row.errors_per_sec);
        let errors_style = match row.errors_per_sec {
            Some(e) if e > 0.0 => Style::new().fg(Color::Red),
            _ => Style::new(),
        };
        TableRow::new(vec![
            Cell::from(row.key.route.clone()),
            Cell::from(row.key.queue_id.clone()),
            Cell::from(rate(row.pulled_per_sec)),
            Cell::from(rate(row.acked_per_sec)),
            Cell::from(errors).style(errors_style),
            Cell::from(count(row.in_flight)),
            Cell::from(count(row.backlog)),
            Cell::from(duration(row.oldest_age_secs)),
            Cell::from(p50),
            Cell::from(p99),
        ])
        .style(row_style)
    });
    let widths = [
        Constraint::Min(10),
        Constraint::Min(12),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
    ];
    let header = TableRow::new(HEADERS.map(Cell::from))
        .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    frame.render_widget(
        Table::new(rows, widths)
            .header(header)
            .block(Block::new().borders(Borders::TOP | Borders::BOTTOM)),
        table,
    );

    let (text, style) = status_line(view);
    frame.render_widget(Paragraph::new(text).style(style), status);
}

/// The status line's text and colour.
fn status_line(view: &View<'_>) -> (String, Style) {
    let every = format!("every {}s", view.interval.as_secs_f64());
    match view.health {
        Health::Waiting => (
            format!("connecting to {} ...", view.url),
            Style::new().fg(Color::Yellow),
        ),
        Health::Live if view.rows.is_empty() => (
            format!(
                "connected, but {} serves no cfq_ metrics with route and queue_id labels \
                 (is this a cfq-bridge /metrics endpoint?)",
                view.url
            ),
            Style::new().fg(Color::Yellow),
        ),
        Health::Live => (
            format!(
                "live: {} route/queue row{}, updated {every}",
                view.rows.len(),
                if view.rows.len() == 1 { "" } else { "s" }
            ),
            Style::new().fg(Color::Green),
        ),
        Health::Failed(error) => {
            let last = match view.last_good {
                Some(ago) => format!("; showing data from {}s ago", ago.as_secs()),
                None => String::new(),
            };
            (
                format!("UNAVAILABLE: {error}; retrying {every}{last}"),
                Style::new()
                    .fg(Color::White)
                    .bg(Color::Red)
                    .add_modifier(Modifier::BOLD),
            )
        }
    }
}

/// A per-second rate: one decimal below 100, none above, `k`/`M` for big ones.
pub fn rate(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v) if v >= 1e6 => format!("{:.1}M", v / 1e6),
        Some(v) if v >= 1e4 => format!("{:.1}k", v / 1e3),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
    }
}

/// A gauge that counts messages.
pub fn count(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(v) if v >= 1e7 => format!("{:.1}M", v / 1e6),
        Some(v) => format!("{v:.0}"),
    }
}

/// A duration in seconds, in the unit that reads best.
pub fn duration(secs: Option<f64>) -> String {
    let Some(secs) = secs.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".to_owned();
    };
    if secs == 0.0 {
        "0s".to_owned()
    } else if secs < 1e-3 {
        format!("{:.0}µs", secs * 1e6)
    } else if secs < 1.0 {
        format!("{:.0}ms", secs * 1e3)
    } else if secs < 60.0 {
        format!("{secs:.1}s")
    } else if secs < 3600.0 {
        let whole = secs as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    } else {
        let whole = secs as u64;
        format!("{}h{:02}m", whole / 3600, (whole % 3600) / 60)
    }
}

/// The p50 and p99 cells. A mean (no buckets served) shows as `~mean` under p50.
fn latency_cells(latency: Latency) -> (String, String) {
    match latency {
        Latency::Unknown => ("-".to_owned(), "-".to_owned()),
        Latency::Idle => ("idle".to_owned(), "idle".to_owned()),
        Latency::Quantiles { p50, p99 } => (duration(Some(p50)), duration(Some(p99))),
        Latency::Mean(mean) => (format!("~{}", duration(Some(mean))), "-".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::top::model::RowKey;
    use ratatui::backend::TestBackend;
    use ratatui::Terminal;

    fn screen(view: &View<'_>) -> String {
        let mut terminal = Terminal::new(TestBackend::new(120, 8)).unwrap();
        terminal.draw(|frame| draw(frame, view)).unwrap();
        let buffer = terminal.backend().buffer().clone();
        let width = buffer.area.width as usize;
        buffer
            .content()
            .chunks(width)
            .map(|line| line.iter().map(|cell| cell.symbol()).collect::<String>())
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn row() -> Row {
        Row {
            key: RowKey {
                route: "orders".into(),
                queue_id: "q-123".into(),
            },
            pulled_per_sec: Some(250.0),
            acked_per_sec: Some(12.26),
            errors_per_sec: Some(0.0),
            in_flight: Some(40.0),
            backlog: Some(12_000.0),
            oldest_age_secs: Some(75.0),
            latency: Latency::Quantiles {
                p50: 0.012,
                p99: 1.5,
            },
        }
    }

    #[test]
    fn a_row_shows_every_column() {
        let rows = [row()];
        let text = screen(&View {
            url: "http://127.0.0.1:9464/metrics",
            rows: &rows,
            health: &Health::Live,
            last_good: Some(Duration::ZERO),
            interval: Duration::from_secs(1),
        });
        for header in HEADERS {
            assert!(text.contains(header), "{header} missing:\n{text}");
        }
        let line = text
            .lines()
            .find(|l| l.contains("q-123"))
            .unwrap_or_else(|| panic!("no row:\n{text}"));
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            cells,
            ["orders", "q-123", "250", "12.3", "0.0", "40", "12000", "1m15s", "12ms", "1.5s"],
            "{text}"
        );
        assert!(text.contains("live: 1 route/queue row,"), "{text}");
    }

    #[test]
    fn a_failed_scrape_says_so_and_keeps_the_rows() {
        let rows = [row()];
        let text = screen(&View {
            url: "http://127.0.0.1:1/metrics",
            rows: &rows,
            health: &Health::Failed("connection refused".into()),
            last_good: Some(Duration::from_secs(7)),
            interval: Duration::from_secs(1),
        });
        assert!(
            text.contains(
                "UNAVAILABLE: connection refused; retrying every 1s; showing data from 7s ago"
            ),
            "{text}"
        );
        assert!(text.contains("q-123"), "{text}");
    }

    #[test]
    fn an_endpoint_without_bridge_metrics_is_named() {
        let text = screen(&View {
            url: "http://x/metrics",
            rows: &[],
            health: &Health::Live,
            last_good: None,
            interval: Duration::from_secs(1),
        });
        assert!(text.contains("serves no cfq_ metrics"), "{text}");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(rate(None), "-");
        assert_eq!(rate(Some(0.26)), "0.3");
        assert_eq!(rate(Some(4321.0)), "4321");
        assert_eq!(rate(Some(54_321.0)), "54.3k");
        assert_eq!(count(Some(3.0)), "3");
        assert_eq!(duration(Some(0.0)), "0s");
        assert_eq!(duration(Some(0.000_5)), "500µs");
        assert_eq!(duration(Some(2.26)), "2.3s");
        assert_eq!(duration(Some(7322.0)), "2h02m");
        assert_eq!(duration(Some(f64::NAN)), "-");
        assert_eq!(
            latency_cells(Latency::Mean(0.2)),
            ("~200ms".into(), "-".into())
        );
    }
}
