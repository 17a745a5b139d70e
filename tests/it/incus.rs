//! The Incus backend against a real daemon (`scripts/test` installs and starts one via `scripts/incus-setup`
//! and exports `CISCALE_TEST_INCUS_SOCKET` / `CISCALE_TEST_INCUS_IMAGE`). Without them these tests fail, unless
//! `CISCALE_SKIP_INCUS=1` asks to skip them.
//!
//! Every test uses its own owner id, so tests run in parallel on one daemon without seeing each other.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ciscale::model::{InstanceId, InstanceState, Secret};
use ciscale::providers::incus::provision::{self, ProvisionRequest};
use ciscale::providers::incus::Incus;
use ciscale::providers::{Backend, CreateInstance, Error, Exec, ListInstances, PushFile};

use crate::conformance::{backend_conformance_on, owned_request, wait_for_state, Patience};

const PATIENCE: Patience = Patience { attempts: 200, interval: Duration::from_millis(50) };

/// The daemon and test image, or `None` when skipping was asked for.
pub(crate) fn daemon() -> Option<(Incus, String)> {
    if std::env::var("CISCALE_SKIP_INCUS").is_ok_and(|value| value == "1") {
        eprintln!("\n!!! SKIPPING the Incus tests: CISCALE_SKIP_INCUS=1 !!!\n");
        return None;
    }
    let (Ok(socket), Ok(image)) =
        (std::env::var("CISCALE_TEST_INCUS_SOCKET"), std::env::var("CISCALE_TEST_INCUS_IMAGE"))
    else {
        panic!(
            "the Incus tests need a running daemon: run them through `scripts/test` (it runs `scripts/incus-setup` and \
             exports CISCALE_TEST_INCUS_SOCKET and CISCALE_TEST_INCUS_IMAGE), or set CISCALE_SKIP_INCUS=1 to skip them"
        );
    };
    Some((Incus::new(Some(&socket), None), image))
}

/// An owner id unique to this test run, valid in instance names.
pub(crate) fn owner(test: &str) -> String {
    format!("it{}-{test}", std::process::id() % 100_000)
}

pub(crate) fn machine(image: &str, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut machine = BTreeMap::from([("image".to_owned(), image.to_owned())]);
    machine.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    machine
}

pub(crate) async fn run(incus: &Incus, id: &InstanceId, script: &str) -> Option<i32> {
    let exec = Exec { command: vec!["sh".into(), "-c".into(), script.into()], env: BTreeMap::new(), wait: true };
    incus.exec(id, &exec).await.expect("exec").exit_code
}

pub(crate) async fn owned(incus: &Incus, owner: &str) -> Vec<ciscale::model::Instance> {
    incus
        .observe(&ListInstances { owner: owner.to_owned(), adopted: Vec::new(), images: Vec::new() })
        .await
        .expect("observe")
        .instances
}

pub(crate) async fn cleanup(incus: &Incus, owner: &str) {
    for instance in owned(incus, owner).await {
        drop(incus.delete(&instance.id).await);
    }
}

