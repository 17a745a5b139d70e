//! The pure planner: from what the user wants ([`Desired`]), what was observed ([`Observed`]) and the time,
//! decide every change, pool by pool, with a reason a human can check.
//!
//! Nothing here does I/O, reads the clock or the environment, or iterates a hash map in a way that shows: the
//! same inputs give the same plan, byte for byte. Hash maps are used for lookups only.
//!
//! Per pool the decision follows one path (see the numbered rules in `plan_pool`): classify every instance
//! (serving, drained, stopped, broken, ...), derive the desired count from the matching demand, then scale up
//! (resume drained → start stopped → create) or down (drain idle agents past their idle timeout, then delete or
//! stop the drained ones on a later cycle), replace drifted instances once idle, and clean up orphans.

use std::collections::{BTreeMap, BTreeSet};

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;
use sha2::{Digest, Sha256};

use super::cost::estimate_cost;
use super::fasthash::{FastMap, FastSet};
use super::matching::{azure_matches, azure_pool_matches, woodpecker_matches, WOODPECKER_INTERNAL_PREFIX};
use super::{Action, AgentTarget, Change, InstanceTarget, Plan, PoolStatus, Summary, FORMAT_VERSION};
use crate::model::{
    Agent, AgentId, AgentRef, AgentSpec, BackendName, Billing, CiKind, CiName, CiObservation, Desired, Instance,
    InstanceId, InstanceMode, InstanceState, Observed, PoolName, PoolSpec, ScalePolicy, Task, AGENT_HASH_LABEL, OWNER_LABEL,
    POOL_LABEL,
};

/// Name of the `index`-th instance of a pool (index from 1). Deterministic, so a create retried after a crash
/// finds the instance it already made (create-if-absent).
pub fn instance_name(owner: &str, pool: &PoolName, index: u32) -> String {
    format!("{owner}-{pool}-{index}")
}

/// Digest of the agent settings an instance is created with (image and plain env; secrets are left out so a
/// rotated token does not replace every agent). First 12 hex chars of a SHA-256, stored on the instance as the
/// `ciscale.agent-hash` label and compared for spec drift.
pub fn agent_hash(agent: &AgentSpec) -> String {
    let mut hasher = Sha256::new();
    // NUL separators keep the encoding unambiguous (`a=b` + `c` never equals `a` + `b=c`).
    hasher.update(b"image\0");
    hasher.update(agent.image.as_deref().unwrap_or_default().as_bytes());
    hasher.update(b"\0");
    for (key, value) in &agent.env {
        hasher.update(b"env\0");
        hasher.update(key.as_bytes());
        hasher.update(b"\0");
        hasher.update(value.as_bytes());
        hasher.update(b"\0");
    }
    let mut hex = to_hex(&hasher.finalize());
    hex.truncate(12);
    hex
}

/// Digest of the parts of an observation that make a saved plan stale: per backend the instances (id, state,
/// owner and pool labels), per CI source the agents (id, drained). Timestamps and the queue are left out: they
/// change on every poll without making the plan's changes wrong.
pub fn fingerprint(observed: &Observed) -> String {
    #[derive(Serialize)]
    struct InstanceKey<'a> {
        id: &'a str,
        state: InstanceState,
        owner: Option<&'a str>,
        pool: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct AgentKey<'a> {
        id: &'a str,
        no_schedule: bool,
    }
    #[derive(Serialize)]
    struct Inventory<'a> {
        backends: BTreeMap<&'a str, Vec<InstanceKey<'a>>>,
        ci: BTreeMap<&'a str, Vec<AgentKey<'a>>>,
    }
    let backends = observed
        .backends
        .iter()
        .map(|(name, backend)| {
            let mut instances: Vec<InstanceKey<'_>> = backend
                .instances
                .iter()
                .map(|instance| InstanceKey {
                    id: instance.id.as_str(),
                    state: instance.state,
                    owner: instance.labels.get(OWNER_LABEL).map(String::as_str),
                    pool: instance.labels.get(POOL_LABEL).map(String::as_str),
                })
                .collect();
            instances.sort_by(|a, b| (a.id, a.state, a.owner, a.pool).cmp(&(b.id, b.state, b.owner, b.pool)));
            (name.as_str(), instances)
        })
        .collect();
    let ci = observed
        .ci
        .iter()
        .map(|(name, source)| {
            let mut agents: Vec<AgentKey<'_>> = source
                .agents
                .iter()
                .map(|agent| AgentKey { id: agent.id.as_str(), no_schedule: agent.no_schedule })
                .collect();
            agents.sort_by(|a, b| (a.id, a.no_schedule).cmp(&(b.id, b.no_schedule)));
            (name.as_str(), agents)
        })
        .collect();
    // Serialising plain strings, bools and enums cannot fail; an empty digest input would still be deterministic.
    let bytes = serde_json::to_vec(&Inventory { backends, ci }).unwrap_or_default();
    format!("sha256:{}", to_hex(&Sha256::digest(&bytes)))
}

fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

// ---------------------------------------------------------------------------------------------------------------
// Indexes built once per plan
// ---------------------------------------------------------------------------------------------------------------

/// One CI source's observation, indexed for the lookups the policy makes per instance.
struct CiIndex<'a> {
    name: &'a CiName,
    agents_by_name: FastMap<&'a str, &'a Agent>,
    agents_by_id: FastMap<&'a AgentId, &'a Agent>,
    running_by_agent: FastMap<&'a AgentId, u32>,
}

impl<'a> CiIndex<'a> {
    fn new(name: &'a CiName, observation: &'a CiObservation) -> Self {
        let mut agents_by_name = FastMap::with_capacity_and_hasher(observation.agents.len(), Default::default());
        let mut agents_by_id = FastMap::with_capacity_and_hasher(observation.agents.len(), Default::default());
        for agent in &observation.agents {
            // First record wins on duplicates, so the choice follows the observation's order, not hashing.
            agents_by_name.entry(agent.name.as_str()).or_insert(agent);
            agents_by_id.entry(&agent.id).or_insert(agent);
        }
        let mut running_by_agent: FastMap<&AgentId, u32> = FastMap::default();
        for task in &observation.queue.running {
            if let Some(agent_id) = &task.agent_id {
                *running_by_agent.entry(agent_id).or_default() += 1;
            }
        }
        Self { name, agents_by_name, agents_by_id, running_by_agent }
    }

