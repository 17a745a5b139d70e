//! Crash anywhere. The `ciscale watch` binary is killed with SIGKILL again and again while jobs come and go —
//! after random delays, and right after a chosen call took effect (an agent registered, an instance created, an
//! agent drained, an instance stopped or deleted, an agent deregistered: the fakes hold that call's answer back so
//! the kill lands between the world changing and ciscale hearing of it) — and restarted each time. After the last
//! kill it runs on until the world is quiet. The promises are checked against what the fakes saw at every moment,
//! not only at the end:
//! - no pool ever had more instances than its `max`: counted right after every create that reached the backend, in
//!   whatever state they are (an instance ciscale asked to delete no longer counts: that is the in-flight window
//!   the README documents);
//! - no instance was deleted or stopped, and no agent record removed, while its agent ran a job;
//! - at the end: no instance of a create pool is left, no agent record but the pre-registered ones, every job ran.
//!
//! Three worlds, one harness: the file-backed fake world (backend and CI), moto's EC2 behind the proxy that adds
//! EC2's client tokens and a lagging listing ([`crate::fakes::ec2`]), and the real Incus daemon behind a socket
//! proxy ([`crate::fakes::incus_proxy`]). The CI is the fake CI in all three; it plays the agents.
//!
//! `CISCALE_CRASH_KILLS` sets the kills per world (default [`DEFAULT_KILLS`]; `scripts/test` sets 20, so CI runs
//! 60 in all); `CISCALE_CRASH_SEED` replays a kill schedule (every run prints its seed; the processes' timing still
//! varies from run to run); `CISCALE_CRASH_KEEP=1` keeps each world's folder (config, run logs, fake world).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ciscale::model::{FakeSpec, InstanceId, InstanceState, PoolName, POOL_LABEL};
use ciscale::providers::fake::{FakeInstance, FakeWorld, Op, WorldState};
use ciscale::providers::{CiSource, RegisterAgent};
use proptest::prelude::RngExt;
use proptest::test_runner::{RngAlgorithm, TestRng};

/// Kills per world when `CISCALE_CRASH_KILLS` is unset.
const DEFAULT_KILLS: usize = 50;
/// `max` of the create pool.
const MAX: usize = 2;
/// Kills at a random moment after a run started to act: within this of its first operation.
const AFTER_ACTIVITY: std::ops::Range<u64> = 0..400;
/// How long a held answer waits: the harness notices the hold within milliseconds and kills well within this.
const HOLD: Duration = Duration::from_secs(4);
/// How late incusd acts on a create whose sender was killed (see `IncusProxy::set_hold_request`).
const LATE_CREATE: Duration = Duration::from_millis(1500);
/// Longest wait for a chosen call to happen before the kill is made at a random moment instead.
const TARGET_PATIENCE: Duration = Duration::from_secs(12);
/// Longest wait for the world to become quiet after the last kill.
const CONVERGE_DEADLINE: Duration = Duration::from_secs(120);

/// The calls a targeted kill lands right after, in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Register,
    Create,
    Drain,
    Stop,
    Delete,
    Start,
    Deregister,
}

const TARGETS: [Target; 8] = [
    Target::Create,
    Target::Register,
    Target::Drain,
    Target::Delete,
    Target::Stop,
    Target::Create,
    Target::Deregister,
    Target::Start,
];

impl Target {
    /// The fake CI's operation, for the calls the CI answers.
    fn ci_op(self) -> Option<Op> {
        match self {
            Target::Register => Some(Op::Register),
            Target::Drain => Some(Op::Drain),
            Target::Deregister => Some(Op::Deregister),
            _ => None,
        }
    }
}

/// A backend world the harness drives ciscale against.
#[async_trait::async_trait]
trait Backdrop: Send + Sync {
    fn name(&self) -> &'static str;
    /// The `backends.b` entry of the config.
    fn backend_yaml(&self) -> String;
    /// `backend.machine` of the create pool.
    fn machine_yaml(&self) -> String;
    /// The adopted instances of the start/stop pool: (instance id, agent name).
    fn adopted(&self) -> Vec<(String, String)>;
    /// Environment the `ciscale` processes need; `dir` is the run's folder.
    fn env(&self, _dir: &Path) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Plays the machines: tells the fake CI which agents' machines run now.
    async fn sync(&self, world: &FakeWorld);
    /// Live instances of the create pool now.
    async fn created_live(&self) -> Vec<String>;
    /// Adopted instances running now.
    async fn adopted_running(&self) -> Vec<String>;
    /// Whether [`Self::arm`] can hold `target` (a backend call).
    fn supports(&self, target: Target) -> bool;
    /// Holds the answer of the next `target` call the backend sees.
    fn arm(&self, target: Target, world: &FakeWorld);
    fn disarm(&self, world: &FakeWorld);
    /// Backend holds that fired so far.
    fn held(&self, world: &WorldState) -> usize;
    /// (pool, its instances right after) for every create that reached the backend: their names where known,
    /// else as many placeholders.
    fn creates(&self, world: &WorldState) -> Vec<(String, Vec<String>)>;
    /// Every time an instance was deleted or stopped while its agent ran a job.
    fn busy_losses(&self, world: &WorldState) -> Vec<String>;
    /// What reached the backend so far, in order (`create`, `delete`, ...), where the fake world's journal does not
    /// already say it.
    fn backend_log(&self) -> Vec<String> {
        Vec::new()
    }
    async fn cleanup(&self);
}

/// The kill schedule's random source, seeded (and the seed printed) so a schedule can be replayed.
struct Schedule {
    rng: TestRng,
    seed: u64,
}

