//! Throttling of creates between plan and apply: a token bucket per backend (`createRate`/`createBurst`) and a
//! circuit breaker per pool (`scale.breakerThreshold`/`breakerCooldown`).
//!
//! This is the one piece of memory the daemon keeps between cycles, and on purpose outside the pure planner: it
//! only ever *holds back* creates the plan asked for, never adds or changes one, so forgetting it (a restart, a
//! cron `apply`) can at worst create a little sooner, never do something the plan would not. Held-back creates
//! are simply planned again on a later cycle, because what they were for (waiting jobs, `min`) is still observed.
//!
//! The clock is passed in (`now`), so the tests drive it by hand.
//!
//! Breaker states: closed (counting failed creates in a row) → open after `breakerThreshold` of them (no creates
//! until `breakerCooldown` has passed) → half-open (one create is let through per cycle) → closed when it
//! succeeds, open again for another cool-down when it fails.
//!
//! A create also fails when its instance comes up but its agent never registers (a broken image): the planner
//! removes such an instance with [`Cause::BootstrapTimeout`], and each distinct instance removed for that cause
//! counts as one failed create of its pool. Such a failure shows only a bootstrap timeout after the create step
//! succeeded, so while a pool has bootstrap failures in its count, a create that is done proves nothing yet: it
//! leaves them in the count (and a half-open trial waits for its verdict instead of closing the circuit) until
//! its instance has outlived the bootstrap timeout without being removed for it. Without this, a broken image
//! would churn forever: every create succeeds, every agent times out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use jiff::Timestamp;

use crate::apply::Outcome;
use crate::model::{BackendName, CreateLimit, Desired, PoolName};
use crate::plan::{Action, Cause, Change, Plan};

/// Bucket and breaker state, kept by the watch loop across cycles.
#[derive(Debug, Default)]
pub struct Throttle {
    buckets: BTreeMap<BackendName, Bucket>,
    circuits: BTreeMap<PoolName, Circuit>,
    bootstrap: BTreeMap<PoolName, Bootstrap>,
}

/// A pool's agents that never registered, for the breaker (see the module docs).
#[derive(Debug, Default)]
struct Bootstrap {
    /// Instances removed for a bootstrap timeout since the last create proven good.
    failures: u32,
    /// Creates done while `failures > 0`, not yet proven good: (instance name, when done).
    unproven: Vec<(String, Timestamp)>,
    /// The last instances counted (a removal planned again after a failed delete counts once).
    counted: VecDeque<String>,
}

/// How many counted removals a pool remembers: more than a pool removes within one breaker cycle.
const REMEMBERED_REMOVALS: usize = 256;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    limit: CreateLimit,
    tokens: f64,
    updated: Timestamp,
}

impl Bucket {
    fn full(limit: CreateLimit, now: Timestamp) -> Self {
        Self { limit, tokens: f64::from(limit.burst), updated: now }
    }

    /// Tokens earned since the last look, up to the burst. A clock going backwards earns nothing.
    fn refill(&mut self, now: Timestamp) {
        let elapsed = now.duration_since(self.updated).as_secs_f64().max(0.0);
        let per_second = f64::from(self.limit.rate.count) / self.limit.rate.per.as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_second).min(f64::from(self.limit.burst));
        self.updated = self.updated.max(now);
    }

    fn take(&mut self) -> bool {
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// How long until the next token.
    fn next_in(&self) -> std::time::Duration {
        let missing = (1.0 - self.tokens).max(0.0);
        self.limit.rate.per.mul_f64(missing / f64::from(self.limit.rate.count))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    /// `failures` creates failed in a row, fewer than the threshold.
    Closed { failures: u32 },
    /// No creates until `until`.
    Open { failures: u32, until: Timestamp },
    /// The cool-down is over: one create per cycle is let through to find out whether creating works again.
    HalfOpen { failures: u32 },
}

/// What [`Throttle::filter`] held back.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HeldBack {
    /// The creates (and replaces) taken out of the plan, in plan order.
    pub changes: Vec<Change>,
}

