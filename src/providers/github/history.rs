//! GitHub's job history, for `ciscale trace export`: every workflow job of the source's repositories queued in a
//! window, with when it was queued, started and finished and its `runs-on` labels.
//!
//! # Calls
//! The repositories as the queue reads them ([`Repositories`](super::Repositories): the one of a repository
//! scope, the installation's or the organisation's), then per repository
//! `GET /repos/{o}/{r}/actions/runs?created=FROM..UNTIL&per_page=100&page=N` and per run
//! `GET /repos/{o}/{r}/actions/runs/{id}/jobs?filter=all&per_page=100&page=N` (`all`: a re-run's earlier
//! attempts ran too, and cost runner time like the last one). An export costs ⌈repositories/100⌉ +
//! Σ ⌈runs/100⌉ + Σ ⌈jobs of a run/100⌉ requests — about one per run — against the same primary budget as
//! `watch` (5,000–12,500 an hour for an App): a week of 3,000 runs is about 3,000 requests. Answers are not
//! remembered for conditional requests (each is read once). A rate limit that lifts within the request's
//! `rate_limit_wait` (`trace export --rate-limit-wait`, an hour by default: GitHub's primary budget resets hourly)
//! is waited out and the export reads on; a longer one stops it with the wait GitHub names. Either way no
//! request is sent until it has passed ([`super::http`]).
//!
//! # GitHub's 1,000-result cap
//! GitHub returns at most 1,000 runs for a filtered list (`created` is a search filter), whatever `total_count`
//! says. A window whose runs are more than that is split in two halves by creation time, and each half again,
//! until every part lists fewer; a single second with more than 1,000 runs (never seen) is read as far as GitHub
//! lets and a warning says how many were left out. A server that ignores `created` (it answers runs outside the
//! range) is read once, unfiltered and newest first, down to the window's start, so nothing is split in vain.
//!
//! Runs are listed from a day before the window (a run created before it can queue jobs inside it: jobs that
//! `needs` others, re-runs) and jobs are kept by their own queue time; a re-run started more than a day after its
//! run was created is missed.
//!
//! # What a trace line gets (each field's reading is decided next to it in [`HistoryJob`])
//! - queued: the job's `created_at`; started: its `started_at` once a runner took it; finished: `completed_at`;
//! - `demands`: its `labels` (the workflow's `runs-on`), the label `repository`: `owner/name`, as the queue's
//!   tasks have them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::stream::{self, StreamExt, TryStreamExt};
use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Deserializer};

use super::http::{lock, Call, PER_PAGE};
use super::wire::REPOSITORY_LABEL;
use super::{split_repository, GithubActions};
use crate::providers::{Error, HistoryRequest, PastJob, Result};

/// GitHub's cap on the results of a filtered run list ("up to 1,000 results for each search").
pub const SEARCH_CAP: u64 = 1000;
/// A server that ignores `created` is read newest first; past this many pages (100,000 runs) it is not believed.
const UNFILTERED_PAGES: u64 = 1000;
/// How long before the window runs are listed: a run's later jobs (`needs`, re-runs) can be queued in it.
pub const RUN_LOOKBACK: SignedDuration = SignedDuration::from_hours(24);

#[derive(Deserialize)]
struct HistoryRuns {
    /// Required by the spec. Without it (an older server) the cap is detected by a full 1,000 read instead.
    #[serde(default)]
    total_count: Option<u64>,
    #[serde(default, deserialize_with = "list")]
    workflow_runs: Vec<HistoryRun>,
}

#[derive(Deserialize)]
struct HistoryRun {
    /// Required: its jobs are read by it.
    id: u64,
    /// Required by the spec; only read to tell a server that ignores the `created` filter (missing: unknown, and
    /// the run is read — its jobs are kept by their own times anyway).
    #[serde(default)]
    created_at: Option<Timestamp>,
}

#[derive(Deserialize)]
struct HistoryJobs {
    #[serde(default)]
    total_count: Option<u64>,
    #[serde(default, deserialize_with = "list")]
    jobs: Vec<HistoryJob>,
}

