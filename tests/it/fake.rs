//! The fake world's own semantics beyond the conformance suite: deterministic ids, boot, persistence across
//! handles, the CI simulation and fault injection.

use std::collections::BTreeMap;
use std::time::Duration;

use ciscale::model::{AgentId, FakeSpec, InstanceId, InstanceState, PoolName, Price, EPHEMERAL_LABEL, OWNER_LABEL};
use ciscale::providers::fake::{sha256_hex, FakeWorld, Fault, FaultKind, Op};
use ciscale::providers::{Backend, CiSource, CreateInstance, Error, Exec, ListInstances, RegisterAgent};
use jiff::Timestamp;

use crate::conformance::owned_request;

const OWNER: &str = "fake-tests";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(key, value)| ((*key).to_owned(), (*value).to_owned())).collect()
}

fn register(name: &str, agent_labels: &[(&str, &str)]) -> RegisterAgent {
    RegisterAgent { name: name.to_owned(), pool: PoolName::new("linux"), labels: labels(agent_labels), for_job: None }
}

fn at(text: &str) -> Timestamp {
    text.parse().expect("test timestamp")
}

/// An instance named `name` that runs, and its registered agent: what a finished create leaves behind.
async fn running_agent(world: &FakeWorld, name: &str, agent_labels: &[(&str, &str)]) -> (InstanceId, AgentId) {
    let backend = world.backend();
    let instance = backend.create(&owned_request(OWNER, name)).await.expect("create");
    backend.get(&instance.id).await.expect("get boots it");
    let credential = world.ci().register(&register(name, agent_labels)).await.expect("register");
    (instance.id, credential.agent_id)
}

#[tokio::test]
async fn ids_are_deterministic() {
    let world = FakeWorld::new();
    let backend = world.backend();
    let first = backend.create(&owned_request(OWNER, "a")).await.expect("create a");
    let second = backend.create(&owned_request(OWNER, "b")).await.expect("create b");
    assert_eq!((first.id.as_str(), second.id.as_str()), ("fake-1", "fake-2"));
    let ci = world.ci();
    let agent_a = ci.register(&register("a", &[])).await.expect("register a");
    let agent_b = ci.register(&register("b", &[])).await.expect("register b");
    assert_eq!((agent_a.agent_id.as_str(), agent_b.agent_id.as_str()), ("1", "2"));
    assert_eq!(agent_a.token.expose(), "fake-token-1-1");
    assert_eq!(agent_a.env.get("CI_SERVER").map(String::as_str), Some("fake://"));
    assert_eq!(world.push_task(BTreeMap::new()).as_str(), "t1");
    assert_eq!(world.push_task(BTreeMap::new()).as_str(), "t2");
}

#[tokio::test]
async fn a_created_instance_is_pending_until_looked_at() {
    let world = FakeWorld::new();
    world.set_now(at("2025-01-01T10:00:00Z"));
    let backend = world.backend();
    let created = backend.create(&owned_request(OWNER, "a")).await.expect("create");
    assert_eq!(created.state, InstanceState::Pending);
    assert_eq!(created.created_at, at("2025-01-01T10:00:00Z"), "created_at follows the fake's clock");
    assert_eq!(world.snapshot().instances[0].state, InstanceState::Pending);
    assert_eq!(backend.get(&created.id).await.expect("get").state, InstanceState::Running);
}

#[tokio::test]
async fn create_requires_the_owner_label() {
    let world = FakeWorld::new();
    let mut request = owned_request(OWNER, "a");
    request.labels.remove(OWNER_LABEL);
    let created = world.backend().create(&request).await;
    assert!(matches!(created, Err(Error::Invalid { .. })), "{created:?}");
    assert!(world.snapshot().instances.is_empty());
}

#[tokio::test]
async fn observe_reports_prices_and_counts_calls() {
    let world = FakeWorld::new();
    world.set_price("cx22", Price { hourly: 0.006, currency: "EUR".to_owned() });
    let backend = world.backend();
    let observation = backend
        .observe(&ListInstances { owner: OWNER.to_owned(), adopted: Vec::new(), images: Vec::new() })
        .await
        .expect("observe");
    assert_eq!(observation.prices.get("cx22").map(|price| price.hourly), Some(0.006));
    backend.observe(&ListInstances::default()).await.expect("observe");
    assert_eq!(world.calls(Op::BackendObserve), 2);
    assert_eq!(world.calls(Op::Create), 0);
}

