//! The safety promises, each a small function of a deployment's config ([`Desired`]), a [`Plan`] and the
//! [`Truth`] about the world the plan was made for.
//!
//! Written from the promises, never from the planner: nothing here calls a helper of `ciscale::plan` (no name
//! grammar, no ownership rule, no matching, no index). What a change *does* is read from the documented contract
//! of [`Action`] (`src/plan/mod.rs`, and the lifecycle steps in `src/apply/lifecycle.rs`) and spelled out once in
//! [`effects`]; whose a record is, which agent runs where and which agent is busy comes from the [`Truth`], which
//! whoever built the world knows (the generators in `world.rs` built it; an end-to-end test learns it from its
//! own history, see `ledger.rs`). The observation the planner saw is deliberately not an input: a promise must
//! hold for the world as it is, not as it looked.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ciscale::model::{AgentId, AgentRef, BackendName, CiName, Desired, InstanceId, InstanceState, PoolName};
use ciscale::plan::{Action, Change, Plan};

/// An instance, by the backend account it lives in and its provider id.
pub type InstanceKey = (BackendName, InstanceId);
/// A CI agent record, by its CI source and its CI-side id.
pub type AgentKey = (CiName, AgentId);

/// Whose an instance is, from the point of view of one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceOwner {
    /// This deployment created it.
    Created,
    /// This deployment's config adopts it by id (start/stop mode): it may start and stop it, never delete it.
    Adopted,
    /// Anything else: another deployment's, a person's.
    Foreign,
}

/// Whose an agent record is, from the point of view of one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentOwner {
    /// This deployment registered it: it may drain, undrain and deregister it.
    Registered,
    /// This deployment's config names it (a pre-registered agent, the agent of an adopted instance): it may
    /// drain and undrain it, never deregister it.
    Named,
    /// Anything else, however much its name looks like ours.
    Foreign,
}

/// One instance that exists (whether or not a listing shows it yet).
#[derive(Debug, Clone)]
pub struct TrueInstance {
    pub name: String,
    pub state: InstanceState,
    pub owner: InstanceOwner,
    /// For [`InstanceOwner::Created`]: the pool it was created for; for [`InstanceOwner::Adopted`]: the pool that
    /// adopts it.
    pub pool: Option<PoolName>,
}

/// One agent record of a CI source.
#[derive(Debug, Clone)]
pub struct TrueAgent {
    pub name: String,
    pub owner: AgentOwner,
    /// Running a job right now, whatever the CI's flags say.
    pub busy: bool,
    /// The instance the agent runs on, if it runs on one of a backend's instances.
    pub runs_on: Option<InstanceKey>,
}

/// What is true about the world at the moment a plan is judged, from one deployment's point of view.
#[derive(Debug, Clone, Default)]
pub struct Truth {
    pub instances: BTreeMap<InstanceKey, TrueInstance>,
    pub agents: BTreeMap<AgentKey, TrueAgent>,
    /// Creates of this deployment that were started and have not finished (their instance may not exist yet),
    /// per pool: they count against `max` like instances do.
    pub creates_in_flight: BTreeMap<PoolName, u32>,
}

impl Truth {
    fn busy_agents_on(&self, instance: &InstanceKey) -> Vec<(&AgentKey, &TrueAgent)> {
        self.agents.iter().filter(|(_, agent)| agent.busy && agent.runs_on.as_ref() == Some(instance)).collect()
    }
}

/// A broken promise: which one, the change (or pool) that broke it, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    pub promise: &'static str,
    pub subject: String,
    pub why: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {}: {}", self.promise, self.subject, self.why)
    }
}

pub const NOT_OURS: &str = "never touch what is not ours";
pub const NOT_BUSY: &str = "never kill a busy agent";
pub const MAX: &str = "never exceed max";
pub const WELL_FORMED: &str = "every change can be carried out";

fn describe(change: &Change) -> String {
    let instance = change.instance.as_ref().map(|target| match &target.id {
        Some(id) => format!("instance `{}` ({id})", target.name),
        None => format!("new instance `{}`", target.name),
    });
    let agent = change.agent.as_ref().map(|target| format!("agent `{}` (id {})", target.name, target.id));
    let targets: Vec<String> = instance.into_iter().chain(agent).collect();
    format!("{} in pool `{}` on {}", change.action, change.pool, targets.join(" + "))
}

