//! The executor: runs a [`Plan`]'s changes against the providers as lifecycle steps. It never re-plans and never
//! reads `reason`; it only does what each [`Change`] says.
//!
//! The machinery is shared by `apply` (one shot: [`apply`] starts every change and waits for all of them) and
//! `watch` (its changes outlive the cycle that planned them: it starts them through an [`Executor`] and takes
//! their [`Event`]s as they come).
//!
//! # Guarantees
//! - Every step is idempotent (create-if-absent, delete-if-present, `NotFound` on delete = done), so an apply
//!   killed at any await converges on the next run without duplicates.
//! - A failed step fails its change only; later changes on the same target are skipped (a failed drain must
//!   never be followed by a delete), every other change goes on.
//! - Changes on the same instance or agent run in plan order ([`same_target_groups`]); the rest run concurrently.
//! - Concurrency is limited per provider account, never globally, so one slow account cannot hold up another:
//!   changes that call a backend (create, start, stop, delete, replace) take one of its slots
//!   ([`default_concurrency`] by kind, or [`ApplyOptions::concurrency`]), changes that call only a CI source
//!   (drain, deregister) one of its [`ApplyOptions::ci_concurrency`] slots, each for as long as the change runs.
//! - Every change has a deadline ([`change_deadline`]: the backend's `changeTimeout`, else a default for its
//!   kind), counted from the moment it has its slot. A change still running then is abandoned: its future is
//!   dropped (steps are cancel-safe), it fails with the step it was in, and the next plan decides from what is
//!   observed.
//! - On cancel no new change starts; those in flight finish (each within its deadline).
//! - Secrets (tokens, `secret_env`) go into the pushed credential file or user data only: outcome texts and logs
//!   are redacted.

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::model::{AgentId, BackendKind, BackendName, CiName, Desired, GoDuration, InstanceId};
use crate::plan::{Action, Change, Plan};
use crate::providers::Providers;
pub(crate) use crate::redact::Redactor;

mod bootstrap;
mod cloud_init;
mod lifecycle;
pub mod retry;

pub use bootstrap::agent_env_file;
pub use bootstrap::{
    bootstrap_env, BootstrapError, AGENT_COMMAND, AGENT_ID_ENV, CREDENTIAL_MODE, CREDENTIAL_PATH, TOKEN_ENV,
};
pub use cloud_init::{
    cloud_init, CloudInitError, AGENT_CONTAINER, AGENT_ENV_PATH, DEFAULT_AGENT_IMAGE, METADATA_ADDRESS,
};

/// How apply runs. Defaults in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Changes calling one backend account at once; `0` [the default]: [`default_concurrency`] of the
    /// backend's kind. Per account, so creates that hang on one cloud never hold up another.
    pub concurrency: usize,
    /// Changes that call only a CI source (drain, deregister) running at once per source [4]. A create's agent
    /// registration is one short call made inside its backend's slot.
    pub ci_concurrency: usize,
    /// How long an instance may take to reach `running` [5m]: cloud servers boot in well under a minute; five
    /// covers a slow image pull without holding a broken create for ever. The change's deadline caps it.
    pub ready_timeout: Duration,
    /// Poll interval while waiting for an instance [500ms], and the base of retry backoff up to
    /// [`retry::MAX_RETRY_BASE`] (100 ms: retries after 0.1 s, 0.2 s, 0.4 s; see there).
    pub poll: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self {
            concurrency: 0,
            ci_concurrency: 4,
            ready_timeout: Duration::from_secs(5 * 60),
            poll: Duration::from_millis(500),
        }
    }
}

