//! The watch loop as work in flight across cycles: one pool's trouble never delays another pool (a create that
//! hangs on one backend, a backend that cannot be observed), a change that outlives its deadline is abandoned and
//! decided again, a failing target backs off alone, and SIGTERM lets work in flight finish while a second signal
//! aborts.
//!
//! Timing goals live in the soak bench (`cargo bench --bench soak`); these tests assert orders of events with
//! wide margins ("the other pool's create came while the hung one was still hanging"), and print what they
//! measured.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ciscale::apply::ApplyOptions;
use ciscale::model::{BackendName, CiName, Desired, InstanceState, PoolName};
use ciscale::providers::fake::{FakeAgent, FakeWorld, Fault, FaultKind, Op};
use ciscale::providers::Providers;
use ciscale::watch::{self, CycleReport, WatchOptions};

use crate::cli::Sandbox;

/// How long the hung creates hang: far longer than any margin below, so "before it returned" is unambiguous.
const HUNG_FOR: Duration = Duration::from_secs(120);

fn labels(platform: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("platform".to_owned(), platform.to_owned())])
}

fn load(yaml: &str) -> Desired {
    ciscale::config::load_str("watch-loop.yaml", yaml, &|_| None).expect("valid config")
}

fn options() -> WatchOptions {
    WatchOptions {
        apply: ApplyOptions { poll: Duration::from_millis(5), ..ApplyOptions::default() },
        ..WatchOptions::default()
    }
}

