//! The Forgejo Actions CI source (Forgejo 15 and later): reads the job queue and the runner records of one
//! scope — the whole instance, an organisation, a repository or the token's own user — over Forgejo's REST API,
//! registers one ephemeral runner per agent, bound to the job it is made for, and deletes runner records.
//!
//! # Calls
//! One observation is two calls, more only past [`RUNNERS_PER_PAGE`] runners:
//! - `GET {scope}/actions/runners/jobs`: the queue, every waiting and running job of the scope in one answer (the
//!   handler is not paginated: `db.Find` without list options);
//! - `GET {scope}/actions/runners?page=N&limit=50`: the runner records, page by page until `X-Total-Count` of them
//!   are read (without that header: while `Link` names a `next` page; without either: until a short page).
//!
//! `{scope}` is `/api/v1/admin`, `/api/v1/orgs/{org}`, `/api/v1/repos/{owner}/{repo}` or `/api/v1/user`
//! ([`Scope`]). Forgejo scopes jobs and runners alike (`FindTaskOptions`/`FindRunnerOptions` by owner and
//! repository), so a job listed at a scope is one a runner registered at that scope may take. The older
//! `/api/v1/admin/runners/jobs` is deprecated in Forgejo 15 and not used.
//!
//! # Queue
//! `waiting` jobs are pending, `running` ones run; jobs still blocked on `needs` have the status `blocked` and are
//! not listed — they become waiting when they can run, which the next cycle sees. A [`Task`] carries:
//! - `id`: the job's id;
//! - `demands`: the job's `runs-on` labels. A runner takes the job only if it has every one of them, compared
//!   exactly ([`runs_on_matches`]);
//! - the label [`HANDLE_LABEL`]: the handle of the job's current attempt, which binds a runner to it;
//! - for a running job, `agent_id`: the runner made for its handle, when one is in contact.
//!
//! # Runners are one-job and bound to a job
//! `register` creates an ephemeral runner: `POST {scope}/actions/runners {name, description, ephemeral: true}` →
//! `{id, uuid, token}`. The agent runs `forgejo-runner one-job --url … --uuid … --token-url file:… --label …
//! --handle <job handle> --wait` (runner 12.8 or later; see [`launch`]) and serves exactly the job it was made
//! for ([`RegisterAgent::for_job`]): Forgejo hands a runner that asks with a handle only the job of that handle,
//! and only if the runner's labels match its `runs-on`. Forgejo deletes an ephemeral runner's record once its
//! job is done, and its token can fetch no other job. The handle is written into the runner's `description`
//! ([`marker`]), so any later observation knows which job a runner serves.
//!
//! Forgejo shows a runner's token only in the answer that created it, so `register` of a name that exists cannot
//! hand out that runner's credential again: it deletes the record and makes a new one (new id, new token) —
//! unless the existing one is busy, which is refused with [`Error::AlreadyExists`]. Runner names are not unique
//! in Forgejo; `register` keeps them unique. A job has one runner: registering another name for a job that has a
//! runner is refused with [`Error::AlreadyExists`] too (a plan made before an overlapping create registered).
//!
//! # No drain
//! Forgejo's API has no call that stops a runner from taking jobs (runners can be listed, created and deleted,
//! not edited), so [`CiCapabilities::drain`] is false and `drain`/`undrain` answer [`Error::Unsupported`]. A
//! one-job runner needs none: it takes its one job or none.
//!
//! # Agents
//! - `busy`: Forgejo reports the runner `active` (it reported on a task within the last 10 s), or `idle` (in
//!   contact within the last minute) while the job it was made for runs. The second also holds when another
//!   runner took that job: kept busy then, as "never kill a busy agent" wants when in doubt, until the job ends.
//! - `last_contact`: Forgejo gives no time, only whether the runner was in contact within the last minute
//!   (`idle` or `active`): then it is the observation's time, otherwise unknown (`None`).
//! - `last_work`: unknown (`None`); `no_schedule`: always false.
//! - `labels`: the runner's label names (declared by the runner when it starts; a fresh record has none), each with
//!   an empty value, and [`HANDLE_LABEL`] with the handle of the job it was made for.
//!
//! Only the scope's own runners are observed: the admin list holds every runner of the instance, of which only
//! the global ones (no owner, no repository) are runners of the instance scope.
//!
//! # No job history
//! `ciscale trace export` needs, per job, when it was queued, started and finished, and its `runs-on`. Forgejo 15
//! (its swagger, `templates/swagger/v1_json.tmpl`) offers, per repository only:
//! - `GET /repos/{o}/{r}/actions/runs` (`ActionRun`: `created`, `started`, `stopped` of the whole run; pages of
//!   at most 50, no time filter);
//! - `GET /repos/{o}/{r}/actions/runs/{id}/jobs` (`ActionRunJob`: `runs_on`, `needs`, `status`, `attempt`,
//!   `task_id` — no time at all);
//! - `GET /repos/{o}/{r}/actions/tasks` (`ActionTask`: `created_at`, `updated_at`, `run_started_at` of a task —
//!   the attempt a runner picked up — with its job's name and run number, but no `runs-on`);
//! - `GET /repos/{o}/{r}/actions/jobs/{id}` (one job, with its steps' `started`/`stopped`: one call a job, still
//!   no queue time).
//!
//! A trace could be pieced together (a job's `task_id` to its task: started at the task's `run_started_at`,
//! finished at its `updated_at`, which is only the last time the row changed; queued at the run's `created`, or,
//! for a job with `needs`, at a guess from the other jobs' ends), but its queue times — what a simulation measures
//! waits from — would be made up, and no organisation- or instance-wide list exists. So
//! [`CiSource::history`] answers [`Error::Unsupported`] with [`NO_HISTORY`] (a hint included), and an export of
//! every source of a config skips this one with a warning.
//!
//! # Auth and secrets
//! An access token travels as `Authorization: token …` (Forgejo's `AuthorizationHeaderToken`). It is a [`Secret`]:
//! no message or `Debug` output holds it, and error bodies are quoted with it blanked out. A runner's token is
//! only in the [`AgentCredential`] `register` returns.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::model::{Agent, AgentId, CiObservation, LabelInterner, Queue, Secret, Task, TaskId};
use crate::providers::{
    AgentCredential, CiCapabilities, CiSource, CloudLaunch, Error, Launch, RegisterAgent, Result, TOKEN_ENV_NAME_KEY,
};