    fn lookup(&self, reference: &AgentRef) -> Option<&'a Agent> {
        match reference {
            AgentRef::Id(id) => self.agents_by_id.get(id).copied(),
            AgentRef::Name(name) => self.agents_by_name.get(name.as_str()).copied(),
        }
    }

    fn running_on(&self, agent: &Agent) -> u32 {
        self.running_by_agent.get(&agent.id).copied().unwrap_or(0)
    }

    fn is_busy(&self, agent: &Agent) -> bool {
        agent.busy || self.running_on(agent) > 0
    }

    fn target(&self, agent: &Agent) -> AgentTarget {
        AgentTarget { ci: self.name.clone(), id: agent.id.clone(), name: agent.name.clone() }
    }
}

/// Which matching rule a CI source speaks. The fake speaks both (labels and demands).
#[derive(Clone, Copy)]
enum MatchRule {
    Woodpecker,
    Azure,
    Both,
}

fn match_rule(desired: &Desired, source: &CiName) -> MatchRule {
    match desired.ci.get(source).map(|spec| &spec.kind) {
        Some(CiKind::Woodpecker { .. }) => MatchRule::Woodpecker,
        Some(CiKind::AzurePipelines { .. }) => MatchRule::Azure,
        Some(CiKind::Fake(_)) | None => MatchRule::Both,
    }
}

fn pool_matches(rule: MatchRule, pool: &PoolSpec, labels: &BTreeMap<String, String>, demands: &[String]) -> bool {
    match rule {
        MatchRule::Woodpecker => woodpecker_matches(&pool.ci.labels, labels),
        MatchRule::Azure => {
            azure_pool_matches(pool.ci.azure_pool.as_deref(), labels) && azure_matches(&pool.ci.capabilities, demands)
        }
        MatchRule::Both => woodpecker_matches(&pool.ci.labels, labels) && azure_matches(&pool.ci.capabilities, demands),
    }
}

/// Pending jobs per pool (indexed like `desired.pools`): each job counts for the first pool in config order
/// that has its source and matches it, never twice.
///
/// Jobs are grouped by what matching can see of them first (see [`LabelProjection`]), so the cost is
/// (jobs × labels) + (distinct groups × pools) rather than (jobs × pools): a queue of 100,000 jobs over 500 repos
/// collapses to a handful of groups when the pools accept any repo.
fn assign_pending(desired: &Desired, observed: &Observed) -> Vec<u32> {
    let mut pending = vec![0u32; desired.pools.len()];
    for (source, observation) in &observed.ci {
        let pools_of_source: Vec<usize> =
            desired.pools.iter().enumerate().filter(|(_, pool)| &pool.ci.source == source).map(|(i, _)| i).collect();
        if pools_of_source.is_empty() || observation.queue.pending.is_empty() {
            continue;
        }
        let rule = match_rule(desired, source);
        let projection = LabelProjection::new(pools_of_source.iter().map(|&i| &desired.pools[i]));
        // Grouped by a hash of the projection, each bucket checked for real equality (no allocation per job).
        let mut groups: FastMap<u64, Vec<(&Task, u32)>> = FastMap::default();
        for task in &observation.queue.pending {
            let bucket = groups.entry(projection.hash(task)).or_default();
            match bucket.iter_mut().find(|(representative, _)| projection.same(representative, task)) {
                Some((_, count)) => *count += 1,
                None => bucket.push((task, 1)),
            }
        }
        // Summation is order-independent, so iterating the hash map here cannot leak into the plan.
        for (representative, count) in groups.into_values().flatten() {
            let labels: BTreeMap<String, String> = projection
                .project(&representative.labels)
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .collect();
            let demands = representative.demands.as_slice();
            if let Some(&pool_index) =
                pools_of_source.iter().find(|&&i| pool_matches(rule, &desired.pools[i], &labels, demands))
            {
                pending[pool_index] = pending[pool_index].saturating_add(count);
            }
        }
    }
    pending
}

/// Reduces a task's labels to what Woodpecker matching against a given set of pools can tell apart, without
/// changing any match result:
/// - a key some pool requires (`!key`) keeps its exact value, whatever it is;
/// - otherwise internal `woodpecker-ci.org/*` keys and empty values are dropped (matching ignores them);
/// - a key some pool names with a concrete value keeps its value; a key every pool names only as `*` (or not at
///   all) keeps its presence but not its value (`*`), since only presence can change the outcome.
struct LabelProjection<'a> {
    required: FastSet<&'a str>,
    exact: FastSet<&'a str>,
}

impl<'a> LabelProjection<'a> {
    fn new(pools: impl Iterator<Item = &'a PoolSpec>) -> Self {
        let mut required = FastSet::default();
        let mut exact = FastSet::default();
        for pool in pools {
            // Azure requests carry their pool's name, which matching compares exactly.
            if pool.ci.azure_pool.is_some() {
                exact.insert(crate::model::AZURE_POOL_LABEL);
            }
            for (key, value) in &pool.ci.labels {
                match key.strip_prefix('!') {
                    Some(required_key) => {
                        required.insert(required_key);
                    }
                    None if value != "*" => {
                        exact.insert(key.as_str());
                    }
                    None => {}
                }
            }
        }
        Self { required, exact }
    }

    fn project<'t>(&'t self, labels: &'t BTreeMap<String, String>) -> impl Iterator<Item = (&'t str, &'t str)> + 't {
        labels.iter().filter_map(|(key, value)| {
            let key = key.as_str();
            if self.required.contains(key) {
                return Some((key, value.as_str()));
            }
            if value.is_empty() || key.starts_with(WOODPECKER_INTERNAL_PREFIX) {
                return None;
            }
            Some((key, if self.exact.contains(key) { value.as_str() } else { "*" }))
        })
    }

    fn hash(&self, task: &Task) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut hasher = super::fasthash::FxHasher::default();
        for pair in self.project(&task.labels) {
            pair.hash(&mut hasher);
        }
        task.demands.hash(&mut hasher);
        hasher.finish()
    }

    fn same(&self, a: &Task, b: &Task) -> bool {
        a.demands == b.demands && self.project(&a.labels).eq(self.project(&b.labels))
    }
}

/// Instances of every backend, indexed by owner/pool label and by id.
struct BackendIndex<'a> {
    /// Instances labelled with our owner, by pool label value (`None`: no pool label).
    owned_by_pool: FastMap<Option<&'a str>, Vec<&'a Instance>>,
    by_id: FastMap<&'a InstanceId, &'a Instance>,
}

