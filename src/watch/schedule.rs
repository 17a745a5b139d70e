//! The loop's decisions, as plain functions and small state machines of what the loop knows and the time it is
//! given: which observation sources are due, which planned changes may start now and which wait (and why), how
//! long a failed target or source stays away. No I/O and no clock of its own, so `ciscale simulate` can replay the
//! loop in virtual time with exactly these rules, and tests can drive the clock by hand.
//!
//! What waits, and why ([`hold_back`]):
//! - **Unobserved**: a change is only as safe as the observation it was planned from. A change of a pool whose
//!   backend account and CI source were both observed this cycle may go; one that decides from something being
//!   *absent* elsewhere (an orphan instance, an agent record without an instance, a deregistration) needs every
//!   source, because the missing one could hold exactly what it concluded was not there.
//! - **In flight**: work on one of its targets (instance or agent, by name or id) is still running; the next plan
//!   after it finishes decides again. The planner already plans nothing on targets in `Observed::in_flight` (and
//!   counts creates in flight towards `max`); this second guard also matches by agent *name*, which covers a
//!   create whose agent id the loop has not learned yet.
//! - **Backing off**: the target failed recently ([`Backoff`], per target: a failed delete of one instance never
//!   slows another pool). Creates are backed off per pool instead, by the circuit breaker (`throttle`), because a
//!   create's target is a name that does not exist yet.
//!
//! Observation sources back off the same way ([`Backoff`] keyed by [`Source`]), honouring a `Retry-After`; a
//! source in backoff is simply not observed, which holds back exactly the pools that need it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;

use crate::model::{BackendName, CiName, Desired, Observed, PoolName};
use crate::plan::{Action, Change, Plan};

use crate::model::InFlight;

pub use crate::observe::{sources, Source};

/// What a change acts on, as the per-target backoff knows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Instance { backend: BackendName, name: String },
    Agent { ci: CiName, name: String },
}

/// The targets of a change: its instance and its agent, by name (names are unique per owner across backends and
/// CI sources, and stay the same from one plan to the next, unlike a create's id).
pub fn targets_of(change: &Change) -> Vec<Target> {
    let mut targets = Vec::with_capacity(2);
    if let Some(instance) = &change.instance {
        targets.push(Target::Instance { backend: instance.backend.clone(), name: instance.name.clone() });
    }
    if let Some(agent) = &change.agent {
        targets.push(Target::Agent { ci: agent.ci.clone(), name: agent.name.clone() });
    }
    targets
}

/// Exponential backoff per key (a target, an observation source). After the `n`th failure in a row the key waits
/// `base × 2ⁿ⁻¹` (so the first failure only waits for the next regular cycle), at most `max`, at least a
/// provider's `Retry-After`, plus (from the second failure on) up to 10 % jitter taken from `now`'s sub-second
/// part: deterministic for a given time, and spread in practice, so several ciscale hosts recovering together do
/// not call in step.
#[derive(Debug, Clone)]
pub struct Backoff<K> {
    entries: BTreeMap<K, Entry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    failures: u32,
    until: Timestamp,
}

impl<K> Default for Backoff<K> {
    fn default() -> Self {
        Self { entries: BTreeMap::new() }
    }
}