// ---------------------------------------------------------------------------------------------------------------
// What a change does
// ---------------------------------------------------------------------------------------------------------------

/// One call a change makes to a backend or a CI source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A new instance with this deployment's labels.
    CreateInstance {
        backend: BackendName,
        name: String,
    },
    /// A new agent record (apply registers the agent of a new instance under the instance's name, unless the
    /// pool runs a pre-registered agent).
    RegisterAgent {
        ci: CiName,
        name: String,
    },
    StartInstance(InstanceKey),
    StopInstance(InstanceKey),
    DeleteInstance(InstanceKey),
    DrainAgent(AgentKey),
    UndrainAgent(AgentKey),
    DeregisterAgent(AgentKey),
}

/// The calls a change makes, from [`Action`]'s documented contract:
/// - Create: register an agent (or, with a pre-registered agent named in the change, undrain that one), create the
///   instance.
/// - Start: start the instance, undrain its agent. Stop: stop the instance. Drain: drain the agent.
/// - Delete: delete the instance, deregister its agent — except an agent the config names as pre-registered,
///   which apply keeps.
/// - Replace: Delete, then Create under the same name. Deregister: deregister the agent.
///
/// A change that lacks the target its action needs makes no call (apply fails it); [`well_formed`] reports it.
pub fn effects(change: &Change, desired: &Desired) -> Vec<Effect> {
    let instance_key =
        || change.instance.as_ref().and_then(|target| target.id.clone().map(|id| (target.backend.clone(), id)));
    let agent_key = || change.agent.as_ref().map(|target| (target.ci.clone(), target.id.clone()));
    let pool = desired.pool(&change.pool);
    let create = |effects: &mut Vec<Effect>| {
        let Some(target) = &change.instance else { return };
        // A pool that is not in the config cannot create (apply fails the change before any call).
        let Some(pool) = pool else { return };
        match (&pool.agent.preregistered, agent_key()) {
            // The pool's pre-registered agent runs on the new instance: it is undrained, not registered.
            (Some(_), Some(agent)) => effects.push(Effect::UndrainAgent(agent)),
            // Apply cannot find the pre-registered agent: it fails before any call.
            (Some(_), None) => return,
            (None, _) => effects.push(Effect::RegisterAgent { ci: pool.ci.source.clone(), name: target.name.clone() }),
        }
        effects.push(Effect::CreateInstance { backend: target.backend.clone(), name: target.name.clone() });
    };
    let delete = |effects: &mut Vec<Effect>| {
        if let Some(instance) = instance_key() {
            effects.push(Effect::DeleteInstance(instance));
        }
        if let Some(agent) = agent_key() {
            if !is_preregistered(desired, &agent, change.agent.as_ref().map(|a| a.name.as_str())) {
                effects.push(Effect::DeregisterAgent(agent));
            }
        }
    };
    let mut effects = Vec::new();
    match change.action {
        Action::Create => create(&mut effects),
        Action::Start => {
            effects.extend(instance_key().map(Effect::StartInstance));
            effects.extend(agent_key().map(Effect::UndrainAgent));
        }
        Action::Stop => effects.extend(instance_key().map(Effect::StopInstance)),
        Action::Drain => effects.extend(agent_key().map(Effect::DrainAgent)),
        Action::Delete => delete(&mut effects),
        Action::Replace => {
            delete(&mut effects);
            create(&mut effects);
        }
        Action::Deregister => effects.extend(agent_key().map(Effect::DeregisterAgent)),
    }
    effects
}

/// Whether the config names this agent as a pool's pre-registered agent (apply never deregisters those).
fn is_preregistered(desired: &Desired, agent: &AgentKey, name: Option<&str>) -> bool {
    desired.pools.iter().any(|pool| {
        pool.ci.source == agent.0
            && match &pool.agent.preregistered {
                Some(AgentRef::Id(id)) => *id == agent.1,
                Some(AgentRef::Name(wanted)) => Some(wanted.as_str()) == name,
                None => false,
            }
    })
}

// ---------------------------------------------------------------------------------------------------------------
// The promises
// ---------------------------------------------------------------------------------------------------------------

