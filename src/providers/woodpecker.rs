//! The Woodpecker CI source: reads the queue and the agent records of a Woodpecker server over its REST API
//! (admin token), registers one agent per instance (each with its own token), drains and deletes agent records.
//!
//! One observation is two calls: `GET /api/queue/info` and `GET /api/agents` (more pages only past
//! [`AGENTS_PER_PAGE`] agents). Every request carries a connect and a total timeout, and every failure maps onto
//! [`Error`] so that a cycle fails cleanly and the next one retries. The admin token never leaves this module
//! except as the `Authorization` header: it is a [`Secret`], and no message or `Debug` output holds it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer};

use super::http::{self, retry_after, ErrorAnswer};
use super::{AgentCredential, CiCapabilities, CiSource, CloudLaunch, Error, Launch, RegisterAgent, Result};
use crate::model::{Agent, AgentId, CiObservation, LabelInterner, Queue, Secret, Task, TaskId};

mod history;

const PROVIDER: &str = "woodpecker";
/// Page size of `GET /api/agents`: the server's documented default, which every version accepts (a larger one
/// may be capped silently, and a short page would then look like the last one).
pub const AGENTS_PER_PAGE: usize = 50;
/// A server that keeps returning full pages is not believed past this many agents.
const MAX_AGENT_PAGES: usize = 1000;
/// gRPC port agents connect to when the config names no `grpcAddress` (Woodpecker's default).
pub const DEFAULT_GRPC_PORT: u16 = 9000;
/// Env keys the agent reads (Woodpecker agent configuration).
pub const SERVER_ENV: &str = "WOODPECKER_SERVER";
pub const LABELS_ENV: &str = "WOODPECKER_AGENT_LABELS";
pub const SECRET_ENV: &str = "WOODPECKER_AGENT_SECRET";
/// The agent image a cloud server runs when the pool names none.
pub const AGENT_IMAGE: &str = "woodpeckerci/woodpecker-agent:latest";

/// Long-lived, drainable agents (`no_schedule`), each with the token `POST /api/agents` made for it; on a cloud
/// server the stock agent image, which reads `WOODPECKER_SERVER`, `WOODPECKER_AGENT_SECRET` and the labels.
pub const CAPABILITIES: CiCapabilities = CiCapabilities {
    drain: true,
    per_agent_credentials: true,
    single_job: false,
    job_bound: false,
    matching: crate::model::Matching::LabelFilter,
    launch: Launch {
        agent: "Woodpecker",
        container_command: crate::providers::CONTAINER_AGENT_COMMAND,
        token_env: Some(SECRET_ENV),
        cloud: CloudLaunch::Docker {
            default_image: Some(AGENT_IMAGE),
            needs: "a Woodpecker agent image (it reads `WOODPECKER_SERVER` and `WOODPECKER_AGENT_SECRET`)",
        },
    },
};

/// Connect and total timeouts of every request.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub total: Duration,
}

impl Default for Timeouts {
    /// A Woodpecker API call answers in milliseconds; 15 s total rides out a slow database without letting one
    /// hung call hold a cycle (the poll interval is 10 s by default).
    fn default() -> Self {
        Self { connect: Duration::from_secs(5), total: Duration::from_secs(15) }
    }
}

/// A Woodpecker server, as a [`CiSource`].
pub struct Woodpecker {
    http: reqwest::Client,
    /// Server URL without a trailing `/`.
    server: String,
    token: Secret,
    grpc_address: String,
}

impl fmt::Debug for Woodpecker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Woodpecker")
            .field("server", &self.server)
            .field("token", &self.token)
            .field("grpc_address", &self.grpc_address)
            .finish()
    }
}

impl Woodpecker {
    /// A client of the server at `server` (`https://ci.example.com`). `grpc_address` is what agents get as
    /// `WOODPECKER_SERVER`; `None`: the host of `server` with port 9000.
    pub fn new(server: &str, token: Secret, grpc_address: Option<&str>) -> Result<Self> {
        Self::with_timeouts(server, token, grpc_address, Timeouts::default())
    }