fn index_backends<'a>(desired: &Desired, observed: &'a Observed) -> BTreeMap<&'a BackendName, BackendIndex<'a>> {
    observed
        .backends
        .iter()
        .map(|(name, backend)| {
            let mut owned_by_pool: FastMap<Option<&str>, Vec<&Instance>> = FastMap::default();
            let mut by_id = FastMap::with_capacity_and_hasher(backend.instances.len(), Default::default());
            for instance in &backend.instances {
                by_id.entry(&instance.id).or_insert(instance);
                if instance.owner() == Some(desired.owner.as_str()) {
                    owned_by_pool
                        .entry(instance.labels.get(POOL_LABEL).map(String::as_str))
                        .or_default()
                        .push(instance);
                }
            }
            (name, BackendIndex { owned_by_pool, by_id })
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------------------------------------------

/// Plans every pool, then the orphans, and totals the result. Pure: see the module docs.
pub fn plan(desired: &Desired, observed: &Observed, now: Timestamp) -> Plan {
    let ci_indexes: BTreeMap<&CiName, CiIndex<'_>> =
        observed.ci.iter().map(|(name, observation)| (name, CiIndex::new(name, observation))).collect();
    let backend_indexes = index_backends(desired, observed);
    let pending = assign_pending(desired, observed);
    let used_names: FastSet<&str> = observed
        .backends
        .values()
        .flat_map(|backend| backend.instances.iter().map(|instance| instance.name.as_str()))
        .chain(observed.ci.values().flat_map(|ci| ci.agents.iter().map(|agent| agent.name.as_str())))
        .collect();

    let mut changes = Vec::new();
    let mut pools = Vec::with_capacity(desired.pools.len());
    // (backend, instance id) of every instance some pool claimed: the rest of our labelled ones are orphans.
    // The value is the claiming pool's index (the cost estimate prices instances by their pool's machine).
    let mut claimed: FastMap<(&BackendName, &InstanceId), usize> = FastMap::default();

    for (pool_index, pool) in desired.pools.iter().enumerate() {
        let context = PoolContext {
            desired,
            observed,
            pool,
            ci: ci_indexes.get(&pool.ci.source),
            backend: backend_indexes.get(&pool.backend.backend),
            pending_jobs: pending[pool_index],
            used_names: &used_names,
            now,
        };
        let outcome = plan_pool(&context);
        for (backend, id) in outcome.claimed {
            claimed.entry((backend, id)).or_insert(pool_index);
        }
        changes.extend(outcome.changes);
        pools.push(outcome.status);
    }

    changes.extend(plan_orphan_instances(desired, observed, &ci_indexes, &claimed));
    changes.extend(plan_orphan_agents(desired, observed, &ci_indexes));

    let pool_rank: FastMap<&PoolName, usize> = desired.pools.iter().enumerate().map(|(i, p)| (&p.name, i)).collect();
    // Cached keys: comparing through the rank map on every comparison costs more than the rest of the sort.
    changes.sort_by_cached_key(|change| {
        let rank = pool_rank.get(&change.pool).copied().unwrap_or(usize::MAX);
        (rank, change.pool.clone(), action_rank(change.action), target_name(change).to_owned())
    });

    let summary = summarize(&changes);
    let cost = estimate_cost(desired, observed, &changes, &claimed);
    Plan {
        format_version: FORMAT_VERSION,
        ciscale_version: env!("CARGO_PKG_VERSION").to_owned(),
        config_hash: desired.config_hash.clone(),
        observed_fingerprint: fingerprint(observed),
        planned_at: now,
        pools,
        changes,
        summary,
        cost,
    }
}

/// Apply order within a pool: free things first (deregister, delete), then replace/stop/drain, then the
/// things that add capacity.
fn action_rank(action: Action) -> u8 {
    match action {
        Action::Deregister => 0,
        Action::Delete => 1,
        Action::Replace => 2,
        Action::Stop => 3,
        Action::Drain => 4,
        Action::Start => 5,
        Action::Create => 6,
    }
}

fn target_name(change: &Change) -> &str {
    change
        .instance
        .as_ref()
        .map(|instance| instance.name.as_str())
        .or_else(|| change.agent.as_ref().map(|agent| agent.name.as_str()))
        .unwrap_or_default()
}

fn summarize(changes: &[Change]) -> Summary {
    let mut summary = Summary::default();
    for change in changes {
        match change.action {
            Action::Create => summary.create += 1,
            Action::Start => summary.start += 1,
            Action::Stop => summary.stop += 1,
            Action::Delete => summary.delete += 1,
            Action::Drain => summary.drain += 1,
            Action::Deregister => summary.deregister += 1,
            Action::Replace => {
                summary.create += 1;
                summary.delete += 1;
            }
        }
    }
    summary
}

// ---------------------------------------------------------------------------------------------------------------
// One pool
// ---------------------------------------------------------------------------------------------------------------

struct PoolContext<'a> {
    desired: &'a Desired,
    observed: &'a Observed,
    pool: &'a PoolSpec,
    ci: Option<&'a CiIndex<'a>>,
    backend: Option<&'a BackendIndex<'a>>,
    pending_jobs: u32,
    /// Names of every observed instance and agent record (built once: pools must not rescan the world).
    used_names: &'a FastSet<&'a str>,
    now: Timestamp,
}

struct PoolOutcome<'a> {
    status: PoolStatus,
    changes: Vec<Change>,
    claimed: Vec<(&'a BackendName, &'a InstanceId)>,
}

/// An instance of the pool with everything the rules look at.
struct Member<'a> {
    instance: &'a Instance,
    agent: Option<&'a Agent>,
    /// Running jobs on its agent (at least 1 when the CI flags the agent busy without naming a job).
    running_jobs: u32,
    busy: bool,
    drained: bool,
    idle_since: Timestamp,
    /// `(key, instance value, pool value)` for every attribute that no longer matches the pool (create mode).
    drift: Vec<(String, String, String)>,
}

impl Member<'_> {
    fn name(&self) -> &str {
        &self.instance.name
    }
}