/// Every change names the target its action needs: an instance with an id for start/stop/delete/replace, a new
/// instance (no id) for a create, an agent for drain/deregister. Apply fails anything else, so this is not about
/// harm, but a plan that cannot be carried out hides what it meant to do from the other promises.
pub fn well_formed(plan: &Plan) -> Vec<Violation> {
    let mut violations = Vec::new();
    for change in &plan.changes {
        let instance_id = change.instance.as_ref().map(|target| target.id.is_some());
        let ok = match change.action {
            Action::Create => instance_id == Some(false),
            Action::Start | Action::Stop | Action::Delete | Action::Replace => instance_id == Some(true),
            Action::Drain | Action::Deregister => change.agent.is_some(),
        };
        if !ok {
            violations.push(Violation {
                promise: WELL_FORMED,
                subject: describe(change),
                why: "the change lacks the target its action needs".to_owned(),
            });
        }
    }
    violations
}

/// Promise 1, never touch what is not ours: every call targets a new instance, an instance this deployment created
/// (delete, stop, start) or adopted in its config (start, stop), or an agent record it registered (deregister) or
/// that it registered, its config names, or that runs on an instance it created (drain, undrain: draining a
/// person's agent that runs on our instance — a pre-registered agent whose pool left the config — is how that
/// instance is taken down without killing a job; it is reversible and never followed by a deregister). A new
/// agent is never registered under the name of a record that is not ours (CIs that key agents by name would hand
/// that record over). Foreign records — another deployment's, a person's, look-alike names — are never the
/// target of anything else.
pub fn never_touches_foreign(desired: &Desired, plan: &Plan, truth: &Truth) -> Vec<Violation> {
    let mut violations = Vec::new();
    for change in &plan.changes {
        let mut fail = |why: String| {
            violations.push(Violation { promise: NOT_OURS, subject: describe(change), why });
        };
        for effect in effects(change, desired) {
            match &effect {
                Effect::StartInstance(key) | Effect::StopInstance(key) | Effect::DeleteInstance(key) => {
                    // An instance that no longer exists is not touched (apply: gone = done).
                    let Some(instance) = truth.instances.get(key) else { continue };
                    let allowed = match (&effect, instance.owner) {
                        (_, InstanceOwner::Created) => true,
                        (Effect::DeleteInstance(_), InstanceOwner::Adopted) => false,
                        (_, InstanceOwner::Adopted) => true,
                        (_, InstanceOwner::Foreign) => false,
                    };
                    if !allowed {
                        fail(format!(
                            "{effect:?} on `{}`, which is {:?} (not created by this deployment)",
                            instance.name, instance.owner
                        ));
                    }
                }
                Effect::DrainAgent(key) | Effect::UndrainAgent(key) => {
                    if let Some(agent) = truth.agents.get(key) {
                        let on_our_instance =
                            agent.runs_on.as_ref().and_then(|host| truth.instances.get(host)).is_some_and(|instance| {
                                instance.owner == InstanceOwner::Created && is_live(instance.state)
                            });
                        if agent.owner == AgentOwner::Foreign && !on_our_instance {
                            fail(format!(
                                "{effect:?} on agent `{}`, which this deployment neither registered nor names, and \
                                 which runs on no instance of it",
                                agent.name
                            ));
                        }
                    }
                }
                Effect::DeregisterAgent(key) => {
                    if let Some(agent) = truth.agents.get(key) {
                        if agent.owner != AgentOwner::Registered {
                            fail(format!(
                                "{effect:?} on agent `{}`, which this deployment did not register ({:?})",
                                agent.name, agent.owner
                            ));
                        }
                    }
                }
                Effect::RegisterAgent { ci, name } => {
                    let taken = truth.agents.iter().find(|((source, _), agent)| {
                        source == ci && &agent.name == name && agent.owner == AgentOwner::Foreign
                    });
                    if let Some(((_, id), _)) = taken {
                        fail(format!("registers agent `{name}`, the name of a foreign agent record (id {id})"));
                    }
                }
                Effect::CreateInstance { .. } => {}
            }
        }
    }
    violations
}