    pub fn with_timeouts(server: &str, token: Secret, grpc_address: Option<&str>, timeouts: Timeouts) -> Result<Self> {
        let invalid = |message: String| Error::Invalid { provider: PROVIDER.to_owned(), message };
        let url = reqwest::Url::parse(server)
            .map_err(|error| invalid(format!("`server` `{server}` is not a URL: {error}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid(format!("`server` `{server}` must be an http:// or https:// URL")));
        }
        let grpc_address = match grpc_address {
            Some(address) if !address.trim().is_empty() => address.trim().to_owned(),
            _ => {
                let host = url.host_str().ok_or_else(|| invalid(format!("`server` `{server}` has no host")))?;
                format!("{host}:{DEFAULT_GRPC_PORT}")
            }
        };
        let http = super::http::client(PROVIDER, timeouts.connect, timeouts.total)?;
        Ok(Self { http, server: server.trim_end_matches('/').to_owned(), token, grpc_address })
    }

    /// What agents get as `WOODPECKER_SERVER`.
    pub fn grpc_address(&self) -> &str {
        &self.grpc_address
    }

    // -- API calls -------------------------------------------------------------------------------------------

    async fn queue_info(&self) -> Result<QueueInfo> {
        self.json(Method::GET, "/api/queue/info", None, None).await
    }

    async fn list_agents(&self) -> Result<Vec<WireAgent>> {
        let mut agents: Vec<WireAgent> = Vec::new();
        let mut seen = BTreeSet::new();
        for page in 1..=MAX_AGENT_PAGES {
            let path = format!("/api/agents?page={page}&perPage={AGENTS_PER_PAGE}");
            let batch: Option<Vec<WireAgent>> = self.json(Method::GET, &path, None, None).await?;
            let batch = batch.unwrap_or_default();
            let full = batch.len() >= AGENTS_PER_PAGE;
            // An agent created between two pages shifts the rest by one: keep each id once.
            agents.extend(batch.into_iter().filter(|agent| seen.insert(agent.id)));
            if !full {
                break;
            }
        }
        Ok(agents)
    }

    async fn create_agent(&self, name: &str) -> Result<WireAgent> {
        let body = serde_json::json!({ "name": name, "no_schedule": false });
        self.json(Method::POST, "/api/agents", Some(body), None).await
    }

    async fn patch_no_schedule(&self, id: &AgentId, no_schedule: bool) -> Result<()> {
        let number = agent_number(id)?;
        let path = format!("/api/agents/{number}");
        // The server's PATCH overwrites the name with whatever the body says (an absent name blanks it), so the
        // current name is read first and sent back with the new flag.
        let current: WireAgent = self.json(Method::GET, &path, None, Some(id)).await?;
        if current.no_schedule == no_schedule {
            return Ok(());
        }
        let body = serde_json::json!({ "name": current.name, "no_schedule": no_schedule });
        let _: WireAgent = self.json(Method::PATCH, &path, Some(body), Some(id)).await?;
        Ok(())
    }

    async fn delete_agent(&self, id: &AgentId) -> Result<()> {
        let number = agent_number(id)?;
        self.send(Method::DELETE, &format!("/api/agents/{number}"), None, Some(id)).await.map(drop)
    }

    /// Sends one request and decodes its JSON answer.
    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        agent: Option<&AgentId>,
    ) -> Result<T> {
        let endpoint = endpoint_name(&method, path);
        let bytes = self.send(method, path, body, agent).await?;
        serde_json::from_slice(&bytes).map_err(|error| Error::Other {
            provider: PROVIDER.to_owned(),
            source: Box::new(BadResponse { endpoint, detail: error.to_string() }),
        })
    }

    /// Sends one request; maps transport failures and error statuses onto [`Error`].
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
        agent: Option<&AgentId>,
    ) -> Result<Vec<u8>> {
        let endpoint = endpoint_name(&method, path);
        let mut request = self.http.request(method, format!("{}{path}", self.server)).bearer_auth(self.token.expose());
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.map_err(|error| transport_error(&endpoint, &error))?;
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let bytes = response.bytes().await.map_err(|error| transport_error(&endpoint, &error))?;
        if status.is_success() {
            return Ok(bytes.to_vec());
        }
        Err(status_error(&endpoint, status, retry_after, agent, &bytes))
    }
}

