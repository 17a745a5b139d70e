//! A small simulated world — one backend account, one CI server — shared by two deployments and by people, with
//! the ground truth of everything in it: who made each instance and agent record, which agent runs on which
//! instance, which agent runs a job.
//!
//! Records get their names the honest way: a deployment's instances and agents are made by running its config
//! through `plan::plan` (the black box) and carrying out the plan's changes here the way `apply` does
//! ([`World::apply`], which follows the lifecycle documented in `src/apply/lifecycle.rs`); people register
//! look-alikes by hand. Each deployment observes the world the way the providers do: the backend lists the
//! instances labelled with its owner id plus the ones its config adopts by id ([`World::observe`]); the CI lists
//! every agent and the whole queue.

use std::collections::BTreeMap;

use ciscale::model::{
    Agent, AgentId, AgentRef, BackendName, BackendObservation, CiName, CiObservation, Desired, Instance, InstanceId,
    InstanceMode, InstanceState, LabelInterner, Observed, PoolName, Queue, Task, TaskId, AGENT_LABEL, EPHEMERAL_LABEL,
    OWNER_LABEL, POOL_LABEL,
};
use ciscale::plan::{Action, Change};
use jiff::{SignedDuration, Timestamp};

use super::oracle::{AgentOwner, InstanceOwner, TrueAgent, TrueInstance, Truth};

/// The one backend account both deployments create in.
pub const BACKEND: &str = "cloud";
/// The one CI server both deployments take jobs from.
pub const CI: &str = "ci";

/// Who made a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Maker {
    /// Deployment 0 (ours) or 1 (theirs), by carrying out its plans.
    Deployment(usize),
    /// A person, by hand.
    Person,
}

#[derive(Debug, Clone)]
pub struct WorldInstance {
    pub id: InstanceId,
    pub name: String,
    pub state: InstanceState,
    pub created_at: Timestamp,
    pub labels: BTreeMap<String, String>,
    pub attributes: BTreeMap<String, String>,
    pub maker: Maker,
    /// The pool its maker created it for.
    pub pool: Option<PoolName>,
    /// Not in the backend's listing yet (eventually consistent listings, a create that returned a moment ago).
    pub unlisted: bool,
}

#[derive(Debug, Clone)]
pub struct WorldAgent {
    pub id: AgentId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub no_schedule: bool,
    pub last_contact: Option<Timestamp>,
    pub last_work: Option<Timestamp>,
    pub maker: Maker,
    /// The instance it runs on.
    pub runs_on: Option<InstanceId>,
    /// Runs on a machine outside the backend (a person's runner): it checks in and takes jobs on its own.
    pub standalone: bool,
    /// Jobs it finished: an ephemeral agent takes one job, then powers its instance off.
    pub jobs_done: u32,
    /// When the CI created the record.
    pub registered_at: Timestamp,
}

#[derive(Debug, Clone)]
pub struct WorldTask {
    pub id: TaskId,
    pub labels: BTreeMap<String, String>,
    pub agent: Option<AgentId>,
}

/// How the CI tells that an agent is busy (CIs differ; the planner must read both signs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusySign {
    /// The agent's `busy` flag and the running task naming the agent.
    Both,
    /// Only the `busy` flag (running tasks do not name their agent).
    Flag,
    /// Only the running task naming the agent.
    Task,
}

/// A create a deployment started and has not finished: its agent is registered, its instance not made yet (the
/// `watch` loop's work outlives the cycle that planned it and is shown to the next plans as work in flight).
#[derive(Debug, Clone)]
pub struct Work {
    pub who: usize,
    pub change: Change,
    pub since: Timestamp,
}

/// What the world holds right now.
#[derive(Debug, Clone)]
pub struct World {
    pub now: Timestamp,
    pub instances: Vec<WorldInstance>,
    pub agents: Vec<WorldAgent>,
    pub tasks: Vec<WorldTask>,
    pub in_flight: Vec<Work>,
    pub busy_sign: BusySign,
    /// Deleted instances stay listed as terminated for a while (EC2) instead of vanishing.
    pub keeps_terminated: bool,
    next_id: u64,
}

