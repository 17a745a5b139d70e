//! Unit tests of the planner's rules through [`plan`] (the scenario snapshots in `tests/scenarios` cover the
//! rest), plus the small helpers.

use std::collections::BTreeMap;

use jiff::{SignedDuration, Timestamp};

use super::digest::{agent_hash, fingerprint};
use super::ownership::instance_name;
use super::planner::plan;
use super::text::human_duration;
use super::{Action, AgentTarget, Cost, InstanceTarget, Plan};
use crate::model::{
    Agent, AgentId, AgentSpec, BackendBinding, BackendKind, BackendObservation, BackendSpec, Billing, CiBinding,
    CiKind, CiObservation, CiSourceSpec, Desired, FakeSpec, GoDuration, Instance, InstanceId, InstanceMode,
    InstanceState, Observed, PoolSpec, Queue, ScalePolicy, Task, AGENT_HASH_LABEL, OWNER_LABEL, POOL_LABEL,
};

const NOW: &str = "2026-01-01T12:00:00Z";

/// The name of the `index`-th instance of the test pool `linux` of owner `ci`.
fn name(index: u32) -> String {
    instance_name("ci", &"linux".into(), index)
}

fn ts(text: &str) -> Timestamp {
    text.parse().unwrap()
}

fn desired(scale: ScalePolicy) -> Desired {
    let pool = PoolSpec {
        name: "linux".into(),
        ci: CiBinding {
            source: "wp".into(),
            labels: [("platform".to_owned(), "linux/amd64".to_owned())].into(),
            capabilities: BTreeMap::new(),
        },
        backend: BackendBinding {
            backend: "cloud".into(),
            mode: InstanceMode::Create,
            machine: [("server_type".to_owned(), "cx22,cx32".to_owned())].into(),
        },
        agent: AgentSpec {
            image: Some("agent:1".into()),
            env: BTreeMap::new(),
            secret_env: BTreeMap::new(),
            preregistered: None,
        },
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
        created_at: Some(ts("2026-01-01T09:00:00Z")),
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
        backends: [(
            "cloud".into(),
            BackendObservation { instances, prices: BTreeMap::new(), missing_images: Vec::new() },
        )]
        .into(),
        ci: [("wp".into(), CiObservation { agents, queue: Queue { pending, running: Vec::new() } })].into(),
        in_flight: Vec::new(),
    }
}

fn actions(plan: &Plan) -> Vec<(Action, String)> {
    plan.changes.iter().map(|change| (change.action, change.target_name().to_owned())).collect()
}

#[test]
fn creates_up_to_max_with_lowest_free_names() {
    let desired = desired(ScalePolicy { max: 3, ..ScalePolicy::default() });
    let hash = agent_hash(&desired.pools[0].agent);
    let pending = (0..5).map(|i| task(&format!("t{i}"), "linux/amd64")).collect();
    let observed = observed(
        vec![owned(&name(2), InstanceState::Running, "2026-01-01T11:55:00Z", &hash)],
        vec![agent(&name(2), true, false, None)],
        pending,
    );
    let plan = plan(&desired, &observed, ts(NOW));
    assert_eq!(actions(&plan), vec![(Action::Create, name(1)), (Action::Create, name(3))]);
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
    observed.in_flight.push(in_flight(Action::Create, &name(1), None, None));
    let plan = plan(&desired, &observed, ts(NOW));
    // One create is on its way, so one more reaches max; its name is not handed out twice.
    assert_eq!(actions(&plan), vec![(Action::Create, name(2))]);
    assert_eq!(plan.pools[0].active, 1);
}

