//! Job traces: the jobs `ciscale simulate` replays, read from JSON Lines or CSV and written as JSON Lines.
//!
//! One job a line: `{"at": "2026-03-02T09:14:05Z", "duration": "7m30s", "labels": {"platform": "linux/amd64"}}`.
//! - `at` (required): when the job entered the queue, RFC 3339 with an offset (`Z` or `+01:00`);
//! - `duration` (required): how long it runs once an agent takes it, a Go duration (`90s`, `7m30s`);
//! - `labels`: what the job asks for in Woodpecker's terms (task labels);
//! - `demands`: what it asks for in Azure Pipelines' terms (`docker`, `Agent.OS -equals Linux`), or a GitHub/Forgejo
//!   job's `runs-on` labels;
//! - `ci`: the config's CI source it belongs to, when the config has more than one (else: the first source with a
//!   pool that can take it);
//! - `id`: anything that helps a human find the job again (ignored by the simulation).
//!
//! CSV has the same columns, with a header line naming them in any order; `labels` is `key=value;key=value` (or
//! a JSON object), `demands` is `;`-separated. Every bad line is reported as `file:line: ...`, all at once.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::model::{CiName, GoDuration, LabelInterner, Labels};

/// One job of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub at: Timestamp,
    /// Never negative.
    pub duration: SignedDuration,
    /// Shared with every job of the trace that has the same set ([`Trace::new`] interns them).
    pub labels: Labels,
    pub demands: Vec<String>,
    pub ci: Option<CiName>,
    pub id: Option<String>,
}

/// The jobs of a trace, ordered by `at` (jobs with the same `at` keep their order in the file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    pub jobs: Vec<Job>,
}

impl Trace {
    /// The jobs sorted by arrival, their label sets interned: a trace of many jobs over few sets stores each set
    /// once, and the simulated CI's task for a job clones a pointer.
    pub fn new(mut jobs: Vec<Job>) -> Self {
        // Stable: equal arrival times keep the order the file (or generator) gave them.
        jobs.sort_by_key(|job| job.at);
        let mut interner = LabelInterner::new();
        for job in &mut jobs {
            job.labels = interner.intern(&job.labels);
        }
        Self { jobs }
    }

    /// The first arrival and the last finish, if there is a job.
    pub fn span(&self) -> Option<(Timestamp, Timestamp)> {
        let first = self.jobs.first()?.at;
        let last = self.jobs.iter().map(|job| job.at.saturating_add(job.duration).unwrap_or(Timestamp::MAX)).max()?;
        Some((first, last))
    }

    /// The trace as JSON Lines, one job a line, in the form [`parse_jsonl`] reads.
    pub fn write_jsonl(&self, out: &mut dyn Write) -> std::io::Result<()> {
        for job in &self.jobs {
            let line = WireJob {
                at: job.at.to_string(),
                duration: go_duration(job.duration),
                labels: job.labels.clone(),
                demands: job.demands.clone(),
                ci: job.ci.as_ref().map(|ci| ci.to_string()),
                id: job.id.clone(),
            };
            let text = serde_json::to_string(&line).map_err(std::io::Error::other)?;
            writeln!(out, "{text}")?;
        }
        Ok(())
    }
}

/// A duration in Go's form with whole seconds at most (`7m30s`), as traces are written.
pub fn go_duration(duration: SignedDuration) -> String {
    let millis = duration.as_millis().max(0);
    let std = std::time::Duration::from_millis(u64::try_from(millis).unwrap_or(u64::MAX));
    GoDuration(std).to_string()
}

/// A line of a trace file as written.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireJob {
    at: String,
    duration: String,
    #[serde(default, skip_serializing_if = "Labels::is_empty")]
    labels: Labels,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    demands: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ci: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<String>,
}

/// One located problem of a trace file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineProblem {
    pub file: String,
    pub line: u64,
    pub message: String,
}