impl Throttle {
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the creates the buckets and breakers do not allow now out of `plan` (its summary follows; its cost
    /// still describes the whole plan), and adds a note saying so to each affected pool's status. Creates are
    /// let through in plan order.
    pub fn filter(&mut self, plan: &mut Plan, desired: &Desired, now: Timestamp) -> HeldBack {
        self.forget_removed(desired);
        self.prove_creates(desired, now);
        for (name, spec) in &desired.backends {
            match (spec.create_limit, self.buckets.get_mut(name)) {
                (None, _) => {
                    self.buckets.remove(name);
                }
                // A reloaded config with another limit starts from a bucket of the new size, keeping what was
                // used: a reload must not be a way around the limit.
                (Some(limit), Some(bucket)) if bucket.limit != limit => {
                    bucket.refill(now);
                    let tokens = bucket.tokens.min(f64::from(limit.burst));
                    *bucket = Bucket { limit, tokens, updated: now };
                }
                (Some(_), Some(bucket)) => bucket.refill(now),
                (Some(limit), None) => {
                    self.buckets.insert(name.clone(), Bucket::full(limit, now));
                }
            }
        }
        for (pool, circuit) in &mut self.circuits {
            if let Circuit::Open { failures, until } = *circuit {
                if now >= until {
                    tracing::info!(%pool, failures, "circuit half-open: trying one create");
                    *circuit = Circuit::HalfOpen { failures };
                }
            }
        }

        let mut by_breaker: BTreeMap<PoolName, u32> = BTreeMap::new();
        let mut by_bucket: BTreeMap<PoolName, BTreeMap<BackendName, u32>> = BTreeMap::new();
        let mut trial_sent: BTreeSet<PoolName> = BTreeSet::new();
        let mut held = HeldBack::default();
        let mut kept = Vec::with_capacity(plan.changes.len());
        for change in std::mem::take(&mut plan.changes) {
            if !creates(&change) {
                kept.push(change);
                continue;
            }
            let circuit = self.circuits.get(&change.pool).copied().unwrap_or(Circuit::Closed { failures: 0 });
            let awaiting_verdict =
                self.bootstrap.get(&change.pool).is_some_and(|b| b.failures > 0 && !b.unproven.is_empty());
            let breaker_allows = match circuit {
                Circuit::Closed { .. } => true,
                Circuit::Open { .. } => false,
                // One trial at a time: one per cycle, and none while a done trial waits to outlive its bootstrap.
                Circuit::HalfOpen { .. } => !trial_sent.contains(&change.pool) && !awaiting_verdict,
            };
            if !breaker_allows {
                *by_breaker.entry(change.pool.clone()).or_default() += 1;
                held.changes.push(change);
                continue;
            }
            let backend = change.instance.as_ref().map(|instance| &instance.backend);
            let bucket_allows = match backend.and_then(|backend| self.buckets.get_mut(backend)) {
                Some(bucket) => bucket.take(),
                None => true,
            };
            if !bucket_allows {
                if let Some(backend) = backend {
                    *by_bucket.entry(change.pool.clone()).or_default().entry(backend.clone()).or_default() += 1;
                }
                held.changes.push(change);
                continue;
            }
            if matches!(circuit, Circuit::HalfOpen { .. }) {
                trial_sent.insert(change.pool.clone());
            }
            kept.push(change);
        }
        plan.changes = kept;
        for change in &held.changes {
            plan.summary.create = plan.summary.create.saturating_sub(1);
            if change.action == Action::Replace {
                plan.summary.delete = plan.summary.delete.saturating_sub(1);
            }
        }

        for status in &mut plan.pools {
            if let Some(count) = by_breaker.get(&status.pool) {
                let note = match self.circuits.get(&status.pool) {
                    Some(Circuit::Open { failures, until }) => format!(
                        "circuit open after {failures} failed creates in a row: {} held back; retrying at {}",
                        creates_text(*count),
                        clock_time(*until)
                    ),
                    Some(Circuit::HalfOpen { failures }) => format!(
                        "circuit half-open after {failures} failed creates in a row: trying 1 create, {} held back",
                        creates_text(*count)
                    ),
                    _ => format!("{} held back by the circuit breaker", creates_text(*count)),
                };
                tracing::warn!(pool = %status.pool, held_back = count, "{note}");
                status.notes.push(note);
            }
            for (backend, count) in by_bucket.get(&status.pool).into_iter().flatten() {
                let Some(bucket) = self.buckets.get(backend) else {
                    continue;
                };
                let note = format!(
                    "{} held back by backend `{backend}`'s create rate {} (burst {}); next create allowed in {}s",
                    creates_text(*count),
                    bucket.limit.rate,
                    bucket.limit.burst,
                    bucket.next_in().as_secs_f64().ceil()
                );
                tracing::info!(pool = %status.pool, %backend, held_back = count, "{note}");
                status.notes.push(note);
            }
        }
        held
    }

    /// Takes in how the creates (and replaces) of an apply ended: a success closes the pool's circuit, a failure
    /// counts towards opening it. Skipped changes say nothing about the backend and count for neither. A done
    /// removal of an instance whose agent never registered ([`Cause::BootstrapTimeout`]) is a failed create.
    pub fn record(&mut self, outcomes: &[(Change, Outcome)], desired: &Desired, now: Timestamp) {
        for (change, outcome) in outcomes {
            let bootstrap_failure = change.cause == Some(Cause::BootstrapTimeout)
                && matches!(change.action, Action::Delete | Action::Stop)
                && outcome.is_done();
            if !creates(change) && !bootstrap_failure {
                continue;
            }
            let Some(pool) = desired.pool(&change.pool) else {
                continue;
            };
            let name = change.instance.as_ref().map(|instance| instance.name.clone()).unwrap_or_default();
            let bootstrap = self.bootstrap.entry(change.pool.clone()).or_default();
            if bootstrap_failure {
                if bootstrap.counted.contains(&name) {
                    continue;
                }
                if bootstrap.counted.len() == REMEMBERED_REMOVALS {
                    bootstrap.counted.pop_front();
                }
                bootstrap.counted.push_back(name.clone());
                bootstrap.unproven.retain(|(unproven, _)| *unproven != name);
                bootstrap.failures = bootstrap.failures.saturating_add(1);
                tracing::warn!(pool = %change.pool, instance = %name, "agent never registered: counted as a failed create");
            }
            let proven_failures = bootstrap.failures;
            let circuit = self.circuits.entry(change.pool.clone()).or_insert(Circuit::Closed { failures: 0 });
            match outcome {
                Outcome::Done if !bootstrap_failure => {
                    if proven_failures > 0 {
                        // Proves nothing until its agent outlives the bootstrap timeout (see the module docs).
                        bootstrap.unproven.push((name, now));
                        if let Circuit::Closed { failures } = circuit {
                            *failures = proven_failures;
                        }
                        continue;
                    }
                    if !matches!(circuit, Circuit::Closed { .. }) {
                        tracing::info!(pool = %change.pool, "circuit closed: a create succeeded");
                    }
                    *circuit = Circuit::Closed { failures: 0 };
                }
                _ if bootstrap_failure
                    || matches!(outcome, Outcome::Failed { step, .. } if is_create_step(change.action, step)) =>
                {
                    let failures = match *circuit {
                        Circuit::Closed { failures }
                        | Circuit::Open { failures, .. }
                        | Circuit::HalfOpen { failures } => failures.saturating_add(1),
                    };
                    let threshold = pool.scale.breaker_threshold;
                    let trips = match *circuit {
                        Circuit::Closed { .. } => threshold > 0 && failures >= threshold,
                        // The trial failed (or, in an open circuit, a create let through before it opened).
                        Circuit::HalfOpen { .. } | Circuit::Open { .. } => true,
                    };
                    *circuit = if trips {
                        let until = now.saturating_add(pool.scale.breaker_cooldown.signed()).unwrap_or(now);
                        tracing::warn!(
                            pool = %change.pool,
                            failures,
                            retry_at = %clock_time(until),
                            "circuit open: {failures} failed creates in a row; no creates until {}",
                            clock_time(until)
                        );
                        Circuit::Open { failures, until }
                    } else {
                        Circuit::Closed { failures }
                    };
                }
                Outcome::Done | Outcome::Failed { .. } | Outcome::Skipped { .. } => {}
            }
        }
    }

    /// Pools whose circuit is open or half-open (not yet shown to work again).
    pub fn open_circuits(&self) -> BTreeSet<PoolName> {
        self.circuits
            .iter()
            .filter(|(_, circuit)| !matches!(circuit, Circuit::Closed { .. }))
            .map(|(pool, _)| pool.clone())
            .collect()
    }

    /// A reload may remove pools and backends: their state goes with them.
    fn forget_removed(&mut self, desired: &Desired) {
        self.buckets.retain(|name, _| desired.backends.contains_key(name));
        self.circuits.retain(|pool, _| desired.pool(pool).is_some());
        self.bootstrap.retain(|pool, _| desired.pool(pool).is_some());
    }

    /// Creates whose instance outlived the bootstrap timeout (plus a few poll intervals for its removal to be
    /// planned and done) without being removed for it: the agent registered, creating works. That clears the
    /// pool's bootstrap failures and closes a half-open circuit.
    fn prove_creates(&mut self, desired: &Desired, now: Timestamp) {
        for (pool_name, bootstrap) in &mut self.bootstrap {
            let Some(pool) = desired.pool(pool_name) else {
                continue;
            };
            let grace = desired.poll_interval.signed() * 3 + jiff::SignedDuration::from_mins(1);
            let proof = pool.scale.bootstrap_timeout.signed() + grace;
            let proven = bootstrap.unproven.iter().any(|(_, done)| now.duration_since(*done) >= proof);
            if !proven {
                continue;
            }
            bootstrap.unproven.clear();
            bootstrap.failures = 0;
            if let Some(circuit) = self.circuits.get_mut(pool_name) {
                if !matches!(circuit, Circuit::Closed { failures: 0 }) {
                    tracing::info!(pool = %pool_name, "circuit closed: a created agent registered");
                }
                *circuit = Circuit::Closed { failures: 0 };
            }
        }
    }
}

/// Changes that create an instance: a replace deletes and creates.
fn creates(change: &Change) -> bool {
    matches!(change.action, Action::Create | Action::Replace)
}

/// Whether a failed step says the backend could not create: a failure to register the agent or to delete the old
/// instance of a replace is not the breaker's business (the CI or another call failed, not creating).
fn is_create_step(action: Action, step: &str) -> bool {
    match action {
        Action::Create | Action::Replace => {
            matches!(
                step,
                "create instance" | "find existing instance" | "wait ready" | "push credential" | "start agent"
            )
        }
        _ => false,
    }
}

fn creates_text(count: u32) -> String {
    if count == 1 {
        "1 create".to_owned()
    } else {
        format!("{count} creates")
    }
}

/// `12:05:00 UTC`: the daemon's log and plan notes are read next to other UTC timestamps.
fn clock_time(at: Timestamp) -> String {
    at.strftime("%H:%M:%S UTC").to_string()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::{BackendKind, BackendSpec, Billing, CreateRate, FakeSpec};
    use crate::plan::{InstanceTarget, PoolStatus, Summary};

    const CONFIG: &str = r#"
id: t
ci: { sim: { kind: fake } }
backends:
  sim: { kind: fake }
  other: { kind: fake }
pools:
  - { name: a, ci: { source: sim }, backend: { name: sim }, scale: { max: 50 } }
  - { name: b, ci: { source: sim }, backend: { name: sim }, scale: { max: 50, breakerThreshold: 2, breakerCooldown: 1m } }
  - { name: c, ci: { source: sim }, backend: { name: other }, scale: { max: 50 } }
"#;

    fn desired(limit: Option<CreateLimit>) -> Desired {
        let mut desired = crate::config::load_str("t.yaml", CONFIG, &|_| None).expect("valid config");
        desired.backends.insert(
            BackendName::new("sim"),
            BackendSpec {
                kind: BackendKind::Fake(FakeSpec::default()),
                billing: Billing::PerSecond,
                create_limit: limit,
                change_timeout: None,
            },
        );
        desired
    }

    fn limit(count: u32, per_secs: u64, burst: u32) -> Option<CreateLimit> {
        Some(CreateLimit { rate: CreateRate { count, per: Duration::from_secs(per_secs) }, burst })
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + seconds).expect("valid")
    }