/// Polls `probe` (bounded) until it returns something.
async fn eventually<T>(what: &str, within: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The loop, running in a task of its own until the returned handle is dropped or aborted. Dropping the loop's
/// future abandons its work in flight (the hung creates with it).
struct Running {
    task: tokio::task::JoinHandle<()>,
    reports: Arc<Mutex<Vec<CycleReport>>>,
    _cancel: tokio::sync::watch::Sender<bool>,
}

impl Running {
    fn start(
        desired: Desired,
        providers: Providers,
        options: WatchOptions,
        triggers: Vec<tokio::sync::mpsc::Receiver<watch::Trigger>>,
    ) -> Self {
        let reports = Arc::new(Mutex::new(Vec::new()));
        let seen = reports.clone();
        let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            watch::run_with_triggers(&desired, &providers, &options, &cancel, triggers, |report| {
                seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(report.clone());
            })
            .await;
        });
        Self { task, reports, _cancel: cancel_tx }
    }

    fn reports(&self) -> Vec<CycleReport> {
        self.reports.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn instances_of(world: &FakeWorld, pool: &str) -> Vec<ciscale::providers::fake::FakeInstance> {
    world
        .snapshot()
        .instances
        .into_iter()
        .filter(|instance| instance.labels.get("ciscale.pool").is_some_and(|label| label == pool))
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Isolation: a hung create on one backend
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_hanging_on_one_backend_never_delays_a_pool_on_another() {
    // Backend `slow` answers its creates after two minutes; `fast` at once. One CI source serves both pools.
    let desired = load(
        r#"
id: iso
pollInterval: 1s
ci: { sim: { kind: fake } }
backends: { slow: { kind: fake }, fast: { kind: fake } }
pools:
  - { name: stuck, ci: { source: sim, labels: { platform: stuck } }, backend: { name: slow }, scale: { max: 2 } }
  - { name: quick, ci: { source: sim, labels: { platform: quick } }, backend: { name: fast }, scale: { max: 2 } }
"#,
    );
    let slow = FakeWorld::new();
    slow.inject(Fault::new(Op::Create, FaultKind::Hold { hold_for: HUNG_FOR }, u32::MAX));
    let fast = FakeWorld::new();
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("slow"), Arc::new(slow.backend()));
    providers.backends.insert(BackendName::new("fast"), Arc::new(fast.backend()));
    providers.ci.insert(CiName::new("sim"), Arc::new(fast.ci()));

    fast.push_task(labels("stuck"));
    let hung_since = Instant::now();
    let running = Running::start(desired, providers, options(), Vec::new());
    eventually("the first create to hang on `slow`", Duration::from_secs(30), || {
        (slow.calls(Op::Create) == 1).then_some(())
    })
    .await;

    // A job for the other pool, while `slow`'s create hangs.
    let pushed = Instant::now();
    fast.push_task(labels("quick"));
    eventually("a create for `quick`", Duration::from_secs(60), || (fast.calls(Op::Create) >= 1).then_some(())).await;
    let reaction = pushed.elapsed();
    eprintln!("MEASURED job for `quick` → its create call, while `slow` hangs: {reaction:?} (poll interval 1s)");

    assert!(hung_since.elapsed() < HUNG_FOR, "the hung create would have returned by now: the test proves nothing");
    assert!(slow.snapshot().instances.is_empty(), "the hung create has not returned");
    assert_eq!(slow.calls(Op::Create), 1, "the pool with the hung create did not create again meanwhile");
    let quick = eventually("`quick`'s instance", Duration::from_secs(30), || {
        let found = instances_of(&fast, "quick");
        (!found.is_empty()).then_some(found)
    })
    .await;
    assert_eq!(quick.len(), 1);
    // The hung pool's agent record (registered before its create hung) was never taken for an orphan.
    assert_eq!(fast.calls(Op::Deregister), 0);
    let reports = running.reports();
    assert!(reports.iter().all(|report| report.error.is_none()), "{reports:?}");
    assert!(
        reports.iter().any(|report| report.in_flight >= 1 && report.cycle > 1),
        "cycles went on with the create in flight: {reports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_hanging_elsewhere_never_delays_the_reaction_to_an_incus_event() {
    let Some((incus, image)) = crate::incus::daemon() else { return };
    let owner = crate::incus::owner("iso");
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").unwrap_or_default();
    // An hour between polls: only the Incus event can start the replacement in time. Meanwhile a third backend
    // cannot be observed at all and backs off (for an hour after its first failure): that must not keep the event
    // from waking the loop either.
    let desired = load(&format!(
        r#"
id: {owner}
pollInterval: 1h
ci: {{ sim: {{ kind: fake }} }}
backends:
  slow: {{ kind: fake }}
  broken: {{ kind: fake }}
  lxd: {{ kind: incus, socket: "{socket}" }}
pools:
  - {{ name: stuck, ci: {{ source: sim, labels: {{ platform: stuck }} }}, backend: {{ name: slow }}, scale: {{ max: 1 }} }}
  - {{ name: dark, ci: {{ source: sim, labels: {{ platform: dark }} }}, backend: {{ name: broken }}, scale: {{ max: 1 }} }}
  - name: eph
    ci: {{ source: sim }}
    backend: {{ name: lxd, machine: {{ image: {image} }} }}
    scale: {{ min: 1, max: 1, ephemeral: true }}
"#
    ));
    let slow = FakeWorld::new();
    slow.inject(Fault::new(Op::Create, FaultKind::Hold { hold_for: HUNG_FOR }, u32::MAX));
    let broken = FakeWorld::new();
    broken.inject(Fault::new(Op::BackendObserve, FaultKind::Unauthenticated, u32::MAX));
    let ci = FakeWorld::new();
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("slow"), Arc::new(slow.backend()));
    providers.backends.insert(BackendName::new("broken"), Arc::new(broken.backend()));
    providers.backends.insert(BackendName::new("lxd"), Arc::new(incus.clone()));
    providers.ci.insert(CiName::new("sim"), Arc::new(ci.ci()));
    ci.push_task(labels("stuck"));

    let hung_since = Instant::now();
    let triggers = watch::triggers::from_config(&desired);
    let running = Running::start(desired, providers, options(), triggers);
    let first = crate::incus::wait_owned_running(&incus, &owner, None).await;
    eventually("the create on `slow` to hang", Duration::from_secs(30), || (slow.calls(Op::Create) == 1).then_some(()))
        .await;
    // Let the cycle that followed the first container's create pass, so the poweroff is an event to react to.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // A listener of our own on the same event stream: when the event reached ciscale.
    let mut events = ciscale::providers::incus::events::subscribe(incus.clone(), owner.clone());
    let since = jiff::Timestamp::now();
    let poweroff =
        ciscale::providers::Exec { command: vec!["poweroff".into(), "-f".into()], env: BTreeMap::new(), wait: false };
    drop(ciscale::providers::Backend::exec(&incus, &first.id, &poweroff).await);
    let event_at = {
        let name = first.name.clone();
        tokio::time::timeout(Duration::from_secs(60), async move {
            while let Some(signal) = events.recv().await {
                if matches!(signal, ciscale::providers::incus::events::Signal::InstanceGone { name: ref gone, .. } if *gone == name) {
                    return jiff::Timestamp::now();
                }
            }
            jiff::Timestamp::now()
        })
        .await
        .expect("the container's lifecycle event")
    };
    let replacement = crate::incus::wait_owned_running(&incus, &owner, Some(since)).await;
    eprintln!(
        "MEASURED poweroff → event: {} ms; event → replacement created: {} ms; while `slow`'s create hangs",
        event_at.duration_since(since).as_millis(),
        replacement.created_at.duration_since(event_at).as_millis()
    );

    assert!(hung_since.elapsed() < HUNG_FOR, "the hung create would have returned by now: the test proves nothing");
    assert!(slow.snapshot().instances.is_empty(), "the hung create has not returned");
    assert_eq!(slow.calls(Op::Create), 1, "no second create for the hung pool");
    let reports = running.reports();
    assert!(reports.iter().any(|report| report.in_flight >= 1), "{reports:?}");
    // The cycles the event started saw `broken` still backing off (it was tried once, in the first cycle).
    let woken: Vec<&CycleReport> =
        reports.iter().filter(|report| report.started_at >= event_at - jiff::SignedDuration::from_secs(1)).collect();
    assert!(!woken.is_empty(), "a cycle after the event: {reports:?}");
    for report in woken {
        let error = report.error.as_deref().unwrap_or_default();
        assert!(error.contains("backend `broken`: backing off"), "{report:?}");
    }
    assert_eq!(broken.calls(Op::BackendObserve), 1, "tried once, then left alone for its backoff");
    drop(running);
    crate::incus::cleanup(&incus, &owner).await;
}

// ---------------------------------------------------------------------------------------------------------------
// A backend that cannot be observed
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_cannot_be_observed_holds_back_only_its_pools_and_nothing_is_planned_from_its_absence() {
    let desired = load(
        r#"
id: part
pollInterval: 1s
ci: { sim: { kind: fake } }
backends: { down: { kind: fake }, up: { kind: fake } }
pools:
  - { name: on-down, ci: { source: sim, labels: { platform: down } }, backend: { name: down }, scale: { max: 3 } }
  - { name: on-up, ci: { source: sim, labels: { platform: up } }, backend: { name: up }, scale: { max: 3 } }
"#,
    );
    let down = FakeWorld::new();
    // Refused credentials: not worth a retry within the cycle, so each try is one call.
    down.inject(Fault::new(Op::BackendObserve, FaultKind::Unauthenticated, u32::MAX));
    let up = FakeWorld::new();
    // The agents of `down`'s instances, idle, registered an hour ago and past their first job: seen without their
    // instances they are stale records of ours, to be deregistered (as the end of this test shows).
    let an_hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_hours(1);
    let on_down = PoolName::new("on-down");
    let names: Vec<String> = (1..=2).map(|n| ciscale::plan::instance_name("part", &on_down, n)).collect();
    up.update(|state| {
        for (id, name) in ["1", "2"].into_iter().zip(&names) {
            state.agents.push(FakeAgent {
                id: ciscale::model::AgentId::new(id),
                name: name.clone(),
                pool: Some(on_down.clone()),
                no_schedule: false,
                last_contact: Some(an_hour_ago),
                last_work: Some(an_hour_ago),
                labels: labels("down"),
                token_sha256: String::new(),
                jobs_done: 1,
                created_at: Some(an_hour_ago),
            });
        }
        state.counters.agents = 2;
    });
    up.push_task(labels("down"));
    up.push_task(labels("up"));
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("down"), Arc::new(down.backend()));
    providers.backends.insert(BackendName::new("up"), Arc::new(up.backend()));
    providers.ci.insert(CiName::new("sim"), Arc::new(up.ci()));

    let options = WatchOptions { cycles: Some(4), ..options() };
    let (_keep, cancel) = tokio::sync::watch::channel(false);
    let mut desired = desired;
    desired.poll_interval = ciscale::model::GoDuration(Duration::from_millis(200));
    let mut reports = Vec::new();
    watch::run(&desired, &providers, &options, &cancel, |report| reports.push(report.clone())).await;

    // The pool on the healthy backend scaled up, every cycle planned it.
    assert_eq!(instances_of(&up, "on-up").len(), 1, "{reports:?}");
    // Nothing decided from `down`'s absence: no create for its pool, no agent record of its instances removed.
    assert_eq!(down.calls(Op::Create), 0);
    assert_eq!(up.calls(Op::Deregister), 0, "an agent whose instance may live on `down` was deregistered");
    assert_eq!(up.snapshot().agents.iter().filter(|agent| names.contains(&agent.name)).count(), 2);
    for report in &reports {
        assert_eq!(report.unobserved_pools, [PoolName::new("on-down")], "{report:?}");
        assert!(report.error.as_deref().is_some_and(|error| error.contains("backend `down`")), "{report:?}");
        assert!(report.pools.iter().all(|status| status.pool.as_str() == "on-up"), "{report:?}");
    }
    // `down` backs off on its own (one interval after the first failure, two after the second, ...), while `up`
    // is observed every cycle.
    assert_eq!(up.calls(Op::BackendObserve), 4);
    let tried = down.calls(Op::BackendObserve);
    assert!((1..4).contains(&tried), "`down` was tried in {tried} of 4 cycles");

    // The records were what they looked like: once `down` answers (and lists no instance for them), they go.
    down.update(|state| state.faults.clear());
    let options = WatchOptions { cycles: Some(3), ..options };
    watch::run(&desired, &providers, &options, &cancel, |_| {}).await;
    assert_eq!(up.calls(Op::Deregister), 2, "with every source observed, the stale records are deregistered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limited_source_waits_its_retry_after_while_the_others_are_observed_every_cycle() {
    let desired = load(
        r#"
id: limited
pollInterval: 1s
ci: { sim: { kind: fake } }
backends: { sim: { kind: fake } }
pools:
  - { name: linux, ci: { source: sim }, backend: { name: sim } }
"#,
    );
    let world = FakeWorld::new();
    world.inject(Fault::new(Op::CiObserve, FaultKind::RateLimited { retry_after: Some(Duration::from_secs(7)) }, 1));
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("sim"), Arc::new(world.backend()));
    providers.ci.insert(CiName::new("sim"), Arc::new(world.ci()));
    let options = WatchOptions { cycles: Some(3), ..options() };
    let (_keep, cancel) = tokio::sync::watch::channel(false);
    let mut desired = desired;
    desired.poll_interval = ciscale::model::GoDuration(Duration::from_millis(20));
    let mut reports = Vec::new();
    watch::run(&desired, &providers, &options, &cancel, |report| reports.push(report.clone())).await;

    let first = &reports[0];
    assert!(first.error.as_deref().is_some_and(|error| error.contains("rate limited")), "{first:?}");
    assert_eq!(first.retry_after_secs, Some(7.0));
    for report in &reports[1..] {
        assert!(report.error.as_deref().is_some_and(|error| error.contains("backing off")), "{report:?}");
        assert_eq!(report.unobserved, [ciscale::observe::Source::Ci(CiName::new("sim"))]);
    }
    assert_eq!(world.calls(Op::CiObserve), 1, "not asked again within its Retry-After");
    assert_eq!(world.calls(Op::BackendObserve), 3, "the backend is observed every cycle");
}

