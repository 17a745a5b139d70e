//! The reconcile loop: observe → plan → apply, every poll interval, for as long as it is asked to run.
//!
//! Like kube-runtime's controller, an error never ends the loop: a failed cycle is logged and the next one comes
//! after an exponential backoff. Nothing is remembered between cycles but the failure count for that backoff and
//! the create throttle ([`throttle`]), which can only hold creates back: every decision comes from a fresh
//! observation, so a restart (or cron running `apply` instead) acts the same.
//!
//! A reloaded config ([`Reloaded`], sent on SIGHUP by `ciscale watch`) takes over from the next cycle.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
use tokio::sync::{mpsc, watch, Notify};
use tracing::Instrument;

use crate::apply::{self, ApplyOptions, NoProgress};
use crate::model::{Desired, Observed, PoolName};
use crate::plan::{self, PoolStatus, Summary};
use crate::providers::Providers;

pub mod lock;
pub mod metrics;
pub mod signals;
pub mod throttle;
pub mod triggers;

pub use signals::shutdown_signal;

/// How the loop runs.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// Stop after this many cycles (tests, `--cycles`); `None` runs until shut down.
    pub cycles: Option<u64>,
    /// The longest wait after repeated failures.
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

/// Sees each plan the loop makes, with the config and the observation it was made from, right after planning
/// (before the create throttle and apply). A test hook: the safety oracle judges every plan of the end-to-end
/// tests through it (in-process, or from the trace `ciscale watch` writes under `CISCALE_PLAN_TRACE`). It must
/// not block: it runs inside the cycle.
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

/// What one cycle did; `watch --json` prints one per line.
#[derive(Debug, Clone, Serialize)]
pub struct CycleReport {
    pub cycle: u64,
    pub started_at: Timestamp,
    pub duration_ms: u64,
    /// The plan's counts (empty when the cycle failed before planning).
    pub planned: Summary,
    pub applied: usize,
    pub failed: usize,
    /// Why the cycle failed, if it did (observation error); failed changes are counted in `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Seconds until the next cycle.
    pub next_in_secs: f64,
    /// The `Retry-After` a rate-limited observation asked for: the next cycle waits at least this long.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<f64>,
    /// Per pool: the numbers the plan was made from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<PoolStatus>,
    /// Changes carried out and failed, by action (`create`, `delete`, ...).
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
    /// Pools whose circuit breaker is open (or half-open) after this cycle: they create at most one trial.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub circuits_open: Vec<PoolName>,
}