/// Changes calling one backend account at once, by its kind (unless [`ApplyOptions::concurrency`] says):
///
/// - `hcloud`, `aws` [4]: enough to create a few servers in parallel, few enough for the APIs' rate limits
///   (Hetzner: 3600 requests/hour/project; EC2 throttles mutating calls per account).
/// - `incus` [8]: a local daemon with no rate limit, whose creates take a fraction of a second each.
/// - `fake` [16]: an in-memory (or local file) world; only tests and trials use it.
pub fn default_concurrency(kind: &BackendKind) -> usize {
    match kind {
        BackendKind::Hcloud { .. } | BackendKind::Aws { .. } => 4,
        BackendKind::Incus { .. } => 8,
        BackendKind::Fake(_) => 16,
    }
}

/// The deadline of a change on a backend of this kind when its config sets no `changeTimeout`.
///
/// - `hcloud`, `aws` [5m]: a create is a few API calls (the boot is not waited for: the agent starts from user
///   data), but capacity fallback walks several types and locations and each call may be retried with backoff.
/// - `incus` [3m]: a local daemon that starts a container in well under a second; the create waits for the
///   start, the credential push and the agent's exec. Minutes mean it hangs.
/// - `fake` [1m]: in memory or a local file.
pub fn default_change_timeout(kind: &BackendKind) -> Duration {
    match kind {
        BackendKind::Hcloud { .. } | BackendKind::Aws { .. } => Duration::from_secs(5 * 60),
        BackendKind::Incus { .. } => Duration::from_secs(3 * 60),
        BackendKind::Fake(_) => Duration::from_secs(60),
    }
}

/// The deadline of a change that calls only a CI source (drain, deregister): one or two short API calls, with
/// their retries [2m].
pub const CI_CHANGE_TIMEOUT: Duration = Duration::from_secs(2 * 60);

/// How long `change` may run once it has its slot: its backend's `changeTimeout`, else the default for the
/// backend's kind ([`default_change_timeout`]); [`CI_CHANGE_TIMEOUT`] for a change that calls only a CI source
/// or names a backend the config does not have (it fails at once anyway).
pub fn change_deadline(change: &Change, desired: &Desired) -> Duration {
    match slot_of(change) {
        Slot::Backend(name) => desired.backends.get(&name).map_or(CI_CHANGE_TIMEOUT, |spec| {
            spec.change_timeout.map_or_else(|| default_change_timeout(&spec.kind), |timeout| timeout.0)
        }),
        Slot::Ci(_) | Slot::None => CI_CHANGE_TIMEOUT,
    }
}

/// Whose concurrency limit a change counts against.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    /// It calls this backend account (and maybe, briefly, a CI source).
    Backend(BackendName),
    /// It calls only this CI source.
    Ci(CiName),
    /// It names no provider (a malformed change, which fails at once).
    None,
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Slot::Backend(name) => write!(f, "backend `{name}`"),
            Slot::Ci(name) => write!(f, "ci source `{name}`"),
            Slot::None => f.write_str("no provider"),
        }
    }
}

/// The slot a change takes: drains and deregisters call only the CI; everything else calls the instance's
/// backend.
pub fn slot_of(change: &Change) -> Slot {
    let ci_only = matches!(change.action, Action::Drain | Action::Deregister);
    match (&change.instance, &change.agent) {
        (_, Some(agent)) if ci_only => Slot::Ci(agent.ci.clone()),
        (Some(instance), _) => Slot::Backend(instance.backend.clone()),
        (None, Some(agent)) => Slot::Ci(agent.ci.clone()),
        (None, None) => Slot::None,
    }
}

/// How one change ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    Done,
    /// `step` failed (after retries); `error` is redacted.
    Failed {
        step: String,
        error: String,
    },
    /// Not attempted.
    Skipped {
        why: String,
    },
}

impl Outcome {
    pub fn is_done(&self) -> bool {
        matches!(self, Outcome::Done)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Done => f.write_str("done"),
            Outcome::Failed { step, error } => write!(f, "failed to {step}: {error}"),
            Outcome::Skipped { why } => write!(f, "skipped: {why}"),
        }
    }
}

