//! Agent records that no instance runs: creates in flight, stale records of ours, and records that only look
//! like ours (left alone). Which records are ours is decided by [`super::ownership`]; this room decides what
//! that means for a record without an instance.
//!
//! A record has an instance when a listed, non-terminated instance (any backend, any owner) has its name, or an
//! instance of ours names its id in its `ciscale.agent` label. Of the rest:
//! - a pre-registered or adopted agent the config names is never touched here (its instance may be stopped or
//!   gone; it outlives them);
//! - a record of ours by the name grammar that has not run a job yet is **a create in flight** while it is
//!   younger than its pool's `bootstrapTimeout` ([`record_since`]): apply registers the agent before it creates
//!   the instance (and deregisters it again when the backend refuses the create), and a backend may list a new
//!   instance late (Incus right after a crash, EC2's eventually consistent listing), so the pool counts it
//!   towards `max`, and while capacity is wanted (and the pool is within `max`) it creates it again *under its
//!   name*: create-if-absent finds an instance that was made (and finishes its bootstrap) or makes the one a
//!   killed apply never did, and never a second one. Past the window, or after a job, it is **stale**;
//! - a stale record is deregistered (once idle, and unless a create of this plan takes it over) only when its
//!   instance is **gone for good** ([`LoneRecord::gone_for_good`]): it ran a job or made contact (its instance
//!   was listed by then, and is not now: a finished ephemeral agent, a deleted server). A record that never
//!   made contact is never deregistered on its age alone: its age
//!   tells when it was registered, not when its instance was made — a create may take over its name long after
//!   (and the new instance not be listed yet), or finish late in the window and be listed late. Such an
//!   instance gets its own `bootstrapTimeout` from its creation (rule 4, which removes it *with* its record if
//!   its agent never comes up). So the record is kept, with a note, and gives its name to the pool's next
//!   create (create-if-absent takes over the record, and an instance listed late is found rather than doubled).
//!   A pool that left the config makes no more creates: its records are kept with a note to remove them by hand
//!   (an instance of one that shows up is an orphan, deleted by rule 7 *with* the record named after it);
//! - a record that runs a job is never deregistered, and counts towards its pool's `max` whatever its age (a
//!   job runs somewhere);
//! - anything else is not ours. Those whose name starts with `{owner}-` get a "not ours, left alone" note.

use std::collections::BTreeMap;

use jiff::Timestamp;

use super::fasthash::{FastMap, FastSet};
use super::index::{BackendIndex, CiIndex};
use super::ownership::{looks_like_ours, parse_name_cached, record_since};
use super::text::human_duration;
use super::{Action, Change};
use crate::model::{
    Agent, AgentRef, BackendName, CiName, Desired, InstanceMode, InstanceState, Observed, PoolName, ScalePolicy,
};

/// An agent record of ours (by the name grammar) that no instance runs.
pub(super) struct LoneRecord<'a> {
    pub ci: &'a CiIndex<'a>,
    pub agent: &'a Agent,
    /// The pool written in its name (it may no longer be configured).
    pub pool: &'a str,
    pub index: u32,
    /// See [`record_since`]; `None`: the CI says nothing about its age.
    pub since: Option<Timestamp>,
    pub busy: bool,
    /// Younger than its pool's bootstrap timeout: a create whose instance is not listed yet.
    pub in_window: bool,
    /// Its instance, if it ever had one, cannot show up any more: it ran a job or made contact (its instance was
    /// listed by then, and is not now). Only such a record is deregistered (see the module docs), and it is
    /// never reused.
    pub gone_for_good: bool,
}

impl LoneRecord<'_> {
    pub fn name(&self) -> &str {
        &self.agent.name
    }

    /// Counts towards its pool's `max`: in its window, or running a job.
    pub fn counts(&self) -> bool {
        self.in_window || self.busy
    }

    /// Its name goes to the pool's next create: a stale record that never ran a job may belong to a create
    /// whose instance is listed late, and create-if-absent under its name finds that instance rather than
    /// making a second one. (A record that ran a job had its instance listed already: it only goes.)
    pub fn reusable(&self) -> bool {
        !self.counts() && !self.gone_for_good
    }

    /// Stale, idle and gone for good: deregistered unless a create reuses its name.
    fn removable(&self) -> bool {
        !self.counts() && self.gone_for_good
    }

    /// `registered 5m ago` (the CI's creation time) or `last in contact 5m ago` (the fallback), if known.
    fn age(&self, now: Timestamp) -> Option<String> {
        let what = if self.agent.created_at.is_some() { "registered" } else { "last in contact" };
        self.since.map(|since| format!("{what} {} ago", human_duration(now.duration_since(since))))
    }
}

