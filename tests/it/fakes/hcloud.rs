//! A stateful fake of the Hetzner Cloud API on 127.0.0.1, in-process (axum): servers with status transitions
//! (`initializing` → `running` after a couple of reads, `poweron`/`shutdown` actions), pagination with
//! `meta.pagination`, `label_selector` filtering (`k=v`, `k==v`, `k!=v`, `k`, `!k`), `uniqueness_error` on
//! names, server types with prices, capacity errors per (server type, location), fault injection (status codes,
//! 429 with `Retry-After`, delays, malformed JSON), a Bearer token check and a log of every exchange (for call
//! counts and the OpenAPI check in `openapi.rs`).
//!
//! It serves the API under `/v1`, like Hetzner: point a client at [`HcloudFake::endpoint`].

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use serde_json::{json, Value};

use super::query::url_pairs;

/// Reads of a new server (list or get) before it reports `running`.
pub const READS_UNTIL_RUNNING: u32 = 2;

/// One exchange, as the fake saw it. Paths are without the `/v1` prefix, as in the OpenAPI spec.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub method: String,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub request_body: Option<Value>,
    pub status: u16,
    /// `None` when the fake served a malformed body on purpose.
    pub response_body: Option<Value>,
}

/// A failure the next matching request gets instead of its answer.
#[derive(Debug, Clone)]
pub enum FaultKind {
    /// That status with a Hetzner error body (`code`).
    Status(u16, &'static str),
    /// 429 with `Retry-After` in seconds (or `RateLimit-Reset` when `reset_header`).
    RateLimited { retry_after_secs: u64, reset_header: bool },
    /// Answer normally, but only after this long (beyond the client's timeout: the client gives up).
    Delay(Duration),
    /// 200 with a body that is not JSON.
    Malformed,
}

#[derive(Debug, Clone)]
struct Fault {
    method: Option<Method>,
    path_prefix: String,
    kind: FaultKind,
}

#[derive(Debug, Clone)]
pub struct FakeServer {
    pub id: u64,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub server_type: String,
    pub location: String,
    pub image: String,
    pub status: String,
    pub created: String,
    pub user_data: Option<String>,
    pub ssh_keys: Vec<String>,
    pub networks: Vec<i64>,
    pub firewalls: Vec<i64>,
    reads: u32,
}

#[derive(Debug)]
struct State {
    token: String,
    servers: BTreeMap<u64, FakeServer>,
    next_id: u64,
    next_action: u64,
    /// (name, hourly gross price) in id order.
    server_types: Vec<(String, String)>,
    /// (server type, location) pairs without capacity; a location of `*` means every location.
    unavailable: BTreeSet<(String, String)>,
    faults: VecDeque<Fault>,
    /// Every `fail_every`-th request (counting all) fails with a 503, for convergence under faults.
    fail_every: Option<u64>,
    exchanges: Vec<Exchange>,
    requests: u64,
}

/// The running fake. Dropping it stops the server.
pub struct HcloudFake {
    endpoint: String,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for HcloudFake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl HcloudFake {
    /// Starts the fake on a free loopback port; requests must carry `Authorization: Bearer <token>`.
    pub async fn start(token: &str) -> Self {
        let state = Arc::new(Mutex::new(State {
            token: token.to_owned(),
            servers: BTreeMap::new(),
            next_id: 1000,
            next_action: 1,
            server_types: vec![
                ("cx22".to_owned(), "0.0060000000000000".to_owned()),
                ("cx32".to_owned(), "0.0113000000000000".to_owned()),
                ("cpx31".to_owned(), "0.0228000000000000".to_owned()),
            ],
            unavailable: BTreeSet::new(),
            faults: VecDeque::new(),
            fail_every: None,
            exchanges: Vec::new(),
            requests: 0,
        }));
        let shared = state.clone();
        let app = Router::new().fallback(move |method: Method, uri: Uri, headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move { handle(state, method, uri, headers, body).await }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind the hcloud fake");
        let address = listener.local_addr().expect("local address");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { endpoint: format!("http://{address}/v1"), state, server }
    }

    /// Starts the fake on its own runtime thread, for tests that are not async (the `ciscale` binary talks to it).
    pub fn start_in_background(token: &str) -> (Self, tokio::runtime::Runtime) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the hcloud fake");
        let fake = runtime.block_on(Self::start(token));
        (fake, runtime)
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every server the fake holds, by id.
    pub fn servers(&self) -> Vec<FakeServer> {
        self.lock().servers.values().cloned().collect()
    }

    /// Adds a server directly (as another tool or a human would have), already running.
    pub fn insert_server(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        state.servers.insert(
            id,
            FakeServer {
                id,
                name: name.to_owned(),
                labels: labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
                server_type: "cx22".to_owned(),
                location: "fsn1".to_owned(),
                image: "ubuntu-24.04".to_owned(),
                status: "running".to_owned(),
                created: "2025-01-01T00:00:00Z".to_owned(),
                user_data: None,
                ssh_keys: Vec::new(),
                networks: Vec::new(),
                firewalls: Vec::new(),
                reads: READS_UNTIL_RUNNING,
            },
        );
        id
    }

    /// No capacity for `server_type` in `location` (`*`: anywhere) from now on.
    pub fn set_unavailable(&self, server_type: &str, location: &str) {
        self.lock().unavailable.insert((server_type.to_owned(), location.to_owned()));
    }

    /// The next request matching `method` (any if `None`) and a path starting with `path_prefix` (without `/v1`)
    /// fails with `kind`. Faults are used once, in the order they were added.
    pub fn inject(&self, method: Option<Method>, path_prefix: &str, kind: FaultKind) {
        self.lock().faults.push_back(Fault { method, path_prefix: path_prefix.to_owned(), kind });
    }

    /// Every `n`-th request from now on fails with a 503 (`None` turns it off).
    pub fn fail_every(&self, n: Option<u64>) {
        self.lock().fail_every = n.filter(|n| *n > 0);
    }

    pub fn exchanges(&self) -> Vec<Exchange> {
        self.lock().exchanges.clone()
    }

    /// Requests so far, all of them (failed ones and ones with a wrong token included).
    pub fn request_count(&self) -> usize {
        self.lock().exchanges.len()
    }

    /// Requests so far with this method and exact path.
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.lock().exchanges.iter().filter(|exchange| exchange.method == method && exchange.path == path).count()
    }
}

fn error_body(code: &str, message: &str) -> Value {
    json!({ "error": { "code": code, "message": message, "details": {} } })
}

async fn handle(state: Arc<Mutex<State>>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path = uri.path().strip_prefix("/v1").unwrap_or(uri.path()).to_owned();
    let query: BTreeMap<String, String> =
        uri.query().map(|query| url_pairs(query).into_iter().collect()).unwrap_or_default();
    let request_body: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(&body).ok() };