#[async_trait]
impl CiSource for Woodpecker {
    fn capabilities(&self) -> CiCapabilities {
        CAPABILITIES
    }

    fn kind(&self) -> &'static str {
        PROVIDER
    }

    async fn observe(&self) -> Result<CiObservation> {
        let queue = self.queue_info().await?;
        let agents = self.list_agents().await?;
        // One interner for the whole queue: its jobs share each distinct label set (most jobs of a repo carry the
        // same one), and it is dropped with this observation.
        let mut interner = LabelInterner::new();
        let running = tasks(queue.running, &mut interner);
        let busy: BTreeSet<&AgentId> = running.iter().filter_map(|task| task.agent_id.as_ref()).collect();
        let agents = agents
            .into_iter()
            .map(|agent| {
                let id = AgentId::new(agent.id.to_string());
                Agent {
                    busy: busy.contains(&id),
                    id,
                    name: agent.name,
                    no_schedule: agent.no_schedule,
                    last_contact: unix_time(agent.last_contact),
                    last_work: unix_time(agent.last_work),
                    labels: agent.custom_labels.unwrap_or_default(),
                    created_at: unix_time(agent.created),
                }
            })
            .collect();
        // Tasks waiting on dependencies are left out: they may never run (a failed dependency), and they become
        // pending the moment they can, which the next cycle sees.
        Ok(CiObservation { agents, queue: Queue { pending: tasks(queue.pending, &mut interner), running } })
    }

    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential> {
        let existing = self.list_agents().await?.into_iter().find(|agent| agent.name == request.name);
        let agent = match existing {
            // The admin API shows an agent's token: the existing record is taken over as it is (same id).
            Some(agent) if agent.token.as_ref().is_some_and(|token| !token.expose().is_empty()) => agent,
            // A server that hides tokens cannot re-issue one for an existing agent, so the record is deleted and
            // made anew (new id, new token) — unless it runs a job, which must never be cut off.
            Some(agent) => {
                let id = AgentId::new(agent.id.to_string());
                let queue = self.queue_info().await?;
                // Only the running tasks' agents are read: no task (nor its labels) is built for it.
                if queue.running.iter().flatten().any(|task| task.agent().as_ref() == Some(&id)) {
                    return Err(Error::AlreadyExists {
                        what: format!("woodpecker agent `{}` (id {id}, running a job)", request.name),
                    });
                }
                match self.delete_agent(&id).await {
                    Ok(()) | Err(Error::NotFound { .. }) => {}
                    Err(error) => return Err(error),
                }
                self.create_agent(&request.name).await?
            }
            None => self.create_agent(&request.name).await?,
        };
        let token = agent.token.filter(|token| !token.expose().is_empty()).ok_or_else(|| Error::Other {
            provider: PROVIDER.to_owned(),
            source: Box::new(BadResponse {
                endpoint: "POST /api/agents".to_owned(),
                detail: format!("agent `{}` came back without a token", request.name),
            }),
        })?;
        let mut env = BTreeMap::from([
            (SERVER_ENV.to_owned(), self.grpc_address.clone()),
            (super::TOKEN_ENV_NAME_KEY.to_owned(), SECRET_ENV.to_owned()),
        ]);
        if !request.labels.is_empty() {
            let labels: Vec<String> = request.labels.iter().map(|(key, value)| format!("{key}={value}")).collect();
            env.insert(LABELS_ENV.to_owned(), labels.join(","));
        }
        Ok(AgentCredential { agent_id: AgentId::new(agent.id.to_string()), token, env })
    }

    async fn drain(&self, id: &AgentId) -> Result<()> {
        self.patch_no_schedule(id, true).await
    }

    async fn undrain(&self, id: &AgentId) -> Result<()> {
        self.patch_no_schedule(id, false).await
    }

    async fn deregister(&self, id: &AgentId) -> Result<()> {
        self.delete_agent(id).await
    }

    async fn history(&self, request: &super::HistoryRequest) -> Result<Vec<super::PastJob>> {
        self.job_history(request).await
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Wire types: every field optional or defaulted, as older servers leave fields out and send `null` arrays.
// ---------------------------------------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct QueueInfo {
    #[serde(default)]
    pending: Option<Vec<WireTask>>,
    #[serde(default)]
    running: Option<Vec<WireTask>>,
}

