//! A stateful Woodpecker server fake on loopback: the queue (pending and running tasks), agent records with
//! their own tokens, the admin-token check, per-endpoint request counters and fault injection (5xx, 429 with
//! Retry-After, delays past a client's timeout, malformed JSON). Every request path and body it receives and
//! every JSON body it serves is checked against the published Swagger spec; [`FakeWoodpecker::spec_violations`]
//! lists what did not match.
//!
//! It mimics the server where ciscale depends on it: `PATCH /api/agents/{id}` overwrites `name` and
//! `no_schedule` from the body (an absent name blanks it, as the real server does), list pagination with
//! `page`/`perPage`, tokens shown to the admin.

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

/// The admin token the fake accepts.
pub const ADMIN_TOKEN: &str = "wp-admin-token-5f2c9e1d";
/// A valid token of a user who is not an admin (answered with 403 on admin endpoints).
pub const USER_TOKEN: &str = "wp-user-token-0b7a44c3";

/// A way one request fails.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// Answer with this status and a plain-text body.
    Status(u16),
    /// 429 with `Retry-After: seconds`.
    RateLimited { retry_after_secs: u64 },
    /// Wait this long before answering normally (past a client's timeout).
    Delay(Duration),
    /// Answer 200 with a body that is not JSON.
    MalformedJson,
}

#[derive(Debug, Clone)]
pub struct FakeTask {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    pub agent_id: Option<i64>,
}

#[derive(Debug, Clone)]
pub struct FakeAgent {
    pub id: i64,
    pub name: String,
    pub token: String,
    pub no_schedule: bool,
    pub last_contact: i64,
    pub last_work: i64,
    pub capacity: i64,
    pub custom_labels: BTreeMap<String, String>,
    pub created: i64,
}

/// A repository with its pipeline history (for the job-history endpoints).
#[derive(Debug, Clone)]
pub struct FakeRepo {
    pub id: i64,
    pub full_name: String,
    pub org_id: i64,
    pub active: bool,
    pub pipelines: Vec<FakePipeline>,
}

#[derive(Debug, Clone)]
pub struct FakePipeline {
    pub number: i64,
    /// Unix seconds, as the server keeps them.
    pub created: i64,
    /// When it was approved; 0: it needed no approval.
    pub reviewed: i64,
    pub workflows: Vec<FakeWorkflow>,
    /// Workflow files: (path, YAML).
    pub configs: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct FakeWorkflow {
    pub name: String,
    /// 0: never.
    pub started: i64,
    pub finished: i64,
}

#[derive(Default)]
struct State {
    repos: Vec<FakeRepo>,
    agents: BTreeMap<i64, FakeAgent>,
    next_agent: i64,
    next_task: u64,
    pending: Vec<FakeTask>,
    running: Vec<FakeTask>,
    traffic: Traffic<Fault>,
}

/// The running fake. Dropping it stops the server.
pub struct FakeWoodpecker {
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

impl FakeWoodpecker {
    /// Starts the fake on `127.0.0.1:0` in a thread of its own (usable from sync and async tests alike).
    pub fn start() -> FakeWoodpecker {
        let spec = Spec::load("woodpecker-swagger.json");
        let state = Arc::new(Mutex::new(State { next_agent: 1, next_task: 1, ..State::default() }));
        let shared = Arc::new(Shared { state: state.clone(), spec });
        let (addr, server) =
            ServerThread::start(move |method, uri, headers, body| handle(shared.clone(), method, uri, headers, body));
        FakeWoodpecker { addr, state, _server: server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // -- test helpers ----------------------------------------------------------------------------------------

    /// Queues a pending task with these labels (plus the `repo`/`org-id` the server puts on every task).
    pub fn add_task(&self, labels: &[(&str, &str)]) -> String {
        let mut state = self.state();
        let id = state.next_task.to_string();
        state.next_task += 1;
        let mut all: BTreeMap<String, String> =
            BTreeMap::from([("repo".to_owned(), "acme/app".to_owned()), ("org-id".to_owned(), "1".to_owned())]);
        all.extend(labels.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())));
        state.pending.push(FakeTask { id: id.clone(), labels: all, agent_id: None });
        id
    }

    /// Adds an active repository; returns its id.
    pub fn add_repo(&self, full_name: &str, org_id: i64) -> i64 {
        let mut state = self.state();
        let id = 100 + state.repos.len() as i64;
        state.repos.push(FakeRepo { id, full_name: full_name.to_owned(), org_id, active: true, pipelines: Vec::new() });
        id
    }

