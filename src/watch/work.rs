//! Work in flight: the changes `watch` started, which outlive the cycle that planned them (kube-runtime's
//! controller shape: each target reconciles on its own, the loop never waits for one).
//!
//! A [`WorkSet`] starts changes through the executor ([`crate::apply::Executor`]: a slot per backend account or
//! CI source, a deadline per change), knows what is in flight (for the next plan,
//! [`Observed::in_flight`](crate::model::Observed::in_flight)) and hands each finished change back to the loop
//! ([`WorkSet::next_finished`]), which is what wakes it. Dropping the set abandons whatever is still running:
//! every step is cancel-safe, and the next run converges.

use std::collections::{BTreeMap, VecDeque};

use jiff::Timestamp;
use tokio::sync::{mpsc, watch};
use tokio::task::{Id, JoinSet};

use crate::apply::{self, Event, Executor, Learned, Outcome, Slot};
pub use crate::model::InFlight;
use crate::plan::{AgentTarget, Change};

/// A change that ended: done, failed, skipped, or abandoned at its deadline (a failure whose error starts with
/// [`apply::ABANDONED`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Finished {
    pub change: Change,
    pub outcome: Outcome,
    pub since: Timestamp,
}

impl Finished {
    pub fn abandoned(&self) -> bool {
        matches!(&self.outcome, Outcome::Failed { error, .. } if error.starts_with(apply::ABANDONED))
    }
}

struct Running {
    change: Change,
    record: InFlight,
    task: Id,
}

/// The changes in flight and the tasks that run them.
pub struct WorkSet {
    executor: Executor,
    cancel: watch::Receiver<bool>,
    tasks: JoinSet<()>,
    events: mpsc::UnboundedSender<Event>,
    received: mpsc::UnboundedReceiver<Event>,
    running: BTreeMap<usize, Running>,
    next_index: usize,
    finished: VecDeque<Finished>,
}

impl std::fmt::Debug for WorkSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkSet").field("in_flight", &self.running.len()).field("executor", &self.executor).finish()
    }
}

impl WorkSet {
    /// `cancel` turning `true` lets the changes in flight finish but starts no queued one.
    pub fn new(executor: Executor, cancel: watch::Receiver<bool>) -> Self {
        let (events, received) = mpsc::unbounded_channel();
        Self {
            executor,
            cancel,
            tasks: JoinSet::new(),
            events,
            received,
            running: BTreeMap::new(),
            next_index: 0,
            finished: VecDeque::new(),
        }
    }

    /// New work goes through `executor` from now on (a reloaded config); work in flight keeps its old one.
    pub fn set_executor(&mut self, executor: Executor) {
        self.executor = executor;
    }

    /// Starts `changes` (from one plan, in plan order): each target's changes in one task, in order. A group
    /// whose first change finds its backend's or CI source's slots all taken is not started: it is returned,
    /// with that slot, for the next plan to ask for again.
    pub fn start(&mut self, changes: Vec<Change>, now: Timestamp) -> Vec<(Change, Slot)> {
        let mut waiting = Vec::new();
        let mut changes: Vec<Option<Change>> = changes.into_iter().map(Some).collect();
        let groups = {
            let planned: Vec<Change> = changes.iter().flatten().cloned().collect();
            apply::same_target_groups(&planned)
        };
        for group in groups {
            let members: Vec<Change> = group.iter().filter_map(|index| changes[*index].take()).collect();
            let Some(first) = members.first() else { continue };
            let slot = match self.executor.try_slot(first) {
                Ok(slot) => slot,
                Err(full) => {
                    waiting.extend(members.into_iter().map(|change| (change, full.clone())));
                    continue;
                }
            };
            let indexed: Vec<(usize, Change)> = members
                .into_iter()
                .map(|change| {
                    let index = self.next_index;
                    self.next_index = self.next_index.wrapping_add(1);
                    (index, change)
                })
                .collect();
            let run = self.executor.run_group(indexed.clone(), slot, self.cancel.clone(), self.events.clone());
            let task = self.tasks.spawn(run).id();
            for (index, change) in indexed {
                // `instance.id` and `agent` fill in as the change learns them (the new instance's id, the agent
                // it registered), so the next plan knows the new instance and agent as taken.
                let record = change.in_flight(now);
                self.running.insert(index, Running { change, record, task });
            }
        }
        waiting
    }

