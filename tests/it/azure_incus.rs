//! End to end: `ciscale watch` of the real binary with the in-repo Azure DevOps fake as CI source and real Incus
//! containers (`scripts/incus-setup`'s busybox test image) as backend, in a fixed-count ephemeral pool
//! (incus-azure-pipelines' `agentCount`, i.e. `min = max = N, ephemeral: true`).
//!
//! The test plays each container's agent: it registers online in the fake (what `config.sh --replace` does),
//! takes a queued job, finishes it, goes offline (`run.sh --once` ended) and powers the container off. The
//! ephemeral container deletes itself; the Incus event makes `watch` create a replacement and deregister the
//! finished agent's record.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::time::{Duration, Instant};

use ciscale::model::{Instance, InstanceState};
use ciscale::providers::incus::Incus;
use ciscale::providers::{Backend, Exec, ListInstances};

use crate::azure::{WatchProcess, AGENT_PAT, PAT};
use crate::fakes::azure::AzureFake;
use crate::incus::{cleanup, daemon, owned, owner, run, wait_owned_running};

const AZURE_POOL: &str = "Incus Fixed";
const POOL: &str = "fixed";
/// Longest wait for any one thing the test expects; generous for a loaded 2-core machine.
const BOUND: Duration = Duration::from_secs(60);

/// The Incus side of the test: a runtime for the async client, and the owner whose containers are removed when
/// the test ends, passed or failed.
pub(crate) struct Containers {
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) incus: Incus,
    pub(crate) owner: String,
}

impl Containers {
    pub(crate) fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    pub(crate) fn owned(&self) -> Vec<Instance> {
        self.block_on(owned(&self.incus, &self.owner))
    }

    /// Runs `script` in the container; its exit code.
    pub(crate) fn run(&self, instance: &Instance, script: &str) -> Option<i32> {
        self.block_on(run(&self.incus, &instance.id, script))
    }
}

impl Drop for Containers {
    /// On failure too: whatever this owner has left is deleted. Errors are ignored here (a panic while
    /// unwinding would abort); the passing path checks its cleanup explicitly.
    fn drop(&mut self) {
        let listed = self
            .runtime
            .block_on(self.incus.observe(&ListInstances { owner: self.owner.clone(), ..ListInstances::default() }));
        for instance in listed.map(|observed| observed.instances).unwrap_or_default() {
            drop(self.runtime.block_on(self.incus.delete(&instance.id)));
        }
    }
}