    /// Adds a pipeline that ran (its workflows' times and its workflow files); returns its number.
    pub fn add_pipeline(
        &self,
        repo_id: i64,
        created: i64,
        workflows: &[(&str, i64, i64)],
        configs: &[(&str, &str)],
    ) -> i64 {
        self.add_pipeline_reviewed(repo_id, created, 0, workflows, configs)
    }

    pub fn add_pipeline_reviewed(
        &self,
        repo_id: i64,
        created: i64,
        reviewed: i64,
        workflows: &[(&str, i64, i64)],
        configs: &[(&str, &str)],
    ) -> i64 {
        let mut state = self.state();
        let repo = state.repos.iter_mut().find(|repo| repo.id == repo_id).expect("known repo");
        let number = repo.pipelines.len() as i64 + 1;
        repo.pipelines.push(FakePipeline {
            number,
            created,
            reviewed,
            workflows: workflows
                .iter()
                .map(|(name, started, finished)| FakeWorkflow {
                    name: (*name).to_owned(),
                    started: *started,
                    finished: *finished,
                })
                .collect(),
            configs: configs.iter().map(|(name, yaml)| ((*name).to_owned(), (*yaml).to_owned())).collect(),
        });
        number
    }

    /// Moves a pending task to running on `agent_id`; the agent has just been in contact.
    pub fn start_task(&self, task_id: &str, agent_id: i64) {
        let mut state = self.state();
        let index = state.pending.iter().position(|task| task.id == task_id).expect("pending task");
        let mut task = state.pending.remove(index);
        task.agent_id = Some(agent_id);
        state.running.push(task);
        let agent = state.agents.get_mut(&agent_id).expect("agent");
        agent.last_contact = now();
        agent.last_work = now();
    }

    /// Finishes a running task: gone from the queue, its agent's `last_work` is now.
    pub fn finish_task(&self, task_id: &str) {
        let mut state = self.state();
        let index = state.running.iter().position(|task| task.id == task_id).expect("running task");
        let task = state.running.remove(index);
        if let Some(agent) = task.agent_id.and_then(|id| state.agents.get_mut(&id)) {
            agent.last_work = now();
            agent.last_contact = now();
        }
    }

    pub fn set_agent_times(&self, agent_id: i64, last_contact: i64, last_work: i64) {
        let mut state = self.state();
        let agent = state.agents.get_mut(&agent_id).expect("agent");
        agent.last_contact = last_contact;
        agent.last_work = last_work;
    }

    /// Registers an agent directly (as an admin would in the UI); returns its id.
    pub fn add_agent(&self, name: &str) -> i64 {
        let mut state = self.state();
        create_agent(&mut state, name, false).id
    }

    pub fn agents(&self) -> Vec<FakeAgent> {
        self.state().agents.values().cloned().collect()
    }

    pub fn agent_by_name(&self, name: &str) -> Option<FakeAgent> {
        self.state().agents.values().find(|agent| agent.name == name).cloned()
    }

    pub fn pending(&self) -> Vec<FakeTask> {
        self.state().pending.clone()
    }

    pub fn running(&self) -> Vec<FakeTask> {
        self.state().running.clone()
    }