    // Decide under the lock; sleep (for a delay fault) outside it.
    let (status, response_body, extra_headers, delay) = {
        let mut guard = state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let state = &mut *guard;
        state.requests += 1;
        let authorised = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value == format!("Bearer {}", state.token));
        let fault_index = state.faults.iter().position(|fault| {
            fault.method.as_ref().is_none_or(|m| *m == method) && path.starts_with(&fault.path_prefix)
        });
        let fault = fault_index.and_then(|index| state.faults.remove(index)).map(|fault| fault.kind);
        let periodic = state.fail_every.is_some_and(|n| state.requests % n == 0);

        let mut extra: Vec<(&'static str, String)> = Vec::new();
        let mut delay = None;
        let answer: (StatusCode, Option<Value>) = if !authorised {
            (StatusCode::UNAUTHORIZED, Some(error_body("unauthorized", "unable to authenticate")))
        } else if periodic {
            (StatusCode::SERVICE_UNAVAILABLE, Some(error_body("unavailable", "service unavailable")))
        } else {
            match fault {
                Some(FaultKind::Status(code, error_code)) => (
                    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    Some(error_body(error_code, "injected fault")),
                ),
                Some(FaultKind::RateLimited { retry_after_secs, reset_header }) => {
                    if reset_header {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or(0);
                        extra.push(("ratelimit-reset", (now + retry_after_secs).to_string()));
                    } else {
                        extra.push(("retry-after", retry_after_secs.to_string()));
                    }
                    extra.push(("ratelimit-limit", "3600".to_owned()));
                    extra.push(("ratelimit-remaining", "0".to_owned()));
                    (
                        StatusCode::TOO_MANY_REQUESTS,
                        Some(error_body("rate_limit_exceeded", "limit of 3600 requests per hour reached")),
                    )
                }
                Some(FaultKind::Malformed) => (StatusCode::OK, None),
                Some(FaultKind::Delay(wait)) => {
                    delay = Some(wait);
                    route(state, &method, &path, &query, request_body.as_ref())
                }
                None => route(state, &method, &path, &query, request_body.as_ref()),
            }
        };
        state.exchanges.push(Exchange {
            method: method.to_string(),
            path: path.clone(),
            query: query.clone(),
            request_body: request_body.clone(),
            status: answer.0.as_u16(),
            response_body: answer.1.clone(),
        });
        (answer.0, answer.1, extra, delay)
    };
    if let Some(wait) = delay {
        tokio::time::sleep(wait).await;
    }
    let mut response = match response_body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => (status, [("content-type", "application/json")], "{\"servers\": [ {\"id\": 1,").into_response(),
    };
    for (name, value) in extra_headers {
        if let Ok(value) = value.parse() {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

fn route(
    state: &mut State,
    method: &Method,
    path: &str,
    query: &BTreeMap<String, String>,
    body: Option<&Value>,
) -> (StatusCode, Option<Value>) {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["servers"]) => list_servers(state, query),
        ("POST", ["servers"]) => create_server(state, body),
        ("GET", ["servers", id]) => match server_mut(state, id) {
            Some(server) => {
                tick(server);
                let server = server.clone();
                (StatusCode::OK, Some(json!({ "server": server_json(state, &server) })))
            }
            None => not_found(),
        },
        ("DELETE", ["servers", id]) => {
            let Some(id) = id.parse::<u64>().ok().filter(|id| state.servers.contains_key(id)) else {
                return not_found();
            };
            state.servers.remove(&id);
            let action = action_json(state, "delete_server", id);
            (StatusCode::OK, Some(json!({ "action": action })))
        }
        ("POST", ["servers", id, "actions", action]) => {
            let Some(server) = server_mut(state, id) else {
                return not_found();
            };
            let (command, status) = match *action {
                "poweron" => ("start_server", "starting"),
                "shutdown" => ("shutdown_server", "stopping"),
                "poweroff" => ("stop_server", "off"),
                _ => return (StatusCode::NOT_FOUND, Some(error_body("not_found", "no such action"))),
            };
            server.status = status.to_owned();
            let id = server.id;
            let action = action_json(state, command, id);
            (StatusCode::CREATED, Some(json!({ "action": action })))
        }
        ("GET", ["server_types"]) => {
            let types: Vec<Value> = state
                .server_types
                .iter()
                .enumerate()
                .map(|(index, (name, price))| server_type_json(index, name, price))
                .collect();
            let total = types.len();
            (StatusCode::OK, Some(json!({ "server_types": types, "meta": { "pagination": pagination(1, 50, total) } })))
        }
        _ => (StatusCode::NOT_FOUND, Some(error_body("not_found", "no such endpoint"))),
    }
}

fn not_found() -> (StatusCode, Option<Value>) {
    (StatusCode::NOT_FOUND, Some(error_body("not_found", "server not found")))
}

fn server_mut<'state>(state: &'state mut State, id: &str) -> Option<&'state mut FakeServer> {
    id.parse::<u64>().ok().and_then(|id| state.servers.get_mut(&id))
}

