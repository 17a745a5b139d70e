//! Saved plans never harm: `plan --out` now, the world changes, `apply PLANFILE` later. Through the binary, on the
//! file-backed fake world (no simulation: the test alone changes the world). Each change whose preconditions no
//! longer hold is refused by name with the reason, the summary counts it, and the exit code says so; the rest
//! of the plan is carried out.

use std::collections::BTreeMap;
use std::time::Duration;

use ciscale::model::{AgentId, InstanceId, InstanceState, PoolName, OWNER_LABEL, POOL_LABEL};
use ciscale::plan::instance_name;
use ciscale::providers::fake::{FakeAgent, FakeInstance, FakeTask};
use jiff::Timestamp;

use crate::cli::{run, stderr, stdout, Sandbox};

/// A sandbox whose fake CI does not play along: agents check in and take jobs only when the test says so.
fn quiet_sandbox() -> Sandbox {
    let sandbox = Sandbox::new("{ max: 2, idleTimeout: 30m, bootstrapTimeout: 10m }");
    let config = std::fs::read_to_string(sandbox.config()).expect("config");
    std::fs::write(sandbox.config(), config.replace("simulate: true", "simulate: false")).expect("config");
    sandbox
}

fn name(index: u32) -> String {
    instance_name("e2e", &PoolName::new("linux"), index)
}

/// Puts an instance of the pool, created `age` ago, and its agent record into the world.
fn add_member(sandbox: &Sandbox, index: u32, age: Duration, drained: bool, contacted: bool) -> (InstanceId, AgentId) {
    let name = name(index);
    sandbox.world().update(|state| {
        let now = state.now();
        let created_at = now - jiff::SignedDuration::try_from(age).expect("age");
        state.counters.instances += 1;
        let id = InstanceId::new(format!("fake-{}", state.counters.instances));
        state.instances.push(FakeInstance {
            id: id.clone(),
            name: name.clone(),
            state: InstanceState::Running,
            created_at,
            labels: BTreeMap::from([
                (OWNER_LABEL.to_owned(), "e2e".to_owned()),
                (POOL_LABEL.to_owned(), "linux".to_owned()),
            ]),
            attributes: BTreeMap::new(),
            user_data_sha256: None,
        });
        state.counters.agents += 1;
        let agent_id = AgentId::new(state.counters.agents.to_string());
        state.agents.push(FakeAgent {
            id: agent_id.clone(),
            name,
            pool: Some(PoolName::new("linux")),
            no_schedule: drained,
            last_contact: contacted.then_some(now),
            last_work: contacted.then_some(created_at),
            labels: BTreeMap::new(),
            token_sha256: String::new(),
            jobs_done: 0,
            created_at: Some(created_at),
        });
        (id, agent_id)
    })
}

/// A job that has just started on `agent`.
fn start_job_on(sandbox: &Sandbox, agent: &AgentId) {
    sandbox.world().update(|state| {
        state.counters.tasks += 1;
        let id = format!("t{}", state.counters.tasks).into();
        let started_at: Timestamp = state.now();
        state.tasks.push(FakeTask {
            id,
            labels: BTreeMap::from([("platform".to_owned(), "linux".to_owned())]),
            demands: Vec::new(),
            agent_id: Some(agent.clone()),
            started_at: Some(started_at),
            run_for_secs: 3600,
        });
    });
}

fn instance_exists(sandbox: &Sandbox, id: &InstanceId) -> bool {
    sandbox.world().snapshot().instances.iter().any(|instance| &instance.id == id)
}

