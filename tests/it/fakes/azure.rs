//! A stateful, in-process Azure DevOps `distributedtask` fake: agent pools, agents, job requests, PATCH/DELETE
//! of agents, Basic-auth with a PAT, call counters, every exchange recorded (for the spec check in
//! `openapi_azure.rs`) and fault injection (5xx, 429 with `Retry-After`, malformed JSON, sign-in pages, hangs).
//!
//! It runs on 127.0.0.1:<free port> on a thread of its own (with its own runtime), so sync tests that drive the
//! `ciscale` binary and async tests that drive the client use it alike. Its helpers play what the real service
//! and the agents do: [`AzureFake::agent_online`] is an agent that ran `config.sh --replace` and connected,
//! [`AzureFake::add_request`] a queued job, [`AzureFake::take_next`]/[`AzureFake::finish`] an agent running it.
//!
//! Wire shapes follow what Azure sends: lists wrapped as `{"count": N, "value": [...]}`; `jobrequests` (not in
//! the spec) lists recent requests, finished ones included, with `result: null` on unfinished ones and `demands`
//! as strings; `null` fields are left out elsewhere.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{json, Value};

use super::query::url_pairs;
use super::server::ServerThread;

/// The organization name in the fake's URLs (`http://127.0.0.1:PORT/fakeorg`).
pub const ORGANIZATION: &str = "fakeorg";
pub const AGENT_VERSION: &str = "4.248.0";

/// Which endpoint a call hit (counters and faults are per route).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Route {
    /// `GET pools?poolName=`
    Pools,
    /// `GET pools/{id}/agents`
    Agents,
    /// `GET|PATCH|DELETE pools/{id}/agents/{agentId}`
    Agent,
    /// `GET pools/{id}/jobrequests`
    JobRequests,
    /// Anything else (answered 404).
    Unknown,
}

/// What an injected fault answers instead of the real response.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// That status with an Azure-style JSON error body.
    Status(u16),
    /// 429 with `Retry-After: secs` and the `X-RateLimit-*` headers.
    RateLimited { retry_after_secs: u64 },
    /// 200 with a body that is not JSON.
    Malformed,
    /// 203 with an HTML sign-in page, as Azure answers a bad PAT.
    SignInPage,
    /// Waits this long before answering normally (client timeouts).
    Hang(Duration),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// `None`: any route.
    pub route: Option<Route>,
    pub kind: FaultKind,
    /// How many calls it fails.
    pub times: u32,
}

impl Fault {
    pub fn on(route: Route, kind: FaultKind, times: u32) -> Self {
        Self { route: Some(route), kind, times }
    }
}

/// How a bad PAT is answered (Azure does both, depending on the endpoint and client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadAuth {
    Unauthorized401,
    SignInPage203,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FakePool {
    pub id: u32,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FakeAgent {
    pub id: u32,
    pub pool_id: u32,
    pub name: String,
    pub enabled: bool,
    pub online: bool,
    pub capabilities: BTreeMap<String, String>,
    pub created_on: Timestamp,
    pub status_changed_on: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FakeRequest {
    pub id: u64,
    pub pool_id: u32,
    pub demands: Vec<String>,
    pub queue_time: Timestamp,
    pub assign_time: Option<Timestamp>,
    pub reserved_agent: Option<u32>,
    pub finish_time: Option<Timestamp>,
    pub result: Option<String>,
}

impl FakeRequest {
    pub fn is_unfinished(&self) -> bool {
        self.result.is_none()
    }
}

/// One request/response pair, as the spec check reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Exchange {
    pub method: String,
    /// Path without the query, e.g. `/fakeorg/_apis/distributedtask/pools/1/agents`.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub request_body: Option<Value>,
    pub status: u16,
    pub response_body: Option<Value>,
    pub route: Route,
}

impl<'a> From<&'a Exchange> for super::spec::Exchange<'a> {
    fn from(exchange: &'a Exchange) -> Self {
        super::spec::Exchange {
            method: &exchange.method,
            path: &exchange.path,
            request: Some(super::spec::Request {
                query: exchange.query.iter().map(|(key, value)| (key.as_str(), value.as_str())).collect(),
                body: exchange.request_body.as_ref(),
            }),
            response: Some(super::spec::Response { status: exchange.status, body: exchange.response_body.as_ref() }),
        }
    }
}