/// A read moves a transitional server along: `initializing` → `running` after [`READS_UNTIL_RUNNING`] reads,
/// `starting` → `running` and `stopping` → `off` after one.
fn tick(server: &mut FakeServer) {
    server.reads += 1;
    match server.status.as_str() {
        "initializing" if server.reads >= READS_UNTIL_RUNNING => server.status = "running".to_owned(),
        "starting" => server.status = "running".to_owned(),
        "stopping" => server.status = "off".to_owned(),
        _ => {}
    }
}

/// Hetzner's label selector: comma-separated `k=v`, `k==v`, `k!=v`, `k`, `!k`, all of which must hold.
fn selects(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    selector.split(',').map(str::trim).filter(|term| !term.is_empty()).all(|term| {
        if let Some((key, value)) = term.split_once("!=") {
            labels.get(key.trim()).is_none_or(|have| have != value.trim())
        } else if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            labels.get(key.trim()).is_some_and(|have| have == value.trim())
        } else if let Some(key) = term.strip_prefix('!') {
            !labels.contains_key(key.trim())
        } else {
            labels.contains_key(term)
        }
    })
}

fn pagination(page: usize, per_page: usize, total: usize) -> Value {
    let last = total.div_ceil(per_page).max(1);
    json!({
        "page": page,
        "per_page": per_page,
        "previous_page": if page > 1 { json!(page - 1) } else { Value::Null },
        "next_page": if page < last { json!(page + 1) } else { Value::Null },
        "last_page": last,
        "total_entries": total,
    })
}