#[tokio::test]
async fn register_again_issues_a_fresh_token_and_keeps_only_its_digest() {
    let world = FakeWorld::new();
    let ci = world.ci();
    let first = ci.register(&register("a", &[])).await.expect("register");
    let second = ci.register(&register("a", &[])).await.expect("register again");
    assert_eq!(first.agent_id, second.agent_id);
    assert_ne!(first.token.expose(), second.token.expose(), "a fresh credential");
    let snapshot = world.snapshot();
    assert_eq!(snapshot.agents[0].token_sha256, sha256_hex(second.token.expose().as_bytes()));
    let debug = format!("{snapshot:?}");
    assert!(!debug.contains("fake-token"), "no token in the state's Debug: {debug}");
}

#[tokio::test]
async fn push_file_and_exec_are_recorded() {
    let world = FakeWorld::new();
    let backend = world.backend();
    let instance = backend.create(&owned_request(OWNER, "a")).await.expect("create");
    backend.get(&instance.id).await.expect("boot");
    let file = ciscale::providers::PushFile {
        path: "/run/x.env".to_owned(),
        content: ciscale::model::Secret::new("A=1\n"),
        mode: 0o400,
        uid: 0,
        gid: 0,
    };
    backend.push_file(&instance.id, &file).await.expect("push");
    let exec = |command: &[&str], wait| Exec {
        command: command.iter().map(|part| (*part).to_owned()).collect(),
        env: labels(&[("K", "v")]),
        wait,
    };
    assert_eq!(backend.exec(&instance.id, &exec(&["false"], true)).await.expect("exec").exit_code, Some(1));
    assert_eq!(backend.exec(&instance.id, &exec(&["echo", "hi"], true)).await.expect("exec").exit_code, Some(0));
    assert_eq!(backend.exec(&instance.id, &exec(&["agent"], false)).await.expect("exec").exit_code, None);

    let snapshot = world.snapshot();
    assert_eq!(snapshot.pushed_files.len(), 1);
    let pushed = &snapshot.pushed_files[0];
    assert_eq!((pushed.path.as_str(), pushed.mode, pushed.len), ("/run/x.env", 0o400, 4));
    assert_eq!(pushed.sha256, sha256_hex(b"A=1\n"));
    let commands: Vec<_> = snapshot.execs.iter().map(|exec| (exec.command.join(" "), exec.wait)).collect();
    assert_eq!(commands, [("false".to_owned(), true), ("echo hi".to_owned(), true), ("agent".to_owned(), false)]);
    assert_eq!(snapshot.execs[0].env, labels(&[("K", "v")]));

    backend.stop(&instance.id).await.expect("stop");
    let refused = backend.exec(&instance.id, &exec(&["true"], true)).await;
    assert!(matches!(refused, Err(Error::Invalid { .. })), "exec in a stopped instance: {refused:?}");

    // A delete takes the instance's records with it and leaves another instance's alone, so a long-running
    // demo's world does not grow with every agent it ever started.
    let other = backend.create(&owned_request(OWNER, "b")).await.expect("create another");
    backend.get(&other.id).await.expect("boot");
    backend.push_file(&other.id, &file).await.expect("push to the other");
    backend.exec(&other.id, &exec(&["agent"], false)).await.expect("exec in the other");
    backend.delete(&instance.id).await.expect("delete");
    let snapshot = world.snapshot();
    let instances_of = |ids: Vec<&ciscale::model::InstanceId>| ids.into_iter().cloned().collect::<Vec<_>>();
    assert_eq!(instances_of(snapshot.pushed_files.iter().map(|file| &file.instance).collect()), [other.id.clone()]);
    assert_eq!(instances_of(snapshot.execs.iter().map(|exec| &exec.instance).collect()), [other.id.clone()]);
}

