//! Property tests of the planner's invariants over random worlds: never above `max`, never a busy agent, never
//! a resource without our owner label (unless adopted), and the same plan every time.

use std::collections::{BTreeMap, BTreeSet};

use ciscale::model::{
    AdoptedInstance, Agent, AgentId, AgentSpec, BackendBinding, BackendKind, BackendName, BackendObservation,
    BackendSpec, Billing, CiBinding, CiKind, CiName, CiObservation, CiSourceSpec, Desired, FakeSpec, GoDuration,
    Instance, InstanceId, InstanceMode, InstanceState, Observed, PoolName, PoolSpec, ScalePolicy, Task,
    AGENT_HASH_LABEL, OWNER_LABEL, POOL_LABEL,
};
use ciscale::plan::{self, Action, Plan};
use jiff::{SignedDuration, Timestamp};
use proptest::prelude::*;

const OWNER: &str = "ci";
const SOURCES: [&str; 2] = ["wp", "az"];
const BACKENDS: [&str; 2] = ["persec", "hourly"];

fn now() -> Timestamp {
    "2026-01-01T12:00:00Z".parse().unwrap_or_default()
}

#[derive(Debug, Clone)]
struct PoolDraft {
    source: usize,
    backend: usize,
    label_set: usize,
    start_stop: bool,
    min: u32,
    max: u32,
    min_idle: u32,
    jobs_per_agent: u32,
    idle_timeout_min: u64,
    ephemeral: bool,
    margin: Option<u64>,
}

#[derive(Debug, Clone)]
struct InstanceDraft {
    backend: usize,
    /// Index into pools (may name a pool that does not exist: an orphan).
    pool: usize,
    owner: usize,
    state: usize,
    age_min: i64,
    server_type: usize,
    stale_hash: bool,
    agent: Option<AgentDraft>,
}

#[derive(Debug, Clone)]
struct AgentDraft {
    busy: bool,
    no_schedule: bool,
    contacted: bool,
    last_work_min: Option<i64>,
    running: u8,
}

#[derive(Debug, Clone)]
struct TaskDraft {
    source: usize,
    label_set: usize,
}

fn pool_draft() -> impl Strategy<Value = PoolDraft> {
    (
        (0..2usize, 0..2usize, 0..4usize, any::<bool>()),
        (0..3u32, 1..5u32, 0..2u32, 1..3u32),
        (prop_oneof![Just(0u64), Just(30u64)], any::<bool>(), prop_oneof![Just(None), Just(Some(5u64))]),
    )
        .prop_map(
            |(
                (source, backend, label_set, start_stop),
                (min, max, min_idle, jobs_per_agent),
                (idle_timeout_min, ephemeral, margin),
            )| PoolDraft {
                source,
                backend,
                label_set,
                start_stop,
                min,
                max,
                min_idle,
                jobs_per_agent,
                idle_timeout_min,
                ephemeral,
                margin,
            },
        )
}

fn agent_draft() -> impl Strategy<Value = AgentDraft> {
    (any::<bool>(), any::<bool>(), any::<bool>(), proptest::option::of(0..200i64), 0..3u8).prop_map(
        |(busy, no_schedule, contacted, last_work_min, running)| AgentDraft {
            busy,
            no_schedule,
            contacted,
            last_work_min,
            running,
        },
    )
}

fn instance_draft() -> impl Strategy<Value = InstanceDraft> {
    (
        (0..2usize, 0..5usize, 0..4usize, 0..STATES.len()),
        (0..200i64, 0..2usize, any::<bool>()),
        proptest::option::of(agent_draft()),
    )
        .prop_map(|((backend, pool, owner, state), (age_min, server_type, stale_hash), agent)| InstanceDraft {
            backend,
            pool,
            owner,
            state,
            age_min,
            server_type,
            stale_hash,
            agent,
        })
}

fn world() -> impl Strategy<Value = (Vec<PoolDraft>, Vec<InstanceDraft>, Vec<TaskDraft>, Vec<AgentDraft>)> {
    (
        proptest::collection::vec(pool_draft(), 1..=4),
        proptest::collection::vec(instance_draft(), 0..20),
        proptest::collection::vec(
            (0..2usize, 0..5usize).prop_map(|(source, label_set)| TaskDraft { source, label_set }),
            0..12,
        ),
        // Agent records with no instance (orphans, or agents of instances not observed).
        proptest::collection::vec(agent_draft(), 0..3),
    )
}