fn list_servers(state: &mut State, query: &BTreeMap<String, String>) -> (StatusCode, Option<Value>) {
    let page = query.get("page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(1).max(1);
    let per_page = query.get("per_page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(25).clamp(1, 50);
    let selector = query.get("label_selector").cloned().unwrap_or_default();
    let name = query.get("name").cloned();
    let matching: Vec<u64> = state
        .servers
        .values()
        .filter(|server| selects(&selector, &server.labels) && name.as_ref().is_none_or(|name| &server.name == name))
        .map(|server| server.id)
        .collect();
    let total = matching.len();
    let mut servers = Vec::new();
    for id in matching.iter().skip((page - 1) * per_page).take(per_page) {
        if let Some(server) = state.servers.get_mut(id) {
            tick(server);
        }
        if let Some(server) = state.servers.get(id) {
            servers.push(server_json(state, server));
        }
    }
    (StatusCode::OK, Some(json!({ "servers": servers, "meta": { "pagination": pagination(page, per_page, total) } })))
}

fn create_server(state: &mut State, body: Option<&Value>) -> (StatusCode, Option<Value>) {
    let Some(body) = body else {
        return (StatusCode::BAD_REQUEST, Some(error_body("json_error", "invalid JSON")));
    };
    let text = |key: &str| body.get(key).and_then(Value::as_str).map(str::to_owned);
    let (Some(name), Some(server_type), Some(image)) = (text("name"), text("server_type"), text("image")) else {
        return (
            StatusCode::BAD_REQUEST,
            Some(error_body("invalid_input", "name, server_type and image are required")),
        );
    };
    if !state.server_types.iter().any(|(known, _)| *known == server_type) {
        return (StatusCode::BAD_REQUEST, Some(error_body("invalid_input", "server type not found")));
    }
    let location = text("location").unwrap_or_else(|| "fsn1".to_owned());
    if state.unavailable.contains(&(server_type.clone(), location.clone()))
        || state.unavailable.contains(&(server_type.clone(), "*".to_owned()))
    {
        return (
            StatusCode::PRECONDITION_FAILED,
            Some(error_body("resource_unavailable", "the requested resource is currently unavailable")),
        );
    }
    if state.servers.values().any(|server| server.name == name) {
        return (StatusCode::CONFLICT, Some(error_body("uniqueness_error", "server name is already used")));
    }
    let labels: BTreeMap<String, String> = body
        .get("labels")
        .and_then(Value::as_object)
        .map(|labels| labels.iter().filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned()))).collect())
        .unwrap_or_default();
    let strings = |key: &str| -> Vec<String> {
        body.get(key)
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default()
    };
    let networks = body
        .get("networks")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(Value::as_i64).collect())
        .unwrap_or_default();
    let firewalls = body
        .get("firewalls")
        .and_then(Value::as_array)
        .map(|items| items.iter().filter_map(|item| item.get("firewall").and_then(Value::as_i64)).collect())
        .unwrap_or_default();
    let id = state.next_id;
    state.next_id += 1;
    let server = FakeServer {
        id,
        name,
        labels,
        server_type,
        location,
        image,
        status: "initializing".to_owned(),
        created: jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        user_data: text("user_data"),
        ssh_keys: strings("ssh_keys"),
        networks,
        firewalls,
        reads: 0,
    };
    let rendered = server_json(state, &server);
    state.servers.insert(id, server);
    let action = action_json(state, "create_server", id);
    let start = action_json(state, "start_server", id);
    (
        StatusCode::CREATED,
        Some(json!({ "server": rendered, "action": action, "next_actions": [start], "root_password": null })),
    )
}

fn action_json(state: &mut State, command: &str, server_id: u64) -> Value {
    let id = state.next_action;
    state.next_action += 1;
    json!({
        "id": id,
        "command": command,
        "status": "running",
        "progress": 0,
        "started": "2025-01-01T00:00:00Z",
        "finished": null,
        "resources": [{ "id": server_id, "type": "server" }],
        "error": null,
    })
}

