//! The report as a picture (`--svg`): queue length, serving agents and cumulative cost over time, one line per
//! run compared, in three panels sharing the time axis. Plain SVG 1.1 written by hand: three panels of polylines
//! do not justify a plotting library's build time. Every line is a `<polyline>` with `data-run` and
//! `data-metric` attributes, so tools (and the tests) can find the series again.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use jiff::Timestamp;

/// A run's values over time, one point per step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Series {
    pub points: Vec<Point>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub at: Timestamp,
    /// The longest the queue was since the previous point.
    pub queue: u64,
    /// The most agents in contact (booted, checked in) since the previous point.
    pub serving: u64,
    /// Cost so far, per currency.
    pub cost: BTreeMap<String, f64>,
}

const WIDTH: f64 = 960.0;
const PANEL_HEIGHT: f64 = 180.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const GAP: f64 = 50.0;
/// Distinguishable for most kinds of colour blindness (Okabe–Ito).
const COLOURS: [&str; 7] = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"];

/// Draws the runs (name, series) into one SVG document.
pub fn render(runs: &[(&str, &Series)]) -> String {
    let (from, until) = span(runs);
    let currency =
        runs.iter().filter_map(|(_, series)| series.points.last()).flat_map(|point| point.cost.keys()).min().cloned();
    let legend_height = 20.0 * runs.len() as f64;
    let height = TOP + 3.0 * PANEL_HEIGHT + 3.0 * GAP + legend_height;
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(svg, r#"<title>ciscale simulate: {} → {}</title>"#, from, until);
    let _ = writeln!(svg, r##"<rect width="100%" height="100%" fill="#ffffff"/>"##);
    let cost_title = match &currency {
        Some(currency) => format!("cumulative cost ({currency})"),
        None => "cumulative cost (no prices)".to_owned(),
    };
    let panels: [(&str, String, Box<dyn Fn(&Point) -> f64>); 3] = [
        ("queue", "queued jobs".to_owned(), Box::new(|point: &Point| point.queue as f64)),
        ("serving", "serving agents".to_owned(), Box::new(|point: &Point| point.serving as f64)),
        (
            "cost",
            cost_title,
            Box::new(move |point: &Point| currency.as_ref().and_then(|c| point.cost.get(c)).copied().unwrap_or(0.0)),
        ),
    ];
    for (index, (metric, title, value)) in panels.iter().enumerate() {
        let top = TOP + index as f64 * (PANEL_HEIGHT + GAP);
        let max =
            runs.iter().flat_map(|(_, series)| series.points.iter().map(|point| value(point))).fold(0.0f64, f64::max);
        let max = nice_ceiling(max);
        panel_frame(&mut svg, top, title, max, from, until);
        for (run_index, (name, series)) in runs.iter().enumerate() {
            let colour = COLOURS[run_index % COLOURS.len()];
            let mut points = String::new();
            for point in &series.points {
                let x = x_of(point.at, from, until);
                let y = top + PANEL_HEIGHT - (value(point) / max) * PANEL_HEIGHT;
                let _ = write!(points, "{x:.1},{y:.1} ");
            }
            let _ = writeln!(
                svg,
                r#"<polyline class="series" data-run="{}" data-metric="{metric}" fill="none" stroke="{colour}" stroke-width="1.5" points="{}"/>"#,
                escape(name),
                points.trim_end()
            );
        }
    }
    let legend_top = TOP + 3.0 * (PANEL_HEIGHT + GAP) - GAP / 2.0;
    for (run_index, (name, _)) in runs.iter().enumerate() {
        let y = legend_top + 20.0 * run_index as f64;
        let colour = COLOURS[run_index % COLOURS.len()];
        let _ = writeln!(
            svg,
            r#"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="{colour}" stroke-width="3"/><text x="{}" y="{}">{}</text>"#,
            LEFT + 24.0,
            LEFT + 30.0,
            y + 4.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn span(runs: &[(&str, &Series)]) -> (Timestamp, Timestamp) {
    let times = runs.iter().flat_map(|(_, series)| series.points.iter().map(|point| point.at));
    let from = times.clone().min().unwrap_or(Timestamp::UNIX_EPOCH);
    let until = times.max().unwrap_or(from);
    (from, until)
}

fn x_of(at: Timestamp, from: Timestamp, until: Timestamp) -> f64 {
    let total = until.duration_since(from).as_secs_f64().max(1.0);
    LEFT + (at.duration_since(from).as_secs_f64() / total) * (WIDTH - LEFT - RIGHT)
}

/// 1, 2 or 5 times a power of ten, at least `value` (and at least 1): round grid lines.
fn nice_ceiling(value: f64) -> f64 {
    if value <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(value.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().map(|factor| factor * magnitude).find(|nice| *nice >= value).unwrap_or(value)
}

fn panel_frame(svg: &mut String, top: f64, title: &str, max: f64, from: Timestamp, until: Timestamp) {
    let bottom = top + PANEL_HEIGHT;
    let _ = writeln!(svg, r#"<text x="{LEFT}" y="{}" font-weight="bold">{}</text>"#, top - 8.0, escape(title));
    for step in 0..=4 {
        let value = max * f64::from(step) / 4.0;
        let y = bottom - PANEL_HEIGHT * f64::from(step) / 4.0;
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#dddddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            axis_number(value)
        );
    }
    // Day ticks when the span is days long, else hours.
    let total = until.duration_since(from).as_secs().max(1);
    let tick = if total >= 2 * 86_400 {
        86_400
    } else if total >= 6 * 3600 {
        3600 * 3
    } else {
        3600
    };
    let mut at = (from.as_second().div_euclid(tick) + 1) * tick;
    while at < until.as_second() {
        if let Ok(moment) = Timestamp::from_second(at) {
            let x = x_of(moment, from, until);
            let label = if tick == 86_400 {
                moment.strftime("%a %d").to_string()
            } else {
                moment.strftime("%H:%M").to_string()
            };
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{bottom}" stroke="#eeeeee"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#666666">{label}</text>"##,
                bottom + 14.0
            );
        }
        at += tick;
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{LEFT}" y="{top}" width="{}" height="{PANEL_HEIGHT}" fill="none" stroke="#999999"/>"##,
        WIDTH - LEFT - RIGHT
    );
}

fn axis_number(value: f64) -> String {
    if value >= 100.0 || value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

/// Text safe in XML content and attribute values.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(12.0), 20.0);
        assert_eq!(nice_ceiling(50.0), 50.0);
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape(r#"a<b>&"c'"#), "a&lt;b&gt;&amp;&quot;c&apos;");
    }
}