impl fmt::Display for LineProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.line, self.message)
    }
}

/// At most this many problems are listed; the rest are counted (a wrong file would otherwise print every line).
const MAX_LISTED: usize = 50;

/// Why a trace could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read trace `{}`", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", render_problems(problems))]
    Invalid { problems: Vec<LineProblem> },
    #[error("trace `{name}` has no jobs")]
    Empty { name: String },
}

fn render_problems(problems: &[LineProblem]) -> String {
    let mut text = format!("the trace has {} bad line{}:", problems.len(), if problems.len() == 1 { "" } else { "s" });
    for problem in problems.iter().take(MAX_LISTED) {
        text.push_str("\n  ");
        text.push_str(&problem.to_string());
    }
    if problems.len() > MAX_LISTED {
        text.push_str(&format!("\n  ... and {} more", problems.len() - MAX_LISTED));
    }
    text
}

/// Reads a trace file: CSV when its name ends in `.csv`, JSON Lines otherwise.
pub fn read_file(path: &Path) -> Result<Trace, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|source| TraceError::Io { path: path.to_owned(), source })?;
    let name = path.display().to_string();
    let is_csv = path.extension().is_some_and(|extension| extension.eq_ignore_ascii_case("csv"));
    if is_csv {
        parse_csv(&name, &text)
    } else {
        parse_jsonl(&name, &text)
    }
}

/// Parses JSON Lines. Blank lines are skipped; every other line must be one job.
pub fn parse_jsonl(name: &str, text: &str) -> Result<Trace, TraceError> {
    let mut jobs = Vec::new();
    let mut problems = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let line_number = index as u64 + 1;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let problem = |message: String| LineProblem { file: name.to_owned(), line: line_number, message };
        let wire: WireJob = match serde_json::from_str(line) {
            Ok(wire) => wire,
            Err(error) => {
                problems.push(problem(json_message(&error)));
                continue;
            }
        };
        match job_from_parts(&wire.at, &wire.duration, wire.labels, wire.demands, wire.ci, wire.id) {
            Ok(job) => jobs.push(job),
            Err(messages) => problems.extend(messages.into_iter().map(problem)),
        }
    }
    finish(name, jobs, problems)
}

/// serde_json's message without its "at line 1 column N" tail (the line is ours; a column inside one line of
/// JSON helps nobody), with the allowed keys named for an unknown one.
fn json_message(error: &serde_json::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" at line ") {
        Some(at) => &text[..at],
        None => &text,
    };
    if text.starts_with("unknown field") {
        return format!("{text}\nhint: a job has `at`, `duration`, `labels`, `demands`, `ci` and `id`");
    }
    if error.is_syntax() || error.is_eof() {
        return format!("not a JSON object: {text}");
    }
    text.to_owned()
}

fn job_from_parts(
    at: &str,
    duration: &str,
    labels: Labels,
    demands: Vec<String>,
    ci: Option<String>,
    id: Option<String>,
) -> Result<Job, Vec<String>> {
    let mut messages = Vec::new();
    let at = match at.trim().parse::<Timestamp>() {
        Ok(at) => Some(at),
        Err(_) => {
            messages.push(format!(
                "`at` is `{at}`, not an RFC 3339 time with an offset\nhint: write e.g. `2026-03-02T09:14:05Z`"
            ));
            None
        }
    };
    let duration = match duration.trim().parse::<GoDuration>() {
        Ok(duration) => Some(duration.signed()),
        Err(error) => {
            messages.push(format!("`duration`: {error}"));
            None
        }
    };
    match (at, duration) {
        (Some(at), Some(duration)) if messages.is_empty() => Ok(Job {
            at,
            duration,
            labels,
            demands: demands.into_iter().map(|demand| demand.trim().to_owned()).filter(|d| !d.is_empty()).collect(),
            ci: ci.map(CiName::new),
            id,
        }),
        _ => Err(messages),
    }
}

