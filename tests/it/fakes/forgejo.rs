//! A stateful Forgejo (15) fake on loopback: owners (users, organisations) and repositories, Actions jobs
//! (waiting, blocked, running, done, each attempt with its handle), runner records with their tokens, the
//! access-token checks (site admin, organisation owner, repository admin, read-only tokens), per-endpoint request
//! counters and fault injection. The tests play `forgejo-runner` through [`FakeForgejo::runner_declare`],
//! [`FakeForgejo::runner_fetch`] and [`FakeForgejo::runner_finish`], which follow Forgejo's runner protocol
//! handlers (`Declare`, `FetchTask` → `CreateTaskForRunner`, the final `UpdateTask`).
//!
//! Every request and every JSON answer is checked against `forgejo-swagger.json` beside this file, a schema
//! written for this fake from Forgejo's sources; [`FakeForgejo::spec_violations`] lists what did not match.
//! Where each shape comes from (Forgejo v15 unless said):
//! - paths, parameters, `ActionRunJob`, `ActionRunner`, `RegisterRunnerOptions`/`RegisterRunnerResponse`,
//!   `APIError` & co.: `templates/swagger/v1_json.tmpl` (read in `live-clones/forgejo` @ `18a4c49`);
//! - what the list, register and delete calls do, and that the job list is one unpaginated answer that is `null`
//!   when empty: `routers/api/v1/shared/runners.go` (read in `rezuscloud/forgejo` @ `1ae5887`);
//! - `ActionRunJob` fields from the model: `services/convert/action.go` `ToActionRunJob` (same commit);
//! - the admin list holds every runner of the instance (`ListRunners`: no owner and no repository put no
//!   condition); scoped lists hold the scope's own; `X-Total-Count` and `Link` on runner lists
//!   (`ctx.SetTotalCountHeader`, `ctx.SetLinkHeader`); page size defaults to 30 and is capped at 50
//!   (`setting.API.DefaultPagingNum`, `MaxResponseItems`);
//! - registering a name twice makes two runners; the 201 answer; tokens of 40 hex digits; a read-only token
//!   refused with `token does not have at least one of required scope(s): [write:user]`:
//!   `tests/integration/api_actions_runner_test.go`;
//! - a runner takes a job iff its handle (when it asks with one) is the job's and its labels cover the job's
//!   `runs_on` (`CreateTaskForRunner`, `IsRequestedByRunner`, `ItRunsOn`: `models/actions/task.go`,
//!   `run_job.go`); an ephemeral runner takes one task and is deleted once it is done;
//! - runner status `offline` past a minute without contact, `active` within 10 s of a task report, else `idle`
//!   (`ActionRunner.Status`, `RunnerOfflineTime`, `RunnerIdleTime`);
//! - a fresh runner's `labels` and a job's empty `needs` are Go nil slices, so `null`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::query::url_pairs;
use super::server::ServerThread;
use super::spec::Spec;
use super::traffic::{traffic_methods, Traffic};

/// A site administrator's token with every permission.
pub const ADMIN_TOKEN: &str = "fj-admin-3c1f0a9e77d24b5b9e0c4f1a2b3c4d5e6f708192";
/// Alice's token with every `write:` permission but no admin rights. Alice owns the organisation `acme` and the
/// repository `alice/app`.
pub const USER_TOKEN: &str = "fj-alice-8d2e4f6a0b1c3d5e7f9a1b3c5d7e9f0a2b4c6d8e";
/// Alice's token with `read:` permissions only.
pub const READ_TOKEN: &str = "fj-alice-read-5a7b9c1d3e5f7a9b1c3d5e7f9a1b3c5d7e9f0a";

/// Owner ids and names of the fake's world.
pub const ROOT_ID: i64 = 1;
pub const ALICE_ID: i64 = 2;
pub const ACME_ID: i64 = 3;
/// Repository ids.
pub const ALICE_APP: i64 = 10;
pub const ACME_WEB: i64 = 11;
pub const ACME_API: i64 = 12;
pub const BOB_LIB: i64 = 13;

