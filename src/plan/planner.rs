//! The planner's entry point: plans every pool, then the orphans, orders the changes for apply, and totals them.
//!
//! Nothing here or in the rules does I/O, reads the clock or the environment, or iterates a hash map in a way
//! that shows: the same inputs give the same plan, byte for byte. Hash maps are used for lookups only.
//!
//! Where things live: [`super::index`] (the observation, indexed), [`super::demand`] (pending jobs per pool),
//! [`super::pool`] (the per-pool rules, step by step), [`super::orphans`], [`super::ownership`] (names),
//! [`super::digest`] (agent hash, fingerprint), [`super::cost`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use jiff::Timestamp;

use super::cost::estimate_cost;
use super::demand::assign_pending;
use super::digest::fingerprint;
use super::fasthash::{FastMap, FastSet};
use super::index::{index_backends, BackendIndex, CiIndex, Claims, InFlightIndex};
use super::orphans::plan_orphan_instances;
use super::ownership::parse_name_cached;
use super::pool::{plan_pool, PoolContext, PoolOutcome};
use super::records;
use super::sort_key::SortKey;
use super::text::plural;
use super::{Action, Change, Cost, Plan, Summary, FORMAT_VERSION};
use crate::model::{BackendName, CiName, Desired, InstanceMode, InstanceState, Observed};

/// Plans every pool, then the orphans, and totals the result. Pure: see the module docs.
pub fn plan(desired: &Desired, observed: &Observed, now: Timestamp) -> Plan {
    plan_with(desired, observed, now, Stamps::All, PARALLEL_FROM_INSTANCES)
}

/// [`plan`] for `simulate`: the same decisions (changes, pool statuses, summary), without what a plan carries
/// for people and for a later `apply`: the observation's fingerprint (a simulated plan is never saved), the cost
/// estimate (simulate bills its own virtual instances) and the pools' notes, but for those of orphans and agent
/// records. None of them decides anything (they are written from the observation and the rules' findings), so
/// leaving them out cannot change a change; together they were about a fifth of a simulated month.
pub fn plan_for_simulation(desired: &Desired, observed: &Observed, now: Timestamp) -> Plan {
    plan_with(desired, observed, now, Stamps::DecisionsOnly, PARALLEL_FROM_INSTANCES)
}

/// What [`plan_with`] adds beyond the decisions.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stamps {
    All,
    /// An empty fingerprint, a zero cost, no pool or migration notes.
    DecisionsOnly,
}

/// `parallel_from`: from how many observed instances on pools are planned side by side (see [`plan_pools`]).
fn plan_with(desired: &Desired, observed: &Observed, now: Timestamp, stamps: Stamps, parallel_from: usize) -> Plan {
    let instance_count: usize = observed.backends.values().map(|backend| backend.instances.len()).sum();
    let threads = if instance_count >= parallel_from { plan_threads() } else { 1 };
    if stamps == Stamps::DecisionsOnly {
        return plan_decisions(desired, observed, now, stamps, threads);
    }
    if threads <= 1 {
        let mut plan = plan_decisions(desired, observed, now, stamps, threads);
        plan.observed_fingerprint = fingerprint(observed);
        return plan;
    }
    // The fingerprint reads only the observation: in a large world it is worked out on another core meanwhile.
    std::thread::scope(|scope| {
        let beside = helper_thread(scope, || fingerprint(observed));
        let mut plan = plan_decisions(desired, observed, now, stamps, threads);
        plan.observed_fingerprint = match beside {
            Ok(thread) => joined(thread),
            // No thread could be started: worked out here.
            Err(_) => fingerprint(observed),
        };
        plan
    })
}

