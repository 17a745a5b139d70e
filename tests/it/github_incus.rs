//! End to end: `ciscale watch` of the real binary with the in-repo GitHub fake as CI source (`kind: github`, an
//! organisation through a GitHub App) and real Incus containers (`scripts/incus-setup`'s busybox test image) as
//! backend, reached through a pass-through proxy that sees what each launch carried and when each create call
//! was made.
//!
//! The GitHub runner cannot run here (the busybox image has no runner, and no test reaches the internet for one),
//! so the test plays it: with the record ciscale made for the container it connects, takes the queued job, runs
//! it to completion (the fake, like GitHub, then removes the ephemeral record) and powers the container off as
//! the runner's wrapper does. Once by polling; once started by a signed `workflow_job` delivery to
//! `POST /webhooks/github` with polls a minute apart, after a forged delivery was refused and started nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ciscale::model::{Instance, InstanceState, Secret};
use ciscale::providers::github::webhook;
use ciscale::providers::{Backend, Exec, ListInstances};

use crate::azure::WatchProcess;
use crate::azure_incus::{until, Containers};
use crate::fakes::github::{FakeGithub, FakeRunner, APP_ID, APP_KEY, INSTALLATION_ID, JIT_SECRET_PREFIX, ORG};
use crate::fakes::incus_proxy::IncusProxy;
use crate::incus::{daemon, owner};
use crate::webhooks::{deliver, get, metric};

const POOL: &str = "linux";
const REPO: &str = "acme/app";
const WEBHOOK_SECRET: &str = "e2e-webhook-secret-5f0c9a";
/// The `runs-on` of the test's job: what a workflow for any self-hosted Linux x64 runner with Docker asks.
const RUNS_ON: [&str; 4] = ["self-hosted", "linux", "x64", "docker"];

/// The scene: the GitHub fake, the Incus proxy (on a runtime of its own, so it relays while the test thread
/// waits) and the containers of a fresh owner, removed when the test ends.
struct Scene {
    // Dropped in this order (after the test's watch, declared later): the containers' guard last, deleting what is left.
    proxy: IncusProxy,
    fake: FakeGithub,
    dir: tempfile::TempDir,
    containers: Containers,
}

fn scene(test: &str) -> Option<Scene> {
    let (incus, _) = daemon()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").expect("socket");
    let owner = owner(test);
    let proxy = {
        let _entered = runtime.enter();
        IncusProxy::start(&dir.path().join("incus.socket"), Path::new(&socket), &owner)
    };
    let fake = FakeGithub::start();
    fake.add_repo(REPO);
    Some(Scene { proxy, fake, dir, containers: Containers { runtime, incus, owner } })
}

impl Scene {
    /// Writes the config: `extra` are further top-level keys, `source_extra` further keys of the source.
    fn write_config(&self, poll_interval: &str, source_extra: &str, extra: &str) {
        let image = std::env::var("CISCALE_TEST_INCUS_IMAGE").expect("image");
        let text = format!(
            r#"id: {owner}
pollInterval: {poll_interval}
ci:
  github:
    kind: github
    endpoint: "{endpoint}"
    organization: {ORG}
    app: {{ appId: {APP_ID}, installationId: {INSTALLATION_ID}, privateKey: "${{GITHUB_APP_KEY}}" }}
{source_extra}backends:
  lxd: {{ kind: incus, socket: "{socket}" }}
pools:
  - name: {POOL}
    ci: {{ source: github, labels: {{ docker: "" }} }}
    backend: {{ name: lxd, machine: {{ image: "{image}" }} }}
    scale: {{ max: 2 }}
{extra}"#,
            owner = self.containers.owner,
            endpoint = self.fake.url(),
            socket = self.proxy.socket.display(),
        );
        std::fs::write(self.dir.path().join("ciscale.yaml"), text).expect("write config");
    }

    fn start_watch(&self) -> WatchProcess {
        WatchProcess::start_with(
            self.dir.path(),
            &[("GITHUB_APP_KEY", APP_KEY), ("GITHUB_WEBHOOK_SECRET", WEBHOOK_SECRET)],
        )
    }

    fn running(&self) -> Vec<Instance> {
        self.containers.owned().into_iter().filter(|instance| instance.state == InstanceState::Running).collect()
    }

