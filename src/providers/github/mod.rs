//! The GitHub Actions CI source (kind `github`): reads queued workflow jobs and the self-hosted runners of a
//! repository, an organisation or an enterprise over the REST API, registers one just-in-time runner per
//! instance, and removes runner records. Authenticates as a GitHub App installation or with a token
//! ([`auth`]); talks HTTP with conditional requests and rate-limit handling ([`http`]); verifies and reads
//! `workflow_job` webhooks ([`webhook`]); matches jobs to runners by GitHub's rule ([`matching`]); knows how its
//! runner is launched on each backend ([`launch`]).
//!
//! # Queue
//! GitHub has no "queued jobs" call for an organisation. Per repository: `GET /repos/{o}/{r}/actions/runs` with
//! `status=queued` and with `status=in_progress` (a run already in progress can still hold queued jobs, e.g. a
//! matrix wider than the runners at hand), then `GET .../runs/{id}/jobs` of each such run. A job `queued` is
//! pending demand; `in_progress` is running on its `runner_id`; `waiting` (for an approval), `pending` and
//! `requested` want no runner yet. A task's demands are its `runs-on` labels, its one label the repository.
//! The repositories: the one of a repository scope, the installation's (`GET /installation/repositories`) for an
//! App on an organisation, the organisation's (`GET /orgs/{org}/repos`) for a token, or a list given in the
//! settings (an enterprise scope needs one). Archived and disabled repositories are skipped.
//!
//! # Calls per cycle, and the rate limit
//! An idle cycle for an organisation of N repositories (R runners): ⌈N/100⌉ (repositories) + 2·N (runs) +
//! ⌈R/100⌉ (runners) requests — 4 for one repository, 102 for fifty (measured on the fake:
//! `tests/it/github.rs`, `idle_cycles_cost_*`). Every `GET` is conditional (`If-None-Match`), and GitHub does not
//! count a `304 Not Modified` against the primary limit, so an idle cycle costs **0** of the hourly budget once
//! the first cycle has remembered the answers (102 per cycle without ETags: 36,720 an hour at a 10 s poll,
//! far over an App installation's 5,000–12,500).
//!
//! 500 repositories at a 10 s poll do not fit, ETags or not. Without them: 1,006 requests a cycle, 362,160 an
//! hour, 29 times an App's largest budget (12,500). With them the primary budget is safe (idle cycles are all
//! 304s), but GitHub's secondary limits count requests, 304s included as far as its documentation says:
//! 1,006 a cycle is ~6,000 `GET`s a minute against 900 points a minute (one per `GET`), and it would also
//! weigh on the CPU-time limit. They need `workflow_job` webhooks as the primary signal and a rotating poll as
//! the safety net: [`GithubSettings::repositories_per_observe`] (config `repositoriesPerCycle`) polls only that
//! many quiet repositories per cycle (in name order, wrapping around), plus every repository that had queued or
//! running jobs at its last look or was named by a webhook ([`GithubActions::note_workflow_job`]). 60 per cycle
//! at 10 s is 126 requests in a rotation's first cycle and 121 in the others (measured:
//! `a_rotation_polls_500_repositories_within_the_secondary_limit`), 720 `GET .../runs` a minute (under 900),
//! a full rotation every 90 s, and with ETags next to nothing of the primary budget. Without webhooks a job in a
//! quiet repository waits up to one rotation (90 s) to be seen.
//!
//! # History
//! `ciscale trace export` reads the workflow jobs of the same repositories from their runs ([`history`]).
//!
//! # Runners
//! Every runner ciscale makes is just-in-time (`POST .../actions/runners/generate-jitconfig`): its whole
//! credential is the `encoded_jit_config` (a [`Secret`](crate::model::Secret)) handed to that one runner, which takes one job and is
//! removed by GitHub with it ([`CiCapabilities::single_job`]); no registration token ever leaves ciscale. The
//! runner gets `self-hosted` and its OS and architecture labels ([`GithubSettings::platform`]) like a runner made
//! by `config.sh`, then the pool's labels. A `register` of a name that already exists (an apply that died after
//! registering) replaces that record unless it is busy.
//!
//! GitHub cannot drain a runner ([`CiCapabilities::drain`] is false): [`CiSource::drain`] is
//! [`Error::Unsupported`]; an idle runner is removed instead (`DELETE .../actions/runners/{id}`), and GitHub
//! refuses to remove a busy one (422), which surfaces as [`Error::Invalid`]. Runner records carry no contact or
//! work times; see [`wire::WireRunner`] for how `last_contact`/`last_work` are read.
//!
//! Ownership: runners are named by the planner (`{owner}-{pool}-{digest}-{n}`, `plan::ownership`), and each also
//! carries [`owner_label`] (`ciscale-owner:<id>`, from [`GithubSettings::owner`]): extra labels never hurt
//! matching, and a record with both is ours beyond doubt. Pool labels become runner labels by their keys;
//! ciscale's own `ciscale.*` keys are not passed on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use futures_util::stream::{self, StreamExt};
use jiff::Timestamp;
use reqwest::Method;

