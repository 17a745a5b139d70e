//! Orphan instances: instances labelled with this deployment's owner that no configured pool claims (their pool
//! was removed, or moved to another backend). They are drained while their agent serves, then deleted. (Agent
//! records without an instance are [`super::records`]' business.)
//!
//! Never a busy agent: the agent an orphan runs is found through the instance's `ciscale.agent` label (the
//! record's id, written at create time; this finds a pre-registered agent not named after its instance) and
//! through its name. An orphan from before the label was written whose agent is not found by name may still
//! run one, e.g. a pool that used a pre-registered agent: while some busy agent is not accounted for by any
//! instance, such an orphan is kept, with a note saying why.

use std::collections::BTreeMap;

use super::fasthash::FastSet;
use super::index::{BackendIndex, Claims, CiIndex};
use super::{Action, Change, InstanceTarget};
use crate::model::{Agent, BackendName, CiName, Desired, Instance, InstanceState, Observed, PoolName, AGENT_LABEL};

/// Rule 7: instances with our owner label that no pool claims. Returns the changes and the notes on the orphans
/// kept.
pub(super) fn plan_orphan_instances(
    desired: &Desired,
    observed: &Observed,
    ci_indexes: &BTreeMap<&CiName, CiIndex<'_>>,
    backends: &BTreeMap<&BackendName, BackendIndex<'_>>,
    claims: &Claims,
) -> (Vec<Change>, Vec<String>) {
    // Built on first need: most plans have no orphan at all.
    let mut unaccounted_busy: Option<Vec<(&CiName, String)>> = None;
    let mut changes = Vec::new();
    let mut notes = Vec::new();
    for backend in backends.values() {
        let backend_name = backend.name;
        for (position, instance) in backend.instances().iter().enumerate() {
            if !backend.facts[position].ours || claims.pool_of(backend, position as u32).is_some() {
                continue;
            }
            if matches!(instance.state, InstanceState::Terminated | InstanceState::Deleting | InstanceState::Stopping) {
                continue;
            }
            let pool_label = backend.facts[position].pool.unwrap_or_default().to_owned();
            let configured = desired.pool(&PoolName::new(pool_label.clone()));
            let why = match configured {
                Some(pool) => format!("pool `{pool_label}` now uses backend `{}`", pool.backend.backend),
                None if pool_label.is_empty() => "instance has no pool label".to_owned(),
                None => format!("pool `{pool_label}` is no longer in the config"),
            };
            // A pool still configured says which CI source its agents are in; a removed one does not: every source.
            let sources: Vec<&CiIndex<'_>> = match configured {
                Some(pool) => ci_indexes.get(&pool.ci.source).into_iter().collect(),
                None => ci_indexes.values().collect(),
            };
            let linked = linked_agents(instance, &sources);
            let label = instance.labels.get(AGENT_LABEL);
            let name = &instance.name;
            if let Some((_, agent)) = linked.by_label.iter().chain(&linked.by_name).find(|(ci, agent)| ci.is_busy(agent)) {
                // Never touch a busy agent: the orphan is picked up on a later cycle.
                notes.push(format!("orphan {name}: kept while its agent `{}` runs a job ({why})", agent.name));
                continue;
            }
            if linked.by_label.len() > 1 {
                notes.push(format!(
                    "orphan {name}: kept: its agent id `{}` is in more than one ci source, so ciscale cannot tell \
                     which agent it runs ({why}); delete it by hand once idle",
                    label.map_or("", String::as_str)
                ));
                continue;
            }
            let unaccounted =
                unaccounted_busy.get_or_insert_with(|| unaccounted_busy_agents(desired, observed, ci_indexes));
            let suspects: Vec<&str> = unaccounted
                .iter()
                .filter(|(ci, _)| sources.iter().any(|source| source.name == *ci))
                .map(|(_, agent)| agent.as_str())
                .collect();
            if label.is_none() && linked.by_name.is_empty() && instance.state.is_active() && !suspects.is_empty() {
                notes.push(format!(
                    "orphan {name}: kept: it predates the `{AGENT_LABEL}` label and no agent is named after it, so it \
                     may run the busy agent {} ({why}); it goes once no agent of unknown whereabouts is busy",
                    suspects.join(", ")
                ));
                continue;
            }
            // Drained first while it can take jobs: the label-linked agent (a pre-registered one) included.
            let serving = linked.by_label.iter().chain(&linked.by_name).find(|(_, agent)| !agent.no_schedule);
            let (action, agent) = match serving {
                Some((ci, agent)) if instance.state.is_active() => (Action::Drain, Some(ci.target(agent))),
                // Deleted with the agent named after it (a record of ours, deregistered after the delete); an agent
                // linked only by the label is someone else's record (a pre-registered agent): never deregistered.
                // The record named after the instance is ours whether the label also links it or not (since the
                // label is written at create time, it usually does).
                _ => (
                    Action::Delete,
                    linked
                        .by_label
                        .iter()
                        .chain(&linked.by_name)
                        .find(|(_, agent)| agent.name == instance.name)
                        .map(|(ci, agent)| ci.target(agent)),
                ),
            };
            changes.push(Change {
                pool: PoolName::new(pool_label),
                action,
                instance: Some(InstanceTarget {
                    backend: backend_name.clone(),
                    id: Some(instance.id.clone()),
                    name: instance.name.clone(),
                }),
                agent,
                reason: format!("orphan: {why}"),
                before: BTreeMap::new(),
                after: BTreeMap::new(),
                cause: None,
            });
        }
    }
    (changes, notes)
}