    fn our_runners(&self) -> Vec<FakeRunner> {
        let label = format!("ciscale-owner:{}", self.containers.owner);
        self.fake.runners().into_iter().filter(|runner| runner.labels.contains(&label)).collect()
    }

    /// The container made for the one queued job: its runner record is just-in-time and ephemeral, registered
    /// once, with the pool's and the implicit labels; the launch pushed its JIT config as a 0400 root file and
    /// started the wrapper, which consumed it. No registration token was ever asked for.
    fn check_launch(&self, watch: &mut WatchProcess) -> (Instance, FakeRunner) {
        let instance = until("a running container for the queued job", watch, || self.running().into_iter().next());
        let runner = until(&format!("the runner record of `{}`", instance.name), watch, || {
            self.fake.runner_by_name(&instance.name)
        });
        assert!(runner.ephemeral, "{runner:?}");
        for label in RUNS_ON {
            assert!(runner.labels.iter().any(|offered| offered.eq_ignore_ascii_case(label)), "{label}: {runner:?}");
        }
        let jit = runner.jit_config.clone().expect("a just-in-time runner");
        // The container runs before its config is pushed: the wrapper's having run and consumed it comes last.
        until(&format!("the wrapper in `{}` to consume the config", instance.name), watch, || {
            let script = "[ -e /run/ciscale/agent.ran ] && [ ! -e /run/ciscale/agent.env ]";
            (self.containers.run(&instance, script) == Some(0)).then_some(())
        });
        // Files only (a first push into a container without `/run/ciscale` is answered 404, the folder is made and
        // the file pushed again).
        let pushed: Vec<_> = self
            .proxy
            .pushed()
            .into_iter()
            .filter(|file| file.instance == instance.name && file.kind == "file")
            .collect();
        assert!(!pushed.is_empty(), "the launch pushed a file into `{}`", instance.name);
        for file in &pushed {
            assert_eq!(file.path, "/run/ciscale/agent.env");
            assert_eq!((file.mode.as_str(), file.uid.as_str(), file.gid.as_str()), ("0400", "0", "0"), "root-only");
            assert_eq!(file.content, pushed[0].content, "the same credential each time");
        }
        let file = &pushed[0];
        let content = String::from_utf8(file.content.clone()).expect("an env file");
        assert!(
            content.lines().any(|line| line == format!("ACTIONS_RUNNER_INPUT_JITCONFIG={jit}")),
            "the launch carries the runner's JIT config under the name the runner reads"
        );
        let counts = self.fake.counts();
        let registration: Vec<_> = counts.keys().filter(|endpoint| endpoint.contains("registration-token")).collect();
        assert!(registration.is_empty(), "a registration token was asked for: {registration:?}");
        let jit_calls: u64 = counts
            .iter()
            .filter(|(endpoint, _)| endpoint.ends_with("generate-jitconfig"))
            .map(|(_, count)| count)
            .sum();
        assert_eq!(jit_calls, 1, "one runner for one job: {counts:?}");
        (instance, runner)
    }

    /// The test as the runner: connects, takes the job, completes it (GitHub then removes the ephemeral record),
    /// and the wrapper powers the container off. `tell` hears each step as the webhook action GitHub sends.
    fn play_runner(&self, instance: &Instance, runner: &FakeRunner, job: u64, mut tell: impl FnMut(&str)) {
        self.fake.connect_runner(runner.id);
        self.fake.take_job(job, runner.id);
        tell("in_progress");
        self.fake.finish_job(job);
        assert!(self.fake.runner_by_name(&runner.name).is_none(), "GitHub removes an ephemeral runner after its job");
        tell("completed");
        let poweroff = Exec { command: vec!["poweroff".into(), "-f".into()], env: Default::default(), wait: false };
        drop(self.containers.block_on(self.containers.incus.exec(&instance.id, &poweroff)));
    }

    /// Nothing of ours is left: no container, no runner record.
    fn check_clean(&self, watch: &mut WatchProcess) {
        until("the container to be gone", watch, || self.containers.owned().is_empty().then_some(()));
        assert!(self.our_runners().is_empty(), "no runner record of ours remains: {:?}", self.our_runners());
        let leftover = self.containers.block_on(
            self.containers
                .incus
                .observe(&ListInstances { owner: self.containers.owner.clone(), ..Default::default() }),
        );
        assert!(leftover.expect("observe").instances.is_empty());
    }
}