// -- persistence ------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_state_file_is_shared_by_separate_handles() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("world.json");
    let spec = FakeSpec { state_file: Some(path.clone()), simulate: false, jobs: None };

    let first = FakeWorld::open(&spec).expect("open a missing file");
    assert_eq!(first.snapshot(), Default::default(), "a missing file is an empty world");
    assert!(!path.exists(), "opening does not create the file");

    first.set_now(at("2025-01-01T10:00:00Z"));
    let instance = first.backend().create(&owned_request(OWNER, "a")).await.expect("create");
    let credential = first.ci().register(&register("a", &[("platform", "linux")])).await.expect("register");
    first.push_task(labels(&[("platform", "linux")]));
    first.inject(Fault::new(Op::Get, FaultKind::Unavailable5xx, 1));

    // A second handle, as another process would open it: same world, faults and clock included.
    let second = FakeWorld::open(&spec).expect("open again");
    assert_eq!(second.snapshot(), first.snapshot());
    let got = second.backend().get(&instance.id).await;
    assert!(matches!(got, Err(Error::Unavailable { .. })), "the fault armed through the first handle fires");
    assert_eq!(second.backend().get(&instance.id).await.expect("get").state, InstanceState::Running);
    // ... and what the second changed, the first sees.
    second.ci().drain(&credential.agent_id).await.expect("drain");
    let seen_by_first = first.snapshot();
    assert!(seen_by_first.agents[0].no_schedule);
    assert_eq!(seen_by_first.instances[0].state, InstanceState::Running);
    assert_eq!(seen_by_first.calls.get("backend.get"), Some(&2));

    let text = std::fs::read_to_string(&path).expect("read state file");
    assert!(!text.contains(credential.token.expose()), "the token never reaches the file");
    assert!(text.contains(&sha256_hex(credential.token.expose().as_bytes())), "only its digest");
}

#[tokio::test]
async fn a_corrupt_state_file_is_an_error_with_a_hint() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("world.json");
    std::fs::write(&path, "{ not json").expect("write");
    let error =
        FakeWorld::open(&FakeSpec { state_file: Some(path), simulate: false, jobs: None }).expect_err("corrupt file");
    let text = format!("{error}: {:?}", std::error::Error::source(&error).map(ToString::to_string));
    assert!(text.contains("world.json"), "{text}");
    assert!(text.contains("hint: delete it"), "{text}");
}

// -- simulation -------------------------------------------------------------------------------------------------

#[tokio::test]
async fn simulate_assigns_matching_tasks_runs_them_and_finishes_them() {
    let world = FakeWorld::new();
    world.set_now(at("2025-01-01T10:00:00Z"));
    let (_, linux) = running_agent(&world, "linux-1", &[("platform", "linux/amd64"), ("repo", "*")]).await;
    let (_, arm) = running_agent(&world, "arm-1", &[("platform", "linux/arm64")]).await;

    let for_linux = world.push_task_for(
        labels(&[("platform", "linux/amd64"), ("repo", "org/app"), ("woodpecker-ci.org/x", "y"), ("empty", "")]),
        Duration::from_secs(120),
    );
    let for_nobody = world.push_task(labels(&[("platform", "windows")]));
    world.simulate();

    let observed = world.ci().observe().await.expect("observe");
    let running: Vec<_> = observed.queue.running.iter().map(|task| (&task.id, task.agent_id.as_ref())).collect();
    assert_eq!(running, [(&for_linux, Some(&linux))]);
    assert_eq!(observed.queue.pending.iter().map(|task| &task.id).collect::<Vec<_>>(), [&for_nobody]);
    let busy: BTreeMap<_, _> = observed.agents.iter().map(|agent| (agent.id.clone(), agent.busy)).collect();
    assert_eq!(busy, BTreeMap::from([(linux.clone(), true), (arm.clone(), false)]));
    assert!(observed.agents.iter().all(|agent| agent.last_contact == Some(at("2025-01-01T10:00:00Z"))));

    // Not yet done after 60 s; done after 120 s.
    world.advance(Duration::from_secs(60));
    world.simulate();
    assert_eq!(world.snapshot().tasks.len(), 2);
    world.advance(Duration::from_secs(60));
    world.simulate();
    let snapshot = world.snapshot();
    assert_eq!(snapshot.tasks.iter().map(|task| &task.id).collect::<Vec<_>>(), [&for_nobody]);
    let agent = snapshot.agents.iter().find(|agent| agent.id == linux).expect("agent");
    assert_eq!(agent.last_work, Some(at("2025-01-01T10:02:00Z")));
    assert_eq!(agent.jobs_done, 1);
}