/// Every record without an instance, sorted out.
pub(super) struct Records<'a> {
    /// Records of ours without an instance, by the pool written in their name, lowest index first.
    pub lone: BTreeMap<&'a str, Vec<LoneRecord<'a>>>,
    /// "Not ours, left alone" notes, in CI and observation order.
    pub notes: Vec<String>,
}

impl<'a> Records<'a> {
    /// The lone records of `pool` in the CI source `ci`.
    pub fn of_pool<'s>(&'s self, pool: &PoolName, ci: &'s CiName) -> impl Iterator<Item = &'s LoneRecord<'a>> + 's {
        self.lone.get(pool.as_str()).into_iter().flatten().filter(move |record| record.ci.name == ci)
    }
}

pub(super) fn find<'a>(
    desired: &Desired,
    observed: &'a Observed,
    ci_indexes: &'a BTreeMap<&'a CiName, CiIndex<'a>>,
    backends: &BTreeMap<&BackendName, BackendIndex<'_>>,
    now: Timestamp,
) -> Records<'a> {
    let instance_count = backends.values().map(|backend| backend.facts.len()).sum();
    let mut with_instance_names: FastSet<&str> = FastSet::with_capacity_and_hasher(instance_count, Default::default());
    let mut linked_ids: FastSet<&str> = FastSet::default();
    for backend in backends.values() {
        for (instance, facts) in backend.instances().iter().zip(&backend.facts) {
            if instance.state == InstanceState::Terminated {
                continue;
            }
            with_instance_names.insert(instance.name.as_str());
            if let Some(id) = facts.agent.filter(|_| facts.ours) {
                linked_ids.insert(id);
            }
        }
    }
    let configured = configured_agents(desired);
    let default_policy = ScalePolicy::default();

    let mut records = Records { lone: BTreeMap::new(), notes: Vec::new() };
    let mut digests = FastMap::default();
    for (ci_name, ci) in ci_indexes {
        let Some(observation) = observed.ci.get(*ci_name) else {
            continue;
        };
        for agent in &observation.agents {
            if with_instance_names.contains(agent.name.as_str()) || linked_ids.contains(agent.id.as_str()) {
                continue;
            }
            let is_configured = configured.contains(&(*ci_name, AgentRefKey::Id(agent.id.as_str())))
                || configured.contains(&(*ci_name, AgentRefKey::Name(agent.name.as_str())));
            if is_configured {
                continue;
            }
            match parse_name_cached(&desired.owner, &agent.name, &mut digests) {
                Some(owned) => {
                    let configured_pool = desired.pool(&PoolName::new(owned.pool));
                    let policy = configured_pool.map_or(&default_policy, |pool| &pool.scale);
                    let since = record_since(agent);
                    // A record that has run a job had its instance: that instance is gone (an ephemeral agent
                    // that finished, say), not on its way.
                    let in_window = agent.last_work.is_none()
                        && since.is_some_and(|since| now.duration_since(since) < policy.bootstrap_timeout.signed());
                    let gone_for_good = agent.last_work.is_some() || agent.last_contact.is_some();
                    let busy = ci.is_busy(agent);
                    if configured_pool.is_none() && !in_window && !busy && !gone_for_good {
                        records.notes.push(format!(
                            "kept: agent `{}` ({} {}) of pool `{}`, which is no longer in the config, has no instance \
                             and never made contact, but an instance of it may not be listed yet; deregister it by \
                             hand once no instance of that name exists",
                            agent.name, ci_name, agent.id, owned.pool
                        ));
                    }
                    records.lone.entry(owned.pool).or_default().push(LoneRecord {
                        ci,
                        agent,
                        pool: owned.pool,
                        index: owned.index,
                        since,
                        busy,
                        in_window,
                        gone_for_good,
                    });
                }
                None if is_legacy_name(desired, &agent.name) => records.notes.push(format!(
                    "not ours, left alone: agent `{}` ({} {}) is named like this deployment's agents before names \
                     carried a digest (`{}-<pool>-<n>`), but no instance of ours runs it, so it cannot be told from \
                     another deployment's; deregister it by hand if it is ours",
                    agent.name, ci_name, agent.id, desired.owner
                )),
                None if looks_like_ours(&desired.owner, &agent.name) => records.notes.push(format!(
                    "not ours, left alone: agent `{}` ({} {}) starts like this deployment's names, but they are \
                     `{}-<pool>-<digest>-<n>`, and no instance of ours runs it",
                    agent.name, ci_name, agent.id, desired.owner
                )),
                None => {}
            }
        }
    }
    for lone in records.lone.values_mut() {
        lone.sort_by(|a, b| (a.index, a.ci.name, &a.agent.id).cmp(&(b.index, b.ci.name, &b.agent.id)));
    }
    records
}