mod client;
pub mod launch;
mod marker;
mod matching;
mod wire;

pub use client::{BadResponse, DEFAULT_TIMEOUT};
pub use matching::{label_name, runs_on_matches};

use client::{Http, Subject};
use wire::{RegisterRunner, Registered, RunnerStatus, WireJob, WireRunner};

pub(crate) const PROVIDER: &str = "forgejo";
/// Task label (and agent label) holding a job attempt's handle: on a task, the job's own; on an agent, the one
/// of the job it was made for.
pub const HANDLE_LABEL: &str = crate::model::JOB_LABEL;
/// Page size of `GET {scope}/actions/runners`: Forgejo's default `MAX_RESPONSE_ITEMS`, which caps `limit`. A
/// server configured with a lower cap answers shorter pages; `X-Total-Count` still says when all are read.
pub const RUNNERS_PER_PAGE: usize = 50;
/// A server that keeps answering full pages is not believed past this many runners.
const MAX_RUNNER_PAGES: usize = 1000;

/// Env keys of the credential `register` returns, read by the agent's launch ([`launch`]).
pub const URL_ENV: &str = "FORGEJO_URL";
pub const UUID_ENV: &str = "FORGEJO_RUNNER_UUID";
pub const HANDLE_ENV: &str = "FORGEJO_RUNNER_HANDLE";
pub const LABELS_ENV: &str = "FORGEJO_RUNNER_LABELS";
/// The env key the runner's token is written under (named through [`TOKEN_ENV_NAME_KEY`]).
pub const TOKEN_ENV: &str = "FORGEJO_RUNNER_TOKEN";