#[tokio::test]
async fn drained_silent_or_busy_agents_take_no_task() {
    let world = FakeWorld::new();
    world.set_now(at("2025-01-01T10:00:00Z"));
    let (_, drained) = running_agent(&world, "drained", &[]).await;
    world.ci().drain(&drained).await.expect("drain");
    // Registered, but its instance was never created: it never checks in.
    world.ci().register(&register("silent", &[])).await.expect("register");
    let (stopped_instance, _) = running_agent(&world, "stopped", &[]).await;
    world.backend().stop(&stopped_instance).await.expect("stop");

    world.push_task(BTreeMap::new());
    world.simulate();
    let snapshot = world.snapshot();
    assert_eq!(snapshot.tasks[0].agent_id, None, "nobody may take it: {:?}", snapshot.agents);

    // Undrained, the agent takes one task and, busy, not the second.
    world.ci().undrain(&drained).await.expect("undrain");
    world.push_task(BTreeMap::new());
    world.simulate();
    let queue = world.ci().observe().await.expect("observe").queue;
    assert_eq!(queue.running.len(), 1);
    assert_eq!(queue.running[0].agent_id.as_ref(), Some(&drained));
    assert_eq!(queue.pending.len(), 1);
}

#[tokio::test]
async fn a_task_of_a_deregistered_agent_goes_back_to_the_queue() {
    let world = FakeWorld::new();
    world.set_now(at("2025-01-01T10:00:00Z"));
    let (_, agent) = running_agent(&world, "a", &[]).await;
    let task = world.push_task(BTreeMap::new());
    world.simulate();
    assert_eq!(world.snapshot().tasks[0].agent_id.as_ref(), Some(&agent));
    world.ci().deregister(&agent).await.expect("deregister");
    let queue = world.ci().observe().await.expect("observe").queue;
    assert_eq!(queue.pending.iter().map(|task| &task.id).collect::<Vec<_>>(), [&task]);
    assert!(queue.running.is_empty());
}

#[tokio::test]
async fn an_ephemeral_agent_powers_off_after_one_job() {
    let world = FakeWorld::new();
    world.set_now(at("2025-01-01T10:00:00Z"));
    let (instance, agent) = running_agent(&world, "eph-1", &[(EPHEMERAL_LABEL, "true")]).await;
    world.push_task_for(BTreeMap::new(), Duration::from_secs(10));
    world.push_task_for(BTreeMap::new(), Duration::from_secs(10));
    world.simulate();
    world.advance(Duration::from_secs(10));
    world.simulate();
    let snapshot = world.snapshot();
    assert_eq!(snapshot.instances[0].id, instance);
    assert_eq!(snapshot.instances[0].state, InstanceState::Stopped, "the instance powered itself off");
    assert_eq!(snapshot.tasks.len(), 1, "one job done");
    assert_eq!(snapshot.tasks[0].agent_id, None, "the second job was not taken by the spent agent");
    // Even started again, a spent ephemeral agent takes nothing more.
    world.backend().start(&instance).await.expect("start");
    world.simulate();
    assert_eq!(world.snapshot().tasks[0].agent_id, None);
    assert!(world.snapshot().agents.iter().any(|known| known.id == agent), "the CI record stays until deregistered");
}

