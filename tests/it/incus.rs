//! The Incus backend against a real daemon (`scripts/test` installs and starts one via `scripts/incus-setup`
//! and exports `CISCALE_TEST_INCUS_SOCKET` / `CISCALE_TEST_INCUS_IMAGE`). Without them these tests fail, unless
//! `CISCALE_SKIP_INCUS=1` asks to skip them.
//!
//! Every test uses its own owner id, so tests run in parallel on one daemon without seeing each other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciscale::model::{InstanceId, InstanceState, Secret};
use ciscale::providers::incus::{provision, Incus};
use ciscale::providers::{Backend, CreateInstance, Error, Exec, ListInstances, PushFile};

use crate::conformance::{backend_conformance_with, owned_request, wait_for_state, Patience};

const PATIENCE: Patience = Patience { attempts: 200, interval: Duration::from_millis(50) };

/// The daemon and test image, or `None` when skipping was asked for.
fn daemon() -> Option<(Incus, String)> {
    if std::env::var("CISCALE_SKIP_INCUS").is_ok_and(|value| value == "1") {
        eprintln!("\n!!! SKIPPING the Incus tests: CISCALE_SKIP_INCUS=1 !!!\n");
        return None;
    }
    let (Ok(socket), Ok(image)) = (std::env::var("CISCALE_TEST_INCUS_SOCKET"), std::env::var("CISCALE_TEST_INCUS_IMAGE"))
    else {
        panic!(
            "the Incus tests need a running daemon: run them through `scripts/test` (it runs `scripts/incus-setup` and \
             exports CISCALE_TEST_INCUS_SOCKET and CISCALE_TEST_INCUS_IMAGE), or set CISCALE_SKIP_INCUS=1 to skip them"
        );
    };
    Some((Incus::new(Some(&socket), None), image))
}

/// An owner id unique to this test run, valid in instance names.
fn owner(test: &str) -> String {
    format!("it{}-{test}", std::process::id() % 100_000)
}

fn machine(image: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut machine = BTreeMap::from([("image".to_owned(), image.to_owned())]);
    machine.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    machine
}

async fn run(incus: &Incus, id: &InstanceId, script: &str) -> Option<i32> {
    let exec = Exec { command: vec!["sh".into(), "-c".into(), script.into()], env: BTreeMap::new(), wait: true };
    incus.exec(id, &exec).await.expect("exec").exit_code
}

async fn owned(incus: &Incus, owner: &str) -> Vec<ciscale::model::Instance> {
    incus.observe(&ListInstances { owner: owner.to_owned(), adopted: Vec::new() }).await.expect("observe").instances
}

async fn cleanup(incus: &Incus, owner: &str) {
    for instance in owned(incus, owner).await {
        drop(incus.delete(&instance.id).await);
    }
}

#[tokio::test]
async fn incus_backend_conformance() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("conf");
    backend_conformance_with(Arc::new(incus.clone()), &owner, PATIENCE, &machine(&image, &[])).await;
    cleanup(&incus, &owner).await;
}

#[tokio::test]
async fn container_gets_the_limits_devices_and_keys_asked_for() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("limits");
    let name = format!("{owner}-1");
    let mut request = owned_request(&owner, &name);
    request.machine = machine(
        &image,
        &[
            ("cpu", "1"),
            ("memory", "256MiB"),
            ("tmpfsSize", "64MiB"),
            ("nesting", "true"),
            ("hostShutdownAction", "force-stop"),
            ("profiles", "default"),
        ],
    );
    request.labels.insert("ciscale.agent-hash".into(), "abc123".into());
    let created = incus.create(&request).await.expect("create");
    let object = incus.instance_json(&name).await.expect("read back");
    let config = &object["config"];
    assert_eq!(config["limits.cpu"], "1");
    assert_eq!(config["limits.memory"], "256MiB");
    assert_eq!(config["security.nesting"], "true");
    assert_eq!(config["boot.host_shutdown_action"], "force-stop");
    assert_eq!(config["user.ciscale.owner"], owner.as_str());
    assert_eq!(config["user.ciscale.pool"], "conformance");
    assert_eq!(config["user.ciscale.agent-hash"], "abc123");
    assert_eq!(object["ephemeral"], true);
    assert_eq!(object["profiles"], serde_json::json!(["default"]));
    assert_eq!(created.attributes.get("tmpfsSize").map(String::as_str), Some("64MiB"));
    assert_eq!(created.attributes.get("image").map(String::as_str), Some(image.as_str()));
    assert_eq!(created.labels.get("ciscale.agent-hash").map(String::as_str), Some("abc123"));

    wait_for_state(&incus, &created.id, InstanceState::Running, PATIENCE).await;
    // The tmpfs on /tmp really is there, with the size asked for (64 MiB = 65536k in mount options).
    assert_eq!(run(&incus, &created.id, "grep ' /tmp tmpfs ' /proc/mounts | grep -q size=65536k").await, Some(0));
    assert_eq!(run(&incus, &created.id, "exit 42").await, Some(42), "exec reads non-zero exit codes");
    assert_eq!(run(&incus, &created.id, "true").await, Some(0));
    cleanup(&incus, &owner).await;
}