/// No drain (the API has none); every runner has its own token (shown once, in the create's answer), serves one
/// job — the one it was registered for — and is then deleted by Forgejo. On a cloud server the source writes the
/// user data itself ([`launch::cloud_init`]: the pinned runner release of [`ForgejoSettings::runner_release`]).
pub const CAPABILITIES: CiCapabilities = CiCapabilities {
    drain: false,
    per_agent_credentials: true,
    single_job: true,
    job_bound: true,
    matching: crate::model::Matching::LabelSet { case_insensitive: false },
    launch: Launch {
        agent: "Forgejo runner",
        container_command: crate::providers::CONTAINER_AGENT_COMMAND,
        token_env: Some(TOKEN_ENV),
        cloud: CloudLaunch::OwnUserData,
    },
};

/// Whose jobs and runners: where runners are registered and which jobs they may take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every repository of the instance (`/api/v1/admin`); runners are global. Needs a site administrator.
    Instance,
    /// The repositories of an organisation (`/api/v1/orgs/{org}`). Needs an owner of the organisation.
    Organization(String),
    /// One repository (`/api/v1/repos/{owner}/{repo}`). Needs an administrator of the repository.
    Repository { owner: String, repo: String },
    /// The repositories of the token's own user (`/api/v1/user`), e.g. on a shared forge such as Codeberg.
    User,
}

/// A path segment: everything but unreserved characters is escaped (an organisation named `a/b` stays one
/// segment).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

impl Scope {
    /// The API prefix of the scope's `actions/runners` calls.
    fn prefix(&self) -> String {
        let segment = |text: &str| utf8_percent_encode(text, SEGMENT).to_string();
        match self {
            Scope::Instance => "/api/v1/admin".to_owned(),
            Scope::Organization(org) => format!("/api/v1/orgs/{}", segment(org)),
            Scope::Repository { owner, repo } => format!("/api/v1/repos/{}/{}", segment(owner), segment(repo)),
            Scope::User => "/api/v1/user".to_owned(),
        }
    }

    /// For messages: `the instance`, `organisation `acme``, ...
    pub fn describe(&self) -> String {
        match self {
            Scope::Instance => "the instance".to_owned(),
            Scope::Organization(org) => format!("organisation `{org}`"),
            Scope::Repository { owner, repo } => format!("repository `{owner}/{repo}`"),
            Scope::User => "the token's user".to_owned(),
        }
    }

    /// The access token permissions the scope's calls need (Forgejo checks `read:…` on lists, `write:…` on
    /// creating and deleting runners).
    fn token_permissions(&self) -> &'static str {
        match self {
            Scope::Instance => "the `read:admin` and `write:admin` permissions",
            Scope::Organization(_) => "the `read:organization` and `write:organization` permissions",
            Scope::Repository { .. } => "the `read:repository` and `write:repository` permissions",
            Scope::User => "the `read:user` and `write:user` permissions",
        }
    }

    fn rights_hint(&self) -> String {
        let who = match self {
            Scope::Instance => "a site administrator",
            Scope::Organization(_) => "an owner of the organisation",
            Scope::Repository { .. } => "an administrator of the repository",
            Scope::User => "the user whose runners these are",
        };
        format!("use a token of {who}, with {}", self.token_permissions())
    }

    /// Whether a listed runner belongs to this scope itself. The admin list holds every runner of the instance
    /// (`ListRunners` with no owner and no repository puts no condition on either); the others hold the
    /// scope's own runners unless `visible=true` is asked for, which it is not. Checked for all scopes by the
    /// shape of the ids, so a server that lists more than documented still yields only the scope's runners.
    fn owns(&self, runner: &WireRunner) -> bool {
        match self {
            Scope::Instance => runner.owner_id == 0 && runner.repo_id == 0,
            Scope::Organization(_) | Scope::User => runner.owner_id != 0 && runner.repo_id == 0,
            Scope::Repository { .. } => runner.repo_id != 0,
        }
    }
}

/// Everything the source needs, from the config.
#[derive(Debug, Clone)]
pub struct ForgejoSettings {
    /// The Forgejo URL, e.g. `https://codeberg.org` (any path prefix of a sub-path install included).
    pub server: String,
    /// An access token with the scope's rights ([`Scope`]).
    pub token: Secret,
    pub scope: Scope,
    /// The URL runners reach Forgejo at (`forgejo-runner one-job --url`), when it differs from `server` (a
    /// private address); `None`: `server`.
    pub runner_url: Option<String>,
    /// Total timeout of each request.
    pub timeout: Duration,
    /// The runner a cloud server downloads ([`CiSource::cloud_user_data`]); `None`: pools of this source run in
    /// containers only (their image has the runner, from `ciscale provision`).
    pub runner_release: Option<launch::RunnerRelease>,
}