#[tokio::test]
async fn incus_backend_conformance() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("conf");
    backend_conformance_on(Arc::new(incus.clone()), &owner, PATIENCE, &machine(&image, &[])).await;
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
        if run(&incus, &created.id, "[ -e /run/ciscale/agent.ran ] && [ ! -e /run/ciscale/agent.env ]").await == Some(0)
        {
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

// ---------------------------------------------------------------------------------------------------------------
// watch on events, kill -9 of apply
// ---------------------------------------------------------------------------------------------------------------

fn config_yaml(owner: &str, image: &str, state_file: Option<&std::path::Path>, poll: &str, scale: &str) -> String {
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").unwrap_or_default();
    let state = state_file.map(|path| format!("\n    stateFile: {}", path.display())).unwrap_or_default();
    format!(
        "id: {owner}\npollInterval: {poll}\nci:\n  sim:\n    kind: fake{state}\nbackends:\n  lxd:\n    kind: incus\n    \
         socket: {socket}\npools:\n  - name: p\n    ci:\n      source: sim\n    backend:\n      name: lxd\n      \
         machine:\n        image: {image}\n    scale:\n{scale}\n"
    )
}

#[tokio::test]
async fn watch_replaces_a_powered_off_ephemeral_container_on_the_event() {
    let Some((incus, image)) = daemon() else { return };
    // `CISCALE_LOG=ciscale=debug` shows every step with its time, to see where the latency goes.
    let _logs = std::env::var("CISCALE_LOG").ok().map(|filter| {
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .finish();
        tracing::subscriber::set_default(subscriber)
    });
    let owner = owner("events");
    // An hour between cycles: a replacement within the test's bound can only come from the event.
    let yaml = config_yaml(&owner, &image, None, "1h", "      min: 1\n      max: 1\n      ephemeral: true");
    let desired = ciscale::config::load_str("events.yaml", &yaml, &|_| None).expect("valid config");
    let providers = ciscale::providers::connect(&desired).expect("connect");
    let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
    // The executor's defaults (a 2 s poll between retries), as `ciscale watch` runs: the replacement path must not
    // depend on a short poll.
    // Every plan of the run is judged by the safety oracle.
    let (inspect, ledger) = crate::safety::ledger::inspector();
    let options = ciscale::watch::WatchOptions { inspect: Some(inspect), ..ciscale::watch::WatchOptions::default() };
    let cycles = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counted = Arc::clone(&cycles);
    // (started at, ended at) of every cycle, to split the latency into phases.
    let cycle_times = Arc::new(std::sync::Mutex::new(Vec::<(jiff::Timestamp, jiff::Timestamp)>::new()));
    let timed = Arc::clone(&cycle_times);
    let loop_task = tokio::spawn(async move {
        let triggers = ciscale::watch::triggers::from_config(&desired);
        ciscale::watch::run_with_triggers(&desired, &providers, &options, &cancel, triggers, |report| {
            counted.store(report.cycle, std::sync::atomic::Ordering::SeqCst);
            let ended = report.started_at + jiff::SignedDuration::from_millis(report.duration_ms as i64);
            timed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((report.started_at, ended));
        })
        .await;
    });
    // A second listener on the same stream: when the event reached ciscale (the loop's own listener gets it at
    // the same moment).
    let mut events = ciscale::providers::incus::events::subscribe(incus.clone(), owner.clone());

    let first = wait_owned_running(&incus, &owner, None).await;
    // A real agent image has many files, and Incus lists a stopped ephemeral container as `Running` until they
    // are deleted (seconds for a real image): give this one a few thousand, so the phases below show whether the
    // replacement waits for that deletion.
    assert_eq!(
        run(
            &incus,
            &first.id,
            "mkdir -p /var/agent && i=0 && while [ $i -lt 4000 ]; do echo $i >/var/agent/f$i; i=$((i+1)); done"
        )
        .await,
        Some(0)
    );
    // Let the first cycle finish, so the poweroff below is an event the loop has to react to.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cycles_before = cycles.load(std::sync::atomic::Ordering::SeqCst);
    let powered_off_at = Instant::now();
    let since = jiff::Timestamp::now();
    let poweroff = Exec { command: vec!["poweroff".into(), "-f".into()], env: BTreeMap::new(), wait: false };
    drop(incus.exec(&first.id, &poweroff).await);
    // When each lifecycle event of the first container arrived (`instance-shutdown`, then `instance-deleted`).
    let gone_events = {
        let name = first.name.clone();
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Ok(Some(signal)) = tokio::time::timeout(Duration::from_secs(30), events.recv()).await {
                if let ciscale::providers::incus::events::Signal::InstanceGone { name: gone, action } = signal {
                    if gone == name {
                        let deleted = action == "instance-deleted";
                        seen.push((jiff::Timestamp::now(), action));
                        if deleted {
                            break;
                        }
                    }
                }
            }
            seen
        })
    };
    let replacement = wait_owned_running(&incus, &owner, Some(since)).await;
    let latency = powered_off_at.elapsed();
    let seen_running = jiff::Timestamp::now();
    eprintln!("MEASURED replacement latency (poweroff → new container running, via the event): {latency:?}");
    // Phases, from the test's listener, the loop's cycle reports and the replacement's creation time.
    let ms = |from: jiff::Timestamp, to: jiff::Timestamp| to.duration_since(from).as_millis();
    let gone_events = gone_events.await.expect("listener task");
    let (event_at, action) = gone_events.first().cloned().expect("the test's listener saw the first container go");
    {
        // The creating cycle reports when it is done (after the agent's exec), which may be a moment after the
        // container was seen running.
        let mut cycle = None;
        for _ in 0..300 {
            cycle = cycle_times
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .copied()
                .find(|(started, ended)| *started <= replacement.created_at && replacement.created_at <= *ended);
            if cycle.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        eprintln!("  poweroff → `{action}` event received: {} ms", ms(since, event_at));
        match cycle {
            Some((started, ended)) => {
                eprintln!("  event → reconciling cycle started: {} ms", ms(event_at, started));
                eprintln!(
                    "  cycle start → replacement created (observe, plan, register, create request): {} ms",
                    ms(started, replacement.created_at)
                );
                eprintln!(
                    "  created → cycle done (start, wait ready, push credential, exec agent): {} ms",
                    ms(replacement.created_at, ended)
                );
            }
            None => eprintln!("  (no cycle report covers the replacement's creation time)"),
        }
        eprintln!("  created → seen running by the test: {} ms", ms(replacement.created_at, seen_running));
    }
    if let Some((deleted_at, _)) = gone_events.iter().find(|(_, action)| action == "instance-deleted") {
        eprintln!(
            "  (`{action}` → `instance-deleted` of the old container: {} ms; the replacement was created {} ms \
             after `{action}`)",
            ms(event_at, *deleted_at),
            ms(event_at, replacement.created_at)
        );
    }
    assert!(replacement.created_at > first.created_at);
    assert!(cycles.load(std::sync::atomic::Ordering::SeqCst) > cycles_before, "the event woke the loop");
    let listed = owned(&incus, &owner).await;
    assert_eq!(
        listed.iter().filter(|instance| instance.state.is_active()).count(),
        1,
        "replaced, not added: {listed:?}"
    );

    cancel_tx.send_replace(true);
    drop(loop_task.await);
    cleanup(&incus, &owner).await;
    ledger.lock().expect("ledger").assert_safe();
}