fn finish(name: &str, jobs: Vec<Job>, problems: Vec<LineProblem>) -> Result<Trace, TraceError> {
    if !problems.is_empty() {
        return Err(TraceError::Invalid { problems });
    }
    if jobs.is_empty() {
        return Err(TraceError::Empty { name: name.to_owned() });
    }
    Ok(Trace::new(jobs))
}

const CSV_COLUMNS: [&str; 6] = ["at", "duration", "labels", "demands", "ci", "id"];

/// Parses CSV with a header line. Cells are trimmed; empty `labels`, `demands`, `ci`, `id` cells mean none.
pub fn parse_csv(name: &str, text: &str) -> Result<Trace, TraceError> {
    let mut problems = Vec::new();
    let problem = |line: u64, message: String| LineProblem { file: name.to_owned(), line, message };
    let mut reader = csv::ReaderBuilder::new().has_headers(true).flexible(true).from_reader(text.as_bytes());
    let headers = match reader.headers() {
        Ok(headers) => headers.clone(),
        Err(error) => return Err(TraceError::Invalid { problems: vec![problem(1, format!("not CSV: {error}"))] }),
    };
    let mut columns: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, header) in headers.iter().enumerate() {
        let header = header.trim();
        match CSV_COLUMNS.iter().find(|known| **known == header) {
            Some(known) => {
                columns.insert(known, index);
            }
            None => problems.push(problem(
                1,
                format!(
                    "unknown column `{header}`\nhint: the columns are {}",
                    CSV_COLUMNS.map(|c| format!("`{c}`")).join(", ")
                ),
            )),
        }
    }
    for required in ["at", "duration"] {
        if !columns.contains_key(required) {
            problems.push(problem(1, format!("the header has no `{required}` column")));
        }
    }
    if !problems.is_empty() {
        return Err(TraceError::Invalid { problems });
    }
    let mut jobs = Vec::new();
    for record in reader.records() {
        let record = match record {
            Ok(record) => record,
            Err(error) => {
                let line = error.position().map_or(0, csv::Position::line);
                problems.push(problem(line, format!("not CSV: {error}")));
                continue;
            }
        };
        let line = record.position().map_or(0, csv::Position::line);
        if record.iter().all(|cell| cell.trim().is_empty()) {
            continue;
        }
        let cell = |column: &str| columns.get(column).and_then(|&index| record.get(index)).unwrap_or("").trim();
        let mut messages = Vec::new();
        let labels = parse_label_cell(cell("labels")).unwrap_or_else(|message| {
            messages.push(message);
            BTreeMap::new()
        });
        let demands = cell("demands").split(';').map(str::to_owned).collect();
        let optional = |text: &str| (!text.is_empty()).then(|| text.to_owned());
        let labels = Labels::from(labels);
        match job_from_parts(cell("at"), cell("duration"), labels, demands, optional(cell("ci")), optional(cell("id")))
        {
            Ok(job) if messages.is_empty() => jobs.push(job),
            Ok(_) => {}
            Err(more) => messages.extend(more),
        }
        problems.extend(messages.into_iter().map(|message| problem(line, message)));
    }
    finish(name, jobs, problems)
}