    fn change(pool: &str, action: Action, backend: &str, name: &str) -> Change {
        Change {
            pool: PoolName::new(pool),
            action,
            instance: Some(InstanceTarget { backend: BackendName::new(backend), id: None, name: name.to_owned() }),
            agent: None,
            reason: String::new(),
            cause: None,
            before: BTreeMap::new(),
            after: BTreeMap::new(),
        }
    }

    fn plan(changes: Vec<Change>) -> Plan {
        let mut summary = Summary::default();
        for change in &changes {
            match change.action {
                Action::Create => summary.create += 1,
                Action::Replace => {
                    summary.create += 1;
                    summary.delete += 1;
                }
                Action::Delete => summary.delete += 1,
                _ => {}
            }
        }
        let pools = ["a", "b", "c"]
            .into_iter()
            .map(|pool| PoolStatus {
                pool: PoolName::new(pool),
                pending_jobs: 0,
                running_jobs: 0,
                active: 0,
                busy: 0,
                idle: 0,
                desired: 0,
                window: None,
                notes: Vec::new(),
            })
            .collect();
        Plan {
            format_version: crate::plan::FORMAT_VERSION,
            ciscale_version: String::new(),
            config_hash: String::new(),
            observed_fingerprint: String::new(),
            planned_at: at(0),
            pools,
            changes,
            notes: Vec::new(),
            summary,
            cost: crate::plan::Cost::default(),
        }
    }

