//! Woodpecker's job history, for `ciscale trace export`: every workflow of every active repository's pipelines
//! created in a window, with when it was queued, started and finished, and the labels its task carried.
//!
//! # Calls
//! `GET /api/repos?active=true` (admin: every repository, paginated), then per repository
//! `GET /api/repos/{id}/pipelines?after=…&before=…` (paginated; servers without the time filters list newest
//! first, so paging stops at the first page older than the window), and per pipeline in the window
//! `GET /api/repos/{id}/pipelines/{number}` (its workflows) and `…/config` (its YAML files).
//!
//! # What a trace line gets
//! - queued: the pipeline's `created` (or, when it waited for approval, `reviewed`); a workflow with
//!   `depends_on` is queued when the last of those finished, as the server queues it;
//! - started/finished: the workflow's `started`/`finished` (unix seconds; 0 means never);
//! - labels: what the server puts on the workflow's task: the workflow file's `labels:` (and the old top-level
//!   `platform:`), plus `repo` (the repository's full name) and `org-id`. Workflows are matched to their file by
//!   name (`.woodpecker/build.yaml` → `build`, `.woodpecker.yaml` → `woodpecker`); matrix values (`${…}`) are
//!   kept as written.

use std::collections::BTreeMap;

use jiff::Timestamp;
use reqwest::Method;
use serde::{Deserialize, Deserializer};

use super::{unix_time, BadResponse, Woodpecker, PROVIDER};
use crate::providers::{Error, HistoryRequest, PastJob, Result};

/// Page size of the repository and pipeline lists: the server's default, accepted by every version.
const PER_PAGE: usize = 50;
/// Servers that keep returning full pages are not believed past this many pages of one list.
const MAX_PAGES: usize = 10_000;

#[derive(Deserialize)]
struct WireRepo {
    id: i64,
    #[serde(default)]
    full_name: String,
    /// Missing on old servers (repositories had no organisations then): `org-id` is left out.
    #[serde(default)]
    org_id: Option<i64>,
}

#[derive(Deserialize)]
struct WirePipeline {
    number: i64,
    #[serde(default)]
    created: Option<i64>,
    /// When it was approved (pipelines that need approval queue nothing before).
    #[serde(default)]
    reviewed: Option<i64>,
    /// The list endpoint leaves workflows out on most versions (`null` or absent): they are read per pipeline.
    #[serde(default, deserialize_with = "null_as_empty")]
    workflows: Vec<WireWorkflow>,
}

#[derive(Deserialize)]
struct WireWorkflow {
    #[serde(default)]
    name: String,
    #[serde(default)]
    started: Option<i64>,
    #[serde(default)]
    finished: Option<i64>,
    /// Old servers put the platform here rather than in the labels.
    #[serde(default)]
    platform: Option<String>,
}

#[derive(Deserialize)]
struct WireConfig {
    #[serde(default)]
    name: String,
    /// Go's `[]byte`: the server sends base64 text; the Swagger spec calls it an array of integers (bytes). Both
    /// are read.
    #[serde(default, deserialize_with = "bytes")]
    data: Vec<u8>,
}

fn null_as_empty<'de, D: Deserializer<'de>, T: Deserialize<'de>>(deserializer: D) -> Result<Vec<T>, D::Error> {
    Ok(Option::<Vec<T>>::deserialize(deserializer)?.unwrap_or_default())
}

fn bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u8>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Data {
        Text(String),
        Bytes(Vec<u8>),
        Null(()),
    }
    Ok(match Data::deserialize(deserializer)? {
        Data::Text(text) => base64_decode(&text).map_err(serde::de::Error::custom)?,
        Data::Bytes(bytes) => bytes,
        Data::Null(()) => Vec::new(),
    })
}

/// Go's `encoding/json` writes `[]byte` as standard base64 with padding; some proxies drop the padding.
fn base64_decode(text: &str) -> std::result::Result<Vec<u8>, String> {
    use base64::Engine as _;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine.decode(text.trim()).map_err(|error| format!("`data` is not base64: {error}"))
}

/// What a workflow file says about where its task runs.
#[derive(Default, Debug, PartialEq, Eq)]
struct WorkflowFile {
    labels: BTreeMap<String, String>,
    depends_on: Vec<String>,
}