/// Where apply reports what it does (progress bars, JSON lines, nothing). Called from the task that called
/// [`apply`], one call at a time.
pub trait Progress: Send + Sync {
    fn start(&self, change: &Change);
    /// A step of the change begins (`register agent`, `create instance`, `wait ready`, ...).
    fn step(&self, change: &Change, step: &str);
    fn finish(&self, change: &Change, outcome: &Outcome);
    /// A create made its instance (before the change finishes): its provider-side id, for the line a user keeps.
    fn created(&self, _change: &Change, _instance: &crate::model::InstanceId) {}
}

/// Reports nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _change: &Change) {}
    fn step(&self, _change: &Change, _step: &str) {}
    fn finish(&self, _change: &Change, _outcome: &Outcome) {}
}

/// Every change of the plan with its outcome, in plan order.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyReport {
    pub outcomes: Vec<(Change, Outcome)>,
}

impl ApplyReport {
    pub fn failed(&self) -> usize {
        self.count(|outcome| matches!(outcome, Outcome::Failed { .. }))
    }
    pub fn succeeded(&self) -> usize {
        self.count(Outcome::is_done)
    }
    pub fn skipped(&self) -> usize {
        self.count(|outcome| matches!(outcome, Outcome::Skipped { .. }))
    }
    /// Every change done.
    pub fn is_success(&self) -> bool {
        self.succeeded() == self.outcomes.len()
    }
    fn count(&self, keep: impl Fn(&Outcome) -> bool) -> usize {
        self.outcomes.iter().filter(|(_, outcome)| keep(outcome)).count()
    }
}

/// What a change's task reports, in this order per change: `Start`, any number of `Step`s and `Learned`s, then
/// exactly one `Finish` (a change skipped without starting reports only its `Finish`). The `usize` is the index
/// the caller gave the change.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Start(usize),
    /// A step of the change begins (`register agent`, `create instance`, `wait ready`, ...).
    Step(usize, String),
    /// An id the change learned on the way (its new agent's, its new instance's).
    Learned(usize, Learned),
    Finish(usize, Outcome),
}

/// Ids a change learns while it runs, so work in flight can be matched with what the next observation lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Learned {
    Agent(AgentId),
    Instance(InstanceId),
}

/// Runs changes as tasks, within the slots and deadlines of the module docs. Cheap to clone; clones share the
/// slots, so everything started through one executor counts against the same limits.
#[derive(Clone)]
pub struct Executor {
    shared: Arc<lifecycle::Shared>,
    slots: Arc<BTreeMap<Slot, Arc<Semaphore>>>,
}

impl fmt::Debug for Executor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let free: BTreeMap<String, usize> =
            self.slots.iter().map(|(slot, limit)| (slot.to_string(), limit.available_permits())).collect();
        f.debug_struct("Executor").field("free_slots", &free).finish_non_exhaustive()
    }
}

impl Executor {
    pub fn new(desired: &Desired, providers: &Providers, options: &ApplyOptions) -> Self {
        let mut slots = BTreeMap::new();
        for name in desired.backends.keys().chain(providers.backends.keys()) {
            let size = match (options.concurrency, desired.backends.get(name)) {
                (0, Some(spec)) => default_concurrency(&spec.kind),
                // A backend the config does not name runs only changes that fail at once.
                (0, None) => 1,
                (set, _) => set,
            };
            slots.entry(Slot::Backend(name.clone())).or_insert_with(|| Arc::new(Semaphore::new(size)));
        }
        for name in desired.ci.keys().chain(providers.ci.keys()) {
            slots
                .entry(Slot::Ci(name.clone()))
                .or_insert_with(|| Arc::new(Semaphore::new(options.ci_concurrency.max(1))));
        }
        let shared = Arc::new(lifecycle::Shared {
            desired: desired.clone(),
            providers: providers.clone(),
            options: options.clone(),
            redactor: Redactor::from_desired(desired),
        });
        Self { shared, slots: Arc::new(slots) }
    }

    /// The config the executor runs changes for.
    pub fn desired(&self) -> &Desired {
        &self.shared.desired
    }

