//! The GitHub fake's job history, for `ciscale trace export`: finished (and unfinished) workflow runs with their
//! jobs' times, the `created` filter of the run list with GitHub's 1,000-result cap, and `filter=latest|all` of a
//! run's jobs. Kept apart from the rest of the fake so changes to either merge easily.
//!
//! Where each behaviour comes from:
//! - `created` (`GET /repos/{o}/{r}/actions/runs`): "Returns workflow runs created within the given date-time
//!   range", in GitHub's search syntax (`A..B` inclusive at both ends, `>=A`, `<=B`, `>A`, `<B`, or one time). The
//!   spec's description: "up to 1,000 results for each search when using the following parameters: `actor`,
//!   `branch`, `check_suite_id`, `created`, `event`, `head_sha`, `status`" — the fake serves no run past the
//!   1,000th of such a list, and `total_count` still counts them all (what github.com does; assumed for GHES).
//! - `filter` (`GET .../runs/{id}/jobs`): `latest` (the default) "returns jobs from the most recent execution of
//!   the workflow run", `all` every attempt's.
//! - A job's times (the spec's `job`): `created_at` when it was queued, `started_at` set on every job (GitHub sets
//!   it when the job is made and again when a runner starts it; a skipped job's equals its `completed_at`),
//!   `completed_at` null until it ends; `runner_id`/`runner_name`/`runner_group_*` null when no runner was
//!   assigned (cancelled while queued, skipped).

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::{next_id, time, FakeGithub, FakeJob, FakeRun, State};

/// The history kept besides the live world: per job, its times and attempt.
#[derive(Debug, Default)]
pub(super) struct History {
    jobs: BTreeMap<u64, PastTimes>,
}

#[derive(Debug, Clone)]
struct PastTimes {
    attempt: u64,
    started_at: i64,
    completed_at: Option<i64>,
    conclusion: Option<String>,
    runner: Option<(u64, String)>,
}

/// A job of a past run, as a test describes it.
#[derive(Debug, Clone)]
pub struct PastJobSpec {
    pub labels: Vec<String>,
    /// UNIX seconds.
    pub queued: i64,
    /// When a runner took it; `None`: never (cancelled while queued, skipped, or still queued).
    pub started: Option<i64>,
    /// When it ended (run or not); `None`: it has not.
    pub completed: Option<i64>,
    /// `success`, `failure`, `cancelled`, `skipped`; read when it has completed.
    pub conclusion: &'static str,
    /// The run attempt it belongs to (1 for the first).
    pub attempt: u64,
}

impl PastJobSpec {
    /// A job that ran on a runner from `started` to `completed` and succeeded.
    pub fn ran(labels: &[&str], queued: i64, started: i64, completed: i64) -> Self {
        Self {
            labels: labels.iter().map(|label| (*label).to_owned()).collect(),
            queued,
            started: Some(started),
            completed: Some(completed),
            conclusion: "success",
            attempt: 1,
        }
    }

    /// A job cancelled at `cancelled` before any runner took it.
    pub fn cancelled_while_queued(labels: &[&str], queued: i64, cancelled: i64) -> Self {
        Self { started: None, completed: Some(cancelled), conclusion: "cancelled", ..Self::ran(labels, queued, 0, 0) }
    }

    /// A job still waiting for a runner.
    pub fn queued(labels: &[&str], queued: i64) -> Self {
        Self { started: None, completed: None, conclusion: "", ..Self::ran(labels, queued, 0, 0) }
    }

    /// A job a runner took at `started` and still runs.
    pub fn running(labels: &[&str], queued: i64, started: i64) -> Self {
        Self { completed: None, conclusion: "", ..Self::ran(labels, queued, started, 0) }
    }

    pub fn attempt(self, attempt: u64) -> Self {
        Self { attempt, ..self }
    }
}

