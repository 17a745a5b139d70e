//! The Azure Pipelines CI source (kind `azure-pipelines`): reads the agents and the job queue of the Azure
//! agent pools a config's pools are bound to, drains (disables) and deregisters agents, and hands new agents
//! what they need to register themselves.
//!
//! # Calls
//! Per cycle, two calls per Azure pool: `GET pools/{id}/agents?includeAssignedRequest=true&...` and
//! `GET pools/{id}/jobrequests`. A pool's id is looked up by name once (`GET pools?poolName=`) and cached for
//! the life of the process (dropped again when Azure answers 404 for it, e.g. a pool deleted and re-created).
//!
//! # Queue
//! `jobrequests` is undocumented (it is not in the 7.1 spec; KEDA's scaler relies on it): it lists recent
//! requests, finished ones included. Unfinished requests have `result: null`; those without an assigned agent are
//! pending, the others run on their `reservedAgent`. Every task carries the label `azure-pool` (its Azure pool's
//! name), so a request counts only for ciscale pools bound to that Azure pool; its `demands` are matched against
//! the ciscale pool's `capabilities` by the planner.
//!
//! # Agents register themselves
//! Azure has no API that creates an agent record with its own credential: the agent runs `config.sh
//! --unattended --url $AZP_URL --auth pat --token <PAT> --pool $AZP_POOL --agent $AZP_AGENT_NAME --replace`
//! itself. So [`CiSource::register`] creates no record. It checks the pool exists and returns:
//! - `agent_id`: the id of an existing agent of that name in the pool (create-if-absent by name), else the
//!   placeholder `unregistered:<name>` — the real record appears (under that name) once the agent has run
//!   `config.sh`; the planner pairs agents with instances by name, never by this id;
//! - `token`: a PAT for `config.sh --token`. Azure has no per-agent token, so DESIGN's principle 6 ("an admin
//!   token never leaves the ciscale host") can only be kept by the user: the source's `agentPat` is handed out
//!   when set (a PAT scoped to "Agent Pools (read, manage)" only, which is all `config.sh` needs); without it the
//!   source's own `pat` is handed out and a warning is logged once per process;
//! - `env`: `AZP_URL`, `AZP_POOL`, `AZP_AGENT_NAME`, and `AZP_ONCE=true` for ephemeral pools (`run.sh --once`).
//!
//! # Agent ids
//! Agent ids are Azure's numeric ids. Drain, undrain and deregister need the agent's pool too: it is known from
//! the last observation, and otherwise found by asking each configured pool for that agent (`GET
//! pools/{id}/agents/{agentId}`), so a fresh process acting on a plan file needs no memory of earlier runs.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use jiff::Timestamp;
use reqwest::Method;

use crate::model::{AgentId, CiObservation, PoolName, Queue, Secret, EPHEMERAL_LABEL};
use crate::providers::{AgentCredential, CiCapabilities, CiSource, CloudLaunch, Error, Launch, RegisterAgent, Result};

mod history;
mod http;
mod wire;

pub use history::COMPLETED_REQUESTS;
pub use http::{AzureError, API_VERSION};
use http::{Http, PROVIDER};
use wire::{agent_to_model, requests_to_queue, List, WireAgent, WireJobRequest, WirePool};

/// Prefix of the placeholder agent id [`AzurePipelines::register`] returns before the agent registered itself.
pub const UNREGISTERED_PREFIX: &str = "unregistered:";
/// Env keys handed to the agent (see the module docs).
pub const ENV_URL: &str = "AZP_URL";
pub const ENV_POOL: &str = "AZP_POOL";
pub const ENV_AGENT_NAME: &str = "AZP_AGENT_NAME";
pub const ENV_ONCE: &str = "AZP_ONCE";
/// The variable Microsoft's documented agent container (`start.sh` of "Run a self-hosted agent in Docker") reads
/// the PAT for `config.sh --token` from.
pub const ENV_TOKEN: &str = "AZP_TOKEN";

