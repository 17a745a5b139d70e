//! The rules for one pool, as steps over its members (its owned and adopted instances, each with its agent).
//!
//! The steps run in this order, each in its own file:
//! 1. [`members`]: gather the pool's instances with their agents, drift and idle time;
//! 2. `classify` (here): sort them into serving, drained and stopped; rule 4 (broken: the agent never registered)
//!    and rule 5 (a finished ephemeral agent) act right here, and those instances never count as capacity;
//! 3. `target` (here): the desired count from the matching demand, clamped to `min`/`max`;
//! 4. [`retire`]: rule 6 drains drifted serving agents once idle;
//! 5. [`scale_up`]: rule 1a resumes drained agents;
//! 6. [`retire`]: rules 3 and 6 replace drifted drained instances or remove idle drained ones;
//! 7. [`scale_up`]: rule 1b starts stopped instances, [`retire`] deletes stopped ones nobody needs, and rule 1c
//!    creates what is still missing;
//! 8. [`scale_down`]: rule 2 drains idle agents past their idle timeout (and their paid hour).
//!
//! Each step adds changes and notes to one [`PoolPlan`]; notes keep the order the steps ran in.

use std::collections::{BTreeMap, BTreeSet};

use jiff::Timestamp;

use super::capacity::{counts_towards_max, effective_policy};
use super::digest::agent_hash;
use super::fasthash::FastSet;
use super::index::{BackendIndex, CiIndex, InFlightIndex};
use super::records::{self, LoneRecord, Records};
use super::text::plural;
use super::{Action, Cause, Change, InstanceTarget, PoolStatus};
use crate::model::{BackendName, Desired, InstanceMode, InstanceState, Observed, PoolSpec, ScalePolicy};

mod members;
mod retire;
mod scale_down;
mod scale_up;

use members::{gather_members, never_registered, Member};

/// What the rules of one pool read: the config, the observation (indexed) and the time.
pub(super) struct PoolContext<'a> {
    pub desired: &'a Desired,
    pub observed: &'a Observed,
    pub pool: &'a PoolSpec,
    pub ci: Option<&'a CiIndex<'a>>,
    pub backend: Option<&'a BackendIndex<'a>>,
    pub pending_jobs: u32,
    /// For a job-bound source ([`super::jobs`]): the pool's waiting jobs no agent was made for yet, in queue
    /// order; each create takes the next. Empty for other sources.
    pub unserved_jobs: &'a [String],
    /// Names of every observed instance and agent record (built once: pools must not rescan the world).
    pub used_names: &'a FastSet<&'a str>,
    pub in_flight: &'a InFlightIndex<'a>,
    /// Agent records without an instance (this pool's count as creates in flight, or give their names back).
    pub records: &'a Records<'a>,
    pub now: Timestamp,
    /// Whether notes are written (see [`Notes`]).
    pub explain: bool,
}

pub(super) struct PoolOutcome {
    pub status: PoolStatus,
    pub changes: Vec<Change>,
    /// The instances this pool took as its own, as positions in its backend's list (see [`BackendIndex`]):
    /// every other instance with our owner label is an orphan.
    pub claimed: Vec<u32>,
    /// Names of stale agent records of the pool its creates take over (so they are not deregistered).
    pub reused: Vec<String>,
}

/// One pool being planned: the settings every step reads and the changes and notes the steps add.
struct PoolPlan<'c, 'a> {
    cx: &'c PoolContext<'a>,
    /// The pool's scale policy with the bounds of the schedule window in force, if any.
    policy: &'c ScalePolicy,
    create_mode: bool,
    /// [`agent_hash`] of the pool's agent settings (drift, and the label of new instances).
    hash: String,
    /// The image the pool creates from, when the backend says it does not have it (see [`missing_image`]).
    missing_image: Option<&'c String>,
    changes: Vec<Change>,
    notes: Notes,
}

/// The pool's notes: why the plan holds something back or waits. They explain and never decide, so a caller
/// that shows none (`simulate`, see `plan_for_simulation`) has them left unwritten: formatting them was a sixth
/// of its planning time.
pub(super) struct Notes {
    explain: bool,
    list: Vec<String>,
}

impl Notes {
    fn new(explain: bool) -> Self {
        Self { explain, list: Vec::new() }
    }

    /// Adds the note `write` gives, when notes are written.
    pub fn push_with(&mut self, write: impl FnOnce() -> String) {
        if self.explain {
            self.list.push(write());
        }
    }

    /// Whether notes are written (for a note that takes work to find before it can be written).
    pub fn wanted(&self) -> bool {
        self.explain
    }
}

impl PoolPlan<'_, '_> {
    fn backend_name(&self) -> &BackendName {
        &self.cx.pool.backend.backend
    }

