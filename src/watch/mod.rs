//! The reconcile loop: observe → plan → start work, every poll interval and whenever something happens, for as
//! long as it is asked to run.
//!
//! The shape of kube-runtime's controller: changes run as work that outlives the cycle that planned them
//! ([`work`]); each cycle observes, plans knowing what is in flight (those targets are not planned again, creates
//! in flight count as capacity) and starts what may start now ([`schedule`]: per-source observation, per-target
//! backoff, the create throttle and circuit breaker per pool in [`throttle`], a slot per backend account or CI
//! source and a deadline per change in the executor). Nothing waits for anything else: a hung create on one cloud
//! holds back that cloud's slots and that pool's breaker, never another pool's cycle.
//!
//! An error never ends the loop and never slows it as a whole: a source that cannot be observed backs off on its
//! own (and only the pools that need it are held back), a failed change backs off its target or trips its pool's
//! breaker. The loop wakes every poll interval, at once on a trigger (an Incus lifecycle event, a CI source's
//! webhook delivery: [`webhooks`]), and soon after work finishes (to see its effect). Nothing is remembered between cycles but work in flight, backoffs and the
//! throttle, which can only hold changes back: every decision comes from a fresh observation, so a restart (or
//! cron running `apply` instead) acts the same.
//!
//! A reloaded config ([`Reloaded`], sent on SIGHUP by `ciscale watch`) takes over from the next cycle. The first
//! cancel (SIGTERM) starts no new work and returns once the work in flight has finished, each change within its
//! deadline; a second signal aborts the process (`signals`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tracing::Instrument;

use crate::apply::{ApplyOptions, Executor, Outcome};
use crate::model::{Desired, Observed, PoolName};
use crate::observe::Source;
use crate::plan::{self, Action, PoolStatus, Summary};
use crate::providers::Providers;

pub mod lock;
pub mod metrics;
pub mod schedule;
pub mod signals;
pub mod throttle;
pub mod triggers;
pub mod webhooks;
pub mod work;

pub use signals::shutdown_signal;

use schedule::{Backoff, Held, Hold, HoldContext, Target};
use work::{Finished, WorkSet};

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Stop after this many cycles (tests, `--cycles`); `None` runs until shut down. The last cycle waits for
    /// its work (and all other work in flight) to finish before it reports, so its report says how it ended.
    pub cycles: Option<u64>,
    /// The longest a failing source or target is left alone.
    pub max_backoff: Duration,
    pub apply: ApplyOptions,
    /// Shown every plan a cycle makes; `None` in the daemon unless `CISCALE_PLAN_TRACE` asks for a trace.
    pub inspect: Option<PlanInspector>,
}

impl Default for WatchOptions {
    fn default() -> Self {
        // Five minutes: long enough not to hammer a provider that is down, short enough that recovery is noticed
        // well within a typical idle timeout.
        Self { cycles: None, max_backoff: Duration::from_secs(300), apply: ApplyOptions::default(), inspect: None }
    }
}

/// Sees each plan the loop makes, with the config and the observation it was made from (its `in_flight` the
/// work the loop had running), right after planning and holding back what must not start now (`schedule::
/// hold_back`: changes that need a source this cycle did not observe, targets in flight or backing off), before
/// the create throttle and the slots: the changes a cycle may act on. A test hook: the safety oracle judges every
/// plan of the end-to-end tests through it (in-process, or from the trace `ciscale watch` writes under
/// `CISCALE_PLAN_TRACE`). It must not block: it runs inside the cycle.
#[derive(Clone)]
pub struct PlanInspector(Arc<dyn Fn(&Desired, &Observed, &plan::Plan) + Send + Sync>);

impl PlanInspector {
    pub fn new(inspect: impl Fn(&Desired, &Observed, &plan::Plan) + Send + Sync + 'static) -> Self {
        Self(Arc::new(inspect))
    }
}

impl std::fmt::Debug for PlanInspector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PlanInspector")
    }
}

