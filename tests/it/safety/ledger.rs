//! The oracle in the end-to-end tests: every plan a `watch` makes is judged against a truth learned from the
//! deployment's own history, not from names.
//!
//! A [`Ledger`] reads the cycles in order (config, observation, plan). A record is this deployment's when it
//! first appears after one of its plans asked to create that name (apply registers the agent and creates the
//! instance under the change's name); everything else — records present before the first cycle, records a person
//! or another deployment made — is foreign. Which agent runs on which
//! instance comes from the same creates (and from the config for pre-registered and adopted agents); busy is what
//! the CI reports. What the ledger cannot know is a listing that lags or a create still in flight, so `max` is
//! judged on what is listed: weaker than the generated worlds, but every plan of every end-to-end run is judged.
//!
//! Two ways in: in-process loops pass [`inspector`] in `WatchOptions::inspect`; `ciscale watch` processes write
//! each cycle to the file named by `CISCALE_PLAN_TRACE` ([`PlanTrace`]), judged by [`assert_trace_safe`] — one
//! file per test, so processes restarted within a test share one history.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use ciscale::model::{AgentRef, Desired, InstanceMode, Observed, PoolName};
use ciscale::plan::{Action, Plan};
use ciscale::watch::PlanInspector;

use super::oracle::{
    self, AgentKey, AgentOwner, InstanceKey, InstanceOwner, TrueAgent, TrueInstance, Truth, Violation,
};

/// The environment variable `ciscale watch` reads to write its cycles (see `src/cmd/watch.rs`).
pub const TRACE_ENV: &str = "CISCALE_PLAN_TRACE";

#[derive(Debug, Default)]
pub struct Ledger {
    /// Names this deployment's plans asked to create, with the pool (unknown for names declared by the test):
    /// records that appear under them are its own.
    asked: BTreeMap<String, Option<PoolName>>,
    /// Per pre-registered agent: the name of the instance its latest create put it on.
    preregistered_on: BTreeMap<AgentKey, String>,
    instances: BTreeMap<InstanceKey, bool>,
    agents: BTreeMap<AgentKey, bool>,
    cycles: usize,
    violations: Vec<(usize, Violation)>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Names this deployment gave records outside the traced cycles (a `ciscale apply` the test ran, killed half-way):
    /// records under them count as its own, as if a traced plan had asked for them.
    pub fn declare_ours(&mut self, names: impl IntoIterator<Item = String>) {
        for name in names {
            self.asked.entry(name).or_insert(None);
        }
    }

    /// Learns from one cycle's observation, judges its plan, then remembers what the plan asks to create.
    pub fn record(&mut self, desired: &Desired, observed: &Observed, plan: &Plan) {
        self.cycles += 1;
        for (backend, observation) in &observed.backends {
            for instance in &observation.instances {
                let key = (backend.clone(), instance.id.clone());
                let asked = self.asked.contains_key(&instance.name);
                self.instances.entry(key).or_insert(asked);
            }
        }
        for (ci, observation) in &observed.ci {
            for agent in &observation.agents {
                let key = (ci.clone(), agent.id.clone());
                let asked = self.asked.contains_key(&agent.name);
                self.agents.entry(key).or_insert(asked);
            }
        }
        let truth = self.truth(desired, observed);
        let cycle = self.cycles;
        self.violations.extend(oracle::check(desired, plan, &truth).into_iter().map(|violation| (cycle, violation)));
        for change in &plan.changes {
            if !matches!(change.action, Action::Create | Action::Replace) {
                continue;
            }
            let Some(target) = &change.instance else { continue };
            self.asked.insert(target.name.clone(), Some(change.pool.clone()));
            let preregistered = desired.pool(&change.pool).is_some_and(|pool| pool.agent.preregistered.is_some());
            if let (true, Some(agent)) = (preregistered, &change.agent) {
                self.preregistered_on.insert((agent.ci.clone(), agent.id.clone()), target.name.clone());
            }
        }
    }