fn is_zero(count: &usize) -> bool {
    *count == 0
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

/// Runs cycles until `cancel` turns true (or `options.cycles` are done). In-flight changes of the current cycle
/// are finished before returning: `apply` starts no new change once `cancel` is set.
pub async fn run(
    desired: &Desired,
    providers: &Providers,
    options: &WatchOptions,
    cancel: &watch::Receiver<bool>,
    on_cycle: impl FnMut(&CycleReport),
) {
    run_with_triggers(desired, providers, options, cancel, Vec::new(), on_cycle).await;
}

/// [`run`], also woken by `triggers`. Triggers that arrive during a cycle start the next one right after it
/// (they coalesce into one); after failures they do not cut the backoff short.
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

/// [`run_with_triggers`] whose config can be replaced while it runs: each [`Reloaded`] received on `reloads`
/// takes over from the next cycle, which starts at once (a reload also resets the failure backoff: the new
/// config deserves a fresh try). Several reloads during one cycle: the last one wins.
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
    let mut throttle = throttle::Throttle::new();
    let mut pending_reload: Option<Reloaded> = None;
    let mut consecutive_failures: u32 = 0;
    let mut cycle: u64 = 0;
    let mut cancel_wait = cancel.clone();
    loop {
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
            relays.abort_all();
            spawn_relays(&mut relays, &wake, triggers);
            consecutive_failures = 0;
        }
        cycle += 1;
        let started_at = Timestamp::now();
        let clock = std::time::Instant::now();
        let span = tracing::info_span!("reconcile", cycle);
        let mut report = reconcile(&desired, &providers, options, cancel, cycle, started_at, &mut throttle)
            .instrument(span)
            .await;

        consecutive_failures = if report.error.is_some() || report.failed > 0 { consecutive_failures + 1 } else { 0 };
        let mut wait = next_wait(desired.poll_interval.0, consecutive_failures, options.max_backoff);
        // A provider that said how long to stay away is believed, within the longest backoff.
        if let Some(after) = report.retry_after_secs.and_then(|secs| Duration::try_from_secs_f64(secs).ok()) {
            wait = wait.max(after.min(options.max_backoff));
        }
        report.duration_ms = u64::try_from(clock.elapsed().as_millis()).unwrap_or(u64::MAX);
        report.next_in_secs = wait.as_secs_f64();
        on_cycle(&report);

        if options.cycles.is_some_and(|cycles| cycle >= cycles) {
            break;
        }
        let woken = async {
            if consecutive_failures == 0 {
                wake.notified().await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let reloaded = async {
            match reloads.as_mut() {
                Some(receiver) => receiver.recv().await,
                None => std::future::pending().await,
            }
        };
        let mut reloads_closed = false;
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = woken => {}
            received = reloaded => match received {
                Some(newer) => pending_reload = Some(newer),
                // Nobody can send a reload any more: stop listening (the cycle starts now, harmlessly early).
                None => reloads_closed = true,
            },
            _ = cancel_wait.wait_for(|cancelled| *cancelled) => break,
        }
        if reloads_closed {
            reloads = None;
        }
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
    cancel: &watch::Receiver<bool>,
    cycle: u64,
    started_at: Timestamp,
    throttle: &mut throttle::Throttle,
) -> CycleReport {
    let mut report = CycleReport {
        cycle,
        started_at,
        duration_ms: 0,
        planned: Summary::default(),
        applied: 0,
        failed: 0,
        error: None,
        next_in_secs: 0.0,
        retry_after_secs: None,
        pools: Vec::new(),
        applied_by_action: BTreeMap::new(),
        failed_by_action: BTreeMap::new(),
        hourly_cost: BTreeMap::new(),
        held_back: 0,
        circuits_open: Vec::new(),
    };
    let observed = match crate::observe::observe(desired, providers, started_at).await {
        Ok(observed) => observed,
        Err(error) => {
            let text = crate::providers::http::error_chain(&error);
            tracing::warn!(error = %text, "observation failed; will retry");
            report.error = Some(text);
            report.retry_after_secs = rate_limited_for(&error).map(|after| after.as_secs_f64());
            return report;
        }
    };
    let mut plan = plan::plan(desired, &observed, observed.observed_at);
    if let Some(inspect) = &options.inspect {
        (inspect.0)(desired, &observed, &plan);
    }
    // Between plan and apply: the pure plan says what is needed, the throttle what may be done now.
    report.held_back = throttle.filter(&mut plan, desired, Timestamp::now()).changes.len();
    report.circuits_open = throttle.open_circuits().into_iter().collect();
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
        for note in &status.notes {
            tracing::info!("{note}");
        }
    }
    report.planned = plan.summary;
    report.pools = plan.pools.clone();
    report.hourly_cost = plan.cost.hourly.iter().map(|(currency, line)| (currency.clone(), line.after)).collect();
    if !plan.has_changes() {
        tracing::debug!("no changes");
        return report;
    }
    for change in &plan.changes {
        let target = change.instance.as_ref().map(|i| i.name.as_str()).or(change.agent.as_ref().map(|a| a.name.as_str()));
        tracing::info!(pool = %change.pool, action = %change.action, target, reason = %change.reason, "planned");
    }
    let result = apply::apply(&plan, desired, providers, &options.apply, &NoProgress, cancel).await;
    throttle.record(&result.outcomes, desired, Timestamp::now());
    report.circuits_open = throttle.open_circuits().into_iter().collect();
    report.applied = result.succeeded();
    report.failed = result.failed();
    for (change, outcome) in &result.outcomes {
        match outcome {
            apply::Outcome::Done => *report.applied_by_action.entry(change.action.verb().to_owned()).or_default() += 1,
            apply::Outcome::Failed { step, error } => {
                *report.failed_by_action.entry(change.action.verb().to_owned()).or_default() += 1;
                tracing::warn!(pool = %change.pool, action = %change.action, step, error, "change failed; the next cycle retries");
            }
            apply::Outcome::Skipped { .. } => {}
        }
    }
    report
}

/// The poll interval while things work; after failures, doubling from it up to `max_backoff`, with up to 10 %
/// jitter so several ciscale hosts recovering together do not all call at once.
pub fn next_wait(poll_interval: Duration, consecutive_failures: u32, max_backoff: Duration) -> Duration {
    if consecutive_failures == 0 {
        return poll_interval;
    }
    let factor = 2u32.saturating_pow(consecutive_failures.min(16));
    let backoff = poll_interval.saturating_mul(factor).min(max_backoff).max(poll_interval.min(max_backoff));
    let jitter_fraction = f64::from(Timestamp::now().subsec_nanosecond().unsigned_abs() % 1000) / 10_000.0;
    backoff.mul_f64(1.0 + jitter_fraction)
}

/// The `Retry-After` of a rate-limited observation.
fn rate_limited_for(error: &crate::observe::ObserveError) -> Option<Duration> {
    use crate::observe::ObserveError;
    match error {
        ObserveError::Backend { source: crate::providers::Error::RateLimited { retry_after, .. }, .. }
        | ObserveError::Ci { source: crate::providers::Error::RateLimited { retry_after, .. }, .. } => *retry_after,
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_the_poll_interval_while_healthy() {
        assert_eq!(next_wait(Duration::from_secs(10), 0, Duration::from_secs(300)), Duration::from_secs(10));
    }

    #[test]
    fn backs_off_exponentially_with_bounded_jitter() {
        let poll = Duration::from_secs(10);
        let max = Duration::from_secs(300);
        for (failures, base) in [(1, 20), (2, 40), (3, 80), (4, 160), (5, 300), (30, 300)] {
            let wait = next_wait(poll, failures, max);
            let base = Duration::from_secs(base);
            assert!(wait >= base && wait <= base.mul_f64(1.1), "{failures} failures: {wait:?} not in [{base:?}, +10%]");
        }
    }
}