/// Long-lived agents that can be disabled (drain); no per-agent credential (every agent gets the same PAT, see
/// the module docs). Microsoft publishes no agent container image — its docs have users build one from a
/// Dockerfile and `start.sh` — so a pool on a cloud server names its own, and the PAT goes in as `AZP_TOKEN`.
pub const CAPABILITIES: CiCapabilities = CiCapabilities {
    drain: true,
    per_agent_credentials: false,
    single_job: false,
    job_bound: false,
    matching: crate::model::Matching::PoolDemands,
    launch: Launch {
        agent: "Azure Pipelines",
        container_command: crate::providers::CONTAINER_AGENT_COMMAND,
        token_env: Some(ENV_TOKEN),
        cloud: CloudLaunch::Docker {
            default_image: None,
            needs: "set `agent.image` to an Azure Pipelines agent container image that registers itself from \
                    `AZP_URL`, `AZP_POOL`, `AZP_AGENT_NAME` and `AZP_TOKEN` (Microsoft's \"Run a self-hosted agent in \
                    Docker\" Dockerfile and `start.sh` build one)",
        },
    },
};
/// Every request's timeout unless the settings say otherwise: Azure answers list calls in well under a second;
/// 30 s covers a slow organization without stalling a watch cycle for long.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the source needs, from the config.
#[derive(Debug, Clone)]
pub struct AzureSettings {
    /// e.g. `https://dev.azure.com/acme` or an Azure DevOps Server collection URL.
    pub organization_url: String,
    /// Reads pools, agents and job requests; disables and deletes agents.
    pub pat: Secret,
    /// Handed to agents for their self-registration (see the module docs).
    pub agent_pat: Option<Secret>,
    /// ciscale pool → the Azure agent pool it is bound to.
    pub pools: BTreeMap<PoolName, String>,
    /// Timeout of each request.
    pub timeout: Duration,
}