#[tokio::test]
async fn a_simulating_world_plays_the_ci_on_every_observation() {
    let world = FakeWorld::open(&FakeSpec { state_file: None, simulate: true, jobs: None }).expect("open");
    world.set_now(at("2025-01-01T10:00:00Z"));
    let (_, agent) = running_agent(&world, "a", &[]).await;
    world.push_task(BTreeMap::new());
    let observed = world.ci().observe().await.expect("observe");
    assert_eq!(observed.queue.running.first().and_then(|task| task.agent_id.as_ref()), Some(&agent));

    let still = FakeWorld::new();
    let _ = running_agent(&still, "a", &[]).await;
    still.push_task(BTreeMap::new());
    let observed = still.ci().observe().await.expect("observe");
    assert_eq!(observed.queue.pending.len(), 1, "without `simulate` only tests change the world");
}

// -- faults -----------------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_fault_fails_the_next_calls_then_disarms() {
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::Create, FaultKind::Unavailable5xx, 2));
    let backend = world.backend();
    for attempt in 1..=2 {
        let created = backend.create(&owned_request(OWNER, "a")).await;
        assert!(matches!(created, Err(Error::Unavailable { .. })), "attempt {attempt}: {created:?}");
    }
    assert!(world.snapshot().instances.is_empty(), "a failed call changed nothing");
    backend.create(&owned_request(OWNER, "a")).await.expect("third attempt");
    assert_eq!(world.calls(Op::Create), 3, "failed calls count too");
    assert!(world.snapshot().faults.is_empty(), "the spent fault is disarmed");
}

#[tokio::test]
async fn every_nth_call_fails() {
    let world = FakeWorld::new();
    let backend = world.backend();
    let instance = backend.create(&owned_request(OWNER, "a")).await.expect("create");
    world.inject(Fault::every_nth(Op::Get, FaultKind::Timeout, 3, u32::MAX));
    let mut failures = Vec::new();
    for call in 1..=7 {
        if let Err(error) = backend.get(&instance.id).await {
            assert!(error.to_string().contains("timed out"), "{error}");
            failures.push(call);
        }
    }
    assert_eq!(failures, [3, 6]);
}

#[tokio::test]
async fn fault_kinds_map_to_provider_errors() {
    let world = FakeWorld::new();
    let ci = world.ci();
    let kinds = [
        FaultKind::RateLimited { retry_after: Some(Duration::from_secs(7)) },
        FaultKind::Capacity,
        FaultKind::Unauthenticated,
        FaultKind::Malformed,
    ];
    let mut seen = Vec::new();
    for kind in kinds {
        world.inject(Fault::new(Op::Any, kind, 1));
        seen.push(ci.observe().await.expect_err("faulted"));
    }
    assert!(matches!(seen[0], Error::RateLimited { retry_after: Some(after), .. } if after == Duration::from_secs(7)));
    assert!(seen[0].is_transient());
    assert!(matches!(seen[1], Error::Capacity { .. }));
    assert!(matches!(seen[2], Error::Unauthenticated { .. }));
    assert!(!seen[2].is_transient());
    match &seen[3] {
        Error::Other { source, .. } => {
            assert!(source.downcast_ref::<serde_json::Error>().is_some(), "a serde error: {source}")
        }
        other => panic!("malformed body: {other:?}"),
    }
    ci.observe().await.expect("all faults spent");
}

#[tokio::test]
async fn a_lost_response_still_takes_effect() {
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::Create, FaultKind::LostResponse, 1));
    let backend = world.backend();
    let created = backend.create(&owned_request(OWNER, "a")).await;
    assert!(matches!(created, Err(Error::Unavailable { .. })), "{created:?}");
    assert_eq!(world.snapshot().instances.len(), 1, "the create happened although the caller saw an error");
    let again = backend.create(&owned_request(OWNER, "a")).await;
    assert!(matches!(again, Err(Error::AlreadyExists { .. })), "{again:?}");
}

#[tokio::test]
async fn a_fault_on_one_operation_leaves_the_others_alone() {
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::Register, FaultKind::Unavailable5xx, 1));
    let backend = world.backend();
    let request: CreateInstance = owned_request(OWNER, "a");
    backend.create(&request).await.expect("create is not faulted");
    assert!(world.ci().register(&register("a", &[])).await.is_err());
    world.ci().register(&register("a", &[])).await.expect("register after the fault");
}