fn label_set(index: usize) -> BTreeMap<String, String> {
    let pairs: &[(&str, &str)] = match index {
        0 => &[],
        1 => &[("platform", "linux")],
        2 => &[("platform", "arm")],
        3 => &[("!gpu", "yes"), ("platform", "*")],
        _ => &[("platform", "linux"), ("gpu", "yes")],
    };
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

fn pool_name(index: usize) -> PoolName {
    PoolName::new(format!("p{index}"))
}

fn instance_name(index: usize, draft: &InstanceDraft) -> String {
    format!("{OWNER}-p{}-{}", draft.pool, index + 1)
}

const STATES: [InstanceState; 10] = [
    InstanceState::Pending,
    InstanceState::Running,
    InstanceState::Running,
    InstanceState::Running,
    InstanceState::Running,
    InstanceState::Running,
    InstanceState::Stopped,
    InstanceState::Stopping,
    InstanceState::Terminated,
    InstanceState::Unknown,
];

fn build(
    pools: &[PoolDraft],
    instances: &[InstanceDraft],
    tasks: &[TaskDraft],
    stray_agents: &[AgentDraft],
) -> (Desired, Observed) {
    let now = now();
    let minutes = |m: i64| now - SignedDuration::from_mins(m);
    let mut desired_pools = Vec::new();
    for (index, draft) in pools.iter().enumerate() {
        let mode = if draft.start_stop {
            // Adopt the instances drafted for this pool on the pool's backend (whatever their labels).
            let adopted = instances
                .iter()
                .enumerate()
                .filter(|(_, inst)| inst.pool == index && inst.backend == draft.backend)
                .map(|(i, _)| AdoptedInstance { id: InstanceId::new(format!("i{i}")), agent: None })
                .collect();
            InstanceMode::StartStop { instances: adopted }
        } else {
            InstanceMode::Create
        };
        desired_pools.push(PoolSpec {
            name: pool_name(index),
            ci: CiBinding {
                source: CiName::new(SOURCES[draft.source]),
                labels: label_set(draft.label_set),
                azure_pool: None,
                capabilities: BTreeMap::new(),
            },
            backend: BackendBinding {
                backend: BackendName::new(BACKENDS[draft.backend]),
                mode,
                machine: [("serverType".to_owned(), "cx22,cx32".to_owned())].into(),
            },
            agent: AgentSpec { image: Some("agent:1".into()), env: BTreeMap::new(), secret_env: BTreeMap::new(), preregistered: None },
            scale: ScalePolicy {
                min: draft.min,
                max: draft.max,
                min_idle: draft.min_idle,
                jobs_per_agent: draft.jobs_per_agent,
                idle_timeout: GoDuration::from_secs(draft.idle_timeout_min * 60),
                ephemeral: draft.ephemeral,
                bootstrap_timeout: GoDuration::from_secs(600),
                billing_margin: draft.margin.map(|m| GoDuration::from_secs(m * 60)),
                schedule: Vec::new(),
                ..ScalePolicy::default()
            },
        });
    }
    let desired = Desired {
        owner: OWNER.into(),
        poll_interval: GoDuration::from_secs(10),
        ci: SOURCES
            .iter()
            .map(|name| (CiName::new(*name), CiSourceSpec { kind: CiKind::Fake(FakeSpec::default()) }))
            .collect(),
        backends: BACKENDS
            .iter()
            .zip([Billing::PerSecond, Billing::Hourly])
            .map(|(name, billing)| {
                (BackendName::new(*name), BackendSpec { kind: BackendKind::Fake(FakeSpec::default()), billing, create_limit: None })
            })
            .collect(),
        pools: desired_pools,
        images: BTreeMap::new(),
        config_hash: "sha256:props".into(),
        metrics: None,
    };

    let mut observed = Observed { observed_at: now, ..Observed::default() };
    for name in BACKENDS {
        observed.backends.insert(BackendName::new(name), BackendObservation::default());
    }
    for name in SOURCES {
        observed.ci.insert(CiName::new(name), CiObservation::default());
    }
    let hash = plan::agent_hash(&desired.pools[0].agent);
    let mut agent_serial = 0;
    let mut add_agent = |observed: &mut Observed, source: &str, name: String, draft: &AgentDraft| {
        agent_serial += 1;
        let id = AgentId::new(format!("a{agent_serial}"));
        let ci = observed.ci.entry(CiName::new(source)).or_default();
        ci.agents.push(Agent {
            id: id.clone(),
            name,
            busy: draft.busy,
            no_schedule: draft.no_schedule,
            last_contact: draft.contacted.then(|| minutes(0)),
            last_work: draft.last_work_min.map(minutes),
            labels: BTreeMap::new(),
            created_at: None,
        });
        for r in 0..draft.running {
            ci.queue.running.push(Task {
                id: format!("r{agent_serial}-{r}").into(),
                labels: BTreeMap::new(),
                demands: Vec::new(),
                agent_id: Some(id.clone()),
            });
        }
    };
    for (index, draft) in instances.iter().enumerate() {
        let mut labels = BTreeMap::new();
        // Mostly ours, so pools have enough members to scale down; some foreign and unlabelled ones.
        match draft.owner {
            0 | 1 => {
                labels.insert(OWNER_LABEL.to_owned(), OWNER.to_owned());
            }
            2 => {
                labels.insert(OWNER_LABEL.to_owned(), "someone-else".to_owned());
            }
            _ => {}
        }
        labels.insert(POOL_LABEL.to_owned(), pool_name(draft.pool).to_string());
        labels.insert(AGENT_HASH_LABEL.to_owned(), if draft.stale_hash { "000000000000".into() } else { hash.clone() });
        let name = instance_name(index, draft);
        let instance = Instance {
            id: InstanceId::new(format!("i{index}")),
            name: name.clone(),
            state: STATES[draft.state],
            created_at: minutes(draft.age_min),
            labels,
            attributes: [("serverType".to_owned(), ["cx22", "cx32"][draft.server_type].to_owned())].into(),
        };
        observed.backends.entry(BackendName::new(BACKENDS[draft.backend])).or_default().instances.push(instance);
        if let Some(agent) = &draft.agent {
            let source = pools.get(draft.pool).map_or(SOURCES[0], |pool| SOURCES[pool.source]);
            add_agent(&mut observed, source, name, agent);
        }
    }
    for (index, draft) in stray_agents.iter().enumerate() {
        add_agent(&mut observed, SOURCES[index % 2], format!("{OWNER}-p{}-{}", index % 3, 100 + index), draft);
    }
    for (index, draft) in tasks.iter().enumerate() {
        let labels = label_set(draft.label_set).into_iter().filter(|(key, _)| !key.starts_with('!')).collect();
        observed.ci.entry(CiName::new(SOURCES[draft.source])).or_default().queue.pending.push(Task {
            id: format!("t{index}").into(),
            labels,
            demands: Vec::new(),
            agent_id: None,
        });
    }
    (desired, observed)
}

fn is_busy(observed: &Observed, ci: &CiName, agent: &AgentId) -> bool {
    observed.ci.get(ci).is_some_and(|source| {
        source.agents.iter().any(|a| &a.id == agent && a.busy)
            || source.queue.running.iter().any(|task| task.agent_id.as_ref() == Some(agent))
    })
}

/// Instances of a pool counting as capacity: active state, agent (by name) not drained.
fn serving_ids(desired: &Desired, observed: &Observed, pool_index: usize) -> BTreeSet<InstanceId> {
    let pool = &desired.pools[pool_index];
    let Some(backend) = observed.backends.get(&pool.backend.backend) else { return BTreeSet::new() };
    let adopted: BTreeSet<&InstanceId> = match &pool.backend.mode {
        InstanceMode::StartStop { instances } => instances.iter().map(|a| &a.id).collect(),
        InstanceMode::Create => BTreeSet::new(),
    };
    let agents = observed.ci.get(&pool.ci.source);
    backend
        .instances
        .iter()
        .filter(|i| adopted.contains(&i.id) || (i.owner() == Some(OWNER) && i.pool().as_ref() == Some(&pool.name)))
        .filter(|i| i.state.is_active())
        .filter(|i| {
            let agent = agents.and_then(|ci| ci.agents.iter().find(|a| a.name == i.name));
            !agent.is_some_and(|a| a.no_schedule)
        })
        .map(|i| i.id.clone())
        .collect()
}

fn check_invariants(desired: &Desired, observed: &Observed, plan: &Plan) -> Result<(), TestCaseError> {
    // Never above max: what serves after the plan (minus what it removes) plus what it adds.
    for (index, pool) in desired.pools.iter().enumerate() {
        let serving = serving_ids(desired, observed, index);
        let ours = plan.changes.iter().filter(|change| change.pool == pool.name);
        let mut after = serving.len() as i64;
        let mut added = 0i64;
        for change in ours {
            let id = change.instance.as_ref().and_then(|target| target.id.as_ref());
            match change.action {
                Action::Create | Action::Replace => added += 1,
                Action::Start => {
                    if !id.is_some_and(|id| serving.contains(id)) {
                        added += 1;
                    }
                }
                Action::Delete | Action::Stop => {
                    if id.is_some_and(|id| serving.contains(id)) {
                        after -= 1;
                    }
                }
                Action::Drain | Action::Deregister => {}
            }
        }
        if added > 0 {
            prop_assert!(
                after + added <= i64::from(pool.scale.max),
                "pool {} would have {} serving (max {}): {:#?}",
                pool.name,
                after + added,
                pool.scale.max,
                plan.changes
            );
        }
    }

    let adopted: BTreeSet<(&BackendName, &InstanceId)> = desired
        .pools
        .iter()
        .flat_map(|pool| match &pool.backend.mode {
            InstanceMode::StartStop { instances } => {
                instances.iter().map(|a| (&pool.backend.backend, &a.id)).collect::<Vec<_>>()
            }
            InstanceMode::Create => Vec::new(),
        })
        .collect();

    for change in &plan.changes {
        let removes = matches!(
            change.action,
            Action::Drain | Action::Delete | Action::Stop | Action::Replace | Action::Deregister
        );
        if removes {
            if let Some(agent) = &change.agent {
                prop_assert!(!is_busy(observed, &agent.ci, &agent.id), "busy agent targeted: {change:#?}");
            }
            // A change without an agent target must not be hiding one: no busy agent named like the instance
            // in the pool's source (any source for orphans of removed pools).
            if let (Some(target), None) = (&change.instance, &change.agent) {
                let sources: Vec<&CiName> = match desired.pool(&change.pool) {
                    Some(pool) => vec![&pool.ci.source],
                    None => observed.ci.keys().collect(),
                };
                for ci_name in sources {
                    let agents = observed.ci.get(ci_name).map(|ci| ci.agents.as_slice()).unwrap_or_default();
                    for agent in agents.iter().filter(|a| a.name == target.name) {
                        prop_assert!(
                            !is_busy(observed, ci_name, &agent.id),
                            "instance with busy agent targeted: {change:#?}"
                        );
                    }
                }
            }
        }
        if let Some(target) = &change.instance {
            if let Some(id) = &target.id {
                let instance =
                    observed.backends.get(&target.backend).and_then(|b| b.instances.iter().find(|i| &i.id == id));
                prop_assert!(instance.is_some(), "change targets an unobserved instance: {change:#?}");
                let owned = instance.is_some_and(|i| i.owner() == Some(OWNER));
                prop_assert!(
                    owned || adopted.contains(&(&target.backend, id)),
                    "change targets an instance without our owner label: {change:#?}"
                );
            } else {
                prop_assert_eq!(change.action, Action::Create);
            }
        }
        if change.action == Action::Deregister {
            let agent = change.agent.as_ref();
            prop_assert!(agent.is_some(), "deregister without agent");
            let name = agent.map(|a| a.name.as_str()).unwrap_or_default();
            let has_instance = observed
                .backends
                .values()
                .flat_map(|b| &b.instances)
                .any(|i| i.name == name && i.state != InstanceState::Terminated);
            prop_assert!(!has_instance, "deregistered an agent whose instance exists: {change:#?}");
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn plan_invariants_hold((pools, instances, tasks, strays) in world()) {
        let (desired, observed) = build(&pools, &instances, &tasks, &strays);
        let first = plan::plan(&desired, &observed, now());
        check_invariants(&desired, &observed, &first)?;
        // Deterministic: a second run gives the same plan, byte for byte.
        let second = plan::plan(&desired, &observed, now());
        prop_assert_eq!(&first, &second);
        prop_assert_eq!(plan::render::render_json(&first), plan::render::render_json(&second));
        let opts = plan::render::RenderOptions { color: false };
        prop_assert_eq!(plan::render::render_human(&first, &opts), plan::render::render_human(&second, &opts));
    }
}
