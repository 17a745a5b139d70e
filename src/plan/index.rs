//! The observation, indexed once per plan for the lookups the rules make per instance and per agent: agents by
//! name and id, running jobs per agent, owned instances per pool, and work in flight by target.

use std::collections::BTreeMap;

use super::fasthash::{FastMap, FastSet};
use super::{Action, AgentTarget, Change};
use crate::model::{
    Agent, AgentId, AgentRef, BackendName, CiName, CiObservation, Desired, InFlight, Instance, InstanceId,
    InstanceState, Observed, PoolName, POOL_LABEL,
};

/// One CI source's observation, indexed for the lookups the policy makes per instance.
pub(super) struct CiIndex<'a> {
    pub name: &'a CiName,
    pub agents_by_name: FastMap<&'a str, &'a Agent>,
    /// By id as `&str`, so an id read from an instance label is looked up without building an `AgentId`.
    pub agents_by_id: FastMap<&'a str, &'a Agent>,
    pub running_by_agent: FastMap<&'a str, u32>,
}

impl<'a> CiIndex<'a> {
    pub fn new(name: &'a CiName, observation: &'a CiObservation) -> Self {
        let mut agents_by_name = FastMap::with_capacity_and_hasher(observation.agents.len(), Default::default());
        let mut agents_by_id = FastMap::with_capacity_and_hasher(observation.agents.len(), Default::default());
        for agent in &observation.agents {
            // First record wins on duplicates, so the choice follows the observation's order, not hashing.
            agents_by_name.entry(agent.name.as_str()).or_insert(agent);
            agents_by_id.entry(agent.id.as_str()).or_insert(agent);
        }
        let mut running_by_agent: FastMap<&str, u32> = FastMap::default();
        for task in &observation.queue.running {
            if let Some(agent_id) = &task.agent_id {
                *running_by_agent.entry(agent_id.as_str()).or_default() += 1;
            }
        }
        Self { name, agents_by_name, agents_by_id, running_by_agent }
    }

    pub fn lookup(&self, reference: &AgentRef) -> Option<&'a Agent> {
        match reference {
            AgentRef::Id(id) => self.agents_by_id.get(id.as_str()).copied(),
            AgentRef::Name(name) => self.agents_by_name.get(name.as_str()).copied(),
        }
    }

    pub fn running_on(&self, agent: &Agent) -> u32 {
        self.running_by_agent.get(agent.id.as_str()).copied().unwrap_or(0)
    }

    pub fn is_busy(&self, agent: &Agent) -> bool {
        agent.busy || self.running_on(agent) > 0
    }

    pub fn target(&self, agent: &Agent) -> AgentTarget {
        AgentTarget { ci: self.name.clone(), id: agent.id.clone(), name: agent.name.clone() }
    }
}

/// Instances of every backend, indexed by owner/pool label and by id.
pub(super) struct BackendIndex<'a> {
    /// Instances labelled with our owner, by pool label value (`None`: no pool label).
    pub owned_by_pool: FastMap<Option<&'a str>, Vec<&'a Instance>>,
    pub by_id: FastMap<&'a InstanceId, &'a Instance>,
    pub by_name: FastMap<&'a str, &'a Instance>,
}

pub(super) fn index_backends<'a>(desired: &Desired, observed: &'a Observed) -> BTreeMap<&'a BackendName, BackendIndex<'a>> {
    observed
        .backends
        .iter()
        .map(|(name, backend)| {
            let mut owned_by_pool: FastMap<Option<&str>, Vec<&Instance>> = FastMap::default();
            let mut by_id = FastMap::with_capacity_and_hasher(backend.instances.len(), Default::default());
            let mut by_name = FastMap::with_capacity_and_hasher(backend.instances.len(), Default::default());
            for instance in &backend.instances {
                by_id.entry(&instance.id).or_insert(instance);
                if instance.state != InstanceState::Terminated {
                    by_name.entry(instance.name.as_str()).or_insert(instance);
                }
                if instance.owner() == Some(desired.owner.as_str()) {
                    owned_by_pool
                        .entry(instance.labels.get(POOL_LABEL).map(String::as_str))
                        .or_default()
                        .push(instance);
                }
            }
            (name, BackendIndex { owned_by_pool, by_id, by_name })
        })
        .collect()
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
