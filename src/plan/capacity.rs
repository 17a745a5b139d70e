//! What counts towards a pool's `max`, for the planner and for `apply`'s check of a saved plan alike.
//!
//! `max` is a hard cap on the pool's instances: the planner never adds one (a create, or a start in start/stop
//! mode) while the count is at or above `max`. The count is every instance of the pool that exists or is being
//! made, whatever it is doing:
//! - **create mode**: every owned instance of the pool except those being deleted or gone (`deleting`,
//!   `terminated`): running, starting, drained, busy, broken and about to be removed, stopping, and *stopped*
//!   ones (a stopped instance still holds its disk, its quota and, on Hetzner, its price; starting it adds
//!   nothing). A deleting instance has been irrevocably told to go and can never take a job again; counting it
//!   would hold an ephemeral pool's replacement back by the backend's clean-up time for nothing;
//! - **start/stop mode**: the adopted instances exist whatever ciscale does, so `max` caps how many *run*: every
//!   adopted instance that is not stopped (or gone), and a start counts as soon as it is planned;
//! - in both, **creates in flight**: work in flight whose instance is not listed yet, and agent records of the
//!   pool without an instance that are still within their `bootstrapTimeout` or run a job (see
//!   [`super::records`]).
//!
//! An instance that is removed in this very plan (a broken one past its bootstrap timeout, a finished ephemeral
//! one) still counts until the backend lists it as deleting: its replacement comes one cycle later. That is the
//! price of a cap that holds at every moment, and it also slows a broken image's churn.

use std::borrow::Cow;

use jiff::Timestamp;

use crate::model::{InstanceState, PoolSpec, ScalePolicy, ScheduleWindow};

/// Whether an instance in `state` counts towards its pool's `max` (see the module docs).
pub fn counts_towards_max(state: InstanceState, create_mode: bool) -> bool {
    match state {
        InstanceState::Deleting | InstanceState::Terminated => false,
        InstanceState::Stopped => create_mode,
        InstanceState::Pending | InstanceState::Running | InstanceState::Stopping | InstanceState::Unknown => true,
    }
}

/// The pool's scale policy at `now`: the first schedule window containing `now` overrides `min`, `max` and
/// `minIdle` (for this plan only).
pub(super) fn effective_policy(pool: &PoolSpec, now: Timestamp) -> (Cow<'_, ScalePolicy>, Option<&ScheduleWindow>) {
    let scale = &pool.scale;
    match scale.schedule.iter().find(|window| window.contains(now)) {
        Some(window) => {
            let policy = ScalePolicy {
                min: window.min.unwrap_or(scale.min),
                max: window.max.unwrap_or(scale.max),
                min_idle: window.min_idle.unwrap_or(scale.min_idle),
                ..scale.clone()
            };
            (Cow::Owned(policy), Some(window))
        }
        None => (Cow::Borrowed(scale), None),
    }
}