/// The plan but its fingerprint (left empty).
fn plan_decisions(desired: &Desired, observed: &Observed, now: Timestamp, stamps: Stamps, threads: usize) -> Plan {
    let ci_indexes: BTreeMap<&CiName, CiIndex<'_>> =
        observed.ci.iter().map(|(name, observation)| (name, CiIndex::new(name, observation))).collect();
    let backend_indexes = index_backends(desired, observed);
    let pending = assign_pending(desired, observed);
    let unserved_jobs = super::jobs::unserved(desired, observed);
    let in_flight = InFlightIndex::new(observed);
    // Sized up front: a set grown from an iterator of unknown length rehashes its way up.
    let name_count = observed.backends.values().map(|backend| backend.instances.len()).sum::<usize>()
        + observed.ci.values().map(|ci| ci.agents.len()).sum::<usize>()
        + observed.in_flight.len();
    let mut used_names: FastSet<&str> = FastSet::with_capacity_and_hasher(name_count, Default::default());
    used_names.extend(
        observed
            .backends
            .values()
            .flat_map(|backend| backend.instances.iter().map(|instance| instance.name.as_str()))
            .chain(observed.ci.values().flat_map(|ci| ci.agents.iter().map(|agent| agent.name.as_str())))
            .chain(
                observed.in_flight.iter().filter_map(|work| work.instance.as_ref().map(|target| target.name.as_str())),
            ),
    );

    let records = records::find(desired, observed, &ci_indexes, &backend_indexes, now);

    let mut changes = Vec::new();
    let mut pools = Vec::with_capacity(desired.pools.len());
    // Names of stale agent records a create of this plan takes over: they are not deregistered.
    let mut reused: FastSet<String> = FastSet::default();
    // Every instance some pool claimed: the rest of our labelled ones are orphans. With the claiming pool's
    // index (the cost estimate prices instances by their pool's machine).
    let mut claims = Claims::new(&backend_indexes);

    let contexts: Vec<PoolContext<'_>> = desired
        .pools
        .iter()
        .enumerate()
        .map(|(pool_index, pool)| PoolContext {
            desired,
            observed,
            pool,
            ci: ci_indexes.get(&pool.ci.source),
            backend: backend_indexes.get(&pool.backend.backend),
            pending_jobs: pending[pool_index],
            unserved_jobs: &unserved_jobs[pool_index],
            used_names: &used_names,
            in_flight: &in_flight,
            records: &records,
            now,
            explain: stamps == Stamps::All,
        })
        .collect();
    for (pool_index, (context, outcome)) in contexts.iter().zip(plan_pools(&contexts, threads)).enumerate() {
        if let Some(backend) = context.backend {
            for position in outcome.claimed {
                claims.claim(backend, position, pool_index);
            }
        }
        reused.extend(outcome.reused);
        changes.extend(outcome.changes);
        pools.push(outcome.status);
    }

    let mut notes: Vec<String> = match stamps {
        Stamps::All => migration_note(desired, &backend_indexes, &claims).into_iter().collect(),
        Stamps::DecisionsOnly => Vec::new(),
    };
    let (orphans, orphan_notes) = plan_orphan_instances(desired, observed, &ci_indexes, &backend_indexes, &claims);
    notes.extend(orphan_notes);
    changes.extend(orphans);
    changes.extend(records::deregister_stale(&records, &reused, now));
    notes.extend(records.notes.iter().cloned());
    delete_instead_of_drain(desired, observed, &mut changes);
    // Work in flight is already being done: planning it again would run it twice (or undo it half way).
    changes.retain(|change| !in_flight.touches(change));

    let changes = in_apply_order(desired, changes);

    let summary = summarize(&changes);
    let cost = match stamps {
        Stamps::All => estimate_cost(desired, &backend_indexes, &changes, &claims),
        Stamps::DecisionsOnly => Cost::default(),
    };
    Plan {
        format_version: FORMAT_VERSION,
        ciscale_version: env!("CARGO_PKG_VERSION").to_owned(),
        config_hash: desired.config_hash.clone(),
        observed_fingerprint: String::new(),
        planned_at: now,
        pools,
        changes,
        notes,
        summary,
        cost,
    }
}

/// From this many observed instances on, pools are planned on more than one core (see [`plan_pools`]). Below it a
/// plan takes a few milliseconds at most, and starting a thread would cost more than it saves.
const PARALLEL_FROM_INSTANCES: usize = 1_000;

/// At most this many threads plan pools side by side (the planner's caller may be busy with other work).
const MAX_PLAN_THREADS: usize = 4;

/// How many threads plan the pools of a large world: one per core, up to [`MAX_PLAN_THREADS`].
fn plan_threads() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get).min(MAX_PLAN_THREADS)
}