impl<K: Ord + Clone> Backoff<K> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a failure at `now`; returns when the key may be tried again.
    pub fn failed(
        &mut self,
        key: K,
        now: Timestamp,
        base: Duration,
        max: Duration,
        at_least: Option<Duration>,
    ) -> Timestamp {
        let entry = self.entries.entry(key).or_insert(Entry { failures: 0, until: now });
        entry.failures = entry.failures.saturating_add(1);
        let mut wait = backoff_delay(base, entry.failures, max, now);
        if let Some(after) = at_least {
            wait = wait.max(after.min(max));
        }
        entry.until = now
            .checked_add(jiff::SignedDuration::try_from(wait).unwrap_or(jiff::SignedDuration::MAX))
            .unwrap_or(Timestamp::MAX);
        entry.until
    }

    /// Records a success: the key is forgotten. Returns whether it had been failing.
    pub fn succeeded(&mut self, key: &K) -> bool {
        self.entries.remove(key).is_some()
    }

    /// `Some(until)` while the key waits at `now`.
    pub fn waiting(&self, key: &K, now: Timestamp) -> Option<Timestamp> {
        self.entries.get(key).map(|entry| entry.until).filter(|until| now < *until)
    }

    /// Failures in a row so far.
    pub fn failures(&self, key: &K) -> u32 {
        self.entries.get(key).map_or(0, |entry| entry.failures)
    }

    /// Keeps only the keys `keep` accepts (a reload removed the others).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|key, _| keep(key));
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// `base × 2^(failures−1)`, capped at `max` (and never below `base` unless `max` is), with up to 10 % jitter from
/// `now`. Zero failures: no wait. One failure: exactly `base`, without jitter, so a key that failed once is tried
/// again on the next regular cycle, not the one after.
pub fn backoff_delay(base: Duration, failures: u32, max: Duration, now: Timestamp) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    if failures == 1 {
        return base.min(max);
    }
    let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(16));
    let delay = base.saturating_mul(factor).min(max).max(base.min(max));
    let jitter_fraction = f64::from(now.subsec_nanosecond().unsigned_abs() % 1000) / 10_000.0;
    delay.mul_f64(1.0 + jitter_fraction)
}

/// Why a planned change does not start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hold {
    /// These sources, which the change's safety depends on, were not observed this cycle.
    Unobserved { sources: Vec<Source> },
    /// Work on one of its targets is still in flight.
    InFlight,
    /// Its target failed recently and is retried from `until` on.
    BackingOff { until: Timestamp },
}

impl fmt::Display for Hold {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Hold::Unobserved { sources } => {
                let names: Vec<String> = sources.iter().map(ToString::to_string).collect();
                write!(f, "not observed this cycle: {}", names.join(", "))
            }
            Hold::InFlight => f.write_str("work on the same target is in flight"),
            Hold::BackingOff { until } => {
                write!(f, "backing off after a failure until {}", until.strftime("%H:%M:%S UTC"))
            }
        }
    }
}

/// A change taken out of the plan, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    pub change: Change,
    pub hold: Hold,
}

/// What [`hold_back`] decides from.
#[derive(Debug, Clone, Copy)]
pub struct HoldContext<'a> {
    pub desired: &'a Desired,
    /// What this cycle observed and planned from, with the work in flight (`Observed::in_flight`).
    pub observed: &'a Observed,
    /// Sources that were not observed this cycle (failed, or backing off).
    pub unobserved: &'a BTreeSet<Source>,
    pub backoff: &'a Backoff<Target>,
    pub now: Timestamp,
}

/// The sources a change's safety rests on. A change of a configured pool, on that pool's own backend and CI
/// source, rests on those two: the planner saw all of the pool's instances and agents. Anything else (an orphan
/// instance or agent record, a deregistration, a change on a pool's former backend) concludes from something
/// being absent, which only holds when every source was seen.
pub fn sources_needed(change: &Change, desired: &Desired) -> BTreeSet<Source> {
    let own_pool = desired.pool(&change.pool).filter(|pool| {
        change.action != Action::Deregister
            && change.instance.as_ref().is_none_or(|instance| instance.backend == pool.backend.backend)
            && change.agent.as_ref().is_none_or(|agent| agent.ci == pool.ci.source)
    });
    match own_pool {
        Some(pool) => {
            BTreeSet::from([Source::Backend(pool.backend.backend.clone()), Source::Ci(pool.ci.source.clone())])
        }
        None => sources(desired),
    }
}

