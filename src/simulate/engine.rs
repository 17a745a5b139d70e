//! The simulation proper: a fake world on a virtual clock, observed, planned and applied the way `watch` does it.
//!
//! # The world
//! It plays the backends, the CI and the agents, and answers observations with the same [`Observed`] the fake
//! providers give (it keeps one and changes it in place, so an observation costs nothing):
//! - a create registers the agent record (create-if-absent by name), then creates the instance, which boots for
//!   the backend's boot time (seeded) and fails for lack of capacity at the configured rate, candidate by
//!   candidate (`serverType: cx22,cx32`); once booted its agent checks in and takes jobs;
//! - the CI hands a queued job to the first checked-in, undrained agent with room (registration order) whose pool
//!   takes it, by [`pool_takes`] — the rule the planner counts demand with; an agent that frees up takes the
//!   oldest queued job it can. Agents long-poll, so this happens the moment a job arrives or an agent frees up,
//!   not at the next cycle;
//! - drain, start, stop, delete, replace and deregister do what the apply steps do (`src/apply/lifecycle.rs`);
//!   an ephemeral agent powers its instance off after one job (Incus deletes such a container itself);
//! - a job whose agent goes away while running is queued again (a CI does that) and counted.
//!
//! # The loop
//! As `watch` runs it today: a cycle observes, plans with [`plan::plan`], lets the create throttle and circuit
//! breakers hold creates back ([`Throttle`]), and applies. The next cycle comes a poll interval after the
//! previous one ended (a container create holds its cycle until the container runs; at most
//! [`ApplyOptions::concurrency`] changes run at once); after a failed change, the wait doubles (no jitter here:
//! the run must be deterministic). An Incus instance of ours that stops or goes away wakes the loop at once.
//!
//! # Skipping idle stretches
//! Between two world events (a job arrives or finishes, an instance finishes booting) the observation stays the
//! same, so a plan can only change when time itself crosses one of the planner's thresholds. After a cycle
//! whose plan was empty, the loop jumps to the first poll tick at or after the earliest of: the next world
//! event, and every time a time-based rule of the planner could fire ([`next_threshold`]): idle timeouts and
//! bootstrap timeouts counted from instance creation and agent `last_work`, the paid-hour windows of hourly
//! billing, and schedule windows opening or closing. Ticks in between would have planned nothing, so the result
//! is the same as cycling through them; a test runs both ways and compares.
//!
//! # Planning by parts
//! Most cycles that do run follow an event in one pool (a job arrives, finishes, an agent boots) while the other
//! pools stand still. When pools share nothing the planner could relate (create-mode pools of long-lived CI
//! sources, no pre-registered or adopted agents, and no job that two of them could take), the pools fall into
//! *parts* — pools linked by a job they could both take share a part — and a part's changes depend on its own
//! instances, agents and jobs alone. Each cycle then plans only the parts that can have changed: something
//! happened in them (an event, a change applied), their last plan had changes, or time crossed one of their
//! thresholds (as above, from their own instances and agents). A part that planned nothing and saw none of these
//! plans nothing again, so its plan is left out. The parts' changes, merged in the planner's order, are the
//! whole plan's; a test plans the whole world beside the parts at every cycle and compares. A part plans on the
//! world's own items, moved into its view and back for the plan (copying them cost more than planning), and the
//! same test checks that each part gets exactly its own items and the world gets them all back in its order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};

use jiff::{SignedDuration, Timestamp};

use super::models::{machine_type, BackendModel, PriceSource, BUNDLED_PRICES_DATE, MACHINE_TYPE_KEYS};
use super::report::{RunReport, Tally};
use super::svg::Series;
use super::trace::Trace;
use crate::apply::{ApplyOptions, Outcome};
use crate::model::{
    Agent, AgentId, AgentRef, BackendName, BackendObservation, Billing, CiName, CiObservation, Desired, Instance,
    InstanceId, InstanceMode, InstanceState, Labels, Observed, PoolName, Price, Task, TaskId, AGENT_LABEL,
    EPHEMERAL_LABEL, OWNER_LABEL, POOL_LABEL,
};
use crate::plan::matching::pool_takes;
use crate::plan::{self, Action, Change, Plan};
use crate::watch::throttle::Throttle;

/// How one run goes.
#[derive(Debug, Clone)]
pub struct Settings {
    /// What the report calls this run.
    pub name: String,
    pub seed: u64,
    /// The window: the world starts empty at `from`; hours and cost are counted until `until`, or until the last
    /// job finished when that is later.
    pub from: Timestamp,
    pub until: Timestamp,
    pub models: BTreeMap<BackendName, BackendModel>,
    /// Jump over idle stretches and plan by parts (see the module docs); off only to check that it changes
    /// nothing.
    pub skip_idle: bool,
    /// Record queue length, serving agents and cost over time (for `--svg`).
    pub series: bool,
    /// A run with jobs still queued this long after its window gives up (a policy that cannot keep up)
    /// [`GIVE_UP_AFTER`].
    pub give_up_after: SignedDuration,
}

/// How long after its window a run waits for its last jobs by default: a week.
pub const GIVE_UP_AFTER: SignedDuration = SignedDuration::from_hours(7 * 24);
/// The longest wait between cycles after failures (`WatchOptions::default().max_backoff`).
const MAX_BACKOFF: SignedDuration = SignedDuration::from_secs(300);
/// Points per series in the SVG.
const SERIES_POINTS: i64 = 720;

/// Runs the trace through the config and reports what happened.
pub fn run(desired: &Desired, trace: &Trace, settings: &Settings) -> RunReport {
    let mut sim = Sim::new(desired, trace, settings);
    sim.run();
    sim.report()
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Arrive(usize),
    /// `token` tells a run of the job from an earlier one that was interrupted.
    Finish {
        job: usize,
        token: u64,
    },
    /// `generation` tells this boot from an earlier one of the same instance (stopped and started again).
    BootDone {
        instance: InstanceId,
        generation: u64,
    },
    Sample,
}

struct InstanceSide {
    backend: BackendName,
    pool: Option<usize>,
    price: Option<Price>,
    generation: u64,
    /// When it started to count as up (booting or running); `None` while stopped.
    up_since: Option<Timestamp>,
    /// Hourly billing: since creation, stopped or not; per second: the current run.
    billed_since: Option<Timestamp>,
    /// The agent checked in from it, once booted.
    agent: Option<AgentId>,
}

struct AgentSide {
    ci: CiName,
    pool: Option<usize>,
    capacity: u32,
    running: u32,
    jobs_done: u32,
    ephemeral: bool,
    /// The instance it runs on, once that booted; `None`: not in contact.
    serving_on: Option<InstanceId>,
    busy_since: Option<Timestamp>,
}

struct JobRun {
    ci: Option<CiName>,
    class: usize,
    started: Option<Timestamp>,
    pool: Option<usize>,
    agent: Option<AgentId>,
    token: u64,
    finished: bool,
}

/// Jobs of one CI source, parallel to its observed queue.
#[derive(Default)]
struct QueueSide {
    pending: Vec<usize>,
    running: Vec<usize>,
}

struct Sim<'a> {
    desired: &'a Desired,
    trace: &'a Trace,
    settings: &'a Settings,
    rng: fastrand::Rng,
    now: Timestamp,
    observed: Observed,
    instances: BTreeMap<InstanceId, InstanceSide>,
    agents: BTreeMap<AgentId, AgentSide>,
    /// The agents whose `serving_on` is set: `observe` marks them in contact every cycle, and finding each
    /// observed agent in `agents` (by comparing ids) was a twentieth of a run.
    serving: rustc_hash::FxHashSet<AgentId>,
    queues: BTreeMap<CiName, QueueSide>,
    /// Per backend and per CI source: the pool of each observed instance and agent, parallel to the observation's
    /// lists (placing them by pool takes no lookup by id).
    pools_of: PoolsOf,
    jobs: Vec<JobRun>,
    /// Per class of jobs (same source, labels, demands): which pools take them.
    classes: Vec<Vec<bool>>,
    tallies: Vec<Tally>,
    /// Instances of no configured pool (never created by this config; kept for completeness).
    stray: Tally,
    events: BinaryHeap<Reverse<(Timestamp, u64, Event)>>,
    sequence: u64,
    next_instance: u64,
    next_agent: u64,
    open_jobs: u64,
    unmatched: u64,
    interrupted: u64,
    last_finish: Option<Timestamp>,
    // The loop.
    throttle: Throttle,
    next_cycle: Timestamp,
    /// The current cycle's apply runs until then (a trigger meanwhile starts the next cycle right after).
    busy_until: Timestamp,
    failures: u32,
    /// A wake-up nobody waited for yet (tokio's `Notify` keeps one).
    wake_permit: bool,
    /// A cycle is applying: a wake-up now only leaves a permit.
    applying: bool,
    cycles: u64,
    /// A dispatcher that logs nothing (made once: the loop silences the throttle twice a cycle).
    silent: tracing::Dispatch,
    schedule_cache: HashMap<(usize, usize), (Timestamp, Option<Timestamp>)>,
    rules: Rules,
    series: Option<SeriesRecorder>,
    /// Planning by parts (see the module docs); `None`: the whole config is planned every cycle.
    parts: Option<Parts>,
    /// Also plan the whole world at every cycle and check the parts' plan against it (tests only).
    #[cfg(test)]
    check_parts: bool,
}

/// The pools split into parts that are planned on their own (see the module docs).
struct Parts {
    /// Per pool (config order): its part.
    of_pool: Vec<usize>,
    /// Per class of jobs: the part of the pools that take them (`None`: no pool does).
    of_class: Vec<Option<usize>>,
    /// Per pool name: its index in the config (the planner orders changes by it).
    rank: HashMap<PoolName, usize>,
    /// Per part: the config with only its pools.
    desired: Vec<Desired>,
    /// Per part: the observation of its pools while it plans — the world's own instances, agents and jobs of
    /// its pools, lent to it and given back after ([`lend`], [`give_back`]); backends' prices and missing images
    /// stay. Between plans their lists are empty.
    views: Vec<Observed>,
    /// Per part: it must be planned at the next cycle (something in it changed, or its last plan had changes).
    dirty: Vec<bool>,
    /// Per part: from when time alone could change its (empty) plan.
    due: Vec<Option<Timestamp>>,
    /// A plan without changes, for cycles that plan no part (the throttle still sees one every cycle).
    blank: Plan,
    /// Part plans made, and whole plans made instead (for the report's count of planner calls).
    plans: u64,
    whole_plans: u64,
}