    fn creates_in(pool: &str, count: usize) -> Vec<Change> {
        (0..count).map(|index| change(pool, Action::Create, "sim", &format!("{pool}-{index}"))).collect()
    }

    fn names(changes: &[Change]) -> Vec<&str> {
        changes.iter().filter_map(|change| change.instance.as_ref().map(|i| i.name.as_str())).collect()
    }

    fn notes(plan: &Plan, pool: &str) -> Vec<String> {
        plan.pools
            .iter()
            .find(|status| status.pool.as_str() == pool)
            .map(|status| status.notes.clone())
            .unwrap_or_default()
    }

    fn failed(change: &Change) -> (Change, Outcome) {
        (change.clone(), Outcome::Failed { step: "create instance".to_owned(), error: "capacity".to_owned() })
    }

    #[test]
    fn create_rates_read_like_they_are_written() {
        let parse =
            |text: &str| text.parse::<CreateRate>().map(|rate| (rate.count, rate.per.as_secs(), rate.to_string()));
        assert_eq!(parse("10/m"), Ok((10, 60, "10/m".to_owned())));
        assert_eq!(parse("2/s"), Ok((2, 1, "2/s".to_owned())));
        assert_eq!(parse("100/h"), Ok((100, 3600, "100/h".to_owned())));
        assert_eq!(parse("1/30s"), Ok((1, 30, "1/30s".to_owned())));
        assert_eq!(parse(" 5 / min "), Ok((5, 60, "5/m".to_owned())));
        for bad in ["10", "0/m", "x/m", "10/0s", "10/fortnight", "-1/m"] {
            assert!(parse(bad).is_err(), "`{bad}` must be refused");
        }
    }