impl Schedule {
    /// `CISCALE_CRASH_SEED`, else a fresh seed.
    fn new() -> Self {
        let seed = std::env::var("CISCALE_CRASH_SEED").ok().and_then(|seed| seed.parse().ok()).unwrap_or_else(|| {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            (now.as_nanos() as u64) ^ u64::from(std::process::id()).rotate_left(32)
        });
        Self::seeded(seed)
    }

    fn seeded(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        for (index, chunk) in bytes.chunks_mut(8).enumerate() {
            chunk.copy_from_slice(&seed.rotate_left(16 * index as u32).to_le_bytes());
        }
        Self { rng: TestRng::from_seed(RngAlgorithm::ChaCha, &bytes), seed }
    }

    fn millis(&mut self, range: std::ops::Range<u64>) -> Duration {
        Duration::from_millis(self.rng.random_range(range))
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.random_range(0..100u32) < percent
    }
}

fn kills() -> usize {
    std::env::var("CISCALE_CRASH_KILLS").ok().and_then(|kills| kills.parse().ok()).unwrap_or(DEFAULT_KILLS)
}

/// Labels of a job for pool `pool` (the pools ask for `pool: <name>`).
fn job_for(pool: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("pool".to_owned(), pool.to_owned())])
}

/// A running `ciscale watch`; killed when dropped (a failing test must not leave one behind).
struct Watch(Child);

impl std::ops::Deref for Watch {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Watch {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            drop(self.0.kill());
        }
        drop(self.0.wait());
    }
}

/// One harness run in a scratch folder.
struct Harness {
    dir: tempfile::TempDir,
    world: FakeWorld,
    backdrop: Arc<dyn Backdrop>,
    runs: usize,
    log: Vec<String>,
}

impl Harness {
    fn new(backdrop: Arc<dyn Backdrop>, dir: tempfile::TempDir, owner: &str) -> Self {
        let adopted: String = backdrop
            .adopted()
            .iter()
            .map(|(id, agent)| format!("\n          - {{ id: \"{id}\", agentName: {agent} }}"))
            .collect();
        let config = format!(
            r#"id: {owner}
pollInterval: {interval}
ci:
  sim: {{ kind: fake, stateFile: world.json, simulate: true }}
backends:
  b: {backend}
pools:
  - name: a
    ci: {{ source: sim, labels: {{ pool: a }} }}
    backend: {{ name: b, machine: {machine} }}
    scale: {{ max: {MAX}, idleTimeout: 1s, bootstrapTimeout: 20s }}
  - name: s
    ci: {{ source: sim, labels: {{ pool: s }} }}
    backend:
      name: b
      startStop:
        instances:{adopted}
    scale: {{ max: 2, idleTimeout: 1s }}
"#,
            backend = backdrop.backend_yaml(),
            machine = backdrop.machine_yaml(),
            // The shortest poll each backend allows (Incus: 1s; the fake and loopback endpoints: less), so kills
            // land in as many cycles as possible.
            interval = if backdrop.backend_yaml().contains("incus") { "1s" } else { "500ms" },
        );
        std::fs::write(dir.path().join("ciscale.yaml"), config).expect("write config");
        let world =
            FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
                .expect("open the fake world");
        world.keep_journal();
        Self { dir, world, backdrop, runs: 0, log: Vec::new() }
    }

    /// The pre-registered agents of the start/stop pool, as a Picus user registers them once by hand.
    async fn register_adopted_agents(&self) {
        for (_, agent) in self.backdrop.adopted() {
            self.world
                .ci()
                .register(&RegisterAgent { name: agent, pool: PoolName::new("s"), labels: job_for("s"), for_job: None })
                .await
                .expect("register an adopted instance's agent");
        }
    }