    /// A change on an existing member, with its instance and (when known) its agent as targets.
    fn change(&self, member: &Member<'_>, action: Action, reason: String) -> Change {
        let agent = match (self.cx.ci, member.agent) {
            (Some(ci), Some(agent)) => Some(ci.target(agent)),
            _ => None,
        };
        Change {
            pool: self.cx.pool.name.clone(),
            action,
            instance: Some(InstanceTarget {
                backend: self.backend_name().clone(),
                id: Some(member.instance.id.clone()),
                name: member.instance.name.clone(),
            }),
            agent,
            reason,
            cause: None,
            before: BTreeMap::new(),
            after: BTreeMap::new(),
        }
    }

    /// Whether work from an earlier cycle is still under way on the member (then nothing new is planned on it).
    fn in_flight(&self, member: &Member<'_>) -> bool {
        self.cx.in_flight.busy_with(self.backend_name(), member.instance)
    }

    fn push(&mut self, member: &Member<'_>, action: Action, reason: String) {
        let change = self.change(member, action, reason);
        self.changes.push(change);
    }
}

/// The pool's room under `max` (see [`super::capacity`]), kept up to date as steps add instances.
struct Room {
    max: u32,
    /// Instances (and creates in flight) that count towards `max` now, plus those the plan adds.
    counted: u32,
    /// What the count is made of, for the note when the cap holds a create back.
    parts: Vec<String>,
}

impl Room {
    fn left(&self) -> u32 {
        self.max.saturating_sub(self.counted)
    }

    /// The note when `wanted` more instances were wanted and only `granted` fit (already added to `counted`).
    fn note(&self, wanted: u32, granted: u32) -> String {
        let what = if granted == 0 { "nothing".to_owned() } else { format!("only {granted}") };
        format!(
            "{} more wanted, but the pool has {} of max {} instances ({}): {what} added",
            wanted,
            self.counted - granted,
            self.max,
            self.parts.join(", ")
        )
    }
}

/// The pool's members sorted by what they can do now.
struct Classes<'m, 'a> {
    serving: Vec<&'m Member<'a>>,
    drained: Vec<&'m Member<'a>>,
    stopped: Vec<&'m Member<'a>>,
}

/// The desired count and the numbers behind it.
struct Target<'a> {
    desired_count: u32,
    /// Serving instances (running, starting, being created).
    active: u32,
    running_jobs: u32,
    busy: u32,
    idle: u32,
    /// Shown as the reason of every change that adds capacity.
    scale_up_reason: String,
    /// Agent records of the pool without an instance whose create may not have happened (within their
    /// window, see `records`): already counted towards `max`, so a create under their name needs no room. A
    /// create that did happen is found under that name (create-if-absent) rather than doubled.
    unfinished: Vec<&'a str>,
    /// Stale agent records of the pool whose names its next creates reuse, lowest index first.
    reusable: Vec<&'a str>,
    /// The records behind `reusable`: kept (with a note) unless a create of this plan takes them over.
    kept: Vec<&'a LoneRecord<'a>>,
}

pub(super) fn plan_pool(cx: &PoolContext<'_>) -> PoolOutcome {
    let pool = cx.pool;
    let (policy, window) = effective_policy(pool, cx.now);
    let policy = policy.as_ref();
    let create_mode = matches!(pool.backend.mode, InstanceMode::Create);
    let mut plan = PoolPlan {
        cx,
        policy,
        create_mode,
        hash: agent_hash(&pool.agent),
        missing_image: missing_image(cx, create_mode),
        changes: Vec::new(),
        notes: Notes::new(cx.explain),
    };
    if let Some(image) = plan.missing_image {
        plan.notes.push_with(|| {
            format!(
                "image alias `{image}` is missing on backend `{}`: run `ciscale provision`",
                plan.cx.pool.backend.backend
            )
        });
    }

    let members = gather_members(cx, &plan.hash);
    let claimed = members.iter().map(|member| member.position).collect();

    let classes = classify(&mut plan, &members);
    note_missing_adoptions(&mut plan, &members);
    let (target, mut room) = target(&mut plan, &members, &classes);

    let drift_drained = retire::drain_drifted(&mut plan, &classes.serving);
    let mut need = target.desired_count.saturating_sub(target.active);
    let resumed = scale_up::resume_drained(&mut plan, &classes.drained, &mut need, &target);
    retire::retire_drained(&mut plan, &classes.drained, &resumed, &mut need);
    let started = scale_up::start_stopped(&mut plan, &classes.stopped, &mut need, &target, &mut room);
    retire::delete_unneeded_stopped(&mut plan, &classes.stopped, &started);
    let reused = scale_up::create(&mut plan, need, &target, &mut room);
    for record in target.kept.iter().filter(|record| !reused.iter().any(|name| name == record.name())) {
        plan.notes.push_with(|| records::kept_note(record, cx.now));
    }
    scale_down::drain_idle(&mut plan, &classes.serving, &drift_drained, &target);

    let status = PoolStatus {
        pool: pool.name.clone(),
        pending_jobs: cx.pending_jobs,
        running_jobs: target.running_jobs,
        active: target.active,
        busy: target.busy,
        idle: target.idle,
        desired: target.desired_count,
        window: window.map(|window| window.name.clone()),
        notes: plan.notes.list,
    };
    PoolOutcome { status, changes: plan.changes, claimed, reused }
}