/// What `watch` printed holds none of the secrets it handled: the app's key, its installation tokens, the JIT
/// config (and the runner credential inside it), the webhook secret.
fn assert_no_secrets(out: &str, err: &str, jit: &str, fake: &FakeGithub) {
    let key_line = APP_KEY.lines().nth(1).expect("a key line");
    let minted: Vec<String> = (1..=fake.tokens_minted()).map(|n| format!("ghs_fake{n:016x}")).collect();
    let mut secrets = vec![key_line, jit, JIT_SECRET_PREFIX, WEBHOOK_SECRET];
    secrets.extend(minted.iter().map(String::as_str));
    for secret in secrets {
        assert!(!out.contains(secret) && !err.contains(secret), "a secret leaked into watch's output:\n{out}\n{err}");
    }
}

/// A queued job gets a container whose launch carries its runner's JIT config; the runner takes the job and is
/// gone with it; the container goes and no runner record of ours is left.
#[test]
fn watch_gives_a_queued_github_job_a_container_with_its_jit_config_and_leaves_nothing_behind() {
    let Some(scene) = scene("ghinc") else { return };
    let (_, jobs) = scene.fake.queue_run(REPO, &[&RUNS_ON]);
    scene.write_config("1s", "", "");
    let started = Instant::now();
    let mut watch = scene.start_watch();

    let (instance, runner) = scene.check_launch(&mut watch);
    eprintln!("MEASURED github+incus: watch start → job container running, config consumed: {:?}", started.elapsed());
    // A few more cycles (1 s apart) while the runner has not started: no second container, no second runner.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(scene.containers.owned().len(), 1, "no second container for a job that has one");
    assert_eq!(scene.our_runners().len(), 1, "no second runner for a job that has one");

    scene.play_runner(&instance, &runner, jobs[0], |_| {});
    scene.check_clean(&mut watch);
    assert_eq!(scene.fake.job(jobs[0]).status, "completed");
    // A few more cycles: nothing new.
    std::thread::sleep(Duration::from_secs(3));
    assert!(scene.containers.owned().is_empty());
    assert!(scene.our_runners().is_empty());

    let (status, out, err) = watch.terminate();
    assert_eq!(status.code(), Some(0), "watch stops cleanly on SIGTERM:\n{err}");
    assert_no_secrets(&out, &err, runner.jit_config.as_deref().unwrap_or_default(), &scene.fake);
    assert_eq!(scene.fake.spec_violations(), Vec::<String>::new());
}

/// Cycles `watch` reported, from its metrics (0 until it listens).
fn cycles(address: SocketAddr) -> f64 {
    if std::net::TcpStream::connect(address).is_err() {
        return 0.0;
    }
    metric(&get(address, "/metrics").1, "ciscale_cycles_total")
}

/// Waits until no cycle has started for `quiet` (start-up and reload cycles, the Incus event stream's
/// (re)connection) and returns the count.
fn settled(address: SocketAddr, watch: &mut WatchProcess, quiet: Duration) -> f64 {
    let mut last = until("a first cycle", watch, || Some(cycles(address)).filter(|count| *count >= 1.0));
    let mut since = Instant::now();
    until("the cycles to settle", watch, || {
        let now = cycles(address);
        if now != last {
            (last, since) = (now, Instant::now());
        }
        (since.elapsed() >= quiet).then_some(last)
    })
}