/// Pools the plan cannot speak for this cycle: their backend account or CI source was not observed.
pub fn unobserved_pools(desired: &Desired, unobserved: &BTreeSet<Source>) -> BTreeMap<PoolName, Vec<Source>> {
    desired
        .pools
        .iter()
        .filter_map(|pool| {
            let missing: Vec<Source> =
                [Source::Backend(pool.backend.backend.clone()), Source::Ci(pool.ci.source.clone())]
                    .into_iter()
                    .filter(|source| unobserved.contains(source))
                    .collect();
            (!missing.is_empty()).then(|| (pool.name.clone(), missing))
        })
        .collect()
}

/// Whether `change` touches a target that work in flight touches (by instance or agent name, or by id).
pub fn touches_in_flight(change: &Change, in_flight: &[InFlight]) -> bool {
    let names: Vec<&str> = change
        .instance
        .iter()
        .map(|instance| instance.name.as_str())
        .chain(change.agent.iter().map(|agent| agent.name.as_str()))
        .collect();
    in_flight.iter().any(|work| {
        let work_names =
            work.instance.iter().map(|i| i.name.as_str()).chain(work.agent.iter().map(|a| a.name.as_str()));
        let same_name = work_names.into_iter().any(|name| names.contains(&name));
        let same_instance = match (&change.instance, &work.instance) {
            (Some(ours), Some(theirs)) => ours.backend == theirs.backend && ours.id.is_some() && ours.id == theirs.id,
            _ => false,
        };
        let same_agent = match (&change.agent, &work.agent) {
            (Some(ours), Some(theirs)) => ours.ci == theirs.ci && ours.id == theirs.id,
            _ => false,
        };
        same_name || same_instance || same_agent
    })
}

/// Takes the changes that must not start now out of `plan` (see the module docs), in plan order, keeping the
/// plan's summary in step; for pools not planned from a full view, drops their status line (its numbers would
/// be made up) and returns them with the sources they lacked.
pub fn hold_back(plan: &mut Plan, cx: &HoldContext<'_>) -> (Vec<Held>, BTreeMap<PoolName, Vec<Source>>) {
    let unobserved_pools = unobserved_pools(cx.desired, cx.unobserved);
    plan.pools.retain(|status| !unobserved_pools.contains_key(&status.pool));
    let mut held = Vec::new();
    let mut kept = Vec::with_capacity(plan.changes.len());
    for change in std::mem::take(&mut plan.changes) {
        let missing: Vec<Source> =
            sources_needed(&change, cx.desired).into_iter().filter(|source| cx.unobserved.contains(source)).collect();
        let hold = if !missing.is_empty() {
            Some(Hold::Unobserved { sources: missing })
        } else if touches_in_flight(&change, &cx.observed.in_flight) {
            Some(Hold::InFlight)
        } else if is_create(&change) {
            None
        } else {
            targets_of(&change)
                .iter()
                .filter_map(|target| cx.backoff.waiting(target, cx.now))
                .max()
                .map(|until| Hold::BackingOff { until })
        };
        match hold {
            Some(hold) => held.push(Held { change, hold }),
            None => kept.push(change),
        }
    }
    plan.changes = kept;
    for Held { change, .. } in &held {
        uncount(&mut plan.summary, change.action);
    }
    (held, unobserved_pools)
}

/// A create's target is a name that does not exist yet, so it is backed off per pool (the circuit breaker), not
/// per target.
fn is_create(change: &Change) -> bool {
    change.action == Action::Create
}

fn uncount(summary: &mut crate::plan::Summary, action: Action) {
    let counter = match action {
        Action::Create => &mut summary.create,
        Action::Start => &mut summary.start,
        Action::Stop => &mut summary.stop,
        Action::Delete => &mut summary.delete,
        Action::Drain => &mut summary.drain,
        Action::Deregister => &mut summary.deregister,
        Action::Replace => {
            summary.delete = summary.delete.saturating_sub(1);
            &mut summary.create
        }
    };
    *counter = counter.saturating_sub(1);
}