use crate::model::{AgentId, CiObservation, LabelInterner, Queue, Secret, Task};
use crate::providers::{AgentCredential, CiCapabilities, CiSource, CloudLaunch, Error, Launch, RegisterAgent, Result};

pub mod auth;
mod history;
pub mod http;
pub mod launch;
pub mod matching;
pub mod webhook;
pub mod wire;

pub use auth::Auth;
pub use http::{ApiStats, RateBudget};
pub use matching::{RunnerArch, RunnerOs, RunnerPlatform};

use auth::Credentials;
use http::{invalid, lock, Call, Http};
use wire::{JitConfig, JobList, JobState, RunList, RunnerGroupList, RunnerList, WireJob, WireRepository, WireRunner};

pub(crate) const PROVIDER: &str = "github";
/// The API of github.com.
pub const DEFAULT_ENDPOINT: &str = "https://api.github.com";
/// The runner group every organisation and enterprise has ("Default"); repository runners need an id too.
pub const DEFAULT_RUNNER_GROUP_ID: u64 = 1;
/// The runner's working directory, relative to its install directory (GitHub's default).
pub const DEFAULT_WORK_FOLDER: &str = "_work";
/// Each request's timeout: GitHub answers in well under a second; 30 s rides out a slow moment without holding a
/// cycle for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Repositories polled at once. GitHub asks integrations to keep concurrent requests low (the secondary limit
/// allows 100 at once); four keeps a 50-repository cycle quick.
pub const DEFAULT_CONCURRENCY: usize = 4;
/// Key of the ownership label ([`owner_label`]).
pub const OWNER_LABEL_KEY: &str = "ciscale-owner";

/// No drain (GitHub has none); every runner has its own credential (the just-in-time config, which removing the
/// runner revokes), takes one job — any its labels match, GitHub picks which — and goes with it. The runner
/// reads the config from [`launch::JIT_CONFIG_ENV`]; on a cloud server the source writes the whole user data
/// ([`launch::cloud_user_data`]: the pinned runner release, checked by its SHA-256, run as an unprivileged user).
pub const CAPABILITIES: CiCapabilities = CiCapabilities {
    drain: false,
    per_agent_credentials: true,
    single_job: true,
    job_bound: false,
    // A job's `runs-on` must all be among the runner's labels, compared ignoring case (see [`matching`]).
    matching: crate::model::Matching::LabelSet { case_insensitive: true },
    launch: Launch {
        agent: "GitHub Actions runner",
        // The wrapper `examples/provision/github-runner.sh` installs at the path every CI's image uses.
        container_command: launch::AGENT_COMMAND,
        token_env: Some(launch::JIT_CONFIG_ENV),
        cloud: CloudLaunch::OwnUserData,
    },
};

/// The ownership label of a config's runners: `ciscale-owner:<owner>`.
pub fn owner_label(owner: &str) -> String {
    matching::label_from_pair(OWNER_LABEL_KEY, owner)
}

/// Where the runners live and whose jobs they take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Runners of one repository.
    Repository { owner: String, name: String },
    /// Runners of an organisation, shared by its repositories (optionally in a runner group).
    Organization { org: String },
    /// Runners of an enterprise, shared by its organisations (GitHub Enterprise Cloud or Server).
    Enterprise { enterprise: String },
}

impl Scope {
    /// The path prefix of its runner endpoints.
    fn segments(&self) -> Vec<&str> {
        match self {
            Scope::Repository { owner, name } => vec!["repos", owner.as_str(), name.as_str()],
            Scope::Organization { org } => vec!["orgs", org.as_str()],
            Scope::Enterprise { enterprise } => vec!["enterprises", enterprise.as_str()],
        }
    }

    fn describe(&self) -> String {
        match self {
            Scope::Repository { owner, name } => format!("repository `{owner}/{name}`"),
            Scope::Organization { org } => format!("organization `{org}`"),
            Scope::Enterprise { enterprise } => format!("enterprise `{enterprise}`"),
        }
    }

