//! The plan: what ciscale would change and why. Built by the pure [`plan`] function, rendered for humans
//! ([`render`]) and machines (the same types, serialised as JSON), written to plan files and executed by `apply`.
//!
//! Apply only executes the changes it is given; it never branches on `reason`, which is for humans.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use crate::model::{Action, AgentTarget, InstanceTarget};
use crate::model::{InFlight, PoolName};

mod capacity;
mod cost;
mod demand;
mod digest;
mod fasthash;
mod index;
mod jobs;
mod machine;
pub mod matching;
mod orphans;
mod ownership;
mod planner;
mod pool;
mod preconditions;
mod records;
pub mod render;
mod sort_key;
#[cfg(test)]
mod tests;
mod text;

pub use capacity::counts_towards_max;
pub use digest::{agent_hash, fingerprint};
pub use ownership::instance_name;
pub use ownership::{name_digest, parse_name, OwnedName, DIGEST_LEN, MAX_OWNER_AND_POOL_LEN};
pub(crate) use planner::action_rank;
pub use planner::{plan, plan_for_simulation};
pub use preconditions::{preconditions, PreconditionFailed};

/// Version of the plan JSON / plan file format. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// One thing to do, with everything apply needs to do it (apply looks up secrets by `pool` in the config, and
/// nothing else).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// The pool the target belongs to (for orphans: the pool named on its label, which may no longer exist).
    pub pool: PoolName,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceTarget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentTarget>,
    /// For humans only.
    pub reason: String,
    /// Why the change is planned, where something other than a human acts on it (see [`Cause`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<Cause>,
    /// Attributes now (empty for a create).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub before: BTreeMap<String, String>,
    /// Attributes afterwards (empty for a delete). For a create: the labels and machine attributes to create
    /// with, keys `label.<k>` and `machine.<k>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub after: BTreeMap<String, String>,
}

impl Change {
    /// What the change is about, for ordering and messages: the instance's name, else the agent's (`-` for
    /// neither, which no change the planner makes lacks; it sorts before every name).
    pub fn target_name(&self) -> &str {
        self.instance
            .as_ref()
            .map(|instance| instance.name.as_str())
            .or_else(|| self.agent.as_ref().map(|agent| agent.name.as_str()))
            .unwrap_or("-")
    }
}

/// A change's cause for machines, like Terraform's action reasons: `apply` checks a saved plan's change against
/// it (a "never registered" agent must still not have registered) and the watch loop's circuit breaker counts
/// bootstrap failures as failed creates. Only causes something acts on are named; `reason` says the rest for
/// humans, and nothing ever branches on `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Cause {
    /// The instance's agent never contacted the CI within the pool's `bootstrapTimeout` (a broken image, a bad
    /// credential): the instance is removed (deleted, or stopped in start/stop mode).
    BootstrapTimeout,
}

impl Change {
    /// This change as work in flight since `since`, for [`crate::model::Observed::in_flight`].
    pub fn in_flight(&self, since: Timestamp) -> InFlight {
        InFlight {
            pool: self.pool.clone(),
            action: self.action,
            instance: self.instance.clone(),
            agent: self.agent.clone(),
            since,
        }
    }
}

/// Per pool: the numbers the decision came from, shown above its changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    pub pool: PoolName,
    /// Jobs waiting that this pool (and no earlier pool) can take.
    pub pending_jobs: u32,
    /// Jobs running on this pool's agents.
    pub running_jobs: u32,
    /// Instances counting towards capacity now (running, starting, being created).
    pub active: u32,
    pub busy: u32,
    pub idle: u32,
    /// The target after clamping to `min`/`max`.
    pub desired: u32,
    /// The schedule window whose bounds are in force, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<String>,
    /// Things worth knowing that caused no change (busy agent kept, waiting for paid hour, ...).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Summary {
    pub create: u32,
    pub start: u32,
    pub stop: u32,
    pub delete: u32,
    pub drain: u32,
    pub deregister: u32,
}

impl Summary {
    pub fn is_empty(&self) -> bool {
        *self == Summary::default()
    }
}

/// Hourly cost before and after the plan, per currency.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Cost {
    pub hourly: BTreeMap<String, CostLine>,
    /// Instances whose price is unknown (no price list for their machine type).
    #[serde(default)]
    pub unpriced_before: u32,
    #[serde(default)]
    pub unpriced_after: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct CostLine {
    pub before: f64,
    pub after: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub format_version: u32,
    pub ciscale_version: String,
    /// [`crate::model::Desired::config_hash`] of the config planned with.
    pub config_hash: String,
    /// [`fingerprint`] of the observation planned from. `apply PLANFILE` says when a fresh observation differs,
    /// and checks each change's [`preconditions`] against it (it no longer refuses the whole plan).
    pub observed_fingerprint: String,
    pub planned_at: Timestamp,
    pub pools: Vec<PoolStatus>,
    pub changes: Vec<Change>,
    /// Things worth knowing outside any configured pool: orphans kept and why, agent records that look like
    /// ours but are not provably ours ("not ours, left alone").
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub summary: Summary,
    pub cost: Cost,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }
}