/// Promise 2, never kill a busy agent: no instance is stopped or deleted (or replaced) while an agent that runs
/// on it is busy, whatever the agent is called; no busy agent is deregistered. And no agent is deregistered from
/// under a live instance it runs on (unless the same change deletes that instance): the instance would be left
/// running an agent the CI no longer knows.
pub fn never_kills_busy(desired: &Desired, plan: &Plan, truth: &Truth) -> Vec<Violation> {
    let mut violations = Vec::new();
    for change in &plan.changes {
        let effects = effects(change, desired);
        let deleted: BTreeSet<&InstanceKey> = effects
            .iter()
            .filter_map(|effect| match effect {
                Effect::DeleteInstance(key) => Some(key),
                _ => None,
            })
            .collect();
        for effect in &effects {
            match effect {
                Effect::StopInstance(key) | Effect::DeleteInstance(key) => {
                    for ((_, id), agent) in truth.busy_agents_on(key) {
                        violations.push(Violation {
                            promise: NOT_BUSY,
                            subject: describe(change),
                            why: format!("{effect:?} while agent `{}` (id {id}) runs a job on it", agent.name),
                        });
                    }
                }
                Effect::DeregisterAgent(key) => {
                    let Some(agent) = truth.agents.get(key) else { continue };
                    if agent.busy {
                        violations.push(Violation {
                            promise: NOT_BUSY,
                            subject: describe(change),
                            why: format!("deregisters agent `{}` while it runs a job", agent.name),
                        });
                    }
                    let live_host = agent.runs_on.as_ref().filter(|host| !deleted.contains(host)).and_then(|host| {
                        truth.instances.get(host).filter(|instance| is_live(instance.state)).map(|i| (host, i))
                    });
                    if let Some(((_, id), instance)) = live_host {
                        violations.push(Violation {
                            promise: NOT_BUSY,
                            subject: describe(change),
                            why: format!(
                                "deregisters agent `{}` while its instance `{}` ({id}) is {}",
                                agent.name, instance.name, instance.state
                            ),
                        });
                    }
                }
                _ => {}
            }
        }
    }
    violations
}

/// Exists and is not on its way out: everything but terminated and deleting. (A deleting instance's slot cannot be
/// saved by waiting, and its agent is already gone with it.)
fn is_live(state: InstanceState) -> bool {
    !matches!(state, InstanceState::Terminated | InstanceState::Deleting)
}

/// The `max` in force for a pool at the plan's time (a schedule window overrides the pool's own).
fn max_of(desired: &Desired, pool: &PoolName, plan: &Plan) -> Option<u32> {
    let spec = desired.pool(pool)?;
    let window = spec.scale.schedule.iter().find(|window| window.contains(plan.planned_at));
    Some(window.and_then(|window| window.max).unwrap_or(spec.scale.max))
}

/// Promise 3, never exceed `max`, per pool of the config. Counted: every instance of the pool that exists and is
/// not stopped (listed yet or not; running, starting, drained, busy, stopping — issue #9's list), plus creates in
/// flight. A plan that adds instances (creates, and starts of stopped ones) must keep that count plus what it adds
/// within `max`; already at or above `max`, it adds nothing. A delete in the same plan frees no slot: apply runs
/// changes concurrently and a delete may fail. A replace is one out, one in: it adds nothing; nor does a create
/// under the name of an instance of ours that exists (create-if-absent takes it over). Stopped instances
/// are not counted until started (a finished ephemeral agent's, an adopted machine that is off): they run nothing.
pub fn never_exceeds_max(desired: &Desired, plan: &Plan, truth: &Truth) -> Vec<Violation> {
    let mut violations = Vec::new();
    for pool in &desired.pools {
        let Some(max) = max_of(desired, &pool.name, plan) else { continue };
        let counted = truth
            .instances
            .values()
            .filter(|instance| {
                instance.owner != InstanceOwner::Foreign
                    && instance.pool.as_ref() == Some(&pool.name)
                    && is_live(instance.state)
                    && instance.state != InstanceState::Stopped
            })
            .count() as u32;
        let in_flight = truth.creates_in_flight.get(&pool.name).copied().unwrap_or(0);
        let mut creates = 0u32;
        let mut starts = 0u32;
        for change in plan.changes.iter().filter(|change| change.pool == pool.name && change.action != Action::Replace)
        {
            for effect in effects(change, desired) {
                match effect {
                    // Create-if-absent: under the name of an instance of ours that exists (a create whose listing
                    // lags, made again), apply takes that instance over instead of making another.
                    Effect::CreateInstance { backend, name } if exists_as_ours(truth, &backend, &name) => {}
                    Effect::CreateInstance { .. } => creates += 1,
                    Effect::StartInstance(key) => {
                        if truth.instances.get(&key).is_some_and(|instance| instance.state == InstanceState::Stopped) {
                            starts += 1;
                        }
                    }
                    _ => {}
                }
            }
        }
        let added = creates + starts;
        if added > 0 && counted + in_flight + added > max {
            violations.push(Violation {
                promise: MAX,
                subject: format!("pool `{}`", pool.name),
                why: format!(
                    "{creates} create(s) and {starts} start(s) with {counted} instance(s) up and {in_flight} \
                     create(s) in flight: {} > max {max}",
                    counted + in_flight + added
                ),
            });
        }
    }
    violations
}