    /// What is in flight now, in the order it was started.
    pub fn in_flight(&self) -> Vec<InFlight> {
        self.running.values().map(|running| running.record.clone()).collect()
    }

    /// Whether the loop is shutting down (no new work starts).
    pub fn cancelled(&self) -> bool {
        *self.cancel.borrow()
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// The next change that ends. Never resolves while nothing is in flight, so it can sit in a `select!`.
    /// Cancel-safe: an event taken in before the future was dropped is kept for the next call.
    pub async fn next_finished(&mut self) -> Finished {
        loop {
            if let Some(finished) = self.finished.pop_front() {
                return finished;
            }
            tokio::select! {
                biased;
                Some(event) = self.received.recv() => self.take(event),
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    let task = match joined {
                        Ok((task, ())) => task,
                        Err(error) => {
                            tracing::error!(%error, "a change's task died");
                            error.id()
                        }
                    };
                    self.task_ended(task);
                }
            }
        }
    }

    /// Waits for every change in flight to end (each within its deadline) and returns them.
    pub async fn finish_all(&mut self) -> Vec<Finished> {
        let mut all: Vec<Finished> = self.finished.drain(..).collect();
        while !self.running.is_empty() {
            all.push(self.next_finished().await);
        }
        all.extend(self.finished.drain(..));
        all
    }

    /// Finished changes already known, without waiting.
    pub fn take_finished(&mut self) -> Vec<Finished> {
        while let Ok(event) = self.received.try_recv() {
            self.take(event);
        }
        self.finished.drain(..).collect()
    }

    fn take(&mut self, event: Event) {
        match event {
            Event::Start(_) | Event::Step(..) => {}
            Event::Learned(index, learned) => {
                // A create registers with its pool's CI source; the change itself names no agent yet.
                let pool_ci = self
                    .running
                    .get(&index)
                    .and_then(|running| self.executor.desired().pool(&running.change.pool))
                    .map(|pool| pool.ci.source.clone());
                let Some(running) = self.running.get_mut(&index) else { return };
                match learned {
                    Learned::Instance(id) => {
                        if let Some(instance) = running.record.instance.as_mut() {
                            instance.id = Some(id);
                        }
                    }
                    Learned::Agent(id) => {
                        let ci = running.change.agent.as_ref().map(|agent| agent.ci.clone()).or(pool_ci);
                        if let (None, Some(ci)) = (&running.record.agent, ci) {
                            let name = running.change.instance.as_ref().map(|i| i.name.clone()).unwrap_or_default();
                            running.record.agent = Some(AgentTarget { ci, id, name });
                        }
                    }
                }
            }
            Event::Finish(index, outcome) => {
                if let Some(running) = self.running.remove(&index) {
                    self.finished.push_back(Finished { change: running.change, outcome, since: running.record.since });
                }
            }
        }
    }

    /// A task ended: what it reported is taken in first; a change it never finished (it panicked) fails.
    fn task_ended(&mut self, task: Id) {
        while let Ok(event) = self.received.try_recv() {
            self.take(event);
        }
        let orphaned: Vec<usize> =
            self.running.iter().filter(|(_, running)| running.task == task).map(|(index, _)| *index).collect();
        for index in orphaned {
            if let Some(running) = self.running.remove(&index) {
                self.finished.push_back(Finished {
                    change: running.change,
                    outcome: apply::task_died(),
                    since: running.record.since,
                });
            }
        }
    }
}