    /// Whether a repository (`owner/name`) can be served by this scope's runners, as far as its name tells.
    fn covers(&self, repository: &str) -> bool {
        let owner = repository.split_once('/').map(|(owner, _)| owner);
        match self {
            Scope::Repository { owner: o, name } => repository.eq_ignore_ascii_case(&format!("{o}/{name}")),
            Scope::Organization { org } => owner.is_some_and(|owner| owner.eq_ignore_ascii_case(org)),
            Scope::Enterprise { .. } => owner.is_some(),
        }
    }
}

/// The runner group new runners join (organisation and enterprise scopes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerGroup {
    Id(u64),
    /// Looked up once by name (case-insensitively).
    Name(String),
}

/// Which repositories' queues the source reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repositories {
    /// The repositories the App installation can see (`GET /installation/repositories`).
    Installation,
    /// Every repository of these organisations (`GET /orgs/{org}/repos`).
    Organizations(Vec<String>),
    /// These repositories (`owner/name`).
    Listed(Vec<String>),
}

/// Everything the source needs, from the config.
#[derive(Debug, Clone)]
pub struct GithubSettings {
    /// API root: [`DEFAULT_ENDPOINT`], or `https://HOST/api/v3` for GitHub Enterprise Server.
    pub endpoint: String,
    pub scope: Scope,
    pub auth: Auth,
    /// Organisation and enterprise scopes; `None`: the default group ([`DEFAULT_RUNNER_GROUP_ID`]).
    pub runner_group: Option<RunnerGroup>,
    /// `None`: the scope's own (see the module docs); an enterprise scope must name them.
    pub repositories: Option<Repositories>,
    /// The implicit labels runners get (`self-hosted`, OS, architecture); `None`: none (`--no-default-labels`).
    pub platform: Option<RunnerPlatform>,
    pub work_folder: String,
    /// Quiet repositories polled per observation (see the module docs); `None`: all of them every time.
    pub repositories_per_observe: Option<usize>,
    /// Conditional requests (ETags); only turned off to measure what they save.
    pub conditional_requests: bool,
    /// Repositories polled at once.
    pub concurrency: usize,
    pub timeout: Duration,
    /// How long before expiry an installation token is replaced.
    pub token_renew_margin: Duration,
    /// The secret `workflow_job` webhooks are signed with; `None`: the source takes no webhooks.
    pub webhook_secret: Option<Secret>,
    /// The config's owner id: every runner gets the label [`owner_label`] (`ciscale-owner:<id>`), a second
    /// proof besides its name that the record is ours. `None`: no such label.
    pub owner: Option<String>,
}

impl GithubSettings {
    pub fn new(scope: Scope, auth: Auth) -> Self {
        Self {
            endpoint: DEFAULT_ENDPOINT.to_owned(),
            scope,
            auth,
            runner_group: None,
            repositories: None,
            platform: Some(RunnerPlatform::default()),
            work_folder: DEFAULT_WORK_FOLDER.to_owned(),
            repositories_per_observe: None,
            conditional_requests: true,
            concurrency: DEFAULT_CONCURRENCY,
            timeout: DEFAULT_TIMEOUT,
            token_renew_margin: auth::DEFAULT_RENEW_MARGIN,
            webhook_secret: None,
            owner: None,
        }
    }

    /// The settings of a configured `kind: github` source of the config owned by `owner`.
    pub fn from_spec(spec: &crate::model::GithubSpec, owner: &str) -> Self {
        use crate::model::{GithubAuth, GithubScope};
        let scope = match &spec.scope {
            GithubScope::Repository(repository) => {
                let (owner, name) = repository.split_once('/').unwrap_or((repository.as_str(), ""));
                Scope::Repository { owner: owner.to_owned(), name: name.to_owned() }
            }
            GithubScope::Organization(org) => Scope::Organization { org: org.clone() },
            GithubScope::Enterprise(enterprise) => Scope::Enterprise { enterprise: enterprise.clone() },
        };
        let auth = match &spec.auth {
            GithubAuth::App { app_id, installation_id, private_key } => Auth::App {
                app_id: app_id.clone(),
                installation_id: *installation_id,
                private_key: private_key.clone(),
            },
            GithubAuth::Token(token) => Auth::Token(token.clone()),
        };
        Self {
            endpoint: spec.endpoint.clone().unwrap_or_else(|| DEFAULT_ENDPOINT.to_owned()),
            runner_group: spec.runner_group.as_ref().map(|group| match group.parse::<u64>() {
                Ok(id) => RunnerGroup::Id(id),
                Err(_) => RunnerGroup::Name(group.clone()),
            }),
            repositories: spec.repositories.clone().map(Repositories::Listed),
            repositories_per_observe: spec.repositories_per_cycle.map(|count| count as usize),
            webhook_secret: spec.webhook_secret.clone(),
            owner: Some(owner.to_owned()),
            platform: Some(platform_of(spec)),
            ..Self::new(scope, auth)
        }
    }
}