fn exists_as_ours(truth: &Truth, backend: &BackendName, name: &str) -> bool {
    truth.instances.iter().any(|((on, _), instance)| {
        on == backend && instance.name == name && instance.owner == InstanceOwner::Created && is_live(instance.state)
    })
}

/// Promises 1–3 (and well-formedness) for one plan.
pub fn check(desired: &Desired, plan: &Plan, truth: &Truth) -> Vec<Violation> {
    let mut violations = well_formed(plan);
    violations.extend(never_touches_foreign(desired, plan, truth));
    violations.extend(never_kills_busy(desired, plan, truth));
    violations.extend(never_exceeds_max(desired, plan, truth));
    violations
}

/// Promise 5, determinism: the same inputs give the same plan, byte for byte (JSON and human rendering).
pub fn deterministic(desired: &Desired, observed: &ciscale::model::Observed, now: jiff::Timestamp) -> Vec<Violation> {
    use ciscale::plan::render::{render_human, render_json, RenderOptions};
    let first = ciscale::plan::plan(desired, observed, now);
    let second = ciscale::plan::plan(desired, observed, now);
    let options = RenderOptions { color: false };
    let mut violations = Vec::new();
    if render_json(&first) != render_json(&second) || render_human(&first, &options) != render_human(&second, &options)
    {
        violations.push(Violation {
            promise: "same inputs, same plan",
            subject: format!("owner `{}`", desired.owner),
            why: "two plans of the same inputs differ".to_owned(),
        });
    }
    violations
}

/// The oracle must tell a safe plan from an unsafe one: each promise is shown a plan it must pass and one it must
/// fail, built by hand (the property tests only ever see plans the planner made).
#[cfg(test)]
mod tests {
    use super::*;
    use ciscale::model::Observed;
    use ciscale::plan::{AgentTarget, InstanceTarget};

    const CONFIG: &str = r#"
id: acme
ci: { ci: { kind: fake } }
backends: { cloud: { kind: fake } }
pools:
  - { name: linux, ci: { source: ci, labels: { platform: linux } }, backend: { name: cloud }, scale: { max: 2 } }
  - name: picus
    ci: { source: ci, labels: { platform: arm } }
    backend: { name: cloud }
    agent: { preregistered: { name: picus-agent } }
  - name: adopted
    ci: { source: ci }
    backend: { name: cloud, startStop: { instances: [{ id: i-a1 }, { id: i-a2 }] } }
    scale: { max: 1 }
"#;

    fn desired() -> Desired {
        ciscale::config::load_str("oracle.yaml", CONFIG, &|_| None).expect("valid config")
    }

    fn plan_of(desired: &Desired, changes: Vec<Change>) -> Plan {
        let template = ciscale::plan::plan(desired, &Observed::default(), jiff::Timestamp::UNIX_EPOCH);
        Plan { changes, ..template }
    }

    fn instance_key(id: &str) -> InstanceKey {
        (BackendName::new("cloud"), InstanceId::new(id))
    }

    fn agent_key(id: &str) -> AgentKey {
        (CiName::new("ci"), AgentId::new(id))
    }

    fn change(
        pool: &str,
        action: Action,
        instance: Option<(&str, Option<&str>)>,
        agent: Option<(&str, &str)>,
    ) -> Change {
        Change {
            pool: PoolName::new(pool),
            action,
            instance: instance.map(|(name, id)| InstanceTarget {
                backend: BackendName::new("cloud"),
                id: id.map(InstanceId::new),
                name: name.to_owned(),
            }),
            agent: agent.map(|(name, id)| AgentTarget {
                ci: CiName::new("ci"),
                id: AgentId::new(id),
                name: name.to_owned(),
            }),
            reason: "test".to_owned(),
            cause: None,
            before: BTreeMap::new(),
            after: BTreeMap::new(),
        }
    }