/// A workflow job as the history reads it. The spec (`job`) marks all of these required except `run_attempt`;
/// each is decided on its own for servers that leave one out (an older GitHub Enterprise Server).
#[derive(Deserialize)]
struct HistoryJob {
    /// Required: it names the trace line.
    id: u64,
    /// Missing: the job is named by its id.
    #[serde(default)]
    name: Option<String>,
    /// Missing: 1 (the first attempt).
    #[serde(default)]
    run_attempt: Option<u64>,
    /// `queued`, `in_progress`, `completed`, `waiting`, `requested`, `pending`. Missing: read from
    /// `completed_at` (completed when it has one, else still running).
    #[serde(default)]
    status: Option<String>,
    /// `skipped`, `cancelled`, ...: only consulted when the runner fields are missing altogether.
    #[serde(default)]
    conclusion: Option<String>,
    /// When the job was queued. Added to the API in 2023, so an older server may leave it out: then the start
    /// is taken as the queue time too (the job's own wait is unknown; its arrival is not moved earlier than
    /// anything the server says).
    #[serde(default)]
    created_at: Option<Timestamp>,
    /// When a runner started it. GitHub sets it on jobs that never ran too (at creation, or equal to
    /// `completed_at` for a skipped one), so it alone says nothing: see [`HistoryJob::started`].
    #[serde(default)]
    started_at: Option<Timestamp>,
    /// Nullable: `null` while the job runs.
    #[serde(default)]
    completed_at: Option<Timestamp>,
    /// The job's `runs-on`. Missing: none (the trace line then asks for nothing, and no pool takes it).
    #[serde(default, deserialize_with = "list")]
    labels: Vec<String>,
    /// Nullable: "If a runner hasn't yet been assigned, this will be null". `Some(None)`: present and null;
    /// `None`: missing from the answer.
    #[serde(default, deserialize_with = "present")]
    runner_id: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    runner_name: Option<Option<String>>,
}

/// A `null` where a list is documented reads as an empty list.
fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> std::result::Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

/// A nullable field that may also be missing: `Some(None)` is `null`, `None` (the default) is missing.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    deserializer: D,
) -> std::result::Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(deserializer).map(Some)
}

impl HistoryJob {
    /// Whether a runner ever took the job. GitHub's `started_at` is set on every job, run or not, so the proof
    /// is the runner: a job cancelled while queued or skipped has none (`runner_id`/`runner_name` null or 0/empty).
    /// Jobs still `queued`, `waiting`, `pending` or `requested` have not started. A server that sends no runner
    /// fields at all is read by the conclusion: `skipped` never ran, and a `cancelled` job that "started" no
    /// earlier than it ended was cancelled while queued.
    fn started(&self) -> bool {
        let status =
            self.status.as_deref().unwrap_or(if self.completed_at.is_some() { "completed" } else { "in_progress" });
        if !matches!(status, "in_progress" | "completed") {
            return false;
        }
        match (&self.runner_id, &self.runner_name) {
            (None, None) => match self.conclusion.as_deref() {
                Some("skipped") => false,
                Some("cancelled") => match (self.started_at, self.completed_at) {
                    (Some(started), Some(completed)) => started < completed,
                    _ => false,
                },
                _ => true,
            },
            (id, name) => {
                id.flatten().is_some_and(|id| id > 0)
                    || name.as_ref().and_then(|name| name.as_deref()).is_some_and(|name| !name.is_empty())
            }
        }
    }

    fn to_past_job(&self, repository: &str, run_id: u64) -> Option<PastJob> {
        let started = self.started().then_some(self.started_at).flatten();
        // A job with no time at all cannot be placed in a trace.
        let queued_at = self.created_at.or(self.started_at).or(self.completed_at)?;
        let finished = match started {
            Some(_) => self.completed_at,
            None => None,
        };
        let name = self.name.clone().filter(|name| !name.is_empty()).unwrap_or_else(|| self.id.to_string());
        let attempt = match self.run_attempt {
            Some(attempt) if attempt > 1 => format!(" (attempt {attempt})"),
            _ => String::new(),
        };
        Some(PastJob {
            id: format!("{repository}#{run_id}/{name}{attempt}"),
            queued_at,
            started_at: started,
            finished_at: finished,
            labels: BTreeMap::from([(REPOSITORY_LABEL.to_owned(), repository.to_owned())]),
            demands: self.labels.clone(),
        })
    }
}