/// The machines a source's runners run on (Linux; `arch` from the config): their implicit labels and the runner
/// release cloud servers download.
pub fn platform_of(spec: &crate::model::GithubSpec) -> RunnerPlatform {
    RunnerPlatform { arch: if spec.arm64 { RunnerArch::Arm64 } else { RunnerArch::X64 }, ..RunnerPlatform::default() }
}

/// Which repositories to poll: the known list, the busy ones, and where a rotation stands.
#[derive(Debug, Default)]
struct Sweep {
    /// The repositories to poll (`owner/name`, sorted), from the last refresh.
    known: Option<Vec<String>>,
    /// Repositories with queued or running jobs at their last look, or named by a webhook since: polled every
    /// observation.
    hot: BTreeSet<String>,
    /// The last quiet repository a rotation polled; the next batch starts after it.
    cursor: Option<String>,
}

/// What one repository's poll found.
struct RepositoryPoll {
    repository: String,
    /// It had queued or in-progress runs.
    active: bool,
    jobs: Vec<WireJob>,
}

/// The GitHub Actions [`CiSource`].
pub struct GithubActions {
    http: Http,
    scope: Scope,
    repositories: Repositories,
    runner_group: Option<RunnerGroup>,
    runner_group_id: Mutex<Option<u64>>,
    platform: Option<RunnerPlatform>,
    work_folder: String,
    repositories_per_observe: Option<usize>,
    owner: Option<String>,
    webhooks: Option<webhook::WebhookVerifier>,
    concurrency: usize,
    sweep: Mutex<Sweep>,
}

impl std::fmt::Debug for GithubActions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GithubActions")
            .field("endpoint", &self.http.endpoint())
            .field("scope", &self.scope)
            .field("credentials", self.http.credentials())
            .field("repositories", &self.repositories)
            .field("runner_group", &self.runner_group)
            .finish_non_exhaustive()
    }
}

fn split_repository(repository: &str) -> Option<(&str, &str)> {
    repository.split_once('/').filter(|(owner, name)| !owner.is_empty() && !name.is_empty() && !name.contains('/'))
}

impl GithubActions {
    /// Sets up the client and checks the settings; makes no call (the first observation is the first call).
    pub fn new(settings: GithubSettings) -> Result<Self> {
        let credentials = Credentials::new(&settings.auth, settings.token_renew_margin)?;
        let repositories =
            match (settings.repositories, &settings.scope, credentials.is_app()) {
                (Some(Repositories::Installation), _, false) => return Err(invalid(
                    "the installation's repositories can only be listed by a GitHub App\nhint: list `repositories` \
                     or `organizations` to poll"
                        .to_owned(),
                )),
                (Some(repositories), _, _) => repositories,
                (None, Scope::Repository { owner, name }, _) => Repositories::Listed(vec![format!("{owner}/{name}")]),
                (None, Scope::Organization { .. }, true) => Repositories::Installation,
                (None, Scope::Organization { org }, false) => Repositories::Organizations(vec![org.clone()]),
                (None, Scope::Enterprise { enterprise }, _) => {
                    return Err(invalid(format!(
                        "enterprise `{enterprise}` has no list of repositories GitHub could give\nhint: list \
                     `repositories` or `organizations` whose jobs its runners take"
                    )))
                }
            };
        if let Repositories::Listed(listed) = &repositories {
            if let Some(bad) = listed.iter().find(|repository| split_repository(repository).is_none()) {
                return Err(invalid(format!("repository `{bad}` is not `owner/name`")));
            }
        }
        if settings.runner_group.is_some() && matches!(settings.scope, Scope::Repository { .. }) {
            return Err(invalid(
                "a repository's runners have no runner group\nhint: runner groups belong to organisations and \
                 enterprises; remove `runnerGroup`"
                    .to_owned(),
            ));
        }
        if settings.repositories_per_observe == Some(0) {
            return Err(invalid("`repositoriesPerCycle` must be at least 1".to_owned()));
        }
        let http = Http::new(&settings.endpoint, credentials, settings.conditional_requests, settings.timeout)?;
        let webhooks = match settings.webhook_secret {
            Some(secret) => Some(webhook::WebhookVerifier::new(secret).map_err(|error| invalid(error.to_string()))?),
            None => None,
        };
        let runner_group_id = match &settings.runner_group {
            Some(RunnerGroup::Id(id)) => Some(*id),
            Some(RunnerGroup::Name(_)) => None,
            None => Some(DEFAULT_RUNNER_GROUP_ID),
        };
        Ok(Self {
            http,
            scope: settings.scope,
            repositories,
            runner_group: settings.runner_group,
            runner_group_id: Mutex::new(runner_group_id),
            platform: settings.platform,
            work_folder: settings.work_folder,
            repositories_per_observe: settings.repositories_per_observe,
            owner: settings.owner,
            webhooks,
            concurrency: settings.concurrency.max(1),
            sweep: Mutex::new(Sweep::default()),
        })
    }