#[test]
fn a_create_in_flight_whose_instance_is_listed_already_is_still_capacity() {
    // incusd lists a container (stopped) while its create still runs; the create's agent record is there too.
    // Two jobs, one serving agent, one create on its way: nothing more to create (found as a third container
    // for two Forgejo jobs on real Incus).
    let desired = desired(ScalePolicy { max: 4, ..ScalePolicy::default() });
    let hash = agent_hash(&desired.pools[0].agent);
    let pending = (0..2).map(|i| task(&format!("t{i}"), "linux/amd64")).collect();
    let mut observed = observed(
        vec![
            owned(&name(1), InstanceState::Stopped, "2026-01-01T11:59:30Z", &hash),
            owned(&name(2), InstanceState::Running, "2026-01-01T11:55:00Z", &hash),
        ],
        vec![agent(&name(1), false, false, None), agent(&name(2), false, false, None)],
        pending,
    );
    observed.in_flight.push(in_flight(Action::Create, &name(1), None, Some(&format!("a-{}", name(1)))));
    let plan = plan(&desired, &observed, ts(NOW));
    assert!(!actions(&plan).iter().any(|(action, _)| *action == Action::Create), "{:?}", actions(&plan));
    assert_eq!(plan.pools[0].active, 2);
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

/// Saved plans carry the fingerprint and `apply` compares it with one of a fresh observation, possibly made by
/// another build: the encoding is pinned here, spelled out as the JSON text it hashes (instances and agents
/// sorted by id, two instances listed out of order on purpose).
#[test]
fn fingerprint_is_the_sha256_of_the_inventory_json() {
    use sha2::{Digest, Sha256};
    let mut stray = owned("b", InstanceState::Stopped, "2026-01-01T10:00:00Z", "x");
    stray.labels.remove(POOL_LABEL);
    let observed = observed(
        vec![stray, owned("a", InstanceState::Running, "2026-01-01T10:00:00Z", "x")],
        vec![agent("z", false, true, None), agent("y", true, false, None)],
        Vec::new(),
    );
    let text = concat!(
        r#"{"backends":{"cloud":[{"id":"id-a","state":"running","owner":"ci","pool":"linux"},"#,
        r#"{"id":"id-b","state":"stopped","owner":"ci","pool":null}]},"#,
        r#""ci":{"wp":[{"id":"a-y","no_schedule":false},{"id":"a-z","no_schedule":true}]}}"#
    );
    let want: String = Sha256::digest(text.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(fingerprint(&observed), format!("sha256:{want}"));
}

/// The fingerprint's text escapes strings as serde_json does (saved plans made by earlier builds carry
/// fingerprints of serde_json's text): quotes, backslashes and control characters escaped, the rest verbatim.
#[test]
fn fingerprint_escapes_strings_as_json() {
    use sha2::{Digest, Sha256};
    let mut odd = owned("x", InstanceState::Pending, "2026-01-01T10:00:00Z", "x");
    odd.id = InstanceId::new("q\"b\\s\u{1}n\nt\té/");
    odd.labels.insert(POOL_LABEL.to_owned(), "p\u{1f}\u{7f}".to_owned());
    let mut observed = observed(vec![odd], Vec::new(), Vec::new());
    observed.ci.clear();
    let text = concat!(
        r#"{"backends":{"cloud":[{"id":"q\"b\\s\u0001n\nt\té/","state":"pending","owner":"ci","#,
        r#""pool":"p\u001f"#,
        "\u{7f}",
        r#""}]},"ci":{}}"#
    );
    let want: String = Sha256::digest(text.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect();
    assert_eq!(fingerprint(&observed), format!("sha256:{want}"));
}

#[test]
fn human_durations() {
    assert_eq!(human_duration(SignedDuration::from_secs(45)), "45s");
    assert_eq!(human_duration(SignedDuration::from_secs(31 * 60 + 5)), "31m");
    assert_eq!(human_duration(SignedDuration::from_secs(3600)), "1h");
    assert_eq!(human_duration(SignedDuration::from_secs(3900)), "1h5m");
}

fn jobs(count: usize) -> Vec<Task> {
    (0..count).map(|i| task(&format!("t{i}"), "linux/amd64")).collect()
}

#[test]
fn drained_busy_instances_count_towards_max() {
    // The only instance is drained for drift and still runs a job; jobs wait. Before: a second instance.
    let desired = desired(ScalePolicy { max: 1, ..ScalePolicy::default() });
    let observed = observed(
        vec![owned(&name(1), InstanceState::Running, "2026-01-01T10:00:00Z", "old-hash")],
        vec![agent(&name(1), true, true, None)],
        jobs(3),
    );
    let plan = plan(&desired, &observed, ts(NOW));
    assert!(plan.changes.is_empty(), "{:?}", actions(&plan));
    let notes = &plan.pools[0].notes;
    assert!(
        notes
            .iter()
            .any(|note| note == "1 more wanted, but the pool has 1 of max 1 instances (1 drained): nothing added"),
        "{notes:?}"
    );
}

#[test]
fn stopped_instances_count_in_create_mode() {
    let desired = desired(ScalePolicy { max: 2, ..ScalePolicy::default() });
    let hash = agent_hash(&desired.pools[0].agent);
    let mut drained_drifted = owned(&name(2), InstanceState::Running, "2026-01-01T10:00:00Z", "old-hash");
    drained_drifted.attributes.clear();
    let observed = observed(
        vec![owned(&name(1), InstanceState::Stopped, "2026-01-01T11:50:00Z", &hash), drained_drifted],
        vec![agent(&name(1), false, false, None), agent(&name(2), true, true, None)],
        jobs(4),
    );
    let plan = plan(&desired, &observed, ts(NOW));
    // The stopped one is started (it counted already); nothing is created: 2 of max 2.
    assert_eq!(actions(&plan), vec![(Action::Start, name(1))]);
}

#[test]
fn a_record_of_ours_without_instance_is_a_create_in_flight_then_reused() {
    let desired = desired(ScalePolicy { max: 2, ..ScalePolicy::default() });
    let mut record = agent(&name(1), false, false, None);
    record.last_contact = None;
    record.created_at = Some(ts("2026-01-01T11:58:00Z"));
    let young = observed(Vec::new(), vec![record.clone()], jobs(5));
    let plan_young = plan(&desired, &young, ts(NOW));
    // Within the bootstrap timeout: created again under its own name (create-if-absent finds an instance that
    // was made), and it counts towards max with the one fresh create: never three.
    assert_eq!(actions(&plan_young), vec![(Action::Create, name(1)), (Action::Create, name(2))]);

    // It counts towards max even when nothing more is wanted: a serving busy member and the record fill max 2.
    let hash = agent_hash(&desired.pools[0].agent);
    let busy_member = owned(&name(3), InstanceState::Running, "2026-01-01T11:00:00Z", &hash);
    let full = observed(vec![busy_member], vec![record.clone(), agent(&name(3), true, false, None)], jobs(5));
    let plan_full = plan(&desired, &full, ts(NOW));
    assert_eq!(actions(&plan_full), vec![(Action::Create, name(1))], "only the unfinished create, again");

    // Past the window: its name goes to the next create (which takes the record over), not deregistered.
    let later = ts("2026-01-01T12:30:00Z");
    let one_job = observed(Vec::new(), vec![record.clone()], jobs(1));
    assert_eq!(actions(&plan(&desired, &one_job, later)), vec![(Action::Create, name(1))]);

    // Past the window and nothing to create: kept with a note, as it never made contact (an instance of it may
    // not be listed yet), whatever its age. Within it and nothing to create: left alone.
    let idle = observed(Vec::new(), vec![record.clone()], Vec::new());
    let kept = plan(&desired, &idle, ts("2026-01-02T12:00:00Z"));
    assert!(kept.changes.is_empty());
    assert!(kept.pools[0].notes.iter().any(|note| note.contains("kept")), "{:?}", kept.pools[0].notes);
    assert!(plan(&desired, &idle, ts(NOW)).changes.is_empty());
    // Once it made contact, its instance was listed then: gone now, so the record goes.
    let contacted = Agent { last_contact: Some(ts("2026-01-01T12:05:00Z")), ..record };
    let gone = observed(Vec::new(), vec![contacted], Vec::new());
    assert_eq!(actions(&plan(&desired, &gone, later)), vec![(Action::Deregister, name(1))]);
}

#[test]
fn look_alike_and_legacy_records_are_left_alone() {
    let desired = desired(ScalePolicy { max: 1, ..ScalePolicy::default() });
    let other_deployment = instance_name("ci-arm", &"linux".into(), 1);
    let observed = observed(
        Vec::new(),
        vec![
            agent("ci-runner", false, false, None),
            agent("ci-linux-3", false, false, None),
            agent(&other_deployment, false, false, None),
        ],
        Vec::new(),
    );
    let plan = plan(&desired, &observed, ts(NOW));
    assert!(plan.changes.is_empty(), "{:?}", actions(&plan));
    assert_eq!(plan.notes.len(), 3, "{:?}", plan.notes);
    assert!(plan.notes.iter().all(|note| note.starts_with("not ours, left alone: agent `ci-")));
}

#[test]
fn orphan_instance_keeps_a_busy_agent_linked_by_label() {
    let desired = desired(ScalePolicy::default());
    let mut orphan = owned("ci-picus-1", InstanceState::Running, "2026-01-01T10:00:00Z", "x");
    orphan.labels.insert(POOL_LABEL.to_owned(), "picus".to_owned());
    orphan.labels.insert(crate::model::AGENT_LABEL.to_owned(), "7".to_owned());
    let mut preregistered = agent("picus-agent", true, false, None);
    preregistered.id = AgentId::new("7");
    let busy = observed(vec![orphan.clone()], vec![preregistered.clone()], Vec::new());
    let plan_busy = plan(&desired, &busy, ts(NOW));
    assert!(plan_busy.changes.is_empty(), "{:?}", actions(&plan_busy));
    assert!(plan_busy.notes.iter().any(|note| note.contains("kept while its agent `picus-agent` runs a job")));

    // Idle: drained first (the pre-registered agent is the target), then deleted without deregistering it.
    preregistered.busy = false;
    let idle = observed(vec![orphan.clone()], vec![preregistered.clone()], Vec::new());
    let plan_idle = plan(&desired, &idle, ts(NOW));
    assert_eq!(actions(&plan_idle), vec![(Action::Drain, "ci-picus-1".to_owned())]);
    assert_eq!(plan_idle.changes[0].agent.as_ref().map(|agent| agent.id.as_str()), Some("7"));
    preregistered.no_schedule = true;
    let drained = observed(vec![orphan], vec![preregistered], Vec::new());
    let plan_drained = plan(&desired, &drained, ts(NOW));
    assert_eq!(actions(&plan_drained), vec![(Action::Delete, "ci-picus-1".to_owned())]);
    assert_eq!(plan_drained.changes[0].agent, None, "a pre-registered agent is never deregistered");
}

#[test]
fn never_registered_removal_says_its_cause() {
    let desired = desired(ScalePolicy::default());
    let hash = agent_hash(&desired.pools[0].agent);
    let observed =
        observed(vec![owned(&name(1), InstanceState::Running, "2026-01-01T11:00:00Z", &hash)], Vec::new(), Vec::new());
    let plan = plan(&desired, &observed, ts(NOW));
    assert_eq!(actions(&plan), vec![(Action::Delete, name(1))]);
    assert_eq!(plan.changes[0].cause, Some(super::Cause::BootstrapTimeout));
}

#[test]
fn an_orphan_is_deleted_only_once_every_agent_linked_to_it_is_drained() {
    let desired = desired(ScalePolicy::default());
    let mut orphan = owned("ci-gone-1", InstanceState::Running, "2026-01-01T10:00:00Z", "x");
    orphan.labels.insert(POOL_LABEL.to_owned(), "gone".to_owned());
    orphan.labels.insert(crate::model::AGENT_LABEL.to_owned(), "7".to_owned());
    let mut labelled = agent("picus-agent", false, true, None);
    labelled.id = AgentId::new("7");
    let named = agent("ci-gone-1", false, false, None);
    let observed = observed(vec![orphan], vec![labelled, named], Vec::new());
    let plan = plan(&desired, &observed, ts(NOW));
    assert_eq!(actions(&plan), vec![(Action::Drain, "ci-gone-1".to_owned())]);
    assert_eq!(plan.changes[0].agent.as_ref().map(|agent| agent.name.as_str()), Some("ci-gone-1"));
}

#[test]
fn the_simulation_plan_decides_as_the_plan_and_leaves_out_fingerprint_cost_and_notes() {
    let desired = desired(ScalePolicy { max: 4, min_idle: 1, ..ScalePolicy::default() });
    let hash = agent_hash(&desired.pools[0].agent);
    let pending = (0..3).map(|i| task(&format!("t{i}"), "linux/amd64")).collect();
    let mut observed = observed(
        vec![
            owned(&name(1), InstanceState::Running, "2026-01-01T10:00:00Z", &hash),
            owned(&name(2), InstanceState::Running, "2026-01-01T10:00:00Z", "0ld0ld0ld0ld"),
            owned(&name(3), InstanceState::Stopped, "2026-01-01T10:00:00Z", &hash),
        ],
        vec![agent(&name(1), true, false, None), agent(&name(2), false, false, Some("2026-01-01T11:00:00Z"))],
        pending,
    );
    let price = crate::model::Price { hourly: 0.0126, currency: "EUR".into() };
    if let Some(backend) = observed.backends.values_mut().next() {
        backend.prices.insert("cx22".into(), price);
    }
    let full = plan(&desired, &observed, ts(NOW));
    let simulated = super::plan_for_simulation(&desired, &observed, ts(NOW));
    assert!(!full.changes.is_empty(), "the world must give the planner something to decide");
    assert!(full.cost.hourly.values().any(|line| line.after > 0.0), "the world must have a cost to leave out");
    assert!(!full.pools[0].notes.is_empty(), "the world must have pool notes to leave out");
    assert_eq!(simulated.observed_fingerprint, "");
    assert_eq!(simulated.cost, Cost::default());
    let mut decisions = Plan { observed_fingerprint: String::new(), cost: Cost::default(), ..full };
    for pool in &mut decisions.pools {
        pool.notes.clear();
    }
    assert_eq!(simulated, decisions);
}

/// A world of `pools` pools (`p0`, `p1`, ...) of `per_pool` instances each on one backend: busy agents, agents idle
/// for long, drained and stopped ones, some of an older agent hash, and jobs waiting for every other pool; so every
/// rule has work in some pool. For tests that compare ways of planning the same world.
pub(super) fn large_world(pools: usize, per_pool: usize) -> (Desired, Observed, Timestamp) {
    let mut desired = desired(ScalePolicy { max: per_pool as u32 + 2, min_idle: 1, ..ScalePolicy::default() });
    let template = desired.pools[0].clone();
    desired.pools = (0..pools)
        .map(|p| {
            let mut pool = template.clone();
            pool.name = format!("p{p}").into();
            pool.ci.labels = [("platform".to_owned(), format!("linux/{p}"))].into();
            pool
        })
        .collect();
    let hash = agent_hash(&template.agent);
    let (mut instances, mut agents, mut pending) = (Vec::new(), Vec::new(), Vec::new());
    for (p, pool) in desired.pools.iter().enumerate() {
        for i in 1..=per_pool as u32 {
            let name = instance_name("ci", &pool.name, i);
            let state = if i % 7 == 0 { InstanceState::Stopped } else { InstanceState::Running };
            let mut instance =
                owned(&name, state, "2026-01-01T09:00:00Z", if i % 5 == 0 { "0ld0ld0ld0ld" } else { &hash });
            instance.labels.insert(POOL_LABEL.to_owned(), pool.name.to_string());
            instances.push(instance);
            let idle_since = if i % 3 == 0 { "2026-01-01T10:00:00Z" } else { "2026-01-01T11:55:00Z" };
            agents.push(agent(&name, i % 4 == 0, i % 11 == 0, Some(idle_since)));
        }
        if p % 2 == 0 {
            pending.extend((0..per_pool / 2).map(|j| task(&format!("t{p}-{j}"), &format!("linux/{p}"))));
        }
    }
    (desired, observed(instances, agents, pending), ts(NOW))
}