/// `labels:`, the old top-level `platform:` and `depends_on:` of a workflow file. A file that does not parse
/// gives nothing (the server would not have run it either, but the workflow's times are still worth having).
fn read_workflow_file(yaml: &[u8]) -> WorkflowFile {
    let Ok(document) = serde_yaml::from_slice::<serde_yaml::Value>(yaml) else {
        return WorkflowFile::default();
    };
    let text = |value: &serde_yaml::Value| match value {
        serde_yaml::Value::String(text) => Some(text.clone()),
        serde_yaml::Value::Number(number) => Some(number.to_string()),
        serde_yaml::Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    };
    let mut file = WorkflowFile::default();
    if let Some(platform) = document.get("platform").and_then(text) {
        file.labels.insert("platform".to_owned(), platform);
    }
    if let Some(serde_yaml::Value::Mapping(labels)) = document.get("labels") {
        for (key, value) in labels {
            if let (Some(key), Some(value)) = (text(key), text(value)) {
                file.labels.insert(key, value);
            }
        }
    }
    match document.get("depends_on") {
        Some(serde_yaml::Value::Sequence(names)) => file.depends_on = names.iter().filter_map(text).collect(),
        Some(single) => file.depends_on = text(single).into_iter().collect(),
        None => {}
    }
    file
}

/// The workflow name a config file gives: its file name without directories, leading dot and extension.
fn workflow_name(file: &str) -> &str {
    let base = file.rsplit('/').next().unwrap_or(file);
    let base = base.strip_prefix('.').unwrap_or(base);
    base.strip_suffix(".yaml").or_else(|| base.strip_suffix(".yml")).unwrap_or(base)
}

impl Woodpecker {
    pub(super) async fn job_history(&self, request: &HistoryRequest) -> Result<Vec<PastJob>> {
        let mut jobs = Vec::new();
        for repo in self.active_repos().await? {
            for pipeline in self.pipelines_in(&repo, request).await? {
                jobs.extend(self.pipeline_jobs(&repo, pipeline).await?);
            }
        }
        jobs.retain(|job| job.queued_at >= request.from && job.queued_at < request.until);
        jobs.sort_by(|a, b| (a.queued_at, &a.id).cmp(&(b.queued_at, &b.id)));
        Ok(jobs)
    }

    async fn active_repos(&self) -> Result<Vec<WireRepo>> {
        let mut repos = Vec::new();
        for page in 1..=MAX_PAGES {
            let path = format!("/api/repos?active=true&page={page}&perPage={PER_PAGE}");
            let batch: Option<Vec<WireRepo>> = self.json(Method::GET, &path, None, None).await?;
            let batch = batch.unwrap_or_default();
            let full = batch.len() >= PER_PAGE;
            repos.extend(batch);
            if !full {
                break;
            }
        }
        Ok(repos)
    }

    /// The repository's pipelines created in the window (a day before it too: a pipeline created just before
    /// the window can have workflows queued inside it, after their dependencies).
    async fn pipelines_in(&self, repo: &WireRepo, request: &HistoryRequest) -> Result<Vec<WirePipeline>> {
        let lookback = request.from.checked_sub(jiff::SignedDuration::from_hours(24)).unwrap_or(request.from);
        let (after, before) = (rfc3339(lookback), rfc3339(request.until));
        let mut pipelines = Vec::new();
        for page in 1..=MAX_PAGES {
            let path = format!(
                "/api/repos/{}/pipelines?page={page}&perPage={PER_PAGE}&after={after}&before={before}",
                repo.id
            );
            let batch: Option<Vec<WirePipeline>> = self.json(Method::GET, &path, None, None).await?;
            let batch = batch.unwrap_or_default();
            let full = batch.len() >= PER_PAGE;
            let created = |pipeline: &WirePipeline| unix_time(pipeline.created);
            // A server that ignores `after`/`before` lists everything, newest first: past the window's start,
            // the rest is older still.
            let all_older = !batch.is_empty() && batch.iter().all(|p| created(p).is_some_and(|at| at < lookback));
            pipelines.extend(
                batch
                    .into_iter()
                    .filter(|pipeline| created(pipeline).is_some_and(|at| at >= lookback && at < request.until)),
            );
            if !full || all_older {
                break;
            }
        }
        Ok(pipelines)
    }

