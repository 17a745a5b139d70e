//! The plan: what ciscale would change and why. Built by the pure [`plan`] function, rendered for humans
//! ([`render`]) and machines (the same types, serialised as JSON), written to plan files and executed by `apply`.
//!
//! Apply only executes the changes it is given; it never branches on `reason`, which is for humans.

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::model::{AgentId, BackendName, CiName, InstanceId, PoolName};

mod cost;
mod fasthash;
pub mod matching;
mod policy;
pub mod render;

pub use policy::{agent_hash, fingerprint, instance_name, plan};

/// Version of the plan JSON / plan file format. Bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;

/// The small closed set of things apply can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Action {
    /// Register an agent, create an instance with its credential, start the agent.
    Create,
    /// Start a stopped instance (or resume a drained one): start → undrain.
    Start,
    /// Stop an instance whose agent is drained and idle: stop (the instance and its agent record stay).
    Stop,
    /// Tell the CI to give the agent no new jobs; the instance goes on a later cycle once idle.
    Drain,
    /// Delete an instance whose agent is drained and idle (or that has no agent): delete → deregister.
    Delete,
    /// Spec drift on an idle, drained agent: delete → deregister → create with the pool's current spec.
    Replace,
    /// Remove a CI agent record that has no instance.
    Deregister,
}

impl Action {
    pub fn symbol(self) -> &'static str {
        match self {
            Action::Create => "+",
            Action::Start => ">",
            Action::Stop => "<",
            Action::Drain => "~",
            Action::Delete => "-",
            Action::Replace => "-/+",
            Action::Deregister => "x",
        }
    }

    pub fn verb(self) -> &'static str {
        match self {
            Action::Create => "create",
            Action::Start => "start",
            Action::Stop => "stop",
            Action::Drain => "drain",
            Action::Delete => "delete",
            Action::Replace => "replace",
            Action::Deregister => "deregister",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.verb())
    }
}

/// An instance a change acts on. `id` is `None` for an instance that does not exist yet.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct InstanceTarget {
    pub backend: BackendName,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<InstanceId>,
    pub name: String,
}

/// A CI agent record a change acts on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentTarget {
    pub ci: CiName,
    pub id: AgentId,
    pub name: String,
}

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
    /// Attributes now (empty for a create).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub before: BTreeMap<String, String>,
    /// Attributes afterwards (empty for a delete). For a create: the labels and machine attributes to create
    /// with, keys `label.<k>` and `machine.<k>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub after: BTreeMap<String, String>,
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
    /// [`fingerprint`] of the observation planned from; apply refuses a plan file whose fingerprint no longer
    /// matches a fresh observation.
    pub observed_fingerprint: String,
    pub planned_at: Timestamp,
    pub pools: Vec<PoolStatus>,
    pub changes: Vec<Change>,
    pub summary: Summary,
    pub cost: Cost,
}

impl Plan {
    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }
}
