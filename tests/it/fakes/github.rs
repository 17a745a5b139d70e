//! A stateful GitHub REST API fake on loopback, for the runner-autoscaler paths: repositories, workflow runs and
//! their jobs, self-hosted runners (repository, organisation and enterprise scopes), runner groups, just-in-time
//! runner configs, GitHub App installation tokens — with GitHub's auth, conditional requests and rate limits.
//!
//! Every request path, query and body it receives and every JSON body it serves is checked against the published
//! OpenAPI description (`github-actions.json`), and every webhook payload it builds against
//! `github-webhooks-workflow-job.json`; [`FakeGithub::spec_violations`] lists what did not match.
//!
//! Where it follows GitHub beyond the spec (each from GitHub's REST documentation):
//! - App auth: `POST /app/installations/{id}/access_tokens` takes a JWT signed RS256 with the app's key; the fake
//!   verifies it with the public key and refuses an `iat` in the future, an `exp` past or more than ten minutes
//!   ahead, and a wrong `iss`. Installation tokens expire after [`FakeGithub::set_token_lifetime`] (1 h).
//!   `GET /installation/repositories` needs an installation token.
//! - Every answer to an authenticated call carries `X-RateLimit-Limit/Remaining/Used/Reset/Resource`; every
//!   answer but a 304 costs one request of the budget; at 0 GitHub answers 403 "API rate limit exceeded".
//! - `GET` answers carry a weak `ETag` (a digest of the body); `If-None-Match` with it is answered `304` without
//!   a body and without cost.
//! - A run's status follows its jobs (all queued: `queued`; all done: `completed`; else `in_progress`); lists
//!   are newest first; pages by `per_page` (default 30, at most 100) and `page`.
//! - `generate-jitconfig`: a name taken in the scope is 409; no labels is 422; an unknown runner group is 404 (not
//!   documented: assumed). The runner is ephemeral: GitHub removes it when its one job completes.
//! - `DELETE .../runners/{id}` of a busy runner is 422 ("still running a job").
//! - Runner labels: the implicit ones (`self-hosted`, OS, architecture; case-insensitive) are `read-only`, the
//!   rest `custom`. The spec does not constrain label characters; neither does the fake.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use jiff::Timestamp;
use serde_json::{json, Value};
use sha2::Digest;

use super::query::url_pairs;
use super::server::ServerThread;
use super::spec::Spec;
use super::traffic::{traffic_methods, Traffic};

mod history;
pub use history::PastJobSpec;

pub const APP_ID: u64 = 4242;
pub const INSTALLATION_ID: u64 = 77;
/// A personal access token the fake accepts.
pub const PAT: &str = "ghp_fake0personal0access0token0000000000";
pub const ORG: &str = "acme";
pub const ENTERPRISE: &str = "acme-corp";
/// The App's private key (PKCS#1 PEM, as GitHub hands it out) and its public half.
pub const APP_KEY: &str = include_str!("../../fixtures/github/app-key.pem");
const APP_PUBLIC_KEY: &str = include_str!("../../fixtures/github/app-key.pub.pem");
/// A key of no App.
pub const OTHER_KEY: &str = include_str!("../../fixtures/github/other-key.pem");
/// Prefix of every just-in-time runner's secret inside its (base64) config, for leak checks.
pub const JIT_SECRET_PREFIX: &str = "jit-runner-credential-";

const DOCS: &str = "https://docs.github.com/rest";

/// A way one request fails.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// This status with GitHub's error body.
    Status(u16),
    /// A secondary rate limit: 403 (or 429) with `Retry-After` (when given) and GitHub's message.
    SecondaryLimit { status: u16, retry_after_secs: Option<u64> },
    /// Answer this long later (past a client's timeout).
    Delay(Duration),
    /// 200 with a body that is not JSON.
    MalformedJson,
}

#[derive(Debug, Clone)]
pub struct FakeRepo {
    pub id: u64,
    pub full_name: String,
    pub archived: bool,
}