/// Waits (bounded) for an owned running instance created after `since`.
pub(crate) async fn wait_owned_running(
    incus: &Incus,
    owner: &str,
    since: Option<jiff::Timestamp>,
) -> ciscale::model::Instance {
    for _ in 0..3000 {
        let found = owned(incus, owner).await.into_iter().find(|instance| {
            instance.state == InstanceState::Running && since.is_none_or(|since| instance.created_at > since)
        });
        if let Some(instance) = found {
            return instance;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no running instance of `{owner}` appeared within 30s");
}

/// Sends a create straight to incusd without waiting for it: what a ciscale killed right after sending leaves.
async fn create_without_waiting(socket: &str, name: &str, owner: &str, image: &str) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let body = serde_json::json!({
        "name": name,
        "type": "container",
        "ephemeral": true,
        "start": true,
        "source": { "type": "image", "alias": image },
        "config": { "user.ciscale.owner": owner, "user.ciscale.pool": "conformance" },
    })
    .to_string();
    let mut stream = tokio::net::UnixStream::connect(socket).await.expect("connect to incusd");
    let request = format!(
        "POST /1.0/instances HTTP/1.1\r\nHost: incus\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("send the create");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("read the answer");
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
}

#[tokio::test]
async fn creating_a_name_incusd_is_still_creating_waits_for_it_and_finds_it_there() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("busy");
    let name = format!("{owner}-1");
    let mut request = owned_request(&owner, &name);
    request.machine = machine(&image, &[]);
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").expect("socket");
    create_without_waiting(&socket, &name, &owner, &image).await;
    // incusd refuses the second create of the name in its operation ("busy running a create operation") while the
    // first runs, or ("UNIQUE constraint failed") once it is done: either way, the name exists. On a loaded machine
    // the second create may also reach the database before the first one's background work does: then it is ours
    // and the first one fails. Create-if-absent either way, never an error to retry, never a second instance.
    let created = incus.create(&request).await;
    assert!(
        matches!(&created, Err(Error::AlreadyExists { .. }) | Ok(_)),
        "create-if-absent, not an error to retry: {created:?}"
    );
    let listed = owned(&incus, &owner).await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    wait_for_state(&incus, &listed[0].id, InstanceState::Running, PATIENCE).await;
    cleanup(&incus, &owner).await;
}

#[tokio::test]
async fn kill_9_of_apply_mid_create_then_rerun_converges() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("kill9");
    let dir = tempfile::tempdir().expect("tempdir");
    let yaml = config_yaml(&owner, &image, Some(&dir.path().join("world.json")), "10s", "      min: 3\n      max: 3");
    let config = dir.path().join("ciscale.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let ciscale = |args: &[&str]| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_ciscale"));
        command.args(args).arg("-c").arg(&config).env("NO_COLOR", "1");
        command
    };

    let mut apply = ciscale(&["apply", "--auto-approve"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn apply");
    // Kill it as soon as the first container exists: the other creates are in flight or not started.
    for _ in 0..3000 {
        if !owned(&incus, &owner).await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    apply.kill().expect("kill -9");
    drop(apply.wait());
    // At once, as a restarted daemon or the next cron run would: incusd may still be finishing a create the killed
    // apply had sent. The rerun must count that create (its agent record is there, its container not listed yet)
    // and reuse its name rather than add a container: never above `max`, never a duplicate.
    let rerun = ciscale(&["apply", "--auto-approve"]).output().expect("rerun apply");
    // Counted once incusd has finished what it was doing (bounded: 10 s), so a create the killed apply had sent
    // cannot finish unseen after the count.
    for _ in 0..50 {
        let operations = std::process::Command::new("incus")
            .args(["operation", "list", "--format", "csv"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default();
        if !operations.lines().any(|line| line.contains("RUNNING") && line.contains("Creating instance")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let plan = ciscale(&["plan", "--detailed-exitcode"]).output().expect("plan");
    let instances = owned(&incus, &owner).await;
    // Cleaned up before the verdict: a failure must not leave containers on the shared daemon.
    cleanup(&incus, &owner).await;
    assert!(rerun.status.success(), "rerun: {}", String::from_utf8_lossy(&rerun.stderr));
    let names: std::collections::BTreeSet<_> = instances.iter().map(|instance| instance.name.clone()).collect();
    assert_eq!(instances.len(), 3, "no duplicate, no orphan: {names:?}");
    assert_eq!(names.len(), 3);
    assert!(instances.iter().all(|instance| instance.state == InstanceState::Running));
    assert_eq!(plan.status.code(), Some(0), "converged: {}", String::from_utf8_lossy(&plan.stdout));
}

// ---------------------------------------------------------------------------------------------------------------
// provision
// ---------------------------------------------------------------------------------------------------------------

/// Serves `body` to every request on a loopback port (the stub agent tarball).
async fn serve_once_forever(body: Vec<u8>) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let body = body.clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                drop(stream.read(&mut request).await);
                let head = format!("HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                drop(stream.write_all(head.as_bytes()).await);
                drop(stream.write_all(&body).await);
            });
        }
    });
    port
}

fn stub_agent_tarball(dir: &std::path::Path) -> Vec<u8> {
    let root = dir.join("agent");
    std::fs::create_dir_all(&root).expect("mkdir");
    std::fs::write(root.join("run.sh"), "#!/bin/sh\necho stub agent\n").expect("write");
    let status = std::process::Command::new("tar")
        .args(["-czf", "agent.tar.gz", "-C", "agent", "--mode=0755", "run.sh"])
        .current_dir(dir)
        .status()
        .expect("tar");
    assert!(status.success());
    std::fs::read(dir.join("agent.tar.gz")).expect("read tarball")
}

fn image_spec(
    base: &str,
    scripts: Vec<std::path::PathBuf>,
    keep: u32,
    agent_url: Option<String>,
) -> ciscale::model::ImageSpec {
    ciscale::model::ImageSpec { backend: "lxd".into(), base: base.to_owned(), scripts, keep, agent_url }
}

#[tokio::test]
async fn provision_builds_publishes_swaps_the_alias_atomically_and_prunes() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("prov");
    let alias = format!("{owner}-agent");
    let dir = tempfile::tempdir().expect("tempdir");
    let port = serve_once_forever(stub_agent_tarball(dir.path())).await;
    let fetch = dir.path().join("10-agent.sh");
    std::fs::write(
        &fetch,
        "#!/bin/sh\nset -e\nip link set lo up\nmkdir -p /opt/agent\nwget -q -O /tmp/agent.tgz \"$AGENT_URL\"\n\
         tar -xzf /tmp/agent.tgz -C /opt/agent\nrm /tmp/agent.tgz\n",
    )
    .expect("write script");
    let mark = dir.path().join("20-mark.sh");
    std::fs::write(&mark, "#!/bin/sh\necho \"$CISCALE_IMAGE\" >/etc/ciscale-image\n").expect("write script");
    let request = ProvisionRequest {
        name: alias.clone(),
        owner: owner.clone(),
        spec: image_spec(&image, vec![fetch, mark], 2, Some(format!("http://127.0.0.1:{port}/agent.tar.gz"))),
        agent_url: Some(format!("http://127.0.0.1:{port}/agent.tar.gz")),
    };
    let quiet = |_: &str| {};

    let first = provision::provision(&incus, &request, &quiet).await.expect("first provision");
    assert_eq!(first.previous, None, "the alias was created");
    assert_eq!(provision::alias_target(&incus, &alias).await.expect("alias"), Some(first.fingerprint.clone()));

    // A container from the new image has the agent from the loopback tarball and the scripts' work.
    let mut agent = owned_request(&owner, &format!("{owner}-check"));
    agent.machine = machine(&alias, &[]);
    let checked = incus.create(&agent).await.expect("create from the provisioned alias");
    let expected = format!("[ -x /opt/agent/run.sh ] && grep -qx '{alias}' /etc/ciscale-image");
    assert_eq!(run(&incus, &checked.id, &expected).await, Some(0), "the image holds the agent and the scripts' work");
    cleanup(&incus, &owner).await;

    // Second build while instances are being created from the alias: none may fail for a missing alias.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let creator = {
        let (incus, owner, alias, stop) = (incus.clone(), owner.clone(), alias.clone(), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut created = 0u32;
            let mut index = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                index += 1;
                let mut request = owned_request(&owner, &format!("{owner}-swap-{index}"));
                request.machine = machine(&alias, &[]);
                match incus.create(&request).await {
                    Ok(instance) => {
                        created += 1;
                        drop(incus.delete(&instance.id).await);
                    }
                    Err(error) => return Err(format!("create #{index} from `{alias}` during the swap: {error}")),
                }
            }
            Ok(created)
        })
    };
    let second = provision::provision(&incus, &request, &quiet).await.expect("second provision");
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let created = creator.await.expect("creator task").expect("every create during the swap succeeded");
    assert!(created > 0, "the loop created instances while provisioning");
    assert_eq!(second.previous.as_deref(), Some(first.fingerprint.as_str()));
    assert_eq!(provision::alias_target(&incus, &alias).await.expect("alias"), Some(second.fingerprint.clone()));

    // Keep 2: the third build prunes the first.
    let third = provision::provision(&incus, &request, &quiet).await.expect("third provision");
    assert_eq!(third.pruned, vec![first.fingerprint.clone()]);
    let versions = provision::versions(&incus, &alias).await.expect("versions");
    assert_eq!(versions, vec![third.fingerprint.clone(), second.fingerprint.clone()]);
    eprintln!("provision: {created} instances created from `{alias}` during the alias swap, none failed");

    cleanup(&incus, &owner).await;
    for fingerprint in versions {
        drop(std::process::Command::new("incus").args(["image", "delete", &fingerprint]).status());
    }
}

