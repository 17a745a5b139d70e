//! The fake world's state: plain serialisable data, so a file-backed world can be shared by separate processes
//! and a test can assert on everything that happened. It never holds a secret: agent tokens are kept as SHA-256
//! digests, pushed files and user data as digests of their content.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::model::{
    Agent, AgentId, Instance, InstanceId, InstanceState, LabelInterner, PoolName, Price, Queue, Task, TaskId,
};

use super::fault::Fault;

pub use crate::model::EPHEMERAL_LABEL;

/// How far back the job feed starts: ten minutes hold one busy stretch of the `demo` profile whatever the time.
pub const FEED_BACKFILL_SECS: i64 = 10 * 60;

/// How long a task pushed with [`super::FakeWorld::push_task`] runs once an agent takes it.
pub const DEFAULT_RUN_FOR_SECS: u64 = 60;

/// Everything in the fake world. Public fields so tests can assert on any of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WorldState {
    /// The fake's clock; `None` follows the real clock (CLI demos), tests set it.
    pub now: Option<Timestamp>,
    /// Whether the fake backend reports the `exec` capability (containers) or not (clouds with user data).
    pub exec_capability: bool,
    /// The fake CI serves agents whose instances live on another backend (e.g. the in-repo Hetzner fake), which
    /// this world cannot see: the simulation then counts every registered agent as on a running instance, so it
    /// checks in as soon as it is registered. Off: an agent checks in only while its instance here runs.
    pub instances_elsewhere: bool,
    /// In creation order.
    pub instances: Vec<FakeInstance>,
    /// In registration order.
    pub agents: Vec<FakeAgent>,
    /// Pending and running tasks, in push order.
    pub tasks: Vec<FakeTask>,
    /// Hourly price per machine type (the `server_type` machine attribute), reported by `observe`.
    pub prices: BTreeMap<String, Price>,
    /// Calls per operation (`backend.create`, `ci.observe`, ...), failed ones included: what a real API would
    /// have counted against a rate limit.
    pub calls: BTreeMap<String, u64>,
    /// Files pushed to instances that still exist (a delete takes an instance's files with it).
    pub pushed_files: Vec<PushedFile>,
    /// Commands run in instances that still exist (a delete takes an instance's records with it).
    pub execs: Vec<ExecRecord>,
    /// Injected faults still armed.
    pub faults: Vec<ArmedFault>,
    /// Counters behind the deterministic ids.
    pub counters: Counters,
    /// How far the job feed has queued its jobs ([`super::JobFeed`]); `None` until its first observation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs_fed_until: Option<Timestamp>,
    /// Names of machines that run outside the fake world (a real backend, e.g. moto's EC2, in end-to-end
    /// tests): `simulate` lets the agents of these names check in and take jobs as if a fake instance of that
    /// name were running. Whoever drives the test keeps the list in step with the real backend.
    pub external_running: Vec<String>,
    /// Armed holds: operation key → milliseconds the caller of its next successful call waits before it hears the
    /// answer (see [`super::FakeWorld::hold_after`]).
    pub holds: BTreeMap<String, u64>,
    /// The operation keys whose hold fired, in order.
    pub held: Vec<String>,
    /// Every mutation of instances and agents with what was true at that moment, for crash tests; `None` (the
    /// default) keeps none (see [`super::FakeWorld::keep_journal`]).
    pub journal: Option<Vec<JournalEntry>>,
}

/// One mutation in [`WorldState::journal`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    pub at: Timestamp,
    /// The operation's key (`backend.create`, `ci.deregister`, ...).
    pub op: String,
    /// The instance's or the agent's name.
    pub target: String,
    /// The instance's `ciscale.pool` label (backend operations).
    #[serde(default)]
    pub pool: Option<String>,
    /// After a create: the instances with that pool label, in any state.
    #[serde(default)]
    pub in_pool: Option<u32>,
    /// The agents running a task at that moment, by name.
    #[serde(default)]
    pub busy_agents: Vec<String>,
}

