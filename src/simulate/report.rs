//! What a simulation run found, per pool and in total, and how it is shown: a table for humans, JSON with the
//! keys the CLI contract names, and side by side with deltas for `--compare`.
//!
//! Percentiles are nearest-rank over the jobs' queue waits (job `at` → an agent takes it): the p-th percentile
//! of n waits is the ⌈p·n/100⌉-th smallest, so it is always a wait some job really had.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use jiff::Timestamp;
use serde::Serialize;

/// Sums for one pool (or all of them).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Queue waits of the jobs this pool's agents took, in seconds.
    pub waits: Vec<f64>,
    /// Hours instances were up (booting or running), whatever their agents did.
    pub agent_hours: f64,
    /// Hours agents ran at least one job.
    pub busy_hours: f64,
    pub creates: u64,
    pub deletes: u64,
    /// Creates that failed (no capacity for any candidate).
    pub create_failures: u64,
    /// Cost per currency.
    pub cost: BTreeMap<String, f64>,
    /// Instance hours nobody could price.
    pub unpriced_hours: f64,
}

impl Tally {
    pub fn absorb(&mut self, other: &Tally) {
        self.waits.extend_from_slice(&other.waits);
        self.agent_hours += other.agent_hours;
        self.busy_hours += other.busy_hours;
        self.creates += other.creates;
        self.deletes += other.deletes;
        self.create_failures += other.create_failures;
        for (currency, amount) in &other.cost {
            *self.cost.entry(currency.clone()).or_default() += amount;
        }
        self.unpriced_hours += other.unpriced_hours;
    }

    pub fn summary(&self) -> Summary {
        let mut sorted = self.waits.clone();
        sorted.sort_by(f64::total_cmp);
        let percentile = |p: f64| -> Option<f64> {
            if sorted.is_empty() {
                return None;
            }
            let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
            Some(round(sorted[rank.min(sorted.len()) - 1], 3))
        };
        Summary {
            jobs: self.waits.len() as u64,
            wait_p50_s: percentile(50.0),
            wait_p95_s: percentile(95.0),
            wait_p99_s: percentile(99.0),
            wait_max_s: sorted.last().map(|max| round(*max, 3)),
            agent_hours: round(self.agent_hours, 4),
            busy_hours: round(self.busy_hours, 4),
            creates: self.creates,
            cost: self.cost.iter().map(|(currency, amount)| (currency.clone(), round(*amount, 4))).collect(),
        }
    }
}

/// Rounded to `digits` decimals, without `-0`.
pub fn round(value: f64, digits: i32) -> f64 {
    let scale = 10f64.powi(digits);
    let rounded = (value * scale).round() / scale;
    if rounded == 0.0 {
        0.0
    } else {
        rounded
    }
}

/// The numbers of one pool or the total, exactly the keys of the JSON output (`null` waits when no job ran).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    pub jobs: u64,
    pub wait_p50_s: Option<f64>,
    pub wait_p95_s: Option<f64>,
    pub wait_p99_s: Option<f64>,
    pub wait_max_s: Option<f64>,
    pub agent_hours: f64,
    pub busy_hours: f64,
    pub creates: u64,
    pub cost: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolSummary {
    pub pool: String,
    #[serde(flatten)]
    pub summary: Summary,
}

/// The JSON of one run: `{"pools": [...], "total": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunJson {
    pub pools: Vec<PoolSummary>,
    pub total: Summary,
}

/// One run of a config (or of a reference policy) over a trace.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// What was run: the config's path, or `picus` for the reference policy.
    pub name: String,
    /// Per pool, in config order.
    pub pools: Vec<(String, Tally)>,
    pub from: Timestamp,
    /// The window's end, or later when jobs were still queued or running then.
    pub until: Timestamp,
    /// Jobs no pool of the config can take (they wait for ever; left out of the waits).
    pub unmatched_jobs: u64,
    /// Jobs that had not finished when the run gave up ([`super::Settings::give_up_after`] after the window).
    pub unfinished_jobs: u64,
    /// Jobs whose agent went away while they ran (put back in the queue, as a CI does). Should be 0.
    pub interrupted_jobs: u64,
    /// Cycles that observed and planned (idle stretches skipped without planning are not counted).
    pub cycles: u64,
    /// Calls of the planner: one per cycle, or one per part planned when the config is planned by parts (see
    /// [`super::engine`]), none for the parts that cannot have changed.
    pub plans: u64,
    /// Where prices came from, one line per backend.
    pub price_notes: Vec<String>,
    /// Queue length, serving agents and cumulative cost over time, when asked for (`--svg`).
    pub series: Option<super::svg::Series>,
}

impl RunReport {
    pub fn total(&self) -> Tally {
        let mut total = Tally::default();
        for (_, tally) in &self.pools {
            total.absorb(tally);
        }
        total
    }