impl AzureSettings {
    pub fn new(organization_url: impl Into<String>, pat: Secret) -> Self {
        Self {
            organization_url: organization_url.into(),
            pat,
            agent_pat: None,
            pools: BTreeMap::new(),
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

/// The Azure Pipelines [`CiSource`].
pub struct AzurePipelines {
    http: Http,
    organization_url: String,
    agent_pat: Option<Secret>,
    pools: BTreeMap<PoolName, String>,
    /// Azure pool name → id (looked up once).
    pool_ids: Mutex<BTreeMap<String, u32>>,
    /// Agent id → pool id, from the last observation.
    agent_pools: Mutex<BTreeMap<u32, u32>>,
    warned_admin_pat: AtomicBool,
}

impl std::fmt::Debug for AzurePipelines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzurePipelines")
            .field("organization_url", &self.organization_url)
            .field("pools", &self.pools)
            .field("agent_pat", &self.agent_pat.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

/// Locks a cache; a poisoned lock (a panic elsewhere) still holds a usable map.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn agent_not_found(id: &AgentId) -> Error {
    Error::NotFound { what: format!("azure agent `{id}`") }
}

impl AzurePipelines {
    /// Sets up the client; makes no call (the first observation is the first call).
    pub fn new(settings: AzureSettings) -> Result<Self> {
        let http = Http::new(&settings.organization_url, settings.pat, settings.timeout)?;
        let organization_url = http.base().as_str().trim_end_matches('/').to_owned();
        Ok(Self {
            http,
            organization_url,
            agent_pat: settings.agent_pat,
            pools: settings.pools,
            pool_ids: Mutex::new(BTreeMap::new()),
            agent_pools: Mutex::new(BTreeMap::new()),
            warned_admin_pat: AtomicBool::new(false),
        })
    }

    /// The distinct Azure pools this source reads, by name.
    fn azure_pools(&self) -> BTreeSet<&str> {
        self.pools.values().map(String::as_str).collect()
    }

    /// The id of an Azure pool, looked up by name once.
    async fn pool_id(&self, name: &str) -> Result<u32> {
        if let Some(id) = lock(&self.pool_ids).get(name) {
            return Ok(*id);
        }
        let what = format!("pool `{name}`");
        let answer = self.http.call(Method::GET, &["pools"], &[("poolName", name)], None, &what, &what).await?;
        let pools: List<WirePool> = answer.json()?;
        // `poolName` filters exactly but case-insensitively; prefer an exact match if several come back.
        let found = pools
            .value
            .iter()
            .find(|pool| pool.name == name)
            .or_else(|| pools.value.iter().find(|pool| pool.name.eq_ignore_ascii_case(name)))
            .map(|pool| pool.id)
            .ok_or_else(|| Error::Invalid {
                provider: PROVIDER.to_owned(),
                message: format!(
                    "agent pool `{name}` does not exist in `{}` (or the PAT cannot see it)\nhint: create it under \
                     Organization settings → Agent pools, or fix `azurePool`",
                    self.organization_url
                ),
            })?;
        lock(&self.pool_ids).insert(name.to_owned(), found);
        Ok(found)
    }

    /// Forgets a pool id Azure no longer knows, so the next call looks it up again.
    fn forget_pool(&self, name: &str, error: &Error) {
        if matches!(error, Error::NotFound { .. }) {
            lock(&self.pool_ids).remove(name);
        }
    }

    /// Agents and unfinished requests of one Azure pool: the two calls of a cycle.
    async fn observe_pool(&self, name: &str, observed_at: Timestamp) -> Result<(Vec<crate::model::Agent>, Queue, u32)> {
        let pool_id = self.pool_id(name).await?;
        let id_text = pool_id.to_string();
        let agents_what = format!("agents of pool `{name}`");
        let requests_what = format!("job requests of pool `{name}`");
        let pool_what = format!("pool `{name}` (id {pool_id})");
        let agents_path = ["pools", id_text.as_str(), "agents"];
        let requests_path = ["pools", id_text.as_str(), "jobrequests"];
        let agents_query = [
            ("includeAssignedRequest", "true"),
            ("includeLastCompletedRequest", "true"),
            ("includeCapabilities", "false"),
        ];
        let (agents, requests) = tokio::join!(
            self.http.call(Method::GET, &agents_path, &agents_query, None, &agents_what, &pool_what),
            self.http.call(Method::GET, &requests_path, &[], None, &requests_what, &pool_what),
        );
        let (agents, requests) = match (agents, requests) {
            (Ok(agents), Ok(requests)) => (agents, requests),
            (Err(error), _) | (_, Err(error)) => {
                self.forget_pool(name, &error);
                return Err(error);
            }
        };
        let agents: List<WireAgent> = agents.json()?;
        let requests: List<WireJobRequest> = requests.json()?;
        let (pending, running) = requests_to_queue(&requests.value, name);
        let model = agents.value.iter().map(|agent| agent_to_model(agent, name, observed_at)).collect();
        {
            let mut agent_pools = lock(&self.agent_pools);
            for agent in &agents.value {
                agent_pools.insert(agent.id, pool_id);
            }
        }
        Ok((model, Queue { pending, running }, pool_id))
    }

    /// The pool an agent is in: from the last observation, else by asking each configured pool.
    async fn pool_of_agent(&self, id: &AgentId) -> Result<(u32, u32)> {
        let agent: u32 = id.as_str().parse().map_err(|_| agent_not_found(id))?;
        if let Some(pool_id) = lock(&self.agent_pools).get(&agent) {
            return Ok((*pool_id, agent));
        }
        let agent_text = agent.to_string();
        for name in self.azure_pools() {
            let pool_id = self.pool_id(name).await?;
            let what = format!("agent `{id}` in pool `{name}`");
            let found = self
                .http
                .call(Method::GET, &["pools", &pool_id.to_string(), "agents", &agent_text], &[], None, &what, &what)
                .await;
            match found {
                Ok(_) => {
                    lock(&self.agent_pools).insert(agent, pool_id);
                    return Ok((pool_id, agent));
                }
                Err(Error::NotFound { .. }) => continue,
                Err(error) => return Err(error),
            }
        }
        Err(agent_not_found(id))
    }

    async fn set_enabled(&self, id: &AgentId, enabled: bool) -> Result<()> {
        let (pool_id, agent) = self.pool_of_agent(id).await?;
        let body = serde_json::json!({ "id": agent, "enabled": enabled });
        let what = format!("{} agent `{id}`", if enabled { "enable" } else { "disable" });
        let result = self
            .http
            .call(
                Method::PATCH,
                &["pools", &pool_id.to_string(), "agents", &agent.to_string()],
                &[],
                Some(&body),
                &what,
                &format!("azure agent `{id}`"),
            )
            .await;
        if matches!(result, Err(Error::NotFound { .. })) {
            lock(&self.agent_pools).remove(&agent);
        }
        result.map(|_| ())
    }

    /// The PAT agents register with (see the module docs).
    fn agent_token(&self) -> Secret {
        match &self.agent_pat {
            Some(agent_pat) => agent_pat.clone(),
            None => {
                if !self.warned_admin_pat.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        "agents of `{}` register with the source's own PAT: Azure has no per-agent tokens\nhint: set \
                         `agentPat` to a PAT scoped to \"Agent Pools (read, manage)\" only",
                        self.organization_url
                    );
                }
                self.http.pat().clone()
            }
        }
    }
}

#[async_trait]
impl CiSource for AzurePipelines {
    fn capabilities(&self) -> CiCapabilities {
        CAPABILITIES
    }