#[tokio::test]
async fn secret_file_is_0400_and_the_wrapper_deletes_it() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("secret");
    let mut request = owned_request(&owner, &format!("{owner}-1"));
    request.machine = machine(&image, &[]);
    let created = incus.create(&request).await.expect("create");
    wait_for_state(&incus, &created.id, InstanceState::Running, PATIENCE).await;

    let file = PushFile {
        path: "/run/ciscale/agent.env".into(),
        content: Secret::new("CISCALE_AGENT_ID=7\nCISCALE_AGENT_TOKEN=s3cret\n"),
        mode: 0o400,
        uid: 1000,
        gid: 1000,
    };
    incus.push_file(&created.id, &file).await.expect("push into a folder that does not exist yet");
    assert_eq!(
        run(&incus, &created.id, "[ \"$(stat -c %a:%u:%g /run/ciscale/agent.env)\" = 400:1000:1000 ]").await,
        Some(0),
        "mode 0400, owned by the agent user"
    );
    assert_eq!(run(&incus, &created.id, "grep -qx CISCALE_AGENT_TOKEN=s3cret /run/ciscale/agent.env").await, Some(0));
    assert_eq!(run(&incus, &created.id, "[ \"$(stat -c %a /run/ciscale)\" = 700 ]").await, Some(0));
    assert_eq!(run(&incus, &created.id, "grep ' /run tmpfs ' /proc/mounts >/dev/null").await, Some(0), "on a tmpfs");

    // The image's wrapper (scripts/incus-setup) reads the credential, deletes it and keeps running.
    let wrapper = Exec { command: vec!["/usr/local/bin/ciscale-agent".into()], env: BTreeMap::new(), wait: false };
    assert_eq!(incus.exec(&created.id, &wrapper).await.expect("start wrapper").exit_code, None);
    let mut gone = false;
    for _ in 0..PATIENCE.attempts {
        if run(&incus, &created.id, "[ -e /run/ciscale/agent.ran ] && [ ! -e /run/ciscale/agent.env ]").await == Some(0) {
            gone = true;
            break;
        }
        tokio::time::sleep(PATIENCE.interval).await;
    }
    assert!(gone, "the wrapper ran and the credential file is gone");

    let missing = incus.push_file(&InstanceId::new(format!("{owner}-missing")), &file).await;
    assert!(matches!(missing, Err(Error::NotFound { .. })), "{missing:?}");
    cleanup(&incus, &owner).await;
}

#[tokio::test]
async fn create_to_agent_exec_latency() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("latency");
    let mut request = owned_request(&owner, &format!("{owner}-1"));
    request.machine = machine(&image, &[]);
    let clock = Instant::now();
    let created = incus.create(&request).await.expect("create");
    let file = PushFile {
        path: "/run/ciscale/agent.env".into(),
        content: Secret::new("CISCALE_AGENT_TOKEN=t\n"),
        mode: 0o400,
        uid: 0,
        gid: 0,
    };
    incus.push_file(&created.id, &file).await.expect("push");
    let exec = Exec { command: vec!["/usr/local/bin/ciscale-agent".into()], env: BTreeMap::new(), wait: false };
    incus.exec(&created.id, &exec).await.expect("exec");
    let latency = clock.elapsed();
    eprintln!("MEASURED incus create → credential pushed → agent exec started: {latency:?}");
    assert_eq!(created.state, InstanceState::Running, "create returns a started container");
    cleanup(&incus, &owner).await;
}

#[tokio::test]
async fn a_foreign_instance_of_the_same_name_is_refused_not_adopted() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("foreign");
    let name = format!("{owner}-1");
    let mut theirs = owned_request(&format!("{owner}-x"), &name);
    theirs.machine = machine(&image, &[]);
    incus.create(&theirs).await.expect("create theirs");
    let mut ours: CreateInstance = owned_request(&owner, &name);
    ours.machine = machine(&image, &[]);
    let again = incus.create(&ours).await;
    assert!(matches!(again, Err(Error::AlreadyExists { .. })), "{again:?}");
    assert!(owned(&incus, &owner).await.is_empty(), "the other owner's instance is not listed as ours");
    cleanup(&incus, &format!("{owner}-x")).await;
}