/// The published Azure DevOps task-agent spec, with the service's quirks: every list answer is wrapped as
/// `{count, value}`, and error answers are not documented.
pub fn azure_spec() -> super::spec::Spec {
    super::spec::Spec::load("ado-taskAgent-7.1.json").lists_wrapped_in_count_value().errors_undocumented()
}

#[derive(Debug)]
struct State {
    pat: String,
    bad_auth: BadAuth,
    pools: Vec<FakePool>,
    agents: Vec<FakeAgent>,
    requests: Vec<FakeRequest>,
    next_pool: u32,
    next_agent: u32,
    next_request: u64,
    calls: BTreeMap<Route, u64>,
    faults: VecDeque<Fault>,
    exchanges: Vec<Exchange>,
    /// `X-RateLimit-Remaining`/`-Limit` sent on successful answers, when set.
    rate_limit_headers: Option<(u32, u32)>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The running fake. Dropping it stops the server.
pub struct AzureFake {
    addr: SocketAddr,
    state: Shared,
    _server: ServerThread,
}

/// Now, at Azure's precision (100 ns), so what the wire says equals what the fake holds.
fn azure_now() -> Timestamp {
    let now = Timestamp::now().as_nanosecond();
    Timestamp::from_nanosecond(now - now.rem_euclid(100)).unwrap_or(Timestamp::UNIX_EPOCH)
}

/// Azure's own format: RFC 3339 UTC with 7 fractional digits.
fn azure_time(at: Timestamp) -> String {
    format!("{:.7}", at).replace("+00:00", "Z")
}

impl AzureFake {
    /// Starts a fake that accepts `pat` (Basic auth, any user name).
    pub fn start(pat: &str) -> Self {
        let state: Shared = Arc::new(Mutex::new(State {
            pat: pat.to_owned(),
            bad_auth: BadAuth::Unauthorized401,
            pools: Vec::new(),
            agents: Vec::new(),
            requests: Vec::new(),
            next_pool: 0,
            next_agent: 0,
            next_request: 100,
            calls: BTreeMap::new(),
            faults: VecDeque::new(),
            exchanges: Vec::new(),
            rate_limit_headers: None,
        }));
        let served = state.clone();
        let (addr, server) =
            ServerThread::start(move |method, uri, headers, body| handle(served.clone(), method, uri, headers, body));
        Self { addr, state, _server: server }
    }