/// `MAX_RESPONSE_ITEMS` of a default Forgejo.
const MAX_RESPONSE_ITEMS: usize = 50;
/// `DEFAULT_PAGING_NUM` of a default Forgejo.
const DEFAULT_PAGING_NUM: usize = 30;

/// A way one request fails.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and a JSON `{"message": …}` body.
    Status(u16),
    /// 429 with `Retry-After: seconds` (a reverse proxy's rate limit: Forgejo has none of its own).
    RateLimited { retry_after_secs: u64 },
    /// Wait this long before answering normally.
    Delay(Duration),
    /// Answer 200 with a body that is not JSON.
    MalformedJson,
    /// Answer 400 with a body that repeats the request's `Authorization` header (a misbehaving proxy).
    EchoAuthorization,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Blocked,
    Waiting,
    Running,
    Done,
}

#[derive(Debug, Clone)]
pub struct FakeJob {
    pub id: i64,
    pub run_id: i64,
    pub repo_id: i64,
    pub owner_id: i64,
    pub name: String,
    pub runs_on: Vec<String>,
    pub needs: Vec<String>,
    pub status: JobStatus,
    pub attempt: i64,
    pub handle: String,
    pub task_id: i64,
    pub runner_id: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct FakeRunner {
    pub id: i64,
    pub uuid: String,
    pub name: String,
    pub description: String,
    /// `None` until the runner declares its labels (a Go nil slice: `null`).
    pub labels: Option<Vec<String>>,
    pub owner_id: i64,
    pub repo_id: i64,
    pub ephemeral: bool,
    pub token: String,
    pub version: String,
    /// Unix seconds; 0: never.
    pub last_online: i64,
    pub last_active: i64,
    /// The task an ephemeral runner took.
    pub task: Option<i64>,
}

impl FakeRunner {
    /// `ActionRunner.Status`.
    pub fn status(&self) -> &'static str {
        let now = now();
        if now - self.last_online > 60 {
            "offline"
        } else if now - self.last_active > 10 {
            "idle"
        } else {
            "active"
        }
    }
}

struct Owner {
    name: &'static str,
    organisation: bool,
}

struct Repo {
    owner_id: i64,
    name: &'static str,
}

struct Caller {
    user: i64,
    site_admin: bool,
    write: bool,
}

struct State {
    owners: BTreeMap<i64, Owner>,
    repos: BTreeMap<i64, Repo>,
    /// Organisation id → the users who own it.
    org_owners: BTreeMap<i64, Vec<i64>>,
    jobs: BTreeMap<i64, FakeJob>,
    runners: BTreeMap<i64, FakeRunner>,
    next_job: i64,
    next_run: i64,
    next_task: i64,
    next_runner: i64,
    next_handle: u64,
    max_response_items: usize,
    traffic: Traffic<Fault>,
    /// Answers without `X-Total-Count`, without `Link` (a proxy that drops them).
    no_total_count: bool,
    no_link: bool,
}

/// The running fake. Dropping it stops the server.
pub struct FakeForgejo {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    _server: ServerThread,
}