    traffic_methods!(Fault);
}

fn create_agent(state: &mut State, name: &str, no_schedule: bool) -> FakeAgent {
    let id = state.next_agent;
    state.next_agent += 1;
    let agent = FakeAgent {
        id,
        name: name.to_owned(),
        // Distinct per agent and recognisable in a leak check.
        token: format!("wp-agent-token-{id}-{:08x}", (id as u64).wrapping_mul(0x9e37_79b9) & 0xffff_ffff),
        no_schedule,
        last_contact: 0,
        last_work: 0,
        capacity: 0,
        custom_labels: BTreeMap::new(),
        created: now(),
    };
    state.agents.insert(id, agent.clone());
    agent
}

fn agent_json(agent: &FakeAgent) -> Value {
    json!({
        "id": agent.id,
        "name": agent.name,
        "token": agent.token,
        "created": agent.created,
        "updated": agent.created,
        "last_contact": agent.last_contact,
        "last_work": agent.last_work,
        "no_schedule": agent.no_schedule,
        "capacity": agent.capacity,
        "platform": if agent.last_contact > 0 { "linux/amd64" } else { "" },
        "backend": if agent.last_contact > 0 { "docker" } else { "" },
        "version": "",
        "org_id": -1,
        "owner_id": 1,
        "custom_labels": agent.custom_labels,
    })
}

fn task_json(task: &FakeTask, state: &State) -> Value {
    let mut value = json!({
        "id": task.id,
        "labels": task.labels,
        "dependencies": [],
        "dep_status": {},
        "run_on": [],
        "pid": 0,
        "pipeline_id": 1,
        "repo_id": 1,
        "name": "build",
    });
    if let Some(agent_id) = task.agent_id {
        value["agent_id"] = json!(agent_id);
        value["agent_name"] = json!(state.agents.get(&agent_id).map(|agent| agent.name.clone()).unwrap_or_default());
    }
    value
}

fn text(status: StatusCode, body: &str) -> Response {
    (status, [("content-type", "text/plain; charset=utf-8")], body.to_owned()).into_response()
}

fn json_response(body: &Value) -> Response {
    (StatusCode::OK, [("content-type", "application/json")], body.to_string()).into_response()
}

/// The counter key of a request: `GET /api/agents/{agent_id}`, `GET /api/repos/{repo_id}/pipelines/{number}`.
fn endpoint_key(method: &Method, path: &str) -> String {
    let segments: Vec<&str> = path.split('/').collect();
    let templated: Vec<String> = segments
        .iter()
        .enumerate()
        .map(|(index, segment)| {
            if segment.parse::<i64>().is_err() {
                return (*segment).to_owned();
            }
            match index.checked_sub(1).and_then(|previous| segments.get(previous)) {
                Some(&"repos") => "{repo_id}".to_owned(),
                Some(&"pipelines") => "{number}".to_owned(),
                _ => "{agent_id}".to_owned(),
            }
        })
        .collect();
    format!("{method} {}", templated.join("/"))
}

fn repo_json(repo: &FakeRepo) -> Value {
    let (owner, name) = repo.full_name.split_once('/').unwrap_or(("", repo.full_name.as_str()));
    json!({
        "id": repo.id,
        "forge_id": 1,
        "forge_remote_id": format!("{}", repo.id * 7),
        "org_id": repo.org_id,
        "owner": owner,
        "name": name,
        "full_name": repo.full_name,
        "avatar_url": "",
        "forge_url": format!("https://git.example.com/{}", repo.full_name),
        "clone_url": format!("https://git.example.com/{}.git", repo.full_name),
        "default_branch": "main",
        "pr_enabled": true,
        "timeout": 60,
        "visibility": "private",
        "private": true,
        "active": repo.active,
        "allow_pr": true,
        "allow_deploy": false,
        "config_file": "",
    })
}

/// A pipeline as the server sends it; the list leaves the workflows out.
fn pipeline_json(pipeline: &FakePipeline, with_workflows: bool) -> Value {
    let started = pipeline.workflows.iter().map(|w| w.started).filter(|t| *t > 0).min().unwrap_or(0);
    let finished = pipeline.workflows.iter().map(|w| w.finished).max().unwrap_or(0);
    let mut value = json!({
        "id": pipeline.number * 10,
        "number": pipeline.number,
        "author": "dev",
        "parent": 0,
        "event": "push",
        "status": if finished > 0 { "success" } else { "running" },
        "errors": [],
        "created": pipeline.created,
        "updated": finished.max(pipeline.created),
        "started": started,
        "finished": finished,
        "reviewed": pipeline.reviewed,
        "reviewed_by": if pipeline.reviewed > 0 { "maintainer" } else { "" },
        "deploy_to": "",
        "commit": "0123456789abcdef",
        "branch": "main",
        "ref": "refs/heads/main",
        "refspec": "",
        "title": "",
        "message": "change",
        "timestamp": pipeline.created,
        "sender": "dev",
        "forge_url": "",
        "author_avatar": "",
        "author_email": "dev@example.com",
        "changed_files": [],
    });
    if with_workflows {
        value["workflows"] = Value::Array(
            pipeline
                .workflows
                .iter()
                .enumerate()
                .map(|(index, workflow)| {
                    json!({
                        "id": pipeline.number * 100 + index as i64,
                        "pipeline_id": pipeline.number * 10,
                        "pid": index as i64 + 1,
                        "name": workflow.name,
                        "state": if workflow.finished > 0 { "success" } else if workflow.started > 0 { "running" } else { "pending" },
                        "started": workflow.started,
                        "finished": workflow.finished,
                        "agent_id": 1,
                        "platform": "linux/amd64",
                        "environ": {},
                        "children": [],
                    })
                })
                .collect(),
        );
    }
    value
}

fn query_text(query: &str, name: &str) -> Option<String> {
    url_pairs(query).into_iter().find(|(key, _)| key == name).map(|(_, value)| value)
}

async fn handle(shared: Arc<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let key = endpoint_key(&method, &path);
    let request_body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(value) => value,
            Err(error) => {
                let mut state = shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                state.traffic.violation(format!("{key}: request body is not JSON: {error}"));
                return text(StatusCode::BAD_REQUEST, "bad body");
            }
        }
    };