    #[test]
    fn without_limits_nothing_is_held_back() {
        let desired = desired(None);
        let mut throttle = Throttle::new();
        let mut plan = plan(creates_in("a", 20));
        let held = throttle.filter(&mut plan, &desired, at(0));
        assert!(held.changes.is_empty());
        assert_eq!(plan.changes.len(), 20);
        assert_eq!(plan.summary.create, 20);
        assert!(notes(&plan, "a").is_empty());
    }

    #[test]
    fn the_bucket_lets_the_burst_through_then_refills_at_the_rate() {
        // 10/m with a burst of 3: three at once, then one every 6 s.
        let desired = desired(limit(10, 60, 3));
        let mut throttle = Throttle::new();

        let mut first = plan(creates_in("a", 5));
        let held = throttle.filter(&mut first, &desired, at(0));
        assert_eq!(names(&first.changes), ["a-0", "a-1", "a-2"], "the first three in plan order");
        assert_eq!(names(&held.changes), ["a-3", "a-4"]);
        assert_eq!(first.summary.create, 3);
        assert_eq!(
            notes(&first, "a"),
            ["2 creates held back by backend `sim`'s create rate 10/m (burst 3); next create allowed in 6s"]
        );

        let mut early = plan(creates_in("a", 2));
        throttle.filter(&mut early, &desired, at(5));
        assert!(early.changes.is_empty(), "5 s earn less than one token");
        assert_eq!(
            notes(&early, "a"),
            ["2 creates held back by backend `sim`'s create rate 10/m (burst 3); next create allowed in 1s"]
        );

        let mut later = plan(creates_in("a", 2));
        throttle.filter(&mut later, &desired, at(13));
        assert_eq!(names(&later.changes), ["a-0", "a-1"], "13 s earn two tokens");

        let mut long_after = plan(creates_in("a", 10));
        throttle.filter(&mut long_after, &desired, at(3600));
        assert_eq!(long_after.changes.len(), 3, "a quiet hour refills only up to the burst");
    }