#[derive(Deserialize)]
struct WireTask {
    #[serde(deserialize_with = "string_or_number")]
    id: String,
    /// A JSON object or `null`, read as its pairs: they go through the observation's interner next, so no map is
    /// built per task only to be dropped (a queue of 100,000 tasks would hold 100,000 maps while it is read).
    #[serde(default, deserialize_with = "label_pairs")]
    labels: Vec<(String, String)>,
    #[serde(default)]
    agent_id: Option<i64>,
}

/// Never `Debug`: it holds the agent's token.
#[derive(Deserialize)]
struct WireAgent {
    id: i64,
    #[serde(default)]
    name: String,
    #[serde(default, deserialize_with = "optional_secret")]
    token: Option<Secret>,
    #[serde(default)]
    last_contact: Option<i64>,
    #[serde(default)]
    last_work: Option<i64>,
    /// Unix seconds; the spec marks no field required, and a server that leaves it out loses nothing but the
    /// "create in flight" window of a record without an instance (the planner falls back to `last_contact`).
    #[serde(default)]
    created: Option<i64>,
    #[serde(default)]
    no_schedule: bool,
    #[serde(default)]
    custom_labels: Option<BTreeMap<String, String>>,
}

fn tasks(wire: Option<Vec<WireTask>>, interner: &mut LabelInterner) -> Vec<Task> {
    wire.unwrap_or_default()
        .into_iter()
        .map(|task| Task {
            agent_id: task.agent(),
            id: TaskId::new(task.id),
            labels: interner.labels(task.labels),
            demands: Vec::new(),
        })
        .collect()
}

impl WireTask {
    /// The agent running it (0 is Go's zero value: no agent).
    fn agent(&self) -> Option<AgentId> {
        self.agent_id.filter(|id| *id > 0).map(|id| AgentId::new(id.to_string()))
    }
}

/// Unix seconds; 0 (Go's zero value) means never.
fn unix_time(seconds: Option<i64>) -> Option<Timestamp> {
    seconds.filter(|seconds| *seconds > 0).and_then(|seconds| Timestamp::from_second(seconds).ok())
}

fn string_or_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(i64),
    }
    Ok(match Id::deserialize(deserializer)? {
        Id::Text(text) => text,
        Id::Number(number) => number.to_string(),
    })
}

/// A map of strings, or `null` (none), as its pairs in the order sent; `Labels` sorts them, a later duplicate key
/// winning as it did in a map.
fn label_pairs<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, String)>;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str("a map")
        }

        fn visit_unit<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
            Ok(Vec::new())
        }

        fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_map(self)
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(0).min(64));
            while let Some(pair) = map.next_entry::<String, String>()? {
                pairs.push(pair);
            }
            Ok(pairs)
        }
    }
    deserializer.deserialize_option(Pairs)
}

fn optional_secret<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Secret>, D::Error> {
    Ok(Option::<String>::deserialize(deserializer)?.map(Secret::new))
}

// ---------------------------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------------------------

/// An answer that is not what the API documents.
#[derive(Debug, thiserror::Error)]
#[error("unexpected answer from `{endpoint}`: {detail}")]
pub struct BadResponse {
    pub endpoint: String,
    pub detail: String,
}

/// `GET /api/agents/{id}` style name of a request, for messages (no query string, no host).
fn endpoint_name(method: &Method, path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    format!("{method} {path}")
}