    fn truth(&self, desired: &Desired, observed: &Observed) -> Truth {
        let adopted: BTreeMap<_, _> = desired
            .pools
            .iter()
            .flat_map(|pool| match &pool.backend.mode {
                InstanceMode::StartStop { instances } => instances
                    .iter()
                    .map(|adopted| ((pool.backend.backend.clone(), adopted.id.clone()), (pool.name.clone(), adopted)))
                    .collect::<Vec<_>>(),
                InstanceMode::Create => Vec::new(),
            })
            .collect();
        let mut instances = BTreeMap::new();
        // Instance name → key, for the instances this deployment made (its agents run on them).
        let mut ours_by_name: BTreeMap<&str, InstanceKey> = BTreeMap::new();
        for (backend, observation) in &observed.backends {
            for instance in &observation.instances {
                let key = (backend.clone(), instance.id.clone());
                let (owner, pool) = if self.instances.get(&key).copied().unwrap_or(false) {
                    ours_by_name.insert(&instance.name, key.clone());
                    (
                        InstanceOwner::Created,
                        self.asked.get(&instance.name).cloned().flatten().or_else(|| instance.pool()),
                    )
                } else if let Some((pool, _)) = adopted.get(&key) {
                    (InstanceOwner::Adopted, Some(pool.clone()))
                } else {
                    (InstanceOwner::Foreign, None)
                };
                instances.insert(key, TrueInstance { name: instance.name.clone(), state: instance.state, owner, pool });
            }
        }
        let mut agents = BTreeMap::new();
        for (ci, observation) in &observed.ci {
            for agent in &observation.agents {
                let key = (ci.clone(), agent.id.clone());
                let refers = |reference: &AgentRef| match reference {
                    AgentRef::Id(id) => *id == agent.id,
                    AgentRef::Name(name) => *name == agent.name,
                };
                let preregistered = desired
                    .pools
                    .iter()
                    .any(|pool| &pool.ci.source == ci && pool.agent.preregistered.as_ref().is_some_and(refers));
                let adopted_host = adopted.iter().find_map(|(host, (_, adoption))| {
                    let named = match &adoption.agent {
                        Some(reference) => refers(reference),
                        None => instances.get(host).is_some_and(|instance: &TrueInstance| instance.name == agent.name),
                    };
                    named.then(|| host.clone())
                });
                let registered = self.agents.get(&key).copied().unwrap_or(false);
                let owner = if registered {
                    AgentOwner::Registered
                } else if preregistered || adopted_host.is_some() {
                    AgentOwner::Named
                } else {
                    AgentOwner::Foreign
                };
                let runs_on = if registered {
                    ours_by_name.get(agent.name.as_str()).cloned()
                } else if preregistered {
                    self.preregistered_on.get(&key).and_then(|name| ours_by_name.get(name.as_str()).cloned())
                } else {
                    adopted_host
                };
                let busy = agent.busy
                    || observation.queue.running.iter().any(|task| task.agent_id.as_ref() == Some(&agent.id));
                agents.insert(key, TrueAgent { name: agent.name.clone(), owner, busy, runs_on });
            }
        }
        Truth { instances, agents, creates_in_flight: BTreeMap::new() }
    }

    /// Remembers what a plan asks to create without judging it (a cycle made from a config the test did not give).
    pub fn learn(&mut self, plan: &Plan) {
        for change in plan.changes.iter().filter(|change| matches!(change.action, Action::Create | Action::Replace)) {
            if let Some(target) = &change.instance {
                self.asked.insert(target.name.clone(), Some(change.pool.clone()));
            }
        }
    }

    /// Fails the test with every violation seen, by cycle.
    pub fn assert_safe(&self) {
        if !self.violations.is_empty() {
            let list: Vec<String> =
                self.violations.iter().map(|(cycle, violation)| format!("  cycle {cycle}: {violation}")).collect();
            panic!("plans made during this run broke safety promises:\n{}", list.join("\n"));
        }
    }
}

/// A ledger fed by an in-process `watch` loop: pass the inspector in `WatchOptions::inspect`, call
/// [`Ledger::assert_safe`] on the ledger when the loop is done.
pub fn inspector() -> (PlanInspector, Arc<Mutex<Ledger>>) {
    let ledger = Arc::new(Mutex::new(Ledger::new()));
    let shared = Arc::clone(&ledger);
    let inspector = PlanInspector::new(move |desired: &Desired, observed: &Observed, plan: &Plan| {
        // A poisoned lock means an earlier record panicked: that panic already fails the test.
        if let Ok(mut ledger) = shared.lock() {
            ledger.record(desired, observed, plan);
        }
    });
    (inspector, ledger)
}

/// One line of a `CISCALE_PLAN_TRACE` file.
#[derive(serde::Deserialize)]
struct TraceLine {
    config_hash: String,
    observed: Observed,
    plan: Plan,
}

