//! The observation, indexed once per plan for the lookups the rules make per instance and per agent: agents by
//! name and id, running jobs per agent, owned instances per pool, and work in flight by target.

use std::collections::BTreeMap;

use super::fasthash::{FastMap, FastSet};
use super::{Action, AgentTarget, Change};
use crate::model::{
    Agent, AgentId, AgentRef, BackendName, BackendObservation, CiName, CiObservation, Desired, InFlight, Instance,
    InstanceId, InstanceState, Observed, PoolName, AGENT_HASH_LABEL, AGENT_LABEL, OWNER_LABEL, POOL_LABEL,
};

/// One CI source's observation, indexed for the lookups the policy makes per instance.
pub(super) struct CiIndex<'a> {
    pub name: &'a CiName,
    pub agents_by_name: FastMap<&'a str, &'a Agent>,
    /// By id as `&str`, so an id read from an instance label is looked up without building an `AgentId`.
    pub agents_by_id: FastMap<&'a str, &'a Agent>,
    agents: &'a [Agent],
    /// Per agent, by its position in `agents`: the running jobs the queue lists on its id. By position rather
    /// than in a map by id: every member's agent is asked, and the lookup by id read two strings far apart.
    running: Vec<u32>,
}

impl<'a> CiIndex<'a> {
    pub fn new(name: &'a CiName, observation: &'a CiObservation) -> Self {
        let agents = observation.agents.as_slice();
        let mut agents_by_name = FastMap::with_capacity_and_hasher(agents.len(), Default::default());
        let mut agents_by_id: FastMap<&str, &Agent> =
            FastMap::with_capacity_and_hasher(agents.len(), Default::default());
        let mut duplicate_ids = false;
        for agent in agents {
            // First record wins on duplicates, so the choice follows the observation's order, not hashing.
            agents_by_name.entry(agent.name.as_str()).or_insert(agent);
            let first = *agents_by_id.entry(agent.id.as_str()).or_insert(agent);
            duplicate_ids |= !std::ptr::eq(first, agent);
        }
        // Counted at the first record of each id; a later record with the same id has that id's count too.
        let mut running = vec![0u32; agents.len()];
        for task in &observation.queue.running {
            let agent = task.agent_id.as_ref().and_then(|id| agents_by_id.get(id.as_str()));
            if let Some(position) = agent.and_then(|agent| agents.element_offset(agent)) {
                running[position] += 1;
            }
        }
        if duplicate_ids {
            for (position, agent) in agents.iter().enumerate() {
                let first = agents_by_id.get(agent.id.as_str()).and_then(|first| agents.element_offset(first));
                if let Some(first) = first.filter(|&first| first != position) {
                    running[position] = running[first];
                }
            }
        }
        Self { name, agents_by_name, agents_by_id, agents, running }
    }

    pub fn lookup(&self, reference: &AgentRef) -> Option<&'a Agent> {
        match reference {
            AgentRef::Id(id) => self.agents_by_id.get(id.as_str()).copied(),
            AgentRef::Name(name) => self.agents_by_name.get(name.as_str()).copied(),
        }
    }

    /// Running jobs the queue lists on the agent's id. The agents the rules hold are this source's own records,
    /// found by their position; a copy from elsewhere is found by its id (so it is never taken for idle).
    pub fn running_on(&self, agent: &Agent) -> u32 {
        let position = self
            .agents
            .element_offset(agent)
            .or_else(|| self.agents_by_id.get(agent.id.as_str()).and_then(|first| self.agents.element_offset(first)));
        position.map_or(0, |position| self.running[position])
    }

    pub fn is_busy(&self, agent: &Agent) -> bool {
        agent.busy || self.running_on(agent) > 0
    }

    pub fn target(&self, agent: &Agent) -> AgentTarget {
        AgentTarget { ci: self.name.clone(), id: agent.id.clone(), name: agent.name.clone() }
    }
}

/// One backend's instances, indexed by owner/pool label, by id and by name. Rules that walk every instance walk
/// `instances` by position and read `facts` at the same position, so each instance's labels are read once per plan.
pub(super) struct BackendIndex<'a> {
    pub name: &'a BackendName,
    pub observation: &'a BackendObservation,
    /// What each instance's labels say, by position in `observation.instances`.
    pub facts: Vec<InstanceFacts<'a>>,
    /// Instances labelled with our owner, by pool label value (`None`: no pool label), as positions.
    pub owned_by_pool: FastMap<Option<&'a str>, Vec<u32>>,
    /// Position of the first instance with this id.
    pub by_id: FastMap<&'a InstanceId, u32>,
    pub by_name: FastMap<&'a str, &'a Instance>,
    /// Per position, the first position with the same id; `None` when every id is listed once (as every backend
    /// does). The rules know an instance by its backend and id, so two listed with one id are one to them.
    first_of_id: Option<Vec<u32>>,
    /// Its place among the observed backends (in name order), for [`Claims`].
    slot: usize,
}

