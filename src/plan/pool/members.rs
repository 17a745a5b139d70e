//! Step 1: the pool's members. Every instance labelled with our owner and this pool, plus the adopted instances
//! of a start/stop pool, each with its agent (named like the instance, or named by the adoption or the pool's
//! pre-registered agent), its running jobs, idle time and drift from the pool's spec.

use jiff::Timestamp;

use super::super::machine::first_candidate;
use super::super::sort_key::SortKey;
use super::PoolContext;
use crate::model::{AdoptedInstance, Agent, Instance, InstanceMode, InstanceState, PoolSpec};

/// An instance of the pool with everything the rules look at.
pub(super) struct Member<'a> {
    pub instance: &'a Instance,
    /// Its position in its backend's list (see [`super::super::index::BackendIndex`]).
    pub position: u32,
    pub agent: Option<&'a Agent>,
    /// Running jobs on its agent (at least 1 when the CI flags the agent busy without naming a job).
    pub running_jobs: u32,
    pub busy: bool,
    pub drained: bool,
    pub idle_since: Timestamp,
    /// `(key, instance value, pool value)` for every attribute that no longer matches the pool (create mode).
    pub drift: Vec<(String, String, String)>,
}

impl Member<'_> {
    pub fn name(&self) -> &str {
        &self.instance.name
    }
}

/// Rule 4: an instance whose agent never checked in within the bootstrap timeout is broken (bad image, bad
/// credential, ...): it is removed and not counted as capacity, so a fresh one takes its place.
pub(super) fn never_registered(cx: &PoolContext<'_>, member: &Member<'_>) -> Option<String> {
    let timeout = cx.pool.scale.bootstrap_timeout;
    let age = cx.now.duration_since(member.instance.created_at);
    if age <= timeout.signed() || member.busy {
        return None;
    }
    let silent = match member.agent {
        None => member.instance.state == InstanceState::Running,
        Some(agent) => agent.last_contact.is_none() && member.instance.state == InstanceState::Running,
    };
    silent.then(|| format!("agent never registered within {timeout}"))
}

pub(super) fn gather_members<'a>(cx: &PoolContext<'a>, hash: &str) -> Vec<Member<'a>> {
    let Some(backend) = cx.backend else {
        return Vec::new();
    };
    let mut instances: Vec<(u32, Option<&'a AdoptedInstance>)> = backend
        .owned_by_pool
        .get(&Some(cx.pool.name.as_str()))
        .map(|owned| owned.iter().map(|position| (*position, None)).collect())
        .unwrap_or_default();
    if let InstanceMode::StartStop { instances: adopted } = &cx.pool.backend.mode {
        for adoption in adopted {
            if let Some(&position) = backend.by_id.get(&adoption.id) {
                // An adopted instance may also carry our labels: keep one entry, with its agent reference.
                let id = &backend.instance(position).id;
                instances.retain(|(known, _)| &backend.instance(*known).id != id);
                instances.push((position, Some(adoption)));
            }
        }
    }
    // Members in the order of their names (then ids): sorted here, as positions, rather than as members (large
    // to move). A pool's names share their `{owner}-{pool}-` start: the sort key compares what follows as one
    // number. Stable, as the members' sort was.
    let key = SortKey::new(instances.iter().map(|(position, _)| backend.instance(*position).name.as_str()));
    instances.sort_by_cached_key(|(position, _)| {
        let instance = backend.instance(*position);
        (key.of(&instance.name), instance.name.as_str(), &instance.id)
    });
    let create_mode = matches!(cx.pool.backend.mode, InstanceMode::Create);
    let members: Vec<Member<'a>> = instances
        .into_iter()
        .map(|(position, adoption)| {
            let instance = backend.instance(position);
            // An instance created since the `ciscale.agent` label exists names its agent record's id; an adopted
            // instance names its agent in the config; a Picus-style pool runs its one pre-registered agent;
            // otherwise the agent is named like its instance.
            let reference = adoption.and_then(|a| a.agent.as_ref()).or(cx.pool.agent.preregistered.as_ref());
            let labelled = backend.facts[position as usize].agent.filter(|_| adoption.is_none());
            let agent = cx.ci.and_then(|ci| match (labelled, reference) {
                (Some(id), _) => ci.agents_by_id.get(id).copied(),
                (None, Some(reference)) => ci.lookup(reference),
                (None, None) => ci.agents_by_name.get(instance.name.as_str()).copied(),
            });
            let (running_tasks, flagged_busy) = match (cx.ci, agent) {
                (Some(ci), Some(agent)) => (ci.running_on(agent), agent.busy),
                _ => (0, false),
            };
            let running_jobs = if flagged_busy { running_tasks.max(1) } else { running_tasks };
            let idle_since = agent
                .and_then(|agent| agent.last_work)
                .map_or(instance.created_at, |last_work| last_work.max(instance.created_at));
            let facts = &backend.facts[position as usize];
            let drift = if create_mode { drift_of(instance, facts.agent_hash, cx.pool, hash) } else { Vec::new() };
            Member {
                instance,
                position,
                agent,
                running_jobs,
                busy: running_jobs > 0,
                drained: agent.is_some_and(|agent| agent.no_schedule),
                idle_since,
                drift,
            }
        })
        .collect();
    members
}

/// Rule 6: attributes that differ from the pool's machine (first candidate of a comma list; a key the
/// provider does not report is not drift) and a different agent hash (`agent_hash`: the instance's label).
fn drift_of(
    instance: &Instance,
    agent_hash: Option<&str>,
    pool: &PoolSpec,
    hash: &str,
) -> Vec<(String, String, String)> {
    let mut drift = Vec::new();
    for (key, value) in &pool.backend.machine {
        // A comma list is a capacity fallback: an instance created from any of its candidates is as wanted, or a
        // fallback server would be replaced (and replaced again) while the first choice stays unavailable.
        if let Some(have) = instance.attributes.get(key) {
            if !value.split(',').map(str::trim).any(|candidate| candidate == have) {
                drift.push((key.clone(), have.clone(), first_candidate(value).to_owned()));
            }
        }
    }
    if let Some(have) = agent_hash {
        if have != hash {
            drift.push(("agent-hash".to_owned(), have.to_owned(), hash.to_owned()));
        }
    }
    drift
}

pub(super) fn describe_drift(drift: &[(String, String, String)]) -> String {
    drift.iter().map(|(key, have, want)| format!("{key} {have} → {want}")).collect::<Vec<_>>().join(", ")
}