/// Judges every cycle traced in `path` (written by every `watch` process of one test, in order) with the config
/// it was made from, found among `configs` by config hash. A cycle made from a config not given (the test
/// reloaded another one) is learned from but not judged; a torn line is skipped. Fails the test on a broken promise, or when no cycle
/// could be judged (the test would judge nothing). Returns the number of cycles judged.
pub fn assert_trace_safe(path: &Path, configs: &[Desired], declared: &[String]) -> usize {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("no plan trace at {}: {error}", path.display()));
    let mut ledger = Ledger::new();
    ledger.declare_ours(declared.iter().cloned());
    let (mut judged, mut torn) = (0, 0);
    for line in text.lines().filter(|line| !line.trim().is_empty()) {
        // A process killed while writing leaves a torn line (the next process ends it). Skipping it loses nothing:
        // that cycle was killed between its plan and its apply, so it made nothing.
        let Ok(traced) = serde_json::from_str::<TraceLine>(line) else {
            torn += 1;
            continue;
        };
        match configs.iter().find(|desired| desired.config_hash == traced.config_hash) {
            Some(desired) => {
                ledger.record(desired, &traced.observed, &traced.plan);
                judged += 1;
            }
            None => ledger.learn(&traced.plan),
        }
    }
    assert!(judged > 0, "{}: no cycle made from the test's config: watch never planned with it", path.display());
    ledger.assert_safe();
    eprintln!("safety oracle: {judged} traced cycles judged, {torn} torn lines skipped ({})", path.display());
    judged
}

/// The plan trace of the `ciscale watch` processes a test sandbox starts: [`PlanTrace::env`] on each command,
/// and when the sandbox goes away (a field declared before the sandbox's temporary directory, so it drops first)
/// every traced cycle is judged with the config it was made from: the sandbox's config file as it is then, or one
/// it held before ([`PlanTrace::remember`], for tests that rewrite it). Nothing is judged when no `watch` planned,
/// or when the test is failing already.
#[derive(Debug)]
pub struct PlanTrace {
    path: PathBuf,
    config: PathBuf,
    earlier: std::sync::Mutex<Vec<Desired>>,
    declared: std::sync::Mutex<Vec<String>>,
    secrets: Vec<String>,
}

impl PlanTrace {
    pub fn new(dir: &Path, config: PathBuf) -> Self {
        Self {
            path: dir.join("plan-trace.jsonl"),
            config,
            earlier: Default::default(),
            declared: Default::default(),
            secrets: Vec::new(),
        }
    }

    /// Secrets the test hands to ciscale: the trace must hold none of them.
    pub fn forbid(mut self, secrets: &[&str]) -> Self {
        self.secrets.extend(secrets.iter().map(|secret| (*secret).to_owned()));
        self
    }

    pub fn env(&self, command: &mut std::process::Command) {
        command.env(TRACE_ENV, &self.path);
    }

    /// See [`Ledger::declare_ours`].
    pub fn declare_ours(&self, names: impl IntoIterator<Item = String>) {
        self.declared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(names);
    }

    /// Keeps the config file's current content (when it is valid) for judging the cycles made from it.
    pub fn remember(&self) {
        if let Some(desired) = try_load_config(&self.config) {
            self.earlier.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(desired);
        }
    }
}

impl Drop for PlanTrace {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        // No `watch` ran, or none got as far as a plan (a config or observation error).
        let traced = std::fs::read_to_string(&self.path).unwrap_or_default();
        if traced.trim().is_empty() {
            return;
        }
        for secret in &self.secrets {
            assert!(!traced.contains(secret.as_str()), "a secret is in the plan trace {}", self.path.display());
        }
        let mut configs = std::mem::take(&mut *self.earlier.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
        configs.extend(try_load_config(&self.config));
        let declared = self.declared.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        assert_trace_safe(&self.path, &configs, &declared);
    }
}

/// Loads a test's config file the way `ciscale` does, with every `${VAR}` resolved to a placeholder (secrets play
/// no part in the promises or in the config hash); `None` when it does not load.
fn try_load_config(path: &Path) -> Option<Desired> {
    let text = std::fs::read_to_string(path).ok()?;
    ciscale::config::load_str(&path.display().to_string(), &text, &|_| Some("placeholder".to_owned())).ok()
}