impl<'a> Sim<'a> {
    fn new(desired: &'a Desired, trace: &'a Trace, settings: &'a Settings) -> Self {
        let mut observed = Observed { observed_at: settings.from, ..Observed::default() };
        for (name, model) in &settings.models {
            let prices = model.price_list();
            observed.backends.insert(name.clone(), BackendObservation { prices, ..BackendObservation::default() });
        }
        for name in desired.ci.keys() {
            observed.ci.insert(name.clone(), CiObservation::default());
        }
        let mut sim = Self {
            desired,
            trace,
            settings,
            rng: fastrand::Rng::with_seed(settings.seed),
            now: settings.from,
            observed,
            instances: BTreeMap::new(),
            agents: BTreeMap::new(),
            serving: Default::default(),
            queues: desired.ci.keys().map(|name| (name.clone(), QueueSide::default())).collect(),
            pools_of: PoolsOf::default(),
            jobs: Vec::with_capacity(trace.jobs.len()),
            classes: Vec::new(),
            tallies: vec![Tally::default(); desired.pools.len()],
            stray: Tally::default(),
            events: BinaryHeap::new(),
            sequence: 0,
            next_instance: 0,
            next_agent: 0,
            open_jobs: 0,
            unmatched: 0,
            interrupted: 0,
            last_finish: None,
            throttle: Throttle::new(),
            next_cycle: settings.from,
            busy_until: settings.from,
            failures: 0,
            wake_permit: false,
            applying: false,
            cycles: 0,
            silent: tracing::Dispatch::none(),
            schedule_cache: HashMap::new(),
            rules: Rules::new(desired),
            series: settings.series.then(|| SeriesRecorder::new(settings.from, settings.until)),
            parts: None,
            #[cfg(test)]
            check_parts: false,
        };
        sim.classify_jobs();
        sim.adopt_existing();
        if settings.skip_idle {
            sim.parts = Parts::new(desired, &sim.classes, &sim.observed);
        }
        if sim.series.is_some() {
            sim.push(settings.from, Event::Sample);
        }
        sim
    }

    /// Assigns every job its CI source and class, and queues its arrival. Jobs no pool takes still arrive (a CI
    /// would list them) but are not waited for.
    fn classify_jobs(&mut self) {
        let mut class_of: HashMap<(Option<CiName>, &Labels, &[String]), usize> = HashMap::new();
        let trace = self.trace;
        for (index, job) in trace.jobs.iter().enumerate() {
            let ci = match &job.ci {
                Some(name) => self.desired.ci.contains_key(name).then(|| name.clone()),
                None => {
                    let takes = |source: &CiName| {
                        self.desired.pools.iter().filter(|pool| &pool.ci.source == source).any(|pool| {
                            pool_takes(self.desired.ci.get(source).map(|s| &s.kind), pool, &job.labels, &job.demands)
                        })
                    };
                    self.desired
                        .ci
                        .keys()
                        .find(|source| takes(source))
                        .or_else(|| self.desired.ci.keys().next())
                        .cloned()
                }
            };
            let key = (ci.clone(), &job.labels, job.demands.as_slice());
            let class = match class_of.get(&key) {
                Some(&class) => class,
                None => {
                    let eligible: Vec<bool> = self
                        .desired
                        .pools
                        .iter()
                        .map(|pool| {
                            ci.as_ref().is_some_and(|ci| {
                                &pool.ci.source == ci
                                    && pool_takes(
                                        self.desired.ci.get(ci).map(|s| &s.kind),
                                        pool,
                                        &job.labels,
                                        &job.demands,
                                    )
                            })
                        })
                        .collect();
                    self.classes.push(eligible);
                    class_of.insert(key, self.classes.len() - 1);
                    self.classes.len() - 1
                }
            };
            if self.classes[class].iter().any(|takes| *takes) {
                self.open_jobs += 1;
            } else {
                self.unmatched += 1;
            }
            self.jobs.push(JobRun { ci, class, started: None, pool: None, agent: None, token: 0, finished: false });
            self.push(job.at.max(self.settings.from), Event::Arrive(index));
        }
    }

    /// The instances and agents that exist before ciscale runs: adopted instances (start/stop pools, stopped) with
    /// their agents, and pre-registered agents (Picus mode, drained while they have no server).
    fn adopt_existing(&mut self) {
        let desired = self.desired;
        for (pool_index, pool) in desired.pools.iter().enumerate() {
            if let InstanceMode::StartStop { instances } = &pool.backend.mode {
                for adopted in instances {
                    if !self.instances.contains_key(&adopted.id) {
                        let instance = Instance {
                            id: adopted.id.clone(),
                            name: adopted.id.to_string(),
                            state: InstanceState::Stopped,
                            created_at: self.settings.from,
                            labels: BTreeMap::new(),
                            attributes: pool.backend.machine.clone(),
                        };
                        let price = self.price_of(&pool.backend.backend, &instance.attributes);
                        self.instances.insert(
                            adopted.id.clone(),
                            InstanceSide {
                                backend: pool.backend.backend.clone(),
                                pool: Some(pool_index),
                                price,
                                generation: 0,
                                up_since: None,
                                billed_since: None,
                                agent: None,
                            },
                        );
                        if let Some(backend) = self.observed.backends.get_mut(&pool.backend.backend) {
                            backend.instances.push(instance);
                            self.pools_of
                                .instances
                                .entry(pool.backend.backend.clone())
                                .or_default()
                                .push(Some(pool_index));
                        }
                    }
                    let reference = adopted.agent.clone().unwrap_or_else(|| AgentRef::Name(adopted.id.to_string()));
                    self.ensure_agent(pool_index, &reference, false);
                }
            }
            if let Some(reference) = &pool.agent.preregistered {
                self.ensure_agent(pool_index, reference, true);
            }
        }
    }

    /// An agent record that exists before the run (registered by hand).
    fn ensure_agent(&mut self, pool_index: usize, reference: &AgentRef, drained: bool) {
        let pool = &self.desired.pools[pool_index];
        let (id, name) = match reference {
            AgentRef::Id(id) => (id.clone(), id.to_string()),
            AgentRef::Name(name) => {
                self.next_agent += 1;
                (AgentId::new(format!("a{}", self.next_agent)), name.clone())
            }
        };
        let Some(ci) = self.observed.ci.get_mut(&pool.ci.source) else {
            return;
        };
        if ci.agents.iter().any(|agent| agent.id == id || agent.name == name) {
            return;
        }
        self.pools_of.agents.entry(pool.ci.source.clone()).or_default().push(Some(pool_index));
        ci.agents.push(Agent {
            id: id.clone(),
            name,
            busy: false,
            no_schedule: drained,
            last_contact: None,
            last_work: None,
            labels: pool.ci.labels.clone(),
            // Registered by hand before the run: the CI's date does not matter to the plan.
            created_at: None,
        });
        self.agents.insert(
            id,
            AgentSide {
                ci: pool.ci.source.clone(),
                pool: Some(pool_index),
                capacity: pool.scale.jobs_per_agent.max(1),
                running: 0,
                jobs_done: 0,
                ephemeral: false,
                serving_on: None,
                busy_since: None,
            },
        );
    }

    fn push(&mut self, at: Timestamp, event: Event) {
        self.sequence += 1;
        self.events.push(Reverse((at, self.sequence, event)));
    }

    // -----------------------------------------------------------------------------------------------------------
    // The main loop
    // -----------------------------------------------------------------------------------------------------------

    fn run(&mut self) {
        let give_up = self.settings.until.saturating_add(self.settings.give_up_after).unwrap_or(Timestamp::MAX);
        let mut gave_up = false;
        loop {
            let next_event = self.events.peek().map(|Reverse((at, _, _))| *at);
            let event_first = next_event.is_some_and(|at| at <= self.next_cycle);
            let at = if event_first { next_event.unwrap_or(self.next_cycle) } else { self.next_cycle };
            if at > self.settings.until && self.open_jobs == 0 {
                break;
            }
            if at > give_up {
                gave_up = true;
                break;
            }
            self.now = at;
            if event_first {
                if let Some(Reverse((_, _, event))) = self.events.pop() {
                    self.handle(event);
                }
            } else {
                self.cycle();
            }
        }
        self.now = if gave_up { give_up } else { self.ran_until() };
        self.close_meters();
    }

    fn ran_until(&self) -> Timestamp {
        match self.last_finish {
            Some(last) if last > self.settings.until => last,
            _ => self.settings.until,
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Arrive(job) => self.arrive(job),
            Event::Finish { job, token } => self.finish(job, token),
            Event::BootDone { instance, generation } => self.boot_done(&instance, generation),
            Event::Sample => self.sample(),
        }
    }

    /// One reconcile, as `watch::reconcile` does it.
    fn cycle(&mut self) {
        let started = self.now;
        self.cycles += 1;
        self.observe();
        let mut plan = self.plan(started);
        let planned = plan.has_changes();
        for change in &plan.changes {
            let target =
                change.instance.as_ref().map(|i| i.name.as_str()).or(change.agent.as_ref().map(|a| a.name.as_str()));
            tracing::trace!(at = %started, pool = %change.pool, action = %change.action, target, reason = %change.reason, "planned");
        }
        let desired = self.desired;
        let held = quietly(&self.silent, || self.throttle.filter(&mut plan, desired, started));
        self.applying = true;
        let (outcomes, took) = self.apply(&plan);
        self.applying = false;
        let ended = started.saturating_add(took).unwrap_or(started);
        quietly(&self.silent, || self.throttle.record(&outcomes, desired, ended));
        let failed = outcomes.iter().any(|(_, outcome)| matches!(outcome, Outcome::Failed { .. }));
        self.failures = if failed { self.failures + 1 } else { 0 };
        self.busy_until = ended;
        let wait = self.next_wait();
        let mut next = ended.saturating_add(wait).unwrap_or(Timestamp::MAX);
        if self.failures == 0 && self.wake_permit {
            self.wake_permit = false;
            next = ended;
        }
        let quiet = !planned && held.changes.is_empty() && self.failures == 0 && took.is_zero();
        if self.settings.skip_idle && quiet && next > started {
            next = self.skip_to(started, next, wait);
        }
        self.next_cycle = next;
    }

    /// `watch::next_wait` without its jitter: the poll interval, doubled per failure up to five minutes.
    fn next_wait(&self) -> SignedDuration {
        let poll = self.desired.poll_interval.signed().max(SignedDuration::from_millis(1));
        if self.failures == 0 {
            return poll;
        }
        let factor = 2i32.saturating_pow(self.failures.min(16));
        poll.checked_mul(factor).unwrap_or(MAX_BACKOFF).min(MAX_BACKOFF).max(poll.min(MAX_BACKOFF))
    }