fn plan_pool<'a>(cx: &PoolContext<'a>) -> PoolOutcome<'a> {
    let pool = cx.pool;
    // A schedule window in force overrides the pool's bounds for this plan only.
    let window = pool.scale.schedule.iter().find(|window| window.contains(cx.now));
    let scheduled;
    let policy = match window {
        Some(window) => {
            scheduled = ScalePolicy {
                min: window.min.unwrap_or(pool.scale.min),
                max: window.max.unwrap_or(pool.scale.max),
                min_idle: window.min_idle.unwrap_or(pool.scale.min_idle),
                ..pool.scale.clone()
            };
            &scheduled
        }
        None => &pool.scale,
    };
    let backend_name = &pool.backend.backend;
    let create_mode = matches!(pool.backend.mode, InstanceMode::Create);
    let hash = agent_hash(&pool.agent);
    let mut changes = Vec::new();
    let mut notes = Vec::new();

    // An image the backend lacks (an Incus alias `ciscale provision` has not built yet): every create from it would
    // fail, so none is planned, and drifted instances keep serving until their replacement can be created.
    let missing_image = pool.backend.machine.get("image").filter(|image| {
        let observed = cx.observed.backends.get(backend_name);
        create_mode && observed.is_some_and(|backend| backend.missing_images.contains(image))
    });
    if let Some(image) = missing_image {
        notes.push(format!("image alias `{image}` is missing on backend `{backend_name}`: run `ciscale provision`"));
    }

    let members = gather_members(cx, &hash);
    let claimed = members.iter().map(|member| (backend_name_ref(cx, backend_name), &member.instance.id)).collect();

    let instance_target = |member: &Member<'_>| InstanceTarget {
        backend: backend_name.clone(),
        id: Some(member.instance.id.clone()),
        name: member.instance.name.clone(),
    };
    let agent_target = |member: &Member<'_>| match (cx.ci, member.agent) {
        (Some(ci), Some(agent)) => Some(ci.target(agent)),
        _ => None,
    };
    let change = |member: &Member<'_>, action: Action, reason: String| Change {
        pool: pool.name.clone(),
        action,
        instance: Some(instance_target(member)),
        agent: agent_target(member),
        reason,
        before: BTreeMap::new(),
        after: BTreeMap::new(),
    };

    // Classify. Rules 4 and 5 (broken and finished ephemeral instances) act here and never count as capacity.
    let mut serving: Vec<&Member<'_>> = Vec::new();
    let mut drained: Vec<&Member<'_>> = Vec::new();
    let mut stopped: Vec<&Member<'_>> = Vec::new();
    for member in &members {
        match member.instance.state {
            // An adopted instance cannot be replaced by ciscale: say why it does not serve, every cycle.
            InstanceState::Stopping if !create_mode => notes.push(format!(
                "{} ({}): stopping; it can be started again once it has stopped",
                member.name(),
                member.instance.id
            )),
            InstanceState::Terminated | InstanceState::Deleting if !create_mode => notes.push(format!(
                "{} ({}): adopted instance is {} and can never be started again; remove it from \
                 `startStop.instances`",
                member.name(),
                member.instance.id,
                member.instance.state
            )),
            InstanceState::Terminated | InstanceState::Deleting | InstanceState::Stopping => {}
            InstanceState::Stopped => {
                if create_mode && policy.ephemeral && member.busy {
                    // The CI still lists a job on it (it notices a dead agent late): never touch a busy agent.
                    notes.push(format!("{}: stopped, waiting for the ci to release its job", member.name()));
                } else if create_mode && policy.ephemeral {
                    changes.push(change(member, Action::Delete, "ephemeral agent finished its job".to_owned()));
                } else {
                    stopped.push(member);
                }
            }
            InstanceState::Pending | InstanceState::Running | InstanceState::Unknown => {
                if let Some(reason) = never_registered(cx, member) {
                    let action = if create_mode { Action::Delete } else { Action::Stop };
                    changes.push(change(member, action, reason));
                } else if member.drained {
                    drained.push(member);
                } else {
                    serving.push(member);
                }
            }
        }
    }

    if let InstanceMode::StartStop { instances: adopted } = &pool.backend.mode {
        for adoption in adopted.iter().filter(|adoption| !members.iter().any(|m| m.instance.id == adoption.id)) {
            notes.push(format!(
                "adopted instance `{}` was not found on backend `{backend_name}`; check its id and region",
                adoption.id
            ));
        }
    }

    // Demand: jobs waiting for this pool plus jobs running on its serving agents. Jobs on drained agents are
    // left out on purpose: those agents are on their way out, and counting their jobs would resume them.
    let running_on_serving: u32 = serving.iter().map(|member| member.running_jobs).sum();
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
        notes.push(format!("demand wants {wanted} agents, capped at max {}", policy.max));
    }
    let active = serving.len() as u32;
    let busy = serving.iter().filter(|member| member.busy).count() as u32;
    let idle = serving.iter().filter(|member| member.agent.is_some() && !member.busy).count() as u32;
    let scale_up_reason = format!(
        "{} waiting, {} running, {} active (desired {}, max {})",
        plural(cx.pending_jobs, "job"),
        running_on_serving,
        active,
        desired_count,
        policy.max
    );

    // Rule 6 on serving instances: drift is drained once the agent is idle; the drained instance keeps its slot
    // (it is replaced one for one on a later cycle), so it still counts as active.
    let mut drift_drained: BTreeSet<&str> = BTreeSet::new();
    for member in &serving {
        if member.drift.is_empty() {
            continue;
        }
        let what = describe_drift(&member.drift);
        if let Some(image) = missing_image {
            notes.push(format!("{}: spec changed ({what}); replaced once image `{image}` exists", member.name()));
        } else if member.busy {
            notes.push(format!("{}: spec changed ({what}); waiting for agent to go idle", member.name()));
        } else if member.agent.is_some() {
            changes.push(change(member, Action::Drain, format!("spec changed: {what}")));
            drift_drained.insert(member.name());
        }
    }

    let mut need = desired_count.saturating_sub(active);

    // Rule 1a: resume drained agents (idle ones first: they take a job right away). Drifted ones are replaced
    // instead, never resumed.
    let mut resumable: Vec<&Member<'_>> = drained.iter().copied().filter(|member| member.drift.is_empty()).collect();
    resumable.sort_by_key(|member| (member.busy, member.name()));
    let mut resumed: BTreeSet<&str> = BTreeSet::new();
    for member in resumable {
        if need == 0 {
            break;
        }
        need -= 1;
        resumed.insert(member.name());
        changes.push(change(member, Action::Start, format!("resume drained agent: {scale_up_reason}")));
    }

    // Rules 3 and 6 on drained instances: replace drifted ones while capacity is wanted, otherwise remove idle
    // ones; a busy one finishes its job first.
    for member in &drained {
        if resumed.contains(member.name()) {
            continue;
        }
        if member.busy {
            notes.push(format!("{}: drained, waiting for job to finish", member.name()));
            continue;
        }
        if !member.drift.is_empty() && create_mode && need > 0 {
            need -= 1;
            if let Some(image) = missing_image {
                notes.push(format!("{}: drained for replacement, waiting for image `{image}`", member.name()));
                continue;
            }
            let mut replace =
                change(member, Action::Replace, format!("spec changed: {}", describe_drift(&member.drift)));
            for (key, have, want) in &member.drift {
                replace.before.insert(key.clone(), have.clone());
                replace.after.insert(key.clone(), want.clone());
            }
            changes.push(replace);
        } else if create_mode {
            changes.push(change(member, Action::Delete, "agent drained and idle".to_owned()));
        } else {
            changes.push(change(member, Action::Stop, "agent drained and idle".to_owned()));
        }
    }

    // Rule 1b: start stopped instances before creating new ones (they keep their disk and agent record).
    let mut startable: Vec<&Member<'_>> = stopped.clone();
    startable.sort_by_key(|member| member.name());
    let mut started: BTreeSet<&str> = BTreeSet::new();
    for member in startable {
        if need == 0 {
            break;
        }
        need -= 1;
        started.insert(member.name());
        changes.push(change(member, Action::Start, format!("start stopped instance: {scale_up_reason}")));
    }
    // A stopped instance nobody needs in create mode is a scaled-down one: it goes once its idle timeout passed
    // (stopped servers still cost money on Hetzner). Adopted instances are only ever stopped.
    if create_mode {
        for member in &stopped {
            if started.contains(member.name()) || member.busy {
                continue;
            }
            let idle_for = cx.now.duration_since(member.idle_since);
            if idle_for >= policy.idle_timeout.signed() {
                changes.push(change(
                    member,
                    Action::Delete,
                    format!("stopped and not needed, idle for {}", human_duration(idle_for)),
                ));
            }
        }
    }

    // Rule 1c: create what is still missing. `need` never exceeds `max - active`, so in-flight creates,
    // resumes and starts together stay within `max`.
    if need > 0 {
        if let Some(image) = missing_image {
            notes.push(format!("{} held back until image `{image}` exists", plural(need, "create")));
        } else if create_mode {
            let mut names = NameAllocator::new(cx);
            // Built once per pool: every create of the pool carries the same labels and machine.
            let mut create_after = BTreeMap::new();
            create_after.insert(format!("label.{OWNER_LABEL}"), cx.desired.owner.clone());
            create_after.insert(format!("label.{POOL_LABEL}"), pool.name.to_string());
            create_after.insert(format!("label.{AGENT_HASH_LABEL}"), hash.clone());
            for (key, value) in &pool.backend.machine {
                create_after.insert(format!("machine.{key}"), value.clone());
            }
            // A pre-registered agent is not created but undrained once its new instance runs: apply needs its id.
            let preregistered = pool
                .agent
                .preregistered
                .as_ref()
                .and_then(|reference| cx.ci.and_then(|ci| ci.lookup(reference).map(|agent| ci.target(agent))));
            for _ in 0..need {
                let name = names.next();
                let after = create_after.clone();
                changes.push(Change {
                    pool: pool.name.clone(),
                    action: Action::Create,
                    instance: Some(InstanceTarget { backend: backend_name.clone(), id: None, name }),
                    agent: preregistered.clone(),
                    reason: scale_up_reason.clone(),
                    before: BTreeMap::new(),
                    after,
                });
            }
        } else {
            notes.push(format!("{} more wanted, but no more adopted instances to start", need));
        }
    }

    // Rule 2: scale down. Only idle, undrained agents past their idle timeout (and, on hourly billing, near the
    // end of their paid hour) are drained, longest idle first; the instance goes on a later cycle (rule 3).
    let excess = active.saturating_sub(desired_count);
    if excess > 0 {
        let hourly_margin = match billing_of(cx.desired, backend_name) {
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
                notes.push(format!(
                    "{}: idle for {} (idle timeout {})",
                    member.name(),
                    human_duration(idle_for),
                    policy.idle_timeout
                ));
                continue;
            }
            if let Some(margin) = hourly_margin {
                let left = paid_time_left(member.instance.created_at, cx.now);
                if left > margin.signed() {
                    notes.push(format!("{}: kept until its paid hour ends in {}", member.name(), human_duration(left)));
                    continue;
                }
            }
            drained_now += 1;
            changes.push(change(
                member,
                Action::Drain,
                format!("idle for {} (idle timeout {})", human_duration(idle_for), policy.idle_timeout),
            ));
        }
    }

    let status = PoolStatus {
        pool: pool.name.clone(),
        pending_jobs: cx.pending_jobs,
        running_jobs,
        active,
        busy,
        idle,
        desired: desired_count,
        window: window.map(|window| window.name.clone()),
        notes,
    };
    PoolOutcome { status, changes, claimed }
}