#[derive(Debug, Clone)]
pub struct FakeRun {
    pub id: u64,
    pub repo: String,
    pub jobs: Vec<u64>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: u64,
    pub run_id: u64,
    pub repo: String,
    pub labels: Vec<String>,
    /// `queued`, `in_progress`, `completed`, `waiting`.
    pub status: String,
    pub runner_id: Option<u64>,
    pub runner_name: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct FakeRunner {
    pub id: u64,
    pub name: String,
    /// `repos/o/r`, `orgs/o` or `enterprises/e`.
    pub scope: String,
    pub labels: Vec<String>,
    pub online: bool,
    pub busy: bool,
    pub group_id: u64,
    pub ephemeral: bool,
    /// The encoded config handed out for it (just-in-time runners).
    pub jit_config: Option<String>,
}

struct RateLimit {
    limit: u64,
    remaining: u64,
    reset: i64,
}

struct State {
    repos: BTreeMap<String, FakeRepo>,
    runs: BTreeMap<u64, FakeRun>,
    jobs: BTreeMap<u64, FakeJob>,
    runners: BTreeMap<u64, FakeRunner>,
    /// Runner groups of the organisation and the enterprise: id → name.
    groups: BTreeMap<u64, String>,
    next_id: u64,
    /// Installation token → when it expires (UNIX seconds).
    tokens: BTreeMap<String, i64>,
    token_lifetime: Duration,
    /// The claims of every app JWT received, verified or not.
    jwts: Vec<Value>,
    rate: RateLimit,
    /// Requests by `METHOD /template` (the spec's template), faults, raw bodies, violations.
    traffic: Traffic<Fault>,
    not_modified: u64,
    /// Requests that counted against the primary limit.
    primary_cost: u64,
    /// Every request as `METHOD /path?query`, in order.
    log: Vec<String>,
    /// Past jobs' times and attempts (`history`).
    history: history::History,
}

struct Shared {
    state: Arc<Mutex<State>>,
    spec: Spec,
    webhook_spec: Spec,
    prefix: String,
    public_key: jsonwebtoken::DecodingKey,
}

/// The running fake. Dropping it stops the server.
pub struct FakeGithub {
    pub addr: SocketAddr,
    prefix: String,
    shared: Arc<Shared>,
    _server: ServerThread,
}

fn now() -> i64 {
    Timestamp::now().as_second()
}

fn time(seconds: i64) -> String {
    Timestamp::from_second(seconds).expect("time").to_string()
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn same_label(a: &str, b: &str) -> bool {
    a.to_lowercase() == b.to_lowercase()
}

const IMPLICIT_LABELS: [&str; 9] = ["self-hosted", "linux", "windows", "macos", "x64", "arm64", "arm", "x86", "osx"];

impl FakeGithub {
    /// Starts the fake on `127.0.0.1:0` (API at the root, like api.github.com), in a thread of its own.
    pub fn start() -> FakeGithub {
        Self::start_with_prefix("")
    }

    /// Starts the fake with the API under `prefix` (GitHub Enterprise Server serves it under `/api/v3`).
    pub fn start_with_prefix(prefix: &str) -> FakeGithub {
        let prefix = prefix.trim_end_matches('/').to_owned();
        let spec =
            Spec::load("github-actions.json").with_base_path(&prefix).errors_undocumented().conditional_requests();
        let webhook_spec = Spec::load("github-webhooks-workflow-job.json");
        let state = Arc::new(Mutex::new(State {
            repos: BTreeMap::new(),
            runs: BTreeMap::new(),
            jobs: BTreeMap::new(),
            runners: BTreeMap::new(),
            groups: BTreeMap::from([(1, "Default".to_owned())]),
            next_id: 1000,
            tokens: BTreeMap::new(),
            token_lifetime: Duration::from_secs(3600),
            jwts: Vec::new(),
            rate: RateLimit { limit: 5000, remaining: 5000, reset: now() + 3600 },
            traffic: Traffic::default(),
            not_modified: 0,
            primary_cost: 0,
            log: Vec::new(),
            history: history::History::default(),
        }));
        let shared = Arc::new(Shared {
            state,
            spec,
            webhook_spec,
            prefix: prefix.clone(),
            public_key: jsonwebtoken::DecodingKey::from_rsa_pem(APP_PUBLIC_KEY.as_bytes()).expect("public key"),
        });
        let serving = shared.clone();
        let (addr, server) =
            ServerThread::start(move |method, uri, headers, body| handle(serving.clone(), method, uri, headers, body));
        FakeGithub { addr, prefix, shared, _server: server }
    }

    /// The API root to configure as `endpoint`.
    pub fn url(&self) -> String {
        format!("http://{}{}", self.addr, self.prefix)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared.state)
    }

    // -- the world -------------------------------------------------------------------------------------------

    /// Adds a repository (`owner/name`).
    pub fn add_repo(&self, full_name: &str) -> u64 {
        let mut state = self.state();
        let id = next_id(&mut state);
        state.repos.insert(full_name.to_owned(), FakeRepo { id, full_name: full_name.to_owned(), archived: false });
        id
    }

    pub fn archive_repo(&self, full_name: &str) {
        self.state().repos.get_mut(full_name).expect("repo").archived = true;
    }

    /// Queues a workflow run in `repo` with one queued job per entry of `jobs` (each its `runs-on` labels).
    /// Returns the run id and the job ids.
    pub fn queue_run(&self, repo: &str, jobs: &[&[&str]]) -> (u64, Vec<u64>) {
        let mut state = self.state();
        assert!(state.repos.contains_key(repo), "no repo `{repo}` in the fake");
        let run_id = next_id(&mut state);
        let mut job_ids = Vec::new();
        for labels in jobs {
            let id = next_id(&mut state);
            state.jobs.insert(
                id,
                FakeJob {
                    id,
                    run_id,
                    repo: repo.to_owned(),
                    labels: labels.iter().map(|label| (*label).to_owned()).collect(),
                    status: "queued".to_owned(),
                    runner_id: None,
                    runner_name: None,
                    created_at: now(),
                },
            );
            job_ids.push(id);
        }
        state
            .runs
            .insert(run_id, FakeRun { id: run_id, repo: repo.to_owned(), jobs: job_ids.clone(), created_at: now() });
        (run_id, job_ids)
    }

    pub fn set_job_status(&self, job_id: u64, status: &str) {
        self.state().jobs.get_mut(&job_id).expect("job").status = status.to_owned();
    }

    /// A runner registered by someone else (not just-in-time): online and idle.
    pub fn add_runner(&self, scope: &str, name: &str, labels: &[&str]) -> u64 {
        let mut state = self.state();
        let id = next_id(&mut state);
        state.runners.insert(
            id,
            FakeRunner {
                id,
                name: name.to_owned(),
                scope: scope.to_owned(),
                labels: labels.iter().map(|label| (*label).to_owned()).collect(),
                online: true,
                busy: false,
                group_id: 1,
                ephemeral: false,
                jit_config: None,
            },
        );
        id
    }

    /// The runner process started with its config and connected.
    pub fn connect_runner(&self, runner_id: u64) {
        self.state().runners.get_mut(&runner_id).expect("runner").online = true;
    }

    /// The runner takes the queued job (its labels must fit, as GitHub's scheduler demands).
    pub fn take_job(&self, job_id: u64, runner_id: u64) {
        let mut state = self.state();
        let runner = state.runners.get(&runner_id).expect("runner").clone();
        let job = state.jobs.get_mut(&job_id).expect("job");
        assert_eq!(job.status, "queued", "only a queued job is taken");
        assert!(
            job.labels.iter().all(|wanted| runner.labels.iter().any(|offered| same_label(wanted, offered))),
            "runner `{}` ({:?}) cannot take job {job_id} ({:?})",
            runner.name,
            runner.labels,
            job.labels
        );
        job.status = "in_progress".to_owned();
        job.runner_id = Some(runner_id);
        job.runner_name = Some(runner.name.clone());
        let runner = state.runners.get_mut(&runner_id).expect("runner");
        runner.busy = true;
        runner.online = true;
    }

    /// The job completes; a just-in-time (ephemeral) runner goes with it.
    pub fn finish_job(&self, job_id: u64) {
        let mut state = self.state();
        let job = state.jobs.get_mut(&job_id).expect("job");
        job.status = "completed".to_owned();
        if let Some(runner_id) = job.runner_id {
            let ephemeral = state.runners.get(&runner_id).is_some_and(|runner| runner.ephemeral);
            if ephemeral {
                state.runners.remove(&runner_id);
            } else if let Some(runner) = state.runners.get_mut(&runner_id) {
                runner.busy = false;
            }
        }
    }

    pub fn add_runner_group(&self, name: &str) -> u64 {
        let mut state = self.state();
        let id = next_id(&mut state);
        state.groups.insert(id, name.to_owned());
        id
    }

    pub fn runners(&self) -> Vec<FakeRunner> {
        self.state().runners.values().cloned().collect()
    }

    pub fn runner_by_name(&self, name: &str) -> Option<FakeRunner> {
        self.state().runners.values().find(|runner| runner.name == name).cloned()
    }

    pub fn job(&self, job_id: u64) -> FakeJob {
        self.state().jobs.get(&job_id).expect("job").clone()
    }

    // -- auth and limits -------------------------------------------------------------------------------------

    /// How long installation tokens minted from now on last.
    pub fn set_token_lifetime(&self, lifetime: Duration) {
        self.state().token_lifetime = lifetime;
    }

    /// Every installation token minted so far stops working (expired or revoked).
    pub fn expire_tokens(&self) {
        for expiry in self.state().tokens.values_mut() {
            *expiry = 0;
        }
    }

    pub fn tokens_minted(&self) -> usize {
        self.state().tokens.len()
    }

    /// The claims of every app JWT received.
    pub fn jwt_claims(&self) -> Vec<Value> {
        self.state().jwts.clone()
    }

    /// The primary budget: `limit` an hour, `remaining` of it left in the current window.
    pub fn set_rate_limit(&self, limit: u64, remaining: u64) {
        let mut state = self.state();
        state.rate.limit = limit;
        state.rate.remaining = remaining;
    }

    pub fn rate_remaining(&self) -> u64 {
        self.state().rate.remaining
    }

    // -- counting and faults ---------------------------------------------------------------------------------

    traffic_methods!(Fault, except reset_counts);

    pub fn not_modified(&self) -> u64 {
        self.state().not_modified
    }

    /// Requests that counted against the primary rate limit.
    pub fn primary_cost(&self) -> u64 {
        self.state().primary_cost
    }

    /// Every request since the last [`FakeGithub::reset_counts`], as `METHOD /path?query`.
    pub fn request_log(&self) -> Vec<String> {
        self.state().log.clone()
    }

    /// Zeroes the request counters, the log, the 304s and the primary cost; queued faults, raw bodies and
    /// violations stay.
    pub fn reset_counts(&self) {
        let mut state = self.state();
        state.log.clear();
        state.traffic.reset_counts();
        state.not_modified = 0;
        state.primary_cost = 0;
    }

    // -- webhooks --------------------------------------------------------------------------------------------

    /// The `workflow_job` payload GitHub would send for the job now (`action`: queued, waiting, in_progress,
    /// completed), checked against the webhook spec.
    pub fn workflow_job_payload(&self, job_id: u64, action: &str) -> Value {
        let mut state = self.state();
        let job = state.jobs.get(&job_id).expect("job").clone();
        let repo = state.repos.get(&job.repo).expect("repo").clone();
        let mut workflow_job = job_json(&job, &state);
        // The webhook's job has no `runner_group_*` until a runner took it, and names the status of the action.
        workflow_job["status"] = json!(match action {
            "in_progress" => "in_progress",
            "completed" => "completed",
            "waiting" => "waiting",
            _ => "queued",
        });
        if action == "completed" {
            workflow_job["conclusion"] = json!("success");
            workflow_job["completed_at"] = json!(time(now()));
        }
        let payload = json!({
            "action": action,
            "workflow_job": workflow_job,
            "repository": repo_json(&repo),
            "organization": {
                "login": ORG, "id": 1, "node_id": "O_1", "url": "https://api.github.com/orgs/acme",
                "repos_url": "https://api.github.com/orgs/acme/repos", "events_url": "https://api.github.com/orgs/acme/events",
                "hooks_url": "https://api.github.com/orgs/acme/hooks", "issues_url": "https://api.github.com/orgs/acme/issues",
                "members_url": "https://api.github.com/orgs/acme/members{/member}",
                "public_members_url": "https://api.github.com/orgs/acme/public_members{/member}",
                "avatar_url": "https://avatars.githubusercontent.com/u/1", "description": null
            },
            "installation": { "id": INSTALLATION_ID, "node_id": "MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9uNzc=" },
            "sender": user_json("octocat", 583231),
        });
        let schema = match action {
            "queued" => "webhook-workflow-job-queued",
            "waiting" => "webhook-workflow-job-waiting",
            "in_progress" => "webhook-workflow-job-in-progress",
            _ => "webhook-workflow-job-completed",
        };
        let definition = self.shared.webhook_spec.definition(schema);
        for problem in self.shared.webhook_spec.validate(&definition, &payload) {
            state.traffic.violation(format!("webhook `{action}` payload: {problem}"));
        }
        payload
    }
}

fn next_id(state: &mut State) -> u64 {
    state.next_id += 1;
    state.next_id
}

// -- JSON of the world ------------------------------------------------------------------------------------------

fn user_json(login: &str, id: u64) -> Value {
    let api = format!("https://api.github.com/users/{login}");
    json!({
        "login": login, "id": id, "node_id": format!("U_{id}"),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}"), "gravatar_id": "",
        "url": api, "html_url": format!("https://github.com/{login}"),
        "followers_url": format!("{api}/followers"), "following_url": format!("{api}/following{{/other_user}}"),
        "gists_url": format!("{api}/gists{{/gist_id}}"), "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{api}/subscriptions"), "organizations_url": format!("{api}/orgs"),
        "repos_url": format!("{api}/repos"), "events_url": format!("{api}/events{{/privacy}}"),
        "received_events_url": format!("{api}/received_events"), "type": "Organization", "site_admin": false
    })
}

