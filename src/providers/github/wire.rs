//! The GitHub REST API's JSON, as far as ciscale reads it, and its translation into the shared model.
//!
//! Shapes follow `github-actions.json` (the published OpenAPI description, cut to the runner-autoscaler paths).
//! Fields the spec marks required may still be missing in an older GitHub Enterprise Server's answer, so every
//! field is decided on its own (the reason is next to each):
//! - a field ciscale cannot act without (a runner's or a job's `id`, a JIT answer's `encoded_jit_config`, an
//!   installation token's `token`) makes the answer an error when missing;
//! - a field whose absence can be read safely gets the safe reading (a runner without `busy` is taken to be busy:
//!   a busy runner must never be removed);
//! - the rest default to empty.
//!
//! No type here derives `Debug` where it holds a credential: those hold a [`Secret`].

use jiff::Timestamp;
use serde::{Deserialize, Deserializer};

use crate::model::{Agent, AgentId, Labels, Secret, Task, TaskId};

/// Task label naming the repository (`owner/name`) a job belongs to.
pub const REPOSITORY_LABEL: &str = "repository";

/// `total_count` of a list answer: an integer, though some schemas say `number` (runner groups).
fn count<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    let value = Option::<serde_json::Number>::deserialize(deserializer)?;
    Ok(value.and_then(|number| {
        number.as_u64().or_else(|| number.as_f64().filter(|f| f.is_finite() && *f >= 0.0).map(|f| f as u64))
    }))
}

/// An id that the spec calls `integer` on most paths and `number` on some (runner groups, webhook `run_id`).
fn id_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
    let number = serde_json::Number::deserialize(deserializer)?;
    number
        .as_u64()
        .or_else(|| number.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
        .ok_or_else(|| serde::de::Error::custom(format!("`{number}` is not an id")))
}

fn secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Secret, D::Error> {
    String::deserialize(deserializer).map(Secret::new)
}

/// A `null` where a list is documented (older servers) reads as an empty list.
fn list<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

// -- runners ------------------------------------------------------------------------------------------------------