    /// The primary rate-limit budget GitHub last reported (for the metrics endpoint).
    pub fn rate_budget(&self) -> Option<RateBudget> {
        self.http.budget()
    }

    /// What this source has sent so far.
    pub fn api_stats(&self) -> ApiStats {
        self.http.stats()
    }

    /// How many answers are remembered for conditional requests.
    pub fn remembered_answers(&self) -> usize {
        self.http.remembered()
    }

    /// A webhook named a job of `event.repository`: poll that repository on the next observation even if a
    /// rotation would not (it may have been quiet until now). Repositories outside the scope are ignored.
    pub fn note_workflow_job(&self, event: &webhook::WorkflowJobEvent) {
        if split_repository(&event.repository).is_some() && self.scope.covers(&event.repository) {
            lock(&self.sweep).hot.insert(event.repository.clone());
        }
    }

    /// The labels a runner registered for `request` gets: the implicit ones, the pool's (a GitHub label is a
    /// name: the keys; ciscale's own `ciscale.*` keys are no runner labels), then the ownership label.
    pub fn runner_labels(&self, request: &RegisterAgent) -> Vec<String> {
        let pool = request.labels.keys().filter(|key| !key.starts_with("ciscale.")).cloned();
        matching::runner_labels(pool.chain(self.owner.as_deref().map(owner_label)), self.platform)
    }

    // -- repositories ----------------------------------------------------------------------------------------

