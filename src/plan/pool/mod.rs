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

use super::digest::agent_hash;
use super::fasthash::FastSet;
use super::index::{BackendIndex, CiIndex, InFlightIndex};
use super::text::plural;
use super::{Action, Change, InstanceTarget, PoolStatus};
use crate::model::{
    BackendName, Desired, InstanceId, InstanceMode, InstanceState, Observed, PoolSpec, ScalePolicy, ScheduleWindow,
};

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
    /// Names of every observed instance and agent record (built once: pools must not rescan the world).
    pub used_names: &'a FastSet<&'a str>,
    pub in_flight: &'a InFlightIndex<'a>,
    pub now: Timestamp,
}

pub(super) struct PoolOutcome<'a> {
    pub status: PoolStatus,
    pub changes: Vec<Change>,
    /// The instances this pool took as its own: every other instance with our owner label is an orphan.
    pub claimed: Vec<(&'a BackendName, &'a InstanceId)>,
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
    notes: Vec<String>,
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
            before: BTreeMap::new(),
            after: BTreeMap::new(),
        }
    }

    fn push(&mut self, member: &Member<'_>, action: Action, reason: String) {
        let change = self.change(member, action, reason);
        self.changes.push(change);
    }
}

/// The pool's members sorted by what they can do now.
struct Classes<'m, 'a> {
    serving: Vec<&'m Member<'a>>,
    drained: Vec<&'m Member<'a>>,
    stopped: Vec<&'m Member<'a>>,
}

/// The desired count and the numbers behind it.
struct Target {
    desired_count: u32,
    /// Serving instances (running, starting, being created).
    active: u32,
    running_jobs: u32,
    busy: u32,
    idle: u32,
    /// Shown as the reason of every change that adds capacity.
    scale_up_reason: String,
}

pub(super) fn plan_pool<'a>(cx: &PoolContext<'a>) -> PoolOutcome<'a> {
    let pool = cx.pool;
    let window = active_window(pool, cx.now);
    let scheduled = window.map(|window| scheduled_policy(&pool.scale, window));
    let policy = scheduled.as_ref().unwrap_or(&pool.scale);
    let create_mode = matches!(pool.backend.mode, InstanceMode::Create);
    let mut plan = PoolPlan {
        cx,
        policy,
        create_mode,
        hash: agent_hash(&pool.agent),
        missing_image: missing_image(cx, create_mode),
        changes: Vec::new(),
        notes: Vec::new(),
    };
    if let Some(image) = plan.missing_image {
        plan.notes.push(format!(
            "image alias `{image}` is missing on backend `{}`: run `ciscale provision`",
            plan.backend_name()
        ));
    }

    let members = gather_members(cx, &plan.hash);
    let backend_key = backend_name_ref(cx, &pool.backend.backend);
    let claimed = members.iter().map(|member| (backend_key, &member.instance.id)).collect();

    let classes = classify(&mut plan, &members);
    note_missing_adoptions(&mut plan, &members);
    let target = target(&mut plan, &members, &classes);

    let drift_drained = retire::drain_drifted(&mut plan, &classes.serving);
    let mut need = target.desired_count.saturating_sub(target.active);
    let resumed = scale_up::resume_drained(&mut plan, &classes.drained, &mut need, &target);
    retire::retire_drained(&mut plan, &classes.drained, &resumed, &mut need);
    let started = scale_up::start_stopped(&mut plan, &classes.stopped, &mut need, &target);
    retire::delete_unneeded_stopped(&mut plan, &classes.stopped, &started);
    scale_up::create(&mut plan, need, &target);
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
        notes: plan.notes,
    };
    PoolOutcome { status, changes: plan.changes, claimed }
}

/// The first schedule window containing `now`: its bounds override the pool's for this plan only.
fn active_window(pool: &PoolSpec, now: Timestamp) -> Option<&ScheduleWindow> {
    pool.scale.schedule.iter().find(|window| window.contains(now))
}