fn location_json(name: &str) -> Value {
    json!({
        "id": 1,
        "name": name,
        "description": format!("{name} DC Park"),
        "country": "DE",
        "city": "Falkenstein",
        "latitude": 50.47612,
        "longitude": 12.370071,
        "network_zone": "eu-central",
    })
}

fn server_type_json(index: usize, name: &str, price: &str) -> Value {
    let amount = json!({ "net": price, "gross": price });
    json!({
        "id": index + 1,
        "name": name,
        "description": name.to_uppercase(),
        "cores": 2 + index * 2,
        "memory": 4.0,
        "disk": 40.0,
        "deprecated": false,
        "prices": [{
            "location": "fsn1",
            "price_hourly": amount,
            "price_monthly": amount,
            "included_traffic": 21990232555520_i64,
            "price_per_tb_traffic": amount,
        }],
        "storage_type": "local",
        "cpu_type": "shared",
        "architecture": "x86",
        "category": "cost_optimized",
        "locations": [{ "id": 1, "name": "fsn1", "deprecation": null }],
    })
}

fn server_json(state: &State, server: &FakeServer) -> Value {
    let type_index = state.server_types.iter().position(|(name, _)| *name == server.server_type).unwrap_or(0);
    let price = state.server_types.get(type_index).map(|(_, price)| price.clone()).unwrap_or_default();
    let location = location_json(&server.location);
    json!({
        "id": server.id,
        "name": server.name,
        "status": server.status,
        "created": server.created,
        "labels": server.labels,
        "backup_window": null,
        "datacenter": {
            "id": 1,
            "name": format!("{}-dc1", server.location),
            "description": "DC 1",
            "location": location,
            "server_types": { "available": [1, 2, 3], "available_for_migration": [1, 2, 3], "supported": [1, 2, 3] },
        },
        "location": location,
        "image": {
            "id": 4711,
            "type": "system",
            "status": "available",
            "name": server.image,
            "description": server.image,
            "image_size": null,
            "disk_size": 10,
            "created": "2025-01-01T00:00:00Z",
            "created_from": null,
            "bound_to": null,
            "os_flavor": "ubuntu",
            "os_version": "24.04",
            "rapid_deploy": true,
            "protection": { "delete": false },
            "deprecated": null,
            "deleted": null,
            "labels": {},
            "architecture": "x86",
        },
        "iso": null,
        "included_traffic": 21990232555520_i64,
        "ingoing_traffic": 0,
        "outgoing_traffic": 0,
        "locked": false,
        "primary_disk_size": 40,
        "private_net": server.networks.iter().map(|network| json!({
            "network": network, "ip": "10.0.0.2", "alias_ips": [], "mac_address": "86:00:ff:2a:7d:e1"
        })).collect::<Vec<_>>(),
        "protection": { "delete": false, "rebuild": false },
        "public_net": {
            "ipv4": { "ip": "192.0.2.1", "blocked": false, "dns_ptr": "static.example.com", "id": 1 },
            "ipv6": { "ip": "2001:db8::/64", "blocked": false, "dns_ptr": [], "id": 2 },
            "floating_ips": [],
            "firewalls": server.firewalls.iter().map(|id| json!({ "id": id, "status": "applied" })).collect::<Vec<_>>(),
        },
        "rescue_enabled": false,
        "server_type": server_type_json(type_index, &server.server_type, &price),
        "load_balancers": [],
        "volumes": [],
        "placement_group": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selector_forms() {
        let labels = BTreeMap::from([("a".to_owned(), "1".to_owned()), ("b".to_owned(), "2".to_owned())]);
        for (selector, expected) in [
            ("a=1", true),
            ("a==1", true),
            ("a=2", false),
            ("a", true),
            ("c", false),
            ("!c", true),
            ("!a", false),
            ("a!=2", true),
            ("a=1,b=2", true),
            ("a=1,b=3", false),
            ("", true),
        ] {
            assert_eq!(selects(selector, &labels), expected, "{selector}");
        }
    }

    #[test]
    fn query_strings_are_decoded() {
        assert_eq!(
            url_pairs("label_selector=ciscale.owner%3Dacme&page=2"),
            [("label_selector".to_owned(), "ciscale.owner=acme".to_owned()), ("page".to_owned(), "2".to_owned())]
        );
    }
}