    /// A slot for `change` if one is free now: `watch` starts only what can run at once and plans the rest
    /// again. `Ok(None)`: the change needs no slot (it names no provider and fails at once); `Err`: the slot
    /// that is full.
    pub fn try_slot(&self, change: &Change) -> Result<Option<OwnedSemaphorePermit>, Slot> {
        let slot = slot_of(change);
        match self.slots.get(&slot) {
            Some(limit) => limit.clone().try_acquire_owned().map(Some).map_err(|_| slot),
            None => Ok(None),
        }
    }

    /// The task that runs one target's changes in plan order ([`same_target_groups`]); spawn it. `first_slot`
    /// is a slot already taken for the first change ([`Executor::try_slot`]); without one the task waits for
    /// it. Dropping the task abandons its changes (every step is cancel-safe).
    pub fn run_group(
        &self,
        changes: Vec<(usize, Change)>,
        first_slot: Option<OwnedSemaphorePermit>,
        cancel: watch::Receiver<bool>,
        events: mpsc::UnboundedSender<Event>,
    ) -> impl Future<Output = ()> + Send + 'static {
        run_in_order(self.clone(), changes, first_slot, cancel, events)
    }

    async fn slot(&self, change: &Change) -> Option<OwnedSemaphorePermit> {
        let limit = self.slots.get(&slot_of(change))?.clone();
        // The semaphores are never closed; should one be, running unlimited beats not running.
        limit.acquire_owned().await.ok()
    }
}