impl ForgejoSettings {
    pub fn new(server: impl Into<String>, token: Secret, scope: Scope) -> Self {
        Self { server: server.into(), token, scope, runner_url: None, timeout: DEFAULT_TIMEOUT, runner_release: None }
    }
}

/// A Forgejo scope, as a [`CiSource`].
pub struct Forgejo {
    http: Http,
    server: String,
    scope: Scope,
    runner_url: String,
    runner_release: Option<launch::RunnerRelease>,
}

impl fmt::Debug for Forgejo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Forgejo")
            .field("server", &self.server)
            .field("scope", &self.scope)
            .field("runner_url", &self.runner_url)
            .finish_non_exhaustive()
    }
}

/// An `http://` or `https://` URL with a host, without a trailing `/`; `what` names the setting in the message.
fn checked_url(what: &str, url: &str) -> Result<String> {
    let invalid =
        |why: String| Error::Invalid { provider: PROVIDER.to_owned(), message: format!("`{what}` `{url}` {why}") };
    let parsed = reqwest::Url::parse(url).map_err(|error| invalid(format!("is not a URL: {error}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("must be an http:// or https:// URL".to_owned()));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(invalid("has no host".to_owned()));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

impl Forgejo {
    /// Sets up the client; makes no call (the first observation is the first call).
    pub fn new(settings: ForgejoSettings) -> Result<Self> {
        let server = checked_url("server", &settings.server)?;
        let runner_url = match settings.runner_url.as_deref().map(str::trim) {
            Some(url) if !url.is_empty() => checked_url("runnerUrl", url)?,
            _ => server.clone(),
        };
        let scope_empty = match &settings.scope {
            Scope::Organization(org) => org.trim().is_empty(),
            Scope::Repository { owner, repo } => owner.trim().is_empty() || repo.trim().is_empty(),
            Scope::Instance | Scope::User => false,
        };
        if scope_empty {
            return Err(Error::Invalid {
                provider: PROVIDER.to_owned(),
                message: "the scope names an empty organisation, owner or repository".to_owned(),
            });
        }
        let http = Http::new(&server, settings.token, settings.scope.clone(), settings.timeout)?;
        Ok(Self { http, server, scope: settings.scope, runner_url, runner_release: settings.runner_release })
    }

    pub fn scope(&self) -> &Scope {
        &self.scope
    }

    /// What agents get as [`URL_ENV`].
    pub fn runner_url(&self) -> &str {
        &self.runner_url
    }

    // -- API calls -------------------------------------------------------------------------------------------

    async fn list_jobs(&self) -> Result<Vec<WireJob>> {
        let path = format!("{}/actions/runners/jobs", self.scope.prefix());
        // A nil slice (no job at all) is written as `null`.
        let (jobs, _): (Option<Vec<WireJob>>, _) = self.http.get(&path, Subject::Scope).await?;
        Ok(jobs.unwrap_or_default())
    }

    /// Every runner of the scope ([`Scope::owns`]), page by page.
    async fn list_runners(&self) -> Result<Vec<WireRunner>> {
        let prefix = self.scope.prefix();
        let mut runners: Vec<WireRunner> = Vec::new();
        let mut read = 0usize;
        let mut seen = BTreeSet::new();
        for page in 1..=MAX_RUNNER_PAGES {
            let path = format!("{prefix}/actions/runners?page={page}&limit={RUNNERS_PER_PAGE}");
            let (batch, headers): (Option<Vec<WireRunner>>, _) = self.http.get(&path, Subject::Scope).await?;
            let batch = batch.unwrap_or_default();
            let total = headers
                .get("x-total-count")
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<usize>().ok());
            let got = batch.len();
            read += got;
            // A runner registered between two pages shifts the rest by one: keep each id once.
            runners.extend(batch.into_iter().filter(|runner| seen.insert(runner.id)));
            let link = headers.get("link").and_then(|value| value.to_str().ok());
            let done = match (total, link) {
                (Some(total), _) => read >= total,
                // Without the count (a proxy dropped it), the `Link` header says whether a next page exists...
                (None, Some(link)) => !link.split(',').any(|part| part.contains("rel=\"next\"")),
                // ...and without either, a short page is the last one.
                (None, None) => got < RUNNERS_PER_PAGE,
            };
            if done || got == 0 {
                break;
            }
        }
        runners.retain(|runner| self.scope.owns(runner));
        Ok(runners)
    }

    async fn create_runner(&self, name: &str, description: &str) -> Result<Registered> {
        let path = format!("{}/actions/runners", self.scope.prefix());
        let body = RegisterRunner { name, description, ephemeral: true };
        self.http.post(&path, &body).await
    }

    async fn delete_runner(&self, id: &AgentId) -> Result<()> {
        let number = runner_number(id)?;
        let path = format!("{}/actions/runners/{number}", self.scope.prefix());
        self.http.delete(&path, Subject::Runner(id)).await
    }
}

#[async_trait]
impl CiSource for Forgejo {
    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn capabilities(&self) -> CiCapabilities {
        CAPABILITIES
    }

    fn cloud_user_data(&self, env_file: &Secret) -> Result<Secret> {
        let release = self.runner_release.as_ref().ok_or_else(|| Error::Invalid {
            provider: PROVIDER.to_owned(),
            message: "a cloud server downloads forgejo-runner, and the source names no `runnerRelease`\nhint: set \
                      `runnerRelease: {version: 12.10.1, sha256: ...}` (the digest from the release's `.sha256` file)"
                .to_owned(),
        })?;
        launch::cloud_init(release, env_file)
            .map_err(|error| Error::Invalid { provider: PROVIDER.to_owned(), message: error.to_string() })
    }

    async fn observe(&self) -> Result<CiObservation> {
        let jobs = self.list_jobs().await?;
        let runners = self.list_runners().await?;
        Ok(observation(jobs, runners, Timestamp::now()))
    }

    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential> {
        let invalid = |message: String| Error::Invalid { provider: PROVIDER.to_owned(), message };
        if request.name.trim().is_empty() {
            return Err(invalid("a runner needs a name".to_owned()));
        }
        if let Some(handle) = &request.for_job {
            if !marker::valid_handle(handle) {
                return Err(invalid(format!(
                    "`{handle}` is not a Forgejo job handle (letters, digits, `-`, `_`, `.`)"
                )));
            }
        }
        let labels = label_specs(&request.labels).map_err(invalid)?;

        let runners = self.list_runners().await?;
        // One job, one runner: a plan made before another create for this job registered (a `watch` cycle
        // that overlaps a slow create) must not make a second runner, which would wait for ever.
        if let Some(handle) = &request.for_job {
            if let Some(other) = runners
                .iter()
                .find(|runner| runner.name != request.name && bound_handle(runner).as_ref() == Some(handle))
            {
                return Err(Error::AlreadyExists {
                    what: format!("a forgejo runner for job `{handle}` (`{}`, id {})", other.name, other.id),
                });
            }
        }
        let existing: Vec<WireRunner> = runners.into_iter().filter(|runner| runner.name == request.name).collect();
        if !existing.is_empty() {
            let running = running_handles(&self.list_jobs().await?);
            if let Some(runner) = existing.iter().find(|runner| busy(runner, &running)) {
                return Err(Error::AlreadyExists {
                    what: format!("forgejo runner `{}` (id {}, running a job)", request.name, runner.id),
                });
            }
            // Its token cannot be had again: the record goes, and a new one is made.
            for runner in &existing {
                match self.delete_runner(&AgentId::new(runner.id.to_string())).await {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(error) => return Err(error),
                }
            }
        }

        let description = marker::describe(&request.pool, request.for_job.as_deref());
        let registered = self.create_runner(&request.name, &description).await?;
        if registered.token.expose().trim().is_empty() || registered.uuid.trim().is_empty() {
            return Err(Error::Other {
                provider: PROVIDER.to_owned(),
                source: Box::new(BadResponse {
                    endpoint: format!("POST {}/actions/runners", self.scope.prefix()),
                    detail: format!("runner `{}` came back without a uuid or a token", request.name),
                }),
            });
        }
        let mut env = BTreeMap::from([
            (URL_ENV.to_owned(), self.runner_url.clone()),
            (UUID_ENV.to_owned(), registered.uuid),
            (TOKEN_ENV_NAME_KEY.to_owned(), TOKEN_ENV.to_owned()),
        ]);
        if !labels.is_empty() {
            env.insert(LABELS_ENV.to_owned(), labels.join(","));
        }
        if let Some(handle) = &request.for_job {
            env.insert(HANDLE_ENV.to_owned(), handle.clone());
        }
        Ok(AgentCredential { agent_id: AgentId::new(registered.id.to_string()), token: registered.token, env })
    }

    // No drain or undrain: Forgejo's API has none, so the trait's `Unsupported` stands.

    async fn deregister(&self, id: &AgentId) -> Result<()> {
        self.delete_runner(id).await
    }

    /// Not offered: Forgejo 15's API has no job history a trace can be made from honestly (see the module docs,
    /// "No job history").
    async fn history(&self, _request: &crate::providers::HistoryRequest) -> Result<Vec<crate::providers::PastJob>> {
        Err(Error::Unsupported { provider: PROVIDER.to_owned(), operation: NO_HISTORY })
    }
}

/// Why a Forgejo source exports no trace, and what to do instead.
pub const NO_HISTORY: &str = "job history: Forgejo 15 lists a job's `runs-on` (`GET …/actions/runs/{id}/jobs`) but \
     not when it was queued, started or finished, and its task list (`GET …/actions/tasks`) has times but no \
     `runs-on`\nhint: write a trace of your own (JSON Lines: `at`, `duration`, `demands`) or try `ciscale trace \
     synthetic office-week -c CONFIG`";

// ---------------------------------------------------------------------------------------------------------------
// From Forgejo's answers to the shared model
// ---------------------------------------------------------------------------------------------------------------

/// The labels a runner is started with (`forgejo-runner --label`), from [`RegisterAgent::labels`]: each entry is
/// a label name and how the runner runs it (`host`, `docker://node:22-bookworm`, `lxc://debian:bookworm`; empty:
/// the runner's default), giving `name` or `name:how`. ciscale's own keys (`ciscale.*`) are not labels. The
/// list travels comma-separated, so a comma (or a `:` in a name, which would end the name) is refused.
fn label_specs(labels: &BTreeMap<String, String>) -> std::result::Result<Vec<String>, String> {
    let mut specs = Vec::new();
    for (name, how) in labels.iter().filter(|(name, _)| !name.starts_with("ciscale.")) {
        let bad = |part: &str| part.contains([',', '\n', '\r']) || part.chars().any(char::is_whitespace);
        if name.is_empty() || name.contains(':') || bad(name) || bad(how) {
            return Err(format!(
                "runner label `{name}: {how}` cannot be handed to forgejo-runner\nhint: a label name has no `:`, \
                 `,` or spaces; its value is `host`, `docker://IMAGE` or `lxc://IMAGE`"
            ));
        }
        specs.push(if how.is_empty() { name.clone() } else { format!("{name}:{how}") });
    }
    Ok(specs)
}

fn running_handles(jobs: &[WireJob]) -> BTreeSet<String> {
    jobs.iter()
        .filter(|job| job.status == "running")
        .filter_map(|job| job.handle.clone())
        .filter(|handle| !handle.is_empty())
        .collect()
}

/// The handle of the job a runner was made for, from the marker in its description.
fn bound_handle(runner: &WireRunner) -> Option<String> {
    marker::parse(&runner.description).and_then(|marker| marker.job)
}

/// See the module docs: `active`, or in contact while its job runs. An unknown status is not taken as proof of
/// idleness: the job test alone decides then.
fn busy(runner: &WireRunner, running: &BTreeSet<String>) -> bool {
    let job_runs = || bound_handle(runner).is_some_and(|handle| running.contains(&handle));
    match runner.status {
        RunnerStatus::Active => true,
        RunnerStatus::Idle | RunnerStatus::Unknown => job_runs(),
        RunnerStatus::Offline => false,
    }
}

/// One observation from the two lists; `now` is the time of an online runner's contact (see the module docs).
fn observation(jobs: Vec<WireJob>, runners: Vec<WireRunner>, now: Timestamp) -> CiObservation {
    let running = running_handles(&jobs);
    let mut runners = runners;
    runners.sort_by_key(|runner| runner.id);
    // Which online runner serves a handle: the lowest id, when a name was registered twice.
    let mut serving: BTreeMap<String, AgentId> = BTreeMap::new();
    for runner in runners.iter().filter(|runner| runner.status.online()) {
        if let Some(handle) = bound_handle(runner) {
            serving.entry(handle).or_insert_with(|| AgentId::new(runner.id.to_string()));
        }
    }

    let agents = runners
        .iter()
        .map(|runner| {
            let mut labels: BTreeMap<String, String> =
                runner.labels.iter().map(|label| (label.clone(), String::new())).collect();
            if let Some(handle) = bound_handle(runner) {
                labels.insert(HANDLE_LABEL.to_owned(), handle);
            }
            Agent {
                id: AgentId::new(runner.id.to_string()),
                name: runner.name.clone(),
                busy: busy(runner, &running),
                no_schedule: false,
                last_contact: runner.status.online().then_some(now),
                last_work: None,
                labels,
                // Forgejo's runner API reports no creation time: the planner falls back to the last contact.
                created_at: None,
            }
        })
        .collect();

    let mut queue = Queue::default();
    // Each job's handle is its own, but the key (and the empty set of jobs without one) is stored once.
    let mut interner = LabelInterner::new();
    for job in jobs {
        let handle = job.handle.filter(|handle| !handle.is_empty());
        let labels = interner.labels(handle.as_deref().map(|handle| (HANDLE_LABEL, handle)));
        let task = |agent_id| Task {
            id: TaskId::new(job.id.to_string()),
            labels: labels.clone(),
            demands: job.runs_on.clone(),
            agent_id,
        };
        match job.status.as_str() {
            "waiting" => queue.pending.push(task(None)),
            "running" => queue.running.push(task(handle.as_ref().and_then(|handle| serving.get(handle).cloned()))),
            other => tracing::debug!(job = job.id, name = %job.name, status = other, "job left out"),
        }
    }
    CiObservation { agents, queue }
}

fn runner_number(id: &AgentId) -> Result<i64> {
    id.as_str().parse::<i64>().map_err(|_| Error::NotFound { what: format!("forgejo runner `{id}` (ids are numbers)") })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: i64, status: &str, runs_on: &[&str], handle: Option<&str>) -> WireJob {
        WireJob {
            id,
            status: status.to_owned(),
            runs_on: runs_on.iter().map(|label| (*label).to_owned()).collect(),
            handle: handle.map(str::to_owned),
            name: format!("job-{id}"),
        }
    }

    fn runner(id: i64, status: RunnerStatus, description: &str) -> WireRunner {
        WireRunner {
            id,
            name: format!("runner-{id}"),
            description: description.to_owned(),
            labels: vec!["debian".to_owned()],
            status,
            owner_id: 0,
            repo_id: 0,
        }
    }

    fn now() -> Timestamp {
        "2026-05-01T12:00:00Z".parse().expect("time")
    }

    #[test]
    fn waiting_jobs_are_the_queue_and_running_ones_name_their_runner() {
        let jobs = vec![
            job(1, "waiting", &["debian"], Some("h-1")),
            job(2, "running", &["debian", "gpu"], Some("h-2")),
            job(3, "running", &["debian"], Some("h-3")),
            job(4, "blocked", &["debian"], Some("h-4")),
            job(5, "waiting", &[], None),
        ];
        let runners = vec![
            runner(10, RunnerStatus::Active, "ciscale pool=linux job=h-2"),
            runner(11, RunnerStatus::Offline, "ciscale pool=linux job=h-3"),
        ];
        let observed = observation(jobs, runners, now());
        let pending: Vec<&str> = observed.queue.pending.iter().map(|task| task.id.as_str()).collect();
        assert_eq!(pending, ["1", "5"]);
        assert_eq!(observed.queue.pending[0].demands, ["debian"]);
        assert_eq!(observed.queue.pending[0].labels.get(HANDLE_LABEL), Some("h-1"));
        assert!(observed.queue.pending[1].labels.is_empty(), "no handle, no label");
        let running: Vec<(&str, Option<&str>)> = observed
            .queue
            .running
            .iter()
            .map(|task| (task.id.as_str(), task.agent_id.as_ref().map(AgentId::as_str)))
            .collect();
        assert_eq!(running, [("2", Some("10")), ("3", None)], "an offline runner runs nothing");
    }

    #[test]
    fn busy_means_active_or_in_contact_while_its_job_runs() {
        let jobs = vec![job(1, "running", &["debian"], Some("runs")), job(2, "waiting", &["debian"], Some("waits"))];
        let runners = vec![
            runner(1, RunnerStatus::Active, "hand-made runner"),
            runner(2, RunnerStatus::Idle, "ciscale pool=p job=runs"),
            runner(3, RunnerStatus::Idle, "ciscale pool=p job=waits"),
            runner(4, RunnerStatus::Offline, "ciscale pool=p job=runs"),
            runner(5, RunnerStatus::Unknown, "ciscale pool=p job=runs"),
            runner(6, RunnerStatus::Idle, "someone else's runner job=runs"),
        ];
        let observed = observation(jobs, runners, now());
        let busy: Vec<(&str, bool)> = observed.agents.iter().map(|agent| (agent.id.as_str(), agent.busy)).collect();
        assert_eq!(busy, [("1", true), ("2", true), ("3", false), ("4", false), ("5", true), ("6", false)]);
    }

    #[test]
    fn agents_carry_contact_labels_and_their_job() {
        let runners = vec![runner(2, RunnerStatus::Idle, "ciscale pool=p job=h"), runner(1, RunnerStatus::Offline, "")];
        let observed = observation(Vec::new(), runners, now());
        assert_eq!(observed.agents[0].id.as_str(), "1", "sorted by id");
        assert_eq!(observed.agents[0].last_contact, None);
        assert_eq!(observed.agents[1].last_contact, Some(now()));
        assert!(observed.agents.iter().all(|agent| !agent.no_schedule && agent.last_work.is_none()));
        assert_eq!(
            observed.agents[1].labels,
            BTreeMap::from([("debian".to_owned(), String::new()), (HANDLE_LABEL.to_owned(), "h".to_owned()),])
        );
    }

    #[test]
    fn label_specs_become_runner_labels() {
        let labels = BTreeMap::from([
            ("debian".to_owned(), "docker://node:22-bookworm".to_owned()),
            ("linux".to_owned(), "host".to_owned()),
            ("plain".to_owned(), String::new()),
            (crate::model::EPHEMERAL_LABEL.to_owned(), "true".to_owned()),
        ]);
        assert_eq!(label_specs(&labels).expect("valid"), ["debian:docker://node:22-bookworm", "linux:host", "plain"]);
        for (name, how) in [("a,b", ""), ("a:b", "host"), ("a", "docker://x,y"), ("a b", ""), ("", "host")] {
            let labels = BTreeMap::from([(name.to_owned(), how.to_owned())]);
            assert!(label_specs(&labels).is_err(), "{name:?}: {how:?}");
        }
    }

    #[test]
    fn scopes_own_their_runners_and_escape_their_names() {
        let global = WireRunner { owner_id: 0, repo_id: 0, ..runner(1, RunnerStatus::Idle, "") };
        let org = WireRunner { owner_id: 3, repo_id: 0, ..runner(2, RunnerStatus::Idle, "") };
        let repo = WireRunner { owner_id: 0, repo_id: 9, ..runner(3, RunnerStatus::Idle, "") };
        let owned = |scope: &Scope| -> Vec<i64> {
            [&global, &org, &repo].into_iter().filter(|r| scope.owns(r)).map(|r| r.id).collect()
        };
        assert_eq!(owned(&Scope::Instance), [1]);
        assert_eq!(owned(&Scope::Organization("acme".into())), [2]);
        assert_eq!(owned(&Scope::User), [2]);
        assert_eq!(owned(&Scope::Repository { owner: "a".into(), repo: "b".into() }), [3]);
        assert_eq!(Scope::Organization("a/b c".into()).prefix(), "/api/v1/orgs/a%2Fb%20c");
        assert_eq!(
            Scope::Repository { owner: "acme".into(), repo: "app.rs".into() }.prefix(),
            "/api/v1/repos/acme/app.rs"
        );
    }
}
