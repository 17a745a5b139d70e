//! Rule 1: scale up, cheapest first: resume drained agents (1a), start stopped instances (1b), create what is
//! still missing (1c).

use std::collections::BTreeMap;

use super::super::ownership::NameAllocator;
use super::super::text::plural;
use super::members::Member;
use super::{Acted, PoolPlan, Room, Target};
use crate::model::{AGENT_HASH_LABEL, JOB_LABEL, OWNER_LABEL, POOL_LABEL};
use crate::plan::{Action, Change, InstanceTarget};

/// Rule 1a: resume drained agents (idle ones first: they take a job right away). Drifted ones are replaced
/// instead, never resumed. A resumed instance counted towards `max` already.
pub(super) fn resume_drained<'m>(
    plan: &mut PoolPlan<'_, '_>,
    drained: &[&'m Member<'_>],
    need: &mut u32,
    target: &Target<'_>,
) -> Acted<'m> {
    // An instance with work in flight (being deleted, say) is not resumed: that would undo the work half way.
    let mut resumable: Vec<&Member<'_>> =
        drained.iter().copied().filter(|member| member.drift.is_empty() && !plan.in_flight(member)).collect();
    resumable.sort_by_key(|member| (member.busy, member.name()));
    let mut resumed = Acted::new();
    for member in resumable {
        if *need == 0 {
            break;
        }
        *need -= 1;
        resumed.insert(member.name());
        plan.push(member, Action::Start, format!("resume drained agent: {}", target.scale_up_reason));
    }
    resumed
}

/// Rule 1b: start stopped instances before creating new ones (they keep their disk and agent record). In
/// start/stop mode a start adds a running instance, so it needs room under `max`; in create mode the stopped
/// instance counted already.
pub(super) fn start_stopped<'m>(
    plan: &mut PoolPlan<'_, '_>,
    stopped: &[&'m Member<'_>],
    need: &mut u32,
    target: &Target<'_>,
    room: &mut Room,
) -> Acted<'m> {
    let mut startable: Vec<&Member<'_>> = stopped.iter().copied().filter(|member| !plan.in_flight(member)).collect();
    startable.sort_by_key(|member| member.name());
    let mut started = Acted::new();
    let wanted = (*need).min(startable.len() as u32);
    for member in startable {
        if *need == 0 {
            break;
        }
        if !plan.create_mode {
            if room.left() == 0 {
                break;
            }
            room.counted += 1;
        }
        *need -= 1;
        started.insert(member.name());
        plan.push(member, Action::Start, format!("start stopped instance: {}", target.scale_up_reason));
    }
    let granted = started.len() as u32;
    if granted < wanted {
        plan.notes.push_with(|| room.note(wanted, granted));
        // Nothing else may add an instance either: the adopted instances are all there is.
        *need = 0;
    }
    started
}

/// Rule 1c: create what is still missing, within the room under `max`. Returns the names of stale agent
/// records the creates take over.
pub(super) fn create(plan: &mut PoolPlan<'_, '_>, need: u32, target: &Target<'_>, room: &mut Room) -> Vec<String> {
    if need == 0 {
        return Vec::new();
    }
    let cx = plan.cx;
    let pool = cx.pool;
    if let Some(image) = plan.missing_image {
        plan.notes.push_with(|| format!("{} held back until image `{image}` exists", plural(need, "create")));
        return Vec::new();
    }
    if !plan.create_mode {
        plan.notes.push_with(|| format!("{} more wanted, but no more adopted instances to start", need));
        return Vec::new();
    }
    // Unfinished creates of the pool are created again first, under their own names: they counted towards
    // `max` already. Every other create needs room. But only while the pool is within `max` (it may be above:
    // `max` lowered, records of a killed apply): each unfinished record may or may not have its instance, and
    // creating one again that has none adds an instance, so above `max` none is created again.
    let again = if room.counted <= room.max { need.min(target.unfinished.len() as u32) } else { 0 };
    let fresh = (need - again).min(room.left());
    room.counted += fresh;
    let granted = again + fresh;
    if granted < need {
        plan.notes.push_with(|| room.note(need, granted));
    }
    let names_first: Vec<&str> =
        target.unfinished.iter().take(again as usize).chain(target.reusable.iter()).copied().collect();
    let mut names = NameAllocator::new(&cx.desired.owner, &pool.name, cx.used_names, names_first);
    let mut reused = Vec::new();
    // Built once per pool: every create of the pool carries the same labels and machine.
    let mut create_after = BTreeMap::new();
    create_after.insert(format!("label.{OWNER_LABEL}"), cx.desired.owner.clone());
    create_after.insert(format!("label.{POOL_LABEL}"), pool.name.to_string());
    create_after.insert(format!("label.{AGENT_HASH_LABEL}"), plan.hash.clone());
    for (key, value) in &pool.backend.machine {
        create_after.insert(format!("machine.{key}"), value.clone());
    }
    // A pre-registered agent is not created but undrained once its new instance runs: apply needs its id.
    let preregistered = pool
        .agent
        .preregistered
        .as_ref()
        .and_then(|reference| cx.ci.and_then(|ci| ci.lookup(reference).map(|agent| ci.target(agent))));
    // A job-bound source's agent is registered for one job: each create names the next job no agent serves.
    let mut jobs = cx.unserved_jobs.iter();
    for _ in 0..granted {
        let name = names.next();
        if target.reusable.contains(&name.as_str()) {
            reused.push(name.clone());
        }
        let mut after = create_after.clone();
        if let Some(job) = jobs.next() {
            after.insert(format!("label.{JOB_LABEL}"), job.clone());
        }
        plan.changes.push(Change {
            pool: pool.name.clone(),
            action: Action::Create,
            instance: Some(InstanceTarget { backend: pool.backend.backend.clone(), id: None, name }),
            agent: preregistered.clone(),
            reason: target.scale_up_reason.clone(),
            before: BTreeMap::new(),
            after,
            cause: None,
        });
    }
    reused
}