    async fn list_repositories(&self) -> Result<Vec<String>> {
        let usable = |repository: WireRepository| {
            (!repository.archived && !repository.disabled && split_repository(&repository.full_name).is_some())
                .then_some(repository.full_name)
        };
        let mut names: Vec<String> = match &self.repositories {
            Repositories::Listed(listed) => listed.clone(),
            Repositories::Installation => self
                .http
                .pages(
                    &["installation", "repositories"],
                    &[],
                    "the installation's repositories",
                    |list: wire::InstallationRepositories| (list.total_count, list.repositories),
                )
                .await?
                .into_iter()
                .filter_map(usable)
                .collect(),
            Repositories::Organizations(orgs) => {
                let mut names = Vec::new();
                for org in orgs {
                    let what = format!("the repositories of organization `{org}`");
                    let repositories: Vec<WireRepository> = self
                        .http
                        .pages(
                            &["orgs", org.as_str(), "repos"],
                            &[("type", "all")],
                            &what,
                            |list: Vec<WireRepository>| (None, list),
                        )
                        .await?;
                    names.extend(repositories.into_iter().filter_map(usable));
                }
                names
            }
        };
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// The repositories to poll now and how many observations a full rotation takes.
    async fn repositories_to_poll(&self) -> Result<(Vec<String>, u64)> {
        // The list is refreshed at the start of every rotation (every observation when all are polled each time).
        let refresh = {
            let sweep = lock(&self.sweep);
            sweep.known.is_none() || sweep.cursor.is_none()
        };
        if refresh {
            let known = self.list_repositories().await?;
            let mut sweep = lock(&self.sweep);
            // A repository no longer listed (archived, access removed) is no longer polled, hot or not.
            let still_known: BTreeSet<&String> = known.iter().collect();
            sweep.hot.retain(|repository| {
                still_known.contains(repository) || matches!(self.repositories, Repositories::Listed(_))
            });
            sweep.known = Some(known);
        }
        let mut sweep = lock(&self.sweep);
        let known = sweep.known.clone().unwrap_or_default();
        let Some(per_observe) = self.repositories_per_observe else {
            let all: BTreeSet<String> = known.into_iter().chain(sweep.hot.iter().cloned()).collect();
            return Ok((all.into_iter().collect(), 1));
        };
        let quiet: Vec<&String> = known.iter().filter(|repository| !sweep.hot.contains(*repository)).collect();
        let start = match &sweep.cursor {
            Some(cursor) => quiet.partition_point(|repository| *repository <= cursor),
            None => 0,
        };
        let batch: Vec<String> =
            quiet.iter().skip(start).take(per_observe).map(|repository| (*repository).clone()).collect();
        // A rotation ends with the last quiet repository: the next observation refreshes the list and starts over.
        sweep.cursor = match batch.last() {
            Some(last) if start + batch.len() < quiet.len() => Some(last.clone()),
            _ => None,
        };
        let rotation = (quiet.len().div_ceil(per_observe)).max(1) as u64;
        let polled: BTreeSet<String> = batch.into_iter().chain(sweep.hot.iter().cloned()).collect();
        Ok((polled.into_iter().collect(), rotation))
    }

    /// The queued and in-progress runs of one repository and their jobs.
    async fn poll_repository(&self, repository: String) -> Result<RepositoryPoll> {
        let Some((owner, name)) = split_repository(&repository) else {
            return Err(invalid(format!("repository `{repository}` is not `owner/name`")));
        };
        let segments = ["repos", owner, name, "actions", "runs"];
        let mut run_ids = BTreeSet::new();
        for status in ["queued", "in_progress"] {
            let what = format!("{} workflow runs of `{repository}`", status.replace('_', "-"));
            let runs = self
                .http
                .pages(&segments, &[("status", status), ("exclude_pull_requests", "true")], &what, |list: RunList| {
                    (list.total_count, list.workflow_runs)
                })
                .await?;
            run_ids.extend(runs.into_iter().map(|run| run.id));
        }
        let mut jobs = Vec::new();
        for run_id in &run_ids {
            let run = run_id.to_string();
            let what = format!("the jobs of run {run} of `{repository}`");
            let found = self
                .http
                .pages(&["repos", owner, name, "actions", "runs", run.as_str(), "jobs"], &[], &what, |list: JobList| {
                    (list.total_count, list.jobs)
                })
                .await;
            match found {
                Ok(run_jobs) => jobs.extend(run_jobs),
                // Deleted between the two calls: it holds no job any more.
                Err(Error::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
        Ok(RepositoryPoll { active: !run_ids.is_empty(), repository, jobs })
    }

    // -- runners ---------------------------------------------------------------------------------------------

    fn runner_segments<'a>(&'a self, rest: &[&'a str]) -> Vec<&'a str> {
        let mut segments = self.scope.segments();
        segments.extend(["actions", "runners"]);
        segments.extend(rest);
        segments
    }

    async fn list_runners(&self) -> Result<Vec<WireRunner>> {
        let segments = self.runner_segments(&[]);
        let what = format!("the runners of {}", self.scope.describe());
        self.http.pages(&segments, &[], &what, |list: RunnerList| (list.total_count, list.runners)).await.map_err(
            |error| match error {
                Error::NotFound { .. } => invalid(format!(
                    "{what}: 404 Not Found\nhint: check the scope's name; GitHub also answers 404 to credentials \
                     that may not see it"
                )),
                other => other,
            },
        )
    }

    async fn find_runner(&self, name: &str) -> Result<Option<WireRunner>> {
        let segments = self.runner_segments(&[]);
        let what = format!("runner `{name}` of {}", self.scope.describe());
        let answer = self.http.call(Call::get(&segments, &[("name", name)], &what)).await?;
        let list: RunnerList = answer.json()?;
        Ok(list.runners.into_iter().find(|runner| runner.name == name))
    }

    async fn delete_runner(&self, id: u64) -> Result<()> {
        let id_text = id.to_string();
        let segments = self.runner_segments(&[id_text.as_str()]);
        let what = format!("remove github runner `{id}`");
        let not_found = format!("github runner `{id}`");
        let busy = format!("github runner `{id}` is running a job: GitHub refuses to remove a busy runner\nhint: it goes by itself when its job ends");
        self.http
            .call(Call {
                method: Method::DELETE,
                segments: &segments,
                query: &[],
                body: None,
                what: &what,
                not_found: &not_found,
                unprocessable: Some(&busy),
            })
            .await
            .map(drop)
    }

    /// The runner group id new runners join; a group named in the settings is looked up once.
    async fn runner_group_id(&self) -> Result<u64> {
        if let Some(id) = *lock(&self.runner_group_id) {
            return Ok(id);
        }
        let Some(RunnerGroup::Name(wanted)) = &self.runner_group else {
            return Ok(DEFAULT_RUNNER_GROUP_ID);
        };
        let mut segments = self.scope.segments();
        segments.extend(["actions", "runner-groups"]);
        let what = format!("the runner groups of {}", self.scope.describe());
        let groups = self
            .http
            .pages(&segments, &[], &what, |list: RunnerGroupList| (list.total_count, list.runner_groups))
            .await?;
        let found =
            groups.iter().find(|group| group.name.eq_ignore_ascii_case(wanted)).map(|group| group.id).ok_or_else(
                || {
                    let names: Vec<String> = groups.iter().map(|group| format!("`{}`", group.name)).collect();
                    invalid(format!(
                        "runner group `{wanted}` does not exist in {}\nhint: the groups are {}",
                        self.scope.describe(),
                        names.join(", ")
                    ))
                },
            )?;
        *lock(&self.runner_group_id) = Some(found);
        Ok(found)
    }

    async fn generate_jit_config(&self, body: &serde_json::Value, name: &str) -> Result<JitConfig> {
        let segments = self.runner_segments(&["generate-jitconfig"]);
        let what = format!("a just-in-time config for runner `{name}` of {}", self.scope.describe());
        let not_found = format!("{} or its runner group", self.scope.describe());
        let answer = self
            .http
            .call(Call {
                method: Method::POST,
                segments: &segments,
                query: &[],
                body: Some(body),
                what: &what,
                not_found: &not_found,
                unprocessable: None,
            })
            .await?;
        answer.json()
    }
}

#[async_trait]
impl CiSource for GithubActions {
    fn kind(&self) -> &'static str {
        PROVIDER
    }

    fn capabilities(&self) -> CiCapabilities {
        CAPABILITIES
    }

    /// The pinned runner release for the runners' architecture, installed and started by cloud-init.
    fn cloud_user_data(&self, env_file: &Secret) -> Result<Secret> {
        let arch = self.platform.unwrap_or_default().arch;
        let release = launch::RunnerRelease::for_arch(arch).ok_or_else(|| {
            invalid(format!(
                "no runner release is pinned for `{}` cloud servers\nhint: run `{}` runners in containers (Incus), \
                 or use `X64`/`ARM64` servers",
                arch.label(),
                arch.label()
            ))
        })?;
        launch::cloud_user_data(release, env_file).map_err(|error| invalid(format!("cannot write user data: {error}")))
    }

    fn webhook_max_body(&self) -> Option<usize> {
        self.webhooks.as_ref().map(webhook::WebhookVerifier::max_body)
    }

    /// A `workflow_job` delivery names its repository for the next observation ([`Self::note_workflow_job`])
    /// and wakes the loop when a job is queued or completed; `ping` and other events are acknowledged.
    fn receive_webhook(
        &self,
        headers: &reqwest::header::HeaderMap,
        body: &[u8],
    ) -> std::result::Result<crate::providers::WebhookNotice, crate::providers::WebhookRefusal> {
        let Some(verifier) = &self.webhooks else {
            return Err(crate::providers::WebhookRefusal {
                status: 404,
                message: "this github source has no `webhookSecret`, so it takes no webhooks".to_owned(),
            });
        };
        let delivery = verifier
            .receive(headers, body)
            .map_err(|error| crate::providers::WebhookRefusal { status: error.status(), message: error.to_string() })?;
        Ok(match delivery.event {
            webhook::Event::WorkflowJob(event) => {
                self.note_workflow_job(&event);
                crate::providers::WebhookNotice {
                    wake: event.wakes_loop(),
                    reason: format!("workflow_job {} in `{}`", event.action, event.repository),
                }
            }
            webhook::Event::Ping => crate::providers::WebhookNotice { wake: false, reason: "ping".to_owned() },
            webhook::Event::Other(name) => {
                crate::providers::WebhookNotice { wake: false, reason: format!("`{name}` event ignored") }
            }
        })
    }

    async fn observe(&self) -> Result<CiObservation> {
        let observed_at = Timestamp::now();
        self.http.next_generation();
        let (repositories, rotation) = self.repositories_to_poll().await?;
        let polls: Vec<(String, Result<RepositoryPoll>)> = stream::iter(repositories)
            .map(|repository| async move { (repository.clone(), self.poll_repository(repository).await) })
            .buffer_unordered(self.concurrency)
            .collect()
            .await;
        let mut tasks: BTreeMap<u64, (JobState, Task)> = BTreeMap::new();
        let mut failure = None;
        // The label keys of all repositories' jobs shared; dropped with this observation.
        let mut interner = LabelInterner::new();
        {
            let mut sweep = lock(&self.sweep);
            for (repository, poll) in polls {
                match poll {
                    Ok(poll) => {
                        if poll.active {
                            sweep.hot.insert(poll.repository.clone());
                        } else {
                            sweep.hot.remove(&poll.repository);
                        }
                        let labels = interner.labels([(wire::REPOSITORY_LABEL, poll.repository.as_str())]);
                        for job in &poll.jobs {
                            let state = job.state();
                            if state != JobState::Other {
                                tasks.insert(job.id, (state, job.to_task(&labels)));
                            }
                        }
                    }
                    // Deleted or no longer visible since it was listed: it has nothing for us.
                    Err(Error::NotFound { .. }) => {
                        tracing::warn!(repository = %repository, "github repository not found; skipped");
                        sweep.hot.remove(&repository);
                    }
                    Err(error) => {
                        failure.get_or_insert(error);
                    }
                }
            }
        }
        // A partial queue would under-count demand: the cycle fails and the next one tries again.
        if let Some(error) = failure {
            return Err(error);
        }
        let runners = self.list_runners().await?;
        self.http.prune(rotation + 1);

        let mut queue = Queue::default();
        for (state, task) in tasks.into_values() {
            match state {
                JobState::Queued => queue.pending.push(task),
                JobState::Running => queue.running.push(task),
                JobState::Other => {}
            }
        }
        Ok(CiObservation { agents: runners.iter().map(|runner| runner.to_agent(observed_at)).collect(), queue })
    }

    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential> {
        let labels = self.runner_labels(request);
        if labels.is_empty() {
            return Err(invalid(format!(
                "runner `{}` would have no label, and GitHub needs at least one\nhint: keep the implicit labels \
                 (`platform`) or give the pool a label",
                request.name
            )));
        }
        let runner_group_id = self.runner_group_id().await?;
        let body = serde_json::json!({
            "name": request.name,
            "runner_group_id": runner_group_id,
            "labels": labels,
            "work_folder": self.work_folder,
        });
        let jit = match self.generate_jit_config(&body, &request.name).await {
            Ok(jit) => jit,
            // A runner of that name exists: left by an apply that died after registering, or a replaced instance's.
            // An idle one is removed and made anew (its config was never used, or its instance is gone); a busy
            // one is running a job and is never touched.
            Err(Error::AlreadyExists { .. }) => {
                if let Some(existing) = self.find_runner(&request.name).await? {
                    if existing.is_busy() {
                        return Err(Error::AlreadyExists {
                            what: format!("github runner `{}` (id {}, running a job)", request.name, existing.id),
                        });
                    }
                    match self.delete_runner(existing.id).await {
                        Ok(()) | Err(Error::NotFound { .. }) => {}
                        Err(error) => return Err(error),
                    }
                }
                self.generate_jit_config(&body, &request.name).await?
            }
            Err(error) => return Err(error),
        };
        if jit.encoded_jit_config.expose().is_empty() {
            return Err(http::bad_answer(
                "generate-jitconfig",
                &format!("runner `{}` came back without a config", request.name),
            ));
        }
        Ok(AgentCredential {
            agent_id: AgentId::new(jit.runner.id.to_string()),
            token: jit.encoded_jit_config,
            env: BTreeMap::from([(crate::providers::TOKEN_ENV_NAME_KEY.to_owned(), launch::JIT_CONFIG_ENV.to_owned())]),
        })
    }

    // No drain or undrain: GitHub has none (its runners always take jobs), so the trait's `Unsupported` stands.

    async fn deregister(&self, id: &AgentId) -> Result<()> {
        let number: u64 = id
            .as_str()
            .parse()
            .map_err(|_| Error::NotFound { what: format!("github runner `{id}` (ids are numbers)") })?;
        self.delete_runner(number).await
    }

    /// The workflow jobs queued in the window, from each repository's runs and their jobs ([`history`]).
    async fn history(&self, request: &crate::providers::HistoryRequest) -> Result<Vec<crate::providers::PastJob>> {
        self.job_history(request).await
    }
}