/// What one cycle did, and how the work that finished since the previous cycle ended; `watch --json` prints one
/// per line.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    pub cycle: u64,
    pub started_at: Timestamp,
    /// Observe, plan and start (work runs on; the last cycle of `--cycles N` includes waiting for it).
    pub duration_ms: u64,
    /// The counts of the changes this cycle was to start: the plan's, less what was held back.
    pub planned: Summary,
    /// Changes started this cycle.
    pub started: usize,
    /// Changes in flight when the cycle reported (started by this cycle or earlier ones).
    pub in_flight: usize,
    /// Changes that finished since the previous report: done, and failed (abandoned ones included).
    pub applied: usize,
    pub failed: usize,
    /// Of `failed`: abandoned at their deadline.
    #[serde(skip_serializing_if = "is_zero")]
    pub abandoned: usize,
    /// Sources that could not be observed this cycle, with why (`; `-separated); `None` when every source
    /// answered. Failed changes are counted in `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Sources not observed this cycle (they failed, or are backing off after failing).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unobserved: Vec<Source>,
    /// Pools not planned this cycle because a source they need was not observed.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unobserved_pools: Vec<PoolName>,
    /// Seconds until the next regular cycle (finished work or a trigger may start one sooner).
    pub next_in_secs: f64,
    /// The longest `Retry-After` a rate-limited observation asked for: that source is not asked again sooner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<f64>,
    /// Per pool: the numbers the plan was made from (pools that were fully observed).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
    /// Changes that finished since the previous report, by action (`create`, `delete`, ...).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub applied_by_action: BTreeMap<String, u32>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub failed_by_action: BTreeMap<String, u32>,
    /// Hourly cost per currency once the plan is applied.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub hourly_cost: BTreeMap<String, f64>,
    /// Creates the plan wanted but the create rate or a circuit breaker held back for a later cycle.
    #[serde(skip_serializing_if = "is_zero")]
    pub held_back: usize,
    /// Planned changes that wait for a later cycle: work on their target is in flight, the target is backing
    /// off, a source they need was not observed, or their backend's (CI source's) slots were all taken.
    #[serde(skip_serializing_if = "is_zero")]
    pub waiting: usize,
    /// Pools whose circuit breaker is open (or half-open) after this cycle: they create at most one trial.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub circuits_open: Vec<PoolName>,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
}

impl CycleReport {
    fn new(cycle: u64, started_at: Timestamp) -> Self {
        Self {
            cycle,
            started_at,
            duration_ms: 0,
            planned: Summary::default(),
            started: 0,
            in_flight: 0,
            applied: 0,
            failed: 0,
            abandoned: 0,
            error: None,
            unobserved: Vec::new(),
            unobserved_pools: Vec::new(),
            next_in_secs: 0.0,
            retry_after_secs: None,
            pools: Vec::new(),
            applied_by_action: BTreeMap::new(),
            failed_by_action: BTreeMap::new(),
            hourly_cost: BTreeMap::new(),
            held_back: 0,
            waiting: 0,
            circuits_open: Vec::new(),
        }
    }

    /// Counts finished work in.
    fn count(&mut self, finished: &Finished) {
        let verb = finished.change.action.verb().to_owned();
        match &finished.outcome {
            Outcome::Done => {
                self.applied += 1;
                *self.applied_by_action.entry(verb).or_default() += 1;
            }
            Outcome::Failed { .. } => {
                self.failed += 1;
                if finished.abandoned() {
                    self.abandoned += 1;
                }
                *self.failed_by_action.entry(verb).or_default() += 1;
            }
            Outcome::Skipped { .. } => {}
        }
    }
}

/// A new config for a running loop: it takes over from the next cycle. Providers (and triggers) are built by the
/// caller from the new config; the old ones are dropped once the loop has switched.
pub struct Reloaded {
    pub desired: Desired,
    pub providers: Providers,
    /// Trigger streams of the new config; they replace the old ones.
    pub triggers: Vec<mpsc::Receiver<Trigger>>,
}

impl std::fmt::Debug for Reloaded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloaded")
            .field("owner", &self.desired.owner)
            .field("config_hash", &self.desired.config_hash)
            .field("triggers", &self.triggers.len())
            .finish_non_exhaustive()
    }
}

/// A request for a reconcile before the poll interval ends (an Incus instance went away, an event stream
/// reconnected and may have missed something). The interval stays as the safety net.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// Where it came from (`backend lxd`).
    pub source: String,
    pub reason: String,
}

/// Runs cycles until `cancel` turns true (or `options.cycles` are done), then waits for the work in flight.
pub async fn run(
    desired: &Desired,
    providers: &Providers,
    options: &WatchOptions,
    cancel: &watch::Receiver<bool>,
    on_cycle: impl FnMut(&CycleReport),
) {
    run_with_triggers(desired, providers, options, cancel, Vec::new(), on_cycle).await;
}