impl FakeGithub {
    /// A workflow run of `repo` created at `created` (UNIX seconds) with these jobs; returns its id and the jobs'.
    pub fn add_past_run(&self, repo: &str, created: i64, jobs: &[PastJobSpec]) -> (u64, Vec<u64>) {
        let mut state = self.state();
        assert!(state.repos.contains_key(repo), "no repo `{repo}` in the fake");
        let run_id = next_id(&mut state);
        let mut ids = Vec::new();
        for spec in jobs {
            let id = next_id(&mut state);
            let status = match (spec.started, spec.completed) {
                (_, Some(_)) => "completed",
                (Some(_), None) => "in_progress",
                (None, None) => "queued",
            };
            let runner = spec.started.map(|_| {
                let runner_id = next_id(&mut state);
                (runner_id, format!("runner-{runner_id}"))
            });
            state.jobs.insert(
                id,
                FakeJob {
                    id,
                    run_id,
                    repo: repo.to_owned(),
                    labels: spec.labels.clone(),
                    status: status.to_owned(),
                    runner_id: runner.as_ref().map(|(id, _)| *id),
                    runner_name: runner.as_ref().map(|(_, name)| name.clone()),
                    created_at: spec.queued,
                },
            );
            state.history.jobs.insert(
                id,
                PastTimes {
                    attempt: spec.attempt,
                    // GitHub sets `started_at` on a job that never ran too: to when it ended (skipped, cancelled)
                    // or was made (still queued).
                    started_at: spec.started.or(spec.completed).unwrap_or(spec.queued),
                    completed_at: spec.completed,
                    conclusion: spec.completed.map(|_| spec.conclusion.to_owned()),
                    runner,
                },
            );
            ids.push(id);
        }
        state
            .runs
            .insert(run_id, FakeRun { id: run_id, repo: repo.to_owned(), jobs: ids.clone(), created_at: created });
        (run_id, ids)
    }
}

/// Whether a run created at `created` passes the list's `created` filter (none: every run).
pub(super) fn created_matches(query: &[(String, String)], created: i64) -> bool {
    let Some(filter) = query.iter().find(|(key, _)| key == "created").map(|(_, value)| value.trim()) else {
        return true;
    };
    let at = |text: &str| text.trim().parse::<jiff::Timestamp>().ok().map(|at| at.as_second());
    let within = |first: Option<i64>, last: Option<i64>| {
        first.is_none_or(|first| created >= first) && last.is_none_or(|last| created <= last)
    };
    if let Some((first, last)) = filter.split_once("..") {
        // `*` is an open end.
        let end = |text: &str| if text.trim() == "*" { None } else { at(text) };
        return within(end(first), end(last));
    }
    if let Some(rest) = filter.strip_prefix(">=") {
        return within(at(rest), None);
    }
    if let Some(rest) = filter.strip_prefix("<=") {
        return within(None, at(rest));
    }
    if let Some(rest) = filter.strip_prefix('>') {
        return at(rest).is_some_and(|first| created > first);
    }
    if let Some(rest) = filter.strip_prefix('<') {
        return at(rest).is_some_and(|last| created < last);
    }
    at(filter).is_some_and(|exact| created == exact)
}

/// The search parameters under which GitHub lists at most 1,000 runs.
const CAPPED_BY: [&str; 7] = ["actor", "branch", "check_suite_id", "created", "event", "head_sha", "status"];

/// The part of a run list GitHub serves: all of it, or its first 1,000 under a search parameter.
pub(super) fn capped(runs: Vec<Value>, query: &[(String, String)]) -> Vec<Value> {
    if query.iter().any(|(key, _)| CAPPED_BY.contains(&key.as_str())) {
        runs.into_iter().take(1000).collect()
    } else {
        runs
    }
}

/// Whether a run's job is listed under the jobs call's `filter`: every attempt's (`all`) or the latest's.
pub(super) fn attempt_listed(state: &State, run: &FakeRun, job: &FakeJob, query: &[(String, String)]) -> bool {
    let filter = query.iter().find(|(key, _)| key == "filter").map_or("latest", |(_, value)| value.as_str());
    if filter == "all" {
        return true;
    }
    let attempt = |id: &u64| state.history.jobs.get(id).map_or(1, |times| times.attempt);
    let latest = run.jobs.iter().map(attempt).max().unwrap_or(1);
    attempt(&job.id) == latest
}

/// A past job's times, attempt and runner over what the live fake writes.
pub(super) fn apply(state: &State, job: &FakeJob, value: &mut Value) {
    let Some(times) = state.history.jobs.get(&job.id) else {
        return;
    };
    value["run_attempt"] = json!(times.attempt);
    value["started_at"] = json!(time(times.started_at));
    value["completed_at"] = times.completed_at.map_or(Value::Null, |at| json!(time(at)));
    value["conclusion"] = times.conclusion.as_ref().map_or(Value::Null, |conclusion| json!(conclusion));
    match &times.runner {
        Some((id, name)) => {
            value["runner_id"] = json!(id);
            value["runner_name"] = json!(name);
            value["runner_group_id"] = json!(1);
            value["runner_group_name"] = json!("Default");
        }
        None => {
            for key in ["runner_id", "runner_name", "runner_group_id", "runner_group_name"] {
                value[key] = Value::Null;
            }
        }
    }
}