fn repo_json(repo: &FakeRepo) -> Value {
    let (owner, name) = repo.full_name.split_once('/').expect("owner/name");
    let api = format!("https://api.github.com/repos/{}", repo.full_name);
    let created = time(1_700_000_000);
    let mut first = json!({
        "id": repo.id, "node_id": format!("R_{}", repo.id), "name": name, "full_name": repo.full_name,
        "owner": user_json(owner, 1), "private": true, "html_url": format!("https://github.com/{}", repo.full_name),
        "description": null, "fork": false, "url": api,
        "archive_url": format!("{api}/{{archive_format}}{{/ref}}"), "assignees_url": format!("{api}/assignees{{/user}}"),
        "blobs_url": format!("{api}/git/blobs{{/sha}}"), "branches_url": format!("{api}/branches{{/branch}}"),
        "collaborators_url": format!("{api}/collaborators{{/collaborator}}"), "comments_url": format!("{api}/comments{{/number}}"),
        "commits_url": format!("{api}/commits{{/sha}}"), "compare_url": format!("{api}/compare/{{base}}...{{head}}"),
        "contents_url": format!("{api}/contents/{{+path}}"), "contributors_url": format!("{api}/contributors"),
    });
    // In parts: one `json!` of every field is past the macro's recursion limit.
    let rest = json!({
        "deployments_url": format!("{api}/deployments"), "downloads_url": format!("{api}/downloads"),
        "events_url": format!("{api}/events"), "forks_url": format!("{api}/forks"),
        "git_commits_url": format!("{api}/git/commits{{/sha}}"), "git_refs_url": format!("{api}/git/refs{{/sha}}"),
        "git_tags_url": format!("{api}/git/tags{{/sha}}"), "git_url": format!("git://github.com/{}.git", repo.full_name),
        "issue_comment_url": format!("{api}/issues/comments{{/number}}"), "issue_events_url": format!("{api}/issues/events{{/number}}"),
        "issues_url": format!("{api}/issues{{/number}}"), "keys_url": format!("{api}/keys{{/key_id}}"),
        "labels_url": format!("{api}/labels{{/name}}"), "languages_url": format!("{api}/languages"),
        "merges_url": format!("{api}/merges"), "milestones_url": format!("{api}/milestones{{/number}}"),
        "notifications_url": format!("{api}/notifications{{?since,all,participating}}"),
        "pulls_url": format!("{api}/pulls{{/number}}"), "releases_url": format!("{api}/releases{{/id}}"),
        "ssh_url": format!("git@github.com:{}.git", repo.full_name), "stargazers_url": format!("{api}/stargazers"),
        "statuses_url": format!("{api}/statuses/{{sha}}"), "subscribers_url": format!("{api}/subscribers"),
        "subscription_url": format!("{api}/subscription"), "tags_url": format!("{api}/tags"),
        "teams_url": format!("{api}/teams"), "trees_url": format!("{api}/git/trees{{/sha}}"),
        "clone_url": format!("https://github.com/{}.git", repo.full_name), "mirror_url": null,
        "hooks_url": format!("{api}/hooks"), "svn_url": format!("https://github.com/{}", repo.full_name),
    });
    let last = json!({
        "homepage": null, "language": "Rust", "forks_count": 0, "forks": 0, "stargazers_count": 0,
        "watchers_count": 0, "watchers": 0, "size": 100, "default_branch": "main", "open_issues_count": 0,
        "open_issues": 0, "is_template": false, "topics": [], "has_issues": true, "has_projects": false,
        "has_wiki": false, "has_pages": false, "has_downloads": true, "archived": repo.archived, "disabled": false,
        "visibility": "private", "pushed_at": created, "created_at": created, "updated_at": created,
        "license": null
    });
    for part in [rest, last] {
        if let (Some(first), Value::Object(part)) = (first.as_object_mut(), part) {
            first.extend(part);
        }
    }
    first
}