/// Polls `probe` every 50 ms until it yields, for at most [`BOUND`]; fails early if `watch` died.
pub(crate) fn until<T>(what: &str, watch: &mut WatchProcess, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        if let Some(status) = watch.exited() {
            panic!("watch exited ({status}) while waiting for {what}");
        }
        assert!(Instant::now() < deadline, "gave up after {BOUND:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn config(owner: &str, image: &str, org_url: &str) -> String {
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").unwrap_or_default();
    // An hour between cycles: after the first one, only the Incus event stream can start a cycle within the
    // test's bounds, so every replacement seen here is event-driven.
    format!(
        r#"id: {owner}
pollInterval: 1h
ci:
  azure: {{ kind: azure-pipelines, organizationUrl: "{org_url}", pat: "${{AZP_ADMIN_PAT}}", agentPat: "${{AZP_AGENT_PAT}}" }}
backends:
  lxd: {{ kind: incus, socket: "{socket}" }}
pools:
  - name: {POOL}
    ci: {{ source: azure, azurePool: "{AZURE_POOL}", capabilities: {{ docker: "", java: "17" }} }}
    backend: {{ name: lxd, machine: {{ image: "{image}" }} }}
    scale: {{ min: 2, max: 2, ephemeral: true }}
"#
    )
}

/// The capabilities the stub agent reports, as the pool declares them.
fn capabilities() -> BTreeMap<String, String> {
    BTreeMap::from([("docker".to_owned(), String::new()), ("java".to_owned(), "17".to_owned())])
}

#[test]
fn watch_keeps_a_fixed_ephemeral_azure_pool_of_real_containers() {
    let Some((incus, image)) = daemon() else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let containers = Containers { runtime, incus, owner: owner("azinc") };
    let owner = containers.owner.clone();
    let fake = AzureFake::start(PAT);
    fake.add_pool(AZURE_POOL);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("ciscale.yaml"), config(&owner, &image, &fake.org_url())).expect("write config");
    // Declared after `containers`, so it is dropped (killed) first: no watch recreates what the guard deletes.
    let mut watch = WatchProcess::start(dir.path());

    // Every container that ever showed up, to count creates. Names alone do not tell them apart: a powered-off
    // container's name is free again once its agent record is gone, and the lowest free name is handed out.
    let mut seen: BTreeSet<(String, jiff::Timestamp)> = BTreeSet::new();
    let identity = |instance: &Instance| (instance.name.clone(), instance.created_at);
    let running = |containers: &Containers, seen: &mut BTreeSet<(String, jiff::Timestamp)>| -> Vec<Instance> {
        let listed = containers.owned();
        seen.extend(listed.iter().map(identity));
        listed.into_iter().filter(|instance| instance.state == InstanceState::Running).collect()
    };

    let mut initial = until("the pool's 2 containers to run", &mut watch, || {
        let up = running(&containers, &mut seen);
        (up.len() == 2).then_some(up)
    });
    initial.sort_by(|a, b| a.name.cmp(&b.name));
    for instance in &initial {
        let object = containers.block_on(containers.incus.instance_json(&instance.name)).expect("read back");
        assert_eq!(object["config"]["user.ciscale.owner"], owner.as_str());
        assert_eq!(object["config"]["user.ciscale.pool"], POOL);
        assert_eq!(object["ephemeral"], true, "{}", instance.name);
    }

    // The wrapper ciscale started read the pushed credential (it exits early without a token) and deleted it.
    let credential_consumed = |watch: &mut WatchProcess, instance: &Instance| {
        until(&format!("the credential of `{}` to be consumed", instance.name), watch, || {
            (containers.run(instance, "[ -e /run/ciscale/agent.ran ] && [ ! -e /run/ciscale/agent.env ]") == Some(0))
                .then_some(())
        });
    };

    let mut latencies = Vec::new();
    let mut replacements = Vec::new();
    let mut finished_agents = Vec::new();
    for instance in &initial {
        credential_consumed(&mut watch, instance);
        // config.sh: the agent registers under the container's name and connects.
        let agent = fake.agent_online_with(AZURE_POOL, &instance.name, capabilities());
        // A job whose demands the pool's capabilities satisfy is queued and handed to this agent.
        let request = fake.add_request(AZURE_POOL, &["docker", "java -equals 17", "Agent.Version -gtVersion 3.0"]);
        assert_eq!(fake.take_next(agent), Some(request), "the agent of `{}` takes the job", instance.name);
        // run.sh --once: the job ends, the agent disconnects, the wrapper powers the container off.
        fake.finish(request, "succeeded");
        fake.agent_offline(agent);
        let since = jiff::Timestamp::now();
        let powered_off_at = Instant::now();
        let poweroff = Exec { command: vec!["poweroff".into(), "-f".into()], env: BTreeMap::new(), wait: false };
        // The exec's own operation may end with the container: its result says nothing.
        drop(containers.block_on(containers.incus.exec(&instance.id, &poweroff)));

        let replacement = containers.block_on(wait_owned_running(&containers.incus, &owner, Some(since)));
        latencies.push((instance.name.clone(), powered_off_at.elapsed()));
        seen.insert(identity(&replacement));
        // A fresh container; it may have the powered-off one's name: the stopped container counts towards max
        // until it is gone, and then its name is the lowest free one.
        assert_ne!(identity(&replacement), identity(instance), "a fresh container, not the powered-off one");

        until(&format!("`{}` to vanish (ephemeral)", instance.name), &mut watch, || {
            let listed = containers.owned();
            seen.extend(listed.iter().map(identity));
            (!listed.iter().any(|listed| identity(listed) == identity(instance))).then_some(())
        });
        until(&format!("the record of `{}` (agent {agent}) to be deregistered", instance.name), &mut watch, || {
            let deleted = fake.exchanges().iter().any(|exchange| {
                exchange.method == "DELETE"
                    && exchange.status == 200
                    && exchange.path.ends_with(&format!("/agents/{agent}"))
            });
            (deleted && fake.agent_named(&instance.name).is_none()).then_some(())
        });
        finished_agents.push(agent);

        // The replacement's wrapper got its own credential; its agent comes online and waits for work.
        credential_consumed(&mut watch, &replacement);
        fake.agent_online_with(AZURE_POOL, &replacement.name, capabilities());
        replacements.push(replacement.name.clone());
    }

    // Back to two running containers (the replacements), and every agent record belongs to one of them.
    let final_names = until("the pool to settle on the 2 replacements", &mut watch, || {
        let listed = containers.owned();
        seen.extend(listed.iter().map(identity));
        let names: BTreeSet<String> = listed.iter().map(|instance| instance.name.clone()).collect();
        let all_running = listed.iter().all(|instance| instance.state == InstanceState::Running);
        (all_running && names == replacements.iter().cloned().collect()).then_some(names)
    });
    let agents = fake.agents();
    let agent_names: BTreeSet<String> = agents.iter().map(|agent| agent.name.clone()).collect();
    assert_eq!(agent_names, final_names, "no orphan agent record: {agents:?}");
    assert!(agents.iter().all(|agent| agent.online && agent.enabled), "{agents:?}");
    assert!(
        agents.iter().all(|agent| !finished_agents.contains(&agent.id)),
        "a name may be reused, a finished agent's record is not: {finished_agents:?} {agents:?}"
    );
    assert_eq!(seen.len(), 4, "2 at start + 1 replacement per powered-off container, no duplicate: {seen:?}");
    let requests = fake.requests();
    assert!(requests.len() == 2 && requests.iter().all(|request| !request.is_unfinished()), "{requests:?}");

    let (status, out, err) = watch.terminate();
    assert_eq!(status.code(), Some(0), "watch stops cleanly on SIGTERM:\n{err}");
    for secret in [PAT, AGENT_PAT] {
        assert!(!out.contains(secret) && !err.contains(secret), "a PAT leaked:\n{out}\n{err}");
    }
    let cycles = out.lines().filter(|line| line.starts_with('{')).count();
    assert!(
        cycles >= 3,
        "the first cycle plus at least one event-driven cycle per poweroff (the interval is an hour):\n{out}"
    );

    // Nothing left for ciscale to fix: no orphan container, no orphan record, the pool at its size.
    let plan = std::process::Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .current_dir(dir.path())
        .args(["plan", "--detailed-exitcode", "-c", "ciscale.yaml"])
        .env_remove("CISCALE_LOG")
        .env("NO_COLOR", "1")
        .env("AZP_ADMIN_PAT", PAT)
        .env("AZP_AGENT_PAT", AGENT_PAT)
        .output()
        .expect("plan runs");
    let (plan_out, plan_err) = (String::from_utf8_lossy(&plan.stdout), String::from_utf8_lossy(&plan.stderr));
    assert_eq!(plan.status.code(), Some(0), "converged:\n{plan_out}\n{plan_err}");
    assert!(!plan_out.contains(PAT) && !plan_err.contains(PAT));

    for (powered_off, latency) in &latencies {
        eprintln!(
            "MEASURED azure+incus replacement latency (poweroff of `{powered_off}` → new container running, via \
             the event): {latency:?}"
        );
    }

    // The test's own cleanup, checked: none of the containers it saw remains, labelled or not.
    containers.block_on(cleanup(&containers.incus, &owner));
    assert!(containers.owned().is_empty(), "owned containers left behind");
    for name in seen.iter().map(|(name, _)| name).collect::<BTreeSet<_>>() {
        assert!(containers.block_on(containers.incus.instance_json(name)).is_err(), "`{name}` still exists");
    }
}
