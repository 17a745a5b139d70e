//! Rules 3 and 6: instances on their way out. Drifted serving agents are drained once idle (rule 6); drained
//! instances are replaced (drifted, while capacity is wanted) or removed once idle (rule 3); stopped instances
//! nobody needs go once their idle timeout passed.

use super::super::text::human_duration;
use super::members::{describe_drift, Member};
use super::{Acted, PoolPlan};
use crate::plan::Action;

/// Rule 6 on serving instances: drift is drained once the agent is idle; the drained instance keeps its slot
/// (it is replaced one for one on a later cycle), so it still counts as active.
pub(super) fn drain_drifted<'m>(plan: &mut PoolPlan<'_, '_>, serving: &[&'m Member<'_>]) -> Acted<'m> {
    let mut drift_drained = Acted::new();
    for member in serving {
        if member.drift.is_empty() {
            continue;
        }
        let what = describe_drift(&member.drift);
        if let Some(image) = plan.missing_image {
            plan.notes.push_with(|| {
                format!("{}: spec changed ({what}); replaced once image `{image}` exists", member.name())
            });
        } else if member.busy {
            plan.notes.push_with(|| format!("{}: spec changed ({what}); waiting for agent to go idle", member.name()));
        } else if member.agent.is_some() {
            plan.push(member, Action::Drain, format!("spec changed: {what}"));
            drift_drained.insert(member.name());
        }
    }
    drift_drained
}

/// Rules 3 and 6 on drained instances: replace drifted ones while capacity is wanted, otherwise remove idle
/// ones; a busy one finishes its job first.
pub(super) fn retire_drained(
    plan: &mut PoolPlan<'_, '_>,
    drained: &[&Member<'_>],
    resumed: &Acted<'_>,
    need: &mut u32,
) {
    for member in drained {
        if resumed.contains(member.name()) {
            continue;
        }
        if member.busy {
            plan.notes.push_with(|| format!("{}: drained, waiting for job to finish", member.name()));
            continue;
        }
        if !member.drift.is_empty() && plan.create_mode && *need > 0 {
            *need -= 1;
            if let Some(image) = plan.missing_image {
                plan.notes
                    .push_with(|| format!("{}: drained for replacement, waiting for image `{image}`", member.name()));
                continue;
            }
            let mut replace =
                plan.change(member, Action::Replace, format!("spec changed: {}", describe_drift(&member.drift)));
            for (key, have, want) in &member.drift {
                replace.before.insert(key.clone(), have.clone());
                replace.after.insert(key.clone(), want.clone());
            }
            plan.changes.push(replace);
        } else if plan.create_mode {
            plan.push(member, Action::Delete, "agent drained and idle".to_owned());
        } else {
            plan.push(member, Action::Stop, "agent drained and idle".to_owned());
        }
    }
}

/// A stopped instance nobody needs in create mode is a scaled-down one: it goes once its idle timeout passed
/// (stopped servers still cost money on Hetzner). Adopted instances are only ever stopped.
pub(super) fn delete_unneeded_stopped(plan: &mut PoolPlan<'_, '_>, stopped: &[&Member<'_>], started: &Acted<'_>) {
    if !plan.create_mode {
        return;
    }
    for member in stopped {
        if started.contains(member.name()) || member.busy {
            continue;
        }
        let idle_for = plan.cx.now.duration_since(member.idle_since);
        if idle_for >= plan.policy.idle_timeout.signed() {
            plan.push(member, Action::Delete, format!("stopped and not needed, idle for {}", human_duration(idle_for)));
        }
    }
}