fn run_status(run: &FakeRun, state: &State) -> &'static str {
    let statuses: Vec<&str> =
        run.jobs.iter().filter_map(|id| state.jobs.get(id)).map(|job| job.status.as_str()).collect();
    if statuses.iter().all(|status| *status == "completed") {
        "completed"
    } else if statuses.iter().all(|status| *status == "queued") {
        "queued"
    } else if statuses.iter().all(|status| matches!(*status, "queued" | "waiting")) {
        "waiting"
    } else {
        "in_progress"
    }
}

fn run_json(run: &FakeRun, state: &State) -> Value {
    let repo = state.repos.get(&run.repo).expect("repo");
    let api = format!("https://api.github.com/repos/{}/actions/runs/{}", run.repo, run.id);
    let status = run_status(run, state);
    json!({
        "id": run.id, "name": "ci", "node_id": format!("WFR_{}", run.id), "check_suite_id": run.id,
        "check_suite_node_id": format!("CS_{}", run.id), "head_branch": "main",
        "head_sha": "009b8a3a9ccbb128af87f9b1c0f4c62e8a304f6d", "path": ".github/workflows/ci.yml",
        "run_number": 1, "run_attempt": 1, "event": "push", "status": status,
        "conclusion": if status == "completed" { json!("success") } else { Value::Null },
        "workflow_id": 159038, "url": api, "html_url": format!("https://github.com/{}/actions/runs/{}", run.repo, run.id),
        "pull_requests": [], "created_at": time(run.created_at), "updated_at": time(run.created_at),
        "run_started_at": time(run.created_at), "jobs_url": format!("{api}/jobs"), "logs_url": format!("{api}/logs"),
        "check_suite_url": format!("https://api.github.com/repos/{}/check-suites/{}", run.repo, run.id),
        "artifacts_url": format!("{api}/artifacts"), "cancel_url": format!("{api}/cancel"),
        "rerun_url": format!("{api}/rerun"), "previous_attempt_url": null,
        "workflow_url": format!("https://api.github.com/repos/{}/actions/workflows/159038", run.repo),
        "head_commit": null, "repository": repo_json(repo), "head_repository": repo_json(repo),
        "display_title": "ci"
    })
}