    /// `acme-linux-1` (ours, running, its agent busy), `acme-linux-2` (ours, drained, idle), a foreign
    /// `acme-arm-linux-1` with its agent, two adopted machines (stopped), the pre-registered `picus-agent` (busy,
    /// on `acme-picus-1`), a person's `acme-runner`.
    fn truth() -> Truth {
        let instance = |name: &str, state, owner, pool: Option<&str>| TrueInstance {
            name: name.to_owned(),
            state,
            owner,
            pool: pool.map(PoolName::new),
        };
        let agent = |name: &str, owner, busy, runs_on: Option<&str>| TrueAgent {
            name: name.to_owned(),
            owner,
            busy,
            runs_on: runs_on.map(instance_key),
        };
        use InstanceOwner::*;
        use InstanceState::*;
        Truth {
            instances: BTreeMap::from([
                (instance_key("i-1"), instance("acme-linux-1", Running, Created, Some("linux"))),
                (instance_key("i-2"), instance("acme-linux-2", Running, Created, Some("linux"))),
                (instance_key("i-f"), instance("acme-arm-linux-1", Running, Foreign, None)),
                (instance_key("i-a1"), instance("builder-1", Stopped, Adopted, Some("adopted"))),
                (instance_key("i-a2"), instance("builder-2", Stopped, Adopted, Some("adopted"))),
                (instance_key("i-p"), instance("acme-picus-1", Running, Created, Some("picus"))),
            ]),
            agents: BTreeMap::from([
                (agent_key("1"), agent("acme-linux-1", AgentOwner::Registered, true, Some("i-1"))),
                (agent_key("2"), agent("acme-linux-2", AgentOwner::Registered, false, Some("i-2"))),
                (agent_key("3"), agent("acme-arm-linux-1", AgentOwner::Foreign, false, Some("i-f"))),
                (agent_key("4"), agent("picus-agent", AgentOwner::Named, true, Some("i-p"))),
                (agent_key("5"), agent("acme-runner", AgentOwner::Foreign, false, None)),
                (agent_key("6"), agent("acme-linux-9", AgentOwner::Registered, false, None)),
            ]),
            creates_in_flight: BTreeMap::new(),
        }
    }