    #[test]
    fn the_bucket_is_per_backend_and_other_changes_pass() {
        let desired = desired(limit(1, 60, 1));
        let mut throttle = Throttle::new();
        let mut changes = creates_in("a", 2);
        changes.push(change("c", Action::Create, "other", "c-0"));
        changes.push(change("c", Action::Create, "other", "c-1"));
        changes.push(change("a", Action::Delete, "sim", "old"));
        let mut plan = plan(changes);
        let held = throttle.filter(&mut plan, &desired, at(0));
        assert_eq!(names(&plan.changes), ["a-0", "c-0", "c-1", "old"]);
        assert_eq!(names(&held.changes), ["a-1"]);
        assert_eq!((plan.summary.create, plan.summary.delete), (3, 1));
    }

    #[test]
    fn a_replace_takes_a_token_and_holding_it_back_keeps_the_old_instance() {
        let desired = desired(limit(1, 60, 1));
        let mut throttle = Throttle::new();
        let mut plan =
            plan(vec![change("a", Action::Replace, "sim", "r-0"), change("a", Action::Replace, "sim", "r-1")]);
        throttle.filter(&mut plan, &desired, at(0));
        assert_eq!(names(&plan.changes), ["r-0"]);
        assert_eq!((plan.summary.create, plan.summary.delete), (1, 1));
    }

