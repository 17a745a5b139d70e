//! Unit tests of the planner's rules through [`plan`] (the scenario snapshots in `tests/scenarios` cover the
//! rest), plus the small helpers.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use super::digest::{agent_hash, fingerprint};
use super::ownership::pool_of_agent_name;
use super::planner::{plan, target_name};
use super::text::human_duration;
use super::{Action, AgentTarget, InstanceTarget, Plan};
use crate::model::{
    Agent, AgentId, AgentSpec, BackendBinding, BackendKind, BackendObservation, BackendSpec, Billing, CiBinding,
    CiKind, CiObservation, CiSourceSpec, Desired, FakeSpec, GoDuration, Instance, InstanceId, InstanceMode,
    InstanceState, Observed, PoolSpec, Queue, ScalePolicy, Task, AGENT_HASH_LABEL, OWNER_LABEL, POOL_LABEL,
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
        in_flight: Vec::new(),
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

fn in_flight(action: Action, name: &str, id: Option<&str>, agent: Option<&str>) -> crate::model::InFlight {
    crate::model::InFlight {
        pool: "linux".into(),
        action,
        instance: Some(InstanceTarget { backend: "cloud".into(), id: id.map(InstanceId::new), name: name.into() }),
        agent: agent.map(|agent| AgentTarget { ci: "wp".into(), id: AgentId::new(agent), name: name.into() }),
        since: ts("2026-01-01T11:59:00Z"),
    }
}

#[test]
fn creates_in_flight_count_towards_max_and_keep_their_names() {
    let desired = desired(ScalePolicy { max: 2, ..ScalePolicy::default() });
    let pending = (0..5).map(|i| task(&format!("t{i}"), "linux/amd64")).collect();
    let mut observed = observed(Vec::new(), Vec::new(), pending);
    observed.in_flight.push(in_flight(Action::Create, "ci-linux-1", None, None));
    let plan = plan(&desired, &observed, ts(NOW));
    // One create is on its way, so one more reaches max; its name is not handed out twice.
    assert_eq!(actions(&plan), vec![(Action::Create, "ci-linux-2".to_owned())]);
    assert_eq!(plan.pools[0].active, 1);
}

#[test]
fn targets_of_work_in_flight_are_not_planned_again() {
    let desired = desired(ScalePolicy { max: 3, ..ScalePolicy::default() });
    let hash = agent_hash(&desired.pools[0].agent);
    let mut observed = observed(
        vec![
            owned("ci-linux-1", InstanceState::Running, "2026-01-01T10:00:00Z", &hash),
            owned("ci-linux-2", InstanceState::Running, "2026-01-01T10:00:00Z", &hash),
        ],
        vec![
            agent("ci-linux-1", false, true, Some("2026-01-01T11:00:00Z")),
            agent("ci-linux-2", false, false, Some("2026-01-01T11:00:00Z")),
        ],
        Vec::new(),
    );
    let without = plan(&desired, &observed, ts(NOW));
    assert_eq!(
        actions(&without),
        vec![(Action::Delete, "ci-linux-1".to_owned()), (Action::Drain, "ci-linux-2".to_owned())]
    );
    observed.in_flight.push(in_flight(Action::Delete, "ci-linux-1", Some("id-ci-linux-1"), Some("a-ci-linux-1")));
    observed.in_flight.push(in_flight(Action::Drain, "ci-linux-2", Some("id-ci-linux-2"), Some("a-ci-linux-2")));
    let with = plan(&desired, &observed, ts(NOW));
    assert!(with.changes.is_empty(), "{:?}", actions(&with));
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