/// [`run`], also woken by `triggers`, at any time (a trigger during a cycle starts the next one right after it;
/// several coalesce into one).
pub async fn run_with_triggers(
    desired: &Desired,
    providers: &Providers,
    options: &WatchOptions,
    cancel: &watch::Receiver<bool>,
    triggers: Vec<mpsc::Receiver<Trigger>>,
    on_cycle: impl FnMut(&CycleReport),
) {
    run_reloadable(desired.clone(), providers.clone(), options, cancel, triggers, None, on_cycle).await;
}

/// What the loop keeps between cycles: work in flight and what can only hold changes back.
struct LoopState {
    work: WorkSet,
    throttle: throttle::Throttle,
    sources: Backoff<Source>,
    targets: Backoff<Target>,
    /// Finished since the last report.
    finished: Vec<Finished>,
    notes: NoteLog,
}

/// The notes logged last time, per pool (`None`: the plan's own notes), so a note is logged when it appears or
/// changes, not again every cycle while it stays the same (a pool held at `max` says so for hours).
#[derive(Debug, Default)]
pub struct NoteLog {
    last: BTreeMap<Option<PoolName>, Vec<String>>,
}

impl NoteLog {
    /// The notes of `key` that were not among its notes the last time it was planned; remembers `notes`.
    pub fn fresh<'n>(&mut self, key: Option<&PoolName>, notes: &'n [String]) -> Vec<&'n str> {
        let last = self.last.entry(key.cloned()).or_default();
        let fresh = notes.iter().filter(|note| !last.contains(note)).map(String::as_str).collect();
        if last.as_slice() != notes {
            *last = notes.to_vec();
        }
        fresh
    }

    /// Forgets the pools a reload removed (a pool added back with the same name logs its notes afresh).
    fn retain(&mut self, desired: &Desired) {
        self.last.retain(|key, _| key.as_ref().is_none_or(|pool| desired.pool(pool).is_some()));
    }
}

impl LoopState {
    /// Takes a finished change in: the breaker counts creates, the target's backoff the rest.
    fn absorb(&mut self, finished: Finished, desired: &Desired, options: &WatchOptions) {
        let now = Timestamp::now();
        self.throttle.record(std::slice::from_ref(&(finished.change.clone(), finished.outcome.clone())), desired, now);
        let target = schedule::targets_of(&finished.change);
        match &finished.outcome {
            Outcome::Done => {
                for key in &target {
                    self.targets.succeeded(key);
                }
            }
            Outcome::Failed { step, error } => {
                // A create's name is fresh each time: its pool's breaker (above) is what backs it off.
                if finished.change.action != Action::Create {
                    for key in target {
                        self.targets.failed(key, now, desired.poll_interval.0, options.max_backoff, None);
                    }
                }
                // The executor has logged the failure with its span; this says what the loop makes of it.
                let first_line = error.lines().next().unwrap_or_default();
                tracing::debug!(
                    pool = %finished.change.pool,
                    action = %finished.change.action,
                    target = finished.change.target_name(),
                    step,
                    error = first_line,
                    "change failed; the next plan decides again"
                );
            }
            Outcome::Skipped { .. } => {}
        }
        self.finished.push(finished);
    }
}