/// The observed backend name key (borrowed from the observation) for a pool's backend; the pool's own name
/// when the backend was not observed (then the pool has no members and this is never called).
fn backend_name_ref<'a>(cx: &PoolContext<'a>, name: &'a BackendName) -> &'a BackendName {
    cx.observed.backends.get_key_value(name).map(|(key, _)| key).unwrap_or(name)
}

fn billing_of(desired: &Desired, backend: &BackendName) -> Billing {
    desired.backends.get(backend).map(|spec| spec.billing).unwrap_or(Billing::PerSecond)
}

/// Time left in the instance's current paid hour (hourly billing starts at creation).
fn paid_time_left(created_at: Timestamp, now: Timestamp) -> SignedDuration {
    let elapsed = now.duration_since(created_at).as_secs().max(0);
    SignedDuration::from_secs(3600 - elapsed % 3600)
}

/// Rule 4: an instance whose agent never checked in within the bootstrap timeout is broken (bad image, bad
/// credential, ...): it is removed and not counted as capacity, so a fresh one takes its place.
fn never_registered(cx: &PoolContext<'_>, member: &Member<'_>) -> Option<String> {
    let timeout = cx.pool.scale.bootstrap_timeout;
    let age = cx.now.duration_since(member.instance.created_at);
    if age <= timeout.signed() || member.busy {
        return None;
    }
    let silent = match member.agent {
        None => member.instance.state == InstanceState::Running,
        Some(agent) => agent.last_contact.is_none() && member.instance.state == InstanceState::Running,
    };
    silent.then(|| format!("agent never registered within {timeout}"))
}