impl Default for WorldState {
    fn default() -> Self {
        Self {
            now: None,
            exec_capability: true,
            instances_elsewhere: false,
            instances: Vec::new(),
            agents: Vec::new(),
            tasks: Vec::new(),
            prices: BTreeMap::new(),
            calls: BTreeMap::new(),
            pushed_files: Vec::new(),
            execs: Vec::new(),
            faults: Vec::new(),
            counters: Counters::default(),
            jobs_fed_until: None,
            external_running: Vec::new(),
            holds: BTreeMap::new(),
            held: Vec::new(),
            journal: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Counters {
    pub instances: u64,
    pub agents: u64,
    pub tasks: u64,
    pub tokens: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FakeInstance {
    pub id: InstanceId,
    pub name: String,
    pub state: InstanceState,
    pub created_at: Timestamp,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The machine attributes it was created with.
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// SHA-256 of the bootstrap user data, when there was any.
    #[serde(default)]
    pub user_data_sha256: Option<String>,
}

impl FakeInstance {
    pub fn to_model(&self) -> Instance {
        Instance {
            id: self.id.clone(),
            name: self.name.clone(),
            state: self.state,
            created_at: self.created_at,
            labels: self.labels.clone(),
            attributes: self.attributes.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FakeAgent {
    pub id: AgentId,
    pub name: String,
    #[serde(default)]
    pub pool: Option<PoolName>,
    #[serde(default)]
    pub no_schedule: bool,
    #[serde(default)]
    pub last_contact: Option<Timestamp>,
    #[serde(default)]
    pub last_work: Option<Timestamp>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// SHA-256 of the agent's current token (the token itself is handed out once and never stored).
    pub token_sha256: String,
    /// Jobs this agent has finished (an ephemeral agent takes no job after its first).
    #[serde(default)]
    pub jobs_done: u32,
    /// When it was registered (absent in state files from before it was kept).
    #[serde(default)]
    pub created_at: Option<Timestamp>,
}

impl FakeAgent {
    pub fn is_ephemeral(&self) -> bool {
        self.labels.get(EPHEMERAL_LABEL).is_some_and(|value| value == "true")
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FakeTask {
    pub id: TaskId,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub demands: Vec<String>,
    /// The agent running it; `None` while pending.
    #[serde(default)]
    pub agent_id: Option<AgentId>,
    /// When an agent took it (running tasks only).
    #[serde(default)]
    pub started_at: Option<Timestamp>,
    /// How long it runs once taken.
    pub run_for_secs: u64,
}

/// A file pushed into an instance, as far as a test needs to know: where, how, and a digest of what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedFile {
    pub instance: InstanceId,
    pub path: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub sha256: String,
    pub len: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRecord {
    pub instance: InstanceId,
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub wait: bool,
}

/// An injected fault and how far it has got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArmedFault {
    pub fault: Fault,
    /// Calls of the fault's operation seen since it was injected.
    pub seen: u64,
    /// Failures it has caused so far.
    pub fired: u32,
}

/// Lower-case hex SHA-256, the form digests are stored in.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|byte| format!("{byte:02x}")).collect()
}

impl WorldState {
    pub fn now(&self) -> Timestamp {
        self.now.unwrap_or_else(Timestamp::now)
    }

    pub fn instance_mut(&mut self, id: &InstanceId) -> Option<&mut FakeInstance> {
        self.instances.iter_mut().find(|instance| &instance.id == id)
    }

    pub fn agent_mut(&mut self, id: &AgentId) -> Option<&mut FakeAgent> {
        self.agents.iter_mut().find(|agent| &agent.id == id)
    }

    /// Appends to the journal, when one is kept: `op` on `target` (an instance of `pool`, or an agent).
    pub(super) fn record(&mut self, op: &str, target: &str, pool: Option<&str>) {
        if self.journal.is_none() {
            return;
        }
        let in_pool = (op == "backend.create").then(|| {
            let count = self
                .instances
                .iter()
                .filter(|instance| instance.labels.get(crate::model::POOL_LABEL).map(String::as_str) == pool)
                .count();
            u32::try_from(count).unwrap_or(u32::MAX)
        });
        let busy_agents =
            self.agents.iter().filter(|agent| self.is_busy(&agent.id)).map(|agent| agent.name.clone()).collect();
        let entry = JournalEntry {
            at: self.now(),
            op: op.to_owned(),
            target: target.to_owned(),
            pool: pool.map(str::to_owned),
            in_pool,
            busy_agents,
        };
        if let Some(journal) = &mut self.journal {
            journal.push(entry);
        }
    }

    fn is_busy(&self, agent: &AgentId) -> bool {
        self.tasks.iter().any(|task| task.agent_id.as_ref() == Some(agent))
    }

    pub fn agents_model(&self) -> Vec<Agent> {
        self.agents
            .iter()
            .map(|agent| Agent {
                id: agent.id.clone(),
                name: agent.name.clone(),
                busy: self.is_busy(&agent.id),
                no_schedule: agent.no_schedule,
                last_contact: agent.last_contact,
                last_work: agent.last_work,
                labels: agent.labels.clone(),
                created_at: agent.created_at,
            })
            .collect()
    }

    pub fn queue_model(&self) -> Queue {
        // As a real provider reads its queue: each distinct label set stored once, for this observation.
        let mut interner = LabelInterner::new();
        let mut to_task = |task: &FakeTask| Task {
            id: task.id.clone(),
            labels: interner.labels(&task.labels),
            demands: task.demands.clone(),
            agent_id: task.agent_id.clone(),
        };
        Queue {
            pending: self.tasks.iter().filter(|task| task.agent_id.is_none()).map(&mut to_task).collect(),
            running: self.tasks.iter().filter(|task| task.agent_id.is_some()).map(&mut to_task).collect(),
        }
    }

    /// Names of the agents whose instance runs: same-named running instances of this world, or every registered
    /// agent when the instances live elsewhere.
    fn names_on_running_instances(&self) -> Vec<String> {
        if self.instances_elsewhere {
            return self.agents.iter().map(|agent| agent.name.clone()).collect();
        }
        self.instances
            .iter()
            .filter(|instance| instance.state == InstanceState::Running)
            .map(|instance| instance.name.clone())
            .chain(self.external_running.iter().cloned())
            .collect()
    }

    /// Queues the feed's jobs that arrived since the last call; the first call queues those of the last
    /// [`FEED_BACKFILL_SECS`], so a fresh demo has work at once.
    pub fn feed_jobs(&mut self, feed: &super::JobFeed) {
        let now = self.now();
        let backfill = jiff::SignedDuration::from_secs(FEED_BACKFILL_SECS);
        let from = self.jobs_fed_until.unwrap_or_else(|| now.checked_sub(backfill).unwrap_or(now));
        self.jobs_fed_until = Some(now.max(from));
        if from >= now {
            return;
        }
        let jobs = crate::simulate::synthetic::jobs_between(feed.profile, feed.seed, 1.0, &feed.templates, from, now);
        for job in jobs {
            self.counters.tasks += 1;
            let id = TaskId::new(format!("t{}", self.counters.tasks));
            let run_for_secs = u64::try_from(job.duration.as_secs()).unwrap_or(0);
            tracing::info!(task = %id, labels = ?job.labels, run_for_secs, "fake ci: job queued");
            self.tasks.push(FakeTask {
                id,
                labels: job.labels.iter().map(|(key, value)| (key.to_owned(), value.to_owned())).collect(),
                demands: job.demands,
                agent_id: None,
                started_at: None,
                run_for_secs,
            });
        }
    }

    /// Plays the CI and its agents for one step; see [`super::FakeWorld::simulate`].
    pub fn simulate(&mut self) {
        let now = self.now();

        // Agents whose instance runs check in.
        let running_names = self.names_on_running_instances();
        for agent in &mut self.agents {
            if running_names.contains(&agent.name) {
                agent.last_contact = Some(now);
            }
        }

        // Running tasks that have run long enough finish.
        let mut finished_by = Vec::new();
        self.tasks.retain(|task| {
            let done = match (&task.agent_id, task.started_at) {
                (Some(agent), Some(started_at)) => {
                    let run_for = jiff::SignedDuration::from_secs(i64::try_from(task.run_for_secs).unwrap_or(i64::MAX));
                    let ends_at = started_at.checked_add(run_for).unwrap_or(Timestamp::MAX);
                    if ends_at <= now {
                        finished_by.push(agent.clone());
                        true
                    } else {
                        false
                    }
                }
                _ => false,
            };
            !done
        });
        for agent_id in &finished_by {
            tracing::info!(agent = %agent_id, "fake ci: job finished");
        }
        for agent_id in finished_by {
            let mut power_off = None;
            if let Some(agent) = self.agent_mut(&agent_id) {
                agent.last_work = Some(now);
                agent.jobs_done = agent.jobs_done.saturating_add(1);
                if agent.is_ephemeral() {
                    power_off = Some(agent.name.clone());
                }
            }
            // An ephemeral agent's wrapper powers the instance off after its one job.
            if let Some(name) = power_off {
                for instance in self.instances.iter_mut().filter(|instance| instance.name == name) {
                    instance.state = InstanceState::Stopped;
                }
            }
        }

        // Pending tasks go to a free, matching, checked-in agent (an instance powered off just now takes none).
        let running_names = self.names_on_running_instances();
        for index in 0..self.tasks.len() {
            if self.tasks[index].agent_id.is_some() {
                continue;
            }
            let candidate = self
                .agents
                .iter()
                .find(|agent| {
                    running_names.contains(&agent.name)
                        && agent.last_contact.is_some()
                        && !agent.no_schedule
                        && !(agent.is_ephemeral() && agent.jobs_done > 0)
                        && !self.is_busy(&agent.id)
                        && labels_match(&self.tasks[index].labels, &agent.labels)
                })
                .map(|agent| agent.id.clone());
            if let Some(agent_id) = candidate {
                let task = &mut self.tasks[index];
                task.agent_id = Some(agent_id.clone());
                task.started_at = Some(now);
                tracing::info!(task = %task.id, agent = %agent_id, "fake ci: job taken");
                if let Some(agent) = self.agent_mut(&agent_id) {
                    agent.last_work = Some(now);
                }
            }
        }
    }
}

/// The fake's (simplified Woodpecker) matching rule: every task label with a value, except Woodpecker's internal
/// `woodpecker-ci.org/*` ones, must be on the agent with that value or `*`.
pub fn labels_match(task: &BTreeMap<String, String>, agent: &BTreeMap<String, String>) -> bool {
    task.iter()
        .filter(|(key, value)| !value.is_empty() && !key.starts_with("woodpecker-ci.org/"))
        .all(|(key, value)| agent.get(key).is_some_and(|offered| offered == value || offered == "*"))
}