    fn promises_broken(changes: Vec<Change>) -> Vec<&'static str> {
        let desired = desired();
        let mut broken: Vec<&str> =
            check(&desired, &plan_of(&desired, changes), &truth()).iter().map(|v| v.promise).collect();
        broken.dedup();
        broken
    }

    #[test]
    fn effects_follow_the_action_contract() {
        let desired = desired();
        let picus_create = change("picus", Action::Create, Some(("acme-picus-2", None)), Some(("picus-agent", "4")));
        assert_eq!(
            effects(&picus_create, &desired),
            vec![
                Effect::UndrainAgent(agent_key("4")),
                Effect::CreateInstance { backend: BackendName::new("cloud"), name: "acme-picus-2".to_owned() }
            ]
        );
        // Apply keeps a pre-registered agent when its instance goes.
        let picus_delete =
            change("picus", Action::Delete, Some(("acme-picus-1", Some("i-p"))), Some(("picus-agent", "4")));
        assert_eq!(effects(&picus_delete, &desired), vec![Effect::DeleteInstance(instance_key("i-p"))]);
        let create = change("linux", Action::Create, Some(("acme-linux-3", None)), None);
        assert_eq!(
            effects(&create, &desired)[0],
            Effect::RegisterAgent { ci: CiName::new("ci"), name: "acme-linux-3".to_owned() }
        );
    }

    #[test]
    fn what_is_not_ours_is_never_touched() {
        assert!(promises_broken(vec![change(
            "linux",
            Action::Delete,
            Some(("acme-linux-2", Some("i-2"))),
            Some(("acme-linux-2", "2"))
        )])
        .is_empty());
        assert!(
            promises_broken(vec![change("adopted", Action::Start, Some(("builder-1", Some("i-a1"))), None)]).is_empty()
        );
        assert!(
            promises_broken(vec![change("linux", Action::Deregister, None, Some(("acme-linux-9", "6")))]).is_empty()
        );
        for unsafe_change in [
            change("linux", Action::Delete, Some(("acme-arm-linux-1", Some("i-f"))), None),
            change("adopted", Action::Delete, Some(("builder-1", Some("i-a1"))), None),
            change("runner", Action::Deregister, None, Some(("acme-runner", "5"))),
            change("linux", Action::Drain, None, Some(("acme-arm-linux-1", "3"))),
            // A pre-registered agent is the config's to drain, not to deregister.
            change("gone", Action::Deregister, None, Some(("picus-agent", "4"))),
            // Registering under a foreign record's name hands that record over on CIs that key agents by name.
            change("linux", Action::Create, Some(("acme-runner", None)), None),
        ] {
            assert!(promises_broken(vec![unsafe_change.clone()]).contains(&NOT_OURS), "{unsafe_change:?}");
        }
    }

    #[test]
    fn a_persons_agent_on_our_instance_may_be_drained_but_never_deregistered() {
        // The pre-registered agent of a pool that left the config is a person's record again, but it runs on an
        // instance we created: draining it is how that instance goes without killing a job.
        let desired = desired();
        let mut truth = truth();
        truth.agents.insert(
            agent_key("7"),
            TrueAgent {
                name: "builder".to_owned(),
                owner: AgentOwner::Foreign,
                busy: false,
                runs_on: Some(instance_key("i-2")),
            },
        );
        let drain = change("gone", Action::Drain, None, Some(("builder", "7")));
        assert!(never_touches_foreign(&desired, &plan_of(&desired, vec![drain]), &truth).is_empty());
        let deregister = change("gone", Action::Deregister, None, Some(("builder", "7")));
        assert_eq!(never_touches_foreign(&desired, &plan_of(&desired, vec![deregister]), &truth).len(), 1);
    }

    #[test]
    fn a_busy_agent_is_never_killed_whatever_it_is_called() {
        // The busy pre-registered agent is not named after its instance.
        let orphan_delete = change("gone", Action::Delete, Some(("acme-picus-1", Some("i-p"))), None);
        assert_eq!(promises_broken(vec![orphan_delete]), vec![NOT_BUSY]);
        let busy_delete =
            change("linux", Action::Delete, Some(("acme-linux-1", Some("i-1"))), Some(("acme-linux-1", "1")));
        assert_eq!(promises_broken(vec![busy_delete]), vec![NOT_BUSY]);
        // The agent of a live instance is not pulled from under it...
        let live_deregister = change("linux", Action::Deregister, None, Some(("acme-linux-2", "2")));
        assert_eq!(promises_broken(vec![live_deregister]), vec![NOT_BUSY]);
        // ... but goes with it.
        let idle_delete =
            change("linux", Action::Delete, Some(("acme-linux-2", Some("i-2"))), Some(("acme-linux-2", "2")));
        assert!(promises_broken(vec![idle_delete]).is_empty());
        // Draining a busy agent kills nothing: it finishes its job first.
        assert!(promises_broken(vec![change("linux", Action::Drain, None, Some(("acme-linux-1", "1")))]).is_empty());
    }

    #[test]
    fn max_counts_every_instance_that_exists() {
        // `linux` has two instances (one busy, one drained) and `max: 2`: no create, even with a delete beside it.
        let create = change("linux", Action::Create, Some(("acme-linux-3", None)), None);
        assert_eq!(promises_broken(vec![create.clone()]), vec![MAX]);
        let delete = change("linux", Action::Delete, Some(("acme-linux-2", Some("i-2"))), Some(("acme-linux-2", "2")));
        assert_eq!(promises_broken(vec![delete, create]), vec![MAX]);
        // A replace is one out, one in.
        let replace =
            change("linux", Action::Replace, Some(("acme-linux-2", Some("i-2"))), Some(("acme-linux-2", "2")));
        assert!(promises_broken(vec![replace]).is_empty());
        // Start/stop pool with `max: 1` and two stopped machines: one start, not two.
        let start = |name: &str, id: &str| change("adopted", Action::Start, Some((name, Some(id))), None);
        assert!(promises_broken(vec![start("builder-1", "i-a1")]).is_empty());
        assert_eq!(promises_broken(vec![start("builder-1", "i-a1"), start("builder-2", "i-a2")]), vec![MAX]);
        // A create in flight takes a slot: `picus` (max 1) has one instance already.
        let mut truth = truth();
        truth.instances.remove(&instance_key("i-p"));
        truth.creates_in_flight.insert(PoolName::new("picus"), 1);
        let desired = desired();
        let picus_create = change("picus", Action::Create, Some(("acme-picus-2", None)), Some(("picus-agent", "4")));
        let violations = never_exceeds_max(&desired, &plan_of(&desired, vec![picus_create]), &truth);
        assert_eq!(violations.len(), 1, "{violations:?}");
    }
}