    /// The first tick `started + k·wait` (k ≥ 1) at or after the next moment the plan could change; `next` when
    /// that is the next tick anyway.
    fn skip_to(&mut self, started: Timestamp, next: Timestamp, wait: SignedDuration) -> Timestamp {
        let next_event = self.events.peek().map(|Reverse((at, _, _))| *at);
        let threshold = self.next_threshold(started);
        let mut target = [next_event, threshold].into_iter().flatten().min();
        // Nothing will ever happen again: the run ends at `until` (or with its last job).
        if target.is_none() {
            target = Some(self.settings.until.max(started));
        }
        let Some(target) = target else { return next };
        if target <= next {
            return next;
        }
        let gap = target.duration_since(started).as_nanos();
        let step = wait.as_nanos().max(1);
        let ticks = (gap + step - 1) / step;
        let span = i64::try_from(ticks).ok().and_then(|ticks| wait.checked_mul(i32::try_from(ticks).ok()?));
        match span.and_then(|span| started.checked_add(span).ok()) {
            Some(at) => at,
            None => {
                // More ticks than fit an `i32`: step in whole nanoseconds instead.
                let nanos = i128::try_from(ticks).unwrap_or(i128::MAX).saturating_mul(step);
                let span = SignedDuration::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX));
                started.saturating_add(span).unwrap_or(Timestamp::MAX)
            }
        }
    }

    /// The earliest moment after `now` at which a time-based rule of the planner could decide differently with
    /// the same observation (see [`threshold_after`]).
    fn next_threshold(&mut self, now: Timestamp) -> Option<Timestamp> {
        threshold_after(self.desired, &self.rules, &self.observed, now, &mut self.schedule_cache)
    }

    /// The plan of this cycle: the whole config's, or the parts' that can have changed (see the module docs).
    fn plan(&mut self, now: Timestamp) -> Plan {
        let Some(mut parts) = self.parts.take() else {
            return plan::plan_for_simulation(self.desired, &self.observed, now);
        };
        let plan = self.plan_parts(&mut parts, now);
        self.parts = Some(parts);
        #[cfg(test)]
        if self.check_parts {
            let whole = plan::plan(self.desired, &self.observed, now);
            assert_eq!(plan.changes, whole.changes, "at {now}: the parts' plan differs from the whole plan");
        }
        plan
    }

    fn plan_parts(&mut self, parts: &mut Parts, now: Timestamp) -> Plan {
        let due: Vec<bool> = parts
            .dirty
            .iter()
            .zip(&parts.due)
            .map(|(dirty, due)| *dirty || due.is_some_and(|due| due <= now))
            .collect();
        if !due.contains(&true) {
            let mut blank = parts.blank.clone();
            blank.planned_at = now;
            return blank;
        }
        let Some(order) = self.place(parts) else {
            // Something the parts cannot place: plan the whole, and every part again next time.
            parts.dirty.fill(true);
            parts.whole_plans += 1;
            return plan::plan_for_simulation(self.desired, &self.observed, now);
        };
        // The tests check that lending moves exactly each part's share, in the world's order, and gives it all
        // back where it was.
        #[cfg(test)]
        let before = self.check_parts.then(|| (self.observed.clone(), self.shares(parts, &due)));
        #[cfg(test)]
        if self.check_parts {
            self.check_pools_of();
        }
        lend(&mut self.observed, parts, &order, &due, now);
        #[cfg(test)]
        if let Some((_, shares)) = &before {
            for (part, share) in shares.iter().enumerate() {
                if let Some(share) = share {
                    assert_eq!(&parts.views[part], share, "at {now}: part {part} was lent other items than its own");
                }
            }
        }
        let mut merged: Option<Plan> = None;
        let mut changes = Vec::new();
        let mut contributed = 0;
        for part in (0..due.len()).filter(|&part| due[part]) {
            let sub = plan::plan_for_simulation(&parts.desired[part], &parts.views[part], now);
            parts.plans += 1;
            if sub.changes.is_empty() {
                parts.dirty[part] = false;
                parts.due[part] =
                    threshold_after(self.desired, &self.rules, &parts.views[part], now, &mut self.schedule_cache);
            } else {
                // It stays dirty: its changes are applied (or held back, or fail) and it plans again.
                parts.dirty[part] = true;
                contributed += 1;
                changes.extend(sub.changes.iter().cloned());
            }
            if merged.is_none() {
                merged = Some(sub);
            }
        }
        give_back(&mut self.observed, parts, &order, &due);
        #[cfg(test)]
        if let Some((world, _)) = &before {
            assert!(&self.observed == world, "at {now}: the world's observation is not as it was before lending");
        }
        if contributed > 1 {
            // The planner's order: by pool (config order), then action, then target. Stable, as the planner's
            // sort is (it sorts by cached key and position).
            changes.sort_by_cached_key(|change| {
                let rank = parts.rank.get(&change.pool).copied().unwrap_or(usize::MAX);
                (rank, change.pool.clone(), crate::plan::action_rank(change.action), change.target_name().to_owned())
            });
        }
        let mut plan = merged.unwrap_or_else(|| parts.blank.clone());
        plan.changes = changes;
        plan
    }

    /// The pools kept beside the observation's lists are those of the instances and agents there (tests only).
    #[cfg(test)]
    fn check_pools_of(&self) {
        for (name, backend) in &self.observed.backends {
            let pools: Vec<Option<usize>> =
                backend.instances.iter().map(|instance| self.instances[&instance.id].pool).collect();
            assert_eq!(self.pools_of.instances.get(name).cloned().unwrap_or_default(), pools, "instances of `{name}`");
        }
        for (name, ci) in &self.observed.ci {
            let pools: Vec<Option<usize>> = ci.agents.iter().map(|agent| self.agents[&agent.id].pool).collect();
            assert_eq!(self.pools_of.agents.get(name).cloned().unwrap_or_default(), pools, "agents of `{name}`");
        }
    }

    /// What the view of each part about to plan must hold: copies of its instances, agents and jobs, picked from
    /// the world's observation in its order (as planning by parts once copied them; tests only, to check
    /// [`lend`]).
    #[cfg(test)]
    fn shares(&self, parts: &Parts, due: &[bool]) -> Vec<Option<Observed>> {
        let mut shares: Vec<Option<Observed>> = parts
            .views
            .iter()
            .zip(due)
            .map(|(view, due)| {
                due.then(|| {
                    let mut share = view.clone();
                    share.observed_at = self.now;
                    share
                })
            })
            .collect();
        fn share_of(shares: &mut [Option<Observed>], part: usize) -> Option<&mut Observed> {
            shares.get_mut(part).and_then(Option::as_mut)
        }
        for (name, backend) in &self.observed.backends {
            for instance in &backend.instances {
                let pool = self.instances[&instance.id].pool.expect("instances of configured pools");
                if let Some(view) =
                    share_of(&mut shares, parts.of_pool[pool]).and_then(|share| share.backends.get_mut(name))
                {
                    view.instances.push(instance.clone());
                }
            }
        }
        for (name, ci) in &self.observed.ci {
            for agent in &ci.agents {
                let pool = self.agents[&agent.id].pool.expect("agents of configured pools");
                if let Some(view) = share_of(&mut shares, parts.of_pool[pool]).and_then(|share| share.ci.get_mut(name))
                {
                    view.agents.push(agent.clone());
                }
            }
            let queue = &self.queues[name];
            for (task, &job) in ci.queue.pending.iter().zip(&queue.pending) {
                let part = parts.of_class[self.jobs[job].class];
                if let Some(view) =
                    part.and_then(|part| share_of(&mut shares, part)).and_then(|share| share.ci.get_mut(name))
                {
                    view.queue.pending.push(task.clone());
                }
            }
            for (task, &job) in ci.queue.running.iter().zip(&queue.running) {
                let pool = self.jobs[job].pool.expect("running jobs have a pool");
                if let Some(view) = share_of(&mut shares, parts.of_pool[pool]).and_then(|share| share.ci.get_mut(name))
                {
                    view.queue.running.push(task.clone());
                }
            }
        }
        shares
    }

    /// The part of every instance, agent and job of the world's observation, in its order (see [`Placed`]);
    /// `None` when one belongs to no configured pool.
    fn place(&self, parts: &Parts) -> Option<Placed> {
        let world = &self.observed;
        let same_keys = parts
            .views
            .iter()
            .all(|view| view.backends.keys().eq(world.backends.keys()) && view.ci.keys().eq(world.ci.keys()));
        if !same_keys {
            return None;
        }
        let mut placed = Placed::default();
        let no_pools = Vec::new();
        for (name, backend) in &self.observed.backends {
            let pools = self.pools_of.instances.get(name).unwrap_or(&no_pools);
            if pools.len() != backend.instances.len() {
                return None;
            }
            placed
                .instances
                .push(pools.iter().map(|pool| Some(parts.of_pool[(*pool)?])).collect::<Option<Vec<usize>>>()?);
        }
        for (name, ci) in &self.observed.ci {
            let pools = self.pools_of.agents.get(name).unwrap_or(&no_pools);
            if pools.len() != ci.agents.len() {
                return None;
            }
            placed.agents.push(pools.iter().map(|pool| Some(parts.of_pool[(*pool)?])).collect::<Option<Vec<usize>>>()?);
            let queue = self.queues.get(name);
            let pending = queue.map_or(&[][..], |queue| &queue.pending[..]);
            let running = queue.map_or(&[][..], |queue| &queue.running[..]);
            // `queues` runs parallel to the observed queue: the same jobs in the same order. A job no pool takes
            // counts for no pool's demand: no part needs it.
            if pending.len() != ci.queue.pending.len() || running.len() != ci.queue.running.len() {
                return None;
            }
            placed
                .pending
                .push(pending.iter().map(|&job| parts.of_class[self.jobs[job].class].unwrap_or(NO_PART)).collect());
            let of = running.iter().map(|&job| Some(parts.of_pool[self.jobs[job].pool?]));
            placed.running.push(of.collect::<Option<Vec<usize>>>()?);
        }
        Some(placed)
    }

    /// Something changed in the pool's part (`None`: in no known pool, so in every part).
    fn touch(&mut self, pool: Option<usize>) {
        if let Some(parts) = &mut self.parts {
            match pool.and_then(|pool| parts.of_pool.get(pool)) {
                Some(&part) => parts.dirty[part] = true,
                None => parts.dirty.fill(true),
            }
        }
    }

    /// A change is applied to its pool's part.
    fn touch_pool_named(&mut self, name: &PoolName) {
        let pool = self.parts.as_ref().and_then(|parts| parts.rank.get(name).copied());
        self.touch(pool);
    }

    // -----------------------------------------------------------------------------------------------------------
    // Observation and apply
    // -----------------------------------------------------------------------------------------------------------

    /// What the fake providers would report now: agents on booted instances are in contact.
    fn observe(&mut self) {
        let now = self.now;
        self.observed.observed_at = now;
        #[cfg(test)]
        {
            let serving = self.agents.iter().filter(|(_, side)| side.serving_on.is_some()).map(|(id, _)| id.clone());
            assert_eq!(self.serving, serving.collect(), "at {now}: the serving set is not the agents serving");
        }
        if self.serving.is_empty() {
            return;
        }
        for ci in self.observed.ci.values_mut() {
            for agent in &mut ci.agents {
                if self.serving.contains(&agent.id) {
                    agent.last_contact = Some(now);
                }
            }
        }
    }

    /// Carries out the plan's changes in order. Like `apply::apply`: at most [`ApplyOptions::concurrency`] at once,
    /// and a change on a target whose earlier change failed is skipped. Returns the outcomes and how long the
    /// apply took (only container creates and starts take time: they wait for the container).
    fn apply(&mut self, plan: &Plan) -> (Vec<(Change, Outcome)>, SignedDuration) {
        let concurrency = ApplyOptions::default().concurrency.max(1);
        let start = self.now;
        let mut slots = vec![start; concurrency];
        let mut blocked: BTreeSet<String> = BTreeSet::new();
        let mut outcomes = Vec::with_capacity(plan.changes.len());
        for change in &plan.changes {
            let keys = target_keys(change);
            if let Some(earlier) = keys.iter().find(|key| blocked.contains(*key)) {
                let why = format!("the earlier change of the same target ({earlier}) did not complete");
                outcomes.push((change.clone(), Outcome::Skipped { why }));
                continue;
            }
            let slot = (0..slots.len()).min_by_key(|&slot| slots[slot]).unwrap_or(0);
            let (outcome, took) = self.execute(change, slots[slot]);
            slots[slot] = slots[slot].saturating_add(took).unwrap_or(slots[slot]);
            if !outcome.is_done() {
                blocked.extend(keys);
            }
            outcomes.push((change.clone(), outcome));
        }
        let end = slots.into_iter().max().unwrap_or(start);
        (outcomes, end.duration_since(start))
    }

    fn execute(&mut self, change: &Change, at: Timestamp) -> (Outcome, SignedDuration) {
        self.touch_pool_named(&change.pool);
        let result = match change.action {
            Action::Create => self.create(change, at),
            Action::Start => self.start(change, at),
            Action::Stop => self.stop(change).map(|()| SignedDuration::ZERO),
            Action::Drain => self.set_drained(change, true).map(|()| SignedDuration::ZERO),
            Action::Delete => self.delete(change).map(|()| SignedDuration::ZERO),
            Action::Replace => self.delete(change).and_then(|()| self.create(change, at)),
            Action::Deregister => {
                if let Some(agent) = &change.agent {
                    self.deregister(&agent.ci, &agent.id);
                }
                Ok(SignedDuration::ZERO)
            }
        };
        match result {
            Ok(took) => (Outcome::Done, took),
            Err((step, error)) => (Outcome::Failed { step: step.to_owned(), error }, SignedDuration::ZERO),
        }
    }

    fn create(&mut self, change: &Change, at: Timestamp) -> Result<SignedDuration, (&'static str, String)> {
        let desired = self.desired;
        let Some((pool_index, pool)) = desired.pools.iter().enumerate().find(|(_, pool)| pool.name == change.pool)
        else {
            return Err(("resolve", format!("pool `{}` is not in the config", change.pool)));
        };
        let Some(target) = &change.instance else {
            return Err(("resolve", "a create change needs an instance".to_owned()));
        };
        let model = self.model(&target.backend)?.clone();
        // The agent record first, as apply registers before it creates.
        let agent_id = match (&pool.agent.preregistered, &change.agent) {
            (Some(_), Some(agent)) => agent.id.clone(),
            (Some(_), None) => {
                return Err((
                    "find pre-registered agent",
                    format!("the pre-registered agent of `{}` is missing", pool.name),
                ))
            }
            (None, _) => self.register(pool_index, &target.name),
        };
        let exists = self
            .observed
            .backends
            .get(&target.backend)
            .is_some_and(|backend| backend.instances.iter().any(|instance| instance.name == target.name));
        if exists {
            // Create-if-absent: apply takes over the owned instance of that name.
            return Ok(SignedDuration::ZERO);
        }
        let mut machine: BTreeMap<String, String> = change
            .after
            .iter()
            .filter_map(|(key, value)| key.strip_prefix("machine.").map(|key| (key.to_owned(), value.clone())))
            .collect();
        // Capacity: each machine type candidate in turn, as the providers fall back on capacity errors.
        let type_key = MACHINE_TYPE_KEYS.iter().find(|key| machine.contains_key(**key)).map(|key| (*key).to_owned());
        let candidates: Vec<String> = match type_key.as_ref().and_then(|key| machine.get(key)) {
            Some(types) => types.split(',').map(|t| t.trim().to_owned()).filter(|t| !t.is_empty()).collect(),
            None => vec![String::new()],
        };
        let chosen =
            candidates.iter().find(|_| model.capacity_errors <= 0.0 || self.rng.f64() >= model.capacity_errors);
        let Some(chosen) = chosen.cloned() else {
            if let Some(tally) = self.tallies.get_mut(pool_index) {
                tally.create_failures += 1;
            }
            if pool.agent.preregistered.is_none() {
                // As apply does for a create refused outright: no instance will come, so the record registered
                // for it goes, and the planner does not count it as a create in flight.
                self.deregister(&pool.ci.source, &agent_id);
            }
            return Err((
                "create instance",
                format!("backend `{}` has no capacity for {}", target.backend, candidates.join(", ")),
            ));
        };
        // The instance reports the candidates it got, as providers do (Hetzner names the server's type and
        // location): the machine type that had capacity, the first of every other list.
        for value in machine.values_mut() {
            if let Some((first, _)) = value.split_once(',') {
                *value = first.trim().to_owned();
            }
        }
        if let Some(key) = &type_key {
            machine.insert(key.clone(), chosen);
        }
        let mut labels: BTreeMap<String, String> = change
            .after
            .iter()
            .filter_map(|(key, value)| key.strip_prefix("label.").map(|key| (key.to_owned(), value.clone())))
            .collect();
        labels.entry(OWNER_LABEL.to_owned()).or_insert_with(|| desired.owner.clone());
        labels.entry(POOL_LABEL.to_owned()).or_insert_with(|| pool.name.to_string());
        // The link from the instance to its agent record, as apply writes it (every simulated id fits a label).
        labels.insert(AGENT_LABEL.to_owned(), agent_id.to_string());
        self.next_instance += 1;
        let id = InstanceId::new(format!("sim-{}", self.next_instance));
        let boot = model.boot_time.sample(&mut self.rng);
        let price = self.price_of(&target.backend, &machine);
        let instance = Instance {
            id: id.clone(),
            name: target.name.clone(),
            state: InstanceState::Pending,
            created_at: at,
            labels,
            attributes: machine,
        };
        if let Some(backend) = self.observed.backends.get_mut(&target.backend) {
            backend.instances.push(instance);
            self.pools_of.instances.entry(target.backend.clone()).or_default().push(Some(pool_index));
        }
        self.instances.insert(
            id.clone(),
            InstanceSide {
                backend: target.backend.clone(),
                pool: Some(pool_index),
                price,
                generation: 0,
                up_since: Some(at),
                billed_since: Some(at),
                agent: None,
            },
        );
        self.tallies[pool_index].creates += 1;
        self.push(at.saturating_add(boot).unwrap_or(Timestamp::MAX), Event::BootDone { instance: id, generation: 0 });
        if pool.agent.preregistered.is_some() {
            // Apply undrains the pre-registered agent once its new instance exists.
            self.set_agent_drained(&pool.ci.source, &agent_id, false);
        }
        Ok(if model.create_holds_cycle { boot } else { SignedDuration::ZERO })
    }

    /// Register (create-if-absent by name), as the fake CI does.
    fn register(&mut self, pool_index: usize, name: &str) -> AgentId {
        let pool = &self.desired.pools[pool_index];
        let ci = self.observed.ci.entry(pool.ci.source.clone()).or_default();
        if let Some(existing) = ci.agents.iter().find(|agent| agent.name == name) {
            return existing.id.clone();
        }
        self.next_agent += 1;
        let id = AgentId::new(format!("a{}", self.next_agent));
        self.pools_of.agents.entry(pool.ci.source.clone()).or_default().push(Some(pool_index));
        let mut labels = pool.ci.labels.clone();
        if pool.scale.ephemeral {
            labels.insert(EPHEMERAL_LABEL.to_owned(), "true".to_owned());
        }
        ci.agents.push(Agent {
            id: id.clone(),
            name: name.to_owned(),
            busy: false,
            no_schedule: false,
            last_contact: None,
            last_work: None,
            labels,
            // As the CIs say (Woodpecker `created`): the record is made when the create is applied.
            created_at: Some(self.now),
        });
        self.agents.insert(
            id.clone(),
            AgentSide {
                ci: pool.ci.source.clone(),
                pool: Some(pool_index),
                capacity: pool.scale.jobs_per_agent.max(1),
                running: 0,
                jobs_done: 0,
                ephemeral: pool.scale.ephemeral,
                serving_on: None,
                busy_since: None,
            },
        );
        id
    }

    fn start(&mut self, change: &Change, at: Timestamp) -> Result<SignedDuration, (&'static str, String)> {
        let Some(target) = &change.instance else {
            return Err(("resolve", "a start change needs an instance".to_owned()));
        };
        let Some(id) = &target.id else {
            return Err(("resolve", format!("the change names instance `{}` without an id", target.name)));
        };
        let model = self.model(&target.backend)?.clone();
        let Some(instance) = self.instance_mut(&target.backend, id) else {
            return Err(("start instance", format!("instance `{id}` not found")));
        };
        let mut took = SignedDuration::ZERO;
        if matches!(instance.state, InstanceState::Stopped | InstanceState::Stopping) {
            instance.state = InstanceState::Pending;
            if model.start_resets_created_at {
                instance.created_at = at;
            }
            let boot = model.boot_time.sample(&mut self.rng);
            let side = self.instances.get_mut(id).expect("every observed instance has a side entry");
            side.generation += 1;
            side.up_since = Some(at);
            if model.billing == Billing::PerSecond || side.billed_since.is_none() {
                side.billed_since = Some(at);
            }
            let generation = side.generation;
            self.push(
                at.saturating_add(boot).unwrap_or(Timestamp::MAX),
                Event::BootDone { instance: id.clone(), generation },
            );
            if model.create_holds_cycle {
                took = boot;
            }
        }
        if let Some(agent) = &change.agent {
            if !self.set_agent_drained(&agent.ci, &agent.id, false) {
                return Err(("undrain agent", format!("agent `{}` not found", agent.id)));
            }
        }
        Ok(took)
    }

    fn stop(&mut self, change: &Change) -> Result<(), (&'static str, String)> {
        let Some(target) = &change.instance else {
            return Err(("resolve", "a stop change needs an instance".to_owned()));
        };
        let Some(id) = &target.id else {
            return Err(("resolve", format!("the change names instance `{}` without an id", target.name)));
        };
        if self.instance_mut(&target.backend, id).is_none() {
            return Err(("stop instance", format!("instance `{id}` not found")));
        }
        self.power_off(id, false);
        Ok(())
    }

    fn set_drained(&mut self, change: &Change, drained: bool) -> Result<(), (&'static str, String)> {
        let Some(agent) = &change.agent else {
            return Err(("resolve", "a drain change needs an agent".to_owned()));
        };
        if self.set_agent_drained(&agent.ci, &agent.id, drained) {
            Ok(())
        } else {
            Err(("drain agent", format!("agent `{}` not found", agent.id)))
        }
    }

    /// `false` when the agent does not exist.
    fn set_agent_drained(&mut self, ci: &CiName, id: &AgentId, drained: bool) -> bool {
        let Some(agent) =
            self.observed.ci.get_mut(ci).and_then(|ci| ci.agents.iter_mut().find(|agent| &agent.id == id))
        else {
            return false;
        };
        agent.no_schedule = drained;
        if !drained {
            self.dispatch_agent(id);
        }
        true
    }

    fn delete(&mut self, change: &Change) -> Result<(), (&'static str, String)> {
        if let Some(target) = &change.instance {
            let Some(id) = &target.id else {
                return Err(("resolve", format!("the change names instance `{}` without an id", target.name)));
            };
            let owned = self
                .observed
                .backends
                .get(&target.backend)
                .and_then(|backend| backend.instances.iter().find(|instance| &instance.id == id))
                .map(|instance| instance.owner() == Some(self.desired.owner.as_str()));
            match owned {
                Some(false) => return Err(("check owner", format!("refusing to delete instance `{id}`: not ours"))),
                Some(true) => self.remove_instance(id),
                None => {} // already gone: done
            }
        }
        if let Some(agent) = &change.agent {
            let preregistered = self.desired.pools.iter().any(|pool| match &pool.agent.preregistered {
                Some(AgentRef::Id(id)) => pool.ci.source == agent.ci && *id == agent.id,
                Some(AgentRef::Name(name)) => pool.ci.source == agent.ci && *name == agent.name,
                None => false,
            });
            if !preregistered {
                self.deregister(&agent.ci, &agent.id);
            }
        }
        Ok(())
    }

    fn deregister(&mut self, ci: &CiName, id: &AgentId) {
        self.requeue_jobs_of(id);
        if let Some(observation) = self.observed.ci.get_mut(ci) {
            if let Some(position) = observation.agents.iter().position(|agent| &agent.id == id) {
                observation.agents.remove(position);
                if let Some(pools) = self.pools_of.agents.get_mut(ci) {
                    pools.remove(position);
                }
            }
        }
        self.serving.remove(id);
        if let Some(side) = self.agents.remove(id) {
            if let Some(instance) = side.serving_on.and_then(|instance| self.instances.get_mut(&instance)) {
                instance.agent = None;
            }
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Instances
    // -----------------------------------------------------------------------------------------------------------

    fn model(&self, backend: &BackendName) -> Result<&BackendModel, (&'static str, String)> {
        self.settings.models.get(backend).ok_or_else(|| ("resolve", format!("backend `{backend}` is not configured")))
    }

    fn price_of(&self, backend: &BackendName, machine: &BTreeMap<String, String>) -> Option<Price> {
        self.settings.models.get(backend)?.price_of(machine_type(machine)).cloned()
    }

    fn instance_mut(&mut self, backend: &BackendName, id: &InstanceId) -> Option<&mut Instance> {
        self.observed.backends.get_mut(backend)?.instances.iter_mut().find(|instance| &instance.id == id)
    }

    fn boot_done(&mut self, id: &InstanceId, generation: u64) {
        let Some(side) = self.instances.get(id) else {
            return;
        };
        if side.generation != generation {
            return;
        }
        let backend = side.backend.clone();
        let Some(instance) = self.instance_mut(&backend, id) else {
            return;
        };
        if instance.state != InstanceState::Pending {
            return;
        }
        instance.state = InstanceState::Running;
        let name = instance.name.clone();
        let pool = self.instances.get(id).and_then(|side| side.pool);
        self.touch(pool);
        // The agent on it: an adopted instance's or a pre-registered one by reference, else the one named like it.
        let reference = pool.and_then(|pool_index| {
            let pool = &self.desired.pools[pool_index];
            let adopted = match &pool.backend.mode {
                InstanceMode::StartStop { instances } => instances
                    .iter()
                    .find(|adopted| &adopted.id == id)
                    .map(|adopted| adopted.agent.clone().unwrap_or_else(|| AgentRef::Name(adopted.id.to_string()))),
                InstanceMode::Create => None,
            };
            adopted.or_else(|| pool.agent.preregistered.clone())
        });
        let agent_id = self.observed.ci.values().flat_map(|ci| ci.agents.iter()).find_map(|agent| {
            let found = match &reference {
                Some(AgentRef::Id(wanted)) => &agent.id == wanted,
                Some(AgentRef::Name(wanted)) => &agent.name == wanted,
                None => agent.name == name,
            };
            found.then(|| agent.id.clone())
        });
        let Some(agent_id) = agent_id else {
            return; // its record is gone: nothing checks in, the bootstrap timeout will replace it
        };
        let now = self.now;
        if let Some(agent) = self.agents.get_mut(&agent_id) {
            agent.serving_on = Some(id.clone());
            self.serving.insert(agent_id.clone());
        }
        if let Some(side) = self.instances.get_mut(id) {
            side.agent = Some(agent_id.clone());
        }
        if let Some(agent) =
            self.observed.ci.values_mut().flat_map(|ci| ci.agents.iter_mut()).find(|a| a.id == agent_id)
        {
            agent.last_contact = Some(now);
        }
        self.dispatch_agent(&agent_id);
        self.series_changed();
    }

    /// Stops an instance (apply's stop, or an ephemeral agent powering it off).
    fn power_off(&mut self, id: &InstanceId, by_itself: bool) {
        let Some(side) = self.instances.get(id) else {
            return;
        };
        let backend = side.backend.clone();
        let model = self.settings.models.get(&backend).cloned();
        if by_itself && model.as_ref().is_some_and(|model| model.ephemeral_deletes_itself) {
            self.remove_instance(id);
            return;
        }
        let now = self.now;
        if let Some(instance) = self.instance_mut(&backend, id) {
            instance.state = InstanceState::Stopped;
        }
        self.disconnect_agent(id);
        let per_second = model.as_ref().is_none_or(|model| model.billing == Billing::PerSecond);
        let side = self.instances.get_mut(id).expect("checked above");
        side.generation += 1;
        let (pool, price, up_since) = (side.pool, side.price.clone(), side.up_since.take());
        let billed = if per_second { side.billed_since.take() } else { None };
        let tally = tally_of(&mut self.tallies, &mut self.stray, pool);
        if let Some(since) = up_since {
            tally.agent_hours += hours(since, now);
        }
        if let Some(since) = billed {
            charge_per_second(tally, price.as_ref(), since, now);
        }
        if model.is_some_and(|model| model.events_wake_loop) {
            self.wake();
        }
    }

    fn remove_instance(&mut self, id: &InstanceId) {
        let Some(side) = self.instances.get(id) else {
            return;
        };
        let backend = side.backend.clone();
        self.disconnect_agent(id);
        if let Some(observed) = self.observed.backends.get_mut(&backend) {
            if let Some(position) = observed.instances.iter().position(|instance| &instance.id == id) {
                observed.instances.remove(position);
                if let Some(pools) = self.pools_of.instances.get_mut(&backend) {
                    pools.remove(position);
                }
            }
        }
        let Some(side) = self.instances.remove(id) else {
            return;
        };
        let model = self.settings.models.get(&backend);
        let now = self.now;
        let tally = tally_of(&mut self.tallies, &mut self.stray, side.pool);
        tally.deletes += 1;
        close_instance(tally, &side, model.map_or(Billing::PerSecond, |model| model.billing), now);
        if model.is_some_and(|model| model.events_wake_loop) {
            self.wake();
        }
        self.series_changed();
    }

    /// The agent of an instance that stops or goes: out of contact, its running jobs back in the queue.
    fn disconnect_agent(&mut self, id: &InstanceId) {
        let Some(agent) = self.instances.get_mut(id).and_then(|side| side.agent.take()) else {
            return;
        };
        self.requeue_jobs_of(&agent);
        if let Some(side) = self.agents.get_mut(&agent) {
            side.serving_on = None;
        }
        self.serving.remove(&agent);
        self.series_changed();
    }

    /// An Incus event: wake the loop now, or right after the cycle in progress.
    fn wake(&mut self) {
        if self.applying || self.failures > 0 {
            self.wake_permit = true;
        } else if self.now < self.busy_until {
            self.next_cycle = self.next_cycle.min(self.busy_until);
        } else {
            self.next_cycle = self.next_cycle.min(self.now);
        }
    }

    fn close_meters(&mut self) {
        let now = self.now;
        let ids: Vec<InstanceId> = self.instances.keys().cloned().collect();
        for id in ids {
            if let Some(side) = self.instances.get(&id) {
                let billing = self.settings.models.get(&side.backend).map_or(Billing::PerSecond, |model| model.billing);
                let tally = tally_of(&mut self.tallies, &mut self.stray, side.pool);
                close_instance(tally, side, billing, now);
            }
        }
        for side in self.agents.values() {
            if let Some(since) = side.busy_since {
                tally_of(&mut self.tallies, &mut self.stray, side.pool).busy_hours += hours(since, now);
            }
        }
        for (index, job) in self.jobs.iter().enumerate() {
            if let (Some(started), Some(pool)) = (job.started, job.pool) {
                let wait = started.duration_since(self.trace.jobs[index].at).as_secs_f64().max(0.0);
                self.tallies[pool].waits.push(wait);
            }
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // The CI: queue and dispatch
    // -----------------------------------------------------------------------------------------------------------

    fn arrive(&mut self, index: usize) {
        let Some(ci) = self.jobs[index].ci.clone() else {
            return; // a source the config does not have: nobody will ever see it
        };
        // A job no pool takes changes no part's plan (and no agent takes it).
        if let Some(parts) = &mut self.parts {
            if let Some(part) = parts.of_class[self.jobs[index].class] {
                parts.dirty[part] = true;
            }
        }
        let job = &self.trace.jobs[index];
        let task = Task {
            id: TaskId::new(format!("j{index}")),
            labels: job.labels.clone(),
            demands: job.demands.clone(),
            agent_id: None,
        };
        if let Some(observation) = self.observed.ci.get_mut(&ci) {
            observation.queue.pending.push(task);
        }
        self.queues.entry(ci.clone()).or_default().pending.push(index);
        // The first agent that can take it does (agents long-poll the CI).
        let class = self.jobs[index].class;
        let takes = &self.classes[class];
        let pools = self.pools_of.agents.get(&ci);
        let taker = self.observed.ci.get(&ci).and_then(|observation| {
            // An agent's pool first (from the list beside the agents, no lookup by id): most are of other pools.
            let mut agents = observation.agents.iter().enumerate();
            agents
                .find(|(position, agent)| {
                    let pool = pools.and_then(|pools| pools.get(*position).copied().flatten());
                    pool.is_none_or(|pool| takes.get(pool).copied().unwrap_or(false))
                        && self.can_take(agent)
                        && self.eligible(class, &agent.id)
                })
                .map(|(_, agent)| agent.id.clone())
        });
        if let Some(agent) = taker {
            let position = self.queues[&ci].pending.len() - 1;
            self.start_job(&ci, position, &agent);
        }
        self.series_changed();
    }

    fn can_take(&self, agent: &Agent) -> bool {
        let Some(side) = self.agents.get(&agent.id) else {
            return false;
        };
        side.serving_on.is_some()
            && !agent.no_schedule
            && side.running < side.capacity
            && !(side.ephemeral && side.jobs_done + side.running > 0)
    }

    fn eligible(&self, class: usize, agent: &AgentId) -> bool {
        let pool = self.agents.get(agent).and_then(|side| side.pool);
        pool.is_some_and(|pool| self.classes[class].get(pool).copied().unwrap_or(false))
    }

    /// An agent with room takes the oldest queued jobs it can, one after the other.
    fn dispatch_agent(&mut self, id: &AgentId) {
        let Some(ci) = self.agents.get(id).map(|side| side.ci.clone()) else {
            return;
        };
        loop {
            let ready = self
                .observed
                .ci
                .get(&ci)
                .and_then(|observation| observation.agents.iter().find(|agent| &agent.id == id))
                .is_some_and(|agent| self.can_take(agent));
            if !ready {
                return;
            }
            let pool = self.agents.get(id).and_then(|side| side.pool);
            let takes = |class: usize| pool.is_some_and(|pool| self.classes[class].get(pool).copied().unwrap_or(false));
            let position = self
                .queues
                .get(&ci)
                .and_then(|queue| queue.pending.iter().position(|&job| takes(self.jobs[job].class)));
            let Some(position) = position else {
                return;
            };
            self.start_job(&ci, position, id);
        }
    }

    fn start_job(&mut self, ci: &CiName, position: usize, agent_id: &AgentId) {
        let now = self.now;
        let Some(queue) = self.queues.get_mut(ci) else {
            return;
        };
        let index = queue.pending.remove(position);
        queue.running.push(index);
        if let Some(observation) = self.observed.ci.get_mut(ci) {
            let mut task = observation.queue.pending.remove(position);
            task.agent_id = Some(agent_id.clone());
            observation.queue.running.push(task);
            if let Some(agent) = observation.agents.iter_mut().find(|agent| &agent.id == agent_id) {
                agent.busy = true;
                agent.last_work = Some(now);
            }
        }
        let pool = if let Some(side) = self.agents.get_mut(agent_id) {
            side.running += 1;
            if side.busy_since.is_none() {
                side.busy_since = Some(now);
            }
            side.pool
        } else {
            None
        };
        let job = &mut self.jobs[index];
        job.started = Some(now);
        job.pool = pool;
        job.agent = Some(agent_id.clone());
        job.token += 1;
        let token = job.token;
        let ends = now.saturating_add(self.trace.jobs[index].duration).unwrap_or(Timestamp::MAX);
        self.push(ends, Event::Finish { job: index, token });
    }

    fn finish(&mut self, index: usize, token: u64) {
        let job = &self.jobs[index];
        if job.token != token || job.finished || job.started.is_none() {
            return; // an interrupted run; the job runs (or waits) again
        }
        let (Some(ci), Some(agent_id)) = (job.ci.clone(), job.agent.clone()) else {
            return;
        };
        let pool = job.pool;
        self.touch(pool);
        let now = self.now;
        self.jobs[index].finished = true;
        self.open_jobs = self.open_jobs.saturating_sub(1);
        self.last_finish = Some(now);
        self.take_off_agent(&ci, index, &agent_id);
        let Some(side) = self.agents.get_mut(&agent_id) else {
            return;
        };
        side.jobs_done += 1;
        if side.ephemeral {
            // The agent's wrapper powers the instance off after its one job.
            if let Some(instance) = side.serving_on.clone() {
                self.power_off(&instance, true);
            }
        } else {
            self.dispatch_agent(&agent_id);
        }
        self.series_changed();
    }

    /// Takes a running job off its agent (finished or interrupted): the agent's busy time and `last_work`.
    fn take_off_agent(&mut self, ci: &CiName, index: usize, agent_id: &AgentId) {
        let now = self.now;
        if let Some(queue) = self.queues.get_mut(ci) {
            if let Some(position) = queue.running.iter().position(|&job| job == index) {
                queue.running.remove(position);
                if let Some(observation) = self.observed.ci.get_mut(ci) {
                    observation.queue.running.remove(position);
                }
            }
        }
        let mut idle = false;
        if let Some(side) = self.agents.get_mut(agent_id) {
            side.running = side.running.saturating_sub(1);
            let pool = side.pool;
            if side.running == 0 {
                idle = true;
                if let Some(since) = side.busy_since.take() {
                    tally_of(&mut self.tallies, &mut self.stray, pool).busy_hours += hours(since, now);
                }
            }
        }
        if let Some(agent) = self.observed.ci.get_mut(ci).and_then(|o| o.agents.iter_mut().find(|a| &a.id == agent_id))
        {
            agent.last_work = Some(now);
            if idle {
                agent.busy = false;
            }
        }
    }

    /// The agent went away while running jobs: the CI queues them again, in arrival order.
    fn requeue_jobs_of(&mut self, agent_id: &AgentId) {
        let Some(ci) = self.agents.get(agent_id).map(|side| side.ci.clone()) else {
            return;
        };
        let running: Vec<usize> = self
            .queues
            .get(&ci)
            .map(|queue| {
                queue.running.iter().copied().filter(|&job| self.jobs[job].agent.as_ref() == Some(agent_id)).collect()
            })
            .unwrap_or_default();
        for index in running {
            self.take_off_agent(&ci, index, agent_id);
            self.interrupted += 1;
            let job = &mut self.jobs[index];
            job.started = None;
            job.pool = None;
            job.agent = None;
            job.token += 1;
            let Some(queue) = self.queues.get_mut(&ci) else {
                continue;
            };
            let position = queue.pending.partition_point(|&queued| queued < index);
            queue.pending.insert(position, index);
            let job = &self.trace.jobs[index];
            let task = Task {
                id: TaskId::new(format!("j{index}")),
                labels: job.labels.clone(),
                demands: job.demands.clone(),
                agent_id: None,
            };
            if let Some(observation) = self.observed.ci.get_mut(&ci) {
                observation.queue.pending.insert(position, task);
            }
        }
    }

    // -----------------------------------------------------------------------------------------------------------
    // Series and report
    // -----------------------------------------------------------------------------------------------------------

    fn series_changed(&mut self) {
        if self.series.is_none() {
            return;
        }
        let queued: usize = self.queues.values().map(|queue| queue.pending.len()).sum();
        let serving = self.agents.values().filter(|side| side.serving_on.is_some()).count();
        if let Some(series) = &mut self.series {
            series.peak_queue = series.peak_queue.max(queued as u64);
            series.peak_serving = series.peak_serving.max(serving as u64);
        }
    }

    fn sample(&mut self) {
        let now = self.now;
        let cost = self.cost_so_far(now);
        let queued: usize = self.queues.values().map(|queue| queue.pending.len()).sum();
        let serving = self.agents.values().filter(|side| side.serving_on.is_some()).count();
        let Some(series) = &mut self.series else {
            return;
        };
        series.record(now, cost, queued as u64, serving as u64);
        let next = now.saturating_add(series.step).unwrap_or(Timestamp::MAX);
        if next <= self.settings.until {
            self.push(next, Event::Sample);
        }
    }

    /// Cost accrued by `now` per currency, open meters included.
    fn cost_so_far(&self, now: Timestamp) -> BTreeMap<String, f64> {
        let mut cost: BTreeMap<String, f64> = BTreeMap::new();
        for tally in self.tallies.iter().chain(std::iter::once(&self.stray)) {
            for (currency, amount) in &tally.cost {
                *cost.entry(currency.clone()).or_default() += amount;
            }
        }
        for side in self.instances.values() {
            let (Some(price), Some(since)) = (&side.price, side.billed_since) else {
                continue;
            };
            let billing = self.settings.models.get(&side.backend).map_or(Billing::PerSecond, |model| model.billing);
            *cost.entry(price.currency.clone()).or_default() += billed_amount(billing, price, since, now);
        }
        cost
    }

    fn report(mut self) -> RunReport {
        let unfinished = self.open_jobs;
        let series = self.series.take().map(SeriesRecorder::finish);
        let price_notes = self
            .settings
            .models
            .iter()
            .filter(|(name, _)| self.desired.pools.iter().any(|pool| &pool.backend.backend == *name))
            .map(|(name, model)| {
                let source = match model.price_source {
                    PriceSource::Given => "prices from the config and flags".to_owned(),
                    PriceSource::Bundled => format!("bundled price list of {BUNDLED_PRICES_DATE} (approximate)"),
                    PriceSource::None => "no prices".to_owned(),
                };
                format!(
                    "backend `{name}` ({}): boot {}, billed {}, {source}{}",
                    model.kind,
                    model.boot_time,
                    match model.billing {
                        Billing::Hourly => "hourly",
                        Billing::PerSecond => "per second (60 s minimum)",
                    },
                    if model.capacity_errors > 0.0 {
                        format!(", {:.1} % of create attempts find no capacity", model.capacity_errors * 100.0)
                    } else {
                        String::new()
                    }
                )
            })
            .collect();
        RunReport {
            name: self.settings.name.clone(),
            pools: self
                .desired
                .pools
                .iter()
                .zip(std::mem::take(&mut self.tallies))
                .map(|(pool, tally)| (pool.name.to_string(), tally))
                .collect(),
            from: self.settings.from,
            until: self.now,
            unmatched_jobs: self.unmatched,
            unfinished_jobs: unfinished,
            interrupted_jobs: self.interrupted,
            cycles: self.cycles,
            plans: self.parts.as_ref().map_or(self.cycles, |parts| parts.plans + parts.whole_plans),
            price_notes,
            series,
        }
    }
}

/// The keys `apply` groups changes by: the instance (backend + name) and the agent (CI + id).
fn target_keys(change: &Change) -> Vec<String> {
    let mut keys = Vec::new();
    if let Some(instance) = &change.instance {
        keys.push(format!("instance {}/{}", instance.backend, instance.name));
    }
    if let Some(agent) = &change.agent {
        keys.push(format!("agent {}/{}", agent.ci, agent.id));
    }
    keys
}

fn tally_of<'t>(tallies: &'t mut [Tally], stray: &'t mut Tally, pool: Option<usize>) -> &'t mut Tally {
    match pool.and_then(|pool| tallies.get_mut(pool)) {
        Some(tally) => tally,
        None => stray,
    }
}

fn hours(from: Timestamp, to: Timestamp) -> f64 {
    to.duration_since(from).as_secs_f64().max(0.0) / 3600.0
}

/// What a stretch of billing costs: hourly bills every started hour since creation; per second bills the seconds,
/// at least 60.
fn billed_amount(billing: Billing, price: &Price, since: Timestamp, until: Timestamp) -> f64 {
    let seconds = until.duration_since(since).as_secs_f64().max(0.0);
    match billing {
        Billing::Hourly => (seconds / 3600.0).ceil().max(1.0) * price.hourly,
        Billing::PerSecond => seconds.max(60.0) * price.hourly / 3600.0,
    }
}

fn charge_per_second(tally: &mut Tally, price: Option<&Price>, since: Timestamp, until: Timestamp) {
    match price {
        Some(price) => {
            *tally.cost.entry(price.currency.clone()).or_default() +=
                billed_amount(Billing::PerSecond, price, since, until)
        }
        None => tally.unpriced_hours += hours(since, until),
    }
}

/// The instance's last hours and cost: it is deleted, or the run ends.
fn close_instance(tally: &mut Tally, side: &InstanceSide, billing: Billing, now: Timestamp) {
    if let Some(since) = side.up_since {
        tally.agent_hours += hours(since, now);
    }
    if let Some(since) = side.billed_since {
        match &side.price {
            Some(price) => {
                *tally.cost.entry(price.currency.clone()).or_default() += billed_amount(billing, price, since, now)
            }
            None => tally.unpriced_hours += hours(since, now),
        }
    }
}

/// The pool of each instance and agent of the world's observation (`None`: of no configured pool), per backend and
/// CI source in the observation's order: kept beside its lists as items come and go.
#[derive(Default)]
struct PoolsOf {
    instances: BTreeMap<BackendName, Vec<Option<usize>>>,
    agents: BTreeMap<CiName, Vec<Option<usize>>>,
}

/// Where each item of the world's observation goes while the parts plan: per backend its instances' parts, per
/// CI source its agents', pending jobs' and running jobs' parts ([`NO_PART`]: none), in the world's order.
#[derive(Default)]
struct Placed {
    instances: Vec<Vec<usize>>,
    agents: Vec<Vec<usize>>,
    pending: Vec<Vec<usize>>,
    running: Vec<Vec<usize>>,
}

/// The part of a pending job no pool takes.
const NO_PART: usize = usize::MAX;

/// Moves the items of the parts about to plan from the world's observation into their views (moved, not copied:
/// copying them cost more than planning), keeping their order. The rest stays. [`give_back`] undoes it.
fn lend(world: &mut Observed, parts: &mut Parts, placed: &Placed, due: &[bool], now: Timestamp) {
    for view in &mut parts.views {
        view.observed_at = now;
    }
    // Each lent part's list for this backend or source, found once (not per item).
    let lent = |part: usize| due.get(part).copied().unwrap_or(false);
    for ((name, backend), of) in world.backends.iter_mut().zip(&placed.instances) {
        let mut to: Vec<Option<&mut Vec<Instance>>> = (parts.views.iter_mut().enumerate())
            .map(|(part, view)| lent(part).then(|| view.backends.get_mut(name).map(|b| &mut b.instances)).flatten())
            .collect();
        let all = std::mem::replace(&mut backend.instances, Vec::with_capacity(of.len()));
        for (instance, &part) in all.into_iter().zip(of) {
            match to.get_mut(part).and_then(Option::as_mut) {
                Some(view) => view.push(instance),
                None => backend.instances.push(instance),
            }
        }
    }
    let ci_of = placed.agents.iter().zip(&placed.pending).zip(&placed.running);
    for ((name, ci), ((agents, pending), running)) in world.ci.iter_mut().zip(ci_of) {
        let mut to: Vec<Option<(&mut Vec<Agent>, &mut Vec<Task>, &mut Vec<Task>)>> =
            (parts.views.iter_mut().enumerate())
                .map(|(part, view)| {
                    let ci = lent(part).then(|| view.ci.get_mut(name)).flatten()?;
                    Some((&mut ci.agents, &mut ci.queue.pending, &mut ci.queue.running))
                })
                .collect();
        let all = std::mem::replace(&mut ci.agents, Vec::with_capacity(agents.len()));
        for (agent, &part) in all.into_iter().zip(agents) {
            match to.get_mut(part).and_then(Option::as_mut) {
                Some(view) => view.0.push(agent),
                None => ci.agents.push(agent),
            }
        }
        // `NO_PART` is out of range: a job no pool takes stays.
        let all = std::mem::replace(&mut ci.queue.pending, Vec::with_capacity(pending.len()));
        for (task, &part) in all.into_iter().zip(pending) {
            match to.get_mut(part).and_then(Option::as_mut) {
                Some(view) => view.1.push(task),
                None => ci.queue.pending.push(task),
            }
        }
        let all = std::mem::replace(&mut ci.queue.running, Vec::with_capacity(running.len()));
        for (task, &part) in all.into_iter().zip(running) {
            match to.get_mut(part).and_then(Option::as_mut) {
                Some(view) => view.2.push(task),
                None => ci.queue.running.push(task),
            }
        }
    }
}

/// Puts what [`lend`] moved back into the world's observation, each item where it was. The views' lists are
/// drained, not dropped: they keep their room for the next loan.
fn give_back(world: &mut Observed, parts: &mut Parts, placed: &Placed, due: &[bool]) {
    /// Rebuilds `stayed` in the world's order: each item from its part's view when that part was lent, else from
    /// those that stayed.
    fn merge<T>(stayed: &mut Vec<T>, mut lent: Vec<Option<std::vec::Drain<'_, T>>>, order: &[usize], due: &[bool]) {
        let mut rest = std::mem::replace(stayed, Vec::with_capacity(order.len())).into_iter();
        for &part in order {
            let item =
                if part != NO_PART && due[part] { lent[part].as_mut().and_then(Iterator::next) } else { rest.next() };
            stayed.extend(item);
        }
    }
    for ((name, backend), order) in world.backends.iter_mut().zip(&placed.instances) {
        let lent =
            parts.views.iter_mut().map(|view| view.backends.get_mut(name).map(|b| b.instances.drain(..))).collect();
        merge(&mut backend.instances, lent, order, due);
    }
    let ci_of = placed.agents.iter().zip(&placed.pending).zip(&placed.running);
    for ((name, ci), ((agents, pending), running)) in world.ci.iter_mut().zip(ci_of) {
        let lent = parts.views.iter_mut().map(|view| view.ci.get_mut(name).map(|c| c.agents.drain(..))).collect();
        merge(&mut ci.agents, lent, agents, due);
        let lent =
            parts.views.iter_mut().map(|view| view.ci.get_mut(name).map(|c| c.queue.pending.drain(..))).collect();
        merge(&mut ci.queue.pending, lent, pending, due);
        let lent =
            parts.views.iter_mut().map(|view| view.ci.get_mut(name).map(|c| c.queue.running.drain(..))).collect();
        merge(&mut ci.queue.running, lent, running, due);
    }
}

impl Parts {
    /// The parts of the config, or `None` when it cannot be planned by parts (one part, or something the planner
    /// relates across pools: adopted instances, pre-registered agents, job-bound CI sources).
    fn new(desired: &Desired, classes: &[Vec<bool>], observed: &Observed) -> Option<Self> {
        let pools = desired.pools.len();
        let plain = desired
            .pools
            .iter()
            .all(|pool| matches!(pool.backend.mode, InstanceMode::Create) && pool.agent.preregistered.is_none())
            && desired.ci.values().all(|spec| !crate::providers::ci_capabilities(&spec.kind).job_bound);
        if pools < 2 || !plain {
            return None;
        }
        // Pools that could take the same job share a part (demand counts a job for the first pool that matches).
        let mut root: Vec<usize> = (0..pools).collect();
        fn find(root: &mut [usize], mut pool: usize) -> usize {
            while root[pool] != pool {
                root[pool] = root[root[pool]];
                pool = root[pool];
            }
            pool
        }
        for class in classes {
            let mut takers = class.iter().enumerate().filter(|(_, takes)| **takes).map(|(pool, _)| pool);
            if let Some(first) = takers.next() {
                for other in takers {
                    let (a, b) = (find(&mut root, first), find(&mut root, other));
                    root[a.max(b)] = a.min(b);
                }
            }
        }
        let mut number: HashMap<usize, usize> = HashMap::new();
        let of_pool: Vec<usize> = (0..pools)
            .map(|pool| {
                let top = find(&mut root, pool);
                let next = number.len();
                *number.entry(top).or_insert(next)
            })
            .collect();
        let count = number.len();
        if count < 2 {
            return None;
        }
        let of_class =
            classes.iter().map(|class| class.iter().position(|takes| *takes).map(|pool| of_pool[pool])).collect();
        let desired_parts: Vec<Desired> = (0..count)
            .map(|part| Desired {
                pools: desired
                    .pools
                    .iter()
                    .zip(&of_pool)
                    .filter(|(_, of)| **of == part)
                    .map(|(pool, _)| pool.clone())
                    .collect(),
                ..desired.clone()
            })
            .collect();
        let empty = Observed {
            observed_at: observed.observed_at,
            backends: observed
                .backends
                .iter()
                .map(|(name, backend)| {
                    let view = BackendObservation {
                        instances: Vec::new(),
                        prices: backend.prices.clone(),
                        missing_images: backend.missing_images.clone(),
                    };
                    (name.clone(), view)
                })
                .collect(),
            ci: observed.ci.keys().map(|name| (name.clone(), CiObservation::default())).collect(),
            in_flight: Vec::new(),
        };
        let mut blank = plan::plan_for_simulation(desired, &empty, observed.observed_at);
        blank.changes.clear();
        Some(Self {
            of_pool,
            of_class,
            rank: desired.pools.iter().enumerate().map(|(index, pool)| (pool.name.clone(), index)).collect(),
            desired: desired_parts,
            views: vec![empty; count],
            dirty: vec![true; count],
            due: vec![None; count],
            blank,
            plans: 0,
            whole_plans: 0,
        })
    }
}

/// The durations the planner's time-based rules count from an instance's creation or an agent's work or
/// registration (idle and bootstrap timeouts), and the billing margins, of every pool (worked out once).
struct Rules {
    durations: Vec<SignedDuration>,
    margins: Vec<SignedDuration>,
}

impl Rules {
    fn new(desired: &Desired) -> Self {
        let durations: BTreeSet<SignedDuration> = desired
            .pools
            .iter()
            .flat_map(|pool| [pool.scale.idle_timeout.signed(), pool.scale.bootstrap_timeout.signed()])
            .collect();
        let margins: BTreeSet<SignedDuration> =
            desired.pools.iter().filter_map(|pool| pool.scale.billing_margin.map(|m| m.signed())).collect();
        Self { durations: durations.into_iter().collect(), margins: margins.into_iter().collect() }
    }
}

/// The earliest moment after `now` at which a time-based rule of the planner could decide differently with the
/// same observation. Conservative: every such moment is included, some never matter (the durations and schedules
/// of every pool count, also for a part's observation).
fn threshold_after(
    desired: &Desired,
    rules: &Rules,
    observed: &Observed,
    now: Timestamp,
    schedule_cache: &mut HashMap<(usize, usize), (Timestamp, Option<Timestamp>)>,
) -> Option<Timestamp> {
    let mut best: Option<Timestamp> = None;
    let mut consider = |at: Option<Timestamp>| {
        // Rules compare with `>` as well as `>=`: the moment itself and the instant after both count, and the
        // first of the two after `now` is the one that matters.
        let candidate = match at {
            Some(at) if at > now => Some(at),
            Some(at) if at == now => at.checked_add(SignedDuration::from_nanos(1)).ok(),
            _ => None,
        };
        if let Some(candidate) = candidate {
            if best.is_none_or(|best| candidate < best) {
                best = Some(candidate);
            }
        }
    };
    let (durations, margins) = (&rules.durations, &rules.margins);
    // Only moments at or after `now` count: the sum is worked out only for those (most lie in the past).
    let since: Vec<Option<Timestamp>> = durations.iter().map(|duration| now.checked_sub(*duration).ok()).collect();
    let plus = |at: Timestamp, by: SignedDuration| at.checked_add(by).ok();
    let after = |at: Timestamp, consider: &mut dyn FnMut(Option<Timestamp>)| {
        for (duration, since) in durations.iter().zip(&since) {
            if since.is_none_or(|since| at >= since) {
                consider(plus(at, *duration));
            }
        }
    };
    for (backend_name, backend) in &observed.backends {
        let hourly = desired.backends.get(backend_name).is_some_and(|spec| spec.billing == Billing::Hourly);
        for instance in &backend.instances {
            after(instance.created_at, &mut consider);
            if hourly {
                // The paid hour restarts every 3600 s from creation; the keep rule opens `margin` before each.
                let elapsed = now.duration_since(instance.created_at).as_secs().max(0);
                let next_hour =
                    instance.created_at.checked_add(SignedDuration::from_secs((elapsed / 3600 + 1) * 3600)).ok();
                consider(next_hour);
                for margin in margins {
                    consider(next_hour.and_then(|hour| hour.checked_sub(*margin).ok()));
                    consider(
                        next_hour
                            .and_then(|hour| plus(hour, SignedDuration::from_secs(3600))?.checked_sub(*margin).ok()),
                    );
                }
            }
        }
    }
    for ci in observed.ci.values() {
        for agent in &ci.agents {
            // `last_work` starts idle times; the record's age (registered, else last in contact) decides
            // whether a record without an instance still counts as a create in flight.
            for at in [agent.last_work, agent.created_at.or(agent.last_contact)].into_iter().flatten() {
                after(at, &mut consider);
            }
        }
    }
    for (pool_index, pool) in desired.pools.iter().enumerate() {
        for (window_index, window) in pool.scale.schedule.iter().enumerate() {
            let cached = schedule_cache.get(&(pool_index, window_index)).copied();
            let flip = match cached {
                Some((from, flip)) if from <= now && flip.is_none_or(|flip| now < flip) => flip,
                _ => {
                    let flip = next_flip(window, now);
                    schedule_cache.insert((pool_index, window_index), (now, flip));
                    flip
                }
            };
            consider(flip);
        }
    }
    best
}

/// Runs `body` with logging off: the throttle logs as if the virtual clock were real.
fn quietly<T>(silent: &tracing::Dispatch, body: impl FnOnce() -> T) -> T {
    tracing::dispatcher::with_default(silent, body)
}

/// The next minute boundary after `now` at which the window's containment differs from now's. The search stops
/// after [`FLIP_HORIZON_SECS`] and returns that moment then: looking again later is harmless, scanning a year of
/// minutes for a window that never flips is not.
fn next_flip(window: &crate::model::ScheduleWindow, now: Timestamp) -> Option<Timestamp> {
    let inside = window.contains(now);
    let minute = 60;
    let first = (now.as_second().div_euclid(minute) + 1) * minute;
    let last = first + FLIP_HORIZON_SECS;
    let mut at = first;
    while at < last {
        let moment = Timestamp::from_second(at).ok()?;
        if window.contains(moment) != inside {
            return Some(moment);
        }
        at += minute;
    }
    Timestamp::from_second(last).ok()
}

/// Eight days: every weekly pattern flips within a week.
const FLIP_HORIZON_SECS: i64 = 8 * 24 * 3600;

/// Collects the chart's points: every `step`, the cumulative cost and the peaks of queue and serving agents
/// since the previous point (a short burst between two points still shows).
struct SeriesRecorder {
    step: SignedDuration,
    series: Series,
    peak_queue: u64,
    peak_serving: u64,
}

impl SeriesRecorder {
    fn new(from: Timestamp, until: Timestamp) -> Self {
        let span = until.duration_since(from).as_secs().max(1);
        let step = SignedDuration::from_secs((span / SERIES_POINTS).max(1));
        Self { step, series: Series::default(), peak_queue: 0, peak_serving: 0 }
    }

    fn record(&mut self, at: Timestamp, cost: BTreeMap<String, f64>, queued: u64, serving: u64) {
        self.series.points.push(super::svg::Point {
            at,
            queue: self.peak_queue.max(queued),
            serving: self.peak_serving.max(serving),
            cost,
        });
        self.peak_queue = queued;
        self.peak_serving = serving;
    }

    fn finish(self) -> Series {
        self.series
    }
}

#[cfg(test)]
mod tests {
    //! Planning by parts against planning the whole: at every cycle (the engine checks each plan) and in the
    //! result (against cycling through every poll tick with whole plans).

    use super::*;
    use crate::simulate::models::{flag_overrides, models_for};
    use crate::simulate::synthetic::{templates_for, Profile, Synthetic};

    /// Hetzner (hourly billing, billing-aware keeps, capacity errors with a fallback type, a boot range) and EC2
    /// (per second, capacity errors, ephemeral agents): pools of their own, and two pools that take the same jobs
    /// (one part), with schedules, `minIdle`, idle and bootstrap timeouts and the circuit breaker.
    const ZOO: &str = r#"id: parts
pollInterval: 10s
ci:
  wp: { kind: woodpecker, server: "https://ci.example.com", token: "${T}" }
backends:
  hz: { kind: hcloud, token: "${T}", simulation: { capacityErrors: 0.15, bootTime: 20s-3m } }
  ec2: { kind: aws, region: eu-central-1, simulation: { capacityErrors: 0.1, bootTime: 40s-70s, prices: { "*": 0.08 USD } } }
pools:
  - name: amd
    ci: { source: wp, labels: { platform: linux/amd64 } }
    backend: { name: hz, machine: { serverType: "cx22,cx32", location: "fsn1,nbg1", image: docker-ce } }
    scale:
      max: 3
      idleTimeout: 7m
      bootstrapTimeout: 2m
      breakerThreshold: 2
      breakerCooldown: 2m
      schedule: [ { name: office, cron: "* 8-16 * * 1-5", timezone: Europe/Berlin, minIdle: 1 } ]
  - name: arm
    ci: { source: wp, labels: { platform: linux/arm64 } }
    backend: { name: hz, machine: { serverType: cax11 } }
    scale: { max: 2, idleTimeout: 2m, billingMargin: 10m }
  - name: big
    ci: { source: wp, labels: { platform: linux/s390x } }
    backend: { name: ec2, machine: { instanceType: t3.large, ami: ami-1 } }
    scale: { max: 2, minIdle: 1, idleTimeout: 3m }
  - name: big-overflow
    ci: { source: wp, labels: { platform: linux/s390x } }
    backend: { name: ec2, machine: { instanceType: t3.xlarge, ami: ami-1 } }
    scale: { max: 4, idleTimeout: 1m, ephemeral: true }
  - name: spare
    ci: { source: wp, labels: { platform: linux/riscv64 } }
    backend: { name: ec2, machine: { instanceType: t3.small, ami: ami-1 } }
    scale: { max: 5, minIdle: 2, idleTimeout: 5m, bootstrapTimeout: 50s }
"#;

    fn settings(
        desired: &Desired,
        simulation: &BTreeMap<BackendName, super::super::models::Overrides>,
        synthetic: &Synthetic,
        skip_idle: bool,
    ) -> Settings {
        Settings {
            name: "parts".into(),
            seed: synthetic.seed,
            from: synthetic.start,
            until: synthetic.until(),
            models: models_for(desired, simulation, &flag_overrides(&[], &[], &[]).unwrap_or_default()),
            skip_idle,
            series: true,
            give_up_after: GIVE_UP_AFTER,
        }
    }

    #[test]
    fn planning_by_parts_plans_what_planning_the_whole_plans_at_every_cycle() {
        let loaded = crate::config::load_str_with_simulation("parts.yaml", ZOO, &|_| Some("unused".to_owned()))
            .unwrap_or_else(|error| panic!("the zoo is valid: {error}"));
        let desired = &loaded.desired;
        for (profile, seed) in [(Profile::OfficeWeek, 3), (Profile::NightlyBurst, 4), (Profile::OfficeWeek, 5)] {
            let synthetic = Synthetic { days: 2, volume: 2.5, ..Synthetic::new(profile, seed) };
            let (templates, skipped) = templates_for(desired, None);
            assert!(skipped.is_empty(), "every pool gets jobs: {skipped:?}");
            let trace = synthetic.generate(&templates);
            assert!(trace.jobs.len() > 100, "a trace with work");

            let fast = settings(desired, &loaded.simulation, &synthetic, true);
            let mut sim = Sim::new(desired, &trace, &fast);
            let parts = sim.parts.as_ref().expect("the zoo is planned by parts");
            assert_eq!(parts.of_pool, vec![0, 1, 2, 2, 3], "the two s390x pools take the same jobs: one part");
            sim.check_parts = true;
            sim.run();
            let by_parts = sim.report();

            let slow = settings(desired, &loaded.simulation, &synthetic, false);
            let whole = run(desired, &trace, &slow);
            let context = format!("{profile} seed {seed}");
            assert_eq!(by_parts.json(), whole.json(), "{context}");
            assert_eq!(by_parts.render(), whole.render(), "{context}");
            assert_eq!(by_parts.series, whole.series, "{context}");
            assert_eq!(by_parts.pools, whole.pools, "{context}");
            assert_eq!((by_parts.until, by_parts.interrupted_jobs), (whole.until, whole.interrupted_jobs), "{context}");
            // The rules did fire: creates refused for capacity, agents deleted after their idle time.
            let total = by_parts.total();
            assert!(
                total.create_failures > 0 && total.deletes > 10,
                "{context}: {} failures, {} deletes",
                total.create_failures,
                total.deletes
            );
            assert!(
                by_parts.plans < by_parts.cycles * 4 / 2,
                "{context}: by parts {} plans of 4 parts in {} cycles",
                by_parts.plans,
                by_parts.cycles
            );
        }
    }
}