/// An image the backend lacks (an Incus alias `ciscale provision` has not built yet): every create from it would
/// fail, so none is planned, and drifted instances keep serving until their replacement can be created.
fn missing_image<'c>(cx: &PoolContext<'c>, create_mode: bool) -> Option<&'c String> {
    let backend_name = &cx.pool.backend.backend;
    cx.pool.backend.machine.get("image").filter(|image| {
        let observed = cx.observed.backends.get(backend_name);
        create_mode && observed.is_some_and(|backend| backend.missing_images.contains(image))
    })
}

/// Classify. Rules 4 and 5 (broken and finished ephemeral instances) act here and never count as capacity.
fn classify<'m, 'a>(plan: &mut PoolPlan<'_, 'a>, members: &'m [Member<'a>]) -> Classes<'m, 'a> {
    let create_mode = plan.create_mode;
    let ephemeral = plan.policy.ephemeral;
    let mut classes = Classes { serving: Vec::new(), drained: Vec::new(), stopped: Vec::new() };
    for member in members {
        match member.instance.state {
            // An adopted instance cannot be replaced by ciscale: say why it does not serve, every cycle.
            InstanceState::Stopping if !create_mode => plan.notes.push_with(|| {
                format!(
                    "{} ({}): stopping; it can be started again once it has stopped",
                    member.name(),
                    member.instance.id
                )
            }),
            InstanceState::Terminated | InstanceState::Deleting if !create_mode => plan.notes.push_with(|| {
                format!(
                    "{} ({}): adopted instance is {} and can never be started again; remove it from \
                 `startStop.instances`",
                    member.name(),
                    member.instance.id,
                    member.instance.state
                )
            }),
            InstanceState::Terminated | InstanceState::Deleting | InstanceState::Stopping => {}
            InstanceState::Stopped => {
                if create_mode && ephemeral && member.busy {
                    // The CI still lists a job on it (it notices a dead agent late): never touch a busy agent.
                    plan.notes
                        .push_with(|| format!("{}: stopped, waiting for the ci to release its job", member.name()));
                } else if create_mode && ephemeral {
                    plan.push(member, Action::Delete, "ephemeral agent finished its job".to_owned());
                } else {
                    classes.stopped.push(member);
                }
            }
            InstanceState::Pending | InstanceState::Running | InstanceState::Unknown => {
                if let Some(reason) = never_registered(plan.cx, member) {
                    let action = if create_mode { Action::Delete } else { Action::Stop };
                    let mut change = plan.change(member, action, reason);
                    change.cause = Some(Cause::BootstrapTimeout);
                    plan.changes.push(change);
                } else if member.drained {
                    classes.drained.push(member);
                } else {
                    classes.serving.push(member);
                }
            }
        }
    }
    classes
}

