//! The executor: runs a [`Plan`]'s changes against the providers as lifecycle steps. It never re-plans and never
//! reads `reason`; it only does what each [`Change`] says.
//!
//! # Guarantees
//! - Every step is idempotent (create-if-absent, delete-if-present, `NotFound` on delete = done), so an apply
//!   killed at any await converges on the next run without duplicates.
//! - A failed step fails its change only; later changes on the same target are skipped (a failed drain must
//!   never be followed by a delete), every other change goes on.
//! - Changes on the same instance or agent run in plan order; the rest run concurrently, at most
//!   [`ApplyOptions::concurrency`] at once.
//! - On cancel no new change starts; those in flight finish.
//! - Secrets (tokens, `secret_env`) go into the pushed credential file or user data only: outcome texts and logs
//!   are redacted.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::model::{BackendKind, CiKind, Desired};
use crate::plan::{Change, Plan};
use crate::providers::Providers;

mod bootstrap;
mod cloud_init;
mod lifecycle;
pub mod retry;

pub use bootstrap::{
    bootstrap_env, BootstrapError, AGENT_COMMAND, AGENT_ID_ENV, CREDENTIAL_MODE, CREDENTIAL_PATH, TOKEN_ENV,
};
pub use bootstrap::agent_env_file;
pub use cloud_init::{
    cloud_init, CloudInitError, AGENT_CONTAINER, AGENT_ENV_PATH, DEFAULT_AGENT_IMAGE, METADATA_ADDRESS,
};

/// How apply runs. Defaults in brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Changes in flight at once [4]: enough to create a few agents in parallel, few enough for API rate limits.
    pub concurrency: usize,
    /// How long an instance may take to reach `running` [5m]: cloud servers boot in well under a minute; five
    /// covers a slow image pull without holding a broken create for ever.
    pub ready_timeout: Duration,
    /// Poll interval while waiting for an instance, and the base of retry backoff [2s].
    pub poll: Duration,
}

impl Default for ApplyOptions {
    fn default() -> Self {
        Self { concurrency: 4, ready_timeout: Duration::from_secs(5 * 60), poll: Duration::from_secs(2) }
    }
}

/// How one change ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "kebab-case")]
pub enum Outcome {
    Done,
    /// `step` failed (after retries); `error` is redacted.
    Failed { step: String, error: String },
    /// Not attempted.
    Skipped { why: String },
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

/// What a change's task tells the caller's task, which owns the (borrowed) [`Progress`].
enum Event {
    Start(usize),
    Step(usize, String),
    Finish(usize, Outcome),
    Created(usize, crate::model::InstanceId),
}

/// Runs the plan's changes. Never fails as a whole: every change gets an [`Outcome`]. `cancel` turning `true`
/// stops new changes from starting (they are [`Outcome::Skipped`]); changes in flight finish.
pub async fn apply(
    plan: &Plan,
    desired: &Desired,
    providers: &Providers,
    options: &ApplyOptions,
    progress: &dyn Progress,
    cancel: &watch::Receiver<bool>,
) -> ApplyReport {
    let shared = Arc::new(lifecycle::Shared {
        desired: desired.clone(),
        providers: providers.clone(),
        options: options.clone(),
        redactor: Redactor::from_desired(desired),
    });
    let semaphore = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let (events, mut received) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for group in same_target_groups(&plan.changes) {
        let changes: Vec<(usize, Change)> =
            group.into_iter().map(|index| (index, plan.changes[index].clone())).collect();
        tasks.spawn(run_in_order(shared.clone(), semaphore.clone(), cancel.clone(), events.clone(), changes));
    }
    drop(events);

    let mut outcomes: Vec<Option<Outcome>> = vec![None; plan.changes.len()];
    // The channel closes once every task has finished (or died): each holds a sender.
    while let Some(event) = received.recv().await {
        match event {
            Event::Start(index) => progress.start(&plan.changes[index]),
            Event::Step(index, step) => progress.step(&plan.changes[index], &step),
            Event::Created(index, instance) => progress.created(&plan.changes[index], &instance),
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
        .map(|(change, outcome)| {
            let outcome = outcome.unwrap_or_else(|| Outcome::Failed {
                step: "apply".to_owned(),
                error: "the change's task died unexpectedly (a bug: see the log)".to_owned(),
            });
            (change.clone(), outcome)
        })
        .collect();
    ApplyReport { outcomes }
}

/// Runs changes on one target one after the other. After a change that did not complete, the rest are skipped:
/// they were planned assuming it would (a delete after a failed drain could kill a busy agent).
async fn run_in_order(
    shared: Arc<lifecycle::Shared>,
    semaphore: Arc<Semaphore>,
    cancel: watch::Receiver<bool>,
    events: mpsc::UnboundedSender<Event>,
    changes: Vec<(usize, Change)>,
) {
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
        // The semaphore is never closed; should it be, running unthrottled beats not running.
        let permit = semaphore.acquire().await.ok();
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
            target = %lifecycle::target_name(&change),
        );
        let outcome = lifecycle::ChangeRun::new(&shared, &change, index, &events).run().instrument(span).await;
        drop(permit);
        if !outcome.is_done() {
            blocked_by = Some(change.action.verb().to_owned());
        }
        let _ = events.send(Event::Finish(index, outcome));
    }
}

/// Groups changes that touch the same instance (backend + name) or the same agent (CI + id), keeping plan order
/// within a group; groups are ordered by their first change.
fn same_target_groups(changes: &[Change]) -> Vec<Vec<usize>> {
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

/// Replaces every known secret value in a text with `***`: provider errors can echo what they were sent.
#[derive(Debug, Clone, Default)]
pub(crate) struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    fn from_desired(desired: &Desired) -> Self {
        let mut redactor = Self::default();
        for source in desired.ci.values() {
            match &source.kind {
                CiKind::Woodpecker { token, .. } => redactor.add(token.expose()),
                CiKind::AzurePipelines { pat, agent_pat, .. } => {
                    redactor.add(pat.expose());
                    if let Some(agent_pat) = agent_pat {
                        redactor.add(agent_pat.expose());
                    }
                }
                CiKind::Fake(_) => {}
            }
        }
        for backend in desired.backends.values() {
            if let BackendKind::Hcloud { token, .. } = &backend.kind {
                redactor.add(token.expose());
            }
        }
        for pool in &desired.pools {
            for secret in pool.agent.secret_env.values() {
                redactor.add(secret.expose());
            }
        }
        redactor
    }

    pub(crate) fn add(&mut self, secret: &str) {
        if !secret.is_empty() && !self.secrets.iter().any(|known| known == secret) {
            self.secrets.push(secret.to_owned());
            // Longest first, so a secret containing another is replaced whole.
            self.secrets.sort_by_key(|known| std::cmp::Reverse(known.len()));
        }
    }

    pub(crate) fn redact(&self, text: &str) -> String {
        self.secrets.iter().fold(text.to_owned(), |text, secret| text.replace(secret.as_str(), "***"))
    }
}