/// `{owner}-{pool}-{n}` for a configured pool: how earlier versions named agents (see `ownership`).
fn is_legacy_name(desired: &Desired, name: &str) -> bool {
    let Some(rest) = name.strip_prefix(desired.owner.as_str()).and_then(|rest| rest.strip_prefix('-')) else {
        return false;
    };
    desired.pools.iter().any(|pool| {
        rest.strip_prefix(pool.name.as_str())
            .and_then(|tail| tail.strip_prefix('-'))
            .is_some_and(|index| !index.is_empty() && index.bytes().all(|byte| byte.is_ascii_digit()))
    })
}

/// Stale, idle records of ours whose name no create of this plan reuses: deregistered. (A record whose name is
/// reused is taken over by the create, so deregistering it in the same plan would cut the new agent off.)
pub(super) fn deregister_stale(records: &Records<'_>, reused: &FastSet<String>, now: Timestamp) -> Vec<Change> {
    let mut changes = Vec::new();
    for record in records.lone.values().flatten() {
        if !record.removable() || reused.contains(record.name()) {
            continue;
        }
        let reason = match record.age(now) {
            Some(age) => format!("agent record of ours has no instance ({age})"),
            None => "agent record of ours has no instance (and no registration time)".to_owned(),
        };
        changes.push(Change {
            pool: PoolName::new(record.pool),
            action: Action::Deregister,
            instance: None,
            agent: Some(record.ci.target(record.agent)),
            reason,
            before: BTreeMap::new(),
            after: BTreeMap::new(),
            cause: None,
        });
    }
    changes
}

/// Pool notes about its lone records that count (what the pool waits for).
pub(super) fn pool_notes(record: &LoneRecord<'_>, now: Timestamp) -> Option<String> {
    let age = record.age(now).map(|age| format!(", {age}")).unwrap_or_default();
    if record.busy {
        Some(format!(
            "{}: agent record runs a job but no instance of it is listed{age}: counted towards max, left alone",
            record.name()
        ))
    } else if record.in_window {
        Some(format!(
            "{}: agent record without an instance yet{age}: a create in flight, counted towards max (created again \
             under its name while capacity is wanted)",
            record.name()
        ))
    } else {
        None
    }
}

/// The pool note on a stale record that is not gone for good and that no create of this plan takes over.
pub(super) fn kept_note(record: &LoneRecord<'_>, now: Timestamp) -> String {
    let age = record.age(now).map(|age| format!(", {age}")).unwrap_or_default();
    format!(
        "{}: agent record without an instance{age}, never in contact: kept, as an instance of it may not be listed \
         yet; the pool's next create takes it over",
        record.name()
    )
}

/// A config reference to an agent record: it is never deregistered by ciscale.
#[derive(PartialEq, Eq, Hash)]
enum AgentRefKey<'a> {
    Id(&'a str),
    Name(&'a str),
}

/// The pre-registered agents (Picus mode) and the agents of adopted instances, per CI source. An adoption
/// without an agent reference runs an agent named like the instance id.
fn configured_agents(desired: &Desired) -> FastSet<(&CiName, AgentRefKey<'_>)> {
    fn key(reference: &AgentRef) -> AgentRefKey<'_> {
        match reference {
            AgentRef::Id(id) => AgentRefKey::Id(id.as_str()),
            AgentRef::Name(name) => AgentRefKey::Name(name.as_str()),
        }
    }
    let mut configured = FastSet::default();
    for pool in &desired.pools {
        if let Some(reference) = &pool.agent.preregistered {
            configured.insert((&pool.ci.source, key(reference)));
        }
        if let InstanceMode::StartStop { instances } = &pool.backend.mode {
            for adoption in instances {
                let reference = match &adoption.agent {
                    Some(reference) => key(reference),
                    None => AgentRefKey::Name(adoption.id.as_str()),
                };
                configured.insert((&pool.ci.source, reference));
            }
        }
    }
    configured
}