#[tokio::test]
async fn a_failing_provision_script_is_named_and_the_builder_is_removed() {
    let Some((incus, image)) = daemon() else { return };
    let owner = owner("provfail");
    let alias = format!("{owner}-agent");
    let dir = tempfile::tempdir().expect("tempdir");
    let failing = dir.path().join("broken.sh");
    std::fs::write(&failing, "#!/bin/sh\nexit 5\n").expect("write");
    let request = ProvisionRequest {
        name: alias.clone(),
        owner: owner.clone(),
        spec: image_spec(&image, vec![failing], 3, None),
        agent_url: None,
    };
    let error = provision::provision(&incus, &request, &|_: &str| {}).await.expect_err("a failing script fails");
    let text = error.to_string();
    assert!(text.contains("broken.sh") && text.contains("code 5"), "{error:?}");
    assert_eq!(provision::alias_target(&incus, &alias).await.expect("alias"), None, "nothing was published");
    let listed =
        std::process::Command::new("incus").args(["list", "-c", "n", "-f", "csv"]).output().expect("incus list");
    let names = String::from_utf8_lossy(&listed.stdout);
    assert!(!names.contains(&format!("ciscale-build-{alias}")), "the builder is gone: {names}");
}

// ---------------------------------------------------------------------------------------------------------------
// plan: a missing image alias
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn plan_names_a_missing_image_alias_and_holds_back_its_creates() {
    let Some((_incus, image)) = daemon() else { return };
    let owner = owner("noimage");
    let missing = format!("{owner}-never-provisioned");
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").unwrap_or_default();
    let yaml = format!(
        "id: {owner}\nci:\n  sim:\n    kind: fake\nbackends:\n  lxd:\n    kind: incus\n    socket: {socket}\npools:\n\
         \x20 - name: built\n    ci:\n      source: sim\n    backend:\n      name: lxd\n      machine:\n        \
         image: {image}\n    scale:\n      min: 1\n      max: 1\n\
         \x20 - name: unbuilt\n    ci:\n      source: sim\n    backend:\n      name: lxd\n      machine:\n        \
         image: {missing}\n    scale:\n      min: 1\n      max: 1\n"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("ciscale.yaml");
    std::fs::write(&config, yaml).expect("write config");
    let plan = std::process::Command::new(env!("CARGO_BIN_EXE_ciscale"))
        .args(["plan", "-c"])
        .arg(&config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run plan");
    let stdout = String::from_utf8_lossy(&plan.stdout);
    assert!(plan.status.success(), "plan: {}", String::from_utf8_lossy(&plan.stderr));
    assert!(
        stdout.contains(&format!("image alias `{missing}` is missing on backend `lxd`: run `ciscale provision`")),
        "the missing alias is named: {stdout}"
    );
    assert!(!stdout.contains(&format!("image alias `{image}` is missing")), "the existing alias is not: {stdout}");
    assert!(
        stdout.contains(&format!("create {}", ciscale::plan::instance_name(&owner, &"built".into(), 1)))
            && !stdout.contains(&format!("create {owner}-unbuilt-")),
        "only the pool whose image exists creates: {stdout}"
    );
    assert!(stdout.contains("Plan: 1 to create"), "{stdout}");
}