fn job_json(job: &FakeJob, state: &State) -> Value {
    let api = format!("https://api.github.com/repos/{}/actions", job.repo);
    let group = job.runner_id.and_then(|id| state.runners.get(&id)).map(|runner| runner.group_id);
    let mut value = json!({
        "id": job.id, "run_id": job.run_id, "run_url": format!("{api}/runs/{}", job.run_id), "run_attempt": 1,
        "node_id": format!("CR_{}", job.id), "head_sha": "009b8a3a9ccbb128af87f9b1c0f4c62e8a304f6d",
        "url": format!("{api}/jobs/{}", job.id),
        "html_url": format!("https://github.com/{}/actions/runs/{}/job/{}", job.repo, job.run_id, job.id),
        "status": job.status,
        "conclusion": if job.status == "completed" { json!("success") } else { Value::Null },
        "created_at": time(job.created_at), "started_at": time(job.created_at),
        "completed_at": if job.status == "completed" { json!(time(now())) } else { Value::Null },
        "name": format!("job-{}", job.id), "steps": [],
        "check_run_url": format!("https://api.github.com/repos/{}/check-runs/{}", job.repo, job.id),
        "labels": job.labels, "runner_id": job.runner_id, "runner_name": job.runner_name,
        "runner_group_id": group, "runner_group_name": group.and_then(|id| state.groups.get(&id).cloned()),
        "workflow_name": "ci", "head_branch": "main"
    });
    history::apply(state, job, &mut value);
    value
}

fn runner_json(runner: &FakeRunner) -> Value {
    let labels: Vec<Value> = runner
        .labels
        .iter()
        .enumerate()
        .map(|(index, name)| {
            let implicit = IMPLICIT_LABELS.iter().any(|implicit| same_label(implicit, name));
            json!({ "id": index + 1, "name": name, "type": if implicit { "read-only" } else { "custom" } })
        })
        .collect();
    json!({
        "id": runner.id, "runner_group_id": runner.group_id, "name": runner.name, "os": "Linux",
        "status": if runner.online { "online" } else { "offline" }, "busy": runner.busy, "labels": labels,
        "ephemeral": runner.ephemeral
    })
}

fn group_json(id: u64, name: &str, scope: &str) -> Value {
    let api = format!("https://api.github.com/{scope}/actions/runner-groups/{id}");
    json!({
        "id": id, "name": name, "visibility": "all", "default": id == 1, "runners_url": format!("{api}/runners"),
        "inherited": false, "allows_public_repositories": false
    })
}

// -- serving ----------------------------------------------------------------------------------------------------

enum Answer {
    Json(StatusCode, Value),
    Empty(StatusCode),
    Error(StatusCode, String),
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    Answer::Error(status, message.into())
}

fn error_body(message: &str) -> Value {
    json!({ "message": message, "documentation_url": DOCS })
}

fn page_of<T: Clone>(items: &[T], query: &[(String, String)]) -> Vec<T> {
    let number = |name: &str, default: usize| {
        query.iter().find(|(key, _)| key == name).and_then(|(_, value)| value.parse::<usize>().ok()).unwrap_or(default)
    };
    let per_page = number("per_page", 30).clamp(1, 100);
    let page = number("page", 1).max(1);
    items.iter().skip((page - 1) * per_page).take(per_page).cloned().collect()
}

fn query_value<'a>(query: &'a [(String, String)], name: &str) -> Option<&'a str> {
    query.iter().find(|(key, _)| key == name).map(|(_, value)| value.as_str())
}

fn rate_headers(rate: &RateLimit) -> Vec<(&'static str, String)> {
    vec![
        ("x-ratelimit-limit", rate.limit.to_string()),
        ("x-ratelimit-remaining", rate.remaining.to_string()),
        ("x-ratelimit-used", (rate.limit - rate.remaining).to_string()),
        ("x-ratelimit-reset", rate.reset.to_string()),
        ("x-ratelimit-resource", "core".to_owned()),
    ]
}