/// Polls are a minute apart, so only the webhook can explain a reaction within seconds: a forged delivery of a
/// queued job is refused (401) and neither wakes the loop nor creates anything; the signed one starts the
/// container at once. The route survives a config reload (SIGHUP) in between. The runner's `in_progress` and
/// `completed` deliveries are taken too, and the job's container and runner are gone at the end.
#[test]
fn a_signed_webhook_delivery_starts_the_container_at_once_and_a_forged_one_nothing() {
    let Some(scene) = scene("ghhook") else { return };
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port").local_addr().expect("address").port();
    let address: SocketAddr = ([127, 0, 0, 1], port).into();
    scene.write_config(
        "60s",
        "    webhookSecret: \"${GITHUB_WEBHOOK_SECRET}\"\n",
        &format!("metrics: {{ listen: \"{address}\" }}\n"),
    );
    let mut watch = scene.start_watch();
    settled(address, &mut watch, Duration::from_secs(2));
    // A reload hands the route the new config's source and the loop a new wake-up stream: deliveries after it
    // must still wake the loop.
    let before_reload = cycles(address);
    watch.signal("HUP");
    until("the reload's cycle", &mut watch, || (cycles(address) > before_reload).then_some(()));
    let quiet = settled(address, &mut watch, Duration::from_secs(2));

    let (_, jobs) = scene.fake.queue_run(REPO, &[&RUNS_ON]);
    let payload = |action: &str| serde_json::to_vec(&scene.fake.workflow_job_payload(jobs[0], action)).expect("json");
    let queued = payload("queued");
    let forged = webhook::sign(&Secret::new("not-the-secret"), &queued);
    let (status, text) = deliver(address, "github", "workflow_job", Some(&forged), &queued);
    assert_eq!(status, 401, "a forged signature is refused: {text}");
    std::thread::sleep(Duration::from_secs(3));
    assert!(scene.proxy.create_calls().is_empty(), "a forged delivery created something");
    assert_eq!(cycles(address), quiet, "a forged delivery woke the loop");

    let signed = webhook::sign(&Secret::new(WEBHOOK_SECRET), &queued);
    let sent = Instant::now();
    let (status, text) = deliver(address, "github", "workflow_job", Some(&signed), &queued);
    assert_eq!(status, 202, "{text}");
    let (name, created) = until("the create call", &mut watch, || scene.proxy.create_calls().into_iter().next());
    let latency = created.saturating_duration_since(sent);
    eprintln!("MEASURED github+incus: signed webhook delivery → create call: {latency:?} (polls 60 s apart)");
    // A poll was due a minute after the last cycle, which settled for 2 s and then 3 s more before the delivery:
    // a create within 30 s of it can only be the webhook's doing.
    assert!(
        latency < Duration::from_secs(30),
        "the create came {latency:?} after the delivery: a poll, not the webhook"
    );

    let (instance, runner) = scene.check_launch(&mut watch);
    assert_eq!(instance.name, name);
    scene.play_runner(&instance, &runner, jobs[0], |action| {
        let body = payload(action);
        let signature = webhook::sign(&Secret::new(WEBHOOK_SECRET), &body);
        let (status, text) = deliver(address, "github", "workflow_job", Some(&signature), &body);
        assert_eq!(status, 202, "{action}: {text}");
    });
    scene.check_clean(&mut watch);
    assert_eq!(scene.proxy.create_calls().len(), 1, "one container for one job");

    let (_, exposition) = get(address, "/metrics");
    assert_eq!(metric(&exposition, r#"ciscale_webhook_deliveries_total{source="github"}"#), 3.0, "{exposition}");
    assert_eq!(
        metric(&exposition, r#"ciscale_webhook_refusals_total{source="github",status="401"}"#),
        1.0,
        "{exposition}"
    );
    let (status, out, err) = watch.terminate();
    assert_eq!(status.code(), Some(0), "watch stops cleanly on SIGTERM:\n{err}");
    // The refusal is logged at warn, without the body or the signature.
    let refusals: Vec<&str> = err.lines().filter(|line| line.contains("webhook delivery refused")).collect();
    assert_eq!(refusals.len(), 1, "{err}");
    assert!(refusals[0].contains("WARN") && refusals[0].contains("401"), "{}", refusals[0]);
    assert!(!err.contains(&forged[7..]) && !err.contains(&signed[7..]), "a signature was logged:\n{err}");
    assert!(!err.contains("\"workflow_job\":") && !out.contains("\"workflow_job\":"), "a body was logged");
    assert!(err.contains("/webhooks/github"), "the listener says where it takes deliveries:\n{err}");
    assert_no_secrets(&out, &err, runner.jit_config.as_deref().unwrap_or_default(), &scene.fake);
    assert_eq!(scene.fake.spec_violations(), Vec::<String>::new());
}