#[test]
fn a_saved_delete_is_refused_once_its_agent_took_a_job() {
    let sandbox = quiet_sandbox();
    // Two drained, idle agents: the plan deletes both.
    let (first, first_agent) = add_member(&sandbox, 1, Duration::from_secs(3600), true, true);
    let (second, _) = add_member(&sandbox, 2, Duration::from_secs(3600), true, true);
    let planned = run(sandbox.command(&["plan", "--out", "tfplan.json"]));
    assert!(planned.status.success(), "{}", stderr(&planned));
    assert!(stdout(&planned).contains("2 to delete"), "{}", stdout(&planned));

    // Someone undrains the first agent and it takes a job before the plan is applied.
    sandbox.world().update(|state| {
        if let Some(agent) = state.agents.iter_mut().find(|agent| agent.id == first_agent) {
            agent.no_schedule = false;
        }
    });
    start_job_on(&sandbox, &first_agent);

    let applied = run(sandbox.command(&["apply", "tfplan.json"]));
    assert_eq!(applied.status.code(), Some(1), "{}\n{}", stdout(&applied), stderr(&applied));
    let (out, err) = (stdout(&applied), stderr(&applied));
    assert!(
        err.contains(&format!("error: delete `{}` is no longer safe: agent `{}` runs a job now", name(1), name(1))),
        "{err}"
    );
    assert!(err.contains("hint: run `ciscale plan --out FILE` again"), "{err}");
    assert!(out.contains("Apply complete: 1 done, 0 failed, 0 skipped, 1 no longer safe."), "{out}");
    assert!(instance_exists(&sandbox, &first), "the busy agent's instance is kept");
    assert!(!instance_exists(&sandbox, &second), "the rest of the plan is carried out");
}

#[test]
fn a_saved_removal_of_a_never_registered_agent_is_refused_once_it_registered() {
    let sandbox = quiet_sandbox();
    // Created 20 minutes ago, its agent never checked in: removed for its bootstrap timeout.
    let (broken, agent) = add_member(&sandbox, 1, Duration::from_secs(20 * 60), false, false);
    let planned = run(sandbox.command(&["plan", "--out", "tfplan.json", "--json"]));
    assert!(planned.status.success(), "{}", stderr(&planned));
    assert!(stdout(&planned).contains(r#""cause": "bootstrap-timeout""#), "{}", stdout(&planned));

    // A slow boot: the agent checks in (and is not drained) before the plan is applied.
    sandbox.world().update(|state| {
        let now = state.now();
        if let Some(record) = state.agents.iter_mut().find(|record| record.id == agent) {
            record.last_contact = Some(now);
        }
    });
    let applied = run(sandbox.command(&["apply", "tfplan.json"]));
    assert_eq!(applied.status.code(), Some(1), "{}\n{}", stdout(&applied), stderr(&applied));
    assert!(
        stderr(&applied).contains(&format!(
            "error: delete `{}` is no longer safe: agent `{}` has registered since the plan was made",
            name(1),
            name(1)
        )),
        "{}",
        stderr(&applied)
    );
    assert!(stdout(&applied).contains("0 done, 0 failed, 0 skipped, 1 no longer safe"), "{}", stdout(&applied));
    assert!(instance_exists(&sandbox, &broken));
}

#[test]
fn a_saved_create_is_refused_when_the_pool_reached_max_meanwhile() {
    let sandbox = quiet_sandbox();
    sandbox.push_linux_task();
    sandbox.push_linux_task();
    let planned = run(sandbox.command(&["plan", "--out", "tfplan.json"]));
    assert!(planned.status.success(), "{}", stderr(&planned));
    assert!(stdout(&planned).contains("2 to create"), "{}", stdout(&planned));

    // Meanwhile another run created one instance under another name: only one more fits max 2.
    add_member(&sandbox, 7, Duration::from_secs(60), false, true);
    let applied = run(sandbox.command(&["apply", "tfplan.json"]));
    assert_eq!(applied.status.code(), Some(1), "{}\n{}", stdout(&applied), stderr(&applied));
    assert!(
        stderr(&applied)
            .contains(&format!("error: create `{}` is no longer safe: the pool has 2 of max 2 instances now", name(2))),
        "{}",
        stderr(&applied)
    );
    let active = sandbox.world().snapshot().instances.iter().filter(|instance| instance.state.is_active()).count();
    assert_eq!(active, 2, "never above max");
}