fn agent_number(id: &AgentId) -> Result<i64> {
    id.as_str()
        .parse::<i64>()
        .map_err(|_| Error::NotFound { what: format!("woodpecker agent `{id}` (ids are numbers)") })
}

fn transport_error(endpoint: &str, error: &reqwest::Error) -> Error {
    Error::Unavailable { provider: PROVIDER.to_owned(), message: http::transport_message(endpoint, error) }
}

fn status_error(
    endpoint: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    agent: Option<&AgentId>,
    body: &[u8],
) -> Error {
    let provider = PROVIDER.to_owned();
    // Server error bodies are short plain text; a long one is cut, never quoted whole.
    let text: String = String::from_utf8_lossy(body).trim().chars().take(200).collect();
    let said = if text.is_empty() { String::new() } else { format!(": {text}") };
    match status.as_u16() {
        401 => Error::Unauthenticated {
            provider,
            message: format!(
                "the token was refused (`{endpoint}` answered 401)\nhint: use a personal access token of a \
                 Woodpecker admin (user settings → personal access token)"
            ),
        },
        403 => Error::Unauthenticated {
            provider,
            message: format!(
                "the token is not an admin token: `{endpoint}` needs admin rights\nhint: use a personal access \
                 token of a Woodpecker admin (`WOODPECKER_ADMIN` on the server)"
            ),
        },
        404 => match agent {
            Some(id) => Error::NotFound { what: format!("woodpecker agent `{id}`") },
            None => Error::Invalid {
                provider,
                message: format!("`{endpoint}` answered 404\nhint: is `server` the Woodpecker URL?"),
            },
        },
        // 409, 429, 5xx and the rest as every HTTP provider reads them.
        _ => http::status_error(ErrorAnswer {
            provider: PROVIDER,
            status,
            retry_after,
            what: &format!("woodpecker record (`{endpoint}` answered 409{said})"),
            message: &format!("`{endpoint}` answered {status}{said}"),
            credential_hint: "",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue(json: &str) -> std::result::Result<QueueInfo, String> {
        serde_json::from_str(json).map_err(|error| error.to_string())
    }

    #[test]
    fn task_labels_are_read_as_a_map_was_and_shared() {
        let info = queue(
            r#"{"pending": [
                {"id": "1", "labels": {"repo": "a/b", "platform": "linux/amd64"}},
                {"id": 2, "labels": {"platform": "linux/amd64", "repo": "a/b"}},
                {"id": "3", "labels": null},
                {"id": "4"},
                {"id": "5", "labels": {"platform": "x", "platform": "linux/arm64"}}
            ]}"#,
        )
        .expect("valid queue");
        let tasks = tasks(info.pending, &mut LabelInterner::new());
        let labels: Vec<Vec<(&str, &str)>> = tasks.iter().map(|task| task.labels.iter().collect()).collect();
        assert_eq!(labels[0], [("platform", "linux/amd64"), ("repo", "a/b")], "sorted by key");
        assert_eq!(tasks[0].labels.set_address(), tasks[1].labels.set_address(), "one set for both tasks");
        assert!(labels[2].is_empty() && labels[3].is_empty(), "null or missing: none");
        assert_eq!(labels[4], [("platform", "linux/arm64")], "a later duplicate key wins, as in a map");
    }

    #[test]
    fn a_bad_label_value_fails_as_a_map_did() {
        let ours = queue(r#"{"pending": [{"id": "1", "labels": {"repo": 7}}]}"#).err();
        let as_map = serde_json::from_str::<BTreeMap<String, String>>(r#"{"repo": 7}"#).err().map(|e| e.to_string());
        assert!(ours.as_deref().is_some_and(|error| error.starts_with("invalid type: integer `7`, expected a string")));
        assert!(as_map.is_some_and(|error| error.starts_with("invalid type: integer `7`, expected a string")));
        let not_a_map = queue(r#"{"pending": [{"id": "1", "labels": ["repo"]}]}"#).err();
        assert!(not_a_map.is_some_and(|error| error.starts_with("invalid type: sequence, expected a map")));
    }
}