// ---------------------------------------------------------------------------------------------------------------
// Deadlines and per-target backoff
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_past_its_deadline_is_abandoned_and_the_next_cycle_decides_again() {
    let desired = load(
        r#"
id: late
pollInterval: 1s
ci: { sim: { kind: fake } }
backends: { sim: { kind: fake, changeTimeout: 1s } }
pools:
  - { name: linux, ci: { source: sim, labels: { platform: linux } }, backend: { name: sim }, scale: { max: 1 } }
"#,
    );
    let world = FakeWorld::new();
    // The first create hangs for two minutes; the ones after it answer at once.
    world.inject(Fault::new(Op::Create, FaultKind::Hold { hold_for: HUNG_FOR }, 1));
    world.push_task(labels("linux"));
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("sim"), Arc::new(world.backend()));
    providers.ci.insert(CiName::new("sim"), Arc::new(world.ci()));
    let started = Instant::now();
    let running = Running::start(desired, providers, options(), Vec::new());

    let instance = eventually("an instance after the abandoned create", Duration::from_secs(60), || {
        world.snapshot().instances.into_iter().find(|instance| instance.state == InstanceState::Running)
    })
    .await;
    let abandoned = eventually("the report of the abandoned create", Duration::from_secs(30), || {
        running.reports().into_iter().find(|report| report.abandoned > 0)
    })
    .await;
    eprintln!("MEASURED hung create abandoned and replaced by a working one after {:?}", started.elapsed());
    assert!(started.elapsed() < HUNG_FOR, "the hung call would have returned by now");
    assert_eq!(abandoned.abandoned, 1);
    assert_eq!(abandoned.failed_by_action.get("create"), Some(&1), "{abandoned:?}");
    assert_eq!(world.calls(Op::Create), 2, "the abandoned create, then one that worked");
    // The abandoned call never took effect: one instance, the second attempt's.
    let instances = world.snapshot().instances;
    assert_eq!(instances.len(), 1, "{instances:?}");
    assert_eq!(instances[0].id, instance.id);
}

