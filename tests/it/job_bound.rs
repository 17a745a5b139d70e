//! The planner's promise for a CI source whose agents are bound to one job each (Forgejo's `one-job --handle`),
//! over random worlds, stated from the observation and the plan: a create names a waiting job (`ciscale.job`)
//! that no agent of the source names, that the create's pool is the first (in config order) to offer every
//! `runs-on` label of, and that no other create names; a create goes without a job only once every such job of
//! its pool has one.

use std::collections::{BTreeMap, BTreeSet};

use ciscale::model::{
    Agent, AgentId, AgentSpec, BackendBinding, BackendKind, BackendName, BackendObservation, BackendSpec, Billing,
    CiBinding, CiKind, CiName, CiObservation, CiSourceSpec, Desired, FakeSpec, ForgejoScope, GoDuration, Instance,
    InstanceId, InstanceMode, InstanceState, Observed, PoolName, PoolSpec, Queue, ScalePolicy, Secret, Task, TaskId,
    AGENT_HASH_LABEL, JOB_LABEL, OWNER_LABEL, POOL_LABEL,
};
use ciscale::plan::{self, Action};
use proptest::prelude::*;

const OWNER: &str = "fj";
const LABELS: [&str; 4] = ["debian", "linux", "gpu", "arm"];

fn now() -> jiff::Timestamp {
    "2026-01-01T12:00:00Z".parse().unwrap_or_default()
}

/// Runner label names a pool offers, by index into a few typical sets.
fn offered(set: usize) -> Vec<&'static str> {
    match set % 4 {
        0 => vec!["debian"],
        1 => vec!["debian", "linux"],
        2 => vec!["gpu", "linux"],
        _ => vec!["arm"],
    }
}

#[derive(Debug, Clone)]
struct JobDraft {
    runs_on: Vec<usize>,
    /// Bound to an agent already: with an instance (`Some(true)`), as a record only (`Some(false)`).
    agent: Option<bool>,
}

fn world() -> impl Strategy<Value = (Vec<(usize, u32)>, Vec<JobDraft>, usize)> {
    let pools = prop::collection::vec((0usize..4, 1u32..6), 1..4);
    let job = (prop::collection::vec(0usize..4, 0..3), prop::option::of(any::<bool>()))
        .prop_map(|(runs_on, agent)| JobDraft { runs_on, agent });
    (pools, prop::collection::vec(job, 0..12), 0usize..3)
}