    /// The organization URL a client is configured with.
    pub fn org_url(&self) -> String {
        format!("http://{}/{ORGANIZATION}", self.addr)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    pub fn add_pool(&self, name: &str) -> u32 {
        let mut state = self.state();
        state.next_pool += 1;
        let id = state.next_pool;
        state.pools.push(FakePool { id, name: name.to_owned() });
        id
    }

    fn pool_id(state: &State, name: &str) -> u32 {
        state
            .pools
            .iter()
            .find(|pool| pool.name.eq_ignore_ascii_case(name))
            .map(|pool| pool.id)
            .unwrap_or_else(|| panic!("the fake has no pool `{name}`"))
    }

    /// An agent ran `config.sh --pool POOL --agent NAME --replace` and connected: an agent of that name in the
    /// pool keeps its id (that is what `--replace` does), otherwise a new record is made. Returns its id.
    pub fn agent_online(&self, pool: &str, name: &str) -> u32 {
        self.agent_online_with(pool, name, BTreeMap::new())
    }

    pub fn agent_online_with(&self, pool: &str, name: &str, capabilities: BTreeMap<String, String>) -> u32 {
        let mut state = self.state();
        let pool_id = Self::pool_id(&state, pool);
        let now = azure_now();
        if let Some(agent) =
            state.agents.iter_mut().find(|agent| agent.pool_id == pool_id && agent.name.eq_ignore_ascii_case(name))
        {
            agent.online = true;
            agent.enabled = true;
            agent.capabilities = capabilities;
            agent.status_changed_on = now;
            return agent.id;
        }
        state.next_agent += 1;
        let id = state.next_agent;
        state.agents.push(FakeAgent {
            id,
            pool_id,
            name: name.to_owned(),
            enabled: true,
            online: true,
            capabilities,
            created_on: now,
            status_changed_on: now,
        });
        id
    }

    /// The agent process went away (`run.sh --once` ended, the container powered off); its record stays.
    pub fn agent_offline(&self, id: u32) {
        let mut state = self.state();
        if let Some(agent) = state.agents.iter_mut().find(|agent| agent.id == id) {
            agent.online = false;
            agent.status_changed_on = azure_now();
        }
    }

    pub fn agents(&self) -> Vec<FakeAgent> {
        self.state().agents.clone()
    }

    pub fn agent_named(&self, name: &str) -> Option<FakeAgent> {
        self.state().agents.iter().find(|agent| agent.name == name).cloned()
    }

    pub fn requests(&self) -> Vec<FakeRequest> {
        self.state().requests.clone()
    }

    /// Queues a job request in `pool` with these demands. Returns its id.
    pub fn add_request(&self, pool: &str, demands: &[&str]) -> u64 {
        let mut state = self.state();
        let pool_id = Self::pool_id(&state, pool);
        state.next_request += 1;
        let id = state.next_request;
        state.requests.push(FakeRequest {
            id,
            pool_id,
            demands: demands.iter().map(|demand| (*demand).to_owned()).collect(),
            queue_time: azure_now(),
            assign_time: None,
            reserved_agent: None,
            finish_time: None,
            result: None,
        });
        id
    }

    /// A request that has run already (history): queued, received by an agent, finished at these times.
    pub fn add_past_request(
        &self,
        pool: &str,
        demands: &[&str],
        queue_time: Timestamp,
        assign_time: Option<Timestamp>,
        finish_time: Option<Timestamp>,
        result: &str,
    ) -> u64 {
        let mut state = self.state();
        let pool_id = Self::pool_id(&state, pool);
        state.next_request += 1;
        let id = state.next_request;
        state.requests.push(FakeRequest {
            id,
            pool_id,
            demands: demands.iter().map(|demand| (*demand).to_owned()).collect(),
            queue_time,
            assign_time,
            reserved_agent: None,
            finish_time,
            result: finish_time.map(|_| result.to_owned()),
        });
        id
    }

    /// Assigns a request to an agent, as the service does when the agent asks for work.
    pub fn assign(&self, request: u64, agent: u32) {
        let mut state = self.state();
        let found = state.requests.iter_mut().find(|candidate| candidate.id == request).expect("known request");
        found.reserved_agent = Some(agent);
        found.assign_time = Some(azure_now());
    }

    /// The agent asks for work: the oldest pending request of its pool whose demands it meets (by its
    /// capabilities, Azure's rule) goes to it, if it is online, enabled and free.
    pub fn take_next(&self, agent: u32) -> Option<u64> {
        let mut state = self.state();
        let taker = state.agents.iter().find(|candidate| candidate.id == agent)?.clone();
        let busy =
            state.requests.iter().any(|request| request.is_unfinished() && request.reserved_agent == Some(agent));
        if busy || !taker.online || !taker.enabled {
            return None;
        }
        let request = state.requests.iter_mut().find(|request| {
            request.is_unfinished()
                && request.reserved_agent.is_none()
                && request.pool_id == taker.pool_id
                && ciscale::plan::matching::azure_matches(&taker.capabilities, &request.demands)
        })?;
        request.reserved_agent = Some(agent);
        request.assign_time = Some(azure_now());
        Some(request.id)
    }

    /// The job ran: the request gets its result and finish time.
    pub fn finish(&self, request: u64, result: &str) {
        let mut state = self.state();
        let found = state.requests.iter_mut().find(|candidate| candidate.id == request).expect("known request");
        found.result = Some(result.to_owned());
        found.finish_time = Some(azure_now());
    }

    pub fn inject(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    pub fn set_bad_auth(&self, style: BadAuth) {
        self.state().bad_auth = style;
    }

    /// Sends `X-RateLimit-Remaining: remaining` and `X-RateLimit-Limit: limit` on successful answers.
    pub fn set_rate_limit_headers(&self, remaining: u32, limit: u32) {
        self.state().rate_limit_headers = Some((remaining, limit));
    }

    /// Calls of one route so far, failed ones included (what Azure counts against its limits).
    pub fn calls(&self, route: Route) -> u64 {
        self.state().calls.get(&route).copied().unwrap_or(0)
    }

    pub fn total_calls(&self) -> u64 {
        self.state().calls.values().sum()
    }

    pub fn reset_calls(&self) {
        self.state().calls.clear();
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.state().exchanges.clone()
    }
}

// -------------------------------------------------------------------------------------------------------------
// The server side
// -------------------------------------------------------------------------------------------------------------

/// `base64(":" + pat)`, the Basic credentials a client with an empty user name sends.
fn basic_credentials(pat: &str) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let input = format!(":{pat}").into_bytes();
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let bytes = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(bytes[0]) << 16) | (u32::from(bytes[1]) << 8) | u32::from(bytes[2]);
        for (index, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if index <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Splits a request path into its route and ids; `None` for the organization or API prefix being wrong.
fn route_of(path: &str) -> (Route, Option<u32>, Option<String>) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let prefix = [ORGANIZATION, "_apis", "distributedtask", "pools"];
    if segments.len() < 4 || segments[..4] != prefix {
        return (Route::Unknown, None, None);
    }
    let pool = segments.get(4).and_then(|id| id.parse().ok());
    match &segments[4..] {
        [] => (Route::Pools, None, None),
        [_, "agents"] if pool.is_some() => (Route::Agents, pool, None),
        [_, "agents", agent] if pool.is_some() => (Route::Agent, pool, Some((*agent).to_owned())),
        [_, "jobrequests"] if pool.is_some() => (Route::JobRequests, pool, None),
        _ => (Route::Unknown, None, None),
    }
}

fn azure_error(status: StatusCode, type_key: &str, message: &str) -> (StatusCode, Value) {
    let body = json!({
        "$id": "1",
        "innerException": null,
        "message": message,
        "typeName": format!("Microsoft.TeamFoundation.DistributedTask.WebApi.{type_key}, Microsoft.TeamFoundation.DistributedTask.WebApi"),
        "typeKey": type_key,
        "errorCode": 0,
        "eventId": 3000
    });
    (status, body)
}

fn list(values: Vec<Value>) -> Value {
    json!({ "count": values.len(), "value": values })
}

fn pool_json(pool: &FakePool, size: usize) -> Value {
    json!({
        "id": pool.id,
        "name": pool.name,
        "isHosted": false,
        "isLegacy": false,
        "poolType": "automation",
        "size": size,
        "options": "none",
        "autoProvision": false,
        "autoUpdate": true,
        "autoSize": true,
        "createdOn": "2024-01-01T00:00:00.0000000Z",
        "scope": "00000000-0000-0000-0000-000000000001"
    })
}

/// A request as the `agents` list embeds it (spec-typed: no `null` result, no demands).
fn embedded_request_json(request: &FakeRequest, pool_id: u32) -> Value {
    let mut value = json!({
        "requestId": request.id,
        "queueTime": azure_time(request.queue_time),
        "serviceOwner": "00025394-6065-48ca-87d9-7f5672854ef7",
        "hostId": "00000000-0000-0000-0000-000000000002",
        "scopeId": "00000000-0000-0000-0000-000000000003",
        "planType": "Build",
        "planId": "00000000-0000-0000-0000-000000000004",
        "jobId": "00000000-0000-0000-0000-000000000005",
        "poolId": pool_id,
    });
    if let Some(at) = request.assign_time {
        value["assignTime"] = json!(azure_time(at));
        value["receiveTime"] = json!(azure_time(at));
    }
    if let Some(at) = request.finish_time {
        value["finishTime"] = json!(azure_time(at));
    }
    if let Some(result) = &request.result {
        value["result"] = json!(result);
    }
    value
}

fn agent_ref_json(agent: &FakeAgent) -> Value {
    json!({
        "id": agent.id,
        "name": agent.name,
        "version": AGENT_VERSION,
        "enabled": agent.enabled,
        "status": if agent.online { "online" } else { "offline" },
        "osDescription": "Linux 6.1.0 #1 SMP",
        "provisioningState": "Provisioned",
        "accessPoint": "CodexAccessMapping"
    })
}

fn agent_json(state: &State, agent: &FakeAgent, assigned: bool, last_completed: bool) -> Value {
    let mut value = agent_ref_json(agent);
    value["createdOn"] = json!(azure_time(agent.created_on));
    value["statusChangedOn"] = json!(azure_time(agent.status_changed_on));
    value["maxParallelism"] = json!(1);
    let of_agent = || state.requests.iter().filter(move |request| request.reserved_agent == Some(agent.id));
    if assigned {
        if let Some(request) = of_agent().find(|request| request.is_unfinished()) {
            value["assignedRequest"] = embedded_request_json(request, agent.pool_id);
        }
    }
    if last_completed {
        if let Some(request) =
            of_agent().filter(|request| !request.is_unfinished()).max_by_key(|request| request.finish_time)
        {
            value["lastCompletedRequest"] = embedded_request_json(request, agent.pool_id);
        }
    }
    value
}

/// A request as `jobrequests` lists it: `result: null` while unfinished, demands as strings, matched agents.
fn job_request_json(state: &State, request: &FakeRequest) -> Value {
    let mut value = embedded_request_json(request, request.pool_id);
    value["result"] = request.result.as_ref().map_or(Value::Null, |result| json!(result));
    value["demands"] = json!(request.demands);
    let matched: Vec<Value> = state
        .agents
        .iter()
        .filter(|agent| agent.pool_id == request.pool_id)
        .filter(|agent| ciscale::plan::matching::azure_matches(&agent.capabilities, &request.demands))
        .map(agent_ref_json)
        .collect();
    value["matchesAllAgentsInPool"] = json!(request.demands.is_empty());
    value["matchedAgents"] = json!(matched);
    if let Some(agent) = request.reserved_agent.and_then(|id| state.agents.iter().find(|agent| agent.id == id)) {
        value["reservedAgent"] = agent_ref_json(agent);
    }
    value
}

async fn handle(shared: Shared, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().to_owned();
    let query: Vec<(String, String)> = uri.query().map(url_pairs).unwrap_or_default();
    let (route, pool_id, agent_id) = route_of(&path);
    let request_body: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(&body).ok() };