    let fault = {
        let mut state = shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let fault = state.traffic.arrive(&key);
        let query_pairs = url_pairs(uri.query().unwrap_or(""));
        let query: Vec<(&str, &str)> = query_pairs.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect();
        let body = (!request_body.is_null()).then_some(&request_body);
        if let Err(problem) = shared.spec.check_request(method.as_str(), &path, &query, body) {
            state.traffic.violation(problem);
        }
        fault
    };
    match fault {
        Some(Fault::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return text(status, "injected failure");
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", retry_after_secs.to_string())], "slow down")
                .into_response();
        }
        Some(Fault::MalformedJson) => {
            return (StatusCode::OK, [("content-type", "application/json")], "{\"pending\": [tru").into_response();
        }
        Some(Fault::Delay(delay)) => tokio::time::sleep(delay).await,
        None => {}
    }

    let authorization = headers.get("authorization").and_then(|value| value.to_str().ok()).unwrap_or_default();
    match authorization.strip_prefix("Bearer ") {
        Some(ADMIN_TOKEN) => {}
        Some(USER_TOKEN) => return text(StatusCode::FORBIDDEN, "access denied"),
        _ => return text(StatusCode::UNAUTHORIZED, "not authorized"),
    }

    let mut state = shared.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(raw) = state.traffic.take_raw(&key) {
        return (StatusCode::OK, [("content-type", "application/json")], raw.to_string()).into_response();
    }
    let answer = route(&mut state, &method, &path, uri.query().unwrap_or(""), &request_body);
    match answer {
        Answer::Json(value) => {
            if let Err(problem) = shared.spec.check_response(method.as_str(), &path, 200, Some(&value)) {
                state.traffic.violation(problem);
            }
            json_response(&value)
        }
        Answer::Empty => {
            if let Err(problem) = shared.spec.check_response(method.as_str(), &path, 200, None) {
                state.traffic.violation(problem);
            }
            text(StatusCode::OK, "")
        }
        Answer::Error(status, message) => text(status, message),
    }
}

enum Answer {
    Json(Value),
    Empty,
    Error(StatusCode, &'static str),
}

fn query_number(query: &str, name: &str, default: usize) -> usize {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(key, _)| *key == name)
        .and_then(|(_, value)| value.parse().ok())
        .unwrap_or(default)
}