/// When the next cycle starts. A regular cycle comes `poll_interval` after the last one ended. Finished work asks
/// for one sooner, to see its effect, but no sooner than `settle` after the last cycle started, so a burst of
/// finishing changes costs one observation, not one each. (Events from a backend wake the loop at once: they
/// need no schedule.)
pub fn next_cycle_at(
    last_started: Timestamp,
    last_ended: Timestamp,
    poll_interval: Duration,
    work_finished: bool,
    settle: Duration,
) -> Timestamp {
    let add = |at: Timestamp, by: Duration| {
        at.checked_add(jiff::SignedDuration::try_from(by).unwrap_or(jiff::SignedDuration::MAX))
            .unwrap_or(Timestamp::MAX)
    };
    let regular = add(last_ended, poll_interval);
    if work_finished {
        regular.min(add(last_started, settle).max(last_ended))
    } else {
        regular
    }
}

/// How long a cycle waits for one source's observation: the poll interval, at least 5 s (a paginated cloud
/// listing can take seconds) and at most 30 s. A source that hangs longer is unobserved for that cycle and backs
/// off, so it delays the other pools' cycles only now and then, by at most this much.
pub fn observe_deadline(poll_interval: Duration) -> Duration {
    poll_interval.clamp(Duration::from_secs(5), Duration::from_secs(30))
}