fn note_missing_adoptions(plan: &mut PoolPlan<'_, '_>, members: &[Member<'_>]) {
    if let InstanceMode::StartStop { instances: adopted } = &plan.cx.pool.backend.mode {
        for adoption in adopted.iter().filter(|adoption| !members.iter().any(|m| m.instance.id == adoption.id)) {
            plan.notes.push_with(|| {
                format!(
                    "adopted instance `{}` was not found on backend `{}`; check its id and region",
                    adoption.id, plan.cx.pool.backend.backend
                )
            });
        }
    }
}

/// Demand: jobs waiting for this pool plus jobs running on its serving agents. Jobs on drained agents are left
/// out on purpose: those agents are on their way out, and counting their jobs would resume them. Also the room
/// under `max`.
fn target<'a>(plan: &mut PoolPlan<'_, 'a>, members: &[Member<'_>], classes: &Classes<'_, '_>) -> (Target<'a>, Room) {
    let cx = plan.cx;
    let pool = cx.pool;
    let policy = plan.policy;
    let running_on_serving: u32 = classes.serving.iter().map(|member| member.running_jobs).sum();
    let running_jobs: u32 = members
        .iter()
        .filter(|member| member.instance.state != InstanceState::Terminated)
        .map(|member| member.running_jobs)
        .sum();
    let demand = cx.pending_jobs.saturating_add(running_on_serving);
    let jobs_per_agent = policy.jobs_per_agent.max(1);
    let wanted = demand.div_ceil(jobs_per_agent).saturating_add(policy.min_idle);
    // Not `clamp`: it panics when min > max, and a bad config must never panic the planner.
    let desired_count = wanted.max(policy.min).min(policy.max);
    if wanted > policy.max {
        plan.notes.push_with(|| format!("demand wants {wanted} agents, capped at max {}", policy.max));
    }

    // Creates on their way: work in flight whose instance is not listed yet, and the pool's agent records
    // without an instance that still count (see `records`). Each name once.
    let mut creating: Vec<&str> = cx.in_flight.unlisted_creates(&pool.name, cx.backend);
    let mut unfinished = Vec::new();
    let mut reusable = Vec::new();
    let mut kept = Vec::new();
    for record in cx.records.of_pool(&pool.name, &pool.ci.source) {
        if creating.contains(&record.name()) || cx.in_flight.names_instance(&pool.backend.backend, record.name()) {
            continue;
        }
        if plan.notes.wanted() {
            if let Some(note) = records::pool_notes(record, cx.now) {
                plan.notes.push_with(|| note);
            }
        }
        if record.busy {
            // A job runs on it somewhere: capacity (and towards max), never created again.
            creating.push(record.agent.name.as_str());
        } else if record.in_window {
            unfinished.push(record.agent.name.as_str());
        } else if record.reusable() {
            reusable.push(record.agent.name.as_str());
            kept.push(record);
        }
    }
    // Work in flight and busy records are capacity on its way; unfinished creates count towards max only (they
    // are created again under their names while capacity is wanted).
    let in_room = (creating.len() + unfinished.len()) as u32;
    let creating = creating.len() as u32;
    // Starts in flight (a stopped instance started, a drained agent resumed) are capacity on its way too, and so
    // are creates in flight whose instance is listed but not serving yet (a container incusd lists while its
    // create still runs): `creating` counts only the unlisted ones.
    let starting = members
        .iter()
        .filter(|member| {
            cx.in_flight.starts(&pool.backend.backend, &member.instance.id)
                || cx.in_flight.creates(&pool.name, &member.instance.name)
        })
        .filter(|member| !classes.serving.iter().any(|serving| serving.instance.id == member.instance.id))
        .count() as u32;

    let active = classes.serving.len() as u32 + creating + starting;
    let busy = classes.serving.iter().filter(|member| member.busy).count() as u32;
    let idle = classes.serving.iter().filter(|member| member.agent.is_some() && !member.busy).count() as u32;
    // A create for no job names the rule that wants it (`min`, `minIdle`), so the plan explains itself.
    let for_jobs = demand.div_ceil(jobs_per_agent);
    let rule = if wanted < policy.min {
        format!(" for `min` {}, max {}", policy.min, policy.max)
    } else if policy.min_idle > 0 && wanted > policy.max {
        format!(": {for_jobs} for jobs + `minIdle` {}, capped at max {}", policy.min_idle, policy.max)
    } else if policy.min_idle > 0 {
        format!(": {for_jobs} for jobs + `minIdle` {}, max {}", policy.min_idle, policy.max)
    } else {
        format!(", max {}", policy.max)
    };
    let scale_up_reason = format!(
        "{} waiting, {} running, {} active (desired {}{rule})",
        plural(cx.pending_jobs, "job"),
        running_on_serving,
        active,
        desired_count,
    );

    // A start in flight (start/stop mode) counts as the running instance it is about to be.
    let counted = |member: &Member<'_>| {
        counts_towards_max(member.instance.state, plan.create_mode)
            || cx.in_flight.starts(&pool.backend.backend, &member.instance.id)
    };
    let in_class = |class: &[&Member<'_>]| class.iter().filter(|member| counted(member)).count() as u32;
    let counted_members = members.iter().filter(|member| counted(member)).count() as u32;
    let serving = in_class(&classes.serving);
    let drained = in_class(&classes.drained);
    let stopped = in_class(&classes.stopped);
    let other = counted_members - serving - drained - stopped;
    // Only the note when `max` holds a create back reads them.
    let parts = if !plan.notes.wanted() {
        Vec::new()
    } else {
        [
            (serving, "serving"),
            (drained, "drained"),
            (stopped, "stopped"),
            (other, "stopping or being removed"),
            (in_room, "being created"),
        ]
        .into_iter()
        .filter(|(count, _)| *count > 0)
        .map(|(count, what)| format!("{count} {what}"))
        .collect()
    };
    let room = Room { max: policy.max, counted: counted_members + in_room, parts };
    let target =
        Target { desired_count, active, running_jobs, busy, idle, scale_up_reason, unfinished, reusable, kept };
    (target, room)
}

/// Names of members a step acted on, so a later step leaves them alone.
type Acted<'m> = BTreeSet<&'m str>;