struct Shared {
    state: Arc<Mutex<State>>,
    spec: Spec,
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

/// Loads the schema written for this fake (see the module docs).
pub fn spec() -> Spec {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/it/fakes/forgejo-swagger.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    Spec::from_text("forgejo-swagger.json", &text).unwrap_or_else(|problem| panic!("forgejo schema: {problem}"))
}

impl FakeForgejo {
    /// Starts the fake on `127.0.0.1:0` in a thread of its own (usable from sync and async tests alike).
    pub fn start() -> FakeForgejo {
        let owners = BTreeMap::from([
            (ROOT_ID, Owner { name: "root", organisation: false }),
            (ALICE_ID, Owner { name: "alice", organisation: false }),
            (ACME_ID, Owner { name: "acme", organisation: true }),
            (4, Owner { name: "bob", organisation: false }),
        ]);
        let repos = BTreeMap::from([
            (ALICE_APP, Repo { owner_id: ALICE_ID, name: "app" }),
            (ACME_WEB, Repo { owner_id: ACME_ID, name: "web" }),
            (ACME_API, Repo { owner_id: ACME_ID, name: "api" }),
            (BOB_LIB, Repo { owner_id: 4, name: "lib" }),
        ]);
        let state = Arc::new(Mutex::new(State {
            owners,
            repos,
            org_owners: BTreeMap::from([(ACME_ID, vec![ALICE_ID])]),
            jobs: BTreeMap::new(),
            runners: BTreeMap::new(),
            next_job: 100,
            next_run: 1,
            next_task: 1,
            next_runner: 1,
            next_handle: 1,
            max_response_items: MAX_RESPONSE_ITEMS,
            traffic: Traffic::default(),
            no_total_count: false,
            no_link: false,
        }));
        let shared = Arc::new(Shared { state: state.clone(), spec: spec() });
        let (addr, server) =
            ServerThread::start(move |method, uri, headers, body| handle(shared.clone(), method, uri, headers, body));
        FakeForgejo { addr, state, _server: server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // -- the CI's side: jobs -----------------------------------------------------------------------------------

    /// Queues a waiting job in `repo` with these `runs-on` labels; returns its id and handle.
    pub fn add_job(&self, repo: i64, name: &str, runs_on: &[&str]) -> (i64, String) {
        self.insert_job(repo, name, runs_on, JobStatus::Waiting)
    }

    /// A job still blocked on `needs` (not listed until [`FakeForgejo::unblock`]).
    pub fn add_blocked_job(&self, repo: i64, name: &str, runs_on: &[&str]) -> (i64, String) {
        self.insert_job(repo, name, runs_on, JobStatus::Blocked)
    }

    fn insert_job(&self, repo: i64, name: &str, runs_on: &[&str], status: JobStatus) -> (i64, String) {
        let mut state = self.state();
        let owner_id = state.repos.get(&repo).expect("repo").owner_id;
        let id = state.next_job;
        state.next_job += 1;
        let run_id = state.next_run;
        state.next_run += 1;
        let handle = new_handle(&mut state);
        let needs = if status == JobStatus::Blocked { vec!["build".to_owned()] } else { Vec::new() };
        state.jobs.insert(
            id,
            FakeJob {
                id,
                run_id,
                repo_id: repo,
                owner_id,
                name: name.to_owned(),
                runs_on: runs_on.iter().map(|label| (*label).to_owned()).collect(),
                needs,
                status,
                attempt: 0,
                handle: handle.clone(),
                task_id: 0,
                runner_id: None,
            },
        );
        (id, handle)
    }

    pub fn unblock(&self, job: i64) {
        let mut state = self.state();
        let job = state.jobs.get_mut(&job).expect("job");
        assert_eq!(job.status, JobStatus::Blocked);
        job.status = JobStatus::Waiting;
    }

    /// Cancels a job that has not finished (gone from the listing).
    pub fn cancel(&self, job: i64) {
        self.state().jobs.get_mut(&job).expect("job").status = JobStatus::Done;
    }

    /// Re-runs a finished job: a new attempt, with a new handle (`PrepareNextAttempt`). Returns the handle.
    pub fn rerun(&self, job: i64) -> String {
        let mut state = self.state();
        let handle = new_handle(&mut state);
        let job = state.jobs.get_mut(&job).expect("job");
        assert_eq!(job.status, JobStatus::Done, "only a finished job is re-run");
        job.status = JobStatus::Waiting;
        job.task_id = 0;
        job.runner_id = None;
        job.handle = handle.clone();
        handle
    }

    pub fn job(&self, id: i64) -> FakeJob {
        self.state().jobs.get(&id).cloned().expect("job")
    }

    // -- the runner's side (what forgejo-runner does over its own protocol) ----------------------------------

    fn authenticated<'state>(
        state: &'state mut State,
        uuid: &str,
        token: &str,
    ) -> Result<&'state mut FakeRunner, String> {
        state
            .runners
            .values_mut()
            .find(|runner| runner.uuid == uuid && runner.token == token)
            .ok_or_else(|| format!("unauthenticated runner `{uuid}`"))
    }