/// The labels of one instance that the rules read.
pub(super) struct InstanceFacts<'a> {
    /// It carries our owner label.
    pub ours: bool,
    /// Its pool label.
    pub pool: Option<&'a str>,
    /// Its `ciscale.agent` label (the id of its agent record).
    pub agent: Option<&'a str>,
    /// Its `ciscale.agent-hash` label (the agent settings it was created with).
    pub agent_hash: Option<&'a str>,
}

impl<'a> InstanceFacts<'a> {
    /// One pass over the instance's labels. Looking each label up in the map compared its key with those of the
    /// map's (which all start `ciscale.`) once per lookup, four lookups per instance per plan.
    fn read(instance: &'a Instance, owner: &str) -> Self {
        let mut facts = Self { ours: false, pool: None, agent: None, agent_hash: None };
        for (key, value) in &instance.labels {
            match key.as_str() {
                OWNER_LABEL => facts.ours = value.as_str() == owner,
                POOL_LABEL => facts.pool = Some(value.as_str()),
                AGENT_LABEL => facts.agent = Some(value.as_str()),
                AGENT_HASH_LABEL => facts.agent_hash = Some(value.as_str()),
                _ => {}
            }
        }
        facts
    }
}

impl<'a> BackendIndex<'a> {
    pub fn instances(&self) -> &'a [Instance] {
        &self.observation.instances
    }

    pub fn instance(&self, position: u32) -> &'a Instance {
        &self.observation.instances[position as usize]
    }

    /// The position the rules know the instance at `position` by (the first with its id).
    fn canonical(&self, position: u32) -> u32 {
        self.first_of_id.as_ref().map_or(position, |first| first[position as usize])
    }

    /// Whether some id is listed more than once.
    pub fn has_duplicate_ids(&self) -> bool {
        self.first_of_id.is_some()
    }
}

pub(super) fn index_backends<'a>(
    desired: &Desired,
    observed: &'a Observed,
) -> BTreeMap<&'a BackendName, BackendIndex<'a>> {
    observed
        .backends
        .iter()
        .enumerate()
        .map(|(slot, (name, backend))| {
            let count = backend.instances.len();
            let mut owned_by_pool: FastMap<Option<&str>, Vec<u32>> = FastMap::default();
            let mut by_id: FastMap<&InstanceId, u32> = FastMap::with_capacity_and_hasher(count, Default::default());
            let mut by_name = FastMap::with_capacity_and_hasher(count, Default::default());
            let mut facts = Vec::with_capacity(count);
            let mut duplicates = false;
            for (position, instance) in backend.instances.iter().enumerate() {
                let position = position as u32;
                duplicates |= *by_id.entry(&instance.id).or_insert(position) != position;
                if instance.state != InstanceState::Terminated {
                    by_name.entry(instance.name.as_str()).or_insert(instance);
                }
                let fact = InstanceFacts::read(instance, &desired.owner);
                if fact.ours {
                    owned_by_pool.entry(fact.pool).or_default().push(position);
                }
                facts.push(fact);
            }
            let first_of_id = duplicates.then(|| {
                backend.instances.iter().map(|instance| by_id.get(&instance.id).copied().unwrap_or_default()).collect()
            });
            (name, BackendIndex { name, observation: backend, facts, owned_by_pool, by_id, by_name, first_of_id, slot })
        })
        .collect()
}

/// Which pool claimed each instance (the first pool, in config order, that took it as its own), by backend and
/// position: every other instance with our owner label is an orphan, and the cost estimate prices an instance
/// by its pool's machine. An array per backend rather than a map keyed by (backend, id): every instance is
/// looked up, and positions need no hashing.
pub(super) struct Claims {
    by_backend: Vec<Vec<u32>>,
}

impl Claims {
    const NONE: u32 = u32::MAX;

    pub fn new(backends: &BTreeMap<&BackendName, BackendIndex<'_>>) -> Self {
        let mut by_backend = vec![Vec::new(); backends.len()];
        for backend in backends.values() {
            by_backend[backend.slot] = vec![Self::NONE; backend.facts.len()];
        }
        Self { by_backend }
    }

    /// The instance at `position` of `backend` is `pool`'s, unless an earlier pool claimed it.
    pub fn claim(&mut self, backend: &BackendIndex<'_>, position: u32, pool: usize) {
        let slot = &mut self.by_backend[backend.slot][backend.canonical(position) as usize];
        if *slot == Self::NONE {
            *slot = pool as u32;
        }
    }

    /// The pool that claimed the instance at `position` of `backend`.
    pub fn pool_of(&self, backend: &BackendIndex<'_>, position: u32) -> Option<usize> {
        let pool = self.by_backend[backend.slot][backend.canonical(position) as usize];
        (pool != Self::NONE).then_some(pool as usize)
    }

    /// The claimed instances of `backend` with their pools, one per id (the first position listing it), in
    /// position order.
    pub fn claimed<'s>(&'s self, backend: &'s BackendIndex<'_>) -> impl Iterator<Item = (u32, usize)> + 's {
        self.by_backend[backend.slot]
            .iter()
            .enumerate()
            .filter(|(_, pool)| **pool != Self::NONE)
            .map(|(position, pool)| (position as u32, *pool as usize))
    }
}