    pub fn json(&self) -> RunJson {
        RunJson {
            pools: self
                .pools
                .iter()
                .map(|(pool, tally)| PoolSummary { pool: pool.clone(), summary: tally.summary() })
                .collect(),
            total: self.total().summary(),
        }
    }

    /// The human table: one row per pool, then the total, then what a reader should know.
    pub fn render(&self) -> String {
        let mut rows: Vec<(String, Summary, &Tally)> =
            self.pools.iter().map(|(pool, tally)| (pool.clone(), tally.summary(), tally)).collect();
        let total = self.total();
        rows.push(("total".to_owned(), total.summary(), &total));
        let mut table = vec![vec![
            "pool".to_owned(),
            "jobs".to_owned(),
            "wait p50".to_owned(),
            "p95".to_owned(),
            "p99".to_owned(),
            "max".to_owned(),
            "agent h".to_owned(),
            "busy h".to_owned(),
            "creates".to_owned(),
            "deletes".to_owned(),
            "cost".to_owned(),
        ]];
        for (name, summary, tally) in &rows {
            table.push(vec![
                name.clone(),
                summary.jobs.to_string(),
                wait_text(summary.wait_p50_s),
                wait_text(summary.wait_p95_s),
                wait_text(summary.wait_p99_s),
                wait_text(summary.wait_max_s),
                format!("{:.2}", summary.agent_hours),
                format!("{:.2}", summary.busy_hours),
                summary.creates.to_string(),
                tally.deletes.to_string(),
                cost_text(&summary.cost),
            ]);
        }
        let mut out = format!("{}: {} → {}\n", self.name, self.from, self.until);
        out.push_str(&align(&table, 1));
        for note in self.notes(&total) {
            let _ = writeln!(out, "  {note}");
        }
        out
    }

    /// What a reader should know beyond the table.
    pub fn notes(&self, total: &Tally) -> Vec<String> {
        let mut notes = Vec::new();
        let idle = (total.agent_hours - total.busy_hours).max(0.0);
        if total.agent_hours > 0.0 {
            notes.push(format!(
                "agents were idle {:.2} h of {:.2} h ({:.0} %)",
                idle,
                total.agent_hours,
                100.0 * idle / total.agent_hours
            ));
        }
        if total.create_failures > 0 {
            notes.push(format!("{} creates failed for lack of capacity (and were retried)", total.create_failures));
        }
        if self.unmatched_jobs > 0 {
            notes.push(format!("{} jobs no pool can take were left in the queue", self.unmatched_jobs));
        }
        if self.unfinished_jobs > 0 {
            notes
                .push(format!("{} jobs had not finished long after the window; the run gave up", self.unfinished_jobs));
        }
        if self.interrupted_jobs > 0 {
            notes.push(format!("{} jobs lost their agent while running and were queued again", self.interrupted_jobs));
        }
        if total.unpriced_hours > 0.0 {
            notes.push(format!(
                "{:.2} instance hours have no price (set `simulation.prices` on the backend, or `--price TYPE=0.01EUR`)",
                total.unpriced_hours
            ));
        }
        notes.extend(self.price_notes.iter().cloned());
        notes
    }
}

fn wait_text(wait: Option<f64>) -> String {
    match wait {
        None => "-".to_owned(),
        Some(secs) => human_secs(secs),
    }
}

/// `0s`, `45s`, `12m5s`, `2h3m`: the precision a human compares waits at.
pub fn human_secs(secs: f64) -> String {
    let whole = secs.round().max(0.0) as u64;
    if secs > 0.0 && secs < 10.0 {
        return format!("{secs:.1}s");
    }
    match (whole / 3600, (whole % 3600) / 60, whole % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

pub fn cost_text(cost: &BTreeMap<String, f64>) -> String {
    if cost.is_empty() {
        return "-".to_owned();
    }
    cost.iter().map(|(currency, amount)| format!("{amount:.2} {currency}")).collect::<Vec<_>>().join(" + ")
}

/// Columns padded to their widest cell: the first left-aligned, the rest right-aligned.
fn align(rows: &[Vec<String>], indent: usize) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|row| row.get(c)).map(|cell| cell.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        out.push_str(&" ".repeat(indent * 2));
        for (c, cell) in row.iter().enumerate() {
            let pad = widths[c].saturating_sub(cell.chars().count());
            if c == 0 {
                out.push_str(cell);
                out.push_str(&" ".repeat(pad));
            } else {
                out.push_str("  ");
                out.push_str(&" ".repeat(pad));
                out.push_str(cell);
            }
        }
        out.push('\n');
    }
    out
}