#[test]
fn a_change_timeout_that_is_zero_or_not_a_duration_is_a_located_config_error() {
    let yaml = r#"id: t
ci: { sim: { kind: fake } }
backends:
  zero: { kind: fake, changeTimeout: 0s }
  words: { kind: fake, changeTimeout: a while }
  fine: { kind: fake, changeTimeout: 90s }
pools:
  - { name: p, ci: { source: sim }, backend: { name: fine } }
"#;
    let error = ciscale::config::load_str("t.yaml", yaml, &|_| None).unwrap_err();
    let plain = error.diagnostics().expect("config problems").render_plain();
    assert!(
        plain.contains("t.yaml:4:") && plain.contains("`changeTimeout` of backend `zero` must be longer than zero"),
        "{plain}"
    );
    assert!(
        plain.contains("t.yaml:5:")
            && plain.contains("invalid duration `a while` for `changeTimeout` of backend `words`"),
        "{plain}"
    );
    assert!(!plain.contains("`fine`"), "{plain}");

    let valid = load(&yaml.replace("changeTimeout: 0s", "changeTimeout: 2m").replace("a while", "1h"));
    let deadline = |backend: &str| valid.backends.get(&BackendName::new(backend)).and_then(|spec| spec.change_timeout);
    assert_eq!(deadline("zero"), Some(ciscale::model::GoDuration::from_secs(120)));
    assert_eq!(deadline("fine"), Some(ciscale::model::GoDuration::from_secs(90)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_target_backs_off_alone_while_the_loop_keeps_its_pace() {
    // An orphan instance (its pool is gone) whose delete always fails, and a pool that has work to do.
    let desired = load(
        r#"
id: stubborn
pollInterval: 1s
ci: { sim: { kind: fake } }
backends: { sim: { kind: fake } }
pools:
  - { name: linux, ci: { source: sim, labels: { platform: linux } }, backend: { name: sim }, scale: { max: 5 } }
"#,
    );
    let world = FakeWorld::new();
    world.update(|state| {
        state.counters.instances = 1;
        state.instances.push(ciscale::providers::fake::FakeInstance {
            id: ciscale::model::InstanceId::new("fake-1"),
            name: "stubborn-removed-1".to_owned(),
            state: InstanceState::Running,
            created_at: jiff::Timestamp::now(),
            labels: BTreeMap::from([
                ("ciscale.owner".to_owned(), "stubborn".to_owned()),
                ("ciscale.pool".to_owned(), "removed".to_owned()),
            ]),
            attributes: BTreeMap::new(),
            user_data_sha256: None,
        });
    });
    world.inject(Fault::new(Op::Delete, FaultKind::Unauthenticated, u32::MAX));
    let mut providers = Providers::default();
    providers.backends.insert(BackendName::new("sim"), Arc::new(world.backend()));
    providers.ci.insert(CiName::new("sim"), Arc::new(world.ci()));
    let mut desired = desired;
    desired.poll_interval = ciscale::model::GoDuration(Duration::from_millis(20));
    let running = Running::start(desired, providers, options(), Vec::new());

    // Jobs keep coming for the pool while the orphan's delete keeps failing.
    let started = Instant::now();
    for _ in 0..5 {
        world.push_task(labels("linux"));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eventually("the pool's five agents", Duration::from_secs(30), || {
        (instances_of(&world, "linux").len() == 5).then_some(())
    })
    .await;
    let elapsed = started.elapsed();
    let reports = running.reports();
    let deletes = world.calls(Op::Delete);
    drop(running);
    let cycles = reports.len();
    eprintln!("MEASURED {cycles} cycles in {elapsed:?}; the failing delete was tried {deletes} times");
    // A loop that backed off as a whole (doubling from 20 ms) would manage about 7 cycles in 1.5 s.
    assert!(cycles >= 20, "the loop kept its pace: {cycles} cycles in {elapsed:?}");
    // The target alone backs off: tries at 0, 20, 60, 140, 300, 620, 1260 ms, ... (+10 % jitter at most), so
    // about log2(elapsed / 20 ms) of them; two more for rounding and the cycle that was running at the end.
    let bound = ((elapsed.as_millis() as f64 / 20.0) + 1.0).log2().floor() as u64 + 2;
    assert!(
        (1..=bound).contains(&deletes),
        "the failing target backed off: {deletes} delete calls (at most {bound}) in {cycles} cycles"
    );
}

// ---------------------------------------------------------------------------------------------------------------
// Shutdown
// ---------------------------------------------------------------------------------------------------------------

fn spawn_watch(sandbox: &Sandbox) -> (Child, Arc<Mutex<String>>) {
    let mut child = sandbox
        .command(&["watch", "--json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start watch");
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut log = sink.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            log.push_str(&line);
            log.push('\n');
        }
    });
    (child, log)
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill").args([&format!("-{name}"), &child.id().to_string()]).status().expect("kill");
    assert!(sent.success());
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(Instant::now() < deadline, "watch did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_until(what: &str, within: Duration, done: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_first_sigterm_lets_the_work_in_flight_finish() {
    let sandbox = Sandbox::new("{ max: 1 }");
    sandbox.push_linux_task();
    // The create answers after 3 s: SIGTERM comes while it is in flight.
    sandbox.world().inject(Fault::new(Op::Create, FaultKind::Hold { hold_for: Duration::from_secs(3) }, 1));
    let (mut child, log) = spawn_watch(&sandbox);
    wait_until("the create in flight", Duration::from_secs(30), || sandbox.world().calls(Op::Create) == 1);
    let signalled = Instant::now();
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(60));
    let text = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("waiting for the work in flight to finish"), "{text}");
    eprintln!("MEASURED SIGTERM → exit with a create in flight: {:?}", signalled.elapsed());
    let world = sandbox.world().snapshot();
    assert_eq!(world.instances.len(), 1, "the create in flight finished: {:?}", world.instances);
    assert_eq!(world.calls.get("backend.create"), Some(&1), "and nothing new started");
    assert!(!text.contains(crate::cli::SECRET));
}

#[test]
fn a_second_signal_aborts_at_once() {
    let sandbox = Sandbox::new("{ max: 1 }");
    sandbox.push_linux_task();
    sandbox.world().inject(Fault::new(Op::Create, FaultKind::Hold { hold_for: HUNG_FOR }, 1));
    let (mut child, log) = spawn_watch(&sandbox);
    wait_until("the create in flight", Duration::from_secs(30), || sandbox.world().calls(Op::Create) == 1);
    signal(&child, "TERM");
    wait_until("the first signal to be taken", Duration::from_secs(30), || {
        log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains("waiting for the work in flight")
    });
    let signalled = Instant::now();
    signal(&child, "TERM");
    let status = wait_exit(&mut child, Duration::from_secs(30));
    let text = log.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    assert_eq!(status.code(), Some(ciscale::watch::signals::EXIT_ABORTED), "{text}");
    assert!(signalled.elapsed() < Duration::from_secs(10), "aborted at once, not after the hung create");
    assert!(sandbox.world().snapshot().instances.is_empty(), "the hung create was cut off before it took effect");
}

#[test]
fn a_pool_note_is_logged_when_it_appears_not_every_cycle() {
    // Two long jobs and `max: 1`: every cycle the pool notes that demand wants more than `max`. The log says so
    // once; the cycle reports (stdout) carry the note every cycle.
    let sandbox = Sandbox::new("{ max: 1 }");
    for _ in 0..2 {
        sandbox.world().push_task_for(labels("linux"), Duration::from_secs(3600));
    }
    let output =
        crate::cli::run(sandbox.command(&["watch", "--json", "--cycles", "6"]).env("CISCALE_LOG_FORMAT", "json"));
    let log = crate::cli::stderr(&output);
    assert!(output.status.success(), "{log}");
    let at_max = |text: &str| text.contains("demand wants 2 agents, capped at max 1");
    let reports: Vec<serde_json::Value> =
        crate::cli::stdout(&output).lines().map(|line| serde_json::from_str(line).expect("a JSON report")).collect();
    let noted = reports.iter().filter(|report| at_max(&report["pools"].to_string())).count();
    assert!(noted >= 3, "the pool stays at `max` for several cycles: {reports:#?}");
    let logged: Vec<String> = log
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter_map(|line| line["fields"]["message"].as_str().map(str::to_owned))
        .filter(|message| at_max(message))
        .collect();
    assert_eq!(logged.len(), 1, "logged once while it stays the same: {logged:#?}\n{log}");
}