/// [`Observed::in_flight`], indexed by the targets it works on.
pub(super) struct InFlightIndex<'a> {
    work: &'a [InFlight],
    instances_by_id: FastSet<(&'a BackendName, &'a InstanceId)>,
    instances_by_name: FastSet<(&'a BackendName, &'a str)>,
    agents: FastSet<(&'a CiName, &'a AgentId)>,
    starts: FastSet<(&'a BackendName, &'a InstanceId)>,
}

impl<'a> InFlightIndex<'a> {
    pub fn new(observed: &'a Observed) -> Self {
        let mut index = Self {
            work: &observed.in_flight,
            instances_by_id: FastSet::default(),
            instances_by_name: FastSet::default(),
            agents: FastSet::default(),
            starts: FastSet::default(),
        };
        for work in &observed.in_flight {
            if let Some(target) = &work.instance {
                index.instances_by_name.insert((&target.backend, target.name.as_str()));
                if let Some(id) = &target.id {
                    index.instances_by_id.insert((&target.backend, id));
                    if work.action == Action::Start {
                        index.starts.insert((&target.backend, id));
                    }
                }
            }
            if let Some(agent) = &work.agent {
                index.agents.insert((&agent.ci, &agent.id));
            }
        }
        index
    }

    /// Whether a planned change acts on something work in flight acts on.
    pub fn touches(&self, change: &Change) -> bool {
        let instance = change.instance.as_ref().is_some_and(|target| {
            self.instances_by_name.contains(&(&target.backend, target.name.as_str()))
                || target.id.as_ref().is_some_and(|id| self.instances_by_id.contains(&(&target.backend, id)))
        });
        let agent = change.agent.as_ref().is_some_and(|agent| self.agents.contains(&(&agent.ci, &agent.id)));
        instance || agent
    }

    /// Names of the creates of `pool` in flight whose instance `backend` does not list (by name) yet.
    pub fn unlisted_creates(&self, pool: &PoolName, backend: Option<&BackendIndex<'_>>) -> Vec<&'a str> {
        let listed = |name: &str| backend.is_some_and(|backend| backend.by_name.contains_key(name));
        self.work
            .iter()
            .filter(|work| &work.pool == pool && work.action == Action::Create)
            .filter_map(|work| work.instance.as_ref().map(|target| target.name.as_str()))
            .filter(|name| !listed(name))
            .collect()
    }

    /// Whether a create of the pool's instance named `name` is in flight (the instance may be listed already:
    /// incusd lists a container while its create still runs).
    pub fn creates(&self, pool: &PoolName, name: &str) -> bool {
        self.work.iter().any(|work| {
            &work.pool == pool
                && work.action == Action::Create
                && work.instance.as_ref().is_some_and(|target| target.name == name)
        })
    }

    /// Whether some work in flight targets the instance named `name` on `backend`.
    pub fn names_instance(&self, backend: &BackendName, name: &str) -> bool {
        self.instances_by_name.contains(&(backend, name))
    }

    /// Whether some work in flight targets this instance (by id or by name).
    pub fn busy_with(&self, backend: &BackendName, instance: &Instance) -> bool {
        self.instances_by_id.contains(&(backend, &instance.id)) || self.names_instance(backend, &instance.name)
    }

    /// Whether a start of this instance is in flight.
    pub fn starts(&self, backend: &BackendName, id: &InstanceId) -> bool {
        self.starts.contains(&(backend, id))
    }
}

#[cfg(test)]
mod tests {
    use super::CiIndex;
    use crate::model::{Agent, AgentId, CiName, CiObservation, Queue, Task};

    fn agent(id: &str, name: &str) -> Agent {
        Agent {
            id: AgentId::new(id),
            name: name.to_owned(),
            busy: false,
            no_schedule: false,
            last_contact: None,
            last_work: None,
            labels: Default::default(),
            created_at: None,
        }
    }

    fn running_on(id: &str) -> Task {
        Task {
            id: format!("job-on-{id}").into(),
            labels: Default::default(),
            demands: Vec::new(),
            agent_id: Some(AgentId::new(id)),
        }
    }

    #[test]
    fn running_jobs_are_counted_per_agent_id_for_every_record_of_it() {
        let observation = CiObservation {
            agents: vec![agent("1", "a"), agent("2", "b"), agent("1", "a-again"), agent("3", "c")],
            queue: Queue {
                pending: Vec::new(),
                running: vec![running_on("1"), running_on("2"), running_on("1"), running_on("gone")],
            },
        };
        let name = CiName::new("wp");
        let index = CiIndex::new(&name, &observation);
        let counts: Vec<u32> = observation.agents.iter().map(|agent| index.running_on(agent)).collect();
        assert_eq!(counts, vec![2, 1, 2, 0]);
        assert!(index.is_busy(&observation.agents[2]), "a second record of a busy id is busy");
        // A copy of a record (not one of the source's own) is known by its id.
        assert_eq!(index.running_on(&agent("1", "a copy")), 2);
        assert_eq!(index.running_on(&agent("4", "unknown")), 0);
    }
}