fn build(pools: &[(usize, u32)], jobs: &[JobDraft], stale_agents: usize) -> (Desired, Observed) {
    let source = CiName::new("forgejo");
    let backend = BackendName::new("lxd");
    let pool_specs: Vec<PoolSpec> = pools
        .iter()
        .enumerate()
        .map(|(index, (set, max))| PoolSpec {
            name: PoolName::new(format!("p{index}")),
            ci: CiBinding {
                source: source.clone(),
                labels: offered(*set).into_iter().map(|name| (name.to_owned(), "host".to_owned())).collect(),
                capabilities: BTreeMap::new(),
            },
            backend: BackendBinding {
                backend: backend.clone(),
                mode: InstanceMode::Create,
                machine: BTreeMap::from([("image".to_owned(), "forgejo-runner".to_owned())]),
            },
            agent: AgentSpec { image: None, env: BTreeMap::new(), secret_env: BTreeMap::new(), preregistered: None },
            scale: ScalePolicy { max: *max, ephemeral: true, ..ScalePolicy::default() },
        })
        .collect();
    let desired = Desired {
        owner: OWNER.to_owned(),
        poll_interval: GoDuration::from_secs(10),
        ci: BTreeMap::from([(
            source.clone(),
            CiSourceSpec {
                kind: CiKind::Forgejo {
                    server: "http://forgejo.invalid".to_owned(),
                    token: Secret::new("t"),
                    scope: ForgejoScope::Organization("acme".to_owned()),
                    runner_url: None,
                    runner_release: None,
                },
            },
        )]),
        backends: BTreeMap::from([(
            backend.clone(),
            BackendSpec {
                kind: BackendKind::Fake(FakeSpec::default()),
                billing: Billing::PerSecond,
                create_limit: None,
                change_timeout: None,
            },
        )]),
        pools: pool_specs,
        images: BTreeMap::new(),
        config_hash: "test".to_owned(),
        metrics: None,
    };

    let mut instances = Vec::new();
    let mut agents = Vec::new();
    let mut pending = Vec::new();
    let mut used = BTreeMap::<usize, u32>::new();
    // An agent is put in the first pool (any pool would do: it serves its job wherever it lives).
    let mut add_agent =
        |handle: String, with_instance: bool, instances: &mut Vec<Instance>, agents: &mut Vec<Agent>| {
            let pool = &desired.pools[0];
            let index = used.entry(0).or_insert(0);
            *index += 1;
            let name = plan::instance_name(OWNER, &pool.name, *index);
            let id = AgentId::new(format!("{}", 100 + agents.len()));
            if with_instance {
                instances.push(Instance {
                    id: InstanceId::new(name.clone()),
                    name: name.clone(),
                    state: InstanceState::Running,
                    created_at: now() - jiff::SignedDuration::from_secs(60),
                    labels: BTreeMap::from([
                        (OWNER_LABEL.to_owned(), OWNER.to_owned()),
                        (POOL_LABEL.to_owned(), pool.name.to_string()),
                        (AGENT_HASH_LABEL.to_owned(), plan::agent_hash(&pool.agent)),
                        (JOB_LABEL.to_owned(), handle.clone()),
                    ]),
                    attributes: BTreeMap::from([("image".to_owned(), "forgejo-runner".to_owned())]),
                });
            }
            agents.push(Agent {
                id,
                name,
                busy: false,
                no_schedule: false,
                last_contact: Some(now()),
                last_work: None,
                labels: BTreeMap::from([(JOB_LABEL.to_owned(), handle)]),
                created_at: None,
            });
        };
    for (index, job) in jobs.iter().enumerate() {
        let handle = format!("h{index}");
        pending.push(Task {
            id: TaskId::new(format!("{}", 900 + index)),
            labels: [(JOB_LABEL, handle.as_str())].into(),
            demands: job.runs_on.iter().map(|label| LABELS[*label].to_owned()).collect(),
            agent_id: None,
        });
        if let Some(with_instance) = job.agent {
            add_agent(handle, with_instance, &mut instances, &mut agents);
        }
    }
    // Runners made for jobs that are no longer waiting (cancelled, or taken elsewhere).
    for stale in 0..stale_agents {
        add_agent(format!("gone{stale}"), true, &mut instances, &mut agents);
    }
    let observed = Observed {
        observed_at: now(),
        backends: BTreeMap::from([(backend, BackendObservation { instances, ..Default::default() })]),
        ci: BTreeMap::from([(source, CiObservation { agents, queue: Queue { pending, running: Vec::new() } })]),
        in_flight: Vec::new(),
    };
    (desired, observed)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn each_create_serves_one_waiting_job_no_agent_serves((pools, jobs, stale) in world()) {
        let (desired, observed) = build(&pools, &jobs, stale);
        let plan = plan::plan(&desired, &observed, now());
        let ci = &observed.ci[&CiName::new("forgejo")];
        let served: BTreeSet<&str> =
            ci.agents.iter().filter_map(|agent| agent.labels.get(JOB_LABEL)).map(String::as_str).collect();
        // From the outside: which pool takes each waiting job (Forgejo: every `runs-on` label among the runner's
        // label names; a job without `runs-on` runs nowhere), the first in config order.
        let taker = |task: &Task| {
            desired.pools.iter().position(|pool| {
                !task.demands.is_empty() && task.demands.iter().all(|label| pool.ci.labels.contains_key(label))
            })
        };
        let waiting: BTreeMap<&str, &Task> =
            ci.queue.pending.iter().map(|task| (task.labels.get(JOB_LABEL).expect("every job has a handle"), task)).collect();

        let mut named = BTreeSet::new();
        let mut creates_per_pool: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
        for change in plan.changes.iter().filter(|change| change.action == Action::Create) {
            let entry = creates_per_pool.entry(change.pool.as_str()).or_default();
            entry.0 += 1;
            let Some(job) = change.after.get(&format!("label.{JOB_LABEL}")) else { continue };
            entry.1 += 1;
            let task = waiting.get(job.as_str());
            prop_assert!(task.is_some(), "create for `{job}`, which is not waiting: {:?}", change);
            prop_assert!(!served.contains(job.as_str()), "`{job}` has an agent already");
            let pool = taker(task.unwrap()).map(|index| desired.pools[index].name.as_str());
            prop_assert_eq!(pool, Some(change.pool.as_str()), "`{}` is not this pool's job", job);
            prop_assert!(named.insert(job.clone()), "two creates for `{}`", job);
        }
        for (index, pool) in desired.pools.iter().enumerate() {
            let unserved = waiting
                .iter()
                .filter(|(job, task)| !served.contains(*job) && taker(task) == Some(index))
                .count();
            let (creates, with_job) = creates_per_pool.get(pool.name.as_str()).copied().unwrap_or_default();
            prop_assert_eq!(with_job, creates.min(unserved), "pool `{}`: {:?}", pool.name, plan.changes);
            prop_assert!(creates <= pool.scale.max as usize);
        }
    }
}

/// A CI that cannot drain gets no drain: a runner idle past its idle timeout (made for a job that was cancelled)
/// goes at once — delete, which deregisters it — and the plan holds when applied later from a file; a busy one
/// is left alone.
#[test]
fn an_idle_runner_of_a_ci_that_cannot_drain_is_deleted_not_drained() {
    let jobs = [JobDraft { runs_on: vec![0], agent: Some(true) }, JobDraft { runs_on: vec![0], agent: Some(true) }];
    let (desired, mut observed) = build(&[(0, 4)], &jobs, 0);
    // Both jobs are gone from the queue (cancelled); the first runner still runs something, the second idles
    // since its container came up two hours ago.
    let ci = observed.ci.get_mut(&CiName::new("forgejo")).expect("ci");
    ci.queue.pending.clear();
    ci.agents[0].busy = true;
    for instance in &mut observed.backends.get_mut(&BackendName::new("lxd")).expect("lxd").instances {
        instance.created_at = now() - jiff::SignedDuration::from_hours(2);
    }
    let (busy, idle) = (ci.agents[0].name.clone(), ci.agents[1].name.clone());

    let plan = plan::plan(&desired, &observed, now());
    let actions: Vec<(Action, &str)> = plan
        .changes
        .iter()
        .map(|change| (change.action, change.instance.as_ref().map_or("-", |instance| instance.name.as_str())))
        .collect();
    assert_eq!(actions, [(Action::Delete, idle.as_str())], "{:#?}", plan.changes);
    assert!(plan.changes[0].agent.is_some(), "the delete deregisters the runner too");
    assert!(plan.changes[0].reason.contains("cannot drain"), "{}", plan.changes[0].reason);
    assert!(!actions.iter().any(|(_, name)| *name == busy));
    // Applied later from a file: the world is unchanged, so the delete still holds.
    let checked = plan::preconditions(&plan.changes, &desired, &observed, now());
    assert!(checked.iter().all(Result::is_ok), "{checked:?}");
}