/// Whole seconds, as the `created` filter takes them: `2026-03-02T00:00:00Z`.
fn search_time(second: i64) -> String {
    Timestamp::from_second(second)
        .map_or_else(|_| second.to_string(), |at| at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

impl GithubActions {
    pub(super) async fn job_history(&self, request: &HistoryRequest) -> Result<Vec<PastJob>> {
        let reader = Reader { github: self, patience: request.rate_limit_wait, announced: Mutex::new(None) };
        reader.job_history(request).await
    }
}

/// One history export: the source, and how long a rate limit may be waited out (see [`Reader::patiently`]).
struct Reader<'a> {
    github: &'a GithubActions,
    patience: Duration,
    /// Until when the last announced wait lasts: the calls running side by side meet the same limit, and it is
    /// said once.
    announced: Mutex<Option<Timestamp>>,
}

impl Reader<'_> {
    async fn job_history(&self, request: &HistoryRequest) -> Result<Vec<PastJob>> {
        let repositories = self.patiently(|| self.github.list_repositories()).await?;
        let from = request.from.checked_sub(RUN_LOOKBACK).unwrap_or(request.from);
        let mut jobs = Vec::new();
        for repository in repositories {
            let Some((owner, name)) = split_repository(&repository) else { continue };
            let runs = match self.runs_created(owner, name, from, request.until).await {
                Ok(runs) => runs,
                // Deleted or no longer visible since it was listed: nothing of it can be read.
                Err(Error::NotFound { .. }) => {
                    tracing::warn!(repository = %repository, "github repository not found; its history is skipped");
                    continue;
                }
                Err(error) => return Err(error),
            };
            let found: Vec<Vec<PastJob>> = stream::iter(runs)
                .map(|run| self.run_jobs(&repository, owner, name, run))
                .buffer_unordered(self.github.concurrency)
                .try_collect()
                .await?;
            jobs.extend(found.into_iter().flatten());
        }
        jobs.retain(|job| job.queued_at >= request.from && job.queued_at < request.until);
        jobs.sort_by(|a, b| (a.queued_at, &a.id).cmp(&(b.queued_at, &b.id)));
        Ok(jobs)
    }

    /// The ids of the runs of `owner/name` created in `[from, until)`, in as many filtered lists as GitHub's cap
    /// asks for (see the module docs).
    async fn runs_created(&self, owner: &str, name: &str, from: Timestamp, until: Timestamp) -> Result<Vec<u64>> {
        // `created=A..B` is inclusive at both ends, in whole seconds.
        let last = if until.subsec_nanosecond() == 0 { until.as_second() - 1 } else { until.as_second() };
        let mut parts = vec![(from.as_second(), last)];
        let mut ids = Vec::new();
        while let Some((first, last)) = parts.pop() {
            if first > last {
                continue;
            }
            match self.runs_between(owner, name, first, last).await? {
                Listed::All(found) => ids.extend(found),
                // Splitting would not help: the whole window is read the slow way, once.
                Listed::Unfiltered => return self.runs_unfiltered(owner, name, from, until).await,
                Listed::Capped { total } if first < last => {
                    let middle = first + (last - first) / 2;
                    tracing::debug!(repository = %format!("{owner}/{name}"), total, "more runs than GitHub lists at once; the window is halved");
                    // Later half pushed first: the earlier half is read first.
                    parts.push((middle + 1, last));
                    parts.push((first, middle));
                }
                Listed::Capped { total } => {
                    let found = self.read_runs(owner, name, first, last, SEARCH_CAP.div_ceil(PER_PAGE as u64)).await?;
                    tracing::warn!(
                        repository = %format!("{owner}/{name}"),
                        second = %search_time(first),
                        left_out = total.saturating_sub(found.len() as u64),
                        "more runs created in one second than GitHub lists; the rest are left out"
                    );
                    ids.extend(found);
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// The runs created in the seconds `first..=last`, or that they are more than GitHub lists.
    async fn runs_between(&self, owner: &str, name: &str, first: i64, last: i64) -> Result<Listed> {
        let pages = SEARCH_CAP.div_ceil(PER_PAGE as u64);
        let (total, page) = self.runs_page(owner, name, Some((first, last)), 1).await?;
        let outside =
            |run: &HistoryRun| run.created_at.is_some_and(|at| at.as_second() < first || at.as_second() > last);
        if page.iter().any(outside) {
            return Ok(Listed::Unfiltered);
        }
        if total.is_some_and(|total| total > SEARCH_CAP) {
            return Ok(Listed::Capped { total: total.unwrap_or(SEARCH_CAP) });
        }
        let mut ids: Vec<u64> = page.iter().map(|run| run.id).collect();
        let mut full = page.len() >= PER_PAGE;
        let mut number = 1;
        while full && total.is_none_or(|total| (ids.len() as u64) < total) {
            number += 1;
            if number > pages {
                // No `total_count` (an older server) and the cap filled: more may exist than were listed.
                return Ok(Listed::Capped { total: ids.len() as u64 });
            }
            let (_, page) = self.runs_page(owner, name, Some((first, last)), number).await?;
            full = page.len() >= PER_PAGE;
            ids.extend(page.iter().map(|run| run.id));
        }
        Ok(Listed::All(ids))
    }

    /// Reads up to `pages` pages of the runs created in `first..=last`, whatever their count.
    async fn read_runs(&self, owner: &str, name: &str, first: i64, last: i64, pages: u64) -> Result<Vec<u64>> {
        let mut ids = Vec::new();
        for number in 1..=pages {
            let (_, page) = self.runs_page(owner, name, Some((first, last)), number).await?;
            let full = page.len() >= PER_PAGE;
            ids.extend(page.iter().map(|run| run.id));
            if !full {
                break;
            }
        }
        Ok(ids)
    }

    /// The runs of a server that ignores `created` (it answered runs outside the range asked for): every run,
    /// newest first as GitHub lists them, until a page older than the window. No search parameter, so no cap.
    async fn runs_unfiltered(&self, owner: &str, name: &str, from: Timestamp, until: Timestamp) -> Result<Vec<u64>> {
        tracing::warn!(
            repository = %format!("{owner}/{name}"),
            "the server ignores the `created` filter of workflow runs: every run is listed, newest first"
        );
        let mut ids = Vec::new();
        for number in 1..=UNFILTERED_PAGES {
            let (_, page) = self.runs_page(owner, name, None, number).await?;
            let full = page.len() >= PER_PAGE;
            let older = |run: &HistoryRun| run.created_at.is_some_and(|at| at < from);
            let all_older = !page.is_empty() && page.iter().all(older);
            ids.extend(
                page.iter().filter(|run| !older(run) && run.created_at.is_none_or(|at| at < until)).map(|run| run.id),
            );
            if !full || all_older {
                break;
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok(ids)
    }

    /// One page of the run list, of the runs created in the seconds `first..=last` when a range is given.
    async fn runs_page(
        &self,
        owner: &str,
        name: &str,
        range: Option<(i64, i64)>,
        page: u64,
    ) -> Result<(Option<u64>, Vec<HistoryRun>)> {
        let created = range.map(|(first, last)| format!("{}..{}", search_time(first), search_time(last)));
        let (per_page, page) = (PER_PAGE.to_string(), page.to_string());
        let mut query =
            vec![("exclude_pull_requests", "true"), ("per_page", per_page.as_str()), ("page", page.as_str())];
        if let Some(created) = &created {
            query.insert(0, ("created", created.as_str()));
        }
        let what = match &created {
            Some(created) => format!("the workflow runs of `{owner}/{name}` created {created}"),
            None => format!("the workflow runs of `{owner}/{name}`"),
        };
        let segments = ["repos", owner, name, "actions", "runs"];
        let answer = self.patiently(|| self.github.http.call_once(Call::get(&segments, &query, &what))).await?;
        let list: HistoryRuns = answer.json()?;
        Ok((list.total_count, list.workflow_runs))
    }

    /// Every job of a run, every attempt.
    async fn run_jobs(&self, repository: &str, owner: &str, name: &str, run_id: u64) -> Result<Vec<PastJob>> {
        let run = run_id.to_string();
        let what = format!("the jobs of run {run} of `{repository}`");
        let segments = ["repos", owner, name, "actions", "runs", run.as_str(), "jobs"];
        let per_page = PER_PAGE.to_string();
        let mut jobs = Vec::new();
        let mut read = 0u64;
        for page in 1.. {
            let page_text = page.to_string();
            let query = [("filter", "all"), ("per_page", per_page.as_str()), ("page", page_text.as_str())];
            let answer = match self.patiently(|| self.github.http.call_once(Call::get(&segments, &query, &what))).await
            {
                Ok(answer) => answer,
                // Deleted since it was listed: it has no jobs to tell of.
                Err(Error::NotFound { .. }) => break,
                Err(error) => return Err(error),
            };
            let list: HistoryJobs = answer.json()?;
            let full = list.jobs.len() >= PER_PAGE;
            read += list.jobs.len() as u64;
            jobs.extend(list.jobs.iter().filter_map(|job| job.to_past_job(repository, run_id)));
            // A run has at most a few hundred jobs (256 per matrix); a server that keeps sending full pages is not
            // believed past the cap.
            if !full || list.total_count.is_some_and(|total| read >= total) || read >= SEARCH_CAP * 10 {
                break;
            }
        }
        Ok(jobs)
    }
}

impl Reader<'_> {
    /// `call`, made again after a rate limit that lifts within the export's patience; the limit is announced on
    /// stderr once with when reading goes on, since the wait can be most of an hour. A limit naming no wait, or a
    /// longer one, fails the export as before.
    async fn patiently<T, F: Future<Output = Result<T>>>(&self, call: impl Fn() -> F) -> Result<T> {
        loop {
            match call().await {
                Err(Error::RateLimited { retry_after: Some(wait), .. }) if wait <= self.patience => {
                    self.announce(wait);
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    fn announce(&self, wait: Duration) {
        let until = Timestamp::now() + SignedDuration::try_from(wait).unwrap_or(SignedDuration::ZERO);
        let mut announced = lock(&self.announced);
        // Calls side by side hear the same limit within a second or so of each other.
        if announced.is_none_or(|last| until > last + SignedDuration::from_secs(2)) {
            tracing::warn!(
                "github rate limit reached: waiting {}s, until {}, then reading on",
                wait.as_secs(),
                until.strftime("%H:%M:%S UTC")
            );
            *announced = Some(until);
        }
    }
}

/// A filtered run list: every run of it, more than GitHub lists, or runs outside the range asked for (the server
/// ignores the filter).
enum Listed {
    All(Vec<u64>),
    Capped { total: u64 },
    Unfiltered,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(value: serde_json::Value) -> HistoryJob {
        serde_json::from_value(value).expect("job")
    }

    #[test]
    fn a_job_started_only_when_a_runner_took_it() {
        let base = serde_json::json!({
            "id": 7, "name": "build", "status": "completed", "conclusion": "success",
            "created_at": "2026-03-02T09:00:00Z", "started_at": "2026-03-02T09:00:30Z",
            "completed_at": "2026-03-02T09:05:30Z", "labels": ["self-hosted", "linux"],
            "runner_id": 12, "runner_name": "r-12"
        });
        let past = job(base.clone()).to_past_job("acme/app", 5).expect("placed");
        assert_eq!(past.id, "acme/app#5/build");
        assert_eq!(past.queued_at.to_string(), "2026-03-02T09:00:00Z");
        assert_eq!(past.started_at.map(|at| at.to_string()).as_deref(), Some("2026-03-02T09:00:30Z"));
        assert_eq!(past.finished_at.map(|at| at.to_string()).as_deref(), Some("2026-03-02T09:05:30Z"));
        assert_eq!(past.demands, vec!["self-hosted".to_owned(), "linux".to_owned()]);

        // Cancelled while queued: GitHub still sets `started_at`, but no runner was assigned.
        let mut cancelled = base.clone();
        cancelled["conclusion"] = "cancelled".into();
        cancelled["runner_id"] = serde_json::Value::Null;
        cancelled["runner_name"] = serde_json::Value::Null;
        let past = job(cancelled).to_past_job("acme/app", 5).expect("placed");
        assert_eq!((past.started_at, past.finished_at), (None, None));
        // Older runner records give 0 and "" rather than null.
        let mut zero = base.clone();
        zero["runner_id"] = 0.into();
        zero["runner_name"] = "".into();
        assert!(!job(zero).started());
        // Still queued.
        let mut queued = base.clone();
        queued["status"] = "queued".into();
        assert!(!job(queued).started());
        // Running: started, not finished.
        let mut running = base.clone();
        running["status"] = "in_progress".into();
        running["completed_at"] = serde_json::Value::Null;
        let past = job(running).to_past_job("acme/app", 5).expect("placed");
        assert!(past.started_at.is_some() && past.finished_at.is_none());
    }

    #[test]
    fn a_server_without_runner_fields_is_read_by_the_conclusion() {
        let mut bare = serde_json::json!({
            "id": 8, "status": "completed", "conclusion": "skipped",
            "started_at": "2026-03-02T09:00:00Z", "completed_at": "2026-03-02T09:00:00Z"
        });
        assert!(!job(bare.clone()).started(), "skipped");
        bare["conclusion"] = "cancelled".into();
        assert!(!job(bare.clone()).started(), "cancelled the moment it was made");
        bare["completed_at"] = "2026-03-02T09:04:00Z".into();
        assert!(job(bare.clone()).started(), "cancelled after four minutes of running");
        // No `created_at` (older servers): queued at its start; no name: named by its id.
        let past = job(bare).to_past_job("acme/app", 5).expect("placed");
        assert_eq!(past.queued_at.to_string(), "2026-03-02T09:00:00Z");
        assert_eq!(past.id, "acme/app#5/8");
        assert!(past.demands.is_empty());
        assert!(serde_json::from_value::<HistoryJob>(serde_json::json!({"name": "no id"})).is_err());
    }

    #[test]
    fn search_times_are_whole_seconds_in_utc() {
        assert_eq!(search_time(1_772_409_600), "2026-03-02T00:00:00Z");
    }
}