fn scheduled_policy(scale: &ScalePolicy, window: &ScheduleWindow) -> ScalePolicy {
    ScalePolicy {
        min: window.min.unwrap_or(scale.min),
        max: window.max.unwrap_or(scale.max),
        min_idle: window.min_idle.unwrap_or(scale.min_idle),
        ..scale.clone()
    }
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

/// The observed backend name key (borrowed from the observation) for a pool's backend; the pool's own name
/// when the backend was not observed (then the pool has no members and this is never called).
fn backend_name_ref<'a>(cx: &PoolContext<'a>, name: &'a BackendName) -> &'a BackendName {
    cx.observed.backends.get_key_value(name).map(|(key, _)| key).unwrap_or(name)
}

/// Classify. Rules 4 and 5 (broken and finished ephemeral instances) act here and never count as capacity.
fn classify<'m, 'a>(plan: &mut PoolPlan<'_, 'a>, members: &'m [Member<'a>]) -> Classes<'m, 'a> {
    let create_mode = plan.create_mode;
    let ephemeral = plan.policy.ephemeral;
    let mut classes = Classes { serving: Vec::new(), drained: Vec::new(), stopped: Vec::new() };
    for member in members {
        match member.instance.state {
            // An adopted instance cannot be replaced by ciscale: say why it does not serve, every cycle.
            InstanceState::Stopping if !create_mode => plan.notes.push(format!(
                "{} ({}): stopping; it can be started again once it has stopped",
                member.name(),
                member.instance.id
            )),
            InstanceState::Terminated | InstanceState::Deleting if !create_mode => plan.notes.push(format!(
                "{} ({}): adopted instance is {} and can never be started again; remove it from \
                 `startStop.instances`",
                member.name(),
                member.instance.id,
                member.instance.state
            )),
            InstanceState::Terminated | InstanceState::Deleting | InstanceState::Stopping => {}
            InstanceState::Stopped => {
                if create_mode && ephemeral && member.busy {
                    // The CI still lists a job on it (it notices a dead agent late): never touch a busy agent.
                    plan.notes.push(format!("{}: stopped, waiting for the ci to release its job", member.name()));
                } else if create_mode && ephemeral {
                    plan.push(member, Action::Delete, "ephemeral agent finished its job".to_owned());
                } else {
                    classes.stopped.push(member);
                }
            }
            InstanceState::Pending | InstanceState::Running | InstanceState::Unknown => {
                if let Some(reason) = never_registered(plan.cx, member) {
                    let action = if create_mode { Action::Delete } else { Action::Stop };
                    plan.push(member, action, reason);
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
            plan.notes.push(format!(
                "adopted instance `{}` was not found on backend `{}`; check its id and region",
                adoption.id,
                plan.backend_name()
            ));
        }
    }
}

/// Demand: jobs waiting for this pool plus jobs running on its serving agents. Jobs on drained agents are left
/// out on purpose: those agents are on their way out, and counting their jobs would resume them.
fn target(plan: &mut PoolPlan<'_, '_>, members: &[Member<'_>], classes: &Classes<'_, '_>) -> Target {
    let cx = plan.cx;
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
        plan.notes.push(format!("demand wants {wanted} agents, capped at max {}", policy.max));
    }
    // Creates in flight whose instance the backend does not list yet are capacity on its way.
    let creating = cx.in_flight.unlisted_creates(&cx.pool.name, cx.backend);
    let active = classes.serving.len() as u32 + creating;
    let busy = classes.serving.iter().filter(|member| member.busy).count() as u32;
    let idle = classes.serving.iter().filter(|member| member.agent.is_some() && !member.busy).count() as u32;
    let scale_up_reason = format!(
        "{} waiting, {} running, {} active (desired {}, max {})",
        plural(cx.pending_jobs, "job"),
        running_on_serving,
        active,
        desired_count,
        policy.max
    );
    Target { desired_count, active, running_jobs, busy, idle, scale_up_reason }
}

/// Names of members a step acted on, so a later step leaves them alone.
type Acted<'m> = BTreeSet<&'m str>;