    fn spawn(&mut self) -> Watch {
        self.runs += 1;
        let log = std::fs::File::create(self.run_log(self.runs)).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_ciscale"));
        command
            .current_dir(self.dir.path())
            .args(["watch", "-c", "ciscale.yaml"])
            .env_remove("CISCALE_LOG")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_ENDPOINT_URL")
            .env_remove("AWS_ENDPOINT_URL_EC2")
            .env("NO_COLOR", "1")
            .env("CISCALE_LOCK_DIR", self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        for (key, value) in self.backdrop.env(self.dir.path()) {
            command.env(key, value);
        }
        Watch(command.spawn().expect("start ciscale watch"))
    }

    fn run_log(&self, run: usize) -> PathBuf {
        self.dir.path().join(format!("run-{run}.log"))
    }

    /// The logs of the last few runs, for a failure message.
    fn last_logs(&self) -> String {
        let first = self.runs.saturating_sub(2).max(1);
        (first..=self.runs)
            .map(|run| {
                let text = std::fs::read_to_string(self.run_log(run)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                format!("--- run {run} (last lines) ---\n{}", tail.join("\n"))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn note(&mut self, line: String) {
        eprintln!("[crash {}] {line}", self.backdrop.name());
        self.log.push(line);
    }

    /// Kills `child` with SIGKILL and reaps it; fails the test if it had ended on its own.
    fn kill(&self, child: &mut Child) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("`ciscale watch` ended on its own ({status}) before the kill\n{}", self.last_logs());
        }
        child.kill().expect("SIGKILL");
        drop(child.wait());
    }

    /// Waits for a hold armed for `target` to fire; `true` when it did.
    async fn wait_held(&self, target: Target, ci_before: usize, backend_before: usize, child: &mut Child) -> bool {
        let deadline = Instant::now() + TARGET_PATIENCE;
        while Instant::now() < deadline {
            let state = self.world.snapshot();
            let fired = match target.ci_op() {
                Some(_) => state.held.len() > ci_before,
                None => self.backdrop.held(&state) > backend_before,
            };
            if fired {
                return true;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("`ciscale watch` ended on its own ({status})\n{}", self.last_logs());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    }

    /// What a run did since `from` (journal lengths): the fake world's operations, then the backend's.
    fn ops_since(&self, from: (usize, usize)) -> Vec<String> {
        let state = self.world.snapshot();
        let journal = state.journal.unwrap_or_default();
        let world = journal.iter().skip(from.0).map(|entry| format!("{} {}", entry.op, entry.target));
        let backend = self.backend_log().into_iter().skip(from.1).map(|op| format!("backend.{op}"));
        world.chain(backend).collect()
    }

    /// The operation names alone (for the coverage summary).
    fn op_names(ops: &[String]) -> impl Iterator<Item = String> + '_ {
        ops.iter().map(|op| op.split_whitespace().next().unwrap_or_default().to_owned())
    }

    fn backend_log(&self) -> Vec<String> {
        self.backdrop.backend_log()
    }

    fn journal_len(&self) -> (usize, usize) {
        (self.world.snapshot().journal.map_or(0, |journal| journal.len()), self.backend_log().len())
    }

    async fn run(mut self) {
        let mut schedule = Schedule::new();
        let kills = kills();
        let name = self.backdrop.name();
        self.note(format!(
            "seed {} ({kills} kills; replay with CISCALE_CRASH_SEED={} CISCALE_CRASH_KILLS={kills})",
            schedule.seed, schedule.seed
        ));
        self.register_adopted_agents().await;

        // The machines and the jobs, in the background: the backdrop keeps the fake CI in step with what runs, and
        // jobs for both pools arrive every few hundred milliseconds (at most 3 waiting), each running 0–3 s.
        let (stop_tx, stop) = tokio::sync::watch::channel(false);
        let syncer = {
            let (backdrop, world, mut stop) = (self.backdrop.clone(), self.world.clone(), stop.clone());
            tokio::spawn(async move {
                loop {
                    backdrop.sync(&world).await;
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_millis(100)) => {}
                        _ = stop.changed() => return,
                    }
                }
            })
        };
        let jobs_pushed = Arc::new(Mutex::new(0usize));
        let (jobs_stop_tx, mut jobs_stop) = tokio::sync::watch::channel(false);
        let jobs = {
            let (world, pushed) = (self.world.clone(), jobs_pushed.clone());
            // Its own stream of the same seed: the jobs do not shift with the number of kills.
            let mut rng = Schedule::seeded(schedule.seed ^ 0x6a6f_6273);
            tokio::spawn(async move {
                loop {
                    // Bursts with quiet gaps longer than the idle timeout: pools scale up, drain and scale down.
                    let pending = world.snapshot().tasks.iter().filter(|task| task.agent_id.is_none()).count();
                    for _ in pending..rng.rng.random_range(1..4usize) {
                        let pool = if rng.chance(70) { "a" } else { "s" };
                        world.push_task_for(job_for(pool), rng.millis(0..2500));
                        *pushed.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(rng.millis(500..4000)) => {}
                        _ = jobs_stop.changed() => return,
                    }
                }
            })
        };

        let mut child = self.spawn();
        let mut targeted_hits: BTreeMap<String, usize> = BTreeMap::new();
        let mut random_kills = 0;
        let mut covered: BTreeSet<String> = BTreeSet::new();
        let targets: Vec<Target> =
            TARGETS.into_iter().filter(|target| target.ci_op().is_some() || self.backdrop.supports(*target)).collect();
        let mut next_target = 0;
        for kill in 1..=kills {
            let journal_before = self.journal_len();
            let targeted = schedule.chance(50);
            let mut what = String::new();
            if targeted {
                let target = targets[next_target % targets.len()];
                next_target += 1;
                let state = self.world.snapshot();
                let (ci_before, backend_before) = (state.held.len(), self.backdrop.held(&state));
                match target.ci_op() {
                    Some(op) => self.world.hold_after(op, HOLD),
                    None => self.backdrop.arm(target, &self.world),
                }
                if matches!(target, Target::Create | Target::Register) {
                    // A burst for the create pool: it scales up towards `max`, where a create too many shows.
                    for _ in 0..schedule.rng.random_range(2..4usize) {
                        self.world.push_task_for(job_for("a"), schedule.millis(500..3000));
                        *jobs_pushed.lock().unwrap_or_else(|p| p.into_inner()) += 1;
                    }
                }
                if self.wait_held(target, ci_before, backend_before, &mut child).await {
                    what = format!("right after {target:?}");
                    *targeted_hits.entry(format!("{target:?}")).or_default() += 1;
                } else {
                    what = format!("random: no {target:?} within {}s", TARGET_PATIENCE.as_secs());
                }
                self.world.update(|state| state.holds.clear());
                self.backdrop.disarm(&self.world);
            }
            if what.is_empty() || what.starts_with("random") {
                // Half of them at a random delay after the (re)start; the other half at a random moment once the
                // run has started to act (mid-apply, between its steps), or at the delay if it stays quiet.
                let delay = schedule.millis(0..2000);
                let during_apply = schedule.chance(50);
                let deadline = Instant::now() + delay;
                let since = self.journal_len();
                let waited;
                if during_apply {
                    let patience = Instant::now() + TARGET_PATIENCE;
                    while self.journal_len() == since && Instant::now() < patience {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    let extra = schedule.millis(AFTER_ACTIVITY);
                    tokio::time::sleep(extra).await;
                    waited = format!("{} ms after the run's first step", extra.as_millis());
                } else {
                    tokio::time::sleep_until(deadline.into()).await;
                    waited = format!("after {} ms", delay.as_millis());
                }
                what = format!("{what}{}{waited}", if what.is_empty() { "" } else { "; " });
                random_kills += 1;
            }
            self.kill(&mut child);
            drop(child);
            let ops = self.ops_since(journal_before);
            covered.extend(Self::op_names(&ops));
            self.note(format!("kill {kill}/{kills} {what}; the run did: [{}]", ops.join(", ")));
            if schedule.chance(50) {
                tokio::time::sleep(schedule.millis(0..300)).await;
            }
            child = self.spawn();
        }

        // Quiet down: no more jobs; the last run converges.
        jobs_stop_tx.send_replace(true);
        drop(jobs.await);
        let adopted_agents: BTreeSet<String> = self.backdrop.adopted().into_iter().map(|(_, agent)| agent).collect();
        let deadline = Instant::now() + CONVERGE_DEADLINE;
        let (created, running) = loop {
            let state = self.world.snapshot();
            let created = self.backdrop.created_live().await;
            let running = self.backdrop.adopted_running().await;
            let agents: BTreeSet<String> = state.agents.iter().map(|agent| agent.name.clone()).collect();
            if state.tasks.is_empty() && created.is_empty() && running.is_empty() && agents == adopted_agents {
                break (created, running);
            }
            if Instant::now() > deadline {
                break (created, running);
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("`ciscale watch` ended on its own ({status})\n{}", self.last_logs());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
        drop(child.wait());
        stop_tx.send_replace(true);
        drop(syncer.await);

        // The promises.
        let state = self.world.snapshot();
        let seen = Seen {
            creates: self.backdrop.creates(&state),
            losses: self.backdrop.busy_losses(&state),
            journal: state.journal.clone().unwrap_or_default(),
            created_left: created,
            adopted_running: running,
            agents: state.agents.iter().map(|agent| agent.name.clone()).collect(),
            adopted_agents,
            jobs_left: state.tasks.iter().map(|task| task.id.to_string()).collect(),
        };
        let broken = broken_promises(&seen);

        let creates = self.backdrop.creates(&state).len();
        let pushed = *jobs_pushed.lock().unwrap_or_else(|p| p.into_inner());
        self.note(format!(
            "{kills} kills ({random_kills} at random moments, targeted: {targeted_hits:?}); {} runs; {pushed} jobs; {creates} \
             creates reached the backend; operations the killed runs did: {covered:?}",
            self.runs
        ));
        self.backdrop.cleanup().await;
        if std::env::var_os("CISCALE_CRASH_KEEP").is_some() {
            self.dir.disable_cleanup(true);
            let kept = self.dir.path().display().to_string();
            self.note(format!("logs and the world kept in {kept}"));
        }
        assert!(
            broken.is_empty(),
            "crash harness on {name} (seed {}): {} promise(s) broken:\n  {}\n{}",
            schedule.seed,
            broken.len(),
            broken.join("\n  "),
            self.last_logs()
        );
    }
}

/// Everything the promises are checked against: what the backend and the fake CI saw during the run, and the
/// world after convergence.
#[derive(Debug, Default)]
struct Seen {
    /// (pool, its instances right after) for every create that reached the backend.
    creates: Vec<(String, Vec<String>)>,
    /// Instances deleted or stopped while their agent ran a job (the backdrop's own account).
    losses: Vec<String>,
    /// The fake world's journal (the CI's operations, and the backend's on the fake world).
    journal: Vec<ciscale::providers::fake::JournalEntry>,
    created_left: Vec<String>,
    adopted_running: Vec<String>,
    agents: BTreeSet<String>,
    adopted_agents: BTreeSet<String>,
    jobs_left: Vec<String>,
}

/// Every broken promise, in words; empty when all held.
fn broken_promises(seen: &Seen) -> Vec<String> {
    let mut broken = Vec::new();
    for (pool, instances) in &seen.creates {
        let max = if pool == "a" { MAX } else { 2 };
        if instances.len() > max {
            broken.push(format!(
                "pool `{pool}` had {} instances right after a create (max {max}): {instances:?}",
                instances.len()
            ));
        }
    }
    broken.extend(seen.losses.iter().cloned());
    for entry in seen.journal.iter().filter(|entry| entry.op == "ci.deregister") {
        if entry.busy_agents.contains(&entry.target) {
            broken.push(format!("agent `{}` was deregistered while it ran a job", entry.target));
        }
    }
    if !seen.created_left.is_empty() {
        broken.push(format!("instances of the create pool left after convergence: {:?}", seen.created_left));
    }
    if !seen.adopted_running.is_empty() {
        broken.push(format!("adopted instances still running after convergence: {:?}", seen.adopted_running));
    }
    let orphans: Vec<&String> = seen.agents.difference(&seen.adopted_agents).collect();
    if !orphans.is_empty() {
        broken.push(format!("agent records left without an instance: {orphans:?}"));
    }
    let missing: Vec<&String> = seen.adopted_agents.difference(&seen.agents).collect();
    if !missing.is_empty() {
        broken.push(format!("pre-registered agents removed: {missing:?}"));
    }
    if !seen.jobs_left.is_empty() {
        broken.push(format!("jobs that never finished: {:?}", seen.jobs_left));
    }
    // Once is enough: a create retried for a name that exists reports the same instances again.
    let mut reported = BTreeSet::new();
    broken.retain(|line| reported.insert(line.clone()));
    broken
}

/// (pool, instances of it right after) for every create in the fake world's journal, which counts them: the
/// names are placeholders but for the one created.
fn fake_journal_creates(state: &WorldState) -> Vec<(String, Vec<String>)> {
    state
        .journal
        .iter()
        .flatten()
        .filter(|entry| entry.op == "backend.create")
        .map(|entry| {
            let others = (entry.in_pool.unwrap_or(1) as usize).saturating_sub(1);
            let mut names = vec!["(another)".to_owned(); others];
            names.push(entry.target.clone());
            (entry.pool.clone().unwrap_or_default(), names)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------------------------
// The fake world
// ---------------------------------------------------------------------------------------------------------------

struct FakeBackdrop {
    world: FakeWorld,
}

const FAKE_ADOPTED: [(&str, &str); 2] = [("fake-adopted-1", "s-agent-1"), ("fake-adopted-2", "s-agent-2")];

#[async_trait::async_trait]
impl Backdrop for FakeBackdrop {
    fn name(&self) -> &'static str {
        "the fake world"
    }
    fn backend_yaml(&self) -> String {
        "{ kind: fake, stateFile: world.json }".to_owned()
    }
    fn machine_yaml(&self) -> String {
        "{ serverType: small }".to_owned()
    }
    fn adopted(&self) -> Vec<(String, String)> {
        FAKE_ADOPTED.iter().map(|(id, agent)| ((*id).to_owned(), (*agent).to_owned())).collect()
    }
    async fn sync(&self, _world: &FakeWorld) {}
    async fn created_live(&self) -> Vec<String> {
        let state = self.world.snapshot();
        state
            .instances
            .iter()
            .filter(|instance| instance.labels.get(POOL_LABEL).map(String::as_str) == Some("a"))
            .map(|instance| instance.name.clone())
            .collect()
    }
    async fn adopted_running(&self) -> Vec<String> {
        let state = self.world.snapshot();
        state
            .instances
            .iter()
            .filter(|instance| {
                instance.id.as_str().starts_with("fake-adopted-") && instance.state == InstanceState::Running
            })
            .map(|instance| instance.name.clone())
            .collect()
    }
    fn supports(&self, target: Target) -> bool {
        matches!(target, Target::Create | Target::Delete | Target::Stop | Target::Start)
    }
    fn arm(&self, target: Target, world: &FakeWorld) {
        let op = match target {
            Target::Delete => Op::Delete,
            Target::Stop => Op::Stop,
            Target::Start => Op::Start,
            _ => Op::Create,
        };
        world.hold_after(op, HOLD);
    }
    fn disarm(&self, world: &FakeWorld) {
        world.update(|state| state.holds.clear());
    }
    fn held(&self, world: &WorldState) -> usize {
        world.held.iter().filter(|op| op.starts_with("backend.")).count()
    }
    fn creates(&self, world: &WorldState) -> Vec<(String, Vec<String>)> {
        fake_journal_creates(world)
    }
    fn busy_losses(&self, world: &WorldState) -> Vec<String> {
        world
            .journal
            .iter()
            .flatten()
            .filter(|entry| matches!(entry.op.as_str(), "backend.delete" | "backend.stop"))
            .filter(|entry| entry.busy_agents.contains(&entry.target))
            .map(|entry| format!("instance `{}`: {} while its agent ran a job", entry.target, entry.op))
            .collect()
    }
    async fn cleanup(&self) {}
}

/// CI holds and backend holds both live in the fake world here: the backend's are the `backend.*` ones.
#[tokio::test(flavor = "multi_thread")]
async fn kill_9_anywhere_on_the_fake_world() {
    let dir = tempfile::tempdir().expect("temp dir");
    let world =
        FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
            .expect("open the fake world");
    // The adopted machines exist before ciscale starts, stopped, owned by nobody (adoption names them).
    world.update(|state| {
        for (id, agent) in FAKE_ADOPTED {
            state.instances.push(FakeInstance {
                id: InstanceId::new(id),
                name: agent.to_owned(),
                state: InstanceState::Stopped,
                created_at: state.now(),
                labels: BTreeMap::new(),
                attributes: BTreeMap::new(),
                user_data_sha256: None,
            });
        }
    });
    let backdrop = Arc::new(FakeBackdrop { world: world.clone() });
    Harness::new(backdrop, dir, "crashfake").run().await;
}

// ---------------------------------------------------------------------------------------------------------------
// moto (EC2)
// ---------------------------------------------------------------------------------------------------------------

struct MotoBackdrop {
    proxy: crate::fakes::ec2::Ec2Proxy,
    client: aws_sdk_ec2::Client,
    owner: String,
    adopted: Vec<(String, String)>,
    losses: Arc<Mutex<Vec<String>>>,
}

impl MotoBackdrop {
    /// An instance's `Name`: an adopted one's agent, or the name ciscale launched it with.
    fn name_of(&self, id: &str) -> String {
        let adopted = self.adopted.iter().find(|(adopted, _)| adopted == id).map(|(_, agent)| agent.clone());
        adopted.or_else(|| self.proxy.name_of(id)).unwrap_or_else(|| id.to_owned())
    }

    /// (id, `Name`, state) of the owner's instances and the adopted ones.
    async fn instances(&self) -> Vec<(String, String, aws_sdk_ec2::types::InstanceStateName)> {
        let mut instances = crate::aws::moto_instances(&self.client, &self.owner).await;
        for (id, agent) in &self.adopted {
            instances.push((id.clone(), agent.clone(), crate::aws::moto_state(&self.client, id).await));
        }
        instances
    }
}

#[async_trait::async_trait]
impl Backdrop for MotoBackdrop {
    fn name(&self) -> &'static str {
        "moto"
    }
    fn backend_yaml(&self) -> String {
        format!("{{ kind: aws, region: us-east-1, endpoint: \"{}\" }}", self.proxy.url)
    }
    fn machine_yaml(&self) -> String {
        format!("{{ instanceType: t3.micro, ami: {} }}", crate::aws::AMI)
    }
    fn adopted(&self) -> Vec<(String, String)> {
        self.adopted.clone()
    }
    fn env(&self, dir: &Path) -> Vec<(String, String)> {
        // Empty AWS config files of its own: nothing from the machine's AWS set-up, no instance-metadata lookups.
        let empty = dir.join("aws-empty");
        drop(std::fs::write(&empty, ""));
        let empty = empty.display().to_string();
        [
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
            ("AWS_CONFIG_FILE", empty.as_str()),
            ("AWS_SHARED_CREDENTIALS_FILE", empty.as_str()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
    }
    async fn sync(&self, world: &FakeWorld) {
        let running: Vec<String> = self
            .instances()
            .await
            .into_iter()
            .filter(|(_, _, state)| *state == aws_sdk_ec2::types::InstanceStateName::Running)
            .map(|(_, name, _)| name)
            .collect();
        world.update(|state| state.external_running = running);
    }
    async fn created_live(&self) -> Vec<String> {
        crate::aws::moto_instances(&self.client, &self.owner)
            .await
            .into_iter()
            .filter(|(_, _, state)| {
                !matches!(
                    state,
                    aws_sdk_ec2::types::InstanceStateName::Terminated
                        | aws_sdk_ec2::types::InstanceStateName::ShuttingDown
                )
            })
            .map(|(_, name, _)| name)
            .collect()
    }
    async fn adopted_running(&self) -> Vec<String> {
        let mut running = Vec::new();
        for (id, agent) in &self.adopted {
            let state = crate::aws::moto_state(&self.client, id).await;
            if state != aws_sdk_ec2::types::InstanceStateName::Stopped {
                running.push(format!("{agent} ({state})"));
            }
        }
        running
    }
    fn supports(&self, target: Target) -> bool {
        target == Target::Create
    }
    fn arm(&self, _target: Target, _world: &FakeWorld) {
        self.proxy.set_hold(Some(HOLD));
    }
    fn disarm(&self, _world: &FakeWorld) {
        self.proxy.set_hold(None);
    }
    fn held(&self, _world: &WorldState) -> usize {
        self.proxy.held() as usize
    }
    fn creates(&self, _world: &WorldState) -> Vec<(String, Vec<String>)> {
        self.proxy
            .journal()
            .into_iter()
            .filter_map(|event| match event {
                crate::fakes::ec2::Ec2Event::Launch { pool, live_in_pool, .. } => Some((pool, live_in_pool)),
                _ => None,
            })
            .collect()
    }
    fn busy_losses(&self, _world: &WorldState) -> Vec<String> {
        self.losses.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn backend_log(&self) -> Vec<String> {
        self.proxy
            .journal()
            .iter()
            .map(|event| match event {
                crate::fakes::ec2::Ec2Event::Launch { name, .. } => format!("create {name}"),
                crate::fakes::ec2::Ec2Event::Terminate { id } => format!("delete {}", self.name_of(id)),
                crate::fakes::ec2::Ec2Event::Stop { id } => format!("stop {}", self.name_of(id)),
                crate::fakes::ec2::Ec2Event::Start { id } => format!("start {}", self.name_of(id)),
            })
            .collect()
    }
    async fn cleanup(&self) {
        for (id, _, _) in self.instances().await {
            drop(self.client.terminate_instances().instance_ids(id).send().await);
        }
    }
}

/// A hook for the backend proxies: before an instance is deleted or stopped, is the agent of `agent_name` busy?
fn busy_check(world: FakeWorld, losses: Arc<Mutex<Vec<String>>>) -> impl Fn(&str, &str) + Send + Sync {
    move |action: &str, agent_name: &str| {
        if action == "start" {
            return;
        }
        let state = world.snapshot();
        let busy = state.agents.iter().any(|agent| {
            agent.name == agent_name && state.tasks.iter().any(|task| task.agent_id.as_ref() == Some(&agent.id))
        });
        if busy {
            losses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(format!("instance of agent `{agent_name}`: {action} while its agent ran a job"));
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_anywhere_on_moto() {
    let Some(endpoint) = crate::aws::moto() else { return };
    let proxy = crate::fakes::ec2::Ec2Proxy::start(&endpoint).await;
    // EC2 lists a new instance a moment after it launched; a restarted ciscale must not take that moment for
    // "nothing there" (a second instance of the name, or one too many for `max`).
    proxy.set_listing_lag(Duration::from_secs(1));
    let client = crate::aws::sdk_client(&endpoint);
    let owner = format!("crashmoto{}", std::process::id());
    let mut adopted = Vec::new();
    for index in 1..=2 {
        let agent = format!("s-agent-{index}");
        adopted.push((crate::aws::launch_plain_instance(&client, &agent).await, agent));
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let world =
        FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
            .expect("open the fake world");
    let losses = Arc::new(Mutex::new(Vec::new()));
    let names: BTreeMap<String, String> = adopted.iter().cloned().collect();
    let check = busy_check(world.clone(), losses.clone());
    let named = proxy.clone();
    proxy.set_hook(Arc::new(move |action: &str, id: &str| {
        let action = match action {
            "TerminateInstances" => "delete",
            "StopInstances" => "stop",
            _ => "start",
        };
        let name = names.get(id).cloned().or_else(|| named.name_of(id)).unwrap_or_else(|| id.to_owned());
        check(action, &name);
    }));
    let backdrop = Arc::new(MotoBackdrop { proxy, client, owner: owner.clone(), adopted, losses });
    Harness::new(backdrop, dir, &owner).run().await;
}

// ---------------------------------------------------------------------------------------------------------------
// Incus
// ---------------------------------------------------------------------------------------------------------------

struct IncusBackdrop {
    proxy: crate::fakes::incus_proxy::IncusProxy,
    /// Targeted creates so far: they alternate between holding the request and holding the answer.
    armed: std::sync::atomic::AtomicUsize,
    incus: ciscale::providers::incus::Incus,
    image: String,
    owner: String,
    adopted: Vec<(String, String)>,
    losses: Arc<Mutex<Vec<String>>>,
}

impl IncusBackdrop {
    async fn adopted_states(&self) -> Vec<(String, InstanceState)> {
        use ciscale::providers::Backend as _;
        let mut states = Vec::new();
        for (id, _) in &self.adopted {
            let state = self.incus.get(&InstanceId::new(id.clone())).await.map(|instance| instance.state);
            states.push((id.clone(), state.unwrap_or(InstanceState::Unknown)));
        }
        states
    }
}

/// A failing run must not leave containers on the shared daemon: the owner's and the adopted ones go.
impl Drop for IncusBackdrop {
    fn drop(&mut self) {
        let owned = Command::new("incus")
            .args(["list", &format!("user.ciscale.owner={}", self.owner), "--format", "csv", "--columns", "n"])
            .output()
            .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
            .unwrap_or_default();
        let adopted = self.adopted.iter().map(|(id, _)| id.clone());
        for name in owned.lines().map(str::to_owned).chain(adopted) {
            drop(Command::new("incus").args(["delete", "--force", &name]).output());
        }
    }
}

#[async_trait::async_trait]
impl Backdrop for IncusBackdrop {
    fn name(&self) -> &'static str {
        "incus"
    }
    fn backend_yaml(&self) -> String {
        format!("{{ kind: incus, socket: \"{}\" }}", self.proxy.socket.display())
    }
    fn machine_yaml(&self) -> String {
        format!("{{ image: {} }}", self.image)
    }
    fn adopted(&self) -> Vec<(String, String)> {
        self.adopted.clone()
    }
    async fn sync(&self, world: &FakeWorld) {
        let mut running: Vec<String> = crate::incus::owned(&self.incus, &self.owner)
            .await
            .into_iter()
            .filter(|instance| instance.state == InstanceState::Running)
            .map(|instance| instance.name)
            .collect();
        for (id, state) in self.adopted_states().await {
            if state == InstanceState::Running {
                running.push(id);
            }
        }
        world.update(|state| state.external_running = running);
    }
    async fn created_live(&self) -> Vec<String> {
        crate::incus::owned(&self.incus, &self.owner)
            .await
            .into_iter()
            .filter(|instance| !matches!(instance.state, InstanceState::Deleting | InstanceState::Terminated))
            .map(|instance| instance.name)
            .collect()
    }
    async fn adopted_running(&self) -> Vec<String> {
        self.adopted_states()
            .await
            .into_iter()
            .filter(|(_, state)| *state != InstanceState::Stopped)
            .map(|(id, state)| format!("{id} ({state})"))
            .collect()
    }
    fn supports(&self, target: Target) -> bool {
        target == Target::Create
    }
    fn arm(&self, _target: Target, _world: &FakeWorld) {
        if self.armed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2 == 0 {
            // Long enough for the next run to start and look before incusd acts on the dead run's create.
            self.proxy.set_hold_request(Some(LATE_CREATE));
        } else {
            self.proxy.set_hold(Some(HOLD));
        }
    }
    fn disarm(&self, _world: &FakeWorld) {
        self.proxy.set_hold(None);
    }
    fn held(&self, _world: &WorldState) -> usize {
        self.proxy.held() as usize
    }
    fn creates(&self, _world: &WorldState) -> Vec<(String, Vec<String>)> {
        self.proxy
            .journal()
            .into_iter()
            .filter_map(|event| match event {
                crate::fakes::incus_proxy::IncusEvent::Create { pool, live_in_pool, .. } => Some((pool, live_in_pool)),
                _ => None,
            })
            .collect()
    }
    fn busy_losses(&self, _world: &WorldState) -> Vec<String> {
        self.losses.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn backend_log(&self) -> Vec<String> {
        self.proxy
            .journal()
            .iter()
            .map(|event| match event {
                crate::fakes::incus_proxy::IncusEvent::Create { name, .. } => format!("create {name}"),
                crate::fakes::incus_proxy::IncusEvent::Gone { name } => format!("delete {name}"),
                crate::fakes::incus_proxy::IncusEvent::Stop { name } => format!("stop {name}"),
                crate::fakes::incus_proxy::IncusEvent::Start { name } => format!("start {name}"),
            })
            .collect()
    }
    async fn cleanup(&self) {
        crate::incus::cleanup(&self.incus, &self.owner).await;
        for (id, _) in &self.adopted {
            drop(Command::new("incus").args(["delete", "--force", id]).output());
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_anywhere_on_incus() {
    let Some((incus, image)) = crate::incus::daemon() else { return };
    let owner = crate::incus::owner("crash");
    let dir = tempfile::tempdir().expect("temp dir");
    // Persistent containers nobody owns, stopped: what start/stop mode adopts (named like their agents).
    let mut adopted = Vec::new();
    for index in 1..=2 {
        let name = format!("{owner}-s-agent-{index}");
        drop(Command::new("incus").args(["delete", "--force", &name]).output());
        let created = Command::new("incus").args(["init", &image, &name]).output().expect("incus init");
        assert!(created.status.success(), "incus init: {}", String::from_utf8_lossy(&created.stderr));
        adopted.push((name.clone(), name));
    }
    let socket = std::env::var("CISCALE_TEST_INCUS_SOCKET").expect("socket");
    let proxy =
        crate::fakes::incus_proxy::IncusProxy::start(&dir.path().join("incus.socket"), Path::new(&socket), &owner);
    let world =
        FakeWorld::open(&FakeSpec { state_file: Some(dir.path().join("world.json")), simulate: false, jobs: None })
            .expect("open the fake world");
    let losses = Arc::new(Mutex::new(Vec::new()));
    proxy.set_hook(Arc::new(busy_check(world.clone(), losses.clone())));
    let backdrop =
        Arc::new(IncusBackdrop { proxy, armed: 0.into(), incus, image, owner: owner.clone(), adopted, losses });
    Harness::new(backdrop, dir, &owner).run().await;
}

// ---------------------------------------------------------------------------------------------------------------
// The checks themselves: each promise, broken on purpose, is reported
// ---------------------------------------------------------------------------------------------------------------

#[test]
fn every_broken_promise_is_reported_and_a_clean_run_passes() {
    let names = |names: &[&str]| names.iter().map(|name| (*name).to_owned()).collect::<BTreeSet<String>>();
    let clean = || Seen {
        creates: vec![("a".to_owned(), vec!["x".to_owned(); MAX]), ("a".to_owned(), vec!["x".to_owned()])],
        agents: names(&["s-agent-1"]),
        adopted_agents: names(&["s-agent-1"]),
        ..Seen::default()
    };
    assert_eq!(broken_promises(&clean()), Vec::<String>::new());
    let cases: Vec<(&str, Seen)> = vec![
        ("above max", Seen { creates: vec![("a".to_owned(), vec!["x".to_owned(); MAX + 1])], ..clean() }),
        ("busy loss", Seen { losses: vec!["instance `x`: delete while its agent ran a job".to_owned()], ..clean() }),
        ("left instance", Seen { created_left: vec!["o-a-1".to_owned()], ..clean() }),
        ("adopted running", Seen { adopted_running: vec!["s-agent-1".to_owned()], ..clean() }),
        ("orphan record", Seen { agents: names(&["s-agent-1", "o-a-3"]), ..clean() }),
        ("pre-registered removed", Seen { agents: names(&[]), ..clean() }),
        ("job left", Seen { jobs_left: vec!["t7".to_owned()], ..clean() }),
    ];
    for (case, seen) in cases {
        assert_eq!(broken_promises(&seen).len(), 1, "{case}: {:?}", broken_promises(&seen));
    }
}

/// The fake world's journal, as the harness reads it, tells a busy agent's instance deleted (and the agent
/// deregistered) from an idle one's.
#[tokio::test]
async fn the_journal_sees_a_busy_agent_lose_its_instance_and_its_record() {
    let world = FakeWorld::new();
    world.keep_journal();
    let (backend, ci) = (world.backend(), world.ci());
    let mut agents = Vec::new();
    for name in ["o-a-1", "o-a-2"] {
        let mut request = crate::conformance::owned_request("o", name);
        request.labels.insert(POOL_LABEL.to_owned(), "a".to_owned());
        let instance = ciscale::providers::Backend::create(&backend, &request).await.expect("create");
        ciscale::providers::Backend::get(&backend, &instance.id).await.expect("boots");
        let registered = ci
            .register(&RegisterAgent {
                name: name.to_owned(),
                pool: PoolName::new("a"),
                labels: job_for("a"),
                for_job: None,
            })
            .await
            .expect("register");
        agents.push((instance.id, registered.agent_id));
    }
    // o-a-1 takes the one job; o-a-2 stays idle.
    world.push_task_for(job_for("a"), Duration::from_secs(600));
    world.simulate();
    for (instance, agent) in &agents {
        ciscale::providers::Backend::delete(&backend, instance).await.expect("delete");
        ci.deregister(agent).await.expect("deregister");
    }
    let state = world.snapshot();
    let seen = Seen {
        creates: fake_journal_creates(&state),
        losses: FakeBackdrop { world: world.clone() }.busy_losses(&state),
        journal: state.journal.clone().unwrap_or_default(),
        ..Seen::default()
    };
    let counts: Vec<(&str, usize)> = seen.creates.iter().map(|(pool, names)| (pool.as_str(), names.len())).collect();
    assert_eq!(counts, vec![("a", 1), ("a", 2)]);
    assert_eq!(
        broken_promises(&seen),
        vec![
            "instance `o-a-1`: backend.delete while its agent ran a job".to_owned(),
            "agent `o-a-1` was deregistered while it ran a job".to_owned(),
        ]
    );
}

/// The proxies' hook: a machine lost while its agent runs a job is reported, an idle one's is not.
#[tokio::test]
async fn the_proxy_hook_tells_a_busy_agent_from_an_idle_one() {
    let world = FakeWorld::new();
    world.set_instances_elsewhere(true);
    for name in ["busy", "idle"] {
        world
            .ci()
            .register(&RegisterAgent {
                name: name.to_owned(),
                pool: PoolName::new("a"),
                labels: job_for("a"),
                for_job: None,
            })
            .await
            .expect("register");
    }
    world.push_task_for(job_for("a"), Duration::from_secs(600));
    world.simulate();
    let busy_name =
        world.snapshot().agents.iter().find(|agent| agent.last_work.is_some()).expect("one took it").name.clone();
    let idle_name = if busy_name == "busy" { "idle" } else { "busy" };
    let losses = Arc::new(Mutex::new(Vec::new()));
    let check = busy_check(world, losses.clone());
    check("delete", idle_name);
    check("start", &busy_name);
    assert!(losses.lock().expect("losses").is_empty());
    check("stop", &busy_name);
    assert_eq!(losses.lock().expect("losses").len(), 1);
}