/// Several runs side by side: one column per run, one row per measure (totals), and for each run after the
/// first its change against the first.
pub fn render_compare(runs: &[RunReport]) -> String {
    let totals: Vec<(Summary, Tally)> = runs
        .iter()
        .map(|run| {
            let total = run.total();
            (total.summary(), total)
        })
        .collect();
    let Some((base, base_tally)) = totals.first() else {
        return String::new();
    };
    let mut header = vec!["".to_owned()];
    header.extend(runs.iter().map(|run| run.name.clone()));
    let mut table = vec![header];
    let currencies: std::collections::BTreeSet<&String> = totals.iter().flat_map(|(s, _)| s.cost.keys()).collect();
    type Measure<'a> = (String, Box<dyn Fn(&Summary, &Tally) -> Option<f64> + 'a>, fn(f64) -> String);
    let mut measures: Vec<Measure<'_>> = vec![
        ("jobs".to_owned(), Box::new(|s: &Summary, _: &Tally| Some(s.jobs as f64)), |v| format!("{v:.0}")),
        ("wait p50".to_owned(), Box::new(|s: &Summary, _: &Tally| s.wait_p50_s), human_secs),
        ("wait p95".to_owned(), Box::new(|s: &Summary, _: &Tally| s.wait_p95_s), human_secs),
        ("wait p99".to_owned(), Box::new(|s: &Summary, _: &Tally| s.wait_p99_s), human_secs),
        ("wait max".to_owned(), Box::new(|s: &Summary, _: &Tally| s.wait_max_s), human_secs),
        ("agent hours".to_owned(), Box::new(|s: &Summary, _: &Tally| Some(s.agent_hours)), |v| format!("{v:.2}")),
        ("busy hours".to_owned(), Box::new(|s: &Summary, _: &Tally| Some(s.busy_hours)), |v| format!("{v:.2}")),
        ("creates".to_owned(), Box::new(|s: &Summary, _: &Tally| Some(s.creates as f64)), |v| format!("{v:.0}")),
        ("deletes".to_owned(), Box::new(|_: &Summary, t: &Tally| Some(t.deletes as f64)), |v| format!("{v:.0}")),
    ];
    for currency in currencies {
        let key = currency.clone();
        measures.push((
            format!("cost {currency}"),
            Box::new(move |s: &Summary, _: &Tally| Some(s.cost.get(&key).copied().unwrap_or(0.0))),
            |v| format!("{v:.2}"),
        ));
    }
    for (label, value, show) in &measures {
        let mut row = vec![label.clone()];
        let base_value = value(base, base_tally);
        for (index, (summary, tally)) in totals.iter().enumerate() {
            let this = value(summary, tally);
            let mut cell = this.map_or("-".to_owned(), |v| show(v));
            if index > 0 {
                if let (Some(this), Some(base_value)) = (this, base_value) {
                    cell.push_str(&format!(" ({})", delta_text(this, base_value)));
                }
            }
            row.push(cell);
        }
        table.push(row);
    }
    let mut out = String::new();
    for run in runs {
        let _ = writeln!(out, "{}: {} → {}", run.name, run.from, run.until);
    }
    out.push('\n');
    out.push_str(&align(&table, 0));
    out.push_str(&format!("(changes against `{}`)\n", runs[0].name));
    out
}

/// `+12 %`, `-30 %`, `±0 %`; against zero: `new` or `±0`.
fn delta_text(value: f64, base: f64) -> String {
    if base == 0.0 {
        return if value == 0.0 { "±0 %".to_owned() } else { "new".to_owned() };
    }
    let percent = 100.0 * (value - base) / base;
    if percent.abs() < 0.5 {
        "±0 %".to_owned()
    } else {
        format!("{percent:+.0} %")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let tally = Tally { waits: (1..=100).map(f64::from).collect(), ..Tally::default() };
        let summary = tally.summary();
        assert_eq!(summary.wait_p50_s, Some(50.0));
        assert_eq!(summary.wait_p95_s, Some(95.0));
        assert_eq!(summary.wait_p99_s, Some(99.0));
        assert_eq!(summary.wait_max_s, Some(100.0));
        let one = Tally { waits: vec![7.5], ..Tally::default() }.summary();
        assert_eq!((one.wait_p50_s, one.wait_p99_s), (Some(7.5), Some(7.5)));
        assert_eq!(Tally::default().summary().wait_p50_s, None);
    }

    #[test]
    fn deltas() {
        assert_eq!(delta_text(70.0, 100.0), "-30 %");
        assert_eq!(delta_text(100.2, 100.0), "±0 %");
        assert_eq!(delta_text(5.0, 0.0), "new");
        assert_eq!(human_secs(45.0), "45s");
        assert_eq!(human_secs(725.0), "12m5s");
        assert_eq!(human_secs(7380.0), "2h3m");
        assert_eq!(human_secs(2.25), "2.2s");
    }
}