    async fn pipeline_jobs(&self, repo: &WireRepo, mut pipeline: WirePipeline) -> Result<Vec<PastJob>> {
        let base = format!("/api/repos/{}/pipelines/{}", repo.id, pipeline.number);
        if pipeline.workflows.is_empty() {
            let detailed: WirePipeline = self.json(Method::GET, &base, None, None).await?;
            pipeline.workflows = detailed.workflows;
        }
        if pipeline.workflows.is_empty() {
            return Ok(Vec::new()); // nothing ran: a skipped or declined pipeline
        }
        let configs: Option<Vec<WireConfig>> = self.json(Method::GET, &format!("{base}/config"), None, None).await?;
        let configs = configs.unwrap_or_default();
        let files: BTreeMap<&str, WorkflowFile> =
            configs.iter().map(|config| (workflow_name(&config.name), read_workflow_file(&config.data))).collect();
        let single = (files.len() == 1).then(|| files.values().next()).flatten();
        let Some(created) = unix_time(pipeline.created) else {
            return Err(Error::Other {
                provider: PROVIDER.to_owned(),
                source: Box::new(BadResponse {
                    endpoint: format!("GET {base}"),
                    detail: format!("pipeline {} of `{}` has no `created` time", pipeline.number, repo.full_name),
                }),
            });
        };
        let approved = unix_time(pipeline.reviewed).map_or(created, |reviewed| reviewed.max(created));
        let finished_of: BTreeMap<&str, Option<Timestamp>> =
            pipeline.workflows.iter().map(|workflow| (workflow.name.as_str(), unix_time(workflow.finished))).collect();
        let mut jobs = Vec::new();
        for workflow in &pipeline.workflows {
            let file = files.get(workflow.name.as_str()).or(single);
            let mut labels = file.map(|file| file.labels.clone()).unwrap_or_default();
            if let Some(platform) = workflow.platform.as_ref().filter(|platform| !platform.is_empty()) {
                labels.entry("platform".to_owned()).or_insert_with(|| platform.clone());
            }
            labels.insert("repo".to_owned(), repo.full_name.clone());
            if let Some(org) = repo.org_id.filter(|org| *org > 0) {
                labels.insert("org-id".to_owned(), org.to_string());
            }
            let dependencies_done = file
                .map(|file| file.depends_on.iter().filter_map(|name| finished_of.get(name.as_str()).copied().flatten()))
                .into_iter()
                .flatten()
                .max();
            jobs.push(PastJob {
                id: format!("{}#{}/{}", repo.full_name, pipeline.number, workflow.name),
                queued_at: dependencies_done.map_or(approved, |done| done.max(approved)),
                started_at: unix_time(workflow.started),
                finished_at: unix_time(workflow.finished),
                labels,
                demands: Vec::new(),
            });
        }
        Ok(jobs)
    }
}

/// RFC 3339 in UTC with whole seconds, as the `after`/`before` query parameters take it.
fn rfc3339(at: Timestamp) -> String {
    at.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workflow_files_give_labels_platform_and_dependencies() {
        let file = read_workflow_file(
            b"platform: linux/arm64\nlabels:\n  gpu: yes\n  size: 2\ndepends_on: [build, lint]\nsteps: []\n",
        );
        assert_eq!(file.labels.get("platform").map(String::as_str), Some("linux/arm64"));
        assert_eq!(file.labels.get("gpu").map(String::as_str), Some("yes"));
        assert_eq!(file.labels.get("size").map(String::as_str), Some("2"));
        assert_eq!(file.depends_on, vec!["build".to_owned(), "lint".to_owned()]);
        assert_eq!(read_workflow_file(b"depends_on: build\n").depends_on, vec!["build".to_owned()]);
        assert_eq!(read_workflow_file(b": not yaml : ["), WorkflowFile::default());
    }

    #[test]
    fn workflow_names_from_file_names() {
        assert_eq!(workflow_name(".woodpecker/build.yaml"), "build");
        assert_eq!(workflow_name(".woodpecker/test.yml"), "test");
        assert_eq!(workflow_name(".woodpecker.yaml"), "woodpecker");
    }

    #[test]
    fn config_data_as_base64_or_bytes() {
        assert_eq!(base64_decode("bGFiZWxzOgo=").as_deref(), Ok(&b"labels:\n"[..]));
        assert_eq!(base64_decode("YQ").as_deref(), Ok(&b"a"[..]));
        assert!(base64_decode("!!!!").is_err());
        let text: WireConfig = serde_json::from_str(r#"{"name": "a", "data": "eDogMQ=="}"#).expect("text");
        let bytes: WireConfig = serde_json::from_str(r#"{"name": "a", "data": [120, 58, 32, 49]}"#).expect("bytes");
        assert_eq!(text.data, b"x: 1");
        assert_eq!(bytes.data, b"x: 1");
    }
}
