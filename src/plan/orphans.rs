//! Orphans: instances labelled with this deployment's owner that no configured pool claims (their pool was
//! removed, or moved to another backend), and CI agent records of ours that have no instance.

use std::collections::BTreeMap;

use super::fasthash::{FastMap, FastSet};
use super::index::CiIndex;
use super::ownership::pool_of_agent_name;
use super::{Action, Change, InstanceTarget};
use crate::model::{AgentRef, BackendName, CiName, Desired, InstanceId, InstanceMode, InstanceState, Observed, PoolName, POOL_LABEL};

/// Rule 7a: instances with our owner label that no pool claims (their pool was removed from the config or moved
/// to another backend). Drained first while the agent works, then deleted.
pub(super) fn plan_orphan_instances(
    desired: &Desired,
    observed: &Observed,
    ci_indexes: &BTreeMap<&CiName, CiIndex<'_>>,
    claimed: &FastMap<(&BackendName, &InstanceId), usize>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (backend_name, backend) in &observed.backends {
        for instance in &backend.instances {
            if instance.owner() != Some(desired.owner.as_str()) || claimed.contains_key(&(backend_name, &instance.id)) {
                continue;
            }
            if matches!(instance.state, InstanceState::Terminated | InstanceState::Deleting | InstanceState::Stopping) {
                continue;
            }
            let pool_label = instance.labels.get(POOL_LABEL).cloned().unwrap_or_default();
            let why = match desired.pool(&PoolName::new(pool_label.clone())) {
                Some(pool) => format!("pool `{pool_label}` now uses backend `{}`", pool.backend.backend),
                None if pool_label.is_empty() => "instance has no pool label".to_owned(),
                None => format!("pool `{pool_label}` is no longer in the config"),
            };
            // The pool is gone, so its CI source is unknown: the first source (by name) with a matching agent.
            let found = ci_indexes
                .values()
                .find_map(|ci| ci.agents_by_name.get(instance.name.as_str()).map(|agent| (ci, *agent)));
            let target = InstanceTarget {
                backend: backend_name.clone(),
                id: Some(instance.id.clone()),
                name: instance.name.clone(),
            };
            let (action, reason) = match found {
                // Never touch a busy agent: the orphan is picked up on a later cycle.
                Some((ci, agent)) if ci.is_busy(agent) => continue,
                Some((_, agent)) if !agent.no_schedule && instance.state.is_active() => {
                    (Action::Drain, format!("orphan: {why}"))
                }
                _ => (Action::Delete, format!("orphan: {why}")),
            };
            changes.push(Change {
                pool: PoolName::new(pool_label),
                action,
                instance: Some(target),
                agent: found.map(|(ci, agent)| ci.target(agent)),
                reason,
                before: BTreeMap::new(),
                after: BTreeMap::new(),
            });
        }
    }
    changes
}

/// Rule 7b: agent records named like ours (`{owner}-...`) with no observed instance of that name and no job.
/// Agents of adopted instances are never touched: ciscale did not register them.
pub(super) fn plan_orphan_agents(
    desired: &Desired,
    observed: &Observed,
    ci_indexes: &BTreeMap<&CiName, CiIndex<'_>>,
) -> Vec<Change> {
    let prefix = format!("{}-", desired.owner);
    let instance_names: FastSet<&str> = observed
        .backends
        .values()
        .flat_map(|backend| backend.instances.iter())
        .filter(|instance| instance.state != InstanceState::Terminated)
        .map(|instance| instance.name.as_str())
        .collect();
    let mut adopted_agents: FastSet<(&CiName, AgentRefKey<'_>)> = FastSet::default();
    for pool in &desired.pools {
        // A pre-registered agent has no instance named after it, and must outlive every instance it ran on.
        match &pool.agent.preregistered {
            Some(AgentRef::Id(id)) => {
                adopted_agents.insert((&pool.ci.source, AgentRefKey::Id(id.as_str())));
            }
            Some(AgentRef::Name(name)) => {
                adopted_agents.insert((&pool.ci.source, AgentRefKey::Name(name.as_str())));
            }
            None => {}
        }
        if let InstanceMode::StartStop { instances } = &pool.backend.mode {
            for adoption in instances {
                let key = match &adoption.agent {
                    Some(AgentRef::Id(id)) => AgentRefKey::Id(id.as_str()),
                    Some(AgentRef::Name(name)) => AgentRefKey::Name(name.as_str()),
                    None => AgentRefKey::Instance(adoption.id.as_str()),
                };
                adopted_agents.insert((&pool.ci.source, key));
            }
        }
    }
    let mut changes = Vec::new();
    for (ci_name, observation) in &observed.ci {
        let Some(ci) = ci_indexes.get(ci_name) else {
            continue;
        };
        for agent in &observation.agents {
            if !agent.name.starts_with(&prefix) || instance_names.contains(agent.name.as_str()) || ci.is_busy(agent) {
                continue;
            }
            let adopted = adopted_agents.contains(&(ci_name, AgentRefKey::Id(agent.id.as_str())))
                || adopted_agents.contains(&(ci_name, AgentRefKey::Name(agent.name.as_str())))
                || adopted_agents.contains(&(ci_name, AgentRefKey::Instance(agent.name.as_str())));
            if adopted {
                continue;
            }
            changes.push(Change {
                pool: pool_of_agent_name(desired, &agent.name),
                action: Action::Deregister,
                instance: None,
                agent: Some(ci.target(agent)),
                reason: "agent record has no instance".to_owned(),
                before: BTreeMap::new(),
                after: BTreeMap::new(),
            });
        }
    }
    changes
}

#[derive(PartialEq, Eq, Hash)]
enum AgentRefKey<'a> {
    Id(&'a str),
    Name(&'a str),
    /// No explicit reference: the agent is named like the adopted instance's id/name.
    Instance(&'a str),
}