fn with_headers(mut response: Response, headers: &[(&'static str, String)]) -> Response {
    for (name, value) in headers {
        if let Ok(value) = HeaderValue::from_str(value) {
            response.headers_mut().insert(*name, value);
        }
    }
    response
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    (status, [("content-type", "application/json; charset=utf-8")], body.to_string()).into_response()
}

/// Which credential a request carries.
enum Caller {
    Installation,
    Pat,
}

async fn handle(shared: Arc<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let template = shared.spec.template(&path).unwrap_or_else(|| path.clone());
    let key = format!("{method} {template}");
    let query = url_pairs(uri.query().unwrap_or(""));
    let request_body: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(value) => Some(value),
            Err(problem) => {
                lock(&shared.state).traffic.violation(format!("{key}: request body is not JSON: {problem}"));
                return json_response(StatusCode::BAD_REQUEST, &error_body("Problems parsing JSON"));
            }
        }
    };

    let fault = {
        let mut state = lock(&shared.state);
        let fault = state.traffic.arrive(&key);
        state.log.push(match uri.query() {
            Some(query) => format!("{method} {path}?{query}"),
            None => format!("{method} {path}"),
        });
        let pairs: Vec<(&str, &str)> = query.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
        if let Err(problem) = shared.spec.check_request(method.as_str(), &path, &pairs, request_body.as_ref()) {
            state.traffic.violation(problem);
        }
        for required in ["user-agent", "authorization"] {
            if !headers.contains_key(required) {
                state.traffic.violation(format!("{key}: no `{required}` header (GitHub refuses such requests)"));
            }
        }
        fault
    };
    match fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let state = lock(&shared.state);
            return with_headers(json_response(status, &error_body("injected failure")), &rate_headers(&state.rate));
        }
        Some(Fault::SecondaryLimit { status, retry_after_secs }) => {
            let state = lock(&shared.state);
            let mut headers = rate_headers(&state.rate);
            if let Some(seconds) = retry_after_secs {
                headers.push(("retry-after", seconds.to_string()));
            }
            let message = "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.";
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::FORBIDDEN);
            return with_headers(json_response(status, &error_body(message)), &headers);
        }
        Some(Fault::MalformedJson) => {
            return (StatusCode::OK, [("content-type", "application/json")], "{\"total_count\": 1, \"runners\": [tru")
                .into_response();
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }

    let bearer = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned();
    let relative = path.strip_prefix(shared.prefix.as_str()).unwrap_or(&path).to_owned();
    let segments: Vec<&str> = relative.trim_start_matches('/').split('/').collect();

    // The one call an app JWT may make here.
    if let ("POST", ["app", "installations", id, "access_tokens"]) = (method.as_str(), segments.as_slice()) {
        let answer = mint_token(&shared, &bearer, id);
        let mut state = lock(&shared.state);
        return respond(&shared, &mut state, &method, &path, &headers, answer, false);
    }

    let mut state = lock(&shared.state);
    let caller = if bearer == PAT {
        Caller::Pat
    } else if state.tokens.get(&bearer).is_some_and(|expiry| *expiry > now()) {
        Caller::Installation
    } else {
        let answer = error(StatusCode::UNAUTHORIZED, "Bad credentials");
        return respond(&shared, &mut state, &method, &path, &headers, answer, false);
    };
    if state.rate.reset <= now() {
        state.rate.reset = now() + 3600;
        state.rate.remaining = state.rate.limit;
    }
    if state.rate.remaining == 0 {
        let answer =
            error(StatusCode::FORBIDDEN, format!("API rate limit exceeded for installation ID {INSTALLATION_ID}."));
        return respond(&shared, &mut state, &method, &path, &headers, answer, true);
    }
    if let Some(raw) = state.traffic.take_raw(&key) {
        let answer = Answer::Json(StatusCode::OK, raw);
        // Older shapes are not what the current spec describes: served unchecked.
        return serve(&mut state, &method, &headers, answer, true);
    }
    let answer = route(&mut state, &method, &segments, &query, request_body.as_ref(), &caller);
    respond(&shared, &mut state, &method, &path, &headers, answer, true)
}

/// Checks an answer against the spec and serves it.
fn respond(
    shared: &Shared,
    state: &mut State,
    method: &Method,
    path: &str,
    headers: &HeaderMap,
    answer: Answer,
    rate_limited_call: bool,
) -> Response {
    let (status, body) = match &answer {
        Answer::Json(status, body) => (*status, Some(body.clone())),
        Answer::Empty(status) => (*status, None),
        Answer::Error(status, message) => (*status, Some(error_body(message))),
    };
    if let Err(problem) = shared.spec.check_response(method.as_str(), path, status.as_u16(), body.as_ref()) {
        state.traffic.violation(problem);
    }
    serve(state, method, headers, answer, rate_limited_call)
}