/// `key=value;key=value`, or a JSON object of strings.
fn parse_label_cell(cell: &str) -> Result<BTreeMap<String, String>, String> {
    if cell.is_empty() {
        return Ok(BTreeMap::new());
    }
    if cell.starts_with('{') {
        return serde_json::from_str(cell)
            .map_err(|error| format!("`labels` is not a JSON object of strings: {error}"));
    }
    let mut labels = BTreeMap::new();
    for pair in cell.split(';').map(str::trim).filter(|pair| !pair.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            return Err(format!(
                "`labels` entry `{pair}` is not `key=value`\nhint: write `platform=linux/amd64;repo=acme/app`"
            ));
        };
        labels.insert(key.trim().to_owned(), value.trim().to_owned());
    }
    Ok(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_round_trips() {
        let text = r#"{"at": "2026-03-02T09:14:05Z", "duration": "7m30s", "labels": {"platform": "linux/amd64"}}

{"at": "2026-03-02T09:00:00+01:00", "duration": "45s", "demands": ["docker"], "ci": "azure", "id": "r1"}
"#;
        let trace = parse_jsonl("t.jsonl", text).expect("valid");
        assert_eq!(trace.jobs.len(), 2);
        // Sorted by arrival: 09:00+01:00 is 08:00Z.
        assert_eq!(trace.jobs[0].at.to_string(), "2026-03-02T08:00:00Z");
        assert_eq!(trace.jobs[0].demands, vec!["docker".to_owned()]);
        assert_eq!(trace.jobs[1].duration, SignedDuration::from_secs(450));
        let mut written = Vec::new();
        trace.write_jsonl(&mut written).expect("write");
        let again = parse_jsonl("again", &String::from_utf8(written).expect("utf-8")).expect("reads back");
        assert_eq!(again, trace);
    }

    #[test]
    fn every_bad_line_is_reported_with_its_number() {
        let text = "{\"at\": \"2026-03-02T09:14:05Z\", \"duration\": \"1m\"}\n\
                    {\"at\": \"yesterday\", \"duration\": \"1m\"}\n\
                    not json\n\
                    {\"at\": \"2026-03-02T09:14:05Z\", \"duration\": \"-5s\", \"lables\": {}}\n\
                    {\"at\": \"2026-03-02T09:14:05Z\", \"duration\": \"1d\"}\n";
        let Err(TraceError::Invalid { problems }) = parse_jsonl("jobs.jsonl", text) else {
            panic!("expected located problems");
        };
        let lines: Vec<u64> = problems.iter().map(|problem| problem.line).collect();
        assert_eq!(lines, vec![2, 3, 4, 5]);
        assert!(problems[0].message.contains("`at` is `yesterday`"), "{problems:?}");
        assert!(problems[2].message.contains("unknown field `lables`"), "{problems:?}");
        let rendered = TraceError::Invalid { problems }.to_string();
        assert!(rendered.starts_with("the trace has 4 bad lines:\n  jobs.jsonl:2: `at`"), "{rendered}");
    }

    #[test]
    fn csv_with_any_column_order() {
        let text = "duration,at,labels,demands\n\
                    90s,2026-03-02T10:00:00Z,platform=linux/amd64;repo=a/b,\n\
                    \n\
                    2m,2026-03-02T09:00:00Z,\"{\"\"gpu\"\": \"\"yes\"\"}\",docker;Agent.OS -equals Linux\n";
        let trace = parse_csv("t.csv", text).expect("valid csv");
        assert_eq!(trace.jobs.len(), 2);
        assert_eq!(trace.jobs[0].labels.get("gpu"), Some("yes"));
        assert_eq!(trace.jobs[0].demands, vec!["docker".to_owned(), "Agent.OS -equals Linux".to_owned()]);
        assert_eq!(trace.jobs[1].labels.get("repo"), Some("a/b"));
    }

    #[test]
    fn csv_problems_are_located() {
        let Err(TraceError::Invalid { problems }) = parse_csv("t.csv", "at,duratoin\n") else {
            panic!("bad header");
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems.iter().all(|problem| problem.line == 1));
        let text = "at,duration,labels\n2026-03-02T10:00:00Z,1m,oops\nnoon,1m,\n";
        let Err(TraceError::Invalid { problems }) = parse_csv("t.csv", text) else {
            panic!("bad rows");
        };
        assert_eq!(problems.iter().map(|p| p.line).collect::<Vec<_>>(), vec![2, 3], "{problems:?}");
    }

    #[test]
    fn empty_trace_is_an_error() {
        assert!(matches!(parse_jsonl("e", "\n\n"), Err(TraceError::Empty { .. })));
    }
}