fn route(state: &mut State, method: &Method, path: &str, query: &str, body: &Value) -> Answer {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "queue", "info"]) => {
            let pending: Vec<Value> = state.pending.iter().map(|task| task_json(task, state)).collect();
            let running: Vec<Value> = state.running.iter().map(|task| task_json(task, state)).collect();
            Answer::Json(json!({
                "pending": pending,
                "waiting_on_deps": [],
                "running": running,
                "stats": {
                    "worker_count": state.agents.len(),
                    "pending_count": state.pending.len(),
                    "waiting_on_deps_count": 0,
                    "running_count": state.running.len(),
                },
                "paused": false,
            }))
        }
        ("GET", ["api", "agents"]) => {
            // The real server caps `perPage`; 50 is its default.
            let per_page = query_number(query, "perPage", 50).clamp(1, 50);
            let page = query_number(query, "page", 1).max(1);
            let agents: Vec<Value> =
                state.agents.values().skip((page - 1) * per_page).take(per_page).map(agent_json).collect();
            Answer::Json(Value::Array(agents))
        }
        ("POST", ["api", "agents"]) => {
            let name = body.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
            let no_schedule = body.get("no_schedule").and_then(Value::as_bool).unwrap_or(false);
            let agent = create_agent(state, &name, no_schedule);
            Answer::Json(agent_json(&agent))
        }
        (_, ["api", "agents", id]) => {
            let Ok(id) = id.parse::<i64>() else {
                return Answer::Error(StatusCode::BAD_REQUEST, "bad id");
            };
            match method.as_str() {
                "GET" => match state.agents.get(&id) {
                    Some(agent) => Answer::Json(agent_json(agent)),
                    None => Answer::Error(StatusCode::NOT_FOUND, "agent not found"),
                },
                "PATCH" => match state.agents.get_mut(&id) {
                    Some(agent) => {
                        // As the server does: both fields are taken from the body, present or not.
                        agent.name = body.get("name").and_then(Value::as_str).unwrap_or_default().to_owned();
                        agent.no_schedule = body.get("no_schedule").and_then(Value::as_bool).unwrap_or(false);
                        Answer::Json(agent_json(agent))
                    }
                    None => Answer::Error(StatusCode::NOT_FOUND, "agent not found"),
                },
                "DELETE" => match state.agents.remove(&id) {
                    Some(_) => Answer::Empty,
                    None => Answer::Error(StatusCode::NOT_FOUND, "agent not found"),
                },
                _ => Answer::Error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
            }
        }
        ("GET", ["api", "agents", id, "tasks"]) => {
            let id = id.parse::<i64>().unwrap_or(-1);
            let tasks: Vec<Value> = state
                .running
                .iter()
                .filter(|task| task.agent_id == Some(id))
                .map(|task| task_json(task, state))
                .collect();
            Answer::Json(Value::Array(tasks))
        }
        ("GET", ["api", "repos"]) => {
            let per_page = query_number(query, "perPage", 50).clamp(1, 50);
            let page = query_number(query, "page", 1).max(1);
            let only_active = query_text(query, "active").is_some_and(|value| value == "true");
            let repos: Vec<Value> = state
                .repos
                .iter()
                .filter(|repo| !only_active || repo.active)
                .skip((page - 1) * per_page)
                .take(per_page)
                .map(repo_json)
                .collect();
            Answer::Json(Value::Array(repos))
        }
        ("GET", ["api", "repos", repo_id, "pipelines", rest @ ..]) => {
            let Some(repo) = repo_id.parse::<i64>().ok().and_then(|id| state.repos.iter().find(|repo| repo.id == id))
            else {
                return Answer::Error(StatusCode::NOT_FOUND, "repo not found");
            };
            match rest {
                [] => {
                    // Newest first; `after`/`before` bound `created` (RFC 3339), as the server's store does.
                    let bound = |name: &str| {
                        query_text(query, name)
                            .and_then(|text| text.parse::<jiff::Timestamp>().ok())
                            .map(|at| at.as_second())
                    };
                    let (after, before) = (bound("after"), bound("before"));
                    let per_page = query_number(query, "perPage", 50).clamp(1, 50);
                    let page = query_number(query, "page", 1).max(1);
                    let pipelines: Vec<Value> = repo
                        .pipelines
                        .iter()
                        .rev()
                        .filter(|p| {
                            after.is_none_or(|after| p.created > after)
                                && before.is_none_or(|before| p.created < before)
                        })
                        .skip((page - 1) * per_page)
                        .take(per_page)
                        .map(|pipeline| pipeline_json(pipeline, false))
                        .collect();
                    Answer::Json(Value::Array(pipelines))
                }
                [number] | [number, "config"] => {
                    let Some(pipeline) =
                        number.parse::<i64>().ok().and_then(|n| repo.pipelines.iter().find(|p| p.number == n))
                    else {
                        return Answer::Error(StatusCode::NOT_FOUND, "pipeline not found");
                    };
                    if rest.len() == 1 {
                        return Answer::Json(pipeline_json(pipeline, true));
                    }
                    // The spec types `data` as an array of integers (the bytes); the real server sends Go's
                    // base64 text (tested with `serve_raw_once`).
                    let configs: Vec<Value> = pipeline
                        .configs
                        .iter()
                        .map(|(name, yaml)| json!({ "name": name, "hash": format!("{:x}", yaml.len()), "data": yaml.as_bytes() }))
                        .collect();
                    Answer::Json(Value::Array(configs))
                }
                _ => Answer::Error(StatusCode::NOT_FOUND, "404 page not found"),
            }
        }
        _ => Answer::Error(StatusCode::NOT_FOUND, "404 page not found"),
    }
}