    /// `Declare`: the runner connects and says its label names and version.
    pub fn runner_declare(&self, uuid: &str, token: &str, labels: &[&str]) -> Result<(), String> {
        let mut state = self.state();
        let runner = Self::authenticated(&mut state, uuid, token)?;
        runner.labels = Some(labels.iter().map(|label| (*label).to_owned()).collect());
        runner.version = "12.10.1".to_owned();
        runner.last_online = now();
        Ok(())
    }

    /// `FetchTask` (`CreateTaskForRunner`): the first waiting job of the runner's scope that it asked for (its
    /// handle, when it gives one) and whose `runs_on` its labels cover; `None` when there is none, or when an
    /// ephemeral runner has had its task already. The job runs; the runner reports on it at once (active).
    pub fn runner_fetch(&self, uuid: &str, token: &str, handle: Option<&str>) -> Result<Option<i64>, String> {
        let mut state = self.state();
        let runner = Self::authenticated(&mut state, uuid, token)?.clone();
        let now = now();
        state.runners.get_mut(&runner.id).expect("runner").last_online = now;
        if runner.ephemeral && runner.task.is_some() {
            return Ok(None);
        }
        let labels = runner.labels.clone().unwrap_or_default();
        let repos = &state.repos;
        let candidate = state
            .jobs
            .values()
            .filter(|job| job.status == JobStatus::Waiting && job.task_id == 0)
            .filter(|job| {
                if runner.repo_id != 0 {
                    job.repo_id == runner.repo_id
                } else if runner.owner_id != 0 {
                    repos.get(&job.repo_id).is_some_and(|repo| repo.owner_id == runner.owner_id)
                } else {
                    true
                }
            })
            .find(|job| {
                handle.is_none_or(|handle| handle == job.handle)
                    && !labels.is_empty()
                    && !job.runs_on.is_empty()
                    && job.runs_on.iter().all(|wanted| labels.contains(wanted))
            })
            .map(|job| job.id);
        let Some(job_id) = candidate else { return Ok(None) };
        let task = state.next_task;
        state.next_task += 1;
        let job = state.jobs.get_mut(&job_id).expect("job");
        job.status = JobStatus::Running;
        job.attempt += 1;
        job.task_id = task;
        job.runner_id = Some(runner.id);
        let runner = state.runners.get_mut(&runner.id).expect("runner");
        runner.task = Some(task);
        runner.last_active = now;
        Ok(Some(job_id))
    }

    /// The final `UpdateTask`: the job is done; an ephemeral runner's record is deleted.
    pub fn runner_finish(&self, job: i64) {
        let mut state = self.state();
        let job = state.jobs.get_mut(&job).expect("job");
        assert_eq!(job.status, JobStatus::Running);
        job.status = JobStatus::Done;
        let runner_id = job.runner_id.expect("a running job has a runner");
        if state.runners.get(&runner_id).is_some_and(|runner| runner.ephemeral) {
            state.runners.remove(&runner_id);
        } else if let Some(runner) = state.runners.get_mut(&runner_id) {
            runner.last_active = now();
        }
    }

    /// Sets how long ago a runner was last in contact and last reported on a task (seconds).
    pub fn set_runner_seen(&self, id: i64, online_ago: i64, active_ago: i64) {
        let mut state = self.state();
        let runner = state.runners.get_mut(&id).expect("runner");
        runner.last_online = now() - online_ago;
        runner.last_active = now() - active_ago;
    }