fn gather_members<'a>(cx: &PoolContext<'a>, hash: &str) -> Vec<Member<'a>> {
    let Some(backend) = cx.backend else {
        return Vec::new();
    };
    let mut instances: Vec<(&'a Instance, Option<&'a AdoptedInstanceRef>)> = backend
        .owned_by_pool
        .get(&Some(cx.pool.name.as_str()))
        .map(|owned| owned.iter().map(|instance| (*instance, None)).collect())
        .unwrap_or_default();
    if let InstanceMode::StartStop { instances: adopted } = &cx.pool.backend.mode {
        for adoption in adopted {
            if let Some(instance) = backend.by_id.get(&adoption.id) {
                // An adopted instance may also carry our labels: keep one entry, with its agent reference.
                instances.retain(|(known, _)| known.id != instance.id);
                instances.push((*instance, Some(adoption)));
            }
        }
    }
    let create_mode = matches!(cx.pool.backend.mode, InstanceMode::Create);
    let mut members: Vec<Member<'a>> = instances
        .into_iter()
        .map(|(instance, adoption)| {
            // An adopted instance names its agent; a Picus-style pool runs its one pre-registered agent; otherwise
            // the agent is named like its instance.
            let reference = adoption.and_then(|a| a.agent.as_ref()).or(cx.pool.agent.preregistered.as_ref());
            let agent = cx.ci.and_then(|ci| match reference {
                Some(reference) => ci.lookup(reference),
                None => ci.agents_by_name.get(instance.name.as_str()).copied(),
            });
            let (running_tasks, flagged_busy) = match (cx.ci, agent) {
                (Some(ci), Some(agent)) => (ci.running_on(agent), agent.busy),
                _ => (0, false),
            };
            let running_jobs = if flagged_busy { running_tasks.max(1) } else { running_tasks };
            let idle_since = agent
                .and_then(|agent| agent.last_work)
                .map_or(instance.created_at, |last_work| last_work.max(instance.created_at));
            let drift = if create_mode { drift_of(instance, cx.pool, hash) } else { Vec::new() };
            Member {
                instance,
                agent,
                running_jobs,
                busy: running_jobs > 0,
                drained: agent.is_some_and(|agent| agent.no_schedule),
                idle_since,
                drift,
            }
        })
        .collect();
    members.sort_by(|a, b| (a.name(), &a.instance.id).cmp(&(b.name(), &b.instance.id)));
    members
}

type AdoptedInstanceRef = crate::model::AdoptedInstance;

/// Rule 6: attributes that differ from the pool's machine (first candidate of a comma list; a key the
/// provider does not report is not drift) and a different agent hash.
fn drift_of(instance: &Instance, pool: &PoolSpec, hash: &str) -> Vec<(String, String, String)> {
    let mut drift = Vec::new();
    for (key, value) in &pool.backend.machine {
        // A comma list is a capacity fallback: an instance created from any of its candidates is as wanted, or a
        // fallback server would be replaced (and replaced again) while the first choice stays unavailable.
        if let Some(have) = instance.attributes.get(key) {
            if !value.split(',').map(str::trim).any(|candidate| candidate == have) {
                drift.push((key.clone(), have.clone(), first_candidate(value).to_owned()));
            }
        }
    }
    if let Some(have) = instance.labels.get(AGENT_HASH_LABEL) {
        if have != hash {
            drift.push(("agent-hash".to_owned(), have.clone(), hash.to_owned()));
        }
    }
    drift
}

fn describe_drift(drift: &[(String, String, String)]) -> String {
    drift.iter().map(|(key, have, want)| format!("{key} {have} → {want}")).collect::<Vec<_>>().join(", ")
}

pub(super) fn first_candidate(value: &str) -> &str {
    value.split(',').next().unwrap_or_default().trim()
}

/// Hands out `{owner}-{pool}-{n}` names, lowest `n` first, skipping every name an observed instance (any
/// backend, any state) or an agent record (any CI source) already uses, so a create never collides with a
/// leftover that is still being cleaned up.
struct NameAllocator<'a> {
    owner: &'a str,
    pool: &'a PoolName,
    used: &'a FastSet<&'a str>,
    next_index: u32,
}

impl<'a> NameAllocator<'a> {
    fn new(cx: &PoolContext<'a>) -> Self {
        Self { owner: &cx.desired.owner, pool: &cx.pool.name, used: cx.used_names, next_index: 1 }
    }