/// [`run_with_triggers`] whose config can be replaced while it runs: each [`Reloaded`] received on `reloads`
/// takes over from the next cycle, which starts at once (a reload also forgets every backoff: the new config
/// deserves a fresh try). Several reloads during one cycle: the last one wins. Work in flight finishes under the
/// config it was started with.
pub async fn run_reloadable(
    mut desired: Desired,
    mut providers: Providers,
    options: &WatchOptions,
    cancel: &watch::Receiver<bool>,
    triggers: Vec<mpsc::Receiver<Trigger>>,
    mut reloads: Option<mpsc::Receiver<Reloaded>>,
    mut on_cycle: impl FnMut(&CycleReport),
) {
    let wake = Arc::new(Notify::new());
    let mut relays = tokio::task::JoinSet::new();
    spawn_relays(&mut relays, &wake, triggers);
    let mut state = LoopState {
        work: WorkSet::new(Executor::new(&desired, &providers, &options.apply), cancel.clone()),
        throttle: throttle::Throttle::new(),
        sources: Backoff::new(),
        targets: Backoff::new(),
        finished: Vec::new(),
        notes: NoteLog::default(),
    };
    let mut pending_reload: Option<Reloaded> = None;
    let mut cycle: u64 = 0;
    let mut cancel_wait = cancel.clone();
    'cycles: loop {
        if *cancel.borrow() {
            break;
        }
        // Only the newest config matters: reloads that queued up behind it are already outdated.
        if let Some(receiver) = reloads.as_mut() {
            while let Ok(newer) = receiver.try_recv() {
                pending_reload = Some(newer);
            }
        }
        if let Some(Reloaded { desired: new_desired, providers: new_providers, triggers }) = pending_reload.take() {
            tracing::info!(
                owner = %new_desired.owner,
                pools = new_desired.pools.len(),
                interval = %new_desired.poll_interval,
                config_hash = %new_desired.config_hash,
                "config reloaded; in effect from this cycle"
            );
            desired = new_desired;
            providers = new_providers;
            state.work.set_executor(Executor::new(&desired, &providers, &options.apply));
            state.sources = Backoff::new();
            state.targets = Backoff::new();
            state.notes.retain(&desired);
            relays.abort_all();
            spawn_relays(&mut relays, &wake, triggers);
        }
        for finished in state.work.take_finished() {
            state.absorb(finished, &desired, options);
        }
        cycle += 1;
        let started_at = Timestamp::now();
        let clock = std::time::Instant::now();
        let span = tracing::info_span!("reconcile", cycle);
        let mut report = reconcile(&desired, &providers, options, cycle, started_at, &mut state).instrument(span).await;
        let last = options.cycles.is_some_and(|cycles| cycle >= cycles);
        if last {
            for finished in state.work.finish_all().await {
                state.absorb(finished, &desired, options);
            }
            report.in_flight = 0;
            report.circuits_open = state.throttle.open_circuits().into_iter().collect();
        }
        for finished in std::mem::take(&mut state.finished) {
            report.count(&finished);
        }
        let poll_interval = desired.poll_interval.0;
        report.duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        report.next_in_secs = poll_interval.as_secs_f64();
        on_cycle(&report);
        if last {
            break;
        }

        let ended = Timestamp::now();
        let mut reloads_closed = false;
        let mut due =
            schedule::next_cycle_at(started_at, ended, poll_interval, false, schedule::settle_for(poll_interval));
        loop {
            let sleep_for = Duration::try_from(due.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO);
            let reloaded = async {
                match reloads.as_mut() {
                    Some(receiver) => receiver.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = tokio::time::sleep(sleep_for) => break,
                () = wake.notified() => break,
                finished = state.work.next_finished() => {
                    state.absorb(finished, &desired, options);
                    // Its effect is worth seeing soon; more work finishing meanwhile joins that cycle.
                    due = due.min(schedule::next_cycle_at(
                        started_at,
                        ended,
                        poll_interval,
                        true,
                        schedule::settle_for(poll_interval),
                    ));
                }
                received = reloaded => {
                    match received {
                        Some(newer) => pending_reload = Some(newer),
                        // Nobody can send a reload any more: stop listening (the cycle starts now, harmlessly
                        // early).
                        None => reloads_closed = true,
                    }
                    break;
                }
                _ = cancel_wait.wait_for(|cancelled| *cancelled) => break 'cycles,
            }
        }
        if reloads_closed {
            reloads = None;
        }
    }
    // Shut down: no new work; what is in flight finishes (a second signal aborts the process).
    if !state.work.is_empty() {
        tracing::info!(in_flight = state.work.len(), "waiting for the work in flight to finish");
    }
    for finished in state.work.finish_all().await {
        state.absorb(finished, &desired, options);
    }
}

fn spawn_relays(relays: &mut tokio::task::JoinSet<()>, wake: &Arc<Notify>, triggers: Vec<mpsc::Receiver<Trigger>>) {
    for mut trigger in triggers {
        let wake = Arc::clone(wake);
        relays.spawn(async move {
            while let Some(Trigger { source, reason }) = trigger.recv().await {
                tracing::debug!(%source, %reason, "reconcile triggered");
                wake.notify_one();
            }
        });
    }
}

