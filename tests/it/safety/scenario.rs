//! Histories of a shared world: two deployments (ours, and theirs whose owner id shares a prefix with ours) with
//! their configs, and a list of [`Step`]s — jobs arrive, a deployment runs a cycle (plan → check → apply, maybe
//! dying half-way or with a listing that lags), agents check in, take and finish jobs, a drain loses its race,
//! people register look-alike agents, time passes, our config changes, a plan is saved and applied a cycle late.
//!
//! [`run`] plays a history and judges every plan any deployment makes with the oracle, against the truth at that
//! moment; a saved plan is judged again against the world it is applied to, after the saved-plan check.

use std::fmt::Write as _;

use std::collections::BTreeMap;

use ciscale::model::{
    AdoptedInstance, AgentId, AgentRef, AgentSpec, BackendBinding, BackendKind, BackendName, BackendSpec, Billing,
    CiBinding, CiKind, CiName, CiSourceSpec, Desired, FakeSpec, GoDuration, InstanceId, InstanceMode, InstanceState,
    Observed, PoolName, PoolSpec, ScalePolicy,
};
use ciscale::plan::{self, Change, Plan};
use jiff::Timestamp;

use super::oracle::{self, Truth, Violation};
use super::world::{BusySign, Maker, World, BACKEND, CI};

pub const NOW: &str = "2026-03-02T09:00:00Z";

/// Owner ids of the two deployments: every pair shares a prefix, and one is the other plus `-...`.
pub const OWNER_PAIRS: [(&str, &str); 6] =
    [("acme", "acme-arm"), ("acme-arm", "acme"), ("ci", "ci-2"), ("a", "a-a"), ("acme", "acme-acme"), ("x-1", "x")];