/// The agents an instance runs, as far as the observation links them.
struct Linked<'c, 'a> {
    /// Records whose id the instance's `ciscale.agent` label names (one per source that has that id).
    by_label: Vec<(&'c CiIndex<'a>, &'a Agent)>,
    /// The first record named like the instance (sources by name), unless it is the label-linked one.
    by_name: Vec<(&'c CiIndex<'a>, &'a Agent)>,
}

fn linked_agents<'c, 'a>(instance: &Instance, sources: &[&'c CiIndex<'a>]) -> Linked<'c, 'a> {
    let label = instance.labels.get(AGENT_LABEL);
    let by_label: Vec<(&CiIndex<'_>, &Agent)> = match label {
        Some(id) => sources
            .iter()
            .filter_map(|ci| ci.agents_by_id.get(id.as_str()).map(|agent| (*ci, *agent)))
            .collect(),
        None => Vec::new(),
    };
    let by_name = sources
        .iter()
        .find_map(|ci| ci.agents_by_name.get(instance.name.as_str()).map(|agent| (*ci, *agent)))
        .filter(|(ci, agent)| !by_label.iter().any(|(lci, lagent)| lci.name == ci.name && lagent.id == agent.id))
        .into_iter()
        .collect();
    Linked { by_label, by_name }
}

/// Busy agents no listed instance accounts for (neither by name nor by `ciscale.agent` label), with their CI
/// source, in a stable order: any of them may run on an orphan that predates the label.
fn unaccounted_busy_agents<'a>(
    desired: &Desired,
    observed: &Observed,
    ci_indexes: &BTreeMap<&'a CiName, CiIndex<'_>>,
) -> Vec<(&'a CiName, String)> {
    let mut names: FastSet<&str> = FastSet::default();
    let mut ids: FastSet<&str> = FastSet::default();
    for instance in observed.backends.values().flat_map(|backend| backend.instances.iter()) {
        if instance.state == InstanceState::Terminated {
            continue;
        }
        names.insert(instance.name.as_str());
        if instance.owner() == Some(desired.owner.as_str()) {
            if let Some(id) = instance.labels.get(AGENT_LABEL) {
                ids.insert(id.as_str());
            }
        }
    }
    let mut busy = Vec::new();
    for (ci_name, ci) in ci_indexes {
        let Some(observation) = observed.ci.get(*ci_name) else {
            continue;
        };
        for agent in &observation.agents {
            if ci.is_busy(agent) && !names.contains(agent.name.as_str()) && !ids.contains(agent.id.as_str()) {
                busy.push((*ci_name, format!("`{}` ({} {})", agent.name, ci_name, agent.id)));
            }
        }
    }
    busy
}