/// Runs the plan's changes and waits for all of them. Never fails as a whole: every change gets an [`Outcome`].
/// `cancel` turning `true` stops new changes from starting (they are [`Outcome::Skipped`]); changes in flight
/// finish.
pub async fn apply(
    plan: &Plan,
    desired: &Desired,
    providers: &Providers,
    options: &ApplyOptions,
    progress: &dyn Progress,
    cancel: &watch::Receiver<bool>,
) -> ApplyReport {
    let executor = Executor::new(desired, providers, options);
    let (events, mut received) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for group in same_target_groups(&plan.changes) {
        let changes: Vec<(usize, Change)> =
            group.into_iter().map(|index| (index, plan.changes[index].clone())).collect();
        tasks.spawn(executor.run_group(changes, None, cancel.clone(), events.clone()));
    }
    drop(events);

    let mut outcomes: Vec<Option<Outcome>> = vec![None; plan.changes.len()];
    // The channel closes once every task has finished (or died): each holds a sender.
    while let Some(event) = received.recv().await {
        match event {
            Event::Start(index) => progress.start(&plan.changes[index]),
            Event::Step(index, step) => progress.step(&plan.changes[index], &step),
            Event::Learned(index, Learned::Instance(instance)) => progress.created(&plan.changes[index], &instance),
            Event::Learned(_, Learned::Agent(_)) => {}
            Event::Finish(index, outcome) => {
                progress.finish(&plan.changes[index], &outcome);
                outcomes[index] = Some(outcome);
            }
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(error) = joined {
            tracing::error!(%error, "an apply task died");
        }
    }

    let outcomes = plan
        .changes
        .iter()
        .zip(outcomes)
        .map(|(change, outcome)| (change.clone(), outcome.unwrap_or_else(task_died)))
        .collect();
    ApplyReport { outcomes }
}

/// The outcome of a change whose task ended without reporting one (it panicked).
pub fn task_died() -> Outcome {
    Outcome::Failed {
        step: "apply".to_owned(),
        error: "the change's task died unexpectedly (a bug: see the log)".to_owned(),
    }
}

/// Runs changes on one target one after the other. After a change that did not complete, the rest are skipped:
/// they were planned assuming it would (a delete after a failed drain could kill a busy agent).
async fn run_in_order(
    executor: Executor,
    changes: Vec<(usize, Change)>,
    mut first_slot: Option<OwnedSemaphorePermit>,
    cancel: watch::Receiver<bool>,
    events: mpsc::UnboundedSender<Event>,
) {
    let shared = &executor.shared;
    let mut blocked_by: Option<String> = None;
    for (index, change) in changes {
        let skip = |why: String| {
            let _ = events.send(Event::Finish(index, Outcome::Skipped { why }));
        };
        if let Some(earlier) = &blocked_by {
            skip(format!("the earlier {earlier} of the same target did not complete"));
            continue;
        }
        if *cancel.borrow() {
            skip("apply was cancelled".to_owned());
            blocked_by = Some(change.action.verb().to_owned());
            continue;
        }
        let slot = match first_slot.take() {
            Some(taken) => Some(taken),
            None => executor.slot(&change).await,
        };
        // Cancelled while waiting for a slot: still not started, so do not start.
        if *cancel.borrow() {
            skip("apply was cancelled".to_owned());
            blocked_by = Some(change.action.verb().to_owned());
            continue;
        }
        let _ = events.send(Event::Start(index));
        let span = tracing::info_span!(
            "change",
            index,
            pool = %change.pool,
            action = %change.action,
            target = %change.target_name(),
        );
        let deadline = change_deadline(&change, &shared.desired);
        let step = Mutex::new(String::from("start"));
        let run = lifecycle::ChangeRun::new(shared, &change, index, &events, &step).run().instrument(span.clone());
        let outcome = match tokio::time::timeout(deadline, run).await {
            Ok(outcome) => outcome,
            Err(_) => {
                let step = step.lock().map(|step| step.clone()).unwrap_or_default();
                span.in_scope(|| {
                    tracing::warn!(step = %step, deadline = %GoDuration(deadline), "change abandoned at its deadline");
                });
                Outcome::Failed { error: abandoned_text(&step, deadline), step }
            }
        };
        drop(slot);
        if !outcome.is_done() {
            blocked_by = Some(change.action.verb().to_owned());
        }
        let _ = events.send(Event::Finish(index, outcome));
    }
}

/// Starts every abandoned change's error: `watch` reports abandoned work by it.
pub const ABANDONED: &str = "abandoned after its deadline";

fn abandoned_text(step: &str, deadline: Duration) -> String {
    format!(
        "{ABANDONED} of {} while in `{step}`\nhint: the next cycle decides again from what it observes; raise the \
         backend's `changeTimeout` if the provider is only slow",
        GoDuration(deadline)
    )
}

/// Groups changes that touch the same instance (backend + name) or the same agent (CI + id), keeping plan order
/// within a group; groups are ordered by their first change.
pub fn same_target_groups(changes: &[Change]) -> Vec<Vec<usize>> {
    let keys = |change: &Change| {
        let mut keys = Vec::new();
        if let Some(instance) = &change.instance {
            keys.push(format!("instance\0{}\0{}", instance.backend, instance.name));
            if let Some(id) = &instance.id {
                keys.push(format!("instance-id\0{}\0{}", instance.backend, id));
            }
        }
        if let Some(agent) = &change.agent {
            keys.push(format!("agent\0{}\0{}", agent.ci, agent.id));
        }
        keys
    };
    let mut groups: Vec<(Vec<String>, Vec<usize>)> = Vec::new();
    for (index, change) in changes.iter().enumerate() {
        let change_keys = keys(change);
        let mut merged_keys = change_keys.clone();
        let mut merged_members = vec![index];
        // Merge every group this change shares a key with (a change can bridge two groups).
        let mut kept = Vec::with_capacity(groups.len());
        for (group_keys, members) in groups {
            if group_keys.iter().any(|key| change_keys.contains(key)) {
                merged_keys.extend(group_keys);
                merged_members.extend(members);
            } else {
                kept.push((group_keys, members));
            }
        }
        merged_members.sort_unstable();
        kept.push((merged_keys, merged_members));
        groups = kept;
    }
    let mut groups: Vec<Vec<usize>> = groups.into_iter().map(|(_, members)| members).collect();
    groups.sort_by_key(|members| members.first().copied());
    groups
}
