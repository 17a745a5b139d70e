//! Preconditions of a saved plan's changes, checked by `apply PLANFILE` against a fresh observation before the
//! first step of any change: a plan saved a while ago must never harm what changed since.
//!
//! This replaces the whole-plan refusal on a changed observation fingerprint (which held only agent ids and
//! drain flags, so it missed an agent that registered and took a job, and refused plans that were still safe):
//! each change is checked for what makes *it* safe, and only the changes that fail are left out. Pure, like the
//! planner: the same plan, config, observation and time give the same answer.
//!
//! | change                     | still safe when (now)                                                        |
//! |----------------------------|------------------------------------------------------------------------------|
//! | create                     | the pool is configured; no instance has its name; no busy agent has its name; |
//! |                            | the pool has room under `max` (counted as the planner counts, plus the       |
//! |                            | creates of this plan checked before it)                                      |
//! | start                      | the instance exists and is ours; in start/stop mode a stopped one needs room |
//! | stop, delete, replace      | the instance exists and is ours; no agent linked to it runs a job; an agent   |
//! |                            | "never registered" still has not; otherwise its agent is still drained while |
//! |                            | the instance could take jobs                                                  |
//! | drain                      | the agent still exists                                                        |
//! | deregister                 | the agent still exists, runs no job and still has no instance                |
//!
//! A change on a target that an earlier refused change also targets is refused too: it was planned assuming
//! the earlier one would be done (a delete after a drain).

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::capacity::{counts_towards_max, effective_policy};
use super::fasthash::FastMap;
use super::index::CiIndex;
use super::records;
use super::{Action, Cause, Change};
use crate::model::{
    Agent, BackendName, CiName, Desired, Instance, InstanceId, InstanceMode, InstanceState, Observed,
    PoolName, PoolSpec, AGENT_LABEL, POOL_LABEL,
};

/// Why a change of a saved plan is no longer safe to carry out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct PreconditionFailed {
    pub why: String,
}

fn fail<T>(why: impl Into<String>) -> Result<T, PreconditionFailed> {
    Err(PreconditionFailed { why: why.into() })
}

/// Checks every change of `changes` (a saved plan's, in plan order) against a fresh observation taken at `now`.
/// One result per change, in the same order.
pub fn preconditions(
    changes: &[Change],
    desired: &Desired,
    observed: &Observed,
    now: Timestamp,
) -> Vec<Result<(), PreconditionFailed>> {
    let ci_indexes: BTreeMap<&CiName, CiIndex<'_>> =
        observed.ci.iter().map(|(name, observation)| (name, CiIndex::new(name, observation))).collect();
    let backend_indexes = super::index::index_backends(desired, observed);
    let records = records::find(desired, observed, &ci_indexes, &backend_indexes, now);
    let world = World { desired, observed, ci: &ci_indexes, records: &records, now };
    // Instances each pool gains by the changes admitted so far (creates; starts in start/stop mode).
    let mut admitted: FastMap<&PoolName, u32> = FastMap::default();
    let creates: Vec<&str> = changes
        .iter()
        .filter(|change| change.action == Action::Create)
        .filter_map(|change| change.instance.as_ref().map(|target| target.name.as_str()))
        .collect();

    let mut results: Vec<Result<(), PreconditionFailed>> = Vec::with_capacity(changes.len());
    for (index, change) in changes.iter().enumerate() {
        let earlier_refused = changes[..index]
            .iter()
            .zip(&results)
            .find(|(earlier, result)| result.is_err() && shares_target(earlier, change));
        let result = match earlier_refused {
            Some((earlier, _)) => fail(format!("an earlier change on the same target ({}) is no longer safe", earlier.action)),
            None => world.check(change, &creates, &mut admitted),
        };
        results.push(result);
    }
    results
}

fn shares_target(a: &Change, b: &Change) -> bool {
    let instance = match (&a.instance, &b.instance) {
        (Some(a), Some(b)) => {
            a.backend == b.backend && (a.name == b.name || (a.id.is_some() && a.id == b.id))
        }
        _ => false,
    };
    let agent = match (&a.agent, &b.agent) {
        (Some(a), Some(b)) => a.ci == b.ci && a.id == b.id,
        _ => false,
    };
    instance || agent
}

struct World<'w, 'a> {
    desired: &'w Desired,
    observed: &'a Observed,
    ci: &'w BTreeMap<&'a CiName, CiIndex<'a>>,
    records: &'w records::Records<'a>,
    now: Timestamp,
}