/// ETag / 304 and the rate-limit accounting of an answer.
fn serve(state: &mut State, method: &Method, headers: &HeaderMap, answer: Answer, rate_limited_call: bool) -> Response {
    let response = match answer {
        Answer::Json(status, body) if *method == Method::GET && status == StatusCode::OK => {
            let text = body.to_string();
            let etag = format!("W/\"{}\"", hex::encode(&sha2::Sha256::digest(text.as_bytes())[..16]));
            let matches =
                headers.get("if-none-match").and_then(|value| value.to_str().ok()).is_some_and(|sent| sent == etag);
            if matches {
                state.not_modified += 1;
                let response = (StatusCode::NOT_MODIFIED, [("etag", etag)]).into_response();
                // Not counted against the primary limit.
                return if rate_limited_call { with_headers(response, &rate_headers(&state.rate)) } else { response };
            }
            (status, [("content-type", "application/json; charset=utf-8"), ("etag", etag.as_str())], text)
                .into_response()
        }
        Answer::Json(status, body) => json_response(status, &body),
        Answer::Empty(status) => status.into_response(),
        Answer::Error(status, message) => json_response(status, &error_body(&message)),
    };
    if !rate_limited_call {
        return response;
    }
    state.primary_cost += 1;
    state.rate.remaining = state.rate.remaining.saturating_sub(1);
    with_headers(response, &rate_headers(&state.rate))
}