    fn kind(&self) -> &'static str {
        PROVIDER
    }

    async fn observe(&self) -> Result<CiObservation> {
        let observed_at = Timestamp::now();
        let mut observation = CiObservation::default();
        let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
        for name in self.azure_pools() {
            let (agents, queue, pool_id) = self.observe_pool(name, observed_at).await?;
            for agent in &agents {
                if let Ok(id) = agent.id.as_str().parse::<u32>() {
                    seen.insert(id, pool_id);
                }
            }
            observation.agents.extend(agents);
            observation.queue.pending.extend(queue.pending);
            observation.queue.running.extend(queue.running);
        }
        // The cache follows the world: an agent deleted elsewhere must not be looked for in its old pool.
        *lock(&self.agent_pools) = seen;
        Ok(observation)
    }

    async fn register(&self, request: &RegisterAgent) -> Result<AgentCredential> {
        let azure_pool = self.pools.get(&request.pool).ok_or_else(|| Error::Invalid {
            provider: PROVIDER.to_owned(),
            message: format!("pool `{}` is not bound to an azure agent pool of this source", request.pool),
        })?;
        let pool_id = self.pool_id(azure_pool).await?;
        let what = format!("agent `{}` in pool `{azure_pool}`", request.name);
        let pool_what = format!("pool `{azure_pool}` (id {pool_id})");
        let answer = self
            .http
            .call(
                Method::GET,
                &["pools", &pool_id.to_string(), "agents"],
                &[("agentName", &request.name)],
                None,
                &what,
                &pool_what,
            )
            .await;
        let existing = match answer {
            Ok(answer) => answer
                .json::<List<WireAgent>>()?
                .value
                .into_iter()
                .find(|agent| agent.name.eq_ignore_ascii_case(&request.name)),
            Err(error) => {
                self.forget_pool(azure_pool, &error);
                return Err(error);
            }
        };
        let agent_id = match existing {
            Some(agent) => {
                lock(&self.agent_pools).insert(agent.id, pool_id);
                AgentId::new(agent.id.to_string())
            }
            None => AgentId::new(format!("{UNREGISTERED_PREFIX}{}", request.name)),
        };
        let mut env = BTreeMap::from([
            (ENV_URL.to_owned(), self.organization_url.clone()),
            (ENV_POOL.to_owned(), azure_pool.clone()),
            (ENV_AGENT_NAME.to_owned(), request.name.clone()),
        ]);
        if request.labels.get(EPHEMERAL_LABEL).is_some_and(|value| value == "true") {
            env.insert(ENV_ONCE.to_owned(), "true".to_owned());
        }
        Ok(AgentCredential { agent_id, token: self.agent_token(), env })
    }

    async fn drain(&self, id: &AgentId) -> Result<()> {
        self.set_enabled(id, false).await
    }

    async fn undrain(&self, id: &AgentId) -> Result<()> {
        self.set_enabled(id, true).await
    }

    async fn history(&self, request: &crate::providers::HistoryRequest) -> Result<Vec<crate::providers::PastJob>> {
        self.job_history(request).await
    }

    async fn deregister(&self, id: &AgentId) -> Result<()> {
        let (pool_id, agent) = self.pool_of_agent(id).await?;
        let what = format!("delete agent `{id}`");
        let result = self
            .http
            .call(
                Method::DELETE,
                &["pools", &pool_id.to_string(), "agents", &agent.to_string()],
                &[],
                None,
                &what,
                &format!("azure agent `{id}`"),
            )
            .await;
        // Gone either way: it must not be looked for in that pool again.
        if matches!(result, Ok(_) | Err(Error::NotFound { .. })) {
            lock(&self.agent_pools).remove(&agent);
        }
        result.map(|_| ())
    }
}