async fn reconcile(
    desired: &Desired,
    providers: &Providers,
    options: &WatchOptions,
    cycle: u64,
    started_at: Timestamp,
    state: &mut LoopState,
) -> CycleReport {
    let mut report = CycleReport::new(cycle, started_at);
    let poll_interval = desired.poll_interval.0;

    // Observe what is due: a source backing off after a failure sits this cycle out.
    let all = schedule::sources(desired);
    let mut unobserved = BTreeSet::new();
    let mut problems = Vec::new();
    let mut due = BTreeSet::new();
    for source in &all {
        match state.sources.waiting(source, started_at) {
            Some(until) => {
                problems.push(format!("{source}: backing off after failures until {}", until.strftime("%H:%M:%S UTC")));
                unobserved.insert(source.clone());
            }
            None => {
                due.insert(source.clone());
            }
        }
    }
    let deadline = schedule::observe_deadline(poll_interval);
    let observation = crate::observe::observe_sources(desired, providers, &due, started_at, Some(deadline)).await;
    let failed: BTreeSet<Source> = observation.failures.iter().filter_map(|error| error.failed_source()).collect();
    for source in &due {
        if !failed.contains(source) && state.sources.succeeded(source) {
            tracing::info!(%source, "observed again");
        }
    }
    for error in &observation.failures {
        let text = crate::providers::http::error_chain(error);
        let retry_after = match error.provider_error() {
            Some(crate::providers::Error::RateLimited { retry_after, .. }) => *retry_after,
            _ => None,
        };
        if let Some(after) = retry_after {
            let secs = after.as_secs_f64();
            report.retry_after_secs = Some(report.retry_after_secs.map_or(secs, |known: f64| known.max(secs)));
        }
        if let Some(source) = error.failed_source() {
            let until =
                state.sources.failed(source.clone(), started_at, poll_interval, options.max_backoff, retry_after);
            tracing::warn!(
                %source,
                error = %text,
                retry_at = %until.strftime("%H:%M:%S UTC"),
                "observation failed; the pools that need it wait"
            );
            unobserved.insert(source);
        }
        problems.push(text);
    }
    if !problems.is_empty() {
        report.error = Some(problems.join("; "));
    }
    report.unobserved = unobserved.iter().cloned().collect();
    if unobserved.len() == all.len() && !all.is_empty() {
        return report;
    }

    let mut observed = observation.observed;
    observed.in_flight = state.work.in_flight();
    let mut plan = plan::plan(desired, &observed, observed.observed_at);
    let (held, unobserved_pools) = schedule::hold_back(
        &mut plan,
        &HoldContext {
            desired,
            observed: &observed,
            unobserved: &unobserved,
            backoff: &state.targets,
            now: started_at,
        },
    );
    if let Some(inspect) = &options.inspect {
        (inspect.0)(desired, &observed, &plan);
    }
    report.unobserved_pools = unobserved_pools.keys().cloned().collect();
    for (pool, sources) in &unobserved_pools {
        let names: Vec<String> = sources.iter().map(ToString::to_string).collect();
        tracing::debug!(%pool, "not planned this cycle: {} not observed", names.join(" and "));
    }
    for Held { change, hold } in &held {
        let level_is_info = matches!(hold, Hold::Unobserved { .. });
        if level_is_info {
            tracing::info!(pool = %change.pool, action = %change.action, target = change.target_name(), "held: {hold}");
        } else {
            tracing::debug!(pool = %change.pool, action = %change.action, target = change.target_name(), "held: {hold}");
        }
    }
    // Between plan and start: the pure plan says what is needed, the throttle what may be done now.
    report.held_back = state.throttle.filter(&mut plan, desired, Timestamp::now()).changes.len();
    report.circuits_open = state.throttle.open_circuits().into_iter().collect();
    for status in &plan.pools {
        let _pool = tracing::info_span!("pool", pool = %status.pool).entered();
        tracing::debug!(
            desired = status.desired,
            active = status.active,
            busy = status.busy,
            idle = status.idle,
            pending = status.pending_jobs,
            "pool status"
        );
        for note in state.notes.fresh(Some(&status.pool), &status.notes) {
            tracing::info!("{note}");
        }
    }
    for note in state.notes.fresh(None, &plan.notes) {
        tracing::info!("{note}");
    }
    report.planned = plan.summary;
    report.pools = std::mem::take(&mut plan.pools);
    report.hourly_cost = plan.cost.hourly.iter().map(|(currency, line)| (currency.clone(), line.after)).collect();
    for change in &plan.changes {
        tracing::info!(pool = %change.pool, action = %change.action, target = change.target_name(), reason = %change.reason, "planned");
    }
    let planned = plan.changes.len();
    // Cancelled during the cycle: start nothing new (what is in flight finishes).
    let waiting_for_slot = if state.work.cancelled() { Vec::new() } else { state.work.start(plan.changes, started_at) };
    for (change, slot) in &waiting_for_slot {
        tracing::debug!(pool = %change.pool, action = %change.action, target = change.target_name(), "waiting: every slot of {slot} is taken");
    }
    report.started = planned - waiting_for_slot.len();
    report.waiting = held.len() + waiting_for_slot.len();
    report.in_flight = state.work.len();
    report
}