/// `POST /app/installations/{id}/access_tokens`: verifies the app JWT, mints a token.
fn mint_token(shared: &Shared, bearer: &str, installation: &str) -> Answer {
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    validation.leeway = 0;
    validation.validate_aud = false;
    // `iss` is checked below: jsonwebtoken reads it as a string only, and GitHub takes the app id as a number.
    validation.set_required_spec_claims(&["exp", "iat"]);
    // The claims as sent, before any check, so a test can see what a refused JWT said.
    let mut insecure = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    insecure.insecure_disable_signature_validation();
    insecure.validate_exp = false;
    insecure.validate_aud = false;
    insecure.set_required_spec_claims::<&str>(&[]);
    let unverified = jsonwebtoken::decode::<Value>(bearer, &jsonwebtoken::DecodingKey::from_secret(&[]), &insecure)
        .map(|data| data.claims);
    let mut state = lock(&shared.state);
    if let Ok(claims) = &unverified {
        state.jwts.push(claims.clone());
    }
    let refused = |message: &str| error(StatusCode::UNAUTHORIZED, message.to_owned());
    let claims = match jsonwebtoken::decode::<Value>(bearer, &shared.public_key, &validation) {
        Ok(data) => data.claims,
        Err(problem) => return refused(&format!("A JSON web token could not be decoded ({problem})")),
    };
    let now = now();
    let iat = claims["iat"].as_i64().unwrap_or(i64::MAX);
    let exp = claims["exp"].as_i64().unwrap_or(i64::MIN);
    let iss_ok = claims["iss"] == json!(APP_ID) || claims["iss"] == json!(APP_ID.to_string());
    if !iss_ok {
        return refused("'Issuer' claim ('iss') must be an Integer or the Client ID");
    }
    if iat > now {
        return refused("'Issued at' claim ('iat') must be an Integer representing a time in the past");
    }
    // A few seconds of slack for the time between the client signing and this check.
    if exp > now + 600 + 5 || exp - iat > 600 + 60 {
        return refused("'Expiration time' claim ('exp') is too far in the future");
    }
    if installation != INSTALLATION_ID.to_string() {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    let token = format!("ghs_fake{:016x}{:08x}", state.tokens.len() as u64 + 1, now);
    let expires = now + i64::try_from(state.token_lifetime.as_secs()).unwrap_or(3600);
    state.tokens.insert(token.clone(), expires);
    Answer::Json(
        StatusCode::CREATED,
        json!({
            "token": token, "expires_at": time(expires),
            "permissions": { "actions": "read", "administration": "write", "organization_self_hosted_runners": "write" },
            "repository_selection": "all"
        }),
    )
}

fn runner_scope(segments: &[&str]) -> Option<(String, usize)> {
    match segments {
        ["repos", owner, repo, "actions", ..] => Some((format!("repos/{owner}/{repo}"), 3)),
        ["orgs", org, "actions", ..] => Some((format!("orgs/{org}"), 2)),
        ["enterprises", enterprise, "actions", ..] => Some((format!("enterprises/{enterprise}"), 2)),
        _ => None,
    }
}

fn scope_exists(state: &State, scope: &str) -> bool {
    match scope.split('/').collect::<Vec<_>>().as_slice() {
        ["repos", owner, repo] => state.repos.contains_key(&format!("{owner}/{repo}")),
        ["orgs", org] => *org == ORG,
        ["enterprises", enterprise] => *enterprise == ENTERPRISE,
        _ => false,
    }
}

fn route(
    state: &mut State,
    method: &Method,
    segments: &[&str],
    query: &[(String, String)],
    body: Option<&Value>,
    caller: &Caller,
) -> Answer {
    match (method.as_str(), segments) {
        ("GET", ["installation", "repositories"]) => {
            if !matches!(caller, Caller::Installation) {
                return error(
                    StatusCode::FORBIDDEN,
                    "You must authenticate with an installation access token in order to list repositories for an installation.",
                );
            }
            let repos: Vec<Value> = state.repos.values().map(repo_json).collect();
            Answer::Json(
                StatusCode::OK,
                json!({ "total_count": repos.len(), "repositories": page_of(&repos, query), "repository_selection": "all" }),
            )
        }
        ("GET", ["orgs", org, "repos"]) => {
            if *org != ORG {
                return error(StatusCode::NOT_FOUND, "Not Found");
            }
            let repos: Vec<Value> = state
                .repos
                .values()
                .filter(|repo| repo.full_name.starts_with(&format!("{org}/")))
                .map(repo_json)
                .collect();
            Answer::Json(StatusCode::OK, Value::Array(page_of(&repos, query)))
        }
        ("GET", ["repos", owner, repo, "actions", "runs"]) => {
            let full_name = format!("{owner}/{repo}");
            if !state.repos.contains_key(&full_name) {
                return error(StatusCode::NOT_FOUND, "Not Found");
            }
            let wanted = query_value(query, "status");
            let runs: Vec<Value> = state
                .runs
                .values()
                .rev()
                .filter(|run| run.repo == full_name)
                .filter(|run| wanted.is_none_or(|wanted| run_status(run, state) == wanted))
                .filter(|run| history::created_matches(query, run.created_at))
                .map(|run| run_json(run, state))
                .collect();
            Answer::Json(
                StatusCode::OK,
                json!({ "total_count": runs.len(), "workflow_runs": page_of(&history::capped(runs, query), query) }),
            )
        }
        ("GET", ["repos", owner, repo, "actions", "runs", run_id, "jobs"]) => {
            let full_name = format!("{owner}/{repo}");
            let Some(run) =
                run_id.parse::<u64>().ok().and_then(|id| state.runs.get(&id)).filter(|run| run.repo == full_name)
            else {
                return error(StatusCode::NOT_FOUND, "Not Found");
            };
            let jobs: Vec<Value> = run
                .jobs
                .iter()
                .filter_map(|id| state.jobs.get(id))
                .filter(|job| history::attempt_listed(state, run, job, query))
                .map(|job| job_json(job, state))
                .collect();
            Answer::Json(StatusCode::OK, json!({ "total_count": jobs.len(), "jobs": page_of(&jobs, query) }))
        }
        ("GET", [.., "actions", "runner-groups"]) => {
            let Some((scope, _)) = runner_scope(segments) else {
                return error(StatusCode::NOT_FOUND, "Not Found");
            };
            if !scope_exists(state, &scope) {
                return error(StatusCode::NOT_FOUND, "Not Found");
            }
            let groups: Vec<Value> = state.groups.iter().map(|(id, name)| group_json(*id, name, &scope)).collect();
            Answer::Json(
                StatusCode::OK,
                json!({ "total_count": groups.len(), "runner_groups": page_of(&groups, query) }),
            )
        }
        _ => runners_route(state, method, segments, query, body),
    }
}

fn runners_route(
    state: &mut State,
    method: &Method,
    segments: &[&str],
    query: &[(String, String)],
    body: Option<&Value>,
) -> Answer {
    let Some((scope, prefix)) = runner_scope(segments) else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    let ["actions", "runners", rest @ ..] = &segments[prefix..] else {
        return error(StatusCode::NOT_FOUND, "Not Found");
    };
    if !scope_exists(state, &scope) {
        return error(StatusCode::NOT_FOUND, "Not Found");
    }
    match (method.as_str(), rest) {
        ("GET", []) => {
            let name = query_value(query, "name");
            let runners: Vec<Value> = state
                .runners
                .values()
                .filter(|runner| runner.scope == scope)
                .filter(|runner| name.is_none_or(|name| runner.name == name))
                .map(runner_json)
                .collect();
            Answer::Json(StatusCode::OK, json!({ "total_count": runners.len(), "runners": page_of(&runners, query) }))
        }
        ("POST", ["generate-jitconfig"]) => {
            let body = body.cloned().unwrap_or(Value::Null);
            let name = body["name"].as_str().unwrap_or_default().to_owned();
            let labels: Vec<String> = body["labels"]
                .as_array()
                .map(|labels| labels.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                .unwrap_or_default();
            let group_id = body["runner_group_id"].as_u64().unwrap_or(0);
            if labels.is_empty() || name.is_empty() {
                return Answer::Json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "message": "Validation Failed", "documentation_url": DOCS, "errors": ["labels must have at least 1 item"] }),
                );
            }
            if !state.groups.contains_key(&group_id) {
                return error(StatusCode::NOT_FOUND, "Not Found");
            }
            if state.runners.values().any(|runner| runner.scope == scope && runner.name == name) {
                return error(
                    StatusCode::CONFLICT,
                    format!("Already exists - A runner with the name {name} already exists."),
                );
            }
            let id = next_id(state);
            let secret = format!("{JIT_SECRET_PREFIX}{id}-{:08x}", (id.wrapping_mul(0x9e37_79b9)) & 0xffff_ffff);
            let config = json!({
                ".runner": { "AgentId": id, "AgentName": name, "PoolId": group_id, "ServerUrl": "https://pipelines.actions.githubusercontent.com/x", "WorkFolder": body["work_folder"] },
                ".credentials": { "Scheme": "OAuth", "Data": { "ClientId": format!("client-{id}"), "AuthorizationUrl": "https://token.actions.githubusercontent.com/x", "Secret": secret } },
            });
            let encoded = base64::engine::general_purpose::STANDARD.encode(config.to_string());
            let runner = FakeRunner {
                id,
                name,
                scope: scope.clone(),
                labels,
                online: false,
                busy: false,
                group_id,
                ephemeral: true,
                jit_config: Some(encoded.clone()),
            };
            let runner_value = runner_json(&runner);
            state.runners.insert(id, runner);
            Answer::Json(StatusCode::CREATED, json!({ "runner": runner_value, "encoded_jit_config": encoded }))
        }
        ("DELETE", [id]) => {
            let Some(runner) = id
                .parse::<u64>()
                .ok()
                .and_then(|id| state.runners.get(&id))
                .filter(|runner| runner.scope == scope)
                .cloned()
            else {
                return error(StatusCode::NOT_FOUND, "Not Found");
            };
            if runner.busy {
                return Answer::Json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({ "message": format!("Bad request - Runner \"{}\" is still running a job\"", runner.name), "documentation_url": DOCS }),
                );
            }
            state.runners.remove(&runner.id);
            Answer::Empty(StatusCode::NO_CONTENT)
        }
        _ => error(StatusCode::NOT_FOUND, "Not Found"),
    }
}