impl<'a> World<'_, 'a> {
    fn check<'c>(
        &self,
        change: &'c Change,
        creates: &[&str],
        admitted: &mut FastMap<&'c PoolName, u32>,
    ) -> Result<(), PreconditionFailed> {
        match change.action {
            Action::Create => self.create(change, creates, admitted),
            Action::Start => self.start(change, admitted),
            Action::Stop | Action::Delete | Action::Replace => self.remove(change),
            Action::Drain => self.drain(change),
            Action::Deregister => self.deregister(change),
        }
    }

    fn pool(&self, change: &Change) -> Result<&PoolSpec, PreconditionFailed> {
        match self.desired.pool(&change.pool) {
            Some(pool) => Ok(pool),
            None => fail(format!("pool `{}` is no longer in the config", change.pool)),
        }
    }

    fn create<'c>(
        &self,
        change: &'c Change,
        creates: &[&str],
        admitted: &mut FastMap<&'c PoolName, u32>,
    ) -> Result<(), PreconditionFailed> {
        let pool = self.pool(change)?;
        let Some(target) = &change.instance else {
            return fail("the change names no instance");
        };
        let taken = self
            .instances(&target.backend)
            .find(|instance| instance.name == target.name && instance.state != InstanceState::Terminated);
        if let Some(instance) = taken {
            return fail(format!("an instance named `{}` exists now ({}, {})", target.name, instance.id, instance.state));
        }
        if change.agent.is_none() {
            if let Some(ci) = self.ci.get(&pool.ci.source) {
                if let Some(agent) = ci.agents_by_name.get(target.name.as_str()).filter(|agent| ci.is_busy(agent)) {
                    return fail(format!("agent `{}` runs a job now", agent.name));
                }
            }
        }
        let max = effective_policy(pool, self.now).0.max;
        // Agent records of creates in flight count, except those this plan's own creates take over.
        let counted = self.pool_count(pool, creates) + admitted.get(&change.pool).copied().unwrap_or(0);
        if counted >= max {
            return fail(format!("the pool has {counted} of max {max} instances now"));
        }
        *admitted.entry(&change.pool).or_default() += 1;
        Ok(())
    }

    fn start<'c>(&self, change: &'c Change, admitted: &mut FastMap<&'c PoolName, u32>) -> Result<(), PreconditionFailed> {
        let instance = self.our_instance(change)?;
        let Some(pool) = self.desired.pool(&change.pool) else {
            return Ok(()); // apply reports a missing pool itself; a start harms nothing
        };
        if matches!(pool.backend.mode, InstanceMode::StartStop { .. }) && !counts_towards_max(instance.state, false) {
            let max = effective_policy(pool, self.now).0.max;
            let counted = self.pool_count(pool, &[]) + admitted.get(&change.pool).copied().unwrap_or(0);
            if counted >= max {
                return fail(format!("the pool runs {counted} of max {max} instances now"));
            }
            *admitted.entry(&change.pool).or_default() += 1;
        }
        Ok(())
    }

    /// Stop, delete, replace: the instance is ours, and nothing that runs on it works or could be given work.
    fn remove(&self, change: &Change) -> Result<(), PreconditionFailed> {
        if change.action == Action::Replace {
            self.pool(change)?;
        }
        let instance = self.our_instance(change)?;
        let linked = self.linked_agents(change, instance);
        if let Some(agent) = linked.iter().find(|(ci, agent)| ci.is_busy(agent)).map(|(_, agent)| agent) {
            return fail(format!("agent `{}` runs a job now", agent.name));
        }
        if change.cause == Some(Cause::BootstrapTimeout) {
            if let Some((_, agent)) = linked.iter().find(|(_, agent)| agent.last_contact.is_some()) {
                return fail(format!("agent `{}` has registered since the plan was made", agent.name));
            }
            return Ok(());
        }
        // An instance that can take jobs goes only once its agent is drained (the plan drained it first), unless
        // its CI cannot drain: then an idle agent goes as it is (the busy check above holds).
        let drainable = self
            .desired
            .pool(&change.pool)
            .and_then(|pool| self.desired.ci.get(&pool.ci.source))
            .is_none_or(|spec| crate::providers::ci_capabilities(&spec.kind).drain);
        if instance.state.is_active() && drainable {
            if let Some((_, agent)) = linked.iter().find(|(_, agent)| !agent.no_schedule) {
                return fail(format!("agent `{}` is no longer drained", agent.name));
            }
        }
        Ok(())
    }

    /// An agent not named as ours (a pre-registered or hand-made one) is ours to drain only through the instance
    /// of ours it runs on: that instance must still be there and ours.
    fn drain(&self, change: &Change) -> Result<(), PreconditionFailed> {
        let (_, agent) = self.agent_of(change)?;
        if super::ownership::parse_name(&self.desired.owner, &agent.name).is_none() {
            self.our_instance(change)?;
        }
        Ok(())
    }

    fn deregister(&self, change: &Change) -> Result<(), PreconditionFailed> {
        let (ci, agent) = self.agent_of(change)?;
        if ci.is_busy(agent) {
            return fail(format!("agent `{}` runs a job now", agent.name));
        }
        let linked = self.observed.backends.values().flat_map(|backend| backend.instances.iter()).find(|instance| {
            instance.state != InstanceState::Terminated
                && (instance.name == agent.name
                    || (instance.owner() == Some(self.desired.owner.as_str())
                        && instance.labels.get(AGENT_LABEL).map(String::as_str) == Some(agent.id.as_str())))
        });
        if let Some(instance) = linked {
            return fail(format!("agent `{}` has an instance now (`{}`)", agent.name, instance.name));
        }
        Ok(())
    }

    // -- lookups ---------------------------------------------------------------------------------------------

    fn instances(&self, backend: &BackendName) -> impl Iterator<Item = &'a Instance> + 'a {
        self.observed.backends.get(backend).into_iter().flat_map(|backend| backend.instances.iter())
    }

    /// The change's instance as observed now, if it still exists and is still ours (labelled, or adopted).
    fn our_instance(&self, change: &Change) -> Result<&'a Instance, PreconditionFailed> {
        let Some(target) = &change.instance else {
            return fail("the change names no instance");
        };
        let Some(id) = &target.id else {
            return fail(format!("the change names instance `{}` without an id", target.name));
        };
        let found = self.instances(&target.backend).find(|instance| &instance.id == id);
        let instance = match found {
            Some(instance) if !matches!(instance.state, InstanceState::Terminated | InstanceState::Deleting) => instance,
            _ => return fail(format!("instance `{}` ({id}) is gone", target.name)),
        };
        let adopted = self.desired.pools.iter().any(|pool| match &pool.backend.mode {
            InstanceMode::StartStop { instances } => {
                pool.backend.backend == target.backend && instances.iter().any(|adoption| &adoption.id == id)
            }
            InstanceMode::Create => false,
        });
        if instance.owner() != Some(self.desired.owner.as_str()) && !adopted {
            return fail(format!("instance `{}` ({id}) is no longer labelled as ours", target.name));
        }
        Ok(instance)
    }

    fn agent_of(&self, change: &Change) -> Result<(&CiIndex<'a>, &'a Agent), PreconditionFailed> {
        let Some(target) = &change.agent else {
            return fail("the change names no agent");
        };
        let ci = self.ci.get(&target.ci);
        match ci.and_then(|ci| ci.agents_by_id.get(target.id.as_str()).map(|agent| (ci, *agent))) {
            Some(found) => Ok(found),
            None => fail(format!("agent `{}` ({} {}) is gone", target.name, target.ci, target.id)),
        }
    }

    /// Every agent record that may run on the instance now: the change's agent, records named like the instance
    /// and the record its `ciscale.agent` label names, in any CI source (a pool's source may have changed).
    fn linked_agents<'s>(&'s self, change: &Change, instance: &Instance) -> Vec<(&'s CiIndex<'a>, &'a Agent)> {
        let mut linked: Vec<(&'s CiIndex<'a>, &'a Agent)> = Vec::new();
        let mut add = |ci: &'s CiIndex<'a>, agent: &'a Agent| {
            if !linked.iter().any(|(known_ci, known)| known_ci.name == ci.name && known.id == agent.id) {
                linked.push((ci, agent));
            }
        };
        if let Some(target) = &change.agent {
            if let Some(ci) = self.ci.get(&target.ci) {
                if let Some(agent) = ci.agents_by_id.get(target.id.as_str()) {
                    add(ci, agent);
                }
            }
        }
        let label = instance.labels.get(AGENT_LABEL).map(String::as_str);
        for ci in self.ci.values() {
            if let Some(agent) = ci.agents_by_name.get(instance.name.as_str()) {
                add(ci, agent);
            }
            if let Some(agent) = label.and_then(|id| ci.agents_by_id.get(id)) {
                add(ci, agent);
            }
        }
        linked
    }

    /// The pool's instances that count towards `max` now (see `capacity`), plus its agent records without an
    /// instance that count as creates in flight, except those named in `taken_over`.
    fn pool_count(&self, pool: &PoolSpec, taken_over: &[&str]) -> u32 {
        let create_mode = matches!(pool.backend.mode, InstanceMode::Create);
        let adopted: Vec<&InstanceId> = match &pool.backend.mode {
            InstanceMode::StartStop { instances } => instances.iter().map(|adoption| &adoption.id).collect(),
            InstanceMode::Create => Vec::new(),
        };
        let instances = self
            .instances(&pool.backend.backend)
            .filter(|instance| {
                let labelled = instance.owner() == Some(self.desired.owner.as_str())
                    && instance.labels.get(POOL_LABEL).map(String::as_str) == Some(pool.name.as_str());
                labelled || adopted.contains(&&instance.id)
            })
            .filter(|instance| counts_towards_max(instance.state, create_mode))
            .count() as u32;
        let creating = self
            .records
            .of_pool(&pool.name, &pool.ci.source)
            .filter(|record| record.counts() && !taken_over.contains(&record.name()))
            .count() as u32;
        instances + creating
    }
}
