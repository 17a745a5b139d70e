//! Rule 2: scale down. Only idle, undrained agents past their idle timeout (and, on hourly billing, near the end
//! of their paid hour) are drained, longest idle first; the instance goes on a later cycle (rule 3).

use jiff::{SignedDuration, Timestamp};

use super::super::text::human_duration;
use super::members::Member;
use super::{Acted, PoolPlan, Target};
use crate::model::{BackendName, Billing, Desired};
use crate::plan::Action;

pub(super) fn drain_idle(
    plan: &mut PoolPlan<'_, '_>,
    serving: &[&Member<'_>],
    drift_drained: &Acted<'_>,
    target: &Target<'_>,
) {
    let excess = target.active.saturating_sub(target.desired_count);
    if excess == 0 {
        return;
    }
    let cx = plan.cx;
    let policy = plan.policy;
    let hourly_margin = match billing_of(cx.desired, &cx.pool.backend.backend) {
        Billing::Hourly => policy.billing_margin,
        Billing::PerSecond => None,
    };
    let mut candidates: Vec<&Member<'_>> = serving
        .iter()
        .copied()
        .filter(|member| member.agent.is_some() && !member.busy && !drift_drained.contains(member.name()))
        .collect();
    candidates.sort_by_key(|member| (member.idle_since, member.name()));
    let mut drained_now = 0u32;
    for member in candidates {
        if drained_now == excess {
            break;
        }
        let idle_for = cx.now.duration_since(member.idle_since);
        if idle_for < policy.idle_timeout.signed() {
            plan.notes.push_with(|| {
                format!(
                    "{}: idle for {} (idle timeout {})",
                    member.name(),
                    human_duration(idle_for),
                    policy.idle_timeout
                )
            });
            continue;
        }
        if let Some(margin) = hourly_margin {
            let left = paid_time_left(member.instance.created_at, cx.now);
            if left > margin.signed() {
                plan.notes.push_with(|| {
                    format!("{}: kept until its paid hour ends in {}", member.name(), human_duration(left))
                });
                continue;
            }
        }
        drained_now += 1;
        plan.push(
            member,
            Action::Drain,
            format!("idle for {} (idle timeout {})", human_duration(idle_for), policy.idle_timeout),
        );
    }
}

fn billing_of(desired: &Desired, backend: &BackendName) -> Billing {
    desired.backends.get(backend).map(|spec| spec.billing).unwrap_or(Billing::PerSecond)
}

/// Time left in the instance's current paid hour (hourly billing starts at creation).
fn paid_time_left(created_at: Timestamp, now: Timestamp) -> SignedDuration {
    let elapsed = now.duration_since(created_at).as_secs().max(0);
    SignedDuration::from_secs(3600 - elapsed % 3600)
}
