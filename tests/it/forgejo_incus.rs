//! End to end: `ciscale watch` of the real binary with the in-repo Forgejo fake as CI source (`kind: forgejo`,
//! organisation scope) and real Incus containers (`scripts/incus-setup`'s busybox test image) as backend.
//!
//! forgejo-runner cannot run here (the busybox image has no runner binary, and no test reaches the internet for
//! one), so the test plays the runner of each container through the fake's runner protocol (`Declare`,
//! `FetchTask` with the job handle, the final `UpdateTask`), with the uuid and token of the record ciscale
//! registered for that container, and powers the container off as the runner's wrapper does after its job.

use std::collections::BTreeSet;
use std::time::Duration;

use ciscale::model::{Instance, InstanceState};
use ciscale::providers::{Backend, Exec, ListInstances};

use crate::azure::WatchProcess;
use crate::azure_incus::{until, Containers};
use crate::fakes::forgejo::{FakeForgejo, JobStatus, ACME_WEB, USER_TOKEN};
use crate::incus::{daemon, owner};

const POOL: &str = "debian";

fn config(owner: &str, image: &str, server: &str) -> String {
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").unwrap_or_default();
    format!(
        r#"id: {owner}
pollInterval: 1s
ci:
  forgejo: {{ kind: forgejo, server: "{server}", token: "${{FORGEJO_TOKEN}}", organization: acme }}
backends:
  lxd: {{ kind: incus, socket: "{socket}" }}
pools:
  - name: {POOL}
    ci: {{ source: forgejo, labels: {{ debian: host, linux: host }} }}
    backend: {{ name: lxd, machine: {{ image: "{image}" }} }}
    scale: {{ max: 4 }}
"#
    )
}

/// Two waiting jobs the pool takes get one container each, each with a runner registered for that job and no
/// other (its handle); a job no pool offers the labels for gets none; no job gets a second runner while its
/// first boots. The runner takes its job, finishes it, Forgejo deletes the ephemeral record, the container powers
/// off and is gone, and ciscale has nothing left to do.
#[test]
fn watch_serves_each_waiting_forgejo_job_with_a_container_of_its_own() {
    let Some((incus, image)) = daemon() else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let containers = Containers { runtime, incus, owner: owner("fjinc") };
    let owner = containers.owner.clone();
    let fake = FakeForgejo::start();
    let (build, build_handle) = fake.add_job(ACME_WEB, "build", &["debian"]);
    let (test, test_handle) = fake.add_job(ACME_WEB, "test", &["debian", "linux"]);
    let (gpu, _) = fake.add_job(ACME_WEB, "train", &["gpu"]);
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("ciscale.yaml"), config(&owner, &image, &fake.url())).expect("write config");
    let started = std::time::Instant::now();
    let mut watch = WatchProcess::start_with(dir.path(), &[("FORGEJO_TOKEN", USER_TOKEN)]);

    let mut running = until("a container for each of the 2 jobs the pool takes", &mut watch, || {
        let listed: Vec<Instance> =
            containers.owned().into_iter().filter(|instance| instance.state == InstanceState::Running).collect();
        (listed.len() == 2).then_some(listed)
    });
    running.sort_by(|a, b| a.name.cmp(&b.name));
    eprintln!("MEASURED forgejo+incus: watch start → both job containers running: {:?}", started.elapsed());

    // Each container's runner record is ephemeral and bound to one of the two jobs, a different one each; the
    // container is labelled with its job too.
    let mut bound = BTreeSet::new();
    let mut runners = Vec::new();
    for instance in &running {
        let runner = until(&format!("the runner record of `{}`", instance.name), &mut watch, || {
            fake.runner_named(&instance.name).into_iter().next()
        });
        assert!(runner.ephemeral, "{runner:?}");
        let handle = [&build_handle, &test_handle]
            .into_iter()
            .find(|handle| runner.description.contains(handle.as_str()))
            .unwrap_or_else(|| panic!("runner `{}` is bound to neither job: {:?}", runner.name, runner.description));
        bound.insert(handle.clone());
        let object = containers.block_on(containers.incus.instance_json(&instance.name)).expect("read back");
        assert_eq!(object["config"]["user.ciscale.job"], handle.as_str(), "{}", instance.name);
        // The stand-in wrapper read the pushed credential (it exits without a token) and deleted it.
        until(&format!("the credential of `{}` to be consumed", instance.name), &mut watch, || {
            (containers.run(instance, "[ -e /run/ciscale/agent.ran ] && [ ! -e /run/ciscale/agent.env ]") == Some(0))
                .then_some(())
        });
        runners.push((instance.clone(), runner, handle.clone()));
    }
    assert_eq!(bound, BTreeSet::from([build_handle.clone(), test_handle.clone()]), "one runner per job");

    // A few more cycles (1 s apart) while the runners have not started: still one runner per job, none for the
    // gpu job.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(containers.owned().len(), 2, "no second container for a job that has one");
    assert_eq!(fake.runners().len(), 2, "no second runner for a job that has one: {:?}", fake.runners());

    for (instance, runner, handle) in &runners {
        // forgejo-runner one-job --handle: declares its labels, asks for its job by handle, runs it, reports.
        fake.runner_declare(&runner.uuid, &runner.token, &["debian", "linux"]).expect("declare");
        let job = fake.runner_fetch(&runner.uuid, &runner.token, Some(handle)).expect("fetch").expect("its job");
        assert_eq!(job, if handle == &build_handle { build } else { test });
        // Ephemeral: the record takes no second task, even one that matches.
        assert_eq!(fake.runner_fetch(&runner.uuid, &runner.token, None).expect("fetch"), None);
        fake.runner_finish(job);
        // The wrapper powers the container off after the job; the ephemeral container deletes itself.
        let poweroff = Exec { command: vec!["poweroff".into(), "-f".into()], env: Default::default(), wait: false };
        drop(containers.block_on(containers.incus.exec(&instance.id, &poweroff)));
    }

    until("every container to be gone", &mut watch, || containers.owned().is_empty().then_some(()));
    assert!(fake.runners().is_empty(), "Forgejo removed the ephemeral records: {:?}", fake.runners());
    assert_eq!(fake.job(gpu).status, JobStatus::Waiting, "the gpu job still waits for a runner no pool offers");
    assert_eq!(fake.job(build).status, JobStatus::Done);
    assert_eq!(fake.job(test).status, JobStatus::Done);
    // A few more cycles: nothing new (the gpu job matches no pool).
    std::thread::sleep(Duration::from_secs(3));
    assert!(containers.owned().is_empty());
    assert!(fake.runners().is_empty());

    let (status, out, err) = watch.terminate();
    assert_eq!(status.code(), Some(0), "watch stops cleanly on SIGTERM:\n{err}");
    let tokens: Vec<String> = runners.iter().map(|(_, runner, _)| runner.token.clone()).collect();
    for secret in tokens.iter().map(String::as_str).chain([USER_TOKEN]) {
        assert!(!out.contains(secret) && !err.contains(secret), "a token leaked:\n{out}\n{err}");
    }
    let leftover = containers.block_on(containers.incus.observe(&ListInstances { owner, ..Default::default() }));
    assert!(leftover.expect("observe").instances.is_empty());
}