/// Every pool's outcome, in config order. A pool's rules read only the shared indexes and write nothing shared
/// (claims, reused names and changes are merged by the caller, in config order), so in a large world the pools
/// are planned on up to [`MAX_PLAN_THREADS`] cores at once, each thread taking the next pool not yet taken. The
/// result is the same whatever the threads did: each outcome is a pure function of its pool's context, and the
/// outcomes are put back in config order. Where no thread can be started, this thread plans them all.
fn plan_pools(contexts: &[PoolContext<'_>], threads: usize) -> Vec<PoolOutcome> {
    let threads = threads.min(contexts.len());
    if threads <= 1 {
        return contexts.iter().map(plan_pool).collect();
    }
    let next = AtomicUsize::new(0);
    let work = || {
        let mut done = Vec::new();
        loop {
            let index = next.fetch_add(1, Ordering::Relaxed);
            let Some(context) = contexts.get(index) else { break };
            done.push((index, plan_pool(context)));
        }
        done
    };
    let mut outcomes: Vec<Option<PoolOutcome>> = contexts.iter().map(|_| None).collect();
    std::thread::scope(|scope| {
        let helpers: Vec<_> = (1..threads).filter_map(|_| helper_thread(scope, work).ok()).collect();
        let mut place = |done: Vec<(usize, PoolOutcome)>| {
            for (index, outcome) in done {
                outcomes[index] = Some(outcome);
            }
        };
        place(work());
        for helper in helpers {
            place(joined(helper));
        }
    });
    outcomes.into_iter().flatten().collect()
}

/// A thread of the planner's, in `scope` (an error when the system cannot start one: the caller then does the
/// work itself).
fn helper_thread<'scope, T: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, '_>,
    work: impl FnOnce() -> T + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, T>> {
    std::thread::Builder::new().name("ciscale-plan".into()).spawn_scoped(scope, work)
}

/// What a helper thread gave. A rule that panicked there panics here, as it would have without threads.
fn joined<T>(thread: std::thread::ScopedJoinHandle<'_, T>) -> T {
    thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// A CI that cannot drain (`CiCapabilities::drain` false: Forgejo) gets no drain: an idle agent's instance goes
/// at once (delete, then deregister), which is all a drain was for — a drained agent is removed once idle. An
/// agent of such a CI that runs a job is left to finish it (a drain would only have failed).
fn delete_instead_of_drain(desired: &Desired, observed: &Observed, changes: &mut Vec<Change>) {
    let undrainable = |change: &Change| {
        change.action == Action::Drain
            && change.agent.as_ref().is_some_and(|agent| {
                desired.ci.get(&agent.ci).is_some_and(|spec| !crate::providers::ci_capabilities(&spec.kind).drain)
            })
    };
    let busy = |change: &Change| {
        change.agent.as_ref().is_some_and(|target| {
            observed.ci.get(&target.ci).is_some_and(|ci| {
                ci.agents.iter().any(|agent| agent.id == target.id && agent.busy)
                    || ci.queue.running.iter().any(|task| task.agent_id.as_ref() == Some(&target.id))
            })
        })
    };
    changes.retain(|change| !(undrainable(change) && (busy(change) || change.instance.is_none())));
    for change in changes.iter_mut().filter(|change| undrainable(change)) {
        change.action = Action::Delete;
        change.reason = format!("{}; its CI cannot drain, so the idle agent goes now", change.reason);
    }
}

/// What the plan migrates: instances of create-mode pools named before names carried a digest keep their names
/// (renaming means replacing) and go the usual way; new instances get names of the grammar (see `ownership`).
fn migration_note(
    desired: &Desired,
    backends: &BTreeMap<&BackendName, BackendIndex<'_>>,
    claims: &Claims,
) -> Option<String> {
    let mut digests = FastMap::default();
    let mut legacy: Vec<&str> = Vec::new();
    for backend in backends.values() {
        for (position, pool) in claims.claimed(backend) {
            if !desired.pools.get(pool).is_some_and(|pool| matches!(pool.backend.mode, InstanceMode::Create)) {
                continue;
            }
            let instance = backend.instance(position);
            if instance.state != InstanceState::Terminated
                && parse_name_cached(&desired.owner, &instance.name, &mut digests).is_none()
            {
                legacy.push(instance.name.as_str());
            }
        }
    }
    if legacy.is_empty() {
        return None;
    }
    // Only the first three names are shown: put them first, in order, without sorting all of them.
    if legacy.len() > 3 {
        legacy.select_nth_unstable(3);
    }
    let first = legacy.len().min(3);
    legacy[..first].sort_unstable();
    let shown: Vec<String> = legacy.iter().take(3).map(|name| format!("`{name}`")).collect();
    let more = if legacy.len() > 3 { format!(" and {} more", legacy.len() - 3) } else { String::new() };
    Some(format!(
        "migration: {} named before names carried a digest ({}{more}) {} as {} and {} the usual way; new \
         instances are named `{}-<pool>-<digest>-<n>`",
        plural(legacy.len() as u32, "instance"),
        shown.join(", "),
        if legacy.len() == 1 { "stays" } else { "stay" },
        if legacy.len() == 1 { "it is" } else { "they are" },
        if legacy.len() == 1 { "goes" } else { "go" },
        desired.owner
    ))
}

/// Pools in config order (orphans' pools after them, by name), and within a pool by [`action_rank`], then by
/// target name. Keys are computed once and borrow from the changes (comparing through the rank map on every
/// comparison, or cloning names into owned keys, costs more than the rest of the sort); the position breaks
/// ties, so the order is the one a stable sort gives.
fn in_apply_order(desired: &Desired, mut changes: Vec<Change>) -> Vec<Change> {
    let pool_rank: FastMap<&str, usize> = desired.pools.iter().enumerate().map(|(i, p)| (p.name.as_str(), i)).collect();
    // Target names share their start (`{owner}-{pool}-`): the sort key compares what follows as one number.
    let name_key = SortKey::new(changes.iter().map(Change::target_name));
    let mut keys: Vec<(usize, &str, u8, u64, &str, usize)> = changes
        .iter()
        .enumerate()
        .map(|(position, change)| {
            let rank = pool_rank.get(change.pool.as_str()).copied().unwrap_or(usize::MAX);
            // A pool of the config is told apart by its rank alone; only orphans' pools (all ranked last) need
            // their names compared, and comparing two equal names costs a full `memcmp` per comparison.
            let pool = if rank == usize::MAX { change.pool.as_str() } else { "" };
            let target = change.target_name();
            (rank, pool, action_rank(change.action), name_key.of(target), target, position)
        })
        .collect();
    keys.sort_unstable();
    let mut order: Vec<usize> = keys.into_iter().map(|(.., position)| position).collect();
    // In place, cycle by cycle (slot `i` gets the change at `order[i]`): a second vector of changes would add
    // their whole size to the plan's peak memory.
    for start in 0..order.len() {
        let mut slot = start;
        while order[slot] != start {
            let from = order[slot];
            changes.swap(slot, from);
            order[slot] = slot;
            slot = from;
        }
        order[slot] = slot;
    }
    changes
}

/// Apply order within a pool: free things first (deregister, delete), then replace/stop/drain, then the
/// things that add capacity. (`simulate` merges the changes of pools planned apart in the same order.)
pub(crate) fn action_rank(action: Action) -> u8 {
    match action {
        Action::Deregister => 0,
        Action::Delete => 1,
        Action::Replace => 2,
        Action::Stop => 3,
        Action::Drain => 4,
        Action::Start => 5,
        Action::Create => 6,
    }
}

fn summarize(changes: &[Change]) -> Summary {
    let mut summary = Summary::default();
    for change in changes {
        match change.action {
            Action::Create => summary.create += 1,
            Action::Start => summary.start += 1,
            Action::Stop => summary.stop += 1,
            Action::Delete => summary.delete += 1,
            Action::Drain => summary.drain += 1,
            Action::Deregister => summary.deregister += 1,
            Action::Replace => {
                summary.create += 1;
                summary.delete += 1;
            }
        }
    }
    summary
}

#[cfg(test)]
mod tests {
    use super::{plan_threads, plan_with, Stamps};
    use crate::plan::tests::large_world;

    #[test]
    fn planning_pools_side_by_side_gives_the_plan_of_planning_them_one_by_one() {
        let (desired, observed, now) = large_world(24, 30);
        let one_by_one = plan_with(&desired, &observed, now, Stamps::All, usize::MAX);
        let side_by_side = plan_with(&desired, &observed, now, Stamps::All, 0);
        assert!(one_by_one.changes.len() > 24, "the world must give every pool work: {}", one_by_one.changes.len());
        assert_eq!(side_by_side, one_by_one);
        if plan_threads() < 2 {
            eprintln!("note: one core here, so both plans ran on one thread");
        }
    }
}