    #[test]
    fn the_breaker_opens_after_the_threshold_then_tries_one_after_the_cooldown() {
        // Pool `b`: threshold 2, cool-down 1m.
        let desired = desired(None);
        let mut throttle = Throttle::new();
        let creates = creates_in("b", 3);

        throttle.record(&[failed(&creates[0])], &desired, at(0));
        assert!(throttle.open_circuits().is_empty(), "one failure is below the threshold");
        throttle.record(&[failed(&creates[1])], &desired, at(10));
        assert_eq!(throttle.open_circuits(), BTreeSet::from([PoolName::new("b")]));

        let mut open = plan(creates.clone());
        let held = throttle.filter(&mut open, &desired, at(30));
        assert!(open.changes.is_empty());
        assert_eq!(held.changes.len(), 3);
        let expected_retry = clock_time(at(70));
        assert_eq!(
            notes(&open, "b"),
            [format!(
                "circuit open after 2 failed creates in a row: 3 creates held back; retrying at {expected_retry}"
            )]
        );

        let mut half_open = plan(creates.clone());
        throttle.filter(&mut half_open, &desired, at(70));
        assert_eq!(names(&half_open.changes), ["b-0"], "one trial create");
        assert_eq!(
            notes(&half_open, "b"),
            ["circuit half-open after 2 failed creates in a row: trying 1 create, 2 creates held back"]
        );

        // The trial fails: open for another cool-down at once.
        throttle.record(&[failed(&half_open.changes[0])], &desired, at(75));
        let mut reopened = plan(creates.clone());
        throttle.filter(&mut reopened, &desired, at(100));
        assert!(reopened.changes.is_empty());
        assert!(notes(&reopened, "b")[0].contains("after 3 failed creates"), "{:?}", notes(&reopened, "b"));

        // The next trial succeeds: closed, every create goes again.
        let mut trial = plan(creates.clone());
        throttle.filter(&mut trial, &desired, at(135));
        assert_eq!(trial.changes.len(), 1);
        throttle.record(&[(trial.changes[0].clone(), Outcome::Done)], &desired, at(140));
        assert!(throttle.open_circuits().is_empty());
        let mut closed = plan(creates);
        throttle.filter(&mut closed, &desired, at(141));
        assert_eq!(closed.changes.len(), 3);
        assert!(notes(&closed, "b").is_empty());
    }

    #[test]
    fn a_success_resets_the_count_and_other_failures_do_not_count() {
        let desired = desired(None);
        let mut throttle = Throttle::new();
        let creates = creates_in("b", 1);
        throttle.record(&[failed(&creates[0])], &desired, at(0));
        throttle.record(&[(creates[0].clone(), Outcome::Done)], &desired, at(1));
        throttle.record(&[failed(&creates[0])], &desired, at(2));
        assert!(throttle.open_circuits().is_empty(), "failures must be in a row");

        let not_create_steps = [
            (creates[0].clone(), Outcome::Failed { step: "register agent".to_owned(), error: "ci down".to_owned() }),
            (creates[0].clone(), Outcome::Skipped { why: "apply was cancelled".to_owned() }),
            (
                change("b", Action::Delete, "sim", "x"),
                Outcome::Failed { step: "delete instance".to_owned(), error: "e".to_owned() },
            ),
        ];
        throttle.record(&not_create_steps, &desired, at(3));
        assert!(throttle.open_circuits().is_empty(), "only failed creates open the circuit");
    }

    #[test]
    fn the_default_threshold_is_five_and_zero_disables_the_breaker() {
        let mut desired = desired(None);
        let mut throttle = Throttle::new();
        let creates = creates_in("a", 5);
        let failures: Vec<_> = creates.iter().map(failed).collect();
        throttle.record(&failures[..4], &desired, at(0));
        assert!(throttle.open_circuits().is_empty());
        throttle.record(&failures[4..], &desired, at(0));
        assert_eq!(throttle.open_circuits(), BTreeSet::from([PoolName::new("a")]));

        desired.pools[0].scale.breaker_threshold = 0;
        let mut never = Throttle::new();
        never.record(&failures, &desired, at(0));
        never.record(&failures, &desired, at(0));
        assert!(never.open_circuits().is_empty());
    }

    fn bootstrap_removal(pool: &str, name: &str) -> (Change, Outcome) {
        let mut removal = change(pool, Action::Delete, "sim", name);
        removal.cause = Some(Cause::BootstrapTimeout);
        (removal, Outcome::Done)
    }