    fn next(&mut self) -> String {
        loop {
            let name = instance_name(self.owner, self.pool, self.next_index);
            self.next_index += 1;
            if !self.used.contains(name.as_str()) {
                return name;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Orphans
// ---------------------------------------------------------------------------------------------------------------

/// Rule 7a: instances with our owner label that no pool claims (their pool was removed from the config or moved
/// to another backend). Drained first while the agent works, then deleted.
fn plan_orphan_instances(
    desired: &Desired,
    observed: &Observed,
    ci_indexes: &BTreeMap<&CiName, CiIndex<'_>>,
    claimed: &FastMap<(&BackendName, &InstanceId), usize>,
) -> Vec<Change> {
    let mut changes = Vec::new();
    for (backend_name, backend) in &observed.backends {
        for instance in &backend.instances {
            if instance.owner() != Some(desired.owner.as_str()) || claimed.contains_key(&(backend_name, &instance.id)) {
                continue;
            }
            if matches!(instance.state, InstanceState::Terminated | InstanceState::Deleting | InstanceState::Stopping) {
                continue;
            }
            let pool_label = instance.labels.get(POOL_LABEL).cloned().unwrap_or_default();
            let why = match desired.pool(&PoolName::new(pool_label.clone())) {
                Some(pool) => format!("pool `{pool_label}` now uses backend `{}`", pool.backend.backend),
                None if pool_label.is_empty() => "instance has no pool label".to_owned(),
                None => format!("pool `{pool_label}` is no longer in the config"),
            };
            // The pool is gone, so its CI source is unknown: the first source (by name) with a matching agent.
            let found = ci_indexes
                .values()
                .find_map(|ci| ci.agents_by_name.get(instance.name.as_str()).map(|agent| (ci, *agent)));
            let target = InstanceTarget {
                backend: backend_name.clone(),
                id: Some(instance.id.clone()),
                name: instance.name.clone(),
            };
            let (action, reason) = match found {
                // Never touch a busy agent: the orphan is picked up on a later cycle.
                Some((ci, agent)) if ci.is_busy(agent) => continue,
                Some((_, agent)) if !agent.no_schedule && instance.state.is_active() => {
                    (Action::Drain, format!("orphan: {why}"))
                }
                _ => (Action::Delete, format!("orphan: {why}")),
            };
            changes.push(Change {
                pool: PoolName::new(pool_label),
                action,
                instance: Some(target),
                agent: found.map(|(ci, agent)| ci.target(agent)),
                reason,
                before: BTreeMap::new(),
                after: BTreeMap::new(),
            });
        }
    }
    changes
}

/// Rule 7b: agent records named like ours (`{owner}-...`) with no observed instance of that name and no job.
/// Agents of adopted instances are never touched: ciscale did not register them.
fn plan_orphan_agents(
    desired: &Desired,
    observed: &Observed,
    ci_indexes: &BTreeMap<&CiName, CiIndex<'_>>,
) -> Vec<Change> {
    let prefix = format!("{}-", desired.owner);
    let instance_names: FastSet<&str> = observed
        .backends
        .values()
        .flat_map(|backend| backend.instances.iter())
        .filter(|instance| instance.state != InstanceState::Terminated)
        .map(|instance| instance.name.as_str())
        .collect();
    let mut adopted_agents: FastSet<(&CiName, AgentRefKey<'_>)> = FastSet::default();
    for pool in &desired.pools {
        // A pre-registered agent has no instance named after it, and must outlive every instance it ran on.
        match &pool.agent.preregistered {
            Some(AgentRef::Id(id)) => {
                adopted_agents.insert((&pool.ci.source, AgentRefKey::Id(id.as_str())));
            }
            Some(AgentRef::Name(name)) => {
                adopted_agents.insert((&pool.ci.source, AgentRefKey::Name(name.as_str())));
            }
            None => {}
        }
        if let InstanceMode::StartStop { instances } = &pool.backend.mode {
            for adoption in instances {
                let key = match &adoption.agent {
                    Some(AgentRef::Id(id)) => AgentRefKey::Id(id.as_str()),
                    Some(AgentRef::Name(name)) => AgentRefKey::Name(name.as_str()),
                    None => AgentRefKey::Instance(adoption.id.as_str()),
                };
                adopted_agents.insert((&pool.ci.source, key));
            }
        }
    }
    let mut changes = Vec::new();
    for (ci_name, observation) in &observed.ci {
        let Some(ci) = ci_indexes.get(ci_name) else {
            continue;
        };
        for agent in &observation.agents {
            if !agent.name.starts_with(&prefix) || instance_names.contains(agent.name.as_str()) || ci.is_busy(agent) {
                continue;
            }
            let adopted = adopted_agents.contains(&(ci_name, AgentRefKey::Id(agent.id.as_str())))
                || adopted_agents.contains(&(ci_name, AgentRefKey::Name(agent.name.as_str())))
                || adopted_agents.contains(&(ci_name, AgentRefKey::Instance(agent.name.as_str())));
            if adopted {
                continue;
            }
            changes.push(Change {
                pool: pool_of_agent_name(desired, &agent.name),
                action: Action::Deregister,
                instance: None,
                agent: Some(ci.target(agent)),
                reason: "agent record has no instance".to_owned(),
                before: BTreeMap::new(),
                after: BTreeMap::new(),
            });
        }
    }
    changes
}

#[derive(PartialEq, Eq, Hash)]
enum AgentRefKey<'a> {
    Id(&'a str),
    Name(&'a str),
    /// No explicit reference: the agent is named like the adopted instance's id/name.
    Instance(&'a str),
}

/// The pool an agent name `{owner}-{pool}-{n}` belongs to: the longest configured pool name that fits, else the
/// middle part of the name as written.
fn pool_of_agent_name(desired: &Desired, agent_name: &str) -> PoolName {
    let rest = agent_name.strip_prefix(&format!("{}-", desired.owner)).unwrap_or(agent_name);
    let configured = desired
        .pools
        .iter()
        .filter(|pool| {
            rest.strip_prefix(pool.name.as_str())
                .and_then(|tail| tail.strip_prefix('-'))
                .is_some_and(|index| !index.is_empty() && index.bytes().all(|b| b.is_ascii_digit()))
        })
        .max_by_key(|pool| pool.name.as_str().len());
    match configured {
        Some(pool) => pool.name.clone(),
        None => match rest.rsplit_once('-') {
            Some((pool, index)) if index.bytes().all(|b| b.is_ascii_digit()) => PoolName::new(pool),
            _ => PoolName::new(rest),
        },
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------------

fn plural(count: u32, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// `31m`, `1h5m`, `45s`: minutes are precise enough for idle times; seconds only below a minute.
pub(super) fn human_duration(duration: SignedDuration) -> String {
    let secs = duration.as_secs().max(0);
    if secs < 60 {
        return format!("{secs}s");
    }
    let (hours, minutes) = (secs / 3600, (secs % 3600) / 60);
    match (hours, minutes) {
        (0, m) => format!("{m}m"),
        (h, 0) => format!("{h}h"),
        (h, m) => format!("{h}h{m}m"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{
        AgentSpec, BackendBinding, BackendKind, BackendObservation, BackendSpec, CiBinding, CiSourceSpec, FakeSpec,
        Queue, ScalePolicy, Task,
    };

    const NOW: &str = "2026-01-01T12:00:00Z";

    fn ts(text: &str) -> Timestamp {
        text.parse().unwrap()
    }

    fn desired(scale: ScalePolicy) -> Desired {
        let pool = PoolSpec {
            name: "linux".into(),
            ci: CiBinding {
                source: "wp".into(),
                labels: [("platform".to_owned(), "linux/amd64".to_owned())].into(),
                azure_pool: None,
                capabilities: BTreeMap::new(),
            },
            backend: BackendBinding {
                backend: "cloud".into(),
                mode: InstanceMode::Create,
                machine: [("server_type".to_owned(), "cx22,cx32".to_owned())].into(),
            },
            agent: AgentSpec { image: Some("agent:1".into()), env: BTreeMap::new(), secret_env: BTreeMap::new(), preregistered: None },
            scale,
        };
        Desired {
            owner: "ci".into(),
            poll_interval: GoDuration::from_secs(10),
            ci: [("wp".into(), CiSourceSpec { kind: CiKind::Fake(FakeSpec::default()) })].into(),
            backends: [(
                "cloud".into(),
                BackendSpec {
                    kind: BackendKind::Fake(FakeSpec::default()),
                    billing: Billing::PerSecond,
                    create_limit: None,
                    change_timeout: None,
                },
            )]
            .into(),
            pools: vec![pool],
            images: BTreeMap::new(),
            config_hash: "sha256:test".into(),
            metrics: None,
        }
    }

    use crate::model::GoDuration;

    fn owned(name: &str, state: InstanceState, created_at: &str, hash: &str) -> Instance {
        Instance {
            id: InstanceId::new(format!("id-{name}")),
            name: name.into(),
            state,
            created_at: ts(created_at),
            labels: [
                (OWNER_LABEL.to_owned(), "ci".to_owned()),
                (POOL_LABEL.to_owned(), "linux".to_owned()),
                (AGENT_HASH_LABEL.to_owned(), hash.to_owned()),
            ]
            .into(),
            attributes: [("server_type".to_owned(), "cx22".to_owned())].into(),
        }
    }

    fn agent(name: &str, busy: bool, no_schedule: bool, last_work: Option<&str>) -> Agent {
        Agent {
            id: AgentId::new(format!("a-{name}")),
            name: name.into(),
            busy,
            no_schedule,
            last_contact: Some(ts("2026-01-01T11:59:50Z")),
            last_work: last_work.map(ts),
            labels: BTreeMap::new(),
        }
    }

    fn task(id: &str, platform: &str) -> Task {
        Task {
            id: id.into(),
            labels: [("platform".to_owned(), platform.to_owned())].into(),
            demands: Vec::new(),
            agent_id: None,
        }
    }

    fn observed(instances: Vec<Instance>, agents: Vec<Agent>, pending: Vec<Task>) -> Observed {
        Observed {
            observed_at: ts(NOW),
            backends: [("cloud".into(), BackendObservation { instances, prices: BTreeMap::new(), missing_images: Vec::new() })].into(),
            ci: [("wp".into(), CiObservation { agents, queue: Queue { pending, running: Vec::new() } })].into(),
        }
    }

    fn actions(plan: &Plan) -> Vec<(Action, String)> {
        plan.changes.iter().map(|change| (change.action, target_name(change).to_owned())).collect()
    }

    #[test]
    fn creates_up_to_max_with_lowest_free_names() {
        let desired = desired(ScalePolicy { max: 3, ..ScalePolicy::default() });
        let hash = agent_hash(&desired.pools[0].agent);
        let pending = (0..5).map(|i| task(&format!("t{i}"), "linux/amd64")).collect();
        let observed = observed(
            vec![owned("ci-linux-2", InstanceState::Running, "2026-01-01T11:55:00Z", &hash)],
            vec![agent("ci-linux-2", true, false, None)],
            pending,
        );
        let plan = plan(&desired, &observed, ts(NOW));
        assert_eq!(
            actions(&plan),
            vec![(Action::Create, "ci-linux-1".to_owned()), (Action::Create, "ci-linux-3".to_owned())]
        );
        assert_eq!(plan.pools[0].desired, 3);
        assert_eq!(plan.pools[0].pending_jobs, 5);
        let create = &plan.changes[0];
        assert_eq!(create.after.get("label.ciscale.agent-hash"), Some(&hash));
        assert_eq!(create.after.get("machine.server_type").map(String::as_str), Some("cx22,cx32"));
    }

    #[test]
    fn unmatched_jobs_create_nothing() {
        let desired = desired(ScalePolicy { max: 3, ..ScalePolicy::default() });
        let observed = observed(Vec::new(), Vec::new(), vec![task("t1", "linux/arm64")]);
        let plan = plan(&desired, &observed, ts(NOW));
        assert!(plan.changes.is_empty());
        assert_eq!(plan.pools[0].pending_jobs, 0);
    }

    #[test]
    fn idle_past_timeout_is_drained_then_deleted_busy_never() {
        let desired = desired(ScalePolicy { max: 3, ..ScalePolicy::default() });
        let hash = agent_hash(&desired.pools[0].agent);
        let observed = observed(
            vec![
                owned("ci-linux-1", InstanceState::Running, "2026-01-01T10:00:00Z", &hash),
                owned("ci-linux-2", InstanceState::Running, "2026-01-01T10:00:00Z", &hash),
                owned("ci-linux-3", InstanceState::Running, "2026-01-01T10:00:00Z", &hash),
                owned("ci-linux-4", InstanceState::Running, "2026-01-01T10:00:00Z", &hash),
            ],
            vec![
                agent("ci-linux-1", false, false, Some("2026-01-01T11:29:00Z")),
                agent("ci-linux-2", true, false, Some("2026-01-01T10:00:00Z")),
                agent("ci-linux-3", false, true, Some("2026-01-01T11:00:00Z")),
                agent("ci-linux-4", false, false, Some("2026-01-01T11:45:00Z")),
            ],
            Vec::new(),
        );
        let plan = plan(&desired, &observed, ts(NOW));
        assert_eq!(
            actions(&plan),
            vec![(Action::Delete, "ci-linux-3".to_owned()), (Action::Drain, "ci-linux-1".to_owned())]
        );
        assert_eq!(plan.changes[1].reason, "idle for 31m (idle timeout 30m)");
        assert!(plan.pools[0].notes.iter().any(|note| note.starts_with("ci-linux-4: idle for 15m")));
    }

    #[test]
    fn min_greater_than_max_does_not_panic() {
        let desired = desired(ScalePolicy { min: 5, max: 2, ..ScalePolicy::default() });
        let plan = plan(&desired, &observed(Vec::new(), Vec::new(), Vec::new()), ts(NOW));
        assert_eq!(plan.summary.create, 2);
    }

    #[test]
    fn fingerprint_ignores_timestamps_and_queue() {
        let hash = "x";
        let base = observed(
            vec![owned("ci-linux-1", InstanceState::Running, "2026-01-01T10:00:00Z", hash)],
            vec![agent("ci-linux-1", false, false, None)],
            Vec::new(),
        );
        let mut later = base.clone();
        later.observed_at = ts("2026-01-01T12:05:00Z");
        later.ci.values_mut().for_each(|ci| {
            ci.agents[0].last_contact = Some(ts("2026-01-01T12:04:59Z"));
            ci.queue.pending.push(task("t", "x"));
        });
        assert_eq!(fingerprint(&base), fingerprint(&later));
        let mut drained = base.clone();
        drained.ci.values_mut().for_each(|ci| ci.agents[0].no_schedule = true);
        assert_ne!(fingerprint(&base), fingerprint(&drained));
        assert!(fingerprint(&base).starts_with("sha256:"));
    }

    #[test]
    fn agent_names_map_back_to_pools() {
        let mut desired = desired(ScalePolicy::default());
        let mut other = desired.pools[0].clone();
        other.name = "linux-big".into();
        desired.pools.push(other);
        assert_eq!(pool_of_agent_name(&desired, "ci-linux-big-3").as_str(), "linux-big");
        assert_eq!(pool_of_agent_name(&desired, "ci-linux-12").as_str(), "linux");
        assert_eq!(pool_of_agent_name(&desired, "ci-gone-1").as_str(), "gone");
    }

    #[test]
    fn human_durations() {
        assert_eq!(human_duration(SignedDuration::from_secs(45)), "45s");
        assert_eq!(human_duration(SignedDuration::from_secs(31 * 60 + 5)), "31m");
        assert_eq!(human_duration(SignedDuration::from_secs(3600)), "1h");
        assert_eq!(human_duration(SignedDuration::from_secs(3900)), "1h5m");
    }
}