/// The pause between a cycle and one asked for by finished work: a second, or the poll interval if shorter.
pub fn settle_for(poll_interval: Duration) -> Duration {
    poll_interval.min(Duration::from_secs(1))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::{
        Agent, AgentId, BackendObservation, CiObservation, Instance, InstanceId, InstanceState, Queue, Task, TaskId,
        OWNER_LABEL, POOL_LABEL,
    };

    const CONFIG: &str = r#"
id: t
ci: { wp: { kind: fake }, other-ci: { kind: fake } }
backends: { a: { kind: fake }, b: { kind: fake } }
pools:
  - { name: on-a, ci: { source: wp, labels: { platform: a } }, backend: { name: a }, scale: { max: 3, idleTimeout: 1m } }
  - { name: on-b, ci: { source: wp, labels: { platform: b } }, backend: { name: b }, scale: { max: 3, idleTimeout: 1m } }
"#;

    fn desired() -> Desired {
        crate::config::load_str("t.yaml", CONFIG, &|_| None).expect("valid config")
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).expect("valid")
    }

    /// The name of a pool's `n`th instance and its agent, as this deployment (`t`) names them.
    fn name(pool: &str, n: u32) -> String {
        crate::plan::instance_name("t", &crate::model::PoolName::new(pool), n)
    }

    fn instance(name: &str, pool: &str, created: i64) -> Instance {
        Instance {
            id: InstanceId::new(format!("id-{name}")),
            name: name.to_owned(),
            state: InstanceState::Running,
            created_at: at(created),
            labels: BTreeMap::from([
                (OWNER_LABEL.to_owned(), "t".to_owned()),
                (POOL_LABEL.to_owned(), pool.to_owned()),
            ]),
            attributes: BTreeMap::new(),
        }
    }

    fn agent(name: &str, id: &str, last_work: i64) -> Agent {
        Agent {
            id: AgentId::new(id),
            name: name.to_owned(),
            busy: false,
            no_schedule: false,
            last_contact: Some(at(last_work)),
            last_work: Some(at(last_work)),
            labels: BTreeMap::new(),
            // No creation time: a record without an instance is then past its bootstrap window at once, the case
            // where a partial view would deregister it.
            created_at: None,
        }
    }

    fn task(platform: &str, id: &str) -> Task {
        Task { id: TaskId::new(id), labels: [("platform", platform)].into(), demands: Vec::new(), agent_id: None }
    }

    /// Backend `a` holds two idle agents' instances (idle long past the timeout); `b` holds one. Jobs wait for
    /// both pools. `with_a: false` is the observation of a cycle in which `a` did not answer.
    fn observed(with_a: bool) -> Observed {
        let mut observed = Observed { observed_at: at(3600), ..Observed::default() };
        if with_a {
            observed.backends.insert(
                BackendName::new("a"),
                BackendObservation {
                    instances: vec![instance(&name("on-a", 1), "on-a", 0), instance(&name("on-a", 2), "on-a", 0)],
                    ..Default::default()
                },
            );
        }
        observed.backends.insert(
            BackendName::new("b"),
            BackendObservation { instances: vec![instance(&name("on-b", 1), "on-b", 0)], ..Default::default() },
        );
        observed.ci.insert(
            CiName::new("wp"),
            CiObservation {
                agents: vec![
                    agent(&name("on-a", 1), "1", 0),
                    agent(&name("on-a", 2), "2", 0),
                    agent(&name("on-b", 1), "3", 0),
                ],
                queue: Queue { pending: vec![task("a", "j1"), task("b", "j2"), task("b", "j3")], running: Vec::new() },
            },
        );
        observed.ci.insert(CiName::new("other-ci"), CiObservation::default());
        observed
    }

    /// Plans `observed` with `in_flight` as the loop does (the planner sees the work in flight) and holds back.
    fn held_back(
        observed: &Observed,
        unobserved: &BTreeSet<Source>,
        in_flight: &[InFlight],
        backoff: &Backoff<Target>,
    ) -> (Plan, Vec<Held>) {
        let desired = desired();
        let observed = &Observed { in_flight: in_flight.to_vec(), ..observed.clone() };
        let mut plan = crate::plan::plan(&desired, observed, observed.observed_at);
        let cx = HoldContext { desired: &desired, observed, unobserved, backoff, now: observed.observed_at };
        let (held, _) = hold_back(&mut plan, &cx);
        (plan, held)
    }

    #[test]
    fn the_first_failure_waits_one_interval_then_the_wait_doubles_up_to_the_cap() {
        let mut backoff = Backoff::new();
        let poll = Duration::from_secs(10);
        let max = Duration::from_secs(300);
        let mut now = at(0);
        let first = backoff.failed("x", now, poll, max, None);
        assert_eq!(first, now + jiff::SignedDuration::from_secs(10), "the first failure waits exactly one interval");
        assert!(backoff.succeeded(&"x"));
        for expected in [10, 20, 40, 80, 160, 300, 300] {
            let until = backoff.failed("x", now, poll, max, None);
            let waited = until.duration_since(now).as_secs_f64();
            assert!(
                waited >= f64::from(expected) && waited <= f64::from(expected) * 1.1,
                "after {} failures: waited {waited}s, expected {expected}s (+10 % jitter)",
                backoff.failures(&"x")
            );
            assert_eq!(backoff.waiting(&"x", now), Some(until));
            assert_eq!(backoff.waiting(&"x", until), None, "free again at `until`");
            now = until;
        }
        assert!(backoff.succeeded(&"x"));
        assert_eq!(backoff.failures(&"x"), 0);
        assert!(!backoff.succeeded(&"x"), "nothing left to forget");
    }

    #[test]
    fn a_retry_after_is_honoured_within_the_cap() {
        let mut backoff = Backoff::new();
        let until = backoff.failed(
            "x",
            at(0),
            Duration::from_secs(10),
            Duration::from_secs(300),
            Some(Duration::from_secs(45)),
        );
        assert!(until >= at(45), "{until}");
        let capped = backoff.failed(
            "y",
            at(0),
            Duration::from_secs(10),
            Duration::from_secs(300),
            Some(Duration::from_secs(9999)),
        );
        assert!(capped <= at(330), "a huge Retry-After is capped at the longest backoff: {capped}");
    }

    #[test]
    fn jitter_comes_from_the_given_time_so_a_replay_is_exact() {
        let now = Timestamp::from_nanosecond(1_700_000_000_123_456_789).expect("valid");
        let first = backoff_delay(Duration::from_secs(10), 3, Duration::from_secs(300), now);
        let again = backoff_delay(Duration::from_secs(10), 3, Duration::from_secs(300), now);
        assert_eq!(first, again);
        assert_eq!(backoff_delay(Duration::from_secs(10), 0, Duration::from_secs(300), now), Duration::ZERO);
    }

    #[test]
    fn with_every_source_observed_nothing_is_held() {
        let (plan, held) = held_back(&observed(true), &BTreeSet::new(), &[], &Backoff::new());
        assert!(held.is_empty(), "{held:?}");
        assert!(!plan.changes.is_empty(), "the world asks for work: a job for `on-a`, two for `on-b`");
    }

    #[test]
    fn a_missing_backend_holds_its_pools_and_every_cleanup_but_not_the_other_pools() {
        // `a` did not answer: its instances are unknown, so its agents look like records without an instance.
        let unobserved = BTreeSet::from([Source::Backend(BackendName::new("a"))]);
        let view = observed(false);
        let (plan, held) = held_back(&view, &unobserved, &[], &Backoff::new());

        // What the full view would have said about `a`'s agents, the partial one must not act on.
        assert!(
            held.iter().any(|held| held.change.action == Action::Deregister),
            "the partial view does take `a`'s agents for orphans: {held:?}"
        );
        for change in &plan.changes {
            let instance_backend = change.instance.as_ref().map(|instance| instance.backend.as_str());
            assert_eq!(change.pool.as_str(), "on-b", "only the fully observed pool may act: {change:?}");
            assert_eq!(instance_backend, Some("b"), "{change:?}");
            assert_ne!(change.action, Action::Deregister, "{change:?}");
            let agent_name = change.agent.as_ref().map(|agent| agent.name.as_str()).unwrap_or_default();
            assert!(!agent_name.starts_with("t-on-a"), "an agent of `a` is touched: {change:?}");
        }
        assert!(plan.changes.iter().any(|change| change.action == Action::Create), "`on-b` still scales up: {plan:?}");
        assert!(plan.pools.iter().all(|status| status.pool.as_str() == "on-b"), "no made-up numbers for `on-a`");
        assert_eq!(plan.summary.deregister, 0);
        for held in &held {
            assert!(
                matches!(&held.hold, Hold::Unobserved { sources } if sources.contains(&Source::Backend(BackendName::new("a")))),
                "{held:?}"
            );
        }
    }

    #[test]
    fn a_missing_ci_source_holds_only_the_pools_bound_to_it_and_cleanup() {
        // An agent record of ours with no instance anywhere: the full view deregisters it.
        let mut view = observed(true);
        if let Some(wp) = view.ci.get_mut(&CiName::new("wp")) {
            wp.agents.push(agent(&name("on-b", 7), "7", 0));
        }
        let (full, _) = held_back(&view, &BTreeSet::new(), &[], &Backoff::new());
        assert!(full.changes.iter().any(|change| change.action == Action::Deregister), "{full:?}");

        // `other-ci` did not answer. No pool uses it, so both pools plan as before; but the deregistration
        // concludes that no instance has that agent, which another source could contradict: it waits.
        let unobserved = BTreeSet::from([Source::Ci(CiName::new("other-ci"))]);
        let (plan, held) = held_back(&view, &unobserved, &[], &Backoff::new());
        assert!(plan.changes.iter().any(|change| change.pool.as_str() == "on-a"), "{plan:?}");
        assert!(plan.changes.iter().any(|change| change.pool.as_str() == "on-b"), "{plan:?}");
        assert!(plan.changes.iter().all(|change| change.action != Action::Deregister), "{plan:?}");
        assert_eq!(held.len(), 1, "{held:?}");
        assert_eq!(held[0].change.action, Action::Deregister);
        assert_eq!(held[0].hold, Hold::Unobserved { sources: vec![Source::Ci(CiName::new("other-ci"))] });
    }

    #[test]
    fn targets_in_flight_are_not_started_again() {
        let view = observed(true);
        let (full, _) = held_back(&view, &BTreeSet::new(), &[], &Backoff::new());
        let busy = full
            .changes
            .iter()
            .find(|change| change.instance.as_ref().is_some_and(|i| i.id.is_some()))
            .expect("a change on an existing instance")
            .clone();
        let in_flight = [InFlight {
            pool: busy.pool.clone(),
            action: busy.action,
            instance: busy.instance.clone(),
            agent: None,
            since: at(3500),
        }];
        let (plan, _) = held_back(&view, &BTreeSet::new(), &in_flight, &Backoff::new());
        let name = busy.instance.as_ref().map(|i| i.name.clone()).unwrap_or_default();
        assert!(plan.changes.iter().all(|change| change.instance.as_ref().map(|i| &i.name) != Some(&name)), "{plan:?}");
        for change in full.changes.iter().filter(|change| change.instance.as_ref().map(|i| &i.name) != Some(&name)) {
            assert!(plan.changes.contains(change), "every other change still goes: {change:?} in {plan:?}");
        }
    }

    #[test]
    fn a_create_in_flight_that_is_not_listed_yet_counts_as_capacity() {
        // Two jobs for `on-b` and one idle agent past its timeout: the plan wants new agents. One create is in
        // flight and not yet listed: one planned create fewer.
        let view = observed(true);
        let (full, _) = held_back(&view, &BTreeSet::new(), &[], &Backoff::new());
        let creates = |plan: &Plan| {
            plan.changes.iter().filter(|c| c.pool.as_str() == "on-b" && c.action == Action::Create).count()
        };
        assert!(creates(&full) >= 1, "{full:?}");
        let in_flight = [InFlight {
            pool: crate::model::PoolName::new("on-b"),
            action: Action::Create,
            instance: Some(crate::plan::InstanceTarget {
                backend: BackendName::new("b"),
                id: None,
                name: name("on-b", 9),
            }),
            agent: None,
            since: at(3500),
        }];
        let (plan, _) = held_back(&view, &BTreeSet::new(), &in_flight, &Backoff::new());
        assert_eq!(creates(&plan), creates(&full) - 1);
        assert_eq!(plan.summary.create as usize, plan.changes.iter().filter(|c| c.action == Action::Create).count());
    }

    #[test]
    fn a_failed_target_waits_out_its_backoff_while_other_targets_go() {
        let view = observed(true);
        let (full, _) = held_back(&view, &BTreeSet::new(), &[], &Backoff::new());
        let failing = full
            .changes
            .iter()
            .find(|change| change.action != Action::Create)
            .expect("a change on an existing target")
            .clone();
        let mut backoff = Backoff::new();
        let until = backoff.failed(
            targets_of(&failing)[0].clone(),
            at(3590),
            Duration::from_secs(60),
            Duration::from_secs(300),
            None,
        );
        let (plan, held) = held_back(&view, &BTreeSet::new(), &[], &backoff);
        assert!(!plan.changes.contains(&failing));
        assert!(held.iter().any(|held| held.change == failing && held.hold == Hold::BackingOff { until }));
        assert_eq!(plan.changes.len(), full.changes.len() - 1, "every other change goes");
    }

    #[test]
    fn finished_work_brings_the_next_cycle_forward_but_not_before_the_settle_time() {
        let poll = Duration::from_secs(10);
        let settle = settle_for(poll);
        assert_eq!(settle, Duration::from_secs(1));
        // Cycle from 0 s to 0.2 s.
        let started = at(0);
        let ended = started + jiff::SignedDuration::from_millis(200);
        assert_eq!(next_cycle_at(started, ended, poll, false, settle), ended + jiff::SignedDuration::from_secs(10));
        assert_eq!(next_cycle_at(started, ended, poll, true, settle), at(1));
        // A cycle that took longer than the settle time: right after it.
        let long = started + jiff::SignedDuration::from_secs(3);
        assert_eq!(next_cycle_at(started, long, poll, true, settle), long);
        // A poll interval shorter than a second is its own settle time.
        assert_eq!(settle_for(Duration::from_millis(200)), Duration::from_millis(200));
    }
}