impl World {
    pub fn new(now: Timestamp, busy_sign: BusySign, keeps_terminated: bool) -> Self {
        Self {
            now,
            instances: Vec::new(),
            agents: Vec::new(),
            tasks: Vec::new(),
            in_flight: Vec::new(),
            busy_sign,
            keeps_terminated,
            next_id: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// A person registers an agent record. `standalone`: it runs on a machine of their own and takes jobs.
    pub fn hand_register(&mut self, name: &str, platform: &str, standalone: bool) -> AgentId {
        let id = AgentId::new(self.next().to_string());
        self.agents.push(WorldAgent {
            id: id.clone(),
            name: name.to_owned(),
            labels: BTreeMap::from([("platform".to_owned(), platform.to_owned())]),
            no_schedule: false,
            last_contact: standalone.then_some(self.now),
            last_work: None,
            maker: Maker::Person,
            runs_on: None,
            standalone,
            jobs_done: 0,
            registered_at: self.now,
        });
        id
    }

    /// A person makes an instance (no owner label: e.g. a machine a config adopts by id).
    pub fn hand_instance(&mut self, name: &str, state: InstanceState) -> InstanceId {
        let id = InstanceId::new(format!("i-{}", self.next()));
        self.instances.push(WorldInstance {
            id: id.clone(),
            name: name.to_owned(),
            state,
            created_at: self.now - SignedDuration::from_hours(48),
            labels: BTreeMap::new(),
            attributes: BTreeMap::new(),
            maker: Maker::Person,
            pool: None,
            unlisted: false,
        });
        id
    }

    pub fn push_task(&mut self, platform: &str) {
        let id = TaskId::new(format!("t{}", self.next()));
        self.tasks.push(WorldTask {
            id,
            labels: BTreeMap::from([("platform".to_owned(), platform.to_owned())]),
            agent: None,
        });
    }

    pub fn instance(&self, id: &InstanceId) -> Option<&WorldInstance> {
        self.instances.iter().find(|instance| &instance.id == id)
    }

    fn instance_mut(&mut self, id: &InstanceId) -> Option<&mut WorldInstance> {
        self.instances.iter_mut().find(|instance| &instance.id == id)
    }

    fn agent_mut(&mut self, id: &AgentId) -> Option<&mut WorldAgent> {
        self.agents.iter_mut().find(|agent| &agent.id == id)
    }

    pub fn is_busy(&self, agent: &AgentId) -> bool {
        self.tasks.iter().any(|task| task.agent.as_ref() == Some(agent))
    }

    /// Whether the agent's machine runs (its instance is running, or it runs outside the backend).
    fn machine_runs(&self, agent: &WorldAgent) -> bool {
        agent.standalone
            || agent
                .runs_on
                .as_ref()
                .and_then(|id| self.instance(id))
                .is_some_and(|instance| instance.state == InstanceState::Running)
    }

    // -- the CI and its agents -------------------------------------------------------------------------------

    /// Agents whose machine runs check in (those `mask` picks, by position; a broken image never checks in). An
    /// instance whose agent has booted far enough to check in is listed by then: a listing lags by seconds, a
    /// boot takes longer.
    pub fn check_in(&mut self, mask: u32) {
        let now = self.now;
        let runs: Vec<bool> = self.agents.iter().map(|agent| self.machine_runs(agent)).collect();
        let mut booted = Vec::new();
        for (index, agent) in self.agents.iter_mut().enumerate() {
            if runs[index] && picks(mask, index) {
                agent.last_contact = Some(now);
                booted.extend(agent.runs_on.clone());
            }
        }
        for instance in self.instances.iter_mut().filter(|instance| booted.contains(&instance.id)) {
            instance.unlisted = false;
        }
    }

    fn can_take(&self, agent: &WorldAgent, task: &WorldTask) -> bool {
        self.machine_runs(agent)
            && agent.last_contact.is_some()
            && !(is_ephemeral(agent) && agent.jobs_done > 0)
            && !self.is_busy(&agent.id)
            && task.labels.iter().all(|(key, value)| agent.labels.get(key).is_some_and(|offered| offered == value))
    }

    /// The CI hands pending jobs to free, checked-in, undrained agents that match (the agents `mask` picks).
    pub fn take_jobs(&mut self, mask: u32) {
        let now = self.now;
        for task_index in 0..self.tasks.len() {
            if self.tasks[task_index].agent.is_some() {
                continue;
            }
            let taker = self
                .agents
                .iter()
                .enumerate()
                .find(|(index, agent)| {
                    picks(mask, *index) && !agent.no_schedule && self.can_take(agent, &self.tasks[task_index])
                })
                .map(|(_, agent)| agent.id.clone());
            if let Some(agent_id) = taker {
                self.tasks[task_index].agent = Some(agent_id.clone());
                if let Some(agent) = self.agent_mut(&agent_id) {
                    agent.last_work = Some(now);
                }
            }
        }
    }

    /// The race a drain can lose: the CI handed a job to an agent just before its drain landed, so a drained
    /// agent runs a job. The first drained agent (from `skip`) that can run one gets a job of its own.
    pub fn drained_takes_job(&mut self, skip: usize) {
        let now = self.now;
        let drained: Vec<usize> = (0..self.agents.len())
            .filter(|&index| {
                let agent = &self.agents[index];
                agent.no_schedule
                    && self.machine_runs(agent)
                    && agent.last_contact.is_some()
                    && !self.is_busy(&agent.id)
            })
            .collect();
        if drained.is_empty() {
            return;
        }
        let index = drained[skip % drained.len()];
        let agent_id = self.agents[index].id.clone();
        let labels = self.agents[index].labels.clone();
        let id = TaskId::new(format!("t{}", self.next()));
        self.tasks.push(WorldTask { id, labels, agent: Some(agent_id) });
        self.agents[index].last_work = Some(now);
    }

    /// Running jobs (those `mask` picks) finish.
    pub fn finish_jobs(&mut self, mask: u32) {
        let now = self.now;
        let mut finished = Vec::new();
        let mut index = 0;
        self.tasks.retain(|task| {
            let done = task.agent.is_some() && picks(mask, index);
            index += 1;
            if done {
                finished.extend(task.agent.clone());
            }
            !done
        });
        for agent_id in finished {
            let mut power_off = None;
            if let Some(agent) = self.agent_mut(&agent_id) {
                agent.last_work = Some(now);
                agent.jobs_done += 1;
                if is_ephemeral(agent) {
                    power_off = agent.runs_on.clone();
                }
            }
            // An ephemeral agent's wrapper powers its instance off after the one job.
            if let Some(instance) = power_off.and_then(|id| self.instance_mut(&id)) {
                instance.state = InstanceState::Stopped;
            }
        }
    }

    /// Time passes: booting instances run, listings catch up.
    pub fn advance(&mut self, minutes: i64) {
        self.now += SignedDuration::from_mins(minutes);
        for instance in &mut self.instances {
            instance.unlisted = false;
            if instance.state == InstanceState::Pending {
                instance.state = InstanceState::Running;
            }
        }
    }

    // -- a deployment's view ---------------------------------------------------------------------------------

    /// What deployment `who` observes with this config: per backend the instances labelled with its owner id plus
    /// the ones it adopts by id (as `ListInstances` asks), per CI source every agent and the whole queue, and its
    /// own work in flight.
    pub fn observe(&self, who: usize, desired: &Desired) -> Observed {
        let adopted = adopted_ids(desired);
        let instances: Vec<Instance> = self
            .instances
            .iter()
            .filter(|instance| !instance.unlisted)
            .filter(|instance| {
                instance.labels.get(OWNER_LABEL) == Some(&desired.owner) || adopted.contains(&instance.id)
            })
            .map(|instance| Instance {
                id: instance.id.clone(),
                name: instance.name.clone(),
                state: instance.state,
                created_at: instance.created_at,
                labels: instance.labels.clone(),
                attributes: instance.attributes.clone(),
            })
            .collect();
        let agents: Vec<Agent> = self
            .agents
            .iter()
            .map(|agent| Agent {
                id: agent.id.clone(),
                name: agent.name.clone(),
                busy: self.busy_sign != BusySign::Task && self.is_busy(&agent.id),
                no_schedule: agent.no_schedule,
                last_contact: agent.last_contact,
                last_work: agent.last_work,
                labels: agent.labels.clone(),
                created_at: Some(agent.registered_at),
            })
            .collect();
        // As a provider reads its queue: the jobs share their label sets.
        let mut interner = LabelInterner::new();
        let mut to_task = |task: &WorldTask| Task {
            id: task.id.clone(),
            labels: interner.labels(&task.labels),
            demands: Vec::new(),
            agent_id: if self.busy_sign == BusySign::Flag { None } else { task.agent.clone() },
        };
        let queue = Queue {
            pending: self.tasks.iter().filter(|task| task.agent.is_none()).map(&mut to_task).collect(),
            running: self.tasks.iter().filter(|task| task.agent.is_some()).map(&mut to_task).collect(),
        };
        let in_flight = self
            .in_flight
            .iter()
            .filter(|work| work.who == who)
            .map(|work| work.change.in_flight(work.since))
            .collect();
        let mut observed = Observed { observed_at: self.now, in_flight, ..Observed::default() };
        for backend in desired.backends.keys() {
            let listing = if backend.as_str() == BACKEND { instances.clone() } else { Vec::new() };
            observed.backends.insert(backend.clone(), BackendObservation { instances: listing, ..Default::default() });
        }
        for source in desired.ci.keys() {
            let observation = if source.as_str() == CI {
                CiObservation { agents: agents.clone(), queue: queue.clone() }
            } else {
                CiObservation::default()
            };
            observed.ci.insert(source.clone(), observation);
        }
        observed
    }

    /// The truth from deployment `who`'s point of view, `desired` being its config now.
    pub fn truth(&self, who: usize, desired: &Desired) -> Truth {
        let backend = BackendName::new(BACKEND);
        let ci = CiName::new(CI);
        let adopted_by = adopted_pools(desired);
        let instances = self
            .instances
            .iter()
            .map(|instance| {
                let (owner, pool) = if instance.maker == Maker::Deployment(who) {
                    (InstanceOwner::Created, instance.pool.clone())
                } else if let Some(pool) = adopted_by.get(&instance.id) {
                    (InstanceOwner::Adopted, Some(pool.clone()))
                } else {
                    (InstanceOwner::Foreign, None)
                };
                let truth = TrueInstance { name: instance.name.clone(), state: instance.state, owner, pool };
                ((backend.clone(), instance.id.clone()), truth)
            })
            .collect();
        let agents = self
            .agents
            .iter()
            .map(|agent| {
                let owner = if agent.maker == Maker::Deployment(who) {
                    AgentOwner::Registered
                } else if names_agent(desired, self, agent) {
                    AgentOwner::Named
                } else {
                    AgentOwner::Foreign
                };
                let truth = TrueAgent {
                    name: agent.name.clone(),
                    owner,
                    busy: self.is_busy(&agent.id),
                    runs_on: agent.runs_on.clone().map(|id| (backend.clone(), id)),
                };
                ((ci.clone(), agent.id.clone()), truth)
            })
            .collect();
        // A create in flight takes its slot until its instance exists.
        let mut creates_in_flight: BTreeMap<PoolName, u32> = BTreeMap::new();
        for work in self.in_flight.iter().filter(|work| work.who == who && work.change.action == Action::Create) {
            let name = work.change.instance.as_ref().map(|target| target.name.as_str());
            if !self.instances.iter().any(|instance| Some(instance.name.as_str()) == name) {
                *creates_in_flight.entry(work.change.pool.clone()).or_default() += 1;
            }
        }
        Truth { instances, agents, creates_in_flight }
    }

    // -- carrying out a deployment's plan --------------------------------------------------------------------

    /// Carries out `changes` for deployment `who` the way apply does (see `src/apply/lifecycle.rs`). The change at
    /// index `crash_at` dies half-way: a create after registering its agent, a delete after deleting its
    /// instance, anything else before its first call. `late`: the instances created now are not listed until time
    /// passes.
    pub fn apply(&mut self, who: usize, desired: &Desired, changes: &[Change], crash_at: Option<usize>, late: bool) {
        for (index, change) in changes.iter().enumerate() {
            let crash = crash_at == Some(index);
            match change.action {
                Action::Create => self.create(who, desired, change, crash, late),
                Action::Start => {
                    if crash {
                        continue;
                    }
                    if let Some(instance) = self.target_instance(change) {
                        self.instance_mut(&instance).map(|i| i.state = InstanceState::Running);
                    }
                    if let Some(agent) = &change.agent {
                        self.agent_mut(&agent.id).map(|a| a.no_schedule = false);
                    }
                }
                Action::Stop => {
                    if crash {
                        continue;
                    }
                    if let Some(instance) = self.target_instance(change) {
                        self.instance_mut(&instance).map(|i| i.state = InstanceState::Stopped);
                        self.drop_jobs_on(&instance);
                    }
                }
                Action::Drain => {
                    if crash {
                        continue;
                    }
                    if let Some(agent) = &change.agent {
                        self.agent_mut(&agent.id).map(|a| a.no_schedule = true);
                    }
                }
                Action::Delete => {
                    self.delete(desired, change, crash);
                }
                Action::Replace => {
                    if self.delete(desired, change, crash) {
                        self.create(who, desired, change, false, late);
                    }
                }
                Action::Deregister => {
                    if crash {
                        continue;
                    }
                    if let Some(agent) = &change.agent {
                        self.deregister(&agent.id);
                    }
                }
            }
        }
    }

    /// Starts `changes` for deployment `who` the way a loop whose work outlives its cycle does: creates register
    /// their agent and stay in flight ([`World::finish`] makes their instances); everything else is carried out.
    pub fn start(&mut self, who: usize, desired: &Desired, changes: &[Change]) {
        let (creates, rest): (Vec<Change>, Vec<Change>) =
            changes.iter().cloned().partition(|change| change.action == Action::Create);
        self.apply(who, desired, &rest, None, false);
        for change in creates {
            // The first step only: as if it died right after registering.
            self.create(who, desired, &change, true, false);
            self.in_flight.push(Work { who, change, since: self.now });
        }
    }

    /// Finishes deployment `who`'s creates in flight (`late`: the backend does not list them yet).
    pub fn finish(&mut self, who: usize, desired: &Desired, late: bool) {
        let (mine, others): (Vec<Work>, Vec<Work>) = self.in_flight.drain(..).partition(|work| work.who == who);
        self.in_flight = others;
        let changes: Vec<Change> = mine.into_iter().map(|work| work.change).collect();
        self.apply(who, desired, &changes, None, late);
    }

    fn target_instance(&self, change: &Change) -> Option<InstanceId> {
        change.instance.as_ref().and_then(|target| target.id.clone()).filter(|id| self.instance(id).is_some())
    }

    /// Register agent (a CI that keys agents by name hands over an existing record of that name) → create the
    /// instance with the plan's labels and machine → (pre-registered agent) undrain it.
    fn create(&mut self, who: usize, desired: &Desired, change: &Change, crash: bool, late: bool) {
        let Some(target) = &change.instance else { return };
        let Some(pool) = desired.pool(&change.pool) else { return };
        let agent_id = match (&pool.agent.preregistered, &change.agent) {
            (Some(_), Some(agent)) => agent.id.clone(),
            (Some(_), None) => return,
            (None, _) => match self.agents.iter().find(|agent| agent.name == target.name) {
                Some(existing) => existing.id.clone(),
                None => {
                    let id = AgentId::new(self.next().to_string());
                    // Apply registers the pool's labels, and marks agents of ephemeral pools.
                    let mut labels = pool.ci.labels.clone();
                    if pool.scale.ephemeral {
                        labels.insert(EPHEMERAL_LABEL.to_owned(), "true".to_owned());
                    }
                    self.agents.push(WorldAgent {
                        id: id.clone(),
                        name: target.name.clone(),
                        labels,
                        no_schedule: false,
                        last_contact: None,
                        last_work: None,
                        maker: Maker::Deployment(who),
                        runs_on: None,
                        standalone: false,
                        jobs_done: 0,
                        registered_at: self.now,
                    });
                    id
                }
            },
        };
        if crash {
            return;
        }
        // The backend refuses a second instance of one name (Incus, Hetzner); apply then takes over an owned one.
        if self
            .instances
            .iter()
            .any(|instance| instance.name == target.name && instance.state != InstanceState::Terminated)
        {
            return;
        }
        let mut labels: BTreeMap<String, String> = prefixed(&change.after, "label.");
        labels.entry(OWNER_LABEL.to_owned()).or_insert_with(|| desired.owner.clone());
        labels.entry(POOL_LABEL.to_owned()).or_insert_with(|| pool.name.to_string());
        // Apply links the instance to the agent record it runs (the record ids here are plain numbers, which fit a
        // label value everywhere).
        labels.insert(AGENT_LABEL.to_owned(), agent_id.to_string());
        let id = InstanceId::new(format!("i-{}", self.next()));
        self.instances.push(WorldInstance {
            id: id.clone(),
            name: target.name.clone(),
            state: InstanceState::Running,
            created_at: self.now,
            labels,
            attributes: prefixed(&change.after, "machine."),
            maker: Maker::Deployment(who),
            pool: Some(pool.name.clone()),
            // A lagging listing is only knowable through what the create left elsewhere: the agent record it
            // registered. A pre-registered agent's instance leaves nothing until work in flight is an input of
            // the planner (issue #9), so until then only registering pools are listed late.
            unlisted: late && pool.agent.preregistered.is_none(),
        });
        if let Some(agent) = self.agent_mut(&agent_id) {
            agent.runs_on = Some(id);
            if pool.agent.preregistered.is_some() {
                agent.no_schedule = false;
            }
        }
    }

    /// Check owner → delete the instance → deregister its agent (a pre-registered one is kept). Returns whether
    /// the delete went through.
    fn delete(&mut self, desired: &Desired, change: &Change, crash: bool) -> bool {
        if let Some(id) = self.target_instance(change) {
            let owned =
                self.instance(&id).is_some_and(|instance| instance.labels.get(OWNER_LABEL) == Some(&desired.owner));
            if !owned {
                return false;
            }
            self.drop_jobs_on(&id);
            if self.keeps_terminated {
                self.instance_mut(&id).map(|instance| instance.state = InstanceState::Terminated);
            } else {
                self.instances.retain(|instance| instance.id != id);
            }
            for agent in &mut self.agents {
                if agent.runs_on.as_ref() == Some(&id) {
                    agent.runs_on = None;
                }
            }
        }
        if crash {
            return false;
        }
        if let Some(agent) = &change.agent {
            let preregistered = desired.pools.iter().any(|pool| match &pool.agent.preregistered {
                Some(AgentRef::Id(id)) => *id == agent.id,
                Some(AgentRef::Name(name)) => *name == agent.name,
                None => false,
            });
            if !preregistered {
                self.deregister(&agent.id);
            }
        }
        true
    }

    fn deregister(&mut self, agent: &AgentId) {
        self.agents.retain(|record| &record.id != agent);
        // Its job dies with it.
        self.tasks.retain(|task| task.agent.as_ref() != Some(agent));
    }

    /// The jobs of agents on an instance that stops or goes away die with it.
    fn drop_jobs_on(&mut self, instance: &InstanceId) {
        let on_it: Vec<AgentId> =
            self.agents.iter().filter(|agent| agent.runs_on.as_ref() == Some(instance)).map(|a| a.id.clone()).collect();
        self.tasks.retain(|task| !task.agent.as_ref().is_some_and(|agent| on_it.contains(agent)));
    }
}

fn is_ephemeral(agent: &WorldAgent) -> bool {
    agent.labels.get(EPHEMERAL_LABEL).is_some_and(|value| value == "true")
}

/// Bit `index` of `mask` (positions past 31 reuse the low bits).
fn picks(mask: u32, index: usize) -> bool {
    mask & (1 << (index % 32)) != 0
}

fn prefixed(attributes: &BTreeMap<String, String>, prefix: &str) -> BTreeMap<String, String> {
    attributes
        .iter()
        .filter_map(|(key, value)| key.strip_prefix(prefix).map(|key| (key.to_owned(), value.clone())))
        .collect()
}

fn adopted_ids(desired: &Desired) -> Vec<InstanceId> {
    adopted_pools(desired).into_keys().collect()
}

/// Instance id → the pool that adopts it.
fn adopted_pools(desired: &Desired) -> BTreeMap<InstanceId, PoolName> {
    desired
        .pools
        .iter()
        .flat_map(|pool| match &pool.backend.mode {
            InstanceMode::StartStop { instances } => {
                instances.iter().map(|adopted| (adopted.id.clone(), pool.name.clone())).collect::<Vec<_>>()
            }
            InstanceMode::Create => Vec::new(),
        })
        .collect()
}

/// Whether the config names this agent record: a pool's pre-registered agent, or the agent of an instance it
/// adopts (by id, by name, or — without either — by the instance's own name, as `AdoptedInstance::agent` says).
fn names_agent(desired: &Desired, world: &World, agent: &WorldAgent) -> bool {
    let refers = |reference: &AgentRef| match reference {
        AgentRef::Id(id) => *id == agent.id,
        AgentRef::Name(name) => *name == agent.name,
    };
    desired.pools.iter().any(|pool| {
        pool.agent.preregistered.as_ref().is_some_and(refers)
            || match &pool.backend.mode {
                InstanceMode::StartStop { instances } => instances.iter().any(|adopted| match &adopted.agent {
                    Some(reference) => refers(reference),
                    None => world.instance(&adopted.id).is_some_and(|instance| instance.name == agent.name),
                }),
                InstanceMode::Create => false,
            }
    })
}