    // Count, authenticate, pick a fault: under the lock, then let go before any waiting.
    let (fault, bad_auth) = {
        let mut state = lock(&shared);
        *state.calls.entry(route).or_default() += 1;
        let expected = format!("Basic {}", basic_credentials(&state.pat));
        let authorised = headers.get("authorization").and_then(|value| value.to_str().ok()) == Some(expected.as_str());
        let fault = if authorised {
            let index = state.faults.iter().position(|fault| fault.route.is_none_or(|wanted| wanted == route));
            index.and_then(|index| {
                let fault = state.faults.get_mut(index)?;
                fault.times = fault.times.saturating_sub(1);
                let kind = fault.kind.clone();
                if fault.times == 0 {
                    state.faults.remove(index);
                }
                Some(kind)
            })
        } else {
            None
        };
        (fault, (!authorised).then_some(state.bad_auth))
    };

    if let Some(style) = bad_auth {
        return match style {
            BadAuth::Unauthorized401 => {
                let mut response = (StatusCode::UNAUTHORIZED, "").into_response();
                response.headers_mut().insert("www-authenticate", HeaderValue::from_static("Basic realm=\"\""));
                response
            }
            BadAuth::SignInPage203 => sign_in_page(),
        };
    }
    match fault {
        Some(FaultKind::Status(code)) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let (status, body) = azure_error(status, "InjectedFault", "injected fault");
            return (status, axum::Json(body)).into_response();
        }
        Some(FaultKind::RateLimited { retry_after_secs }) => {
            let mut response = (StatusCode::TOO_MANY_REQUESTS, "").into_response();
            let headers = response.headers_mut();
            headers.insert("retry-after", HeaderValue::from(retry_after_secs));
            headers.insert("x-ratelimit-resource", HeaderValue::from_static("ATCPU"));
            headers.insert("x-ratelimit-limit", HeaderValue::from_static("200"));
            headers.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
            return response;
        }
        Some(FaultKind::Malformed) => {
            let mut response = (StatusCode::OK, "{\"count\": 1, \"value\": [").into_response();
            response.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
            return response;
        }
        Some(FaultKind::SignInPage) => return sign_in_page(),
        Some(FaultKind::Hang(wait)) => tokio::time::sleep(wait).await,
        None => {}
    }