/// `GET .../actions/runners` (repository, organisation, enterprise).
#[derive(Deserialize)]
pub(super) struct RunnerList {
    /// Required by the spec; without it the pages are read until a short one.
    #[serde(default, deserialize_with = "count")]
    pub total_count: Option<u64>,
    #[serde(default, deserialize_with = "list")]
    pub runners: Vec<WireRunner>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireRunner {
    /// Required: a runner ciscale cannot name by id cannot be removed.
    pub id: u64,
    /// Instances and runners are paired by name; a nameless record pairs with nothing.
    #[serde(default)]
    pub name: String,
    /// `online`/`offline`; missing reads as not online (no contact known).
    #[serde(default)]
    pub status: Option<String>,
    /// Missing (or `null`) reads as busy: a runner that may be running a job is never removed.
    #[serde(default)]
    pub busy: Option<bool>,
    #[serde(default, deserialize_with = "list")]
    pub labels: Vec<WireRunnerLabel>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireRunnerLabel {
    /// Required by the spec; a label without a name says nothing and is dropped.
    #[serde(default)]
    pub name: String,
    /// `read-only` (the implicit labels) or `custom`; optional in the spec.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
}

impl WireRunner {
    pub(super) fn is_busy(&self) -> bool {
        self.busy.unwrap_or(true)
    }

    pub(super) fn is_online(&self) -> bool {
        self.status.as_deref().is_some_and(|status| status.eq_ignore_ascii_case("online"))
    }

    /// The runner as an [`Agent`]. GitHub keeps no contact or work times, so they are read off the present:
    /// - `last_contact`: an online runner is in contact now (`observed_at`); an offline one has no known contact,
    ///   which is what a runner that never started looks like (the bootstrap timeout applies to it);
    /// - `last_work`: a busy runner works now; an idle one has never worked, as far as anyone can tell — a
    ///   just-in-time runner takes one job and is gone, so an idle one is idle since its instance was made.
    /// A runner cannot be drained on GitHub: `no_schedule` is always `false`. Labels map name → type.
    pub(super) fn to_agent(&self, observed_at: Timestamp) -> Agent {
        Agent {
            id: AgentId::new(self.id.to_string()),
            name: self.name.clone(),
            busy: self.is_busy(),
            no_schedule: false,
            last_contact: self.is_online().then_some(observed_at),
            last_work: self.is_busy().then_some(observed_at),
            labels: self
                .labels
                .iter()
                .filter(|label| !label.name.is_empty())
                .map(|label| (label.name.clone(), label.kind.clone().unwrap_or_default()))
                .collect(),
            // GitHub's runner records carry no creation time: the planner falls back to the last contact.
            created_at: None,
        }
    }
}

/// `201` of `POST .../actions/runners/generate-jitconfig`. Never `Debug`: it holds the runner's credential.
#[derive(Deserialize)]
pub(super) struct JitConfig {
    pub runner: WireRunner,
    /// The runner's whole credential (base64 of its `.runner` and `.credentials` files), handed to `run.sh`.
    #[serde(deserialize_with = "secret")]
    pub encoded_jit_config: Secret,
}

/// `GET {orgs/{org}|enterprises/{e}}/actions/runner-groups`.
#[derive(Deserialize)]
pub(super) struct RunnerGroupList {
    #[serde(default, deserialize_with = "count")]
    pub total_count: Option<u64>,
    #[serde(default, deserialize_with = "list")]
    pub runner_groups: Vec<WireRunnerGroup>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireRunnerGroup {
    /// `number` in the spec, an integer in practice.
    #[serde(deserialize_with = "id_number")]
    pub id: u64,
    #[serde(default)]
    pub name: String,
}

// -- workflow runs and jobs ---------------------------------------------------------------------------------------

/// `GET /repos/{o}/{r}/actions/runs?status=...`.
#[derive(Deserialize)]
pub(super) struct RunList {
    #[serde(default, deserialize_with = "count")]
    pub total_count: Option<u64>,
    #[serde(default, deserialize_with = "list")]
    pub workflow_runs: Vec<WireRun>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireRun {
    /// Required: the jobs are read by run id.
    pub id: u64,
}

/// `GET /repos/{o}/{r}/actions/runs/{run_id}/jobs`.
#[derive(Deserialize)]
pub(super) struct JobList {
    #[serde(default, deserialize_with = "count")]
    pub total_count: Option<u64>,
    #[serde(default, deserialize_with = "list")]
    pub jobs: Vec<WireJob>,
}

#[derive(Debug, Deserialize)]
pub(super) struct WireJob {
    /// Required: the task id.
    pub id: u64,
    /// A job without a status cannot be classified and is left out (neither pending nor running).
    #[serde(default)]
    pub status: Option<String>,
    /// The job's `runs-on`. Missing reads as none, which matches no runner: such a job makes no runner.
    #[serde(default, deserialize_with = "list")]
    pub labels: Vec<String>,
    /// Set once a runner took the job.
    #[serde(default)]
    pub runner_id: Option<u64>,
}

/// Where a job stands, for the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum JobState {
    /// Waiting for a runner: demand.
    Queued,
    /// On a runner.
    Running,
    /// Anything else: finished, waiting for an approval (`waiting`), not yet schedulable (`pending`,
    /// `requested`). None of these wants a runner now.
    Other,
}

impl WireJob {
    pub(super) fn state(&self) -> JobState {
        match self.status.as_deref() {
            Some("queued") => JobState::Queued,
            Some("in_progress") => JobState::Running,
            _ => JobState::Other,
        }
    }

    /// The job as a queue task: its `runs-on` labels are its demands (in the order the workflow names them), the
    /// repository is its one label ([`REPOSITORY_LABEL`]; `labels` is that set, shared by the repository's
    /// jobs), and a running job names its runner.
    pub(super) fn to_task(&self, labels: &Labels) -> Task {
        Task {
            id: TaskId::new(self.id.to_string()),
            labels: labels.clone(),
            demands: self.labels.clone(),
            agent_id: self.runner_id.filter(|id| *id > 0).map(|id| AgentId::new(id.to_string())),
        }
    }
}

// -- repositories -------------------------------------------------------------------------------------------------

/// `GET /installation/repositories`.
#[derive(Deserialize)]
pub(super) struct InstallationRepositories {
    #[serde(default, deserialize_with = "count")]
    pub total_count: Option<u64>,
    #[serde(default, deserialize_with = "list")]
    pub repositories: Vec<WireRepository>,
}

/// A repository of `GET /installation/repositories` or `GET /orgs/{org}/repos`.
#[derive(Debug, Deserialize)]
pub(super) struct WireRepository {
    /// `owner/name`: every later call is made with it. A repository without one cannot be polled and is skipped.
    #[serde(default)]
    pub full_name: String,
    /// An archived repository runs no workflows; missing reads as not archived (it is polled, at worst in vain).
    #[serde(default)]
    pub archived: bool,
    #[serde(default)]
    pub disabled: bool,
}

// -- app installation tokens --------------------------------------------------------------------------------------

/// `201` of `POST /app/installations/{id}/access_tokens`. Never `Debug`: it holds the token.
#[derive(Deserialize)]
pub(super) struct InstallationToken {
    #[serde(deserialize_with = "secret")]
    pub token: Secret,
    /// Required by the spec. An answer without it is taken to last the documented hour.
    #[serde(default)]
    pub expires_at: Option<String>,
}

// -- errors -------------------------------------------------------------------------------------------------------

/// GitHub's error body (`basic-error`, `validation-error-simple`): every field optional.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ErrorBody {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub errors: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_of_an_older_server_reads_safely() {
        let runner: WireRunner = serde_json::from_str(r#"{"id": 7}"#).expect("only the id");
        let agent = runner.to_agent(Timestamp::UNIX_EPOCH);
        assert!(agent.busy, "missing `busy` is taken as busy: never removed by mistake");
        assert_eq!(agent.last_contact, None, "missing `status` is no known contact");
        assert_eq!(agent.name, "");
        let runner: WireRunner =
            serde_json::from_str(r#"{"id": 8, "name": "r", "status": "online", "busy": false, "labels": null}"#)
                .expect("null labels");
        let agent = runner.to_agent(Timestamp::UNIX_EPOCH);
        assert_eq!(agent.last_contact, Some(Timestamp::UNIX_EPOCH));
        assert_eq!(agent.last_work, None, "an idle runner has not worked");
        assert!(serde_json::from_str::<WireRunner>(r#"{"name": "no id"}"#).is_err());
    }

    #[test]
    fn jobs_sort_into_pending_running_and_the_rest() {
        let job = |status: &str| -> WireJob {
            serde_json::from_value(serde_json::json!({"id": 1, "status": status, "labels": ["self-hosted"]}))
                .expect("job")
        };
        assert_eq!(job("queued").state(), JobState::Queued);
        assert_eq!(job("in_progress").state(), JobState::Running);
        for other in ["completed", "waiting", "pending", "requested", "new-in-2030"] {
            assert_eq!(job(other).state(), JobState::Other, "{other}");
        }
        let bare: WireJob = serde_json::from_str(r#"{"id": 2}"#).expect("bare job");
        assert_eq!(bare.state(), JobState::Other);
        let task = bare.to_task(&[(REPOSITORY_LABEL, "acme/app")].into());
        assert!(task.demands.is_empty());
        assert_eq!(task.labels.get(REPOSITORY_LABEL), Some("acme/app"));
        assert_eq!(task.labels.len(), 1);
    }

    #[test]
    fn counts_and_ids_accept_numbers_written_as_floats() {
        let groups: RunnerGroupList =
            serde_json::from_str(r#"{"total_count": 2.0, "runner_groups": [{"id": 1.0, "name": "Default"}]}"#)
                .expect("groups");
        assert_eq!(groups.total_count, Some(2));
        assert_eq!(groups.runner_groups[0].id, 1);
        assert!(serde_json::from_str::<WireRunnerGroup>(r#"{"id": 1.5}"#).is_err());
    }
}