/// Pool names with `-` that share prefixes, so `{owner}-{pool}` of one deployment can spell another's.
pub const POOL_NAMES: [&str; 6] = ["linux", "arm", "arm-linux", "linux-arm", "linux-2", "acme"];
pub const PLATFORMS: [&str; 2] = ["linux", "arm"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefStyle {
    /// No reference: the agent is named like the instance.
    SameName,
    ByName,
    ById,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PoolMode {
    Create,
    /// Picus mode: one hand-registered agent runs on the pool's one instance. `look` picks its name.
    Preregistered {
        by_id: bool,
        look: u8,
    },
    /// Adopted instances (made by hand, `running` or stopped), started and stopped, never created or deleted.
    StartStop {
        adopted: u8,
        refs: RefStyle,
        look: u8,
        running: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolDraft {
    pub name: usize,
    pub platform: usize,
    pub min: u32,
    pub max: u32,
    pub min_idle: u32,
    pub idle_timeout_min: u32,
    pub bootstrap_timeout_min: u32,
    /// Agents run one job, then power their instance off (create mode only).
    pub ephemeral: bool,
    pub mode: PoolMode,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigChange {
    /// The pool leaves the config: its instances become orphans.
    RemovePool(u8),
    /// A new agent image: every instance of the pool drifts.
    BumpImage(u8),
    LowerMax(u8),
    RaiseMax(u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Jobs {
        platform: usize,
        count: u8,
    },
    /// Deployment `who` plans, the plan is judged, then carried out (the change at `crash` dies half-way; with
    /// `late` the instances it creates are not listed until time passes; with `slow` its creates stay in flight
    /// until [`Step::Finish`]).
    Cycle {
        who: usize,
        crash: Option<u8>,
        late: bool,
        slow: bool,
    },
    /// Deployment `who`'s creates in flight finish (`late`: their instances are not listed until time passes).
    Finish {
        who: usize,
        late: bool,
    },
    CheckIn {
        mask: u32,
    },
    TakeJobs {
        mask: u32,
    },
    DrainedTakesJob {
        skip: u8,
    },
    FinishJobs {
        mask: u32,
    },
    Advance {
        minutes: i64,
    },
    /// A person registers an agent whose name looks like a deployment's (see [`look_alike`]).
    HandRegister {
        look: u8,
        pick: u8,
        standalone: bool,
        platform: usize,
    },
    Config(ConfigChange),
    /// Our deployment plans (`plan --out`; judged as usual) and keeps the plan for later.
    SavePlan,
    /// The kept plan is applied now (`apply PLANFILE`): changes that pass the saved-plan check are judged against
    /// today's world.
    ApplySaved,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scenario {
    pub owners: usize,
    pub ours: Vec<PoolDraft>,
    /// Empty: no second deployment.
    pub theirs: Vec<PoolDraft>,
    pub busy_sign: BusySign,
    pub keeps_terminated: bool,
    pub steps: Vec<Step>,
}

/// One deployment's config as it evolves, with the ids of the hand-made records it names.
#[derive(Debug, Clone)]
struct Deployment {
    owner: String,
    pools: Vec<PoolDraft>,
    image: Vec<u32>,
    /// Per pool: the pre-registered agent (id, name).
    preregistered: Vec<Option<(AgentId, String)>>,
    /// Per pool: the adopted instances and how the config names their agent.
    adopted: Vec<Vec<(InstanceId, Option<AgentRef>)>>,
    desired: Option<Desired>,
}

impl Deployment {
    fn desired(&mut self) -> &Desired {
        if self.desired.is_none() {
            self.desired = Some(self.build());
        }
        self.desired.as_ref().expect("just built")
    }

    /// The config [`Self::yaml`] describes, built directly: the config loader derives its JSON schema on every
    /// load, which would cost most of a history's time. `loads_like_the_config_loader` checks that both agree.
    /// The config hash is a digest of the YAML (any change of the config changes it, as the loader's does).
    fn build(&self) -> Desired {
        use sha2::Digest as _;
        let yaml = self.yaml();
        let digest: String = sha2::Sha256::digest(yaml.as_bytes()).iter().map(|byte| format!("{byte:02x}")).collect();
        let pools = self
            .pools
            .iter()
            .enumerate()
            .map(|(index, pool)| {
                let mode = if self.adopted[index].is_empty() {
                    InstanceMode::Create
                } else {
                    InstanceMode::StartStop {
                        instances: self.adopted[index]
                            .iter()
                            .map(|(id, agent)| AdoptedInstance { id: id.clone(), agent: agent.clone() })
                            .collect(),
                    }
                };
                let preregistered = match (&pool.mode, &self.preregistered[index]) {
                    (PoolMode::Preregistered { by_id: true, .. }, Some((id, _))) => Some(AgentRef::Id(id.clone())),
                    (PoolMode::Preregistered { by_id: false, .. }, Some((_, name))) => {
                        Some(AgentRef::Name(name.clone()))
                    }
                    _ => None,
                };
                PoolSpec {
                    name: PoolName::new(POOL_NAMES[pool.name]),
                    ci: CiBinding {
                        source: CiName::new(CI),
                        labels: BTreeMap::from([("platform".to_owned(), PLATFORMS[pool.platform].to_owned())]),
                        capabilities: BTreeMap::new(),
                    },
                    backend: BackendBinding {
                        backend: BackendName::new(BACKEND),
                        mode,
                        machine: BTreeMap::from([("serverType".to_owned(), "small".to_owned())]),
                    },
                    agent: AgentSpec {
                        image: Some(format!("agent:{}", self.image[index])),
                        env: BTreeMap::new(),
                        secret_env: BTreeMap::new(),
                        preregistered,
                    },
                    scale: ScalePolicy {
                        min: pool.min.min(pool.max),
                        max: pool.max,
                        min_idle: pool.min_idle,
                        idle_timeout: GoDuration::from_secs(u64::from(pool.idle_timeout_min) * 60),
                        bootstrap_timeout: GoDuration::from_secs(u64::from(pool.bootstrap_timeout_min) * 60),
                        ephemeral: pool.ephemeral,
                        // Per-second billing: no paid hour to wait for.
                        billing_margin: None,
                        ..ScalePolicy::default()
                    },
                }
            })
            .collect();
        Desired {
            owner: self.owner.clone(),
            poll_interval: GoDuration::from_secs(10),
            ci: BTreeMap::from([(CiName::new(CI), CiSourceSpec { kind: CiKind::Fake(FakeSpec::default()) })]),
            backends: BTreeMap::from([(
                BackendName::new(BACKEND),
                BackendSpec {
                    kind: BackendKind::Fake(FakeSpec::default()),
                    billing: Billing::PerSecond,
                    create_limit: None,
                    change_timeout: None,
                },
            )]),
            pools,
            images: BTreeMap::new(),
            config_hash: format!("sha256:{digest}"),
            metrics: None,
        }
    }

    fn yaml(&self) -> String {
        let mut yaml = format!(
            "id: {}\nci: {{ {CI}: {{ kind: fake }} }}\nbackends: {{ {BACKEND}: {{ kind: fake }} }}\npools:\n",
            self.owner
        );
        for (index, pool) in self.pools.iter().enumerate() {
            let name = POOL_NAMES[pool.name];
            let _ = writeln!(yaml, "  - name: {name}");
            let _ = writeln!(yaml, "    ci: {{ source: {CI}, labels: {{ platform: {} }} }}", PLATFORMS[pool.platform]);
            let _ = write!(yaml, "    backend: {{ name: {BACKEND}, machine: {{ serverType: small }}");
            if !self.adopted[index].is_empty() {
                let _ = write!(yaml, ", startStop: {{ instances: [");
                for (id, reference) in &self.adopted[index] {
                    let agent = match reference {
                        None => String::new(),
                        Some(AgentRef::Id(agent)) => format!(", agentId: \"{agent}\""),
                        Some(AgentRef::Name(agent)) => format!(", agentName: \"{agent}\""),
                    };
                    let _ = write!(yaml, "{{ id: \"{id}\"{agent} }}, ");
                }
                let _ = write!(yaml, "] }}");
            }
            let _ = writeln!(yaml, " }}");
            let _ = write!(yaml, "    agent: {{ image: \"agent:{}\"", self.image[index]);
            match (&pool.mode, &self.preregistered[index]) {
                (PoolMode::Preregistered { by_id: true, .. }, Some((id, _))) => {
                    let _ = write!(yaml, ", preregistered: {{ id: \"{id}\" }}");
                }
                (PoolMode::Preregistered { by_id: false, .. }, Some((_, name))) => {
                    let _ = write!(yaml, ", preregistered: {{ name: \"{name}\" }}");
                }
                _ => {}
            }
            let _ = writeln!(yaml, " }}");
            let _ = writeln!(
                yaml,
                "    scale: {{ min: {}, max: {}, minIdle: {}, idleTimeout: {}m, bootstrapTimeout: {}m, ephemeral: {} }}",
                pool.min.min(pool.max),
                pool.max,
                pool.min_idle,
                pool.idle_timeout_min,
                pool.bootstrap_timeout_min,
                pool.ephemeral
            );
        }
        yaml
    }

    fn change_config(&mut self, change: &ConfigChange) {
        let count = self.pools.len();
        if count == 0 {
            return;
        }
        match *change {
            // A config has at least one pool.
            ConfigChange::RemovePool(_) if count == 1 => return,
            ConfigChange::RemovePool(index) => {
                let index = usize::from(index) % count;
                self.pools.remove(index);
                self.image.remove(index);
                self.preregistered.remove(index);
                self.adopted.remove(index);
            }
            ConfigChange::BumpImage(index) => self.image[usize::from(index) % count] += 1,
            ConfigChange::LowerMax(index) => {
                let pool = &mut self.pools[usize::from(index) % count];
                pool.max = pool.max.saturating_sub(1).max(1);
            }
            ConfigChange::RaiseMax(index) => {
                let pool = &mut self.pools[usize::from(index) % count];
                // A pre-registered agent runs on one instance at most; an adopted pool has only its instances.
                let cap = match &pool.mode {
                    PoolMode::Create => 4,
                    PoolMode::Preregistered { .. } => 1,
                    PoolMode::StartStop { adopted, .. } => u32::from(*adopted),
                };
                pool.max = (pool.max + 1).min(cap);
            }
        }
        self.desired = None;
    }
}

/// A name a person might give an agent, looking like a deployment's. `pick` chooses among existing names and
/// numbers. None of them is what a deployment's own plan would name a record, unless a deployment's naming
/// cannot tell them apart.
fn look_alike(world: &World, ours: &str, theirs: &str, pools: &[PoolDraft], look: u8, pick: u8) -> String {
    let pool = pools.get(usize::from(pick) % pools.len().max(1)).map_or("linux", |pool| POOL_NAMES[pool.name]);
    let existing: Vec<&str> = world
        .agents
        .iter()
        .filter(|agent| matches!(agent.maker, Maker::Deployment(_)))
        .map(|agent| agent.name.as_str())
        .chain(world.instances.iter().filter(|i| matches!(i.maker, Maker::Deployment(_))).map(|i| i.name.as_str()))
        .collect();
    let derived = |mutation: u8| -> Option<String> {
        let base = *existing.get(usize::from(pick) % existing.len().max(1))?;
        Some(match mutation % 4 {
            0 => format!("{base}-old"),
            1 => format!("{base}x"),
            2 => format!("my-{base}"),
            _ => base.rsplit_once('-').map_or_else(|| format!("{base}-"), |(head, _)| head.to_owned()),
        })
    };
    let number = 1 + u32::from(pick) % 4;
    match look % 7 {
        0 => format!("{ours}-runner"),
        // A legacy-looking name `{owner}-{pool}-{n}` with no instance behind it.
        1 => format!("{ours}-{pool}-{number}"),
        2 => format!("{theirs}-runner"),
        3 => derived(pick).unwrap_or_else(|| format!("{ours}-{pool}")),
        4 => format!("{ours}-{pool}"),
        // The agent of a deployment whose owner id extends ours.
        5 => format!("{ours}-x-{pool}-{number}"),
        _ => derived(pick.wrapping_add(1)).unwrap_or_else(|| format!("{ours}-{pool}-runner")),
    }
}

/// One of the promises a run judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Promise {
    /// Promise 1 on every plan (and that every change can be carried out).
    NotOurs,
    /// Promise 2 on every plan.
    NotBusy,
    /// Promise 3 on every plan.
    Max,
    /// Promise 4: a saved plan that kept promises 1–3 when it was made keeps them when applied a cycle late,
    /// after the saved-plan check.
    LateApply,
}

impl Promise {
    pub const ALL: [Promise; 4] = [Promise::NotOurs, Promise::NotBusy, Promise::Max, Promise::LateApply];

    /// The word `CISCALE_ORACLE_PROMISES` lists it by.
    pub fn word(self) -> &'static str {
        match self {
            Promise::NotOurs => "ours",
            Promise::NotBusy => "busy",
            Promise::Max => "max",
            Promise::LateApply => "late",
        }
    }

    /// Its violations among promises 1–3 for a plan made now (promise 4 is judged where a saved plan is applied).
    fn judge(self, desired: &Desired, plan: &Plan, truth: &Truth) -> Vec<Violation> {
        match self {
            Promise::NotOurs => {
                let mut violations = oracle::well_formed(plan);
                violations.extend(oracle::never_touches_foreign(desired, plan, truth));
                violations
            }
            Promise::NotBusy => oracle::never_kills_busy(desired, plan, truth),
            Promise::Max => oracle::never_exceeds_max(desired, plan, truth),
            Promise::LateApply => Vec::new(),
        }
    }
}

/// How a history went wrong.
#[derive(Debug)]
pub struct Failure {
    pub report: String,
}

struct Sim<'p> {
    promises: &'p [Promise],
    world: World,
    deployments: Vec<Deployment>,
    saved: Option<(Plan, Desired)>,
    judged: Judged,
}

/// What a history judged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Judged {
    /// Plans judged when they were made.
    pub plans: usize,
    /// Saved plans judged when applied a cycle late (after the saved-plan check, whatever it left).
    pub late_applies: usize,
}

impl<'p> Sim<'p> {
    fn new(scenario: &Scenario, promises: &'p [Promise]) -> Self {
        let now: Timestamp = NOW.parse().expect("valid timestamp");
        let mut world = World::new(now, scenario.busy_sign, scenario.keeps_terminated);
        let (ours, theirs) = OWNER_PAIRS[scenario.owners % OWNER_PAIRS.len()];
        let mut deployments = Vec::new();
        for (owner, drafts) in [(ours, &scenario.ours), (theirs, &scenario.theirs)] {
            // Pool names are unique within a config.
            let mut pools: Vec<PoolDraft> = Vec::new();
            for draft in drafts {
                if !pools.iter().any(|pool| pool.name == draft.name) {
                    pools.push(draft.clone());
                }
            }
            if pools.is_empty() {
                continue;
            }
            let mut preregistered = Vec::new();
            let mut adopted = Vec::new();
            for pool in &pools {
                let pool_name = POOL_NAMES[pool.name];
                let platform = PLATFORMS[pool.platform];
                preregistered.push(match &pool.mode {
                    PoolMode::Preregistered { look, .. } => {
                        let name = match look % 3 {
                            0 => format!("picus-agent-{pool_name}"),
                            1 => format!("{owner}-{pool_name}-1"),
                            _ => format!("{owner}-runner"),
                        };
                        let id = world.hand_register(&name, platform, false);
                        Some((id, name))
                    }
                    _ => None,
                });
                let mut adoptions = Vec::new();
                if let PoolMode::StartStop { adopted: count, refs, look, running } = &pool.mode {
                    for k in 1..=*count {
                        let name = match look % 2 {
                            0 => format!("builder-{pool_name}-{k}"),
                            _ => format!("{owner}-{pool_name}-{k}"),
                        };
                        let state = if *running { InstanceState::Running } else { InstanceState::Stopped };
                        let instance = world.hand_instance(&name, state);
                        let agent_name = match refs {
                            RefStyle::SameName => name.clone(),
                            RefStyle::ByName | RefStyle::ById => format!("{name}-agent"),
                        };
                        let agent = world.hand_register(&agent_name, platform, false);
                        if let Some(record) = world.agents.iter_mut().find(|record| record.id == agent) {
                            record.runs_on = Some(instance.clone());
                        }
                        let reference = match refs {
                            RefStyle::SameName => None,
                            RefStyle::ByName => Some(AgentRef::Name(agent_name)),
                            RefStyle::ById => Some(AgentRef::Id(agent)),
                        };
                        adoptions.push((instance, reference));
                    }
                }
                adopted.push(adoptions);
            }
            let image = vec![1; pools.len()];
            deployments.push(Deployment {
                owner: owner.to_owned(),
                pools,
                image,
                preregistered,
                adopted,
                desired: None,
            });
        }
        Self { promises, world, deployments, saved: None, judged: Judged::default() }
    }

    fn owner(&self, who: usize) -> &str {
        self.deployments.get(who).map_or("", |deployment| deployment.owner.as_str())
    }

    /// Plans for deployment `who` and judges the plan against the truth now.
    fn plan_and_judge(&mut self, who: usize, step: usize) -> Result<(Plan, Desired, Observed), Failure> {
        let desired = self.deployments[who].desired().clone();
        let observed = self.world.observe(who, &desired);
        let plan = plan::plan(&desired, &observed, self.world.now);
        self.judged.plans += 1;
        let truth = self.world.truth(who, &desired);
        let violations: Vec<Violation> =
            self.promises.iter().flat_map(|promise| promise.judge(&desired, &plan, &truth)).collect();
        if !violations.is_empty() {
            return Err(self.failure(step, who, "plan", &violations, &desired, &observed, &plan.changes, &truth));
        }
        Ok((plan, desired, observed))
    }

    #[allow(clippy::too_many_arguments)]
    fn failure(
        &self,
        step: usize,
        who: usize,
        what: &str,
        violations: &[Violation],
        desired: &Desired,
        observed: &Observed,
        changes: &[Change],
        truth: &Truth,
    ) -> Failure {
        let mut report = format!("step {step}: {what} of deployment `{}` breaks a promise:\n", self.owner(who));
        for violation in violations {
            let _ = writeln!(report, "  {violation}");
        }
        let _ = writeln!(report, "changes:");
        for change in changes {
            let _ = writeln!(
                report,
                "  {} {} {} {}  ({})",
                change.action,
                change.pool,
                change.instance.as_ref().map_or("-".to_owned(), |i| format!(
                    "{}[{}]",
                    i.name,
                    i.id.as_ref().map_or("new", |id| id.as_str())
                )),
                change.agent.as_ref().map_or("-".to_owned(), |a| format!("agent {}[{}]", a.name, a.id)),
                change.reason
            );
        }
        let _ = writeln!(report, "truth (from `{}`'s side):", self.owner(who));
        for ((_, id), instance) in &truth.instances {
            let _ = writeln!(
                report,
                "  instance {}[{id}] {} {:?} pool {:?}",
                instance.name,
                instance.state,
                instance.owner,
                instance.pool.as_ref().map(|p| p.as_str())
            );
        }
        for ((_, id), agent) in &truth.agents {
            let _ = writeln!(
                report,
                "  agent {}[{id}] {:?}{} on {:?}",
                agent.name,
                agent.owner,
                if agent.busy { " busy" } else { "" },
                agent.runs_on.as_ref().map(|(_, id)| id.as_str())
            );
        }
        let _ = writeln!(
            report,
            "config:\n{}",
            indent(&self.deployments.get(who).map(Deployment::yaml).unwrap_or_default())
        );
        let _ = writeln!(report, "(config hash {})", desired.config_hash);
        let _ = writeln!(report, "observed:\n{}", indent(&serde_yaml::to_string(observed).unwrap_or_default()));
        Failure { report }
    }

    fn play(&mut self, index: usize, step: &Step) -> Result<(), Failure> {
        match step {
            Step::Jobs { platform, count } => {
                for _ in 0..*count {
                    self.world.push_task(PLATFORMS[platform % PLATFORMS.len()]);
                }
            }
            Step::Cycle { who, crash, late, slow } => {
                if *who >= self.deployments.len() {
                    return Ok(());
                }
                let (plan, desired, _) = self.plan_and_judge(*who, index)?;
                if *slow {
                    self.world.start(*who, &desired, &plan.changes);
                } else {
                    let crash_at = crash.map(|at| usize::from(at) % plan.changes.len().max(1));
                    self.world.apply(*who, &desired, &plan.changes, crash_at, *late);
                }
            }
            Step::Finish { who, late } => {
                if *who < self.deployments.len() {
                    let desired = self.deployments[*who].desired().clone();
                    self.world.finish(*who, &desired, *late);
                }
            }
            Step::CheckIn { mask } => self.world.check_in(*mask),
            Step::TakeJobs { mask } => self.world.take_jobs(*mask),
            Step::DrainedTakesJob { skip } => self.world.drained_takes_job(usize::from(*skip)),
            Step::FinishJobs { mask } => self.world.finish_jobs(*mask),
            Step::Advance { minutes } => self.world.advance(*minutes),
            Step::HandRegister { look, pick, standalone, platform } => {
                let ours = self.owner(0).to_owned();
                let theirs = OWNER_PAIRS.iter().find(|(o, _)| *o == ours).map_or("other", |(_, t)| t).to_owned();
                let pools = self.deployments.first().map(|d| d.pools.clone()).unwrap_or_default();
                let name = look_alike(&self.world, &ours, &theirs, &pools, *look, *pick);
                self.world.hand_register(&name, PLATFORMS[platform % PLATFORMS.len()], *standalone);
            }
            Step::Config(change) => {
                if let Some(ours) = self.deployments.first_mut() {
                    ours.change_config(change);
                }
            }
            Step::SavePlan => {
                if self.deployments.is_empty() {
                    return Ok(());
                }
                // One-shot commands and `watch` do not run at once (`apply` waits for the owner lock `watch` holds):
                // a `watch` with work in flight was stopped first, finishing its work (as on SIGTERM).
                let desired = self.deployments[0].desired().clone();
                self.world.finish(0, &desired, false);
                let (plan, desired, _) = self.plan_and_judge(0, index)?;
                // Only a plan that was right when it was made can show harm done by applying it late.
                let fine_then = oracle::check(&desired, &plan, &self.world.truth(0, &desired)).is_empty();
                self.saved = fine_then.then_some((plan, desired));
            }
            Step::ApplySaved => {
                let Some((saved, _)) = self.saved.take() else { return Ok(()) };
                let desired = self.deployments[0].desired().clone();
                // See `SavePlan`: a `watch` of ours was stopped first.
                self.world.finish(0, &desired, false);
                let fresh = self.world.observe(0, &desired);
                let kept = still_safe(&saved, &desired, &fresh, self.world.now);
                let late = Plan { changes: kept.clone(), ..saved.clone() };
                self.judged.late_applies += 1;
                let truth = self.world.truth(0, &desired);
                let violations = if self.promises.contains(&Promise::LateApply) {
                    oracle::check(&desired, &late, &truth)
                } else {
                    Vec::new()
                };
                if !violations.is_empty() {
                    return Err(self.failure(
                        index,
                        0,
                        "saved plan applied a cycle late",
                        &violations,
                        &desired,
                        &fresh,
                        &kept,
                        &truth,
                    ));
                }
                self.world.apply(0, &desired, &kept, None, false);
            }
        }
        Ok(())
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|line| format!("    {line}\n")).collect()
}

/// The saved-plan check `apply PLANFILE` makes before a change's first step.
///
/// The changes of a saved plan that `apply PLANFILE` carries out after observing again at `now`
/// (`src/cmd/apply.rs`): none when the config changed (the hash differs), else those whose preconditions hold.
fn still_safe(saved: &Plan, desired: &Desired, fresh: &Observed, now: Timestamp) -> Vec<Change> {
    if saved.config_hash != desired.config_hash {
        return Vec::new();
    }
    let checks = plan::preconditions(&saved.changes, desired, fresh, now);
    saved.changes.iter().zip(checks).filter(|(_, check)| check.is_ok()).map(|(change, _)| change.clone()).collect()
}

/// Every config a scenario starts with, as YAML and as built directly (for `loads_like_the_config_loader`).
pub fn configs(scenario: &Scenario) -> Vec<(String, Desired)> {
    let sim = Sim::new(scenario, &[]);
    sim.deployments.iter().map(|deployment| (deployment.yaml(), deployment.build())).collect()
}

/// Plays a history; every plan made on the way must keep the promises.
pub fn run(scenario: &Scenario, promises: &[Promise]) -> Result<Judged, Failure> {
    let mut sim = Sim::new(scenario, promises);
    for (index, step) in scenario.steps.iter().enumerate() {
        sim.play(index, step)?;
    }
    // Promise 5 on the final world, once per history.
    if !sim.deployments.is_empty() {
        let desired = sim.deployments[0].desired().clone();
        let observed = sim.world.observe(0, &desired);
        let violations = oracle::deterministic(&desired, &observed, sim.world.now);
        if !violations.is_empty() {
            let truth = sim.world.truth(0, &desired);
            return Err(sim.failure(scenario.steps.len(), 0, "plan", &violations, &desired, &observed, &[], &truth));
        }
    }
    Ok(sim.judged)
}