    let mut state = lock(&shared);
    let api_version = query.iter().find(|(key, _)| key == "api-version").map(|(_, value)| value.as_str());
    let (status, response_body) = if api_version != Some("7.1") {
        azure_error(StatusCode::BAD_REQUEST, "VssVersionNotSpecifiedException", "The api-version must be 7.1.")
    } else {
        answer(&mut state, &method, route, pool_id, agent_id.as_deref(), &query, request_body.as_ref())
    };
    let stored_body = (status != StatusCode::OK || !response_body.is_null()).then(|| response_body.clone());
    state.exchanges.push(Exchange {
        method: method.to_string(),
        path,
        query,
        request_body,
        status: status.as_u16(),
        response_body: stored_body,
        route,
    });
    let rate_limit = state.rate_limit_headers;
    drop(state);

    let mut response = if response_body.is_null() {
        status.into_response()
    } else {
        (status, axum::Json(response_body)).into_response()
    };
    if let (Some((remaining, limit)), true) = (rate_limit, status.is_success()) {
        response.headers_mut().insert("x-ratelimit-remaining", HeaderValue::from(remaining));
        response.headers_mut().insert("x-ratelimit-limit", HeaderValue::from(limit));
        response.headers_mut().insert("x-ratelimit-resource", HeaderValue::from_static("ATCPU"));
    }
    response
}