    #[test]
    fn agents_that_never_register_open_the_circuit_although_every_create_succeeds() {
        // Pool `b`: threshold 2, cool-down 1m, bootstrap timeout 10m (default); poll interval 10s (default).
        let desired = desired(None);
        let mut throttle = Throttle::new();
        let creates = creates_in("b", 3);
        // A broken image: each create is done, each instance is removed after its bootstrap timeout.
        throttle.record(&[(creates[0].clone(), Outcome::Done)], &desired, at(0));
        throttle.record(&[bootstrap_removal("b", "b-0")], &desired, at(610));
        // The same removal planned again (its delete was retried) counts once.
        throttle.record(&[bootstrap_removal("b", "b-0")], &desired, at(620));
        assert!(throttle.open_circuits().is_empty(), "one failure is below the threshold");
        throttle.record(&[(creates[1].clone(), Outcome::Done)], &desired, at(620));
        assert!(throttle.open_circuits().is_empty());
        throttle.record(&[bootstrap_removal("b", "b-1")], &desired, at(1230));
        assert_eq!(throttle.open_circuits(), BTreeSet::from([PoolName::new("b")]), "the done create did not reset");

        let mut open = plan(creates.clone());
        throttle.filter(&mut open, &desired, at(1240));
        assert!(open.changes.is_empty());
        assert!(notes(&open, "b")[0].starts_with("circuit open after 2 failed creates in a row"));

        // After the cool-down one trial goes; while its agent has not proven itself, no other create goes.
        let mut trial = plan(creates.clone());
        throttle.filter(&mut trial, &desired, at(1300));
        assert_eq!(names(&trial.changes), ["b-0"]);
        throttle.record(&[(trial.changes[0].clone(), Outcome::Done)], &desired, at(1301));
        let mut waiting = plan(creates.clone());
        throttle.filter(&mut waiting, &desired, at(1400));
        assert!(waiting.changes.is_empty(), "the trial's verdict is out");

        // It outlives its bootstrap timeout: creating works again.
        let mut proven = plan(creates.clone());
        throttle.filter(&mut proven, &desired, at(1301 + 600 + 30 + 60));
        assert_eq!(proven.changes.len(), 3);
        assert!(throttle.open_circuits().is_empty());
    }

    #[test]
    fn a_trial_whose_agent_never_registers_opens_the_circuit_again() {
        let desired = desired(None);
        let mut throttle = Throttle::new();
        throttle.record(&[bootstrap_removal("b", "b-7"), bootstrap_removal("b", "b-8")], &desired, at(0));
        let mut trial = plan(creates_in("b", 2));
        throttle.filter(&mut trial, &desired, at(60));
        assert_eq!(trial.changes.len(), 1);
        throttle.record(&[(trial.changes[0].clone(), Outcome::Done)], &desired, at(61));
        throttle.record(&[bootstrap_removal("b", "b-0")], &desired, at(700));
        let mut reopened = plan(creates_in("b", 2));
        throttle.filter(&mut reopened, &desired, at(701));
        assert!(reopened.changes.is_empty());
        assert!(notes(&reopened, "b")[0].contains("after 3 failed creates"), "{:?}", notes(&reopened, "b"));
    }

    #[test]
    fn an_open_circuit_does_not_spend_tokens() {
        let desired = desired(limit(1, 60, 1));
        let mut throttle = Throttle::new();
        let b = creates_in("b", 2);
        throttle.record(&[failed(&b[0]), failed(&b[1])], &desired, at(0));
        let mut mixed = plan(vec![b[0].clone(), change("a", Action::Create, "sim", "a-0")]);
        throttle.filter(&mut mixed, &desired, at(1));
        assert_eq!(names(&mixed.changes), ["a-0"], "`b` is held by its breaker, `a` gets the token");
    }

    #[test]
    fn a_reload_with_a_smaller_burst_keeps_what_was_spent() {
        let mut throttle = Throttle::new();
        let mut first = plan(creates_in("a", 2));
        throttle.filter(&mut first, &desired(limit(10, 60, 10)), at(0));
        assert_eq!(first.changes.len(), 2);
        let mut after_reload = plan(creates_in("a", 10));
        throttle.filter(&mut after_reload, &desired(limit(10, 60, 3)), at(0));
        assert_eq!(after_reload.changes.len(), 3, "the new burst caps the tokens left");
        let mut unlimited = plan(creates_in("a", 10));
        throttle.filter(&mut unlimited, &desired(None), at(0));
        assert_eq!(unlimited.changes.len(), 10, "removing the limit removes the bucket");
    }
}