    /// A runner registered by hand (someone else's), in the scope given by its owner/repository.
    pub fn add_runner(&self, name: &str, description: &str, owner_id: i64, repo_id: i64) -> FakeRunner {
        let mut state = self.state();
        create_runner(&mut state, name, description, owner_id, repo_id, false)
    }

    pub fn runners(&self) -> Vec<FakeRunner> {
        self.state().runners.values().cloned().collect()
    }

    pub fn runner_named(&self, name: &str) -> Vec<FakeRunner> {
        self.state().runners.values().filter(|runner| runner.name == name).cloned().collect()
    }

    // -- test controls -------------------------------------------------------------------------------------

    /// Caps `limit` like `MAX_RESPONSE_ITEMS` does.
    pub fn set_max_response_items(&self, max: usize) {
        self.state().max_response_items = max;
    }

    pub fn drop_total_count(&self) {
        self.state().no_total_count = true;
    }

    pub fn drop_link(&self) {
        self.state().no_link = true;
    }

    traffic_methods!(Fault);
}

fn new_handle(state: &mut State) -> String {
    let n = state.next_handle;
    state.next_handle += 1;
    format!("{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}", n * 0x9e37_79b9 & 0xffff_ffff, n, n % 0xfff, n % 0xfff, n * 7919)
}

fn create_runner(
    state: &mut State,
    name: &str,
    description: &str,
    owner_id: i64,
    repo_id: i64,
    ephemeral: bool,
) -> FakeRunner {
    let id = state.next_runner;
    state.next_runner += 1;
    let runner = FakeRunner {
        id,
        uuid: format!("{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}", id * 2_654_435_761 & 0xffff_ffff, id, id, id, id),
        name: name.to_owned(),
        description: description.to_owned(),
        labels: None,
        owner_id,
        repo_id,
        ephemeral,
        // 40 hex digits, distinct per runner and recognisable in a leak check.
        token: format!("{:040x}", (id as u128) * 0x1f2e_3d4c_5b6a_7988_9706_a5b4),
        version: String::new(),
        last_online: 0,
        last_active: 0,
        task: None,
    };
    state.runners.insert(id, runner.clone());
    runner
}

fn runner_json(runner: &FakeRunner) -> Value {
    json!({
        "id": runner.id,
        "uuid": runner.uuid,
        "name": runner.name,
        "version": runner.version,
        "owner_id": runner.owner_id,
        "repo_id": runner.repo_id,
        "description": runner.description,
        "labels": runner.labels,
        "status": runner.status(),
        "ephemeral": runner.ephemeral,
    })
}

fn job_json(job: &FakeJob, state: &State, base: &str) -> Value {
    let repo = state.repos.get(&job.repo_id).expect("repo");
    let owner = state.owners.get(&repo.owner_id).expect("owner");
    json!({
        "id": job.id,
        "run_id": job.run_id,
        "attempt": job.attempt,
        "handle": job.handle,
        "repo_id": job.repo_id,
        "owner_id": job.owner_id,
        "name": job.name,
        "html_url": format!("{base}/{}/{}/actions/runs/{}/jobs/0/attempt/{}", owner.name, repo.name, job.run_id, job.attempt.max(1)),
        "needs": if job.needs.is_empty() { Value::Null } else { json!(job.needs) },
        "runs_on": job.runs_on,
        "task_id": job.task_id,
        "status": match job.status {
            JobStatus::Waiting => "waiting",
            JobStatus::Running => "running",
            JobStatus::Blocked => "blocked",
            JobStatus::Done => "success",
        },
    })
}

/// The counter key of a request: the path with a runner id as `{runner_id}`.
fn endpoint_key(method: &Method, path: &str) -> String {
    let templated: Vec<&str> = path
        .split('/')
        .enumerate()
        .map(|(index, segment)| {
            let after_runners = path.split('/').nth(index.wrapping_sub(1)) == Some("runners");
            if after_runners && segment.parse::<i64>().is_ok() {
                "{runner_id}"
            } else {
                segment
            }
        })
        .collect();
    format!("{method} {}", templated.join("/"))
}

enum Answer {
    Json(StatusCode, Value, Vec<(&'static str, String)>),
    Empty(StatusCode),
    Error(StatusCode, String),
}

fn error(status: StatusCode, message: impl Into<String>) -> Answer {
    Answer::Error(status, message.into())
}

async fn handle(shared: Arc<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let key = endpoint_key(&method, &path);
    let query_pairs = url_pairs(uri.query().unwrap_or(""));
    let query: Vec<(&str, &str)> = query_pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let authorization =
        headers.get("authorization").and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
    let request_body: Option<Value> = if body.is_empty() {
        None
    } else {
        match serde_json::from_slice(&body) {
            Ok(value) => Some(value),
            Err(problem) => {
                let mut state = shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                state.traffic.violation(format!("{key}: request body is not JSON: {problem}"));
                return json_error(StatusCode::BAD_REQUEST, "bad body", &path);
            }
        }
    };

    let fault = {
        let mut state = shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let fault = state.traffic.arrive(&key);
        if let Err(problem) = shared.spec.check_request(method.as_str(), &path, &query, request_body.as_ref()) {
            state.traffic.violation(problem);
        }
        fault
    };
    match fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return json_error(status, "injected failure", &path);
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", retry_after_secs.to_string())], "slow down")
                .into_response();
        }
        Some(Fault::MalformedJson) => {
            return (StatusCode::OK, [("content-type", "application/json")], "[{\"id\": tru").into_response();
        }
        Some(Fault::EchoAuthorization) => {
            return (StatusCode::BAD_REQUEST, format!("bad request; you sent Authorization: {authorization}"))
                .into_response();
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }

    let mut state = shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let answer = match caller(&authorization) {
        None => error(StatusCode::UNAUTHORIZED, "user does not exist"),
        Some(caller) => {
            if let Some(raw) = state.traffic.take_raw(&key) {
                return (StatusCode::OK, [("content-type", "application/json")], raw.to_string()).into_response();
            }
            let base = format!("http://{}", headers.get("host").and_then(|h| h.to_str().ok()).unwrap_or("localhost"));
            route(&mut state, &caller, &method, &path, &query, request_body.as_ref(), &base)
        }
    };
    let (status, body, extra) = match answer {
        Answer::Json(status, value, extra) => (status, Some(value), extra),
        Answer::Empty(status) => (status, None, Vec::new()),
        Answer::Error(status, message) => {
            (status, Some(json!({ "message": message, "url": format!("{path}") })), Vec::new())
        }
    };
    if let Err(problem) = shared.spec.check_response(method.as_str(), &path, status.as_u16(), body.as_ref()) {
        state.traffic.violation(problem);
    }
    drop(state);
    let mut response = match body {
        Some(body) => (status, [("content-type", "application/json;charset=utf-8")], body.to_string()).into_response(),
        None => status.into_response(),
    };
    for (name, value) in extra {
        response.headers_mut().insert(name, value.parse().expect("header"));
    }
    response
}

fn json_error(status: StatusCode, message: &str, path: &str) -> Response {
    (
        status,
        [("content-type", "application/json;charset=utf-8")],
        json!({ "message": message, "url": path }).to_string(),
    )
        .into_response()
}

fn caller(authorization: &str) -> Option<Caller> {
    match authorization.strip_prefix("token ")? {
        ADMIN_TOKEN => Some(Caller { user: ROOT_ID, site_admin: true, write: true }),
        USER_TOKEN => Some(Caller { user: ALICE_ID, site_admin: false, write: true }),
        READ_TOKEN => Some(Caller { user: ALICE_ID, site_admin: false, write: false }),
        _ => None,
    }
}

/// Whose runners and jobs a path prefix addresses: (owner id, repo id), Forgejo's `ownerID`/`repoID` of the
/// shared handlers, after the route's permission checks; or the error answer.
fn scope_of(state: &State, caller: &Caller, segments: &[&str]) -> Result<((i64, i64), usize, &'static str), Answer> {
    match segments {
        ["api", "v1", "admin", ..] => {
            if !caller.site_admin {
                return Err(error(StatusCode::FORBIDDEN, "user should be the site admin"));
            }
            Ok(((0, 0), 3, "admin"))
        }
        ["api", "v1", "orgs", org, ..] => {
            let Some((&id, _)) = state.owners.iter().find(|(_, owner)| owner.organisation && owner.name == *org) else {
                return Err(error(StatusCode::NOT_FOUND, "GetOrgByName"));
            };
            let owner = state.org_owners.get(&id).is_some_and(|owners| owners.contains(&caller.user));
            if !(owner || caller.site_admin) {
                return Err(error(StatusCode::FORBIDDEN, "must be an organization owner"));
            }
            Ok(((id, 0), 4, "organization"))
        }
        ["api", "v1", "repos", owner, repo, ..] => {
            let found = state.repos.iter().find(|(_, candidate)| {
                candidate.name == *repo && state.owners.get(&candidate.owner_id).is_some_and(|o| o.name == *owner)
            });
            let Some((&id, found)) = found else {
                return Err(error(StatusCode::NOT_FOUND, "GetRepositoryByName"));
            };
            let admin = found.owner_id == caller.user
                || state.org_owners.get(&found.owner_id).is_some_and(|owners| owners.contains(&caller.user));
            if !(admin || caller.site_admin) {
                return Err(error(StatusCode::FORBIDDEN, "reqRepoAdmin"));
            }
            Ok(((0, id), 5, "repository"))
        }
        ["api", "v1", "user", ..] => Ok(((caller.user, 0), 3, "user")),
        _ => Err(error(StatusCode::NOT_FOUND, "not found")),
    }
}

fn number(query: &[(&str, &str)], name: &str) -> Option<usize> {
    query.iter().find(|(key, _)| *key == name).and_then(|(_, value)| value.parse().ok())
}

fn route(
    state: &mut State,
    caller: &Caller,
    method: &Method,
    path: &str,
    query: &[(&str, &str)],
    body: Option<&Value>,
    base: &str,
) -> Answer {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ((owner_id, repo_id), at, category) = match scope_of(state, caller, &segments) {
        Ok(scope) => scope,
        Err(answer) => return answer,
    };
    let rest = &segments[at..];
    let needs_write = !matches!(*method, Method::GET);
    if needs_write && !caller.write {
        return error(
            StatusCode::FORBIDDEN,
            format!("token does not have at least one of required scope(s): [write:{category}]"),
        );
    }
    match (method.as_str(), rest) {
        ("GET", ["actions", "runners", "jobs"]) => {
            // Forgejo 15: no `labels` (or an empty one) lists every job; otherwise `ItRunsOn(labels)`.
            let labels: Option<Vec<String>> = query
                .iter()
                .find(|(key, _)| *key == "labels")
                .map(|(_, value)| value.trim().split(',').map(str::to_owned).collect());
            let listed: Vec<Value> = state
                .jobs
                .values()
                .filter(|job| matches!(job.status, JobStatus::Waiting | JobStatus::Running))
                .filter(|job| (owner_id == 0 || job.owner_id == owner_id) && (repo_id == 0 || job.repo_id == repo_id))
                .filter(|job| match &labels {
                    None => true,
                    Some(labels) if labels.len() == 1 && labels[0].is_empty() => job.runs_on.is_empty(),
                    Some(labels) => !job.runs_on.is_empty() && job.runs_on.iter().all(|wanted| labels.contains(wanted)),
                })
                .map(|job| job_json(job, state, base))
                .collect();
            // A nil slice when nothing is listed.
            let body = if listed.is_empty() { Value::Null } else { Value::Array(listed) };
            Answer::Json(StatusCode::OK, body, Vec::new())
        }
        ("GET", ["actions", "runners"]) => {
            let visible = query.iter().any(|(key, value)| *key == "visible" && *value == "true");
            let mut runners: Vec<&FakeRunner> = state
                .runners
                .values()
                .filter(|runner| {
                    let own = if owner_id == 0 && repo_id == 0 {
                        true
                    } else if repo_id != 0 {
                        runner.repo_id == repo_id
                    } else {
                        runner.owner_id == owner_id && runner.repo_id == 0
                    };
                    own || (visible && runner.owner_id == 0 && runner.repo_id == 0)
                })
                .collect();
            runners.sort_by_key(|runner| runner.id);
            let total = runners.len();
            let limit = number(query, "limit")
                .filter(|limit| *limit > 0)
                .unwrap_or(DEFAULT_PAGING_NUM)
                .min(state.max_response_items);
            let page = number(query, "page").unwrap_or(1).max(1);
            let listed: Vec<Value> =
                runners.iter().skip((page - 1) * limit).take(limit).map(|runner| runner_json(runner)).collect();
            let mut headers = Vec::new();
            if !state.no_total_count {
                headers.push(("x-total-count", total.to_string()));
            }
            if !state.no_link {
                let pages = total.div_ceil(limit).max(1);
                let mut links = Vec::new();
                if page < pages {
                    links.push(format!("<{base}{path}?page={}&limit={limit}>; rel=\"next\"", page + 1));
                    links.push(format!("<{base}{path}?page={pages}&limit={limit}>; rel=\"last\""));
                }
                if page > 1 {
                    links.push(format!("<{base}{path}?page=1&limit={limit}>; rel=\"first\""));
                    links.push(format!("<{base}{path}?page={}&limit={limit}>; rel=\"prev\"", page - 1));
                }
                if !links.is_empty() {
                    headers.push(("link", links.join(",")));
                }
            }
            Answer::Json(StatusCode::OK, Value::Array(listed), headers)
        }
        ("POST", ["actions", "runners"]) => {
            let name = body.and_then(|body| body.get("name")).and_then(Value::as_str).unwrap_or_default();
            if name.is_empty() {
                return error(StatusCode::UNPROCESSABLE_ENTITY, "[Name]: Required");
            }
            let description = body.and_then(|body| body.get("description")).and_then(Value::as_str).unwrap_or_default();
            let ephemeral = body.and_then(|body| body.get("ephemeral")).and_then(Value::as_bool).unwrap_or(false);
            let runner = create_runner(state, name, description, owner_id, repo_id, ephemeral);
            Answer::Json(
                StatusCode::CREATED,
                json!({ "id": runner.id, "uuid": runner.uuid, "token": runner.token }),
                Vec::new(),
            )
        }
        (_, ["actions", "runners", id]) => {
            let Ok(id) = id.parse::<i64>() else {
                return error(StatusCode::BAD_REQUEST, "invalid runner id");
            };
            // `GetVisibleRunnerByID` + `Editable`: the admin reaches every runner; a scope its own.
            let reachable = state.runners.get(&id).is_some_and(|runner| {
                (owner_id == 0 && repo_id == 0)
                    || (repo_id != 0 && runner.repo_id == repo_id)
                    || (repo_id == 0 && runner.owner_id == owner_id && runner.repo_id == 0)
            });
            if !reachable {
                return error(StatusCode::NOT_FOUND, "runner does not exist");
            }
            match method.as_str() {
                "GET" => Answer::Json(StatusCode::OK, runner_json(&state.runners[&id]), Vec::new()),
                "DELETE" => {
                    state.runners.remove(&id);
                    Answer::Empty(StatusCode::NO_CONTENT)
                }
                _ => error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            }
        }
        _ => error(StatusCode::NOT_FOUND, "not found"),
    }
}