fn sign_in_page() -> Response {
    let mut response = (
        StatusCode::NON_AUTHORITATIVE_INFORMATION,
        "<html><head><title>Azure DevOps Services | Sign In</title></head></html>",
    )
        .into_response();
    response.headers_mut().insert("content-type", HeaderValue::from_static("text/html; charset=utf-8"));
    response
}

fn flag(query: &[(String, String)], key: &str) -> bool {
    query.iter().any(|(name, value)| name.eq_ignore_ascii_case(key) && value.eq_ignore_ascii_case("true"))
}

fn param<'q>(query: &'q [(String, String)], key: &str) -> Option<&'q str> {
    query.iter().find(|(name, _)| name.eq_ignore_ascii_case(key)).map(|(_, value)| value.as_str())
}

/// The real answer of one call (auth and faults already handled).
fn answer(
    state: &mut State,
    method: &Method,
    route: Route,
    pool_id: Option<u32>,
    agent_id: Option<&str>,
    query: &[(String, String)],
    body: Option<&Value>,
) -> (StatusCode, Value) {
    let pool_missing = |id: u32| {
        azure_error(
            StatusCode::NOT_FOUND,
            "TaskAgentPoolNotFoundException",
            &format!("Agent pool {id} could not be found."),
        )
    };
    let pool = pool_id.and_then(|id| state.pools.iter().find(|pool| pool.id == id).cloned());
    match (method.as_str(), route) {
        ("GET", Route::Pools) => {
            let name = param(query, "poolName");
            let pools = state
                .pools
                .iter()
                .filter(|pool| name.is_none_or(|name| pool.name.eq_ignore_ascii_case(name)))
                .map(|pool| pool_json(pool, state.agents.iter().filter(|agent| agent.pool_id == pool.id).count()))
                .collect();
            (StatusCode::OK, list(pools))
        }
        ("GET", Route::Agents) => {
            let Some(pool) = pool else {
                return pool_missing(pool_id.unwrap_or_default());
            };
            let name = param(query, "agentName");
            let (assigned, last) = (flag(query, "includeAssignedRequest"), flag(query, "includeLastCompletedRequest"));
            let agents = state
                .agents
                .iter()
                .filter(|agent| agent.pool_id == pool.id)
                .filter(|agent| name.is_none_or(|name| agent.name.eq_ignore_ascii_case(name)))
                .map(|agent| agent_json(state, agent, assigned, last))
                .collect();
            (StatusCode::OK, list(agents))
        }
        ("GET", Route::JobRequests) => {
            let Some(pool) = pool else {
                return pool_missing(pool_id.unwrap_or_default());
            };
            // `completedRequestCount=N`: every unfinished request and the N most recently finished ones (the
            // service keeps a pool's recent history only; without the parameter it answers with what it keeps).
            let completed = param(query, "completedRequestCount").and_then(|count| count.parse::<usize>().ok());
            let mut finished: Vec<&FakeRequest> = state
                .requests
                .iter()
                .filter(|request| request.pool_id == pool.id && !request.is_unfinished())
                .collect();
            finished.sort_by_key(|request| std::cmp::Reverse(request.finish_time));
            if let Some(count) = completed {
                finished.truncate(count);
            }
            let requests = state
                .requests
                .iter()
                .filter(|request| request.pool_id == pool.id)
                .filter(|request| request.is_unfinished() || finished.iter().any(|kept| kept.id == request.id))
                .map(|request| job_request_json(state, request))
                .collect();
            (StatusCode::OK, list(requests))
        }
        (verb @ ("GET" | "PATCH" | "DELETE"), Route::Agent) => {
            let Some(pool) = pool else {
                return pool_missing(pool_id.unwrap_or_default());
            };
            let Some(agent_id) = agent_id.and_then(|id| id.parse::<u32>().ok()) else {
                return azure_error(StatusCode::BAD_REQUEST, "ArgumentException", "The agent id must be a number.");
            };
            let Some(index) = state.agents.iter().position(|agent| agent.id == agent_id && agent.pool_id == pool.id)
            else {
                return azure_error(
                    StatusCode::NOT_FOUND,
                    "TaskAgentNotFoundException",
                    &format!("No agent could be found with ID {agent_id}."),
                );
            };
            match verb {
                "GET" => {
                    let agent = state.agents[index].clone();
                    (StatusCode::OK, agent_json(state, &agent, flag(query, "includeAssignedRequest"), false))
                }
                "PATCH" => {
                    let Some(body) = body else {
                        return azure_error(StatusCode::BAD_REQUEST, "ArgumentNullException", "The agent is required.");
                    };
                    if body.get("id").is_some_and(|id| id.as_u64() != Some(u64::from(agent_id))) {
                        return azure_error(
                            StatusCode::BAD_REQUEST,
                            "ArgumentException",
                            "The agent id does not match.",
                        );
                    }
                    if let Some(enabled) = body.get("enabled").and_then(Value::as_bool) {
                        state.agents[index].enabled = enabled;
                    }
                    let agent = state.agents[index].clone();
                    (StatusCode::OK, agent_json(state, &agent, false, false))
                }
                _ => {
                    let removed = state.agents.remove(index);
                    // A job held by a removed agent goes back to the queue, as the service re-plans it.
                    for request in
                        state.requests.iter_mut().filter(|r| r.is_unfinished() && r.reserved_agent == Some(removed.id))
                    {
                        request.reserved_agent = None;
                        request.assign_time = None;
                    }
                    (StatusCode::OK, Value::Null)
                }
            }
        }
        _ => azure_error(StatusCode::NOT_FOUND, "NotFound", "The resource cannot be found."),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_base64_of_colon_pat() {
        // echo -n ':pat' | base64 → OnBhdA==
        assert_eq!(basic_credentials("pat"), "OnBhdA==");
        assert_eq!(basic_credentials("ab"), "OmFi");
        assert_eq!(basic_credentials("abcd"), "OmFiY2Q=");
    }

    #[test]
    fn routes_and_query_parsing() {
        assert_eq!(route_of("/fakeorg/_apis/distributedtask/pools").0, Route::Pools);
        assert_eq!(route_of("/fakeorg/_apis/distributedtask/pools/3/agents"), (Route::Agents, Some(3), None));
        assert_eq!(
            route_of("/fakeorg/_apis/distributedtask/pools/3/agents/7"),
            (Route::Agent, Some(3), Some("7".into()))
        );
        assert_eq!(route_of("/fakeorg/_apis/distributedtask/pools/3/jobrequests").0, Route::JobRequests);
        assert_eq!(route_of("/other/_apis/distributedtask/pools").0, Route::Unknown);
        assert_eq!(
            url_pairs("poolName=my+pool%2Fx&api-version=7.1"),
            [("poolName".into(), "my pool/x".into()), ("api-version".into(), "7.1".into())]
        );
    }
}
